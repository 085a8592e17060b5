"""Exec and attach sessions, every protocol version, over the fake backend.

SPDY sessions are driven with a client on pouch's own spdy.py (as kubectl
drives them with spdystream); WebSocket sessions with trio-websocket.
"""

from __future__ import annotations

import base64
import json

import pytest
import trio
import trio.testing
import trio_websocket

from pouch.stream.remotecommand import ENDED_BY_SERVER
from pouch.stream.session import AttachRequest, ExecRequest
from tests.unit.stream.clients import SpdyClient, demux, exec_streams, open_ws, ws_collect

pytestmark = pytest.mark.timeout(10)

V4 = "v4.channel.k8s.io"
V3 = "v3.channel.k8s.io"
V2 = "v2.channel.k8s.io"
V1 = "channel.k8s.io"

SUCCESS = {"metadata": {}, "status": "Success"}


def exit_status(code: int, cmd: str) -> dict:
    return {
        "metadata": {},
        "status": "Failure",
        "message": f"command terminated with non-zero exit code: "
        f"error executing command [{cmd}], exit code {code}",
        "reason": "NonZeroExitCode",
        "details": {"causes": [{"reason": "ExitCode", "message": str(code)}]},
    }


def stream_types(request) -> list[str]:
    types = ["error"]
    if request.stdin:
        types.append("stdin")
    if request.stdout:
        types.append("stdout")
    if request.stderr:
        types.append("stderr")
    if request.tty:
        types.append("resize")
    return types


async def spdy_session(connector, nursery, request, protocol=V4, types=None):
    response, client = await SpdyClient.upgrade(
        connector.connect(), connector.path(request), protocol
    )
    assert response.status == 101, response
    assert client is not None
    nursery.start_soon(client.run)
    streams = await exec_streams(client, *(types if types is not None else stream_types(request)))
    return client, streams


# ---------------------------------------------------------------------------
# SPDY v4
# ---------------------------------------------------------------------------


async def test_v4_echo(connector, nursery, backend, server):
    request = ExecRequest("c1", ("echo", "hello", "world"), stdout=True, stderr=True)
    client, s = await spdy_session(connector, nursery, request)
    assert await s["stdout"].read_to_end() == b"hello world\n"
    assert await s["stderr"].read_to_end() == b""
    assert json.loads(await s["error"].read_to_end()) == SUCCESS
    await client.closed.wait()  # The server closes the connection...
    assert client.goaway is not None  # ...after a GOAWAY.
    assert backend.processes[0].closed
    assert not backend.processes[0].killed
    await client.aclose()  # The server waits for this, briefly, before closing.
    await trio.testing.wait_all_tasks_blocked()
    assert server.statistics().sessions == 0


async def test_v4_exit_code(connector, nursery):
    request = ExecRequest("c1", ("fail", "3", "boom"), stdout=True, stderr=True)
    _, s = await spdy_session(connector, nursery, request)
    assert await s["stderr"].read_to_end() == b"boom\n"
    assert await s["stdout"].read_to_end() == b""
    assert json.loads(await s["error"].read_to_end()) == exit_status(3, "fail 3 boom")


async def test_v4_stdin_to_eof(connector, nursery, backend):
    request = ExecRequest("c1", ("cat",), stdin=True, stdout=True, stderr=True)
    _, s = await spdy_session(connector, nursery, request)
    for i in range(100):
        await s["stdin"].send(b"line %d\n" % i)
    await s["stdin"].close()  # kubectl's remoteStdin.Close(): the end of input.
    expected = b"".join(b"line %d\n" % i for i in range(100))
    assert await s["stdout"].read_to_end() == expected
    assert json.loads(await s["error"].read_to_end()) == SUCCESS
    # The server closes its side of stdin too (kubectl waits for that).
    assert await s["stdin"].read_to_end() == b""


async def test_v4_large_output_arrives_before_the_status(connector, nursery):
    request = ExecRequest("c1", ("big", str(3 * 1024 * 1024)), stdout=True)
    _, s = await spdy_session(connector, nursery, request)
    out = await s["stdout"].read_to_end()
    assert len(out) == 3 * 1024 * 1024
    assert out[:512] == bytes(range(256)) * 2
    assert json.loads(await s["error"].read_to_end()) == SUCCESS


