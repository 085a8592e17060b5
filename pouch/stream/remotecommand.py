"""Exec and attach sessions: Kubernetes' remotecommand protocol, server side.

Behaviour follows the kubelet's ``pkg/kubelet/cri/streaming/remotecommand``
(``httpstream.go``, ``websocket.go``, ``exec.go``, ``attach.go``), which is
what containerd and cri-o serve too:

- **SPDY** (``X-Stream-Protocol-Version``): the client opens one stream per
  standard stream, named by the ``streamType`` header: ``error``, ``stdin``,
  ``stdout``, ``stderr`` and, with a terminal on v3 and later, ``resize``.
  The session starts once all the expected streams exist; a client that
  has not opened them within the stream-creation timeout (30 s) loses the
  session.
- **WebSocket** (``Sec-WebSocket-Protocol``): fixed channels 0 stdin, 1
  stdout, 2 stderr, 3 error, 4 resize.  An empty message on the first
  output channel tells the client the session is up.
- **The end.** Output streams end (SPDY FIN) when the process's output
  does; then the error stream carries the outcome.  v4 and later send a
  ``metav1.Status`` as JSON: ``Success``, or ``Failure`` with reason
  ``NonZeroExitCode`` and the code as an ``ExitCode`` cause (``kubectl``
  exits with it), or ``InternalError``.  Older versions send only a
  failure's message, as text.  Then the connection is closed.
- **stdin.** The client's end of stdin (SPDY FIN, or v5's close signal)
  closes the process's stdin, so ``echo data | kubectl exec -i ... cat``
  ends.
- **resize.** JSON ``{"Width": w, "Height": h}`` objects, one after the
  other, applied to the terminal.

A client that goes away (the connection closes) ends the session; an exec's
process is then killed (`Process.aclose`), an attach just detaches.
"""

from __future__ import annotations

import contextlib
import json
from typing import TYPE_CHECKING, Final, Protocol

import attrs
import trio

from pouch import errors
from pouch.log import get_logger
from pouch.stream.session import ExecRequest
from pouch.stream.websocket import ChannelMux

if TYPE_CHECKING:
    import trio_websocket

    from pouch.stream.backend import Process, StreamBackend
    from pouch.stream.session import (
        AttachRequest,
        IdleTimer,
        SessionLimits,
        SpdySession,
        SpdyStream,
    )

__all__ = [
    "SPDY_PROTOCOLS",
    "WEBSOCKET_PROTOCOLS",
    "Streams",
    "serve",
    "serve_spdy",
    "serve_websocket",
]

log = get_logger("pouch.stream")

COPY_SIZE: Final = 64 * 1024

# The streamType header values (k8s.io/api/core/v1 StreamType*).
STDIN: Final = "stdin"
STDOUT: Final = "stdout"
STDERR: Final = "stderr"
ERROR: Final = "error"
RESIZE: Final = "resize"

# WebSocket channel numbers (remotecommand StreamStdIn...StreamResize).
STDIN_CHANNEL: Final = 0
STDOUT_CHANNEL: Final = 1
STDERR_CHANNEL: Final = 2
ERROR_CHANNEL: Final = 3
RESIZE_CHANNEL: Final = 4

# What the stream server's resize decoder holds of a message it cannot
# parse yet; a terminal size is ~30 bytes.
_RESIZE_BUFFER_LIMIT: Final = 4096

#: How long a terminal session waits for the client's terminal size before
#: starting the command anyway.
INITIAL_SIZE_TIMEOUT: Final = 1.0

#: What the client hears when the server cuts a session short.
ENDED_BY_SERVER: Final = "the stream session was ended by pouchd (shutdown or idle timeout)"


@attrs.frozen
class SpdyVersion:
    """What a remotecommand version means over SPDY."""

    #: A ``resize`` stream comes with a terminal (v3 and later).
    resize: bool
    #: The error stream carries a JSON ``metav1.Status`` (v4 and later).
    json_status: bool
    #: v1 only: the server closes its side of stdin at once.
    close_stdin: bool = False


#: Server preference does not matter: the client's first supported one wins.
SPDY_PROTOCOLS: Final = {
    "v4.channel.k8s.io": SpdyVersion(resize=True, json_status=True),
    "v3.channel.k8s.io": SpdyVersion(resize=True, json_status=False),
    "v2.channel.k8s.io": SpdyVersion(resize=False, json_status=False),
    "channel.k8s.io": SpdyVersion(resize=False, json_status=False, close_stdin=True),
}


