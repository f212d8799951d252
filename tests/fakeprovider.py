"""A stand-in for Mistral AI's API, run as its own process: `python -m tests.fakeprovider --port 0
--api-key KEY` prints `fake provider on http://127.0.0.1:PORT` and serves

- `POST /v1/chat/completions` as Mistral's reference documents it
  (https://docs.mistral.ai/api/#tag/chat/operation/chat_completion_v1_chat_completions_post):
  `Authorization: Bearer` checked (401 `{"message": "Unauthorized", "request_id": …}`); unknown
  body fields refused with a 422 in Mistral's error shape (`{"object": "error", "message":
  {"detail": [...]}, "type": "invalid_request_error", "param": null, "code": null}`; Mistral
  takes no `stream_options`, and names the seed `random_seed`); an answer of
  `chat.completion` with `usage`; with `stream: true`, `chat.completion.chunk` events whose last
  carries `finish_reason` and `usage` (Mistral reports usage on the final chunk, unasked), then
  `data: [DONE]`;
- `POST /_control` (JSON) to change how the next requests are answered: `mode` one of `ok`,
  `fail` (HTTP `status`, default 503, in Mistral's error shape), `rate_limit` (429 `{"object":
  "error", "message": "Rate limit exceeded", "type": "rate_limited", "code": "1300"}` with
  `Retry-After: retry_after`), `stall` (headers only after `stall_seconds`), `cut` (a stream
  that stops after `cut_after` chunks, without usage or `[DONE]`), `garbage` (a 200 whose body
  is not JSON; in a stream, an event that is not JSON), `no_usage` (answers without `usage`),
  and hostile ones: `forever` (a stream that ignores `max_tokens` and never ends), `trickle`
  (a stream that sends an SSE comment every `delay_seconds`, forever), `huge` (one `data:` line
  of `huge_bytes` with no newline; not streamed, a chat completion of that size);
  `delay_seconds` paces each chunk; `usage` (a dict) overrides fields of the reported usage;
- `GET /_requests`: the bodies and headers received so far (the credential header's value is
  reduced to whether it matched), and whether the client hung up mid-answer (`aborted`), for
  tests to check what the gateway sent and when it let go.

It answers `words` pseudo-tokens, one per chunk: prompt tokens are the words of the messages.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import time
import uuid

from aiohttp import web

ALLOWED_FIELDS = {
    "model",
    "messages",
    "temperature",
    "top_p",
    "max_tokens",
    "stream",
    "stop",
    "random_seed",
    "response_format",
    "tools",
    "tool_choice",
    "presence_penalty",
    "frequency_penalty",
    "n",
    "prediction",
    "parallel_tool_calls",
    "prompt_mode",
    "safe_prompt",
}
# The credential the tests and the bench give it (made up).
TEST_API_KEY = "fake-mistral-key-0a9b8c7d6e5f4a3b"
WORDS = ["Bonjour", "!", "Je", "suis", "un", "modèle", "servi", "par", "un", "faux", "fournisseur"]


class FakeProvider:
    def __init__(self, api_key: str):
        self.api_key = api_key
        self.control: dict = {"mode": "ok"}
        self.received: list[dict] = []

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_post("/_control", self.set_control)
        app.router.add_get("/_requests", self.requests)
        return app

    async def set_control(self, request: web.Request) -> web.Response:
        self.control = {"mode": "ok", **(await request.json())}
        if self.control.pop("reset_requests", False):
            self.received.clear()
        return web.json_response(self.control)

    async def requests(self, request: web.Request) -> web.Response:
        return web.json_response(self.received)

    async def chat(self, request: web.Request) -> web.StreamResponse:
        authorized = request.headers.get("Authorization") == f"Bearer {self.api_key}"
        raw = await request.read()
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        record = {
            "body": body,
            "authorized": authorized,
            "headers": sorted(k.lower() for k in request.headers),
            "aborted": False,
        }
        self.received.append(record)
        if not authorized:
            return web.json_response(
                {"message": "Unauthorized", "request_id": uuid.uuid4().hex}, status=401
            )
        if not isinstance(body, dict):
            return _error(400, "Invalid JSON body", "invalid_request_error")
        extra = sorted(set(body) - ALLOWED_FIELDS)
        if extra:
            detail = [
                {
                    "type": "extra_forbidden",
                    "loc": ["body", name],
                    "msg": "Extra inputs are not permitted",
                    "input": body[name],
                }
                for name in extra
            ]
            return _error(422, {"detail": detail}, "invalid_request_error", code=None)
        control = self.control
        mode = control.get("mode", "ok")
        if mode == "stall":
            await asyncio.sleep(float(control.get("stall_seconds", 30)))
        if mode == "fail":
            return _error(
                int(control.get("status", 503)), "Service unavailable.", "internal_server_error"
            )
        if mode == "rate_limit":
            response = _error(429, "Rate limit exceeded", "rate_limited", code="1300")
            response.headers["Retry-After"] = str(control.get("retry_after", 7))
            return response
        prompt_tokens = sum(
            len(str(message.get("content", "")).split())
            for message in body.get("messages") or ()
            if isinstance(message, dict)
        )
        count = min(int(body.get("max_tokens") or 12), int(control.get("words", 12)))
        pieces = [WORDS[i % len(WORDS)] + " " for i in range(count)]
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": count,
            "total_tokens": prompt_tokens + count,
            **control.get("usage", {}),
        }
        ident = uuid.uuid4().hex
        created = int(time.time())
        model = body.get("model")
        if not body.get("stream"):
            if mode == "garbage":
                return web.Response(status=200, text="<html>oops</html>")
            if mode == "huge":
                pieces = ["x" * int(control.get("huge_bytes", 50_000_000))]
            answer = {
                "id": ident,
                "object": "chat.completion",
                "created": created,
                "model": model,
                "choices": [
                    {
                        "index": 0,
                        "message": {
                            "role": "assistant",
                            "content": "".join(pieces),
                            "tool_calls": None,
                        },
                        "finish_reason": "stop",
                    }
                ],
            }
            if mode != "no_usage":
                answer["usage"] = usage
            return await _send_json(request, answer, record)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        try:
            await response.prepare(request)
        except ConnectionResetError:  # the client left before the headers went
            return response
        delay = float(control.get("delay_seconds", 0))

        async def event(data) -> None:
            text = data if isinstance(data, str) else json.dumps(data)
            await response.write(f"data: {text}\n\n".encode())
            if delay:
                await asyncio.sleep(delay)

        def chunk(delta, finish=None):
            return {
                "id": ident,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            }

        try:
            await event(chunk({"role": "assistant", "content": ""}))
            if mode == "forever":
                for index in itertools.count():
                    await event(chunk({"content": WORDS[index % len(WORDS)] + " "}))
                    await asyncio.sleep(delay)  # at least yield, so the loop stays responsive
            if mode == "trickle":
                while True:
                    await response.write(b": still thinking\n\n")
                    await asyncio.sleep(delay)
            if mode == "huge":
                await response.write(b'data: {"choices": [{"index": 0, "delta": {"content": "')
                left = int(control.get("huge_bytes", 50_000_000))
                while left > 0:
                    await response.write(b"x" * min(left, 1 << 20))
                    left -= 1 << 20
                return response  # no newline, ever
            for index, piece in enumerate(pieces):
                if mode == "cut" and index >= int(control.get("cut_after", 3)):
                    return response  # the connection ends with no usage and no [DONE]
                if mode == "garbage" and index == 2:
                    await event("{not json")
                last = index == len(pieces) - 1
                data = chunk({"content": piece}, "stop" if last else None)
                if last and mode != "no_usage":
                    data["usage"] = usage
                await event(data)
            await event("[DONE]")
            await response.write_eof()
        except ConnectionError:  # the client left (aiohttp's errors are ones)
            record["aborted"] = True
        return response


async def _send_json(request: web.Request, answer: dict, record: dict) -> web.StreamResponse:
    """`answer` in pieces of 1 MiB, so a client that hangs up mid-body is seen doing it."""
    body = json.dumps(answer).encode()
    response = web.StreamResponse(
        headers={"Content-Type": "application/json", "Content-Length": str(len(body))}
    )
    try:
        await response.prepare(request)
        for start in range(0, len(body), 1 << 20):
            await response.write(body[start : start + (1 << 20)])
        await response.write_eof()
    except ConnectionError:  # the client left
        record["aborted"] = True
    return response


def _error(status: int, message, type_: str, *, code="3000") -> web.Response:
    return web.json_response(
        {"object": "error", "message": message, "type": type_, "param": None, "code": code},
        status=status,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--api-key", required=True)
    args = parser.parse_args()

    async def serve() -> None:
        runner = web.AppRunner(FakeProvider(args.api_key).app(), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", args.port)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        print(f"fake provider on http://127.0.0.1:{port}", flush=True)
        await asyncio.Event().wait()

    asyncio.run(serve())


if __name__ == "__main__":
    main()
