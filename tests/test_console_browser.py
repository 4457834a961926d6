"""The console in a real browser (Debian's Chromium, headless, through Playwright) on a real gateway listening on
127.0.0.1 (the in-process harness served by uvicorn: tests/browser.py). One browser for the module, a fresh context
(no storage, no cookies) per test. Skipped, with how to enable them, where Chromium or Playwright is missing."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.browser import LiveGateway, chromium, failover, screenshot, sign_in, unavailable
from tests.fakes.gateway import ADMIN_KEY, three_regions
from tests.fakes.upstream import Reply, Sent, default_reply, error_reply

pytestmark = [pytest.mark.e2e, pytest.mark.skipif(unavailable() is not None, reason=unavailable() or "")]


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with chromium() as started:
        yield started


@pytest.fixture(scope="module")
def gateway() -> Iterator[LiveGateway]:
    live = LiveGateway()
    yield live
    live.stop()


class Tab:
    """A page in a fresh context, with everything the browser reported: console errors, uncaught exceptions."""

    def __init__(self, browser: Any, **context: Any) -> None:
        self.context = browser.new_context(**context)
        self.page = self.context.new_page()
        self.errors: list[str] = []
        self.page.on("console", lambda m: self.errors.append(f"{m.text} {m.location.get('url', '')}".strip())
                     if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.errors.append(f"uncaught: {e}"))

    def storage(self) -> dict[str, Any]:
        result: dict[str, Any] = self.page.evaluate(
            "() => ({local: {...localStorage}, session: {...sessionStorage}, url: location.href})")
        return result


@pytest.fixture
def tab(browser: Any) -> Iterator[Tab]:
    opened = Tab(browser)
    yield opened
    opened.context.close()


def create(gateway: LiveGateway, name: str, **fields: Any) -> str:
    """A consumer made through the admin API (as the page makes them); its key."""
    answer = gateway.client.post("/console/api/consumers", headers={"authorization": f"Bearer {ADMIN_KEY}"},
                                 json={"name": name, "deployments": "*", **fields})
    assert answer.status_code == 201, answer.text
    key: str = answer.json()["key"]
    refresh(gateway)
    return key


def refresh(gateway: LiveGateway) -> None:
    """What every instance does within GATEWAY_CONSUMER_CHECK_S (the harness's clock stands still unless moved)."""
    gateway.run(gateway.harness.services.consumers.reload)


def client(gateway: LiveGateway, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=key, max_retries=0, timeout=10)


def ask(gateway: LiveGateway, key: str) -> Any:
    return client(gateway, key).chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])


def test_the_admin_signs_in_and_sees_the_consumers_with_the_key_kept_in_the_tab_only(
        gateway: LiveGateway, tab: Tab) -> None:
    create(gateway, "billing-app", tokens_per_minute=5000)
    sign_in(tab.page, gateway.url, ADMIN_KEY)
    row = tab.page.locator('#consumers tr[data-id="billing-app"]')
    row.wait_for()
    assert "5,000" in row.inner_text()
    assert tab.page.locator("#who").inner_text() == "key:admin (Gateway.Admin)"
    kept = tab.storage()
    assert kept["session"] == {"gateway-admin-key": ADMIN_KEY}
    assert kept["local"] == {} and ADMIN_KEY not in kept["url"] and tab.context.cookies() == []
    assert ADMIN_KEY not in tab.page.content()  # typed into a password field, then cleared
    tab.page.wait_for_selector("#backends td.state-closed")
    assert tab.page.locator("#fallbacks").inner_text() == "None in the last 5 minutes."
    assert tab.errors == []
    tab.page.click("#signout")
    assert tab.storage()["session"] == {} and tab.page.locator("#signin").is_visible()


