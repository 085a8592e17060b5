"""Exec, Attach and PortForward: URLs on the stream server.

Each call checks its request, then returns a single-use URL that the client
upgrades to run the session (``pouch.stream.server``).  The checks are the
kubelet streaming server's (``validateExecRequest`` and friends, which
containerd and cri-o run too), plus the target's state as containerd and
cri-o check it: a session can only start on a running container or a
ready pod.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pouch import errors
from pouch.container.manager import ContainerState, SandboxState
from pouch.cri._pb.runtime import v1 as pb
from pouch.cri.sandbox import require_id
from pouch.stream.session import AttachRequest, ExecRequest, PortForwardRequest

if TYPE_CHECKING:
    from pouch.core import Core


def _check_streams(*, tty: bool, stdin: bool, stdout: bool, stderr: bool) -> None:
    # cri-api: "One of `stdin`, `stdout`, and `stderr` MUST be true" and "If
    # `tty` is true, `stderr` MUST be false" (kubelet: InvalidArgument).
    if tty and stderr:
        raise errors.InvalidArgument("tty and stderr cannot both be true")
    if not (stdin or stdout or stderr):
        raise errors.InvalidArgument("one of stdin, stdout, or stderr must be set")


def _running_container(core: Core, container_id: str) -> str:
    c = core.containers.container(container_id)
    if c.state is not ContainerState.RUNNING:
        raise errors.FailedPrecondition(
            f"container {c.container_id[:12]} is {c.state.value}, not running"
        )
    return c.container_id


async def exec(core: Core, req: pb.ExecRequest) -> pb.ExecResponse:
    """A URL that runs ``req.cmd`` in a running container with the streams asked for.

    Raises:
        InvalidArgument: no container id or command, no stream asked for,
            or ``tty`` with ``stderr``.
        NotFound: unknown container.
        FailedPrecondition: it is not running.
    """
    require_id(req.container_id, "container_id")
    if not req.cmd:
        raise errors.InvalidArgument("cmd is required")
    _check_streams(tty=req.tty, stdin=req.stdin, stdout=req.stdout, stderr=req.stderr)
    container_id = _running_container(core, req.container_id)
    url = core.streams.url(
        ExecRequest(
            container_id=container_id,
            cmd=tuple(req.cmd),
            tty=req.tty,
            stdin=req.stdin,
            stdout=req.stdout,
            stderr=req.stderr,
        )
    )
    return pb.ExecResponse(url=url)


async def attach(core: Core, req: pb.AttachRequest) -> pb.AttachResponse:
    """A URL that attaches to a running container's stdio.

    Raises:
        InvalidArgument: no container id, no stream asked for, or ``tty``
            with ``stderr``.
        NotFound: unknown container.
        FailedPrecondition: it is not running.
    """
    require_id(req.container_id, "container_id")
    _check_streams(tty=req.tty, stdin=req.stdin, stdout=req.stdout, stderr=req.stderr)
    container_id = _running_container(core, req.container_id)
    url = core.streams.url(
        AttachRequest(
            container_id=container_id,
            tty=req.tty,
            stdin=req.stdin,
            stdout=req.stdout,
            stderr=req.stderr,
        )
    )
    return pb.AttachResponse(url=url)


async def port_forward(core: Core, req: pb.PortForwardRequest) -> pb.PortForwardResponse:
    """A URL that forwards connections to ports of a ready pod.

    ``req.port`` may be empty: over SPDY the client names the port per
    connection; the WebSocket channel protocol forwards the listed ports.

    Raises:
        InvalidArgument: no sandbox id, or a port outside 1..65535.
        NotFound: unknown pod sandbox.
        FailedPrecondition: it is not ready.
    """
    require_id(req.pod_sandbox_id, "pod_sandbox_id")
    for port in req.port:
        if not 0 < port < 1 << 16:
            raise errors.InvalidArgument(f"invalid port {port}: must be in 1..65535")
    s = core.containers.sandbox(req.pod_sandbox_id)
    if s.state is not SandboxState.READY:
        raise errors.FailedPrecondition(
            f"pod sandbox {s.sandbox_id[:12]} is {s.state.value}, not ready"
        )
    url = core.streams.url(PortForwardRequest(sandbox_id=s.sandbox_id, ports=tuple(req.port)))
    return pb.PortForwardResponse(url=url)
