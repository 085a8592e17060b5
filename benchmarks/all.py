"""Every benchmark in one world, pouchd and containerd side by side: one table, one JSON.

    sudo python -m benchmarks.all                 # full run, about 7 minutes on 2 vCPUs
    sudo python -m benchmarks.all --quick         # CI smoke run, about 40 seconds
    scripts/nox -s bench [-- --quick]             # the same, with packages and venv set up

One :class:`benchmarks._world.World` (a registry on loopback, a private pouchd,
a private containerd with its CRI plugin, one CNI conflist for both) is built,
measured and torn down; every workload alternates between the two runtimes in
blocks (:func:`benchmarks._common.alternate`), after discarded warm-up rounds,
so that machine noise lands on both alike.  The phases, in order:

1. **memory** (first, so that it does not depend on what the other phases
   left in the daemons' heaps): PSS and RSS of the daemon plus its monitors
   (conmon / containerd-shim-runc-v2) with 10 and 100 running pods of one
   container each (10 only with ``--quick``), one runtime at a time
   (:func:`benchmarks.lifecycle.memory_round`).
2. **image pull**: cold ``PullImage`` of busybox (one layer, about 1 MB) and
   of a big image (busybox plus 5 layers of incompressible data, 200 MiB; 30 MiB
   with ``--quick``), each after ``RemoveImage`` of both, with the floors of
   :mod:`benchmarks.image_pull` interleaved: download of the big image's blobs
   over HTTP, pouch's ``apply_layer`` of its layers, ``dd`` of its size.
3. **unary RPCs**: ``Version``, ``Status``, ``ListContainers`` and
   ``ListPodSandbox`` with 10 pods of 1 running container each, then again
   after extending to 1,000 containers (100 with ``--quick``): 10 per pod, the
   new ones created but not started (``CreateContainer`` only), in 100 pods.
   In that state, the memory of the daemons, their monitors and the pods' own
   processes (``runc init`` of every created container included) is read too.
4. **pod lifecycle**: ``RunPodSandbox``, ``StopPodSandbox``, ``RemovePodSandbox``
   of an empty pod, with the host network, then with the CNI bridge network.
5. **container lifecycle**: ``CreateContainer``, ``StartContainer``,
   ``StopContainer``, ``RemoveContainer`` of busybox ``sleep`` in a standing
   host-network pod, interleaved with the floors of :mod:`benchmarks.runc_floor`:
   the same steps with runc alone, and with conmon running ``runc create``.
6. **ExecSync** of ``true`` in a running container, interleaved with
   ``runc exec true``.
7. **20 concurrent pod starts**: 20 ``RunPodSandbox`` (CNI network) from 20
   threads released at once; the wall time of the burst and every call's latency.

Pods use PID namespace ``POD`` (shareProcessNamespace: ``sleep`` dies of
StopContainer's SIGTERM instead of waiting out the timeout as a PID 1 would).
pouchd logs its own duration of every call that changes state; for the
measured windows of phases 4 to 7 they are summarised in the JSON
(``details.pouchd_server_side_ms``), to split a client-side figure into the
daemon's work and the way there and back.

Output: ONE table on stdout (rows = workload/metric; columns = p50 and p99 of
each runtime and their ratios, pouch/containerd), the JSON of everything in
``bench-results.json`` (``--json PATH``), optionally the table as Markdown
(``--markdown PATH``).  Exit status: 0 if everything succeeded, 1 if any
operation failed or the world left something on the host (the table and JSON
are still produced), 2 if the world cannot start.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import multiprocessing
import re
import shutil
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal

import grpc
from cri_api.v1 import api_pb2
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from benchmarks import _common as common
from benchmarks import _world as world_mod
from benchmarks import image_pull, rpc_latency
from benchmarks import lifecycle as lc
from benchmarks import runc_floor as floor_mod

if TYPE_CHECKING:
    import datetime
    from collections.abc import Callable, Iterable, Sequence

    from google.protobuf.message import Message

MIB: Final = 1 << 20
MB: Final = 1_000_000
LOG_WIDTH: Final = 160
DEFAULT_JSON: Final = "bench-results.json"
PHASES: Final = ("pull", "rpc", "pods", "containers", "exec", "concurrent", "memory")
UNARY_RPCS: Final = ("Version", "Status", "ListContainers", "ListPodSandbox")
SMALL_PODS: Final = 10
PER_POD: Final = 10
#: Threads that create the pods and containers the List RPCs see (setup, untimed).
FILL_THREADS: Final = 4
EXEC_TIMEOUT: Final = 10


@dataclass(frozen=True)
class Plan:
    """How much of each workload a run does."""

    rpc_calls: int = 1000
    rpc_calls_loaded: int = 300
    rpc_warmup: int = 50
    rpc_block: int = 50
    #: Containers the List RPCs see in their second round (10 per pod).
    containers_loaded: int = 1000
    pod_iterations: int = 100
    container_iterations: int = 100
    exec_iterations: int = 200
    warmup: int = 5
    block: int = 5
    pull_iterations: int = 5
    pull_warmup: int = 1
    big_mb: int = 200
    big_layers: int = 5
    burst_size: int = 20
    burst_rounds: int = 5
    burst_warmup: int = 1
    memory_pods: tuple[int, ...] = (10, 100)
    memory_budget: float = 300.0
    stop_timeout: int = 2


FULL: Final = Plan()
QUICK: Final = Plan(
    rpc_calls=200,
    rpc_calls_loaded=100,
    rpc_warmup=20,
    containers_loaded=100,
    pod_iterations=10,
    container_iterations=10,
    exec_iterations=20,
    warmup=2,
    pull_iterations=2,
    pull_warmup=0,
    big_mb=30,
    burst_rounds=1,
    burst_warmup=0,
    memory_pods=(10,),
)


# ---------------------------------------------------------------------------
# Results


@dataclass
class Row:
    """One line of the table.

    ``latency``: client-side durations per runtime; ``floor``: one measurement
    that is no runtime's (runc alone, a download, dd), shown under every
    runtime; ``memory``: bytes per runtime.
    """

    section: str
    metric: str
    kind: Literal["latency", "floor", "memory"]
    stats: dict[str, common.Stats] = field(default_factory=dict)
    floor: common.Stats | None = None
    memory: dict[str, int] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def p(self, label: str, which: Literal["p50", "p99"]) -> float | None:
        if self.kind == "memory":
            return self.memory.get(label) if which == "p50" else None
        stats = self.floor if self.kind == "floor" else self.stats.get(label)
        if stats is None:
            return None
        return stats.p50_ns if which == "p50" else stats.p99_ns

    @property
    def errors(self) -> dict[str, dict[str, int]]:
        found = {label: s.errors for label, s in self.stats.items() if s.errors}
        if self.floor is not None and self.floor.errors:
            found["floor"] = self.floor.errors
        return found

    def to_json(self, labels: Sequence[str]) -> dict[str, Any]:
        entry: dict[str, Any] = {"section": self.section, "metric": self.metric, "kind": self.kind}
        if self.kind == "latency":
            entry["targets"] = {label: s.to_json() for label, s in self.stats.items()}
        elif self.kind == "floor":
            entry["floor"] = self.floor.to_json() if self.floor else None
        else:
            entry["bytes"] = self.memory
        if len(labels) > 1 and self.kind != "floor":
            first, last = labels[0], labels[-1]
            entry["ratio"] = {
                "p50": common.ratio(self.p(first, "p50"), self.p(last, "p50")),
                "p99": common.ratio(self.p(first, "p99"), self.p(last, "p99")),
            }
        entry.update(self.extra)
        return entry


@dataclass
class Results:
    rows: list[Row] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    wall_s: dict[str, float] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)

    def latency(
        self, section: str, metric: str, samples: dict[str, common.Samples], **extra: Any
    ) -> Row:
        row = Row(
            section,
            metric,
            "latency",
            stats={label: common.Stats.from_samples(s) for label, s in samples.items()},
            extra=extra,
        )
        self.rows.append(row)
        return row

    def floor(self, section: str, metric: str, samples: common.Samples, **extra: Any) -> Row:
        row = Row(section, metric, "floor", floor=common.Stats.from_samples(samples), extra=extra)
        self.rows.append(row)
        return row

    def memory(self, section: str, metric: str, values: dict[str, int], **extra: Any) -> Row:
        row = Row(section, metric, "memory", memory=values, extra=extra)
        self.rows.append(row)
        return row


def _cells(row: Row, labels: Sequence[str]) -> list[str]:
    """The text of a row's value cells: p50 and p99 per runtime, then the ratios."""
    cells: list[str] = []
    for label in labels:
        if row.kind == "memory":
            value = row.memory.get(label)
            cells += ["-" if value is None else f"{value / MIB:,.1f} MiB", ""]
        else:
            cells += [
                common.format_duration(row.p(label, "p50")),
                common.format_duration(row.p(label, "p99")),
            ]
    if len(labels) > 1:
        if row.kind == "floor":
            cells += ["floor", "floor"]
        else:
            for which in ("p50", "p99"):
                r = common.ratio(row.p(labels[0], which), row.p(labels[-1], which))
                cells.append("" if r is None and which == "p99" else _ratio_text(r))
    return cells


