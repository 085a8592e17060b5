"""Unary CRI RPC latency against one or more endpoints (pouchd, containerd, CRI-O).

    python -m benchmarks.rpc_latency \\
        --endpoint pouch=unix:///run/pouch/pouch.sock \\
        --endpoint containerd=unix:///run/containerd/containerd.sock \\
        -n 2000 --rpc Version --rpc Status --json rpc-latency.json

Every endpoint gets one persistent grpcio channel.  Each (RPC, endpoint) pair
is a workload; the workloads run round-robin in blocks (see
:func:`benchmarks._common.alternate`) after a discarded warm-up, and every call
is timed on the client with ``time.perf_counter_ns``.  With two or more
endpoints the LAST one is the reference: the table divides each endpoint's
p50 and p99 by the reference's for the same RPC.

Exit status: 0 when every call succeeded, 1 when any call failed (the
numbers are still printed and written), 2 on a usage or connection error.
"""

from __future__ import annotations

import argparse
import functools
import sys
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Literal

from cri_api.v1 import api_pb2
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from benchmarks import _common as common

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Sequence

    from google.protobuf.message import Message

QUICK_CALLS: Final = 200
QUICK_WARMUP: Final = 20
DEFAULT_CALLS: Final = 2000
DEFAULT_WARMUP: Final = 100
DEFAULT_RPCS: Final = ("Version", "Status")
#: Console width when printing to a file or CI log instead of a terminal.
LOG_WIDTH: Final = 160


@dataclass(frozen=True)
class RpcSpec:
    """A side-effect-free unary RPC that needs no ids, with the request to send."""

    service: Literal["runtime", "image"]
    request: Callable[[], Message]


