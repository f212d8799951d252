"""The gateway as its own process: `uvicorn gateway.asgi:application` (production).

Serves /v1 plus /healthz, /readyz and /metrics. The embedded default mounts the same /v1
application inside the web process instead (controlplane/asgi.py).
"""

import os

import django

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "controlplane.settings.base")
django.setup()

from controlplane.dbbounds import bound_request_processes  # noqa: E402 - needs settings

bound_request_processes()

from gateway.app import GatewayApp  # noqa: E402 - needs the app registry ready

application = GatewayApp(health=True)
