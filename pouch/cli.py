"""Command lines: ``pouchd`` (the daemon) and ``pouch`` (the client).

``pouch`` talks to a running pouchd over its socket: the CRI for listing,
inspecting and removing images, for listing and inspecting pods and
containers and for the version, and pouch's own API (``protos/pouch/v1``)
for pulls with progress and for loading archives.  ``pouch logs`` reads the
container's log file itself, as crictl does: it runs on the node, as root.
``pouch exec``, ``attach`` and ``port-forward`` ask the CRI for a stream
URL (Exec, Attach, PortForward) and speak kubectl's protocols to the stream
server behind it, with `pouch.stream.client` (Trio, run per command).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Final, TypeVar

import click
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from pouch import __version__, log
from pouch.config import (
    DEFAULT_CONFIG_PATH,
    ConfigError,
    GrpcConfig,
    load,
    to_toml,
    with_overrides,
)

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Collection, Iterable, Sequence
    from types import TracebackType

    import betterproto

    from pouch.cri._pb.pouch.v1 import PullProgress
    from pouch.cri._pb.runtime.v1 import Container, Image, PodSandbox
    from pouch.cri.client import Client
    from pouch.stream.client import SessionResult


def _pouchd_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pouchd", description="Pouch: a CRI v1 container runtime daemon."
    )
    parser.add_argument(
        "--config",
        type=Path,
        default=None,
        help=f"TOML configuration file (default: {DEFAULT_CONFIG_PATH}, if present)",
    )
    parser.add_argument("--root", type=Path, help="persistent state directory")
    parser.add_argument("--state", type=Path, help="volatile state directory")
    parser.add_argument("--socket", type=Path, help="CRI gRPC unix socket path")
    parser.add_argument(
        "--print-config", action="store_true", help="print the effective configuration and exit"
    )
    parser.add_argument("--version", action="version", version=f"pouchd {__version__}")
    return parser


def pouchd_main(argv: list[str] | None = None) -> int:
    """Entry point of ``pouchd``; returns the exit status."""
    # Imported here, not at the top: ``pouch`` shares this module and should
    # neither pay for the daemon's imports nor depend on them.
    import trio

    from pouch import daemon
    from pouch.cri._bridge import StartupError

    args = _pouchd_parser().parse_args(argv)
    try:
        config = with_overrides(
            load(args.config), root=args.root, state=args.state, socket=args.socket
        )
    except ConfigError as exc:
        print(f"pouchd: {exc}", file=sys.stderr)
        return 2
    if args.print_config:
        sys.stdout.write(to_toml(config))
        return 0
    log.setup(config.log)
    try:
        trio.run(daemon.run, config)
    except StartupError as exc:
        print(f"pouchd: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:
        log.get_logger("pouch.daemon").critical("pouchd failed", exc_info=exc)
        return 1
    return 0


# ---- pouch ---------------------------------------------------------------------------

T = TypeVar("T")

#: Where ``pouch`` finds the daemon unless ``--socket`` says otherwise.
DEFAULT_SOCKET: Final = GrpcConfig().address

#: How a layer's state reads in ``pouch pull`` (the words ``docker pull`` uses).
LAYER_STATES: Final = {
    "waiting": "Waiting",
    "downloading": "Downloading",
    "unpacking": "Unpacking",
    "done": "Pull complete",
    "exists": "Already exists",
}

_SIZE_UNITS: Final = ("B", "kB", "MB", "GB", "TB", "PB", "EB")


def human_size(size: int) -> str:
    """Bytes in decimal units with four significant digits: ``4.235MB``.

    The format of crictl and docker (go-units ``HumanSize``).
    """
    value = float(size)
    unit = 0
    while value >= 1000 and unit < len(_SIZE_UNITS) - 1:
        value /= 1000
        unit += 1
    return f"{value:.4g}{_SIZE_UNITS[unit]}"


def short_id(digest: str) -> str:
    """The first 12 hex digits of a digest or image id: ``sha256:0123...`` -> ``0123...``."""
    return digest.rpartition(":")[2][:12]


def split_name(name: str) -> tuple[str, str]:
    """Split an image name into repository and tag; ``<none>`` for a digest or no tag."""
    if "@" in name:
        return name.partition("@")[0], "<none>"
    repo, colon, tag = name.rpartition(":")
    # A colon before the last slash is a registry port, not a tag.
    if colon and "/" not in tag:
        return repo, tag
    return name, "<none>"


def image_row(image: Image) -> tuple[str, str, str, str]:
    """IMAGE, TAG, IMAGE ID and SIZE of ``pouch images``: the first tag names it."""
    if image.repo_tags:
        repo, tag = split_name(image.repo_tags[0])
    elif image.repo_digests:
        repo, tag = split_name(image.repo_digests[0])
    else:
        repo, tag = "<none>", "<none>"
    return repo, tag, short_id(image.id), human_size(image.size)


# ---- pods and containers: formats ------------------------------------------------------

#: How many characters of a pod or container id a table shows (crictl's width).
TRUNCATED_ID_LEN: Final = 13

#: The STATE column of ``pouch pods`` and ``pouch ps``, by CRI enum name (crictl's words).
POD_STATES: Final = {"SANDBOX_READY": "Ready", "SANDBOX_NOTREADY": "NotReady"}
CONTAINER_STATES: Final = {
    "CONTAINER_CREATED": "Created",
    "CONTAINER_RUNNING": "Running",
    "CONTAINER_EXITED": "Exited",
    "CONTAINER_UNKNOWN": "Unknown",
}

_DIGEST: Final = re.compile(r"[a-z0-9]+(?:[+._-][a-z0-9]+)*:[0-9a-fA-F]{32,}")


def truncate_id(id_: str) -> str:
    """A pod or container id as a table shows it: its first 13 characters."""
    return id_[:TRUNCATED_ID_LEN]


def human_duration(seconds: float) -> str:
    """A duration in words: ``2 minutes``, ``About an hour``, ``3 days``.

    go-units ``HumanDuration``, which crictl and docker show as ``... ago``.
    """
    whole = int(seconds)
    if whole < 1:
        return "Less than a second"
    if whole == 1:
        return "1 second"
    if whole < 60:
        return f"{whole} seconds"
    minutes = whole // 60
    if minutes == 1:
        return "About a minute"
    if minutes < 60:
        return f"{minutes} minutes"
    hours = round(seconds / 3600)
    if hours == 1:
        return "About an hour"
    if hours < 48:
        return f"{hours} hours"
    if hours < 24 * 7 * 2:
        return f"{hours // 24} days"
    if hours < 24 * 30 * 2:
        return f"{hours // 24 // 7} weeks"
    if hours < 24 * 365 * 2:
        return f"{hours // 24 // 30} months"
    return f"{int(seconds // 3600) // 24 // 365} years"


def created_ago(created_at: int, now: float) -> str:
    """``2 minutes ago``: *created_at* in nanoseconds since the epoch, *now* in seconds."""
    return f"{human_duration(now - created_at / 1e9)} ago"


def _state_word(state: object, words: dict[str, str]) -> str:
    # By name: an enum value this client does not know reads as Unknown, not a crash.
    return words.get(getattr(state, "name", None) or "", "Unknown")


def image_column(container: Container) -> str:
    """The IMAGE of ``pouch ps``: the name asked for, or a short id if that was an id."""
    image = container.image.image if container.image is not None else ""
    image = image or container.image_ref
    if _DIGEST.fullmatch(image):
        return truncate_id(image.partition(":")[2])
    return image


def pod_row(pod: PodSandbox, now: float) -> tuple[str, ...]:
    """POD ID, CREATED, STATE, NAME, NAMESPACE, ATTEMPT and RUNTIME of ``pouch pods``."""
    meta = pod.metadata
    return (
        truncate_id(pod.id),
        created_ago(pod.created_at, now),
        _state_word(pod.state, POD_STATES),
        meta.name if meta is not None else "",
        meta.namespace if meta is not None else "",
        str(meta.attempt if meta is not None else 0),
        pod.runtime_handler or "(default)",
    )


def container_row(container: Container, now: float) -> tuple[str, ...]:
    """CONTAINER, IMAGE, CREATED, STATE, NAME, ATTEMPT and POD ID of ``pouch ps``."""
    meta = container.metadata
    return (
        truncate_id(container.id),
        image_column(container),
        created_ago(container.created_at, now),
        _state_word(container.state, CONTAINER_STATES),
        meta.name if meta is not None else "",
        str(meta.attempt if meta is not None else 0),
        truncate_id(container.pod_sandbox_id),
    )


def resolve_id(text: str, ids: Iterable[str], what: str) -> str | None:
    """The one id of *ids* that is *text* or begins with it; None if none does.

    Raises:
        PouchError: *text* is empty, or the prefix of several ids.
    """
    if not text:
        raise PouchError(f"an empty {what} id")
    matches = [i for i in ids if i.startswith(text)]
    if text in matches:
        return text
    if len(matches) > 1:
        raise PouchError(f'{what} id prefix "{text}" is ambiguous')
    return matches[0] if matches else None


def _json_or_text(text: str) -> object:
    try:
        return json.loads(text)
    except ValueError:
        return text


def status_document(status: betterproto.Message, info: dict[str, str]) -> dict[str, object]:
    """``pouch inspect``'s JSON: the status, then each verbose info entry, parsed.

    crictl's layout: ``{"status": {...}, "info": {...}}``, the status in the
    protobuf JSON mapping (camelCase, enum names, 64-bit integers as strings)
    and each value of the info map parsed from JSON when it is JSON.
    """
    document: dict[str, object] = {"status": status.to_dict(include_default_values=True)}
    for key in sorted(info):
        document.setdefault(key, _json_or_text(info[key]))
    return document


# ---- container logs ------------------------------------------------------------------

#: The two streams a CRI log line names.
LOG_STREAMS: Final = (b"stdout", b"stderr")


@dataclass(frozen=True, slots=True)
class LogEntry:
    """One line a container wrote, its partial parts joined.

    Attributes:
        timestamp: the RFC 3339 time of its first part, as the file has it.
        stream: ``stdout`` or ``stderr``.
        text: the line, without its newline.
    """

    timestamp: bytes
    stream: str
    text: bytes


def parse_log_line(line: bytes) -> tuple[bytes, str, bool, bytes] | None:
    """Split a line of a CRI log file: ``<RFC3339Nano> <stream> <tags> <text>``.

    Returns (timestamp, stream, partial, text), partial when the first tag is
    ``P``; None for a line not in the format (the kubelet skips those too).
    The tags are ``:``-separated and only the first one means anything yet.
    """
    parts = line.rstrip(b"\n").split(b" ", 3)
    if len(parts) < 3 or not parts[0] or parts[1] not in LOG_STREAMS:
        return None
    timestamp, stream, tags = parts[:3]
    tag = tags.partition(b":")[0]
    if tag not in (b"P", b"F"):
        return None
    text = parts[3] if len(parts) == 4 else b""
    return timestamp, stream.decode(), tag == b"P", text


class LogJoiner:
    """Joins a line's ``P`` (partial) parts and its ``F`` (full) part, per stream.

    A runtime splits a long line into parts (conmon at its buffer's size);
    the parts of stdout and of stderr may interleave, so each stream has its
    own pending line.
    """

    def __init__(self) -> None:
        self._pending: dict[str, tuple[bytes, list[bytes]]] = {}

    def feed(self, line: bytes) -> LogEntry | None:
        """The entry *line* completes, if it does; malformed lines are skipped."""
        parsed = parse_log_line(line)
        if parsed is None:
            return None
        timestamp, stream, partial, text = parsed
        pending = self._pending.get(stream)
        if partial:
            if pending is None:
                self._pending[stream] = (timestamp, [text])
            else:
                pending[1].append(text)
            return None
        if pending is None:
            return LogEntry(timestamp, stream, text)
        del self._pending[stream]
        return LogEntry(pending[0], stream, b"".join([*pending[1], text]))

    def flush(self) -> list[LogEntry]:
        """The lines whose last part never came (the container ended mid-line)."""
        entries = [
            LogEntry(timestamp, stream, b"".join(parts))
            for stream, (timestamp, parts) in self._pending.items()
        ]
        self._pending.clear()
        return entries


class LogFile:
    """The complete lines of a log file, read as they are written.

    It follows the path: when the file at the path is another one (the
    kubelet rotated the log: renamed it and had the runtime reopen a new
    one), it reads what is left of the old file and goes on with the new one
    from its start; when the file shrank (truncated in place), it starts over.
    A path with no file yet reads as no lines.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._file: BinaryIO | None = None
        self._ident: tuple[int, int] | None = None
        self._rest = b""

    def open(self) -> bool:
        """Open the file if it is not; False if there is none (yet)."""
        if self._file is not None:
            return True
        try:
            file = self.path.open("rb")
        except FileNotFoundError:
            return False
        st = os.fstat(file.fileno())
        self._file, self._ident, self._rest = file, (st.st_dev, st.st_ino), b""
        return True

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def _drain(self) -> list[bytes]:
        assert self._file is not None
        data = self._rest + self._file.read()
        *lines, self._rest = data.split(b"\n")
        return lines

    def read(self) -> list[bytes]:
        """The lines completed since the last read, without their newlines."""
        if not self.open():
            return []
        lines = self._drain()
        try:
            st = self.path.stat()
        except FileNotFoundError:
            # Renamed away and the new file not there yet: the old one is
            # still the one being written, or was the last.
            return lines
        assert self._file is not None
        if (st.st_dev, st.st_ino) != self._ident:
            lines += self._drain()  # written to the old file since
            lines += self.finish()
            self.close()
            if self.open():
                lines += self._drain()
        elif st.st_size < self._file.tell():
            self._file.seek(0)
            self._rest = b""
            lines += self._drain()
        return lines

    def finish(self) -> list[bytes]:
        """The last line if the file does not end with a newline: nothing more will come."""
        rest, self._rest = self._rest, b""
        return [rest] if rest else []

    def __enter__(self) -> LogFile:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class LogWriter:
    """Writes log entries: stdout's to *out*, stderr's to *err*, bytes as they are."""

    def __init__(self, out: BinaryIO, err: BinaryIO, *, timestamps: bool = False) -> None:
        self._out = out
        self._err = err
        self._timestamps = timestamps

    def write(self, entries: Iterable[LogEntry]) -> None:
        for entry in entries:
            stream = self._err if entry.stream == "stderr" else self._out
            if self._timestamps:
                stream.write(entry.timestamp + b" ")
            stream.write(entry.text + b"\n")
        self._out.flush()
        self._err.flush()


def read_log(log: LogFile, joiner: LogJoiner, *, tail: int | None = None) -> list[LogEntry]:
    """The entries of what *log* has now: all, or the last *tail* of them.

    A line still without its newline or its last part stays pending in
    *log* and *joiner*; `follow_log` may complete it.
    """
    entries: collections.deque[LogEntry] = collections.deque(maxlen=tail)
    for line in log.read():
        entry = joiner.feed(line)
        if entry is not None:
            entries.append(entry)
    return list(entries)


def follow_log(
    log: LogFile,
    joiner: LogJoiner,
    write: Callable[[list[LogEntry]], None],
    running: Callable[[], bool],
    *,
    interval: float = 0.1,
    status_interval: float = 0.5,
    sleep: Callable[[float], None] = time.sleep,
) -> None:
    """Write what is added to *log* until *running* says the writer is done.

    The file is polled every *interval* seconds and *running* every
    *status_interval*.  *running* is asked before the file is read, so what
    was written before the container exited is read and written before
    this returns; then the lines left incomplete are written as they are.
    """
    every = max(1, round(status_interval / interval))
    tick = 0
    while True:
        done = tick % every == 0 and not running()
        write(read_log(log, joiner))
        if done:
            break
        sleep(interval)
        tick += 1
    write(finish_log(log, joiner))


def finish_log(log: LogFile, joiner: LogJoiner) -> list[LogEntry]:
    """The entries left once *log* is written no more: its unterminated lines."""
    entries = [entry for line in log.finish() if (entry := joiner.feed(line)) is not None]
    return [*entries, *joiner.flush()]


def tail_count(ctx: click.Context, param: click.Parameter, value: str) -> int | None:
    """``--tail``: a number of lines, or ``all`` (None); a negative number is all too."""
    text = value.strip().lower()
    if text == "all":
        return None
    try:
        count = int(text)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a number of lines or 'all'") from None
    # crictl's default is --tail=-1.
    return count if count >= 0 else None


# ---- exec, attach and port-forward ------------------------------------------------------

#: How ``pouch exec``, ``attach`` and ``port-forward`` reach the stream server.
STREAM_TRANSPORTS: Final = ("websocket", "spdy")
#: Once its stdin has ended, ``pouch attach`` detaches when the container has
#: written nothing for this many seconds (unless it exits first).
ATTACH_LINGER: Final = 1.0
#: How long ``pouch attach`` waits for a container that ended its output to exit.
EXIT_CODE_WAIT: Final = 5.0
#: The exit status when the reader of our output went away (a shell's 128 + SIGPIPE).
SIGPIPE_STATUS: Final = 141
_NO_TTY: Final = "Unable to use a TTY - input is not a terminal or the right kind of file"


def parse_port_mapping(text: str) -> tuple[int, int]:
    """``LOCAL:REMOTE``, ``:REMOTE`` (any free local port) or ``PORT`` (the same both sides).

    Raises:
        ValueError: not a mapping of ports (local 0..65535, remote 1..65535).
    """
    local_text, colon, remote_text = text.rpartition(":")
    if not colon:
        local_text = remote_text
    local_text = local_text or "0"
    if not (local_text.isdigit() and remote_text.isdigit()):
        raise ValueError(f"{text!r} is not LOCAL:REMOTE, :REMOTE or PORT")
    local, remote = int(local_text), int(remote_text)
    if local >= 1 << 16:
        raise ValueError(f"local port {local} is not in 0..65535")
    if not 0 < remote < 1 << 16:
        raise ValueError(f"remote port {remote} is not in 1..65535")
    return local, remote


def port_mappings(
    ctx: click.Context, param: click.Parameter, values: tuple[str, ...]
) -> list[tuple[int, int]]:
    """The PORTS of ``pouch port-forward``, parsed."""
    try:
        return [parse_port_mapping(value) for value in values]
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def container_tty(info: dict[str, str]) -> bool:
    """Whether a container runs on a terminal, from ContainerStatus's verbose info.

    pouchd and containerd both put the OCI spec in ``info["info"]``
    (``runtimeSpec.process.terminal``); containerd also the CRI config
    (``config.tty``).
    """
    document = _json_or_text(info.get("info", ""))
    if not isinstance(document, dict):
        return False
    spec = document.get("runtimeSpec")
    process = spec.get("process") if isinstance(spec, dict) else None
    if isinstance(process, dict) and "terminal" in process:
        return bool(process["terminal"])
    config = document.get("config")
    return bool(config.get("tty")) if isinstance(config, dict) else False


def resolve_container(client: Client, text: str) -> str:
    """The id of the container *text* names (an id or a unique prefix of one)."""
    container_id = resolve_id(text, (c.id for c in client.list_containers()), "container")
    if container_id is None:
        raise PouchError(f"no such container: {text}")
    return container_id


def resolve_pod(client: Client, text: str) -> str:
    """The id of the pod *text* names: an id, a unique prefix of one, or a ready pod's name."""
    pods = client.list_pod_sandboxes()
    pod_id = resolve_id(text, (p.id for p in pods), "pod sandbox")
    if pod_id is not None:
        return pod_id
    named = [
        p.id
        for p in pods
        if p.metadata is not None
        and p.metadata.name == text
        and _state_word(p.state, POD_STATES) == "Ready"
    ]
    if len(named) > 1:
        raise PouchError(f'pod name "{text}" is ambiguous: use its id')
    if not named:
        raise PouchError(f"no such pod sandbox: {text}")
    return named[0]


def run_trio(fn: Callable[[], Awaitable[T]]) -> T:
    """``trio.run(fn)``, its errors out of their exception groups (KeyboardInterrupt first)."""
    import trio

    from pouch.stream.client import unwrap_group

    try:
        return trio.run(fn)
    except BaseExceptionGroup as group:
        raise unwrap_group(group) from None


def stream_session(
    url: str,
    *,
    stdin: bool,
    tty: bool,
    transport: str,
    detach_keys: bool = False,
    linger_after_stdin: float | None = None,
) -> SessionResult:
    """Run an exec or attach session on this process's stdio.

    With *tty*, stdin (if it is a terminal) is put in raw mode for the
    session and restored after, and the terminal's size is sent at the
    start and on every SIGWINCH.  stderr is used only without *tty* (a
    terminal merges it into stdout).

    Raises:
        PouchError: no session, or it broke.
        BrokenPipeError: the reader of our output went away.
    """
    import trio

    from pouch.stream import client as sc

    sys.stdout.flush()
    sys.stderr.flush()
    source: sc.Source | None = sc.FileSource(sys.stdin.buffer) if stdin else None
    if source is not None and detach_keys:
        source = sc.DetachKeys(source)
    stdout = sc.FileSink(sys.stdout.buffer)
    stderr = None if tty else sc.FileSink(sys.stderr.buffer)
    size_fd = next((fd for fd in (1, 0) if tty and os.isatty(fd)), None)

    async def session() -> SessionResult:
        async with trio.open_nursery() as nursery:
            resizes = None
            if size_fd is not None:
                send, resizes = trio.open_memory_channel[tuple[int, int]](1)
                nursery.start_soon(sc.watch_terminal_size, size_fd, send)
            result = await sc.remote_command(
                url,
                stdin=source,
                stdout=stdout,
                stderr=stderr,
                tty=tty,
                resizes=resizes,
                transport="spdy" if transport == "spdy" else "websocket",
                linger_after_stdin=linger_after_stdin,
            )
            nursery.cancel_scope.cancel()
        return result

    raw = tty and stdin and os.isatty(0)
    try:
        with sc.RawTerminal(0) if raw else contextlib.nullcontext():
            return run_trio(session)
    except sc.StreamClientError as exc:
        raise PouchError(str(exc)) from None
    except trio.BrokenResourceError as exc:
        raise BrokenPipeError(str(exc)) from None


def _silence_stdout() -> None:
    # The reader went away: point stdout at /dev/null so that flushing it at
    # exit fails no more.
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())


