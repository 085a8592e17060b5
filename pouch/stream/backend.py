"""What the stream server runs: exec, attach and port-forward on real containers.

The stream server (``pouch.stream.server``) speaks the Kubernetes streaming
protocols; this module gives it byte streams to and from containers, through
`StreamBackend`.  `ContainerStreams` implements it on the container manager:

``exec``
    ``<runtime> exec --process <process.json> --pid-file <file> <id>``, run
    directly as our child (as cri-o's ``ExecContainer`` does, not through
    conmon), with the container's own ``process`` settings and the command
    swapped in (`pouch.container.runtime` builds ``process.json`` the same way
    for ExecSync).  The runtime stays in the foreground until the command
    exits, so ``wait()`` is the runtime's exit status, which is the
    command's.  Without a terminal the command's stdio are pipes to us.
    With one, it depends on the runtime:

    - runc gets a pseudo-terminal *we* allocate on the host as its stdio,
      and copies between it and the terminal it makes in the container; a
      resize sets our terminal's size and sends runc ``SIGWINCH``, on which
      it copies the size inward.  cri-o's ``ttyCmd`` does the same.  runc
      hands the container's terminal over (``--console-socket``) only with
      ``--detach`` ("cannot use console socket if runc will not detach or
      allocate tty", runc 1.1), and a detached exec is not our child: its
      exit status would be lost.
    - crun takes ``--console-socket`` in the foreground and sends us the
      container's terminal itself (``SCM_RIGHTS``); a resize is an ioctl on
      it.  The host-terminal way would not do: crun before 1.8.7 passes
      ``SIGWINCH`` on to the command instead of resizing (crun commit
      907d0322), and Debian 12 has 1.8.1.

    The runtime is told apart by its ``--version`` line, once per binary.

``attach``
    A client of conmon's attach socket (containers/conmon 2.1.6,
    ``src/conn_sock.c`` and ``src/ctr_stdio.c``), a ``SOCK_SEQPACKET`` socket:

    - conmon -> client: one packet per read of the container's output,
      ``<pipe byte><data>`` with at most 8192 data bytes (``STDIO_BUF_SIZE``);
      the pipe byte is conmon's ``stdpipe_t``: ``NO_PIPE`` 0, ``STDIN_PIPE``
      1 (unused), ``STDOUT_PIPE`` 2, ``STDERR_PIPE`` 3 (``src/utils.h``).  With
      a terminal everything the container writes arrives as 2.  Every
      attached client gets every packet (``write_back_to_remote_consoles``),
      with a *blocking* write: a client that stops reading stalls the
      container's output, its log and the other clients.
    - client -> conmon: each packet is written as is to the container's
      stdin (pipe or terminal).  conmon reads at most 32767 bytes of a
      packet (``CONN_SOCK_BUF_SIZE - 1``) and a SEQPACKET read drops the rest,
      so stdin is sent in packets of at most `_STDIN_PACKET` bytes.  Input
      for a container created without stdin is discarded here: conmon would
      hold it forever and stop reading the socket.
    - client shutdown(SHUT_WR) or close: conmon stops reading the client and,
      for a container created with ``stdin_once`` (conmon ``--stdin`` without
      ``--leave-stdin-open``), closes the container's stdin.
    - when the container exits, conmon sends what is left of its output and
      closes every client: the output streams then end.

    A resize goes through conmon's control FIFO.  ``wait()`` is the
    container's exit, through `ContainerMonitor.wait_exit`.

``port_forward``
    A TCP connection to the pod's loopback, made from a short-lived thread
    that joins the pod's network namespace (``setns``) and is then thrown
    away, so no thread of the daemon is ever left in a pod's namespace.  A
    socket stays in the namespace it was made in, so Trio uses it as usual.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import functools
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import termios
import threading
import tty as ttys
from pathlib import Path
from typing import TYPE_CHECKING, Final, Protocol

import outcome
import trio

from pouch import errors
from pouch.container.manager import ContainerState, SandboxState
from pouch.container.runtime import exec_process, kill_exec

if TYPE_CHECKING:
    from collections.abc import Sequence

    from pouch.container.manager import Container, ContainerManager
    from pouch.container.monitor import ContainerMonitor
    from pouch.container.runtime import JSONObject, Runtime

__all__ = ["ContainerStreams", "Process", "StreamBackend"]

# conmon's stdpipe_t (src/utils.h): the first byte of each attach packet.
_STDOUT_PIPE: Final = 2
_STDERR_PIPE: Final = 3
# conmon sends at most STDIO_BUF_SIZE + 1 = 8193 bytes per packet; a bigger
# buffer costs nothing and a smaller one would truncate packets.
_ATTACH_PACKET_MAX: Final = 64 * 1024
# Under conmon's per-packet read size (CONN_SOCK_BUF_SIZE - 1 = 32767).
_STDIN_PACKET: Final = 8192
# How much output of one attach stream is held while its reader is behind;
# past that, reading the socket waits (as two pipes would).
_ATTACH_BUFFER_LIMIT: Final = 1024 * 1024
_RECEIVE_SIZE: Final = 64 * 1024

# Whatever PATH the daemon has, the runtime gets this one (as in
# pouch.container.runtime).
_RUNTIME_PATH: Final = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# How long the runtime may take to answer --version.
_VERSION_TIMEOUT: Final = 10.0
# crun sends the terminal right after it made it; this only bounds a runtime
# that connects and then sends nothing.
_TERMINAL_TIMEOUT: Final = 30.0
# The console socket message: the terminal's name, and its fd.
_TERMINAL_NAME_MAX: Final = 4096
_MAX_FDS: Final = 4

# <sched.h>; os.setns and os.CLONE_NEWNET arrive with Python 3.12.
_CLONE_NEWNET: Final = 0x40000000
# A connection to the pod's loopback is accepted or refused at once; this
# only bounds a namespace whose firewall drops packets.
_CONNECT_TIMEOUT: Final = 10.0


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


# --------------------------------------------------------------------------
# The interface the stream server codes against
# --------------------------------------------------------------------------


class Process(Protocol):
    """A running exec or attach session.

    Attributes:
        stdin: To the process; ``aclose()`` is end-of-file (see the backend
            for terminals).  ``None`` unless stdin was asked for.
        stdout: From the process; with a terminal, all terminal output.
        stderr: From the process; ``None`` with a terminal.
    """

    stdin: trio.abc.SendStream | None
    stdout: trio.abc.ReceiveStream | None
    stderr: trio.abc.ReceiveStream | None

    async def resize(self, width: int, height: int) -> None:
        """Set the terminal's size; ignored without a terminal."""
        ...

    async def wait(self) -> int:
        """Exec: the command's exit code.  Attach: the container's, once it exits."""
        ...

    async def aclose(self) -> None:
        """Exec: kill the command if it still runs.  Attach: detach only."""
        ...


