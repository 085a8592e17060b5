"""OCI runtime-spec ``config.json`` for pod infra processes and containers.

:func:`pod_spec` and :func:`container_spec` turn the validated domain types
of ``pouch.container.model`` (plus the image config and facts about the
host) into an OCI runtime-spec 1.0.2 document for runc 1.1 or crun 1.8.  The
semantics are those of containerd's CRI plugin (v1.7,
``pkg/cri/server/container_create_linux.go``, ``sandbox_run_linux.go`` and
``pkg/cri/opts/spec*.go``), re-expressed; every departure is marked
"unlike containerd" with its reason.

The builders are pure apart from reads: ``os.stat`` of requested devices (and
of ``/dev`` for privileged containers) and ``realpath`` of mount sources.
Files the daemon owns (the image's /etc/passwd, /proc/self/mountinfo, a
Localhost seccomp profile) come in as arguments or through a loader, so that
the manager can read them off the Trio thread.  The small helpers that do
read the host (:func:`oom_score_adj_floor`, :func:`current_capabilities`,
:func:`read_user_db`, :func:`load_seccomp_profile`,
:func:`prepare_mount_sources`) are separate and blocking.

The result is a plain ``dict`` (typed with ``TypedDict``) ready for
``json.dumps``.
"""

from __future__ import annotations

import errno
import json
import os
import posixpath
import re
import socket
import stat
from pathlib import Path
from typing import TYPE_CHECKING, Final, NotRequired, TypedDict, cast

from pouch.container import defaults
from pouch.container.model import (
    Mount,
    MountPropagation,
    NamespaceMode,
    ProfileType,
    SupplementalGroupsPolicy,
)
from pouch.errors import FailedPrecondition, InvalidArgument

if TYPE_CHECKING:
    from collections.abc import Callable, Collection, Iterable, Mapping, Sequence

    from pouch.container.model import (
        ContainerConfig,
        ContainerSecurity,
        LinuxResources,
        PodConfig,
        SecurityProfile,
    )
    from pouch.image.media import ImageConfig

__all__ = [
    "ANNOTATION_CONTAINER_NAME",
    "ANNOTATION_CONTAINER_TYPE",
    "ANNOTATION_IMAGE_NAME",
    "ANNOTATION_SANDBOX_ID",
    "ANNOTATION_SANDBOX_LOG_DIR",
    "ANNOTATION_SANDBOX_NAME",
    "ANNOTATION_SANDBOX_NAMESPACE",
    "ANNOTATION_SANDBOX_UID",
    "DEFAULT_PATH_ENV",
    "OCI_VERSION",
    "SANDBOX_CPU_SHARES",
    "SANDBOX_OOM_SCORE_ADJ",
    "Spec",
    "container_spec",
    "current_capabilities",
    "effective_stop_signal",
    "host_devices",
    "load_seccomp_profile",
    "oom_score_adj_floor",
    "pod_spec",
    "prepare_mount_sources",
    "process_args",
    "read_user_db",
    "resolve_user",
]

#: runtime-spec version written into ``ociVersion`` (runc 1.1.5 speaks 1.0.2-dev).
OCI_VERSION: Final = "1.0.2"
#: containerd's ``oci.WithDefaultPathEnv``.
DEFAULT_PATH_ENV: Final = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
#: containerd's ``defaultSandboxOOMAdj``: the infra process is the last to go.
SANDBOX_OOM_SCORE_ADJ: Final = -998
#: containerd's ``DefaultSandboxCPUshares``.
SANDBOX_CPU_SHARES: Final = 2

# Annotations containerd's CRI plugin sets (pkg/cri/annotations); shims and
# tools such as kata and nerdctl read them.
ANNOTATION_CONTAINER_TYPE: Final = "io.kubernetes.cri.container-type"
ANNOTATION_SANDBOX_ID: Final = "io.kubernetes.cri.sandbox-id"
ANNOTATION_SANDBOX_NAMESPACE: Final = "io.kubernetes.cri.sandbox-namespace"
ANNOTATION_SANDBOX_UID: Final = "io.kubernetes.cri.sandbox-uid"
ANNOTATION_SANDBOX_NAME: Final = "io.kubernetes.cri.sandbox-name"
ANNOTATION_SANDBOX_LOG_DIR: Final = "io.kubernetes.cri.sandbox-log-directory"
ANNOTATION_CONTAINER_NAME: Final = "io.kubernetes.cri.container-name"
ANNOTATION_IMAGE_NAME: Final = "io.kubernetes.cri.image-name"
_ANNOTATION_SANDBOX_CPU_PERIOD: Final = "io.kubernetes.cri.sandbox-cpu-period"
_ANNOTATION_SANDBOX_CPU_QUOTA: Final = "io.kubernetes.cri.sandbox-cpu-quota"
_ANNOTATION_SANDBOX_CPU_SHARES: Final = "io.kubernetes.cri.sandbox-cpu-shares"
_ANNOTATION_SANDBOX_MEMORY: Final = "io.kubernetes.cri.sandbox-memory"

_ETC_HOSTNAME: Final = "/etc/hostname"
_ETC_HOSTS: Final = "/etc/hosts"
_RESOLV_CONF: Final = "/etc/resolv.conf"
_DEV_SHM: Final = "/dev/shm"
_CGROUP_MOUNT: Final = "/sys/fs/cgroup"
# Keys of container_spec's etc_files, in containerd's containerMounts order.
_ETC_FILES: Final = (
    ("hostname", _ETC_HOSTNAME),
    ("hosts", _ETC_HOSTS),
    ("resolv.conf", _RESOLV_CONF),
)

# runc (and containerd's WithUser) accept ids up to MaxInt32.
_MAX_ID: Final = 2**31 - 1
_MAX_USER_FILE: Final = 1 << 20  # containerd bounds /etc/passwd reads too
_MAX_SYMLINKS: Final = 40
_CAP_SYS_RESOURCE_BIT: Final = defaults.ALL_CAPABILITIES.index("CAP_SYS_RESOURCE")
_OOM_SCORE_ADJ_MIN: Final = -1000
_OOM_SCORE_ADJ_MAX: Final = 1000

# Sysctls that belong to a namespace other than the network one
# (runc libcontainer/configs/validate: sysctl(), and kernel ipc/namespace.c).
_IPC_SYSCTLS: Final = frozenset(
    {
        "kernel.msgmax",
        "kernel.msgmnb",
        "kernel.msgmni",
        "kernel.sem",
        "kernel.shmall",
        "kernel.shmmax",
        "kernel.shmmni",
        "kernel.shm_rmid_forced",
    }
)
_UTS_SYSCTLS: Final = frozenset({"kernel.hostname", "kernel.domainname"})

