"""A local world for runtime benchmarks: a registry, a private pouchd, a private containerd.

    with World(log=print) as world:
        for runtime in world.runtimes:      # pouchd first, containerd last (the reference)
            print(runtime.label, runtime.address, runtime.cgroup_parent)
        print(world.busybox_ref)            # 127.0.0.1:PORT/library/busybox:latest

Everything lives under one temporary directory (``/tmp/pouch-bench-XXXXXXXX``,
short enough for unix socket paths) and is removed on exit, together with
whatever the daemons left outside it.  Nothing is fetched from the network:

* **registry**: :class:`tests.support.registry.Registry` (Debian's
  ``docker-registry`` behind a proxy on ``127.0.0.1:PORT``) holding
  ``library/busybox:latest`` (:func:`tests.support.images.busybox_image`) and
  ``pause:latest``, one layer with Debian's static ``/usr/bin/catatonit`` as
  ``/pause`` and ``Entrypoint ["/pause", "-P"]``: containerd needs a sandbox
  image and cannot reach registry.k8s.io.
* **pouchd** (label ``pouch``): ``pouchd --root --state --socket --config``
  with ``[registry] insecure = ["127.0.0.1:PORT"]`` and its default cgroup
  parent under the world's tag; ready when Version answers.
* **containerd** (label ``containerd``): Debian's ``containerd`` (1.6, CRI
  plugin built in) with a version 2 ``config.toml`` whose root, state, gRPC and
  ttrpc sockets, runc root (``Root`` of the runc v2 shim), ``/opt`` plugin
  path, registry hosts (``config_path``: the registry over plain HTTP), CNI
  configuration and IPAM data are all inside the temporary directory; cgroupfs
  (``SystemdCgroup = false``), ``restrict_oom_score_adj = true`` (no
  CAP_SYS_RESOURCE needed), unprivileged ports and ICMP off, network
  namespaces under its state directory, sandbox image ``127.0.0.1:PORT/pause``.
  CNI: Debian's ``containernetworking-plugins`` from ``/usr/lib/cni``, one
  ``bridge`` network (a bridge named for the world, ``host-local`` IPAM on a
  private /16, no IP masquerade); containerd adds ``loopback`` itself.

Both runtimes pull busybox (and containerd the pause image) from the registry
before :meth:`World.__enter__` returns.  Every runtime gets its own cgroup
parent, ``/<tag>/<label>``, which a benchmark passes in each pod's
``cgroup_parent`` as a kubelet would.

Teardown (also after a failed start, or ^C): remove every pod through CRI,
SIGTERM the daemons (SIGKILL after a grace period), SIGKILL any monitor
(conmon, containerd-shim-runc-v2) or container process still running from the
world (by command line, and by the world's cgroups), remove the cgroups,
unmount everything under the temporary directory, delete network namespaces,
the bridge with its veths, iptables rules and chains naming the CNI network,
shim sockets containerd puts in ``/run/containerd/s`` (and that directory if
the world created it), stop the registry and delete the temporary directory.
:meth:`World.leftovers` lists anything that survived.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Final, Self

import grpc
from cri_api.v1 import api_pb2, api_pb2_grpc

from pouch.network import netns as pouch_netns
from tests.support.images import LayerBuilder, build_image, busybox_image
from tests.support.registry import Registry, push

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Sequence
    from types import TracebackType

    from tests.support.images import Image

CATATONIT: Final = Path("/usr/bin/catatonit")
CONTAINERD: Final = Path("/usr/bin/containerd")
RUNC: Final = Path("/usr/sbin/runc")
CNI_BIN_DIR: Final = Path("/usr/lib/cni")
CNI_PLUGINS: Final = ("bridge", "host-local", "loopback")
CNI_SUBNET: Final = "10.99.0.0/16"
BUSYBOX_REPO: Final = "library/busybox"
PAUSE_REPO: Final = "pause"
TAG_PREFIX: Final = "pouch-bench-"
CGROUP_ROOT: Final = Path("/sys/fs/cgroup")
NETNS_DIR: Final = Path("/run/netns")
CONTAINERD_RUN: Final = Path("/run/containerd")  # shim sockets go to <this>/s, whatever the config
CNI_VAR: Final = Path("/var/lib/cni")
#: Executables (argv[0] base names) that monitor one container or pod.
MONITOR_NAMES: Final = frozenset(
    {"conmon", "containerd-shim", "containerd-shim-runc-v1", "containerd-shim-runc-v2"}
)
READY_TIMEOUT: Final = 60.0
STOP_GRACE: Final = 20.0
CALL_TIMEOUT: Final = 60.0


class WorldError(RuntimeError):
    """A part of the world could not be started; the message says which and why."""


def _rpc_error(exc: grpc.RpcError) -> str:
    if isinstance(exc, grpc.Call):
        return f"{exc.code().name}: {exc.details()}"
    return str(exc)


# ---------------------------------------------------------------------------
# Processes


@dataclass(frozen=True)
class Process:
    pid: int
    ppid: int
    argv: tuple[str, ...]

    @property
    def name(self) -> str:
        return os.path.basename(self.argv[0]) if self.argv else ""


def processes() -> list[Process]:
    """Every process this one can see (kernel threads, with no argv, left out)."""
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                raw = f.read()
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue  # gone meanwhile
        if not raw:
            continue
        argv = tuple(part.decode(errors="replace") for part in raw.rstrip(b"\0").split(b"\0"))
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses.
        ppid = int(stat[stat.rindex(b")") + 2 :].split()[1])
        found.append(Process(int(entry.name), ppid, argv))
    return found


def mentions(argv: Iterable[str], marks: Iterable[str]) -> bool:
    """Whether an argument (or the value of ``--opt=value``) is a mark or a path under one."""
    marks = tuple(m.rstrip("/") for m in marks if m)
    for arg in argv:
        for token in (arg, arg.partition("=")[2]):
            if token and any(token == m or token.startswith(m + "/") for m in marks):
                return True
    return False


def monitors(marks: Sequence[str], procs: Sequence[Process] | None = None) -> list[Process]:
    """conmon and containerd shims whose command line names one of ``marks``."""
    procs = processes() if procs is None else procs
    return [p for p in procs if p.name in MONITOR_NAMES and mentions(p.argv, marks)]


def descendants(pid: int, procs: Sequence[Process]) -> list[Process]:
    children: dict[int, list[Process]] = {}
    for p in procs:
        children.setdefault(p.ppid, []).append(p)
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child.pid)
    return out


@dataclass(frozen=True)
class Memory:
    """Memory of a set of processes, in bytes, from ``/proc/<pid>/smaps_rollup``."""

    processes: int = 0
    rss: int = 0
    pss: int = 0
    uss: int = 0  # Private_Clean + Private_Dirty

    def __add__(self, other: Memory) -> Memory:
        return Memory(
            self.processes + other.processes,
            self.rss + other.rss,
            self.pss + other.pss,
            self.uss + other.uss,
        )

    def to_json(self) -> dict[str, int]:
        return {"processes": self.processes, "rss": self.rss, "pss": self.pss, "uss": self.uss}


_ROLLUP = re.compile(r"^(Rss|Pss|Private_Clean|Private_Dirty):\s+(\d+) kB", re.MULTILINE)


def memory_of(pid: int) -> Memory:
    """One process's RSS, PSS and USS; an empty :class:`Memory` if it is gone."""
    try:
        with open(f"/proc/{pid}/smaps_rollup", encoding="ascii") as f:
            text = f.read()
    except OSError:
        return Memory()
    kib = dict.fromkeys(("Rss", "Pss", "Private_Clean", "Private_Dirty"), 0)
    for key, value in _ROLLUP.findall(text):
        kib[key] += int(value)
    if not text:
        return Memory()
    return Memory(
        1,
        kib["Rss"] * 1024,
        kib["Pss"] * 1024,
        (kib["Private_Clean"] + kib["Private_Dirty"]) * 1024,
    )


