"""Clients of the stream protocols: exec, attach and port-forward, as kubectl speaks them.

The CRI's Exec, Attach and PortForward calls answer with a URL on the
runtime's stream server (pouchd's `pouch.stream.server`, containerd's and
CRI-O's copies of the kubelet's).  This module is the other end, in Trio,
for ``pouch exec``, ``pouch attach`` and ``pouch port-forward`` and for the
benchmarks:

- `remote_command`: an exec or attach session.
  Over **WebSocket** (the default) it offers ``v5.channel.k8s.io`` then
  ``v4.channel.k8s.io``; the server takes the first it speaks.  Every message
  is ``<channel byte><data>``: 0 stdin, 1 stdout, 2 stderr, 3 error (the
  outcome, a ``metav1.Status`` as JSON), 4 resize (``{"Width":w,"Height":h}``);
  v5 adds ``[255, 0]``, the end of stdin.  v4 cannot say that: stdin's end
  then goes unsaid.  Over **SPDY/3.1** (``X-Stream-Protocol-Version:
  v4.channel.k8s.io``) the client opens a stream per standard stream, named
  by its ``streamtype`` header (``error`` first, as kubectl does), and the end
  of stdin is the stdin stream's FIN.  Either way the session ends when the
  server has sent all output and the status: `SessionResult`.
- `port_forward`: listens on local ports and carries each accepted
  connection to a port of the pod as a pair of SPDY streams
  (``portforward.k8s.io``: ``streamtype`` ``error`` and ``data``, with the
  same ``port`` and ``requestID``), over one SPDY session for all of them,
  either on the upgraded connection itself or tunnelled in WebSocket
  binary messages (``SPDY/3.1+portforward.k8s.io``, kubectl >= 1.31).  A pair
  keeps half-close both ways: the local client's end of input becomes the
  data stream's FIN, which the server turns into a ``shutdown(SHUT_WR)``
  towards the pod.

`SpdyClientSession` is the client half of SPDY/3.1 on the sans-IO
`pouch.stream.protocol.spdy.SpdyConnection`, as spdystream behaves: streams
have odd ids, each waits for its SYN_REPLY before it is used, pings are
answered, and no WINDOW_UPDATE is ever sent (so a pouchd server never waits
for credit; spdystream peers ignore windows anyway).

The local side is the caller's: any `Source` (``receive_some``; ``b""`` at
the end) for stdin and any `Sink` (``send_all``) for output, with helpers for
a process's own stdio (`FileSource`, `FileSink`, `RawTerminal`,
`watch_terminal_size`) and `DetachKeys` for docker's Ctrl-P Ctrl-Q.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import os
import signal
import termios
import tty as _tty
from typing import TYPE_CHECKING, Any, BinaryIO, Final, Literal, Protocol
from urllib.parse import urlsplit

import attrs
import trio
import trio_websocket

from pouch.stream.protocol import spdy
from pouch.stream.websocket import WebSocketByteStream

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
    from types import TracebackType

__all__ = [
    "PORT_FORWARD_PROTOCOL",
    "PORT_FORWARD_TUNNEL_PROTOCOL",
    "SPDY_PROTOCOLS",
    "WEBSOCKET_PROTOCOLS",
    "DetachKeys",
    "DetachRequested",
    "ExitStatus",
    "FileSink",
    "FileSource",
    "PortForwarder",
    "RawTerminal",
    "SessionResult",
    "Sink",
    "Source",
    "SpdyClientSession",
    "SpdyClientStream",
    "StreamClientError",
    "Target",
    "Transport",
    "UpgradeRefused",
    "encode_resize",
    "parse_status",
    "port_forward",
    "remote_command",
    "terminal_size",
    "unwrap_group",
    "watch_terminal_size",
]

Transport = Literal["websocket", "spdy"]

#: Offered in this order; the server takes the first it speaks (pouchd v5,
#: the kubelet's copies in containerd 1.6 and CRI-O v4).
WEBSOCKET_PROTOCOLS: Final = ("v5.channel.k8s.io", "v4.channel.k8s.io")
#: The SPDY remotecommand version: v4 has a resize stream and a JSON status.
SPDY_PROTOCOLS: Final = ("v4.channel.k8s.io",)
PORT_FORWARD_PROTOCOL: Final = "portforward.k8s.io"
#: SPDY tunnelled in WebSocket binary messages (client-go ``TunnelingConnection``).
PORT_FORWARD_TUNNEL_PROTOCOL: Final = "SPDY/3.1+portforward.k8s.io"

# WebSocket channels (remotecommand ``StreamStdIn`` ... ``StreamResize``, v5 ``StreamClose``).
STDIN_CHANNEL: Final = 0
STDOUT_CHANNEL: Final = 1
STDERR_CHANNEL: Final = 2
ERROR_CHANNEL: Final = 3
RESIZE_CHANNEL: Final = 4
CLOSE_CHANNEL: Final = 255

#: Bytes read from a local source or the network at a time.
COPY_SIZE: Final = 64 * 1024
#: Largest response head accepted for a SPDY upgrade, and largest refusal body kept.
MAX_HEAD: Final = 64 * 1024
#: WebSocket: the largest message accepted (pouchd and kubelet send at most 32 KiB).
WS_MAX_MESSAGE: Final = 16 * 1024 * 1024
WS_QUEUE: Final = 16
WS_RECEIVE: Final = 64 * 1024
#: Time to close a WebSocket politely at the end of a session; when cancelled
#: or failed, only the time to send the close frame.
WS_CLOSE_TIMEOUT: Final = 2.0
WS_CANCELLED_CLOSE_TIMEOUT: Final = 0.1
#: DATA frames queued per SPDY stream before the session's reader waits for its reader.
INBOUND_CHUNKS: Final = 64
#: After a forwarded connection's data ended, how long to wait for its error stream.
ERROR_STREAM_WAIT: Final = 5.0
#: Docker's detach keys: Ctrl-P Ctrl-Q.
DEFAULT_DETACH_KEYS: Final = b"\x10\x11"


class StreamClientError(Exception):
    """The session could not be set up, or broke: the message says why."""


class UpgradeRefused(StreamClientError):
    """The stream server answered the upgrade with an HTTP error.

    Attributes:
        status: the HTTP status code.
        body: the server's explanation (text).
    """

    def __init__(self, status: int, body: str) -> None:
        super().__init__(f"the stream server refused the session: HTTP {status}: {body}".strip())
        self.status = status
        self.body = body


class DetachRequested(Exception):
    """Raised by a stdin `Source` to leave the session without ending stdin."""


class Source(Protocol):
    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray: ...


class Sink(Protocol):
    async def send_all(self, data: bytes | bytearray | memoryview) -> None: ...


# --------------------------------------------------------------------------
# Outcomes
# --------------------------------------------------------------------------


@attrs.frozen
class ExitStatus:
    """The outcome a session's error stream carried (a ``metav1.Status``).

    Attributes:
        code: the command's exit code: 0 on success, the ``ExitCode`` cause
            of a ``NonZeroExitCode`` failure, 1 for any other failure.
        reason: ``""`` on success, else the status's reason
            (``NonZeroExitCode``, ``InternalError``, ...).
        message: the failure's message, ``""`` on success.
    """

    code: int
    reason: str = ""
    message: str = ""

    @property
    def success(self) -> bool:
        return self.code == 0 and not self.message

    @property
    def exited(self) -> bool:
        """The command ran and ended by itself, whatever its code."""
        return self.success or self.reason == "NonZeroExitCode"


def parse_status(payload: bytes, *, json_status: bool = True) -> ExitStatus:
    """Read the error stream's payload as kubectl does.

    v4 and later: a JSON ``metav1.Status``; ``Success``, or ``Failure`` whose
    reason ``NonZeroExitCode`` has the code as the message of its
    ``ExitCode`` cause.  Earlier versions: nothing for success, else the
    failure's message as text.
    """
    if not json_status:
        text = payload.decode("utf-8", "replace").strip()
        return ExitStatus(0) if not text else ExitStatus(1, "Failure", text)
    try:
        document = json.loads(payload)
    except ValueError:
        text = payload.decode("utf-8", "replace").strip()
        return ExitStatus(1, "InvalidStatus", f"the error stream is not a status: {text!r}")
    if not isinstance(document, dict):
        return ExitStatus(1, "InvalidStatus", f"the error stream is not a status: {document!r}")
    if document.get("status") == "Success":
        return ExitStatus(0)
    reason = str(document.get("reason") or "Failure")
    message = str(document.get("message") or "the command failed")
    if reason == "NonZeroExitCode":
        details = document.get("details")
        causes = details.get("causes") if isinstance(details, dict) else None
        for cause in causes if isinstance(causes, list) else []:
            if isinstance(cause, dict) and cause.get("reason") == "ExitCode":
                with contextlib.suppress(TypeError, ValueError):
                    return ExitStatus(int(cause.get("message", "")), reason, message)
        return ExitStatus(1, "InvalidStatus", f"no exit code in the status: {message}")
    return ExitStatus(1, reason, message)


@attrs.frozen
class SessionResult:
    """How a `remote_command` session ended.

    Attributes:
        status: the server's outcome; None if the client left first (detached).
        detached: the client left the session (`DetachRequested`, or the
            quiet period after the end of stdin), leaving the command be.
        protocol: the negotiated subprotocol.
        transport: ``websocket`` or ``spdy``.
    """

    status: ExitStatus | None
    detached: bool
    protocol: str
    transport: Transport


def encode_resize(width: int, height: int) -> bytes:
    """A terminal size as kubectl sends it (``json.Encoder``: one object and a newline)."""
    return json.dumps({"Width": width, "Height": height}, separators=(",", ":")).encode() + b"\n"


# --------------------------------------------------------------------------
# URLs and upgrades
# --------------------------------------------------------------------------


@attrs.frozen
class Target:
    """Where a stream URL points: ``http://host:port/path?query``."""

    host: str
    port: int
    resource: str

    @classmethod
    def from_url(cls, url: str) -> Target:
        """Raises: StreamClientError: not an ``http://`` URL with a host."""
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise StreamClientError(f"cannot use the stream URL {url!r}: only http:// is supported")
        try:
            port = parts.port or 80
        except ValueError as exc:
            raise StreamClientError(f"bad port in the stream URL {url!r}") from exc
        resource = parts.path or "/"
        if parts.query:
            resource += "?" + parts.query
        return cls(parts.hostname, port, resource)

    @property
    def authority(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


async def _connect(target: Target, connect_timeout: float) -> trio.SocketStream:
    try:
        with trio.fail_after(connect_timeout):
            return await trio.open_tcp_stream(target.host, target.port)
    except trio.TooSlowError:
        raise StreamClientError(
            f"cannot reach the stream server at {target.authority}: timed out"
        ) from None
    except OSError as exc:
        raise StreamClientError(
            f"cannot reach the stream server at {target.authority}: {exc.strerror or exc}"
        ) from exc


async def spdy_upgrade(
    target: Target, protocols: Sequence[str], *, connect_timeout: float = 30.0
) -> tuple[trio.SocketStream, str, bytes]:
    """Upgrade a new connection to SPDY/3.1 as kubectl does.

    Returns:
        The connection, the protocol the server chose, and the bytes that
        followed its response head (the start of the SPDY session).

    Raises:
        UpgradeRefused: the server answered other than 101.
        StreamClientError: no connection, or not an HTTP answer.
    """
    stream = await _connect(target, connect_timeout)
    try:
        request = (
            f"POST {target.resource} HTTP/1.1\r\n"
            f"Host: {target.authority}\r\n"
            "Connection: Upgrade\r\n"
            "Upgrade: SPDY/3.1\r\n"
            + "".join(f"X-Stream-Protocol-Version: {p}\r\n" for p in protocols)
            + "Content-Length: 0\r\n\r\n"
        )
        try:
            with trio.fail_after(connect_timeout):
                await stream.send_all(request.encode("latin-1"))
                status, headers, rest = await _read_response_head(stream)
                if status != 101:
                    body = await _read_body(stream, rest, headers)
                    raise UpgradeRefused(status, body.decode("utf-8", "replace").strip())
        except trio.TooSlowError:
            raise StreamClientError(
                f"the stream server at {target.authority} did not answer the upgrade in time"
            ) from None
        except trio.BrokenResourceError as exc:
            raise StreamClientError("the stream server closed the connection") from exc
    except BaseException:
        with trio.CancelScope(shield=True):
            await stream.aclose()
        raise
    protocol = headers.get("x-stream-protocol-version", "")
    if protocol not in protocols:
        with trio.CancelScope(shield=True):
            await stream.aclose()
        raise StreamClientError(f"the stream server chose an unknown protocol {protocol!r}")
    return stream, protocol, rest


async def _read_response_head(stream: trio.abc.Stream) -> tuple[int, dict[str, str], bytes]:
    buffer = b""
    while b"\r\n\r\n" not in buffer:
        if len(buffer) > MAX_HEAD:
            raise StreamClientError("the stream server's response head is too long")
        try:
            data = await stream.receive_some(COPY_SIZE)
        except trio.BrokenResourceError as exc:
            raise StreamClientError("the stream server closed the connection") from exc
        if not data:
            raise StreamClientError("the stream server closed the connection without answering")
        buffer += data
    head, _, rest = buffer.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    fields = lines[0].split(" ", 2)
    if len(fields) < 2 or not fields[0].startswith("HTTP/") or not fields[1].isdigit():
        raise StreamClientError(f"the stream server did not answer in HTTP: {lines[0]!r}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        key = name.strip().lower()
        headers[key] = f"{headers[key]}, {value.strip()}" if key in headers else value.strip()
    return int(fields[1]), headers, rest


async def _read_body(stream: trio.abc.Stream, body: bytes, headers: dict[str, str]) -> bytes:
    length = headers.get("content-length", "")
    want = int(length) if length.isdigit() else MAX_HEAD
    with contextlib.suppress(trio.BrokenResourceError):
        while len(body) < min(want, MAX_HEAD):
            data = await stream.receive_some(COPY_SIZE)
            if not data:
                break
            body += data
    return body[:want]


@contextlib.asynccontextmanager
async def open_websocket(
    target: Target, protocols: Sequence[str], *, connect_timeout: float = 30.0
) -> AsyncIterator[trio_websocket.WebSocketConnection]:
    """A WebSocket to *target* offering *protocols*; closed politely on exit.

    The TCP connection is ours, and closed on exit whoever closed the
    WebSocket first (trio-websocket's client leaves it open when the
    server closes first).

    Raises:
        UpgradeRefused: the server refused the handshake.
        StreamClientError: no connection, or a subprotocol not offered.
    """
    stream = await _connect(target, connect_timeout)
    try:
        async with stream, trio.open_nursery() as nursery:
            try:
                with trio.fail_after(connect_timeout):
                    ws = await trio_websocket.wrap_client_stream(
                        nursery,
                        stream,
                        target.authority,
                        target.resource,
                        subprotocols=list(protocols),
                        message_queue_size=WS_QUEUE,
                        max_message_size=WS_MAX_MESSAGE,
                        receive_buffer_size=WS_RECEIVE,
                    )
            except trio.TooSlowError:
                raise StreamClientError(
                    f"the stream server at {target.authority} did not answer the upgrade in time"
                ) from None
            # Cancelled from outside, the reader task is cancelled too and
            # cannot see the server's answer: send the close, do not wait.
            close_timeout = WS_CANCELLED_CLOSE_TIMEOUT
            try:
                if ws.subprotocol not in protocols:
                    raise StreamClientError(
                        f"the stream server chose an unknown protocol {ws.subprotocol!r}"
                    )
                yield ws
                close_timeout = WS_CLOSE_TIMEOUT
            finally:
                with trio.CancelScope(shield=True), trio.move_on_after(close_timeout):
                    await ws.aclose()
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        # The handshake's failures come from trio-websocket's reader task.
        failure = unwrap_group(group)
        if isinstance(failure, trio_websocket.ConnectionRejected):
            body = (failure.body or b"").decode("utf-8", "replace").strip()
            raise UpgradeRefused(failure.status_code, body) from None
        if isinstance(failure, trio_websocket.HandshakeError):
            raise StreamClientError(f"the WebSocket handshake failed: {failure!r}") from None
        raise


# --------------------------------------------------------------------------
# SPDY, client side
# --------------------------------------------------------------------------


class SpdyClientStream(trio.abc.HalfCloseableStream):
    """A stream this client opened, as a Trio byte stream.

    ``receive_some`` returns ``b""`` once the server sent FIN or reset the
    stream, or the session is gone; ``send_eof`` sends FIN; `reset` aborts.
    """

    def __init__(self, session: SpdyClientSession, stream_id: int) -> None:
        self.stream_id = stream_id
        self._session = session
        self._in_tx, self._in_rx = trio.open_memory_channel[bytes](INBOUND_CHUNKS)
        self._pending = memoryview(b"")
        self._replied = trio.Event()
        self._local_open = True
        self._remote_open = True
        #: The server's RST_STREAM status, if it reset the stream.
        self.reset_status: int | None = None

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if max_bytes is not None and max_bytes < 1:
            raise ValueError("max_bytes must be >= 1")
        if not self._pending:
            try:
                self._pending = memoryview(await self._in_rx.receive())
            except (trio.EndOfChannel, trio.ClosedResourceError):
                return b""
        else:
            await trio.lowlevel.checkpoint()
        size = len(self._pending) if max_bytes is None else max_bytes
        out = bytes(self._pending[:size])
        self._pending = self._pending[size:]
        return out

    async def read_to_end(self, limit: int = MAX_HEAD) -> bytes:
        """Everything until FIN (at most *limit* bytes are kept)."""
        data = bytearray()
        while chunk := await self.receive_some():
            if len(data) < limit:
                data += chunk[: limit - len(data)]
        return bytes(data)

    def discard_input(self) -> None:
        """Drop whatever the server sends on this stream from now on."""
        self._in_rx.close()
        self._pending = memoryview(b"")

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self.reset_status is not None:
            raise trio.BrokenResourceError(f"stream {self.stream_id} was reset")
        if not self._local_open:
            raise trio.ClosedResourceError(f"stream {self.stream_id} is closed for sending")
        if data:
            await self._session._write(lambda: self._session._conn.data(self.stream_id, data))
        else:
            await trio.lowlevel.checkpoint()

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.checkpoint()

    async def send_eof(self) -> None:
        """Send FIN; again, or after a reset, it does nothing."""
        if not self._local_open or self.reset_status is not None or self._session.broken:
            await trio.lowlevel.checkpoint()
            return
        self._local_open = False
        with contextlib.suppress(trio.BrokenResourceError):
            await self._session._write(
                lambda: self._session._conn.data(self.stream_id, b"", fin=True)
            )
        self._forget_if_done()

    async def aclose(self) -> None:
        self.discard_input()
        await self.send_eof()

    async def reset(self) -> None:
        """Abort the stream both ways (RST_STREAM CANCEL)."""
        self.discard_input()
        if self.reset_status is not None or not self._session._knows(self.stream_id):
            await trio.lowlevel.checkpoint()
            return
        self.reset_status = spdy.RstStatus.CANCEL
        self._local_open = False
        self._session._forget(self.stream_id)
        with contextlib.suppress(trio.BrokenResourceError):
            await self._session._write(
                lambda: self._session._conn.rst_stream(self.stream_id, spdy.RstStatus.CANCEL)
            )

    # -- the session's side

    async def _deliver(self, data: bytes, fin: bool) -> None:
        if data:
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await self._in_tx.send(data)
        if fin:
            self._in_tx.close()
            self._remote_open = False
            self._forget_if_done()

    def _forget_if_done(self) -> None:
        # Both sides sent FIN: nothing more will be routed to it, nor sent.
        if not self._local_open and not self._remote_open:
            self._session._forget(self.stream_id)

    def _reset_by_peer(self, status: int) -> None:
        self.reset_status = status
        self._local_open = False
        self._replied.set()
        self._in_tx.close()

    def _ended(self) -> None:
        self._replied.set()
        self._in_tx.close()


class SpdyClientSession:
    """The client end of a SPDY/3.1 session over an upgraded connection.

    Run `run` in a nursery (it reads until the connection ends), then open
    streams with `open_stream`.  Closing the transport is the owner's.

    Args:
        transport: the upgraded connection.
        initial: bytes already read past the upgrade response.
    """

    def __init__(self, transport: trio.abc.Stream, initial: bytes = b"") -> None:
        self._transport = transport
        self._initial = initial
        self._conn = spdy.SpdyConnection(is_server=False)
        self._lock = trio.StrictFIFOLock()
        self._streams: dict[int, SpdyClientStream] = {}
        self.closed = trio.Event()
        self.broken = False
        self.goaway = False

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Read and route frames until the connection ends; then end every stream."""
        task_status.started()
        try:
            data: bytes | bytearray = self._initial
            while True:
                if not data:
                    try:
                        data = await self._transport.receive_some(COPY_SIZE)
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        break
                    if not data:
                        break
                try:
                    events = self._conn.receive_data(data)
                except spdy.SpdyProtocolError:
                    break
                data = b""
                for event in events:
                    await self._dispatch(event)
        finally:
            self.broken = True
            self.closed.set()
            for stream in self._streams.values():
                stream._ended()
            self._streams.clear()

    async def open_stream(self, headers: Mapping[str, str]) -> SpdyClientStream:
        """Open a stream and wait for the server's SYN_REPLY.

        Raises:
            StreamClientError: the server refused the stream or is gone.
        """
        async with self._lock:
            if self.broken or self.goaway:
                raise StreamClientError("the stream session is over")
            stream_id = self._conn.next_stream_id
            stream = SpdyClientStream(self, stream_id)
            self._streams[stream_id] = stream
            await self._send_raw(self._conn.syn_stream(stream_id, headers))
        await stream._replied.wait()
        if stream.reset_status is not None:
            raise StreamClientError(
                f"the server refused stream {dict(headers)!r}: {_rst_name(stream.reset_status)}"
            )
        if self.broken:
            raise StreamClientError("the stream session is over")
        return stream

    async def ping(self, ping_id: int = 1) -> None:
        await self._write(lambda: self._conn.ping(ping_id))

    # -- internals

    def _knows(self, stream_id: int) -> bool:
        return stream_id in self._streams

    def _forget(self, stream_id: int) -> None:
        self._streams.pop(stream_id, None)

    async def _dispatch(self, event: spdy.Event) -> None:
        match event:
            case spdy.SynReply():
                stream = self._streams.get(event.stream_id)
                if stream is not None:
                    stream._replied.set()
                    if event.fin:
                        await stream._deliver(b"", True)
            case spdy.Data():
                stream = self._streams.get(event.stream_id)
                if stream is not None:
                    await stream._deliver(event.data, event.fin)
            case spdy.RstStream():
                stream = self._streams.pop(event.stream_id, None)
                if stream is not None:
                    stream._reset_by_peer(event.status)
            case spdy.StreamError():
                stream = self._streams.pop(event.stream_id, None)
                if stream is not None:
                    stream._reset_by_peer(event.status)
                with contextlib.suppress(trio.BrokenResourceError):
                    await self._write(lambda: self._conn.rst_stream(event.stream_id, event.status))
            case spdy.SynStream():
                # Servers open no streams in these protocols.
                with contextlib.suppress(trio.BrokenResourceError):
                    await self._write(
                        lambda: self._conn.rst_stream(
                            event.stream_id, spdy.RstStatus.REFUSED_STREAM
                        )
                    )
            case spdy.Ping(needs_reply=True):
                with contextlib.suppress(trio.BrokenResourceError):
                    await self._write(lambda: self._conn.ping(event.ping_id))
            case spdy.GoAway():
                self.goaway = True
            case _:
                pass  # SETTINGS, WINDOW_UPDATE, HEADERS, echoes of our pings.

    async def _write(self, make: Callable[[], bytes]) -> None:
        """Make frames and write them in one critical section (one zlib stream per direction)."""
        async with self._lock:
            if self.broken:
                raise trio.BrokenResourceError("the stream session is over")
            try:
                frames = make()
            except spdy.SpdyStateError as exc:
                raise trio.BrokenResourceError(str(exc)) from None
            if frames:
                await self._send_raw(frames)

    async def _send_raw(self, data: bytes) -> None:
        try:
            await self._transport.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self.broken = True
            raise trio.BrokenResourceError("the stream session's connection is gone") from exc


def _rst_name(status: int) -> str:
    try:
        return spdy.RstStatus(status).name
    except ValueError:
        return str(status)


# --------------------------------------------------------------------------
# Exec and attach
# --------------------------------------------------------------------------


@attrs.define
class _Io:
    stdin: Source | None
    stdout: Sink | None
    stderr: Sink | None
    resizes: trio.abc.ReceiveChannel[tuple[int, int]] | None
    linger: float | None
    detached: bool = False
    stdin_done: bool = False
    #: Once stdin has ended, its deadline moves *linger* seconds past each output.
    quiet: trio.CancelScope = attrs.field(factory=trio.CancelScope)

    def activity(self) -> None:
        if self.stdin_done and self.linger is not None:
            self.quiet.deadline = trio.current_time() + self.linger

    def stdin_ended(self) -> None:
        self.stdin_done = True
        self.activity()


async def remote_command(
    url: str,
    *,
    stdin: Source | None = None,
    stdout: Sink | None = None,
    stderr: Sink | None = None,
    tty: bool = False,
    resizes: trio.abc.ReceiveChannel[tuple[int, int]] | None = None,
    transport: Transport = "websocket",
    linger_after_stdin: float | None = None,
    connect_timeout: float = 30.0,
) -> SessionResult:
    """Run an exec or attach session at *url* (from the CRI's Exec or Attach).

    Pass a source or sink for exactly the streams the request asked for: the
    server waits for those (over SPDY, they are the streams opened).

    Args:
        stdin: read until ``b""``, whose end is passed on (v5 close signal
            or FIN); a `DetachRequested` it raises leaves the session.
        stdout, stderr: get the command's output as it comes.
        tty: the request had a terminal: sizes from *resizes* are sent.
        resizes: terminal sizes (width, height) to send as they come.
        transport: ``websocket`` (v5, else v4) or ``spdy`` (v4).
        linger_after_stdin: once stdin has ended, leave the session when no
            output came for this many seconds (attach: detach); None waits
            for the server to end it.
        connect_timeout: for the connection and the upgrade.

    Raises:
        UpgradeRefused, StreamClientError: no session, or it broke before
            the server's status (the connection was lost).
        trio.BrokenResourceError: a sink broke (the reader of our output
            went away).
    """
    target = Target.from_url(url)
    io = _Io(stdin, stdout, stderr, resizes if tty else None, linger_after_stdin)
    try:
        if transport == "spdy":
            return await _spdy_command(target, io, connect_timeout)
        return await _websocket_command(target, io, connect_timeout)
    except BaseExceptionGroup as group:
        raise unwrap_group(group) from None


def unwrap_group(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The one error that matters in *group* (nurseries wrap every error).

    A KeyboardInterrupt first, then a `StreamClientError`, then a broken
    local stream; else the only error, or the group itself.
    """
    leaves: list[BaseException] = []

    def walk(exc: BaseException) -> None:
        if isinstance(exc, BaseExceptionGroup):
            for inner in exc.exceptions:
                walk(inner)
        else:
            leaves.append(exc)

    walk(group)
    for kind in (
        KeyboardInterrupt,
        StreamClientError,
        trio_websocket.HandshakeError,
        trio.BrokenResourceError,
    ):
        for leaf in leaves:
            if isinstance(leaf, kind):
                return leaf
    return group if len(leaves) != 1 else leaves[0]


async def _websocket_command(target: Target, io: _Io, connect_timeout: float) -> SessionResult:
    async with open_websocket(target, WEBSOCKET_PROTOCOLS, connect_timeout=connect_timeout) as ws:
        protocol = ws.subprotocol or ""
        close_signal = protocol == "v5.channel.k8s.io"

        async def send(channel: int, data: bytes | bytearray) -> None:
            try:
                await ws.send_message(bytes([channel]) + bytes(data))
            except trio_websocket.ConnectionClosed as exc:
                raise trio.BrokenResourceError("the WebSocket is closed") from exc

        async def end_stdin() -> None:
            if close_signal:
                await send(CLOSE_CHANNEL, bytes([STDIN_CHANNEL]))
            # v4 has no way to say it: the command sees no end of input.

        error = bytearray()
        closed = False
        async with trio.open_nursery() as nursery:
            _start_inputs(
                nursery,
                io,
                nursery.cancel_scope,
                send_stdin=lambda data: send(STDIN_CHANNEL, data),
                end_stdin=end_stdin,
                send_resize=lambda data: send(RESIZE_CHANNEL, data),
            )
            with io.quiet:
                while True:
                    try:
                        message = await ws.get_message()
                    except trio_websocket.ConnectionClosed:
                        closed = True
                        break
                    raw = message.encode("latin-1") if isinstance(message, str) else message
                    if len(raw) < 2:
                        continue  # "connection established", or nothing
                    io.activity()
                    channel, data = raw[0], raw[1:]
                    if channel == STDOUT_CHANNEL and io.stdout is not None:
                        await io.stdout.send_all(data)
                    elif channel == STDERR_CHANNEL and io.stderr is not None:
                        await io.stderr.send_all(data)
                    elif channel == ERROR_CHANNEL and len(error) < MAX_HEAD:
                        error += data
            if io.quiet.cancelled_caught:
                io.detached = True
            nursery.cancel_scope.cancel()
    if io.detached:
        return SessionResult(None, True, protocol, "websocket")
    if not closed or not error:
        raise StreamClientError("the connection to the stream server was lost")
    return SessionResult(parse_status(bytes(error)), False, protocol, "websocket")


async def _spdy_command(target: Target, io: _Io, connect_timeout: float) -> SessionResult:
    connection, protocol, initial = await spdy_upgrade(
        target, SPDY_PROTOCOLS, connect_timeout=connect_timeout
    )
    async with connection:
        session = SpdyClientSession(connection, initial)
        async with trio.open_nursery() as nursery:
            await nursery.start(session.run)
            # kubectl's order: error, stdin, stdout, stderr, resize.
            error = await session.open_stream({"streamtype": "error"})
            stdin = await session.open_stream({"streamtype": "stdin"}) if io.stdin else None
            stdout = await session.open_stream({"streamtype": "stdout"}) if io.stdout else None
            stderr = await session.open_stream({"streamtype": "stderr"}) if io.stderr else None
            resize = await session.open_stream({"streamtype": "resize"}) if io.resizes else None
            for unread in (stdin, resize):
                if unread is not None:
                    unread.discard_input()
            outcome: list[bytes] = []
            with io.quiet:
                async with trio.open_nursery() as inputs:
                    if stdin is not None:
                        _start_inputs(
                            inputs,
                            io,
                            nursery.cancel_scope,
                            send_stdin=stdin.send_all,
                            end_stdin=stdin.send_eof,
                            send_resize=resize.send_all if resize is not None else None,
                        )
                    elif resize is not None:
                        _start_inputs(inputs, io, nursery.cancel_scope, send_resize=resize.send_all)
                    async with trio.open_nursery() as outputs:
                        outputs.start_soon(_copy_output, stdout, io.stdout, io)
                        outputs.start_soon(_copy_output, stderr, io.stderr, io)
                        outcome.append(await error.read_to_end())
                    inputs.cancel_scope.cancel()
            if io.quiet.cancelled_caught:
                io.detached = True
            nursery.cancel_scope.cancel()
    if io.detached:
        return SessionResult(None, True, protocol, "spdy")
    if not outcome or not outcome[0]:
        # v4 always sends a status; nothing means the session was cut short.
        raise StreamClientError("the connection to the stream server was lost")
    return SessionResult(parse_status(outcome[0]), False, protocol, "spdy")


async def _copy_output(stream: SpdyClientStream | None, sink: Sink | None, io: _Io) -> None:
    if stream is None or sink is None:
        return
    while data := await stream.receive_some(COPY_SIZE):
        io.activity()
        await sink.send_all(data)


def _start_inputs(
    nursery: trio.Nursery,
    io: _Io,
    session_scope: trio.CancelScope,
    *,
    send_stdin: Callable[[bytes], Awaitable[None]] | None = None,
    end_stdin: Callable[[], Awaitable[None]] | None = None,
    send_resize: Callable[[bytes], Awaitable[None]] | None = None,
) -> None:
    """Start copying stdin and terminal sizes in *nursery*; a detach cancels *session_scope*."""
    if io.stdin is not None and send_stdin is not None and end_stdin is not None:
        nursery.start_soon(_pump_stdin, io, send_stdin, end_stdin, session_scope)
    if io.resizes is not None and send_resize is not None:
        nursery.start_soon(_pump_resizes, io.resizes, send_resize)


async def _pump_stdin(
    io: _Io,
    send: Callable[[bytes], Awaitable[None]],
    end: Callable[[], Awaitable[None]],
    session_scope: trio.CancelScope,
) -> None:
    assert io.stdin is not None
    try:
        while data := await io.stdin.receive_some(COPY_SIZE):
            await send(bytes(data))
        await end()
        io.stdin_ended()
    except DetachRequested:
        io.detached = True
        session_scope.cancel()
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass  # The session is ending; its outcome says how.


async def _pump_resizes(
    sizes: trio.abc.ReceiveChannel[tuple[int, int]], send: Callable[[bytes], Awaitable[None]]
) -> None:
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
        async for width, height in sizes:
            await send(encode_resize(width, height))


# --------------------------------------------------------------------------
# Port-forward
# --------------------------------------------------------------------------


class PortForwarder:
    """Carries local connections to ports of a pod over one SPDY session.

    Args:
        session: a running `SpdyClientSession` on a port-forward URL.
        on_error: told ``(port, message)`` when the server reports an error
            for a connection (nothing listening in the pod, say).
    """

    def __init__(
        self, session: SpdyClientSession, on_error: Callable[[int, str], None] | None = None
    ) -> None:
        self.session = session
        self._on_error = on_error
        self._ids = itertools.count()

    async def forward(self, local: trio.abc.HalfCloseableStream, port: int) -> str:
        """Join *local* to a new connection to *port* in the pod, until both ends are done.

        Returns:
            The error the server reported for it ("" for none).
        """
        request_id = str(next(self._ids))
        headers = {"streamtype": "error", "port": str(port), "requestid": request_id}
        try:
            error = await self.session.open_stream(headers)
            # kubectl's order, and it closes its side of the error stream at once.
            await error.send_eof()
            data = await self.session.open_stream({**headers, "streamtype": "data"})
        except (StreamClientError, trio.BrokenResourceError) as exc:
            message = str(exc)
            if self._on_error is not None:
                self._on_error(port, message)
            return message
        message = ""
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_local_to_remote, local, data)
                await _remote_to_local(data, local)
                with trio.move_on_after(ERROR_STREAM_WAIT):
                    message = (await error.read_to_end()).decode("utf-8", "replace")
                nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                await data.reset()
                await error.reset()
        if message and self._on_error is not None:
            self._on_error(port, message)
        return message


async def _local_to_remote(local: trio.abc.Stream, data: SpdyClientStream) -> None:
    try:
        while chunk := await local.receive_some(COPY_SIZE):
            await data.send_all(chunk)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        await data.reset()  # The local client reset its connection: so do we.
        return
    await data.send_eof()


async def _remote_to_local(data: SpdyClientStream, local: trio.abc.HalfCloseableStream) -> None:
    try:
        while chunk := await data.receive_some(COPY_SIZE):
            await local.send_all(chunk)
        await local.send_eof()
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass  # The local client went away; its side ends the pair.


async def port_forward(
    url: str,
    mappings: Sequence[tuple[int, int]],
    *,
    address: str = "127.0.0.1",
    transport: Transport = "spdy",
    on_listening: Callable[[str, int, int], None] | None = None,
    on_error: Callable[[int, str], None] | None = None,
    connect_timeout: float = 30.0,
    task_status: trio.TaskStatus[list[tuple[int, int]]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Forward local ports to the pod's until cancelled.

    Args:
        url: from the CRI's PortForward.
        mappings: (local port, pod port) pairs; local port 0 picks a free one.
        address: the local address to listen on.
        transport: ``spdy`` (the upgraded connection) or ``websocket`` (SPDY
            tunnelled in WebSocket).
        on_listening: told ``(address, local port, pod port)`` per listener.
        on_error: told ``(pod port, message)`` for a connection that failed.
        task_status: ``started()`` with the (local, pod) ports listened on.

    Raises:
        UpgradeRefused, StreamClientError: no session, or it was lost
            (``lost connection to the pod``).
        OSError: a local port cannot be listened on.
    """
    target = Target.from_url(url)
    try:
        if transport == "spdy":
            connection, _protocol, initial = await spdy_upgrade(
                target, (PORT_FORWARD_PROTOCOL,), connect_timeout=connect_timeout
            )
            async with connection:
                await _forward_over(
                    SpdyClientSession(connection, initial),
                    mappings,
                    address,
                    on_listening,
                    on_error,
                    task_status,
                )
        else:
            protocols = (PORT_FORWARD_TUNNEL_PROTOCOL,)
            async with open_websocket(target, protocols, connect_timeout=connect_timeout) as ws:
                await _forward_over(
                    SpdyClientSession(WebSocketByteStream(ws)),
                    mappings,
                    address,
                    on_listening,
                    on_error,
                    task_status,
                )
    except BaseExceptionGroup as group:
        raise unwrap_group(group) from None


async def _forward_over(
    session: SpdyClientSession,
    mappings: Sequence[tuple[int, int]],
    address: str,
    on_listening: Callable[[str, int, int], None] | None,
    on_error: Callable[[int, str], None] | None,
    task_status: trio.TaskStatus[list[tuple[int, int]]],
) -> None:
    forwarder = PortForwarder(session, on_error)
    async with trio.open_nursery() as nursery:
        await nursery.start(session.run)
        bound: list[tuple[int, int]] = []
        listeners: list[tuple[list[trio.SocketListener], int]] = []
        for local, remote in mappings:
            found = await trio.open_tcp_listeners(local, host=address)
            port = found[0].socket.getsockname()[1]
            listeners.append((found, remote))
            bound.append((port, remote))
            if on_listening is not None:
                on_listening(address, port, remote)
        for found, remote in listeners:
            nursery.start_soon(_serve, found, forwarder, remote)
        task_status.started(bound)
        await session.closed.wait()
        nursery.cancel_scope.cancel()
    raise StreamClientError("lost connection to the pod")


async def _serve(
    listeners: list[trio.SocketListener], forwarder: PortForwarder, remote: int
) -> None:
    async def handle(local: trio.SocketStream) -> None:
        async with local:
            await forwarder.forward(local, remote)

    await trio.serve_listeners(handle, listeners)


# --------------------------------------------------------------------------
# The local side: files, terminals, detach keys
# --------------------------------------------------------------------------


class FileSource:
    """Reads a binary file (a process's stdin) in a worker thread.

    Any file works (a terminal, a pipe, a regular file, /dev/null).  A file
    with a descriptor is read with ``os.read``, past Python's buffer: a read
    still blocked when the session ends is abandoned, and must not hold the
    buffer's lock when the interpreter exits.
    """

    def __init__(self, file: BinaryIO) -> None:
        self._read: Callable[[int], bytes]
        try:
            fd = file.fileno()
        except (OSError, ValueError):  # io.UnsupportedOperation is both
            self._read = getattr(file, "read1", file.read)
        else:
            self._read = functools.partial(os.read, fd)

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        size = max_bytes or COPY_SIZE
        data = await trio.to_thread.run_sync(self._read, size, abandon_on_cancel=True)
        return data or b""


class FileSink:
    """Writes to a binary file (stdout, stderr) and flushes, at once.

    Raises `trio.BrokenResourceError` once the reader has gone (EPIPE).
    """

    def __init__(self, file: BinaryIO) -> None:
        self._file = file

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await trio.lowlevel.checkpoint()
        try:
            self._file.write(data)
            self._file.flush()
        except (BrokenPipeError, ValueError) as exc:
            raise trio.BrokenResourceError(f"cannot write: {exc}") from exc


class DetachKeys:
    """A stdin `Source` that raises `DetachRequested` when *keys* are typed.

    As docker does, the bytes of a partly typed sequence are held back until
    the next byte shows whether it is the sequence; the bytes before a
    complete sequence are still sent.
    """

    def __init__(self, source: Source, keys: bytes = DEFAULT_DETACH_KEYS) -> None:
        if not keys:
            raise ValueError("detach keys must not be empty")
        self._source = source
        self._keys = keys
        self._held = b""
        self._detach = False

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        while True:
            if self._detach:
                await trio.lowlevel.checkpoint()
                raise DetachRequested
            data = bytes(await self._source.receive_some(max_bytes))
            if not data:
                held, self._held = self._held, b""
                return held
            buffer = self._held + data
            self._held = b""
            index = buffer.find(self._keys)
            if index >= 0:
                self._detach = True
                if index:
                    return buffer[:index]
                continue
            for size in range(min(len(self._keys) - 1, len(buffer)), 0, -1):
                if buffer.endswith(self._keys[:size]):
                    buffer, self._held = buffer[:-size], buffer[-size:]
                    break
            if buffer:
                return buffer


def terminal_size(fd: int) -> tuple[int, int] | None:
    """The (width, height) of the terminal on *fd*; None if it is not one."""
    try:
        size = os.get_terminal_size(fd)
    except OSError:
        return None
    if size.columns <= 0 or size.lines <= 0:
        return None
    return size.columns, size.lines


async def watch_terminal_size(fd: int, sizes: trio.MemorySendChannel[tuple[int, int]]) -> None:
    """Send the terminal's size now and at every change (SIGWINCH), until cancelled.

    Must run in the main thread (signals).
    """
    async with sizes:
        with trio.open_signal_receiver(signal.SIGWINCH) as changes:
            last = terminal_size(fd)
            if last is not None:
                await sizes.send(last)
            async for _ in changes:
                size = terminal_size(fd)
                if size is not None and size != last:
                    last = size
                    await sizes.send(size)


class RawTerminal:
    """Puts the terminal on *fd* in raw mode; restores its settings on exit."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._saved: list[Any] | None = None

    def __enter__(self) -> RawTerminal:
        self._saved = termios.tcgetattr(self.fd)
        _tty.setraw(self.fd, termios.TCSANOW)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._saved is not None:
            with contextlib.suppress(termios.error):
                termios.tcsetattr(self.fd, termios.TCSADRAIN, self._saved)
            self._saved = None
