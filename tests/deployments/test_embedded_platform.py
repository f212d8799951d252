"""The embedded default for real: `bootstrap_demo` defines the mixtral-tiny and embed-tiny pools,
`run_platform` starts the web server and a Celery worker (SQLite broker, beat embedded); the
worker reconciles the chat pool into a local runtime process and the gateway answers a chat
completion with it; the first embeddings call scales the embedding pool from zero and is
answered; Ctrl-C stops every child, the model replicas included."""

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from deployments.provisioners.local import _process_state

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.slow, pytest.mark.nodb]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def chat(port: int, key: str) -> tuple[int, dict]:
    body = {
        "model": "mixtral-tiny",
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 3,
    }
    return call(port, key, "/v1/chat/completions", body)


def call(port: int, key: str, path: str, body: dict, timeout: float = 60) -> tuple[int, dict]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}",
        data=json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as error:
        return error.code, {"body": error.read().decode(errors="replace")[:2000]}


def replica_pids(var: Path) -> list[int]:
    pids = []
    for state in var.glob("replicas/*/state.json"):
        pids += [r["pid"] for r in json.loads(state.read_text())["replicas"] if r["pid"]]
    return pids


def test_make_run_serves_mixtral_tiny_from_a_local_replica_and_stops_it(tmp_path):
    env = {
        **{
            k: v
            for k, v in os.environ.items()
            if k not in {"DATABASE_URL", "CELERY_BROKER_URL", "REDIS_URL", "ARTIFACT_STORE_URL"}
        },
        "SECRET_KEY": "embedded-platform-test-key-" + "x" * 30,
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
    lines = []
    try:
        while True:
            line = process.stdout.readline()
            assert line, "".join(lines)
            lines.append(line)
            if "Press Ctrl-C to stop" in line:
                break
        key = next(line.split()[-1] for line in lines if "API key:" in line)

        deadline = time.monotonic() + 120
        status, body = 0, {}
        while time.monotonic() < deadline:
            status, body = chat(port, key)
            if status == 200:
                break
            time.sleep(1)
        assert status == 200, (body, "".join(lines))
        assert body["usage"]["completion_tokens"] > 0
        assert len(replica_pids(tmp_path)) == 1, "the chat pool's replica, by the Celery worker"

        # The embedding pool runs nothing until asked: the first call waits for its replica
        # to start from zero and is answered, not refused.
        status, body = call(
            port, key, "/v1/embeddings", {"model": "embed-tiny", "input": "Hi"}, 150
        )
        assert status == 200, (body, "".join(lines))
        assert body["usage"]["prompt_tokens"] > 0 and len(body["data"]) == 1
        pids = replica_pids(tmp_path)
        assert len(pids) == 2

        process.send_signal(signal.SIGINT)
        rest, _ = process.communicate(timeout=90)
        assert process.returncode == 0, rest
        assert "Stopped 2 local model replica(s)." in rest
        # Dead: gone, or a zombie left to whoever adopted it (a container's init may not reap).
        assert all(_process_state(pid) in (None, "Z") for pid in pids)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        for pid in replica_pids(tmp_path):  # never leave a runtime behind, even on failure
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
