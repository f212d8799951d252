# The Celery app is imported here so that `@shared_task` in every app binds to it.
from controlplane.celery import app as celery_app

__all__ = ("celery_app",)