def _ratio_text(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _headers(labels: Sequence[str]) -> list[str]:
    headers = ["workload / metric"]
    for label in labels:
        headers += [f"{label} p50", f"{label} p99"]
    if len(labels) > 1:
        headers += ["ratio p50", "ratio p99"]
    return headers


def _sections(rows: Sequence[Row]) -> list[tuple[str, list[Row]]]:
    out: list[tuple[str, list[Row]]] = []
    for row in rows:
        if not out or out[-1][0] != row.section:
            out.append((row.section, []))
        out[-1][1].append(row)
    return out


def render_table(rows: Sequence[Row], labels: Sequence[str], caption: str) -> Table:
    table = Table(title="pouchd vs containerd, one world", caption=caption, caption_justify="left")
    for index, header in enumerate(_headers(labels)):
        if index == 0:
            table.add_column(header, overflow="fold", ratio=1)
        else:
            table.add_column(header, justify="right", no_wrap=True)
    for index, (section, group) in enumerate(_sections(rows)):
        if index:
            table.add_section()
        table.add_row(Text(section, style="bold"))
        for row in group:
            cells: list[str | Text] = list(_cells(row, labels))
            if len(labels) > 1 and row.kind != "floor":
                for i in (-2, -1):
                    text = cells[i]
                    assert isinstance(text, str)
                    value = float(text[:-1]) if text.endswith("x") else None
                    cells[i] = common.format_ratio(value) if value is not None else text
            name = Text("  " + row.metric, style="bold red" if row.errors else "")
            if row.kind == "floor":
                name.stylize("italic")
            table.add_row(name, *cells)
    return table


def render_markdown(rows: Sequence[Row], labels: Sequence[str]) -> str:
    headers = _headers(labels)
    lines = [
        "| " + " | ".join(headers) + " |",
        "| --- |" + " ---: |" * (len(headers) - 1),
    ]
    for section, group in _sections(rows):
        lines.append(f"| **{section}** |" + " |" * (len(headers) - 1))
        for row in group:
            name = row.metric + (" (errors)" if row.errors else "")
            if row.kind == "floor":
                name = f"*{name}*"
            lines.append("| " + " | ".join([name, *_cells(row, labels)]) + " |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------
# Timing CRI calls step by step


class StepFailed(Exception):
    def __init__(self, step: str, exc: BaseException) -> None:
        super().__init__(f"{step}: {lc._details(exc)}")
        self.step = step


class Steps:
    """Per-step samples of one workload on one runtime."""

    def __init__(self, names: Iterable[str], timeout: float) -> None:
        self.names = tuple(names)
        self.timeout = timeout
        self.samples: dict[str, common.Samples] = {}
        self.failures: list[str] = []
        self.reset()

    def reset(self) -> None:
        self.samples = {name: common.Samples() for name in self.names}
        self.failures = []

    def call(self, name: str, method: Callable[..., Message], request: Message) -> Any:
        t0 = time.perf_counter_ns()
        try:
            response = method(request, timeout=self.timeout)
        except Exception as exc:
            self.samples[name].errors[common.error_name(exc)] += 1
            raise StepFailed(name, exc) from exc
        self.add(name, time.perf_counter_ns() - t0)
        return response

    def add(self, name: str, ns: int) -> None:
        samples = self.samples[name]
        samples.latencies_ns.append(ns)
        samples.wall_ns += ns

    def last(self, *names: str) -> int:
        return sum(self.samples[name].latencies_ns[-1] for name in names)

    def failed(self, exc: BaseException, out: common.Samples) -> None:
        self.failures.append(str(exc))
        out.errors[exc.step if isinstance(exc, StepFailed) else type(exc).__name__] += 1


def _alternate(
    b: Bench,
    window: str,
    workloads: dict[str, Callable[[int], common.Samples]],
    resets: Iterable[Callable[[], None]],
    *,
    n: int,
    block: int,
    warmup: int,
) -> None:
    """Warm up (alternated, discarded), reset every recorder, then measure alternated.

    pouchd's own durations of the measured calls go to the details as ``window``.
    """
    if warmup:
        common.alternate(workloads, n=warmup, block=block)
    for reset in resets:
        reset()
    start = b.pouchd_log_size()
    common.alternate(workloads, n=n, block=block)
    b.pouchd_server_side(window, start)


#: pouchd's line for each call it answers (logfmt; Version, Status and the Lists
#: are logged at debug level only, so they do not show up at the default level).
RPC_LINE: Final = re.compile(rb"event=rpc rpc=(\w+) code=(\w+) duration_ms=([0-9.]+)")


# ---------------------------------------------------------------------------
# The run


@dataclass
class Bench:
    plan: Plan
    world: world_mod.World
    targets: list[lc.Target]
    err: Console
    results: Results
    log_root: Path
    timeout: float

    @property
    def labels(self) -> list[str]:
        return [t.label for t in self.targets]

    def pods(self, network: Literal["host", "cni"] = "host") -> lc.Pods:
        return lc.Pods(
            self.world.busybox_ref,
            self.log_root,
            self.timeout,
            self.plan.stop_timeout,
            api_pb2.POD,
            api_pb2.NODE if network == "host" else api_pb2.POD,
        )

    def log(self, message: str) -> None:
        self.err.print(escape(message))

    def _pouchd_log(self) -> Path | None:
        for t in self.targets:
            if t.endpoint.version["runtime_name"] == "pouch" and t.runtime.log_path:
                return t.runtime.log_path
        return None

    def pouchd_log_size(self) -> int:
        path = self._pouchd_log()
        try:
            return path.stat().st_size if path else 0
        except OSError:
            return 0

    def pouchd_server_side(self, window: str, start: int) -> None:
        """Summarise pouchd's logged durations of the calls since ``start`` (bytes)."""
        path = self._pouchd_log()
        if path is None:
            return
        with contextlib.suppress(OSError), path.open("rb") as f:
            f.seek(start)
            text = f.read()
            per_rpc: dict[str, list[float]] = {}
            for rpc, code, ms in RPC_LINE.findall(text):
                if code == b"OK":
                    per_rpc.setdefault(rpc.decode(), []).append(float(ms))
            summary = {}
            for rpc, values in per_rpc.items():
                values.sort()
                summary[rpc] = {
                    "n": len(values),
                    "p50_ms": common.percentile(values, 50),
                    "p99_ms": common.percentile(values, 99),
                }
            self.results.details.setdefault("pouchd_server_side_ms", {})[window] = summary

    def fail(self, where: str, messages: Iterable[str]) -> None:
        for message in dict.fromkeys(messages):
            self.results.failures.append(f"{where}: {message}")


def container_config(
    pods: lc.Pods, name: str, attempt: int = 0, command: Sequence[str] = ("sleep", "100000")
) -> api_pb2.ContainerConfig:
    return api_pb2.ContainerConfig(
        metadata=api_pb2.ContainerMetadata(name=name, attempt=attempt),
        image=api_pb2.ImageSpec(image=pods.image),
        command=list(command),
        log_path=f"{name}/{attempt}.log",
        linux=api_pb2.LinuxContainerConfig(
            security_context=api_pb2.LinuxContainerSecurityContext(
                namespace_options=pods.namespaces()
            )
        ),
    )


def _remove_pod(
    target: lc.Target,
    sid: str,
    log_dir: str,
    timeout: float,
    errors: list[str] | None = None,
) -> None:
    """Stop and remove a pod (its containers go with it), untimed.

    A failure is appended to ``errors`` (a clean-up that fails is a finding too),
    then RemovePodSandbox is tried once more.
    """
    rt = target.endpoint.runtime
    t0 = time.monotonic()
    try:
        rt.StopPodSandbox(api_pb2.StopPodSandboxRequest(pod_sandbox_id=sid), timeout=timeout)
        rt.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id=sid), timeout=timeout)
    except grpc.RpcError as exc:
        if errors is not None:
            errors.append(
                f"removing pod {sid[:12]} (untimed) failed after "
                f"{time.monotonic() - t0:.1f} s: {lc._details(exc)}"
            )
        with contextlib.suppress(grpc.RpcError):
            rt.RemovePodSandbox(
                api_pb2.RemovePodSandboxRequest(pod_sandbox_id=sid), timeout=timeout
            )
    finally:
        if log_dir:
            shutil.rmtree(log_dir, ignore_errors=True)


