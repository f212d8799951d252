"""`python -m runtime serve --standby SECONDS`: the warm standby the local provisioner keeps
beside a single replica (deployments/provisioners/local.py)."""

import socket
import subprocess
import sys
import time
import urllib.request

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.nodb]


def _standby(model, port: int, log):
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "runtime",
            "serve",
            "--model",
            str(model),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--standby",
            "0",
        ],
        stdin=subprocess.PIPE,
        stdout=log,
        stderr=subprocess.STDOUT,
    )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_for(log_path, text: str, process, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while text not in log_path.read_text():
        assert process.poll() is None, log_path.read_text()
        assert time.monotonic() < deadline, log_path.read_text()
        time.sleep(0.05)


def test_a_standby_imports_then_serves_only_when_told(tiny_moe_dir, tmp_path):
    port, log_path = _free_port(), tmp_path / "standby.log"
    with log_path.open("wb") as log:
        process = _standby(tiny_moe_dir, port, log)
    try:
        _wait_for(log_path, "standby: imported, waiting", process)
        with pytest.raises(OSError):  # nothing listens until it is told
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
        process.stdin.write(b"serve\n")
        process.stdin.flush()
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as r:
                    assert r.status == 200
                    break
            except OSError:
                assert process.poll() is None and time.monotonic() < deadline
                time.sleep(0.05)
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_a_standby_whose_input_ends_exits_without_serving(tiny_moe_dir, tmp_path):
    log_path = tmp_path / "standby.log"
    with log_path.open("wb") as log:
        process = _standby(tiny_moe_dir, _free_port(), log)
    process.stdin.close()  # its owner went away
    assert process.wait(timeout=120) == 0
    assert "serving" not in log_path.read_text()
