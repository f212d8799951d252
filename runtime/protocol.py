"""OpenAI request validation and response shapes for /v1/chat/completions and /v1/completions.

Validation is by hand (the runtime image carries no pydantic): each check names the field and
says what to send instead, and everything unsupported is refused rather than silently ignored.
"""

from __future__ import annotations

import dataclasses
import re
import time
import uuid
from dataclasses import dataclass
from typing import Any

from tokenizers import decoders

from runtime.chat import OutputSpec, output_spec, template_messages, template_tools
from runtime.engine import SamplingParams
from runtime.schemas import InvalidRequest

MAX_STOP_SEQUENCES = 4
# Choices per request (`n`), as the gateway's own ceiling (GATEWAY_MAX_CHOICES) allows at most.
MAX_CHOICES = 128
MAX_TOP_LOGPROBS = 20  # chat's top_logprobs
MAX_COMPLETION_LOGPROBS = 5  # the completions API's logprobs
UNCONSTRAINED = OutputSpec()
_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte → printable character map (what ByteLevel pre-tokenizers write), inverted."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    characters = list(printable)
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            characters.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, characters, strict=True)}


_BYTE_LEVEL_DECODER = _byte_level_alphabet()


class RequestError(Exception):
    """A client mistake, answered in OpenAI's error format."""

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        status: int = 400,
        error_type: str = "invalid_request_error",
    ):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code
        self.status = status
        self.error_type = error_type

    def body(self) -> dict:
        return error_body(self.message, self.error_type, param=self.param, code=self.code)


def error_body(message: str, error_type: str, *, param=None, code=None) -> dict:
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


@dataclass(frozen=True)
class ParsedRequest:
    chat: bool
    model: str
    prompt_ids: list[int]
    params: SamplingParams
    stream: bool
    include_usage: bool
    # vLLM's stream_options.continuous_usage_stats: the usage so far on every chunk (only with
    # include_usage, as vLLM does), so a stream cut midway still says what it used.
    continuous_usage: bool = False
    # Tools and response_format: what the output must be (free text when unconstrained).
    output: OutputSpec = UNCONSTRAINED
    n: int = 1  # choices, each generated on its own (seed + index when a seed is given)


