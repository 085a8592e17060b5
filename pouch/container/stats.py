"""Resource usage of containers and pods: cgroups, writable layers, network.

Everything here is domain-level (no protobuf); ``cri/`` turns it into the
cri-api ``ContainerStats``, ``PodSandboxStats`` and ``PodSandboxMetrics``.

Sampling is meant to be cheap enough for the kubelet to call every few
seconds on a node with a few hundred containers:

- cgroup files are read in one worker-thread call per request, with plain
  ``open``/``read`` on the cgroupfs files (no ``/proc`` walks);
- a writable layer's size is a directory walk, cached for a few seconds so
  that ``ListContainerStats``, ``ListPodSandboxStats`` and
  ``ListPodSandboxMetrics`` in one kubelet cycle share one walk;
- network counters are read by a throwaway thread that enters each pod's
  network namespace (setns) and reads the kernel's per-interface counters
  there; nothing forks (forking a multi-threaded daemon can deadlock).

``usage_nano_cores`` is the rate between two samples, which the runtime and
not the kubelet computes (cri-api CpuUsage; containerd keeps the previous
sample per container, as `StatsSampler` does).

Cgroup layouts (runc's, for the OCI ``linux.cgroupsPath``)::

    v1  /sys/fs/cgroup/<controller>/<path>   cpuacct may be joined: cpu,cpuacct
        /sys/fs/cgroup/unified/<path>        hybrid hosts: PSI only
    v2  /sys/fs/cgroup/<path>                detected by cgroup.controllers

A ``slice:prefix:name`` path (systemd driver) is expanded as runc does:
``a-b.slice:pouch:ID`` -> ``/a.slice/a-b.slice/pouch-ID.scope``.
"""

from __future__ import annotations

import contextlib
import enum
import os
import posixpath
import stat as stat_mod
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Self, TypeVar

import attrs
import trio

from pouch.log import get_logger
from pouch.network.netns import enter_netns, in_new_thread

if TYPE_CHECKING:
    from types import TracebackType

    from pouch.container.manager import Container, ContainerManager, Sandbox

log = get_logger("pouch.stats")

T = TypeVar("T")

CGROUP_ROOT: Final = Path("/sys/fs/cgroup")
#: cri-api NetworkUsage.default_interface: the CNI convention (containerd, cri-o).
DEFAULT_INTERFACE: Final = "eth0"
#: How long a writable layer's measured size is reused.
FS_CACHE_TTL: Final = 5.0
#: The shortest window ``usage_nano_cores`` is computed over; a sample that
#: comes sooner reuses the last rate, so a burst of calls does not turn the
#: rate into noise over a few milliseconds.
CPU_RATE_WINDOW: Final = 1.0
#: A namespace handle unused for this long is closed.
NETNS_IDLE: Final = 60.0
#: Rate anchors and cache entries not touched for this long are dropped.
STALE_AFTER: Final = 600.0
#: v1 reports "no limit" as PAGE_COUNTER_MAX pages (0x7FFFFFFFFFFFF000 with
#: 4 KiB pages); anything this large is no limit.
_V1_UNLIMITED: Final = 1 << 62
_NS: Final = 1_000_000_000


class CgroupVersion(enum.IntEnum):
    V1 = 1
    V2 = 2


# ---- domain types ---------------------------------------------------------------------


@attrs.frozen
class PsiData:
    """One line of a ``*.pressure`` file; ``total_ns`` is the kernel's µs x 1000."""

    total_ns: int
    avg10: float
    avg60: float
    avg300: float


@attrs.frozen
class Psi:
    """cri-api PsiStats: ``some`` and ``full`` (cpu ``full`` needs kernel 5.13+)."""

    some: PsiData | None = None
    full: PsiData | None = None


@attrs.frozen
class CgroupSample:
    """Raw readings of one cgroup; ``None`` where the kernel has no such file."""

    timestamp_ns: int
    monotonic_ns: int
    cpu_usage_ns: int | None = None
    cpu_user_ns: int | None = None
    cpu_system_ns: int | None = None
    memory_usage: int | None = None
    memory_working_set: int | None = None
    memory_rss: int | None = None
    memory_cache: int | None = None
    page_faults: int | None = None
    major_page_faults: int | None = None
    #: ``None``: no limit.
    memory_limit: int | None = None
    memory_failcnt: int | None = None
    oom_kills: int | None = None
    swap_usage: int | None = None
    swap_limit: int | None = None
    #: pids.current: tasks (threads), hierarchical.
    tasks: int | None = None
    #: Lines of cgroup.procs: processes in this cgroup itself.
    processes: int | None = None
    cpu_psi: Psi | None = None
    memory_psi: Psi | None = None
    io_psi: Psi | None = None


@attrs.frozen
class CpuStats:
    timestamp_ns: int
    usage_core_ns: int
    #: ``None`` until two samples at least `CPU_RATE_WINDOW` apart exist.
    usage_nano_cores: int | None
    user_ns: int | None = None
    system_ns: int | None = None
    psi: Psi | None = None


@attrs.frozen
class MemoryStats:
    timestamp_ns: int
    usage_bytes: int
    working_set_bytes: int
    #: limit - working set, when there is a limit.
    available_bytes: int | None = None
    rss_bytes: int | None = None
    cache_bytes: int | None = None
    page_faults: int | None = None
    major_page_faults: int | None = None
    limit_bytes: int | None = None
    failcnt: int | None = None
    oom_kills: int | None = None
    psi: Psi | None = None


@attrs.frozen
class SwapStats:
    timestamp_ns: int
    usage_bytes: int
    available_bytes: int | None = None


@attrs.frozen
class IoStats:
    timestamp_ns: int
    psi: Psi


@attrs.frozen
class ProcessStats:
    timestamp_ns: int
    #: pids.current, what containerd and cri-o report as ``process_count``.
    process_count: int
    #: Processes (thread-group leaders) in the cgroup itself, if read.
    processes: int | None = None


@attrs.frozen
class FilesystemStats:
    """The writable layer: what it uses, and the filesystem it lives on."""

    timestamp_ns: int
    mountpoint: str
    device: str
    used_bytes: int
    inodes_used: int
    capacity_bytes: int = 0
    available_bytes: int = 0
    inodes_total: int = 0
    inodes_free: int = 0


@attrs.frozen
class InterfaceStats:
    name: str
    rx_bytes: int
    rx_errors: int
    tx_bytes: int
    tx_errors: int
    rx_packets: int = 0
    tx_packets: int = 0
    rx_dropped: int = 0
    tx_dropped: int = 0


@attrs.frozen
class NetworkStats:
    timestamp_ns: int
    default_interface: InterfaceStats | None
    #: Every other interface except ``lo`` (cri-api NetworkUsage.interfaces).
    interfaces: tuple[InterfaceStats, ...] = ()

    def all_interfaces(self) -> tuple[InterfaceStats, ...]:
        head = (self.default_interface,) if self.default_interface is not None else ()
        return head + self.interfaces


