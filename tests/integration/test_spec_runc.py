"""pouch.container.spec under a real runc: what the process inside actually gets.

One pod infra process (catatonit -P from a busybox rootfs, built by
``pod_spec``) owns a network, IPC, UTS and pid namespace; each test builds a
``container_spec`` joining them, runs ``runc run`` in the foreground and
checks /proc/self/status, ``id``, mounts and sysctls from inside.

cgroups go under a parent private to this module, removed at the end from
every hierarchy (cgroup v1 has one per controller).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

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
    LinuxResources,
    Mount,
    PodConfig,
    PodMetadata,
    PodSecurity,
)
from pouch.image.media import ImageConfig, Platform

if TYPE_CHECKING:
    from collections.abc import Iterator

pytestmark = [pytest.mark.integration, pytest.mark.root, pytest.mark.timeout(60)]

BUSYBOX = Path("/bin/busybox")
CATATONIT = Path("/usr/bin/catatonit")
APPLETS = ("sh", "id", "cat", "grep", "touch", "wc", "echo", "hostname", "sleep", "head", "ls")
PASSWD = "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:app:/home/app:/bin/sh\n"
GROUP = "root:x:0:\naudio:x:29:app\napp:x:1000:\n"
SYSCTLS = {"net.ipv4.ip_unprivileged_port_start": "80", "kernel.shm_rmid_forced": "1"}
RUN_TIMEOUT = 30
CGROUP_ROOT = Path("/sys/fs/cgroup")
# A masked /proc file with content on the host: /proc/kcore, as the brief of
# this test says, unless the kernel has none (CONFIG_PROC_KCORE=n).
MASKED_FILE = next(
    p for p in ("/proc/kcore", "/proc/timer_list", "/proc/sched_debug") if Path(p).exists()
)


def cap_mask(caps) -> str:
    return f"{sum(1 << defaults.ALL_CAPABILITIES.index(c) for c in caps):016x}"


def ensure_tools() -> None:
    """Install what is missing: a missing tool is a setup failure, not a skip."""
    missing = [
        package
        for package, present in (
            ("busybox-static", BUSYBOX.exists()),
            ("runc", shutil.which("runc") is not None),
            ("catatonit", CATATONIT.exists()),
        )
        if not present
    ]
    if missing:
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], check=True, env=env, timeout=300)
        subprocess.run(["apt-get", "install", "-y", "-qq", *missing], check=True, env=env)


def build_rootfs(root: Path) -> Path:
    rootfs = root / "rootfs"
    for d in ("bin", "etc", "proc", "sys", "dev", "tmp", "home/app"):
        (rootfs / d).mkdir(parents=True, exist_ok=True)
    shutil.copy2(BUSYBOX, rootfs / "bin" / "busybox")
    for applet in APPLETS:
        (rootfs / "bin" / applet).symlink_to("busybox")
    shutil.copy2(CATATONIT, rootfs / "catatonit")
    (rootfs / "etc" / "passwd").write_text(PASSWD)
    (rootfs / "etc" / "group").write_text(GROUP)
    return rootfs


def remove_cgroups(parent: str) -> None:
    """rmdir ``parent`` (and leftovers below it) in every cgroup hierarchy."""
    roots = [CGROUP_ROOT] + [d for d in CGROUP_ROOT.iterdir() if d.is_dir()]
    for root in roots:
        top = root / parent.lstrip("/")
        if not top.is_dir():
            continue
        for dirpath, _dirs, _files in sorted(os.walk(top), key=lambda w: -len(w[0])):
            with contextlib.suppress(OSError):
                os.rmdir(dirpath)


@attrs.frozen
class Output:
    returncode: int
    stdout: str
    stderr: str

    def field(self, name: str) -> str:
        """The value of ``name:`` in /proc/self/status output."""
        for line in self.stdout.splitlines():
            key, _, value = line.partition(":")
            if key == name:
                return value.strip()
        raise AssertionError(f"no {name} in {self.stdout!r}")


class Sandbox:
    """A directory of bundles, one infra process, and everything to undo."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.rootfs = build_rootfs(base)
        self.cgroup_parent = f"/pouch-spec-test-{uuid.uuid4().hex[:8]}"
        self.started: list[str] = []
        self.pod_dir = base / "pod"
        self.pod_dir.mkdir()
        (self.pod_dir / "hosts").write_text("127.0.0.1 localhost\n10.9.8.7 web-0\n")
        (self.pod_dir / "resolv.conf").write_text("nameserver 10.0.0.10\n")
        (self.pod_dir / "hostname").write_text("web-0\n")
        (self.pod_dir / "shm").mkdir()
        self.volume = base / "volume"
        self.volume.mkdir()
        (self.volume / "hello").write_text("hello from the host\n")
        self.pod = PodConfig(
            metadata=PodMetadata(name="web", uid="uid-1", namespace="default"),
            hostname="web-0",
            sysctls=SYSCTLS,
        )
        self.namespaces: dict[str, str] = {}

    def new_id(self, kind: str) -> str:
        return f"pouch-{kind}-{uuid.uuid4().hex[:12]}"

    def write_bundle(self, bundle_id: str, document: spec.Spec) -> Path:
        bundle = self.base / bundle_id
        bundle.mkdir()
        (bundle / "config.json").write_text(json.dumps(document))
        return bundle

    def start_infra(self) -> None:
        pod_id = self.new_id("pod")
        document = spec.pod_spec(
            self.pod,
            sandbox_id=pod_id,
            rootfs=self.rootfs,
            infra_argv=["/catatonit", "-P"],
            netns_path=None,
            cgroups_path=f"{self.cgroup_parent}/{pod_id}",
            oom_score_adj_floor=spec.oom_score_adj_floor(),
            shm_path=str(self.pod_dir / "shm"),
            resolv_conf_path=str(self.pod_dir / "resolv.conf"),
        )
        # The infra rootfs is read-only; the test's rootfs is shared, so the
        # mount points runc would create must exist already.
        for path in ("dev/shm", "etc/resolv.conf"):
            target = self.rootfs / path
            if path.startswith("etc"):
                target.touch()
            else:
                target.mkdir(parents=True, exist_ok=True)
        bundle = self.write_bundle(pod_id, document)
        log = bundle / "runc.log"
        self.started.append(pod_id)
        with log.open("wb") as out:
            done = subprocess.run(
                ["runc", "run", "--detach", "--bundle", str(bundle), pod_id],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                timeout=RUN_TIMEOUT,
                check=False,
            )
        assert done.returncode == 0, log.read_text()
        state = subprocess.run(
            ["runc", "state", pod_id], capture_output=True, text=True, check=True, timeout=10
        )
        pid = json.loads(state.stdout)["pid"]
        self.namespaces = {kind: f"/proc/{pid}/ns/{kind}" for kind in ("net", "ipc", "uts", "pid")}

    def run(self, ctr: ContainerConfig, *, pod: PodConfig | None = None, **kwargs) -> Output:
        container_id = self.new_id("ctr")
        passwd, group = spec.read_user_db(self.rootfs)
        args = {
            "sandbox_id": "sandbox",
            "rootfs": self.rootfs,
            "pod_namespaces": self.namespaces,
            "etc_files": {
                "hosts": self.pod_dir / "hosts",
                "resolv.conf": self.pod_dir / "resolv.conf",
                "hostname": self.pod_dir / "hostname",
            },
            "shm_path": str(self.pod_dir / "shm"),
            "passwd": passwd,
            "group": group,
            "cgroups_path": f"{self.cgroup_parent}/{container_id}",
            "oom_score_adj_floor": spec.oom_score_adj_floor(),
            "host_has_apparmor": False,
            "available_capabilities": spec.current_capabilities(),
        }
        args.update(kwargs)
        image = ImageConfig(diff_ids=(), platform=Platform("linux", "amd64"), cmd=("sh",))
        document = spec.container_spec(pod or self.pod, ctr, image, **args)
        bundle = self.write_bundle(container_id, document)
        self.started.append(container_id)
        done = subprocess.run(
            ["runc", "run", "--bundle", str(bundle), container_id],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=RUN_TIMEOUT,
            check=False,
        )
        subprocess.run(["runc", "delete", "-f", container_id], capture_output=True, check=False)
        return Output(done.returncode, done.stdout, done.stderr)

    def close(self) -> None:
        for bundle_id in reversed(self.started):
            subprocess.run(
                ["runc", "delete", "-f", bundle_id], capture_output=True, check=False, timeout=30
            )
        remove_cgroups(self.cgroup_parent)


