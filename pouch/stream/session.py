"""Stream sessions: what a token stands for, limits, and SPDY sessions with I/O.

A *session* is one upgraded connection to the stream server: an exec, an
attach or a port-forward.  This module holds what every session needs:

- the requests a token stands for (`ExecRequest`, `AttachRequest`,
  `PortForwardRequest`), built by the CRI edge from the protobuf messages;
- `SessionLimits` (the kubelet streaming server's timeouts) and `IdleTimer`;
- `SpdySession`: the I/O around the sans-IO `SpdyConnection`
  (``pouch.stream.protocol.spdy``).  One reader task turns bytes into events
  and routes them; writers share one lock, inside which every frame is
  *made* as well as written, because header blocks share one zlib stream
  per direction and must reach the wire in the order they were compressed.

The protocols on top (remotecommand, port-forward) live in
``pouch.stream.remotecommand`` and ``pouch.stream.portforward``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Awaitable, Callable
from typing import Final, TypeAlias

import attrs
import trio

from pouch.log import get_logger
from pouch.stream.protocol import spdy

__all__ = [
    "AttachRequest",
    "ExecRequest",
    "IdleTimer",
    "PortForwardRequest",
    "SessionLimits",
    "SpdySession",
    "SpdyStream",
    "StreamRequest",
]

log = get_logger("pouch.stream")

#: Bytes asked of the transport per read.
RECEIVE_SIZE: Final = 64 * 1024
#: DATA payloads queued per stream before the session's reader waits for the
#: stream's consumer.  Small: the socket buffers hold the rest, and a stream
#: nobody reads must be marked (`SpdyStream.discard_input`), not buffered.
INBOUND_CHUNKS: Final = 16
#: Streams opened by the peer and not yet taken by the protocol handler;
#: beyond that they are refused (RST_STREAM REFUSED_STREAM).
PENDING_STREAMS: Final = 128
#: Time given to a goodbye (GOAWAY, a last status, a WebSocket close) when a
#: session ends, and to the peer to close its side after ours.
GOODBYE_TIMEOUT: Final = 2.0


# --------------------------------------------------------------------------
# What a token stands for
# --------------------------------------------------------------------------


@attrs.frozen
class ExecRequest:
    """A command to run in a container, with the streams the client wants."""

    container_id: str
    cmd: tuple[str, ...]
    tty: bool = False
    stdin: bool = False
    stdout: bool = False
    stderr: bool = False


@attrs.frozen
class AttachRequest:
    """An attach to a running container's stdio."""

    container_id: str
    tty: bool = False
    stdin: bool = False
    stdout: bool = False
    stderr: bool = False


@attrs.frozen
class PortForwardRequest:
    """Port-forwarding into a pod; ``ports`` may be empty (SPDY names them per stream)."""

    sandbox_id: str
    ports: tuple[int, ...] = ()


StreamRequest: TypeAlias = ExecRequest | AttachRequest | PortForwardRequest


@attrs.frozen
class SessionLimits:
    """Timeouts of the stream server (kubelet ``streaming.Config`` defaults).

    Attributes:
        token_ttl: A URL is good for one use within this time
            (kubelet ``StreamingConnectionIdleTimeout``'s sibling ``CacheTTL``).
        idle_timeout: A session that moves no byte for this long is closed
            (kubelet ``--streaming-connection-idle-timeout``, 4 h).
        stream_creation_timeout: After the upgrade, the client must open the
            streams it asked for within this time (kubelet
            ``DefaultStreamCreationTimeout``, 30 s).
    """

    token_ttl: float = 60.0
    idle_timeout: float = 4 * 3600.0
    stream_creation_timeout: float = 30.0


class IdleTimer:
    """A cancel scope whose deadline moves forward whenever bytes move.

    ``touch()`` is called per frame or message; it only reschedules the
    deadline when it has moved by more than a second, so a 100 MB transfer
    does not reshuffle Trio's deadline heap thousands of times.
    """

    _GRANULARITY: Final = 1.0

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.scope = trio.CancelScope()
        self._set_at = -math.inf
        self.touch()

    def touch(self) -> None:
        now = trio.current_time()
        if now - self._set_at >= self._GRANULARITY:
            self._set_at = now
            self.scope.deadline = now + self.timeout

    @property
    def expired(self) -> bool:
        return self.scope.cancelled_caught


