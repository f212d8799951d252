import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import torch

from runtime.tiny_moe import build_tiny_moe

REPO_ROOT = Path(__file__).resolve().parents[2]
SERVED_NAME = "tiny-moe"


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """In-process models run on one thread, as the servers under test do (--cpu-threads 1):
    OpenMP threads spinning on a shared 2-core machine make these tests ten times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_moe_dir(tmp_path_factory) -> Path:
    """The tiny MoE checkpoint, built once per test session."""
    return build_tiny_moe(tmp_path_factory.mktemp("tiny-moe"))


@dataclass
class RuntimeProcess:
    process: subprocess.Popen
    log_path: Path
    url: str = ""

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_until_ready(self, timeout: float = 120) -> None:
        _wait_until_ready(self, timeout)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def _start_runtime(model: str, log_path: Path, *extra: str, env: dict | None = None):
    """Start `python -m runtime serve` on a free loopback port; return once it logs the port."""
    command = [
        sys.executable,
        "-m",
        "runtime",
        "serve",
        "--model",
        model,
        "--served-model-name",
        SERVED_NAME,
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--device",
        "cpu",
        "--cpu-threads",
        "1",
        *extra,
    ]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            command,
            cwd=REPO_ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"},
        )
    runtime = RuntimeProcess(process, log_path)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and process.poll() is None:
        found = re.search(r"serving \S+ on (http://127\.0\.0\.1:\d+)", runtime.log())
        if found:
            runtime.url = found.group(1)
            return runtime
        time.sleep(0.1)
    runtime.stop()
    raise AssertionError(f"the runtime did not start listening:\n{runtime.log()}")


def _wait_until_ready(runtime: RuntimeProcess, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if runtime.process.poll() is not None:
            raise AssertionError(f"the runtime exited:\n{runtime.log()}")
        try:
            if httpx.get(f"{runtime.url}/health", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"the runtime never became ready:\n{runtime.log()}")


@pytest.fixture(scope="module")
def runtime_server(tiny_moe_dir, tmp_path_factory):
    """One real runtime process on loopback serving the tiny MoE, shared by a test module."""
    log_path = tmp_path_factory.mktemp("runtime") / "runtime.log"
    runtime = _start_runtime(str(tiny_moe_dir), log_path, "--max-num-seqs", "16")
    try:
        _wait_until_ready(runtime)
        yield runtime
    finally:
        runtime.stop()


@pytest.fixture
def launch_runtime():
    """Start runtime processes in a test (`launch_runtime(model, log_path, *args, env=...)`);
    each is stopped when the test ends. `.wait_until_ready()` waits for /health to say 200."""
    started = []

    def launch(model: str, log_path: Path, *extra: str, env: dict | None = None):
        runtime = _start_runtime(model, log_path, *extra, env=env)
        started.append(runtime)
        return runtime

    yield launch
    for runtime in started:
        runtime.stop()
