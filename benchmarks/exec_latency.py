"""Exec latency of CRI runtimes: ExecSync of ``true``, and setting up an exec session.

    sudo python -m benchmarks.exec_latency --world --json exec-latency.json
    sudo python -m benchmarks.exec_latency \\
        --endpoint pouch=unix:///run/pouch/pouch.sock \\
        --endpoint containerd=unix:///run/containerd/containerd.sock --image REF

With ``--world`` the benchmark builds :class:`benchmarks._world.World` (a
registry on loopback, a private pouchd and a private containerd; containerd
last, so it is the reference for the ratios) and tears it down at the end,
checking that nothing is left on the host.  Otherwise it drives the endpoints
given (the LAST is the reference), which must be able to pull ``--image`` (by
default busybox, pushed to a registry the benchmark starts on
``127.0.0.1:--registry-port``).

On every runtime, one pod (host network) with one busybox container running
``sleep``; then, alternating between runtimes in blocks after a discarded
warm-up (:func:`benchmarks._common.alternate`), each case timed on the client:

* **ExecSync true**: one ``ExecSync(cmd=["true"])`` call; an exit code other
  than 0 counts as a failure.
* **exec session (websocket)**, **exec session (spdy)**: what ``kubectl exec``
  and ``pouch exec`` wait for before they can return: the ``Exec`` RPC
  (``cmd=["true"]``, stdout and stderr), the upgrade of a new connection to
  the URL it returned (WebSocket ``v5.channel.k8s.io``, else ``v4``; or
  SPDY/3.1 ``v4.channel.k8s.io`` and its streams), and the session until the
  final status, read and checked (``Success``).  The client is pouch's own,
  ``pouch.stream.client``, on Trio: the same for every runtime (containerd's
  stream server is a copy of the kubelet's, and speaks both).

Exit status: 0 when everything succeeded, 1 when any operation failed (the
numbers are still printed and written) or the world left something behind, 2
on a usage error or a runtime that cannot run the workload at all.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import shutil
import sys
import tempfile
import time
import uuid
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import grpc
import trio
from cri_api.v1 import api_pb2
from rich.console import Console
from rich.markup import escape

from benchmarks import _common as common
from benchmarks import _world as world_mod
from pouch.stream import client as stream_client

if TYPE_CHECKING:
    import datetime
    from collections.abc import Callable, Sequence

DEFAULT_CALLS: Final = 200
QUICK_CALLS: Final = 30
DEFAULT_WARMUP: Final = 10
QUICK_WARMUP: Final = 3
DEFAULT_REGISTRY_PORT: Final = 5000
LOG_WIDTH: Final = 170
POD_NAMESPACE: Final = "pouch-bench"
COMMAND: Final = ("true",)

EXEC_SYNC: Final = "ExecSync true"
SESSION: Final = "exec session ({})"
TRANSPORTS: Final = ("websocket", "spdy")


# ---------------------------------------------------------------------------
# Targets


@dataclass
class Target:
    """A connected endpoint, what is known of its daemon, and its sleeping container."""

    endpoint: common.Endpoint
    runtime: world_mod.Runtime
    pod_id: str = ""
    container_id: str = ""
    #: The subprotocol each transport negotiated with this runtime.
    protocols: dict[str, str] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return self.endpoint.label


class PreflightError(Exception):
    """A runtime cannot pull the image, run the container, or exec in it."""


class ExecFailed(Exception):
    """The command ran but did not succeed; the message says how."""


def _details(exc: BaseException) -> str:
    if isinstance(exc, grpc.RpcError) and isinstance(exc, grpc.Call):
        return f"{exc.code().name}: {exc.details()}"
    return f"{type(exc).__name__}: {exc}"


def error_key(exc: BaseException) -> str:
    """How a failed operation is counted: a gRPC status, or the kind of stream failure."""
    if isinstance(exc, grpc.RpcError):
        return common.error_name(exc)
    return type(exc).__name__


def start_container(target: Target, image: str, log_root: Path, timeout: float) -> None:
    """A hostNetwork pod with one busybox ``sleep`` container, as a kubelet would make it."""
    rt = target.endpoint.runtime
    namespaces = api_pb2.NamespaceOption(
        network=api_pb2.NODE, pid=api_pb2.CONTAINER, ipc=api_pb2.POD
    )
    name = f"exec-bench-{target.label}"
    uid = uuid.uuid4().hex
    log_dir = log_root / f"{POD_NAMESPACE}_{name}_{uid}"
    log_dir.mkdir(parents=True)
    linux = api_pb2.LinuxPodSandboxConfig(
        security_context=api_pb2.LinuxSandboxSecurityContext(namespace_options=namespaces)
    )
    if target.runtime.cgroup_parent:
        linux.cgroup_parent = target.runtime.cgroup_parent
    pod = api_pb2.PodSandboxConfig(
        metadata=api_pb2.PodSandboxMetadata(name=name, uid=uid, namespace=POD_NAMESPACE),
        log_directory=str(log_dir),
        labels={"io.kubernetes.pod.name": name, "pouch-bench": "1"},
        linux=linux,
    )
    target.endpoint.image.PullImage(
        api_pb2.PullImageRequest(image=api_pb2.ImageSpec(image=image)), timeout=timeout
    )
    target.pod_id = rt.RunPodSandbox(
        api_pb2.RunPodSandboxRequest(config=pod), timeout=timeout
    ).pod_sandbox_id
    container = api_pb2.ContainerConfig(
        metadata=api_pb2.ContainerMetadata(name="sleep"),
        image=api_pb2.ImageSpec(image=image),
        command=["sleep", "100000"],
        log_path="sleep/0.log",
        linux=api_pb2.LinuxContainerConfig(
            security_context=api_pb2.LinuxContainerSecurityContext(namespace_options=namespaces)
        ),
    )
    target.container_id = rt.CreateContainer(
        api_pb2.CreateContainerRequest(
            pod_sandbox_id=target.pod_id, config=container, sandbox_config=pod
        ),
        timeout=timeout,
    ).container_id
    rt.StartContainer(
        api_pb2.StartContainerRequest(container_id=target.container_id), timeout=timeout
    )


def remove_container(target: Target, timeout: float) -> None:
    """Untimed clean-up; errors are ignored (a world sweeps later anyway)."""
    rt = target.endpoint.runtime
    with contextlib.suppress(grpc.RpcError):
        if target.container_id:
            rt.StopContainer(
                api_pb2.StopContainerRequest(container_id=target.container_id, timeout=0),
                timeout=timeout,
            )
            rt.RemoveContainer(
                api_pb2.RemoveContainerRequest(container_id=target.container_id),
                timeout=timeout,
            )
    with contextlib.suppress(grpc.RpcError):
        if target.pod_id:
            rt.StopPodSandbox(
                api_pb2.StopPodSandboxRequest(pod_sandbox_id=target.pod_id), timeout=timeout
            )
            rt.RemovePodSandbox(
                api_pb2.RemovePodSandboxRequest(pod_sandbox_id=target.pod_id), timeout=timeout
            )


# ---------------------------------------------------------------------------
# The operations


def exec_sync(target: Target, timeout: float) -> None:
    response = target.endpoint.runtime.ExecSync(
        api_pb2.ExecSyncRequest(
            container_id=target.container_id, cmd=list(COMMAND), timeout=int(timeout)
        ),
        timeout=timeout + 5,
    )
    if response.exit_code != 0:
        raise ExecFailed(f"exit code {response.exit_code}: {response.stderr[:200]!r}")


class _Discard:
    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await trio.lowlevel.checkpoint()


async def exec_session(target: Target, transport: str, deadline: float) -> None:
    """Exec RPC, upgrade, session to the final status.

    The RPC is grpcio's, blocking the Trio loop: nothing else runs in it.
    """
    timeout = deadline
    url = target.endpoint.runtime.Exec(
        api_pb2.ExecRequest(
            container_id=target.container_id, cmd=list(COMMAND), stdout=True, stderr=True
        ),
        timeout=timeout,
    ).url
    with trio.fail_after(timeout):
        result = await stream_client.remote_command(
            url,
            stdout=_Discard(),
            stderr=_Discard(),
            transport="spdy" if transport == "spdy" else "websocket",
            connect_timeout=timeout,
        )
    target.protocols[transport] = result.protocol
    if result.status is None or not result.status.success:
        raise ExecFailed(f"status {result.status}")


async def _timed_sessions(
    target: Target, transport: str, count: int, deadline: float
) -> common.Samples:
    samples = common.Samples()
    perf = time.perf_counter_ns
    start = perf()
    for _ in range(count):
        t0 = perf()
        try:
            await exec_session(target, transport, deadline)
            t1 = perf()
        except (Exception, trio.TooSlowError) as exc:  # counted, never fatal
            samples.errors[error_key(exc)] += 1
        else:
            samples.latencies_ns.append(t1 - t0)
    samples.wall_ns = perf() - start
    return samples


def session_workload(target: Target, transport: str, timeout: float) -> Callable[[int], Any]:
    """``count -> Samples``: a block of sessions in one ``trio.run`` (its start is not timed)."""

    def run(count: int) -> common.Samples:
        return trio.run(_timed_sessions, target, transport, count, timeout)

    return run


def preflight(target: Target, timeout: float) -> None:
    """Each case once, checked, before anything is timed."""
    try:
        exec_sync(target, timeout)
        for transport in TRANSPORTS:
            trio.run(exec_session, target, transport, timeout)
    except (grpc.RpcError, ExecFailed, stream_client.StreamClientError, trio.TooSlowError) as exc:
        raise PreflightError(f"{target.label} cannot exec: {_details(exc)}") from exc


# ---------------------------------------------------------------------------
# Measuring and reporting


@dataclass
class Outcome:
    targets: list[Target]
    image: str
    samples: dict[tuple[str, str], common.Samples] = field(default_factory=dict)
    stats: dict[tuple[str, str], common.Stats] = field(default_factory=dict)
    leftovers: list[str] | None = None
    world: dict[str, Any] | None = None
    timings: dict[str, float] = field(default_factory=dict)


def cases() -> list[str]:
    return [EXEC_SYNC, *(SESSION.format(t) for t in TRANSPORTS)]


def _measure(
    targets: list[Target], image: str, log_root: Path, args: argparse.Namespace, err: Console
) -> Outcome:
    outcome = Outcome(targets=targets, image=image)
    try:
        for target in targets:
            try:
                start_container(target, image, log_root, args.timeout)
            except grpc.RpcError as exc:
                raise PreflightError(
                    f"{target.label} cannot run a container: {_details(exc)}"
                ) from exc
            preflight(target, args.timeout)
            protocols = ", ".join(f"{t} {p}" for t, p in target.protocols.items())
            err.print(f"preflight: {target.label} execs ({escape(protocols)})")

        workloads: dict[tuple[str, str], Callable[[int], common.Samples]] = {}
        for case in cases():
            for target in targets:
                if case == EXEC_SYNC:
                    op = functools.partial(exec_sync, target, args.timeout)
                    workloads[case, target.label] = functools.partial(
                        common.run_timed, op, error_key=error_key
                    )
                else:
                    transport = case.removeprefix("exec session (").removesuffix(")")
                    workloads[case, target.label] = session_workload(
                        target, transport, args.timeout
                    )
        t0 = time.monotonic()
        outcome.samples = common.alternate(
            workloads, n=args.calls, block=args.block, warmup=args.warmup
        )
        outcome.timings["measure_s"] = time.monotonic() - t0
        outcome.stats = {key: common.Stats.from_samples(s) for key, s in outcome.samples.items()}
    finally:
        for target in targets:
            remove_container(target, args.timeout)
    return outcome


def _caption(targets: Sequence[Target], args: argparse.Namespace, image: str) -> str:
    lines = []
    for target in targets:
        v = target.endpoint.version
        protocols = ", ".join(f"{t}: {p}" for t, p in target.protocols.items())
        lines.append(
            f"{target.label} = {target.endpoint.address} ({v['runtime_name']} "
            f"{v['runtime_version']}); stream protocols {protocols}"
        )
    lines.append(
        f"{args.calls} operations per row after {args.warmup} warm-up, blocks of {args.block}; "
        f"`true` in a running busybox container ({image}); {common.PERCENTILE_METHOD} "
        "percentiles over successful operations."
    )
    lines.append(
        "exec session = Exec RPC + connection upgrade + session to the final status "
        "(pouch.stream.client on Trio)."
    )
    if len(targets) > 1:
        lines.append(
            f"p50/ref, p99/ref: divided by the reference's ({targets[-1].label}, the last "
            "runtime) for the same case; above 1 is slower."
        )
    return "\n".join(lines)


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
            "exec latency (client-side)",
            outcome.stats,
            case_header="case",
            target_header="runtime",
            reference=reference,
            caption=_caption(targets, args, outcome.image),
        )
    )
    failed = False
    for (case, label), s in outcome.stats.items():
        if s.error_count:
            failed = True
            kinds = ", ".join(f"{kind} x{count}" for kind, count in s.errors.items())
            err.print(f"[bold red]errors[/] {escape(f'{case} @ {label}: {kinds}')}")
    if reference is not None:
        for case in cases():
            ref = outcome.stats[case, reference]
            for target in targets[:-1]:
                s = outcome.stats[case, target.label]
                p50 = common.ratio(s.p50_ns, ref.p50_ns)
                p99 = common.ratio(s.p99_ns, ref.p99_ns)
                err.print(
                    f"{case}: {target.label}/{reference} p50 "
                    f"{'-' if p50 is None else f'{p50:.2f}x'}, p99 "
                    f"{'-' if p99 is None else f'{p99:.2f}x'}"
                )
    if outcome.leftovers is not None:
        if outcome.leftovers:
            failed = True
            err.print("[bold red]the world left things on the host:[/]")
            for item in outcome.leftovers:
                err.print(f"  {escape(item)}")
        else:
            err.print("host check: nothing left")

    if args.json:
        results: list[dict[str, Any]] = []
        for (case, label), s in outcome.stats.items():
            entry: dict[str, Any] = {"case": case, "target": label, "stats": s.to_json()}
            if reference is not None:
                ref = outcome.stats[case, reference]
                entry["vs_reference"] = {
                    "p50": common.ratio(s.p50_ns, ref.p50_ns),
                    "p99": common.ratio(s.p99_ns, ref.p99_ns),
                }
            if args.raw:
                entry["latencies_ns"] = outcome.samples[case, label].latencies_ns
            results.append(entry)
        params = {
            "calls": args.calls,
            "warmup": args.warmup,
            "block": args.block,
            "timeout_s": args.timeout,
            "command": list(COMMAND),
            "image": outcome.image,
            "world": args.world,
            "reference": reference,
            "transports": list(TRANSPORTS),
        }
        document = common.build_report(
            "exec_latency",
            params=params,
            targets=[
                {**t.endpoint.describe(), "pid": t.runtime.pid, "protocols": t.protocols}
                for t in targets
            ],
            results=results,
            started=started,
        )
        document["world"] = outcome.world
        document["leftovers"] = outcome.leftovers
        document["wall_s"] = {k: round(v, 3) for k, v in outcome.timings.items()}
        common.write_report(args.json, document)
        if args.json != "-":
            err.print(f"wrote {args.json}")
    return 1 if failed else 0


def _connect(runtimes: Sequence[world_mod.Runtime], timeout: float) -> list[Target]:
    targets = []
    for runtime in runtimes:
        spec = common.EndpointSpec(runtime.address, runtime.label)
        targets.append(Target(common.connect(spec, timeout=min(timeout, 10.0)), runtime))
    return targets


def run(args: argparse.Namespace) -> int:
    from benchmarks.lifecycle import _endpoint_image, discover

    err = Console(stderr=True)
    if not err.is_terminal:
        err.width = LOG_WIDTH
    out = err if args.json == "-" else Console()
    if not out.is_terminal:
        out.width = LOG_WIDTH
    started = common.now()
    t_start = time.monotonic()
    leftovers: list[str] | None = None
    world_info: dict[str, Any] | None = None
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
                    }
                    targets = _connect(w.runtimes, args.timeout)
                    try:
                        assert w.base is not None
                        outcome = _measure(targets, w.busybox_ref, w.base / "logs", args, err)
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
                image = stack.enter_context(_endpoint_image(args, err))
                log_root = Path(tempfile.mkdtemp(prefix="pouch-bench-logs-"))
                stack.callback(shutil.rmtree, log_root, True)
                outcome = _measure(targets, image, log_root, args, err)
    except world_mod.WorldError as exc:
        err.print(f"[bold red]error:[/] {escape(str(exc))}")
        if args.world and not args.no_containerd:
            err.print("(--no-containerd measures pouchd alone)")
        return 2
    except (common.ConnectError, PreflightError) as exc:
        err.print(f"[bold red]error:[/] {escape(str(exc))}")
        if leftovers:
            err.print(f"[bold red]left on the host:[/] {escape(str(leftovers))}")
        return 2
    outcome.leftovers = leftovers
    outcome.world = world_info
    outcome.timings["total_s"] = time.monotonic() - t_start
    return _report(outcome, args, started, out, err)


# ---------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.exec_latency",
        description=(
            "Measure ExecSync of `true` and the set-up of an exec session (Exec RPC, "
            "WebSocket or SPDY upgrade, `true` to its final status) on CRI runtimes, side by "
            "side. With --world, builds a private registry, pouchd and containerd (the "
            "reference) and removes them afterwards; otherwise drives the --endpoint runtimes "
            "(the LAST is the reference)."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument(
        "--world",
        action="store_true",
        help="build and tear down a local world: registry, pouchd, containerd (needs root)",
    )
    where.add_argument(
        "--endpoint",
        action="append",
        metavar="[LABEL=]ADDRESS",
        help="CRI endpoint; repeat to compare (the last one is the reference)",
    )
    parser.add_argument("--no-containerd", action="store_true", help="with --world: pouchd alone")
    parser.add_argument(
        "--image",
        help="with --endpoint: the image to run (default: busybox, pushed to a registry "
        "started on 127.0.0.1:--registry-port)",
    )
    parser.add_argument("--registry-port", type=int, default=DEFAULT_REGISTRY_PORT)
    parser.add_argument(
        "-n",
        "--calls",
        type=common.positive_int,
        default=None,
        help=f"measured operations per case per runtime (default {DEFAULT_CALLS}, "
        f"{QUICK_CALLS} with --quick)",
    )
    parser.add_argument(
        "--warmup",
        type=common.non_negative_int,
        default=None,
        help=f"discarded operations per case per runtime first (default {DEFAULT_WARMUP}, "
        f"{QUICK_WARMUP} with --quick)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"CI smoke run: -n {QUICK_CALLS} --warmup {QUICK_WARMUP} unless given",
    )
    parser.add_argument(
        "--block", type=common.positive_int, default=10, help="operations per turn when alternating"
    )
    parser.add_argument(
        "--timeout", type=float, default=30.0, help="deadline of each operation, in seconds"
    )
    parser.add_argument("--json", metavar="PATH", help="write a JSON report here ('-': stdout)")
    parser.add_argument(
        "--raw", action="store_true", help="include every latency sample in the JSON report"
    )
    return parser


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