# -- 1. image pull


def phase_pull(b: Bench) -> None:
    plan, world = b.plan, b.world
    registry = world.registry
    assert registry is not None
    assert world.base is not None
    t0 = time.monotonic()
    big = image_pull.big_image(total_mb=plan.big_mb, layers=plan.big_layers)
    small = image_pull.busybox_image()
    tag = f"{plan.big_mb}m-{plan.big_layers}l"
    image_pull.push(registry, image_pull.BIG_REPO, tag, big, http_timeout=300)
    images = [
        image_pull.BenchImage(
            image_pull.SMALL,
            world_mod.BUSYBOX_REPO,
            "latest",
            world.busybox_ref,
            small,
        ),
        image_pull.BenchImage(
            image_pull.BIG, image_pull.BIG_REPO, tag, registry.ref(image_pull.BIG_REPO, tag), big
        ),
    ]
    b.log(f"pull: big image built and pushed in {time.monotonic() - t0:.1f} s")
    refs = [image.ref for image in images]
    timeout = 600.0
    scratch = world.base
    dd_mib = plan.big_mb + 2
    unpack = image_pull.Unpack(big, scratch)
    big_bench = images[1]
    try:
        with ProcessPoolExecutor(
            max_workers=1, mp_context=multiprocessing.get_context("spawn")
        ) as pool:
            pool.submit(image_pull._worker_ready).result()
            download_args = (registry.url, big_bench.paths, image_pull.DEFAULT_DOWNLOAD_STREAMS)

            def download() -> int:
                return pool.submit(image_pull._download_job, *download_args).result()

            workloads: dict[tuple[str, str], Callable[[int], common.Samples]] = {}
            for image in images:
                for t in b.targets:
                    op = functools.partial(
                        image_pull._pull_once, t.endpoint, image, refs, timeout, registry
                    )
                    workloads[image.case, t.label] = functools.partial(image_pull._measure, op)
            workloads[image_pull.DOWNLOAD, "floor"] = functools.partial(
                image_pull._measure, download
            )
            workloads[image_pull.UNPACK, "floor"] = functools.partial(image_pull._measure, unpack)
            workloads[image_pull.DISK, "floor"] = functools.partial(
                image_pull._measure, functools.partial(image_pull._dd_once, scratch, dd_mib)
            )
            samples = common.alternate(
                workloads, n=plan.pull_iterations, block=1, warmup=plan.pull_warmup
            )
    finally:
        # The workloads below run busybox: put it back wherever a pull removed it.
        for t in b.targets:
            for ref in refs[1:]:
                with contextlib.suppress(Exception):
                    image_pull._remove(t.endpoint, ref, timeout)
            lc._pull(t, world.busybox_ref, timeout)

    section = "image pull, cold (RemoveImage first)"
    nbytes = {image.case: image.transfer_bytes for image in images}
    for image in images:
        name = "busybox" if image.case == image_pull.SMALL else "big image"
        per_target = {t.label: samples[image.case, t.label] for t in b.targets}
        stats = {label: common.Stats.from_samples(s) for label, s in per_target.items()}
        b.results.latency(
            section,
            f"PullImage {name} ({len(image.image.layers)} layer"
            f"{'s' if len(image.image.layers) > 1 else ''}, {nbytes[image.case] / MB:.1f} MB)",
            per_target,
            bytes=nbytes[image.case],
            mb_per_s={
                label: image_pull._rates(nbytes[image.case], s) for label, s in stats.items()
            },
        )
    floors = {
        image_pull.DOWNLOAD: (
            f"floor: download its blobs (HTTP, {image_pull.DEFAULT_DOWNLOAD_STREAMS} streams)",
            big_bench.transfer_bytes,
        ),
        image_pull.UNPACK: (
            f"floor: unpack its layers (apply_layer, 1 thread, "
            f"{unpack.uncompressed_bytes / MB:.0f} MB tar)",
            unpack.uncompressed_bytes,
        ),
        image_pull.DISK: (f"floor: disk write {dd_mib} MiB (dd, fsync)", dd_mib * MIB),
    }
    for case, (metric, size) in floors.items():
        s = samples[case, "floor"]
        b.results.floor(
            section,
            metric,
            s,
            bytes=size,
            mb_per_s=image_pull._rates(size, common.Stats.from_samples(s)),
        )
    for (case, label), s in samples.items():
        if s.errors:
            b.fail(f"{case} @ {label}", [f"{k} x{v}" for k, v in s.errors.items()])


