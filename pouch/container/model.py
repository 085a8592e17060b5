"""Domain types for pods and containers, as the core sees them.

These are what ``pouch.cri._convert`` builds from the CRI protobuf messages
(cri-api ``PodSandboxConfig`` and ``ContainerConfig``) after validating them,
and what the managers, the store and ``pouch.container.spec`` work with.
Nothing here imports protobuf or grpclib.

Conventions:

- Every class is ``attrs.frozen``; sequences are tuples and maps are
  read-only :class:`types.MappingProxyType` views of a private copy.  Maps
  make instances unhashable; equality works as usual.
- CRI's "unset" is kept apart from zero where the CRI distinguishes it
  (``Int64Value`` becomes ``int | None``); elsewhere the CRI default (0, "",
  False) is the field default, as proto3 gives it.
- Security profiles are explicit values: a request that names no seccomp
  profile has ``Unconfined`` (cri-api: "Default: "", which is identical with
  unconfined"; containerd applies no profile), and one that names no AppArmor
  profile has ``RuntimeDefault`` (containerd, after kubernetes#51746).
"""

from __future__ import annotations

import enum

# At run time, not under TYPE_CHECKING: the container manager persists these
# classes with cattrs, which resolves the annotations.
from collections.abc import Mapping  # noqa: TC003
from types import MappingProxyType
from typing import Final

import attrs

__all__ = [
    "RUNTIME_DEFAULT",
    "UNCONFINED",
    "Capabilities",
    "ContainerConfig",
    "ContainerMetadata",
    "ContainerSecurity",
    "DNSConfig",
    "Device",
    "HugepageLimit",
    "LinuxResources",
    "Mount",
    "MountPropagation",
    "NamespaceMode",
    "NamespaceOptions",
    "PodConfig",
    "PodMetadata",
    "PodSecurity",
    "PortMapping",
    "ProfileType",
    "Protocol",
    "SELinuxOptions",
    "SecurityProfile",
    "SupplementalGroupsPolicy",
]


def _frozen_map(value: Mapping[str, str]) -> Mapping[str, str]:
    """A read-only copy, so a frozen instance cannot change under its holder."""
    return MappingProxyType(dict(value))


def _empty_map() -> Mapping[str, str]:
    return MappingProxyType({})


# --------------------------------------------------------------------------
# Enumerations (cri-api names; values are stable strings for the store)
# --------------------------------------------------------------------------


class NamespaceMode(enum.Enum):
    """cri-api ``NamespaceMode``: whose namespace a pod or container uses."""

    #: Shared by every container of the pod (the infra process owns it).
    POD = "pod"
    #: Private to one container.
    CONTAINER = "container"
    #: The node's own namespace.
    NODE = "node"
    #: The namespace of another container, named by ``target_id`` (pid only).
    TARGET = "target"


class MountPropagation(enum.Enum):
    """cri-api ``MountPropagation``."""

    PRIVATE = "private"  # rprivate
    HOST_TO_CONTAINER = "host-to-container"  # rslave
    BIDIRECTIONAL = "bidirectional"  # rshared


class ProfileType(enum.Enum):
    """cri-api ``SecurityProfile.ProfileType``."""

    RUNTIME_DEFAULT = "RuntimeDefault"
    UNCONFINED = "Unconfined"
    LOCALHOST = "Localhost"


class Protocol(enum.Enum):
    """cri-api ``Protocol`` of a port mapping."""

    TCP = "tcp"
    UDP = "udp"
    SCTP = "sctp"


class SupplementalGroupsPolicy(enum.Enum):
    """cri-api ``SupplementalGroupsPolicy``."""

    #: Image /etc/group memberships plus the requested groups (the default).
    MERGE = "Merge"
    #: Only the requested groups (and the primary group).
    STRICT = "Strict"


# --------------------------------------------------------------------------
# Shared pieces
# --------------------------------------------------------------------------


@attrs.frozen
class SecurityProfile:
    """A seccomp or AppArmor profile choice.

    ``localhost_ref`` is set only for ``LOCALHOST``: for seccomp an absolute
    path to an OCI ``LinuxSeccomp`` JSON file on the node, for AppArmor the
    name of a profile loaded on the node.
    """

    type: ProfileType
    localhost_ref: str = ""


