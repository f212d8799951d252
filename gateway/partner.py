"""The upstream of a partner-hosted model: the provider's API (Mistral's, or any OpenAI-compatible
one) instead of our replicas.

A route of a partner model carries its provider (`catalog.providers.PartnerTarget`: base URL,
the provider's model id, the credential decrypted in a DB thread, our quota there). This module
turns one request into the provider's request, adds the provider-wide limits to admission, and
turns the provider's errors into ours; `gateway/completion.py` relays the answer with the same
code as a replica's (streaming, usage, exactly-once usage events), so a partner model is called,
limited, budgeted and billed like any other.

- The request: the provider's model id replaces ours. Mistral's API takes no `stream_options`
  (it reports usage on the last chunk of a stream by itself), names the seed `random_seed` and
  has no `user`; an OpenAI-compatible API is asked for `stream_options.include_usage`. The
  credential goes in `Authorization` and nowhere else (never in a log line, an error, a usage
  event).
- Errors (the provider's bodies are Mistral's `{"object": "error", "message", "type", "code"}`
  or `{"message": …}`; OpenAI-compatible ones `{"error": {…}}`): a 429 is our 429 with
  `retry-after` (the provider's, else 1 s), `type: requests`, code `provider_rate_limited`;
  a 5xx is a 502 `provider_error`; 401/403 (our credential refused) a 502
  `provider_auth_failed` (the customer cannot fix it; the log says which connection); other
  4xx a 400 with the provider's message; a body that is not JSON a 502 `provider_bad_response`.
- The provider-wide limit (`provider_limits`): our account's quota with the provider (rpm/tpm on
  the connection) is a bucket every organization draws from, and each organization also draws
  from its own share of it (`tenant_share_percent`, 50 % by default), in the same atomic step
  as the key's and organization's own limits. One tenant can therefore hold at most its share
  of the quota, and the rest stays for the others.

Fallbacks (another upstream tried before the first byte) will choose among upstreams here: an
upstream is "replicas of a deployment" or "a provider", each with its own connect and its own
error vocabulary (`Upstream`).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import orjson

from gateway.errors import GatewayError, error_body, upstream_error
from gateway.limits import Limit

logger = logging.getLogger("sirocco.gateway")

RETRY_AFTER_NOT_CONNECTED = 30
DEFAULT_RETRY_AFTER = 1
# Parameters Mistral's chat completions API does not take (it answers 422 for unknown ones).
_MISTRAL_DROPPED = ("stream_options", "user", "logprobs", "top_logprobs", "logit_bias", "store")


@dataclass(frozen=True, slots=True)
class Upstream:
    """Who answers a request: words for messages and the prefix of error codes."""

    noun: str  # "replica", "provider"
    code_prefix: str  # "replica_", "provider_"

    def code(self, suffix: str) -> str:
        return self.code_prefix + suffix


REPLICA = Upstream("replica", "replica_")
PROVIDER = Upstream("provider", "provider_")


def check_route(route, model: str) -> None:
    """Before anything is drawn (and after the terms, which every model may have: see
    Completion.read_prompt): the platform is connected to the provider."""
    if route.provider is None:
        raise upstream_error(
            503,
            f"`{model}` is hosted by {route.partner_publisher}, and the platform is not "
            "connected to it right now. Retry later; the platform team has been told.",
            code="provider_not_connected",
            retry_after=RETRY_AFTER_NOT_CONNECTED,
        )


def provider_limits(provider, *, organization_id: int, tokens: int) -> list[Limit]:
    """The provider-wide buckets a request draws from: the whole quota, and this
    organization's share of it."""
    limits = []
    ident = f"p:{provider.connection_id}"
    share = provider.tenant_share_percent
    for kind, suffix, quota, cost in (
        ("requests", "r", provider.requests_per_minute, 1),
        ("tokens", "t", provider.tokens_per_minute, tokens),
    ):
        if not quota:
            continue
        limits.append(Limit(f"{ident}:{suffix}", "provider", kind, quota, cost))
        if share < 100:
            part = max(1, math.floor(quota * share / 100))
            limits.append(
                Limit(f"{ident}:o:{organization_id}:{suffix}", "provider_share", kind, part, cost)
            )
    return limits