class StreamBackend(Protocol):
    """exec, attach and port-forward, as the stream server needs them."""

    async def exec(
        self, container_id: str, cmd: Sequence[str], *, tty: bool, stdin: bool
    ) -> Process:
        """Start ``cmd`` in a running container."""
        ...

    async def attach(self, container_id: str, *, tty: bool, stdin: bool) -> Process:
        """Attach to a running container's stdio."""
        ...

    async def port_forward(self, sandbox_id: str, port: int) -> trio.abc.Stream:
        """A TCP connection to ``localhost:port`` in the pod's network namespace."""
        ...


# --------------------------------------------------------------------------
# ContainerStreams
# --------------------------------------------------------------------------


class ContainerStreams(StreamBackend):
    """`StreamBackend` on the container manager's containers and pods.

    Args:
        manager: The daemon's container manager (records, runtimes, conmon).
    """

    def __init__(self, manager: ContainerManager) -> None:
        self._manager = manager
        # Runtime binary -> whether it hands the terminal over in the
        # foreground (crun) rather than copying to ours (runc).
        self._hands_over_terminal: dict[Path, bool] = {}

    async def exec(
        self, container_id: str, cmd: Sequence[str], *, tty: bool, stdin: bool
    ) -> Process:
        """Start ``cmd`` in a running container; the caller must ``aclose()`` it.

        The command gets the container's process settings (user,
        capabilities, environment...) with ``cmd`` as its arguments, as in
        ExecSync.  With ``tty`` it runs on a terminal: ``stdout`` carries
        everything it writes (``stderr`` is ``None``), and closing ``stdin``
        only stops input, since a terminal has no end-of-file (cri-o and
        containerd do the same); send ``b"\\x04"`` to end a line-mode read.
        If the runtime fails to start the command (no such executable...),
        its message arrives on stderr (after the terminal's output with
        ``tty``) and ``wait()`` returns the runtime's status (runc: 255).

        If the command leaves a background child holding stdout or stderr,
        those streams end only when it exits; ``wait()`` does not wait for
        them.

        Raises:
            NotFound: unknown container.
            FailedPrecondition: the container is not running.
            InvalidArgument: ``cmd`` is empty.
            RuntimeFailed: the runtime could not be started.

        Cancellation:
            Safe: nothing is left behind.  A cancel while crun has yet to
            send the terminal kills the command.
        """
        c = self._running(container_id)
        if not cmd:
            raise errors.InvalidArgument("cmd is required")
        runtime = self._runtime(c)
        state = await runtime.state(c.container_id)
        if state is None:
            raise errors.NotFound(f"container {c.container_id} not found in the runtime")
        if state.get("status") != "running":
            raise errors.FailedPrecondition(
                f"container {c.container_id[:12]} is not running (status {state.get('status')!r})"
            )
        init_pid = state.get("pid")
        bundle = state.get("bundle")
        if not isinstance(init_pid, int) or not isinstance(bundle, str):
            raise errors.RuntimeFailed(
                [str(runtime.handler.binary), "state"], 0, "state lacks pid or bundle"
            )
        hands_over = tty and await self._hands_over(runtime)
        workdir = await trio.to_thread.run_sync(_prepare_exec, Path(bundle), list(cmd), tty)
        argv = [
            str(runtime.handler.binary),
            *runtime.global_args(),
            "exec",
            "--process", str(workdir / "process.json"),
            "--pid-file", str(workdir / "exec.pid"),
        ]  # fmt: skip
        try:
            if not tty:
                return await _start_pipe_exec(
                    [*argv, c.container_id], workdir, init_pid, stdin=stdin
                )
            if hands_over:
                return await _start_console_socket_exec(
                    argv, c.container_id, workdir, init_pid, stdin=stdin
                )
            return await _start_host_tty_exec(
                [*argv, c.container_id], workdir, init_pid, stdin=stdin
            )
        except BaseException:
            shutil.rmtree(workdir, ignore_errors=True)
            raise

    async def attach(self, container_id: str, *, tty: bool, stdin: bool) -> Process:
        """Attach to a running container's stdio through its conmon.

        Output from the moment of attaching on (no history: read the log for
        that).  With ``tty`` (or a container that has a terminal) ``stderr``
        is ``None`` and anything the container writes to stderr comes on
        ``stdout``.  If the container was created without stdin, what is
        sent to ``stdin`` is discarded.  Closing ``stdin`` closes the
        container's stdin only if it was created with ``stdin_once``.

        Raises:
            NotFound: unknown container.
            FailedPrecondition: the container is not running, or its conmon
                is gone.

        Cancellation:
            Safe; nothing is left behind.
        """
        c = self._running(container_id)
        monitor = self._manager.monitor
        sock = await _connect_attach(monitor.attach_socket_path(c.container_id), c.container_id)
        merge = tty or c.config.tty
        demux = _AttachDemux(sock, merge=merge)
        stdin_stream: trio.abc.SendStream | None = None
        if stdin:
            stdin_stream = _AttachInput(sock) if c.config.stdin else _DiscardInput()
        return _AttachProcess(
            demux,
            stdin=stdin_stream,
            monitor=monitor,
            container_id=c.container_id,
            conmon_pid=c.conmon_pid,
            bundle=self._manager.container_bundle(c.container_id),
            terminal=c.config.tty,
        )

    async def port_forward(self, sandbox_id: str, port: int) -> trio.abc.Stream:
        """Connect to ``localhost:port`` in the pod: 127.0.0.1, then ::1.

        For a pod on the host's network, the host's loopback.

        Raises:
            NotFound: unknown pod sandbox.
            InvalidArgument: ``port`` is not in 1..65535.
            FailedPrecondition: the sandbox is not ready, or its network
                namespace is gone.
            Unavailable: nothing accepts connections on the port
                ("failed to connect to localhost:PORT inside namespace ...").

        Cancellation:
            Takes effect once the connect has run to its end (bounded by
            `_CONNECT_TIMEOUT`).
        """
        if not 0 < port < 1 << 16:
            raise errors.InvalidArgument(f"invalid port {port}")
        s = self._manager.sandbox(sandbox_id)
        if s.state is not SandboxState.READY:
            raise errors.FailedPrecondition(
                f"pod sandbox {s.sandbox_id[:12]} is {s.state.value}, not ready"
            )
        if s.netns_path is None:
            return await _connect_host(port)
        sock = await trio.to_thread.run_sync(_connect_in_netns, s.netns_path, port)
        return trio.SocketStream(trio.socket.from_stdlib_socket(sock))

    # ---- helpers ---------------------------------------------------------------

    async def _hands_over(self, runtime: Runtime) -> bool:
        """Whether the runtime is crun (see the module's docstring)."""
        binary = runtime.handler.binary
        known = self._hands_over_terminal.get(binary)
        if known is None:
            with trio.move_on_after(_VERSION_TIMEOUT):
                proc = await trio.run_process(
                    [str(binary), "--version"],
                    capture_stdout=True,
                    capture_stderr=True,
                    check=False,
                    env=_runtime_env(),
                )
                # "crun version 1.8.1", "runc version 1.1.5+ds1".
                known = proc.stdout.lstrip().startswith(b"crun ")
                self._hands_over_terminal[binary] = known
        return bool(known)

    def _running(self, container_id: str) -> Container:
        c = self._manager.container(container_id)
        if c.state is not ContainerState.RUNNING:
            raise errors.FailedPrecondition(
                f"container {c.container_id[:12]} is {c.state.value}, not running"
            )
        return c

    def _runtime(self, c: Container) -> Runtime:
        s = self._manager.sandboxes.get(c.sandbox_id)
        if s is None:
            raise errors.NotFound(f"pod sandbox {c.sandbox_id} of container {c.container_id} gone")
        runtime = self._manager.runtimes.get(s.handler)
        if runtime is None:
            raise errors.FailedPrecondition(f'runtime handler "{s.handler}" is not configured')
        return runtime


