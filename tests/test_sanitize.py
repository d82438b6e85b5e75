"""`make sanitize` (tools/sanitize.py): what counts as a finding. Its GPU run cannot happen here;
what it makes of compute-sanitizer's output can: a hazard in a course kernel counts, the same in
a library's kernel (cuBLAS, under torch's reference matmuls) is listed but not counted, and the
one notice filtered (cuda-bindings probing the driver) is filtered by its exact text only."""

import pytest
from benchmark_scripts import load

from moe_course import kernels, machine

sanitize = load("sanitize", "tools")

OUTPUT = """========= COMPUTE-SANITIZER
========= Program hit CUDA_ERROR_INVALID_VALUE (error 1) due to "invalid argument" on CUDA API call to cuGetProcAddress_v2.
=========     Saved host backtrace up to driver entry point at error
=========         Host Frame: cuGetProcAddress in libcuda.so
========= Error: Potential WAR hazard detected at __shared__ 0x38445 in block (109,0,0) :
=========     Read Thread (159,0,0) at ws_grouped_gemm+0x4f0
=========     Write Thread (0,0,0) at ws_grouped_gemm+0x57a0
=========     Current Value : 11, Incoming Value : 0
========= Error: Potential WAR hazard detected at __shared__ 0x2034488 in block (2,8,0) :
=========     Read Thread (63,0,0) at nvjet_sm90_tst_64x32_64x16_1x4_h_bz_splitK_NTT+0xb20
=========     Write Thread (256,0,0) at nvjet_sm90_tst_64x32_64x16_1x4_h_bz_splitK_NTT+0x3070
========= Program hit CUDA_ERROR_INVALID_VALUE (error 1) due to "invalid argument" on CUDA API call to cuMemAlloc.
========= RACECHECK SUMMARY: 2 hazards displayed (2 errors, 0 warnings)
"""


def test_only_the_course_kernels_and_unfiltered_notices_count():
    course = kernels.entry_points()
    assert "ws_grouped_gemm" in course and "build_tile_map" in course and len(course) == 19
    ours, others = sanitize.findings(OUTPUT.splitlines(), course)
    assert [sanitize.kernel_of(r) for r in ours] == ["ws_grouped_gemm", None]  # the hazard; an unfiltered API error
    assert "Read Thread (159,0,0)" in ours[0][1] and "cuMemAlloc" in ours[1][0]
    assert others == ["nvjet_sm90_tst_64x32_64x16_1x4_h_bz_splitK_NTT"]


@pytest.mark.skipif(machine.has_gpu(), reason="with a GPU, main() runs the real thing (minutes)")
def test_no_gpu_says_so_and_exits_0(capsys):
    import sys

    argv, sys.argv = sys.argv, ["sanitize.py"]
    try:
        assert sanitize.main() == 0
    finally:
        sys.argv = argv
    assert "needs an NVIDIA GPU" in capsys.readouterr().out
