"""kubectl exec, attach and port-forward against a real pouchd, SPDY and WebSocket.

kubectl talks to `tests.support.apiserver.ApiServer`, which asks pouchd for a stream URL
through the CRI and splices kubectl's upgrade request onto it, as the API server and the
kubelet do.  Containers are real (busybox on runc + conmon).  Every test runs twice:
over SPDY (``KUBECTL_*_WEBSOCKETS=false``) and over WebSocket (``=true``); the stand-in
records which transport reached pouchd, so a silent fallback to SPDY fails the test.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import pty
import re
import select
import shutil
import signal
import socket
import struct
import subprocess
import termios
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import pytest
from cri_api.v1 import api_pb2

from tests.integration.test_containers import Client
from tests.support.apiserver import ApiServer, ContainerRef

if TYPE_CHECKING:
    from pathlib import Path

pytestmark = [pytest.mark.integration, pytest.mark.root, pytest.mark.timeout(120)]

KUBECTL = shutil.which("kubectl") or "/usr/bin/kubectl"
TRANSPORTS = ["spdy", "websocket"]
BIG = 100 * 1024 * 1024

# The main container: busybox httpd on 8080, serving /www.
SERVE = "mkdir -p /www && echo hello > /www/index.html && exec httpd -f -p 8080 -h /www"


@pytest.fixture
def pd(make_daemon, registry):
    return make_daemon(config=f'[registry]\ninsecure = ["{registry.host}"]\n').start()


@pytest.fixture
def cri(pd, registry):
    client = Client(pd, registry)
    client.pull()
    yield client
    client.cleanup()


@pytest.fixture
def api(pd):
    with ApiServer(pd.socket) as server:
        yield server


class Pod:
    def __init__(self, cri: Client, api: ApiServer, tmp: Path) -> None:
        self.cri = cri
        self.api = api
        self.name = f"web-{uuid.uuid4().hex[:6]}"
        self.sandbox_id, self.config = cri.run_pod(cri.pod_config(self.name))
        self.containers: list[ContainerRef] = []
        self.kubeconfig = api.kubeconfig(tmp / "kubeconfig")
        self.home = tmp / "home"
        self.home.mkdir(exist_ok=True)
        self.add("c", ["sh", "-c", SERVE])

    def add(self, name: str, command: list[str], **kw: bool) -> ContainerRef:
        cid = self.cri.create(self.sandbox_id, self.config, command, name=name, **kw)
        self.cri.start(cid)
        ref = ContainerRef(
            name, cid, tty=kw.get("tty", False), stdin=kw.get("stdin", False),
            stdin_once=kw.get("stdin_once", False),
        )  # fmt: skip
        self.containers.append(ref)
        self.api.add_pod(self.name, self.sandbox_id, self.containers)
        return ref

    def env(self, transport: str) -> dict[str, str]:
        websockets = "true" if transport == "websocket" else "false"
        return {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(self.home),
            "KUBECONFIG": str(self.kubeconfig),
            "KUBECTL_REMOTE_COMMAND_WEBSOCKETS": websockets,
            "KUBECTL_PORT_FORWARD_WEBSOCKETS": websockets,
        }

    def kubectl(
        self, transport: str, *args: str, input: bytes | None = None, timeout: float = 60
    ) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            [KUBECTL, *args],
            input=input,
            capture_output=True,
            env=self.env(transport),
            timeout=timeout,
            check=False,
        )

    def exec_sync(self, *cmd: str, timeout: int = 60) -> bytes:
        response = self.cri.rt.ExecSync(
            api_pb2.ExecSyncRequest(
                container_id=self.containers[0].container_id, cmd=cmd, timeout=timeout
            ),
            timeout=timeout + 10,
        )
        assert response.exit_code == 0, response.stderr
        return bytes(response.stdout)


@pytest.fixture
def pod(cri, api, tmp_path):
    return Pod(cri, api, tmp_path)


def assert_used(api: ApiServer, subresource: str, transport: str) -> None:
    """The last such request reached pouchd on *transport* and was upgraded."""
    ups = [u for u in api.upgrades if u.subresource == subresource]
    assert ups, api.requests
    last = ups[-1]
    assert (last.transport, last.status) == (transport, 101), last
    expected = {
        ("exec", "spdy"): "v4.channel.k8s.io",
        ("attach", "spdy"): "v4.channel.k8s.io",
        ("exec", "websocket"): "v5.channel.k8s.io",
        ("attach", "websocket"): "v5.channel.k8s.io",
        ("portforward", "spdy"): "portforward.k8s.io",
        ("portforward", "websocket"): "SPDY/3.1+portforward.k8s.io",
    }[subresource, transport]
    assert last.protocol == expected, last


# ---------------------------------------------------------------------------
# exec
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_exec_echo(pod, api, transport):
    result = pod.kubectl(transport, "exec", pod.name, "--", "echo", "hello", "world")
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"hello world\n"
    assert_used(api, "exec", transport)
    # stdout and stderr stay apart.
    result = pod.kubectl(transport, "exec", pod.name, "--", "sh", "-c", "echo out; echo err >&2")
    assert (result.returncode, result.stdout, result.stderr) == (0, b"out\n", b"err\n")


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_exec_exit_code(pod, transport):
    result = pod.kubectl(transport, "exec", pod.name, "--", "sh", "-c", "exit 3")
    assert result.returncode == 3, result.stderr
    result = pod.kubectl(transport, "exec", pod.name, "--", "no-such-command")
    assert result.returncode != 0
    assert b"no-such-command" in result.stderr


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_exec_stdin_to_eof(pod, transport):
    data = os.urandom(4 * 1024 * 1024)
    result = pod.kubectl(transport, "exec", "-i", pod.name, "--", "cat", input=data)
    assert result.returncode == 0, result.stderr
    assert hashlib.sha256(result.stdout).hexdigest() == hashlib.sha256(data).hexdigest()
    # The end of stdin reaches the command: wc prints once stdin is closed.
    result = pod.kubectl(transport, "exec", "-i", pod.name, "--", "wc", "-c", input=data)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [str(len(data)).encode()]


def run_in_terminal(
    argv: list[str],
    env: dict[str, str],
    *,
    rows: int,
    cols: int,
    feed: list[tuple[bytes, bytes]],
    timeout: float = 60,
) -> tuple[int, bytes]:
    """Run *argv* on a new terminal; when output shows a key, type its text."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
    proc = subprocess.Popen(
        argv, stdin=slave, stdout=slave, stderr=slave, env=env, start_new_session=True,
        preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0),
    )  # fmt: skip
    os.close(slave)
    output = b""
    pending = list(feed)
    deadline = time.monotonic() + timeout
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
                os.write(master, pending.pop(0)[1])
            if proc.poll() is not None and not ready:
                break
        return proc.wait(timeout=max(1, deadline - time.monotonic())), output
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_exec_tty(pod, api, transport):
    # The size is read after a pause: the runtime copies it into the container's
    # terminal only after starting the command (runc's console resize races
    # the exec; passing the size as the process's consoleSize would close that).
    script = 'tty; sleep 0.5; stty size; printf "ready\\n"; read line; echo "got $line"; exit 4'
    code, output = run_in_terminal(
        [KUBECTL, "exec", "-ti", pod.name, "--", "sh", "-c", script],
        pod.env(transport),
        rows=33,
        cols=111,
        feed=[(b"ready", b"hello\r")],
    )
    text = output.decode(errors="replace")
    assert re.search(r"/dev/pts/\d+", text), text
    assert "33 111" in text, text  # kubectl sent our terminal's size
    assert "got hello" in text, text
    assert code == 4, text
    assert_used(api, "exec", transport)


