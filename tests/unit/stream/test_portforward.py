"""Port-forward sessions: SPDY, SPDY in WebSocket, WebSocket channels."""

from __future__ import annotations

import base64
import hashlib
import struct

import pytest
import trio
import trio.testing

from pouch.stream.protocol import spdy
from pouch.stream.session import PortForwardRequest
from pouch.stream.websocket import WebSocketByteStream
from tests.unit.stream.clients import SpdyClient, demux, open_ws, ws_collect

pytestmark = pytest.mark.timeout(20)

PF = "portforward.k8s.io"


async def echo(stream: trio.abc.Stream) -> None:
    while data := await stream.receive_some():
        await stream.send_all(data)


async def count_then_reply(stream: trio.abc.HalfCloseableStream) -> None:
    """Reads to EOF (the client's half-close), then answers."""
    total = 0
    while data := await stream.receive_some():
        total += len(data)
    await stream.send_all(f"got {total}".encode())


def sender(size: int):
    async def handler(stream: trio.abc.Stream) -> None:
        block = bytes(range(256)) * 256
        left = size
        while left:
            n = min(left, len(block))
            await stream.send_all(block[:n])
            left -= n

    return handler


def pattern_digest(size: int) -> str:
    block = bytes(range(256)) * 256
    h = hashlib.sha256()
    left = size
    while left:
        n = min(left, len(block))
        h.update(block[:n])
        left -= n
    return h.hexdigest()


async def pf_session(connector, nursery, request=None):
    request = request or PortForwardRequest("p1")
    response, client = await SpdyClient.upgrade(connector.connect(), connector.path(request), PF)
    assert response.status == 101
    assert client is not None
    nursery.start_soon(client.run)
    return client


async def open_pair(client: SpdyClient, port: int, request_id: int):
    # kubectl's order: the error stream (closed at once on its side), then data.
    headers = {"streamtype": "error", "port": str(port), "requestid": str(request_id)}
    error = await client.open(headers)
    await error.close()
    data = await client.open({**headers, "streamtype": "data"})
    return error, data


async def test_spdy_echo(connector, nursery, backend):
    backend.pods[80] = echo
    client = await pf_session(connector, nursery)
    error, data = await open_pair(client, 80, 0)
    await data.send(b"hello")
    assert await data.read_at_least(5) == b"hello"
    await data.close()
    assert await data.read_to_end() == b"hello"
    assert await error.read_to_end() == b""
    assert backend.connections == [80]


async def test_spdy_half_close_reaches_the_pod(connector, nursery, backend):
    backend.pods[9000] = count_then_reply
    client = await pf_session(connector, nursery)
    error, data = await open_pair(client, 9000, 0)
    for _ in range(10):
        await data.send(b"x" * 100_000)
    await data.close()  # The pod answers only after the end of input.
    assert await data.read_to_end() == b"got 1000000"
    assert await error.read_to_end() == b""


async def test_spdy_download_with_checksum(connector, nursery, backend):
    size = 20 * 1024 * 1024 + 123
    backend.pods[8080] = sender(size)
    client = await pf_session(connector, nursery)
    error, data = await open_pair(client, 8080, 0)
    body = await data.read_to_end()  # The pod closing ends the stream.
    assert len(body) == size
    assert hashlib.sha256(body).hexdigest() == pattern_digest(size)
    assert await error.read_to_end() == b""


async def test_spdy_refused_connection_is_reported(connector, nursery, backend):
    client = await pf_session(connector, nursery)
    error, data = await open_pair(client, 81, 0)
    message = (await error.read_to_end()).decode()
    assert message == (
        "error forwarding port 81 to pod p1, uid : "
        "failed to connect to localhost:81: connection refused"
    )
    assert await data.read_to_end() == b""