async def test_v4_tty_resize(connector, nursery, backend):
    request = ExecRequest("c1", ("size",), tty=True, stdin=True, stdout=True)
    _, s = await spdy_session(connector, nursery, request)
    assert set(s) == {"error", "stdin", "stdout", "resize"}
    # json.Encoder writes one object per line; a split object waits for its tail.
    await s["resize"].send(b'{"Width":80,"Height":24}\n{"Width":1')
    await s["resize"].send(b'00,"Height":50}\n')
    await s["stdout"].read_at_least(len(b"80x24\n100x50\n"))
    await s["stdin"].close()
    assert await s["stdout"].read_to_end() == b"80x24\n100x50\n"
    assert json.loads(await s["error"].read_to_end()) == SUCCESS
    assert backend.processes[0].tty
    assert backend.processes[0].stderr is None


async def test_v4_bad_resize_is_ignored(connector, nursery, backend):
    request = ExecRequest("c1", ("size",), tty=True, stdin=True, stdout=True)
    _, s = await spdy_session(connector, nursery, request)
    await s["resize"].send(b'{"Width":0,"Height":24}\n[1,2]\n{"width":7,"height":9}\n')
    await s["stdout"].read_at_least(4)
    await s["stdin"].close()
    assert await s["stdout"].read_to_end() == b"7x9\n"


async def test_v4_unrequested_output_is_drained(connector, nursery):
    # The process writes to stderr, which the client did not ask for.
    request = ExecRequest("c1", ("fail", "0", "x" * 200_000), stdout=True)
    _, s = await spdy_session(connector, nursery, request)
    assert await s["stdout"].read_to_end() == b""
    assert json.loads(await s["error"].read_to_end()) == SUCCESS


async def test_v4_backend_error_is_an_internal_error(connector, nursery, backend):
    request = ExecRequest("c1", ("echo",), stdout=True)
    path = connector.path(request)
    backend.containers.discard("c1")  # Gone between the RPC and the session.
    _response, client = await SpdyClient.upgrade(connector.connect(), path, V4)
    assert client is not None
    nursery.start_soon(client.run)
    s = await exec_streams(client, "error", "stdout")
    status = json.loads(await s["error"].read_to_end())
    assert status["reason"] == "InternalError"
    assert status["code"] == 500
    assert status["message"] == (
        'Internal error occurred: error executing command in container: container "c1" not found'
    )


async def test_client_going_away_kills_the_exec(connector, nursery, backend, server):
    request = ExecRequest("c1", ("sleep",), stdout=True)
    client, _s = await spdy_session(connector, nursery, request)
    await trio.testing.wait_all_tasks_blocked()
    assert server.statistics().sessions == 1
    proc = backend.processes[0]
    assert not proc.exited.is_set()
    await client.aclose()
    await proc.exited.wait()
    assert proc.killed
    await trio.testing.wait_all_tasks_blocked()
    assert server.statistics().sessions == 0


async def test_streams_may_come_slowly(connector, nursery, autojump_clock):
    request = ExecRequest("c1", ("echo", "late"), stdout=True)
    _response, client = await SpdyClient.upgrade(connector.connect(), connector.path(request), V4)
    assert client is not None
    nursery.start_soon(client.run)
    error = await client.open({"streamtype": "error"})
    await trio.sleep(29)
    stdout = await client.open({"streamtype": "stdout"})
    assert await stdout.read_to_end() == b"late\n"
    assert json.loads(await error.read_to_end()) == SUCCESS


async def test_missing_stream_drops_the_session(connector, nursery, backend, autojump_clock):
    request = ExecRequest("c1", ("echo",), stdin=True, stdout=True)
    _response, client = await SpdyClient.upgrade(connector.connect(), connector.path(request), V4)
    assert client is not None
    nursery.start_soon(client.run)
    await client.open({"streamtype": "error"})
    await client.open({"streamtype": "stdout"})  # stdin never comes
    with trio.fail_after(31):
        await client.closed.wait()
    assert trio.current_time() >= 30
    assert backend.processes == []  # Nothing was started.


async def test_unknown_stream_types_do_not_count(connector, nursery):
    request = ExecRequest("c1", ("echo", "x"), stdout=True)
    _response, client = await SpdyClient.upgrade(connector.connect(), connector.path(request), V4)
    assert client is not None
    nursery.start_soon(client.run)
    await client.open({"streamtype": "bogus"})
    error = await client.open({"streamtype": "error"})
    stdout = await client.open({"streamtype": "stdout"})
    assert await stdout.read_to_end() == b"x\n"
    assert json.loads(await error.read_to_end()) == SUCCESS


async def test_pings_are_answered(connector, nursery):
    request = ExecRequest("c1", ("sleep",), stdout=True)
    client, _s = await spdy_session(connector, nursery, request)
    await client.ping(7)
    await trio.testing.wait_all_tasks_blocked()
    await client.aclose()


