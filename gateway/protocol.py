"""What the gateway checks in an OpenAI request before it spends anything on it.

Mostly what the gateway itself needs (the model, the prompt it counts, stream, max_tokens);
and tools, tool_choice and response_format, whose schemas it checks with the builtin runtime's
own rules (runtime/chat.py: bounded size and nesting, JSON Schema's meta-schema, no keyword
constrained decoding cannot enforce), so a bad schema is a 400 naming its parameter before
anything is reserved, whichever runtime serves the model. The replica validates the rest and
answers in the same error format, which the gateway passes through.
"""

from __future__ import annotations

from dataclasses import dataclass

import orjson

from gateway.attribution import read_attribution, without_metadata
from gateway.errors import bad_request
from gateway.routing import prefix_keys
from gateway.tokens import ModelTokenizer, estimate_chat, estimate_prompt, message_text
from runtime.chat import output_spec
from runtime.schemas import InvalidRequest

# Choices one request may ask for (`n`); each reserves max_tokens against the limits.
MAX_CHOICES = 128
# The deepest JSON the gateway passes on: orjson's limit when writing (254 levels, counting the
# body itself), so the body sent upstream can always be written.
MAX_NESTING = 254


_MODEL_FIRST = b'{"model":""'


@dataclass(slots=True)
class CompletionRequest:
    chat: bool
    payload: dict | None  # None when the request was read in a prompt worker process
    model: str
    stream: bool
    wants_usage: bool  # the client's own stream_options.include_usage
    max_tokens: int | None
    max_tokens_param: str
    n: int = 1  # choices: each may generate max_tokens
    # The upstream body after its leading `{"model":""`, made once (in a worker for big ones).
    upstream_tail: bytes = b""
    # The prompt's tokens as admission counted them.
    prompt_tokens: int = 0
    # The client's own stream_options.continuous_usage_stats (vLLM's): usage on every chunk.
    wants_continuous_usage: bool = False
    # Keys of the prompt's leading blocks, for prefix-aware routing (gateway/routing.py).
    prefix_keys: tuple[bytes, ...] = ()
    # Cost attribution (gateway/attribution.py): OpenAI's `user`, and `metadata` tags.
    end_user: str | None = None
    tags: dict[str, str] | None = None

    def count_prompt(self, tokenizer: ModelTokenizer | None) -> int:
        if self.payload is None:  # read in a worker: counted there at admission
            return self.prompt_tokens
        if self.chat:
            messages = self.payload["messages"]
            tools = self.payload.get("tools")
            if tokenizer:
                return tokenizer.count_chat(messages, tools)
            return estimate_chat(messages, tools)
        prompt = self.payload["prompt"]
        return tokenizer.count_prompt(prompt) if tokenizer else estimate_prompt(prompt)

    def upstream_body(self, served_model_name: str) -> bytes:
        return b'{"model":' + orjson.dumps(served_model_name) + self.upstream_tail


def upstream_tail(payload: dict, *, stream: bool) -> bytes:
    """The body sent upstream, with `model` first and left empty, less its first bytes: the
    served model name is spliced in once the route is known, without serializing again."""
    body = {"model": ""}
    body.update(payload)
    body["model"] = ""
    if stream:
        # Always ask for usage, on every chunk (vLLM's continuous_usage_stats; the builtin
        # runtime's too): it is what gets billed, and a stream cut midway is billed by the
        # last figure the replica reported. Dropped again if the client did not ask for it.
        body["stream_options"] = {
            **(body.get("stream_options") or {}),
            "include_usage": True,
            "continuous_usage_stats": True,
        }
    try:
        encoded = orjson.dumps(body)
    except orjson.JSONEncodeError as error:
        # orjson writes at most 254 levels of nesting (it reads 1024): deeper is refused here,
        # before anything is spent on it, rather than failing on the way to the replica.
        raise bad_request(
            f"The request body cannot be passed on ({error}). Nest JSON at most "
            f"{MAX_NESTING} levels deep.",
            code="invalid_json",
        ) from None
    return encoded[len(_MODEL_FIRST) :]


def read_payload(raw: bytes, *, wants: str) -> tuple[dict, str]:
    """The JSON object a /v1 request body holds and the `model` it names; 400s in OpenAI's
    words otherwise. `wants` names the other field the endpoint needs (`messages`, `input`)."""
    if not raw:
        raise bad_request(
            f"The request body is empty. Send a JSON object with `model` and {wants}."
        )
    try:
        payload = orjson.loads(raw)
    except orjson.JSONDecodeError as error:
        raise bad_request(
            f"We could not parse the JSON body of your request ({error}). Send valid JSON "
            f"with Content-Type: application/json, nested at most {MAX_NESTING} levels deep.",
            code="invalid_json",
        ) from None
    if not isinstance(payload, dict):
        raise bad_request("The request body must be a JSON object.")
    model = payload.get("model")
    if model is None:
        raise bad_request("You must provide a model parameter.", param="model")
    if not isinstance(model, str) or not model.strip():
        raise bad_request(
            "`model` must be a non-empty string: the name of one of your deployments "
            "(GET /v1/models lists them).",
            param="model",
        )
    return payload, model


