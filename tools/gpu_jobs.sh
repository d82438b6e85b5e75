#!/usr/bin/env bash
# The measurements a session runs on a lent GPU machine, one job per call, so that no recipe
# lives only in an ignored scratch/ folder (which does not survive between sessions). The
# machine has torch, CuPy and pytest but no package registry and keeps nothing: what a job
# needs beyond the repository is carried (`carry` in the device tool) and unpacked here.
#
#   bash tools/gpu_jobs.sh tests            chapters 06 and 10's kernel GPU tests (nothing to carry)
#   bash tools/gpu_jobs.sh dswiglu          06_2 / 10_2 schedules, checked then timed (nothing to carry;
#                                           PINGPONG=1 adds the ping-pong builds, under a timeout)
#   bash tools/gpu_jobs.sh hf-sonic MODEL   chapter 10's backends beside SonicMoE, one model a call,
#                                           merged into the record (carry .sonic: tools/sonic_bundle.sh;
#                                           EXTRA=--eager-untimed for DeepSeek-V3)
#   bash tools/gpu_jobs.sh layer-sonic SHAPE  chapter 06's layer beside SonicMoE, one shape a call,
#                                           merged into moe_layer_sonicmoe (carry .sonic; CONTENDERS=...)
#   bash tools/gpu_jobs.sh decode           chapter 09's decode records with vLLM beside (carry .serving:
#                                           tools/vllm_bundle.sh)
#   bash tools/gpu_jobs.sh ncu-fp8 SHAPE PROJ  Nsight Compute on one launch of 07_2 (up or down): the
#                                           summary, and the SASS lines where the warps stall most
#                                           (TRY=KEY=VAL,...: of 07_2 built with those #defines too)
#   bash tools/gpu_jobs.sh fp8-try DEFINES  chapter 07's GPU tests (ISSUE_IN_TURN's builds against the
#                                           defaults' bytes among them), then bench_fp8.py --try DEFINES:
#                                           an experimental build timed beside 07_2 / 07_3 / 07_4
#   bash tools/gpu_jobs.sh layer-try DEFINES  the same for chapter 06's kernels: the in-turn test of
#                                           tests/test_layer_kernels.py, then bench_layer_kernels.py --try
#
# SonicMoE compiles with the CuTe DSL and autotunes through quack on its first call of a shape
# (minutes). Its caches are pointed into /tmp/quack and packed into $OUT/quack_cache.tar.xz at the
# end: carry that file back as scratch/quack_cache.tar.xz (it is unpacked first when present).
# Records land in benchmarks/results/ on the machine and are copied into $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."  # the repository root
export PYTHONPATH=$PWD
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -c "import torch, cupy; print('torch', torch.__version__, 'cupy', cupy.__version__)"

sonic_setup() {  # .sonic's two folders onto the path, quack's caches into /tmp/quack
  [ -f .sonic/sonic_site.tar.xz ] || { echo "carry .sonic (tools/sonic_bundle.sh makes it)" >&2; exit 1; }
  mkdir -p /tmp/sonic /tmp/quack
  [ -d /tmp/sonic/site ] || tar -xJf .sonic/sonic_site.tar.xz -C /tmp/sonic
  [ -d /tmp/sonic/hf_site ] || tar -xJf .sonic/hf_site.tar.xz -C /tmp/sonic
  [ -f scratch/quack_cache.tar.xz ] && tar -xJf scratch/quack_cache.tar.xz -C /tmp/quack
  export PYTHONPATH=$PWD:/tmp/sonic/site:/tmp/sonic/site/nvidia_cutlass_dsl/python_packages:/tmp/sonic/hf_site
  export QUACK_HOME=/tmp/quack/home QUACK_CACHE_DIR=/tmp/quack/cache
  export QUACK_CACHE_AUTOTUNING=1 QUACK_PRINT_AUTOTUNING=1 QUACK_COMPILE_WORKERS=16
}

sonic_pack() {
  (cd /tmp/quack && tar -c home cache 2>/dev/null | xz -T0 > "$OUT/quack_cache.tar.xz")
  ls -l "$OUT/quack_cache.tar.xz"
}

keep_records() {  # KIND...: this machine's records of those kinds into $OUT
  local kind
  for kind in "$@"; do cp benchmarks/results/"$kind"__*.json "$OUT"/ 2>/dev/null; done
  ls "$OUT"
}

