"""One completion request (`/v1/chat/completions`, `/v1/completions`) from its first byte to its
one usage event.

`Completion.handle()` reads as the request goes, one method per step, so each step can be
replaced on its own:

    authenticate → read the body → (a large body: cheap admission by its size) → parse and
    count the prompt (a large one in a prompt worker, fairly between organizations) → route
    → context check → admission: rate limits and spend hold, one atomic step → serve
    (replica, relay) → usage event → limits and spend settled → last bytes

`serve()` owns the exactly-once promise: whatever happens once a replica took the request
(a complete answer, a replica error, a timeout, a broken stream, the client leaving, the task
cancelled), its `finally` writes the request's single usage event, and the last bytes of the
response are sent only after that event is durable (committed, or in the local spool:
gateway/usage.py); when it cannot be made durable, the last bytes are a 503 instead (a
stream's final event). Nothing else writes usage.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import TYPE_CHECKING

import aiohttp
import orjson
import redis

from gateway import fallback, metrics, partner, prompt_work
from gateway.budget import NANOS, SpendPosition, TokenPrice
from gateway.errors import (
    GatewayError,
    bad_request,
    error_body,
    model_not_found,
    terms_not_accepted,
    upstream_error,
)
from gateway.exchange import Exchange, Receive, Scope, Send
from gateway.fairpool import PoolFull
from gateway.limits import Admission, Limit, SpendHold, combined, limits_for
from gateway.protocol import CompletionRequest, check_context, parse_request
from gateway.tokens import estimate_text, message_text, prompt_token_bound
from gateway.usage import UsageNotDurable
from metering.models import UsageEvent

if TYPE_CHECKING:
    from gateway.auth import Caller
    from gateway.process import Gateway

logger = logging.getLogger("sirocco.gateway")

# Deployments in these states get a replica soon: requests wait for it rather than fail.
WAITING_STATUSES = {"pending", "provisioning", "scaling", "updating"}
RETRY_AFTER_NO_REPLICA = 10
# What a request without max_tokens reserves when the model's context length is unknown.
UNKNOWN_COMPLETION_RESERVE = 4096
# A stream event longer than this is no chat chunk: the stream is cut, not the event held.
MAX_EVENT_BYTES = 1 << 20
# A provider's answer (a body, or a whole stream) may take 1 MiB plus this per token allowed.
PROVIDER_BYTES_PER_TOKEN = 1024
# A provider's stream is cut once the gateway's count of its text passes twice the tokens
# the request allows plus this (twice: our count is not the provider's tokenizer's).
OVERRUN_SLACK_TOKENS = 16
# A provider's prompt figure is believed up to twice the bound of the body (templates with
# tools) plus this (a system prompt of the provider's own).
PROVIDER_PROMPT_SLACK = 1024
# After [DONE], how long the rest of the upstream's body (its end) is waited for.
DRAIN_SECONDS = 1.0

_DONE = object()
_GARBAGE = object()


class Outcome:
    """What a request that reached a replica used: becomes its one UsageEvent.

    Usage comes from the replica: its final figure (`usage_final`), or, for a stream cut
    before that, the last figure it reported on a chunk (continuous usage); only when it
    reported none does the gateway count what the client received.
    """

    __slots__ = (
        "cached_reported",
        "cached_tokens",
        "completion_tokens",
        "continuous",
        "parts",
        "per_choice",
        "prompt_tokens",
        "status",
        "text_bytes",
        "ttft",
        "usage_final",
        "usage_invalid",
        "usage_seen",
    )

    def __init__(self):
        self.status = 502
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.cached_tokens = 0
        self.cached_reported = None  # cached_tokens as the replica reported it (None: not)
        self.usage_seen = False
        self.usage_final = False
        self.continuous = False  # the replica reports usage on every chunk
        # Continuous usage counts each choice's own tokens (vLLM: per choice index with n > 1).
        self.per_choice: dict[int, int] = {}
        self.ttft: float | None = None
        self.parts: list[str] = []
        self.text_bytes = 0  # of `parts`, in UTF-8 (a provider's only)
        self.usage_invalid = False  # a figure that is not a count (negative, not a number)

    def take_usage(self, usage, *, final: bool = True, index=0) -> None:
        """Take a figure the replica reported; a running count never replaces a final one."""
        if not isinstance(usage, dict) or (self.usage_final and not final):
            return
        self.usage_seen = True
        self.usage_final = final
        if not all(_is_count(usage.get(name)) for name in ("prompt_tokens", "completion_tokens")):
            self.usage_invalid = True
        self.prompt_tokens = _int(usage.get("prompt_tokens"))
        details = usage.get("prompt_tokens_details")
        self.cached_tokens = _int(details.get("cached_tokens")) if isinstance(details, dict) else 0
        self.cached_reported = (
            self.cached_tokens if isinstance(details, dict) and "cached_tokens" in details else None
        )
        if final:
            self.completion_tokens = _int(usage.get("completion_tokens"))
        else:
            self.per_choice[_int(index)] = _int(usage.get("completion_tokens"))
            self.completion_tokens = sum(self.per_choice.values())


def _int(value) -> int:
    return value if _is_count(value) else 0


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


class Completion(Exchange):
    """One completion request: what it carries, where it goes, what it used."""

    __slots__ = (
        "admission",
        "body_bytes",
        "caller",
        "chat",
        "client_gone",
        "endpoint",
        "fallback_from",
        "gateway",
        "last_messages",
        "outcome",
        "position",
        "price",
        "prompt_exact",
        "request",
        "route",
        "route_name",
        "stated_usage",
        "upstream",
    )

    def __init__(self, gateway: Gateway, scope: Scope, receive: Receive, send: Send, *, chat):
        super().__init__(scope, receive, send)
        self.gateway = gateway
        self.chat = chat
        self.caller: Caller | None = None
        self.request: CompletionRequest | None = None
        self.route = None
        self.route_name = ""  # the deployment name the route was read for
        self.position: SpendPosition | None = None  # the organization's spend limit
        self.price: TokenPrice | None = None  # the price the spend hold is made at
        self.prompt_exact = False  # counted with the model's own tokenizer
        self.body_bytes = 0
        self.admission: Admission | None = None
        self.outcome: Outcome | None = None  # set once a replica took the request
        self.endpoint: str | None = None  # the replica (or provider) that took the request
        self.upstream = partner.REPLICA  # or partner.PROVIDER: a partner model's
        self.client_gone = False
        # The deployment the caller named, once a fallback target took over (gateway/fallback.py).
        self.fallback_from = None
        # The answer's last messages, held back until the usage event is committed.
        self.last_messages: list[dict] = []
        # A provider's answer (JSON) or final stream chunk carrying the usage the client sees:
        # restated with the gateway's figures when those replace the provider's.
        self.stated_usage: dict | None = None

    async def handle(self) -> None:
        config = self.gateway.config
        self.caller = await self.gateway.keys.authenticate(self.authorization_header())
        raw = await self.read_body(config.max_body_bytes)
        self.position = await self._spend_position()
        if len(raw) > config.inline_prompt_bytes:
            await self.admit_bound(len(raw))
        try:
            await self.read_prompt(raw)
            if not self.gateway.usage.accepting():
                raise _usage_not_recorded()  # refused before a replica serves it unbilled
            await self.admit()
            await self.serve()
            with contextlib.suppress(OSError):  # the client left after its answer was whole
                for message in self.last_messages:
                    await self.send(message)
        finally:
            await self.settle()

    # ---- before any replica is asked ---------------------------------------------------------

    async def admit_bound(self, body_bytes: int) -> None:
        """The cheap first step for a large body, before it is parsed or tokenized: the
        request itself, its prompt's most possible tokens (gateway.tokens.prompt_token_bound)
        on every token limit that could ever hold them, and some spend headroom. A key at its
        limits is refused here at the cost of one Redis call; settlement gives back what the
        count shows was not needed."""
        limits = [
            limit
            for limit in self._limits(prompt_token_bound(body_bytes))
            if limit.kind == "requests" or limit.cost <= limit.limit
        ]
        # Some headroom on every spend counter (organization, project): cost 1 when priced at
        # nothing.
        hold = self.gateway.spend.hold(self.position, None, prompt_tokens=0, completion_tokens=0)
        self.admission = await self._admit(limits, hold)

    async def find_route(self) -> None:
        """The route of the request's model as the caller may call it: a 404 for an unknown
        name and the same for one outside the key's allow-list; a 403 until the model's terms
        are accepted. Its name is kept: a wait for replicas reads the route again by it."""
        request = self.request
        self.route_name = request.model
        self.route = await self.gateway.routes.route(self.caller.organization_id, request.model)
        if self.route is None or not self.caller.may_call(request.model, self.route):
            raise model_not_found(request.model)
        if self.route.terms_pending is not None:  # a partner's or a publisher's model
            raise terms_not_accepted(
                request.model,
                terms_version=self.route.terms_pending,
                accept_path=self.route.terms_accept_path,
            )

    async def read_prompt(self, raw: bytes) -> None:
        """The request, its route, and its prompt's tokens: a large body is parsed and
        counted in a prompt worker in its organization's turn (gateway/fairpool.py), a small
        one here at a bounded cost. Counted with the model's tokenizer, estimated while it
        loads."""
        pooled = len(raw) > self.gateway.config.inline_prompt_bytes
        if pooled:
            request = await self._in_pool(prompt_work.read_request, raw, self.chat)
            if isinstance(request, tuple):
                raise prompt_work.error_from(request)
        else:
            request = parse_request(raw, chat=self.chat)
        self.request = request
        await self.find_route()
        if self.route.partner_publisher is not None:
            partner.check_route(self.route, request.model)
            self.upstream = partner.PROVIDER
        await self.gateway.tags.admit(self.caller.organization_id, request.tags)
        tokenizer = self.gateway.tokenizers.get_nowait(self.route.model_version_id)
        if not pooled:
            request.prompt_tokens = request.count_prompt(tokenizer)
        elif tokenizer is not None:
            request.prompt_tokens = await self._in_pool(
                prompt_work.count_prompt, raw, self.chat, str(tokenizer.folder)
            )
        # else: the worker's estimate
        self.prompt_exact = tokenizer is not None
        self.body_bytes = len(raw)

    async def admit(self) -> None:
        """Hold the request's worst case against the key's and organization's rate limits and
        the organization's spend limit, in one atomic step; 429 when any is short (and 400
        when it cannot fit the model's context)."""
        reserve, prompt_most, completion_most = self.worst_case()
        self.price = await self.gateway.spend.price(self.route.model_version_id)
        hold = self.gateway.spend.hold(
            self.position, self.price, prompt_tokens=prompt_most, completion_tokens=completion_most
        )
        limits = self._limits(reserve)
        bound = self.admission
        if bound is not None:  # draw only what the bound did not
            drawn = {limit.bucket: limit.cost for limit in bound.limits}
            limits = [
                dataclasses.replace(limit, cost=limit.cost - drawn.get(limit.bucket, 0))
                for limit in limits
                if limit.kind == "tokens" or limit.bucket not in drawn
            ]
        admission = await self._admit(limits, hold)
        self.admission = admission if bound is None else combined(bound, admission)

    def worst_case(self) -> tuple[int, int, int]:
        """(tokens to reserve, most prompt tokens, most completion tokens) for admission."""
        request = self.request
        most = self.gateway.config.max_choices
        if request.n > most:
            raise bad_request(
                f"`n` is {request.n}; this platform generates at most {most} choices per "
                "request. Lower `n`, or send several requests.",
                param="n",
            )
        return _worst_case(
            request,
            request.prompt_tokens,
            self.prompt_exact,
            self.route.max_model_len,
            self.body_bytes,
        )

    def completion_allowed(self) -> int:
        """The most completion tokens the request lets its upstream generate: n × max_tokens,
        else n × the model's context length (n × 4,096 when that is unknown)."""
        request = self.request
        per_choice = request.max_tokens or self.route.max_model_len or UNKNOWN_COMPLETION_RESERVE
        return request.n * per_choice

    async def settle(self) -> None:
        """Give back what admission held beyond the tokens really used, and release the spend
        hold with the real cost."""
        if self.admission is None:
            return
        outcome = self.outcome
        prompt_tokens = outcome.prompt_tokens if outcome else 0
        completion_tokens = outcome.completion_tokens if outcome else 0
        spent = 0
        if self.position is not None:
            spent = self.gateway.spend.spent(
                self.admission.spend,
                self.price,
                currency=self.position.currency,
                prompt_tokens=prompt_tokens,
                completion_tokens=completion_tokens,
            )
        try:
            await self.gateway.limiter.settle(
                self.admission, prompt_tokens + completion_tokens, spent
            )
        except (redis.RedisError, OSError):
            logger.warning("settling rate limits failed", exc_info=True)

    async def _spend_position(self) -> SpendPosition | None:
        try:
            return await self.gateway.spend.position(
                self.caller.organization_id, self.caller.project_id
            )
        except (redis.RedisError, OSError):
            logger.exception("the spend counters in Redis are unreachable")
            raise _limiter_unavailable("Spend limits") from None

    def _limits(self, tokens: int) -> list[Limit]:
        config, caller = self.gateway.config, self.caller
        provider = self.route.provider if self.route is not None else None
        shared = []
        if provider is not None:  # our quota with a partner model's provider, fairly shared
            shared = partner.provider_limits(
                provider, organization_id=caller.organization_id, tokens=tokens
            )
        return shared + limits_for(
            key_id=caller.key_id,
            key_rpm=caller.rpm_limit,
            key_tpm=caller.tpm_limit,
            organization_id=caller.organization_id,
            org_rpm=config.org_rpm_limit,
            org_tpm=config.org_tpm_limit,
            tokens=tokens,
            project_id=caller.project_id,
            project_rpm=caller.project_rpm,
            project_tpm=caller.project_tpm,
        )

    async def _admit(self, limits: list[Limit], hold: SpendHold | None) -> Admission:
        try:
            admission = await self.gateway.limiter.admit(limits, hold)
        except (redis.RedisError, OSError):
            logger.exception("the rate limiter is unreachable")
            raise _limiter_unavailable("Rate limits") from None
        self.rate_headers = admission.headers()
        if not admission.allowed:
            if admission.cause == "spend":
                raise _spend_refused(admission)
            raise _rate_limited(admission, self.caller)
        return admission

    async def _count_completion(self, text: str, tokenizer) -> int:
        """`text`'s tokens: the model's tokenizer (a long text in a prompt worker), else the
        estimate."""
        if tokenizer is None:
            return estimate_text(text)
        if len(text) > self.gateway.config.inline_prompt_bytes:  # off the event loop
            return await self._count_text_in_pool(text, tokenizer)
        return tokenizer.count_text(text)

    async def _count_text_in_pool(self, text: str, tokenizer) -> int:
        """A long text's tokens in a prompt worker. It is billed, so it is counted whatever
        happens: here, when the organization's queue is full or a worker fails."""
        try:
            return await self.gateway.prompts.run(
                self.caller.organization_id, prompt_work.count_text, text, str(tokenizer.folder)
            )
        except Exception:
            logger.warning("counting a completion in a prompt worker failed", exc_info=True)
            return tokenizer.count_text(text)

    async def _in_pool(self, function, /, *args):
        try:
            return await self.gateway.prompts.run(self.caller.organization_id, function, *args)
        except PoolFull as full:
            raise GatewayError(
                429,
                f"Your organization already has {full.queued} large requests being read; this "
                "gateway reads that many at a time per organization. Retry when one finishes.",
                type="requests",
                code="rate_limit_exceeded",
                headers=[(b"retry-after", b"1")],
            ) from None

    # ---- the replica -------------------------------------------------------------------------

    async def serve(self) -> None:
        """Relay to a replica; once one took the request, write its one usage event."""
        handler = asyncio.current_task()
        watcher = asyncio.get_running_loop().create_task(self._watch_disconnect(handler))
        try:
            response, failure = await fallback.connect(self)
            await self.relay(response, failure)
        except asyncio.CancelledError:
            if not self.client_gone:
                raise
            handler.uncancel()
            if self.outcome is not None:
                self.outcome.status = 499
        finally:
            watcher.cancel()
            if self.outcome is not None:
                await self.record_usage()

    async def _watch_disconnect(self, handler: asyncio.Task) -> None:
        """Cancel the handler as soon as the client goes away (stops the replica)."""
        while True:
            message = await self.receive()
            if message["type"] == "http.disconnect":
                self.client_gone = True
                handler.cancel()
                return

    async def connect_upstream(self, *, may_fall_back: bool):
        """Send the request to the route's upstream (`connect` or `connect_provider`). With a
        fallback left, a deployment without a ready replica is not waited for (a scale from
        zero is still asked for): the fallback serves now."""
        if self.upstream is partner.PROVIDER:
            return await self.connect_provider()
        route = self.route
        if may_fall_back and not route.replicas:
            if route.can_scale_from_zero:
                await self.gateway.routes.ask_for_replicas(route.deployment_id)
            raise upstream_error(
                503,
                f"The deployment `{self.request.model}` has no ready replica.",
                retry_after=RETRY_AFTER_NO_REPLICA,
                code="no_ready_replica",
            )
        await self.wait_for_replicas()
        return await self.connect()

    async def switch_route(self, name: str, route) -> None:
        """Serve the request from a fallback target from now on: its upstream, and its price
        for the spend settlement (gateway/fallback.py)."""
        if self.fallback_from is None:
            self.fallback_from = self.route.deployment_id
        self.route, self.route_name = route, name
        self.upstream = partner.PROVIDER if route.partner_publisher is not None else partner.REPLICA
        self.price = await self.gateway.spend.price(route.model_version_id)

    def abandon(self, response, failure: GatewayError | None) -> None:
        """Drop an attempt that failed before the first byte (a fallback takes over): it
        delivered nothing, so it makes no usage event."""
        if response is not None:
            response.close()
        route = self.route
        self.gateway.routes.release(self.endpoint)
        self.gateway.load.finished(route.deployment_id)
        deployment_metrics = metrics.for_deployment(str(route.deployment_id))
        deployment_metrics.in_flight.dec()
        deployment_metrics.finished(failure.status if failure is not None else response.status)
        self.outcome = None
        self.endpoint = None

    def _judged(self, upstream: str, response, failure: GatewayError | None) -> None:
        """Tell the upstream's circuit breaker how the attempt went (gateway/circuit.py)."""
        breakers, context = self.gateway.breakers, self.route.deployment_id
        if failure is not None or response.status >= 500:
            breakers.failure(upstream, context)
        elif response.status == 429:
            breakers.neither(upstream)
        else:
            breakers.success(upstream, context)

    async def wait_for_replicas(self) -> None:
        """Until the route has a ready replica, waiting for a scale-up if need be."""
        route, request = self.route, self.request
        if route.replicas:
            return
        config = self.gateway.config
        if not route.can_scale_from_zero and route.status not in WAITING_STATUSES:
            raise upstream_error(
                503,
                f"The deployment `{request.model}` has no ready replica (status: {route.status}). "
                "Check it in the console or with GET /api/v1/deployments.",
                retry_after=RETRY_AFTER_NO_REPLICA,
                code="no_ready_replica",
            )
        if route.can_scale_from_zero:
            await self.gateway.routes.ask_for_replicas(route.deployment_id)
        waited_from = time.monotonic()
        deadline = waited_from + config.scale_from_zero_wait
        next_progress = waited_from
        while True:
            now = time.monotonic()
            if request.stream and now >= next_progress:
                await self.start_stream()
                note = (
                    f": waiting for a replica of {request.model} "
                    f"({route.status}, {now - waited_from:.0f}s)\n\n"
                )
                await self.send(
                    {"type": "http.response.body", "body": note.encode(), "more_body": True}
                )
                next_progress = now + config.scale_progress_interval
            if now >= deadline:
                raise upstream_error(
                    503,
                    f"No replica of `{request.model}` became ready within "
                    f"{config.scale_from_zero_wait:.0f}s (it is starting from zero). Retry "
                    "shortly.",
                    retry_after=RETRY_AFTER_NO_REPLICA,
                    code="no_ready_replica",
                )
            await asyncio.sleep(min(0.5, max(0.0, deadline - now)))
            route = await self.gateway.routes.route(
                self.caller.organization_id, self.route_name, fresh=True
            )
            if route is None:
                raise model_not_found(request.model)
            self.route = route
            if route.replicas:
                return

    async def connect(self):
        """Send the request to a replica: (response, None) once its headers came, (None, error)
        when it was sent but failed. Either way the request reached a replica (`outcome` is
        set, so it is billed). A refused connect is retried on another replica, with the same
        request id; when none accepts, the GatewayError is raised and nothing is billed."""
        gateway, route, request = self.gateway, self.route, self.request
        config = gateway.config
        path = self.upstream_path()
        body = request.upstream_body(route.served_model_name)
        headers = {"content-type": "application/json", "x-request-id": self.request_id}
        breakers = gateway.breakers
        # Replicas whose circuit is open are not even connected to.
        tried: set[str] = {e for _, e in route.replicas if not breakers.available(e)}
        skipped = len(tried)
        refused = None
        while (endpoint := gateway.routes.pick(route, tried, request.prefix_keys)) is not None:
            tried.add(endpoint)
            if not breakers.begin(endpoint, route.deployment_id):
                continue
            gateway.routes.acquire(endpoint)
            try:
                async with asyncio.timeout(config.first_byte_timeout):
                    response = await gateway.session.post(
                        endpoint + path, data=body, headers=headers
                    )
                failure = None
            except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as error:
                gateway.routes.release(endpoint)
                breakers.failure(endpoint, route.deployment_id)
                if gateway.routes.refused(endpoint):
                    logger.warning("replica %s refused the connection: %s", endpoint, error)
                gateway.routes.unhealthy(
                    route.deployment_id, endpoint, f"refused the connection ({error})"
                )
                refused = error
                continue
            except TimeoutError:
                response, failure = (
                    None,
                    upstream_error(
                        504,
                        f"The replica did not answer within {config.first_byte_timeout:.0f}s. "
                        "Retry, or ask for fewer tokens.",
                        code="replica_timeout",
                    ),
                )
            except aiohttp.ClientError as error:
                gateway.routes.unhealthy(
                    route.deployment_id, endpoint, f"reset the connection ({type(error).__name__})"
                )
                response, failure = (
                    None,
                    upstream_error(
                        502,
                        f"The connection to the replica failed ({type(error).__name__}). Retry.",
                        code="replica_connection_failed",
                    ),
                )
            except BaseException:
                gateway.routes.release(endpoint)
                breakers.neither(endpoint)
                raise
            self._judged(endpoint, response, failure)
            self.outcome = Outcome()
            self.endpoint = endpoint
            self.gateway.load.started(route.deployment_id)
            metrics.for_deployment(str(route.deployment_id)).in_flight.inc()
            return response, failure
        if skipped and not refused:
            raise upstream_error(
                503,
                f"Every replica of `{request.model}` failed repeatedly; the gateway tries them "
                "again shortly. Retry shortly.",
                retry_after=RETRY_AFTER_NO_REPLICA,
                code="replica_unreachable",
            )
        raise upstream_error(
            502 if refused else 503,
            f"No replica of `{request.model}` accepted the connection "
            f"({len(tried)} tried). Retry shortly.",
            retry_after=RETRY_AFTER_NO_REPLICA,
            code="replica_unreachable" if refused else "no_ready_replica",
        )

    async def connect_provider(self):
        """Send the request to a partner model's provider, like `connect` to a replica: once
        sent, the request is billed for what comes back (nothing, for a refusal)."""
        gateway, provider, request = self.gateway, self.route.provider, self.request
        body = partner.request_body(request, provider)
        url = partner.chat_url(provider, chat=request.chat)
        endpoint = provider.base_url
        circuit = f"provider:{provider.connection_name}"
        if not gateway.breakers.begin(circuit, self.route.deployment_id):
            raise upstream_error(
                503,
                f"The model's provider ({self.route.partner_publisher}) failed repeatedly; the "
                "gateway tries it again shortly. Retry shortly.",
                retry_after=RETRY_AFTER_NO_REPLICA,
                code="provider_circuit_open",
            )
        gateway.routes.acquire(endpoint)
        try:
            async with asyncio.timeout(provider.timeout_seconds):
                response = await gateway.session.post(
                    url, data=body, headers=partner.request_headers(provider)
                )
            failure = None
        except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as error:
            gateway.routes.release(endpoint)
            gateway.breakers.failure(circuit, self.route.deployment_id)
            logger.warning(
                "provider connection %s refused the connection: %s",
                provider.connection_name,
                type(error).__name__,
            )
            raise upstream_error(
                502,
                f"The model's provider ({self.route.partner_publisher}) could not be reached. "
                "Retry shortly.",
                retry_after=RETRY_AFTER_NO_REPLICA,
                code="provider_unreachable",
            ) from None
        except TimeoutError:
            response, failure = (
                None,
                upstream_error(
                    504,
                    f"The model's provider did not answer within {provider.timeout_seconds}s. "
                    "Retry.",
                    code="provider_timeout",
                ),
            )
        except aiohttp.ClientError as error:
            response, failure = (
                None,
                upstream_error(
                    502,
                    f"The connection to the model's provider failed ({type(error).__name__}). "
                    "Retry.",
                    code="provider_connection_failed",
                ),
            )
        except BaseException:
            gateway.routes.release(endpoint)
            gateway.breakers.neither(circuit)
            raise
        self._judged(circuit, response, failure)
        self.outcome = Outcome()
        self.endpoint = endpoint
        gateway.load.started(self.route.deployment_id)
        metrics.for_deployment(str(self.route.deployment_id)).in_flight.inc()
        return response, failure

    def upstream_path(self) -> str:
        return "/v1/chat/completions" if self.request.chat else "/v1/completions"

    async def relay(self, response, failure: GatewayError | None) -> None:
        """Pass the replica's answer on, all but its last bytes (`last_messages`); the replica
        stops counting the request as in flight when this ends."""
        gateway, route, outcome = self.gateway, self.route, self.outcome
        try:
            if failure is not None:  # connected and sent, then no (whole) answer
                outcome.status = failure.status
                raise failure
            if self.request.stream and response.status == 200:
                await self._relay_stream(response)
            else:
                await self._relay_json(response)
        finally:
            if response is not None:
                response.close()
            gateway.routes.release(self.endpoint)
            gateway.load.finished(route.deployment_id)
            deployment_metrics = metrics.for_deployment(str(route.deployment_id))
            deployment_metrics.in_flight.dec()
            deployment_metrics.finished(outcome.status)
            deployment_metrics.latency.observe(time.perf_counter() - self.started)
            if outcome.ttft is not None:
                deployment_metrics.ttft.observe(outcome.ttft)

    async def _relay_json(self, response) -> None:
        outcome = self.outcome
        status = response.status
        try:
            async with asyncio.timeout(self._idle_timeout()):
                if self.upstream is partner.PROVIDER:
                    raw = await self._read_bounded(response)
                else:
                    raw = await response.read()
        except TimeoutError:
            outcome.status = 504
            raise upstream_error(
                504,
                f"The {self.upstream.noun} stopped sending its answer. Retry.",
                code=self.upstream.code("timeout"),
            ) from None
        except aiohttp.ClientError as error:
            outcome.status = 502
            self._replica_broke(error)
            raise upstream_error(
                502,
                f"The connection to the {self.upstream.noun} broke ({type(error).__name__}). "
                "Retry.",
                code=self.upstream.code("connection_failed"),
            ) from None
        extra = []
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError:
            data = None
        if status == 200 and isinstance(data, dict):
            outcome.status = 200
            if isinstance(data.get("usage"), dict):
                outcome.take_usage(data["usage"])
                if self.upstream is partner.PROVIDER:
                    self.stated_usage = data
            if not outcome.usage_seen or self.upstream is partner.PROVIDER:  # see record_usage
                choices = data.get("choices")
                choices = choices if isinstance(choices, list) else ()
                outcome.parts = [_choice_text(choice) for choice in choices]
        elif self.upstream is partner.PROVIDER and status != 200 and isinstance(data, dict):
            error = partner.error_from_provider(status, data, response.headers, self.route.provider)
            outcome.status = status = error.status
            raw = error.body()
            extra += error.headers
        elif isinstance(data, dict) and "error" in data:
            outcome.status = status  # the replica's own error, already in OpenAI's format
            retry_after = response.headers.get("Retry-After")
            if retry_after:
                extra.append((b"retry-after", retry_after.encode()))
        else:
            outcome.status = 502
            if self.upstream is partner.PROVIDER:
                status, raw = 502, partner.bad_response(status)
            else:
                status, raw = (
                    502,
                    error_body(
                        f"The replica answered {status} with a body that is not an OpenAI "
                        "response.",
                        type="server_error",
                        code="replica_bad_response",
                    ),
                )
        # The whole answer leaves after the usage event is committed.
        headers = self.headers(b"application/json", extra)
        headers.append((b"content-length", str(len(raw)).encode()))
        self.headers_sent = True
        self.last_messages = [
            {"type": "http.response.start", "status": status, "headers": headers},
            {"type": "http.response.body", "body": raw},
        ]

    async def _relay_stream(self, response) -> None:
        await self.start_stream()
        send = self.send
        outcome = self.outcome
        content = response.content
        idle = self._idle_timeout()
        who = self.upstream
        hostile = who is partner.PROVIDER  # a third party's: bounded in tokens and bytes too
        answer_timeout = self.gateway.config.answer_timeout
        deadline = time.monotonic() + answer_timeout
        bytes_most = self._answer_bytes_most()
        # The text's bytes at which its estimate passes the overrun bound: counted then, and
        # again each time it grew by a quarter (the model's tokenizer may count fewer).
        count_at = 4 * (2 * self.completion_allowed() + OVERRUN_SLACK_TOKENS) + 1
        received = 0
        buffer = b""
        done = False
        failure = None
        outcome.status = 200
        while True:
            left = deadline - time.monotonic()
            try:
                async with asyncio.timeout(DRAIN_SECONDS if done else min(idle, left)):
                    data = await content.readany()
            except TimeoutError:
                if done:
                    break
                failure = upstream_error(
                    504,
                    f"The {who.noun} did not finish its answer within {answer_timeout:.0f}s."
                    if left <= idle
                    else f"The {who.noun} sent nothing for {idle:.0f}s.",
                    code=who.code("timeout"),
                )
                break
            except aiohttp.ClientError as error:
                if done:
                    break
                self._replica_broke(error)
                failure = upstream_error(
                    502,
                    f"The stream from the {who.noun} broke ({type(error).__name__}).",
                    code=who.code("stream_broken"),
                )
                break
            if not data or done:
                break  # more after [DONE]: left unread, and the connection closed, not reused
            received += len(data)
            buffer += data
            if b"\r\n" in buffer:
                buffer = buffer.replace(b"\r\n", b"\n")
            *events, buffer = buffer.split(b"\n\n")
            out = []
            for event in events:
                kept = self._stream_event(event)
                if kept is _DONE:
                    done = True
                    break
                if kept is _GARBAGE:
                    failure = upstream_error(
                        502,
                        f"The {who.noun} sent a stream event that is not JSON.",
                        code=who.code("bad_response"),
                    )
                    break
                if kept:
                    out.append(kept)
                if hostile and outcome.text_bytes >= count_at:
                    failure = await self._overran()
                    if failure is not None:
                        break
                    count_at = outcome.text_bytes + outcome.text_bytes // 4 + 1
            if failure is None and len(buffer) > MAX_EVENT_BYTES:
                failure = upstream_error(
                    502,
                    f"The {who.noun} sent a stream event longer than {MAX_EVENT_BYTES >> 20} MiB.",
                    code=who.code("bad_response"),
                )
            if failure is None and hostile and received > bytes_most:
                failure = self._too_large(bytes_most)
            if out:
                out.append(b"")
                await send(
                    {"type": "http.response.body", "body": b"\n\n".join(out), "more_body": True}
                )
            if failure is not None:
                break
        if not done and failure is None:
            failure = upstream_error(
                502,
                f"The {who.noun} ended the stream early (no [DONE]).",
                code=who.code("stream_broken"),
            )
        if failure is not None:
            outcome.status = failure.status
        tail = b"data: [DONE]\n\n" if failure is None else b"data: " + failure.body() + b"\n\n"
        self.last_messages = [{"type": "http.response.body", "body": tail, "more_body": False}]

    async def _overran(self) -> GatewayError | None:
        """The error that ends a provider's stream whose text passed twice what the request
        allows (counted like a broken stream's: the model's tokenizer, else the estimate)."""
        allowed = self.completion_allowed()
        tokenizer = self.gateway.tokenizers.get_nowait(self.route.model_version_id)
        counted = await self._count_completion("".join(self.outcome.parts), tokenizer)
        if counted <= 2 * allowed + OVERRUN_SLACK_TOKENS:
            return None
        logger.warning(
            "provider connection %s went on past max_tokens (%d tokens relayed, %d allowed)",
            self.route.provider.connection_name,
            counted,
            allowed,
        )
        return upstream_error(
            502,
            f"The model's provider went on generating past the {allowed} tokens this request "
            "allows (`max_tokens`, else the model's context length); the stream was cut.",
            code="provider_bad_response",
        )

    def _answer_bytes_most(self) -> int:
        """The most bytes a provider's answer may take (see PROVIDER_BYTES_PER_TOKEN)."""
        return (1 << 20) + PROVIDER_BYTES_PER_TOKEN * self.completion_allowed()

    def _too_large(self, most: int) -> GatewayError:
        self.outcome.status = 502
        return upstream_error(
            502,
            f"The model's provider sent more than {most / (1 << 20):.1f} MiB for an answer of "
            f"at most {self.completion_allowed()} tokens.",
            code="provider_bad_response",
        )

    async def _read_bounded(self, response) -> bytes:
        """A provider's whole body, at most `_answer_bytes_most()` of it."""
        most = self._answer_bytes_most()
        if response.content_length is not None and response.content_length > most:
            raise self._too_large(most)
        pieces, size = [], 0
        async for piece in response.content.iter_any():
            size += len(piece)
            if size > most:
                raise self._too_large(most)
            pieces.append(piece)
        return b"".join(pieces)

    def _idle_timeout(self) -> float:
        if self.upstream is partner.PROVIDER:
            return float(self.route.provider.timeout_seconds)
        return self.gateway.config.idle_timeout

    def _replica_broke(self, error: Exception) -> None:
        """The replica reset the connection mid-answer: set it aside and have it looked at."""
        if self.upstream is partner.PROVIDER:
            logger.warning(
                "provider connection %s broke mid-answer: %s",
                self.route.provider.connection_name,
                type(error).__name__,
            )
            return
        self.gateway.routes.unhealthy(
            self.route.deployment_id,
            self.endpoint,
            f"reset the connection mid-answer ({type(error).__name__})",
        )

    def _stream_event(self, event: bytes):
        """The bytes to pass on for one SSE event (None drops it), or _DONE."""
        if not event.startswith(b"data:"):
            return event or None  # comments and other fields pass through
        payload = event[5:].strip()
        if payload == b"[DONE]":
            return _DONE
        try:
            chunk = orjson.loads(payload)
        except orjson.JSONDecodeError:
            # A replica's is passed on as it is; a provider's ends the stream (502).
            return _GARBAGE if self.upstream is partner.PROVIDER else event
        if not isinstance(chunk, dict):
            return event
        outcome = self.outcome
        choices = chunk.get("choices")
        if not isinstance(choices, list):
            choices = ()
        sized = self.upstream is partner.PROVIDER  # only a provider's text is bounded
        for choice in choices:
            text = _choice_text(choice)
            if text:
                outcome.parts.append(text)
                if sized:
                    outcome.text_bytes += len(text.encode())
                if outcome.ttft is None:
                    outcome.ttft = time.perf_counter() - self.started
        usage = chunk.get("usage")
        if usage:
            # The final figure rides on a chunk without choices (vLLM, the runtime) or, from a
            # replica that reports usage once, on the last content chunk; any other is the
            # running count so far (continuous usage, per choice).
            final = not choices or (
                not outcome.continuous
                and all(isinstance(c, dict) and c.get("finish_reason") for c in choices)
            )
            if not final:
                outcome.continuous = True
            index = 0
            if len(choices) == 1 and isinstance(choices[0], dict):
                index = choices[0].get("index", 0)
            outcome.take_usage(usage, final=final, index=index)
            request = self.request
            if request.wants_continuous_usage:
                return event  # the client asked for exactly this
            if not choices:
                # The usage chunk: the client's if it asked for usage, else the gateway's.
                return self._usage_event(event, chunk) if request.wants_usage else None
            if request.wants_usage and final and not outcome.continuous:
                return self._usage_event(event, chunk)  # one usage, on the last content chunk
            del chunk["usage"]  # the running count the gateway asked for, not the client
            return b"data: " + orjson.dumps(chunk)
        return event

    def _usage_event(self, event: bytes, chunk: dict) -> bytes | None:
        """A stream's final usage for the client: a replica's passes now. A provider's is held
        back until its figures are judged and leaves with the stream's last bytes, as OpenAI
        sends it (a chunk of its own, `choices` empty); text riding with it goes on now."""
        if self.upstream is not partner.PROVIDER:
            return event
        usage = chunk.pop("usage")
        held = {name: chunk[name] for name in ("id", "object", "created", "model") if name in chunk}
        self.stated_usage = {**held, "choices": [], "usage": usage}
        return b"data: " + orjson.dumps(chunk) if chunk.get("choices") else None

    # ---- usage ---------------------------------------------------------------------------

    async def record_usage(self) -> None:
        """Write the request's one UsageEvent and wait until it is durable. Called once,
        from `serve()`'s finally."""
        gateway, request, route, outcome = self.gateway, self.request, self.route, self.outcome
        provider = self.upstream is partner.PROVIDER
        distrusted = provider and outcome.usage_seen and not self._usage_believable()
        if distrusted:
            logger.warning(
                "provider connection %s reported usage no request of this size can use; "
                "billed by the gateway's count",
                route.provider.connection_name,
            )
            outcome.usage_seen = outcome.usage_final = False
            outcome.cached_tokens, outcome.cached_reported = 0, None
            outcome.prompt_tokens = outcome.completion_tokens = 0
        source = UsageEvent.Source.UPSTREAM
        if outcome.usage_seen and not outcome.usage_final:
            # Cut before the final figure: the last one the replica reported is billed (what
            # it generated up to then), never a re-count of the text relayed.
            source = UsageEvent.Source.UPSTREAM_PARTIAL
        if not outcome.usage_seen:
            source = UsageEvent.Source.COUNTED
            if outcome.parts or distrusted:
                # The client received text but no (believable) usage: bill what it received,
                # counted with the model's own tokenizer.
                tokenizer = await gateway.tokenizers.get(route.model_version_id)
                outcome.prompt_tokens = request.count_prompt(tokenizer)
                text = "".join(outcome.parts)
                outcome.completion_tokens = await self._count_completion(text, tokenizer)
            if provider:  # never past what the request allowed (and its spend hold priced)
                outcome.completion_tokens = min(
                    outcome.completion_tokens, self.completion_allowed()
                )
        self._state_usage(restate=distrusted)
        deployment_metrics = metrics.for_deployment(str(route.deployment_id))
        deployment_metrics.prompt_tokens.inc(outcome.prompt_tokens)
        deployment_metrics.completion_tokens.inc(outcome.completion_tokens)
        deployment_metrics.cached_tokens.inc(outcome.cached_tokens)
        if outcome.usage_seen:
            gateway.routes.observed(
                route, self.endpoint, request.prefix_keys, outcome.cached_reported
            )
        now = datetime.now(UTC)
        latency = time.perf_counter() - self.started
        event = {
            "request_id": self.request_id,
            "client_request_id": (
                self.client_request_id.decode() if self.client_request_id is not None else None
            ),
            "organization_id": self.caller.organization_id,
            "api_key_id": self.caller.key_id,
            "project_id": self.caller.project_id,
            "end_user": request.end_user,
            "tags": request.tags,
            "deployment_id": route.deployment_id,
            "model_version_id": route.model_version_id,
            "deployment_type": route.deployment_type,
            "model": request.model[:200],
            "prompt_tokens": outcome.prompt_tokens,
            "completion_tokens": outcome.completion_tokens,
            "cached_tokens": outcome.cached_tokens,
            "status_code": outcome.status,
            "latency_ms": round(latency * 1000, 3),
            "ttft_ms": round(outcome.ttft * 1000, 3) if outcome.ttft is not None else None,
            "usage_source": source,
            "provider_connection_id": (
                route.provider.connection_id if self.upstream is partner.PROVIDER else None
            ),
            "fallback_from_deployment_id": self.fallback_from,
            "started_at": now - timedelta(seconds=latency),
            "finished_at": now,
        }
        submitted = gateway.usage.submit(event)
        try:
            # Bounded by the writer: the database's bound, then one spool append.
            await asyncio.shield(submitted)
        except UsageNotDurable:
            # Not acknowledged: the answer's last bytes become the error.
            self.last_messages = self._error_messages(_usage_not_recorded())

    def _state_usage(self, *, restate: bool) -> None:
        """Put the usage a provider reported into the answer's last bytes, with the gateway's
        own figures where they replace the provider's: the client sees what it is billed."""
        answer, outcome = self.stated_usage, self.outcome
        if answer is None or not self.last_messages:
            return
        if restate:
            answer["usage"] = {
                "prompt_tokens": outcome.prompt_tokens,
                "completion_tokens": outcome.completion_tokens,
                "total_tokens": outcome.prompt_tokens + outcome.completion_tokens,
            }
        last = self.last_messages[-1]
        if self.request.stream:  # the held-back chunk goes out before the stream's tail
            last["body"] = b"data: " + orjson.dumps(answer) + b"\n\n" + last["body"]
        elif restate:
            start = self.last_messages[0]
            last["body"] = orjson.dumps(answer)
            start["headers"] = [
                (name, value) for name, value in start["headers"] if name != b"content-length"
            ] + [(b"content-length", str(len(last["body"])).encode())]

    def _usage_believable(self) -> bool:
        """A provider's figures are counts a request of this size can use: a prompt of at
        most twice the body's bound plus PROVIDER_PROMPT_SLACK, a completion of at most what
        the request allows, cached tokens within the prompt. Else the gateway counts."""
        outcome = self.outcome
        return (
            not outcome.usage_invalid
            and outcome.prompt_tokens
            <= 2 * prompt_token_bound(self.body_bytes) + PROVIDER_PROMPT_SLACK
            and outcome.completion_tokens <= self.completion_allowed()
            and outcome.cached_tokens <= outcome.prompt_tokens
        )

    def _error_messages(self, error: GatewayError) -> list[dict]:
        """`error` as the response's last messages: a whole response while the held-back
        answer still had its start, else the stream's final event."""
        if self.last_messages and self.last_messages[0]["type"] == "http.response.start":
            headers = self.headers(b"application/json", error.headers)
            body = error.body()
            headers.append((b"content-length", str(len(body)).encode()))
            return [
                {"type": "http.response.start", "status": error.status, "headers": headers},
                {"type": "http.response.body", "body": body},
            ]
        tail = b"data: " + error.body() + b"\n\n"
        return [{"type": "http.response.body", "body": tail, "more_body": False}]