def parse_request(raw: bytes, *, chat: bool) -> CompletionRequest:
    payload, model = read_payload(raw, wants="`messages`" if chat else "`prompt`")
    if chat:
        _check_messages(payload.get("messages"))
        try:
            output_spec(payload)  # at most a few ms: schemas over 64 KiB are refused unread
        except InvalidRequest as error:
            raise bad_request(error.message, param=error.param) from None
    else:
        _check_prompt(payload.get("prompt"))
    stream = payload.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise bad_request("`stream` must be true or false.", param="stream")
    wants_usage = wants_continuous_usage = False
    options = payload.get("stream_options")
    if options is not None:
        if not stream:
            raise bad_request(
                "`stream_options` is only allowed when `stream` is true.", param="stream_options"
            )
        if not isinstance(options, dict):
            raise bad_request("`stream_options` must be an object.", param="stream_options")
        include = options.get("include_usage", False)
        if not isinstance(include, bool):
            raise bad_request(
                "`stream_options.include_usage` must be true or false.",
                param="stream_options.include_usage",
            )
        wants_usage = include
        continuous = options.get("continuous_usage_stats", False)
        if not isinstance(continuous, bool):
            raise bad_request(
                "`stream_options.continuous_usage_stats` must be true or false.",
                param="stream_options.continuous_usage_stats",
            )
        wants_continuous_usage = include and continuous  # as vLLM: only with include_usage
    max_tokens, param = None, "max_tokens"
    for name in ("max_completion_tokens", "max_tokens") if chat else ("max_tokens",):
        value = payload.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise bad_request(f"`{name}` must be a positive integer.", param=name)
        max_tokens, param = value, name
        break
    if not chat and "max_tokens" not in payload:
        max_tokens = 16  # OpenAI's default for legacy completions (the runtime's too)
    n = payload.get("n", 1)
    if n is None:
        n = 1
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_CHOICES:
        raise bad_request(f"`n` must be an integer from 1 to {MAX_CHOICES}.", param="n")
    request = CompletionRequest(chat, payload, model, stream, wants_usage, max_tokens, param, n)
    request.wants_continuous_usage = wants_continuous_usage
    request.end_user, request.tags = read_attribution(payload)
    # Made now, while refusing is cheap: a body the gateway cannot pass on is a 400 here.
    # The tags are the platform's (attribution), not the replica's.
    upstream = payload if "metadata" not in payload else without_metadata(payload)
    request.upstream_tail = upstream_tail(upstream, stream=stream)
    request.prefix_keys = prefix_keys(payload, chat=chat)
    return request


def _check_messages(messages) -> None:
    if messages is None:
        raise bad_request("You must provide `messages`.", param="messages")
    if not isinstance(messages, list) or not messages:
        raise bad_request(
            "`messages` must be a non-empty array of {role, content} objects.", param="messages"
        )
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            raise bad_request(
                f"`{where}` must be an object with `role` and `content`.", param=where
            )
        if not isinstance(message.get("role"), str):
            raise bad_request(f"`{where}.role` must be a string.", param=f"{where}.role")
        content = message.get("content")
        if content is not None and not isinstance(content, str | list):
            raise bad_request(
                f"`{where}.content` must be a string or an array of content parts.",
                param=f"{where}.content",
            )
        message_text(content)


def _check_prompt(prompt) -> None:
    if prompt is None:
        raise bad_request("You must provide `prompt`.", param="prompt")
    if isinstance(prompt, str):
        return
    if isinstance(prompt, list) and prompt:
        if all(isinstance(item, str) for item in prompt):
            return
        if all(isinstance(item, int) and not isinstance(item, bool) for item in prompt):
            return
        if all(
            isinstance(item, list)
            and all(isinstance(t, int) and not isinstance(t, bool) for t in item)
            for item in prompt
        ):
            return
    raise bad_request(
        "`prompt` must be a string, an array of strings, or an array of token ids.",
        param="prompt",
    )


def check_context(
    request: CompletionRequest, prompt_tokens: int, max_model_len: int, *, exact: bool
) -> int:
    """The tokens to reserve (prompt + n x max_tokens); 400 when they cannot fit the context.

    With an estimated prompt count (`exact` false) only max_tokens itself is checked: the
    estimate may be high, and the replica checks the real count anyway. Each of the `n`
    choices may generate up to max_tokens (or up to the context left after the prompt).
    """
    where = "messages" if request.chat else "prompt"
    n = request.n
    if not exact:
        if request.max_tokens is not None and request.max_tokens >= max_model_len:
            raise bad_request(
                f"This model's maximum context length is {max_model_len} tokens, and "
                f"`{request.max_tokens_param}` is {request.max_tokens}. Please reduce "
                f"`{request.max_tokens_param}`.",
                param=request.max_tokens_param,
                code="context_length_exceeded",
            )
        if request.max_tokens is None:
            return n * max_model_len
        # A prompt the replica accepts has at most max_model_len - max_tokens tokens.
        return min(prompt_tokens, max_model_len - request.max_tokens) + n * request.max_tokens
    if request.max_tokens is None:
        if prompt_tokens >= max_model_len:
            raise bad_request(
                f"This model's maximum context length is {max_model_len} tokens. However, "
                f"your {where} resulted in {prompt_tokens} tokens. Please reduce the length "
                f"of the {where}.",
                param=where,
                code="context_length_exceeded",
            )
        return prompt_tokens + n * (max_model_len - prompt_tokens)
    if request.max_tokens > max_model_len or prompt_tokens + request.max_tokens > max_model_len:
        raise bad_request(
            f"This model's maximum context length is {max_model_len} tokens. However, you "
            f"requested {prompt_tokens + request.max_tokens} tokens ({prompt_tokens} in the "
            f"{where}, {request.max_tokens} in the completion). Please reduce the length of "
            f"the {where} or `{request.max_tokens_param}`.",
            param=request.max_tokens_param,
            code="context_length_exceeded",
        )
    return prompt_tokens + n * request.max_tokens
