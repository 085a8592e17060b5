"""Fixtures that run a real ``pouchd`` and talk to it with a client we did not write."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import pytest
from cri_api.v1 import api_pb2, api_pb2_grpc

if TYPE_CHECKING:
    from collections.abc import Iterator

pytestmark = [pytest.mark.integration, pytest.mark.root]

POUCHD = [sys.executable, "-m", "pouch"]
READY_TIMEOUT = 15.0

# Test daemons share one CNI network of their own (not the host's pouch0),
# torn down when the session ends.
TEST_CNI_DIR = Path("/tmp/pouch-test-cni")
TEST_BRIDGE = "pouchdtest0"
TEST_SUBNET = "10.230.0.0/16"
TEST_CNI_CONFLIST = {
    "cniVersion": "1.0.0",
    "name": "pouch-test",
    "plugins": [
        {
            "type": "bridge",
            "bridge": TEST_BRIDGE,
            "isGateway": True,
            "ipMasq": False,
            "hairpinMode": True,
            "ipam": {
                "type": "host-local",
                "ranges": [[{"subnet": TEST_SUBNET}]],
                "routes": [{"dst": "0.0.0.0/0"}],
                "dataDir": str(TEST_CNI_DIR / "ipam"),
            },
        },
        {"type": "portmap", "capabilities": {"portMappings": True}},
    ],
}


def network_section() -> str:
    conf = TEST_CNI_DIR / "net.d"
    conf.mkdir(parents=True, exist_ok=True)
    (conf / "10-pouch-test.conflist").write_text(json.dumps(TEST_CNI_CONFLIST))
    return f'\n[network]\nconf_dir = "{conf}"\nuse_default = false\n'


@pytest.fixture(scope="session", autouse=True)
def _test_network():
    yield
    subprocess.run(["ip", "link", "del", TEST_BRIDGE], capture_output=True, timeout=30)
    shutil.rmtree(TEST_CNI_DIR, ignore_errors=True)


class Daemon:
    """A ``pouchd`` process on a private root, state dir and socket."""

    def __init__(self, base: Path, *, config: str | None = None, env: dict[str, str] | None = None):
        self.base = base
        self.root = base / "root"
        self.state = base / "state"
        self.socket = base / "pouch.sock"
        self.log_path = base / "pouchd.log"
        self.config_path = base / "pouchd.toml"
        config = config or ""
        if "[network]" not in config:
            config += network_section()
        self.config_path.write_text(config)
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None

    def argv(self) -> list[str]:
        argv = [*POUCHD, "--root", str(self.root), "--state", str(self.state)]
        argv += ["--socket", str(self.socket)]
        if self.config_path is not None:
            argv += ["--config", str(self.config_path)]
        return argv

    def start(self, *, wait: bool = True) -> Daemon:
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(self.argv(), stdout=log, stderr=log, env=self.env)
        log.close()
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"pouchd exited with {self.proc.returncode}:\n{self.logs()}")
            if self.socket.exists():
                try:
                    with self.channel() as ch:
                        api_pb2_grpc.RuntimeServiceStub(ch).Version(
                            api_pb2.VersionRequest(), timeout=1
                        )
                    return
                except grpc.RpcError:
                    pass
            time.sleep(0.05)
        raise AssertionError(f"pouchd not ready within {READY_TIMEOUT}s:\n{self.logs()}")

    def channel(self) -> grpc.Channel:
        return grpc.insecure_channel(f"unix://{self.socket}")

    def logs(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def wait(self, timeout: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout=timeout)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)


@pytest.fixture(scope="session")
def registry():
    """A real registry on loopback holding busybox as library/busybox:latest."""
    from tests.support import images as timg
    from tests.support.registry import Registry, push

    with Registry() as r:
        push(r, "library/busybox", "latest", timg.busybox_image())
        yield r


@pytest.fixture
def daemon_dir() -> Iterator[Path]:
    # Short paths: a unix socket path must fit in 108 bytes.
    base = Path(tempfile.mkdtemp(prefix="pouch-t-", dir="/tmp"))
    try:
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def make_daemon(daemon_dir: Path) -> Iterator[type[Daemon]]:
    """Build daemons on a private directory; every one is stopped afterwards."""
    made: list[Daemon] = []
    counter = iter(range(1000))

    class _Daemon(Daemon):
        def __init__(self, *, shared: bool = False, **kwargs):
            base = daemon_dir if shared else daemon_dir / f"d{next(counter)}"
            base.mkdir(exist_ok=True)
            super().__init__(base, **kwargs)
            made.append(self)

    yield _Daemon
    for d in made:
        d.stop()


@pytest.fixture
def daemon(make_daemon: type[Daemon]) -> Daemon:
    return make_daemon().start()


@pytest.fixture
def runtime(daemon: Daemon) -> Iterator[api_pb2_grpc.RuntimeServiceStub]:
    with daemon.channel() as ch:
        yield api_pb2_grpc.RuntimeServiceStub(ch)


@pytest.fixture
def images(daemon: Daemon) -> Iterator[api_pb2_grpc.ImageServiceStub]:
    with daemon.channel() as ch:
        yield api_pb2_grpc.ImageServiceStub(ch)
