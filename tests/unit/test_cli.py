"""The ``pouch`` command line: output formats, and the client against a fake daemon.

The fake daemon is a grpcio server on a unix socket in the test's directory,
answering the CRI and pouch.v1 calls the client makes with canned messages:
no root, no pouchd.
"""

from __future__ import annotations

import io
from concurrent import futures
from typing import TYPE_CHECKING

import grpc
import pytest
from rich.console import Console

from pouch import __version__
from pouch.cli import PullView, human_size, image_row, pouch_main, short_id, split_name
from pouch.cri._pb.pouch import v1 as pb
from pouch.cri._pb.runtime import v1 as cri
from pouch.cri.client import Client, ClientError

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

pytestmark = pytest.mark.timeout(60)

REF = "127.0.0.1:5000/library/busybox:latest"
IMAGE_ID = "sha256:" + "0123456789ab" + "c" * 52
LAYER_A = "sha256:" + "a" * 64
LAYER_B = "sha256:" + "b" * 64


def _progress(done: bool = False, **layers: tuple[int, str]) -> pb.PullProgress:
    digests = {"a": LAYER_A, "b": LAYER_B}
    return pb.PullProgress(
        image=REF,
        resolved=bool(layers),
        layers=[
            pb.LayerProgress(digest=digests[k], size=2_000_000, done=d, state=s)
            for k, (d, s) in layers.items()
        ],
        done=done,
        image_id=IMAGE_ID if done else "",
    )


PULL_STREAM = [
    _progress(),
    _progress(a=(0, "waiting"), b=(2_000_000, "exists")),
    _progress(a=(1_000_000, "downloading"), b=(2_000_000, "exists")),
    _progress(a=(2_000_000, "unpacking"), b=(2_000_000, "exists")),
    _progress(True, a=(2_000_000, "done"), b=(2_000_000, "exists")),
]

BUSYBOX = cri.Image(
    id=IMAGE_ID,
    repo_tags=[REF, "127.0.0.1:5000/library/busybox:1.36"],
    repo_digests=["127.0.0.1:5000/library/busybox@sha256:" + "e" * 64],
    size=4_234_567,
)
UNTAGGED = cri.Image(id="sha256:" + "f" * 64, size=999)


class FakeDaemon:
    """Canned answers to the calls ``pouch`` makes; records what it was asked."""

    def __init__(self, socket: Path) -> None:
        self.socket = socket
        self.images = {BUSYBOX.id: BUSYBOX, UNTAGGED.id: UNTAGGED}
        self.removed: list[str] = []
        self.pulls: list[pb.PullRequest] = []
        self.loads: list[str] = []

    def _find(self, text: str) -> cri.Image | None:
        for image in self.images.values():
            if text in (image.id, *image.repo_tags) or image.id.startswith(f"sha256:{text}"):
                return image
        return None

    def version(self, request, context):
        return cri.VersionResponse(
            version="0.1.0", runtime_name="pouch", runtime_version="9.9", runtime_api_version="v1"
        )

    def list_images(self, request, context):
        return cri.ListImagesResponse(images=list(self.images.values()))

    def image_status(self, request, context):
        if request.image.image == "Bad Name":
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, 'invalid image reference "Bad Name"')
        image = self._find(request.image.image)
        return cri.ImageStatusResponse(image=image) if image else cri.ImageStatusResponse()

    def remove_image(self, request, context):
        image = self._find(request.image.image)
        if image is not None:
            del self.images[image.id]
            self.removed.append(request.image.image)
        return cri.RemoveImageResponse()

    def pull(self, request, context):
        self.pulls.append(request)
        if "missing" in request.image:
            context.abort(grpc.StatusCode.NOT_FOUND, f"image {request.image} not found")
        if "cut" in request.image:
            yield from PULL_STREAM[:-1]
            return
        yield from PULL_STREAM

    def load(self, request, context):
        self.loads.append(request.path)
        return pb.LoadResponse(
            images=[
                pb.LoadedImage(names=["example.com/a:v1", "example.com/a:v2"], image_id=IMAGE_ID),
                pb.LoadedImage(image_id=UNTAGGED.id),
            ]
        )

    def handlers(self) -> list[grpc.GenericRpcHandler]:
        def unary(fn, request_type):
            return grpc.unary_unary_rpc_method_handler(
                fn, request_deserializer=request_type.FromString, response_serializer=bytes
            )

        return [
            grpc.method_handlers_generic_handler(
                "runtime.v1.RuntimeService", {"Version": unary(self.version, cri.VersionRequest)}
            ),
            grpc.method_handlers_generic_handler(
                "runtime.v1.ImageService",
                {
                    "ListImages": unary(self.list_images, cri.ListImagesRequest),
                    "ImageStatus": unary(self.image_status, cri.ImageStatusRequest),
                    "RemoveImage": unary(self.remove_image, cri.RemoveImageRequest),
                },
            ),
            grpc.method_handlers_generic_handler(
                "pouch.v1.Images",
                {
                    "Pull": grpc.unary_stream_rpc_method_handler(
                        self.pull,
                        request_deserializer=pb.PullRequest.FromString,
                        response_serializer=bytes,
                    ),
                    "Load": unary(self.load, pb.LoadRequest),
                },
            ),
        ]


