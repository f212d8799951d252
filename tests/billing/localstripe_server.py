"""localstripe, the Stripe stand-in, with the few pieces of the real API it lacks.

Run as `python tests/billing/localstripe_server.py --port N` (the `localstripe` fixture does).
localstripe 1.15 predates one-off invoices: it only invoices subscriptions, has no
`/v1/invoices/{id}/finalize` and ignores Idempotency-Key. Stripe documents all three, and
billing relies on them, so this adds them to the stand-in, the way Stripe behaves:
- POST /v1/invoices without a subscription makes an empty draft (pending items excluded, as
  `pending_invoice_items_behavior=exclude` asks); items created with `invoice=` join its lines;
- POST /v1/invoices/{id}/finalize finalizes a draft (400 otherwise);
- a request repeating an Idempotency-Key gets the first response back, not a second object.
localstripe has no Connect either. Payouts to publishers need three of its pieces, added as
Stripe's API reference documents them (https://docs.stripe.com/api/accounts,
/api/account_links, /api/transfers, /api/transfer_reversals):
- POST/GET /v1/accounts: connected accounts (`acct_…`; type express, standard or custom; an
  Express account needs the `transfers` capability to receive transfers);
- POST /v1/account_links: an onboarding link for an account (`type` account_onboarding or
  account_update, `refresh_url` and `return_url` required);
- POST/GET /v1/transfers: funds to a connected account (`tr_…`; positive integer `amount`,
  lowercase `currency`, an existing `destination`), with the `transfer.created` event;
  POST /v1/transfers/{id}/reversals reverses (part of) it, with `transfer.reversed`.
Events reach the webhooks registered with POST /_config/webhooks/{id}, signed as Stripe
signs them.
For fault tests, POST /_config/delay {"path": ..., "seconds": ..., "count": ...} makes the
next `count` requests to `path` answer only after `seconds` (the object is created first, as
when Stripe is slow and the client gives up).
It keeps its state in memory only (localstripe would write /tmp/localstripe.pickle).
"""

import argparse
import asyncio
import json
import socket
import time

from aiohttp import web
from localstripe import resources, server
from localstripe.errors import UserError
from localstripe.webhooks import schedule_webhook

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


class Account(resources.StripeObject):
    object = "account"
    _id_prefix = "acct_"

    def __init__(
        self,
        type=None,
        country=None,
        email=None,
        capabilities=None,
        business_type=None,
        metadata=None,
        **kwargs,
    ):
        if kwargs:
            raise UserError(400, "Unexpected " + ", ".join(kwargs))
        if type not in ("express", "standard", "custom"):
            raise UserError(400, "type must be one of express, standard, custom")
        if metadata is not None and not isinstance(metadata, dict):
            raise UserError(400, "Bad request")
        requested = {
            name: {"requested": str(value.get("requested")).lower() == "true"}
            for name, value in (capabilities or {}).items()
            if isinstance(value, dict)
        }
        super().__init__()
        self.type = type
        self.country = country or "US"
        self.email = email
        self.business_type = business_type
        self.metadata = metadata or {}
        # Test-mode accounts are onboarded at once: what was requested is active.
        self.capabilities = {
            name: "active" for name, value in requested.items() if value["requested"]
        }
        self.charges_enabled = "card_payments" in self.capabilities
        self.payouts_enabled = True
        self.details_submitted = True
        self.default_currency = "usd"


class AccountLink(resources.StripeObject):
    object = "account_link"
    _id_prefix = "acctlink_"

    def __init__(self, account=None, refresh_url=None, return_url=None, type=None, **kwargs):
        if kwargs:
            raise UserError(400, "Unexpected " + ", ".join(kwargs))
        if type not in ("account_onboarding", "account_update"):
            raise UserError(400, "type must be account_onboarding or account_update")
        if not (refresh_url and return_url):
            raise UserError(400, "refresh_url and return_url are required")
        Account._api_retrieve(account or "-")
        super().__init__()
        del self.id  # an account link has no id in Stripe's API
        self.expires_at = self.created + 300
        self.url = f"https://connect.stripe.com/setup/e/{account}/{resources.random_id(12)}"


