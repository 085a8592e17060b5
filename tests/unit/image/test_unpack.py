"""Tests for pouch.image.unpack: layer application, whiteouts and escapes.

Every layer is built here, in memory, with :mod:`tarfile`.  Hostile layers
run against a ``dest`` that sits inside a sentinel tree; each of those tests
checks that the tree outside ``dest`` is byte-for-byte and inode-for-inode
unchanged, besides checking the error or where the write went.

These tests chown, mknod and set ``trusted.*`` xattrs: they need root (CI
runs them as root).
"""

from __future__ import annotations

import dataclasses
import errno
import gzip
import hashlib
import io
import os
import stat
import subprocess
import sys
import tarfile
import textwrap
import uuid
from pathlib import Path

import pytest
import zstandard

import pouch
from pouch.errors import FailedPrecondition, InvalidArgument
from pouch.image.unpack import (
    Compression,
    LayerRejected,
    LayerStats,
    LayerTooLarge,
    apply_layer,
    compression_for_media_type,
)

pytestmark = pytest.mark.root

MTIME = 1_600_000_000
LIMIT = 64 << 20


@pytest.fixture(autouse=True)
def _need_root() -> None:
    # A missing prerequisite is a setup failure, not a skip (STYLE.md 7).
    if os.geteuid() != 0:
        pytest.fail("tests/unit/image/test_unpack.py needs root (chown, mknod, trusted.* xattrs)")


# --------------------------------------------------------------------------
# Building layers


@dataclasses.dataclass
class Entry:
    info: tarfile.TarInfo
    data: bytes = b""


def _info(
    name: str, kind: bytes, *, mode: int, uid: int, gid: int, mtime: float
) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = mode
    info.uid = uid
    info.gid = gid
    info.mtime = mtime
    return info


def reg(
    name: str,
    data: bytes = b"",
    *,
    mode: int = 0o644,
    uid: int = 0,
    gid: int = 0,
    mtime: float = MTIME,
    xattrs: dict[str, str] | None = None,
) -> Entry:
    info = _info(name, tarfile.REGTYPE, mode=mode, uid=uid, gid=gid, mtime=mtime)
    info.size = len(data)
    if xattrs:
        info.pax_headers = {f"SCHILY.xattr.{k}": v for k, v in xattrs.items()}
    return Entry(info, data)


def dir_(
    name: str,
    *,
    mode: int = 0o755,
    uid: int = 0,
    gid: int = 0,
    mtime: float = MTIME,
    xattrs: dict[str, str] | None = None,
) -> Entry:
    info = _info(name, tarfile.DIRTYPE, mode=mode, uid=uid, gid=gid, mtime=mtime)
    if xattrs:
        info.pax_headers = {f"SCHILY.xattr.{k}": v for k, v in xattrs.items()}
    return Entry(info)


def sym(name: str, target: str, *, uid: int = 0, gid: int = 0, mtime: float = MTIME) -> Entry:
    info = _info(name, tarfile.SYMTYPE, mode=0o777, uid=uid, gid=gid, mtime=mtime)
    info.linkname = target
    return Entry(info)


def hard(name: str, target: str) -> Entry:
    info = _info(name, tarfile.LNKTYPE, mode=0o644, uid=0, gid=0, mtime=MTIME)
    info.linkname = target
    return Entry(info)


def dev(name: str, kind: bytes, major: int = 0, minor: int = 0, *, mode: int = 0o600) -> Entry:
    info = _info(name, kind, mode=mode, uid=0, gid=0, mtime=MTIME)
    info.devmajor = major
    info.devminor = minor
    return Entry(info)


def whiteout(name: str) -> Entry:
    return reg(name, mode=0o600)


