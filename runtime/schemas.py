"""The checks a JSON Schema from a client passes before anything compiles it into a grammar.

A tool's `parameters` and a `response_format` schema become grammars for constrained decoding
(runtime/structured.py). Before that they are bounded (size, nesting), checked against JSON
Schema's own meta-schema, and refused when they use a keyword that constrained decoding cannot
enforce, so a client hears "not supported" rather than getting output that ignores its schema.
Pure Python: the gateway runs the same checks before it spends anything on the request.
"""

from __future__ import annotations

import json
from typing import Any

import jsonschema_rs

# A schema larger or deeper than these is refused before any compiler sees it: the bounds
# keep grammar compilation (and the meta-schema check) cheap whatever a client sends.
MAX_SCHEMA_BYTES = 64 * 1024
MAX_SCHEMA_DEPTH = 32  # JSON nesting of the schema document itself

# The drafts a schema may name in `$schema`; any other URI is refused rather than fetched.
KNOWN_DRAFTS = frozenset(
    f"{scheme}://json-schema.org/{path}"
    for scheme in ("http", "https")
    for path in (
        "draft-04/schema",
        "draft-04/schema#",
        "draft-06/schema",
        "draft-06/schema#",
        "draft-07/schema",
        "draft-07/schema#",
        "draft/2019-09/schema",
        "draft/2020-12/schema",
    )
)

# Keywords that constrain output which llguidance's JSON compiler does not implement (it
# refuses them with "Unimplemented keys"). Annotations (title, description, examples...) and
# unknown keywords are ignored, as JSON Schema says they may be.
UNSUPPORTED_KEYWORDS = frozenset(
    {
        "if",
        "then",
        "else",
        "not",
        "dependentRequired",
        "dependentSchemas",
        "dependencies",
        "uniqueItems",
        "contains",
        "minContains",
        "maxContains",
        "propertyNames",
        "unevaluatedProperties",
        "unevaluatedItems",
    }
)

# Keywords whose value is a schema, an array of schemas, or an object of schemas: where the
# walk for unsupported keywords goes on.
_SCHEMA_VALUED = frozenset({"items", "additionalProperties", "additionalItems"})
_SCHEMA_ARRAYS = frozenset({"anyOf", "oneOf", "allOf", "prefixItems"})
_SCHEMA_OBJECTS = frozenset({"properties", "patternProperties", "$defs", "definitions"})


class InvalidRequest(ValueError):
    """Part of a request cannot be used; `param` names where it was in the request (OpenAI's
    error `param`)."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.message = message
        self.param = param


def check_schema(schema: Any, param: str) -> None:
    """Refuse a schema that is too large or deep, is not valid JSON Schema (2020-12), or uses
    a keyword constrained decoding cannot enforce."""
    if not isinstance(schema, dict):
        raise InvalidRequest(f"{param} must be a JSON Schema object", param)
    size = len(json.dumps(schema, ensure_ascii=False).encode())
    if size > MAX_SCHEMA_BYTES:
        raise InvalidRequest(
            f"{param} is {size} bytes of JSON; schemas of at most {MAX_SCHEMA_BYTES} bytes are "
            "accepted",
            param,
        )
    if _depth(schema) > MAX_SCHEMA_DEPTH:
        raise InvalidRequest(
            f"{param} nests deeper than {MAX_SCHEMA_DEPTH} levels; flatten it or use $defs",
            param,
        )
    draft = schema.get("$schema")
    if draft is not None and draft not in KNOWN_DRAFTS:
        raise InvalidRequest(
            f"{param}.$schema {draft!r} is not a JSON Schema draft this server knows; leave it "
            "out (2020-12 is assumed) or name draft-07 or 2020-12",
            param,
        )
    # jsonschema-rs: the meta-schema check in well under a millisecond for the largest schema
    # accepted (the pure-Python jsonschema takes half a second there).
    try:
        jsonschema_rs.meta.validate(schema)
    except jsonschema_rs.ValidationError as error:
        where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error.instance_path)
        raise InvalidRequest(
            f"{param} is not a valid JSON Schema: {error.message} (at {param}{where})", param
        ) from None
    _refuse_unsupported(schema, param, "#")


def _refuse_unsupported(schema: Any, param: str, pointer: str) -> None:
    if not isinstance(schema, dict):
        return  # true/false schemas
    for keyword, value in schema.items():
        if keyword in UNSUPPORTED_KEYWORDS:
            raise InvalidRequest(
                f"{param}: the JSON Schema keyword `{keyword}` (at {pointer}) is not supported "
                f"by constrained decoding; unsupported keywords are "
                f"{', '.join(sorted(UNSUPPORTED_KEYWORDS))}",
                param,
            )
        if keyword in _SCHEMA_VALUED:
            _refuse_unsupported(value, param, f"{pointer}/{keyword}")
        elif keyword in _SCHEMA_ARRAYS and isinstance(value, list):
            for index, item in enumerate(value):
                _refuse_unsupported(item, param, f"{pointer}/{keyword}/{index}")
        elif keyword in _SCHEMA_OBJECTS and isinstance(value, dict):
            for name, item in value.items():
                _refuse_unsupported(item, param, f"{pointer}/{keyword}/{name}")


def _depth(value: Any) -> int:
    # Iterative: a client's document must not meet Python's recursion limit first.
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        deepest = max(deepest, depth)
        if deepest > MAX_SCHEMA_DEPTH:
            return deepest
        if isinstance(item, dict):
            stack.extend((child, depth + 1) for child in item.values())
        elif isinstance(item, list):
            stack.extend((child, depth + 1) for child in item)
    return deepest
