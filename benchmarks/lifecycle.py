"""Pod and container lifecycle latency, and memory per pod, of CRI runtimes side by side.

    sudo python -m benchmarks.lifecycle --world --json lifecycle.json
    sudo python -m benchmarks.lifecycle \\
        --endpoint pouch=unix:///run/pouch/pouch.sock \\
        --endpoint containerd=unix:///run/containerd/containerd.sock --image REF

With ``--world`` the benchmark builds :class:`benchmarks._world.World` (a
registry on loopback, a private pouchd and a private containerd; containerd
last, so it is the reference for the ratios) and tears it down at the end,
checking that nothing is left on the host.  Otherwise it drives the endpoints
given, which must be able to pull ``--image`` (by default busybox, pushed to a
registry the benchmark starts on ``127.0.0.1:--registry-port``).

**Latency.**  One iteration on one runtime is the kubelet's path for a pod
with one container, each RPC timed on the client on its own:
RunPodSandbox, CreateContainer (busybox ``sleep 1000``), StartContainer,
StopContainer (timeout 2 s; ``sleep`` dies of the SIGTERM), RemoveContainer,
StopPodSandbox, RemovePodSandbox.  Pods use the host network
(``NamespaceOption.network = NODE``), so CNI is out of the picture for every
runtime: pouchd has no CNI yet.  Iterations alternate between runtimes in
blocks (:func:`benchmarks._common.alternate`) after discarded warm-up rounds.

**Memory.**  For each K of ``--pods-for-memory``, one runtime at a time: start
K pods with one sleeping container each, then sum the memory of the daemon and
of its monitors (pouchd: its conmon processes, one per container and one per
pod infra process; containerd: its containerd-shim-runc-v2 processes, one per
pod), found by command line under the runtime's directories; then remove the
pods.  PSS (``/proc/<pid>/smaps_rollup``) is the headline figure; RSS and USS
are in the JSON.

Exit status: 0 when everything succeeded, 1 when any operation failed (the
numbers are still printed and written) or the world left something behind, 2
on a usage error or a runtime that cannot run the workload at all.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import sys
import tempfile
import time
import uuid
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import grpc
from cri_api.v1 import api_pb2
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from benchmarks import _common as common
from benchmarks import _world as world_mod

if TYPE_CHECKING:
    import datetime
    from collections.abc import Callable, Iterator, Sequence

    from google.protobuf.message import Message

DEFAULT_ITERATIONS: Final = 100
QUICK_ITERATIONS: Final = 10
DEFAULT_WARMUP: Final = 5
QUICK_WARMUP: Final = 2
DEFAULT_PODS: Final = (10, 100)
QUICK_PODS: Final = (10,)
DEFAULT_REGISTRY_PORT: Final = 5000
LOG_WIDTH: Final = 170
MIB: Final = 1 << 20
POD_NAMESPACE: Final = "pouch-bench"

RPCS: Final = (
    "RunPodSandbox",
    "CreateContainer",
    "StartContainer",
    "StopContainer",
    "RemoveContainer",
    "StopPodSandbox",
    "RemovePodSandbox",
)
CYCLE: Final = "cycle (7 RPCs)"


# ---------------------------------------------------------------------------
# Targets and pods


@dataclass
class Target:
    """A connected endpoint and what is known of the daemon behind it."""

    endpoint: common.Endpoint
    runtime: world_mod.Runtime

    @property
    def label(self) -> str:
        return self.endpoint.label


class StepFailed(Exception):
    """One RPC of a cycle failed; ``step`` names it, ``__cause__`` is the error."""

    def __init__(self, step: str, exc: BaseException) -> None:
        super().__init__(f"{step}: {_details(exc)}")
        self.step = step


class BadState(Exception):
    """A container was not in the state its last RPC should have left it in."""


class PreflightError(Exception):
    """A runtime cannot pull the image or run one checked iteration."""


def _details(exc: BaseException) -> str:
    if isinstance(exc, grpc.RpcError) and isinstance(exc, grpc.Call):
        return f"{exc.code().name}: {exc.details()}"
    return f"{type(exc).__name__}: {exc}"


@dataclass
class Pods:
    """Builds pod and container configs the way a kubelet does for a hostNetwork pod."""

    image: str
    log_root: Path
    timeout: float
    stop_timeout: int
    #: POD (shareProcessNamespace: true) or CONTAINER (the kubelet's default).
    pid_mode: api_pb2.NamespaceMode.ValueType = api_pb2.POD
    #: NODE (hostNetwork: no CNI) or POD (a network namespace set up by CNI).
    network_mode: api_pb2.NamespaceMode.ValueType = api_pb2.NODE
    counter: int = 0

    def namespaces(self) -> api_pb2.NamespaceOption:
        return api_pb2.NamespaceOption(
            network=self.network_mode, pid=self.pid_mode, ipc=api_pb2.POD
        )

    def pod_config(self, target: Target) -> api_pb2.PodSandboxConfig:
        """A new pod's config; its log directory is made here, as the kubelet makes it."""
        self.counter += 1
        name = f"bench-{target.label}-{self.counter}"
        uid = uuid.uuid4().hex
        log_dir = self.log_root / f"{POD_NAMESPACE}_{name}_{uid}"
        log_dir.mkdir(parents=True)
        linux = api_pb2.LinuxPodSandboxConfig(
            security_context=api_pb2.LinuxSandboxSecurityContext(
                namespace_options=self.namespaces()
            )
        )
        if target.runtime.cgroup_parent:
            linux.cgroup_parent = target.runtime.cgroup_parent
        # No hostname: the kubelet sets none for hostNetwork pods (the UTS
        # namespace is the host's, and runc refuses to set a hostname in it).
        return api_pb2.PodSandboxConfig(
            metadata=api_pb2.PodSandboxMetadata(
                name=name, uid=uid, namespace=POD_NAMESPACE, attempt=0
            ),
            hostname=name if self.network_mode == api_pb2.POD else "",
            log_directory=str(log_dir),
            labels={"io.kubernetes.pod.name": name, "pouch-bench": "1"},
            linux=linux,
        )

    def container_config(self) -> api_pb2.ContainerConfig:
        return api_pb2.ContainerConfig(
            metadata=api_pb2.ContainerMetadata(name="sleep", attempt=0),
            image=api_pb2.ImageSpec(image=self.image),
            command=["sleep", "1000"],
            log_path="sleep/0.log",
            linux=api_pb2.LinuxContainerConfig(
                security_context=api_pb2.LinuxContainerSecurityContext(
                    namespace_options=self.namespaces()
                )
            ),
        )


