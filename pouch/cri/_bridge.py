"""The one seam between Trio and asyncio.

grpclib is asyncio-only, so the CRI server runs on a ``trio_asyncio`` loop
opened inside the daemon's nursery.  Each RPC crosses into Trio exactly once
(``trio_as_aio``); a server-streaming RPC's Trio side sends its messages back
through ``aio_as_trio(stream.send_message)``.  Nothing else in pouch imports
asyncio or trio_asyncio.

Shutdown is ours, not grpclib's: ``Server.close()`` cancels every running
call at once and leaves accepted connections and the socket file behind.  A
drain here stops accepting, refuses new calls (the gate), lets in-flight
calls finish within the grace period, then cancels what is left, closes the
connections and unlinks the socket.
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import trio
import trio_asyncio
from grpclib.const import Cardinality, Handler, Status
from grpclib.exceptions import GRPCError, StreamTerminatedError
from grpclib.server import Server, Stream

from pouch.log import get_logger

if TYPE_CHECKING:
    from collections.abc import Mapping
    from pathlib import Path

    from grpclib.protocol import H2Protocol

    from pouch.cri._instrument import CallGate, Impl

log = get_logger("pouch.cri")


class StartupError(Exception):
    """The CRI socket cannot be served (another daemon holds it, say)."""


class _Server(Server):
    """grpclib's server, plus what a graceful drain needs from it."""

    def __init__(self, handlers: list[Any]) -> None:
        super().__init__(handlers)
        self._protocols: weakref.WeakSet[H2Protocol] = weakref.WeakSet()

    def _protocol_factory(self) -> H2Protocol:
        protocol = super()._protocol_factory()
        self._protocols.add(protocol)
        return protocol

    def stop_accepting(self) -> None:
        if self._server is not None:
            self._server.close()

    def close_connections(self) -> None:
        for protocol in list(self._protocols):
            transport = getattr(getattr(protocol, "connection", None), "_transport", None)
            if transport is not None:
                transport.close()


def bind_socket(path: Path) -> socket.socket:
    """Bind the CRI socket: mode 0660, owned by root.

    A socket that answers belongs to a live daemon and is never taken over;
    one that refuses connections is stale and is replaced.

    Raises:
        StartupError: a live daemon holds *path*, or it cannot be bound.
    """
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o711)
    if path.exists() or path.is_symlink():
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(2.0)
        try:
            probe.connect(str(path))
        except OSError as exc:
            if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT, errno.ENOTSOCK):
                raise StartupError(f"cannot check socket {path}: {exc.strerror}") from exc
            log.warning("replacing stale socket", path=str(path))
            path.unlink(missing_ok=True)
        else:
            raise StartupError(f"another daemon is serving on {path}: refusing to start")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    # Bind under a restrictive umask so the socket is never briefly open to all.
    old_umask = os.umask(0o177)
    try:
        sock.bind(str(path))
    except OSError as exc:
        sock.close()
        raise StartupError(f"cannot bind {path}: {exc.strerror}") from exc
    finally:
        os.umask(old_umask)
    os.chown(path, 0, 0)
    os.chmod(path, 0o660)
    sock.listen(128)
    sock.setblocking(False)
    return sock


class InFlight:
    """Counts the calls being handled, on the asyncio side.

    A call counts from the moment grpclib hands it over until its last
    message is sent, so a drain never closes a connection under a reply.
    """

    def __init__(self) -> None:
        self.count = 0
        self._idle: asyncio.Event | None = None

    def __enter__(self) -> None:
        self.count += 1

    def __exit__(self, *exc_info: object) -> None:
        self.count -= 1
        if self.count == 0 and self._idle is not None:
            self._idle.set()

    async def wait_idle(self) -> None:
        self._idle = asyncio.Event()
        if self.count:
            await self._idle.wait()


Handle = Callable[[Stream[Any, Any]], Any]


def _unary_handler(rpc: str, call: Impl, in_flight: InFlight) -> Handle:
    async def handle(stream: Stream[Any, Any]) -> None:
        with in_flight:
            request = await _recv(stream, rpc)
            response = await trio_asyncio.trio_as_aio(call)(request, _remaining(stream))
            await stream.send_message(response)

    return handle


