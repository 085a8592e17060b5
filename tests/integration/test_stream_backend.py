"""pouch.stream.backend on real runc + conmon + busybox, in process.

Each test runs the image and container managers in its own nursery on a
private root and state directory (as ``pouch.daemon.open_core`` builds them),
pulls busybox from the session's loopback registry, and drives
`ContainerStreams` directly: exec (pipes and terminal), attach through
conmon's socket, and port-forward into the pod's network namespace.  Every
pod is removed through the manager afterwards, even on failure.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import trio

from pouch import errors
from pouch.config import (
    Config,
    ContainerRuntimeConfig,
    NetworkConfig,
    RegistryConfig,
    RuntimeHandlerConfig,
)
from pouch.container.manager import ContainerManager, ContainerState
from pouch.container.model import (
    ContainerConfig,
    ContainerMetadata,
    NamespaceMode,
    NamespaceOptions,
    PodConfig,
    PodMetadata,
    PodSecurity,
)
from pouch.daemon import open_core
from pouch.stream.backend import ContainerStreams, Process
from tests.support import bundle as tb

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from tests.support.registry import Registry

pytestmark = [pytest.mark.integration, pytest.mark.root, pytest.mark.timeout(90)]

# exec is the part that runs the runtime itself.
both_runtimes = pytest.mark.parametrize("handler", ["runc", "crun"])

# Keeps a container alive until the test is done with it.
SLEEP = "exec sleep 1000"
# Busybox in the image has no nc -k: -ll with -e forks a server per connection.
ECHO_SERVER = "exec nc -ll -p {port} -e cat"


class World:
    """The managers, the backend under test, and what the test created."""

    def __init__(self, manager: ContainerManager, image: str, handler: str) -> None:
        self.manager = manager
        self.streams = ContainerStreams(manager)
        self.image = image
        self.handler = handler
        self.pods: list[str] = []

    async def pod(self, *, host_network: bool = False) -> str:
        name = f"pod-{uuid.uuid4().hex[:8]}"
        mode = NamespaceMode.NODE if host_network else NamespaceMode.POD
        config = PodConfig(
            metadata=PodMetadata(name=name, uid=uuid.uuid4().hex, namespace="test"),
            hostname=name,
            security=PodSecurity(namespace_options=NamespaceOptions(network=mode)),
        )
        sandbox_id = await self.manager.run_pod_sandbox(config, self.handler)
        self.pods.append(sandbox_id)
        return sandbox_id

    async def container(
        self,
        script: str,
        *,
        sandbox_id: str = "",
        name: str = "c",
        stdin: bool = False,
        stdin_once: bool = False,
        tty: bool = False,
    ) -> str:
        """Create and start ``sh -c script`` (in a new pod unless one is given)."""
        sandbox_id = sandbox_id or await self.pod()
        config = ContainerConfig(
            metadata=ContainerMetadata(name=name),
            image=self.image,
            command=("sh", "-c", script),
            stdin=stdin,
            stdin_once=stdin_once,
            tty=tty,
        )
        container_id = await self.manager.create_container(sandbox_id, config)
        await self.manager.start_container(container_id)
        return container_id

    async def wait_exited(self, container_id: str) -> None:
        with trio.fail_after(20):
            while True:
                if self.manager.container(container_id).state is ContainerState.EXITED:
                    return
                await trio.sleep(0.02)

    async def cleanup(self) -> None:
        failures: list[Exception] = []
        for sandbox_id in self.pods:
            try:
                await self.manager.remove_pod_sandbox(sandbox_id)
            except Exception as exc:  # Remove the others all the same.
                failures.append(exc)
        if failures:
            raise ExceptionGroup("failed to remove pods", failures)


@pytest.fixture
def handler() -> str:
    """The runtime of the test's pods; exec tests run with both."""
    return "runc"


