"""ImageService against a real registry (Debian's docker-registry on loopback)."""

from __future__ import annotations

import gzip
import io
import json
import os
import signal
import subprocess
import tarfile
import tempfile
import threading
import time
from pathlib import Path

import grpc
import pytest
from cri_api.v1 import api_pb2, api_pb2_grpc

from tests.support import images as timg
from tests.support.registry import Registry, push

pytestmark = [pytest.mark.integration, pytest.mark.root, pytest.mark.timeout(120)]


@pytest.fixture(scope="module")
def registry():
    with Registry() as r:
        yield r


def insecure(registry: Registry, extra: str = "") -> str:
    return f'[registry]\ninsecure = ["{registry.host}"]\n{extra}'


@pytest.fixture
def pd(make_daemon, registry):
    return make_daemon(config=insecure(registry)).start()


@pytest.fixture
def img(pd):
    with pd.channel() as ch:
        yield api_pb2_grpc.ImageServiceStub(ch)


def pull(stub, ref: str, *, auth=None, timeout=60) -> str:
    req = api_pb2.PullImageRequest(image=api_pb2.ImageSpec(image=ref), auth=auth)
    return stub.PullImage(req, timeout=timeout).image_ref


def status(stub, ref: str, verbose=False):
    req = api_pb2.ImageStatusRequest(image=api_pb2.ImageSpec(image=ref), verbose=verbose)
    return stub.ImageStatus(req, timeout=10)


def listed(stub) -> dict[str, api_pb2.Image]:
    return {i.id: i for i in stub.ListImages(api_pb2.ListImagesRequest(), timeout=10).images}


def snapshot_dirs(pd) -> set[str]:
    root = pd.root / "snapshots"
    return {p.name for p in root.iterdir()} if root.exists() else set()


def blob_files(pd) -> set[str]:
    root = pd.root / "content" / "blobs" / "sha256"
    return {p.name for p in root.iterdir()} if root.exists() else set()


def test_pull_list_status_remove(img, pd, registry):
    image = timg.busybox_image()
    digest = push(registry, "library/busybox", "latest", image)
    ref = f"{registry.host}/library/busybox:latest"

    image_id = pull(img, ref)
    assert image_id == image.config.digest

    got = listed(img)[image_id]
    assert list(got.repo_tags) == [ref]
    assert list(got.repo_digests) == [f"{registry.host}/library/busybox@{digest}"]
    assert got.size == image.config.size + sum(layer.blob.size for layer in image.layers)
    assert got.uid.value == 0 or got.username == ""

    for name in (
        ref,
        image_id,
        image_id.removeprefix("sha256:"),
        got.repo_digests[0],
        image_id.removeprefix("sha256:")[:12],
    ):
        assert status(img, name).image.id == image_id, name
    info = json.loads(status(img, ref, verbose=True).info["info"])
    assert info["imageSpec"]["rootfs"]["diff_ids"] == list(image.diff_ids)
    assert info["manifestDigest"] == digest

    # Filter by name.
    only = img.ListImages(
        api_pb2.ListImagesRequest(filter=api_pb2.ImageFilter(image=api_pb2.ImageSpec(image=ref))),
        timeout=10,
    )
    assert [i.id for i in only.images] == [image_id]

    assert snapshot_dirs(pd)
    assert blob_files(pd)
    img.RemoveImage(api_pb2.RemoveImageRequest(image=api_pb2.ImageSpec(image=ref)), timeout=10)
    assert not status(img, ref).HasField("image")
    assert image_id not in listed(img)
    assert snapshot_dirs(pd) == set()
    assert blob_files(pd) == set()
    # Idempotent.
    img.RemoveImage(api_pb2.RemoveImageRequest(image=api_pb2.ImageSpec(image=ref)), timeout=10)


def test_images_survive_a_restart(img, pd, registry):
    push(registry, "library/busybox", "latest", timg.busybox_image())
    image_id = pull(img, f"{registry.host}/library/busybox:latest")
    pd.signal(signal.SIGKILL)
    pd.wait(10)
    pd.start()
    with pd.channel() as ch:
        stub = api_pb2_grpc.ImageServiceStub(ch)
        assert status(stub, f"{registry.host}/library/busybox:latest").image.id == image_id


def test_unknown_image_status_is_empty_and_remove_succeeds(img):
    assert not status(img, "docker.io/library/nope:1").HasField("image")
    img.RemoveImage(api_pb2.RemoveImageRequest(image=api_pb2.ImageSpec(image="nope:1")), timeout=10)


