"""CRI protobuf messages to domain types, with validation.

Every check that needs only the request lives here, so that a malformed
request fails with ``INVALID_ARGUMENT`` before any work starts.  Each error
names the field by its CRI path from the root the caller passes ("config"
for ``CreateContainerRequest.config``), e.g. ``config.mounts[2].container_path
must be absolute``.  Checks that need the pod, the image or the host (a
privileged container in an unprivileged pod, an unknown user name, a missing
device) are made by ``pouch.container.spec``.

Presence: proto3 ``message`` fields (``metadata``, ``Int64Value``,
``SecurityProfile``) are "set" when they were on the wire, as Go's non-nil
pointer; betterproto gives an empty default instead of ``None``, so
:func:`_present` asks betterproto whether the message was serialised.
"""

from __future__ import annotations

import posixpath
import re
from typing import TYPE_CHECKING, Final, TypeVar

import betterproto

from pouch.container import defaults
from pouch.container.model import (
    RUNTIME_DEFAULT,
    UNCONFINED,
    Capabilities,
    ContainerConfig,
    ContainerMetadata,
    ContainerSecurity,
    Device,
    DNSConfig,
    HugepageLimit,
    LinuxResources,
    Mount,
    MountPropagation,
    NamespaceMode,
    NamespaceOptions,
    PodConfig,
    PodMetadata,
    PodSecurity,
    PortMapping,
    ProfileType,
    Protocol,
    SecurityProfile,
    SELinuxOptions,
    SupplementalGroupsPolicy,
)
from pouch.cri._pb.runtime import v1 as pb
from pouch.errors import InvalidArgument, Unimplemented

if TYPE_CHECKING:
    import enum
    from collections.abc import Iterable, Mapping

__all__ = [
    "signal_name",
    "to_container_config",
    "to_linux_resources",
    "to_pod_config",
]

_E = TypeVar("_E", bound="enum.Enum")

# runc (and containerd's WithUser) take ids up to MaxInt32.
_MAX_ID: Final = 2**31 - 1
# Linux HOST_NAME_MAX.
_MAX_HOSTNAME: Final = 64
# CFS bandwidth limits the kernel accepts (kernel/sched/core.c): 1 ms .. 1 s
# for the period, at least 1 ms for the quota (-1 is "unlimited").
_MIN_CFS_US: Final = 1_000
_MAX_CFS_PERIOD_US: Final = 1_000_000
_OOM_SCORE_ADJ_RANGE: Final = range(-1000, 1001)
_PORT_RANGE: Final = range(65536)

_CPUSET: Final = re.compile(r"\d+(-\d+)?(,\d+(-\d+)?)*")
_PAGE_SIZE: Final = re.compile(r"\d+[KMGTPE]?B")
# Sysctl names as Kubernetes spells them, dots or slashes between parts.
_SYSCTL: Final = re.compile(r"[a-zA-Z0-9_][a-zA-Z0-9_.\-/]*")
_ENV_KEY_FORBIDDEN: Final = frozenset("=\x00")

_PROPAGATION: Final[Mapping[int, MountPropagation]] = {
    pb.MountPropagation.PROPAGATION_PRIVATE: MountPropagation.PRIVATE,
    pb.MountPropagation.PROPAGATION_HOST_TO_CONTAINER: MountPropagation.HOST_TO_CONTAINER,
    pb.MountPropagation.PROPAGATION_BIDIRECTIONAL: MountPropagation.BIDIRECTIONAL,
}
_NAMESPACE_MODE: Final[Mapping[int, NamespaceMode]] = {
    pb.NamespaceMode.POD: NamespaceMode.POD,
    pb.NamespaceMode.CONTAINER: NamespaceMode.CONTAINER,
    pb.NamespaceMode.NODE: NamespaceMode.NODE,
    pb.NamespaceMode.TARGET: NamespaceMode.TARGET,
}
_PROFILE_TYPE: Final[Mapping[int, ProfileType]] = {
    pb.SecurityProfileProfileType.RuntimeDefault: ProfileType.RUNTIME_DEFAULT,
    pb.SecurityProfileProfileType.Unconfined: ProfileType.UNCONFINED,
    pb.SecurityProfileProfileType.Localhost: ProfileType.LOCALHOST,
}
_PROTOCOL: Final[Mapping[int, Protocol]] = {
    pb.Protocol.TCP: Protocol.TCP,
    pb.Protocol.UDP: Protocol.UDP,
    pb.Protocol.SCTP: Protocol.SCTP,
}
_GROUPS_POLICY: Final[Mapping[int, SupplementalGroupsPolicy]] = {
    pb.SupplementalGroupsPolicy.Merge: SupplementalGroupsPolicy.MERGE,
    pb.SupplementalGroupsPolicy.Strict: SupplementalGroupsPolicy.STRICT,
}

