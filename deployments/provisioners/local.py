"""The `local` provisioner (the embedded default): replicas are `python -m runtime serve`
processes on this machine.

Each deployment has a folder under `var/replicas/` holding a small state file (replica names,
pids, ports, revisions, restarts) and one log per replica. The state file is the "cluster": a
worker that restarts, or another worker process, adopts the live replicas it lists after
checking that each pid is still that replica (its command line names its port) and answers on
its health path.

Failures are noticed as they happen: the worker process that starts (or adopts) a replica waits
on it from a thread (its own child: `wait()`, which also gives the exit status; another's: a
pidfd) and writes an exit record next to the log (`<replica>.exit`: pid, exit time, status).
Unless the exit was ours (whoever stops a replica on purpose first writes `<replica>.stopping`
naming its pid, so the watcher in any worker process knows), that thread restarts the replica
at once on the same port (so the gateway's cached route stays right), as the kubelet restarts
a container, then calls `on_change`, which runs a pass (it records the exit: event, status,
GPU time), and calls it again the moment the new process answers. A single replica has a warm
standby (see STANDBY_IMPORT_AFTER_SECONDS) that takes the restart's turn, so the replacement
skips the runtime's imports. A replica that keeps dying
quickly is restarted by the passes instead, with exponential backoff; one that keeps dying
fails the deployment with the last lines of its log. The replicas of a deployment change only
under an flock of its folder's `state.lock` (a pass, an exit watch, a delete), and the state
file is saved before a process is spawned and again once its pid is known, so a pass killed in
between leaves a process the next pass finds by its port and adopts, never a duplicate.

Each replica's runs are kept with the machine's own timestamps (process start, exit time from
the exit record), which is what GPU time is billed from.

Processes run in their own session, so a Ctrl-C meant for `make run` never reaches them;
`stop_all` (run by `make run` on the way out) stops them cleanly, and the next start's sweep
starts them again.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from deployments.provisioners.base import (
    DeploymentSpec,
    Observation,
    ObservedReplica,
    PermanentError,
    Provisioner,
)

logger = logging.getLogger(__name__)

# Quick crashes in a row (each after less than STABLE_SECONDS of running) that fail it.
RESTARTS_TO_FAIL = 5
# A replica that ran this long before it died starts a fresh crash streak: it is restarted at
# once, as the first crash of a streak always is; later ones in a streak wait 1, 2, 4 … s.
STABLE_SECONDS = 30.0
MAX_BACKOFF_SECONDS = 60.0
# A spawn recorded in the state file whose process cannot be found after this long never ran.
LAUNCH_GRACE_SECONDS = 10.0
# How long a pass that finds a replica dead waits for its watcher's exit record (exit time and
# status); none comes when no worker process watched it (then: "it exited", and now).
EXIT_RECORD_WAIT_SECONDS = 0.3
# Replicas removed (scale-down, rolling update) whose last run the reconciler may not have seen
# end yet; kept in the state file, the oldest dropped beyond this many.
ENDED_KEPT = 64
STOP_GRACE_SECONDS = 10.0
PROBE_TIMEOUT_SECONDS = 1.0
# After the exit watch restarted a replica, it probes the new process this often, for at most
# this long, and reports the moment it answers (the passes' own polling goes on regardless).
READY_PROBE_SECONDS = 0.05
READY_WATCH_SECONDS = 120.0
# A single-replica deployment's replica has a warm standby: a `runtime serve --standby` process
# started beside it by the worker process that owns it, which imports the runtime (torch: 1 to 4
# s of a start on this kind of machine) after this many seconds and then waits on its stdin. A
# restart after a crash hands it the turn, so the replacement only loads the weights. It exits
# when its stdin ends: with the worker process that owns it, or when it is let go. (A replica
# adopted after its worker process died has none until its next restart.)
STANDBY_IMPORT_AFTER_SECONDS = 10.0
STATE_FILE = "state.json"
# A deployment's replicas change only under an flock of this file (see LocalProvisioner.locked).
LOCK_FILE = "state.lock"


@dataclass
class LocalReplica:
    name: str
    revision: str
    # The model version it was started with (state files written before these were kept
    # lack them: "").
    model_slug: str = ""
    model_version: str = ""
    port: int | None = None
    pid: int | None = None
    restart_count: int = 0  # restarts after a crash, over the replica's whole life
    crash_streak: int = 0  # quick crashes in a row: drives the backoff and the failure
    next_start_at: float = 0.0  # wall clock; 0 means at once
    started_at: float = 0.0  # the current (or last) run's process start, wall clock
    # Set, with the port, just before the process is spawned; cleared once its pid is saved.
    launched_at: float = 0.0
    last_exit: str = ""
    # The last run that ended: its start and exit time (wall clock; 0 when none yet).
    last_started_at: float = 0.0
    exited_at: float = 0.0
    # Stopped on purpose (make run's Ctrl-C): start again without counting a crash.
    stopped: bool = False


@dataclass
class LocalState:
    deployment_id: str
    name: str
    organization: str
    next_serial: int = 0
    replicas: list[LocalReplica] = field(default_factory=list)
    # Replicas removed on purpose, by name: [started, stopped] of their last run.
    ended: dict[str, list[float]] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path) -> LocalState | None:
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        replicas = [LocalReplica(**replica) for replica in data.pop("replicas", [])]
        return cls(**data, replicas=replicas)

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        # A temporary file of this writer's own: a shared name let two writers (a worker's exit
        # watch and a pass) rename each other's file away.
        temporary = path.with_name(f"{path.stem}.{os.getpid()}.{threading.get_ident()}.tmp")
        temporary.write_text(json.dumps(asdict(self), indent=1))
        os.replace(temporary, path)  # a reader never sees half a file


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def port_is_free(port: int) -> bool:
    """Whether a server could listen on the port now (SO_REUSEADDR, as uvicorn binds: the
    connections a killed server left in TIME_WAIT do not count)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def describe_exit(status: int | None) -> str:
    """`signal 9 (SIGKILL)`, `exit code 3`, or `it exited` when the status is not known (the
    process was not ours to wait for)."""
    if status is None:
        return "it exited"
    if status < 0:
        try:
            name = signal.Signals(-status).name
        except ValueError:
            return f"signal {-status}"
        return f"signal {-status} ({name})"
    return f"exit code {status}"