def memory_sum(pids: Iterable[int]) -> Memory:
    total = Memory()
    for pid in pids:
        total += memory_of(pid)
    return total


def socket_owner(path: str | os.PathLike[str]) -> int | None:
    """The lowest pid holding a unix socket bound to ``path`` (the daemon), or None."""
    target = os.fspath(path)
    inodes = set()
    try:
        with open("/proc/net/unix", encoding="utf-8", errors="replace") as f:
            next(f)
            for line in f:
                parts = line.split()
                if len(parts) >= 8 and parts[7] == target:
                    inodes.add(f"socket:[{parts[6]}]")
    except OSError:
        return None
    if not inodes:
        return None
    owners = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            for fd in os.scandir(f"/proc/{entry.name}/fd"):
                with contextlib.suppress(OSError):
                    if os.readlink(fd.path) in inodes:
                        owners.append(int(entry.name))
                        break
    return min(owners) if owners else None


def _kill_and_reap(pids: Iterable[int], timeout: float = 10.0) -> None:
    """SIGKILL ``pids`` and wait (bounded) until they are gone."""
    pending = set()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
            pending.add(pid)
    deadline = time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        for pid in list(pending):
            with contextlib.suppress(ChildProcessError, OSError):
                os.waitpid(pid, os.WNOHANG)  # ours: reap; not ours: ECHILD
            if not Path(f"/proc/{pid}").exists() or _is_zombie(pid):
                pending.discard(pid)
        time.sleep(0.05)


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return True
    return stat[stat.rindex(b")") + 2 : stat.rindex(b")") + 3] == b"Z"