@dataclass
class Recorder:
    """Per-RPC samples of one target, plus whole cycles."""

    rpcs: dict[str, common.Samples] = field(
        default_factory=lambda: {rpc: common.Samples() for rpc in RPCS}
    )
    cycle: common.Samples = field(default_factory=common.Samples)


class Cycler:
    """Runs lifecycle iterations on one target, recording every RPC."""

    def __init__(self, target: Target, pods: Pods) -> None:
        self.target = target
        self.pods = pods
        self.record = Recorder()
        self.failures: list[str] = []
        #: The container's exit code after StopContainer in the checked iteration.
        self.stop_exit_code: int | None = None

    def reset(self) -> None:
        self.record = Recorder()
        self.failures = []

    def _call(self, name: str, method: Callable[..., Message], request: Message) -> Message:
        samples = self.record.rpcs[name]
        t0 = time.perf_counter_ns()
        try:
            response = method(request, timeout=self.pods.timeout)
        except Exception as exc:
            samples.errors[common.error_name(exc)] += 1
            raise StepFailed(name, exc) from exc
        elapsed = time.perf_counter_ns() - t0
        samples.latencies_ns.append(elapsed)
        samples.wall_ns += elapsed
        return response

    def once(self, *, check: bool = False) -> int:
        """One iteration; returns the summed RPC time in ns.  Cleans up after a failure."""
        rt = self.target.endpoint.runtime
        config = self.pods.pod_config(self.target)
        container = self.pods.container_config()
        sid = cid = ""
        total = 0
        try:
            run_req = api_pb2.RunPodSandboxRequest(config=config)
            sid = self._call("RunPodSandbox", rt.RunPodSandbox, run_req).pod_sandbox_id
            create_req = api_pb2.CreateContainerRequest(
                pod_sandbox_id=sid, config=container, sandbox_config=config
            )
            cid = self._call("CreateContainer", rt.CreateContainer, create_req).container_id
            self._call(
                "StartContainer", rt.StartContainer, api_pb2.StartContainerRequest(container_id=cid)
            )
            if check:
                self._expect(cid, api_pb2.CONTAINER_RUNNING)
            stop_req = api_pb2.StopContainerRequest(
                container_id=cid, timeout=self.pods.stop_timeout
            )
            self._call("StopContainer", rt.StopContainer, stop_req)
            if check:
                self.stop_exit_code = self._expect(cid, api_pb2.CONTAINER_EXITED).exit_code
            self._call(
                "RemoveContainer",
                rt.RemoveContainer,
                api_pb2.RemoveContainerRequest(container_id=cid),
            )
            cid = ""
            self._call(
                "StopPodSandbox",
                rt.StopPodSandbox,
                api_pb2.StopPodSandboxRequest(pod_sandbox_id=sid),
            )
            self._call(
                "RemovePodSandbox",
                rt.RemovePodSandbox,
                api_pb2.RemovePodSandboxRequest(pod_sandbox_id=sid),
            )
            sid = ""
            # Every RPC of this iteration succeeded: each list ends with its sample.
            total = sum(s.latencies_ns[-1] for s in self.record.rpcs.values())
        except (StepFailed, BadState) as exc:
            self.failures.append(str(exc))
            raise
        finally:
            if cid or sid:
                _force_remove(self.target, cid, sid, self.pods.timeout)
            shutil.rmtree(config.log_directory, ignore_errors=True)
        return total

    def _expect(self, cid: str, state: int) -> api_pb2.ContainerStatus:
        status = self.target.endpoint.runtime.ContainerStatus(
            api_pb2.ContainerStatusRequest(container_id=cid), timeout=self.pods.timeout
        ).status
        if status.state != state:
            raise BadState(
                f"container {cid[:12]} is {api_pb2.ContainerState.Name(status.state)}, expected "
                f"{api_pb2.ContainerState.Name(state)} (exit code {status.exit_code}, "
                f"reason {status.reason!r})"
            )
        return status

    def run(self, count: int) -> common.Samples:
        """``count`` iterations, as a workload of :func:`common.alternate`."""
        samples = self.record.cycle
        out = common.Samples()
        for _ in range(count):
            try:
                elapsed = self.once()
            except (StepFailed, BadState) as exc:
                name = exc.step if isinstance(exc, StepFailed) else "BadState"
                samples.errors[name] += 1
                out.errors[name] += 1
            else:
                samples.latencies_ns.append(elapsed)
                samples.wall_ns += elapsed
                out.latencies_ns.append(elapsed)
                out.wall_ns += elapsed
        return out


