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


class Unavailable(Exception):
    """A dependency cannot serve the request now; nothing is wrong with the request, and sending
    it again after `retry_after` seconds may well work (HTTP 503 with Retry-After). The message
    names the dependency and what to do, never the driver's exception text."""

    status_code = 503
    title = "Service unavailable"

    def __init__(self, message: str, *, code: str, retry_after: int):
        super().__init__(message)
        self.message = message
        self.code = code
        self.retry_after = retry_after


# SQLSTATEs (PostgreSQL) that say "busy, try again" rather than "down": lock_not_available,
# query_canceled (statement or lock timeout), serialization_failure, deadlock_detected.
_BUSY_SQLSTATES = {"55P03", "57014", "40001", "40P01"}
_READ_ONLY_SQLSTATES = {"25006"}  # read_only_sql_transaction: a hot standby, or read-only mode


def database_fault(error: BaseException) -> Unavailable | None:
    """The database error as an `Unavailable` when it is a fault of the database (down,
    unreachable, read-only, locked) rather than of our code, else None (a bug: a 500).

    Django wraps the driver's exception; the driver's own code says which it is: psycopg's
    `sqlstate`, sqlite3's `sqlite_errorname`.
    """
    from django.db import DatabaseError, InterfaceError, OperationalError

    if not isinstance(error, DatabaseError):
        return None
    cause = error.__cause__
    sqlite_name = getattr(cause, "sqlite_errorname", "") or ""
    sqlstate = getattr(cause, "sqlstate", None) or getattr(cause, "pgcode", None) or ""
    if sqlite_name.startswith("SQLITE_READONLY") or sqlstate in _READ_ONLY_SQLSTATES:
        return Unavailable(
            "The database is read-only at the moment (maintenance or a failover): reading "
            "works, changes cannot be saved. Try again in a minute.",
            code="database_read_only",
            retry_after=30,
        )
    if sqlite_name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")) or sqlstate in _BUSY_SQLSTATES:
        return Unavailable(
            "The database is busy with other changes and this request could not wait any "
            "longer. Try again in a few seconds.",
            code="database_busy",
            retry_after=2,
        )
    if sqlite_name == "SQLITE_ERROR":  # "no such table" and the like: our SQL, not the database
        return None
    if isinstance(error, OperationalError | InterfaceError):
        return Unavailable(
            "The database cannot be reached at the moment. Try again in a few seconds.",
            code="database_unavailable",
            retry_after=5,
        )
    return None