# The deprecated string forms of a profile (cri-api LinuxContainerSecurityContext
# seccomp_profile_path / apparmor_profile; containerd generateSecurityProfile).
_LEGACY_RUNTIME_DEFAULT: Final = frozenset({"runtime/default", "docker/default"})
_LEGACY_UNCONFINED: Final = "unconfined"
_LEGACY_LOCALHOST: Final = "localhost/"


# --------------------------------------------------------------------------
# Small validators
# --------------------------------------------------------------------------


def _present(msg: betterproto.Message | None) -> bool:
    """Whether an optional sub-message was sent (Go: the pointer is non-nil)."""
    return msg is not None and bool(betterproto.serialized_on_wire(msg))


def _enum(table: Mapping[int, _E], value: int, path: str) -> _E:
    try:
        return table[int(value)]
    except KeyError:
        raise InvalidArgument(f"{path} has unknown value {int(value)}") from None


def _text(value: str, path: str) -> str:
    if "\x00" in value:
        raise InvalidArgument(f"{path} must not contain NUL")
    return value


def _required(value: str, path: str) -> str:
    if not value:
        raise InvalidArgument(f"{path} is required")
    return _text(value, path)


def _absolute(value: str, path: str) -> str:
    _required(value, path)
    if not value.startswith("/"):
        raise InvalidArgument(f"{path} must be absolute, got {value!r}")
    return value


def _optional_absolute(value: str, path: str) -> str:
    return _absolute(value, path) if value else ""


def _strings(values: Iterable[str], path: str) -> tuple[str, ...]:
    return tuple(_text(v, f"{path}[{i}]") for i, v in enumerate(values))


def _single_words(values: Iterable[str], path: str) -> tuple[str, ...]:
    """Entries written into a file one per word (resolv.conf): no whitespace."""
    out = []
    for i, value in enumerate(values):
        if not value or any(c.isspace() for c in value) or "\x00" in value:
            raise InvalidArgument(f"{path}[{i}] must be a non-empty word, got {value!r}")
        out.append(value)
    return tuple(out)


def _map(values: Mapping[str, str], path: str) -> dict[str, str]:
    for key, value in values.items():
        _text(key, f"{path} key")
        _text(value, f"{path}[{key!r}]")
    return dict(values)


def _id(value: int, path: str) -> int:
    if not 0 <= value <= _MAX_ID:
        raise InvalidArgument(f"{path} must be between 0 and {_MAX_ID}, got {value}")
    return value


def _ids(values: Iterable[int], path: str) -> tuple[int, ...]:
    return tuple(_id(v, f"{path}[{i}]") for i, v in enumerate(values))


def _non_negative(value: int, path: str) -> int:
    if value < 0:
        raise InvalidArgument(f"{path} must not be negative, got {value}")
    return value


def _int64_value(msg: pb.Int64Value | None, path: str) -> int | None:
    return _id(msg.value, path) if msg is not None and _present(msg) else None


# --------------------------------------------------------------------------
# Shared messages
# --------------------------------------------------------------------------


