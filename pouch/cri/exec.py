"""ExecSync (and, as the stream server lands, Exec, Attach and PortForward)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pouch.container.manager import EXEC_OUTPUT_LIMIT
from pouch.cri._pb.runtime import v1 as pb
from pouch.cri.sandbox import require_id

if TYPE_CHECKING:
    from pouch.core import Core

TRUNCATED_NOTE = b"\n[pouch: output truncated at 16 MiB per stream]\n"


async def exec_sync(core: Core, req: pb.ExecSyncRequest) -> pb.ExecSyncResponse:
    """Run a command to completion; ``timeout`` 0 means no limit (cri-api)."""
    require_id(req.container_id, "container_id")
    result = await core.containers.exec_sync(
        req.container_id, list(req.cmd), float(max(req.timeout, 0))
    )
    stderr = result.stderr
    if result.truncated:
        # Say so where a human reading probe output will look (cri-o logs it).
        stderr = stderr[: EXEC_OUTPUT_LIMIT - len(TRUNCATED_NOTE)] + TRUNCATED_NOTE
    return pb.ExecSyncResponse(stdout=result.stdout, stderr=stderr, exit_code=result.exit_code)
