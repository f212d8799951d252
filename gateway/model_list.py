"""`GET /v1/models` and `GET /v1/models/{id}`: the deployments (and serverless models) the
caller's organization may call."""

from __future__ import annotations

from typing import TYPE_CHECKING

import orjson

from gateway.errors import model_not_found
from gateway.exchange import Exchange, Receive, Scope, Send

if TYPE_CHECKING:
    from gateway.process import Gateway


class ModelList(Exchange):
    __slots__ = ("gateway", "model_id")

    def __init__(self, gateway: Gateway, scope: Scope, receive: Receive, send: Send, *, model_id):
        super().__init__(scope, receive, send)
        self.gateway = gateway
        self.model_id = model_id

    async def handle(self) -> None:
        caller = await self.gateway.keys.authenticate(self.authorization_header())
        models = await self.gateway.routes.models(caller.organization_id)
        # Only what this key may call: the rest does not exist for it (allow-lists, projects).
        entries = [
            {
                "id": model.name,
                "object": "model",
                "created": int(model.created),
                "owned_by": "organization",
            }
            for model in models
            if caller.may_call(model.name, model)
        ]
        if self.model_id:
            entry = next((e for e in entries if e["id"] == self.model_id), None)
            if entry is None:
                raise model_not_found(self.model_id)
            await self.respond(200, orjson.dumps(entry))
            return
        await self.respond(200, orjson.dumps({"object": "list", "data": entries}))
