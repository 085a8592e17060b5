"""pouch.cri._convert: CRI messages to domain types, and the messages of its errors."""

from __future__ import annotations

import pytest

from pouch.container.model import (
    RUNTIME_DEFAULT,
    UNCONFINED,
    Capabilities,
    Device,
    DNSConfig,
    HugepageLimit,
    LinuxResources,
    Mount,
    MountPropagation,
    NamespaceMode,
    NamespaceOptions,
    PortMapping,
    ProfileType,
    Protocol,
    SecurityProfile,
    SELinuxOptions,
    SupplementalGroupsPolicy,
)
from pouch.cri import _convert
from pouch.cri._pb.runtime import v1 as pb
from pouch.errors import InvalidArgument, Unimplemented


def wire(msg):
    """Round-trip through bytes, as a request from the kubelet arrives."""
    return type(msg)().parse(bytes(msg))


def pod_msg(**linux_kwargs) -> pb.PodSandboxConfig:
    return pb.PodSandboxConfig(
        metadata=pb.PodSandboxMetadata(name="web", uid="uid-1", namespace="default", attempt=1),
        hostname="web-0",
        log_directory="/var/log/pods/default_web_uid-1",
        linux=pb.LinuxPodSandboxConfig(**linux_kwargs),
    )


def ctr_msg(**kwargs) -> pb.ContainerConfig:
    base = {
        "metadata": pb.ContainerMetadata(name="app", attempt=2),
        "image": pb.ImageSpec(image="sha256:" + "a" * 64, user_specified_image="busybox"),
    }
    base.update(kwargs)
    return pb.ContainerConfig(**base)


def sc_msg(**kwargs) -> pb.ContainerConfig:
    return ctr_msg(
        linux=pb.LinuxContainerConfig(security_context=pb.LinuxContainerSecurityContext(**kwargs))
    )


def res_msg(**kwargs) -> pb.ContainerConfig:
    return ctr_msg(linux=pb.LinuxContainerConfig(resources=pb.LinuxContainerResources(**kwargs)))


def convert(msg: pb.ContainerConfig):
    return _convert.to_container_config(wire(msg))


def error_of(msg: pb.ContainerConfig) -> str:
    with pytest.raises(InvalidArgument) as info:
        convert(msg)
    return str(info.value)


# --- PodSandboxConfig ----------------------------------------------------------


def test_pod_config_full():
    msg = pb.PodSandboxConfig(
        metadata=pb.PodSandboxMetadata(name="web", uid="uid-1", namespace="default", attempt=1),
        hostname="web-0",
        log_directory="/var/log/pods/x",
        dns_config=pb.DnsConfig(
            servers=["10.0.0.10"], searches=["svc.cluster.local"], options=["ndots:5"]
        ),
        port_mappings=[pb.PortMapping(protocol=pb.Protocol.UDP, container_port=53, host_port=5353)],
        labels={"app": "web"},
        annotations={"a": "b"},
        linux=pb.LinuxPodSandboxConfig(
            cgroup_parent="/kubepods/pod1",
            sysctls={"net.ipv4.ip_unprivileged_port_start": "0"},
            security_context=pb.LinuxSandboxSecurityContext(
                namespace_options=pb.NamespaceOption(
                    network=pb.NamespaceMode.NODE, pid=pb.NamespaceMode.CONTAINER
                ),
                run_as_user=pb.Int64Value(value=65535),
                run_as_group=pb.Int64Value(value=65535),
                supplemental_groups=[5, 6],
                privileged=True,
                seccomp=pb.SecurityProfile(profile_type=pb.SecurityProfileProfileType.Unconfined),
                selinux_options=pb.SeLinuxOption(type="spc_t"),
            ),
            resources=pb.LinuxContainerResources(cpu_shares=1024, memory_limit_in_bytes=1 << 30),
        ),
    )
    pod = _convert.to_pod_config(wire(msg))
    assert pod.metadata.name == "web"
    assert pod.metadata.attempt == 1
    assert pod.dns == DNSConfig(("10.0.0.10",), ("svc.cluster.local",), ("ndots:5",))
    assert pod.port_mappings == (PortMapping(Protocol.UDP, 53, 5353, ""),)
    assert dict(pod.labels) == {"app": "web"}
    assert pod.cgroup_parent == "/kubepods/pod1"
    assert dict(pod.sysctls) == {"net.ipv4.ip_unprivileged_port_start": "0"}
    sec = pod.security
    assert sec.namespace_options == NamespaceOptions(
        network=NamespaceMode.NODE, pid=NamespaceMode.CONTAINER, ipc=NamespaceMode.POD
    )
    assert (sec.run_as_user, sec.run_as_group) == (65535, 65535)
    assert sec.supplemental_groups == (5, 6)
    assert sec.privileged
    assert sec.seccomp == UNCONFINED
    assert sec.selinux == SELinuxOptions(type="spc_t")
    assert pod.resources == LinuxResources(cpu_shares=1024, memory_limit_in_bytes=1 << 30)
    assert pod.overhead is None


