"""Stats and metrics RPCs: ContainerStats, ListContainerStats, PodSandboxStats,
ListPodSandboxStats, ListMetricDescriptors, ListPodSandboxMetrics and their streams."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from pouch.container import stats as st
from pouch.container.manager import ContainerState
from pouch.cri._pb.runtime import v1 as pb
from pouch.cri.events import _pages
from pouch.cri.sandbox import require_id

if TYPE_CHECKING:
    from pouch.container.manager import Container, Sandbox
    from pouch.core import Core

Send = Callable[[Any], Awaitable[None]]


def _u64(value: int | None) -> pb.UInt64Value | None:
    return None if value is None else pb.UInt64Value(value=max(0, int(value)))


def _psi(psi: st.Psi | None) -> pb.PsiStats | None:
    if psi is None:
        return None

    def data(d: st.PsiData | None) -> pb.PsiData | None:
        if d is None:
            return None
        return pb.PsiData(total=d.total_ns // 1000, avg10=d.avg10, avg60=d.avg60, avg300=d.avg300)

    out = pb.PsiStats()
    if (full := data(psi.full)) is not None:
        out.full = full
    if (some := data(psi.some)) is not None:
        out.some = some
    return out


M = TypeVar("M")


def _set(msg: M, **fields: Any) -> M:
    """Set only the fields that have a value (unset = unknown in the CRI)."""
    for name, value in fields.items():
        if value is not None:
            setattr(msg, name, value)
    return msg


def _cpu(cpu: st.CpuStats | None) -> pb.CpuUsage | None:
    if cpu is None:
        return None
    return _set(
        pb.CpuUsage(timestamp=cpu.timestamp_ns),
        usage_core_nano_seconds=_u64(cpu.usage_core_ns),
        usage_nano_cores=_u64(cpu.usage_nano_cores),
        psi=_psi(cpu.psi),
    )


def _memory(m: st.MemoryStats | None) -> pb.MemoryUsage | None:
    if m is None:
        return None
    return _set(
        pb.MemoryUsage(timestamp=m.timestamp_ns),
        working_set_bytes=_u64(m.working_set_bytes),
        available_bytes=_u64(m.available_bytes),
        usage_bytes=_u64(m.usage_bytes),
        rss_bytes=_u64(m.rss_bytes),
        page_faults=_u64(m.page_faults),
        major_page_faults=_u64(m.major_page_faults),
        psi=_psi(m.psi),
    )


def _swap(s: st.SwapStats | None) -> pb.SwapUsage | None:
    if s is None:
        return None
    return _set(
        pb.SwapUsage(timestamp=s.timestamp_ns),
        swap_available_bytes=_u64(s.available_bytes),
        swap_usage_bytes=_u64(s.usage_bytes),
    )


def _io(io: st.IoStats | None) -> pb.IoUsage | None:
    return None if io is None else _set(pb.IoUsage(timestamp=io.timestamp_ns), psi=_psi(io.psi))


def _fs(fs: st.FilesystemStats | None) -> pb.FilesystemUsage | None:
    if fs is None:
        return None
    return pb.FilesystemUsage(
        timestamp=fs.timestamp_ns,
        fs_id=pb.FilesystemIdentifier(mountpoint=fs.mountpoint),
        used_bytes=pb.UInt64Value(value=fs.used_bytes),
        inodes_used=pb.UInt64Value(value=fs.inodes_used),
    )


def _iface(i: st.InterfaceStats | None) -> pb.NetworkInterfaceUsage | None:
    if i is None:
        return None
    return pb.NetworkInterfaceUsage(
        name=i.name,
        rx_bytes=pb.UInt64Value(value=i.rx_bytes),
        rx_errors=pb.UInt64Value(value=i.rx_errors),
        tx_bytes=pb.UInt64Value(value=i.tx_bytes),
        tx_errors=pb.UInt64Value(value=i.tx_errors),
    )


def to_pb_container_stats(c: Container, s: st.ContainerStats) -> pb.ContainerStats:
    meta = c.config.metadata
    return _set(
        pb.ContainerStats(
            attributes=pb.ContainerAttributes(
                id=c.container_id,
                metadata=pb.ContainerMetadata(name=meta.name, attempt=meta.attempt),
                labels=dict(c.config.labels),
                annotations=dict(c.config.annotations),
            )
        ),
        cpu=_cpu(s.cpu),
        memory=_memory(s.memory),
        writable_layer=_fs(s.writable_layer),
        swap=_swap(s.swap),
        io=_io(s.io),
    )


def _running(
    core: Core,
    *,
    container_id: str = "",
    sandbox_id: str = "",
    labels: Mapping[str, str] | None = None,
) -> list[Container]:
    return core.containers.list_containers(
        container_id=container_id,
        sandbox_id=sandbox_id,
        state=ContainerState.RUNNING,
        labels=labels,
    )


async def _container_stats(core: Core, containers: Sequence[Container]) -> list[pb.ContainerStats]:
    targets = [st.container_target(core.containers, c) for c in containers]
    samples = await core.stats.container_stats(targets)
    return [to_pb_container_stats(c, s) for c, s in zip(containers, samples, strict=True)]


async def container_stats(core: Core, req: pb.ContainerStatsRequest) -> pb.ContainerStatsResponse:
    c = core.containers.container(require_id(req.container_id, "container_id"))
    (out,) = await _container_stats(core, [c])
    return pb.ContainerStatsResponse(stats=out)


def _container_filter(core: Core, f: pb.ContainerStatsFilter | None) -> list[Container]:
    if f is None:
        return _running(core)
    return _running(
        core, container_id=f.id, sandbox_id=f.pod_sandbox_id, labels=dict(f.label_selector)
    )


async def list_container_stats(
    core: Core, req: pb.ListContainerStatsRequest
) -> pb.ListContainerStatsResponse:
    found = _container_filter(core, req.filter)
    return pb.ListContainerStatsResponse(stats=await _container_stats(core, found))


async def stream_container_stats(
    core: Core, req: pb.StreamContainerStatsRequest, send: Send
) -> None:
    stats = await _container_stats(core, _container_filter(core, req.filter))
    await _pages(stats, send, lambda page: pb.StreamContainerStatsResponse(container_stats=page))


def _pod_targets(core: Core, sandboxes: Sequence[Sandbox]) -> list[st.PodTarget]:
    return [
        st.pod_target(core.containers, s, _running(core, sandbox_id=s.sandbox_id))
        for s in sandboxes
    ]


def _sandbox_filter(core: Core, f: pb.PodSandboxStatsFilter | None) -> list[Sandbox]:
    from pouch.container.manager import SandboxState

    return core.containers.list_sandboxes(
        sandbox_id=f.id if f is not None else "",
        state=SandboxState.READY,
        labels=dict(f.label_selector) if f is not None else None,
    )


async def _pod_stats(core: Core, sandboxes: Sequence[Sandbox]) -> list[pb.PodSandboxStats]:
    samples = await core.stats.pod_stats(_pod_targets(core, sandboxes))
    out = []
    for s, sample in zip(sandboxes, samples, strict=True):
        meta = s.config.metadata
        by_id = {c.container_id: c for c in _running(core, sandbox_id=s.sandbox_id)}
        network = None
        if sample.network is not None:
            network = pb.NetworkUsage(
                timestamp=sample.network.timestamp_ns,
                interfaces=[i for i in map(_iface, sample.network.interfaces) if i is not None],
            )
            if (default := _iface(sample.network.default_interface)) is not None:
                network.default_interface = default
        linux = _set(
            pb.LinuxPodSandboxStats(
                containers=[
                    to_pb_container_stats(by_id[cs.container_id], cs)
                    for cs in sample.containers
                    if cs.container_id in by_id
                ]
            ),
            cpu=_cpu(sample.cpu),
            memory=_memory(sample.memory),
            network=network,
            io=_io(sample.io),
        )
        if sample.process is not None:
            linux.process = pb.ProcessUsage(
                timestamp=sample.process.timestamp_ns,
                process_count=pb.UInt64Value(value=sample.process.process_count),
            )
        out.append(
            pb.PodSandboxStats(
                attributes=pb.PodSandboxAttributes(
                    id=s.sandbox_id,
                    metadata=pb.PodSandboxMetadata(
                        name=meta.name, uid=meta.uid, namespace=meta.namespace, attempt=meta.attempt
                    ),
                    labels=dict(s.config.labels),
                    annotations=dict(s.config.annotations),
                ),
                linux=linux,
            )
        )
    return out


async def pod_sandbox_stats(
    core: Core, req: pb.PodSandboxStatsRequest
) -> pb.PodSandboxStatsResponse:
    s = core.containers.sandbox(require_id(req.pod_sandbox_id, "pod_sandbox_id"))
    (out,) = await _pod_stats(core, [s])
    return pb.PodSandboxStatsResponse(stats=out)


async def list_pod_sandbox_stats(
    core: Core, req: pb.ListPodSandboxStatsRequest
) -> pb.ListPodSandboxStatsResponse:
    return pb.ListPodSandboxStatsResponse(
        stats=await _pod_stats(core, _sandbox_filter(core, req.filter))
    )


async def stream_pod_sandbox_stats(
    core: Core, req: pb.StreamPodSandboxStatsRequest, send: Send
) -> None:
    stats = await _pod_stats(core, _sandbox_filter(core, req.filter))
    await _pages(stats, send, lambda page: pb.StreamPodSandboxStatsResponse(pod_sandbox_stats=page))


async def list_metric_descriptors(
    core: Core, req: pb.ListMetricDescriptorsRequest
) -> pb.ListMetricDescriptorsResponse:
    del core, req
    return pb.ListMetricDescriptorsResponse(
        descriptors=[
            pb.MetricDescriptor(name=d.name, help=d.help, label_keys=list(d.label_keys))
            for d in st.METRIC_DESCRIPTORS
        ]
    )


def _metric(m: st.Metric) -> pb.Metric:
    return pb.Metric(
        name=m.name,
        timestamp=m.timestamp_ns,
        metric_type=pb.MetricType(int(m.type)),
        label_values=list(m.label_values),
        value=pb.UInt64Value(value=max(0, m.value)),
    )


async def _pod_metrics(core: Core) -> list[pb.PodSandboxMetrics]:
    sandboxes = _sandbox_filter(core, None)
    targets = _pod_targets(core, sandboxes)
    samples = await core.stats.pod_stats(targets)
    out = []
    for target, sample in zip(targets, samples, strict=True):
        pm = st.pod_metrics(target, sample)
        out.append(
            pb.PodSandboxMetrics(
                pod_sandbox_id=pm.sandbox_id,
                metrics=[_metric(m) for m in pm.metrics],
                container_metrics=[
                    pb.ContainerMetrics(
                        container_id=cm.container_id, metrics=[_metric(m) for m in cm.metrics]
                    )
                    for cm in pm.container_metrics
                ],
            )
        )
    return out


async def list_pod_sandbox_metrics(
    core: Core, req: pb.ListPodSandboxMetricsRequest
) -> pb.ListPodSandboxMetricsResponse:
    del req
    return pb.ListPodSandboxMetricsResponse(pod_metrics=await _pod_metrics(core))


async def stream_pod_sandbox_metrics(
    core: Core, req: pb.StreamPodSandboxMetricsRequest, send: Send
) -> None:
    del req
    metrics = await _pod_metrics(core)
    await _pages(
        metrics, send, lambda page: pb.StreamPodSandboxMetricsResponse(pod_sandbox_metrics=page)
    )