@attrs.frozen
class ContainerStats:
    container_id: str
    cpu: CpuStats | None = None
    memory: MemoryStats | None = None
    swap: SwapStats | None = None
    io: IoStats | None = None
    process: ProcessStats | None = None
    writable_layer: FilesystemStats | None = None


@attrs.frozen
class PodStats:
    sandbox_id: str
    timestamp_ns: int
    cpu: CpuStats | None = None
    memory: MemoryStats | None = None
    swap: SwapStats | None = None
    io: IoStats | None = None
    process: ProcessStats | None = None
    network: NetworkStats | None = None
    containers: tuple[ContainerStats, ...] = ()


@attrs.frozen
class SpecLimits:
    """The resources a container was created with (``linux.resources``); 0 is unset."""

    memory_limit: int = 0
    cpu_shares: int = 0
    cpu_quota: int = 0
    cpu_period: int = 0


@attrs.frozen
class ContainerTarget:
    """What the sampler needs to know about one container."""

    container_id: str
    cgroups_path: str
    upper_dir: Path | None = None
    name: str = ""
    image: str = ""
    #: Wall-clock ns; 0: never started.
    started_at: int = 0
    limits: SpecLimits = SpecLimits()


@attrs.frozen
class PodTarget:
    sandbox_id: str
    #: The infra container's cgroup (added to the sum without a pod cgroup).
    cgroups_path: str
    #: The pod's own cgroup (the parent of its containers'), when it has one.
    pod_cgroup: str | None = None
    netns_path: str | None = None
    containers: tuple[ContainerTarget, ...] = ()
    started_at: int = 0


# ---- cgroup files -----------------------------------------------------------------------


def _read(path: str) -> str | None:
    """The text of a cgroup file; ``None`` if it is absent or unreadable.

    Unbuffered ``open``: one ``read`` for a small file, and no ``Path``
    objects on the hot path.
    """
    try:
        with open(path, "rb", buffering=0) as f:
            return f.read().decode("ascii", "replace")
    except OSError:
        # ENOENT (no such controller or cgroup gone), ENODEV, EOPNOTSUPP
        # (PSI disabled with psi=0 on older kernels).
        return None


def _read_int(path: str) -> int | None:
    text = _read(path)
    if text is None:
        return None
    try:
        return int(text.split()[0])
    except (ValueError, IndexError):
        return None


def _read_limit(path: str) -> int | None:
    """A limit file: ``None`` for "max", the v1 "unlimited" value, or no file."""
    text = _read(path)
    if text is None:
        return None
    text = text.strip()
    if text == "max":
        return None
    try:
        value = int(text)
    except ValueError:
        return None
    return None if value >= _V1_UNLIMITED else value


def parse_flat_keyed(text: str | None) -> dict[str, int]:
    """``key value`` lines (memory.stat, cpu.stat, memory.events, oom_control)."""
    if not text:
        return {}
    words = text.split()
    try:
        # The hot path (memory.stat has ~40 lines): pairs of words.  A line
        # that is not "key int" shifts a key into a value and lands below.
        return dict(zip(words[::2], map(int, words[1::2]), strict=True))
    except ValueError:
        pass
    out: dict[str, int] = {}
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        with contextlib.suppress(ValueError):
            out[key] = int(value)
    return out


def parse_psi(text: str | None) -> Psi | None:
    """``some avg10=0.12 avg60=0.00 avg300=0.00 total=123`` and a ``full`` line."""
    if not text:
        return None
    lines: dict[str, PsiData] = {}
    for line in text.splitlines():
        kind, _, rest = line.partition(" ")
        fields = dict(f.split("=", 1) for f in rest.split() if "=" in f)
        try:
            lines[kind] = PsiData(
                total_ns=int(fields["total"]) * 1000,
                avg10=float(fields["avg10"]),
                avg60=float(fields["avg60"]),
                avg300=float(fields["avg300"]),
            )
        except (KeyError, ValueError):
            continue
    if not lines:
        return None
    return Psi(some=lines.get("some"), full=lines.get("full"))


def _count_lines(path: str) -> int | None:
    text = _read(path)
    return None if text is None else text.count("\n")


def detect_version(root: Path = CGROUP_ROOT) -> CgroupVersion:
    """v2 if the root is the unified hierarchy (has ``cgroup.controllers``)."""
    return CgroupVersion.V2 if (root / "cgroup.controllers").exists() else CgroupVersion.V1


def expand_slice(slice_name: str) -> str:
    """systemd's slice nesting: ``a-b-c.slice`` -> ``/a.slice/a-b.slice/a-b-c.slice``."""
    if slice_name in ("", "-.slice"):
        return "/"
    if not slice_name.endswith(".slice") or "/" in slice_name:
        raise ValueError(f"invalid systemd slice name {slice_name!r}")
    stem = slice_name.removesuffix(".slice")
    parts: list[str] = []
    prefix = ""
    for word in stem.split("-"):
        if not word:
            raise ValueError(f"invalid systemd slice name {slice_name!r}")
        prefix = f"{prefix}-{word}" if prefix else word
        parts.append(f"{prefix}.slice")
    return "/" + "/".join(parts)


def _systemd_parts(cgroups_path: str) -> tuple[str, str, str] | None:
    parts = cgroups_path.split(":")
    if len(parts) != 3 or "/" in cgroups_path:
        return None
    return parts[0], parts[1], parts[2]


def cgroup_inner_path(cgroups_path: str) -> str:
    """The path inside a hierarchy for an OCI ``cgroupsPath`` (either driver).

    A relative cgroupfs path stays relative (runc resolves it against its own
    cgroup; `CgroupReader` does the same against ours).
    """
    parts = _systemd_parts(cgroups_path)
    if parts is None:
        return posixpath.normpath(cgroups_path) if cgroups_path else "/"
    slice_name, prefix, name = parts
    # runc (libcontainer/cgroups/systemd): a name ending in .slice is a
    # slice of its own; anything else becomes "<prefix>-<name>.scope".
    unit = name if name.endswith(".slice") else f"{prefix}-{name}.scope"
    return posixpath.join(expand_slice(slice_name or "system.slice"), unit)


def cgroup_parent(cgroups_path: str) -> str:
    """The cgroup that holds *cgroups_path*: the pod's, when the kubelet set one."""
    parts = _systemd_parts(cgroups_path)
    if parts is not None:
        return expand_slice(parts[0] or "system.slice")
    return posixpath.dirname(cgroup_inner_path(cgroups_path)) or "."


@attrs.frozen
class CgroupDirs:
    """Where one cgroup's files are; ``None`` for a controller that is not mounted."""

    version: CgroupVersion
    cpu: str | None
    memory: str | None
    pids: str | None
    #: Where ``*.pressure`` is: the cgroup on v2, its unified twin on hybrid v1.
    psi: str | None


