"""Offline OCI and Docker schema2 test images, built from Debian's static busybox.

Everything here is deterministic: fixed mtimes, owners and gzip headers, so an image has
the same digests on every run and every host of one architecture. Nothing touches the
network; the only input is ``/bin/busybox`` from the Debian package ``busybox-static``.

Images are plain frozen dataclasses (`Image`, `Index`) whose blobs (`Blob`) hold their
bytes in memory, or a file path for the large ones. `write_oci_layout` and
`read_oci_layout` move them to and from an OCI image layout directory
(image-spec ``image-layout.md``), and `tests.support.registry.push` puts them in a registry.

Builders:

- `busybox_image`: one layer, busybox plus applet symlinks, users root/app/nobody.
- `multilayer_image`: busybox plus three layers of whiteouts, opaque directories, hard
  links, symlinks and type changes; `multilayer_expected` describes the resulting tree.
- `webserver_image`: busybox httpd serving `WEBSERVER_INDEX_HTML` on port 8080.
- `big_image`: busybox plus layers of incompressible data, written to a cached layout.
- `multiarch_index`: an index of an image plus small stub images for other platforms.
- `to_docker`: the same image or index with Docker schema2 media types.
- `build_image` and `LayerBuilder` for anything else a test needs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import os
import platform as _platform
import shutil
import tarfile
import tempfile
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Self, overload

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Mapping, Sequence

# Media types: image-spec media-types.md and distribution's manifest-v2-2.md.
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"

MANIFEST_TYPES = frozenset({OCI_MANIFEST, DOCKER_MANIFEST})
INDEX_TYPES = frozenset({OCI_INDEX, DOCKER_MANIFEST_LIST})

_TO_DOCKER = {
    OCI_MANIFEST: DOCKER_MANIFEST,
    OCI_INDEX: DOCKER_MANIFEST_LIST,
    OCI_CONFIG: DOCKER_CONFIG,
    OCI_LAYER: DOCKER_LAYER,
    OCI_LAYER_GZIP: DOCKER_LAYER_GZIP,
}

BUSYBOX = Path("/bin/busybox")
BUSYBOX_APPLETS = (
    "sh", "ls", "cat", "echo", "sleep", "id", "hostname", "true", "false", "env", "mkdir",
    "touch", "wc", "head", "md5sum", "sha256sum", "dd", "nc", "httpd", "ps", "kill", "grep",
    "seq", "yes",
)  # fmt: skip
PATH_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
DEFAULT_CONFIG: Mapping[str, object] = {"Env": [PATH_ENV], "Cmd": ["sh"], "WorkingDir": "/"}
APP_UID = 1000
APP_GID = 1000
NOBODY_UID = 65534
PASSWD = (
    "root:x:0:0:root:/root:/bin/sh\n"
    f"app:x:{APP_UID}:{APP_GID}:app:/home/app:/bin/sh\n"
    f"nobody:x:{NOBODY_UID}:{NOBODY_UID}:nobody:/nonexistent:/bin/false\n"
)
GROUP = f"root:x:0:\napp:x:{APP_GID}:\nnogroup:x:{NOBODY_UID}:\n"
WEBSERVER_PORT = 8080
WEBSERVER_INDEX_HTML = b"<!doctype html><title>pouch</title><p>hello from pouch</p>\n"

# 2024-01-01T00:00:00Z: a fixed time keeps digests stable (mtime 0 upsets some tools).
MTIME = 1_704_067_200
CREATED = "2024-01-01T00:00:00Z"
_BIG_FORMAT = 1  # bump when big_image's content changes, to invalidate caches
_MiB = 1 << 20

Compression = Literal["gzip", "none"]
JSONObject = dict[str, object]


def _json(obj: object) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclasses.dataclass(frozen=True)
class Blob:
    """Content-addressed bytes: in memory (`data`) or in a file (`path`)."""

    media_type: str
    digest: str
    size: int
    data: bytes | None = dataclasses.field(default=None, repr=False)
    path: Path | None = None

    @classmethod
    def of(cls, media_type: str, data: bytes) -> Self:
        return cls(media_type, sha256_digest(data), len(data), data=data)

    @property
    def hex(self) -> str:
        return self.digest.removeprefix("sha256:")

    def read_bytes(self) -> bytes:
        if self.data is not None:
            return self.data
        assert self.path is not None
        return self.path.read_bytes()

    def chunks(self, chunk_size: int = _MiB) -> Iterator[bytes]:
        """Yield the content in pieces, without loading a file blob whole."""
        if self.data is not None:
            for start in range(0, len(self.data), chunk_size):
                yield self.data[start : start + chunk_size]
            return
        assert self.path is not None
        with self.path.open("rb") as f:
            while chunk := f.read(chunk_size):
                yield chunk

    def descriptor(self) -> JSONObject:
        """The OCI content descriptor (image-spec descriptor.md)."""
        return {"mediaType": self.media_type, "digest": self.digest, "size": self.size}

    def with_media_type(self, media_type: str) -> Blob:
        return dataclasses.replace(self, media_type=media_type)


@dataclasses.dataclass(frozen=True)
class Layer:
    """A layer blob and its diff ID, the digest of the uncompressed tar."""

    blob: Blob
    diff_id: str


@dataclasses.dataclass(frozen=True)
class Platform:
    architecture: str
    os: str = "linux"
    variant: str | None = None

    def to_json(self) -> JSONObject:
        out: JSONObject = {"architecture": self.architecture, "os": self.os}
        if self.variant is not None:
            out["variant"] = self.variant
        return out

    def __str__(self) -> str:
        parts = [self.os, self.architecture] + ([self.variant] if self.variant else [])
        return "/".join(parts)


# uname -m to GOARCH, the vocabulary of image-spec config.md "architecture".
_ARCH = {
    "x86_64": Platform("amd64"),
    "amd64": Platform("amd64"),
    "aarch64": Platform("arm64", variant="v8"),
    "arm64": Platform("arm64", variant="v8"),
    "armv7l": Platform("arm", variant="v7"),
    "armv6l": Platform("arm", variant="v6"),
    "i686": Platform("386"),
    "i386": Platform("386"),
    "ppc64le": Platform("ppc64le"),
    "s390x": Platform("s390x"),
    "riscv64": Platform("riscv64"),
}


def host_platform() -> Platform:
    """This host's platform in OCI terms, e.g. ``linux/amd64``."""
    machine = _platform.machine()
    try:
        return _ARCH[machine]
    except KeyError:
        raise RuntimeError(f"unknown machine {machine!r}: add it to images._ARCH") from None


