"""A local append-only spool for the usage events the database did not take in time.

The usage writer (gateway/usage.py) commits each event to the database first. When the
database does not commit within a short bound (down, cut off, locked), the batch is appended
here instead and made durable with one fdatasync; the response's last byte waits for that.
A shipper in the writer reads the spool back and inserts the events into the database with
`ON CONFLICT (request_id) DO NOTHING`, so an event that reached both, or a spool replayed
after a crash, is counted once.

Records are framed `magic (2 bytes) | payload length (u32) | CRC-32 of the payload (u32) |
payload` (little-endian; the payload is the event as JSON). A crash in the middle of an
append leaves a torn last record: a short header, a short payload or a wrong checksum. The
reader stops at the first record that does not check out; nothing after it was acknowledged
(a record is acknowledged only after its fdatasync returned, and appends are sequential), so
skipping it loses nothing. A zero-filled tail (a filesystem that extended the file before the
crash but never wrote it) fails on the magic.

Each process appends to its own file, `usage-<pid>-<random>.spool`, holding an exclusive
flock on it for as long as it lives; several uvicorn workers on one host share the directory.
The kernel releases the lock when the process dies, however it dies, so a file whose lock can
be taken is an orphan: any process of any gateway on the host adopts it under that lock,
ships it and deletes it. A new file is created under a `.tmp` name, locked, then renamed, so
an adopter never sees a `.spool` file before its owner holds the lock. An adopter checks that
the path still names the inode it locked, since another adopter may have drained and deleted
the file between its open and its lock.

A file is truncated (the process's own) or deleted (a sealed or adopted one) only after the
database committed everything in it; a crash before that replays the file, which costs
duplicate inserts the unique request id ignores. An append that fails part-way is cut back
to the last good record; a failed fdatasync seals the file (Linux may have dropped the dirty
pages, so nothing more is trusted to it: its acknowledged records are shipped, new events go
to a new file).

Everything here runs on threads (`asyncio.to_thread`), one append at a time: an fdatasync
costs milliseconds (docs/benchmarks.md), far too long for the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import secrets
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import orjson

logger = logging.getLogger(__name__)

MAGIC = b"\xa5\x5a"
HEADER = struct.Struct("<2sII")
# An event is a few hundred bytes; anything claiming more is a torn or foreign record.
MAX_RECORD_BYTES = 1 << 20
SUFFIX = ".spool"
PREFIX = "usage-"
_fdatasync = getattr(os, "fdatasync", os.fsync)


class SpoolError(Exception):
    """The spool could not make the events durable (directory unwritable, disk full, I/O)."""


def encode(event: dict) -> bytes:
    payload = orjson.dumps(event)
    return HEADER.pack(MAGIC, len(payload), zlib.crc32(payload)) + payload


def read_records(fd: int, offset: int, end: int, max_records: int) -> tuple[list[dict], int, bool]:
    """Up to `max_records` events from `offset`, not past `end`: (events, offset after the last
    one read, whether a bad record stopped the reading)."""
    events: list[dict] = []
    while len(events) < max_records and offset < end:
        header = os.pread(fd, HEADER.size, offset)
        if len(header) < HEADER.size:
            return events, offset, True
        magic, length, checksum = HEADER.unpack(header)
        if magic != MAGIC or not 0 < length <= MAX_RECORD_BYTES:
            return events, offset, True
        payload = os.pread(fd, length, offset + HEADER.size)
        if len(payload) < length or zlib.crc32(payload) != checksum:
            return events, offset, True
        try:
            event = orjson.loads(payload)
        except orjson.JSONDecodeError:
            return events, offset, True
        if not isinstance(event, dict) or not isinstance(event.get("request_id"), str):
            return events, offset, True
        events.append(event)
        offset += HEADER.size + length
    return events, offset, False


@dataclass(eq=False)
class SpoolFile:
    path: Path
    fd: int
    # Bytes of whole, durable records (own file), or the file's size when adopted.
    size: int
    # Bytes from the start whose events the database has committed.
    shipped: int = 0
    # No more appends: an adopted file, or ours after a failed fdatasync.
    sealed: bool = False
    adopted: bool = False

    @property
    def unshipped(self) -> int:
        return self.size - self.shipped


class UsageSpool:
    """The spool directory as this process sees it: its own file (made on the first append)
    and the files it sealed or adopted, each held under its lock until shipped."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        self._own: SpoolFile | None = None
        self._held: dict[Path, SpoolFile] = {}
        # One append, truncation, adoption or release at a time; reads need no lock (pread).
        self._lock = asyncio.Lock()

    # ---- appending ----------------------------------------------------------------------------

    async def append(self, events: list[dict]) -> None:
        """Append the events and return once they are on disk; raises SpoolError."""
        try:
            data = b"".join(encode(event) for event in events)
        except (TypeError, orjson.JSONEncodeError) as error:
            raise SpoolError(f"an event cannot be written to the spool: {error}") from error
        # Shielded: a cancelled caller must not release the lock while the thread still writes.
        await asyncio.shield(self._locked(self._append, data))

    async def _locked(self, function, *args):
        # Threads change the files held only under the lock, one at a time.
        async with self._lock:
            return await asyncio.to_thread(function, *args)

    def _append(self, data: bytes) -> None:
        own = self._own
        if own is None or own.sealed:
            try:
                own = self._own = self._create()
            except OSError as error:
                raise SpoolError(
                    f"cannot create a spool file in {self.directory}: {error}"
                ) from error
        try:
            _write_all(own.fd, data)
        except OSError as error:
            try:
                # Cut the partial record off, so the next append follows a whole one.
                os.ftruncate(own.fd, own.size)
            except OSError:
                own.sealed = True
            raise SpoolError(f"writing to {own.path} failed: {error}") from error
        try:
            _fdatasync(own.fd)
        except OSError as error:
            # After a failed fsync the kernel may have dropped the dirty pages and will not
            # report it again: trust nothing more to this file. What it acknowledged earlier
            # (own.size) is shipped as usual.
            own.sealed = True
            with contextlib.suppress(OSError):
                os.ftruncate(own.fd, own.size)
            raise SpoolError(f"fdatasync of {own.path} failed: {error}") from error
        own.size += len(data)

    def _create(self) -> SpoolFile:
        self.directory.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            name = f"{PREFIX}{os.getpid()}-{secrets.token_hex(6)}"
            temporary = self.directory / f"{name}.tmp"
            path = self.directory / f"{name}{SUFFIX}"
            fd = os.open(
                temporary, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC, 0o600
            )
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                os.rename(temporary, path)
            except OSError:
                # Another process's adopter removed our .tmp before we locked it: try again.
                os.close(fd)
                continue
            _fsync_directory(self.directory)  # the new name survives a power loss
            spool_file = SpoolFile(path=path, fd=fd, size=0)
            self._held[path] = spool_file
            return spool_file
        raise OSError(f"could not create a spool file in {self.directory}")

    # ---- shipping -----------------------------------------------------------------------------

    def files(self) -> list[SpoolFile]:
        """The files held by this process that still have events to ship."""
        return [file for file in self._held.values() if file.unshipped > 0 or file.sealed]

    @property
    def unshipped_bytes(self) -> int:
        return sum(file.unshipped for file in self._held.values())

    async def adopt_orphans(self) -> list[SpoolFile]:
        """Take the lock of every file in the directory whose process is gone."""
        return await asyncio.shield(self._locked(self._adopt_orphans))

    def _adopt_orphans(self) -> list[SpoolFile]:
        adopted = []
        try:
            names = sorted(os.listdir(self.directory))
        except FileNotFoundError:
            return adopted
        for name in names:
            if not name.startswith(PREFIX):
                continue
            path = self.directory / name
            if path in self._held or not name.endswith((SUFFIX, ".tmp")):
                continue
            fd = _lock_orphan(path)
            if fd is None:
                continue
            if name.endswith(".tmp"):
                # Its process died between creating and naming it: it never held an event.
                with contextlib.suppress(OSError):
                    path.unlink()
                os.close(fd)
                continue
            size = os.fstat(fd).st_size
            spool_file = SpoolFile(path=path, fd=fd, size=size, sealed=True, adopted=True)
            self._held[path] = spool_file
            adopted.append(spool_file)
            logger.warning("adopted the usage spool %s (%d bytes) of a gone process", path, size)
        return adopted

    async def read(self, spool_file: SpoolFile, max_records: int) -> tuple[list[dict], int]:
        """The next events to ship from a file, and the offset to pass to `shipped` once the
        database committed them."""
        events, end, torn = await asyncio.to_thread(
            read_records, spool_file.fd, spool_file.shipped, spool_file.size, max_records
        )
        if torn:
            lost = spool_file.size - end
            if spool_file.adopted:
                # A crash mid-append: the torn record was never acknowledged.
                logger.warning("%s: skipping %d bytes of a torn last record", spool_file.path, lost)
            else:
                logger.error(
                    "%s: %d bytes of our own spool do not read back", spool_file.path, lost
                )
                spool_file.sealed = True  # appends would land past the bad bytes
            spool_file.size = end
        return events, end

    async def shipped(self, spool_file: SpoolFile, offset: int) -> None:
        """Record that the database committed everything before `offset`; a file whose events
        are all committed is truncated (our current file) or deleted (sealed or adopted)."""
        spool_file.shipped = max(spool_file.shipped, offset)
        if spool_file.unshipped <= 0:
            await asyncio.shield(self._locked(self._finish, spool_file))

    def _finish(self, spool_file: SpoolFile) -> None:
        if spool_file.unshipped > 0:  # an append came in meanwhile
            return
        if spool_file is self._own and not spool_file.sealed:
            if spool_file.size:
                os.ftruncate(spool_file.fd, 0)
                spool_file.size = spool_file.shipped = 0
        else:
            self._release(spool_file, delete=True)

    def _release(self, spool_file: SpoolFile, *, delete: bool) -> None:
        # Delete while still holding the lock: no adopter can take a file that is done.
        if delete:
            with contextlib.suppress(FileNotFoundError):
                spool_file.path.unlink()
        os.close(spool_file.fd)
        self._held.pop(spool_file.path, None)
        if spool_file is self._own:
            self._own = None

    async def close(self) -> None:
        """Let go of every file: the empty ones are deleted, the others wait for an adopter."""
        await asyncio.shield(self._locked(self._release_all))

    def _release_all(self) -> None:
        for spool_file in list(self._held.values()):
            self._release(spool_file, delete=spool_file.unshipped <= 0)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _lock_orphan(path: Path) -> int | None:
    """An open descriptor of `path` under our exclusive lock, or None if its owner is alive
    (or it is gone)."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        locked = os.fstat(fd)
        current = os.stat(path)
    except OSError:  # BlockingIOError: its process is alive; FileNotFoundError: just deleted
        os.close(fd)
        return None
    if (locked.st_dev, locked.st_ino) != (current.st_dev, current.st_ino):
        os.close(fd)  # drained and deleted by another adopter, and the name reused
        return None
    return fd
