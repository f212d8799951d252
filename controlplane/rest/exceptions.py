"""The one place where errors become HTTP responses in the REST API: RFC 9457 problem JSON.

Every error says what went wrong in `detail`, lists field errors in `errors`, and carries the
request id, so a customer can quote it to support.
"""

import logging
import sys

from django.core.exceptions import PermissionDenied as DjangoPermissionDenied
from django.core.exceptions import ValidationError as DjangoValidationError
from django.http import Http404, HttpResponse, JsonResponse
from django.utils.html import format_html
from django.views import defaults
from rest_framework import exceptions, status
from rest_framework.response import Response

from controlplane.errors import DomainError, Unavailable, database_fault
from controlplane.logging import request_id_var

logger = logging.getLogger(__name__)

PROBLEM_CONTENT_TYPE = "application/problem+json"

_TITLES = {
    400: "Invalid request",
    401: "Authentication required",
    403: "Permission denied",
    404: "Not found",
    405: "Method not allowed",
    406: "Not acceptable",
    409: "Conflict",
    413: "Request too large",
    415: "Unsupported media type",
    429: "Too many requests",
    500: "Server error",
    503: "Service unavailable",
}


def _flatten(detail, prefix=""):
    """DRF's nested error dict/list → [{field, message}] with dotted field paths."""
    if isinstance(detail, dict):
        out = []
        for key, value in detail.items():
            name = key if key != "non_field_errors" else ""
            out += _flatten(value, f"{prefix}.{name}".strip(".") if name else prefix)
        return out
    if isinstance(detail, list):
        out = []
        for index, value in enumerate(detail):
            if isinstance(value, dict | list) and not all(isinstance(v, str) for v in value):
                out += _flatten(value, f"{prefix}.{index}".strip("."))
            else:
                out += _flatten(value, prefix)
        return out
    return [{"field": prefix or None, "message": str(detail)}]


def problem_response(status_code, detail, *, code, errors=None, headers=None):
    body = {
        "type": f"urn:sirocco:problem:{code}",
        "title": _TITLES.get(status_code, "Error"),
        "status": status_code,
        "detail": detail,
        "code": code,
        "request_id": request_id_var.get(),
    }
    if errors:
        body["errors"] = errors
    return Response(body, status=status_code, headers=headers, content_type=PROBLEM_CONTENT_TYPE)


def unavailable_response(fault: Unavailable, error: BaseException | None = None):
    """503 with Retry-After: the database (or another dependency) is at fault, not the request.
    The cause is logged here; the client gets what to do, never the driver's text."""
    logger.warning("answered 503 %s", fault.code, exc_info=error)
    return problem_response(
        fault.status_code,
        fault.message,
        code=fault.code,
        headers={"Retry-After": str(fault.retry_after)},
    )


def problem_exception_handler(exc, context):
    fault = exc if isinstance(exc, Unavailable) else database_fault(exc)
    if fault is not None:
        return unavailable_response(fault, exc)
    if isinstance(exc, DomainError):
        errors = [{"field": exc.field, "message": exc.message}] if exc.field else None
        return problem_response(exc.status_code, exc.message, code=exc.code, errors=errors)
    if isinstance(exc, Http404):
        exc = exceptions.NotFound(
            "No such object in your organization. Check the id, or list the collection."
        )
    elif isinstance(exc, DjangoPermissionDenied):
        exc = exceptions.PermissionDenied()
    elif isinstance(exc, DjangoValidationError):
        exc = exceptions.ValidationError(
            exc.message_dict if hasattr(exc, "error_dict") else {"non_field_errors": exc.messages}
        )

    if not isinstance(exc, exceptions.APIException):
        return None  # a bug: Django logs it and answers 500

    headers = {}
    if getattr(exc, "auth_header", None):
        headers["WWW-Authenticate"] = exc.auth_header
    if getattr(exc, "wait", None):
        headers["Retry-After"] = str(int(exc.wait))

    if isinstance(exc, exceptions.ValidationError):
        errors = _flatten(exc.detail)
        summary = "; ".join(
            f"{e['field']}: {e['message']}" if e["field"] else e["message"] for e in errors
        )
        return problem_response(
            status.HTTP_400_BAD_REQUEST, summary, code="invalid", errors=errors, headers=headers
        )
    codes = exc.get_codes()
    return problem_response(
        exc.status_code,
        str(exc.detail),
        code=codes if isinstance(codes, str) else exc.default_code,
        headers=headers,
    )


def page_not_found(request, exception):
    """Django's handler404: a path nothing matches. Under /api/ a client reads problem JSON,
    not an HTML page."""
    if not request.path.startswith("/api/"):
        return defaults.page_not_found(request, exception)
    body = {
        "type": "urn:sirocco:problem:not_found",
        "title": _TITLES[404],
        "status": 404,
        "detail": f"No API operation at {request.path}. The operations are listed in "
        "/api/schema/ (browsable at /api/docs/).",
        "code": "not_found",
        "request_id": request_id_var.get(),
    }
    return JsonResponse(body, status=404, content_type=PROBLEM_CONTENT_TYPE)


def server_error(request):
    """`handler500`: an error raised outside a DRF view (middleware, the session, a template)
    that Django would answer with its HTML 500. Under /api/ the answer is problem JSON, as for
    every other REST error; a database fault is a 503 with Retry-After on every page."""
    error = sys.exc_info()[1]
    fault = database_fault(error) if error is not None else None
    if request.path.startswith("/api/"):
        status_code = fault.status_code if fault else 500
        code = fault.code if fault else "server_error"
        response = JsonResponse(
            {
                "type": f"urn:sirocco:problem:{code}",
                "title": _TITLES[status_code],
                "status": status_code,
                "detail": fault.message
                if fault
                else "Something went wrong on our side. Quote the request id to support.",
                "code": code,
                "request_id": request_id_var.get(),
            },
            status=status_code,
            content_type=PROBLEM_CONTENT_TYPE,
        )
    elif fault is not None:
        response = HttpResponse(
            format_html(
                "<!doctype html><title>Temporarily unavailable</title>"
                "<h1>Temporarily unavailable</h1><p>{}</p>",
                fault.message,
            ),
            status=fault.status_code,
        )
    else:
        return defaults.server_error(request)
    if fault is not None:
        response["Retry-After"] = str(fault.retry_after)
    return response
