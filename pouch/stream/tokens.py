"""Single-use tokens for stream URLs, each good for a limited time.

Exec, Attach and PortForward answer with a URL that carries a token; the
request it stands for waits here until the client connects with it, once,
within ``ttl`` seconds.  This is the kubelet streaming server's request
cache (``k8s.io/kubelet/pkg/cri/streaming/request_cache.go``): a random
token, a one-minute TTL by default, and a cap on requests waiting at once
so a client that never connects cannot grow the cache without bound.

The clock is Trio's, so tests run it on an autojump clock.
"""

from __future__ import annotations

import secrets
from typing import TYPE_CHECKING, Final, Generic, TypeVar

import trio

from pouch import errors

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = ["DEFAULT_MAX_IN_FLIGHT", "DEFAULT_TTL", "TOKEN_BYTES", "TokenCache"]

T = TypeVar("T")

#: A URL is good for this long (kubelet: ``CacheTTL = 1 * time.Minute``).
DEFAULT_TTL: Final = 60.0
#: Requests waiting for their client at once (kubelet: ``MaxInFlight = 1000``).
DEFAULT_MAX_IN_FLIGHT: Final = 1000
#: Random bytes per token: 128 bits, 22 URL-safe characters.
TOKEN_BYTES: Final = 16


class TokenCache(Generic[T]):
    """Values waiting for their one use, keyed by a random token.

    Args:
        ttl: Seconds a token stays valid after `insert`.
        max_in_flight: Tokens held at once; `insert` beyond it fails.
        clock: Returns the current time in seconds (Trio's by default).
    """

    def __init__(
        self,
        ttl: float = DEFAULT_TTL,
        *,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
        clock: Callable[[], float] = trio.current_time,
    ) -> None:
        if ttl <= 0:
            raise ValueError(f"ttl must be positive, not {ttl}")
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight must be at least 1, not {max_in_flight}")
        self._ttl = ttl
        self._max = max_in_flight
        self._clock = clock
        # Insertion order is expiry order (one TTL for all), so expired
        # entries are always at the front of the dict.
        self._entries: dict[str, tuple[float, T]] = {}

    @property
    def ttl(self) -> float:
        return self._ttl

    def __len__(self) -> int:
        self._expire()
        return len(self._entries)

    def insert(self, value: T) -> str:
        """Hold *value* and return the token that redeems it.

        Raises:
            ResourceExhausted: ``max_in_flight`` tokens are waiting already.
        """
        self._expire()
        if len(self._entries) >= self._max:
            raise errors.ResourceExhausted(
                f"maximum number of in-flight stream requests exceeded ({self._max})"
            )
        while True:
            token = secrets.token_urlsafe(TOKEN_BYTES)
            if token not in self._entries:  # 2^-128 per pair, but cheap to rule out.
                break
        self._entries[token] = (self._clock() + self._ttl, value)
        return token

    def consume(self, token: str) -> T | None:
        """Take the value of *token*: None if unknown, used or expired."""
        self._expire()
        entry = self._entries.pop(token, None)
        return None if entry is None else entry[1]

    def _expire(self) -> None:
        now = self._clock()
        while self._entries:
            token, (deadline, _) = next(iter(self._entries.items()))
            if deadline > now:
                break
            del self._entries[token]