@pytest.fixture
async def world(registry: Registry, handler: str) -> AsyncIterator[World]:
    # Not pytest's tmp_path: another pytest session on the host may prune
    # old numbered directories, which would pull runc's state from under
    # running containers.  Long on purpose: the attach socket's full path
    # is then longer than a sockaddr_un holds, which the backend must handle.
    base = Path(tempfile.mkdtemp(prefix="pouch-sb-", dir="/tmp")) / ("long-" + "x" * 40)
    config = Config(
        root=base / "root",
        state=base / "state",
        registry=RegistryConfig(insecure=(registry.host,)),
        # No configuration: the embedded default bridge, as a bare node has.
        network=NetworkConfig(conf_dir=base / "cni"),
        runtime=ContainerRuntimeConfig(
            handlers={
                "runc": RuntimeHandlerConfig(binary=tb.RUNC),
                "crun": RuntimeHandlerConfig(binary=tb.crun_binary(base.parent)),
            }
        ),
    )
    for directory in (config.root, config.state):
        directory.mkdir(parents=True, mode=0o711)
    assert len(str(config.state / "attach" / ("0" * 64) / "attach")) > 108
    core = await trio.to_thread.run_sync(open_core, config)  # As pouchd builds it.
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(core.images.run)
            await nursery.start(core.network.run)
            await nursery.start(core.containers.run)
            image = f"{registry.host}/library/busybox:latest"
            with trio.fail_after(60):
                await core.images.pull(image)
            w = World(core.containers, image, handler)
            try:
                yield w
            finally:
                with trio.CancelScope(shield=True), trio.fail_after(60):
                    await w.cleanup()
                nursery.cancel_scope.cancel()
    finally:
        core.db.close()
    shutil.rmtree(base.parent)  # Only after a clean removal: mounts would be in it.


# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------


async def read_all(stream: trio.abc.ReceiveStream | None) -> bytes:
    assert stream is not None
    data = bytearray()
    while chunk := await stream.receive_some():
        data += chunk
    return bytes(data)


async def read_until(stream: trio.abc.ReceiveStream | None, pattern: bytes) -> bytes:
    """Read until ``pattern`` (a regex) matches what was read; return all of it."""
    assert stream is not None
    data = bytearray()
    while not re.search(pattern, data):
        chunk = await stream.receive_some()
        assert chunk, f"stream ended before {pattern!r}; got {bytes(data)!r}"
        data += chunk
    return bytes(data)


def one_cr(output: bytes) -> bytes:
    """Undo runc's occasional second \\r on a terminal's first output.

    runc clears ONLCR on the container's terminal and keeps it on ours (its
    SetRaw keeps OPOST), so "\\n" becomes "\\r\\n" once.  Output written
    before runc got round to clearing it is translated twice (a race in runc
    itself; cri-o's host terminal has it too).  A terminal shows both alike.
    """
    return output.replace(b"\r\r\n", b"\r\n")


async def send(process: Process, data: bytes) -> None:
    assert process.stdin is not None
    await process.stdin.send_all(data)


async def ps(world: World, container_id: str) -> str:
    result = await world.manager.exec_sync(container_id, ["ps", "-o", "pid,args"], 10)
    return result.stdout.decode()


async def running(world: World, container_id: str, *commands: str) -> None:
    """Wait until each of ``commands`` shows in the container's ps."""
    while True:
        out = await ps(world, container_id)
        if all(command in out for command in commands):
            return
        await trio.sleep(0.05)


# --------------------------------------------------------------------------
# exec
# --------------------------------------------------------------------------


@both_runtimes
async def test_exec_output_and_exit_code(world: World) -> None:
    cid = await world.container(SLEEP)
    with trio.fail_after(30):
        p = await world.streams.exec(
            cid, ["sh", "-c", "echo out; echo err >&2; exit 3"], tty=False, stdin=False
        )
        try:
            assert p.stdin is None
            assert await read_all(p.stdout) == b"out\n"
            assert await read_all(p.stderr) == b"err\n"
            assert await p.wait() == 3
            await p.resize(80, 24)  # No terminal: ignored.
        finally:
            await p.aclose()
        await p.aclose()  # Idempotent.


@both_runtimes
async def test_exec_stdin_to_eof(world: World) -> None:
    cid = await world.container(SLEEP)
    data = os.urandom(4 * 1024 * 1024)
    with trio.fail_after(30):
        p = await world.streams.exec(cid, ["cat"], tty=False, stdin=True)
        received = b""

        async def feed() -> None:
            assert p.stdin is not None
            await p.stdin.send_all(data)
            await p.stdin.aclose()  # EOF: cat exits.

        async def drain() -> None:
            nonlocal received
            received = await read_all(p.stdout)

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(feed)
                nursery.start_soon(drain)
            assert hashlib.sha256(received).digest() == hashlib.sha256(data).digest()
            assert await p.wait() == 0
        finally:
            await p.aclose()