# /dev entries containerd's getDevices skips when it lists host devices.
_SKIPPED_DEV_DIRS: Final = frozenset({"pts", "shm", "fd", "mqueue", ".lxc", ".lxd-mounts", ".udev"})

# proc(5): mountinfo escapes space, tab, newline and backslash as \ooo.
_OCTAL_ESCAPE: Final = re.compile(r"\\([0-7]{3})")

_PROPAGATION_OPTION: Final = {
    MountPropagation.PRIVATE: "rprivate",
    MountPropagation.HOST_TO_CONTAINER: "rslave",
    MountPropagation.BIDIRECTIONAL: "rshared",
}


# --------------------------------------------------------------------------
# config.json shapes (runtime-spec config.md and config-linux.md)
# --------------------------------------------------------------------------


class User(TypedDict):
    uid: int
    gid: int
    additionalGids: NotRequired[list[int]]


class LinuxCapabilities(TypedDict):
    bounding: list[str]
    effective: list[str]
    permitted: list[str]
    inheritable: NotRequired[list[str]]
    ambient: NotRequired[list[str]]


class Process(TypedDict):
    terminal: bool
    user: User
    args: list[str]
    env: list[str]
    cwd: str
    capabilities: LinuxCapabilities
    noNewPrivileges: bool
    oomScoreAdj: NotRequired[int]
    apparmorProfile: NotRequired[str]


class Root(TypedDict):
    path: str
    readonly: bool


class Namespace(TypedDict):
    type: str
    path: NotRequired[str]


class CPU(TypedDict, total=False):
    shares: int
    quota: int
    period: int
    cpus: str
    mems: str


class Memory(TypedDict, total=False):
    limit: int
    swap: int


class HugepageLimit(TypedDict):
    pageSize: str
    limit: int


class Resources(TypedDict):
    devices: list[defaults.DeviceCgroupRule]
    cpu: NotRequired[CPU]
    memory: NotRequired[Memory]
    hugepageLimits: NotRequired[list[HugepageLimit]]
    unified: NotRequired[dict[str, str]]


class Linux(TypedDict):
    namespaces: list[Namespace]
    resources: Resources
    devices: list[defaults.Device]
    cgroupsPath: NotRequired[str]
    maskedPaths: NotRequired[list[str]]
    readonlyPaths: NotRequired[list[str]]
    seccomp: NotRequired[defaults.SeccompProfile]
    sysctl: NotRequired[dict[str, str]]
    rootfsPropagation: NotRequired[str]


class Spec(TypedDict):
    """A runtime-spec ``config.json`` document."""

    ociVersion: str
    process: Process
    root: Root
    mounts: list[defaults.Mount]
    annotations: dict[str, str]
    linux: Linux
    hostname: NotRequired[str]


# --------------------------------------------------------------------------
# Host facts (blocking reads; call them once, or off the event loop)
# --------------------------------------------------------------------------


def _status_mask(status: str, field: str) -> int:
    for line in status.splitlines():
        name, _, value = line.partition(":")
        if name == field:
            return int(value.strip(), 16)
    raise ValueError(f"no {field} in /proc/self/status")


def oom_score_adj_floor(status: str | None = None, oom_score_adj: str | None = None) -> int:
    """The lowest ``oomScoreAdj`` a container of this daemon can be given.

    Lowering an oom_score_adj below the current one needs CAP_SYS_RESOURCE
    (kernel ``__set_oom_adj``).  If the daemon's bounding set lacks it (as in
    a container or a restricted sandbox), runc would fail to start anything
    asking for less than the daemon's own value, so containerd clamps
    (``restrictOOMScoreAdj``, with ``restrict_oom_score_adj``).

    Args:
        status: The text of /proc/self/status; read when ``None``.
        oom_score_adj: The text of /proc/self/oom_score_adj; read when ``None``.

    Returns:
        -1000 if CAP_SYS_RESOURCE is in the bounding set, else the daemon's
        own oom_score_adj.
    """
    if status is None:
        status = Path("/proc/self/status").read_text()
    if _status_mask(status, "CapBnd") >> _CAP_SYS_RESOURCE_BIT & 1:
        return _OOM_SCORE_ADJ_MIN
    if oom_score_adj is None:
        oom_score_adj = Path("/proc/self/oom_score_adj").read_text()
    return int(oom_score_adj.strip())


def current_capabilities(status: str | None = None) -> frozenset[str]:
    """The daemon's effective capabilities, as containerd's ``cap.Current()``.

    A privileged container (or "ALL" in add_capabilities) gets these rather
    than every capability the kernel knows: runc cannot grant a capability
    its own bounding set lacks.

    Args:
        status: The text of /proc/self/status; read when ``None``.
    """
    if status is None:
        status = Path("/proc/self/status").read_text()
    mask = _status_mask(status, "CapEff")
    return frozenset(cap for bit, cap in enumerate(defaults.ALL_CAPABILITIES) if mask >> bit & 1)


def _rootfs_path(rootfs: Path, path: str) -> Path:
    """``path`` inside ``rootfs``, with symlinks resolved as if rootfs were "/".

    Like containerd's ``fs.RootPath`` (securejoin): an image cannot point
    /etc/passwd at a file of the host.
    """
    pending = [part for part in path.split("/") if part]
    resolved: list[str] = []
    links = 0
    while pending:
        part = pending.pop(0)
        if part == ".":
            continue
        if part == "..":
            if resolved:
                resolved.pop()
            continue
        candidate = rootfs.joinpath(*resolved, part)
        try:
            mode = os.lstat(candidate).st_mode
        except FileNotFoundError:
            resolved.append(part)
            continue
        if not stat.S_ISLNK(mode):
            resolved.append(part)
            continue
        links += 1
        if links > _MAX_SYMLINKS:
            raise OSError(errno.ELOOP, "too many levels of symbolic links", str(candidate))
        target = os.readlink(candidate)
        if target.startswith("/"):
            resolved = []
        pending[:0] = [p for p in target.split("/") if p]
    return rootfs.joinpath(*resolved)


def _read_rootfs_file(rootfs: Path, path: str) -> str | None:
    try:
        with _rootfs_path(rootfs, path).open("rb") as f:
            data = f.read(_MAX_USER_FILE + 1)
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        return None
    except OSError as exc:  # a symlink loop, a FIFO, no permission: the image's fault
        raise InvalidArgument(f"cannot read the image's {path}: {exc.strerror}") from exc
    if len(data) > _MAX_USER_FILE:
        raise InvalidArgument(f"the image's {path} is larger than {_MAX_USER_FILE} bytes")
    return data.decode(errors="replace")


