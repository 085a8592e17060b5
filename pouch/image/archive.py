"""Read image archives from disk: OCI image-layout tars and ``docker save`` tars.

``pouch load FILE`` brings images to nodes that cannot reach a registry.  Two
formats are understood, told apart by the files at the root of the tar:

* **OCI image layout** (image-spec ``image-layout.md``): ``oci-layout``,
  ``index.json`` and ``blobs/<alg>/<hex>``.  ``docker save`` since Docker 25
  writes one of these *and* a ``manifest.json``; the layout wins, as in
  containerd's importer (``images/archive/importer.go``).
* **docker save** (moby ``image/tarexport``, Docker 1.10 to 24):
  ``manifest.json`` lists ``{"Config", "RepoTags", "Layers"}`` per image, with
  layers stored as ``<v1 id>/layer.tar`` and configs as ``<hex>.json``.  These
  archives hold no manifest, so one is synthesised (OCI media types, canonical
  JSON), which needs the digest of every layer file: each is hashed once, as a
  stream, while the archive is opened.

The tar may be compressed with gzip, bzip2 or xz, as :mod:`tarfile`'s ``r:*``
allows.  The compression is sniffed here rather than left to ``r:*``, because
:meth:`Archive.open_blob` has to open the same decompressor again.

Nothing here verifies a digest: the caller verifies every blob while it
streams it into its content store.  What is checked is the shape of the
archive: member names (no absolute paths, no ``..``), blobs being regular
files of the size their descriptor states, and JSON documents being at most
:data:`MAX_JSON_SIZE` bytes.

The code is synchronous and does blocking I/O: the daemon calls it through
``trio.to_thread.run_sync``.  After construction an :class:`Archive` is
read-only, and every stream :meth:`Archive.open_blob` returns reads with
``pread`` from its own duplicate of the file descriptor, so streams can be
read from several threads at once and outlive :meth:`Archive.close`.
"""

from __future__ import annotations

import bz2
import contextlib
import gzip
import hashlib
import io
import json
import lzma
import os
import posixpath
import stat
import tarfile
import zlib
from typing import TYPE_CHECKING, Any, Final, Literal

import attrs

from pouch.errors import InvalidArgument, NotFound
from pouch.image import media
from pouch.image.reference import parse_reference

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Iterator, Sequence
    from pathlib import Path
    from types import TracebackType
    from typing import BinaryIO, Self

    from _typeshed import WriteableBuffer

__all__ = [
    "ANNOTATION_IMAGE_NAME",
    "ANNOTATION_REF_NAME",
    "MAX_JSON_SIZE",
    "Archive",
    "ArchiveImage",
]

#: containerd's annotation for the full image name of an index entry.
ANNOTATION_IMAGE_NAME: Final = "io.containerd.image.name"
#: image-spec annotations.md: the ref (usually just a tag) of an index entry.
ANNOTATION_REF_NAME: Final = "org.opencontainers.image.ref.name"

#: Largest JSON document (index, manifest, config, manifest.json) read into memory.
MAX_JSON_SIZE: Final = 16 << 20
# All JSON documents of one archive together: a tar of many 16 MiB manifests
# must not take the daemon's memory.  Real archives hold a few KiB per image.
_MAX_JSON_TOTAL: Final = 256 << 20
# A docker save writes four members per layer; an OCI layout one per blob.
# Every member's header stays in memory while the archive is open.
_MAX_MEMBERS: Final = 100_000
# docker save links a layer shared by two images to the first copy
# (tarexport/save.go); one hop is all it makes, a few are tolerated.
_MAX_SYMLINK_HOPS: Final = 8
# An index naming an index naming a manifest is what a multi-platform image
# looks like; deeper nesting is allowed up to here.
_MAX_INDEX_DEPTH: Final = 4
_CHUNK: Final = 1 << 20

_OCI_LAYOUT_FILE: Final = "oci-layout"
_OCI_INDEX_FILE: Final = "index.json"
_OCI_LAYOUT_VERSION: Final = "1.0.0"
_DOCKER_MANIFEST_FILE: Final = "manifest.json"
_DOCKER_REPOSITORIES_FILE: Final = "repositories"

# GNU sparse members (and PAX ones, which tarfile marks with ``sparse``) store
# less data than their size says: they cannot be streamed as a byte range.
_REGULAR_TYPES: Final = frozenset({tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE})

