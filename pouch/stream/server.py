"""The stream server: one HTTP/1.1 port for exec, attach and port-forward.

The CRI's Exec, Attach and PortForward calls answer with a single-use URL
on this server (``http://<address>/exec/<token>``, ``/attach/``,
``/portforward/``; see `StreamServer.url`).  The client (the kubelet, on
behalf of the API server and ``kubectl``) then sends an upgrade request to
it, and the ``Upgrade`` header picks the transport:

- ``Upgrade: SPDY/3.1`` with ``X-Stream-Protocol-Version`` negotiation
  (the client's first protocol that we serve wins; none: 403 and
  ``X-Accepted-Stream-Protocol-Versions``, as apimachinery's
  ``httpstream.Handshake``) -> ``101 Switching Protocols`` and a SPDY session;
- ``Upgrade: websocket`` with ``Sec-WebSocket-Protocol`` -> a WebSocket on
  trio-websocket.  We read the request head with h11 to route it, then
  hand the connection, the head replayed in front (`ReplayStream`), to
  ``trio_websocket.wrap_server_stream``, which does the handshake.

Every connection runs as a task in the daemon's ``handlers`` nursery, so
sessions never hold up each other or the CRI calls, and a daemon shutdown
gives them the grace period before cancelling them.  A session whose bytes
stop moving for ``idle_timeout`` is closed (`IdleTimer`).
"""

from __future__ import annotations

import contextlib
import functools
import re
import time
from http import HTTPStatus
from typing import TYPE_CHECKING, Final
from urllib.parse import parse_qs

import attrs
import h11
import trio
import trio_websocket

from pouch import errors
from pouch.log import get_logger
from pouch.stream import portforward, remotecommand
from pouch.stream.session import (
    AttachRequest,
    ExecRequest,
    IdleTimer,
    PortForwardRequest,
    SessionLimits,
    SpdySession,
    StreamRequest,
    accept_all,
)
from pouch.stream.tokens import TokenCache
from pouch.stream.websocket import ReplayStream, WebSocketByteStream

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable

    from pouch.config import StreamConfig
    from pouch.stream.backend import StreamBackend

__all__ = ["StreamServer", "StreamStatistics"]

log = get_logger("pouch.stream")

#: A request's head must arrive within this time (slowloris guard).
HEAD_TIMEOUT: Final = 30.0
MAX_HEAD_BYTES: Final = 64 * 1024
RECEIVE_SIZE: Final = 64 * 1024
#: trio-websocket: messages buffered between its reader task and ours, the
#: largest message accepted (client-go writes at most 32 KiB per message;
#: SPDY in WebSocket writes a frame per message), and its read size (its
#: default, 4 KiB, costs a syscall per 4 KiB of a port-forward).
WS_QUEUE: Final = 4
WS_MAX_MESSAGE: Final = 4 * 1024 * 1024
WS_RECEIVE: Final = 64 * 1024
#: Time to finish a WebSocket close handshake at the end of a session.
WS_CLOSE_TIMEOUT: Final = 2.0

_KINDS: Final[dict[type[StreamRequest], str]] = {
    ExecRequest: "exec",
    AttachRequest: "attach",
    PortForwardRequest: "portforward",
}
# apimachinery wsstream's connectionUpgradeRegex.
_CONNECTION_UPGRADE: Final = re.compile(r"(^|.*,\s*)upgrade($|\s*,)")


@attrs.frozen
class StreamStatistics:
    #: Upgraded sessions running now.
    sessions: int
    #: URLs issued and not yet used or expired.
    tokens: int


@attrs.frozen
class _Head:
    method: str
    target: str
    headers: tuple[tuple[str, str], ...]
    #: Every byte read from the connection so far, head included.
    raw: bytes
    #: What followed the head (the start of the upgraded protocol).
    trailing: bytes

    def get(self, name: str) -> str:
        """All values of header *name*, joined with commas ("" if absent)."""
        return ", ".join(v for k, v in self.headers if k == name)

    def tokens(self, name: str) -> list[str]:
        """The comma-separated items of every *name* header, in order."""
        return [t.strip() for t in self.get(name).split(",") if t.strip()]


