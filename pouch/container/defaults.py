"""Security defaults that containerd's CRI plugin gives a container.

Everything here is pure data plus pure functions that return OCI runtime-spec
JSON fragments (plain ``dict``/``list`` values, typed with ``TypedDict``) for
``pouch.container.spec`` to place into ``config.json``.  Nothing here reads
files or talks to runc; the only host facts consulted are ``uname`` machine
and release, and only when the caller does not pass them.

The data is re-expressed from containerd **v1.6.39** (the last 1.6 release):

- ``oci/spec.go``: ``defaultUnixCaps`` and the masked/readonly paths and the
  deny-all device rule of ``populateDefaultUnixSpec``.
- ``oci/mounts.go``: ``defaultMounts``; the CRI plugin removes ``/run``
  (``oci.WithoutRunMount``) and ``pkg/cri/opts/spec_linux.go`` (``WithMounts``)
  appends a read-only ``cgroup`` mount.
- ``oci/spec_opts.go``: ``WithDefaultUnixDevices``, ``WithAllDevicesAllowed``,
  ``WithPrivileged`` (``WithWriteableSysfs``, ``WithWriteableCgroupfs``),
  ``WithAddedCapabilities``/``WithDroppedCapabilities``.
- ``pkg/cap/cap_linux.go``: ``Known()``, the kernel's capability list.
- ``pkg/cri/opts/spec_linux.go``: ``WithCapabilities`` (CRI add/drop, "ALL").
- ``contrib/seccomp/seccomp_default.go``: ``DefaultProfile`` and ``arches``;
  ``contrib/seccomp/kernelversion``: the ``>= 4.8`` check for ``ptrace``.
"""

from __future__ import annotations

import platform
import re
from types import MappingProxyType
from typing import TYPE_CHECKING, Final, NotRequired, TypedDict

from pouch.errors import InvalidArgument

if TYPE_CHECKING:
    from collections.abc import Collection, Iterable, Mapping, Sequence

__all__ = [
    "ALL_CAPABILITIES",
    "DEFAULT_CAPABILITIES",
    "DEFAULT_MASKED_PATHS",
    "DEFAULT_READONLY_PATHS",
    "DEFAULT_SECCOMP_SYSCALLS",
    "Device",
    "DeviceCgroupRule",
    "Mount",
    "SeccompArg",
    "SeccompProfile",
    "SeccompSyscall",
    "apply_capabilities",
    "default_device_cgroup_rules",
    "default_devices",
    "default_mounts",
    "default_seccomp_profile",
    "normalize_capability",
]


# --------------------------------------------------------------------------
# OCI JSON shapes.  Keys are spelled as runtime-spec's config.json spells
# them; optional keys are left out exactly where Go's ``omitempty`` would
# leave them out, so a profile here serialises like containerd's.
# --------------------------------------------------------------------------


class Mount(TypedDict):
    """One entry of ``mounts`` (runtime-spec config.md, "Mounts")."""

    destination: str
    type: str
    source: str
    options: list[str]


class Device(TypedDict):
    """One entry of ``linux.devices`` (runtime-spec config-linux.md, "Devices")."""

    path: str
    type: str
    major: int
    minor: int
    fileMode: int
    uid: int
    gid: int


class DeviceCgroupRule(TypedDict):
    """One entry of ``linux.resources.devices`` (config-linux.md, "Device allowlist").

    A missing ``major``/``minor`` is a wildcard; a missing ``type`` means "a" (all).
    """

    allow: bool
    type: NotRequired[str]
    major: NotRequired[int]
    minor: NotRequired[int]
    access: str


class SeccompArg(TypedDict):
    """One entry of a syscall rule's ``args`` (config-linux.md, "Seccomp")."""

    index: int
    value: int
    valueTwo: NotRequired[int]
    op: str


class SeccompSyscall(TypedDict):
    """One entry of ``linux.seccomp.syscalls``."""

    names: list[str]
    action: str
    errnoRet: NotRequired[int]
    args: NotRequired[list[SeccompArg]]


class SeccompProfile(TypedDict):
    """The ``linux.seccomp`` object."""

    defaultAction: str
    architectures: NotRequired[list[str]]
    syscalls: list[SeccompSyscall]


# --------------------------------------------------------------------------
# Capabilities
# --------------------------------------------------------------------------

#: containerd's ``defaultUnixCaps()`` (oci/spec.go), in containerd's order.
#: This is also Docker's default set.
DEFAULT_CAPABILITIES: Final[tuple[str, ...]] = (
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
)

