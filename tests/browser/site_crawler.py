"""A static site served on loopback and crawled in headless Chromium, for the rendered course's
browser test (tests/browser/test_book.py).

`serve` starts a plain HTTP server on a free loopback port for a folder. `crawl` opens every page
reachable by links from the start page, as a reader's browser would, and records what went wrong
on each: console errors and uncaught exceptions, requests that failed or answered 4xx/5xx (a
stylesheet, a script, an image), and links to pages or anchors that do not exist. Links to other
sites are listed, never followed: the course's site must need nothing outside itself.
"""

from __future__ import annotations

import functools
import http.server
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urldefrag, urlparse


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # the request log: not wanted in the test output
        pass


@contextmanager
def serve(folder: Path):
    """``http://127.0.0.1:PORT/`` serving ``folder`` until the block ends."""
    handler = functools.partial(_QuietHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


@dataclass
class PageVisit:
    url: str
    status: int | None = None
    problems: list[str] = field(default_factory=list)   # console errors, exceptions, failed loads
    links: list[str] = field(default_factory=list)      # every <a href>, resolved
    anchors: set[str] = field(default_factory=set)      # ids and names a #fragment can point at


@dataclass
class Crawl:
    start: str
    pages: dict[str, PageVisit] = field(default_factory=dict)
    broken_links: list[str] = field(default_factory=list)
    external_links: set[str] = field(default_factory=set)

    def page_problems(self) -> list[str]:
        return [f"{url}: {problem}" for url, visit in self.pages.items() for problem in visit.problems]


PAGE_FACTS_JS = """() => ({
  links: [...document.querySelectorAll('a[href]')].map(a => a.href),
  anchors: [...document.querySelectorAll('[id], a[name]')].map(e => e.id || e.getAttribute('name')),
})"""


def is_page(url: str) -> bool:
    path = urlparse(url).path
    return path.endswith((".html", "/"))


def visit(context, url: str, settle_ms: int = 300) -> PageVisit:
    """Open one page and record what a reader's browser saw go wrong there."""
    page_visit = PageVisit(url)
    page = context.new_page()
    page.on("console", lambda msg: msg.type == "error" and page_visit.problems.append(f"console error: {msg.text}"))
    page.on("pageerror", lambda exc: page_visit.problems.append(f"uncaught exception: {exc}"))
    page.on("requestfailed", lambda req: page_visit.problems.append(
        f"request failed: {req.url} ({req.failure})"))
    page.on("response", lambda resp: resp.status >= 400 and resp.url != url and page_visit.problems.append(
        f"{resp.status} for {resp.url}"))
    try:
        response = page.goto(url, wait_until="load")
        page_visit.status = response.status if response else None
        page.wait_for_timeout(settle_ms)  # scripts that run after load (search index, MathJax) report too
        facts = page.evaluate(PAGE_FACTS_JS)
        page_visit.links = facts["links"]
        page_visit.anchors = set(facts["anchors"])
    finally:
        page.close()
    return page_visit


def crawl(browser, start: str, max_pages: int = 500) -> Crawl:
    """Every page reachable from ``start`` on the same server, each visited once."""
    origin = urlparse(start).netloc
    result = Crawl(start)
    context = browser.new_context()
    try:
        queue, links = [start], []
        while queue:
            url = queue.pop(0)
            if url in result.pages:
                continue
            if len(result.pages) >= max_pages:
                raise RuntimeError(f"more than {max_pages} pages under {start}: a link loop?")
            page_visit = visit(context, url)
            result.pages[url] = page_visit
            for href in page_visit.links:
                if urlparse(href).scheme not in ("http", "https"):
                    continue  # mailto:, javascript:
                if urlparse(href).netloc != origin:
                    result.external_links.add(href)
                    continue
                links.append((url, href))
                target, _ = urldefrag(href)
                if is_page(target) and target not in result.pages:
                    queue.append(target)
        result.broken_links = _broken(result, links, context)
    finally:
        context.close()
    return result


def _broken(result: Crawl, links: list[tuple[str, str]], context) -> list[str]:
    broken, checked = [], {}
    for source, href in links:
        target, fragment = urldefrag(href)
        if target in result.pages:
            status = result.pages[target].status
        else:  # a file that is not a page (an image, a notebook): does it answer?
            if target not in checked:
                checked[target] = context.request.get(target).status
            status = checked[target]
        if status is None or status >= 400:
            broken.append(f"{source} links to {href}: {status}")
        elif fragment and target in result.pages and fragment not in result.pages[target].anchors:
            broken.append(f"{source} links to {href}: no element with id {fragment!r} there")
    return sorted(set(broken))
