"""The daemon's core: what every RPC implementation is handed.

It holds the configuration and the managers.  The foundation has no
managers yet beyond the runtime facts below; the image, container and
network managers join here as their issues land, each a nursery-shaped
service that ``daemon.run`` starts in dependency order.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import attrs

from pouch import __version__

if TYPE_CHECKING:
    from pouch.config import Config


@attrs.define
class Core:
    config: Config
    version: str = __version__
    #: Wall-clock start, in seconds since the epoch.
    started_at: float = attrs.field(factory=time.time)
    #: Where the stream server listens, once it does ("host:port").
    stream_address: str | None = None
