"""WebSocket transports for the stream server, on trio-websocket.

Kubernetes multiplexes a session's streams over one WebSocket in two ways:

- *Channels* (``k8s.io/apimachinery/pkg/util/httpstream/wsstream``): every
  message starts with its channel number.  ``channel.k8s.io`` and its
  versions send binary messages ``<channel byte><data>``; the ``base64``
  variants send text messages ``<channel as an ASCII digit><base64 data>``.
  ``v5.channel.k8s.io`` adds a close signal: ``[255, n]`` ends channel *n*
  in the sender's direction (how a client says "end of stdin").
  `ChannelMux` implements both codings.
- *SPDY tunnelled in WebSocket* (``SPDY/3.1+portforward.k8s.io``): the
  WebSocket carries the bytes of a SPDY session in binary messages,
  regardless of message boundaries (client-go ``TunnelingConnection``).
  `WebSocketByteStream` turns the connection back into a byte stream.

`ReplayStream` lets trio-websocket's handshake parser see a request head
that the stream server has already read to route the request.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
from typing import TYPE_CHECKING, Final

import trio
import trio_websocket

from pouch.log import get_logger

if TYPE_CHECKING:
    from collections.abc import Iterable

    from pouch.stream.session import IdleTimer

__all__ = ["ChannelMux", "ReplayStream", "WebSocketByteStream"]

log = get_logger("pouch.stream")

#: The v5 close signal's channel (``remotecommand.StreamClose``).
CLOSE_CHANNEL: Final = 255
#: Messages queued per input channel before the reader waits for its consumer.
CHANNEL_BUFFER: Final = 16


class ReplayStream(trio.abc.HalfCloseableStream):
    """A stream that first returns *prefix*, then whatever *inner* receives."""

    def __init__(self, prefix: bytes, inner: trio.abc.HalfCloseableStream) -> None:
        self._prefix = memoryview(prefix)
        self.inner = inner

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        if self._prefix:
            await trio.lowlevel.checkpoint()
            size = len(self._prefix) if max_bytes is None else max_bytes
            out = bytes(self._prefix[:size])
            self._prefix = self._prefix[size:]
            return out
        return await self.inner.receive_some(max_bytes)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        await self.inner.send_eof()

    async def aclose(self) -> None:
        await self.inner.aclose()


class WebSocketByteStream(trio.abc.HalfCloseableStream):
    """Binary messages of a WebSocket as one byte stream (SPDY tunnelling).

    ``receive_some`` returns ``b""`` once the peer closed the WebSocket; a
    text message breaks the stream, as client-go's tunnel refuses them too.
    A WebSocket has no half-close, so ``send_eof`` does nothing, and
    ``aclose`` leaves the WebSocket to its owner, who closes it with a
    close handshake.
    """

    def __init__(self, ws: trio_websocket.WebSocketConnection) -> None:
        self._ws = ws
        self._pending = memoryview(b"")

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._pending:
            await trio.lowlevel.checkpoint()
        # An empty message is not the end (client-go writes some): skip it.
        while not self._pending:
            try:
                message = await self._ws.get_message()
            except trio_websocket.ConnectionClosed:
                return b""
            if isinstance(message, str):
                raise trio.BrokenResourceError("a text message in a SPDY tunnel")
            self._pending = memoryview(message)
        size = len(self._pending) if max_bytes is None else max_bytes
        out = bytes(self._pending[:size])
        self._pending = self._pending[size:]
        return out

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        try:
            await self._ws.send_message(bytes(data))
        except trio_websocket.ConnectionClosed as exc:
            raise trio.BrokenResourceError("the WebSocket is closed") from exc

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.checkpoint()

    async def send_eof(self) -> None:
        await trio.lowlevel.checkpoint()

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()


class ChannelMux:
    """Kubernetes' channel multiplexing over one WebSocket (see the module doc).

    Args:
        ws: The accepted connection.
        base64: Text messages with base64 payloads instead of binary ones.
        close_signal: Honour v5's ``[255, channel]`` close signal.
        inputs: The channels read by the session; messages for others are
            dropped, as wsstream drops them for its write-only channels.
        idle: Touched per message either way.
    """

    def __init__(
        self,
        ws: trio_websocket.WebSocketConnection,
        *,
        base64: bool,
        close_signal: bool,
        inputs: Iterable[int],
        idle: IdleTimer | None = None,
    ) -> None:
        self._ws = ws
        self._base64 = base64
        self._close_signal = close_signal
        self._idle = idle
        self._inputs: dict[int, ChannelInput] = {n: ChannelInput(n) for n in inputs}
        self.peer_gone = False

    def input(self, channel: int) -> ChannelInput:
        return self._inputs[channel]

    def output(self, channel: int) -> ChannelOutput:
        return ChannelOutput(self, channel)

    async def send(self, channel: int, data: bytes | bytearray | memoryview) -> None:
        """One message on *channel*.

        Raises:
            trio.BrokenResourceError: the WebSocket is closed.
        """
        message: str | bytes
        if self._base64:
            message = chr(ord("0") + channel) + base64.b64encode(data).decode("ascii")
        else:
            message = bytes([channel]) + bytes(data)
        try:
            await self._ws.send_message(message)
        except trio_websocket.ConnectionClosed as exc:
            raise trio.BrokenResourceError("the WebSocket is closed") from exc
        if self._idle is not None:
            self._idle.touch()

    async def run(self, session_scope: trio.CancelScope) -> None:
        """Read messages until the peer closes; then cancel *session_scope*."""
        try:
            await self._read_messages()
            self.peer_gone = True
            # Cancel first: a client that went away has not ended its stdin,
            # and the process must see a kill, not an end of input.
            session_scope.cancel()
        finally:
            for reader in self._inputs.values():
                reader.end()

    async def _read_messages(self) -> None:
        while True:
            try:
                message = await self._ws.get_message()
            except trio_websocket.ConnectionClosed:
                return
            if self._idle is not None:
                self._idle.touch()
            parsed = self._parse(message)
            if parsed is None:
                continue
            channel, data = parsed
            if self._close_signal and channel == CLOSE_CHANNEL:
                if len(data) == 1 and data[0] in self._inputs:
                    self._inputs[data[0]].end()
                continue
            reader = self._inputs.get(channel)
            if reader is not None:
                await reader.deliver(data)

    def _parse(self, message: str | bytes) -> tuple[int, bytes] | None:
        # wsstream reads either message type into bytes; so do we.
        raw = message.encode("latin-1") if isinstance(message, str) else message
        if not raw:
            return None
        if not self._base64:
            return raw[0], raw[1:]
        try:
            return raw[0] - ord("0"), base64.b64decode(raw[1:], validate=True)
        except (binascii.Error, ValueError):
            log.info("websocket message with invalid base64 dropped", channel=raw[0] - ord("0"))
            return None


class ChannelInput(trio.abc.ReceiveStream):
    """What the peer sends on one channel; ``b""`` after its close or the connection's."""

    def __init__(self, channel: int) -> None:
        self.channel = channel
        self._tx, self._rx = trio.open_memory_channel[bytes](CHANNEL_BUFFER)
        self._pending = memoryview(b"")

    async def deliver(self, data: bytes) -> None:
        if data:
            # Closed: ended, or no longer read.
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await self._tx.send(data)

    def end(self) -> None:
        self._tx.close()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if not self._pending:
            try:
                self._pending = memoryview(await self._rx.receive())
            except (trio.EndOfChannel, trio.ClosedResourceError):
                return b""
        else:
            await trio.lowlevel.checkpoint()
        size = len(self._pending) if max_bytes is None else max_bytes
        out = bytes(self._pending[:size])
        self._pending = self._pending[size:]
        return out

    async def aclose(self) -> None:
        self._rx.close()
        await trio.lowlevel.checkpoint()


class ChannelOutput:
    """Sending on one channel; the channel protocols have no per-channel end."""

    def __init__(self, mux: ChannelMux, channel: int) -> None:
        self._mux = mux
        self.channel = channel

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self._mux.send(self.channel, data)

    async def send_eof(self) -> None:
        await trio.lowlevel.checkpoint()