@both_runtimes
async def test_exec_environment_is_the_containers(world: World) -> None:
    sid = await world.pod()
    cid = await world.container(SLEEP, sandbox_id=sid)
    with trio.fail_after(30):
        p = await world.streams.exec(cid, ["sh", "-c", "echo $PATH; id -u"], tty=False, stdin=False)
        try:
            out = await read_all(p.stdout)
            assert await p.wait() == 0
        finally:
            await p.aclose()
    assert out.split(b"\n")[:2] == [
        b"/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        b"0",
    ]


@both_runtimes
async def test_exec_missing_executable(world: World) -> None:
    cid = await world.container(SLEEP)
    with trio.fail_after(30):
        p = await world.streams.exec(cid, ["no-such-command"], tty=False, stdin=False)
        try:
            err = await read_all(p.stderr)
            code = await p.wait()
        finally:
            await p.aclose()
    assert code == 255  # runc's own failure status.
    assert b"no-such-command" in err


@both_runtimes
async def test_exec_tty_missing_executable(world: World) -> None:
    cid = await world.container(SLEEP)
    with trio.fail_after(30):
        p = await world.streams.exec(cid, ["no-such-command"], tty=True, stdin=True)
        try:
            out = await read_all(p.stdout)
            code = await p.wait()
        finally:
            await p.aclose()
    assert code != 0
    assert b"no-such-command" in out


@both_runtimes
async def test_exec_refusals(world: World) -> None:
    sid = await world.pod()
    cid = await world.container(SLEEP, sandbox_id=sid)
    done = await world.container("exit 0", sandbox_id=sid, name="done")
    await world.wait_exited(done)
    with trio.fail_after(30):
        with pytest.raises(errors.NotFound):
            await world.streams.exec("f" * 64, ["true"], tty=False, stdin=False)
        with pytest.raises(errors.FailedPrecondition, match="not running"):
            await world.streams.exec(done, ["true"], tty=False, stdin=False)
        with pytest.raises(errors.InvalidArgument):
            await world.streams.exec(cid, [], tty=False, stdin=False)


@both_runtimes
async def test_exec_tty(world: World) -> None:
    cid = await world.container(SLEEP)
    with trio.fail_after(30):
        p = await world.streams.exec(cid, ["busybox", "tty"], tty=True, stdin=False)
        try:
            assert p.stderr is None
            assert p.stdin is None
            out = await read_all(p.stdout)  # Ends when runc has exited.
            assert await p.wait() == 0
        finally:
            await p.aclose()
    assert one_cr(out) == b"/dev/pts/0\r\n"


@both_runtimes
async def test_exec_tty_stderr_and_exit_code(world: World) -> None:
    cid = await world.container(SLEEP)
    with trio.fail_after(30):
        p = await world.streams.exec(
            cid, ["sh", "-c", "echo out; echo err >&2; exit 4"], tty=True, stdin=False
        )
        try:
            out = await read_all(p.stdout)
            assert await p.wait() == 4
        finally:
            await p.aclose()
    assert one_cr(out) == b"out\r\nerr\r\n"


# Prints the terminal's size for each line read.  Before the first resize
# the size is 0x0, and busybox stty then prints an error instead: hence the
# marker that ends each answer.
SIZE_LOOP = "while read x; do busybox stty size; echo end; done"


async def terminal_size(process: Process) -> bytes:
    await send(process, b"size?\n")
    answer = await read_until(process.stdout, rb"end\r+\n")
    match = re.search(rb"(\d+) (\d+)\r+\n", answer)
    return match.group(0).rstrip() if match else b"none"


@both_runtimes
async def test_exec_tty_resize_and_input(world: World) -> None:
    cid = await world.container(SLEEP)
    with trio.fail_after(30):
        p = await world.streams.exec(cid, ["sh", "-c", SIZE_LOOP], tty=True, stdin=True)
        try:
            await p.resize(100, 40)
            # runc copies the size inward when it handles SIGWINCH, a moment
            # later: ask until the shell sees it.  (crun: at once.)
            while await terminal_size(p) != b"40 100":
                pass
            await p.resize(132, 50)
            while await terminal_size(p) != b"50 132":
                pass
            # ^D ends `read` on a terminal in line mode.
            await send(p, b"\x04")
            assert await p.wait() == 0
            with pytest.raises(errors.InvalidArgument):
                await p.resize(0, 10)
        finally:
            await p.aclose()


