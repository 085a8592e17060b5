"""Work that outlives its caller, keyed so that identical requests share it.

A kubelet gives PullImage a deadline and retries after it: the retry must
join the pull still running, not start over (cri-o's
``pullOperationsInProgress``).  An `InFlight` runs in a manager's nursery;
callers only wait on it, so cancelling a caller stops the waiting, not the
work.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Generic, TypeVar

import trio

from pouch.errors import Unavailable

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

T = TypeVar("T")
K = TypeVar("K")


class InFlight(Generic[T]):
    """One run of a piece of work, and its outcome for any number of waiters."""

    def __init__(self) -> None:
        self._done = trio.Event()
        self._value: T | None = None
        self._error: Exception | None = None
        self._finished = False

    async def run(self, fn: Callable[[], Awaitable[T]]) -> None:
        """Run *fn* and keep its result or error (not `trio.Cancelled`)."""
        try:
            self._value = await fn()
            self._finished = True
        except Exception as exc:
            self._error = exc
        finally:
            # Cancelled (the manager is shutting down) wakes the waiters too.
            self._done.set()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    async def result(self) -> T:
        """Wait for the outcome; raise the work's error if it failed."""
        await self._done.wait()
        if self._error is not None:
            raise self._error
        if not self._finished:
            raise Unavailable("the operation was interrupted: pouchd is shutting down")
        return self._value  # type: ignore[return-value]


class InFlightMap(Generic[K, T]):
    """Keyed `InFlight` runs in a nursery: the first caller starts, the others join."""

    def __init__(self) -> None:
        self._ops: dict[K, InFlight[T]] = {}

    def get(self, key: K) -> InFlight[T] | None:
        return self._ops.get(key)

    def start(
        self, nursery: trio.Nursery, key: K, fn: Callable[[], Awaitable[T]]
    ) -> tuple[InFlight[T], bool]:
        """The run for *key*, started in *nursery* unless one is under way.

        Returns:
            The run, and whether this call started it.
        """
        op = self._ops.get(key)
        if op is not None:
            return op, False
        op = self._ops[key] = InFlight[T]()

        async def run_and_forget() -> None:
            try:
                await op.run(fn)
            finally:
                # Only a finished run is forgotten: the next caller starts afresh.
                if self._ops.get(key) is op:
                    del self._ops[key]

        nursery.start_soon(run_and_forget)
        return op, True

    async def run(self, nursery: trio.Nursery, key: K, fn: Callable[[], Awaitable[T]]) -> T:
        op, _ = self.start(nursery, key, fn)
        return await op.result()