def read_user_db(rootfs: Path) -> tuple[str | None, str | None]:
    """Read the image's /etc/passwd and /etc/group (``None`` where missing).

    Symlinks are resolved inside ``rootfs``.  Blocking.

    Raises:
        InvalidArgument: A file is larger than 1 MiB, or exists but cannot be read.
    """
    return _read_rootfs_file(rootfs, "/etc/passwd"), _read_rootfs_file(rootfs, "/etc/group")


def load_seccomp_profile(path: str) -> defaults.SeccompProfile:
    """Load a Localhost seccomp profile: an OCI ``LinuxSeccomp`` JSON object.

    As containerd's ``seccomp.WithProfile``, the file is the runtime-spec
    object itself (``defaultAction``, ``architectures``, ``syscalls``);
    Docker-only keys such as ``archMap`` are passed through for the runtime
    to ignore.  Blocking.

    Raises:
        InvalidArgument: The file cannot be read or is not such an object.
    """
    try:
        doc = json.loads(Path(path).read_bytes())
    except OSError as exc:
        raise InvalidArgument(f"cannot load seccomp profile {path!r}: {exc.strerror}") from exc
    except ValueError as exc:
        raise InvalidArgument(f"seccomp profile {path!r} is not valid JSON: {exc}") from exc
    if not isinstance(doc, dict) or not isinstance(doc.get("defaultAction"), str):
        raise InvalidArgument(f"seccomp profile {path!r} has no defaultAction")
    doc.setdefault("syscalls", [])
    return cast("defaults.SeccompProfile", doc)


def prepare_mount_sources(ctr: ContainerConfig) -> None:
    """Create missing host paths of the container's mounts, as directories.

    containerd (and Docker before it) does this in ``WithMounts`` rather than
    failing: a Kubernetes hostPath volume with no ``type`` relies on it.
    Call it before :func:`container_spec`, off the event loop.

    Raises:
        InvalidArgument: A host path cannot be created; the message names it.
    """
    for i, mount in enumerate(ctr.mounts):
        if os.path.lexists(mount.host_path):
            continue
        try:
            os.makedirs(mount.host_path, mode=0o755, exist_ok=True)
        except OSError as exc:
            raise InvalidArgument(
                f"config.mounts[{i}].host_path: cannot create {mount.host_path!r}: {exc.strerror}"
            ) from exc


# --------------------------------------------------------------------------
# Users and groups
# --------------------------------------------------------------------------


def _passwd_entries(text: str | None) -> list[tuple[str, int, int]]:
    """(name, uid, gid) of each well-formed /etc/passwd line."""
    entries = []
    for line in (text or "").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        fields = line.split(":")
        # Unlike moby/sys/user, a line with a missing or garbled uid is
        # skipped rather than read as uid 0.
        if len(fields) < 4 or not fields[2].isdigit() or not fields[3].isdigit():
            continue
        entries.append((fields[0], int(fields[2]), int(fields[3])))
    return entries


def _group_entries(text: str | None) -> list[tuple[str, int, tuple[str, ...]]]:
    """(name, gid, members) of each well-formed /etc/group line."""
    entries = []
    for line in (text or "").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        fields = line.split(":")
        if len(fields) < 3 or not fields[2].isdigit():
            continue
        members = fields[3].split(",") if len(fields) > 3 else []
        entries.append((fields[0], int(fields[2]), tuple(m.strip() for m in members if m.strip())))
    return entries


def _numeric_id(text: str, user_spec: str, what: str) -> int | None:
    """``int(text)`` if ``text`` is a number (Go ``strconv.Atoi``), else ``None``."""
    body = text[1:] if text[:1] in "+-" else text
    if not body.isdigit():
        return None
    value = int(text)
    if not 0 <= value <= _MAX_ID:
        raise InvalidArgument(f"invalid user {user_spec!r}: {what} out of range")
    return value


def resolve_user(
    user_spec: str, passwd: str | None, group: str | None
) -> tuple[int, int, tuple[int, ...]]:
    """Resolve an image-style user against the image's /etc/passwd and /etc/group.

    Follows containerd's ``oci.WithUser`` and ``WithAdditionalGIDs``:

    - "" is root (uid 0, gid 0);
    - "uid": the first passwd entry with that uid gives the gid; if there is
      none (or no /etc/passwd) the gid is 0;
    - "name": the passwd entry must exist;
    - "user:group": each part is a number or a name; a name must exist, a
      number is used as is; an empty group part is gid 0.
    - Additional gids are the primary gid plus every group listing the user
      (by name; a numeric user is first turned into its name) as a member,
      except a group named like the user; sorted, without duplicates.

    Args:
        user_spec: "name", "uid", "uid:gid", "name:group", ...
        passwd: The image's /etc/passwd, ``None`` if it has none.
        group: The image's /etc/group, ``None`` if it has none.

    Returns:
        (uid, gid, additional gids).

    Raises:
        InvalidArgument: The spec is malformed, out of range, or names a
            user or group the image does not have.
    """
    parts = user_spec.split(":") if user_spec else ["0"]
    if len(parts) > 2:
        raise InvalidArgument(f"invalid user {user_spec!r}")
    users = _passwd_entries(passwd)
    groups = _group_entries(group)

    user_part = parts[0]
    uid = _numeric_id(user_part, user_spec, "uid")
    username: str | None = None
    if uid is None:
        found = next((u for u in users if u[0] == user_part), None)
        if found is None:
            raise InvalidArgument(f"no user {user_part!r} in the image's /etc/passwd")
        username, uid, gid = found
    else:
        found = next((u for u in users if u[1] == uid), None)
        if found is not None:
            username = found[0]
        gid = found[2] if found is not None else 0

    if len(parts) == 2:
        group_part = parts[1]
        numeric_gid = _numeric_id(group_part, user_spec, "gid")
        if numeric_gid is not None:
            gid = numeric_gid
        elif not group_part:
            gid = 0  # Go: neither a number nor a name, so the zero value
        else:
            named = next((g for g in groups if g[0] == group_part), None)
            if named is None:
                raise InvalidArgument(f"no group {group_part!r} in the image's /etc/group")
            gid = named[1]

    additional = {gid}
    if username is not None:
        additional.update(g[1] for g in groups if g[0] != username and username in g[2])
    return uid, gid, tuple(sorted(additional))


def _user_spec(sec: ContainerSecurity, image: ImageConfig) -> str:
    """containerd ``generateUserString``, then the image's User."""
    if sec.run_as_username:
        user = sec.run_as_username
    elif sec.run_as_user is not None:
        user = str(sec.run_as_user)
    else:
        return image.user
    return f"{user}:{sec.run_as_group}" if sec.run_as_group is not None else user