def test_pod_config_defaults():
    pod = _convert.to_pod_config(wire(pod_msg()))
    assert pod.dns is None
    assert pod.security.run_as_user is None
    assert pod.security.seccomp == UNCONFINED
    assert pod.security.apparmor == RUNTIME_DEFAULT
    assert pod.namespace_options == NamespaceOptions()
    assert pod.resources is None


def test_pod_labels_are_read_only():
    pod = _convert.to_pod_config(wire(pod_msg()))
    with pytest.raises(TypeError):
        pod.labels["x"] = "y"  # type: ignore[index]


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda m: setattr(m, "metadata", None), "config.metadata is required"),
        (lambda m: setattr(m.metadata, "name", ""), "config.metadata.name is required"),
        (lambda m: setattr(m.metadata, "uid", ""), "config.metadata.uid is required"),
        (
            lambda m: setattr(m.metadata, "namespace", ""),
            "config.metadata.namespace is required",
        ),
        (lambda m: setattr(m, "log_directory", "logs"), "config.log_directory must be absolute"),
        (lambda m: setattr(m, "hostname", "x" * 65), "config.hostname must be at most 64"),
        (
            lambda m: setattr(m, "dns_config", pb.DnsConfig(servers=["1.1.1.1\nnameserver x"])),
            "config.dns_config.servers[0] must be a non-empty word",
        ),
        (
            lambda m: setattr(m, "dns_config", pb.DnsConfig(options=["a", ""])),
            "config.dns_config.options[1] must be a non-empty word",
        ),
        (
            lambda m: setattr(m, "port_mappings", [pb.PortMapping(host_port=70000)]),
            "config.port_mappings[0].host_port must be between 0 and 65535",
        ),
        (
            lambda m: setattr(m.linux, "sysctls", {"../../etc/x": "1"}),
            "config.linux.sysctls has an invalid name '../../etc/x'",
        ),
        (
            lambda m: setattr(m.linux, "sysctls", {"kernel.x": "1\n2"}),
            "config.linux.sysctls['kernel.x'] must be a single line",
        ),
        (
            lambda m: setattr(
                m.linux,
                "security_context",
                pb.LinuxSandboxSecurityContext(run_as_group=pb.Int64Value(value=1)),
            ),
            "config.linux.security_context.run_as_group requires"
            " config.linux.security_context.run_as_user",
        ),
        (
            lambda m: setattr(
                m.linux,
                "security_context",
                pb.LinuxSandboxSecurityContext(
                    namespace_options=pb.NamespaceOption(pid=pb.NamespaceMode.TARGET, target_id="x")
                ),
            ),
            "config.linux.security_context.namespace_options.pid: TARGET is not valid",
        ),
        (
            lambda m: setattr(
                m.linux, "overhead", pb.LinuxContainerResources(memory_limit_in_bytes=-5)
            ),
            "config.linux.overhead.memory_limit_in_bytes must not be negative, got -5",
        ),
    ],
)
def test_pod_config_errors(mutate, message):
    msg = pod_msg()
    mutate(msg)
    with pytest.raises(InvalidArgument) as info:
        _convert.to_pod_config(wire(msg))
    assert str(info.value).startswith(message)


def test_pod_config_missing():
    with pytest.raises(InvalidArgument, match=r"^config is required$"):
        _convert.to_pod_config(None)
    with pytest.raises(InvalidArgument, match=r"^config is required$"):
        _convert.to_pod_config(wire(pb.RunPodSandboxRequest()).config)