@pytest.fixture
def fake(tmp_path: Path) -> Iterator[FakeDaemon]:
    daemon = FakeDaemon(tmp_path / "pouch.sock")
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers(daemon.handlers())
    server.add_insecure_port(f"unix://{daemon.socket}")
    server.start()
    try:
        yield daemon
    finally:
        server.stop(None).wait()


def run(fake: FakeDaemon, *args: str) -> int:
    return pouch_main(["--socket", str(fake.socket), *args])


# ---- formats -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "text"),
    [
        (0, "0B"),
        (999, "999B"),
        (1000, "1kB"),
        (4_234_567, "4.235MB"),
        (1_500_000_000, "1.5GB"),
        (10**13, "10TB"),
    ],
)
def test_human_size_is_decimal_with_four_digits(size, text):
    assert human_size(size) == text


@pytest.mark.parametrize(
    ("name", "split"),
    [
        ("docker.io/library/busybox:latest", ("docker.io/library/busybox", "latest")),
        ("127.0.0.1:5000/a/b:v1", ("127.0.0.1:5000/a/b", "v1")),
        ("127.0.0.1:5000/a/b", ("127.0.0.1:5000/a/b", "<none>")),
        ("a/b@sha256:" + "e" * 64, ("a/b", "<none>")),
    ],
)
def test_split_name(name, split):
    assert split_name(name) == split


def test_image_row_uses_the_first_tag_then_a_digest_name():
    assert image_row(BUSYBOX) == (
        "127.0.0.1:5000/library/busybox",
        "latest",
        "0123456789ab",
        "4.235MB",
    )
    digest_only = cri.Image(id=IMAGE_ID, repo_digests=["a/b@sha256:" + "e" * 64], size=1)
    assert image_row(digest_only)[:2] == ("a/b", "<none>")
    assert image_row(UNTAGGED) == ("<none>", "<none>", "f" * 12, "999B")
    assert short_id(LAYER_A) == "a" * 12


def _render(terminal: bool) -> str:
    out = io.StringIO()
    console = Console(file=out, force_terminal=terminal, width=120)
    with PullView(console) as view:
        assert view.live is terminal
        for message in PULL_STREAM:
            view.update(message)
    return out.getvalue()


def test_pull_view_prints_a_line_per_layer_state_off_a_terminal():
    assert _render(terminal=False).splitlines() == [
        f"Pulling {REF}",
        "aaaaaaaaaaaa: Waiting (2MB)",
        "bbbbbbbbbbbb: Already exists (2MB)",
        "aaaaaaaaaaaa: Downloading (2MB)",
        "aaaaaaaaaaaa: Unpacking (2MB)",
        "aaaaaaaaaaaa: Pull complete (2MB)",
    ]


def test_pull_view_draws_a_bar_per_layer_on_a_terminal():
    out = _render(terminal=True)
    assert f"Resolving {REF}" in out
    # The final frame: both layers, complete, with their sizes.
    final = out[out.rindex("aaaaaaaaaaaa") :]
    assert "Pull complete" in final
    assert "2.0/2.0 MB" in final
    assert "bbbbbbbbbbbb" in final
    assert "Already exists" in final
    assert "━" in final


def test_pull_view_handles_a_pull_that_ended_before_it_was_seen():
    out = io.StringIO()
    with PullView(Console(file=out, force_terminal=False)) as view:
        view.update(pb.PullProgress(image=REF, resolved=True, done=True, image_id=IMAGE_ID))
    assert out.getvalue() == f"Pulling {REF}\n"


# ---- commands against the fake daemon -----------------------------------------------


def test_version(fake, capsys):
    assert run(fake, "version") == 0
    out = capsys.readouterr().out
    assert out.splitlines() == [
        f"ClientVersion:  {__version__}",
        "Version:  0.1.0",
        "RuntimeName:  pouch",
        "RuntimeVersion:  9.9",
        "RuntimeApiVersion:  v1",
    ]


def test_images_table(fake, capsys):
    assert run(fake, "images") == 0
    lines = [line.rstrip() for line in capsys.readouterr().out.splitlines()]
    assert lines[0].split() == ["IMAGE", "TAG", "IMAGE", "ID", "SIZE"]
    assert lines[1].split() == [
        "127.0.0.1:5000/library/busybox",
        "latest",
        "0123456789ab",
        "4.235MB",
    ]
    assert lines[2].split() == ["<none>", "<none>", "f" * 12, "999B"]
    assert len(lines) == 3