# --------------------------------------------------------------------------
# exec
# --------------------------------------------------------------------------


def _runtime_env() -> dict[str, str]:
    env = {"PATH": _RUNTIME_PATH}
    if "XDG_RUNTIME_DIR" in os.environ:
        env["XDG_RUNTIME_DIR"] = os.environ["XDG_RUNTIME_DIR"]
    return env


def _prepare_exec(bundle: Path, cmd: list[str], tty: bool) -> Path:
    """A private directory holding ``process.json``; the pid file goes there too."""
    process: JSONObject = exec_process(bundle, cmd, (), None)
    process["terminal"] = tty
    workdir = Path(tempfile.mkdtemp(prefix="pouch-exec-"))
    try:
        (workdir / "process.json").write_text(json.dumps(process))
    except BaseException:
        shutil.rmtree(workdir, ignore_errors=True)
        raise
    return workdir


async def _start_pipe_exec(
    argv: list[str], workdir: Path, init_pid: int, *, stdin: bool
) -> Process:
    try:
        proc = await trio.lowlevel.open_process(
            argv,
            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=_runtime_env(),
        )
    except OSError as exc:
        raise errors.RuntimeFailed(argv, -1, f"cannot run the runtime: {exc}") from exc
    return _ExecProcess(
        proc,
        workdir=workdir,
        init_pid=init_pid,
        stdin=proc.stdin,
        stdout=proc.stdout,
        stderr=proc.stderr,
    )


