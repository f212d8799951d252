"""What a prompt worker process does (gateway/fairpool.py): read a large request body and count
its prompt, away from the gateway's event loop and its GIL.

Imports nothing from Django: the worker processes are forked from a server process that loads
this module alone. Results are small (a CompletionRequest without its payload, or a count);
a refused request comes back as the error's fields, since GatewayError does not pickle.
"""

from __future__ import annotations

import contextlib
import os
from collections import OrderedDict
from pathlib import Path

import orjson

from gateway.embedding_input import EmbeddingRequest, count_inputs, parse_embedding_request
from gateway.errors import GatewayError
from gateway.protocol import CompletionRequest, parse_request
from gateway.tokens import ModelTokenizer

# Worker processes run below the gateway's priority: on a busy machine the event loop (which
# only moves bytes) gets the CPU first, and a flood of prompts slows only its own reading.
WORKER_NICENESS = 10
_TOKENIZERS_KEPT = 8
_tokenizers: OrderedDict[str, ModelTokenizer] = OrderedDict()
_niced = False


def read_request(raw: bytes, chat: bool) -> CompletionRequest | tuple:
    """parse_request in a worker (which prepares the upstream body), the prompt estimated.
    Returns the request without its payload, or ("error", status, message, type, code,
    param) when it is refused."""
    _lower_priority()
    try:
        request = parse_request(raw, chat=chat)
    except GatewayError as error:
        return ("error", error.status, error.message, error.type, error.code, error.param)
    request.prompt_tokens = request.count_prompt(None)
    request.payload = None
    return request


def count_prompt(raw: bytes, chat: bool, tokenizer_folder: str) -> int:
    """The prompt's tokens with the model's own tokenizer and chat template. The body was
    read by read_request already, so it parses."""
    tokenizer = _tokenizer(tokenizer_folder)
    payload = orjson.loads(raw)
    if chat:
        return tokenizer.count_chat(payload["messages"], payload.get("tools"))
    return tokenizer.count_prompt(payload["prompt"])


def read_embedding_request(raw: bytes) -> EmbeddingRequest | tuple:
    """parse_embedding_request in a worker, its inputs estimated; as read_request."""
    _lower_priority()
    try:
        request = parse_embedding_request(raw)
    except GatewayError as error:
        return ("error", error.status, error.message, error.type, error.code, error.param)
    request.prompt_tokens, request.longest_input = request.count_inputs(None)
    request.payload = None
    return request


def count_embedding_inputs(raw: bytes, tokenizer_folder: str) -> tuple[int, int]:
    """(all inputs' tokens, the longest input's) with the model's own tokenizer."""
    return count_inputs(orjson.loads(raw)["input"], _tokenizer(tokenizer_folder))


def count_text(text: str, tokenizer_folder: str) -> int:
    """A long completion's tokens (one relayed without the replica's usage, to be billed)."""
    return _tokenizer(tokenizer_folder).count_text(text)


def _tokenizer(folder: str) -> ModelTokenizer:
    _lower_priority()
    tokenizer = _tokenizers.get(folder)
    if tokenizer is None:
        tokenizer = ModelTokenizer(Path(folder))
        _tokenizers[folder] = tokenizer
        if len(_tokenizers) > _TOKENIZERS_KEPT:
            _tokenizers.popitem(last=False)
    else:
        _tokenizers.move_to_end(folder)
    return tokenizer


def error_from(result: tuple) -> GatewayError:
    _, status, message, type_, code, param = result
    return GatewayError(status, message, type=type_, code=code, param=param)


def _lower_priority() -> None:
    global _niced
    if not _niced:
        _niced = True
        with contextlib.suppress(OSError):  # not permitted here: the gateway's priority
            os.nice(WORKER_NICENESS)
