#!/usr/bin/env python3
"""``make book``: the course as a static site, readable without installing anything.

    python tools/book.py execute [CHAPTER ...] [--force] [--out DIR]
        Run the chapters (``notebooks/NN_*.ipynb``, or those named: ``00``, ``03_io``) with
        nbclient and write executed copies to ``book/executed/`` (committed), each stamped with
        where it ran (GPU, date, versions) in its metadata and in a first markdown cell. Meant
        for the Hopper GPU machine; on any other it refuses to replace the committed copies
        (``--force`` to do it anyway, ``--out DIR`` to write elsewhere).
    python tools/book.py build [--no-execute]
        Write the site's pages into ``book/build/docs/`` and build ``book/site/`` with mkdocs
        (configuration: ``book/mkdocs.yml``): every chapter with its outputs, every kernel's
        source, every recorded measurement as tables, and a front page.

A chapter's page shows its committed executed copy. Without one, ``build`` executes the chapter
on this machine into ``book/build/executed-here/`` (ignored by git; reused while the chapter is
unchanged), and the page says where it ran (a CPU, mostly); with ``--no-execute`` nothing is run
and such a page shows the chapter's cells without outputs, saying so. A copy executed before its
chapter last changed says that too. Every page says first how to run the chapter (``make lab``).

mkdocs-jupyter turns the notebooks into pages (nbconvert); it never executes them. Controls
(ipywidgets) cannot move on a static page: each is shown as a line naming its controls and
their values, followed by the output it drew at those values.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import html
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import nbformat

sys.path.insert(0, str(Path(__file__).resolve().parent))  # make_exercises.py, the sibling script
from make_exercises import fingerprint  # a notebook's cells' text: what "the chapter changed" means

from moe_course import KERNELS_DIR, RESULTS_DIR, ROOT, records
from moe_course.checks import argument_type, run_command
from moe_course.records import Record

CHAPTERS_DIR = ROOT / "notebooks"
BOOK_DIR = ROOT / "book"
EXECUTED_DIR = BOOK_DIR / "executed"       # committed: the copies executed on the GPU machine
BUILD_DIR = BOOK_DIR / "build"             # ignored: everything `build` makes on the way
HERE_EXECUTED_DIR = BUILD_DIR / "executed-here"  # ignored: chapters executed by `build`
FAILED_DIR = BUILD_DIR / "failed"          # ignored: a chapter that failed, executed up to the failure
FAILURE_LINES = 12                         # of a failing cell's traceback, printed
DOCS_DIR = BUILD_DIR / "docs"
SITE_DIR = BOOK_DIR / "site"               # ignored: the site itself
MKDOCS_CONFIG = BOOK_DIR / "mkdocs.yml"

#: Where an executed copy records where it ran (notebook metadata), and marks its first cell.
META_KEY = "moe_course_execution"
CELL_TIMEOUT_S = 900                        # as `make test` runs the notebooks (nbval)
CHAPTER_NAME = re.compile(r"^\d\d_[a-z0-9_]+\.ipynb$")  # not make update's NAME.course-<commit>.ipynb
HOPPER = "9.0"

# The three things a chapter page can be; each page says which, in its first cell.
EXECUTED_ON_GPU, EXECUTED_ON_CPU, NOT_EXECUTED = "Executed on a GPU", "Executed on a CPU", "Not executed"


def shown(path: Path) -> str:
    """A path as messages show it: from the course's folder when it is inside it."""
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def chapters() -> list[Path]:
    return sorted(p for p in CHAPTERS_DIR.glob("*.ipynb") if CHAPTER_NAME.match(p.name))


def select(names: list[str]) -> list[Path]:
    """The chapters named (``00``, ``03_io``, ``notebooks/01_moe_basics.ipynb``), all if none."""
    if not names:
        return chapters()
    picked = []
    for name in names:
        picked += [p for p in chapters_named(name) if p not in picked]
    return picked


def chapter_name(name: str) -> str:
    """A name that picks at least one chapter (argparse checks each before anything runs)."""
    chapters_named(name)
    return name


