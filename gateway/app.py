"""The /v1 data path as a plain ASGI application.

No Django middleware, URL resolver or request object on this path: they cost more than the
whole proxying does (docs/benchmarks.md). Django is used only for the ORM, from DB threads that
fill small caches, and from the usage writer thread.

A completion request goes: key (cached) → body (size-capped) → JSON checks → route (cached)
→ spend limit (cached) → prompt tokens → context check → rate limits (one atomic step) →
replica (least in flight; another one on a refused connect; scale from zero if none) → relay
(SSE chunk by chunk) → usage event committed → last bytes → limits settled with the real usage.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import re
import time
import uuid
from datetime import UTC, datetime, timedelta

import aiohttp
import orjson
import redis

from gateway import metrics, revocation, sources
from gateway.auth import KeyCache, touch_keys, touch_keys_forever
from gateway.budget import SpendLimits
from gateway.conf import GatewaySettings
from gateway.dbthreads import DatabaseUnavailable, DbThreads
from gateway.errors import GatewayError, error_body, model_not_found, upstream_error
from gateway.limits import LocalRateLimiter, RedisRateLimiter, limits_for
from gateway.load import LoadTracker, report_load_forever
from gateway.models import UsageEvent
from gateway.protocol import check_context, parse_request
from gateway.routing import RouteTable
from gateway.tokenizer_files import tokenizer_folder
from gateway.tokens import Tokenizers, estimate_text, message_text
from gateway.usage import UsageWriter

logger = logging.getLogger("sirocco.gateway")

_VALID_REQUEST_ID = re.compile(rb"^[A-Za-z0-9._:-]{1,128}$")
# Deployments in these states get a replica soon: requests wait for it rather than fail.
WAITING_STATUSES = {"pending", "provisioning", "scaling", "updating"}
RETRY_AFTER_NO_REPLICA = 10
# What a request without max_tokens reserves when the model's context length is unknown.
UNKNOWN_COMPLETION_RESERVE = 4096

JSON = b"application/json"
_DONE = object()


# Unique request ids without a system call each: a random per-process prefix and a counter.
_REQUEST_ID_PREFIX = "req_" + uuid.uuid4().hex[:16]
_request_counter = itertools.count(1)


def _new_request_id() -> bytes:
    return f"{_REQUEST_ID_PREFIX}{next(_request_counter):016x}".encode()


class ClientGone(Exception):
    """The client closed the connection before its request was read whole."""


class Exchange:
    """One request/response: its id, timing and what was already sent."""

    __slots__ = (
        "client_gone",
        "finishing",
        "headers_sent",
        "rate_headers",
        "request_id",
        "send",
        "started",
    )

    def __init__(self, request_id: bytes, send):
        self.request_id = request_id
        self.send = send
        self.started = time.perf_counter()
        self.headers_sent = False
        self.client_gone = False
        self.finishing = False  # the last bytes are being sent: a disconnect now is normal
        self.rate_headers: list[tuple[bytes, bytes]] = []

    def headers(self, content_type: bytes, extra=()) -> list[tuple[bytes, bytes]]:
        return [
            (b"content-type", content_type),
            (b"x-request-id", self.request_id),
            *self.rate_headers,
            *extra,
        ]

    async def respond(self, status: int, body: bytes, extra=()) -> None:
        headers = self.headers(JSON, extra)
        headers.append((b"content-length", str(len(body)).encode()))
        self.headers_sent = True
        await self.send({"type": "http.response.start", "status": status, "headers": headers})
        await self.send({"type": "http.response.body", "body": body})

    async def start_stream(self) -> None:
        if not self.headers_sent:
            self.headers_sent = True
            await self.send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": self.headers(
                        b"text/event-stream; charset=utf-8",
                        [(b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")],
                    ),
                }
            )


class Outcome:
    """What a request that reached a replica used: becomes its one UsageEvent."""

    __slots__ = (
        "cached_tokens",
        "completion_tokens",
        "parts",
        "prompt_tokens",
        "status",
        "submitted",
        "ttft",
        "usage_seen",
    )

    def __init__(self):
        self.status = 502
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.cached_tokens = 0
        self.usage_seen = False
        self.ttft: float | None = None
        self.parts: list[str] = []
        self.submitted: asyncio.Future | None = None

    def take_usage(self, usage) -> None:
        if not isinstance(usage, dict):
            return
        self.usage_seen = True
        self.prompt_tokens = _int(usage.get("prompt_tokens"))
        self.completion_tokens = _int(usage.get("completion_tokens"))
        details = usage.get("prompt_tokens_details")
        self.cached_tokens = _int(details.get("cached_tokens")) if isinstance(details, dict) else 0


def _int(value) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


class Gateway:
    """What one gateway process holds: caches, limiter, usage writer, upstream connections."""

    def __init__(self, config: GatewaySettings):
        self.config = config
        self.db = DbThreads(config.db_threads)
        self.keys = KeyCache(self.db, ttl=config.auth_cache_seconds)
        self.routes = RouteTable(
            self.db,
            ttl=config.route_cache_seconds,
            route_for=sources.route_for,
            callable_models=sources.callable_models,
            request_scale_up=sources.request_scale_up,
        )
        self.spend = SpendLimits(
            self.db,
            ttl=config.spend_cache_seconds,
            spend_blocked=sources.organization_spend_blocked,
        )
        self.tokenizers = Tokenizers(
            self.db,
            sources.tokenizer_source,
            tokenizer_folder,
            wait_seconds=config.tokenizer_wait_seconds,
        )
        self.limiter = (
            RedisRateLimiter(config.redis_url, prefix=config.redis_prefix)
            if config.redis_url
            else LocalRateLimiter()
        )
        self.usage = UsageWriter(synchronous_commit=config.usage_synchronous_commit)
        self.load = LoadTracker()
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=60, ttl_dns_cache=300),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=config.connect_timeout),
            skip_auto_headers=("User-Agent", "Accept-Encoding"),
            auto_decompress=False,
        )
        loop = asyncio.get_running_loop()
        # Background loops that only sleep between rounds: cancelled on close.
        self._sleepers = [
            loop.create_task(
                report_load_forever(
                    self.load, self.db, sources.load_report, config.load_report_seconds
                )
            ),
            loop.create_task(touch_keys_forever(self.keys, self.db)),
        ]
        self._tasks = list(self._sleepers)
        self._stopping = asyncio.Event()
        if config.redis_url:
            self._tasks.append(
                asyncio.get_running_loop().create_task(
                    revocation.listen_for_revocations(
                        config.redis_url, config.redis_prefix, self.keys, self._stopping
                    )
                )
            )
        revocation.register(self.keys)

    async def close(self) -> None:
        revocation.unregister(self.keys)
        self.tokenizers.close()
        self._stopping.set()  # the revocation listener polls this flag
        for task in self._sleepers:
            task.cancel()
        await asyncio.wait(self._tasks, timeout=5)
        try:
            await touch_keys(self.keys, self.db)
        except Exception:
            logger.warning("recording API key use failed", exc_info=True)
        await self.session.close()
        if isinstance(self.limiter, RedisRateLimiter):
            await self.limiter.close()
        await self.usage.close()
        await asyncio.to_thread(self.db.stop)


class GatewayApp:
    """The ASGI application. `health` adds /healthz, /readyz and /metrics (standalone use)."""

    def __init__(self, *, health: bool = False, **config_overrides):
        self._health = health
        self.config_overrides = config_overrides
        self.gateway: Gateway | None = None
        self._starting: asyncio.Lock | None = None

    async def __call__(self, scope, receive, send):
        kind = scope["type"]
        if kind == "http":
            await self._http(scope, receive, send)
        elif kind == "lifespan":
            await self._lifespan(receive, send)

    async def startup(self) -> Gateway:
        if self.gateway is None:
            if self._starting is None:
                self._starting = asyncio.Lock()
            async with self._starting:
                if self.gateway is None:
                    config = GatewaySettings.from_django(**self.config_overrides)
                    self.gateway = Gateway(config)
        return self.gateway

    async def shutdown(self) -> None:
        if self.gateway is not None:
            gateway, self.gateway = self.gateway, None
            await gateway.close()

    async def _lifespan(self, receive, send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self.startup()
                except Exception as error:
                    logger.exception("the gateway could not start")
                    await send({"type": "lifespan.startup.failed", "message": str(error)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.shutdown()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _http(self, scope, receive, send) -> None:
        headers = dict(scope["headers"])
        supplied = headers.get(b"x-request-id", b"")
        request_id = (
            supplied if supplied and _VALID_REQUEST_ID.match(supplied) else _new_request_id()
        )
        exchange = Exchange(request_id, send)
        path, method = scope["path"], scope["method"]
        try:
            gateway = self.gateway or await self.startup()
            if path in ("/v1/chat/completions", "/v1/completions"):
                _require_method(method, "POST", path)
                await self._completion(
                    gateway, exchange, receive, headers, chat=path == "/v1/chat/completions"
                )
            elif path == "/v1/models" or path.startswith("/v1/models/"):
                _require_method(method, "GET", path)
                await self._models(gateway, exchange, headers, path[len("/v1/models/") :])
            elif self._health and path in ("/healthz", "/readyz", "/metrics"):
                await self._health_endpoint(gateway, exchange, path)
            else:
                raise GatewayError(
                    404,
                    f"Invalid URL ({method} {path}). The API serves /v1/models, "
                    "/v1/chat/completions and /v1/completions.",
                )
        except GatewayError as error:
            metrics.REFUSED.labels(str(error.status)).inc()
            await self._send_error(exchange, error)
        except ClientGone:
            pass
        except DatabaseUnavailable:
            logger.exception("the database did not answer (request %s)", request_id.decode())
            await self._send_error(
                exchange,
                upstream_error(
                    503,
                    "The platform's database did not answer in time. Retry shortly.",
                    retry_after=RETRY_AFTER_NO_REPLICA,
                ),
            )
        except Exception:
            logger.exception("unexpected error in the gateway (request %s)", request_id.decode())
            await self._send_error(
                exchange,
                GatewayError(
                    500,
                    "The gateway failed to handle this request; it has been logged under "
                    f"request id {request_id.decode()}. Retry, and report the id if it persists.",
                    type="server_error",
                ),
            )

    async def _send_error(self, exchange: Exchange, error: GatewayError) -> None:
        with contextlib.suppress(OSError):
            if not exchange.headers_sent:
                await exchange.respond(error.status, error.body(), error.headers)
            else:
                # A stream already started (scale-from-zero progress): say it in the stream.
                await exchange.send(
                    {
                        "type": "http.response.body",
                        "body": b"data: " + error.body() + b"\n\n",
                        "more_body": False,
                    }
                )

    # ---- /v1/models -------------------------------------------------------------------------

    async def _models(self, gateway: Gateway, exchange: Exchange, headers, model_id: str):
        caller = await gateway.keys.authenticate(headers.get(b"authorization"))
        models = await gateway.routes.models(caller.organization_id)
        entries = [
            {"id": name, "object": "model", "created": int(created), "owned_by": "organization"}
            for name, created in models
        ]
        if model_id:
            entry = next((e for e in entries if e["id"] == model_id), None)
            if entry is None:
                raise model_not_found(model_id)
            await exchange.respond(200, orjson.dumps(entry))
            return
        await exchange.respond(200, orjson.dumps({"object": "list", "data": entries}))

    # ---- health (standalone process) --------------------------------------------------------

    async def _health_endpoint(self, gateway: Gateway, exchange: Exchange, path: str) -> None:
        if path == "/healthz":
            await exchange.respond(200, b'{"status":"ok"}')
        elif path == "/metrics":
            from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

            body = generate_latest()
            exchange.headers_sent = True
            await exchange.send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [
                        (b"content-type", CONTENT_TYPE_LATEST.encode()),
                        (b"x-request-id", exchange.request_id),
                    ],
                }
            )
            await exchange.send({"type": "http.response.body", "body": body})
        else:
            checks = {"database": await gateway.db.call(_database_check)}
            if gateway.config.redis_url:
                checks["redis"] = await asyncio.to_thread(_redis_check, gateway.config.redis_url)
            failing = any(value != "ok" for value in checks.values())
            body = {"status": "unavailable" if failing else "ok", "checks": checks}
            await exchange.respond(503 if failing else 200, orjson.dumps(body))

    # ---- completions ------------------------------------------------------------------------

    async def _completion(self, gateway: Gateway, exchange: Exchange, receive, headers, *, chat):
        config = gateway.config
        caller = await gateway.keys.authenticate(headers.get(b"authorization"))
        raw = await _read_body(receive, config.max_body_bytes, headers.get(b"content-length"))
        request = parse_request(raw, chat=chat)
        route = await gateway.routes.route(caller.organization_id, request.model)
        if route is None:
            raise model_not_found(request.model)
        if await gateway.spend.blocked(caller.organization_id):
            raise GatewayError(
                429,
                "You exceeded your organization's spending limit. Raise the limit (billing "
                "settings in the console) or wait for the next billing period.",
                type="insufficient_quota",
                code="insufficient_quota",
            )
        tokenizer = gateway.tokenizers.get_nowait(route.model_version_id)
        prompt_tokens = request.count_prompt(tokenizer)
        if route.max_model_len is None:
            reserve = prompt_tokens + (request.max_tokens or UNKNOWN_COMPLETION_RESERVE)
        else:
            reserve = check_context(
                request, prompt_tokens, route.max_model_len, exact=tokenizer is not None
            )
        admission = await _admit(gateway, caller, reserve)
        exchange.rate_headers = admission.headers()
        if not admission.allowed:
            raise _rate_limited(admission, caller)
        used = 0
        try:
            outcome = await self._forward(gateway, exchange, receive, request, route, caller)
            used = outcome.prompt_tokens + outcome.completion_tokens if outcome else 0
        finally:
            try:
                await gateway.limiter.settle(admission, used)
            except (redis.RedisError, OSError):
                logger.warning("settling rate limits failed", exc_info=True)

    async def _forward(self, gateway, exchange, receive, request, route, caller):
        """Relay to a replica. Returns the Outcome of a request that reached one, else None."""
        handler = asyncio.current_task()
        watcher = asyncio.get_running_loop().create_task(
            _watch_disconnect(receive, handler, exchange)
        )
        outcome = None
        try:
            route = await self._replicas(gateway, exchange, request, route, caller)
            path = "/v1/chat/completions" if request.chat else "/v1/completions"
            endpoint, response, failure = await self._connect(
                gateway,
                exchange,
                route,
                path,
                request.upstream_body(route.served_model_name),
                request.model,
            )
            if endpoint is None:
                raise failure  # no replica took the request: nothing was served, no usage
            outcome = Outcome()
            await self._relay(
                gateway, exchange, request, route, caller, outcome, endpoint, response, failure
            )
        except asyncio.CancelledError:
            if not exchange.client_gone:
                raise
            handler.uncancel()
            if outcome is not None and not exchange.finishing:
                outcome.status = 499
        finally:
            watcher.cancel()
            if outcome is not None and outcome.submitted is None:
                # Cut short (client gone): the event is still written, exactly once.
                await self._record(gateway, exchange, request, route, caller, outcome)
        return outcome

    async def _relay(
        self, gateway, exchange, request, route, caller, outcome, endpoint, response, failure
    ):
        deployment_metrics = metrics.for_deployment(str(route.deployment_id))
        gateway.load.started(route.deployment_id)
        deployment_metrics.in_flight.inc()
        try:
            if failure is not None:  # connected and sent, then no (whole) answer
                outcome.status = failure.status
                await self._record(gateway, exchange, request, route, caller, outcome)
                raise failure
            if request.stream and response.status == 200:
                await self._relay_stream(
                    gateway, exchange, request, route, caller, response, outcome
                )
            else:
                await self._relay_json(gateway, exchange, request, route, caller, response, outcome)
        finally:
            if response is not None:
                response.close()
            gateway.routes.release(endpoint)
            gateway.load.finished(route.deployment_id)
            deployment_metrics.in_flight.dec()
            deployment_metrics.finished(outcome.status)
            deployment_metrics.prompt_tokens.inc(outcome.prompt_tokens)
            deployment_metrics.completion_tokens.inc(outcome.completion_tokens)
            deployment_metrics.latency.observe(time.perf_counter() - exchange.started)
            if outcome.ttft is not None:
                deployment_metrics.ttft.observe(outcome.ttft)

    async def _replicas(self, gateway, exchange, request, route, caller):
        """The route with at least one ready replica, waiting for a scale-up if need be."""
        if route.replicas:
            return route
        config = gateway.config
        if not route.can_scale_from_zero and route.status not in WAITING_STATUSES:
            raise upstream_error(
                503,
                f"The deployment `{request.model}` has no ready replica (status: {route.status}). "
                "Check it in the console or with GET /api/v1/deployments.",
                retry_after=RETRY_AFTER_NO_REPLICA,
            )
        if route.can_scale_from_zero:
            await gateway.routes.ask_for_replicas(route.deployment_id)
        waited_from = time.monotonic()
        deadline = waited_from + config.scale_from_zero_wait
        next_progress = waited_from
        while True:
            now = time.monotonic()
            if request.stream and now >= next_progress:
                await exchange.start_stream()
                note = (
                    f": waiting for a replica of {request.model} "
                    f"({route.status}, {now - waited_from:.0f}s)\n\n"
                )
                await exchange.send(
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
                )
            await asyncio.sleep(min(0.5, max(0.0, deadline - now)))
            route = await gateway.routes.route(caller.organization_id, request.model, fresh=True)
            if route is None:
                raise model_not_found(request.model)
            if route.replicas:
                return route

    async def _connect(self, gateway, exchange, route, path, body, model):
        """Send the request to a replica: (endpoint, response, None) once its headers came,
        (endpoint, None, error) when it was sent but failed, (None, None, error) when no
        replica could be connected to. A refused connect is retried on another replica."""
        config = gateway.config
        headers = {"content-type": "application/json", "x-request-id": exchange.request_id.decode()}
        tried: set[str] = set()
        refused = None
        while (endpoint := gateway.routes.pick(route, tried)) is not None:
            tried.add(endpoint)
            gateway.routes.acquire(endpoint)
            try:
                async with asyncio.timeout(config.first_byte_timeout):
                    response = await gateway.session.post(
                        endpoint + path, data=body, headers=headers
                    )
                return endpoint, response, None
            except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as error:
                gateway.routes.release(endpoint)
                if gateway.routes.refused(endpoint):
                    logger.warning("replica %s refused the connection: %s", endpoint, error)
                refused = error
            except TimeoutError:
                return (
                    endpoint,
                    None,
                    upstream_error(
                        504,
                        f"The replica did not answer within {config.first_byte_timeout:.0f}s. "
                        "Retry, or ask for fewer tokens.",
                    ),
                )
            except aiohttp.ClientError as error:
                return (
                    endpoint,
                    None,
                    upstream_error(
                        502,
                        f"The connection to the replica failed ({type(error).__name__}). Retry.",
                    ),
                )
            except BaseException:
                gateway.routes.release(endpoint)
                raise
        return (
            None,
            None,
            upstream_error(
                502 if refused else 503,
                f"No replica of `{model}` accepted the connection "
                f"({len(tried)} tried). Retry shortly.",
                retry_after=RETRY_AFTER_NO_REPLICA,
            ),
        )

    async def _relay_json(self, gateway, exchange, request, route, caller, response, outcome):
        status = response.status
        try:
            async with asyncio.timeout(gateway.config.idle_timeout):
                raw = await response.read()
        except TimeoutError:
            outcome.status = 504
            await self._record(gateway, exchange, request, route, caller, outcome)
            raise upstream_error(504, "The replica stopped sending its answer. Retry.") from None
        except aiohttp.ClientError as error:
            outcome.status = 502
            await self._record(gateway, exchange, request, route, caller, outcome)
            raise upstream_error(
                502, f"The connection to the replica broke ({type(error).__name__}). Retry."
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
            else:
                outcome.parts = [_choice_text(choice) for choice in data.get("choices") or ()]
        elif isinstance(data, dict) and "error" in data:
            outcome.status = status  # the replica's own error, already in OpenAI's format
            retry_after = response.headers.get("Retry-After")
            if retry_after:
                extra.append((b"retry-after", retry_after.encode()))
        else:
            outcome.status = 502
            status, raw = (
                502,
                error_body(
                    f"The replica answered {status} with a body that is not an OpenAI response.",
                    type="server_error",
                ),
            )
        await self._record(gateway, exchange, request, route, caller, outcome)
        exchange.finishing = True
        await exchange.respond(status, raw, extra)

    async def _relay_stream(self, gateway, exchange, request, route, caller, response, outcome):
        await exchange.start_stream()
        send = exchange.send
        content = response.content
        idle = gateway.config.idle_timeout
        buffer = b""
        done = False
        failure = None
        outcome.status = 200
        while True:
            try:
                async with asyncio.timeout(idle):
                    data = await content.readany()
            except TimeoutError:
                failure = upstream_error(504, f"The replica sent nothing for {idle:.0f}s.")
                break
            except aiohttp.ClientError as error:
                failure = upstream_error(
                    502, f"The stream from the replica broke ({type(error).__name__})."
                )
                break
            if not data:
                break
            if done:
                continue  # read to the end so the connection can be reused
            buffer += data
            if b"\r\n" in buffer:
                buffer = buffer.replace(b"\r\n", b"\n")
            if b"\n\n" not in buffer:
                continue
            *events, buffer = buffer.split(b"\n\n")
            out = []
            for event in events:
                kept = self._stream_event(event, exchange, request, outcome)
                if kept is _DONE:
                    done = True
                    break
                if kept:
                    out.append(kept)
            if out:
                out.append(b"")
                await send(
                    {"type": "http.response.body", "body": b"\n\n".join(out), "more_body": True}
                )
        if not done and failure is None:
            failure = upstream_error(502, "The replica ended the stream early.")
        if failure is not None:
            outcome.status = failure.status
        await self._record(gateway, exchange, request, route, caller, outcome)
        exchange.finishing = True
        tail = b"data: [DONE]\n\n" if failure is None else b"data: " + failure.body() + b"\n\n"
        await send({"type": "http.response.body", "body": tail, "more_body": False})

    def _stream_event(self, event: bytes, exchange, request, outcome):
        """The bytes to pass on for one SSE event (None drops it), or _DONE."""
        if not event.startswith(b"data:"):
            return event or None  # comments and other fields pass through
        payload = event[5:].strip()
        if payload == b"[DONE]":
            return _DONE
        try:
            chunk = orjson.loads(payload)
        except orjson.JSONDecodeError:
            return event
        if not isinstance(chunk, dict):
            return event
        choices = chunk.get("choices") or ()
        for choice in choices:
            text = _choice_text(choice)
            if text:
                outcome.parts.append(text)
                if outcome.ttft is None:
                    outcome.ttft = time.perf_counter() - exchange.started
        usage = chunk.get("usage")
        if usage:
            outcome.take_usage(usage)
            if not request.wants_usage:
                if not choices:
                    return None  # the usage chunk we asked for; the client did not
                del chunk["usage"]
                return b"data: " + orjson.dumps(chunk)
        return event

    async def _record(self, gateway, exchange, request, route, caller, outcome) -> None:
        """Write the request's one UsageEvent and wait until it is committed."""
        if outcome.submitted is not None:
            return
        source = UsageEvent.Source.UPSTREAM
        if not outcome.usage_seen:
            source = UsageEvent.Source.COUNTED
            if outcome.parts:
                # The client received text but no usage: bill what it received, counted with
                # the model's own tokenizer.
                tokenizer = await gateway.tokenizers.get(route.model_version_id)
                outcome.prompt_tokens = request.count_prompt(tokenizer)
                text = "".join(outcome.parts)
                outcome.completion_tokens = (
                    tokenizer.count_text(text) if tokenizer else estimate_text(text)
                )
        now = datetime.now(UTC)
        latency = time.perf_counter() - exchange.started
        event = {
            "request_id": exchange.request_id.decode(),
            "organization_id": caller.organization_id,
            "api_key_id": caller.key_id,
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
            "started_at": now - timedelta(seconds=latency),
            "finished_at": now,
        }
        outcome.submitted = gateway.usage.submit(event)
        try:
            async with asyncio.timeout(gateway.config.usage_commit_timeout):
                await asyncio.shield(outcome.submitted)
        except TimeoutError:
            # The writer keeps retrying; the response is not held hostage to the database.
            logger.error("usage event %s not committed in time", event["request_id"])