async def test_spdy_many_connections_at_once(connector, nursery, backend):
    backend.pods[80] = echo
    client = await pf_session(connector, nursery)
    results: dict[int, bytes] = {}

    async def one(i: int) -> None:
        error, data = await open_pair(client, 80, i)
        payload = bytes([i]) * (50_000 + i)
        await data.send(payload)
        await data.close()
        results[i] = await data.read_to_end()
        assert await error.read_to_end() == b""

    async with trio.open_nursery() as n:
        for i in range(20):
            n.start_soon(one, i)
    assert results == {i: bytes([i]) * (50_000 + i) for i in range(20)}
    assert len(backend.connections) == 20


@pytest.mark.parametrize(
    "headers",
    [
        {"streamtype": "data", "requestid": "0"},  # no port
        {"streamtype": "data", "port": "0", "requestid": "0"},
        {"streamtype": "data", "port": "65536", "requestid": "0"},
        {"streamtype": "data", "port": "http", "requestid": "0"},
        {"port": "80", "requestid": "0"},  # no type
        {"streamtype": "stdout", "port": "80", "requestid": "0"},
    ],
)
async def test_spdy_invalid_streams_are_refused(connector, nursery, backend, headers):
    client = await pf_session(connector, nursery)
    s = await client.open(headers)
    assert s.reset == spdy.RstStatus.REFUSED_STREAM


async def test_spdy_duplicate_stream_is_an_error(connector, nursery, backend, autojump_clock):
    client = await pf_session(connector, nursery)
    headers = {"streamtype": "error", "port": "80", "requestid": "7"}
    error = await client.open(headers)
    duplicate = await client.open(headers)
    await duplicate.ended.wait()
    assert duplicate.reset == spdy.RstStatus.CANCEL
    await error.read_at_least(1)
    assert error.data.startswith(
        b"error processing stream for request 7: error stream already assigned"
    )


async def test_spdy_incomplete_pair_times_out(connector, nursery, backend, autojump_clock):
    client = await pf_session(connector, nursery)
    headers = {"streamtype": "error", "port": "80", "requestid": "1"}
    error = await client.open(headers)
    with trio.fail_after(31):
        message = await error.read_to_end()
    assert message == b"timed out waiting for streams of request 1"
    assert backend.connections == []


async def test_spdy_old_client_without_request_ids(connector, nursery, backend):
    backend.pods[80] = echo
    client = await pf_session(connector, nursery)
    error = await client.open({"streamtype": "error", "port": "80"})  # id 1
    data = await client.open({"streamtype": "data", "port": "80"})  # id 3: 3 - 2 == 1
    await data.send(b"old", fin=True)
    assert await data.read_to_end() == b"old"
    assert await error.read_to_end() == b""


async def test_spdy_client_reset_ends_the_connection(connector, nursery, backend):
    closed = trio.Event()

    async def wait_for_close(stream: trio.abc.Stream) -> None:
        try:
            while await stream.receive_some():
                pass
        finally:
            closed.set()

    backend.pods[80] = wait_for_close
    client = await pf_session(connector, nursery)
    _error, data = await open_pair(client, 80, 0)
    await data.send(b"x")
    await data.rst()
    with trio.fail_after(5):
        await closed.wait()


async def test_spdy_client_leaving_closes_pod_connections(connector, nursery, backend):
    closed = trio.Event()

    async def hold(stream: trio.abc.Stream) -> None:
        try:
            while await stream.receive_some():
                pass
        finally:
            closed.set()

    backend.pods[80] = hold
    client = await pf_session(connector, nursery)
    await open_pair(client, 80, 0)
    await trio.testing.wait_all_tasks_blocked()
    await client.aclose()
    with trio.fail_after(5):
        await closed.wait()


# ---------------------------------------------------------------------------
# SPDY in WebSocket (kubectl >= 1.31 with KUBECTL_PORT_FORWARD_WEBSOCKETS)
# ---------------------------------------------------------------------------


class _Tunnel(trio.abc.Stream):
    def __init__(self, ws):
        self._inner = WebSocketByteStream(ws)
        self._ws = ws

    async def receive_some(self, max_bytes=None):
        return await self._inner.receive_some(max_bytes)

    async def send_all(self, data):
        await self._inner.send_all(data)

    async def wait_send_all_might_not_block(self):
        pass

    async def aclose(self):
        await self._ws.aclose()


