"""The prompt pool: organizations served round-robin, a flood waits behind itself, a queue bound
per organization, cancelled jobs dropped, and the real worker processes reading a request."""

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import orjson
import pytest

from gateway.errors import GatewayError
from gateway.fairpool import FairPool, PoolFull, prompt_executor
from gateway.prompt_work import count_prompt, count_text, error_from, read_request
from gateway.tokens import ModelTokenizer

pytestmark = pytest.mark.nodb


class Gate:
    """Jobs that record when they start and block until released."""

    def __init__(self):
        self.started: list[str] = []
        self.lock = threading.Lock()
        self.release = threading.Event()

    def job(self, name: str) -> str:
        with self.lock:
            self.started.append(name)
        assert self.release.wait(10)
        return name


def threads(workers):
    return ThreadPoolExecutor(max_workers=workers)


def test_a_flood_waits_behind_itself_not_in_front_of_others():
    async def run():
        gate = Gate()
        pool = FairPool(threads, workers=2, max_per_organization=10)
        flood = [asyncio.ensure_future(pool.run("A", gate.job, f"A{i}")) for i in range(6)]
        await asyncio.sleep(0.05)
        # A may hold only one of the two workers: B's job starts at once.
        late = asyncio.ensure_future(pool.run("B", gate.job, "B0"))
        await asyncio.sleep(0.05)
        started_before_release = list(gate.started)
        gate.release.set()
        results = await asyncio.gather(*flood, late)
        pool.close()
        return started_before_release, results, gate.started

    before, results, order = asyncio.run(run())
    assert before == ["A0", "B0"]
    assert results == ["A0", "A1", "A2", "A3", "A4", "A5", "B0"]
    assert order[:2] == ["A0", "B0"]


def test_organizations_take_turns():
    async def run():
        gate = Gate()
        pool = FairPool(threads, workers=1, max_per_organization=10)
        blocker = asyncio.ensure_future(pool.run("X", gate.job, "X0"))
        await asyncio.sleep(0.05)
        jobs = [asyncio.ensure_future(pool.run("A", gate.job, f"A{i}")) for i in range(3)]
        jobs += [asyncio.ensure_future(pool.run("B", gate.job, f"B{i}")) for i in range(3)]
        jobs.append(asyncio.ensure_future(pool.run("C", gate.job, "C0")))
        await asyncio.sleep(0.01)
        gate.release.set()
        await asyncio.gather(blocker, *jobs)
        pool.close()
        return gate.started

    assert asyncio.run(run()) == ["X0", "A0", "B0", "C0", "A1", "B1", "A2", "B2"]


def test_an_organization_over_its_bound_is_refused_and_others_are_not():
    async def run():
        gate = Gate()
        pool = FairPool(threads, workers=2, max_per_organization=3)
        held = [asyncio.ensure_future(pool.run("A", gate.job, f"A{i}")) for i in range(3)]
        await asyncio.sleep(0.02)
        with pytest.raises(PoolFull):
            await pool.run("A", gate.job, "A3")
        other = asyncio.ensure_future(pool.run("B", gate.job, "B0"))
        await asyncio.sleep(0.02)
        gate.release.set()
        await asyncio.gather(*held, other)
        assert pool.pending("A") == 0
        # Room again once A's work is done.
        assert await pool.run("A", str, 7) == "7"
        pool.close()

    asyncio.run(run())


def test_a_cancelled_caller_drops_its_queued_job():
    async def run():
        gate = Gate()
        pool = FairPool(threads, workers=1, max_per_organization=5)
        running = asyncio.ensure_future(pool.run("A", gate.job, "A0"))
        queued = asyncio.ensure_future(pool.run("A", gate.job, "A1"))
        await asyncio.sleep(0.02)
        assert pool.pending("A") == 2
        queued.cancel()
        await asyncio.sleep(0)
        assert pool.pending("A") == 1
        gate.release.set()
        await running
        pool.close()
        return gate.started

    assert asyncio.run(run()) == ["A0"]


def test_a_failing_job_raises_in_its_caller_only():
    async def run():
        pool = FairPool(threads, workers=1, max_per_organization=5)
        with pytest.raises(ZeroDivisionError):
            await pool.run("A", divmod, 1, 0)
        assert await pool.run("A", divmod, 7, 2) == (3, 1)
        pool.close()

    asyncio.run(run())


def test_worker_processes_read_and_count_a_request(tiny_moe_dir):
    messages = [{"role": "user", "content": "Bonjour, comment ça va ?"}] * 3
    raw = orjson.dumps({"model": "m", "messages": messages, "max_tokens": 5, "n": 2})

    async def run():
        pool = FairPool(prompt_executor, workers=1, max_per_organization=2)
        try:
            request = await pool.run(1, read_request, raw, True)
            counted = await pool.run(1, count_prompt, raw, True, str(tiny_moe_dir))
            text = await pool.run(1, count_text, "Bonjour " * 50, str(tiny_moe_dir))
            refused = await pool.run(1, read_request, b'{"model": "m"}', True)
        finally:
            pool.close()
        return request, counted, text, refused

    request, counted, text, refused = asyncio.run(run())
    assert text == ModelTokenizer(tiny_moe_dir).count_text("Bonjour " * 50) > 0
    assert (request.model, request.max_tokens, request.n, request.payload) == ("m", 5, 2, None)
    assert orjson.loads(request.upstream_body("served"))["model"] == "served"
    assert orjson.loads(request.upstream_body("served"))["messages"] == messages
    assert counted == ModelTokenizer(tiny_moe_dir).count_chat(messages)
    error = error_from(refused)
    assert isinstance(error, GatewayError) and error.status == 400 and error.param == "messages"
