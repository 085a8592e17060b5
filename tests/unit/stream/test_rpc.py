"""Exec, Attach and PortForward at the CRI edge (pouch.cri.stream)."""

from __future__ import annotations

from typing import cast

import attrs
import pytest

from pouch import errors
from pouch.config import StreamConfig
from pouch.container.manager import ContainerState, SandboxState
from pouch.cri import stream as rpc
from pouch.cri._instrument import status_for
from pouch.cri._pb.runtime import v1 as pb
from pouch.stream.server import StreamServer
from pouch.stream.session import AttachRequest, ExecRequest, PortForwardRequest

pytestmark = pytest.mark.timeout(10)


@attrs.define
class C:
    container_id: str
    state: ContainerState


@attrs.define
class S:
    sandbox_id: str
    state: SandboxState


class FakeContainers:
    def __init__(self):
        self.containers = {
            "c" * 64: C("c" * 64, ContainerState.RUNNING),
            "e" * 64: C("e" * 64, ContainerState.EXITED),
        }
        self.sandboxes = {
            "p" * 64: S("p" * 64, SandboxState.READY),
            "n" * 64: S("n" * 64, SandboxState.NOTREADY),
        }

    def container(self, text):
        return self._find(self.containers, text, "container")

    def sandbox(self, text):
        return self._find(self.sandboxes, text, "pod sandbox")

    @staticmethod
    def _find(records, text, what):
        matches = [k for k in records if k.startswith(text)]
        if len(matches) != 1:
            raise errors.NotFound(f'{what} "{text}" not found')
        return records[matches[0]]


@attrs.define
class FakeCore:
    containers: FakeContainers
    streams: StreamServer


@pytest.fixture
def core(backend):
    server = StreamServer(StreamConfig(), backend)
    server.address = "127.0.0.1:10010"
    return cast("object", FakeCore(FakeContainers(), server))


def taken(core, url):
    token = url.rsplit("/", 1)[1]
    return core.streams._tokens.consume(token)


async def test_exec_url(core):
    req = pb.ExecRequest(container_id="ccc", cmd=["sh", "-c", "true"], stdin=True, stdout=True)
    url = (await rpc.exec(core, req)).url
    assert url.startswith("http://127.0.0.1:10010/exec/")
    # The request is kept with the full container id.
    assert taken(core, url) == ExecRequest("c" * 64, ("sh", "-c", "true"), stdin=True, stdout=True)


async def test_attach_url(core):
    req = pb.AttachRequest(container_id="c" * 64, tty=True, stdin=True, stdout=True)
    url = (await rpc.attach(core, req)).url
    assert url.startswith("http://127.0.0.1:10010/attach/")
    assert taken(core, url) == AttachRequest("c" * 64, tty=True, stdin=True, stdout=True)


async def test_port_forward_url(core):
    url = (await rpc.port_forward(core, pb.PortForwardRequest(pod_sandbox_id="p", port=[80]))).url
    assert url.startswith("http://127.0.0.1:10010/portforward/")
    assert taken(core, url) == PortForwardRequest("p" * 64, (80,))
    url = (await rpc.port_forward(core, pb.PortForwardRequest(pod_sandbox_id="p"))).url
    assert taken(core, url) == PortForwardRequest("p" * 64, ())


@pytest.mark.parametrize(
    ("req", "error", "message"),
    [
        (
            pb.ExecRequest(cmd=["x"], stdout=True),
            errors.InvalidArgument,
            "container_id is required",
        ),
        (pb.ExecRequest(container_id="c", stdout=True), errors.InvalidArgument, "cmd is required"),
        (
            pb.ExecRequest(container_id="c", cmd=["x"]),
            errors.InvalidArgument,
            "one of stdin, stdout, or stderr must be set",
        ),
        (
            pb.ExecRequest(container_id="c", cmd=["x"], tty=True, stdout=True, stderr=True),
            errors.InvalidArgument,
            "tty and stderr cannot both be true",
        ),
        (pb.ExecRequest(container_id="nope", cmd=["x"], stdout=True), errors.NotFound, "not found"),
        (
            pb.ExecRequest(container_id="e", cmd=["x"], stdout=True),
            errors.FailedPrecondition,
            "is exited, not running",
        ),
    ],
)
async def test_exec_errors(core, req, error, message):
    with pytest.raises(error, match=message) as caught:
        await rpc.exec(core, req)
    assert status_for(caught.value) is not None  # A mapped gRPC code, not UNKNOWN.


@pytest.mark.parametrize(
    ("req", "error"),
    [
        (pb.AttachRequest(stdout=True), errors.InvalidArgument),
        (pb.AttachRequest(container_id="c"), errors.InvalidArgument),
        (pb.AttachRequest(container_id="c", tty=True, stderr=True), errors.InvalidArgument),
        (pb.AttachRequest(container_id="x", stdout=True), errors.NotFound),
        (pb.AttachRequest(container_id="e", stdout=True), errors.FailedPrecondition),
    ],
)
async def test_attach_errors(core, req, error):
    with pytest.raises(error):
        await rpc.attach(core, req)


@pytest.mark.parametrize(
    ("req", "error"),
    [
        (pb.PortForwardRequest(), errors.InvalidArgument),
        (pb.PortForwardRequest(pod_sandbox_id="p", port=[0]), errors.InvalidArgument),
        (pb.PortForwardRequest(pod_sandbox_id="p", port=[65536]), errors.InvalidArgument),
        (pb.PortForwardRequest(pod_sandbox_id="x"), errors.NotFound),
        (pb.PortForwardRequest(pod_sandbox_id="n"), errors.FailedPrecondition),
    ],
)
async def test_port_forward_errors(core, req, error):
    with pytest.raises(error):
        await rpc.port_forward(core, req)


async def test_too_many_waiting_urls(core):
    core.streams._tokens._max = 2
    req = pb.ExecRequest(container_id="c", cmd=["x"], stdout=True)
    await rpc.exec(core, req)
    await rpc.exec(core, req)
    with pytest.raises(errors.ResourceExhausted):
        await rpc.exec(core, req)
