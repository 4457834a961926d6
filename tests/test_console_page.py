"""The console page as the Function App serves it: its own files only, under a CSP without unsafe-inline."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator

import pytest

from shared.console.page import STATIC
from tests.fakes.gateway import GatewayHarness


@pytest.fixture
async def harness() -> AsyncIterator[GatewayHarness]:
    h = GatewayHarness()
    yield h
    await h.close()


async def test_the_page_and_its_files_are_served_with_a_strict_policy(harness: GatewayHarness) -> None:
    page = await harness.http.get("/console")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    csp = page.headers["content-security-policy"]
    assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
    assert "script-src 'self'" in csp and "default-src 'none'" in csp and "frame-ancestors 'none'" in csp
    referenced = re.findall(r'(?:src|href)="(/console/static/[^"]+)"', page.text)
    assert referenced, "the page loads its script and style"
    for path in referenced:
        served = await harness.http.get(path)
        assert served.status_code == 200 and served.headers["content-security-policy"] == csp, path
    assert (await harness.http.get("/console/")).text == page.text


def test_no_inline_script_style_or_handler_and_nothing_from_another_origin() -> None:
    html = (STATIC / "index.html").read_text()
    assert not re.search(r"<script(?![^>]*\bsrc=)[^>]*>", html), "inline script"
    assert "<style" not in html and not re.search(r'\sstyle="', html)
    assert not re.search(r"\son[a-z]+=", html), "inline event handler"
    for path in STATIC.iterdir():
        text = path.read_text()
        urls = set(re.findall(r"https?://[^\s\"')]+", text)) - {"http://www.w3.org/2000/svg"}
        assert not urls, (path.name, urls)
    script = (STATIC / "console.js").read_text()
    assert "localStorage" not in script and "document.cookie" not in script and "sessionStorage" in script
    assert "innerHTML" not in script  # text only: a consumer's name is never markup
    for element in set(re.findall(r'\$\("([a-z-]+)"\)', script)):
        assert f'id="{element}"' in html, element


async def test_the_page_refuses_other_paths_and_methods(harness: GatewayHarness) -> None:
    for path in ("/console/static/../../function_app.py", "/console/static/nothing.js", "/console/other",
                 "/console/static/%2e%2e/api.py"):
        assert (await harness.http.get(path)).status_code == 404, path
    assert (await harness.http.post("/console")).status_code == 405