def wait_exit_code(client: Client, container_id: str, *, wait: float = EXIT_CODE_WAIT) -> int:
    """The exit code of a container whose output ended; 0 if it still runs after *wait*."""
    deadline = time.monotonic() + wait
    while True:
        status = client.container_status(container_id).status
        if _state_word(status.state, CONTAINER_STATES) == "Exited":
            return status.exit_code
        if time.monotonic() >= deadline:
            return 0
        time.sleep(0.05)


class PouchError(click.ClickException):
    """A command's failure, shown as ``pouch: <message>``; exit status 1."""

    def show(self, file: object = None) -> None:
        click.echo(f"pouch: {self.format_message()}", err=True)


class PullView:
    """Shows a pull's progress on *console*.

    On a terminal: a progress bar per layer, redrawn in place.  Elsewhere (a
    pipe, a log file, ``TERM=dumb``): one line each time a layer changes
    state, as ``docker pull`` does, so a log shows what happened without
    a line per chunk.
    """

    def __init__(self, console: Console) -> None:
        self._console = console
        self.live = console.is_terminal and not console.is_dumb_terminal
        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TextColumn("{task.fields[state]}"),
            console=console,
            disable=not self.live,
        )
        self._resolving: TaskID | None = None
        self._layers: dict[str, TaskID] = {}
        self._states: dict[str, str] = {}
        self._announced = False

    def __enter__(self) -> PullView:
        self._progress.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._progress.stop()

    def update(self, progress: PullProgress) -> None:
        """Show one message of the Pull stream."""
        if self.live:
            self._update_bars(progress)
        else:
            self._update_lines(progress)

    def _print(self, text: str) -> None:
        self._console.print(text, markup=False, highlight=False, soft_wrap=True)

    def _update_lines(self, progress: PullProgress) -> None:
        if not self._announced:
            self._print(f"Pulling {progress.image}")
            self._announced = True
        for layer in progress.layers:
            state = "done" if progress.done and layer.state != "exists" else layer.state
            if self._states.get(layer.digest) != state:
                self._states[layer.digest] = state
                label = LAYER_STATES.get(state, state)
                self._print(f"{short_id(layer.digest)}: {label} ({human_size(layer.size)})")

    def _update_bars(self, progress: PullProgress) -> None:
        bars = self._progress
        if not progress.resolved and not progress.done:
            if self._resolving is None:
                self._resolving = bars.add_task(f"Resolving {progress.image}", total=None, state="")
            return
        if self._resolving is not None:
            bars.remove_task(self._resolving)
            self._resolving = None
        for layer in progress.layers:
            total = layer.size or None
            state = "done" if progress.done and layer.state != "exists" else layer.state
            done = layer.size if state in ("done", "exists") else layer.done
            label = LAYER_STATES.get(state, state)
            task = self._layers.get(layer.digest)
            if task is None:
                self._layers[layer.digest] = bars.add_task(
                    short_id(layer.digest), total=total, completed=done, state=label
                )
            else:
                bars.update(task, total=total, completed=done, state=label)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--socket",
    type=click.Path(dir_okay=False, path_type=Path),
    default=DEFAULT_SOCKET,
    show_default=True,
    help="pouchd's gRPC socket.",
)
@click.version_option(__version__, prog_name="pouch", message="%(prog)s %(version)s")
@click.pass_context
def pouch_cli(ctx: click.Context, socket: Path) -> None:
    """Pouch command-line client: images, pods, containers, logs and exec, from pouchd."""
    # Imported here: pouchd shares this module and never needs grpcio.
    from pouch.cri.client import Client

    ctx.obj = ctx.with_resource(Client(socket))


