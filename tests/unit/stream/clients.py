"""Clients for the stream server's tests: HTTP upgrades, SPDY (on spdy.py), WebSocket.

`SpdyClient` plays kubectl's part the way spdystream does: it opens streams
(odd ids), waits for each SYN_REPLY before the next, sends without flow
control, and answers pings.
"""

from __future__ import annotations

import attrs
import trio
import trio_websocket

from pouch.stream.protocol import spdy


@attrs.define
class Response:
    status: int
    headers: dict[str, list[str]]
    body: bytes = b""

    def header(self, name: str) -> str | None:
        values = self.headers.get(name.lower())
        return values[0] if values else None


async def read_response(stream: trio.abc.Stream) -> tuple[Response, bytes]:
    """Read a response head (and a body with Content-Length); return it and what followed."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        data = await stream.receive_some(65536)
        if not data:
            raise EOFError(f"connection closed in the response head: {buf!r}")
        buf += data
    head, _, rest = buf.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers: dict[str, list[str]] = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers.setdefault(name.strip().lower(), []).append(value.strip())
    response = Response(status, headers)
    length = int(response.header("content-length") or 0)
    if status != 101 and length:
        while len(rest) < length:
            data = await stream.receive_some(65536)
            if not data:
                break
            rest += data
        response.body, rest = rest[:length], rest[length:]
    return response, rest


def request_head(method: str, path: str, headers: list[tuple[str, str]]) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: pouch.test", *(f"{k}: {v}" for k, v in headers)]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def spdy_upgrade_headers(*protocols: str) -> list[tuple[str, str]]:
    return [
        ("Connection", "Upgrade"),
        ("Upgrade", "SPDY/3.1"),
        *(("X-Stream-Protocol-Version", p) for p in protocols),
        ("Content-Length", "0"),
    ]


@attrs.define(eq=False)
class ClientStream:
    client: SpdyClient
    stream_id: int
    headers: dict[str, str]
    data: bytearray = attrs.field(factory=bytearray)
    replied: trio.Event = attrs.field(factory=trio.Event)
    ended: trio.Event = attrs.field(factory=trio.Event)
    changed: trio.Event = attrs.field(factory=trio.Event)
    reset: int | None = None
    fin_sent: bool = False

    async def send(self, data: bytes, *, fin: bool = False) -> None:
        await self.client._write(lambda: self.client.conn.data(self.stream_id, data, fin=fin))
        if fin:
            self.fin_sent = True

    async def close(self) -> None:
        await self.send(b"", fin=True)

    async def rst(self) -> None:
        await self.client._write(
            lambda: self.client.conn.rst_stream(self.stream_id, spdy.RstStatus.CANCEL)
        )

    async def read_to_end(self) -> bytes:
        await self.ended.wait()
        return bytes(self.data)

    async def read_at_least(self, n: int) -> bytes:
        while len(self.data) < n and not self.ended.is_set():
            self.changed = trio.Event()
            await self.changed.wait()
        return bytes(self.data)

    def _notify(self) -> None:
        self.changed.set()


class SpdyClient:
    """A client session over an upgraded connection; run `run` in a nursery."""

    def __init__(self, stream: trio.abc.Stream, initial: bytes = b"") -> None:
        self.stream = stream
        self.conn = spdy.SpdyConnection(is_server=False)
        self.streams: dict[int, ClientStream] = {}
        self.goaway: spdy.GoAway | None = None
        self.closed = trio.Event()
        self._initial = initial
        self._lock = trio.StrictFIFOLock()

    @classmethod
    async def upgrade(
        cls,
        stream: trio.abc.Stream,
        path: str,
        *protocols: str,
        method: str = "POST",
        extra: list[tuple[str, str]] | None = None,
    ) -> tuple[Response, SpdyClient | None]:
        await stream.send_all(
            request_head(method, path, spdy_upgrade_headers(*protocols) + (extra or []))
        )
        response, rest = await read_response(stream)
        if response.status != 101:
            return response, None
        return response, cls(stream, rest)

    async def run(self) -> None:
        try:
            pending: bytes | bytearray = self._initial
            while True:
                if not pending:
                    pending = await self.stream.receive_some(65536)
                if not pending:
                    break
                for event in self.conn.receive_data(pending):
                    await self._dispatch(event)
                pending = b""
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            for s in self.streams.values():
                s.ended.set()
                s.replied.set()
                s._notify()
            self.closed.set()
            # As spdystream does when its reader sees the end.
            with trio.CancelScope(shield=True):
                await self.stream.aclose()

    async def _dispatch(self, event: spdy.Event) -> None:
        match event:
            case spdy.SynReply(stream_id=sid):
                self.streams[sid].replied.set()
                if event.fin:
                    self.streams[sid].ended.set()
            case spdy.Data(stream_id=sid, data=data, fin=fin):
                s = self.streams.get(sid)
                if s is not None:
                    s.data += data
                    if fin:
                        s.ended.set()
                    s._notify()
            case spdy.RstStream(stream_id=sid, status=status):
                s = self.streams.get(sid)
                if s is not None:
                    s.reset = status
                    s.replied.set()
                    s.ended.set()
                    s._notify()
            case spdy.Ping(ping_id=ping_id, needs_reply=True):
                await self._write(lambda: self.conn.ping(ping_id))
            case spdy.GoAway():
                self.goaway = event
            case _:
                pass

    async def _write(self, make) -> None:
        async with self._lock:
            data = make()
            if data:
                await self.stream.send_all(data)

    async def open(self, headers: dict[str, str], *, wait: bool = True) -> ClientStream:
        """Open a stream; like spdystream's CreateStream, wait for its reply."""
        async with self._lock:
            sid = self.conn.next_stream_id
            s = ClientStream(self, sid, headers)
            self.streams[sid] = s
            await self.stream.send_all(self.conn.syn_stream(sid, headers))
        if wait:
            await s.replied.wait()
        return s

    async def ping(self, ping_id: int = 1) -> None:
        await self._write(lambda: self.conn.ping(ping_id))

    async def aclose(self) -> None:
        await self.stream.aclose()


