"""Tests for pouch.container.defaults (containerd v1.6.39 security defaults)."""

from __future__ import annotations

import json

import pytest

from pouch.container.defaults import (
    ALL_CAPABILITIES,
    DEFAULT_CAPABILITIES,
    DEFAULT_MASKED_PATHS,
    DEFAULT_READONLY_PATHS,
    DEFAULT_SECCOMP_SYSCALLS,
    SeccompProfile,
    SeccompSyscall,
    apply_capabilities,
    default_device_cgroup_rules,
    default_devices,
    default_mounts,
    default_seccomp_profile,
    normalize_capability,
)
from pouch.errors import InvalidArgument

# A kernel new enough for every conditional rule; tests pass it explicitly so
# they do not depend on the machine running them.
NEW_KERNEL = (6, 1)
CLONE_NAMESPACE_FLAGS = 0x7E020000  # CLONE_NEW{NS,CGROUP,UTS,IPC,USER,PID,NET}


def allowed(profile: SeccompProfile, *, unconditional: bool = False) -> set[str]:
    """Names allowed by some rule (only by rules without args if unconditional)."""
    return {
        name
        for rule in profile["syscalls"]
        if rule["action"] == "SCMP_ACT_ALLOW" and not (unconditional and rule.get("args"))
        for name in rule["names"]
    }


def rules_for(profile: SeccompProfile, name: str) -> list[SeccompSyscall]:
    return [rule for rule in profile["syscalls"] if name in rule["names"]]


# --- capabilities -------------------------------------------------------------


def test_default_capabilities_are_containerds():
    assert DEFAULT_CAPABILITIES == (
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
    assert set(DEFAULT_CAPABILITIES) <= set(ALL_CAPABILITIES)


def test_all_capabilities_are_indexed_by_kernel_number():
    assert len(ALL_CAPABILITIES) == 41
    assert len(set(ALL_CAPABILITIES)) == 41
    assert ALL_CAPABILITIES[0] == "CAP_CHOWN"
    assert ALL_CAPABILITIES[21] == "CAP_SYS_ADMIN"
    assert ALL_CAPABILITIES[38:] == ("CAP_PERFMON", "CAP_BPF", "CAP_CHECKPOINT_RESTORE")


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("NET_ADMIN", "CAP_NET_ADMIN"),
        ("net_admin", "CAP_NET_ADMIN"),
        ("CAP_NET_ADMIN", "CAP_NET_ADMIN"),
        ("cap_sys_admin", "CAP_SYS_ADMIN"),
        ("Checkpoint_Restore", "CAP_CHECKPOINT_RESTORE"),
    ],
)
def test_normalize_capability(name, expected):
    assert normalize_capability(name) == expected


DEFAULTS = list(DEFAULT_CAPABILITIES)
ALL = list(ALL_CAPABILITIES)


@pytest.mark.parametrize(
    ("add", "drop", "privileged", "expected"),
    [
        pytest.param([], [], False, DEFAULTS, id="nothing"),
        pytest.param(
            ["SYS_ADMIN"], ["CHOWN"], False, [*DEFAULTS[1:], "CAP_SYS_ADMIN"], id="add-and-drop"
        ),
        pytest.param(["ALL"], [], False, ALL, id="add-all"),
        pytest.param([], ["ALL"], False, [], id="drop-all"),
        pytest.param(
            ["ALL"], ["CHOWN"], False, [c for c in ALL if c != "CAP_CHOWN"], id="add-all-drop-one"
        ),
        pytest.param(["NET_ADMIN"], ["ALL"], False, ["CAP_NET_ADMIN"], id="drop-all-add-one"),
        pytest.param(["all"], ["all"], False, [], id="add-all-drop-all"),
        pytest.param(
            ["ALL", "NET_ADMIN"], ["ALL"], False, ["CAP_NET_ADMIN"], id="both-all-add-one"
        ),
        pytest.param(["NET_ADMIN"], ["NET_ADMIN"], False, DEFAULTS, id="drop-wins"),
        pytest.param(["CHOWN", "cap_chown"], [], False, DEFAULTS, id="no-duplicates"),
        pytest.param(
            ["cap_net_admin", "Sys_Time"],
            ["KILL", "CAP_MKNOD"],
            False,
            [c for c in DEFAULTS if c not in ("CAP_KILL", "CAP_MKNOD")]
            + ["CAP_NET_ADMIN", "CAP_SYS_TIME"],
            id="mixed-spellings",
        ),
        pytest.param([], ["ALL"], True, ALL, id="privileged-ignores-drop"),
        pytest.param(["NET_ADMIN"], ["CHOWN"], True, ALL, id="privileged"),
    ],
)
def test_apply_capabilities(add, drop, privileged, expected):
    assert apply_capabilities(add, drop, privileged=privileged) == expected