class Tokenization:
    """What request parsing needs from the tokenizer."""

    def __init__(self, tokenizer, max_model_len: int):
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.vocab_size = len(tokenizer)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def token_text(self, token_id: int) -> str:
        """One token as logprobs name it (special tokens included, as vLLM shows them)."""
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def token_bytes(self, token_id: int) -> bytes:
        """The token's own UTF-8 bytes (logprobs' `bytes`): a token holding part of a
        character decodes to U+FFFD alone, but its bytes joined with its neighbours' give the
        text back. Byte-level BPE pieces map back through GPT-2's byte alphabet, SentencePiece
        byte-fallback pieces (`<0xE2>`) are their byte, `▁` is a space."""
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        piece = backend.id_to_token(token_id) if backend is not None else None
        if piece is not None:
            if isinstance(backend.decoder, decoders.ByteLevel) and all(
                char in _BYTE_LEVEL_DECODER for char in piece
            ):
                return bytes(_BYTE_LEVEL_DECODER[char] for char in piece)
            fallback = _BYTE_FALLBACK.fullmatch(piece)
            if fallback:
                return bytes([int(fallback.group(1), 16)])
            if "\u2581" in piece:
                return piece.replace("\u2581", " ").encode()
        return self.token_text(token_id).encode()

    def render_chat(self, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        try:
            text = self.tokenizer.apply_chat_template(
                messages, tools=tools, add_generation_prompt=True, tokenize=False
            )
        except Exception as error:  # templates reject conversations with raise_exception()
            raise RequestError(
                f"the chat template rejected these messages: {error}", param="messages"
            ) from error
        return self.encode(text)


def parse_chat_request(body: Any, tokenization: Tokenization) -> ParsedRequest:
    body = _require_object(body)
    model = _require_string(body, "model")
    try:
        messages = template_messages(body.get("messages"))
        output = output_spec(body)
    except InvalidRequest as error:
        raise RequestError(error.message, param=error.param) from None
    _refuse_unsupported(body, chat=True)
    if output.constrained and _optional_bool(body, "ignore_eos"):
        raise RequestError(
            "ignore_eos cannot be combined with tools or response_format: the grammar ends the "
            "output",
            param="ignore_eos",
        )
    prompt_ids = tokenization.render_chat(messages, template_tools(body.get("tools")))
    max_tokens = _optional_int(body, "max_completion_tokens", minimum=1)
    max_tokens_param = "max_completion_tokens"
    if max_tokens is None:
        max_tokens = _optional_int(body, "max_tokens", minimum=1)
        max_tokens_param = "max_tokens"
    parsed = _finish_parsing(
        body, model, prompt_ids, max_tokens, max_tokens_param, "messages", tokenization, chat=True
    )
    return dataclasses.replace(parsed, output=output)


def parse_completion_request(body: Any, tokenization: Tokenization) -> ParsedRequest:
    body = _require_object(body)
    model = _require_string(body, "model")
    prompt_ids = _completion_prompt(body.get("prompt", _MISSING), tokenization)
    _refuse_unsupported(body, chat=False)
    max_tokens = _optional_int(body, "max_tokens", minimum=1)
    if "max_tokens" not in body:
        max_tokens = 16  # OpenAI's default for legacy completions
    return _finish_parsing(
        body, model, prompt_ids, max_tokens, "max_tokens", "prompt", tokenization, chat=False
    )


def _finish_parsing(
    body: dict,
    model: str,
    prompt_ids: list[int],
    max_tokens: int | None,
    max_tokens_param: str,
    prompt_param: str,
    tokenization: Tokenization,
    *,
    chat: bool,
) -> ParsedRequest:
    limit = tokenization.max_model_len
    where = "messages" if chat else "prompt"
    if not prompt_ids:
        raise RequestError(f"the {prompt_param} must not be empty", param=prompt_param)
    if max_tokens is None:
        if len(prompt_ids) >= limit:
            raise RequestError(
                f"This model's maximum context length is {limit} tokens. However, your {where} "
                f"resulted in {len(prompt_ids)} tokens. Please reduce the length of the {where}.",
                param=prompt_param,
                code="context_length_exceeded",
            )
        max_tokens = limit - len(prompt_ids)
    elif len(prompt_ids) + max_tokens > limit:
        raise RequestError(
            f"This model's maximum context length is {limit} tokens. However, you requested "
            f"{len(prompt_ids) + max_tokens} tokens ({len(prompt_ids)} in the {where}, "
            f"{max_tokens} in the completion). Please reduce the length of the {where} or "
            f"{max_tokens_param}.",
            param=max_tokens_param,
            code="context_length_exceeded",
        )
    temperature = _optional_number(body, "temperature", 0.0, 2.0)
    top_p = _optional_number(body, "top_p", 0.0, 1.0)
    if top_p is not None and top_p == 0.0:
        raise RequestError("top_p must be greater than 0", param="top_p")
    seed = _optional_int(body, "seed", minimum=-(2**63), maximum=2**64 - 1)
    n = _optional_int(body, "n", minimum=1, maximum=MAX_CHOICES) or 1
    logprobs = _logprobs(body, chat=chat)
    stream = _optional_bool(body, "stream") or False
    include_usage = continuous_usage = False
    if body.get("stream_options") is not None:
        if not stream:
            raise RequestError(
                "stream_options is only allowed when stream is true", param="stream_options"
            )
        options = body["stream_options"]
        if not isinstance(options, dict):
            raise RequestError("stream_options must be an object", param="stream_options")
        include_usage = _optional_bool(options, "include_usage", "stream_options.") or False
        continuous_usage = include_usage and bool(
            _optional_bool(options, "continuous_usage_stats", "stream_options.")
        )
    return ParsedRequest(
        chat=chat,
        model=model,
        prompt_ids=prompt_ids,
        params=SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if temperature is None else temperature,
            top_p=1.0 if top_p is None else top_p,
            seed=None if seed is None else seed % 2**64,
            stop=_stop_sequences(body.get("stop")),
            ignore_eos=_optional_bool(body, "ignore_eos") or False,
            logprobs=logprobs,
        ),
        stream=stream,
        include_usage=include_usage,
        continuous_usage=continuous_usage,
        n=n,
    )


