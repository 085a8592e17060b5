"""Apply one OCI image layer (a tar changeset) onto a snapshot directory.

The layer is read once, as a stream: it is decompressed (gzip, zstd or none)
and fed to :mod:`tarfile` in stream mode (``"r|"``), so memory use does not
depend on the layer's size.  The daemon calls :func:`apply_layer` through
``trio.to_thread.run_sync``; nothing here is async.

Safety model: *nothing the layer says can touch anything outside ``dest``*.

- Member names are cleaned lexically: a leading ``/`` is dropped and ``..``
  is resolved; a name that climbs above the root is rejected.
- Every parent path is resolved by :class:`_Root`, component by component,
  with ``openat(O_NOFOLLOW)`` from a descriptor of ``dest``.  Symlinks met on
  the way are read and followed *in user space* as if ``dest`` were ``/``
  (chroot semantics, like containerd's ``fs.RootPath`` and
  ``openat2(RESOLVE_IN_ROOT)``), so the kernel never follows one for us.
- The last component is never followed: an existing entry is unlinked first
  and files are created with ``O_CREAT | O_EXCL | O_NOFOLLOW``, so a symlink
  planted by an earlier member is replaced, not written through.  Metadata
  calls use the descriptor or ``*at(..., AT_SYMLINK_NOFOLLOW)``.
- Hard-link targets are resolved the same way and must be regular files
  already in ``dest``.
- The uncompressed stream is counted; more than ``max_bytes`` is an error,
  which bounds decompression bombs; tar metadata records (PAX, GNU long
  names) are capped at 1 MiB each, like Go's ``archive/tar``.

Whiteouts follow the OCI image-spec, layer.md "Whiteouts": ``.wh.<name>``
hides ``<name>`` of lower layers and ``.wh..wh..opq`` hides all of a
directory's lower content.  For an overlayfs layer directory they become a
0/0 character device and the ``trusted.overlay.opaque=y`` xattr (kernel
Documentation/filesystems/overlayfs.rst, "whiteouts and opaque
directories"); when flattening into one rootfs they delete.  Either way they
also delete what ``dest`` already holds at that path, but never what this
same layer wrote (layer.md: "Whiteout files MUST only apply to resources in
lower/parent layers").
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import errno
import gzip
import hashlib
import math
import os
import re
import shutil
import stat
import tarfile
import zlib
from typing import IO, TYPE_CHECKING, Final, Protocol, cast

import zstandard

from pouch.errors import FailedPrecondition, InvalidArgument, ResourceExhausted

if TYPE_CHECKING:
    from collections.abc import Iterator, Mapping, Sequence
    from pathlib import Path
    from typing import Self

__all__ = [
    "ByteReader",
    "Compression",
    "LayerRejected",
    "LayerStats",
    "LayerTooLarge",
    "apply_layer",
    "compression_for_media_type",
]


class LayerRejected(InvalidArgument):
    """The layer is malformed or hostile; nothing outside ``dest`` was touched.

    Attributes:
        member: The tar member being applied, or ``None`` for stream-level
            problems (bad compression, truncated archive).
        reason: What is wrong, without the prefix.
    """

    def __init__(self, reason: str, *, member: str | None = None) -> None:
        self.reason = reason
        self.member = member
        where = f"layer member {member!r}" if member is not None else "layer"
        super().__init__(f"failed to apply {where}: {reason}")


class LayerTooLarge(LayerRejected):
    """The uncompressed layer exceeds ``max_bytes`` (a decompression bomb)."""


class ByteReader(Protocol):
    """A blocking byte source: a file, a ``BinaryIO`` or a digest-checking wrapper."""

    def read(self, size: int, /) -> bytes:
        """Return up to ``size`` bytes; ``b""`` only at end of stream."""
        ...


@dataclasses.dataclass(frozen=True, slots=True)
class LayerStats:
    """What :func:`apply_layer` did.

    Attributes:
        entries: Tar members processed, whiteouts included.
        bytes_written: Regular-file content written to ``dest``.
        uncompressed_bytes: Size of the decompressed tar stream (the bytes a
            ``diff_id`` digest covers).
        diff_id: ``sha256:<hex>`` of the decompressed tar stream, to check
            against the image config's ``rootfs.diff_ids``.
    """

    entries: int
    bytes_written: int
    uncompressed_bytes: int
    diff_id: str


class Compression(enum.Enum):
    """How a layer blob is compressed."""

    NONE = "none"
    GZIP = "gzip"
    ZSTD = "zstd"


# OCI image-spec media-types.md and the Docker image manifest v2.2 spec.
# "nondistributable" types are deprecated but still found in Windows images.
_MEDIA_TYPES: Final[Mapping[str, Compression]] = {
    "application/vnd.oci.image.layer.v1.tar": Compression.NONE,
    "application/vnd.oci.image.layer.v1.tar+gzip": Compression.GZIP,
    "application/vnd.oci.image.layer.v1.tar+zstd": Compression.ZSTD,
    "application/vnd.oci.image.layer.nondistributable.v1.tar": Compression.NONE,
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip": Compression.GZIP,
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd": Compression.ZSTD,
    "application/vnd.docker.image.rootfs.diff.tar": Compression.NONE,
    "application/vnd.docker.image.rootfs.diff.tar.gzip": Compression.GZIP,
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip": Compression.GZIP,
}

_GZIP_MAGIC: Final = b"\x1f\x8b"
_ZSTD_MAGIC: Final = b"\x28\xb5\x2f\xfd"
# Formats that are layer-shaped but unsupported, named in the error.
_OTHER_MAGIC: Final = ((b"BZh", "bzip2"), (b"\xfd7zXZ\x00", "xz"))
_SNIFF: Final = 6

_CHUNK: Final = 1 << 20
# Go archive/tar's maxSpecialFileSize: PAX records and GNU long names above
# this are refused before tarfile reads them into memory.
_MAX_META_SIZE: Final = 1 << 20
_META_TYPES: Final = frozenset(
    {tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE}
    | {tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK}
)
_PATH_MAX: Final = 4096
_MAX_SYMLINKS: Final = 40  # Linux MAXSYMLINKS

_WHITEOUT_PREFIX: Final = ".wh."
_OPAQUE_MARKER: Final = ".wh..wh..opq"
_OPAQUE_XATTR: Final = "trusted.overlay.opaque"
_PAX_XATTR: Final = "SCHILY.xattr."

_OPEN_DIR: Final = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_CREATE_FILE: Final = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC

# Failures of the host, not of the layer: re-raised unchanged so the edge
# logs them with a traceback instead of blaming the image.
_HOST_ERRNOS: Final = frozenset({errno.EIO, errno.EROFS, errno.ENOMEM, errno.EMFILE, errno.ENFILE})
_FULL_ERRNOS: Final = frozenset({errno.ENOSPC, errno.EDQUOT})
_UNSUPPORTED_ERRNOS: Final = frozenset({errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP})


def compression_for_media_type(media_type: str) -> Compression:
    """Return the compression a layer media type declares.

    Args:
        media_type: An OCI or Docker layer media type.

    Returns:
        The declared compression.

    Raises:
        LayerRejected: The media type is not a layer type pouch can apply
            (e.g. ``+encrypted``, ``+bzip2``, or not a layer at all).
    """
    try:
        return _MEDIA_TYPES[media_type]
    except KeyError:
        raise LayerRejected(f"unsupported layer media type {media_type!r}") from None


def apply_layer(
    stream: ByteReader,
    dest: Path,
    *,
    media_type: str | None = None,
    max_bytes: int,
    overlay_whiteouts: bool = True,
) -> LayerStats:
    """Apply one layer tar stream onto ``dest``.

    The compression is detected from the stream's first bytes, as containerd's
    ``compression.DecompressStream`` does; ``media_type``, when given, must be
    a supported layer type, but the bytes decide how to decode it, so a
    mislabelled layer (they exist) still applies.  The stream is read to its
    end, so a wrapper that verifies a digest sees every byte.

    Args:
        stream: The layer blob, compressed or not.
        dest: An existing directory: an overlayfs layer directory, or the
            rootfs being flattened.
        media_type: The descriptor's media type, if known.
        max_bytes: Limit on the uncompressed tar stream, in bytes.
        overlay_whiteouts: ``True`` to write overlayfs whiteouts (0/0 char
            devices, ``trusted.overlay.opaque``); ``False`` to delete instead
            (flattening several layers into a single directory).

    Returns:
        Counts of what was applied.

    Raises:
        LayerRejected: The layer is malformed or tries to escape ``dest``; the
            message names the member.  ``LayerTooLarge`` past ``max_bytes``.
        ResourceExhausted: The filesystem is full.
        FailedPrecondition: ``dest`` cannot be opened as a directory.
        OSError: The host failed (EIO, EROFS, out of descriptors).

    Cancellation:
        Not cancellable: under ``trio.to_thread.run_sync`` the call runs to
        completion.  After any exception ``dest`` holds part of the layer
        and must be discarded; nothing outside it was changed.
    """
    if max_bytes < 0:
        raise InvalidArgument(f"invalid max_bytes {max_bytes}: must not be negative")
    if media_type is not None:
        compression_for_media_type(media_type)
    try:
        root_fd = os.open(dest, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        raise FailedPrecondition(f"failed to open layer destination {str(dest)!r}: {e}") from e
    with contextlib.ExitStack() as stack:
        stack.callback(os.close, root_fd)
        reader = _LimitedReader(stack.enter_context(_decompressed(stream)), max_bytes)
        applier = _Applier(_Root(root_fd), overlay_whiteouts=overlay_whiteouts)
        current: str | None = None
        try:
            with tarfile.open(
                fileobj=reader,
                mode="r|",
                tarinfo=_TarInfo,
                encoding="utf-8",
                errors="surrogateescape",
            ) as tar:
                # tarfile keeps every TarInfo in ``members``, which would make
                # memory grow with the entry count; we never look back.
                seen: list[tarfile.TarInfo] = vars(tar)["members"]
                while (member := tar.next()) is not None:
                    seen.clear()
                    current = member.name
                    applier.apply(tar, member)
            reader.drain()
        except tarfile.TarError as e:
            raise LayerRejected(f"malformed tar stream: {e}", member=current) from e
        except _SourceFailed as e:
            raise e.error from None
        applier.finish()
    return LayerStats(
        entries=applier.entries,
        bytes_written=applier.bytes_written,
        uncompressed_bytes=reader.total,
        diff_id="sha256:" + reader.sha256.hexdigest(),
    )


# --------------------------------------------------------------------------
# Decompression and accounting


class _Prefixed:
    """``head`` followed by the rest of ``inner``: un-reads the sniffed bytes."""

    def __init__(self, head: bytes, inner: ByteReader) -> None:
        self._head = head
        self._inner = inner

    def read(self, size: int = -1, /) -> bytes:
        if size < 0:
            size = _CHUNK  # never "all of it": the layer may be gigabytes
        if self._head:
            data, self._head = self._head[:size], self._head[size:]
            return data
        return self._inner.read(size)

    def seek(self, offset: int, /) -> int:
        raise OSError(errno.ESPIPE, "layer stream is not seekable")


def _sniff(stream: ByteReader) -> bytes:
    head = b""
    while len(head) < _SNIFF:
        chunk = stream.read(_SNIFF - len(head))
        if not chunk:
            break
        head += chunk
    return head


@contextlib.contextmanager
def _decompressed(stream: ByteReader) -> Iterator[ByteReader]:
    head = _sniff(stream)
    source = _Prefixed(head, stream)
    if head.startswith(_GZIP_MAGIC):
        with gzip.GzipFile(fileobj=source, mode="rb") as gz:
            yield gz
    elif head.startswith(_ZSTD_MAGIC) or _is_zstd_skippable(head):
        # read_across_frames: a layer may be several concatenated frames
        # (zstd:chunked writes one per file); stream_reader only calls read().
        dctx = zstandard.ZstdDecompressor()
        with dctx.stream_reader(
            cast("IO[bytes]", source), read_across_frames=True, closefd=False
        ) as zst:
            yield zst
    else:
        for magic, name in _OTHER_MAGIC:
            if head.startswith(magic):
                raise LayerRejected(f"unsupported layer compression {name}")
        yield source


def _is_zstd_skippable(head: bytes) -> bool:
    # Skippable frames: magic 0x184D2A50..0x184D2A5F, little-endian (RFC 8878 3.1.2).
    return len(head) >= 4 and head[1:4] == b"\x2a\x4d\x18" and head[0] & 0xF0 == 0x50


class _SourceFailed(Exception):
    """Carries an ``OSError`` of the caller's stream out, unchanged."""

    def __init__(self, error: OSError) -> None:
        super().__init__(error)
        self.error = error