#: Every capability the kernel defines up to 5.9, indexed by capability
#: number (``ALL_CAPABILITIES[21] == "CAP_SYS_ADMIN"``), as containerd's
#: ``cap.Known()``.  Used for privileged containers and for "ALL" in add/drop.
#:
#: containerd itself uses the daemon's own effective set (``cap.Current()``)
#: there; on a host where the daemon runs as real root on a kernel >= 5.9
#: the two are the same.
ALL_CAPABILITIES: Final[tuple[str, ...]] = (
    "CAP_CHOWN",  # 0, Linux 2.2
    "CAP_DAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",  # 5
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE",  # 10
    "CAP_NET_BROADCAST",
    "CAP_NET_ADMIN",
    "CAP_NET_RAW",
    "CAP_IPC_LOCK",
    "CAP_IPC_OWNER",  # 15
    "CAP_SYS_MODULE",
    "CAP_SYS_RAWIO",
    "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE",
    "CAP_SYS_PACCT",  # 20
    "CAP_SYS_ADMIN",
    "CAP_SYS_BOOT",
    "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME",  # 25
    "CAP_SYS_TTY_CONFIG",
    "CAP_MKNOD",  # 2.4
    "CAP_LEASE",
    "CAP_AUDIT_WRITE",  # 2.6.11
    "CAP_AUDIT_CONTROL",  # 30
    "CAP_SETFCAP",  # 2.6.24
    "CAP_MAC_OVERRIDE",  # 2.6.25
    "CAP_MAC_ADMIN",
    "CAP_SYSLOG",  # 2.6.37
    "CAP_WAKE_ALARM",  # 35, 3.0
    "CAP_BLOCK_SUSPEND",  # 3.5
    "CAP_AUDIT_READ",  # 3.16
    "CAP_PERFMON",  # 5.8
    "CAP_BPF",  # 5.8
    "CAP_CHECKPOINT_RESTORE",  # 40, 5.9
)

_KNOWN_CAPABILITIES: Final = frozenset(ALL_CAPABILITIES)

# The CRI "all capabilities" keyword (cri-api api.proto, Capability).
_ALL: Final = "ALL"


def normalize_capability(name: str) -> str:
    """Return the canonical ``CAP_*`` spelling of a capability name.

    Kubernetes sends names without the ``CAP_`` prefix ("NET_ADMIN"); OCI
    specs carry them with it.  Both are accepted, in any case.

    Args:
        name: A capability name such as ``"net_admin"`` or ``"CAP_NET_ADMIN"``.

    Returns:
        The name as it appears in :data:`ALL_CAPABILITIES`.

    Raises:
        InvalidArgument: ``name`` is not a Linux capability (the message names it).
    """
    upper = name.upper()
    canonical = upper if upper.startswith("CAP_") else "CAP_" + upper
    if canonical not in _KNOWN_CAPABILITIES:
        raise InvalidArgument(f"unknown capability {name!r}")
    return canonical


def _parse_cri_capabilities(names: Sequence[str]) -> tuple[bool, list[str]]:
    """Split CRI add/drop names into ("ALL" present, canonical names)."""
    has_all = False
    canonical: list[str] = []
    for name in names:
        if name.upper() == _ALL:
            has_all = True
        else:
            canonical.append(normalize_capability(name))
    return has_all, canonical


def apply_capabilities(add: Sequence[str], drop: Sequence[str], *, privileged: bool) -> list[str]:
    """Compute a container's capability set from the CRI add/drop lists.

    This follows containerd's CRI ``WithCapabilities`` step by step, starting
    from :data:`DEFAULT_CAPABILITIES`:

    1. "ALL" in ``add`` sets the full list (:data:`ALL_CAPABILITIES`);
    2. then "ALL" in ``drop`` empties it;
    3. then each named capability in ``add`` is appended;
    4. then each named capability in ``drop`` is removed.

    So ``drop=["ALL"], add=["NET_BIND_SERVICE"]`` gives only that capability,
    ``add=["ALL"], drop=["CHOWN"]`` gives everything but ``CAP_CHOWN``, and a
    name in both lists ends up dropped.  A privileged container gets every
    capability whatever the lists say (``oci.WithPrivileged`` runs after
    ``WithCapabilities``); the lists are still validated.

    The result is the bounding, effective and permitted set alike; containerd
    leaves the inheritable and ambient sets empty for CRI containers.

    Args:
        add: ``capabilities.add_capabilities`` from the CRI security context.
        drop: ``capabilities.drop_capabilities`` from the CRI security context.
        privileged: Whether the container is privileged.

    Returns:
        Canonical ``CAP_*`` names without duplicates, in a stable order:
        the starting set's order, then additions in request order.

    Raises:
        InvalidArgument: A name in ``add`` or ``drop`` is neither "ALL" nor a
            Linux capability; the message names it.
    """
    add_all, to_add = _parse_cri_capabilities(add)
    drop_all, to_drop = _parse_cri_capabilities(drop)
    if privileged:
        return list(ALL_CAPABILITIES)

    caps = list(ALL_CAPABILITIES if add_all else DEFAULT_CAPABILITIES)
    if drop_all:
        caps = []
    for cap in to_add:
        if cap not in caps:
            caps.append(cap)
    dropped = set(to_drop)
    return [cap for cap in caps if cap not in dropped]


