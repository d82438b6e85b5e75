"""What notebooks show of a kernel (kernels.excerpt) is the file's text, read at run time, and
an edit planted in a copy of a kernel (kernels.edited) touches exactly what it names."""

import pytest

from moe_course import KERNELS_DIR, kernels


def test_excerpt_is_the_files_lines_numbered():
    text = kernels.excerpt("02_2_naive_grouped", "extern \"C\" __global__", "Y[(size_t)row")
    lines = (KERNELS_DIR / "02_2_naive_grouped.cu").read_text().splitlines()
    head, *body = text.splitlines()
    first = next(i for i, line in enumerate(lines) if 'extern "C" __global__' in line)
    last = next(i for i, line in enumerate(lines) if "Y[(size_t)row" in line)
    assert head == f"kernels/02_2_naive_grouped.cu, lines {first + 1}-{last}:"
    assert body == [f"{i + 1:4d}  {lines[i]}" for i in range(first, last)]


def test_excerpt_to_the_end_and_missing_markers():
    assert kernels.excerpt("02_6_persistent", "for (int t = blockIdx.x").rstrip().endswith("}")
    with pytest.raises(ValueError, match="02_3_smem_tiled.cu has no line containing 'no such text'"):
        kernels.excerpt("02_3_smem_tiled", "no such text")
    with pytest.raises(ValueError, match="no line containing 'no such end' after line"):
        kernels.excerpt("02_3_smem_tiled", "__syncthreads", "no such end")


def test_edited_replaces_once_and_leaves_the_file_alone():
    before = (KERNELS_DIR / "02_3_smem_tiled.cu").read_text()
    src = kernels.edited("02_3_smem_tiled", "__syncthreads();  // before the next slice", ";  // removed")
    assert src.name == "02_3_smem_tiled.cu"
    assert src.code == before.replace("__syncthreads();  // before the next slice", ";  // removed")
    assert src.code.count("__syncthreads()") == before.count("__syncthreads()") - 1
    assert (KERNELS_DIR / "02_3_smem_tiled.cu").read_text() == before
    with pytest.raises(ValueError, match=r"contains '__syncthreads\(\);' 2 times, not once"):
        kernels.edited("02_3_smem_tiled", "__syncthreads();", "")
    with pytest.raises(ValueError, match="0 times"):
        kernels.edited("02_3_smem_tiled", "not in the kernel", "")
