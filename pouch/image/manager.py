"""The image manager: pulls, stores, lists and removes images.

Pull flow (``pull``): resolve the reference at the registry (mirrors first),
fetch the config, then every layer concurrently (bounded per pull): each
blob streams into the content store, verified as it goes, and is unpacked
into its own overlay layer directory keyed by chain id.  Only when all of
that is on disk does one database transaction record the image and its
names.  A crash anywhere before that commit leaves no image and no
half-written blob; what it left is swept at start-up.

Pulls run in the manager's nursery, keyed by reference and credentials:
identical concurrent pulls share one download, and a kubelet that retries
after its deadline joins the pull still running.  Layers are keyed by chain
id across pulls, so two images sharing a base fetch it once.

Garbage collection keeps every blob and layer that an image, a running pull
(its lease) or a container (``add_snapshot_user``) still needs.
"""

from __future__ import annotations

import collections
import json
import time
from typing import TYPE_CHECKING, Any, Final

import attrs
import trio

from pouch._util.inflight import InFlightMap
from pouch.errors import InvalidArgument, NotFound
from pouch.image import media
from pouch.image.archive import Archive, ArchiveImage
from pouch.image.reference import ImageRef, is_image_id, parse_reference
from pouch.image.registry import Credentials, RegistryClient, Resolved
from pouch.image.store import ContentStore, SnapshotStore, rmtree, usage_sync
from pouch.image.unpack import apply_layer
from pouch.log import get_logger
from pouch.metrics import PULL_BYTES, PULL_DURATION

if TYPE_CHECKING:
    import sqlite3
    from collections.abc import Callable, Iterable, Sequence
    from pathlib import Path

    from pouch.config import Config
    from pouch.store.db import Database

log = get_logger("pouch.image")

SCHEMA: Final = (
    """CREATE TABLE IF NOT EXISTS images (
        image_id TEXT PRIMARY KEY,
        manifest_digest TEXT NOT NULL,
        size INTEGER NOT NULL,
        user TEXT NOT NULL,
        pinned INTEGER NOT NULL DEFAULT 0,
        chain_ids TEXT NOT NULL,
        blobs TEXT NOT NULL,
        created REAL NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS image_names (
        name TEXT PRIMARY KEY,
        image_id TEXT NOT NULL REFERENCES images(image_id) ON DELETE CASCADE,
        kind TEXT NOT NULL CHECK (kind IN ('tag', 'digest'))
    )""",
)


@attrs.frozen
class Image:
    image_id: str
    manifest_digest: str
    size: int
    user: str
    pinned: bool
    chain_ids: tuple[str, ...]
    blobs: tuple[str, ...]
    created: float
    repo_tags: tuple[str, ...] = ()
    repo_digests: tuple[str, ...] = ()


@attrs.define
class LayerProgress:
    digest: str
    size: int
    done: int = 0
    state: str = "waiting"  # waiting, downloading, unpacking, done, exists


@attrs.define
class PullProgress:
    """What a running pull has done so far (for ``pouch pull`` bars)."""

    ref: str
    layers: list[LayerProgress] = attrs.field(factory=list)
    resolved: bool = False
    changed: trio.Event = attrs.field(factory=trio.Event)

    def touch(self) -> None:
        self.changed.set()
        self.changed = trio.Event()


