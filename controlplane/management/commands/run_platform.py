"""`make run`: the whole platform on the embedded default, in the foreground.

Starts the ASGI web server (console, REST API, gateway) and one Celery worker with embedded
beat, prints where to go and how to log in, and on Ctrl-C stops every child cleanly.
"""

import signal
import subprocess
import sys
import time
import urllib.request

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from controlplane.demo import (
    DEMO_EMAIL,
    demo_password_hint,
    ensure_demo_api_key,
    ensure_demo_organization,
)

STOP_GRACE_SECONDS = 15


class Command(BaseCommand):
    help = "Run web server + Celery worker (with beat) on the embedded default until Ctrl-C."

    def add_arguments(self, parser):
        parser.add_argument("--host", default="127.0.0.1")
        parser.add_argument("--port", type=int, default=settings.SIROCCO_PORT)

    def handle(self, *args, host, port, **options):
        organization, _user, password = ensure_demo_organization()
        api_key = ensure_demo_api_key(organization)
        settings.VAR_DIR.mkdir(parents=True, exist_ok=True)

        # Each child gets its own session, so Ctrl-C reaches only us and we stop them in order.
        children = {
            "web": self._spawn(
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
            "worker": self._spawn(
                [
                    sys.executable,
                    "-m",
                    "celery",
                    "-A",
                    "controlplane",
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
        }
        stopping = False

        def request_stop(signum, frame):
            nonlocal stopping
            stopping = True

        signal.signal(signal.SIGINT, request_stop)
        signal.signal(signal.SIGTERM, request_stop)

        url = f"http://{host}:{port}"
        try:
            self._wait_until_up(url, children)
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
                for name, child in children.items():
                    if child.poll() is not None:
                        raise CommandError(f"The {name} process exited with {child.returncode}.")
                time.sleep(0.5)
        finally:
            self._stop(children)

    def _spawn(self, argv):
        return subprocess.Popen(argv, start_new_session=True)

    def _wait_until_up(self, url, children, timeout=60):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if children["web"].poll() is not None:
                raise CommandError("The web server exited while starting; see its output above.")
            try:
                with urllib.request.urlopen(f"{url}/healthz", timeout=1):  # noqa: S310
                    return
            except OSError:
                time.sleep(0.3)
        raise CommandError(f"The web server did not answer on {url} within {timeout} s.")

    def _stop(self, children):
        self.stdout.write("Stopping…")
        for child in children.values():
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_SECONDS
        for name, child in children.items():
            try:
                child.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.stderr.write(f"{name} did not stop in {STOP_GRACE_SECONDS} s; killing it.")
                child.kill()
                child.wait()
        if settings.SIROCCO_PROVISIONER == "local":
            # Model replicas run in their own sessions (Ctrl-C does not reach them); the worker
            # that started them is gone now, so stop them here. The next start's sweep starts
            # them again.
            from deployments.provisioners.local import stop_all

            replicas = stop_all(settings.VAR_DIR / "replicas")
            if replicas:
                self.stdout.write(f"Stopped {replicas} local model replica(s).")
        self.stdout.write("Stopped.")
