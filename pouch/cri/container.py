"""Container RPCs: CreateContainer, StartContainer, StopContainer, RemoveContainer,
ContainerStatus, ListContainers."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from pouch.container.manager import ContainerState
from pouch.cri import _convert
from pouch.cri._pb.runtime import v1 as pb
from pouch.cri.sandbox import require_id

if TYPE_CHECKING:
    from pouch.container.manager import Container
    from pouch.core import Core

_STATES = {
    ContainerState.CREATING: pb.ContainerState.from_string("CONTAINER_UNKNOWN"),
    ContainerState.CREATED: pb.ContainerState.from_string("CONTAINER_CREATED"),
    ContainerState.RUNNING: pb.ContainerState.from_string("CONTAINER_RUNNING"),
    ContainerState.EXITED: pb.ContainerState.from_string("CONTAINER_EXITED"),
    ContainerState.UNKNOWN: pb.ContainerState.from_string("CONTAINER_UNKNOWN"),
}
_FROM_PB = {v: k for k, v in _STATES.items() if k is not ContainerState.CREATING}

_PROPAGATION = {
    "private": pb.MountPropagation.from_string("PROPAGATION_PRIVATE"),
    "host-to-container": pb.MountPropagation.from_string("PROPAGATION_HOST_TO_CONTAINER"),
    "bidirectional": pb.MountPropagation.from_string("PROPAGATION_BIDIRECTIONAL"),
}


async def create_container(
    core: Core, req: pb.CreateContainerRequest
) -> pb.CreateContainerResponse:
    sandbox_id = require_id(req.pod_sandbox_id, "pod_sandbox_id")
    ctr = _convert.to_container_config(req.config, "config")
    container_id = await core.containers.create_container(sandbox_id, ctr)
    return pb.CreateContainerResponse(container_id=container_id)


async def start_container(core: Core, req: pb.StartContainerRequest) -> pb.StartContainerResponse:
    await core.containers.start_container(require_id(req.container_id, "container_id"))
    return pb.StartContainerResponse()


async def stop_container(core: Core, req: pb.StopContainerRequest) -> pb.StopContainerResponse:
    """Idempotent: an exited or unknown container is success (cri-api StopContainer)."""
    require_id(req.container_id, "container_id")
    await core.containers.stop_container(req.container_id, float(max(req.timeout, 0)))
    return pb.StopContainerResponse()


async def remove_container(
    core: Core, req: pb.RemoveContainerRequest
) -> pb.RemoveContainerResponse:
    """Idempotent: removing a removed container is success (cri-api RemoveContainer)."""
    await core.containers.remove_container(require_id(req.container_id, "container_id"))
    return pb.RemoveContainerResponse()


def _image_ref(core: Core, c: Container) -> str:
    # containerd reports a repo digest when the image has one, else its id.
    image = core.images.get(c.image_id)
    if image is not None and image.repo_digests:
        return image.repo_digests[0]
    return c.image_id


def to_pb_status(core: Core, c: Container) -> pb.ContainerStatus:
    ctr = c.config
    process = c.spec.get("process", {})
    user = process.get("user", {})
    resources = c.spec.get("linux", {}).get("resources", {})
    cpu = resources.get("cpu", {})
    memory = resources.get("memory", {})
    return pb.ContainerStatus(
        id=c.container_id,
        metadata=pb.ContainerMetadata(name=ctr.metadata.name, attempt=ctr.metadata.attempt),
        state=_STATES[c.state],
        created_at=c.created_at,
        started_at=c.started_at,
        finished_at=c.finished_at,
        exit_code=c.exit_code,
        image=pb.ImageSpec(image=c.image_ref, user_specified_image=ctr.user_specified_image),
        image_ref=_image_ref(core, c),
        image_id=c.image_id,
        reason=c.reason,
        message=c.message,
        labels=dict(ctr.labels),
        annotations=dict(ctr.annotations),
        mounts=[
            pb.Mount(
                container_path=m.container_path,
                host_path=m.host_path,
                readonly=m.readonly,
                selinux_relabel=m.selinux_relabel,
                propagation=_PROPAGATION[m.propagation.value],
            )
            for m in ctr.mounts
        ],
        log_path=c.log_path,
        resources=pb.ContainerResources(
            linux=pb.LinuxContainerResources(
                cpu_period=int(cpu.get("period", 0)),
                cpu_quota=int(cpu.get("quota", 0)),
                cpu_shares=int(cpu.get("shares", 0)),
                cpuset_cpus=str(cpu.get("cpus", "")),
                cpuset_mems=str(cpu.get("mems", "")),
                memory_limit_in_bytes=int(memory.get("limit", 0)),
                oom_score_adj=int(process.get("oomScoreAdj", 0)),
            )
        ),
        user=pb.ContainerUser(
            linux=pb.LinuxContainerUser(
                uid=int(user.get("uid", 0)),
                gid=int(user.get("gid", 0)),
                supplemental_groups=[int(g) for g in user.get("additionalGids", [])],
            )
        ),
    )


async def container_status(
    core: Core, req: pb.ContainerStatusRequest
) -> pb.ContainerStatusResponse:
    c = core.containers.container(require_id(req.container_id, "container_id"))
    info: dict[str, str] = {}
    if req.verbose:
        info["info"] = json.dumps(
            {
                "sandboxID": c.sandbox_id,
                "pid": c.pid,
                "imageId": c.image_id,
                "runtimeSpec": c.spec,
            }
        )
    return pb.ContainerStatusResponse(status=to_pb_status(core, c), info=info)


async def list_containers(core: Core, req: pb.ListContainersRequest) -> pb.ListContainersResponse:
    f = req.filter
    state = None
    if f is not None and f.is_set("state") and f.state is not None:
        state = _FROM_PB.get(f.state.state)
    found = core.containers.list_containers(
        container_id=f.id if f is not None else "",
        sandbox_id=f.pod_sandbox_id if f is not None else "",
        state=state,
        labels=dict(f.label_selector) if f is not None else None,
    )
    return pb.ListContainersResponse(
        containers=[
            pb.Container(
                id=c.container_id,
                pod_sandbox_id=c.sandbox_id,
                metadata=pb.ContainerMetadata(
                    name=c.config.metadata.name, attempt=c.config.metadata.attempt
                ),
                image=pb.ImageSpec(image=c.image_ref),
                image_ref=_image_ref(core, c),
                image_id=c.image_id,
                state=_STATES[c.state],
                created_at=c.created_at,
                labels=dict(c.config.labels),
                annotations=dict(c.config.annotations),
            )
            for c in found
        ]
    )
