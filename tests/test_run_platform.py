"""`make run`'s last step for real: web server + Celery worker with beat, supervised, then Ctrl-C."""

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.slow, pytest.mark.nodb]


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Output:
    """run_platform's merged output, read on a thread so the test never blocks on it."""

    def __init__(self, stream):
        self.lines: list[tuple[float, str]] = []
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream):
        for line in stream:
            self.lines.append((time.monotonic(), line))

    def text(self) -> str:
        return "".join(line for _, line in self.lines)

    def wait_for(self, *needles: str, since: float = 0.0, timeout: float = 60.0) -> float:
        """When the first line containing every one of `needles` after `since` was read."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for at, line in list(self.lines):
                if at >= since and all(needle in line for needle in needles):
                    return at
            time.sleep(0.05)
        raise AssertionError(f"no {needles!r} within {timeout} s:\n{self.text()[-6000:]}")


def tree(root: int) -> dict[int, tuple[int, str]]:
    """Every process below `root`: pid → (parent pid, one-letter state)."""
    processes = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[-1].split()
            processes[int(entry.name)] = (int(fields[1]), fields[0])
    below, frontier = {}, [root]
    while frontier:
        parent = frontier.pop()
        for pid, (ppid, state) in processes.items():
            if ppid == parent and pid not in below:
                below[pid] = (ppid, state)
                frontier.append(pid)
    return below


def zombies(root: int, *, settle: float = 3.0) -> list[int]:
    """Zombies below `root` that stay zombies for `settle` seconds (a child that just exited is
    a zombie until its parent's next wait: that is normal)."""
    first = {pid for pid, (_, state) in tree(root).items() if state == "Z"}
    time.sleep(settle)
    return sorted(pid for pid, (_, state) in tree(root).items() if state == "Z" and pid in first)


def chat(port: int, key: str) -> int:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/chat/completions",
        data=json.dumps(
            {
                "model": "mixtral-tiny",
                "messages": [{"role": "user", "content": "Hi"}],
                "max_tokens": 2,
            }
        ).encode(),
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code
    except OSError:
        return 0


def worker_pid(root: int) -> int:
    """The Celery worker's main process: run_platform's child whose command line says celery."""
    for pid, (ppid, _) in tree(root).items():
        if ppid == root and b"celery" in Path(f"/proc/{pid}/cmdline").read_bytes():
            return pid
    raise AssertionError("no worker process")


def test_run_platform_supervises_restarts_and_reaps(tmp_path):
    """kill -9 of the worker: the platform keeps serving (the replica too) and the worker is back
    within 5 s; kill -9 of the web server: it comes back; kill -9 of the worker's embedded beat:
    the worker is restarted with a new one; no zombies; Ctrl-C stops everything, the adopted
    replica included."""
    env = {
        **{
            k: v
            for k, v in os.environ.items()
            if k not in {"DATABASE_URL", "CELERY_BROKER_URL", "REDIS_URL", "ARTIFACT_STORE_URL"}
        },
        "SECRET_KEY": "run-platform-test-key-" + "x" * 30,
        "SIROCCO_VAR_DIR": str(tmp_path),
        "SIROCCO_DEMO_PASSWORD": "demo-pass-123",
        "SIROCCO_PROVISIONER": "local",
        "PYTHONUNBUFFERED": "1",
        "LOG_FORMAT": "text",
    }
    manage = [sys.executable, "manage.py"]
    for command in (["migrate", "--noinput", "-v0"], ["bootstrap_demo"]):
        subprocess.run([*manage, *command], cwd=ROOT, env=env, check=True, timeout=300)
    port = free_port()
    process = subprocess.Popen(
        [*manage, "run_platform", "--port", str(port)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    output = Output(process.stdout)
    replica_pids: set[int] = set()
    try:
        output.wait_for("Press Ctrl-C to stop", timeout=120)
        assert f"http://127.0.0.1:{port}/" in output.text()
        assert "Login:    demo@example.com / " in output.text()
        key = re.search(r"API key:\s+(sk-\S+)", output.text()).group(1)
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/api/v1/organizations/current",
            headers={"Authorization": f"Bearer {key}"},
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            assert json.load(response)["slug"] == "demo"
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=10) as response:
            assert json.load(response)["checks"] == {"database": "ok", "broker": "ok"}
        deadline = time.monotonic() + 120
        while chat(port, key) != 200:
            assert time.monotonic() < deadline, output.text()[-6000:]
            time.sleep(1)
        # The demo's chat pool keeps one replica; its embedding pool starts from zero.
        (replica,) = [r["pid"] for r in _replicas(tmp_path)]
        replica_pids.add(replica)

        # The worker dies: the web server and the replica go on serving; the worker is back.
        killed_at = time.monotonic()
        os.kill(worker_pid(process.pid), signal.SIGKILL)
        statuses = []
        while time.monotonic() - killed_at < 5:
            statuses.append(chat(port, key))
        assert statuses and set(statuses) == {200}, statuses
        back_at = output.wait_for("celery@", "ready.", since=killed_at, timeout=30)
        assert "worker process exited with signal 9 (SIGKILL)" in output.text()
        assert back_at - killed_at <= 5.0, f"worker back after {back_at - killed_at:.1f} s"
        assert _alive(replica), "the replica outlives its worker"
        # The new worker adopts it rather than starting a second one.
        time.sleep(3)
        assert [r["pid"] for r in _replicas(tmp_path)] == [replica]
        assert chat(port, key) == 200

        # The web server dies: it comes back on the same port.
        web = next(
            pid
            for pid, (ppid, _) in tree(process.pid).items()
            if ppid == process.pid and b"uvicorn" in Path(f"/proc/{pid}/cmdline").read_bytes()
        )
        killed_at = time.monotonic()
        os.kill(web, signal.SIGKILL)
        output.wait_for("Restarted the web process", since=killed_at, timeout=10)
        deadline = time.monotonic() + 60
        while chat(port, key) != 200:
            assert time.monotonic() < deadline, output.text()[-6000:]
            time.sleep(0.5)

        # The adopted replica dies: its worker is gone, so it was re-parented to run_platform
        # (a child subreaper), which reaps it. (A replica that dies under the worker that
        # started it is reaped there: tests/deployments/test_local_provisioner.py.)
        os.kill(replica, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while Path(f"/proc/{replica}").exists():
            assert time.monotonic() < deadline, "the killed replica is still a zombie"
            time.sleep(0.05)
        assert zombies(process.pid) == []

        # The worker's embedded beat dies: the worker would go on without periodic tasks (and
        # with a zombie), so run_platform restarts the worker, beat included.
        worker = worker_pid(process.pid)
        [beat] = [pid for pid in tree(process.pid) if _title(pid).startswith("[celery beat]")]
        killed_at = time.monotonic()
        os.kill(beat, signal.SIGKILL)
        output.wait_for("embedded beat is gone", since=killed_at, timeout=40)
        output.wait_for("celery@", "ready.", since=killed_at, timeout=30)
        deadline = time.monotonic() + 15
        while not [
            p
            for p, (ppid, state) in tree(process.pid).items()
            if ppid != worker and state != "Z" and _title(p).startswith("[celery beat]")
        ]:
            assert time.monotonic() < deadline, "no beat under the new worker"
            time.sleep(0.2)
        assert zombies(process.pid) == []

        assert process.poll() is None, "nothing above stopped the platform"
        children = list(tree(process.pid))  # web, worker, pool, beat, any replica
        process.send_signal(signal.SIGINT)
        process.wait(timeout=90)
        output._thread.join(10)
        assert process.returncode == 0, output.text()[-6000:]
        assert "Stopped." in output.text()
        replica_pids |= {r["pid"] for r in _replicas(tmp_path) if r["pid"]}
        assert [pid for pid in replica_pids if Path(f"/proc/{pid}").exists()] == []
        assert [pid for pid in children if Path(f"/proc/{pid}").exists()] == [], "all stopped"
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        for pid in replica_pids | {r["pid"] for r in _replicas(tmp_path) if r["pid"]}:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)


def _replicas(var: Path) -> list[dict]:
    replicas = []
    for path in var.glob("replicas/*/state.json"):
        with contextlib.suppress(OSError, ValueError):
            replicas += json.loads(path.read_text())["replicas"]
    return replicas


def _title(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return ""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")
