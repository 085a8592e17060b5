"""The ``pouch`` command line: output formats, and the client against a fake daemon.

The fake daemon is a grpcio server on a unix socket in the test's directory,
answering the CRI and pouch.v1 calls the client makes with canned messages:
no root, no pouchd.
"""

from __future__ import annotations

import functools
import io
import json
import os
import re
import signal
import socket
import threading
import time
from concurrent import futures
from typing import TYPE_CHECKING

import grpc
import pytest
import trio
import trio.testing
from rich.console import Console

from pouch import __version__
from pouch.cli import (
    ATTACH_LINGER,
    LogEntry,
    LogFile,
    LogJoiner,
    LogWriter,
    PouchError,
    PullView,
    container_row,
    container_tty,
    created_ago,
    follow_log,
    human_duration,
    human_size,
    image_column,
    image_row,
    parse_log_line,
    parse_port_mapping,
    pod_row,
    pouch_main,
    read_log,
    resolve_id,
    short_id,
    split_name,
    status_document,
)
from pouch.config import StreamConfig
from pouch.cri._pb.pouch import v1 as pb
from pouch.cri._pb.runtime import v1 as cri
from pouch.cri.client import Client, ClientError
from pouch.stream import client as sc
from pouch.stream import remotecommand
from pouch.stream.server import StreamServer
from pouch.stream.session import AttachRequest, ExecRequest, PortForwardRequest, SessionLimits
from tests.unit.stream.fake_backend import FakeBackend

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


NS = 1_000_000_000
POD_WEB = "d0" + "1" * 62
POD_JOB = "e0" + "2" * 62
RUNNING = "cafe" + "3" * 60
EXITED = "cab0" + "4" * 60
CREATED = "f00d" + "5" * 60


def _pods(now: float) -> list[cri.PodSandbox]:
    return [
        cri.PodSandbox(
            id=POD_WEB,
            metadata=cri.PodSandboxMetadata(name="web", uid="u1", namespace="default", attempt=1),
            state=cri.PodSandboxState.SANDBOX_READY,
            created_at=int((now - 150) * NS),
        ),
        cri.PodSandbox(
            id=POD_JOB,
            metadata=cri.PodSandboxMetadata(name="job", uid="u2", namespace="batch"),
            state=cri.PodSandboxState.SANDBOX_NOTREADY,
            created_at=int((now - 3 * 3600) * NS),
            runtime_handler="crun",
        ),
    ]


def _containers(now: float) -> list[cri.Container]:
    def container(id_, pod, name, state, age, image):
        return cri.Container(
            id=id_,
            pod_sandbox_id=pod,
            metadata=cri.ContainerMetadata(name=name, attempt=2 if name == "app" else 0),
            image=cri.ImageSpec(image=image),
            image_ref=IMAGE_ID,
            state=state,
            created_at=int((now - age) * NS),
        )

    return [
        container(RUNNING, POD_WEB, "app", cri.ContainerState.CONTAINER_RUNNING, 90, REF),
        container(EXITED, POD_JOB, "once", cri.ContainerState.CONTAINER_EXITED, 5, IMAGE_ID),
        container(CREATED, POD_WEB, "side", cri.ContainerState.CONTAINER_CREATED, 0.2, REF),
    ]


class FakeDaemon:
    """Canned answers to the calls ``pouch`` makes; records what it was asked."""

    def __init__(self, socket: Path) -> None:
        self.socket = socket
        self.images = {BUSYBOX.id: BUSYBOX, UNTAGGED.id: UNTAGGED}
        self.removed: list[str] = []
        self.pulls: list[pb.PullRequest] = []
        self.loads: list[str] = []
        now = time.time()
        self.pods = _pods(now)
        self.containers = _containers(now)
        self.log_paths: dict[str, str] = {}
        self.status_calls = 0
        self.exit_codes: dict[str, int] = {}
        self.tty_containers: set[str] = set()
        #: Where Exec, Attach and PortForward get their URLs (`StreamThread`).
        self.streams: StreamThread | None = None
        self.stream_requests: list[object] = []

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

    def list_pod_sandbox(self, request, context):
        return cri.ListPodSandboxResponse(items=self.pods)

    def pod_sandbox_status(self, request, context):
        (pod,) = [p for p in self.pods if p.id == request.pod_sandbox_id]
        status = cri.PodSandboxStatus(
            id=pod.id, metadata=pod.metadata, state=pod.state, created_at=pod.created_at
        )
        info = {"info": json.dumps({"pid": 42, "runtimeSpec": {"ociVersion": "1.2.0"}})}
        return cri.PodSandboxStatusResponse(status=status, info=info if request.verbose else {})

    def list_containers(self, request, context):
        flt = request.filter
        found = [
            c
            for c in self.containers
            if c.pod_sandbox_id.startswith(flt.pod_sandbox_id)
            and (not flt.is_set("state") or c.state == flt.state.state)
        ]
        return cri.ListContainersResponse(containers=found)

    def container_status(self, request, context):
        self.status_calls += 1
        found = [c for c in self.containers if c.id == request.container_id]
        if not found:
            context.abort(grpc.StatusCode.NOT_FOUND, f"container {request.container_id} not found")
        (c,) = found
        status = cri.ContainerStatus(
            id=c.id,
            metadata=c.metadata,
            state=c.state,
            created_at=c.created_at,
            image=c.image,
            image_ref=c.image_ref,
            log_path=self.log_paths.get(c.id, ""),
            exit_code=self.exit_codes.get(c.id, 0),
        )
        details: dict[str, object] = {"pid": 7, "sandboxID": c.pod_sandbox_id}
        if c.id in self.tty_containers:
            details["runtimeSpec"] = {"process": {"terminal": True}}
        info = {"info": json.dumps(details), "raw": "not json"}
        return cri.ContainerStatusResponse(status=status, info=info if request.verbose else {})

    def _stream_url(self, request: object, context) -> str:
        self.stream_requests.append(request)
        if self.streams is None:
            context.abort(grpc.StatusCode.UNAVAILABLE, "the stream server is not serving")
        return self.streams.url(request)

    def exec(self, request, context):
        req = ExecRequest(
            request.container_id,
            tuple(request.cmd),
            tty=request.tty,
            stdin=request.stdin,
            stdout=request.stdout,
            stderr=request.stderr,
        )
        return cri.ExecResponse(url=self._stream_url(req, context))

    def attach(self, request, context):
        req = AttachRequest(
            request.container_id,
            tty=request.tty,
            stdin=request.stdin,
            stdout=request.stdout,
            stderr=request.stderr,
        )
        return cri.AttachResponse(url=self._stream_url(req, context))

    def port_forward(self, request, context):
        req = PortForwardRequest(request.pod_sandbox_id, tuple(request.port))
        return cri.PortForwardResponse(url=self._stream_url(req, context))

    def set_state(self, container_id: str, state: cri.ContainerState) -> None:
        for c in self.containers:
            if c.id == container_id:
                c.state = state

    def handlers(self) -> list[grpc.GenericRpcHandler]:
        def unary(fn, request_type):
            return grpc.unary_unary_rpc_method_handler(
                fn, request_deserializer=request_type.FromString, response_serializer=bytes
            )

        return [
            grpc.method_handlers_generic_handler(
                "runtime.v1.RuntimeService",
                {
                    "Version": unary(self.version, cri.VersionRequest),
                    "ListPodSandbox": unary(self.list_pod_sandbox, cri.ListPodSandboxRequest),
                    "PodSandboxStatus": unary(self.pod_sandbox_status, cri.PodSandboxStatusRequest),
                    "ListContainers": unary(self.list_containers, cri.ListContainersRequest),
                    "ContainerStatus": unary(self.container_status, cri.ContainerStatusRequest),
                    "Exec": unary(self.exec, cri.ExecRequest),
                    "Attach": unary(self.attach, cri.AttachRequest),
                    "PortForward": unary(self.port_forward, cri.PortForwardRequest),
                },
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
    for command in ("pull", "images", "rmi", "load", "version", "pods", "ps", "inspect", "logs"):
        assert command in out
    assert pouch_main(["--version"]) == 0
    assert capsys.readouterr().out == f"pouch {__version__}\n"


# ---- pods and containers: formats ---------------------------------------------------


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (-5, "Less than a second"),  # a clock behind the daemon's
        (0.4, "Less than a second"),
        (1, "1 second"),
        (59.9, "59 seconds"),
        (60, "About a minute"),
        (119, "About a minute"),
        (150, "2 minutes"),
        (59 * 60 + 59, "59 minutes"),
        (3600, "About an hour"),
        (5399, "About an hour"),
        (5400, "2 hours"),  # hours are rounded, as go-units does
        (47 * 3600, "47 hours"),
        (48 * 3600, "2 days"),
        (13 * 86400, "13 days"),
        (14 * 86400, "2 weeks"),
        (60 * 86400, "2 months"),
        (730 * 86400, "2 years"),
    ],
)
def test_human_duration_is_go_units(seconds, text):
    assert human_duration(seconds) == text


