"""Usage events made durable with group commit, on the event loop.

Each request hands its event to the writer and waits for the commit before its response ends.
The writer takes everything that queued up while the previous commit ran and writes it as one
`INSERT … ON CONFLICT (request_id) DO NOTHING` in one transaction: under load many requests
share one commit (durability does not cost a round trip per request); when idle, an event is
written as soon as the loop is free. Writing is idempotent (unique request_id), so a batch
retried after an error that happened after COMMIT does not double-count.

The writer runs on the event loop, not on a thread: handing each event to a thread and the
result back costs two wake-ups per request, which on a busy machine cost more than the
insert (docs/benchmarks.md). PostgreSQL is written through psycopg's asyncio connection;
SQLite (the embedded default: WAL, so a commit is a write() without fsync) through the
standard sqlite3 module, never waiting on its lock: a busy database is retried a few
milliseconds later instead of blocking the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
from functools import partial

import psycopg
from django.db import DEFAULT_DB_ALIAS, connections
from django.db import connection as django_connection

from metering.models import UsageEvent

logger = logging.getLogger(__name__)

# Rows per INSERT, 18 parameters each: under PostgreSQL's 65535 and SQLite's 32766.
MAX_BATCH = 500
MAX_RETRY_DELAY = 2.0

_COLUMNS = [
    (field, field.get_default())
    for field in UsageEvent._meta.concrete_fields
    if not field.primary_key
]


def insert_statement(placeholder: str, rows: int = 1) -> str:
    quote = django_connection.ops.quote_name
    columns = ", ".join(quote(field.column) for field, _ in _COLUMNS)
    row = "(" + ", ".join([placeholder] * len(_COLUMNS)) + ")"
    values = ", ".join([row] * rows)
    # Only the model's own table and column names go into the statement; values are bound.
    table = quote(UsageEvent._meta.db_table)
    return f"INSERT INTO {table} ({columns}) VALUES {values} ON CONFLICT (request_id) DO NOTHING"  # noqa: S608


def row_converter(connection):
    """A function from an event to its column values as the database stores them.

    Django's own conversions (`get_db_prep_save`), applied only to the fields that need one
    (datetimes, UUIDs); ints, floats and strings are bound as they are. Conversions need the
    connection's operations, never a query; looking the connection up per field would cost
    more than the insert.
    """
    converters = []
    for field, default in _COLUMNS:
        if field.get_internal_type() in ("DateTimeField", "UUIDField"):
            converters.append(
                (field.attname, default, partial(field.get_db_prep_save, connection=connection))
            )
        else:
            converters.append((field.attname, default, None))

    def convert(event: dict) -> list:
        values = []
        for name, default, prepare in converters:
            value = event.get(name, default)
            values.append(prepare(value) if prepare is not None and value is not None else value)
        return values

    return convert


class UsageWriter:
    def __init__(self, *, synchronous_commit: bool = True):
        settings = django_connection.settings_dict
        self._row = row_converter(connections[DEFAULT_DB_ALIAS])
        if django_connection.vendor == "postgresql":
            self._database = _Postgres(settings, synchronous_commit=synchronous_commit)
        elif django_connection.vendor == "sqlite":
            self._database = _Sqlite(
                settings["NAME"], settings.get("OPTIONS", {}).get("init_command", "")
            )
        else:
            raise RuntimeError(f"usage events cannot be written to {django_connection.vendor}")
        self._pending: list[tuple[dict, asyncio.Future]] = []
        self._flusher: asyncio.Task | None = None
        self._writing: list[tuple[dict, asyncio.Future]] = []

    def submit(self, event: dict) -> asyncio.Future:
        """Queue one event (UsageEvent field values by attname); the future resolves once it
        is committed."""
        future = asyncio.get_running_loop().create_future()
        self._pending.append((event, future))
        if self._flusher is None:
            # Runs after the callbacks already due: what arrives meanwhile joins this batch.
            self._flusher = asyncio.get_running_loop().create_task(self._flush())
        return future

    async def close(self, timeout: float = 10) -> None:
        """Write what is queued (for at most `timeout` seconds), then close the connection."""
        if self._flusher is not None:
            try:
                async with asyncio.timeout(timeout):
                    await asyncio.shield(self._flusher)
            except TimeoutError:
                lost = [event["request_id"] for event, _ in self._writing + self._pending]
                logger.error("%d usage events not written before shutdown: %s", len(lost), lost)
                self._flusher.cancel()
        await self._database.close()

    async def _flush(self) -> None:
        try:
            while self._pending:
                batch, self._pending = self._pending[:MAX_BATCH], self._pending[MAX_BATCH:]
                self._writing = batch
                await self._write([self._row(event) for event, _ in batch])
                for _, future in batch:
                    if not future.done():
                        future.set_result(True)
        finally:
            self._flusher = None
            self._writing = []

    async def _write(self, rows: list[list]) -> None:
        delay = 0.005
        while True:
            try:
                await self._database.write(rows)
                return
            except (psycopg.Error, sqlite3.Error, OSError) as error:
                busy = isinstance(error, sqlite3.OperationalError) and "locked" in str(error)
                if not busy:
                    # Keep the events and retry: a request that reached a replica is billed.
                    logger.exception("writing %d usage events failed; retrying", len(rows))
                    await self._database.reset()
                await asyncio.sleep(delay)
                delay = min(delay * 2, MAX_RETRY_DELAY)


# Options Django's PostgreSQL backend consumes itself; the rest are libpq's.
_DJANGO_ONLY_OPTIONS = {"pool", "server_side_binding", "isolation_level", "assume_role", "context"}


class _Postgres:
    def __init__(self, settings: dict, *, synchronous_commit: bool):
        self._params = {
            "dbname": settings["NAME"],
            "user": settings["USER"] or None,
            "password": settings["PASSWORD"] or None,
            "host": settings["HOST"] or None,
            "port": settings["PORT"] or None,
            **{
                name: value
                for name, value in settings.get("OPTIONS", {}).items()
                if name not in _DJANGO_ONLY_OPTIONS
            },
        }
        self._synchronous_commit = synchronous_commit
        self._connection: psycopg.AsyncConnection | None = None
        self._statements: dict[int, str] = {}

    async def write(self, rows: list[list]) -> None:
        if self._connection is None or self._connection.closed:
            self._connection = await psycopg.AsyncConnection.connect(
                **self._params, autocommit=True
            )
            if not self._synchronous_commit:
                await self._connection.execute("SET synchronous_commit TO off")
        # One multi-row INSERT in autocommit: atomic as one statement, and one round trip to
        # the server (BEGIN, executemany, COMMIT would be three).
        statement = self._statements.get(len(rows))
        if statement is None:
            statement = self._statements[len(rows)] = insert_statement("%s", len(rows))
        await self._connection.execute(statement, [value for row in rows for value in row])

    async def reset(self) -> None:
        await self.close()

    async def close(self) -> None:
        if self._connection is not None:
            connection, self._connection = self._connection, None
            with contextlib.suppress(psycopg.Error):
                await connection.close()


class _Sqlite:
    def __init__(self, path: str, init_command: str):
        self._path = path
        self._init_command = init_command  # the settings' pragmas (WAL, synchronous)
        self._connection: sqlite3.Connection | None = None
        self._statements: dict[int, str] = {}

    async def write(self, rows: list[list]) -> None:
        if self._connection is None:
            self._connection = sqlite3.connect(
                self._path,
                uri=self._path.startswith("file:"),
                isolation_level=None,
                timeout=0,  # never block the event loop on another writer's lock
                check_same_thread=False,
            )
            if self._init_command:
                self._connection.executescript(self._init_command)
        # One multi-row INSERT in autocommit: one statement, its own transaction.
        statement = self._statements.get(len(rows))
        if statement is None:
            statement = self._statements[len(rows)] = insert_statement("?", len(rows))
        self._connection.execute(statement, [value for row in rows for value in row])

    async def reset(self) -> None:
        await self.close()

    async def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None