# ---------------------------------------------------------------------------
# Older SPDY versions
# ---------------------------------------------------------------------------


async def test_v3_status_is_text(connector, nursery):
    request = ExecRequest("c1", ("echo", "ok"), stdout=True)
    _, s = await spdy_session(connector, nursery, request, V3)
    assert await s["stdout"].read_to_end() == b"ok\n"
    assert await s["error"].read_to_end() == b""  # Success: nothing.
    request = ExecRequest("c1", ("fail", "5"), stdout=True)
    _, s = await spdy_session(connector, nursery, request, V3)
    assert (await s["error"].read_to_end()).decode() == (
        "command terminated with non-zero exit code: error executing command [fail 5], exit code 5"
    )


async def test_v3_has_resize(connector, nursery, backend):
    request = ExecRequest("c1", ("size",), tty=True, stdin=True, stdout=True)
    _, s = await spdy_session(connector, nursery, request, V3)
    await s["resize"].send(b'{"Width":1,"Height":2}\n')
    await s["stdout"].read_at_least(4)
    await s["stdin"].close()
    assert await s["stdout"].read_to_end() == b"1x2\n"


async def test_v2_tty_has_no_resize_stream(connector, nursery, backend):
    request = ExecRequest("c1", ("echo", "tty"), tty=True, stdout=True)
    _, s = await spdy_session(connector, nursery, request, V2, types=["error", "stdout"])
    assert await s["stdout"].read_to_end() == b"tty\n"
    assert await s["error"].read_to_end() == b""


async def test_v1_closes_stdin_at_once(connector, nursery):
    request = ExecRequest("c1", ("cat",), stdin=True, stdout=True)
    _, s = await spdy_session(connector, nursery, request, V1)
    assert await s["stdin"].read_to_end() == b""  # FIN from the server right away
    await s["stdin"].send(b"still works\n", fin=True)
    assert await s["stdout"].read_to_end() == b"still works\n"
    assert await s["error"].read_to_end() == b""


# ---------------------------------------------------------------------------
# Attach
# ---------------------------------------------------------------------------


async def test_attach_until_the_container_exits(connector, nursery, backend):
    request = AttachRequest("c1", stdin=True, stdout=True, stderr=True)
    _, s = await spdy_session(connector, nursery, request)
    await s["stdin"].send(b"ping\n")
    assert await s["stdout"].read_at_least(5) == b"ping\n"
    backend.exit_container("c1", code=3)
    assert await s["stdout"].read_to_end() == b"ping\n"
    # Attach reports success whatever the exit code (kubelet ServeAttach).
    assert json.loads(await s["error"].read_to_end()) == SUCCESS


async def test_attach_client_leaving_detaches(connector, nursery, backend):
    request = AttachRequest("c2", stdout=True)
    client, _s = await spdy_session(connector, nursery, request)
    await trio.testing.wait_all_tasks_blocked()
    await client.aclose()
    proc = backend.processes[0]
    await proc.exited.wait()
    assert proc.closed


# ---------------------------------------------------------------------------
# WebSocket
# ---------------------------------------------------------------------------


async def ws_session(connector, nursery, request, protocol):
    return await open_ws(nursery, connector.connect(), connector.path(request), protocol)


async def test_ws_v5_echo(connector, nursery):
    request = ExecRequest("c1", ("echo", "hi"), stdout=True, stderr=True)
    ws = await ws_session(connector, nursery, request, "v5.channel.k8s.io")
    messages = await ws_collect(ws)
    assert messages[0] == b"\x01"  # "connection established" on stdout
    out = demux(messages)
    assert out[1] == b"hi\n"
    assert json.loads(out[3]) == SUCCESS
    assert ws.closed is not None
    assert ws.closed.code == 1000


async def test_ws_v5_close_signal_ends_stdin(connector, nursery, backend):
    request = ExecRequest("c1", ("cat",), stdin=True, stdout=True)
    ws = await ws_session(connector, nursery, request, "v5.channel.k8s.io")
    await ws.send_message(b"\x00one\n")
    await ws.send_message(b"\x00two\n")
    await ws.send_message(b"\xff\x00")  # CLOSE stdin
    out = demux(await ws_collect(ws))
    assert out[1] == b"one\ntwo\n"
    assert json.loads(out[3]) == SUCCESS
    assert not backend.processes[0].killed


async def test_ws_v5_exit_code(connector, nursery):
    request = ExecRequest("c1", ("fail", "42", "bad"), stdout=True, stderr=True)
    ws = await ws_session(connector, nursery, request, "v5.channel.k8s.io")
    out = demux(await ws_collect(ws))
    assert out[2] == b"bad\n"
    assert json.loads(out[3]) == exit_status(42, "fail 42 bad")