def test_created_ago_takes_nanoseconds():
    assert created_ago(100 * NS, now=250.0) == "2 minutes ago"


def test_pod_and_container_rows():
    now = time.time()
    web, job = _pods(now)
    assert pod_row(web, now) == (
        POD_WEB[:13],
        "2 minutes ago",
        "Ready",
        "web",
        "default",
        "1",
        "(default)",
    )
    assert pod_row(job, now)[2:] == ("NotReady", "job", "batch", "0", "crun")
    assert pod_row(job, now)[1] == "3 hours ago"
    running, exited, created = _containers(now)
    assert container_row(running, now) == (
        RUNNING[:13],
        REF,
        "About a minute ago",
        "Running",
        "app",
        "2",
        POD_WEB[:13],
    )
    assert container_row(exited, now)[1:4] == ("0123456789abc", "5 seconds ago", "Exited")
    assert container_row(created, now)[2:4] == ("Less than a second ago", "Created")
    unknown = cri.Container(id="x", state=cri.ContainerState.CONTAINER_UNKNOWN)
    assert container_row(unknown, now)[3] == "Unknown"


def test_image_column_shortens_only_digests():
    def image(text, ref=""):
        return image_column(cri.Container(image=cri.ImageSpec(image=text), image_ref=ref))

    assert image(REF) == REF
    assert image(IMAGE_ID) == "0123456789abc"
    assert image("busybox@sha256:" + "e" * 64) == "busybox@sha256:" + "e" * 64
    assert image("", ref=IMAGE_ID) == "0123456789abc"


def test_resolve_id_by_unique_prefix():
    ids = [RUNNING, EXITED, CREATED]
    assert resolve_id("caf", ids, "container") == RUNNING
    assert resolve_id(EXITED, ids, "container") == EXITED
    assert resolve_id("beef", ids, "container") is None
    with pytest.raises(PouchError, match='container id prefix "ca" is ambiguous'):
        resolve_id("ca", ids, "container")
    with pytest.raises(PouchError, match="empty"):
        resolve_id("", ids, "container")
    # An id that is also the prefix of another id is that id.
    assert resolve_id("ab", ["ab", "abc"], "pod") == "ab"


def test_status_document_parses_info_and_keeps_the_status():
    status = cri.ContainerStatus(id="x", state=cri.ContainerState.CONTAINER_EXITED, exit_code=3)
    document = status_document(
        status, {"info": '{"pid": 7}', "raw": "plain text", "status": '"not this"'}
    )
    assert list(document) == ["status", "info", "raw"]
    assert document["info"] == {"pid": 7}
    assert document["raw"] == "plain text"
    shown = document["status"]
    assert isinstance(shown, dict)
    assert (shown["id"], shown["state"], shown["exitCode"]) == ("x", "CONTAINER_EXITED", 3)
    assert shown["createdAt"] == "0"  # the protobuf JSON mapping: int64 as a string
    json.dumps(document)


# ---- container logs: parsing, joining, following ----------------------------------------

TS = b"2024-05-01T10:00:00.123456789Z"


def _line(stream: str, tag: str, text: str, ts: bytes = TS) -> bytes:
    return b" ".join([ts, stream.encode(), tag.encode(), text.encode()])