def _logprobs(body: dict, *, chat: bool) -> int | None:
    """How many alternatives each token reports; None when logprobs are off. Chat takes
    `logprobs: true` and `top_logprobs` (0-20); completions take `logprobs` (0-5), OpenAI's."""
    if not chat:
        return _optional_int(body, "logprobs", minimum=0, maximum=MAX_COMPLETION_LOGPROBS)
    wanted = _optional_bool(body, "logprobs")
    top = _optional_int(body, "top_logprobs", minimum=0, maximum=MAX_TOP_LOGPROBS)
    if top is not None and not wanted:
        raise RequestError(
            "top_logprobs needs logprobs: true", param="top_logprobs", code="invalid_value"
        )
    return (top or 0) if wanted else None


_MISSING = object()


def _completion_prompt(prompt: Any, tokenization: Tokenization) -> list[int]:
    if prompt is _MISSING:
        raise RequestError("prompt is required", param="prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        return tokenization.encode(prompt)
    if isinstance(prompt, list) and all(_is_int(t) for t in prompt):
        if any(not 0 <= t < tokenization.vocab_size for t in prompt):
            raise RequestError(
                f"prompt token ids must be between 0 and {tokenization.vocab_size - 1}",
                param="prompt",
            )
        return list(prompt)
    if isinstance(prompt, list) and prompt and all(isinstance(p, str | list) for p in prompt):
        raise RequestError(
            "this runtime takes one prompt per request; send the prompts as separate requests",
            param="prompt",
        )
    raise RequestError("prompt must be a string or an array of token ids", param="prompt")


def _refuse_unsupported(body: dict, *, chat: bool) -> None:
    best_of = _optional_int(body, "best_of", minimum=1)
    if best_of not in (None, 1):
        raise RequestError("best_of must be 1", param="best_of")
    for name in ("presence_penalty", "frequency_penalty"):
        value = _optional_number(body, name, -2.0, 2.0)
        if value not in (None, 0.0):
            raise RequestError(f"{name} is not supported; leave it at 0", param=name)
    if body.get("logit_bias"):
        raise RequestError("logit_bias is not supported", param="logit_bias")
    if not chat:
        if body.get("echo"):
            raise RequestError("echo is not supported", param="echo")
        if body.get("suffix"):
            raise RequestError("suffix is not supported", param="suffix")


def _stop_sequences(stop: Any) -> tuple[str, ...]:
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise RequestError("stop must be a string or an array of strings", param="stop")
    if len(stop) > MAX_STOP_SEQUENCES:
        raise RequestError(
            f"stop takes at most {MAX_STOP_SEQUENCES} sequences, got {len(stop)}", param="stop"
        )
    if any(s == "" for s in stop):
        raise RequestError("stop sequences must not be empty strings", param="stop")
    return tuple(stop)


def _require_object(body: Any) -> dict:
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    return body


def _require_string(body: dict, name: str) -> str:
    value = body.get(name)
    if not isinstance(value, str) or not value:
        raise RequestError(f"{name} is required and must be a non-empty string", param=name)
    return value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _optional_int(
    body: dict, name: str, *, minimum: int | None = None, maximum: int | None = None
) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if not _is_int(value):
        raise RequestError(f"{name} must be an integer, got {_json_type(value)}", param=name)
    if minimum is not None and value < minimum:
        raise RequestError(f"{name} must be at least {minimum}, got {value}", param=name)
    if maximum is not None and value > maximum:
        raise RequestError(f"{name} must be at most {maximum}, got {value}", param=name)
    return value


def _optional_number(body: dict, name: str, minimum: float, maximum: float) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise RequestError(f"{name} must be a number, got {_json_type(value)}", param=name)
    if not minimum <= value <= maximum:
        raise RequestError(
            f"{name} must be between {minimum} and {maximum}, got {value}", param=name
        )
    return float(value)


def _optional_bool(body: dict, name: str, prefix: str = "") -> bool | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, bool):
        raise RequestError(
            f"{prefix}{name} must be true or false, got {_json_type(value)}", param=prefix + name
        )
    return value


