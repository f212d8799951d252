"""A chat request's messages, tools and output format: checked, and put in the shape chat
templates read.

Pure Python, shared by the runtime (which renders the prompt and constrains the output) and the
gateway (which counts the prompt's tokens before a replica sees it): both render the same
messages and tools, so the gateway's count equals the runtime's. Errors name the request's
parameter as OpenAI's do (`tools[0].function.parameters`, `tool_choice`, ...).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from runtime.schemas import InvalidRequest, check_schema

SUPPORTED_ROLES = ("system", "developer", "user", "assistant", "tool")
MAX_TOOLS = 128  # OpenAI's limit
FUNCTION_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")
TOOL_CHOICES = ("none", "auto", "required")
# What a function without `parameters` takes: OpenAI's "an empty parameter list".
NO_PARAMETERS = {"type": "object", "properties": {}}
JSON_OBJECT = {"type": "object"}


@dataclass(frozen=True)
class Function:
    name: str
    parameters: dict


@dataclass(frozen=True)
class OutputSpec:
    """What the output must be: free text, JSON under a schema, tool calls, or text-or-calls."""

    functions: tuple[Function, ...] = ()
    tool_choice: str = "none"  # "none", "auto", "required", or "function" (the named one)
    named_function: str | None = None
    parallel_tool_calls: bool = True
    json_schema: dict | None = None  # response_format's schema; None for free text

    @property
    def calls_tools(self) -> bool:
        return self.tool_choice != "none"

    @property
    def constrained(self) -> bool:
        return self.calls_tools or self.json_schema is not None


def template_messages(messages: Any) -> list[dict]:
    """The messages as chat templates read them: `developer` as `system`, content as text, an
    assistant's tool calls with their arguments as objects (as Mistral's templates want them),
    a tool's result with its `tool_call_id`."""
    if messages is None:
        raise InvalidRequest("messages is required", "messages")
    if not isinstance(messages, list):
        raise InvalidRequest("messages must be an array of message objects", "messages")
    if not messages:
        raise InvalidRequest("messages must not be empty", "messages")
    rendered = []
    for index, message in enumerate(messages):
        param = f"messages[{index}]"
        if not isinstance(message, dict):
            raise InvalidRequest(f"{param} must be an object", param)
        role = message.get("role")
        if not isinstance(role, str):
            raise InvalidRequest(f"{param}.role must be a string", f"{param}.role")
        if role not in SUPPORTED_ROLES:
            raise InvalidRequest(
                f"{param}.role {role!r} is not supported; use one of {', '.join(SUPPORTED_ROLES)}",
                f"{param}.role",
            )
        if message.get("function_call"):
            raise InvalidRequest(
                "function_call is deprecated and not supported; send tool_calls",
                f"{param}.function_call",
            )
        tool_calls = message.get("tool_calls")
        if tool_calls and role != "assistant":
            raise InvalidRequest(
                f"{param}: only assistant messages carry tool_calls", f"{param}.tool_calls"
            )
        entry = {
            "role": "system" if role == "developer" else role,
            "content": message_text(message.get("content"), role, param, bool(tool_calls)),
        }
        if tool_calls:
            entry["tool_calls"] = _tool_calls(tool_calls, f"{param}.tool_calls")
        if role == "tool":
            call_id = message.get("tool_call_id")
            if not isinstance(call_id, str) or not call_id:
                raise InvalidRequest(
                    f"{param}.tool_call_id is required for a tool message: the id of the call "
                    "it answers",
                    f"{param}.tool_call_id",
                )
            entry["tool_call_id"] = call_id
        rendered.append(entry)
    return rendered


def message_text(content: Any, role: str, param: str, has_tool_calls: bool = False) -> str:
    if isinstance(content, str):
        return content
    if content is None and (role == "assistant" or has_tool_calls):
        return ""
    if isinstance(content, list):
        parts = []
        for index, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text":
                raise InvalidRequest(
                    f"{param}.content[{index}]: only text parts are supported", f"{param}.content"
                )
            if not isinstance(part.get("text"), str):
                raise InvalidRequest(
                    f"{param}.content[{index}].text must be a string", f"{param}.content"
                )
            parts.append(part["text"])
        return "".join(parts)
    raise InvalidRequest(
        f"{param}.content must be a string or an array of text parts", f"{param}.content"
    )


def _tool_calls(calls: Any, param: str) -> list[dict]:
    if not isinstance(calls, list):
        raise InvalidRequest(f"{param} must be an array", param)
    rendered = []
    for index, call in enumerate(calls):
        where = f"{param}[{index}]"
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or call.get("type", "function") != "function":
            raise InvalidRequest(
                f'{where} must be {{"id", "type": "function", "function": {{"name", "arguments"}}}}',
                where,
            )
        call_id = call.get("id")
        if not isinstance(call_id, str) or not call_id:
            raise InvalidRequest(f"{where}.id must be a non-empty string", f"{where}.id")
        name = function.get("name")
        if not isinstance(name, str) or not name:
            raise InvalidRequest(
                f"{where}.function.name must be a non-empty string", f"{where}.function.name"
            )
        arguments = function.get("arguments", "{}")
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except ValueError:
                raise InvalidRequest(
                    f"{where}.function.arguments must be a JSON string (the arguments object)",
                    f"{where}.function.arguments",
                ) from None
        rendered.append(
            {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}
        )
    return rendered