# ---------------------------------------------------------------------------
# Mounts, cgroups, network


_libc = ctypes.CDLL(None, use_errno=True)
MNT_DETACH: Final = 2


def _unescape_mount(path: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), path)


def mounts_under(base: Path) -> list[str]:
    """Mount points at or below ``base`` (this mount namespace), deepest first."""
    prefix = str(base).rstrip("/") + "/"
    found = []
    with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
        for line in f:
            point = _unescape_mount(line.split()[4])
            if point == str(base) or point.startswith(prefix):
                found.append(point)
    return sorted(set(found), key=lambda p: (-p.count("/"), p))


def unmount(path: str) -> None:
    """umount2(path, MNT_DETACH); a path that is no longer mounted is fine."""
    if _libc.umount2(os.fsencode(path), MNT_DETACH) != 0:
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOENT):
            raise OSError(err, f"umount {path}: {os.strerror(err)}")


def cgroup_hierarchies() -> list[Path]:
    """Every mounted cgroup hierarchy (v1 controllers, named ones, and v2)."""
    found = []
    with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            if right.split()[0] in ("cgroup", "cgroup2"):
                found.append(Path(_unescape_mount(left.split()[4])))
    return sorted(set(found))


def cgroup_dirs(tag: str) -> list[Path]:
    return [h / tag for h in cgroup_hierarchies() if (h / tag).is_dir()]


def remove_cgroups(tag: str, timeout: float = 10.0) -> None:
    """Kill every process in the ``/<tag>`` cgroups, then remove them bottom-up."""
    deadline = time.monotonic() + timeout
    for top in cgroup_dirs(tag):
        while True:
            dirs = sorted((Path(d) for d, _, _ in os.walk(top)), key=lambda p: -len(p.parts))
            pids: set[int] = set()
            for d in dirs:
                with contextlib.suppress(OSError):
                    pids.update(int(x) for x in (d / "cgroup.procs").read_text().split())
            _kill_and_reap(pids, timeout=max(0.1, deadline - time.monotonic()))
            for d in dirs:
                with contextlib.suppress(OSError):
                    d.rmdir()
            if not top.exists() or time.monotonic() > deadline:
                break
            time.sleep(0.1)


def _run(argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)


def link_exists(name: str) -> bool:
    return Path("/sys/class/net", name).exists()


def remove_bridge(name: str) -> None:
    """Delete the veths enslaved to bridge ``name``, then the bridge."""
    if not link_exists(name):
        return
    brif = Path("/sys/class/net", name, "brif")
    for port in sorted(os.listdir(brif)) if brif.is_dir() else []:
        _run(["ip", "link", "del", port])
    _run(["ip", "link", "del", name])


