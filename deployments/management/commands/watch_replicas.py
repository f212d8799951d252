"""`manage.py watch_replicas`: follow the cluster's pods and reconcile a deployment as soon as
one of its pods changes (deleted, crashed, restarted, became ready).

One long-lived process (the Helm chart's `watcher` Deployment, one replica) beside the workers:
a watch is a long HTTP request, which does not fit a Celery task, and one watcher per cluster
is enough (two would ask for every pass twice; passes are idempotent, so it is only waste).
The local provisioner needs none: the worker that runs a replica process sees it exit.
"""

import signal
import threading

from django.core.management.base import BaseCommand, CommandError

from deployments.provisioners import get_provisioner


class Command(BaseCommand):
    help = "Watch the Kubernetes pods of every deployment; reconcile a deployment on a change."

    def handle(self, *args, **options):
        provisioner = get_provisioner()
        if provisioner.name != "kubernetes":
            raise CommandError(
                f"The {provisioner.name} provisioner needs no watcher: the worker that runs "
                "a replica learns of its exit itself."
            )
        if provisioner.on_change is None:
            raise CommandError(
                "Changes could not be reported: CELERY_TASK_ALWAYS_EAGER is on (tests only)."
            )
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        self.stdout.write("Watching the pods of every deployment.")
        provisioner.watch(stop)
