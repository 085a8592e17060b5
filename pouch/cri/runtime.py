"""Runtime-level RPCs: Version, Status, RuntimeConfig."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Final

from pouch.cri._pb.runtime import v1 as pb

if TYPE_CHECKING:
    from pouch.core import Core

RUNTIME_NAME: Final = "pouch"
#: The CRI version this daemon speaks (``VersionResponse.runtime_api_version``).
RUNTIME_API_VERSION: Final = "v1"
#: The kubelet's own ``version`` field: the *kubelet* API version, fixed at 0.1.0.
KUBELET_API_VERSION: Final = "0.1.0"


async def version(core: Core, req: pb.VersionRequest) -> pb.VersionResponse:
    del req  # the requested version is informational; v1 is all we speak
    return pb.VersionResponse(
        version=KUBELET_API_VERSION,
        runtime_name=RUNTIME_NAME,
        runtime_version=core.version,
        runtime_api_version=RUNTIME_API_VERSION,
    )


async def status(core: Core, req: pb.StatusRequest) -> pb.StatusResponse:
    """Report RuntimeReady and NetworkReady, as a kubelet polls them.

    NetworkReady is false, with the reason, while no valid CNI config exists.
    """
    ready, reason, message = core.network.status()
    conditions = [
        pb.RuntimeCondition(type="RuntimeReady", status=True),
        pb.RuntimeCondition(type="NetworkReady", status=ready, reason=reason, message=message),
    ]
    info: dict[str, str] = {}
    if req.verbose:
        info["config"] = json.dumps(
            {
                "runtimeVersion": core.version,
                "root": str(core.config.root),
                "state": str(core.config.state),
                "socket": str(core.config.grpc.address),
                "streamServer": core.stream_address,
                "metricsServer": core.metrics_address,
                "cgroupDriver": core.config.cgroup.driver.value,
                "startedAt": core.started_at,
            }
        )
    handlers = [
        pb.RuntimeHandler(
            name=name,
            # runc 1.1 and crun 1.8 cannot make mounts recursively read-only,
            # and user namespaces are not offered: advertise neither.
            features=pb.RuntimeHandlerFeatures(
                recursive_read_only_mounts=False, user_namespaces=False
            ),
        )
        for name in ("", *sorted(core.config.runtime.handlers))
    ]
    return pb.StatusResponse(
        status=pb.RuntimeStatus(conditions=conditions),
        info=info,
        runtime_handlers=handlers,
        features=pb.RuntimeFeatures(supplemental_groups_policy=True),
    )


async def runtime_config(core: Core, req: pb.RuntimeConfigRequest) -> pb.RuntimeConfigResponse:
    del req
    # The config's names ("systemd", "cgroupfs") are the proto enum's, lowercased.
    driver = pb.CgroupDriver.from_string(core.config.cgroup.driver.value.upper())
    return pb.RuntimeConfigResponse(linux=pb.LinuxRuntimeConfiguration(cgroup_driver=driver))


async def update_runtime_config(
    core: Core, req: pb.UpdateRuntimeConfigRequest
) -> pb.UpdateRuntimeConfigResponse:
    """The kubelet passes the node's pod CIDR on; the default network uses it."""
    cidr = req.runtime_config.network_config.pod_cidr if req.runtime_config else ""
    if cidr:
        core.network.update_pod_cidr(cidr)
    return pb.UpdateRuntimeConfigResponse()