async def test_ws_v4_has_no_close_signal(connector, nursery, backend):
    request = ExecRequest("c1", ("cat",), stdin=True, stdout=True)
    ws = await ws_session(connector, nursery, request, "v4.channel.k8s.io")
    await ws.send_message(b"\x00abc")
    await ws.send_message(b"\xff\x00")  # Not a signal before v5: dropped.
    assert await ws.get_message() == b"\x01"
    assert await ws.get_message() == b"\x01abc"
    await trio.testing.wait_all_tasks_blocked()
    assert not backend.processes[0].exited.is_set()
    await ws.aclose()  # The client leaving ends the exec.
    await backend.processes[0].exited.wait()
    assert backend.processes[0].killed


async def test_ws_v4_base64(connector, nursery):
    request = ExecRequest("c1", ("cat",), stdin=True, stdout=True, stderr=True)
    ws = await ws_session(connector, nursery, request, "v4.base64.channel.k8s.io")
    assert await ws.get_message() == "1"
    await ws.send_message("0" + base64.b64encode(b"\x00\xffbinary\n").decode())
    assert await ws.get_message() == "1" + base64.b64encode(b"\x00\xffbinary\n").decode()
    await ws.aclose()


async def test_ws_base64_v1_text_status(connector, nursery):
    request = ExecRequest("c1", ("fail", "2"), stderr=True)
    ws = await ws_session(connector, nursery, request, "base64.channel.k8s.io")
    messages = await ws_collect(ws)
    assert messages[0] == "2"  # stderr is the lowest channel asked for
    out = demux(messages, base64=True)
    assert out[3] == (
        b"command terminated with non-zero exit code: error executing command [fail 2], exit code 2"
    )


async def test_ws_channel_v1_success_is_silent(connector, nursery):
    request = ExecRequest("c1", ("echo", "x"), stdout=True)
    ws = await ws_session(connector, nursery, request, "channel.k8s.io")
    out = demux(await ws_collect(ws))
    assert out == {1: b"x\n"}


async def test_ws_resize(connector, nursery):
    request = ExecRequest("c1", ("size",), tty=True, stdin=True, stdout=True)
    ws = await ws_session(connector, nursery, request, "v5.channel.k8s.io")
    assert await ws.get_message() == b"\x01"
    await ws.send_message(b'\x04{"Width":132,"Height":43}')
    assert await ws.get_message() == b"\x01132x43\n"
    await ws.send_message(b"\xff\x00")
    out = demux(await ws_collect(ws))
    assert json.loads(out[3]) == SUCCESS


async def test_ws_only_stdin_announces_on_error_channel(connector, nursery):
    request = ExecRequest("c1", ("cat",), stdin=True)
    ws = await ws_session(connector, nursery, request, "v5.channel.k8s.io")
    assert await ws.get_message() == b"\x03"
    await ws.send_message(b"\x00data")
    await ws.send_message(b"\xff\x00")
    out = demux(await ws_collect(ws))
    assert json.loads(out[3]) == SUCCESS
    assert 1 not in out  # stdout was drained, not sent


async def test_ws_attach(connector, nursery, backend):
    request = AttachRequest("c1", stdin=True, stdout=True)
    ws = await ws_session(connector, nursery, request, "v5.channel.k8s.io")
    assert await ws.get_message() == b"\x01"
    await ws.send_message(b"\x00hello\n")
    assert await ws.get_message() == b"\x01hello\n"
    backend.exit_container("c1")
    out = demux(await ws_collect(ws))
    assert json.loads(out[3]) == SUCCESS


# ---------------------------------------------------------------------------
# Lifetimes
# ---------------------------------------------------------------------------


async def test_idle_session_is_closed(backend, nursery, autojump_clock):
    from pouch.config import StreamConfig
    from pouch.stream.server import StreamServer
    from pouch.stream.session import SessionLimits
    from tests.unit.stream.conftest import Connector

    server = StreamServer(StreamConfig(), backend, limits=SessionLimits(idle_timeout=100))
    server.address = "pouch.test:10250"
    connector = Connector(server, nursery)
    request = ExecRequest("c1", ("cat",), stdin=True, stdout=True)
    client, s = await spdy_session(connector, nursery, request)
    await trio.sleep(90)
    await s["stdin"].send(b"keepalive\n")  # Traffic moves the deadline.
    await trio.sleep(90)
    assert not client.closed.is_set()
    with trio.fail_after(120):
        await client.closed.wait()
    proc = backend.processes[0]
    assert proc.killed
    # The client is told why, on the error stream.
    status = json.loads(s["error"].data)
    assert status["message"] == f"Internal error occurred: {ENDED_BY_SERVER}"