def process_started_at(pid: int) -> float | None:
    """When the process started, wall clock, from the kernel (/proc/PID/stat's start time in
    clock ticks after boot, and /proc/uptime): within two ticks (20 ms)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()
        uptime = float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    started_after_boot = int(fields[19]) / os.sysconf("SC_CLK_TCK")
    return time.time() - (uptime - started_after_boot)


def _utc(moment: float) -> datetime | None:
    return datetime.fromtimestamp(moment, UTC) if moment else None


def model_path_from_uri(uri: str, base_dir: Path) -> str:
    """Where the runtime loads the weights from: a folder for file:// URIs (relative ones are
    relative to the project), the URI itself for s3:// (the runtime downloads it)."""
    if not uri:
        raise PermanentError(
            "The weights of this model version are not imported yet, so no server can load "
            "them. The platform team must import them first."
        )
    if uri.startswith("s3://"):
        return uri
    path = uri.removeprefix("file://")
    folder = Path(path) if Path(path).is_absolute() else base_dir / path
    if not folder.is_dir():
        raise PermanentError(f"The weights folder {folder} does not exist on this machine.")
    return str(folder)


def _process_state(pid: int) -> str | None:
    """The kernel's one-letter state of a process ("Z" for a zombie), None if there is none."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        if sys.platform.startswith("linux"):
            return None
        try:
            os.kill(pid, 0)
        except OSError:
            return None
        return "R"
    return stat.rsplit(")", 1)[-1].split()[0]


# The replicas this process started, so their exit status can be collected (and no zombie
# lingers). Replicas adopted from another worker process are watched through a pidfd instead.
_children: dict[int, subprocess.Popen] = {}
# The warm standbys this process started, by (deployment id, replica name).
_standbys: dict[tuple[str, str], subprocess.Popen] = {}


def _let_go(standby: subprocess.Popen) -> None:
    """End a standby that is not needed and reap it (it holds nothing: SIGTERM ends it)."""
    with contextlib.suppress(OSError):
        standby.stdin.close()
    standby.terminate()
    try:
        standby.wait(timeout=STOP_GRACE_SECONDS)
    except subprocess.TimeoutExpired:
        standby.kill()
        standby.wait()


def _let_go_of_standby(deployment_id: str, name: str) -> None:
    standby = _standbys.pop((deployment_id, name), None)
    if standby is not None:
        _let_go(standby)


class ExitWatch:
    """Waits, from one thread per replica, for the replica processes this worker process knows
    of; on an exit it writes the exit record and calls `on_exit(status)` (None when the process
    was not ours to reap). A process is watched once however often it is seen."""

    def __init__(self):
        self._lock = threading.Lock()
        self._watched: set[int] = set()

    def watch(self, pid: int, *, record: Path, on_exit: Callable[[int | None], None]) -> None:
        with self._lock:
            if pid in self._watched:
                return
            self._watched.add(pid)
        threading.Thread(
            target=self._wait, args=(pid, record, on_exit), name=f"replica-{pid}", daemon=True
        ).start()

    def _wait(self, pid: int, record: Path, on_exit: Callable[[int | None], None]) -> None:
        process = _children.get(pid)
        try:
            if process is not None:
                status = process.wait()
            else:
                # Not our child (adopted after a worker restart, or watched beside the worker
                # process that started it): a pidfd becomes readable when the process exits
                # (Linux 5.3+); its exit status is its parent's to collect.
                status = None
                descriptor = os.pidfd_open(pid)
                try:
                    select.select([descriptor], [], [])
                finally:
                    os.close(descriptor)
        except OSError:  # already gone
            status = None
        exited_at = time.time()
        if process is None:
            # Its parent, if it is a worker process still, reaps it, writes the record with the
            # status and handles the exit; this watcher steps back. (Two watchers once wrote the
            # record through one temporary file, and a torn record made a pass take the restart
            # for the exit time: GPU time billed a second too long.)
            deadline = time.monotonic() + EXIT_RECORD_WAIT_SECONDS
            while time.monotonic() < deadline:
                if read_exit_record(record, pid):
                    with self._lock:
                        self._watched.discard(pid)
                    return
                time.sleep(0.01)
        _write_exit_record(record, {"pid": pid, "exited_at": exited_at, "status": status})
        with self._lock:
            self._watched.discard(pid)
        try:
            on_exit(status)
        except Exception:  # the next pass, or the sweep, still finds it
            logger.exception("handling the exit of replica process %s failed", pid)


def _write_exit_record(record: Path, values: dict) -> None:
    # A temporary file of this thread's own: a reader never sees half a record.
    temporary = record.with_name(f".{record.name}.{os.getpid()}.{threading.get_ident()}")
    with contextlib.suppress(OSError):
        temporary.write_text(json.dumps(values))
        os.replace(temporary, record)


def read_exit_record(record: Path, pid: int | None) -> dict:
    """The exit record (pid, exit time, status) if it is that of process `pid`, else {}."""
    try:
        values = json.loads(record.read_text())
    except (OSError, ValueError):
        return {}
    return values if isinstance(values, dict) and values.get("pid") == pid else {}


_exits = ExitWatch()


def _find_replica_process(port: int | None) -> int | None:
    """The pid of a runtime process serving on `port`, started by a pass that was killed before
    it could record the pid."""
    if port is None or not sys.platform.startswith("linux"):
        return None
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and _is_our_replica(int(entry.name), port):
            return int(entry.name)
    return None


def _reap(pid: int) -> int | None:
    """The exit code of our own child once it has exited (None if not ours or running)."""
    process = _children.get(pid)
    if process is None or process.poll() is None:
        return None
    del _children[pid]
    return process.returncode


def _is_our_replica(pid: int, port: int | None) -> bool:
    """The pid is alive and still our runtime on that port (pids get reused)."""
    state = _process_state(pid)
    if state is None or state in ("Z", "X"):
        return False
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return not sys.platform.startswith("linux")
    return b"runtime" in command and b"serve" in command and str(port).encode() in command


def _probe(port: int, path: str) -> int | None:
    """HTTP status of GET path on the replica, None if nothing answers."""
    try:
        with urllib.request.urlopen(
            f"http://127.0.0.1:{port}{path}", timeout=PROBE_TIMEOUT_SECONDS
        ) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code
    except (OSError, ValueError):
        return None


def _log_tail(path: Path, lines: int = 3) -> str:
    try:
        with path.open("rb") as handle:
            handle.seek(0, os.SEEK_END)
            handle.seek(max(0, handle.tell() - 4096))
            text = handle.read().decode(errors="replace")
    except OSError:
        return ""
    kept = [line.strip() for line in text.splitlines() if line.strip()]
    return " | ".join(kept[-lines:])


def _serial(replica: LocalReplica) -> int:
    return int(replica.name.rsplit("-", 1)[-1])


def _stopping_path(folder: Path, name: str) -> Path:
    return folder / f"{name}.stopping"


def mark_stopping(folder: Path, name: str, pid: int) -> None:
    """Record, before stopping it, that the replica's process `pid` is being stopped on
    purpose: the exit watch of whichever worker process watches it (not necessarily this one)
    then neither restarts it nor reports a crash. Kept after the stop: it names the pid."""
    with contextlib.suppress(OSError):
        _stopping_path(folder, name).write_text(str(pid))


def _stop_expected(folder: Path, name: str, pid: int) -> bool:
    try:
        return int(_stopping_path(folder, name).read_text()) == pid
    except (OSError, ValueError):
        return False


@contextlib.contextmanager
def locked(folder: Path, *, create: bool = True) -> Iterator[None]:
    """Hold the deployment folder's lock: a pass, the exit watch of any worker process, a
    delete or make run's stop change its replicas one at a time. An flock: the kernel releases
    it when its holder dies, killed mid-pass included. Without `create`, a folder that is gone
    (the deployment was deleted) raises FileNotFoundError."""
    if create:
        folder.mkdir(parents=True, exist_ok=True)
    with (folder / LOCK_FILE).open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def stop_process(pid: int, *, grace: float = STOP_GRACE_SECONDS) -> None:
    """SIGTERM the replica's process group, SIGKILL it after `grace` seconds; reap it."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 2.0)):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, sig)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            _reap(pid)
            # A zombie that is not our child is another worker's to reap. Ours we wait for:
            # its main thread shows "Z" while its other threads are still exiting.
            if _process_state(pid) is None or (
                pid not in _children and _process_state(pid) in ("Z", "X")
            ):
                return
            time.sleep(0.05)


