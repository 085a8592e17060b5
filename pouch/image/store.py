"""Content-addressed blob store and overlay layer snapshots, on disk.

Layout under ``<root>/``::

    content/blobs/sha256/<hex>     verified blobs (manifests, configs, layers)
    content/ingest/<random>        blobs being written; never read as content
    snapshots/<chain hex>/         one unpacked layer per chain id (overlay lowerdir)
    snapshots/.tmp-<random>/       a layer being unpacked

A blob is written to ``ingest/``, hashed as it streams, fsynced and renamed
into ``blobs/`` only once its size and digest match: a half-downloaded blob
never appears under its digest.  Snapshots are unpacked into a temporary
directory and renamed into place the same way.  Whatever a crash leaves in
``ingest/`` or ``.tmp-*`` is removed at start-up.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from typing import TYPE_CHECKING, Any, BinaryIO

import trio

from pouch.errors import InvalidArgument, NotFound
from pouch.image.media import check_digest, hasher
from pouch.log import get_logger

if TYPE_CHECKING:
    from collections.abc import AsyncIterator
    from pathlib import Path

log = get_logger("pouch.image")


class DigestMismatch(InvalidArgument):
    """Bytes received do not match the descriptor: they never become content."""


class BlobWriter:
    """Streams one blob into the ingest area, checking it as it goes."""

    def __init__(self, path: Path, digest: str, size: int | None) -> None:
        self.path = path
        self.digest = digest
        self.expected_size = size
        self.written = 0
        self._hash = hasher(digest)
        self._file: BinaryIO = path.open("xb")

    def _write_sync(self, data: bytes) -> None:
        self._hash.update(data)
        self._file.write(data)

    async def write(self, data: bytes) -> None:
        """Append *data* (hashing and writing happen off the event loop)."""
        self.written += len(data)
        if self.expected_size is not None and self.written > self.expected_size:
            raise DigestMismatch(
                f"blob {self.digest} is larger than its descriptor's {self.expected_size} bytes"
            )
        await trio.to_thread.run_sync(self._write_sync, data)

    def _finish_sync(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()

    def close_sync(self) -> None:
        self._file.close()

    def verify(self) -> None:
        if self.expected_size is not None and self.written != self.expected_size:
            raise DigestMismatch(
                f"blob {self.digest} has {self.written} bytes, expected {self.expected_size}"
            )
        actual = f"{self.digest.partition(':')[0]}:{self._hash.hexdigest()}"
        if actual != self.digest:
            raise DigestMismatch(f"blob digest mismatch: expected {self.digest}, got {actual}")


class ContentStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.blobs = root / "blobs"
        self.ingest = root / "ingest"

    def open_sync(self) -> None:
        """Create the layout and drop what a crash left half-written."""
        self.blobs.mkdir(parents=True, exist_ok=True, mode=0o700)
        shutil.rmtree(self.ingest, ignore_errors=True)
        self.ingest.mkdir(parents=True, exist_ok=True, mode=0o700)

    def path(self, digest: str) -> Path:
        algo, _, hexpart = check_digest(digest).partition(":")
        return self.blobs / algo / hexpart

    def has(self, digest: str) -> bool:
        return self.path(digest).is_file()

    def size(self, digest: str) -> int:
        try:
            return self.path(digest).stat().st_size
        except FileNotFoundError:
            raise NotFound(f"blob {digest} not found") from None

    async def read(self, digest: str) -> bytes:
        try:
            return await trio.Path(self.path(digest)).read_bytes()
        except FileNotFoundError:
            raise NotFound(f"blob {digest} not found") from None

    @contextlib.asynccontextmanager
    async def writer(self, digest: str, size: int | None) -> AsyncIterator[BlobWriter]:
        """Write a blob; it is committed under *digest* only if it verifies.

        Cancellation: the partial file is removed; nothing is committed.
        """
        check_digest(digest)
        tmp = self.ingest / f"{digest.partition(':')[2][:16]}-{secrets.token_hex(8)}"
        w = BlobWriter(tmp, digest, size)
        try:
            yield w
            w.verify()
            await trio.to_thread.run_sync(w._finish_sync)
            final = self.path(digest)
            final.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            os.rename(tmp, final)
        finally:
            w.close_sync()
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()

    async def put(self, digest: str, data: bytes) -> None:
        """Store a small blob held in memory (a manifest, a config)."""
        if self.has(digest):
            return
        async with self.writer(digest, len(data)) as w:
            await w.write(data)

    def delete_sync(self, digest: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path(digest).unlink()

    def all_digests_sync(self) -> set[str]:
        found: set[str] = set()
        for algo_dir in self.blobs.iterdir():
            if algo_dir.is_dir():
                found.update(f"{algo_dir.name}:{p.name}" for p in algo_dir.iterdir())
        return found


class SnapshotStore:
    """Unpacked layers, one directory per chain id, shared between images."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def open_sync(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        for entry in self.root.iterdir():
            if entry.name.startswith(".tmp-"):
                log.info("removing half-unpacked layer", path=str(entry))
                rmtree(entry)

    def path(self, chain_id: str) -> Path:
        return self.root / check_digest(chain_id, what="chain id").partition(":")[2]

    def has(self, chain_id: str) -> bool:
        return self.path(chain_id).is_dir()

    def new_tmp_sync(self) -> Path:
        tmp = self.root / f".tmp-{secrets.token_hex(8)}"
        tmp.mkdir(mode=0o755)
        return tmp

    def commit_sync(self, tmp: Path, chain_id: str) -> None:
        """Rename an unpacked layer into place (someone else may have won the race)."""
        final = self.path(chain_id)
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.is_dir():
                raise
            rmtree(tmp)

    def detach_sync(self, chain_id: str) -> Path | None:
        """Move a layer out of sight (one rename); `rmtree` the result later.

        A crash before the removal leaves a ``.tmp-*`` to sweep, never a
        half-deleted layer under its chain id.
        """
        path = self.path(chain_id)
        doomed = self.root / f".tmp-{secrets.token_hex(8)}"
        try:
            os.rename(path, doomed)
        except FileNotFoundError:
            return None
        return doomed

    def all_chain_ids_sync(self) -> set[str]:
        return {f"sha256:{p.name}" for p in self.root.iterdir() if not p.name.startswith(".")}

    def usage_sync(self) -> tuple[int, int]:
        """Bytes and inodes under the snapshots."""
        return _usage(self.root)


def rmtree(path: Path) -> None:
    def onerror(func: Any, p: str, exc_info: Any) -> None:
        # Unpacked layers may hold read-only directories; make them writable.
        if isinstance(exc_info[1], PermissionError):
            with contextlib.suppress(OSError):
                os.chmod(os.path.dirname(p), 0o700)
                func(p)

    shutil.rmtree(path, onerror=onerror)


def _usage(root: Path) -> tuple[int, int]:
    size = 0
    inodes = 0
    seen: set[tuple[int, int]] = set()
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            try:
                st = os.lstat(os.path.join(dirpath, name))
            except FileNotFoundError:
                continue
            key = (st.st_dev, st.st_ino)
            if key in seen:
                continue
            seen.add(key)
            inodes += 1
            size += st.st_blocks * 512
    return size, inodes


def usage_sync(root: Path) -> tuple[int, int]:
    """Bytes (allocated) and inodes under *root*."""
    return _usage(root)