# --------------------------------------------------------------------------
# Masked and read-only paths
# --------------------------------------------------------------------------

#: ``linux.maskedPaths`` of containerd's default Unix spec (oci/spec.go).
#: ``/sys/devices/virtual/powercap`` has been there since v1.6.26 (it hides
#: the RAPL energy counters used by the PLATYPUS side channel).
#:
#: The CRI plugin itself resets both lists and uses whatever the kubelet
#: sends in ``LinuxContainerSecurityContext.masked_paths`` /
#: ``readonly_paths`` (containerd issue #5029); these tuples are the defaults
#: to use when a caller sends none.  A privileged container gets neither.
DEFAULT_MASKED_PATHS: Final[tuple[str, ...]] = (
    "/proc/acpi",
    "/proc/asound",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
    "/proc/scsi",
)

#: ``linux.readonlyPaths`` of containerd's default Unix spec (oci/spec.go).
DEFAULT_READONLY_PATHS: Final[tuple[str, ...]] = (
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
)


# --------------------------------------------------------------------------
# Mounts and devices
# --------------------------------------------------------------------------

# (destination, type, source, options) of containerd's defaultMounts()
# without /run, plus the cgroup mount the CRI plugin appends, in spec order.
_DEFAULT_MOUNTS: Final[tuple[tuple[str, str, str, tuple[str, ...]], ...]] = (
    ("/proc", "proc", "proc", ("nosuid", "noexec", "nodev")),
    ("/dev", "tmpfs", "tmpfs", ("nosuid", "strictatime", "mode=755", "size=65536k")),
    (
        "/dev/pts",
        "devpts",
        "devpts",
        ("nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"),
    ),
    ("/dev/shm", "tmpfs", "shm", ("nosuid", "noexec", "nodev", "mode=1777", "size=65536k")),
    ("/dev/mqueue", "mqueue", "mqueue", ("nosuid", "noexec", "nodev")),
    ("/sys", "sysfs", "sysfs", ("nosuid", "noexec", "nodev", "ro")),
    # "Mount cgroup into the container as readonly, which inherits docker's
    # behavior" (pkg/cri/opts/spec_linux.go, WithMounts).
    ("/sys/fs/cgroup", "cgroup", "cgroup", ("nosuid", "noexec", "nodev", "relatime", "ro")),
)

# oci.WithPrivileged makes exactly these two types writable.
_WRITABLE_WHEN_PRIVILEGED: Final = frozenset({"sysfs", "cgroup"})


def default_mounts(*, privileged: bool = False) -> list[Mount]:
    """Return the system mounts containerd's CRI plugin gives every container.

    In spec order: ``/proc``, ``/dev`` (tmpfs), ``/dev/pts``, ``/dev/shm``,
    ``/dev/mqueue``, ``/sys`` (read-only) and ``/sys/fs/cgroup`` (read-only).
    containerd's ``/run`` tmpfs is not included: the CRI plugin removes it.

    The caller still has to apply containerd's override rules: a CRI mount
    with the same destination replaces a default one, and a CRI mount of
    ``/dev`` removes every default under ``/dev/``.  The CRI plugin normally
    replaces ``/dev/shm`` with a bind mount of the sandbox's shm.

    Args:
        privileged: Make ``/sys`` and ``/sys/fs/cgroup`` read-write, as
            ``oci.WithPrivileged`` does ("ro" becomes "rw" in place).

    Returns:
        A fresh list of new mount objects; the caller may mutate it.
    """
    mounts: list[Mount] = []
    for destination, fstype, source, options in _DEFAULT_MOUNTS:
        opts = list(options)
        if privileged and fstype in _WRITABLE_WHEN_PRIVILEGED:
            opts = ["rw" if opt == "ro" else opt for opt in opts]
        mounts.append(
            {"destination": destination, "type": fstype, "source": source, "options": opts}
        )
    return mounts


# (path, major, minor) of the character devices every container gets.  The
# OCI runtime spec requires them (config-linux.md, "Default Devices") and
# runc creates them itself with mode 0666, owner 0:0, which is why
# containerd's CRI spec lists none; they are spelled out here so the spec
# does not depend on the runtime's built-in list.  /dev/ptmx is deliberately
# not a node: runc makes it a symlink to pts/ptmx so that it refers to the
# container's own devpts instance ("newinstance" above).
_DEFAULT_DEVICE_NODES: Final[tuple[tuple[str, int, int], ...]] = (
    ("/dev/null", 1, 3),
    ("/dev/zero", 1, 5),
    ("/dev/full", 1, 7),
    ("/dev/random", 1, 8),
    ("/dev/urandom", 1, 9),
    ("/dev/tty", 5, 0),
)