class LocalProvisioner(Provisioner):
    name = "local"
    # Probes are loopback HTTP calls: cheap enough to look twice a second while starting.
    poll_interval = 0.5

    def __init__(self, root: Path, *, base_dir: Path, python: str = sys.executable):
        self.root = Path(root)
        self.base_dir = Path(base_dir)
        self.python = python

    # --- state -----------------------------------------------------------------------------

    def folder(self, spec: DeploymentSpec) -> Path:
        return self.root / spec.deployment_id

    def _load(self, spec: DeploymentSpec) -> LocalState:
        state = LocalState.load(self.folder(spec) / STATE_FILE)
        return state or LocalState(
            deployment_id=spec.deployment_id, name=spec.name, organization=spec.organization_slug
        )

    def _save(self, spec: DeploymentSpec, state: LocalState) -> None:
        state.save(self.folder(spec) / STATE_FILE)

    def log_path(self, spec: DeploymentSpec, replica: LocalReplica) -> Path:
        return self.folder(spec) / f"{replica.name}.log"

    # --- processes -------------------------------------------------------------------------

    def _command(self, spec: DeploymentSpec, port: int) -> list[str]:
        command = [
            self.python,
            "-m",
            "runtime",
            "serve",
            "--model",
            model_path_from_uri(spec.artifact_uri, self.base_dir),
            "--served-model-name",
            spec.served_model_name,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ]
        if spec.max_model_len:
            command += ["--max-model-len", str(spec.max_model_len)]
        return command

    def exit_record_path(self, spec: DeploymentSpec, replica: LocalReplica) -> Path:
        return self.folder(spec) / f"{replica.name}.exit"

    def _watch(self, spec: DeploymentSpec, replica: LocalReplica) -> None:
        name, pid = replica.name, replica.pid
        _exits.watch(
            pid,
            record=self.exit_record_path(spec, replica),
            on_exit=lambda status: self._replica_exited(spec, name, pid, status),
        )

    def _replica_exited(
        self, spec: DeploymentSpec, name: str, pid: int, status: int | None
    ) -> None:
        """The exit watch's handler, in the worker process that watched the replica. Unless it
        was stopped on purpose (by any process: see mark_stopping), restart it at once when its
        crash streak allows, as the kubelet restarts a container under restartPolicy Always;
        then report the exit (a pass records it: event, status, GPU time), and, after a
        restart, the moment the new process answers."""
        folder = self.folder(spec)
        if _stop_expected(folder, name, pid):
            return  # stopped on purpose: scale-down, rolling update, make run's stop
        try:
            with locked(folder, create=False):
                restarted = self._restart_after_exit(spec, name, pid)
        except FileNotFoundError:
            return  # the deployment was deleted (its replicas stopped on purpose)
        how = describe_exit(status)
        self.changed(
            spec.deployment_id,
            f"replica {name} exited with {how}; restarted"
            if restarted
            else f"replica {name} exited with {how}",
        )
        if restarted:
            self._report_when_ready(spec, name, *restarted)

    def _restart_after_exit(
        self, spec: DeploymentSpec, name: str, pid: int
    ) -> tuple[int, int] | None:
        """Under the lock: record the exit and restart the replica if it may start now; its new
        (pid, port) if it was restarted."""
        state = self._load(spec)
        replica = next((r for r in state.replicas if r.name == name), None)
        if replica is None or replica.pid != pid:
            # A pass noticed the exit first, under this lock, and dealt with it (without the
            # standby, which only this process can hand the turn to: it is let go).
            _let_go_of_standby(spec.deployment_id, name)
            return None
        self._check(spec, replica)
        restarted = None
        if (
            replica.pid is None
            and not replica.stopped
            and not replica.launched_at
            and replica.next_start_at <= time.time()
            and replica.crash_streak < RESTARTS_TO_FAIL
        ):
            self._start(spec, state, replica)
            restarted = replica.pid, replica.port
        self._save(spec, state)
        return restarted

    def _report_when_ready(self, spec: DeploymentSpec, name: str, pid: int, port: int) -> None:
        deadline = time.monotonic() + READY_WATCH_SECONDS
        while time.monotonic() < deadline and _is_our_replica(pid, port):
            if _probe(port, spec.runtime.readiness_path) == 200:
                self.changed(spec.deployment_id, f"replica {name} answers again")
                return
            time.sleep(READY_PROBE_SECONDS)

    def _start(self, spec: DeploymentSpec, state: LocalState, replica: LocalReplica) -> None:
        # The same port again when it is free: the gateway's cached route stays right.
        port = replica.port if replica.port and port_is_free(replica.port) else free_port()
        command = self._command(spec, port)
        replica.port, replica.pid, replica.launched_at = port, None, time.time()
        # Saved before the spawn: a pass killed from here on leaves a process that the next
        # pass finds by its port (see _check), never one it starts a second time.
        self._save(spec, state)
        log = self.log_path(spec, replica)
        log.parent.mkdir(parents=True, exist_ok=True)
        process = self._take_standby(spec, replica, command)
        with log.open("ab") as output:
            how = f"its warm standby (pid {process.pid})" if process else " ".join(command)
            output.write(f"--- starting on port {port}: {how}\n".encode())
            output.flush()
            if process is None:
                process = self._spawn(command, output)
        _children[process.pid] = process
        replica.pid, replica.launched_at = process.pid, 0.0
        # Our own child: the clock now is within a millisecond of its start (finer than the
        # kernel's start time, which _check uses for a process a killed pass left); for a
        # standby, of its turn to serve (before, it held nothing but imported modules).
        replica.started_at = time.time()
        replica.stopped = False
        self._save(spec, state)
        self._watch(spec, replica)
        logger.info("started replica %s (pid %s, port %s)", replica.name, process.pid, port)
        if spec.replicas == 1:
            with log.open("ab") as output:
                _standbys[(spec.deployment_id, replica.name)] = self._spawn(
                    [*command, "--standby", str(STANDBY_IMPORT_AFTER_SECONDS)],
                    output,
                    stdin=subprocess.PIPE,
                )

    def _spawn(self, command: list[str], output, *, stdin=subprocess.DEVNULL) -> subprocess.Popen:
        return subprocess.Popen(
            command,
            stdin=stdin,
            stdout=output,
            stderr=subprocess.STDOUT,
            cwd=self.base_dir,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            start_new_session=True,
        )

    def _take_standby(
        self, spec: DeploymentSpec, replica: LocalReplica, command: list[str]
    ) -> subprocess.Popen | None:
        """The replica's warm standby, told to serve, if it has one for this very command."""
        standby = _standbys.pop((spec.deployment_id, replica.name), None)
        if standby is None:
            return None
        if standby.args[: len(command)] == command and standby.poll() is None:
            try:
                standby.stdin.write(b"serve\n")
                standby.stdin.close()
                return standby
            except OSError:
                pass
        _let_go(standby)  # another port, another spec, or gone
        return None

    def _read_exit_record(self, spec: DeploymentSpec, replica: LocalReplica) -> dict:
        return read_exit_record(self.exit_record_path(spec, replica), replica.pid)

    def _check(self, spec: DeploymentSpec, replica: LocalReplica) -> None:
        """Adopt a replica a killed pass spawned; notice one whose process died, and schedule
        its restart (at once, then with backoff while it keeps dying quickly)."""
        if replica.pid is None:
            if replica.launched_at:
                pid = _find_replica_process(replica.port)
                if pid is not None:
                    replica.pid, replica.launched_at = pid, 0.0
                    replica.started_at = process_started_at(pid) or replica.launched_at
                    logger.info("adopted replica %s (pid %s) from a killed pass", replica.name, pid)
                elif time.time() - replica.launched_at > LAUNCH_GRACE_SECONDS:
                    replica.launched_at = 0.0  # it never ran: start it again
            return
        exit_code = _reap(replica.pid)
        if _is_our_replica(replica.pid, replica.port):
            self._watch(spec, replica)  # adopted from another worker process: watch it too
            if replica.pid not in _children:
                # Another process restarted it: a standby of ours could never take a turn.
                _let_go_of_standby(spec.deployment_id, replica.name)
            return
        record = self._read_exit_record(spec, replica)
        deadline = time.monotonic() + EXIT_RECORD_WAIT_SECONDS
        while not record and time.monotonic() < deadline:
            # The worker process that watches it writes the record within milliseconds of the
            # exit; a pass asked for by someone else (the gateway) may get here first. (Even a
            # pass that reaped it itself waits: the record has the exit time.)
            time.sleep(0.02)
            record = self._read_exit_record(spec, replica)
        if exit_code is None:
            exit_code = record.get("status")
        tail = _log_tail(self.log_path(spec, replica))
        how = describe_exit(exit_code)
        replica.last_exit = f"{how}: {tail}" if tail else how
        replica.last_started_at = replica.started_at
        # No record: the exit happened while no worker process watched; now is the best bound.
        replica.exited_at = record.get("exited_at") or time.time()
        replica.pid = None
        if replica.stopped:
            return
        ran = replica.exited_at - replica.started_at
        replica.restart_count += 1
        replica.crash_streak = 1 if ran >= STABLE_SECONDS else replica.crash_streak + 1
        backoff = (
            0.0
            if replica.crash_streak == 1
            else min(MAX_BACKOFF_SECONDS, 2.0 ** (replica.crash_streak - 2))
        )
        replica.next_start_at = time.time() + backoff
        logger.warning(
            "replica %s died (%s) after %.1f s; restart %s in %.0f s",
            replica.name,
            replica.last_exit,
            ran,
            replica.restart_count,
            backoff,
        )

    def _stop(self, state: LocalState, replica: LocalReplica) -> None:
        _let_go_of_standby(state.deployment_id, replica.name)
        if replica.pid is not None and _is_our_replica(replica.pid, replica.port):
            mark_stopping(self.root / state.deployment_id, replica.name, replica.pid)
            stop_process(replica.pid)
            replica.last_started_at, replica.exited_at = replica.started_at, time.time()
        replica.pid = None

    def _remove(self, state: LocalState, replica: LocalReplica) -> None:
        """Stop a replica for good (scale-down, rolling update) and remember its last run."""
        self._stop(state, replica)
        state.replicas.remove(replica)
        if replica.exited_at:
            state.ended[replica.name] = [replica.last_started_at, replica.exited_at]
            for name in list(state.ended)[: max(0, len(state.ended) - ENDED_KEPT)]:
                del state.ended[name]

    def _is_ready(self, spec: DeploymentSpec, replica: LocalReplica) -> bool:
        return (
            replica.pid is not None
            and replica.port is not None
            and _probe(replica.port, spec.runtime.readiness_path) == 200
        )

    # --- the Provisioner interface --------------------------------------------------------

    def apply(self, spec: DeploymentSpec, *, force: bool = False) -> None:
        with locked(self.folder(spec)):
            self._apply(spec)

    def _apply(self, spec: DeploymentSpec) -> None:
        state = self._load(spec)
        revision = spec.revision()
        for replica in state.replicas:
            self._check(spec, replica)

        current = [r for r in state.replicas if r.revision == revision]
        # Scale down: drop the least advanced replicas first.
        while len(current) > spec.replicas:
            victim = min(current, key=lambda r: (self._is_ready(spec, r), -_serial(r)))
            current.remove(victim)
            self._remove(state, victim)
        while len(current) < spec.replicas:
            replica = LocalReplica(
                name=f"{spec.name}-{state.next_serial:03d}",
                revision=revision,
                model_slug=spec.model_slug,
                model_version=spec.model_version,
            )
            state.next_serial += 1
            current.append(replica)
            state.replicas.append(replica)
        too_many_crashes = any(r.crash_streak >= RESTARTS_TO_FAIL for r in current)
        now = time.time()
        for replica in current:
            if (
                replica.pid is None
                and not replica.launched_at
                and replica.next_start_at <= now
                and not too_many_crashes
            ):
                self._start(spec, state, replica)
        # A rolling update never drops below the desired count: old replicas stop only once
        # every new one answers.
        old = [r for r in state.replicas if r.revision != revision]
        if old and all(self._is_ready(spec, r) for r in current):
            for replica in old:
                self._remove(state, replica)
        self._save(spec, state)

    def observe(self, spec: DeploymentSpec) -> Observation:
        state = self._load(spec)
        revision = spec.revision()
        observation = Observation()
        now = time.time()
        for replica in state.replicas:
            observed = ObservedReplica(
                name=replica.name,
                phase="scheduling",
                revision=replica.revision,
                model_slug=replica.model_slug,
                model_version=replica.model_version,
                restart_count=replica.restart_count,
                pid=replica.pid,
                port=replica.port,
            )
            observed.last_exit = replica.last_exit.split(": ", 1)[0]  # without the log
            if replica.exited_at:
                observed.last_run = (_utc(replica.last_started_at), _utc(replica.exited_at))
            alive = replica.pid is not None and _is_our_replica(replica.pid, replica.port)
            if alive:
                observed.running = True
                observed.running_since = _utc(replica.started_at)
                observed.endpoint = f"http://127.0.0.1:{replica.port}"
                readiness = _probe(replica.port, spec.runtime.readiness_path)
                observed.ready = readiness == 200
                observed.phase = "ready" if observed.ready else "loading_weights"
            elif replica.last_exit and not replica.stopped:
                observed.phase = "crashed"
                observed.reason = "CrashLoopBackOff"
                wait = max(0, round(replica.next_start_at - now))
                observed.message = (
                    f"The model server exited ({replica.last_exit}); restart "
                    f"{replica.restart_count}" + (f" in {wait} s." if wait else ".")
                )
            observation.replicas.append(observed)
        observation.stopped_at = {
            name: _utc(stopped) for name, (_started, stopped) in state.ended.items()
        }
        current = [r for r in observation.replicas if r.revision == revision]
        observation.rolled_out = (
            len(observation.replicas) == spec.replicas
            and len(current) == spec.replicas
            and all(r.ready for r in current)
        )
        for replica, observed in zip(state.replicas, observation.replicas, strict=True):
            if replica.revision == revision and replica.crash_streak >= RESTARTS_TO_FAIL:
                observation.failure_reason = "CrashLoopBackOff"
                observation.failure = (
                    f"The model server keeps crashing ({replica.crash_streak} restarts in a "
                    f"row); last: {replica.last_exit}"
                )
                break
            if observed.reason and not observation.waiting:
                observation.waiting, observation.waiting_reason = observed.message, observed.reason
        return observation

    def delete(self, spec: DeploymentSpec) -> bool:
        with locked(self.folder(spec)):
            state = self._load(spec)
            for replica in state.replicas:
                self._stop(state, replica)
            shutil.rmtree(self.folder(spec), ignore_errors=True)
        return True

    def drifted(self, specs: dict[str, DeploymentSpec], known: dict[str, dict]) -> set[str]:
        drifted = set()
        for deployment_id, spec in specs.items():
            state = self._load(spec)
            revision = spec.revision()
            expected = known.get(deployment_id, {})
            ready = 0
            for replica in state.replicas:
                alive = replica.pid is not None and _is_our_replica(replica.pid, replica.port)
                if not alive or replica.revision != revision:
                    drifted.add(deployment_id)  # to restart, or to finish a rolling update
                elif _probe(replica.port, spec.runtime.readiness_path) == 200:
                    ready += 1
            if (
                len(state.replicas) != spec.replicas
                or ready != expected.get("ready")
                or {r.name for r in state.replicas} != expected.get("replicas")
            ):
                drifted.add(deployment_id)
        return drifted

    def orphans(self, live_ids: set[str], live_organizations: set[str]) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(
            folder.name
            for folder in self.root.iterdir()
            if folder.is_dir() and folder.name not in live_ids
        )

    def remove_orphan(self, orphan: str) -> None:
        folder = self.root / orphan
        with locked(folder):
            state = LocalState.load(folder / STATE_FILE)
            for replica in state.replicas if state else []:
                self._stop(state, replica)
            shutil.rmtree(folder, ignore_errors=True)


def stop_all(root: Path) -> int:
    """Stop every local replica (make run's Ctrl-C). They are marked stopped, not crashed, so
    the next start's sweep starts them again without a backoff. Returns how many stopped."""
    root = Path(root)
    if not root.is_dir():
        return 0
    stopped = 0
    running: list[tuple[LocalState, Path, LocalReplica]] = []
    with contextlib.ExitStack() as locks:
        for path in sorted(root.glob(f"*/{STATE_FILE}")):
            locks.enter_context(locked(path.parent))
            state = LocalState.load(path)
            for replica in state.replicas if state else []:
                if replica.pid is not None and _is_our_replica(replica.pid, replica.port):
                    mark_stopping(path.parent, replica.name, replica.pid)
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.killpg(replica.pid, signal.SIGTERM)
                    running.append((state, path, replica))
        for state, path, replica in running:
            stop_process(replica.pid, grace=STOP_GRACE_SECONDS)
            replica.last_started_at, replica.exited_at = replica.started_at, time.time()
            replica.pid = None
            replica.stopped = True
            state.save(path)
            stopped += 1
    return stopped