def test_pod_config_pid_container_is_accepted():
    # The kubelet sends pid CONTAINER for pods that do not share a pid namespace.
    msg = pod_msg(
        security_context=pb.LinuxSandboxSecurityContext(
            namespace_options=pb.NamespaceOption(pid=pb.NamespaceMode.CONTAINER)
        )
    )
    assert _convert.to_pod_config(wire(msg)).namespace_options.pid is NamespaceMode.CONTAINER


def test_pod_deprecated_seccomp_profile_path():
    sc = pb.LinuxSandboxSecurityContext()
    sc.seccomp_profile_path = "runtime/default"  # what the wire gives; no warning
    pod = _convert.to_pod_config(wire(pod_msg(security_context=sc)))
    assert pod.security.seccomp == RUNTIME_DEFAULT


# --- ContainerConfig: basics ---------------------------------------------------------


def test_container_config_full():
    msg = ctr_msg(
        command=["/bin/sh", "-c"],
        args=["echo hi"],
        working_dir="/srv",
        envs=[pb.KeyValue(key="A", value=b"1"), pb.KeyValue(key="B", value="é".encode())],
        mounts=[
            pb.Mount(container_path="/data", host_path="/var/lib/data", readonly=True),
            pb.Mount(
                container_path="/shared",
                host_path="/mnt/shared",
                propagation=pb.MountPropagation.PROPAGATION_BIDIRECTIONAL,
                selinux_relabel=True,
            ),
        ],
        devices=[pb.Device(host_path="/dev/fuse", permissions="mrw")],
        labels={"io.kubernetes.container.name": "app"},
        annotations={"x": "y"},
        log_path="app/2.log",
        stdin=True,
        stdin_once=True,
        tty=True,
        cdi_devices=[pb.CdiDevice(name="vendor.com/gpu=0")],
        stop_signal=pb.Signal.SIGQUIT,
    )
    ctr = convert(msg)
    assert ctr.metadata.name == "app"
    assert ctr.metadata.attempt == 2
    assert ctr.image == "sha256:" + "a" * 64
    assert ctr.user_specified_image == "busybox"
    assert (ctr.command, ctr.args, ctr.working_dir) == (("/bin/sh", "-c"), ("echo hi",), "/srv")
    assert ctr.envs == (("A", "1"), ("B", "é"))
    assert ctr.mounts == (
        Mount("/data", "/var/lib/data", readonly=True),
        Mount(
            "/shared",
            "/mnt/shared",
            selinux_relabel=True,
            propagation=MountPropagation.BIDIRECTIONAL,
        ),
    )
    # An empty container path means the host path; permissions are normalised.
    assert ctr.devices == (Device("/dev/fuse", "/dev/fuse", "rwm"),)
    assert (ctr.stdin, ctr.stdin_once, ctr.tty) == (True, True, True)
    assert ctr.log_path == "app/2.log"
    assert ctr.cdi_devices == ("vendor.com/gpu=0",)
    assert ctr.stop_signal == "SIGQUIT"
    assert ctr.resources is None


def test_container_config_defaults():
    ctr = convert(ctr_msg())
    sec = ctr.security
    assert sec.run_as_user is None
    assert sec.seccomp == UNCONFINED
    assert sec.apparmor == RUNTIME_DEFAULT
    assert sec.capabilities == Capabilities()
    assert sec.namespace_options == NamespaceOptions()
    assert sec.supplemental_groups_policy is SupplementalGroupsPolicy.MERGE