# containerd's WithDefaultUnixDevices (v1.6.9 and later, which dropped
# /dev/net/tun): (path, major, minor or None for "any minor").
_DEFAULT_ALLOWED_CHAR_DEVICES: Final[tuple[tuple[str, int, int | None], ...]] = (
    ("/dev/null", 1, 3),
    ("/dev/random", 1, 8),
    ("/dev/full", 1, 7),
    ("/dev/tty", 5, 0),
    ("/dev/zero", 1, 5),
    ("/dev/urandom", 1, 9),
    ("/dev/console", 5, 1),
    ("/dev/pts/*", 136, None),  # Unix98 pty slaves
    ("/dev/ptmx", 5, 2),
)

_RWM: Final = "rwm"


def default_devices() -> list[Device]:
    """Return the ``linux.devices`` entries every container gets.

    These are ``/dev/null``, ``zero``, ``full``, ``random``, ``urandom`` and
    ``tty``: character devices with mode 0666 owned by root.  ``/dev/ptmx``
    is a symlink into the container's devpts, not a node, and
    ``/dev/console`` is bind-mounted by the runtime when there is a terminal.

    Returns:
        A fresh list of new device objects.
    """
    return [
        {
            "path": path,
            "type": "c",
            "major": major,
            "minor": minor,
            "fileMode": 0o666,
            "uid": 0,
            "gid": 0,
        }
        for path, major, minor in _DEFAULT_DEVICE_NODES
    ]


def default_device_cgroup_rules(*, privileged: bool = False) -> list[DeviceCgroupRule]:
    """Return ``linux.resources.devices``: the device cgroup allow list.

    For an ordinary container this is containerd's deny-all rule
    (``populateDefaultUnixSpec``) followed by the allow rules of
    ``oci.WithDefaultUnixDevices``: the six device nodes above plus
    ``/dev/console`` (5:1), every pty slave (136:*) and ``/dev/ptmx`` (5:2),
    each for read, write and mknod.  Rules are evaluated in order, so the
    deny-all must come first.

    containerd's CRI plugin writes only the deny-all rule and relies on
    runc adding the same allow rules from its built-in list; writing them
    out keeps the spec self-contained and runtime-independent.

    Args:
        privileged: Return containerd's ``WithAllDevicesAllowed`` instead,
            a single rule allowing every device.

    Returns:
        A fresh list of new rule objects.
    """
    if privileged:
        return [{"allow": True, "access": _RWM}]
    rules: list[DeviceCgroupRule] = [{"allow": False, "access": _RWM}]
    for _path, major, minor in _DEFAULT_ALLOWED_CHAR_DEVICES:
        rule: DeviceCgroupRule = {"allow": True, "type": "c", "major": major, "access": _RWM}
        if minor is not None:
            rule["minor"] = minor
        rules.append(rule)
    return rules


# --------------------------------------------------------------------------
# Seccomp: containerd's DefaultProfile (contrib/seccomp/seccomp_default.go)
# --------------------------------------------------------------------------

