"""Large prompts in the request flow, in-process: a consumer with room to spare is admitted on the prompt's upper bound
(its UTF-8 bytes) without counting it; a consumer near its limit gets the exact count and the right refusal; and a
prompt that was not counted at admission is counted (off the event loop) when the books need it.

Whether the prompt was counted is observed at the tokenizer itself: every text tiktoken encodes is recorded."""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Iterator
from typing import Any

import openai
import pytest
import tiktoken
from openai.types.chat import ChatCompletionMessageParam

from shared.flow import tokens
from shared.limits.limiter import LimitTicket
from shared.outcomes import FailureKind
from tests.fakes.gateway import GatewayHarness, backend, gateway_request
from tests.fakes.upstream import PROMPT_TOKENS, Fail, Reply, sse_events, stream_reply

# 4 MiB of ASCII words: " word" is one token, so the prompt is ~840,000 tokens and its upper bound 4,194,304.
PROMPT_TEXT = ("word " * (4 * 1024 * 1024 // 5 + 1))[: 4 * 1024 * 1024]
MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": PROMPT_TEXT}]
BODY = {"messages": MESSAGES}
EXACT = tokens.count_chat_prompt(BODY, tokens.get_encoding("o200k_base"))
BOUND = tokens.count_chat_prompt(BODY, tokens.UTF8_BYTES)
ONE_REGION = [backend("swedencentral", "swedencentral", 1)]


@pytest.fixture
async def harness() -> AsyncIterator[GatewayHarness]:
    built = GatewayHarness(ONE_REGION, env={"GATEWAY_MAX_BODY_BYTES": str(8 * 1024 * 1024)})
    yield built
    await built.close()


class Encoded:
    """Every text tiktoken encoded, and the thread that encoded it."""

    def __init__(self) -> None:
        self.texts: list[tuple[int, str]] = []

    @property
    def chars(self) -> int:
        return sum(length for length, _ in self.texts)

    def threads(self, at_least: int) -> set[str]:
        return {thread for length, thread in self.texts if length >= at_least}


@pytest.fixture
def encoded(monkeypatch: pytest.MonkeyPatch) -> Iterator[Encoded]:
    seen = Encoded()
    real = tiktoken.Encoding.encode

    def encode(self: tiktoken.Encoding, text: str, *args: Any, **kwargs: Any) -> list[int]:
        seen.texts.append((len(text), threading.current_thread().name))
        return real(self, text, *args, **kwargs)

    monkeypatch.setattr(tiktoken.Encoding, "encode", encode)
    tokens._counts.clear()  # the count cache must not hide a count
    yield seen


def test_the_prompt_is_what_the_tests_say() -> None:
    assert 800_000 < EXACT < 900_000 and BOUND >= 4 * 1024 * 1024 and BOUND >= EXACT


async def test_a_4_mib_prompt_with_room_to_spare_is_admitted_uncounted_and_charged_the_backends_usage(
    harness: GatewayHarness, encoded: Encoded
) -> None:
    key = harness.consumer("roomy", tpm=100_000_000)
    completion = await harness.openai(key).chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=7)
    assert completion.usage is not None and completion.usage.prompt_tokens == PROMPT_TOKENS
    assert len(harness.upstream.sent) == 1 and len(harness.upstream.sent[0].body) > 4 * 1024 * 1024  # forwarded whole
    assert encoded.chars < 1_000  # the prompt was never counted
    # Settled to what the backend reported, not to the bound the admission held.
    assert await harness.charged("roomy") == PROMPT_TOKENS + 7
    rows = await harness.usage_rows("roomy")
    assert sum(r.prompt for r in rows) == PROMPT_TOKENS and sum(r.total for r in rows) == PROMPT_TOKENS + 7


async def test_with_the_bound_off_the_same_prompt_is_counted_off_the_loop(encoded: Encoded) -> None:
    harness = GatewayHarness(ONE_REGION, env={"GATEWAY_MAX_BODY_BYTES": str(8 * 1024 * 1024),
                                              "GATEWAY_ADMIT_ON_BOUND": "false"})
    try:
        key = harness.consumer("roomy", tpm=100_000_000)
        await harness.openai(key).chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=7)
        assert encoded.chars >= len(PROMPT_TEXT)
        assert encoded.threads(1_000) == {"token-count_0"}
        assert await harness.charged("roomy") == PROMPT_TOKENS + 7
    finally:
        await harness.close()


async def test_a_consumer_near_its_limit_gets_the_exact_count_and_is_admitted_where_the_bound_would_not_be(
    harness: GatewayHarness, encoded: Encoded
) -> None:
    # 1.5M a minute: the bound (4.2M) would be refused as larger than the whole minute; the count (0.84M) fits.
    key = harness.consumer("tight", tpm=1_500_000)
    completion = await harness.openai(key).chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=7)
    assert completion.usage is not None
    assert encoded.chars >= len(PROMPT_TEXT) and encoded.threads(1_000) == {"token-count_0"}
    assert await harness.charged("tight") == PROMPT_TOKENS + 7


async def test_a_consumer_near_its_limit_is_counted_and_told_to_retry_not_that_the_prompt_can_never_fit(
    harness: GatewayHarness, encoded: Encoded
) -> None:
    key = harness.consumer("busy", tpm=1_500_000)
    consumer = await (await harness.gateway()).s.consumers.authenticate(key)
    (await harness.limiter.admit(consumer, "gpt-4o", 1_000_000)).settle(1_000_000)  # two thirds of the minute spent
    with pytest.raises(openai.RateLimitError) as refused:
        await harness.openai(key).chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=7)
    body = refused.value.body
    assert isinstance(body, dict) and body["code"] == "rate_limit_exceeded"  # not tokens_exceed_limit: it fits later
    assert refused.value.response.headers.get("retry-after")
    assert encoded.chars >= len(PROMPT_TEXT)
    assert harness.upstream.sent == []


