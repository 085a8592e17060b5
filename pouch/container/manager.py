"""The container manager: pod sandboxes and their containers on runc + conmon.

Supervision: the manager's nursery holds one `PodTask` per sandbox.  Every
change to a pod (create, start, stop, remove a container; stop or remove the
sandbox; a container's exit) passes through that pod's inbox in order, so
two calls on one pod never race and different pods never wait on each
other.  A caller whose deadline passes stops waiting; the work finishes in
the pod task, and a kubelet retry of the same create receives its result.

State: one SQLite row per sandbox and per container, holding the record as
JSON.  A create writes its row (state ``creating``, which reserves the name)
before it touches the system, and ``created`` after the runtime has the
container; a daemon killed in between finds ``creating`` rows at start-up
and removes what they may have left (runtime state, mounts, namespaces,
directories), by the deterministic paths of the id.  conmon keeps running
containers, their logs and exit codes while the daemon is away.

::

    sandbox:    creating -> ready -> notready -> (removed)
    container:  creating -> created -> running -> exited -> (removed)
"""

from __future__ import annotations

import contextlib
import enum
import json
import os
import secrets
import shutil
import signal as signals
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, TypeVar

import attrs
import cattrs
import trio

from pouch import errors
from pouch._util import mount as mounts
from pouch._util.failpoints import failpoint
from pouch._util.inflight import InFlight, InFlightMap
from pouch.container import spec as specs
from pouch.container.model import ContainerConfig, LinuxResources, NamespaceMode, PodConfig
from pouch.container.monitor import ContainerMonitor, oom_killed, read_conmon_pid
from pouch.container.runtime import ExecResult, Runtime, RuntimeHandler
from pouch.image import media
from pouch.log import get_logger
from pouch.network import netns

if TYPE_CHECKING:
    import sqlite3

    from pouch.config import Config
    from pouch.image.manager import ImageManager
    from pouch.network.manager import NetworkManager
    from pouch.store.db import Database

log = get_logger("pouch.container")

T = TypeVar("T")

SCHEMA: Final = (
    """CREATE TABLE IF NOT EXISTS sandboxes (
        sandbox_id TEXT PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        doc TEXT NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS containers (
        container_id TEXT PRIMARY KEY,
        sandbox_id TEXT NOT NULL,
        name TEXT NOT NULL UNIQUE,
        doc TEXT NOT NULL
    )""",
)

#: How long StopPodSandbox gives containers (the kubelet stops them first).
SANDBOX_STOP_TIMEOUT: Final = 0.0
#: ExecSync output kept per stream: cri-o's cap after CVE-2022-1708.
EXEC_OUTPUT_LIMIT: Final = 16 * 1024 * 1024


class SandboxState(enum.StrEnum):
    CREATING = "creating"
    READY = "ready"
    NOTREADY = "notready"


class ContainerState(enum.StrEnum):
    CREATING = "creating"
    CREATED = "created"
    RUNNING = "running"
    EXITED = "exited"
    UNKNOWN = "unknown"


class EventType(enum.StrEnum):
    CREATED = "created"
    STARTED = "started"
    STOPPED = "stopped"
    DELETED = "deleted"
    #: Not a CRI event type: resources changed (no event is sent for it).
    UPDATED = "updated"


#: Events buffered per GetContainerEvents subscriber before they are dropped.
EVENT_BUFFER: Final = 256


@attrs.define
class Sandbox:
    sandbox_id: str
    name: str
    config: PodConfig
    handler: str
    state: SandboxState
    created_at: int
    netns_path: str | None = None
    #: The pod's IPs from its CNI result, primary first (none with host network).
    ips: tuple[str, ...] = ()
    #: The sandbox image's layers, when the infra runs from one.
    chain_ids: tuple[str, ...] = ()
    infra_pid: int = 0
    conmon_pid: int | None = None
    spec: dict[str, Any] = attrs.field(factory=dict)


@attrs.define
class Container:
    container_id: str
    sandbox_id: str
    name: str
    config: ContainerConfig
    image_id: str
    image_ref: str
    state: ContainerState
    created_at: int
    log_path: str = ""
    chain_ids: tuple[str, ...] = ()
    started_at: int = 0
    finished_at: int = 0
    exit_code: int = 0
    reason: str = ""
    message: str = ""
    pid: int = 0
    conmon_pid: int | None = None
    stop_signal: str = "SIGTERM"
    spec: dict[str, Any] = attrs.field(factory=dict)


@attrs.frozen
class ContainerEvent:
    """A container's life-cycle event, with its pod's state at that moment."""

    container_id: str
    kind: EventType
    created_at: int
    sandbox: Sandbox
    containers: tuple[Container, ...]


_codec = cattrs.Converter()


def _dump(record: Sandbox | Container) -> str:
    return json.dumps(_codec.unstructure(record), separators=(",", ":"))


def sandbox_key(pod: PodConfig) -> str:
    """The name a sandbox reserves (cri-o and containerd use the same shape)."""
    m = pod.metadata
    return f"{m.name}_{m.namespace}_{m.uid}_{m.attempt}"


def container_key(pod: PodConfig, ctr: ContainerConfig) -> str:
    m, p = ctr.metadata, pod.metadata
    return f"{m.name}_{p.name}_{p.namespace}_{p.uid}_{m.attempt}"


class PodTask:
    """The task that owns one pod: its inbox runs commands one at a time."""

    def __init__(self, sandbox_id: str) -> None:
        self.sandbox_id = sandbox_id
        # Unbuffered: a sender waits until the pod task takes its command,
        # which keeps a slow pod from piling up work.
        self._send, self._recv = trio.open_memory_channel[
            tuple[Callable[[], Awaitable[Any]], InFlight[Any]]
        ](0)
        self.watchers: trio.Nursery | None = None
        self._scope = trio.CancelScope()
        self.exited: dict[str, trio.Event] = {}

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with self._scope:
            async with trio.open_nursery() as watchers:
                self.watchers = watchers
                task_status.started()
                async with self._recv:
                    async for fn, op in self._recv:
                        await op.run(fn)
                watchers.cancel_scope.cancel()

    async def call(self, fn: Callable[[], Awaitable[T]]) -> T:
        """Run *fn* in the pod task and return its result.

        Cancellation: once the pod task took the command it runs to the end;
        the caller only stops waiting.
        """
        op: InFlight[T] = InFlight()
        try:
            await self._send.send((fn, op))
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            raise errors.NotFound(f"pod sandbox {self.sandbox_id} not found") from None
        return await op.result()

    def post(self, fn: Callable[[], Awaitable[Any]]) -> None:
        """Queue *fn* without waiting (container exits)."""
        if self.watchers is not None:
            self.watchers.start_soon(self._post, fn)

    async def _post(self, fn: Callable[[], Awaitable[Any]]) -> None:
        with contextlib.suppress(trio.ClosedResourceError, trio.BrokenResourceError):
            await self._send.send((fn, InFlight()))

    def close(self) -> None:
        self._send.close()
        self._scope.cancel()