def tar_bytes(*entries: Entry, fmt: int = tarfile.PAX_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for entry in entries:
            tar.addfile(entry.info, io.BytesIO(entry.data) if entry.info.isreg() else None)
    return buf.getvalue()


def gz(data: bytes) -> bytes:
    return gzip.compress(data, mtime=0)


def zst(data: bytes) -> bytes:
    return zstandard.ZstdCompressor().compress(data)


def apply(dest: Path, *entries: Entry, overlay: bool = True) -> LayerStats:
    raw = tar_bytes(*entries)
    return apply_layer(io.BytesIO(raw), dest, max_bytes=LIMIT, overlay_whiteouts=overlay)


# --------------------------------------------------------------------------
# The sentinel tree


@dataclasses.dataclass
class Box:
    """tmp_path with sentinels where a naive unpacker would land; dest inside."""

    top: Path
    dest: Path
    before: dict[str, tuple[object, ...]]

    def assert_untouched(self) -> None:
        assert snapshot(self.top, self.dest) == self.before


def snapshot(top: Path, skip: Path) -> dict[str, tuple[object, ...]]:
    """Everything observable about the tree under ``top``, except ``skip``."""
    state: dict[str, tuple[object, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(top):
        here = Path(dirpath)
        dirnames[:] = [d for d in dirnames if here / d != skip]
        for name in [".", *dirnames, *filenames]:
            path = here / name
            st = path.lstat()
            facts: tuple[object, ...] = (
                stat.S_IFMT(st.st_mode),
                stat.S_IMODE(st.st_mode),
                st.st_uid,
                st.st_gid,
                st.st_ino,
                st.st_nlink,
                st.st_size,
                st.st_mtime_ns,
                sorted(os.listxattr(path, follow_symlinks=False)),
            )
            if stat.S_ISREG(st.st_mode):
                facts += (hashlib.sha256(path.read_bytes()).hexdigest(),)
            elif stat.S_ISLNK(st.st_mode):
                facts += (os.readlink(path),)
            elif stat.S_ISDIR(st.st_mode):
                facts += (sorted(os.listdir(path)),)
            state[str(path.relative_to(top))] = facts
    return state


@pytest.fixture
def box(tmp_path: Path) -> Box:
    """Layout (``dest`` is two levels down, so ``../..`` lands on sentinels)::

    tmp_path/etc/x, etc/passwd      where ../../etc/x lands from dest
    tmp_path/outside-target         a symlink-swap target
    tmp_path/dir/file
    tmp_path/jail/outside           where ../outside lands from dest
    tmp_path/jail/dest/             dest
    """
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "x").write_bytes(b"sentinel x\n")
    (tmp_path / "etc" / "passwd").write_bytes(b"root:x:0:0::/root:/bin/sh\n")
    (tmp_path / "outside-target").write_bytes(b"do not write me\n")
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "file").write_bytes(b"keep\n")
    (tmp_path / "jail").mkdir()
    (tmp_path / "jail" / "outside").write_bytes(b"jail sentinel\n")
    dest = tmp_path / "jail" / "dest"
    dest.mkdir()
    return Box(tmp_path, dest, snapshot(tmp_path, dest))


def unique() -> str:
    return f"pouch-unpack-test-{uuid.uuid4().hex}"


def lmode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


# --------------------------------------------------------------------------
# Hostile layers: escapes by name


@pytest.mark.parametrize("name", ["../../etc/x", "../outside", "a/../../outside", "./../x"])
def test_dotdot_name_is_rejected(box: Box, name: str) -> None:
    with pytest.raises(LayerRejected, match="climbs above") as info:
        apply(box.dest, reg(name, b"pwned\n"))
    assert info.value.member == name
    assert name in str(info.value)
    box.assert_untouched()


def test_dotdot_inside_dest_is_resolved_lexically(box: Box) -> None:
    apply(box.dest, reg("a/../b", b"ok\n"))
    assert (box.dest / "b").read_bytes() == b"ok\n"
    assert not (box.dest / "a").exists()
    box.assert_untouched()


def test_absolute_name_lands_inside_dest(box: Box) -> None:
    name = unique()
    apply(box.dest, reg(f"/etc/{name}", b"contained\n"), reg("//etc/x", b"also\n"))
    assert not Path("/etc", name).exists()
    assert (box.dest / "etc" / name).read_bytes() == b"contained\n"
    assert (box.dest / "etc" / "x").read_bytes() == b"also\n"
    box.assert_untouched()


def test_leading_dot_slash_names(box: Box) -> None:
    apply(box.dest, dir_("./"), dir_("./etc/"), reg("./etc/hosts", b"127.0.0.1\n"))
    assert (box.dest / "etc" / "hosts").read_bytes() == b"127.0.0.1\n"


# --------------------------------------------------------------------------
# Hostile layers: escapes through symlinks in a parent path


def test_symlink_to_host_etc_then_file_below(box: Box) -> None:
    name = unique()
    apply(box.dest, sym("a", "/etc"), reg(f"a/{name}", b"contained\n"))
    assert not Path("/etc", name).exists()
    assert (box.dest / "etc" / name).read_bytes() == b"contained\n"
    assert os.readlink(box.dest / "a") == "/etc"  # the symlink itself is kept as written
    box.assert_untouched()


def test_symlink_to_absolute_sentinel_then_overwrite(box: Box) -> None:
    # A naive unpacker overwrites tmp_path/etc/passwd.
    target = str(box.top / "etc")
    apply(box.dest, sym("a", target), reg("a/passwd", b"pwned\n"))
    inside = box.dest / target.lstrip("/") / "passwd"
    assert inside.read_bytes() == b"pwned\n"
    box.assert_untouched()


def test_symlink_climbing_out_then_file_below(box: Box) -> None:
    # dest/a -> ../../.. would be tmp_path's parent; chroot semantics keep it at dest.
    name = unique()
    apply(box.dest, sym("a", "../../.."), reg(f"a/{name}", b"contained\n"))
    assert not (box.top.parent / name).exists()
    assert (box.dest / name).read_bytes() == b"contained\n"
    box.assert_untouched()


def test_relative_symlink_to_sentinel_then_overwrite(box: Box) -> None:
    apply(box.dest, sym("a", "../.."), reg("a/etc/x", b"pwned\n"))
    assert (box.dest / "etc" / "x").read_bytes() == b"pwned\n"
    box.assert_untouched()


def test_symlink_chain_and_dotdot_inside_target(box: Box) -> None:
    # b -> a/../../.. and a -> sub: every hop is clamped at dest.
    apply(
        box.dest,
        dir_("sub/"),
        sym("a", "sub"),
        sym("b", "a/../../../etc"),
        reg("b/x", b"contained\n"),
    )
    assert (box.dest / "etc" / "x").read_bytes() == b"contained\n"
    box.assert_untouched()


def test_symlink_loop_is_rejected(box: Box) -> None:
    with pytest.raises(LayerRejected, match="symbolic links") as info:
        apply(box.dest, sym("a", "b"), sym("b", "a"), reg("a/x", b"x"))
    assert info.value.member == "a/x"
    box.assert_untouched()


def test_parent_that_is_a_file_is_rejected(box: Box) -> None:
    with pytest.raises(LayerRejected, match="not a directory"):
        apply(box.dest, reg("f", b"1"), reg("f/x", b"2"))
    box.assert_untouched()


# --------------------------------------------------------------------------
# Hostile layers: the last component


def test_symlink_swap_file_is_replaced_not_written_through(box: Box) -> None:
    target = box.top / "outside-target"
    apply(box.dest, reg("x", b"one\n"), sym("x", str(target)), reg("x", b"two\n", mode=0o666))
    x = box.dest / "x"
    assert stat.S_ISREG(x.lstat().st_mode)
    assert x.read_bytes() == b"two\n"
    assert lmode(x) == 0o666
    box.assert_untouched()


def test_symlink_swap_relative_target(box: Box) -> None:
    apply(box.dest, sym("x", "../../outside-target"), reg("x", b"two\n"))
    assert (box.dest / "x").read_bytes() == b"two\n"
    box.assert_untouched()


def test_directory_entry_replaces_symlink_and_metadata_never_follows(box: Box) -> None:
    # A naive unpacker would chmod/chown tmp_path/dir through the symlink.
    apply(
        box.dest,
        sym("d", str(box.top / "dir")),
        dir_("d/", mode=0o777, uid=1000, gid=1000),
        reg("d/file", b"pwned\n"),
    )
    d = box.dest / "d"
    assert stat.S_ISDIR(d.lstat().st_mode)
    assert (d.lstat().st_uid, lmode(d)) == (1000, 0o777)
    assert (d / "file").read_bytes() == b"pwned\n"
    box.assert_untouched()


@pytest.mark.parametrize(
    "entry",
    [
        dev("x", tarfile.CHRTYPE, 1, 3, mode=0o666),
        dev("x", tarfile.FIFOTYPE, mode=0o666),
        hard("x", "f"),
        sym("x", "elsewhere"),
    ],
    ids=["chr", "fifo", "hardlink", "symlink"],
)
def test_any_entry_replaces_planted_symlink(box: Box, entry: Entry) -> None:
    apply(box.dest, reg("f", b"f\n"), sym("x", str(box.top / "outside-target")), entry)
    assert not stat.S_ISLNK((box.dest / "x").lstat().st_mode) or entry.info.issym()
    if entry.info.issym():
        assert os.readlink(box.dest / "x") == "elsewhere"
    box.assert_untouched()


# --------------------------------------------------------------------------
# Hostile layers: hard links


def test_hardlink_to_host_etc_passwd_is_rejected(box: Box) -> None:
    host = os.stat("/etc/passwd")
    with pytest.raises(LayerRejected, match="does not exist") as info:
        apply(box.dest, hard("x", "/etc/passwd"))
    assert info.value.member == "x"
    assert not (box.dest / "x").exists()
    assert os.stat("/etc/passwd").st_nlink == host.st_nlink
    box.assert_untouched()


def test_hardlink_absolute_name_resolves_inside_dest(box: Box) -> None:
    apply(box.dest, reg("etc/passwd", b"inside\n"), hard("x", "/etc/passwd"))
    x, inner = (box.dest / "x").stat(), (box.dest / "etc" / "passwd").stat()
    assert (x.st_dev, x.st_ino) == (inner.st_dev, inner.st_ino)
    assert x.st_ino != os.stat("/etc/passwd").st_ino
    box.assert_untouched()


def test_hardlink_dotdot_is_rejected(box: Box) -> None:
    with pytest.raises(LayerRejected, match="climbs above"):
        apply(box.dest, hard("x", "../outside"))
    box.assert_untouched()


def test_hardlink_through_symlinked_parent_is_rejected(box: Box) -> None:
    with pytest.raises(LayerRejected, match="does not exist"):
        apply(box.dest, sym("a", str(box.top)), hard("x", "a/outside-target"))
    box.assert_untouched()


def test_hardlink_through_relative_symlink_stays_inside(box: Box) -> None:
    with pytest.raises(LayerRejected, match="does not exist"):
        apply(box.dest, sym("a", "../.."), hard("x", "a/etc/passwd"))
    box.assert_untouched()


def test_hardlink_to_symlink_is_rejected(box: Box) -> None:
    # linkat(AT_SYMLINK_FOLLOW) would link the host's file itself.
    with pytest.raises(LayerRejected, match="not a regular file"):
        apply(box.dest, sym("s", str(box.top / "outside-target")), hard("x", "s"))
    box.assert_untouched()


def test_hardlink_to_directory_is_rejected(box: Box) -> None:
    with pytest.raises(LayerRejected, match="not a regular file"):
        apply(box.dest, dir_("d/"), hard("x", "d"))


def test_hardlink_to_itself_is_a_no_op(box: Box) -> None:
    apply(box.dest, reg("f", b"f\n"), hard("f", "f"))
    assert (box.dest / "f").read_bytes() == b"f\n"


# --------------------------------------------------------------------------
# Hostile layers: whiteouts


@pytest.mark.parametrize("overlay", [True, False])
@pytest.mark.parametrize("name", [".wh...", ".wh..", ".wh.", "sub/.wh...", "sub/.wh."])
def test_whiteout_of_dot_names_is_rejected(box: Box, name: str, overlay: bool) -> None:
    (box.dest / "sub").mkdir()
    (box.dest / "sub" / "keep").write_bytes(b"keep")
    with pytest.raises(LayerRejected, match="whiteout of") as info:
        apply(box.dest, whiteout(name), overlay=overlay)
    assert info.value.member == name
    assert (box.dest / "sub" / "keep").read_bytes() == b"keep"
    box.assert_untouched()


@pytest.mark.parametrize("overlay", [True, False])
def test_whiteout_climbing_out_is_rejected(box: Box, overlay: bool) -> None:
    with pytest.raises(LayerRejected, match="climbs above"):
        apply(box.dest, whiteout("../.wh.outside"), overlay=overlay)
    box.assert_untouched()


@pytest.mark.parametrize("overlay", [True, False])
def test_whiteout_through_symlink_stays_inside(box: Box, overlay: bool) -> None:
    # A naive unpacker deletes tmp_path/jail/outside and tmp_path/dir.
    apply(
        box.dest,
        sym("a", ".."),
        whiteout("a/.wh.outside"),
        sym("b", str(box.top)),
        whiteout("b/.wh.dir"),
        overlay=overlay,
    )
    inner = box.dest / box.top.relative_to("/") / "dir"
    if overlay:
        assert stat.S_ISCHR((box.dest / "outside").lstat().st_mode)
        assert stat.S_ISCHR(inner.lstat().st_mode)
    else:
        assert not (box.dest / "outside").exists()
        assert not inner.parent.exists()
    box.assert_untouched()


@pytest.mark.parametrize("overlay", [True, False])
def test_opaque_through_symlink_stays_inside(box: Box, overlay: bool) -> None:
    (box.dest / "old").write_bytes(b"lower\n")
    apply(box.dest, sym("a", "../.."), whiteout("a/.wh..wh..opq"), overlay=overlay)
    assert not (box.dest / "old").exists()  # dest's root was made opaque, not tmp_path
    assert (box.dest / "a").is_symlink()  # written by this layer: kept
    if overlay:
        assert os.getxattr(box.dest, "trusted.overlay.opaque") == b"y"
    box.assert_untouched()


# --------------------------------------------------------------------------
# Hostile layers: size


@pytest.mark.parametrize("compress", [gz, zst], ids=["gzip", "zstd"])
def test_bomb_of_zeros_is_bounded(box: Box, compress: object) -> None:
    assert callable(compress)
    blob = compress(bytes(16 << 20))
    assert len(blob) < (1 << 20)
    with pytest.raises(LayerTooLarge, match="exceeds the limit"):
        apply_layer(io.BytesIO(blob), box.dest, max_bytes=4 << 20)
    box.assert_untouched()


def test_bomb_in_one_file_is_bounded_and_rejected_early(box: Box) -> None:
    blob = gz(tar_bytes(reg("big", bytes(32 << 20))))
    with pytest.raises(LayerTooLarge) as info:
        apply_layer(io.BytesIO(blob), box.dest, max_bytes=8 << 20)
    assert isinstance(info.value, InvalidArgument)
    # Stopped while writing, not after: at most the limit reached the disk.
    assert (box.dest / "big").stat().st_size <= 8 << 20
    box.assert_untouched()


def test_limit_is_inclusive(box: Box) -> None:
    raw = tar_bytes(reg("f", b"x" * 5000))
    stats = apply_layer(io.BytesIO(raw), box.dest, max_bytes=len(raw))
    assert stats.uncompressed_bytes == len(raw)
    with pytest.raises(LayerTooLarge):
        apply_layer(io.BytesIO(raw), box.dest, max_bytes=len(raw) - 1)


def test_huge_pax_record_is_refused_before_buffering(box: Box) -> None:
    entry = reg("f", b"x")
    entry.info.pax_headers = {"comment": "y" * (2 << 20)}
    with pytest.raises(LayerRejected, match="metadata record"):
        apply(box.dest, entry)
    assert not (box.dest / "f").exists()


# --------------------------------------------------------------------------
# Malformed streams


def test_truncated_header_is_rejected(box: Box) -> None:
    raw = tar_bytes(reg("a", b"a" * 600), reg("b", b"b"))
    cut = raw[: 512 + 1024 + 100]  # a's header and data, then part of b's header
    with pytest.raises(LayerRejected, match="truncated tar stream"):
        apply_layer(io.BytesIO(cut), box.dest, max_bytes=LIMIT)


def test_missing_end_of_archive_marker_is_accepted(tmp_path: Path) -> None:
    # Go's archive/tar takes a clean EOF at a header boundary as the end.
    raw = tar_bytes(reg("a", b"a" * 600))
    apply_layer(io.BytesIO(raw[: 512 + 1024]), tmp_path, max_bytes=LIMIT)
    assert (tmp_path / "a").read_bytes() == b"a" * 600


def test_truncated_data_is_rejected(box: Box) -> None:
    raw = tar_bytes(reg("a", b"a" * 5000))
    with pytest.raises(LayerRejected, match="malformed tar stream") as info:
        apply_layer(io.BytesIO(raw[:2048]), box.dest, max_bytes=LIMIT)
    assert info.value.member == "a"


def test_corrupt_header_mid_archive_is_rejected(box: Box) -> None:
    raw = bytearray(tar_bytes(reg("a", b"a"), reg("b", b"b")))
    raw[1024 + 148] ^= 0x01  # b's header checksum
    with pytest.raises(LayerRejected, match="malformed tar header"):
        apply_layer(io.BytesIO(bytes(raw)), box.dest, max_bytes=LIMIT)


def test_corrupt_gzip_is_rejected(box: Box) -> None:
    blob = bytearray(gz(tar_bytes(reg("a", os.urandom(4096)))))
    blob[-6] ^= 0xFF  # inside the CRC32 trailer
    with pytest.raises(LayerRejected, match="decompress"):
        apply_layer(io.BytesIO(bytes(blob)), box.dest, max_bytes=LIMIT)


def test_truncated_zstd_is_rejected(box: Box) -> None:
    blob = zst(tar_bytes(reg("a", os.urandom(4096))))
    with pytest.raises(LayerRejected):
        apply_layer(io.BytesIO(blob[:-10]), box.dest, max_bytes=LIMIT)


@pytest.mark.parametrize(
    ("blob", "match"),
    [
        (b"", "malformed tar stream"),
        (b"not a tar at all" * 64, "malformed tar"),
        (b"BZh91AY&SY" + bytes(100), "bzip2"),
        (b"\xfd7zXZ\x00" + bytes(100), "xz"),
    ],
    ids=["empty", "garbage", "bzip2", "xz"],
)
def test_unreadable_streams_are_rejected(box: Box, blob: bytes, match: str) -> None:
    with pytest.raises(LayerRejected, match=match):
        apply_layer(io.BytesIO(blob), box.dest, max_bytes=LIMIT)
    assert os.listdir(box.dest) == []


def test_sparse_member_is_rejected(box: Box) -> None:
    entry = reg("s", b"")
    entry.info.type = tarfile.GNUTYPE_SPARSE
    with pytest.raises(LayerRejected, match="sparse") as info:
        apply(box.dest, entry)
    assert info.value.member == "s"


@pytest.mark.parametrize("kind", [b"V", b"M", b"Z"])
def test_unknown_entry_type_is_rejected(box: Box, kind: bytes) -> None:
    entry = reg("u", b"")
    entry.info.type = kind
    with pytest.raises(LayerRejected, match="unsupported tar entry type"):
        apply(box.dest, entry)


def test_non_directory_at_root_is_rejected(box: Box) -> None:
    with pytest.raises(LayerRejected, match="layer root"):
        apply(box.dest, reg("./", b""))


def test_negative_owner_is_rejected(box: Box) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        info = tarfile.TarInfo("f")
        info.uid = -5  # GNU base-256 allows negatives
        tar.addfile(info, io.BytesIO())
    with pytest.raises(LayerRejected, match="invalid owner"):
        apply_layer(io.BytesIO(buf.getvalue()), box.dest, max_bytes=LIMIT)


def test_missing_dest_is_a_precondition_failure(tmp_path: Path) -> None:
    with pytest.raises(FailedPrecondition, match="failed to open layer destination"):
        apply_layer(io.BytesIO(tar_bytes()), tmp_path / "nope", max_bytes=LIMIT)


def test_source_errors_propagate_unchanged(box: Box) -> None:
    class Broken(io.RawIOBase):
        def __init__(self, data: bytes) -> None:
            self._data = io.BytesIO(data)

        def readable(self) -> bool:
            return True

        def read(self, size: int = -1, /) -> bytes:
            chunk = self._data.read(size)
            if not chunk:
                raise ConnectionResetError(errno.ECONNRESET, "reset by peer")
            return chunk

    raw = tar_bytes(reg("a", b"a" * 100_000))[:50_000]
    with pytest.raises(ConnectionResetError):
        apply_layer(Broken(raw), box.dest, max_bytes=LIMIT)


# --------------------------------------------------------------------------
# Media types and compression


@pytest.mark.parametrize(
    ("compress", "media_type"),
    [
        (lambda b: b, None),
        (gz, None),
        (zst, None),
        (lambda b: b, "application/vnd.oci.image.layer.v1.tar"),
        (gz, "application/vnd.oci.image.layer.v1.tar+gzip"),
        (zst, "application/vnd.oci.image.layer.v1.tar+zstd"),
        (gz, "application/vnd.docker.image.rootfs.diff.tar.gzip"),
    ],
    ids=["plain", "gzip", "zstd", "oci-tar", "oci-gzip", "oci-zstd", "docker-gzip"],
)
def test_compressions(tmp_path: Path, compress: object, media_type: str | None) -> None:
    assert callable(compress)
    payload = os.urandom(300_000)
    raw = tar_bytes(dir_("d/"), reg("d/f", payload))
    stats = apply_layer(io.BytesIO(compress(raw)), tmp_path, media_type=media_type, max_bytes=LIMIT)
    assert (tmp_path / "d" / "f").read_bytes() == payload
    assert stats == LayerStats(
        entries=2,
        bytes_written=len(payload),
        uncompressed_bytes=len(raw),
        diff_id="sha256:" + hashlib.sha256(raw).hexdigest(),
    )


def test_zstd_multiple_frames(tmp_path: Path) -> None:
    raw = tar_bytes(reg("a", b"a" * 10_000), reg("b", b"b" * 10_000))
    half = 512 * 3  # a's header and data
    blob = zst(raw[:half]) + zst(raw[half:])
    apply_layer(io.BytesIO(blob), tmp_path, max_bytes=LIMIT)
    assert (tmp_path / "b").read_bytes() == b"b" * 10_000


def test_zstd_starting_with_a_skippable_frame(tmp_path: Path) -> None:
    skippable = (0x184D2A5A).to_bytes(4, "little") + (3).to_bytes(4, "little") + b"abc"
    blob = skippable + zst(tar_bytes(reg("a", b"a")))
    apply_layer(io.BytesIO(blob), tmp_path, max_bytes=LIMIT)
    assert (tmp_path / "a").read_bytes() == b"a"


def test_gzip_multiple_members(tmp_path: Path) -> None:
    raw = tar_bytes(reg("a", b"a" * 10_000), reg("b", b"b" * 10_000))
    blob = gz(raw[:4096]) + gz(raw[4096:])
    apply_layer(io.BytesIO(blob), tmp_path, max_bytes=LIMIT)
    assert (tmp_path / "b").read_bytes() == b"b" * 10_000


def test_stream_is_read_to_the_end(tmp_path: Path) -> None:
    blob = io.BytesIO(gz(tar_bytes(reg("a", b"a")) + bytes(50_000)))
    apply_layer(blob, tmp_path, max_bytes=LIMIT)
    assert blob.read() == b""


@pytest.mark.parametrize(
    "media_type",
    [
        "application/vnd.oci.image.layer.v1.tar+encrypted",
        "application/vnd.oci.image.layer.v1.tar+bzip2",
        "application/vnd.oci.image.config.v1+json",
    ],
)
def test_unsupported_media_types_are_rejected(tmp_path: Path, media_type: str) -> None:
    with pytest.raises(LayerRejected, match="unsupported layer media type"):
        apply_layer(io.BytesIO(tar_bytes(reg("f"))), tmp_path, media_type=media_type, max_bytes=1)
    assert not (tmp_path / "f").exists()


def test_compression_for_media_type() -> None:
    assert compression_for_media_type("application/vnd.oci.image.layer.v1.tar") is Compression.NONE
    assert (
        compression_for_media_type("application/vnd.docker.image.rootfs.diff.tar.gzip")
        is Compression.GZIP
    )
    assert (
        compression_for_media_type("application/vnd.oci.image.layer.v1.tar+zstd")
        is Compression.ZSTD
    )


# --------------------------------------------------------------------------
# Entry types and metadata


def test_regular_file_metadata(tmp_path: Path) -> None:
    apply(
        tmp_path,
        reg("bin/su", b"#!/bin/sh\n", mode=0o4755, uid=1000, gid=1000, mtime=1_234_567_890),
        reg("plain", b"p", mode=0o640, uid=0, gid=1000, mtime=1_000_000_000),
    )
    st = (tmp_path / "bin" / "su").lstat()
    # setuid survives: chmod comes after chown, which would clear it
    assert stat.S_IMODE(st.st_mode) == 0o4755
    assert (st.st_uid, st.st_gid) == (1000, 1000)
    assert st.st_mtime_ns == 1_234_567_890 * 10**9
    assert (tmp_path / "bin" / "su").read_bytes() == b"#!/bin/sh\n"
    plain = (tmp_path / "plain").lstat()
    assert (stat.S_IMODE(plain.st_mode), plain.st_uid, plain.st_gid) == (0o640, 0, 1000)
    assert plain.st_mtime_ns == 10**18


def test_fractional_and_pax_atime(tmp_path: Path) -> None:
    entry = reg("f", b"f", mtime=1_500_000_000.5)
    entry.info.pax_headers = {"atime": "1400000000.25"}
    apply(tmp_path, entry)
    st = (tmp_path / "f").lstat()
    assert st.st_mtime_ns == 1_500_000_000_500_000_000
    assert st.st_atime_ns == 1_400_000_000_250_000_000


def test_implicit_parents_are_0755(tmp_path: Path) -> None:
    old = os.umask(0o077)
    try:
        apply(tmp_path, reg("a/b/c", b"c"))
    finally:
        os.umask(old)
    assert lmode(tmp_path / "a") == 0o755
    assert lmode(tmp_path / "a" / "b") == 0o755


def test_directory_metadata_and_deferred_mtime(tmp_path: Path) -> None:
    apply(
        tmp_path,
        dir_("d/", mode=0o1770, uid=1000, gid=1000, mtime=1_111_111_111),
        reg("d/later", b"x"),
        dir_("d/sub/", mtime=1_222_222_222),
        reg("d/sub/f", b"x"),
    )
    st = (tmp_path / "d").lstat()
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o1770, 1000, 1000)
    # Set after the children were created, or it would be "now".
    assert st.st_mtime_ns == 1_111_111_111 * 10**9
    assert (tmp_path / "d" / "sub").lstat().st_mtime_ns == 1_222_222_222 * 10**9


