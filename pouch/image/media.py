"""OCI and Docker image formats: media types, descriptors, platforms.

Pure parsing of the JSON documents a registry or an image archive holds
(OCI image-spec v1.1 and Docker image manifest v2 schema 2).  No I/O.
"""

from __future__ import annotations

import hashlib
import json
import platform as _platform
from typing import Any, Final

import attrs

from pouch.errors import InvalidArgument

OCI_INDEX: Final = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST: Final = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG: Final = "application/vnd.oci.image.config.v1+json"
OCI_LAYER: Final = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP: Final = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_ZSTD: Final = "application/vnd.oci.image.layer.v1.tar+zstd"
OCI_LAYER_NONDIST: Final = "application/vnd.oci.image.layer.nondistributable.v1.tar"
OCI_LAYER_NONDIST_GZIP: Final = "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
DOCKER_LIST: Final = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST: Final = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG: Final = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_GZIP: Final = "application/vnd.docker.image.rootfs.diff.tar.gzip"
DOCKER_FOREIGN_LAYER: Final = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"

INDEX_TYPES: Final = frozenset({OCI_INDEX, DOCKER_LIST})
MANIFEST_TYPES: Final = frozenset({OCI_MANIFEST, DOCKER_MANIFEST})
CONFIG_TYPES: Final = frozenset({OCI_CONFIG, DOCKER_CONFIG})
LAYER_TYPES: Final = frozenset(
    {
        OCI_LAYER,
        OCI_LAYER_GZIP,
        OCI_LAYER_ZSTD,
        OCI_LAYER_NONDIST,
        OCI_LAYER_NONDIST_GZIP,
        DOCKER_LAYER_GZIP,
        DOCKER_FOREIGN_LAYER,
    }
)
#: What a registry is asked for when resolving a tag (the Accept header).
MANIFEST_ACCEPT: Final = (OCI_INDEX, DOCKER_LIST, OCI_MANIFEST, DOCKER_MANIFEST)

_DIGEST_HEX_LEN: Final = {"sha256": 64, "sha384": 96, "sha512": 128}


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def check_digest(digest: str, *, what: str = "digest") -> str:
    """Validate ``algorithm:hex``; return it unchanged.

    Raises:
        InvalidArgument: unknown algorithm or malformed hex.
    """
    algo, _, hexpart = digest.partition(":")
    length = _DIGEST_HEX_LEN.get(algo)
    if length is None or len(hexpart) != length or hexpart.strip("0123456789abcdef"):
        raise InvalidArgument(f"invalid {what} {digest!r}")
    return digest


def hasher(digest: str) -> Any:
    """A new hashlib object for the algorithm of *digest*."""
    return hashlib.new(check_digest(digest).partition(":")[0])


@attrs.frozen
class Platform:
    os: str
    architecture: str
    variant: str | None = None

    @classmethod
    def host(cls) -> Platform:
        """The platform images are resolved to on this node."""
        machine = _platform.machine().lower()
        arch = _GO_ARCH.get(machine, machine)
        variant = "v8" if arch == "arm64" else None
        return cls(os="linux", architecture=arch, variant=variant)

    def matches(self, other: Platform) -> bool:
        if (self.os, self.architecture) != (other.os, other.architecture):
            return False
        # arm64 images rarely state "v8"; a missing variant matches.
        return self.variant is None or other.variant is None or self.variant == other.variant

    def __str__(self) -> str:
        base = f"{self.os}/{self.architecture}"
        return f"{base}/{self.variant}" if self.variant else base


_GO_ARCH: Final = {
    "x86_64": "amd64",
    "amd64": "amd64",
    "aarch64": "arm64",
    "arm64": "arm64",
    "armv7l": "arm",
    "ppc64le": "ppc64le",
    "s390x": "s390x",
    "riscv64": "riscv64",
    "i686": "386",
    "i386": "386",
}


@attrs.frozen
class Descriptor:
    media_type: str
    digest: str
    size: int
    platform: Platform | None = None
    urls: tuple[str, ...] = ()
    annotations: tuple[tuple[str, str], ...] = ()

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "mediaType": self.media_type,
            "digest": self.digest,
            "size": self.size,
        }
        if self.platform is not None:
            out["platform"] = {"os": self.platform.os, "architecture": self.platform.architecture}
            if self.platform.variant:
                out["platform"]["variant"] = self.platform.variant
        return out


@attrs.frozen
class Manifest:
    """An image manifest: its config and layers, in order (base first)."""

    media_type: str
    config: Descriptor
    layers: tuple[Descriptor, ...]


@attrs.frozen
class Index:
    media_type: str
    manifests: tuple[Descriptor, ...]


@attrs.frozen
class ImageConfig:
    """The parts of an image config a runtime needs."""

    diff_ids: tuple[str, ...]
    platform: Platform
    user: str = ""
    env: tuple[str, ...] = ()
    entrypoint: tuple[str, ...] = ()
    cmd: tuple[str, ...] = ()
    working_dir: str = ""
    exposed_ports: tuple[str, ...] = ()
    volumes: tuple[str, ...] = ()
    labels: tuple[tuple[str, str], ...] = ()
    stop_signal: str = ""
    created: str = ""