def to_linux_resources(res: pb.LinuxContainerResources, path: str) -> LinuxResources:
    """Validate ``LinuxContainerResources``; also for UpdateContainerResources.

    Args:
        res: The message.
        path: Its CRI path, e.g. ``"config.linux.resources"``.

    Raises:
        InvalidArgument: A value the kernel would refuse; the message names it.
    """
    period = _non_negative(res.cpu_period, f"{path}.cpu_period")
    if period and not _MIN_CFS_US <= period <= _MAX_CFS_PERIOD_US:
        raise InvalidArgument(
            f"{path}.cpu_period must be between {_MIN_CFS_US} and {_MAX_CFS_PERIOD_US}"
            f" microseconds, got {period}"
        )
    quota = res.cpu_quota
    if quota not in (-1, 0) and quota < _MIN_CFS_US:
        raise InvalidArgument(
            f"{path}.cpu_quota must be -1, 0 or at least {_MIN_CFS_US} microseconds, got {quota}"
        )
    if res.oom_score_adj not in _OOM_SCORE_ADJ_RANGE:
        raise InvalidArgument(
            f"{path}.oom_score_adj must be between -1000 and 1000, got {res.oom_score_adj}"
        )
    for field in ("cpuset_cpus", "cpuset_mems"):
        value: str = getattr(res, field)
        if value and not _CPUSET.fullmatch(value):
            raise InvalidArgument(f"{path}.{field} is not a CPU or node list: {value!r}")
    swap = res.memory_swap_limit_in_bytes
    if swap < -1:
        raise InvalidArgument(
            f"{path}.memory_swap_limit_in_bytes must be -1 (unlimited) or more, got {swap}"
        )
    hugepages = []
    for i, limit in enumerate(res.hugepage_limits):
        if not _PAGE_SIZE.fullmatch(limit.page_size):
            raise InvalidArgument(
                f"{path}.hugepage_limits[{i}].page_size must look like 2MB or 1GB,"
                f" got {limit.page_size!r}"
            )
        hugepages.append(HugepageLimit(page_size=limit.page_size, limit=limit.limit))
    for key in res.unified:
        # runc writes each key as a file name in the container's cgroup.
        if not key or "/" in key or key.startswith(".") or "\x00" in key:
            raise InvalidArgument(f"{path}.unified has an invalid key {key!r}")
    return LinuxResources(
        cpu_period=period,
        cpu_quota=quota,
        cpu_shares=_non_negative(res.cpu_shares, f"{path}.cpu_shares"),
        memory_limit_in_bytes=_non_negative(
            res.memory_limit_in_bytes, f"{path}.memory_limit_in_bytes"
        ),
        oom_score_adj=res.oom_score_adj,
        cpuset_cpus=res.cpuset_cpus,
        cpuset_mems=res.cpuset_mems,
        hugepage_limits=tuple(hugepages),
        unified=_map(res.unified, f"{path}.unified"),
        memory_swap_limit_in_bytes=swap,
    )


def _optional_resources(res: pb.LinuxContainerResources | None, path: str) -> LinuxResources | None:
    return to_linux_resources(res, path) if res is not None and _present(res) else None


def _selinux(opt: pb.SeLinuxOption | None, path: str) -> SELinuxOptions | None:
    if opt is None or not _present(opt):
        return None
    return SELinuxOptions(
        user=_text(opt.user, f"{path}.user"),
        role=_text(opt.role, f"{path}.role"),
        type=_text(opt.type, f"{path}.type"),
        level=_text(opt.level, f"{path}.level"),
    )


def _profile(msg: pb.SecurityProfile, path: str, *, seccomp: bool) -> SecurityProfile:
    kind = _enum(_PROFILE_TYPE, msg.profile_type, f"{path}.profile_type")
    ref = msg.localhost_ref
    if kind is not ProfileType.LOCALHOST:
        # containerd: "LocalhostRef must only be set if ProfileType is Localhost".
        if ref:
            raise InvalidArgument(f"{path}.localhost_ref must only be set for Localhost")
        return SecurityProfile(kind)
    # Trimmed "just in case" as containerd does; the new API sends bare refs.
    ref = ref.removeprefix(_LEGACY_LOCALHOST)
    if seccomp:
        _absolute(ref, f"{path}.localhost_ref")
    else:
        _required(ref, f"{path}.localhost_ref")
    return SecurityProfile(kind, ref)


def _legacy_profile(value: str, path: str, *, seccomp: bool) -> SecurityProfile | None:
    """Parse a deprecated ``seccomp_profile_path``/``apparmor_profile`` string."""
    if not value:
        return None
    if value in _LEGACY_RUNTIME_DEFAULT:
        return RUNTIME_DEFAULT
    if value == _LEGACY_UNCONFINED:
        return UNCONFINED
    if value.startswith(_LEGACY_LOCALHOST):
        ref = value.removeprefix(_LEGACY_LOCALHOST)
        if seccomp:
            _absolute(ref, f"{path} (after localhost/)")
        else:
            _required(ref, f"{path} (after localhost/)")
        return SecurityProfile(ProfileType.LOCALHOST, ref)
    raise InvalidArgument(
        f"{path} must be runtime/default, docker/default, unconfined or localhost/<ref>,"
        f" got {value!r}"
    )


