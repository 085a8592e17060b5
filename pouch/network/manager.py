"""The network manager: pod networks through CNI, with a result cache.

Configuration: the first valid file of the CNI configuration directory in
lexical order (or the network named in the config), reloaded when the
directory changes (polled once a second, as cri-o watches it); when there is
none, an embedded default (a bridge with host-local IPAM and portmap) unless
that is turned off.  ``status()`` is the CRI ``NetworkReady`` condition.

Cache: ``setup`` records, per sandbox, the exact network configuration it
used, the CNI arguments and the ADD result in ``<cache_dir>/<sandbox_id>.json``
(libcni keeps the same in ``/var/lib/cni/results``).  ``teardown`` runs DEL
from that record, so it undoes what ADD did even after the configuration
directory changed or the daemon restarted.  The record is written *before*
ADD runs, too: a daemon killed in the middle of an ADD leaves a record
without a result, and the next ``teardown`` (or ``setup``) still runs DEL.

::

    setup:     write record(result=None) -> ADD -> write record(result)
                                              \\-> failed: DEL -> remove record
    teardown:  record? -> DEL -> remove record   (DEL failed: record stays)

Every CNI call runs shielded from the caller's cancellation and bounded by
the per-plugin timeout (`pouch.network.cni`).
"""

from __future__ import annotations

import collections
import contextlib
import ipaddress
import json
import os
import re
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Final

import attrs
import trio

from pouch._util.failpoints import failpoint
from pouch.errors import InvalidArgument, Unavailable
from pouch.log import get_logger
from pouch.network import cni

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Sequence

    from pouch.container.model import DNSConfig, PortMapping

__all__ = [
    "DEFAULT_BRIDGE",
    "DEFAULT_CONF_DIR",
    "DEFAULT_NETWORK_NAME",
    "DEFAULT_PLUGIN_DIRS",
    "DEFAULT_SUBNET",
    "NOT_READY_REASON",
    "NetworkManager",
    "PodNetwork",
    "default_network",
]

log = get_logger("pouch.network")

DEFAULT_CONF_DIR: Final = Path("/etc/cni/net.d")
#: Debian's containernetworking-plugins first, then the upstream location.
DEFAULT_PLUGIN_DIRS: Final = (Path("/usr/lib/cni"), Path("/opt/cni/bin"))
#: The embedded default network (podman and containerd's examples use the
#: same subnet).
DEFAULT_NETWORK_NAME: Final = "pouch"
DEFAULT_BRIDGE: Final = "pouch0"
DEFAULT_SUBNET: Final = "10.88.0.0/16"
#: The CRI ``NetworkReady`` reason while no network is usable (the string
#: the kubelet and containerd use).
NOT_READY_REASON: Final = "NetworkPluginNotReady"

_CACHE_VERSION: Final = 1
# Sandbox ids name cache files.
_SANDBOX_ID: Final = re.compile(r"[\w.+-]+", re.ASCII)


@attrs.frozen
class PodNetwork:
    """A pod's network, as ADD made it.

    Attributes:
        sandbox_id: The pod sandbox.
        network_name: The CNI network's ``name``.
        interface: The pod-side interface (``eth0``).
        ips: The pod's addresses without prefix length, the primary first:
            IPv4 before IPv6 (CRI ``PodSandboxNetworkStatus.ip``, then
            ``additional_ips``).
        mac: The MAC address of ``interface``, "" if the result has none.
        gateways: The gateways of ``ips``, in the same order ("" if none).
        dns: The DNS settings the network returned (often empty; the
            kubelet's DNSConfig is what goes into resolv.conf).
        result: The whole parsed ADD result.
    """

    sandbox_id: str
    network_name: str
    interface: str
    ips: tuple[str, ...]
    mac: str = ""
    gateways: tuple[str, ...] = ()
    dns: cni.DNS = attrs.field(factory=cni.DNS)
    result: cni.Result | None = None