@both_runtimes
async def test_exec_aclose_kills_the_process_tree(world: World) -> None:
    cid = await world.container(SLEEP)
    with trio.fail_after(30):
        p = await world.streams.exec(
            cid, ["sh", "-c", "sleep 1001 & sleep 1002"], tty=False, stdin=False
        )
        try:
            await running(world, cid, "sleep 1001", "sleep 1002")
        finally:
            t0 = trio.current_time()
            await p.aclose()
        assert trio.current_time() - t0 < 5
        assert await p.wait() == 137
        out = await ps(world, cid)
        assert "sleep 1001" not in out
        assert "sleep 1002" not in out
        # The container itself is untouched.
        assert world.manager.container(cid).state is ContainerState.RUNNING


@both_runtimes
async def test_exec_tty_aclose_kills(world: World) -> None:
    cid = await world.container(SLEEP)
    with trio.fail_after(30):
        p = await world.streams.exec(cid, ["sh", "-c", "exec sleep 1003"], tty=True, stdin=True)
        try:
            await running(world, cid, "sleep 1003")
        finally:
            await p.aclose()
        assert await p.wait() == 137
        assert "sleep 1003" not in await ps(world, cid)


# --------------------------------------------------------------------------
# attach
# --------------------------------------------------------------------------

READ_LOOP = "while read l; do echo got $l; done"


async def test_attach_stdin_and_many_attachers(world: World) -> None:
    cid = await world.container(READ_LOOP, stdin=True)
    with trio.fail_after(30):
        first = await world.streams.attach(cid, tty=False, stdin=True)
        second = await world.streams.attach(cid, tty=False, stdin=False)
        try:
            assert second.stdin is None
            assert first.stderr is not None
            await send(first, b"a\n")
            assert await read_until(first.stdout, b"got a\n") == b"got a\n"
            assert await read_until(second.stdout, b"got a\n") == b"got a\n"
            # Input in one packet larger than conmon's read size arrives whole.
            line = b"x" * 100_000
            await send(first, line + b"\n")
            got = await read_until(second.stdout, b"\n")
            assert got == b"got " + line + b"\n"
            assert await read_until(first.stdout, b"\n") == got
        finally:
            await first.aclose()  # Detach: the container keeps running.
        try:
            third = await world.streams.attach(cid, tty=False, stdin=True)
            try:
                await send(third, b"b\n")
                assert await read_until(third.stdout, b"got b\n") == b"got b\n"
                assert await read_until(second.stdout, b"got b\n") == b"got b\n"
            finally:
                await third.aclose()
        finally:
            await second.aclose()
        assert world.manager.container(cid).state is ContainerState.RUNNING
        # Without stdin_once, a detach leaves the container's stdin open.
        fourth = await world.streams.attach(cid, tty=False, stdin=True)
        try:
            await send(fourth, b"c\n")
            assert await read_until(fourth.stdout, b"got c\n") == b"got c\n"
        finally:
            await fourth.aclose()


async def test_attach_stdout_stderr_and_exit(world: World) -> None:
    cid = await world.container(
        "read l; echo out $l; echo err $l >&2; exit 5", stdin=True, stdin_once=True
    )
    with trio.fail_after(30):
        p = await world.streams.attach(cid, tty=False, stdin=True)
        try:
            await send(p, b"x\n")
            out, err = await read_all(p.stdout), await read_all(p.stderr)
            assert (out, err) == (b"out x\n", b"err x\n")
            assert await p.wait() == 5
        finally:
            await p.aclose()
        with pytest.raises(errors.FailedPrecondition, match="not running"):
            await world.streams.attach(cid, tty=False, stdin=False)


async def test_attach_stdin_once_eof(world: World) -> None:
    cid = await world.container("cat; echo done", stdin=True, stdin_once=True)
    with trio.fail_after(30):
        p = await world.streams.attach(cid, tty=False, stdin=True)
        try:
            await send(p, b"abc\n")
            assert p.stdin is not None
            await p.stdin.aclose()  # conmon closes the container's stdin: cat ends.
            assert await read_all(p.stdout) == b"abc\ndone\n"
            assert await p.wait() == 0
        finally:
            await p.aclose()


