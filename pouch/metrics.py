"""The daemon's own Prometheus metrics (``prometheus-client``), off by default.

RPC latency per RPC and status code, image pull bytes and durations, pods
and containers by state, stream sessions.  Served on a configured local
address by a small HTTP/1.1 listener in the daemon's servers nursery, so
it stops with the daemon like everything else (prometheus-client's own
server runs in an unsupervised thread).
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Final

import h11
import trio
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from pouch.log import get_logger

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Iterator

log = get_logger("pouch.metrics")

REGISTRY: Final = CollectorRegistry()
ProcessCollector(registry=REGISTRY)

RPC_DURATION: Final = Histogram(
    "pouch_rpc_duration_seconds",
    "CRI and pouch.v1 call latency, by call and gRPC status code.",
    ["rpc", "code"],
    registry=REGISTRY,
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
PULL_BYTES: Final = Counter(
    "pouch_image_pull_bytes_total", "Bytes of image blobs downloaded.", registry=REGISTRY
)
PULL_DURATION: Final = Histogram(
    "pouch_image_pull_duration_seconds",
    "Wall time of image pulls that completed.",
    registry=REGISTRY,
    buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
)
STREAM_SESSIONS: Final = Gauge(
    "pouch_stream_sessions",
    "Open exec, attach and port-forward sessions.",
    ["kind"],
    registry=REGISTRY,
)


class StateCollector(Collector):
    """Pods and containers by state, read from the managers when scraped."""

    def __init__(self, counts: Callable[[], tuple[dict[str, int], dict[str, int]]]) -> None:
        self._counts = counts

    def collect(self) -> Iterable[Metric]:
        pods, containers = self._counts()
        pod_family = GaugeMetricFamily("pouch_pods", "Pod sandboxes by state.", labels=["state"])
        for state, n in sorted(pods.items()):
            pod_family.add_metric([state], n)
        ctr_family = GaugeMetricFamily("pouch_containers", "Containers by state.", labels=["state"])
        for state, n in sorted(containers.items()):
            ctr_family.add_metric([state], n)
        return [pod_family, ctr_family]


@contextlib.contextmanager
def registered(collector: Collector) -> Iterator[None]:
    REGISTRY.register(collector)
    try:
        yield
    finally:
        REGISTRY.unregister(collector)


async def serve_metrics(
    address: str,
    port: int,
    stop: trio.Event,
    *,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``GET /metrics`` until *stop* is set; report ``host:port``."""
    listeners = await trio.open_tcp_listeners(port, host=address)
    bound = f"{address}:{listeners[0].socket.getsockname()[1]}"
    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.serve_listeners, _handle, listeners)
        log.info("serving metrics", address=bound)
        task_status.started(bound)
        await stop.wait()
        nursery.cancel_scope.cancel()


async def _handle(stream: trio.SocketStream) -> None:
    conn = h11.Connection(h11.SERVER)
    async with stream:
        with (
            trio.move_on_after(10),
            contextlib.suppress(h11.RemoteProtocolError, trio.BrokenResourceError),
        ):
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    data = await stream.receive_some(65536)
                    if not data:
                        return
                    conn.receive_data(data)
                    continue
                if not isinstance(event, h11.Request):
                    return
                if event.target.split(b"?")[0] == b"/metrics":
                    body = await trio.to_thread.run_sync(generate_latest, REGISTRY)
                    status, ctype = 200, CONTENT_TYPE_LATEST
                else:
                    body, status, ctype = b"not found\n", 404, "text/plain"
                headers = [
                    ("content-type", ctype),
                    ("content-length", str(len(body))),
                    ("connection", "close"),
                ]
                await stream.send_all(conn.send(h11.Response(status_code=status, headers=headers)))
                await stream.send_all(conn.send(h11.Data(data=body)))
                await stream.send_all(conn.send(h11.EndOfMessage()))
                return