@pytest.mark.parametrize(
    ("msg", "message"),
    [
        (pb.ContainerConfig(), "config.metadata is required"),
        (ctr_msg(metadata=None), "config.metadata is required"),
        (ctr_msg(metadata=pb.ContainerMetadata(attempt=1)), "config.metadata.name is required"),
        (ctr_msg(image=None), "config.image.image is required"),
        (ctr_msg(image=pb.ImageSpec(image="")), "config.image.image is required"),
        (ctr_msg(working_dir="srv"), "config.working_dir must be absolute, got 'srv'"),
        (ctr_msg(command=["a\x00b"]), "config.command[0] must not contain NUL"),
        (
            ctr_msg(envs=[pb.KeyValue(key="", value=b"x")]),
            "config.envs[0].key must be non-empty",
        ),
        (
            ctr_msg(envs=[pb.KeyValue(key="A", value=b"1"), pb.KeyValue(key="B=C", value=b"")]),
            "config.envs[1].key must be non-empty, without '=' or NUL",
        ),
        (
            ctr_msg(envs=[pb.KeyValue(key="A", value=b"\xff")]),
            "config.envs[0].value is not valid UTF-8",
        ),
        (
            ctr_msg(
                mounts=[
                    pb.Mount(container_path="/a", host_path="/a"),
                    pb.Mount(container_path="/b", host_path="/b"),
                    pb.Mount(container_path="data", host_path="/c"),
                ]
            ),
            "config.mounts[2].container_path must be absolute, got 'data'",
        ),
        (
            ctr_msg(mounts=[pb.Mount(container_path="/a")]),
            "config.mounts[0].host_path is required",
        ),
        (
            ctr_msg(mounts=[pb.Mount(container_path="/a", host_path="rel")]),
            "config.mounts[0].host_path must be absolute",
        ),
        (
            ctr_msg(
                mounts=[
                    pb.Mount(container_path="/a/", host_path="/x"),
                    pb.Mount(container_path="/a", host_path="/y"),
                ]
            ),
            "config.mounts[1].container_path '/a' duplicates config.mounts[0]",
        ),
        (
            ctr_msg(mounts=[pb.Mount(container_path="/a", host_path="/a", propagation=7)]),
            "config.mounts[0].propagation has unknown value 7",
        ),
        (
            ctr_msg(
                mounts=[pb.Mount(container_path="/a", host_path="/a", recursive_read_only=True)]
            ),
            "config.mounts[0].recursive_read_only requires readonly and PROPAGATION_PRIVATE",
        ),
        (
            ctr_msg(devices=[pb.Device(host_path="/dev/fuse", permissions="rx")]),
            "config.devices[0].permissions must be made of r, w and m, got 'rx'",
        ),
        (
            ctr_msg(devices=[pb.Device(container_path="/dev/x")]),
            "config.devices[0].host_path is required",
        ),
        (ctr_msg(cdi_devices=[pb.CdiDevice()]), "config.cdi_devices[0].name is required"),
        (ctr_msg(stop_signal=99), "config.stop_signal has unknown value 99"),
    ],
)
def test_container_config_errors(msg, message):
    assert error_of(msg).startswith(message)


def test_container_config_missing():
    with pytest.raises(InvalidArgument, match=r"^config is required$"):
        _convert.to_container_config(None)
    with pytest.raises(InvalidArgument, match=r"^config is required$"):
        _convert.to_container_config(wire(pb.CreateContainerRequest()).config)


def test_path_prefix_is_the_callers():
    with pytest.raises(InvalidArgument, match=r"^request\.config\.metadata is required$"):
        _convert.to_container_config(wire(ctr_msg(metadata=None)), "request.config")


def test_recursive_read_only_accepted_with_readonly_private():
    msg = ctr_msg(
        mounts=[
            pb.Mount(container_path="/a", host_path="/a", readonly=True, recursive_read_only=True)
        ]
    )
    assert convert(msg).mounts[0].recursive_read_only


def test_image_volume_mount_is_unimplemented():
    msg = ctr_msg(mounts=[pb.Mount(container_path="/a", image=pb.ImageSpec(image="busybox"))])
    with pytest.raises(Unimplemented, match=r"config\.mounts\[0\]\.image"):
        convert(msg)


def test_idmapped_mount_is_unimplemented():
    mapping = pb.IdMapping(host_id=1000, container_id=0, length=1)
    msg = ctr_msg(mounts=[pb.Mount(container_path="/a", host_path="/a", uid_mappings=[mapping])])
    with pytest.raises(Unimplemented, match="id-mapped"):
        convert(msg)


@pytest.mark.parametrize(
    ("value", "name"),
    [
        (pb.Signal.RUNTIME_DEFAULT, ""),
        (pb.Signal.SIGTERM, "SIGTERM"),
        (pb.Signal.SIGKILL, "SIGKILL"),
        (pb.Signal.SIGRTMIN, "SIGRTMIN"),
        (pb.Signal.SIGRTMINPLUS1, "SIGRTMIN+1"),
        (pb.Signal.SIGRTMINPLUS15, "SIGRTMIN+15"),
        (pb.Signal.SIGRTMAXMINUS14, "SIGRTMAX-14"),
        (pb.Signal.SIGRTMAX, "SIGRTMAX"),
    ],
)
def test_signal_name(value, name):
    assert _convert.signal_name(value) == name


# --- resources ----------------------------------------------------------------------


