"""The ``pouch`` command line against a real pouchd and a real registry.

Each test runs the installed ``pouch`` console script as a subprocess, as a
user would, against a private pouchd configured to pull from a loopback
docker-registry over plain HTTP (conftest's ``registry``, which holds
library/busybox).  Pods and containers are made through the CRI with
test_containers' client, which we did not write on top of ``pouch``.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import pty
import re
import select
import shlex
import socket
import struct
import subprocess
import sys
import tarfile
import termios
import time
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest
from cri_api.v1 import api_pb2

from pouch.cli import human_size, short_id
from tests.integration.test_containers import Client
from tests.support import images as timg
from tests.support.registry import push

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from tests.integration.conftest import Daemon
    from tests.support.registry import Registry

pytestmark = [pytest.mark.integration, pytest.mark.root, pytest.mark.timeout(120)]

POUCH = Path(sys.prefix) / "bin" / "pouch"
RUN_TIMEOUT = 60.0


@pytest.fixture
def pd(make_daemon: type[Daemon], registry: Registry) -> Daemon:
    return make_daemon(config=f'[registry]\ninsecure = ["{registry.host}"]\n').start()


def pouch_argv(daemon: Daemon, *args: str) -> list[str]:
    if not POUCH.exists():
        pytest.fail(f"{POUCH} is missing: pip install -e . (the project's console scripts)")
    return [str(POUCH), "--socket", str(daemon.socket), *args]


def pouch(daemon: Daemon, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        pouch_argv(daemon, *args),
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        check=False,
    )


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result.stdout


def pushed(registry: Registry, repo: str, image: timg.Image) -> str:
    push(registry, repo, "latest", image)
    return registry.ref(repo, "latest")


def test_pull_shows_progress_and_prints_the_id(pd, registry):
    image = timg.multilayer_image()
    ref = pushed(registry, "cli/multi", image)
    result = pouch(pd, "pull", ref)
    # Only the id on stdout, so that id=$(pouch pull x) works.
    assert ok(result) == f"{image.config.digest}\n"
    lines = result.stderr.splitlines()
    assert lines[0] == f"Pulling {ref}"
    for layer in image.layers:
        done = f"{short_id(layer.blob.digest)}: Pull complete ({human_size(layer.blob.size)})"
        assert done in lines, result.stderr
    # Pulled again, every layer is there already and nothing is fetched.
    registry.clear_requests()
    again = pouch(pd, "pull", ref)
    assert ok(again) == f"{image.config.digest}\n"
    for layer in image.layers:
        assert f"{short_id(layer.blob.digest)}: Already exists" in again.stderr
        assert registry.blob_fetches(layer.blob.digest) == 0


def _run_on_a_terminal(argv: list[str]) -> tuple[int, str, str]:
    """Run *argv* with stderr on a pseudo-terminal; return (status, stdout, terminal)."""
    master, slave = pty.openpty()
    env = {**os.environ, "TERM": "xterm-256color", "COLUMNS": "120"}
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=slave, env=env) as proc:
        os.close(slave)
        chunks = []
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError as exc:  # EIO: the last writer closed the terminal
                if exc.errno != errno.EIO:
                    raise
                break
            if not chunk:
                break
            chunks.append(chunk)
        os.close(master)
        assert proc.stdout is not None
        stdout = proc.stdout.read().decode()
        status = proc.wait(RUN_TIMEOUT)
    return status, stdout, b"".join(chunks).decode(errors="replace")


def test_pull_draws_progress_bars_on_a_terminal(pd, registry):
    image = timg.busybox_image()
    ref = pushed(registry, "cli/bars", image)
    status, stdout, terminal = _run_on_a_terminal(
        [str(POUCH), "--socket", str(pd.socket), "pull", ref]
    )
    assert status == 0, terminal
    assert stdout == f"{image.config.digest}\n"
    (layer,) = image.layers
    final = terminal[terminal.rindex(short_id(layer.blob.digest)) :]
    assert "━" in final  # a bar, redrawn in place
    assert "Pull complete" in final


def test_images_lists_the_pulled_image(pd, registry):
    image = timg.busybox_image()
    ref = pushed(registry, "cli/busybox", image)
    ok(pouch(pd, "pull", ref))
    lines = ok(pouch(pd, "images")).splitlines()
    assert lines[0].split() == ["IMAGE", "TAG", "IMAGE", "ID", "SIZE"]
    size = image.config.size + sum(layer.blob.size for layer in image.layers)
    repo = f"{registry.host}/cli/busybox"
    assert lines[1].split() == [repo, "latest", short_id(image.config.digest), human_size(size)]
    assert len(lines) == 2
    assert ok(pouch(pd, "images", "-q")) == f"{image.config.digest}\n"


def test_rmi_removes_and_fails_on_an_unknown_name(pd, registry):
    image = timg.busybox_image()
    ref = pushed(registry, "cli/rmi", image)
    ok(pouch(pd, "pull", ref))
    out = ok(pouch(pd, "rmi", ref)).splitlines()
    assert f"Untagged: {ref}" in out
    assert out[-1] == f"Deleted: {image.config.digest}"
    assert ok(pouch(pd, "images", "-q")) == ""
    again = pouch(pd, "rmi", ref)
    assert again.returncode == 1
    assert again.stderr == f"pouch: no such image: {ref}\n"


def test_load_an_oci_archive(pd, tmp_path):
    image = timg.busybox_image()
    layout = timg.write_oci_layout(tmp_path / "layout", {"example.com/cli/loaded:v1": image})
    archive = tmp_path / "images.tar"
    with tarfile.open(archive, "w") as tar:
        for member in sorted(layout.rglob("*")):
            tar.add(member, arcname=str(member.relative_to(layout)), recursive=False)
    result = pouch(pd, "load", str(archive))
    assert ok(result) == "Loaded image: example.com/cli/loaded:v1\n"
    assert ok(pouch(pd, "images", "-q")) == f"{image.config.digest}\n"


def test_version_prints_pouch(pd):
    out = ok(pouch(pd, "version")).splitlines()
    assert "RuntimeName:  pouch" in out
    assert "RuntimeApiVersion:  v1" in out


def test_errors_print_the_daemons_message_and_exit_1(pd, registry, tmp_path):
    missing = pouch(pd, "pull", registry.ref("cli/not-pushed", "v1"))
    assert missing.returncode == 1
    assert missing.stdout == ""
    last = missing.stderr.splitlines()[-1]
    assert last.startswith("pouch: ")
    assert "not found" in last.lower(), missing.stderr
    assert "Traceback" not in missing.stderr

    invalid = pouch(pd, "pull", "Not/A:Valid:Ref")
    assert invalid.returncode == 1
    assert invalid.stderr.startswith('pouch: invalid image reference "Not/A:Valid:Ref"')

    pd.stop()
    gone = pouch(pd, "version")
    assert gone.returncode == 1
    assert gone.stderr.startswith("pouch: ")
    assert "Traceback" not in gone.stderr


# ---- pods, containers and their logs ------------------------------------------------------


@pytest.fixture
def cri(pd: Daemon, registry: Registry) -> Iterator[Client]:
    client = Client(pd, registry)
    client.pull()
    yield client
    client.cleanup()


POD_COLUMNS = ["POD ID", "CREATED", "STATE", "NAME", "NAMESPACE", "ATTEMPT", "RUNTIME"]
PS_COLUMNS = ["CONTAINER", "IMAGE", "CREATED", "STATE", "NAME", "ATTEMPT", "POD ID"]
RECENT = re.compile(r"(Less than a second|1 second|\d+ seconds) ago")
RFC3339_NANO = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{9}(Z|[+-]\d\d:\d\d)")


def table(text: str, headings: list[str]) -> list[dict[str, str]]:
    """The rows of a left-aligned table, cut where its *headings* begin."""
    header, *lines = text.splitlines()
    assert header.split() == " ".join(headings).split(), header
    starts = [header.index(heading) for heading in headings]
    bounds = [*zip(starts, [*starts[1:], None], strict=True)]
    return [
        {h: line[a:b].strip() for h, (a, b) in zip(headings, bounds, strict=True)} for line in lines
    ]


def test_pods_and_ps(pd, cri):
    sid, pc = cri.run_pod(cri.pod_config("cli-pod"))
    running = cri.create(sid, pc, ["sleep", "1000"], name="app")
    cri.start(running)
    idle = cri.create(sid, pc, ["true"], name="idle")

    (pod,) = table(ok(pouch(pd, "pods")), POD_COLUMNS)
    assert RECENT.fullmatch(pod.pop("CREATED")), pod
    assert pod == {
        "POD ID": sid[:13],
        "STATE": "Ready",
        "NAME": "cli-pod",
        "NAMESPACE": "test",
        "ATTEMPT": "0",
        "RUNTIME": "runc",
    }
    assert ok(pouch(pd, "pods", "-q")) == f"{sid}\n"

    (row,) = table(ok(pouch(pd, "ps")), PS_COLUMNS)
    assert RECENT.fullmatch(row.pop("CREATED")), row
    assert row == {
        "CONTAINER": running[:13],
        "IMAGE": cri.image,
        "STATE": "Running",
        "NAME": "app",
        "ATTEMPT": "0",
        "POD ID": sid[:13],
    }
    rows = table(ok(pouch(pd, "ps", "-a")), PS_COLUMNS)
    # Newest first.
    assert [(r["CONTAINER"], r["STATE"], r["NAME"]) for r in rows] == [
        (idle[:13], "Created", "idle"),
        (running[:13], "Running", "app"),
    ]
    assert ok(pouch(pd, "ps", "-q")) == f"{running}\n"
    assert ok(pouch(pd, "ps", "-aq", "--pod", sid[:8])).split() == [idle, running]
    assert ok(pouch(pd, "ps", "-aq", "--pod", "0" * 12)) == ""

    cri.rt.StopPodSandbox(api_pb2.StopPodSandboxRequest(pod_sandbox_id=sid), timeout=60)
    pods = table(ok(pouch(pd, "pods")), POD_COLUMNS)
    # ListPodSandbox without a filter lists every pod, the stopped ones too.
    assert [(p["POD ID"], p["STATE"]) for p in pods] == [(sid[:13], "NotReady")]
    assert table(ok(pouch(pd, "ps")), PS_COLUMNS) == []
    states = {r["NAME"]: r["STATE"] for r in table(ok(pouch(pd, "ps", "-a")), PS_COLUMNS)}
    assert states == {"app": "Exited", "idle": "Exited"}  # a stopped pod stops them all


def test_inspect_a_container_and_a_pod(pd, cri):
    sid, pc = cri.run_pod()
    cid = cri.create(sid, pc, ["sleep", "1000"])
    cri.start(cid)

    container = json.loads(ok(pouch(pd, "inspect", cid[:12])))
    status = container["status"]
    assert (status["id"], status["state"]) == (cid, "CONTAINER_RUNNING")
    assert status["metadata"]["name"] == "c"
    assert status["logPath"] == cri.status(cid).status.log_path
    # The verbose info, one JSON document: parsed, not a string inside a string.
    info = container["info"]
    assert info["sandboxID"] == sid
    assert info["pid"] > 0
    assert info["runtimeSpec"]["process"]["args"] == ["sleep", "1000"]

    pod = json.loads(ok(pouch(pd, "inspect", sid)))
    assert (pod["status"]["id"], pod["status"]["state"]) == (sid, "SANDBOX_READY")
    assert pod["status"]["metadata"]["namespace"] == "test"
    assert pod["info"]["pid"] > 0
    assert "runtimeSpec" in pod["info"]

    missing = pouch(pd, "inspect", "0" * 12)
    assert missing.returncode == 1
    assert missing.stdout == ""
    assert missing.stderr == f"pouch: no container or pod sandbox with id {'0' * 12}\n"


def test_logs_split_streams_and_join_long_lines(pd, cri):
    st, raw = cri.run(
        [
            "sh",
            "-c",
            "echo out; echo err >&2; yes a | head -c 40000 | tr -d '\\n'; echo; echo end",
        ]
    )
    assert st.exit_code == 0
    # The runtime split the long line: the test is of joining its parts.
    assert any(line.split(" ", 3)[2] == "P" for line in raw.splitlines()), raw[:500]
    cid = st.id

    result = pouch(pd, "logs", cid[:12])
    assert ok(result) == "out\n" + "a" * 20000 + "\nend\n"
    assert result.stderr == "err\n"

    assert ok(pouch(pd, "logs", "--tail", "1", cid)) == "end\n"
    stamped = pouch(pd, "logs", "--timestamps", cid)
    lines = ok(stamped).splitlines()
    assert len(lines) == 3
    for line, text in zip(lines, ["out", "a" * 20000, "end"], strict=True):
        timestamp, _, rest = line.partition(" ")
        assert RFC3339_NANO.fullmatch(timestamp), line[:80]
        assert rest == text
    timestamp, _, rest = stamped.stderr.rstrip("\n").partition(" ")
    assert RFC3339_NANO.fullmatch(timestamp)
    assert rest == "err"

    missing = pouch(pd, "logs", "0" * 12)
    assert missing.returncode == 1
    assert missing.stderr == f"pouch: no such container: {'0' * 12}\n"


def test_logs_follow_ends_when_the_container_exits(pd, cri):
    sid, pc = cri.run_pod()
    cid = cri.create(
        sid,
        pc,
        [
            "sh",
            "-c",
            "for i in 1 2 3; do echo line $i; sleep 0.5; done; "
            "yes b | head -c 40000 | tr -d '\\n'; echo; echo bye >&2",
        ],
    )
    cri.start(cid)
    started = time.monotonic()
    follow = subprocess.run(
        pouch_argv(pd, "logs", "-f", cid),
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        check=False,
    )
    elapsed = time.monotonic() - started
    assert ok(follow) == "line 1\nline 2\nline 3\n" + "b" * 20000 + "\n"
    assert follow.stderr == "bye\n"
    # It waited for the container (1.5 s of sleeps), and stopped soon after its exit.
    assert elapsed >= 1.2
    st = cri.status(cid).status
    assert st.state == api_pb2.CONTAINER_EXITED
    assert time.time() - st.finished_at / 1e9 < 5

    # Following an exited container prints its log and returns.
    # The tail is of both streams together: the last two lines, one of each.
    again = pouch(pd, "logs", "-f", "--tail", "2", cid)
    assert ok(again) == "b" * 20000 + "\n"
    assert again.stderr == "bye\n"


# ---- exec, attach and port-forward -------------------------------------------------------

TRANSPORTS = ["websocket", "spdy"]
# busybox httpd on 8080 in the pod, serving /www.
SERVE = "mkdir -p /www && echo hello > /www/index.html && exec httpd -f -p 8080 -h /www"


@pytest.fixture
def running(cri: Client) -> str:
    """A running busybox container (in a pod of its own) that sleeps."""
    sid, pc = cri.run_pod()
    cid = cri.create(sid, pc, ["sleep", "1000"], name="sleeper")
    cri.start(cid)
    return cid


@pytest.mark.timeout(120)
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_exec_output_and_exit_code(pd, running, transport):
    result = pouch(pd, "exec", "--transport", transport, running[:12], "echo", "hello", "world")
    assert ok(result) == "hello world\n"
    assert result.stderr == ""
    # stdout and stderr stay apart; the exit code is the command's.
    script = "echo out; echo err >&2; exit 3"
    result = pouch(pd, "exec", "--transport", transport, running, "sh", "-c", script)
    assert (result.returncode, result.stdout, result.stderr) == (3, "out\n", "err\n")
    missing = pouch(pd, "exec", "--transport", transport, running, "no-such-command")
    assert missing.returncode != 0
    assert "no-such-command" in missing.stderr
    assert "Traceback" not in missing.stderr


@pytest.mark.timeout(120)
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_exec_stdin(pd, running, transport):
    # echo hi | pouch exec -i ID cat
    piped = subprocess.run(
        f"echo hi | {POUCH} --socket {pd.socket} exec -i --transport {transport} {running} cat",
        shell=True,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        check=False,
    )
    assert ok(piped) == "hi\n"
    # The end of stdin reaches the command: wc prints once its stdin ends.
    data = os.urandom(2 * 1024 * 1024)
    counted = subprocess.run(
        pouch_argv(pd, "exec", "-i", "--transport", transport, running, "wc", "-c"),
        input=data,
        capture_output=True,
        timeout=RUN_TIMEOUT,
        check=False,
    )
    assert counted.returncode == 0, counted.stderr
    assert counted.stdout.split() == [str(len(data)).encode()]
    copied = subprocess.run(
        pouch_argv(pd, "exec", "-i", "--transport", transport, running, "cat"),
        input=data,
        capture_output=True,
        timeout=RUN_TIMEOUT,
        check=False,
    )
    assert copied.returncode == 0, copied.stderr
    assert hashlib.sha256(copied.stdout).digest() == hashlib.sha256(data).digest()


def _run_in_terminal(
    argv: list[str],
    *,
    rows: int,
    cols: int,
    feed: list[tuple[bytes, bytes | Callable[[int], None]]],
) -> tuple[int, bytes]:
    """Run *argv* on a new terminal of rows x cols.

    When the output shows a key of *feed*, its action runs: bytes are typed,
    a callable is called with the terminal's master end.
    """
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
    proc = subprocess.Popen(
        argv, stdin=slave, stdout=slave, stderr=slave, start_new_session=True,
        preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0),
    )  # fmt: skip
    os.close(slave)
    output = b""
    pending = list(feed)
    deadline = time.monotonic() + RUN_TIMEOUT
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.2)
            if ready:
                try:
                    chunk = os.read(master, 65536)
                except OSError:
                    break  # EIO: the last writer is gone.
                if not chunk:
                    break
                output += chunk
            while pending and pending[0][0] in output:
                action = pending.pop(0)[1]
                if callable(action):
                    action(master)
                else:
                    os.write(master, action)
            if proc.poll() is not None and not ready:
                break
        return proc.wait(timeout=max(1, deadline - time.monotonic())), output
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)


def _resize(rows: int, cols: int) -> Callable[[int], None]:
    """A terminal resize (the kernel sends SIGWINCH), then time for it to travel."""

    def resize(master: int) -> None:
        fcntl.ioctl(master, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
        time.sleep(0.5)

    return resize


@pytest.mark.timeout(120)
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_exec_on_a_terminal(pd, running, transport):
    # The size is read after a pause: the runtime applies it once the command runs.
    script = (
        'tty; sleep 0.5; stty size; printf "ready\\n"; read line; echo "got $line"; '
        'printf "again\\n"; read line; stty size; exit 4'
    )
    exec_argv = shlex.join(
        pouch_argv(pd, "exec", "-it", "--transport", transport, running, "sh", "-c", script)
    )
    # The shell prints the terminal's settings before and after: pouch restores them.
    code, output = _run_in_terminal(
        ["sh", "-c", f'stty -g; {exec_argv}; status=$?; stty -g; exit "$status"'],
        rows=33,
        cols=111,
        feed=[(b"ready", b"hello\r"), (b"again", _resize(40, 100)), (b"again", b"\r")],
    )
    text = output.decode(errors="replace")
    assert code == 4, text
    assert re.search(r"/dev/pts/\d+", text), text
    assert "33 111" in text, text  # the terminal's size reached the container's
    assert "got hello" in text, text  # typed keys went through, in raw mode
    assert "40 100" in text, text  # and so did its change (SIGWINCH)
    settings = re.findall(r"^[0-9a-f]+(?::[0-9a-f]+){10,}\s*$", text, re.MULTILINE)
    assert len(settings) == 2, text
    assert settings[0].strip() == settings[1].strip()


@pytest.mark.timeout(120)
def test_attach_to_a_terminal_and_detach(pd, cri):
    sid, pc = cri.run_pod()
    cid = cri.create(sid, pc, ["sh"], name="shell", stdin=True, tty=True)
    cri.start(cid)
    code, output = _run_in_terminal(
        pouch_argv(pd, "attach", cid),
        rows=24,
        cols=80,
        feed=[(b"", b"echo hel''lo\r"), (b"hello", b"\x10\x11")],  # Ctrl-P Ctrl-Q
    )
    text = output.decode(errors="replace")
    assert code == 0, text
    assert "hello" in text.replace("hel''lo", ""), text
    # Detached: the container runs on.
    assert cri.status(cid).status.state == api_pb2.CONTAINER_RUNNING


@pytest.mark.timeout(120)
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_attach_receives_output_and_the_exit_code(pd, cri, transport):
    sid, pc = cri.run_pod()
    script = "sleep 2; for i in 1 2 3; do echo tick $i; sleep 0.2; done; echo oops >&2; exit 7"
    cid = cri.create(sid, pc, ["sh", "-c", script], name="ticker")
    cri.start(cid)
    result = pouch(pd, "attach", "--no-stdin", "--transport", transport, cid[:12])
    assert (result.returncode, result.stdout, result.stderr) == (
        7,
        "tick 1\ntick 2\ntick 3\n",
        "oops\n",
    )
    assert cri.status(cid).status.state == api_pb2.CONTAINER_EXITED


@pytest.mark.timeout(120)
def test_attach_passes_stdin(pd, cri):
    sid, pc = cri.run_pod()
    loop = 'while read line; do echo "echo: $line"; done; echo bye'
    cid = cri.create(sid, pc, ["sh", "-c", loop], name="loop", stdin=True, stdin_once=True)
    cri.start(cid)
    # stdin_once: the end of our input closes the container's stdin; the loop ends,
    # the container exits, and so does the attach, with its code.
    result = subprocess.run(
        pouch_argv(pd, "attach", cid),
        input="one\ntwo\n",
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        check=False,
    )
    assert ok(result) == "echo: one\necho: two\nbye\n", result.stderr
    assert cri.wait_exited(cid).exit_code == 0


class PortForward:
    """``pouch port-forward POD :8080``; the local port is read from its first line."""

    def __init__(self, daemon: Daemon, pod: str, *ports: str, transport: str) -> None:
        self.proc = subprocess.Popen(
            pouch_argv(daemon, "port-forward", "--transport", transport, pod, *ports),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert self.proc.stdout is not None
        self.ports: dict[int, int] = {}
        for _ in ports:
            line = self.proc.stdout.readline().decode()
            match = re.fullmatch(r"Forwarding from 127\.0\.0\.1:(\d+) -> (\d+)\n", line)
            assert match, (line, self.stop())
            self.ports[int(match.group(2))] = int(match.group(1))

    def stop(self) -> str:
        self.proc.terminate()
        try:
            _, err = self.proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate()
        return err.decode(errors="replace")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_port_forward_to_httpd(pd, cri, transport):
    sid, pc = cri.run_pod(cri.pod_config(f"web-{transport}"))
    cid = cri.create(sid, pc, ["sh", "-c", SERVE], name="httpd")
    cri.start(cid)
    forward = PortForward(pd, f"web-{transport}", ":8080", ":9999", transport=transport)
    try:
        url = f"http://127.0.0.1:{forward.ports[8080]}/index.html"
        deadline = time.monotonic() + 30
        while True:  # httpd may not listen yet
            try:
                response = httpx.get(url, timeout=10)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline
                time.sleep(0.2)
        assert (response.status_code, response.text) == (200, "hello\n")
        # Several connections, at once, over the one session.
        with httpx.Client(timeout=10) as client:
            for _ in range(5):
                assert client.get(url).text == "hello\n"
        assert forward.proc.poll() is None
        # Nothing listens on 9999 in the pod: that connection ends, the error is printed.
        with socket.create_connection(("127.0.0.1", forward.ports[9999]), timeout=30) as s:
            s.settimeout(30)
            assert s.recv(100) == b""
        time.sleep(0.5)
        assert forward.proc.poll() is None  # still forwarding
    finally:
        err = forward.stop()
    assert "error forwarding port 9999" in err, err
    assert "Traceback" not in err