def _usage_not_recorded() -> GatewayError:
    return upstream_error(
        503,
        "The platform cannot record usage right now (its database and the gateway's local "
        "spool are both unavailable), so this request was not completed. Retry shortly.",
        retry_after=RETRY_AFTER_NO_REPLICA,
        code="usage_not_recorded",
    )


def _choice_text(choice) -> str:
    if not isinstance(choice, dict):
        return ""
    delta = choice.get("delta") or choice.get("message")
    if isinstance(delta, dict):
        content = delta.get("content")
        text = message_text(content) if content else ""
        if isinstance(content, list):  # Mistral's thinking parts: [{type: thinking, thinking}]
            for part in content:
                if isinstance(part, dict) and part.get("type") == "thinking":
                    text += message_text(part.get("thinking"))
        # A reasoning model's thinking (vLLM's `reasoning_content`, newer `reasoning`) and a
        # tool call's name and arguments are generated tokens too (counted when a stream
        # breaks before the replica reported its usage).
        for name in ("reasoning_content", "reasoning"):
            reasoning = delta.get(name)
            text += reasoning if isinstance(reasoning, str) else ""
        for call in delta.get("tool_calls") or ():
            function = call.get("function") if isinstance(call, dict) else None
            if isinstance(function, dict):
                for part in (function.get("name"), function.get("arguments")):
                    text += part if isinstance(part, str) else ""
        return text
    text = choice.get("text")
    return text if isinstance(text, str) else ""