async def _start_host_tty_exec(
    argv: list[str], workdir: Path, init_pid: int, *, stdin: bool
) -> Process:
    master, slave = os.openpty()
    started = False
    try:
        # Raw from the start: the runtime makes it raw too, but input that
        # arrived before would be echoed and translated by this terminal.
        ttys.setraw(slave)
        proc = await trio.lowlevel.open_process(
            argv, stdin=slave, stdout=slave, stderr=slave, env=_runtime_env()
        )
        started = True
    except OSError as exc:
        raise errors.RuntimeFailed(argv, -1, f"cannot run the runtime: {exc}") from exc
    finally:
        # Only the runtime holds the terminal now: when it exits, reading
        # the master ends (EIO) instead of blocking forever.
        os.close(slave)
        if not started:
            os.close(master)
    pty = trio.lowlevel.FdStream(master)
    return _ExecProcess(
        proc,
        workdir=workdir,
        init_pid=init_pid,
        stdin=_PtyInput(pty) if stdin else None,
        stdout=_PtyOutput(pty),
        stderr=None,
        pty=pty,
        pty_fd=master,
        resize_signal=True,
    )


async def _start_console_socket_exec(
    argv: list[str], container_id: str, workdir: Path, init_pid: int, *, stdin: bool
) -> Process:
    """crun: the runtime sends the container's terminal to our console socket."""
    path = workdir / "console.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
    try:
        listener.bind(str(path))
        listener.listen(1)
        try:
            proc = await trio.lowlevel.open_process(
                [*argv, "--console-socket", str(path), container_id],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,  # The runtime's own messages.
                env=_runtime_env(),
            )
        except OSError as exc:
            raise errors.RuntimeFailed(argv, -1, f"cannot run the runtime: {exc}") from exc
        try:
            master = await _receive_terminal(listener, proc, argv)
        except BaseException:
            with trio.CancelScope(shield=True):
                await kill_exec(proc, workdir / "exec.pid", init_pid)
                assert proc.stderr is not None
                await proc.stderr.aclose()
            raise
    finally:
        listener.close()
    if master is None:
        # It failed before it made the terminal: its message is the output.
        return _ExecProcess(
            proc,
            workdir=workdir,
            init_pid=init_pid,
            stdin=_DiscardInput() if stdin else None,
            stdout=proc.stderr,
            stderr=None,
        )
    pty = trio.lowlevel.FdStream(master)
    return _ExecProcess(
        proc,
        workdir=workdir,
        init_pid=init_pid,
        stdin=_PtyInput(pty) if stdin else None,
        stdout=_PtyOutput(pty, then=proc.stderr),
        stderr=None,
        pty=pty,
        pty_fd=master,
        resize_signal=False,
    )