@pytest.mark.parametrize("bad", ["Foo::bar", "busy box", "a@sha256:xyz"])
def test_invalid_reference_is_invalid_argument(img, bad):
    with pytest.raises(grpc.RpcError) as err:
        pull(img, bad)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad in err.value.details()


def test_missing_image_field_is_invalid_argument(img):
    with pytest.raises(grpc.RpcError) as err:
        img.PullImage(api_pb2.PullImageRequest(), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "image.image" in err.value.details()


def test_missing_image_is_not_found(img, registry):
    with pytest.raises(grpc.RpcError) as err:
        pull(img, f"{registry.host}/library/absent:1")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert "absent" in err.value.details()


def _mount_image(pd, image_id: str, target: Path) -> None:
    """Mount the image's layers as overlayfs lowerdirs, as a container rootfs."""
    chains = _chain_ids(pd, image_id)
    lower = ":".join(
        str(pd.root / "snapshots" / c.removeprefix("sha256:")) for c in reversed(chains)
    )
    subprocess.run(
        ["mount", "-t", "overlay", "overlay", "-o", f"lowerdir={lower}", str(target)],
        check=True,
        timeout=30,
    )


def _chain_ids(pd, image_id: str) -> list[str]:
    with pd.channel() as ch:
        stub = api_pb2_grpc.ImageServiceStub(ch)
        return json.loads(status(stub, image_id, verbose=True).info["info"])["chainIDs"]


def test_multilayer_image_unpacks_to_the_right_tree(img, pd, registry):
    image = timg.multilayer_image()
    push(registry, "test/multi", "v1", image)
    image_id = pull(img, f"{registry.host}/test/multi:v1")
    assert len(_chain_ids(pd, image_id)) == len(image.layers)
    expected = timg.multilayer_expected()
    with tempfile.TemporaryDirectory() as mnt:
        root = Path(mnt)
        _mount_image(pd, image_id, root)
        try:
            for path, want in expected.present.items():
                p = root / path.lstrip("/")
                st = p.lstat()
                if want.kind == "symlink":
                    assert os.readlink(p) == want.target, path
                elif want.kind == "dir":
                    assert p.is_dir(), path
                    assert st.st_mode & 0o7777 == want.mode, path
                else:
                    assert p.read_bytes() == want.data, path
                    assert st.st_mode & 0o7777 == want.mode, path
                assert (st.st_uid, st.st_gid) == (want.uid, want.gid), path
            for path in expected.absent:
                assert not (root / path.lstrip("/")).exists(), path
            for group in expected.hardlinks:
                inodes = {(root / p.lstrip("/")).stat().st_ino for p in group}
                assert len(inodes) == 1, group
            assert (root / "bin" / "busybox").is_file()
        finally:
            subprocess.run(["umount", str(root)], check=True, timeout=30)


@pytest.mark.parametrize("docker", [False, True], ids=["oci-index", "docker-list"])
def test_multiarch_index_resolves_to_the_host_platform(img, registry, docker):
    image = timg.busybox_image()
    index = timg.multiarch_index(image)
    if docker:
        index = timg.to_docker(index)
        image = index.image_for(timg.host_platform())
    digest = push(registry, "test/multiarch", "docker" if docker else "oci", index)
    ref = f"{registry.host}/test/multiarch:{'docker' if docker else 'oci'}"
    image_id = pull(img, ref)
    assert image_id == image.config.digest
    # The repo digest is the index's, as containerd records it.
    assert f"{registry.host}/test/multiarch@{digest}" in listed(img)[image_id].repo_digests


def test_moved_tag_leaves_the_old_image_under_its_digest(img, registry):
    ref = f"{registry.host}/test/moving:latest"
    push(registry, "test/moving", "latest", timg.busybox_image())
    old = pull(img, ref)
    push(registry, "test/moving", "latest", timg.webserver_image())
    new = pull(img, ref)
    assert old != new
    images = listed(img)
    assert list(images[new].repo_tags) == [ref]
    assert list(images[old].repo_tags) == []
    assert len(images[old].repo_digests) == 1


def test_concurrent_pulls_fetch_each_blob_once(img, registry):
    image = timg.multilayer_image()
    push(registry, "test/concurrent", "v1", image)
    registry.clear_requests()
    ref = f"{registry.host}/test/concurrent:v1"
    results: list[str] = []
    errors: list[BaseException] = []

    def one():
        try:
            results.append(pull(img, ref))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=one) for _ in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    assert set(results) == {image.config.digest}
    for blob in [image.config, *(layer.blob for layer in image.layers)]:
        assert registry.blob_fetches(blob.digest) == 1, blob.digest


