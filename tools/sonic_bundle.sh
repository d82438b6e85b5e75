#!/usr/bin/env bash
# SonicMoE and transformers for a GPU machine with no package registry (chapter 10's SonicMoE
# contender, benchmarks/bench_hf_backends.py): two folders of unzipped wheels, packed into .sonic/.
#   sonic_site.tar.xz (about 42 MiB): sonic-moe 0.1.2.post1 and its kernel stack (quack, the CuTe
#     DSL of nvidia-cutlass-dsl, tvm-ffi, torch-c-dlpack-ext), for CPython 3.12 on x86-64 Linux;
#   hf_site.tar.xz (about 9 MiB): transformers and what it needs beyond the machine's image
#     (whose transformers and huggingface-hub are older), at requirements/locks/cuda13.txt's
#     versions.
# Wheels are unzipped rather than installed because the machine has no registry and no time to
# spare: PYTHONPATH is enough. --no-deps, because torch, numpy, tokenizers, safetensors and the
# CUDA Python bindings come from the image (sonic-moe's pin of torch<=2.9.1 is ignored there).
# The two together stay under the 64 MiB that one call may carry. On the GPU machine (once per
# held machine; .sonic/README.txt says the same):
#   mkdir -p /tmp/sonic && tar -xJf .sonic/sonic_site.tar.xz -C /tmp/sonic && tar -xJf .sonic/hf_site.tar.xz -C /tmp/sonic
#   export PYTHONPATH=$PWD:/tmp/sonic/site:/tmp/sonic/site/nvidia_cutlass_dsl/python_packages:/tmp/sonic/hf_site
# Run here, where PyPI can be reached; the folder .sonic/ is not part of the repository
# (kernels/NOTES.md keeps the recipe this script follows).
set -euo pipefail
REPO=$(git -C "$(dirname "$0")" rev-parse --show-toplevel)
WORK=${WORK:-/tmp/sonic-bundle}
PYTHON=${PYTHON:-python3}  # any Python with pip: the wheels are chosen for the machine's 3.12
LOCK=$REPO/requirements/locks/cuda13.txt
OUT=$REPO/.sonic

SONIC=(sonic-moe==0.1.2.post1 quack-kernels==0.3.11 nvidia-cutlass-dsl==4.4.2
       nvidia-cutlass-dsl-libs-base==4.4.2 apache-tvm-ffi==0.1.15.post2 torch-c-dlpack-ext==0.1.5)
# transformers, then what it and its dependencies need that the image lacks or has too old
HF_NAMES=(transformers huggingface-hub kernels httpx2 httpcore2 truststore tomlkit regex tqdm
          click idna anyio h11 hf-xet typing-extensions)

pin() {  # NAME -> NAME==VERSION, as the lock pins it
  local line
  line=$(grep -m1 "^$1==" "$LOCK") || { echo "$1 is not pinned in $LOCK" >&2; return 1; }
  echo "${line%% *}"
}
HF=()
for name in "${HF_NAMES[@]}"; do HF+=("$(pin "$name")"); done

bundle() {  # DIR TARBALL SPEC... -> $WORK/DIR (the unzipped wheels), packed into $OUT/TARBALL
  local dir=$1 tarball=$OUT/$2 whl; shift 2
  rm -rf "$WORK/$dir" "$WORK/$dir-wheels"
  "$PYTHON" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform any \
    -d "$WORK/$dir-wheels" "$@"
  mkdir "$WORK/$dir"
  for whl in "$WORK/$dir-wheels"/*.whl; do unzip -q -o "$whl" -d "$WORK/$dir"; done
  (cd "$WORK" && tar -c "$dir" | xz --x86 --lzma2=preset=9e,dict=192MiB) > "$tarball.partial"
  mv "$tarball.partial" "$tarball"
}

check() {  # TARBALL TOP-LEVEL-NAME...: each name is in the tarball's folder
  local tarball=$1 top name; shift
  top=$(tar -tJf "$tarball" | cut -d/ -f2 | sort -u)
  for name in "$@"; do
    grep -qxF "$name" <<< "$top" || { echo "$tarball lacks $name" >&2; return 1; }
  done
}

mkdir -p "$WORK" "$OUT"
bundle site sonic_site.tar.xz "${SONIC[@]}"
bundle hf_site hf_site.tar.xz "${HF[@]}"
check "$OUT/sonic_site.tar.xz" sonicmoe quack nvidia_cutlass_dsl tvm_ffi torch_c_dlpack_ext
check "$OUT/hf_site.tar.xz" transformers huggingface_hub kernels httpx2 httpcore2 truststore tomlkit \
  regex tqdm click idna anyio h11 hf_xet typing_extensions.py

cat > "$OUT/README.txt" <<EOF
Made by tools/sonic_bundle.sh (see its header and kernels/NOTES.md); not part of the repository.
sonic_site.tar.xz: site/, the unzipped wheels of ${SONIC[*]}
hf_site.tar.xz: hf_site/, the unzipped wheels of ${HF[*]}
(CPython 3.12, x86-64 Linux; no dependencies beyond these: torch, numpy, tokenizers, safetensors
and the CUDA Python bindings are the machine's own.)

Carry .sonic (carry: [".sonic", ...]). On the GPU machine, once per held machine:
  mkdir -p /tmp/sonic && tar -xJf .sonic/sonic_site.tar.xz -C /tmp/sonic && tar -xJf .sonic/hf_site.tar.xz -C /tmp/sonic
then, in every command, from the repository root:
  export PYTHONPATH=\$PWD:/tmp/sonic/site:/tmp/sonic/site/nvidia_cutlass_dsl/python_packages:/tmp/sonic/hf_site
EOF

ls -l "$OUT"
total=$(( $(stat -c %s "$OUT/sonic_site.tar.xz") + $(stat -c %s "$OUT/hf_site.tar.xz") ))
echo "both tarballs: $total bytes"
if (( total >= 64 * 1024 * 1024 )); then echo "over the 64 MiB that one call may carry" >&2; exit 1; fi