@dataclasses.dataclass(frozen=True)
class Image:
    """One image manifest with its config and layers."""

    manifest: Blob
    config: Blob
    layers: tuple[Layer, ...]
    platform: Platform

    @property
    def digest(self) -> str:
        return self.manifest.digest

    @property
    def media_type(self) -> str:
        return self.manifest.media_type

    @property
    def manifest_bytes(self) -> bytes:
        return self.manifest.read_bytes()

    @property
    def config_bytes(self) -> bytes:
        return self.config.read_bytes()

    @property
    def diff_ids(self) -> tuple[str, ...]:
        return tuple(layer.diff_id for layer in self.layers)

    @property
    def blobs(self) -> tuple[Blob, ...]:
        """The config and layer blobs (not the manifest), as a registry stores them."""
        return (self.config, *(layer.blob for layer in self.layers))

    def config_json(self) -> JSONObject:
        loaded: JSONObject = json.loads(self.config_bytes)
        return loaded


@dataclasses.dataclass(frozen=True)
class Index:
    """An OCI image index or Docker manifest list, with the images it names."""

    manifest: Blob
    images: tuple[Image, ...]

    @property
    def digest(self) -> str:
        return self.manifest.digest

    @property
    def media_type(self) -> str:
        return self.manifest.media_type

    @property
    def manifest_bytes(self) -> bytes:
        return self.manifest.read_bytes()

    def image_for(self, platform: Platform) -> Image:
        for image in self.images:
            if image.platform == platform:
                return image
        raise LookupError(f"no image for {platform} in index {self.digest}")