@attrs.frozen
class WebSocketVersion:
    """What a remotecommand WebSocket subprotocol means."""

    base64: bool
    json_status: bool
    #: v5: ``[255, channel]`` closes a channel (the client's end of stdin).
    close_signal: bool = False


#: kubelet ``remotecommand/websocket.go``; "" is a client that proposed none.
WEBSOCKET_PROTOCOLS: Final = {
    "v5.channel.k8s.io": WebSocketVersion(base64=False, json_status=True, close_signal=True),
    "v4.channel.k8s.io": WebSocketVersion(base64=False, json_status=True),
    "v4.base64.channel.k8s.io": WebSocketVersion(base64=True, json_status=True),
    "channel.k8s.io": WebSocketVersion(base64=False, json_status=False),
    "base64.channel.k8s.io": WebSocketVersion(base64=True, json_status=False),
    "": WebSocketVersion(base64=False, json_status=False),
}


class Source(Protocol):
    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray: ...


class Sink(Protocol):
    async def send_all(self, data: bytes | bytearray | memoryview) -> None: ...

    async def send_eof(self) -> None: ...


@attrs.define
class Streams:
    """A session's streams, whatever the transport; None where not asked for."""

    error: Sink | None
    stdin: Source | None = None
    stdout: Sink | None = None
    stderr: Sink | None = None
    resize: Source | None = None
    json_status: bool = True


# --------------------------------------------------------------------------
# Statuses (metav1.Status, as json.Marshal writes it)
# --------------------------------------------------------------------------

Status = dict[str, object]


def status_success() -> Status:
    return {"metadata": {}, "status": "Success"}


def status_exit(code: int, cmd: tuple[str, ...]) -> Status:
    """A non-zero exit, as kubelet reports an ``exec.CodeExitError``.

    The message's tail is containerd's error text (``error executing
    command [sh -c exit 3], exit code 3``); kubectl reads only the cause.
    """
    detail = f"error executing command [{' '.join(cmd)}], exit code {code}"
    return {
        "metadata": {},
        "status": "Failure",
        "message": f"command terminated with non-zero exit code: {detail}",
        "reason": "NonZeroExitCode",
        "details": {"causes": [{"reason": "ExitCode", "message": str(code)}]},
    }


def status_internal(message: str) -> Status:
    """``apierrors.NewInternalError``."""
    return {
        "metadata": {},
        "status": "Failure",
        "message": f"Internal error occurred: {message}",
        "reason": "InternalError",
        "details": {"causes": [{"message": message}]},
        "code": 500,
    }


def encode_status(status: Status, *, json_status: bool) -> bytes:
    """The error stream's payload; empty for success before v4."""
    if json_status:
        return json.dumps(status, separators=(",", ":")).encode()
    if status.get("status") == "Success":
        return b""
    return str(status.get("message", "")).encode()


# --------------------------------------------------------------------------
# The session, whatever the transport
# --------------------------------------------------------------------------


async def serve(
    streams: Streams, request: ExecRequest | AttachRequest, backend: StreamBackend
) -> None:
    """Run the exec or attach over *streams* and write its outcome.

    Cancellation:
        The process is stopped (exec) or left (attach), and the client is
        told, within a second, that the server ended the session (daemon
        shutdown, idle timeout).
    """
    status: Status | None = None
    try:
        status = await _run(streams, request, backend)
    finally:
        if status is None:  # Cancelled (a cancel arrives wrapped in groups).
            with (
                trio.CancelScope(shield=True),
                trio.move_on_after(1),
                contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError),
            ):
                await _write_status(streams, status_internal(ENDED_BY_SERVER))
    await _write_status(streams, status)


async def _write_status(streams: Streams, status: Status) -> None:
    if streams.error is not None:
        payload = encode_status(status, json_status=streams.json_status)
        if payload:
            await streams.error.send_all(payload)
        await streams.error.send_eof()


