"""A `StreamBackend` whose processes and pods are Trio tasks on memory streams.

Commands (``cmd[0]``) a fake exec understands:

``cat``              copy stdin to stdout until stdin ends, exit 0
``echo ARG...``      print the arguments, exit 0
``fail CODE [MSG]``  print MSG on stderr, exit CODE
``both``             "out\\n" on stdout, "err\\n" on stderr, exit 0
``sleep``            run until killed (``aclose``)
``big N``            print N bytes of a repeating pattern, exit 0
``size``             print each terminal size it is given as "WxH\\n", until stdin ends
``ignore-stdin``     close stdin at once, print "closed\\n", exit 0
``wait-fails``       ``wait()`` raises Unavailable

Attach runs ``cat`` (stdin to stdout) until the container "exits"
(`FakeBackend.exit_container`).  A pod's ports are served by handlers
registered in `FakeBackend.pods`: ``(stream) -> None``, run on the far end of
an in-memory stream pair.  Everything that happens is recorded for the tests.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING

import attrs
import trio
import trio.testing

from pouch import errors

if TYPE_CHECKING:
    from pouch.stream.backend import Process, StreamBackend

PodHandler = Callable[[trio.abc.Stream], Awaitable[None]]


@attrs.define(eq=False)
class FakeProcess:
    """`Process` on memory streams; one of these per exec or attach."""

    cmd: tuple[str, ...]
    tty: bool
    stdin: trio.abc.SendStream | None = None
    stdout: trio.abc.ReceiveStream | None = None
    stderr: trio.abc.ReceiveStream | None = None
    resizes: list[tuple[int, int]] = attrs.field(factory=list)
    code: int | None = None
    killed: bool = False
    closed: bool = False
    exited: trio.Event = attrs.field(factory=trio.Event)
    _scope: trio.CancelScope = attrs.field(factory=trio.CancelScope)
    _size_tx: trio.MemorySendChannel[tuple[int, int]] | None = None

    async def resize(self, width: int, height: int) -> None:
        await trio.lowlevel.checkpoint()
        self.resizes.append((width, height))
        if self._size_tx is not None:
            self._size_tx.send_nowait((width, height))

    async def wait(self) -> int:
        if self.cmd == ("wait-fails",):
            await trio.lowlevel.checkpoint()
            raise errors.Unavailable("the container's monitor is gone")
        await self.exited.wait()
        assert self.code is not None
        return self.code

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()
        self.closed = True
        if not self.exited.is_set():
            self.killed = True
            self._scope.cancel()


class FakeBackend:
    """Implements `StreamBackend`; run it with `run` in a nursery first."""

    def __init__(self, containers: Sequence[str] = ("c1",), sandboxes: Sequence[str] = ("p1",)):
        self.containers = set(containers)
        self.sandboxes = set(sandboxes)
        self.pods: dict[int, PodHandler] = {}
        self.processes: list[FakeProcess] = []
        self.connections: list[int] = []
        self._nursery: trio.Nursery | None = None
        self._attached: dict[str, list[FakeProcess]] = {}

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await trio.sleep_forever()

    # -- StreamBackend -------------------------------------------------------

    async def exec(
        self, container_id: str, cmd: Sequence[str], *, tty: bool, stdin: bool
    ) -> Process:
        await trio.lowlevel.checkpoint()
        self._check(container_id)
        if not cmd:
            raise errors.InvalidArgument("cmd is required")
        proc = self._start(tuple(cmd), tty=tty, stdin=stdin)
        return proc

    async def attach(self, container_id: str, *, tty: bool, stdin: bool) -> Process:
        await trio.lowlevel.checkpoint()
        self._check(container_id)
        proc = self._start(("attach",), tty=tty, stdin=stdin)
        self._attached.setdefault(container_id, []).append(proc)
        return proc

    async def port_forward(self, sandbox_id: str, port: int) -> trio.abc.Stream:
        await trio.lowlevel.checkpoint()
        if sandbox_id not in self.sandboxes:
            raise errors.NotFound(f'pod sandbox "{sandbox_id}" not found')
        handler = self.pods.get(port)
        if handler is None:
            raise errors.Unavailable(f"failed to connect to localhost:{port}: connection refused")
        self.connections.append(port)
        ours, theirs = trio.testing.memory_stream_pair()
        assert self._nursery is not None
        self._nursery.start_soon(_serve_pod, handler, theirs)
        return ours

    # -- test controls -------------------------------------------------------

    def exit_container(self, container_id: str, code: int = 0) -> None:
        """Every attach to *container_id* sees the container exit."""
        for proc in self._attached.pop(container_id, []):
            proc._scope.cancel()
            proc.code = code

    # -- internals -----------------------------------------------------------

    def _check(self, container_id: str) -> None:
        if container_id not in self.containers:
            raise errors.NotFound(f'container "{container_id}" not found')

    def _start(self, cmd: tuple[str, ...], *, tty: bool, stdin: bool) -> FakeProcess:
        proc = FakeProcess(cmd=cmd, tty=tty)
        out_tx, out_rx = trio.testing.memory_stream_one_way_pair()
        proc.stdout = out_rx
        err_tx: trio.abc.SendStream | None = None
        if not tty:
            err_tx, proc.stderr = trio.testing.memory_stream_one_way_pair()
        in_rx: trio.abc.ReceiveStream | None = None
        if stdin:
            proc.stdin, in_rx = trio.testing.memory_stream_one_way_pair()
        size_tx, size_rx = trio.open_memory_channel[tuple[int, int]](100)
        proc._size_tx = size_tx
        self.processes.append(proc)
        assert self._nursery is not None
        self._nursery.start_soon(_run_process, proc, in_rx, out_tx, err_tx, size_rx)
        return proc


async def _serve_pod(handler: PodHandler, stream: trio.abc.Stream) -> None:
    async with stream:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await handler(stream)


async def _run_process(
    proc: FakeProcess,
    stdin: trio.abc.ReceiveStream | None,
    stdout: trio.abc.SendStream,
    stderr: trio.abc.SendStream | None,
    sizes: trio.MemoryReceiveChannel[tuple[int, int]],
) -> None:
    # A terminal merges stderr into stdout.
    err = stderr if stderr is not None else stdout
    code = 0
    with proc._scope:
        try:
            code = await _behave(proc.cmd, stdin, stdout, err, sizes)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            code = 141  # SIGPIPE
    if proc._scope.cancelled_caught and proc.code is None:
        code = 137  # killed
    if proc.code is None:
        proc.code = code
    for stream in (stdout, stderr):
        if stream is not None:
            await stream.aclose()
    proc.exited.set()


async def _read_all(
    stream: trio.abc.ReceiveStream | None, sink: trio.abc.SendStream | None
) -> None:
    if stream is None:
        return
    while data := await stream.receive_some():
        if sink is not None:
            await sink.send_all(data)


async def _behave(
    cmd: tuple[str, ...],
    stdin: trio.abc.ReceiveStream | None,
    out: trio.abc.SendStream,
    err: trio.abc.SendStream,
    sizes: trio.MemoryReceiveChannel[tuple[int, int]],
) -> int:
    match cmd:
        case ("cat",) | ("attach",):
            await _read_all(stdin, out)
            if cmd == ("attach",):
                await trio.sleep_forever()  # Until the container "exits".
            return 0
        case ("echo", *words):
            await out.send_all((" ".join(words) + "\n").encode())
            return 0
        case ("fail", code, *message):
            if message:
                await err.send_all((" ".join(message) + "\n").encode())
            return int(code)
        case ("both",):
            await out.send_all(b"out\n")
            await err.send_all(b"err\n")
            return 0
        case ("sleep",):
            await trio.sleep_forever()
        case ("big", size):
            pattern = bytes(range(256)) * 256
            left = int(size)
            while left:
                chunk = pattern[: min(left, len(pattern))]
                await out.send_all(chunk)
                left -= len(chunk)
            return 0
        case ("size",):
            async with trio.open_nursery() as nursery:

                async def report() -> None:
                    async for width, height in sizes:
                        await out.send_all(f"{width}x{height}\n".encode())

                nursery.start_soon(report)
                await _read_all(stdin, None)
                nursery.cancel_scope.cancel()
            return 0
        case ("ignore-stdin",):
            if stdin is not None:
                await stdin.aclose()
            await out.send_all(b"closed\n")
            return 0
    await err.send_all(f"{cmd[0]}: not found\n".encode())
    return 127


# The fake is checked against the Protocol by mypy through this line.
_check: type[StreamBackend] = FakeBackend