def test_create_use_watch_rotate_and_disable_a_consumer_from_the_page(gateway: LiveGateway, tab: Tab) -> None:
    """The operator's round: create (the key shown once), call the gateway with it through the openai SDK, see its
    usage, rotate it (the old key stops), disable it (the new one stops)."""
    sign_in(tab.page, gateway.url, ADMIN_KEY)
    tab.page.wait_for_selector("#app:not([hidden])")
    tab.page.fill("#c-name", "Page made")
    tab.page.fill("#c-deployments", "gpt-4o")
    tab.page.click("#create-form button[type=submit]")
    tab.page.locator("#new-key").wait_for()
    key = tab.page.locator("#new-key-value").inner_text()
    assert key.startswith("gw-") and tab.page.locator('#consumers tr[data-id="page-made"]').count() == 1
    refresh(gateway)
    for _ in range(3):
        assert ask(gateway, key).usage is not None
    gateway.run(gateway.harness.usage.flush)
    tab.page.select_option("#period", "hourly")
    tab.page.locator('#usage-chart .bar[data-consumer="page-made"]').wait_for()
    assert "3" in tab.page.locator("#usage tbody tr", has_text="page-made").locator("td").nth(2).inner_text()
    tab.page.reload()  # the key is shown once: a reload (same tab, still signed in) does not show it again
    tab.page.locator('#consumers tr[data-id="page-made"]').wait_for()
    assert key not in tab.page.content() and tab.page.locator("#new-key").is_hidden()

    tab.page.locator('#consumers tr[data-id="page-made"] button.rotate').click()
    tab.page.fill("#r-grace", "0")
    tab.page.click("#rotate-form button[type=submit]")
    tab.page.wait_for_function(f"() => !document.getElementById('new-key').hidden && "
                               f"document.getElementById('new-key-value').textContent !== {key!r}")
    rotated = tab.page.locator("#new-key-value").inner_text()
    refresh(gateway)
    with pytest.raises(openai.AuthenticationError):
        ask(gateway, key)
    assert ask(gateway, rotated).usage is not None

    tab.page.locator('#consumers tr[data-id="page-made"] button.disable').click()
    tab.page.locator('#consumers tr[data-id="page-made"] button.enable').wait_for()
    refresh(gateway)
    with pytest.raises(openai.APIStatusError):
        ask(gateway, rotated)
    actions = tab.page.locator("#audit tbody tr td:nth-child(3)").all_inner_texts()
    assert actions[:3] == ["consumers.disable", "consumers.rotate", "consumers.create"], actions
    assert rotated not in tab.page.locator("#audit").inner_text()
    assert tab.errors == []


def test_a_wrong_key_is_refused_and_not_kept(gateway: LiveGateway, tab: Tab) -> None:
    sign_in(tab.page, gateway.url, "gw-admin-not-the-key")
    tab.page.wait_for_function("() => document.getElementById('signin-error').textContent.length > 0")
    assert "not valid" in tab.page.locator("#signin-error").inner_text()
    assert tab.page.locator("#app").is_hidden()
    assert tab.storage()["session"] == {} and tab.storage()["local"] == {}
    # The browser's only complaint is the refused sign-in itself.
    assert tab.errors and all("401" in e for e in tab.errors), tab.errors


def test_live_traffic_moves_while_requests_flow(gateway: LiveGateway, tab: Tab) -> None:
    key = create(gateway, "traffic-app")
    sign_in(tab.page, gateway.url, ADMIN_KEY)
    ptu = tab.page.locator('#traffic .chart[data-backend="uksouth-ptu"] .total strong')
    ptu.wait_for()
    before = int(ptu.inner_text().split()[0].replace(",", ""))
    for _ in range(7):
        assert ask(gateway, key).usage is not None
    # The page polls every 3 s: within a few polls it shows the seven requests more, on the PTU region's line.
    tab.page.wait_for_function(
        "([selector, expected]) => document.querySelector(selector).textContent.replace(/,/g, '').startsWith(expected)",
        arg=['#traffic .chart[data-backend="uksouth-ptu"] .total strong', f"{before + 7} req"], timeout=15_000)
    points = tab.page.locator('#traffic .chart[data-backend="uksouth-ptu"] polyline').get_attribute("points")
    assert points is not None and len({p.split(",")[1] for p in points.split()}) > 1, "the line rose"
    assert tab.errors == []


def test_a_limit_edited_on_the_page_takes_effect(gateway: LiveGateway, tab: Tab) -> None:
    key = create(gateway, "tight-app")
    assert ask(gateway, key).usage is not None
    sign_in(tab.page, gateway.url, ADMIN_KEY)
    row = tab.page.locator('#consumers tr[data-id="tight-app"]')
    row.locator("button.edit").click()
    assert tab.page.locator("#edit").is_visible()
    tab.page.fill("#e-tpm", "30")
    tab.page.fill("#e-quota", "100000")
    tab.page.select_option("#e-quota-period", "monthly")
    tab.page.select_option("#e-priority", "high")
    tab.page.click("#edit-save")
    tab.page.wait_for_function(
        "() => document.querySelector('#consumers tr[data-id=\"tight-app\"] td.tpm').textContent === '30'")
    assert "100,000 monthly" in row.inner_text() and "high" in row.inner_text()
    assert tab.page.locator("#edit").is_hidden()
    tab.page.wait_for_selector("#audit td:text-is('consumers.set')")
    refresh(gateway)
    with pytest.raises(openai.RateLimitError):
        for _ in range(5):
            ask(gateway, key)
    assert tab.errors == []


