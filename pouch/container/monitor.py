"""conmon, the per-container monitor: its files, its exit, its control FIFO.

Every container runs under its own ``conmon`` (containers/conmon 2.1), as in
cri-o.  conmon runs ``<runtime> create``, keeps the container's stdio (the
k8s-file log and the attach socket), reaps the container's init process and
writes its exit code to a file.  conmon daemonizes itself (it double-forks
and calls ``setsid``), so it is not our child and outlives a daemon restart;
everything the daemon needs later is therefore a *file*:

==============================  ==============================================
``<persist_dir>/conmon.pid``    conmon's pid (``--conmon-pidfile``)
``<bundle>/pidfile``            the container's init pid (``--container-pidfile``)
``<exit_dir>/<container_id>``   the exit code, in decimal (``--exit-dir``)
``<persist_dir>/exit``          the same code again (``--persist-dir``)
``<persist_dir>/oom``           exists if the container was OOM-killed
``<bundle>/ctl``                control FIFO: resize and log reopen messages
``<bundle>/attach``             the attach socket (SOCK_SEQPACKET)
``<socket_dir>/<container_id>`` a symlink to ``<bundle>`` (``--socket-dir-path``)
==============================  ==============================================

The exit code is what conmon computes from ``waitpid``: the exit status, or
128 + the signal number for a process killed by a signal (conmon
``ctr_exit.c``, ``get_exit_status``).  So ``exit 7`` gives 7 and SIGKILL 137.

The control FIFO takes one message per line, ``"<type> <height> <width>\\n"``
(conmon ``ctrl.c``, ``process_terminal_ctrl_line``): type 1 resizes the
terminal, type 2 reopens the log file (``config.h``: ``WIN_RESIZE_EVENT``,
``REOPEN_LOGS_EVENT``).  Each message is sent with a single ``write``.
conmon 2.1.6 has a quirk: when one ``read`` returns several lines it acts on
the *first* line once per line, so messages to one container are
serialized here and a reopen waits for its effect before the next message.
"""

from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path
from typing import TYPE_CHECKING, Final

import trio

from pouch.errors import FailedPrecondition, InvalidArgument, Unavailable

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

__all__ = [
    "CONMON_PIDFILE",
    "CONTAINER_PIDFILE",
    "EXIT_CODE_UNKNOWN",
    "ContainerMonitor",
    "attach_socket_path",
    "conmon_pidfile",
    "container_pidfile",
    "ctl_fifo_path",
    "exit_file",
    "is_conmon_of",
    "oom_killed",
    "read_conmon_pid",
    "read_exit_code",
    "read_pidfile",
]

#: conmon's pid file, in the container's persist dir.
CONMON_PIDFILE: Final = "conmon.pid"
#: The container's init pid as the runtime writes it, in the bundle (cri-o's place).
CONTAINER_PIDFILE: Final = "pidfile"
#: Reported when conmon is gone without having written an exit code (it was
#: SIGKILLed, or the host rebooted).  containerd's CRI plugin uses the same
#: value for an exit status it cannot know (``unknownExitCode``).
EXIT_CODE_UNKNOWN: Final = 255

# conmon control messages (conmon src/config.h).
_WIN_RESIZE_EVENT: Final = 1
_REOPEN_LOGS_EVENT: Final = 2

# sockaddr_un.sun_path is 108 bytes on Linux; conmon shortens the symlink by
# one byte when it would be exactly 107 long (conmon conn_sock.c,
# socket_parent_dir), and so must we to find it.
_SUN_PATH_MAX: Final = 108

# After conmon is gone, how long the exit file may still take to show up.
# conmon writes it before it exits, so this only covers slow file systems.
_EXIT_FILE_GRACE: Final = 1.0
_REOPEN_POLL: Final = 0.01


# --------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------


def conmon_pidfile(persist_dir: Path) -> Path:
    """Where conmon writes its own pid for a container."""
    return persist_dir / CONMON_PIDFILE


def container_pidfile(bundle: Path) -> Path:
    """Where the runtime writes the container's init pid."""
    return bundle / CONTAINER_PIDFILE


def exit_file(exit_dir: Path, container_id: str) -> Path:
    """Where conmon writes the container's exit code."""
    return exit_dir / container_id


def ctl_fifo_path(bundle: Path) -> Path:
    """conmon's control FIFO; conmon creates it in the bundle (conmon ``ctrl.c``)."""
    return bundle / "ctl"


def attach_socket_path(socket_dir: Path, container_id: str) -> Path:
    """The path of a container's attach socket, as conmon binds it.

    conmon links ``<socket_dir>/<container_id>`` to the bundle and binds
    ``attach`` inside it.  The whole path may be longer than a socket address
    allows; a client then opens the parent directory with ``O_PATH`` and
    connects to ``/proc/self/fd/<fd>/attach``, as conmon itself binds it.
    The socket is ``SOCK_SEQPACKET``.
    """
    base = str(socket_dir / container_id)
    if len(base) == _SUN_PATH_MAX - 1:
        base = base[: _SUN_PATH_MAX - 2]
    return Path(base) / "attach"


