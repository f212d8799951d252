"""An OpenAI-compatible upstream that answers at once: the baseline for bench/gateway.py.

`python bench/upstream_stub.py --port N [--workers W]`. POST /v1/chat/completions and
/v1/completions answer a fixed 8-token completion (streaming: one SSE chunk per token, plus
the usage chunk when `stream_options.include_usage` is set); GET /v1/models lists `stub`.
Plain asyncio + httptools (what uvicorn parses with), keep-alive, no framework: it must never
be the bottleneck of the benchmark. A body over 1 MB is not parsed (a real replica reads it on
its own machine, not on the gateway's cores): it gets the non-streaming chat answer.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import time

import httptools

TOKENS = ["Hello", ",", " world", "!", " How", " are", " you", "?"]
PROMPT_TOKENS = 12
UNPARSED_BODY_BYTES = 1024 * 1024


def _usage() -> dict:
    return {
        "prompt_tokens": PROMPT_TOKENS,
        "completion_tokens": len(TOKENS),
        "total_tokens": PROMPT_TOKENS + len(TOKENS),
    }


def completion_body(chat: bool, model: str) -> bytes:
    text = "".join(TOKENS)
    choice = (
        {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
        if chat
        else {"index": 0, "text": text, "finish_reason": "stop"}
    )
    return json.dumps(
        {
            "id": "cmpl-stub",
            "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()),
            "model": model,
            "choices": [choice],
            "usage": _usage(),
        }
    ).encode()


def stream_events(chat: bool, model: str, include_usage: bool) -> list[bytes]:
    created = int(time.time())
    kind = "chat.completion.chunk" if chat else "text_completion"
    events = []

    def chunk(choices, usage=None):
        body = {"id": "cmpl-stub", "object": kind, "created": created, "model": model}
        body["choices"] = choices
        if include_usage:
            body["usage"] = usage
        events.append(b"data: " + json.dumps(body).encode() + b"\n\n")

    for index, token in enumerate(TOKENS):
        finish = "stop" if index == len(TOKENS) - 1 else None
        if chat:
            delta = {"content": token} if index else {"role": "assistant", "content": token}
            chunk([{"index": 0, "delta": delta, "finish_reason": finish}])
        else:
            chunk([{"index": 0, "text": token, "finish_reason": finish}])
    if include_usage:
        chunk([], _usage())
    events.append(b"data: [DONE]\n\n")
    return events


class StubProtocol(asyncio.Protocol):
    def __init__(self):
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""
        self.body = []

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.transport.close()

    def on_url(self, url):
        self.url += url

    def on_body(self, body):
        self.body.append(body)

    def on_message_complete(self):
        url, raw = self.url, b"".join(self.body)
        self.url, self.body = b"", []
        if url.endswith(b"/v1/models"):
            self._respond(b'{"object":"list","data":[{"id":"stub","object":"model"}]}')
            return
        chat = url.endswith(b"/chat/completions")
        if len(raw) > UNPARSED_BODY_BYTES:
            self._respond(completion_body(True, "stub"))
            return
        try:
            request = json.loads(raw or b"{}")
        except ValueError:
            self._respond(b'{"error":{"message":"bad json","type":"invalid_request_error"}}', 400)
            return
        model = request.get("model", "stub")
        if request.get("stream"):
            include = bool((request.get("stream_options") or {}).get("include_usage"))
            write = self.transport.write
            write(
                b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                b"transfer-encoding: chunked\r\n\r\n"
            )
            for event in stream_events(chat, model, include):
                write(b"%x\r\n%s\r\n" % (len(event), event))
            write(b"0\r\n\r\n")
        else:
            self._respond(completion_body(chat, model))

    def _respond(self, body: bytes, status: int = 200):
        reason = b"OK" if status == 200 else b"Bad Request"
        self.transport.write(
            b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
            % (status, reason, len(body), body)
        )


def serve(sock: socket.socket) -> None:
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass

    async def main():
        server = await asyncio.get_running_loop().create_server(StubProtocol, sock=sock)
        async with server:
            await server.serve_forever()

    asyncio.run(main())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((args.host, args.port))
    sock.listen(1024)
    print(f"stub listening on http://{args.host}:{sock.getsockname()[1]}", flush=True)
    for _ in range(args.workers - 1):
        if os.fork() == 0:
            break
    serve(sock)


if __name__ == "__main__":
    main()
