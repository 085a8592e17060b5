"""Tests for pouch.image.archive: OCI layout and docker save tars, and hostile ones.

Every archive is built here in ``tmp_path`` from the offline test images of
``tests.support.images``: OCI layouts with `write_oci_layout`, docker save
archives by hand, laid out as moby's ``image/tarexport/save.go`` writes them
(``<v1 id>/layer.tar`` holding the *uncompressed* layer, ``<hex>.json``, a
``manifest.json`` and a ``repositories`` file).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
from typing import IO, TYPE_CHECKING, Literal

import pytest
import zstandard

from pouch.errors import InvalidArgument, NotFound
from pouch.image import media
from pouch.image.archive import (
    ANNOTATION_IMAGE_NAME,
    ANNOTATION_REF_NAME,
    MAX_JSON_SIZE,
    Archive,
    ArchiveImage,
)
from tests.support.images import (
    Image,
    Index,
    LayerBuilder,
    build_image,
    busybox_image,
    busybox_layer,
    host_platform,
    multiarch_index,
    write_oci_layout,
)

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence
    from pathlib import Path

pytestmark = pytest.mark.timeout(120)

MTIME = 1_704_067_200
WriteMode = Literal["w", "w:gz", "w:bz2", "w:xz"]


# --------------------------------------------------------------------------
# Building archives


def _info(name: str, kind: bytes = tarfile.REGTYPE, size: int = 0) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.size, info.mtime = kind, size, MTIME
    info.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
    return info


def reg(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes | None]:
    return _info(name, size=len(data)), data


def sym(name: str, target: str) -> tuple[tarfile.TarInfo, bytes | None]:
    info = _info(name, tarfile.SYMTYPE)
    info.linkname = target
    return info, None


def directory(name: str) -> tuple[tarfile.TarInfo, bytes | None]:
    return _info(name, tarfile.DIRTYPE), None


def write_tar(
    path: Path, entries: Sequence[tuple[tarfile.TarInfo, bytes | None]], *, mode: WriteMode = "w"
) -> Path:
    """A tar of `entries` in order; `mode` "w:gz", "w:bz2" or "w:xz" compresses it."""
    with tarfile.open(path, mode) as tar:
        for info, data in entries:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def tar_directory(path: Path, root: Path, *, mode: WriteMode = "w") -> Path:
    """Tar `root` as ``tar -C root -cf path .`` does: members named ``./...``."""
    with tarfile.open(path, mode) as tar:
        tar.add(root, arcname=".")
    return path


def oci_archive(
    tmp_path: Path,
    refs: Mapping[str, Image | Index],
    *,
    mode: WriteMode = "w",
    annotations: Mapping[int, Mapping[str, str]] | None = None,
    name: str = "image.tar",
) -> Path:
    """An OCI image-layout tar; `annotations` replace those of index.json entry i."""
    layout = tmp_path / f"{name}.layout"
    write_oci_layout(layout, refs)
    if annotations:
        index = json.loads((layout / "index.json").read_bytes())
        for i, extra in annotations.items():
            index["manifests"][i]["annotations"] = dict(extra)
        (layout / "index.json").write_text(json.dumps(index))
    return tar_directory(tmp_path / name, layout, mode=mode)


def v1_id(seed: str) -> str:
    return hashlib.sha256(seed.encode()).hexdigest()


def docker_entries(
    images: Sequence[tuple[Image, Sequence[str] | None]],
    *,
    repositories: bool = True,
    gzip_layers: bool = False,
) -> list[tuple[tarfile.TarInfo, bytes | None]]:
    """The members of a ``docker save`` of `images` (image, RepoTags), in save.go's layout.

    A layer two images share is stored once; the second image's ``layer.tar``
    is a relative symlink to the first, as save.go does.
    """
    entries: list[tuple[tarfile.TarInfo, bytes | None]] = []
    manifest: list[dict[str, object]] = []
    repos: dict[str, dict[str, str]] = {}
    saved: dict[str, str] = {}  # diff id -> v1 id whose layer.tar holds it
    for n, (image, tags) in enumerate(images):
        layer_files = []
        for i, layer in enumerate(image.layers):
            layer_id = v1_id(f"{n}/{i}/{layer.diff_id}")
            layer_files.append(f"{layer_id}/layer.tar")
            entries.append(directory(layer_id))
            entries.append(reg(f"{layer_id}/VERSION", b"1.0"))
            entries.append(reg(f"{layer_id}/json", json.dumps({"id": layer_id}).encode()))
            if layer.diff_id in saved:
                entries.append(sym(f"{layer_id}/layer.tar", f"../{saved[layer.diff_id]}/layer.tar"))
                continue
            data = gzip.decompress(layer.blob.read_bytes())  # docker save stores plain tars
            if gzip_layers:
                data = layer.blob.read_bytes()
            entries.append(reg(f"{layer_id}/layer.tar", data))
            saved[layer.diff_id] = layer_id
        config_name = f"{image.config.hex}.json"
        entries.append(reg(config_name, image.config_bytes))
        item: dict[str, object] = {"Config": config_name, "Layers": layer_files}
        if tags is not None:
            item["RepoTags"] = list(tags)
            for tag in tags:
                repo, sep, label = tag.rpartition(":")
                if not sep or "/" in label:
                    repo, label = tag, "latest"
                repos.setdefault(repo, {})[label] = layer_files[-1].split("/")[0]
        manifest.append(item)
    entries.append(reg("manifest.json", json.dumps(manifest).encode()))
    if repositories:
        entries.append(reg("repositories", json.dumps(repos).encode()))
    return entries


def sha256_stream(stream: IO[bytes]) -> tuple[str, int]:
    digest, size = hashlib.sha256(), 0
    while chunk := stream.read(65536):
        digest.update(chunk)
        size += len(chunk)
    return "sha256:" + digest.hexdigest(), size


def assert_blobs_stream(archive: Archive, image: ArchiveImage) -> None:
    """Every blob of `image` streams from `archive` to the digest and size it is listed with."""
    descs = [image.manifest.config, *image.manifest.layers]
    for desc in descs:
        with archive.open_blob(desc.digest) as stream:
            assert sha256_stream(stream) == (desc.digest, desc.size)
        assert archive.blob_size(desc.digest) == desc.size
    with archive.open_blob(image.manifest_digest) as stream:
        assert stream.read() == image.manifest_bytes


def media_platform(platform: object) -> media.Platform:
    os_, arch, variant = (getattr(platform, k) for k in ("os", "architecture", "variant"))
    return media.Platform(os=os_, architecture=arch, variant=variant)


def small_image(text: str) -> Image:
    return build_image([LayerBuilder().dir("etc").file("etc/motd", text).build()])


# --------------------------------------------------------------------------
# OCI image layout


def test_oci_layout_single_image(tmp_path):
    image = busybox_image()
    path = oci_archive(
        tmp_path,
        {"latest": image},
        annotations={
            0: {ANNOTATION_IMAGE_NAME: "busybox:1.36", ANNOTATION_REF_NAME: "1.36"},
        },
    )
    with Archive(path) as archive:
        assert archive.path == path
        [item] = archive.images
        assert item.names == ("docker.io/library/busybox:1.36",)
        assert item.manifest_digest == image.digest
        assert item.manifest_bytes == image.manifest_bytes
        assert item.manifest == media.parse_manifest(image.manifest_bytes, image.media_type)
        assert item.index_digest is None
        assert item.manifest.config.digest == image.config.digest
        assert [d.digest for d in item.manifest.layers] == [
            layer.blob.digest for layer in image.layers
        ]
        assert_blobs_stream(archive, item)


@pytest.mark.parametrize(
    ("annotations", "names"),
    [
        # org.opencontainers.image.ref.name alone: a bare tag names nothing.
        ({ANNOTATION_REF_NAME: "latest"}, ()),
        ({ANNOTATION_REF_NAME: "1.0.0"}, ()),
        # ...but one with "/", ":" or "@" is a full reference (containerd refTranslator).
        ({ANNOTATION_REF_NAME: "busybox:latest"}, ("docker.io/library/busybox:latest",)),
        (
            {ANNOTATION_REF_NAME: "registry.local:5000/team/app:v1"},
            ("registry.local:5000/team/app:v1",),
        ),
        ({ANNOTATION_REF_NAME: "user/app"}, ("docker.io/user/app:latest",)),
        # OCI ref grammar allows refs that are no image reference: no name.
        ({ANNOTATION_REF_NAME: "Not/A:Ref@x"}, ()),
        # io.containerd.image.name wins over the ref name and is normalised.
        (
            {ANNOTATION_IMAGE_NAME: "index.docker.io/busybox", ANNOTATION_REF_NAME: "other:v2"},
            ("docker.io/library/busybox:latest",),
        ),
        ({}, ()),
    ],
)
def test_oci_names(tmp_path, annotations, names):
    path = oci_archive(tmp_path, {"x": busybox_image()}, annotations={0: annotations})
    with Archive(path) as archive:
        assert [item.names for item in archive.images] == [names]


def test_oci_invalid_containerd_name_is_an_error(tmp_path):
    path = oci_archive(
        tmp_path, {"x": busybox_image()}, annotations={0: {ANNOTATION_IMAGE_NAME: "Bad Name"}}
    )
    with pytest.raises(InvalidArgument, match=r"index\.json entry 0: io\.containerd\.image\.name"):
        Archive(path)


def test_oci_entries_for_one_image_merge_their_names(tmp_path):
    image, other = busybox_image(), small_image("other\n")
    path = oci_archive(
        tmp_path,
        {"a": image, "b": image, "c": other},
        annotations={
            0: {ANNOTATION_IMAGE_NAME: "docker.io/library/busybox:a"},
            1: {ANNOTATION_IMAGE_NAME: "busybox:b"},
            2: {ANNOTATION_IMAGE_NAME: "example.com/other:1"},
        },
    )
    with Archive(path) as archive:
        assert [(item.names, item.manifest_digest) for item in archive.images] == [
            (("docker.io/library/busybox:a", "docker.io/library/busybox:b"), image.digest),
            (("example.com/other:1",), other.digest),
        ]
        for item in archive.images:
            assert_blobs_stream(archive, item)


def test_oci_multiplatform_index_resolves_to_host(tmp_path):
    index = multiarch_index(busybox_image())
    path = oci_archive(tmp_path, {"busybox:multi": index})
    with Archive(path) as archive:
        [item] = archive.images
        host = index.image_for(host_platform())
        assert host.digest == busybox_image().digest  # not the stubs listed first
        assert item.names == ("docker.io/library/busybox:multi",)
        assert item.index_digest == index.digest
        assert item.manifest_digest == host.digest
        assert item.manifest_bytes == host.manifest_bytes
        assert_blobs_stream(archive, item)
        assert sha256_stream(archive.open_blob(index.digest)) == (
            index.digest,
            len(index.manifest_bytes),
        )


def test_oci_multiplatform_index_resolves_to_a_given_platform(tmp_path):
    index = multiarch_index(busybox_image())
    stub = index.images[0]
    path = oci_archive(tmp_path, {"busybox:multi": index})
    with Archive(path, platform=media_platform(stub.platform)) as archive:
        [item] = archive.images
        assert (item.manifest_digest, item.index_digest) == (stub.digest, index.digest)


def test_oci_multiplatform_index_without_the_platform(tmp_path):
    index = multiarch_index(busybox_image())
    path = oci_archive(tmp_path, {"busybox:multi": index})
    with pytest.raises(InvalidArgument, match=r"no image for platform linux/s390x"):
        Archive(path, platform=media.Platform("linux", "s390x"))


def test_oci_index_only_needs_the_selected_platform_blobs(tmp_path):
    # `ctr export --platform` style: the index lists every platform, the tar
    # holds only one platform's blobs.
    index = multiarch_index(busybox_image())
    layout = tmp_path / "layout"
    write_oci_layout(layout, {"busybox:multi": index})
    for stub in index.images[:-1]:
        for blob in (stub.manifest, *stub.blobs):
            (layout / "blobs" / "sha256" / blob.hex).unlink()
    with Archive(tar_directory(tmp_path / "a.tar", layout)) as archive:
        assert archive.images[0].manifest_digest == busybox_image().digest


@pytest.mark.parametrize("mode", ["w:gz", "w:bz2", "w:xz"])
def test_oci_compressed_archive(tmp_path, mode):
    image, other = busybox_image(), small_image("compressed\n")
    path = oci_archive(tmp_path, {"busybox:latest": image, "other:1": other}, mode=mode)
    with Archive(path) as archive:
        assert [item.manifest_digest for item in archive.images] == [image.digest, other.digest]
        for item in archive.images:
            assert_blobs_stream(archive, item)


def test_oci_layout_wins_over_manifest_json(tmp_path):
    # Docker 25+ writes both; containerd reads the layout.
    layout = tmp_path / "layout"
    write_oci_layout(layout, {"busybox:latest": busybox_image()})
    (layout / "manifest.json").write_text("this is not read")
    with Archive(tar_directory(tmp_path / "a.tar", layout)) as archive:
        assert archive.images[0].names == ("docker.io/library/busybox:latest",)


def test_oci_members_without_dot_slash(tmp_path):
    image = small_image("plain names\n")
    layout = tmp_path / "layout"
    write_oci_layout(layout, {"app:1": image})
    entries = [reg("oci-layout", (layout / "oci-layout").read_bytes())]
    entries.append(reg("index.json", (layout / "index.json").read_bytes()))
    for blob in sorted((layout / "blobs" / "sha256").iterdir()):
        entries.append(reg(f"blobs/sha256/{blob.name}", blob.read_bytes()))
    with Archive(write_tar(tmp_path / "a.tar", entries)) as archive:
        assert archive.images[0].names == ("docker.io/library/app:1",)
        assert_blobs_stream(archive, archive.images[0])


# --------------------------------------------------------------------------
# docker save


def test_docker_save(tmp_path):
    image = busybox_image()
    path = write_tar(tmp_path / "save.tar", docker_entries([(image, ["busybox:latest"])]))
    with Archive(path) as archive:
        [item] = archive.images
        assert item.names == ("docker.io/library/busybox:latest",)
        assert item.index_digest is None
        manifest = item.manifest
        assert manifest.media_type == media.OCI_MANIFEST
        assert manifest.config == media.Descriptor(
            media.OCI_CONFIG, image.config.digest, image.config.size
        )
        layer_tar = gzip.decompress(busybox_layer().blob.read_bytes())
        assert manifest.layers == (
            media.Descriptor(media.OCI_LAYER, busybox_layer().diff_id, len(layer_tar)),
        )
        # The synthesised manifest is canonical JSON and reads back the same.
        doc = json.loads(item.manifest_bytes)
        assert (
            item.manifest_bytes == json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
        )
        assert doc["schemaVersion"] == 2
        assert media.parse_manifest(item.manifest_bytes, media.OCI_MANIFEST) == manifest
        assert item.manifest_digest == media.sha256_digest(item.manifest_bytes)
        assert_blobs_stream(archive, item)
        with archive.open_blob(image.config.digest) as stream:
            assert stream.read() == image.config_bytes


def test_docker_save_several_images_sharing_a_layer(tmp_path):
    # save.go stores a shared layer once and symlinks the second copy.
    base = busybox_image()
    app = build_image(
        [busybox_layer(), LayerBuilder().dir("app").file("app/run", "#!/bin/sh\n").build()]
    )
    entries = docker_entries([(base, ["busybox:1.36", "busybox:latest"]), (app, ["app:v1"])])
    assert any(info.issym() for info, _ in entries)
    with Archive(write_tar(tmp_path / "save.tar", entries)) as archive:
        first, second = archive.images
        assert first.names == ("docker.io/library/busybox:1.36", "docker.io/library/busybox:latest")
        assert second.names == ("docker.io/library/app:v1",)
        assert second.manifest.layers[0] == first.manifest.layers[0]
        assert [d.digest for d in second.manifest.layers] == list(app.diff_ids)
        for item in archive.images:
            assert_blobs_stream(archive, item)


def test_docker_save_gzipped_layer_files(tmp_path):
    # Some tools write compressed layer.tar files; the media type follows the bytes.
    image = busybox_image()
    entries = docker_entries([(image, ["busybox"])], gzip_layers=True)
    with Archive(write_tar(tmp_path / "save.tar", entries)) as archive:
        [layer] = archive.images[0].manifest.layers
        blob = busybox_layer().blob
        assert layer == media.Descriptor(media.OCI_LAYER_GZIP, blob.digest, blob.size)
        assert_blobs_stream(archive, archive.images[0])


@pytest.mark.parametrize("mode", ["w:gz", "w:xz"])
def test_docker_save_compressed_archive(tmp_path, mode):
    base = busybox_image()
    other = small_image("docker\n")
    entries = docker_entries([(base, ["busybox:latest"]), (other, ["other:1"])])
    with Archive(write_tar(tmp_path / "save.tar.gz", entries, mode=mode)) as archive:
        assert [item.names for item in archive.images] == [
            ("docker.io/library/busybox:latest",),
            ("docker.io/library/other:1",),
        ]
        # Open in reverse archive order, and two at once: each stream is independent.
        items = archive.images[::-1]
        streams = [archive.open_blob(item.manifest.layers[-1].digest) for item in items]
        digests = [hashlib.sha256() for _ in streams]
        while chunks := [s.read(4096) for s in streams]:
            if not any(chunks):
                break
            for d, chunk in zip(digests, chunks, strict=True):
                d.update(chunk)
        for item, d, s in zip(items, digests, streams, strict=True):
            assert "sha256:" + d.hexdigest() == item.manifest.layers[-1].digest
            s.close()


def test_docker_save_names_from_repositories(tmp_path):
    # Without RepoTags, older archives name the image in "repositories" by the
    # v1 id of its top layer.
    image = busybox_image()
    entries = docker_entries([(image, ["busybox:old", "registry.local/busybox:x"])])
    manifest_info, manifest_data = entries[-2]
    assert manifest_info.name == "manifest.json"
    assert manifest_data is not None
    doc = json.loads(manifest_data)
    doc[0]["RepoTags"] = None
    entries[-2] = reg("manifest.json", json.dumps(doc).encode())
    with Archive(write_tar(tmp_path / "save.tar", entries)) as archive:
        assert archive.images[0].names == (
            "docker.io/library/busybox:old",
            "registry.local/busybox:x",
        )


def test_docker_save_unnamed_image(tmp_path):
    entries = docker_entries([(small_image("x\n"), None)], repositories=False)
    with Archive(write_tar(tmp_path / "save.tar", entries)) as archive:
        assert archive.images[0].names == ()


def test_streams_outlive_the_archive(tmp_path):
    image = busybox_image()
    path = write_tar(tmp_path / "save.tar", docker_entries([(image, ["busybox"])]))
    archive = Archive(path)
    stream = archive.open_blob(image.diff_ids[0])
    archive.close()
    archive.close()  # idempotent
    assert sha256_stream(stream)[0] == image.diff_ids[0]
    stream.close()


def test_open_blob_unknown_or_malformed_digest(tmp_path):
    path = oci_archive(tmp_path, {"x": small_image("x\n")})
    with Archive(path) as archive:
        with pytest.raises(NotFound, match=r"has no blob sha256:0{64}"):
            archive.open_blob("sha256:" + "0" * 64)
        with pytest.raises(NotFound):
            archive.blob_size("sha256:" + "0" * 64)
        with pytest.raises(InvalidArgument, match="invalid blob digest"):
            archive.open_blob("sha256:../../etc/passwd")


# --------------------------------------------------------------------------
# Hostile and broken archives


def layout_entries(image: Image) -> list[tuple[tarfile.TarInfo, bytes | None]]:
    """An OCI layout of `image` as tar entries, to break one at a time."""
    index = {
        "schemaVersion": 2,
        "mediaType": media.OCI_INDEX,
        "manifests": [{**image.manifest.descriptor(), "annotations": {ANNOTATION_REF_NAME: "a:1"}}],
    }
    entries = [reg("oci-layout", b'{"imageLayoutVersion":"1.0.0"}')]
    entries.append(reg("index.json", json.dumps(index).encode()))
    for blob in (image.manifest, *image.blobs):
        entries.append(reg(f"blobs/sha256/{blob.hex}", blob.read_bytes()))
    return entries


def test_layout_entries_are_valid(tmp_path):
    with Archive(write_tar(tmp_path / "a.tar", layout_entries(small_image("ok\n")))) as archive:
        assert archive.images[0].names == ("docker.io/library/a:1",)


@pytest.mark.parametrize("name", ["../x", "blobs/../../x", "/etc/passwd", "./a/../../x"])
def test_member_names_escaping_the_archive(tmp_path, name):
    entries = [*layout_entries(small_image("x\n")), reg(name, b"evil")]
    path = write_tar(tmp_path / "a.tar", entries)
    with pytest.raises(
        InvalidArgument, match=r"has an absolute name|has a '\.\.' component"
    ) as exc:
        Archive(path)
    assert str(path) in str(exc.value)
    assert repr(name) in str(exc.value)


def test_oci_missing_blob(tmp_path):
    image = small_image("x\n")
    layer_digest = image.layers[0].blob.digest
    entries = [e for e in layout_entries(image) if not e[0].name.endswith(image.layers[0].blob.hex)]
    path = write_tar(tmp_path / "a.tar", entries)
    with pytest.raises(InvalidArgument) as exc:
        Archive(path)
    assert str(exc.value) == (
        f"archive {path}: manifest {image.digest}: layer 0 blob {layer_digest}"
        f" ('blobs/sha256/{image.layers[0].blob.hex}') is missing"
    )


def test_oci_missing_manifest(tmp_path):
    image = small_image("x\n")
    entries = [e for e in layout_entries(image) if not e[0].name.endswith(image.manifest.hex)]
    with pytest.raises(InvalidArgument, match=rf"blob {image.digest} .* is missing"):
        Archive(write_tar(tmp_path / "a.tar", entries))


def test_oci_blob_that_is_a_symlink(tmp_path):
    image = small_image("x\n")
    config = f"blobs/sha256/{image.config.hex}"
    entries = [e for e in layout_entries(image) if e[0].name != config]
    entries += [reg("elsewhere", image.config_bytes), sym(config, "../../elsewhere")]
    with pytest.raises(InvalidArgument, match=r"config blob .* is not a regular file"):
        Archive(write_tar(tmp_path / "a.tar", entries))


def test_oci_blob_of_the_wrong_size(tmp_path):
    image = small_image("x\n")
    config = f"blobs/sha256/{image.config.hex}"
    entries = [e for e in layout_entries(image) if e[0].name != config]
    entries.append(reg(config, image.config_bytes + b" "))
    with pytest.raises(InvalidArgument, match=r"is \d+ bytes, but its descriptor says \d+"):
        Archive(write_tar(tmp_path / "a.tar", entries))


@pytest.mark.parametrize(
    ("member", "data", "message"),
    [
        ("index.json", b"{not json", r"index\.json: image index is not valid JSON"),
        ("index.json", b"[]", r"index\.json: image index is not a JSON object"),
        ("index.json", b'{"manifests": [{"mediaType": 1}]}', r"index\.json: index entry 0"),
        ("oci-layout", b"nope", r"oci-layout is not valid JSON"),
        ("oci-layout", b'{"imageLayoutVersion":"2.0.0"}', r"unsupported imageLayoutVersion"),
    ],
)
def test_oci_malformed_documents(tmp_path, member, data, message):
    entries = [e for e in layout_entries(small_image("x\n")) if e[0].name != member]
    entries.append(reg(member, data))
    with pytest.raises(InvalidArgument, match=message):
        Archive(write_tar(tmp_path / "a.tar", entries))


def test_oci_malformed_manifest(tmp_path):
    image = small_image("x\n")
    name = f"blobs/sha256/{image.manifest.hex}"
    entries = [e for e in layout_entries(image) if e[0].name != name]
    entries.append(reg(name, b"{" + b" " * (image.manifest.size - 1)))  # keep the size
    with pytest.raises(InvalidArgument, match=rf"{name}.*image manifest is not valid JSON"):
        Archive(write_tar(tmp_path / "a.tar", entries))


def test_oci_index_entry_of_an_unsupported_type(tmp_path):
    image = small_image("x\n")
    layer = image.layers[0].blob
    index = {"schemaVersion": 2, "manifests": [layer.descriptor()]}
    entries = [e for e in layout_entries(image) if e[0].name != "index.json"]
    entries.append(reg("index.json", json.dumps(index).encode()))
    with pytest.raises(InvalidArgument, match=r"unsupported media type"):
        Archive(write_tar(tmp_path / "a.tar", entries))


def test_oci_layout_without_index(tmp_path):
    entries = [e for e in layout_entries(small_image("x\n")) if e[0].name != "index.json"]
    with pytest.raises(InvalidArgument, match=r"has an oci-layout file but no index\.json"):
        Archive(write_tar(tmp_path / "a.tar", entries))


def test_docker_missing_layer(tmp_path):
    manifest = [{"Config": "c.json", "RepoTags": ["a:1"], "Layers": ["a/layer.tar"]}]
    entries = [reg("c.json", b"{}"), reg("manifest.json", json.dumps(manifest).encode())]
    path = write_tar(tmp_path / "save.tar", entries)
    with pytest.raises(InvalidArgument) as exc:
        Archive(path)
    assert str(exc.value) == (
        f"archive {path}: manifest.json lists layer 'a/layer.tar' which is missing"
    )


def test_docker_missing_config(tmp_path):
    manifest = [{"Config": "c.json", "Layers": []}]
    entries = [reg("manifest.json", json.dumps(manifest).encode())]
    with pytest.raises(
        InvalidArgument, match=r"manifest\.json lists config 'c\.json' which is missing"
    ):
        Archive(write_tar(tmp_path / "save.tar", entries))


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("../../x/layer.tar", r"a symlink to '\.\./\.\./x/layer\.tar' outside the archive"),
        ("/etc/passwd", r"a symlink to '/etc/passwd' outside the archive"),
        ("../b/layer.tar", r"which is missing \(through a symlink to 'b/layer\.tar'\)"),
        ("layer.tar", r"a chain of too many symlinks"),
    ],
)
def test_docker_bad_layer_symlinks(tmp_path, target, message):
    manifest = [{"Config": "c.json", "Layers": ["a/layer.tar"]}]
    entries = [reg("c.json", b"{}"), sym("a/layer.tar", target)]
    entries.append(reg("manifest.json", json.dumps(manifest).encode()))
    with pytest.raises(InvalidArgument, match=message):
        Archive(write_tar(tmp_path / "save.tar", entries))


def test_docker_layer_that_is_not_a_file(tmp_path):
    manifest = [{"Config": "c.json", "Layers": ["a/layer.tar"]}]
    entries = [reg("c.json", b"{}"), (_info("a/layer.tar", tarfile.FIFOTYPE), None)]
    entries.append(reg("manifest.json", json.dumps(manifest).encode()))
    with pytest.raises(InvalidArgument, match=r"layer 'a/layer\.tar', which is not a regular file"):
        Archive(write_tar(tmp_path / "save.tar", entries))


@pytest.mark.parametrize(
    ("manifest", "message"),
    [
        (b"{not json", r"manifest\.json is not valid JSON"),
        (b"{}", r"manifest\.json is not a JSON list"),
        (b"[1]", r"manifest\.json entry 0 is not a JSON object"),
        (b'[{"Layers": []}]', r"entry 0: 'Config' must be a file name"),
        (b'[{"Config": "c.json", "Layers": "x"}]', r"'Layers' must be a list of file names"),
        (b'[{"Config": "c.json", "Layers": [], "RepoTags": "a"}]', r"'RepoTags' must be a list"),
        (b'[{"Config": "c.json", "Layers": [], "RepoTags": ["A B"]}]', r"RepoTags: invalid image"),
        (b'[{"Config": "../c.json", "Layers": []}]', r"config '\.\./c\.json', which is outside"),
        (b'[{"Config": "c.json", "Layers": ["/a"]}]', r"layer '/a', which is outside the archive"),
    ],
)
def test_docker_malformed_manifest_json(tmp_path, manifest, message):
    entries = [reg("c.json", b"{}"), reg("manifest.json", manifest)]
    with pytest.raises(InvalidArgument, match=message):
        Archive(write_tar(tmp_path / "save.tar", entries))


@pytest.mark.parametrize(
    ("config", "message"),
    [(b"{oops", r"config 'c\.json' is not valid JSON"), (b"[]", r"not a JSON object")],
)
def test_docker_malformed_config(tmp_path, config, message):
    manifest = [{"Config": "c.json", "Layers": []}]
    entries = [reg("c.json", config), reg("manifest.json", json.dumps(manifest).encode())]
    with pytest.raises(InvalidArgument, match=message):
        Archive(write_tar(tmp_path / "save.tar", entries))


def test_docker_malformed_repositories(tmp_path):
    entries = docker_entries([(small_image("x\n"), None)], repositories=False)
    entries.append(reg("repositories", b'{"a": "not a map"}'))
    with pytest.raises(InvalidArgument, match=r"repositories: 'a' must map tags to layer ids"):
        Archive(write_tar(tmp_path / "save.tar", entries))


def test_docker_save_without_manifest_json(tmp_path):
    entries = [reg("repositories", b"{}"), reg("abc/layer.tar", b"")]
    with pytest.raises(InvalidArgument, match=r"without manifest\.json \(Docker before 1\.10\)"):
        Archive(write_tar(tmp_path / "save.tar", entries))


def test_neither_format(tmp_path):
    path = write_tar(tmp_path / "a.tar", [reg("hello.txt", b"hi"), reg("index.json", b"{}")])
    with pytest.raises(InvalidArgument) as exc:
        Archive(path)
    assert str(exc.value).startswith(
        f"archive {path} is neither an OCI image layout nor a docker save archive"
    )


def test_empty_tar(tmp_path):
    with pytest.raises(InvalidArgument, match="is neither an OCI image layout"):
        Archive(write_tar(tmp_path / "a.tar", []))


@pytest.mark.parametrize("member", ["manifest.json", "c.json"])
def test_huge_json_document(tmp_path, member):
    manifest = json.dumps([{"Config": "c.json", "Layers": []}]).encode()
    docs = {"manifest.json": manifest, "c.json": b"{}"}
    docs[member] = b"[" + b" " * MAX_JSON_SIZE + b"]"
    entries = [reg(name, data) for name, data in docs.items()]
    with pytest.raises(InvalidArgument, match=rf"'{member}' is \d+ bytes, more than the \d+"):
        Archive(write_tar(tmp_path / "save.tar", entries))


def test_huge_oci_manifest(tmp_path):
    big = b"{" + b" " * MAX_JSON_SIZE + b"}"
    index = {
        "schemaVersion": 2,
        "manifests": [
            {"mediaType": media.OCI_MANIFEST, "digest": media.sha256_digest(big), "size": len(big)}
        ],
    }
    entries = [reg("oci-layout", b'{"imageLayoutVersion":"1.0.0"}')]
    entries.append(reg("index.json", json.dumps(index).encode()))
    entries.append(reg(f"blobs/sha256/{hashlib.sha256(big).hexdigest()}", big))
    with pytest.raises(InvalidArgument, match=r"more than the 16777216 allowed"):
        Archive(write_tar(tmp_path / "a.tar", entries))


def test_duplicate_member(tmp_path):
    entries = [*layout_entries(small_image("x\n")), reg("index.json", b"{}")]
    with pytest.raises(InvalidArgument, match=r"member 'index\.json' appears more than once"):
        Archive(write_tar(tmp_path / "a.tar", entries))


def test_not_a_tar(tmp_path):
    path = tmp_path / "a.tar"
    path.write_bytes(b"this is not a tar archive at all" * 100)
    with pytest.raises(InvalidArgument, match=rf"archive {path}: cannot read the tar"):
        Archive(path)


def test_corrupt_gzip(tmp_path):
    path = tmp_path / "a.tar.gz"
    path.write_bytes(b"\x1f\x8b" + b"garbage" * 100)
    with pytest.raises(InvalidArgument, match=rf"archive {path}: cannot read"):
        Archive(path)


@pytest.mark.parametrize("mode", ["w", "w:gz"])
def test_truncated_archive(tmp_path, mode):
    path = write_tar(tmp_path / "a.tar", layout_entries(busybox_image()), mode=mode)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(InvalidArgument, match=rf"archive {path}: cannot read"):
        Archive(path)


def test_archive_truncated_after_opening(tmp_path):
    image = busybox_image()
    path = write_tar(tmp_path / "a.tar", layout_entries(image))
    with Archive(path) as archive:
        stream = archive.open_blob(image.layers[0].blob.digest)
        with path.open("r+b") as f:
            f.truncate(4096)
        with stream, pytest.raises(InvalidArgument, match=r"member .* is truncated"):
            stream.read()


def test_zstd_archive_is_refused(tmp_path):
    plain = write_tar(tmp_path / "a.tar", layout_entries(small_image("x\n")))
    path = tmp_path / "a.tar.zst"
    path.write_bytes(zstandard.ZstdCompressor().compress(plain.read_bytes()))
    with pytest.raises(InvalidArgument, match="compressed with zstd, which is not supported"):
        Archive(path)


def test_missing_file(tmp_path):
    with pytest.raises(InvalidArgument, match=r"cannot open archive .*/nope\.tar"):
        Archive(tmp_path / "nope.tar")


def test_directory_is_not_an_archive(tmp_path):
    with pytest.raises(InvalidArgument, match="is not a regular file"):
        Archive(tmp_path)
