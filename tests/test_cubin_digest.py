"""tools/cubin_digest.py: every kernel build compiles to the cubin recorded in
kernels/cubin_digest.json (byte for byte), and the check does catch a changed kernel."""

import importlib
import json
import pkgutil
import shutil
import sys
from pathlib import Path

import pytest

import moe_course

TOOLS = Path(__file__).resolve().parent.parent / "tools"
sys.path.insert(0, str(TOOLS))
import cubin_digest  # noqa: E402

sys.path.remove(str(TOOLS))


def _recorded_or_skip() -> dict:
    try:
        key = cubin_digest.record_key()
    except RuntimeError as exc:
        pytest.skip(str(exc))
    record = cubin_digest.load_record()
    if key not in record:
        pytest.skip(f"cubins recorded for {', '.join(record) or 'nothing'}; this machine has {key}: not compared")
    return record[key]


def test_every_build_compiles_to_its_recorded_cubin():
    recorded = _recorded_or_skip()
    diffs = cubin_digest.compare(recorded["builds"], cubin_digest.digest())
    assert not diffs, ("kernels/ no longer compiles to the cubins recorded at "
                       f"{recorded['made_at']}:\n" + "\n".join(diffs) +
                       "\nA deliberate change of a kernel's code: record it with `python tools/cubin_digest.py --write`.")


def test_a_changed_kernel_is_caught(tmp_path):
    """The known-wrong answer: a full-precision divide slipped into the SwiGLU epilogue of a copy
    of kernels/ must show as a different cubin there, and the untouched 00_scale must not."""
    recorded = _recorded_or_skip()
    copy = tmp_path / "kernels"
    shutil.copytree(cubin_digest.KERNELS_DIR, copy)
    swiglu = copy / "03_4_swiglu.cu"
    swiglu.write_text("#define __fdividef(x, y) ((x) / (y))\n" + swiglu.read_text())
    now = cubin_digest.digest(copy, only=["03_4_swiglu.cu", "00_scale.cu"])
    diffs = cubin_digest.compare({b: recorded["builds"][b] for b in now}, now)
    assert [d.split(" ")[0] for d in diffs] == ["03_4_swiglu.cu"] * len(cubin_digest.OPTION_SETS), diffs
    assert all("cubin differs" in d and "PTX differs" in d for d in diffs)


def test_a_changed_entry_point_and_a_missing_build_are_reported():
    same = {"cubin_sha256": "a", "cubin_bytes": 1, "ptx_sha256": "p"}
    build = {s: same for s in cubin_digest.OPTION_SETS} | {"entries": ["k(.u64, .u32)"]}
    recorded = {"x.cu": build, "gone.cu": build}
    now = {"x.cu": build | {"entries": ["k(.u64, .u64)"]}, "new.cu": build}
    diffs = cubin_digest.compare(recorded, now)
    assert [d.split(":")[0] for d in diffs] == ["gone.cu", "new.cu", "x.cu"], diffs
    assert "recorded, but not built now" in diffs[0] and "not in the record" in diffs[1]
    assert "entry points differ" in diffs[2]


def test_entry_points_are_read_from_the_ptx():
    ptx = """.visible .entry gemm(
\t.param .align 64 .b8 gemm_param_0[128],
\t.param .u64 .ptr .align 1 gemm_param_1,
\t.param .u32 gemm_param_2
)
.visible .entry empty()
"""
    assert cubin_digest.entry_points(ptx) == ["empty()", "gemm(.align 64 .b8[128], .u64 .ptr .align 1, .u32)"]


def test_an_unknown_build_is_refused_with_the_known_ones():
    with pytest.raises(ValueError, match=r"no build named 99_nothing\.cu.*03_2_warp_specialized\.cu"):
        cubin_digest.digest(only=["99_nothing.cu"])


def _steps_of_the_course():
    """Every object in moe_course that names a file of kernels/ and its defines (a ``Step``; the
    exercise grader's Step names a learner's cell instead)."""
    found = {}
    for mod in pkgutil.walk_packages(moe_course.__path__, "moe_course."):
        module = importlib.import_module(mod.name)
        for value in list(vars(module).values()):
            for obj in value.values() if isinstance(value, dict) else [value]:
                source, defines = getattr(obj, "source", None), getattr(obj, "defines", None)
                if isinstance(source, str) and isinstance(defines, dict):
                    file = Path(source).stem + ".cu"
                    if (cubin_digest.KERNELS_DIR / file).exists():
                        found[cubin_digest.build_name(file, defines)] = obj
    return found


def test_every_step_of_the_course_is_a_recorded_build():
    steps = _steps_of_the_course()
    assert "03_2_warp_specialized.cu" in steps and "02_6_persistent.cu[BN=256]" in steps  # the scan works
    missing = sorted(set(steps) - set(cubin_digest.builds()))
    assert not missing, f"builds the course launches that tools/cubin_digest.py does not fingerprint: {missing}"
    record = json.loads(cubin_digest.RECORD.read_text())
    for key, made in record.items():
        assert set(made["builds"]) == set(cubin_digest.builds()), f"the record for {key} is not of today's builds"