def container(script: str, **security) -> ContainerConfig:
    return ContainerConfig(
        metadata=ContainerMetadata(name="probe"),
        image="busybox",
        command=("/bin/sh", "-c", script),
        security=ContainerSecurity(**security),
    )


STATUS = "grep -E '^(CapEff|CapBnd|NoNewPrivs|Seccomp):' /proc/self/status"


@pytest.fixture(scope="class")
def sandbox() -> Iterator[Sandbox]:
    ensure_tools()
    base = Path(tempfile.mkdtemp(prefix="pouch-spec-", dir="/tmp"))
    box = Sandbox(base)
    try:
        box.start_infra()
        yield box
    finally:
        box.close()
        shutil.rmtree(base, ignore_errors=True)


class TestContainerSpecUnderRunc:
    def test_default_container(self, sandbox: Sandbox):
        script = "; ".join(
            [
                STATUS,
                "echo oom=$(cat /proc/self/oom_score_adj)",
                f"echo masked=$(wc -c < {MASKED_FILE})",
                "echo data=$(cat /data/hello)",
                "echo hostname=$(hostname)",
                "echo hosts=$(grep web-0 /etc/hosts)",
                "echo port=$(cat /proc/sys/net/ipv4/ip_unprivileged_port_start)",
                "echo rmid=$(cat /proc/sys/kernel/shm_rmid_forced)",
                "echo pid1=$(cat /proc/1/comm)",
                "echo user=$(id -u):$(id -g)",
            ]
        )
        ctr = attrs.evolve(
            container(script, seccomp=RUNTIME_DEFAULT, no_new_privs=True),
            mounts=(Mount("/data", str(sandbox.volume), readonly=True),),
            # Lower than this host allows without CAP_SYS_RESOURCE: clamped.
            resources=LinuxResources(oom_score_adj=-999),
        )
        out = sandbox.run(ctr)
        assert out.returncode == 0, out.stderr
        assert out.field("CapEff") == cap_mask(defaults.DEFAULT_CAPABILITIES)
        assert out.field("CapBnd") == cap_mask(defaults.DEFAULT_CAPABILITIES)
        assert out.field("NoNewPrivs") == "1"
        assert out.field("Seccomp") == "2"
        values = dict(line.split("=", 1) for line in out.stdout.splitlines() if "=" in line)
        assert int(values["oom"]) == max(-999, spec.oom_score_adj_floor())
        assert values["masked"] == "0"  # /dev/null is bound over it
        assert values["data"] == "hello from the host"
        assert values["hostname"] == "web-0"  # the pod's UTS namespace
        assert values["hosts"] == "10.9.8.7 web-0"
        assert values["port"] == "80"
        assert values["rmid"] == "1"
        assert values["pid1"] == "catatonit"  # the pod's pid namespace
        assert values["user"] == "0:0"

    def test_unconfined_user_and_groups(self, sandbox: Sandbox):
        script = f"{STATUS}; echo ids=$(id -u) $(id -g) groups=$(id -G)"
        ctr = container(
            script, seccomp=UNCONFINED, run_as_username="app", supplemental_groups=(5000,)
        )
        out = sandbox.run(ctr)
        assert out.returncode == 0, out.stderr
        assert out.field("Seccomp") == "0"
        assert out.field("NoNewPrivs") == "0"
        # Not root, no ambient capabilities: nothing effective, the bound stays.
        assert out.field("CapEff") == "0" * 16
        assert out.field("CapBnd") == cap_mask(defaults.DEFAULT_CAPABILITIES)
        line = next(ln for ln in out.stdout.splitlines() if ln.startswith("ids="))
        ids, groups = line.removeprefix("ids=").split(" groups=")
        assert ids == "1000 1000"
        # "audio" lists app as a member; 5000 is the kubelet's supplemental group.
        assert sorted(map(int, groups.split())) == [29, 1000, 5000]

    def test_run_as_user_and_group(self, sandbox: Sandbox):
        ctr = container("echo $(id -u) $(id -g) $(id -G)", run_as_user=4242, run_as_group=4343)
        out = sandbox.run(ctr)
        assert out.returncode == 0, out.stderr
        assert out.stdout.split() == ["4242", "4343", "4343"]

    def test_readonly_rootfs(self, sandbox: Sandbox):
        script = (
            "touch /newfile 2>/dev/null && echo rootfs=rw || echo rootfs=ro;"
            " echo x >> /etc/hosts 2>/dev/null && echo hosts=rw || echo hosts=ro;"
            " touch /dev/shm/ok && echo shm=rw || echo shm=ro"
        )
        out = sandbox.run(container(script, readonly_rootfs=True))
        assert out.returncode == 0, out.stderr
        assert out.stdout.split() == ["rootfs=ro", "hosts=ro", "shm=rw"]
        assert not (sandbox.rootfs / "newfile").exists()

    def test_capabilities_drop_all_add_one(self, sandbox: Sandbox):
        caps = Capabilities(add=("CAP_NET_BIND_SERVICE",), drop=("ALL",))
        out = sandbox.run(container(STATUS, capabilities=caps, seccomp=RUNTIME_DEFAULT))
        assert out.returncode == 0, out.stderr
        assert out.field("CapEff") == cap_mask(["CAP_NET_BIND_SERVICE"])
        assert out.field("Seccomp") == "2"

    def test_privileged(self, sandbox: Sandbox):
        pod = attrs.evolve(sandbox.pod, security=PodSecurity(privileged=True))
        script = f"{STATUS}; echo masked=$(head -c 1 {MASKED_FILE} | wc -c); ls /dev"
        ctr = container(script, privileged=True, seccomp=RUNTIME_DEFAULT)
        out = sandbox.run(ctr, pod=pod)
        assert out.returncode == 0, out.stderr
        # Every capability the daemon holds (this host may lack CAP_SYS_RESOURCE).
        assert out.field("CapEff") == cap_mask(sorted(spec.current_capabilities()))
        assert out.field("Seccomp") == "0"  # no filter, RuntimeDefault or not
        assert "masked=1" in out.stdout  # nothing masked
        # The host's devices are there (the default six always are).
        host_only = {d["path"].removeprefix("/dev/") for d in spec.host_devices()}
        host_only -= {d["path"].removeprefix("/dev/") for d in defaults.default_devices()}
        top_level = {name for name in host_only if "/" not in name}
        assert top_level <= set(out.stdout.split())

    def test_unprivileged_container_in_privileged_pod(self, sandbox: Sandbox):
        pod = attrs.evolve(sandbox.pod, security=PodSecurity(privileged=True))
        out = sandbox.run(container(STATUS), pod=pod)
        assert out.returncode == 0, out.stderr
        assert out.field("CapEff") == cap_mask(defaults.DEFAULT_CAPABILITIES)