def test_resources():
    msg = res_msg(
        cpu_period=100_000,
        cpu_quota=50_000,
        cpu_shares=512,
        memory_limit_in_bytes=1 << 28,
        oom_score_adj=-997,
        cpuset_cpus="0-2,4",
        cpuset_mems="0",
        hugepage_limits=[pb.HugepageLimit(page_size="2MB", limit=1 << 21)],
        unified={"memory.high": "200M"},
        memory_swap_limit_in_bytes=-1,
    )
    res = convert(msg).resources
    assert res == LinuxResources(
        cpu_period=100_000,
        cpu_quota=50_000,
        cpu_shares=512,
        memory_limit_in_bytes=1 << 28,
        oom_score_adj=-997,
        cpuset_cpus="0-2,4",
        cpuset_mems="0",
        hugepage_limits=(HugepageLimit("2MB", 1 << 21),),
        unified={"memory.high": "200M"},
        memory_swap_limit_in_bytes=-1,
    )


def test_empty_resources_message_is_present():
    # The kubelet always sends resources; an empty message means "no limits".
    # Field 15 (linux) holding field 1 (resources) of length 0, as Go encodes
    # a non-nil empty message; betterproto drops empty ones it built itself.
    raw = bytes(ctr_msg()) + b"\x7a\x02\x0a\x00"
    ctr = _convert.to_container_config(pb.ContainerConfig().parse(raw))
    assert ctr.resources == LinuxResources()
    assert convert(ctr_msg()).resources is None


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"cpu_shares": -1}, "config.linux.resources.cpu_shares must not be negative, got -1"),
        ({"cpu_period": -1}, "config.linux.resources.cpu_period must not be negative"),
        ({"cpu_period": 999}, "config.linux.resources.cpu_period must be between 1000"),
        ({"cpu_period": 1_000_001}, "config.linux.resources.cpu_period must be between 1000"),
        ({"cpu_quota": 999}, "config.linux.resources.cpu_quota must be -1, 0 or at least 1000"),
        ({"cpu_quota": -2}, "config.linux.resources.cpu_quota must be -1, 0 or at least 1000"),
        (
            {"memory_limit_in_bytes": -1},
            "config.linux.resources.memory_limit_in_bytes must not be negative",
        ),
        (
            {"memory_swap_limit_in_bytes": -2},
            "config.linux.resources.memory_swap_limit_in_bytes must be -1",
        ),
        ({"oom_score_adj": 1001}, "config.linux.resources.oom_score_adj must be between"),
        ({"oom_score_adj": -1001}, "config.linux.resources.oom_score_adj must be between"),
        ({"cpuset_cpus": "0-"}, "config.linux.resources.cpuset_cpus is not a CPU or node list"),
        ({"cpuset_mems": "a"}, "config.linux.resources.cpuset_mems is not a CPU or node list"),
        (
            {"hugepage_limits": [pb.HugepageLimit(page_size="2M", limit=1)]},
            "config.linux.resources.hugepage_limits[0].page_size must look like 2MB",
        ),
        (
            {"unified": {"../cgroup.procs": "1"}},
            "config.linux.resources.unified has an invalid key '../cgroup.procs'",
        ),
    ],
)
def test_resources_errors(kwargs, message):
    assert error_of(res_msg(**kwargs)).startswith(message)


def test_quota_minus_one_is_unlimited():
    assert convert(res_msg(cpu_quota=-1)).resources.cpu_quota == -1


def test_to_linux_resources_for_update():
    res = pb.LinuxContainerResources(cpu_shares=-3)
    with pytest.raises(InvalidArgument, match=r"^linux\.cpu_shares must not be negative"):
        _convert.to_linux_resources(res, "linux")


# --- security context ------------------------------------------------------------------


SC = "config.linux.security_context"


def test_run_as_user_zero_is_set():
    # Int64Value{0} on the wire is "root", not "unset".
    ctr = convert(sc_msg(run_as_user=pb.Int64Value(value=0)))
    assert ctr.security.run_as_user == 0
    assert convert(sc_msg()).security.run_as_user is None