# --- layers -----------------------------------------------------------------------------


class _LayerWriter:
    """Writes a tar stream, optionally gzipped, hashing both forms as it goes.

    The tar is framed by hand (`TarInfo.tobuf` plus padding) rather than through
    `tarfile.open`, so large layers stream to a file without a second pass.
    """

    def __init__(self, sink: Callable[[bytes], object], compression: Compression, level: int):
        self._sink = sink
        self._diff = hashlib.sha256()
        self._blob = hashlib.sha256()
        self._size = 0
        # wbits 31: a gzip wrapper with mtime 0 and no file name, so output is stable.
        self._z = zlib.compressobj(level, zlib.DEFLATED, 31) if compression == "gzip" else None

    def _emit(self, data: bytes) -> None:
        if data:
            self._blob.update(data)
            self._size += len(data)
            self._sink(data)

    def _write(self, data: bytes) -> None:
        self._diff.update(data)
        self._emit(self._z.compress(data) if self._z is not None else data)

    def add(self, info: tarfile.TarInfo, data: bytes = b"") -> None:
        info.size = len(data)
        self._write(info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape"))
        if data:
            self._write(data)
            self._write(bytes(-len(data) % tarfile.BLOCKSIZE))

    def finish(self) -> tuple[str, str, int]:
        """End the archive; return (diff_id, digest, size)."""
        self._write(bytes(2 * tarfile.BLOCKSIZE))  # end-of-archive marker
        if self._z is not None:
            self._emit(self._z.flush())
        return (
            "sha256:" + self._diff.hexdigest(),
            "sha256:" + self._blob.hexdigest(),
            self._size,
        )


def _layer_media_type(compression: Compression) -> str:
    return OCI_LAYER_GZIP if compression == "gzip" else OCI_LAYER


def _norm(path: str) -> str:
    name = path.strip("/")
    if not name or ".." in name.split("/"):
        raise ValueError(f"bad layer path {path!r}")
    return name


class LayerBuilder:
    """Collects tar entries for one layer, in order, then builds the blob.

    Paths may be written with or without a leading slash; missing parent directories are
    added (root, 0755) before their first child. Entries keep the order they were added in,
    which matters for whiteouts: put an opaque marker before the new content of its directory.
    """

    def __init__(self) -> None:
        self._entries: list[tuple[tarfile.TarInfo, bytes]] = []
        self._dirs: set[str] = set()

    def _info(self, path: str, kind: bytes, mode: int, uid: int, gid: int) -> tarfile.TarInfo:
        name = _norm(path)
        parent = name.rpartition("/")[0]
        if parent and parent not in self._dirs:
            self.dir(parent)
        info = tarfile.TarInfo(name)
        info.type = kind
        info.mode = mode
        info.uid, info.gid = uid, gid
        info.mtime = MTIME
        return info

    def dir(self, path: str, *, mode: int = 0o755, uid: int = 0, gid: int = 0) -> Self:
        info = self._info(path, tarfile.DIRTYPE, mode, uid, gid)
        self._dirs.add(info.name)
        self._entries.append((info, b""))
        return self

    def file(
        self, path: str, data: bytes | str, *, mode: int = 0o644, uid: int = 0, gid: int = 0
    ) -> Self:
        content = data.encode() if isinstance(data, str) else data
        self._entries.append((self._info(path, tarfile.REGTYPE, mode, uid, gid), content))
        return self

    def symlink(self, path: str, target: str, *, uid: int = 0, gid: int = 0) -> Self:
        info = self._info(path, tarfile.SYMTYPE, 0o777, uid, gid)
        info.linkname = target
        self._entries.append((info, b""))
        return self

    def hardlink(self, path: str, target: str) -> Self:
        """Add a hard link to `target`, an earlier entry of this layer."""
        info = self._info(path, tarfile.LNKTYPE, 0o644, 0, 0)
        info.linkname = _norm(target)
        self._entries.append((info, b""))
        return self

    def whiteout(self, path: str) -> Self:
        """Delete `path` (file or directory) of the lower layers (image-spec layer.md)."""
        parent, _, base = _norm(path).rpartition("/")
        return self.file(f"{parent}/.wh.{base}" if parent else f".wh.{base}", b"")

    def opaque(self, directory: str) -> Self:
        """Hide everything the lower layers have in `directory` (image-spec layer.md)."""
        return self.file(f"{_norm(directory)}/.wh..wh..opq", b"")

    def build(self, *, compression: Compression = "gzip", level: int = 6) -> Layer:
        chunks: list[bytes] = []
        writer = _LayerWriter(chunks.append, compression, level)
        for info, data in self._entries:
            writer.add(info, data)
        diff_id, digest, size = writer.finish()
        data = b"".join(chunks)
        blob = Blob(_layer_media_type(compression), digest, size, data=data)
        return Layer(blob, diff_id)


# --- images -----------------------------------------------------------------------------


def _image(
    config: bytes,
    layers: Sequence[Layer],
    platform: Platform,
    *,
    docker: bool = False,
    annotations: Mapping[str, str] | None = None,
) -> Image:
    config_blob = Blob.of(DOCKER_CONFIG if docker else OCI_CONFIG, config)
    manifest: JSONObject = {
        "schemaVersion": 2,
        "mediaType": DOCKER_MANIFEST if docker else OCI_MANIFEST,
        "config": config_blob.descriptor(),
        "layers": [layer.blob.descriptor() for layer in layers],
    }
    if annotations:
        manifest["annotations"] = dict(annotations)
    blob = Blob.of(DOCKER_MANIFEST if docker else OCI_MANIFEST, _json(manifest))
    return Image(blob, config_blob, tuple(layers), platform)


def build_image(
    layers: Sequence[Layer],
    *,
    config: Mapping[str, object] | None = None,
    platform: Platform | None = None,
    history: Sequence[str] | None = None,
    annotations: Mapping[str, str] | None = None,
) -> Image:
    """Build an OCI image manifest and config over `layers`.

    Args:
        layers: bottom layer first.
        config: the execution parameters (image-spec config.md ``config``), merged key by
            key over `DEFAULT_CONFIG`; e.g. ``{"Cmd": [...], "User": "1000"}``.
        platform: defaults to `host_platform()`.
        history: one ``created_by`` text per layer.
        annotations: manifest annotations.
    """
    platform = platform or host_platform()
    history = history or [f"layer {i}" for i in range(len(layers))]
    if len(history) != len(layers):
        raise ValueError("need one history entry per layer")
    cfg: JSONObject = {"created": CREATED, **platform.to_json()}
    cfg["config"] = {**DEFAULT_CONFIG, **(config or {})}
    cfg["rootfs"] = {"type": "layers", "diff_ids": [layer.diff_id for layer in layers]}
    cfg["history"] = [{"created": CREATED, "created_by": text} for text in history]
    return _image(_json(cfg), layers, platform, annotations=annotations)


def _read_busybox() -> bytes:
    try:
        return BUSYBOX.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{BUSYBOX} is missing: apt-get install -y busybox-static"
        ) from None


