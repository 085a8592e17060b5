"""The test support itself: offline images, the local registry and its proxy.

Needs root (chroot) and the Debian packages in `tests.support.APT_PACKAGES`. Every
subprocess and HTTP call carries a timeout; the trio test runs under `trio.fail_after`.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import stat
import subprocess
import tarfile
from typing import TYPE_CHECKING

import httpx
import pytest
import trio

from tests.support import APT_PACKAGES, images
from tests.support.registry import Registry, open_registry, push, push_async

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

pytestmark = [pytest.mark.integration, pytest.mark.root]

HTTP_TIMEOUT = 10.0
RUN_TIMEOUT = 60.0
ACCEPT_ALL = ", ".join(sorted(images.MANIFEST_TYPES | images.INDEX_TYPES))


@pytest.fixture
def registry() -> Iterator[Registry]:
    with Registry(startup_timeout=30) as reg:
        yield reg


@pytest.fixture
def http(registry: Registry) -> Iterator[httpx.Client]:
    """A plain client through the counting proxy, as pouch would connect."""
    with httpx.Client(base_url=registry.url, timeout=HTTP_TIMEOUT) as client:
        yield client


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def get_manifest(
    http: httpx.Client, repo: str, reference: str, accept: str = ACCEPT_ALL
) -> httpx.Response:
    response = http.get(f"/v2/{repo}/manifests/{reference}", headers={"accept": accept})
    assert response.status_code == 200, response.text
    return response


def assert_manifest(
    http: httpx.Client, repo: str, reference: str, item: images.Image | images.Index
) -> None:
    response = get_manifest(http, repo, reference)
    assert response.content == item.manifest_bytes
    assert sha256(response.content) == item.digest
    assert response.headers["docker-content-digest"] == item.digest
    assert response.headers["content-type"] == item.media_type


def get_blob(http: httpx.Client, repo: str, digest: str) -> bytes:
    response = http.get(f"/v2/{repo}/blobs/{digest}")
    assert response.status_code == 200
    return response.content


def assert_blobs(http: httpx.Client, repo: str, image: images.Image) -> None:
    for blob in image.blobs:
        response = http.get(f"/v2/{repo}/blobs/{blob.digest}")
        assert response.status_code == 200
        assert sha256(response.content) == blob.digest
        assert len(response.content) == blob.size


def test_busybox_push_and_fetch(registry: Registry, http: httpx.Client) -> None:
    image = images.busybox_image()
    assert push(registry, "library/busybox", "latest", image) == image.digest
    assert registry.requests() == []  # push goes around the proxy

    assert_manifest(http, "library/busybox", "latest", image)
    assert_manifest(http, "library/busybox", image.digest, image)
    assert_blobs(http, "library/busybox", image)

    config = json.loads(get_blob(http, "library/busybox", image.config.digest))
    assert config["architecture"] == images.host_platform().architecture
    assert config["config"]["Cmd"] == ["sh"]
    assert config["rootfs"]["diff_ids"] == [images.busybox_layer().diff_id]
    assert registry.blob_fetches(image.config.digest) == 2  # assert_blobs, then get_blob
    assert registry.blob_fetches(image.layers[0].blob.digest) == 1
    assert registry.count("/v2/library/busybox/manifests/.*") == 2
    assert registry.count("/v2/library/busybox/manifests/.*", method="HEAD") == 0


def test_push_is_idempotent_and_skips_existing_blobs(registry: Registry) -> None:
    image = images.multilayer_image()
    push(registry, "app", "v1", image)
    push(registry, "app", "v2", image)  # every blob HEADs as present
    with registry.client() as client:
        tags = client.get("/v2/app/tags/list").json()
    assert sorted(tags["tags"]) == ["v1", "v2"]


def test_multilayer_push_and_fetch(registry: Registry, http: httpx.Client) -> None:
    image = images.multilayer_image()
    push(registry, "multi", "v1", image)
    assert_manifest(http, "multi", "v1", image)
    assert_blobs(http, "multi", image)
    assert len(image.layers) == 4
    assert image.layers[0] == images.busybox_layer()  # shared base: same blob as busybox


@pytest.mark.parametrize("docker", [False, True], ids=["oci", "docker"])
def test_multiarch_index_push_and_fetch(
    registry: Registry, http: httpx.Client, docker: bool
) -> None:
    index = images.multiarch_index(images.busybox_image())
    if docker:
        index = images.to_docker(index)
    push(registry, "multiarch", "latest", index)

    assert_manifest(http, "multiarch", "latest", index)
    body = json.loads(index.manifest_bytes)
    platforms = [images.Platform(**m["platform"]) for m in body["manifests"]]
    assert platforms[-1] == images.host_platform()  # the real image comes last
    assert len(set(platforms)) == 3
    for image in index.images:
        assert_manifest(http, "multiarch", image.digest, image)
        assert_blobs(http, "multiarch", image)
        expected = images.DOCKER_MANIFEST if docker else images.OCI_MANIFEST
        assert image.media_type == expected
    assert index.image_for(images.host_platform()).config == (
        images.to_docker(images.busybox_image()).config if docker else images.busybox_image().config
    )


def test_docker_schema2_image(registry: Registry, http: httpx.Client) -> None:
    oci = images.busybox_image()
    docker = images.to_docker(oci)
    push(registry, "docker", "latest", docker)
    response = get_manifest(http, "docker", "latest", accept=images.DOCKER_MANIFEST)
    assert response.headers["content-type"] == images.DOCKER_MANIFEST
    manifest = response.json()
    assert manifest["config"]["mediaType"] == images.DOCKER_CONFIG
    assert manifest["layers"][0]["mediaType"] == images.DOCKER_LAYER_GZIP
    # Same bytes, other media types: config and layer digests are shared with the OCI image.
    assert docker.config.digest == oci.config.digest
    assert docker.layers[0].blob.digest == oci.layers[0].blob.digest
    assert docker.digest != oci.digest
    assert_blobs(http, "docker", docker)


def test_basic_auth() -> None:
    with Registry(auth=("pouch", "s3cret")) as registry:
        plain = httpx.get(f"{registry.url}/v2/", timeout=HTTP_TIMEOUT)
        assert plain.status_code == 401
        assert plain.headers["www-authenticate"].startswith("Basic realm=")
        wrong = httpx.get(f"{registry.url}/v2/", auth=("pouch", "nope"), timeout=HTTP_TIMEOUT)
        assert wrong.status_code == 401
        ok = httpx.get(f"{registry.url}/v2/", auth=("pouch", "s3cret"), timeout=HTTP_TIMEOUT)
        assert ok.status_code == 200

        image = images.busybox_image()
        push(registry, "private/busybox", "1.0", image)
        url = f"{registry.url}/v2/private/busybox/manifests/1.0"
        headers = {"accept": images.OCI_MANIFEST}
        assert httpx.get(url, headers=headers, timeout=HTTP_TIMEOUT).status_code == 401
        response = httpx.get(url, headers=headers, auth=("pouch", "s3cret"), timeout=HTTP_TIMEOUT)
        assert response.status_code == 200
        assert response.headers["docker-content-digest"] == image.digest


def test_injected_faults(registry: Registry, http: httpx.Client) -> None:
    image = images.busybox_image()
    push(registry, "flaky", "latest", image)
    layer = image.layers[0].blob

    registry.fail(f"/v2/flaky/blobs/{layer.digest}", status=503)
    assert http.get(f"/v2/flaky/blobs/{layer.digest}").status_code == 503
    assert http.get(f"/v2/flaky/blobs/{layer.digest}").content == layer.data  # spent

    registry.truncate("/v2/flaky/blobs/.*", after=1000)
    with pytest.raises(httpx.RemoteProtocolError):
        http.get(f"/v2/flaky/blobs/{layer.digest}")
    assert sha256(get_blob(http, "flaky", layer.digest)) == layer.digest

    statuses = [(r.status, r.fault) for r in registry.requests()]
    assert statuses == [(503, True), (200, False), (200, True), (200, False)]
    registry.clear_requests()
    assert registry.requests() == []


def test_big_image_layout_and_push(registry: Registry, http: httpx.Client, tmp_path: Path) -> None:
    image = images.big_image(total_mb=6, layers=2, cache_dir=tmp_path)
    assert len(image.layers) == 3  # busybox plus two random layers
    for layer in image.layers[1:]:
        assert layer.blob.path is not None
        assert layer.blob.data is None
        with tarfile.open(layer.blob.path) as tar:
            assert sum(m.size for m in tar) == 3 * 2**20
    again = images.big_image(total_mb=6, layers=2, cache_dir=tmp_path)  # from the cache
    assert again == image

    push(registry, "big", "latest", image)
    assert_manifest(http, "big", "latest", image)
    for blob in image.blobs:
        digest = hashlib.sha256()
        with http.stream("GET", f"/v2/big/blobs/{blob.digest}") as response:
            for chunk in response.iter_bytes():
                digest.update(chunk)
        assert "sha256:" + digest.hexdigest() == blob.digest


def _images(item: images.Image | images.Index) -> tuple[images.Image, ...]:
    return item.images if isinstance(item, images.Index) else (item,)


def test_oci_layout_round_trip(tmp_path: Path) -> None:
    index = images.multiarch_index(images.multilayer_image())
    refs: dict[str, images.Image | images.Index] = {
        "index": index,
        "web": images.webserver_image(),
        "docker": images.to_docker(index),
    }
    images.write_oci_layout(tmp_path, refs)
    loaded = images.read_oci_layout(tmp_path)
    assert loaded.keys() == refs.keys()
    for name, item in refs.items():
        got = loaded[name]
        assert got.manifest == item.manifest
        for want, have in zip(_images(item), _images(got), strict=True):
            assert (have.manifest, have.config, have.platform) == (
                want.manifest,
                want.config,
                want.platform,
            )
            assert have.diff_ids == want.diff_ids
            for layer in have.layers:
                assert layer.blob.path is not None  # layers stay files
                assert sha256(layer.blob.read_bytes()) == layer.blob.digest
    # skopeo reads the layout independently.
    result = run(["skopeo", "inspect", "--raw", f"oci:{tmp_path}:web"])
    assert result.stdout == images.webserver_image().manifest_bytes


def test_skopeo_copies_index_and_fetches_each_blob_once(registry: Registry, tmp_path: Path) -> None:
    index = images.multiarch_index(images.multilayer_image())
    push(registry, "library/multi", "v1", index)
    run(
        [
            "skopeo", "--insecure-policy", "copy", "--all", "--src-tls-verify=false",
            f"docker://{registry.ref('library/multi', 'v1')}", f"oci:{tmp_path}:copy",
        ]
    )  # fmt: skip
    copied = images.read_oci_layout(tmp_path)["copy"]
    assert isinstance(copied, images.Index)
    assert copied.digest == index.digest
    for image in index.images:
        for blob in image.blobs:
            assert registry.blob_fetches(blob.digest) == 1, blob.digest
    assert all(r.status == 200 for r in registry.requests() if "/blobs/" in r.path)


def run(argv: list[str], *, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    if shutil.which(argv[0]) is None:
        pytest.fail(f"{argv[0]} is missing: apt-get install -y {' '.join(APT_PACKAGES)}")
    result = subprocess.run(
        argv, capture_output=True, timeout=RUN_TIMEOUT, check=False, input=stdin
    )
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    return result


# --- the images run -------------------------------------------------------------------------


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.is_symlink() or path.exists():
        path.unlink()


def unpack(image: images.Image, root: Path) -> None:
    """Apply the layers the simple way (image-spec layer.md), as a reference applier."""
    for layer in image.layers:
        with tarfile.open(fileobj=io.BytesIO(layer.blob.read_bytes())) as tar:
            for member in tar:
                path = root / member.name
                if path.name == ".wh..wh..opq":
                    for child in path.parent.iterdir():
                        _remove(child)
                    continue
                if path.name.startswith(".wh."):
                    _remove(path.parent / path.name.removeprefix(".wh."))
                    continue
                if not (member.isdir() and path.is_dir() and not path.is_symlink()):
                    _remove(path)
                tar.extract(member, root, numeric_owner=True, filter="fully_trusted")


def test_busybox_image_runs(tmp_path: Path) -> None:
    unpack(images.busybox_image(), tmp_path)
    assert stat.S_IMODE(os.lstat(tmp_path / "tmp").st_mode) == 0o1777
    script = "id app; id -u nobody; echo hi | sha256sum; ls /bin | wc -l"
    out = run(["chroot", str(tmp_path), "/bin/sh", "-c", script]).stdout.decode().split("\n")
    assert out[0] == "uid=1000(app) gid=1000(app) groups=1000(app)"
    assert out[1] == "65534"
    assert out[2].startswith(hashlib.sha256(b"hi\n").hexdigest())
    assert int(out[3]) == len(images.BUSYBOX_APPLETS) + 1


def test_multilayer_image_unpacks_to_expected_tree(tmp_path: Path) -> None:
    unpack(images.multilayer_image(), tmp_path)
    expected = images.multilayer_expected()
    kinds = {"file": stat.S_ISREG, "dir": stat.S_ISDIR, "symlink": stat.S_ISLNK}
    for name, want in expected.present.items():
        path = tmp_path / name.lstrip("/")
        st = os.lstat(path)
        assert kinds[want.kind](st.st_mode), name
        assert (st.st_uid, st.st_gid) == (want.uid, want.gid), name
        if want.kind == "symlink":
            assert os.readlink(path) == want.target
            continue
        assert stat.S_IMODE(st.st_mode) == want.mode, name
        if want.data is not None:
            assert path.read_bytes() == want.data, name
    for name in expected.absent:
        assert not os.path.lexists(tmp_path / name.lstrip("/")), name
    for group in expected.hardlinks:
        assert len({os.lstat(tmp_path / p.lstrip("/")).st_ino for p in group}) == 1
    out = run(["chroot", str(tmp_path), "/bin/cat", "/data/link-abs", "/data/link-rel"]).stdout
    assert out == b"keep v2\nkeep v2\n"


def test_webserver_image_serves_index(tmp_path: Path) -> None:
    image = images.webserver_image()
    exec_config = image.config_json()["config"]
    assert isinstance(exec_config, dict)
    assert exec_config["Cmd"] == ["httpd", "-f", "-p", "8080", "-h", "/www"]
    unpack(image, tmp_path)
    # httpd -i serves one request on stdin/stdout (inetd mode): no port needed.
    request = b"GET /index.html HTTP/1.0\r\nHost: x\r\n\r\n"
    out = run(["chroot", str(tmp_path), "/bin/httpd", "-i", "-h", "/www"], stdin=request).stdout
    assert out.startswith(b"HTTP/1.1 200 OK")
    assert out.endswith(images.WEBSERVER_INDEX_HTML)


async def test_trio_registry_and_async_client() -> None:
    with trio.fail_after(60):
        async with open_registry(auth=("u", "p")) as registry:
            image = images.multilayer_image()
            await push_async(registry, "async/multi", "v1", image)
            async with httpx.AsyncClient(
                base_url=registry.url, auth=("u", "p"), timeout=HTTP_TIMEOUT
            ) as client:
                response = await client.get(
                    "/v2/async/multi/manifests/v1", headers={"accept": images.OCI_MANIFEST}
                )
                assert response.status_code == 200
                assert response.content == image.manifest_bytes
                for blob in image.blobs:
                    got = await client.get(f"/v2/async/multi/blobs/{blob.digest}")
                    assert sha256(got.content) == blob.digest
            assert registry.count("/v2/async/multi/blobs/.*") == len(image.blobs)
