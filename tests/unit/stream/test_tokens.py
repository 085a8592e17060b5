"""Single-use, expiring tokens for stream URLs."""

from __future__ import annotations

import re

import pytest
import trio

from pouch import errors
from pouch.stream.tokens import TokenCache

pytestmark = pytest.mark.timeout(10)


async def test_a_token_is_used_once():
    cache: TokenCache[str] = TokenCache()
    token = cache.insert("exec")
    assert re.fullmatch(r"[A-Za-z0-9_-]{22}", token)
    assert cache.consume(token) == "exec"
    assert cache.consume(token) is None
    assert cache.consume("nonsense") is None


async def test_tokens_are_unique():
    cache: TokenCache[int] = TokenCache()
    tokens = {cache.insert(i) for i in range(500)}
    assert len(tokens) == 500
    assert len(cache) == 500


async def test_a_token_expires(autojump_clock):
    cache: TokenCache[str] = TokenCache(60)
    early = cache.insert("early")
    await trio.sleep(30)
    late = cache.insert("late")
    await trio.sleep(30)
    assert cache.consume(early) is None  # 60 s old
    assert len(cache) == 1
    await trio.sleep(29.9)
    assert cache.consume(late) == "late"


async def test_in_flight_limit(autojump_clock):
    cache: TokenCache[int] = TokenCache(60, max_in_flight=3)
    for i in range(3):
        cache.insert(i)
    with pytest.raises(errors.ResourceExhausted, match="in-flight"):
        cache.insert(3)
    await trio.sleep(60)  # Expired ones make room.
    cache.insert(4)
    assert len(cache) == 1


def test_arguments_are_checked():
    with pytest.raises(ValueError, match="ttl"):
        TokenCache(0)
    with pytest.raises(ValueError, match="max_in_flight"):
        TokenCache(1, max_in_flight=0)
