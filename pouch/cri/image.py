"""ImageService RPCs: PullImage, ImageStatus, ListImages, RemoveImage, ImageFsInfo."""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING

from pouch.cri._pb.runtime import v1 as pb
from pouch.errors import InvalidArgument
from pouch.image.registry import Credentials

if TYPE_CHECKING:
    from pouch.core import Core
    from pouch.image.manager import Image


def _image_text(spec: pb.ImageSpec | None, field: str) -> str:
    text = spec.image.strip() if spec is not None else ""
    if not text:
        raise InvalidArgument(f"{field} is required")
    return text


def _credentials(auth: pb.AuthConfig | None) -> Credentials | None:
    if auth is None:
        return None
    creds = Credentials(
        username=auth.username,
        password=auth.password,
        auth=auth.auth,
        identity_token=auth.identity_token,
        registry_token=auth.registry_token,
    )
    return None if creds == Credentials() else creds


async def pull_image(core: Core, req: pb.PullImageRequest) -> pb.PullImageResponse:
    """Pull and return the image id (the config digest), as containerd does."""
    text = _image_text(req.image, "image.image")
    image_id = await core.images.pull(text, _credentials(req.auth))
    return pb.PullImageResponse(image_ref=image_id)


def _user_fields(user: str) -> tuple[pb.Int64Value | None, str]:
    # "uid[:gid]" gives a uid; a name gives a username (cri-api: uid XOR username).
    name = user.split(":", 1)[0]
    if not name:
        return None, ""
    if name.isdigit():
        return pb.Int64Value(value=int(name)), ""
    return None, name


def to_pb_image(image: Image) -> pb.Image:
    uid, username = _user_fields(image.user)
    out = pb.Image(
        id=image.image_id,
        repo_tags=list(image.repo_tags),
        repo_digests=list(image.repo_digests),
        size=image.size,
        username=username,
        spec=pb.ImageSpec(image=image.image_id),
        pinned=image.pinned,
    )
    if uid is not None:
        out.uid = uid
    return out


async def image_status(core: Core, req: pb.ImageStatusRequest) -> pb.ImageStatusResponse:
    """An unknown image is not an error: the response has no image (cri-api)."""
    image = core.images.get(_image_text(req.image, "image.image"))
    if image is None:
        return pb.ImageStatusResponse()
    info: dict[str, str] = {}
    if req.verbose:
        config = json.loads(await core.images.config_of(image.image_id))
        info["info"] = json.dumps(
            {
                "imageSpec": config,
                "chainIDs": list(image.chain_ids),
                "manifestDigest": image.manifest_digest,
            }
        )
    return pb.ImageStatusResponse(image=to_pb_image(image), info=info)


async def list_images(core: Core, req: pb.ListImagesRequest) -> pb.ListImagesResponse:
    wanted = req.filter.image.image.strip() if req.filter and req.filter.image else ""
    if wanted:
        image = core.images.get(wanted)
        images = [image] if image is not None else []
    else:
        images = core.images.all()
    return pb.ListImagesResponse(images=[to_pb_image(i) for i in images])


async def remove_image(core: Core, req: pb.RemoveImageRequest) -> pb.RemoveImageResponse:
    """Idempotent: removing an image that is not there succeeds (cri-api)."""
    await core.images.remove(_image_text(req.image, "image.image"))
    return pb.RemoveImageResponse()


async def image_fs_info(core: Core, req: pb.ImageFsInfoRequest) -> pb.ImageFsInfoResponse:
    del req
    used_bytes, inodes = await core.images.fs_usage()
    usage = pb.FilesystemUsage(
        timestamp=time.time_ns(),
        fs_id=pb.FilesystemIdentifier(mountpoint=str(core.images.snapshots.root)),
        used_bytes=pb.UInt64Value(value=used_bytes),
        inodes_used=pb.UInt64Value(value=inodes),
    )
    return pb.ImageFsInfoResponse(image_filesystems=[usage])