class ContainerManager:
    def __init__(
        self, config: Config, db: Database, images: ImageManager, network: NetworkManager
    ) -> None:
        self._config = config
        self._db = db
        self._images = images
        self._network = network
        self.root = config.root
        self.state_dir = config.state
        self.exit_dir = config.state / "exits"
        self.socket_dir = config.state / "attach"
        self.infra_rootfs = config.root / "infra-rootfs"
        self.monitor = ContainerMonitor(exit_dir=self.exit_dir, attach_socket_dir=self.socket_dir)
        self.runtimes: dict[str, Runtime] = {}
        for name, handler in config.runtime.handlers.items():
            root = handler.root or (config.state / "runtime" / name)
            rh = RuntimeHandler(
                name=name,
                binary=handler.binary,
                root=root,
                systemd_cgroup=config.cgroup.driver.value == "systemd",
            )
            self.runtimes[name] = Runtime(rh, attach_socket_dir=self.socket_dir)
        self.sandboxes: dict[str, Sandbox] = {}
        self.containers: dict[str, Container] = {}
        self._names: dict[str, str] = {}
        self._pods: dict[str, PodTask] = {}
        self._creates: InFlightMap[str, str] = InFlightMap()
        self._nursery: trio.Nursery | None = None
        self._subscribers: set[trio.MemorySendChannel[ContainerEvent]] = set()
        self._oom_floor = specs.oom_score_adj_floor()
        self._capabilities = specs.current_capabilities()
        self._apparmor = _host_has_apparmor()
        images.add_snapshot_user(self._chains_in_use)

    # ---- start-up -------------------------------------------------------------------

    def open_sync(self) -> None:
        for d in (
            self.exit_dir,
            self.socket_dir,
            self.state_dir / "containers",
            self.state_dir / "sandboxes",
            self.root / "containers",
            self.root / "sandboxes",
        ):
            d.mkdir(parents=True, exist_ok=True, mode=0o711)
        self._make_infra_rootfs()
        sandboxes, containers = self._db.run_sync(_load_rows)
        for doc in sandboxes:
            s = _codec.structure(json.loads(doc), Sandbox)
            self.sandboxes[s.sandbox_id] = s
            self._names[s.name] = s.sandbox_id
        for doc in containers:
            c = _codec.structure(json.loads(doc), Container)
            self.containers[c.container_id] = c
            self._names[c.name] = c.container_id

    def _make_infra_rootfs(self) -> None:
        # A rootfs of one static binary: pods start with no image and no network.
        binary = self._config.runtime.infra_binary
        target = self.infra_rootfs / "catatonit"
        if target.exists() and target.stat().st_size == binary.stat().st_size:
            return
        tmp = self.root / f".infra-{secrets.token_hex(4)}"
        tmp.mkdir(mode=0o755)
        for d in ("dev", "proc", "sys", "etc", "tmp"):
            (tmp / d).mkdir(mode=0o755)
        shutil.copy2(binary, tmp / "catatonit")
        os.chmod(tmp / "catatonit", 0o755)
        if self.infra_rootfs.exists():
            shutil.rmtree(self.infra_rootfs)
        os.rename(tmp, self.infra_rootfs)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            await self._recover()
            for sandbox_id in list(self.sandboxes):
                await self._start_pod_task(sandbox_id)
            for c in list(self.containers.values()):
                if c.state in (ContainerState.RUNNING, ContainerState.CREATED):
                    self._watch(c)
            task_status.started()
            await trio.sleep_forever()

    async def _recover(self) -> None:
        """Make the records agree with the system after a restart or crash."""
        known = set(self.sandboxes) | set(self.containers)
        for name, runtime in self.runtimes.items():
            if not runtime.handler.binary.exists():
                continue
            for st in await runtime.list():
                cid = str(st.get("id", ""))
                if cid and cid not in known:
                    log.warning("removing container unknown to the database", id=cid, runtime=name)
                    await self._runtime_cleanup(runtime, cid)
        for c in list(self.containers.values()):
            try:
                await self._recover_container(c)
            except Exception as exc:
                # One bad record must not keep the daemon from starting.
                log.error("failed to recover container", container_id=c.container_id, exc_info=exc)
        for s in list(self.sandboxes.values()):
            try:
                await self._recover_sandbox(s)
            except Exception as exc:
                log.error("failed to recover sandbox", sandbox_id=s.sandbox_id, exc_info=exc)
        # No sweep of /run/netns by prefix: another daemon may own those.  A
        # namespace exists only after its sandbox row, so the rows cover them.
        # CNI records of sandboxes that are gone: finish their DEL.
        for sandbox_id in self._network.cached_sandboxes():
            if sandbox_id not in self.sandboxes:
                try:
                    await self._network.teardown(sandbox_id, None)
                except Exception as exc:
                    log.error("failed to tear down network", sandbox_id=sandbox_id, exc_info=exc)

    async def _recover_container(self, c: Container) -> None:
        if c.state is ContainerState.CREATING:
            log.warning("cleaning up half-created container", container_id=c.container_id)
            await self._destroy_container(c)
            return
        if c.state in (ContainerState.CREATED, ContainerState.RUNNING):
            sandbox = self.sandboxes.get(c.sandbox_id)
            runtime = self._runtime_for(sandbox.handler if sandbox else "")
            state = await runtime.state(c.container_id)
            code = self.monitor.read_exit_code(c.container_id)
            if state is None or state.get("status") == "stopped" or code is not None:
                self._mark_exited(c, code if code is not None else 255, unknown=code is None)
                await self._save(c)

    async def _recover_sandbox(self, s: Sandbox) -> None:
        if s.state is SandboxState.CREATING:
            log.warning("cleaning up half-created sandbox", sandbox_id=s.sandbox_id)
            await self._destroy_sandbox(s)
            return
        if s.state is SandboxState.READY:
            state = await self._runtime_for(s.handler).state(s.sandbox_id)
            if state is None or state.get("status") != "running":
                s.state = SandboxState.NOTREADY
                await self._save(s)

    # ---- helpers --------------------------------------------------------------------------

    def _runtime_for(self, handler: str) -> Runtime:
        name = handler or self._config.runtime.default_handler
        runtime = self.runtimes.get(name)
        if runtime is None:
            raise errors.InvalidArgument(f'runtime_handler: unknown runtime handler "{handler}"')
        return runtime

    def _chains_in_use(self) -> Iterable[str]:
        records: list[Sandbox | Container] = [*self.containers.values(), *self.sandboxes.values()]
        return {chain for r in records for chain in r.chain_ids}

    async def _save(self, record: Sandbox | Container) -> None:
        doc = _dump(record)
        if isinstance(record, Sandbox):
            await self._db.transaction(
                lambda conn: conn.execute(
                    "INSERT INTO sandboxes (sandbox_id, name, doc) VALUES (?, ?, ?)"
                    " ON CONFLICT(sandbox_id) DO UPDATE SET doc=excluded.doc",
                    (record.sandbox_id, record.name, doc),
                )
            )
        else:
            await self._db.transaction(
                lambda conn: conn.execute(
                    "INSERT INTO containers (container_id, sandbox_id, name, doc)"
                    " VALUES (?, ?, ?, ?) ON CONFLICT(container_id) DO UPDATE SET doc=excluded.doc",
                    (record.container_id, record.sandbox_id, record.name, doc),
                )
            )

    async def _forget(self, record: Sandbox | Container) -> None:
        if isinstance(record, Sandbox):
            await self._db.transaction(
                lambda conn: conn.execute(
                    "DELETE FROM sandboxes WHERE sandbox_id = ?", (record.sandbox_id,)
                )
            )
            self.sandboxes.pop(record.sandbox_id, None)
        else:
            await self._db.transaction(
                lambda conn: conn.execute(
                    "DELETE FROM containers WHERE container_id = ?", (record.container_id,)
                )
            )
            self.containers.pop(record.container_id, None)
        self._names.pop(record.name, None)

    def _reserve(self, name: str, record_id: str, what: str) -> None:
        owner = self._names.get(name)
        if owner is not None:
            raise errors.AlreadyExists(f'{what} name "{name}" is reserved for {owner[:12]}')
        self._names[name] = record_id

    async def _start_pod_task(self, sandbox_id: str) -> PodTask:
        assert self._nursery is not None
        pod = PodTask(sandbox_id)
        await self._nursery.start(pod.run)
        self._pods[sandbox_id] = pod
        return pod

    def _pod(self, sandbox_id: str) -> PodTask:
        pod = self._pods.get(self.sandbox_id(sandbox_id))
        if pod is None:
            raise errors.NotFound(f"pod sandbox {sandbox_id} not found")
        return pod

    def sandbox_id(self, text: str) -> str:
        """Resolve a full id or a unique prefix."""
        return _resolve(text, self.sandboxes, "pod sandbox")

    def container_id(self, text: str) -> str:
        return _resolve(text, self.containers, "container")

    def sandbox_dir(self, sandbox_id: str) -> Path:
        return self.root / "sandboxes" / sandbox_id

    def sandbox_bundle(self, sandbox_id: str) -> Path:
        return self.state_dir / "sandboxes" / sandbox_id

    def container_dir(self, container_id: str) -> Path:
        return self.root / "containers" / container_id

    def container_bundle(self, container_id: str) -> Path:
        return self.state_dir / "containers" / container_id

    # ---- sandboxes ------------------------------------------------------------------------

    async def run_pod_sandbox(self, pod: PodConfig, handler: str) -> str:
        """Create and start a pod sandbox; return its id.

        Raises:
            InvalidArgument: unknown runtime handler.
            AlreadyExists: the pod's name (name, namespace, uid, attempt) is taken.
            RuntimeFailed: runc or conmon failed; nothing is left behind.

        Cancellation: the sandbox is created all the same, and a retry with
        the same metadata receives its id.
        """
        runtime = self._runtime_for(handler)
        key = sandbox_key(pod)
        running = self._creates.get(key)
        if running is not None:
            return await running.result()
        existing = self._names.get(key)
        if existing is not None:
            s = self.sandboxes.get(existing)
            if s is not None and s.state is SandboxState.READY and s.config == pod:
                # A retry of a create whose caller gave up: same pod, same answer.
                return existing
            raise errors.AlreadyExists(f'pod sandbox name "{key}" is reserved for {existing[:12]}')
        assert self._nursery is not None
        return await self._creates.run(
            self._nursery,
            key,
            lambda: self._run_pod_sandbox(pod, handler or runtime.handler.name, key),
        )

    async def _run_pod_sandbox(self, pod: PodConfig, handler: str, key: str) -> str:
        runtime = self._runtime_for(handler)
        sandbox_id = secrets.token_hex(32)
        self._reserve(key, sandbox_id, "pod sandbox")
        s = Sandbox(
            sandbox_id=sandbox_id,
            name=key,
            config=pod,
            handler=handler,
            state=SandboxState.CREATING,
            created_at=time.time_ns(),
        )
        self.sandboxes[sandbox_id] = s
        try:
            await self._save(s)
            await self._create_sandbox(s, runtime)
        except BaseException:
            with trio.CancelScope(shield=True), trio.move_on_after(60):
                await self._destroy_sandbox(s)
            raise
        await self._start_pod_task(sandbox_id)
        log.info("pod sandbox ready", sandbox_id=sandbox_id, name=key)
        return sandbox_id

    async def _create_sandbox(self, s: Sandbox, runtime: Runtime) -> None:
        pod = s.config
        ns = pod.namespace_options
        sdir = self.sandbox_dir(s.sandbox_id)
        bundle = self.sandbox_bundle(s.sandbox_id)
        sdir.mkdir(parents=True, exist_ok=True, mode=0o711)
        bundle.mkdir(parents=True, exist_ok=True, mode=0o711)
        host_network = ns.network is NamespaceMode.NODE
        await trio.to_thread.run_sync(_write_etc_files, sdir, pod, host_network)
        if not host_network:
            s.netns_path = str(await netns.create(netns.name_for(s.sandbox_id)))
            meta = pod.metadata
            net = await self._network.setup(
                s.sandbox_id,
                s.netns_path,
                pod_name=meta.name,
                pod_namespace=meta.namespace,
                pod_uid=meta.uid,
                port_mappings=pod.port_mappings,
                dns=pod.dns,
            )
            s.ips = tuple(net.ips)
            await failpoint("sandbox.networked")
        shm_path: str | None = None
        if ns.ipc is not NamespaceMode.NODE:
            shm = bundle / "shm"
            shm.mkdir(exist_ok=True, mode=0o755)
            await trio.to_thread.run_sync(
                mounts.mount,
                "shm",
                shm,
                "tmpfs",
                mounts.MS_NOSUID | mounts.MS_NODEV | mounts.MS_NOEXEC,
                "mode=1777,size=65536k",
            )
            shm_path = str(shm)
        rootfs, infra_argv = await self._infra_rootfs(s)
        spec = specs.pod_spec(
            pod,
            sandbox_id=s.sandbox_id,
            rootfs=rootfs,
            infra_argv=infra_argv,
            netns_path=s.netns_path,
            cgroups_path=self._cgroups_path(pod, s.sandbox_id),
            oom_score_adj_floor=self._oom_floor,
            shm_path=shm_path,
            resolv_conf_path=str(sdir / "resolv.conf"),
        )
        s.spec = dict(spec)
        await trio.Path(bundle / "config.json").write_text(json.dumps(spec))
        await failpoint("sandbox.prepared")
        s.infra_pid = await runtime.create(
            s.sandbox_id,
            bundle,
            log_path=bundle / "infra.log",
            exit_dir=self.exit_dir,
            persist_dir=bundle,
            stdin=False,
            tty=False,
        )
        await failpoint("sandbox.created")
        await runtime.start(s.sandbox_id)
        s.conmon_pid = read_conmon_pid(bundle)
        s.state = SandboxState.READY
        await self._save(s)

    async def _infra_rootfs(self, s: Sandbox) -> tuple[Path, list[str]]:
        """Where the infra process runs from, and its command line.

        By default ``catatonit -P`` from the daemon's own one-binary rootfs.
        With ``runtime.sandbox_image`` set, that image (pulled on first use)
        gives the rootfs, as an overlay of its layers, and the command.
        """
        image_ref = self._config.runtime.sandbox_image
        if not image_ref:
            return self.infra_rootfs, ["/catatonit", "-P"]
        image = self._images.get(image_ref)
        if image is None:
            await self._images.pull(image_ref)
            image = self._images.get(image_ref)
            if image is None:
                raise errors.NotFound(f'sandbox image "{image_ref}" is gone after its pull')
        config = media.parse_config(await self._images.config_of(image.image_id))
        argv = [*config.entrypoint, *config.cmd]
        if not argv:
            raise errors.FailedPrecondition(
                f'sandbox image "{image_ref}" has neither Entrypoint nor Cmd'
            )
        s.chain_ids = image.chain_ids
        sdir = self.sandbox_dir(s.sandbox_id)
        rootfs = self.sandbox_bundle(s.sandbox_id) / "rootfs"
        for d in (rootfs, sdir / "upper", sdir / "work"):
            d.mkdir(parents=True, exist_ok=True, mode=0o755)
        lower = ":".join(
            str(self._images.snapshots.path(chain)) for chain in reversed(image.chain_ids)
        )
        options = f"lowerdir={lower},upperdir={sdir / 'upper'},workdir={sdir / 'work'}"
        await trio.to_thread.run_sync(mounts.mount, "overlay", rootfs, "overlay", 0, options)
        return rootfs, argv

    def _cgroups_path(self, pod: PodConfig, record_id: str) -> str:
        parent = pod.cgroup_parent or self._config.runtime.default_cgroup_parent
        if self._config.cgroup.driver.value == "systemd":
            return f"{parent or 'system.slice'}:pouch:{record_id}"
        return f"{parent.rstrip('/')}/pouch-{record_id[:32]}"

    async def _destroy_sandbox(self, s: Sandbox) -> None:
        """Remove everything a sandbox may have; safe on partial state."""
        runtime = self._runtime_for(s.handler)
        await self._runtime_cleanup(runtime, s.sandbox_id)
        bundle = self.sandbox_bundle(s.sandbox_id)
        await trio.to_thread.run_sync(mounts.unmount, bundle / "shm")
        await trio.to_thread.run_sync(mounts.unmount, bundle / "rootfs")
        # CNI DEL from the cached config and result, then the namespace: the
        # namespace is removed even if DEL failed (the cache keeps the DEL for
        # a later retry, with CNI_NETNS empty).
        try:
            await self._network.teardown(s.sandbox_id, s.netns_path)
        finally:
            await netns.remove(netns.name_for(s.sandbox_id))
        await trio.to_thread.run_sync(_rmtree, bundle)
        await trio.to_thread.run_sync(_rmtree, self.sandbox_dir(s.sandbox_id))
        with contextlib.suppress(FileNotFoundError):
            (self.exit_dir / s.sandbox_id).unlink()
        await self._forget(s)

    async def _runtime_cleanup(self, runtime: Runtime, record_id: str) -> None:
        with trio.CancelScope(shield=True):
            with contextlib.suppress(errors.RuntimeFailed, errors.NotFound):
                await runtime.kill(record_id, signals.SIGKILL, all=True)
            await runtime.delete(record_id, force=True)

    async def stop_pod_sandbox(self, sandbox_id: str) -> None:
        """Stop every container, then the infra process.  Idempotent."""
        sandbox_id = self.sandbox_id(sandbox_id)
        pod = self._pod(sandbox_id)
        for c in [c for c in self.containers.values() if c.sandbox_id == sandbox_id]:
            await self.stop_container(c.container_id, SANDBOX_STOP_TIMEOUT)
        await pod.call(lambda: self._stop_infra(sandbox_id))

    async def _stop_infra(self, sandbox_id: str) -> None:
        s = self.sandboxes[sandbox_id]
        if s.state is SandboxState.NOTREADY:
            # Idempotent, and the retry point for a DEL that failed before.
            await self._network.teardown(sandbox_id, s.netns_path)
            return
        runtime = self._runtime_for(s.handler)
        with contextlib.suppress(errors.RuntimeFailed, errors.NotFound):
            await runtime.kill(sandbox_id, signals.SIGKILL, all=True)
        with trio.move_on_after(10):
            await self.monitor.wait_exit(sandbox_id, s.conmon_pid)
        s.state = SandboxState.NOTREADY
        await self._save(s)
        # Reclaim the IP now (cri-api StopPodSandbox); a failure is reported
        # and the next stop or the remove retries it.
        await self._network.teardown(sandbox_id, s.netns_path)
        log.info("pod sandbox stopped", sandbox_id=sandbox_id)

    async def remove_pod_sandbox(self, sandbox_id: str) -> None:
        """Remove the sandbox and its containers.  Idempotent (unknown id: success)."""
        try:
            sandbox_id = self.sandbox_id(sandbox_id)
        except errors.NotFound:
            return
        pod = self._pod(sandbox_id)
        for c in [c for c in self.containers.values() if c.sandbox_id == sandbox_id]:
            await self.remove_container(c.container_id)

        async def remove() -> None:
            await self._stop_infra(sandbox_id)
            await self._destroy_sandbox(self.sandboxes[sandbox_id])

        await pod.call(remove)
        pod.close()
        self._pods.pop(sandbox_id, None)
        log.info("pod sandbox removed", sandbox_id=sandbox_id)

    # ---- containers -------------------------------------------------------------------------

    async def create_container(self, sandbox_id: str, ctr: ContainerConfig) -> str:
        """Create a container in a ready sandbox; return its id.

        Raises:
            NotFound: unknown sandbox, or the image is not present.
            FailedPrecondition: the sandbox is not ready.
            AlreadyExists: the container's name is taken.

        Cancellation: the create finishes in the pod task; a retry with the
        same name and config receives the same id.
        """
        sandbox_id = self.sandbox_id(sandbox_id)
        pod = self._pod(sandbox_id)
        s = self.sandboxes[sandbox_id]
        key = container_key(s.config, ctr)
        running = self._creates.get(key)
        if running is not None:
            return await running.result()
        existing = self._names.get(key)
        if existing is not None:
            c = self.containers.get(existing)
            if c is not None and c.config == ctr and c.state is ContainerState.CREATED:
                return existing
            raise errors.AlreadyExists(f'container name "{key}" is reserved for {existing[:12]}')
        assert self._nursery is not None
        return await self._creates.run(
            self._nursery, key, lambda: pod.call(lambda: self._create_container(s, ctr, key))
        )

    async def _create_container(self, s: Sandbox, ctr: ContainerConfig, key: str) -> str:
        if s.state is not SandboxState.READY:
            raise errors.FailedPrecondition(
                f"pod sandbox {s.sandbox_id[:12]} is not ready: cannot create containers in it"
            )
        image = self._images.get(ctr.image)
        if image is None:
            raise errors.NotFound(f'image "{ctr.image}" not found: pull it first')
        image_config = media.parse_config(await self._images.config_of(image.image_id))
        container_id = secrets.token_hex(32)
        self._reserve(key, container_id, "container")
        pod = s.config
        log_path = ""
        if pod.log_directory and ctr.log_path:
            log_path = os.path.join(pod.log_directory, ctr.log_path)
        c = Container(
            container_id=container_id,
            sandbox_id=s.sandbox_id,
            name=key,
            config=ctr,
            image_id=image.image_id,
            image_ref=ctr.image,
            state=ContainerState.CREATING,
            created_at=time.time_ns(),
            log_path=log_path,
            chain_ids=image.chain_ids,
            stop_signal=specs.effective_stop_signal(ctr, image_config),
        )
        self.containers[container_id] = c
        try:
            await self._save(c)
            await self._create_in_runtime(s, c, image_config)
        except BaseException:
            with trio.CancelScope(shield=True), trio.move_on_after(60):
                await self._destroy_container(c)
            raise
        self._publish(c, EventType.CREATED)
        log.info("container created", container_id=container_id, name=key)
        return container_id

    async def _create_in_runtime(
        self, s: Sandbox, c: Container, image_config: media.ImageConfig
    ) -> None:
        runtime = self._runtime_for(s.handler)
        bundle = self.container_bundle(c.container_id)
        cdir = self.container_dir(c.container_id)
        rootfs = bundle / "rootfs"
        for d in (bundle, rootfs, cdir / "upper", cdir / "work"):
            d.mkdir(parents=True, exist_ok=True, mode=0o755)
        lower = ":".join(str(self._images.snapshots.path(chain)) for chain in reversed(c.chain_ids))
        options = f"lowerdir={lower},upperdir={cdir / 'upper'},workdir={cdir / 'work'}"
        await trio.to_thread.run_sync(mounts.mount, "overlay", rootfs, "overlay", 0, options)
        await failpoint("container.mounted")
        passwd, group = await trio.to_thread.run_sync(specs.read_user_db, rootfs)
        await trio.to_thread.run_sync(specs.prepare_mount_sources, c.config)
        pod = s.config
        ns = pod.namespace_options
        infra = f"/proc/{s.infra_pid}/ns"
        pod_namespaces: dict[str, str] = {}
        if s.netns_path:
            pod_namespaces["net"] = s.netns_path
            pod_namespaces["uts"] = f"{infra}/uts"
        if ns.ipc is not NamespaceMode.NODE:
            pod_namespaces["ipc"] = f"{infra}/ipc"
        if ns.pid is NamespaceMode.POD:
            pod_namespaces["pid"] = f"{infra}/pid"
        sdir = self.sandbox_dir(s.sandbox_id)
        etc = {name: sdir / name for name in ("hosts", "resolv.conf", "hostname")}
        shm = self.sandbox_bundle(s.sandbox_id) / "shm"
        spec = specs.container_spec(
            pod,
            c.config,
            image_config,
            sandbox_id=s.sandbox_id,
            rootfs=rootfs,
            pod_namespaces=pod_namespaces,
            etc_files={k: str(v) for k, v in etc.items() if v.exists()},
            shm_path=str(shm) if ns.ipc is not NamespaceMode.NODE else None,
            passwd=passwd,
            group=group,
            cgroups_path=self._cgroups_path(pod, c.container_id),
            oom_score_adj_floor=self._oom_floor,
            host_has_apparmor=self._apparmor,
            image_name=c.image_ref,
            available_capabilities=self._capabilities,
            mountinfo=await trio.Path("/proc/self/mountinfo").read_text(),
        )
        c.spec = dict(spec)
        await trio.Path(bundle / "config.json").write_text(json.dumps(spec))
        log_path = Path(c.log_path) if c.log_path else bundle / "container.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        c.pid = await runtime.create(
            c.container_id,
            bundle,
            log_path=log_path,
            exit_dir=self.exit_dir,
            persist_dir=bundle,
            stdin=c.config.stdin,
            tty=c.config.tty,
            stdin_once=c.config.stdin_once,
        )
        c.conmon_pid = read_conmon_pid(bundle)
        await failpoint("container.created")
        c.state = ContainerState.CREATED
        await self._save(c)

    async def _destroy_container(self, c: Container) -> None:
        s = self.sandboxes.get(c.sandbox_id)
        runtime = self._runtime_for(s.handler if s else "")
        await self._runtime_cleanup(runtime, c.container_id)
        bundle = self.container_bundle(c.container_id)
        await trio.to_thread.run_sync(mounts.unmount, bundle / "rootfs")
        await trio.to_thread.run_sync(_rmtree, bundle)
        await trio.to_thread.run_sync(_rmtree, self.container_dir(c.container_id))
        with contextlib.suppress(FileNotFoundError):
            (self.exit_dir / c.container_id).unlink()
        await self._forget(c)

    async def start_container(self, container_id: str) -> None:
        """Start a created container.

        Raises:
            NotFound: unknown container.
            FailedPrecondition: it is not in the created state.
        """
        container_id = self.container_id(container_id)
        c = self.containers[container_id]
        await self._pod(c.sandbox_id).call(lambda: self._start(c))

    async def _start(self, c: Container) -> None:
        if c.state is not ContainerState.CREATED:
            raise errors.FailedPrecondition(
                f"container {c.container_id[:12]} is {c.state.value}, not created: cannot start it"
            )
        s = self.sandboxes[c.sandbox_id]
        if s.state is not SandboxState.READY:
            raise errors.FailedPrecondition(f"pod sandbox {s.sandbox_id[:12]} is not ready")
        await self._runtime_for(s.handler).start(c.container_id)
        c.state = ContainerState.RUNNING
        c.started_at = time.time_ns()
        await self._save(c)
        self._watch(c)
        self._publish(c, EventType.STARTED)
        log.info("container started", container_id=c.container_id)

    def _watch(self, c: Container) -> None:
        pod = self._pods.get(c.sandbox_id)
        if pod is None or pod.watchers is None:
            return
        event = pod.exited.setdefault(c.container_id, trio.Event())

        async def watch() -> None:
            code = await self.monitor.wait_exit(c.container_id, c.conmon_pid)
            pod.post(lambda: self._on_exit(c, code, event))

        pod.watchers.start_soon(watch)

    async def _on_exit(self, c: Container, code: int, event: trio.Event) -> None:
        if c.container_id in self.containers and c.state is not ContainerState.EXITED:
            self._mark_exited(c, code)
            await self._save(c)
            self._publish(c, EventType.STOPPED)
            log.info("container exited", container_id=c.container_id, exit_code=code)
        event.set()

    def _mark_exited(self, c: Container, code: int, *, unknown: bool = False) -> None:
        c.state = ContainerState.EXITED
        c.exit_code = code
        c.finished_at = c.finished_at or time.time_ns()
        if unknown:
            c.reason, c.message = "Unknown", "the container's exit code was lost"
        elif oom_killed(self.container_bundle(c.container_id)):
            c.reason = "OOMKilled"
        else:
            c.reason = "Completed" if code == 0 else "Error"

    async def stop_container(self, container_id: str, timeout: float) -> None:  # noqa: ASYNC109
        """Send the stop signal, wait *timeout* seconds, then SIGKILL.

        Idempotent: an exited or unknown container is success (cri-api
        StopContainer).
        """
        try:
            container_id = self.container_id(container_id)
        except errors.NotFound:
            return
        c = self.containers[container_id]
        pod = self._pod(c.sandbox_id)
        if c.state is not ContainerState.RUNNING:
            if c.state is ContainerState.CREATED:
                await pod.call(lambda: self._kill_created(c))
            return
        event = pod.exited.setdefault(container_id, trio.Event())
        runtime = self._runtime_for(self.sandboxes[c.sandbox_id].handler)
        if timeout > 0:
            with contextlib.suppress(errors.RuntimeFailed, errors.NotFound):
                await runtime.kill(container_id, _signal_number(c.stop_signal))
            with trio.move_on_after(timeout):
                await event.wait()
        if not event.is_set():
            with contextlib.suppress(errors.RuntimeFailed, errors.NotFound):
                await runtime.kill(container_id, signals.SIGKILL, all=True)
            with trio.move_on_after(30):
                await event.wait()
        log.info("container stopped", container_id=container_id)

    async def _kill_created(self, c: Container) -> None:
        # Never started: there is no process to signal; record it as exited.
        runtime = self._runtime_for(self.sandboxes[c.sandbox_id].handler)
        await self._runtime_cleanup(runtime, c.container_id)
        self._mark_exited(c, 0)
        c.reason = "Completed"
        await self._save(c)
        self._publish(c, EventType.STOPPED)

    async def remove_container(self, container_id: str) -> None:
        """Remove a container, killing it if needed.  Idempotent."""
        try:
            container_id = self.container_id(container_id)
        except errors.NotFound:
            return
        c = self.containers[container_id]
        if c.state is ContainerState.RUNNING:
            await self.stop_container(container_id, 0)
        pod = self._pods.get(c.sandbox_id)

        async def remove() -> None:
            if container_id in self.containers:
                await self._destroy_container(c)
                self._publish(c, EventType.DELETED)
                if pod is not None:
                    pod.exited.pop(container_id, None)

        if pod is not None:
            await pod.call(remove)
        else:
            await remove()
        log.info("container removed", container_id=container_id)
        if self._images.get(c.image_id) is None:
            # Its image was removed while in use: its layers may be free now.
            await self._images.collect_garbage()

    async def exec_sync(
        self,
        container_id: str,
        argv: Sequence[str],
        timeout: float,  # noqa: ASYNC109
    ) -> ExecResult:
        """Run a command in a running container; output capped per stream.

        Raises:
            NotFound: unknown container.
            FailedPrecondition: it is not running.
            DeadlineExceeded: *timeout* (> 0) expired; the command's whole
                process tree was killed.
        """
        c = self.container(container_id)
        if c.state is not ContainerState.RUNNING:
            raise errors.FailedPrecondition(
                f"container {c.container_id[:12]} is {c.state.value}, not running"
            )
        if not argv:
            raise errors.InvalidArgument("cmd is required")
        runtime = self._runtime_for(self.sandboxes[c.sandbox_id].handler)
        result = await runtime.exec_sync(
            c.container_id, argv, timeout=timeout or None, max_output=EXEC_OUTPUT_LIMIT
        )
        if result.timed_out:
            raise errors.DeadlineExceeded(
                f"command {list(argv)!r} in container {c.container_id[:12]} timed out "
                f"after {timeout:g}s and was killed"
            )
        return result

    async def update_resources(self, container_id: str, resources: LinuxResources) -> None:
        """Apply new limits through the runtime's ``update`` and keep them.

        Raises:
            NotFound: unknown container.
            FailedPrecondition: the container has exited.
        """
        c = self.container(container_id)

        async def update() -> None:
            if c.state not in (ContainerState.CREATED, ContainerState.RUNNING):
                raise errors.FailedPrecondition(
                    f"container {c.container_id[:12]} is {c.state.value}: cannot update it"
                )
            cpu, memory, hugepages, unified = specs.resources_json(
                resources, cgroup_v2=False, swap_controller=False, hugetlb_controller=True
            )
            oci: dict[str, Any] = {"cpu": dict(cpu), "memory": dict(memory)}
            if hugepages:
                oci["hugepageLimits"] = list(hugepages)
            if unified:
                oci["unified"] = unified
            runtime = self._runtime_for(self.sandboxes[c.sandbox_id].handler)
            await runtime.update(c.container_id, oci)
            linux = c.spec.setdefault("linux", {})
            current = linux.setdefault("resources", {})
            current["cpu"] = {**current.get("cpu", {}), **cpu}
            current["memory"] = {**current.get("memory", {}), **memory}
            if resources.oom_score_adj:
                c.spec.setdefault("process", {})["oomScoreAdj"] = max(
                    resources.oom_score_adj, self._oom_floor
                )
            await self._save(c)
            self._publish(c, EventType.UPDATED)

        await self._pod(c.sandbox_id).call(update)

    async def update_pod_resources(
        self,
        sandbox_id: str,
        overhead: LinuxResources | None,
        resources: LinuxResources | None,
    ) -> None:
        """Record the pod's overhead and resources (cri-api UpdatePodSandboxResources).

        Pouch does not manage pod-level cgroups (the kubelet does, through
        the cgroup parent), so the values are kept and reported, not applied.
        """
        s = self.sandbox(sandbox_id)

        async def update() -> None:
            s.config = attrs.evolve(
                s.config,
                overhead=overhead if overhead is not None else s.config.overhead,
                resources=resources if resources is not None else s.config.resources,
            )
            await self._save(s)

        await self._pod(s.sandbox_id).call(update)

    async def reopen_log(self, container_id: str) -> None:
        """Ask conmon to reopen the log file; return once the new file exists.

        Raises:
            NotFound: unknown container.
            FailedPrecondition: the container is not running (cri-api says so).
        """
        c = self.container(container_id)
        if c.state is not ContainerState.RUNNING:
            raise errors.FailedPrecondition(
                f"container {c.container_id[:12]} is {c.state.value}, not running: "
                "its log cannot be reopened"
            )
        bundle = self.container_bundle(c.container_id)
        log_path = Path(c.log_path) if c.log_path else bundle / "container.log"
        await self.monitor.reopen_log(c.container_id, bundle=bundle, log_path=log_path)

    async def checkpoint(self, container_id: str, location: str) -> None:
        """Checkpoint a running container into a tar archive at *location*.

        Uses the runtime's ``checkpoint`` and CRIU, leaving the container
        running.  The archive holds the CRIU images (``checkpoint/``) and the
        container's OCI spec (``config.json``).

        Raises:
            FailedPrecondition: the container is not running, or this host
                cannot checkpoint (``criu check`` fails; the message says why).
        """
        c = self.container(container_id)
        if c.state is not ContainerState.RUNNING:
            raise errors.FailedPrecondition(
                f"container {c.container_id[:12]} is {c.state.value}, not running"
            )
        if not location or not os.path.isabs(location):
            raise errors.InvalidArgument("location must be an absolute path for the archive")
        problem = await _criu_problem()
        if problem:
            raise errors.FailedPrecondition(f"this host cannot checkpoint containers: {problem}")
        runtime = self._runtime_for(self.sandboxes[c.sandbox_id].handler)
        work = Path(await trio.to_thread.run_sync(_mkdtemp, self.state_dir))
        try:
            await runtime.checkpoint(c.container_id, work / "checkpoint", work / "work")
            await trio.Path(work / "config.json").write_text(json.dumps(c.spec))
            await trio.to_thread.run_sync(_tar_dir, work, Path(location))
        finally:
            await trio.to_thread.run_sync(_rmtree, work)
        log.info("container checkpointed", container_id=c.container_id, location=location)

    # ---- events ------------------------------------------------------------------------------

    def subscribe(self) -> trio.MemoryReceiveChannel[ContainerEvent]:
        """A new subscriber's channel of container events.

        The buffer (`EVENT_BUFFER`) is per subscriber; a subscriber that
        falls that far behind loses events (logged) rather than slowing the
        manager or the others, as cri-o's event clients do.
        """
        send, receive = trio.open_memory_channel[ContainerEvent](EVENT_BUFFER)
        self._subscribers.add(send)
        return receive

    def _publish(self, c: Container, kind: EventType) -> None:
        s = self.sandboxes.get(c.sandbox_id)
        if s is None:
            return
        event = ContainerEvent(
            container_id=c.container_id,
            kind=kind,
            created_at=time.time_ns(),
            sandbox=attrs.evolve(s),
            containers=tuple(
                attrs.evolve(x)
                for x in self.containers.values()
                if x.sandbox_id == c.sandbox_id and x.state is not ContainerState.CREATING
            ),
        )
        for send in list(self._subscribers):
            try:
                send.send_nowait(event)
            except trio.WouldBlock:
                log.warning("dropping container event for a slow subscriber", event_type=kind.value)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self._subscribers.discard(send)

    # ---- queries ---------------------------------------------------------------------------

    def list_sandboxes(
        self,
        *,
        sandbox_id: str = "",
        state: SandboxState | None = None,
        labels: Mapping[str, str] | None = None,
    ) -> list[Sandbox]:
        out = []
        for s in self.sandboxes.values():
            if s.state is SandboxState.CREATING:
                continue
            if sandbox_id and not s.sandbox_id.startswith(sandbox_id):
                continue
            if state is not None and s.state is not state:
                continue
            if labels and any(s.config.labels.get(k) != v for k, v in labels.items()):
                continue
            out.append(s)
        return sorted(out, key=lambda s: s.created_at)

    def list_containers(
        self,
        *,
        container_id: str = "",
        sandbox_id: str = "",
        state: ContainerState | None = None,
        labels: Mapping[str, str] | None = None,
    ) -> list[Container]:
        out = []
        for c in self.containers.values():
            if c.state is ContainerState.CREATING:
                continue
            if container_id and not c.container_id.startswith(container_id):
                continue
            if sandbox_id and not c.sandbox_id.startswith(sandbox_id):
                continue
            if state is not None and c.state is not state:
                continue
            if labels and any(c.config.labels.get(k) != v for k, v in labels.items()):
                continue
            out.append(c)
        return sorted(out, key=lambda c: c.created_at)

    def state_counts(self) -> tuple[dict[str, int], dict[str, int]]:
        """Pods and containers by state (for the metrics endpoint)."""
        pods: dict[str, int] = {state.value: 0 for state in SandboxState}
        for s in self.sandboxes.values():
            pods[s.state.value] += 1
        containers: dict[str, int] = {state.value: 0 for state in ContainerState}
        for c in self.containers.values():
            containers[c.state.value] += 1
        return pods, containers

    def sandbox(self, sandbox_id: str) -> Sandbox:
        return self.sandboxes[self.sandbox_id(sandbox_id)]

    def container(self, container_id: str) -> Container:
        return self.containers[self.container_id(container_id)]


