"""Open every page of a built site in headless Chromium and report what a reader would hit.

``python docs/_ext/check_site.py docs/_build/html [--screenshots DIR]`` serves the site on
localhost, loads every HTML page in Debian's Chromium (``/usr/bin/chromium``, driven by
Playwright), and reports console errors, uncaught exceptions, failed requests and internal
links that resolve to no file or to no element with the linked id. With ``--screenshots`` it
also saves the landing page and one API page as PNGs. Exit status 1 when anything is wrong.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import http.server
import threading
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import unquote, urldefrag, urlparse

CHROMIUM = "/usr/bin/chromium"
# As root, in a sandbox without a network: no sandbox, no GPU, no background traffic.
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update",
                  "--disable-sync"]
SCREENSHOT_PAGES = {"site_landing.png": "index.html",
                    "site_api_page.png": "api/jattn.efficient.linear.html"}


@dataclasses.dataclass
class SiteReport:
    pages: list[str]  # every HTML page loaded, relative to the site root
    problems: list[str]  # console errors, page errors, failed requests, broken links
    index_links: set[str]  # "page.html#anchor" of every link on genindex.html


@contextlib.contextmanager
def serve(root: Path) -> Iterator[str]:
    """An HTTP server for ``root`` on a free localhost port, for the duration of the block."""

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Quiet, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


# Resolves once MathJax (where the page loads it) has typeset the page.
_TYPESET = """() => window.MathJax && window.MathJax.startup
    ? window.MathJax.startup.promise : null"""
_LINKS_AND_IDS = """() => ({
    links: Array.from(document.querySelectorAll('a[href]'), a => a.href),
    ids: Array.from(document.querySelectorAll('[id]'), e => e.id)
        .concat(Array.from(document.querySelectorAll('a[name]'), a => a.name)),
})"""


def check_site(site: Path, screenshots: Path | None = None) -> SiteReport:
    """Load every page of ``site`` in Chromium; see the module docstring."""
    from playwright.sync_api import sync_playwright

    site = site.resolve()
    if not (site / "index.html").is_file():
        raise ValueError(f"{site} is not a built site: it has no index.html")
    pages = sorted(str(p.relative_to(site)) for p in site.rglob("*.html")
                   if "_static" not in p.parts and "_sources" not in p.parts)
    problems: list[str] = []
    ids: dict[str, set[str]] = {}
    links: dict[str, list[str]] = {}
    with serve(site) as base, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        tab = browser.new_page(viewport={"width": 1280, "height": 900})
        current = [""]
        tab.on("console", lambda m: m.type == "error" and problems.append(
            f"{current[0]}: console error: {m.text}"))
        tab.on("pageerror", lambda e: problems.append(f"{current[0]}: page error: {e}"))
        # A request aborted by the next navigation (a favicon, say) is not a failure.
        tab.on("requestfailed", lambda r: r.failure != "net::ERR_ABORTED" and problems.append(
            f"{current[0]}: request failed: {r.url} ({r.failure})"))
        tab.on("response", lambda r: r.status >= 400 and problems.append(
            f"{current[0]}: HTTP {r.status}: {r.url}"))
        for page in pages:
            current[0] = page
            tab.goto(base + page, wait_until="load")
            tab.evaluate(_TYPESET)
            found = tab.evaluate(_LINKS_AND_IDS)
            ids[page] = set(found["ids"])
            links[page] = found["links"]
            for name, target in SCREENSHOT_PAGES.items():
                if screenshots is not None and page == target:
                    screenshots.mkdir(parents=True, exist_ok=True)
                    tab.screenshot(path=str(screenshots / name))
        browser.close()
    for page, hrefs in links.items():
        for href in hrefs:
            url, anchor = urldefrag(href)
            if not url.startswith(base):
                continue  # external: the site must not need the network, but may link out
            target = unquote(urlparse(url).path.lstrip("/")) or "index.html"
            if target.endswith("/"):
                target += "index.html"
            if not (site / target).is_file():
                problems.append(f"{page}: link to a missing file: {target}")
            elif anchor and target in ids and anchor not in ids[target]:
                problems.append(f"{page}: link to a missing anchor: {target}#{anchor}")
    index_links = set()
    for href in links.get("genindex.html", []):
        if href.startswith(base) and "#" in href:
            index_links.add(unquote(href[len(base):]))
    return SiteReport(pages=pages, problems=problems, index_links=index_links)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("site", type=Path, help="the built site, e.g. docs/_build/html")
    parser.add_argument("--screenshots", type=Path, default=None,
                        help="a folder for the landing page and one API page as PNGs")
    args = parser.parse_args(argv)
    report = check_site(args.site, args.screenshots)
    print(f"{len(report.pages)} pages loaded, {len(report.problems)} problems")
    for problem in report.problems:
        print(" ", problem)
    return 1 if report.problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