class ImageManager:
    def __init__(
        self,
        config: Config,
        db: Database,
        *,
        registry: RegistryClient | None = None,
        platform: media.Platform | None = None,
    ) -> None:
        self._config = config
        self._db = db
        root = config.root
        self.content = ContentStore(root / "content")
        self.snapshots = SnapshotStore(root / "snapshots")
        self._registry = registry or RegistryClient(
            config.registry, stall_timeout=config.image.stall_timeout
        )
        self.platform = platform or media.Platform.host()
        self._images: dict[str, Image] = {}
        self._names: dict[str, str] = {}
        sandbox_image = config.runtime.sandbox_image
        self._pinned_names = {str(parse_reference(sandbox_image))} if sandbox_image else set()
        self._pulls: InFlightMap[tuple[str, Credentials | None], str] = InFlightMap()
        self._layers: InFlightMap[str, None] = InFlightMap()
        self.progress: dict[str, PullProgress] = {}
        # Blobs and chain ids a running pull needs: GC leaves them alone.
        self._leases: collections.Counter[str] = collections.Counter()
        self._gc_lock = trio.Lock()
        self._snapshot_users: list[Callable[[], Iterable[str]]] = []
        self._nursery: trio.Nursery | None = None

    # ---- life cycle ---------------------------------------------------------

    def open_sync(self) -> None:
        """Open the stores and load the index; blocking, run at start-up."""
        self.content.open_sync()
        self.snapshots.open_sync()
        rows = self._db.run_sync(_load_rows)
        self._images, self._names = _index(rows)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled; pulls run in this task's nursery."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                await self.collect_garbage()
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._nursery = None
            with trio.CancelScope(shield=True):
                await self._registry.aclose()

    def add_snapshot_user(self, users: Callable[[], Iterable[str]]) -> None:
        """Register a source of chain ids in use (containers): GC keeps them."""
        self._snapshot_users.append(users)

    # ---- queries --------------------------------------------------------------

    def all(self) -> list[Image]:
        return sorted(self._images.values(), key=lambda i: i.created)

    def get(self, text: str) -> Image | None:
        """Find an image by id, id prefix, name:tag or name@digest."""
        text = text.strip()
        if not text:
            raise InvalidArgument("image reference is empty")
        if is_image_id(text):
            return self._images.get(text if text.startswith("sha256:") else f"sha256:{text}")
        ref: ImageRef | None
        try:
            ref = parse_reference(text)
        except InvalidArgument:
            ref = None
        if ref is not None:
            found = self._names.get(str(ref))
            if found is None and ref.digest is not None and ref.tag is not None:
                found = self._names.get(f"{ref.name}@{ref.digest}")
            if found is not None:
                return self._images[found]
        # A unique prefix of an image id, as docker and crictl accept.
        prefix = text.removeprefix("sha256:")
        if len(prefix) >= 4 and not prefix.strip("0123456789abcdef"):
            matches = [i for i in self._images if i.startswith(f"sha256:{prefix}")]
            if len(matches) == 1:
                return self._images[matches[0]]
        if ref is None:
            raise InvalidArgument(f'invalid image reference "{text}"')
        return None

    def chain_ids_of(self, image_id: str) -> tuple[str, ...]:
        image = self._images.get(image_id)
        if image is None:
            raise NotFound(f"image {image_id} not found")
        return image.chain_ids

    async def config_of(self, image_id: str) -> bytes:
        return await self.content.read(image_id)

    async def fs_usage(self) -> tuple[int, int]:
        return await trio.to_thread.run_sync(usage_sync, self._config.root / "snapshots")

    # ---- pull -----------------------------------------------------------------

    async def pull(self, text: str, creds: Credentials | None = None) -> str:
        """Pull an image; return its id (the config digest).

        Raises:
            InvalidArgument: the reference is malformed.
            NotFound: the registry has no such image.
            RegistryUnavailable: the registry (and every mirror) failed.

        Cancellation: the caller stops waiting; the pull goes on in the
        manager's nursery and a retry joins it.
        """
        ref = parse_reference(text)
        if self._nursery is None:
            raise InvalidArgument("image manager is not running")
        key = (str(ref), creds)
        if self._pulls.get(key) is None:
            # Before the task runs, so a progress watcher never misses a fast pull.
            self.progress.setdefault(str(ref), PullProgress(ref=str(ref)))
        op, started = self._pulls.start(self._nursery, key, lambda: self._pull(ref, creds))
        if not started:
            log.info("joining pull in progress", image=str(ref))
        return await op.result()

    async def _pull(self, ref: ImageRef, creds: Credentials | None) -> str:
        started = time.monotonic()
        progress = self.progress.setdefault(str(ref), PullProgress(ref=str(ref)))
        try:
            resolved = await self._registry.resolve(ref, creds, self.platform)
            manifest = resolved.manifest
            image_id = manifest.config.digest
            blobs = [resolved.digest, resolved.manifest_digest, image_id]
            blobs += [layer.digest for layer in manifest.layers]
            with self._lease(blobs):
                return await self._pull_resolved(ref, creds, resolved, blobs, progress, started)
        finally:
            self.progress.pop(str(ref), None)

    async def _pull_resolved(
        self,
        ref: ImageRef,
        creds: Credentials | None,
        resolved: Resolved,
        blobs: list[str],
        progress: PullProgress,
        started: float,
    ) -> str:
        manifest = resolved.manifest
        image_id = manifest.config.digest
        config = media.parse_config(await self._fetch_small(ref, manifest.config, creds))
        if len(config.diff_ids) != len(manifest.layers):
            raise InvalidArgument(
                f"image {ref}: manifest has {len(manifest.layers)} layers "
                f"but config lists {len(config.diff_ids)} diff ids"
            )
        chains = media.chain_ids(config.diff_ids)
        progress.layers = [LayerProgress(d.digest, d.size) for d in manifest.layers]
        progress.resolved = True
        progress.touch()
        with self._lease(chains):
            slots = trio.Semaphore(max(1, self._config.image.max_concurrent_downloads))
            async with trio.open_nursery() as nursery:
                for i, layer in enumerate(manifest.layers):
                    nursery.start_soon(
                        self._ensure_layer,
                        ref,
                        layer,
                        config.diff_ids[i],
                        chains[i],
                        creds,
                        slots,
                        progress.layers[i],
                        progress,
                    )
            await self.content.put(resolved.manifest_digest, resolved.manifest_bytes)
            if resolved.index_bytes is not None:
                await self.content.put(resolved.digest, resolved.index_bytes)
            names = [(str(ref), "tag")] if ref.tag is not None else []
            names.append((f"{ref.name}@{resolved.digest}", "digest"))
            await self._record(manifest, resolved.manifest_digest, config, blobs, names)
        PULL_DURATION.observe(time.monotonic() - started)
        log.info(
            "pulled image",
            image=str(ref),
            image_id=image_id,
            endpoint=resolved.endpoint,
            layers=len(manifest.layers),
            seconds=round(time.monotonic() - started, 3),
        )
        return image_id

    async def _record(
        self,
        manifest: media.Manifest,
        manifest_digest: str,
        config: media.ImageConfig,
        blobs: Sequence[str],
        names: Sequence[tuple[str, str]],
    ) -> None:
        """Commit an image whose blobs and layers are all on disk."""
        size = manifest.config.size + sum(layer.size for layer in manifest.layers)
        image = Image(
            image_id=manifest.config.digest,
            manifest_digest=manifest_digest,
            size=size,
            user=config.user,
            # The sandbox image is pinned (containerd's sandbox_image): a
            # kubelet's image GC leaves pinned images alone.
            pinned=any(name in self._pinned_names for name, _ in names),
            chain_ids=media.chain_ids(config.diff_ids),
            blobs=tuple(dict.fromkeys(blobs)),
            created=time.time(),
        )
        await self._commit(image, names)

    async def _fetch_small(
        self, ref: ImageRef, desc: media.Descriptor, creds: Credentials | None
    ) -> bytes:
        if not self.content.has(desc.digest):
            if desc.size > 16 * 1024 * 1024:
                raise InvalidArgument(f"image {ref}: config of {desc.size} bytes is too large")
            async with (
                self._registry.open_blob(ref, desc, creds) as chunks,
                self.content.writer(desc.digest, desc.size) as w,
            ):
                async for chunk in chunks:
                    await w.write(chunk)
        return await self.content.read(desc.digest)

    async def _ensure_layer(
        self,
        ref: ImageRef,
        desc: media.Descriptor,
        diff_id: str,
        chain_id: str,
        creds: Credentials | None,
        slots: trio.Semaphore,
        layer: LayerProgress,
        progress: PullProgress,
    ) -> None:
        if self.snapshots.has(chain_id):
            layer.state = "exists"
            layer.done = layer.size
            progress.touch()
            return
        assert self._nursery is not None
        async with slots:
            op, _ = self._layers.start(
                self._nursery,
                chain_id,
                lambda: self._fetch_and_unpack(
                    ref, desc, diff_id, chain_id, creds, layer, progress
                ),
            )
            await op.result()
        layer.state = "done"
        layer.done = layer.size
        progress.touch()

    async def _fetch_and_unpack(
        self,
        ref: ImageRef,
        desc: media.Descriptor,
        diff_id: str,
        chain_id: str,
        creds: Credentials | None,
        layer: LayerProgress,
        progress: PullProgress,
    ) -> None:
        with self._lease([desc.digest, chain_id]):
            if self.snapshots.has(chain_id):
                return
            if not self.content.has(desc.digest):
                layer.state = "downloading"
                async with (
                    self._registry.open_blob(ref, desc, creds) as chunks,
                    self.content.writer(desc.digest, desc.size) as w,
                ):
                    async for chunk in chunks:
                        await w.write(chunk)
                        PULL_BYTES.inc(len(chunk))
                        layer.done = w.written
                        progress.touch()
            layer.state = "unpacking"
            progress.touch()
            await trio.to_thread.run_sync(self._unpack_sync, desc, diff_id, chain_id)

    def _unpack_sync(self, desc: media.Descriptor, diff_id: str, chain_id: str) -> None:
        tmp = self.snapshots.new_tmp_sync()
        try:
            with self.content.path(desc.digest).open("rb") as blob:
                stats = apply_layer(
                    blob,
                    tmp,
                    media_type=desc.media_type,
                    max_bytes=self._config.image.max_layer_bytes or 2**63,
                )
            if stats.diff_id != diff_id:
                raise InvalidArgument(
                    f"layer {desc.digest} unpacks to {stats.diff_id}, "
                    f"but the image config says {diff_id}"
                )
            self.snapshots.commit_sync(tmp, chain_id)
        except BaseException:
            rmtree(tmp)
            raise

    # ---- import -------------------------------------------------------------------

    async def load(self, path: Path) -> list[tuple[tuple[str, ...], str]]:
        """Import every image of an OCI image-layout or ``docker save`` tar.

        Returns:
            (names, image id) for each image loaded.

        Raises:
            InvalidArgument: the archive is malformed or a blob does not verify.
        """
        archive = await trio.to_thread.run_sync(Archive, path)
        try:
            loaded = []
            for item in archive.images:
                loaded.append((item.names, await self._load_one(archive, item)))
            return loaded
        finally:
            archive.close()

    async def _load_one(self, archive: Archive, item: ArchiveImage) -> str:
        manifest = item.manifest
        blobs = [item.manifest_digest, manifest.config.digest]
        blobs += [layer.digest for layer in manifest.layers]
        if item.index_digest is not None:
            blobs.insert(0, item.index_digest)
        with self._lease(blobs):
            for desc in (manifest.config, *manifest.layers):
                if not self.content.has(desc.digest):
                    await self._copy_blob(archive, desc)
            config = media.parse_config(await self.content.read(manifest.config.digest))
            if len(config.diff_ids) != len(manifest.layers):
                raise InvalidArgument(
                    f"archive {archive.path}: manifest has {len(manifest.layers)} layers "
                    f"but config lists {len(config.diff_ids)} diff ids"
                )
            chains = media.chain_ids(config.diff_ids)
            with self._lease(chains):
                for layer, diff_id, chain_id in zip(
                    manifest.layers, config.diff_ids, chains, strict=True
                ):
                    if not self.snapshots.has(chain_id):
                        await trio.to_thread.run_sync(self._unpack_sync, layer, diff_id, chain_id)
                await self.content.put(item.manifest_digest, item.manifest_bytes)
                digest = item.index_digest or item.manifest_digest
                names: list[tuple[str, str]] = []
                for name in item.names:
                    ref = parse_reference(name)
                    names.append((str(ref), "tag"))
                    names.append((f"{ref.name}@{digest}", "digest"))
                await self._record(manifest, item.manifest_digest, config, blobs, names)
        log.info("loaded image", names=list(item.names), image_id=manifest.config.digest)
        return manifest.config.digest

    async def _copy_blob(self, archive: Archive, desc: media.Descriptor) -> None:
        source = await trio.to_thread.run_sync(archive.open_blob, desc.digest)
        try:
            async with self.content.writer(desc.digest, desc.size) as w:
                while chunk := await trio.to_thread.run_sync(source.read, 1024 * 1024):
                    await w.write(chunk)
        finally:
            source.close()

    # ---- records ----------------------------------------------------------------

    async def _commit(self, image: Image, names: Sequence[tuple[str, str]]) -> None:
        def write(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT INTO images (image_id, manifest_digest, size, user, pinned, chain_ids,"
                " blobs, created) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT(image_id) DO UPDATE SET manifest_digest=excluded.manifest_digest,"
                " size=excluded.size, user=excluded.user, chain_ids=excluded.chain_ids,"
                " blobs=excluded.blobs, pinned=MAX(images.pinned, excluded.pinned)",
                (
                    image.image_id,
                    image.manifest_digest,
                    image.size,
                    image.user,
                    int(image.pinned),
                    json.dumps(image.chain_ids),
                    json.dumps(image.blobs),
                    image.created,
                ),
            )
            previous = set()
            for name, kind in names:
                row = conn.execute(
                    "SELECT image_id FROM image_names WHERE name = ?", (name,)
                ).fetchone()
                if row is not None and row[0] != image.image_id:
                    previous.add(row[0])
                conn.execute(
                    "INSERT INTO image_names (name, image_id, kind) VALUES (?, ?, ?)"
                    " ON CONFLICT(name) DO UPDATE SET image_id=excluded.image_id",
                    (name, image.image_id, kind),
                )
            # An image whose last name moved to this one is gone (docker's
            # dangling images are not a CRI concept); its layers go to GC.
            for old in previous:
                conn.execute(
                    "DELETE FROM images WHERE image_id = ? AND image_id NOT IN"
                    " (SELECT image_id FROM image_names)",
                    (old,),
                )

        await self._db.transaction(write)
        await self._reload()

    async def _reload(self) -> None:
        rows = await self._db.transaction(_load_rows)
        self._images, self._names = _index(rows)

    async def remove(self, text: str) -> bool:
        """Remove an image and every name it has; False when there was none.

        Layers a container still uses stay until the container is removed.
        """
        image = self.get(text)
        if image is None:
            return False
        await self._db.transaction(
            lambda conn: conn.execute("DELETE FROM images WHERE image_id = ?", (image.image_id,))
        )
        await self._reload()
        log.info("removed image", image_id=image.image_id)
        await self.collect_garbage()
        return True

    # ---- garbage collection ---------------------------------------------------------

    class _LeaseContext:
        def __init__(self, leases: collections.Counter[str], keys: Sequence[str]) -> None:
            self._leases = leases
            self._keys = list(keys)

        def __enter__(self) -> None:
            self._leases.update(self._keys)

        def __exit__(self, *exc: object) -> None:
            self._leases.subtract(self._keys)
            for key in self._keys:
                if self._leases[key] <= 0:
                    del self._leases[key]

    def _lease(self, keys: Sequence[str]) -> ImageManager._LeaseContext:
        return ImageManager._LeaseContext(self._leases, keys)

    async def collect_garbage(self) -> tuple[int, int]:
        """Delete blobs and layers nothing needs; return how many of each."""
        async with self._gc_lock:
            blobs, chains = await trio.to_thread.run_sync(self._scan_sync)
            keep_blobs = {b for image in self._images.values() for b in image.blobs}
            keep_chains = {c for image in self._images.values() for c in image.chain_ids}
            for users in self._snapshot_users:
                keep_chains.update(users())
            # From here to the renames there is no checkpoint: a pull cannot
            # take a lease on something between the check and its removal.
            doomed_blobs = [b for b in blobs - keep_blobs if b not in self._leases]
            doomed_chains = [c for c in chains - keep_chains if c not in self._leases]
            for digest in doomed_blobs:
                self.content.delete_sync(digest)
            detached = [p for c in doomed_chains if (p := self.snapshots.detach_sync(c))]
            for path in detached:
                await trio.to_thread.run_sync(rmtree, path)
        if doomed_blobs or doomed_chains:
            log.info("collected garbage", blobs=len(doomed_blobs), layers=len(doomed_chains))
        return len(doomed_blobs), len(doomed_chains)

    def _scan_sync(self) -> tuple[set[str], set[str]]:
        return self.content.all_digests_sync(), self.snapshots.all_chain_ids_sync()


def _load_rows(conn: sqlite3.Connection) -> tuple[list[Any], list[Any]]:
    images = conn.execute(
        "SELECT image_id, manifest_digest, size, user, pinned, chain_ids, blobs, created"
        " FROM images"
    ).fetchall()
    names = conn.execute("SELECT name, image_id, kind FROM image_names").fetchall()
    return images, names


def _index(rows: tuple[list[Any], list[Any]]) -> tuple[dict[str, Image], dict[str, str]]:
    image_rows, name_rows = rows
    tags: dict[str, list[str]] = collections.defaultdict(list)
    digests: dict[str, list[str]] = collections.defaultdict(list)
    names: dict[str, str] = {}
    for name, image_id, kind in name_rows:
        names[name] = image_id
        (tags if kind == "tag" else digests)[image_id].append(name)
    images = {}
    for image_id, manifest_digest, size, user, pinned, chain_ids, blobs, created in image_rows:
        images[image_id] = Image(
            image_id=image_id,
            manifest_digest=manifest_digest,
            size=size,
            user=user,
            pinned=bool(pinned),
            chain_ids=tuple(json.loads(chain_ids)),
            blobs=tuple(json.loads(blobs)),
            created=created,
            repo_tags=tuple(sorted(tags[image_id])),
            repo_digests=tuple(sorted(digests[image_id])),
        )
    return images, names
