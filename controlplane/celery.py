"""The Celery application: JSON only, late acks, time limits, named queues.

Queues: `provisioning` (reconcile deployments, autoscale), `billing` (usage ingestion, rating,
invoices, Stripe), `default` (everything else). Tasks route themselves with `queue=` in their
decorator; `task_routes` below is the single place that says which module goes where.
"""

import os

from celery import Celery
from kombu import Exchange, Queue

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "controlplane.settings.base")

QUEUES = ("default", "provisioning", "billing")

app = Celery("sirocco")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.conf.update(
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    task_ignore_result=True,
    # A task is acknowledged only after it finished, so a killed worker's task runs again;
    # every task is written to be idempotent for that reason.
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=1,
    task_time_limit=15 * 60,
    task_soft_time_limit=14 * 60,
    task_default_queue="default",
    task_queues=[Queue(name, Exchange(name), routing_key=name) for name in QUEUES],
    task_routes={
        "deployments.tasks.*": {"queue": "provisioning"},
        "billing.tasks.*": {"queue": "billing"},
    },
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)
app.autodiscover_tasks()