@attrs.frozen
class _Entry:
    """One cache record: everything DEL needs, as ADD was run."""

    sandbox_id: str
    network: cni.JSONObject
    source: str
    ifname: str
    netns: str
    cni_args: tuple[tuple[str, str], ...]
    capability_args: cni.JSONObject
    result: cni.JSONObject | None = None

    def network_config(self) -> cni.NetworkConfig:
        return cni.NetworkConfig(raw=self.network, source=self.source)

    def runtime_conf(self, netns: str) -> cni.RuntimeConf:
        return cni.RuntimeConf(
            container_id=self.sandbox_id,
            netns=netns,
            ifname=self.ifname,
            args=self.cni_args,
            capability_args=self.capability_args,
        )

    def to_json(self) -> cni.JSONObject:
        return {
            "version": _CACHE_VERSION,
            "sandbox_id": self.sandbox_id,
            "network": self.network,
            "source": self.source,
            "ifname": self.ifname,
            "netns": self.netns,
            "cni_args": [list(pair) for pair in self.cni_args],
            "capability_args": self.capability_args,
            "result": self.result,
        }

    @classmethod
    def from_json(cls, doc: object) -> _Entry:
        if not isinstance(doc, dict) or doc.get("version") != _CACHE_VERSION:
            raise ValueError("not a version 1 cache record")
        network, capabilities, result = doc["network"], doc["capability_args"], doc["result"]
        args = doc["cni_args"]
        if not isinstance(network, dict) or not isinstance(capabilities, dict):
            raise ValueError("network and capability_args must be objects")
        if result is not None and not isinstance(result, dict):
            raise ValueError("result must be an object")
        if not isinstance(args, list):
            raise ValueError("cni_args must be a list")
        return cls(
            sandbox_id=str(doc["sandbox_id"]),
            network=network,
            source=str(doc.get("source", "")),
            ifname=str(doc["ifname"]),
            netns=str(doc["netns"]),
            cni_args=tuple((str(k), str(v)) for k, v in args),
            capability_args=capabilities,
            result=result,
        )


@attrs.frozen
class _Loaded:
    """The outcome of one (re)load of the configuration."""

    network: cni.NetworkConfig | None
    is_default: bool = False
    #: Why there is no usable network ("" if there is one).
    message: str = ""


def default_network(
    *, ipam_data_dir: Path | None = None, pod_cidrs: Sequence[str] = ()
) -> cni.NetworkConfig:
    """The embedded network: bridge ``pouch0`` + host-local + portmap.

    Args:
        ipam_data_dir: host-local's ``dataDir`` (its default is
            ``/var/lib/cni/networks``).
        pod_cidrs: The node's pod CIDRs (CRI ``UpdateRuntimeConfig``), one per
            address family; none: ``10.88.0.0/16``.

    The pod's ``lo`` is brought up when its namespace is made
    (`pouch.network.netns`), so there is no loopback plugin in the list.
    """
    cidrs = [str(ipaddress.ip_network(c, strict=False)) for c in pod_cidrs] or [DEFAULT_SUBNET]
    families = {ipaddress.ip_network(c).version for c in cidrs}
    ipam: cni.JSONObject = {
        "type": "host-local",
        # One range set per CIDR: a dual-stack pod gets one address of each.
        "ranges": [[{"subnet": c}] for c in cidrs],
        "routes": [{"dst": "0.0.0.0/0"} if v == 4 else {"dst": "::/0"} for v in sorted(families)],
    }
    if ipam_data_dir is not None:
        ipam["dataDir"] = str(ipam_data_dir)
    return cni.NetworkConfig(
        raw={
            "cniVersion": "1.0.0",
            "name": DEFAULT_NETWORK_NAME,
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": DEFAULT_BRIDGE,
                    "isGateway": True,
                    "ipMasq": True,
                    # A pod reaching itself through its own host port.
                    "hairpinMode": True,
                    "ipam": ipam,
                },
                {"type": "portmap", "capabilities": {"portMappings": True}},
            ],
        },
        source="<default>",
    )