def _force_remove(target: Target, cid: str, sid: str, timeout: float) -> None:
    """Untimed clean-up after a failed step; errors are ignored (the world sweeps later)."""
    rt = target.endpoint.runtime
    with contextlib.suppress(grpc.RpcError):
        if cid:
            rt.StopContainer(
                api_pb2.StopContainerRequest(container_id=cid, timeout=0), timeout=timeout
            )
            rt.RemoveContainer(api_pb2.RemoveContainerRequest(container_id=cid), timeout=timeout)
    with contextlib.suppress(grpc.RpcError):
        if sid:
            rt.StopPodSandbox(api_pb2.StopPodSandboxRequest(pod_sandbox_id=sid), timeout=timeout)
            rt.RemovePodSandbox(
                api_pb2.RemovePodSandboxRequest(pod_sandbox_id=sid), timeout=timeout
            )


# ---------------------------------------------------------------------------
# Memory


@dataclass(frozen=True)
class Snapshot:
    """Memory of a runtime's daemon and monitors at one moment."""

    daemon: world_mod.Memory
    monitors: world_mod.Memory

    @property
    def total(self) -> world_mod.Memory:
        return self.daemon + self.monitors

    def to_json(self) -> dict[str, Any]:
        return {
            "daemon": self.daemon.to_json(),
            "monitors": self.monitors.to_json(),
            "total": self.total.to_json(),
        }


def snapshot(target: Target) -> Snapshot:
    """Sum the daemon (and its child processes) and the monitors naming its directories."""
    procs = world_mod.processes()
    monitors = world_mod.runtime_monitors(target.runtime, procs)
    daemon = world_mod.Memory()
    pid = target.runtime.pid
    if pid is not None:
        skip = {p.pid for p in monitors}
        own = [pid] + [p.pid for p in world_mod.descendants(pid, procs) if p.pid not in skip]
        daemon = world_mod.memory_sum(own)
    return Snapshot(daemon, world_mod.memory_sum(p.pid for p in monitors))


@dataclass
class MemoryRound:
    target: str
    pods: int
    running: int = 0
    before: Snapshot | None = None
    loaded: Snapshot | None = None
    after: Snapshot | None = None
    up_s: float = 0.0
    down_s: float = 0.0
    errors: list[str] = field(default_factory=list)

    @property
    def per_pod_pss(self) -> float | None:
        if not self.running or self.loaded is None or self.before is None:
            return None
        return (self.loaded.total.pss - self.before.total.pss) / self.running

    def to_json(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "pods": self.pods,
            "running": self.running,
            "before": self.before.to_json() if self.before else None,
            "loaded": self.loaded.to_json() if self.loaded else None,
            "after": self.after.to_json() if self.after else None,
            "per_pod_pss_bytes": self.per_pod_pss,
            "start_pods_s": round(self.up_s, 3),
            "remove_pods_s": round(self.down_s, 3),
            "errors": self.errors,
        }


