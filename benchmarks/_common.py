"""Shared pieces for the CRI benchmarks.

Four layers, each usable alone:

* **Measurement**: :func:`run_timed` times one operation ``count`` times with
  :func:`time.perf_counter_ns`, serially or over a thread pool, and returns
  :class:`Samples` (latencies of successful calls, failures by kind, wall time).
* **Scheduling**: :func:`alternate` runs several workloads round-robin in
  blocks, so that machine noise (another process, a frequency change, a GC in
  the daemon) falls on every workload alike instead of on whichever ran last.
* **Statistics and output**: :func:`percentile` (nearest-rank),
  :class:`Stats`, :func:`latency_table` (rich) and :func:`write_report` (JSON
  with machine info).
* **CRI client**: :func:`parse_endpoint` and :func:`connect` open one
  persistent grpcio channel per endpoint and ask it for its Version.

A workload is "a case on a target": for ``rpc_latency`` the case is an RPC
and the target an endpoint; for a lifecycle benchmark the case would be
"run+stop+remove a pod".  Results are keyed by ``(case, target)`` throughout.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.metadata
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, TypeVar

import grpc
from cri_api.v1 import api_pb2, api_pb2_grpc
from rich.table import Table
from rich.text import Text

if TYPE_CHECKING:
    from concurrent.futures import Executor

K = TypeVar("K", bound=Hashable)

#: Written into every report so that readers know how p50/p90/p99 were taken.
PERCENTILE_METHOD: Final = "nearest-rank"
#: Bump when the JSON layout changes incompatibly.
REPORT_SCHEMA: Final = 1

# ---------------------------------------------------------------------------
# Measurement


def error_name(exc: BaseException) -> str:
    """Classify a failed call: the gRPC status name if it has one, else the type name."""
    if isinstance(exc, grpc.RpcError) and isinstance(exc, grpc.Call):
        return str(exc.code().name)  # e.g. UNIMPLEMENTED, DEADLINE_EXCEEDED, UNAVAILABLE
    return type(exc).__name__


@dataclass
class Samples:
    """Raw measurements of one workload.

    Attributes:
        latencies_ns: Duration of each *successful* call, in the order taken.
        errors: Failed calls by kind (see :func:`error_name`).  Failed calls are
            not in ``latencies_ns``: a fast UNIMPLEMENTED would flatter the
            percentiles and a 10 s deadline would swamp them.
        wall_ns: Wall-clock time spent running the workload's blocks, summed.
            With concurrency > 1 this is less than ``sum(latencies_ns)``.
    """

    latencies_ns: list[int] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    wall_ns: int = 0

    @property
    def calls(self) -> int:
        return len(self.latencies_ns) + sum(self.errors.values())

    def merge(self, other: Samples) -> None:
        self.latencies_ns.extend(other.latencies_ns)
        self.errors.update(other.errors)
        self.wall_ns += other.wall_ns


def _run_serial(
    op: Callable[[], object], count: int, error_key: Callable[[BaseException], str]
) -> Samples:
    perf = time.perf_counter_ns  # local: one attribute lookup fewer inside the timed loop
    latencies: list[int] = []
    errors: Counter[str] = Counter()
    start = perf()
    for _ in range(count):
        t0 = perf()
        try:
            op()
            t1 = perf()
        except Exception as exc:  # counted, never fatal: a benchmark reports failures
            errors[error_key(exc)] += 1
        else:
            latencies.append(t1 - t0)
    return Samples(latencies, errors, perf() - start)


def run_timed(
    op: Callable[[], object],
    count: int,
    *,
    concurrency: int = 1,
    executor: Executor | None = None,
    error_key: Callable[[BaseException], str] = error_name,
) -> Samples:
    """Call ``op()`` ``count`` times and time each call.

    Args:
        op: One unit of work; an exception marks the call as failed.
        count: Calls in total (split across the workers when concurrent).
        concurrency: Calls in flight at once.  Above 1, ``executor`` must have
            at least that many workers; each worker runs its share serially.
        executor: Thread pool for ``concurrency > 1`` (reuse one across blocks).
        error_key: Maps a failure to the name it is counted under.

    Returns:
        The samples; ``wall_ns`` covers the whole batch, so
        ``calls / wall_ns`` is the throughput at this concurrency.
    """
    if concurrency <= 1:
        return _run_serial(op, count, error_key)
    if executor is None:
        raise ValueError("concurrency > 1 needs an executor")
    shares = [count // concurrency + (i < count % concurrency) for i in range(concurrency)]
    start = time.perf_counter_ns()
    futures = [executor.submit(_run_serial, op, share, error_key) for share in shares if share]
    merged = Samples()
    for future in futures:
        merged.merge(future.result())
    merged.wall_ns = time.perf_counter_ns() - start
    return merged


# ---------------------------------------------------------------------------
# Scheduling


def _rounds(keys: Sequence[K], total: int, block: int) -> Iterator[tuple[K, int]]:
    """Yield ``(key, count)`` blocks: every key gets ``total`` calls in blocks of ``block``.

    Each round starts one key later than the previous round, so no workload
    is always first after a switch (or always last, just before a pause).
    """
    done = dict.fromkeys(keys, 0)
    rnd = 0
    while any(done[key] < total for key in keys):
        shift = rnd % len(keys)
        for key in [*keys[shift:], *keys[:shift]]:
            count = min(block, total - done[key])
            if count > 0:
                done[key] += count
                yield key, count
        rnd += 1


def alternate(
    workloads: Mapping[K, Callable[[int], Samples]],
    *,
    n: int,
    block: int,
    warmup: int = 0,
    on_block: Callable[[K, int], None] | None = None,
) -> dict[K, Samples]:
    """Run workloads round-robin in blocks and collect their samples.

    Args:
        workloads: ``key -> run(count)``; ``run`` performs ``count`` operations
            and returns their :class:`Samples` (typically a
            ``functools.partial`` of :func:`run_timed`).
        n: Measured operations per workload.
        block: Operations per turn.  Smaller blocks interleave more finely;
            a block should still be long enough to dwarf the switch itself.
        warmup: Operations per workload run first (also round-robin) and
            discarded: connection setup, lazy imports, caches, JIT-less but
            still cold code paths in the daemon.
        on_block: Called after each measured block with ``(key, count)``,
            e.g. to advance a progress bar.

    Returns:
        ``key -> Samples`` in the order of ``workloads``.
    """
    if not workloads:
        return {}
    if block < 1:
        raise ValueError("block must be at least 1")
    keys = list(workloads)
    for key, count in _rounds(keys, warmup, block):
        workloads[key](count)
    results = {key: Samples() for key in keys}
    for key, count in _rounds(keys, n, block):
        results[key].merge(workloads[key](count))
        if on_block is not None:
            on_block(key, count)
    return results


# ---------------------------------------------------------------------------
# Statistics


def percentile(sorted_values: Sequence[int], p: float) -> int:
    """The ``p``-th percentile by the nearest-rank method.

    The value at 1-based rank ``ceil(p / 100 * N)`` of the sorted samples: the
    smallest sample with at least ``p`` % of all samples at or below it.  It
    is always an observed value (no interpolation), so p99 of 2000 calls is
    the 1980th fastest call, and max is p100.

    Raises:
        ValueError: on an empty sequence or ``p`` outside (0, 100].
    """
    if not sorted_values:
        raise ValueError("percentile of no samples")
    if not 0 < p <= 100:
        raise ValueError(f"percentile must be in (0, 100], got {p}")
    rank = math.ceil(p / 100 * len(sorted_values))
    return sorted_values[rank - 1]


@dataclass(frozen=True)
class Stats:
    """Summary of one workload's :class:`Samples`; latency fields are ``None`` with no successes."""

    n: int
    errors: dict[str, int]
    wall_ns: int
    min_ns: int | None
    p50_ns: int | None
    p90_ns: int | None
    p99_ns: int | None
    max_ns: int | None
    mean_ns: float | None
    stdev_ns: float | None

    @classmethod
    def from_samples(cls, samples: Samples) -> Stats:
        values = sorted(samples.latencies_ns)
        errors = dict(sorted(samples.errors.items()))
        if not values:
            return cls(0, errors, samples.wall_ns, *([None] * 7))
        return cls(
            n=len(values),
            errors=errors,
            wall_ns=samples.wall_ns,
            min_ns=values[0],
            p50_ns=percentile(values, 50),
            p90_ns=percentile(values, 90),
            p99_ns=percentile(values, 99),
            max_ns=values[-1],
            mean_ns=statistics.fmean(values),
            stdev_ns=statistics.stdev(values) if len(values) > 1 else 0.0,
        )

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    @property
    def calls_per_s(self) -> float | None:
        """All calls (successful or not) per second of the workload's wall time."""
        if self.wall_ns <= 0:
            return None
        return (self.n + self.error_count) * 1e9 / self.wall_ns

    def to_json(self) -> dict[str, Any]:
        return {
            "n": self.n,
            "errors": self.errors,
            "wall_ns": self.wall_ns,
            "calls_per_s": self.calls_per_s,
            "min_ns": self.min_ns,
            "p50_ns": self.p50_ns,
            "p90_ns": self.p90_ns,
            "p99_ns": self.p99_ns,
            "max_ns": self.max_ns,
            "mean_ns": self.mean_ns,
            "stdev_ns": self.stdev_ns,
        }