# -- 2. unary RPCs, with 10 and with many containers


@dataclass
class PodRecord:
    sid: str
    config: api_pb2.PodSandboxConfig
    containers: list[str] = field(default_factory=list)


def _fill(
    b: Bench,
    target: lc.Target,
    pods: lc.Pods,
    records: list[PodRecord],
    *,
    total_pods: int,
    per_pod: int,
    start: bool,
) -> list[PodRecord]:
    """Bring ``target`` to ``total_pods`` pods of ``per_pod`` containers (setup, untimed).

    Existing pods get containers added; new pods are run.  Containers are
    started only with ``start``.  Pods are filled in parallel threads, each
    pod's containers one after the other (a kubelet's pod workers do the same).
    Returns every pod, with what was made in it even after a failure.
    """
    rt = target.endpoint.runtime
    todo = list(records)
    for _ in range(total_pods - len(records)):
        todo.append(PodRecord("", pods.pod_config(target)))  # configs made in this thread
    errors: list[str] = []
    lock = threading.Lock()

    def fill_one(record: PodRecord) -> None:
        try:
            if not record.sid:
                record.sid = rt.RunPodSandbox(
                    api_pb2.RunPodSandboxRequest(config=record.config), timeout=b.timeout
                ).pod_sandbox_id
            while len(record.containers) < per_pod:
                config = container_config(pods, f"c{len(record.containers)}")
                cid = rt.CreateContainer(
                    api_pb2.CreateContainerRequest(
                        pod_sandbox_id=record.sid, config=config, sandbox_config=record.config
                    ),
                    timeout=b.timeout,
                ).container_id
                record.containers.append(cid)
                if start:
                    rt.StartContainer(
                        api_pb2.StartContainerRequest(container_id=cid), timeout=b.timeout
                    )
        except grpc.RpcError as exc:
            with lock:
                errors.append(lc._details(exc))

    with ThreadPoolExecutor(max_workers=FILL_THREADS) as pool:
        list(pool.map(fill_one, todo))
    if errors:
        b.fail(f"filling {target.label}", errors)
    return [r for r in todo if r.sid]


def _drain(b: Bench, target: lc.Target, records: Sequence[PodRecord]) -> None:
    errors: list[str] = []
    with ThreadPoolExecutor(max_workers=FILL_THREADS) as pool:
        list(
            pool.map(
                lambda r: _remove_pod(target, r.sid, r.config.log_directory, b.timeout, errors),
                records,
            )
        )
    b.fail(f"removing the pods of the RPC round @ {target.label}", errors)


def cgroup_memory(runtime: world_mod.Runtime) -> world_mod.Memory:
    """Memory of every process in the runtime's cgroup parent: the pods' own processes.

    The infra (pause) process and the containers' processes, including the
    ``runc init`` that waits in every created but not started container.
    """
    if not runtime.cgroup_parent:
        return world_mod.Memory()
    pids: set[int] = set()
    for hierarchy in world_mod.cgroup_hierarchies():
        top = hierarchy / runtime.cgroup_parent.strip("/")
        if not top.is_dir():
            continue
        for procs in top.rglob("cgroup.procs"):
            with contextlib.suppress(OSError, ValueError):
                pids.update(int(x) for x in procs.read_text().split())
        if pids:
            break  # every v1 hierarchy holds the same processes: one is enough
    return world_mod.memory_sum(pids)


def _counts(target: lc.Target, timeout: float) -> dict[str, int]:
    rt = target.endpoint.runtime
    return {
        "pods": len(rt.ListPodSandbox(api_pb2.ListPodSandboxRequest(), timeout=timeout).items),
        "containers": len(
            rt.ListContainers(api_pb2.ListContainersRequest(), timeout=timeout).containers
        ),
    }


def _measure_rpcs(b: Bench, section: str, n: int, counts: dict[str, dict[str, int]]) -> None:
    workloads: dict[tuple[str, str], Callable[[int], common.Samples]] = {}
    for rpc in UNARY_RPCS:
        spec = rpc_latency.RPCS[rpc]
        for t in b.targets:
            stub = t.endpoint.runtime if spec.service == "runtime" else t.endpoint.image
            call = functools.partial(getattr(stub, rpc), spec.request(), timeout=b.timeout)
            workloads[rpc, t.label] = functools.partial(common.run_timed, call)
    samples = common.alternate(workloads, n=n, block=b.plan.rpc_block, warmup=b.plan.rpc_warmup)
    for rpc in UNARY_RPCS:
        b.results.latency(
            section, rpc, {t.label: samples[rpc, t.label] for t in b.targets}, state=counts
        )