def _seccomp(msg: pb.SecurityProfile | None, legacy: str, path: str) -> SecurityProfile:
    # The message wins over the deprecated string (containerd: only when nil).
    if msg is not None and _present(msg):
        return _profile(msg, f"{path}.seccomp", seccomp=True)
    parsed = _legacy_profile(legacy, f"{path}.seccomp_profile_path", seccomp=True)
    # Nothing at all is "unconfined" (cri-api seccomp_profile_path: Default "").
    return UNCONFINED if parsed is None else parsed


def _apparmor(msg: pb.SecurityProfile | None, legacy: str, path: str) -> SecurityProfile:
    if msg is not None and _present(msg):
        return _profile(msg, f"{path}.apparmor", seccomp=False)
    parsed = _legacy_profile(legacy, f"{path}.apparmor_profile", seccomp=False)
    # Nothing at all is the runtime default (containerd, kubernetes#51746).
    return RUNTIME_DEFAULT if parsed is None else parsed


def _namespace_options(
    msg: pb.NamespaceOption | None, path: str, *, sandbox: bool
) -> NamespaceOptions:
    if msg is None:
        return NamespaceOptions()
    network = _enum(_NAMESPACE_MODE, msg.network, f"{path}.network")
    pid = _enum(_NAMESPACE_MODE, msg.pid, f"{path}.pid")
    ipc = _enum(_NAMESPACE_MODE, msg.ipc, f"{path}.ipc")
    for name, mode in (("network", network), ("ipc", ipc)):
        if mode is NamespaceMode.TARGET:
            raise InvalidArgument(f"{path}.{name}: TARGET is only supported for pid")
    if pid is NamespaceMode.TARGET:
        if sandbox:
            raise InvalidArgument(f"{path}.pid: TARGET is not valid for a pod sandbox")
        _required(msg.target_id, f"{path}.target_id")
    elif msg.target_id:
        raise InvalidArgument(f"{path}.target_id must only be set with pid TARGET")
    userns = msg.userns_options
    if userns is not None and _present(userns):
        mode = _enum(_NAMESPACE_MODE, userns.mode, f"{path}.userns_options.mode")
        # Kubelets send NODE for pods without hostUsers: false; POD needs
        # id-mapped mounts, which this runtime does not advertise.
        if mode is not NamespaceMode.NODE:
            raise Unimplemented(f"{path}.userns_options: user namespaces are not supported")
    return NamespaceOptions(network=network, pid=pid, ipc=ipc, target_id=msg.target_id)


# --------------------------------------------------------------------------
# PodSandboxConfig
# --------------------------------------------------------------------------


def _pod_metadata(msg: pb.PodSandboxMetadata | None, path: str) -> PodMetadata:
    if msg is None or not _present(msg):
        raise InvalidArgument(f"{path} is required")
    return PodMetadata(
        name=_required(msg.name, f"{path}.name"),
        uid=_required(msg.uid, f"{path}.uid"),
        namespace=_required(msg.namespace, f"{path}.namespace"),
        attempt=msg.attempt,
    )


def _pod_security(msg: pb.LinuxSandboxSecurityContext | None, path: str) -> PodSecurity:
    if msg is None:
        return PodSecurity()
    run_as_user = _int64_value(msg.run_as_user, f"{path}.run_as_user.value")
    run_as_group = _int64_value(msg.run_as_group, f"{path}.run_as_group.value")
    if run_as_group is not None and run_as_user is None:
        # cri-api: "otherwise, the runtime MUST error".
        raise InvalidArgument(f"{path}.run_as_group requires {path}.run_as_user")
    return PodSecurity(
        namespace_options=_namespace_options(
            msg.namespace_options, f"{path}.namespace_options", sandbox=True
        ),
        selinux=_selinux(msg.selinux_options, f"{path}.selinux_options"),
        run_as_user=run_as_user,
        run_as_group=run_as_group,
        readonly_rootfs=msg.readonly_rootfs,
        supplemental_groups=_ids(msg.supplemental_groups, f"{path}.supplemental_groups"),
        supplemental_groups_policy=_enum(
            _GROUPS_POLICY, msg.supplemental_groups_policy, f"{path}.supplemental_groups_policy"
        ),
        privileged=msg.privileged,
        seccomp=_seccomp(msg.seccomp, msg.seccomp_profile_path, path),
        apparmor=_apparmor(msg.apparmor, "", path),
    )