@pytest.mark.parametrize(
    ("line", "parsed"),
    [
        (_line("stdout", "F", "hello world"), (TS, "stdout", False, b"hello world")),
        (_line("stderr", "P", "part "), (TS, "stderr", True, b"part ")),
        (_line("stdout", "F", ""), (TS, "stdout", False, b"")),
        (TS + b" stdout F", (TS, "stdout", False, b"")),  # no space before empty text
        (TS + b" stdout F:x:y multi  spaces ", (TS, "stdout", False, b"multi  spaces ")),
        (_line("stdout", "F", "with newline") + b"\n", (TS, "stdout", False, b"with newline")),
        (b"garbage", None),
        (TS + b" stdin F x", None),
        (TS + b" stdout X x", None),
        (b"", None),
    ],
)
def test_parse_log_line(line, parsed):
    assert parse_log_line(line) == parsed


def test_joiner_joins_partial_parts_per_stream():
    joiner = LogJoiner()
    t1, t2 = b"2024-05-01T10:00:01Z", b"2024-05-01T10:00:02Z"
    lines = [
        _line("stdout", "P", "aaa", t1),
        _line("stderr", "P", "err-", t1),
        _line("stdout", "P", "bbb", t2),
        _line("stderr", "F", "end", t2),
        b"not a log line",
        _line("stdout", "F", "ccc", t2),
        _line("stdout", "F", "next", t2),
        _line("stderr", "P", "cut off", t2),
    ]
    entries = [e for line in lines if (e := joiner.feed(line)) is not None]
    assert entries == [
        LogEntry(t1, "stderr", b"err-end"),
        LogEntry(t1, "stdout", b"aaabbbccc"),  # the time of the first part
        LogEntry(t2, "stdout", b"next"),
    ]
    assert joiner.flush() == [LogEntry(t2, "stderr", b"cut off")]
    assert joiner.flush() == []


def test_writer_splits_streams_and_adds_timestamps():
    out, err = io.BytesIO(), io.BytesIO()
    entries = [LogEntry(TS, "stdout", b"o\xff"), LogEntry(TS, "stderr", b"e")]
    LogWriter(out, err).write(entries)
    assert (out.getvalue(), err.getvalue()) == (b"o\xff\n", b"e\n")  # bytes as they are
    out, err = io.BytesIO(), io.BytesIO()
    LogWriter(out, err, timestamps=True).write(entries)
    assert out.getvalue() == TS + b" o\xff\n"
    assert err.getvalue() == TS + b" e\n"


def test_log_file_reads_complete_lines_only(tmp_path):
    path = tmp_path / "c.log"
    with LogFile(path) as log:
        assert log.read() == []  # no file yet
        path.write_bytes(b"one\ntw")
        assert log.read() == [b"one"]
        with path.open("ab") as f:
            f.write(b"o\nthree")
        assert log.read() == [b"two"]
        assert log.finish() == [b"three"]
        assert log.finish() == []


def test_log_file_follows_rotation_and_truncation(tmp_path):
    path = tmp_path / "c.log"
    path.write_bytes(b"a\nb\n")
    with LogFile(path) as log:
        assert log.read() == [b"a", b"b"]
        # Rotated: renamed (then written to by the old writer), and a new file.
        path.rename(tmp_path / "c.log.1")
        assert log.read() == []
        with (tmp_path / "c.log.1").open("ab") as f:
            f.write(b"c\nlast of old")
        path.write_bytes(b"new\n")
        assert log.read() == [b"c", b"last of old", b"new"]
        # Truncated in place, then shorter content.
        path.write_bytes(b"x\n")
        assert log.read() == [b"x"]


def test_read_log_keeps_the_last_lines(tmp_path):
    lines = [_line("stdout", "F", str(i)) for i in range(5)]
    lines[3:3] = [_line("stdout", "P", "long-")]
    path = tmp_path / "c.log"
    _write_log(path, *lines)

    def read(tail):
        with LogFile(path) as log:
            return [entry.text for entry in read_log(log, LogJoiner(), tail=tail)]

    assert read(2) == [b"long-3", b"4"]  # lines, not parts
    assert read(0) == []
    assert read(None) == [b"0", b"1", b"2", b"long-3", b"4"]


def test_follow_log_until_the_container_exits(tmp_path):
    path = tmp_path / "c.log"
    path.write_bytes(_line("stdout", "F", "before") + b"\n")
    alive = {True}

    def last_lines_then_exit():
        # All before the status is asked again: every line must still come out,
        # the unterminated and the unfinished ones too.
        _append(path, _line("stdout", "F", "done") + b"\n")
        _append(path, _line("stderr", "P", "cut off") + b"\n")
        _append(path, _line("stdout", "F", "no newline"))
        alive.clear()

    steps = [
        lambda: _append(path, _line("stdout", "P", "split ") + b"\n"),
        lambda: _rotate(path, _line("stdout", "F", "across rotation") + b"\n"),
        lambda: _append(path, _line("stderr", "F", "oops") + b"\n"),
        lambda: _append(path, _line("stdout", "P", "almost ") + b"\n"),
        last_lines_then_exit,
    ]
    written: list[LogEntry] = []
    sleeps = []

    def sleep(seconds):
        sleeps.append(seconds)
        if steps:
            steps.pop(0)()

    with LogFile(path) as log:
        joiner = LogJoiner()
        written += read_log(log, joiner)
        follow_log(
            log,
            joiner,
            written.extend,
            lambda: bool(alive),
            interval=0.1,
            status_interval=0.1,
            sleep=sleep,
        )
    assert [(e.stream, e.text) for e in written] == [
        ("stdout", b"before"),
        ("stdout", b"split across rotation"),
        ("stderr", b"oops"),
        ("stdout", b"almost done"),
        ("stdout", b"no newline"),
        ("stderr", b"cut off"),
    ]
    assert len(sleeps) == 5


def test_follow_log_asks_for_the_status_less_often(tmp_path):
    path = tmp_path / "c.log"
    asked = []

    def running():
        asked.append(len(ticks))
        return len(ticks) < 12

    ticks: list[float] = []
    with LogFile(path) as log:
        follow_log(log, LogJoiner(), lambda _: None, running, sleep=ticks.append)
    assert asked == [0, 5, 10, 15]
    assert set(ticks) == {0.1}


def _append(path, data: bytes) -> None:
    with path.open("ab") as f:
        f.write(data)


def _rotate(path, data: bytes) -> None:
    path.rename(path.with_name(path.name + ".1"))
    path.write_bytes(data)


# ---- pods, ps, inspect and logs against the fake daemon --------------------------------