def ratio(value: float | None, reference: float | None) -> float | None:
    """``value / reference``, or ``None`` when either is missing or the reference is 0."""
    if value is None or not reference:
        return None
    return value / reference


# ---------------------------------------------------------------------------
# Output: tables

_UNITS: Final = ((1.0, "ns"), (1e3, "\u00b5s"), (1e6, "ms"), (1e9, "s"))


def format_duration(ns: float | None) -> str:
    """A duration with a unit chosen for it and 3 significant figures: ``412 µs``, ``1.23 ms``."""
    if ns is None:
        return "-"
    for scale, unit in _UNITS:
        value = ns / scale
        # Move up a unit once the value would print as 1000 or more (999.7 µs -> 1.00 ms).
        if round(value) < 1000 or unit == "s":
            digits = 0 if value >= 99.95 else 1 if value >= 9.995 else 2
            return f"{value:.{digits}f} {unit}"
    raise AssertionError("unreachable")


def format_rate(per_s: float | None) -> str:
    if per_s is None:
        return "-"
    return f"{per_s:,.0f}" if per_s >= 100 else f"{per_s:.3g}"


def format_ratio(value: float | None) -> Text:
    """``1.23x``: above 1 (slower than the reference) in red, below in green, near 1 plain."""
    if value is None:
        return Text("-")
    style = "red" if value > 1.05 else "green" if value < 0.95 else ""
    return Text(f"{value:.2f}x", style=style)


