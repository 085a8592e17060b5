"""The stream server's HTTP listener (exec, attach, port-forward).

The CRI's Exec, Attach and PortForward calls answer with a URL on this
server, and the client upgrades an HTTP/1.1 connection on it.  Until the
streaming issue lands every request gets 404.  Sessions run in the daemon's
``handlers`` nursery, so a drain gives them the grace period too.
"""

from __future__ import annotations

import contextlib
import functools
from typing import TYPE_CHECKING

import h11
import trio

from pouch.log import get_logger

if TYPE_CHECKING:
    from pouch.config import StreamConfig

log = get_logger("pouch.stream")

#: A request's head must arrive within this time (slowloris guard).
HEAD_TIMEOUT = 30.0
MAX_HEAD_BYTES = 64 * 1024


async def serve_streams(
    config: StreamConfig,
    handlers: trio.Nursery,
    stop: trio.Event,
    *,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Listen until *stop* is set; report ``host:port`` through ``started()``."""
    listeners = await trio.open_tcp_listeners(config.port, host=config.address)
    sockname = listeners[0].socket.getsockname()
    address = f"{config.address}:{sockname[1]}"
    async with trio.open_nursery() as accept:
        accept.start_soon(
            functools.partial(trio.serve_listeners, handler_nursery=handlers), _handle, listeners
        )
        log.info("serving streams", address=address)
        task_status.started(address)
        await stop.wait()
        accept.cancel_scope.cancel()


async def _handle(stream: trio.SocketStream) -> None:
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD_BYTES)
    async with stream:
        with trio.move_on_after(HEAD_TIMEOUT), contextlib.suppress(h11.RemoteProtocolError):
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    data = await stream.receive_some(65536)
                    conn.receive_data(data)
                    if not data:
                        return
                    continue
                if isinstance(event, h11.Request):
                    await _respond(stream, conn, 404, b"no such stream session\n")
                return


async def _respond(stream: trio.SocketStream, conn: h11.Connection, code: int, body: bytes) -> None:
    headers = [
        ("content-type", "text/plain; charset=utf-8"),
        ("content-length", str(len(body))),
        ("connection", "close"),
    ]
    await stream.send_all(conn.send(h11.Response(status_code=code, headers=headers)))
    await stream.send_all(conn.send(h11.Data(data=body)))
    await stream.send_all(conn.send(h11.EndOfMessage()))
