"""The daemon's core: what every RPC implementation is handed.

It holds the configuration, the database and the managers, each a
nursery-shaped service that ``daemon.run`` starts in dependency order
(images first; containers and networking join as they land).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import attrs

from pouch import __version__
from pouch.container.stats import StatsSampler

if TYPE_CHECKING:
    from pouch.config import Config
    from pouch.container.manager import ContainerManager
    from pouch.image.manager import ImageManager
    from pouch.network.manager import NetworkManager
    from pouch.store.db import Database
    from pouch.stream.server import StreamServer


@attrs.define
class Core:
    config: Config
    db: Database
    images: ImageManager
    containers: ContainerManager
    network: NetworkManager
    streams: StreamServer
    #: One sampler for the daemon: it keeps CPU samples for usage_nano_cores
    #: and pyroute2 handles on the pods' namespaces.
    stats: StatsSampler = attrs.field(factory=StatsSampler)
    version: str = __version__
    #: Wall-clock start, in seconds since the epoch.
    started_at: float = attrs.field(factory=time.time)
    #: Where the stream server listens, once it does ("host:port").
    stream_address: str | None = None
    #: Where the Prometheus endpoint listens, when enabled.
    metrics_address: str | None = None
