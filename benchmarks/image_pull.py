"""Cold image pull time and throughput against CRI endpoints, next to the floor.

    python -m benchmarks.image_pull \\
        --endpoint pouch=unix:///run/pouch/pouch.sock \\
        --endpoint containerd=unix:///run/containerd/containerd.sock \\
        --iterations 5 --json image-pull.json

The benchmark starts its own registry (Debian's ``docker-registry`` behind the
counting proxy of :mod:`tests.support.registry`, on ``127.0.0.1:5000`` by
default) unless ``--registry`` names one, and pushes two images built offline
by :mod:`tests.support.images`: a big one (``big_image``: busybox plus 5
layers of incompressible data, 200 MiB, 30 MiB with ``--quick``) and the small
busybox image, under distinct repositories.

Every endpoint must reach that registry over plain HTTP (pouchd:
``[registry] insecure = ["127.0.0.1:5000"]``).  For each endpoint and image,
one operation is: RemoveImage both images (untimed, then checked with
ImageStatus), then PullImage, timed on the client.  Operations alternate
between endpoints and images round-robin (:func:`benchmarks._common.alternate`).

In the same run, interleaved with the pulls, three floors are measured:

* ``disk write``: ``dd if=/dev/zero bs=1M conv=fsync`` of the big image's size
  into ``--scratch-dir`` (put it on the endpoints' filesystem);
* ``unpack``: :func:`pouch.image.unpack.apply_layer` of every layer of the big
  image, read from the test image cache, into fresh directories under
  ``--scratch-dir``, serially in one thread (pouchd unpacks up to
  ``max_concurrent_downloads`` layers at once);
* ``download``: every blob of the big image streamed from the registry with
  httpx and discarded, ``--download-streams`` at once, from a separate process
  (so that it does not share a GIL with the registry proxy).

Exit status: 0 when every operation succeeded, 1 when any failed (the numbers
are still printed and written), 2 on a usage error, an endpoint that does not
answer, or one that cannot pull from the registry.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import multiprocessing
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import grpc
import httpx
from cri_api.v1 import api_pb2
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from benchmarks import _common as common
from pouch.image.unpack import apply_layer
from tests.support.images import big_image, busybox_image
from tests.support.registry import Registry, RegistryError, push, push_with

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Sequence

    from tests.support.images import Image

DEFAULT_ITERATIONS: Final = 5
QUICK_ITERATIONS: Final = 3
DEFAULT_WARMUP: Final = 1
QUICK_WARMUP: Final = 1
DEFAULT_BIG_MB: Final = 200
QUICK_BIG_MB: Final = 30
DEFAULT_BIG_LAYERS: Final = 5
DEFAULT_REGISTRY_PORT: Final = 5000
DEFAULT_SCRATCH: Final = "/var/tmp"
DEFAULT_DOWNLOAD_STREAMS: Final = 3  # pouchd's and containerd's max_concurrent_downloads
BIG_REPO: Final = "pouch-bench/big"
SMALL_REPO: Final = "pouch-bench/busybox"
SMALL_TAG: Final = "latest"
#: Throughput unit: decimal megabytes, as dd, curl and registries print them.
MB: Final = 1_000_000
MIB: Final = 1 << 20
#: Console width when printing to a file or CI log instead of a terminal.
LOG_WIDTH: Final = 160

# Case names: the two pulls, then the floors.
BIG: Final = "pull big"
SMALL: Final = "pull small"
DOWNLOAD: Final = "download"
UNPACK: Final = "unpack"
DISK: Final = "disk write"


# ---------------------------------------------------------------------------
# Measurement helpers


def _measure(op: Callable[[], int], count: int) -> common.Samples:
    """Run ``op`` ``count`` times; ``op`` times the part that counts and returns its ns.

    Preparation and clean-up inside ``op`` (removing an image, deleting a
    scratch tree) are left out of the sample and of ``wall_ns``.
    """
    samples = common.Samples()
    for _ in range(count):
        try:
            elapsed = op()
        except Exception as exc:  # counted, never fatal: a benchmark reports failures
            samples.errors[common.error_name(exc)] += 1
        else:
            samples.latencies_ns.append(elapsed)
            samples.wall_ns += elapsed
    return samples


def _rates(nbytes: int, stats: common.Stats) -> dict[str, float | None]:
    """MB/s at the p50, p99 and mean durations (p99 duration: the slow end)."""

    def rate(ns: float | None) -> float | None:
        return nbytes / MB / (ns / 1e9) if ns else None

    return {"p50": rate(stats.p50_ns), "p99": rate(stats.p99_ns), "mean": rate(stats.mean_ns)}


# ---------------------------------------------------------------------------
# The registry


class PinnedRegistry(Registry):
    """:class:`tests.support.registry.Registry` with its proxy on a chosen port.

    The support class lets the kernel pick the port, so that parallel tests
    never collide; a benchmark needs a port the endpoints' configuration can
    name in advance.  Port 0 keeps the kernel's choice.
    """

    def __init__(self, port: int) -> None:
        super().__init__()
        self._pinned_port = port

    def _start(self) -> None:
        super()._start()
        proxy = self._proxy
        if self._pinned_port == 0 or proxy is None:
            return
        # Move the proxy's listener: stop accepting on the ephemeral port (nobody
        # has connected yet) and accept on the chosen one with the same loop.
        proxy.close()
        proxy._listener = socket.create_server(("127.0.0.1", self._pinned_port))
        proxy.port = self._pinned_port
        proxy._thread = threading.Thread(
            target=proxy._accept_loop, name="registry-proxy", daemon=True
        )
        proxy._thread.start()


@dataclass(frozen=True)
class BenchImage:
    """An image pushed for the benchmark, and how to name it."""

    case: str
    repo: str
    tag: str
    ref: str
    image: Image

    @property
    def transfer_bytes(self) -> int:
        """Manifest, config and layers: what a cold pull downloads (compressed)."""
        return self.image.manifest.size + sum(blob.size for blob in self.image.blobs)

    @property
    def paths(self) -> list[tuple[str, str | None, int]]:
        """``(path, accept, size)`` of every request a pull makes, manifest first."""
        out: list[tuple[str, str | None, int]] = [
            (
                f"/v2/{self.repo}/manifests/{self.tag}",
                self.image.media_type,
                self.image.manifest.size,
            )
        ]
        out += [(f"/v2/{self.repo}/blobs/{b.digest}", None, b.size) for b in self.image.blobs]
        return out


@contextmanager
def _registry(
    args: argparse.Namespace, big: Image, small: Image, err: Console
) -> Iterator[tuple[str, list[BenchImage], Registry | None]]:
    """Start (or use) a registry and push both images.

    Yields its URL, the images, and the registry when it is ours (its proxy
    counts requests, which proves pulls cold), else None.
    """
    big_tag = f"{args.big_mb}m-{args.big_layers}l"
    with ExitStack() as stack:
        ours: Registry | None = None
        if args.registry:
            url = args.registry if "://" in args.registry else f"http://{args.registry}"
            client = stack.enter_context(httpx.Client(base_url=url, timeout=300))
            for repo, tag, image in ((BIG_REPO, big_tag, big), (SMALL_REPO, SMALL_TAG, small)):
                push_with(client, repo, tag, image)
        else:
            ours = stack.enter_context(PinnedRegistry(args.registry_port))
            url = ours.url
            for repo, tag, image in ((BIG_REPO, big_tag, big), (SMALL_REPO, SMALL_TAG, small)):
                push(ours, repo, tag, image, http_timeout=300)
        host = httpx.URL(url).netloc.decode()
        err.print(f"registry {url}: pushed {host}/{BIG_REPO}:{big_tag} and {SMALL_REPO}")
        yield (
            url,
            [
                BenchImage(BIG, BIG_REPO, big_tag, f"{host}/{BIG_REPO}:{big_tag}", big),
                BenchImage(SMALL, SMALL_REPO, SMALL_TAG, f"{host}/{SMALL_REPO}:{SMALL_TAG}", small),
            ],
            ours,
        )


# ---------------------------------------------------------------------------
# Pulls


class NotRemoved(Exception):
    """The image was still there after RemoveImage: a pull would not be cold."""


class WarmPull(Exception):
    """A pull did not fetch every layer from the registry: the runtime kept some."""


class PullError(Exception):
    """PullImage answered OK without an image reference."""


def _spec(ref: str) -> api_pb2.ImageSpec:
    return api_pb2.ImageSpec(image=ref)


def _present(endpoint: common.Endpoint, ref: str, timeout: float) -> bool:
    response = endpoint.image.ImageStatus(
        api_pb2.ImageStatusRequest(image=_spec(ref)), timeout=timeout
    )
    return response.HasField("image") and bool(response.image.id)


def _remove(endpoint: common.Endpoint, ref: str, timeout: float) -> None:
    """RemoveImage, then check with ImageStatus that the image is gone."""
    try:
        endpoint.image.RemoveImage(api_pb2.RemoveImageRequest(image=_spec(ref)), timeout=timeout)
    except grpc.RpcError as exc:
        # RemoveImage is idempotent in CRI, but some runtimes answer NOT_FOUND.
        if not (isinstance(exc, grpc.Call) and exc.code() == grpc.StatusCode.NOT_FOUND):
            raise
    if _present(endpoint, ref, timeout):
        raise NotRemoved(f"{ref} is still present after RemoveImage")


def _pull_once(
    endpoint: common.Endpoint,
    image: BenchImage,
    every: Sequence[str],
    timeout: float,
    registry: Registry | None,
) -> int:
    """Remove every benchmark image (shared layers included), then time one PullImage.

    With our own registry, its proxy's records prove the pull cold: every
    layer blob must have been fetched, or the sample is dropped as WarmPull.
    """
    for ref in every:
        _remove(endpoint, ref, timeout)
    request = api_pb2.PullImageRequest(image=_spec(image.ref))
    if registry is not None:
        registry.clear_requests()
    t0 = time.perf_counter_ns()
    response = endpoint.image.PullImage(request, timeout=timeout)
    elapsed = time.perf_counter_ns() - t0
    if not response.image_ref:
        raise PullError(f"PullImage {image.ref} returned no image_ref")
    if registry is not None:
        layers = [layer.blob.digest for layer in image.image.layers]
        skipped = [digest for digest in layers if not registry.blob_fetches(digest)]
        if skipped:
            raise WarmPull(f"{len(skipped)} of {len(layers)} layers were not fetched")
    return elapsed


def _rpc_details(exc: BaseException) -> str:
    if isinstance(exc, grpc.RpcError) and isinstance(exc, grpc.Call):
        return f"{exc.code().name}: {exc.details()}"
    return f"{type(exc).__name__}: {exc}"


# ---------------------------------------------------------------------------
# Floors


_DD_OUTPUT = re.compile(r"^(\d+) bytes .*copied, ([0-9.]+(?:e[-+]?\d+)?) s", re.MULTILINE)


def _dd_once(scratch: Path, mib: int) -> int:
    """Write ``mib`` MiB of zeros with ``dd conv=fsync``; dd's own time in ns."""
    fd, name = tempfile.mkstemp(prefix="pouch-bench-dd-", dir=scratch)
    os.close(fd)
    try:
        cmd = ["dd", "if=/dev/zero", f"of={name}", "bs=1M", f"count={mib}", "conv=fsync"]
        t0 = time.perf_counter_ns()
        proc = subprocess.run(
            cmd, capture_output=True, text=True, env={**os.environ, "LC_ALL": "C"}, check=False
        )
        elapsed = time.perf_counter_ns() - t0
        if proc.returncode != 0:
            raise OSError(f"dd failed ({proc.returncode}): {proc.stderr.strip()}")
        match = _DD_OUTPUT.search(proc.stderr)
        if match and int(match.group(1)) != mib * MIB:
            raise OSError(f"dd wrote {match.group(1)} bytes, expected {mib * MIB}")
        # dd's figure covers open to fsync, without the process start; ours is the fallback.
        return round(float(match.group(2)) * 1e9) if match else elapsed
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name)


