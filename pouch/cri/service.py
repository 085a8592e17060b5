"""The CRI services: one table of RPC name -> implementation.

Each implementation is a Trio function ``(core, request) -> response`` (or
``(core, request, send)`` for server-streaming calls) in the module of its
RPC group.  RPCs without an implementation yet answer UNIMPLEMENTED with
their name.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Final

from pouch import errors
from pouch._util import failpoints
from pouch.cri import container, events, exec, extensions, image, runtime, sandbox, stats, stream
from pouch.cri._bridge import Servable, servable
from pouch.cri._instrument import CallGate, Impl, instrument
from pouch.cri._pb.runtime import v1 as pb

if TYPE_CHECKING:
    from pouch.core import Core

CoreImpl = Callable[..., Awaitable[Any]]

RUNTIME_SERVICE: Final = "runtime.v1.RuntimeService"
IMAGE_SERVICE: Final = "runtime.v1.ImageService"

# Keyed by the RPC's name in the proto.
IMPLEMENTED: Final[dict[str, CoreImpl]] = {
    "Version": runtime.version,
    "Status": runtime.status,
    "RuntimeConfig": runtime.runtime_config,
    "UpdateRuntimeConfig": runtime.update_runtime_config,
    "PullImage": image.pull_image,
    "ImageStatus": image.image_status,
    "ListImages": image.list_images,
    "RemoveImage": image.remove_image,
    "ImageFsInfo": image.image_fs_info,
    "RunPodSandbox": sandbox.run_pod_sandbox,
    "StopPodSandbox": sandbox.stop_pod_sandbox,
    "RemovePodSandbox": sandbox.remove_pod_sandbox,
    "PodSandboxStatus": sandbox.pod_sandbox_status,
    "ListPodSandbox": sandbox.list_pod_sandbox,
    "CreateContainer": container.create_container,
    "StartContainer": container.start_container,
    "StopContainer": container.stop_container,
    "RemoveContainer": container.remove_container,
    "ContainerStatus": container.container_status,
    "ListContainers": container.list_containers,
    "ExecSync": exec.exec_sync,
    "Exec": stream.exec,
    "Attach": stream.attach,
    "PortForward": stream.port_forward,
    "GetContainerEvents": events.get_container_events,
    "StreamPodSandboxes": events.stream_pod_sandboxes,
    "StreamContainers": events.stream_containers,
    "StreamImages": events.stream_images,
    "UpdateContainerResources": events.update_container_resources,
    "ReopenContainerLog": events.reopen_container_log,
    "CheckpointContainer": events.checkpoint_container,
    "UpdatePodSandboxResources": events.update_pod_sandbox_resources,
    "ContainerStats": stats.container_stats,
    "ListContainerStats": stats.list_container_stats,
    "StreamContainerStats": stats.stream_container_stats,
    "PodSandboxStats": stats.pod_sandbox_stats,
    "ListPodSandboxStats": stats.list_pod_sandbox_stats,
    "StreamPodSandboxStats": stats.stream_pod_sandbox_stats,
    "ListMetricDescriptors": stats.list_metric_descriptors,
    "ListPodSandboxMetrics": stats.list_pod_sandbox_metrics,
    "StreamPodSandboxMetrics": stats.stream_pod_sandbox_metrics,
}


def _unimplemented(rpc: str) -> CoreImpl:
    async def call(core: Core, request: object, *extra: object) -> Any:
        raise errors.Unimplemented(f"{rpc} is not implemented by pouch yet")

    return call


def build(core: Core, gate: CallGate) -> list[Servable]:
    """The grpclib handler objects for both CRI services."""
    points = failpoints.points()
    result = []
    for base in (pb.RuntimeServiceBase(), pb.ImageServiceBase(), *extensions.extension_bases()):
        base_mapping = base.__mapping__()
        calls: dict[str, Impl] = {}
        for path in base_mapping:
            rpc = path.rsplit("/", 1)[-1]
            impl = (
                IMPLEMENTED.get(rpc)
                or extensions.IMPLEMENTED_EXTENSIONS.get(rpc)
                or _unimplemented(rpc)
            )
            calls[path] = instrument(rpc, functools.partial(impl, core), gate, points.get(rpc))
        result.append(servable(base_mapping, calls))
    return result
