"""The usage spool: what a crash leaves is read back whole or not at all, an orphan is adopted
only once its process is gone, a failed append leaves no partial record, and the writer spools
what the database does not take, ships it once the database is back, and never counts an event
twice; when neither can take an event, its request is refused."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest
from django.db import connection

from gateway.spool import HEADER, SpoolError, UsageSpool, encode, read_records
from gateway.usage import UsageNotDurable, UsageWriter
from metering.models import UsageEvent

REPO_ROOT = Path(__file__).resolve().parents[2]


def event(request_id: str, organization_id: int = 1, **fields) -> dict:
    now = datetime.now(UTC)
    values = {
        "request_id": request_id,
        "organization_id": organization_id,
        "api_key_id": None,
        "deployment_id": uuid.uuid4(),
        "model_version_id": 3,
        "deployment_type": "serverless",
        "model": "tiny",
        "prompt_tokens": 7,
        "completion_tokens": 5,
        "cached_tokens": 0,
        "status_code": 200,
        "latency_ms": 12.5,
        "ttft_ms": None,
        "usage_source": "upstream",
        "started_at": now,
        "finished_at": now,
    }
    values.update(fields)
    return values


def spool_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("usage-*.spool"))


# ---- the file format --------------------------------------------------------------------------


@pytest.mark.nodb
def test_a_torn_last_record_is_skipped_and_everything_before_it_reads_back(tmp_path):
    whole = b"".join(encode(event(f"req_{i}")) for i in range(3))
    last = encode(event("req_torn"))
    path = tmp_path / "records"
    tails = [last[:cut] for cut in range(1, len(last))]  # every place a crash can cut it
    tails.append(b"\0" * len(last))  # extended by the filesystem, never written
    flipped = bytearray(last)
    flipped[-2] ^= 0xFF
    tails.append(bytes(flipped))  # whole length, wrong checksum
    for tail in tails:
        path.write_bytes(whole + tail)
        fd = os.open(path, os.O_RDONLY)
        try:
            events, end, torn = read_records(fd, 0, len(whole) + len(tail), 100)
        finally:
            os.close(fd)
        assert [e["request_id"] for e in events] == ["req_0", "req_1", "req_2"]
        assert (end, torn) == (len(whole), True)
    path.write_bytes(whole + last)
    fd = os.open(path, os.O_RDONLY)
    try:
        events, end, torn = read_records(fd, 0, len(whole) + len(last), 100)
    finally:
        os.close(fd)
    assert (len(events), end, torn) == (4, len(whole) + len(last), False)
    assert events[3]["request_id"] == "req_torn"


@pytest.mark.nodb
def test_an_unwritable_spool_directory_is_a_spool_error(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    spool = UsageSpool(blocker / "spool")

    async def run():
        await spool.append([event("req_1")])

    with pytest.raises(SpoolError):
        asyncio.run(run())


HOLDER = """
import asyncio, sys, time
from datetime import UTC, datetime
from gateway.spool import UsageSpool
spool = UsageSpool(sys.argv[1])
now = datetime.now(UTC).isoformat()
asyncio.run(spool.append([{"request_id": f"req_{i}", "started_at": now} for i in range(3)]))
print("appended", flush=True)
time.sleep(60)
"""


@pytest.mark.slow
@pytest.mark.nodb
def test_a_live_processs_file_is_left_alone_and_adopted_once_it_is_killed(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(tmp_path)],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "appended"
        spool = UsageSpool(tmp_path)

        async def adopt():
            return await spool.adopt_orphans()

        assert asyncio.run(adopt()) == []  # its process holds the lock
        holder.send_signal(signal.SIGKILL)
        holder.wait(10)

        async def adopt_read_and_ship():
            adopted = await spool.adopt_orphans()
            assert len(adopted) == 1
            events, end = await spool.read(adopted[0], 100)
            assert UsageSpool(tmp_path)._adopt_orphans() == []  # now ours, under our lock
            await spool.shipped(adopted[0], end)
            return events

        events = asyncio.run(adopt_read_and_ship())
        assert [e["request_id"] for e in events] == ["req_0", "req_1", "req_2"]
        assert spool_files(tmp_path) == []  # shipped, then deleted
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
        holder.stdout.close()


DISK_FULL = """
import asyncio, resource, signal, sys
from gateway.spool import SpoolError, UsageSpool
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG instead