def read_pidfile(path: Path) -> int | None:
    """Read a pid file; ``None`` if it is missing, empty or not a positive number."""
    try:
        text = path.read_text()
    except (FileNotFoundError, NotADirectoryError):
        return None
    try:
        pid = int(text.strip())
    except ValueError:
        return None
    return pid if pid > 0 else None


def read_conmon_pid(persist_dir: Path) -> int | None:
    """conmon's pid for the container whose persist dir this is, if recorded."""
    return read_pidfile(conmon_pidfile(persist_dir))


def read_exit_code(exit_dir: Path, container_id: str) -> int | None:
    """The container's exit code, or ``None`` if conmon has not written it yet.

    conmon writes the file with ``g_file_set_contents`` (a temporary file
    renamed into place), so a file that exists is complete.
    """
    try:
        text = exit_file(exit_dir, container_id).read_text()
    except FileNotFoundError:
        return None
    try:
        return int(text.strip())
    except ValueError:
        return EXIT_CODE_UNKNOWN


def oom_killed(persist_dir: Path) -> bool:
    """Whether conmon saw the kernel OOM-kill in the container (conmon ``oom.c``)."""
    return (persist_dir / "oom").exists()


def is_conmon_of(pid: int, container_id: str) -> bool:
    """Whether ``pid`` is (still) the conmon of ``container_id``.

    Guards against pid reuse after a daemon restart: the pid in conmon's pid
    file may by now belong to an unrelated process.  Pass the pid of a pidfd
    you already hold to make the answer stick.
    """
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError):
        return False
    argv = raw.split(b"\0")
    return b"conmon" in os.path.basename(argv[0]) and container_id.encode() in argv[1:]


def _is_zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except (FileNotFoundError, ProcessLookupError):
        return True
    # The state follows the parenthesised command, which may contain spaces.
    return stat[stat.rindex(b")") + 2 : stat.rindex(b")") + 3] in (b"Z", b"X")


def _open_conmon(pid: int, container_id: str) -> int | None:
    """A pidfd for ``pid`` if it is the container's living conmon, else ``None``.

    Raises:
        OSError: pidfd_open is not available (ENOSYS) or not permitted.
    """
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return None
    # Checked after opening, so the pidfd cannot refer to a recycled pid.
    if not is_conmon_of(pid, container_id):
        os.close(pidfd)
        return None
    return pidfd


def _reap(pidfd: int) -> None:
    # conmon is normally reparented to init, but if this process is a child
    # subreaper (or PID 1 in its own container) conmon is ours to reap.
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitid(os.P_PIDFD, pidfd, os.WEXITED | os.WNOHANG)


def _write_ctl(path: Path, message: bytes) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        # ENXIO: nobody has the FIFO open for reading, i.e. conmon is gone.
        if exc.errno in (errno.ENXIO, errno.ENOENT):
            raise FailedPrecondition(f"container's monitor is not running ({path})") from exc
        raise
    try:
        written = os.write(fd, message)
    except BlockingIOError as exc:
        raise Unavailable(f"container's monitor is not reading its control FIFO {path}") from exc
    finally:
        os.close(fd)
    if written != len(message):  # A FIFO write of < PIPE_BUF bytes is atomic.
        raise Unavailable(f"short write to control FIFO {path}")


