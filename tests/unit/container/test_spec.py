"""pouch.container.spec: the OCI config.json of pods and containers (containerd's semantics)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import attrs
import pytest

from pouch.container import defaults, spec
from pouch.container.model import (
    RUNTIME_DEFAULT,
    UNCONFINED,
    Capabilities,
    ContainerConfig,
    ContainerMetadata,
    ContainerSecurity,
    Device,
    HugepageLimit,
    LinuxResources,
    Mount,
    MountPropagation,
    NamespaceMode,
    NamespaceOptions,
    PodConfig,
    PodMetadata,
    PodSecurity,
    ProfileType,
    SecurityProfile,
    SupplementalGroupsPolicy,
)
from pouch.errors import FailedPrecondition, InvalidArgument
from pouch.image.media import ImageConfig, Platform

PASSWD = """\
root:x:0:0:root:/root:/bin/sh
# a comment
daemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin
app:x:1000:1000:app:/home/app:/bin/sh
garbled:x:notanumber:0::/:/bin/sh
shared:x:1000:2000:second user with uid 1000:/:/bin/sh
nobody:x:65534:65534:nobody:/nonexistent:/bin/false
"""
GROUP = """\
root:x:0:
wheel:x:10:root,app
audio:x:29:app, daemon
app:x:1000:app
video:x:44:
staff:x:50:nobody
"""
NAMESPACES = {
    "net": "/proc/42/ns/net",
    "uts": "/proc/42/ns/uts",
    "ipc": "/proc/42/ns/ipc",
    "pid": "/proc/42/ns/pid",
}
ETC_FILES = {"hosts": "/pods/p1/hosts", "resolv.conf": "/pods/p1/resolv.conf"}
DEFAULT_CAP_MASK = sum(
    1 << defaults.ALL_CAPABILITIES.index(c) for c in defaults.DEFAULT_CAPABILITIES
)


def make_pod(**kwargs) -> PodConfig:
    security = kwargs.pop("security", PodSecurity())
    return PodConfig(
        metadata=PodMetadata(name="web", uid="uid-1", namespace="default", attempt=0),
        hostname=kwargs.pop("hostname", "web-0"),
        log_directory="/var/log/pods/default_web_uid-1",
        security=security,
        **kwargs,
    )


def make_ctr(**kwargs) -> ContainerConfig:
    security = kwargs.pop("security", ContainerSecurity())
    return ContainerConfig(
        metadata=ContainerMetadata(name="app"),
        image=kwargs.pop("image", "docker.io/library/busybox:latest"),
        security=security,
        **kwargs,
    )


def make_image(**kwargs) -> ImageConfig:
    kwargs.setdefault("cmd", ("sh",))
    return ImageConfig(diff_ids=(), platform=Platform("linux", "amd64"), **kwargs)


def build(pod=None, ctr=None, image=None, **kwargs) -> spec.Spec:
    args = {
        "sandbox_id": "sb1",
        "rootfs": Path("/containers/c1/rootfs"),
        "pod_namespaces": NAMESPACES,
        "etc_files": ETC_FILES,
        "shm_path": "/pods/p1/shm",
        "passwd": PASSWD,
        "group": GROUP,
        "cgroups_path": "/kubepods/pod1/c1",
        "oom_score_adj_floor": -1000,
        "host_has_apparmor": False,
        "node_hostname": "node-1",
    }
    args.update(kwargs)
    return spec.container_spec(
        pod if pod is not None else make_pod(),
        ctr if ctr is not None else make_ctr(),
        image if image is not None else make_image(),
        **args,
    )


def with_security(**kwargs) -> ContainerConfig:
    return make_ctr(security=ContainerSecurity(**kwargs))


def destinations(s: spec.Spec) -> list[str]:
    return [m["destination"] for m in s["mounts"]]


def mount_at(s: spec.Spec, destination: str) -> defaults.Mount:
    (found,) = [m for m in s["mounts"] if m["destination"] == destination]
    return found


# --- resolve_user ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("user", "expected"),
    [
        ("", (0, 0, (0, 10))),  # root, a member of wheel
        ("0", (0, 0, (0, 10))),
        ("root", (0, 0, (0, 10))),
        ("app", (1000, 1000, (10, 29, 1000))),  # "app" group is named like the user: primary only
        ("1000", (1000, 1000, (10, 29, 1000))),  # the first entry with the uid
        ("daemon", (1, 1, (1, 29))),  # member lists are trimmed
        ("4242", (4242, 0, (0,))),  # unknown uid: gid 0, no memberships
        ("1000:44", (1000, 44, (10, 29, 44))),
        ("app:video", (1000, 44, (10, 29, 44))),
        ("4242:video", (4242, 44, (44,))),
        ("app:", (1000, 0, (0, 10, 29))),  # Go: an empty group is gid 0
        ("nobody", (65534, 65534, (50, 65534))),
        ("+5", (5, 0, (0,))),  # strconv.Atoi
    ],
)
def test_resolve_user(user, expected):
    assert spec.resolve_user(user, PASSWD, GROUP) == expected


def test_resolve_user_without_files():
    assert spec.resolve_user("", None, None) == (0, 0, (0,))
    assert spec.resolve_user("1000", None, None) == (1000, 0, (0,))
    assert spec.resolve_user("1000:1000", None, None) == (1000, 1000, (1000,))
    with pytest.raises(InvalidArgument, match="no user 'app' in the image's /etc/passwd"):
        spec.resolve_user("app", None, None)


@pytest.mark.parametrize(
    ("user", "message"),
    [
        ("ghost", "no user 'ghost' in the image's /etc/passwd"),
        ("garbled", "no user 'garbled'"),  # a malformed line is not uid 0
        ("app:ghosts", "no group 'ghosts' in the image's /etc/group"),
        ("a:b:c", "invalid user 'a:b:c'"),
        ("-1", "invalid user '-1': uid out of range"),
        ("2147483648", "uid out of range"),
        ("0:2147483648", "gid out of range"),
    ],
)
def test_resolve_user_errors(user, message):
    with pytest.raises(InvalidArgument, match=message):
        spec.resolve_user(user, PASSWD, GROUP)


def test_read_user_db_stays_inside_the_rootfs(tmp_path):
    rootfs = tmp_path / "rootfs"
    (rootfs / "etc").mkdir(parents=True)
    (rootfs / "data").mkdir()
    (rootfs / "data" / "passwd").write_text("app:x:7:7::/:/bin/sh\n")
    # An absolute link resolves against the rootfs, not the host.
    (rootfs / "etc" / "passwd").symlink_to("/data/passwd")
    (rootfs / "etc" / "group").symlink_to("../../../../../etc/missing-group")
    passwd, group = spec.read_user_db(rootfs)
    assert passwd == "app:x:7:7::/:/bin/sh\n"
    assert group is None
    assert spec.read_user_db(tmp_path / "empty") == (None, None)


def test_read_user_db_symlink_loop(tmp_path):
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "passwd").symlink_to("/etc/passwd")
    with pytest.raises(InvalidArgument, match=r"cannot read the image's /etc/passwd: .*symbolic"):
        spec.read_user_db(tmp_path)


def test_read_user_db_size_limit(tmp_path):
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "passwd").write_bytes(b"x" * ((1 << 20) + 1))
    with pytest.raises(InvalidArgument, match="larger than"):
        spec.read_user_db(tmp_path)


# --- process ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("command", "args", "entrypoint", "cmd", "argv"),
    [
        ((), (), ("/ep",), ("c1", "c2"), ["/ep", "c1", "c2"]),
        ((), ("a1",), ("/ep",), ("c1",), ["/ep", "a1"]),  # args replace the image's Cmd
        (("/cmd",), (), ("/ep",), ("c1",), ["/cmd"]),  # command alone drops the image's Cmd
        (("/cmd",), ("a1",), ("/ep",), ("c1",), ["/cmd", "a1"]),
        ((), (), (), ("c1", "c2"), ["c1", "c2"]),
        ((), (), ("",), ("c1",), ["c1"]),  # Entrypoint [""] means none
        ((), ("a1",), (), (), ["a1"]),
    ],
)
def test_process_args(command, args, entrypoint, cmd, argv):
    ctr = make_ctr(command=command, args=args)
    assert spec.process_args(ctr, make_image(entrypoint=entrypoint, cmd=cmd)) == argv


def test_process_args_nothing_to_run():
    with pytest.raises(InvalidArgument, match=r"^config\.command is required"):
        spec.process_args(make_ctr(), make_image(cmd=()))


def test_env_merge():
    image = make_image(env=("PATH=/image/bin", "A=image", "B=image", "HOSTNAME=img"))
    ctr = make_ctr(envs=(("A", "cri"), ("C", "x=y"), ("A", "cri2")))
    env = build(ctr=ctr, image=image)["process"]["env"]
    # The image's PATH replaces the default; the kubelet's variables win.
    assert env == ["PATH=/image/bin", "HOSTNAME=img", "A=cri2", "B=image", "C=x=y"]


def test_env_defaults_and_tty():
    s = build(ctr=make_ctr(tty=True), pod=make_pod(hostname=""))
    assert s["process"]["env"] == [spec.DEFAULT_PATH_ENV, "TERM=xterm", "HOSTNAME=node-1"]
    assert s["process"]["terminal"] is True
    assert build()["process"]["terminal"] is False


def test_image_env_can_unset():
    env = build(image=make_image(env=("PATH",)))["process"]["env"]
    assert env == ["HOSTNAME=web-0"]


@pytest.mark.parametrize(
    ("ctr_dir", "image_dir", "cwd"),
    [("/srv", "/img", "/srv"), ("", "/img", "/img"), ("", "rel", "/rel"), ("", "", "/")],
)
def test_working_dir(ctr_dir, image_dir, cwd):
    s = build(ctr=make_ctr(working_dir=ctr_dir), image=make_image(working_dir=image_dir))
    assert s["process"]["cwd"] == cwd


@pytest.mark.parametrize(
    ("security", "image_user", "user"),
    [
        ({}, "", {"uid": 0, "gid": 0, "additionalGids": [0, 10]}),
        ({}, "app", {"uid": 1000, "gid": 1000, "additionalGids": [10, 29, 1000]}),
        ({}, "1000:44", {"uid": 1000, "gid": 44, "additionalGids": [10, 29, 44]}),
        (
            {"run_as_user": 1000},
            "daemon",
            {"uid": 1000, "gid": 1000, "additionalGids": [10, 29, 1000]},
        ),
        (
            {"run_as_user": 4242, "run_as_group": 7},
            "",
            {"uid": 4242, "gid": 7, "additionalGids": [7]},
        ),
        # run_as_username wins over run_as_user (containerd generateUserString).
        (
            {"run_as_user": 4242, "run_as_username": "daemon"},
            "",
            {"uid": 1, "gid": 1, "additionalGids": [1, 29]},
        ),
        (
            {"run_as_username": "app", "run_as_group": 44},
            "",
            {"uid": 1000, "gid": 44, "additionalGids": [10, 29, 44]},
        ),
        (
            {"run_as_user": 1000, "supplemental_groups": (5000, 10, 4000)},
            "",
            {"uid": 1000, "gid": 1000, "additionalGids": [10, 29, 1000, 4000, 5000]},
        ),
        (
            {
                "run_as_user": 1000,
                "supplemental_groups": (5000,),
                "supplemental_groups_policy": SupplementalGroupsPolicy.STRICT,
            },
            "",
            {"uid": 1000, "gid": 1000, "additionalGids": [1000, 5000]},
        ),
    ],
)
def test_user(security, image_user, user):
    s = build(ctr=with_security(**security), image=make_image(user=image_user))
    assert s["process"]["user"] == user


def test_unknown_user_fails():
    with pytest.raises(InvalidArgument, match="no user 'ghost'"):
        build(ctr=with_security(run_as_username="ghost"))


def test_effective_stop_signal():
    image = make_image(stop_signal="SIGINT")
    assert spec.effective_stop_signal(make_ctr(stop_signal="SIGQUIT"), image) == "SIGQUIT"
    assert spec.effective_stop_signal(make_ctr(), image) == "SIGINT"
    assert spec.effective_stop_signal(make_ctr(), make_image(stop_signal="usr1")) == "SIGUSR1"
    assert spec.effective_stop_signal(make_ctr(), make_image()) == "SIGTERM"


# --- mounts ----------------------------------------------------------------------------


def test_default_mounts_then_pod_files():
    s = build()
    assert destinations(s) == [
        "/proc",
        "/dev",
        "/dev/pts",
        "/dev/mqueue",
        "/sys",
        "/sys/fs/cgroup",
        "/etc/hosts",
        "/etc/resolv.conf",
        "/dev/shm",
    ]
    assert mount_at(s, "/etc/hosts") == {
        "destination": "/etc/hosts",
        "type": "bind",
        "source": "/pods/p1/hosts",
        "options": ["rbind", "rprivate", "rw"],
    }
    assert mount_at(s, "/dev/shm")["source"] == "/pods/p1/shm"
    assert mount_at(s, "/sys")["options"][-1] == "ro"
    assert mount_at(s, "/sys/fs/cgroup")["options"][-1] == "ro"


def test_hostname_file_and_readonly_rootfs():
    etc = {**ETC_FILES, "hostname": Path("/pods/p1/hostname")}
    s = build(ctr=with_security(readonly_rootfs=True), etc_files=etc)
    assert destinations(s)[-4:] == ["/etc/hostname", "/etc/hosts", "/etc/resolv.conf", "/dev/shm"]
    for path in ("/etc/hostname", "/etc/hosts", "/etc/resolv.conf"):
        assert mount_at(s, path)["options"] == ["rbind", "rprivate", "ro"]
    assert mount_at(s, "/dev/shm")["options"] == ["rbind", "rprivate", "rw"]
    assert s["root"] == {"path": "/containers/c1/rootfs", "readonly": True}


def test_no_shm_path_keeps_the_private_tmpfs():
    s = build(shm_path=None)
    assert mount_at(s, "/dev/shm")["type"] == "tmpfs"


def test_host_ipc_binds_the_nodes_shm():
    pod = make_pod(security=PodSecurity(namespace_options=NamespaceOptions(ipc=NamespaceMode.NODE)))
    s = build(pod=pod)
    assert mount_at(s, "/dev/shm")["source"] == "/dev/shm"
    assert "ipc" not in [ns["type"] for ns in s["linux"]["namespaces"]]


def test_cri_mounts_override_and_sort(tmp_path):
    hosts = tmp_path / "my-hosts"
    hosts.write_text("")
    ctr = make_ctr(
        mounts=(
            Mount("/var/lib/app/deep", str(tmp_path), readonly=True),
            Mount("/etc/hosts", str(hosts)),
            Mount("/data", str(tmp_path)),
        )
    )
    s = build(ctr=ctr)
    # Fewer parts first, stable among equals: a mount never hides a deeper one.
    assert destinations(s)[6:] == [
        "/data",
        "/etc/hosts",
        "/etc/resolv.conf",
        "/dev/shm",
        "/var/lib/app/deep",
    ]
    assert mount_at(s, "/etc/hosts")["source"] == str(hosts)
    assert mount_at(s, "/var/lib/app/deep")["options"] == ["rbind", "rprivate", "ro"]


def test_cri_dev_mount_replaces_every_default_under_dev(tmp_path):
    s = build(ctr=make_ctr(mounts=(Mount("/dev", str(tmp_path)),)), shm_path=None)
    assert [d for d in destinations(s) if d.startswith("/dev")] == ["/dev"]
    assert mount_at(s, "/dev")["type"] == "bind"


def test_cri_mount_over_a_default_mount(tmp_path):
    s = build(ctr=make_ctr(mounts=(Mount("/sys/", str(tmp_path)),)))
    assert [m["type"] for m in s["mounts"] if m["destination"].rstrip("/") == "/sys"] == ["bind"]


def test_extra_mounts_lose_to_cri_mounts(tmp_path):
    extra = (Mount("/vol", "/var/lib/pouch/volumes/v1"), Mount("/data", "/nowhere"))
    ctr = make_ctr(mounts=(Mount("/data", str(tmp_path)),))
    s = build(ctr=ctr, extra_mounts=extra)
    assert mount_at(s, "/data")["source"] == str(tmp_path)
    assert mount_at(s, "/vol")["source"] == "/var/lib/pouch/volumes/v1"


def test_mount_source_symlinks_are_resolved(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    s = build(ctr=make_ctr(mounts=(Mount("/data", str(tmp_path / "link")),)))
    assert mount_at(s, "/data")["source"] == str(tmp_path / "real")


@pytest.mark.parametrize(
    ("propagations", "option", "rootfs"),
    [
        ((MountPropagation.PRIVATE,), "rprivate", None),
        ((MountPropagation.HOST_TO_CONTAINER,), "rslave", "rslave"),
        ((MountPropagation.BIDIRECTIONAL,), "rshared", "rshared"),
        (
            (MountPropagation.BIDIRECTIONAL, MountPropagation.HOST_TO_CONTAINER),
            "rshared",
            "rshared",
        ),
    ],
)
def test_propagation(tmp_path, propagations, option, rootfs):
    mounts = tuple(
        Mount(f"/m{i}", str(tmp_path), propagation=p) for i, p in enumerate(propagations)
    )
    s = build(ctr=make_ctr(mounts=mounts))
    assert mount_at(s, "/m0")["options"] == ["rbind", option, "rw"]
    assert s["linux"].get("rootfsPropagation") == rootfs


MOUNTINFO = """\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
30 22 0:5 / /srv/private rw - tmpfs tmpfs rw
31 22 0:6 / /srv/slave rw master:3 - tmpfs tmpfs rw
32 22 0:7 / /srv/with\\040space rw - tmpfs tmpfs rw
"""


@pytest.mark.parametrize(
    ("source", "propagation", "error"),
    [
        ("/var/lib", MountPropagation.BIDIRECTIONAL, None),
        ("/var/lib", MountPropagation.HOST_TO_CONTAINER, None),
        ("/srv/slave/x", MountPropagation.HOST_TO_CONTAINER, None),
        (
            "/srv/slave/x",
            MountPropagation.BIDIRECTIONAL,
            "is mounted on '/srv/slave' but it is not a shared mount",
        ),
        ("/srv/private", MountPropagation.HOST_TO_CONTAINER, "not a shared or slave mount"),
        ("/srv/with space/d", MountPropagation.HOST_TO_CONTAINER, "mounted on '/srv/with space'"),
        ("/srv/private", MountPropagation.PRIVATE, None),
    ],
)
def test_propagation_needs_a_shared_source(source, propagation, error):
    ctr = make_ctr(mounts=(Mount("/m", source, propagation=propagation),))
    if error is None:
        build(ctr=ctr, mountinfo=MOUNTINFO)
    else:
        with pytest.raises(FailedPrecondition, match=error):
            build(ctr=ctr, mountinfo=MOUNTINFO)


def test_recursive_read_only(tmp_path):
    ctr = make_ctr(mounts=(Mount("/m", str(tmp_path), readonly=True, recursive_read_only=True),))
    with pytest.raises(InvalidArgument, match=r"config\.mounts\[0\]\.recursive_read_only"):
        build(ctr=ctr)
    s = build(ctr=ctr, recursive_readonly_mounts=True)
    assert mount_at(s, "/m")["options"] == ["rbind", "rprivate", "ro", "rro"]


def test_prepare_mount_sources(tmp_path):
    ctr = make_ctr(mounts=(Mount("/a", str(tmp_path / "new" / "dir")), Mount("/b", str(tmp_path))))
    spec.prepare_mount_sources(ctr)
    assert (tmp_path / "new" / "dir").is_dir()


# --- namespaces -------------------------------------------------------------------------


def namespaces(s: spec.Spec) -> list[tuple[str, str | None]]:
    return [(ns["type"], ns.get("path")) for ns in s["linux"]["namespaces"]]


def test_namespaces_join_the_pod():
    assert namespaces(build()) == [
        ("mount", None),
        ("network", "/proc/42/ns/net"),
        ("uts", "/proc/42/ns/uts"),
        ("ipc", "/proc/42/ns/ipc"),
        ("pid", "/proc/42/ns/pid"),
    ]
    assert "hostname" not in build()


def test_namespaces_host_network_and_pid():
    pod = make_pod(
        security=PodSecurity(
            namespace_options=NamespaceOptions(network=NamespaceMode.NODE, pid=NamespaceMode.NODE)
        )
    )
    ctr = with_security(namespace_options=NamespaceOptions(pid=NamespaceMode.NODE))
    assert namespaces(build(pod=pod, ctr=ctr, pod_namespaces={"ipc": "/i"})) == [
        ("mount", None),
        ("ipc", "/i"),
    ]
    # A POD pid mode in a host-pid pod is the host's too.
    assert namespaces(build(pod=pod, pod_namespaces={"ipc": "/i"})) == [
        ("mount", None),
        ("ipc", "/i"),
    ]


def test_namespaces_private_and_target_pid():
    own = with_security(namespace_options=NamespaceOptions(pid=NamespaceMode.CONTAINER))
    assert namespaces(build(ctr=own))[-1] == ("pid", None)
    target = with_security(
        namespace_options=NamespaceOptions(pid=NamespaceMode.TARGET, target_id="c0")
    )
    s = build(ctr=target, target_pid_namespace="/proc/77/ns/pid")
    assert namespaces(s)[-1] == ("pid", "/proc/77/ns/pid")
    with pytest.raises(ValueError, match="target_pid_namespace"):
        build(ctr=target)


def test_namespaces_missing_path_is_a_bug():
    with pytest.raises(ValueError, match="'net'"):
        build(pod_namespaces={})


def test_cgroup_namespace_on_cgroup_v2():
    assert namespaces(build(cgroup_v2=True))[-1] == ("cgroup", None)
    privileged_pod = make_pod(security=PodSecurity(privileged=True))
    s = build(pod=privileged_pod, ctr=with_security(privileged=True), cgroup_v2=True)
    assert "cgroup" not in [t for t, _ in namespaces(s)]


# --- security ----------------------------------------------------------------------------


def caps(s: spec.Spec) -> list[str]:
    c = s["process"]["capabilities"]
    assert c["bounding"] == c["effective"] == c["permitted"]
    return c["bounding"]


def test_default_security():
    s = build()
    assert caps(s) == list(defaults.DEFAULT_CAPABILITIES)
    assert "ambient" not in s["process"]["capabilities"]
    assert s["process"]["noNewPrivileges"] is False
    assert s["linux"]["maskedPaths"] == list(defaults.DEFAULT_MASKED_PATHS)
    assert s["linux"]["readonlyPaths"] == list(defaults.DEFAULT_READONLY_PATHS)
    assert "seccomp" not in s["linux"]  # no profile requested is unconfined
    assert "apparmorProfile" not in s["process"]
    assert "oomScoreAdj" not in s["process"]
    assert s["linux"]["resources"]["devices"][0] == {"allow": False, "access": "rwm"}
    assert s["linux"]["cgroupsPath"] == "/kubepods/pod1/c1"


def test_capabilities_add_drop():
    ctr = with_security(capabilities=Capabilities(add=("CAP_SYS_ADMIN",), drop=("CAP_CHOWN",)))
    got = caps(build(ctr=ctr))
    assert "CAP_SYS_ADMIN" in got
    assert "CAP_CHOWN" not in got


def test_capabilities_all_is_what_the_daemon_holds():
    available = set(defaults.ALL_CAPABILITIES) - {"CAP_SYS_RESOURCE"}
    ctr = with_security(capabilities=Capabilities(add=("ALL",), drop=("CAP_CHOWN",)))
    assert set(caps(build(ctr=ctr))) == set(defaults.ALL_CAPABILITIES) - {"CAP_CHOWN"}
    got = set(caps(build(ctr=ctr, available_capabilities=available)))
    assert got == available - {"CAP_CHOWN"}
    # A capability named outright stays (and fails in runc, as in containerd).
    named = with_security(capabilities=Capabilities(add=("ALL", "CAP_SYS_RESOURCE")))
    assert "CAP_SYS_RESOURCE" in caps(build(ctr=named, available_capabilities=available))


def test_ambient_capabilities():
    ctr = with_security(
        run_as_user=1000,
        capabilities=Capabilities(
            drop=("ALL",), add_ambient=("CAP_NET_BIND_SERVICE", "CAP_NET_RAW")
        ),
    )
    s = build(ctr=ctr)
    c = s["process"]["capabilities"]
    assert caps(s) == ["CAP_NET_BIND_SERVICE", "CAP_NET_RAW"]
    assert c["ambient"] == c["inheritable"] == ["CAP_NET_BIND_SERVICE", "CAP_NET_RAW"]
    dropped = with_security(
        capabilities=Capabilities(drop=("CAP_NET_RAW",), add_ambient=("CAP_NET_RAW",))
    )
    assert "ambient" not in build(ctr=dropped)["process"]["capabilities"]


def test_privileged():
    pod = make_pod(security=PodSecurity(privileged=True))
    ctr = with_security(
        privileged=True,
        seccomp=RUNTIME_DEFAULT,
        capabilities=Capabilities(drop=("ALL",)),
        masked_paths=("/proc/kcore",),
    )
    available = set(defaults.ALL_CAPABILITIES) - {"CAP_SYS_RESOURCE"}
    s = build(pod=pod, ctr=ctr, host_has_apparmor=True, available_capabilities=available)
    assert caps(s) == [c for c in defaults.ALL_CAPABILITIES if c in available]
    assert "seccomp" not in s["linux"]
    assert "maskedPaths" not in s["linux"]
    assert "readonlyPaths" not in s["linux"]
    assert "apparmorProfile" not in s["process"]
    assert mount_at(s, "/sys")["options"][-1] == "rw"
    assert mount_at(s, "/sys/fs/cgroup")["options"][-1] == "rw"
    assert s["linux"]["resources"]["devices"] == [{"allow": True, "access": "rwm"}]
    paths = {d["path"] for d in s["linux"]["devices"]}
    assert {"/dev/null", "/dev/zero"} <= paths
    assert len(paths) == len(s["linux"]["devices"])


def test_privileged_needs_a_privileged_pod():
    with pytest.raises(InvalidArgument, match="privileged: no privileged container allowed"):
        build(ctr=with_security(privileged=True))


def test_no_new_privs_and_paths():
    ctr = with_security(no_new_privs=True, masked_paths=("/proc/x",), readonly_paths=("/proc/y",))
    s = build(ctr=ctr)
    assert s["process"]["noNewPrivileges"] is True
    assert s["linux"]["maskedPaths"] == ["/proc/x"]
    assert s["linux"]["readonlyPaths"] == ["/proc/y"]


def test_seccomp_runtime_default_follows_capabilities():
    s = build(ctr=with_security(seccomp=RUNTIME_DEFAULT))
    assert s["linux"]["seccomp"] == defaults.default_seccomp_profile(
        capabilities=defaults.DEFAULT_CAPABILITIES
    )
    admin = with_security(
        seccomp=RUNTIME_DEFAULT, capabilities=Capabilities(add=("CAP_SYS_ADMIN",))
    )
    names = {n for rule in build(ctr=admin)["linux"]["seccomp"]["syscalls"] for n in rule["names"]}
    assert "mount" in names


def test_seccomp_unconfined_and_localhost(tmp_path):
    assert "seccomp" not in build(ctr=with_security(seccomp=UNCONFINED))["linux"]
    loaded = []

    def loader(path):
        loaded.append(path)
        return {"defaultAction": "SCMP_ACT_LOG", "syscalls": []}

    ctr = with_security(seccomp=SecurityProfile(ProfileType.LOCALHOST, "/profiles/a.json"))
    s = build(ctr=ctr, seccomp_profile_loader=loader)
    assert loaded == ["/profiles/a.json"]
    assert s["linux"]["seccomp"] == {"defaultAction": "SCMP_ACT_LOG", "syscalls": []}


def test_load_seccomp_profile(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps({"defaultAction": "SCMP_ACT_ERRNO", "archMap": []}))
    assert spec.load_seccomp_profile(str(path)) == {
        "defaultAction": "SCMP_ACT_ERRNO",
        "archMap": [],
        "syscalls": [],
    }
    path.write_text("[]")
    with pytest.raises(InvalidArgument, match="has no defaultAction"):
        spec.load_seccomp_profile(str(path))
    path.write_text("{")
    with pytest.raises(InvalidArgument, match="is not valid JSON"):
        spec.load_seccomp_profile(str(path))
    with pytest.raises(InvalidArgument, match="cannot load seccomp profile"):
        spec.load_seccomp_profile(str(tmp_path / "missing.json"))


def test_apparmor():
    local = with_security(apparmor=SecurityProfile(ProfileType.LOCALHOST, "my-profile"))
    assert build(ctr=local, host_has_apparmor=True)["process"]["apparmorProfile"] == "my-profile"
    with pytest.raises(InvalidArgument, match="AppArmor is not enabled"):
        build(ctr=local)
    s = build(host_has_apparmor=True, apparmor_default_profile="pouch-default")
    assert s["process"]["apparmorProfile"] == "pouch-default"
    assert "apparmorProfile" not in build(apparmor_default_profile="pouch-default")["process"]
    unconfined = with_security(apparmor=UNCONFINED)
    s = build(ctr=unconfined, host_has_apparmor=True, apparmor_default_profile="pouch-default")
    assert "apparmorProfile" not in s["process"]


@pytest.mark.parametrize(
    ("requested", "floor", "expected"),
    [(-999, -1000, -999), (-999, 0, 0), (500, 0, 500), (0, 200, 200), (1000, 1000, 1000)],
)
def test_oom_score_adj_is_clamped(requested, floor, expected):
    ctr = make_ctr(resources=LinuxResources(oom_score_adj=requested))
    assert build(ctr=ctr, oom_score_adj_floor=floor)["process"]["oomScoreAdj"] == expected


def status_with(bounding: int, effective: int | None = None) -> str:
    effective = bounding if effective is None else effective
    return f"Name:\tpouchd\nCapEff:\t{effective:016x}\nCapBnd:\t{bounding:016x}\n"


def test_oom_score_adj_floor():
    full = (1 << len(defaults.ALL_CAPABILITIES)) - 1
    without = full & ~(1 << 24)  # CAP_SYS_RESOURCE
    assert spec.oom_score_adj_floor(status_with(full), "-500\n") == -1000
    assert spec.oom_score_adj_floor(status_with(without), "-500\n") == -500
    assert spec.oom_score_adj_floor(status_with(without), "0\n") == 0
    assert isinstance(spec.oom_score_adj_floor(), int)  # this host's


def test_current_capabilities():
    assert spec.current_capabilities(status_with(0, DEFAULT_CAP_MASK)) == frozenset(
        defaults.DEFAULT_CAPABILITIES
    )
    assert spec.current_capabilities(status_with(0, 0)) == frozenset()
    assert "CAP_CHOWN" in spec.current_capabilities() or os.geteuid() != 0


# --- resources and devices ------------------------------------------------------------


def test_resources():
    res = LinuxResources(
        cpu_period=100_000,
        cpu_quota=50_000,
        cpu_shares=512,
        memory_limit_in_bytes=1 << 28,
        cpuset_cpus="0-1",
        cpuset_mems="0",
        hugepage_limits=(HugepageLimit("2MB", 1 << 21),),
    )
    s = build(ctr=make_ctr(resources=res), swap_controller=True)
    r = s["linux"]["resources"]
    assert r["cpu"] == {
        "period": 100_000,
        "quota": 50_000,
        "shares": 512,
        "cpus": "0-1",
        "mems": "0",
    }
    # No swap limit asked: swap equals memory, so the container does not swap.
    assert r["memory"] == {"limit": 1 << 28, "swap": 1 << 28}
    assert r["hugepageLimits"] == [{"pageSize": "2MB", "limit": 1 << 21}]
    assert s["process"]["oomScoreAdj"] == 0


def test_resources_swap_and_controllers():
    res = LinuxResources(
        memory_limit_in_bytes=100,
        memory_swap_limit_in_bytes=300,
        hugepage_limits=(HugepageLimit("2MB", 1),),
    )
    r = build(ctr=make_ctr(resources=res), swap_controller=True)["linux"]["resources"]
    assert r["memory"] == {"limit": 100, "swap": 300}
    r = build(ctr=make_ctr(resources=res), hugetlb_controller=False)["linux"]["resources"]
    assert r["memory"] == {"limit": 100}
    assert "hugepageLimits" not in r
    assert "cpu" not in build(ctr=make_ctr(resources=LinuxResources()))["linux"]["resources"]


def test_unified_needs_cgroup_v2():
    ctr = make_ctr(resources=LinuxResources(unified={"memory.high": "1G"}))
    with pytest.raises(InvalidArgument, match="unified needs a cgroup v2 host"):
        build(ctr=ctr)
    assert build(ctr=ctr, cgroup_v2=True)["linux"]["resources"]["unified"] == {"memory.high": "1G"}


def test_devices():
    ctr = make_ctr(devices=(Device("/dev/mynull", "/dev/null", "rw"),))
    s = build(ctr=ctr)
    st = os.stat("/dev/null")
    assert s["linux"]["devices"][-1] == {
        "path": "/dev/mynull",
        "type": "c",
        "major": 1,
        "minor": 3,
        "fileMode": st.st_mode & 0o7777,
        "uid": st.st_uid,
        "gid": st.st_gid,
    }
    assert s["linux"]["resources"]["devices"][-1] == {
        "allow": True,
        "type": "c",
        "major": 1,
        "minor": 3,
        "access": "rw",
    }


def test_device_errors(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(InvalidArgument, match=r"config\.devices\[0\]\.host_path: .* not a device"):
        build(ctr=make_ctr(devices=(Device("/dev/x", str(tmp_path / "file")),)))
    with pytest.raises(InvalidArgument, match=r"config\.devices\[0\]\.host_path: cannot stat"):
        build(ctr=make_ctr(devices=(Device("/dev/x", str(tmp_path / "missing")),)))
    # A directory contributes the device nodes under it (none here).
    s = build(ctr=make_ctr(devices=(Device("/dev/d", str(tmp_path)),)))
    assert [d["path"] for d in s["linux"]["devices"]] == [
        d["path"] for d in defaults.default_devices()
    ]


def test_host_devices():
    paths = [d["path"] for d in spec.host_devices()]
    assert "/dev/null" in paths
    assert not any(p.startswith(("/dev/pts/", "/dev/shm/")) or p == "/dev/console" for p in paths)


# --- sysctls, annotations, serialisation ---------------------------------------------------


SYSCTLS = {
    "net.ipv4.ip_unprivileged_port_start": "0",
    "kernel.shm_rmid_forced": "1",
    "fs.mqueue.msg_max": "20",
    "kernel.domainname": "example",
}


@pytest.mark.parametrize(
    ("network", "ipc", "kept"),
    [
        (NamespaceMode.POD, NamespaceMode.POD, set(SYSCTLS)),
        (NamespaceMode.NODE, NamespaceMode.POD, {"kernel.shm_rmid_forced", "fs.mqueue.msg_max"}),
        (
            NamespaceMode.POD,
            NamespaceMode.NODE,
            {"net.ipv4.ip_unprivileged_port_start", "kernel.domainname"},
        ),
    ],
)
def test_sysctls_skip_the_nodes_namespaces(network, ipc, kept):
    pod = make_pod(
        sysctls=SYSCTLS,
        security=PodSecurity(namespace_options=NamespaceOptions(network=network, ipc=ipc)),
    )
    s = build(pod=pod, pod_namespaces=NAMESPACES)
    assert set(s["linux"].get("sysctl", {})) == kept
    assert set(spec.pod_spec(pod, **POD_ARGS)["linux"].get("sysctl", {})) == kept


def test_container_annotations():
    s = build(image_name="docker.io/library/busybox:1.36")
    assert s["annotations"] == {
        "io.kubernetes.cri.sandbox-id": "sb1",
        "io.kubernetes.cri.sandbox-namespace": "default",
        "io.kubernetes.cri.sandbox-uid": "uid-1",
        "io.kubernetes.cri.sandbox-name": "web",
        "io.kubernetes.cri.container-name": "app",
        "io.kubernetes.cri.image-name": "docker.io/library/busybox:1.36",
        "io.kubernetes.cri.container-type": "container",
    }
    assert build()["annotations"]["io.kubernetes.cri.image-name"] == (
        "docker.io/library/busybox:latest"
    )


def test_spec_is_json():
    pod = make_pod(security=PodSecurity(privileged=True))
    s = build(pod=pod, ctr=with_security(privileged=True, seccomp=RUNTIME_DEFAULT))
    assert json.loads(json.dumps(s)) == s
    assert s["ociVersion"] == spec.OCI_VERSION


# --- pod_spec ---------------------------------------------------------------------------


POD_ARGS = {
    "sandbox_id": "sb1",
    "rootfs": Path("/var/lib/pouch/infra"),
    "infra_argv": ["/catatonit", "-P"],
    "netns_path": "/run/netns/cni-1",
    "cgroups_path": "/kubepods/pod1/sb1",
    "oom_score_adj_floor": -1000,
}


def test_pod_spec():
    pod = make_pod(
        resources=LinuxResources(cpu_period=100_000, cpu_quota=20_000, cpu_shares=205),
        security=PodSecurity(namespace_options=NamespaceOptions(pid=NamespaceMode.CONTAINER)),
    )
    s = spec.pod_spec(
        pod, **POD_ARGS, shm_path="/pods/p1/shm", resolv_conf_path="/pods/p1/resolv.conf"
    )
    assert s["hostname"] == "web-0"
    assert s["root"] == {"path": "/var/lib/pouch/infra", "readonly": True}
    process = s["process"]
    assert process["args"] == ["/catatonit", "-P"]
    assert process["user"] == {"uid": 0, "gid": 0}
    assert process["noNewPrivileges"] is True
    assert process["oomScoreAdj"] == -998
    assert caps(s) == list(defaults.DEFAULT_CAPABILITIES)
    assert namespaces(s) == [
        ("mount", None),
        ("network", "/run/netns/cni-1"),
        ("uts", None),
        ("pid", None),
        ("ipc", None),
    ]
    assert destinations(s) == [
        "/proc",
        "/dev",
        "/dev/pts",
        "/dev/mqueue",
        "/sys",
        "/dev/shm",
        "/etc/resolv.conf",
    ]
    ro = ["rbind", "ro", "nosuid", "nodev", "noexec"]
    assert mount_at(s, "/dev/shm") == {
        "destination": "/dev/shm",
        "type": "bind",
        "source": "/pods/p1/shm",
        "options": ro,
    }
    assert s["linux"]["resources"]["cpu"] == {"shares": 2}
    assert s["linux"]["maskedPaths"] == list(defaults.DEFAULT_MASKED_PATHS)
    assert "seccomp" not in s["linux"]
    assert s["annotations"] == {
        "io.kubernetes.cri.sandbox-id": "sb1",
        "io.kubernetes.cri.sandbox-namespace": "default",
        "io.kubernetes.cri.sandbox-uid": "uid-1",
        "io.kubernetes.cri.sandbox-name": "web",
        "io.kubernetes.cri.sandbox-log-directory": "/var/log/pods/default_web_uid-1",
        "io.kubernetes.cri.sandbox-cpu-period": "100000",
        "io.kubernetes.cri.sandbox-cpu-quota": "20000",
        "io.kubernetes.cri.sandbox-cpu-shares": "205",
        "io.kubernetes.cri.sandbox-memory": "0",
        "io.kubernetes.cri.container-type": "sandbox",
    }


def test_pod_spec_host_namespaces():
    pod = make_pod(
        security=PodSecurity(
            namespace_options=NamespaceOptions(
                network=NamespaceMode.NODE, pid=NamespaceMode.NODE, ipc=NamespaceMode.NODE
            )
        )
    )
    s = spec.pod_spec(pod, **POD_ARGS, shm_path="/pods/p1/shm")
    assert namespaces(s) == [("mount", None)]
    assert "hostname" not in s  # runc cannot set it without a UTS namespace
    assert mount_at(s, "/dev/shm")["source"] == "/dev/shm"


def test_pod_spec_no_netns_path_and_private_shm():
    s = spec.pod_spec(make_pod(), **{**POD_ARGS, "netns_path": None})
    assert ("network", None) in namespaces(s)
    assert mount_at(s, "/dev/shm")["type"] == "tmpfs"


def test_pod_spec_security():
    pod = make_pod(
        security=PodSecurity(
            run_as_user=65535,
            run_as_group=65534,
            supplemental_groups=(5, 1),
            seccomp=RUNTIME_DEFAULT,
        )
    )
    s = spec.pod_spec(pod, **{**POD_ARGS, "oom_score_adj_floor": 0})
    assert s["process"]["user"] == {"uid": 65535, "gid": 65534, "additionalGids": [1, 5, 65534]}
    assert s["process"]["oomScoreAdj"] == 0
    assert s["linux"]["seccomp"] == defaults.default_seccomp_profile()
    privileged = attrs.evolve(pod, security=attrs.evolve(pod.security, privileged=True))
    assert "seccomp" not in spec.pod_spec(privileged, **POD_ARGS)["linux"]


def test_pod_spec_extra_mounts_and_empty_argv():
    extra: defaults.Mount = {
        "destination": "/catatonit",
        "type": "bind",
        "source": "/usr/bin/catatonit",
        "options": ["bind", "ro"],
    }
    s = spec.pod_spec(make_pod(), **POD_ARGS, extra_mounts=[extra])
    assert s["mounts"][-1] == extra
    with pytest.raises(ValueError, match="infra_argv"):
        spec.pod_spec(make_pod(), **{**POD_ARGS, "infra_argv": []})
