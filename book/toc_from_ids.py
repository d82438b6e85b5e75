"""mkdocs hook (book/mkdocs.yml): a chapter page's table of contents, made from the ids its
headings really have.

mkdocs-jupyter 0.26 lists a notebook's headings from a markdown copy with the inline code taken
out, so "As an `nn.Module`" is listed as ``#as-an`` while the page gives that heading the id
``as-an-nnmodule``: a link to nowhere (the browser test's crawl found it). Reading the headings
off the page's own HTML makes every entry point at a heading that is there.
"""

from __future__ import annotations

import html
import re
from html.parser import HTMLParser

HEADING = re.compile(r"h[1-6]")


class _Headings(HTMLParser):
    """Every h1-h6 with an id: (level, id, text), the pilcrow of its anchor link left out."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.found: list[tuple[int, str, str]] = []
        self._open: tuple[int, str] | None = None
        self._text: list[str] = []

    def handle_starttag(self, tag, attrs):
        heading_id = dict(attrs).get("id")
        if self._open is None and HEADING.fullmatch(tag) and heading_id:
            self._open, self._text = (int(tag[1]), heading_id), []

    def handle_data(self, data):
        if self._open is not None:
            self._text.append(data)

    def handle_endtag(self, tag):
        if self._open is not None and tag == f"h{self._open[0]}":
            level, heading_id = self._open
            self.found.append((level, heading_id, "".join(self._text).replace("¶", "").strip()))
            self._open = None


def toc_tokens(page_html: str) -> list[dict]:
    """The headings of ``page_html`` as mkdocs's toc tokens: each heading nested under the
    nearest heading of a higher level before it."""
    parser = _Headings()
    parser.feed(page_html)
    roots: list[dict] = []
    stack: list[dict] = []
    for level, heading_id, text in parser.found:
        token = {"level": level, "id": heading_id, "name": html.escape(text), "children": []}
        while stack and stack[-1]["level"] >= level:
            stack.pop()
        (stack[-1]["children"] if stack else roots).append(token)
        stack.append(token)
    return roots


def on_page_content(page_html, page, config, files):
    from mkdocs.structure.toc import get_toc  # here: the course's tests read toc_tokens without mkdocs

    if page.file.src_uri.endswith(".ipynb"):
        page.toc = get_toc(toc_tokens(page_html))
    return page_html
