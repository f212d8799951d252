"""Time bounds on the PostgreSQL work of the processes that answer requests (web, gateway).

A request must not wait for the database for ever. Three bounds, each for a different fault:

- `lock_timeout` (DATABASE_LOCK_TIMEOUT): a write queued behind another's row or table lock
  gives up (SQLSTATE 55P03) and the request answers 503 `database_busy`.
- `statement_timeout` (DATABASE_STATEMENT_TIMEOUT): a statement the server is still running
  is cancelled by the server (57014), also `database_busy`.
- A client-side bound on every wait for the server, a few seconds past the statement timeout:
  a server that hangs, or a network that drops everything, never enforces a server-side
  timeout, and libpq's `tcp_user_timeout`/keepalives (set for every process in the settings)
  do not fire when something in between still acknowledges the bytes (a stuck proxy or
  pooler). The connection is then closed and the request answers 503 `database_unavailable`.

Only these processes: a Celery worker's billing statements (a period close over millions of
ledger rows) legitimately run longer than a web request may wait.
"""

import psycopg
from django.conf import settings
from django.db.backends.signals import connection_created

# How much longer than the statement timeout the client waits: the server's own cancellation
# (a clear `database_busy`) comes first whenever the server is alive.
CLIENT_MARGIN_SECONDS = 3.0


class BoundedConnection(psycopg.Connection):
    """A psycopg connection whose every wait for the server ends after `wait_bound` seconds.
    psycopg bounds a wait only when asked (`Connection.wait(timeout=)`); its cursors never ask."""

    __slots__ = ()  # the same layout as psycopg.Connection, so a connection can become one
    wait_bound: float | None = None

    def wait(self, gen, interval=psycopg.connection._WAIT_INTERVAL, timeout=None):
        try:
            return super().wait(gen, interval=interval, timeout=timeout or self.wait_bound)
        except psycopg.errors._WaitTimeout:
            # The protocol stream stopped mid-exchange and cannot be resumed: close it now, so
            # that nothing waits on it again (Django reconnects on the next request).
            self.close()
            raise


def _bound(sender, connection, **kwargs):
    if connection.vendor != "postgresql":
        return
    raw = connection.connection
    with raw.cursor() as cursor:
        cursor.execute(
            "SELECT set_config('lock_timeout', %s, false), "
            "set_config('statement_timeout', %s, false)",
            [
                f"{int(settings.DATABASE_LOCK_TIMEOUT * 1000)}ms",
                f"{int(settings.DATABASE_STATEMENT_TIMEOUT * 1000)}ms",
            ],
        )
    if type(raw) is psycopg.Connection:
        raw.__class__ = BoundedConnection


def bound_request_processes() -> None:
    """Called once by the web and gateway processes' ASGI modules, before any connection."""
    BoundedConnection.wait_bound = settings.DATABASE_STATEMENT_TIMEOUT + CLIENT_MARGIN_SECONDS
    connection_created.connect(_bound, dispatch_uid="controlplane.dbbounds")