def test_existing_directory_is_merged_and_updated(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir(mode=0o700)
    (tmp_path / "d" / "keep").write_bytes(b"keep")
    apply(tmp_path, dir_("d/", mode=0o750, uid=1000, gid=1000), reg("d/new", b"new"))
    st = (tmp_path / "d").lstat()
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o750, 1000, 1000)
    assert (tmp_path / "d" / "keep").read_bytes() == b"keep"
    assert (tmp_path / "d" / "new").read_bytes() == b"new"


def test_root_entry_is_ignored(tmp_path: Path) -> None:
    os.chmod(tmp_path, 0o700)
    apply(tmp_path, dir_("./", mode=0o777, uid=1000, gid=1000), dir_("/", mode=0o777))
    st = tmp_path.lstat()
    assert (stat.S_IMODE(st.st_mode), st.st_uid) == (0o700, 0)


def test_file_replaces_directory_tree(tmp_path: Path) -> None:
    (tmp_path / "d" / "deep").mkdir(parents=True)
    (tmp_path / "d" / "deep" / "f").write_bytes(b"f")
    apply(tmp_path, reg("d", b"now a file"))
    assert (tmp_path / "d").read_bytes() == b"now a file"


def test_symlinks_are_stored_as_written(tmp_path: Path) -> None:
    apply(
        tmp_path,
        sym("abs", "/etc/does-not-exist", uid=1000, gid=1000, mtime=1_300_000_000),
        sym("rel", "../../../x"),
        sym("dangling", "nowhere/at/all"),
    )
    assert os.readlink(tmp_path / "abs") == "/etc/does-not-exist"
    assert os.readlink(tmp_path / "rel") == "../../../x"
    assert os.readlink(tmp_path / "dangling") == "nowhere/at/all"
    st = (tmp_path / "abs").lstat()
    assert (st.st_uid, st.st_gid) == (1000, 1000)
    assert st.st_mtime_ns == 1_300_000_000 * 10**9


