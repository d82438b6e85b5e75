"""tools/book.py (`make book`) without a browser, a GPU, mkdocs or nbclient: the refusal to
replace the committed executed copies, what an executed copy records and its page says, the
ipywidgets outputs replaced by what they drew, the kernel and record pages, and the committed
executed copies themselves. The site is built and crawled in tests/browser/test_book.py."""

import json
import os
import re
import shutil
import subprocess

import nbformat
import pytest
from benchmark_scripts import load

from moe_course import KERNELS_DIR, RESULTS_DIR, ROOT, records

book = load("book", folder="tools")
toc = load("toc_from_ids", folder="book")

H200 = {"gpu": "NVIDIA H200", "compute_capability": "9.0", "sm_count": 132, "cuda_driver": "13.0",
        "cuda_runtime": "13.2", "nvrtc": "13.0", "cupy": "14.2.0", "torch": "2.11.0+cu130", "python": "3.12.3",
        "date": "2026-12-01", "nbclient": "0.11.0", "ipykernel": "7.4.0", "course_commit": "abc1234567"}
A100 = {**H200, "gpu": "NVIDIA A100-SXM4-80GB", "compute_capability": "8.0", "sm_count": 108}
NO_GPU = {**H200, "gpu": None, "compute_capability": None, "sm_count": None, "cuda_driver": None,
          "cuda_runtime": None}


def ran(source):
    """What nbclient hands back, without running anything: every code cell with an output."""
    nb = nbformat.read(source, as_version=4)
    for i, cell in enumerate(c for c in nb.cells if c.cell_type == "code"):
        cell.execution_count = i + 1
        cell.outputs = [nbformat.v4.new_output("stream", text=f"ran cell {i}\n")]
    return nb


def must_not_run(source):
    raise AssertionError(f"{source.name} was executed although the copies must not be replaced")


@pytest.fixture
def executed(tmp_path, monkeypatch):
    """book/executed/ moved to a scratch folder (the committed copies are never touched)."""
    folder = tmp_path / "executed"
    monkeypatch.setattr(book, "EXECUTED_DIR", folder)
    monkeypatch.setattr(book, "HERE_EXECUTED_DIR", tmp_path / "executed-here")
    return folder


# ------------------------------------------------------------------------------- execute

@pytest.mark.parametrize("env, says", [(NO_GPU, "this machine has no usable GPU"),
                                       (A100, "NVIDIA A100-SXM4-80GB (compute capability 8.0), is not a Hopper")])
def test_refuses_to_replace_the_committed_copies_off_hopper(executed, capsys, env, says):
    assert book.execute(["00"], executed, env=env, run=must_not_run) == 2
    message = capsys.readouterr().err
    assert says in message and "--force" in message and "--out" in message
    assert not executed.exists()


def test_writes_where_it_is_told_or_when_forced(executed, tmp_path):
    assert book.execute(["00"], tmp_path / "elsewhere", env=NO_GPU, run=ran) == 0
    assert (tmp_path / "elsewhere" / "00_setup.ipynb").exists()
    assert book.execute(["00"], executed, env=NO_GPU, run=ran, force=True) == 0
    copy = nbformat.read(executed / "00_setup.ipynb", as_version=4)
    assert copy.metadata[book.META_KEY]["gpu"] is None
    assert copy.cells[0].source.startswith(f"> **{book.EXECUTED_ON_CPU}** (no GPU)")


def test_a_hopper_copy_records_where_it_ran(executed, capsys):
    assert book.execute(["00", "02"], executed, env=H200, run=ran) == 0
    out = capsys.readouterr().out
    for name in ("00_setup.ipynb", "02_grouped_gemm.ipynb"):
        assert re.search(rf"{name}: \d+\.\d s, written to ", out), out  # the time of each notebook
        copy = nbformat.read(executed / name, as_version=4)
        meta = copy.metadata[book.META_KEY]
        assert {k: meta[k] for k in H200} == H200
        assert meta["source"] == f"notebooks/{name}" and meta["seconds"] >= 0
        assert meta["source_fingerprint"] == book.fingerprint((book.CHAPTERS_DIR / name).read_text())
        first = copy.cells[0]
        assert first.cell_type == "markdown" and first.metadata[book.META_KEY] == "provenance"
        for shown in ("Executed on a GPU: NVIDIA H200", "compute capability 9.0, 132 SMs", "every kernel ran",
                      "torch 2.11.0+cu130",
                      "CuPy 14.2.0", "CUDA driver 13.0", "course commit `abc1234567`", meta["executed_at"]):
            assert shown in first.source
        assert copy.cells[1:] == ran(book.CHAPTERS_DIR / name).cells  # the chapter itself, as it ran


