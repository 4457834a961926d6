"""Inbound checks: a request the gateway can send on, for a deployment the consumer may use (API Management's
inbound section). Everything here refuses with a typed refusal or a request-shape GatewayError; nothing is sent."""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import partial
from typing import Any

from shared.catalog import Catalog
from shared.edge.errors import GatewayError, bad_request
from shared.edge.messages import GatewayRequest
from shared.flow import offload, responses
from shared.flow.exchange import Checked
from shared.flow.gates import check_capabilities
from shared.flow.jsonbody import parse_body
from shared.flow.pinning import Holder, Pinning
from shared.flow.translate import CallShape, Operation, Route, check_api_version, check_body
from shared.outcomes import DeploymentNotAllowed, DeploymentNotFound, ItemNotFound
from shared.records.consumers import Consumer


@dataclass(frozen=True, slots=True)
class Parsed:
    """The request's body and shape: the deployment is known from here on (for the metrics of a refusal)."""

    route: Route
    body: dict[str, Any]
    shape: CallShape
    api_version: str | None
    size: int = 0  # of the body, in bytes


def _parsed_and_checked(route: Route, raw: bytes) -> tuple[dict[str, Any], CallShape]:
    body = parse_body(raw)
    return body, check_body(route, body)


class Checks:
    def __init__(
        self, deployments: frozenset[str], pinning: Pinning, *, reveal_deployments: bool = False,
        api_versions: frozenset[str] | None = None, catalog: Catalog | None = None,
    ) -> None:
        self._deployments = deployments
        self._catalog = catalog if catalog is not None else Catalog()
        self._pinning = pinning
        self._reveal = reveal_deployments
        self._api_versions = api_versions
        self._chains: dict[str, tuple[str, ...]] = {}

    async def parse(self, request: GatewayRequest, route: Route) -> Parsed:
        """400 for a bad api-version or body, 415 for a body that is not JSON."""
        api_version = check_api_version(request.query, self._api_versions)
        content_type = request.headers.get("content-type", "application/json").split(";", 1)[0].strip().lower()
        if content_type != "application/json":
            raise GatewayError(415, "Send the request body as application/json.", code="unsupported_media_type")
        if len(request.body) <= offload.ON_LOOP_BYTES:
            body, shape = _parsed_and_checked(route, request.body)
        else:  # parsing and checking 8 MiB takes tens of milliseconds (a walk of every message): not on the event loop
            body, shape = await offload.run(partial(_parsed_and_checked, route, request.body))
        return Parsed(Route(route.api, route.operation, shape.deployment), body, shape, api_version, len(request.body))

    async def follow_up(self, request: GatewayRequest, route: Route, consumer: Consumer) -> Checked:
        """A follow-up of a stored response (GET, DELETE, input_items, cancel): a good api-version, a response this
        consumer created (else 404, as for one that does not exist), for a deployment it may still use. It has no
        body to check; it is pinned to the backend holding the response."""
        assert route.response_id is not None
        api_version = check_api_version(request.query, self._api_versions)
        holder = await self._pinning.holder(route.response_id, consumer.id, previous=False)
        deployment = holder.record.deployment
        if not consumer.may_use(deployment):
            raise DeploymentNotAllowed(deployment)
        replay = route.operation is Operation.RESPONSE_GET and request.query.get("stream") == "true"
        shape = CallShape(deployment, stream=replay, client_wants_usage=True, max_tokens=None)
        return Checked(route, consumer, {}, shape, api_version, pinned=holder, requested=deployment)

    async def allow(self, parsed: Parsed, consumer: Consumer) -> Checked:
        """An unknown deployment (or alias), one the key may not use, or a continuation of a response the consumer may
        not see is refused here. An alias is resolved to its first entry the consumer may use; the chain holds the
        rest, and the fallbacks the consumer may use."""
        requested = parsed.shape.deployment
        chain = self.chain(requested, consumer)
        if not chain:
            if requested not in self._deployments and requested not in self._catalog.aliases or not self._reveal:
                # A deployment this key may not use answers as one that does not exist, so keys cannot list names.
                raise DeploymentNotFound(requested)
            raise DeploymentNotAllowed(requested)
        if parsed.size <= offload.ON_LOOP_BYTES:
            check_capabilities(parsed.body, consumer.capabilities)
        else:  # the walk visits every node of the body: for a large one, not on the event loop
            await offload.run(partial(check_capabilities, parsed.body, consumer.capabilities))
        shape = parsed.shape if chain[0] == requested else replace(parsed.shape, deployment=chain[0])
        if shape is not parsed.shape:
            parsed = replace(parsed, shape=shape)
        pinned = await self._pin(parsed, consumer)
        if pinned is not None or parsed.route.operation is Operation.EMBEDDINGS:
            # A continuation lives where it was stored; embeddings of another model are vectors in another space.
            chain = chain[:1]
        fall_back = consumer.fallback
        if not fall_back and requested not in self._catalog.aliases:
            chain = chain[:1]
        return Checked(
            parsed.route, consumer, parsed.body, shape, parsed.api_version, pinned, chain, fall_back, requested
        )

    def chain(self, name: str, consumer: Consumer) -> tuple[str, ...]:
        """The deployments a request for `name` may be served by, for this consumer: empty if none."""
        if name not in self._deployments and name not in self._catalog.aliases:
            return ()
        if name in self._deployments and not consumer.may_use(name):
            return ()
        chain = self._chains.get(name)
        if chain is None:  # names here are configured deployments and aliases only: a bounded memo
            chain = self._chains[name] = self._catalog.chain(name)
        return tuple(d for d in chain if consumer.may_use(d))

    async def _pin(self, parsed: Parsed, consumer: Consumer) -> Holder | None:
        """The backend holding what this request continues, if it continues anything: the previous response, the
        stored items it names (each must be this consumer's: another's answers as an unknown one), the encrypted
        reasoning it passes back. All must be held by one backend."""
        if parsed.route.operation is not Operation.RESPONSES:
            return None
        previous = parsed.body.get("previous_response_id")
        holders: list[Holder] = []
        if isinstance(previous, str):
            holders.append(await self._pinning.holder(previous, consumer.id, previous=True))
        named = responses.references(parsed.body)
        for item_id in named.stored:
            found = await self._pinning.item_holder(item_id, consumer.id)
            if found is None:
                raise ItemNotFound(item_id)
            holders.append(found)
        if named.encrypted is not None and not holders:
            # Encrypted reasoning names no stored state: unknown (made elsewhere, or before the gateway recorded such
            # items), the request is routed as any other.
            encrypted = await self._pinning.item_holder(named.encrypted, consumer.id)
            if encrypted is not None:
                holders.append(encrypted)
        if not holders:
            return None
        holder = holders[0]
        if any(h.backend.id != holder.backend.id for h in holders[1:]):
            raise bad_request(
                "The items this request continues are stored in different regions; one request can only continue "
                "what one region holds.", param="input", code="items_in_different_regions",
            )
        if not holder.backend.serves(parsed.shape.deployment):
            raise bad_request(
                f"The deployment '{parsed.shape.deployment}' is not available in the region that stores the previous "
                "response.",
                param="model",
                code="deployment_not_in_response_region",
            )
        return holder
