"""Tools and structured outputs through the gateway to a real runtime process (the random-weight
tiny MoE), with the official openai SDK: calls and JSON that parse and validate, streamed and
not; the gateway's prompt count (rendered tool schemas and tool messages included) equal to the
runtime's; bad schemas and tool choices refused by the gateway itself with OpenAI's 400."""

import json
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import openai
import pytest

from gateway.tokens import ModelTokenizer
from metering.models import UsageEvent
from tests.gateway.conftest import RUNTIME_SERVED_NAME
from tests.tool_schemas import ORDER, QUESTION, WEATHER

pytestmark = pytest.mark.slow

TOOLS = [WEATHER]
PARAMETERS = WEATHER["function"]["parameters"]


@pytest.fixture
def client(gateway, organization, inference_key, make_deployment, runtime_process, tiny_moe_dir):
    deployment = make_deployment(
        organization,
        name="chat",
        endpoints=[runtime_process],
        served_model_name=RUNTIME_SERVED_NAME,
    )
    version = deployment.model_version
    version.artifact_uri = str(tiny_moe_dir)
    version.runtime_args = {"max_model_len": 2048}
    version.save(update_fields=["artifact_uri", "runtime_args"])
    _key, secret = inference_key(organization)
    with openai.OpenAI(base_url=gateway.v1, api_key=secret, max_retries=0) as client:
        yield client


def _calls(message) -> list:
    assert message.tool_calls
    for call in message.tool_calls:
        assert call.function.name == "get_weather"
        jsonschema.validate(json.loads(call.function.arguments), PARAMETERS)
    return message.tool_calls


def test_a_round_trip_through_the_gateway_counts_what_the_runtime_counts(client, tiny_moe_dir):
    tokenizer = ModelTokenizer(tiny_moe_dir)
    first = client.chat.completions.create(
        model="chat", messages=QUESTION, tools=TOOLS, tool_choice="required", max_tokens=100
    )
    assert first.choices[0].finish_reason == "tool_calls"
    calls = _calls(first.choices[0].message)
    # The gateway's own count (admission, broken streams) equals the runtime's, tool schemas
    # included.
    assert tokenizer.count_chat(QUESTION, TOOLS) == first.usage.prompt_tokens
    assert tokenizer.count_chat(QUESTION) < first.usage.prompt_tokens

    conversation = [
        *QUESTION,
        first.choices[0].message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": calls[0].id, "content": '{"temperature": 21}'},
    ]
    chunks = list(
        client.chat.completions.create(
            model="chat",
            messages=conversation,
            tools=TOOLS,
            tool_choice="none",
            max_tokens=8,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    answer = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert answer
    # Tool calls and tool results are in the prompt both count.
    assert tokenizer.count_chat(conversation, TOOLS) == chunks[-1].usage.prompt_tokens

    rows = list(UsageEvent.objects.order_by("started_at"))
    assert [(r.prompt_tokens, r.completion_tokens) for r in rows] == [
        (first.usage.prompt_tokens, first.usage.completion_tokens),
        (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens),
    ]


def test_streamed_tool_calls_pass_through_whole(client):
    request = {
        "model": "chat",
        "messages": QUESTION,
        "tools": TOOLS,
        "max_tokens": 100,
        "temperature": 0,
    }
    with client.chat.completions.stream(**request, tool_choice="required") as stream:
        final = stream.get_final_completion()
    assert final.choices[0].finish_reason == "tool_calls"
    _calls(final.choices[0].message)

    named = client.chat.completions.create(
        **request, tool_choice={"type": "function", "function": {"name": "get_weather"}}
    )
    assert named.choices[0].finish_reason == "stop"
    assert len(_calls(named.choices[0].message)) == 1
    auto = client.chat.completions.create(**{**request, "max_tokens": 10}, tool_choice="auto")
    if auto.choices[0].message.tool_calls:
        _calls(auto.choices[0].message)
    none = client.chat.completions.create(**{**request, "max_tokens": 5}, tool_choice="none")
    assert none.choices[0].message.tool_calls is None


def test_fifty_strict_json_answers_through_the_gateway(client):
    response_format = {
        "type": "json_schema",
        "json_schema": {"name": "order", "strict": True, "schema": ORDER},
    }

    def ask(index: int) -> str:
        reply = client.chat.completions.create(
            model="chat",
            messages=[{"role": "user", "content": f"Order {index}, please."}],
            response_format=response_format,
            max_tokens=120,
            seed=index,
        )
        return reply.choices[0].message.content

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(ask, range(50)))
    for answer in answers:
        jsonschema.validate(json.loads(answer), ORDER)
    assert UsageEvent.objects.count() == 50


def _refused(client, **fields) -> dict:
    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(model="chat", messages=QUESTION, max_tokens=4, **fields)
    assert raised.value.status_code == 400
    return raised.value.body


@pytest.mark.parametrize(
    ("fields", "param", "says"),
    [
        (
            {
                "tools": [
                    {
                        "type": "function",
                        "function": {"name": "f", "parameters": {"type": "object", "required": 3}},
                    }
                ]
            },
            "tools[0].function.parameters",
            "not a valid JSON Schema",
        ),
        (
            {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "absent"}}},
            "tool_choice",
            "not in tools",
        ),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {
                        "name": "r",
                        "schema": {"type": "object", "if": {"required": ["a"]}},
                    },
                }
            },
            "response_format.json_schema.schema",
            "`if`",
        ),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {
                        "name": "r",
                        "schema": {"$schema": "http://example.com/s", "type": "object"},
                    },
                }
            },
            "response_format.json_schema.schema",
            "draft",
        ),
    ],
)
def test_bad_tools_and_formats_are_refused_by_the_gateway(client, fields, param, says):
    error = _refused(client, **fields)
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert says in error["message"]
    assert not UsageEvent.objects.exists()  # refused before any replica was asked
