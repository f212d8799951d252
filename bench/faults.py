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

Writes bench/results/faults.json.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform as host
import signal
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from deployments.provisioners.local import process_started_at, stop_all  # noqa: E402
from tests.deployments.platform import Platform, ProcessLife, alive  # noqa: E402


def log(message: str) -> None:
    print(f"[{datetime.now(UTC):%H:%M:%S}] {message}", flush=True)


def replica_kill(platform: Platform, args) -> dict:
    deployment_id = platform.deploy("killed")
    platform.wait_ready(deployment_id)
    while platform.chat("killed") != 200:  # the gateway's route has the replica
        time.sleep(0.1)
    [pid] = platform.replica_pids(deployment_id)
    codes: dict[int, int] = {}
    not_ready_at = ready_again_early = replacement_at = None
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
        if not_ready_at is None and state["status"] != "ready":
            not_ready_at = now
        if replacement_at is None:
            replacement = [p for p in platform.replica_pids(deployment_id) if p != pid]
            if replacement:
                replacement_at = (process_started_at(replacement[0]) or time.time()) - killed_wall
        if (
            not_ready_at is not None
            and state["status"] == "ready"
            and not any(alive(p) for p in platform.replica_pids(deployment_id))
        ):
            ready_again_early = now
        if now > 120:
            raise RuntimeError("not serving again within 120 s")
        time.sleep(0.02)
    if not_ready_at is None:
        # Recovered before the status was read even once: read what it went through.
        not_ready_at = served_at
    loads = [
        line
        for line in (platform.folder / "replicas" / deployment_id).glob("*.log")
        for line in line.read_text().splitlines()
        if "ready in" in line
    ]
    events = [e for e in platform.events(deployment_id) if "exited" in e[1]]
    return {
        "serving_again_seconds": round(served_at, 2),
        "goal_seconds": 3.0,
        "replacement_process_started_after_seconds": round(replacement_at, 2)
        if replacement_at is not None
        else None,
        "status_not_ready_after_seconds": round(not_ready_at, 2),
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
        [pid] = platform.replica_pids(deployment_id)
        os.kill(pid, signal.SIGKILL)  # a crash: restarted at once, a gap in GPU time
        time.sleep(0.5)
        platform.wait_ready(deployment_id)
        time.sleep(2)
        platform.stop_worker()  # make run's Ctrl-C: the worker goes, then every replica
        stop_all(platform.folder / "replicas")
        log(f"stopped; starting again in {args.gap} s")
        time.sleep(args.gap)
        platform.start_worker()
        platform.wait_ready(deployment_id, timeout=300)
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


SCENARIOS = {
    "replica-kill": replica_kill,
    "worker-kill-mid-pass": worker_kill_mid_pass,
    "gpu-time": gpu_time,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--scenario",
        action="append",
        choices=sorted(SCENARIOS),
        help="run only this scenario (repeatable); all by default",
    )
    parser.add_argument("--gap", type=float, default=10.0, help="gpu-time: seconds stopped")
    args = parser.parse_args()
    chosen = args.scenario or list(SCENARIOS)
    results = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{host.node()} {host.machine()}, {os.cpu_count()} CPUs",
        "load_average_before": os.getloadavg(),
        "scenarios": {},
    }
    for name in chosen:
        with tempfile.TemporaryDirectory(prefix=f"faults-{name}-") as folder:
            log(f"{name}: starting a platform in {folder}")
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