def test_users_and_groups():
    sec = convert(
        sc_msg(
            run_as_user=pb.Int64Value(value=1000),
            run_as_group=pb.Int64Value(value=3000),
            run_as_username="app",
            supplemental_groups=[4000, 5000],
            supplemental_groups_policy=pb.SupplementalGroupsPolicy.Strict,
        )
    ).security
    assert (sec.run_as_user, sec.run_as_group, sec.run_as_username) == (1000, 3000, "app")
    assert sec.supplemental_groups == (4000, 5000)
    assert sec.supplemental_groups_policy is SupplementalGroupsPolicy.STRICT


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"run_as_group": pb.Int64Value(value=5)},
            f"{SC}.run_as_group requires {SC}.run_as_user or {SC}.run_as_username",
        ),
        (
            {"run_as_user": pb.Int64Value(value=-1)},
            f"{SC}.run_as_user.value must be between 0 and 2147483647, got -1",
        ),
        ({"run_as_username": "a:b"}, f"{SC}.run_as_username must not contain ':'"),
        ({"supplemental_groups": [1, -2]}, f"{SC}.supplemental_groups[1] must be between"),
        ({"masked_paths": ["proc/kcore"]}, f"{SC}.masked_paths[0] must be absolute"),
        ({"readonly_paths": ["/a", ""]}, f"{SC}.readonly_paths[1] is required"),
        (
            {"capabilities": pb.Capability(add_capabilities=["CHOWN", "FLY"])},
            f"{SC}.capabilities.add_capabilities[1]: unknown capability 'FLY'",
        ),
        (
            {"capabilities": pb.Capability(add_ambient_capabilities=["ALL"])},
            f"{SC}.capabilities.add_ambient_capabilities[0]: unknown capability 'ALL'",
        ),
        (
            {"namespace_options": pb.NamespaceOption(pid=pb.NamespaceMode.TARGET)},
            f"{SC}.namespace_options.target_id is required",
        ),
        (
            {"namespace_options": pb.NamespaceOption(network=pb.NamespaceMode.TARGET)},
            f"{SC}.namespace_options.network: TARGET is only supported for pid",
        ),
        (
            {"namespace_options": pb.NamespaceOption(target_id="abc")},
            f"{SC}.namespace_options.target_id must only be set with pid TARGET",
        ),
        (
            {
                "seccomp": pb.SecurityProfile(
                    profile_type=pb.SecurityProfileProfileType.RuntimeDefault,
                    localhost_ref="/x.json",
                )
            },
            f"{SC}.seccomp.localhost_ref must only be set for Localhost",
        ),
        (
            {
                "seccomp": pb.SecurityProfile(
                    profile_type=pb.SecurityProfileProfileType.Localhost,
                    localhost_ref="profiles/x.json",
                )
            },
            f"{SC}.seccomp.localhost_ref must be absolute",
        ),
        (
            {"seccomp": pb.SecurityProfile(profile_type=pb.SecurityProfileProfileType.Localhost)},
            f"{SC}.seccomp.localhost_ref is required",
        ),
        (
            {"apparmor": pb.SecurityProfile(profile_type=pb.SecurityProfileProfileType.Localhost)},
            f"{SC}.apparmor.localhost_ref is required",
        ),
        (
            {"seccomp": pb.SecurityProfile(profile_type=9)},
            f"{SC}.seccomp.profile_type has unknown value 9",
        ),
    ],
)
def test_security_context_errors(kwargs, message):
    assert error_of(sc_msg(**kwargs)).startswith(message)


def test_capabilities_are_canonical():
    caps = convert(
        sc_msg(
            capabilities=pb.Capability(
                add_capabilities=["net_admin", "CAP_SYS_TIME", "all"],
                drop_capabilities=["ALL", "Chown"],
                add_ambient_capabilities=["NET_BIND_SERVICE"],
            )
        )
    ).security.capabilities
    assert caps == Capabilities(
        add=("CAP_NET_ADMIN", "CAP_SYS_TIME", "ALL"),
        drop=("ALL", "CAP_CHOWN"),
        add_ambient=("CAP_NET_BIND_SERVICE",),
    )


def test_namespace_options_target():
    sec = convert(
        sc_msg(namespace_options=pb.NamespaceOption(pid=pb.NamespaceMode.TARGET, target_id="c1"))
    ).security
    assert sec.namespace_options.pid is NamespaceMode.TARGET
    assert sec.namespace_options.target_id == "c1"


