"""`make run`'s last step for real: web server + Celery worker with beat, then Ctrl-C."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.slow, pytest.mark.nodb]


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_run_platform_serves_prints_credentials_and_stops_cleanly(tmp_path):
    env = {
        **{
            k: v
            for k, v in os.environ.items()
            if k not in {"DATABASE_URL", "CELERY_BROKER_URL", "REDIS_URL"}
        },
        "SECRET_KEY": "run-platform-test-key-" + "x" * 30,
        "SIROCCO_VAR_DIR": str(tmp_path),
        "SIROCCO_DEMO_PASSWORD": "demo-pass-123",
        "PYTHONUNBUFFERED": "1",
        "LOG_FORMAT": "text",
    }
    manage = [sys.executable, "manage.py"]
    subprocess.run(
        [*manage, "migrate", "--noinput", "-v0"], cwd=ROOT, env=env, check=True, timeout=300
    )
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
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = process.stdout.readline()
            if not line:
                break
            lines.append(line)
            if "Press Ctrl-C to stop" in line:
                break
        output = "".join(lines)
        assert f"http://127.0.0.1:{port}/" in output, output
        assert "demo@example.com / demo-pass-123" in output
        key = re.search(r"API key:\s+(sk-\S+)", output).group(1)

        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/api/v1/organizations/current",
            headers={"Authorization": f"Bearer {key}"},
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            assert json.load(response)["slug"] == "demo"
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=10) as response:
            assert json.load(response)["checks"] == {"database": "ok", "broker": "ok"}

        children = subprocess.run(
            ["pgrep", "-f", f"(uvicorn.*--port {port})|(celery.*{tmp_path})"],
            capture_output=True,
            text=True,
        ).stdout.split()
        assert children, "the web server and the worker run as child processes"
        process.send_signal(signal.SIGINT)
        rest, _ = process.communicate(timeout=60)
        assert process.returncode == 0, rest
        assert "Stopped." in rest
        time.sleep(0.5)
        alive = [
            pid
            for pid in children
            if Path(f"/proc/{pid}").exists()
            and "zombie" not in Path(f"/proc/{pid}/status").read_text().lower()
        ]
        assert alive == [], "every child stopped"
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
