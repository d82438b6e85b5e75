"""Every source in kernels/ compiles for sm_90a on any machine; errors quote their lines."""

import pytest

from moe_course import kernels, launch

SOURCES = kernels.kernel_files()
pytestmark = pytest.mark.nvrtc  # every test here compiles


# opt-in builds the benchmarks try beside the defaults (kernels/NOTES.md says where each stands):
# the ping-pong 06_2 / 10_2, and ISSUE_IN_TURN in every kernel whose consumers take its turns
IN_TURN = [launch.STEPS[launch.BEST], launch.GATHER, launch.SWIGLU, launch.TRANSPOSED_B, launch.DSWIGLU,
           launch.WEIGHT_GRAD, launch.HF_SWIGLU, launch.HF_DSWIGLU, launch.HF_TRANSPOSED_B, launch.HF_WEIGHT_GRAD,
           launch.HF_DOWN_WEIGHT_GRAD, launch.FP8_GEMM, launch.FP8_GEMM_WIDE, launch.FP8_SWIGLU, launch.FP8_GATHER]
EXPERIMENTS = [launch.pingpong_step(launch.DSWIGLU), launch.pingpong_step(launch.HF_DSWIGLU),
               *(step.with_defines(ISSUE_IN_TURN=1) for step in IN_TURN)]


def _serialised_wgmma(log: str) -> list[str]:
    """ptxas's warnings that it serialised a kernel's wgmma (C7514, C7518, ...): each multiply then
    waits for the last, the kernel runs several times slower and is still correct, so only the
    compile log shows it (kernels/NOTES.md, session 23)."""
    return [line for line in log.splitlines() if "wgmma" in line and "serialized" in line]


def test_there_are_kernels():
    assert SOURCES, "kernels/ holds no .cu file"


@pytest.mark.parametrize("path", SOURCES, ids=[p.name for p in SOURCES])
def test_compiles_for_sm90a(path):
    report = kernels.compile_report(path, arch="sm_90a")
    assert report.cubin[:4] == b"\x7fELF", "NVRTC must return a cubin (an ELF file)"
    assert report.resources, f"ptxas reported no __global__ function in {path.name}"
    for res in report.resources.values():
        assert 0 < res.registers <= 255
        assert not res.spills, f"{res.kernel} spills registers: {res}"
    assert not _serialised_wgmma(report.log), _serialised_wgmma(report.log)[0]


@pytest.mark.parametrize("step", EXPERIMENTS, ids=[s.name for s in EXPERIMENTS])
def test_experimental_builds_compile_with_their_wgmma_pipelined(step):
    report = kernels.compile_report(step.source, defines=step.defines)
    assert not any(res.spills for res in report.resources.values())
    assert not _serialised_wgmma(report.log), _serialised_wgmma(report.log)[0]


def test_the_serialisation_check_sees_ptxas_warning():
    """The check above would see the warning: a wgmma waited for behind a branch ptxas cannot
    prove uniform (what ISSUE_IN_TURN's first draft did, session 26)."""
    log = ("ptxas info    : (C7518) Potential Performance Loss: wgmma.mma_async instructions are serialized due "
           "to program dependence on compiler-inserted WG.DP in divergent path in the function 'fp8_grouped_gemm' "
           "in line 1784")  # NVRTC 13.0's words, copied from that build's log
    assert _serialised_wgmma(log) == [log]


def test_compile_error_quotes_the_offending_line():
    src = 'extern "C" __global__ void k(float* y) {\n  int ok = 1;\n  y[0] = not_declared;\n}\n'
    with pytest.raises(kernels.CompileError) as err:
        kernels.compile_report(src)
    msg = str(err.value)
    assert "line 3" in msg and "not_declared" in msg
    assert ">    3 |   y[0] = not_declared;" in msg


def test_unknown_kernel_name_lists_the_known_ones():
    with pytest.raises(FileNotFoundError, match="00_scale"):
        kernels.read_source("no_such_kernel")


def test_an_edited_kernel_file_is_read_again(tmp_path, monkeypatch):
    """Sources are cached by modification time and size, and the file is looked at again at
    most every SOURCE_RECHECK_SECONDS: a learner's edit must still show, a hot loop not stat."""
    now = [0.0]
    monkeypatch.setattr(kernels, "_clock", lambda: now[0])
    f = tmp_path / "mine.cu"
    f.write_text("// one")
    assert kernels.read_source(f).code == "// one"
    f.write_text("// two, longer")
    assert kernels.read_source(f).code == "// one"  # within the window: not looked at
    now[0] += kernels.SOURCE_RECHECK_SECONDS
    assert kernels.read_source(f).code == "// two, longer"
    f.unlink()
    now[0] += kernels.SOURCE_RECHECK_SECONDS
    with pytest.raises(FileNotFoundError, match="no kernel source"):
        kernels.read_source(f)


def test_ptxas_report_parser():
    log = """ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'gemm' for 'sm_90a'
ptxas info    : Function properties for gemm
ptxas         .     8 bytes stack frame, 4 bytes spill stores, 12 bytes spill loads
ptxas info    : Used 168 registers, used 1 barriers, 1024 bytes smem, 400 bytes cmem[0]
ptxas info    : Compiling entry function 'small' for 'sm_90a'
ptxas info    : Function properties for small
ptxas         .     0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 12 registers, used 0 barriers
"""
    got = kernels.parse_ptxas_report(log)
    assert got["gemm"] == kernels.Resources("gemm", 168, 1024, 8, 4, 12, 1)
    assert got["gemm"].spills
    assert got["small"] == kernels.Resources("small", 12, 0, 0, 0, 0, 0)


def test_defines_reach_the_source():
    src = 'extern "C" __global__ void k(float* y) {\n#if TILE != 64\n#error TILE must be 64\n#endif\n y[0] = TILE; }\n'
    kernels.compile_report(src, defines={"TILE": 64})
    with pytest.raises(kernels.CompileError, match="TILE must be 64"):
        kernels.compile_report(src, defines={"TILE": 32})


def test_load_without_gpu_says_why(monkeypatch):
    from moe_course import machine

    monkeypatch.setattr(kernels, "info", lambda: machine.MachineInfo(why_no_gpu="test: no GPU"))
    with pytest.raises(RuntimeError, match="test: no GPU"):
        kernels.load("00_scale")


def test_the_gpu_build_changes_when_any_kernel_file_changes(monkeypatch, tmp_path):
    """CuPy caches a build by its source text alone; a step that #includes an earlier step's file
    must still rebuild when that file changes, so the text handed to CuPy carries a fingerprint
    of every file in kernels/."""
    import shutil

    cupy = pytest.importorskip("cupy")
    seen = []

    class FakeRawModule:
        def __init__(self, code, options, name_expressions):
            seen.append(code)

        def compile(self):
            pass

    monkeypatch.setattr(cupy, "RawModule", FakeRawModule)
    folder = tmp_path / "kernels"
    shutil.copytree(kernels.KERNELS_DIR, folder)
    monkeypatch.setattr(kernels, "KERNELS_DIR", folder)
    source = kernels.read_source(folder / "03_3_gather.cu")
    kernels._load.cache_clear()
    kernels._load(source, "sm_90a", (), (), ())
    (folder / "03_2_warp_specialized.cu").write_text((folder / "03_2_warp_specialized.cu").read_text() + "\n// edited\n")
    kernels._load.cache_clear()
    kernels._load(source, "sm_90a", (), (), ())
    assert seen[0] != seen[1] and seen[0].startswith(source.code)
    kernels._load.cache_clear()