# --------------------------------------------------------------------------
# Process
# --------------------------------------------------------------------------


def process_args(ctr: ContainerConfig, image: ImageConfig) -> list[str]:
    """The container's argv, merged as Kubernetes (and Docker) do.

    ``command`` replaces the image's Entrypoint and ``args`` its Cmd; a
    ``command`` without ``args`` does not use the image's Cmd.  An image
    Entrypoint of ``[""]`` means "no entrypoint".

    Raises:
        InvalidArgument: Nothing to run.
    """
    command, args = list(ctr.command), list(ctr.args)
    if not command:
        if not args:
            args = list(image.cmd)
        if image.entrypoint != ("",):
            command = list(image.entrypoint)
    argv = command + args
    if not argv:
        raise InvalidArgument(
            "config.command is required: the image has neither an entrypoint nor a cmd"
        )
    return argv


def _merge_env(env: list[str], overrides: Iterable[str]) -> list[str]:
    """Set or append each ``KEY=value``; a bare ``KEY`` unsets it.

    The later of two equal keys wins, keeping the first one's position, as
    runc's init does (``os.Setenv`` per entry) with containerd's list.
    """
    merged: dict[str, str | None] = {}
    for entry in env:
        key, _, _ = entry.partition("=")
        merged[key] = entry
    for entry in overrides:
        key, sep, _ = entry.partition("=")
        merged[key] = entry if sep else None
    return [entry for entry in merged.values() if entry is not None]


def effective_stop_signal(ctr: ContainerConfig, image: ImageConfig) -> str:
    """The signal that stops the container: the CRI's, the image's, or SIGTERM."""
    signal = ctr.stop_signal or image.stop_signal or "SIGTERM"
    return signal if signal.startswith("SIG") or signal.isdigit() else "SIG" + signal.upper()


# --------------------------------------------------------------------------
# Devices
# --------------------------------------------------------------------------


def _device_from(path: str, st: os.stat_result) -> defaults.Device | None:
    if stat.S_ISBLK(st.st_mode):
        kind = "b"
    elif stat.S_ISCHR(st.st_mode):
        kind = "c"
    else:
        return None
    return {
        "path": path,
        "type": kind,
        "major": os.major(st.st_rdev),
        "minor": os.minor(st.st_rdev),
        "fileMode": stat.S_IMODE(st.st_mode),
        "uid": st.st_uid,
        "gid": st.st_gid,
    }


def _devices_under(host_dir: str, container_dir: str) -> list[defaults.Device]:
    """containerd ``getDevices`` on a directory: device nodes, recursively."""
    out: list[defaults.Device] = []
    with os.scandir(host_dir) as entries:
        for entry in sorted(entries, key=lambda e: e.name):
            target = posixpath.join(container_dir, entry.name)
            if entry.is_dir(follow_symlinks=False):
                if entry.name not in _SKIPPED_DEV_DIRS:
                    out.extend(_devices_under(entry.path, target))
                continue
            if entry.name == "console":
                continue
            try:
                st = os.lstat(entry.path)
            except FileNotFoundError:
                continue
            device = _device_from(target, st)
            if device is not None:
                out.append(device)
    return out


def host_devices(root: str = "/dev") -> list[defaults.Device]:
    """Every device node under ``root``, as a privileged container gets them.

    As containerd's ``oci.HostDevices``: pts, shm, fd and mqueue are skipped,
    as are /dev/console and anything that is not a block or character device.
    """
    return _devices_under(root, root)


def _requested_devices(ctr: ContainerConfig) -> list[tuple[defaults.Device, str]]:
    """(device, cgroup access) for each node the CRI ``devices`` name."""
    out: list[tuple[defaults.Device, str]] = []
    for i, dev in enumerate(ctr.devices):
        where = f"config.devices[{i}].host_path"
        try:
            # stat, not lstat: containerd resolves symlinks first.
            st = os.stat(dev.host_path)
        except OSError as exc:
            raise InvalidArgument(
                f"{where}: cannot stat {dev.host_path!r}: {exc.strerror}"
            ) from exc
        if stat.S_ISDIR(st.st_mode):
            out.extend(
                (d, dev.permissions) for d in _devices_under(dev.host_path, dev.container_path)
            )
            continue
        device = _device_from(dev.container_path, st)
        if device is None:
            raise InvalidArgument(f"{where}: {dev.host_path!r} is not a device node")
        out.append((device, dev.permissions))
    return out


def _device_list(*groups: Iterable[defaults.Device]) -> list[defaults.Device]:
    """Concatenate, a later entry replacing an earlier one with the same path."""
    by_path: dict[str, defaults.Device] = {}
    for group in groups:
        for device in group:
            by_path[device["path"]] = device
    return list(by_path.values())


# --------------------------------------------------------------------------
# Mounts
# --------------------------------------------------------------------------


def _mount_point(path: str, mountinfo: str) -> tuple[str, str]:
    """(mount point, optional fields) of the mount holding ``path`` (proc(5))."""
    best = ("", "")
    for line in mountinfo.splitlines():
        fields = line.split(" ")
        if len(fields) < 7 or "-" not in fields[6:]:
            continue
        point = _OCTAL_ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), fields[4])
        optional = " ".join(fields[6 : fields.index("-", 6)])
        inside = path == point or path.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best[0]):
            best = (point, optional)
    return best


def _check_propagation(source: str, mount: Mount, where: str, mountinfo: str) -> None:
    """containerd ``ensureShared``/``ensureSharedOrSlave`` on the source's mount."""
    point, optional = _mount_point(source, mountinfo)
    tags = optional.split()
    shared = any(t.startswith("shared:") for t in tags)
    slave = any(t.startswith("master:") for t in tags)
    if mount.propagation is MountPropagation.BIDIRECTIONAL and not shared:
        raise FailedPrecondition(
            f"{where}: path {source!r} is mounted on {point!r} but it is not a shared mount"
        )
    if mount.propagation is MountPropagation.HOST_TO_CONTAINER and not (shared or slave):
        raise FailedPrecondition(
            f"{where}: path {source!r} is mounted on {point!r}"
            " but it is not a shared or slave mount"
        )


def _parts(path: str) -> int:
    return posixpath.normpath(path).count("/")


# --------------------------------------------------------------------------
# Security
# --------------------------------------------------------------------------