class _LimitedReader:
    """Counts the uncompressed bytes and stops past the limit.

    It also turns decompressor errors into :class:`LayerRejected`.  It sits
    below tarfile, so every byte tarfile consumes (headers, PAX records, file
    data, padding) is counted.
    """

    def __init__(self, inner: ByteReader, limit: int) -> None:
        self._inner = inner
        self._limit = limit
        self.total = 0
        self.sha256 = hashlib.sha256()

    def read(self, size: int = -1, /) -> bytes:
        if size < 0 or size > _CHUNK:
            size = _CHUNK
        try:
            data = self._inner.read(size)
        except (gzip.BadGzipFile, EOFError, zlib.error, zstandard.ZstdError) as e:
            raise LayerRejected(f"failed to decompress layer: {e}") from e
        except OSError as e:
            # The caller's stream failed (a reset download): not the layer's
            # fault, so it must not reach _fs_errors as an OSError.
            raise _SourceFailed(e) from e
        self.total += len(data)
        self.sha256.update(data)
        if self.total > self._limit:
            raise LayerTooLarge(f"uncompressed size exceeds the limit of {self._limit} bytes")
        return data

    def drain(self) -> None:
        """Read to the end: checks gzip's CRC and feeds digest wrappers."""
        while self.read(_CHUNK):
            pass

    # tarfile's stream mode wants a file object; it only reads.
    def write(self, data: bytes, /) -> int:
        raise OSError(errno.EBADF, "layer stream is read-only")

    def tell(self) -> int:
        return self.total

    def seek(self, offset: int, /) -> int:
        raise OSError(errno.ESPIPE, "layer stream is not seekable")

    def close(self) -> None:
        pass


