"""bench.soak's report: bursts of 503 grouped and explained, and its part of docs/reliability.md replaced in place."""

from __future__ import annotations

from pathlib import Path

from bench.soak import explain_bursts, write_report

HEALTH = [
    [99.0, {"backends": [{"id": "ptu", "deployments": {"gpt-4o": {"state": "closed"}}}]}],
    [104.8, {"backends": [{"id": "ptu", "deployments": {"gpt-4o": {"state": "open", "reason": "429"},
                                                         "gpt-4o-mini": {"state": "closed"}}}]}],
]


def test_503s_are_grouped_into_bursts_each_with_the_state_just_before_and_the_faults_before_it() -> None:
    unavailable = [(105.0, "chat"), (105.4, "stream"), (106.3, "chat"), (140.0, "embed")]
    faults = [[50.0, "500", "sweden"], [104.0, "429-huge", "ptu"]]
    table = explain_bursts(unavailable, HEALTH, faults, started=100.0)
    assert [(b["at_s"], b["answers"], b["duration_s"], b["loads"]) for b in table] == [
        (5.0, 3, 1.3, {"chat": 2, "stream": 1}), (40.0, 1, 0.0, {"embed": 1})]
    assert table[0]["regions_before"] == {"ptu": "gpt-4o open (429)"}
    assert table[0]["faults_before"] == ["500 on sweden at -50.0 s", "429-huge on ptu at 4.0 s"]
    assert table[1]["faults_before"] == ["429-huge on ptu at 4.0 s"]  # the 500 was more than 60 s before


def test_the_report_replaces_only_the_soaks_part_of_the_page(tmp_path: Path) -> None:
    page = tmp_path / "reliability.md"
    page.write_text("# Reliability\n\nold figures\n\n## In the test suite\n\nold\n\n## Hostile input (issue 13)\n\nkept\n")
    write_report(page, "# Reliability\n\nnew figures\n\n## In the test suite\n\nnew\n")
    text = page.read_text()
    assert "old" not in text and "new figures" in text and text.endswith("## Hostile input (issue 13)\n\nkept\n")
    fresh = tmp_path / "none.md"
    write_report(fresh, "# Reliability\n")
    assert fresh.read_text() == "# Reliability\n"