def _load(data: bytes, what: str) -> dict[str, Any]:
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidArgument(f"{what} is not valid JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise InvalidArgument(f"{what} is not a JSON object")
    return doc


def _str(doc: dict[str, Any], key: str, what: str, *, default: str | None = None) -> str:
    value = doc.get(key, default)
    if not isinstance(value, str):
        raise InvalidArgument(f"{what}: field {key!r} must be a string")
    return value


def _str_list(value: object, what: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InvalidArgument(f"{what} must be a list of strings")
    return tuple(value)


def parse_descriptor(doc: object, what: str) -> Descriptor:
    if not isinstance(doc, dict):
        raise InvalidArgument(f"{what} is not a JSON object")
    size = doc.get("size")
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise InvalidArgument(f"{what}: invalid size {size!r}")
    plat = doc.get("platform")
    platform = None
    if isinstance(plat, dict):
        platform = Platform(
            os=str(plat.get("os", "")),
            architecture=str(plat.get("architecture", "")),
            variant=plat.get("variant") or None,
        )
    annotations = doc.get("annotations") or {}
    return Descriptor(
        media_type=_str(doc, "mediaType", what),
        digest=check_digest(_str(doc, "digest", what), what=f"{what} digest"),
        size=size,
        platform=platform,
        urls=_str_list(doc.get("urls"), f"{what} urls"),
        annotations=tuple(sorted((str(k), str(v)) for k, v in annotations.items())),
    )


def media_type_of(data: bytes, declared: str | None = None) -> str:
    """The media type of a manifest document: its own field, else the header's."""
    doc = _load(data, "manifest")
    media = doc.get("mediaType") or declared
    if isinstance(media, str) and media:
        return media.split(";")[0].strip()
    # OCI allows omitting mediaType; tell an index from a manifest by shape.
    return OCI_INDEX if "manifests" in doc else OCI_MANIFEST


def parse_index(data: bytes, media_type: str) -> Index:
    doc = _load(data, "image index")
    manifests = doc.get("manifests")
    if not isinstance(manifests, list):
        raise InvalidArgument("image index has no manifests list")
    return Index(
        media_type=media_type,
        manifests=tuple(parse_descriptor(m, f"index entry {i}") for i, m in enumerate(manifests)),
    )


def parse_manifest(data: bytes, media_type: str) -> Manifest:
    doc = _load(data, "image manifest")
    if doc.get("schemaVersion") != 2:
        raise InvalidArgument(f"unsupported manifest schemaVersion {doc.get('schemaVersion')!r}")
    layers = doc.get("layers")
    if not isinstance(layers, list):
        raise InvalidArgument("image manifest has no layers list")
    manifest = Manifest(
        media_type=media_type,
        config=parse_descriptor(doc.get("config"), "manifest config"),
        layers=tuple(parse_descriptor(layer, f"layer {i}") for i, layer in enumerate(layers)),
    )
    for layer in manifest.layers:
        if layer.media_type not in LAYER_TYPES:
            raise InvalidArgument(f"unsupported layer media type {layer.media_type!r}")
    return manifest


def select_platform(index: Index, want: Platform) -> Descriptor:
    """The index entry for *want*, as containerd's platform matcher picks it.

    Raises:
        InvalidArgument: no entry fits; the message names the platforms on offer.
    """
    for desc in index.manifests:
        listed = desc.media_type in MANIFEST_TYPES | INDEX_TYPES
        if listed and desc.platform is not None and want.matches(desc.platform):
            return desc
    offered = ", ".join(str(d.platform) for d in index.manifests if d.platform) or "none"
    raise InvalidArgument(f"no image for platform {want} in index (offered: {offered})")


def parse_config(data: bytes) -> ImageConfig:
    doc = _load(data, "image config")
    rootfs = doc.get("rootfs")
    if not isinstance(rootfs, dict) or rootfs.get("type") != "layers":
        raise InvalidArgument("image config has no rootfs of type 'layers'")
    diff_ids = tuple(
        check_digest(d, what="diff id") for d in _str_list(rootfs.get("diff_ids"), "diff_ids")
    )
    cfg = doc.get("config") or {}
    if not isinstance(cfg, dict):
        raise InvalidArgument("image config: 'config' must be an object")
    labels = cfg.get("Labels") or {}
    return ImageConfig(
        diff_ids=diff_ids,
        platform=Platform(
            os=str(doc.get("os", "linux")),
            architecture=str(doc.get("architecture", "")),
            variant=doc.get("variant") or None,
        ),
        user=str(cfg.get("User") or ""),
        env=_str_list(cfg.get("Env"), "config Env"),
        entrypoint=_str_list(cfg.get("Entrypoint"), "config Entrypoint"),
        cmd=_str_list(cfg.get("Cmd"), "config Cmd"),
        working_dir=str(cfg.get("WorkingDir") or ""),
        exposed_ports=tuple(sorted((cfg.get("ExposedPorts") or {}).keys())),
        volumes=tuple(sorted((cfg.get("Volumes") or {}).keys())),
        labels=tuple(sorted((str(k), str(v)) for k, v in labels.items())),
        stop_signal=str(cfg.get("StopSignal") or ""),
        created=str(doc.get("created") or ""),
    )


def chain_ids(diff_ids: tuple[str, ...]) -> tuple[str, ...]:
    """OCI ChainIDs: the identity of each layer stack, base first.

    ChainID(L0) = DiffID(L0); ChainID(L0..n) = sha256(ChainID(L0..n-1) + " " + DiffID(Ln)).
    """
    out: list[str] = []
    for diff_id in diff_ids:
        out.append(diff_id if not out else sha256_digest(f"{out[-1]} {diff_id}".encode()))
    return tuple(out)