def iptables_rules(needle: str) -> list[tuple[str, str, list[str]]]:
    """``(command, table, rule)`` for each iptables/ip6tables rule whose text has ``needle``.

    ``rule`` is the ``-A CHAIN ...`` line of ``*-save``, split like a shell would.
    """
    found = []
    for command in ("iptables", "ip6tables"):
        if shutil.which(f"{command}-save") is None:
            continue
        out = _run([f"{command}-save"])
        table = ""
        for line in out.stdout.splitlines():
            if line.startswith("*"):
                table = line[1:]
            elif line.startswith("-A ") and needle in line:
                found.append((command, table, shlex.split(line)))
    return found


def remove_iptables_rules(needle: str) -> None:
    """Delete rules naming ``needle`` (CNI puts the network name in a comment), and the
    ``CNI-*`` chains they jumped to."""
    chains: set[tuple[str, str, str]] = set()
    for command, table, rule in iptables_rules(needle):
        _run([command, "-t", table, "-D", *rule[1:]])
        if "-j" in rule:
            target = rule[rule.index("-j") + 1]
            if target.startswith("CNI-"):
                chains.add((command, table, target))
    for command, table, chain in chains:
        _run([command, "-t", table, "-F", chain])
        _run([command, "-t", table, "-X", chain])


# ---------------------------------------------------------------------------
# The world


@dataclass
class Runtime:
    """A CRI runtime of the world (or given on the command line)."""

    label: str
    address: str
    #: The daemon's pid, if known.
    pid: int | None = None
    #: Paths: a monitor process whose command line names one belongs to this runtime.
    marks: tuple[str, ...] = ()
    #: The ``cgroup_parent`` to put pods in; None: the runtime's default.
    cgroup_parent: str | None = None
    log_path: Path | None = None
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def logs(self, lines: int = 40) -> str:
        if self.log_path is None:
            return ""
        with contextlib.suppress(OSError):
            text = self.log_path.read_text(errors="replace")
            return "\n".join(text.splitlines()[-lines:])
        return ""


def pause_image() -> Image:
    """``/pause`` = Debian's static catatonit, ``Entrypoint ["/pause", "-P"]``, no Cmd."""
    try:
        binary = CATATONIT.read_bytes()
    except FileNotFoundError:
        raise WorldError(f"{CATATONIT} is missing: apt-get install -y catatonit") from None
    layer = LayerBuilder().file("pause", binary, mode=0o755).build()
    return build_image(
        [layer], config={"Entrypoint": ["/pause", "-P"], "Cmd": None}, history=["pause"]
    )


def _toml(value: object) -> str:
    """A TOML value: JSON strings, booleans, numbers and arrays of them are TOML too."""
    return json.dumps(value)


def containerd_config(
    base: Path, *, sandbox_image: str, certs_dir: Path, cni_conf_dir: Path
) -> str:
    """containerd's config.toml (version 2) with every path under ``base``."""
    cri = '[plugins."io.containerd.grpc.v1.cri"'
    lines = [
        "version = 2",
        f"root = {_toml(str(base / 'root'))}",
        f"state = {_toml(str(base / 'state'))}",
        "oom_score = 0",
        "disabled_plugins = "
        + _toml(
            [
                "io.containerd.snapshotter.v1.aufs",
                "io.containerd.snapshotter.v1.btrfs",
                "io.containerd.snapshotter.v1.devmapper",
                "io.containerd.snapshotter.v1.zfs",
            ]
        ),
        "",
        "[grpc]",
        f"  address = {_toml(str(base / 'containerd.sock'))}",
        "[ttrpc]",
        f"  address = {_toml(str(base / 'containerd.sock.ttrpc'))}",
        "[debug]",
        '  address = ""',
        '  level = "info"',
        "[metrics]",
        '  address = ""',
        "",
        '[plugins."io.containerd.internal.v1.opt"]',
        f"  path = {_toml(str(base / 'opt'))}",
        "",
        f"{cri}]",
        f"  sandbox_image = {_toml(sandbox_image)}",
        "  restrict_oom_score_adj = true",
        "  enable_unprivileged_ports = false",
        "  enable_unprivileged_icmp = false",
        "  netns_mounts_under_state_dir = true",
        "  disable_tcp_service = true",
        '  stream_server_address = "127.0.0.1"',
        '  stream_server_port = "0"',
        "  systemd_cgroup = false",
        "  max_concurrent_downloads = 3",
        f"{cri}.containerd]",
        '  snapshotter = "overlayfs"',
        '  default_runtime_name = "runc"',
        f"{cri}.containerd.runtimes.runc]",
        '  runtime_type = "io.containerd.runc.v2"',
        f"{cri}.containerd.runtimes.runc.options]",
        f"  BinaryName = {_toml(str(RUNC))}",
        f"  Root = {_toml(str(base / 'runc'))}",
        "  SystemdCgroup = false",
        f"{cri}.cni]",
        f"  bin_dir = {_toml(str(CNI_BIN_DIR))}",
        f"  conf_dir = {_toml(str(cni_conf_dir))}",
        "  max_conf_num = 1",
        f"{cri}.registry]",
        f"  config_path = {_toml(str(certs_dir))}",
        "",
    ]
    return "\n".join(lines)


