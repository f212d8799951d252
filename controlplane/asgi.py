"""The web process's ASGI application: `/v1` goes to the gateway's lean ASGI app (no Django
middleware on the data path), everything else to Django. The gateway can also run on its
own: `uvicorn gateway.asgi:application` (docs/architecture.md)."""

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "controlplane.settings.base")

django_application = get_asgi_application()

from controlplane.dbbounds import bound_request_processes  # noqa: E402 - needs settings

bound_request_processes()

from gateway.app import GatewayApp  # noqa: E402 - needs the app registry ready

gateway_application = GatewayApp()


async def application(scope, receive, send):
    if scope["type"] == "lifespan":
        # Django has no lifespan support; the gateway starts and flushes its writer here.
        await gateway_application(scope, receive, send)
        return
    path = scope.get("path", "")
    if path == "/v1" or path.startswith("/v1/"):
        await gateway_application(scope, receive, send)
    else:
        await django_application(scope, receive, send)
