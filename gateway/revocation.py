"""A revoked key stops working in every gateway process within a second.

`accounts.signals.api_key_revoked` fires in the process that revoked the key (the web process,
or the one process of the embedded default) after the transaction commits. The receiver drops
the key from this process's caches and, when REDIS_URL is set, publishes the key id on a Redis
channel that every gateway process subscribes to. Without Redis there is no other process to
tell: the embedded default runs the gateway inside the web process.
"""

from __future__ import annotations

import asyncio
import logging
import weakref

import redis
import redis.asyncio
from django.conf import settings

logger = logging.getLogger(__name__)

_live_caches: weakref.WeakSet = weakref.WeakSet()
_publisher: redis.Redis | None = None
# How long the listener waits for a message before it looks at its stop flag again, so at most
# how long a stopping gateway waits for it (the tests, which stop a gateway per test, shorten it).
POLL_SECONDS = 0.5


def channel_name(prefix: str) -> str:
    return f"{prefix}revoked-keys"


def register(cache) -> None:
    _live_caches.add(cache)


def unregister(cache) -> None:
    _live_caches.discard(cache)


def on_api_key_revoked(sender, api_key_id: int, **kwargs) -> None:
    for cache in list(_live_caches):
        cache.forget(api_key_id)
    if settings.REDIS_URL:
        try:
            _redis_publisher().publish(channel_name(settings.GATEWAY_REDIS_PREFIX), str(api_key_id))
        except redis.RedisError:
            # The revocation is committed; other processes still drop the key when their
            # cache entry expires (GATEWAY_AUTH_CACHE_SECONDS).
            logger.exception("could not publish the revocation of API key %s", api_key_id)


def _redis_publisher() -> redis.Redis:
    global _publisher
    if _publisher is None:
        _publisher = redis.Redis.from_url(settings.REDIS_URL, socket_timeout=2)
    return _publisher


async def listen_for_revocations(redis_url: str, prefix: str, cache, stop: asyncio.Event):
    """Drop keys that other processes revoke, until `stop` is set; reconnects after errors.

    Polls with a short timeout rather than `listen()`: redis-py's pub/sub can swallow a task's
    cancellation while it waits, so a stop flag is what reliably ends this loop.
    """
    channel = channel_name(prefix)
    while not stop.is_set():
        client = redis.asyncio.Redis.from_url(redis_url)
        try:
            async with client.pubsub() as pubsub:
                await pubsub.subscribe(channel)
                while not stop.is_set():
                    message = await pubsub.get_message(
                        ignore_subscribe_messages=True, timeout=POLL_SECONDS
                    )
                    if message is not None and message["type"] == "message":
                        cache.forget(int(message["data"]))
        except (redis.RedisError, OSError, ValueError):
            logger.warning("revocation channel %s lost; reconnecting", channel, exc_info=True)
            await asyncio.sleep(1)
        finally:
            await client.aclose()