async def main():
    spool = UsageSpool(sys.argv[1])
    small = [{"request_id": f"req_a{i}"} for i in range(3)]
    await spool.append(small)
    resource.setrlimit(resource.RLIMIT_FSIZE, (spool._own.size + 500, resource.RLIM_INFINITY))
    try:
        await spool.append([{"request_id": f"req_big{i}", "pad": "x" * 90} for i in range(20)])
    except SpoolError:
        print("refused", flush=True)
    await spool.append([{"request_id": "req_after"}])  # fits: the file took no partial record
    print(spool._own.path, spool._own.size, flush=True)

asyncio.run(main())
"""


@pytest.mark.slow
@pytest.mark.nodb
def test_an_append_that_fails_part_way_leaves_only_whole_records(tmp_path):
    """A full disk, played with RLIMIT_FSIZE: the write stops part-way through the batch."""
    done = subprocess.run(
        [sys.executable, "-c", DISK_FULL, str(tmp_path)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    refused, tail = done.stdout.splitlines()
    assert refused == "refused"
    path, size = tail.split()
    assert os.path.getsize(path) == int(size)
    fd = os.open(path, os.O_RDONLY)
    try:
        events, end, torn = read_records(fd, 0, int(size), 100)
    finally:
        os.close(fd)
    assert [e["request_id"] for e in events] == ["req_a0", "req_a1", "req_a2", "req_after"]
    assert (end, torn) == (int(size), False)


# ---- the writer against a real database -------------------------------------------------------


def rename_usage_table(*, back: bool = False) -> None:
    """A database that refuses the gateway's insert (its table is gone), then takes it again."""
    table = UsageEvent._meta.db_table
    old, new = (f"{table}_away", table) if back else (table, f"{table}_away")
    with connection.cursor() as cursor:
        cursor.execute(f"ALTER TABLE {old} RENAME TO {new}")
    if threading.current_thread() is not threading.main_thread():
        connection.close()  # the connection of this thread only; it would outlive the test


