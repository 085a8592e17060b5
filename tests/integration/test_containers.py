"""Pods and containers on real runc + conmon, through the third-party CRI client."""

from __future__ import annotations

import os
import signal
import subprocess
import time
import uuid
from pathlib import Path

import grpc
import pytest
from cri_api.v1 import api_pb2, api_pb2_grpc

from tests.support import images as timg
from tests.support.registry import Registry, push

pytestmark = [pytest.mark.integration, pytest.mark.root, pytest.mark.timeout(120)]


@pytest.fixture(scope="module")
def registry():
    with Registry() as r:
        push(r, "library/busybox", "latest", timg.busybox_image())
        yield r


@pytest.fixture
def pd(make_daemon, registry):
    return make_daemon(config=f'[registry]\ninsecure = ["{registry.host}"]\n').start()


class Client:
    def __init__(self, daemon, registry):
        self.daemon = daemon
        self.channel = daemon.channel()
        self.rt = api_pb2_grpc.RuntimeServiceStub(self.channel)
        self.img = api_pb2_grpc.ImageServiceStub(self.channel)
        self.image = f"{registry.host}/library/busybox:latest"
        self.pods: list[str] = []

    def pull(self) -> str:
        req = api_pb2.PullImageRequest(image=api_pb2.ImageSpec(image=self.image))
        return self.img.PullImage(req, timeout=60).image_ref

    def pod_config(self, name: str = "", **linux) -> api_pb2.PodSandboxConfig:
        name = name or f"pod-{uuid.uuid4().hex[:8]}"
        logdir = self.daemon.base / "logs" / name
        return api_pb2.PodSandboxConfig(
            metadata=api_pb2.PodSandboxMetadata(name=name, uid=uuid.uuid4().hex, namespace="test"),
            hostname=name,
            log_directory=str(logdir),
            linux=api_pb2.LinuxPodSandboxConfig(**linux),
        )

    def run_pod(self, config=None, handler: str = "") -> tuple[str, api_pb2.PodSandboxConfig]:
        config = config or self.pod_config()
        sid = self.rt.RunPodSandbox(
            api_pb2.RunPodSandboxRequest(config=config, runtime_handler=handler), timeout=60
        ).pod_sandbox_id
        self.pods.append(sid)
        return sid, config

    def create(self, sid, pod_config, command, *, name="c", **kw) -> str:
        config = api_pb2.ContainerConfig(
            metadata=api_pb2.ContainerMetadata(name=name),
            image=api_pb2.ImageSpec(image=self.image),
            command=command,
            log_path=f"{name}.log",
            **kw,
        )
        return self.rt.CreateContainer(
            api_pb2.CreateContainerRequest(
                pod_sandbox_id=sid, config=config, sandbox_config=pod_config
            ),
            timeout=60,
        ).container_id

    def start(self, cid):
        self.rt.StartContainer(api_pb2.StartContainerRequest(container_id=cid), timeout=30)

    def status(self, cid, verbose=False) -> api_pb2.ContainerStatusResponse:
        return self.rt.ContainerStatus(
            api_pb2.ContainerStatusRequest(container_id=cid, verbose=verbose), timeout=10
        )

    def wait_exited(self, cid, timeout=30) -> api_pb2.ContainerStatus:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            st = self.status(cid).status
            if st.state == api_pb2.CONTAINER_EXITED:
                return st
            time.sleep(0.05)
        raise AssertionError(f"container {cid} did not exit")

    def run(self, command, **kw) -> tuple[api_pb2.ContainerStatus, str]:
        """Run a command to completion in a fresh pod; return its status and log."""
        sid, pc = self.run_pod(kw.pop("pod_config", None))
        cid = self.create(sid, pc, command, **kw)
        self.start(cid)
        st = self.wait_exited(cid)
        return st, Path(st.log_path).read_text()

    def cleanup(self):
        for sid in self.pods:
            try:
                self.rt.StopPodSandbox(
                    api_pb2.StopPodSandboxRequest(pod_sandbox_id=sid), timeout=60
                )
                self.rt.RemovePodSandbox(
                    api_pb2.RemovePodSandboxRequest(pod_sandbox_id=sid), timeout=60
                )
            except grpc.RpcError:
                pass
        self.channel.close()


@pytest.fixture
def cri(pd, registry):
    client = Client(pd, registry)
    client.pull()
    yield client
    client.cleanup()


def log_lines(text: str) -> list[str]:
    """The content of each CRI log line (timestamp, stream, tag stripped)."""
    return [line.split(" ", 3)[3] for line in text.splitlines()]


def test_lifecycle(cri):
    sid, pc = cri.run_pod()
    cid = cri.create(sid, pc, ["sh", "-c", "echo hello; exec sleep 1000"])
    st = cri.status(cid).status
    assert st.state == api_pb2.CONTAINER_CREATED
    assert st.created_at > 0
    cri.start(cid)
    st = cri.status(cid).status
    assert st.state == api_pb2.CONTAINER_RUNNING
    assert st.started_at >= st.created_at
    listed = cri.rt.ListContainers(api_pb2.ListContainersRequest(), timeout=10).containers
    assert [c.id for c in listed] == [cid]
    t0 = time.monotonic()
    cri.rt.StopContainer(api_pb2.StopContainerRequest(container_id=cid, timeout=10), timeout=30)
    assert time.monotonic() - t0 < 5  # sleep dies of SIGTERM at once
    st = cri.status(cid).status
    assert st.state == api_pb2.CONTAINER_EXITED
    assert st.exit_code == 143
    assert st.reason == "Error"
    assert st.finished_at >= st.started_at
    assert log_lines(Path(st.log_path).read_text()) == ["hello"]
    # Idempotent stop and remove.
    cri.rt.StopContainer(api_pb2.StopContainerRequest(container_id=cid, timeout=1), timeout=30)
    cri.rt.RemoveContainer(api_pb2.RemoveContainerRequest(container_id=cid), timeout=30)
    cri.rt.RemoveContainer(api_pb2.RemoveContainerRequest(container_id=cid), timeout=30)
    with pytest.raises(grpc.RpcError) as err:
        cri.status(cid)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    pods = cri.rt.ListPodSandbox(api_pb2.ListPodSandboxRequest(), timeout=10).items
    assert [p.id for p in pods] == [sid]
    assert pods[0].state == api_pb2.SANDBOX_READY
    cri.rt.StopPodSandbox(api_pb2.StopPodSandboxRequest(pod_sandbox_id=sid), timeout=30)
    status = cri.rt.PodSandboxStatus(
        api_pb2.PodSandboxStatusRequest(pod_sandbox_id=sid), timeout=10
    ).status
    assert status.state == api_pb2.SANDBOX_NOTREADY
    cri.rt.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id=sid), timeout=30)
    cri.rt.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id=sid), timeout=30)
    with pytest.raises(grpc.RpcError) as err:
        cri.rt.PodSandboxStatus(api_pb2.PodSandboxStatusRequest(pod_sandbox_id=sid), timeout=10)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_exit_codes_and_completed(cri):
    st, _ = cri.run(["sh", "-c", "exit 0"])
    assert (st.exit_code, st.reason) == (0, "Completed")
    st, _ = cri.run(["sh", "-c", "exit 7"], name="seven")
    assert (st.exit_code, st.reason) == (7, "Error")
