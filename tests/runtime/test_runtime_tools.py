"""Tool calling and structured outputs on a real runtime process serving the random-weight tiny
MoE, through the official openai SDK: constrained decoding makes every call and every JSON
answer parse and validate, whatever the weights say."""

import json
import time
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import openai
import pytest
from transformers import AutoTokenizer

from runtime.chat import output_spec, template_messages, template_tools
from runtime.structured import (
    COMPILED_GRAMMARS,
    AnswerReader,
    Grammars,
    ToolCallReader,
)
from tests.tool_schemas import ADD, ORDER, QUESTION, WEATHER

pytestmark = [pytest.mark.slow, pytest.mark.nodb]

SERVED_NAME = "tiny-moe"

TOOLS = [WEATHER, ADD]
SCHEMAS = {tool["function"]["name"]: tool["function"]["parameters"] for tool in TOOLS}


@pytest.fixture(scope="module")
def client(runtime_server):
    with openai.OpenAI(base_url=f"{runtime_server.url}/v1", api_key="unused", max_retries=0) as c:
        yield c


@pytest.fixture(scope="module")
def tokenizer(tiny_moe_dir):
    return AutoTokenizer.from_pretrained(tiny_moe_dir)


def _valid_calls(message) -> list:
    assert message.tool_calls, message
    for call in message.tool_calls:
        assert call.type == "function"
        assert len(call.id) == 9 and call.id.isalnum()  # what Mistral's templates require
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])
    return message.tool_calls


def _prompt_tokens(tokenizer, messages, tools=None) -> int:
    text = tokenizer.apply_chat_template(
        template_messages(messages),
        tools=template_tools(tools),
        add_generation_prompt=True,
        tokenize=False,
    )
    return len(tokenizer.encode(text, add_special_tokens=False))


def test_a_tool_call_round_trip(client, tokenizer):
    first = client.chat.completions.create(
        model=SERVED_NAME, messages=QUESTION, tools=TOOLS, tool_choice="required", max_tokens=120
    )
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    calls = _valid_calls(choice.message)
    # The rendered tool schemas are part of the prompt the runtime counts.
    assert first.usage.prompt_tokens == _prompt_tokens(tokenizer, QUESTION, TOOLS)
    assert first.usage.prompt_tokens > _prompt_tokens(tokenizer, QUESTION) + 50

    conversation = [
        *QUESTION,
        choice.message.model_dump(exclude_none=True),
        *(
            {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21}'}
            for call in calls
        ),
    ]
    final = client.chat.completions.create(
        model=SERVED_NAME, messages=conversation, tools=TOOLS, tool_choice="none", max_tokens=8
    )
    assert final.choices[0].message.tool_calls is None
    assert final.choices[0].message.content
    assert final.usage.prompt_tokens == _prompt_tokens(tokenizer, conversation, TOOLS)


def test_a_streamed_round_trip_sends_openai_tool_call_deltas(client):
    request = {
        "model": SERVED_NAME,
        "messages": QUESTION,
        "tools": TOOLS,
        "tool_choice": "required",
        "max_tokens": 120,
        "temperature": 0,
    }
    whole = client.chat.completions.create(**request)
    chunks = list(client.chat.completions.create(**request, stream=True))

    deltas = [d for c in chunks if c.choices for d in c.choices[0].delta.tool_calls or []]
    first = deltas[0]
    # OpenAI's order: id, type and name first with empty arguments, then arguments in pieces.
    assert first.id and first.type == "function" and first.function.arguments == ""
    assert all(d.id is None and d.function.name is None for d in deltas[1:] if d.index == 0)
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    streamed = "".join(d.function.arguments for d in deltas if d.index == 0)
    # Greedy: the same call as the whole answer's, apart from its fresh id.
    assert streamed == whole.choices[0].message.tool_calls[0].function.arguments
    assert first.function.name == whole.choices[0].message.tool_calls[0].function.name

    with client.chat.completions.stream(**request) as stream:  # the SDK's own accumulation
        final = stream.get_final_completion()
    _valid_calls(final.choices[0].message)

    call = final.choices[0].message
    conversation = [
        *QUESTION,
        call.model_dump(exclude_none=True, exclude={"parsed", "refusal"}),
        {"role": "tool", "tool_call_id": call.tool_calls[0].id, "content": "sunny"},
    ]
    answer = client.chat.completions.create(
        model=SERVED_NAME, messages=conversation, tools=TOOLS, max_tokens=6, stream=True
    )
    text = "".join(c.choices[0].delta.content or "" for c in answer if c.choices)
    assert text


