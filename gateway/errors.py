"""Errors in OpenAI's format: `{"error": {"message", "type", "param", "code"}}`.

The official SDKs map the HTTP status to an exception class and show `message`, so every
message says what to change.
"""

from __future__ import annotations

import orjson


class GatewayError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        headers: list[tuple[bytes, bytes]] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param
        self.headers = headers or []

    def body(self) -> bytes:
        return error_body(self.message, type=self.type, code=self.code, param=self.param)


def error_body(message: str, *, type: str, code: str | None = None, param=None) -> bytes:
    return orjson.dumps({"error": {"message": message, "type": type, "param": param, "code": code}})


def bad_request(message: str, *, param: str | None = None, code: str | None = None):
    return GatewayError(400, message, param=param, code=code)


def unauthorized(message: str) -> GatewayError:
    return GatewayError(
        401,
        message,
        code="invalid_api_key",
        headers=[(b"www-authenticate", b'Bearer realm="sirocco"')],
    )


def model_not_found(model: str) -> GatewayError:
    # The same answer whether the name is unknown or another organization's: nothing leaks.
    return GatewayError(
        404,
        f"The model `{model}` does not exist or you do not have access to it. "
        "GET /v1/models lists the models this key may call.",
        type="invalid_request_error",
        param="model",
        code="model_not_found",
    )


def terms_not_accepted(model: str, *, terms_version: str, accept_path: str) -> GatewayError:
    """The model's publisher has terms of use the caller's organization has not accepted (or
    not their current version): nothing is drawn or sent until it does."""
    return GatewayError(
        403,
        f"Your organization must accept the terms of use of `{model}` (version {terms_version}) "
        f"before calling it: read them in the console, or accept with POST {accept_path} "
        f'{{"version": "{terms_version}"}}.',
        type="invalid_request_error",
        param="model",
        code="terms_not_accepted",
    )


def upstream_error(
    status: int, message: str, *, code: str, retry_after: int | None = None
) -> GatewayError:
    """A failure of something behind the gateway (a replica, the database, the rate limiter):
    5xx, `server_error`, with a code a client can branch on."""
    headers = [(b"retry-after", str(retry_after).encode())] if retry_after else []
    return GatewayError(status, message, type="server_error", code=code, headers=headers)