_Compression = Literal["gzip", "bzip2", "xz"]
_ARCHIVE_MAGIC: Final[tuple[tuple[bytes, _Compression], ...]] = (
    (b"\x1f\x8b", "gzip"),
    (b"BZh", "bzip2"),
    (b"\xfd7zXZ\x00", "xz"),
)
_ZSTD_MAGIC: Final = b"\x28\xb5\x2f\xfd"
_DECOMPRESSORS: Final[dict[_Compression, Callable[[io.BufferedReader], io.BufferedIOBase]]] = {
    "gzip": lambda raw: gzip.GzipFile(fileobj=raw, mode="rb"),
    "bzip2": bz2.BZ2File,
    "xz": lzma.LZMAFile,
}
# What reading a damaged compressed stream raises (gzip.BadGzipFile and bz2's
# errors are OSErrors; a truncated stream is an EOFError).
_READ_ERRORS: Final = (OSError, EOFError, zlib.error, lzma.LZMAError)


@attrs.frozen
class ArchiveImage:
    """One image of an archive.

    Attributes:
        names: Normalised references (``docker.io/library/busybox:latest``),
            possibly none.  OCI layouts name an image by the annotation
            ``io.containerd.image.name`` or else ``org.opencontainers.image.ref.name``
            if that is a full reference and not a bare tag (containerd's
            ``imageName`` and ``refTranslator``); docker save by ``RepoTags``.
        manifest: The image manifest, resolved to one platform.
        manifest_bytes: The manifest as stored (OCI), or as synthesised
            (docker save: canonical JSON).  Not checked against ``manifest_digest``.
        manifest_digest: The manifest's digest.
        index_digest: The digest of the index the name points to, when it
            points to one (a multi-platform image); else ``None``.
    """

    names: tuple[str, ...]
    manifest: media.Manifest
    manifest_bytes: bytes
    manifest_digest: str
    index_digest: str | None = None