async def exec_streams(client: SpdyClient, *types: str) -> dict[str, ClientStream]:
    """Open remotecommand streams in kubectl's order (error first)."""
    out = {}
    for kind in types:
        out[kind] = await client.open({"streamtype": kind})
    return out


async def open_ws(
    nursery: trio.Nursery,
    stream: trio.abc.Stream,
    path: str,
    *protocols: str,
) -> trio_websocket.WebSocketConnection:
    return await trio_websocket.wrap_client_stream(
        nursery,
        stream,  # type: ignore[arg-type]
        "pouch.test",
        path,
        subprotocols=list(protocols),
        max_message_size=16 * 1024 * 1024,
    )


async def ws_collect(ws: trio_websocket.WebSocketConnection) -> list[str | bytes]:
    """Every message until the server closes the connection."""
    messages: list[str | bytes] = []
    while True:
        try:
            messages.append(await ws.get_message())
        except trio_websocket.ConnectionClosed:
            return messages


def demux(messages: list[str | bytes], *, base64: bool = False) -> dict[int, bytes]:
    """Channel -> concatenated payload of channel-protocol messages."""
    import base64 as b64

    out: dict[int, bytes] = {}
    for m in messages:
        if base64:
            assert isinstance(m, str), m
            channel, data = ord(m[0]) - ord("0"), b64.b64decode(m[1:])
        else:
            assert isinstance(m, bytes), m
            channel, data = m[0], m[1:]
        out[channel] = out.get(channel, b"") + data
    return out


async def ws_rejection(
    stream: trio.abc.Stream, path: str, *protocols: str
) -> trio_websocket.ConnectionRejected:
    """The server's refusal of a WebSocket handshake (fails if it accepts)."""
    found: list[trio_websocket.ConnectionRejected] = []
    try:
        async with trio.open_nursery() as nursery:
            ws = await open_ws(nursery, stream, path, *protocols)
            await ws.aclose()
    except* trio_websocket.ConnectionRejected as group:
        found += [e for e in group.exceptions if isinstance(e, trio_websocket.ConnectionRejected)]
    assert found, "the handshake was accepted"
    return found[0]
