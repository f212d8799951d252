"""What one gateway process holds, shared by all its requests: caches (keys, routes, spend
limits, tokenizers), the rate limiter, the prompt workers, the usage writer, load reports and
the upstream connection pool. Made at startup (`GatewayApp.startup`), closed at shutdown."""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime

import aiohttp

from gateway import revocation, sources
from gateway.attribution import TagRegistry
from gateway.auth import KeyCache, touch_keys, touch_keys_forever
from gateway.budget import SpendLimits
from gateway.circuit import Breakers
from gateway.conf import GatewaySettings
from gateway.dbthreads import DbThreads
from gateway.fairpool import FairPool, prompt_executor
from gateway.limits import LocalRateLimiter, RedisRateLimiter
from gateway.load import LoadTracker, report_load_forever
from gateway.routing import RouteTable
from gateway.tokenizer_files import tokenizer_folder
from gateway.tokens import Tokenizers
from gateway.usage import UsageWriter

logger = logging.getLogger("sirocco.gateway")


class Gateway:
    """What one gateway process holds: caches, limiter, usage writer, upstream connections."""

    def __init__(self, config: GatewaySettings):
        self.config = config
        self.db = DbThreads(config.db_threads)
        self.keys = KeyCache(self.db, ttl=config.auth_cache_seconds)
        self.routes = RouteTable(
            self.db,
            ttl=config.route_cache_seconds,
            route_for=sources.route_for,
            callable_models=sources.callable_models,
            request_scale_up=sources.request_scale_up,
            report_unhealthy=sources.report_unhealthy,
        )
        self.tokenizers = Tokenizers(
            self.db,
            sources.tokenizer_source,
            tokenizer_folder,
            wait_seconds=config.tokenizer_wait_seconds,
        )
        self.limiter = (
            RedisRateLimiter(config.redis_url, prefix=config.redis_prefix)
            if config.redis_url
            else LocalRateLimiter()
        )
        self.spend = SpendLimits(
            self.db,
            self.limiter,
            ttl=config.spend_cache_seconds,
            spend_position=sources.organization_spend_position,
            project_spend_position=sources.project_spend_position,
            token_price=sources.token_price_ceiling,
            period_start=sources.spend_period_start,
        )
        self.tags = TagRegistry(
            self.db,
            register=sources.usage_tags_register,
            max_values=config.tag_values_per_organization,
        )
        # Large prompts are read in worker processes, fairly between organizations.
        self.prompts = FairPool(
            prompt_executor,
            workers=config.prompt_workers,
            max_per_organization=config.prompt_queue_per_organization,
        )
        self.usage = UsageWriter(
            spool_dir=config.usage_spool_dir,
            spool_after=config.usage_spool_after,
            synchronous_commit=config.usage_synchronous_commit,
        )
        self.load = LoadTracker()
        self.breakers = Breakers(
            failures=config.circuit_failures,
            cooldown=config.circuit_cooldown,
            on_change=self._circuit_changed,
        )
        self._circuit_reports: set[asyncio.Task] = set()
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=60, ttl_dns_cache=300),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=config.connect_timeout),
            skip_auto_headers=("User-Agent", "Accept-Encoding"),
            auto_decompress=False,
        )
        loop = asyncio.get_running_loop()
        # Background loops that only sleep between rounds: cancelled on close.
        self._sleepers = [
            loop.create_task(
                report_load_forever(
                    self.load, self.db, sources.load_report, config.load_report_seconds
                )
            ),
            loop.create_task(touch_keys_forever(self.keys, self.db)),
        ]
        self._tasks = list(self._sleepers)
        self._stopping = asyncio.Event()
        if config.redis_url:
            self._tasks.append(
                asyncio.get_running_loop().create_task(
                    revocation.listen_for_revocations(
                        config.redis_url, config.redis_prefix, self.keys, self._stopping
                    )
                )
            )
        revocation.register(self.keys)

    def _circuit_changed(self, upstream: str, deployment_id, state: str, failures: int) -> None:
        """Report a circuit breaker's new state to the control plane, in the background (the
        deployment page shows it; /metrics has it already)."""
        logger.warning("circuit of %s is %s after %d failures", upstream, state, failures)
        if deployment_id is None:
            return
        task = asyncio.get_running_loop().create_task(
            self._report_circuit(
                deployment_id=deployment_id,
                upstream=upstream,
                source=self.load.source,
                state=state,
                failures=failures,
                changed_at=datetime.now(UTC),
            )
        )
        self._circuit_reports.add(task)
        task.add_done_callback(self._circuit_reports.discard)

    async def _report_circuit(self, **report) -> None:
        # A lost report would leave the page showing a state the breaker has left until its
        # next change: retried (a newer report supersedes an older one anyway).
        try:
            await self.db.call_retrying(sources.report_circuit, **report)
        except Exception:  # the breaker works without it: only the page lags
            logger.warning("reporting a circuit state failed: %s", report, exc_info=True)

    async def close(self) -> None:
        revocation.unregister(self.keys)
        self.tokenizers.close()
        self.prompts.close()
        self._stopping.set()  # the revocation listener polls this flag
        for task in self._sleepers:
            task.cancel()
        await asyncio.wait(self._tasks, timeout=5)
        try:
            await touch_keys(self.keys, self.db)
        except Exception:
            logger.warning("recording API key use failed", exc_info=True)
        await self.session.close()
        await self.limiter.close()
        await self.usage.close()
        await asyncio.to_thread(self.db.stop)
