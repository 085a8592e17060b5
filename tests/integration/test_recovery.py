"""A daemon killed at any point restarts with its pods and containers, leaking nothing."""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import time
from pathlib import Path

import grpc
import pytest
from cri_api.v1 import api_pb2

from tests.integration.test_containers import Client

pytestmark = [pytest.mark.integration, pytest.mark.root, pytest.mark.timeout(180)]


@pytest.fixture
def daemon_with(make_daemon, registry):
    def make(failpoints: str = ""):
        env = {"POUCHD_FAILPOINTS": failpoints} if failpoints else {}
        return make_daemon(config=f'[registry]\ninsecure = ["{registry.host}"]\n', env=env).start()

    return make


def restart(d, *, failpoints: str = "") -> None:
    d.signal(signal.SIGKILL)
    d.wait(10)
    d.env = {k: v for k, v in d.env.items() if k != "POUCHD_FAILPOINTS"}
    if failpoints:
        d.env["POUCHD_FAILPOINTS"] = failpoints
    d.start()


def runc_ids(d) -> set[str]:
    out = subprocess.run(
        ["runc", "--root", str(d.state / "runtime" / "runc"), "list", "--format", "json"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    return {c["id"] for c in json.loads(out or "null") or []}


def conmon_pids(d) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if b"conmon" in cmdline.split(b"\0")[0] and str(d.state).encode() in cmdline:
            found.append(int(entry.name))
    return found


def assert_no_leaks(d, ids: set[str]) -> None:
    """Nothing of *ids* is left: runtime state, conmon, mounts, netns, cgroups."""
    assert runc_ids(d) == set()
    assert conmon_pids(d) == []
    with open("/proc/self/mountinfo") as f:
        mounts = [line.split()[4] for line in f]
    assert [m for m in mounts if m.startswith(str(d.base))] == []
    for i in ids:
        assert not Path(f"/run/netns/pouch-{i[:16]}").exists()
        for controller in ("memory", "pids", "cpu"):
            assert not Path(f"/sys/fs/cgroup/{controller}/pouch/pouch-{i[:32]}").exists(), i


def test_running_container_survives_a_daemon_kill(daemon_with, registry):
    d = daemon_with()
    cri = Client(d, registry)
    cri.pull()
    sid, pc = cri.run_pod()
    cid = cri.create(sid, pc, ["sh", "-c", "echo before; exec sleep 1000"])
    cri.start(cid)
    restart(d)
    cri = Client(d, registry)
    assert cri.status(cid).status.state == api_pb2.CONTAINER_RUNNING
    assert runc_ids(d) == {sid, cid}
    # The exit is still seen: the new daemon watches the old conmon.
    cri.rt.StopContainer(api_pb2.StopContainerRequest(container_id=cid, timeout=5), timeout=30)
    assert cri.status(cid).status.exit_code == 143
    cri.pods.append(sid)
    cri.cleanup()
    assert_no_leaks(d, {sid, cid})


def test_exit_while_the_daemon_is_down_is_reported(daemon_with, registry):
    d = daemon_with()
    cri = Client(d, registry)
    cri.pull()
    sid, pc = cri.run_pod()
    cid = cri.create(sid, pc, ["sh", "-c", "sleep 1; exit 3"])
    cri.start(cid)
    d.signal(signal.SIGKILL)
    d.wait(10)
    time.sleep(2)
    d.start()
    cri = Client(d, registry)
    st = cri.wait_exited(cid, timeout=10)
    assert (st.exit_code, st.reason) == (3, "Error")
    cri.pods.append(sid)
    cri.cleanup()
    assert_no_leaks(d, {sid, cid})


@pytest.mark.parametrize("point", ["sandbox.prepared", "sandbox.created"])
def test_kill_in_the_middle_of_run_pod_sandbox(daemon_with, registry, point):
    d = daemon_with(f"{point}=delay:60")
    cri = Client(d, registry)

    def run():
        with pytest.raises(grpc.RpcError):
            cri.run_pod(cri.pod_config("half"))

    t = threading.Thread(target=run)
    t.start()
    _wait_for_log(d, "failpoint", point)
    restart(d)
    t.join(10)
    cri = Client(d, registry)
    assert list(cri.rt.ListPodSandbox(api_pb2.ListPodSandboxRequest(), timeout=10).items) == []
    assert_no_leaks(d, set())
    # The name was released: the kubelet's retry succeeds.
    sid, _ = cri.run_pod(cri.pod_config("half"))
    cri.cleanup()
    assert_no_leaks(d, {sid})


@pytest.mark.parametrize("point", ["container.mounted", "container.created"])
def test_kill_in_the_middle_of_create_container(daemon_with, registry, point):
    d = daemon_with(f"{point}=delay:60")
    cri = Client(d, registry)
    cri.pull()
    sid, pc = cri.run_pod()

    def create():
        with pytest.raises(grpc.RpcError):
            cri.create(sid, pc, ["sleep", "1000"], name="half")

    t = threading.Thread(target=create)
    t.start()
    _wait_for_log(d, "failpoint", point)
    restart(d)
    t.join(10)
    cri = Client(d, registry)
    assert list(cri.rt.ListContainers(api_pb2.ListContainersRequest(), timeout=10).containers) == []
    assert runc_ids(d) == {sid}
    cid = cri.create(sid, pc, ["sleep", "1000"], name="half")
    cri.start(cid)
    assert runc_ids(d) == {sid, cid}
    cri.pods.append(sid)
    cri.cleanup()
    assert_no_leaks(d, {sid, cid})


def _wait_for_log(d, *words: str, timeout: float = 30) -> None:
    """Wait until the failpoint is reached (the daemon's state shows it)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _reached(d, words[-1]):
            return
        time.sleep(0.05)
    raise AssertionError(f"failpoint {words[-1]} never reached:\n{d.logs()}")


def _reached(d, point: str) -> bool:
    if point.startswith("sandbox"):
        bundles = list((d.state / "sandboxes").glob("*/config.json"))
        if point == "sandbox.prepared":
            return bool(bundles)
        return bool(runc_ids(d))
    bundles = list((d.state / "containers").glob("*/config.json"))
    if point == "container.mounted":
        return bool(list((d.state / "containers").glob("*/rootfs/bin")))
    return bool(bundles) and len(runc_ids(d)) >= 2