def table(text: str, headings: list[str]) -> list[dict[str, str]]:
    """The rows of a left-aligned table, cut where its *headings* begin."""
    header, *lines = text.splitlines()
    starts = [header.index(heading) for heading in headings]
    assert sorted(starts) == starts, header
    assert header.split() == " ".join(headings).split()
    bounds = [*zip(starts, [*starts[1:], None], strict=True)]
    return [
        {h: line[a:b].strip() for h, (a, b) in zip(headings, bounds, strict=True)} for line in lines
    ]


POD_COLUMNS = ["POD ID", "CREATED", "STATE", "NAME", "NAMESPACE", "ATTEMPT", "RUNTIME"]
PS_COLUMNS = ["CONTAINER", "IMAGE", "CREATED", "STATE", "NAME", "ATTEMPT", "POD ID"]


def test_pods_table_newest_first(fake, capsys):
    assert run(fake, "pods") == 0
    rows = table(capsys.readouterr().out, POD_COLUMNS)
    assert [list(row.values()) for row in rows] == [
        [POD_WEB[:13], "2 minutes ago", "Ready", "web", "default", "1", "(default)"],
        [POD_JOB[:13], "3 hours ago", "NotReady", "job", "batch", "0", "crun"],
    ]
    assert run(fake, "pods", "-q") == 0
    assert capsys.readouterr().out.split() == [POD_WEB, POD_JOB]


def test_ps_lists_running_containers_unless_all(fake, capsys):
    assert run(fake, "ps") == 0
    rows = table(capsys.readouterr().out, PS_COLUMNS)
    assert [list(row.values()) for row in rows] == [
        [RUNNING[:13], REF, "About a minute ago", "Running", "app", "2", POD_WEB[:13]],
    ]
    assert run(fake, "ps", "-a", "-q") == 0
    assert capsys.readouterr().out.split() == [CREATED, EXITED, RUNNING]  # newest first
    assert run(fake, "ps", "-a") == 0
    rows = table(capsys.readouterr().out, PS_COLUMNS)
    assert [(row["STATE"], row["IMAGE"]) for row in rows] == [
        ("Created", REF),
        ("Exited", "0123456789abc"),
        ("Running", REF),
    ]
    assert run(fake, "ps", "-aq", "--pod", POD_WEB[:6]) == 0
    assert capsys.readouterr().out.split() == [CREATED, RUNNING]
    assert run(fake, "ps", "-q", "-p", POD_JOB) == 0
    assert capsys.readouterr().out == ""


def test_ps_and_pods_on_an_empty_node_print_the_headings(fake, capsys):
    fake.pods, fake.containers = [], []
    assert run(fake, "ps", "-a") == 0
    assert table(capsys.readouterr().out, PS_COLUMNS) == []
    assert run(fake, "pods") == 0
    assert table(capsys.readouterr().out, POD_COLUMNS) == []


def test_inspect_a_container_by_prefix(fake, capsys):
    assert run(fake, "inspect", "caf") == 0
    document = json.loads(capsys.readouterr().out)
    assert document["status"]["id"] == RUNNING
    assert document["status"]["state"] == "CONTAINER_RUNNING"
    assert document["info"] == {"pid": 7, "sandboxID": POD_WEB}
    assert document["raw"] == "not json"


