"""One HTTP request and its response on the gateway: the base of every /v1 endpoint's object.

Each request is one object (as Starlette's per-request responders are): it holds what the
request carries and what was already sent, and `run()` turns whatever its `handle()` raises
into an answer in OpenAI's error format, so no endpoint maps errors itself.

Identity: `request_id` is minted here, 128 random bits, for every request. It names the
request's usage event and is sent to the replica; nothing a client sends can choose it, so no
client can make two requests share one usage row or guess another tenant's next id. A
client's own `X-Client-Request-Id` (OpenAI's name) or `X-Request-ID` is kept apart as
`client_request_id`: a correlation field, validated, recorded on the usage event and echoed
back in `x-client-request-id`, never unique and never a key.
"""

from __future__ import annotations

import contextlib
import logging
import re
import secrets
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from gateway import metrics
from gateway.dbthreads import DatabaseUnavailable
from gateway.errors import GatewayError, bad_request, upstream_error

logger = logging.getLogger("sirocco.gateway")

# ASGI's three arguments, typed as Starlette types them (starlette.types).
Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

JSON = b"application/json"
# Printable ASCII without spaces, at most the usage event's column width.
_VALID_CLIENT_REQUEST_ID = re.compile(rb"^[\x21-\x7e]{1,128}$")
RETRY_AFTER_DATABASE = 10


def new_request_id() -> str:
    """A request's identity: 128 random bits (secrets), so no one can predict another's."""
    return "req_" + secrets.token_hex(16)


class ClientGone(Exception):
    """The client closed the connection before its request was read whole."""


class Exchange:
    """One request/response: its ids, headers, timing and what was already sent.

    Subclasses implement `handle()`; `run()` answers whatever it raises.
    """

    __slots__ = (
        "authorization",
        "client_request_id",
        "content_length",
        "headers_sent",
        "rate_headers",
        "receive",
        "request_id",
        "scope",
        "send",
        "started",
    )

    def __init__(self, scope: Scope, receive: Receive, send: Send):
        self.scope = scope
        self.receive = receive
        self.send = send
        self.started = time.perf_counter()
        self.request_id = new_request_id()
        self.headers_sent = False
        self.rate_headers: list[tuple[bytes, bytes]] = []
        self.client_request_id: bytes | None = None
        self.content_length: bytes | None = None
        # A list, not one value: a request with two Authorization headers is refused, never
        # read as whichever came last (the REST API refuses it too).
        authorization: list[bytes] = []
        client_ids: list[bytes] = []
        for name, value in scope["headers"]:
            if name == b"authorization":
                authorization.append(value)
            elif name == b"content-length":
                self.content_length = value
            elif name in (b"x-client-request-id", b"x-request-id"):
                client_ids.append(value)
        self.authorization = authorization
        if client_ids and _VALID_CLIENT_REQUEST_ID.match(client_ids[0]):
            # Correlation only: an invalid one is dropped, not refused (as the REST API does).
            self.client_request_id = client_ids[0]

    async def handle(self) -> None:
        raise NotImplementedError

    async def run(self) -> None:
        """Handle the request; answer what it raises in OpenAI's error format."""
        try:
            await self.handle()
        except GatewayError as error:
            metrics.REFUSED.labels(str(error.status)).inc()
            await self.send_error(error)
        except ClientGone:
            pass
        except DatabaseUnavailable as error:
            logger.error("the database is unavailable (request %s): %s", self.request_id, error)
            await self.send_error(
                upstream_error(
                    503,
                    "The platform's database is unavailable right now. Retry shortly.",
                    retry_after=RETRY_AFTER_DATABASE,
                    code="database_unavailable",
                )
            )
        except Exception:
            logger.exception("unexpected error in the gateway (request %s)", self.request_id)
            await self.send_error(
                GatewayError(
                    500,
                    "The gateway failed to handle this request; it has been logged under "
                    f"request id {self.request_id}. Retry, and report the id if it persists.",
                    type="server_error",
                    code="internal_error",
                )
            )

    def authorization_header(self) -> bytes | None:
        """The one Authorization header; 400 when there are several."""
        if len(self.authorization) > 1:
            raise bad_request(
                "The request has more than one Authorization header. Send exactly one: "
                "'Authorization: Bearer sk-…'.",
                code="invalid_authorization_header",
            )
        return self.authorization[0] if self.authorization else None

    def headers(self, content_type: bytes, extra=()) -> list[tuple[bytes, bytes]]:
        headers = [
            (b"content-type", content_type),
            (b"x-request-id", self.request_id.encode()),
            *self.rate_headers,
            *extra,
        ]
        if self.client_request_id is not None:
            headers.append((b"x-client-request-id", self.client_request_id))
        return headers

    async def respond(self, status: int, body: bytes, extra=(), content_type=JSON) -> None:
        headers = self.headers(content_type, extra)
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

    async def send_error(self, error: GatewayError) -> None:
        with contextlib.suppress(OSError):
            if not self.headers_sent:
                await self.respond(error.status, error.body(), error.headers)
            else:
                # A stream already started (scale-from-zero progress): say it in the stream.
                await self.send(
                    {
                        "type": "http.response.body",
                        "body": b"data: " + error.body() + b"\n\n",
                        "more_body": False,
                    }
                )

    async def read_body(self, limit: int) -> bytes:
        """The whole body; 413 past `limit` bytes (before reading it when the length says)."""
        length = self.content_length
        if length is not None and length.isdigit() and int(length) > limit:
            raise _too_large(limit)
        chunks = []
        size = 0
        while True:
            message = await self.receive()
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