def test_shared_base_layer_is_fetched_once(img, pd, registry):
    push(registry, "test/base", "v1", timg.busybox_image())
    push(registry, "test/derived", "v1", timg.multilayer_image())
    pull(img, f"{registry.host}/test/base:v1")
    registry.clear_requests()
    pull(img, f"{registry.host}/test/derived:v1")
    assert registry.blob_fetches(timg.busybox_layer().blob.digest) == 0
    # Removing the derived image keeps the base layer the other image uses.
    img.RemoveImage(
        api_pb2.RemoveImageRequest(
            image=api_pb2.ImageSpec(image=f"{registry.host}/test/derived:v1")
        ),
        timeout=10,
    )
    base_chain = timg.busybox_layer().diff_id.removeprefix("sha256:")
    assert base_chain in snapshot_dirs(pd)


def test_mirror_serves_docker_io_names(make_daemon, registry):
    push(registry, "library/busybox", "latest", timg.busybox_image())
    # A dead endpoint first: the pull falls through to the next one.
    with tempfile.TemporaryDirectory():
        import socket

        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
        s.close()
    config = (
        '[registry.mirrors."docker.io"]\n'
        f'endpoints = ["http://127.0.0.1:{dead}", "http://{registry.host}"]\n'
    )
    d = make_daemon(config=config).start()
    with d.channel() as ch:
        stub = api_pb2_grpc.ImageServiceStub(ch)
        image_id = pull(stub, "busybox")
        image = listed(stub)[image_id]
        assert list(image.repo_tags) == ["docker.io/library/busybox:latest"]
        assert status(stub, "busybox:latest").image.id == image_id


def test_basic_auth(make_daemon):
    with Registry(auth=("alice", "s3cret")) as secured:
        push(secured, "private/busybox", "v1", timg.busybox_image())
        d = make_daemon(config=insecure(secured)).start()
        ref = f"{secured.host}/private/busybox:v1"
        with d.channel() as ch:
            stub = api_pb2_grpc.ImageServiceStub(ch)
            with pytest.raises(grpc.RpcError) as err:
                pull(stub, ref)
            assert err.value.code() in (
                grpc.StatusCode.UNAVAILABLE,
                grpc.StatusCode.UNAUTHENTICATED,
                grpc.StatusCode.PERMISSION_DENIED,
            )
            assert "RegistryUnavailable" in err.value.details()
            with pytest.raises(grpc.RpcError):
                pull(stub, ref, auth=api_pb2.AuthConfig(username="alice", password="wrong"))
            assert pull(stub, ref, auth=api_pb2.AuthConfig(username="alice", password="s3cret"))
            import base64

            token = base64.b64encode(b"alice:s3cret").decode()
            stub.RemoveImage(
                api_pb2.RemoveImageRequest(image=api_pb2.ImageSpec(image=ref)), timeout=10
            )
            assert pull(stub, ref, auth=api_pb2.AuthConfig(auth=token))


def _hostile_layer() -> timg.Layer:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        data = b"pwned\n"
        info = tarfile.TarInfo("../../../../../../tmp/pouch-escape-test")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    plain = raw.getvalue()
    blob = gzip.compress(plain, mtime=0)
    return timg.Layer(
        timg.Blob.of("application/vnd.oci.image.layer.v1.tar+gzip", blob),
        timg.sha256_digest(plain),
    )


def test_hostile_layer_is_rejected_and_leaves_nothing(img, pd, registry):
    target = Path("/tmp/pouch-escape-test")
    target.unlink(missing_ok=True)
    image = timg.build_image([timg.busybox_layer(), _hostile_layer()])
    push(registry, "test/hostile", "v1", image)
    with pytest.raises(grpc.RpcError) as err:
        pull(img, f"{registry.host}/test/hostile:v1")
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "pouch-escape-test" in err.value.details()
    assert not target.exists()
    assert listed(img) == {}
    # The base layer's unpack may still be finishing (layer work outlives a failed pull).
    deadline = time.monotonic() + 10
    while [p for p in snapshot_dirs(pd) if p.startswith(".tmp-")]:
        assert time.monotonic() < deadline, snapshot_dirs(pd)
        time.sleep(0.05)