def test_inspect_a_pod(fake, capsys):
    assert run(fake, "inspect", POD_JOB[:4]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["status"]["id"] == POD_JOB
    assert document["status"]["state"] == "SANDBOX_NOTREADY"
    assert document["info"]["runtimeSpec"] == {"ociVersion": "1.2.0"}


def test_inspect_unknown_and_ambiguous(fake, capsys):
    assert run(fake, "inspect", "0bad") == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == "pouch: no container or pod sandbox with id 0bad\n"
    assert run(fake, "inspect", "ca") == 1
    assert capsys.readouterr().err == 'pouch: container id prefix "ca" is ambiguous\n'


def _write_log(path, *lines: bytes) -> None:
    path.write_bytes(b"".join(line + b"\n" for line in lines))


def test_logs_splits_streams_and_joins_parts(fake, capsys, tmp_path):
    log = tmp_path / "c.log"
    _write_log(
        log,
        _line("stdout", "F", "hello"),
        _line("stdout", "P", "x" * 10),
        _line("stderr", "F", "warning"),
        _line("stdout", "F", "y" * 10),
        _line("stdout", "F", "bye"),
    )
    fake.log_paths[EXITED] = str(log)
    assert run(fake, "logs", EXITED[:6]) == 0
    captured = capsys.readouterr()
    assert captured.out == f"hello\n{'x' * 10}{'y' * 10}\nbye\n"
    assert captured.err == "warning\n"
    assert run(fake, "logs", "--tail", "2", "-t", EXITED) == 0
    captured = capsys.readouterr()
    assert captured.out == f"{TS.decode()} {'x' * 10}{'y' * 10}\n{TS.decode()} bye\n"
    assert captured.err == ""
    assert run(fake, "logs", "--tail", "3", "--timestamps", EXITED) == 0
    assert capsys.readouterr().err == f"{TS.decode()} warning\n"
    assert run(fake, "logs", "--tail", "0", EXITED) == 0
    assert capsys.readouterr().out == ""
    assert run(fake, "logs", "--tail", "all", EXITED) == 0
    assert capsys.readouterr().out.count("\n") == 3


def test_logs_errors(fake, capsys, tmp_path):
    assert run(fake, "logs", "0bad") == 1
    assert capsys.readouterr().err == "pouch: no such container: 0bad\n"
    assert run(fake, "logs", EXITED) == 1
    assert capsys.readouterr().err == f"pouch: container {EXITED[:13]} has no log file\n"
    fake.log_paths[EXITED] = str(tmp_path / "gone.log")
    assert run(fake, "logs", EXITED) == 1
    assert capsys.readouterr().err.startswith(f"pouch: container {EXITED[:13]}: no log file")
    assert run(fake, "logs", "--tail", "many", EXITED) == 2
    assert "not a number of lines" in capsys.readouterr().err


def test_logs_follow_ends_when_the_container_exits(fake, capsys, tmp_path):
    log = tmp_path / "c.log"
    _write_log(log, _line("stdout", "F", "first"))
    fake.log_paths[RUNNING] = str(log)

    def container():
        time.sleep(0.3)
        _append(log, _line("stdout", "P", "half ") + b"\n")
        time.sleep(0.3)
        _rotate(log, _line("stdout", "F", "and half") + b"\n" + _line("stderr", "F", "e") + b"\n")
        time.sleep(0.3)
        fake.set_state(RUNNING, cri.ContainerState.CONTAINER_EXITED)

    writer = threading.Thread(target=container)
    writer.start()
    started = time.monotonic()
    try:
        assert run(fake, "logs", "-f", RUNNING) == 0
    finally:
        writer.join()
    assert time.monotonic() - started < 5
    captured = capsys.readouterr()
    assert captured.out == "first\nhalf and half\n"
    assert captured.err == "e\n"
    assert fake.status_calls >= 3  # polled while it ran


def test_logs_follow_of_an_exited_container_prints_and_returns(fake, capsys, tmp_path):
    log = tmp_path / "c.log"
    _write_log(log, _line("stdout", "F", "done"), _line("stdout", "P", "no end"))
    fake.log_paths[EXITED] = str(log)
    assert run(fake, "logs", "-f", "--tail", "1", EXITED) == 0
    # The tail is of what was complete; the unfinished line comes when it ends.
    assert capsys.readouterr().out == "done\nno end\n"


def test_logs_follow_ends_when_the_container_is_removed(fake, capsys, tmp_path):
    log = tmp_path / "c.log"
    _write_log(log, _line("stdout", "F", "bye"))
    fake.log_paths[RUNNING] = str(log)
    timer = threading.Timer(
        0.3, lambda: fake.containers.remove(next(c for c in fake.containers if c.id == RUNNING))
    )
    timer.start()
    try:
        assert run(fake, "logs", "-f", RUNNING) == 0
    finally:
        timer.join()
    assert capsys.readouterr().out == "bye\n"


# ---- exec, attach and port-forward: the stream client -------------------------------------
#
# The client (pouch.stream.client) against pouchd's own stream server on the
# stream tests' fake backend, over real loopback TCP: every framing piece is
# checked by the code that serves kubectl.


def test_parse_status_reads_what_kubectl_reads():
    ok = remotecommand.encode_status(remotecommand.status_success(), json_status=True)
    assert sc.parse_status(ok) == sc.ExitStatus(0)
    assert sc.parse_status(ok).success
    exit3 = remotecommand.encode_status(
        remotecommand.status_exit(3, ("sh", "-c", "exit 3")), json_status=True
    )
    status = sc.parse_status(exit3)
    assert (status.code, status.reason, status.exited, status.success) == (
        3,
        "NonZeroExitCode",
        True,
        False,
    )
    internal = remotecommand.encode_status(remotecommand.status_internal("boom"), json_status=True)
    status = sc.parse_status(internal)
    assert (status.code, status.reason, status.message, status.exited) == (
        1,
        "InternalError",
        "Internal error occurred: boom",
        False,
    )
    # Before v4: nothing for success, the message for a failure.
    assert sc.parse_status(b"", json_status=False).success
    assert sc.parse_status(b"it failed", json_status=False) == sc.ExitStatus(
        1, "Failure", "it failed"
    )
    assert sc.parse_status(b"not json").reason == "InvalidStatus"
    no_code = b'{"status":"Failure","reason":"NonZeroExitCode","details":{"causes":[]}}'
    assert sc.parse_status(no_code).code == 1


def test_encode_resize_is_one_json_object_per_line():
    assert sc.encode_resize(80, 24) == b'{"Width":80,"Height":24}\n'


@pytest.mark.parametrize(
    ("text", "mapping"),
    [("8080:80", (8080, 80)), (":80", (0, 80)), ("0:80", (0, 80)), ("8080", (8080, 8080))],
)
def test_parse_port_mapping(text, mapping):
    assert parse_port_mapping(text) == mapping


@pytest.mark.parametrize("text", ["", "a:80", "80:", "1:0", "70000:80", "1:70000", "1:2:3"])
def test_parse_port_mapping_rejects(text):
    with pytest.raises(ValueError, match=r"port|LOCAL"):
        parse_port_mapping(text)


def test_container_tty_from_verbose_info():
    terminal = json.dumps({"runtimeSpec": {"process": {"terminal": True}}})
    assert container_tty({"info": terminal})
    assert not container_tty({"info": json.dumps({"runtimeSpec": {"process": {}}})})
    assert container_tty({"info": json.dumps({"config": {"tty": True}})})  # containerd's
    assert not container_tty({})
    assert not container_tty({"info": "not json"})


def test_target_from_url():
    assert sc.Target.from_url("http://127.0.0.1:10250/exec/abc?x=1") == sc.Target(
        "127.0.0.1", 10250, "/exec/abc?x=1"
    )
    assert sc.Target.from_url("http://[::1]:5/attach/t").authority == "[::1]:5"
    with pytest.raises(sc.StreamClientError, match="only http://"):
        sc.Target.from_url("https://node:10250/exec/abc")


class Chunks:
    """A stdin source: the chunks given, then its end."""

    def __init__(self, *chunks: bytes, pause: float = 0.0) -> None:
        self.chunks = list(chunks)
        self.pause = pause
        self.ended = trio.Event()

    async def receive_some(self, max_bytes=None) -> bytes:
        await trio.sleep(self.pause)
        if self.chunks:
            return self.chunks.pop(0)
        self.ended.set()
        return b""


class Forever:
    """A stdin source that never ends."""

    async def receive_some(self, max_bytes=None) -> bytes:
        await trio.sleep_forever()
        raise AssertionError


class Collected:
    def __init__(self) -> None:
        self.data = bytearray()

    async def send_all(self, data) -> None:
        await trio.lowlevel.checkpoint()
        self.data += data


async def test_detach_keys_hold_a_partial_sequence_back():
    keys = sc.DetachKeys(Chunks(b"ab\x10", b"c", b"d\x10", b"\x11rest"))
    assert await keys.receive_some() == b"ab"
    assert await keys.receive_some() == b"\x10c"  # not the sequence after all
    assert await keys.receive_some() == b"d"
    with pytest.raises(sc.DetachRequested):
        await keys.receive_some()
    with pytest.raises(sc.DetachRequested):
        await keys.receive_some()  # and it stays detached
    ended = sc.DetachKeys(Chunks(b"x\x10"))
    assert await ended.receive_some() == b"x"
    assert await ended.receive_some() == b"\x10"  # the end sends what was held
    assert await ended.receive_some() == b""


@pytest.fixture
async def streams(nursery):
    """pouchd's stream server on 127.0.0.1, serving the fake backend."""
    backend = FakeBackend(containers=("c1", "c2"), sandboxes=("p1",))
    await nursery.start(backend.run)
    server = StreamServer(StreamConfig(address="127.0.0.1", port=0), backend)
    await nursery.start(server.serve, nursery, trio.Event())
    server.fake = backend  # type: ignore[attr-defined]
    return server


TRANSPORTS = ["websocket", "spdy"]


async def command(server, request, transport, **kw):
    out, err = Collected(), Collected()
    kw.setdefault("stdout", out if request.stdout else None)
    kw.setdefault("stderr", err if request.stderr else None)
    with trio.fail_after(10):
        result = await sc.remote_command(
            server.url(request), tty=request.tty, transport=transport, **kw
        )
    return result, bytes(out.data), bytes(err.data)


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_exec_output_and_status(streams, transport):
    request = ExecRequest("c1", ("both",), stdout=True, stderr=True)
    result, out, err = await command(streams, request, transport)
    assert (out, err) == (b"out\n", b"err\n")
    assert result.status == sc.ExitStatus(0)
    assert not result.detached
    assert result.transport == transport
    assert result.protocol == ("v5.channel.k8s.io" if transport == "websocket" else V4)
    request = ExecRequest("c1", ("fail", "42", "bad"), stdout=True, stderr=True)
    result, out, err = await command(streams, request, transport)
    assert (out, err, result.status.code) == (b"", b"bad\n", 42)
    assert result.status.reason == "NonZeroExitCode"


V4 = "v4.channel.k8s.io"


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_exec_stdin_to_its_end(streams, transport):
    request = ExecRequest("c1", ("cat",), stdin=True, stdout=True, stderr=True)
    chunks = [b"line %d\n" % i for i in range(200)]
    result, out, _ = await command(streams, request, transport, stdin=Chunks(*chunks))
    # cat ends only because the end of stdin reached it (v5 close signal, SPDY FIN).
    assert out == b"".join(chunks)
    assert result.status.success
    assert not streams.fake.processes[0].killed


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_exec_large_output(streams, transport):
    size = 5 * 1024 * 1024 + 17
    request = ExecRequest("c1", ("big", str(size)), stdout=True)
    result, out, _ = await command(streams, request, transport)
    assert len(out) == size
    assert out[:512] == bytes(range(256)) * 2
    assert result.status.success


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_exec_tty_sends_terminal_sizes(streams, transport):
    request = ExecRequest("c1", ("size",), tty=True, stdin=True, stdout=True)
    send, sizes = trio.open_memory_channel[tuple[int, int]](4)
    await send.send((120, 40))
    await send.send((132, 43))
    stdin = Chunks(b"", pause=0.3)  # ends after the sizes went
    result, out, _ = await command(streams, request, transport, stdin=stdin, resizes=sizes)
    assert out == b"120x40\n132x43\n"
    assert result.status.success
    assert streams.fake.processes[0].resizes == [(120, 40), (132, 43)]


async def test_websocket_falls_back_to_v4(streams, monkeypatch):
    monkeypatch.delitem(remotecommand.WEBSOCKET_PROTOCOLS, "v5.channel.k8s.io")
    request = ExecRequest("c1", ("fail", "7", "old"), stdout=True, stderr=True)
    result, _, err = await command(streams, request, "websocket")
    assert result.protocol == V4
    assert (err, result.status.code) == (b"old\n", 7)


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_url_is_good_once(streams, transport):
    url = streams.url(ExecRequest("c1", ("echo", "x"), stdout=True))
    with trio.fail_after(10):
        await sc.remote_command(url, stdout=Collected(), transport=transport)
        with pytest.raises(sc.UpgradeRefused) as refused:
            await sc.remote_command(url, stdout=Collected(), transport=transport)
    assert refused.value.status == 404
    assert "404 page not found" in str(refused.value)


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_backend_failure_is_a_status(streams, transport):
    request = ExecRequest("c1", ("echo",), stdout=True)
    url = streams.url(request)
    streams.fake.containers.discard("c1")
    with trio.fail_after(10):
        result = await sc.remote_command(url, stdout=Collected(), transport=transport)
    assert result.status.reason == "InternalError"
    assert 'container "c1" not found' in result.status.message
    assert not result.status.exited


async def test_nothing_listening_is_a_stream_client_error():
    with trio.socket.socket() as probe:
        await probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    for transport in TRANSPORTS:
        with pytest.raises(sc.StreamClientError, match="cannot reach the stream server"):
            await sc.remote_command(
                f"http://127.0.0.1:{port}/exec/x", stdout=Collected(), transport=transport
            )


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_attach_until_the_container_exits(streams, transport):
    request = AttachRequest("c1", stdin=True, stdout=True, stderr=True)
    async with trio.open_nursery() as nursery:

        async def exit_later():
            await trio.sleep(0.5)
            streams.fake.exit_container("c1", code=3)

        nursery.start_soon(exit_later)
        result, out, _ = await command(streams, request, transport, stdin=Chunks(b"ping\n"))
    # stdin ended, but the container answered and exited within the linger time.
    assert out == b"ping\n"
    assert result.status.success  # attach reports success; the exit code is the CRI's
    assert not result.detached


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_attach_detaches_on_the_keys(streams, transport):
    request = AttachRequest("c1", tty=True, stdin=True, stdout=True)
    stdin = sc.DetachKeys(Chunks(b"typed\n", b"\x10", b"\x11", b"never sent", pause=0.1))
    send, sizes = trio.open_memory_channel[tuple[int, int]](1)
    await send.send((80, 24))  # without a size the server waits a second for one
    result, out, _ = await command(streams, request, transport, stdin=stdin, resizes=sizes)
    assert result.detached
    assert result.status is None
    assert out == b"typed\n"
    proc = streams.fake.processes[0]
    with trio.fail_after(5):
        await proc.exited.wait()
    assert proc.closed  # detached: the server let go of the container


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_attach_lingers_after_stdin_then_detaches(streams, transport, autojump_clock):
    request = AttachRequest("c1", stdin=True, stdout=True, stderr=True)
    stdin = Chunks(b"a\n", b"b\n")
    started = trio.current_time()
    result, out, _ = await command(
        streams, request, transport, stdin=stdin, linger_after_stdin=ATTACH_LINGER
    )
    assert result.detached
    assert out == b"a\nb\n"
    assert trio.current_time() - started >= ATTACH_LINGER


async def test_a_broken_sink_ends_the_session(streams):
    class Broken:
        async def send_all(self, data):
            await trio.lowlevel.checkpoint()
            raise trio.BrokenResourceError("EPIPE")

    request = ExecRequest("c1", ("big", "1000000"), stdout=True)
    with pytest.raises(trio.BrokenResourceError):
        await sc.remote_command(streams.url(request), stdout=Broken())


# -- port-forward


async def echo_pod(stream: trio.abc.Stream) -> None:
    while data := await stream.receive_some():
        await stream.send_all(data)


async def count_then_reply(stream: trio.abc.HalfCloseableStream) -> None:
    total = 0
    while data := await stream.receive_some():
        total += len(data)
    await stream.send_all(f"got {total}".encode())


async def read_all(stream: trio.abc.Stream) -> bytes:
    data = b""
    while chunk := await stream.receive_some():
        data += chunk
    return data


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_port_forward(streams, transport):
    streams.fake.pods[80] = echo_pod
    streams.fake.pods[9000] = count_then_reply
    errors: list[tuple[int, str]] = []
    reported = trio.Event()
    listening: list[tuple[str, int, int]] = []

    def on_error(port: int, message: str) -> None:
        errors.append((port, message))
        reported.set()

    async def echo_once(port: int, i: int) -> None:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(b"hello %d" % i)
            await stream.send_eof()
            assert await read_all(stream) == b"hello %d" % i

    with trio.fail_after(10):
        async with trio.open_nursery() as forwarding:
            bound = await forwarding.start(
                functools.partial(
                    sc.port_forward,
                    streams.url(PortForwardRequest("p1")),
                    [(0, 80), (0, 9000), (0, 81)],
                    transport=transport,
                    on_listening=lambda *args: listening.append(args),
                    on_error=on_error,
                )
            )
            assert [remote for _, remote in bound] == [80, 9000, 81]
            assert listening == [("127.0.0.1", local, remote) for local, remote in bound]
            ports = {remote: local for local, remote in bound}
            async with trio.open_nursery() as clients:
                for i in range(10):
                    clients.start_soon(echo_once, ports[80], i)
            # Half-close reaches the pod, which answers after it.
            stream = await trio.open_tcp_stream("127.0.0.1", ports[9000])
            async with stream:
                await stream.send_all(b"x" * 300_000)
                await stream.send_eof()
                assert await read_all(stream) == b"got 300000"
            # Nothing listens on 81 in the pod: the connection ends, the error is reported.
            stream = await trio.open_tcp_stream("127.0.0.1", ports[81])
            async with stream:
                assert await read_all(stream) == b""
            await reported.wait()
            # One session carried every connection.
            assert streams.statistics().sessions == 1
            forwarding.cancel_scope.cancel()
    assert errors == [
        (81, "error forwarding port 81 to pod p1, uid : "
         "failed to connect to localhost:81: connection refused")
    ]  # fmt: skip
    assert streams.fake.connections.count(80) == 10


async def test_port_forward_ends_when_the_session_is_lost(nursery):
    backend = FakeBackend(sandboxes=("p1",))
    await nursery.start(backend.run)

    async def handlers_nursery(task_status=trio.TASK_STATUS_IGNORED):
        async with trio.open_nursery() as handlers:
            task_status.started(handlers)
            await trio.sleep_forever()

    handlers = await nursery.start(handlers_nursery)
    server = StreamServer(StreamConfig(address="127.0.0.1", port=0), backend)
    await nursery.start(server.serve, handlers, trio.Event())
    listening = trio.Event()

    async def daemon_goes_away():
        await listening.wait()
        handlers.cancel_scope.cancel()

    nursery.start_soon(daemon_goes_away)
    url = server.url(PortForwardRequest("p1"))
    with trio.fail_after(10), pytest.raises(sc.StreamClientError, match="lost connection"):
        await sc.port_forward(url, [(0, 80)], on_listening=lambda *_: listening.set())


# ---- exec, attach and port-forward: the commands --------------------------------------


class StreamThread:
    """pouchd's stream server on the fake backend, in a thread (pouch runs its own Trio)."""

    def __init__(self) -> None:
        self.backend = FakeBackend(containers=(RUNNING, EXITED), sandboxes=(POD_WEB,))
        self.server = StreamServer(
            StreamConfig(address="127.0.0.1", port=0), self.backend, limits=SessionLimits()
        )
        self._token: trio.lowlevel.TrioToken | None = None
        self._stop: trio.Event | None = None
        self._started = threading.Event()
        self._thread = threading.Thread(target=trio.run, args=(self._main,), daemon=True)

    async def _main(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        self._stop = trio.Event()
        async with trio.open_nursery() as nursery:
            await nursery.start(self.backend.run)
            await nursery.start(self.server.serve, nursery, self._stop)
            self._started.set()
            await self._stop.wait()
            nursery.cancel_scope.cancel()

    def start(self) -> StreamThread:
        self._thread.start()
        assert self._started.wait(10)
        return self

    def call(self, fn, *args):
        return trio.from_thread.run_sync(fn, *args, trio_token=self._token)

    def url(self, request) -> str:
        return self.call(self.server.url, request)

    def stop(self) -> None:
        assert self._stop is not None
        self.call(self._stop.set)
        self._thread.join(10)


@pytest.fixture
def streamed(fake: FakeDaemon) -> Iterator[FakeDaemon]:
    fake.streams = StreamThread().start()
    try:
        yield fake
    finally:
        fake.streams.stop()


_SERVER_LOG = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \[[a-z ]+\] .*\n")


def output(capsys) -> tuple[str, str]:
    """What pouch wrote to stdout and stderr, without the stream thread's log lines."""
    captured = capsys.readouterr()
    return _SERVER_LOG.sub("", captured.out), _SERVER_LOG.sub("", captured.err)


def with_stdin(monkeypatch, data: bytes) -> None:
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(data)))