def _resolve(text: str, records: Mapping[str, object], what: str) -> str:
    if not text:
        raise errors.InvalidArgument(f"{what.replace(' ', '_')}_id is required")
    if text in records:
        return text
    matches = [i for i in records if i.startswith(text)]
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        raise errors.InvalidArgument(f'{what} id prefix "{text}" is ambiguous')
    raise errors.NotFound(f'{what} "{text}" not found')


def _signal_number(name: str) -> int:
    name = name.upper()
    if name.isdigit():
        return int(name)
    if not name.startswith("SIG"):
        name = "SIG" + name
    if name.startswith("SIGRTMIN+"):
        return signals.SIGRTMIN + int(name.removeprefix("SIGRTMIN+"))
    if name.startswith("SIGRTMAX-"):
        return signals.SIGRTMAX - int(name.removeprefix("SIGRTMAX-"))
    try:
        return int(signals.Signals[name])
    except KeyError:
        return signals.SIGTERM


_criu_checked: list[str] = []


async def _criu_problem() -> str:
    """Why this host cannot checkpoint ("" if it can); asked once."""
    if not _criu_checked:
        criu = shutil.which("criu")
        if criu is None:
            _criu_checked.append("criu is not installed (Debian package criu)")
        else:
            proc = await trio.run_process(
                [criu, "check"], capture_stdout=True, capture_stderr=True, check=False
            )
            errors_seen = [
                line
                for line in (proc.stdout + proc.stderr).decode(errors="replace").splitlines()
                if line.startswith("Error")
            ]
            ok = proc.returncode == 0
            _criu_checked.append("" if ok else "criu check failed: " + "; ".join(errors_seen[:3]))
    return _criu_checked[0]