class CgroupReader:
    """Finds a container's cgroup directories and reads their statistics.

    Args:
        root: Where the cgroup hierarchies are mounted.
        version: Force a version (tests); detected from *root* by default.
        own_cgroups: ``/proc/self/cgroup`` text, to resolve relative paths.
        clock: Wall-clock ns for sample timestamps.
        monotonic: Monotonic ns for rates.
    """

    def __init__(
        self,
        root: Path = CGROUP_ROOT,
        *,
        version: CgroupVersion | None = None,
        own_cgroups: str | None = None,
        clock: Callable[[], int] = time.time_ns,
        monotonic: Callable[[], int] = time.monotonic_ns,
    ) -> None:
        self.root = root
        self.version = version if version is not None else detect_version(root)
        self._clock = clock
        self.monotonic = monotonic
        self._clk_tck = os.sysconf("SC_CLK_TCK")
        #: v1: controller name -> its hierarchy's mount directory.
        self.controllers: dict[str, str] = {}
        #: The unified hierarchy: the root on v2, ``unified/`` on hybrid v1.
        self.unified: str | None = None
        if self.version is CgroupVersion.V2:
            self.unified = str(root)
        else:
            self._scan_v1()
        if own_cgroups is None:
            try:
                own_cgroups = Path("/proc/self/cgroup").read_text()
            except OSError:
                own_cgroups = ""
        self._own = _parse_proc_cgroup(own_cgroups)

    def _scan_v1(self) -> None:
        # The mount directories are named after their controllers, joined by
        # commas when co-mounted ("cpu,cpuacct"), often with symlinks per
        # controller; any of them works.
        with contextlib.suppress(OSError), os.scandir(self.root) as it:
            for entry in sorted(it, key=lambda e: e.name):
                if not entry.is_dir():
                    continue
                if entry.name == "unified":
                    if os.path.exists(os.path.join(entry.path, "cgroup.controllers")):
                        self.unified = entry.path
                    continue
                for controller in entry.name.split(","):
                    self.controllers.setdefault(controller, entry.path)

    def _join(self, mount: str | None, key: str, inner: str) -> str | None:
        if mount is None:
            return None
        if not inner.startswith("/"):
            inner = posixpath.join(self._own.get(key, "/"), inner)
        rel = posixpath.normpath(inner).strip("/")
        return mount if rel in ("", ".") else f"{mount}/{rel}"

    def dirs(self, cgroups_path: str) -> CgroupDirs:
        """The directories of the cgroup named by an OCI ``cgroupsPath``."""
        inner = cgroup_inner_path(cgroups_path)
        if self.version is CgroupVersion.V2:
            path = self._join(self.unified, "", inner)
            return CgroupDirs(CgroupVersion.V2, cpu=path, memory=path, pids=path, psi=path)
        psi = self._join(self.unified, "", inner)
        if psi is not None and not os.path.isdir(psi):
            psi = None
        c = self.controllers
        return CgroupDirs(
            CgroupVersion.V1,
            cpu=self._join(c.get("cpuacct"), "cpuacct", inner),
            memory=self._join(c.get("memory"), "memory", inner),
            pids=self._join(c.get("pids"), "pids", inner),
            psi=psi,
        )

    def read(self, cgroups_path: str) -> CgroupSample | None:
        """Sample one cgroup; ``None`` if it does not exist (any more).

        Blocking (a dozen small reads): call it from a worker thread.
        """
        dirs = self.dirs(cgroups_path)
        if dirs.version is CgroupVersion.V2:
            return self._read_v2(dirs)
        return self._read_v1(dirs)

    def _psi(self, dirs: CgroupDirs) -> tuple[Psi | None, Psi | None, Psi | None]:
        if dirs.psi is None:
            return None, None, None
        return (
            parse_psi(_read(dirs.psi + "/cpu.pressure")),
            parse_psi(_read(dirs.psi + "/memory.pressure")),
            parse_psi(_read(dirs.psi + "/io.pressure")),
        )

    def _read_v1(self, dirs: CgroupDirs) -> CgroupSample | None:
        now, mono = self._clock(), self.monotonic()
        values: dict[str, Any] = {}
        exists = False
        if dirs.cpu is not None:
            usage = _read_int(dirs.cpu + "/cpuacct.usage")
            if usage is not None:
                exists = True
                values["cpu_usage_ns"] = usage
                # cpuacct.stat is in USER_HZ ticks.
                ticks = parse_flat_keyed(_read(dirs.cpu + "/cpuacct.stat"))
                scale = _NS // self._clk_tck
                if "user" in ticks:
                    values["cpu_user_ns"] = ticks["user"] * scale
                if "system" in ticks:
                    values["cpu_system_ns"] = ticks["system"] * scale
        if dirs.memory is not None:
            m = dirs.memory
            usage = _read_int(m + "/memory.usage_in_bytes")
            if usage is not None:
                exists = True
                st = parse_flat_keyed(_read(m + "/memory.stat"))
                # total_* include descendants (a pod cgroup); a leaf has both.
                inactive = _first(st, "total_inactive_file", "inactive_file") or 0
                limit = _read_limit(m + "/memory.limit_in_bytes")
                values.update(
                    memory_usage=usage,
                    memory_working_set=max(usage - inactive, 0),
                    memory_rss=_first(st, "total_rss", "rss"),
                    memory_cache=_first(st, "total_cache", "cache"),
                    page_faults=_first(st, "total_pgfault", "pgfault"),
                    major_page_faults=_first(st, "total_pgmajfault", "pgmajfault"),
                    memory_limit=limit,
                    memory_failcnt=_read_int(m + "/memory.failcnt"),
                    # "oom_kill" in memory.oom_control: kernel 4.13+.
                    oom_kills=parse_flat_keyed(_read(m + "/memory.oom_control")).get("oom_kill"),
                )
                # memory.memsw.*: only with swap accounting (swapaccount=1).
                memsw = _read_int(m + "/memory.memsw.usage_in_bytes")
                if memsw is not None:
                    values["swap_usage"] = max(memsw - usage, 0)
                    memsw_limit = _read_limit(m + "/memory.memsw.limit_in_bytes")
                    if memsw_limit is not None and limit is not None:
                        values["swap_limit"] = max(memsw_limit - limit, 0)
        if not exists:
            return None
        if dirs.pids is not None:
            values["tasks"] = _read_int(dirs.pids + "/pids.current")
        procs_dir = dirs.pids or dirs.memory or dirs.cpu
        if procs_dir is not None:
            values["processes"] = _count_lines(procs_dir + "/cgroup.procs")
        values["cpu_psi"], values["memory_psi"], values["io_psi"] = self._psi(dirs)
        return CgroupSample(timestamp_ns=now, monotonic_ns=mono, **values)

    def _read_v2(self, dirs: CgroupDirs) -> CgroupSample | None:
        now, mono = self._clock(), self.monotonic()
        d = dirs.cpu
        assert d is not None
        # cpu.stat's usage lines are there without the cpu controller enabled.
        cpu = _read(d + "/cpu.stat")
        if cpu is None:
            return None
        values: dict[str, Any] = {}
        cs = parse_flat_keyed(cpu)
        if "usage_usec" in cs:
            values["cpu_usage_ns"] = cs["usage_usec"] * 1000
        if "user_usec" in cs:
            values["cpu_user_ns"] = cs["user_usec"] * 1000
        if "system_usec" in cs:
            values["cpu_system_ns"] = cs["system_usec"] * 1000
        usage = _read_int(d + "/memory.current")
        if usage is not None:
            st = parse_flat_keyed(_read(d + "/memory.stat"))
            events = parse_flat_keyed(_read(d + "/memory.events"))
            limit = _read_limit(d + "/memory.max")
            values.update(
                memory_usage=usage,
                memory_working_set=max(usage - st.get("inactive_file", 0), 0),
                memory_rss=st.get("anon"),
                memory_cache=st.get("file"),
                page_faults=st.get("pgfault"),
                major_page_faults=st.get("pgmajfault"),
                memory_limit=limit,
                # runc reports memory.events "max" as the v2 failcnt.
                memory_failcnt=events.get("max"),
                oom_kills=events.get("oom_kill"),
            )
            swap = _read_int(d + "/memory.swap.current")
            if swap is not None:
                values["swap_usage"] = swap
                values["swap_limit"] = _read_limit(d + "/memory.swap.max")
        values["tasks"] = _read_int(d + "/pids.current")
        values["processes"] = _count_lines(d + "/cgroup.procs")
        values["cpu_psi"], values["memory_psi"], values["io_psi"] = self._psi(dirs)
        return CgroupSample(timestamp_ns=now, monotonic_ns=mono, **values)


