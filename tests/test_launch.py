"""moe_course/launch.py, the one place for the host side of kernels/: every kernel file has a
Step and a launcher there and nowhere else, every Step fits the GPU it asks for, and the input
checks build their messages only when they refuse. Runs without a GPU (the launches themselves
are tested per chapter: test_grouped_gemm, test_io_overlap, test_layer_kernels, ...)."""

import re

import pytest
import torch

from moe_course import ROOT, kernels, launch

HOPPER_SMEM_BYTES = 227 * 1024  # the most dynamic shared memory one block may opt into on sm_90
GLOBAL = re.compile(r'extern\s+"C"\s+__global__\s+void\s+(?:__launch_bounds__\s*\([^)]*\)\s*)?(\w+)\s*\(')


def files_without_launch(names) -> list[str]:
    return sorted(set(names) - set(launch.KERNEL_FILES))


def test_every_kernel_file_has_a_step_and_a_launcher():
    files = [p.stem for p in kernels.kernel_files()]
    assert files_without_launch(files) == []
    assert files_without_launch(files + ["07_1_new_idea"]) == ["07_1_new_idea"]  # the check sees a new file
    assert sorted(launch.KERNEL_FILES) == sorted(files)  # and no entry names a file that is gone
    for source, (step, launcher) in launch.KERNEL_FILES.items():
        assert step.source == source and callable(launcher), source


def test_every_step_names_an_entry_point_of_its_file():
    steps = [step for step, _ in launch.KERNEL_FILES.values()] + list(launch.STEPS.values())
    for step in steps:
        defined = GLOBAL.findall(kernels.read_source(step.source).code)
        assert step.kernel in defined, f"{step.name}: no extern \"C\" __global__ {step.kernel} (found {defined})"


def test_every_step_fits_the_shared_memory_of_the_gpu_it_needs():
    steps = [step for step, _ in launch.KERNEL_FILES.values()] + list(launch.STEPS.values())
    steps += [launch.pipeline_step(s) for s in (1, 2, 3, 4)]
    for step in steps:
        assert 0 <= step.smem_bytes <= HOPPER_SMEM_BYTES, (step.name, step.smem_bytes)
        assert step.min_cc >= (9, 0) or not step.tma, f"{step.name} uses TMA: it needs a Hopper GPU"


def test_shared_memory_sizes_follow_the_tile():
    """The ring's size is read from the Step's tile: a wider tile or more slots, a bigger ring."""
    narrow, wide = launch.STEPS["02_6_persistent"], launch.STEPS["02_6_persistent[BN=256]"]
    assert wide.smem_bytes - narrow.smem_bytes == 4 * (256 - 128) * launch.SLICE_K * 2  # 4 slots, bf16
    assert launch.pipeline_step(2).smem_bytes - launch.pipeline_step(1).smem_bytes == \
        (128 + 256) * launch.SLICE_K * 2 + 16  # one slot and its two mbarriers
    for step in (launch.GATHER, launch.SWIGLU, launch.TRANSPOSED_B, launch.DSWIGLU):
        assert step.smem_bytes == launch.STEPS[launch.BEST].smem_bytes  # chapter 03's skeleton, one tile


def test_require_builds_its_message_only_when_it_refuses():
    def expensive():
        raise AssertionError("the message was built for a check that passed")

    launch.require(True, expensive)
    with pytest.raises(TypeError, match="^x is wrong$"):
        launch.require(False, lambda: "x is wrong", TypeError)
    with pytest.raises(ValueError, match="^plain$"):
        launch.require(False, "plain")


def test_refusals_name_the_problem_without_a_gpu():
    x = torch.zeros(4, 64, dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="x must be a torch.Tensor, got list"):
        launch.check_tensor_types({"x": ([1.0], torch.bfloat16, 2)})
    with pytest.raises(ValueError, match=r"x must have 3 dimensions, got shape \(4, 64\)"):
        launch.check_tensor_types({"x": (x, torch.bfloat16, 3)})
    with pytest.raises(ValueError, match="x is on cpu; the kernels read GPU memory"):
        launch.check_on_gpu({"x": x})
    with pytest.raises(ValueError, match=r"offs must be each expert.s end row: non-negative, non-decreasing, the last == the row count 4"):
        launch.check_offsets(torch.tensor([3, 2], dtype=torch.int32), 4)
    with pytest.raises(ValueError, match=r"gather_idx must index rows of x: values 0\.\.9; got 0\.\.10"):
        launch.check_gather_range(torch.tensor([0, 10], dtype=torch.int32), 10)
    with pytest.raises(ValueError, match="02_5_wgmma needs N % 128 == 0 and K % 64 == 0; got N=96, K=64"):
        launch.check_tile_multiples(launch.STEPS["02_5_wgmma"], 96, 64)


def test_no_other_module_of_the_package_launches_a_kernel():
    """One launch module: a kernel of kernels/ is fetched to be launched in launch.py only."""
    package = ROOT / "moe_course"
    elsewhere = [str(p.relative_to(ROOT)) for p in sorted(package.rglob("*.py"))
                 if p.name != "launch.py" and "get_function(" in p.read_text()]
    assert elsewhere == []