def _port_mappings(msgs: Iterable[pb.PortMapping], path: str) -> tuple[PortMapping, ...]:
    out = []
    for i, msg in enumerate(msgs):
        where = f"{path}[{i}]"
        for name in ("container_port", "host_port"):
            port: int = getattr(msg, name)
            if port not in _PORT_RANGE:
                raise InvalidArgument(f"{where}.{name} must be between 0 and 65535, got {port}")
        out.append(
            PortMapping(
                protocol=_enum(_PROTOCOL, msg.protocol, f"{where}.protocol"),
                container_port=msg.container_port,
                host_port=msg.host_port,
                host_ip=_text(msg.host_ip, f"{where}.host_ip"),
            )
        )
    return tuple(out)


def _dns(msg: pb.DnsConfig | None, path: str) -> DNSConfig | None:
    if msg is None or not _present(msg):
        return None
    return DNSConfig(
        servers=_single_words(msg.servers, f"{path}.servers"),
        searches=_single_words(msg.searches, f"{path}.searches"),
        options=_single_words(msg.options, f"{path}.options"),
    )


def _sysctls(values: Mapping[str, str], path: str) -> dict[str, str]:
    for key, value in values.items():
        # runc turns the name into a file under /proc/sys: no way out of it.
        if not _SYSCTL.fullmatch(key) or ".." in key or "//" in key:
            raise InvalidArgument(f"{path} has an invalid name {key!r}")
        if "\x00" in value or "\n" in value:
            raise InvalidArgument(f"{path}[{key!r}] must be a single line")
    return dict(values)


def to_pod_config(config: pb.PodSandboxConfig | None, path: str = "config") -> PodConfig:
    """Validate a ``PodSandboxConfig`` (RunPodSandboxRequest.config).

    Args:
        config: The message; ``None`` or unset is an error.
        path: Its CRI path, for error messages.

    Returns:
        The pod's configuration.

    Raises:
        InvalidArgument: A field is missing or invalid; the message names it.
        Unimplemented: The pod asks for user namespaces.
    """
    if config is None or not _present(config):
        raise InvalidArgument(f"{path} is required")
    linux = config.linux if config.linux is not None else pb.LinuxPodSandboxConfig()
    lpath = f"{path}.linux"
    hostname = _text(config.hostname, f"{path}.hostname")
    if len(hostname) > _MAX_HOSTNAME or any(c.isspace() for c in hostname):
        raise InvalidArgument(
            f"{path}.hostname must be at most {_MAX_HOSTNAME} characters without spaces"
        )
    return PodConfig(
        metadata=_pod_metadata(config.metadata, f"{path}.metadata"),
        hostname=hostname,
        log_directory=_optional_absolute(config.log_directory, f"{path}.log_directory"),
        dns=_dns(config.dns_config, f"{path}.dns_config"),
        port_mappings=_port_mappings(config.port_mappings, f"{path}.port_mappings"),
        labels=_map(config.labels, f"{path}.labels"),
        annotations=_map(config.annotations, f"{path}.annotations"),
        cgroup_parent=_text(linux.cgroup_parent, f"{lpath}.cgroup_parent"),
        security=_pod_security(linux.security_context, f"{lpath}.security_context"),
        sysctls=_sysctls(linux.sysctls, f"{lpath}.sysctls"),
        overhead=_optional_resources(linux.overhead, f"{lpath}.overhead"),
        resources=_optional_resources(linux.resources, f"{lpath}.resources"),
    )


# --------------------------------------------------------------------------
# ContainerConfig
# --------------------------------------------------------------------------


def _container_metadata(msg: pb.ContainerMetadata | None, path: str) -> ContainerMetadata:
    if msg is None or not _present(msg):
        raise InvalidArgument(f"{path} is required")
    return ContainerMetadata(name=_required(msg.name, f"{path}.name"), attempt=msg.attempt)


def _envs(msgs: Iterable[pb.KeyValue], path: str) -> tuple[tuple[str, str], ...]:
    out = []
    for i, kv in enumerate(msgs):
        key = kv.key
        if not key or _ENV_KEY_FORBIDDEN & set(key):
            raise InvalidArgument(f"{path}[{i}].key must be non-empty, without '=' or NUL")
        raw = kv.value
        try:
            value = raw.decode() if isinstance(raw, bytes) else str(raw)
        except UnicodeDecodeError:
            raise InvalidArgument(f"{path}[{i}].value is not valid UTF-8") from None
        out.append((key, _text(value, f"{path}[{i}].value")))
    return tuple(out)