def _worst_case(request, prompt_tokens: int, exact: bool, max_model_len, body_bytes: int):
    """(tokens to reserve against the rate limits, most prompt tokens, most completion
    tokens): the last two price the spend hold, so they bound what the request can be billed
    (an estimated prompt is replaced by the body-size bound)."""
    n, max_tokens = request.n, request.max_tokens
    if max_model_len is None:
        reserve = prompt_tokens + n * (max_tokens or UNKNOWN_COMPLETION_RESERVE)
        prompt_most = prompt_tokens if exact else prompt_token_bound(body_bytes)
        return reserve, prompt_most, n * (max_tokens or UNKNOWN_COMPLETION_RESERVE)
    reserve = check_context(request, prompt_tokens, max_model_len, exact=exact)
    if exact:
        prompt_most = prompt_tokens
    else:  # the replica refuses a prompt that leaves no room for max_tokens
        prompt_most = min(prompt_token_bound(body_bytes), max_model_len - (max_tokens or 0))
    return reserve, prompt_most, n * (max_tokens or max_model_len - prompt_most)


def _spend_refused(admission: Admission) -> GatewayError:
    left = admission.spend_left or 0
    whose = (
        "your project's monthly budget"
        if admission.spend_scope == "project"
        else "your organization's spending limit"
    )
    if left <= 0:
        message = (
            f"You exceeded {whose}. Raise the limit (billing settings in the console) or "
            "wait for the next billing period."
        )
    else:
        message = (
            f"This request could cost up to {_amount(admission.spend.cost)}, more than the "
            f"{_amount(left)} left under {whose} for this period (requests in flight "
            "included). Lower max_tokens or n, shorten the prompt, or raise the limit."
        )
    return GatewayError(429, message, type="insufficient_quota", code="insufficient_quota")


