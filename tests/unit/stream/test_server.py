"""The stream server's front door: routes, tokens, upgrade negotiation."""

from __future__ import annotations

import pytest
import trio

from pouch import errors
from pouch.config import StreamConfig
from pouch.stream.server import StreamServer
from pouch.stream.session import AttachRequest, ExecRequest, PortForwardRequest
from tests.unit.stream.clients import (
    SpdyClient,
    open_ws,
    read_response,
    request_head,
    spdy_upgrade_headers,
    ws_rejection,
)

pytestmark = pytest.mark.timeout(10)

EXEC = ExecRequest("c1", ("echo", "hi"), stdout=True)


async def get(connector, path, headers=(), method="GET"):
    stream = connector.connect()
    await stream.send_all(request_head(method, path, list(headers)))
    response, _ = await read_response(stream)
    return response


async def test_url_shape(server):
    url = server.url(EXEC)
    assert url.startswith("http://pouch.test:10250/exec/")
    assert server.url(AttachRequest("c1", stdout=True)).split("/")[3] == "attach"
    assert server.url(PortForwardRequest("p1")).split("/")[3] == "portforward"
    assert server.statistics().tokens == 3


async def test_url_needs_a_serving_server(backend):
    with pytest.raises(errors.Unavailable):
        StreamServer(StreamConfig(), backend).url(EXEC)  # not listening
    server = StreamServer(StreamConfig(), None)
    server.address = "x:1"
    with pytest.raises(errors.Unavailable):
        server.url(EXEC)


@pytest.mark.parametrize(
    "path", ["/", "/exec", "/exec/", "/exec/nosuchtoken", "/other/x", "/exec/a/b"]
)
async def test_unknown_paths_are_404(connector, path):
    response = await get(connector, path, spdy_upgrade_headers("v4.channel.k8s.io"))
    assert response.status == 404


async def test_token_is_single_use_and_kind_checked(connector):
    path = connector.path(EXEC)
    wrong_kind = path.replace("/exec/", "/attach/")
    assert (
        await get(connector, wrong_kind, spdy_upgrade_headers("v4.channel.k8s.io"))
    ).status == 404
    # The wrong-kind attempt used the token up, as any attempt does.
    assert (await get(connector, path, spdy_upgrade_headers("v4.channel.k8s.io"))).status == 404


async def test_expired_token_is_404(connector, autojump_clock):
    path = connector.path(EXEC)
    await trio.sleep(61)
    assert (await get(connector, path, spdy_upgrade_headers("v4.channel.k8s.io"))).status == 404


async def test_not_an_upgrade_is_400(connector):
    response = await get(connector, connector.path(EXEC))
    assert response.status == 400
    assert b"missing upgrade headers" in response.body


async def test_method_not_allowed(connector):
    response = await get(
        connector, connector.path(EXEC), spdy_upgrade_headers("v4.channel.k8s.io"), method="PUT"
    )
    assert response.status == 405


async def test_spdy_protocol_header_is_required(connector):
    response = await get(
        connector,
        connector.path(EXEC),
        [("Connection", "Upgrade"), ("Upgrade", "SPDY/3.1")],
        method="POST",
    )
    assert response.status == 400
    assert b"X-Stream-Protocol-Version is required" in response.body


async def test_spdy_protocol_mismatch_lists_ours(connector):
    response = await get(
        connector,
        connector.path(EXEC),
        spdy_upgrade_headers("v9.channel.k8s.io", "portforward.k8s.io"),
        method="POST",
    )
    assert response.status == 403
    assert response.headers["x-accepted-stream-protocol-versions"] == [
        "v4.channel.k8s.io",
        "v3.channel.k8s.io",
        "v2.channel.k8s.io",
        "channel.k8s.io",
    ]


@pytest.mark.parametrize(
    ("offered", "chosen"),
    [
        (["v4.channel.k8s.io", "v3.channel.k8s.io"], "v4.channel.k8s.io"),
        # The client's preference wins (apimachinery negotiateProtocol).
        (["v2.channel.k8s.io", "v4.channel.k8s.io"], "v2.channel.k8s.io"),
        (["v5.channel.k8s.io", "v3.channel.k8s.io"], "v3.channel.k8s.io"),
        (["channel.k8s.io"], "channel.k8s.io"),
        # One header, comma-separated.
        (["v9.channel.k8s.io, v4.channel.k8s.io"], "v4.channel.k8s.io"),
    ],
)
async def test_spdy_negotiation(connector, nursery, offered, chosen):
    stream = connector.connect()
    response, client = await SpdyClient.upgrade(stream, connector.path(EXEC), *offered)
    assert response.status == 101
    assert response.header("upgrade") == "SPDY/3.1"
    assert response.header("connection") == "Upgrade"
    assert response.header("x-stream-protocol-version") == chosen
    assert client is not None
    await client.aclose()