def test_exec_command(streamed, capsys):
    assert run(streamed, "exec", RUNNING[:5], "sh", "-c", "echo hi") == 127  # the fake's sh
    assert output(capsys)[1] == "sh: not found\n"
    assert run(streamed, "exec", "caf", "--", "echo", "-n", "x") == 0
    assert output(capsys)[0] == "-n x\n"
    (request, _) = streamed.stream_requests
    assert request == ExecRequest(RUNNING, ("sh", "-c", "echo hi"), stdout=True, stderr=True)
    assert run(streamed, "exec", RUNNING, "fail", "3", "oops") == 3
    assert output(capsys)[1] == "oops\n"
    assert run(streamed, "exec", "--transport", "spdy", RUNNING, "fail", "4") == 4


def test_exec_passes_stdin_with_i(streamed, capsys, monkeypatch):
    with_stdin(monkeypatch, b"piped\ndata\n")
    assert run(streamed, "exec", "-i", RUNNING, "cat") == 0
    assert output(capsys)[0] == "piped\ndata\n"
    with_stdin(monkeypatch, b"more")
    assert run(streamed, "exec", "-i", "--transport", "spdy", RUNNING, "cat") == 0
    assert output(capsys)[0] == "more"
    assert streamed.stream_requests[-1].stdin


