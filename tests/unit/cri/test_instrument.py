"""The edge's error table and call wrapper, without a network."""

from __future__ import annotations

import pytest
import trio
from grpclib.const import Status
from grpclib.exceptions import GRPCError

from pouch import errors
from pouch._util.failpoints import parse as parse_failpoints
from pouch.cri._instrument import (
    CallGate,
    ids_of,
    instrument,
    status_for,
)
from pouch.cri._pb.runtime import v1 as pb


@pytest.mark.parametrize(
    ("exc", "status"),
    [
        (errors.NotFound("x"), Status.NOT_FOUND),
        (errors.AlreadyExists("x"), Status.ALREADY_EXISTS),
        (errors.InvalidArgument("x"), Status.INVALID_ARGUMENT),
        (errors.FailedPrecondition("x"), Status.FAILED_PRECONDITION),
        (errors.Unavailable("x"), Status.UNAVAILABLE),
        (errors.RegistryUnavailable("x"), Status.UNAVAILABLE),
        (errors.ResourceExhausted("x"), Status.RESOURCE_EXHAUSTED),
        (errors.Unimplemented("x"), Status.UNIMPLEMENTED),
        (trio.TooSlowError(), Status.DEADLINE_EXCEEDED),
        (errors.RuntimeFailed(["runc"], 1, "boom"), None),
        (ValueError("x"), None),
    ],
)
def test_error_table(exc, status):
    assert status_for(exc) is status


def _serving_gate() -> CallGate:
    gate = CallGate()
    gate.open()
    return gate


async def test_core_errors_become_grpc_errors_with_message():
    async def impl(request):
        raise errors.NotFound('container "abc" not found')

    call = instrument("ContainerStatus", impl, _serving_gate())
    with pytest.raises(GRPCError) as err:
        await call(pb.ContainerStatusRequest(container_id="abc"), None)
    assert err.value.status is Status.NOT_FOUND
    assert err.value.message == 'container "abc" not found'


async def test_unexpected_errors_are_unknown():
    async def impl(request):
        raise KeyError("oops")

    call = instrument("Version", impl, _serving_gate())
    with pytest.raises(GRPCError) as err:
        await call(pb.VersionRequest(), None)
    assert err.value.status is Status.UNKNOWN
    assert "Version" in err.value.message


async def test_deadline_becomes_deadline_exceeded(autojump_clock):
    async def impl(request):
        await trio.sleep(10)

    call = instrument("Status", impl, _serving_gate())
    with pytest.raises(GRPCError) as err:
        await call(pb.StatusRequest(), 1.0)
    assert err.value.status is Status.DEADLINE_EXCEEDED
    assert trio.current_time() == pytest.approx(1.0)


async def test_gate_refuses_before_start_and_while_draining():
    async def impl(request):
        return pb.VersionResponse()

    gate = CallGate()
    call = instrument("Version", impl, gate)
    with pytest.raises(GRPCError) as err:
        await call(pb.VersionRequest(), None)
    assert err.value.status is Status.UNAVAILABLE
    assert "not initialized" in err.value.message
    gate.open()
    assert await call(pb.VersionRequest(), None) == pb.VersionResponse()
    gate.close()
    with pytest.raises(GRPCError) as err:
        await call(pb.VersionRequest(), None)
    assert "shutting down" in err.value.message


def test_ids_of_names_what_the_request_is_about():
    assert ids_of(pb.StopContainerRequest(container_id="c1")) == {"container_id": "c1"}
    assert ids_of(pb.PullImageRequest(image=pb.ImageSpec(image="busybox"))) == {"image": "busybox"}
    assert ids_of(pb.VersionRequest()) == {}


def test_failpoints_parse():
    assert parse_failpoints("Status=delay:2; Version=panic") == {
        "Status": ("delay", 2.0),
        "Version": ("panic", 0.0),
    }
    with pytest.raises(ValueError, match="invalid failpoint"):
        parse_failpoints("Status=explode")
