"""The local provisioner for real: `python -m runtime serve` processes serving mixtral-tiny.

One replica is started for the module and shared; the tests that break it leave it running.
"""

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import replace
from pathlib import Path

import pytest
from django.conf import settings

from deployments.provisioners.base import DeploymentSpec, ProfileSpec, RuntimeSpec
from deployments.provisioners.local import LocalProvisioner, LocalState, stop_all

pytestmark = [pytest.mark.slow, pytest.mark.nodb]
READY_TIMEOUT = 90


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    from runtime.tiny_moe import build_tiny_moe

    folder = tmp_path_factory.mktemp("mixtral-tiny")
    build_tiny_moe(folder, seed=0)
    return folder


@pytest.fixture(scope="module")
def local(tmp_path_factory) -> LocalProvisioner:
    return LocalProvisioner(tmp_path_factory.mktemp("replicas"), base_dir=settings.BASE_DIR)


def tiny_spec(model: Path, **changes) -> DeploymentSpec:
    spec = DeploymentSpec(
        deployment_id="11111111-2222-4333-8444-555555555555",
        name="tiny",
        organization_slug="acme",
        organization_gpu_quota=8,
        replicas=1,
        model_slug="mixtral-tiny",
        model_version="v1",
        served_model_name="mixtral-tiny",
        artifact_uri=str(model),
        weights_size_bytes=8_000_000,
        max_model_len=2048,
        runtime=RuntimeSpec(name="builtin", image="sirocco/runtime:0.1.0", port=8000),
        profile=ProfileSpec(name="cpu-small", cpu_request="2", memory_request="4Gi"),
    )
    return replace(spec, **changes)


def wait_ready(local, spec, timeout=READY_TIMEOUT):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        local.apply(spec)
        observation = local.observe(spec)
        if observation.rolled_out:
            return observation
        assert observation.failure is None, observation.failure
        time.sleep(0.3)
    log = "\n".join(p.read_text()[-2000:] for p in local.folder(spec).glob("*.log"))
    pytest.fail(f"not ready in {timeout} s; logs:\n{log}")


def chat(endpoint: str) -> dict:
    request = urllib.request.Request(
        f"{endpoint}/v1/chat/completions",
        data=json.dumps(
            {
                "model": "mixtral-tiny",
                "messages": [{"role": "user", "content": "Hello"}],
                "max_tokens": 4,
            }
        ).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)


@pytest.fixture(scope="module")
def running(local, tiny_model):
    spec = tiny_spec(tiny_model)
    observation = wait_ready(local, spec)
    yield spec, observation
    local.delete(spec)


def pid_of(local, spec) -> int:
    return LocalState.load(local.folder(spec) / "state.json").replicas[0].pid


def test_a_local_replica_serves_chat_completions(local, running):
    spec, observation = running
    [replica] = observation.replicas
    assert replica.ready and replica.endpoint.startswith("http://127.0.0.1:")
    answer = chat(replica.endpoint)
    assert answer["model"] == "mixtral-tiny"
    assert answer["usage"]["completion_tokens"] > 0
    log = (local.folder(spec) / f"{replica.name}.log").read_text()
    assert "starting on port" in log


def test_a_restarted_control_plane_adopts_live_replicas(local, running):
    spec, observation = running
    pid = pid_of(local, spec)
    restarted = LocalProvisioner(local.root, base_dir=settings.BASE_DIR)  # a fresh worker
    restarted.apply(spec)
    again = restarted.observe(spec)
    assert again.rolled_out
    assert pid_of(local, spec) == pid  # adopted, not restarted
    assert [r.endpoint for r in again.replicas] == [r.endpoint for r in observation.replicas]


