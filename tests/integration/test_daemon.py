"""The foundation: a real pouchd, driven by the third-party grpcio CRI client."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import stat
import subprocess
import threading
import time
import tomllib
from pathlib import Path

import grpc
import httpx
import pytest
from cri_api.v1 import api_pb2, api_pb2_grpc

from tests.integration.conftest import POUCHD

pytestmark = [pytest.mark.integration, pytest.mark.root, pytest.mark.timeout(60)]

PROTO = Path(__file__).parents[2] / "protos" / "runtime" / "v1" / "api.proto"
IMPLEMENTED = {
    "Version",
    "Status",
    "RuntimeConfig",
    "PullImage",
    "ImageStatus",
    "ListImages",
    "RemoveImage",
    "ImageFsInfo",
    "RunPodSandbox",
    "StopPodSandbox",
    "RemovePodSandbox",
    "PodSandboxStatus",
    "ListPodSandbox",
    "CreateContainer",
    "StartContainer",
    "StopContainer",
    "RemoveContainer",
    "ContainerStatus",
    "ListContainers",
    "ExecSync",
    "UpdateRuntimeConfig",
    "UpdateContainerResources",
    "ReopenContainerLog",
    "CheckpointContainer",
    "GetContainerEvents",
    "StreamPodSandboxes",
    "StreamContainers",
    "StreamImages",
    "ContainerStats",
    "ListContainerStats",
    "StreamContainerStats",
    "PodSandboxStats",
    "ListPodSandboxStats",
    "StreamPodSandboxStats",
    "ListMetricDescriptors",
    "ListPodSandboxMetrics",
    "StreamPodSandboxMetrics",
    "UpdatePodSandboxResources",
    "Exec",
    "Attach",
    "PortForward",
}


def all_rpcs() -> list[tuple[str, str, bool]]:
    """(service, rpc, server_streaming) for every RPC in our schema."""
    text = PROTO.read_text()
    found = []
    for service, body in re.findall(r"service (\w+) \{(.*?)\n\}", text, re.S):
        for rpc, streaming in re.findall(r"rpc (\w+)\(\w+\) returns \((stream )?\w+\)", body):
            found.append((service, rpc, bool(streaming)))
    return found


def test_schema_has_all_41_rpcs():
    assert len(all_rpcs()) == 41


def test_version(runtime):
    resp = runtime.Version(api_pb2.VersionRequest(version="v1"), timeout=5)
    assert resp.runtime_name == "pouch"
    assert resp.runtime_api_version == "v1"
    assert resp.version == "0.1.0"
    assert re.fullmatch(r"\d+\.\d+\.\d+.*", resp.runtime_version)


def test_status_conditions(runtime):
    resp = runtime.Status(api_pb2.StatusRequest(), timeout=5)
    conditions = {c.type: c for c in resp.status.conditions}
    assert conditions["RuntimeReady"].status is True
    assert conditions["NetworkReady"].status is True
    assert dict(resp.info) == {}


def test_status_verbose_info_is_json(runtime, daemon):
    resp = runtime.Status(api_pb2.StatusRequest(verbose=True), timeout=5)
    info = json.loads(resp.info["config"])
    assert info["socket"] == str(daemon.socket)
    assert info["root"] == str(daemon.root)
    host, port = info["streamServer"].rsplit(":", 1)
    assert host == "127.0.0.1"
    assert int(port) > 0


def test_runtime_config_reports_cgroup_driver(runtime):
    resp = runtime.RuntimeConfig(api_pb2.RuntimeConfigRequest(), timeout=5)
    assert resp.linux.cgroup_driver == api_pb2.CGROUPFS


def test_runtime_config_systemd_driver(make_daemon):
    d = make_daemon(config='[cgroup]\ndriver = "systemd"\n').start()
    with d.channel() as ch:
        resp = api_pb2_grpc.RuntimeServiceStub(ch).RuntimeConfig(
            api_pb2.RuntimeConfigRequest(), timeout=5
        )
    assert resp.linux.cgroup_driver == api_pb2.SYSTEMD


def _call_code(ch, path: str, streaming: bool) -> grpc.StatusCode:
    try:
        if streaming:
            # GetContainerEvents never ends by itself: a deadline ends it.
            list(ch.unary_stream(path)(b"", timeout=2))
        else:
            ch.unary_unary(path)(b"", timeout=10)
    except grpc.RpcError as err:
        return err.code()
    return grpc.StatusCode.OK


def test_no_rpc_of_the_schema_is_unimplemented(daemon):
    """Every one of the 41 RPCs does real work: called with an empty request,
    each answers (or rejects the request), none says UNIMPLEMENTED."""
    seen = 0
    with daemon.channel() as ch:
        for service, rpc, streaming in all_rpcs():
            assert rpc in IMPLEMENTED, rpc
            path = f"/runtime.v1.{service}/{rpc}"
            code = _call_code(ch, path, streaming)
            assert code != grpc.StatusCode.UNIMPLEMENTED, rpc
            seen += 1
    assert seen == 41


def test_unknown_method_is_unimplemented(daemon):
    with daemon.channel() as ch, pytest.raises(grpc.RpcError) as err:
        ch.unary_unary("/runtime.v1.RuntimeService/NoSuchCall")(b"", timeout=5)
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_undecodable_request_is_invalid_argument_and_daemon_survives(daemon, runtime):
    with daemon.channel() as ch, pytest.raises(grpc.RpcError) as err:
        ch.unary_unary("/runtime.v1.RuntimeService/Version")(b"\xff\xff\xff\xff", timeout=5)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "Version" in err.value.details()
    assert runtime.Version(api_pb2.VersionRequest(), timeout=5).runtime_name == "pouch"


def test_unexpected_error_is_unknown_logged_and_daemon_keeps_serving(make_daemon):
    d = make_daemon(env={"POUCHD_FAILPOINTS": "Status=panic"}).start()
    with d.channel() as ch:
        rt = api_pb2_grpc.RuntimeServiceStub(ch)
        with pytest.raises(grpc.RpcError) as err:
            rt.Status(api_pb2.StatusRequest(), timeout=5)
        assert err.value.code() == grpc.StatusCode.UNKNOWN
        assert rt.Version(api_pb2.VersionRequest(), timeout=5).runtime_name == "pouch"
    logs = d.logs()
    assert "Traceback" in logs
    assert "injected panic" in logs


def test_client_deadline_cancels_the_call(make_daemon):
    d = make_daemon(env={"POUCHD_FAILPOINTS": "Status=delay:30"}).start()
    with d.channel() as ch:
        rt = api_pb2_grpc.RuntimeServiceStub(ch)
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as err:
            rt.Status(api_pb2.StatusRequest(), timeout=0.5)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert time.monotonic() - started < 5
        assert rt.Version(api_pb2.VersionRequest(), timeout=5).runtime_name == "pouch"


def test_socket_is_0660_root_owned(daemon):
    st = daemon.socket.stat()
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o660
    assert (st.st_uid, st.st_gid) == (0, 0)


def test_rpcs_are_logged_with_name_ids_and_duration(make_daemon):
    d = make_daemon(config='[log]\nformat = "json"\nlevel = "debug"\n').start()
    with d.channel() as ch:
        api_pb2_grpc.RuntimeServiceStub(ch).Version(api_pb2.VersionRequest(), timeout=5)
        with pytest.raises(grpc.RpcError):
            api_pb2_grpc.RuntimeServiceStub(ch).ContainerStatus(
                api_pb2.ContainerStatusRequest(container_id="abc123"), timeout=5
            )
    records = [json.loads(line) for line in d.logs().splitlines() if line.startswith("{")]
    rpcs = [r for r in records if r.get("event") == "rpc"]
    version = next(r for r in rpcs if r["rpc"] == "Version")
    assert version["code"] == "OK"
    assert isinstance(version["duration_ms"], float)
    status = next(r for r in rpcs if r["rpc"] == "ContainerStatus")
    assert status["container_id"] == "abc123"
    assert status["code"] == "NOT_FOUND"


def test_logfmt_is_the_default_format(daemon, runtime):
    runtime.Status(api_pb2.StatusRequest(), timeout=5)
    lines = daemon.logs().splitlines()
    assert any(re.search(r"level=info .*event=\"pouchd ready\"", line) for line in lines)


def test_stream_server_listens_and_answers_404(runtime):
    info = json.loads(runtime.Status(api_pb2.StatusRequest(verbose=True), timeout=5).info["config"])
    resp = httpx.get(f"http://{info['streamServer']}/exec/nonexistent", timeout=5)
    assert resp.status_code == 404


def test_sigterm_drains_in_flight_call_then_exits_0(make_daemon):
    d = make_daemon(env={"POUCHD_FAILPOINTS": "Status=delay:2"}).start()
    result: dict[str, object] = {}
    with d.channel() as ch:
        rt = api_pb2_grpc.RuntimeServiceStub(ch)

        def slow_call():
            try:
                result["resp"] = rt.Status(api_pb2.StatusRequest(), timeout=20)
            except grpc.RpcError as exc:
                result["err"] = exc

        caller = threading.Thread(target=slow_call)
        caller.start()
        time.sleep(0.5)  # the call is in flight (held 2 s by the failpoint)
        sent = time.monotonic()
        d.signal(signal.SIGTERM)
        time.sleep(0.3)
        # A new call on the open connection is refused while draining...
        with pytest.raises(grpc.RpcError) as refused:
            rt.Version(api_pb2.VersionRequest(), timeout=5)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        # ...and no new connection is accepted.
        probe = socket.socket(socket.AF_UNIX)
        with pytest.raises((ConnectionRefusedError, FileNotFoundError)):
            probe.connect(str(d.socket))
        probe.close()
        caller.join(timeout=20)
    assert "err" not in result, result.get("err")
    assert result["resp"].status.conditions[0].type == "RuntimeReady"
    assert d.wait(timeout=15) == 0
    assert time.monotonic() - sent < 10
    assert not d.socket.exists()
    assert "shutting down" in d.logs()


def test_grace_period_cuts_calls_that_run_too_long(make_daemon):
    d = make_daemon(
        config="shutdown_grace_period = 1.0\n",
        env={"POUCHD_FAILPOINTS": "Status=delay:60"},
    ).start()
    errors: list[grpc.RpcError] = []
    with d.channel() as ch:
        rt = api_pb2_grpc.RuntimeServiceStub(ch)

        def slow_call():
            try:
                rt.Status(api_pb2.StatusRequest(), timeout=30)
            except grpc.RpcError as exc:
                errors.append(exc)

        caller = threading.Thread(target=slow_call)
        caller.start()
        time.sleep(0.5)
        sent = time.monotonic()
        d.signal(signal.SIGINT)
        assert d.wait(timeout=15) == 0
        elapsed = time.monotonic() - sent
        caller.join(timeout=10)
    assert 0.9 < elapsed < 6
    assert len(errors) == 1
    assert not d.socket.exists()


def test_second_daemon_on_a_live_socket_is_refused(daemon, make_daemon):
    second = make_daemon()
    second.socket = daemon.socket  # same socket, its own state dir
    second.start(wait=False)
    assert second.wait(timeout=15) != 0
    assert "another daemon is serving on" in second.logs()
    # The first one is untouched.
    with daemon.channel() as ch:
        api_pb2_grpc.RuntimeServiceStub(ch).Version(api_pb2.VersionRequest(), timeout=5)


def test_second_daemon_on_the_same_state_dir_is_refused(daemon, make_daemon):
    second = make_daemon()
    second.state = daemon.state
    second.start(wait=False)
    assert second.wait(timeout=15) != 0
    assert "another pouchd is running" in second.logs()


def test_stale_socket_file_is_replaced(make_daemon):
    d = make_daemon()
    d.socket.parent.mkdir(parents=True, exist_ok=True)
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(d.socket))  # bound, never listening: what a crash leaves
    stale.close()
    assert d.socket.exists()
    d.start()
    assert "replacing stale socket" in d.logs()
    assert stat.S_IMODE(d.socket.stat().st_mode) == 0o660


def test_daemon_killed_leaves_socket_and_restart_recovers(make_daemon):
    d = make_daemon().start()
    d.signal(signal.SIGKILL)
    d.wait(timeout=10)
    assert d.socket.exists()
    d.start()  # same dirs: the stale socket and the released lock are taken over
    with d.channel() as ch:
        api_pb2_grpc.RuntimeServiceStub(ch).Version(api_pb2.VersionRequest(), timeout=5)


@pytest.mark.parametrize(
    ("config", "named"),
    [
        ("bogus = 1\n", "bogus"),
        ("[grpc]\nadress = '/x'\n", "grpc.adress"),
        ("shutdown_grace_period = 'soon'\n", "shutdown_grace_period"),
        ("[stream]\nport = '80'\n", "stream.port"),
        ("[log]\nlevel = 'loud'\n", "log.level"),
        ("[cgroup]\ndriver = 'lxc'\n", "cgroup.driver"),
        ("grpc = 3\n", "grpc"),
        ("[log\n", "not valid TOML"),
    ],
)
def test_bad_config_stops_start_up_naming_the_key(make_daemon, config, named):
    d = make_daemon(config=config)
    d.start(wait=False)
    assert d.wait(timeout=15) == 2
    assert named in d.logs()
    assert not d.socket.exists()


def test_missing_explicit_config_file_is_an_error(tmp_path):
    proc = subprocess.run(
        [*POUCHD, "--config", str(tmp_path / "nope.toml"), "--print-config"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 2
    assert "does not exist" in proc.stderr


def test_print_config_shows_defaults_and_overrides(tmp_path):
    cfg = tmp_path / "pouchd.toml"
    cfg.write_text('[stream]\nport = 10010\n[log]\nformat = "json"\n')
    proc = subprocess.run(
        [*POUCHD, "--config", str(cfg), "--print-config", "--socket", "/tmp/x.sock"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 0, proc.stderr
    data = tomllib.loads(proc.stdout)
    assert data["root"] == "/var/lib/pouch"
    assert data["state"] == "/run/pouch"
    assert data["grpc"]["address"] == "/tmp/x.sock"
    assert data["stream"]["address"] == "127.0.0.1"
    assert data["stream"]["port"] == 10010
    assert data["stream"]["token_ttl"] == 60.0
    assert data["log"]["format"] == "json"
    assert data["shutdown_grace_period"] == 10.0


def test_default_config_file_is_optional():
    env = {k: v for k, v in os.environ.items() if k != "POUCHD_FAILPOINTS"}
    proc = subprocess.run(
        [*POUCHD, "--print-config"], capture_output=True, text=True, timeout=30, env=env
    )
    assert proc.returncode == 0, proc.stderr
    if not Path("/etc/pouch/pouchd.toml").exists():
        assert 'address = "/run/pouch/pouch.sock"' in proc.stdout


def test_daemon_answers_concurrent_clients(daemon):
    errors: list[BaseException] = []

    def client():
        try:
            with daemon.channel() as ch:
                rt = api_pb2_grpc.RuntimeServiceStub(ch)
                for _ in range(50):
                    rt.Version(api_pb2.VersionRequest(), timeout=5)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=client) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not errors


def test_socket_refuses_unprivileged_users(daemon):
    """0660 root:root: a process running as nobody cannot connect."""
    code = (
        "import os, socket, sys\n"
        "os.setgid(65534); os.setuid(65534)\n"
        "s = socket.socket(socket.AF_UNIX)\n"
        "try:\n"
        f"    s.connect({str(daemon.socket)!r})\n"
        "except PermissionError:\n"
        "    sys.exit(13)\n"
        "sys.exit(0)\n"
    )
    os.chmod(daemon.base, 0o755)
    proc = subprocess.run(["python3", "-c", code], timeout=30)
    assert proc.returncode == 13


def test_status_reports_runtime_handlers_and_features(runtime):
    resp = runtime.Status(api_pb2.StatusRequest(), timeout=5)
    names = [h.name for h in resp.runtime_handlers]
    assert names == ["", "crun", "runc"]
    assert all(not h.features.user_namespaces for h in resp.runtime_handlers)
    assert resp.features.supplemental_groups_policy is True


def test_prometheus_endpoint(make_daemon):
    d = make_daemon(config="[metrics]\nenabled = true\nport = 0\n").start()
    with d.channel() as ch:
        rt = api_pb2_grpc.RuntimeServiceStub(ch)
        for _ in range(3):
            rt.Version(api_pb2.VersionRequest(), timeout=5)
        info = json.loads(rt.Status(api_pb2.StatusRequest(verbose=True), timeout=5).info["config"])
    text = httpx.get(f"http://{info['metricsServer']}/metrics", timeout=5).text
    # The fixture's readiness probe calls Version too.
    count = re.search(r'pouch_rpc_duration_seconds_count\{code="OK",rpc="Version"\} (\d+)', text)
    assert count is not None
    assert int(count.group(1)) >= 3
    assert 'pouch_pods{state="ready"} 0.0' in text
    assert 'pouch_containers{state="running"} 0.0' in text
    assert "pouch_image_pull_bytes_total" in text
    assert "process_resident_memory_bytes" in text


def test_prometheus_endpoint_is_off_by_default(runtime):
    info = json.loads(runtime.Status(api_pb2.StatusRequest(verbose=True), timeout=5).info["config"])
    assert info["metricsServer"] is None