def test_apply_capabilities_returns_a_fresh_list():
    caps = apply_capabilities([], [], privileged=False)
    caps.clear()
    assert apply_capabilities([], [], privileged=False) == DEFAULTS


@pytest.mark.parametrize(
    ("add", "drop", "bad"),
    [
        (["NET_ADMN"], [], "NET_ADMN"),
        ([], ["CAP_FOO"], "CAP_FOO"),
        (["CAP_ALL"], [], "CAP_ALL"),
        ([""], [], "''"),
    ],
)
@pytest.mark.parametrize("privileged", [False, True])
def test_apply_capabilities_rejects_unknown_names(add, drop, bad, privileged):
    with pytest.raises(InvalidArgument, match=bad):
        apply_capabilities(add, drop, privileged=privileged)


# --- masked and read-only paths ----------------------------------------------


def test_masked_paths():
    assert set(DEFAULT_MASKED_PATHS) == {
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
    }
    assert len(DEFAULT_MASKED_PATHS) == len(set(DEFAULT_MASKED_PATHS))


def test_readonly_paths():
    assert DEFAULT_READONLY_PATHS == (
        "/proc/bus",
        "/proc/fs",
        "/proc/irq",
        "/proc/sys",
        "/proc/sysrq-trigger",
    )
    assert not set(DEFAULT_READONLY_PATHS) & set(DEFAULT_MASKED_PATHS)


# --- mounts and devices --------------------------------------------------------


def test_default_mounts():
    mounts = {m["destination"]: m for m in default_mounts()}
    assert list(mounts) == [
        "/proc",
        "/dev",
        "/dev/pts",
        "/dev/shm",
        "/dev/mqueue",
        "/sys",
        "/sys/fs/cgroup",
    ]
    assert "/run" not in mounts  # the CRI plugin removes containerd's /run tmpfs
    assert mounts["/proc"] == {
        "destination": "/proc",
        "type": "proc",
        "source": "proc",
        "options": ["nosuid", "noexec", "nodev"],
    }
    assert mounts["/dev"]["type"] == "tmpfs"
    assert mounts["/dev"]["options"] == ["nosuid", "strictatime", "mode=755", "size=65536k"]
    assert "newinstance" in mounts["/dev/pts"]["options"]
    assert "ptmxmode=0666" in mounts["/dev/pts"]["options"]
    assert mounts["/dev/shm"]["source"] == "shm"
    assert "mode=1777" in mounts["/dev/shm"]["options"]
    assert mounts["/dev/mqueue"]["type"] == "mqueue"
    assert mounts["/sys"]["type"] == "sysfs"
    assert "ro" in mounts["/sys"]["options"]
    assert mounts["/sys/fs/cgroup"]["type"] == "cgroup"
    assert "ro" in mounts["/sys/fs/cgroup"]["options"]
    for m in mounts.values():
        assert "nosuid" in m["options"]


def test_privileged_mounts_make_sysfs_and_cgroup_writable():
    normal = default_mounts()
    privileged = default_mounts(privileged=True)
    for a, b in zip(normal, privileged, strict=True):
        if a["type"] in ("sysfs", "cgroup"):
            assert "ro" not in b["options"]
            assert b["options"] == ["rw" if o == "ro" else o for o in a["options"]]
        else:
            assert a == b


def test_default_mounts_are_fresh_objects():
    first = default_mounts()
    first[0]["options"].append("rw")
    first.pop()
    assert default_mounts() == default_mounts(privileged=False)
    assert "rw" not in default_mounts()[0]["options"]


