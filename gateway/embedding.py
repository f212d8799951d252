"""One embeddings request (`POST /v1/embeddings`) from its first byte to its one usage event.

An `Embedding` is a `Completion` (gateway/completion.py) with three steps of its own, so keys,
the cheap bound for large bodies, rate limits, the spend hold, routing, scale-from-zero, the
relay and the exactly-once usage event are the same code for both:

- reading the body: the inputs (a string, strings, a token array or token arrays) are checked
  and counted as an encoder sees them (gateway/embedding_input.py), a large body in a prompt
  worker in its organization's turn;
- admission: each input must fit the model's context; the request reserves its input tokens
  against the tokens-per-minute limits and holds their cost against the spend limit (nothing
  is generated, so there is no completion to reserve);
- the replica's path is /v1/embeddings, and its answer is one JSON body.

Usage is input tokens only, as the replica reports them; a replica that answered 200 without
usage is billed the gateway's own count of the inputs. An embedding model's usage is priced by
its version's token price (its input price) and invoiced on a line of its own ("embedding
tokens", billing/invoicing.py).
"""

from __future__ import annotations

from gateway.completion import Completion
from gateway.embedding_input import check_input_context, parse_embedding_request
from gateway.errors import bad_request
from gateway.prompt_work import count_embedding_inputs, error_from, read_embedding_request
from gateway.tokens import prompt_token_bound


class Embedding(Completion):
    """One POST /v1/embeddings."""

    __slots__ = ()

    def __init__(self, gateway, scope, receive, send):
        super().__init__(gateway, scope, receive, send, chat=False)

    async def read_prompt(self, raw: bytes) -> None:
        pooled = len(raw) > self.gateway.config.inline_prompt_bytes
        if pooled:
            request = await self._in_pool(read_embedding_request, raw)
            if isinstance(request, tuple):
                raise error_from(request)
        else:
            request = parse_embedding_request(raw)
        self.request = request
        await self.find_route()
        if self.route.partner_publisher is not None:
            raise bad_request(
                f"`{request.model}` is hosted by {self.route.partner_publisher}: the platform "
                "relays its chat and completions, not embeddings. Call an embedding model.",
                param="model",
                code="unsupported_model_task",
            )
        await self.gateway.tags.admit(self.caller.organization_id, request.tags)
        tokenizer = self.gateway.tokenizers.get_nowait(self.route.model_version_id)
        if not pooled:
            request.prompt_tokens, request.longest_input = request.count_inputs(tokenizer)
        elif tokenizer is not None:
            request.prompt_tokens, request.longest_input = await self._in_pool(
                count_embedding_inputs, raw, str(tokenizer.folder)
            )
        self.prompt_exact = tokenizer is not None
        self.body_bytes = len(raw)

    def worst_case(self) -> tuple[int, int, int]:
        request, max_model_len = self.request, self.route.max_model_len
        if max_model_len is not None:
            check_input_context(request, max_model_len, exact=self.prompt_exact)
        tokens = request.prompt_tokens
        most = tokens if self.prompt_exact else max(tokens, prompt_token_bound(self.body_bytes))
        return tokens, most, 0

    def upstream_path(self) -> str:
        return "/v1/embeddings"

    async def record_usage(self) -> None:
        outcome = self.outcome
        if outcome.status == 200 and not outcome.usage_seen:
            # The replica embedded the inputs but did not say how many tokens they were:
            # bill the gateway's own count, with the model's tokenizer when it can load.
            tokenizer = await self.gateway.tokenizers.get(self.route.model_version_id)
            if tokenizer is not None and self.request.payload is not None:
                outcome.prompt_tokens = self.request.count_inputs(tokenizer)[0]
            else:
                outcome.prompt_tokens = self.request.prompt_tokens
        await super().record_usage()