@functools.cache
def busybox_layer() -> Layer:
    """The base layer: /bin/busybox, applet symlinks, /etc/passwd and /etc/group, /tmp."""
    b = LayerBuilder().dir("bin").file("bin/busybox", _read_busybox(), mode=0o755)
    for applet in BUSYBOX_APPLETS:
        b.symlink(f"bin/{applet}", "busybox")
    b.dir("etc").file("etc/passwd", PASSWD).file("etc/group", GROUP)
    b.dir("root", mode=0o700).dir("tmp", mode=0o1777)
    b.dir("home").dir("home/app", mode=0o755, uid=APP_UID, gid=APP_GID)
    return b.build()


@functools.cache
def busybox_image() -> Image:
    """A one-layer busybox image for the host platform, ``Cmd ["sh"]``."""
    return build_image([busybox_layer()], history=["busybox"])


@dataclasses.dataclass(frozen=True)
class Expected:
    """One path of an expected root filesystem."""

    kind: Literal["file", "dir", "symlink"]
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    data: bytes | None = None  # files only
    target: str | None = None  # symlinks only


@dataclasses.dataclass(frozen=True)
class TreeExpectation:
    """What `multilayer_image` unpacks to, beyond the busybox base.

    `present` maps absolute paths to what they must be; `absent` paths must not exist;
    each `hardlinks` group must be one inode.
    """

    present: Mapping[str, Expected]
    absent: tuple[str, ...]
    hardlinks: tuple[tuple[str, ...], ...]