def test_default_devices():
    devices = {d["path"]: d for d in default_devices()}
    assert set(devices) == {
        "/dev/null",
        "/dev/zero",
        "/dev/full",
        "/dev/random",
        "/dev/urandom",
        "/dev/tty",
    }
    assert devices["/dev/null"] == {
        "path": "/dev/null",
        "type": "c",
        "major": 1,
        "minor": 3,
        "fileMode": 0o666,
        "uid": 0,
        "gid": 0,
    }
    assert (devices["/dev/tty"]["major"], devices["/dev/tty"]["minor"]) == (5, 0)
    assert (devices["/dev/urandom"]["major"], devices["/dev/urandom"]["minor"]) == (1, 9)


def test_default_device_cgroup_rules():
    rules = default_device_cgroup_rules()
    # Deny everything first; the allow rules after it punch holes.
    assert rules[0] == {"allow": False, "access": "rwm"}
    allowed_rules = rules[1:]
    assert all(r["allow"] and r["type"] == "c" and r["access"] == "rwm" for r in allowed_rules)
    numbers = {(r["major"], r.get("minor")) for r in allowed_rules}
    assert numbers == {
        (1, 3),  # null
        (1, 5),  # zero
        (1, 7),  # full
        (1, 8),  # random
        (1, 9),  # urandom
        (5, 0),  # tty
        (5, 1),  # console
        (5, 2),  # ptmx
        (136, None),  # every pty slave
    }
    assert (10, 200) not in numbers  # tun was dropped in containerd v1.6.9
    # Every device node a container gets is also allowed by the cgroup.
    for device in default_devices():
        assert (device["major"], device["minor"]) in numbers


def test_privileged_device_cgroup_rules_allow_everything():
    assert default_device_cgroup_rules(privileged=True) == [{"allow": True, "access": "rwm"}]


# --- seccomp --------------------------------------------------------------------


def test_profile_is_json_serialisable_and_round_trips():
    profile = default_seccomp_profile("x86_64", kernel_version=NEW_KERNEL)
    assert json.loads(json.dumps(profile)) == profile


def test_profile_top_level():
    profile = default_seccomp_profile("x86_64", kernel_version=NEW_KERNEL)
    assert profile["defaultAction"] == "SCMP_ACT_ERRNO"
    # containerd 1.6 sets no defaultErrnoRet; runc then answers EPERM.
    assert "defaultErrnoRet" not in profile
    assert set(profile) == {"defaultAction", "architectures", "syscalls"}
    for rule in profile["syscalls"]:
        assert rule["names"]
        assert rule["action"] in ("SCMP_ACT_ALLOW", "SCMP_ACT_ERRNO")
        # Go's omitempty: no empty args lists, no zero valueTwo.
        assert rule.get("args", [None]) != []
        for arg in rule.get("args", []):
            assert "valueTwo" not in arg


def test_first_rule_is_the_unconditional_allow_list():
    profile = default_seccomp_profile("x86_64", kernel_version=NEW_KERNEL)
    first = profile["syscalls"][0]
    assert first == {"names": list(DEFAULT_SECCOMP_SYSCALLS), "action": "SCMP_ACT_ALLOW"}
    assert len(DEFAULT_SECCOMP_SYSCALLS) == len(set(DEFAULT_SECCOMP_SYSCALLS)) == 356
    for name in ("read", "write", "openat", "execve", "exit_group", "futex", "io_uring_setup"):
        assert name in DEFAULT_SECCOMP_SYSCALLS


@pytest.mark.parametrize(
    "name",
    [
        "mount",
        "umount2",
        "unshare",
        "setns",
        "bpf",
        "reboot",
        "init_module",
        "kexec_load",
        "open_by_handle_at",
        "clock_settime",
        "chroot",
        "clone",
        "clone3",
        "ptrace",
        "personality",
    ],
)
def test_dangerous_syscalls_are_not_in_the_unconditional_list(name):
    assert name not in DEFAULT_SECCOMP_SYSCALLS


