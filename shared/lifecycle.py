"""Flushing what is buffered when the worker is told to stop.

What runs under the Functions host: the Python worker declares no handler for the host's WorkerTerminate message and
installs no SIGTERM handler of its own (Azure/azure-functions-python-worker issues #1521 and #578; the SIGTERM
handler of pull request #1579 is not merged), and `azure.functions` offers extension hooks around invocations only
(`AppExtensionBase`: post_function_load / pre_invocation / post_invocation), nothing at shutdown. When an instance is
recycled or scaled in, the worker receives SIGTERM, whose default action ends Python at once: no `atexit`, no
OpenTelemetry shutdown, no pending Table writes. So the app handles SIGTERM itself, on its own event loop: it saves
usage rows and budget spend, returns limiter leases, exports metrics, spans and the per-request log, and then lets
the signal do what it did before (the default action ends the process; a server's own handler, as uvicorn's in
tools/localhost.py, stops it gracefully). A SIGKILL after the host's grace period cannot be handled by anyone.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Awaitable, Callable
from typing import Any

log = logging.getLogger(__name__)

SHUTDOWN_TIMEOUT_S = 10.0  # well inside the grace period hosts give a process between SIGTERM and SIGKILL


def on_sigterm(close: Callable[[], Awaitable[None]], timeout_s: float = SHUTDOWN_TIMEOUT_S) -> bool:
    """From inside the running loop: run `close` on SIGTERM, then re-deliver the signal to its previous handler.
    Returns False where the loop cannot take signals (not the main thread, or not a Unix loop)."""
    loop = asyncio.get_running_loop()
    previous = signal.getsignal(signal.SIGTERM)
    started: list[asyncio.Task[None]] = []

    def handle() -> None:
        if not started:  # a second SIGTERM while closing changes nothing
            started.append(loop.create_task(_close_then_resend(loop, close, previous, timeout_s)))

    try:
        loop.add_signal_handler(signal.SIGTERM, handle)
    except (NotImplementedError, RuntimeError, ValueError):
        return False
    return True


async def _close_then_resend(
    loop: asyncio.AbstractEventLoop, close: Callable[[], Awaitable[None]], previous: Any, timeout_s: float
) -> None:
    try:
        await asyncio.wait_for(close(), timeout_s)
        log.info("flushed on SIGTERM")
    except Exception:
        log.exception("flush on SIGTERM failed")
    finally:
        loop.remove_signal_handler(signal.SIGTERM)
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)