def cni_conflist(name: str, bridge: str, ipam_dir: Path) -> str:
    """One bridge network with host-local IPAM on a private subnet, no masquerade."""
    return json.dumps(
        {
            "cniVersion": "0.4.0",
            "name": name,
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": bridge,
                    "isGateway": True,
                    "ipMasq": False,
                    "hairpinMode": True,
                    "ipam": {
                        "type": "host-local",
                        "ranges": [[{"subnet": CNI_SUBNET}]],
                        "dataDir": str(ipam_dir),
                    },
                }
            ],
        },
        indent=2,
    )


def _pouchd_argv() -> list[str]:
    script = Path(sys.executable).parent / "pouchd"
    if script.exists():
        return [str(script)]
    found = shutil.which("pouchd")
    return [found] if found else [sys.executable, "-m", "pouch"]


class World:
    """A registry, pouchd and (optionally) containerd, private to one benchmark run.

    Args:
        containerd: Also start containerd (last in :attr:`runtimes`).
        log: Progress messages.
        ready_timeout: Seconds each daemon gets to answer Version.
    """

    def __init__(
        self,
        *,
        containerd: bool = True,
        log: Callable[[str], None] = lambda _msg: None,
        ready_timeout: float = READY_TIMEOUT,
    ) -> None:
        self.with_containerd = containerd
        self.log = log
        self.ready_timeout = ready_timeout
        self.base: Path | None = None
        self.registry: Registry | None = None
        self.runtimes: list[Runtime] = []
        self.busybox_ref = ""
        self.pause_ref = ""
        self.cni_network = ""
        self.bridge = ""
        self.cni_conf = Path()
        # What the host had before, to tell our leftovers from its own things.
        self._netns_before: set[str] = set()
        #: /run/netns names of the world's pouchd pods, found at teardown (see _clean_host).
        self._pouch_netns: set[str] = set()
        self._containerd_run_existed = True
        self._shim_sockets_before: set[str] = set()
        self._cni_var_existed = True
        self._started: list[Runtime] = []  # every daemon spawned, even one that failed

    @property
    def tag(self) -> str:
        assert self.base is not None
        return self.base.name

    # -- lifecycle

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def start(self) -> None:
        if os.geteuid() != 0:
            raise WorldError("the world needs root (runc, mounts, cgroups)")
        with contextlib.suppress(OSError):
            self._netns_before = set(os.listdir(NETNS_DIR))
        self._containerd_run_existed = CONTAINERD_RUN.exists()
        with contextlib.suppress(OSError):
            self._shim_sockets_before = set(os.listdir(CONTAINERD_RUN / "s"))
        self._cni_var_existed = CNI_VAR.exists()
        # Short: unix socket paths must fit in 108 bytes.
        self.base = Path(tempfile.mkdtemp(prefix=TAG_PREFIX, dir="/tmp"))
        self.base.chmod(0o755)
        self.cni_network = self.tag
        self.bridge = "pbr" + secrets.token_hex(4)
        self.log(f"world: {self.base}")

        self._start_registry()
        # One CNI network for both runtimes: the same conflist, bridge and
        # host-local store (host-local locks it), so pod networking costs the
        # same plugin work on both sides.
        self.cni_conf = self.base / "cni"
        self.cni_conf.mkdir()
        (self.cni_conf / "10-pouch-bench.conflist").write_text(
            cni_conflist(self.cni_network, self.bridge, self.base / "cni-ipam")
        )
        self.runtimes.append(self._start_pouchd())
        if self.with_containerd:
            self.runtimes.append(self._start_containerd())
        for runtime in self.runtimes:
            refs = [self.busybox_ref] + ([self.pause_ref] if runtime.label == "containerd" else [])
            for ref in refs:
                t0 = time.monotonic()
                self._pull(runtime, ref)
                self.log(f"{runtime.label}: pulled {ref} in {time.monotonic() - t0:.2f} s")

    def _start_registry(self) -> None:
        registry = Registry()
        registry.start()
        self.registry = registry
        push(registry, BUSYBOX_REPO, "latest", busybox_image())
        push(registry, PAUSE_REPO, "latest", pause_image())
        self.busybox_ref = registry.ref(BUSYBOX_REPO)
        self.pause_ref = registry.ref(PAUSE_REPO)
        self.log(f"registry {registry.url}: {self.busybox_ref}, {self.pause_ref}")

    def _start_pouchd(self) -> Runtime:
        assert self.base is not None
        assert self.registry is not None
        home = self.base / "pouch"
        home.mkdir()
        config = home / "pouchd.toml"
        config.write_text(
            f"[registry]\ninsecure = [{_toml(self.registry.host)}]\n\n"
            f"[runtime]\ndefault_cgroup_parent = {_toml(f'/{self.tag}/pouch')}\n\n"
            f"[network]\nconf_dir = {_toml(str(self.cni_conf))}\nuse_default = false\n"
        )
        socket_path = home / "pouch.sock"
        argv = [
            *_pouchd_argv(),
            "--root",
            str(home / "root"),
            "--state",
            str(home / "state"),
            "--socket",
            str(socket_path),
            "--config",
            str(config),
        ]
        runtime = Runtime(
            "pouch",
            f"unix://{socket_path}",
            marks=(str(home),),
            cgroup_parent=f"/{self.tag}/pouch",
            log_path=home / "pouchd.log",
        )
        self._spawn(runtime, argv)
        return runtime

    def _start_containerd(self) -> Runtime:
        assert self.base is not None
        assert self.registry is not None
        if not CONTAINERD.exists():
            raise WorldError(f"{CONTAINERD} is missing: apt-get install -y containerd")
        missing = [p for p in CNI_PLUGINS if not (CNI_BIN_DIR / p).exists()]
        if missing:
            raise WorldError(
                f"CNI plugins {missing} missing from {CNI_BIN_DIR}: "
                "apt-get install -y containernetworking-plugins"
            )
        home = self.base / "containerd"
        home.mkdir()
        host = self.registry.host
        certs = home / "certs.d"
        (certs / host).mkdir(parents=True)
        (certs / host / "hosts.toml").write_text(
            f"server = {_toml(self.registry.url)}\n\n"
            f"[host.{_toml(self.registry.url)}]\n"
            '  capabilities = ["pull", "resolve"]\n'
        )
        cni_conf = self.cni_conf
        config = home / "config.toml"
        config.write_text(
            containerd_config(
                home, sandbox_image=self.pause_ref, certs_dir=certs, cni_conf_dir=cni_conf
            )
        )
        runtime = Runtime(
            "containerd",
            f"unix://{home / 'containerd.sock'}",
            marks=(str(home),),
            cgroup_parent=f"/{self.tag}/containerd",
            log_path=home / "containerd.log",
        )
        self._spawn(runtime, [str(CONTAINERD), "--config", str(config)])
        return runtime

    def _spawn(self, runtime: Runtime, argv: list[str]) -> None:
        assert runtime.log_path is not None
        with runtime.log_path.open("ab") as log:
            runtime.proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # ^C reaches the benchmark, which stops the daemon
            )
        runtime.pid = runtime.proc.pid
        self._started.append(runtime)
        t0 = time.monotonic()
        version = self._wait_ready(runtime)
        self.log(
            f"{runtime.label}: {version.runtime_name} {version.runtime_version} ready in "
            f"{time.monotonic() - t0:.2f} s at {runtime.address} (pid {runtime.pid})"
        )

    def _wait_ready(self, runtime: Runtime) -> api_pb2.VersionResponse:
        assert runtime.proc is not None
        deadline = time.monotonic() + self.ready_timeout
        path = Path(runtime.address.removeprefix("unix://"))
        last = ""
        while True:
            if runtime.proc.poll() is not None:
                raise WorldError(
                    f"{runtime.label} exited with {runtime.proc.returncode}:\n{runtime.logs()}"
                )
            if path.exists():
                with grpc.insecure_channel(runtime.address) as channel:
                    try:
                        return api_pb2_grpc.RuntimeServiceStub(channel).Version(
                            api_pb2.VersionRequest(version="0.1.0"), timeout=2
                        )
                    except grpc.RpcError as exc:
                        last = _rpc_error(exc)
            if time.monotonic() > deadline:
                raise WorldError(
                    f"{runtime.label} did not answer Version within {self.ready_timeout:g} s "
                    f"({last or 'no socket'}):\n{runtime.logs()}"
                )
            time.sleep(0.05)

    def _pull(self, runtime: Runtime, ref: str) -> None:
        with grpc.insecure_channel(runtime.address) as channel:
            stub = api_pb2_grpc.ImageServiceStub(channel)
            try:
                stub.PullImage(
                    api_pb2.PullImageRequest(image=api_pb2.ImageSpec(image=ref)),
                    timeout=CALL_TIMEOUT,
                )
            except grpc.RpcError as exc:
                raise WorldError(
                    f"{runtime.label} cannot pull {ref}: {_rpc_error(exc)}\n{runtime.logs()}"
                ) from exc

    # -- teardown

    def close(self) -> None:
        """Tear everything down; idempotent, never raises for a leftover (see leftovers)."""
        for runtime in self._started:
            if runtime.proc is not None and runtime.proc.poll() is None:
                self._remove_pods(runtime)
        for runtime in self._started:
            self._stop_daemon(runtime)
        self._started = []
        if self.base is not None:
            self._clean_host()
        if self.registry is not None:
            self.registry.stop()
            self.registry = None
        if self.base is not None:
            shutil.rmtree(self.base, ignore_errors=True)
            self.log(f"world: removed {self.base}")

    def _remove_pods(self, runtime: Runtime, budget: float = 120.0) -> None:
        """Stop and remove every pod and container through CRI (all of them are ours)."""
        deadline = time.monotonic() + budget
        try:
            with grpc.insecure_channel(runtime.address) as channel:
                stub = api_pb2_grpc.RuntimeServiceStub(channel)
                for c in stub.ListContainers(
                    api_pb2.ListContainersRequest(), timeout=30
                ).containers:
                    if time.monotonic() > deadline:
                        return
                    with contextlib.suppress(grpc.RpcError):
                        stub.StopContainer(
                            api_pb2.StopContainerRequest(container_id=c.id, timeout=0), timeout=30
                        )
                        stub.RemoveContainer(
                            api_pb2.RemoveContainerRequest(container_id=c.id), timeout=30
                        )
                pods = stub.ListPodSandbox(api_pb2.ListPodSandboxRequest(), timeout=30).items
                for pod in pods:
                    if time.monotonic() > deadline:
                        return
                    with contextlib.suppress(grpc.RpcError):
                        stub.StopPodSandbox(
                            api_pb2.StopPodSandboxRequest(pod_sandbox_id=pod.id), timeout=30
                        )
                        stub.RemovePodSandbox(
                            api_pb2.RemovePodSandboxRequest(pod_sandbox_id=pod.id), timeout=30
                        )
                if pods:
                    self.log(f"{runtime.label}: removed {len(pods)} leftover pod(s)")
        except grpc.RpcError as exc:
            self.log(f"{runtime.label}: cannot list pods at teardown: {exc}")

    def _stop_daemon(self, runtime: Runtime) -> None:
        proc = runtime.proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(STOP_GRACE)
            except subprocess.TimeoutExpired:
                self.log(f"{runtime.label}: no exit {STOP_GRACE:g} s after SIGTERM: SIGKILL")
                proc.kill()
                proc.wait(10)
        runtime.proc = None

    def _clean_host(self) -> None:
        assert self.base is not None
        base = str(self.base)
        # Monitors and anything else still running from the world's directory.
        procs = processes()
        strays = [p.pid for p in procs if p.pid != os.getpid() and mentions(p.argv, [base])]
        if strays:
            self.log(f"world: killing {len(strays)} leftover process(es): {strays}")
            _kill_and_reap(strays)
        # Container processes whose monitor is gone live on in the world's cgroups.
        remove_cgroups(self.tag)
        for point in mounts_under(self.base):
            try:
                unmount(point)
            except OSError as exc:
                self.log(f"world: {exc}")
        # containerd puts network namespaces under its state dir (unmounted above);
        # a cni-* one in /run/netns would come from a configuration that does not.
        # pouchd pins each pod's as /run/netns/pouch-<id[:16]> and unpins it when
        # the pod goes, but not when it is killed with pods left (a pod half made
        # by a hung RunPodSandbox, say): the pod directories under its root and
        # state name them.  Only new entries of those names are ours to remove
        # (another pouchd on the host has its own).
        self._pouch_netns = self._world_pouch_netns()
        with contextlib.suppress(OSError):
            for name in set(os.listdir(NETNS_DIR)) - self._netns_before:
                if name.startswith("cni-") or name in self._pouch_netns:
                    with contextlib.suppress(OSError):
                        unmount(str(NETNS_DIR / name))
                        (NETNS_DIR / name).unlink()
        if self.bridge:
            remove_bridge(self.bridge)
        if self.cni_network:
            remove_iptables_rules(self.cni_network)
        if not self._cni_var_existed:
            shutil.rmtree(CNI_VAR, ignore_errors=True)
        # containerd 1.6 puts shim sockets in /run/containerd/s whatever its state dir.
        shim_dir = CONTAINERD_RUN / "s"
        with contextlib.suppress(OSError):
            for name in set(os.listdir(shim_dir)) - self._shim_sockets_before:
                with contextlib.suppress(OSError):
                    (shim_dir / name).unlink()
        if not self._containerd_run_existed:
            for d in (shim_dir, CONTAINERD_RUN):
                with contextlib.suppress(OSError):
                    d.rmdir()

    def _world_pouch_netns(self) -> set[str]:
        """The /run/netns names pouchd gives the pods it has directories for."""
        assert self.base is not None
        home = self.base / "pouch"
        names = set()
        for pods in (home / "root" / "sandboxes", home / "state" / "sandboxes"):
            with contextlib.suppress(OSError):
                names.update(pouch_netns.name_for(entry.name) for entry in os.scandir(pods))
        return names

    def leftovers(self) -> list[str]:
        """Anything of the world still on the host after :meth:`close` (empty: clean)."""
        if self.base is None:
            return []
        base = str(self.base)
        found = []
        for p in processes():
            if p.pid != os.getpid() and mentions(p.argv, [base]):
                found.append(f"process {p.pid}: {' '.join(p.argv)[:200]}")
        found += [f"mount {m}" for m in mounts_under(self.base)]
        found += [f"cgroup {d}" for d in cgroup_dirs(self.tag)]
        if self.base.exists():
            found.append(f"directory {self.base}")
        with contextlib.suppress(OSError):
            found += [
                f"netns {NETNS_DIR / n}"
                for n in sorted(set(os.listdir(NETNS_DIR)) - self._netns_before)
                if n.startswith("cni-") or n in self._pouch_netns
            ]
        if self.bridge and link_exists(self.bridge):
            found.append(f"bridge {self.bridge}")
        if self.cni_network:
            found += [
                f"{cmd} -t {table} {shlex.join(rule)}"
                for cmd, table, rule in iptables_rules(self.cni_network)
            ]
        if not self._containerd_run_existed and CONTAINERD_RUN.exists():
            found.append(f"directory {CONTAINERD_RUN}")
        if not self._cni_var_existed and CNI_VAR.exists():
            found.append(f"directory {CNI_VAR}")
        return found


def runtime_monitors(runtime: Runtime, procs: Sequence[Process] | None = None) -> list[Process]:
    return monitors(runtime.marks, procs)