class StreamServer:
    """Issues stream URLs and serves the sessions behind them.

    Args:
        config: Where to listen.
        backend: Runs exec, attach and port-forward; None serves nothing
            (every URL request fails with UNAVAILABLE).
        limits: Token TTL, idle and stream-creation timeouts.
    """

    def __init__(
        self,
        config: StreamConfig,
        backend: StreamBackend | None,
        *,
        limits: SessionLimits | None = None,
    ) -> None:
        self._config = config
        self._backend = backend
        self.limits = limits or SessionLimits()
        self._tokens: TokenCache[StreamRequest] = TokenCache(self.limits.token_ttl)
        self._sessions = 0
        #: ``host:port`` once listening.
        self.address: str | None = None

    # -- issuing URLs (the CRI side) --------------------------------------------

    def url(self, request: StreamRequest) -> str:
        """A single-use URL for *request*, valid for ``limits.token_ttl`` seconds.

        Raises:
            Unavailable: the server is not listening or has no backend.
            ResourceExhausted: too many URLs are waiting for their client.
        """
        if self._backend is None or self.address is None:
            raise errors.Unavailable("the stream server is not serving")
        token = self._tokens.insert(request)
        return f"http://{self.address}/{_KINDS[type(request)]}/{token}"

    def statistics(self) -> StreamStatistics:
        return StreamStatistics(sessions=self._sessions, tokens=len(self._tokens))

    # -- serving -----------------------------------------------------------------

    async def serve(
        self,
        handlers: trio.Nursery,
        stop: trio.Event,
        *,
        task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Listen until *stop* is set; report ``host:port`` through ``started()``.

        Connections are handled in *handlers*, which outlives this call:
        sessions carry on (for the daemon's grace period) after it returns.
        """
        listeners = await trio.open_tcp_listeners(self._config.port, host=self._config.address)
        port = listeners[0].socket.getsockname()[1]
        host = self._config.address
        self.address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        async with trio.open_nursery() as accept:
            accept.start_soon(
                functools.partial(trio.serve_listeners, handler_nursery=handlers),
                self._handle,
                listeners,
            )
            log.info("serving streams", address=self.address)
            task_status.started(self.address)
            await stop.wait()
            accept.cancel_scope.cancel()

    async def _handle(self, stream: trio.abc.HalfCloseableStream) -> None:
        async with stream:
            try:
                await self._handle_request(stream)
            except* (trio.BrokenResourceError, trio.ClosedResourceError):
                pass  # The client went away.
            except* Exception as group:
                # A bug in one session must not take the daemon down.
                log.error("stream session failed unexpectedly", exc_info=group)

    async def _handle_request(self, stream: trio.abc.HalfCloseableStream) -> None:
        head = None
        with trio.move_on_after(HEAD_TIMEOUT):
            head = await _read_head(stream)
        if head is None:
            return
        request = self._route(head)
        if request is None:
            await _respond(stream, 404, "404 page not found")
            return
        if head.method not in ("GET", "POST"):
            await _respond(stream, 405, f"method {head.method} not allowed")
            return
        connection = head.get("connection").lower()
        upgrade = head.get("upgrade").lower()
        if upgrade == "websocket" and _CONNECTION_UPGRADE.match(connection):
            await self._serve_websocket(stream, head, request)
        elif "upgrade" in connection and "spdy/3.1" in upgrade:
            await self._serve_spdy(stream, head, request)
        else:
            await _respond(stream, 400, "unable to upgrade: missing upgrade headers in request")

    def _route(self, head: _Head) -> StreamRequest | None:
        path = head.target.partition("?")[0]
        parts = path.split("/")
        if len(parts) != 3 or parts[0] or parts[1] not in _KINDS.values() or not parts[2]:
            return None
        if self._backend is None:
            return None
        # Consumed even if the upgrade then fails: the URL is single-use.
        request = self._tokens.consume(parts[2])
        if request is None or _KINDS[type(request)] != parts[1]:
            return None
        return request

    @contextlib.asynccontextmanager
    async def _session(
        self, kind: str, transport: str, protocol: str, request: StreamRequest
    ) -> AsyncIterator[IdleTimer]:
        started = time.perf_counter()
        idle = IdleTimer(self.limits.idle_timeout)
        self._sessions += 1
        ids = _ids(request)
        log.info("stream session", kind=kind, transport=transport, protocol=protocol, **ids)
        try:
            with idle.scope:
                yield idle
        finally:
            self._sessions -= 1
            log.info(
                "stream session ended",
                kind=kind,
                idle_timeout=idle.expired or None,
                duration_s=round(time.perf_counter() - started, 3),
                **ids,
            )

    # -- SPDY -------------------------------------------------------------------

    async def _serve_spdy(
        self, stream: trio.abc.HalfCloseableStream, head: _Head, request: StreamRequest
    ) -> None:
        assert self._backend is not None
        backend = self._backend
        offered = head.tokens("x-stream-protocol-version")
        supported: tuple[str, ...] = (
            portforward.SPDY_PROTOCOLS
            if isinstance(request, PortForwardRequest)
            else tuple(remotecommand.SPDY_PROTOCOLS)
        )
        if not offered:
            await _respond(stream, 400, "unable to upgrade: X-Stream-Protocol-Version is required")
            return
        protocol = next((p for p in offered if p in supported), None)
        if protocol is None:
            await _respond(
                stream,
                403,
                "unable to upgrade: unable to negotiate protocol: "
                f"client supports {offered}, server accepts {list(supported)}",
                [("X-Accepted-Stream-Protocol-Versions", p) for p in supported],
            )
            return
        await stream.send_all(
            b"HTTP/1.1 101 Switching Protocols\r\n"
            b"Connection: Upgrade\r\n"
            b"Upgrade: SPDY/3.1\r\n"
            b"X-Stream-Protocol-Version: " + protocol.encode("latin-1") + b"\r\n\r\n"
        )
        kind = _KINDS[type(request)]
        async with self._session(kind, "spdy", protocol, request) as idle:
            transport = ReplayStream(head.trailing, stream)
            handler: Callable[[SpdySession], Awaitable[None]]
            if isinstance(request, PortForwardRequest):
                session = SpdySession(transport, idle=idle, policy=portforward.spdy_stream_policy)
                handler = functools.partial(
                    _spdy_port_forward, request=request, backend=backend, limits=self.limits
                )
            else:
                session = SpdySession(transport, idle=idle, policy=accept_all)
                handler = functools.partial(
                    remotecommand.serve_spdy,
                    protocol=protocol,
                    request=request,
                    backend=backend,
                    limits=self.limits,
                )
            await session.run(handler)

    # -- WebSocket --------------------------------------------------------------

    async def _serve_websocket(
        self, stream: trio.abc.HalfCloseableStream, head: _Head, request: StreamRequest
    ) -> None:
        assert self._backend is not None
        backend = self._backend
        if head.method != "GET":
            await _respond(stream, 400, "websocket: the method must be GET (RFC 6455 4.1)")
            return
        if not head.get("sec-websocket-key") or head.get("sec-websocket-version") != "13":
            await _respond(
                stream, 400, "websocket: Sec-WebSocket-Key and Sec-WebSocket-Version 13 required"
            )
            return
        offered = head.tokens("sec-websocket-protocol")
        ports: tuple[int, ...] = ()
        if isinstance(request, PortForwardRequest):
            supported = [portforward.SPDY_TUNNEL_PROTOCOL, *portforward.WEBSOCKET_CHANNEL_PROTOCOLS]
            protocol = _negotiate(offered, supported)
            if protocol is not None and protocol != portforward.SPDY_TUNNEL_PROTOCOL:
                try:
                    ports = request.ports or _query_ports(head.target)
                except ValueError as exc:
                    await _respond(stream, 400, str(exc))
                    return
        else:
            supported = list(remotecommand.WEBSOCKET_PROTOCOLS)
            protocol = _negotiate(offered, supported)
        if protocol is None:
            await _respond(
                stream,
                403,
                f"requested protocol(s) are not supported: {offered}; supports {supported}",
            )
            return
        kind = _KINDS[type(request)]
        async with trio.open_nursery() as ws_nursery:
            ws_request = None
            with trio.move_on_after(HEAD_TIMEOUT):
                ws_request = await trio_websocket.wrap_server_stream(
                    ws_nursery,
                    ReplayStream(head.raw, stream),
                    message_queue_size=WS_QUEUE,
                    max_message_size=WS_MAX_MESSAGE,
                    receive_buffer_size=WS_RECEIVE,
                )
            if ws_request is None:
                ws_nursery.cancel_scope.cancel()
                return
            ws = await ws_request.accept(subprotocol=protocol or None)
            try:
                async with self._session(kind, "websocket", protocol, request) as idle:
                    if isinstance(request, PortForwardRequest):
                        if protocol == portforward.SPDY_TUNNEL_PROTOCOL:
                            session = SpdySession(
                                WebSocketByteStream(ws),
                                idle=idle,
                                policy=portforward.spdy_stream_policy,
                            )
                            await session.run(
                                functools.partial(
                                    _spdy_port_forward,
                                    request=request,
                                    backend=backend,
                                    limits=self.limits,
                                )
                            )
                        else:
                            await portforward.serve_websocket_channels(
                                ws,
                                base64=portforward.WEBSOCKET_CHANNEL_PROTOCOLS[protocol],
                                ports=ports,
                                sandbox_id=request.sandbox_id,
                                backend=backend,
                                idle=idle,
                            )
                    else:
                        await remotecommand.serve_websocket(ws, protocol, request, backend, idle)
            finally:
                with trio.CancelScope(shield=True), trio.move_on_after(WS_CLOSE_TIMEOUT):
                    await ws.aclose()
                ws_nursery.cancel_scope.cancel()


async def _spdy_port_forward(
    session: SpdySession,
    *,
    request: PortForwardRequest,
    backend: StreamBackend,
    limits: SessionLimits,
) -> None:
    await portforward.serve_spdy(session, request.sandbox_id, backend, limits)


def _negotiate(offered: list[str], supported: list[str]) -> str | None:
    """The client's first protocol we serve; "" when it proposed none and we take none."""
    if not offered:
        return "" if "" in supported else None
    return next((p for p in offered if p and p in supported), None)


def _query_ports(target: str) -> tuple[int, ...]:
    """Ports from ``?ports=80,8080&ports=443`` (kubelet ``NewV4Options``).

    Raises:
        ValueError: no ports, or one that is not a port.
    """
    values = parse_qs(target.partition("?")[2], keep_blank_values=True).get("ports", [])
    if not values:
        raise ValueError('query parameter "ports" is required')
    ports = []
    for value in values:
        if not value:
            raise ValueError('query parameter "ports" cannot be empty')
        for item in value.split(","):
            ports.append(portforward.parse_port(item))
    return tuple(ports)


def _ids(request: StreamRequest) -> dict[str, str]:
    if isinstance(request, PortForwardRequest):
        return {"sandbox_id": request.sandbox_id}
    return {"container_id": request.container_id}


async def _read_head(stream: trio.abc.Stream) -> _Head | None:
    """Read one request head (and a body, if any); None if the client gave up or sent garbage."""
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD_BYTES)
    raw = bytearray()
    request: h11.Request | None = None
    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError as exc:
            log.debug("bad stream request", error=str(exc))
            return None
        if event is h11.NEED_DATA:
            if len(raw) > MAX_HEAD_BYTES:
                return None  # A body: these endpoints take none.
            data = await stream.receive_some(RECEIVE_SIZE)
            if not data:
                return None
            raw += data
            conn.receive_data(bytes(data))
        elif isinstance(event, h11.Request):
            request = event
        elif isinstance(event, h11.EndOfMessage) or event is h11.PAUSED:
            break
        elif isinstance(event, h11.ConnectionClosed):
            return None
    if request is None:
        return None
    trailing = conn.trailing_data[0]
    return _Head(
        method=request.method.decode("latin-1"),
        target=request.target.decode("latin-1"),
        headers=tuple((k.decode("latin-1"), v.decode("latin-1")) for k, v in request.headers),
        raw=bytes(raw),
        trailing=bytes(trailing),
    )


async def _respond(
    stream: trio.abc.Stream,
    code: int,
    text: str,
    extra_headers: list[tuple[str, str]] | None = None,
) -> None:
    body = (text + "\n").encode()
    headers = [
        ("Content-Type", "text/plain; charset=utf-8"),
        ("Content-Length", str(len(body))),
        ("Connection", "close"),
        *(extra_headers or []),
    ]
    head = f"HTTP/1.1 {code} {HTTPStatus(code).phrase}\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in headers) + "\r\n"
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
        await stream.send_all(head.encode("latin-1") + body)
