"""The results site (issue 22), built from the committed executed notebooks, REPORT.md, the README and the docs,
opened in a real headless browser (Debian's Chromium driven by Playwright): every page renders, every image loads,
no internal link or anchor is broken, and no script fails but the template's CDN fetches on an offline machine. Runs wherever Chromium is installed; `.ci/run` installs it and sets
REPRO_REQUIRE_BROWSER=1, so there a missing browser fails instead of skipping."""

from __future__ import annotations

import functools
import http.server
import os
import shutil
import threading

import pytest

from common.reporting import site

BROWSER = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    if not BROWSER:
        if os.environ.get("REPRO_REQUIRE_BROWSER"):
            pytest.fail("REPRO_REQUIRE_BROWSER is set but no chromium is on PATH")
        pytest.skip("no Chromium here (apt-get install chromium; .ci/run installs it)")
    root = tmp_path_factory.mktemp("site")
    pages = site.build(root)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield root, pages, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_the_site_has_every_executed_notebook_and_no_broken_link(served) -> None:
    root, pages, _ = served
    names = {p.relative_to(root).as_posix() for p in pages}
    assert {"index.html", "REPORT.html", "notebooks/README.html"} <= names
    assert {f"notebooks/{p.stem}.html" for p in site.EXECUTED.glob("*/*.ipynb")} <= names
    assert site.broken_links(root) == []


def test_every_page_renders_and_every_image_loads_in_chromium(served) -> None:
    from playwright.sync_api import sync_playwright

    root, pages, base = served
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=BROWSER, args=["--no-sandbox"])
        page = browser.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda err: errors.append(str(err)))
        for path in pages:
            url = f"{base}/{path.relative_to(root).as_posix()}"
            assert page.goto(url, wait_until="load").ok, url
            assert page.locator("body").inner_text().strip(), f"{url} renders no text"
            broken = page.evaluate("Array.from(document.images).filter(i => !(i.complete && i.naturalWidth > 0))"
                                   ".map(i => i.src)")
            assert broken == [], f"{url}: images that did not load: {broken}"
            internal = page.evaluate(f"Array.from(document.links).map(a => a.href).filter(h => h.startsWith('{base}'))")
            for href in sorted(set(h.split("#")[0] for h in internal)):
                assert page.request.get(href).ok, f"{url} links to {href}, which the server does not have"
        browser.close()
    # nbconvert's template loads MathJax and mermaid from a CDN, which an offline machine cannot reach: only those
    # fetches may fail; any other script error is the site's
    assert [e for e in errors if "https://cdnjs.cloudflare.com/" not in e] == []
