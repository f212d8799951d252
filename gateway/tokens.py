"""Counting tokens with the model's own tokenizer, and a cheap estimate when it is not at hand.

The gateway counts tokens twice: at admission, the prompt (to reserve prompt + max_tokens
against the tokens-per-minute limits; settlement corrects any difference), and when a stream
breaks before the replica's usage chunk, the prompt and the text already streamed (that count
is billed). The tokenizer comes from the model version's artifacts (tokenizer.json, the special
tokens and the chat template, read and rendered the way transformers does), fetched
(gateway/tokenizer_files.py) and loaded once per version in a worker thread, and kept. Until it
is loaded, or for a model without artifacts, admission uses the estimate: one token per 4
bytes of UTF-8 text plus 4 per chat message (OpenAI's rule of thumb for English). A count that
will be billed waits for the load, at most GATEWAY_TOKENIZER_WAIT_SECONDS; it is billed with
the estimate when the version has no tokenizer, when its files cannot be fetched (logged, and
retried a minute later), or when the wait runs out (logged).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from runtime.chat import template_messages, template_tools
from runtime.schemas import InvalidRequest
from runtime.tokenizer import ChatTokenizer, TemplateError

if TYPE_CHECKING:
    from gateway.tokenizer_files import TokenizerSource

logger = logging.getLogger(__name__)

RETRY_FAILED_LOAD_SECONDS = 60
TOKENS_PER_MESSAGE_ESTIMATE = 4


def prompt_token_bound(body_bytes: int) -> int:
    """At most how many tokens a request body of this size can make its prompt, known before
    it is parsed: one per byte. Byte-level BPE and byte-fallback tokenizers make at most one
    token per UTF-8 byte of text, the text is never longer in UTF-8 than in the JSON body
    that carries it, and each message's JSON wrapping (`{"role":"user","content":""}` is 28
    bytes) is longer than the tokens a chat template adds per message (Mixtral's and the
    tiny model's add at most 8). Tools are the exception: a template writes their schemas
    with a space after each `:` and `,`, which a compact body leaves out, so a request with
    tools may count more; admission draws the difference once it has counted."""
    return body_bytes


def estimate_text(text: str) -> int:
    return (len(text.encode()) + 3) // 4


def message_text(content) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            part.get("text", "") for part in content if isinstance(part, dict)
        )  # text parts; other kinds are refused by the runtime
    return ""


class ModelTokenizer:
    """A model version's tokenizer and chat template, loaded and rendered by the runtime's own
    class (runtime/tokenizer.py), so the gateway counts the prompt the replica renders."""

    def __init__(self, folder: Path):
        self.folder = folder
        self._tokenizer = ChatTokenizer(folder)

    def count_text(self, text: str) -> int:
        return len(self._tokenizer.encode(text))

    def count_input(self, text: str) -> int:
        """`text` as an encoder (embedding) model sees it: with the tokenizer's own special
        tokens around it ([CLS] … [SEP]), as vLLM and the builtin runtime encode it."""
        return len(self._tokenizer.encode(text, add_special_tokens=True))

    def count_chat(self, messages: list[dict], tools: list | None = None) -> int:
        """The prompt as the replica renders it: the messages in the shape the builtin runtime
        gives its template (runtime/chat.py: tool calls, tool results), and the tools'
        schemas, which the template writes into the prompt."""
        try:
            rendered = template_messages(messages)
            rendered_tools = template_tools(tools)
        except (InvalidRequest, KeyError, TypeError):
            # The replica will refuse these messages too; the reservation is only an estimate.
            return estimate_chat(messages, tools)
        if self._tokenizer.chat_template is None:
            return sum(
                self.count_text(m["content"]) + TOKENS_PER_MESSAGE_ESTIMATE for m in rendered
            ) + (self.count_text(json.dumps(rendered_tools)) if rendered_tools else 0)
        try:
            text = self._tokenizer.render_chat(
                rendered, add_generation_prompt=True, tools=rendered_tools
            )
        except (TemplateError, ValueError):
            return estimate_chat(messages, tools)
        return self.count_text(text)

    def count_prompt(self, prompt) -> int:
        if isinstance(prompt, str):
            return self.count_text(prompt)
        return _count_prompt_list(prompt, self.count_text)


def estimate_chat(messages: list[dict], tools: list | None = None) -> int:
    """Messages' text and tool calls, and the tools' schemas, at the rule of thumb."""
    total = 0
    for m in messages:
        if isinstance(m, dict):
            total += estimate_text(message_text(m.get("content"))) + TOKENS_PER_MESSAGE_ESTIMATE
            if m.get("tool_calls"):
                total += estimate_text(json.dumps(m["tool_calls"]))
    return total + (estimate_text(json.dumps(tools)) if tools else 0)


def estimate_prompt(prompt) -> int:
    if isinstance(prompt, str):
        return estimate_text(prompt)
    return _count_prompt_list(prompt, estimate_text)


def _count_prompt_list(prompt: list, count_text: Callable[[str], int]) -> int:
    # A prompt may be a list of strings, a list of token ids, or a list of such lists.
    if prompt and all(isinstance(item, int) for item in prompt):
        return len(prompt)
    total = 0
    for item in prompt:
        if isinstance(item, str):
            total += count_text(item)
        elif isinstance(item, list):
            total += len(item)
    return total


class Tokenizers:
    """Per model version: the tokenizer once loaded, else None (and a load is started).

    A load reads where the files are in a DB thread (`source_for_version`), then fetches and
    parses them in a worker thread (`folder_for_source`: a download must not hold one of the
    few DB threads, nor the event loop)."""

    def __init__(
        self,
        db,
        source_for_version: Callable[..., TokenizerSource | None],
        folder_for_source: Callable[[TokenizerSource], Path | None],
        *,
        wait_seconds: float,
    ):
        self._db = db
        self._source_for_version = source_for_version
        self._folder_for_source = folder_for_source
        self._wait_seconds = wait_seconds
        self._loaded: dict[int, ModelTokenizer | None] = {}
        self._failed_at: dict[int, float] = {}
        self._loading: dict[int, asyncio.Task] = {}

    def get_nowait(self, version_id: int | None) -> ModelTokenizer | None:
        if version_id is None:
            return None
        if version_id in self._loaded:
            return self._loaded[version_id]
        self._start_loading(version_id)
        return None

    async def get(self, version_id: int | None) -> ModelTokenizer | None:
        """Wait for the tokenizer (used when a count will be billed), at most wait_seconds."""
        if version_id is None:
            return None
        if version_id in self._loaded:
            return self._loaded[version_id]
        task = self._start_loading(version_id)
        if task is None:
            return None
        try:
            async with asyncio.timeout(self._wait_seconds):
                return await asyncio.shield(task)
        except TimeoutError:
            logger.warning(
                "the tokenizer of model version %s is still loading after %.3gs: counted with "
                "the estimate",
                version_id,
                self._wait_seconds,
            )
            return None

    def close(self) -> None:
        for task in self._loading.values():
            task.cancel()

    def _start_loading(self, version_id: int) -> asyncio.Task | None:
        if time.monotonic() - self._failed_at.get(version_id, -1e9) < RETRY_FAILED_LOAD_SECONDS:
            return None
        task = self._loading.get(version_id)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._load(version_id))
            self._loading[version_id] = task
        return task

    async def _load(self, version_id: int) -> ModelTokenizer | None:
        try:
            source = await self._db.call(self._source_for_version, version_id=version_id)
            tokenizer = None
            if source is not None:
                tokenizer = await _in_daemon_thread(self._open, source)
            self._loaded[version_id] = tokenizer
            return tokenizer
        except Exception:
            logger.warning(
                "no tokenizer for model version %s: counting with the estimate, retrying in %ss",
                version_id,
                RETRY_FAILED_LOAD_SECONDS,
                exc_info=True,
            )
            self._failed_at[version_id] = time.monotonic()
            return None
        finally:
            self._loading.pop(version_id, None)

    def _open(self, source: TokenizerSource) -> ModelTokenizer | None:
        folder = self._folder_for_source(source)
        return ModelTokenizer(folder) if folder is not None else None


async def _in_daemon_thread(function: Callable, /, *args):
    """function(*args) on a thread of its own. Not asyncio.to_thread: its executor is joined
    when the loop closes, so a download hung on an unreachable store would hold the shutdown."""
    loop = asyncio.get_running_loop()
    future = loop.create_future()

    def settle(result, error) -> None:
        if future.done():  # the waiting load was cancelled
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    def run() -> None:
        try:
            result, error = function(*args), None
        except BaseException as exc:
            result, error = None, exc
        with contextlib.suppress(RuntimeError):  # the loop has closed: nobody waits
            loop.call_soon_threadsafe(settle, result, error)

    threading.Thread(target=run, name="gateway-tokenizer", daemon=True).start()
    return await future