def _first(stats: Mapping[str, int], *keys: str) -> int | None:
    for key in keys:
        if key in stats:
            return stats[key]
    return None


def _parse_proc_cgroup(text: str) -> dict[str, str]:
    """``/proc/self/cgroup`` -> controller (``""`` for unified) -> path."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        for controller in controllers.split(",") if controllers else [""]:
            out[controller] = path
    return out


def sum_samples(samples: Sequence[CgroupSample]) -> CgroupSample | None:
    """The pod as the sum of its containers (and infra), without a pod cgroup.

    Limits and PSI do not add up: they are left unset.
    """
    if not samples:
        return None

    def total(name: str) -> int | None:
        present = [v for s in samples if (v := getattr(s, name)) is not None]
        return sum(present) if present else None

    additive = (
        "cpu_usage_ns",
        "cpu_user_ns",
        "cpu_system_ns",
        "memory_usage",
        "memory_working_set",
        "memory_rss",
        "memory_cache",
        "page_faults",
        "major_page_faults",
        "memory_failcnt",
        "oom_kills",
        "swap_usage",
        "tasks",
        "processes",
    )
    values: dict[str, Any] = {name: total(name) for name in additive}
    return CgroupSample(
        timestamp_ns=max(s.timestamp_ns for s in samples),
        monotonic_ns=max(s.monotonic_ns for s in samples),
        **values,
    )


# ---- writable layer ---------------------------------------------------------------------


def measure_directory(path: Path | str) -> tuple[int, int]:
    """(bytes, inodes) used under *path*, as ``du -x`` counts them.

    Bytes are allocated blocks (``st_blocks * 512``), so sparse files count
    what they use; a file with several links is counted once; other mounts
    below *path* are not entered.  Blocking: call it from a worker thread.
    """
    root = os.fspath(path)
    try:
        st = os.lstat(root)
    except FileNotFoundError:
        return 0, 0
    dev = st.st_dev
    used, inodes = st.st_blocks * 512, 1
    seen: set[int] = set()
    stack = [root] if stat_mod.S_ISDIR(st.st_mode) else []
    while stack:
        try:
            it = os.scandir(stack.pop())
        except OSError:  # removed meanwhile, or not a directory any more
            continue
        with it:
            for entry in it:
                try:
                    st = entry.stat(follow_symlinks=False)
                except OSError:
                    continue
                if st.st_dev != dev:
                    continue
                if st.st_nlink > 1 and not stat_mod.S_ISDIR(st.st_mode):
                    if st.st_ino in seen:
                        continue
                    seen.add(st.st_ino)
                used += st.st_blocks * 512
                inodes += 1
                if stat_mod.S_ISDIR(st.st_mode):
                    stack.append(entry.path)
    return used, inodes


def _unescape_mount(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo.
    if "\\" not in field:
        return field
    return field.encode().decode("unicode_escape")


def _mounts_by_device(mountinfo: str) -> dict[int, list[tuple[str, str]]]:
    out: dict[int, list[tuple[str, str]]] = {}
    for line in mountinfo.splitlines():
        left, sep, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if not sep or len(fields) < 5 or len(tail) < 2:
            continue
        major, _, minor = fields[2].partition(":")
        try:
            dev = os.makedev(int(major), int(minor))
        except ValueError:
            continue
        out.setdefault(dev, []).append((_unescape_mount(fields[4]), tail[1]))
    return out


def _measure_layer(upper: str, mounts: dict[int, list[tuple[str, str]]]) -> FilesystemStats | None:
    """The writable layer's usage and its filesystem (blocking)."""
    try:
        st = os.stat(upper)
        vfs = os.statvfs(upper)
    except OSError:
        return None
    used, inodes = measure_directory(upper)
    mountpoint, device = upper, ""
    # The mount of this device whose mount point is the longest prefix.
    best = -1
    for mp, source in mounts.get(st.st_dev, ()):
        prefix = mp.rstrip("/") + "/"
        if (upper == mp or upper.startswith(prefix)) and len(mp) > best:
            best, mountpoint, device = len(mp), mp, source
    return FilesystemStats(
        timestamp_ns=time.time_ns(),
        mountpoint=mountpoint,
        device=device,
        used_bytes=used,
        inodes_used=inodes,
        capacity_bytes=vfs.f_blocks * vfs.f_frsize,
        available_bytes=vfs.f_bavail * vfs.f_frsize,
        inodes_total=vfs.f_files,
        inodes_free=vfs.f_ffree,
    )


# ---- network -------------------------------------------------------------------------------


def interface_stats(name: str, counters: Mapping[str, int]) -> InterfaceStats:
    """One link's ``IFLA_STATS64`` counters."""
    return InterfaceStats(
        name=name,
        rx_bytes=counters.get("rx_bytes", 0),
        rx_errors=counters.get("rx_errors", 0),
        tx_bytes=counters.get("tx_bytes", 0),
        tx_errors=counters.get("tx_errors", 0),
        rx_packets=counters.get("rx_packets", 0),
        tx_packets=counters.get("tx_packets", 0),
        rx_dropped=counters.get("rx_dropped", 0),
        tx_dropped=counters.get("tx_dropped", 0),
    )


def network_stats(
    timestamp_ns: int,
    interfaces: Iterable[InterfaceStats],
    default: str = DEFAULT_INTERFACE,
) -> NetworkStats:
    """Split the interfaces into the default one and the rest; ``lo`` is left out."""
    head: InterfaceStats | None = None
    rest: list[InterfaceStats] = []
    for iface in interfaces:
        if iface.name == "lo":
            continue
        if iface.name == default and head is None:
            head = iface
        else:
            rest.append(iface)
    return NetworkStats(timestamp_ns, head, tuple(sorted(rest, key=lambda i: i.name)))


@attrs.define
class _Handle:
    ns: Any  # pyroute2.NetNS (untyped)
    dev: int
    ino: int
    used_ns: int


