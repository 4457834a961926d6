"""Teams and end users through the whole request flow, in-process (the official SDK as the client): a request is
admitted only if every level it belongs to has room, and a refusal says which level refused."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from shared.records.consumers import UserLimits
from tests.fakes.gateway import GatewayHarness, backend

CHAT = "/v1/chat/completions"
MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Hello"}]
BODY = {"model": "gpt-4o", "messages": MESSAGES, "max_tokens": 50}


def scope_of(response: httpx.Response) -> str:
    return response.headers.get("x-gateway-limit-scope", "")


async def test_two_consumers_of_a_team_share_its_minute_and_the_refusal_names_the_team(harness: GatewayHarness) -> None:
    harness.team("search", tpm=300)
    first = harness.consumer("first", tpm=100_000, team="search")
    second = harness.consumer("second", tpm=100_000, team="search")
    outsider = harness.consumer("outsider", tpm=100_000)
    answers = [await harness.post(CHAT, key, BODY) for key in (first, second) * 4]
    statuses = [a.status_code for a in answers]
    assert statuses.count(200) >= 2 and statuses[-1] == 429
    refused = answers[-1]
    assert refused.json()["error"]["code"] == "rate_limit_exceeded" and scope_of(refused) == "team"
    assert "team" in refused.json()["error"]["message"]
    assert 1 <= int(refused.headers["retry-after"]) <= 61
    assert (await harness.post(CHAT, outsider, BODY)).status_code == 200
    assert await harness.charged("team|search") <= 300
    assert await harness.charged("first") + await harness.charged("second") == await harness.charged("team|search")


async def test_a_members_deployments_and_priority_are_narrowed_by_its_team(harness: GatewayHarness) -> None:
    harness.team("embedders", deployments=["text-embedding-3-small"])
    key = harness.consumer("bot", team="embedders")
    response = await harness.post(CHAT, key, BODY)
    assert response.status_code in (403, 404) and harness.upstream.sent == []
    models = (await harness.http.get("/v1/models", headers={"api-key": key})).json()
    assert [m["id"] for m in models["data"]] == ["text-embedding-3-small"]


async def test_a_teams_quota_is_403_naming_the_team(harness: GatewayHarness) -> None:
    harness.team("search", quota=200, quota_period="daily")
    key = harness.consumer("bot", team="search")
    statuses = [(await harness.post(CHAT, key, BODY)).status_code for _ in range(6)]
    assert statuses[0] == 200 and statuses[-1] == 403
    refused = await harness.post(CHAT, key, BODY)
    assert refused.json()["error"]["code"] == "quota_exceeded" and scope_of(refused) == "team"


PRICES = json.dumps({"currency": "EUR", "deployments": {"gpt-4o": {"input": 2.5, "output": 10}}})


@pytest.fixture
async def priced() -> AsyncIterator[GatewayHarness]:
    harness = GatewayHarness([backend("swedencentral", "swedencentral", 1)], env={"GATEWAY_PRICES": PRICES})
    yield harness
    await harness.close()


async def test_a_teams_budget_is_spent_by_all_its_members_and_refuses_each_with_403_naming_the_team(
    priced: GatewayHarness
) -> None:
    priced.team("search", budget=0.001)
    first, second = priced.consumer("first", team="search"), priced.consumer("second", team="search")
    refused: openai.PermissionDeniedError | None = None
    for n in range(60):
        try:
            await priced.openai(first if n % 2 else second).chat.completions.create(
                model="gpt-4o", messages=MESSAGES, max_tokens=20)
        except openai.PermissionDeniedError as error:
            refused = error
            break
    assert refused is not None and refused.response.headers["x-gateway-limit-scope"] == "team"
    assert isinstance(refused.body, dict) and refused.body["code"] == "budget_exceeded"
    assert n >= 2  # both members spent it
    assert priced.budgets.spent("team|search") >= 0.001
    for key in (first, second):
        with pytest.raises(openai.PermissionDeniedError):
            await priced.openai(key).chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=20)


# ---- end users -------------------------------------------------------------------------------------------------------


def chat(user: str | None = None) -> dict[str, object]:
    return {**BODY, **({"user": user} if user is not None else {})}


async def test_one_end_user_at_its_limit_is_refused_while_another_is_served_and_the_consumers_limit_still_holds(
    harness: GatewayHarness,
) -> None:
    key = harness.consumer("chat-app", tpm=700, users=UserLimits(tokens_per_minute=250))
    alice = [await harness.post(CHAT, key, chat("alice@example.com")) for _ in range(8)]
    assert [a.status_code for a in alice][:2] == [200, 200] and alice[-1].status_code == 429
    assert scope_of(alice[-1]) == "user" and "end user" in alice[-1].json()["error"]["message"]
    assert 1 <= int(alice[-1].headers["retry-after"]) <= 61
    assert (await harness.post(CHAT, key, chat("bob@example.com"))).status_code == 200  # bob has his own minute
    # More end users: each within its own allowance, together stopped by the consumer's 700.
    statuses = [(await harness.post(CHAT, key, chat(f"user-{n}"))).status_code for n in range(14)]
    refused = [s for s in statuses if s != 200]
    assert refused and set(refused) == {429}
    last = await harness.post(CHAT, key, chat("someone-new"))
    assert last.status_code == 429 and scope_of(last) == "consumer"
    assert await harness.charged("chat-app") <= 700
    # Table Storage holds no end-user id: the end users' limit is this instance's declared share in the consumer's
    # ledger, and the end users' windows are local.
    stored = json.dumps(harness.ledgers.ledgers)
    assert "alice" not in stored and "bob" not in stored and "user-1" not in stored
    shares = json.loads(harness.ledgers.ledgers["chat-app"][0]["user_shares"])
    assert shares and all(share <= 250 for share, _ in shares.values())


async def test_the_end_user_comes_from_the_consumers_sources_in_order_and_may_be_required(
    harness: GatewayHarness,
) -> None:
    key = harness.consumer("strict", users=UserLimits(tokens_per_minute=120, sources=("header",), required=True))
    missing = await harness.post(CHAT, key, chat("alice"))  # the body's user does not count for this consumer
    assert missing.status_code == 400 and missing.json()["error"]["code"] == "user_required"
    assert harness.upstream.sent == []
    too_long = await harness.post(CHAT, key, chat(), headers={"x-gateway-user": "x" * 129})
    assert too_long.status_code == 400 and too_long.json()["error"]["code"] == "invalid_user"
    carol = [await harness.post(CHAT, key, chat(), headers={"x-gateway-user": "carol"}) for _ in range(8)]
    assert carol[0].status_code == 200
    assert carol[-1].status_code == 429 and scope_of(carol[-1]) == "user"
    assert (await harness.post(CHAT, key, chat(), headers={"x-gateway-user": "dave"})).status_code == 200


async def test_embeddings_and_the_responses_api_name_their_end_user_by_the_user_field(harness: GatewayHarness) -> None:
    key = harness.consumer("emb", users=UserLimits(tokens_per_minute=100_000, required=True))
    response = await harness.post("/v1/embeddings", key, {"model": "text-embedding-3-small", "input": "hi", "user": "u1"})
    assert response.status_code == 200
    response = await harness.post("/v1/embeddings", key, {"model": "text-embedding-3-small", "input": "hi"})
    assert response.status_code == 400 and response.json()["error"]["code"] == "user_required"
    response = await harness.post("/v1/responses", key, {"model": "gpt-4o", "input": "hi", "user": "u1",
                                                         "max_output_tokens": 20})
    assert response.status_code == 200
