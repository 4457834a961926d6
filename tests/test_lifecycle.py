"""The flush on SIGTERM: close runs on the loop, then the signal goes to whoever handled it before."""

from __future__ import annotations

import asyncio
import os
import signal
from types import FrameType

from shared.lifecycle import on_sigterm


def test_sigterm_runs_close_once_then_reaches_the_previous_handler() -> None:
    seen: list[str] = []

    def previous(signum: int, frame: FrameType | None) -> None:
        seen.append("previous")

    async def close() -> None:
        await asyncio.sleep(0.01)  # an await in between: the close really runs on the loop
        seen.append("closed")

    async def main() -> None:
        assert on_sigterm(close)
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)  # a second one while closing changes nothing
        for _ in range(200):
            if "previous" in seen:
                break
            await asyncio.sleep(0.01)

    original = signal.signal(signal.SIGTERM, previous)
    try:
        asyncio.run(main())
    finally:
        signal.signal(signal.SIGTERM, original)
    assert seen == ["closed", "previous"]


def test_a_failing_close_still_hands_the_signal_on() -> None:
    seen: list[str] = []

    async def close() -> None:
        raise RuntimeError("store down")

    async def main() -> None:
        assert on_sigterm(close)
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(200):
            if seen:
                break
            await asyncio.sleep(0.01)

    original = signal.signal(signal.SIGTERM, lambda signum, frame: seen.append("previous"))
    try:
        asyncio.run(main())
    finally:
        signal.signal(signal.SIGTERM, original)
    assert seen == ["previous"]