def _stream_handler(rpc: str, call: Impl, in_flight: InFlight) -> Handle:
    async def handle(stream: Stream[Any, Any]) -> None:
        with in_flight:
            request = await _recv(stream, rpc)
            send = trio_asyncio.aio_as_trio(stream.send_message)
            await trio_asyncio.trio_as_aio(call)(request, _remaining(stream), send)

    return handle


async def _recv(stream: Stream[Any, Any], rpc: str) -> Any:
    try:
        return await stream.recv_message()
    except (GRPCError, StreamTerminatedError, asyncio.CancelledError):
        raise
    except Exception as exc:
        # A body that does not decode as the request type is the client's fault.
        raise GRPCError(Status.INVALID_ARGUMENT, f"{rpc}: cannot decode request: {exc}") from exc


def _remaining(stream: Stream[Any, Any]) -> float | None:
    if stream.deadline is None:
        return None
    return max(0.0, stream.deadline.time_remaining())


class Servable:
    """A grpclib handler object built from a table of instrumented calls."""

    def __init__(self, mapping: dict[str, Handler], in_flight: InFlight) -> None:
        self._mapping = mapping
        self.in_flight = in_flight

    def __mapping__(self) -> dict[str, Handler]:
        return self._mapping


def servable(base_mapping: Mapping[str, Handler], calls: Mapping[str, Impl]) -> Servable:
    """Route each method of a generated service to its instrumented call.

    Args:
        base_mapping: the generated ``*ServiceBase().__mapping__()``; it gives
            each method's cardinality and message types.
        calls: instrumented Trio calls keyed by full method path
            (``/runtime.v1.RuntimeService/Version``).
    """
    mapping: dict[str, Handler] = {}
    in_flight = InFlight()
    for path, generated in base_mapping.items():
        rpc = path.rsplit("/", 1)[-1]
        call = calls[path]
        if generated.cardinality is Cardinality.UNARY_UNARY:
            func = _unary_handler(rpc, call, in_flight)
        elif generated.cardinality is Cardinality.UNARY_STREAM:
            func = _stream_handler(rpc, call, in_flight)
        else:  # the CRI has no client-streaming calls
            raise TypeError(f"unsupported cardinality for {path}")
        mapping[path] = Handler(
            func, generated.cardinality, generated.request_type, generated.reply_type
        )
    return Servable(mapping, in_flight)


async def serve_cri(
    sock: socket.socket,
    path: Path,
    handlers: list[Servable],
    gate: CallGate,
    stop: trio.Event,
    grace_period: float,
    *,
    task_status: trio.TaskStatus[Path] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the CRI on *sock* until *stop* is set, then drain and return.

    Cancellation: a cancel from outside is a hard stop: running calls are
    cancelled, connections closed and the socket unlinked.
    """
    async with trio_asyncio.open_loop():
        # grpclib takes the running loop in Server()'s constructor.
        server: _Server = await trio_asyncio.aio_as_trio(_make_server)(handlers)
        try:
            await trio_asyncio.aio_as_trio(server.start)(sock=sock)
            gate.open()
            log.info("serving cri", socket=str(path))
            task_status.started(path)
            await stop.wait()
            server.stop_accepting()
            gate.close()
            with trio.move_on_after(grace_period) as waited:
                for servable_ in handlers:
                    await trio_asyncio.aio_as_trio(servable_.in_flight.wait_idle)()
            if waited.cancelled_caught:
                left = sum(s.in_flight.count for s in handlers)
                log.warning("grace period over: cancelling calls", in_flight=left)
        finally:
            gate.close()
            with trio.CancelScope(shield=True), trio.move_on_after(5):
                server.close()
                server.close_connections()
                await trio_asyncio.aio_as_trio(server.wait_closed)()
            with trio.CancelScope(shield=True):
                await trio.Path(path).unlink(missing_ok=True)
            log.info("cri server stopped")


async def _make_server(handlers: list[Servable]) -> _Server:
    return _Server(list(handlers))