class _TarInfo(tarfile.TarInfo):
    """Rejects damaged headers that tarfile would silently take as the end.

    tarfile ends iteration, without an error, on a truncated or corrupt
    header past the first member; Go's archive/tar (and so containerd)
    reports ``ErrUnexpectedEOF``/``ErrHeader``.
    """

    __slots__ = ()

    @classmethod
    def frombuf(cls, buf: bytes | bytearray, encoding: str, errors: str) -> Self:
        # An empty read is a clean end of stream; an all-zero block is the
        # end-of-archive marker.  Both are for tarfile to handle.
        if len(buf) == 0 or buf.count(0) == len(buf) == tarfile.BLOCKSIZE:
            return super().frombuf(buf, encoding, errors)
        if len(buf) != tarfile.BLOCKSIZE:
            raise LayerRejected("truncated tar stream")
        try:
            info = super().frombuf(buf, encoding, errors)
        except tarfile.HeaderError as e:
            raise LayerRejected(f"malformed tar header: {e}") from e
        if info.type in _META_TYPES and info.size > _MAX_META_SIZE:
            raise LayerRejected(
                f"tar metadata record of {info.size} bytes exceeds {_MAX_META_SIZE}",
                member=info.name,
            )
        return info


# --------------------------------------------------------------------------
# Resolution inside the root