async def _run(
    streams: Streams, request: ExecRequest | AttachRequest, backend: StreamBackend
) -> Status:
    is_exec = isinstance(request, ExecRequest)
    what = "executing command in container" if is_exec else "attaching to container"
    sizes = _TerminalSizes(streams.resize) if streams.resize is not None and request.tty else None
    initial = None
    if sizes is not None:
        # kubectl sends its terminal's size right after opening the streams;
        # set at once, it usually reaches the container's terminal before the
        # command looks.  (Only the size in the process spec, OCI
        # ``process.consoleSize``, would make that certain: runc copies a
        # later size in while the command already runs.)
        with trio.move_on_after(INITIAL_SIZE_TIMEOUT):
            initial = await sizes.next()
        log.debug("initial terminal size", size=initial)
    try:
        if isinstance(request, ExecRequest):
            process = await backend.exec(
                request.container_id, request.cmd, tty=request.tty, stdin=request.stdin
            )
        else:
            process = await backend.attach(
                request.container_id, tty=request.tty, stdin=request.stdin
            )
    except errors.PouchError as exc:
        log.info("stream session failed", container_id=request.container_id, error=str(exc))
        return status_internal(f"error {what}: {exc}")
    failure: BaseException | None = None
    code = 0
    try:
        if initial is not None:
            await _resize(process, initial)
        code = await _pump(process, streams, sizes)
    except* errors.PouchError as group:  # From wait(), inside the nursery.
        failure = _first_leaf(group)
    finally:
        # Exec: kills the command if it still runs (the client went away);
        # attach: detaches.  Shielded and bounded by the backend.
        with trio.CancelScope(shield=True):
            await process.aclose()
    if failure is not None:
        log.info("stream session failed", container_id=request.container_id, error=str(failure))
        return status_internal(f"error {what}: {failure}")
    if isinstance(request, ExecRequest) and code != 0:
        return status_exit(code, request.cmd)
    return status_success()


