"""The per-request log: one record per request, like API Management's `ApiManagementGatewayLlmLog`.

Each finished request becomes one Application Insights custom event named `GatewayLlmLog` (table `customEvents`,
`AppEvents` in the workspace): text fields in `customDimensions`, numbers in `customMeasurements` (typed, so sums need
no parsing). Custom events rather than `traces`: they have their own table and name to filter on, numeric
measurements, and nothing else the Functions host or a library logs lands among them. The OpenTelemetry distro does
not sample log records (trace-based sampling for logs stays off), so the log is complete by default;
`GATEWAY_REQUEST_LOG_SAMPLING` keeps a share of requests instead, each kept record then carrying `Sample Weight` so
sums stay unbiased. A record is bounded: fixed fields, identifiers validated or capped, ~1 KB in ingestion.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from shared.records.prices import PriceTable
from shared.telemetry import protocol as names
from shared.telemetry.privacy import Privacy
from shared.telemetry.protocol import RequestRecord

EVENT_NAME = "GatewayLlmLog"
CUSTOM_EVENT = "microsoft.custom_event.name"  # the exporter turns a log record with this attribute into a custom event
MEASUREMENTS = "microsoft.custom_measurements"  # and this mapping into its customMeasurements

# customMeasurements keys
PROMPT = "Prompt Tokens"
COMPLETION = "Completion Tokens"
CACHED = "Cached Tokens"
REASONING = "Reasoning Tokens"
TOTAL = "Total Tokens"
ATTEMPTS = "Attempts"
FALLBACK_STEP = "Fallback Step"  # the serving deployment's place in the request's chain: 0 unless it fell back
DURATION = "Duration Ms"
TTFT = "Time To First Token Ms"
COST = "Cost"
SAVED = "Tokens Saved"  # a response-cache hit: what the stored answer cost the backend
WEIGHT = "Sample Weight"
KIND_REQUEST = "request"
KIND_LOST_ATTEMPT = "lost attempt"  # a failed-over attempt whose body broke off: its tokens were charged too
_TEXT_MAX = 128


def _text(value: str) -> str:
    return value[:_TEXT_MAX]


@dataclass(frozen=True)
class RequestLog:
    prices: PriceTable
    privacy: Privacy
    gateway_id: str
    sampling: float = 1.0

    def attributes(self, record: RequestRecord, kind: str = KIND_REQUEST) -> dict[str, str]:
        usage = record.usage
        measurements: dict[str, float] = {
            ATTEMPTS: record.attempts,
            FALLBACK_STEP: record.step,
            DURATION: round(record.duration_ms, 3),
            COST: self.prices.cost(record.deployment, record.ptu, usage, record.saved),
        }
        if record.saved is not None:
            measurements[SAVED] = record.saved.total
        if usage is not None:
            measurements.update({
                PROMPT: usage.prompt, COMPLETION: usage.completion, CACHED: usage.cached,
                REASONING: usage.reasoning, TOTAL: usage.total,
            })
            for tool, calls in usage.tools:
                measurements[f"{names.TOOL_CALLS} {tool}"] = calls
        if record.ttft_ms is not None:
            measurements[TTFT] = round(record.ttft_ms, 3)
        if self.sampling < 1.0:
            measurements[WEIGHT] = 1.0 / self.sampling
        return {
            CUSTOM_EVENT: EVENT_NAME,
            MEASUREMENTS: json.dumps(measurements, separators=(",", ":")),
            names.SUBSCRIPTION_ID: _text(record.consumer_id),
            names.TEAM: _text(record.team),
            names.DEPLOYMENT: _text(record.deployment),
            names.REQUESTED_DEPLOYMENT: _text(record.requested or record.deployment),
            names.MODEL: _text(record.model),
            names.BACKEND_ID: _text(record.backend_id),
            names.LOCATION: _text(record.region),
            names.API_ID: record.api,
            names.OPERATION_ID: record.operation,
            names.STATUS_CODE: str(record.status),
            names.STREAM: "true" if record.stream else "false",
            names.PTU: "true" if record.ptu else "false",
            names.RECORD_KIND: kind,
            names.CACHE: record.cache or "off",
            names.SAFETY: record.safety or "off",
            names.SAFETY_POLICY: _text(record.safety_policy),
            names.SAFETY_DETAIL: _text(record.safety_detail),
            names.USAGE_SOURCE: "none" if usage is None else ("reported" if usage.reported else "counted"),
            names.USER_ID: self.privacy.user_id(record.user_id),
            names.CLIENT_IP: self.privacy.client_ip(record.client_ip),
            names.GATEWAY_ID: _text(self.gateway_id),
            names.CURRENCY: self.prices.currency,
        }