async def test_attach_demultiplexes_heavy_output(world: World) -> None:
    # Both streams at once, much more than the socket buffer holds.
    script = "read l; seq 1 30000 & seq 30001 60000 >&2; wait"
    cid = await world.container(script, stdin=True, stdin_once=True)
    with trio.fail_after(30):
        p = await world.streams.attach(cid, tty=False, stdin=True)
        out = err = b""

        async def read_out() -> None:
            nonlocal out
            out = await read_all(p.stdout)

        async def read_err() -> None:
            nonlocal err
            err = await read_all(p.stderr)

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(read_out)
                nursery.start_soon(read_err)
                await send(p, b"go\n")
            assert await p.wait() == 0
        finally:
            await p.aclose()
    assert out.split() == [str(i).encode() for i in range(1, 30001)]
    assert err.split() == [str(i).encode() for i in range(30001, 60001)]


async def test_attach_closed_stderr_does_not_block_stdout(world: World) -> None:
    script = "read l; seq 1 30000 >&2; echo end"
    cid = await world.container(script, stdin=True, stdin_once=True)
    with trio.fail_after(30):
        p = await world.streams.attach(cid, tty=False, stdin=True)
        try:
            assert p.stderr is not None
            await p.stderr.aclose()  # Its output is dropped from now on.
            await send(p, b"go\n")
            assert await read_all(p.stdout) == b"end\n"
        finally:
            await p.aclose()


async def test_attach_detach_while_reading(world: World) -> None:
    cid = await world.container(READ_LOOP, stdin=True)
    with trio.fail_after(30):
        p = await world.streams.attach(cid, tty=False, stdin=False)
        async with trio.open_nursery() as nursery:

            async def reader() -> None:
                with pytest.raises(trio.ClosedResourceError):
                    await read_all(p.stdout)

            nursery.start_soon(reader)
            await trio.sleep(0.1)
            await p.aclose()
        # The container did not notice.
        again = await world.streams.attach(cid, tty=False, stdin=True)
        try:
            await send(again, b"still\n")
            await read_until(again.stdout, b"got still\n")
        finally:
            await again.aclose()


async def test_attach_wait_is_the_containers_exit(world: World) -> None:
    cid = await world.container(READ_LOOP + "; exit 9", stdin=True, stdin_once=True)
    with trio.fail_after(30):
        watcher = await world.streams.attach(cid, tty=False, stdin=False)
        p = await world.streams.attach(cid, tty=False, stdin=True)
        try:
            await send(p, b"q\n")
            await read_until(p.stdout, b"got q\n")
            with trio.move_on_after(0.3) as scope:
                await watcher.wait()  # Still running.
            assert scope.cancelled_caught
            assert p.stdin is not None
            await p.stdin.aclose()  # stdin_once: the loop ends.
            assert await watcher.wait() == 9
            assert await p.wait() == 9
        finally:
            await p.aclose()
            await watcher.aclose()


async def test_attach_tty(world: World) -> None:
    cid = await world.container(SIZE_LOOP, stdin=True, tty=True)
    with trio.fail_after(30):
        p = await world.streams.attach(cid, tty=True, stdin=True)
        other = await world.streams.attach(cid, tty=True, stdin=False)
        try:
            assert p.stderr is None
            await p.resize(120, 30)  # Through conmon's control FIFO.
            while await terminal_size(p) != b"30 120":
                pass
            out = await read_until(other.stdout, b"30 120\r\nend\r\n")
            assert b"size?\r\n" in out  # The container's terminal echoes.
        finally:
            await p.aclose()
            await other.aclose()
        assert world.manager.container(cid).state is ContainerState.RUNNING


async def test_attach_without_container_stdin_discards_input(world: World) -> None:
    cid = await world.container("echo hello; exec sleep 1000")
    with trio.fail_after(30):
        p = await world.streams.attach(cid, tty=False, stdin=True)
        try:
            await send(p, b"ignored\n" * 10_000)
            assert p.stdin is not None
            await p.stdin.aclose()
        finally:
            await p.aclose()
        with pytest.raises(errors.NotFound):
            await world.streams.attach("0" * 64, tty=False, stdin=False)


# --------------------------------------------------------------------------
# port-forward
# --------------------------------------------------------------------------