def test_exec_tty_needs_a_terminal(streamed, capsys, monkeypatch):
    monkeypatch.setattr(os, "isatty", lambda fd: False)
    with_stdin(monkeypatch, b"")
    assert run(streamed, "exec", "-it", RUNNING, "echo", "plain") == 0
    out, err = output(capsys)
    assert out == "plain\n"
    assert "Unable to use a TTY" in err
    request = streamed.stream_requests[-1]
    assert (request.tty, request.stdin, request.stderr) == (False, True, True)


def test_exec_errors(streamed, capsys):
    assert run(streamed, "exec", "0bad", "true") == 1
    assert output(capsys)[1] == "pouch: no such container: 0bad\n"
    assert run(streamed, "exec", RUNNING) == 2  # no command
    output(capsys)
    streamed.streams.call(streamed.streams.backend.containers.discard, RUNNING)
    assert run(streamed, "exec", RUNNING, "true") == 1
    err = output(capsys)[1]
    assert err.startswith("pouch: Internal error occurred: error executing command in container")


def test_stream_server_gone(fake, capsys):
    assert run(fake, "exec", RUNNING, "true") == 1
    assert output(capsys)[1] == "pouch: the stream server is not serving\n"


def test_attach_until_the_container_exits_with_its_code(streamed, capsys):
    streams = streamed.streams

    def container_exits():
        time.sleep(0.5)
        streamed.exit_codes[RUNNING] = 5
        streamed.set_state(RUNNING, cri.ContainerState.CONTAINER_EXITED)
        streams.call(streams.backend.exit_container, RUNNING, 5)

    timer = threading.Thread(target=container_exits)
    timer.start()
    try:
        assert run(streamed, "attach", "--no-stdin", RUNNING[:6]) == 5
    finally:
        timer.join()
    request = streamed.stream_requests[-1]
    assert request == AttachRequest(RUNNING, stdout=True, stderr=True)


