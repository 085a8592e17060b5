"""SpdySession on its own: stream bookkeeping, refusal, flow control."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from pouch.stream.protocol import spdy
from pouch.stream.session import IdleTimer, SpdySession
from tests.unit.stream.clients import SpdyClient

pytestmark = pytest.mark.timeout(10)


async def echo_all(session: SpdySession) -> None:
    async with trio.open_nursery() as nursery:
        while True:
            try:
                stream = await session.accept_stream()
            except trio.EndOfChannel:
                return

            async def echo(s=stream):
                while data := await s.receive_some():
                    await s.send_all(data)
                await s.send_eof()

            nursery.start_soon(echo)


async def test_finished_streams_are_forgotten(nursery):
    client_end, server_end = trio.testing.memory_stream_pair()
    session = SpdySession(server_end)
    nursery.start_soon(session.run, echo_all)
    client = SpdyClient(client_end)
    nursery.start_soon(client.run)
    for i in range(50):
        s = await client.open({"n": str(i)})
        await s.send(b"x" * i, fin=True)
        assert await s.read_to_end() == b"x" * i
    await trio.testing.wait_all_tasks_blocked()
    assert session._streams == {}


async def test_refused_streams(nursery):
    client_end, server_end = trio.testing.memory_stream_pair()
    session = SpdySession(server_end, policy=lambda e: None if e.get("ok") else "no")
    nursery.start_soon(session.run, echo_all)
    client = SpdyClient(client_end)
    nursery.start_soon(client.run)
    refused = await client.open({"ok": ""})
    assert refused.reset == spdy.RstStatus.REFUSED_STREAM
    fine = await client.open({"ok": "1"})
    assert fine.reset is None
    session.refuse_new_streams()
    late = await client.open({"ok": "1"})
    assert late.reset == spdy.RstStatus.REFUSED_STREAM


async def test_flow_control_is_honoured_when_the_peer_uses_it(nursery):
    client_end, server_end = trio.testing.memory_stream_pair()
    session = SpdySession(server_end)
    sent = trio.Event()

    async def send_big(session: SpdySession) -> None:
        stream = await session.accept_stream()
        await stream.send_all(b"y" * 200_000)
        sent.set()
        await trio.sleep_forever()

    nursery.start_soon(session.run, send_big)
    client = SpdyClient(client_end)
    # The client announces flow control but grants no credit yet.
    await client_end.send_all(client.conn.window_update(0, 1))
    nursery.start_soon(client.run)
    s = await client.open({})
    await trio.testing.wait_all_tasks_blocked()
    assert len(s.data) <= 64 * 1024 + 1  # Only the initial windows.
    assert not sent.is_set()
    while len(s.data) < 200_000:
        await client._write(lambda: client.conn.window_update(s.stream_id, 64 * 1024))
        await client._write(lambda: client.conn.window_update(0, 64 * 1024))
        await trio.testing.wait_all_tasks_blocked()
    await sent.wait()


async def test_protocol_error_ends_the_session_with_goaway(nursery):
    client_end, server_end = trio.testing.memory_stream_pair()
    session = SpdySession(server_end)
    done = trio.Event()

    async def run():
        await session.run(echo_all)
        done.set()

    nursery.start_soon(run)
    await client_end.send_all(b"\x80\x02\x00\x01" + b"\x00" * 12)  # SPDY/2: unsupported
    data = b""
    while chunk := await client_end.receive_some():
        data += chunk
    events = spdy.SpdyConnection(is_server=False).receive_data(data)
    assert isinstance(events[0], spdy.GoAway)
    assert events[0].status == spdy.GoAwayStatus.PROTOCOL_ERROR
    await client_end.aclose()
    await done.wait()


async def test_idle_timer(autojump_clock):
    idle = IdleTimer(10)
    with idle.scope:
        await trio.sleep(5)
        idle.touch()
        await trio.sleep(9)
        assert not idle.scope.cancel_called
        await trio.sleep(2)
    assert idle.expired