@pytest.mark.parametrize("asked", [True, False], ids=["usage-asked", "usage-not-asked"])
@pytest.mark.parametrize("tpm", [100_000_000, 0], ids=["limited", "unlimited"])
async def test_a_stream_whose_backend_sends_no_usage_gets_a_counted_prompt_in_the_books(
    harness: GatewayHarness, encoded: Encoded, tpm: int, asked: bool
) -> None:
    key = harness.consumer("streamer", tpm=tpm)
    harness.upstream.script(
        "swedencentral", Reply(200, {"content-type": "text/event-stream"}, pieces=sse_events(4, with_usage=False))
    )
    options: dict[str, Any] = {"stream_options": {"include_usage": True}} if asked else {}
    stream = await harness.openai(key).chat.completions.create(
        model="gpt-4o", messages=MESSAGES, max_tokens=4, stream=True, **options
    )
    usages = [chunk.usage async for chunk in stream if chunk.usage is not None]
    if asked:  # the backend sent none: the gateway's own, with the prompt counted, not bounded
        assert [(u.prompt_tokens, u.completion_tokens) for u in usages] == [(EXACT, 4)]
    else:
        assert usages == []
    assert encoded.threads(1_000) == {"token-count_0"}  # counted in the worker thread, off the event loop
    rows = await harness.usage_rows("streamer")
    assert sum(r.prompt for r in rows) == EXACT and sum(r.total for r in rows) == EXACT + 4
    assert sum(r.counted for r in rows) == EXACT + 4  # and the books say the gateway counted it
    if tpm:
        assert await harness.charged("streamer") == EXACT + 4


async def test_a_timed_out_attempt_charges_the_counted_prompt_and_keeps_the_counts_reservation_not_the_bounds(
    harness: GatewayHarness, encoded: Encoded
) -> None:
    key = harness.consumer("slow", tpm=100_000_000)
    harness.upstream.script("swedencentral", Fail(FailureKind.TIMEOUT))
    with pytest.raises(openai.APIStatusError) as failed:
        await harness.openai(key).chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=7)
    assert failed.value.status_code == 504
    assert encoded.threads(1_000) == {"token-count_0"}  # the prompt the backend read, counted off the loop
    # Not refunded: the reservation, which became the count's (prompt + output cap) once the prompt was counted.
    assert await harness.charged("slow") == EXACT + 7
    rows = await harness.usage_rows("slow")
    assert sum(r.prompt for r in rows) == EXACT


async def test_a_timed_out_attempt_answered_elsewhere_is_charged_its_counted_prompt_and_the_answer(
    encoded: Encoded,
) -> None:
    harness = GatewayHarness([backend("swedencentral", "swedencentral", 1), backend("francecentral", "francecentral", 2)],
                             env={"GATEWAY_MAX_BODY_BYTES": str(8 * 1024 * 1024)})
    try:
        key = harness.consumer("slow", tpm=100_000_000)
        harness.upstream.script("swedencentral", Fail(FailureKind.TIMEOUT))
        completion = await harness.openai(key).chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=7)
        assert completion.usage is not None and completion.usage.prompt_tokens == PROMPT_TOKENS
        assert [s.backend_id for s in harness.upstream.sent] == ["swedencentral", "francecentral"]
        assert await harness.charged("slow") == EXACT + PROMPT_TOKENS + 7
    finally:
        await harness.close()


async def test_a_stream_admitted_on_its_bound_is_charged_as_it_goes_at_the_prompts_lower_bound_then_the_backends_usage(
    encoded: Encoded, monkeypatch: pytest.MonkeyPatch
) -> None:
    harness = GatewayHarness(ONE_REGION, env={"GATEWAY_MAX_BODY_BYTES": str(8 * 1024 * 1024),
                                              "GATEWAY_STREAM_SETTLE_S": "1"})
    progress: list[int] = []
    real = LimitTicket.progress

    def recorded(self: LimitTicket, tokens_so_far: int) -> None:
        progress.append(tokens_so_far)
        real(self, tokens_so_far)

    monkeypatch.setattr(LimitTicket, "progress", recorded)
    try:
        key = harness.consumer("streamer", tpm=100_000_000)
        harness.upstream.script("swedencentral", stream_reply(6, prompt=EXACT))  # a real backend's figure
        gateway = await harness.gateway()
        body = {"model": "gpt-4o", "messages": MESSAGES, "max_tokens": 6, "stream": True}
        response = await gateway.handle(gateway_request("POST", "/v1/chat/completions", key, body))
        assert response.status == 200 and response.stream is not None
        async for _ in response.stream:
            harness.clock.advance(2)  # past the settle interval between every two pieces
        lower = tokens.prompt_lower_bound(BODY)
        # Charged while it ran: the prompt's free lower bound plus what was delivered, never the bound (charges made
        # while a stream runs are not refunded) and no count (the backend's usage came at the end).
        assert progress and all(lower <= charged <= lower + 6 for charged in progress)
        assert encoded.chars < 1_000
        assert await harness.charged("streamer") == EXACT + 6
    finally:
        await harness.close()