def test_registry_failure_then_retry_succeeds(img, registry):
    image = timg.busybox_image()
    push(registry, "test/flaky", "v1", image)
    layer = image.layers[0].blob.digest
    registry.fail(f".*/blobs/{layer}", status=500, times=1)
    with pytest.raises(grpc.RpcError) as err:
        pull(img, f"{registry.host}/test/flaky:v1")
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "RegistryUnavailable" in err.value.details()
    assert pull(img, f"{registry.host}/test/flaky:v1") == image.config.digest


def test_truncated_blob_never_becomes_content(img, pd, registry):
    image = timg.multilayer_image()
    push(registry, "test/truncated", "v1", image)
    top = image.layers[-1].blob
    registry.truncate(f".*/blobs/{top.digest}", after=max(1, top.size // 2))
    with pytest.raises(grpc.RpcError):
        pull(img, f"{registry.host}/test/truncated:v1")
    assert top.digest.removeprefix("sha256:") not in blob_files(pd)
    assert pull(img, f"{registry.host}/test/truncated:v1") == image.config.digest


def test_image_fs_info(img, pd, registry):
    before = img.ImageFsInfo(api_pb2.ImageFsInfoRequest(), timeout=10).image_filesystems[0]
    push(registry, "library/busybox", "latest", timg.busybox_image())
    pull(img, f"{registry.host}/library/busybox:latest")
    after = img.ImageFsInfo(api_pb2.ImageFsInfoRequest(), timeout=10).image_filesystems[0]
    assert after.fs_id.mountpoint == str(pd.root / "snapshots")
    assert after.used_bytes.value > before.used_bytes.value + 500_000  # busybox is ~1 MB
    assert after.inodes_used.value > before.inodes_used.value + 20
    assert after.timestamp > 0


def test_retry_after_deadline_joins_the_running_pull(img, registry):
    image = timg.big_image(total_mb=60, layers=3)
    push(registry, "test/big", "v1", image)
    registry.clear_requests()
    ref = f"{registry.host}/test/big:v1"
    with pytest.raises(grpc.RpcError) as err:
        pull(img, ref, timeout=0.3)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert pull(img, ref, timeout=120) == image.config.digest
    for layer in image.layers:
        assert registry.blob_fetches(layer.blob.digest) == 1


def test_sigkill_mid_pull_then_restart_is_consistent(make_daemon, registry):
    image = timg.big_image(total_mb=60, layers=3)
    push(registry, "test/killed", "v1", image)
    d = make_daemon(config=insecure(registry)).start()
    ref = f"{registry.host}/test/killed:v1"
    registry.clear_requests()

    def start_pull():
        with d.channel() as ch, pytest.raises(grpc.RpcError):
            pull(api_pb2_grpc.ImageServiceStub(ch), ref, timeout=60)

    t = threading.Thread(target=start_pull)
    t.start()
    # Kill once a big layer is streaming in.
    deadline = time.monotonic() + 30
    ingest = d.root / "content" / "ingest"
    while time.monotonic() < deadline:
        if ingest.exists() and any(p.stat().st_size > 1_000_000 for p in ingest.iterdir()):
            break
        time.sleep(0.01)
    d.signal(signal.SIGKILL)
    d.wait(10)
    t.join(30)
    d.start()
    assert list(ingest.iterdir()) == []
    assert not [p for p in snapshot_dirs(d) if p.startswith(".tmp-")]
    with d.channel() as ch:
        stub = api_pb2_grpc.ImageServiceStub(ch)
        assert listed(stub) == {}
        assert pull(stub, ref, timeout=120) == image.config.digest
        assert len(listed(stub)) == 1


def test_uncompressed_and_zstd_layers(img, pd, registry):
    import zstandard

    plain = timg.LayerBuilder().file("data/plain.txt", "plain\n").build(compression="none")
    raw = timg.LayerBuilder().file("data/zstd.txt", "zstd\n").build(compression="none")
    packed = zstandard.ZstdCompressor().compress(raw.blob.read_bytes())
    zstd = timg.Layer(
        timg.Blob.of("application/vnd.oci.image.layer.v1.tar+zstd", packed), raw.diff_id
    )
    image = timg.build_image([timg.busybox_layer(), plain, zstd])
    push(registry, "test/compressions", "v1", image)
    image_id = pull(img, f"{registry.host}/test/compressions:v1")
    chains = _chain_ids(pd, image_id)
    top = pd.root / "snapshots" / chains[2].removeprefix("sha256:")
    middle = pd.root / "snapshots" / chains[1].removeprefix("sha256:")
    assert (top / "data" / "zstd.txt").read_text() == "zstd\n"
    assert (middle / "data" / "plain.txt").read_text() == "plain\n"
