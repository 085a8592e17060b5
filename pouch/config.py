"""The daemon's configuration: one TOML file, every key defaulted.

The tree is a set of frozen ``attrs`` classes; ``cattrs`` turns the parsed
TOML into it and refuses unknown keys and wrong types, naming the key
(``$.grpc.address``-style paths).  Nothing here does I/O at import time.
"""

from __future__ import annotations

import enum
import tomllib
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs
import cattrs
import cattrs.gen
from cattrs.errors import (
    ClassValidationError,
    ForbiddenExtraKeysError,
    IterableValidationError,
)

if TYPE_CHECKING:
    from collections.abc import Callable

DEFAULT_CONFIG_PATH = Path("/etc/pouch/pouchd.toml")


class ConfigError(Exception):
    """The configuration file cannot be used; the message names the key."""


class LogFormat(enum.StrEnum):
    LOGFMT = "logfmt"
    JSON = "json"


class LogLevel(enum.StrEnum):
    DEBUG = "debug"
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"


class CgroupDriver(enum.StrEnum):
    CGROUPFS = "cgroupfs"
    SYSTEMD = "systemd"


@attrs.frozen
class GrpcConfig:
    #: The CRI socket; a kubelet's ``--container-runtime-endpoint``.
    address: Path = Path("/run/pouch/pouch.sock")


@attrs.frozen
class StreamConfig:
    #: Where the exec/attach/port-forward server listens.  Loopback by
    #: default: the kubelet proxies clients to it, as with containerd.
    address: str = "127.0.0.1"
    #: 0 picks an ephemeral port, reported in the logs and by ``Status``.
    port: int = 0
    #: A URL from Exec/Attach/PortForward is good for one use within this time.
    token_ttl: float = 60.0
    #: A session that moves no byte for this long is closed (kubelet's
    #: ``--streaming-connection-idle-timeout``).
    idle_timeout: float = 4 * 3600.0
    #: After the upgrade, the client must open its streams within this time.
    stream_creation_timeout: float = 30.0


@attrs.frozen
class LogConfig:
    level: LogLevel = LogLevel.INFO
    format: LogFormat = LogFormat.LOGFMT


@attrs.frozen
class CgroupConfig:
    driver: CgroupDriver = CgroupDriver.CGROUPFS


@attrs.frozen
class MirrorConfig:
    #: Endpoints tried in order, each ``scheme://host[:port][/path]``; the
    #: repository path is kept (containerd's registry mirrors).
    endpoints: tuple[str, ...] = ()


@attrs.frozen
class RegistryConfig:
    #: Registry host (as in an image name, ``docker.io``) -> its mirrors.  The
    #: registry itself is tried after them, and images keep their own name.
    mirrors: dict[str, MirrorConfig] = attrs.field(factory=dict)
    #: Hosts (``host[:port]``) that may be reached over plain HTTP.
    insecure: tuple[str, ...] = ()


@attrs.frozen
class ImageStoreConfig:
    #: Layers fetched at once per pull.
    max_concurrent_downloads: int = 3
    #: A pull whose bytes stop flowing for this long fails.
    stall_timeout: float = 60.0
    #: Largest uncompressed layer accepted (decompression bombs); 0: no limit.
    max_layer_bytes: int = 64 * 1024**3


@attrs.frozen
class RuntimeHandlerConfig:
    #: A runc-compatible executable.
    binary: Path
    #: Its state directory (``--root``); default ``<state>/<handler name>``.
    root: Path | None = None


def _default_handlers() -> dict[str, RuntimeHandlerConfig]:
    return {
        "runc": RuntimeHandlerConfig(binary=Path("/usr/sbin/runc")),
        "crun": RuntimeHandlerConfig(binary=Path("/usr/bin/crun")),
    }


@attrs.frozen
class ContainerRuntimeConfig:
    #: The handler used when the CRI names none (``runtime_handler = ""``).
    default_handler: str = "runc"
    #: CRI runtime handler name -> OCI runtime (containerd's ``runtimes``).
    handlers: dict[str, RuntimeHandlerConfig] = attrs.field(factory=_default_handlers)
    #: The per-container monitor.
    conmon: Path = Path("/usr/bin/conmon")
    #: The pod infra process, run from a minimal rootfs the daemon makes.
    infra_binary: Path = Path("/usr/bin/catatonit")
    #: Run pods' infra process from this image instead (containerd's
    #: ``sandbox_image``; pulled on first use, recorded as pinned).  "" keeps
    #: the image-less ``catatonit -P``, so pods start offline.
    sandbox_image: str = ""
    #: The cgroup parent of pods whose config names none.
    default_cgroup_parent: str = "/pouch"