async def _accept_unless_exited(
    listener: socket.socket, proc: trio.Process
) -> socket.socket | None:
    accepted: list[socket.socket] = []
    async with trio.open_nursery() as nursery:

        async def cancel_on_exit() -> None:
            await proc.wait()
            nursery.cancel_scope.cancel()

        nursery.start_soon(cancel_on_exit)
        accepted.append(await _accept(listener))
        nursery.cancel_scope.cancel()
    if accepted:
        return accepted[0]
    try:  # The runtime has exited; it may have connected just before.
        conn, _ = listener.accept()
    except BlockingIOError:
        return None
    return conn


async def _accept(listener: socket.socket) -> socket.socket:
    while True:
        try:
            conn, _ = listener.accept()
        except BlockingIOError:
            await trio.lowlevel.wait_readable(listener)
        else:
            return conn


async def _receive_terminal(
    listener: socket.socket, proc: trio.Process, argv: list[str]
) -> int | None:
    """The terminal the runtime sends, or ``None`` if it exits without."""
    conn = await _accept_unless_exited(listener, proc)
    if conn is None:
        return None
    with trio.socket.from_stdlib_socket(conn) as sock:
        try:
            with trio.fail_after(_TERMINAL_TIMEOUT):
                _, ancdata, _, _ = await sock.recvmsg(
                    _TERMINAL_NAME_MAX, socket.CMSG_SPACE(4 * _MAX_FDS), socket.MSG_CMSG_CLOEXEC
                )
        except (OSError, trio.TooSlowError) as exc:
            raise errors.RuntimeFailed(argv, -1, f"no terminal from the runtime: {exc}") from exc
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(data) - len(data) % 4
            fds += struct.unpack(f"{usable // 4}i", data[:usable])
    if not fds:
        raise errors.RuntimeFailed(argv, -1, "the runtime sent no terminal on its console socket")
    for extra in fds[1:]:
        os.close(extra)
    return fds[0]


