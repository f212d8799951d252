"""The OpenAPI document is the contract: what drf-spectacular cannot infer from the views is
added here, in one place, so that generated clients (and tests/test_api_contract.py) can rely on
every status code, body and auth scheme the API really uses.

- Authentication schemes: `Authorization: Bearer sk-…` management keys, or the console session.
- Request bodies that refuse unknown fields say `additionalProperties: false`.
- Every operation lists the errors it can answer, all as RFC 9457 problem JSON (the `Problem`
  component; see controlplane/rest/exceptions.py, which makes them).
"""

import django_filters
from drf_spectacular.contrib.django_filters import DjangoFilterExtension
from drf_spectacular.extensions import (
    OpenApiAuthenticationExtension,
    OpenApiSerializerExtension,
    OpenApiSerializerFieldExtension,
)

PROBLEM_CONTENT_TYPE = "application/problem+json"

PROBLEM_SCHEMA = {
    "type": "object",
    "description": "An error, as RFC 9457 problem details. `detail` says what to fix; quote "
    "`request_id` to support.",
    "properties": {
        "type": {"type": "string", "example": "urn:sirocco:problem:invalid"},
        "title": {"type": "string", "example": "Invalid request"},
        "status": {"type": "integer", "example": 400},
        "detail": {"type": "string"},
        "code": {"type": "string", "example": "invalid"},
        "request_id": {"type": "string", "nullable": True},
        "errors": {
            "type": "array",
            "description": "Field errors; `field` is a dotted path, null for the whole input.",
            "items": {
                "type": "object",
                "properties": {
                    "field": {"type": "string", "nullable": True},
                    "message": {"type": "string"},
                },
                "required": ["field", "message"],
            },
        },
    },
    "required": ["type", "title", "status", "detail", "code", "request_id"],
}

_DESCRIPTIONS = {
    "400": "The input is invalid: `errors` names each field at fault and why.",
    "401": "No credentials, or an invalid, revoked or expired API key.",
    "403": "The key or member's role may not do this.",
    "404": "No such object in your organization (or no such page of the list).",
    "405": "The operation does not take this method.",
    "406": "The Accept header names no format this operation can answer in.",
    "409": "The request conflicts with the current state (a name taken, a quota reached, …).",
    "415": "The body is in a format this operation does not read: send JSON.",
    "503": "The database is unreachable, read-only or busy (`code`: database_unavailable, "
    "database_read_only, database_busy); retry after the `Retry-After` header's seconds.",
}
_WRITES = {"post", "put", "patch", "delete"}


class APIKeyScheme(OpenApiAuthenticationExtension):
    target_class = "accounts.authentication.APIKeyAuthentication"
    name = "apiKey"

    def get_security_definition(self, auto_schema):
        return {
            "type": "http",
            "scheme": "bearer",
            "description": "A management API key (`sk-…`), from the console or POST /api-keys.",
        }


class ConsoleSessionScheme(OpenApiAuthenticationExtension):
    target_class = "accounts.authentication.OrganizationSessionAuthentication"
    name = "consoleSession"

    def get_security_definition(self, auto_schema):
        return {"type": "apiKey", "in": "cookie", "name": "sessionid"}


class StrictSerializerSchema(OpenApiSerializerExtension):
    """Request bodies of StrictSerializer reject fields they do not know: say so."""

    target_class = "controlplane.rest.serializers.StrictSerializer"
    match_subclasses = True

    def map_serializer(self, auto_schema, direction):
        schema = auto_schema._map_serializer(self.target, direction, bypass_extensions=True)
        if direction == "request":
            schema["additionalProperties"] = False
        if "__doc__" not in vars(type(self.target)) or not type(self.target).__doc__:
            schema.pop("description", None)  # not StrictSerializer's own docstring
        return schema


class MoneyFieldSchema(OpenApiSerializerFieldExtension):
    """A decimal string as MoneyField reads it: digits, a dot and decimals; no sign when the
    field has a minimum of 0 or more."""

    target_class = "controlplane.rest.serializers.MoneyField"

    def map_serializer_field(self, auto_schema, direction):
        schema = auto_schema._map_serializer_field(self.target, direction, bypass_extensions=True)
        field = self.target
        sign = "" if field.min_value is not None and field.min_value >= 0 else "-?"
        whole = field.max_digits - field.decimal_places
        schema["pattern"] = rf"^{sign}\d{{1,{whole}}}(\.\d{{1,{field.decimal_places}}})?$"
        return schema


class StrictFilterParameters(DjangoFilterExtension):
    """The query parameters of StrictFilterBackend (django-filter) as they behave: an empty value
    is the same as leaving the parameter out, and bounds on numbers are stated."""

    target_class = "controlplane.rest.filters.StrictFilterBackend"
    priority = 1

    def get_schema_operation_parameters(self, auto_schema, *args, **kwargs):
        parameters = super().get_schema_operation_parameters(auto_schema, *args, **kwargs)
        filters = getattr(getattr(auto_schema.view, "filterset_class", None), "base_filters", {})
        for parameter in parameters:
            name = parameter["name"]
            declared = filters.get(name) or filters.get(name.rsplit("_", 1)[0])
            if not isinstance(declared, django_filters.MultipleChoiceFilter):
                parameter["allowEmptyValue"] = True
            extra = getattr(declared, "extra", {})
            for bound, keyword in (("min_value", "minimum"), ("max_value", "maximum")):
                if extra.get(bound) is not None and parameter["schema"].get("type") in (
                    "integer",
                    "number",
                ):
                    parameter["schema"][keyword] = extra[bound]
        return parameters


def _errors_for(method: str, operation: dict) -> list[str]:
    parameters = operation.get("parameters", [])
    has_body = "requestBody" in operation
    paginated = any(p.get("name") == "page" and p.get("in") == "query" for p in parameters)
    codes = []
    if parameters or has_body:
        codes.append("400")
    if operation.get("security"):
        codes += ["401", "403"]
    if paginated or any(p.get("in") == "path" for p in parameters):
        codes.append("404")
    if any(p.get("name") == "format" and p.get("in") == "query" for p in parameters):
        codes.append("406")
    if method in _WRITES:
        codes.append("409")
    if has_body:
        codes.append("415")
    codes.append("503")
    return codes


def add_problem_responses(result, generator, request, public):
    """drf-spectacular postprocessing hook: the Problem component, and on every operation the
    error statuses it can answer (those its parameters, body, auth and method make possible)."""
    result.setdefault("components", {}).setdefault("schemas", {})["Problem"] = PROBLEM_SCHEMA
    problem = {PROBLEM_CONTENT_TYPE: {"schema": {"$ref": "#/components/schemas/Problem"}}}
    for operations in result.get("paths", {}).values():
        for method, operation in operations.items():
            if not isinstance(operation, dict) or "responses" not in operation:
                continue
            for code in _errors_for(method, operation):
                operation["responses"].setdefault(
                    code, {"description": _DESCRIPTIONS[code], "content": problem}
                )
            # An error a view declares itself (`OpenApiResponse(description=...)`, no body)
            # is answered as problem JSON like the others.
            for code, response in operation["responses"].items():
                if code in _DESCRIPTIONS and "content" not in response:
                    response["content"] = problem
    return result
