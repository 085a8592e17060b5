"""Port-forward sessions, server side (kubelet ``cri/streaming/portforward``).

- **SPDY** (``portforward.k8s.io``): each forwarded connection is a pair of
  streams the client opens, ``streamType: error`` and ``streamType: data``,
  with the same ``port`` and ``requestID`` headers.  Once both exist the
  data stream is joined to a new TCP connection to ``localhost:port`` in
  the pod; a failure is written to the error stream as text.  A pair not
  complete within the stream-creation timeout is dropped.  A session
  carries any number of pairs at once.
- **SPDY in WebSocket** (``SPDY/3.1+portforward.k8s.io``): the same session,
  its bytes carried in binary WebSocket messages.  This is what
  ``kubectl port-forward`` speaks since 1.31 (client-go
  ``NewSPDYOverWebsocketDialer``); the API server usually unwraps it, and
  here, with the request spliced through as a kubelet would, we do.
- **WebSocket channels** (``v4.channel.k8s.io``, ``v4.base64.channel.k8s.io``):
  one connection per requested port, for the whole session.  Port *i* has
  data channel ``2*i`` and error channel ``2*i+1``; the first message on
  each carries the port as two little-endian bytes.  The session ends when
  every connection has.

Both directions are copied with half-close kept: the client's end of its
data becomes a ``shutdown(SHUT_WR)`` towards the pod, and the pod's end
becomes FIN on the data stream.
"""

from __future__ import annotations

import contextlib
import struct
from typing import TYPE_CHECKING, Final

import attrs
import trio

from pouch import errors
from pouch.log import get_logger
from pouch.stream.websocket import ChannelMux

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Sequence

    import trio_websocket

    from pouch.stream.backend import StreamBackend
    from pouch.stream.protocol import spdy
    from pouch.stream.remotecommand import Sink, Source
    from pouch.stream.session import IdleTimer, SessionLimits, SpdySession, SpdyStream

__all__ = [
    "SPDY_PROTOCOLS",
    "SPDY_TUNNEL_PROTOCOL",
    "WEBSOCKET_CHANNEL_PROTOCOLS",
    "forward",
    "serve_spdy",
    "serve_websocket_channels",
    "spdy_stream_policy",
]

log = get_logger("pouch.stream")

COPY_SIZE: Final = 64 * 1024
#: Once the pod has closed, how long the client may still send.
POD_EOF_GRACE: Final = 1.0

#: ``X-Stream-Protocol-Version`` values (kubelet ``SupportedPortForwardProtocols``).
SPDY_PROTOCOLS: Final = ("portforward.k8s.io",)
#: The WebSocket subprotocol of SPDY tunnelled in WebSocket.
SPDY_TUNNEL_PROTOCOL: Final = "SPDY/3.1+portforward.k8s.io"
#: Channel subprotocol -> base64 coding; "" is a client that proposed none.
WEBSOCKET_CHANNEL_PROTOCOLS: Final = {
    "v4.channel.k8s.io": False,
    "v4.base64.channel.k8s.io": True,
    "": False,
}

# Header names as they travel in SPDY (lower case).
_PORT: Final = "port"
_STREAM_TYPE: Final = "streamtype"
_REQUEST_ID: Final = "requestid"
_DATA: Final = "data"
_ERROR: Final = "error"


def parse_port(text: str | None) -> int:
    """A port as kubelet reads it (``strconv.ParseUint(s, 10, 16)``, > 0).

    Raises:
        ValueError: with kubelet's message.
    """
    if not text:
        raise ValueError(f"{_PORT!r} header is required")
    if not text.isdigit() or int(text) >= 1 << 16:
        raise ValueError(f"unable to parse {text!r} as a port")
    port = int(text)
    if port < 1:
        raise ValueError(f"port {text!r} must be > 0")
    return port