def latency_table(
    title: str,
    results: Mapping[tuple[str, str], Stats],
    *,
    case_header: str = "case",
    target_header: str = "target",
    reference: str | None = None,
    caption: str | None = None,
) -> Table:
    """Render ``(case, target) -> Stats`` as one table, one section per case.

    Args:
        results: Rows in display order; targets keep their order within a case.
        reference: A target name; when given, two columns show each target's
            p50 and p99 divided by the reference's for the same case
            (the reference row shows ``ref``).
    """
    table = Table(title=title, caption=caption, caption_justify="left")
    table.add_column(case_header, no_wrap=True)
    table.add_column(target_header, no_wrap=True)
    for header in ("n", "errors", "p50", "p90", "p99", "max", "mean", "calls/s"):
        table.add_column(header, justify="right", no_wrap=True)
    if reference is not None:
        table.add_column("p50/ref", justify="right", no_wrap=True)
        table.add_column("p99/ref", justify="right", no_wrap=True)

    cases: dict[str, list[tuple[str, Stats]]] = {}
    for (case, target), stats in results.items():
        cases.setdefault(case, []).append((target, stats))
    for index, (case, rows) in enumerate(cases.items()):
        if index:
            table.add_section()
        ref = dict(rows).get(reference) if reference is not None else None
        for target, stats in rows:
            errors = Text(str(stats.error_count), style="bold red" if stats.error_count else "")
            cells: list[str | Text] = [
                case,
                target,
                str(stats.n),
                errors,
                *map(
                    format_duration,
                    (stats.p50_ns, stats.p90_ns, stats.p99_ns, stats.max_ns, stats.mean_ns),
                ),
                format_rate(stats.calls_per_s),
            ]
            if reference is not None:
                if target == reference:
                    cells += ["ref", "ref"]
                else:
                    p50_ref = ref.p50_ns if ref else None
                    p99_ref = ref.p99_ns if ref else None
                    cells += [
                        format_ratio(ratio(stats.p50_ns, p50_ref)),
                        format_ratio(ratio(stats.p99_ns, p99_ref)),
                    ]
            table.add_row(*cells)
    return table