def test_tool_choice_variants(client):
    def ask(**fields):
        fields = {"max_tokens": 120, **fields}
        return client.chat.completions.create(
            model=SERVED_NAME, messages=QUESTION, tools=TOOLS, **fields
        ).choices[0]

    named = ask(tool_choice={"type": "function", "function": {"name": "add"}})
    assert [c.function.name for c in _valid_calls(named.message)] == ["add"]
    assert named.finish_reason == "stop"  # as OpenAI ends a call forced by name

    for seed in range(4):
        single = ask(tool_choice="required", parallel_tool_calls=False, seed=seed)
        assert len(_valid_calls(single.message)) == 1

    none = ask(tool_choice="none", max_tokens=6)
    assert none.message.tool_calls is None and none.message.content

    for seed in range(4):  # text or a call, whichever the model starts: both well formed
        auto = ask(tool_choice="auto", seed=seed, temperature=1.0)
        if auto.message.tool_calls:
            _valid_calls(auto.message)
            assert auto.finish_reason == "tool_calls"
        else:
            assert auto.message.content is not None


def test_fifty_answers_under_a_strict_schema_all_validate(client):
    response_format = {
        "type": "json_schema",
        "json_schema": {"name": "order", "strict": True, "schema": ORDER},
    }

    def ask(index: int):
        return client.chat.completions.create(
            model=SERVED_NAME,
            messages=[{"role": "user", "content": f"Make up order number {index}."}],
            response_format=response_format,
            max_tokens=200,
            temperature=1.0,
            seed=index,
        ).choices[0]

    with ThreadPoolExecutor(16) as pool:
        choices = list(pool.map(ask, range(50)))
    for choice in choices:
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.message.content), ORDER)


def test_json_object_answers_are_objects(client):
    for seed in range(3):
        reply = client.chat.completions.create(
            model=SERVED_NAME,
            messages=[{"role": "user", "content": "Answer in JSON."}],
            response_format={"type": "json_object"},
            max_tokens=60,
            seed=seed,
        )
        assert isinstance(json.loads(reply.choices[0].message.content), dict)


def _bad(client, **overrides):
    request = {"model": SERVED_NAME, "messages": QUESTION, "max_tokens": 4, **overrides}
    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(**request)
    error = raised.value.body
    assert error["type"] == "invalid_request_error" and error["message"]
    return error


@pytest.mark.parametrize(
    ("overrides", "param"),
    [
        (
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": 7}}}]},
            "tools[0].function.parameters",
        ),
        (
            {"tools": [{"type": "function", "function": {"name": "bad name!"}}]},
            "tools[0].function.name",
        ),
        (
            {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "tool_choice",
        ),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {
                        "name": "x",
                        "schema": {"type": "array", "uniqueItems": True},
                    },
                }
            },
            "response_format.json_schema.schema",
        ),
        ({"response_format": {"type": "yaml"}}, "response_format"),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"type": "string", "format": "weird"}},
                }
            },
            "response_format",
        ),
        (
            {
                "messages": [
                    {
                        "role": "assistant",
                        "tool_calls": [
                            {
                                "id": "a",
                                "type": "function",
                                "function": {"name": "f", "arguments": "{"},
                            }
                        ],
                    }
                ]
            },
            "messages[0].tool_calls[0].function.arguments",
        ),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].tool_call_id"),
        ({"functions": [{"name": "f"}]}, "functions"),
    ],
)
def test_bad_tools_and_formats_are_refused_with_a_400(client, overrides, param):
    assert _bad(client, **overrides)["param"] == param