def memory_round(
    target: Target, pods: Pods, k: int, *, budget: float, settle: float = 1.0
) -> MemoryRound:
    """Start ``k`` pods with a sleeping container, measure, remove them."""
    result = MemoryRound(target.label, k)
    rt = target.endpoint.runtime
    result.before = snapshot(target)
    running: list[tuple[str, str, str]] = []
    deadline = time.monotonic() + budget
    t0 = time.monotonic()
    try:
        for _ in range(k):
            if time.monotonic() > deadline:
                result.errors.append(f"stopped after {result.running} pods: budget {budget:g} s")
                break
            config = pods.pod_config(target)
            try:
                sid = rt.RunPodSandbox(
                    api_pb2.RunPodSandboxRequest(config=config), timeout=pods.timeout
                ).pod_sandbox_id
                running.append((sid, "", config.log_directory))
                cid = rt.CreateContainer(
                    api_pb2.CreateContainerRequest(
                        pod_sandbox_id=sid, config=pods.container_config(), sandbox_config=config
                    ),
                    timeout=pods.timeout,
                ).container_id
                running[-1] = (sid, cid, config.log_directory)
                rt.StartContainer(
                    api_pb2.StartContainerRequest(container_id=cid), timeout=pods.timeout
                )
            except grpc.RpcError as exc:
                result.errors.append(_details(exc))
                break
            result.running += 1
        result.up_s = time.monotonic() - t0
        if result.running:
            time.sleep(settle)  # let the monitors finish starting up
            result.loaded = snapshot(target)
    finally:
        t0 = time.monotonic()
        for sid, cid, log_dir in running:
            try:
                if cid:
                    rt.StopContainer(
                        api_pb2.StopContainerRequest(container_id=cid, timeout=pods.stop_timeout),
                        timeout=pods.timeout,
                    )
                    rt.RemoveContainer(
                        api_pb2.RemoveContainerRequest(container_id=cid), timeout=pods.timeout
                    )
                rt.StopPodSandbox(
                    api_pb2.StopPodSandboxRequest(pod_sandbox_id=sid), timeout=pods.timeout
                )
                rt.RemovePodSandbox(
                    api_pb2.RemovePodSandboxRequest(pod_sandbox_id=sid), timeout=pods.timeout
                )
            except grpc.RpcError as exc:
                result.errors.append(f"removing {sid[:12]}: {_details(exc)}")
                _force_remove(target, cid, sid, pods.timeout)
            shutil.rmtree(log_dir, ignore_errors=True)
        result.down_s = time.monotonic() - t0
    result.after = snapshot(target)
    return result


# ---------------------------------------------------------------------------
# Setting up: the world, or endpoints


#: Where each runtime keeps per-container state by default: marks for its monitors.
DEFAULT_MARKS: Final = {
    "pouch": ("/run/pouch",),
    "containerd": ("/run/containerd",),
    "cri-o": ("/run/crio", "/var/run/crio"),
}


def discover(endpoint: common.Endpoint) -> world_mod.Runtime:
    """What can be found of an endpoint's daemon: its pid (by its socket) and marks."""
    runtime = world_mod.Runtime(endpoint.label, endpoint.address)
    if not endpoint.address.startswith("unix://"):
        return runtime
    path = endpoint.address.removeprefix("unix://")
    runtime.pid = world_mod.socket_owner(path)
    marks = [path, *DEFAULT_MARKS.get(endpoint.version["runtime_name"], ())]
    if runtime.pid is not None:
        with contextlib.suppress(OSError):
            raw = Path(f"/proc/{runtime.pid}/cmdline").read_bytes()
            args = [a.decode(errors="replace") for a in raw.rstrip(b"\0").split(b"\0")[1:]]
            for arg in args:
                value = arg.partition("=")[2] if arg.startswith("-") else arg
                if value.startswith("/") and value != "/":
                    marks.append(value)
    runtime.marks = tuple(dict.fromkeys(marks))
    return runtime


@contextmanager
def _endpoint_image(args: argparse.Namespace, err: Console) -> Iterator[str]:
    """The image to run: --image, or busybox pushed to a registry started here."""
    if args.image:
        yield args.image
        return
    from benchmarks.image_pull import PinnedRegistry
    from tests.support.images import busybox_image
    from tests.support.registry import push

    with PinnedRegistry(args.registry_port) as registry:
        push(registry, world_mod.BUSYBOX_REPO, "latest", busybox_image())
        ref = registry.ref(world_mod.BUSYBOX_REPO)
        err.print(f"registry {registry.url}: pushed {ref}")
        yield ref


def _pull(target: Target, image: str, timeout: float) -> None:
    target.endpoint.image.PullImage(
        api_pb2.PullImageRequest(image=api_pb2.ImageSpec(image=image)), timeout=timeout
    )


# ---------------------------------------------------------------------------
# Output


def _mib(nbytes: float | None) -> str:
    return "-" if nbytes is None else f"{nbytes / MIB:,.1f}"