def request_body(request, provider) -> bytes:
    """The request as the provider's API takes it."""
    payload = request.payload
    if payload is None:  # read in a prompt worker: the body it made, with our name spliced in
        payload = orjson.loads(request.upstream_body(""))
    body = dict(payload)
    body.pop("metadata", None)  # the platform's cost-attribution tags (gateway/attribution.py)
    body["model"] = provider.provider_model_id
    if provider.kind == "mistral":
        for name in _MISTRAL_DROPPED:
            body.pop(name, None)
        if "seed" in body:
            body["random_seed"] = body.pop("seed")
        if "max_completion_tokens" in body:
            body["max_tokens"] = body.pop("max_completion_tokens")
    elif request.stream:
        # Usage on the last chunk: what gets billed. Dropped again if the client did not ask.
        body["stream_options"] = {**(body.get("stream_options") or {}), "include_usage": True}
        body["stream_options"].pop("continuous_usage_stats", None)
    return orjson.dumps(body)


def request_headers(provider) -> dict[str, str]:
    return {
        "content-type": "application/json",
        "accept": "text/event-stream, application/json",
        "authorization": f"Bearer {provider.credential.reveal()}",
    }


def chat_url(provider, *, chat: bool) -> str:
    return provider.base_url + ("/chat/completions" if chat else "/completions")


def error_from_provider(status: int, data, headers, provider) -> GatewayError:
    """The provider's error answer as ours (see the module docstring)."""
    message = _provider_message(data)
    who = provider.connection_name
    if status == 429:
        retry_after = _retry_after(headers)
        return GatewayError(
            429,
            "The model's provider is rate limiting the platform right now"
            + (f" ({message})" if message else "")
            + f". Please try again in {retry_after}s.",
            type="requests",
            code="provider_rate_limited",
            headers=[(b"retry-after", str(retry_after).encode())],
        )
    if status in (401, 403):
        logger.error("provider connection %s refused our credential (HTTP %d)", who, status)
        return upstream_error(
            502,
            "The model's provider refused the platform's credentials. The platform team has "
            "been told; retry later.",
            code="provider_auth_failed",
            retry_after=RETRY_AFTER_NOT_CONNECTED,
        )
    if 400 <= status < 500:
        return GatewayError(
            400 if status in (400, 413, 422) else status,
            f"The model's provider refused the request: {message or f'HTTP {status}'}",
            type="invalid_request_error",
            code="provider_invalid_request",
        )
    return upstream_error(
        502,
        f"The model's provider failed (HTTP {status}"
        + (f": {message}" if message else "")
        + "). Retry.",
        code="provider_error",
        retry_after=DEFAULT_RETRY_AFTER,
    )


def bad_response(status: int) -> bytes:
    return error_body(
        f"The model's provider answered {status} with a body that is not a chat completion.",
        type="server_error",
        code="provider_bad_response",
    )


def _provider_message(data) -> str:
    """The human part of a provider's error body, in any of the shapes providers use."""
    if not isinstance(data, dict):
        return ""
    message = data.get("message")
    inner = data.get("error")
    if message is None and isinstance(inner, dict):
        message = inner.get("message")
    if isinstance(message, dict | list):  # Mistral's 422: {"detail": [...]}
        message = orjson.dumps(message).decode()
    return str(message)[:500] if message else ""


def _retry_after(headers) -> int:
    raw = headers.get("retry-after") if headers is not None else None
    try:
        seconds = math.ceil(float(raw))
    except (TypeError, ValueError):
        return DEFAULT_RETRY_AFTER
    return min(max(seconds, 1), 3600)