def test_hardlinks_share_the_inode(tmp_path: Path) -> None:
    stats = apply(tmp_path, reg("bin/busybox", b"BB", mode=0o755), hard("bin/sh", "bin/busybox"))
    a, b = (tmp_path / "bin" / "busybox").stat(), (tmp_path / "bin" / "sh").stat()
    assert (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)
    assert a.st_nlink == 2
    assert stats.entries == 2
    assert stats.bytes_written == 2


def test_hardlink_replaces_existing_entry(tmp_path: Path) -> None:
    (tmp_path / "sh").write_bytes(b"old")
    apply(tmp_path, reg("busybox", b"BB"), hard("sh", "busybox"))
    assert (tmp_path / "sh").stat().st_ino == (tmp_path / "busybox").stat().st_ino


def test_device_nodes_and_fifo(tmp_path: Path) -> None:
    apply(
        tmp_path,
        dev("dev/null", tarfile.CHRTYPE, 1, 3, mode=0o666),
        dev("dev/loop0", tarfile.BLKTYPE, 7, 0, mode=0o660),
        dev("run/fifo", tarfile.FIFOTYPE, mode=0o620),
    )
    null = (tmp_path / "dev" / "null").lstat()
    assert stat.S_ISCHR(null.st_mode)
    assert (os.major(null.st_rdev), os.minor(null.st_rdev)) == (1, 3)
    assert stat.S_IMODE(null.st_mode) == 0o666
    loop = (tmp_path / "dev" / "loop0").lstat()
    assert stat.S_ISBLK(loop.st_mode)
    assert (os.major(loop.st_rdev), os.minor(loop.st_rdev)) == (7, 0)
    assert stat.S_IMODE(loop.st_mode) == 0o660
    fifo = (tmp_path / "run" / "fifo").lstat()
    assert stat.S_ISFIFO(fifo.st_mode)
    assert stat.S_IMODE(fifo.st_mode) == 0o620
    assert fifo.st_mtime_ns == MTIME * 10**9


