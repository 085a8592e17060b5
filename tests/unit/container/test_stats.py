"""Tests for pouch.container.stats against fake cgroup trees (v1, hybrid v1, v2)."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import pytest
import trio

from pouch.container import stats as st
from pouch.container.manager import Container, ContainerState, Sandbox, SandboxState
from pouch.container.model import ContainerConfig, ContainerMetadata, PodConfig, PodMetadata

if TYPE_CHECKING:
    from pathlib import Path

pytestmark = pytest.mark.timeout(30)

GIB = 1 << 30
V1_UNLIMITED = 0x7FFFFFFFFFFFF000
PSI_CPU = "some avg10=1.50 avg60=0.25 avg300=0.05 total=123456\n"
PSI_FULL = (
    "some avg10=2.00 avg60=1.00 avg300=0.50 total=1000\n"
    "full avg10=1.00 avg60=0.50 avg300=0.25 total=500\n"
)


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 10 * st._NS

    def __call__(self) -> int:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += int(seconds * st._NS)


def write(directory: Path, files: dict[str, object]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for name, value in files.items():
        (directory / name).write_text(value if isinstance(value, str) else f"{value}\n")


def memory_stat_v1(**values: int) -> str:
    defaults = {
        "cache": 0,
        "rss": 0,
        "inactive_file": 0,
        "pgfault": 0,
        "pgmajfault": 0,
        "total_cache": 300,
        "total_rss": 700,
        "total_inactive_file": 200,
        "total_pgfault": 42,
        "total_pgmajfault": 3,
    }
    defaults.update(values)
    return "".join(f"{k} {v}\n" for k, v in defaults.items())


def make_v1(
    root: Path,
    inner: str,
    *,
    cpu_ns: int = 5 * st._NS,
    usage: int = 1000,
    limit: int = V1_UNLIMITED,
    memsw: int | None = None,
    memsw_limit: int = V1_UNLIMITED,
    hybrid: bool = True,
    stat: str | None = None,
) -> None:
    """A v1 tree as systemd mounts it: cpu,cpuacct joined, with symlinks."""
    joined = root / "cpu,cpuacct"
    joined.mkdir(parents=True, exist_ok=True)
    for link in ("cpu", "cpuacct"):
        if not (root / link).exists():
            (root / link).symlink_to("cpu,cpuacct")
    rel = inner.strip("/")
    tck = os.sysconf("SC_CLK_TCK")
    write(
        joined / rel, {"cpuacct.usage": cpu_ns, "cpuacct.stat": f"user {3 * tck}\nsystem {tck}\n"}
    )
    memory = {
        "memory.usage_in_bytes": usage,
        "memory.stat": stat if stat is not None else memory_stat_v1(),
        "memory.limit_in_bytes": limit,
        "memory.failcnt": 7,
        "memory.oom_control": "oom_kill_disable 0\nunder_oom 0\noom_kill 2\n",
    }
    if memsw is not None:
        memory["memory.memsw.usage_in_bytes"] = memsw
        memory["memory.memsw.limit_in_bytes"] = memsw_limit
    write(root / "memory" / rel, memory)
    write(root / "pids" / rel, {"pids.current": 5, "cgroup.procs": "10\n11\n"})
    if hybrid:
        write(root / "unified", {"cgroup.controllers": ""})
        write(
            root / "unified" / rel,
            {"cpu.pressure": PSI_CPU, "memory.pressure": PSI_FULL, "io.pressure": PSI_FULL},
        )


def make_v2(
    root: Path,
    inner: str,
    *,
    usage_usec: int = 2_000_000,
    current: int = 4096,
    inactive: int = 1024,
    memory_max: str = "max",
    swap: int | None = 512,
) -> None:
    write(root, {"cgroup.controllers": "cpu memory pids io\n"})
    files: dict[str, object] = {
        "cpu.stat": f"usage_usec {usage_usec}\nuser_usec 1500000\nsystem_usec 500000\n"
        "nr_periods 0\nnr_throttled 0\nthrottled_usec 0\n",
        "memory.current": current,
        "memory.stat": f"anon 2048\nfile 1500\ninactive_file {inactive}\n"
        "pgfault 99\npgmajfault 4\n",
        "memory.max": memory_max + "\n",
        "memory.events": "low 0\nhigh 0\nmax 6\noom 1\noom_kill 1\n",
        "pids.current": 3,
        "cgroup.procs": "20\n21\n22\n",
        "cpu.pressure": PSI_FULL,
        "memory.pressure": PSI_FULL,
        "io.pressure": PSI_FULL,
    }
    if swap is not None:
        files["memory.swap.current"] = swap
        files["memory.swap.max"] = "max\n"
    write(root / inner.strip("/"), files)


def v1_reader(root: Path, clock: Clock | None = None, own: str = "") -> st.CgroupReader:
    return st.CgroupReader(root, own_cgroups=own, monotonic=clock or Clock())


# ---- paths ------------------------------------------------------------------------------


def test_detect_version(tmp_path: Path) -> None:
    assert st.detect_version(tmp_path) is st.CgroupVersion.V1
    (tmp_path / "cgroup.controllers").write_text("")
    assert st.detect_version(tmp_path) is st.CgroupVersion.V2


@pytest.mark.parametrize(
    ("slice_name", "expanded"),
    [
        ("system.slice", "/system.slice"),
        ("-.slice", "/"),
        ("kubepods.slice", "/kubepods.slice"),
        (
            "kubepods-burstable-pod12.slice",
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod12.slice",
        ),
    ],
)
def test_expand_slice(slice_name: str, expanded: str) -> None:
    assert st.expand_slice(slice_name) == expanded


@pytest.mark.parametrize("bad", ["kubepods", "a--b.slice", "a/b.slice", "-a.slice"])
def test_expand_slice_rejects_bad_names(bad: str) -> None:
    with pytest.raises(ValueError, match="invalid systemd slice"):
        st.expand_slice(bad)


@pytest.mark.parametrize(
    ("cgroups_path", "inner", "parent"),
    [
        ("/pouch/pouch-abc", "/pouch/pouch-abc", "/pouch"),
        (
            "/kubepods/burstable/pod1/pouch-abc/",
            "/kubepods/burstable/pod1/pouch-abc",
            "/kubepods/burstable/pod1",
        ),
        (
            "kubepods-besteffort-pod1.slice:pouch:abc",
            "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod1.slice/pouch-abc.scope",
            "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod1.slice",
        ),
        (":pouch:abc", "/system.slice/pouch-abc.scope", "/system.slice"),
        ("system.slice:pouch:sub.slice", "/system.slice/sub.slice", "/system.slice"),
        ("relative/x", "relative/x", "relative"),
    ],
)
def test_cgroup_paths(cgroups_path: str, inner: str, parent: str) -> None:
    assert st.cgroup_inner_path(cgroups_path) == inner
    assert st.cgroup_parent(cgroups_path) == parent


def test_v1_finds_joined_controllers_and_hybrid_unified(tmp_path: Path) -> None:
    make_v1(tmp_path, "/pouch/c1")
    reader = v1_reader(tmp_path)
    assert reader.version is st.CgroupVersion.V1
    assert reader.unified == str(tmp_path / "unified")
    dirs = reader.dirs("/pouch/c1")
    # The joined directory sorts first and wins over the symlinks.
    assert dirs.cpu == str(tmp_path / "cpu,cpuacct" / "pouch" / "c1")
    assert dirs.memory == str(tmp_path / "memory" / "pouch" / "c1")
    assert dirs.pids == str(tmp_path / "pids" / "pouch" / "c1")
    assert dirs.psi == str(tmp_path / "unified" / "pouch" / "c1")


def test_v1_separate_controller_mounts(tmp_path: Path) -> None:
    # This host's layout: cpu and cpuacct mounted apart, no symlinks.
    write(tmp_path / "cpuacct" / "p", {"cpuacct.usage": 10, "cpuacct.stat": "user 0\nsystem 0\n"})
    (tmp_path / "cpu" / "p").mkdir(parents=True)
    reader = v1_reader(tmp_path)
    assert reader.dirs("/p").cpu == str(tmp_path / "cpuacct" / "p")
    assert reader.dirs("/p").memory is None
    assert reader.dirs("/p").psi is None
    sample = reader.read("/p")
    assert sample is not None
    assert sample.cpu_usage_ns == 10
    assert sample.memory_usage is None
    assert sample.tasks is None


def test_v1_relative_path_joins_own_cgroup(tmp_path: Path) -> None:
    make_v1(tmp_path, "/daemon.slice/pouch/c1")
    own = "4:memory:/daemon.slice\n3:pids:/daemon.slice\n2:cpu,cpuacct:/daemon.slice\n0::/\n"
    reader = v1_reader(tmp_path, own=own)
    dirs = reader.dirs("pouch/c1")
    assert dirs.memory == str(tmp_path / "memory" / "daemon.slice" / "pouch" / "c1")
    assert reader.read("pouch/c1") is not None


# ---- reading ------------------------------------------------------------------------------


def test_v1_read(tmp_path: Path) -> None:
    make_v1(tmp_path, "/pouch/c1", usage=1000, memsw=1500)
    sample = v1_reader(tmp_path).read("/pouch/c1")
    assert sample is not None
    assert sample.cpu_usage_ns == 5 * st._NS
    assert sample.cpu_user_ns == 3 * st._NS
    assert sample.cpu_system_ns == st._NS
    assert sample.memory_usage == 1000
    assert sample.memory_working_set == 1000 - 200  # total_inactive_file
    assert sample.memory_rss == 700
    assert sample.memory_cache == 300
    assert (sample.page_faults, sample.major_page_faults) == (42, 3)
    assert sample.memory_limit is None  # the v1 "unlimited" value
    assert sample.memory_failcnt == 7
    assert sample.oom_kills == 2
    assert sample.swap_usage == 500
    assert sample.swap_limit is None
    assert (sample.tasks, sample.processes) == (5, 2)
    assert sample.cpu_psi == st.Psi(some=st.PsiData(123_456_000, 1.5, 0.25, 0.05))
    assert sample.memory_psi is not None
    assert sample.memory_psi.full == st.PsiData(500_000, 1.0, 0.5, 0.25)


def test_v1_limits_swap_and_no_psi(tmp_path: Path) -> None:
    make_v1(tmp_path, "/p", usage=1000, limit=4000, memsw=1200, memsw_limit=6000, hybrid=False)
    sample = v1_reader(tmp_path).read("/p")
    assert sample is not None
    assert sample.memory_limit == 4000
    assert sample.swap_usage == 200
    assert sample.swap_limit == 2000
    assert sample.cpu_psi is sample.io_psi is None


def test_v1_without_swap_accounting(tmp_path: Path) -> None:
    make_v1(tmp_path, "/p")
    sample = v1_reader(tmp_path).read("/p")
    assert sample is not None
    assert sample.swap_usage is None


def test_working_set_never_negative(tmp_path: Path) -> None:
    make_v1(tmp_path, "/p", usage=100, stat=memory_stat_v1(total_inactive_file=500))
    sample = v1_reader(tmp_path).read("/p")
    assert sample is not None
    assert sample.memory_working_set == 0


def test_v1_gone_cgroup_is_none(tmp_path: Path) -> None:
    make_v1(tmp_path, "/p")
    assert v1_reader(tmp_path).read("/other") is None


def test_v2_read(tmp_path: Path) -> None:
    make_v2(tmp_path, "/kubepods/pod1/c1")
    reader = st.CgroupReader(tmp_path, own_cgroups="0::/\n")
    assert reader.version is st.CgroupVersion.V2
    dirs = reader.dirs("/kubepods/pod1/c1")
    assert dirs.cpu == dirs.memory == dirs.pids == dirs.psi == str(tmp_path / "kubepods/pod1/c1")
    sample = reader.read("/kubepods/pod1/c1")
    assert sample is not None
    assert sample.cpu_usage_ns == 2_000_000_000
    assert sample.cpu_user_ns == 1_500_000_000
    assert sample.cpu_system_ns == 500_000_000
    assert sample.memory_usage == 4096
    assert sample.memory_working_set == 4096 - 1024
    assert sample.memory_rss == 2048
    assert sample.memory_cache == 1500
    assert (sample.page_faults, sample.major_page_faults) == (99, 4)
    assert sample.memory_limit is None
    assert sample.memory_failcnt == 6
    assert sample.oom_kills == 1
    assert sample.swap_usage == 512
    assert sample.swap_limit is None
    assert (sample.tasks, sample.processes) == (3, 3)
    for psi in (sample.cpu_psi, sample.memory_psi, sample.io_psi):
        assert psi == st.Psi(
            some=st.PsiData(1_000_000, 2.0, 1.0, 0.5), full=st.PsiData(500_000, 1.0, 0.5, 0.25)
        )


def test_v2_systemd_path_and_limit(tmp_path: Path) -> None:
    inner = "/kubepods.slice/kubepods-pod1.slice/pouch-c1.scope"
    make_v2(tmp_path, inner, memory_max="8192", swap=None)
    sample = st.CgroupReader(tmp_path, own_cgroups="").read("kubepods-pod1.slice:pouch:c1")
    assert sample is not None
    assert sample.memory_limit == 8192
    assert sample.swap_usage is None


def test_v2_without_memory_controller(tmp_path: Path) -> None:
    write(tmp_path, {"cgroup.controllers": ""})
    write(tmp_path / "c", {"cpu.stat": "usage_usec 10\nuser_usec 5\nsystem_usec 5\n"})
    sample = st.CgroupReader(tmp_path, own_cgroups="").read("/c")
    assert sample is not None
    assert sample.cpu_usage_ns == 10_000
    assert sample.memory_usage is None
    assert sample.tasks is None
    assert sample.processes is None


def test_v2_gone_cgroup_is_none(tmp_path: Path) -> None:
    write(tmp_path, {"cgroup.controllers": ""})
    assert st.CgroupReader(tmp_path, own_cgroups="").read("/gone") is None


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (None, None),
        ("", None),
        ("garbage\n", None),
        (PSI_CPU, st.Psi(some=st.PsiData(123_456_000, 1.5, 0.25, 0.05))),
        (
            "full avg10=0.00 avg60=0.00 avg300=0.00 total=7\n",
            st.Psi(full=st.PsiData(7000, 0.0, 0.0, 0.0)),
        ),
    ],
)
def test_parse_psi(text: str | None, expected: st.Psi | None) -> None:
    assert st.parse_psi(text) == expected


def test_sum_samples() -> None:
    a = st.CgroupSample(1, 10, cpu_usage_ns=5, memory_usage=100, memory_limit=7, tasks=1)
    b = st.CgroupSample(3, 30, cpu_usage_ns=6, memory_usage=None, tasks=2, processes=2)
    total = st.sum_samples([a, b])
    assert total == st.CgroupSample(3, 30, cpu_usage_ns=11, memory_usage=100, tasks=3, processes=2)
    assert st.sum_samples([]) is None


# ---- writable layer --------------------------------------------------------------------------


def test_measure_directory(tmp_path: Path) -> None:
    upper = tmp_path / "upper"
    (upper / "etc" / "deep").mkdir(parents=True)
    (upper / "etc" / "a").write_bytes(b"x" * 10_000)
    (upper / "etc" / "deep" / "b").write_bytes(b"y" * 100)
    (upper / "link").symlink_to("etc/a")
    used, inodes = st.measure_directory(upper)
    # upper, etc, deep, a, b, link
    assert inodes == 6
    assert used >= 10_100
    # A second name for a file adds no inode and no blocks.
    os.link(upper / "etc" / "a", upper / "hard")
    assert st.measure_directory(upper) == (used, inodes)
    # A sparse file counts the blocks it uses, not its length.
    with (upper / "sparse").open("wb") as f:
        f.truncate(GIB)
    used2, inodes2 = st.measure_directory(upper)
    assert inodes2 == inodes + 1
    assert used2 < used + (1 << 20)
    assert st.measure_directory(tmp_path / "missing") == (0, 0)


async def test_writable_layer_is_cached(tmp_path: Path) -> None:
    clock = Clock()
    upper = tmp_path / "upper"
    upper.mkdir()
    (upper / "a").write_bytes(b"a" * 4096)
    async with st.StatsSampler(v1_reader(tmp_path / "cg", clock), fs_ttl=5) as sampler:
        first = await sampler.writable_layer(upper)
        assert first is not None
        assert first.inodes_used == 2
        assert first.capacity_bytes > 0
        assert first.inodes_total >= first.inodes_free
        assert first.mountpoint
        (upper / "b").write_bytes(b"b" * 4096)
        clock.advance(4)
        assert await sampler.writable_layer(upper) == first
        clock.advance(2)
        second = await sampler.writable_layer(upper)
        assert second is not None
        assert second.inodes_used == 3
        assert await sampler.writable_layer(tmp_path / "missing") is None


# ---- the sampler --------------------------------------------------------------------------


async def test_usage_nano_cores(tmp_path: Path) -> None:
    clock = Clock()
    make_v1(tmp_path, "/p/c1", cpu_ns=10 * st._NS)
    usage = tmp_path / "cpu,cpuacct" / "p" / "c1" / "cpuacct.usage"
    target = st.ContainerTarget("c1", "/p/c1")
    async with st.StatsSampler(v1_reader(tmp_path, clock), cpu_window=1.0) as sampler:

        async def sample() -> st.CpuStats:
            (stats,) = await sampler.container_stats([target])
            assert stats.cpu is not None
            return stats.cpu

        first = await sample()
        assert first.usage_core_ns == 10 * st._NS
        assert first.usage_nano_cores is None
        # Half a core over two seconds.
        clock.advance(2)
        usage.write_text(f"{11 * st._NS}\n")
        assert (await sample()).usage_nano_cores == 500_000_000
        # Sooner than the window: the last rate, and the anchor stays.
        clock.advance(0.1)
        usage.write_text(f"{11 * st._NS + 100_000_000}\n")
        assert (await sample()).usage_nano_cores == 500_000_000
        clock.advance(0.9)
        usage.write_text(f"{11 * st._NS + 2 * st._NS}\n")
        assert (await sample()).usage_nano_cores == 2 * st._NS
        # A counter that goes back (another cgroup under the same id) restarts.
        clock.advance(1)
        usage.write_text("5\n")
        assert (await sample()).usage_nano_cores is None
        sampler.forget("c1")
        clock.advance(1)
        assert (await sample()).usage_nano_cores is None


async def test_container_stats(tmp_path: Path) -> None:
    make_v1(tmp_path / "cg", "/p/c1", usage=1000, limit=3000, memsw=1100)
    upper = tmp_path / "upper"
    upper.mkdir()
    targets = [
        st.ContainerTarget("c1", "/p/c1", upper_dir=upper),
        st.ContainerTarget("gone", "/p/gone", upper_dir=tmp_path / "nothing"),
    ]
    async with st.StatsSampler(v1_reader(tmp_path / "cg")) as sampler:
        c1, gone = await sampler.container_stats(targets)
    assert c1.container_id == "c1"
    assert c1.memory is not None
    assert c1.memory.working_set_bytes == 800
    assert c1.memory.available_bytes == 2200
    assert c1.memory.limit_bytes == 3000
    assert c1.swap == st.SwapStats(c1.memory.timestamp_ns, usage_bytes=100, available_bytes=None)
    assert c1.process == st.ProcessStats(c1.memory.timestamp_ns, process_count=5, processes=2)
    assert c1.io is not None
    assert c1.io.psi.full is not None
    assert c1.writable_layer is not None
    assert c1.writable_layer.inodes_used == 1
    assert gone == st.ContainerStats("gone")


async def test_pod_stats_sum_without_pod_cgroup(tmp_path: Path) -> None:
    clock = Clock()
    for name in ("infra", "c1", "c2"):
        make_v1(tmp_path, f"/pouch/{name}", cpu_ns=st._NS, usage=1000)
    pod = st.PodTarget(
        "sb",
        "/pouch/infra",
        containers=(st.ContainerTarget("c1", "/pouch/c1"), st.ContainerTarget("c2", "/pouch/c2")),
    )
    async with st.StatsSampler(v1_reader(tmp_path, clock)) as sampler:
        (stats,) = await sampler.pod_stats([pod])
        assert stats.sandbox_id == "sb"
        assert [c.container_id for c in stats.containers] == ["c1", "c2"]
        assert stats.cpu is not None
        assert stats.cpu.usage_core_ns == 3 * st._NS
        assert stats.memory is not None
        assert stats.memory.working_set_bytes == 3 * 800
        assert stats.memory.available_bytes is None
        assert stats.process is not None
        assert stats.process.process_count == 15
        assert stats.io is None  # PSI does not add up
        assert stats.network is None
        # The pod's rate is its own, apart from the containers'.
        clock.advance(1)
        usage = tmp_path / "cpu,cpuacct" / "pouch" / "c1" / "cpuacct.usage"
        usage.write_text(f"{2 * st._NS}\n")
        (stats,) = await sampler.pod_stats([pod])
        assert stats.cpu is not None
        assert stats.cpu.usage_nano_cores == st._NS
        assert stats.containers[0].cpu is not None
        assert stats.containers[0].cpu.usage_nano_cores == st._NS
        assert stats.containers[1].cpu is not None
        assert stats.containers[1].cpu.usage_nano_cores == 0


async def test_pod_stats_from_pod_cgroup(tmp_path: Path) -> None:
    make_v2(tmp_path, "/kubepods/pod1", usage_usec=9_000_000, current=10_000)
    make_v2(tmp_path, "/kubepods/pod1/c1", usage_usec=1_000_000)
    pod = st.PodTarget(
        "sb",
        "/kubepods/pod1/infra",
        pod_cgroup="/kubepods/pod1",
        netns_path=str(tmp_path / "no-such-netns"),
        containers=(st.ContainerTarget("c1", "/kubepods/pod1/c1"),),
    )
    async with st.StatsSampler(st.CgroupReader(tmp_path, own_cgroups="")) as sampler:
        (stats,) = await sampler.pod_stats([pod])
        assert sampler.netns_handles() == 0
    assert stats.cpu is not None
    assert stats.cpu.usage_core_ns == 9 * st._NS
    assert stats.memory is not None
    assert stats.memory.usage_bytes == 10_000
    assert stats.io is not None
    # The namespace is gone: no network stats, and no handle kept.
    assert stats.network is None
    assert stats.containers[0].cpu is not None
    assert stats.containers[0].cpu.usage_core_ns == st._NS


async def test_closed_sampler_refuses_network_reads(tmp_path: Path) -> None:
    sampler = st.StatsSampler(v1_reader(tmp_path))
    assert await sampler.network(str(tmp_path / "none")) is None
    await sampler.aclose()
    await sampler.aclose()
    with pytest.raises(trio.ClosedResourceError):
        await sampler.network(str(tmp_path / "none"))


# ---- network ------------------------------------------------------------------------------


def test_network_stats_default_and_lo() -> None:
    counters = {"rx_bytes": 10, "tx_bytes": 20, "rx_errors": 1, "tx_errors": 2, "rx_packets": 3}
    lo = st.interface_stats("lo", counters)
    eth0 = st.interface_stats("eth0", counters)
    net1 = st.interface_stats("net1", {})
    assert eth0 == st.InterfaceStats("eth0", 10, 1, 20, 2, rx_packets=3)
    net = st.network_stats(5, [net1, lo, eth0])
    assert net.default_interface == eth0
    assert net.interfaces == (net1,)
    assert net.all_interfaces() == (eth0, net1)
    none = st.network_stats(5, [lo, net1])
    assert none.default_interface is None
    assert none.interfaces == (net1,)


# ---- targets and metrics ---------------------------------------------------------------------


class FakeManager:
    def __init__(self, root: Path) -> None:
        self.root = root

    def container_dir(self, container_id: str) -> Path:
        return self.root / "containers" / container_id


SPEC = {
    "linux": {
        "cgroupsPath": "/kubepods/pod1/pouch-c1",
        "resources": {
            "cpu": {"shares": 512, "quota": 50_000, "period": 100_000},
            "memory": {"limit": 1 << 28},
        },
    }
}


def records() -> tuple[Sandbox, Container]:
    pod = PodConfig(metadata=PodMetadata("web", "uid1", "default"), cgroup_parent="/kubepods/pod1")
    sandbox = Sandbox(
        sandbox_id="sb",
        name="web_default_uid1_0",
        config=pod,
        handler="runc",
        state=SandboxState.READY,
        created_at=1_700_000_000 * st._NS,
        netns_path="/run/netns/pouch-sb",
        spec={"linux": {"cgroupsPath": "/kubepods/pod1/pouch-sb"}},
    )
    container = Container(
        container_id="c1",
        sandbox_id="sb",
        name="app_web_default_uid1_0",
        config=ContainerConfig(metadata=ContainerMetadata("app"), image="busybox"),
        image_id="sha256:abc",
        image_ref="docker.io/library/busybox:latest",
        state=ContainerState.RUNNING,
        created_at=1,
        started_at=1_700_000_100 * st._NS,
        spec=SPEC,
    )
    return sandbox, container


def test_targets_from_records(tmp_path: Path) -> None:
    sandbox, container = records()
    manager = FakeManager(tmp_path)
    pod = st.pod_target(manager, sandbox, [container])  # type: ignore[arg-type]
    assert pod.cgroups_path == "/kubepods/pod1/pouch-sb"
    assert pod.pod_cgroup == "/kubepods/pod1"
    assert pod.netns_path == "/run/netns/pouch-sb"
    (c,) = pod.containers
    assert c == st.ContainerTarget(
        container_id="c1",
        cgroups_path="/kubepods/pod1/pouch-c1",
        upper_dir=tmp_path / "containers" / "c1" / "upper",
        name="app",
        image="docker.io/library/busybox:latest",
        started_at=1_700_000_100 * st._NS,
        limits=st.SpecLimits(
            memory_limit=1 << 28, cpu_shares=512, cpu_quota=50_000, cpu_period=100_000
        ),
    )
    # Without a cgroup parent from the kubelet, the parent is shared.
    sandbox.config = PodConfig(metadata=PodMetadata("web", "uid1", "default"))
    assert st.pod_target(manager, sandbox, []).pod_cgroup is None  # type: ignore[arg-type]
    assert st.spec_limits({}) == st.SpecLimits()
    assert st.spec_limits({"linux": {"resources": {"cpu": {"shares": "x"}}}}) == st.SpecLimits()


def test_descriptors() -> None:
    names = [d.name for d in st.METRIC_DESCRIPTORS]
    assert len(names) == len(set(names))
    for required in (
        "container_cpu_usage_seconds_total",
        "container_cpu_user_seconds_total",
        "container_cpu_system_seconds_total",
        "container_memory_usage_bytes",
        "container_memory_working_set_bytes",
        "container_memory_rss",
        "container_memory_cache",
        "container_memory_swap",
        "container_memory_failcnt",
        "container_memory_failures_total",
        "container_spec_memory_limit_bytes",
        "container_spec_cpu_shares",
        "container_spec_cpu_quota",
        "container_spec_cpu_period",
        "container_processes",
        "container_threads",
        "container_fs_usage_bytes",
        "container_fs_inodes_total",
        "container_last_seen",
        "container_start_time_seconds",
        "container_oom_events_total",
        "container_network_receive_bytes_total",
        "container_network_transmit_bytes_total",
        "container_network_receive_packets_total",
        "container_network_transmit_packets_total",
        "container_network_receive_errors_total",
        "container_network_transmit_errors_total",
        "container_network_receive_packets_dropped_total",
        "container_network_transmit_packets_dropped_total",
    ):
        assert required in names
    for d in st.METRIC_DESCRIPTORS:
        assert d.help
        assert d.label_keys[:3] == st.BASE_LABELS


def full_pod_stats() -> tuple[st.PodTarget, st.PodStats]:
    ts = 1_700_000_200 * st._NS
    cpu = st.CpuStats(ts, 7_500_000_000, 250_000_000, user_ns=5 * st._NS, system_ns=2 * st._NS)
    memory = st.MemoryStats(
        ts,
        usage_bytes=1000,
        working_set_bytes=800,
        rss_bytes=700,
        cache_bytes=300,
        page_faults=42,
        major_page_faults=3,
        failcnt=7,
        oom_kills=2,
    )
    process = st.ProcessStats(ts, process_count=5, processes=2)
    layer = st.FilesystemStats(ts, "/var/lib/pouch", "/dev/vda1", 4096, 3, 10 * GIB, GIB, 1000, 900)
    container = st.ContainerStats(
        "c1", cpu=cpu, memory=memory, process=process, writable_layer=layer
    )
    eth0 = st.InterfaceStats("eth0", 100, 1, 200, 2, 10, 20, 3, 4)
    network = st.NetworkStats(ts, eth0, (st.InterfaceStats("net1", 1, 0, 2, 0),))
    stats = st.PodStats("sb", ts, cpu=cpu, memory=memory, network=network, containers=(container,))
    target = st.PodTarget(
        "sb",
        "/p/sb",
        started_at=1_700_000_000 * st._NS,
        containers=(
            st.ContainerTarget(
                "c1",
                "/p/c1",
                name="app",
                image="busybox",
                started_at=1_700_000_100 * st._NS,
                limits=st.SpecLimits(memory_limit=1 << 28, cpu_shares=512, cpu_quota=50_000),
            ),
            st.ContainerTarget("unsampled", "/p/x"),
        ),
    )
    return target, stats


def test_pod_metrics_match_descriptors() -> None:
    target, stats = full_pod_stats()
    result = st.pod_metrics(target, stats)
    descriptors = {d.name: d for d in st.METRIC_DESCRIPTORS}
    all_metrics = list(result.metrics) + [m for c in result.container_metrics for m in c.metrics]
    for m in all_metrics:
        assert m.name in descriptors, m.name
        assert len(m.label_values) == len(descriptors[m.name].label_keys), m.name
        assert m.value >= 0
        assert m.timestamp_ns > 0
    assert result.sandbox_id == "sb"
    assert [c.container_id for c in result.container_metrics] == ["c1"]

    def values(metrics: tuple[st.Metric, ...], name: str) -> dict[tuple[str, ...], int]:
        return {m.label_values: m.value for m in metrics if m.name == name}

    pod = result.metrics
    assert values(pod, "container_network_receive_bytes_total") == {
        ("sb", "POD", "", "eth0"): 100,
        ("sb", "POD", "", "net1"): 1,
    }
    assert (
        values(pod, "container_network_transmit_packets_dropped_total")[("sb", "POD", "", "eth0")]
        == 4
    )
    assert values(pod, "container_start_time_seconds") == {("sb", "POD", ""): 1_700_000_000}
    kinds = {m.name: m.type for m in all_metrics}
    assert kinds["container_network_receive_bytes_total"] is st.MetricType.COUNTER
    assert kinds["container_memory_working_set_bytes"] is st.MetricType.GAUGE

    (ctr,) = result.container_metrics
    base = ("c1", "app", "busybox")
    assert values(ctr.metrics, "container_cpu_usage_seconds_total") == {(*base, "total"): 7}
    assert values(ctr.metrics, "container_cpu_user_seconds_total") == {base: 5}
    assert values(ctr.metrics, "container_memory_working_set_bytes") == {base: 800}
    assert values(ctr.metrics, "container_memory_swap") == {base: 0}
    assert values(ctr.metrics, "container_memory_failures_total") == {
        (*base, "pgfault", "container"): 42,
        (*base, "pgfault", "hierarchy"): 42,
        (*base, "pgmajfault", "container"): 3,
        (*base, "pgmajfault", "hierarchy"): 3,
    }
    assert values(ctr.metrics, "container_oom_events_total") == {base: 2}
    assert values(ctr.metrics, "container_processes") == {base: 2}
    assert values(ctr.metrics, "container_threads") == {base: 5}
    assert values(ctr.metrics, "container_fs_usage_bytes") == {(*base, "/dev/vda1"): 4096}
    assert values(ctr.metrics, "container_fs_inodes_total") == {(*base, "/dev/vda1"): 1000}
    assert values(ctr.metrics, "container_spec_memory_limit_bytes") == {base: 1 << 28}
    assert values(ctr.metrics, "container_spec_cpu_shares") == {base: 512}
    assert values(ctr.metrics, "container_spec_cpu_quota") == {base: 50_000}
    assert values(ctr.metrics, "container_spec_cpu_period") == {base: 100_000}
    assert values(ctr.metrics, "container_start_time_seconds") == {base: 1_700_000_100}
    assert values(ctr.metrics, "container_last_seen") == {base: 1_700_000_200}
    # Network counters are the pod's only.
    assert not values(ctr.metrics, "container_network_receive_bytes_total")


def test_metrics_of_a_stopped_container() -> None:
    target = st.ContainerTarget("c1", "/p/c1", name="app")
    assert st.container_metrics(target, st.ContainerStats("c1")).metrics == ()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (None, {}),
        ("", {}),
        ("rss 10\ncache 20\n", {"rss": 10, "cache": 20}),
        (
            "oom_kill_disable 0\nunder_oom 0\noom_kill 3\n",
            {"oom_kill_disable": 0, "under_oom": 0, "oom_kill": 3},
        ),
        ("a 1\nodd line here\nb 2\n", {"a": 1, "b": 2}),
        ("a 1\nb\n", {"a": 1}),
    ],
)
def test_parse_flat_keyed(text: str | None, expected: dict[str, int]) -> None:
    assert st.parse_flat_keyed(text) == expected
