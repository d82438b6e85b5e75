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
    assert "ws_grouped_gemm" in course and "build_tile_map" in course and len(course) == 31
    ours, others = sanitize.findings(OUTPUT.splitlines(), course)
    assert [sanitize.kernel_of(r) for r in ours] == ["ws_grouped_gemm", None]  # the hazard; an unfiltered API error
    assert "Read Thread (159,0,0)" in ours[0][1] and "cuMemAlloc" in ours[1][0]
    assert others == ["nvjet_sm90_tst_64x32_64x16_1x4_h_bz_splitK_NTT"]


TORCH_COPY = """========= Uninitialized __global__ memory read of size 2 bytes
=========     at void at::native::unrolled_elementwise_kernel<at::native::direct_copy_kernel_cuda(at::TensorIteratorBase &)::[lambda() (instance 3)]::operator ()() const::[lambda(float) (instance 1)], std::array<char *, (unsigned long)2>, (int)4>(int, T1, T2, T4, T5, T6, T7)+0x830
=========     by thread (64,0,0) in block (0,0,0)
=========     Address 0x7f085d7fec80
=========     Saved host backtrace up to driver entry point at kernel launch time
=========         Host Frame:  [0x1376c] in libcudart.so.13
=========         Host Frame: at::_ops::mm::call(at::Tensor const&, at::Tensor const&) [0x2d26240] in libtorch_cpu.so
=========         Host Frame: router_logits in layer.py:89
=========         Host Frame: forward in layer.py:120
========= ERROR SUMMARY: 1 error
"""


def test_a_cpp_kernel_is_named_and_listed_with_where_python_launched_it():
    """torch's copy kernel, reported by initcheck on an H100 (session 14): its name is a C++
    template, which a plain identifier pattern took for no kernel at all, an API error."""
    ours, others = sanitize.findings(TORCH_COPY.splitlines(), kernels.entry_points())
    assert ours == [] and others == ["at::native::unrolled_elementwise_kernel (from router_logits in layer.py:89)"]
    report = sanitize.reports(TORCH_COPY.splitlines())[0]
    assert sanitize.python_frames(report) == ["router_logits in layer.py:89", "forward in layer.py:120"]


def test_one_report_per_access():
    """initcheck reports each uninitialised word of one copy (seen on an H100: 256 per 8 KiB copy)."""
    copy = "========= Host API memory access error at host access to 0x7fbd0c7fdc00 of size 8,192 bytes"
    lines = [ln for i in range(3) for ln in (copy, f"=========     Uninitialized access to 0x7fbd0c7fdc{i}0 on access by "
                                                   "cudaMemcpy source", "========= ")]
    ours, _ = sanitize.findings(lines, kernels.entry_points())
    assert len(ours) == 3
    once = sanitize.same_access_once(ours)
    assert len(once) == 1 and once[0][0] == copy and once[0][-1] == "========= (3 reports of this access)"


@pytest.mark.skipif(machine.has_gpu(), reason="with a GPU, main() runs the real thing (minutes)")
def test_no_gpu_says_so_and_exits_0(capsys):
    import sys

    argv, sys.argv = sys.argv, ["sanitize.py"]
    try:
        assert sanitize.main() == 0
    finally:
        sys.argv = argv
    assert "needs an NVIDIA GPU" in capsys.readouterr().out


# --- make sanitize EX=03: the learner's own kernel ------------------------------------------

def _course_copy(tmp_path, monkeypatch, filled: bool):
    """A course folder whose exercise 03 is unfilled (as generated) or filled (the solution)."""
    import shutil

    (tmp_path / "exercises").mkdir()
    src = sanitize.ROOT / ("solutions" if filled else "exercises") / "03_naive_grouped_gemm.ipynb"
    shutil.copy(src, tmp_path / "exercises" / src.name)
    monkeypatch.setattr(sanitize, "ROOT", tmp_path)


def test_an_unfilled_exercise_is_refused_in_one_line(tmp_path, monkeypatch, capsys):
    _course_copy(tmp_path, monkeypatch, filled=False)
    assert sanitize.main(["--exercise", "03"]) == 1
    assert capsys.readouterr().out.strip() == ("make sanitize EX=03: 03_naive_grouped_gemm.ipynb: write your kernel "
                                               "first (it still says YOUR CODE HERE)")


def test_the_learners_kernel_is_what_runs(tmp_path, monkeypatch):
    _course_copy(tmp_path, monkeypatch, filled=True)
    source = sanitize.exercise_source("03")
    assert "my_grouped_gemm" in source and "YOUR CODE HERE" not in source
    cmd, counted = sanitize.exercise_workload("03", source, tmp_path)
    assert cmd[-4:] == ["moe_course.graders.ex03_naive_grouped_gemm", str(tmp_path / "my_grouped_gemm.cu"), "0",
                        "--awkward-only"]
    assert (tmp_path / "my_grouped_gemm.cu").read_text() == source
    assert "my_grouped_gemm" in counted and "build_tile_map" in counted  # their hazards count, the tile map's too


@pytest.mark.skipif(machine.has_gpu(), reason="with a GPU, main() runs the real thing")
def test_without_a_gpu_the_exercise_run_points_to_make_grade(tmp_path, monkeypatch, capsys):
    _course_copy(tmp_path, monkeypatch, filled=True)
    assert sanitize.main(["--exercise", "03"]) == 0
    assert "`make grade EX=03` runs your kernel thread by thread" in capsys.readouterr().out


def test_the_graders_verdict_counts(tmp_path):
    """Under the tools, a wrong result the grader finds fails the run like a hazard does; a clean
    run needs the grader's "ok". (A stand-in for compute-sanitizer runs the workload as it would.)"""
    import sys

    fake = tmp_path / "compute-sanitizer"
    fake.write_text(f"#!{sys.executable}\nimport subprocess, sys\nargs = sys.argv[1:]\n"
                    f"cmd = args[args.index({sys.executable!r}):]\nrc = subprocess.call(cmd)\n"
                    "print('========= ERROR SUMMARY: 0 errors')\nsys.exit(rc)\n")
    fake.chmod(0o755)
    say = lambda text: [sys.executable, "-c", f"print({text!r})"]
    wrong = sanitize.run_tool(str(fake), "memcheck", 60, say('{"ok": false, "message": "row 3 is wrong"}'), set())
    assert wrong["errors"] == 1 and wrong["finished"] and "row 3 is wrong" in wrong["report"][0]
    right = sanitize.run_tool(str(fake), "memcheck", 60, say('{"ok": true, "notes": []}'), set())
    assert right["errors"] == 0 and right["finished"]
    silent = sanitize.run_tool(str(fake), "memcheck", 60, say("nothing"), set())
    assert not silent["finished"]