class _NetnsCounters:
    """Interface counters per network namespace, from cached pyroute2 handles.

    All handles live on one thread of their own: pyroute2's sync API runs a
    private asyncio loop (so never on the Trio thread), and each handle sets
    up per-thread state on first use (~15 ms), which Trio's thread cache,
    handing out any idle thread, would pay again and again.  An open handle
    keeps its namespace alive, so a handle is closed when its path is gone
    or names another namespace, after `NETNS_IDLE` unused, or on `aclose`.
    """

    def __init__(self, idle: float = NETNS_IDLE, default: str = DEFAULT_INTERFACE) -> None:
        self._idle_ns = int(idle * _NS)
        self._default = default
        self._handles: dict[str, _Handle] = {}  # touched on the worker thread only
        self._executor: ThreadPoolExecutor | None = None
        self._closed = False

    async def _call(self, fn: Callable[[], T]) -> T:
        """Run *fn* on the netlink thread.

        Cancellation: *fn* runs to completion there; the caller stops waiting.
        """
        if self._closed:
            raise trio.ClosedResourceError("stats sampler is closed")
        return await self._submit(fn)

    async def _submit(self, fn: Callable[[], T]) -> T:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="pouch-stats-netlink")
        token = trio.lowlevel.current_trio_token()
        done = trio.Event()

        def wake(_: Future[T]) -> None:
            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(done.set)

        future = self._executor.submit(fn)
        future.add_done_callback(wake)
        await done.wait()
        return future.result()

    async def read(self, paths: Sequence[str]) -> dict[str, NetworkStats | None]:
        return await self._call(lambda: self._read_sync(paths))

    async def aclose(self) -> None:
        if self._closed:
            return
        # Closed first: a read queued behind the close must not reopen handles.
        self._closed = True
        if self._executor is not None:
            with trio.CancelScope(shield=True):
                await self._submit(self._close_all)
            self._executor.shutdown(wait=False)

    def _read_sync(self, paths: Sequence[str]) -> dict[str, NetworkStats | None]:
        if self._closed:  # queued before aclose, run after it
            return dict.fromkeys(paths)
        # No pyroute2 NetNS handles: they fork a helper process, and forking
        # a multi-threaded daemon can deadlock the child.  A throwaway thread
        # setns()es into each namespace in turn and reads the kernel's
        # per-interface counters there.
        return in_new_thread(lambda: _read_counters(paths, self._default), "pouch-netstats")

    def _drop(self, path: str) -> None:
        handle = self._handles.pop(path, None)
        if handle is not None:
            with contextlib.suppress(Exception):
                handle.ns.close()

    def _close_all(self) -> None:
        for path in list(self._handles):
            self._drop(path)

    def handles(self) -> int:
        """Open handles (for tests and leak checks)."""
        return len(self._handles)


_NET_DEV_FIELDS: Final = (
    "rx_bytes", "rx_packets", "rx_errors", "rx_dropped", "rx_fifo", "rx_frame",
    "rx_compressed", "rx_multicast", "tx_bytes", "tx_packets", "tx_errors", "tx_dropped",
)  # fmt: skip


def parse_net_dev(text: str) -> list[InterfaceStats]:
    """``/proc/net/dev``: one line per interface after two header lines."""
    out = []
    for line in text.splitlines()[2:]:
        name, _, rest = line.partition(":")
        values = [int(v) for v in rest.split()]
        out.append(interface_stats(name.strip(), dict(zip(_NET_DEV_FIELDS, values, strict=False))))
    return out


def _read_counters(paths: Sequence[str], default: str) -> dict[str, NetworkStats | None]:
    out: dict[str, NetworkStats | None] = {}
    for path in dict.fromkeys(paths):
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            out[path] = None
            continue
        try:
            enter_netns(fd)
            with open("/proc/thread-self/net/dev") as f:
                text = f.read()
        except OSError as exc:
            log.warning("failed to read network counters", netns=path, error=str(exc))
            out[path] = None
            continue
        finally:
            os.close(fd)
        out[path] = network_stats(time.time_ns(), parse_net_dev(text), default)
    return out


def _stats64(link: Any) -> Mapping[str, int]:
    counters = link.get_attr("IFLA_STATS64") or link.get_attr("IFLA_STATS") or {}
    return {str(k): int(v) for k, v in dict(counters).items()}


# ---- the sampler ----------------------------------------------------------------------------


@attrs.define
class _Anchor:
    monotonic_ns: int
    usage_ns: int
    rate: int | None
    seen_ns: int


@attrs.frozen
class _FsEntry:
    expires_ns: int
    stats: FilesystemStats | None