# A VFS_CAP_REVISION_2 value granting CAP_NET_BIND_SERVICE (bit 10), with a
# byte that is not UTF-8 in its inheritable set.
CAPABILITY = b"\x01\x00\x00\x02" + b"\x00\x04\x00\x00" + b"\x00\x00\x00\x80" + bytes(8)


def test_xattrs(tmp_path: Path) -> None:
    binary = b"\xff\xfe\x00bin"
    apply(
        tmp_path,
        dir_("d/", xattrs={"user.dir": "on dir"}),
        reg(
            "d/ping",
            b"ELF",
            mode=0o755,
            uid=1000,
            xattrs={
                "user.comment": "héllo",
                "user.binary": binary.decode("utf-8", "surrogateescape"),
                "security.capability": CAPABILITY.decode("utf-8", "surrogateescape"),
                "trusted.pouch": "t",
            },
        ),
    )
    f = tmp_path / "d" / "ping"
    assert os.getxattr(f, "user.comment") == "héllo".encode()
    assert os.getxattr(f, "user.binary") == binary
    # Set after chown, which would have cleared it.
    assert os.getxattr(f, "security.capability") == CAPABILITY
    assert os.getxattr(f, "trusted.pouch") == b"t"
    assert os.getxattr(tmp_path / "d", "user.dir") == b"on dir"


