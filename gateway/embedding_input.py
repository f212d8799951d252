"""What the gateway checks in a POST /v1/embeddings body, and how it counts its tokens.

Imports nothing from Django: a large body is read and counted in a prompt worker process
(gateway/prompt_work.py), as a large completion prompt is. Only what the gateway needs is checked
here (the model, the inputs it counts, their types and number); `encoding_format` and
`dimensions` are checked for type and passed on, and the replica decides whether the model
supports `dimensions` (its 400 names the parameter and reaches the client as it is).

Tokens are counted as an encoder sees its input: a string with the tokenizer's special tokens
(`[CLS] … [SEP]`, `<s> … </s>`: `add_special_tokens=True`, what vLLM and the builtin runtime
do), a token array as it is. Every input must fit the model's context on its own; the request
reserves and is billed the sum (input tokens only).
"""

from __future__ import annotations

from dataclasses import dataclass

import orjson

from gateway.attribution import read_attribution, without_metadata
from gateway.errors import bad_request
from gateway.protocol import read_payload, upstream_tail
from gateway.tokens import ModelTokenizer, estimate_text

# OpenAI's limit on inputs in one request (the builtin runtime's too).
MAX_INPUTS = 2048
ENCODING_FORMATS = ("float", "base64")
# What a string adds besides its text when the tokenizer is not at hand: [CLS] and [SEP].
SPECIAL_TOKENS_ESTIMATE = 2


@dataclass(slots=True)
class EmbeddingRequest:
    payload: dict | None  # None when read in a prompt worker process
    model: str
    upstream_tail: bytes = b""
    prompt_tokens: int = 0  # all inputs together, as admission counted them
    longest_input: int = 0  # the longest input's tokens: each must fit the context
    # No prompt prefix to route by (gateway/routing.py): an encoder keeps no KV cache, so the
    # replica least in flight takes it.
    prefix_keys: tuple[bytes, ...] = ()
    end_user: str | None = None  # OpenAI's `user`
    tags: dict[str, str] | None = None  # `metadata`
    stream = False  # the gateway's common steps ask; an embedding is one JSON answer

    def count_inputs(self, tokenizer: ModelTokenizer | None) -> tuple[int, int]:
        """(all inputs' tokens, the longest input's), with the model's tokenizer or estimated."""
        if self.payload is None:  # read in a worker: counted there at admission
            return self.prompt_tokens, self.longest_input
        return count_inputs(self.payload["input"], tokenizer)

    def upstream_body(self, served_model_name: str) -> bytes:
        return b'{"model":' + orjson.dumps(served_model_name) + self.upstream_tail


def count_inputs(value, tokenizer: ModelTokenizer | None) -> tuple[int, int]:
    counts = [_count_one(item, tokenizer) for item in _items(value)]
    return sum(counts), max(counts)


def _items(value) -> list:
    if isinstance(value, str) or (value and all(isinstance(t, int) for t in value)):
        return [value]
    return value


def _count_one(item, tokenizer: ModelTokenizer | None) -> int:
    if isinstance(item, list):
        return len(item)
    if tokenizer is not None:
        return tokenizer.count_input(item)
    return estimate_text(item) + SPECIAL_TOKENS_ESTIMATE


def parse_embedding_request(raw: bytes) -> EmbeddingRequest:
    payload, model = read_payload(raw, wants="`input`")
    _check_input(payload.get("input"))
    encoding_format = payload.get("encoding_format")
    if encoding_format is not None and encoding_format not in ENCODING_FORMATS:
        raise bad_request("`encoding_format` must be 'float' or 'base64'.", param="encoding_format")
    dimensions = payload.get("dimensions")
    if dimensions is not None and (
        isinstance(dimensions, bool) or not isinstance(dimensions, int) or dimensions < 1
    ):
        raise bad_request("`dimensions` must be a positive integer.", param="dimensions")
    request = EmbeddingRequest(payload, model)
    # Attributed as a chat's are (gateway/attribution.py); the tags are not the replica's.
    request.end_user, request.tags = read_attribution(payload)
    upstream = payload if "metadata" not in payload else without_metadata(payload)
    request.upstream_tail = upstream_tail(upstream, stream=False)
    return request


def _is_token(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_input(value) -> None:
    if value is None:
        raise bad_request("You must provide `input`.", param="input")
    if isinstance(value, str):
        if not value:
            raise bad_request("`input` must not be an empty string.", param="input")
        return
    if not isinstance(value, list) or not value:
        raise bad_request(
            "`input` must be a non-empty string, an array of strings, an array of token ids, "
            "or an array of token-id arrays.",
            param="input",
        )
    if all(_is_token(t) for t in value):
        return  # one token array
    if len(value) > MAX_INPUTS:
        raise bad_request(
            f"`input` has {len(value)} items; at most {MAX_INPUTS} are allowed per request. "
            "Split the inputs over several requests.",
            param="input",
        )
    for index, item in enumerate(value):
        where = f"input[{index}]"
        if isinstance(item, str):
            if not item:
                raise bad_request(f"`{where}` must not be an empty string.", param=where)
        elif not (isinstance(item, list) and item and all(_is_token(t) for t in item)):
            raise bad_request(
                f"`{where}` must be a non-empty string or a non-empty array of token ids "
                "(non-negative integers); one request's items must not mix them with numbers.",
                param=where,
            )


def check_input_context(request: EmbeddingRequest, max_model_len: int, *, exact: bool) -> None:
    """400 when an input cannot fit the model's context (with an exact count only: an
    estimate may be high, and the replica checks the real count anyway)."""
    if exact and request.longest_input > max_model_len:
        raise bad_request(
            f"This model's maximum context length is {max_model_len} tokens. However, an "
            f"input resulted in {request.longest_input} tokens. Please reduce the length of "
            "the input.",
            param="input",
            code="context_length_exceeded",
        )