def chapters_named(name: str) -> list[Path]:
    """The chapters whose name starts with ``name``'s (a ValueError naming them all if none does)."""
    found = [p for p in chapters() if p.stem.startswith(Path(name).stem)]
    if not found:
        raise ValueError(f"no chapter {name!r}: the chapters are {', '.join(p.stem for p in chapters())}")
    return found


def chapter_title(notebook) -> str:
    """The chapter's first level-1 heading, as its page and the navigation show it."""
    for cell in notebook.cells:
        if cell.cell_type == "markdown":
            for line in cell.source.splitlines():
                if line.startswith("# "):
                    return line[2:].strip()
    raise ValueError("the notebook has no level-1 heading ('# Title') for its page's title")


# ------------------------------------------------------------------------------ executing

def refusal(env: dict, out_dir: Path, force: bool) -> str | None:
    """Why the committed copies must not be replaced by ones executed here; ``None`` if they may."""
    if force or out_dir.resolve() != EXECUTED_DIR.resolve():
        return None
    where = ("this machine has no usable GPU" if not env.get("gpu")
             else f"this machine's GPU, {env['gpu']} (compute capability {env.get('compute_capability')}), "
                  "is not a Hopper GPU")
    if env.get("gpu") and env.get("compute_capability") == HOPPER:
        return None
    return (f"refusing to write {shown(out_dir)}/: {where}, and the committed copies are the course "
            "executed on a Hopper GPU (H100, H200). Run this on the GPU machine; or --out DIR to execute into "
            "another folder; or --force to replace them anyway (each page then says where it ran).")


def run_notebook(source: Path, cell_timeout: int = CELL_TIMEOUT_S):
    """Execute a notebook in its own folder with this Python's kernel (as nbval and JupyterLab
    run it); returns the executed notebook. A failing cell raises nbclient's CellExecutionError."""
    try:
        import ipykernel.kernelspec
        import nbclient
        from jupyter_client.kernelspec import KernelSpecManager
        from jupyter_client.manager import KernelManager
        from traitlets import default
    except ImportError as exc:
        raise SystemExit(f"executing the chapters needs nbclient and ipykernel ({exc}): "
                         f"{sys.executable} -m pip install -r requirements/book.txt") from exc

    class ThisPython(KernelSpecManager):
        """The kernel of the Python running this script, whatever kernels Jupyter knows of."""

        def get_kernel_spec(self, kernel_name):
            return self.kernel_spec_class(resource_dir=ipykernel.kernelspec.RESOURCES,
                                          **ipykernel.kernelspec.get_kernel_dict())

    class ThisPythonKernel(KernelManager):
        @default("kernel_spec_manager")
        def _kernel_spec_manager_default(self):
            return ThisPython(data_dir=self.data_dir)

    notebook = nbformat.read(source, as_version=4)
    # The plots go into the copy whatever MPLBACKEND says here: the kernel inherits this process's
    # environment, and with MPLBACKEND=agg (as scripts on the GPU machine set it) plt.show() draws
    # nothing (session 9's first copies had no plot at all).
    saved = os.environ.get("MPLBACKEND")
    os.environ["MPLBACKEND"] = "module://matplotlib_inline.backend_inline"
    try:
        # nbclient makes the kernel manager, so it also shuts the kernel down, whatever happens.
        nbclient.NotebookClient(notebook, kernel_manager_class=ThisPythonKernel, timeout=cell_timeout,
                                resources={"metadata": {"path": str(source.parent)}}).execute()
    except Exception as exc:
        exc.partial_notebook = notebook  # the cells' outputs up to the failure: what to read next
        raise
    finally:
        if saved is None:
            os.environ.pop("MPLBACKEND", None)
        else:
            os.environ["MPLBACKEND"] = saved
    return notebook


def environment() -> dict:
    """Where this runs: the GPU, date and versions (as every benchmark record says), the course's
    commit and the notebook runner's versions."""
    from importlib.metadata import PackageNotFoundError, version

    from moe_course.records import environment as record_environment

    env = record_environment()
    for package in ("nbclient", "ipykernel"):
        try:
            env[package] = version(package)
        except PackageNotFoundError:
            env[package] = None
    env["course_commit"] = course_commit()
    return env


