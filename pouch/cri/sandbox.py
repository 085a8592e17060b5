"""Pod sandbox RPCs: RunPodSandbox, StopPodSandbox, RemovePodSandbox,
PodSandboxStatus, ListPodSandbox."""

from __future__ import annotations

import contextlib
import json
from typing import TYPE_CHECKING

import attrs

from pouch import errors
from pouch.container.manager import SandboxState
from pouch.cri import _convert
from pouch.cri._pb.runtime import v1 as pb

if TYPE_CHECKING:
    from pouch.container.manager import Sandbox
    from pouch.container.model import LinuxResources, NamespaceMode
    from pouch.core import Core

_STATES = {
    SandboxState.READY: pb.PodSandboxState.from_string("SANDBOX_READY"),
    SandboxState.NOTREADY: pb.PodSandboxState.from_string("SANDBOX_NOTREADY"),
    SandboxState.CREATING: pb.PodSandboxState.from_string("SANDBOX_NOTREADY"),
}


def _resources_json(res: LinuxResources | None) -> dict[str, object] | None:
    return None if res is None else {k: v for k, v in attrs.asdict(res).items() if v}


def require_id(value: str, field: str) -> str:
    if not value:
        raise errors.InvalidArgument(f"{field} is required")
    return value


def pb_namespace_mode(mode: NamespaceMode) -> pb.NamespaceMode:
    return pb.NamespaceMode.from_string(mode.name)


def _metadata(s: Sandbox) -> pb.PodSandboxMetadata:
    m = s.config.metadata
    return pb.PodSandboxMetadata(name=m.name, uid=m.uid, namespace=m.namespace, attempt=m.attempt)


async def run_pod_sandbox(core: Core, req: pb.RunPodSandboxRequest) -> pb.RunPodSandboxResponse:
    pod = _convert.to_pod_config(req.config, "config")
    sandbox_id = await core.containers.run_pod_sandbox(pod, req.runtime_handler)
    return pb.RunPodSandboxResponse(pod_sandbox_id=sandbox_id)


async def stop_pod_sandbox(core: Core, req: pb.StopPodSandboxRequest) -> pb.StopPodSandboxResponse:
    """Idempotent: an unknown or stopped sandbox is success (cri-api StopPodSandbox)."""
    require_id(req.pod_sandbox_id, "pod_sandbox_id")
    with contextlib.suppress(errors.NotFound):
        await core.containers.stop_pod_sandbox(req.pod_sandbox_id)
    return pb.StopPodSandboxResponse()


async def remove_pod_sandbox(
    core: Core, req: pb.RemovePodSandboxRequest
) -> pb.RemovePodSandboxResponse:
    """Idempotent: removing a removed sandbox is success (cri-api RemovePodSandbox)."""
    require_id(req.pod_sandbox_id, "pod_sandbox_id")
    await core.containers.remove_pod_sandbox(req.pod_sandbox_id)
    return pb.RemovePodSandboxResponse()


def to_pb_status(s: Sandbox) -> pb.PodSandboxStatus:
    ns = s.config.namespace_options
    return pb.PodSandboxStatus(
        id=s.sandbox_id,
        metadata=_metadata(s),
        state=_STATES[s.state],
        created_at=s.created_at,
        network=pb.PodSandboxNetworkStatus(
            ip=s.ips[0] if s.ips else "",
            additional_ips=[pb.PodIp(ip=ip) for ip in s.ips[1:]],
        ),
        linux=pb.LinuxPodSandboxStatus(
            namespaces=pb.Namespace(
                options=pb.NamespaceOption(
                    network=pb_namespace_mode(ns.network),
                    pid=pb_namespace_mode(ns.pid),
                    ipc=pb_namespace_mode(ns.ipc),
                    target_id=ns.target_id,
                )
            )
        ),
        labels=dict(s.config.labels),
        annotations=dict(s.config.annotations),
        runtime_handler=s.handler,
    )


async def pod_sandbox_status(
    core: Core, req: pb.PodSandboxStatusRequest
) -> pb.PodSandboxStatusResponse:
    s = core.containers.sandbox(require_id(req.pod_sandbox_id, "pod_sandbox_id"))
    info: dict[str, str] = {}
    if req.verbose:
        info["info"] = json.dumps(
            {
                "pid": s.infra_pid,
                "runtimeHandler": s.handler,
                "netNamespacePath": s.netns_path or "",
                "runtimeSpec": s.spec,
                "overhead": _resources_json(s.config.overhead),
                "resources": _resources_json(s.config.resources),
            }
        )
    return pb.PodSandboxStatusResponse(status=to_pb_status(s), info=info)


async def list_pod_sandbox(core: Core, req: pb.ListPodSandboxRequest) -> pb.ListPodSandboxResponse:
    f = req.filter
    state = None
    if f is not None and f.is_set("state") and f.state is not None:
        state = (
            SandboxState.READY
            if f.state.state == pb.PodSandboxState.from_string("SANDBOX_READY")
            else (SandboxState.NOTREADY)
        )
    found = core.containers.list_sandboxes(
        sandbox_id=f.id if f is not None else "",
        state=state,
        labels=dict(f.label_selector) if f is not None else None,
    )
    return pb.ListPodSandboxResponse(
        items=[
            pb.PodSandbox(
                id=s.sandbox_id,
                metadata=_metadata(s),
                state=_STATES[s.state],
                created_at=s.created_at,
                labels=dict(s.config.labels),
                annotations=dict(s.config.annotations),
                runtime_handler=s.handler,
            )
            for s in found
        ]
    )