async def test_port_forward_spdy_negotiation(connector):
    path = connector.path(PortForwardRequest("p1"))
    response = await get(connector, path, spdy_upgrade_headers("v4.channel.k8s.io"), method="POST")
    assert response.status == 403
    assert response.headers["x-accepted-stream-protocol-versions"] == ["portforward.k8s.io"]
    stream = connector.connect()
    path = connector.path(PortForwardRequest("p1"))
    response, client = await SpdyClient.upgrade(stream, path, "portforward.k8s.io")
    assert response.status == 101
    assert response.header("x-stream-protocol-version") == "portforward.k8s.io"
    assert client is not None
    await client.aclose()


@pytest.mark.parametrize(
    ("offered", "chosen"),
    [
        (["v5.channel.k8s.io"], "v5.channel.k8s.io"),
        (["v4.base64.channel.k8s.io", "v5.channel.k8s.io"], "v4.base64.channel.k8s.io"),
        (["x", "base64.channel.k8s.io"], "base64.channel.k8s.io"),
        ([], None),
    ],
)
async def test_websocket_negotiation(connector, nursery, offered, chosen):
    ws = await open_ws(nursery, connector.connect(), connector.path(EXEC), *offered)
    assert ws.subprotocol == chosen
    await ws.aclose()


async def test_websocket_unsupported_protocol_is_403(connector, nursery):
    rejected = await ws_rejection(connector.connect(), connector.path(EXEC), "v9.channel.k8s.io")
    assert rejected.status_code == 403
    assert rejected.body is not None
    assert b"not supported" in rejected.body


async def test_websocket_port_forward_protocols(connector, nursery):
    # Channels need ports, from the request or the query.
    path = connector.path(PortForwardRequest("p1"))
    rejected = await ws_rejection(connector.connect(), path, "v4.channel.k8s.io")
    assert rejected.status_code == 400
    path = connector.path(PortForwardRequest("p1"))
    ws = await open_ws(nursery, connector.connect(), path + "?ports=80", "v4.channel.k8s.io")
    assert ws.subprotocol == "v4.channel.k8s.io"
    await ws.aclose()
    path = connector.path(PortForwardRequest("p1"))
    ws = await open_ws(
        nursery,
        connector.connect(),
        path,
        "SPDY/3.1+portforward.k8s.io",
        "v4.channel.k8s.io",
    )
    assert ws.subprotocol == "SPDY/3.1+portforward.k8s.io"
    await ws.aclose()


async def test_websocket_needs_get(connector):
    response = await get(
        connector,
        connector.path(EXEC),
        [
            ("Connection", "Upgrade"),
            ("Upgrade", "websocket"),
            ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
            ("Sec-WebSocket-Version", "13"),
            ("Content-Length", "0"),
        ],
        method="POST",
    )
    assert response.status == 400


async def test_slow_head_is_dropped(connector, autojump_clock):
    stream = connector.connect()
    await stream.send_all(b"GET /exec/x HTTP/1.1\r\n")
    with trio.fail_after(31):
        assert await stream.receive_some() == b""


async def test_garbage_is_dropped(connector):
    stream = connector.connect()
    await stream.send_all(b"\x80\x03\x00\x01garbage\r\n\r\n")
    assert await stream.receive_some() == b""


async def test_serve_listens_and_stops(backend, nursery):
    server = StreamServer(StreamConfig(address="127.0.0.1", port=0), backend)
    stop = trio.Event()
    async with trio.open_nursery() as handlers:
        address = await nursery.start(server.serve, handlers, stop)
        host, port = address.rsplit(":", 1)
        assert host == "127.0.0.1"
        assert server.url(EXEC).startswith(f"http://127.0.0.1:{port}/exec/")
        stream = await trio.open_tcp_stream(host, int(port))
        await stream.send_all(request_head("GET", "/nothing", []))
        response, _ = await read_response(stream)
        assert response.status == 404
        await stream.aclose()
        stop.set()
        await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(OSError, match=r"(?i)connect"):
            await trio.open_tcp_stream(host, int(port))
