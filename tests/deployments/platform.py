"""A real platform on the embedded default for fault tests and bench/faults.py: a web process
(console, REST API, gateway: uvicorn) and a Celery worker with embedded beat, each a process the
caller can kill -9 and start again, on a SQLite database and broker in a folder of their own.

The caller reads the platform as a client does (REST API, gateway) and, for what no API shows
(leases, GPU-time rows, replica processes), the SQLite file and the local provisioner's state
files directly. Every process is stopped on exit, model replicas included.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MODEL = "mixtral-tiny"
PROFILE = "cpu-small"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def process_state(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0]
    except OSError:
        return None


def alive(pid: int) -> bool:
    return process_state(pid) not in (None, "Z", "X")


@dataclass
class Run:
    """One run of a replica process as seen from outside: the kernel's start time, and when it
    was seen gone (polled every few milliseconds)."""

    pid: int
    started: float
    ended: float | None = None


@dataclass
class ProcessLife:
    """Follows the replica processes of one deployment (its folder under var/replicas) from a
    thread: the observed truth that billed GPU time is compared with."""

    folder: Path
    runs: dict[int, Run] = field(default_factory=dict)
    interval: float = 0.005

    def __post_init__(self):
        from deployments.provisioners.local import process_started_at

        self._started_at = process_started_at
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._follow, daemon=True)
        self._thread.start()

    def _follow(self) -> None:
        while not self._stop.is_set():
            for path in self.folder.glob("state.json"):
                with contextlib.suppress(OSError, ValueError):
                    for replica in json.loads(path.read_text())["replicas"]:
                        pid = replica.get("pid")
                        if pid and pid not in self.runs and alive(pid):
                            standby, turn = self._standby_turn(pid)
                            if standby and turn is None:
                                continue  # told to serve; it logs when, in a moment
                            started = turn or self._started_at(pid)
                            self.runs[pid] = Run(pid, started or time.time())
            now = time.time()
            for run in self.runs.values():
                if run.ended is None and not alive(run.pid):
                    run.ended = now
            self._stop.wait(self.interval)

    def _standby_turn(self, pid: int) -> tuple[bool, float | None]:
        """Whether the process is a warm standby that took a replica's turn, and when it began
        to serve, as the runtime itself logged it (it started earlier, holding nothing)."""
        turn = re.compile(rf"standby: serving now \(pid {pid}, at ([0-9.]+)\)")
        for log in self.folder.glob("*.log"):
            with contextlib.suppress(OSError):
                text = log.read_text(errors="replace")
                if found := turn.search(text):
                    return True, float(found[1])
                if f"its warm standby (pid {pid})" in text:
                    return True, None
        return False, None

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)

    def seconds(self, *, until: float) -> float:
        return sum((run.ended or until) - run.started for run in self.runs.values())


class Platform:
    """web + worker on the embedded default in `folder`; `start()` once, then kill and start
    the worker at will."""

    def __init__(self, folder: Path, *, log=None):
        self.folder = Path(folder)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log or (lambda message: None)
        self.web: subprocess.Popen | None = None
        self.worker: subprocess.Popen | None = None
        self.worker_ready_at: float | None = None
        self.api_key = ""
        self.env = {
            **{
                k: v
                for k, v in os.environ.items()
                if k
                not in {
                    "DATABASE_URL",
                    "CELERY_BROKER_URL",
                    "REDIS_URL",
                    "ARTIFACT_STORE_URL",
                    "DJANGO_SETTINGS_MODULE",
                    "CELERY_TASK_ALWAYS_EAGER",
                }
            },
            "SECRET_KEY": "fault-platform-key-" + "x" * 40,
            "SIROCCO_VAR_DIR": str(self.folder),
            "SIROCCO_DEMO_PASSWORD": "demo-pass-123",
            "SIROCCO_PROVISIONER": "local",
            "PYTHONUNBUFFERED": "1",
            "LOG_FORMAT": "text",
            # The demo pool's replica is not what these scenarios measure: none at start.
            "GATEWAY_ROUTE_CACHE_SECONDS": "1",
        }

    # --- processes ---------------------------------------------------------------------

    def manage(self, *args: str, timeout: float = 300) -> str:
        done = subprocess.run(
            [sys.executable, "manage.py", *args],
            cwd=ROOT,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=True,
        )
        return done.stdout

    def start(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.manage("migrate", "--noinput", "-v0")
        self.manage("bootstrap_demo")
        self.api_key = self.manage("create_api_key", "--org", "demo", "--name", "faults").split()[
            -1
        ]
        self.web = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "uvicorn",
                "controlplane.asgi:application",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--no-access-log",
                "--lifespan",
                "on",
            ],
            cwd=ROOT,
            env=self.env,
            stdout=(self.folder / "web.log").open("ab"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.start_worker()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                urllib.request.urlopen(f"{self.url}/healthz", timeout=1).close()
                return
            time.sleep(0.2)
        raise RuntimeError(f"the web server did not answer; see {self.folder / 'web.log'}")

    def start_worker(self, *, wait: bool = True) -> None:
        log = self.folder / "worker.log"
        offset = log.stat().st_size if log.exists() else 0
        self.worker = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "controlplane",
                "worker",
                "--beat",
                "--queues",
                "default,provisioning,billing",
                "--concurrency",
                "2",
                "--loglevel",
                "INFO",
                "--schedule",
                str(self.folder / "celerybeat-schedule"),
            ],
            cwd=ROOT,
            env=self.env,
            stdout=log.open("ab"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.worker_ready_at = None
        if not wait:
            return
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            with log.open("rb") as handle:
                handle.seek(offset)
                if b" ready." in handle.read():
                    self.worker_ready_at = time.time()
                    return
            if self.worker.poll() is not None:
                break
            time.sleep(0.05)
        raise RuntimeError(f"the worker did not start; see {log}")

    def kill_worker(self) -> None:
        """kill -9 the worker and its pool processes (its process group); model replicas run
        in sessions of their own and live on."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.worker.pid, signal.SIGKILL)
        self.worker.wait(timeout=30)

    def stop_worker(self) -> None:
        """As run_platform stops it: SIGTERM to the worker alone (a warm shutdown that stops its
        pool), then SIGKILL to what is left of its group. (SIGTERM to the whole group killed the
        pool under the warm shutdown, which then hung for a minute.)"""
        self._stop(self.worker, grace=60)

    def _stop(self, process: subprocess.Popen, *, grace: float) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=grace)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()

    def close(self) -> None:
        for process in (self.worker, self.web):
            if process is not None and process.poll() is None:
                self._stop(process, grace=30)
        for pid in self.replica_pids():  # never leave a runtime behind
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)

    def __enter__(self) -> Platform:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- reading it ----------------------------------------------------------------------

    def replica_pids(self, deployment_id: str | None = None) -> list[int]:
        pids = []
        pattern = f"{deployment_id or '*'}/state.json"
        for path in (self.folder / "replicas").glob(pattern):
            with contextlib.suppress(OSError, ValueError):
                pids += [r["pid"] for r in json.loads(path.read_text())["replicas"] if r["pid"]]
        return pids

    def query(self, sql: str, *args) -> list[tuple]:
        with contextlib.closing(sqlite3.connect(self.folder / "sirocco.sqlite3", timeout=30)) as db:
            return db.execute(sql, args).fetchall()

    def deployment(self, deployment_id: str) -> dict:
        [(status, ready, lease, generation, observed)] = self.query(
            "SELECT status, ready_replicas, lease_token, generation, observed_generation "
            "FROM deployments_deployment WHERE id = ?",
            deployment_id.replace("-", ""),
        )
        return {
            "status": status,
            "ready_replicas": ready,
            "lease": lease,
            "converged": observed >= generation,
        }

    def replica_usage(self, deployment_id: str) -> list[tuple[str, float, float | None]]:
        """(replica, started, ended) of every GPU-time row, as Unix seconds."""
        from datetime import UTC, datetime

        def seconds(text):  # SQLite holds them as naive UTC text
            if not text:
                return None
            moment = datetime.fromisoformat(text)
            return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()

        return [
            (name, seconds(started), seconds(ended))
            for name, started, ended in self.query(
                "SELECT replica_name, started_at, ended_at FROM deployments_replicausage "
                "WHERE deployment_id = ? ORDER BY started_at",
                deployment_id.replace("-", ""),
            )
        ]

    def events(self, deployment_id: str) -> list[tuple[str, str]]:
        return self.query(
            "SELECT reason, message FROM deployments_deploymentevent WHERE deployment_id = ? "
            "ORDER BY time, id",
            deployment_id.replace("-", ""),
        )

    # --- calling it -------------------------------------------------------------------------

    def request(self, method: str, path: str, body: dict | None = None, timeout: float = 30):
        request = urllib.request.Request(
            f"{self.url}{path}",
            method=method,
            data=json.dumps(body).encode() if body is not None else None,
            headers={
                "Authorization": f"Bearer {self.api_key}",
                "Content-Type": "application/json",
            },
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return response.status, json.load(response)
        except urllib.error.HTTPError as error:
            return error.code, {"body": error.read().decode(errors="replace")[:500]}
        except OSError as error:
            return 0, {"error": str(error)}

    def deploy(self, name: str, *, replicas: int = 1) -> str:
        status, body = self.request(
            "POST",
            "/api/v1/deployments",
            {
                "name": name,
                "model": MODEL,
                "hardware_profile": PROFILE,
                "min_replicas": replicas,
                "max_replicas": replicas,
            },
        )
        if status != 201:
            raise RuntimeError(f"POST /api/v1/deployments answered {status}: {body}")
        return body["id"]

    def delete(self, deployment_id: str, *, timeout: float = 120) -> None:
        """DELETE it and wait until it is gone (replicas stopped, GPU time closed)."""
        status, body = self.request("DELETE", f"/api/v1/deployments/{deployment_id}")
        if status != 202:
            raise RuntimeError(f"DELETE answered {status}: {body}")
        deadline = time.monotonic() + timeout
        while self.deployment(deployment_id)["status"] != "deleted":
            if time.monotonic() > deadline:
                raise RuntimeError(f"deployment {deployment_id} not deleted in {timeout} s")
            time.sleep(0.1)

    def chat(self, model: str, timeout: float = 10) -> int:
        status, _ = self.request(
            "POST",
            "/v1/chat/completions",
            {"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1},
            timeout=timeout,
        )
        return status

    def replica_answers(self, deployment_id: str) -> bool:
        """Whether a replica of the deployment is alive and answers its readiness probe."""
        for path in (self.folder / "replicas").glob(f"{deployment_id}/state.json"):
            with contextlib.suppress(OSError, ValueError):
                for replica in json.loads(path.read_text())["replicas"]:
                    if not (replica["pid"] and alive(replica["pid"])):
                        continue
                    with contextlib.suppress(OSError):
                        url = f"http://127.0.0.1:{replica['port']}/v1/models"
                        with urllib.request.urlopen(url, timeout=2) as response:
                            if response.status == 200:
                                return True
        return False

    def wait_replaced(self, deployment_id: str, old: list[int], *, timeout: float = 120) -> None:
        """Until the deployment runs replicas other than `old` and is ready again."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pids = self.replica_pids(deployment_id)
            if pids and not set(pids) & set(old) and all(alive(p) for p in pids):
                self.wait_ready(deployment_id, timeout=max(1.0, deadline - time.monotonic()))
                return
            time.sleep(0.05)
        raise RuntimeError(f"replicas {old} of {deployment_id} not replaced in {timeout} s")

    def wait_ready(self, deployment_id: str, *, timeout: float = 120) -> float:
        """Seconds until the deployment is ready with its replicas answering."""
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            state = self.deployment(deployment_id)
            if state["status"] == "ready" and state["ready_replicas"] and state["converged"]:
                return time.monotonic() - started
            time.sleep(0.05)
        raise RuntimeError(
            f"deployment {deployment_id} not ready in {timeout} s: "
            f"{self.deployment(deployment_id)}; events {self.events(deployment_id)[-5:]}"
        )