# --------------------------------------------------------------------------
# SPDY streams and sessions
# --------------------------------------------------------------------------

#: Decides on a stream the peer opens: None accepts it, a string is the
#: reason to refuse it.
StreamPolicy: TypeAlias = Callable[[spdy.SynStream], str | None]


def accept_all(event: spdy.SynStream) -> str | None:
    return None


class SpdyStream(trio.abc.HalfCloseableStream):
    """One stream the peer opened, as a Trio byte stream.

    ``receive_some`` returns ``b""`` once the peer has sent FIN or reset the
    stream, or the session is gone.  ``send_eof`` sends FIN; ``aclose``
    sends FIN and stops reading; `reset` aborts the stream.
    """

    def __init__(self, session: SpdySession, event: spdy.SynStream) -> None:
        self.stream_id = event.stream_id
        self.headers = event.headers
        self._session = session
        self._in_tx, self._in_rx = trio.open_memory_channel[bytes](INBOUND_CHUNKS)
        self._pending = memoryview(b"")
        self._local_open = True
        self._remote_open = not event.fin
        self._reset = False
        if event.fin:
            self._in_tx.close()

    def header(self, name: str) -> str | None:
        """The first value of header *name* (lower case on the wire)."""
        for key, value in self.headers:
            if key == name:
                return value
        return None

    def __repr__(self) -> str:
        return f"<SpdyStream {self.stream_id} {dict(self.headers)!r}>"

    # -- receiving -----------------------------------------------------------

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if max_bytes is not None and max_bytes < 1:
            raise ValueError("max_bytes must be >= 1")
        if not self._pending:
            try:
                chunk = await self._in_rx.receive()
            except (trio.EndOfChannel, trio.ClosedResourceError):
                return b""
            self._pending = memoryview(chunk)
        else:
            await trio.lowlevel.checkpoint()
        size = len(self._pending) if max_bytes is None else max_bytes
        out = bytes(self._pending[:size])
        self._pending = self._pending[size:]
        return out

    def discard_input(self) -> None:
        """Drop whatever the peer sends on this stream from now on.

        For streams the protocol never reads (remotecommand's stdout, the
        error stream): their data must not hold up the session's reader.
        """
        self._in_rx.close()
        self._pending = memoryview(b"")

    async def _deliver(self, data: bytes, fin: bool) -> None:
        if data:
            # Closed: discarded, or after FIN.
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await self._in_tx.send(data)
        if fin:
            self._in_tx.close()
            self._remote_open = False
            self._forget_if_done()

    def _forget_if_done(self) -> None:
        # Both sides sent FIN: the session need not route anything to it.
        if not self._local_open and not self._remote_open:
            self._session._forget(self.stream_id)

    def _input_ended(self) -> None:
        self._in_tx.close()

    # -- sending -------------------------------------------------------------

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if not self._local_open:
            raise trio.ClosedResourceError(f"stream {self.stream_id} is closed for sending")
        if self._reset:
            raise trio.BrokenResourceError(f"stream {self.stream_id} was reset")
        if data:
            await self._session._send_data(self.stream_id, data, fin=False)
        else:
            await trio.lowlevel.checkpoint()

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.checkpoint()

    async def send_eof(self) -> None:
        """Send FIN; a second call, or one after a reset, does nothing."""
        if not self._local_open or self._reset or self._session.broken:
            await trio.lowlevel.checkpoint()
            return
        self._local_open = False
        # Broken: reset by the peer meanwhile, or the session is gone.
        with contextlib.suppress(trio.BrokenResourceError):
            await self._session._send_data(self.stream_id, b"", fin=True)
        self._forget_if_done()

    async def aclose(self) -> None:
        self.discard_input()
        await self.send_eof()

    async def reset(self, status: int = spdy.RstStatus.CANCEL) -> None:
        """Abort the stream both ways (RST_STREAM)."""
        self.discard_input()
        if self._reset:
            await trio.lowlevel.checkpoint()
            return
        self._reset = True
        self._local_open = False
        self._session._forget(self.stream_id)
        with contextlib.suppress(trio.BrokenResourceError):
            await self._session._write(
                lambda: self._session._conn.rst_stream(self.stream_id, status)
            )

    def _reset_by_peer(self) -> None:
        self._reset = True
        self._in_tx.close()


