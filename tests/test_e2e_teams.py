"""Teams and end users end to end: openai SDK -> several gateway processes -> the Azurite ledger. Every level a request
belongs to holds across processes; a refusal names the level."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from shared.records.consumers import UserLimits
from tests.conftest import unique
from tests.e2e import GatewayFactory, Stack, wait_for

pytestmark = pytest.mark.e2e
MESSAGES = [{"role": "user", "content": "Tell me a story."}]


def client(url: str, key: str, user: str | None = None) -> openai.OpenAI:
    headers = {"x-gateway-user": user} if user else None
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, default_headers=headers)


def hammer(clients: list[openai.OpenAI], rounds: int, seconds: float = 8.0) -> tuple[list[int], list[str]]:
    """Each client from its own thread, at most `rounds` requests each for at most `seconds`, coming back 0.1 s after a
    429 as real clients do (a client that gives up after a fixed count burns it in a second of refusals while other
    processes' leases still hold the rest of the minute: test_e2e_limits); what was consumed, and the scopes that
    refused."""
    spent: list[int] = []
    scopes: list[str] = []
    deadline = time.monotonic() + seconds

    def worker(c: openai.OpenAI) -> None:
        for _ in range(rounds):
            if time.monotonic() > deadline:
                return
            try:
                raw = c.chat.completions.with_raw_response.create(model="gpt-4o", messages=MESSAGES, max_tokens=10)
            except openai.RateLimitError as error:
                scopes.append(error.response.headers.get("x-gateway-limit-scope", ""))
                time.sleep(0.1)
                continue
            spent.append(int(raw.headers["x-gateway-tokens-consumed"]))

    with ThreadPoolExecutor(len(clients)) as pool:
        list(pool.map(worker, clients))
    return spent, scopes


@pytest.fixture(scope="module")
def gateways(module_gateways: GatewayFactory) -> list[str]:
    """Three instances, configured as such, for both tests (each with a team and consumers of its own)."""
    return [g.url for g in module_gateways.several(3, {"GATEWAY_INSTANCE_COUNT": "3"})]


def test_two_consumers_of_a_team_together_hold_the_teams_minute_across_processes(e2e: Stack, gateways: list[str]) -> None:
    team = unique("team")
    e2e.put_team(team, tpm=3000)
    first, second = unique("first"), unique("second")
    keys = [e2e.create_consumer(first, tpm=100_000, team=team), e2e.create_consumer(second, tpm=100_000, team=team)]
    wait_for(lambda: client(gateways[2], keys[1]).models.list() is not None, timeout_s=5)
    clients = [client(gateways[n % 3], keys[n % 2]) for n in range(6)]
    spent, scopes = hammer(clients, 400)
    assert scopes and set(scopes) == {"team"}
    assert sum(spent) <= 3000, sum(spent)
    assert sum(spent) >= 0.9 * 3000, sum(spent)  # what the last leases hold is left: 2,992 in three runs
    assert e2e.window(f"team|{team}") <= 3000
    assert e2e.charged(first) + e2e.charged(second) == e2e.window(f"team|{team}")


def test_one_end_user_at_its_limit_another_served_and_the_consumers_limit_holds_across_processes(
    e2e: Stack, gateways: list[str]
) -> None:
    consumer = unique("chat")
    key = e2e.create_consumer(consumer, tpm=2400, users=UserLimits(tokens_per_minute=1000, sources=("header",)))
    busy = [client(gateways[n % 3], key, "alice") for n in range(3)]
    spent, scopes = hammer(busy, 400)
    assert scopes and set(scopes) == {"user"}
    assert sum(spent) <= 1000, sum(spent)
    assert sum(spent) >= 0.9 * 1000, sum(spent)  # three processes' shares, each filled in turn: 990 in three runs
    bob = client(gateways[0], key, "bob")
    assert bob.chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=10).usage is not None
    # Many end users, each well within its own 1,000: together they stop at the consumer's 2,400.
    crowd = [client(gateways[n % 3], key, f"user-{n}") for n in range(6)]
    more, scopes = hammer(crowd, 400, seconds=5.0)
    assert "consumer" in scopes
    assert e2e.charged(consumer) <= 2400