def print_table(
    headings: Sequence[str], rows: Iterable[Sequence[str]], *, right: Collection[str] = ()
) -> None:
    """Print a table as ``pouch images`` does: no box, bold headings, never wrapped."""
    table = Table(box=None, pad_edge=False, padding=(0, 3, 0, 0), header_style="bold")
    for heading in headings:
        table.add_column(heading, no_wrap=True, justify="right" if heading in right else "left")
    for row in rows:
        table.add_row(*row)
    console = Console()
    if not console.is_terminal:
        # Piped output is read by programs: never wrap or cut a name.
        console = Console(width=10_000)
    console.print(table, markup=False, highlight=False)


@pouch_cli.command("pull")
@click.argument("image")
@click.option("--user", "-u", default="", help="Registry user name.")
@click.option("--password", "-p", default=None, help="Registry password (asked for if omitted).")
@click.pass_obj
def pull_command(client: Client, image: str, user: str, password: str | None) -> int:
    """Pull IMAGE, showing each layer's progress; print its image id."""
    if password is not None and not user:
        raise click.UsageError("--password needs --user")
    if user and password is None:
        password = click.prompt("Password", hide_input=True, err=True)
    image_id = ""
    with (
        PullView(Console(stderr=True)) as view,
        contextlib.closing(client.pull(image, username=user, password=password or "")) as stream,
    ):
        for progress in stream:
            view.update(progress)
            if progress.done:
                image_id = progress.image_id
    if not image_id:
        click.echo("pouch: the pull stream ended without an image id", err=True)
        return 1
    click.echo(image_id)
    return 0