def test_a_failing_chapter_keeps_its_previous_copy(executed, capsys):
    executed.mkdir()
    (executed / "01_moe_basics.ipynb").write_text("the previous copy")

    def fails_on_01(source):
        if source.name.startswith("01"):
            raise RuntimeError("An error occurred while executing cell 7:\nZeroDivisionError: division by zero")
        return ran(source)

    assert book.execute(["00", "01"], executed, env=H200, run=fails_on_01) == 1
    out = capsys.readouterr().out
    assert "01_moe_basics.ipynb: FAILED after" in out and "ZeroDivisionError: division by zero" in out
    assert "1 of 2 written" in out and "copies left as they were: 01_moe_basics.ipynb" in out
    assert (executed / "01_moe_basics.ipynb").read_text() == "the previous copy"
    assert (executed / "00_setup.ipynb").exists()


def test_a_failing_chapter_says_where_and_keeps_its_outputs_so_far(executed, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(book, "FAILED_DIR", tmp_path / "failed")

    def fails_in_a_cell(source):
        notebook = ran(source)
        exc = RuntimeError("An error occurred while executing cell 3:\n" + "\n".join(f"frame {i}" for i in range(30))
                           + "\nAssertionError: the losses rose")
        exc.partial_notebook = notebook
        raise exc

    assert book.execute(["00"], executed, env=H200, run=fails_in_a_cell) == 1
    out = capsys.readouterr().out
    assert "FAILED after" in out and "AssertionError: the losses rose" in out
    assert "frame 29" in out and "frame 0\n" not in out  # the end of the traceback, not all of it
    assert nbformat.read(tmp_path / "failed" / "00_setup.ipynb", as_version=4).cells == \
        ran(book.CHAPTERS_DIR / "00_setup.ipynb").cells
    assert not (executed / "00_setup.ipynb").exists()


def test_chapters_are_named_by_their_start():
    assert [p.name for p in book.select(["03", "notebooks/00_setup.ipynb"])] == ["03_io_overlap.ipynb",
                                                                                 "00_setup.ipynb"]
    chapters = sorted(p.name[:2] for p in (book.ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    assert [p.name[:2] for p in book.select([])] == chapters and chapters[:8] == ["00", "01", "02", "03", "04", "05", "06", "07"]
    with pytest.raises(ValueError, match="no chapter '11'.*00_setup, 01_moe_basics"):
        book.select(["11"])
    assert not book.CHAPTER_NAME.match("01_moe_basics.course-abc1234.ipynb")  # make update's copies


# ------------------------------------------------------------------------------ the pages

def stamped(name="02_grouped_gemm.ipynb", env=H200):
    nb = ran(book.CHAPTERS_DIR / name)
    book.stamp(nb, book.CHAPTERS_DIR / name, 12.3, env)
    return nb


def test_a_page_says_where_it_ran_and_how_to_run_it():
    source = book.CHAPTERS_DIR / "02_grouped_gemm.ipynb"
    page = book.page_notebook(book.Chapter(source, stamped(), book.EXECUTED_ON_GPU), ["02_1_naive_per_expert.cu"])
    first = page.cells[0].source
    assert first.startswith("> **Executed on a GPU: NVIDIA H200**")
    assert "`make lab`" in first and "`notebooks/02_grouped_gemm.ipynb`" in first
    assert "[`02_1_naive_per_expert.cu`](../kernels/02_1_naive_per_expert.cu.html)" in first
    assert "older than the chapter" not in first
    assert sum("Executed on" in c.source for c in page.cells) == 1  # the copy's own first cell was replaced
    assert page.cells[1:] == ran(source).cells

    unexecuted = book.page_notebook(book.Chapter(source, nbformat.read(source, as_version=4), book.NOT_EXECUTED), [])
    assert unexecuted.cells[0].source.startswith(f"> **{book.NOT_EXECUTED}**")
    assert "`make lab`" in unexecuted.cells[0].source and "Kernels of this chapter" not in unexecuted.cells[0].source


def test_a_copy_older_than_its_chapter_says_so():
    meta = stamped().metadata[book.META_KEY]
    assert "older than the chapter" not in book.provenance(meta, meta["source_fingerprint"])
    assert "older than the chapter" in book.provenance(meta, "f" * 64)
    cpu = book.provenance({**meta, **NO_GPU})
    assert cpu.startswith("> **Executed on a CPU** (no GPU)") and "recorded on a GPU" in cpu
    older = book.provenance({**meta, **A100})
    assert older.startswith("> **Executed on a GPU: NVIDIA A100-SXM4-80GB** (compute capability 8.0, 108 SMs)")
    assert "every kernel ran" not in older and "why it was skipped" in older


def widget_notebook(with_state=True):
    """A cell like chapter 01's: sliders in an HBox and an Output (holding the plot) in a VBox."""
    view = {"model_id": "vbox", "version_major": 2, "version_minor": 0}
    output = nbformat.v4.new_output("display_data", data={book.WIDGET_VIEW: view, "text/plain": "VBox(...)"})
    cell = nbformat.v4.new_code_cell("display(widgets.VBox(...))", outputs=[output])
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell("# T"), cell])
    plot = {"output_type": "display_data", "metadata": {}, "data": {"image/png": "iVBORw0KGgo=", "text/plain": "<Figure>"}}
    state = {
        "vbox": {"model_name": "VBoxModel", "state": {"children": ["IPY_MODEL_hbox", "IPY_MODEL_out"]}},
        "hbox": {"model_name": "HBoxModel", "state": {"children": ["IPY_MODEL_e", "IPY_MODEL_skew", "IPY_MODEL_k"]}},
        "e": {"model_name": "IntSliderModel", "state": {"description": "experts E", "value": 16}},
        "skew": {"model_name": "FloatSliderModel", "state": {"description": "router skew", "value": 0.25}},
        "k": {"model_name": "DropdownModel", "state": {"description": "top-k", "index": 1,
                                                       "_options_labels": ["1", "2", "4"]}},
        "out": {"model_name": "OutputModel", "state": {"outputs": [plot]}},
    }
    if with_state:
        nb.metadata["widgets"] = {book.WIDGET_STATE: {"state": state, "version_major": 2, "version_minor": 0}}
    return nb


def test_controls_are_replaced_by_what_they_drew():
    nb = widget_notebook()
    book.inline_widgets(nb)
    note, drawn = nb.cells[1].outputs
    assert "experts E = 16; router skew = 0.25; top-k = 2" in note.data["text/html"]
    assert "make lab" in note.data["text/html"] and "Drawn here at these values" in note.data["text/html"]
    assert drawn.data["image/png"] == "iVBORw0KGgo="
    assert "widgets" not in nb.metadata  # no widget JavaScript (from a CDN) on a static page

    bare = widget_notebook(with_state=False)
    book.inline_widgets(bare)
    (note,) = bare.cells[1].outputs
    assert "Not drawn here: run the notebook" in note.data["text/html"]


def test_the_contents_list_uses_the_ids_the_headings_have():
    page = ('<h1 id="02-grouped-gemm">02 · Grouped GEMM<a class="anchor-link" href="#02-grouped-gemm">¶</a></h1>'
            '<h2 id="why">Why</h2><h3 id="as-an-nnmodule">As an <code>nn.Module</code></h3>'
            '<h2 id="next">Next &amp; last</h2><h4>no id</h4>')
    (root,) = toc.toc_tokens(page)
    assert (root["id"], root["name"]) == ("02-grouped-gemm", "02 · Grouped GEMM")
    assert [c["id"] for c in root["children"]] == ["why", "next"]
    assert root["children"][0]["children"][0] == {"level": 3, "id": "as-an-nnmodule", "name": "As an nn.Module",
                                                  "children": []}
    assert root["children"][1]["name"] == "Next &amp; last"  # escaped again: the title is HTML


# ---------------------------------------------------------------------- kernels and records

def test_every_kernel_has_a_page_with_its_whole_source():
    kernels = book.kernels()
    assert {k.name for k in kernels} == {p.name for p in KERNELS_DIR.iterdir() if p.suffix in (".cu", ".cuh")}
    links = {"02": "[02 · Grouped GEMM](../chapters/02_grouped_gemm.ipynb)"}
    by_name = {k.name: k for k in kernels}
    page = book.kernel_page(by_name["02_3_smem_tiled.cu"], kernels, links)
    assert page.startswith("# `02_3_smem_tiled.cu`\n\nstep 3, shared-memory tiling on CUDA cores.")
    assert "chapter [02 · Grouped GEMM](../chapters/02_grouped_gemm.ipynb)" in page
    assert "includes [`grouped_gemm.cuh`](grouped_gemm.cuh.md)" in page
    assert '```cuda linenums="1"\n' + by_name["02_3_smem_tiled.cu"].text.rstrip() + "\n```" in page
    header = book.kernel_page(by_name["tma.cuh"], kernels, links)
    assert "included by [`03_1_tma.cu`](03_1_tma.cu.md)" in header and "shared by several steps" in header


def test_a_fence_is_longer_than_any_backticks_in_the_source():
    assert book.fence_for("int x; // no backticks") == "```"
    assert book.fence_for("// a comment with ```` four") == "`````"


def test_every_record_renders_with_where_it_was_measured():
    paths = sorted(RESULTS_DIR.glob("*.json"))
    assert len(paths) >= 10
    for path in paths:
        record = records.read(path)
        page = book.record_page(record, [])
        assert page.startswith(f"# {record.kind} · {record.gpu}\n")
        for key in ("date", "torch", "python"):
            assert f"| {book.fmt(record.environment[key])} |" in page, (path.name, key)
        assert "<table>" in page


def test_record_data_become_tables():
    data = {"rows": [{"shape": "7b", "ms": 1.234567, "ok": True}, {"shape": "qwen3", "ms": 2.0, "extra": None}],
            "metric": "stalled_<reason>_per_issue", "curve": list(range(300)),
            "variants": {"1 slot": {"barrier": 0.5, "long": 3}, "4 slots": {"barrier": 0.25, "long": 1}}}
    md = book.data_markdown(data)
    assert "<th>shape</th><th>ms</th><th>ok</th><th>extra</th>" in md  # one table, every column
    assert "<td>7b</td><td>1.235</td><td>yes</td><td>–</td>" in md
    assert "stalled_&lt;reason&gt;_per_issue" in md  # escaped, never read as a tag
    assert "300 values: 0 … 299, min 0, max 299" in md
    assert "<tr><td>4 slots</td><td>0.25</td><td>1</td></tr>" in md  # a dict of dicts: a row each
    assert md.count("<table>") == 3
    assert book.md_cell("a|b <x>\nc") == "a&#124;b &lt;x&gt; c"  # a markdown table's row stays one row


def test_a_file_that_is_not_a_record_is_named(tmp_path):
    path = tmp_path / "ceilings__x.json"
    path.write_text(json.dumps({"kind": "ceilings", "data": {}}))
    with pytest.raises(records.RecordError, match=r"ceilings__x\.json: has no key 'environment' \(keys: kind, data\)"):
        records.read(path)


def test_the_pages_sources_cover_the_course(executed, tmp_path):
    executed.mkdir()
    nbformat.write(stamped("03_io_overlap.ipynb"), executed / "03_io_overlap.ipynb")
    docs = tmp_path / "docs"
    pages = book.write_docs(docs, execute_missing=False)
    states = {c.source.name[:2]: c.state for c in pages}
    assert states == {"00": book.NOT_EXECUTED, "01": book.NOT_EXECUTED, "02": book.NOT_EXECUTED,
                      "03": book.EXECUTED_ON_GPU, "04": book.NOT_EXECUTED, "05": book.NOT_EXECUTED,
                      "06": book.NOT_EXECUTED, "07": book.NOT_EXECUTED, "08": book.NOT_EXECUTED, "09": book.NOT_EXECUTED,
                      "10": book.NOT_EXECUTED}
    index = (docs / "index.md").read_text()
    for chapter in book.chapters():
        page = nbformat.read(docs / "chapters" / chapter.name, as_version=4)
        assert f"](chapters/{chapter.name})" in index
        expected = book.EXECUTED_ON_GPU if chapter.name.startswith("03") else book.NOT_EXECUTED
        assert page.cells[0].source.startswith(f"> **{expected}")
    assert "| NVIDIA H200, 2026-12-01 |" in index
    for kernel in book.kernels():
        assert (docs / "kernels" / f"{kernel.name}.md").exists()
        assert f"[`{kernel.name}`]({kernel.name}.md)" in (docs / "kernels" / "index.md").read_text()
    for record in RESULTS_DIR.glob("*.json"):
        assert (docs / "records" / f"{record.stem}.md").exists()
        assert f"]({record.stem}.md)" in (docs / "records" / "index.md").read_text()
    for chart in RESULTS_DIR.glob("*.png"):
        assert (docs / "records" / chart.name).exists()


# ------------------------------------------------------------- the committed executed copies

def copy_problems(path) -> list[str]:
    """What is wrong with a committed executed copy: not a chapter, no record of where it ran,
    or a first cell that does not say it."""
    problems = []
    if not (book.CHAPTERS_DIR / path.name).exists():
        problems.append(f"{path.name}: no chapter notebooks/{path.name}")
    nb = nbformat.read(path, as_version=4)
    meta = nb.metadata.get(book.META_KEY)
    if not meta:
        return problems + [f"{path.name}: no metadata.{book.META_KEY} (where it ran)"]
    missing = [k for k in ("gpu", "date", "torch", "cupy", "python", "executed_at", "source_fingerprint")
               if k not in meta]
    if missing:
        problems.append(f"{path.name}: where it ran lacks {', '.join(missing)}")
    elif not nb.cells or nb.cells[0].source != book.provenance(meta):
        problems.append(f"{path.name}: its first cell does not say where it ran")
    return problems


def test_the_committed_executed_copies_say_where_they_ran():
    assert [p for path in sorted(book.EXECUTED_DIR.glob("*.ipynb")) for p in copy_problems(path)] == []


def test_a_copy_that_does_not_say_where_it_ran_is_caught(tmp_path):
    good = tmp_path / "02_grouped_gemm.ipynb"
    nbformat.write(stamped(), good)
    assert copy_problems(good) == []
    nb = stamped()
    del nb.cells[0]
    nbformat.write(nb, good)
    assert copy_problems(good) == ["02_grouped_gemm.ipynb: its first cell does not say where it ran"]
    nbformat.write(ran(book.CHAPTERS_DIR / "02_grouped_gemm.ipynb"), good)
    assert copy_problems(good) == [f"02_grouped_gemm.ipynb: no metadata.{book.META_KEY} (where it ran)"]
    stray = tmp_path / "99_extra.ipynb"
    nbformat.write(stamped(), stray)
    assert copy_problems(stray) == ["99_extra.ipynb: no chapter notebooks/99_extra.ipynb"]


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_clean_removes_the_site_but_never_the_executed_copies():
    commands = subprocess.run(["make", "-n", "--no-print-directory", "clean"], cwd=ROOT, capture_output=True,
                              text=True, check=True).stdout
    assert "book/site" in commands and "book/build" in commands
    assert "book/executed" not in commands and "rm -rf book " not in commands


def test_plots_go_into_the_copy_whatever_mplbackend_says(tmp_path, monkeypatch):
    """With MPLBACKEND=agg in the environment (the GPU machine's scripts set it), the first copies
    executed on the H100 had no plot; the kernel now draws inline whatever the environment says."""
    pytest.importorskip("nbclient", reason="`make book`'s requirements (nbclient comes with mkdocs-jupyter)")
    source = tmp_path / "plot.ipynb"
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("import matplotlib.pyplot as plt\nplt.plot([1, 3, 2])\nplt.show()")]
    nbformat.write(nb, source)
    monkeypatch.setenv("MPLBACKEND", "agg")
    executed = book.run_notebook(source)
    outputs = executed.cells[0].outputs
    assert any("image/png" in o.get("data", {}) for o in outputs), outputs
    assert os.environ["MPLBACKEND"] == "agg"  # put back
