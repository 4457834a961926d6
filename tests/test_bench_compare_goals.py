"""bench.compare's hot-path goals: the p99 goal is judged both on the medians' difference and round by round."""

from __future__ import annotations

from typing import Any

from bench.compare import hot_goals, hot_markdown, limiter_share, median_interval, paired_differences


def point(config: str, p99: float, rounds: list[float], cpu: float = 0.5) -> dict[str, Any]:
    return {"config": config, "workload": "chat", "concurrency": 64, "p99_ms": p99, "p99_rounds_ms": rounds,
            "cpu_ms_per_request": cpu}


def p99_goal(points: list[dict[str, Any]]) -> dict[str, Any]:
    goals = hot_goals({"points": points, "extras": {}})
    return next(g for g in goals if g["goal"].startswith("p99"))


def test_round_by_round_differences_skip_rounds_without_a_figure() -> None:
    assert paired_differences([60.0, None, 63.5, 70.0], [58.0, 59.0, 64.0]) == [2.0, -0.5]


def test_met_only_when_the_medians_and_the_rounds_both_say_so() -> None:
    met = p99_goal([point("gateway", 62.0, [61.0, 62.0, 63.0]), point("passthrough-aiohttp", 60.0, [60.0, 60.5, 59.0])])
    assert met["met"] and "round by round +1.5 (median; rounds +1.0, +1.5, +4.0)" in met["measured"]
    # The medians' difference within 3 ms, but the gateway's tail 4+ ms over in every round but one: not met.
    drift = p99_goal([point("gateway", 62.0, [64.0, 62.0, 70.0]), point("passthrough-aiohttp", 60.0, [59.0, 60.0, 65.5])])
    assert not drift["met"] and "rounds +5.0, +2.0, +4.5" in drift["measured"]
    # And the other way round.
    wide = p99_goal([point("gateway", 66.0, [61.0, 66.0, 62.0]), point("passthrough-aiohttp", 60.0, [60.0, 65.0, 60.0])])
    assert not wide["met"]


def test_without_rounds_the_medians_decide() -> None:
    goal = p99_goal([point("gateway", 62.5, []), point("passthrough-aiohttp", 60.0, [])])
    assert goal["met"] and "round by round" not in goal["measured"]


def test_the_limiters_share_compares_the_same_process_called_with_and_without_limits() -> None:
    limited = point("gateway", 65.0, [66.0, 60.0, 64.0], cpu=0.47)
    free = point("gateway-unlimited", 61.0, [61.0, 61.0, 60.5], cpu=0.41)
    text = limiter_share([limited, free, point("passthrough-aiohttp", 62.0, [62.0, 62.0, 62.0])])
    assert "0.47 against 0.41 ms (+0.060)" in text
    assert "p99 65.0 against 61.0 ms (+4.00; round by round +3.50 (rounds +5.0, -1.0, +3.5))" in text
    assert limiter_share([limited]) == ""


def test_the_interval_of_the_median_is_the_sign_tests() -> None:
    # 25 rounds: the 8th smallest to the 8th largest (2 * P(Binomial(25, 1/2) <= 7) = 4.3 % outside, <= 8 would be 10.8 %).
    assert median_interval([float(v) for v in range(25, 0, -1)]) == (8.0, 18.0)
    assert median_interval([3.0, 1.0, 2.0, 5.0, 4.0, 6.0]) == (1.0, 6.0)  # 6 rounds: only min to max reaches 95 %
    assert median_interval([1.0, 2.0, 3.0, 4.0, 5.0]) is None  # 5 rounds cannot: min to max is 93.75 %


def test_many_rounds_carry_the_interval_in_the_p99_goal() -> None:
    gateway = [60.0 + (i % 5) for i in range(25)]
    passthrough = [60.0 + ((i + 2) % 5) for i in range(25)]
    goal = p99_goal([point("gateway", 62.0, gateway), point("passthrough-aiohttp", 62.0, passthrough)])
    assert "(median, 95 % interval -2.0 to +3.0; rounds" in goal["measured"] and goal["met"]


def test_a_run_of_some_points_says_which_in_its_command() -> None:
    rows = [{**point(name, p99, [p99]), "rps": 1000.0, "p50_ms": 52.0, "added_p99_ms": 1.0, "errors": 0}
            for name, p99 in (("gateway", 62.0), ("passthrough-aiohttp", 61.0))]
    results = {"points": rows, "extras": {},
               "seconds": 5, "rounds": 25, "date": "d", "machine": "m", "load_average": 0.1,
               "measured": [["chat", 64]]}
    results["goals"] = hot_goals(results)
    text = hot_markdown(results)
    assert "only chat at 64 clients, over more rounds" in text
    assert "bench.compare --hot --workload chat --concurrency 64 --seconds 5 --rounds 25" in text
