"""The rest of the RuntimeService: events, list streams, resource updates, log reopening."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import grpc
import pytest
from cri_api.v1 import api_pb2

from pouch.cri._pb.runtime import v1 as pb
from tests.integration.test_containers import Client

pytestmark = [pytest.mark.integration, pytest.mark.root, pytest.mark.timeout(120)]


@pytest.fixture
def cri(make_daemon, registry):
    d = make_daemon(config=f'[registry]\ninsecure = ["{registry.host}"]\n').start()
    client = Client(d, registry)
    client.pull()
    yield client
    client.cleanup()


def test_events_arrive_in_order_with_statuses(cri):
    events: list[api_pb2.ContainerEventResponse] = []
    call = cri.rt.GetContainerEvents(api_pb2.GetEventsRequest(), timeout=60)

    def read():
        try:
            for ev in call:
                events.append(ev)
        except grpc.RpcError:
            pass

    reader = threading.Thread(target=read)
    reader.start()
    time.sleep(0.3)  # subscribed
    sid, pc = cri.run_pod()
    cid = cri.create(sid, pc, ["sleep", "1000"])
    cri.start(cid)
    cri.rt.StopContainer(api_pb2.StopContainerRequest(container_id=cid, timeout=2), timeout=30)
    cri.rt.RemoveContainer(api_pb2.RemoveContainerRequest(container_id=cid), timeout=30)
    deadline = time.monotonic() + 10
    while len(events) < 4 and time.monotonic() < deadline:
        time.sleep(0.05)
    call.cancel()
    reader.join(10)
    mine = [e for e in events if e.container_id == cid]
    assert [e.container_event_type for e in mine] == [
        api_pb2.CONTAINER_CREATED_EVENT,
        api_pb2.CONTAINER_STARTED_EVENT,
        api_pb2.CONTAINER_STOPPED_EVENT,
        api_pb2.CONTAINER_DELETED_EVENT,
    ]
    for e in mine:
        assert e.pod_sandbox_status.id == sid
        assert e.created_at > 0
    # Full container statuses, not empty ones.
    started = mine[1]
    (status,) = started.containers_statuses
    assert status.id == cid
    assert status.state == api_pb2.CONTAINER_RUNNING
    assert status.metadata.name == "c"
    assert mine[2].containers_statuses[0].state == api_pb2.CONTAINER_EXITED
    assert list(mine[3].containers_statuses) == []


def test_a_slow_subscriber_does_not_stall_the_daemon(cri):
    # A subscriber that never reads: its buffer fills, events are dropped.
    stalled = cri.rt.GetContainerEvents(api_pb2.GetEventsRequest(), timeout=120)
    time.sleep(0.3)
    sid, pc = cri.run_pod()
    started = time.monotonic()
    for i in range(40):
        cid = cri.create(sid, pc, ["true"], name=f"c{i}")
        cri.start(cid)
        cri.rt.RemoveContainer(api_pb2.RemoveContainerRequest(container_id=cid), timeout=30)
    elapsed = time.monotonic() - started
    assert elapsed < 60
    assert cri.rt.Version(api_pb2.VersionRequest(), timeout=5).runtime_name == "pouch"
    stalled.cancel()


def _stream(cri, rpc: str, request, response_type):
    call = cri.channel.unary_stream(
        f"/runtime.v1.{rpc}",
        request_serializer=bytes,
        response_deserializer=response_type.FromString,
    )
    return list(call(request, timeout=30))


def test_list_streams_return_the_list_items_in_pages(cri):
    sid, pc = cri.run_pod()
    ids = {cri.create(sid, pc, ["sleep", "1"], name=f"s{i}") for i in range(120)}
    pages = _stream(
        cri,
        "RuntimeService/StreamContainers",
        pb.StreamContainersRequest(),
        pb.StreamContainersResponse,
    )
    assert len(pages) == 2
    streamed = [c.id for page in pages for c in page.containers]
    assert sorted(streamed) == sorted(ids)
    assert len(set(streamed)) == len(streamed)
    pods = _stream(
        cri,
        "RuntimeService/StreamPodSandboxes",
        pb.StreamPodSandboxesRequest(),
        pb.StreamPodSandboxesResponse,
    )
    assert [p.id for page in pods for p in page.pod_sandboxes] == [sid]
    images = _stream(
        cri, "ImageService/StreamImages", pb.StreamImagesRequest(), pb.StreamImagesResponse
    )
    listed = cri.img.ListImages(api_pb2.ListImagesRequest(), timeout=10).images
    assert [i.id for page in images for i in page.images] == [i.id for i in listed]


def test_update_container_resources(cri):
    sid, pc = cri.run_pod()
    cid = cri.create(sid, pc, ["sleep", "1000"])
    cri.start(cid)
    cri.rt.UpdateContainerResources(
        api_pb2.UpdateContainerResourcesRequest(
            container_id=cid,
            linux=api_pb2.LinuxContainerResources(
                memory_limit_in_bytes=64 * 1024 * 1024,
                cpu_shares=512,
                cpu_quota=50000,
                cpu_period=100000,
            ),
        ),
        timeout=30,
    )
    status = cri.status(cid).status
    assert status.resources.linux.memory_limit_in_bytes == 64 * 1024 * 1024
    assert status.resources.linux.cpu_shares == 512
    cg = f"pouch/pouch-{cid[:32]}"
    assert Path(f"/sys/fs/cgroup/memory/{cg}/memory.limit_in_bytes").read_text().strip() == str(
        64 << 20
    )
    assert Path(f"/sys/fs/cgroup/cpu/{cg}/cpu.shares").read_text().strip() == "512"
    assert Path(f"/sys/fs/cgroup/cpu/{cg}/cpu.cfs_quota_us").read_text().strip() == "50000"
    with pytest.raises(grpc.RpcError) as err:
        cri.rt.UpdateContainerResources(
            api_pb2.UpdateContainerResourcesRequest(
                container_id="b" * 64, linux=api_pb2.LinuxContainerResources()
            ),
            timeout=10,
        )
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_log_rotation_loses_no_line(cri):
    sid, pc = cri.run_pod()
    cid = cri.create(sid, pc, ["sh", "-c", "i=0; while true; do echo line-$i; i=$((i+1)); done"])
    cri.start(cid)
    log_path = Path(cri.status(cid).status.log_path)
    rotated = []
    for n in range(3):
        time.sleep(0.3)
        target = log_path.with_name(f"{log_path.name}.{n}")
        log_path.rename(target)
        rotated.append(target)
        cri.rt.ReopenContainerLog(api_pb2.ReopenContainerLogRequest(container_id=cid), timeout=30)
        assert log_path.exists()
    time.sleep(0.3)
    cri.rt.StopContainer(api_pb2.StopContainerRequest(container_id=cid, timeout=1), timeout=30)
    # Join the files in order, then P/F parts across them.
    text, partial = [], ""
    for path in [*rotated, log_path]:
        for line in path.read_text().splitlines():
            _, stream, tag, content = ([*line.split(" ", 3), ""])[:4]
            if stream != "stdout":
                continue
            partial += content
            if tag == "F":
                text.append(partial)
                partial = ""
    numbers = [int(t.removeprefix("line-")) for t in text if t.startswith("line-")]
    assert len(numbers) > 100
    assert numbers == list(range(numbers[0], numbers[0] + len(numbers))), "a line was lost"
    assert numbers[0] == 0
    # Reopening the log of a container that is not running is an error (cri-api).
    with pytest.raises(grpc.RpcError) as err:
        cri.rt.ReopenContainerLog(api_pb2.ReopenContainerLogRequest(container_id=cid), timeout=30)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_checkpoint_fails_clearly_where_the_host_cannot(cri, tmp_path):
    import shutil
    import subprocess

    sid, pc = cri.run_pod()
    cid = cri.create(sid, pc, ["sleep", "1000"])
    cri.start(cid)
    archive = tmp_path / "ckpt.tar"
    criu = shutil.which("criu")
    host_ok = (
        criu is not None
        and subprocess.run([criu, "check"], capture_output=True, timeout=60).returncode == 0
    )
    request = api_pb2.CheckpointContainerRequest(container_id=cid, location=str(archive))
    if host_ok:
        cri.rt.CheckpointContainer(request, timeout=120)
        import tarfile

        with tarfile.open(archive) as tar:
            names = tar.getnames()
        assert "config.json" in names
        assert any(n.startswith("checkpoint/") for n in names)
        assert cri.status(cid).status.state == api_pb2.CONTAINER_RUNNING
    else:
        with pytest.raises(grpc.RpcError) as err:
            cri.rt.CheckpointContainer(request, timeout=120)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "cannot checkpoint" in err.value.details()
        assert "criu" in err.value.details()
        assert not archive.exists()


def test_stats_show_cpu_memory_and_network(cri):
    pc = cri.pod_config("stats")
    sid, pc = cri.run_pod(pc)
    busy = cri.create(sid, pc, ["sh", "-c", "while :; do :; done"], name="busy")
    mem = cri.create(
        sid,
        pc,
        ["sh", "-c", "dd if=/dev/zero bs=48M count=1 | sleep 1000"],
        name="mem",
        linux=api_pb2.LinuxContainerConfig(
            resources=api_pb2.LinuxContainerResources(memory_limit_in_bytes=256 << 20)
        ),
    )
    web = cri.create(
        sid,
        pc,
        ["sh", "-c", "mkdir -p /w && echo hi > /w/index.html && exec httpd -f -p 8080 -h /w"],
        name="web",
    )
    for cid in (busy, mem, web):
        cri.start(cid)
    first = cri.rt.ContainerStats(api_pb2.ContainerStatsRequest(container_id=busy), timeout=30)
    assert first.stats.cpu.usage_core_nano_seconds.value > 0
    time.sleep(1.5)
    second = cri.rt.ContainerStats(api_pb2.ContainerStatsRequest(container_id=busy), timeout=30)
    assert second.stats.cpu.usage_nano_cores.value > 0.5e9
    assert second.stats.attributes.metadata.name == "busy"
    assert second.stats.writable_layer.used_bytes.value >= 0
    listed = cri.rt.ListContainerStats(
        api_pb2.ListContainerStatsRequest(filter=api_pb2.ContainerStatsFilter(pod_sandbox_id=sid)),
        timeout=30,
    ).stats
    by_name = {s.attributes.metadata.name: s for s in listed}
    assert set(by_name) == {"busy", "mem", "web"}
    assert by_name["mem"].memory.working_set_bytes.value > 40 << 20
    assert by_name["mem"].memory.available_bytes.value < 256 << 20
    # Traffic into the pod shows in its network counters.
    ip = cri.rt.PodSandboxStatus(
        api_pb2.PodSandboxStatusRequest(pod_sandbox_id=sid), timeout=10
    ).status.network.ip
    import httpx

    deadline = time.monotonic() + 10
    while True:
        try:
            for _ in range(20):
                httpx.get(f"http://{ip}:8080/", timeout=2)
            break
        except httpx.TransportError:
            assert time.monotonic() < deadline
            time.sleep(0.1)
    pod = cri.rt.PodSandboxStats(
        api_pb2.PodSandboxStatsRequest(pod_sandbox_id=sid), timeout=30
    ).stats
    assert pod.linux.network.default_interface.name == "eth0"
    assert pod.linux.network.default_interface.rx_bytes.value > 1000
    assert pod.linux.network.default_interface.tx_bytes.value > 1000
    assert {c.attributes.metadata.name for c in pod.linux.containers} == {"busy", "mem", "web"}
    assert pod.linux.process.process_count.value >= 3
    listed_pods = cri.rt.ListPodSandboxStats(api_pb2.ListPodSandboxStatsRequest(), timeout=30).stats
    assert [p.attributes.id for p in listed_pods] == [sid]


def test_metrics(cri):
    sid, pc = cri.run_pod()
    cid = cri.create(sid, pc, ["sleep", "1000"])
    cri.start(cid)
    descriptors = cri.rt.ListMetricDescriptors(api_pb2.ListMetricDescriptorsRequest(), timeout=10)
    names = {d.name for d in descriptors.descriptors}
    for expected in (
        "container_cpu_usage_seconds_total",
        "container_memory_working_set_bytes",
        "container_network_receive_bytes_total",
        "container_network_transmit_bytes_total",
        "container_start_time_seconds",
    ):
        assert expected in names
    metrics = cri.rt.ListPodSandboxMetrics(api_pb2.ListPodSandboxMetricsRequest(), timeout=30)
    (pod,) = metrics.pod_metrics
    assert pod.pod_sandbox_id == sid
    assert any(m.name == "container_network_receive_bytes_total" for m in pod.metrics)
    (ctr,) = pod.container_metrics
    assert ctr.container_id == cid
    by_name = {m.name: m for m in ctr.metrics}
    assert by_name["container_memory_working_set_bytes"].value.value > 0
    for m in ctr.metrics:
        assert len(m.label_values) == len(
            next(d for d in descriptors.descriptors if d.name == m.name).label_keys
        )


def test_update_pod_sandbox_resources_is_recorded(cri):
    sid, _ = cri.run_pod()
    cri.rt.UpdatePodSandboxResources(
        api_pb2.UpdatePodSandboxResourcesRequest(
            pod_sandbox_id=sid,
            resources=api_pb2.LinuxContainerResources(
                cpu_shares=256, memory_limit_in_bytes=1 << 30
            ),
        ),
        timeout=30,
    )
    info = json.loads(
        cri.rt.PodSandboxStatus(
            api_pb2.PodSandboxStatusRequest(pod_sandbox_id=sid, verbose=True), timeout=10
        ).info["info"]
    )
    assert info["resources"] == {"cpu_shares": 256, "memory_limit_in_bytes": 1 << 30}
    with pytest.raises(grpc.RpcError) as err:
        cri.rt.UpdatePodSandboxResources(
            api_pb2.UpdatePodSandboxResourcesRequest(pod_sandbox_id="9" * 64), timeout=10
        )
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