def _amount(nanos: int) -> str:
    return f"{Decimal(nanos) / NANOS:.6f}".rstrip("0").rstrip(".")


def _rate_limited(admission: Admission, caller: Caller) -> GatewayError:
    refused = admission.refused
    whose = {
        "key": f"API key {caller.display_prefix}…",
        "project": "your project",
        "provider": "the platform's shared quota with this model's provider",
        "provider_share": "your organization's share of the platform's quota with this "
        "model's provider",
    }.get(refused.scope, "your organization")
    unit = "requests" if refused.kind == "requests" else "tokens"
    if math.isinf(admission.wait_seconds):
        return GatewayError(
            429,
            f"Request too large: it needs {refused.cost} tokens (prompt + max_tokens), more "
            f"than the {refused.limit} tokens per minute allowed for {whose}. Lower max_tokens "
            "or shorten the prompt.",
            type="tokens",
            code="rate_limit_exceeded",
        )
    wait = max(admission.wait_seconds, 0.001)
    return GatewayError(
        429,
        f"Rate limit reached for {whose} on {unit} per minute: limit {refused.limit}. "
        f"Please try again in {wait:.3g}s.",
        type=unit,
        code="rate_limit_exceeded",
        headers=[(b"retry-after", str(math.ceil(wait)).encode())],
    )


def _limiter_unavailable(what: str) -> GatewayError:
    """Redis, which holds the limits and the spend counters, did not answer: retry soon."""
    return upstream_error(
        503,
        f"{what} cannot be checked right now. Retry shortly.",
        retry_after=1,
        code="rate_limiter_unavailable",
    )