@attrs.frozen
class NetworkConfig:
    #: Where CNI network configurations are read from (reloaded on change).
    conf_dir: Path = Path("/etc/cni/net.d")
    #: Where CNI plugin executables are looked up, in order.
    plugin_dirs: tuple[Path, ...] = (Path("/usr/lib/cni"), Path("/opt/cni/bin"))
    #: The network to use; "" takes the first config in lexical order.
    network_name: str = ""
    #: With no valid config, use the embedded bridge "pouch0" on 10.88.0.0/16.
    use_default: bool = True
    #: Limit for one plugin run.
    plugin_timeout: float = 30.0


@attrs.frozen
class MetricsConfig:
    #: Serve Prometheus metrics at http://<address>:<port>/metrics.
    enabled: bool = False
    address: str = "127.0.0.1"
    port: int = 9099


@attrs.frozen
class Config:
    #: Persistent state: the database, content store, snapshots.
    root: Path = Path("/var/lib/pouch")
    #: Volatile state, gone at reboot: the lock file, runtime state, sockets.
    state: Path = Path("/run/pouch")
    #: On SIGTERM, how long in-flight calls may run before they are cut.
    shutdown_grace_period: float = 10.0
    grpc: GrpcConfig = GrpcConfig()
    stream: StreamConfig = StreamConfig()
    log: LogConfig = LogConfig()
    cgroup: CgroupConfig = CgroupConfig()
    image: ImageStoreConfig = ImageStoreConfig()
    runtime: ContainerRuntimeConfig = ContainerRuntimeConfig()
    network: NetworkConfig = NetworkConfig()
    metrics: MetricsConfig = MetricsConfig()
    registry: RegistryConfig = RegistryConfig()

    @property
    def lock_path(self) -> Path:
        return self.state / "pouchd.lock"


def _converter() -> cattrs.Converter:
    conv = cattrs.Converter(forbid_extra_keys=True)

    # tomllib gives str for paths and int for whole-number floats.
    conv.register_structure_hook(Path, _structure_path)
    conv.register_structure_hook(float, _structure_float)
    conv.register_structure_hook(int, _structure_int)
    conv.register_structure_hook(str, _structure_str)
    conv.register_structure_hook_func(lambda t: t == tuple[str, ...], _structure_str_tuple)
    conv.register_structure_hook_func(lambda t: t == tuple[Path, ...], _structure_path_tuple)
    conv.register_structure_hook(bool, _structure_bool)
    # Registered one by one: a StrEnum is also a str, and singledispatch
    # would otherwise pick the str hook for it.
    for cls in (LogLevel, LogFormat, CgroupDriver):
        conv.register_structure_hook(cls, _structure_enum)
    # A table is expected wherever a nested section is.
    conv.register_structure_hook_factory(attrs.has, _table_hook_factory)
    conv.register_unstructure_hook(Path, str)
    return conv


def _structure_path(value: object, _: type) -> Path:
    if not isinstance(value, str) or not value:
        raise ValueError(f"expected a non-empty path string, got {value!r}")
    return Path(value)


def _structure_float(value: object, _: type) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"expected a number, got {value!r}")
    return float(value)


def _structure_int(value: object, _: type) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"expected an integer, got {value!r}")
    return value


def _structure_str(value: object, _: type) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {value!r}")
    return value


def _structure_enum(value: object, cls: type[enum.Enum]) -> enum.Enum:
    choices = ", ".join(repr(m.value) for m in cls)
    try:
        return cls(value)
    except ValueError:
        raise ValueError(f"expected one of {choices}, got {value!r}") from None


def _table_hook_factory(cls: type, conv: cattrs.Converter) -> Any:
    inner: Callable[[Any, type], Any] = cattrs.gen.make_dict_structure_fn(
        cls, conv, _cattrs_forbid_extra_keys=True
    )

    def hook(value: object, _: type) -> Any:
        if not isinstance(value, dict):
            raise ValueError(f"expected a table, got {value!r}")
        return inner(value, cls)

    return hook