class NetworkManager:
    """Pod networks through CNI (cri-o ``ocicni``, containerd ``go-cni``).

    Args:
        cache_dir: Where setup records what teardown needs
            (``<root>/cni-cache``); persistent, so it survives restarts.
        conf_dir: The CNI configuration directory.
        plugin_dirs: Where plugin executables are looked up, in order.
        network_name: The network to use; "" picks the first file in
            lexical order.
        use_default: Use the embedded default network when the directory
            holds no usable configuration (and ``network_name`` is "" or
            the default's name, ``pouch``).
        plugin_timeout: The budget of each plugin run, in seconds.
        ipam_data_dir: host-local's store for the default network; default
            ``<cache_dir>/host-local``.
        poll_interval: How often the configuration directory is checked.
        cni: The CNI implementation; default: the real plugins.
    """

    def __init__(
        self,
        *,
        cache_dir: Path,
        conf_dir: Path = DEFAULT_CONF_DIR,
        plugin_dirs: Sequence[Path] = DEFAULT_PLUGIN_DIRS,
        network_name: str = "",
        use_default: bool = True,
        plugin_timeout: float = cni.DEFAULT_TIMEOUT,
        ipam_data_dir: Path | None = None,
        poll_interval: float = 1.0,
        cni_plugin: cni.CNIPlugin | None = None,
    ) -> None:
        self.cache_dir = cache_dir
        self.conf_dir = conf_dir
        self.plugin_dirs = tuple(plugin_dirs)
        self.network_name = network_name
        self.use_default = use_default
        self.ipam_data_dir = ipam_data_dir or cache_dir / "host-local"
        self.poll_interval = poll_interval
        self._cni: cni.CNIPlugin = cni_plugin or cni.CNIRunner(
            self.plugin_dirs, timeout=plugin_timeout
        )
        self._check_binaries = cni_plugin is None
        self._loaded = _Loaded(None, message="the network configuration is not loaded yet")
        self._pod_cidrs: tuple[str, ...] = ()
        # sandbox id -> its pod IPs, from the cache records (cached_ips()).
        self._ips: dict[str, tuple[str, ...]] = {}
        self._locks = _KeyedLock()

    # ------------------------------------------------------------------
    # Service

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Load the cache and the configuration, then follow the directory.

        ``started()`` comes after the first load, whether or not it found a
        usable network (`status` says which).  Never returns.
        """
        records = await trio.to_thread.run_sync(self._load_cache)
        self._ips = {sid: _entry_ips(e) for sid, e in records.items()}
        fingerprint = await trio.to_thread.run_sync(self._fingerprint)
        await self._reload()
        task_status.started()
        while True:
            await trio.sleep(self.poll_interval)
            # Taken before the load: a change during the load is seen next time.
            current = await trio.to_thread.run_sync(self._fingerprint)
            if current != fingerprint:
                fingerprint = current
                await self._reload()

    def status(self) -> tuple[bool, str, str]:
        """The CRI ``NetworkReady`` condition: ``(ready, reason, message)``."""
        loaded = self._loaded
        if loaded.network is not None:
            return True, "", ""
        return False, NOT_READY_REASON, f"network plugin not ready: {loaded.message}"

    @property
    def network(self) -> cni.NetworkConfig | None:
        """The configuration new pods get, ``None`` while there is none."""
        return self._loaded.network

    def update_pod_cidr(self, cidr: str) -> None:
        """Record the node's pod CIDR(s) (CRI ``UpdateRuntimeConfig``).

        Comma-separated for dual stack.  Only the embedded default network
        uses them (as its host-local ranges); a configuration file is the
        administrator's, and is left as written (containerd does the same
        with its ``conf_template``).  "" is ignored, as containerd does.

        Raises:
            InvalidArgument: a CIDR does not parse.
        """
        cidrs: list[str] = []
        for part in filter(None, (p.strip() for p in cidr.split(","))):
            try:
                cidrs.append(str(ipaddress.ip_network(part, strict=False)))
            except ValueError as exc:
                raise InvalidArgument(f"invalid pod CIDR {part!r}: {exc}") from exc
        if not cidrs or tuple(cidrs) == self._pod_cidrs:
            return
        self._pod_cidrs = tuple(cidrs)
        log.info("pod cidr updated", pod_cidrs=",".join(cidrs))
        if self._loaded.is_default:
            self._loaded = attrs.evolve(self._loaded, network=self._default())

    def cached_ips(self, sandbox_id: str) -> list[str]:
        """The pod IPs recorded for *sandbox_id* (primary first); [] if none.

        Read from memory (loaded from the cache by `run`); nothing is run in
        the namespace.
        """
        return list(self._ips.get(sandbox_id, ()))

    def cached_sandboxes(self) -> list[str]:
        """Sandboxes with a cache record: set up, or with a DEL still owed."""
        return sorted(self._ips)

    # ------------------------------------------------------------------
    # Pods

    async def setup(
        self,
        sandbox_id: str,
        netns_path: Path | str,
        *,
        pod_name: str,
        pod_namespace: str,
        pod_uid: str,
        port_mappings: Sequence[PortMapping] = (),
        dns: DNSConfig | None = None,
        ips: Sequence[str] = (),
    ) -> PodNetwork:
        """Attach the pod's namespace to the network (CNI ADD).

        Idempotent: a sandbox already set up gets its recorded network back.

        Args:
            sandbox_id: ``CNI_CONTAINERID``, and the cache key.
            netns_path: The pod's pinned namespace.
            pod_name: ``K8S_POD_NAME``.
            pod_namespace: ``K8S_POD_NAMESPACE``.
            pod_uid: ``K8S_POD_UID``.
            port_mappings: The pod's ports; those with a host port go to the
                plugins declaring ``portMappings``.
            dns: The kubelet's DNS config, for plugins declaring ``dns``.
            ips: Requested addresses, for plugins declaring ``ips``.

        Returns:
            The pod's network; ``ips[0]`` is its primary IP.

        Raises:
            Unavailable: no usable network configuration (``status()``
                explains), or a plugin asked to be retried.
            PluginFailed: a plugin failed; its message is in the error.
                What the earlier plugins did has been undone by DEL.
            InvalidArgument: the sandbox id cannot name a file.

        Cancellation: shielded; ADD (and the undo of a failed ADD) runs to
        its end.  If the caller is gone by then, the network stays set up
        and recorded, and `teardown` removes it.
        """
        _check_sandbox_id(sandbox_id)
        with trio.CancelScope(shield=True):
            async with self._locks.hold(sandbox_id):
                pod = await self._setup(
                    sandbox_id,
                    str(netns_path),
                    cni.k8s_args(
                        pod_namespace=pod_namespace,
                        pod_name=pod_name,
                        infra_container_id=sandbox_id,
                        pod_uid=pod_uid,
                    ),
                    cni.capability_args(port_mappings=port_mappings, dns=dns, ips=ips),
                )
        return pod

    async def teardown(self, sandbox_id: str, netns_path: Path | str | None = None) -> None:
        """Detach the pod from the network it was set up with (CNI DEL).

        Uses the recorded configuration and result, not the current ones.
        Idempotent: a sandbox without a record needs nothing.

        Args:
            sandbox_id: The sandbox.
            netns_path: Its namespace; ``None`` (or a path that no longer
                exists) runs DEL without one (``CNI_NETNS=""``), which
                frees what lives outside the namespace (IPAM, iptables).

        Raises:
            PluginFailed: a plugin's DEL failed; the record stays, so the
                next call retries.

        Cancellation: shielded; DEL runs to its end.
        """
        _check_sandbox_id(sandbox_id)
        with trio.CancelScope(shield=True):
            async with self._locks.hold(sandbox_id):
                entry = await trio.to_thread.run_sync(self._read_entry, sandbox_id)
                if entry is None:
                    self._ips.pop(sandbox_id, None)
                    return
                netns = await trio.to_thread.run_sync(_existing, netns_path)
                await self._delete(entry, netns)

    # ------------------------------------------------------------------

    async def _setup(
        self,
        sandbox_id: str,
        netns_path: str,
        cni_args: tuple[tuple[str, str], ...],
        capabilities: cni.JSONObject,
    ) -> PodNetwork:
        old = await trio.to_thread.run_sync(self._read_entry, sandbox_id)
        if old is not None and old.result is not None:
            return _pod_network(old)
        if old is not None:
            # An ADD that never finished (the daemon died): undo it first.
            await self._delete(old, await trio.to_thread.run_sync(_existing, old.netns))
        network = self._loaded.network
        if network is None:
            raise Unavailable(f"cni plugin not initialized: {self._loaded.message}")
        entry = _Entry(
            sandbox_id=sandbox_id,
            network=network.raw,
            source=network.source,
            ifname=cni.DEFAULT_IFNAME,
            netns=netns_path,
            cni_args=cni_args,
            capability_args=capabilities,
        )
        await self._write_entry(entry)
        try:
            result = await self._cni.add(network, entry.runtime_conf(netns_path))
            await failpoint("network.added")
            entry = attrs.evolve(entry, result=result.raw)
            await self._write_entry(entry)
        except Exception as exc:
            # Plugins before the failing one did their part: undo all of it
            # (containerd tears down on a failed setup the same way).
            try:
                await self._delete(entry, netns_path)
            except Exception as undo:
                exc.add_note(f"undoing the failed ADD failed too (retried at teardown): {undo}")
            raise
        pod = _pod_network(entry)
        self._ips[sandbox_id] = pod.ips
        log.info("pod network set up", sandbox_id=sandbox_id, ips=",".join(pod.ips))
        return pod

    async def _delete(self, entry: _Entry, netns: str) -> None:
        try:
            await self._cni.delete(entry.network_config(), entry.runtime_conf(netns), entry.result)
        except Exception as exc:
            log.warning("cni del failed", sandbox_id=entry.sandbox_id, error=str(exc))
            raise
        await trio.to_thread.run_sync(_unlink, self._entry_path(entry.sandbox_id))
        self._ips.pop(entry.sandbox_id, None)

    async def _reload(self) -> None:
        cidrs = self._pod_cidrs
        loaded = await trio.to_thread.run_sync(self._load_sync, cidrs)
        if loaded.is_default and self._pod_cidrs != cidrs:
            # update_pod_cidr ran during the load.
            loaded = attrs.evolve(loaded, network=self._default())
        before = self._loaded
        self._loaded = loaded
        if loaded.network is None:
            log.warning("no usable network config", reason=loaded.message)
        elif before.network is None or before.network.raw != loaded.network.raw:
            log.info(
                "network config loaded",
                network=loaded.network.name,
                source=loaded.network.source,
            )

    def _default(self) -> cni.NetworkConfig:
        return default_network(ipam_data_dir=self.ipam_data_dir, pod_cidrs=self._pod_cidrs)

    # Blocking helpers, run in threads.

    def _load_sync(self, pod_cidrs: tuple[str, ...]) -> _Loaded:
        scan = cni.scan_dir(self.conf_dir)
        for name, reason in scan.skipped:
            log.warning("skipped network config", file=name, reason=reason)
        network = cni.select_network(scan, self.network_name)
        is_default = False
        if network is None:
            where = scan.error or f"in {self.conf_dir}"
            skipped = "".join(f"; skipped {name}: {reason}" for name, reason in scan.skipped)
            if self.network_name:
                message = f"no network config named {self.network_name!r} {where}{skipped}"
            else:
                message = f"no network config found {where}{skipped}"
            # A network named in the config that is missing is an error to
            # report, not a reason to fall back (unless it names the default).
            if not self.use_default or self.network_name not in ("", DEFAULT_NETWORK_NAME):
                return _Loaded(None, message=message)
            network = default_network(ipam_data_dir=self.ipam_data_dir, pod_cidrs=pod_cidrs)
            is_default = True
        if self._check_binaries:
            for kind in network.plugin_types:
                try:
                    cni.find_plugin(kind, self.plugin_dirs)
                except cni.PluginNotFound as exc:
                    return _Loaded(None, is_default=is_default, message=str(exc))
        return _Loaded(network, is_default=is_default)

    def _fingerprint(self) -> tuple[object, ...]:
        # File names, sizes and mtimes of the configuration directory, and
        # the plugin directories' mtimes (a plugin installed after its
        # configuration makes the network ready).
        files: list[tuple[str, int, int, int]] = []
        with contextlib.suppress(OSError), os.scandir(self.conf_dir) as it:
            for entry in it:
                if entry.name.endswith(cni.CONFIG_EXTENSIONS):
                    with contextlib.suppress(OSError):
                        st = entry.stat()
                        files.append((entry.name, st.st_mtime_ns, st.st_size, st.st_ino))
        dirs: list[int] = []
        for directory in self.plugin_dirs:
            try:
                dirs.append(directory.stat().st_mtime_ns)
            except OSError:
                dirs.append(-1)
        return (tuple(sorted(files)), tuple(dirs))

    def _entry_path(self, sandbox_id: str) -> Path:
        return self.cache_dir / f"{sandbox_id}.json"

    def _read_entry(self, sandbox_id: str) -> _Entry | None:
        path = self._entry_path(sandbox_id)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        try:
            return _Entry.from_json(json.loads(data))
        except (ValueError, KeyError, TypeError) as exc:
            # Written atomically, so only a hand edit gets here.  DEL with
            # the current network and no result still frees what is keyed
            # by the container id (IPAM leases, portmap chains).
            log.error("unreadable cni cache record", path=str(path), error=str(exc))
            network = self._loaded.network or self._default()
            return _Entry(
                sandbox_id=sandbox_id,
                network=network.raw,
                source=network.source,
                ifname=cni.DEFAULT_IFNAME,
                netns="",
                cni_args=(),
                capability_args={},
            )

    def _load_cache(self) -> dict[str, _Entry]:
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        records: dict[str, _Entry] = {}
        for path in sorted(self.cache_dir.glob("*.json")):
            entry = self._read_entry(path.stem)
            if entry is not None:
                records[path.stem] = entry
        return records

    async def _write_entry(self, entry: _Entry) -> None:
        data = json.dumps(entry.to_json(), indent=1).encode()
        await trio.to_thread.run_sync(_write_atomic, self._entry_path(entry.sandbox_id), data)


def _check_sandbox_id(sandbox_id: str) -> None:
    if not _SANDBOX_ID.fullmatch(sandbox_id) or sandbox_id in (".", ".."):
        raise InvalidArgument(f"invalid sandbox id {sandbox_id!r}")


def _entry_ips(entry: _Entry) -> tuple[str, ...]:
    if entry.result is None:
        return ()
    try:
        return cni.parse_result(entry.result).pod_ips(entry.ifname)
    except cni.InvalidResult:
        return ()


def _pod_network(entry: _Entry) -> PodNetwork:
    assert entry.result is not None
    result = cni.parse_result(entry.result)
    iface = result.interface(entry.ifname)
    ips = result.pod_ips(entry.ifname)
    gateways = {ip.ip: ip.gateway for ip in result.ips}
    return PodNetwork(
        sandbox_id=entry.sandbox_id,
        network_name=str(entry.network.get("name", "")),
        interface=entry.ifname,
        ips=ips,
        mac=iface.mac if iface is not None else "",
        gateways=tuple(gateways.get(ip, "") for ip in ips),
        dns=result.dns,
        result=result,
    )


def _existing(netns_path: Path | str | None) -> str:
    # A namespace that is gone is passed as "": plugins then skip the
    # in-namespace part of DEL (spec: CNI_NETNS is optional for DEL).
    if not netns_path or not os.path.exists(netns_path):
        return ""
    return str(netns_path)


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _unlink(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


class _KeyedLock:
    """One `trio.Lock` per key, dropped when nobody holds or wants it."""

    def __init__(self) -> None:
        self._locks: dict[str, trio.Lock] = {}
        self._users: collections.Counter[str] = collections.Counter()

    @contextlib.asynccontextmanager
    async def hold(self, key: str) -> AsyncIterator[None]:
        lock = self._locks.setdefault(key, trio.Lock())
        self._users[key] += 1
        try:
            async with lock:
                yield
        finally:
            self._users[key] -= 1
            if not self._users[key]:
                del self._users[key], self._locks[key]
