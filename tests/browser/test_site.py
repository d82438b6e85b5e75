"""The rendered course (`make book`) in a real browser. The site is built by `make book` itself
(a chapter with no executed copy in book/executed/ is executed here first, on this machine),
served on loopback, and every page reachable from the front page is opened in headless
Chromium: no console error, no failed request, no broken link or anchor; every chapter, kernel
and record has a page; each chapter page shows every plot its notebook holds and says, first,
where it ran and how to run it. Self-tests feed a small site with known faults to the checks.

`make test-browser` runs it (after tests/browser installs chromium and playwright); `make test`
skips it.
"""

from __future__ import annotations

import os
import subprocess
import time

import pytest

if not os.environ.get("COURSE_BROWSER_TEST"):
    pytest.skip("the browser test runs with `make test-browser` (it installs chromium and playwright)",
                allow_module_level=True)

import nbformat
from benchmark_scripts import load
from site_crawler import crawl, serve

from moe_course import KERNELS_DIR, RESULTS_DIR

book = load("book", folder="tools")
PAGE_NOTEBOOKS = book.DOCS_DIR / "chapters"          # each chapter page's notebook, as the site shows it
RASTER = ("image/png", "image/jpeg", "image/gif")     # outputs a page shows as <img>

# The images in a page's notebook outputs, each with whether it has loaded.
OUTPUT_IMAGES_JS = """() => [...document.querySelectorAll('.jp-OutputArea-output img')].map(
    img => img.complete && img.naturalWidth > 0)"""


@pytest.fixture(scope="session")
def make_book():
    """`make book`, as a reader runs it; its time in seconds."""
    start = time.monotonic()
    done = subprocess.run(["make", "--no-print-directory", "-C", str(book.ROOT), "book"], stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=3600)
    if done.returncode != 0:
        raise RuntimeError(f"`make book` failed ({done.returncode}):\n{(done.stdout + done.stderr)[-4000:]}")
    return time.monotonic() - start


@pytest.fixture(scope="session")
def site_url(make_book):
    with serve(book.SITE_DIR) as url:
        yield url


@pytest.fixture(scope="session")
def crawled(browser, site_url):
    return crawl(browser, site_url)


def test_make_book_builds_the_site(make_book, crawled, summary_line):
    summary_line(f"`make book` built the site in {make_book:.0f} s; {len(crawled.pages)} pages crawled, "
                 f"{len(crawled.external_links)} links to other sites (not followed)")
    assert (book.SITE_DIR / "index.html").exists()


def test_every_page_loads_without_errors(crawled):
    assert crawled.page_problems() == []


def test_no_internal_link_is_broken(crawled):
    assert crawled.broken_links == []


def test_every_chapter_kernel_and_record_is_reachable(crawled, site_url):
    wanted = ([f"chapters/{p.stem}.html" for p in book.chapters()]
              + [f"kernels/{p.name}.html" for p in KERNELS_DIR.iterdir() if p.suffix in (".cu", ".cuh")]
              + [f"records/{p.stem}.html" for p in RESULTS_DIR.glob("*.json")])
    missing = [page for page in wanted if crawled.pages.get(site_url + page, None) is None
               or crawled.pages[site_url + page].status != 200]
    assert missing == []


def raster_outputs(notebook) -> int:
    return sum(1 for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs
               if any(kind in output.get("data", {}) for kind in RASTER))


def test_chapter_pages_show_their_plots_and_say_where_they_ran(browser, site_url, out_dir, summary_line):
    notebooks = sorted(PAGE_NOTEBOOKS.glob("*.ipynb"))
    assert [p.name for p in notebooks] == [c.name for c in book.chapters()]  # every chapter has its page
    page, problems, shown = browser.new_page(viewport={"width": 1300, "height": 900}), [], []
    try:
        for path in notebooks:
            expected = raster_outputs(nbformat.read(path, as_version=4))
            page.goto(f"{site_url}chapters/{path.stem}.html", wait_until="load")
            page.wait_for_function("() => [...document.images].every(img => img.complete)", timeout=30_000)
            loaded = page.evaluate(OUTPUT_IMAGES_JS)
            first = page.locator(".jp-MarkdownOutput").first.inner_text()
            label = next((label for label in (book.EXECUTED_ON_GPU, book.EXECUTED_ON_CPU, book.NOT_EXECUTED)
                          if first.startswith(label)), None)
            if label is None:
                problems.append(f"{path.stem}: its first cell does not say where it ran: {first[:120]!r}")
            elif label != book.NOT_EXECUTED and expected == 0:
                problems.append(f"{path.stem}: executed, yet its notebook has no plot")
            if "make lab" not in first:
                problems.append(f"{path.stem}: its first cell does not say how to run it (make lab)")
            if len(loaded) != expected or not all(loaded):
                problems.append(f"{path.stem}: {sum(loaded)} of {len(loaded)} images loaded, {expected} expected")
            shown.append(f"{path.stem[:2]} {sum(loaded)}")
            page.screenshot(path=str(out_dir / f"book_{path.stem}.png"))
    finally:
        page.close()
    summary_line("book pages, plots shown: " + ", ".join(shown))
    assert problems == []


# --------------------------------------------------- self-tests: each failure is caught

PICTURE = "data:image/svg+xml;utf8,<svg xmlns='http://www.w3.org/2000/svg' width='4' height='4'/>"

FAULTY_SITE = {
    "index.html": '<link rel="icon" href="data:,"><h1 id="top">Start</h1><a href="good.html">good</a> <a href="missing.html">gone</a> '
                  '<a href="good.html#there">anchor</a> <a href="good.html#nowhere">no anchor</a> '
                  '<a href="data.json">a file</a> <a href="https://example.org/">elsewhere</a> <a href="#top">up</a>',
    "good.html": '<h2 id="there">There</h2><img src="absent.png">'
                 '<script>console.error("boom")</script><script>throw new Error("uncaught here")</script>',
    "data.json": "{}",
    "plots.html": f'<div class="jp-OutputArea-output"><img src="{PICTURE}"></div>'
                  '<div class="jp-OutputArea-output"><img src="nothing.png"></div>',
}


def test_the_checks_catch_a_faulty_site(browser, tmp_path):
    for name, text in FAULTY_SITE.items():
        (tmp_path / name).write_text(text)
    with serve(tmp_path) as url:
        result = crawl(browser, url)
        page = browser.new_page()
        page.goto(url + "plots.html", wait_until="load")
        page.wait_for_function("() => [...document.images].every(img => img.complete)")
        assert page.evaluate(OUTPUT_IMAGES_JS) == [True, False]  # the check's count: one of two loaded
        page.close()
    assert set(result.pages) == {url, url + "good.html", url + "missing.html"}  # the external link: not followed
    assert result.external_links == {"https://example.org/"}
    assert result.broken_links == [f"{url} links to {url}good.html#nowhere: no element with id 'nowhere' there",
                                   f"{url} links to {url}missing.html: 404"]
    good = "\n".join(result.pages[url + "good.html"].problems)
    for caught in ("404 for " + url + "absent.png", "console error: boom", "uncaught exception: uncaught here"):
        assert caught in good
    assert result.pages[url].problems == []
