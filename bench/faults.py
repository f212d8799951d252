"""Faults injected into a running platform (embedded default: web + a real Celery worker with
beat, SQLite database and broker, local model replicas of mixtral-tiny), and how fast it heals.

    python bench/faults.py                      # every scenario
    python bench/faults.py --scenario replica-kill [--scenario worker-kill-mid-pass ...]

Scenarios (one function each; `SCENARIOS` maps a name to it, so others can add theirs):

* `replica-kill`: a single-replica dedicated deployment serving; its replica is killed with
  SIGKILL while a client calls the gateway back to back. Reports the seconds until the gateway
  serves it again (goal ≤ 3 s), the seconds until its status stopped saying "ready" (the
  detection delay), whether it said "ready" again before a replica answered, the 502/503s
  meanwhile, and how long the restarted runtime itself took to load.
* `worker-kill-mid-pass`: a new deployment's first passes; the worker is killed with SIGKILL
  (process group) while a pass holds the lease and right after its replica was spawned; a new
  worker is started. Reports the seconds from the new worker being ready to the deployment
  being ready (goal ≤ 15 s), and checks the replica the dead pass spawned was adopted (one
  process, not two) and billed from its start.
* `gpu-time`: a deployment's replica is killed (restart), then the worker is stopped and every
  replica stopped as `make run`'s Ctrl-C does, left stopped for --gap seconds, and the worker
  started again. Reports billed GPU time (ReplicaUsage rows) against the running time observed
  from outside (process start from the kernel, exit polled every 5 ms) (goal: within 1 s), and
  that the rows never overlap.

* `embedded-worker-kill`: `run_platform` itself (as `make run` starts it: the demo's
  mixtral-tiny replica) serving chat completions back to back while its Celery worker is killed
  with SIGKILL, --kills times. Reports per kill the seconds until the supervisor restarted the
  worker and until the new worker was ready (goal ≤ 5 s), the chat answers meanwhile (goal:
  all 200), and that the replica was kept (same pid); what a fresh-interpreter worker start
  costs on the same machine, for comparison; web serving again after its kill -9; zombies below
  run_platform; and that Ctrl-C stops everything, replicas included.

Writes bench/results/faults.json.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import platform as host
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from datetime import UTC, datetime
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from deployments.provisioners.local import process_started_at, stop_all  # noqa: E402
from tests.deployments.platform import Platform, ProcessLife, alive, free_port  # noqa: E402


def log(message: str) -> None:
    print(f"[{datetime.now(UTC):%H:%M:%S}] {message}", flush=True)


def _logged_at(path: Path, pattern: str, *, after: float) -> float | None:
    """Wall-clock time of the first line of a log (Python's `%(asctime)s`, this machine's
    local time) matching `pattern` and logged after `after`."""
    with contextlib.suppress(OSError):
        for line in path.read_text(errors="replace").splitlines():
            stamp = re.match(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ", line)
            if stamp and re.search(pattern, line):
                at = datetime.strptime(stamp[1], "%Y-%m-%d %H:%M:%S,%f").timestamp()
                if at >= after:
                    return at
    return None


class _StatusWatch:
    """Polls the deployment's status and its replicas' readiness in the database every 10 ms
    from a thread: when it stopped saying ready, and when a replica was listed ready again."""

    def __init__(self, platform: Platform, deployment_id: str):
        self.not_ready_at: float | None = None
        self.listed_ready_at: float | None = None
        self._stop = threading.Event()

        def follow() -> None:
            while not self._stop.is_set():
                state = platform.deployment(deployment_id)
                now = time.time()
                if self.not_ready_at is None and (
                    state["status"] != "ready" or not state["ready_replicas"]
                ):
                    self.not_ready_at = now
                elif self.not_ready_at is not None and self.listed_ready_at is None:
                    [(ready,)] = platform.query(
                        "SELECT COUNT(*) FROM deployments_replica WHERE deployment_id = ? "
                        "AND ready",
                        deployment_id.replace("-", ""),
                    )
                    if ready:
                        self.listed_ready_at = now
                self._stop.wait(0.01)

        self._thread = threading.Thread(target=follow, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def replica_kill(platform: Platform, args) -> dict:
    deployment_id = platform.deploy("killed")
    platform.wait_ready(deployment_id)
    while platform.chat("killed") != 200:  # the gateway's route has the replica
        time.sleep(0.1)
    time.sleep(1.0)  # the passes of its start are over
    [pid] = platform.replica_pids(deployment_id)
    folder = platform.folder / "replicas" / deployment_id
    # A replica that has run a while: its warm standby has imported the runtime (see
    # deployments/provisioners/local.py; a crash in its first seconds meets a cold one).
    deadline = time.monotonic() + 120
    while "standby: imported" not in "".join(p.read_text() for p in folder.glob("*.log")):
        if time.monotonic() > deadline:
            raise RuntimeError("the replica's standby never finished its imports")
        time.sleep(0.1)
    codes: dict[int, int] = {}
    ready_again_early = replacement_at = None
    status = _StatusWatch(platform, deployment_id)
    killed = time.monotonic()
    killed_wall = time.time()
    os.kill(pid, signal.SIGKILL)
    while True:
        code = platform.chat("killed", timeout=5)
        now = time.monotonic() - killed
        if code == 200:
            served_at = now
            break
        codes[code] = codes.get(code, 0) + 1
        state = platform.deployment(deployment_id)
        if replacement_at is None:
            replacement = [p for p in platform.replica_pids(deployment_id) if p != pid]
            if replacement:
                # When the replacement got its turn (a standby's process started earlier).
                replacement_at = time.time() - killed_wall
        if (
            status.not_ready_at is not None
            and state["status"] == "ready"
            and not platform.replica_answers(deployment_id)
        ):
            ready_again_early = now
        if now > 120:
            raise RuntimeError("not serving again within 120 s")
        time.sleep(0.02)
    time.sleep(0.5)
    status.stop()
    logs = sorted(folder.glob("*.log"))
    loads = [line for log in logs for line in log.read_text().splitlines() if "ready in" in line]
    events = [e for e in platform.events(deployment_id) if "exited" in e[1]]
    exit_record = {}
    for path in folder.glob("*.exit"):
        with contextlib.suppress(OSError, ValueError):
            record = json.loads(path.read_text())
            if record.get("pid") == pid:
                exit_record = record

    def since_kill(moment: float | None) -> float | None:
        return round(moment - killed_wall, 3) if moment is not None else None

    worker_log = platform.folder / "worker.log"
    [replica_log] = logs or [Path("/nonexistent")]
    return {
        "serving_again_seconds": round(served_at, 2),
        "goal_seconds": 3.0,
        # Each stage, in seconds after the kill (wall clock; logs have millisecond stamps).
        "stages": {
            "exit_noticed": since_kill(exit_record.get("exited_at")),
            "restart_pass_began": since_kill(
                _logged_at(worker_log, r"reconcile \S+: replica .* exited", after=killed_wall)
            ),
            "replacement_seen_in_state": round(replacement_at, 3)
            if replacement_at is not None
            else None,
            "replacement_started": since_kill(
                _logged_at(worker_log, r"started replica", after=killed_wall)
            ),
            "runtime_listening": since_kill(
                _logged_at(replica_log, r"INFO runtime.server: serving", after=killed_wall)
            ),
            "runtime_ready": since_kill(_logged_at(replica_log, r"ready in", after=killed_wall)),
            "status_not_ready": since_kill(status.not_ready_at),
            "replica_listed_ready_again": since_kill(status.listed_ready_at),
            "gateway_serving": round(served_at, 3),
        },
        "status_said_ready_with_no_replica_at": ready_again_early,
        "failed_requests_meanwhile": codes,
        "runtime_load_lines": loads[-2:],
        "restart_event": events[-1] if events else None,
    }


def worker_kill_mid_pass(platform: Platform, args) -> dict:
    deployment_id = platform.deploy("midpass")
    # Mid-pass: a pass holds the lease, and the replica it spawned is recorded.
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if platform.replica_pids(deployment_id) and platform.deployment(deployment_id)["lease"]:
            break
        time.sleep(0.002)
    else:
        raise RuntimeError("never caught a pass holding the lease after a spawn")
    spawned = platform.replica_pids(deployment_id)
    platform.kill_worker()
    killed = time.time()
    state_at_kill = platform.deployment(deployment_id)
    log(f"worker killed mid-pass ({state_at_kill}); replica pids {spawned}; starting a new one")
    platform.start_worker()
    worker_up = platform.worker_ready_at
    platform.wait_ready(deployment_id, timeout=300)
    converged = time.time()
    pids = platform.replica_pids(deployment_id)
    usage = platform.replica_usage(deployment_id)
    started = process_started_at(spawned[0]) if spawned and alive(spawned[0]) else None
    return {
        "lease_held_when_killed": bool(state_at_kill["lease"]),
        "worker_start_seconds": round(worker_up - killed, 2),
        "converged_after_worker_ready_seconds": round(converged - worker_up, 2),
        "converged_after_kill_seconds": round(converged - killed, 2),
        "goal_seconds": 15.0,
        "replica_adopted_not_duplicated": pids == spawned,
        "gpu_time_starts_at_process_start_error_seconds": (
            round(usage[0][1] - started, 3) if usage and started else None
        ),
    }


def gpu_time(platform: Platform, args) -> dict:
    deployment_id = platform.deploy("billed")
    life = ProcessLife(platform.folder / "replicas" / deployment_id)
    try:
        platform.wait_ready(deployment_id)
        time.sleep(2)
        killed = platform.replica_pids(deployment_id)
        os.kill(killed[0], signal.SIGKILL)  # a crash: restarted at once, a gap in GPU time
        platform.wait_replaced(deployment_id, killed)
        time.sleep(2)
        stopped = platform.replica_pids(deployment_id)
        platform.stop_worker()  # make run's Ctrl-C: the worker goes, then every replica
        stop_all(platform.folder / "replicas")
        log(f"stopped; starting again in {args.gap} s")
        time.sleep(args.gap)
        platform.start_worker()
        platform.wait_replaced(deployment_id, stopped, timeout=300)
        time.sleep(2)
        platform.delete(deployment_id)  # its last run ends
    finally:
        life.stop()
    until = time.time()
    usage = platform.replica_usage(deployment_id)
    billed = sum((ended or until) - started for _, started, ended in usage)
    observed = life.seconds(until=until)
    overlaps = sum(
        1
        for (name_a, _, end_a), (name_b, start_b, _) in itertools.pairwise(usage)
        if name_a == name_b and (end_a is None or end_a > start_b)
    )
    return {
        "runs_observed": len(life.runs),
        "gpu_time_rows": len(usage),
        "observed_running_seconds": round(observed, 3),
        "billed_seconds": round(billed, 3),
        "difference_seconds": round(billed - observed, 3),
        "goal_seconds": 1.0,
        "overlapping_rows": overlaps,
        "per_run": [
            {
                "observed": [round(run.started, 3), round(run.ended or until, 3)],
                "billed": [round(started, 3), round(ended or until, 3)],
            }
            for run, (_, started, ended) in zip(
                sorted(life.runs.values(), key=lambda run: run.started), usage, strict=False
            )
        ],
    }


# --- embedded-worker-kill: run_platform itself, as `make run` starts it -------------------


def _children(parent: int) -> dict[int, str]:
    """pid → command line (as `ps` shows it) of the processes whose parent is `parent`."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            if int(stat.rsplit(")", 1)[-1].split()[1]) == parent:
                found[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ")
        except (OSError, ValueError, IndexError):
            continue
    return {pid: command.decode(errors="replace") for pid, command in found.items()}


def _zombies_below(root: int) -> list[int]:
    zombies, frontier, seen = [], [root], set()
    while frontier:
        parent = frontier.pop()
        for pid in _children(parent):
            if pid in seen:
                continue
            seen.add(pid)
            frontier.append(pid)
            try:
                state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0]
            except OSError:
                continue
            if state == "Z":
                zombies.append(pid)
    return zombies