async def test_spdy_tunnelled_in_websocket(connector, nursery, backend):
    size = 5 * 1024 * 1024
    backend.pods[80] = echo
    backend.pods[8080] = sender(size)
    path = connector.path(PortForwardRequest("p1"))
    ws = await open_ws(nursery, connector.connect(), path, "SPDY/3.1+portforward.k8s.io")
    assert ws.subprotocol == "SPDY/3.1+portforward.k8s.io"
    client = SpdyClient(_Tunnel(ws))
    nursery.start_soon(client.run)
    error, data = await open_pair(client, 80, 0)
    await data.send(b"through the tunnel", fin=True)
    assert await data.read_to_end() == b"through the tunnel"
    assert await error.read_to_end() == b""
    error, data = await open_pair(client, 8080, 1)
    body = await data.read_to_end()
    assert hashlib.sha256(body).hexdigest() == pattern_digest(size)
    await client.stream.aclose()


# ---------------------------------------------------------------------------
# WebSocket channels (kubelet websocket.go)
# ---------------------------------------------------------------------------


async def test_websocket_channels(connector, nursery, backend):
    backend.pods[80] = echo
    path = connector.path(PortForwardRequest("p1", ports=(80, 81)))
    ws = await open_ws(nursery, connector.connect(), path, "v4.channel.k8s.io")
    prefixes = [await ws.get_message() for _ in range(4)]
    port80, port81 = struct.pack("<H", 80), struct.pack("<H", 81)
    assert prefixes == [b"\x00" + port80, b"\x01" + port80, b"\x02" + port81, b"\x03" + port81]
    # Port 81 has nothing listening: its error channel says so.
    message = await ws.get_message()
    assert message[0] == 3
    assert b"error forwarding port 81 to pod p1" in message
    await ws.send_message(b"\x00ping")
    assert await ws.get_message() == b"\x00ping"
    await ws.aclose()


async def test_websocket_channels_end_with_the_pod(connector, nursery, backend):
    backend.pods[8080] = sender(100_000)
    path = connector.path(PortForwardRequest("p1")) + "?ports=8080"
    ws = await open_ws(nursery, connector.connect(), path, "v4.channel.k8s.io")
    out = demux(await ws_collect(ws))
    assert out[0][:2] == struct.pack("<H", 8080)
    assert len(out[0]) == 2 + 100_000
    assert out[1] == struct.pack("<H", 8080)
    assert ws.closed is not None
    assert ws.closed.code == 1000


async def test_websocket_base64_channels(connector, nursery, backend):
    backend.pods[80] = echo
    path = connector.path(PortForwardRequest("p1", ports=(80,)))
    ws = await open_ws(nursery, connector.connect(), path, "v4.base64.channel.k8s.io")
    assert await ws.get_message() == "0" + base64.b64encode(struct.pack("<H", 80)).decode()
    assert await ws.get_message() == "1" + base64.b64encode(struct.pack("<H", 80)).decode()
    await ws.send_message("0" + base64.b64encode(b"abc").decode())
    assert await ws.get_message() == "0" + base64.b64encode(b"abc").decode()
    await ws.aclose()


async def test_empty_tunnel_messages_are_not_the_end(connector, nursery, backend):
    # client-go's TunnelingConnection turns every Write into a message, empty ones too.
    backend.pods[80] = echo
    path = connector.path(PortForwardRequest("p1"))
    ws = await open_ws(nursery, connector.connect(), path, "SPDY/3.1+portforward.k8s.io")
    await ws.send_message(b"")
    client = SpdyClient(_Tunnel(ws))
    nursery.start_soon(client.run)
    _error, data = await open_pair(client, 80, 0)
    await ws.send_message(b"")
    await data.send(b"still here", fin=True)
    assert await data.read_to_end() == b"still here"
    await client.stream.aclose()
