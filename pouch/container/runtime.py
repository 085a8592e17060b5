"""The OCI runtime seam, and its implementation over runc/crun and conmon.

`OCIRuntime` is what the container manager calls; `Runtime` implements it
by running real binaries, the way cri-o's ``internal/oci/runtime_oci.go``
does:

- ``create`` starts ``conmon`` (containers/conmon 2.1), which runs
  ``<runtime> create`` and stays behind as the container's monitor (see
  `pouch.container.monitor`).  conmon reports the init pid, or the
  runtime's stderr, on its sync pipe (``_OCI_SYNCPIPE``).
- ``start``, ``kill``, ``delete``, ``state``, ``list`` and ``update`` run
  ``<runtime> --root <root> <command>`` directly.
- ``exec_sync`` runs ``<runtime> exec`` directly (not through conmon), with
  the output captured up to a limit and the whole exec process tree killed
  when its timeout expires.

Every call runs under an absolute timeout (``trio.fail_after``).  ``create``
and ``delete`` are shielded from cancellation: killing runc halfway leaves
half-made state (STYLE.md section 3).

runc and crun differ in their error messages, so "does it exist" is never
read from stderr: both keep a container's state in ``<root>/<container_id>``
and a failed command is classified by whether that directory exists.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import signal
import subprocess
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Final, Protocol, TypeAlias

import attrs
import trio

from pouch.container import monitor
from pouch.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PouchError,
    RuntimeFailed,
)

if TYPE_CHECKING:
    import builtins
    from collections.abc import Iterable, Mapping, Sequence

__all__ = [
    "CONMON",
    "DEFAULT_MAX_OUTPUT",
    "ExecResult",
    "JSONObject",
    "OCIRuntime",
    "Runtime",
    "RuntimeHandler",
]

#: Debian's conmon.
CONMON: Final = Path("/usr/bin/conmon")
#: exec_sync keeps at most this much of each of stdout and stderr.  cri-o
#: caps ExecSync output at the same size (``maxExecSyncSize``).
DEFAULT_MAX_OUTPUT: Final = 16 * 1024 * 1024

#: A JSON object as the runtime prints it (``state``, ``list``).
JSONObject: TypeAlias = dict[str, object]

# Whatever PATH the daemon has, the runtime (and its hooks) get this one.
_DEFAULT_PATH: Final = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# runc's own rule for container ids (libcontainer/factory_linux.go); it
# also keeps ids usable as file names below the state directories.
_CONTAINER_ID: Final = re.compile(r"[\w+.-]+", re.ASCII)
# conmon's sync message is a line of JSON carrying at most 8 KiB of runtime
# stderr, escaped (conmon parent_pipe_fd.c).
_SYNC_MESSAGE_LIMIT: Final = 256 * 1024
# After the exec'd process exits, how long its pipes may stay open (held by
# a background child of it) before we stop reading.  cri-o drains without
# waiting, too.
_DRAIN_GRACE: Final = 0.5
# After the exec process tree is killed, how long the runtime may take to
# notice and exit before it is killed as well.
_KILL_GRACE: Final = 2.0
# How long the runtime may take to write the exec pid file.
_PIDFILE_GRACE: Final = 1.0
_READ_CHUNK: Final = 64 * 1024


@attrs.frozen
class RuntimeHandler:
    """One OCI runtime the daemon may use (cri-o's ``[crio.runtime.runtimes.*]``).

    Attributes:
        name: The CRI runtime handler name (``RunPodSandboxRequest.runtime_handler``).
        binary: The runtime executable (``/usr/sbin/runc``, ``/usr/bin/crun``).
        root: The runtime's state directory (``--root``), e.g. ``<state>/runc``.
            Volatile: it belongs on a tmpfs such as ``/run``.
        systemd_cgroup: Pass ``--systemd-cgroup``; the spec's ``cgroupsPath``
            is then ``slice:prefix:name``.  Off: runc's cgroupfs driver.
    """

    name: str
    binary: Path
    root: Path
    systemd_cgroup: bool = False


@attrs.frozen
class ExecResult:
    """The outcome of `OCIRuntime.exec_sync`.

    Attributes:
        exit_code: The command's exit status, 128 + signal if a signal killed
            it.  After a timeout it is whatever the kill produced (137).
            If the runtime itself failed (no such executable...), it is the
            runtime's status (runc: 255) and ``stderr`` says why.
        stdout: The first ``max_output`` bytes the command wrote there.
        stderr: Likewise.
        timed_out: The timeout expired and the command was killed.
        truncated: Either stream was longer than ``max_output``.
    """

    exit_code: int
    stdout: bytes
    stderr: bytes
    timed_out: bool = False
    truncated: bool = False


class OCIRuntime(Protocol):
    """What the container manager needs from an OCI runtime."""

    async def create(
        self,
        container_id: str,
        bundle: Path,
        *,
        log_path: Path,
        exit_dir: Path,
        persist_dir: Path,
        stdin: bool,
        tty: bool,
        log_max_size: int | None = None,
        stdin_once: bool = False,
    ) -> int:
        """Create the container from ``bundle``; return its init pid."""
        ...

    async def start(self, container_id: str) -> None:
        """Start a created container's init process."""
        ...

    async def kill(self, container_id: str, signal: int, all: bool = False) -> None:
        """Send ``signal`` to the init process (``all``: to every process)."""
        ...

    async def delete(self, container_id: str, force: bool = False) -> None:
        """Remove the container; an unknown container is success."""
        ...

    async def state(self, container_id: str) -> JSONObject | None:
        """The runtime's state of the container, ``None`` if it is unknown."""
        ...

    async def list(self) -> builtins.list[JSONObject]:
        """The state of every container the runtime knows."""
        ...

    async def checkpoint(self, container_id: str, image_path: Path, work_path: Path) -> None:
        """Checkpoint the container with CRIU, leaving it running."""
        ...

    async def update(self, container_id: str, resources: Mapping[str, object]) -> None:
        """Apply OCI ``linux.resources`` to a running container."""
        ...

    async def exec_sync(
        self,
        container_id: str,
        argv: Sequence[str],
        *,
        timeout: float | None,  # noqa: ASYNC109 - the command's budget, reported in the result
        env: Sequence[str] = (),
        cwd: str | None = None,
        max_output: int = DEFAULT_MAX_OUTPUT,
    ) -> ExecResult:
        """Run a command in the container and collect its output."""
        ...


class Runtime:
    """`OCIRuntime` over a runc-compatible binary, with conmon as monitor.

    Args:
        handler: Which runtime binary, and its state directory.
        attach_socket_dir: conmon's ``--socket-dir-path``: where conmon links
            each container's bundle to keep the attach socket path short.
            Shared with `monitor.ContainerMonitor`.
        conmon: The conmon executable.
        command_timeout: Absolute limit for start, kill, delete, state, list
            and update.
        create_timeout: Absolute limit for create (cri-o allows 240 s; image
            mounts and hooks can be slow).
    """

    def __init__(
        self,
        handler: RuntimeHandler,
        *,
        attach_socket_dir: Path,
        conmon: Path = CONMON,
        command_timeout: float = 60.0,
        create_timeout: float = 240.0,
    ) -> None:
        self.handler = handler
        self.attach_socket_dir = attach_socket_dir
        self._conmon = conmon
        self._command_timeout = command_timeout
        self._create_timeout = create_timeout
        self.env = {"PATH": _DEFAULT_PATH}
        if "XDG_RUNTIME_DIR" in os.environ:
            self.env["XDG_RUNTIME_DIR"] = os.environ["XDG_RUNTIME_DIR"]

    # ------------------------------------------------------------------
    # create
    # ------------------------------------------------------------------

    async def create(
        self,
        container_id: str,
        bundle: Path,
        *,
        log_path: Path,
        exit_dir: Path,
        persist_dir: Path,
        stdin: bool,
        tty: bool,
        log_max_size: int | None = None,
        stdin_once: bool = False,
    ) -> int:
        """Create the container under a new conmon; return its init pid.

        conmon runs ``<runtime> create``; this returns once the container is
        in the "created" state (conmon has sent the init pid on its sync
        pipe).  conmon then keeps running, detached from this process.

        Args:
            container_id: The id for the runtime and conmon.
            bundle: The OCI bundle: ``config.json`` plus the root file system.
                conmon also puts its ``ctl``/``winsz`` FIFOs, the attach
                socket and the pid file there.
            log_path: The k8s-file log (CRI format).  Its directory must exist.
            exit_dir: Where conmon writes ``<container_id>`` with the exit code.
            persist_dir: The container's private directory: conmon's pid file,
                and conmon's copy of the exit code and OOM marker.
            stdin: Keep a pipe to the container's stdin (for attach).
            tty: The spec asks for a terminal (``process.terminal``).
            log_max_size: Have conmon restart the log when it would exceed
                this many bytes; ``None`` for no limit.
            stdin_once: Close the container's stdin when the first attached
                client detaches (CRI ``stdin_once``).

        Returns:
            The init process's pid, in the daemon's pid namespace.

        Raises:
            InvalidArgument: ``container_id`` is not a valid runtime id.
            AlreadyExists: the runtime already has a container of that id.
            RuntimeFailed: conmon or the runtime failed, or timed out; the
                runtime's stderr is in ``stderr``.  What was made is removed.

        Cancellation:
            Shielded: a cancel takes effect once the container exists (or
            creation failed and was undone), at most ``create_timeout`` later.
        """
        _check_id(container_id)
        argv = self._conmon_argv(
            container_id,
            bundle,
            log_path=log_path,
            exit_dir=exit_dir,
            persist_dir=persist_dir,
            stdin=stdin,
            tty=tty,
            stdin_once=stdin_once,
            log_max_size=log_max_size,
        )
        with trio.CancelScope(shield=True):
            pid = await self._create(container_id, bundle, argv, exit_dir, persist_dir)
        return pid

    async def _create(
        self,
        container_id: str,
        bundle: Path,
        argv: builtins.list[str],
        exit_dir: Path,
        persist_dir: Path,
    ) -> int:
        if await self.state(container_id) is not None:
            raise AlreadyExists(f"container {container_id} already exists in the runtime")
        _prepare_create(container_id, bundle, exit_dir, persist_dir, self.attach_socket_dir)
        try:
            with trio.fail_after(self._create_timeout):
                return await self._run_conmon(container_id, argv, bundle)
        except trio.TooSlowError as exc:
            await self._undo_create(container_id, persist_dir)
            raise RuntimeFailed(
                argv, -1, f"timed out after {self._create_timeout:g}s creating the container"
            ) from exc
        except Exception:
            await self._undo_create(container_id, persist_dir)
            raise

    def _conmon_argv(
        self,
        container_id: str,
        bundle: Path,
        *,
        log_path: Path,
        exit_dir: Path,
        persist_dir: Path,
        stdin: bool,
        tty: bool,
        stdin_once: bool,
        log_max_size: int | None,
    ) -> builtins.list[str]:
        # The option set follows cri-o's CreateContainer.  Not --sync: conmon
        # must double-fork so that it survives this process.
        argv = [
            str(self._conmon),
            "--api-version",
            "--bundle", str(bundle),
            "--cid", container_id,
            "--cuuid", container_id,
            "--name", container_id,
            "--runtime", str(self.handler.binary),
            "--runtime-arg", f"--root={self.handler.root}",
            "--log-path", f"k8s-file:{log_path}",
            "--exit-dir", str(exit_dir),
            "--persist-dir", str(persist_dir),
            "--conmon-pidfile", str(monitor.conmon_pidfile(persist_dir)),
            "--container-pidfile", str(monitor.container_pidfile(bundle)),
            "--socket-dir-path", str(self.attach_socket_dir),
        ]  # fmt: skip
        if self.handler.systemd_cgroup:
            # conmon passes --systemd-cgroup on to `<runtime> create`.
            argv.append("--systemd-cgroup")
        if log_max_size is not None:
            argv += ["--log-size-max", str(log_max_size)]
        if tty:
            # With a terminal, stdin goes through the console (cri-o: -t only).
            argv.append("--terminal")
        elif stdin:
            argv.append("--stdin")
            if not stdin_once:
                argv.append("--leave-stdin-open")
        return argv

    async def _run_conmon(self, container_id: str, argv: builtins.list[str], bundle: Path) -> int:
        read_fd, write_fd = os.pipe()
        sync = trio.lowlevel.FdStream(read_fd)
        async with sync:
            try:
                # The first conmon process forks the real monitor and exits at
                # once, so this returns quickly; the monitor has the write end.
                proc = await trio.run_process(
                    argv,
                    stdin=b"",
                    capture_stdout=True,
                    capture_stderr=True,
                    check=False,
                    cwd=bundle,
                    env={**self.env, "_OCI_SYNCPIPE": str(write_fd)},
                    pass_fds=(write_fd,),
                )
            finally:
                os.close(write_fd)
            if proc.returncode != 0:
                raise RuntimeFailed(argv, proc.returncode, _text(proc.stderr))
            line = await _receive_line(sync)
        if not line:
            raise RuntimeFailed(argv, -1, "conmon exited before reporting the container's pid")
        pid, message = _parse_sync_message(argv, line)
        if pid <= 0:
            raise RuntimeFailed(
                [str(self.handler.binary), "create", container_id],
                -1,
                message or "the runtime failed to create the container",
            )
        return pid

    async def _undo_create(self, container_id: str, persist_dir: Path) -> None:
        # conmon exits by itself after reporting a failure; after a timeout it
        # may still wait for the runtime, whose death it then follows (conmon
        # sets PDEATHSIG on it).
        pid = monitor.read_conmon_pid(persist_dir)
        if pid is not None and monitor.is_conmon_of(pid, container_id):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(PouchError):
            await self.delete(container_id, force=True)

    # ------------------------------------------------------------------
    # Plain runtime commands
    # ------------------------------------------------------------------

    async def start(self, container_id: str) -> None:
        """Start the created container's init process (``<runtime> start``).

        Raises:
            NotFound: the runtime does not know the container.
            RuntimeFailed: the runtime refused (e.g. not in "created" state).
        """
        _check_id(container_id)
        await self._checked(container_id, "start", container_id)

    async def kill(self, container_id: str, signal: int, all: bool = False) -> None:
        """Send ``signal`` to the container's init (``all``: to all its processes).

        A container that has already stopped is not an error: the signal
        found nothing to do, as with a kill racing an exit.

        Raises:
            NotFound: the runtime does not know the container.
            RuntimeFailed: the runtime failed otherwise.
        """
        _check_id(container_id)
        args = ["kill", *(["--all"] if all else []), container_id, str(int(signal))]
        argv, proc = await self._run(args)
        if proc.returncode == 0:
            return
        state = await self.state(container_id)
        if state is None:
            raise NotFound(f"container {container_id} not found in the runtime")
        if state.get("status") == "stopped":
            return
        raise RuntimeFailed(argv, proc.returncode, _text(proc.stderr))

    async def delete(self, container_id: str, force: bool = False) -> None:
        """Remove the container from the runtime (``<runtime> delete``).

        Idempotent: an unknown container is success.  With ``force`` a running
        container is killed first (SIGKILL); conmon then records exit 137.
        Also removes conmon's attach symlink for the container.

        Raises:
            RuntimeFailed: e.g. the container is running and not ``force``.

        Cancellation:
            Shielded and bounded by ``command_timeout``.
        """
        _check_id(container_id)
        with trio.CancelScope(shield=True):
            argv, proc = await self._run(["delete", *(["--force"] if force else []), container_id])
            if proc.returncode != 0 and self._exists(container_id):
                raise RuntimeFailed(argv, proc.returncode, _text(proc.stderr))
            link = self.attach_socket_dir / container_id
            if link.is_symlink():
                link.unlink(missing_ok=True)

    async def state(self, container_id: str) -> JSONObject | None:
        """``<runtime> state``: the runtime's JSON, or ``None`` if unknown.

        The keys are the runtime's: both give ``id``, ``pid``, ``status``
        ("created", "running", "paused", "stopped"), ``bundle``, ``created``.
        """
        _check_id(container_id)
        argv, proc = await self._run(["state", container_id])
        if proc.returncode != 0:
            if not self._exists(container_id):
                return None
            raise RuntimeFailed(argv, proc.returncode, _text(proc.stderr))
        return _json_object(argv, proc.stdout)

    async def list(self) -> builtins.list[JSONObject]:
        """``<runtime> list --format json``: every container the runtime knows."""
        argv, proc = await self._run(["list", "--format", "json"])
        if proc.returncode != 0:
            raise RuntimeFailed(argv, proc.returncode, _text(proc.stderr))
        value = _loads(argv, proc.stdout)
        if value is None:  # runc prints "null" when there are none.
            return []
        if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
            raise RuntimeFailed(argv, 0, f"unexpected output: {_text(proc.stdout)[:200]}")
        return [_str_keys(v) for v in value]

    async def checkpoint(self, container_id: str, image_path: Path, work_path: Path) -> None:
        """``<runtime> checkpoint --leave-running`` into *image_path* (CRIU images)."""
        _check_id(container_id)
        await self._checked(
            container_id,
            "checkpoint",
            "--image-path",
            str(image_path),
            "--work-path",
            str(work_path),
            "--leave-running",
            container_id,
        )

    async def update(self, container_id: str, resources: Mapping[str, object]) -> None:
        """Apply OCI ``linux.resources`` (``<runtime> update --resources -``).

        Raises:
            NotFound: the runtime does not know the container.
            RuntimeFailed: the runtime refused the resources.
        """
        _check_id(container_id)
        payload = json.dumps(dict(resources)).encode()
        await self._checked(container_id, "update", "--resources", "-", container_id, stdin=payload)

    # ------------------------------------------------------------------
    # exec_sync
    # ------------------------------------------------------------------

    async def exec_sync(
        self,
        container_id: str,
        argv: Sequence[str],
        *,
        timeout: float | None,  # noqa: ASYNC109 - the command's budget, reported in the result
        env: Sequence[str] = (),
        cwd: str | None = None,
        max_output: int = DEFAULT_MAX_OUTPUT,
    ) -> ExecResult:
        """Run ``argv`` in the running container and collect its output.

        The process gets the container's own process settings (user,
        capabilities, rlimits, security labels: ``process`` of the bundle's
        ``config.json``, as cri-o does), with ``argv``, no terminal, ``env``
        ("KEY=value", overriding the container's) and ``cwd`` if given.

        On timeout the whole process tree is killed: the exec'd process and
        its descendants are stopped (SIGSTOP, so none can fork away) and then
        SIGKILLed, along with the process group the runtime put the exec'd
        process in (both runc and crun make it a new session), which also
        catches orphans.  Then this returns, promptly, with ``timed_out``.

        Args:
            container_id: A running container.
            argv: The command.
            timeout: Seconds the command may run; ``None`` or 0 for no limit
                (0 is CRI's "run forever", ``ExecSyncRequest.timeout``).
            env: Extra environment, "KEY=value" each.
            cwd: Working directory in the container.
            max_output: Keep at most this many bytes of stdout and of stderr;
                the rest is read and dropped (``truncated`` is set).

        Raises:
            NotFound: the runtime does not know the container.
            FailedPrecondition: the container is not running.
            InvalidArgument: ``argv`` is empty, ``env`` malformed or
                ``timeout`` negative.

        Cancellation:
            The exec'd process tree is killed before the cancel propagates.
        """
        _check_id(container_id)
        if not argv:
            raise InvalidArgument("exec needs a command")
        if timeout is not None and timeout < 0:
            raise InvalidArgument(f"negative exec timeout {timeout}")
        state = await self.state(container_id)
        if state is None:
            raise NotFound(f"container {container_id} not found in the runtime")
        if state.get("status") != "running":
            raise FailedPrecondition(
                f"container {container_id} is not running (status {state.get('status')!r})"
            )
        init_pid = state.get("pid")
        bundle = state.get("bundle")
        if not isinstance(init_pid, int) or not isinstance(bundle, str):
            raise RuntimeFailed([str(self.handler.binary), "state"], 0, "state lacks pid or bundle")
        process = await trio.to_thread.run_sync(exec_process, Path(bundle), argv, env, cwd)
        with tempfile.TemporaryDirectory(prefix="pouch-exec-") as tmp:
            process_json = Path(tmp) / "process.json"
            pidfile = Path(tmp) / "exec.pid"
            process_json.write_text(json.dumps(process))
            args = [
                *self.global_args(),
                "exec",
                "--process", str(process_json),
                "--pid-file", str(pidfile),
                container_id,
            ]  # fmt: skip
            time_limit = timeout if timeout else None
            return await self._exec(args, pidfile, init_pid, time_limit, max_output)

    async def _exec(
        self,
        args: builtins.list[str],
        pidfile: Path,
        init_pid: int,
        time_limit: float | None,
        max_output: int,
    ) -> ExecResult:
        proc = await trio.lowlevel.open_process(
            [str(self.handler.binary), *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=self.env,
        )
        assert proc.stdout is not None
        assert proc.stderr is not None
        out, err = _Capture(max_output), _Capture(max_output)
        timed_out = False
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(out.drain, proc.stdout)
                nursery.start_soon(err.drain, proc.stderr)
                with trio.move_on_after(math.inf if time_limit is None else time_limit) as budget:
                    await proc.wait()
                if budget.cancelled_caught:
                    timed_out = True
                    with trio.CancelScope(shield=True):
                        await kill_exec(proc, pidfile, init_pid)
                # The runtime is gone; a background child of the command may
                # still hold the pipes open.  Stop reading after a moment.
                nursery.cancel_scope.deadline = min(
                    nursery.cancel_scope.deadline, trio.current_time() + _DRAIN_GRACE
                )
        finally:
            with trio.CancelScope(shield=True):
                if proc.returncode is None:  # Cancelled, or an error: clean up.
                    await kill_exec(proc, pidfile, init_pid)
                await proc.stdout.aclose()
                await proc.stderr.aclose()
        code = proc.returncode
        assert code is not None
        return ExecResult(
            exit_code=128 - code if code < 0 else code,  # Popen gives -signal.
            stdout=bytes(out.data),
            stderr=bytes(err.data),
            timed_out=timed_out,
            truncated=out.truncated or err.truncated,
        )

    # ------------------------------------------------------------------
    # Helpers
    # ------------------------------------------------------------------

    def global_args(self) -> builtins.list[str]:
        """The runtime's global flags (``--root``, ``--systemd-cgroup``)."""
        args = ["--root", str(self.handler.root)]
        if self.handler.systemd_cgroup:
            args.append("--systemd-cgroup")
        return args

    def _exists(self, container_id: str) -> bool:
        # runc keeps <root>/<id>/state.json, crun <root>/<id>/status.
        return (self.handler.root / container_id).exists()

    async def _run(
        self, args: Sequence[str], *, stdin: bytes = b""
    ) -> tuple[builtins.list[str], subprocess.CompletedProcess[bytes]]:
        argv = [str(self.handler.binary), *self.global_args(), *args]
        try:
            with trio.fail_after(self._command_timeout):
                proc = await trio.run_process(
                    argv,
                    stdin=stdin,
                    capture_stdout=True,
                    capture_stderr=True,
                    check=False,
                    env=self.env,
                )
        except trio.TooSlowError as exc:
            raise RuntimeFailed(argv, -1, f"timed out after {self._command_timeout:g}s") from exc
        return argv, proc

    async def _checked(self, container_id: str, *args: str, stdin: bytes = b"") -> None:
        argv, proc = await self._run(args, stdin=stdin)
        if proc.returncode == 0:
            return
        if not self._exists(container_id):
            raise NotFound(f"container {container_id} not found in the runtime")
        raise RuntimeFailed(argv, proc.returncode, _text(proc.stderr))


# --------------------------------------------------------------------------
# create helpers
# --------------------------------------------------------------------------


def _check_id(container_id: str) -> None:
    if not _CONTAINER_ID.fullmatch(container_id) or container_id in (".", ".."):
        raise InvalidArgument(f"invalid container id {container_id!r}")


def _prepare_create(
    container_id: str, bundle: Path, exit_dir: Path, persist_dir: Path, socket_dir: Path
) -> None:
    for directory in (exit_dir, persist_dir, socket_dir):
        directory.mkdir(parents=True, exist_ok=True)
    # Left over from an earlier container of the same id, they would make a
    # new one look exited (or make its pid files lie).
    stale = (
        monitor.exit_file(exit_dir, container_id),
        persist_dir / "exit",
        persist_dir / "oom",
        monitor.conmon_pidfile(persist_dir),
        monitor.container_pidfile(bundle),
    )
    for path in stale:
        path.unlink(missing_ok=True)


async def _receive_line(stream: trio.lowlevel.FdStream) -> bytes:
    data = bytearray()
    while b"\n" not in data and len(data) < _SYNC_MESSAGE_LIMIT:
        chunk = await stream.receive_some(_READ_CHUNK)
        if not chunk:
            break
        data += chunk
    return bytes(data.partition(b"\n")[0])


def _parse_sync_message(argv: Sequence[str], line: bytes) -> tuple[int, str]:
    """Parse ``{"data": <pid or -1>, "message": "<runtime stderr>"}``.

    conmon says "data" with ``--api-version 1``, "pid" without (conmon
    parent_pipe_fd.c, write_sync_fd); both are accepted.
    """
    value = _json_object(argv, line)
    pid = value.get("data", value.get("pid"))
    message = value.get("message", "")
    if not isinstance(pid, int) or not isinstance(message, str):
        raise RuntimeFailed(argv, -1, f"unexpected sync message from conmon: {_text(line)[:200]}")
    return pid, message


# --------------------------------------------------------------------------
# exec helpers
# --------------------------------------------------------------------------


def exec_process(
    bundle: Path, argv: Sequence[str], env: Sequence[str], cwd: str | None
) -> JSONObject:
    """The ``process`` for ``<runtime> exec --process``: the container's, adapted.

    runc's ``--process`` replaces the whole process object: anything left out
    (capabilities!) is not inherited, hence the copy (cri-o prepareProcessExec).
    """
    config_path = bundle / "config.json"
    try:
        config = json.loads(config_path.read_bytes())
    except (OSError, ValueError) as exc:
        raise FailedPrecondition(f"cannot read the container's spec {config_path}: {exc}") from exc
    process = config.get("process") if isinstance(config, dict) else None
    if not isinstance(process, dict):
        raise FailedPrecondition(f"container spec {config_path} has no process")
    process = _str_keys(process)
    process["args"] = list(argv)
    process["terminal"] = False
    process.pop("consoleSize", None)
    base_env = process.get("env")
    process["env"] = _merge_env(base_env if isinstance(base_env, list) else [], env)
    if cwd is not None:
        process["cwd"] = cwd
    return process


def _merge_env(base: Iterable[object], extra: Sequence[str]) -> list[str]:
    merged: dict[str, str] = {}
    for item in base:
        if isinstance(item, str):
            merged[item.partition("=")[0]] = item
    for item in extra:
        key, sep, _ = item.partition("=")
        if not sep or not key:
            raise InvalidArgument(f"environment entry {item!r} is not KEY=value")
        merged[key] = item
    return list(merged.values())


@attrs.define
class _Capture:
    """Reads a pipe to its end, keeping the first ``limit`` bytes."""

    limit: int
    data: bytearray = attrs.field(factory=bytearray)
    truncated: bool = False

    async def drain(self, stream: trio.abc.ReceiveStream) -> None:
        while chunk := await stream.receive_some(_READ_CHUNK):
            room = self.limit - len(self.data)
            if len(chunk) > room:
                self.data += chunk[: max(room, 0)]
                self.truncated = True
            else:
                self.data += chunk


async def kill_exec(proc: trio.Process, pidfile: Path, init_pid: int) -> None:
    """Kill an exec'd process tree, then make sure the runtime has exited."""
    pid = monitor.read_pidfile(pidfile)
    if pid is None and proc.returncode is None:
        # The runtime writes the pid file right after starting the process.
        with trio.move_on_after(_PIDFILE_GRACE):
            while pid is None and proc.returncode is None:
                await trio.sleep(0.01)
                pid = monitor.read_pidfile(pidfile)
    if pid is not None and _is_exec_process(pid, proc.pid, init_pid):
        _kill_tree(pid, protected_groups={os.getpgrp(), _pgid(init_pid), 0, 1})
    with trio.move_on_after(_KILL_GRACE):
        await proc.wait()
    if proc.returncode is None:
        proc.kill()
        await proc.wait()


def _is_exec_process(pid: int, runtime_pid: int, init_pid: int) -> bool:
    """Guard against a recycled pid: the exec'd process is the runtime's child.

    (Both runc and crun stay the exec'd process's parent until it exits.)
    Failing that, it must at least live in the container's pid namespace.
    """
    stat = _proc_stat(pid)
    if stat is None:
        return False
    if stat[1] == runtime_pid:
        return True
    try:
        same_ns = os.readlink(f"/proc/{pid}/ns/pid") == os.readlink(f"/proc/{init_pid}/ns/pid")
    except OSError:
        return False
    return same_ns and pid != init_pid


def _proc_stat(pid: int) -> tuple[str, int, int] | None:
    """(state, ppid, pgid) of a process, from ``/proc/<pid>/stat``."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_bytes()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = raw[raw.rindex(b")") + 2 :].split()  # The command may contain spaces.
    return fields[0].decode(), int(fields[1]), int(fields[2])


def _pgid(pid: int) -> int:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return 0


def _children() -> dict[int, list[int]]:
    """ppid -> pids, for every process (``/proc/<pid>/task/*/children`` is
    not compiled into every kernel)."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            stat = _proc_stat(int(entry.name))
            if stat is not None:
                children.setdefault(stat[1], []).append(int(entry.name))
    return children


def _kill_tree(root: int, *, protected_groups: set[int]) -> None:
    """SIGKILL ``root``, its descendants and its process group.

    Everything is stopped first, parents before children, so that nothing
    forks or reparents itself away while the tree is being walked; a few
    rounds catch forks that were already under way.
    """
    group = _pgid(root)
    stopped: list[int] = []
    seen: set[int] = set()
    frontier = [root]
    for _ in range(4):
        for pid in frontier:
            if pid in seen:
                continue
            seen.add(pid)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)
                stopped.append(pid)
        children = _children()
        frontier = [c for pid in stopped for c in children.get(pid, ()) if c not in seen]
        if not frontier:
            break
    if group not in protected_groups:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(group, signal.SIGKILL)
    for pid in stopped:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


# --------------------------------------------------------------------------
# Output parsing
# --------------------------------------------------------------------------


def _text(data: bytes) -> str:
    return data.decode("utf-8", "replace").strip()


def _loads(argv: Sequence[str], data: bytes) -> object:
    try:
        value: object = json.loads(data)
    except ValueError as exc:
        raise RuntimeFailed(argv, 0, f"unparsable output: {_text(data)[:200]}") from exc
    return value


def _str_keys(value: dict[object, object]) -> JSONObject:
    return {str(k): v for k, v in value.items()}


def _json_object(argv: Sequence[str], data: bytes) -> JSONObject:
    value = _loads(argv, data)
    if not isinstance(value, dict):
        raise RuntimeFailed(argv, 0, f"expected a JSON object, got: {_text(data)[:200]}")
    return _str_keys(value)
