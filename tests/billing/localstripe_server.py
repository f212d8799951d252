"""localstripe, the Stripe stand-in, with the few pieces of the real API it lacks.

Run as `python tests/billing/localstripe_server.py --port N` (the `localstripe` fixture does).
localstripe 1.15 predates one-off invoices: it only invoices subscriptions, has no
`/v1/invoices/{id}/finalize` and ignores Idempotency-Key. Stripe documents all three, and
billing relies on them, so this adds them to the stand-in, the way Stripe behaves:
- POST /v1/invoices without a subscription makes an empty draft (pending items excluded, as
  `pending_invoice_items_behavior=exclude` asks); items created with `invoice=` join its lines;
- POST /v1/invoices/{id}/finalize finalizes a draft (400 otherwise);
- a request repeating an Idempotency-Key gets the first response back, not a second object.
For fault tests, POST /_config/delay {"path": ..., "seconds": ..., "count": ...} makes the
next `count` requests to `path` answer only after `seconds` (the object is created first, as
when Stripe is slow and the client gives up).
It keeps its state in memory only (localstripe would write /tmp/localstripe.pickle).
"""

import argparse
import asyncio
import json
import socket

from aiohttp import web
from localstripe import resources, server
from localstripe.errors import UserError

resources.Store.dump_to_disk = lambda self: None
resources.Store.__setitem__ = dict.__setitem__
resources.Store.__delitem__ = dict.__delitem__

Invoice, InvoiceItem, InvoiceLineItem = (
    resources.Invoice,
    resources.InvoiceItem,
    resources.InvoiceLineItem,
)
_subscription_invoice_create = Invoice._api_create.__func__
_invoice_item_create = InvoiceItem._api_create.__func__


def _create_invoice(
    cls,
    customer=None,
    subscription=None,
    currency=None,
    auto_advance=None,
    collection_method=None,
    pending_invoice_items_behavior=None,
    description=None,
    metadata=None,
    **kwargs,
):
    if subscription is not None:
        return _subscription_invoice_create(
            cls,
            customer=customer,
            subscription=subscription,
            description=description,
            metadata=metadata,
            **kwargs,
        )
    if kwargs or pending_invoice_items_behavior not in (None, "exclude"):
        raise UserError(400, "Unexpected " + ", ".join(kwargs or ["pending_invoice_items"]))
    if not isinstance(customer, str) or not customer.startswith("cus_"):
        raise UserError(400, "Bad request")
    resources.Customer._api_retrieve(customer)
    invoice = Invoice(
        customer=customer, description=description, metadata=metadata, simulation=True
    )
    invoice.lines._list = []  # one-off invoices start empty: pending items stay pending
    invoice.currency = currency or "usd"
    return invoice


def _create_invoice_item(cls, **data):
    item = _invoice_item_create(cls, **data)
    if item.invoice is not None:
        invoice = Invoice._api_retrieve(item.invoice)
        if invoice.status != "draft":
            raise UserError(400, "Invoice is not a draft")
        invoice.lines._list.append(InvoiceLineItem(item))
    return item


def _finalize_invoice(id, **kwargs):
    invoice = Invoice._api_retrieve(id)
    if invoice.status != "draft":
        raise UserError(400, "This invoice is already finalized")
    invoice._finalize()
    return invoice


Invoice._api_create = classmethod(_create_invoice)
InvoiceItem._api_create = classmethod(_create_invoice_item)

_idempotent_responses: dict[str, tuple[int, bytes]] = {}
_delays: dict[str, list] = {}


@web.middleware
async def idempotency(request, handler):
    key = request.headers.get("Idempotency-Key")
    if request.method != "POST" or not key:
        return await handler(request)
    if key in _idempotent_responses:
        status, body = _idempotent_responses[key]
        return web.Response(
            body=body,
            status=status,
            content_type="application/json",
            headers={"Idempotent-Replayed": "true"},
        )
    response = await handler(request)
    if response.status < 500:
        _idempotent_responses[key] = (response.status, response.body)
    return response


@web.middleware
async def slow_down(request, handler):
    response = await handler(request)
    delay = _delays.get(request.path)
    if delay and delay[1] > 0:
        delay[1] -= 1
        await asyncio.sleep(delay[0])
    return response


async def configure_delay(request):
    data = json.loads(await request.text())
    _delays[data["path"]] = [float(data["seconds"]), int(data.get("count", 1))]
    return web.Response()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    app = web.Application(middlewares=[slow_down, idempotency, *server.app.middlewares])
    for route in server.app.router.routes():
        app.router.add_route(route.method, route.resource.canonical, route.handler)
    app.router.add_route(
        "POST",
        "/v1/invoices/{id}/finalize",
        server.api_extra(_finalize_invoice, "/v1/invoices/{id}/finalize"),
    )
    app.router.add_post("/_config/delay", configure_delay)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", args.port))
    web.run_app(app, sock=sock, print=None, access_log=None)


if __name__ == "__main__":
    main()