def memory_table(rounds: Sequence[MemoryRound], reference: str | None) -> Table:
    table = Table(
        title="memory with K running pods (daemon + monitors)",
        caption=(
            "MiB. PSS from /proc/<pid>/smaps_rollup (shared pages split among their users); "
            "USS counts only private pages, RSS shared pages in full (the JSON has all three "
            "for each part).\n"
            "monitors: pouchd's conmon processes (pod infra + container), containerd's "
            "containerd-shim-runc-v2 (one per pod).\n"
            "+PSS/pod: (total PSS with K pods - total PSS before starting them) / K. "
            "PSS/ref: total PSS / the reference's (last runtime) at the same K.\n"
            "up: time to start the K pods one after the other (RunPodSandbox, CreateContainer, "
            "StartContainer each); down: to stop and remove them. pods: running/asked for.\n"
            "daemon PSS idle: the daemon alone before the round's pods were started."
        ),
        caption_justify="left",
    )
    table.add_column("pods", justify="right", no_wrap=True, min_width=7)
    table.add_column("runtime", no_wrap=True)
    for header in (
        "monitors",
        "daemon PSS",
        "monitors PSS",
        "total PSS",
        "PSS/ref",
        "+PSS/pod",
        "total USS",
        "total RSS",
        "daemon PSS idle",
        "up",
        "down",
    ):
        table.add_column(header, justify="right", no_wrap=True)
    by_k: dict[int, list[MemoryRound]] = {}
    for r in rounds:
        by_k.setdefault(r.pods, []).append(r)
    for index, (k, group) in enumerate(by_k.items()):
        if index:
            table.add_section()
        ref = next((r for r in group if r.target == reference), None)
        for r in group:
            loaded = r.loaded
            if reference is None or r.target == reference:
                versus: Text | str = "ref" if reference else "-"
            elif loaded is None or ref is None or ref.loaded is None:
                versus = "-"
            else:
                versus = common.format_ratio(common.ratio(loaded.total.pss, ref.loaded.total.pss))
            table.add_row(
                Text(f"{r.running}/{k}", style="bold red" if r.errors else ""),
                r.target,
                str(loaded.monitors.processes) if loaded else "-",
                _mib(loaded.daemon.pss if loaded else None),
                _mib(loaded.monitors.pss if loaded else None),
                _mib(loaded.total.pss if loaded else None),
                versus,
                _mib(r.per_pod_pss),
                _mib(loaded.total.uss if loaded else None),
                _mib(loaded.total.rss if loaded else None),
                _mib(r.before.daemon.pss if r.before else None),
                f"{r.up_s:.1f} s",
                f"{r.down_s:.1f} s",
            )
    return table


def _caption(targets: Sequence[Target], args: argparse.Namespace, image: str) -> str:
    lines = []
    for t in targets:
        v = t.endpoint.version
        lines.append(
            f"{t.label} = {t.endpoint.address} ({v['runtime_name']} {v['runtime_version']}, "
            f"CRI {v['runtime_api_version']})"
            + (f", cgroup parent {t.runtime.cgroup_parent}" if t.runtime.cgroup_parent else "")
        )
    lines.append(
        f"{args.iterations} iterations per runtime after {args.warmup} warm-up, alternating in "
        f"blocks of {args.block}: a "
        f"{'CNI-networked' if args.pod_network == 'cni' else 'hostNetwork'} pod "
        f"with one container ({image}, sleep 1000), "
        f"PID namespace {args.pid_namespace}, StopContainer timeout {args.stop_timeout} s."
    )
    lines.append(
        f"Each RPC timed on the client; {CYCLE}: their sum for iterations where all succeeded; "
        f"{common.PERCENTILE_METHOD} percentiles; calls/s = 1/mean."
    )
    if len(targets) > 1:
        lines.append(
            f"p50/ref, p99/ref: divided by the reference's ({targets[-1].label}, the last "
            "runtime) for the same RPC; above 1 is slower."
        )
    return "\n".join(lines)


