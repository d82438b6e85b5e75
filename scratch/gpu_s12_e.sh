export PYTHONPATH=$PWD
T0=$(date +%s)
timeout 70 python3 -m pytest -q -p no:cacheprovider tests/test_fp8_kernels.py 2>&1 | tail -8
echo "== fp8 tests $(( $(date +%s) - T0 )) s"
mkdir -p "$OUT"
timeout 150 python3 benchmarks/bench_fp8.py --shapes mixtral-8x7b qwen3-30b-a3b --no-layer 2>&1 | tail -30
cp benchmarks/results/fp8_grouped_gemm__*.json "$OUT/" 2>/dev/null
echo "== total $(( $(date +%s) - T0 )) s"
