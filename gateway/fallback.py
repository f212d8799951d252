"""Fallbacks: when a deployment's upstream fails before the first byte, the request goes to the
deployment's next fallback target (another deployment of the same organization, self-hosted or
a partner model's entry: `Route.fallbacks`, validated by deployments.services).

What counts as failing: no replica or provider accepted the connection (refused, timed out,
circuit open: gateway/circuit.py), none is ready, or the upstream answered 429 or 5xx, or sent
nothing before the first-byte timeout. Never once the first byte went to the client: the
response's start is sent only when an upstream's answer is taken (`Completion.relay`), so a
stream cut mid-way stays a cut stream, billed for what was delivered. A 4xx other than 429 is
the request's own fault and is answered as it is.

The attempt that failed is dropped without a usage event (it delivered nothing); the request's
one usage event is the serving target's: its deployment, model version (so it is rated at the
target's price) and provider connection, with `fallback_from_deployment_id` naming the
deployment the caller called. A partner target draws from its provider's shared quota as a
partner model's own request does (gateway/partner.py); a target whose quota is spent, whose
terms the organization has not accepted, that the calling key may not call (its project's
allow-list), or that is gone is skipped. Only the called
deployment's own list is followed (a target's fallbacks are not: no request walks a chain).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import redis

from gateway import metrics, partner
from gateway.errors import GatewayError
from gateway.limits import combined

if TYPE_CHECKING:
    from gateway.completion import Completion

logger = logging.getLogger("sirocco.gateway")

# Refusals raised before anything was sent upstream, after which another target may serve.
UNREACHED_CODES = {
    "replica_unreachable",
    "no_ready_replica",
    "provider_unreachable",
    "provider_not_connected",
    "provider_circuit_open",
}


async def connect(completion: Completion):
    """(response, failure) from the first target that takes the request, as
    `Completion.connect` returns them; the last target's failure is the request's."""
    remaining = list(completion.route.fallbacks)
    targets = _targets(completion, remaining)
    while True:
        try:
            # With a fallback left, a deployment without a ready replica is not waited for.
            response, failure = await completion.connect_upstream(may_fall_back=bool(remaining))
        except GatewayError as error:
            if error.code not in UNREACHED_CODES:
                raise
            target = await anext(targets, None)
            if target is None:
                raise
            reason = error.code or "unreached"
        else:
            reason = failed_before_first_byte(response, failure)
            if reason is None:
                return response, failure
            target = await anext(targets, None)
            if target is None:
                return response, failure
            completion.abandon(response, failure)
        logger.info(
            "request %s: %s failed before the first byte (%s); falling back to %s",
            completion.request_id,
            completion.route.deployment_id,
            reason,
            target[1].deployment_id,
        )
        metrics.FALLBACKS.labels(str(completion.route.deployment_id), reason).inc()
        await completion.switch_route(*target)


def failed_before_first_byte(response, failure: GatewayError | None) -> str | None:
    """Why an upstream's answer may be replaced by a fallback's (None: it is the answer)."""
    if failure is not None:
        return "first_byte_timeout" if failure.status == 504 else "connection_failed"
    if response.status == 429:
        return "rate_limited"
    if response.status >= 500:
        return "upstream_error"
    return None


async def _targets(completion: Completion, names: list[str]):
    """(name, route) of the usable fallback targets among `names` (taken from the list), in
    order."""
    gateway, organization_id = completion.gateway, completion.caller.organization_id
    while names:
        name = names.pop(0)
        route = await gateway.routes.route(organization_id, name)
        if (
            route is None
            or not completion.caller.may_call(name, route)  # the key's project allow-list
            or route.terms_pending is not None
        ):
            continue
        if route.partner_publisher is not None and (
            route.provider is None or not await _provider_quota(completion, route)
        ):
            continue
        yield name, route


async def _provider_quota(completion: Completion, route) -> bool:
    """Draw the partner target's provider-wide limits (its quota shared fairly between
    organizations); False when they are short (the target is skipped, not waited for)."""
    reserve, _, _ = completion.worst_case()
    limits = partner.provider_limits(
        route.provider, organization_id=completion.caller.organization_id, tokens=reserve
    )
    if not limits:
        return True
    try:
        admission = await completion.gateway.limiter.admit(limits, None)
    except (redis.RedisError, OSError):
        logger.warning("the rate limiter is unreachable; fallback skipped", exc_info=True)
        return False
    if not admission.allowed:
        return False
    completion.admission = combined(completion.admission, admission)
    return True
