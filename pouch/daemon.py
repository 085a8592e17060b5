"""The supervision tree of ``pouchd``.

::

    run(config)                      root nursery: image manager (pulls), then the
                                     container manager (one task per pod)
    └── handlers nursery             in-flight stream sessions
        └── servers nursery
            ├── serve_cri            gRPC on the unix socket (trio_asyncio)
            └── StreamServer.serve   HTTP listener for exec/attach/port-forward

A crash anywhere cancels its siblings and the daemon exits non-zero.  On
SIGTERM or SIGINT the servers stop accepting, in-flight calls get the grace
period to finish, then whatever is left is cancelled.
"""

from __future__ import annotations

import errno
import fcntl
import os
import signal
from typing import TYPE_CHECKING

import attrs
import trio

from pouch.container.manager import SCHEMA as CONTAINER_SCHEMA
from pouch.container.manager import ContainerManager
from pouch.core import Core
from pouch.cri import service
from pouch.cri._bridge import StartupError, bind_socket, serve_cri
from pouch.cri._instrument import CallGate
from pouch.errors import InvalidArgument
from pouch.image.manager import SCHEMA as IMAGE_SCHEMA
from pouch.image.manager import ImageManager
from pouch.log import get_logger
from pouch.metrics import StateCollector, registered, serve_metrics
from pouch.network.manager import NetworkManager
from pouch.store.db import Database
from pouch.stream.backend import ContainerStreams
from pouch.stream.server import StreamServer
from pouch.stream.session import SessionLimits

if TYPE_CHECKING:
    from pathlib import Path

    from pouch.config import Config

log = get_logger("pouch.daemon")


@attrs.frozen
class Endpoints:
    cri_socket: Path
    stream_address: str


def acquire_lock(config: Config) -> int:
    """Take the state directory's lock: one daemon per state directory.

    Returns the lock file's descriptor, held for the daemon's life.

    Raises:
        StartupError: another pouchd holds it.
    """
    for directory in (config.root, config.state):
        directory.mkdir(parents=True, exist_ok=True, mode=0o711)
    fd = os.open(config.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise StartupError(
                f"another pouchd is running with state directory {config.state}"
            ) from None
        raise
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def open_core(config: Config) -> Core:
    """Open the database and the stores, recovering what is on disk (blocking)."""
    db = Database(config.root / "pouch.db")
    db.open_sync((*IMAGE_SCHEMA, *CONTAINER_SCHEMA))
    try:
        images = ImageManager(config, db)
    except InvalidArgument as exc:
        raise StartupError(f"runtime.sandbox_image: {exc}") from exc
    images.open_sync()
    network = NetworkManager(
        cache_dir=config.root / "cni-cache",
        conf_dir=config.network.conf_dir,
        plugin_dirs=config.network.plugin_dirs,
        network_name=config.network.network_name,
        use_default=config.network.use_default,
        plugin_timeout=config.network.plugin_timeout,
    )
    containers = ContainerManager(config, db, images, network)
    containers.open_sync()
    streams = StreamServer(
        config.stream,
        ContainerStreams(containers),
        limits=SessionLimits(
            token_ttl=config.stream.token_ttl,
            idle_timeout=config.stream.idle_timeout,
            stream_creation_timeout=config.stream.stream_creation_timeout,
        ),
    )
    return Core(config, db, images, containers, network, streams)


async def run(
    config: Config, *, task_status: trio.TaskStatus[Endpoints] = trio.TASK_STATUS_IGNORED
) -> None:
    """Run the daemon until SIGTERM/SIGINT; return after a clean drain.

    Raises:
        StartupError: the lock or the socket is held by a live daemon.
    """
    lock_fd = acquire_lock(config)
    sock = None
    core = None
    try:
        sock = bind_socket(config.grpc.address)
        core = await trio.to_thread.run_sync(open_core, config)
        gate = CallGate()
        state_metrics = StateCollector(core.containers.state_counts)
        with (
            trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals,
            registered(state_metrics),
        ):
            async with trio.open_nursery() as root:
                await root.start(core.images.run)
                await root.start(core.network.run)
                await root.start(core.containers.run)
                stop = trio.Event()
                async with trio.open_nursery() as handlers:
                    async with trio.open_nursery() as servers:
                        stream_address = await servers.start(core.streams.serve, handlers, stop)
                        core.stream_address = stream_address
                        await servers.start(
                            serve_cri,
                            sock,
                            config.grpc.address,
                            service.build(core, gate),
                            gate,
                            stop,
                            config.shutdown_grace_period,
                        )
                        if config.metrics.enabled:
                            core.metrics_address = await servers.start(
                                serve_metrics, config.metrics.address, config.metrics.port, stop
                            )
                        log.info("pouchd ready", version=core.version, pid=os.getpid())
                        task_status.started(Endpoints(config.grpc.address, stream_address))
                        async for signum in signals:
                            log.info("shutting down", signal=signal.Signals(signum).name)
                            break
                        stop.set()
                    # Servers have drained; sessions get the same grace period.
                    handlers.cancel_scope.deadline = (
                        trio.current_time() + config.shutdown_grace_period
                    )
                root.cancel_scope.cancel()
        with trio.CancelScope(shield=True):
            await core.stats.aclose()
        log.info("pouchd stopped")
    finally:
        if sock is not None:
            sock.close()
            # serve_cri unlinks on its way out; this covers a crash before it ran.
            config.grpc.address.unlink(missing_ok=True)
        if core is not None:
            core.db.close()
        os.close(lock_fd)
