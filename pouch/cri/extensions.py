"""Pouch's own gRPC API (``pouch.v1``), served next to the CRI on its socket.

What the ``pouch`` command line needs and CRI v1 lacks: ``Images/Pull``
streams a pull's progress, ``Images/Load`` loads images from an archive on
the node.  The implementations have the shape of the CRI ones (``service``):
Trio functions ``(core, request)``, or ``(core, request, send)`` for a
server-streaming call, raising core errors that the one table in
``_instrument`` maps to gRPC status codes.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import trio

from pouch.cri._pb.pouch import v1 as pb
from pouch.errors import InvalidArgument, PouchError
from pouch.image.reference import parse_reference
from pouch.image.registry import Credentials

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from pouch.core import Core
    from pouch.image.manager import PullProgress

    Send = Callable[[pb.PullProgress], Awaitable[None]]

#: The fastest a Pull stream sends progress: a byte counter changes on every
#: chunk, and a terminal needs no more than ten frames a second.
MIN_INTERVAL: Final = 0.1
#: The longest Pull waits between looks for the pull's progress, before the
#: pull has made it.  The manager makes it as soon as its pull task first
#: runs, so the first looks come one scheduler tick and a millisecond apart:
#: a pull of layers all on disk can be over in a few milliseconds, and one
#: look at its progress is what lets the last message list the layers.
POLL_INTERVAL: Final = 0.05


def to_pb_progress(progress: PullProgress) -> pb.PullProgress:
    """A snapshot of a running pull, as a message."""
    return pb.PullProgress(
        image=progress.ref,
        resolved=progress.resolved,
        layers=[
            pb.LayerProgress(
                digest=layer.digest, size=layer.size, done=layer.done, state=layer.state
            )
            for layer in progress.layers
        ],
    )


class _Watch:
    """Streams snapshots of one reference's pull progress until cancelled."""

    def __init__(self, core: Core, ref: str, send: Send) -> None:
        self._core = core
        self._ref = ref
        self._send = send
        #: The last progress seen: the pull deletes its entry when it ends,
        #: and the final message still reports the layers.
        self.last: PullProgress | None = None

    async def run(self) -> None:
        sent: pb.PullProgress | None = None
        sent_at = -math.inf
        delay = 0.0
        while True:
            progress = self._core.images.progress.get(self._ref)
            if progress is None:
                await trio.sleep(delay)
                delay = min(POLL_INTERVAL, max(0.001, 2 * delay))
                continue
            self.last = progress
            # Take the event before the snapshot: a change made while we send
            # sets this event, so it is never missed.
            changed = progress.changed
            snapshot = to_pb_progress(progress)
            if snapshot != sent:
                await trio.sleep_until(sent_at + MIN_INTERVAL)
                # The sleep may have seen more changes: send the newest state.
                changed = progress.changed
                snapshot = to_pb_progress(progress)
                await self._send(snapshot)
                sent, sent_at = snapshot, trio.current_time()
            await changed.wait()


async def pull(core: Core, req: pb.PullRequest, send: Send) -> None:
    """Pull ``req.image``, streaming its progress; the last message has the id.

    Cancellation: a client that goes away stops the stream; the pull goes on
    in the image manager's nursery, and a retry joins it (as PullImage).
    """
    text = req.image.strip()
    if not text:
        raise InvalidArgument("image is required")
    ref = str(parse_reference(text))
    creds = None
    if req.username or req.password:
        creds = Credentials(username=req.username, password=req.password)
    watch = _Watch(core, ref, send)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch.run)
            image_id = await core.images.pull(text, creds)
            nursery.cancel_scope.cancel()
    except* PouchError as eg:
        raise eg.exceptions[0] from None
    final = to_pb_progress(watch.last) if watch.last is not None else pb.PullProgress(image=ref)
    final.resolved = True
    final.done = True
    final.image_id = image_id
    await send(final)


async def load(core: Core, req: pb.LoadRequest) -> pb.LoadResponse:
    """Load the images of the archive at ``req.path`` (a path on this host)."""
    if not req.path:
        raise InvalidArgument("path is required")
    if not os.path.isabs(req.path):
        raise InvalidArgument(f"path {req.path!r} is not absolute")
    loaded = await core.images.load(Path(req.path))
    return pb.LoadResponse(
        images=[pb.LoadedImage(names=list(names), image_id=image_id) for names, image_id in loaded]
    )


# Keyed by the RPC's name in the proto, as ``service.IMPLEMENTED``.
IMPLEMENTED_EXTENSIONS: Final[dict[str, Callable[..., Awaitable[Any]]]] = {
    "Pull": pull,
    "Load": load,
}


def extension_bases() -> list[Any]:
    """The generated service bases of ``pouch.v1``, for ``service.build``.

    Typed ``Any`` on purpose: in ``build``'s loop over these and the CRI's
    bases, mypy would join them all to betterproto's ``ServiceBase``, which
    declares no ``__mapping__``.
    """
    return [pb.ImagesBase()]