#: Syscalls the default profile allows unconditionally, in containerd's
#: order (near-alphabetical, so it diffs cleanly against upstream).  Names
#: unknown to the host's libseccomp are skipped by runc, so listing
#: syscalls newer than the kernel is harmless.
DEFAULT_SECCOMP_SYSCALLS: Final[tuple[str, ...]] = (
    "accept",
    "accept4",
    "access",
    "adjtimex",
    "alarm",
    "bind",
    "brk",
    "cachestat",  # kernel v6.5, libseccomp v2.5.5
    "capget",
    "capset",
    "chdir",
    "chmod",
    "chown",
    "chown32",
    "clock_adjtime",
    "clock_adjtime64",
    "clock_getres",
    "clock_getres_time64",
    "clock_gettime",
    "clock_gettime64",
    "clock_nanosleep",
    "clock_nanosleep_time64",
    "close",
    "close_range",
    "connect",
    "copy_file_range",
    "creat",
    "dup",
    "dup2",
    "dup3",
    "epoll_create",
    "epoll_create1",
    "epoll_ctl",
    "epoll_ctl_old",
    "epoll_pwait",
    "epoll_pwait2",
    "epoll_wait",
    "epoll_wait_old",
    "eventfd",
    "eventfd2",
    "execve",
    "execveat",
    "exit",
    "exit_group",
    "faccessat",
    "faccessat2",
    "fadvise64",
    "fadvise64_64",
    "fallocate",
    "fanotify_mark",
    "fchdir",
    "fchmod",
    "fchmodat",
    "fchmodat2",  # kernel v6.6, libseccomp v2.5.5
    "fchown",
    "fchown32",
    "fchownat",
    "fcntl",
    "fcntl64",
    "fdatasync",
    "fgetxattr",
    "flistxattr",
    "flock",
    "fork",
    "fremovexattr",
    "fsetxattr",
    "fstat",
    "fstat64",
    "fstatat64",
    "fstatfs",
    "fstatfs64",
    "fsync",
    "ftruncate",
    "ftruncate64",
    "futex",
    "futex_requeue",  # kernel v6.7, libseccomp v2.5.5
    "futex_time64",
    "futex_wait",  # kernel v6.7, libseccomp v2.5.5
    "futex_waitv",
    "futex_wake",  # kernel v6.7, libseccomp v2.5.5
    "futimesat",
    "getcpu",
    "getcwd",
    "getdents",
    "getdents64",
    "getegid",
    "getegid32",
    "geteuid",
    "geteuid32",
    "getgid",
    "getgid32",
    "getgroups",
    "getgroups32",
    "getitimer",
    "getpeername",
    "getpgid",
    "getpgrp",
    "getpid",
    "getppid",
    "getpriority",
    "getrandom",
    "getresgid",
    "getresgid32",
    "getresuid",
    "getresuid32",
    "getrlimit",
    "get_robust_list",
    "getrusage",
    "getsid",
    "getsockname",
    "getsockopt",
    "get_thread_area",
    "gettid",
    "gettimeofday",
    "getuid",
    "getuid32",
    "getxattr",
    "inotify_add_watch",
    "inotify_init",
    "inotify_init1",
    "inotify_rm_watch",
    "io_cancel",
    "ioctl",
    "io_destroy",
    "io_getevents",
    "io_pgetevents",
    "io_pgetevents_time64",
    "ioprio_get",
    "ioprio_set",
    "io_setup",
    "io_submit",
    "io_uring_enter",
    "io_uring_register",
    "io_uring_setup",
    "ipc",
    "kill",
    "landlock_add_rule",
    "landlock_create_ruleset",
    "landlock_restrict_self",
    "lchown",
    "lchown32",
    "lgetxattr",
    "link",
    "linkat",
    "listen",
    "listxattr",
    "llistxattr",
    "_llseek",
    "lremovexattr",
    "lseek",
    "lsetxattr",
    "lstat",
    "lstat64",
    "madvise",
    "membarrier",
    "memfd_create",
    "memfd_secret",
    "mincore",
    "mkdir",
    "mkdirat",
    "mknod",
    "mknodat",
    "mlock",
    "mlock2",
    "mlockall",
    "map_shadow_stack",  # kernel v6.6, libseccomp v2.5.5
    "mmap",
    "mmap2",
    "mprotect",
    "mq_getsetattr",
    "mq_notify",
    "mq_open",
    "mq_timedreceive",
    "mq_timedreceive_time64",
    "mq_timedsend",
    "mq_timedsend_time64",
    "mq_unlink",
    "mremap",
    "msgctl",
    "msgget",
    "msgrcv",
    "msgsnd",
    "msync",
    "munlock",
    "munlockall",
    "munmap",
    "name_to_handle_at",
    "nanosleep",
    "newfstatat",
    "_newselect",
    "open",
    "openat",
    "openat2",
    "pause",
    "pidfd_open",
    "pidfd_send_signal",
    "pipe",
    "pipe2",
    "pkey_alloc",
    "pkey_free",
    "pkey_mprotect",
    "poll",
    "ppoll",
    "ppoll_time64",
    "prctl",
    "pread64",
    "preadv",
    "preadv2",
    "prlimit64",
    "process_mrelease",
    "pselect6",
    "pselect6_time64",
    "pwrite64",
    "pwritev",
    "pwritev2",
    "read",
    "readahead",
    "readlink",
    "readlinkat",
    "readv",
    "recv",
    "recvfrom",
    "recvmmsg",
    "recvmmsg_time64",
    "recvmsg",
    "remap_file_pages",
    "removexattr",
    "rename",
    "renameat",
    "renameat2",
    "restart_syscall",
    "rmdir",
    "rseq",
    "rt_sigaction",
    "rt_sigpending",
    "rt_sigprocmask",
    "rt_sigqueueinfo",
    "rt_sigreturn",
    "rt_sigsuspend",
    "rt_sigtimedwait",
    "rt_sigtimedwait_time64",
    "rt_tgsigqueueinfo",
    "sched_getaffinity",
    "sched_getattr",
    "sched_getparam",
    "sched_get_priority_max",
    "sched_get_priority_min",
    "sched_getscheduler",
    "sched_rr_get_interval",
    "sched_rr_get_interval_time64",
    "sched_setaffinity",
    "sched_setattr",
    "sched_setparam",
    "sched_setscheduler",
    "sched_yield",
    "seccomp",
    "select",
    "semctl",
    "semget",
    "semop",
    "semtimedop",
    "semtimedop_time64",
    "send",
    "sendfile",
    "sendfile64",
    "sendmmsg",
    "sendmsg",
    "sendto",
    "setfsgid",
    "setfsgid32",
    "setfsuid",
    "setfsuid32",
    "setgid",
    "setgid32",
    "setgroups",
    "setgroups32",
    "setitimer",
    "setpgid",
    "setpriority",
    "setregid",
    "setregid32",
    "setresgid",
    "setresgid32",
    "setresuid",
    "setresuid32",
    "setreuid",
    "setreuid32",
    "setrlimit",
    "set_robust_list",
    "setsid",
    "setsockopt",
    "set_thread_area",
    "set_tid_address",
    "setuid",
    "setuid32",
    "setxattr",
    "shmat",
    "shmctl",
    "shmdt",
    "shmget",
    "shutdown",
    "sigaltstack",
    "signalfd",
    "signalfd4",
    "sigprocmask",
    "sigreturn",
    "socket",
    "socketcall",
    "socketpair",
    "splice",
    "stat",
    "stat64",
    "statfs",
    "statfs64",
    "statx",
    "symlink",
    "symlinkat",
    "sync",
    "sync_file_range",
    "syncfs",
    "sysinfo",
    "tee",
    "tgkill",
    "time",
    "timer_create",
    "timer_delete",
    "timer_getoverrun",
    "timer_gettime",
    "timer_gettime64",
    "timer_settime",
    "timer_settime64",
    "timerfd_create",
    "timerfd_gettime",
    "timerfd_gettime64",
    "timerfd_settime",
    "timerfd_settime64",
    "times",
    "tkill",
    "truncate",
    "truncate64",
    "ugetrlimit",
    "umask",
    "uname",
    "unlink",
    "unlinkat",
    "utime",
    "utimensat",
    "utimensat_time64",
    "utimes",
    "vfork",
    "vmsplice",
    "wait4",
    "waitid",
    "waitpid",
    "write",
    "writev",
)

