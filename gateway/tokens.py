"""Counting tokens with the model's own tokenizer, and a cheap estimate when it is not at hand.

The gateway counts tokens twice: at admission, the prompt (to reserve prompt + max_tokens
against the tokens-per-minute limits; settlement corrects any difference), and when a stream
breaks before the replica's usage chunk, the prompt and the text already streamed (that count
is billed). The tokenizer comes from the model version's artifacts (tokenizer.json, and the
chat template in tokenizer_config.json, rendered the way transformers does), loaded once per
version in a background thread and kept. Until it is loaded, or for a model without
artifacts, admission uses the estimate: one token per 4 bytes of UTF-8 text plus 4 per chat
message (OpenAI's rule of thumb for English; only ever used for reservations, or for billing
when no tokenizer exists at all).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

logger = logging.getLogger(__name__)

RETRY_FAILED_LOAD_SECONDS = 60
TOKENS_PER_MESSAGE_ESTIMATE = 4


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
    """A model version's tokenizer and chat template."""

    def __init__(self, folder: Path):
        self._tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        config_path = folder / "tokenizer_config.json"
        config = json.loads(config_path.read_text()) if config_path.exists() else {}
        self._special = {
            name: _token_text(config.get(name))
            for name in ("bos_token", "eos_token", "unk_token", "pad_token")
        }
        template = config.get("chat_template")
        if isinstance(template, list):  # named templates: the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        if template is None and (folder / "chat_template.jinja").exists():
            template = (folder / "chat_template.jinja").read_text()
        self._template = _compile_template(template) if template else None

    def count_text(self, text: str) -> int:
        return len(self._tokenizer.encode(text, add_special_tokens=False).ids) if text else 0

    def count_chat(self, messages: list[dict]) -> int:
        rendered = [
            {"role": m.get("role"), "content": message_text(m.get("content"))} for m in messages
        ]
        if self._template is None:
            return sum(
                self.count_text(m["content"]) + TOKENS_PER_MESSAGE_ESTIMATE for m in rendered
            )
        try:
            text = self._template.render(
                messages=rendered, add_generation_prompt=True, **self._special
            )
        except TemplateError:
            # The replica will refuse these messages too; the reservation is only an estimate.
            return estimate_chat(messages)
        return self.count_text(text)

    def count_prompt(self, prompt) -> int:
        if isinstance(prompt, str):
            return self.count_text(prompt)
        return _count_prompt_list(prompt, self.count_text)


def estimate_chat(messages: list[dict]) -> int:
    return sum(
        estimate_text(message_text(m.get("content"))) + TOKENS_PER_MESSAGE_ESTIMATE
        for m in messages
        if isinstance(m, dict)
    )


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


def _token_text(value) -> str:
    if isinstance(value, dict):
        return value.get("content", "")
    return value or ""


def _raise_exception(message):
    raise TemplateError(message)


def _compile_template(source: str):
    # The environment transformers renders chat templates with (sandboxed, same whitespace).
    environment = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    environment.globals["raise_exception"] = _raise_exception
    return environment.from_string(source)


class Tokenizers:
    """Per model version: the tokenizer once loaded, else None (and a load is started)."""

    def __init__(self, db, folder_for_version: Callable[..., Path | None]):
        self._db = db
        self._folder_for_version = folder_for_version
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
        """Wait for the tokenizer (used when a count will be billed)."""
        if version_id is None:
            return None
        if version_id in self._loaded:
            return self._loaded[version_id]
        task = self._start_loading(version_id)
        return await asyncio.shield(task) if task is not None else None

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
            tokenizer = await self._db.call(self._load_sync, version_id=version_id)
            self._loaded[version_id] = tokenizer
            return tokenizer
        except Exception:
            logger.warning("no tokenizer for model version %s", version_id, exc_info=True)
            self._failed_at[version_id] = time.monotonic()
            return None
        finally:
            self._loading.pop(version_id, None)

    def _load_sync(self, version_id: int) -> ModelTokenizer | None:
        folder = self._folder_for_version(version_id=version_id)
        return ModelTokenizer(folder) if folder is not None else None