def test_user_xattr_on_symlink_is_ignored(tmp_path: Path) -> None:
    entry = sym("l", "target")
    entry.info.pax_headers = {"SCHILY.xattr.user.x": "y", "SCHILY.xattr.trusted.t": "z"}
    apply(tmp_path, entry)
    assert os.getxattr(tmp_path / "l", "trusted.t", follow_symlinks=False) == b"z"
    assert "user.x" not in os.listxattr(tmp_path / "l", follow_symlinks=False)


def test_privileged_xattrs_are_skipped_without_the_privilege(tmp_path: Path) -> None:
    # Root without CAP_SYS_ADMIN gets EPERM for trusted.*: skipped, not fatal.
    script = textwrap.dedent(
        """
        import io, sys
        from pathlib import Path
        from pouch.image.unpack import apply_layer
        layer = io.BytesIO(sys.stdin.buffer.read())
        apply_layer(layer, Path(sys.argv[1]), max_bytes=1 << 20)
        """
    )
    raw = tar_bytes(reg("f", b"f", xattrs={"trusted.t": "1", "user.u": "2"}))
    env = {**os.environ, "PYTHONPATH": str(Path(pouch.__file__).parent.parent)}
    argv = ["setpriv", "--bounding-set=-sys_admin", sys.executable, "-c", script, str(tmp_path)]
    done = subprocess.run(argv, input=raw, env=env, capture_output=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr.decode()
    assert os.listxattr(tmp_path / "f") == ["user.u"]


def test_invalid_xattr_is_rejected(tmp_path: Path) -> None:
    # A malformed security.capability is EINVAL, not a missing privilege.
    with pytest.raises(LayerRejected) as info:
        apply(tmp_path, reg("f", b"f", xattrs={"security.capability": "junk"}))
    assert info.value.member == "f"


def test_overlay_xattrs_from_the_layer_are_dropped(tmp_path: Path) -> None:
    apply(
        tmp_path,
        dir_(
            "d/",
            xattrs={"trusted.overlay.opaque": "y", "trusted.overlay.redirect": "/etc"},
        ),
    )
    assert os.listxattr(tmp_path / "d") == []


def test_non_utf8_names(tmp_path: Path) -> None:
    name = b"caf\xe9".decode("utf-8", "surrogateescape")
    apply(tmp_path, reg(name, b"latin-1"))
    assert (tmp_path.joinpath(os.fsdecode(b"caf\xe9"))).read_bytes() == b"latin-1"


def test_long_names_gnu_and_pax(tmp_path: Path) -> None:
    long = "/".join(["d" * 100] * 5) + "/file"
    for fmt in (tarfile.GNU_FORMAT, tarfile.PAX_FORMAT):
        raw = tar_bytes(reg(long, b"long", mtime=MTIME), fmt=fmt)
        apply_layer(io.BytesIO(raw), tmp_path, max_bytes=LIMIT)
        assert (tmp_path / long).read_bytes() == b"long"


# --------------------------------------------------------------------------
# Whiteouts, overlay mode


def test_overlay_whiteout_becomes_char_device(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "gone").write_bytes(b"previous content")
    (tmp_path / "etc" / "gonedir" / "sub").mkdir(parents=True)
    apply(tmp_path, whiteout("etc/.wh.gone"), whiteout("etc/.wh.gonedir"), whiteout(".wh.lower"))
    for path in (tmp_path / "etc" / "gone", tmp_path / "etc" / "gonedir", tmp_path / "lower"):
        st = path.lstat()
        assert stat.S_ISCHR(st.st_mode), path
        assert st.st_rdev == os.makedev(0, 0)
    assert not (tmp_path / "etc" / ".wh.gone").exists()
    assert not (tmp_path / ".wh.lower").exists()


def test_overlay_opaque_directory(tmp_path: Path) -> None:
    (tmp_path / "d" / "olddir").mkdir(parents=True)
    (tmp_path / "d" / "old").write_bytes(b"previous")
    apply(
        tmp_path,
        dir_("d/"),
        reg("d/early", b"same layer, before the marker"),
        whiteout("d/.wh..wh..opq"),
        reg("d/late", b"after"),
    )
    assert os.getxattr(tmp_path / "d", "trusted.overlay.opaque") == b"y"
    assert sorted(os.listdir(tmp_path / "d")) == ["early", "late"]


def test_overlay_opaque_keeps_nested_entries_of_this_layer(tmp_path: Path) -> None:
    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / "sub" / "old").write_bytes(b"previous")
    apply(tmp_path, reg("d/sub/new", b"new"), whiteout("d/.wh..wh..opq"))
    assert os.listdir(tmp_path / "d" / "sub") == ["new"]


