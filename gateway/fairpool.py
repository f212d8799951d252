"""A fixed number of workers shared fairly between organizations.

Reading a prompt (parsing a large JSON body, rendering the chat template, tokenizing) can take
seconds for a 4 MB body, and every step holds the GIL (orjson, the Jinja template, and the
Rust tokenizer's `encode`), so neither the event loop nor a thread pool in the same process
can run it without stalling every other request. The work runs in worker *processes*
(`prompt_executor`), and this module decides whose work runs next:

- each organization has its own queue; a free worker takes the next job of the next
  organization in round-robin order, so a tenant sending many big prompts waits behind its
  own work, not in front of everyone else's;
- one organization holds at most `workers - 1` workers at once (at least one), so another
  organization's job starts as soon as it arrives while a flood is being read;
- an organization with `max_per_organization` jobs queued or running gets `PoolFull` (the
  gateway answers 429) instead of a longer queue.

The scheduler itself is a few dictionary operations on the event loop; it is generic over
the executor so that its tests can drive it with threads.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
from collections import deque
from collections.abc import Callable, Hashable
from concurrent.futures import Executor, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

logger = logging.getLogger(__name__)


class PoolFull(Exception):
    """The organization already has as much work queued as it may."""

    def __init__(self, queued: int):
        super().__init__(f"{queued} jobs already queued")
        self.queued = queued


class _Job:
    __slots__ = ("args", "function", "future", "owner")

    def __init__(self, owner, function, args, future):
        self.owner = owner
        self.function = function
        self.args = args
        self.future = future


class FairPool:
    def __init__(
        self,
        executor_factory: Callable[[int], Executor],
        *,
        workers: int,
        max_per_organization: int,
    ):
        if workers < 1 or max_per_organization < 1:
            raise ValueError("a pool needs at least one worker and one job per organization")
        self.workers = workers
        self.max_per_organization = max_per_organization
        self.max_running_per_organization = max(1, workers - 1)
        self._executor_factory = executor_factory
        self._executor: Executor | None = None
        self._queues: dict[Hashable, deque[_Job]] = {}
        # Organizations with queued jobs, in the order they are served; an organization
        # goes to the back after each job it starts.
        self._turns: deque[Hashable] = deque()
        self._running: dict[Hashable, int] = {}
        self._busy = 0
        self._closed = False

    def pending(self, owner: Hashable) -> int:
        """The owner's jobs queued or running."""
        queue = self._queues.get(owner)
        return (len(queue) if queue else 0) + self._running.get(owner, 0)

    async def run(self, owner: Hashable, function: Callable, /, *args):
        """function(*args) on a worker, when it is `owner`'s turn. Cancelling the caller
        drops a job that has not started; one already running finishes, unread."""
        if self._closed:
            raise RuntimeError("the pool is closed")
        pending = self.pending(owner)
        if pending >= self.max_per_organization:
            raise PoolFull(pending)
        future = asyncio.get_running_loop().create_future()
        job = _Job(owner, function, args, future)
        queue = self._queues.get(owner)
        if queue is None:
            queue = self._queues[owner] = deque()
        queue.append(job)
        if owner not in self._turns:
            self._turns.append(owner)
        self._dispatch()
        try:
            return await future
        except asyncio.CancelledError:
            self._discard(job)  # still queued: nobody needs it any more
            raise

    def close(self) -> None:
        self._closed = True
        for queue in self._queues.values():
            for job in queue:
                job.future.cancel()
        self._queues.clear()
        self._turns.clear()
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None

    def _discard(self, job: _Job) -> None:
        queue = self._queues.get(job.owner)
        if queue is None:
            return
        try:
            queue.remove(job)
        except ValueError:
            return
        if not queue:
            del self._queues[job.owner]
            if job.owner in self._turns:
                self._turns.remove(job.owner)

    def _dispatch(self) -> None:
        """Start queued jobs on free workers, one per organization per turn."""
        skipped = 0
        while self._busy < self.workers and self._turns and skipped < len(self._turns):
            owner = self._turns[0]
            if self._running.get(owner, 0) >= self.max_running_per_organization:
                self._turns.rotate(-1)  # at its share: let the next one go first
                skipped += 1
                continue
            skipped = 0
            queue = self._queues[owner]
            job = queue.popleft()
            if queue:
                self._turns.rotate(-1)
            else:
                self._turns.popleft()
                del self._queues[owner]
            self._start(job)

    def _start(self, job: _Job) -> None:
        if self._executor is None:
            self._executor = self._executor_factory(self.workers)
        loop = asyncio.get_running_loop()
        self._busy += 1
        self._running[job.owner] = self._running.get(job.owner, 0) + 1
        try:
            work = loop.run_in_executor(self._executor, job.function, *job.args)
        except (BrokenProcessPool, RuntimeError) as error:
            self._finished(job, None, error)
            return
        work.add_done_callback(lambda done: self._finished(job, done, None))

    def _finished(self, job: _Job, done: asyncio.Future | None, error: BaseException | None):
        self._busy -= 1
        left = self._running[job.owner] - 1
        if left:
            self._running[job.owner] = left
        else:
            del self._running[job.owner]
        if done is not None and not done.cancelled():
            error = done.exception()
        if isinstance(error, BrokenProcessPool):
            # A worker died (killed, out of memory): start a fresh set for the next job.
            logger.error("a prompt worker process died; starting new ones")
            if self._executor is not None:
                self._executor.shutdown(wait=False, cancel_futures=True)
                self._executor = None
        if not job.future.done():
            if error is not None:
                job.future.set_exception(error)
            elif done is None or done.cancelled():
                job.future.cancel()
            else:
                job.future.set_result(done.result())
        if not self._closed:
            self._dispatch()


def prompt_executor(workers: int) -> Executor:
    """Worker processes for prompt work, forked from a small server process that has only
    the prompt-reading modules loaded (never from the gateway process and its threads)."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["gateway.prompt_work"])
    return ProcessPoolExecutor(max_workers=workers, mp_context=context)
