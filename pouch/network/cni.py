"""CNI: network configuration files, plugin execution and results.

This is pouch's libcni.  It follows the CNI specification
(https://github.com/containernetworking/cni/blob/spec-v1.0.0/SPEC.md) for
the versions the Debian plugins speak, 0.1.0 to 1.0.0, and libcni's choices
where the spec leaves room (``libcni/api.go`` v1.1):

- A network configuration is a ``.conflist`` (a list of plugins), or a
  single-plugin ``.conf``/``.json`` file, which is treated as a list of one
  (libcni ``ConfListFromConf``).  Files are considered in lexical order.
- ADD runs the plugins in order; each one after the first receives the
  previous one's result as ``prevResult`` (spec section "Chained plugins"),
  and the last result is the network's result.
- DEL runs them in reverse order.  From 0.4.0 on, every one of them receives
  the cached result of the ADD as ``prevResult``; CHECK likewise, in order.
- ``runtimeConfig`` carries the runtime's dynamic arguments (port mappings,
  DNS, IPs) to exactly the plugins that declare the capability in their
  ``capabilities`` map (spec "Dynamic plugin specific fields"; the
  well-known names are in CONVENTIONS.md).
- A failing plugin prints ``{"code", "msg", "details"}`` on stdout and exits
  non-zero; its words reach the caller verbatim in `PluginFailed`.

Every plugin run has a timeout and is shielded from the caller's
cancellation: a plugin killed halfway leaves half-made state (veths,
iptables rules, IPAM leases) that nobody knows about (STYLE.md section 3).

Everything here is stateless: the network manager (`pouch.network.manager`)
chooses the configuration, caches results and decides what to undo.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import signal
from typing import TYPE_CHECKING, Final, Protocol, TypeAlias

import attrs
import trio

from pouch.errors import RuntimeFailed, Unavailable

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping, Sequence
    from pathlib import Path

    from pouch.container.model import DNSConfig, PortMapping

__all__ = [
    "CONFIG_EXTENSIONS",
    "DNS",
    "SUPPORTED_VERSIONS",
    "CNIPlugin",
    "CNIRunner",
    "ConfDirScan",
    "IPConfig",
    "Interface",
    "InvalidNetworkConfig",
    "JSONObject",
    "NetworkConfig",
    "PluginFailed",
    "PluginNotFound",
    "PluginUnavailable",
    "Result",
    "Route",
    "RuntimeConf",
    "build_env",
    "capability_args",
    "find_plugin",
    "format_cni_args",
    "k8s_args",
    "parse_config",
    "parse_error",
    "parse_result",
    "plugin_stdin",
    "scan_dir",
    "select_network",
]

#: A JSON object, as configuration files and plugins write them.
JSONObject: TypeAlias = dict[str, object]

#: The spec versions we can drive; 1.1.0 adds GC and STATUS, which we do not.
SUPPORTED_VERSIONS: Final = ("0.1.0", "0.2.0", "0.3.0", "0.3.1", "0.4.0", "1.0.0")
#: The file names libcni loads from a configuration directory (``ConfFiles``).
CONFIG_EXTENSIONS: Final = (".conf", ".conflist", ".json")
#: The interface name inside the pod, as every Kubernetes runtime uses.
DEFAULT_IFNAME: Final = "eth0"
#: The default per-plugin budget (containerd has none; cri-o none either,
#: but a hung plugin must not hang RunPodSandbox forever).
DEFAULT_TIMEOUT: Final = 30.0

# Whatever PATH the daemon has, plugins (which run iptables, ip, ...) get one.
_DEFAULT_PATH: Final = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Spec section "Error": 11 is "try again later", a transient failure.
_ERR_TRY_AGAIN: Final = 11
# A plugin's output beyond this is not a CNI result.
_MAX_OUTPUT: Final = 4 * 1024 * 1024


# --------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------


class InvalidNetworkConfig(ValueError):
    """A network configuration file cannot be used; the message says why."""


class PluginNotFound(Unavailable):
    """No executable for a plugin ``type`` in the plugin directories."""

    def __init__(self, plugin: str, plugin_dirs: Sequence[Path]) -> None:
        self.plugin = plugin
        dirs = ":".join(str(d) for d in plugin_dirs)
        super().__init__(f"failed to find cni plugin {plugin!r} in path {dirs}")


class PluginFailed(RuntimeFailed):
    """A CNI plugin failed; ``msg``/``details``/``code`` are its own words.

    Attributes:
        plugin: The plugin ``type`` (``bridge``).
        network: The network configuration's ``name``.
        command: ``ADD``, ``DEL``, ``CHECK`` or ``VERSION``.
        code: The CNI error code, ``None`` if the plugin printed no error
            object (it crashed, or timed out).
        msg: The error message, verbatim.
        details: The error details, verbatim ("" if none).
    """

    def __init__(
        self,
        *,
        plugin: str,
        network: str,
        command: str,
        argv: Sequence[str],
        returncode: int,
        stderr: str,
        code: int | None,
        msg: str,
        details: str = "",
    ) -> None:
        super().__init__(argv, returncode, stderr)
        self.plugin = plugin
        self.network = network
        self.command = command
        self.code = code
        self.msg = msg
        self.details = details
        text = f"cni plugin {plugin} failed to {command} network {network!r}: {msg}"
        if details:
            text += f": {details}"
        if code is not None:
            text += f" (code {code})"
        # Replaces RuntimeFailed's "<argv0> exited with status N" message: the
        # plugin's own words are what a kubelet event should show.
        self.args = (text,)


class PluginUnavailable(PluginFailed, Unavailable):
    """A plugin asked to be retried later (CNI error code 11)."""


# --------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------


@attrs.frozen
class NetworkConfig:
    """One network: a configuration list, as read (or built).

    Attributes:
        raw: The configuration list exactly as it will be used: a ``.conf``
            file becomes ``{"cniVersion", "name", "plugins": [conf]}``.
            This is what the manager caches for DEL.
        source: Where it came from (a file path, or ``<default>``).
    """

    raw: JSONObject
    source: str = ""

    @property
    def name(self) -> str:
        return str(self.raw["name"])

    @property
    def cni_version(self) -> str:
        return str(self.raw["cniVersion"])

    @property
    def plugins(self) -> tuple[JSONObject, ...]:
        plugins = self.raw["plugins"]
        assert isinstance(plugins, list)
        return tuple(p for p in plugins if isinstance(p, dict))

    @property
    def plugin_types(self) -> tuple[str, ...]:
        return tuple(str(p["type"]) for p in self.plugins)

    @property
    def disable_check(self) -> bool:
        return self.raw.get("disableCheck") is True


def parse_config(
    data: bytes | str, *, source: str = "", single: bool | None = None
) -> NetworkConfig:
    """Parse a configuration list or a single-plugin configuration.

    Args:
        data: The file's bytes.
        source: Named in error messages and kept on the result.
        single: ``True`` for a ``.conf`` file, ``False`` for a ``.conflist``;
            ``None`` decides by whether the object has ``plugins``.  A
            ``.conf`` file that holds a list is accepted as a list, as
            libcni does.

    Raises:
        InvalidNetworkConfig: not JSON, or a required field is missing or
            has the wrong type, or the version is not one we support.
    """
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidNetworkConfig(f"invalid JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise InvalidNetworkConfig("expected a JSON object")
    if single is False or "plugins" in doc:
        raw = _check_list(doc)
    else:
        raw = _check_list(_list_from_conf(doc))
    return NetworkConfig(raw=raw, source=source)


def _list_from_conf(conf: JSONObject) -> JSONObject:
    # libcni ConfListFromConf: the list takes the plugin's name and version.
    return {
        "cniVersion": conf.get("cniVersion", "0.1.0"),
        "name": conf.get("name"),
        "plugins": [conf],
    }


def _check_list(doc: JSONObject) -> JSONObject:
    name = doc.get("name")
    if not isinstance(name, str) or not name:
        raise InvalidNetworkConfig("missing network name")
    version = doc.get("cniVersion")
    if not isinstance(version, str) or not version:
        raise InvalidNetworkConfig("missing cniVersion")
    if version not in SUPPORTED_VERSIONS:
        supported = ", ".join(SUPPORTED_VERSIONS)
        raise InvalidNetworkConfig(f"unsupported cniVersion {version!r} (supported: {supported})")
    plugins = doc.get("plugins")
    if not isinstance(plugins, list) or not plugins:
        raise InvalidNetworkConfig("no plugins in the configuration list")
    for index, plugin in enumerate(plugins):
        if not isinstance(plugin, dict):
            raise InvalidNetworkConfig(f"plugin {index} is not a JSON object")
        kind = plugin.get("type")
        if not isinstance(kind, str) or not kind:
            raise InvalidNetworkConfig(f"plugin {index} has no type")
        if "/" in kind or kind in (".", ".."):
            raise InvalidNetworkConfig(f"plugin {index} has an invalid type {kind!r}")
        capabilities = plugin.get("capabilities", {})
        if not isinstance(capabilities, dict):
            raise InvalidNetworkConfig(f"plugin {kind}: capabilities is not a JSON object")
    if "disableCheck" in doc and not isinstance(doc["disableCheck"], bool):
        raise InvalidNetworkConfig("disableCheck is not a boolean")
    return doc


@attrs.frozen
class ConfDirScan:
    """What a configuration directory holds.

    Attributes:
        configs: The valid configurations, in lexical order of file name.
        skipped: ``(file name, reason)`` for each file that was not usable.
        error: Set when the directory itself could not be read.
    """

    configs: tuple[NetworkConfig, ...] = ()
    skipped: tuple[tuple[str, str], ...] = ()
    error: str = ""


def scan_dir(conf_dir: Path) -> ConfDirScan:
    """Load every configuration file of *conf_dir* (blocking; run in a thread).

    Only ``.conf``, ``.conflist`` and ``.json`` files count; others (an
    editor's backup, a README) are ignored without a note.
    """
    try:
        names = sorted(
            entry.name
            for entry in os.scandir(conf_dir)
            if entry.name.endswith(CONFIG_EXTENSIONS) and entry.is_file()
        )
    except FileNotFoundError:
        return ConfDirScan(error=f"{conf_dir} does not exist")
    except OSError as exc:
        return ConfDirScan(error=f"cannot read {conf_dir}: {exc.strerror}")
    configs: list[NetworkConfig] = []
    skipped: list[tuple[str, str]] = []
    for name in names:
        path = conf_dir / name
        try:
            data = path.read_bytes()
        except OSError as exc:
            skipped.append((name, f"cannot read: {exc.strerror}"))
            continue
        single = None if name.endswith(".json") else not name.endswith(".conflist")
        try:
            configs.append(parse_config(data, source=str(path), single=single))
        except InvalidNetworkConfig as exc:
            skipped.append((name, str(exc)))
    return ConfDirScan(configs=tuple(configs), skipped=tuple(skipped))


def select_network(scan: ConfDirScan, name: str = "") -> NetworkConfig | None:
    """The configuration named *name*, or the first one if *name* is empty."""
    for config in scan.configs:
        if not name or config.name == name:
            return config
    return None


def find_plugin(plugin: str, plugin_dirs: Sequence[Path]) -> Path:
    """The executable for plugin *plugin*: the first one in *plugin_dirs*.

    Raises:
        PluginNotFound: none of the directories holds it.
    """
    for directory in plugin_dirs:
        path = directory / plugin
        if path.is_file() and os.access(path, os.X_OK):
            return path
    raise PluginNotFound(plugin, plugin_dirs)


# --------------------------------------------------------------------------
# Runtime arguments
# --------------------------------------------------------------------------


@attrs.frozen
class RuntimeConf:
    """The per-call arguments of a plugin run (libcni ``RuntimeConf``).

    Attributes:
        container_id: ``CNI_CONTAINERID``: the sandbox id.
        netns: ``CNI_NETNS``: the namespace path; "" for a DEL whose
            namespace is gone (spec: optional for DEL).
        ifname: ``CNI_IFNAME``.
        args: ``CNI_ARGS`` as ``(key, value)`` pairs.
        capability_args: The values for ``runtimeConfig``, keyed by
            capability name (``portMappings``, ``dns``, ``ips``).
    """

    container_id: str
    netns: str
    ifname: str = DEFAULT_IFNAME
    args: tuple[tuple[str, str], ...] = ()
    capability_args: JSONObject = attrs.field(factory=dict)


def k8s_args(
    *, pod_namespace: str, pod_name: str, infra_container_id: str, pod_uid: str
) -> tuple[tuple[str, str], ...]:
    """The ``CNI_ARGS`` every Kubernetes runtime passes (containerd, cri-o).

    ``IgnoreUnknown=1`` tells plugins that do not know the K8S_* keys to
    accept them anyway (spec CONVENTIONS.md, "CNI_ARGS").
    """
    return (
        ("IgnoreUnknown", "1"),
        ("K8S_POD_NAMESPACE", pod_namespace),
        ("K8S_POD_NAME", pod_name),
        ("K8S_POD_INFRA_CONTAINER_ID", infra_container_id),
        ("K8S_POD_UID", pod_uid),
    )


def format_cni_args(args: Iterable[tuple[str, str]]) -> str:
    """``KEY=VALUE;KEY=VALUE``, the ``CNI_ARGS`` syntax."""
    return ";".join(f"{key}={value}" for key, value in args)


def capability_args(
    *,
    port_mappings: Sequence[PortMapping] = (),
    dns: DNSConfig | None = None,
    ips: Sequence[str] = (),
) -> JSONObject:
    """The ``runtimeConfig`` values from a pod's CRI configuration.

    Port mappings without a host port are not exposed on the host and are
    left out, as containerd does.  The keys and field names are the
    well-known capabilities of CONVENTIONS.md (what portmap reads).
    """
    out: JSONObject = {}
    mappings: list[JSONObject] = []
    for pm in port_mappings:
        if pm.host_port <= 0:
            continue
        entry: JSONObject = {
            "hostPort": pm.host_port,
            "containerPort": pm.container_port,
            "protocol": pm.protocol.value.lower(),
        }
        if pm.host_ip:
            entry["hostIP"] = pm.host_ip
        mappings.append(entry)
    if mappings:
        out["portMappings"] = mappings
    if dns is not None:
        out["dns"] = {
            "servers": list(dns.servers),
            "searches": list(dns.searches),
            "options": list(dns.options),
        }
    if ips:
        out["ips"] = list(ips)
    return out


def build_env(
    command: str,
    rt: RuntimeConf,
    plugin_dirs: Sequence[Path],
    base: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The environment of a plugin run (spec section "Parameters").

    The daemon's own environment is passed on without its ``CNI_*`` keys, as
    libcni does; a missing ``PATH`` gets the usual one, because plugins run
    iptables, ip and modprobe.
    """
    env = {
        k: v for k, v in (os.environ if base is None else base).items() if not k.startswith("CNI_")
    }
    env.setdefault("PATH", _DEFAULT_PATH)
    env["CNI_COMMAND"] = command
    env["CNI_PATH"] = os.pathsep.join(str(d) for d in plugin_dirs)
    if command != "VERSION":
        env["CNI_CONTAINERID"] = rt.container_id
        env["CNI_NETNS"] = rt.netns
        env["CNI_IFNAME"] = rt.ifname
        env["CNI_ARGS"] = format_cni_args(rt.args)
    return env


def plugin_stdin(
    network: NetworkConfig,
    plugin: JSONObject,
    rt: RuntimeConf,
    prev_result: JSONObject | None,
) -> JSONObject:
    """One plugin's configuration as it is sent (libcni ``buildOneConfig``).

    The list's ``name`` and ``cniVersion`` are injected, the previous result
    becomes ``prevResult``, and ``runtimeConfig`` gets the capability
    arguments the plugin declares, and only those.
    """
    conf = dict(plugin)
    conf["name"] = network.name
    conf["cniVersion"] = network.cni_version
    if prev_result is not None:
        conf["prevResult"] = prev_result
    capabilities = plugin.get("capabilities")
    if isinstance(capabilities, dict):
        runtime: JSONObject = {
            key: rt.capability_args[key]
            for key, enabled in capabilities.items()
            if enabled is True and key in rt.capability_args
        }
        if runtime:
            conf["runtimeConfig"] = runtime
    # A plugin that declares no capability gets no runtimeConfig from us;
    # one written in the file by hand is passed on as it is.
    return conf


def _version_tuple(version: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in version.split("."))
    except ValueError:
        return (0,)


def _at_least(version: str, minimum: str) -> bool:
    return _version_tuple(version) >= _version_tuple(minimum)


# --------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------


@attrs.frozen
class Interface:
    """An interface a plugin created; ``sandbox`` is set for the pod's own."""

    name: str
    mac: str = ""
    sandbox: str = ""


@attrs.frozen
class IPConfig:
    """An address: ``address`` in CIDR notation (``10.88.0.5/16``).

    ``interface`` indexes `Result.interfaces`, ``None`` if not given.
    """

    address: str
    gateway: str = ""
    interface: int | None = None

    @property
    def ip(self) -> str:
        """The address without its prefix length."""
        return str(ipaddress.ip_interface(self.address).ip)

    @property
    def version(self) -> int:
        return ipaddress.ip_interface(self.address).version


@attrs.frozen
class Route:
    dst: str
    gw: str = ""


@attrs.frozen
class DNS:
    nameservers: tuple[str, ...] = ()
    domain: str = ""
    search: tuple[str, ...] = ()
    options: tuple[str, ...] = ()


@attrs.frozen
class Result:
    """A plugin's (or a network's) result, parsed; ``raw`` is what it printed.

    ``raw`` is what is chained as ``prevResult`` and cached for DEL.
    """

    cni_version: str
    interfaces: tuple[Interface, ...] = ()
    ips: tuple[IPConfig, ...] = ()
    routes: tuple[Route, ...] = ()
    dns: DNS = DNS()
    raw: JSONObject = attrs.field(factory=dict)

    def interface(self, ifname: str) -> Interface | None:
        """The pod-side interface called *ifname*, if the result lists it."""
        for iface in self.interfaces:
            if iface.name == ifname and iface.sandbox:
                return iface
        return None

    def pod_ips(self, ifname: str = DEFAULT_IFNAME) -> tuple[str, ...]:
        """The pod's addresses: IPv4 first, then IPv6, each in result order.

        An address counts when it belongs to *ifname* or names no interface
        (containerd's ``selectPodIPs`` orders the same way).
        """
        mine = [ip for ip in self.ips if self._is_on(ip, ifname)]
        ordered = [ip for ip in mine if ip.version == 4] + [ip for ip in mine if ip.version == 6]
        return tuple(ip.ip for ip in ordered)

    def _is_on(self, ip: IPConfig, ifname: str) -> bool:
        if ip.interface is None:
            return True
        if 0 <= ip.interface < len(self.interfaces):
            return self.interfaces[ip.interface].name == ifname
        return False


class InvalidResult(ValueError):
    """A plugin printed something that is not a CNI result."""


def parse_result(raw: JSONObject) -> Result:
    """Parse a result of any version we support.

    0.3.0 and later (``interfaces``/``ips``/``routes``; 1.0.0 drops the
    ``version`` of each IP) and the older ``ip4``/``ip6`` form.

    Raises:
        InvalidResult: a field has the wrong type or an address is not one.
    """
    try:
        return _parse_result(raw)
    except (KeyError, TypeError, ValueError) as exc:
        raise InvalidResult(f"invalid result: {exc}") from exc


def _parse_result(raw: JSONObject) -> Result:
    version = _str(raw.get("cniVersion", ""), "cniVersion")
    interfaces = tuple(
        Interface(
            name=_str(i["name"], "interfaces.name"),
            mac=_str(i.get("mac", ""), "interfaces.mac"),
            sandbox=_str(i.get("sandbox", ""), "interfaces.sandbox"),
        )
        for i in _objects(raw.get("interfaces", []), "interfaces")
    )
    ips: list[IPConfig] = []
    routes = [_route(r) for r in _objects(raw.get("routes", []), "routes")]
    for ip in _objects(raw.get("ips", []), "ips"):
        index = ip.get("interface")
        if index is not None and (isinstance(index, bool) or not isinstance(index, int)):
            raise TypeError("ips.interface is not an integer")
        ips.append(
            IPConfig(
                address=_cidr(ip["address"]),
                gateway=_addr(ip.get("gateway", "")),
                interface=index,
            )
        )
    # Before 0.3.0: one address per family, with its own routes.
    for key in ("ip4", "ip6"):
        if key in raw:
            legacy = _object(raw[key], key)
            ips.append(
                IPConfig(address=_cidr(legacy["ip"]), gateway=_addr(legacy.get("gateway", "")))
            )
            routes.extend(_route(r) for r in _objects(legacy.get("routes", []), f"{key}.routes"))
    dns = DNS()
    if "dns" in raw:
        d = _object(raw["dns"], "dns")
        dns = DNS(
            nameservers=_strs(d.get("nameservers", []), "dns.nameservers"),
            domain=_str(d.get("domain", ""), "dns.domain"),
            search=_strs(d.get("search", []), "dns.search"),
            options=_strs(d.get("options", []), "dns.options"),
        )
    return Result(
        cni_version=version,
        interfaces=interfaces,
        ips=tuple(ips),
        routes=tuple(routes),
        dns=dns,
        raw=raw,
    )


def _route(r: JSONObject) -> Route:
    return Route(dst=_cidr(r["dst"]), gw=_addr(r.get("gw", "")))


def _cidr(value: object) -> str:
    text = _str(value, "address")
    ipaddress.ip_interface(text)
    return text


def _addr(value: object) -> str:
    text = _str(value, "gateway")
    if text:
        ipaddress.ip_address(text)
    return text


def _str(value: object, what: str) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{what} is not a string")
    return value


def _strs(value: object, what: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise TypeError(f"{what} is not a list of strings")
    return tuple(str(v) for v in value)


def _object(value: object, what: str) -> JSONObject:
    if not isinstance(value, dict):
        raise TypeError(f"{what} is not an object")
    return value


def _objects(value: object, what: str) -> list[JSONObject]:
    if not isinstance(value, list):
        raise TypeError(f"{what} is not a list")
    return [_object(v, what) for v in value]


def parse_error(stdout: bytes, stderr: bytes) -> tuple[int | None, str, str]:
    """``(code, msg, details)`` of a failed plugin run.

    The spec's error object on stdout wins; a plugin that crashed without
    one (a Go panic, a shell error) is described by its stderr, or stdout.
    """
    try:
        doc = json.loads(stdout)
    except (ValueError, UnicodeDecodeError):
        doc = None
    if isinstance(doc, dict) and "msg" in doc:
        code = doc.get("code")
        return (
            code if isinstance(code, int) and not isinstance(code, bool) else None,
            str(doc.get("msg", "")),
            str(doc.get("details", "") or ""),
        )
    text = _text(stderr).strip() or _text(stdout).strip() or "no error message"
    return None, text, ""


def _text(data: bytes) -> str:
    return data[:_MAX_OUTPUT].decode("utf-8", "replace")


# --------------------------------------------------------------------------
# Running plugins
# --------------------------------------------------------------------------


class CNIPlugin(Protocol):
    """What the network manager needs from CNI (a fake implements it in tests)."""

    async def add(self, network: NetworkConfig, rt: RuntimeConf) -> Result:
        """Attach: run ADD through the list; return the last result."""
        ...

    async def delete(
        self, network: NetworkConfig, rt: RuntimeConf, prev_result: JSONObject | None
    ) -> None:
        """Detach: run DEL through the list in reverse order."""
        ...

    async def check(self, network: NetworkConfig, rt: RuntimeConf, prev_result: JSONObject) -> None:
        """Verify: run CHECK through the list."""
        ...


class CNIRunner:
    """`CNIPlugin` over plugin executables, run with ``trio.run_process``.

    Args:
        plugin_dirs: Where plugin executables are looked up, in order;
            also the plugins' ``CNI_PATH`` (for IPAM delegation).
        timeout: The budget of each plugin run, in seconds.
        env: The environment plugins inherit (default: the daemon's).
    """

    def __init__(
        self,
        plugin_dirs: Sequence[Path],
        *,
        timeout: float = DEFAULT_TIMEOUT,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.plugin_dirs = tuple(plugin_dirs)
        self.timeout = timeout
        self._env = None if env is None else dict(env)

    async def add(self, network: NetworkConfig, rt: RuntimeConf) -> Result:
        """Run ADD through the list, chaining each result to the next plugin.

        Raises:
            PluginFailed: a plugin failed (or printed no valid result);
                the plugins before it have done their part, so the caller
                runs `delete` to undo them.
            PluginNotFound: a plugin has no executable.

        Cancellation: each plugin runs shielded; a cancel takes effect
        between plugins, leaving the earlier ones' work for `delete`.
        """
        prev: JSONObject | None = None
        result: Result | None = None
        for plugin in network.plugins:
            out = await self._exec(network, plugin, "ADD", rt, prev)
            result = self._result(network, plugin, "ADD", out)
            prev = result.raw
        assert result is not None  # parse_config guarantees a plugin
        return result

    async def delete(
        self, network: NetworkConfig, rt: RuntimeConf, prev_result: JSONObject | None
    ) -> None:
        """Run DEL through the list in reverse order.

        Every plugin is run even if one fails: DEL is idempotent (spec:
        "plugins should generally complete a DEL action without error even
        if some resources are missing"), and running the rest frees what
        they hold (an IPAM lease) even when, say, portmap cannot.

        Raises:
            PluginFailed: the first failure, after all plugins ran.
            PluginNotFound: a plugin has no executable (after the others ran).

        Cancellation: as for `add`, between plugins; the network manager
        shields the whole DEL.
        """
        # Before 0.4.0 DEL gets no prevResult (libcni delNetworkList).
        prev = prev_result if _at_least(network.cni_version, "0.4.0") else None
        first: Exception | None = None
        for plugin in reversed(network.plugins):
            try:
                await self._exec(network, plugin, "DEL", rt, prev)
            except (PluginFailed, PluginNotFound) as exc:
                first = first or exc
        if first is not None:
            raise first

    async def check(self, network: NetworkConfig, rt: RuntimeConf, prev_result: JSONObject) -> None:
        """Run CHECK through the list, each plugin with the cached ADD result.

        Nothing is run for a list with ``disableCheck``.

        Raises:
            PluginFailed: a plugin found the network broken.
            InvalidNetworkConfig: the list's version predates CHECK (0.4.0).
        """
        if not _at_least(network.cni_version, "0.4.0"):
            raise InvalidNetworkConfig(
                f"configuration version {network.cni_version} does not support CHECK"
            )
        if network.disable_check:
            return
        for plugin in network.plugins:
            await self._exec(network, plugin, "CHECK", rt, prev_result)

    async def version(self, plugin: str, cni_version: str = "1.0.0") -> tuple[str, ...]:
        """The spec versions a plugin supports (``CNI_COMMAND=VERSION``).

        Raises:
            PluginFailed: the plugin failed, or answered nonsense.
            PluginNotFound: no executable.
        """
        conf: JSONObject = {"cniVersion": cni_version, "type": plugin, "name": ""}
        network = NetworkConfig(raw={"cniVersion": cni_version, "name": "", "plugins": [conf]})
        rt = RuntimeConf(container_id="", netns="")
        out = await self._exec(
            network, conf, "VERSION", rt, None, stdin={"cniVersion": cni_version}
        )
        try:
            doc = json.loads(out)
            versions = doc["supportedVersions"]
            if not isinstance(versions, list):
                raise TypeError("supportedVersions is not a list")
            return tuple(str(v) for v in versions)
        except (ValueError, KeyError, TypeError) as exc:
            raise self._invalid(network, conf, "VERSION", out, exc) from exc

    # ------------------------------------------------------------------

    def _result(
        self, network: NetworkConfig, plugin: JSONObject, command: str, out: bytes
    ) -> Result:
        try:
            doc = json.loads(out)
            if not isinstance(doc, dict):
                raise InvalidResult("the result is not a JSON object")
            return parse_result(doc)
        except (ValueError, UnicodeDecodeError) as exc:
            raise self._invalid(network, plugin, command, out, exc) from exc

    def _invalid(
        self, network: NetworkConfig, plugin: JSONObject, command: str, out: bytes, exc: Exception
    ) -> PluginFailed:
        return PluginFailed(
            plugin=str(plugin["type"]),
            network=network.name,
            command=command,
            argv=[str(plugin["type"])],
            returncode=0,
            stderr=_text(out),
            code=None,
            msg=f"printed an invalid result: {exc}",
        )

    async def _exec(
        self,
        network: NetworkConfig,
        plugin: JSONObject,
        command: str,
        rt: RuntimeConf,
        prev_result: JSONObject | None,
        *,
        stdin: JSONObject | None = None,
    ) -> bytes:
        kind = str(plugin["type"])
        binary = await trio.to_thread.run_sync(find_plugin, kind, self.plugin_dirs)
        if stdin is None:
            stdin = plugin_stdin(network, plugin, rt, prev_result)
        env = build_env(command, rt, self.plugin_dirs, self._env)
        argv = [str(binary)]
        # Shielded and bounded: a caller's deadline must not kill a plugin
        # halfway through (STYLE.md section 3); its own timeout may.
        with trio.CancelScope(shield=True):
            try:
                with trio.fail_after(self.timeout):
                    proc = await trio.run_process(
                        argv,
                        stdin=json.dumps(stdin).encode(),
                        capture_stdout=True,
                        capture_stderr=True,
                        check=False,
                        env=env,
                        cwd="/",
                        start_new_session=True,
                        deliver_cancel=_kill_group,
                    )
            except trio.TooSlowError as exc:
                raise PluginFailed(
                    plugin=kind,
                    network=network.name,
                    command=command,
                    argv=argv,
                    returncode=-1,
                    stderr="",
                    code=None,
                    msg=f"timed out after {self.timeout:g}s",
                ) from exc
            except OSError as exc:
                raise PluginFailed(
                    plugin=kind,
                    network=network.name,
                    command=command,
                    argv=argv,
                    returncode=-1,
                    stderr=str(exc),
                    code=None,
                    msg=f"cannot run {binary}: {exc.strerror or exc}",
                ) from exc
        if proc.returncode != 0:
            code, msg, details = parse_error(proc.stdout, proc.stderr)
            cls = PluginUnavailable if code == _ERR_TRY_AGAIN else PluginFailed
            raise cls(
                plugin=kind,
                network=network.name,
                command=command,
                argv=argv,
                returncode=proc.returncode,
                stderr=_text(proc.stderr),
                code=code,
                msg=msg,
                details=details,
            )
        return bytes(proc.stdout[:_MAX_OUTPUT])


async def _kill_group(proc: trio.Process) -> None:
    # A plugin that ran out of time is hung; SIGTERM buys nothing (Go
    # plugins die on it without cleanup anyway), and trio's default would
    # wait 5 s more.  The process group takes its children (iptables,
    # a shell script's commands) with it.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