# personality(2) personas the profile allows: PER_LINUX, PER_LINUX32,
# UNAME26, PER_LINUX32|UNAME26, and 0xffffffff, which only queries.
_PERSONALITY_VALUES: Final[tuple[int, ...]] = (0x0, 0x0008, 0x20000, 0x20008, 0xFFFFFFFF)

# uname -m (and Go GOARCH) spellings -> the GOARCH containerd switches on.
_GOARCH: Final[Mapping[str, str]] = MappingProxyType(
    {
        "x86_64": "amd64",
        "amd64": "amd64",
        "aarch64": "arm64",
        "arm64": "arm64",
        "armv6l": "arm",
        "armv7l": "arm",
        "armv8l": "arm",
        "arm": "arm",
        "i386": "386",
        "i486": "386",
        "i586": "386",
        "i686": "386",
        "386": "386",
        "ppc64le": "ppc64le",
        "s390": "s390",
        "s390x": "s390x",
        "riscv64": "riscv64",
        "mips64": "mips64",
        "mips64le": "mips64le",
    }
)

# containerd's arches(): the seccomp architectures the filter covers.  A
# GOARCH not listed (386, arm, ppc64le, ...) gets no "architectures" key,
# so only the native ABI is filtered, as in containerd.  (containerd's
# "mipsel64" case is not a GOARCH, so mips64le gets none either.)
_SECCOMP_ARCHES: Final[Mapping[str, tuple[str, ...]]] = MappingProxyType(
    {
        "amd64": ("SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"),
        "arm64": ("SCMP_ARCH_ARM", "SCMP_ARCH_AARCH64"),
        "mips64": ("SCMP_ARCH_MIPS", "SCMP_ARCH_MIPS64", "SCMP_ARCH_MIPS64N32"),
        "s390x": ("SCMP_ARCH_S390", "SCMP_ARCH_S390X"),
        "riscv64": ("SCMP_ARCH_RISCV64",),
    }
)

