"""runtime/tokenizer.py renders and tokenizes as transformers does (transformers is the reference
here only: neither the runtime nor the gateway imports it)."""

import json
import shutil
from pathlib import Path

import pytest
from jinja2.exceptions import SecurityError, TemplateError
from transformers import AutoTokenizer

from runtime.protocol import Tokenization, parse_chat_request
from runtime.tiny_moe import END_OF_TEXT
from runtime.tokenizer import ChatTokenizer

pytestmark = pytest.mark.nodb

CHAT = [
    {"role": "system", "content": "Be brief & <precise>."},
    {"role": "user", "content": 'Héllo, what\'s 2+2? "quote" </s>'},
    {"role": "assistant", "content": "4", "reasoning": "Two and two.", "name": None},
    {"role": "user", "content": "And <|im_end|> 3+3?"},
]
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "add",
            "description": "Adds <a> & <b>",
            "parameters": {"type": "object", "properties": {"a": {"type": "integer"}}},
        },
    }
]
# What real templates use: tojson (unescaped, with options), namespace, dict, loop controls,
# generation blocks, reasoning under its other names, keys that were None, special tokens.
TEMPLATE = (
    "{{ bos_token }}{% set ns = namespace(turns=0) %}"
    "{% if tools %}[TOOLS]{{ tools|tojson }}{{ tools|tojson(indent=2, sort_keys=true) }}{% endif %}"
    "{% for message in messages %}{% set ns.turns = ns.turns + 1 %}"
    "{% if message.role == 'system' %}{{ dict(role=message.role)|tojson }}{% continue %}{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message.reasoning_content is defined %}<think>{{ message.reasoning_content }}"
    "/{{ message.thinking }}</think>{% endif %}"
    "{% if message.name is defined %}NAME{% endif %}"
    "{% if message.role == 'assistant' %}{% generation %}{{ message.content }}{% endgeneration %}"
    "{% else %}{{ message.content }}{% endif %}{{ eos_token }}\n"
    "{% endfor %}{{ ns.turns }}{{ pad_token is defined }}{{ unk_token is defined }}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _folder(tiny_moe_dir: Path, tmp_path: Path, *, template=TEMPLATE, config=None, files=None):
    folder = Path(shutil.copytree(tiny_moe_dir, tmp_path / "model"))
    settings = json.loads((folder / "tokenizer_config.json").read_text())
    settings["chat_template"] = template
    settings.update(config or {})
    (folder / "tokenizer_config.json").write_text(json.dumps(settings))
    for name, text in (files or {}).items():
        (folder / name).write_text(text)
    return folder


def _both(folder: Path):
    return ChatTokenizer(folder), AutoTokenizer.from_pretrained(folder)


@pytest.mark.parametrize("tools", [None, TOOLS])
def test_a_template_using_what_templates_use_renders_as_transformers_renders_it(
    tiny_moe_dir, tmp_path, tools
):
    ours, reference = _both(_folder(tiny_moe_dir, tmp_path, config={"bos_token": END_OF_TEXT}))
    for add_generation_prompt in (True, False):
        expected = reference.apply_chat_template(
            CHAT, tools=tools, add_generation_prompt=add_generation_prompt, tokenize=False
        )
        rendered = ours.apply_chat_template(
            CHAT, tools=tools, add_generation_prompt=add_generation_prompt, tokenize=False
        )
        assert rendered == expected
        assert ours.encode(rendered) == reference.encode(expected, add_special_tokens=False)
    if tools is not None:
        assert '"Adds <a> & <b>"' in rendered  # transformers' tojson: no HTML escaping
    assert "<think>Two and two./Two and two.</think>" in rendered and "NAME" not in rendered


def test_the_tiny_model_parses_a_request_to_the_same_prompt_ids(tiny_moe_dir):
    ours, reference = _both(tiny_moe_dir)
    body = {"model": "m", "messages": CHAT, "max_tokens": 3}
    parsed = parse_chat_request(body, Tokenization(ours, 2048))
    expected = parse_chat_request(body, Tokenization(reference, 2048))
    assert parsed.prompt_ids == expected.prompt_ids
    assert len(ours) == len(reference) and ours.eos_token_id == reference.eos_token_id
    ids = ours.encode("Bonjour <|im_end|> à tous")
    assert ours.decode(ids) == reference.decode(ids, skip_special_tokens=True)
    for token in range(len(ours)):  # one token at a time, as logprobs name them
        assert ours.decode([token], skip_special_tokens=False) == reference.decode(
            [token], skip_special_tokens=False
        )


def test_named_templates_pick_tool_use_with_tools_and_default_otherwise(tiny_moe_dir, tmp_path):
    named = [
        {"name": "default", "template": "D{% for m in messages %}{{ m.content }}{% endfor %}"},
        {"name": "tool_use", "template": "T{{ tools|length }}"},
    ]
    ours, reference = _both(_folder(tiny_moe_dir, tmp_path, template=named))
    for tools in (None, TOOLS):
        assert ours.apply_chat_template(CHAT, tools=tools, tokenize=False) == (
            reference.apply_chat_template(CHAT, tools=tools, tokenize=False)
        )


def test_the_template_file_and_the_legacy_special_tokens_map_win_as_in_transformers(
    tiny_moe_dir, tmp_path
):
    folder = _folder(
        tiny_moe_dir,
        tmp_path,
        files={
            "special_tokens_map.json": json.dumps({"bos_token": END_OF_TEXT}),
            "chat_template.jinja": "{{ bos_token }}|" + TEMPLATE,
        },
    )
    ours, reference = _both(folder)
    expected = reference.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    assert expected.startswith(END_OF_TEXT + "|")
    assert ours.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False) == expected


def test_a_template_that_refuses_or_escapes_raises_as_in_transformers(tiny_moe_dir, tmp_path):
    refusing = "{{ raise_exception('no system messages') }}"
    ours, reference = _both(_folder(tiny_moe_dir, tmp_path / "a", template=refusing))
    for tokenizer in (ours, reference):
        with pytest.raises(TemplateError, match="no system messages"):
            tokenizer.apply_chat_template(CHAT, tokenize=False)
    escaping = "{% set ns = namespace() %}{% set ns.__class__ = 1 %}"
    ours, reference = _both(_folder(tiny_moe_dir, tmp_path / "b", template=escaping))
    for tokenizer in (ours, reference):
        with pytest.raises(SecurityError):
            tokenizer.apply_chat_template(CHAT, tokenize=False)