def _capability_set(
    sec: ContainerSecurity, available: Collection[str] | None
) -> tuple[list[str], list[str]]:
    """(bounding = effective = permitted, ambient) for a container."""
    caps = sec.capabilities
    requested = (*caps.add, *caps.add_ambient)
    final = defaults.apply_capabilities(requested, caps.drop, privileged=sec.privileged)
    if available is not None:
        # containerd grants "ALL" and privileged as cap.Current(): what the
        # daemon holds.  Named additions stay, and fail in runc if not held.
        if sec.privileged:
            final = [cap for cap in final if cap in available]
        elif "ALL" in caps.add:
            named = set(requested)
            final = [cap for cap in final if cap in available or cap in named]
    # Unlike containerd (which clears ambient, kubernetes#56374), ambient
    # capabilities are granted as cri-api Capability documents; they must
    # also be inheritable and permitted.
    ambient = [cap for cap in caps.add_ambient if cap in final]
    return final, list(dict.fromkeys(ambient))


def _capabilities_json(caps: list[str], ambient: list[str]) -> LinuxCapabilities:
    out: LinuxCapabilities = {
        "bounding": list(caps),
        "effective": list(caps),
        "permitted": list(caps),
    }
    if ambient:
        out["inheritable"] = list(ambient)
        out["ambient"] = list(ambient)
    return out


def _seccomp(
    profile: SecurityProfile,
    *,
    privileged: bool,
    capabilities: Collection[str],
    loader: Callable[[str], defaults.SeccompProfile],
) -> defaults.SeccompProfile | None:
    """containerd ``generateSeccompSpecOpts``: no filter for privileged or Unconfined."""
    if privileged or profile.type is ProfileType.UNCONFINED:
        return None
    if profile.type is ProfileType.RUNTIME_DEFAULT:
        return defaults.default_seccomp_profile(capabilities=capabilities)
    return loader(profile.localhost_ref)


def _apparmor(
    profile: SecurityProfile, *, privileged: bool, host_has_apparmor: bool, default: str | None
) -> str | None:
    """containerd ``generateApparmorSpecOpts``, minus loading a default profile."""
    if profile.type is ProfileType.UNCONFINED:
        return None
    if profile.type is ProfileType.LOCALHOST:
        if not host_has_apparmor:
            # containerd: "apparmor is not supported" rather than run unconfined.
            raise InvalidArgument(
                "config.linux.security_context.apparmor: AppArmor is not enabled on this host"
            )
        return profile.localhost_ref
    # RuntimeDefault.  Unlike containerd, a host without AppArmor runs the
    # container unconfined instead of failing: the kubelet asks for the
    # default whenever nothing is set.
    if privileged or not host_has_apparmor:
        return None
    return default


def _sysctls(sysctls: Mapping[str, str], *, host_network: bool, host_ipc: bool) -> dict[str, str]:
    """The pod's sysctls minus those of namespaces the pod shares with the node.

    runc refuses a net.* sysctl in the host network namespace, and writing
    an IPC or UTS one there would change the node.
    """
    out = {}
    for key, value in sysctls.items():
        name = key.replace("/", ".")
        if host_network and (name.startswith("net.") or name in _UTS_SYSCTLS):
            continue
        if host_ipc and (name in _IPC_SYSCTLS or name.startswith("fs.mqueue.")):
            continue
        out[key] = value
    return out


def _clamp_oom_score_adj(adj: int, floor: int) -> int:
    return min(max(adj, floor, _OOM_SCORE_ADJ_MIN), _OOM_SCORE_ADJ_MAX)


def resources_json(
    res: LinuxResources,
    *,
    cgroup_v2: bool,
    swap_controller: bool,
    hugetlb_controller: bool,
) -> tuple[CPU, Memory, list[HugepageLimit], dict[str, str]]:
    """containerd ``WithResources``: 0 and "" stay unset."""
    cpu: CPU = {}
    if res.cpu_period:
        cpu["period"] = res.cpu_period
    if res.cpu_quota:
        cpu["quota"] = res.cpu_quota
    if res.cpu_shares:
        cpu["shares"] = res.cpu_shares
    if res.cpuset_cpus:
        cpu["cpus"] = res.cpuset_cpus
    if res.cpuset_mems:
        cpu["mems"] = res.cpuset_mems
    memory: Memory = {}
    if res.memory_limit_in_bytes:
        memory["limit"] = res.memory_limit_in_bytes
        # "swap/memory limit should be equal to prevent container from
        # swapping by default" (containerd); only if the kernel accounts swap.
        if not res.memory_swap_limit_in_bytes and swap_controller:
            memory["swap"] = res.memory_limit_in_bytes
    if res.memory_swap_limit_in_bytes and swap_controller:
        memory["swap"] = res.memory_swap_limit_in_bytes
    # Without the hugetlb controller containerd (tolerate_missing_hugetlb_controller,
    # on by default) drops the limits rather than failing.
    hugepages: list[HugepageLimit] = (
        [{"pageSize": h.page_size, "limit": h.limit} for h in res.hugepage_limits]
        if hugetlb_controller
        else []
    )
    if res.unified and not cgroup_v2:
        raise InvalidArgument("config.linux.resources.unified needs a cgroup v2 host")
    return cpu, memory, hugepages, dict(res.unified)


def _namespace(kind: str, path: str | None = None) -> Namespace:
    return {"type": kind, "path": path} if path else {"type": kind}


def _joined(pod_namespaces: Mapping[str, str], key: str, kind: str) -> Namespace:
    try:
        return _namespace(kind, pod_namespaces[key])
    except KeyError:
        raise ValueError(f"pod_namespaces has no {key!r} path to join") from None


# --------------------------------------------------------------------------
# The pod's infra process
# --------------------------------------------------------------------------


def _sandbox_annotations(pod: PodConfig, sandbox_id: str) -> dict[str, str]:
    return {
        ANNOTATION_SANDBOX_ID: sandbox_id,
        ANNOTATION_SANDBOX_NAMESPACE: pod.metadata.namespace,
        ANNOTATION_SANDBOX_UID: pod.metadata.uid,
        ANNOTATION_SANDBOX_NAME: pod.metadata.name,
    }


