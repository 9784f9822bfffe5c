#!/usr/bin/env python3
"""Fails on a broken internal link in the built user guide, or from README.md into docs/.

    scripts/check_book_links.py BOOK_HTML_DIR [REPO_ROOT]

1. The built book (mdBook HTML in BOOK_HTML_DIR, e.g. target/book): every relative `href` and `src` of
   every page must name a file of the built book, and a `#fragment` must be an `id` (or `name`) of an
   element in the target page. mdBook rewrites `page.md#x` links to `page.html#x` and derives heading ids
   itself, so checking the HTML checks what a reader clicks.
2. README.md (and the other root Markdown files): every relative link into `docs/` must name an existing
   file, and a `#fragment` on a `docs/src/*.md` page must be an id of the built page's HTML.

Absolute URLs (`https:`, `mailto:` ...) are not checked. Standard library only. Prints each broken link
with the page it is on and exits 1; exits 0 when every link resolves.
"""

from __future__ import annotations

import html.parser
import re
import sys
from pathlib import Path
from urllib.parse import unquote, urlsplit


class Page(html.parser.HTMLParser):
    """The ids and the relative links of one HTML page."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.ids: set[str] = set()
        self.links: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        for key in ("id",) + (("name",) if tag == "a" else ()):
            if a.get(key):
                self.ids.add(a[key])
        for key in ("href", "src"):
            if a.get(key) is not None and not (tag == "link" and key == "href" and a.get("rel") == "canonical"):
                self.links.append(a[key])


def is_external(link: str) -> bool:
    return bool(urlsplit(link).scheme) or link.startswith("//")


def parse(path: Path, cache: dict[Path, Page]) -> Page:
    if path not in cache:
        page = Page()
        page.feed(path.read_text(encoding="utf-8", errors="replace"))
        cache[path] = page
    return cache[path]


def check_book(book: Path, cache: dict[Path, Page]) -> list[str]:
    broken = []
    # print.html repeats every page with rewritten links; 404.html uses a site-absolute path_to_root.
    pages = sorted(p for p in book.rglob("*.html") if p.name not in ("print.html", "404.html"))
    for page_path in pages:
        for link in parse(page_path, cache).links:
            if not link or is_external(link):
                continue
            parts = urlsplit(link)
            if parts.path.startswith("/"):
                broken.append(f"{page_path.relative_to(book)}: {link}: a site-absolute link")
                continue
            target = (page_path.parent / unquote(parts.path)).resolve() if parts.path else page_path
            if target.is_dir():
                target = target / "index.html"
            if not target.is_file():
                broken.append(f"{page_path.relative_to(book)}: {link}: no such file")
                continue
            if parts.fragment and target.suffix == ".html":
                if unquote(parts.fragment) not in parse(target, cache).ids:
                    broken.append(f"{page_path.relative_to(book)}: {link}: no id \"{parts.fragment}\" in {target.relative_to(book.resolve())}")
    return broken


MD_LINK = re.compile(r"\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
CODE = re.compile(r"```.*?```|`[^`\n]*`", re.S)


def check_root_markdown(root: Path, book: Path, cache: dict[Path, Page]) -> list[str]:
    broken = []
    src = (root / "docs" / "src").resolve()
    for md in sorted(root.glob("*.md")):
        text = CODE.sub("", md.read_text(encoding="utf-8"))
        for link in MD_LINK.findall(text):
            if is_external(link) or link.startswith("#"):
                continue
            parts = urlsplit(link)
            target = (root / unquote(parts.path)).resolve()
            if not target.exists():
                broken.append(f"{md.name}: {link}: no such file")
                continue
            if parts.fragment and target.suffix == ".md" and src in target.parents:
                html_page = book / target.relative_to(src).with_suffix(".html")
                if not html_page.is_file():
                    broken.append(f"{md.name}: {link}: {target.relative_to(root)} is not a page of the book (not in SUMMARY.md?)")
                elif unquote(parts.fragment) not in parse(html_page, cache).ids:
                    broken.append(f"{md.name}: {link}: no id \"{parts.fragment}\" in {html_page.relative_to(book)}")
    return broken


def main() -> int:
    if len(sys.argv) not in (2, 3):
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    book = Path(sys.argv[1]).resolve()
    root = Path(sys.argv[2] if len(sys.argv) == 3 else ".").resolve()
    if not (book / "index.html").is_file():
        print(f"{book}: no built book here (index.html is missing): run mdbook build first", file=sys.stderr)
        return 2
    cache: dict[Path, Page] = {}
    broken = check_book(book, cache) + check_root_markdown(root, book, cache)
    for line in broken:
        print(f"broken link: {line}")
    pages = len([p for p in cache if p.suffix == ".html"])
    if broken:
        print(f"{len(broken)} broken link(s)")
        return 1
    print(f"user guide links: ok ({pages} pages checked, README.md and the other root Markdown files too)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
