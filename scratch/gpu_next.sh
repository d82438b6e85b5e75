#!/bin/bash
# Next GPU session (after session 10), call A of two. First, in /work/main:
#   git worktree remove /work/wt-hf   (if it still exists)   &&   git checkout gpu-next
# gpu-next = main + hf-kernels (10_1-10_4, the HF kernel path) + decode-kernels (09_1, the decode
# layer on it): none of it has run on a GPU. Carry [".whl", "scratch"]:
#   bash scratch/gpu_next.sh 2>&1 | tail -60
# Correctness: the GPU tests of everything new, then compute-sanitizer over the whole workload
# (its new parts hf_experts and decode_step included). Call B: scratch/gpu_next_b.sh.
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl 2>&1 | tail -2
export PYTHONPATH=/tmp/site:$PWD
mkdir -p "$OUT/logs"
git log --oneline -1
SECONDS=0
MPLBACKEND=agg timeout -s INT 300 python3 -m pytest -q -p no:cacheprovider -rfE tests/test_tma.py \
  tests/test_hf_kernels.py tests/test_hf_backend.py tests/test_decode.py tests/test_layer_kernels.py \
  tests/test_io_overlap.py tests/test_launch.py > "$OUT/logs/tests.txt" 2>&1
echo "tests rc=$? ${SECONDS}s"; tail -25 "$OUT/logs/tests.txt"
MPLBACKEND=agg timeout 240 python3 tools/sanitize.py --no-save --tools memcheck racecheck 2>&1 | tail -8
echo "all ${SECONDS}s"