def _structure_str_tuple(value: object, _: type) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"expected a list of strings, got {value!r}")
    return tuple(value)


def _structure_path_tuple(value: object, _: type) -> tuple[Path, ...]:
    return tuple(Path(v) for v in _structure_str_tuple(value, tuple))


def _structure_bool(value: object, _: type) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {value!r}")
    return value


_CONVERTER = _converter()


def from_dict(data: dict[str, Any]) -> Config:
    """Build a `Config` from parsed TOML.

    Raises:
        ConfigError: a key is unknown or a value has the wrong type; the
            message names the key by its dotted path.
    """
    try:
        return _CONVERTER.structure(data, Config)
    except ClassValidationError as exc:
        raise ConfigError(_describe(exc)) from exc


def _describe(exc: ClassValidationError) -> str:
    problems: list[str] = []

    def walk(err: BaseException, path: str) -> None:
        if isinstance(err, ForbiddenExtraKeysError):
            for key in sorted(err.extra_fields):
                problems.append(f"unknown key {path}{key!s}")
        elif isinstance(err, ClassValidationError | IterableValidationError):
            for sub in err.exceptions:
                note = _note_of(sub)
                walk(sub, f"{path}{note}." if note else path)
        else:
            key = path.rstrip(".") or "<top>"
            problems.append(f"invalid value for {key}: {err}")

    walk(exc, "")
    return "; ".join(problems) or str(exc)


def _note_of(err: BaseException) -> str | None:
    # cattrs records the attribute (or dict key, or list index) each
    # sub-error belongs to as a note.
    for note in getattr(err, "__notes__", ()):
        name = getattr(note, "name", None)
        if isinstance(name, str):
            return name
        index = getattr(note, "index", None)
        if index is not None:
            return f'"{index}"' if isinstance(index, str) else str(index)
    return None


def load(path: Path | None) -> Config:
    """Read the configuration file.

    A missing *default* file means all defaults; a missing file that was
    named explicitly is an error.
    """
    target = path or DEFAULT_CONFIG_PATH
    try:
        with target.open("rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        if path is None:
            return Config()
        raise ConfigError(f"config file {target} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {target} is not valid TOML: {exc}") from exc
    except OSError as exc:
        raise ConfigError(f"cannot read config file {target}: {exc.strerror}") from exc
    try:
        return from_dict(data)
    except ConfigError as exc:
        raise ConfigError(f"config file {target}: {exc}") from exc


def with_overrides(
    config: Config,
    *,
    root: Path | None = None,
    state: Path | None = None,
    socket: Path | None = None,
) -> Config:
    """Apply the command line's ``--root``, ``--state`` and ``--socket``."""
    if root is not None:
        config = attrs.evolve(config, root=root)
    if state is not None:
        config = attrs.evolve(config, state=state)
    if socket is not None:
        config = attrs.evolve(config, grpc=attrs.evolve(config.grpc, address=socket))
    return config


def to_toml(config: Config) -> str:
    """Render the effective configuration as TOML (``--print-config``)."""
    data: dict[str, Any] = _CONVERTER.unstructure(config)
    top = [f"{k} = {_toml_value(v)}" for k, v in data.items() if not isinstance(v, dict)]
    lines = [*top]
    for key, value in data.items():
        if isinstance(value, dict):
            _toml_table(lines, key, value)
    return "\n".join(lines) + "\n"


def _toml_table(lines: list[str], name: str, table: dict[str, Any]) -> None:
    lines.append("")
    lines.append(f"[{name}]")
    nested = {k: v for k, v in table.items() if isinstance(v, dict)}
    # TOML has no null: an unset optional key is left out (it keeps its default).
    lines.extend(
        f"{k} = {_toml_value(v)}" for k, v in table.items() if k not in nested and v is not None
    )
    for key, value in nested.items():
        if all(isinstance(v, dict) for v in value.values()):
            for sub, subtable in value.items():
                _toml_table(lines, f"{name}.{key}.{_toml_key(sub)}", subtable)
        else:
            _toml_table(lines, f"{name}.{key}", value)


def _toml_key(key: str) -> str:
    return key if key.replace("-", "").replace("_", "").isalnum() else _toml_value(key)


def _toml_value(value: object) -> str:
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, enum.Enum):
        value = value.value
    text = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{text}"'