def pod_spec(
    pod: PodConfig,
    *,
    sandbox_id: str,
    rootfs: Path,
    infra_argv: Sequence[str],
    netns_path: str | None,
    cgroups_path: str,
    oom_score_adj_floor: int,
    shm_path: str | None = None,
    resolv_conf_path: str | None = None,
    extra_mounts: Sequence[defaults.Mount] = (),
    seccomp_profile_loader: Callable[[str], defaults.SeccompProfile] = load_seccomp_profile,
) -> Spec:
    """The spec of a pod's infra process (``catatonit -P``), which owns its namespaces.

    As containerd's ``sandboxContainerSpec``: a read-only rootfs, the
    default capabilities, masked and read-only paths, no new privileges, the
    pod's hostname (only with a UTS namespace of its own, i.e. unless the
    network is the node's), its sysctls, cpu shares 2, oom_score_adj -998
    (clamped to ``oom_score_adj_floor``), the pod's seccomp profile (none if
    privileged), and the ``io.kubernetes.cri.*`` sandbox annotations.

    Args:
        pod: The pod.
        sandbox_id: The sandbox's id (an annotation).
        rootfs: The minimal root filesystem the daemon provides.
        infra_argv: The infra process, e.g. ``["/catatonit", "-P"]``.
        netns_path: The pinned network namespace to join, or ``None`` to let
            the runtime create one; unused when the network is the node's.
        cgroups_path: ``linux.cgroupsPath``, chosen by the cgroup driver.
        oom_score_adj_floor: See :func:`oom_score_adj_floor`.
        shm_path: Host path of the pod's /dev/shm tmpfs, bound read-only;
            ``None`` keeps a private tmpfs.  Ignored with host IPC, which
            binds the node's /dev/shm.
        resolv_conf_path: Host path of the pod's resolv.conf, bound read-only.
        extra_mounts: OCI mounts appended last (e.g. the infra binary).
        seccomp_profile_loader: Loads a Localhost profile by path.

    Returns:
        The config.json document.

    Raises:
        InvalidArgument: The Localhost seccomp profile cannot be loaded.
    """
    if not infra_argv:
        raise ValueError("infra_argv is empty")
    sec = pod.security
    ns_opts = sec.namespace_options
    host_network = ns_opts.network is NamespaceMode.NODE
    host_ipc = ns_opts.ipc is NamespaceMode.NODE

    namespaces: list[Namespace] = [_namespace("mount")]
    if not host_network:
        namespaces.append(_namespace("network", netns_path))
        namespaces.append(_namespace("uts"))
    if ns_opts.pid is not NamespaceMode.NODE:
        namespaces.append(_namespace("pid"))
    if not host_ipc:
        namespaces.append(_namespace("ipc"))

    mounts = [
        m
        for m in defaults.default_mounts()
        # The CRI cgroup mount is for containers; the infra process needs none.
        if m["destination"] != _CGROUP_MOUNT
        and not (m["destination"] == _DEV_SHM and (shm_path is not None or host_ipc))
    ]
    # "the nosuid, nodev, noexec flags are required [with user namespaces];
    # just use them unconditionally" (containerd).
    bind_ro = ["rbind", "ro", "nosuid", "nodev", "noexec"]
    shm_source = _DEV_SHM if host_ipc else shm_path
    if shm_source is not None:
        mounts.append(
            {"destination": _DEV_SHM, "type": "bind", "source": shm_source, "options": bind_ro}
        )
    if resolv_conf_path is not None:
        mounts.append(
            {
                "destination": _RESOLV_CONF,
                "type": "bind",
                "source": resolv_conf_path,
                "options": list(bind_ro),
            }
        )
    mounts.extend(extra_mounts)

    uid = sec.run_as_user if sec.run_as_user is not None else 0
    gid = sec.run_as_group if sec.run_as_group is not None else 0
    groups = set(sec.supplemental_groups)
    if sec.run_as_user is not None:
        groups.add(gid)  # oci.WithUser's ensureAdditionalGids
    user: User = {"uid": uid, "gid": gid}
    if groups:
        user["additionalGids"] = sorted(groups)

    caps = list(defaults.DEFAULT_CAPABILITIES)
    annotations = _sandbox_annotations(pod, sandbox_id)
    annotations[ANNOTATION_SANDBOX_LOG_DIR] = pod.log_directory
    if pod.resources is not None:
        res = pod.resources
        annotations[_ANNOTATION_SANDBOX_CPU_PERIOD] = str(res.cpu_period)
        annotations[_ANNOTATION_SANDBOX_CPU_QUOTA] = str(res.cpu_quota)
        annotations[_ANNOTATION_SANDBOX_CPU_SHARES] = str(res.cpu_shares)
        annotations[_ANNOTATION_SANDBOX_MEMORY] = str(res.memory_limit_in_bytes)
    annotations[ANNOTATION_CONTAINER_TYPE] = "sandbox"

    linux: Linux = {
        "namespaces": namespaces,
        "cgroupsPath": cgroups_path,
        "resources": {
            "devices": defaults.default_device_cgroup_rules(),
            "cpu": {"shares": SANDBOX_CPU_SHARES},
        },
        "devices": defaults.default_devices(),
        "maskedPaths": list(defaults.DEFAULT_MASKED_PATHS),
        "readonlyPaths": list(defaults.DEFAULT_READONLY_PATHS),
    }
    sysctls = _sysctls(pod.sysctls, host_network=host_network, host_ipc=host_ipc)
    if sysctls:
        linux["sysctl"] = sysctls
    seccomp = _seccomp(
        sec.seccomp, privileged=sec.privileged, capabilities=caps, loader=seccomp_profile_loader
    )
    if seccomp is not None:
        linux["seccomp"] = seccomp

    spec: Spec = {
        "ociVersion": OCI_VERSION,
        "process": {
            "terminal": False,
            "user": user,
            "args": list(infra_argv),
            "env": [DEFAULT_PATH_ENV],
            "cwd": "/",
            "capabilities": _capabilities_json(caps, []),
            "noNewPrivileges": True,
            "oomScoreAdj": _clamp_oom_score_adj(SANDBOX_OOM_SCORE_ADJ, oom_score_adj_floor),
        },
        "root": {"path": str(rootfs), "readonly": True},
        "mounts": mounts,
        "annotations": annotations,
        "linux": linux,
    }
    if pod.hostname and not host_network:
        spec["hostname"] = pod.hostname
    return spec


# --------------------------------------------------------------------------
# Containers
# --------------------------------------------------------------------------


def _bind(
    mount: Mount,
    where: str,
    *,
    mountinfo: str | None,
    recursive_readonly_mounts: bool,
) -> defaults.Mount:
    """containerd ``WithMounts`` for one CRI mount: an rbind with its propagation."""
    source = os.path.realpath(mount.host_path)
    if mountinfo is not None and mount.propagation is not MountPropagation.PRIVATE:
        _check_propagation(source, mount, where, mountinfo)
    options = ["rbind", _PROPAGATION_OPTION[mount.propagation], "ro" if mount.readonly else "rw"]
    if mount.recursive_read_only:
        if not recursive_readonly_mounts:
            raise InvalidArgument(
                f"{where}.recursive_read_only: the OCI runtime cannot make mounts"
                " recursively read-only"
            )
        options.append("rro")
    return {
        "destination": mount.container_path,
        "type": "bind",
        "source": source,
        "options": options,
    }