def test_whiteout_does_not_hide_same_layer_entries(tmp_path: Path) -> None:
    apply(tmp_path, reg("x", b"mine"), whiteout(".wh.x"))
    assert (tmp_path / "x").read_bytes() == b"mine"


def test_aufs_metadata_is_skipped(tmp_path: Path) -> None:
    (tmp_path / ".wh.plnk").write_bytes(b"lower")
    apply(tmp_path, dir_(".wh..wh.plnk/"), reg(".wh..wh.aufs", b""))
    assert os.listdir(tmp_path) == [".wh.plnk"]


# --------------------------------------------------------------------------
# Whiteouts, flatten mode


def test_flatten_whiteout_deletes(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"f")
    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "s").symlink_to("d")
    apply(
        tmp_path,
        whiteout(".wh.f"),
        whiteout(".wh.d"),
        whiteout(".wh.s"),
        whiteout(".wh.absent"),
        whiteout("no/such/parent/.wh.x"),
        overlay=False,
    )
    assert os.listdir(tmp_path) == []


def test_flatten_opaque_clears_directory(tmp_path: Path) -> None:
    (tmp_path / "d" / "old").mkdir(parents=True)
    (tmp_path / "d" / "f").write_bytes(b"f")
    apply(tmp_path, whiteout("d/.wh..wh..opq"), reg("d/new", b"n"), overlay=False)
    assert os.listdir(tmp_path / "d") == ["new"]
    assert "trusted.overlay.opaque" not in os.listxattr(tmp_path / "d")