class StatsSampler:
    """Samples containers and pods; keeps what rates and caches need between calls.

    State (CPU anchors, the layer cache) is only touched on the Trio thread;
    worker threads only read files.  Use as ``async with StatsSampler() as s``
    or call `aclose`, which closes the namespace handles.

    Args:
        reader: The cgroup reader (a fake tree in tests).
        cpu_window: Shortest window for ``usage_nano_cores``, in seconds.
        fs_ttl: How long a writable layer's measurement is reused, in seconds.
        netns_idle: Close a namespace handle unused for this long, in seconds.
        default_interface: The interface reported as the pod's default.
    """

    def __init__(
        self,
        reader: CgroupReader | None = None,
        *,
        cpu_window: float = CPU_RATE_WINDOW,
        fs_ttl: float = FS_CACHE_TTL,
        netns_idle: float = NETNS_IDLE,
        default_interface: str = DEFAULT_INTERFACE,
    ) -> None:
        self.reader = reader if reader is not None else CgroupReader()
        self._window_ns = int(cpu_window * _NS)
        self._fs_ttl_ns = int(fs_ttl * _NS)
        self._anchors: dict[str, _Anchor] = {}
        self._layers: dict[str, _FsEntry] = {}
        self._netns = _NetnsCounters(netns_idle, default_interface)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the namespace handles.  Idempotent."""
        await self._netns.aclose()

    def forget(self, *record_ids: str) -> None:
        """Drop the CPU anchors of removed containers or sandboxes."""
        for rid in record_ids:
            self._anchors.pop(rid, None)
            self._anchors.pop(_pod_key(rid), None)

    # ---- public sampling ---------------------------------------------------------------

    async def container_stats(self, targets: Sequence[ContainerTarget]) -> list[ContainerStats]:
        """Stats of *targets*, in order; a container without a cgroup has only its layer.

        Cancellation: nothing is left half-done; the reads in the worker
        thread finish and are thrown away.
        """
        reads, layers = await self._collect(
            [t.cgroups_path for t in targets], [t.upper_dir for t in targets]
        )
        self._prune()
        return [self._container(t, reads.get(t.cgroups_path), layers) for t in targets]

    async def pod_stats(self, pods: Sequence[PodTarget]) -> list[PodStats]:
        """Stats of each pod and its containers, and its network counters.

        A pod with its own cgroup (the kubelet's ``cgroup_parent``) is read
        from it; otherwise the pod is the sum of its containers and infra.
        """
        paths: list[str] = []
        uppers: list[Path | None] = []
        for p in pods:
            paths.append(p.pod_cgroup if p.pod_cgroup is not None else p.cgroups_path)
            for c in p.containers:
                paths.append(c.cgroups_path)
                uppers.append(c.upper_dir)
        netns_paths = [p.netns_path for p in pods if p.netns_path]
        reads: dict[str, CgroupSample | None] = {}
        layers: dict[str, FilesystemStats | None] = {}
        network: dict[str, NetworkStats | None] = {}

        async def collect() -> None:
            nonlocal reads, layers
            reads, layers = await self._collect(paths, uppers)

        async def nets() -> None:
            nonlocal network
            if netns_paths:
                network = await self._netns.read(netns_paths)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(collect)
            nursery.start_soon(nets)
        self._prune()
        out = []
        for p in pods:
            containers = tuple(
                self._container(c, reads.get(c.cgroups_path), layers) for c in p.containers
            )
            if p.pod_cgroup is not None:
                sample = reads.get(p.pod_cgroup)
            else:
                parts = [reads.get(p.cgroups_path)] + [
                    reads.get(c.cgroups_path) for c in p.containers
                ]
                sample = sum_samples([s for s in parts if s is not None])
            net = network.get(p.netns_path) if p.netns_path else None
            out.append(self._pod(p, sample, net, containers))
        return out

    async def network(self, netns_path: str) -> NetworkStats | None:
        """Interface counters of one namespace; ``None`` if it is gone."""
        return (await self._netns.read([netns_path]))[netns_path]

    async def writable_layer(self, upper_dir: Path) -> FilesystemStats | None:
        """The writable layer's usage, measured at most every ``fs_ttl`` seconds."""
        _, layers = await self._collect([], [upper_dir])
        return layers.get(str(upper_dir))

    def netns_handles(self) -> int:
        """Open namespace handles (for leak checks)."""
        return self._netns.handles()

    # ---- internals ---------------------------------------------------------------------

    async def _collect(
        self, cgroup_paths: Sequence[str], uppers: Sequence[Path | None]
    ) -> tuple[dict[str, CgroupSample | None], dict[str, FilesystemStats | None]]:
        """Read cgroups and the layers whose cache expired, in one thread hop."""
        now = self.reader.monotonic()
        layers: dict[str, FilesystemStats | None] = {}
        stale: list[str] = []
        for upper in uppers:
            if upper is None:
                continue
            key = str(upper)
            entry = self._layers.get(key)
            if entry is not None and entry.expires_ns > now:
                layers[key] = entry.stats
            elif key not in layers:
                stale.append(key)
                layers[key] = None
        reader = self.reader
        unique_paths = list(dict.fromkeys(cgroup_paths))

        def work() -> tuple[dict[str, CgroupSample | None], dict[str, FilesystemStats | None]]:
            reads = {p: reader.read(p) for p in unique_paths}
            measured: dict[str, FilesystemStats | None] = {}
            if stale:
                # Read afresh: layers come and go with their mounts.
                try:
                    mounts = _mounts_by_device(Path("/proc/self/mountinfo").read_text())
                except OSError:
                    mounts = {}
                measured = {u: _measure_layer(u, mounts) for u in stale}
            return reads, measured

        if not unique_paths and not stale:
            return {}, layers
        reads, measured = await trio.to_thread.run_sync(work)
        expires = self.reader.monotonic() + self._fs_ttl_ns
        for key, fs in measured.items():
            self._layers[key] = _FsEntry(expires, fs)
            layers[key] = fs
        return reads, layers

    def _prune(self) -> None:
        now = self.reader.monotonic()
        stale = int(STALE_AFTER * _NS)
        for key in [k for k, a in self._anchors.items() if now - a.seen_ns > stale]:
            del self._anchors[key]
        for key in [k for k, e in self._layers.items() if now - e.expires_ns > stale]:
            del self._layers[key]

    def _rate(self, key: str, usage_ns: int, monotonic_ns: int) -> int | None:
        """``usage_nano_cores`` against the anchor, moved once per window."""
        anchor = self._anchors.get(key)
        if anchor is None or usage_ns < anchor.usage_ns or monotonic_ns < anchor.monotonic_ns:
            # First sample, or a counter reset (a pod summed over fewer
            # containers): start again.
            self._anchors[key] = _Anchor(monotonic_ns, usage_ns, None, monotonic_ns)
            return None
        anchor.seen_ns = monotonic_ns
        elapsed = monotonic_ns - anchor.monotonic_ns
        if elapsed >= self._window_ns and elapsed > 0:
            anchor.rate = (usage_ns - anchor.usage_ns) * _NS // elapsed
            anchor.monotonic_ns, anchor.usage_ns = monotonic_ns, usage_ns
        return anchor.rate

    def _container(
        self,
        target: ContainerTarget,
        sample: CgroupSample | None,
        layers: Mapping[str, FilesystemStats | None],
    ) -> ContainerStats:
        layer = layers.get(str(target.upper_dir)) if target.upper_dir is not None else None
        if sample is None:
            return ContainerStats(target.container_id, writable_layer=layer)
        cpu, memory, swap, io, process = self._cgroup_stats(target.container_id, sample)
        return ContainerStats(
            target.container_id,
            cpu=cpu,
            memory=memory,
            swap=swap,
            io=io,
            process=process,
            writable_layer=layer,
        )

    def _pod(
        self,
        target: PodTarget,
        sample: CgroupSample | None,
        network: NetworkStats | None,
        containers: tuple[ContainerStats, ...],
    ) -> PodStats:
        if sample is None:
            return PodStats(
                target.sandbox_id, time.time_ns(), network=network, containers=containers
            )
        cpu, memory, swap, io, process = self._cgroup_stats(_pod_key(target.sandbox_id), sample)
        return PodStats(
            target.sandbox_id,
            sample.timestamp_ns,
            cpu=cpu,
            memory=memory,
            swap=swap,
            io=io,
            process=process,
            network=network,
            containers=containers,
        )

    def _cgroup_stats(
        self, key: str, s: CgroupSample
    ) -> tuple[
        CpuStats | None, MemoryStats | None, SwapStats | None, IoStats | None, ProcessStats | None
    ]:
        ts = s.timestamp_ns
        cpu = None
        if s.cpu_usage_ns is not None:
            cpu = CpuStats(
                ts,
                usage_core_ns=s.cpu_usage_ns,
                usage_nano_cores=self._rate(key, s.cpu_usage_ns, s.monotonic_ns),
                user_ns=s.cpu_user_ns,
                system_ns=s.cpu_system_ns,
                psi=s.cpu_psi,
            )
        memory = None
        if s.memory_usage is not None:
            ws = s.memory_working_set if s.memory_working_set is not None else s.memory_usage
            memory = MemoryStats(
                ts,
                usage_bytes=s.memory_usage,
                working_set_bytes=ws,
                available_bytes=max(s.memory_limit - ws, 0) if s.memory_limit is not None else None,
                rss_bytes=s.memory_rss,
                cache_bytes=s.memory_cache,
                page_faults=s.page_faults,
                major_page_faults=s.major_page_faults,
                limit_bytes=s.memory_limit,
                failcnt=s.memory_failcnt,
                oom_kills=s.oom_kills,
                psi=s.memory_psi,
            )
        swap = None
        if s.swap_usage is not None:
            available = None
            if s.swap_limit is not None:
                available = max(s.swap_limit - s.swap_usage, 0)
            swap = SwapStats(ts, usage_bytes=s.swap_usage, available_bytes=available)
        io = IoStats(ts, s.io_psi) if s.io_psi is not None else None
        process = None
        if s.tasks is not None or s.processes is not None:
            count = s.tasks if s.tasks is not None else s.processes
            assert count is not None
            process = ProcessStats(ts, process_count=count, processes=s.processes)
        return cpu, memory, swap, io, process


def _pod_key(sandbox_id: str) -> str:
    # The sandbox id is also the infra container's; the pod's rate is its own.
    return f"pod:{sandbox_id}"


# ---- targets from the manager's records ----------------------------------------------------


def spec_limits(spec: Mapping[str, Any]) -> SpecLimits:
    """``linux.resources`` of an OCI spec as `SpecLimits`."""
    linux = spec.get("linux")
    resources = linux.get("resources") if isinstance(linux, Mapping) else None
    if not isinstance(resources, Mapping):
        return SpecLimits()
    cpu = resources.get("cpu")
    memory = resources.get("memory")
    cpu = cpu if isinstance(cpu, Mapping) else {}
    memory = memory if isinstance(memory, Mapping) else {}

    def num(m: Mapping[str, Any], key: str) -> int:
        value = m.get(key)
        return value if isinstance(value, int) and value > 0 else 0

    return SpecLimits(
        memory_limit=num(memory, "limit"),
        cpu_shares=num(cpu, "shares"),
        cpu_quota=num(cpu, "quota"),
        cpu_period=num(cpu, "period"),
    )


def _cgroups_path_of(spec: Mapping[str, Any]) -> str:
    linux = spec.get("linux")
    path = linux.get("cgroupsPath") if isinstance(linux, Mapping) else None
    return path if isinstance(path, str) else ""


def container_target(manager: ContainerManager, c: Container) -> ContainerTarget:
    """What to sample for one of the manager's containers."""
    return ContainerTarget(
        container_id=c.container_id,
        cgroups_path=_cgroups_path_of(c.spec),
        upper_dir=manager.container_dir(c.container_id) / "upper",
        name=c.config.metadata.name,
        image=c.image_ref,
        started_at=c.started_at,
        limits=spec_limits(c.spec),
    )


def pod_target(manager: ContainerManager, s: Sandbox, containers: Iterable[Container]) -> PodTarget:
    """What to sample for a sandbox and *containers* (those of it worth reporting).

    The pod has a cgroup of its own only when the kubelet gave a
    ``cgroup_parent``; pouch's default parent is shared by every pod.
    """
    path = _cgroups_path_of(s.spec)
    return PodTarget(
        sandbox_id=s.sandbox_id,
        cgroups_path=path,
        pod_cgroup=cgroup_parent(path) if s.config.cgroup_parent and path else None,
        netns_path=s.netns_path,
        containers=tuple(container_target(manager, c) for c in containers),
        started_at=s.created_at,
    )


# ---- metrics (cAdvisor names, as the kubelet's /metrics/cadvisor expects) -----------------------


class MetricType(enum.IntEnum):
    """cri-api MetricType (same numbers)."""

    COUNTER = 0
    GAUGE = 1


@attrs.frozen
class MetricDescriptor:
    name: str
    help: str
    label_keys: tuple[str, ...]


@attrs.frozen
class Metric:
    name: str
    #: When the value was sampled (cri-api: 0 only for values gathered live).
    timestamp_ns: int
    type: MetricType
    value: int
    label_values: tuple[str, ...]


@attrs.frozen
class ContainerMetrics:
    container_id: str
    metrics: tuple[Metric, ...]


@attrs.frozen
class PodMetrics:
    sandbox_id: str
    metrics: tuple[Metric, ...]
    container_metrics: tuple[ContainerMetrics, ...]


#: cri-o's label keys (cAdvisor's id/name/image); the kubelet appends
#: namespace, pod and container itself.
BASE_LABELS: Final = ("id", "name", "image")
_NET_LABELS: Final = (*BASE_LABELS, "interface")


def _d(name: str, help_text: str, extra: tuple[str, ...] = ()) -> MetricDescriptor:
    return MetricDescriptor(name, help_text, (*BASE_LABELS, *extra))


#: What ListMetricDescriptors returns: cAdvisor's names and help, the subset
#: containerd 1.7+/2.x and cri-o implement from cgroup and netlink counters.
METRIC_DESCRIPTORS: Final[tuple[MetricDescriptor, ...]] = (
    _d("container_cpu_usage_seconds_total", "Cumulative cpu time consumed in seconds.", ("cpu",)),
    _d("container_cpu_user_seconds_total", "Cumulative user cpu time consumed in seconds."),
    _d("container_cpu_system_seconds_total", "Cumulative system cpu time consumed in seconds."),
    _d(
        "container_memory_usage_bytes",
        "Current memory usage in bytes, including all memory regardless of when it was accessed",
    ),
    _d("container_memory_working_set_bytes", "Current working set in bytes."),
    _d("container_memory_rss", "Size of RSS in bytes."),
    _d("container_memory_cache", "Number of bytes of page cache memory."),
    _d("container_memory_swap", "Container swap usage in bytes."),
    _d("container_memory_failcnt", "Number of memory usage hits limits"),
    _d(
        "container_memory_failures_total",
        "Cumulative count of memory allocation failures.",
        ("failure_type", "scope"),
    ),
    _d("container_spec_memory_limit_bytes", "Memory limit for the container."),
    _d("container_spec_cpu_shares", "CPU share of the container."),
    _d("container_spec_cpu_quota", "CPU quota of the container."),
    _d("container_spec_cpu_period", "CPU period of the container."),
    _d("container_processes", "Number of processes running inside the container."),
    _d("container_threads", "Number of threads running inside the container"),
    _d(
        "container_fs_usage_bytes",
        "Number of bytes that are consumed by the container on this filesystem.",
        ("device",),
    ),
    _d(
        "container_fs_limit_bytes",
        "Number of bytes that can be consumed by the container on this filesystem.",
        ("device",),
    ),
    _d("container_fs_inodes_total", "Number of Inodes", ("device",)),
    _d("container_fs_inodes_free", "Number of available Inodes", ("device",)),
    _d("container_last_seen", "Last time a container was seen by the exporter"),
    _d("container_start_time_seconds", "Start time of the container since unix epoch in seconds."),
    _d("container_oom_events_total", "Count of out of memory events observed for the container"),
    MetricDescriptor(
        "container_network_receive_bytes_total", "Cumulative count of bytes received", _NET_LABELS
    ),
    MetricDescriptor(
        "container_network_transmit_bytes_total",
        "Cumulative count of bytes transmitted",
        _NET_LABELS,
    ),
    MetricDescriptor(
        "container_network_receive_packets_total",
        "Cumulative count of packets received",
        _NET_LABELS,
    ),
    MetricDescriptor(
        "container_network_transmit_packets_total",
        "Cumulative count of packets transmitted",
        _NET_LABELS,
    ),
    MetricDescriptor(
        "container_network_receive_errors_total",
        "Cumulative count of errors encountered while receiving",
        _NET_LABELS,
    ),
    MetricDescriptor(
        "container_network_transmit_errors_total",
        "Cumulative count of errors encountered while transmitting",
        _NET_LABELS,
    ),
    MetricDescriptor(
        "container_network_receive_packets_dropped_total",
        "Cumulative count of packets dropped while receiving",
        _NET_LABELS,
    ),
    MetricDescriptor(
        "container_network_transmit_packets_dropped_total",
        "Cumulative count of packets dropped while transmitting",
        _NET_LABELS,
    ),
)

_C, _G = MetricType.COUNTER, MetricType.GAUGE


class _Emitter:
    """Collects metrics with one set of base label values."""

    def __init__(self, base: tuple[str, ...]) -> None:
        self.base = base
        self.out: list[Metric] = []

    def add(
        self,
        name: str,
        ts: int,
        kind: MetricType,
        value: int | None,
        extra: tuple[str, ...] = (),
    ) -> None:
        if value is not None:
            self.out.append(Metric(name, ts, kind, max(int(value), 0), (*self.base, *extra)))

    def cgroup(
        self,
        cpu: CpuStats | None,
        memory: MemoryStats | None,
        swap: SwapStats | None,
        process: ProcessStats | None,
    ) -> None:
        # Metric values are integers (UInt64Value): seconds are whole
        # seconds, as cri-o reports them.
        if cpu is not None:
            ts = cpu.timestamp_ns
            self.add(
                "container_cpu_usage_seconds_total", ts, _C, cpu.usage_core_ns // _NS, ("total",)
            )
            if cpu.user_ns is not None:
                self.add("container_cpu_user_seconds_total", ts, _C, cpu.user_ns // _NS)
            if cpu.system_ns is not None:
                self.add("container_cpu_system_seconds_total", ts, _C, cpu.system_ns // _NS)
        if memory is not None:
            ts = memory.timestamp_ns
            self.add("container_memory_usage_bytes", ts, _G, memory.usage_bytes)
            self.add("container_memory_working_set_bytes", ts, _G, memory.working_set_bytes)
            self.add("container_memory_rss", ts, _G, memory.rss_bytes)
            self.add("container_memory_cache", ts, _G, memory.cache_bytes)
            self.add("container_memory_swap", ts, _G, swap.usage_bytes if swap else 0)
            self.add("container_memory_failcnt", ts, _C, memory.failcnt)
            # cAdvisor's scopes: "container" (this cgroup) and "hierarchy"
            # (with descendants); a container's cgroup is a leaf, so both are
            # the hierarchical counter, as in cri-o.
            for kind, value in (
                ("pgfault", memory.page_faults),
                ("pgmajfault", memory.major_page_faults),
            ):
                for scope in ("container", "hierarchy"):
                    self.add("container_memory_failures_total", ts, _C, value, (kind, scope))
            self.add("container_oom_events_total", ts, _C, memory.oom_kills)
        if process is not None:
            ts = process.timestamp_ns
            self.add("container_processes", ts, _G, process.processes)
            self.add("container_threads", ts, _G, process.process_count)


def _sample_time(*parts: CpuStats | MemoryStats | ProcessStats | None) -> int:
    times = [p.timestamp_ns for p in parts if p is not None]
    return max(times) if times else 0


def container_metrics(target: ContainerTarget, stats: ContainerStats) -> ContainerMetrics:
    """The cAdvisor-named metrics of one container sample."""
    e = _Emitter((target.container_id, target.name, target.image))
    e.cgroup(stats.cpu, stats.memory, stats.swap, stats.process)
    ts = _sample_time(stats.cpu, stats.memory, stats.process)
    layer = stats.writable_layer
    if layer is not None:
        dev = (layer.device,)
        lts = layer.timestamp_ns
        e.add("container_fs_usage_bytes", lts, _G, layer.used_bytes, dev)
        e.add("container_fs_limit_bytes", lts, _G, layer.capacity_bytes, dev)
        e.add("container_fs_inodes_total", lts, _G, layer.inodes_total, dev)
        e.add("container_fs_inodes_free", lts, _G, layer.inodes_free, dev)
        ts = max(ts, lts)
    if ts:
        limits = target.limits
        # cAdvisor reports an unlimited container's memory limit as 0, and
        # quota and period only when a quota is set.
        e.add("container_spec_memory_limit_bytes", ts, _G, limits.memory_limit)
        if limits.cpu_shares:
            e.add("container_spec_cpu_shares", ts, _G, limits.cpu_shares)
        if limits.cpu_quota:
            e.add("container_spec_cpu_quota", ts, _G, limits.cpu_quota)
            e.add("container_spec_cpu_period", ts, _G, limits.cpu_period or 100_000)
        if target.started_at:
            e.add("container_start_time_seconds", ts, _G, target.started_at // _NS)
        e.add("container_last_seen", ts, _G, ts // _NS)
    return ContainerMetrics(target.container_id, tuple(e.out))


def pod_metrics(target: PodTarget, stats: PodStats) -> PodMetrics:
    """The pod's metrics (pod cgroup, network) and each container's.

    Pod-level series carry the sandbox id and the name ``POD`` (cri-o's
    convention); the network counters exist only at the pod level, since the
    containers share the pod's namespace.
    """
    e = _Emitter((target.sandbox_id, "POD", ""))
    e.cgroup(stats.cpu, stats.memory, stats.swap, stats.process)
    net = stats.network
    if net is not None:
        ts = net.timestamp_ns
        for iface in net.all_interfaces():
            i = (iface.name,)
            e.add("container_network_receive_bytes_total", ts, _C, iface.rx_bytes, i)
            e.add("container_network_transmit_bytes_total", ts, _C, iface.tx_bytes, i)
            e.add("container_network_receive_packets_total", ts, _C, iface.rx_packets, i)
            e.add("container_network_transmit_packets_total", ts, _C, iface.tx_packets, i)
            e.add("container_network_receive_errors_total", ts, _C, iface.rx_errors, i)
            e.add("container_network_transmit_errors_total", ts, _C, iface.tx_errors, i)
            e.add("container_network_receive_packets_dropped_total", ts, _C, iface.rx_dropped, i)
            e.add("container_network_transmit_packets_dropped_total", ts, _C, iface.tx_dropped, i)
    ts = stats.timestamp_ns
    if target.started_at:
        e.add("container_start_time_seconds", ts, _G, target.started_at // _NS)
    e.add("container_last_seen", ts, _G, ts // _NS)
    by_id = {c.container_id: c for c in stats.containers}
    containers = tuple(
        container_metrics(c, by_id[c.container_id])
        for c in target.containers
        if c.container_id in by_id
    )
    return PodMetrics(target.sandbox_id, tuple(e.out), containers)