def _multilayer_layers() -> tuple[Layer, Layer, Layer]:
    add = (
        LayerBuilder()
        .dir("data")
        .file("data/keep.txt", "keep v1\n")
        .file("data/remove-me.txt", "to be removed\n")
        .file("data/secret.txt", "secret\n", mode=0o640, uid=APP_UID, gid=APP_GID)
        .file("data/hard-a.txt", "hard linked\n")
        .hardlink("data/hard-b.txt", "data/hard-a.txt")
        .symlink("data/link-rel", "keep.txt")
        .symlink("data/link-abs", "/data/keep.txt")
        .dir("data/replaced")
        .file("data/replaced/inner.txt", "inner\n")
        .file("data/file-to-dir", "a file first\n")
        .dir("data/opaque")
        .file("data/opaque/a.txt", "a\n")
        .dir("data/opaque/sub")
        .file("data/opaque/sub/b.txt", "b\n")
        .dir("data/gone-dir")
        .file("data/gone-dir/x.txt", "x\n")
        .build()
    )
    # A plain file or directory entry over a path of another type replaces it: the applier
    # removes the old one first (image-spec layer.md "Changeset over existing files").
    change = (
        LayerBuilder()
        .dir("data")
        .whiteout("data/remove-me.txt")
        .whiteout("data/gone-dir")
        .file("data/replaced", "now a file\n")
        .dir("data/file-to-dir", mode=0o750)
        .file("data/file-to-dir/inside.txt", "inside\n")
        .dir("data/opaque")
        .opaque("data/opaque")
        .file("data/opaque/c.txt", "c\n")
        .build()
    )
    modify = (
        LayerBuilder()
        .dir("data")
        .file("data/keep.txt", "keep v2\n")
        .dir("data/gone-dir")  # re-created: x.txt from the first layer must stay hidden
        .file("data/gone-dir/new.txt", "new\n")
        .dir("etc")
        .file("etc/motd", "multilayer\n")
        .build()
    )
    return add, change, modify


@functools.cache
def multilayer_image() -> Image:
    """busybox plus three layers: add files, then delete and replace, then modify.

    Covers file and directory whiteouts, an opaque directory, hard links, relative and
    absolute symlinks, a 0640 file owned by 1000:1000, a directory replaced by a file and a
    file replaced by a directory. See `multilayer_expected` for the resulting tree.
    """
    return build_image(
        [busybox_layer(), *_multilayer_layers()],
        history=["busybox", "add files", "delete and replace", "modify"],
    )