class _ExecProcess:
    """`Process` for ``<runtime> exec``, our child."""

    def __init__(
        self,
        proc: trio.Process,
        *,
        workdir: Path,
        init_pid: int,
        stdin: trio.abc.SendStream | None,
        stdout: trio.abc.ReceiveStream | None,
        stderr: trio.abc.ReceiveStream | None,
        pty: trio.lowlevel.FdStream | None = None,
        pty_fd: int = -1,
        resize_signal: bool = False,
    ) -> None:
        self.stdin = stdin
        self.stdout = stdout
        self.stderr = stderr
        self._proc = proc
        self._workdir = workdir
        self._init_pid = init_pid
        self._pty = pty
        self._pty_fd = pty_fd
        self._resize_signal = resize_signal
        self._closed = False

    async def resize(self, width: int, height: int) -> None:
        """Resize the terminal.

        On runc's host terminal, runc copies the size inward when it handles
        the ``SIGWINCH`` sent here, a moment after this returns.
        """
        _check_size(width, height)
        await trio.lowlevel.checkpoint()
        if self._pty is None or self._closed:
            return
        with contextlib.suppress(OSError):  # The terminal is gone: nothing to size.
            fcntl.ioctl(self._pty_fd, termios.TIOCSWINSZ, struct.pack("HHHH", height, width, 0, 0))
        if self._resize_signal:
            # runc is not the terminal's session leader (it never got it as
            # controlling terminal), so the kernel does not signal it.
            # Popen.send_signal does nothing once the child is reaped.
            self._proc.send_signal(signal.SIGWINCH)

    async def wait(self) -> int:
        code = await self._proc.wait()
        return 128 - code if code < 0 else code  # Popen gives -signal.

    async def aclose(self) -> None:
        """Kill the command's process tree if the runtime still runs, then close.

        Cancellation:
            Shielded; bounded by the kill's grace periods (a few seconds).
        """
        if self._closed:
            await trio.lowlevel.checkpoint()
            return
        self._closed = True
        with trio.CancelScope(shield=True):
            try:
                if self._proc.returncode is None:
                    await kill_exec(self._proc, self._workdir / "exec.pid", self._init_pid)
            finally:
                for stream in (self._proc.stdin, self._proc.stdout, self._proc.stderr, self._pty):
                    if stream is not None:
                        await stream.aclose()
                shutil.rmtree(self._workdir, ignore_errors=True)


class _PtyOutput(trio.abc.ReceiveStream):
    """The terminal's output, then ``then``'s (the runtime's messages).

    The terminal ends (EIO) once nothing holds its other side any more.
    """

    def __init__(
        self, pty: trio.lowlevel.FdStream, *, then: trio.abc.ReceiveStream | None = None
    ) -> None:
        self._pty = pty
        self._then = then
        self._pty_done = False
        self._closed = False

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        if self._closed:
            raise trio.ClosedResourceError("stdout was closed")
        if not self._pty_done:
            try:
                data = await self._pty.receive_some(max_bytes)
            except trio.BrokenResourceError as exc:
                cause = exc.__cause__
                if not (isinstance(cause, OSError) and cause.errno == errno.EIO):
                    raise
                data = b""
            if data:
                return data
            self._pty_done = True
        if self._then is None:
            return b""
        return await self._then.receive_some(max_bytes)

    async def aclose(self) -> None:
        # The terminal itself is closed with the process.
        self._closed = True
        await trio.lowlevel.checkpoint()


class _PtyInput(trio.abc.SendStream):
    """Input to the terminal.  Closing it stops input; the terminal stays."""

    def __init__(self, pty: trio.lowlevel.FdStream) -> None:
        self._pty = pty
        self._closed = False

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._closed:
            raise trio.ClosedResourceError("stdin was closed")
        await self._pty.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self._pty.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        self._closed = True
        await trio.lowlevel.checkpoint()


def _check_size(width: int, height: int) -> None:
    if not (0 < width < 1 << 16 and 0 < height < 1 << 16):
        raise errors.InvalidArgument(f"invalid terminal size {width}x{height}")


# --------------------------------------------------------------------------
# attach
# --------------------------------------------------------------------------


async def _connect_attach(path: Path, container_id: str) -> trio.socket.SocketType:
    """Connect to conmon's attach socket, whatever the length of its path."""
    try:
        # Through /proc/self/fd, as conmon binds it: the full path may not
        # fit in a sockaddr_un.
        dirfd = os.open(path.parent, os.O_PATH | os.O_CLOEXEC)
    except FileNotFoundError:
        raise errors.FailedPrecondition(
            f"container {container_id[:12]} has no attach socket: its monitor is not running"
        ) from None
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        await sock.connect(f"/proc/self/fd/{dirfd}/{path.name}")
    except (FileNotFoundError, ConnectionRefusedError) as exc:
        sock.close()
        raise errors.FailedPrecondition(
            f"cannot attach to container {container_id[:12]}: its monitor is not running ({exc})"
        ) from exc
    except BaseException:
        sock.close()
        raise
    finally:
        os.close(dirfd)
    return sock