# ---------------------------------------------------------------------------
# Output: JSON reports


def _read_first(path: str, pattern: str) -> str | None:
    """The first regex group matching a line of a (proc/sys) file, or None."""
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                match = re.match(pattern, line)
                if match:
                    return match.group(1).strip()
    except OSError:
        pass
    return None


def _git_revision() -> str | None:
    """The commit of this checkout (``+dirty`` if modified), for telling runs apart."""
    here = Path(__file__).resolve().parent
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=here,
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if head.returncode != 0:
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def _version_of(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine_info() -> dict[str, Any]:
    """Facts about the client machine that change benchmark numbers (best effort)."""
    load: tuple[float, ...] | None = None
    with contextlib.suppress(OSError):
        load = os.getloadavg()
    try:
        usable_cpus: int | None = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable_cpus = None
    mem_kib = _read_first("/proc/meminfo", r"MemTotal:\s+(\d+) kB")
    return {
        "hostname": platform.node(),
        "nproc": usable_cpus,
        "cpu_count": os.cpu_count(),
        "cpu_model": _read_first("/proc/cpuinfo", r"model name\s*:\s*(.*)"),
        "cpufreq_governor": _read_first(
            "/sys/devices/system/cpu/cpu0/cpufreq/scaling_governor", r"(.*)"
        ),
        "mem_total_bytes": int(mem_kib) * 1024 if mem_kib else None,
        "loadavg": load,
        "os": platform.system(),
        "kernel": platform.release(),
        "arch": platform.machine(),
        "python": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "packages": {
            name: _version_of(name)
            for name in ("grpcio", "protobuf", "container-runtime-interface-api", "pouch")
        },
        "pouch_git": _git_revision(),
    }


def build_report(
    benchmark: str,
    *,
    params: Mapping[str, Any],
    targets: Sequence[Mapping[str, Any]],
    results: Sequence[Mapping[str, Any]],
    started: datetime.datetime,
) -> dict[str, Any]:
    """The common JSON document: what ran, where, on what, and the numbers.

    ``results`` entries should carry at least ``case``, ``target`` and
    ``stats`` (a :meth:`Stats.to_json`).
    """
    return {
        "benchmark": benchmark,
        "schema": REPORT_SCHEMA,
        "timestamp": started.isoformat(timespec="seconds"),
        "duration_s": round((now() - started).total_seconds(), 3),
        "percentile_method": PERCENTILE_METHOD,
        "argv": sys.argv,
        "machine": machine_info(),
        "params": dict(params),
        "targets": [dict(t) for t in targets],
        "results": [dict(r) for r in results],
    }


def now() -> datetime.datetime:
    """The current time in UTC, for :func:`build_report`'s ``started``."""
    return datetime.datetime.now(datetime.UTC)


def write_report(path: str | os.PathLike[str], document: Mapping[str, Any]) -> None:
    """Write ``document`` as indented JSON; ``-`` means stdout.

    The file is replaced atomically, so an interrupted run never leaves a
    half-written report where a CI job would pick it up.
    """
    text = json.dumps(document, indent=2, sort_keys=False) + "\n"
    if os.fspath(path) == "-":
        sys.stdout.write(text)
        return
    target = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent or ".")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