# Syscalls that only exist on (or are only safe on) one architecture.
_ARCH_SYSCALLS: Final[Mapping[str, tuple[str, ...]]] = MappingProxyType(
    {
        "ppc64le": ("sync_file_range2", "swapcontext"),
        "arm": (
            "arm_fadvise64_64",
            "arm_sync_file_range",
            "sync_file_range2",
            "breakpoint",
            "cacheflush",
            "set_tls",
        ),
        "amd64": ("arch_prctl", "modify_ldt"),
        "386": ("modify_ldt",),
        "s390": ("s390_pci_mmio_read", "s390_pci_mmio_write", "s390_runtime_instr"),
        "riscv64": ("riscv_flush_icache",),
    }
)
# containerd lists "arm" and "arm64" (and "s390"/"s390x") in one case.
_ARCH_SYSCALLS_KEY: Final[Mapping[str, str]] = MappingProxyType({"arm64": "arm", "s390x": "s390"})

# Syscalls the profile allows only when the bounding set holds a capability:
# without it the kernel would refuse them anyway, and these are the syscalls
# with the worst kernel attack surface.
_CAPABILITY_SYSCALLS: Final[Mapping[str, tuple[str, ...]]] = MappingProxyType(
    {
        "CAP_DAC_READ_SEARCH": ("open_by_handle_at",),
        "CAP_SYS_ADMIN": (
            "bpf",
            "clone",
            "clone3",
            "fanotify_init",
            "fsconfig",
            "fsmount",
            "fsopen",
            "fspick",
            "lookup_dcookie",
            "mount",
            "mount_setattr",
            "move_mount",
            "open_tree",
            "perf_event_open",
            "quotactl",
            "quotactl_fd",
            "setdomainname",
            "sethostname",
            "setns",
            "syslog",
            "umount",
            "umount2",
            "unshare",
        ),
        "CAP_SYS_BOOT": ("reboot",),
        "CAP_SYS_CHROOT": ("chroot",),
        "CAP_SYS_MODULE": ("delete_module", "init_module", "finit_module"),
        "CAP_SYS_PACCT": ("acct",),
        "CAP_SYS_PTRACE": (
            "kcmp",
            "pidfd_getfd",
            "process_madvise",
            "process_vm_readv",
            "process_vm_writev",
            "ptrace",
        ),
        "CAP_SYS_RAWIO": ("iopl", "ioperm"),
        "CAP_SYS_TIME": ("settimeofday", "stime", "clock_settime", "clock_settime64"),
        "CAP_SYS_TTY_CONFIG": ("vhangup",),
        "CAP_SYS_NICE": (
            "get_mempolicy",
            "mbind",
            "set_mempolicy",
            "set_mempolicy_home_node",  # kernel v5.17, libseccomp v2.5.4
        ),
        "CAP_SYSLOG": ("syslog",),
        "CAP_BPF": ("bpf",),
        "CAP_PERFMON": ("perf_event_open",),
    }
)

# Without CAP_SYS_ADMIN, clone(2) is allowed only if it creates no new
# namespace: CLONE_NEWNS | CLONE_NEWCGROUP | CLONE_NEWUTS | CLONE_NEWIPC |
# CLONE_NEWUSER | CLONE_NEWPID | CLONE_NEWNET, all of which must be clear.
_CLONE_NAMESPACE_FLAGS: Final = (
    0x00020000  # CLONE_NEWNS
    | 0x02000000  # CLONE_NEWCGROUP
    | 0x04000000  # CLONE_NEWUTS
    | 0x08000000  # CLONE_NEWIPC
    | 0x10000000  # CLONE_NEWUSER
    | 0x20000000  # CLONE_NEWPID
    | 0x40000000  # CLONE_NEWNET
)

# ENOSYS as the *target* architecture numbers it (containerd uses the Go
# build's unix.ENOSYS): 89 on MIPS, 38 everywhere else Linux runs.
_ENOSYS_MIPS: Final = 89
_ENOSYS: Final = 38

# ptrace(2) could be used to bypass seccomp before Linux 4.8, so the
# profile allows it without CAP_SYS_PTRACE only from 4.8 on.
_PTRACE_MIN_KERNEL: Final = (4, 8)

_ACT_ALLOW: Final = "SCMP_ACT_ALLOW"
_ACT_ERRNO: Final = "SCMP_ACT_ERRNO"

_RELEASE: Final = re.compile(r"(\d+)\.(\d+)")


def _host_kernel_version() -> tuple[int, int] | None:
    """Return (version, major revision) of the running kernel, or None.

    Parsed as containerd's kernelversion does: "5.15.0-91-generic" and
    "5.15-1-amd64" are both (5, 15).
    """
    match = _RELEASE.match(platform.release())
    if match is None:
        return None
    return int(match.group(1)), int(match.group(2))


def _allow(names: Iterable[str]) -> SeccompSyscall:
    return {"names": list(names), "action": _ACT_ALLOW}