class _AttachDemux:
    """Splits conmon's packets into stdout and stderr, without a task of its own.

    Whichever reader finds its buffer empty reads the next packet from the
    socket and files it under its pipe.  A reader that is behind holds up
    the socket only once its buffer is full (`_ATTACH_BUFFER_LIMIT`), as two
    pipes would; a closed stream's output is dropped.
    """

    def __init__(self, sock: trio.socket.SocketType, *, merge: bool) -> None:
        self.sock = sock
        self._buffers = {_STDOUT_PIPE: bytearray(), _STDERR_PIPE: bytearray()}
        self._open = {_STDOUT_PIPE: True, _STDERR_PIPE: not merge}
        self.merged = merge
        self._reading = False
        self._eof = False
        self._closed = False
        self._error: OSError | None = None
        self._changed = trio.lowlevel.ParkingLot()

    async def receive(self, pipe: int, max_bytes: int) -> bytes:
        await trio.lowlevel.checkpoint()
        while True:
            if self._closed or not self._open[pipe]:
                raise trio.ClosedResourceError("the stream was closed")
            buffer = self._buffers[pipe]
            if buffer:
                data = bytes(buffer[:max_bytes])
                del buffer[:max_bytes]
                self._changed.unpark_all()
                return data
            if self._error is not None:
                raise trio.BrokenResourceError("the attach socket failed") from self._error
            if self._eof:
                return b""
            if self._reading or self._held_up():
                await self._changed.park()
                continue
            await self._read_packet()

    def _held_up(self) -> bool:
        return any(
            self._open[p] and len(b) >= _ATTACH_BUFFER_LIMIT for p, b in self._buffers.items()
        )

    async def _read_packet(self) -> None:
        self._reading = True
        try:
            packet = await self.sock.recv(_ATTACH_PACKET_MAX)
        except OSError as exc:
            self._error = exc
            return
        finally:
            self._reading = False
            self._changed.unpark_all()
        if not packet:
            self._eof = True
            return
        pipe = _STDOUT_PIPE if self.merged else packet[0]
        if self._open.get(pipe):
            self._buffers[pipe] += packet[1:]

    def close_pipe(self, pipe: int) -> None:
        self._open[pipe] = False
        self._buffers[pipe].clear()
        self._changed.unpark_all()

    def close(self) -> None:
        self._closed = True
        self.sock.close()  # Wakes a reader blocked on it (ClosedResourceError).
        self._changed.unpark_all()


class _AttachOutput(trio.abc.ReceiveStream):
    def __init__(self, demux: _AttachDemux, pipe: int) -> None:
        self._demux = demux
        self._pipe = pipe

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if max_bytes is not None and max_bytes < 1:
            raise ValueError("max_bytes must be >= 1")
        return await self._demux.receive(self._pipe, max_bytes or _RECEIVE_SIZE)

    async def aclose(self) -> None:
        self._demux.close_pipe(self._pipe)
        await trio.lowlevel.checkpoint()


class _AttachInput(trio.abc.SendStream):
    """The container's stdin, through conmon; ``aclose()`` shuts our side down."""

    def __init__(self, sock: trio.socket.SocketType) -> None:
        self._sock = sock
        self._closed = False
        self._busy = False

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._closed or self._sock.fileno() == -1:
            raise trio.ClosedResourceError("stdin was closed")
        if self._busy:
            raise trio.BusyResourceError("another task is sending on stdin")
        self._busy = True
        try:
            await trio.lowlevel.checkpoint()
            with memoryview(data) as view:
                # Never an empty packet: conmon would take it for our shutdown.
                for start in range(0, len(view), _STDIN_PACKET):
                    # A SEQPACKET send takes the whole packet or nothing.
                    await self._sock.send(view[start : start + _STDIN_PACKET])
        except OSError as exc:
            raise trio.BrokenResourceError("conmon closed the attach socket") from exc
        finally:
            self._busy = False

    async def wait_send_all_might_not_block(self) -> None:
        if self._closed or self._sock.fileno() == -1:
            raise trio.ClosedResourceError("stdin was closed")
        await self._sock.wait_writable()

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            with contextlib.suppress(OSError):  # Already detached, or conmon gone.
                self._sock.shutdown(socket.SHUT_WR)
        await trio.lowlevel.checkpoint()