class Archive:
    """An image archive on disk, indexed and ready to stream blobs from.

    Args:
        path: The tar, possibly compressed.
        platform: The platform a multi-platform image resolves to; the host's
            by default.

    Raises:
        InvalidArgument: The file cannot be opened, is not a tar, has a member
            with an absolute or ``..`` name, is neither an OCI image layout nor
            a docker save archive, or is malformed (bad JSON, a missing or
            non-regular blob, a document over :data:`MAX_JSON_SIZE`).  The
            message names the archive and the member.

    Attributes:
        path: The archive's path.
        images: Every image of the archive, in the archive's order.
    """

    def __init__(self, path: Path, *, platform: media.Platform | None = None) -> None:
        self.path = path
        self.images: list[ArchiveImage] = []
        self._platform = platform if platform is not None else media.Platform.host()
        self._json_read = 0
        # OCI: blobs are found by name (blobs/<alg>/<hex>).  docker save: by the
        # digest each file hashed to, plus the synthesised manifests' bytes.
        self._blobs: dict[str, tarfile.TarInfo] = {}
        self._docs: dict[str, bytes] = {}
        self._oci = False
        with contextlib.ExitStack() as undo:
            self._source = _Source(path, self._label)
            undo.callback(self._source.close)
            self._members = self._index_members()
            if _OCI_LAYOUT_FILE in self._members:
                self._oci = True
                self.images = self._read_oci_layout()
            elif _DOCKER_MANIFEST_FILE in self._members:
                self.images = self._read_docker_save()
            elif _DOCKER_REPOSITORIES_FILE in self._members:
                raise self._error(
                    "is a docker save archive without manifest.json (Docker before 1.10),"
                    " which is not supported"
                )
            else:
                raise self._error(
                    "is neither an OCI image layout nor a docker save archive"
                    f" (no {_OCI_LAYOUT_FILE} or {_DOCKER_MANIFEST_FILE} at its root)"
                )
            undo.pop_all()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the archive.  Streams from :meth:`open_blob` stay readable."""
        self._source.close()

    def open_blob(self, digest: str) -> BinaryIO:
        """Open a stream of one blob's bytes, read from the archive as it is consumed.

        For a docker save archive the blobs are the layer and config files and
        the synthesised manifests.  The caller closes the stream.  On a
        compressed archive each call decompresses the archive from its start
        up to the blob.

        Raises:
            InvalidArgument: ``digest`` is malformed; reading later raises it
                for a truncated or corrupt archive.
            NotFound: The archive has no such blob.
        """
        doc, info = self._find_blob(digest)
        if doc is not None:
            return io.BytesIO(doc)
        assert info is not None
        return self._source.open_member(info)

    def blob_size(self, digest: str) -> int:
        """The size in bytes of a blob of the archive.

        Raises:
            InvalidArgument: ``digest`` is malformed.
            NotFound: The archive has no such blob.
        """
        doc, info = self._find_blob(digest)
        if doc is not None:
            return len(doc)
        assert info is not None
        return info.size

    # ---- helpers ------------------------------------------------------------------

    @property
    def _label(self) -> str:
        return f"archive {self.path}"

    def _error(self, message: str) -> InvalidArgument:
        return InvalidArgument(f"{self._label} {message}")

    def _member_error(self, message: str) -> InvalidArgument:
        return InvalidArgument(f"{self._label}: {message}")

    def _find_blob(self, digest: str) -> tuple[bytes | None, tarfile.TarInfo | None]:
        media.check_digest(digest, what="blob digest")
        if (doc := self._docs.get(digest)) is not None:
            return doc, None
        if self._oci:
            name = _blob_name(digest)
            if name in self._members:
                return None, self._regular(name, f"blob {digest}")
        elif (info := self._blobs.get(digest)) is not None:
            return None, info
        raise NotFound(f"{self._label} has no blob {digest}")

    def _index_members(self) -> dict[str, tarfile.TarInfo]:
        """Read every tar header once; map cleaned member names to their headers."""
        members: dict[str, tarfile.TarInfo] = {}
        stream = self._source.open_stream()
        try:
            # "r:" on the already-decompressed stream: tarfile only seeks forward.
            with tarfile.open(fileobj=stream, mode="r:") as tar:
                count = 0
                while (info := tar.next()) is not None:
                    count += 1
                    if count > _MAX_MEMBERS:
                        raise self._error(f"has more than {_MAX_MEMBERS} members")
                    name = self._clean_member_name(info.name)
                    if info.isdir() or not name:  # "./" is the root itself
                        continue
                    if name in members:
                        # tar semantics say the last copy wins; an image archive
                        # never has two, and which one a reader sees is ambiguous.
                        raise self._member_error(f"member {name!r} appears more than once")
                    members[name] = info
        except tarfile.TarError as exc:
            raise self._member_error(f"cannot read the tar: {exc}") from exc
        except _READ_ERRORS as exc:
            raise self._member_error(f"cannot read the archive: {exc}") from exc
        finally:
            stream.close()
        return members

    def _clean_member_name(self, raw: str) -> str:
        # Archives made with "tar -C dir ." name members "./index.json".
        if raw.startswith("/"):
            raise self._member_error(f"member {raw!r} has an absolute name")
        parts = [part for part in raw.split("/") if part not in ("", ".")]
        if ".." in parts:
            raise self._member_error(f"member {raw!r} has a '..' component")
        return "/".join(parts)

    def _regular(self, name: str, what: str) -> tarfile.TarInfo:
        """The header of member *name*, which must exist and be a regular file."""
        info = self._members.get(name)
        if info is None:
            raise self._member_error(f"{what} ({name!r}) is missing")
        if info.type not in _REGULAR_TYPES or info.sparse is not None:
            raise self._member_error(f"{what} ({name!r}) is not a regular file")
        return info

    def _read_json(self, infos: Sequence[tarfile.TarInfo]) -> dict[str, bytes]:
        """Read small documents, keyed by member name, in one pass over the archive."""
        for info in infos:
            name = self._clean_member_name(info.name)
            if info.size > MAX_JSON_SIZE:
                raise self._member_error(
                    f"{name!r} is {info.size} bytes, more than the {MAX_JSON_SIZE} allowed"
                    " for a JSON document"
                )
            self._json_read += info.size
            if self._json_read > _MAX_JSON_TOTAL:
                raise self._error(f"holds more than {_MAX_JSON_TOTAL} bytes of JSON documents")
        out: dict[str, bytes] = {}
        for info, stream in self._source.scan(infos):
            out[self._clean_member_name(info.name)] = stream.read()
        return out

    def _load_json(self, data: bytes, what: str) -> Any:
        try:
            return json.loads(data)
        except (ValueError, UnicodeDecodeError) as exc:
            raise self._member_error(f"{what} is not valid JSON: {exc}") from exc

    # ---- OCI image layout ---------------------------------------------------------

    def _read_oci_layout(self) -> list[ArchiveImage]:
        layout_info = self._regular(_OCI_LAYOUT_FILE, _OCI_LAYOUT_FILE)
        if _OCI_INDEX_FILE not in self._members:
            raise self._member_error(f"has an {_OCI_LAYOUT_FILE} file but no {_OCI_INDEX_FILE}")
        index_info = self._regular(_OCI_INDEX_FILE, _OCI_INDEX_FILE)
        docs = self._read_json([layout_info, index_info])

        layout = self._load_json(docs[_OCI_LAYOUT_FILE], _OCI_LAYOUT_FILE)
        version = layout.get("imageLayoutVersion") if isinstance(layout, dict) else None
        if version != _OCI_LAYOUT_VERSION:
            # image-layout.md: the only version there is; containerd refuses others.
            raise self._member_error(
                f"{_OCI_LAYOUT_FILE}: unsupported imageLayoutVersion {version!r}"
                f" (want {_OCI_LAYOUT_VERSION!r})"
            )
        try:
            index = media.parse_index(docs[_OCI_INDEX_FILE], media.OCI_INDEX)
        except InvalidArgument as exc:
            raise self._member_error(f"{_OCI_INDEX_FILE}: {exc}") from exc

        entries = [
            _OciEntry(self._oci_names(i, desc), desc) for i, desc in enumerate(index.manifests)
        ]
        self._resolve_oci(entries)
        images: list[ArchiveImage] = []
        for entry in entries:
            assert entry.manifest is not None
            assert entry.manifest_bytes is not None
            self._check_oci_blobs(entry.manifest, entry.target.digest)
            images.append(
                ArchiveImage(
                    names=entry.names,
                    manifest=entry.manifest,
                    manifest_bytes=entry.manifest_bytes,
                    manifest_digest=entry.target.digest,
                    index_digest=entry.index_digest,
                )
            )
        return _merge(images)

    def _oci_names(self, position: int, desc: media.Descriptor) -> tuple[str, ...]:
        """An index.json entry's name, by containerd's rules (client/import.go, imageName)."""
        annotations = dict(desc.annotations)
        full = annotations.get(ANNOTATION_IMAGE_NAME)
        if full:
            try:
                return (str(parse_reference(full)),)
            except InvalidArgument as exc:
                raise self._member_error(
                    f"{_OCI_INDEX_FILE} entry {position}: {ANNOTATION_IMAGE_NAME}: {exc}"
                ) from exc
        ref = annotations.get(ANNOTATION_REF_NAME)
        # archive/reference.go, refTranslator: a ref with none of "/:@" is a bare
        # tag, which names nothing without a base name; pouch has none to add.
        # Any other ref is a full reference if it parses as one; OCI allows refs
        # that do not (image-spec annotations.md), and those name nothing either.
        if ref and any(c in ref for c in "/:@"):
            with contextlib.suppress(InvalidArgument):
                return (str(parse_reference(ref)),)
        return ()

    def _resolve_oci(self, entries: Sequence[_OciEntry]) -> None:
        """Read each entry's target, following indexes to this platform's manifest.

        One pass over the archive per level of nesting, not one per document.
        """
        pending = list(entries)
        while pending:
            wanted = {entry.target.digest: entry.target for entry in pending}
            infos = [self._blob_info(desc) for desc in wanted.values()]
            by_name = self._read_json(infos)
            docs = {digest: by_name[_blob_name(digest)] for digest in wanted}
            still: list[_OciEntry] = []
            for entry in pending:
                desc = entry.target
                data = docs[desc.digest]
                where = f"{_blob_name(desc.digest)} ({desc.media_type})"
                try:
                    if desc.media_type in media.INDEX_TYPES:
                        nested = media.parse_index(data, desc.media_type)
                        entry.index_digest = entry.index_digest or desc.digest
                        entry.target = media.select_platform(nested, self._platform)
                        entry.depth += 1
                        if entry.depth > _MAX_INDEX_DEPTH:
                            raise InvalidArgument(
                                f"indexes are nested more than {_MAX_INDEX_DEPTH} deep"
                            )
                        still.append(entry)
                    elif desc.media_type in media.MANIFEST_TYPES:
                        entry.manifest = media.parse_manifest(data, desc.media_type)
                        entry.manifest_bytes = data
                    else:
                        raise InvalidArgument(
                            "unsupported media type: want an image manifest or index"
                        )
                except InvalidArgument as exc:
                    raise self._member_error(f"{where}: {exc}") from exc
            pending = still

    def _blob_info(self, desc: media.Descriptor, listed_by: str = "") -> tarfile.TarInfo:
        """The member holding *desc*'s blob; it must be regular and of the stated size."""
        name = _blob_name(desc.digest)
        what = f"{listed_by} blob {desc.digest}" if listed_by else f"blob {desc.digest}"
        info = self._regular(name, what)
        if info.size != desc.size:
            raise self._member_error(
                f"{what} ({name!r}) is {info.size} bytes, but its descriptor says {desc.size}"
            )
        return info

    def _check_oci_blobs(self, manifest: media.Manifest, manifest_digest: str) -> None:
        # Only presence, type and size: the caller hashes the blobs as it copies them.
        self._blob_info(manifest.config, f"manifest {manifest_digest}: config")
        for i, layer in enumerate(manifest.layers):
            self._blob_info(layer, f"manifest {manifest_digest}: layer {i}")

    # ---- docker save --------------------------------------------------------------

    def _read_docker_save(self) -> list[ArchiveImage]:
        manifest_info = self._regular(_DOCKER_MANIFEST_FILE, _DOCKER_MANIFEST_FILE)
        docs = self._read_json([manifest_info])
        entries = self._parse_docker_manifest(docs[_DOCKER_MANIFEST_FILE])
        repositories: dict[str, tuple[str, ...]] = {}
        # moby's loader ignores "repositories" when there is a manifest.json;
        # it is read only to name images that have no RepoTags.
        if _DOCKER_REPOSITORIES_FILE in self._members and not all(e.names for e in entries):
            info = self._regular(_DOCKER_REPOSITORIES_FILE, _DOCKER_REPOSITORIES_FILE)
            docs = self._read_json([info])
            repositories = self._parse_repositories(docs[_DOCKER_REPOSITORIES_FILE])

        # Resolve every file first, then hash them all in one pass over the archive.
        resolved: list[tuple[_DockerEntry, tarfile.TarInfo, list[tarfile.TarInfo]]] = []
        for entry in entries:
            resolved.append(
                (
                    entry,
                    self._resolve_docker(entry.config, "config"),
                    [self._resolve_docker(layer, "layer") for layer in entry.layers],
                )
            )
        configs = {id(config): config for _, config, _ in resolved}
        files = {id(info): info for _, _, infos in resolved for info in infos}
        files.update(configs)
        hashed = self._hash_files(list(files.values()), json_ids=set(configs))

        images: list[ArchiveImage] = []
        for entry, config_info, layer_infos in resolved:
            config_digest, _ = hashed[id(config_info)]
            config = media.Descriptor(media.OCI_CONFIG, config_digest, config_info.size)
            layers: list[media.Descriptor] = []
            for name, info in zip(entry.layers, layer_infos, strict=True):
                digest, media_type = hashed[id(info)]
                if media_type is None:
                    raise self._member_error(
                        f"{_DOCKER_MANIFEST_FILE} lists layer {name!r}, which is compressed"
                        " with bzip2 or xz: OCI layers cannot be"
                    )
                layers.append(media.Descriptor(media_type, digest, info.size))
            self._blobs.setdefault(config_digest, config_info)
            for desc, info in zip(layers, layer_infos, strict=True):
                self._blobs.setdefault(desc.digest, info)
            manifest = media.Manifest(media.OCI_MANIFEST, config, tuple(layers))
            data = _canonical_manifest(manifest)
            digest = media.sha256_digest(data)
            self._docs[digest] = data
            names = entry.names
            if not names and entry.layers:
                # Old archives also name images in "repositories", by the v1 id of
                # the top layer: the directory of the last layer.tar.
                names = repositories.get(posixpath.dirname(entry.layers[-1]), ())
            images.append(ArchiveImage(names, manifest, data, digest))
        return _merge(images)

    def _parse_docker_manifest(self, data: bytes) -> list[_DockerEntry]:
        what = _DOCKER_MANIFEST_FILE
        doc = self._load_json(data, what)
        if not isinstance(doc, list):
            raise self._member_error(f"{what} is not a JSON list")
        entries: list[_DockerEntry] = []
        for i, item in enumerate(doc):
            where = f"{what} entry {i}"
            if not isinstance(item, dict):
                raise self._member_error(f"{where} is not a JSON object")
            config = item.get("Config")
            if not isinstance(config, str) or not config:
                raise self._member_error(f"{where}: 'Config' must be a file name")
            layers = item.get("Layers")
            if not isinstance(layers, list) or not all(isinstance(x, str) for x in layers):
                raise self._member_error(f"{where}: 'Layers' must be a list of file names")
            tags = item.get("RepoTags") or []
            if not isinstance(tags, list) or not all(isinstance(x, str) for x in tags):
                raise self._member_error(f"{where}: 'RepoTags' must be a list of strings")
            names: list[str] = []
            for tag in tags:
                try:
                    names.append(str(parse_reference(tag)))
                except InvalidArgument as exc:
                    raise self._member_error(f"{where}: RepoTags: {exc}") from exc
            entries.append(_DockerEntry(_dedupe(names), config, tuple(layers)))
        return entries

    def _parse_repositories(self, data: bytes) -> dict[str, tuple[str, ...]]:
        """Map v1 layer ids to names from a ``repositories`` file: {repo: {tag: id}}."""
        what = _DOCKER_REPOSITORIES_FILE
        doc = self._load_json(data, what)
        if not isinstance(doc, dict):
            raise self._member_error(f"{what} is not a JSON object")
        out: dict[str, list[str]] = {}
        for repo, tags in doc.items():
            if not isinstance(tags, dict):
                raise self._member_error(f"{what}: {repo!r} must map tags to layer ids")
            for tag, layer_id in tags.items():
                if not isinstance(layer_id, str):
                    raise self._member_error(f"{what}: {repo}:{tag} must map to a layer id")
                try:
                    name = str(parse_reference(f"{repo}:{tag}"))
                except InvalidArgument as exc:
                    raise self._member_error(f"{what}: {exc}") from exc
                out.setdefault(layer_id, []).append(name)
        return {layer_id: _dedupe(names) for layer_id, names in out.items()}

    def _resolve_docker(self, listed: str, kind: str) -> tarfile.TarInfo:
        """The regular member a manifest.json file name stands for, through symlinks.

        docker save stores a layer that two images share once and makes the
        second ``<id>/layer.tar`` a relative symlink to it (tarexport/save.go);
        containerd's importer resolves those too.
        """
        prefix = f"{_DOCKER_MANIFEST_FILE} lists {kind} {listed!r}"
        if listed.startswith("/") or ".." in listed.split("/"):
            raise self._member_error(f"{prefix}, which is outside the archive")
        name = "/".join(part for part in listed.split("/") if part not in ("", "."))
        for _ in range(_MAX_SYMLINK_HOPS):
            info = self._members.get(name)
            if info is None:
                via = f" (through a symlink to {name!r})" if name != listed else ""
                raise self._member_error(f"{prefix} which is missing{via}")
            if not info.issym():
                if info.type not in _REGULAR_TYPES or info.sparse is not None:
                    raise self._member_error(f"{prefix}, which is not a regular file")
                return info
            target = _join_inside(posixpath.dirname(name), info.linkname)
            if target is None:
                raise self._member_error(
                    f"{prefix}, a symlink to {info.linkname!r} outside the archive"
                )
            name = target
        raise self._member_error(f"{prefix}, which is a chain of too many symlinks")

    def _hash_files(
        self, infos: Sequence[tarfile.TarInfo], *, json_ids: set[int]
    ) -> dict[int, tuple[str, str | None]]:
        """Digest and layer media type of each member, keyed by ``id(info)``.

        One streaming pass: bounded memory whatever the layers' size.  Members
        whose id is in *json_ids* are configs: they must be JSON objects.  The
        media type is ``None`` for a layer compressed in a way OCI cannot say.
        """
        for info in infos:
            if id(info) in json_ids and info.size > MAX_JSON_SIZE:
                raise self._member_error(
                    f"config {info.name!r} is {info.size} bytes, more than the"
                    f" {MAX_JSON_SIZE} allowed for a JSON document"
                )
        out: dict[int, tuple[str, str | None]] = {}
        for info, stream in self._source.scan(infos):
            if id(info) in json_ids:
                data = stream.read()
                doc = self._load_json(data, f"config {info.name!r}")
                if not isinstance(doc, dict):
                    raise self._member_error(f"config {info.name!r} is not a JSON object")
                out[id(info)] = (media.sha256_digest(data), _layer_media_type(data[:8]))
                continue
            digest = hashlib.sha256()
            head = stream.read(_CHUNK)
            chunk = head
            while chunk:
                digest.update(chunk)
                chunk = stream.read(_CHUNK)
            out[id(info)] = ("sha256:" + digest.hexdigest(), _layer_media_type(head))
        return out


