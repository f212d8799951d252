"""Prefix-aware routing: the gateway sends a request to the replica likely to hold its prompt's
prefix in its KV cache, within a load bound; a replica that restarts comes back empty and the
routing follows the caches. The first tests drive RouteTable with plain routes; the last one two
real runtime processes (the tiny MoE) behind the real gateway."""

from __future__ import annotations

import re
import subprocess
import sys
import time
import uuid

import httpx
import pytest

from deployments.models import Replica, RoutingPolicy
from deployments.selectors import Route
from gateway.routing import PREFIX_BLOCK_BYTES, RouteTable, prefix_keys
from tests.gateway.conftest import REPO_ROOT, RUNTIME_SERVED_NAME

A, B, C = "http://a", "http://b", "http://c"
SYSTEM = "You are the support assistant of a bicycle shop. " * 40  # ~2 KB: 7 key blocks


def _table() -> RouteTable:
    return RouteTable(None, ttl=1, route_for=None, callable_models=None, request_scale_up=None)


def _route(policy=RoutingPolicy.PREFIX_AWARE, endpoints=(A, B, C)) -> Route:
    return Route(
        deployment_id=uuid.uuid4(),
        organization_id=1,
        model_version_id=1,
        served_model_name="m",
        max_model_len=None,
        deployment_type="dedicated",
        status="ready",
        replicas=[(f"r{i}", endpoint) for i, endpoint in enumerate(endpoints)],
        routing_policy=policy,
    )


def _chat(*turns: str) -> tuple[bytes, ...]:
    messages = [{"role": "system", "content": SYSTEM}]
    messages += [{"role": "user", "content": turn} for turn in turns]
    return prefix_keys({"messages": messages}, chat=True)


@pytest.mark.nodb
def test_keys_cover_the_leading_blocks_and_name_the_whole_prefix():
    first, longer = _chat("Hi"), _chat("Hi", "My chain is loose " * 40)
    assert len(first) == len(SYSTEM.encode()) // PREFIX_BLOCK_BYTES
    assert longer[: len(first) - 1] == first[: len(first) - 1]  # the same conversation, grown
    other = prefix_keys({"messages": [{"role": "system", "content": "x" + SYSTEM}]}, chat=True)
    assert not set(other) & set(first)  # one byte changed up front: no key in common
    assert prefix_keys({"prompt": "short"}, chat=False) == ()
    assert len(prefix_keys({"prompt": list(range(200))}, chat=False)) > 1  # token ids too


@pytest.mark.nodb
def test_a_conversation_stays_on_the_replica_that_served_it():
    table, route = _table(), _route()
    keys = _chat("Hi")
    first = table.pick(route, set(), keys)  # nobody holds it: rendezvous hash
    assert all(table.pick(route, set(), keys) == first for _ in range(5))
    table.observed(route, first, keys, cached_tokens=0)
    # Other replicas are busier or idler: within the bound, the holder still wins.
    table.acquire(first)
    grown = _chat("Hi", "And then? " * 60)
    assert table.pick(route, set(), grown) == first
    # A conversation learnt elsewhere goes there, even when `first` is idle.
    other = next(e for e in (A, B, C) if e != first)
    table.release(first)
    elsewhere = _chat("Bonjour " * 50)
    table.observed(route, other, elsewhere, cached_tokens=0)
    assert table.pick(route, set(), (*elsewhere, b"deeper")) == other


@pytest.mark.nodb
def test_a_hot_prefix_spills_over_within_the_load_bound():
    table, route = _table(), _route()
    keys = _chat("Hi")
    holder = table.pick(route, set(), keys)
    table.observed(route, holder, keys, cached_tokens=0)
    picks = []
    for _ in range(12):  # 12 requests in flight at once, all with the same prefix
        endpoint = table.pick(route, set(), keys)
        table.acquire(endpoint)
        picks.append(endpoint)
    # At most ceil(1.25 × mean) on the holder: 5 of 12 over 3 replicas; the rest spread.
    assert picks.count(holder) == 5
    assert sorted(picks.count(e) for e in (A, B, C) if e != holder) == [3, 4]


@pytest.mark.nodb
def test_least_in_flight_policy_ignores_prefixes():
    table, route = _table(), _route(RoutingPolicy.LEAST_IN_FLIGHT)
    keys = _chat("Hi")
    table.observed(route, A, keys, cached_tokens=0)  # not learnt under this policy
    table.acquire(A)
    assert table.pick(route, set(), keys) in (B, C)
    for endpoint in (A, B, B):
        table.acquire(endpoint)
    assert table.pick(route, set(), keys) == C


