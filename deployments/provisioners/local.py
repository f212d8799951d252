"""The `local` provisioner (the embedded default): replicas are `python -m runtime serve`
processes on this machine.

Each deployment has a folder under `var/replicas/` holding a small state file (replica names,
pids, ports, revisions, restarts) and one log per replica. The state file is the "cluster": a
worker that restarts, or another worker process, adopts the live replicas it lists after
checking that each pid is still that replica (its command line names its port) and answers on
its health path. A replica whose process died is restarted on a fresh port with exponential
backoff; one that keeps dying fails the deployment with the last lines of its log.

Processes run in their own session, so a Ctrl-C meant for `make run` never reaches them;
`stop_all` (run by `make run` on the way out) stops them cleanly, and the next start's sweep
starts them again.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

from deployments.provisioners.base import (
    DeploymentSpec,
    Observation,
    ObservedReplica,
    PermanentError,
    Provisioner,
)

logger = logging.getLogger(__name__)

RESTARTS_TO_FAIL = 5
MAX_BACKOFF_SECONDS = 60.0
STOP_GRACE_SECONDS = 10.0
PROBE_TIMEOUT_SECONDS = 1.0
STATE_FILE = "state.json"


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
    restart_count: int = 0
    next_start_at: float = 0.0  # wall clock; 0 means at once
    started_at: float = 0.0
    last_exit: str = ""
    # Stopped on purpose (make run's Ctrl-C): start again without counting a crash.
    stopped: bool = False


@dataclass
class LocalState:
    deployment_id: str
    name: str
    organization: str
    next_serial: int = 0
    replicas: list[LocalReplica] = field(default_factory=list)

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
        temporary = path.with_suffix(".tmp")
        temporary.write_text(json.dumps(asdict(self), indent=1))
        os.replace(temporary, path)  # a reader never sees half a file


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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
# lingers). Replicas adopted from another worker process are watched through /proc instead.
_children: dict[int, subprocess.Popen] = {}


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

    def _start(self, spec: DeploymentSpec, replica: LocalReplica) -> None:
        port = free_port()
        command = self._command(spec, port)
        log = self.log_path(spec, replica)
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("ab") as output:
            output.write(f"--- starting on port {port}: {' '.join(command)}\n".encode())
            output.flush()
            process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                cwd=self.base_dir,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
                start_new_session=True,
            )
        _children[process.pid] = process
        replica.pid, replica.port = process.pid, port
        replica.started_at = time.time()
        replica.stopped = False
        logger.info("started replica %s (pid %s, port %s)", replica.name, process.pid, port)

    def _check(self, spec: DeploymentSpec, replica: LocalReplica) -> None:
        """Notice a replica whose process died, and schedule its restart with backoff."""
        if replica.pid is None:
            return
        exit_code = _reap(replica.pid)
        if _is_our_replica(replica.pid, replica.port):
            return
        tail = _log_tail(self.log_path(spec, replica))
        code = f"exit code {exit_code}" if exit_code is not None else "it exited"
        replica.last_exit = f"{code}: {tail}" if tail else code
        replica.pid = None
        if replica.stopped:
            return
        replica.restart_count += 1
        backoff = min(MAX_BACKOFF_SECONDS, 2.0 ** (replica.restart_count - 1))
        replica.next_start_at = time.time() + backoff
        logger.warning(
            "replica %s died (%s); restart %s in %.0f s",
            replica.name,
            replica.last_exit,
            replica.restart_count,
            backoff,
        )

    def _stop(self, replica: LocalReplica) -> None:
        if replica.pid is not None and _is_our_replica(replica.pid, replica.port):
            stop_process(replica.pid)
        replica.pid = None

    def _is_ready(self, spec: DeploymentSpec, replica: LocalReplica) -> bool:
        return (
            replica.pid is not None
            and replica.port is not None
            and _probe(replica.port, spec.runtime.readiness_path) == 200
        )

    # --- the Provisioner interface --------------------------------------------------------

    def apply(self, spec: DeploymentSpec, *, force: bool = False) -> None:
        state = self._load(spec)
        revision = spec.revision()
        for replica in state.replicas:
            self._check(spec, replica)

        current = [r for r in state.replicas if r.revision == revision]
        # Scale down: drop the least advanced replicas first.
        while len(current) > spec.replicas:
            victim = min(current, key=lambda r: (self._is_ready(spec, r), -_serial(r)))
            self._stop(victim)
            current.remove(victim)
            state.replicas.remove(victim)
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
        too_many_crashes = any(r.restart_count >= RESTARTS_TO_FAIL for r in current)
        now = time.time()
        for replica in current:
            if replica.pid is None and replica.next_start_at <= now and not too_many_crashes:
                self._start(spec, replica)
        # A rolling update never drops below the desired count: old replicas stop only once
        # every new one answers.
        old = [r for r in state.replicas if r.revision != revision]
        if old and all(self._is_ready(spec, r) for r in current):
            for replica in old:
                self._stop(replica)
                state.replicas.remove(replica)
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
            alive = replica.pid is not None and _is_our_replica(replica.pid, replica.port)
            if alive:
                observed.holds_hardware = True
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
                    f"{replica.restart_count} of {RESTARTS_TO_FAIL}"
                    + (f" in {wait} s." if wait else ".")
                )
            observation.replicas.append(observed)
        current = [r for r in observation.replicas if r.revision == revision]
        observation.rolled_out = (
            len(observation.replicas) == spec.replicas
            and len(current) == spec.replicas
            and all(r.ready for r in current)
        )
        for replica, observed in zip(state.replicas, observation.replicas, strict=True):
            if replica.revision == revision and replica.restart_count >= RESTARTS_TO_FAIL:
                observation.failure_reason = "CrashLoopBackOff"
                observation.failure = (
                    f"The model server keeps crashing ({replica.restart_count} restarts); "
                    f"last: {replica.last_exit}"
                )
                break
            if observed.reason and not observation.waiting:
                observation.waiting, observation.waiting_reason = observed.message, observed.reason
        return observation

    def delete(self, spec: DeploymentSpec) -> bool:
        state = self._load(spec)
        for replica in state.replicas:
            self._stop(replica)
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
        state = LocalState.load(folder / STATE_FILE)
        for replica in state.replicas if state else []:
            self._stop(replica)
        shutil.rmtree(folder, ignore_errors=True)


def stop_all(root: Path) -> int:
    """Stop every local replica (make run's Ctrl-C). They are marked stopped, not crashed, so
    the next start's sweep starts them again without a backoff. Returns how many stopped."""
    root = Path(root)
    if not root.is_dir():
        return 0
    stopped = 0
    running: list[tuple[LocalState, Path, LocalReplica]] = []
    for path in sorted(root.glob(f"*/{STATE_FILE}")):
        state = LocalState.load(path)
        for replica in state.replicas if state else []:
            if replica.pid is not None and _is_our_replica(replica.pid, replica.port):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(replica.pid, signal.SIGTERM)
                running.append((state, path, replica))
    for state, path, replica in running:
        stop_process(replica.pid, grace=STOP_GRACE_SECONDS)
        replica.pid = None
        replica.stopped = True
        state.save(path)
        stopped += 1
    return stopped