def _container_mounts(
    pod: PodConfig,
    ctr: ContainerConfig,
    *,
    etc_files: Mapping[str, str | os.PathLike[str]],
    shm_path: str | None,
    extra_mounts: Sequence[Mount],
    mountinfo: str | None,
    recursive_readonly_mounts: bool,
) -> tuple[list[defaults.Mount], str | None]:
    """(mounts, rootfsPropagation) as containerd's containerMounts + WithMounts."""
    sec = ctr.security
    # The pod's files, read-only with a read-only rootfs (containerMounts).
    extras: list[tuple[Mount, str]] = []
    for key, destination in _ETC_FILES:
        source = etc_files.get(key)
        if source is not None:
            extras.append(
                (
                    Mount(destination, os.fspath(source), readonly=sec.readonly_rootfs),
                    f"etc_files[{key!r}]",
                )
            )
    shm_source = _DEV_SHM if pod.namespace_options.ipc is NamespaceMode.NODE else shm_path
    if shm_source is not None:
        extras.append((Mount(_DEV_SHM, shm_source), "shm_path"))
    extras.extend((m, f"extra_mounts[{i}]") for i, m in enumerate(extra_mounts))

    requested = [(m, f"config.mounts[{i}]") for i, m in enumerate(ctr.mounts)]
    overridden = {posixpath.normpath(m.container_path) for m, _ in requested}
    chosen = requested + [
        (m, where) for m, where in extras if posixpath.normpath(m.container_path) not in overridden
    ]
    # Fewer path parts first, so that a mount never hides a deeper one
    # (containerd orderedMounts, from Docker); stable for equal depths.
    chosen.sort(key=lambda pair: _parts(pair[0].container_path))
    destinations = {posixpath.normpath(m.container_path) for m, _ in chosen}

    mounts = [
        m
        for m in defaults.default_mounts(privileged=sec.privileged)
        if posixpath.normpath(m["destination"]) not in destinations
        and not ("/dev" in destinations and m["destination"].startswith("/dev/"))
    ]
    propagation: str | None = None
    for mount, where in chosen:
        mounts.append(
            _bind(
                mount,
                where,
                mountinfo=mountinfo,
                recursive_readonly_mounts=recursive_readonly_mounts,
            )
        )
        # runc's default root propagation is rprivate; a shared or slave
        # volume needs the rootfs to be at least as open (containerd).
        if mount.propagation is MountPropagation.BIDIRECTIONAL:
            propagation = "rshared"
        elif mount.propagation is MountPropagation.HOST_TO_CONTAINER and propagation != "rshared":
            propagation = "rslave"
    return mounts, propagation


def _container_namespaces(
    pod: PodConfig,
    ctr: ContainerConfig,
    pod_namespaces: Mapping[str, str],
    target_pid_namespace: str | None,
    *,
    cgroup_v2: bool,
) -> list[Namespace]:
    """containerd ``WithPodNamespaces``: join the pod's, keep the mount namespace."""
    pod_ns = pod.namespace_options
    namespaces = [_namespace("mount")]
    # With the node's network the pod has no UTS namespace either
    # (sandboxContainerSpec), so its containers see the node's hostname.
    if pod_ns.network is not NamespaceMode.NODE:
        namespaces.append(_joined(pod_namespaces, "net", "network"))
        namespaces.append(_joined(pod_namespaces, "uts", "uts"))
    if pod_ns.ipc is not NamespaceMode.NODE:
        namespaces.append(_joined(pod_namespaces, "ipc", "ipc"))
    pid = ctr.security.namespace_options.pid
    if pid is NamespaceMode.CONTAINER:
        namespaces.append(_namespace("pid"))
    elif pid is NamespaceMode.TARGET:
        if target_pid_namespace is None:
            raise ValueError("pid mode TARGET needs target_pid_namespace")
        namespaces.append(_namespace("pid", target_pid_namespace))
    elif pid is NamespaceMode.POD and pod_ns.pid is not NamespaceMode.NODE:
        namespaces.append(_joined(pod_namespaces, "pid", "pid"))
    # NODE (or a POD mode in a host-pid pod): the node's pid namespace.
    if cgroup_v2 and not ctr.security.privileged:
        # containerd hides the host's cgroup tree on cgroup v2 only (cgroup
        # v1 and privileged containers keep the host's, for compatibility).
        namespaces.append(_namespace("cgroup"))
    return namespaces


