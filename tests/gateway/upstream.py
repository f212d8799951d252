"""A stand-in replica for the gateway tests: OpenAI-shaped answers, and the ways a real one
misbehaves. The served model name picks the behaviour (the gateway sends the route's
served_model_name upstream):

- "stub": 8 tokens at once (usage chunk when asked, with empty choices).
- "stub-usage-in-choices": the usage rides on the last content chunk (non-empty choices).
- "stub-break": the stream stops after 3 tokens, without usage or [DONE].
- "stub-slow": 100 tokens, 20 ms apart (for disconnects).
- "stub-html-500": a 500 with an HTML body.
- "stub-hang": answers only after 3 s (for the first-byte timeout).

Streams report usage as vLLM does: with `stream_options.include_usage` a final usage chunk,
and with `continuous_usage_stats` as well the counts so far on every content chunk. A name
with "-legacy" (e.g. "stub-legacy-break") behaves the same but, like a replica that reports
usage only at the end, ignores continuous_usage_stats; so does "stub-usage-in-choices".
"stub-tools-break" streams its tokens as the arguments of a tool call named "lookup" (OpenAI's
`tool_calls` deltas) and breaks off after three, as "stub-break" does; "stub-reasoning-break"
streams them as a reasoning model's thinking (vLLM's `reasoning_content`, then `reasoning`, then
a Mistral `thinking` content part) and breaks off after three too.
"""

from __future__ import annotations

import asyncio
import json
import time

TOKENS = ["Hello", ",", " world", "!", " How", " are", " you", "?"]


class Upstream:
    def __init__(self):
        self.requests: list[dict] = []
        self.cancelled = 0  # streams whose client (the gateway) went away before the end

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        request = json.loads(body or b"{}")
        self.requests.append(request)
        model = request.get("model", "stub")
        legacy = "-legacy" in model or model == "stub-usage-in-choices"
        model = model.replace("-legacy", "")
        chat = scope["path"].endswith("/chat/completions")
        if model == "stub-hang":
            await asyncio.sleep(3)
        if model == "stub-html-500":
            await _respond(send, 500, b"<html>boom</html>", b"text/html")
            return
        tokens = [f" t{i}" for i in range(100)] if model == "stub-slow" else TOKENS
        usage = {
            "prompt_tokens": 12,
            "completion_tokens": len(tokens),
            "total_tokens": 12 + len(tokens),
        }
        if not request.get("stream"):
            text = "".join(tokens)
            choice = (
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": "stop",
                }
                if chat
                else {"index": 0, "text": text, "finish_reason": "stop"}
            )
            payload = {"id": "x", "object": "chat.completion", "created": 0, "model": model}
            payload.update(choices=[choice], usage=usage)
            await _respond(send, 200, json.dumps(payload).encode())
            return
        options = request.get("stream_options") or {}
        include = bool(options.get("include_usage"))
        continuous = include and bool(options.get("continuous_usage_stats")) and not legacy
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/event-stream")],
            }
        )
        disconnected = asyncio.Event()

        async def watch():
            while (await receive())["type"] != "http.disconnect":
                pass
            disconnected.set()

        watcher = asyncio.create_task(watch())
        try:
            for index, token in enumerate(tokens):
                if disconnected.is_set():
                    self.cancelled += 1
                    return
                if (
                    model in ("stub-break", "stub-tools-break", "stub-reasoning-break")
                    and index == 3
                ):
                    return
                last = index == len(tokens) - 1
                delta = {"content": token}
                if model == "stub-tools-break":
                    call = {"index": 0, "function": {"arguments": token}}
                    if index == 0:
                        call.update(id="call0", type="function")
                        call["function"]["name"] = "lookup"
                    delta = {"tool_calls": [call]}
                elif model == "stub-reasoning-break":
                    thinking = [{"type": "thinking", "thinking": [{"type": "text", "text": token}]}]
                    delta = [
                        {"reasoning_content": token},
                        {"reasoning": token},
                        {"content": thinking},
                    ][index]
                choice = (
                    {
                        "index": 0,
                        "delta": delta,
                        "finish_reason": "stop" if last else None,
                    }
                    if chat
                    else {"index": 0, "text": token, "finish_reason": "stop" if last else None}
                )
                chunk = {"id": "x", "object": "chunk", "created": int(time.time()), "model": model}
                chunk["choices"] = [choice]
                if continuous:
                    chunk["usage"] = {
                        "prompt_tokens": 12,
                        "completion_tokens": index + 1,
                        "total_tokens": 13 + index,
                    }
                elif include:
                    chunk["usage"] = usage if last and model == "stub-usage-in-choices" else None
                await _event(send, chunk)
                if model == "stub-slow":
                    await asyncio.sleep(0.02)
            if include and model != "stub-usage-in-choices":
                await _event(
                    send,
                    {"id": "x", "object": "chunk", "model": model, "choices": [], "usage": usage},
                )
            await send(
                {"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": True}
            )
            await send({"type": "http.response.body", "body": b""})
        finally:
            watcher.cancel()


async def _event(send, chunk: dict) -> None:
    body = b"data: " + json.dumps(chunk).encode() + b"\n\n"
    await send({"type": "http.response.body", "body": body, "more_body": True})


async def _respond(send, status: int, body: bytes, content_type=b"application/json") -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", content_type),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