@pytest.mark.parametrize(
    ("arch", "expected"),
    [
        ("x86_64", ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"]),
        ("amd64", ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"]),
        ("aarch64", ["SCMP_ARCH_ARM", "SCMP_ARCH_AARCH64"]),
        ("arm64", ["SCMP_ARCH_ARM", "SCMP_ARCH_AARCH64"]),
        ("s390x", ["SCMP_ARCH_S390", "SCMP_ARCH_S390X"]),
        ("riscv64", ["SCMP_ARCH_RISCV64"]),
        ("mips64", ["SCMP_ARCH_MIPS", "SCMP_ARCH_MIPS64", "SCMP_ARCH_MIPS64N32"]),
    ],
)
def test_architectures(arch, expected):
    profile = default_seccomp_profile(arch, kernel_version=NEW_KERNEL)
    assert profile["architectures"] == expected


@pytest.mark.parametrize("arch", ["ppc64le", "armv7l", "i686", "loongarch64"])
def test_architectures_containerd_does_not_list_are_omitted(arch):
    assert "architectures" not in default_seccomp_profile(arch, kernel_version=NEW_KERNEL)


@pytest.mark.parametrize(
    ("arch", "present", "absent"),
    [
        ("x86_64", {"arch_prctl", "modify_ldt"}, {"set_tls", "s390_runtime_instr"}),
        ("i686", {"modify_ldt"}, {"arch_prctl"}),
        ("aarch64", {"set_tls", "cacheflush", "sync_file_range2"}, {"arch_prctl", "modify_ldt"}),
        ("armv7l", {"arm_fadvise64_64", "breakpoint"}, {"modify_ldt"}),
        ("ppc64le", {"swapcontext", "sync_file_range2"}, {"modify_ldt", "set_tls"}),
        ("s390x", {"s390_pci_mmio_read", "s390_runtime_instr"}, {"modify_ldt"}),
        ("riscv64", {"riscv_flush_icache"}, {"modify_ldt"}),
    ],
)
def test_arch_specific_syscalls(arch, present, absent):
    names = allowed(default_seccomp_profile(arch, kernel_version=NEW_KERNEL))
    assert present <= names
    assert not absent & names


def test_arch_defaults_to_the_host(monkeypatch):
    monkeypatch.setattr("platform.machine", lambda: "aarch64")
    assert default_seccomp_profile(kernel_version=NEW_KERNEL) == default_seccomp_profile(
        "arm64", kernel_version=NEW_KERNEL
    )


def test_personality_is_limited_to_known_personas():
    profile = default_seccomp_profile("x86_64", kernel_version=NEW_KERNEL)
    rules = rules_for(profile, "personality")
    values = []
    for rule in rules:
        assert rule["names"] == ["personality"]
        assert rule["action"] == "SCMP_ACT_ALLOW"
        [arg] = rule["args"]
        assert (arg["index"], arg["op"]) == (0, "SCMP_CMP_EQ")
        values.append(arg["value"])
    assert values == [0x0, 0x0008, 0x20000, 0x20008, 0xFFFFFFFF]


def test_without_sys_admin_clone_may_not_create_namespaces():
    profile = default_seccomp_profile("x86_64", kernel_version=NEW_KERNEL)
    assert rules_for(profile, "clone") == [
        {
            "names": ["clone"],
            "action": "SCMP_ACT_ALLOW",
            "args": [{"index": 0, "value": CLONE_NAMESPACE_FLAGS, "op": "SCMP_CMP_MASKED_EQ"}],
        }
    ]
    assert rules_for(profile, "clone3") == [
        {"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": 38}
    ]
    names = allowed(profile)
    for name in ("mount", "umount2", "unshare", "setns", "bpf", "sethostname", "fsopen"):
        assert name not in names


def test_clone_flags_are_the_second_argument_on_s390x():
    profile = default_seccomp_profile("s390x", kernel_version=NEW_KERNEL)
    [clone] = rules_for(profile, "clone")
    assert clone["args"][0]["index"] == 1


def test_clone3_enosys_uses_the_target_errno_on_mips():
    profile = default_seccomp_profile("mips64", kernel_version=NEW_KERNEL)
    [clone3] = rules_for(profile, "clone3")
    assert clone3["errnoRet"] == 89


def test_sys_admin_allows_mount_and_unrestricted_clone():
    profile = default_seccomp_profile(
        "x86_64", [*DEFAULT_CAPABILITIES, "CAP_SYS_ADMIN"], kernel_version=NEW_KERNEL
    )
    names = allowed(profile, unconditional=True)
    for name in ("mount", "umount2", "unshare", "setns", "clone", "clone3", "bpf", "syslog"):
        assert name in names
    # No argument filter and no ENOSYS rule for clone/clone3 any more.
    for rule in profile["syscalls"]:
        if {"clone", "clone3"} & set(rule["names"]):
            assert rule["action"] == "SCMP_ACT_ALLOW"
            assert "args" not in rule


@pytest.mark.parametrize(
    ("capability", "syscalls"),
    [
        ("CAP_DAC_READ_SEARCH", {"open_by_handle_at"}),
        ("CAP_SYS_BOOT", {"reboot"}),
        ("CAP_SYS_MODULE", {"init_module", "finit_module", "delete_module"}),
        ("CAP_SYS_PACCT", {"acct"}),
        ("CAP_SYS_PTRACE", {"ptrace", "process_vm_readv", "kcmp", "pidfd_getfd"}),
        ("CAP_SYS_RAWIO", {"iopl", "ioperm"}),
        ("CAP_SYS_TIME", {"settimeofday", "clock_settime", "stime"}),
        ("CAP_SYS_TTY_CONFIG", {"vhangup"}),
        ("CAP_SYS_NICE", {"mbind", "set_mempolicy", "get_mempolicy"}),
        ("CAP_SYSLOG", {"syslog"}),
        ("CAP_BPF", {"bpf"}),
        ("CAP_PERFMON", {"perf_event_open"}),
    ],
)
def test_capability_conditional_syscalls(capability, syscalls):
    without = allowed(default_seccomp_profile("x86_64", [], kernel_version=(4, 7)))
    with_cap = allowed(default_seccomp_profile("x86_64", [capability], kernel_version=(4, 7)))
    assert not syscalls & without
    assert syscalls <= with_cap
    # CAP_SYS_ADMIN stays absent, so clone keeps its namespace filter.
    assert "mount" not in with_cap


def test_default_capabilities_allow_chroot():
    # CAP_SYS_CHROOT is in the default set, so chroot is allowed by default.
    assert "chroot" in allowed(default_seccomp_profile("x86_64", kernel_version=NEW_KERNEL))
    assert "chroot" not in allowed(default_seccomp_profile("x86_64", [], kernel_version=NEW_KERNEL))


@pytest.mark.parametrize(
    ("kernel", "ptrace"),
    [((3, 10), False), ((4, 7), False), ((4, 8), True), ((4, 19), True), ((5, 0), True)],
)
def test_ptrace_depends_on_the_kernel_version(kernel, ptrace):
    profile = default_seccomp_profile("x86_64", kernel_version=kernel)
    assert ("ptrace" in allowed(profile)) is ptrace


@pytest.mark.parametrize(
    ("release", "ptrace"),
    [("5.15.0-91-generic", True), ("4.4.0-210-generic", False), ("weird", False)],
)
def test_ptrace_follows_the_host_kernel_by_default(monkeypatch, release, ptrace):
    monkeypatch.setattr("platform.release", lambda: release)
    profile = default_seccomp_profile("x86_64")
    assert ("ptrace" in allowed(profile)) is ptrace


def test_capability_spellings_and_collections_are_accepted():
    canonical = default_seccomp_profile(
        "x86_64", ["CAP_SYS_ADMIN", "CAP_BPF"], kernel_version=NEW_KERNEL
    )
    assert (
        default_seccomp_profile("x86_64", {"bpf", "sys_admin"}, kernel_version=NEW_KERNEL)
        == canonical
    )
    assert (
        default_seccomp_profile(
            "x86_64", ("CAP_BPF", "Sys_Admin", "CAP_BPF"), kernel_version=NEW_KERNEL
        )
        == canonical
    )


def test_unknown_capability_is_rejected():
    with pytest.raises(InvalidArgument, match="CAP_NOPE"):
        default_seccomp_profile("x86_64", ["CAP_NOPE"], kernel_version=NEW_KERNEL)


def test_privileged_capabilities_open_every_conditional_rule():
    caps = apply_capabilities([], [], privileged=True)
    profile = default_seccomp_profile("x86_64", caps, kernel_version=NEW_KERNEL)
    names = allowed(profile, unconditional=True)
    for name in ("mount", "reboot", "init_module", "ptrace", "iopl", "vhangup", "acct"):
        assert name in names
    assert "kexec_load" not in names  # never allowed, whatever the capabilities


def test_profile_is_a_fresh_object():
    first = default_seccomp_profile("x86_64", kernel_version=NEW_KERNEL)
    first["syscalls"][0]["names"].append("kexec_load")
    second = default_seccomp_profile("x86_64", kernel_version=NEW_KERNEL)
    assert "kexec_load" not in second["syscalls"][0]["names"]