class SpdySession:
    """The server end of one SPDY/3.1 session over a byte stream.

    Run it with `run`; the handler takes the peer's streams with
    `accept_stream`.  When the peer goes away (EOF, a broken connection, a
    session error) the handler is cancelled: a session without its client
    has nothing left to do, and an exec's process must be stopped.

    Args:
        transport: The upgraded connection.
        idle: Touched when a stream opens and when data moves either way
            (PINGs do not count).
        policy: Accepts or refuses each stream the peer opens.
    """

    def __init__(
        self,
        transport: trio.abc.HalfCloseableStream,
        *,
        idle: IdleTimer | None = None,
        policy: StreamPolicy = accept_all,
    ) -> None:
        self._transport = transport
        self._idle = idle
        self._policy = policy
        self._conn = spdy.SpdyConnection(is_server=True)
        self._lock = trio.StrictFIFOLock()
        self._streams: dict[int, SpdyStream] = {}
        self._new_tx, self._new_rx = trio.open_memory_channel[SpdyStream](PENDING_STREAMS)
        self._window = trio.lowlevel.ParkingLot()
        self.broken = False
        self.peer_gone = False

    # -- the handler's side ----------------------------------------------------

    async def run(self, handler: Callable[[SpdySession], Awaitable[None]]) -> None:
        """Serve the session until *handler* returns or the peer goes away.

        Then say goodbye (GOAWAY), let the peer close first for a moment,
        and close the transport.
        """
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._read_loop, nursery.cancel_scope)
                await handler(self)
                nursery.cancel_scope.cancel()
        finally:
            await self._goodbye()

    async def accept_stream(self) -> SpdyStream:
        """The next stream the peer opened (SYN_REPLY already sent).

        Raises:
            trio.EndOfChannel: the peer has gone away.
        """
        return await self._new_rx.receive()

    def refuse_new_streams(self) -> None:
        """Streams the peer opens from now on are refused."""
        self._policy = _refuse_all

    # -- reading ---------------------------------------------------------------

    async def _read_loop(self, session_scope: trio.CancelScope) -> None:
        try:
            await self._read_frames()
            # The peer is gone (EOF, a broken connection, a session error):
            # the handler has nothing left to do.
            self.peer_gone = True
            session_scope.cancel()
        finally:
            self._new_tx.close()
            for stream in self._streams.values():
                stream._input_ended()
            self._window.unpark_all()

    async def _read_frames(self) -> None:
        while True:
            try:
                data = await self._transport.receive_some(RECEIVE_SIZE)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return
            if not data:
                return
            try:
                events = self._conn.receive_data(data)
            except spdy.SpdyProtocolError as exc:
                log.info("spdy session error", reason=str(exc))
                goaway = self._conn.goaway(self._conn.last_peer_stream_id, exc.status)
                with contextlib.suppress(trio.BrokenResourceError):
                    await self._write_frames(goaway)
                return
            for event in events:
                await self._dispatch(event)

    async def _dispatch(self, event: spdy.Event) -> None:
        match event:
            case spdy.SynStream():
                self._touch()
                await self._on_syn_stream(event)
            case spdy.Data():
                self._touch()
                stream = self._streams.get(event.stream_id)
                if stream is not None:
                    await stream._deliver(event.data, event.fin)
                # Credit back once delivered: the bounded inbound queue, not
                # the window, is what holds a fast peer back (spdystream
                # ignores windows anyway).
                # WINDOW_UPDATE carries no header block, so it may be made
                # outside the write lock.
                credit = self._conn.acknowledge_received(event.stream_id, len(event.data))
                if credit:
                    await self._write_frames(credit)
            case spdy.RstStream():
                stream = self._streams.pop(event.stream_id, None)
                if stream is not None:
                    stream._reset_by_peer()
                self._window.unpark_all()
            case spdy.StreamError():
                log.debug("spdy stream error", stream_id=event.stream_id, reason=event.reason)
                stream = self._streams.pop(event.stream_id, None)
                if stream is not None:
                    stream._reset_by_peer()
                await self._write(lambda: self._conn.rst_stream(event.stream_id, event.status))
            case spdy.Ping(needs_reply=True):
                await self._write(lambda: self._conn.ping(event.ping_id))
            case spdy.WindowUpdate():
                self._window.unpark_all()
            case _:
                # SETTINGS, GOAWAY (the peer takes no streams from us; we open
                # none), HEADERS, pings we never sent: nothing to do.
                pass

    async def _on_syn_stream(self, event: spdy.SynStream) -> None:
        sid = event.stream_id
        reason = "unidirectional streams are not used" if event.unidirectional else None
        reason = reason or self._policy(event)
        if reason is None:
            stream = SpdyStream(self, event)
            self._streams[sid] = stream
            await self._write(lambda: self._conn.syn_reply(sid, ()))
            try:
                self._new_tx.send_nowait(stream)
                return
            except (trio.WouldBlock, trio.ClosedResourceError):
                reason = "too many streams waiting"
            self._streams.pop(sid, None)
        log.info("spdy stream refused", stream_id=sid, headers=dict(event.headers), reason=reason)
        await self._write(lambda: self._conn.rst_stream(sid, spdy.RstStatus.REFUSED_STREAM))

    def _touch(self) -> None:
        # Only streams and their data count as activity, not PINGs: kubectl
        # port-forward pings every few seconds and would never be idle.
        if self._idle is not None:
            self._idle.touch()

    def _forget(self, stream_id: int) -> None:
        self._streams.pop(stream_id, None)

    # -- writing ---------------------------------------------------------------

    async def _write(self, make: Callable[[], bytes]) -> None:
        """Make frames and write them, in one critical section (see module doc)."""
        async with self._lock:
            if self.broken:
                raise trio.BrokenResourceError("the session's connection is gone")
            data = make()
            if data:
                await self._send_raw(data)

    async def _write_frames(self, frames: bytes) -> None:
        """Write frames made earlier: only for frames without a header block."""
        async with self._lock:
            if self.broken:
                raise trio.BrokenResourceError("the session's connection is gone")
            await self._send_raw(frames)

    async def _send_raw(self, data: bytes | bytearray | memoryview) -> None:
        try:
            await self._transport.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self.broken = True
            raise trio.BrokenResourceError("the session's connection is gone") from exc

    async def _send_data(
        self, stream_id: int, data: bytes | bytearray | memoryview, *, fin: bool
    ) -> None:
        view = memoryview(data).cast("B")
        while True:
            chunk = view
            if view and self._conn.peer_uses_flow_control:
                # Only a peer that has shown it does flow control is waited
                # for; spdystream never grants credit (see spdy.py).
                while (allowance := self._conn.send_window(stream_id)) <= 0:
                    if self.broken or self.peer_gone or stream_id not in self._streams:
                        raise trio.BrokenResourceError(f"stream {stream_id} is gone")
                    await self._window.park()
                chunk = view[:allowance]
            view = view[len(chunk) :]
            last = not view
            async with self._lock:
                if self.broken:
                    raise trio.BrokenResourceError("the session's connection is gone")
                try:
                    frames = self._conn.data(stream_id, chunk, fin=fin and last)
                except spdy.SpdyStateError as exc:
                    raise trio.BrokenResourceError(str(exc)) from None
                await self._send_raw(frames)
            self._touch()
            if last:
                return

    # -- closing ---------------------------------------------------------------

    async def _goodbye(self) -> None:
        """GOAWAY, half-close, wait briefly for the peer's close, then close.

        Closing a socket with unread input makes the kernel send RST, which
        can destroy output the peer has not read yet (the exit status!), so
        the peer gets a moment to finish reading and close first.
        """
        with trio.CancelScope(shield=True), trio.move_on_after(GOODBYE_TIMEOUT):
            try:
                if not self.broken and not self.peer_gone:
                    await self._write(lambda: self._conn.goaway(self._conn.last_peer_stream_id))
                if not self.broken:
                    await self._transport.send_eof()
                while not self.peer_gone and await self._transport.receive_some(RECEIVE_SIZE):
                    pass
            except (trio.BrokenResourceError, trio.ClosedResourceError, trio.BusyResourceError):
                pass
        with trio.CancelScope(shield=True):
            await self._transport.aclose()


def _refuse_all(event: spdy.SynStream) -> str | None:
    return "the session takes no more streams"