def spdy_stream_policy(event: spdy.SynStream) -> str | None:
    """Accept a stream only with a valid ``port`` and ``streamType`` (kubelet
    ``httpStreamReceived``); others are refused with RST_STREAM."""
    try:
        parse_port(event.get(_PORT))
    except ValueError as exc:
        return str(exc)
    kind = event.get(_STREAM_TYPE)
    if not kind:
        return f"{_STREAM_TYPE!r} header is required"
    if kind not in (_DATA, _ERROR):
        return f"invalid stream type {kind!r}"
    return None


# --------------------------------------------------------------------------
# One forwarded connection
# --------------------------------------------------------------------------


async def forward(
    backend: StreamBackend,
    sandbox_id: str,
    port: int,
    client_in: Source,
    client_out: Sink,
    report: Callable[[str], Awaitable[None]],
    *,
    end_on_pod_eof: bool = False,
) -> None:
    """Join a client's byte streams to a new connection to *port* in the pod.

    The client's end of input is passed on as a half-close, and the pod's
    answer is awaited for as long as it takes.  The pod's end of output is
    passed on too, and ends the connection `POD_EOF_GRACE` later.

    Args:
        report: Writes an error message to the client (the error stream).
        end_on_pod_eof: Stop once the pod has closed, without waiting for
            the client's end (WebSocket channels have no end of their own).

    A failure to connect is reported; a connection that breaks later just
    ends (kubectl >= 1.29 abandons the whole port-forward on any reported
    error, and a peer resetting its socket is no reason for that).
    """
    try:
        upstream = await backend.port_forward(sandbox_id, port)
    except errors.PouchError as exc:
        message = f"error forwarding port {port} to pod {sandbox_id}, uid : {exc}"
        log.info("port-forward failed", sandbox_id=sandbox_id, port=port, error=str(exc))
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await report(message)
        return
    async with upstream, trio.open_nursery() as nursery:
        nursery.start_soon(_client_to_pod, client_in, upstream)
        aborted = await _pod_to_client(upstream, client_out)
        if aborted or end_on_pod_eof:
            nursery.cancel_scope.cancel()
        else:
            # kubectl ends its side only after the error stream has ended,
            # which follows the end of this call: waiting for it would
            # deadlock a client that reads until EOF.  containerd gives the
            # other direction a second, too.
            nursery.cancel_scope.deadline = trio.current_time() + POD_EOF_GRACE


async def _pod_to_client(upstream: trio.abc.Stream, client_out: Sink) -> bool:
    """Copy until the pod closes; True if the client side broke instead."""
    try:
        while data := await upstream.receive_some(COPY_SIZE):
            try:
                await client_out.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return True
    except trio.BrokenResourceError as exc:
        log.debug("port-forward connection broken by the pod", error=str(exc.__cause__ or exc))
    try:
        await client_out.send_eof()
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        return True
    return False


async def _client_to_pod(client_in: Source, upstream: trio.abc.Stream) -> None:
    try:
        while data := await client_in.receive_some(COPY_SIZE):
            await upstream.send_all(data)
        if isinstance(upstream, trio.abc.HalfCloseableStream):
            await upstream.send_eof()
    except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
        # The pod closed its side; its end of the output follows.
        log.debug("port-forward connection closed by the pod", error=str(exc.__cause__ or exc))


# --------------------------------------------------------------------------
# SPDY (also tunnelled in WebSocket)
# --------------------------------------------------------------------------


@attrs.define
class _Pair:
    request_id: str
    data: SpdyStream | None = None
    error: SpdyStream | None = None
    complete: trio.Event = attrs.field(factory=trio.Event)

    def add(self, stream: SpdyStream) -> str | None:
        """File *stream* under its type; an error message if it cannot be."""
        kind = stream.header(_STREAM_TYPE)
        if kind == _DATA:
            if self.data is not None:
                return "data stream already assigned"
            self.data = stream
        elif kind == _ERROR:
            if self.error is not None:
                return "error stream already assigned"
            self.error = stream
            stream.discard_input()  # kubectl closes its side at once.
        else:
            return f"unexpected stream type {kind!r}"
        if self.data is not None and self.error is not None:
            self.complete.set()
        return None

    async def print_error(self, message: str) -> None:
        if self.error is not None:
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await self.error.send_all(message.encode())

    async def close(self) -> None:
        for stream in (self.data, self.error):
            if stream is not None:
                await stream.aclose()


