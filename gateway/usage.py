"""Usage events made durable before the response ends: group commit to the database, with a
local spool for when the database does not answer.

Each request hands its event to the writer and waits until it is durable before its response
ends. The writer takes everything that queued up while the previous commit ran and writes it
as one `INSERT … ON CONFLICT (request_id) DO NOTHING` in one transaction: under load many
requests share one commit (durability does not cost a round trip per request); when idle, an
event is written as soon as the loop is free. Writing is idempotent (unique request_id), so a
batch retried after an error that happened after COMMIT does not double-count.

When the database does not commit a batch within `GATEWAY_USAGE_SPOOL_AFTER_SECONDS` (down,
cut off, locked), the batch goes to the local spool instead (gateway/spool.py: an append and
one fdatasync, group-committed the same way), and further batches go straight there until the
database answers again. A shipper task drains the spool to the database with the same
idempotent insert, on its own connection, and probes the database while nothing is spooled.
An event that reached both (a commit whose answer was lost) is counted once. When neither can
take a batch (disk full, spool directory unwritable), its requests get `UsageNotDurable` and
must not be acknowledged. The database comes first, the spool only when it does not answer:
the database is where billing reads events and is kept as the platform's records are
(replicated, backed up), a spool only as well as the gateway's volume; and on the embedded
default a SQLite commit costs a fifth of an append with fdatasync (docs/benchmarks.md,
bench/usage_durability.py).

The writer runs on the event loop, not on a thread: handing each event to a thread and the
result back costs two wake-ups per request, which on a busy machine cost more than the
insert (docs/benchmarks.md). PostgreSQL is written through psycopg's asyncio connection;
SQLite (the embedded default: WAL, so a commit is a write() without fsync) through the
standard sqlite3 module, never waiting on its lock: a busy database is retried a few
milliseconds later instead of blocking the loop. Only the spool's file work runs on threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import sqlite3
import time
from functools import partial

import psycopg
from django.db import DEFAULT_DB_ALIAS, connections
from django.db import connection as django_connection

from gateway import metrics
from gateway.spool import SpoolError, UsageSpool
from metering.models import UsageEvent

logger = logging.getLogger(__name__)

# Rows per INSERT, 22 parameters each: under PostgreSQL's 65535 and SQLite's 32766.
MAX_BATCH = 500
MAX_RETRY_DELAY = 2.0
# The shipper's bound on one database write; also what shutdown gives it to drain the spool.
SHIP_TIMEOUT = 5.0
# After neither the database nor the spool took a batch, new requests are refused this long
# before one is let through to try again.
REFUSE_SECONDS = 1.0
# How often the shipper looks for orphaned spool files (and probes a database that is down).
ADOPT_INTERVAL = 5.0

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
    (datetimes, UUIDs, JSON); ints, floats and strings are bound as they are. Conversions need the
    connection's operations, never a query; looking the connection up per field would cost
    more than the insert.
    """
    converters = []
    for field, default in _COLUMNS:
        if field.get_internal_type() in ("DateTimeField", "UUIDField", "JSONField"):
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


class UsageNotDurable(Exception):
    """Neither the database nor the spool took the event: its request must not be
    acknowledged."""