def multilayer_expected() -> TreeExpectation:
    """The tree `multilayer_image` must unpack to (paths under /data, and /etc/motd)."""
    present = {
        "/data": Expected("dir", 0o755),
        "/data/keep.txt": Expected("file", data=b"keep v2\n"),
        "/data/secret.txt": Expected("file", 0o640, APP_UID, APP_GID, data=b"secret\n"),
        "/data/hard-a.txt": Expected("file", data=b"hard linked\n"),
        "/data/hard-b.txt": Expected("file", data=b"hard linked\n"),
        "/data/link-rel": Expected("symlink", 0o777, target="keep.txt"),
        "/data/link-abs": Expected("symlink", 0o777, target="/data/keep.txt"),
        "/data/replaced": Expected("file", data=b"now a file\n"),
        "/data/file-to-dir": Expected("dir", 0o750),
        "/data/file-to-dir/inside.txt": Expected("file", data=b"inside\n"),
        "/data/opaque": Expected("dir", 0o755),
        "/data/opaque/c.txt": Expected("file", data=b"c\n"),
        "/data/gone-dir": Expected("dir", 0o755),
        "/data/gone-dir/new.txt": Expected("file", data=b"new\n"),
        "/etc/motd": Expected("file", data=b"multilayer\n"),
    }
    absent = (
        "/data/remove-me.txt",
        "/data/replaced/inner.txt",
        "/data/opaque/a.txt",
        "/data/opaque/sub",
        "/data/gone-dir/x.txt",
    )
    return TreeExpectation(present, absent, (("/data/hard-a.txt", "/data/hard-b.txt"),))


@functools.cache
def webserver_image() -> Image:
    """busybox httpd serving /www (`WEBSERVER_INDEX_HTML`) on port `WEBSERVER_PORT`."""
    www = LayerBuilder().dir("www").file("www/index.html", WEBSERVER_INDEX_HTML).build()
    return build_image(
        [busybox_layer(), www],
        config={
            "Cmd": ["httpd", "-f", "-p", str(WEBSERVER_PORT), "-h", "/www"],
            "ExposedPorts": {f"{WEBSERVER_PORT}/tcp": {}},
        },
        history=["busybox", "www"],
    )


@functools.cache
def stub_image(platform: Platform) -> Image:
    """A tiny image for a foreign platform: one layer holding /etc/platform."""
    layer = LayerBuilder().dir("etc").file("etc/platform", f"{platform}\n").build()
    return build_image([layer], platform=platform, history=["stub"])


FOREIGN_PLATFORMS = (Platform("arm64", variant="v8"), Platform("ppc64le"))


def multiarch_index(image: Image, *, others: Sequence[Platform] | None = None) -> Index:
    """An index of `image` and stub images for `others` (default arm64 and ppc64le).

    The stubs come first and `image` last, so a client that takes the first entry instead
    of matching its platform gets the wrong image. A Docker-typed `image` gives a Docker
    manifest list of Docker-typed images.
    """
    if others is None:
        # On an arm64 or ppc64le host, stand in amd64 for the host's own platform.
        others = [p if p != image.platform else Platform("amd64") for p in FOREIGN_PLATFORMS]
    docker = image.media_type == DOCKER_MANIFEST
    stubs = [stub_image(p) for p in others]
    images = (*(to_docker(s) if docker else s for s in stubs), image)
    return _index(images, docker=docker)


def _index(images: Sequence[Image], *, docker: bool) -> Index:
    media_type = DOCKER_MANIFEST_LIST if docker else OCI_INDEX
    body: JSONObject = {
        "schemaVersion": 2,
        "mediaType": media_type,
        "manifests": [
            {**image.manifest.descriptor(), "platform": image.platform.to_json()}
            for image in images
        ],
    }
    return Index(Blob.of(media_type, _json(body)), tuple(images))