def test_a_refused_edit_says_why_and_changes_nothing(gateway: LiveGateway, tab: Tab) -> None:
    create(gateway, "strict-app", tokens_per_minute=100)
    sign_in(tab.page, gateway.url, ADMIN_KEY)
    tab.page.locator('#consumers tr[data-id="strict-app"] button.edit').click()
    tab.page.fill("#e-quota", "500")
    tab.page.select_option("#e-quota-period", "")  # a quota without a period: the API says no, naming the field
    tab.page.click("#edit-save")
    tab.page.wait_for_function("() => document.getElementById('edit-error').textContent.includes('quota_period')")
    assert tab.page.locator("#edit").is_visible()
    consumer = gateway.do(lambda: gateway.harness.consumer_store.consumers["strict-app"])
    assert (consumer.limits.quota, consumer.limits.tokens_per_minute) == (0, 100)


def test_the_policy_holds_in_the_browser(gateway: LiveGateway, tab: Tab) -> None:
    """No inline script runs, and the browser says so: the check for console errors above can see a violation."""
    sign_in(tab.page, gateway.url, ADMIN_KEY)
    tab.page.wait_for_selector("#app:not([hidden])")
    assert tab.errors == []
    with tab.page.expect_console_message(lambda m: "Content Security Policy" in m.text, timeout=10_000):
        tab.page.evaluate("""() => { const s = document.createElement('script'); s.textContent = 'window.injected = 1';
                                     document.body.appendChild(s); }""")
    assert tab.page.evaluate("window.injected") is None
    assert any("Content Security Policy" in e for e in tab.errors), tab.errors


def principal(*roles: str) -> str:
    claims = [{"typ": "name", "val": "reader@example.com"}, *({"typ": "roles", "val": r} for r in roles)]
    return base64.b64encode(json.dumps({"auth_typ": "aad", "claims": claims}).encode()).decode()


def test_a_reader_behind_easy_auth_sees_everything_and_can_change_nothing(browser: Any) -> None:
    """Behind App Service Authentication the page needs no key; the Gateway.Reader role reads and cannot write, in
    the page (its buttons are off) and in the API (a write sent anyway is 403)."""
    gateway = LiveGateway(env={"GATEWAY_CONSOLE_EASY_AUTH": "true"})
    tab = Tab(browser, extra_http_headers={"X-MS-CLIENT-PRINCIPAL": principal("Gateway.Reader")})
    try:
        create(gateway, "read-only-app", tokens_per_minute=70)
        tab.page.goto(f"{gateway.url}/console")
        row = tab.page.locator('#consumers tr[data-id="read-only-app"]')
        row.wait_for()
        assert tab.page.locator("#who").inner_text() == "easyauth:reader@example.com (Gateway.Reader)"
        assert tab.page.locator("#signin").is_hidden() and tab.page.locator("#signout").is_hidden()
        for name in ("edit", "rotate", "disable"):
            assert row.locator(f"button.{name}").is_disabled(), name
        assert tab.page.locator("#create-form button").is_disabled()
        refused = tab.page.evaluate("""async () => {
            const r = await fetch('/console/api/consumers/read-only-app', {method: 'PATCH', body: '{"tokens_per_minute": 1}',
                headers: {'content-type': 'application/json', 'x-requested-with': 'gateway-console'}});
            return [r.status, (await r.json()).error.code]; }""")
        assert refused == [403, "read_only"]
        consumer = gateway.do(lambda: gateway.harness.consumer_store.consumers["read-only-app"])
        assert consumer.limits.tokens_per_minute == 70
        assert [e for e in tab.errors if "403" not in e] == []
        assert tab.storage()["session"] == {} and tab.storage()["local"] == {}

        # An admin signed in the same way changes it from the page (whose calls carry the header a cross-site form
        # could not: tests/test_console_api.py).
        admin = Tab(browser, extra_http_headers={"X-MS-CLIENT-PRINCIPAL": principal("Gateway.Admin")})
        admin.page.goto(f"{gateway.url}/console")
        admin.page.locator('#consumers tr[data-id="read-only-app"] button.edit').click()
        admin.page.fill("#e-tpm", "90")
        admin.page.click("#edit-save")
        admin.page.wait_for_function(
            "() => document.querySelector('#consumers tr[data-id=\"read-only-app\"] td.tpm').textContent === '90'")
        assert admin.errors == []
        admin.context.close()
    finally:
        tab.context.close()
        gateway.stop()