@attrs.define
class _OciEntry:
    """One entry of index.json while its target is being resolved."""

    names: tuple[str, ...]
    target: media.Descriptor  # what is read next: an index, then a manifest
    index_digest: str | None = None
    depth: int = 0
    manifest: media.Manifest | None = None
    manifest_bytes: bytes | None = None


@attrs.frozen
class _DockerEntry:
    """One entry of a docker save manifest.json, with file names as listed."""

    names: tuple[str, ...]
    config: str
    layers: tuple[str, ...]


def _blob_name(digest: str) -> str:
    # image-layout.md "blobs": blobs/<alg>/<encoded>.  The digest was checked
    # (media.check_digest), so it holds no '/' or '..'.
    algorithm, _, encoded = digest.partition(":")
    return f"blobs/{algorithm}/{encoded}"


def _join_inside(directory: str, link: str) -> str | None:
    """Resolve a relative symlink target against *directory*; ``None`` if it leaves the root."""
    if link.startswith("/"):
        return None
    parts = [part for part in directory.split("/") if part]
    for part in link.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if not parts:
                return None
            parts.pop()
        else:
            parts.append(part)
    return "/".join(parts)


def _layer_media_type(head: bytes) -> str | None:
    """The OCI media type of a docker save layer file, from its first bytes."""
    if head.startswith(b"\x1f\x8b"):
        return media.OCI_LAYER_GZIP
    if head.startswith(_ZSTD_MAGIC):
        return media.OCI_LAYER_ZSTD
    if any(head.startswith(magic) for magic, kind in _ARCHIVE_MAGIC if kind != "gzip"):
        return None
    return media.OCI_LAYER