#: The values most requests carry.
RUNTIME_DEFAULT: Final = SecurityProfile(ProfileType.RUNTIME_DEFAULT)
UNCONFINED: Final = SecurityProfile(ProfileType.UNCONFINED)


@attrs.frozen
class NamespaceOptions:
    """cri-api ``NamespaceOption`` (user namespaces are not supported)."""

    network: NamespaceMode = NamespaceMode.POD
    pid: NamespaceMode = NamespaceMode.POD
    ipc: NamespaceMode = NamespaceMode.POD
    #: Container id whose pid namespace a ``TARGET`` pid mode joins.
    target_id: str = ""


@attrs.frozen
class SELinuxOptions:
    """cri-api ``SELinuxOption``; recorded, not applied (no SELinux support)."""

    user: str = ""
    role: str = ""
    type: str = ""
    level: str = ""


@attrs.frozen
class HugepageLimit:
    """Limit on HugeTLB use for one page size ("2MB", "1GB")."""

    page_size: str
    limit: int


@attrs.frozen
class LinuxResources:
    """cri-api ``LinuxContainerResources``; 0 and "" mean "not specified"."""

    cpu_period: int = 0
    cpu_quota: int = 0
    cpu_shares: int = 0
    memory_limit_in_bytes: int = 0
    oom_score_adj: int = 0
    cpuset_cpus: str = ""
    cpuset_mems: str = ""
    hugepage_limits: tuple[HugepageLimit, ...] = ()
    #: cgroup v2 files to write ("memory.high": "1G").
    unified: Mapping[str, str] = attrs.field(factory=_empty_map, converter=_frozen_map)
    memory_swap_limit_in_bytes: int = 0


# --------------------------------------------------------------------------
# Pods
# --------------------------------------------------------------------------


@attrs.frozen
class PodMetadata:
    """cri-api ``PodSandboxMetadata``: what identifies a pod to the kubelet."""

    name: str
    uid: str
    namespace: str
    attempt: int = 0


@attrs.frozen
class DNSConfig:
    """cri-api ``DNSConfig``: the content of the pod's resolv.conf."""

    servers: tuple[str, ...] = ()
    searches: tuple[str, ...] = ()
    options: tuple[str, ...] = ()


@attrs.frozen
class PortMapping:
    """cri-api ``PortMapping``; ``host_port`` 0 means "not exposed on the host"."""

    protocol: Protocol = Protocol.TCP
    container_port: int = 0
    host_port: int = 0
    host_ip: str = ""


@attrs.frozen
class PodSecurity:
    """cri-api ``LinuxSandboxSecurityContext``."""

    namespace_options: NamespaceOptions = NamespaceOptions()
    selinux: SELinuxOptions | None = None
    #: ``None``: not specified (root for the infra process).
    run_as_user: int | None = None
    #: Only set together with ``run_as_user`` (checked by the converter).
    run_as_group: int | None = None
    readonly_rootfs: bool = False
    supplemental_groups: tuple[int, ...] = ()
    supplemental_groups_policy: SupplementalGroupsPolicy = SupplementalGroupsPolicy.MERGE
    #: Privileged containers are allowed in this pod only if this is set.
    privileged: bool = False
    seccomp: SecurityProfile = UNCONFINED
    apparmor: SecurityProfile = RUNTIME_DEFAULT


@attrs.frozen
class PodConfig:
    """cri-api ``PodSandboxConfig`` (Linux part), validated."""

    metadata: PodMetadata
    hostname: str = ""
    log_directory: str = ""
    #: ``None``: the kubelet sent no DNS config (use the node's resolv.conf).
    dns: DNSConfig | None = None
    port_mappings: tuple[PortMapping, ...] = ()
    labels: Mapping[str, str] = attrs.field(factory=_empty_map, converter=_frozen_map)
    annotations: Mapping[str, str] = attrs.field(factory=_empty_map, converter=_frozen_map)
    cgroup_parent: str = ""
    security: PodSecurity = PodSecurity()
    sysctls: Mapping[str, str] = attrs.field(factory=_empty_map, converter=_frozen_map)
    #: Recorded for status and sandbox annotations; not enforced by the spec.
    overhead: LinuxResources | None = None
    resources: LinuxResources | None = None

    @property
    def namespace_options(self) -> NamespaceOptions:
        return self.security.namespace_options


