from __future__ import annotations

import asyncio
import warnings

import pytest

from shared.background import keep_running


def test_outside_a_running_loop_nothing_starts_and_no_coroutine_is_left_unawaited() -> None:
    made: list[int] = []

    async def work() -> None:
        made.append(1)

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "coroutine ... was never awaited" would be a RuntimeWarning
        assert keep_running(None, work) is None
    assert made == []


@pytest.mark.asyncio
async def test_a_running_task_is_kept_and_a_finished_one_replaced() -> None:
    gate = asyncio.Event()
    runs: list[int] = []

    async def work() -> None:
        runs.append(1)
        await gate.wait()

    first = keep_running(None, work)
    assert first is not None
    assert keep_running(first, work) is first  # still running: not started twice
    await asyncio.sleep(0)
    gate.set()
    await first
    second = keep_running(first, work)
    assert second is not None and second is not first
    await second
    assert runs == [1, 1]