# ---------------------------------------------------------------------------
# CRI client

#: The kubelet's receive limit (pkg/kubelet/cri/remote: maxMsgSize = 16 MiB).
MAX_MESSAGE_BYTES: Final = 16 * 1024 * 1024
#: What the kubelet sends as VersionRequest.version (its kubeRuntimeAPIVersion).
KUBELET_API_VERSION: Final = "0.1.0"

_LABEL = re.compile(r"^([A-Za-z0-9_.-]+)=(.+)$")


@dataclass(frozen=True)
class EndpointSpec:
    """An endpoint as given on the command line: ``[label=]address``."""

    address: str
    label: str | None = None


def parse_endpoint(text: str) -> EndpointSpec:
    """Parse ``[label=]address``; a bare absolute path means a unix socket.

    >>> parse_endpoint("containerd=/run/containerd/containerd.sock")
    EndpointSpec(address='unix:///run/containerd/containerd.sock', label='containerd')
    """
    label = None
    match = _LABEL.match(text)
    if match and "/" not in match.group(1) and ":" not in match.group(1):
        label, text = match.group(1), match.group(2)
    if text.startswith("/"):
        text = "unix://" + text
    return EndpointSpec(text, label)


@dataclass
class Endpoint:
    """A connected CRI endpoint with one persistent channel and both stubs."""

    address: str
    label: str
    channel: grpc.Channel
    runtime: api_pb2_grpc.RuntimeServiceStub
    image: api_pb2_grpc.ImageServiceStub
    version: dict[str, str]

    def describe(self) -> dict[str, Any]:
        return {"label": self.label, "address": self.address, "version": self.version}

    def close(self) -> None:
        self.channel.close()


class ConnectError(Exception):
    """An endpoint did not answer Version; the benchmark cannot start."""


def connect(spec: EndpointSpec, *, timeout: float = 10.0) -> Endpoint:
    """Open a persistent channel to ``spec`` and ask its Version.

    The label defaults to the address; callers may relabel (e.g. with
    ``version["runtime_name"]``) once they know all endpoints.

    Raises:
        ConnectError: the channel did not become ready or Version failed.
    """
    channel = grpc.insecure_channel(
        spec.address,
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ],
    )
    try:
        grpc.channel_ready_future(channel).result(timeout=timeout)
        runtime = api_pb2_grpc.RuntimeServiceStub(channel)
        response = runtime.Version(
            api_pb2.VersionRequest(version=KUBELET_API_VERSION), timeout=timeout
        )
    except grpc.FutureTimeoutError:
        channel.close()
        raise ConnectError(f"failed to connect to {spec.address} within {timeout:g} s") from None
    except grpc.RpcError as exc:
        channel.close()
        details = exc.details() if isinstance(exc, grpc.Call) else str(exc)
        raise ConnectError(
            f"failed to get the version of {spec.address}: {error_name(exc)}: {details}"
        ) from exc
    version = {
        "version": response.version,
        "runtime_name": response.runtime_name,
        "runtime_version": response.runtime_version,
        "runtime_api_version": response.runtime_api_version,
    }
    return Endpoint(
        address=spec.address,
        label=spec.label or spec.address,
        channel=channel,
        runtime=runtime,
        image=api_pb2_grpc.ImageServiceStub(channel),
        version=version,
    )


def default_labels(endpoints: Sequence[Endpoint], specs: Sequence[EndpointSpec]) -> None:
    """Label unlabelled endpoints by runtime name when that is unambiguous."""
    names = Counter(e.version["runtime_name"] for e in endpoints)
    taken = {s.label for s in specs if s.label}
    for endpoint, spec in zip(endpoints, specs, strict=True):
        name = endpoint.version["runtime_name"]
        if spec.label is None and name and names[name] == 1 and name not in taken:
            endpoint.label = name


# ---- argument types shared by the benchmark scripts ----------------------------------


def positive_int(text: str) -> int:
    """argparse type: an integer of at least 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    """argparse type: an integer of at least 0."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative, got {value}")
    return value