def _json_type(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return "null"


# ---- responses ----


def finish_reason(output: OutputSpec, reason: str, called_tools: bool) -> str:
    """OpenAI's finish reason: `tool_calls` when the model called tools of its own choice
    (auto or required); a call forced by name ends with `stop`, as OpenAI's does."""
    if called_tools and reason == "stop" and output.tool_choice != "function":
        return "tool_calls"
    return reason


def completion_id(chat: bool) -> str:
    return ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    """OpenAI's usage object; `prompt_tokens_details.cached_tokens` is the part of the prompt
    read from the prefix cache (billed at the cached-input price)."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


def full_choice(
    request: ParsedRequest,
    index: int,
    text: str,
    finish_reason: str,
    tool_calls: list[dict] | None = None,
    logprobs: dict | None = None,
) -> dict:
    """One choice of a whole answer; with `tool_calls` the message carries them and no
    content."""
    if request.chat:
        message = {"role": "assistant", "content": text}
        if tool_calls:
            message = {"role": "assistant", "content": None, "tool_calls": tool_calls}
        return {
            "index": index,
            "message": message,
            "logprobs": logprobs,
            "finish_reason": finish_reason,
        }
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}


def full_response(
    request: ParsedRequest, response_id: str, model: str, choices: list[dict], usage_: dict
) -> dict:
    """The whole answer: every choice (full_choice), and the usage of all of them."""
    return {
        "id": response_id,
        "object": "chat.completion" if request.chat else "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        "usage": usage_,
    }


def chat_logprobs(entries, tokenization: Tokenization) -> dict:
    """Chat's `logprobs` for these tokens: {"content": [{token, logprob, bytes,
    top_logprobs}], "refusal": None}, OpenAI's shape."""

    def one(token_id: int, logprob: float) -> dict:
        return {
            "token": tokenization.token_text(token_id),
            "logprob": logprob,
            "bytes": list(tokenization.token_bytes(token_id)),
        }

    return {
        "content": [
            {**one(e.token_id, e.logprob), "top_logprobs": [one(i, lp) for i, lp in e.top]}
            for e in entries
        ],
        "refusal": None,
    }


def completion_logprobs(entries, token_text, text_offset: int) -> dict:
    """The completions API's `logprobs` for these tokens: parallel lists, `top_logprobs` a
    token → logprob object per position (the sampled token always in it, as vLLM does), and
    each token's character offset in the whole completion, counted from `text_offset`."""
    tokens, offsets, top = [], [], []
    for entry in entries:
        token = token_text(entry.token_id)
        tokens.append(token)
        offsets.append(text_offset)
        text_offset += len(token)
        # Keyed by text: two tokens may read alike (byte pieces); the likelier one is kept.
        alternatives: dict[str, float] = {}
        for alternative, logprob in entry.top:
            alternatives.setdefault(token_text(alternative), logprob)
        alternatives.setdefault(token, entry.logprob)
        top.append(alternatives)
    return {
        "tokens": tokens,
        "token_logprobs": [entry.logprob for entry in entries],
        "top_logprobs": top,
        "text_offset": offsets,
    }


def stream_chunk(
    request: ParsedRequest,
    response_id: str,
    model: str,
    created: int,
    *,
    text: str | None = None,
    role: bool = False,
    tool_call: dict | None = None,
    finish_reason: str | None = None,
    usage_: dict | None = None,
    usage_so_far: dict | None = None,
    index: int = 0,
    logprobs: dict | None = None,
) -> dict:
    """One SSE chunk; with `usage_` it is the final usage chunk, which has no choices. With
    continuous usage, a content chunk carries `usage_so_far` (cumulative counts)."""
    if usage_ is not None:
        choices = []
    elif request.chat:
        delta: dict = {}
        if role:
            delta["role"] = "assistant"
        if text is not None:
            delta["content"] = text
        if tool_call is not None:
            delta["tool_calls"] = [tool_call]
        choices = [
            {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
        ]
    else:
        choices = [
            {
                "index": index,
                "text": text or "",
                "logprobs": logprobs,
                "finish_reason": finish_reason,
            }
        ]
    chunk = {
        "id": response_id,
        "object": "chat.completion.chunk" if request.chat else "text_completion",
        "created": created,
        "model": model,
        "choices": choices,
    }
    if request.include_usage:
        chunk["usage"] = (
            usage_ if usage_ is not None or not request.continuous_usage else usage_so_far
        )
    return chunk
