"""pouch.v1 on the Trio side of the edge: Pull's progress stream and Load."""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING, cast

import pytest
import trio
from grpclib.const import Status
from grpclib.exceptions import GRPCError

from pouch import errors
from pouch.cri import extensions
from pouch.cri._instrument import CallGate, instrument
from pouch.cri._pb.pouch import v1 as pb
from pouch.cri._pb.runtime import v1 as cri
from pouch.image.manager import LayerProgress, PullProgress
from pouch.image.registry import Credentials

if TYPE_CHECKING:
    from pouch.core import Core

REF = "docker.io/library/busybox:latest"
IMAGE_ID = "sha256:" + "c" * 64
LAYERS = ("sha256:" + "a" * 64, "sha256:" + "b" * 64)


class FakeImages:
    """The image manager's pull surface: ``progress`` entries and ``pull``.

    ``pull`` behaves as ImageManager's: the entry appears once the pull
    task runs, layers once the manifest is resolved, and the entry is
    deleted when the pull ends.
    """

    def __init__(
        self,
        *,
        chunks: int = 4,
        chunk_delay: float = 0.5,
        error: Exception | None = None,
        on_disk: bool = False,
    ) -> None:
        self.progress: dict[str, PullProgress] = {}
        self.chunks = chunks
        self.chunk_delay = chunk_delay
        self.error = error
        self.on_disk = on_disk
        self.calls: list[tuple[str, Credentials | None]] = []
        self.loaded: list[object] = []

    async def pull(self, text: str, creds: Credentials | None = None) -> str:
        self.calls.append((text, creds))
        await trio.lowlevel.checkpoint()  # the manager's nursery starts the pull task
        progress = self.progress[REF] = PullProgress(ref=REF)
        try:
            if self.on_disk:  # resolve, see every layer is there: a few ms
                await trio.sleep(0.003)
                progress.layers = [LayerProgress(d, 1000, 1000, "exists") for d in LAYERS]
                progress.resolved = True
                progress.touch()
                await trio.sleep(0.001)
                return IMAGE_ID
            await trio.sleep(0.2)  # resolving at the registry
            if self.error is not None:
                raise self.error
            progress.layers = [LayerProgress(d, 1000) for d in LAYERS]
            progress.resolved = True
            progress.touch()
            for layer in progress.layers:
                layer.state = "downloading"
                for _ in range(self.chunks):
                    await trio.sleep(self.chunk_delay)
                    layer.done += 1000 // self.chunks
                    progress.touch()
                layer.state = "done"
                progress.touch()
            return IMAGE_ID
        finally:
            del self.progress[REF]

    async def load(self, path):
        self.loaded.append(path)
        return [(("example.com/a:v1", "example.com/a:v2"), IMAGE_ID), ((), "sha256:" + "d" * 64)]


class FakeCore:
    def __init__(self, images: FakeImages) -> None:
        self.images = images


def core_of(images: FakeImages) -> Core:
    """A core holding only *images*: all the pouch.v1 calls touch."""
    return cast("Core", FakeCore(images))


class Recorder:
    def __init__(self) -> None:
        self.sent: list[tuple[float, pb.PullProgress]] = []

    async def __call__(self, message: pb.PullProgress) -> None:
        self.sent.append((trio.current_time(), message))

    @property
    def messages(self) -> list[pb.PullProgress]:
        return [m for _, m in self.sent]


def _gate() -> CallGate:
    gate = CallGate()
    gate.open()
    return gate


async def test_pull_streams_progress_then_the_image_id(autojump_clock):
    images = FakeImages()
    send = Recorder()
    await extensions.pull(core_of(images), pb.PullRequest(image="busybox"), send)
    messages = send.messages
    assert images.calls == [("busybox", None)]
    assert all(m.image == REF for m in messages)
    # Before the manifest: no layers; then every layer, in order.
    assert not messages[0].resolved
    assert not messages[0].layers
    assert [layer.digest for layer in messages[-2].layers] == list(LAYERS)
    downloading = [m.layers[0].done for m in messages if m.layers]
    assert downloading == sorted(downloading)
    assert {layer.state for m in messages for layer in m.layers} >= {
        "waiting",
        "downloading",
        "done",
    }
    final = messages[-1]
    assert (final.done, final.resolved, final.image_id) == (True, True, IMAGE_ID)
    assert [(x.digest, x.size, x.done, x.state) for x in final.layers] == [
        (d, 1000, 1000, "done") for d in LAYERS
    ]
    assert not any(m.done for m in messages[:-1])


