"""Domain errors raised by services. One handler per interface maps them to HTTP
(REST: problem JSON, see controlplane/rest/exceptions.py; gateway: OpenAI error JSON)."""


class DomainError(Exception):
    """Something the caller can fix. `message` says how; `field` names the input at fault."""

    status_code = 400
    code = "invalid"
    title = "Invalid request"

    def __init__(self, message: str, *, field: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.field = field
        if code:
            self.code = code


class ValidationFailed(DomainError):
    pass


class PermissionDenied(DomainError):
    status_code = 403
    code = "permission_denied"
    title = "Permission denied"


class NotFound(DomainError):
    status_code = 404
    code = "not_found"
    title = "Not found"


class Conflict(DomainError):
    status_code = 409
    code = "conflict"
    title = "Conflict"


class QuotaExceeded(DomainError):
    status_code = 409
    code = "quota_exceeded"
    title = "Quota exceeded"