class Unpack:
    """Apply every layer of an image into fresh directories; records the bytes."""

    def __init__(self, image: Image, scratch: Path) -> None:
        self.image = image
        self.scratch = scratch
        self.uncompressed_bytes = 0

    def __call__(self) -> int:
        elapsed = 0
        total = 0
        dirs = []
        try:
            for layer in self.image.layers:
                dest = Path(tempfile.mkdtemp(prefix="pouch-bench-unpack-", dir=self.scratch))
                dirs.append(dest)
                blob = layer.blob
                t0 = time.perf_counter_ns()
                with (
                    blob.path.open("rb") if blob.path is not None else io.BytesIO(blob.read_bytes())
                ) as stream:
                    stats = apply_layer(stream, dest, media_type=blob.media_type, max_bytes=2**63)
                elapsed += time.perf_counter_ns() - t0
                if stats.diff_id != layer.diff_id:
                    raise ValueError(f"layer {blob.digest} unpacked to {stats.diff_id}")
                total += stats.uncompressed_bytes
        finally:
            for dest in dirs:
                shutil.rmtree(dest, ignore_errors=True)
        self.uncompressed_bytes = total
        return elapsed


# The download runs in a worker process: the registry proxy of tests.support runs
# in threads of this one, and a client here would compete with it for the GIL.
_worker_client: httpx.Client | None = None
_worker_pool: ThreadPoolExecutor | None = None