def _request_id(stream: SpdyStream) -> str:
    request_id = stream.header(_REQUEST_ID)
    if request_id:
        return request_id
    # Clients before requestID (kubelet's best effort): the pair's streams
    # have consecutive odd ids, error first.
    offset = 2 if stream.header(_STREAM_TYPE) == _DATA else 0
    return str(stream.stream_id - offset)


async def serve_spdy(
    session: SpdySession,
    sandbox_id: str,
    backend: StreamBackend,
    limits: SessionLimits,
) -> None:
    """Serve stream pairs until the client goes away."""
    pairs: dict[str, _Pair] = {}
    async with trio.open_nursery() as nursery:
        while True:
            try:
                stream = await session.accept_stream()
            except trio.EndOfChannel:
                break
            request_id = _request_id(stream)
            pair = pairs.get(request_id)
            if pair is None:
                pair = pairs[request_id] = _Pair(request_id)
                nursery.start_soon(_watch_pair, pair, pairs, limits.stream_creation_timeout)
            problem = pair.add(stream)
            if problem is not None:
                await pair.print_error(
                    f"error processing stream for request {request_id}: {problem}"
                )
                await stream.reset()
            elif pair.complete.is_set():
                nursery.start_soon(_forward_pair, pair, sandbox_id, backend)
        nursery.cancel_scope.cancel()


async def _watch_pair(pair: _Pair, pairs: dict[str, _Pair], creation_timeout: float) -> None:
    with trio.move_on_after(creation_timeout):
        await pair.complete.wait()
    if pairs.get(pair.request_id) is pair:
        del pairs[pair.request_id]  # The id may be used again (kubelet does the same).
    if not pair.complete.is_set():
        message = f"timed out waiting for streams of request {pair.request_id}"
        log.info("port-forward stream pair incomplete", request_id=pair.request_id)
        await pair.print_error(message)
        await pair.close()


async def _forward_pair(pair: _Pair, sandbox_id: str, backend: StreamBackend) -> None:
    assert pair.data is not None
    assert pair.error is not None
    data, error = pair.data, pair.error
    try:
        port = parse_port(data.header(_PORT))  # Checked by the policy already.

        async def report(message: str) -> None:
            await error.send_all(message.encode())

        await forward(backend, sandbox_id, port, data, data, report)
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(1):
            await pair.close()


# --------------------------------------------------------------------------
# WebSocket channels
# --------------------------------------------------------------------------


async def serve_websocket_channels(
    ws: trio_websocket.WebSocketConnection,
    *,
    base64: bool,
    ports: Sequence[int],
    sandbox_id: str,
    backend: StreamBackend,
    idle: IdleTimer | None = None,
) -> None:
    """One connection per port for the whole session (kubelet ``websocket.go``)."""
    mux = ChannelMux(
        ws,
        base64=base64,
        close_signal=False,
        inputs=[2 * i for i in range(len(ports))],
        idle=idle,
    )
    async with trio.open_nursery() as nursery:
        nursery.start_soon(mux.run, nursery.cancel_scope)
        for i, port in enumerate(ports):
            prefix = struct.pack("<H", port)
            await mux.send(2 * i, prefix)
            await mux.send(2 * i + 1, prefix)
        async with trio.open_nursery() as forwards:
            for i, port in enumerate(ports):
                error = mux.output(2 * i + 1)
                forwards.start_soon(
                    _forward_channel, backend, sandbox_id, port, mux, 2 * i, error.send_all
                )
        nursery.cancel_scope.cancel()


async def _forward_channel(
    backend: StreamBackend,
    sandbox_id: str,
    port: int,
    mux: ChannelMux,
    channel: int,
    send_error: Callable[[bytes], Awaitable[None]],
) -> None:
    async def report(message: str) -> None:
        await send_error(message.encode())

    await forward(
        backend,
        sandbox_id,
        port,
        mux.input(channel),
        mux.output(channel),
        report,
        end_on_pod_eof=True,
    )
