#!/bin/bash
# Next GPU session, call B (after call A passed; still on gpu-next). Carry [".whl", "scratch"].
# 1. chapter 10 alone on the GPU: its executed copy and the hf_backends record it writes;
# 2. each HF kernel against the course kernel it varies (prediction: equal for 10_1, 10_3, 10_4);
# 3. benchmarks/bench_decode.py (record decode_gemm; target >= 85% of the copy at 64 and 512);
# 4. scratch/fp8_accum_probe.py (issue 21: which accumulator width the hardware matches).
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl 2>&1 | tail -2
export PYTHONPATH=/tmp/site:$PWD
mkdir -p "$OUT"
SECONDS=0
timeout -s INT 200 python3 tools/book.py execute 10 2>&1 | grep -v WARNING | tail -16
cp book/executed/10_in_your_model.ipynb benchmarks/results/hf_backends__*.json book/build/failed/*.ipynb "$OUT/" 2>/dev/null
echo "chapter 10 ${SECONDS}s"
MPLBACKEND=agg timeout 90 python3 scratch/hf_kernel_speed.py 2>&1 | tail -14
MPLBACKEND=agg timeout 150 python3 benchmarks/bench_decode.py 2>&1 | tail -45
cp benchmarks/results/decode_gemm__*.json "$OUT/" 2>/dev/null
MPLBACKEND=agg timeout 90 python3 scratch/fp8_accum_probe.py 2>&1 | tail -12
echo "all ${SECONDS}s"; ls "$OUT"