def _file_id(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


# --------------------------------------------------------------------------
# The monitor
# --------------------------------------------------------------------------


class ContainerMonitor:
    """Watches conmon processes: exits, log reopening, terminal resizing.

    One per daemon.  It holds no per-container state beyond a lock while a
    control message is in flight, so a restarted daemon builds a new one and
    carries on from the files conmon keeps.

    Args:
        exit_dir: The directory passed to conmon as ``--exit-dir``.
        attach_socket_dir: The directory passed as ``--socket-dir-path``.
        poll_interval: How often to look for an exit file when conmon's pid
            is unknown or cannot be watched with a pidfd.
        reopen_timeout: How long :meth:`reopen_log` waits for the new file.
    """

    def __init__(
        self,
        *,
        exit_dir: Path,
        attach_socket_dir: Path,
        poll_interval: float = 0.5,
        reopen_timeout: float = 10.0,
    ) -> None:
        self.exit_dir = exit_dir
        self.attach_socket_dir = attach_socket_dir
        self._poll_interval = poll_interval
        self._reopen_timeout = reopen_timeout
        # container id -> (lock, number of tasks using it); see _ctl_lock.
        self._ctl_locks: dict[str, tuple[trio.Lock, int]] = {}

    def read_exit_code(self, container_id: str) -> int | None:
        """The exit code conmon wrote, or ``None`` while the container runs."""
        return read_exit_code(self.exit_dir, container_id)

    def attach_socket_path(self, container_id: str) -> Path:
        """The container's attach socket (see :func:`attach_socket_path`)."""
        return attach_socket_path(self.attach_socket_dir, container_id)

    async def wait_exit(self, container_id: str, conmon_pid: int | None) -> int:
        """Wait until the container has exited and return its exit code.

        Works for a conmon started by an earlier daemon process: conmon is
        watched through a pidfd (``pidfd_open`` + ``wait_readable``), which
        does not need it to be our child, and the exit code comes from the
        exit file.  Without a pid, or without pidfd support, the exit file is
        polled every ``poll_interval`` seconds.

        Args:
            container_id: The container.
            conmon_pid: conmon's pid (:func:`read_conmon_pid`), or ``None``.

        Returns:
            The exit code conmon wrote, or :data:`EXIT_CODE_UNKNOWN` if conmon
            is gone without having written one.

        Cancellation:
            Safe at any point; nothing is left behind.
        """
        code = self.read_exit_code(container_id)
        if code is not None:
            return code
        if conmon_pid is not None:
            try:
                pidfd = _open_conmon(conmon_pid, container_id)
            except OSError:
                pass  # No pidfd support: poll below.
            else:
                if pidfd is not None:
                    try:
                        await trio.lowlevel.wait_readable(pidfd)
                        _reap(pidfd)
                    finally:
                        os.close(pidfd)
                return await self._exit_code_after_conmon(container_id)
        while True:
            code = self.read_exit_code(container_id)
            if code is not None:
                return code
            if conmon_pid is not None and (
                _is_zombie(conmon_pid) or not is_conmon_of(conmon_pid, container_id)
            ):
                return await self._exit_code_after_conmon(container_id)
            await trio.sleep(self._poll_interval)

    async def _exit_code_after_conmon(self, container_id: str) -> int:
        with trio.move_on_after(_EXIT_FILE_GRACE):
            while True:
                code = self.read_exit_code(container_id)
                if code is not None:
                    return code
                await trio.sleep(_EXIT_FILE_GRACE / 20)
        return EXIT_CODE_UNKNOWN

    async def reopen_log(self, container_id: str, *, bundle: Path, log_path: Path) -> None:
        """Make conmon reopen the container's log file (CRI ``ReopenContainerLog``).

        The kubelet renames the log away and then asks for this; conmon then
        creates ``log_path`` anew (it writes ``<log_path>.tmp`` and renames it
        into place, conmon ``ctr_logging.c``).  Returns once the new file is
        there: ``log_path`` exists and is not the file it was before the call.
        Lines written before conmon acts go to the old file, none are lost.

        Raises:
            FailedPrecondition: conmon is not running (the container exited).
            Unavailable: conmon did not create the new file within the
                monitor's ``reopen_timeout``.

        Cancellation:
            Safe; the request may still take effect.
        """
        before = _file_id(log_path)
        async with self._ctl_lock(container_id):
            # conmon keeps its end of the FIFO open for a moment after it has
            # written the exit code, but no longer serves it: check first.
            self._check_running(container_id)
            _write_ctl(ctl_fifo_path(bundle), f"{_REOPEN_LOGS_EVENT} 0 0\n".encode())
            with trio.move_on_after(self._reopen_timeout):
                while True:
                    now = _file_id(log_path)
                    if now is not None and now != before:
                        return
                    self._check_running(container_id)
                    await trio.sleep(_REOPEN_POLL)
        raise Unavailable(f"conmon did not reopen {log_path} within {self._reopen_timeout:g}s")

    async def resize(self, container_id: str, *, bundle: Path, height: int, width: int) -> None:
        """Resize the container's terminal (meaningful only with ``tty``).

        Raises:
            InvalidArgument: a dimension is not in 1..65535.
            FailedPrecondition: conmon is not running.
        """
        if not (0 < height < 1 << 16 and 0 < width < 1 << 16):
            raise InvalidArgument(f"invalid terminal size {height}x{width}")
        async with self._ctl_lock(container_id):
            self._check_running(container_id)
            _write_ctl(ctl_fifo_path(bundle), f"{_WIN_RESIZE_EVENT} {height} {width}\n".encode())

    def _check_running(self, container_id: str) -> None:
        if self.read_exit_code(container_id) is not None:
            raise FailedPrecondition(f"container {container_id} has exited")

    @contextlib.asynccontextmanager
    async def _ctl_lock(self, container_id: str) -> AsyncIterator[None]:
        lock, users = self._ctl_locks.get(container_id, (trio.Lock(), 0))
        self._ctl_locks[container_id] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._ctl_locks[container_id]
            if users == 1:
                del self._ctl_locks[container_id]
            else:
                self._ctl_locks[container_id] = (lock, users - 1)
