"""`make run`: the whole platform on the embedded default, in the foreground, supervised.

Starts the ASGI web server (console, REST API, gateway) and one Celery worker with embedded
beat, prints where to go and how to log in, and then supervises them: a child that dies (a crash,
an OOM kill, `kill -9`; for the worker, also its embedded beat) is started again with exponential
backoff, and the local model replicas
keep running through it (they live in sessions of their own; the new worker adopts them from
their state files). Only Ctrl-C or SIGTERM stops everything, replicas included.

This process is also the reaper of the whole tree. On Linux it makes itself a child subreaper
(prctl PR_SET_CHILD_SUBREAPER), so a process orphaned below it (a replica whose worker was
killed, a pool process that outlived its parent) is re-parented here instead of to the
container's init, which may never reap; the supervision loop reaps every exited child.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib
import importlib.util
import os
import signal
import sys
import time
import traceback
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from controlplane.demo import (
    DEMO_EMAIL,
    demo_password_hint,
    ensure_demo_api_key,
    ensure_demo_organization,
)

STOP_GRACE_SECONDS = 15
# The first restart is at once; a child that keeps dying waits 1, 2, 4 … up to 30 s between
# tries. A child that stayed up this long is healthy again: its next crash restarts at once
# (one that cannot start dies within a few seconds, and keeps its backoff).
FIRST_BACKOFF_SECONDS = 0.0
MAX_BACKOFF_SECONDS = 30.0
HEALTHY_AFTER_SECONDS = 10.0
LOOP_SECONDS = 0.2
# A worker's embedded beat starts within a second or two of the worker; it is looked for from
# then on, every few seconds (a walk over /proc).
BEAT_GRACE_SECONDS = 15.0
BEAT_CHECK_SECONDS = 2.0
PR_SET_CHILD_SUBREAPER = 36


def become_subreaper() -> bool:
    """Adopt orphaned descendants (Linux only); False where the kernel has no such thing."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"signal {-code} ({signal.Signals(-code).name})"
        except ValueError:
            return f"signal {-code}"
    return f"exit code {code}"


def spawn(argv: list[str]) -> int:
    """Start a program in a session of its own: Ctrl-C reaches only the supervisor, and a dead
    child's leftovers (Celery's pool processes, embedded beat) can be killed as a group."""
    return os.posix_spawn(argv[0], argv, os.environ, setsid=True)


def fork_worker(argv: list[str]) -> int:
    """The Celery worker, forked from this process rather than started from scratch.

    This process has imported Django, the Celery app and the task modules already; a fork has
    them for free, so a restarted worker consumes again within a few seconds even on a loaded
    machine, where a fresh interpreter spends most of that importing (docs/benchmarks.md).
    This is gunicorn's `--preload` and Celery's own prefork pool applied one level up.
    """
    from django.db import connections

    connections.close_all()  # a connection must never be shared by two processes
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        os.setsid()
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        sys.argv = ["celery", "-A", "controlplane", *argv]  # what `ps` shows (setproctitle)
        # Django's system checks ran when this command started (with the same code and
        # settings); Celery would run them again in every worker it boots, a second or more of
        # CPU on each restart.
        os.environ["CELERY_SKIP_CHECKS"] = "1"
        from controlplane.celery import app

        app.worker_main(argv)
        code = 0
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else int(exit_.code is not None)
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def preload_worker() -> None:
    """Import what a worker imports on start, once, before the first fork (the list is what a
    profile of a worker's boot showed importing)."""
    for module in (
        "celery.bin.celery",
        "celery.apps.worker",
        "celery.beat",
        "celery.concurrency.prefork",
        "celery.worker.consumer",
    ):
        importlib.import_module(module)
    from controlplane.celery import app

    app.loader.import_default_modules()
    app.connection_for_write().get_transport_cls()  # the broker's transport (SQLAlchemy's: big)