#: RPCs safe to hammer on a live node: read-only and answerable without ids.
#: Requests are the ones a kubelet sends in its steady state.
RPCS: Final[dict[str, RpcSpec]] = {
    "Version": RpcSpec(
        "runtime", lambda: api_pb2.VersionRequest(version=common.KUBELET_API_VERSION)
    ),
    "Status": RpcSpec("runtime", lambda: api_pb2.StatusRequest(verbose=False)),
    "RuntimeConfig": RpcSpec("runtime", api_pb2.RuntimeConfigRequest),
    "ListPodSandbox": RpcSpec("runtime", api_pb2.ListPodSandboxRequest),
    "ListContainers": RpcSpec("runtime", api_pb2.ListContainersRequest),
    "ListContainerStats": RpcSpec("runtime", api_pb2.ListContainerStatsRequest),
    "ListPodSandboxStats": RpcSpec("runtime", api_pb2.ListPodSandboxStatsRequest),
    "ListMetricDescriptors": RpcSpec("runtime", api_pb2.ListMetricDescriptorsRequest),
    "ListImages": RpcSpec("image", api_pb2.ListImagesRequest),
    "ImageFsInfo": RpcSpec("image", api_pb2.ImageFsInfoRequest),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.rpc_latency",
        description=(
            "Measure unary CRI RPC latency (p50/p90/p99/max/mean, calls/s) against one or more "
            "CRI endpoints, alternating between them. With 2+ endpoints the LAST is the "
            "reference for the ratio columns."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--endpoint",
        action="append",
        required=True,
        metavar="[LABEL=]ADDRESS",
        help="CRI endpoint, e.g. unix:///run/containerd/containerd.sock or "
        "pouch=/run/pouch/pouch.sock; repeat to compare (the last one is the reference)",
    )
    parser.add_argument(
        "-n",
        "--calls",
        type=common.positive_int,
        default=None,
        help=f"measured calls per RPC per endpoint (default {DEFAULT_CALLS}, "
        f"{QUICK_CALLS} with --quick)",
    )
    parser.add_argument(
        "--warmup",
        type=common.non_negative_int,
        default=None,
        help=f"discarded calls per RPC per endpoint first (default {DEFAULT_WARMUP}, "
        f"{QUICK_WARMUP} with --quick)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"CI smoke run: -n {QUICK_CALLS} --warmup {QUICK_WARMUP} unless given",
    )
    parser.add_argument(
        "--rpc",
        action="append",
        choices=sorted(RPCS),
        metavar="RPC",
        help=f"RPC to measure, repeatable (default: {' '.join(DEFAULT_RPCS)}); "
        f"one of: {', '.join(RPCS)}",
    )
    parser.add_argument(
        "--block",
        type=common.positive_int,
        default=50,
        help="calls per turn when alternating between workloads",
    )
    parser.add_argument(
        "--concurrency",
        type=common.positive_int,
        default=1,
        help="calls in flight at once per workload (threads sharing the endpoint's channel)",
    )
    parser.add_argument(
        "--timeout", type=float, default=10.0, help="deadline of each call, in seconds"
    )
    parser.add_argument("--json", metavar="PATH", help="write a JSON report here ('-': stdout)")
    parser.add_argument(
        "--raw", action="store_true", help="include every latency sample in the JSON report"
    )
    return parser


@contextmanager
def _progress(console: Console, total: int) -> Iterator[Callable[[object, int], None]]:
    """A progress bar on stderr when it is a terminal; otherwise a no-op callback."""
    if not console.is_terminal:
        yield lambda _key, _count: None
        return
    columns = (
        TextColumn("measuring"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task("calls", total=total)
        yield lambda _key, count: progress.advance(task, count)


def _caption(endpoints: Sequence[common.Endpoint], args: argparse.Namespace) -> str:
    lines = []
    for endpoint in endpoints:
        v = endpoint.version
        lines.append(
            f"{endpoint.label} = {endpoint.address} ({v['runtime_name']} "
            f"{v['runtime_version']}, CRI {v['runtime_api_version']})"
        )
    lines.append(
        f"{args.calls} calls per row after {args.warmup} warm-up, blocks of {args.block}, "
        f"concurrency {args.concurrency}; {common.PERCENTILE_METHOD} percentiles over "
        "successful calls; failed calls are only counted."
    )
    if len(endpoints) > 1:
        lines.append(
            f"p50/ref, p99/ref: the endpoint's percentile divided by the reference's "
            f"({endpoints[-1].label}, the last endpoint) for the same RPC; above 1 is slower."
        )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Connect, measure, print and report.  Returns the exit status."""
    err = Console(stderr=True)
    out = err if args.json == "-" else Console()  # keep stdout pure JSON for '--json -'
    if not out.is_terminal:
        out.width = LOG_WIDTH  # rich would assume 80 columns and squeeze the table
    specs = [common.parse_endpoint(text) for text in args.endpoint]
    rpcs: list[str] = list(dict.fromkeys(args.rpc or DEFAULT_RPCS))
    started = common.now()

    with ExitStack() as stack:
        endpoints: list[common.Endpoint] = []
        for spec in specs:
            try:
                endpoint = common.connect(spec, timeout=args.timeout)
            except common.ConnectError as exc:
                err.print(f"[bold red]error:[/] {exc}")
                return 2
            stack.callback(endpoint.close)
            endpoints.append(endpoint)
        common.default_labels(endpoints, specs)
        labels = [e.label for e in endpoints]
        if len(set(labels)) != len(labels):
            err.print(f"[bold red]error:[/] endpoint labels must differ: {labels}")
            return 2

        executor = None
        if args.concurrency > 1:
            executor = stack.enter_context(ThreadPoolExecutor(max_workers=args.concurrency))

        workloads: dict[tuple[str, str], Callable[[int], common.Samples]] = {}
        for rpc in rpcs:  # rows grouped by RPC, endpoints in command-line order
            rpc_spec = RPCS[rpc]
            for endpoint in endpoints:
                stub = endpoint.runtime if rpc_spec.service == "runtime" else endpoint.image
                request = rpc_spec.request()
                call = functools.partial(getattr(stub, rpc), request, timeout=args.timeout)
                workloads[rpc, endpoint.label] = functools.partial(
                    common.run_timed, call, concurrency=args.concurrency, executor=executor
                )

        with _progress(err, args.calls * len(workloads)) as on_block:
            samples = common.alternate(
                workloads, n=args.calls, block=args.block, warmup=args.warmup, on_block=on_block
            )

    stats = {key: common.Stats.from_samples(s) for key, s in samples.items()}
    reference = endpoints[-1].label if len(endpoints) > 1 else None
    out.print(
        common.latency_table(
            "CRI unary RPC latency (client-side)",
            stats,
            case_header="RPC",
            target_header="endpoint",
            reference=reference,
            caption=_caption(endpoints, args),
        )
    )
    failed = {key: s for key, s in stats.items() if s.error_count}
    for (rpc, label), s in failed.items():
        kinds = ", ".join(f"{kind} x{count}" for kind, count in s.errors.items())
        err.print(f"[bold red]errors[/] {rpc} @ {label}: {kinds}")

    if args.json:
        results: list[dict[str, Any]] = []
        for (rpc, label), s in stats.items():
            entry: dict[str, Any] = {"case": rpc, "target": label, "stats": s.to_json()}
            if reference is not None:
                ref = stats[rpc, reference]
                entry["vs_reference"] = {
                    "p50": common.ratio(s.p50_ns, ref.p50_ns),
                    "p99": common.ratio(s.p99_ns, ref.p99_ns),
                }
            if args.raw:
                entry["latencies_ns"] = samples[rpc, label].latencies_ns
            results.append(entry)
        params = {
            "calls": args.calls,
            "warmup": args.warmup,
            "block": args.block,
            "concurrency": args.concurrency,
            "timeout_s": args.timeout,
            "rpcs": rpcs,
            "reference": reference,
        }
        document = common.build_report(
            "rpc_latency",
            params=params,
            targets=[e.describe() for e in endpoints],
            results=results,
            started=started,
        )
        common.write_report(args.json, document)
        if args.json != "-":
            err.print(f"wrote {args.json}")
    return 1 if failed else 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.calls is None:
        args.calls = QUICK_CALLS if args.quick else DEFAULT_CALLS
    if args.warmup is None:
        args.warmup = QUICK_WARMUP if args.quick else DEFAULT_WARMUP
    if args.timeout <= 0:
        build_parser().error("--timeout must be positive")
    try:
        return run(args)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