job=${1:-}
case "$job" in
  tests)
    timeout 500 python3 -m pytest -p no:cacheprovider -q -m gpu tests/test_layer_kernels.py tests/test_hf_kernels.py 2>&1 | tail -15
    ;;
  dswiglu)
    timeout 300 python3 benchmarks/bench_dswiglu_schedules.py ${PINGPONG:+--pingpong} 2>&1 | tail -80
    keep_records dswiglu_schedules
    ;;
  hf-sonic)
    model=${2:?which model: qwen3_moe, mixtral, olmoe or deepseek_v3}
    sonic_setup
    timeout "${LIMIT:-560}" python3 benchmarks/bench_hf_backends.py --models "$model" --merge ${EXTRA:-} 2>&1 | tail -80
    sonic_pack
    keep_records hf_backends
    ;;
  layer-sonic)
    shape=${2:?which shape: sonicmoe-7b, qwen3-30b-a3b, mixtral-8x7b or deepseek-v3}
    sonic_setup
    # shellcheck disable=SC2086  # CONTENDERS: names separated by spaces ("torch loop" cannot be one of them)
    timeout "${LIMIT:-560}" python3 benchmarks/bench_moe_layer.py --shapes "$shape" --merge --record moe_layer_sonicmoe \
      --contenders ${CONTENDERS:-torch._grouped_mm course SonicMoE} 2>&1 | tail -60
    sonic_pack
    keep_records moe_layer_sonicmoe
    ;;
  decode)
    [ -f .serving/vllm-0.26.0-fused-moe.tar.xz ] || { echo "carry .serving (tools/vllm_bundle.sh makes it)" >&2; exit 1; }
    mkdir -p /tmp/vllm
    [ -d /tmp/vllm/site ] || tar -xJf .serving/vllm-0.26.0-fused-moe.tar.xz -C /tmp/vllm
    export MOE_COURSE_VLLM_SITE=/tmp/vllm/site
    timeout "${LIMIT:-560}" python3 benchmarks/bench_decode.py 2>&1 | tail -80
    keep_records decode_gemm decode_layer
    ;;
  fp8-try)
    defines=${2:?which #defines, e.g. ISSUE_IN_TURN=1}
    timeout 240 python3 -m pytest -p no:cacheprovider -q -m gpu tests/test_fp8_kernels.py 2>&1 | tail -8
    # --no-save: a run without the layer (or with fewer shapes) must not replace the whole record;
    # its numbers go into kernels/NOTES.md, and the record is made again once a build wins
    # shellcheck disable=SC2086  # SHAPES: names separated by spaces
    timeout "${LIMIT:-400}" python3 benchmarks/bench_fp8.py --no-layer --no-save --try "$defines" \
      ${SHAPES:+--shapes $SHAPES} 2>&1 | tail -60
    ;;
  layer-try)
    defines=${2:?which #defines, e.g. ISSUE_IN_TURN=1}
    timeout 150 python3 -m pytest -p no:cacheprovider -q -m gpu tests/test_layer_kernels.py -k in_turn 2>&1 | tail -6
    # shellcheck disable=SC2086  # SHAPES: names separated by spaces
    timeout "${LIMIT:-400}" python3 benchmarks/bench_layer_kernels.py --no-save --try "$defines" \
      ${SHAPES:+--shapes $SHAPES} 2>&1 | tail -70
    ;;
  ncu-fp8)
    shape=${2:-mixtral-8x7b} proj=${3:-up}
    cat > /tmp/fp8_one.py <<PY
from moe_course import configs, fp8, launch
from moe_course.grouped_gemm import expert_counts, make_problem
import torch
cfg = configs.by_name("$shape")
d_in, d_out = (cfg.d, 2 * cfg.n) if "$proj" == "up" else (cfg.n, cfg.d)
p = make_problem(expert_counts(cfg.T, cfg.E, cfg.K), d_in, d_out)
w_q, w_s = fp8.quantize_experts(fp8.quantize_blocks, p.w)
x_q, x_s = launch.quantize_1x128(p.x)
step = launch.fp8_gemm_step(d_out)
step = step.with_defines(**dict(kv.split("=") for kv in "${TRY:-}".split(",") if kv))
print("profiling", step.name)
for _ in range(3):  # the profiled launch is the third: compiled and warm
    launch.fp8_grouped_gemm(x_q, x_s, w_q, w_s, p.offs, validate=False, step=step)
torch.cuda.synchronize()
PY
    timeout 400 ncu --clock-control none --set full --import-source yes -k regex:fp8_grouped_gemm \
      --launch-skip 2 --launch-count 1 -f -o "$OUT/fp8_${shape}_${proj}${TRY:+_try}" python3 /tmp/fp8_one.py 2>&1 | tail -5
    ncu --import "$OUT/fp8_${shape}_${proj}${TRY:+_try}.ncu-rep" --page details 2>&1 | head -120
    ncu --import "$OUT/fp8_${shape}_${proj}${TRY:+_try}.ncu-rep" --page source --csv --print-source sass > /tmp/source.csv 2>&1
    python3 - <<'PY'
import csv, io
rows = list(csv.reader(open("/tmp/source.csv", errors="replace")))
head = next(i for i, r in enumerate(rows) if any("Warp Stall Sampling" in c for c in r))  # ncu prints a kernel row first
names = rows[head]
stall = next(i for i, c in enumerate(names) if c.startswith("Warp Stall Sampling (All"))
src = next(i for i, c in enumerate(names) if c in ("Source", "# Address") or "Source" in c)
body = [r for r in rows[head + 1:] if len(r) > stall and r[stall].replace(".", "").isdigit()]
total = sum(float(r[stall]) for r in body) or 1.0
print(f"{len(body)} SASS lines; the 40 where warps were sampled most ({names[stall]}):")
for r in sorted(body, key=lambda r: -float(r[stall]))[:40]:
    print(f"{100 * float(r[stall]) / total:5.1f}%  {r[src][:110]}")
PY
    ;;
  *)
    sed -n '2,29p' "$0"
    exit 2
    ;;
esac
