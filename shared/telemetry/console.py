"""One line per request on the console, for running locally (`GATEWAY_CONSOLE_LOG`, on in scripts/run).

    12:04:31  200  demo              gpt-4o                  swedencentral     1 try    52 tok (12+40)            USD 0.000430       812 ms
    12:04:32  429  demo              gpt-4o                  -                 0 tries  -                                               3 ms  rate_limit_exceeded

Built from the same RequestRecord the metrics and the per-request log get, so the three cannot disagree; a record
is formatted in microseconds and written with one call. Nothing a caller chose is printed unvalidated: the consumer
is an id the gateway issued (or empty) and the deployment is empty unless it is a configured one (the flow
guarantees both), and every field is cut to its column.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

from shared.records.prices import PriceTable
from shared.telemetry.protocol import ForwardingTelemetry, RequestRecord, Telemetry, Trace


def _cut(text: str, width: int) -> str:
    text = "".join(c if c.isprintable() else "?" for c in text) or "-"
    return text if len(text) <= width else text[: width - 1] + "~"


def format_line(record: RequestRecord, prices: PriceTable, now_s: float) -> str:
    """One request as one line: time, status, consumer, deployment, backend, attempts, tokens, cost, duration, and
    the refusal's reason when the gateway answered itself."""
    usage = record.usage
    tries = f"{record.attempts} {'try' if record.attempts == 1 else 'tries'}"
    if record.saved is not None:
        tokens = f"cache hit, {record.saved.total} tok saved"
    elif usage is not None:
        source = "" if usage.reported else " counted"
        tokens = f"{usage.total} tok ({usage.prompt}+{usage.completion}){source}"
    else:
        tokens = "-"
    cost = prices.cost(record.deployment, record.ptu, usage) if usage is not None else 0.0
    if usage is None or not prices.priced(record.deployment):
        money = ""  # no cost rather than a false 0
    elif record.ptu:
        money = "PTU (hourly)"  # 0 at the margin: the capacity is paid by the hour
    else:
        money = f"{prices.currency} {cost:.6f}"
    columns = (
        time.strftime("%H:%M:%S", time.localtime(now_s)), f"{record.status:>3}", f"{_cut(record.consumer_id, 16):<16}",
        f"{_cut(record.deployment, 22):<22}", f"{_cut(record.backend_id, 16):<16}", f"{tries:<7}", f"{tokens:<24}",
        f"{money:<14}", f"{record.duration_ms:>6.0f} ms",
    )
    line = "  ".join(columns)
    if record.reason:
        line += f"  {_cut(record.reason, 40)}"
    if record.step:  # the name asked passed the checks: a configured deployment or alias
        line += f"  fallback {record.step} from {_cut(record.requested, 40)}"
    return line.rstrip()


class ConsoleTelemetry(ForwardingTelemetry):
    """The flow's telemetry, with each finished request also written as one console line."""

    def __init__(self, inner: Telemetry, prices: PriceTable, write: Callable[[str], object] | None = None,
                 now: Callable[[], float] = time.time) -> None:
        super().__init__(inner)
        self._prices = prices
        self._write = write or _stdout
        self._now = now

    def request_done(self, record: RequestRecord, trace: Trace | None = None) -> None:
        self._inner.request_done(record, trace)
        try:
            self._write(format_line(record, self._prices, self._now()))
        except (OSError, ValueError):  # a closed console never fails a request
            pass


def _stdout(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()