@pytest.mark.nodb
def test_a_replica_that_lost_its_cache_loses_its_entries():
    table, route = _table(), _route()
    one, two = _chat("first " * 60), _chat("second " * 60)
    holder = table.pick(route, set(), one)
    table.observed(route, holder, one, cached_tokens=0)
    table.observed(route, holder, two, cached_tokens=448)  # the system prompt was cached
    assert table.pick(route, set(), two) == holder
    # It answers conversation one with nothing cached (it restarted): conversation two is no
    # longer thought to be there; conversation one is (it has just been computed there).
    table.observed(route, holder, one, cached_tokens=0)
    index = table._prefixes[route.deployment_id]
    assert not any(index.get(key) == holder for key in two if key not in one)
    assert all(index[key] == holder for key in one)
    # A replica that does not report cached tokens (None) keeps its entries.
    table.observed(route, holder, two, cached_tokens=None)
    table.observed(route, holder, one, cached_tokens=None)
    assert all(index[key] == holder for key in two)
    # A refused connection drops them too.
    table.unhealthy(route.deployment_id, holder, "refused")
    assert holder not in index.values()


# ---- end to end: two runtime processes behind the gateway ----


def _start_runtime(tiny_moe_dir, log_path, port=0):
    command = [
        sys.executable, "-m", "runtime", "serve", "--model", str(tiny_moe_dir),
        "--served-model-name", RUNTIME_SERVED_NAME, "--host", "127.0.0.1", "--port", str(port),
        "--device", "cpu", "--cpu-threads", "1",
    ]  # fmt: skip
    log = open(log_path, "ab")  # noqa: SIM115 (closed with the process)
    process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT)
    process.log_file = log
    deadline = time.monotonic() + 120
    url = None
    while time.monotonic() < deadline and process.poll() is None:
        found = re.findall(r"serving \S+ on (http://127\.0\.0\.1:\d+)", log_path.read_text())
        url = found[-1] if found else None
        if url:
            try:
                if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                    return process, url
            except httpx.TransportError:
                pass
        time.sleep(0.2)
    raise AssertionError(f"the runtime did not start:\n{log_path.read_text()}")


def _stop(process):
    process.terminate()
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    process.log_file.close()


def _served(url: str) -> float:
    text = httpx.get(f"{url}/metrics").text
    return sum(
        float(v) for v in re.findall(r"^vllm:request_success_total\{.*\} (\S+)$", text, re.M)
    )


@pytest.mark.slow
def test_a_restarted_replica_comes_back_empty_and_routing_follows_the_caches(
    gateway, organization, inference_key, make_deployment, tiny_moe_dir, tmp_path
):
    first, url_a = _start_runtime(tiny_moe_dir, tmp_path / "a.log")
    second, url_b = _start_runtime(tiny_moe_dir, tmp_path / "b.log")
    processes = {url_a: first, url_b: second}
    try:
        make_deployment(
            organization,
            name="chat",
            endpoints=[url_a, url_b],
            served_model_name=RUNTIME_SERVED_NAME,
        )
        _key, secret = inference_key(organization)
        client = httpx.Client(
            base_url=gateway.v1, headers={"authorization": f"Bearer {secret}"}, timeout=60
        )
        messages = [{"role": "system", "content": SYSTEM}]

        def turn(text):
            messages.append({"role": "user", "content": text})
            before = {url: _served(url) for url in (url_a, url_b) if processes[url].poll() is None}
            response = client.post(
                "/chat/completions",
                json={"model": "chat", "messages": messages, "max_tokens": 8, "temperature": 0},
            )
            assert response.status_code == 200, response.text
            body = response.json()
            messages.append(
                {"role": "assistant", "content": body["choices"][0]["message"]["content"]}
            )
            [served_by] = [url for url in before if _served(url) > before[url]]
            return served_by, body["usage"]["prompt_tokens_details"]["cached_tokens"]

        holder, cached = turn("Hello, my chain is loose.")
        assert cached == 0
        for question in ("How do I tighten it?", "Which tool do I need?"):
            served_by, cached = turn(question)
            assert served_by == holder and cached > 0  # the conversation stays with its cache

        # The holder restarts (same port): its cache is empty. While it is down the gateway
        # fails over, and the conversation's prefix is computed (and cached) on the other one.
        other = url_b if holder == url_a else url_a
        _stop(processes[holder])
        served_by, cached = turn("Are you there?")
        assert served_by == other
        port = int(holder.rsplit(":", 1)[1])
        processes[holder], _ = _start_runtime(tiny_moe_dir, tmp_path / "restart.log", port=port)
        direct = httpx.post(
            f"{holder}/v1/chat/completions",
            json={"model": RUNTIME_SERVED_NAME, "messages": messages[:-1], "max_tokens": 1},
            timeout=60,
        ).json()
        assert direct["usage"]["prompt_tokens_details"]["cached_tokens"] == 0  # empty cache
        Replica.objects.filter(endpoint=holder).update(ready=True)  # as the reconciler would
        time.sleep(0.5)  # the gateway's route cache (0.2 s here) sees it again

        # The conversation now follows its cache to the replica that computed it last.
        for question in ("Thanks. And the brakes?", "Front or back first?"):
            served_by, cached = turn(question)
            assert served_by == other and cached > 0
        metrics = httpx.get(f"{gateway.url}/metrics").text
        assert re.search(
            r'sirocco_gateway_prefix_routing_total\{decision="hit",[^}]*\} [1-9]', metrics
        )
        assert re.search(r'sirocco_gateway_tokens_total\{.*kind="cached"\} [1-9]', metrics)
    finally:
        for process in processes.values():
            if process.poll() is None:
                _stop(process)