def phase_rpc(b: Bench) -> None:
    plan = b.plan
    pods = b.pods("host")
    records: dict[str, list[PodRecord]] = {}
    details: dict[str, Any] = {"fill_s": {}, "counts": {}, "memory_loaded": {}}
    try:
        for t in b.targets:
            t0 = time.monotonic()
            records[t.label] = _fill(b, t, pods, [], total_pods=SMALL_PODS, per_pod=1, start=True)
            details["fill_s"].setdefault(t.label, []).append(round(time.monotonic() - t0, 3))
        counts = {t.label: _counts(t, b.timeout) for t in b.targets}
        details["counts"]["small"] = counts
        b.log(f"rpc: {counts}")
        _measure_rpcs(
            b,
            f"unary RPCs: {SMALL_PODS} pods, {SMALL_PODS} running containers",
            plan.rpc_calls,
            counts,
        )

        total_pods = max(SMALL_PODS, plan.containers_loaded // PER_POD)
        for t in b.targets:
            t0 = time.monotonic()
            records[t.label] = _fill(
                b, t, pods, records[t.label], total_pods=total_pods, per_pod=PER_POD, start=False
            )
            took = time.monotonic() - t0
            details["fill_s"][t.label].append(round(took, 3))
            b.log(f"rpc: {t.label} filled to {total_pods} pods x {PER_POD} in {took:.1f} s")
        counts = {t.label: _counts(t, b.timeout) for t in b.targets}
        details["counts"]["loaded"] = counts
        containers = total_pods * PER_POD
        loaded: dict[str, tuple[lc.Snapshot, world_mod.Memory]] = {}
        for t in b.targets:
            snap, pods_memory = lc.snapshot(t), cgroup_memory(t.runtime)
            loaded[t.label] = (snap, pods_memory)
            details["memory_loaded"][t.label] = {
                **snap.to_json(),
                "pod_processes": pods_memory.to_json(),
            }
        b.log(f"rpc: {counts}")
        section = (
            f"memory: {total_pods} pods, {containers:,} containers "
            f"({containers - SMALL_PODS:,} only created)"
        )
        b.results.memory(
            section,
            "total PSS, daemon + conmons / shims",
            {label: snap.total.pss for label, (snap, _) in loaded.items()},
            monitors={label: snap.monitors.processes for label, (snap, _) in loaded.items()},
        )
        b.results.memory(
            section,
            "PSS of the pods' own processes (pause, sleep, runc init)",
            {label: mem.pss for label, (_, mem) in loaded.items()},
            processes={label: mem.processes for label, (_, mem) in loaded.items()},
        )
        _measure_rpcs(
            b,
            f"unary RPCs: {total_pods} pods, {containers:,} containers "
            f"({containers - SMALL_PODS:,} only created)",
            plan.rpc_calls_loaded,
            counts,
        )
    finally:
        for t in b.targets:
            t0 = time.monotonic()
            _drain(b, t, records.get(t.label, []))
            details.setdefault("drain_s", {})[t.label] = round(time.monotonic() - t0, 3)
    b.results.details["rpc"] = details


# -- 3. pod lifecycle


RUN, STOP_POD, REMOVE_POD = "RunPodSandbox", "StopPodSandbox", "RemovePodSandbox"
POD_CYCLE: Final = "run+stop+remove"


class PodCycle:
    """An empty pod run, stopped and removed, each RPC timed."""

    def __init__(self, b: Bench, target: lc.Target, pods: lc.Pods) -> None:
        self.target = target
        self.pods = pods
        self.steps = Steps((RUN, STOP_POD, REMOVE_POD, POD_CYCLE), b.timeout)

    def run(self, count: int) -> common.Samples:
        rt = self.target.endpoint.runtime
        out = common.Samples()
        for _ in range(count):
            config = self.pods.pod_config(self.target)
            run_req = api_pb2.RunPodSandboxRequest(config=config)
            sid = ""
            try:
                sid = self.steps.call(RUN, rt.RunPodSandbox, run_req).pod_sandbox_id
                self.steps.call(
                    STOP_POD, rt.StopPodSandbox, api_pb2.StopPodSandboxRequest(pod_sandbox_id=sid)
                )
                self.steps.call(
                    REMOVE_POD,
                    rt.RemovePodSandbox,
                    api_pb2.RemovePodSandboxRequest(pod_sandbox_id=sid),
                )
                sid = ""
                total = self.steps.last(RUN, STOP_POD, REMOVE_POD)
                self.steps.add(POD_CYCLE, total)
                out.latencies_ns.append(total)
            except StepFailed as exc:
                self.steps.failed(exc, out)
            finally:
                if sid:
                    _remove_pod(self.target, sid, "", self.steps.timeout, self.steps.failures)
                shutil.rmtree(config.log_directory, ignore_errors=True)
        return out


def phase_pods(b: Bench) -> None:
    plan = b.plan
    cycles: dict[tuple[str, str], PodCycle] = {}
    for network in ("host", "cni"):
        pods = b.pods("host" if network == "host" else "cni")
        for t in b.targets:
            cycles[network, t.label] = PodCycle(b, t, pods)
    for network in ("host", "cni"):
        _alternate(
            b,
            f"pods {network}",
            {label: c.run for (net, label), c in cycles.items() if net == network},
            [c.steps.reset for (net, _), c in cycles.items() if net == network],
            n=plan.pod_iterations,
            block=plan.block,
            warmup=plan.warmup,
        )
    titles = {
        "host": "pods: empty pod, host network",
        "cni": "pods: empty pod, CNI bridge network",
    }
    for network, title in titles.items():
        for step in (RUN, STOP_POD, REMOVE_POD, POD_CYCLE):
            b.results.latency(
                title,
                step,
                {t.label: cycles[network, t.label].steps.samples[step] for t in b.targets},
            )
    for (network, label), c in cycles.items():
        b.fail(f"pods {network} @ {label}", c.steps.failures)


# -- 4 and 5. containers and ExecSync, next to the runc floor


CREATE, START, STOP, REMOVE = (
    "CreateContainer",
    "StartContainer",
    "StopContainer",
    "RemoveContainer",
)
CREATE_START: Final = "create+start"
CONTAINER_CYCLE: Final = "create+start+stop+remove"
EXEC: Final = "ExecSync true"
#: The container rows, each followed by the floors that bound it from below.
CONTAINER_ROWS: Final = (
    (CREATE, (floor_mod.CREATE, floor_mod.CONMON_CREATE)),
    (START, (floor_mod.START,)),
    (CREATE_START, (floor_mod.CREATE_START, floor_mod.CONMON_CREATE_START)),
    (STOP, (floor_mod.STOP, floor_mod.CONMON_STOP)),
    (REMOVE, (floor_mod.DELETE,)),
    (CONTAINER_CYCLE, (floor_mod.CYCLE, floor_mod.CONMON_CYCLE)),
)


@dataclass
class StandingPod:
    """A pod kept for the container workloads, with a running container for ExecSync."""

    target: lc.Target
    config: api_pb2.PodSandboxConfig
    sid: str = ""
    exec_cid: str = ""


class ContainerCycle:
    def __init__(self, b: Bench, pod: StandingPod, pods: lc.Pods) -> None:
        self.pod = pod
        self.pods = pods
        self.stop_timeout = b.plan.stop_timeout
        self.steps = Steps((CREATE, START, STOP, REMOVE, CREATE_START, CONTAINER_CYCLE), b.timeout)
        self.attempt = 0

    def run(self, count: int) -> common.Samples:
        rt = self.pod.target.endpoint.runtime
        out = common.Samples()
        for _ in range(count):
            self.attempt += 1
            create_req = api_pb2.CreateContainerRequest(
                pod_sandbox_id=self.pod.sid,
                config=container_config(self.pods, "cycle", self.attempt),
                sandbox_config=self.pod.config,
            )
            cid = ""
            try:
                cid = self.steps.call(CREATE, rt.CreateContainer, create_req).container_id
                self.steps.call(
                    START, rt.StartContainer, api_pb2.StartContainerRequest(container_id=cid)
                )
                self.steps.call(
                    STOP,
                    rt.StopContainer,
                    api_pb2.StopContainerRequest(container_id=cid, timeout=self.stop_timeout),
                )
                self.steps.call(
                    REMOVE, rt.RemoveContainer, api_pb2.RemoveContainerRequest(container_id=cid)
                )
                cid = ""
                self.steps.add(CREATE_START, self.steps.last(CREATE, START))
                total = self.steps.last(CREATE, START, STOP, REMOVE)
                self.steps.add(CONTAINER_CYCLE, total)
                out.latencies_ns.append(total)
            except StepFailed as exc:
                self.steps.failed(exc, out)
            finally:
                if cid:
                    lc._force_remove(self.pod.target, cid, "", self.steps.timeout)
        return out


class ExecCycle:
    def __init__(self, b: Bench, pod: StandingPod) -> None:
        self.pod = pod
        self.steps = Steps((EXEC,), b.timeout)

    def run(self, count: int) -> common.Samples:
        rt = self.pod.target.endpoint.runtime
        request = api_pb2.ExecSyncRequest(
            container_id=self.pod.exec_cid, cmd=["true"], timeout=EXEC_TIMEOUT
        )
        out = common.Samples()
        for _ in range(count):
            try:
                response = self.steps.call(EXEC, rt.ExecSync, request)
                if response.exit_code != 0:
                    raise StepFailed(EXEC, RuntimeError(f"exit code {response.exit_code}"))
                out.latencies_ns.append(self.steps.samples[EXEC].latencies_ns[-1])
            except StepFailed as exc:
                self.steps.failed(exc, out)
        return out


def _standing_pods(b: Bench, pods: lc.Pods) -> list[StandingPod]:
    standing = []
    for t in b.targets:
        config = pods.pod_config(t)
        pod = StandingPod(t, config)
        standing.append(pod)
        rt = t.endpoint.runtime
        pod.sid = rt.RunPodSandbox(
            api_pb2.RunPodSandboxRequest(config=config), timeout=b.timeout
        ).pod_sandbox_id
        pod.exec_cid = rt.CreateContainer(
            api_pb2.CreateContainerRequest(
                pod_sandbox_id=pod.sid,
                config=container_config(pods, "exec"),
                sandbox_config=config,
            ),
            timeout=b.timeout,
        ).container_id
        rt.StartContainer(
            api_pb2.StartContainerRequest(container_id=pod.exec_cid), timeout=b.timeout
        )
    return standing


def phase_containers(b: Bench, phases: set[str]) -> None:
    plan, world = b.plan, b.world
    assert world.base is not None
    pods = b.pods("host")
    standing: list[StandingPod] = []
    try:
        with floor_mod.RuncFloor(world.base / "runc-floor", f"/{world.tag}/runc-floor") as floor:
            b.results.details["runc_floor"] = {"version": floor.version}
            standing = _standing_pods(b, pods)
            if "containers" in phases:
                cycles = {p.target.label: ContainerCycle(b, p, pods) for p in standing}
                workloads: dict[str, Callable[[int], common.Samples]] = {
                    label: c.run for label, c in cycles.items()
                }
                workloads["runc floor"] = floor.run_cycles
                workloads["conmon floor"] = floor.run_conmon_cycles
                _alternate(
                    b,
                    "containers",
                    workloads,
                    [*(c.steps.reset for c in cycles.values()), floor.reset],
                    n=plan.container_iterations,
                    block=plan.block,
                    warmup=plan.warmup,
                )
                section = "containers: busybox sleep in a host-network pod"
                for step, floors in CONTAINER_ROWS:
                    b.results.latency(
                        section, step, {label: c.steps.samples[step] for label, c in cycles.items()}
                    )
                    for name in floors:
                        b.results.floor(section, f"floor: {name}", floor.samples[name])
                b.results.details["runc_floor"]["steps"] = {
                    name: common.Stats.from_samples(s).to_json()
                    for name, s in floor.samples.items()
                    if name != floor_mod.EXEC
                }
                for label, c in cycles.items():
                    b.fail(f"containers @ {label}", c.steps.failures)
                b.fail("runc floor", floor.failures)
                b.log("containers: done")
            if "exec" in phases:
                floor.reset()
                execs = {p.target.label: ExecCycle(b, p) for p in standing}
                workloads = {label: c.run for label, c in execs.items()}
                workloads["runc floor"] = floor.run_execs
                _alternate(
                    b,
                    "exec",
                    workloads,
                    [*(c.steps.reset for c in execs.values()), floor.reset],
                    n=plan.exec_iterations,
                    block=plan.block * 2,
                    warmup=plan.warmup,
                )
                section = "exec in a running container"
                b.results.latency(
                    section, EXEC, {label: c.steps.samples[EXEC] for label, c in execs.items()}
                )
                b.results.floor(section, f"floor: {floor_mod.EXEC}", floor.samples[floor_mod.EXEC])
                for label, c in execs.items():
                    b.fail(f"exec @ {label}", c.steps.failures)
                b.fail("runc floor", floor.failures)
    finally:
        for pod in standing:
            if pod.sid:
                errors: list[str] = []
                _remove_pod(pod.target, pod.sid, pod.config.log_directory, b.timeout, errors)
                b.fail(f"standing pod @ {pod.target.label}", errors)


# -- 6. a burst of concurrent pod starts


BURST_WALL: Final = "wall time of the burst"
BURST_CALL: Final = "RunPodSandbox, each call"


class Burst:
    """``size`` RunPodSandbox calls at once from as many threads; pods removed after."""

    def __init__(self, b: Bench, target: lc.Target, pods: lc.Pods, pool: ThreadPoolExecutor):
        self.target = target
        self.pods = pods
        self.pool = pool
        self.size = b.plan.burst_size
        self.timeout = b.timeout
        self.steps = Steps((BURST_WALL, BURST_CALL), b.timeout)
        #: Seconds to stop and remove each burst's pods (untimed), warm-up included.
        self.cleanup_s: list[float] = []

    def run(self, count: int) -> common.Samples:
        out = common.Samples()
        rt = self.target.endpoint.runtime
        for _ in range(count):
            configs = [self.pods.pod_config(self.target) for _ in range(self.size)]
            requests = [api_pb2.RunPodSandboxRequest(config=c) for c in configs]
            barrier = threading.Barrier(self.size + 1)

            def one(
                request: api_pb2.RunPodSandboxRequest, barrier: threading.Barrier = barrier
            ) -> tuple[str, int]:
                barrier.wait(timeout=60)
                t0 = time.perf_counter_ns()
                sid = rt.RunPodSandbox(request, timeout=self.timeout).pod_sandbox_id
                return sid, time.perf_counter_ns() - t0

            futures = [self.pool.submit(one, r) for r in requests]
            barrier.wait(timeout=60)  # every thread is at the line: the burst starts now
            t0 = time.perf_counter_ns()
            sids: list[str] = []
            failed = 0
            for future in futures:
                try:
                    sid, ns = future.result()
                except Exception as exc:
                    failed += 1
                    self.steps.samples[BURST_CALL].errors[common.error_name(exc)] += 1
                    self.steps.failures.append(lc._details(exc))
                else:
                    sids.append(sid)
                    self.steps.add(BURST_CALL, ns)
            wall = time.perf_counter_ns() - t0
            if failed:
                self.steps.samples[BURST_WALL].errors["incomplete"] += 1
                out.errors["incomplete"] += 1
            else:
                self.steps.add(BURST_WALL, wall)
                out.latencies_ns.append(wall)
            # Untimed: remove the burst's pods (and whatever a failed call left).
            t0 = time.monotonic()
            list(
                self.pool.map(
                    lambda sid: _remove_pod(
                        self.target, sid, "", self.timeout, self.steps.failures
                    ),
                    sids,
                )
            )
            self.cleanup_s.append(round(time.monotonic() - t0, 3))
            for config in configs:
                shutil.rmtree(config.log_directory, ignore_errors=True)
            self._sweep(configs)
        return out

    def _sweep(self, configs: Sequence[api_pb2.PodSandboxConfig]) -> None:
        uids = {c.metadata.uid for c in configs}
        rt = self.target.endpoint.runtime
        with contextlib.suppress(grpc.RpcError):
            for pod in rt.ListPodSandbox(
                api_pb2.ListPodSandboxRequest(), timeout=self.timeout
            ).items:
                if pod.metadata.uid in uids:
                    _remove_pod(self.target, pod.id, "", self.timeout, self.steps.failures)


def phase_concurrent(b: Bench) -> None:
    plan = b.plan
    pods = b.pods("cni")
    with ThreadPoolExecutor(max_workers=plan.burst_size) as pool:
        bursts = {t.label: Burst(b, t, pods, pool) for t in b.targets}
        _alternate(
            b,
            "concurrent",
            {label: burst.run for label, burst in bursts.items()},
            [burst.steps.reset for burst in bursts.values()],
            n=plan.burst_rounds,
            block=1,
            warmup=plan.burst_warmup,
        )
    bursts_text = f"{plan.burst_rounds} burst{'s' if plan.burst_rounds != 1 else ''}"
    section = f"{plan.burst_size} RunPodSandbox at once (CNI), {bursts_text}"
    for step in (BURST_WALL, BURST_CALL):
        b.results.latency(
            section, step, {label: burst.steps.samples[step] for label, burst in bursts.items()}
        )
    for label, burst in bursts.items():
        b.fail(f"burst @ {label}", burst.steps.failures)
    b.results.details["concurrent"] = {
        "cleanup_s": {label: burst.cleanup_s for label, burst in bursts.items()}
    }


# -- 7. memory


def phase_memory(b: Bench) -> None:
    plan = b.plan
    pods = b.pods("host")
    rounds: list[lc.MemoryRound] = []
    for k in plan.memory_pods:
        for t in b.targets:
            r = lc.memory_round(t, pods, k, budget=plan.memory_budget)
            rounds.append(r)
            b.fail(f"memory {k} pods @ {t.label}", r.errors)
            loaded = r.loaded
            b.log(
                f"memory: {t.label} with {r.running}/{k} pods: total PSS "
                f"{(loaded.total.pss / MIB) if loaded else 0:.1f} MiB, up {r.up_s:.1f} s, "
                f"down {r.down_s:.1f} s"
            )
    b.results.details["memory"] = [r.to_json() for r in rounds]
    section = "memory: daemon + conmons / shims (pods of 1 container)"
    for k in plan.memory_pods:
        group = [r for r in rounds if r.pods == k]
        monitors = {r.target: r.loaded.monitors.processes if r.loaded else 0 for r in group}
        for measure in ("pss", "rss"):
            values = {
                r.target: getattr(r.loaded.total, measure)
                for r in group
                if r.loaded is not None and r.running == k
            }
            b.results.memory(
                section, f"total {measure.upper()}, {k} pods", values, monitors=monitors
            )


# ---------------------------------------------------------------------------
# Main


def _caption(b: Bench, plan: Plan, quick: bool) -> str:
    versions = []
    for t in b.targets:
        v = t.endpoint.version
        versions.append(f"{t.label} = {v['runtime_name']} {v['runtime_version']}")
    floor_version = b.results.details.get("runc_floor", {}).get("version", "runc")
    return "\n".join(
        [
            ", ".join(versions) + f"; floor rows: {floor_version} alone, or download/unpack/dd "
            "(the same value under every runtime). " + ("--quick run." if quick else "Full run."),
            "Client-side times, nearest-rank percentiles; every workload alternates between the "
            "runtimes in blocks after a discarded warm-up. "
            + (
                f"Ratios: {b.labels[0]} / {b.labels[-1]}, above 1 is slower. "
                if len(b.labels) > 1
                else ""
            )
            + "Memory rows: MiB in the p50 columns.",
            f"Iterations: RPCs {plan.rpc_calls} / {plan.rpc_calls_loaded} (loaded), pods "
            f"{plan.pod_iterations} per network, containers {plan.container_iterations}, ExecSync "
            f"{plan.exec_iterations}, pulls {plan.pull_iterations} per image, bursts "
            f"{plan.burst_rounds}.",
        ]
    )


def run(args: argparse.Namespace) -> int:
    plan: Plan = args.plan
    phases: set[str] = set(PHASES) - set(args.skip)
    err = Console(stderr=True)
    if not err.is_terminal:
        err.width = LOG_WIDTH
    out = err if args.json == "-" else Console()
    if not out.is_terminal:
        out.width = LOG_WIDTH
    started = common.now()
    t_start = time.monotonic()
    results = Results()
    leftovers: list[str] | None = None
    world_info: dict[str, Any] | None = None
    bench: Bench | None = None
    w = world_mod.World(containerd=not args.no_containerd, log=lambda m: err.print(escape(m)))
    try:
        try:
            with w:
                assert w.base is not None
                world_info = {
                    "base": str(w.base),
                    "registry": w.registry.url if w.registry else None,
                    "busybox": w.busybox_ref,
                    "pause": w.pause_ref,
                    "cni_network": w.cni_network,
                    "bridge": w.bridge,
                }
                results.wall_s["world_up"] = round(time.monotonic() - t_start, 3)
                targets = lc._connect(w.runtimes, args.timeout)
                try:
                    bench = Bench(plan, w, targets, err, results, w.base / "logs", args.timeout)
                    _run_phases(bench, phases)
                finally:
                    for t in targets:
                        t.endpoint.close()
                    if args.logs:
                        _keep_logs(w, Path(args.logs), err)
                t0 = time.monotonic()
        finally:
            leftovers = w.leftovers()
    except world_mod.WorldError as exc:
        err.print(f"[bold red]error:[/] {escape(str(exc))}")
        if leftovers:
            err.print(f"[bold red]left on the host:[/] {escape(str(leftovers))}")
        return 2
    results.wall_s["world_down"] = round(time.monotonic() - t0, 3)
    results.wall_s["total"] = round(time.monotonic() - t_start, 3)
    assert bench is not None
    return _report(bench, args, started, leftovers, world_info, out, err)


def _run_phases(b: Bench, phases: set[str]) -> None:
    # Memory first: measured on daemons that have only pulled busybox, so that
    # the figures do not depend on what the other phases left in their heaps.
    steps: list[tuple[str, Callable[[], None]]] = [
        ("memory", lambda: phase_memory(b)),
        ("pull", lambda: phase_pull(b)),
        ("rpc", lambda: phase_rpc(b)),
        ("pods", lambda: phase_pods(b)),
        ("containers", lambda: phase_containers(b, phases)),
        ("concurrent", lambda: phase_concurrent(b)),
    ]
    for name, phase in steps:
        if name == "containers":
            if not phases & {"containers", "exec"}:
                continue
        elif name not in phases:
            continue
        t0 = time.monotonic()
        b.log(f"== {name}")
        try:
            phase()
        except Exception as exc:  # reported; the other phases still run
            b.log(f"{name} failed: {lc._details(exc)}")
            b.fail(name, [f"phase aborted: {lc._details(exc)}"])
        took = time.monotonic() - t0
        b.results.wall_s[name] = round(took, 3)
        b.log(f"== {name}: {took:.1f} s")
    # Where the daemons' memory ended up, every phase done and no pod left.
    b.results.details["memory_idle_end"] = {t.label: lc.snapshot(t).to_json() for t in b.targets}
    # Every pod is gone: a daemon's child still running now is stuck (a plugin,
    # a runc command).  conmon and the shims have left their daemon's process tree.
    procs = world_mod.processes()
    for t in b.targets:
        if t.runtime.pid is None:
            continue
        stuck = [
            f"pid {p.pid}: {' '.join(p.argv)[:300]}"
            for p in world_mod.descendants(t.runtime.pid, procs)
            if p.name not in world_mod.MONITOR_NAMES
        ]
        b.fail(f"{t.label} still has child processes at the end", stuck)


def _keep_logs(world: world_mod.World, directory: Path, err: Console) -> None:
    """Copy the daemons' logs out of the world before it is removed."""
    directory.mkdir(parents=True, exist_ok=True)
    for runtime in world.runtimes:
        if runtime.log_path is not None and runtime.log_path.exists():
            target = directory / f"{runtime.label}.log"
            shutil.copyfile(runtime.log_path, target)
            err.print(f"kept {escape(str(target))}")


def _report(
    b: Bench,
    args: argparse.Namespace,
    started: datetime.datetime,
    leftovers: list[str] | None,
    world_info: dict[str, Any] | None,
    out: Console,
    err: Console,
) -> int:
    results, labels = b.results, b.labels
    # Memory ran first, but reads best last.
    results.rows.sort(key=lambda row: row.kind == "memory")
    out.print(render_table(results.rows, labels, _caption(b, b.plan, args.quick)))
    failed = bool(results.failures)
    for message in results.failures[:50]:
        err.print(f"[bold red]error[/] {escape(message)}")
    if leftovers:
        failed = True
        err.print("[bold red]the world left things on the host:[/]")
        for item in leftovers:
            err.print(f"  {escape(item)}")
    else:
        err.print("host check: nothing left")
    err.print(
        "wall time: " + ", ".join(f"{key} {value:.1f} s" for key, value in results.wall_s.items())
    )
    if args.markdown:
        Path(args.markdown).write_text(render_markdown(results.rows, labels))
        err.print(f"wrote {args.markdown}")
    params = {
        "quick": args.quick,
        "skip": sorted(args.skip),
        "plan": dict(vars(b.plan)),
        "timeout_s": args.timeout,
        "reference": labels[-1] if len(labels) > 1 else None,
        "pid_namespace": "pod (shareProcessNamespace)",
    }
    document = common.build_report(
        "all",
        params=params,
        targets=[
            {
                **t.endpoint.describe(),
                "pid": t.runtime.pid,
                "cgroup_parent": t.runtime.cgroup_parent,
            }
            for t in b.targets
        ],
        results=[row.to_json(labels) for row in results.rows],
        started=started,
    )
    document["details"] = results.details
    document["failures"] = results.failures
    document["world"] = world_info
    document["leftovers"] = leftovers
    document["wall_s"] = results.wall_s
    common.write_report(args.json, document)
    if args.json != "-":
        err.print(f"wrote {args.json}")
    return 1 if failed else 0


def _phase_list(text: str) -> list[str]:
    names = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [n for n in names if n not in PHASES]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown phase(s) {unknown}; known: {', '.join(PHASES)}")
    return names


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.all",
        description=(
            "Run every benchmark in one local world (registry, pouchd, containerd; needs root), "
            "alternating between the runtimes, and print one table: p50/p99 per runtime and "
            "pouch/containerd ratios, with the runc, download, unpack and disk floors."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="CI smoke run (under 2 minutes): fewer iterations, a 30 MiB big image, 100 "
        "containers for the List RPCs, memory at 10 pods only",
    )
    parser.add_argument(
        "--json", default=DEFAULT_JSON, metavar="PATH", help="the JSON report ('-': stdout)"
    )
    parser.add_argument("--markdown", metavar="PATH", help="also write the table as Markdown")
    parser.add_argument(
        "--skip",
        type=_phase_list,
        default=[],
        metavar="PHASE[,PHASE...]",
        help=f"leave phases out: {', '.join(PHASES)}",
    )
    parser.add_argument(
        "--no-containerd", action="store_true", help="pouchd alone (no ratio columns)"
    )
    parser.add_argument(
        "--logs", metavar="DIR", help="copy the daemons' logs here before the world goes"
    )
    parser.add_argument(
        "--timeout", type=float, default=60.0, help="deadline of every CRI call but pulls, seconds"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.timeout <= 0:
        parser.error("--timeout must be positive")
    args.plan = replace(QUICK if args.quick else FULL)
    try:
        return run(args)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