# --------------------------------------------------------------------------
# Containers
# --------------------------------------------------------------------------


@attrs.frozen
class ContainerMetadata:
    """cri-api ``ContainerMetadata``."""

    name: str
    attempt: int = 0


@attrs.frozen
class Mount:
    """cri-api ``Mount`` of a host path (image volume mounts are not supported)."""

    container_path: str
    host_path: str
    readonly: bool = False
    #: Recorded, not applied (no SELinux support).
    selinux_relabel: bool = False
    propagation: MountPropagation = MountPropagation.PRIVATE
    #: Implies ``readonly`` and ``PRIVATE`` propagation (checked by the converter).
    recursive_read_only: bool = False


@attrs.frozen
class Device:
    """cri-api ``Device``: a host device node (or a directory of them)."""

    container_path: str
    host_path: str
    #: cgroup access: some of "r", "w", "m".
    permissions: str = "rwm"


@attrs.frozen
class Capabilities:
    """cri-api ``Capability``, canonicalised: "CAP_NET_ADMIN", or "ALL"."""

    add: tuple[str, ...] = ()
    drop: tuple[str, ...] = ()
    add_ambient: tuple[str, ...] = ()


@attrs.frozen
class ContainerSecurity:
    """cri-api ``LinuxContainerSecurityContext``."""

    capabilities: Capabilities = Capabilities()
    privileged: bool = False
    namespace_options: NamespaceOptions = NamespaceOptions()
    selinux: SELinuxOptions | None = None
    run_as_user: int | None = None
    #: Only set together with ``run_as_user`` or ``run_as_username``.
    run_as_group: int | None = None
    #: Resolved in the image's /etc/passwd; wins over ``run_as_user`` (containerd).
    run_as_username: str = ""
    readonly_rootfs: bool = False
    supplemental_groups: tuple[int, ...] = ()
    supplemental_groups_policy: SupplementalGroupsPolicy = SupplementalGroupsPolicy.MERGE
    apparmor: SecurityProfile = RUNTIME_DEFAULT
    seccomp: SecurityProfile = UNCONFINED
    no_new_privs: bool = False
    #: Empty: the runtime's defaults (``pouch.container.defaults``).
    masked_paths: tuple[str, ...] = ()
    readonly_paths: tuple[str, ...] = ()


@attrs.frozen
class ContainerConfig:
    """cri-api ``ContainerConfig`` (Linux part), validated."""

    metadata: ContainerMetadata
    #: ``ImageSpec.image``: the reference or id the kubelet resolved.
    image: str
    #: ``ImageSpec.user_specified_image``: what the pod spec said, if sent.
    user_specified_image: str = ""
    command: tuple[str, ...] = ()
    args: tuple[str, ...] = ()
    working_dir: str = ""
    #: (key, value) in request order; later entries win.
    envs: tuple[tuple[str, str], ...] = ()
    mounts: tuple[Mount, ...] = ()
    devices: tuple[Device, ...] = ()
    labels: Mapping[str, str] = attrs.field(factory=_empty_map, converter=_frozen_map)
    annotations: Mapping[str, str] = attrs.field(factory=_empty_map, converter=_frozen_map)
    #: Relative to ``PodConfig.log_directory``.
    log_path: str = ""
    stdin: bool = False
    stdin_once: bool = False
    tty: bool = False
    #: ``None``: the kubelet sent no resources (no limits, no oom_score_adj).
    resources: LinuxResources | None = None
    security: ContainerSecurity = ContainerSecurity()
    #: A signal name ("SIGTERM", "SIGRTMIN+3"); "" means the image's or SIGTERM.
    stop_signal: str = ""
    #: Fully qualified CDI device names; recorded, not injected.
    cdi_devices: tuple[str, ...] = ()