def _mounts(msgs: Iterable[pb.Mount], path: str) -> tuple[Mount, ...]:
    out: list[Mount] = []
    seen: dict[str, int] = {}
    for i, msg in enumerate(msgs):
        where = f"{path}[{i}]"
        if msg.image is not None and _present(msg.image) and msg.image.image:
            raise Unimplemented(f"{where}.image: image volume mounts are not supported")
        if msg.uid_mappings or msg.gid_mappings:
            raise Unimplemented(f"{where}: id-mapped mounts are not supported")
        container_path = _absolute(msg.container_path, f"{where}.container_path")
        key = posixpath.normpath(container_path)
        if key in seen:
            raise InvalidArgument(
                f"{where}.container_path {container_path!r} duplicates {path}[{seen[key]}]"
            )
        seen[key] = i
        propagation = _enum(_PROPAGATION, msg.propagation, f"{where}.propagation")
        if msg.recursive_read_only and (
            not msg.readonly or propagation is not MountPropagation.PRIVATE
        ):
            # cri-api Mount.recursive_read_only: "readonly must be explicitly
            # set to true, and propagation must be PRIVATE (0)".
            raise InvalidArgument(
                f"{where}.recursive_read_only requires readonly and PROPAGATION_PRIVATE"
            )
        out.append(
            Mount(
                container_path=container_path,
                host_path=_absolute(msg.host_path, f"{where}.host_path"),
                readonly=msg.readonly,
                selinux_relabel=msg.selinux_relabel,
                propagation=propagation,
                recursive_read_only=msg.recursive_read_only,
            )
        )
    return tuple(out)


def _devices(msgs: Iterable[pb.Device], path: str) -> tuple[Device, ...]:
    out = []
    for i, msg in enumerate(msgs):
        where = f"{path}[{i}]"
        host_path = _absolute(msg.host_path, f"{where}.host_path")
        # oci.WithDevices: "If containerPath is not set then the device path is used".
        container_path = _optional_absolute(msg.container_path, f"{where}.container_path")
        permissions = msg.permissions or "rwm"
        if set(permissions) - set("rwm"):
            raise InvalidArgument(
                f"{where}.permissions must be made of r, w and m, got {msg.permissions!r}"
            )
        out.append(
            Device(
                container_path=container_path or host_path,
                host_path=host_path,
                permissions="".join(c for c in "rwm" if c in permissions),
            )
        )
    return tuple(out)


def _capability_names(names: Iterable[str], path: str, *, allow_all: bool) -> tuple[str, ...]:
    out = []
    for i, name in enumerate(names):
        if allow_all and name.upper() == "ALL":
            out.append("ALL")
            continue
        try:
            out.append(defaults.normalize_capability(name))
        except InvalidArgument:
            raise InvalidArgument(f"{path}[{i}]: unknown capability {name!r}") from None
    return tuple(out)


def _capabilities(msg: pb.Capability | None, path: str) -> Capabilities:
    if msg is None:
        return Capabilities()
    return Capabilities(
        add=_capability_names(msg.add_capabilities, f"{path}.add_capabilities", allow_all=True),
        drop=_capability_names(msg.drop_capabilities, f"{path}.drop_capabilities", allow_all=True),
        add_ambient=_capability_names(
            msg.add_ambient_capabilities, f"{path}.add_ambient_capabilities", allow_all=False
        ),
    )