@pouch_cli.command("images")
@click.option("--quiet", "-q", is_flag=True, help="Print image ids only.")
@click.pass_obj
def images_command(client: Client, quiet: bool) -> int:
    """List images."""
    images = client.list_images()
    if quiet:
        for image in images:
            click.echo(image.id)
        return 0
    print_table(
        ("IMAGE", "TAG", "IMAGE ID", "SIZE"),
        [image_row(image) for image in images],
        right=("SIZE",),
    )
    return 0


@pouch_cli.command("rmi")
@click.argument("images", nargs=-1, required=True)
@click.pass_obj
def rmi_command(client: Client, images: tuple[str, ...]) -> int:
    """Remove images, by name, id or id prefix; fails if one is not there."""
    from pouch.cri.client import ClientError

    failed = False
    for name in images:
        try:
            # RemoveImage succeeds on an unknown image (cri-api): ask first.
            image = client.image_status(name)
            if image is None:
                click.echo(f"pouch: no such image: {name}", err=True)
                failed = True
                continue
            client.remove_image(image.id)
        except ClientError as exc:
            click.echo(f"pouch: {exc.details}", err=True)
            failed = True
            continue
        for removed in (*image.repo_tags, *image.repo_digests):
            click.echo(f"Untagged: {removed}")
        click.echo(f"Deleted: {image.id}")
    return 1 if failed else 0