@contextmanager
def _progress(console: Console, total: int) -> Iterator[Callable[[object, int], None]]:
    if not console.is_terminal:
        yield lambda _key, _count: None
        return
    columns = (TextColumn("measuring"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task("iterations", total=total)
        yield lambda _key, count: progress.advance(task, count)


# ---------------------------------------------------------------------------
# Main


@dataclass
class Outcome:
    targets: list[Target] = field(default_factory=list)
    image: str = ""
    stats: dict[tuple[str, str], common.Stats] = field(default_factory=dict)
    samples: dict[tuple[str, str], common.Samples] = field(default_factory=dict)
    memory: list[MemoryRound] = field(default_factory=list)
    failures: dict[str, list[str]] = field(default_factory=dict)
    leftovers: list[str] | None = None
    world: dict[str, Any] | None = None
    timings: dict[str, float] = field(default_factory=dict)


def _measure(
    targets: list[Target], image: str, log_root: Path, args: argparse.Namespace, err: Console
) -> Outcome:
    """Preflight, latency, memory: everything that talks to the runtimes."""
    outcome = Outcome(targets=targets, image=image)
    pid_mode = api_pb2.POD if args.pid_namespace == "pod" else api_pb2.CONTAINER
    network_mode = api_pb2.POD if args.pod_network == "cni" else api_pb2.NODE
    pods = Pods(image, log_root, args.timeout, args.stop_timeout, pid_mode, network_mode)
    cyclers = {t.label: Cycler(t, pods) for t in targets}

    for target in targets:
        try:
            _pull(target, image, args.timeout)
            cyclers[target.label].once(check=True)
        except (grpc.RpcError, StepFailed, BadState) as exc:
            why = _details(exc) if isinstance(exc, grpc.RpcError) else str(exc)
            raise PreflightError(f"{target.label} cannot run the workload: {why}") from exc
        code = cyclers[target.label].stop_exit_code
        if code != 128 + 15:
            err.print(
                f"[yellow]warning:[/] on {target.label}, sleep exited with {code} after "
                f"StopContainer, not 143 (SIGTERM): StopContainer includes its "
                f"{args.stop_timeout} s timeout (--pid-namespace container makes sleep PID 1, "
                "which ignores SIGTERM)"
            )
        cyclers[target.label].reset()
    err.print("preflight: every runtime ran one checked iteration")

    t0 = time.monotonic()
    workloads = {t.label: cyclers[t.label].run for t in targets}
    if args.warmup:
        common.alternate(workloads, n=args.warmup, block=args.block)
    for cycler in cyclers.values():
        cycler.reset()
    with _progress(err, args.iterations * len(targets)) as on_block:
        common.alternate(workloads, n=args.iterations, block=args.block, on_block=on_block)
    outcome.timings["latency_s"] = time.monotonic() - t0
    err.print(f"latency: {outcome.timings['latency_s']:.1f} s")

    for rpc in (*RPCS, CYCLE):
        for target in targets:
            record = cyclers[target.label].record
            samples = record.cycle if rpc == CYCLE else record.rpcs[rpc]
            outcome.samples[rpc, target.label] = samples
            outcome.stats[rpc, target.label] = common.Stats.from_samples(samples)
    outcome.failures = {label: c.failures for label, c in cyclers.items() if c.failures}

    t0 = time.monotonic()
    for k in args.pods_for_memory:
        for target in targets:
            r = memory_round(target, pods, k, budget=args.memory_budget)
            outcome.memory.append(r)
            loaded = r.loaded
            err.print(
                f"memory: {target.label} with {r.running}/{k} pods: total PSS "
                f"{_mib(loaded.total.pss if loaded else None)} MiB "
                f"({loaded.monitors.processes if loaded else 0} monitors), up {r.up_s:.1f} s, "
                f"down {r.down_s:.1f} s"
                + (f", errors: {escape('; '.join(r.errors))}" if r.errors else "")
            )
    outcome.timings["memory_s"] = time.monotonic() - t0
    return outcome


def _connect(runtimes: Sequence[world_mod.Runtime], timeout: float) -> list[Target]:
    targets = []
    for runtime in runtimes:
        spec = common.EndpointSpec(runtime.address, runtime.label)
        targets.append(Target(common.connect(spec, timeout=min(timeout, 10.0)), runtime))
    return targets


def run(args: argparse.Namespace) -> int:
    err = Console(stderr=True)
    if not err.is_terminal:
        err.width = LOG_WIDTH  # progress lines in a log: do not wrap them at 80 columns
    out = err if args.json == "-" else Console()
    if not out.is_terminal:
        out.width = LOG_WIDTH
    started = common.now()
    t_start = time.monotonic()
    outcome: Outcome
    world_info: dict[str, Any] | None = None
    leftovers: list[str] | None = None

    try:
        if args.world:
            w = world_mod.World(
                containerd=not args.no_containerd, log=lambda m: err.print(escape(m))
            )
            try:
                with w:
                    world_info = {
                        "base": str(w.base),
                        "registry": w.registry.url if w.registry else None,
                        "busybox": w.busybox_ref,
                        "pause": w.pause_ref,
                        "cni_network": w.cni_network,
                        "bridge": w.bridge,
                    }
                    targets = _connect(w.runtimes, args.timeout)
                    try:
                        assert w.base is not None
                        log_root = w.base / "logs"
                        outcome = _measure(targets, w.busybox_ref, log_root, args, err)
                    finally:
                        for t in targets:
                            t.endpoint.close()
            finally:
                leftovers = w.leftovers()
        else:
            with ExitStack() as stack:
                specs = [common.parse_endpoint(a) for a in args.endpoint]
                endpoints = []
                for spec in specs:
                    endpoint = common.connect(spec, timeout=min(args.timeout, 10.0))
                    stack.callback(endpoint.close)
                    endpoints.append(endpoint)
                common.default_labels(endpoints, specs)
                labels = [e.label for e in endpoints]
                if len(set(labels)) != len(labels):
                    err.print(f"[bold red]error:[/] endpoint labels must differ: {labels}")
                    return 2
                targets = [Target(e, discover(e)) for e in endpoints]
                for t in targets:
                    if t.runtime.pid is None and args.pods_for_memory:
                        err.print(
                            f"[yellow]warning:[/] cannot find the daemon of {t.label} "
                            "(not a local unix socket, or not root): its memory is not measured"
                        )
                image = stack.enter_context(_endpoint_image(args, err))
                log_root = Path(tempfile.mkdtemp(prefix="pouch-bench-logs-"))
                stack.callback(shutil.rmtree, log_root, True)
                outcome = _measure(targets, image, log_root, args, err)
    except world_mod.WorldError as exc:
        err.print(f"[bold red]error:[/] {escape(str(exc))}")
        if args.world and not args.no_containerd:
            err.print("(--no-containerd measures pouchd alone)")
        if leftovers:
            err.print(f"[bold red]left on the host:[/] {escape(str(leftovers))}")
        return 2
    except common.ConnectError as exc:
        err.print(f"[bold red]error:[/] {escape(str(exc))}")
        return 2
    except PreflightError as exc:
        err.print(f"[bold red]error:[/] {escape(str(exc))}")
        if leftovers:
            err.print(f"[bold red]left on the host:[/] {escape(str(leftovers))}")
        return 2
    outcome.leftovers = leftovers
    outcome.world = world_info
    outcome.timings["total_s"] = time.monotonic() - t_start
    return _report(outcome, args, started, out, err)


def _report(
    outcome: Outcome,
    args: argparse.Namespace,
    started: datetime.datetime,
    out: Console,
    err: Console,
) -> int:
    targets = outcome.targets
    reference = targets[-1].label if len(targets) > 1 else None
    out.print(
        common.latency_table(
            "pod lifecycle: CRI RPC latency (client-side)",
            outcome.stats,
            case_header="RPC",
            target_header="runtime",
            reference=reference,
            caption=_caption(targets, args, outcome.image),
        )
    )
    if outcome.memory:
        out.print(memory_table(outcome.memory, reference))
    failed = False
    for (rpc, label), s in outcome.stats.items():
        if s.error_count and rpc != CYCLE:
            failed = True
            kinds = ", ".join(f"{kind} x{count}" for kind, count in s.errors.items())
            err.print(f"[bold red]errors[/] {escape(f'{rpc} @ {label}: {kinds}')}")
    for label, messages in outcome.failures.items():
        for message in dict.fromkeys(messages):
            err.print(f"  {escape(label)}: {escape(message)}")
    if any(r.errors for r in outcome.memory):
        failed = True
    if outcome.leftovers is not None:
        if outcome.leftovers:
            failed = True
            err.print("[bold red]the world left things on the host:[/]")
            for item in outcome.leftovers:
                err.print(f"  {escape(item)}")
        else:
            err.print(
                "host check: nothing left (processes, mounts, cgroups, netns, bridge, "
                "iptables rules, directories)"
            )
    err.print(
        "wall time: "
        + ", ".join(
            f"{key.removesuffix('_s')} {value:.1f} s" for key, value in outcome.timings.items()
        )
    )

    if args.json:
        results: list[dict[str, Any]] = []
        for (rpc, label), s in outcome.stats.items():
            entry: dict[str, Any] = {"case": rpc, "target": label, "stats": s.to_json()}
            if reference is not None:
                ref = outcome.stats[rpc, reference]
                entry["vs_reference"] = {
                    "p50": common.ratio(s.p50_ns, ref.p50_ns),
                    "p99": common.ratio(s.p99_ns, ref.p99_ns),
                }
            if args.raw:
                entry["latencies_ns"] = outcome.samples[rpc, label].latencies_ns
            results.append(entry)
        params = {
            "iterations": args.iterations,
            "warmup": args.warmup,
            "block": args.block,
            "stop_timeout_s": args.stop_timeout,
            "pid_namespace": args.pid_namespace,
            "timeout_s": args.timeout,
            "pods_for_memory": list(args.pods_for_memory),
            "image": outcome.image,
            "world": args.world,
            "reference": reference,
            "network": (
                "CNI (bridge + host-local, the same conflist for every runtime)"
                if args.pod_network == "cni"
                else "host (NamespaceOption.network = NODE)"
            ),
        }
        document = common.build_report(
            "lifecycle",
            params=params,
            targets=[
                {
                    **t.endpoint.describe(),
                    "pid": t.runtime.pid,
                    "cgroup_parent": t.runtime.cgroup_parent,
                }
                for t in targets
            ],
            results=results,
            started=started,
        )
        document["memory"] = [r.to_json() for r in outcome.memory]
        document["world"] = outcome.world
        document["leftovers"] = outcome.leftovers
        document["wall_s"] = {k: round(v, 3) for k, v in outcome.timings.items()}
        common.write_report(args.json, document)
        if args.json != "-":
            err.print(f"wrote {args.json}")
    return 1 if failed else 0


# ---------------------------------------------------------------------------
# Command line


def _pod_counts(text: str) -> tuple[int, ...]:
    if text.strip() in ("", "0", "none"):
        return ()
    try:
        counts = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of integers: {text!r}") from None
    if any(c < 1 for c in counts):
        raise argparse.ArgumentTypeError(f"pod counts must be at least 1: {text!r}")
    return counts


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.lifecycle",
        description=(
            "Measure the pod and container lifecycle (RunPodSandbox ... RemovePodSandbox, each "
            "RPC on its own) and the memory of runtimes with K running pods, side by side. "
            "With --world, builds a private registry, pouchd and containerd (the reference) "
            "and removes them afterwards; otherwise drives the --endpoint runtimes (the LAST "
            "is the reference)."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--world",
        action="store_true",
        help="build and tear down a local world: registry, pouchd, containerd (needs root)",
    )
    parser.add_argument(
        "--no-containerd",
        action="store_true",
        help="with --world: pouchd only",
    )
    parser.add_argument(
        "--endpoint",
        action="append",
        default=[],
        metavar="[LABEL=]ADDRESS",
        help="CRI endpoint (without --world), repeatable; the last one is the reference",
    )
    parser.add_argument(
        "-n",
        "--iterations",
        type=common.positive_int,
        default=None,
        help=f"measured iterations per runtime (default {DEFAULT_ITERATIONS}, "
        f"{QUICK_ITERATIONS} with --quick)",
    )
    parser.add_argument(
        "--warmup",
        type=common.non_negative_int,
        default=None,
        help=f"discarded iterations per runtime first (default {DEFAULT_WARMUP}, "
        f"{QUICK_WARMUP} with --quick)",
    )
    parser.add_argument(
        "--block", type=common.positive_int, default=5, help="iterations per turn when alternating"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"CI smoke run: -n {QUICK_ITERATIONS} --warmup {QUICK_WARMUP} "
        f"--pods-for-memory {','.join(map(str, QUICK_PODS))} unless given",
    )
    parser.add_argument(
        "--pods-for-memory",
        type=_pod_counts,
        default=None,
        metavar="K[,K...]",
        help=f"running pods to measure memory at (default "
        f"{','.join(map(str, DEFAULT_PODS))}; 0: skip)",
    )
    parser.add_argument(
        "--memory-budget",
        type=float,
        default=300.0,
        help="seconds to start the pods of one memory round before giving up",
    )
    parser.add_argument(
        "--pid-namespace",
        choices=("pod", "container"),
        default="pod",
        help="the containers' PID namespace: 'pod' (shareProcessNamespace: the pod's infra "
        "process is PID 1, and sleep dies of StopContainer's SIGTERM) or 'container' (the "
        "kubelet's default: sleep is PID 1, ignores SIGTERM, and StopContainer waits its "
        "timeout)",
    )
    parser.add_argument(
        "--pod-network",
        choices=("host", "cni"),
        default="host",
        help="'host': hostNetwork pods, no CNI; 'cni': each pod gets a network namespace "
        "and a CNI bridge network (with --world, the same conflist for both runtimes)",
    )
    parser.add_argument(
        "--stop-timeout",
        type=common.non_negative_int,
        default=2,
        help="StopContainer's timeout, seconds",
    )
    parser.add_argument(
        "--timeout", type=float, default=60.0, help="deadline of every CRI call, seconds"
    )
    parser.add_argument(
        "--image",
        help="without --world: the image to run (each endpoint must pull it); default: "
        "busybox pushed to a registry started on 127.0.0.1:--registry-port",
    )
    parser.add_argument(
        "--registry-port",
        type=int,
        default=DEFAULT_REGISTRY_PORT,
        help="without --world and --image: port of the registry started on 127.0.0.1",
    )
    parser.add_argument("--json", metavar="PATH", help="write a JSON report here ('-': stdout)")
    parser.add_argument(
        "--raw", action="store_true", help="include every latency sample in the JSON report"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.world == bool(args.endpoint):
        parser.error("give either --world or at least one --endpoint")
    if args.no_containerd and not args.world:
        parser.error("--no-containerd goes with --world")
    if args.iterations is None:
        args.iterations = QUICK_ITERATIONS if args.quick else DEFAULT_ITERATIONS
    if args.warmup is None:
        args.warmup = QUICK_WARMUP if args.quick else DEFAULT_WARMUP
    if args.pods_for_memory is None:
        args.pods_for_memory = QUICK_PODS if args.quick else DEFAULT_PODS
    if args.timeout <= 0:
        parser.error("--timeout must be positive")
    try:
        return run(args)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
