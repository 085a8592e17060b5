"""GetContainerEvents, the list streams (cri-api v0.36), resource updates and log reopening."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, Final, TypeVar

from pouch import errors
from pouch.container.manager import EventType
from pouch.cri import _convert, container, image, sandbox
from pouch.cri._pb.runtime import v1 as pb
from pouch.cri.sandbox import require_id

if TYPE_CHECKING:
    from pouch.core import Core

T = TypeVar("T")
Send = Callable[[Any], Awaitable[None]]

#: Items per message of a list stream: well under grpc's message size.
PAGE: Final = 100

_EVENT_TYPES: Final = {
    EventType.CREATED: pb.ContainerEventType.from_string("CONTAINER_CREATED_EVENT"),
    EventType.STARTED: pb.ContainerEventType.from_string("CONTAINER_STARTED_EVENT"),
    EventType.STOPPED: pb.ContainerEventType.from_string("CONTAINER_STOPPED_EVENT"),
    EventType.DELETED: pb.ContainerEventType.from_string("CONTAINER_DELETED_EVENT"),
}


async def get_container_events(core: Core, req: pb.GetEventsRequest, send: Send) -> None:
    """Stream events until the client goes away.

    Each carries the pod's status and every container's status at the time
    of the event (a kubelet's Evented PLEG reads them; empty statuses are a
    known bug elsewhere).
    """
    del req
    receive = core.containers.subscribe()
    async with receive:
        async for event in receive:
            kind = _EVENT_TYPES.get(event.kind)
            if kind is None:
                continue
            await send(
                pb.ContainerEventResponse(
                    container_id=event.container_id,
                    container_event_type=kind,
                    created_at=event.created_at,
                    pod_sandbox_status=sandbox.to_pb_status(event.sandbox),
                    containers_statuses=[container.to_pb_status(core, c) for c in event.containers],
                )
            )


async def _pages(items: Sequence[T], send: Send, wrap: Callable[[list[T]], Any]) -> None:
    for start in range(0, len(items), PAGE):
        await send(wrap(list(items[start : start + PAGE])))


async def stream_pod_sandboxes(core: Core, req: pb.StreamPodSandboxesRequest, send: Send) -> None:
    listed = await sandbox.list_pod_sandbox(core, pb.ListPodSandboxRequest(filter=req.filter))
    await _pages(listed.items, send, lambda page: pb.StreamPodSandboxesResponse(pod_sandboxes=page))


async def stream_containers(core: Core, req: pb.StreamContainersRequest, send: Send) -> None:
    listed = await container.list_containers(core, pb.ListContainersRequest(filter=req.filter))
    await _pages(listed.containers, send, lambda page: pb.StreamContainersResponse(containers=page))


async def stream_images(core: Core, req: pb.StreamImagesRequest, send: Send) -> None:
    listed = await image.list_images(core, pb.ListImagesRequest(filter=req.filter))
    await _pages(listed.images, send, lambda page: pb.StreamImagesResponse(images=page))


async def update_container_resources(
    core: Core, req: pb.UpdateContainerResourcesRequest
) -> pb.UpdateContainerResourcesResponse:
    container_id = require_id(req.container_id, "container_id")
    if not req.is_set("linux"):
        raise errors.InvalidArgument("linux is required: pouch runs Linux containers")
    resources = _convert.to_linux_resources(req.linux, "linux")
    await core.containers.update_resources(container_id, resources)
    return pb.UpdateContainerResourcesResponse()


async def reopen_container_log(
    core: Core, req: pb.ReopenContainerLogRequest
) -> pb.ReopenContainerLogResponse:
    await core.containers.reopen_log(require_id(req.container_id, "container_id"))
    return pb.ReopenContainerLogResponse()


async def checkpoint_container(
    core: Core, req: pb.CheckpointContainerRequest
) -> pb.CheckpointContainerResponse:
    await core.containers.checkpoint(require_id(req.container_id, "container_id"), req.location)
    return pb.CheckpointContainerResponse()


async def update_pod_sandbox_resources(
    core: Core, req: pb.UpdatePodSandboxResourcesRequest
) -> pb.UpdatePodSandboxResourcesResponse:
    sandbox_id = require_id(req.pod_sandbox_id, "pod_sandbox_id")
    overhead = (
        _convert.to_linux_resources(req.overhead, "overhead") if req.is_set("overhead") else None
    )
    resources = (
        _convert.to_linux_resources(req.resources, "resources") if req.is_set("resources") else None
    )
    await core.containers.update_pod_resources(sandbox_id, overhead, resources)
    return pb.UpdatePodSandboxResourcesResponse()