async def forward(world: World, sandbox_id: str, port: int) -> trio.abc.Stream:
    """port_forward, retried while the server in the pod is starting."""
    while True:
        try:
            return await world.streams.port_forward(sandbox_id, port)
        except errors.Unavailable:
            await trio.sleep(0.05)


async def test_port_forward_exchanges_bytes(world: World) -> None:
    sid = await world.pod()
    await world.container(ECHO_SERVER.format(port=8080), sandbox_id=sid)
    with trio.fail_after(30):
        for _ in range(3):  # A server per connection.
            stream = await forward(world, sid, 8080)
            async with stream:
                await stream.send_all(b"hello\n")
                assert await read_until(stream, b"hello\n") == b"hello\n"


async def test_port_forward_100_mb(world: World) -> None:
    sid = await world.pod()
    await world.container(ECHO_SERVER.format(port=8080), sandbox_id=sid)
    total = 100 * 1024 * 1024
    sent, received = hashlib.sha256(), hashlib.sha256()
    count = 0
    with trio.fail_after(60):
        stream = await forward(world, sid, 8080)
        assert isinstance(stream, trio.SocketStream)

        async def feed() -> None:
            block = os.urandom(1024 * 1024)
            for i in range(total // len(block)):
                chunk = i.to_bytes(4, "big") + block[4:]
                sent.update(chunk)
                await stream.send_all(chunk)
            await stream.send_eof()  # cat ends, and with it the connection.

        async def drain() -> None:
            nonlocal count
            while chunk := await stream.receive_some(256 * 1024):
                received.update(chunk)
                count += len(chunk)

        async with stream, trio.open_nursery() as nursery:
            nursery.start_soon(feed)
            nursery.start_soon(drain)
    assert count == total
    assert received.digest() == sent.digest()


async def test_port_forward_ipv6_loopback(world: World) -> None:
    sid = await world.pod()
    # Listens on ::1 only: 127.0.0.1 is refused, ::1 is tried next.
    await world.container("exec httpd -f -p [::1]:8081 -h /", sandbox_id=sid)
    with trio.fail_after(30):
        stream = await forward(world, sid, 8081)
        async with stream:
            await stream.send_all(b"GET /nonexistent HTTP/1.0\r\n\r\n")
            assert (await read_until(stream, b"\r\n")).startswith(b"HTTP/1.")


async def test_port_forward_refused(world: World) -> None:
    sid = await world.pod()
    with trio.fail_after(30):
        with pytest.raises(errors.Unavailable) as excinfo:
            await world.streams.port_forward(sid, 9)
        assert "failed to connect to localhost:9 inside namespace /run/netns/" in str(excinfo.value)
        with pytest.raises(errors.InvalidArgument):
            await world.streams.port_forward(sid, 0)
        with pytest.raises(errors.InvalidArgument):
            await world.streams.port_forward(sid, 70000)
        with pytest.raises(errors.NotFound):
            await world.streams.port_forward("0" * 64, 80)
        await world.manager.stop_pod_sandbox(sid)
        with pytest.raises(errors.FailedPrecondition, match="not ready"):
            await world.streams.port_forward(sid, 80)


async def test_port_forward_leaves_no_thread_in_the_pod(world: World) -> None:
    sid = await world.pod()
    host_ns = os.readlink("/proc/thread-self/ns/net")
    with trio.fail_after(30):
        for _ in range(5):
            with pytest.raises(errors.Unavailable):
                await world.streams.port_forward(sid, 9)
        # Trio's cached worker threads are all still in the host's namespace.
        async with trio.open_nursery() as nursery:
            seen: list[str] = []

            async def probe() -> None:
                seen.append(await trio.to_thread.run_sync(os.readlink, "/proc/thread-self/ns/net"))

            for _ in range(8):
                nursery.start_soon(probe)
    assert set(seen) == {host_ns}


async def test_port_forward_host_network(world: World) -> None:
    sid = await world.pod(host_network=True)
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]

    async def serve(stream: trio.SocketStream) -> None:
        async with stream:
            await stream.send_all(await stream.receive_some())

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.serve_listeners, serve, listeners)
            stream = await world.streams.port_forward(sid, port)
            async with stream:
                await stream.send_all(b"ping")
                assert await stream.receive_some() == b"ping"
            nursery.cancel_scope.cancel()