class _DiscardInput(trio.abc.SendStream):
    """stdin of a container created without one: input goes nowhere."""

    def __init__(self) -> None:
        self._closed = False

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._closed:
            raise trio.ClosedResourceError("stdin was closed")
        await trio.lowlevel.checkpoint()

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.checkpoint()

    async def aclose(self) -> None:
        self._closed = True
        await trio.lowlevel.checkpoint()


class _AttachProcess:
    """`Process` for an attach session: a client of conmon's attach socket."""

    def __init__(
        self,
        demux: _AttachDemux,
        *,
        stdin: trio.abc.SendStream | None,
        monitor: ContainerMonitor,
        container_id: str,
        conmon_pid: int | None,
        bundle: Path,
        terminal: bool,
    ) -> None:
        self.stdin = stdin
        self.stdout: trio.abc.ReceiveStream | None = _AttachOutput(demux, _STDOUT_PIPE)
        self.stderr: trio.abc.ReceiveStream | None = (
            None if demux.merged else _AttachOutput(demux, _STDERR_PIPE)
        )
        self._demux = demux
        self._monitor = monitor
        self._container_id = container_id
        self._conmon_pid = conmon_pid
        self._bundle = bundle
        self._terminal = terminal

    async def resize(self, width: int, height: int) -> None:
        """Resize the container's terminal (conmon's control FIFO).

        Raises:
            FailedPrecondition: the container has exited.
        """
        _check_size(width, height)
        if not self._terminal:
            await trio.lowlevel.checkpoint()
            return
        await self._monitor.resize(
            self._container_id, bundle=self._bundle, height=height, width=width
        )

    async def wait(self) -> int:
        return await self._monitor.wait_exit(self._container_id, self._conmon_pid)

    async def aclose(self) -> None:
        """Detach: close our socket; the container keeps running."""
        self._demux.close()
        await trio.lowlevel.checkpoint()


# --------------------------------------------------------------------------
# port-forward
# --------------------------------------------------------------------------


def _setns(fd: int, nstype: int) -> None:
    if _libc().setns(fd, nstype) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _loopback_addresses(port: int) -> list[tuple[socket.AddressFamily, tuple[str, int]]]:
    return [(socket.AF_INET, ("127.0.0.1", port)), (socket.AF_INET6, ("::1", port))]


def _connect_loopback(port: int, where: str) -> socket.socket:
    failures: list[str] = []
    for family, address in _loopback_addresses(port):
        try:
            sock = socket.socket(family, socket.SOCK_STREAM)  # No IPv6: EAFNOSUPPORT.
        except OSError as exc:
            failures.append(f"{address[0]}: {exc.strerror or exc}")
            continue
        try:
            sock.settimeout(_CONNECT_TIMEOUT)
            sock.connect(address)
        except OSError as exc:
            sock.close()
            failures.append(f"{address[0]}: {exc.strerror or exc}")
            continue
        sock.setblocking(False)
        return sock
    raise errors.Unavailable(
        f"failed to connect to localhost:{port} {where}: {'; '.join(failures)}"
    )


def _enter_netns_and_connect(netns_path: str, port: int) -> socket.socket:
    try:
        fd = os.open(netns_path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise errors.FailedPrecondition(f"network namespace {netns_path} is gone") from None
    try:
        _setns(fd, _CLONE_NEWNET)  # This thread only.
    finally:
        os.close(fd)
    return _connect_loopback(port, f"inside namespace {netns_path}")


def _connect_in_netns(netns_path: str, port: int) -> socket.socket:
    """Connect from a new thread that joins the namespace and then ends.

    Trio's worker threads are reused: one left in a pod's namespace would
    run later work there (pyroute2 calls, for one).
    """
    result: list[outcome.Outcome[socket.socket]] = []

    def run() -> None:
        result.append(outcome.capture(_enter_netns_and_connect, netns_path, port))

    thread = threading.Thread(target=run, name="pouch-port-forward", daemon=True)
    thread.start()
    thread.join()
    return result[0].unwrap()


async def _connect_host(port: int) -> trio.SocketStream:
    failures: list[str] = []
    for _, (host, _port) in _loopback_addresses(port):
        try:
            with trio.fail_after(_CONNECT_TIMEOUT):
                return await trio.open_tcp_stream(host, port)
        except (OSError, trio.TooSlowError) as exc:
            failures.append(f"{host}: {exc}")
    raise errors.Unavailable(
        f"failed to connect to localhost:{port} on the host network: {'; '.join(failures)}"
    )
