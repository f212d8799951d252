"""Faults against a real platform (tests/deployments/platform.py: web + a real Celery worker with
beat on the embedded default, local mixtral-tiny replicas): a replica killed with SIGKILL, a
worker killed in the middle of a pass, and GPU time across a crash and a stop.

Timing goals are asserted on what the platform controls (noticing, restarting, resuming); the
runtime's own start (seconds of torch import and loading on a loaded machine) is measured by
bench/faults.py, not asserted here.
"""

import itertools
import os
import signal
import time

import pytest

from deployments.provisioners.local import process_started_at, stop_all
from tests.deployments.platform import Platform, ProcessLife, alive

pytestmark = [pytest.mark.slow, pytest.mark.nodb]


@pytest.fixture(scope="module")
def platform(tmp_path_factory):
    with Platform(tmp_path_factory.mktemp("faults")) as running:
        yield running


def test_a_killed_single_replica_is_replaced_at_once_and_never_reported_ready_meanwhile(
    platform,
):
    deployment_id = platform.deploy("solo")
    platform.wait_ready(deployment_id)
    deadline = time.monotonic() + 30
    while platform.chat("solo") != 200:
        assert time.monotonic() < deadline, "the gateway never served it"
        time.sleep(0.2)
    [pid] = platform.replica_pids(deployment_id)
    killed = time.time()
    os.kill(pid, signal.SIGKILL)
    not_ready_at = replacement_started = None
    said_ready_with_none = []
    deadline = time.monotonic() + 120
    while platform.chat("solo", timeout=5) != 200:
        assert time.monotonic() < deadline, platform.events(deployment_id)[-5:]
        state = platform.deployment(deployment_id)
        if state["status"] != "ready" and not_ready_at is None:
            not_ready_at = time.time()
        replacement = [p for p in platform.replica_pids(deployment_id) if p != pid]
        if replacement and replacement_started is None:
            replacement_started = process_started_at(replacement[0])
        # (Before the platform noticed, its status could not know.)
        if (
            not_ready_at is not None
            and state["status"] == "ready"
            and not platform.replica_answers(deployment_id)
        ):
            said_ready_with_none.append(state)
        time.sleep(0.02)
    # The worker heard of the exit from the process itself, not from a sweep (every 30 s).
    assert replacement_started is not None and replacement_started - killed <= 3.0
    assert not_ready_at is not None and not_ready_at - killed <= 3.0
    assert said_ready_with_none == []
    restarts = [m for reason, m in platform.events(deployment_id) if reason == "ReplicaRestarted"]
    assert restarts and "exited with signal 9 (SIGKILL)" in restarts[-1]


def test_a_worker_killed_mid_pass_is_resumed_by_the_next_worker_and_its_replica_adopted(
    platform,
):
    deployment_id = platform.deploy("midpass")
    deadline = time.monotonic() + 120
    while not (
        platform.replica_pids(deployment_id) and platform.deployment(deployment_id)["lease"]
    ):
        assert time.monotonic() < deadline, "never caught a pass holding the lease"
        time.sleep(0.002)
    spawned = platform.replica_pids(deployment_id)
    platform.kill_worker()  # the whole worker, pool processes included
    assert platform.deployment(deployment_id)["status"] != "ready"
    platform.start_worker()
    # The stalled check (at the worker's start, then every 3 s) resumes it once the dead
    # pass's lease (8 s) ran out; then it waits for the runtime to load.
    resumed = None
    deadline = time.monotonic() + 120
    while platform.deployment(deployment_id)["status"] != "ready":
        assert time.monotonic() < deadline, platform.events(deployment_id)[-5:]
        if resumed is None and platform.deployment(deployment_id)["lease"]:
            resumed = time.time()
        time.sleep(0.01)
    resumed = resumed or time.time()
    assert resumed - platform.worker_ready_at <= 15.0
    assert platform.replica_pids(deployment_id) == spawned  # adopted, not started twice
    [(_name, billed_from, _ended)] = platform.replica_usage(deployment_id)
    assert abs(billed_from - process_started_at(spawned[0])) < 0.5


def test_gpu_time_is_billed_as_the_replica_ran_across_a_crash_and_a_stop(platform):
    deployment_id = platform.deploy("billed")
    life = ProcessLife(platform.folder / "replicas" / deployment_id)
    try:
        platform.wait_ready(deployment_id)
        killed = platform.replica_pids(deployment_id)
        os.kill(killed[0], signal.SIGKILL)  # restarted at once: a gap
        platform.wait_replaced(deployment_id, killed)
        stopped = platform.replica_pids(deployment_id)
        platform.stop_worker()  # make run's Ctrl-C: the worker, then every replica
        stop_all(platform.folder / "replicas")
        time.sleep(3)  # stopped: not billed
        platform.start_worker()  # brings them back at once (its start runs the sweep)
        platform.wait_replaced(deployment_id, stopped)
        platform.delete(deployment_id)  # its last run ends
    finally:
        life.stop()
    usage = platform.replica_usage(deployment_id)
    runs = sorted(life.runs.values(), key=lambda run: run.started)
    assert len(usage) == len(runs) == 3
    for (_name, started, ended), run in zip(usage, runs, strict=True):
        assert abs(started - run.started) < 0.5 and abs(ended - run.ended) < 0.5
    for (_, _, end), (_, start, _) in itertools.pairwise(usage):
        assert end <= start  # never overlapping
    billed = sum(ended - started for _, started, ended in usage)
    assert abs(billed - life.seconds(until=time.time())) < 1.0
    assert not any(alive(run.pid) for run in runs)
