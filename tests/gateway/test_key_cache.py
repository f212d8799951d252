"""The key cache stays cheap when flooded with made-up secrets: eviction is O(1), and unknown
secrets never push real keys out. (Before: once full, every new unknown secret walked the whole
cache on the event loop, about 30 ms at 50,000 entries.)"""

import time

import pytest

from gateway.auth import MAX_UNKNOWN, Caller, KeyCache

pytestmark = pytest.mark.nodb


def caller(key_id: int) -> Caller:
    return Caller(
        key_id=key_id,
        organization_id=1,
        display_prefix="sk-test",
        scopes=frozenset({"inference"}),
        rpm_limit=None,
        tpm_limit=None,
        expires_at=None,
        revoked=False,
        organization_active=True,
    )


def digest(number: int) -> bytes:
    return number.to_bytes(32, "big")


def test_a_flood_of_unknown_secrets_evicts_in_constant_time_and_keeps_real_keys():
    cache = KeyCache(None, ttl=60)
    now = time.monotonic()
    cache._store(b"real", caller(7), now)
    for number in range(MAX_UNKNOWN):
        cache._store(digest(number), None, now)
    started = time.perf_counter()
    for number in range(MAX_UNKNOWN, MAX_UNKNOWN + 20_000):
        cache._store(digest(number), None, now)
    elapsed = time.perf_counter() - started
    assert elapsed < 1.0, f"20,000 stores into a full cache took {elapsed:.2f}s"
    assert len(cache._unknown) == MAX_UNKNOWN
    assert digest(0) not in cache._unknown  # the oldest went first
    assert digest(MAX_UNKNOWN + 19_999) in cache._unknown
    assert cache._entries[b"real"].caller.key_id == 7  # the real key was never evicted


def test_a_key_found_unknown_on_a_refresh_stops_being_served():
    cache = KeyCache(None, ttl=60)
    now = time.monotonic()
    cache._store(b"deleted", caller(9), now)
    cache._store(b"deleted", None, now + 1)
    assert b"deleted" not in cache._entries and b"deleted" in cache._unknown
    assert 9 not in cache._digest_by_key_id