async def test_pull_sends_at_most_ten_messages_a_second(autojump_clock):
    images = FakeImages(chunks=500, chunk_delay=0.001)  # a touch every millisecond
    send = Recorder()
    await extensions.pull(core_of(images), pb.PullRequest(image="busybox"), send)
    times = [t for t, _ in send.sent[:-1]]  # the final message is not held back
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert min(gaps) >= extensions.MIN_INTERVAL - 1e-9
    assert len(times) <= 1.0 / extensions.MIN_INTERVAL + 3  # ~1 s of pulling
    # The last progress message before the final one is at most one interval
    # stale: 100 touches of 2 bytes.
    assert send.messages[-2].layers[1].done >= 800


async def test_a_pull_over_in_milliseconds_still_reports_its_layers(autojump_clock):
    send = Recorder()
    await extensions.pull(core_of(FakeImages(on_disk=True)), pb.PullRequest(image="busybox"), send)
    final = send.messages[-1]
    assert final.done
    assert [(x.digest, x.state) for x in final.layers] == [(d, "exists") for d in LAYERS]


async def test_pull_passes_credentials(autojump_clock):
    images = FakeImages(chunks=1)
    await extensions.pull(
        core_of(images), pb.PullRequest(image="busybox", username="u", password="p"), Recorder()
    )
    assert images.calls == [("busybox", Credentials(username="u", password="p"))]


async def test_pull_error_is_the_core_error_not_a_group(autojump_clock):
    images = FakeImages(error=errors.NotFound("image busybox not found"))
    call = instrument("Pull", lambda *a: extensions.pull(core_of(images), *a), _gate())
    with pytest.raises(GRPCError) as err:
        await call(pb.PullRequest(image="busybox"), None, Recorder())
    assert err.value.status is Status.NOT_FOUND
    assert err.value.message == "image busybox not found"


@pytest.mark.parametrize("image", ["", "  ", "Not/A:Valid:Ref"])
async def test_pull_rejects_bad_references(image):
    with pytest.raises(errors.InvalidArgument):
        await extensions.pull(core_of(FakeImages()), pb.PullRequest(image=image), Recorder())


async def test_pull_cancelled_by_the_client_stops_streaming(autojump_clock):
    images = FakeImages()
    send = Recorder()
    with trio.move_on_after(0.5):
        await extensions.pull(core_of(images), pb.PullRequest(image="busybox"), send)
    assert send.messages
    assert not any(m.done for m in send.messages)


async def test_load_returns_names_and_ids():
    images = FakeImages()
    response = await extensions.load(core_of(images), pb.LoadRequest(path="/tmp/a.tar"))
    assert [(list(i.names), i.image_id) for i in response.images] == [
        (["example.com/a:v1", "example.com/a:v2"], IMAGE_ID),
        ([], "sha256:" + "d" * 64),
    ]
    assert [str(p) for p in images.loaded] == ["/tmp/a.tar"]


@pytest.mark.parametrize("path", ["", "a.tar", "./a.tar"])
async def test_load_needs_an_absolute_path(path):
    with pytest.raises(errors.InvalidArgument):
        await extensions.load(core_of(FakeImages()), pb.LoadRequest(path=path))


def test_every_extension_rpc_is_implemented_and_named_apart_from_the_cri():
    paths = [path for base in extensions.extension_bases() for path in base.__mapping__()]
    assert sorted(paths) == ["/pouch.v1.Images/Load", "/pouch.v1.Images/Pull"]
    names = {path.rsplit("/", 1)[-1] for path in paths}
    assert names == set(extensions.IMPLEMENTED_EXTENSIONS)
    # service.build looks RPCs up by bare name: a clash would shadow a CRI call.
    cri_names = {
        path.rsplit("/", 1)[-1]
        for base in (cri.RuntimeServiceBase(), cri.ImageServiceBase())
        for path in base.__mapping__()
    }
    assert not names & cri_names
