"""A model's tokenizer and chat template, read and rendered as transformers does, without
transformers.

Importing transformers costs the runtime's cold start 0.5 to 1 s (its import pulls in
huggingface_hub, regex and its version checks), and a replica's restart after a crash waits
for it; the Rust `tokenizers` library and Jinja2 do the whole job. The gateway counts tokens
with the same class (gateway/tokens.py), so the prompt it reserves and bills is the prompt the
replica renders.

What transformers (5.x) does and this repeats: the files it reads (tokenizer.json; the special
tokens of tokenizer_config.json, or of special_tokens_map.json when the config has no
added_tokens_decoder; the template of chat_template.jinja, else the config's, a named
"default" or, with tools, "tool_use"), and how it renders: a sandboxed Jinja environment with
the same whitespace rules, its `tojson` (no HTML escaping), `raise_exception`, `strftime_now`,
`dict` and `namespace`, `{% generation %}` blocks, messages without their None-valued keys, a
message's reasoning under its other names, and the named special tokens as variables.
tests/runtime/test_tokenizer.py compares the two.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

from jinja2 import nodes
from jinja2.exceptions import SecurityError, TemplateError
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import Namespace
from tokenizers import Tokenizer

# transformers' SPECIAL_TOKENS_ATTRIBUTES: the named special tokens a template sees.
SPECIAL_TOKEN_NAMES = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)
# Names a message's reasoning comes under; templates read the first (transformers'
# _REASONING_FIELDS), gpt-oss templates `thinking`.
REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")

__all__ = ["ChatTokenizer", "TemplateError"]


class ChatTokenizer:
    """The tokenizer files of a model folder. Offers the part of transformers' tokenizer
    interface the runtime uses (`encode`, `apply_chat_template`, `eos_token_id`, `len()`,
    `backend_tokenizer`), so request parsing reads the same with either."""

    def __init__(self, folder: Path):
        folder = Path(folder)
        self.backend_tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        config = _read_json(folder / "tokenizer_config.json")
        special = {name: config.get(name) for name in SPECIAL_TOKEN_NAMES}
        if "added_tokens_decoder" not in config:
            # transformers' legacy rule: without added_tokens_decoder in the config,
            # special_tokens_map.json's tokens win.
            legacy = _read_json(folder / "special_tokens_map.json")
            special.update((name, legacy[name]) for name in SPECIAL_TOKEN_NAMES if name in legacy)
        # transformers' special_tokens_map: the named tokens that are set, as text.
        self.special_tokens_map = {
            name: _token_text(value) for name, value in special.items() if value is not None
        }
        eos = self.special_tokens_map.get("eos_token")
        self.eos_token_id = self.backend_tokenizer.token_to_id(eos) if eos else None
        # A chat_template.jinja file takes priority over the config's template.
        template_path = folder / "chat_template.jinja"
        if template_path.exists():
            template = template_path.read_text(encoding="utf-8")
        else:
            template = config.get("chat_template")
            if isinstance(template, list):  # named templates
                template = {t["name"]: t["template"] for t in template}
        self.chat_template: str | dict[str, str] | None = template or None
        self._compiled: dict[str, object] = {}

    def __len__(self) -> int:
        return self.backend_tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        if not text:
            return []
        return self.backend_tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.backend_tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens)

    def render_chat(
        self,
        messages: list[dict],
        *,
        add_generation_prompt: bool = False,
        tools: list[dict] | None = None,
        documents: list[dict] | None = None,
        **variables,
    ) -> str:
        """The conversation as the model's chat template writes it. Raises TemplateError (the
        template refused it: `raise_exception`) or ValueError (no template)."""
        source = self._template_for(tools)
        compiled = self._compiled.get(source)
        if compiled is None:
            compiled = self._compiled[source] = _compile(source)
        chat = _alias_reasoning_fields(
            [{key: value for key, value in m.items() if value is not None} for m in messages]
        )
        return compiled.render(
            **{**self.special_tokens_map, **variables},
            messages=chat,
            tools=tools,
            documents=documents,
            add_generation_prompt=add_generation_prompt,
        )

    def apply_chat_template(
        self,
        conversation: list[dict],
        tools: list[dict] | None = None,
        documents: list[dict] | None = None,
        add_generation_prompt: bool = False,
        tokenize: bool = True,
        **variables,
    ) -> str | list[int]:
        text = self.render_chat(
            conversation,
            add_generation_prompt=add_generation_prompt,
            tools=tools,
            documents=documents,
            **variables,
        )
        return self.encode(text) if tokenize else text

    def _template_for(self, tools) -> str:
        template = self.chat_template
        if isinstance(template, dict):
            if tools is not None and "tool_use" in template:
                return template["tool_use"]
            if "default" in template:
                return template["default"]
            raise ValueError(
                f"the model has several chat templates ({', '.join(sorted(template))}) and "
                "none named default"
            )
        if template is None:
            raise ValueError("the model has no chat template")
        return template


def _read_json(path: Path) -> dict:
    if not path.exists():
        return {}
    value = json.loads(path.read_text(encoding="utf-8"))
    return value if isinstance(value, dict) else {}


def _token_text(value) -> str:
    if isinstance(value, dict):
        return value.get("content", "")
    return str(value)


def _alias_reasoning_fields(chat: list[dict]) -> list[dict]:
    aliased = []
    for message in chat:
        reasoning = next(
            (message[key] for key in REASONING_FIELDS if message.get(key) is not None), None
        )
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        aliased.append(message)
    return aliased


def _raise_exception(message):
    raise TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Jinja's own tojson escapes HTML characters; a prompt must carry them as they are.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(format):
    return datetime.now().strftime(format)


class _TemplateDict:
    # `dict(...)` in a template, without the class itself (no attribute access to break out).
    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(Namespace):
    # Namespaces refuse underscore-prefixed attributes (no way to CPython's internals).
    def __init__(*args, **kwargs):
        self, args = args[0], args[1:]
        attributes = dict(*args, **kwargs)
        for name in attributes:
            _TemplateNamespace._check_name(name)
        Namespace.__init__(self, attributes)

    def __setitem__(self, name, value):
        _TemplateNamespace._check_name(name)
        Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name):
        if isinstance(name, str) and name.startswith("_"):
            raise SecurityError(
                "Chat templates cannot store underscore-prefixed attributes on a namespace, but "
                f"got {name!r}."
            )


class _Generation(Extension):
    """`{% generation %}…{% endgeneration %}` marks the assistant's text for training masks;
    rendering a prompt writes the body as it is."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


def _compile(source: str):
    environment = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_Generation, "jinja2.ext.loopcontrols"]
    )
    environment.filters["tojson"] = _tojson
    environment.globals["raise_exception"] = _raise_exception
    environment.globals["strftime_now"] = _strftime_now
    environment.globals["dict"] = _TemplateDict()
    environment.globals["namespace"] = _TemplateNamespace
    return environment.from_string(source)
