"""The series table behind the token and request metrics: deltas of changed series only, forgetting, collapse order."""

from __future__ import annotations

from shared.telemetry.series import OTHER, SeriesTable

NAMES = ("Subscription ID", "User ID", "Client IP", "Model", "Deployment")


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def table(clock: Clock, max_series: int = 3, idle_s: float = 60.0) -> SeriesTable:
    return SeriesTable(
        NAMES, 2, clock, max_series=max_series, idle_s=idle_s,
        collapse=(("User ID", "Client IP"), ("Model",)), keep=("Subscription ID", "Deployment"),
    )


def test_deltas_are_what_changed_since_the_last_call_and_nothing_else() -> None:
    t = table(Clock())
    t.add(("a", "u", "ip", "m", "d"), (3, 1))
    t.add(("a", "u", "ip", "m", "d"), (2, 0))
    assert t.deltas() == [({"Subscription ID": "a", "User ID": "u", "Client IP": "ip", "Model": "m", "Deployment": "d"}, [5, 1])]
    assert t.deltas() == []
    t.add(("a", "u", "ip", "m", "d"), (0, 4))
    assert [d for _, d in t.deltas()] == [[0, 4]]


def test_collapse_gives_up_user_and_ip_then_model_and_never_the_consumer() -> None:
    t = table(Clock(), max_series=2)
    t.add(("a", "u1", "ip1", "m1", "d"), (1, 0))
    t.add(("a", "u2", "ip2", "m1", "d"), (1, 0))
    t.add(("a", "u3", "ip3", "m1", "d"), (1, 0))  # full: user and address go
    t.add(("b", "u4", "ip4", "m2", "d"), (1, 0))  # full, no level-1 series for b: model goes too
    t.add(("b", "u5", "ip5", "m3", "d"), (1, 0))  # joins b's last-level series
    found = {tuple(d.values()): v[0] for d, v in t.deltas()}
    assert found == {
        ("a", "u1", "ip1", "m1", "d"): 1, ("a", "u2", "ip2", "m1", "d"): 1,
        ("a", OTHER, OTHER, "m1", "d"): 1, ("b", OTHER, OTHER, OTHER, "d"): 2,
    }
    assert t.collapsed == 3


def test_only_idle_and_exported_series_are_forgotten() -> None:
    clock = Clock()
    t = table(clock, max_series=2, idle_s=60)
    t.add(("a", "u1", "", "m", "d"), (1, 0))
    t.deltas()
    t.add(("a", "u2", "", "m", "d"), (1, 0))  # not exported yet
    clock.t = 61
    t.add(("a", "u3", "", "m", "d"), (1, 0))  # u1 is idle and exported: forgotten, u3 gets its own series
    found = {d["User ID"]: v[0] for d, v in t.deltas()}
    assert found == {"u2": 1, "u3": 1}
    assert len(t) == 2