def test_model_fallbacks_per_deployment_show_over_time(browser: Any) -> None:
    """Every region of gpt-4o answers 429: its requests go to gpt-4o-mini (GATEWAY_DEPLOYMENTS), and the page's model
    fallbacks view draws them on gpt-4o's line."""
    gateway = LiveGateway(env={"GATEWAY_DEPLOYMENTS": json.dumps({"gpt-4o": {"fallback": ["gpt-4o-mini"]}})})
    tab = Tab(browser)
    try:
        key = create(gateway, "chain-app")
        gateway.do(lambda: setattr(gateway.harness.upstream, "_default", busy_gpt4o))
        for round_ in range(3):
            for _ in range(round_ + 1):
                answer = client(gateway, key).chat.completions.with_raw_response.create(
                    model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
                assert answer.headers["x-gateway-deployment"] == "gpt-4o-mini"
            gateway.advance(11)
        sign_in(tab.page, gateway.url, ADMIN_KEY)
        row = tab.page.locator('#fallbacks .chart[data-deployment="gpt-4o"]')
        row.wait_for()
        assert row.locator(".total strong").inner_text() == "6 fallbacks"
        points = row.locator("polyline").get_attribute("points")
        assert points is not None and len({p.split(",")[1] for p in points.split()}) == 4  # 0, 1, 2 and 3 a bucket
        assert tab.errors == []
    finally:
        tab.context.close()
        gateway.stop()


def test_a_ptus_capacity_and_the_share_of_it_the_last_minute_used(browser: Any) -> None:
    gateway = LiveGateway(backends=three_regions(ptu_tokens_per_minute={"gpt-4o": 6000}))
    tab = Tab(browser)
    try:
        key = create(gateway, "ptu-app")
        for _ in range(20):
            assert ask(gateway, key).usage is not None
        for _ in range(5):  # the same PTU serves embeddings too: they do not count against gpt-4o's capacity
            assert client(gateway, key).embeddings.create(model="text-embedding-3-small", input="hi").usage is not None
        traffic = gateway.client.get("/console/api/traffic?minutes=1", headers={"authorization": f"Bearer {ADMIN_KEY}"})
        ptu = next(b for b in traffic.json()["backends"] if b["id"] == "uksouth-ptu")
        used = sum(ptu["deployment_tokens"]["gpt-4o"][-6:])
        assert 0 < used < sum(ptu["tokens"][-6:])
        sign_in(tab.page, gateway.url, ADMIN_KEY)
        cell = tab.page.locator("#backends tr", has_text="uksouth-ptu").filter(has_text="gpt-4o ").first.locator(
            "td.capacity")
        tab.page.wait_for_function("() => [...document.querySelectorAll('#backends td.capacity')].some("
                                   "(td) => td.textContent.includes('used last minute'))")
        text = cell.inner_text()
        assert text.startswith("stated 6,000 TPM · ") and f"{round(100 * used / 6000)}% used last minute" in text, text
        assert "{" not in text  # words, not the API's JSON
        assert tab.errors == []
    finally:
        tab.context.close()
        gateway.stop()


def busy_gpt4o(sent: Sent) -> Reply:
    return error_reply(429, {"retry-after": "1"}) if "/deployments/gpt-4o/" in sent.url else default_reply(sent)


def test_the_failover_picture(browser: Any, tmp_path: Path) -> None:
    """The README's picture, made the way docs/console-failover.png is: the PTU region's line falls as it answers 429
    and the pay-as-you-go regions' lines rise, with the 429s and the failovers marked on the PTU's row."""
    gateway = LiveGateway()
    tab = Tab(browser, viewport={"width": 1100, "height": 800})
    try:
        key = create(gateway, "failover-app")
        failover(gateway, key, buckets=12, per_bucket=6)
        sign_in(tab.page, gateway.url, ADMIN_KEY)
        tab.page.wait_for_selector('#traffic .chart[data-backend="uksouth-ptu"] .throttle')
        counts = {b: tab.page.locator(f'#traffic .chart[data-backend="{b}"] .total strong').inner_text()
                  for b in ("uksouth-ptu", "swedencentral", "francecentral")}
        assert all(not c.startswith("0 ") for c in counts.values()), counts
        assert tab.page.locator('#traffic .chart[data-backend="uksouth-ptu"] .failover').count() >= 1
        assert tab.page.locator('#traffic .chart[data-backend="swedencentral"] .throttle').count() == 0
        assert tab.errors == []
    finally:
        tab.context.close()
        gateway.stop()
    shot = tmp_path / "failover.png"
    screenshot(shot, browser)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000