def test_images_quiet_prints_full_ids(fake, capsys):
    assert run(fake, "images", "-q") == 0
    assert capsys.readouterr().out.split() == [IMAGE_ID, UNTAGGED.id]


def test_rmi_prints_what_it_removed(fake, capsys):
    assert run(fake, "rmi", REF) == 0
    assert fake.removed == [IMAGE_ID]  # by id: what ImageStatus named is what goes
    assert capsys.readouterr().out.splitlines() == [
        f"Untagged: {REF}",
        "Untagged: 127.0.0.1:5000/library/busybox:1.36",
        "Untagged: 127.0.0.1:5000/library/busybox@sha256:" + "e" * 64,
        f"Deleted: {IMAGE_ID}",
    ]


def test_rmi_fails_on_an_unknown_name_but_removes_the_others(fake, capsys):
    assert run(fake, "rmi", "nothere:v1", "Bad Name", "ffffffff") == 1
    captured = capsys.readouterr()
    assert captured.err.splitlines() == [
        "pouch: no such image: nothere:v1",
        'pouch: invalid image reference "Bad Name"',
    ]
    assert captured.out.splitlines() == [f"Deleted: {UNTAGGED.id}"]
    assert fake.removed == [UNTAGGED.id]


def test_rmi_needs_a_name(fake, capsys):
    assert run(fake, "rmi") == 2
    assert "Missing argument" in capsys.readouterr().err


def test_pull_streams_progress_and_prints_the_id(fake, capsys):
    assert run(fake, "pull", "busybox") == 0
    captured = capsys.readouterr()
    assert captured.out == f"{IMAGE_ID}\n"  # only the id on stdout: $(pouch pull x) works
    assert "aaaaaaaaaaaa: Pull complete (2MB)" in captured.err.splitlines()
    (request,) = fake.pulls
    assert (request.image, request.username, request.password) == ("busybox", "", "")


def test_pull_with_credentials(fake, capsys):
    assert run(fake, "pull", "--user", "u", "--password", "p", "busybox") == 0
    assert (fake.pulls[0].username, fake.pulls[0].password) == ("u", "p")


def test_pull_asks_for_the_password(fake, capsys, monkeypatch):
    # click reads hidden input with getpass, which would open /dev/tty.
    asked: list[str] = []

    def getpass(prompt: str = "") -> str:
        asked.append(prompt)
        return "secret"

    monkeypatch.setattr("getpass.getpass", getpass)
    assert run(fake, "pull", "-u", "u", "busybox") == 0
    assert (fake.pulls[0].username, fake.pulls[0].password) == ("u", "secret")
    assert asked == ["Password: "]


def test_pull_password_needs_a_user(fake, capsys):
    assert run(fake, "pull", "--password", "p", "busybox") == 2
    assert "--password needs --user" in capsys.readouterr().err
    assert fake.pulls == []


def test_pull_error_is_reported_with_the_daemons_message(fake, capsys):
    assert run(fake, "pull", "missing/image") == 1
    captured = capsys.readouterr()
    assert captured.err.splitlines()[-1] == "pouch: image missing/image not found"
    assert captured.out == ""


def test_pull_stream_without_a_last_message_is_an_error(fake, capsys):
    assert run(fake, "pull", "cut/short") == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.splitlines()[-1] == "pouch: the pull stream ended without an image id"


def test_load_sends_an_absolute_path(fake, capsys, tmp_path, monkeypatch):
    (tmp_path / "images.tar").write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    assert run(fake, "load", "images.tar") == 0
    assert fake.loads == [str(tmp_path / "images.tar")]
    assert capsys.readouterr().out.splitlines() == [
        "Loaded image: example.com/a:v1",
        "Loaded image: example.com/a:v2",
        f"Loaded image ID: {UNTAGGED.id}",
    ]


def test_load_of_a_missing_file_is_a_usage_error(fake, capsys, tmp_path):
    assert run(fake, "load", str(tmp_path / "nope.tar")) == 2
    assert fake.loads == []


def test_no_daemon_is_an_error_not_a_traceback(tmp_path, capsys):
    assert pouch_main(["--socket", str(tmp_path / "none.sock"), "version"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("pouch: ")
    assert "Traceback" not in err


def test_client_error_carries_code_and_details(fake):
    with Client(fake.socket) as client, pytest.raises(ClientError) as err:
        list(client.pull("missing/x"))
    assert (err.value.code, err.value.details) == ("NOT_FOUND", "image missing/x not found")


def test_help_and_version_exit_zero(capsys):
    assert pouch_main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in ("pull", "images", "rmi", "load", "version"):
        assert command in out
    assert pouch_main(["--version"]) == 0
    assert capsys.readouterr().out == f"pouch {__version__}\n"
