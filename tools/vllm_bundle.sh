#!/usr/bin/env bash
# vLLM's fused MoE for a GPU machine with no package registry (chapter 09's serving contender,
# moe_course/vllm_moe.py): the files of the vLLM 0.26.0 wheel (the newest vLLM that pins torch
# 2.11.0) that its fused-MoE path needs, unmodified, packed into .serving/vllm-0.26.0-fused-moe.tar.xz
# (39 MiB; the wheel is 290 MiB). On the GPU machine:
#   mkdir -p /tmp/vllm && tar -xJf .serving/vllm-0.26.0-fused-moe.tar.xz -C /tmp/vllm
#   MOE_COURSE_VLLM_SITE=/tmp/vllm/site python3 benchmarks/bench_decode.py
# Run here, where PyPI can be reached; the folder .serving/ is not part of the repository.
set -euo pipefail
REPO=$(git -C "$(dirname "$0")" rev-parse --show-toplevel)
WORK=${WORK:-/tmp/vllm-bundle}
WHEEL=vllm-0.26.0-cp38-abi3-manylinux_2_28_x86_64.whl
SHA256=adb1e4c9b46d0dfdb094121ae5aad670a42412dd813ed4e5db069ed6a15006de  # PyPI's digest of the wheel
mkdir -p "$WORK" && cd "$WORK"
if [ ! -f "$WHEEL" ]; then
  URL=$(curl -s https://pypi.org/pypi/vllm/json | python3 -c "
import json, sys
print(next(f['url'] for f in json.load(sys.stdin)['releases']['0.26.0'] if f['filename'] == '$WHEEL'))")
  case "$URL" in http*) ;; *) URL="https://pypi.org/packages/${URL#../../packages/}";; esac  # a mirror's relative link
  curl -sSL -o "$WHEEL" "$URL"
fi
echo "$SHA256  $WHEEL" | sha256sum -c -
rm -rf site && mkdir site
unzip -q "$WHEEL" -d site \
  'vllm/_version.py' \
  'vllm/_moe_C_stable_libtorch.abi3.so' \
  'vllm/utils/math_utils.py' \
  'vllm/model_executor/layers/fused_moe/fused_moe.py' \
  'vllm/model_executor/layers/fused_moe/activation.py' \
  'vllm/model_executor/layers/fused_moe/moe_align_block_size.py' \
  'vllm/model_executor/layers/fused_moe/configs/*' \
  'vllm-0.26.0.dist-info/licenses/LICENSE' \
  'vllm-0.26.0.dist-info/METADATA'
mkdir -p "$REPO/.serving"
tar -cf - site | xz -9 -T0 > "$REPO/.serving/vllm-0.26.0-fused-moe.tar.xz"
ls -l "$REPO/.serving/vllm-0.26.0-fused-moe.tar.xz"