class UsageWriter:
    def __init__(
        self,
        *,
        spool_dir: str | os.PathLike,
        spool_after: float = 0.5,
        synchronous_commit: bool = True,
    ):
        self._row = row_converter(connections[DEFAULT_DB_ALIAS])
        self._database = _database(synchronous_commit)
        self._shipper_database = _database(synchronous_commit)
        self._spool = UsageSpool(spool_dir)
        self._spool_after = spool_after
        self._synchronous_commit = synchronous_commit
        # False from a batch the database did not take in time until the shipper reaches it.
        self._database_answers = True
        self._refuse_until = -math.inf
        self._pending: list[tuple[dict, asyncio.Future]] = []
        self._flusher: asyncio.Task | None = None
        self._spooled = asyncio.Event()
        self._shipper = asyncio.get_running_loop().create_task(self._ship_forever())

    def accepting(self) -> bool:
        """False for a moment after neither the database nor the spool took a batch: requests
        are refused before reaching a replica instead of being served and then failed."""
        return time.monotonic() >= self._refuse_until

    def submit(self, event: dict) -> asyncio.Future:
        """Queue one event (UsageEvent field values by attname). The future resolves once the
        event is durable (committed, or in the spool), or fails with UsageNotDurable."""
        future = asyncio.get_running_loop().create_future()
        # A request cancelled while waiting never reads the outcome: don't log it as lost.
        future.add_done_callback(_retrieve)
        self._pending.append((event, future))
        if self._flusher is None:
            # Runs after the callbacks already due: what arrives meanwhile joins this batch.
            self._flusher = asyncio.get_running_loop().create_task(self._flush())
        return future

    async def close(self, drain_seconds: float = SHIP_TIMEOUT) -> None:
        """Make what is queued durable, ship what the database takes within `drain_seconds`,
        and leave the rest in the spool for the next process."""
        if self._flusher is not None:
            # Bounded by the database's bound plus one spool append.
            await asyncio.shield(self._flusher)
        self._shipper.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._shipper
        try:
            async with asyncio.timeout(drain_seconds):
                await self._spool.adopt_orphans()
                await self._ship()
        except (TimeoutError, *DATABASE_ERRORS) as error:
            logger.warning(
                "%d bytes of usage events stay in the spool for the next gateway process (%s)",
                self._spool.unshipped_bytes,
                type(error).__name__,
            )
        await self._spool.close()
        await self._database.close()
        await self._shipper_database.close()

    async def _flush(self) -> None:
        try:
            while self._pending:
                batch, self._pending = self._pending[:MAX_BATCH], self._pending[MAX_BATCH:]
                failure = await self._make_durable([event for event, _ in batch])
                for _, future in batch:
                    if future.done():
                        continue
                    if failure is None:
                        future.set_result(True)
                    else:
                        future.set_exception(failure)
        finally:
            self._flusher = None

    async def _make_durable(self, events: list[dict]) -> UsageNotDurable | None:
        if self._database_answers:
            rows = [self._row(event) for event in events]
            try:
                await _bounded(
                    self._database,
                    _write(self._database, rows, self._spool_after),
                    self._spool_after,
                )
                return None
            except (TimeoutError, *DATABASE_ERRORS) as error:
                logger.warning(
                    "the database did not take %d usage events within %.2fs (%s); spooling "
                    "until it answers again",
                    len(events),
                    self._spool_after,
                    error if not isinstance(error, TimeoutError) else "timeout",
                )
                self._database_answers = False
                if isinstance(error, TimeoutError):
                    self._database = _database(self._synchronous_commit)  # the old one: _bounded
                else:
                    await self._database.reset()
        try:
            await self._spool.append(events)
        except SpoolError as error:
            logger.error(
                "usage events could be made durable neither in the database nor in the spool "
                "(%s); their requests fail: %s",
                error,
                [event["request_id"] for event in events],
            )
            self._refuse_until = time.monotonic() + REFUSE_SECONDS
            return UsageNotDurable(str(error))
        self._refuse_until = -math.inf
        metrics.USAGE_SPOOL_BYTES.set(self._spool.unshipped_bytes)
        self._spooled.set()
        return None

    async def _ship_forever(self) -> None:
        """Drain the spool (ours and orphans') to the database; probe it while it is down."""
        delay = 0.0
        adopted_at = -math.inf  # the first round adopts at once: a restart drains its orphans
        while True:
            if delay:
                await asyncio.sleep(delay)
            elif adopted_at > -math.inf:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(ADOPT_INTERVAL):
                        await self._spooled.wait()
            self._spooled.clear()
            try:
                if time.monotonic() - adopted_at >= ADOPT_INTERVAL:
                    adopted_at = time.monotonic()
                    await self._spool.adopt_orphans()
                await self._ship()
                delay = 0.0
            except (TimeoutError, *DATABASE_ERRORS) as error:
                if delay == 0:
                    logger.warning("shipping spooled usage events failed (%s); retrying", error)
                await self._shipper_database.reset()
                delay = min(max(delay * 2, 0.05), MAX_RETRY_DELAY)

    async def _ship(self) -> None:
        shipped = False
        for spool_file in self._spool.files():
            while True:
                events, end = await self._spool.read(spool_file, MAX_BATCH)
                if events:
                    rows = [self._row(event) for event in events]
                    await self._ship_bounded(_write(self._shipper_database, rows, SHIP_TIMEOUT))
                    shipped = True
                await self._spool.shipped(spool_file, end)
                metrics.USAGE_SPOOL_BYTES.set(self._spool.unshipped_bytes)
                if not events or spool_file.unshipped <= 0:
                    break
        if not self._database_answers:
            if not shipped:
                await self._ship_bounded(self._shipper_database.ping())
            logger.warning("the database answers again: usage events go to it directly")
            self._database_answers = True
            self._refuse_until = -math.inf

    async def _ship_bounded(self, operation) -> None:
        try:
            await _bounded(self._shipper_database, operation, SHIP_TIMEOUT)
        except TimeoutError:
            self._shipper_database = _database(self._synchronous_commit)
            raise