def test_attach_detaches_after_stdin_ends(streamed, capsys, monkeypatch):
    with_stdin(monkeypatch, b"hello\n")
    started = time.monotonic()
    assert run(streamed, "attach", "--transport", "spdy", RUNNING) == 0
    assert time.monotonic() - started >= ATTACH_LINGER
    assert output(capsys)[0] == "hello\n"  # the fake attach echoes stdin
    request = streamed.stream_requests[-1]
    assert (request.stdin, request.tty) == (True, False)


def test_attach_to_a_terminal_container(streamed, capsys, monkeypatch):
    streamed.tty_containers.add(RUNNING)
    with_stdin(monkeypatch, b"x")
    assert run(streamed, "attach", RUNNING) == 0
    request = streamed.stream_requests[-1]
    assert (request.tty, request.stderr) == (True, False)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_port_forward_command(streamed, capsys):
    streams = streamed.streams
    streams.backend.pods[80] = echo_pod
    port = free_port()
    answers: list[bytes] = []

    def client():
        try:
            deadline = time.monotonic() + 10
            while True:
                try:
                    s = socket.create_connection(("127.0.0.1", port), timeout=10)
                    break
                except ConnectionRefusedError:
                    assert time.monotonic() < deadline
                    time.sleep(0.05)
            with s:
                s.sendall(b"through")
                s.shutdown(socket.SHUT_WR)
                answers.append(s.recv(100))
        finally:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C

    thread = threading.Thread(target=client)
    thread.start()
    try:
        assert run(streamed, "port-forward", "web", f"{port}:80") == 0
    finally:
        thread.join()
    assert answers == [b"through"]
    assert output(capsys)[0] == f"Forwarding from 127.0.0.1:{port} -> 80\n"
    assert streamed.stream_requests[-1] == PortForwardRequest(POD_WEB)


def test_port_forward_errors(streamed, capsys):
    assert run(streamed, "port-forward", "job", "80") == 1  # not ready: no name match
    assert output(capsys)[1] == "pouch: no such pod sandbox: job\n"
    assert run(streamed, "port-forward", POD_WEB, "x:80") == 2
    assert "is not LOCAL:REMOTE" in output(capsys)[1]


async def test_file_sink_breaks_when_the_reader_went_away():
    class Gone(io.RawIOBase):
        def writable(self) -> bool:
            return True

        def write(self, data) -> int:
            raise BrokenPipeError(32, "Broken pipe")

    with pytest.raises(trio.BrokenResourceError):
        await sc.FileSink(io.BufferedWriter(Gone())).send_all(b"x")
    written = io.BytesIO()
    await sc.FileSink(written).send_all(b"data")
    assert written.getvalue() == b"data"


def test_exec_whose_reader_went_away(streamed, monkeypatch):
    async def broken(self, data) -> None:
        await trio.lowlevel.checkpoint()
        raise trio.BrokenResourceError("cannot write: [Errno 32] Broken pipe")

    # (sys.stdout itself stays: the stream thread logs to it.)
    monkeypatch.setattr(sc.FileSink, "send_all", broken)
    # pouch exec ... | head: a shell reports 128 + SIGPIPE for such a writer.
    assert run(streamed, "exec", RUNNING, "big", "1000000") == 141
