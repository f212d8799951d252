"""The /v1 data path as a plain ASGI application: dispatch, lifespan and health.

No Django middleware, URL resolver or request object on this path: they cost more than the
whole proxying does (docs/benchmarks.md). Django is used only for the ORM, from DB threads that
fill small caches, and from the usage writer.

Each request becomes one object that owns it (gateway/exchange.py): a `Completion`
(gateway/completion.py) for /v1/chat/completions and /v1/completions, an `Embedding`
(gateway/embedding.py) for /v1/embeddings, a `ModelList`
(gateway/model_list.py) for /v1/models. What the whole process shares lives in a `Gateway`
(gateway/process.py), made at startup.
"""

from __future__ import annotations

import asyncio
import logging

import orjson
import redis

from controlplane.ops import metrics_refusal
from gateway.completion import Completion
from gateway.conf import GatewaySettings
from gateway.embedding import Embedding
from gateway.errors import GatewayError, upstream_error
from gateway.exchange import Exchange, Receive, Scope, Send
from gateway.model_list import ModelList
from gateway.process import Gateway

logger = logging.getLogger("sirocco.gateway")

COMPLETION_PATHS = {"/v1/chat/completions": True, "/v1/completions": False}  # path → chat


class GatewayApp:
    """The ASGI application. `health` adds /healthz, /readyz and /metrics (standalone use)."""

    def __init__(self, *, health: bool = False, **config_overrides):
        self._health = health
        self.config_overrides = config_overrides
        self.gateway: Gateway | None = None
        self._starting: asyncio.Lock | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
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

    async def _lifespan(self, receive: Receive, send: Send) -> None:
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

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        path, method = scope["path"], scope["method"]
        try:
            gateway = self.gateway or await self.startup()
        except Exception:
            logger.exception("the gateway could not start")
            error = upstream_error(
                503,
                "The gateway is not ready yet. Retry shortly.",
                retry_after=1,
                code="gateway_unavailable",
            )
            await _Refusal(scope, receive, send, error).run()
            return
        chat = COMPLETION_PATHS.get(path)
        if chat is not None:
            exchange = (
                Completion(gateway, scope, receive, send, chat=chat)
                if method == "POST"
                else _Refusal(scope, receive, send, _method_not_allowed(method, "POST", path))
            )
        elif path == "/v1/embeddings":
            exchange = (
                Embedding(gateway, scope, receive, send)
                if method == "POST"
                else _Refusal(scope, receive, send, _method_not_allowed(method, "POST", path))
            )
        elif path == "/v1/models" or path.startswith("/v1/models/"):
            exchange = (
                ModelList(gateway, scope, receive, send, model_id=path[len("/v1/models/") :])
                if method == "GET"
                else _Refusal(scope, receive, send, _method_not_allowed(method, "GET", path))
            )
        elif self._health and path in ("/healthz", "/readyz", "/metrics"):
            exchange = _Health(gateway, scope, receive, send)
        else:
            exchange = _Refusal(
                scope,
                receive,
                send,
                GatewayError(
                    404,
                    f"Invalid URL ({method} {path}). The API serves /v1/models, "
                    "/v1/chat/completions, /v1/completions and /v1/embeddings.",
                ),
            )
        await exchange.run()


class _Refusal(Exchange):
    """A request answered with an error before any work."""

    __slots__ = ("error",)

    def __init__(self, scope: Scope, receive: Receive, send: Send, error: GatewayError):
        super().__init__(scope, receive, send)
        self.error = error

    async def handle(self) -> None:
        raise self.error


def _method_not_allowed(method: str, allowed: str, path: str) -> GatewayError:
    return GatewayError(
        405,
        f"{method} is not allowed on {path}; use {allowed}.",
        headers=[(b"allow", allowed.encode())],
    )


class _Health(Exchange):
    """/healthz (alive), /readyz (database and Redis answer), /metrics (Prometheus), for the
    standalone gateway process; mounted in the web process, Django serves them."""

    __slots__ = ("gateway",)

    def __init__(self, gateway: Gateway, scope: Scope, receive: Receive, send: Send):
        super().__init__(scope, receive, send)
        self.gateway = gateway

    async def handle(self) -> None:
        path = self.scope["path"]
        if path == "/healthz":
            await self.respond(200, b'{"status":"ok"}')
        elif path == "/metrics":
            from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

            authorization = dict(self.scope["headers"]).get(b"authorization", b"")
            client = self.scope.get("client") or (None, None)
            refusal = metrics_refusal(authorization.decode("latin-1"), client[0])
            if refusal is not None:
                raise GatewayError(*refusal)
            await self.respond(200, generate_latest(), content_type=CONTENT_TYPE_LATEST.encode())
        else:
            gateway = self.gateway
            checks = {"database": await gateway.db.call(_database_check)}
            if gateway.config.redis_url:
                checks["redis"] = await asyncio.to_thread(_redis_check, gateway.config.redis_url)
            failing = any(value != "ok" for value in checks.values())
            body = {"status": "unavailable" if failing else "ok", "checks": checks}
            await self.respond(503 if failing else 200, orjson.dumps(body))


def _database_check() -> str:
    # The web process's check: the database takes writes (usage events are the gateway's),
    # answered in a word; the exception text goes to the log only.
    from controlplane.health import database_check

    return database_check()


def _redis_check(url: str) -> str:
    try:
        redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2).ping()
        return "ok"
    except Exception:
        logger.warning("readiness: Redis is not reachable", exc_info=True)
        return "unavailable"