def test_flatten_multiple_layers(tmp_path: Path) -> None:
    rootfs = tmp_path
    layers = [
        (
            dir_("etc/"),
            reg("etc/passwd", b"root:x:0:0\n"),
            reg("etc/motd", b"hello\n"),
            dir_("usr/"),
            dir_("usr/lib/"),
            reg("usr/lib/libold.so", b"old"),
            reg("usr/lib/libkeep.so", b"keep"),
            sym("lib", "/usr/lib"),
            dir_("var/cache/", mode=0o700),
            reg("var/cache/a", b"a"),
            reg("var/cache/b", b"b"),
            dir_("opt/"),
            reg("opt/tool", b"v1"),
            reg("bin/busybox", b"BB1", mode=0o755),
            hard("bin/sh", "bin/busybox"),
        ),
        (
            whiteout("etc/.wh.motd"),
            reg("etc/passwd", b"root:x:0:0\nuser:x:1000:1000\n", mode=0o600),
            reg("lib/libnew.so", b"new"),  # through the symlink, inside the rootfs
            whiteout("lib/.wh.libold.so"),
            dir_("var/cache/", mode=0o755),
            whiteout("var/cache/.wh..wh..opq"),
            reg("var/cache/c", b"c"),
            whiteout(".wh.opt"),
            reg("opt", b"now a file"),
            reg("bin/busybox", b"BB2", mode=0o755),
        ),
        (
            dir_("opt/"),  # a directory replaces the file again
            reg("opt/tool", b"v3"),
            whiteout("bin/.wh.sh"),
        ),
    ]
    for entries in layers:
        apply_layer(
            io.BytesIO(gz(tar_bytes(*entries))), rootfs, max_bytes=LIMIT, overlay_whiteouts=False
        )

    def tree(top: Path) -> dict[str, str]:
        out: dict[str, str] = {}
        for dirpath, dirnames, filenames in os.walk(top):
            for n in dirnames + filenames:
                p = Path(dirpath) / n
                rel = str(p.relative_to(top))
                if p.is_symlink():
                    out[rel] = "-> " + os.readlink(p)
                elif p.is_dir():
                    out[rel] = "dir"
                else:
                    out[rel] = p.read_text()
        return out

    assert tree(rootfs) == {
        "etc": "dir",
        "etc/passwd": "root:x:0:0\nuser:x:1000:1000\n",
        "usr": "dir",
        "usr/lib": "dir",
        "usr/lib/libkeep.so": "keep",
        "usr/lib/libnew.so": "new",
        "lib": "-> /usr/lib",
        "var": "dir",
        "var/cache": "dir",
        "var/cache/c": "c",
        "opt": "dir",
        "opt/tool": "v3",
        "bin": "dir",
        "bin/busybox": "BB2",
    }
    assert lmode(rootfs / "etc" / "passwd") == 0o600
    assert lmode(rootfs / "var" / "cache") == 0o755
    assert not any(n.startswith(".wh.") for _, ds, fs in os.walk(rootfs) for n in ds + fs)


def test_overlay_layers_stack(tmp_path: Path) -> None:
    # The same layers as separate overlay layer dirs keep their whiteouts.
    lower, upper = tmp_path / "l", tmp_path / "u"
    lower.mkdir()
    upper.mkdir()
    apply(lower, dir_("d/"), reg("d/a", b"a"), reg("gone", b"g"))
    stats = apply(upper, whiteout(".wh.gone"), dir_("d/"), whiteout("d/.wh..wh..opq"))
    assert stats.entries == 3
    assert (lower / "gone").read_bytes() == b"g"  # lower layers are never touched
    assert stat.S_ISCHR((upper / "gone").lstat().st_mode)
    assert os.getxattr(upper / "d", "trusted.overlay.opaque") == b"y"
    assert os.listdir(upper / "d") == []