@overload
def to_docker(item: Image) -> Image: ...
@overload
def to_docker(item: Index) -> Index: ...
def to_docker(item: Image | Index) -> Image | Index:
    """The same content with Docker schema2 media types (manifest-v2-2.md).

    Config and layer bytes, and so their digests, stay the same; manifests change.
    """
    if isinstance(item, Index):
        return _index([to_docker(image) for image in item.images], docker=True)
    if item.media_type == DOCKER_MANIFEST:
        return item
    layers = [
        Layer(layer.blob.with_media_type(_TO_DOCKER[layer.blob.media_type]), layer.diff_id)
        for layer in item.layers
    ]
    return _image(item.config_bytes, layers, item.platform, docker=True)


# --- large images -----------------------------------------------------------------------


def _cache_root() -> Path:
    return Path(os.environ.get("POUCH_TEST_CACHE", tempfile.gettempdir())) / "pouch-test-images"


def big_image(
    total_mb: int = 200,
    layers: int = 5,
    *,
    seed: int = 0,
    compression: Compression = "gzip",
    cache_dir: Path | None = None,
) -> Image:
    """busybox plus `layers` layers holding `total_mb` MiB of incompressible data.

    The data comes from SHAKE-128 keyed by (`seed`, layer, file): deterministic and about
    0.5 GB/s. It is gzipped at level 0: deflate stores random data in raw blocks at any
    level, so this is the stream a real compressor would make, minus the time.

    Layer blobs are files in an OCI layout, ``big-<parameters>/`` under `cache_dir`
    (default ``$POUCH_TEST_CACHE`` or ``/tmp``, then ``pouch-test-images/``). An existing,
    intact layout is reused; a new one is built in a scratch directory and renamed into
    place, so parallel callers never see half a layout.
    """
    if total_mb <= 0 or layers <= 0:
        raise ValueError("total_mb and layers must be positive")
    name = f"big-{total_mb}m-{layers}l-{compression}-s{seed}-v{_BIG_FORMAT}"
    final = (cache_dir if cache_dir is not None else _cache_root()) / name
    if (cached := _cached_big(final)) is not None:
        return cached
    final.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
    try:
        blobs = scratch / "blobs" / "sha256"
        blobs.mkdir(parents=True)
        total = total_mb * _MiB
        per_layer = [total // layers + (1 if i < total % layers else 0) for i in range(layers)]
        built = [_big_layer(blobs, seed, i, size, compression) for i, size in enumerate(per_layer)]
        image = build_image(
            [busybox_layer(), *built],
            history=["busybox", *(f"random data {i}" for i in range(layers))],
        )
        write_oci_layout(scratch, {"big": image})
        scratch.chmod(0o755)  # mkdtemp made it 0700
        if _cached_big(final) is None:  # nobody else finished one meanwhile
            shutil.rmtree(final, ignore_errors=True)
            with contextlib.suppress(OSError):  # lost a race: the winner's copy is as good
                scratch.rename(final)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return _as_image(read_oci_layout(final)["big"])


def _cached_big(layout: Path) -> Image | None:
    try:
        return _as_image(read_oci_layout(layout)["big"])
    except (FileNotFoundError, KeyError, ValueError):
        return None


def _big_layer(blobs: Path, seed: int, index: int, size: int, compression: Compression) -> Layer:
    tmp = blobs / f".layer-{index}.partial"
    with tmp.open("wb") as out:
        writer = _LayerWriter(out.write, compression, level=0)
        writer.add(_dir_info(f"big/{index}"))
        file_size = 16 * _MiB
        for n, start in enumerate(range(0, size, file_size)):
            key = f"pouch-big:{seed}:{index}:{n}".encode()
            data = hashlib.shake_128(key).digest(min(file_size, size - start))
            info = tarfile.TarInfo(f"big/{index}/{n:04d}.bin")
            info.mtime = MTIME
            writer.add(info, data)
        diff_id, digest, blob_size = writer.finish()
    path = blobs / digest.removeprefix("sha256:")
    tmp.rename(path)
    return Layer(Blob(_layer_media_type(compression), digest, blob_size, path=path), diff_id)


def _dir_info(name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, MTIME
    return info


def _as_image(item: Image | Index) -> Image:
    if not isinstance(item, Image):
        raise ValueError("expected an image, found an index")
    return item


# --- OCI image layout (image-spec image-layout.md) ---------------------------------------

REF_NAME = "org.opencontainers.image.ref.name"


def _all_blobs(item: Image | Index) -> Iterator[Blob]:
    yield item.manifest
    images = item.images if isinstance(item, Index) else (item,)
    for image in images:
        if isinstance(item, Index):
            yield image.manifest
        yield from image.blobs


def write_oci_layout(directory: Path, refs: Mapping[str, Image | Index]) -> Path:
    """Write `refs` (ref name to image or index) as an OCI image layout in `directory`.

    File blobs are hard-linked when they can be, and copied otherwise.
    """
    blobs = directory / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)
    (directory / "oci-layout").write_bytes(_json({"imageLayoutVersion": "1.0.0"}))
    for item in refs.values():
        for blob in _all_blobs(item):
            target = blobs / blob.hex
            if target.exists():
                continue
            if blob.data is not None:
                target.write_bytes(blob.data)
                continue
            assert blob.path is not None
            try:
                os.link(blob.path, target)
            except OSError:
                shutil.copyfile(blob.path, target)
    index = {
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [
            {**item.manifest.descriptor(), "annotations": {REF_NAME: ref}}
            for ref, item in refs.items()
        ],
    }
    (directory / "index.json").write_bytes(_json(index))
    return directory


def read_oci_layout(directory: Path) -> dict[str, Image | Index]:
    """Read the named manifests of an OCI image layout written by `write_oci_layout`.

    Manifests and configs are loaded into memory; layers stay files.

    Raises:
        FileNotFoundError: no layout, or a blob is missing.
        ValueError: a blob has the wrong size, or a manifest is malformed.
    """
    index = json.loads((directory / "index.json").read_bytes())
    out: dict[str, Image | Index] = {}
    for desc in index["manifests"]:
        ref = desc.get("annotations", {}).get(REF_NAME)
        if ref is not None:
            out[ref] = _read_manifest(directory, desc)
    return out


def _layout_blob(directory: Path, desc: Mapping[str, object], *, load: bool) -> Blob:
    digest, media_type, size = desc["digest"], desc["mediaType"], desc["size"]
    if not (isinstance(digest, str) and isinstance(media_type, str) and isinstance(size, int)):
        raise ValueError(f"bad descriptor {desc!r}")
    path = directory / "blobs" / "sha256" / digest.removeprefix("sha256:")
    if path.stat().st_size != size:
        raise ValueError(f"blob {digest} has the wrong size")
    if load:
        return Blob(media_type, digest, size, data=path.read_bytes())
    return Blob(media_type, digest, size, path=path)


def _read_manifest(directory: Path, desc: Mapping[str, object]) -> Image | Index:
    blob = _layout_blob(directory, desc, load=True)
    body = json.loads(blob.read_bytes())
    if blob.media_type in INDEX_TYPES:
        images = [_read_manifest(directory, child) for child in body["manifests"]]
        return Index(blob, tuple(_as_image(image) for image in images))
    config = _layout_blob(directory, body["config"], load=True)
    cfg = json.loads(config.read_bytes())
    layer_blobs = [_layout_blob(directory, d, load=False) for d in body["layers"]]
    diff_ids = cfg["rootfs"]["diff_ids"]
    if len(diff_ids) != len(layer_blobs):
        raise ValueError(f"manifest {blob.digest}: layers and diff_ids differ in number")
    platform = Platform(cfg["architecture"], cfg["os"], cfg.get("variant"))
    layers = tuple(Layer(b, d) for b, d in zip(layer_blobs, diff_ids, strict=True))
    return Image(blob, config, layers, platform)