@pouch_cli.command("load")
@click.argument("file", type=click.Path(exists=True, path_type=Path))
@click.pass_obj
def load_command(client: Client, file: Path) -> int:
    """Load the images of an archive FILE (read by pouchd, on this host)."""
    for image in client.load(os.path.abspath(file)):
        if not image.names:
            click.echo(f"Loaded image ID: {image.image_id}")
        for name in image.names:
            click.echo(f"Loaded image: {name}")
    return 0


@pouch_cli.command("pods")
@click.option("--quiet", "-q", is_flag=True, help="Print pod ids only.")
@click.pass_obj
def pods_command(client: Client, quiet: bool) -> int:
    """List pod sandboxes, newest first."""
    pods = sorted(client.list_pod_sandboxes(), key=lambda p: p.created_at, reverse=True)
    if quiet:
        for pod in pods:
            click.echo(pod.id)
        return 0
    now = time.time()
    print_table(
        ("POD ID", "CREATED", "STATE", "NAME", "NAMESPACE", "ATTEMPT", "RUNTIME"),
        [pod_row(pod, now) for pod in pods],
    )
    return 0


@pouch_cli.command("ps")
@click.option("--all", "-a", "all_", is_flag=True, help="Show all containers, not only running.")
@click.option("--quiet", "-q", is_flag=True, help="Print container ids only.")
@click.option("--pod", "-p", default="", metavar="ID", help="Only the containers of this pod.")
@click.pass_obj
def ps_command(client: Client, all_: bool, quiet: bool, pod: str) -> int:
    """List running containers (all of them with -a), newest first."""
    from pouch.cri._pb.runtime.v1 import ContainerState

    state = None if all_ else ContainerState.CONTAINER_RUNNING
    containers = sorted(
        client.list_containers(state=state, pod_sandbox_id=pod),
        key=lambda c: c.created_at,
        reverse=True,
    )
    if quiet:
        for container in containers:
            click.echo(container.id)
        return 0
    now = time.time()
    print_table(
        ("CONTAINER", "IMAGE", "CREATED", "STATE", "NAME", "ATTEMPT", "POD ID"),
        [container_row(container, now) for container in containers],
    )
    return 0