def default_seccomp_profile(
    arch: str | None = None,
    capabilities: Collection[str] = DEFAULT_CAPABILITIES,
    *,
    kernel_version: tuple[int, int] | None = None,
) -> SeccompProfile:
    """Return containerd's default seccomp profile as an OCI ``linux.seccomp`` object.

    This is the profile the CRI plugin applies for ``RuntimeDefault`` (and
    the legacy "runtime/default" and "docker/default").  containerd applies
    no profile to a privileged container; that decision is the caller's.

    The profile denies every syscall with ``SCMP_ACT_ERRNO`` and allows:

    - :data:`DEFAULT_SECCOMP_SYSCALLS`;
    - ``personality`` for the five personas containerd allows;
    - ``ptrace`` if the kernel is 4.8 or newer;
    - the architecture's own syscalls (``arch_prctl`` and ``modify_ldt`` on
      x86-64, and so on);
    - for each capability in ``capabilities``, the syscalls it guards
      (``mount``, ``unshare``, ``setns``... with ``CAP_SYS_ADMIN``);
    - without ``CAP_SYS_ADMIN``, ``clone`` only if its flags create no
      namespace, and ``clone3`` fails with ``ENOSYS`` (not EPERM), so that
      libc falls back to ``clone`` (moby/moby#42681).

    Like containerd 1.6, the profile has no ``defaultErrnoRet``: runc and
    crun then return EPERM for denied syscalls, which is what Docker's
    explicit ``"defaultErrnoRet": 1`` also gives.

    Go's JSON ``omitempty`` is mirrored, so ``json.dumps`` of the result
    matches containerd's ``config.json`` apart from key order.  The
    capability rules are emitted in capability-number order, which keeps the
    output deterministic when ``capabilities`` is a set.

    Args:
        arch: The machine, as ``uname -m`` ("x86_64", "aarch64") or Go's
            GOARCH ("amd64", "arm64") spells it; ``None`` means this host.
            An architecture containerd does not know gets no
            ``architectures`` and no architecture-specific rules, as in
            containerd.
        capabilities: The container's bounding set, with or without the
            ``CAP_`` prefix; normally the result of :func:`apply_capabilities`.
        kernel_version: (version, major revision) of the kernel the container
            will run on, e.g. ``(5, 15)``; ``None`` means this host.  If the
            host's release cannot be parsed, ``ptrace`` is not allowed, as in
            containerd.

    Returns:
        A new profile; JSON-serialisable with :func:`json.dumps`.

    Raises:
        InvalidArgument: A name in ``capabilities`` is not a Linux capability.
    """
    machine = (platform.machine() if arch is None else arch).lower()
    goarch = _GOARCH.get(machine, machine)
    kernel = _host_kernel_version() if kernel_version is None else kernel_version
    held = {normalize_capability(cap) for cap in capabilities}

    syscalls: list[SeccompSyscall] = [_allow(DEFAULT_SECCOMP_SYSCALLS)]
    syscalls.extend(
        {
            "names": ["personality"],
            "action": _ACT_ALLOW,
            "args": [{"index": 0, "value": persona, "op": "SCMP_CMP_EQ"}],
        }
        for persona in _PERSONALITY_VALUES
    )
    if kernel is not None and kernel >= _PTRACE_MIN_KERNEL:
        syscalls.append(_allow(["ptrace"]))
    arch_syscalls = _ARCH_SYSCALLS.get(_ARCH_SYSCALLS_KEY.get(goarch, goarch))
    if arch_syscalls is not None:
        syscalls.append(_allow(arch_syscalls))
    for cap in ALL_CAPABILITIES:
        if cap in held and cap in _CAPABILITY_SYSCALLS:
            syscalls.append(_allow(_CAPABILITY_SYSCALLS[cap]))

    if "CAP_SYS_ADMIN" not in held:
        # On s390 the kernel's clone takes the stack first and flags second.
        flags_index = 1 if goarch in ("s390", "s390x") else 0
        syscalls.append(
            {
                "names": ["clone"],
                "action": _ACT_ALLOW,
                "args": [
                    {
                        "index": flags_index,
                        "value": _CLONE_NAMESPACE_FLAGS,
                        "op": "SCMP_CMP_MASKED_EQ",
                    }
                ],
            }
        )
        # clone3 passes its flags in a struct seccomp cannot inspect; deny it
        # with ENOSYS so that callers fall back to the filtered clone.
        enosys = _ENOSYS_MIPS if goarch.startswith("mips") else _ENOSYS
        syscalls.append({"names": ["clone3"], "action": _ACT_ERRNO, "errnoRet": enosys})

    profile: SeccompProfile = {"defaultAction": _ACT_ERRNO, "syscalls": syscalls}
    architectures = _SECCOMP_ARCHES.get(goarch)
    if architectures:
        profile["architectures"] = list(architectures)
    return profile
