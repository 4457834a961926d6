"""Hostile and long requests end to end (issue 13): reservations that count every choice, bad JSON, backends that
refuse the gateway's credential, and Retry-After that is never shorter than what the regions said."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import httpx
import openai
import pytest

from shared.flow.tokens import count_chat_prompt, encoding_for
from tests.conftest import unique
from tests.e2e import Stack, wait_for
from tools import stack

pytestmark = pytest.mark.e2e
MINI = "gpt-4o-mini"
MESSAGES = [{"role": "user", "content": "Say something."}]


def client(url: str, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0)


def own_regions(e2e: Stack, **options: object) -> list[stack.Region]:
    tag = unique("hostile")
    return [stack.Region(f"{tag}-{sim.region.id}", sim.region.region, sim.region.port, priority=sim.region.priority,
                         **options) for sim in e2e.simulators]  # type: ignore[arg-type]


def backend_requests(e2e: Stack) -> int:
    return sum(sim.stats()["requests"] for sim in e2e.simulators)


# ---- reservations -------------------------------------------------------------------------------------------------


def test_n_choices_without_max_tokens_are_reserved_for_every_choice(fresh_sims: Stack) -> None:
    e2e = fresh_sims
    # The default completion reservation is 1024 tokens; four choices need more than this key's whole minute.
    key = e2e.create_consumer(unique("n-choices"), tpm=4000)
    c = client(e2e.url, key)
    with pytest.raises(openai.RateLimitError) as refused:
        c.chat.completions.create(model=MINI, messages=MESSAGES, n=4)
    assert refused.value.code == "tokens_exceed_limit"
    with pytest.raises(openai.RateLimitError):
        c.chat.completions.create(model=MINI, messages=MESSAGES, n=3, max_tokens=1500)
    assert backend_requests(e2e) == 0
    # One choice fits, and is served.
    assert c.chat.completions.create(model=MINI, messages=MESSAGES, max_tokens=20).choices


def test_both_output_caps_are_refused_before_admission(fresh_sims: Stack) -> None:
    e2e = fresh_sims
    key = e2e.create_consumer(unique("both-caps"), tpm=100_000)
    with pytest.raises(openai.BadRequestError) as refused:
        client(e2e.url, key).chat.completions.create(
            model=MINI, messages=MESSAGES, max_completion_tokens=10, max_tokens=90_000
        )
    assert refused.value.code == "invalid_parameter_combination"
    assert backend_requests(e2e) == 0


# ---- bad JSON -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("depth", [100, 1_000])
def test_deeply_nested_json_is_400_and_the_stream_is_never_started(fresh_sims: Stack, depth: int) -> None:
    e2e = fresh_sims
    key = e2e.create_consumer(unique("deep"), tpm=100_000)
    nested = "[" * depth + "]" * depth
    for stream in ("false", "true"):
        raw = (f'{{"model":"{MINI}","stream":{stream},"messages":[{{"role":"user","content":"x"}}],'
               f'"tools":[{{"type":"function","function":{{"name":"f","parameters":{{"properties":{{"a":{{"items":{nested}}}}}}}}}}}]}}')
        response = httpx.post(e2e.url + "/v1/chat/completions", content=raw.encode(),
                              headers={"api-key": key, "content-type": "application/json"}, timeout=30)
        assert response.status_code == 400, response.text[:200]
        assert response.json()["error"]["code"] == "invalid_json"
    assert backend_requests(e2e) == 0


def test_a_repeated_key_is_400_so_no_backend_reads_another_request(fresh_sims: Stack) -> None:
    e2e = fresh_sims
    key = e2e.create_consumer(unique("dupkey"), tpm=2000)
    # Admitted at max_tokens 10 by a last-key reader, generated at 100000 by a first-key reader.
    raw = (f'{{"model":"{MINI}","max_tokens":100000,"messages":[{{"role":"user","content":"x"}}],"max_tokens":10}}').encode()
    response = httpx.post(e2e.url + "/v1/chat/completions", content=raw,
                          headers={"api-key": key, "content-type": "application/json"}, timeout=30)
    assert response.status_code == 400
    assert response.json()["error"] == {
        "message": response.json()["error"]["message"], "type": "invalid_request_error", "param": None,
        "code": "duplicate_key",
    }
    assert backend_requests(e2e) == 0


# ---- backends that refuse the gateway -----------------------------------------------------------------------------


@pytest.mark.parametrize("status", ["401", "403"])
def test_a_backend_refusing_the_gateways_credential_is_taken_out_and_failed_over(
    fresh_sims: Stack, gateway_factory: Callable[..., stack.Child], status: str
) -> None:
    e2e = fresh_sims
    regions = own_regions(e2e)
    gateway = gateway_factory(regions=regions)
    key = e2e.create_consumer(unique("auth-fail"), tpm=1_000_000)
    ptu = e2e.simulators[0]
    ptu.fault(status, count=-1, deployment=MINI)
    c = client(gateway.url, key)
    for _ in range(5):
        raw = c.chat.completions.with_raw_response.create(model=MINI, messages=MESSAGES, max_tokens=5)
        assert raw.headers["x-gateway-backend"] != regions[0].id
    # Out after its first refusal: later requests went straight to the others.
    assert ptu.stats()["by_status"].get(status) == 1
    health = httpx.get(gateway.url + "/health/details", headers=stack.ADMIN_HEADERS).json()
    first = next(b for b in health["backends"] if b["id"] == regions[0].id)
    assert first["deployments"][MINI]["state"] == "open" and first["deployments"][MINI]["reason"] == status
    assert first["deployments"][MINI]["recovers_in_s"] > 50
    log = gateway.log()
    assert regions[0].id in log and "credential" in log
    assert stack.SIM_API_KEY not in log


def test_every_backend_refusing_the_gateway_is_502_backend_auth_failed(
    fresh_sims: Stack, gateway_factory: Callable[..., stack.Child]
) -> None:
    e2e = fresh_sims
    gateway = gateway_factory(regions=own_regions(e2e))
    key = e2e.create_consumer(unique("auth-all"), tpm=1_000_000)
    for sim in e2e.simulators:
        sim.fault("401", count=-1, deployment=MINI)
    with pytest.raises(openai.APIStatusError) as failed:
        client(gateway.url, key).chat.completions.create(model=MINI, messages=MESSAGES, max_tokens=5)
    assert failed.value.status_code == 502 and failed.value.code == "backend_auth_failed"


# ---- Retry-After ----------------------------------------------------------------------------------------------------


def test_retry_after_is_never_shorter_than_what_the_regions_said(
    fresh_sims: Stack, gateway_factory: Callable[..., stack.Child]
) -> None:
    e2e = fresh_sims
    # Breakers that need three failures to trip: a single 429 leaves them closed, so only the regions' own
    # Retry-After (2.5 s) says when they serve again.
    gateway = gateway_factory(regions=own_regions(e2e, breaker={"failures": 3}))
    key = e2e.create_consumer(unique("retry-after"), tpm=1_000_000)
    for sim in e2e.simulators:
        sim.fault("429", count=1, deployment=MINI, delay_s=2.5)
    with pytest.raises(openai.RateLimitError) as refused:
        client(gateway.url, key).chat.completions.create(model=MINI, messages=MESSAGES, max_tokens=5)
    headers = refused.value.response.headers
    assert refused.value.code == "backends_busy"
    assert int(headers["retry-after"]) == 3
    assert 2_000 < int(headers["retry-after-ms"]) <= 2_500


# ---- streams and older clients --------------------------------------------------------------------------------------


def azure_client(url: str, key: str, api_version: str) -> openai.AzureOpenAI:
    return openai.AzureOpenAI(azure_endpoint=url, api_key=key, api_version=api_version, max_retries=0)


def rows_total(e2e: Stack, consumer: str) -> tuple[int, int]:
    rows = e2e.usage_rows(consumer)
    return sum(r.total for r in rows), sum(r.counted for r in rows)


def test_a_client_pinned_to_an_old_api_version_can_stream_and_is_charged_what_it_was_served(fresh_sims: Stack) -> None:
    e2e = fresh_sims
    consumer = unique("old-version")
    key = e2e.create_consumer(consumer, tpm=100_000)
    stream = azure_client(e2e.url, key, "2024-06-01").chat.completions.create(
        model=MINI, messages=MESSAGES, stream=True, max_tokens=20
    )
    words = [chunk.choices[0].delta.content for chunk in stream if chunk.choices and chunk.choices[0].delta.content]
    assert len(words) == 20
    sent = [r for sim in e2e.simulators for r in sim.requests() if r["body"] and r["body"].get("stream")]
    assert sent and all("stream_options" not in r["body"] for r in sent)
    prompt = count_chat_prompt({"messages": MESSAGES}, encoding_for("gpt-4o-mini"))
    # No backend reported this stream's usage: the gateway counted it, and the books say so.
    wait_for(lambda: rows_total(e2e, consumer) == (prompt + 20, prompt + 20), timeout_s=20)


def test_a_client_that_asked_for_usage_gets_it_when_the_backend_sends_none(fresh_sims: Stack) -> None:
    e2e = fresh_sims
    consumer = unique("synth-usage")
    key = e2e.create_consumer(consumer, tpm=100_000)
    for sim in e2e.simulators:
        sim.fault("no-usage", count=-1, deployment=MINI)
    stream = client(e2e.url, key).chat.completions.create(
        model=MINI, messages=MESSAGES, stream=True, max_tokens=15, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    prompt = count_chat_prompt({"messages": MESSAGES}, encoding_for("gpt-4o-mini"))
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (prompt, 15)
    wait_for(lambda: rows_total(e2e, consumer) == (prompt + 15, prompt + 15), timeout_s=20)


@pytest.fixture(scope="module")
def long_region() -> Iterator[stack.Region]:
    """A region whose generations run long when no max_tokens is set: 3,000 tokens at 2 ms each."""
    region = stack.Region(unique("long"), "westus", stack.free_port(), completion_tokens=3_000)
    sim = stack.start_simulator(region, latency_ms=5, token_latency_ms=2)
    yield region
    sim.stop()


def test_an_abandoned_stream_is_charged_what_the_backend_reports_after_a_short_drain(
    e2e: Stack, gateway_factory: Callable[..., stack.Child], long_region: stack.Region
) -> None:
    gateway = gateway_factory(regions=[long_region])
    consumer = unique("abandoned")
    key = e2e.create_consumer(consumer, tpm=1_000_000)
    body = {"model": MINI, "messages": MESSAGES, "stream": True, "max_tokens": 400}
    with httpx.Client(timeout=30) as http, http.stream(
        "POST", gateway.url + "/v1/chat/completions", json=body, headers={"api-key": key}
    ) as response:
        seen = 0
        for line in response.iter_lines():
            seen += line.startswith("data: ")
            if seen >= 5:
                break  # the client leaves ~0.8 s before the backend would finish
    prompt = count_chat_prompt({"messages": MESSAGES}, encoding_for("gpt-4o-mini"))
    # The gateway read the rest unseen, so the backend's own figure (all 400 generated) is what was charged.
    wait_for(lambda: rows_total(e2e, consumer) == (prompt + 400, 0), timeout_s=20)


def test_a_long_stream_is_charged_while_it_runs(
    e2e: Stack, gateway_factory: Callable[..., stack.Child], long_region: stack.Region
) -> None:
    gateway = gateway_factory({"GATEWAY_STREAM_SETTLE_S": "0.5"}, regions=[long_region])
    key = e2e.create_consumer(unique("long-stream"), tpm=2_000)
    c = client(gateway.url, key)
    stream = c.chat.completions.create(model=MINI, messages=MESSAGES, stream=True)  # reserved at ~1,050
    received = 0
    refused: openai.APIStatusError | None = None
    for chunk in stream:
        received += bool(chunk.choices and chunk.choices[0].delta.content)
        if received == 2_600:
            # More than the whole minute has been delivered already: the window knows it while the stream runs.
            try:
                c.chat.completions.create(model=MINI, messages=MESSAGES, max_tokens=5)
            except openai.APIStatusError as error:
                refused = error
    assert received == 3_000
    assert refused is not None and refused.status_code == 429 and refused.code == "rate_limit_exceeded"


# ---- one caller must not take a region out ---------------------------------------------------------------------------


def test_one_callers_timeouts_are_replayed_once_charged_and_take_no_region_out(
    fresh_sims: Stack, gateway_factory: Callable[..., stack.Child]
) -> None:
    e2e = fresh_sims
    regions = own_regions(e2e, timeout_s=1.0)
    gateway = gateway_factory(regions=regions)
    consumer = unique("slow-caller")
    key = e2e.create_consumer(consumer, tpm=100_000)
    for sim in e2e.simulators:
        sim.fault("timeout", count=-1, deployment=MINI, delay_s=2.5)
    c = client(gateway.url, key)
    for _ in range(2):
        with pytest.raises(openai.APIStatusError) as failed:
            c.chat.completions.create(model=MINI, messages=MESSAGES, max_tokens=50)
        assert failed.value.status_code == 504 and failed.value.code == "backend_timeout"
    # Each request reached two backends (itself and one replay), never all three.
    assert backend_requests(e2e) == 4
    health = httpx.get(gateway.url + "/health/details", headers=stack.ADMIN_HEADERS).json()
    assert all(b["deployments"][MINI]["state"] == "closed" for b in health["backends"]), health
    for sim in e2e.simulators:
        sim.control("DELETE", "faults")
    # What each request was charged (its prompt and the 50 it may still be generating) is not refunded.
    prompt = count_chat_prompt({"messages": MESSAGES}, encoding_for("gpt-4o-mini"))
    assert e2e.charged(consumer) == 2 * (prompt + 50)


# ---- the opt-in output cap ------------------------------------------------------------------------------------------


def last_body(region: stack.Region) -> dict[str, object]:
    seen = httpx.get(f"http://127.0.0.1:{region.port}/_sim/requests?limit=1", timeout=10).json()
    body: dict[str, object] = seen[-1]["body"]
    return body


def test_the_output_cap_bounds_every_request_by_its_reservation(
    e2e: Stack, gateway_factory: Callable[..., stack.Child], long_region: stack.Region
) -> None:
    gateway = gateway_factory({"GATEWAY_OUTPUT_CAP": "true"}, regions=[long_region])
    consumer = unique("capped")
    c = client(gateway.url, e2e.create_consumer(consumer, tpm=10_000))
    # No cap asked: the gateway's reservation default (1,024) is sent as the cap, and the answer stays inside it.
    raw = c.chat.completions.with_raw_response.create(model=MINI, messages=MESSAGES)
    answer = raw.parse()
    assert answer.usage is not None and answer.usage.completion_tokens == 1024
    assert answer.choices[0].finish_reason == "length"
    assert last_body(long_region)["max_completion_tokens"] == 1024 and "max_tokens" not in last_body(long_region)
    # More asked than the key has in a minute: lowered to what fits, in the field the client used, instead of refused.
    prompt = count_chat_prompt({"messages": MESSAGES}, encoding_for("gpt-4o-mini"))
    c = client(gateway.url, e2e.create_consumer(unique("capped-n"), tpm=10_000))
    c.chat.completions.create(model=MINI, messages=MESSAGES, max_tokens=50_000, n=2)
    assert last_body(long_region)["max_tokens"] == (10_000 - prompt) // 2
    # A consumer set to opt out is not capped: its long generation runs to the backend's own end.
    free = unique("uncapped")
    key = e2e.create_consumer(free, tpm=100_000)
    e2e.update_consumer(free, limits={"output_cap": False})
    wait_for(lambda: (client(gateway.url, key).chat.completions.create(model=MINI, messages=MESSAGES).usage
                      .completion_tokens == 3_000), timeout_s=10)  # type: ignore[union-attr]
    assert "max_completion_tokens" not in last_body(long_region)


def test_without_the_output_cap_a_request_asking_more_than_the_minute_is_refused(
    e2e: Stack, gateway_factory: Callable[..., stack.Child], long_region: stack.Region
) -> None:
    gateway = gateway_factory(regions=[long_region])
    c = client(gateway.url, e2e.create_consumer(unique("not-capped"), tpm=10_000))
    with pytest.raises(openai.RateLimitError) as refused:
        c.chat.completions.create(model=MINI, messages=MESSAGES, max_tokens=50_000)
    assert refused.value.code == "tokens_exceed_limit"


def test_a_client_that_asked_for_usage_gets_it_when_the_backend_ends_with_a_bare_done(fresh_sims: Stack) -> None:
    """Microsoft's aoai-api-simulator ends a stream with `[DONE]` alone and sends no usage: the client still gets its
    usage chunk and a clean end."""
    e2e = fresh_sims
    consumer = unique("bare-done")
    key = e2e.create_consumer(consumer, tpm=100_000)
    for sim in e2e.simulators:
        sim.fault("bare-done", count=-1, deployment=MINI)
    chunks = list(client(e2e.url, key).chat.completions.create(
        model=MINI, messages=MESSAGES, stream=True, max_tokens=12, stream_options={"include_usage": True}
    ))
    prompt = count_chat_prompt({"messages": MESSAGES}, encoding_for("gpt-4o-mini"))
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (prompt, 12)
    raw = httpx.post(f"{e2e.url}/v1/chat/completions", headers={"api-key": key}, timeout=30, json={
        "model": MINI, "messages": MESSAGES, "stream": True, "max_tokens": 3, "stream_options": {"include_usage": True}})
    assert raw.text.endswith("data: [DONE]\n\n") and "stream_interrupted" not in raw.text
    wait_for(lambda: rows_total(e2e, consumer) == (2 * prompt + 15, 2 * prompt + 15), timeout_s=20)