def container_spec(
    pod: PodConfig,
    ctr: ContainerConfig,
    image: ImageConfig,
    *,
    sandbox_id: str,
    rootfs: Path,
    pod_namespaces: Mapping[str, str],
    etc_files: Mapping[str, str | os.PathLike[str]],
    shm_path: str | None,
    passwd: str | None,
    group: str | None,
    cgroups_path: str,
    oom_score_adj_floor: int,
    host_has_apparmor: bool,
    seccomp_profile_loader: Callable[[str], defaults.SeccompProfile] = load_seccomp_profile,
    target_pid_namespace: str | None = None,
    image_name: str | None = None,
    node_hostname: str | None = None,
    available_capabilities: Collection[str] | None = None,
    apparmor_default_profile: str | None = None,
    extra_mounts: Sequence[Mount] = (),
    mountinfo: str | None = None,
    cgroup_v2: bool = False,
    swap_controller: bool = False,
    hugetlb_controller: bool = True,
    recursive_readonly_mounts: bool = False,
) -> Spec:
    """The spec of a container in a pod, as containerd's CRI plugin builds it.

    Args:
        pod: The container's pod.
        ctr: The container.
        image: The image's config (Entrypoint, Cmd, Env, User, WorkingDir).
        sandbox_id: The pod's sandbox id (an annotation).
        rootfs: The container's prepared root filesystem.
        pod_namespaces: Paths of the pod's namespaces to join, by /proc
            name: "net", "uts", "ipc", "pid" (the infra's /proc/<pid>/ns/...
            or pinned files).  Only those the pod owns are needed: none for
            the network and UTS with the node's network, no "ipc" with host
            IPC, "pid" only for a pid mode of POD in a pod with its own.
        etc_files: Host paths of the pod's "hosts", "resolv.conf" and
            "hostname" files, bound over /etc/... unless a CRI mount has the
            same destination; a missing key is not mounted.
        shm_path: Host path of the pod's /dev/shm, bound read-write; ``None``
            keeps a private tmpfs.  With host IPC the node's /dev/shm is bound.
        passwd: The image's /etc/passwd (:func:`read_user_db`), or ``None``.
        group: The image's /etc/group, or ``None``.
        cgroups_path: ``linux.cgroupsPath``, chosen by the cgroup driver.
        oom_score_adj_floor: See :func:`oom_score_adj_floor`.
        host_has_apparmor: Whether AppArmor is enabled on the host.
        seccomp_profile_loader: Loads a Localhost profile by path.
        target_pid_namespace: The pid namespace path of the container named
            by a pid mode of TARGET.
        image_name: The image-name annotation; defaults to ``ctr.image``.
        node_hostname: HOSTNAME for a pod without one; defaults to this host's.
        available_capabilities: What "ALL" and privileged grant (see
            :func:`current_capabilities`); ``None`` means every capability.
        apparmor_default_profile: The loaded profile RuntimeDefault means;
            ``None`` runs RuntimeDefault containers unconfined.
        extra_mounts: More binds, such as image volumes; CRI mounts win.
        mountinfo: The daemon's /proc/self/mountinfo; when given, the sources
            of shared and slave mounts are checked to allow it (containerd).
        cgroup_v2: The host uses the unified hierarchy (adds a cgroup
            namespace; allows ``unified`` resources).
        swap_controller: The kernel accounts swap (memory.memsw / memory.swap).
        hugetlb_controller: The hugetlb controller exists; without it hugepage
            limits are dropped.
        recursive_readonly_mounts: The runtime supports "rro".

    Returns:
        The config.json document.

    Raises:
        InvalidArgument: The request does not fit the pod, image or host: a
            privileged container in an unprivileged pod, an unknown user,
            a missing device, no command, an unloadable seccomp profile.
            The message names the CRI field.
        FailedPrecondition: A shared or slave mount of a private host path.
    """
    sec = ctr.security
    if sec.privileged and not pod.security.privileged:
        raise InvalidArgument(
            "config.linux.security_context.privileged: no privileged container allowed"
            " in a sandbox that is not privileged"
        )

    # Process.
    hostname = pod.hostname or node_hostname or socket.gethostname()
    env = [DEFAULT_PATH_ENV]
    if ctr.tty:
        env = _merge_env(env, ["TERM=xterm"])  # oci.WithTTY
    env = _merge_env(env, [f"HOSTNAME={hostname}"])
    # Image first, so that the kubelet's variables override it.
    env = _merge_env(env, [*image.env, *(f"{k}={v}" for k, v in ctr.envs)])
    if ctr.working_dir:
        cwd = ctr.working_dir
    elif image.working_dir:
        cwd = posixpath.join("/", image.working_dir)  # Docker allows a relative one
    else:
        cwd = "/"

    uid, gid, member_gids = resolve_user(_user_spec(sec, image), passwd, group)
    if sec.supplemental_groups_policy is SupplementalGroupsPolicy.STRICT:
        member_gids = (gid,)
    user: User = {
        "uid": uid,
        "gid": gid,
        "additionalGids": sorted({*member_gids, *sec.supplemental_groups}),
    }

    caps, ambient = _capability_set(sec, available_capabilities)
    process: Process = {
        "terminal": ctr.tty,
        "user": user,
        "args": process_args(ctr, image),
        "env": env,
        "cwd": cwd,
        "capabilities": _capabilities_json(caps, ambient),
        "noNewPrivileges": sec.no_new_privs,
    }
    if ctr.resources is not None:
        process["oomScoreAdj"] = _clamp_oom_score_adj(
            ctr.resources.oom_score_adj, oom_score_adj_floor
        )
    apparmor = _apparmor(
        sec.apparmor,
        privileged=sec.privileged,
        host_has_apparmor=host_has_apparmor,
        default=apparmor_default_profile,
    )
    if apparmor:
        process["apparmorProfile"] = apparmor

    # Mounts.
    mounts, rootfs_propagation = _container_mounts(
        pod,
        ctr,
        etc_files=etc_files,
        shm_path=shm_path,
        extra_mounts=extra_mounts,
        mountinfo=mountinfo,
        recursive_readonly_mounts=recursive_readonly_mounts,
    )

    # Devices.
    requested = _requested_devices(ctr)
    if sec.privileged:
        devices = _device_list(
            defaults.default_devices(), host_devices(), (d for d, _ in requested)
        )
        device_rules = defaults.default_device_cgroup_rules(privileged=True)
    else:
        devices = _device_list(defaults.default_devices(), (d for d, _ in requested))
        device_rules = defaults.default_device_cgroup_rules()
        for device, access in requested:
            device_rules.append(
                {
                    "allow": True,
                    "type": device["type"],
                    "major": device["major"],
                    "minor": device["minor"],
                    "access": access,
                }
            )

    resources: Resources = {"devices": device_rules}
    if ctr.resources is not None:
        cpu, memory, hugepages, unified = resources_json(
            ctr.resources,
            cgroup_v2=cgroup_v2,
            swap_controller=swap_controller,
            hugetlb_controller=hugetlb_controller,
        )
        if cpu:
            resources["cpu"] = cpu
        if memory:
            resources["memory"] = memory
        if hugepages:
            resources["hugepageLimits"] = hugepages
        if unified:
            resources["unified"] = unified

    linux: Linux = {
        "namespaces": _container_namespaces(
            pod, ctr, pod_namespaces, target_pid_namespace, cgroup_v2=cgroup_v2
        ),
        "cgroupsPath": cgroups_path,
        "resources": resources,
        "devices": devices,
    }
    if not sec.privileged:
        # The kubelet sends its own lists (empty for procMount: Unmasked);
        # unlike containerd, an empty list here means the defaults.
        linux["maskedPaths"] = list(sec.masked_paths or defaults.DEFAULT_MASKED_PATHS)
        linux["readonlyPaths"] = list(sec.readonly_paths or defaults.DEFAULT_READONLY_PATHS)
    seccomp = _seccomp(
        sec.seccomp, privileged=sec.privileged, capabilities=caps, loader=seccomp_profile_loader
    )
    if seccomp is not None:
        linux["seccomp"] = seccomp
    pod_ns = pod.namespace_options
    sysctls = _sysctls(
        pod.sysctls,
        host_network=pod_ns.network is NamespaceMode.NODE,
        host_ipc=pod_ns.ipc is NamespaceMode.NODE,
    )
    if sysctls:
        linux["sysctl"] = sysctls
    if rootfs_propagation is not None:
        linux["rootfsPropagation"] = rootfs_propagation

    annotations = _sandbox_annotations(pod, sandbox_id)
    annotations[ANNOTATION_CONTAINER_NAME] = ctr.metadata.name
    annotations[ANNOTATION_IMAGE_NAME] = image_name if image_name is not None else ctr.image
    annotations[ANNOTATION_CONTAINER_TYPE] = "container"

    return {
        "ociVersion": OCI_VERSION,
        "process": process,
        "root": {"path": str(rootfs), "readonly": sec.readonly_rootfs},
        "mounts": mounts,
        "annotations": annotations,
        "linux": linux,
    }