def test_user_namespaces():
    node = pb.NamespaceOption(userns_options=pb.UserNamespace(mode=pb.NamespaceMode.NODE))
    assert convert(sc_msg(namespace_options=node)).security.namespace_options == NamespaceOptions()
    pod = pb.NamespaceOption(userns_options=pb.UserNamespace(mode=pb.NamespaceMode.POD))
    with pytest.raises(Unimplemented, match="user namespaces"):
        convert(sc_msg(namespace_options=pod))


@pytest.mark.parametrize(
    ("profile_type", "ref", "expected"),
    [
        (pb.SecurityProfileProfileType.RuntimeDefault, "", RUNTIME_DEFAULT),
        (pb.SecurityProfileProfileType.Unconfined, "", UNCONFINED),
        (
            pb.SecurityProfileProfileType.Localhost,
            "/var/lib/kubelet/seccomp/a.json",
            SecurityProfile(ProfileType.LOCALHOST, "/var/lib/kubelet/seccomp/a.json"),
        ),
        (
            pb.SecurityProfileProfileType.Localhost,
            "localhost//var/lib/kubelet/seccomp/a.json",
            SecurityProfile(ProfileType.LOCALHOST, "/var/lib/kubelet/seccomp/a.json"),
        ),
    ],
)
def test_seccomp_profile_message(profile_type, ref, expected):
    msg = sc_msg(seccomp=pb.SecurityProfile(profile_type=profile_type, localhost_ref=ref))
    assert convert(msg).security.seccomp == expected


def legacy_sc(**fields) -> pb.ContainerConfig:
    """A security context with deprecated string fields, as the wire delivers it."""
    sc = pb.LinuxContainerSecurityContext()
    for name, value in fields.items():
        setattr(sc, name, value)  # no DeprecationWarning: that fires in __init__ only
    return ctr_msg(linux=pb.LinuxContainerConfig(security_context=sc))


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("", UNCONFINED),
        ("runtime/default", RUNTIME_DEFAULT),
        ("docker/default", RUNTIME_DEFAULT),
        ("unconfined", UNCONFINED),
        ("localhost//opt/p.json", SecurityProfile(ProfileType.LOCALHOST, "/opt/p.json")),
    ],
)
def test_seccomp_profile_path(value, expected):
    assert convert(legacy_sc(seccomp_profile_path=value)).security.seccomp == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("", RUNTIME_DEFAULT),
        ("runtime/default", RUNTIME_DEFAULT),
        ("unconfined", UNCONFINED),
        ("localhost/my-profile", SecurityProfile(ProfileType.LOCALHOST, "my-profile")),
    ],
)
def test_apparmor_profile(value, expected):
    assert convert(legacy_sc(apparmor_profile=value)).security.apparmor == expected


def test_deprecated_profile_errors():
    assert error_of(legacy_sc(seccomp_profile_path="default")).startswith(
        f"{SC}.seccomp_profile_path must be runtime/default, docker/default, unconfined"
    )
    assert error_of(legacy_sc(seccomp_profile_path="localhost/rel.json")).startswith(
        f"{SC}.seccomp_profile_path (after localhost/) must be absolute"
    )
    assert error_of(legacy_sc(apparmor_profile="localhost/")).startswith(
        f"{SC}.apparmor_profile (after localhost/) is required"
    )


def test_profile_message_wins_over_deprecated_string():
    msg = legacy_sc(
        seccomp_profile_path="unconfined",
        seccomp=pb.SecurityProfile(profile_type=pb.SecurityProfileProfileType.RuntimeDefault),
        apparmor_profile="unconfined",
        apparmor=pb.SecurityProfile(
            profile_type=pb.SecurityProfileProfileType.Localhost, localhost_ref="p"
        ),
    )
    sec = convert(msg).security
    assert sec.seccomp == RUNTIME_DEFAULT
    assert sec.apparmor == SecurityProfile(ProfileType.LOCALHOST, "p")


def test_flags_and_paths():
    sec = convert(
        sc_msg(
            privileged=True,
            readonly_rootfs=True,
            no_new_privs=True,
            masked_paths=["/proc/kcore"],
            readonly_paths=["/proc/sys"],
            selinux_options=pb.SeLinuxOption(level="s0:c1,c2"),
        )
    ).security
    assert sec.privileged
    assert sec.readonly_rootfs
    assert sec.no_new_privs
    assert sec.masked_paths == ("/proc/kcore",)
    assert sec.readonly_paths == ("/proc/sys",)
    assert sec.selinux == SELinuxOptions(level="s0:c1,c2")