@dataclasses.dataclass(slots=True)
class _Dir:
    """An open directory below the root and its symlink-free path."""

    fd: int
    path: tuple[str, ...]

    def close(self) -> None:
        os.close(self.fd)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _clean(name: str, *, member: str) -> list[str]:
    """Split a member name into components, resolving ``.`` and ``..`` lexically.

    Raises:
        LayerRejected: The name climbs above the root, holds NUL, or is
            longer than PATH_MAX.
    """
    if "\x00" in name:
        raise LayerRejected("path contains a NUL byte", member=member)
    if len(os.fsencode(name)) > _PATH_MAX:
        raise LayerRejected(f"path longer than {_PATH_MAX} bytes", member=member)
    parts: list[str] = []
    for comp in name.split("/"):  # leading "/" yields "": absolute becomes relative
        if comp in ("", "."):
            continue
        if comp == "..":
            if not parts:
                raise LayerRejected(f"path {name!r} climbs above the layer root", member=member)
            parts.pop()
        else:
            parts.append(comp)
    return parts


class _Root:
    """``dest`` as a descriptor, and path resolution with it as ``/``."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def reopen(self, path: Sequence[str]) -> int:
        """Open a symlink-free directory path found earlier; never follows."""
        fd = os.dup(self.fd)
        try:
            for comp in path:
                child = os.open(comp, _OPEN_DIR, dir_fd=fd)
                os.close(fd)
                fd = child
        except BaseException:
            os.close(fd)
            raise
        return fd

    def open_dir(self, parts: Sequence[str], *, member: str, create: bool) -> _Dir | None:
        """Open the directory ``parts`` names, following symlinks inside the root.

        A symlink's target is read and walked from the root (absolute) or
        from its directory (relative); ``..`` at the root stays at the root,
        as in a chroot.  Missing directories are created (mode 0755, like
        containerd's ``mkparent``) if ``create``; otherwise ``None`` is
        returned.

        Raises:
            LayerRejected: A component is not a directory, or there are
                more than 40 symlinks on the way.
        """
        todo = list(reversed(parts))
        names: list[str] = []
        fd = os.dup(self.fd)
        followed = 0
        try:
            while todo:
                comp = todo.pop()
                if comp in ("", "."):
                    continue
                if comp == "..":
                    if names:
                        names.pop()
                        os.close(fd)
                        fd = -1
                        fd = self.reopen(names)
                    continue
                try:
                    st = os.stat(comp, dir_fd=fd, follow_symlinks=False)
                except FileNotFoundError:
                    if not create:
                        return None
                    os.mkdir(comp, 0o700, dir_fd=fd)
                    child = os.open(comp, _OPEN_DIR, dir_fd=fd)
                    os.close(fd)
                    fd = child
                    names.append(comp)
                    os.fchmod(fd, 0o755)  # not subject to the umask
                    continue
                if stat.S_ISLNK(st.st_mode):
                    followed += 1
                    if followed > _MAX_SYMLINKS:
                        raise LayerRejected("too many levels of symbolic links", member=member)
                    target = os.readlink(comp, dir_fd=fd)
                    if target.startswith("/"):
                        names.clear()
                        os.close(fd)
                        fd = -1
                        fd = os.dup(self.fd)
                    todo.extend(reversed(target.split("/")))
                    continue
                if not stat.S_ISDIR(st.st_mode):
                    where = "/".join([*names, comp])
                    raise LayerRejected(f"parent {where!r} is not a directory", member=member)
                child = os.open(comp, _OPEN_DIR, dir_fd=fd)
                os.close(fd)
                fd = child
                names.append(comp)
            result = _Dir(fd, tuple(names))
            fd = -1
            return result
        finally:
            if fd >= 0:
                os.close(fd)

    def parent(self, parts: Sequence[str], *, member: str) -> _Dir:
        """Open (creating as needed) the directory ``parts`` names."""
        found = self.open_dir(parts, member=member, create=True)
        assert found is not None  # create=True never yields None
        return found


def _lstat(d: _Dir, name: str) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=d.fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def _remove(d: _Dir, name: str) -> None:
    """Delete ``name`` in ``d`` whatever it is; a symlink itself, never its target."""
    st = _lstat(d, name)
    if st is None:
        return
    if stat.S_ISDIR(st.st_mode):
        # The fd-based rmtree: it never follows symlinks (avoids_symlink_attacks).
        shutil.rmtree(name, dir_fd=d.fd)
    else:
        os.unlink(name, dir_fd=d.fd)


@contextlib.contextmanager
def _fs_errors(member: str) -> Iterator[None]:
    """Blame the layer for errors its content causes, the host for the rest."""
    try:
        yield
    except OSError as e:
        if e.errno in _FULL_ERRNOS:
            raise ResourceExhausted(f"failed to apply layer member {member!r}: {e.strerror}") from e
        if e.errno in _HOST_ERRNOS:
            raise
        reason = e.strerror or str(e)
        raise LayerRejected(reason, member=member) from e
    except (ValueError, OverflowError) as e:  # NUL in a name, absurd ids or times
        raise LayerRejected(str(e), member=member) from e


_INT64: Final = range(-(2**63), 2**63)
# PAX times are decimal seconds ("1700000000.123456789"); parsed exactly,
# since a float loses the nanoseconds.
_PAX_TIME: Final = re.compile(r"(-?)([0-9]{1,19})(?:\.([0-9]*))?")


def _time_ns(seconds: float, pax: str | None) -> int:
    """Nanoseconds for utimensat, from a PAX record if any, else the header.

    As containerd's ``boundTime``, a time the kernel cannot take becomes the
    epoch.
    """
    if pax is not None and (match := _PAX_TIME.fullmatch(pax)):
        sign, whole, frac = match.groups()
        ns = int(whole) * 1_000_000_000 + int((frac or "")[:9].ljust(9, "0"))
        ns = -ns if sign else ns
    elif isinstance(seconds, int):
        ns = seconds * 1_000_000_000
    elif math.isfinite(seconds):
        ns = round(seconds * 1_000_000_000)
    else:
        return 0
    return ns if ns in _INT64 else 0


def _times(member: tarfile.TarInfo) -> tuple[int, int]:
    """(atime, mtime) in ns; atime from PAX when present (and valid), else the mtime."""
    mtime = _time_ns(member.mtime, member.pax_headers.get("mtime"))
    atime = member.pax_headers.get("atime")
    return (mtime if atime is None else _time_ns(member.mtime, atime)), mtime


# --------------------------------------------------------------------------
# Applying members


class _Applier:
    """Applies members one by one; holds what the rules need to remember."""

    def __init__(self, root: _Root, *, overlay_whiteouts: bool) -> None:
        self._root = root
        self._overlay = overlay_whiteouts
        # Every path this layer wrote, and every ancestor of one: whiteouts
        # must leave them alone (layer.md "Whiteouts").
        self._written: set[str] = set()
        self._opaque_done: set[str] = set()
        # Directory times are set last: later members change them.
        self._dir_times: list[tuple[tuple[str, ...], int, int]] = []
        self.entries = 0
        self.bytes_written = 0

    def _record(self, path: tuple[str, ...]) -> None:
        for i in range(len(path), 0, -1):
            key = "/".join(path[:i])
            if key in self._written:
                break
            self._written.add(key)

    def apply(self, tar: tarfile.TarFile, member: tarfile.TarInfo) -> None:
        """Apply one member."""
        self.entries += 1
        name = member.name
        if member.issparse():
            raise LayerRejected("sparse files are not supported", member=name)
        parts = _clean(name, member=name)
        if not parts:
            if member.isdir():
                return  # "./": containerd ignores entries that resolve to the root
            raise LayerRejected("a non-directory cannot replace the layer root", member=name)
        if member.uid < 0 or member.gid < 0:
            raise LayerRejected(f"invalid owner {member.uid}:{member.gid}", member=name)
        *parent, base = parts
        if base.startswith(_WHITEOUT_PREFIX):
            with _fs_errors(name):
                self._whiteout(member, parent, base)
            return
        with _fs_errors(name), self._root.parent(parent, member=name) as d:
            path = (*d.path, base)
            if member.isreg():
                self._file(tar, member, d, base)
            elif member.isdir():
                self._directory(member, d, base)
            elif member.issym():
                self._symlink(member, d, base)
            elif member.islnk():
                self._hardlink(member, d, base)
            elif member.ischr() or member.isblk() or member.isfifo():
                self._special(member, d, base)
            else:
                raise LayerRejected(f"unsupported tar entry type {member.type!r}", member=name)
            self._record(path)

    def finish(self) -> None:
        """Set directory times, now that nothing will add to them."""
        for path, atime, mtime in self._dir_times:
            try:
                fd = self._root.reopen(path)
            except OSError as e:
                if e.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
                    continue  # replaced or deleted by a later member
                raise
            try:
                with _fs_errors("/".join(path)):
                    os.utime(fd, ns=(atime, mtime))
            finally:
                os.close(fd)

    # -- entry types -------------------------------------------------------

    def _file(self, tar: tarfile.TarFile, member: tarfile.TarInfo, d: _Dir, base: str) -> None:
        _remove(d, base)
        src = tar.extractfile(member)
        assert src is not None  # a regular member always has a reader
        fd = os.open(base, _CREATE_FILE, 0o600, dir_fd=d.fd)
        try:
            while chunk := src.read(_CHUNK):
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fd, view) :]
                self.bytes_written += len(chunk)
            # chown clears set-id bits and security.capability: chown, then
            # xattrs, then chmod (containerd's createTarFile order).
            os.fchown(fd, member.uid, member.gid)
            self._xattrs(fd, member, plain=True)
            os.fchmod(fd, member.mode & 0o7777)
            os.utime(fd, ns=_times(member))
        finally:
            os.close(fd)

    def _directory(self, member: tarfile.TarInfo, d: _Dir, base: str) -> None:
        st = _lstat(d, base)
        if st is None or not stat.S_ISDIR(st.st_mode):
            # A directory merges with a directory; anything else (a symlink
            # included) is replaced.
            _remove(d, base)
            os.mkdir(base, 0o700, dir_fd=d.fd)
        fd = os.open(base, _OPEN_DIR, dir_fd=d.fd)
        try:
            os.fchown(fd, member.uid, member.gid)
            self._xattrs(fd, member, plain=True)
            os.fchmod(fd, member.mode & 0o7777)
        finally:
            os.close(fd)
        self._dir_times.append(((*d.path, base), *_times(member)))

    def _symlink(self, member: tarfile.TarInfo, d: _Dir, base: str) -> None:
        _remove(d, base)
        # The target is stored as written, absolute or dangling: it is only
        # ever followed inside the container (or by _Root, inside dest).
        os.symlink(member.linkname, base, dir_fd=d.fd)
        os.chown(base, member.uid, member.gid, dir_fd=d.fd, follow_symlinks=False)
        self._xattrs(_proc_path(d, base), member, plain=False)
        os.utime(base, ns=_times(member), dir_fd=d.fd, follow_symlinks=False)

    def _hardlink(self, member: tarfile.TarInfo, d: _Dir, base: str) -> None:
        name = member.name
        target = _clean(member.linkname, member=name)
        if not target:
            raise LayerRejected("hard link to the layer root", member=name)
        *tparent, tbase = target
        found = self._root.open_dir(tparent, member=name, create=False)
        if found is None:
            raise LayerRejected(f"hard link target {member.linkname!r} does not exist", member=name)
        with found as td:
            tst = _lstat(td, tbase)
            if tst is None:
                raise LayerRejected(
                    f"hard link target {member.linkname!r} does not exist", member=name
                )
            if not stat.S_ISREG(tst.st_mode):
                raise LayerRejected(
                    f"hard link target {member.linkname!r} is not a regular file", member=name
                )
            st = _lstat(d, base)
            if st is not None and (st.st_dev, st.st_ino) == (tst.st_dev, tst.st_ino):
                return  # already that file
            _remove(d, base)
            # linkat without AT_SYMLINK_FOLLOW: links exactly what was checked.
            os.link(tbase, base, src_dir_fd=td.fd, dst_dir_fd=d.fd, follow_symlinks=False)

    def _special(self, member: tarfile.TarInfo, d: _Dir, base: str) -> None:
        _remove(d, base)
        if member.isfifo():
            os.mkfifo(base, 0o600, dir_fd=d.fd)
        else:
            kind = stat.S_IFCHR if member.ischr() else stat.S_IFBLK
            device = os.makedev(member.devmajor, member.devminor)
            os.mknod(base, kind | 0o600, device, dir_fd=d.fd)
        os.chown(base, member.uid, member.gid, dir_fd=d.fd, follow_symlinks=False)
        self._xattrs(_proc_path(d, base), member, plain=False)
        os.chmod(base, member.mode & 0o7777, dir_fd=d.fd, follow_symlinks=False)
        os.utime(base, ns=_times(member), dir_fd=d.fd, follow_symlinks=False)

    def _xattrs(self, target: int | str, member: tarfile.TarInfo, *, plain: bool) -> None:
        """Set ``SCHILY.xattr.*`` records on an fd or a no-follow path.

        ``plain`` is true for regular files and directories, the only
        inodes that take ``user.*`` attributes (xattr(7)).
        """
        for key, value in member.pax_headers.items():
            if not key.startswith(_PAX_XATTR):
                continue
            attr = key.removeprefix(_PAX_XATTR)
            if attr.startswith(("trusted.overlay.", "user.overlay.")):
                # overlayfs's own metadata (opaque, redirect, origin): a layer
                # says these with whiteouts; a forged redirect could expose
                # other paths of the lower layers.
                continue
            # PAX values decode as UTF-8 with surrogateescape: this restores
            # binary values such as security.capability byte for byte.
            raw = value.encode("utf-8", "surrogateescape")
            try:
                if isinstance(target, int):
                    os.setxattr(target, attr, raw)
                else:
                    os.setxattr(target, attr, raw, follow_symlinks=False)
            except OSError as e:
                if e.errno in _UNSUPPORTED_ERRNOS and attr.startswith(("security.", "trusted.")):
                    continue  # needs privileges or an LSM we lack; as containerd does
                if e.errno == errno.EPERM and attr.startswith("user.") and not plain:
                    continue  # the kernel refuses user.* on symlinks and devices
                raise

    # -- whiteouts ---------------------------------------------------------

    def _whiteout(self, member: tarfile.TarInfo, parent: list[str], base: str) -> None:
        name = member.name
        if base == _OPAQUE_MARKER:
            self._opaque(member, parent)
            return
        if base.startswith(_WHITEOUT_PREFIX + _WHITEOUT_PREFIX):
            # AUFS bookkeeping (.wh..wh.plnk, .wh..wh.aufs) is not part of the
            # OCI format and hides nothing; Docker skips it too.
            return
        victim = base.removeprefix(_WHITEOUT_PREFIX)
        if victim in ("", ".", ".."):
            raise LayerRejected(f"whiteout of {victim!r} is not allowed", member=name)
        found = self._root.open_dir(parent, member=name, create=self._overlay)
        if found is None:
            return  # flattening and the parent is gone: nothing to delete
        with found as d:
            path = (*d.path, victim)
            if "/".join(path) in self._written:
                return  # this layer wrote it: only lower layers are hidden
            _remove(d, victim)
            if self._overlay:
                os.mknod(victim, stat.S_IFCHR, os.makedev(0, 0), dir_fd=d.fd)
                os.chown(victim, member.uid, member.gid, dir_fd=d.fd, follow_symlinks=False)
                self._record(path)

    def _opaque(self, member: tarfile.TarInfo, parent: list[str]) -> None:
        found = self._root.open_dir(parent, member=member.name, create=self._overlay)
        if found is None:
            return
        with found as d:
            key = "/".join(d.path)
            if key in self._opaque_done:
                return
            self._opaque_done.add(key)
            if self._overlay:
                os.setxattr(d.fd, _OPAQUE_XATTR, b"y")
            self._clear(d)
            self._record(d.path)

    def _clear(self, top: _Dir) -> None:
        """Delete what ``top`` holds that this layer did not write."""
        pending = [top.path]
        while pending:
            path = pending.pop()
            with _Dir(self._root.reopen(path), path) as d:
                for child in os.listdir(d.fd):
                    child_path = (*path, child)
                    if "/".join(child_path) not in self._written:
                        _remove(d, child)
                        continue
                    st = _lstat(d, child)
                    if st is not None and stat.S_ISDIR(st.st_mode):
                        pending.append(child_path)  # written below: keep that, clear the rest


def _proc_path(d: _Dir, name: str) -> str:
    # For l*xattr on inodes we must not open (symlinks, devices): the parent
    # is pinned by its descriptor and the last component is not followed.
    return f"/proc/self/fd/{d.fd}/{name}"