def _worker_ready() -> bool:
    """Run once before measuring, so that no sample pays for starting the worker."""
    return True


def _download_job(url: str, paths: list[tuple[str, str | None, int]], streams: int) -> int:
    """In the worker: stream every path, ``streams`` at once, discard; ns taken."""
    global _worker_client, _worker_pool
    if _worker_client is None or _worker_pool is None:
        _worker_client = httpx.Client(
            base_url=url,
            timeout=300,
            follow_redirects=True,
            limits=httpx.Limits(max_connections=streams, max_keepalive_connections=streams),
        )
        _worker_pool = ThreadPoolExecutor(max_workers=streams)
    client = _worker_client

    def fetch(item: tuple[str, str | None, int]) -> None:
        path, accept, size = item
        got = 0
        with client.stream("GET", path, headers={"accept": accept} if accept else None) as r:
            r.raise_for_status()
            for chunk in r.iter_raw(MIB):
                got += len(chunk)
        if got != size:
            raise OSError(f"GET {path}: {got} bytes, expected {size}")

    t0 = time.perf_counter_ns()
    list(_worker_pool.map(fetch, paths))
    return time.perf_counter_ns() - t0


# ---------------------------------------------------------------------------
# Command line


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"not a port: {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.image_pull",
        description=(
            "Measure cold PullImage time and throughput (a big multi-layer image and a small "
            "one) against one or more CRI endpoints, alternating between them, next to the "
            "floor: disk write bandwidth (dd), pouch's unpack throughput and the registry "
            "download rate. With 2+ endpoints the LAST is the reference for the ratio columns."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--endpoint",
        action="append",
        required=True,
        metavar="[LABEL=]ADDRESS",
        help="CRI endpoint, e.g. unix:///run/containerd/containerd.sock or "
        "pouch=/run/pouch/pouch.sock; repeat to compare (the last one is the reference). "
        "Each must reach the registry over plain HTTP",
    )
    parser.add_argument(
        "-n",
        "--iterations",
        type=common.positive_int,
        default=None,
        help=f"measured pulls per image per endpoint, and runs of each floor "
        f"(default {DEFAULT_ITERATIONS}, {QUICK_ITERATIONS} with --quick)",
    )
    parser.add_argument(
        "--warmup",
        type=common.non_negative_int,
        default=None,
        help=f"discarded rounds first (default {DEFAULT_WARMUP}, {QUICK_WARMUP} with --quick)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"CI smoke run: a {QUICK_BIG_MB} MiB big image, -n {QUICK_ITERATIONS} "
        f"--warmup {QUICK_WARMUP} unless given",
    )
    parser.add_argument(
        "--big-mb",
        type=common.positive_int,
        default=None,
        help=f"MiB of random data in the big image (default {DEFAULT_BIG_MB}, "
        f"{QUICK_BIG_MB} with --quick)",
    )
    parser.add_argument(
        "--big-layers",
        type=common.positive_int,
        default=DEFAULT_BIG_LAYERS,
        help="data layers of the big image (busybox comes on top of them as the base layer)",
    )
    parser.add_argument(
        "--registry",
        metavar="URL",
        help="use this open registry (http://host:port) instead of starting one; "
        "the images are pushed to it",
    )
    parser.add_argument(
        "--registry-port",
        type=_port,
        default=DEFAULT_REGISTRY_PORT,
        help="port of the registry this benchmark starts on 127.0.0.1 (0: any free port; "
        "the endpoints must then allow plain HTTP to any 127.0.0.1 port)",
    )
    parser.add_argument(
        "--scratch-dir",
        type=Path,
        default=Path(DEFAULT_SCRATCH),
        help="where dd and the unpack floor write: put it on the endpoints' root filesystem",
    )
    parser.add_argument(
        "--dd-mb",
        type=common.positive_int,
        default=None,
        help="MiB dd writes per run (default: the big image's data, --big-mb plus 2)",
    )
    parser.add_argument(
        "--download-streams",
        type=common.positive_int,
        default=DEFAULT_DOWNLOAD_STREAMS,
        help="blobs downloaded at once by the download floor",
    )
    parser.add_argument(
        "--timeout", type=float, default=600.0, help="deadline of each CRI call, in seconds"
    )
    parser.add_argument("--json", metavar="PATH", help="write a JSON report here ('-': stdout)")
    parser.add_argument(
        "--raw", action="store_true", help="include every duration sample in the JSON report"
    )
    return parser