def wait_for(predicate, timeout=15.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def stored_ids() -> list[str]:
    return sorted(UsageEvent.objects.values_list("request_id", flat=True))


@pytest.fixture
def usage_table_away(transactional_db):
    rename_usage_table()
    state = {"away": True}

    def restore():
        if state["away"]:
            rename_usage_table(back=True)
            state["away"] = False

    yield restore
    restore()


def test_the_writer_spools_while_the_database_refuses_and_ships_once_it_is_back(
    organization, usage_table_away, tmp_path
):
    ids = [f"req_{i}" for i in range(40)]

    async def run():
        writer = UsageWriter(spool_dir=tmp_path, spool_after=0.5)
        try:
            started = time.monotonic()
            results = await asyncio.gather(*(writer.submit(event(i, organization.id)) for i in ids))
            assert all(results) and time.monotonic() - started < 5
            assert writer._spool.unshipped_bytes > 0
            assert len(spool_files(tmp_path)) == 1
            await asyncio.to_thread(usage_table_away)  # the database is back
            async with asyncio.timeout(20):
                while writer._spool.unshipped_bytes or not writer._database_answers:
                    await asyncio.sleep(0.05)
            # Back to the database directly.
            await writer.submit(event("req_direct", organization.id))
            assert writer._spool.unshipped_bytes == 0
        finally:
            await writer.close()

    asyncio.run(run())
    assert stored_ids() == sorted([*ids, "req_direct"])
    assert spool_files(tmp_path) == []  # an empty file is removed at close


def test_replaying_a_spool_after_a_crash_counts_each_event_once(
    organization, usage_table_away, tmp_path
):
    """A crash after the database committed but before the file was truncated: the whole file
    is adopted and shipped again by the next process."""
    ids = [f"req_{i}" for i in range(25)]
    kept = tmp_path / "kept"

    async def spool_then_ship():
        writer = UsageWriter(spool_dir=tmp_path / "spool", spool_after=0.3)
        try:
            await asyncio.gather(*(writer.submit(event(i, organization.id)) for i in ids))
            (path,) = spool_files(tmp_path / "spool")
            shutil.copyfile(path, kept)  # the file as a crash before truncation leaves it
            await asyncio.to_thread(usage_table_away)
            async with asyncio.timeout(20):
                while writer._spool.unshipped_bytes:
                    await asyncio.sleep(0.05)
        finally:
            await writer.close()

    asyncio.run(spool_then_ship())
    assert stored_ids() == sorted(ids)
    # The crashed process's file, torn last record included, appears as an orphan.
    orphan = tmp_path / "spool" / "usage-99999-feedfacecafe.spool"
    orphan.write_bytes(kept.read_bytes() + encode(event("req_torn", organization.id))[:-3])

    async def restart():
        writer = UsageWriter(spool_dir=tmp_path / "spool", spool_after=0.3)
        try:
            async with asyncio.timeout(20):
                while orphan.exists():
                    await asyncio.sleep(0.05)
        finally:
            await writer.close()

    asyncio.run(restart())
    assert stored_ids() == sorted(ids)  # each once; the torn record was never acknowledged


def test_when_neither_the_database_nor_the_spool_takes_an_event_it_fails(
    organization, usage_table_away, tmp_path
):
    blocker = tmp_path / "a-file"
    blocker.write_text("the spool directory cannot be made here")

    async def run():
        writer = UsageWriter(spool_dir=blocker / "spool", spool_after=0.2)
        try:
            with pytest.raises(UsageNotDurable):
                await writer.submit(event("req_lost", organization.id))
            assert not writer.accepting()  # the next requests are refused up front
        finally:
            await writer.close()

    asyncio.run(run())
    usage_table_away()
    assert stored_ids() == []


def test_shutdown_leaves_what_the_database_did_not_take_for_the_next_process(
    organization, usage_table_away, tmp_path
):
    async def first():
        writer = UsageWriter(spool_dir=tmp_path, spool_after=0.2)
        started = time.monotonic()
        await writer.submit(event("req_left", organization.id))
        await writer.close(drain_seconds=1)
        return time.monotonic() - started

    assert asyncio.run(first()) < 5  # no 10 s limbo
    (path,) = spool_files(tmp_path)
    assert path.stat().st_size > HEADER.size
    usage_table_away()

    async def second():
        writer = UsageWriter(spool_dir=tmp_path, spool_after=0.2)
        try:
            async with asyncio.timeout(20):
                while path.exists():
                    await asyncio.sleep(0.05)
        finally:
            await writer.close()

    asyncio.run(second())
    assert stored_ids() == ["req_left"]


@pytest.mark.skipif(
    connection.vendor != "postgresql", reason="a lock that makes inserts wait: PostgreSQL"
)
def test_a_database_that_does_not_answer_costs_a_request_the_bound_not_more(
    organization, transactional_db, tmp_path
):
    import psycopg

    settings = connection.settings_dict
    locker = psycopg.connect(
        dbname=settings["NAME"],
        user=settings["USER"] or None,
        host=settings["HOST"] or None,
        port=settings["PORT"] or None,
    )
    try:
        locker.execute(f"LOCK TABLE {UsageEvent._meta.db_table} IN ACCESS EXCLUSIVE MODE")

        async def run():
            writer = UsageWriter(spool_dir=tmp_path, spool_after=0.3)
            try:
                started = time.monotonic()
                await writer.submit(event("req_waited", organization.id))
                waited = time.monotonic() - started
                started = time.monotonic()
                await writer.submit(event("req_next", organization.id))
                return waited, time.monotonic() - started
            finally:
                await asyncio.to_thread(locker.rollback)  # the database answers again
                await writer.close()

        waited, next_one = asyncio.run(run())
    finally:
        locker.close()
    assert 0.3 <= waited < 2  # the bound, then the spool
    assert next_one < 0.25  # straight to the spool while the database does not answer
    wait_for(lambda: stored_ids() == ["req_next", "req_waited"])