def test_a_killed_replica_is_restarted_at_once_by_its_watcher_on_its_port(local, running):
    spec, before = running
    changes = []
    local.on_change = lambda deployment_id, why: changes.append((deployment_id, why))
    try:
        state = LocalState.load(local.folder(spec) / "state.json")
        killed_pid, port = state.replicas[0].pid, state.replicas[0].port
        started = state.replicas[0].started_at
        local.observe(spec)  # this process watches the replica it started
        killed = time.time()
        os.kill(killed_pid, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while not changes and time.monotonic() < deadline:
            time.sleep(0.01)
        # Restarted by the watcher before it reported the exit, with no pass (the kubelet's
        # way): the report only has the control plane record it.
        assert changes == [
            (spec.deployment_id, "replica tiny-000 exited with signal 9 (SIGKILL); restarted")
        ]
        # Reaped by the process that started it before any pass looks (a pass often runs in
        # another of the worker's pool processes, which cannot reap it: zombies, before).
        assert not Path(f"/proc/{killed_pid}").exists()
        record = json.loads((local.folder(spec) / "tiny-000.exit").read_text())
        assert record["pid"] == killed_pid and record["status"] == -9
        observation = local.observe(spec)
        [replica] = observation.replicas
        assert replica.restart_count == 1 and replica.running
        assert replica.running_since.timestamp() - killed < 1.0
        assert replica.last_exit.startswith("signal 9 (SIGKILL)")
        assert replica.port == port  # the gateway's cached route stays right
        assert pid_of(local, spec) != killed_pid
        # A single replica has a warm standby (the runtime imported), which took the turn.
        log = (local.folder(spec) / "tiny-000.log").read_text()
        assert f"--- starting on port {port}: its warm standby (pid {pid_of(local, spec)})" in log
        started_run, ended_run = replica.last_run
        assert abs(started_run.timestamp() - started) < 0.05
        assert abs(ended_run.timestamp() - record["exited_at"]) < 0.05
        assert replica.running_since > ended_run
        # The watcher reports the moment the new process answers.
        deadline = time.monotonic() + READY_TIMEOUT
        while len(changes) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert changes[1] == (spec.deployment_id, "replica tiny-000 answers again")
        observation = local.observe(spec)
        assert observation.rolled_out and observation.replicas[0].restart_count == 1
        assert observation.replicas[0].endpoint == before.replicas[0].endpoint
    finally:
        local.on_change = None


def test_a_stop_by_another_process_is_no_crash_to_the_watcher(local, running, tmp_path):
    spec, _ = running
    changes = []
    local.on_change = lambda deployment_id, why: changes.append((deployment_id, why))
    try:
        local.observe(spec)  # this process watches the replica
        pid = pid_of(local, spec)
        # make run's Ctrl-C, from another process (before: only the stopping process knew the
        # exit was expected; any other watcher warned and asked for a pass).
        subprocess.run(
            [
                sys.executable,
                "-c",
                "import sys; from deployments.provisioners.local import stop_all; "
                "sys.exit(stop_all(sys.argv[1]) != 1)",
                str(local.root),
            ],
            cwd=settings.BASE_DIR,
            check=True,
            timeout=60,
        )
        assert not Path(f"/proc/{pid}").exists()
        time.sleep(0.5)  # the watcher has long seen the exit
        assert changes == []
        assert LocalState.load(local.folder(spec) / "state.json").replicas[0].pid is None
    finally:
        local.on_change = None
    wait_ready(local, spec)  # the next pass starts it again


def test_stop_all_stops_replicas_and_the_next_apply_starts_them_without_a_crash(local, running):
    spec, _ = running
    pid = pid_of(local, spec)
    assert stop_all(local.root) == 1
    assert not Path(f"/proc/{pid}").exists()
    assert local.drifted({spec.deployment_id: spec}, {}) == {spec.deployment_id}
    observation = wait_ready(local, spec)
    assert observation.replicas[0].restart_count == 1  # unchanged by the clean stop
    assert pid_of(local, spec) != pid


def test_a_replica_that_keeps_crashing_fails_the_deployment(local, tiny_model, tmp_path):
    # A stand-in interpreter that dies at once, like a runtime whose CUDA is broken (a real
    # runtime takes seconds to import torch before it could fail).
    crashing = tmp_path / "python"
    crashing.write_text("#!/bin/sh\necho 'RuntimeError: CUDA error: no kernel image' >&2\nexit 3\n")
    crashing.chmod(0o755)
    broken_local = LocalProvisioner(local.root, base_dir=settings.BASE_DIR, python=str(crashing))
    broken = tiny_spec(
        tiny_model, deployment_id="99999999-2222-4333-8444-555555555555", name="broken"
    )
    from deployments.provisioners import local as local_module

    failure = None
    deadline = time.monotonic() + 30
    while failure is None and time.monotonic() < deadline:
        broken_local.apply(broken)
        # Skip the backoff waits: a real worker would just come back later.
        state = LocalState.load(broken_local.folder(broken) / "state.json")
        assert all(r.next_start_at - time.time() <= 2**r.restart_count for r in state.replicas)
        for replica in state.replicas:
            replica.next_start_at = 0
        state.save(broken_local.folder(broken) / "state.json")
        failure = broken_local.observe(broken).failure
        time.sleep(0.2)
    assert failure is not None
    assert f"({local_module.RESTARTS_TO_FAIL} restarts in a row)" in failure
    assert "exit code 3: " in failure and "CUDA error" in failure
    broken_local.delete(broken)
    assert not broken_local.folder(broken).exists()


def test_during_a_rolling_update_each_replica_says_the_version_it_was_started_with(
    local, tiny_model
):
    v1 = tiny_spec(tiny_model, deployment_id="aaaaaaaa-2222-4333-8444-555555555555", name="roll")
    v2 = replace(v1, model_version="v2")
    try:
        local.apply(v1)
        local.apply(v2)  # starts a v2 replica; the v1 one runs until the v2 one answers
        observation = local.observe(v2)
        assert {(r.revision, r.model_slug, r.model_version) for r in observation.replicas} == {
            (v1.revision(), "mixtral-tiny", "v1"),
            (v2.revision(), "mixtral-tiny", "v2"),
        }
        assert all(r.running for r in observation.replicas)
        observation = wait_ready(local, v2)
        assert [(r.model_slug, r.model_version) for r in observation.replicas] == [
            ("mixtral-tiny", "v2")
        ]
    finally:
        local.delete(v2)


def test_a_state_file_from_before_versions_were_kept_still_loads(local, tiny_model):
    """Replicas recorded without their version say nothing; the reconciler then goes by the
    revision."""
    spec = tiny_spec(tiny_model, deployment_id="bbbbbbbb-2222-4333-8444-555555555555")
    folder = local.folder(spec)
    folder.mkdir(parents=True)
    (folder / "state.json").write_text(
        json.dumps(
            {
                "deployment_id": spec.deployment_id,
                "name": spec.name,
                "organization": spec.organization_slug,
                "next_serial": 1,
                "replicas": [{"name": "tiny-000", "revision": spec.revision(), "stopped": True}],
            }
        )
    )
    try:
        [replica] = local.observe(spec).replicas
        assert (replica.name, replica.revision) == ("tiny-000", spec.revision())
        assert (replica.model_slug, replica.model_version) == ("", "")
    finally:
        local.delete(spec)