def template_tools(tools: Any) -> list[dict] | None:
    """The tools as chat templates read them (OpenAI's shape: {type, function: {name,
    description, parameters}}), or None without tools. `tools` was checked by output_spec."""
    if not tools:
        return None
    rendered = []
    for tool in tools:
        function = tool["function"]
        entry = {"name": function["name"]}
        if function.get("description") is not None:
            entry["description"] = function["description"]
        entry["parameters"] = function.get("parameters") or NO_PARAMETERS
        rendered.append({"type": "function", "function": entry})
    return rendered


def output_spec(body: dict) -> OutputSpec:
    """`tools`, `tool_choice`, `parallel_tool_calls` and `response_format`, checked."""
    if body.get("functions") or body.get("function_call"):
        raise InvalidRequest(
            "functions and function_call are deprecated and not supported; send tools and "
            "tool_choice",
            "functions" if body.get("functions") else "function_call",
        )
    functions = _functions(body.get("tools"))
    choice, named = _tool_choice(body.get("tool_choice"), functions)
    parallel = body.get("parallel_tool_calls")
    if parallel is not None and not isinstance(parallel, bool):
        raise InvalidRequest("parallel_tool_calls must be true or false", "parallel_tool_calls")
    return OutputSpec(
        functions=functions,
        tool_choice=choice,
        named_function=named,
        parallel_tool_calls=parallel is not False,
        json_schema=_response_schema(body.get("response_format")),
    )


def _functions(tools: Any) -> tuple[Function, ...]:
    if tools is None:
        return ()
    if not isinstance(tools, list):
        raise InvalidRequest("tools must be an array of tool objects", "tools")
    if len(tools) > MAX_TOOLS:
        raise InvalidRequest(f"tools takes at most {MAX_TOOLS} tools, got {len(tools)}", "tools")
    functions: list[Function] = []
    for index, tool in enumerate(tools):
        param = f"tools[{index}]"
        if not isinstance(tool, dict) or tool.get("type") != "function":
            raise InvalidRequest(
                f'{param} must be {{"type": "function", "function": {{...}}}}', f"{param}.type"
            )
        function = tool.get("function")
        if not isinstance(function, dict):
            raise InvalidRequest(f"{param}.function must be an object", f"{param}.function")
        name = function.get("name")
        if not isinstance(name, str) or not FUNCTION_NAME.fullmatch(name):
            raise InvalidRequest(
                f"{param}.function.name must be 1 to 64 letters, digits, underscores or dashes",
                f"{param}.function.name",
            )
        if any(f.name == name for f in functions):
            raise InvalidRequest(
                f"{param}.function.name {name!r} is given twice", f"{param}.function.name"
            )
        description = function.get("description")
        if description is not None and not isinstance(description, str):
            raise InvalidRequest(
                f"{param}.function.description must be a string", f"{param}.function.description"
            )
        strict = function.get("strict")
        if strict is not None and not isinstance(strict, bool):
            raise InvalidRequest(
                f"{param}.function.strict must be true or false", f"{param}.function.strict"
            )
        parameters = function.get("parameters")
        if parameters is None:
            parameters = NO_PARAMETERS
        else:
            check_schema(parameters, f"{param}.function.parameters")
        functions.append(Function(name=name, parameters=parameters))
    return tuple(functions)


def _tool_choice(choice: Any, functions: tuple[Function, ...]) -> tuple[str, str | None]:
    if choice is None:
        return ("auto" if functions else "none"), None
    if isinstance(choice, str):
        if choice not in TOOL_CHOICES:
            raise InvalidRequest(
                f"tool_choice {choice!r} is not one of none, auto, required, or "
                '{"type": "function", "function": {"name": ...}}',
                "tool_choice",
            )
        if choice != "none" and not functions:
            raise InvalidRequest(
                "tool_choice is only allowed when tools are specified", "tool_choice"
            )
        return choice, None
    name = None
    if isinstance(choice, dict) and choice.get("type") == "function":
        function = choice.get("function")
        name = function.get("name") if isinstance(function, dict) else None
    if not isinstance(name, str):
        raise InvalidRequest(
            'tool_choice must be none, auto, required, or {"type": "function", "function": '
            '{"name": ...}}',
            "tool_choice",
        )
    if not any(f.name == name for f in functions):
        raise InvalidRequest(
            f"tool_choice names the function {name!r}, which is not in tools", "tool_choice"
        )
    return "function", name


def _response_schema(response_format: Any) -> dict | None:
    if response_format is None:
        return None
    kind = response_format.get("type") if isinstance(response_format, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return JSON_OBJECT
    if kind != "json_schema":
        raise InvalidRequest(
            "response_format.type must be text, json_object or json_schema", "response_format"
        )
    spec = response_format.get("json_schema")
    if not isinstance(spec, dict):
        raise InvalidRequest(
            "response_format.json_schema must be an object with name and schema",
            "response_format.json_schema",
        )
    name = spec.get("name")
    if not isinstance(name, str) or not FUNCTION_NAME.fullmatch(name):
        raise InvalidRequest(
            "response_format.json_schema.name must be 1 to 64 letters, digits, underscores or "
            "dashes",
            "response_format.json_schema.name",
        )
    strict = spec.get("strict")
    if strict is not None and not isinstance(strict, bool):
        raise InvalidRequest(
            "response_format.json_schema.strict must be true or false",
            "response_format.json_schema.strict",
        )
    schema = spec.get("schema")
    if schema is None:
        return JSON_OBJECT
    check_schema(schema, "response_format.json_schema.schema")
    return schema