def test_an_oversized_or_deep_schema_is_refused_before_compiling(client):
    deep: dict = {"type": "string"}
    for _ in range(40):
        deep = {"type": "array", "items": deep}
    error = _bad(
        client,
        response_format={"type": "json_schema", "json_schema": {"name": "deep", "schema": deep}},
    )
    assert "deeper than" in error["message"]
    wide = {"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(4000)}}
    error = _bad(
        client, tools=[{"type": "function", "function": {"name": "w", "parameters": wide}}]
    )
    assert "bytes" in error["message"] and error["param"] == "tools[0].function.parameters"


# ---- in process: the grammar without a control token, and the reader ----


def test_a_tokenizer_without_the_control_token_gets_a_textual_marker(tokenizer):
    grammars = Grammars(tokenizer.backend_tokenizer, tokenizer.eos_token_id, len(tokenizer))
    grammars.call_token = None  # as for a tokenizer whose vocabulary lacks [TOOL_CALLS]
    spec = output_spec({"tools": [ADD], "tool_choice": "auto"})

    def accepts(pieces: list[str]) -> bool:
        constraint = grammars.constraint(spec)
        tokens = [t for piece in pieces for t in tokenizer.encode(piece, add_special_tokens=False)]
        return all(constraint.consume(t) for t in tokens) and constraint.matcher.is_accepting()

    assert accepts(["[TOOL", '_CALLS][{"name": "add", "arguments": {"a": 1, "b": 2}}]'])
    assert accepts(["plain text"])
    assert not accepts(["[TOOL", "_CALLS] and then prose"])  # a marker commits to a call

    reader = AnswerReader(spec, grammars.constraint(spec))
    pieces = []
    for part in ["[TO", "OL_CAL", 'LS][{"name": "add", "arg', 'uments": {"a": 1, "b": 2}}]']:
        pieces += reader.feed(part)
    assert reader.called and all(kind == "tool_call" for kind, _ in pieces)
    assert reader.calls.tool_calls()[0]["function"] == {
        "name": "add",
        "arguments": '{"a": 1, "b": 2}',
    }

    text = AnswerReader(spec, grammars.constraint(spec))
    assert text.feed("[T") == [] and text.feed("oo much") == [("content", "[Too much")]


def test_the_reader_splits_calls_with_tricky_strings():
    reader = ToolCallReader()
    text = (
        '[{"name": "a", "arguments": {"s": "}\\" ,{", "n": [1, {"x": "]"}]}}, '
        '{"name": "b", "arguments": {}}]'
    )
    deltas = [d for char in text for d in reader.feed(char)]
    calls = reader.tool_calls()
    assert [c["function"]["name"] for c in calls] == ["a", "b"]
    assert json.loads(calls[0]["function"]["arguments"]) == {"s": '}" ,{', "n": [1, {"x": "]"}]}
    assert calls[1]["function"]["arguments"] == "{}"
    assert [d["index"] for d in deltas if "id" in d] == [0, 1]


def test_adversarial_schemas_do_not_stall_other_requests(client):
    """Patterns whose automata would explode compile lazily within llguidance's fuel, on the
    grammar threads: a plain request beside them is answered at once."""
    hostile = [
        {"type": "string", "pattern": "(a{1000}){1000}"},
        {"type": "string", "pattern": "([a-z]{0,50}[0-9]{0,50}){0,50}x"},
        {
            "type": "object",
            "properties": {
                f"p{i}": {"type": "string", "pattern": "[a-z]{1,200}"} for i in range(300)
            },
            "required": [f"p{i}" for i in range(300)],
        },
    ]

    def hostile_request(schema):
        try:
            reply = client.chat.completions.create(
                model=SERVED_NAME,
                messages=QUESTION,
                max_tokens=16,
                response_format={
                    "type": "json_schema",
                    "json_schema": {"name": "h", "schema": schema},
                },
            )
            return reply.choices[0].finish_reason
        except openai.BadRequestError as error:
            return error.body["param"]

    def plain_request():
        started = time.monotonic()
        client.chat.completions.create(model=SERVED_NAME, messages=QUESTION, max_tokens=4)
        return time.monotonic() - started

    with ThreadPoolExecutor(7) as pool:
        hostile_futures = [pool.submit(hostile_request, schema) for schema in hostile * 2]
        plain = pool.submit(plain_request).result()  # while the hostile ones are in flight
        outcomes = [future.result() for future in hostile_futures]
    assert all(o in ("length", "stop", "response_format") for o in outcomes), outcomes
    assert plain < 10


def test_requests_repeating_a_schema_get_their_own_grammar_state(tokenizer):
    """The compiled-grammar cache hands out copies: one request's tokens never move another's
    grammar state; it keeps at most COMPILED_GRAMMARS grammars, and none over
    COMPILED_GRAMMAR_MAX_BYTES (a client flooding large schemas pins nothing)."""
    grammars = Grammars(tokenizer.backend_tokenizer, tokenizer.eos_token_id, len(tokenizer))
    spec = output_spec({"tools": [ADD], "tool_choice": "required"})
    first, second = grammars.constraint(spec), grammars.constraint(spec)
    call = '[{"name": "add", "arguments": {"a": 1, "b": 2}}]'
    tokens = [tokenizer.convert_tokens_to_ids("[TOOL_CALLS]")]
    tokens += tokenizer.encode(call, add_special_tokens=False)
    assert all(first.consume(token) for token in tokens) and first.matcher.is_accepting()
    assert not second.matcher.is_accepting() and second.consumed == 0
    assert all(second.consume(token) for token in tokens)  # from the start, as a new request

    for index in range(COMPILED_GRAMMARS + 10):
        schema = {"type": "object", "properties": {f"field_{index}": {"type": "integer"}}}
        grammars.constraint(output_spec({"response_format": _json_format(schema)}))
    assert len(grammars._compiled) == COMPILED_GRAMMARS
    large = {
        "type": "object",
        "properties": {f"a_rather_long_field_name_{i}": {"type": "string"} for i in range(600)},
    }
    before = dict(grammars._compiled)
    grammars.constraint(output_spec({"response_format": _json_format(large)}))
    assert dict(grammars._compiled).keys() == before.keys()


def _json_format(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "s", "strict": True, "schema": schema}}