DATABASE_ERRORS = (psycopg.Error, sqlite3.Error, OSError)
# Writes given up at their bound, kept referenced until they end and their connection closes.
_ABANDONED: set[asyncio.Task] = set()


async def _bounded(database, operation, bound: float) -> None:
    """Await `operation` (on `database`) for at most `bound` seconds; TimeoutError after that.

    An operation still running at the bound is not cancelled but left to end on its own, and
    the caller must stop using `database` (closed when the operation ends): psycopg cancels a
    query by asking the server, which behind a network partition blocks for 10 s more before
    it gives up (seen with tests/faultproxy.py's blackhole), and the bound is the point."""
    task = asyncio.ensure_future(operation)
    try:
        done, _ = await asyncio.wait({task}, timeout=bound)
    except asyncio.CancelledError:  # the caller's own bound (shutdown's drain)
        _abandon(task, database)
        raise
    if done:
        task.result()
        return
    _abandon(task, database)
    raise TimeoutError


def _abandon(task: asyncio.Task, database) -> None:
    _ABANDONED.add(task)
    task.add_done_callback(partial(_close_abandoned, database))


def _close_abandoned(database, task: asyncio.Task) -> None:
    _ABANDONED.discard(task)
    _retrieve(task)
    closing = asyncio.ensure_future(database.close())
    _ABANDONED.add(closing)
    closing.add_done_callback(_ABANDONED.discard)


async def _write(database, rows: list[list], bound: float) -> None:
    """Write, retrying only a busy SQLite file, for at most `bound` seconds: a write given up
    must not land later (its request may have been refused meanwhile). Other errors are the
    caller's."""
    delay = 0.002
    deadline = time.monotonic() + bound
    while True:
        try:
            await database.write(rows)
            return
        except sqlite3.OperationalError as error:
            if "locked" not in str(error) and "busy" not in str(error):
                raise
        if time.monotonic() > deadline:
            raise TimeoutError
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.1)


def _retrieve(future: asyncio.Future) -> None:
    if not future.cancelled():
        future.exception()


def _database(synchronous_commit: bool):
    settings = django_connection.settings_dict
    if django_connection.vendor == "postgresql":
        return _Postgres(settings, synchronous_commit=synchronous_commit)
    if django_connection.vendor == "sqlite":
        return _Sqlite(settings["NAME"], settings.get("OPTIONS", {}).get("init_command", ""))
    raise RuntimeError(f"usage events cannot be written to {django_connection.vendor}")


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

    async def _connect(self) -> psycopg.AsyncConnection:
        if self._connection is None or self._connection.closed:
            self._connection = await psycopg.AsyncConnection.connect(
                **self._params, autocommit=True
            )
            if not self._synchronous_commit:
                await self._connection.execute("SET synchronous_commit TO off")
        return self._connection

    async def ping(self) -> None:
        await (await self._connect()).execute("SELECT 1")

    async def write(self, rows: list[list]) -> None:
        await self._connect()
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

    def _connect(self) -> sqlite3.Connection:
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
        return self._connection

    async def ping(self) -> None:
        # Takes the write lock and gives it back: a locked database is not answering.
        connection = self._connect()
        connection.execute("BEGIN IMMEDIATE")
        connection.execute("ROLLBACK")

    async def write(self, rows: list[list]) -> None:
        self._connect()
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