def _canonical_manifest(manifest: media.Manifest) -> bytes:
    doc = {
        "schemaVersion": 2,
        "mediaType": manifest.media_type,
        "config": manifest.config.to_json(),
        "layers": [layer.to_json() for layer in manifest.layers],
    }
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def _dedupe(names: Iterable[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(names))


def _merge(images: Sequence[ArchiveImage]) -> list[ArchiveImage]:
    """Fold entries for the same target into one image carrying all their names.

    ``docker save a:1 a:2`` of one image writes two index.json entries.
    """
    merged: dict[tuple[str, str | None], ArchiveImage] = {}
    for image in images:
        key = (image.manifest_digest, image.index_digest)
        if (seen := merged.get(key)) is None:
            merged[key] = image
        else:
            merged[key] = attrs.evolve(seen, names=_dedupe((*seen.names, *image.names)))
    return list(merged.values())


# ---- reading the file ---------------------------------------------------------------


class _Source:
    """The archive file: one descriptor, from which independent readers are made."""

    def __init__(self, path: Path, label: str) -> None:
        self._label = label
        try:
            self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise InvalidArgument(f"cannot open {label}: {exc.strerror}") from exc
        self._closed = False
        try:
            st = os.fstat(self._fd)
            if not stat.S_ISREG(st.st_mode):
                raise InvalidArgument(f"{label} is not a regular file")
            self._size = st.st_size
            self.compression = self._sniff(os.pread(self._fd, 8, 0))
        except BaseException:
            self.close()
            raise

    def _sniff(self, head: bytes) -> _Compression | None:
        for magic, kind in _ARCHIVE_MAGIC:
            if head.startswith(magic):
                return kind
        if head.startswith(_ZSTD_MAGIC):
            # tarfile cannot read these (Python 3.14 adds it); say so plainly.
            raise InvalidArgument(
                f"{self._label} is compressed with zstd, which is not supported:"
                " decompress it first"
            )
        return None

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            os.close(self._fd)

    def _range(self, start: int, end: int, what: str) -> io.BufferedReader:
        raw = _FileRange(os.dup(self._fd), start, end, f"{self._label}: {what}")
        return io.BufferedReader(raw, _CHUNK)

    def open_stream(self) -> io.BufferedIOBase:
        """The whole tar, decompressed, from its start; closing it frees everything."""
        raw = self._range(0, self._size, "the archive")
        if self.compression is None:
            return raw
        return _Decompressed(raw, self.compression)

    def open_member(self, info: tarfile.TarInfo) -> io.BufferedReader:
        """An independent stream of one member's data."""
        what = f"member {info.name!r}"
        if self.compression is None:
            return self._range(info.offset_data, info.offset_data + info.size, what)
        stream = self.open_stream()
        try:
            _skip(stream, info.offset_data, f"{self._label}: {what}")
        except BaseException:
            stream.close()
            raise
        return io.BufferedReader(_Member(stream, info.size, f"{self._label}: {what}", owned=True))

    def scan(
        self, infos: Iterable[tarfile.TarInfo]
    ) -> Iterator[tuple[tarfile.TarInfo, io.BufferedIOBase]]:
        """Yield a stream of each member's data, in archive order, in one pass.

        Each stream is valid until the next one is yielded.  A compressed
        archive is decompressed once, up to the last member wanted.
        """
        ordered = sorted({info.offset_data: info for info in infos}.values(), key=_offset)
        if self.compression is None:
            for info in ordered:
                with self.open_member(info) as member:
                    yield info, member
            return
        with self.open_stream() as stream:
            for info in ordered:
                what = f"{self._label}: member {info.name!r}"
                _skip(stream, info.offset_data - stream.tell(), what)
                yield info, io.BufferedReader(_Member(stream, info.size, what, owned=False))


def _offset(info: tarfile.TarInfo) -> int:
    return info.offset_data


def _skip(stream: io.BufferedIOBase, count: int, what: str) -> None:
    """Read and drop *count* bytes: a decompressing stream cannot seek cheaply."""
    while count > 0:
        try:
            data = stream.read(min(count, _CHUNK))
        except _READ_ERRORS as exc:
            raise InvalidArgument(f"{what}: cannot read the archive: {exc}") from exc
        if not data:
            raise InvalidArgument(f"{what} is truncated")
        count -= len(data)


class _FileRange(io.RawIOBase):
    """Bytes ``[start, end)`` of a file, read with ``pread`` from a private position.

    ``pread`` leaves the descriptor's offset alone, so any number of readers,
    in any threads, share one file without disturbing each other.  Each owns
    (and closes) its own duplicate descriptor.
    """

    def __init__(self, fd: int, start: int, end: int, what: str) -> None:
        super().__init__()
        self._fd = fd
        self._start = start
        self._length = end - start
        self._pos = 0
        self._what = what

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._pos, os.SEEK_END: self._length}[whence]
        if base + offset < 0:
            raise ValueError("negative seek position")
        self._pos = base + offset
        return self._pos

    def readinto(self, buffer: WriteableBuffer, /) -> int:
        with memoryview(buffer) as view, view.cast("B") as out:
            return self._readinto(out)

    def _readinto(self, out: memoryview) -> int:
        want = min(len(out), self._length - self._pos)
        if want <= 0:
            return 0
        try:
            data = os.pread(self._fd, want, self._start + self._pos)
        except OSError as exc:
            raise InvalidArgument(f"{self._what}: cannot read: {exc.strerror}") from exc
        if not data:
            # The tar header promised more: the file was cut short (or shrank).
            raise InvalidArgument(f"{self._what} is truncated")
        out[: len(data)] = data
        self._pos += len(data)
        return len(data)

    def close(self) -> None:
        if not self.closed:
            os.close(self._fd)
        super().close()