@contextmanager
def _progress(console: Console, total: int) -> Iterator[Callable[[object, int], None]]:
    """A progress bar on stderr when it is a terminal; otherwise a no-op callback."""
    if not console.is_terminal:
        yield lambda _key, _count: None
        return
    columns = (TextColumn("measuring"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task("operations", total=total)
        yield lambda _key, count: progress.advance(task, count)


# ---------------------------------------------------------------------------
# Output


def _mb(nbytes: int) -> str:
    return f"{nbytes / MB:,.1f}"


def _mbps(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:,.0f}" if value >= 99.95 else f"{value:#.3g}"  # 3 figures: 8.00, 80.1


def _throughput_table(
    rows: Sequence[tuple[str, str, int, common.Stats, Text | str]], caption: str
) -> Table:
    table = Table(title="throughput and floor", caption=caption, caption_justify="left")
    table.add_column("measure", no_wrap=True)
    table.add_column("target", no_wrap=True)
    for header in ("MB", "n", "errors", "p50", "p99", "mean", "MB/s p50", "MB/s p99", "MB/s mean"):
        table.add_column(header, justify="right", no_wrap=True)
    table.add_column("vs floor", justify="right", no_wrap=True)
    previous = None
    for case, target, nbytes, stats, versus in rows:
        if previous is not None and (case in (DOWNLOAD, UNPACK, DISK)) != previous:
            table.add_section()
        previous = case in (DOWNLOAD, UNPACK, DISK)
        rates = _rates(nbytes, stats)
        errors = Text(str(stats.error_count), style="bold red" if stats.error_count else "")
        table.add_row(
            case,
            target,
            _mb(nbytes),
            str(stats.n),
            errors,
            common.format_duration(stats.p50_ns),
            common.format_duration(stats.p99_ns),
            common.format_duration(stats.mean_ns),
            _mbps(rates["p50"]),
            _mbps(rates["p99"]),
            _mbps(rates["mean"]),
            versus,
        )
    return table


def _plain_ratio(value: float | None) -> Text:
    return Text("-" if value is None else f"{value:.2f}x")


# ---------------------------------------------------------------------------
# Main


def run(args: argparse.Namespace) -> int:
    """Build, push, measure, print and report.  Returns the exit status."""
    err = Console(stderr=True)
    out = err if args.json == "-" else Console()  # keep stdout pure JSON for '--json -'
    if not out.is_terminal:
        out.width = LOG_WIDTH
    scratch: Path = args.scratch_dir
    if not scratch.is_dir() or not os.access(scratch, os.W_OK | os.X_OK):
        err.print(f"[bold red]error:[/] --scratch-dir {escape(str(scratch))} is not writable")
        return 2
    if shutil.which("dd") is None:
        err.print("[bold red]error:[/] dd is not installed")
        return 2
    specs = [common.parse_endpoint(text) for text in args.endpoint]
    started = common.now()

    with ExitStack() as stack:
        endpoints: list[common.Endpoint] = []
        for spec in specs:
            try:
                endpoint = common.connect(spec, timeout=min(args.timeout, 10.0))
            except common.ConnectError as exc:
                err.print(f"[bold red]error:[/] {escape(str(exc))}")
                return 2
            stack.callback(endpoint.close)
            endpoints.append(endpoint)
        common.default_labels(endpoints, specs)
        labels = [e.label for e in endpoints]
        if len(set(labels)) != len(labels):
            err.print(f"[bold red]error:[/] endpoint labels must differ: {escape(str(labels))}")
            return 2

        t0 = time.monotonic()
        big, small = big_image(total_mb=args.big_mb, layers=args.big_layers), busybox_image()
        err.print(f"big image ready in {time.monotonic() - t0:.1f} s")
        try:
            url, images, ours = stack.enter_context(_registry(args, big, small, err))
        except (OSError, RegistryError, httpx.HTTPError) as exc:
            hint = ""
            if not args.registry and args.registry_port:
                hint = f" (is port {args.registry_port} taken? try --registry-port)"
            err.print(
                "[bold red]error:[/] cannot start or push to the registry: "
                + escape(f"{exc}{hint}")
            )
            return 2
        refs = [image.ref for image in images]

        # Preflight: one small pull per endpoint, so a missing "insecure" setting
        # is one clear error instead of every measurement failing.
        for endpoint in endpoints:
            try:
                _pull_once(endpoint, images[1], refs, args.timeout, None)
            except Exception as exc:
                host = httpx.URL(url).netloc.decode()
                err.print(
                    "[bold red]error:[/] "
                    + escape(
                        f"{endpoint.label} cannot pull {images[1].ref}: {_rpc_details(exc)}\n"
                        f"It must reach {url} over plain HTTP: for pouchd, "
                        f'[registry] insecure = ["{host}"]; containerd reaches 127.0.0.1 '
                        "over HTTP unless its registry config says otherwise."
                    )
                )
                return 2

        def cleanup() -> None:
            for endpoint in endpoints:
                for ref in refs:
                    with contextlib.suppress(Exception):
                        _remove(endpoint, ref, args.timeout)

        stack.callback(cleanup)

        unpack = Unpack(big, scratch)
        big_bench = images[0]
        pool = stack.enter_context(
            ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"))
        )
        pool.submit(_worker_ready).result()
        download_args = (url, big_bench.paths, args.download_streams)

        def download() -> int:
            return pool.submit(_download_job, *download_args).result()

        workloads: dict[tuple[str, str], Callable[[int], common.Samples]] = {}
        for image in images:
            for endpoint in endpoints:
                op = functools.partial(_pull_once, endpoint, image, refs, args.timeout, ours)
                workloads[image.case, endpoint.label] = functools.partial(_measure, op)
        workloads[DOWNLOAD, url] = functools.partial(_measure, download)
        workloads[UNPACK, str(scratch)] = functools.partial(_measure, unpack)
        workloads[DISK, str(scratch)] = functools.partial(
            _measure, functools.partial(_dd_once, scratch, args.dd_mb)
        )

        with _progress(err, args.iterations * len(workloads)) as on_block:
            samples = common.alternate(
                workloads, n=args.iterations, block=1, warmup=args.warmup, on_block=on_block
            )

    # ---- figures
    stats = {key: common.Stats.from_samples(s) for key, s in samples.items()}
    reference = endpoints[-1].label if len(endpoints) > 1 else None
    nbytes = {
        BIG: big_bench.transfer_bytes,
        SMALL: images[1].transfer_bytes,
        DOWNLOAD: big_bench.transfer_bytes,
        UNPACK: unpack.uncompressed_bytes,
        DISK: args.dd_mb * MIB,
    }
    floor_rate = {
        case: _rates(nbytes[case], s)["p50"]
        for (case, _target), s in stats.items()
        if case in (DOWNLOAD, UNPACK, DISK)
    }
    unpack_vs_disk = common.ratio(floor_rate[UNPACK], floor_rate[DISK])
    pull_vs_download = {
        label: common.ratio(_rates(nbytes[BIG], stats[BIG, label])["p50"], floor_rate[DOWNLOAD])
        for label in labels
    }

    pull_stats = {key: s for key, s in stats.items() if key[0] in (BIG, SMALL)}
    out.print(
        common.latency_table(
            "cold PullImage time (client-side)",
            pull_stats,
            case_header="image",
            target_header="endpoint",
            reference=reference,
            caption=_pull_caption(endpoints, images, args),
        )
    )
    rows: list[tuple[str, str, int, common.Stats, Text | str]] = []
    for (case, target), s in stats.items():
        if case == BIG:
            versus: Text | str = _plain_ratio(pull_vs_download[target])
        elif case == UNPACK:
            versus = _plain_ratio(unpack_vs_disk)
        else:
            versus = "-"
        rows.append((case, target, nbytes[case], s, versus))
    out.print(_throughput_table(rows, _floor_caption(args, big_bench, unpack)))
    out.print(
        f"unpack / disk write: {_ratio_text(unpack_vs_disk)}   "
        + "   ".join(
            f"pull / download @ {label}: {_ratio_text(r)}" for label, r in pull_vs_download.items()
        )
    )
    _warn_warm(err, pull_vs_download)
    failed = {key: s for key, s in stats.items() if s.error_count}
    for (case, target), s in failed.items():
        kinds = ", ".join(f"{kind} x{count}" for kind, count in s.errors.items())
        err.print(f"[bold red]errors[/] {escape(f'{case} @ {target}: {kinds}')}")

    if args.json:
        results: list[dict[str, Any]] = []
        for (case, target), s in stats.items():
            entry: dict[str, Any] = {
                "case": case,
                "target": target,
                "stats": s.to_json(),
                "bytes": nbytes[case],
                "mb_per_s": _rates(nbytes[case], s),
            }
            if case in (BIG, SMALL) and reference is not None:
                ref = stats[case, reference]
                entry["vs_reference"] = {
                    "p50": common.ratio(s.p50_ns, ref.p50_ns),
                    "p99": common.ratio(s.p99_ns, ref.p99_ns),
                }
            if case == BIG:
                entry["vs_download"] = pull_vs_download[target]
            if args.raw:
                entry["latencies_ns"] = samples[case, target].latencies_ns
            results.append(entry)
        params = {
            "iterations": args.iterations,
            "warmup": args.warmup,
            "big_mb": args.big_mb,
            "big_layers": args.big_layers,
            "images": {
                image.case.removeprefix("pull "): {
                    "ref": image.ref,
                    "digest": image.image.digest,
                    "layers": len(image.image.layers),
                    "transfer_bytes": image.transfer_bytes,
                }
                for image in images
            },
            "registry": url,
            "registry_started": not args.registry,
            "scratch_dir": str(scratch),
            "dd_mib": args.dd_mb,
            "download_streams": args.download_streams,
            "unpack_uncompressed_bytes": unpack.uncompressed_bytes,
            "timeout_s": args.timeout,
            "mb_bytes": MB,
            "reference": reference,
        }
        document = common.build_report(
            "image_pull",
            params=params,
            targets=[e.describe() for e in endpoints],
            results=results,
            started=started,
        )
        document["summary"] = {
            "unpack_vs_disk": unpack_vs_disk,
            "pull_vs_download": pull_vs_download,
        }
        common.write_report(args.json, document)
        if args.json != "-":
            err.print(f"wrote {args.json}")
    return 1 if failed else 0


def _ratio_text(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _warn_warm(err: Console, pull_vs_download: dict[str, float | None]) -> None:
    for label, value in pull_vs_download.items():
        if value is not None and value > 1.2:
            err.print(
                f"[yellow]warning:[/] {label} pulled the big image {value:.2f}x faster than "
                "the registry delivers it: it probably kept layers after RemoveImage "
                "(the pull was not cold)."
            )


def _pull_caption(
    endpoints: Sequence[common.Endpoint], images: Sequence[BenchImage], args: argparse.Namespace
) -> str:
    lines = []
    for endpoint in endpoints:
        v = endpoint.version
        lines.append(
            f"{endpoint.label} = {endpoint.address} ({v['runtime_name']} "
            f"{v['runtime_version']}, CRI {v['runtime_api_version']})"
        )
    for image in images:
        lines.append(
            f"{image.case.removeprefix('pull ')} = {image.ref}: {len(image.image.layers)} "
            f"layer{'s' if len(image.image.layers) > 1 else ''}, "
            f"{_mb(image.transfer_bytes)} MB to download"
        )
    lines.append(
        f"{args.iterations} cold pulls per row after {args.warmup} warm-up round(s); each after "
        f"RemoveImage of both images; {common.PERCENTILE_METHOD} percentiles; calls/s is 1/mean."
    )
    if len(endpoints) > 1:
        lines.append(
            f"p50/ref, p99/ref: divided by the reference's ({endpoints[-1].label}, the last "
            "endpoint) for the same image; above 1 is slower."
        )
    return "\n".join(lines)


def _floor_caption(args: argparse.Namespace, big: BenchImage, unpack: Unpack) -> str:
    return "\n".join(
        [
            "MB = 10^6 bytes. pull: the compressed bytes of the image / PullImage time; "
            "vs floor = pull MB/s / download MB/s (p50).",
            f"download: the {len(big.paths)} manifest and blobs of the big image over HTTP, "
            f"{args.download_streams} at once, discarded (httpx, separate process).",
            f"unpack: apply_layer of its {len(big.image.layers)} layers into "
            f"{args.scratch_dir}, one thread, MB of uncompressed tar "
            f"({_mb(unpack.uncompressed_bytes)}); vs floor = unpack MB/s / disk write MB/s.",
            f"disk write: dd if=/dev/zero bs=1M count={args.dd_mb} conv=fsync into "
            f"{args.scratch_dir} (dd's own time).",
        ]
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.iterations is None:
        args.iterations = QUICK_ITERATIONS if args.quick else DEFAULT_ITERATIONS
    if args.warmup is None:
        args.warmup = QUICK_WARMUP if args.quick else DEFAULT_WARMUP
    if args.big_mb is None:
        args.big_mb = QUICK_BIG_MB if args.quick else DEFAULT_BIG_MB
    if args.dd_mb is None:
        args.dd_mb = args.big_mb + 2  # the data layers plus about busybox's layer
    if args.timeout <= 0:
        parser.error("--timeout must be positive")
    try:
        return run(args)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