class Transfer(resources.StripeObject):
    object = "transfer"
    _id_prefix = "tr_"

    def __init__(
        self,
        amount=None,
        currency=None,
        destination=None,
        description=None,
        metadata=None,
        transfer_group=None,
        source_transaction=None,
        **kwargs,
    ):
        if kwargs:
            raise UserError(400, "Unexpected " + ", ".join(kwargs))
        amount = resources.try_convert_to_int(amount)
        if not isinstance(amount, int) or amount <= 0:
            raise UserError(400, "amount must be a positive integer")
        if not isinstance(currency, str) or len(currency) != 3 or currency != currency.lower():
            raise UserError(400, "currency must be a lowercase ISO code")
        if metadata is not None and not isinstance(metadata, dict):
            raise UserError(400, "Bad request")
        account = Account._api_retrieve(destination or "-")
        if account.type == "express" and account.capabilities.get("transfers") != "active":
            raise UserError(400, "The destination account lacks the transfers capability")
        super().__init__()
        self.amount = amount
        self.amount_reversed = 0
        self.currency = currency
        self.destination = destination
        self.destination_payment = "py_" + resources.random_id(14)
        self.description = description
        self.metadata = metadata or {}
        self.transfer_group = transfer_group
        self.source_transaction = source_transaction
        self.source_type = "card"
        self.balance_transaction = "txn_" + resources.random_id(24)
        self.reversed = False
        self.reversals = {"object": "list", "data": [], "has_more": False, "total_count": 0,
                          "url": f"/v1/transfers/{self.id}/reversals"}  # fmt: skip
        schedule_webhook(resources.Event("transfer.created", self))

    @classmethod
    def _api_reverse(cls, id, amount=None, description=None, metadata=None, **kwargs):
        if kwargs:
            raise UserError(400, "Unexpected " + ", ".join(kwargs))
        transfer = cls._api_retrieve(id)
        left = transfer.amount - transfer.amount_reversed
        amount = left if amount is None else resources.try_convert_to_int(amount)
        if not isinstance(amount, int) or not 0 < amount <= left:
            raise UserError(400, "amount must be positive and at most what is left")
        reversal = {
            "id": "trr_" + resources.random_id(14),
            "object": "transfer_reversal",
            "amount": amount,
            "currency": transfer.currency,
            "created": int(time.time()),
            "transfer": transfer.id,
            "metadata": metadata or {},
        }
        transfer.amount_reversed += amount
        transfer.reversed = transfer.amount_reversed == transfer.amount
        transfer.reversals["data"].insert(0, reversal)
        transfer.reversals["total_count"] += 1
        schedule_webhook(resources.Event("transfer.reversed", transfer))
        return reversal


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


def _reverse_transfer(id, **data):
    return _Plain(Transfer._api_reverse(id, **data))


class _Plain:
    """A plain dict answered as it is (api_extra exports what it is given)."""

    def __init__(self, data):
        self.data = data

    def _export(self, expand=None):
        return self.data


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
    for cls in (Account, Transfer):
        base = f"/v1/{cls.object}s"
        app.router.add_route("POST", base, server.api_create(cls, base))
        app.router.add_route("GET", base, server.api_list_all(cls, base))
        app.router.add_route("GET", base + "/{id}", server.api_retrieve(cls, base + "/{id}"))
    app.router.add_route(
        "POST", "/v1/account_links", server.api_create(AccountLink, "/v1/account_links")
    )
    reversals = "/v1/transfers/{id}/reversals"
    app.router.add_route("POST", reversals, server.api_extra(_reverse_transfer, reversals))
    app.router.add_post("/_config/delay", configure_delay)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", args.port))
    web.run_app(app, sock=sock, print=None, access_log=None)


if __name__ == "__main__":
    main()