class _Decompressed(io.BufferedIOBase):
    """A decompressing reader that also closes the file it reads.

    ``GzipFile(fileobj=...)`` and its bz2 and xz siblings leave a file object
    they were handed open; this pairs them so one ``close()`` frees both.
    """

    def __init__(self, raw: io.BufferedReader, compression: _Compression) -> None:
        super().__init__()
        self._raw = raw
        self._stream = _DECOMPRESSORS[compression](raw)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def read(self, size: int | None = -1, /) -> bytes:
        return self._stream.read(size)

    def read1(self, size: int = -1, /) -> bytes:
        return self._stream.read1(size)

    def tell(self) -> int:
        return self._stream.tell()

    def seek(self, offset: int, whence: int = os.SEEK_SET, /) -> int:
        # Forward only in practice (tarfile's reads); backwards rewinds and
        # decompresses again, which the compression modules do themselves.
        return self._stream.seek(offset, whence)

    def close(self) -> None:
        try:
            self._stream.close()
        finally:
            self._raw.close()
            super().close()


class _Member(io.RawIOBase):
    """Exactly *size* bytes of *inner* from its current position: one member's data."""

    def __init__(self, inner: io.BufferedIOBase, size: int, what: str, *, owned: bool) -> None:
        super().__init__()
        self._inner = inner
        self._remaining = size
        self._what = what
        self._owned = owned

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: WriteableBuffer, /) -> int:
        with memoryview(buffer) as view, view.cast("B") as out:
            return self._readinto(out)

    def _readinto(self, out: memoryview) -> int:
        want = min(len(out), self._remaining)
        if want <= 0:
            return 0
        try:
            data = self._inner.read(want)
        except _READ_ERRORS as exc:
            raise InvalidArgument(f"{self._what}: cannot read the archive: {exc}") from exc
        if not data:
            raise InvalidArgument(f"{self._what} is truncated")
        out[: len(data)] = data
        self._remaining -= len(data)
        return len(data)

    def close(self) -> None:
        if not self.closed and self._owned:
            self._inner.close()
        super().close()