def embedded_beat_alive(worker_pid: int) -> bool | None:
    """Whether the worker's embedded beat process runs; None where that cannot be told (no
    /proc, or no setproctitle, which is what names the process `[celery beat]`)."""
    if importlib.util.find_spec("setproctitle") is None or not os.path.isdir("/proc"):
        return None
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as handle:
                fields = handle.read().rsplit(b")", 1)[-1].split()
            if int(fields[1]) != worker_pid or fields[0] in (b"Z", b"X"):
                continue
            with open(f"/proc/{entry.name}/cmdline", "rb") as handle:
                if handle.read().startswith(b"[celery beat]"):
                    return True
        except (OSError, ValueError, IndexError):
            continue
    return False


@dataclass
class Child:
    """One supervised process: how to start it and how it has been doing."""

    name: str
    start_process: Callable[[], int]  # starts it, returns its pid
    pid: int | None = None
    returncode: int | None = None
    started_at: float = 0.0
    restarts: int = 0
    failures_in_a_row: int = 0
    restart_at: float | None = None  # monotonic; set while it is down and waiting for backoff

    def start(self) -> None:
        self.pid = self.start_process()
        self.returncode = None
        self.started_at = time.monotonic()
        self.restart_at = None

    @property
    def running(self) -> bool:
        return self.pid is not None and self.returncode is None

    def signal(self, sig: int) -> None:
        if self.running:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def kill_leftovers(self) -> None:
        """After the group leader died: SIGKILL what is left of its group (a worker's pool
        processes and beat must not outlive it, or the next worker runs next to them). Model
        replicas are in sessions of their own and are not touched."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)


class Command(BaseCommand):
    help = "Run web server + Celery worker (with beat) on the embedded default until Ctrl-C."

    def add_arguments(self, parser):
        parser.add_argument("--host", default="127.0.0.1")
        parser.add_argument("--port", type=int, default=settings.SIROCCO_PORT)

    def handle(self, *args, host, port, **options):
        organization, _user, password = ensure_demo_organization()
        api_key = ensure_demo_api_key(organization)
        settings.VAR_DIR.mkdir(parents=True, exist_ok=True)
        become_subreaper()
        self._next_beat_check = 0.0

        preload_worker()
        self.children = {
            "web": Child(
                "web",
                lambda: spawn(
                    [
                        sys.executable,
                        "-m",
                        "uvicorn",
                        "controlplane.asgi:application",
                        "--host",
                        host,
                        "--port",
                        str(port),
                        "--no-access-log",
                        # The gateway starts its usage writer and flushes it on shutdown.
                        "--lifespan",
                        "on",
                    ]
                ),
            ),
            "worker": Child(
                "worker",
                lambda: fork_worker(
                    [
                        "worker",
                        "--beat",
                        "--queues",
                        "default,provisioning,billing",
                        "--concurrency",
                        "2",
                        "--loglevel",
                        "INFO",
                        "--schedule",
                        settings.CELERY_BEAT_SCHEDULE_FILENAME,
                    ]
                ),
            ),
        }
        stopping = False

        def request_stop(signum, frame):
            nonlocal stopping
            stopping = True

        signal.signal(signal.SIGINT, request_stop)
        signal.signal(signal.SIGTERM, request_stop)

        url = f"http://{host}:{port}"
        try:
            for child in self.children.values():
                child.start()
            self._wait_until_up(url)
            self.stdout.write(
                self.style.SUCCESS("\nSirocco is running.\n")
                + f"  Console:  {url}/\n"
                + f"  Login:    {DEMO_EMAIL} / {password or demo_password_hint()}\n"
                + f"  API key:  {api_key}\n"
                + f"  REST API: {url}/api/v1/  (docs: {url}/api/docs/)\n"
                + f"  Gateway:  {url}/v1/\n"
                + "Press Ctrl-C to stop.\n"
            )
            while not stopping:
                self._reap()
                self._supervise()
                time.sleep(LOOP_SECONDS)
        finally:
            self._stop()

    # --- supervision ------------------------------------------------------------------------

    def _reap(self) -> bool:
        """Collect every exited child: ours (recording its exit code) and any orphan the kernel
        handed us as subreaper. Returns whether any child, running or not yet reaped, is left."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return False
            if pid == 0:
                return True
            for child in self.children.values():
                if child.pid == pid:
                    child.returncode = os.waitstatus_to_exitcode(status)

    def _supervise(self) -> None:
        now = time.monotonic()
        self._check_beat(now)
        for child in self.children.values():
            if child.running:
                if child.failures_in_a_row and now - child.started_at >= HEALTHY_AFTER_SECONDS:
                    child.failures_in_a_row = 0
                continue
            if child.restart_at is None:
                child.kill_leftovers()
                backoff = (
                    FIRST_BACKOFF_SECONDS
                    if child.failures_in_a_row == 0
                    else min(MAX_BACKOFF_SECONDS, 2.0 ** (child.failures_in_a_row - 1))
                )
                child.failures_in_a_row += 1
                child.restart_at = now + backoff
                self.stderr.write(
                    f"The {child.name} process exited with "
                    f"{describe_exit(child.returncode)}; restarting it"
                    + (f" in {backoff:.0f} s." if backoff else ".")
                )
            if now >= child.restart_at:
                child.restarts += 1
                child.start()
                self.stderr.write(
                    f"Restarted the {child.name} process (pid {child.pid}, "
                    f"restart {child.restarts})."
                )

    def _check_beat(self, now: float) -> None:
        """The worker runs beat as a child process (`--beat`) and does not notice when it dies:
        the periodic sweeps would stop, with a zombie left under the worker. A worker without
        its beat is restarted like a dead one."""
        worker = self.children["worker"]
        if (
            not worker.running
            or now - worker.started_at < BEAT_GRACE_SECONDS
            or now < self._next_beat_check
        ):
            return
        self._next_beat_check = now + BEAT_CHECK_SECONDS
        if embedded_beat_alive(worker.pid) is False:
            self.stderr.write("The worker's embedded beat is gone; restarting the worker.")
            worker.kill_leftovers()  # the loop then sees the worker exit and restarts it

    def _wait_until_up(self, url, timeout=60):
        """The first start is not supervised: a web server that cannot start (port taken, bad
        settings) is a mistake to report, not to retry forever."""
        web = self.children["web"]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._reap()
            if not web.running:
                raise CommandError("The web server exited while starting; see its output above.")
            try:
                with urllib.request.urlopen(f"{url}/healthz", timeout=1):  # noqa: S310
                    return
            except OSError:
                time.sleep(0.3)
        raise CommandError(f"The web server did not answer on {url} within {timeout} s.")

    # --- shutdown ---------------------------------------------------------------------------

    def _stop(self) -> None:
        self.stdout.write("Stopping…")
        running = [child for child in self.children.values() if child.running]
        for child in running:
            child.signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_SECONDS
        while any(child.running for child in running) and time.monotonic() < deadline:
            self._reap()
            time.sleep(0.05)
        for child in running:
            if child.running:
                self.stderr.write(
                    f"{child.name} did not stop in {STOP_GRACE_SECONDS} s; killing it."
                )
        for child in self.children.values():
            if child.pid is not None:
                child.kill_leftovers()
        if settings.SIROCCO_PROVISIONER == "local":
            # Model replicas run in their own sessions (Ctrl-C does not reach them); the worker
            # that started them is gone now, so stop them here. The next start's sweep starts
            # them again.
            from deployments.provisioners.local import stop_all

            replicas = stop_all(settings.VAR_DIR / "replicas")
            if replicas:
                self.stdout.write(f"Stopped {replicas} local model replica(s).")
        self._reap_remaining()
        self.stdout.write("Stopped.")

    def _reap_remaining(self, timeout: float = 5.0) -> None:
        """Wait briefly for what was killed to exit, reaping it, so nothing is left behind."""
        deadline = time.monotonic() + timeout
        while self._reap() and time.monotonic() < deadline:
            time.sleep(0.05)