async def test_sessions_do_not_block_each_other(connector, nursery, backend):
    # One session whose client never reads...
    request = ExecRequest("c1", ("big", str(50 * 1024 * 1024)), stdout=True)
    _response, stuck = await SpdyClient.upgrade(connector.connect(), connector.path(request), V4)
    assert stuck is not None
    stuck_error = await _open_without_reading(stuck)
    del stuck_error
    # ...and others carry on.
    for i in range(5):
        req = ExecRequest("c2", ("echo", str(i)), stdout=True)
        _, s = await spdy_session(connector, nursery, req)
        assert await s["stdout"].read_to_end() == f"{i}\n".encode()


async def _open_without_reading(client: SpdyClient):
    """Open error and stdout streams by hand, then never read the connection again."""
    await client._write(lambda: client.conn.syn_stream(1, {"streamtype": "error"}))
    await client._write(lambda: client.conn.syn_stream(3, {"streamtype": "stdout"}))
    return 1


async def test_cancelling_the_server_tells_the_client(connector, nursery, backend):
    # A daemon shutdown cancels the handlers nursery: the client hears of it.
    request = ExecRequest("c1", ("sleep",), stdout=True)
    async with trio.open_nursery() as handlers:
        connector.nursery = handlers
        client, s = await spdy_session(connector, nursery, request)
        await trio.testing.wait_all_tasks_blocked()
        handlers.cancel_scope.cancel()
    status = json.loads(await s["error"].read_to_end())
    assert status["reason"] == "InternalError"
    assert ENDED_BY_SERVER in status["message"]
    assert backend.processes[0].killed
    await client.closed.wait()


async def test_ws_client_close_midway(connector, nursery, backend):
    request = ExecRequest("c1", ("sleep",), stdout=True)
    ws = await ws_session(connector, nursery, request, "v5.channel.k8s.io")
    assert await ws.get_message() == b"\x01"
    await ws.aclose()
    await backend.processes[0].exited.wait()
    assert backend.processes[0].killed
    with pytest.raises(trio_websocket.ConnectionClosed):
        await ws.get_message()


async def test_tty_size_is_applied_at_start(connector, nursery, backend):
    request = ExecRequest("c1", ("size",), tty=True, stdin=True, stdout=True)
    _response, client = await SpdyClient.upgrade(connector.connect(), connector.path(request), V4)
    assert client is not None
    nursery.start_soon(client.run)
    s = await exec_streams(client, "error", "stdin", "stdout", "resize")
    await trio.testing.wait_all_tasks_blocked()
    assert backend.processes == []  # Waiting for the terminal's size...
    await s["resize"].send(b'{"Width":120,"Height":40}\n')
    await s["stdout"].read_at_least(len(b"120x40\n"))
    assert backend.processes[0].resizes == [(120, 40)]  # ...given as soon as it started.
    await s["stdin"].close()
    assert await s["stdout"].read_to_end() == b"120x40\n"


async def test_tty_without_a_size_starts_anyway(connector, nursery, backend, autojump_clock):
    request = ExecRequest("c1", ("echo", "no size"), tty=True, stdout=True)
    _, s = await spdy_session(connector, nursery, request)
    started = trio.current_time()
    assert await s["stdout"].read_to_end() == b"no size\n"
    assert 1.0 <= trio.current_time() - started < 2.0


async def test_pings_do_not_keep_a_session_alive(backend, nursery, autojump_clock):
    from pouch.config import StreamConfig
    from pouch.stream.server import StreamServer
    from pouch.stream.session import SessionLimits
    from tests.unit.stream.conftest import Connector

    server = StreamServer(StreamConfig(), backend, limits=SessionLimits(idle_timeout=100))
    server.address = "pouch.test:10250"
    connector = Connector(server, nursery)
    request = ExecRequest("c1", ("sleep",), stdout=True)
    client, _s = await spdy_session(connector, nursery, request)
    with trio.fail_after(150):
        while not client.closed.is_set():
            await client.ping(1)  # kubectl port-forward pings every 5 s.
            await trio.sleep(5)
    assert backend.processes[0].killed


async def test_wait_failure_is_an_internal_error(connector, nursery, backend):
    request = ExecRequest("c1", ("wait-fails",), stdout=True)
    _, s = await spdy_session(connector, nursery, request)
    status = json.loads(await s["error"].read_to_end())
    assert status["reason"] == "InternalError"
    assert "the container's monitor is gone" in status["message"]
    assert backend.processes[0].closed