def _first_leaf(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


async def _pump(process: Process, streams: Streams, sizes: _TerminalSizes | None) -> int:
    async with trio.open_nursery() as inputs:
        if streams.stdin is not None:
            inputs.start_soon(_copy_stdin, streams.stdin, process.stdin)
        if sizes is not None:
            inputs.start_soon(_resize_loop, sizes, process)
        async with trio.open_nursery() as outputs:
            outputs.start_soon(_copy_output, process.stdout, streams.stdout)
            outputs.start_soon(_copy_output, process.stderr, streams.stderr)
            code = await process.wait()
            # The outputs end when the process's last writer is gone; the
            # nursery waits for both, so the status follows all output.
        inputs.cancel_scope.cancel()
    return code


async def _copy_output(source: trio.abc.ReceiveStream | None, sink: Sink | None) -> None:
    if source is not None:
        while data := await source.receive_some(COPY_SIZE):
            if sink is None:
                continue  # Not asked for: drained so the process never blocks on it.
            try:
                await sink.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                # The client reset this stream; keep draining.
                sink = None
    if sink is not None:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await sink.send_eof()


async def _copy_stdin(source: Source, sink: trio.abc.SendStream | None) -> None:
    while data := await source.receive_some(COPY_SIZE):
        if sink is None:
            continue
        try:
            await sink.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            # The process closed its stdin (or exited); what the client
            # still sends goes nowhere, as with a pipe nobody reads.
            sink = None
    if sink is not None:
        # The client's end of stdin is the process's (kubelet: the runtime
        # closes the process's stdin when the stream reaches EOF).
        await sink.aclose()


async def _resize_loop(sizes: _TerminalSizes, process: Process) -> None:
    while (size := await sizes.next()) is not None:
        await _resize(process, size)


async def _resize(process: Process, size: tuple[int, int]) -> None:
    try:
        await process.resize(*size)
    except errors.PouchError as exc:
        log.debug("resize failed", error=str(exc))


class _TerminalSizes:
    """The resize stream: JSON ``TerminalSize`` objects, one after the other."""

    def __init__(self, source: Source) -> None:
        self._source = source
        self._decoder = json.JSONDecoder()
        self._buffer = ""
        self._done = False

    async def next(self) -> tuple[int, int] | None:
        """The next valid size; None once the stream has ended or is not JSON."""
        while not self._done:
            while True:
                self._buffer = self._buffer.lstrip()
                if not self._buffer:
                    break
                try:
                    value, end = self._decoder.raw_decode(self._buffer)
                except json.JSONDecodeError:
                    if len(self._buffer) > _RESIZE_BUFFER_LIMIT:
                        # kubelet's decoder gives up on the stream too.
                        log.info("resize stream is not JSON; ignoring it")
                        self._done = True
                        return None
                    break  # Incomplete; wait for the rest.
                self._buffer = self._buffer[end:]
                size = _terminal_size(value)
                if size is not None:
                    return size
            data = await self._source.receive_some(COPY_SIZE)
            if not data:
                self._done = True
                break
            self._buffer += bytes(data).decode("utf-8", "replace")
        return None


def _terminal_size(value: object) -> tuple[int, int] | None:
    """``remotecommand.TerminalSize``: Go matches field names case-insensitively."""
    if not isinstance(value, dict):
        return None
    fields = {str(k).lower(): v for k, v in value.items()}
    width, height = fields.get("width"), fields.get("height")
    if not isinstance(width, int) or not isinstance(height, int):
        return None
    if not (0 < width < 1 << 16 and 0 < height < 1 << 16):
        return None
    return width, height


# --------------------------------------------------------------------------
# SPDY
# --------------------------------------------------------------------------


def expected_stream_types(request: ExecRequest | AttachRequest, version: SpdyVersion) -> set[str]:
    types = {ERROR}
    if request.stdin:
        types.add(STDIN)
    if request.stdout:
        types.add(STDOUT)
    if request.stderr:
        types.add(STDERR)
    if request.tty and version.resize:
        types.add(RESIZE)
    return types


async def serve_spdy(
    session: SpdySession,
    protocol: str,
    request: ExecRequest | AttachRequest,
    backend: StreamBackend,
    limits: SessionLimits,
) -> None:
    """The SPDY flavour: wait for the client's streams, then `serve`."""
    version = SPDY_PROTOCOLS[protocol]
    expected = len(expected_stream_types(request, version))
    found = await _wait_for_streams(session, expected, limits.stream_creation_timeout)
    if found is None:
        return
    session.refuse_new_streams()
    unread = [ERROR, STDOUT, STDERR] + ([] if request.tty else [RESIZE])
    for name in unread:
        if name in found:
            found[name].discard_input()  # Nothing reads these; never let them block.
    stdin = found.get(STDIN)
    if stdin is not None and version.close_stdin:
        await stdin.send_eof()
    streams = Streams(
        error=found.get(ERROR),
        stdin=stdin,
        stdout=found.get(STDOUT),
        stderr=found.get(STDERR),
        resize=found.get(RESIZE),
        json_status=version.json_status,
    )
    try:
        await serve(streams, request, backend)
    finally:
        # kubectl waits for our end of stdin (v3+) before it returns.
        if not session.peer_gone and not session.broken:
            with trio.CancelScope(shield=True), trio.move_on_after(1):
                for stream in found.values():
                    await stream.send_eof()


async def _wait_for_streams(
    session: SpdySession, expected: int, creation_timeout: float
) -> dict[str, SpdyStream] | None:
    """The client's streams by type, once *expected* known ones exist.

    As kubelet's ``waitForStreams``: streams of an unknown type are logged
    and not counted, a repeated type replaces the earlier stream.
    """
    found: dict[str, SpdyStream] = {}
    received = 0
    with trio.move_on_after(creation_timeout):
        while received < expected:
            try:
                stream = await session.accept_stream()
            except trio.EndOfChannel:
                return None
            kind = stream.header("streamtype")
            if kind not in (ERROR, STDIN, STDOUT, STDERR, RESIZE):
                log.info("unexpected stream type", stream_type=kind)
                stream.discard_input()
                continue
            found[kind] = stream
            received += 1
        return found
    log.info("timed out waiting for client to create streams", expected=expected, got=received)
    return None


# --------------------------------------------------------------------------
# WebSocket
# --------------------------------------------------------------------------


async def serve_websocket(
    ws: trio_websocket.WebSocketConnection,
    protocol: str,
    request: ExecRequest | AttachRequest,
    backend: StreamBackend,
    idle: IdleTimer | None = None,
) -> None:
    """The WebSocket flavour; the caller closes the connection afterwards."""
    version = WEBSOCKET_PROTOCOLS[protocol]
    inputs = []
    if request.stdin:
        inputs.append(STDIN_CHANNEL)
    if request.tty:
        inputs.append(RESIZE_CHANNEL)
    mux = ChannelMux(
        ws,
        base64=version.base64,
        close_signal=version.close_signal,
        inputs=inputs,
        idle=idle,
    )
    async with trio.open_nursery() as nursery:
        nursery.start_soon(mux.run, nursery.cancel_scope)
        # "Send an empty message to the lowest writable channel to notify the
        # client the connection is established" (kubelet websocket.go).
        if request.stdout:
            first = STDOUT_CHANNEL
        elif request.stderr:
            first = STDERR_CHANNEL
        else:
            first = ERROR_CHANNEL
        await mux.send(first, b"")
        streams = Streams(
            error=mux.output(ERROR_CHANNEL),
            stdin=mux.input(STDIN_CHANNEL) if request.stdin else None,
            stdout=mux.output(STDOUT_CHANNEL) if request.stdout else None,
            stderr=mux.output(STDERR_CHANNEL) if request.stderr else None,
            resize=mux.input(RESIZE_CHANNEL) if request.tty else None,
            json_status=version.json_status,
        )
        await serve(streams, request, backend)
        nursery.cancel_scope.cancel()
