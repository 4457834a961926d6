"""Admission: what the request may cost at most, reserved against the consumer's limits before anything is sent."""

from __future__ import annotations

from shared.config import Settings
from shared.edge.messages import GatewayRequest
from shared.flow.exchange import Checked, Exchange, count_prompt
from shared.flow.translate import Operation
from shared.limits.contract import Limiter
from shared.telemetry.events import Trace


class Admission:
    def __init__(self, settings: Settings, limiter: Limiter) -> None:
        self._default_max_tokens = settings.default_max_tokens
        self._user_id_header = settings.user_id_header
        self._limiter = limiter

    async def admit(
        self, request: GatewayRequest, checked: Checked, started: float, trace: Trace, user_id: str | None = None
    ) -> Exchange:
        """Reserve the request's largest possible cost, or raise the limiter's refusal (RateLimited, QuotaExhausted,
        NeverAdmissible, ...). The prompt is counted only for a consumer with limits. `user_id` is the caller's from
        its token, when the settings take it from a claim; else the User ID header's."""
        deployment = checked.shape.deployment
        prompt_estimate: int | None = None
        reserve = 0
        if self._limiter.needs_estimate(checked.consumer, deployment):
            prompt_estimate = count_prompt(checked)
            # Every choice the backend generates (n, best_of) may run to the cap, and is billed.
            completion = 0 if checked.route.operation is Operation.EMBEDDINGS else checked.shape.choices * (
                checked.shape.max_tokens or self._default_max_tokens
            )
            reserve = prompt_estimate + completion
        ticket = await self._limiter.admit(checked.consumer, deployment, reserve)
        return Exchange(
            request=request,
            checked=checked,
            started=started,
            trace=trace,
            user_id=user_id if user_id is not None else request.headers.get(self._user_id_header, "")[:128],
            ticket=ticket,
            reserve=reserve,
            prompt_estimate=prompt_estimate,
        )