def course_commit() -> str | None:
    try:
        head = subprocess.run(["git", "rev-parse", "--short=10", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, check=True).stdout.strip()
        changed = subprocess.run(["git", "status", "--porcelain", "--", "notebooks", "kernels", "moe_course"],
                                 cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None  # a copy of the course that is not a git clone
    return f"{head} with uncommitted changes" if changed else head


def stamp(notebook, source: Path, seconds: float, env: dict) -> None:
    """Record where and when ``notebook`` ran: in its metadata, and in a first markdown cell."""
    meta = {**env, "seconds": round(seconds, 1),
            "executed_at": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "source": source.relative_to(ROOT).as_posix(),
            "source_fingerprint": fingerprint(source.read_text())}
    notebook.metadata[META_KEY] = meta
    cell = nbformat.v4.new_markdown_cell(provenance(meta), metadata={META_KEY: "provenance"})
    notebook.cells.insert(0, cell)


def execute(names: list[str], out_dir: Path = EXECUTED_DIR, *, force: bool = False, env: dict | None = None,
            run=run_notebook) -> int:
    """Execute the chapters into ``out_dir``, saying per chapter how long it took. A chapter whose
    cells fail is not written (its previous copy stays). 0: all written; 1: some failed; 2: refused."""
    env = environment() if env is None else env
    why = refusal(env, out_dir, force)
    if why:
        print(why, file=sys.stderr)
        return 2
    sources = select(names)
    where = env.get("gpu") or "a CPU (no GPU)"
    print(f"executing {len(sources)} chapter(s) on {where} into {shown(out_dir)}/")
    failed, start_all = [], time.monotonic()
    for source in sources:
        print(f"  {source.name}: running", flush=True)
        start = time.monotonic()
        try:
            notebook = run(source)
        except Exception as exc:  # a failing cell, a time-out, a dead kernel: the others still run
            seconds = time.monotonic() - start
            text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip()  # the traceback's colours
            lines = text.splitlines()
            print(f"  {source.name}: FAILED after {seconds:.1f} s: {lines[-1] if lines else type(exc).__name__}")
            for line in lines[-FAILURE_LINES - 1:-1]:  # the end of the traceback: where it failed
                print(f"      {line}")
            partial = getattr(exc, "partial_notebook", None)
            if partial is not None:
                FAILED_DIR.mkdir(parents=True, exist_ok=True)
                nbformat.write(partial, FAILED_DIR / source.name)
                print(f"      its outputs up to the failure: {shown(FAILED_DIR / source.name)}")
            failed.append(source.name)
            continue
        seconds = time.monotonic() - start
        stamp(notebook, source, seconds, env)
        out_dir.mkdir(parents=True, exist_ok=True)
        target = out_dir / source.name
        partial = target.with_suffix(".partial")
        nbformat.write(notebook, partial)
        partial.replace(target)  # a reader never sees half a notebook
        print(f"  {source.name}: {seconds:.1f} s, written to {shown(target)}")
    total = time.monotonic() - start_all
    print(f"{len(sources) - len(failed)} of {len(sources)} written in {total:.1f} s"
          + (f"; failed, copies left as they were: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


# ---------------------------------------------------------------------- what each page says

VERSIONS = (("cuda_driver", "CUDA driver"), ("cuda_runtime", "CUDA runtime"), ("nvrtc", "NVRTC"),
            ("cupy", "CuPy"), ("torch", "torch"), ("python", "Python"))


def versions_line(env: dict) -> str:
    return ", ".join(f"{label} {env[key]}" for key, label in VERSIONS if env.get(key))


def provenance(meta: dict, current_fingerprint: str | None = None) -> str:
    """The markdown that says where an executed copy ran (and, given the chapter's current
    fingerprint, whether the chapter has changed since)."""
    if meta.get("gpu"):
        details = ", ".join(v for v in (f"compute capability {meta.get('compute_capability')}",
                                        meta.get("sm_count") and f"{meta['sm_count']} SMs") if v)
        head = f"**{EXECUTED_ON_GPU}: {meta['gpu']}** ({details})"
        what = ("The outputs below are that run's: every kernel ran and was timed there."
                if meta.get("compute_capability") == HOPPER else
                "The outputs below are that run's: the kernels this GPU's architecture has ran and were timed "
                "there; each other step says in one line why it was skipped.")
    else:
        head = f"**{EXECUTED_ON_CPU}** (no GPU)"
        what = ("The torch-level cells ran on the CPU; each GPU step says in one line that it was skipped, and "
                "the benchmark charts are drawn from results recorded on a GPU, each labelled with that GPU, "
                "its date and versions.")
    when = f"on {meta.get('executed_at') or meta.get('date', 'an unknown date')}"
    took = f", in {meta['seconds']:.0f} s" if meta.get("seconds") is not None else ""
    commit = f"; course commit `{meta['course_commit']}`" if meta.get("course_commit") else ""
    text = f"> {head} {when}{took}: {versions_line(meta)}{commit}.\n>\n> {what}"
    if current_fingerprint and meta.get("source_fingerprint") not in (None, current_fingerprint):
        text += ("\n>\n> **This copy is older than the chapter**: the notebook's cells have changed since it "
                 "ran, so some outputs may not match the code above them.")
    return text


NOT_EXECUTED_TEXT = (f"> **{NOT_EXECUTED}**: this page shows the chapter's cells without their outputs "
                     "(there is no executed copy of it yet). Run it to see them:")


def run_it_yourself(source: Path) -> str:
    notebook = source.relative_to(ROOT).as_posix()
    return (f"**Run it yourself**: in a clone of the course, `make lab` (it makes the environment on its "
            f"first run), then open `{notebook}` in JupyterLab and run all cells. Any machine runs it: "
            "without an NVIDIA GPU each GPU step says in one line that it is skipped; on a Hopper GPU "
            "(H100, H200) every kernel runs and is timed. The course's README says what each kind of "
            "machine does.")


@dataclass
class Chapter:
    source: Path
    notebook: object      # what the page shows: an executed copy, or the source itself
    state: str            # EXECUTED_ON_GPU, EXECUTED_ON_CPU or NOT_EXECUTED

    @property
    def title(self) -> str:
        return chapter_title(self.notebook)

    @property
    def meta(self) -> dict:
        return self.notebook.metadata.get(META_KEY, {})

    def outputs_from(self) -> str:
        """One cell of the front page's table: where this page's outputs come from."""
        if self.state == NOT_EXECUTED:
            return "not executed: cells only"
        where = self.meta.get("gpu") or "a CPU (no GPU)"
        return f"{where}, {self.meta.get('date', '?')}"


def page_notebook(chapter: Chapter, kernel_pages: list[str]) -> object:
    """The notebook as its page shows it: a first cell saying where it ran (or that it did not)
    and how to run it, then the chapter; controls replaced by what they drew."""
    nb = copy.deepcopy(chapter.notebook)
    nb.cells = [c for c in nb.cells if c.metadata.get(META_KEY) != "provenance"]
    if chapter.state == NOT_EXECUTED:
        head = NOT_EXECUTED_TEXT
    else:
        head = provenance(chapter.meta, fingerprint(chapter.source.read_text()))
    parts = [head, run_it_yourself(chapter.source)]
    if kernel_pages:
        parts.append("Kernels of this chapter: " + ", ".join(
            f"[`{name}`](../kernels/{name}.html)" for name in kernel_pages))  # pages are NAME.html (mkdocs.yml)
    nb.cells.insert(0, nbformat.v4.new_markdown_cell("\n\n".join(parts), metadata={META_KEY: "page"}))
    inline_widgets(nb)
    return nb


WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
WIDGET_STATE = "application/vnd.jupyter.widget-state+json"


def inline_widgets(nb) -> None:
    """Replace each ipywidgets output by a line naming its controls and their values, followed
    by what its output areas held (the plot drawn at those values), and drop the saved widget
    state: a static page cannot run the widgets' JavaScript (which would come from a CDN)."""
    state = nb.metadata.pop("widgets", {}).get(WIDGET_STATE, {}).get("state", {})
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        outputs = []
        for output in cell.outputs:
            view = output.get("data", {}).get(WIDGET_VIEW)
            if view is None:
                outputs.append(output)
                continue
            controls, captured = widget_contents(view.get("model_id"), state)
            named = "; ".join(f"{label} = {value}" for label, value in controls) or "its controls"
            note = (f"<p><em>Interactive in JupyterLab (<code>make lab</code>): {html.escape(named)}. "
                    f"{'Drawn here at these values.' if captured else 'Not drawn here: run the notebook.'}"
                    "</em></p>")
            outputs.append(nbformat.v4.new_output("display_data", data={"text/html": note}))
            outputs += [nbformat.from_dict(o) for o in captured]
        cell.outputs = outputs


def widget_contents(model_id: str | None, state: dict) -> tuple[list[tuple[str, str]], list[dict]]:
    """The controls (description, value) and the captured outputs under a widget, depth first."""
    controls, captured, seen = [], [], set()

    def visit(mid):
        if mid in seen or mid not in state:
            return
        seen.add(mid)
        model = state[mid].get("state", {})
        if "description" in model and ("value" in model or "index" in model):
            labels = model.get("_options_labels")
            value = labels[model["index"]] if labels and isinstance(model.get("index"), int) else model.get("value")
            controls.append((model.get("description") or mid, str(value)))
        captured.extend(model.get("outputs", []))
        for child in model.get("children", []):
            visit(child.removeprefix("IPY_MODEL_"))

    visit(model_id)
    return controls, captured


# ----------------------------------------------------------------------------- the kernels

@dataclass
class Kernel:
    path: Path

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def text(self) -> str:
        return self.path.read_text()

    def summary(self) -> str:
        """The header comment's first paragraph, less the file's own name."""
        lines = []
        for line in self.text.splitlines():
            if not line.startswith("//") or not line[2:].strip():
                break
            lines.append(line[2:].strip())
        return re.sub(rf"^{re.escape(self.name)}:\s*", "", " ".join(lines))

    def includes(self) -> list[str]:
        """The course's own files this one includes (not the CUDA headers)."""
        return re.findall(r'^\s*#include\s+"([^"]+)"', self.text, flags=re.M)

    def chapter_number(self) -> str | None:
        match = re.match(r"(\d\d)_", self.name)
        return match[1] if match else None


def kernels() -> list[Kernel]:
    return [Kernel(p) for p in sorted(KERNELS_DIR.iterdir()) if p.suffix in (".cu", ".cuh")]


def fence_for(text: str) -> str:
    """A code fence longer than any run of backticks in ``text``."""
    longest = max((len(m) for m in re.findall(r"`+", text)), default=0)
    return "`" * max(3, longest + 1)


def kernel_page(kernel: Kernel, all_kernels: list[Kernel], chapter_links: dict[str, str]) -> str:
    includers = [k.name for k in all_kernels if kernel.name in k.includes()]
    chapter = chapter_links.get(kernel.chapter_number() or "")
    facts = [f"chapter {chapter}" if chapter else "shared by several steps",
             f"{len(kernel.text.splitlines())} lines"]
    if kernel.includes():
        facts.append("includes " + ", ".join(f"[`{n}`]({n}.md)" for n in kernel.includes()))
    if includers:
        facts.append("included by " + ", ".join(f"[`{n}`]({n}.md)" for n in includers))
    fence = fence_for(kernel.text)
    return (f"# `{kernel.name}`\n\n{kernel.summary()}\n\n{' · '.join(facts)} · "
            f"compiled at run time by CuPy `RawModule` (and, without a GPU, for `sm_90a` by NVRTC)\n\n"
            f'{fence}cuda linenums="1"\n{kernel.text.rstrip()}\n{fence}\n')


def kernels_index(all_kernels: list[Kernel], chapter_links: dict[str, str]) -> str:
    rows = [f"| [`{k.name}`]({k.name}.md) | {chapter_links.get(k.chapter_number() or '', 'shared')} | "
            f"{len(k.text.splitlines())} | {md_cell(k.summary())} |" for k in all_kernels]
    return ("# Kernels\n\nThe CUDA C sources in `kernels/`, one kernel per file, numbered in teaching order; "
            "the `.cuh` headers hold what several steps share. Every one is compiled at run time (CuPy "
            "`RawModule`), for `sm_90a` even without a GPU (NVRTC), so its register and shared-memory use "
            "can be read anywhere. [Kernel notes](NOTES.md): what each version was expected to do and what "
            "it did.\n\n| file | chapter | lines | what it is |\n| --- | --- | --- | --- |\n"
            + "\n".join(rows) + "\n")


def md_cell(text: str) -> str:
    """Text for a markdown table cell: no pipe or newline can break the row."""
    return html.escape(text).replace("|", "&#124;").replace("\n", " ")


# -------------------------------------------------------------------------- the records

SHORT_LIST = 8        # lists of numbers longer than this are summarised in a cell
MAX_HEADING = 6


def fmt(value) -> str:
    """One value as a table shows it (plain text; escaped by the caller)."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (int, str)):
        return str(value)
    if isinstance(value, list):
        if all(is_scalar(v) for v in value):
            if len(value) <= SHORT_LIST:
                return "[" + ", ".join(fmt(v) for v in value) + "]"
            numbers = [v for v in value if isinstance(v, (int, float)) and not isinstance(v, bool)]
            span = f", min {fmt(min(numbers))}, max {fmt(max(numbers))}" if len(numbers) == len(value) else ""
            return f"{len(value)} values: {fmt(value[0])} … {fmt(value[-1])}{span}"
        return f"{len(value)} entries"
    if isinstance(value, dict):
        return "; ".join(f"{k}: {fmt(v)}" for k, v in value.items())
    return str(value)


def is_scalar(value) -> bool:
    return value is None or isinstance(value, (str, int, float, bool))


def fits_a_cell(value) -> bool:
    """A scalar, a list of scalars, or a dict of scalars: shown in one table cell."""
    if isinstance(value, list):
        return all(is_scalar(v) for v in value)
    if isinstance(value, dict):
        return all(is_scalar(v) for v in value.values())
    return is_scalar(value)


def html_table(header: list[str], rows: list[list]) -> str:
    """An HTML table (raw HTML in the markdown page: values are escaped, never read as markdown)."""
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "\n".join("<tr>" + "".join(f"<td>{html.escape(fmt(v))}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}\n</tbody>\n</table>"


def data_markdown(value, level: int = 2) -> str:
    """A record's data as headings and tables: a list of dicts is one table (a row each); a dict
    of dicts that each fit in cells is one table (a row per key); scalars go in a two-column
    table; anything deeper gets a heading and the same treatment one level down."""
    if isinstance(value, list):
        if all(isinstance(v, dict) for v in value) and value:
            columns = list(dict.fromkeys(k for row in value for k in row))
            return html_table(columns, [[row.get(c) for c in columns] for row in value])
        return html.escape(fmt(value))
    if not isinstance(value, dict):
        return html.escape(fmt(value))
    if len(value) >= 2 and all(isinstance(v, dict) and v and all(fits_a_cell(x) for x in v.values())
                               for v in value.values()):
        columns = list(dict.fromkeys(k for v in value.values() for k in v))
        return html_table([""] + columns, [[key] + [v.get(c) for c in columns] for key, v in value.items()])
    flat = {k: v for k, v in value.items() if fits_a_cell(v)}
    parts = [html_table(["", "value"], [[k, v] for k, v in flat.items()])] if flat else []
    for key, nested in value.items():
        if key in flat:
            continue
        title = f"{'#' * level} {md_cell(str(key))}" if level <= MAX_HEADING else f"**{md_cell(str(key))}**"
        parts += [title, data_markdown(nested, level + 1)]
    return "\n\n".join(parts)


ENVIRONMENT_ROWS = (("gpu", "GPU"), ("compute_capability", "compute capability"), ("sm_count", "SMs"),
                    ("cuda_driver", "CUDA driver"), ("cuda_runtime", "CUDA runtime"), ("nvrtc", "NVRTC"),
                    ("cupy", "CuPy"), ("torch", "torch"), ("python", "Python"), ("date", "date"))


def record_page(record: Record, charts: list[str]) -> str:
    env = record.environment
    rows = "\n".join(f"| {label} | {md_cell(fmt(env.get(key)) if key != 'gpu' else record.gpu)} |"
                     for key, label in ENVIRONMENT_ROWS)
    images = "".join(f"\n\n![{name}]({name})" for name in charts)
    return (f"# {record.kind} · {record.gpu}\n\n"
            f"Recorded on {md_cell(record.label())}, in `{shown(record.path)}`."
            f"\n\n| measured on | |\n| --- | --- |\n{rows}{images}\n\n## Data\n\n{data_markdown(record.data, 3)}\n")


def records_index(records: list[Record]) -> str:
    rows = [f"| [{r.kind}]({r.path.stem}.md) | {md_cell(r.gpu)} | {md_cell(fmt(r.environment.get('date')))} | "
            f"{md_cell(versions_line(r.environment))} |" for r in records]
    return ("# Recorded measurements\n\nEvery measurement the course quotes, as recorded in "
            "`benchmarks/results/` by the benchmark scripts (one file per kind and GPU: measuring again "
            "replaces it, git keeps the history). On a machine without a GPU the chapters draw their "
            "charts from these.\n\n| record | GPU | date | versions |\n| --- | --- | --- | --- |\n"
            + "\n".join(rows) + "\n")


# ----------------------------------------------------------------------------- the site

def executed_here_is_current(source: Path) -> bool:
    here = HERE_EXECUTED_DIR / source.name
    return here.exists() and (nbformat.read(here, as_version=4).metadata.get(META_KEY, {})
                              .get("source_fingerprint") == fingerprint(source.read_text()))


def chapter_pages(execute_missing: bool) -> list[Chapter]:
    """Each chapter as its page shows it: the committed executed copy; else one executed here of
    the chapter as it is now (run now if there is none and ``execute_missing``); else its cells."""
    sources = chapters()
    if execute_missing:
        to_run = [s.stem for s in sources if not (EXECUTED_DIR / s.name).exists() and not executed_here_is_current(s)]
        if to_run and execute(to_run, HERE_EXECUTED_DIR) != 0:
            raise SystemExit("a chapter failed to run here (above); `python tools/book.py build --no-execute` "
                             "builds the site without running the chapters that have no executed copy")
    pages = []
    for source in sources:
        committed, here = EXECUTED_DIR / source.name, HERE_EXECUTED_DIR / source.name
        copy = committed if committed.exists() else here if executed_here_is_current(source) else None
        if copy is None:
            pages.append(Chapter(source, nbformat.read(source, as_version=4), NOT_EXECUTED))
            continue
        nb = nbformat.read(copy, as_version=4)
        pages.append(Chapter(source, nb, EXECUTED_ON_GPU if nb.metadata.get(META_KEY, {}).get("gpu")
                             else EXECUTED_ON_CPU))
    return pages


def front_page(pages: list[Chapter]) -> str:
    rows = "\n".join(f"| [{md_cell(c.title)}](chapters/{c.source.name}) | {md_cell(c.outputs_from())} |"
                     for c in pages)
    return ("# Tile-Aware MoE Accelerators\n\n"
            "A course on making mixture-of-experts layers fast on GPUs: from what an MoE layer is to "
            "hand-written Hopper kernels (compiled at run time with CuPy `RawModule`), each checked against "
            "torch and measured. These pages are the chapters with their outputs, the kernels' sources and "
            "the recorded measurements; the course itself is a set of JupyterLab notebooks.\n\n"
            "## Chapters\n\nEach page says, first, where its outputs were made: on a Hopper GPU, or on a "
            "CPU (then every GPU step says that it was skipped, and the charts show results recorded on a "
            f"GPU), or not at all.\n\n| chapter | outputs from |\n| --- | --- |\n{rows}\n\n"
            f"## Run it yourself\n\n{run_it_yourself(CHAPTERS_DIR / '00_setup.ipynb')}\n\n"
            "## Also here\n\n- [Kernels](kernels/index.md): every CUDA C source, highlighted, and the notes "
            "on each version's prediction and result.\n- [Recorded measurements](records/index.md): every "
            "benchmark result the chapters quote, with its GPU, date and versions.\n")


def write_docs(docs: Path = DOCS_DIR, execute_missing: bool = True) -> list[Chapter]:
    """Every page's source, in ``docs`` (emptied first). Returns the chapters as their pages show them."""
    if docs.exists():
        shutil.rmtree(docs)
    for folder in ("chapters", "kernels", "records"):
        (docs / folder).mkdir(parents=True)
    pages = chapter_pages(execute_missing)
    chapter_links = {c.source.name[:2]: f"[{md_cell(c.title)}](../chapters/{c.source.name})" for c in pages}

    all_kernels = kernels()
    for chapter in pages:
        own = [k.name for k in all_kernels if k.chapter_number() == chapter.source.name[:2]]
        nbformat.write(page_notebook(chapter, own), docs / "chapters" / chapter.source.name)
    for kernel in all_kernels:
        (docs / "kernels" / f"{kernel.name}.md").write_text(kernel_page(kernel, all_kernels, chapter_links))
    (docs / "kernels" / "index.md").write_text(kernels_index(all_kernels, chapter_links))
    shutil.copy(KERNELS_DIR / "NOTES.md", docs / "kernels" / "NOTES.md")

    recorded = [records.read(p) for p in sorted(RESULTS_DIR.glob("*.json"))]
    for record in recorded:
        charts = [p.name for p in sorted(RESULTS_DIR.glob(f"{record.path.stem}*.png"))]
        for name in charts:
            shutil.copy(RESULTS_DIR / name, docs / "records" / name)
        (docs / "records" / f"{record.path.stem}.md").write_text(record_page(record, charts))
    (docs / "records" / "index.md").write_text(records_index(recorded))
    (docs / "index.md").write_text(front_page(pages))
    return pages


def copy_mathjax(docs: Path) -> None:
    """MathJax into the site, beside book/mathjax.js (which mkdocs.yml gives the chapter pages):
    formulas render with no request outside the site. One self-contained file (SVG output)."""
    try:
        import mathjax  # django-static-mathjax: MathJax's own build, as files
    except ImportError as exc:
        raise SystemExit(f"{exc}: {sys.executable} -m pip install -r requirements/book.txt") from exc
    build = Path(mathjax.__file__).parent / "static" / "mathjax"
    target = docs / "assets" / "mathjax"
    target.mkdir(parents=True, exist_ok=True)
    for source in (build / "es5" / "tex-svg-full.js", build / "LICENSE", BOOK_DIR / "mathjax.js"):
        shutil.copy(source, target / source.name)


def build(execute_missing: bool = True, site: Path = SITE_DIR) -> int:
    start = time.monotonic()
    pages = write_docs(DOCS_DIR, execute_missing)
    copy_mathjax(DOCS_DIR)
    for chapter in pages:
        print(f"  {chapter.source.name}: {chapter.outputs_from()}")
    # mkdocs is pinned below 2.0 (requirements/book.txt): the theme's banner about 2.0 is noise here.
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet",
                           "--config-file", str(MKDOCS_CONFIG), "--site-dir", str(site)], cwd=BOOK_DIR,
                          env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    if done.returncode != 0:
        print(f"mkdocs failed (exit {done.returncode}; its messages are above)", file=sys.stderr)
        return done.returncode
    print(f"the course's site is in {shown(site)}/ "
          f"({time.monotonic() - start:.0f} s). Read it served from this machine:\n"
          f"  {Path(sys.executable).name} -m http.server 8000 --bind 127.0.0.1 --directory {site}\n"
          "then open http://127.0.0.1:8000/ (opened straight from disk, everything but the search works)")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = ap.add_subparsers(dest="command", required=True)
    ex = commands.add_parser("execute", help="run the chapters and write executed copies (on the GPU machine)")
    ex.add_argument("chapters", nargs="*", type=argument_type(chapter_name, "chapter"),
                    help="which (00, 03_io, ...); default: every chapter")
    ex.add_argument("--out", type=Path, default=EXECUTED_DIR, help="where to write them (default: %(default)s)")
    ex.add_argument("--force", action="store_true",
                    help="replace the committed copies even without a Hopper GPU (the pages say where they ran)")
    bd = commands.add_parser("build", help="build the site in book/site/")
    bd.add_argument("--no-execute", action="store_true",
                    help="chapters with no executed copy are shown without outputs, not run here")
    args = ap.parse_args(argv)
    if args.command == "execute":
        return execute(args.chapters, args.out.resolve(), force=args.force)
    return build(execute_missing=not args.no_execute)


if __name__ == "__main__":
    sys.exit(run_command(main))
