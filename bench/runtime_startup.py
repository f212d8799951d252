"""Cold start of the builtin runtime: `python -m runtime serve` to the first 200 from /health.

    python bench/runtime_startup.py [--model DIR] [--starts 7] [--baseline REV]

Starts the runtime --starts times with the command line the local provisioner uses (tiny MoE
unless --model) and reports the median, min and max seconds from spawn to the first 200 from
/health (polled every 10 ms), and to the first answer of any status (the socket serving, /health
503 while the model loads). With --baseline REV, the runtime/ package of that git revision is
extracted into a temporary folder and started the same way with the same interpreter, its starts
taking turns with this tree's, so both columns saw the same load. Writes
bench/results/runtime_startup.json.
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def health(port: int) -> int | None:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
    try:
        connection.request("GET", "/health")
        return connection.getresponse().status
    except OSError:
        return None
    finally:
        connection.close()


def cold_start(source: Path, model: Path, timeout: float) -> dict:
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "runtime",
        "serve",
        "--model",
        str(model),
        "--served-model-name",
        "tiny-moe",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    env = {**os.environ, "PYTHONPATH": str(source)}
    started = time.monotonic()
    process = subprocess.Popen(
        command, cwd=source, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    first_answer = None
    try:
        while time.monotonic() - started < timeout:
            if process.poll() is not None:
                raise RuntimeError(f"the runtime in {source} exited with {process.returncode}")
            status = health(port)
            if status is not None and first_answer is None:
                first_answer = time.monotonic() - started
            if status == 200:
                return {"first_answer_s": first_answer, "healthy_s": time.monotonic() - started}
            time.sleep(0.01)
        raise RuntimeError(f"the runtime in {source} was not healthy within {timeout}s")
    finally:
        process.kill()
        process.wait()


def summary(starts: list[dict]) -> dict:
    healthy = [start["healthy_s"] for start in starts]
    answers = [start["first_answer_s"] for start in starts]
    return {
        "healthy_median_s": round(statistics.median(healthy), 3),
        "healthy_min_s": round(min(healthy), 3),
        "healthy_max_s": round(max(healthy), 3),
        "first_answer_median_s": round(statistics.median(answers), 3),
        "starts": starts,
    }


def extract_runtime(revision: str, into: Path) -> Path:
    archive = subprocess.run(
        ["git", "archive", revision, "runtime"], cwd=REPO_ROOT, check=True, capture_output=True
    ).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    return into


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="Mixtral folder (default: build the tiny MoE)")
    parser.add_argument("--starts", type=int, default=7, help="cold starts per runtime")
    parser.add_argument("--baseline", help="git revision whose runtime/ to compare against")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds to wait per start")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        scratch_dir = Path(scratch)
        model = args.model
        if model is None:
            from runtime.tiny_moe import build_tiny_moe

            model = build_tiny_moe(scratch_dir / "tiny-moe")
        sources = {"this tree": REPO_ROOT}
        if args.baseline:
            baseline_dir = extract_runtime(args.baseline, scratch_dir / "baseline")
            sources = {f"baseline {args.baseline}": baseline_dir, **sources}
        load_before = os.getloadavg()
        starts: dict[str, list[dict]] = {name: [] for name in sources}
        for _ in range(args.starts):
            for name, source in sources.items():  # turns: both see the same load
                starts[name].append(cold_start(source, model, args.timeout))
        load_after = os.getloadavg()

    results = {name: summary(runs) for name, runs in starts.items()}
    print(f"load average before {load_before}, after {load_after}; {args.starts} starts each")
    print(f"{'runtime':<24} {'/health 200 median':>19} {'min':>7} {'max':>7} {'first answer':>13}")
    for name, result in results.items():
        print(
            f"{name:<24} {result['healthy_median_s']:>18.2f}s {result['healthy_min_s']:>6.2f}s "
            f"{result['healthy_max_s']:>6.2f}s {result['first_answer_median_s']:>12.2f}s"
        )
    out = REPO_ROOT / "bench" / "results" / "runtime_startup.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "machine": f"{platform.node()} {platform.processor() or platform.machine()}, "
                f"{os.cpu_count()} CPUs",
                "load_average_before": load_before,
                "load_average_after": load_after,
                "results": results,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