def _mkdtemp(parent: Path) -> str:
    import tempfile

    return tempfile.mkdtemp(prefix="checkpoint-", dir=parent)


def _tar_dir(source: Path, archive: Path) -> None:
    import tarfile

    archive.parent.mkdir(parents=True, exist_ok=True)
    tmp = archive.with_name(f".{archive.name}.tmp")
    with tarfile.open(tmp, "w") as tar:
        for name in ("checkpoint", "config.json"):
            tar.add(source / name, arcname=name)
    os.replace(tmp, archive)


def _host_has_apparmor() -> bool:
    try:
        return Path("/sys/module/apparmor/parameters/enabled").read_text().strip() == "Y"
    except OSError:
        return False


def _rmtree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def _write_etc_files(directory: Path, pod: PodConfig, host_network: bool) -> None:
    """/etc/hosts, /etc/resolv.conf and /etc/hostname for the pod's containers."""
    hostname = pod.hostname or (os.uname().nodename if host_network else pod.metadata.name)
    if host_network:
        shutil.copyfile("/etc/hosts", directory / "hosts")
    else:
        (directory / "hosts").write_text(
            "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n"
            f"127.0.1.1\t{hostname}\n"
        )
    (directory / "hostname").write_text(hostname + "\n")
    if pod.dns is not None and (pod.dns.servers or pod.dns.searches or pod.dns.options):
        lines = [f"nameserver {s}" for s in pod.dns.servers]
        if pod.dns.searches:
            lines.append("search " + " ".join(pod.dns.searches))
        if pod.dns.options:
            lines.append("options " + " ".join(pod.dns.options))
        (directory / "resolv.conf").write_text("\n".join(lines) + "\n")
    else:
        try:
            shutil.copyfile("/etc/resolv.conf", directory / "resolv.conf")
        except FileNotFoundError:
            (directory / "resolv.conf").write_text("")


def _load_rows(conn: sqlite3.Connection) -> tuple[list[str], list[str]]:
    sandboxes = [row[0] for row in conn.execute("SELECT doc FROM sandboxes")]
    containers = [row[0] for row in conn.execute("SELECT doc FROM containers")]
    return sandboxes, containers
