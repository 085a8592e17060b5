"""What every RPC passes through on the Trio side of the edge.

``instrument()`` wraps one RPC implementation with, in order: the call gate
(UNAVAILABLE before start-up and while draining), the client's deadline as a
Trio deadline, one structured log line with the ids the request names and
the call's duration, and the only table that turns core errors into gRPC
status codes (containerd: ``instrument`` plus ``errgrpc.ToGRPC``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, Final

import trio
from grpclib.const import Status
from grpclib.exceptions import GRPCError

from pouch import errors
from pouch._util import failpoints
from pouch.log import get_logger
from pouch.metrics import RPC_DURATION

log = get_logger("pouch.cri")

# Resolved along the exception's MRO, most specific first.
ERROR_TABLE: Final[dict[type[BaseException], Status]] = {
    errors.NotFound: Status.NOT_FOUND,
    errors.AlreadyExists: Status.ALREADY_EXISTS,
    errors.InvalidArgument: Status.INVALID_ARGUMENT,
    errors.FailedPrecondition: Status.FAILED_PRECONDITION,
    errors.Unavailable: Status.UNAVAILABLE,
    errors.ResourceExhausted: Status.RESOURCE_EXHAUSTED,
    errors.Unimplemented: Status.UNIMPLEMENTED,
    errors.DeadlineExceeded: Status.DEADLINE_EXCEEDED,
    trio.TooSlowError: Status.DEADLINE_EXCEEDED,
}


def leaf_error(exc: BaseException) -> BaseException:
    """The error to report for *exc*: nurseries wrap errors in groups.

    The first leaf the error table knows wins (a pull whose three layer
    downloads fail reports one of them); otherwise the first leaf.
    """
    if not isinstance(exc, BaseExceptionGroup):
        return exc
    leaves = list(_leaves(exc))
    for leaf in leaves:
        if status_for(leaf) is not None:
            return leaf
    return leaves[0] if leaves else exc


def _leaves(group: BaseExceptionGroup[BaseException]) -> Iterator[BaseException]:
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            yield from _leaves(exc)
        else:
            yield exc


def status_for(exc: BaseException) -> Status | None:
    """The gRPC status for a core error, or None when it is unexpected."""
    for cls in type(exc).__mro__:
        status = ERROR_TABLE.get(cls)
        if status is not None:
            return status
    return None


class CallGate:
    """Admits calls while open.

    Closed until the daemon is ready (containerd's ``checkInitialized``),
    open while serving, closed again when a drain starts.  Calls in flight
    are counted at the bridge, which sees them until their last byte is sent.
    """

    def __init__(self) -> None:
        self._state = "starting"

    def open(self) -> None:
        self._state = "serving"

    def close(self) -> None:
        self._state = "draining"

    def check(self) -> None:
        """Raise `Unavailable` unless calls are admitted."""
        if self._state == "starting":
            raise errors.Unavailable("not initialized: pouchd is starting")
        if self._state == "draining":
            raise errors.Unavailable("pouchd is shutting down")


# The request fields that identify what a call is about, logged with it.
_ID_FIELDS: Final = ("pod_sandbox_id", "container_id", "image_id", "name")


def ids_of(request: object) -> dict[str, str]:
    """The ids a request names, for the log line."""
    found: dict[str, str] = {}
    for name in _ID_FIELDS:
        value = getattr(request, name, None)
        if isinstance(value, str) and value:
            found[name] = value
    image = getattr(request, "image", None)
    ref = image if isinstance(image, str) else getattr(image, "image", None)
    if isinstance(ref, str) and ref:
        found["image"] = ref
    return found


Impl = Callable[..., Awaitable[Any]]


def instrument(
    rpc: str,
    impl: Impl,
    gate: CallGate,
    failpoint: tuple[str, float] | None = None,
) -> Impl:
    """Wrap a Trio RPC implementation for the edge.

    The wrapper takes ``(request, remaining, *extra)``: *remaining* is what is
    left of the client's deadline in seconds (None without one), *extra* is
    passed on (a send function for server-streaming calls).
    """

    # Polled calls (a kubelet lists every second) log at debug unless they fail.
    quiet = (
        rpc in ("Version", "RuntimeConfig")
        or rpc.startswith(("List", "Stream"))
        or rpc.endswith(("Status", "Stats", "FsInfo"))
    )

    async def call(request: object, remaining: float | None, *extra: object) -> Any:
        started = time.perf_counter()
        code = Status.OK
        fields = ids_of(request)
        try:
            gate.check()
            with trio.fail_after(math.inf if remaining is None else remaining):
                await failpoints.trigger(rpc, failpoint)
                return await impl(request, *extra)
        except GRPCError as grpc_error:
            code = grpc_error.status
            raise
        except Exception as caught:
            leaf = leaf_error(caught)
            if isinstance(leaf, GRPCError):
                code = leaf.status
                raise leaf from caught
            status = status_for(leaf)
            if status is None:
                code = Status.UNKNOWN
                log.error("rpc failed unexpectedly", rpc=rpc, **fields, exc_info=caught)
                raise GRPCError(Status.UNKNOWN, f"{rpc}: internal error: {leaf}") from caught
            code = status
            message = "deadline exceeded" if isinstance(leaf, trio.TooSlowError) else str(leaf)
            raise GRPCError(status, message) from caught
        except trio.Cancelled:
            code = Status.CANCELLED
            raise
        finally:
            elapsed = time.perf_counter() - started
            RPC_DURATION.labels(rpc, code.name).observe(elapsed)
            emit = log.debug if quiet and code is Status.OK else log.info
            emit(
                "rpc",
                rpc=rpc,
                code=code.name,
                duration_ms=round(elapsed * 1000, 3),
                **fields,
            )

    return call
