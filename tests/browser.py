"""A real browser on a real gateway, for the console's browser tests and its screenshot.

`LiveGateway` serves the in-process harness (the real edge over the in-memory stores, a fake clock, a scripted
upstream: tests/fakes/gateway.py) over a real socket on 127.0.0.1 with uvicorn, on a thread of its own. `chromium()`
starts Debian's Chromium through Playwright (no Playwright browser download: `executable_path`), headless.

Regenerate the README's picture of a failover (docs/console-failover.png):

    .venv/bin/python -m tests.browser docs/console-failover.png
"""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
import threading
from collections.abc import Awaitable, Callable, Iterator, Mapping
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, TypeVar

import httpx
import uvicorn

from tests.fakes.gateway import ADMIN_KEY, GatewayHarness
from tests.fakes.upstream import Reply, Sent, default_reply, error_reply
from tools import stack

CHROMIUM = os.environ.get("GATEWAY_TEST_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
T = TypeVar("T")


def unavailable() -> str | None:
    """Why the browser tests cannot run here, with how to enable them; None when they can."""
    try:
        import playwright  # noqa: F401
    except ImportError:
        return "the browser tests need Playwright: scripts/bootstrap installs it (requirements-dev.txt)"
    if not (Path(CHROMIUM).is_file() and os.access(CHROMIUM, os.X_OK)) and shutil.which(CHROMIUM) is None:
        return (f"the browser tests need Chromium at {CHROMIUM}: run scripts/bootstrap as root on Debian/Ubuntu "
                "(it runs apt-get install chromium), or install it yourself, or point GATEWAY_TEST_CHROMIUM at one")
    return None


@contextmanager
def chromium() -> Iterator[Any]:
    """One headless Chromium (a Playwright Browser); closed on the way out."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield browser
        finally:
            browser.close()


class LiveGateway:
    """The harness's gateway listening on 127.0.0.1; `run` executes a coroutine on its loop (the harness is not
    thread-safe: everything that touches it goes through there)."""

    def __init__(self, backends: Any = None, env: Mapping[str, str] | None = None) -> None:
        self.port = stack.free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._options = {"backends": backends, "env": env}
        self._ready = threading.Event()
        self._failed: BaseException | None = None
        self._thread = threading.Thread(target=lambda: asyncio.run(self._serve()), name="live-gateway", daemon=True)
        self._thread.start()
        if not self._ready.wait(30):
            raise RuntimeError("the gateway did not start in 30 s")
        if self._failed is not None:
            raise self._failed
        self.client = httpx.Client(base_url=self.url, timeout=10)

    async def _serve(self) -> None:
        try:
            self.loop = asyncio.get_running_loop()
            self.harness = GatewayHarness(**self._options)
            config = uvicorn.Config(self.harness.asgi, host="127.0.0.1", port=self.port, lifespan="off", interface="asgi3",
                                    log_level="warning", access_log=False)
            self.server = uvicorn.Server(config)
            serving = asyncio.create_task(self.server.serve())
            while not self.server.started and not serving.done():  # noqa: ASYNC110 - uvicorn has a flag, no event
                await asyncio.sleep(0.01)
            if serving.done():
                serving.result()
        except BaseException as error:  # noqa: BLE001 - handed to the starting thread
            self._failed = error
            self._ready.set()
            return
        self._ready.set()
        try:
            await serving
        finally:
            await self.harness.close()

    def run(self, work: Callable[[], Awaitable[T]]) -> T:
        async def call() -> T:
            return await work()

        return asyncio.run_coroutine_threadsafe(call(), self.loop).result(30)

    def do(self, action: Callable[[], T]) -> T:
        """A plain call on the gateway's loop (creating a consumer, advancing the clock, scripting a backend)."""

        async def call() -> T:
            return action()

        return self.run(call)

    def advance(self, seconds: float) -> None:
        self.do(lambda: self.harness.clock.advance(seconds))

    def chat(self, key: str, model: str = "gpt-4o") -> httpx.Response:
        return self.client.post("/v1/chat/completions", headers={"api-key": key},
                                json={"model": model, "messages": [{"role": "user", "content": "hi"}]})

    def stop(self) -> None:
        if hasattr(self, "client"):
            self.client.close()
        if hasattr(self, "server"):
            self.server.should_exit = True
        self._thread.join(30)


def failover(gateway: LiveGateway, key: str, *, buckets: int = 30, per_bucket: int = 14) -> None:
    """Five minutes of traffic, ten seconds at a time on the fake clock: the PTU region takes it all, then runs short
    of capacity (past a few requests per 10 s it answers 429) and the overflow moves to the pay-as-you-go regions;
    later its capacity returns and the traffic with it. Real requests through the real edge, router and breaker;
    only time and the backends' answers are made up."""
    harness = gateway.harness
    served: dict[int, int] = {}
    short = range(buckets // 3, buckets * 2 // 3)

    def answer(sent: Sent) -> Reply:
        bucket = int(harness.clock.now() // 10)
        if sent.backend_id == "uksouth-ptu" and bucket - first in short:
            served[bucket] = served.get(bucket, 0) + 1
            if served[bucket] > 3:
                return error_reply(429, {"retry-after-ms": "2000"}, "rate_limit_exceeded")
        return default_reply(sent)

    first = gateway.do(lambda: int(harness.clock.now() // 10))
    gateway.do(lambda: setattr(harness.upstream, "_default", answer))  # the scripted upstream's answer for the rest
    for bucket in range(buckets):
        for _ in range(per_bucket + (bucket * 7) % 5):
            gateway.chat(key)
        if bucket < buckets - 1:
            gateway.advance(10)


def screenshot(path: Path, browser: Any = None) -> None:
    """The console's live traffic during a failover, as the README shows it (in `browser`, or a Chromium of its own)."""
    gateway = LiveGateway()
    try:
        key = gateway.do(lambda: gateway.harness.consumer("billing-app"))
        failover(gateway, key)
        with chromium() if browser is None else nullcontext(browser) as started:
            context = started.new_context(viewport={"width": 1100, "height": 800}, device_scale_factor=2)
            page = context.new_page()
            sign_in(page, gateway.url, ADMIN_KEY)
            page.wait_for_selector('#traffic .chart[data-backend="uksouth-ptu"] .throttle')
            page.locator("#traffic-section").screenshot(path=str(path))
            context.close()
    finally:
        gateway.stop()


def sign_in(page: Any, url: str, key: str) -> None:
    page.goto(f"{url}/console")
    page.fill("#key", key)
    page.click("#signin-form button[type=submit]")


if __name__ == "__main__":
    why = unavailable()
    if why:
        sys.exit(why)
    target = Path(sys.argv[1] if len(sys.argv) > 1 else "docs/console-failover.png")
    screenshot(target)
    print(f"wrote {target}")
