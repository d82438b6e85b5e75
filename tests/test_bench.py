import time

import pytest

from moe_course import bench
from moe_course.ceilings import Ceilings


def test_cpu_benchmark_takes_the_median():
    delays = iter([0.0] * 2 + [0.001, 0.001, 0.05, 0.001, 0.001])
    m = bench.benchmark(lambda: time.sleep(next(delays)), warmup=2, reps=5, device="cpu",
                        flops=2e9, bytes=1e9, name="sleep")
    assert 0.9 < m.ms < 5, "median must ignore the one slow run"
    assert m.ms_p90 >= m.ms >= m.ms_p10
    assert m.tflops == pytest.approx(2e9 / (m.ms * 1e-3) / 1e12)
    assert m.tbps == pytest.approx(1e9 / (m.ms * 1e-3) / 1e12)
    assert m.intensity == 2.0


def test_benchmark_cycles_through_input_sets():
    seen = []
    bench.benchmark(seen.append, [(1,), (2,), (3,)], warmup=0, reps=6, device="cpu")
    assert seen == [1, 2, 3, 1, 2, 3]


def test_fraction_of_ceilings():
    m = bench.Measurement("x", ms=1.0, ms_p10=1, ms_p90=1, reps=1, device="cuda", flops=400e9, bytes=2e9)
    frac = m.fraction(Ceilings(matmul_tflops=800, copy_tbps=4))
    assert frac["of_matmul"] == pytest.approx(0.5)
    assert frac["of_copy"] == pytest.approx(0.5)


def test_rotate_overflows_the_l2():
    made = []
    sets = bench.rotate(lambda: made.append(1) or (len(made),), set_bytes=10 * 2**20, l2_bytes=50 * 2**20)
    assert len(sets) == 15  # 3 x 50 MiB of L2 / 10 MiB per set
    assert bench.rotate(lambda: (), set_bytes=1e9, l2_bytes=50 * 2**20) == [()]
    assert len(bench.rotate(lambda: (), set_bytes=1, l2_bytes=2**30)) == bench.MAX_SETS
    assert bench.rotate(lambda: (), set_bytes=1, l2_bytes=0) == [()]


def test_benchmark_refuses_no_inputs():
    with pytest.raises(ValueError, match="at least one input set"):
        bench.benchmark(lambda: None, [], device="cpu")