def _choice_text(choice) -> str:
    if not isinstance(choice, dict):
        return ""
    delta = choice.get("delta") or choice.get("message")
    if isinstance(delta, dict):
        content = delta.get("content")
        return message_text(content) if content else ""
    text = choice.get("text")
    return text if isinstance(text, str) else ""


async def _admit(gateway: Gateway, caller, tokens: int):
    config = gateway.config
    limits = limits_for(
        key_id=caller.key_id,
        key_rpm=caller.rpm_limit,
        key_tpm=caller.tpm_limit,
        organization_id=caller.organization_id,
        org_rpm=config.org_rpm_limit,
        org_tpm=config.org_tpm_limit,
        tokens=tokens,
    )
    try:
        return await gateway.limiter.admit(limits)
    except (redis.RedisError, OSError):
        logger.exception("the rate limiter is unreachable")
        raise upstream_error(
            503, "Rate limits cannot be checked right now. Retry shortly.", retry_after=1
        ) from None


def _rate_limited(admission, caller) -> GatewayError:
    refused = admission.refused
    whose = f"API key {caller.display_prefix}…" if refused.scope == "key" else "your organization"
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


def _require_method(method: str, allowed: str, path: str) -> None:
    if method != allowed:
        raise GatewayError(
            405,
            f"{method} is not allowed on {path}; use {allowed}.",
            headers=[(b"allow", allowed.encode())],
        )


async def _read_body(receive, limit: int, content_length: bytes | None) -> bytes:
    if content_length is not None and content_length.isdigit() and int(content_length) > limit:
        raise _too_large(limit)
    chunks = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _too_large(limit: int) -> GatewayError:
    return GatewayError(
        413,
        f"The request body is over the {limit} bytes this gateway accepts. Shorten the "
        "prompt or the messages.",
        code="request_too_large",
    )


async def _watch_disconnect(receive, handler: asyncio.Task, exchange: Exchange) -> None:
    """Cancel the request's handler as soon as its client goes away (stops the replica)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            if not exchange.finishing:
                exchange.client_gone = True
                handler.cancel()
            return


def _database_check() -> str:
    from django.db import connection

    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
        return "ok"
    except Exception as error:
        return f"{type(error).__name__}: {error}"


def _redis_check(url: str) -> str:
    try:
        redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2).ping()
        return "ok"
    except Exception as error:
        return f"{type(error).__name__}: {error}"