def _container_security(
    msg: pb.LinuxContainerSecurityContext | None, path: str
) -> ContainerSecurity:
    if msg is None:
        return ContainerSecurity()
    run_as_user = _int64_value(msg.run_as_user, f"{path}.run_as_user.value")
    run_as_group = _int64_value(msg.run_as_group, f"{path}.run_as_group.value")
    username = _text(msg.run_as_username, f"{path}.run_as_username")
    if ":" in username:
        raise InvalidArgument(f"{path}.run_as_username must not contain ':'")
    if run_as_group is not None and run_as_user is None and not username:
        # containerd generateUserString: "user group is specified without user".
        raise InvalidArgument(
            f"{path}.run_as_group requires {path}.run_as_user or {path}.run_as_username"
        )
    return ContainerSecurity(
        capabilities=_capabilities(msg.capabilities, f"{path}.capabilities"),
        privileged=msg.privileged,
        namespace_options=_namespace_options(
            msg.namespace_options, f"{path}.namespace_options", sandbox=False
        ),
        selinux=_selinux(msg.selinux_options, f"{path}.selinux_options"),
        run_as_user=run_as_user,
        run_as_group=run_as_group,
        run_as_username=username,
        readonly_rootfs=msg.readonly_rootfs,
        supplemental_groups=_ids(msg.supplemental_groups, f"{path}.supplemental_groups"),
        supplemental_groups_policy=_enum(
            _GROUPS_POLICY, msg.supplemental_groups_policy, f"{path}.supplemental_groups_policy"
        ),
        apparmor=_apparmor(msg.apparmor, msg.apparmor_profile, path),
        seccomp=_seccomp(msg.seccomp, msg.seccomp_profile_path, path),
        no_new_privs=msg.no_new_privs,
        masked_paths=tuple(
            _absolute(p, f"{path}.masked_paths[{i}]") for i, p in enumerate(msg.masked_paths)
        ),
        readonly_paths=tuple(
            _absolute(p, f"{path}.readonly_paths[{i}]") for i, p in enumerate(msg.readonly_paths)
        ),
    )


def signal_name(value: int, path: str = "config.stop_signal") -> str:
    """The name of a cri-api ``Signal`` ("SIGTERM", "SIGRTMIN+3"); "" for RUNTIME_DEFAULT.

    Raises:
        InvalidArgument: ``value`` is not a ``Signal``.
    """
    try:
        member = pb.Signal(int(value))
    except ValueError:
        raise InvalidArgument(f"{path} has unknown value {int(value)}") from None
    name = str(member.name)
    if member == pb.Signal.RUNTIME_DEFAULT:
        return ""
    # The proto cannot spell "+" and "-": SIGRTMINPLUS3 is SIGRTMIN+3.
    for word, sign in (("PLUS", "+"), ("MINUS", "-")):
        base, found, number = name.partition(word)
        if found:
            return f"{base}{sign}{number}"
    return name


def to_container_config(config: pb.ContainerConfig | None, path: str = "config") -> ContainerConfig:
    """Validate a ``ContainerConfig`` (CreateContainerRequest.config).

    Args:
        config: The message; ``None`` or unset is an error.
        path: Its CRI path, for error messages.

    Returns:
        The container's configuration.

    Raises:
        InvalidArgument: A field is missing or invalid; the message names it.
        Unimplemented: The container asks for image volumes, id-mapped mounts
            or user namespaces.
    """
    if config is None or not _present(config):
        raise InvalidArgument(f"{path} is required")
    metadata = _container_metadata(config.metadata, f"{path}.metadata")
    image = config.image
    if image is None or not image.image:
        raise InvalidArgument(f"{path}.image.image is required")
    linux = config.linux if config.linux is not None else pb.LinuxContainerConfig()
    lpath = f"{path}.linux"
    return ContainerConfig(
        metadata=metadata,
        image=_text(image.image, f"{path}.image.image"),
        user_specified_image=_text(
            image.user_specified_image, f"{path}.image.user_specified_image"
        ),
        command=_strings(config.command, f"{path}.command"),
        args=_strings(config.args, f"{path}.args"),
        # runc: "Cwd must be an absolute path".
        working_dir=_optional_absolute(config.working_dir, f"{path}.working_dir"),
        envs=_envs(config.envs, f"{path}.envs"),
        mounts=_mounts(config.mounts, f"{path}.mounts"),
        devices=_devices(config.devices, f"{path}.devices"),
        labels=_map(config.labels, f"{path}.labels"),
        annotations=_map(config.annotations, f"{path}.annotations"),
        log_path=_text(config.log_path, f"{path}.log_path"),
        stdin=config.stdin,
        stdin_once=config.stdin_once,
        tty=config.tty,
        resources=_optional_resources(linux.resources, f"{lpath}.resources"),
        security=_container_security(linux.security_context, f"{lpath}.security_context"),
        stop_signal=signal_name(config.stop_signal, f"{path}.stop_signal"),
        cdi_devices=tuple(
            _required(d.name, f"{path}.cdi_devices[{i}].name")
            for i, d in enumerate(config.cdi_devices)
        ),
    )