@pouch_cli.command("inspect")
@click.argument("id_", metavar="ID")
@click.pass_obj
def inspect_command(client: Client, id_: str) -> int:
    """Print a container's or a pod's status and verbose info, as JSON.

    ID is a container's id or a pod sandbox's, or a unique prefix of one;
    containers are looked for first.
    """
    container_id = resolve_id(id_, (c.id for c in client.list_containers()), "container")
    if container_id is not None:
        container = client.container_status(container_id, verbose=True)
        document = status_document(container.status, container.info)
    else:
        pod_id = resolve_id(id_, (p.id for p in client.list_pod_sandboxes()), "pod sandbox")
        if pod_id is None:
            raise PouchError(f"no container or pod sandbox with id {id_}")
        pod = client.pod_sandbox_status(pod_id, verbose=True)
        document = status_document(pod.status, pod.info)
    click.echo(json.dumps(document, indent=2))
    return 0


@pouch_cli.command("logs")
@click.option("--follow", "-f", is_flag=True, help="Follow the log until the container exits.")
@click.option(
    "--tail",
    default="all",
    callback=tail_count,
    metavar="N",
    help="Show only the last N lines (default: all).",
)
@click.option("--timestamps", "-t", is_flag=True, help="Show each line's time.")
@click.argument("container")
@click.pass_obj
def logs_command(
    client: Client, follow: bool, tail: int | None, timestamps: bool, container: str
) -> int:
    """Print a container's log: its stdout to stdout, its stderr to stderr.

    CONTAINER is an id or a unique prefix of one.  The log file is read here,
    on the node, as the kubelet and crictl read it.
    """
    from pouch.cri.client import ClientError

    container_id = resolve_id(container, (c.id for c in client.list_containers()), "container")
    if container_id is None:
        raise PouchError(f"no such container: {container}")
    path = client.container_status(container_id).status.log_path
    if not path:
        raise PouchError(f"container {truncate_id(container_id)} has no log file")

    def running() -> bool:
        try:
            state = client.container_status(container_id).status.state
        except ClientError as exc:
            if exc.code == "NOT_FOUND":  # removed: it will write no more
                return False
            raise
        return getattr(state, "name", "") in ("CONTAINER_CREATED", "CONTAINER_RUNNING")

    # The lines go out as the container wrote them: bytes, not necessarily UTF-8.
    sys.stdout.flush()
    sys.stderr.flush()
    writer = LogWriter(sys.stdout.buffer, sys.stderr.buffer, timestamps=timestamps)
    try:
        with LogFile(path) as log:
            if not follow and not log.open():
                raise PouchError(f"container {truncate_id(container_id)}: no log file {path}")
            joiner = LogJoiner()
            if follow:
                writer.write(read_log(log, joiner, tail=tail))
                follow_log(log, joiner, writer.write, running)
            else:
                entries = [*read_log(log, joiner), *finish_log(log, joiner)]
                if tail is not None:
                    entries = entries[len(entries) - tail :] if tail else []
                writer.write(entries)
    except BrokenPipeError:
        # The reader went away (pouch logs x | head): an end, not an error.
        # Point stdout at /dev/null so that flushing it at exit fails no more.
        with contextlib.suppress(OSError, ValueError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
    except OSError as exc:
        raise PouchError(f"cannot read {path}: {exc.strerror or exc}") from None
    return 0


@pouch_cli.command(
    "exec", context_settings={"allow_interspersed_args": False, "ignore_unknown_options": True}
)
@click.option("--stdin", "-i", "interactive", is_flag=True, help="Pass stdin to the command.")
@click.option(
    "--tty", "-t", is_flag=True, help="Run the command on a terminal (with -i on a terminal)."
)
@click.option(
    "--transport",
    type=click.Choice(STREAM_TRANSPORTS),
    default="websocket",
    show_default=True,
    help="How to reach the stream server: WebSocket (v5, else v4) or SPDY/3.1.",
)
@click.argument("container")
@click.argument("cmd", nargs=-1, required=True, type=click.UNPROCESSED)
@click.pass_obj
def exec_command(
    client: Client,
    interactive: bool,
    tty: bool,
    transport: str,
    container: str,
    cmd: tuple[str, ...],
) -> int:
    """Run CMD in a running container; exit with its exit code.

    CONTAINER is an id or a unique prefix of one.  stdout and stderr are
    the command's (one stream on a terminal); -i passes stdin, and its end
    is the command's.  As with kubectl, -t takes effect only with -i and a
    terminal as stdin, which is then in raw mode until the command ends.
    """
    if cmd[:1] == ("--",):
        cmd = cmd[1:]
    if not cmd:
        raise click.UsageError("a command is required")
    if tty and interactive and not os.isatty(0):
        click.echo(_NO_TTY, err=True)
    tty = tty and interactive and os.isatty(0)
    container_id = resolve_container(client, container)
    url = client.exec(
        container_id, list(cmd), tty=tty, stdin=interactive, stdout=True, stderr=not tty
    )
    try:
        result = stream_session(url, stdin=interactive, tty=tty, transport=transport)
    except BrokenPipeError:
        _silence_stdout()
        return SIGPIPE_STATUS
    status = result.status
    assert status is not None  # An exec never detaches.
    if not status.exited:
        click.echo(f"pouch: {status.message}", err=True)
    return status.code


@pouch_cli.command("attach")
@click.option("--no-stdin", is_flag=True, help="Do not pass stdin to the container.")
@click.option(
    "--transport",
    type=click.Choice(STREAM_TRANSPORTS),
    default="websocket",
    show_default=True,
    help="How to reach the stream server: WebSocket (v5, else v4) or SPDY/3.1.",
)
@click.argument("container")
@click.pass_obj
def attach_command(client: Client, no_stdin: bool, transport: str, container: str) -> int:
    """Attach to a running container's stdio; exit with its exit code if it exits.

    CONTAINER is an id or a unique prefix of one.  A container on a
    terminal gets this terminal, in raw mode: Ctrl-P Ctrl-Q detaches.  The
    end of stdin is passed on (a container created with stdin_once sees its
    stdin end); then pouch attach detaches once the container has been
    quiet for a second.  Detaching leaves the container running: exit 0.
    """
    container_id = resolve_container(client, container)
    tty = container_tty(client.container_status(container_id, verbose=True).info)
    stdin = not no_stdin
    url = client.attach(container_id, tty=tty, stdin=stdin, stdout=True, stderr=not tty)
    keys = tty and stdin and os.isatty(0)
    try:
        result = stream_session(
            url,
            stdin=stdin,
            tty=tty,
            transport=transport,
            detach_keys=keys,
            linger_after_stdin=ATTACH_LINGER,
        )
    except BrokenPipeError:
        _silence_stdout()
        return SIGPIPE_STATUS
    if result.detached:
        return 0
    status = result.status
    assert status is not None
    if not status.success:
        click.echo(f"pouch: {status.message}", err=True)
        return status.code
    return wait_exit_code(client, container_id)


@pouch_cli.command("port-forward")
@click.option(
    "--address", default="127.0.0.1", show_default=True, help="The local address to listen on."
)
@click.option(
    "--transport",
    type=click.Choice(STREAM_TRANSPORTS),
    default="spdy",
    show_default=True,
    help="SPDY/3.1 on the upgraded connection, or SPDY tunnelled in WebSocket.",
)
@click.argument("pod")
@click.argument("ports", nargs=-1, required=True, callback=port_mappings)
@click.pass_obj
def port_forward_command(
    client: Client, address: str, transport: str, pod: str, ports: list[tuple[int, int]]
) -> int:
    """Forward local ports to a pod's ports until interrupted (Ctrl-C).

    POD is a pod sandbox's id, a unique prefix of one, or a ready pod's
    name.  PORTS are LOCAL:REMOTE, :REMOTE (any free local port) or PORT
    (the same on both sides).  Every local connection is a new connection
    to the port in the pod, in the pod's network namespace, over one
    session with pouchd's stream server.
    """
    from pouch.stream import client as sc

    pod_id = resolve_pod(client, pod)
    url = client.port_forward(pod_id)

    def listening(host: str, local: int, remote: int) -> None:
        shown = f"[{host}]" if ":" in host else host
        click.echo(f"Forwarding from {shown}:{local} -> {remote}")

    def failed(port: int, message: str) -> None:
        click.echo(f"pouch: error forwarding port {port}: {message}", err=True)

    async def forward() -> None:
        await sc.port_forward(
            url,
            ports,
            address=address,
            transport="websocket" if transport == "websocket" else "spdy",
            on_listening=listening,
            on_error=failed,
        )

    try:
        run_trio(forward)
    except KeyboardInterrupt:
        return 0
    except sc.StreamClientError as exc:
        raise PouchError(str(exc)) from None
    except OSError as exc:
        raise PouchError(f"cannot listen on {address}: {exc.strerror or exc}") from None
    return 0


@pouch_cli.command("version")
@click.pass_obj
def version_command(client: Client) -> int:
    """Print the client's and the daemon's versions."""
    response = client.version()
    click.echo(f"ClientVersion:  {__version__}")
    click.echo(f"Version:  {response.version}")
    click.echo(f"RuntimeName:  {response.runtime_name}")
    click.echo(f"RuntimeVersion:  {response.runtime_version}")
    click.echo(f"RuntimeApiVersion:  {response.runtime_api_version}")
    return 0


def pouch_main(argv: list[str] | None = None) -> int:
    """Entry point of ``pouch``, the command-line client; returns the exit status.

    A failed call prints ``pouch: <the daemon's message>`` and exits 1.
    """
    from pouch.cri.client import ClientError

    try:
        result = pouch_cli.main(args=argv, prog_name="pouch", standalone_mode=False)
    except ClientError as exc:
        click.echo(f"pouch: {exc.details}", err=True)
        return 1
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except click.Abort as exc:
        if isinstance(exc.__cause__, KeyboardInterrupt):
            return 130  # as a shell reports SIGINT
        click.echo("pouch: aborted", err=True)
        return 1
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(pouch_main())