class _Output:
    """run_platform's merged output, read on a thread, each line with when it was read."""

    def __init__(self, stream):
        self.lines: list[tuple[float, str]] = []
        threading.Thread(target=self._read, args=(stream,), daemon=True).start()

    def _read(self, stream):
        for line in stream:
            self.lines.append((time.monotonic(), line))

    def first(self, pattern: str, *, since: float, timeout: float) -> float | None:
        """When the first line matching `pattern` (a regular expression) after `since` was
        read."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for at, line in list(self.lines):
                if at >= since and re.search(pattern, line):
                    return at
            time.sleep(0.02)
        return None

    def text(self) -> str:
        return "".join(line for _, line in self.lines)


def _chat(port: int, key: str, timeout: float = 10) -> int:
    """The demo's chat completion through run_platform's gateway: the HTTP status."""
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
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code
    except OSError:
        return 0


def _fresh_worker_start_seconds(env: dict, folder: Path) -> float:
    """What a restart cost before run_platform forked its worker: a new interpreter importing
    Django and Celery and booting a worker (on a queue nothing uses, without beat, so it does
    not disturb the platform), from spawn to its "ready." line."""
    started = time.monotonic()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "controlplane",
            "worker",
            "--queues",
            "bench-unused",
            "--concurrency",
            "2",
            "--loglevel",
            "INFO",
            "--hostname",
            "bench-fresh@%h",
        ],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        for line in process.stdout:
            if "ready." in line:
                return time.monotonic() - started
        raise RuntimeError("the fresh worker exited before it was ready")
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def embedded_worker_kill(folder: Path, args) -> dict:
    """`make run`'s platform (run_platform: web + worker with beat, the demo's mixtral-tiny
    replica) serving chat completions back to back while its Celery worker is killed with
    SIGKILL, --kills times. Reports per kill the seconds until run_platform restarted the worker
    and until the new worker was ready (goal ≤ 5 s), the chat answers meanwhile (goal: all 200),
    whether the replica was kept (adopted, same pid); then what a fresh-interpreter worker start
    costs on the same machine (the restart before run_platform forked its worker), web's
    recovery after kill -9, zombies below run_platform, and that Ctrl-C stops everything."""
    env = {
        **{
            k: v
            for k, v in os.environ.items()
            if k not in {"DATABASE_URL", "CELERY_BROKER_URL", "REDIS_URL", "ARTIFACT_STORE_URL"}
        },
        "SECRET_KEY": "bench-faults-" + "x" * 40,
        "SIROCCO_VAR_DIR": str(folder),
        "SIROCCO_DEMO_PASSWORD": "bench-password-1",
        "SIROCCO_PROVISIONER": "local",
        "PYTHONUNBUFFERED": "1",
        "LOG_FORMAT": "text",
    }
    manage = [sys.executable, "manage.py"]
    for command in (["migrate", "--noinput", "-v0"], ["bootstrap_demo"]):
        subprocess.run(
            [*manage, *command],
            cwd=REPO_ROOT,
            env=env,
            check=True,
            capture_output=True,
            timeout=600,
        )
    port = free_port()
    process = subprocess.Popen(
        [*manage, "run_platform", "--port", str(port)],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    output = _Output(process.stdout)
    result: dict = {"kills": []}
    try:
        if output.first("Press Ctrl-C to stop", since=0, timeout=180) is None:
            raise RuntimeError(output.text()[-4000:])
        key = re.search(r"API key:\s+(sk-\S+)", output.text()).group(1)
        deadline = time.monotonic() + 180
        while _chat(port, key) != 200:
            if time.monotonic() > deadline:
                raise RuntimeError("the demo replica never served")
            time.sleep(0.5)
        # The chat model's replica (the demo may run others: an embedding model's).
        [state_path] = [
            path
            for path in folder.glob("replicas/*/state.json")
            if any(
                r["name"].startswith("mixtral-tiny")
                for r in json.loads(path.read_text())["replicas"]
            )
        ]
        replica_pid = json.loads(state_path.read_text())["replicas"][0]["pid"]
        log(f"embedded-worker-kill: serving on :{port}, replica pid {replica_pid}")

        for kill in range(args.kills):
            time.sleep(args.settle)  # let the new worker finish its start-up passes
            [worker] = [
                pid for pid, command in _children(process.pid).items() if "celery" in command
            ]
            codes: dict[int, int] = {}
            stop = threading.Event()

            def client(codes=codes, stop=stop):
                while not stop.is_set():
                    code = _chat(port, key)
                    codes[code] = codes.get(code, 0) + 1

            caller = threading.Thread(target=client, daemon=True)
            caller.start()
            time.sleep(1.0)
            killed = time.monotonic()
            os.kill(worker, signal.SIGKILL)
            restarted = output.first("Restarted the worker process", since=killed, timeout=30)
            ready = output.first(r"celery@\S+ ready\.", since=killed, timeout=60)
            time.sleep(2.0)  # keep calling a little past the worker's return
            stop.set()
            caller.join(30)
            state = json.loads(state_path.read_text())
            entry = {
                "restarted_s": round(restarted - killed, 2) if restarted else None,
                "worker_ready_s": round(ready - killed, 2) if ready else None,
                "chat_answers": {str(code): count for code, count in sorted(codes.items())},
                "replica_kept": [r["pid"] for r in state["replicas"]] == [replica_pid],
                "load_average": os.getloadavg(),
            }
            log(f"embedded-worker-kill: kill {kill + 1}: {json.dumps(entry)}")
            result["kills"].append(entry)

        result["fresh_worker_start_s"] = round(_fresh_worker_start_seconds(env, folder), 2)
        log(f"embedded-worker-kill: a fresh worker start: {result['fresh_worker_start_s']} s")

        [web] = [pid for pid, command in _children(process.pid).items() if "uvicorn" in command]
        killed = time.monotonic()
        os.kill(web, signal.SIGKILL)
        while _chat(port, key, timeout=2) != 200:
            time.sleep(0.05)
        result["web_serving_again_s"] = round(time.monotonic() - killed, 2)
        time.sleep(2.0)
        result["zombies_below_run_platform"] = len(_zombies_below(process.pid))
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=90)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    time.sleep(0.5)
    result["stopped_cleanly"] = process.returncode == 0 and "Stopped." in output.text()
    leftovers = [
        r["pid"]
        for path in folder.glob("replicas/*/state.json")
        for r in json.loads(path.read_text())["replicas"]
        if r["pid"] and Path(f"/proc/{r['pid']}").exists()
    ]
    result["replicas_left_running"] = len(leftovers)
    ready = [k["worker_ready_s"] for k in result["kills"] if k["worker_ready_s"] is not None]
    result["worker_ready_s_max"] = max(ready) if ready else None
    result["goal_worker_back_5s_met"] = (
        bool(ready) and max(ready) <= 5.0 and len(ready) == len(result["kills"])
    )
    result["goal_all_chats_200"] = all(set(k["chat_answers"]) == {"200"} for k in result["kills"])
    return result


SCENARIOS = {
    "replica-kill": replica_kill,
    "worker-kill-mid-pass": worker_kill_mid_pass,
    "gpu-time": gpu_time,
}
# Scenarios that start their platform themselves (`run_platform`, the supervisor under test),
# given an empty folder for it.
OWN_PLATFORM = {
    "embedded-worker-kill": embedded_worker_kill,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--scenario",
        action="append",
        choices=sorted(SCENARIOS | OWN_PLATFORM),
        help="run only this scenario (repeatable); all by default",
    )
    parser.add_argument("--gap", type=float, default=10.0, help="gpu-time: seconds stopped")
    parser.add_argument("--kills", type=int, default=3, help="embedded-worker-kill: how many times")
    parser.add_argument(
        "--settle",
        type=float,
        default=12.0,
        help="embedded-worker-kill: seconds between kills (over run_platform's 10 s after which "
        "a restarted child counts as healthy, so each kill is a first crash, restarted at once)",
    )
    args = parser.parse_args()
    chosen = args.scenario or [*SCENARIOS, *OWN_PLATFORM]
    results = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{host.node()} {host.machine()}, {os.cpu_count()} CPUs",
        "load_average_before": os.getloadavg(),
        "scenarios": {},
    }
    for name in chosen:
        with tempfile.TemporaryDirectory(prefix=f"faults-{name}-") as folder:
            log(f"{name}: starting a platform in {folder}")
            if name in OWN_PLATFORM:
                started = time.monotonic()
                result = OWN_PLATFORM[name](Path(folder), args)
            else:
                with Platform(Path(folder)) as platform:
                    started = time.monotonic()
                    result = SCENARIOS[name](platform, args)
            result["load_average"] = os.getloadavg()
            result["wall_seconds"] = round(time.monotonic() - started, 1)
            log(f"{name}: {json.dumps(result)}")
            results["scenarios"][name] = result
    out = REPO_ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "faults.json").write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