# ---------------------------------------------------------------------------
# attach
# ---------------------------------------------------------------------------

ECHO_LOOP = 'while read line; do echo "echo: $line"; done; echo bye'


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_attach(pod, api, transport):
    ref = pod.add("att", ["sh", "-c", ECHO_LOOP], stdin=True, stdin_once=True)
    result = pod.kubectl(
        transport, "attach", "-i", pod.name, "-c", "att", input=b"one\ntwo\n", timeout=60
    )
    assert result.returncode == 0, result.stderr
    # stdin_once: the end of kubectl's input closes the container's stdin, the loop
    # ends, the container exits and so does the attach.
    assert result.stdout == b"echo: one\necho: two\nbye\n", result.stderr
    assert_used(api, "attach", transport)
    status = pod.cri.wait_exited(ref.container_id)
    assert status.exit_code == 0


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_attach_output_only(pod, api, transport):
    ref = pod.add("ticker", ["sh", "-c", "sleep 2; for i in 1 2 3; do echo tick $i; done"])
    result = pod.kubectl(transport, "attach", pod.name, "-c", "ticker", timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"tick 1\ntick 2\ntick 3\n"
    pod.cri.wait_exited(ref.container_id)


# ---------------------------------------------------------------------------
# port-forward
# ---------------------------------------------------------------------------


class PortForward:
    """``kubectl port-forward POD :remote``; the local port is read from its output."""

    def __init__(self, pod: Pod, transport: str, remote: int) -> None:
        self.proc = subprocess.Popen(
            [KUBECTL, "port-forward", "--address", "127.0.0.1", pod.name, f":{remote}"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=pod.env(transport),
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().decode()
        match = re.search(r"Forwarding from 127\.0\.0\.1:(\d+) -> (\d+)", line)
        assert match, (line, self.stop())
        self.port = int(match.group(1))
        self.stderr = b""
        # Keep draining its output so kubectl never blocks on a full pipe.
        threading.Thread(target=self.proc.stdout.read, daemon=True).start()

    def stop(self) -> bytes:
        self.proc.terminate()
        try:
            _, err = self.proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate()
        return err or b""

    def get(self, path: str) -> tuple[int, str, float]:
        """HTTP GET through the forward: body length, SHA-256, seconds."""
        started = time.monotonic()
        with socket.create_connection(("127.0.0.1", self.port), timeout=60) as s:
            s.sendall(f"GET {path} HTTP/1.0\r\nHost: pod\r\n\r\n".encode())
            buf = b""
            while b"\r\n\r\n" not in buf:
                data = s.recv(65536)
                assert data, buf
                buf += data
            head, _, body = buf.partition(b"\r\n\r\n")
            assert head.split(b"\r\n")[0].split()[1] == b"200", head
            h = hashlib.sha256(body)
            size = len(body)
            while data := s.recv(1 << 20):
                h.update(data)
                size += len(data)
        return size, h.hexdigest(), time.monotonic() - started


def make_file(pod: Pod, name: str, size: int) -> str:
    """A file of random bytes under /www in the container; return its SHA-256."""
    pod.exec_sync("sh", "-c", f"head -c {size} /dev/urandom > /www/{name}")
    return pod.exec_sync("sha256sum", f"/www/{name}").split()[0].decode()


@pytest.mark.timeout(300)
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_port_forward(pod, api, transport, record_property):
    big = make_file(pod, "big", BIG)
    small = make_file(pod, "small", 1024 * 1024)
    forward = PortForward(pod, transport, 8080)
    try:
        size, digest, seconds = forward.get("/big")
        assert (size, digest) == (BIG, big)
        record_property("mib_per_s", round(BIG / seconds / 2**20, 1))
        print(f"\n{transport}: 100 MiB in {seconds:.2f} s = {BIG / seconds / 2**20:.0f} MiB/s")
        assert_used(api, "portforward", transport)

        def one(_: int) -> tuple[int, str]:
            return forward.get("/small")[:2]

        with ThreadPoolExecutor(20) as pool:
            results = list(pool.map(one, range(20)))
        assert results == [(1024 * 1024, small)] * 20
        assert forward.proc.poll() is None  # Still forwarding.
        # One session carried every connection.
        assert len([u for u in api.upgrades if u.subresource == "portforward"]) == 1
    finally:
        err = forward.stop()
    assert b"error" not in err.lower(), err


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_port_forward_nothing_listening(pod, transport):
    forward = PortForward(pod, transport, 9999)
    try:
        with socket.create_connection(("127.0.0.1", forward.port), timeout=30) as s:
            s.settimeout(30)
            # The connection ends without data: nothing listens in the pod.
            assert s.recv(100) == b""
    finally:
        err = forward.stop()
    assert b"error forwarding port 9999" in err, err


# ---------------------------------------------------------------------------
# lifetimes
# ---------------------------------------------------------------------------


def test_daemon_shutdown_ends_sessions(make_daemon, registry, tmp_path):
    """SIGTERM: sessions get the grace period, then end with a status; execs are killed."""
    config = f'shutdown_grace_period = 2.0\n[registry]\ninsecure = ["{registry.host}"]\n'
    daemon = make_daemon(config=config).start()
    cri = Client(daemon, registry)
    cri.pull()
    try:
        with ApiServer(daemon.socket) as api:
            pod = Pod(cri, api, tmp_path)
            sessions = [
                subprocess.Popen(
                    [KUBECTL, "exec", pod.name, "--", "sleep", "4242"],
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    env=pod.env(transport),
                )
                for transport in TRANSPORTS
            ]
            deadline = time.monotonic() + 30
            while len([u for u in api.upgrades if u.status == 101]) < 2:
                assert time.monotonic() < deadline, api.upgrades
                time.sleep(0.05)
            time.sleep(0.5)  # Let both commands start.
            started = time.monotonic()
            daemon.signal(signal.SIGTERM)
            assert daemon.wait(timeout=30) == 0, daemon.logs()
            assert time.monotonic() - started < 10
            for proc in sessions:
                _, err = proc.communicate(timeout=30)
                assert proc.returncode != 0
                assert b"ended by pouchd" in err, err
        # The commands were killed with their sessions.
        ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True, check=True)
        assert "sleep 4242" not in ps.stdout
    finally:
        daemon.start()  # Recovers the pod, so cleanup can remove it.
        cri.cleanup()
