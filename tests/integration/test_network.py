"""Pod networking through the daemon, with the real CNI plugins."""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import grpc
import httpx
import pytest
from cri_api.v1 import api_pb2

from tests.integration.conftest import TEST_BRIDGE, TEST_CNI_CONFLIST
from tests.integration.test_containers import Client

pytestmark = [pytest.mark.integration, pytest.mark.root, pytest.mark.timeout(300)]

WEB = [
    "sh",
    "-c",
    "mkdir -p /tmp/www && hostname > /tmp/www/index.html && exec httpd -f -p 8080 -h /tmp/www",
]


@pytest.fixture
def cri(make_daemon, registry):
    d = make_daemon(config=f'[registry]\ninsecure = ["{registry.host}"]\n').start()
    client = Client(d, registry)
    client.pull()
    yield client
    client.cleanup()


def pod_ip(cri, sid) -> str:
    status = cri.rt.PodSandboxStatus(
        api_pb2.PodSandboxStatusRequest(pod_sandbox_id=sid), timeout=10
    )
    return status.status.network.ip


def web_pod(cri, name, port_mappings=()):
    pc = cri.pod_config(name)
    for pm in port_mappings:
        pc.port_mappings.append(pm)
    sid, pc = cri.run_pod(pc)
    cid = cri.create(sid, pc, WEB)
    cri.start(cid)
    return sid, cid


def get(url: str) -> str:
    deadline = time.monotonic() + 10
    while True:
        try:
            return httpx.get(url, timeout=2).text
        except httpx.TransportError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def test_pod_ips_host_to_pod_and_pod_to_pod(cri):
    sid_a, _ = web_pod(cri, "web-a")
    sid_b, cid_b = web_pod(cri, "web-b")
    ip_a, ip_b = pod_ip(cri, sid_a), pod_ip(cri, sid_b)
    assert ip_a.startswith("10.230.")
    assert ip_b.startswith("10.230.")
    assert ip_a != ip_b
    # Host to pod over the bridge.
    assert get(f"http://{ip_a}:8080/").strip() == "web-a"
    # Pod to pod.
    r = cri.rt.ExecSync(
        api_pb2.ExecSyncRequest(container_id=cid_b, cmd=["nc", ip_a, "8080"], timeout=10),
        timeout=30,
    )
    del r  # busybox nc without -e cannot send a request; use wget-less sh below
    r = cri.rt.ExecSync(
        api_pb2.ExecSyncRequest(
            container_id=cid_b,
            cmd=["sh", "-c", f"printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc {ip_a} 8080"],
            timeout=10,
        ),
        timeout=30,
    )
    assert r.exit_code == 0
    assert b"web-a" in r.stdout


def test_host_port_reaches_the_pod(cri):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        host_port = s.getsockname()[1]
    sid, _ = web_pod(
        cri,
        "web-hp",
        [api_pb2.PortMapping(protocol=api_pb2.TCP, container_port=8080, host_port=host_port)],
    )
    gateway = TEST_CNI_CONFLIST["plugins"][0]["ipam"]["ranges"][0][0]["subnet"].replace(
        ".0.0/16", ".0.1"
    )
    assert get(f"http://{gateway}:{host_port}/").strip() == "web-hp"
    cri.rt.StopPodSandbox(api_pb2.StopPodSandboxRequest(pod_sandbox_id=sid), timeout=30)
    assert (
        sid[:12]
        not in subprocess.run(["iptables-save"], capture_output=True, text=True, timeout=30).stdout
    )


def test_host_network_pod_skips_cni(cri):
    pc = cri.pod_config("hostnet")
    pc.linux.security_context.namespace_options.network = api_pb2.NODE
    pc.port_mappings.append(api_pb2.PortMapping(container_port=80, host_port=18099))
    sid, pc = cri.run_pod(pc)
    assert pod_ip(cri, sid) == ""
    assert not Path(f"/run/netns/pouch-{sid[:16]}").exists()
    iptables = subprocess.run(["iptables-save"], capture_output=True, text=True, timeout=30).stdout
    assert "18099" not in iptables


def conf_dir_with(tmp_path: Path, *, plugins: Path | None = None) -> tuple[Path, str]:
    conf = tmp_path / "net.d"
    conf.mkdir()
    section = f'\n[network]\nconf_dir = "{conf}"\nuse_default = false\n'
    if plugins is not None:
        section += f'plugin_dirs = ["{plugins}"]\n'
    return conf, section


def write_conflist(conf: Path) -> None:
    (conf / "10-test.conflist").write_text(json.dumps(TEST_CNI_CONFLIST))


def network_ready(cri) -> api_pb2.RuntimeCondition:
    conds = cri.rt.Status(api_pb2.StatusRequest(), timeout=10).status.conditions
    return next(c for c in conds if c.type == "NetworkReady")


def test_network_ready_follows_the_conf_dir(make_daemon, registry, tmp_path):
    conf, section = conf_dir_with(tmp_path)
    d = make_daemon(config=f'[registry]\ninsecure = ["{registry.host}"]\n' + section).start()
    cri = Client(d, registry)
    cond = network_ready(cri)
    assert cond.status is False
    assert cond.reason == "NetworkPluginNotReady"
    assert cond.message
    with pytest.raises(grpc.RpcError) as err:
        cri.run_pod()
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    write_conflist(conf)
    deadline = time.monotonic() + 10
    while not network_ready(cri).status:
        assert time.monotonic() < deadline, "config not reloaded"
        time.sleep(0.2)
    sid, _ = cri.run_pod()
    assert pod_ip(cri, sid).startswith("10.230.")
    # Config removed: not ready again, but the running pod still tears down cleanly.
    (conf / "10-test.conflist").unlink()
    deadline = time.monotonic() + 10
    while network_ready(cri).status:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    cri.cleanup()
    assert not Path(f"/run/netns/pouch-{sid[:16]}").exists()


def failing_plugin_dir(tmp_path: Path) -> tuple[Path, Path]:
    """A plugin dir of the real plugins, with bridge behind a failpoint wrapper."""
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    for real in Path("/usr/lib/cni").iterdir():
        (plugins / real.name).symlink_to(real)
    flag = tmp_path / "fail-add"
    (plugins / "bridge").unlink()
    (plugins / "bridge").write_text(
        "#!/bin/sh\n"
        f'if [ "$CNI_COMMAND" = ADD ] && [ -e {flag} ]; then\n'
        "  /usr/lib/cni/bridge >/dev/null\n"
        '  echo \'{"cniVersion":"1.0.0","code":999,"msg":"injected bridge failure"}\'\n'
        "  exit 1\n"
        "fi\n"
        "exec /usr/lib/cni/bridge\n"
    )
    (plugins / "bridge").chmod(0o755)
    return plugins, flag


def leases() -> set[str]:
    store = Path(TEST_CNI_CONFLIST["plugins"][0]["ipam"]["dataDir"]) / "pouch-test"
    if not store.exists():
        return set()
    return {p.name for p in store.iterdir() if p.name[0].isdigit()}


def veths() -> list[str]:
    out = subprocess.run(
        ["ip", "-o", "link", "show", "master", TEST_BRIDGE],
        capture_output=True,
        text=True,
        timeout=30,
    ).stdout
    return [line.split(":")[1].strip() for line in out.splitlines()]


def test_failing_plugin_surfaces_its_message_and_leaves_nothing(make_daemon, registry, tmp_path):
    plugins, flag = failing_plugin_dir(tmp_path)
    conf, section = conf_dir_with(tmp_path, plugins=plugins)
    write_conflist(conf)
    d = make_daemon(config=f'[registry]\ninsecure = ["{registry.host}"]\n' + section).start()
    cri = Client(d, registry)
    before = (leases(), veths())
    flag.touch()
    with pytest.raises(grpc.RpcError) as err:
        cri.run_pod()
    assert "injected bridge failure" in err.value.details()
    assert (leases(), veths()) == before
    assert list(cri.rt.ListPodSandbox(api_pb2.ListPodSandboxRequest(), timeout=10).items) == []
    # The half-made sandbox is gone: no bundle, no namespace.
    assert list((d.state / "sandboxes").iterdir()) == []
    ours = {p.name for p in (d.root / "sandboxes").iterdir()}
    assert ours == set()
    cri.cleanup()


def test_no_leaks_after_200_cycles_with_failures_and_kills(make_daemon, registry, tmp_path):
    plugins, flag = failing_plugin_dir(tmp_path)
    conf, section = conf_dir_with(tmp_path, plugins=plugins)
    write_conflist(conf)
    d = make_daemon(config=f'[registry]\ninsecure = ["{registry.host}"]\n' + section).start()
    before = (leases(), veths())
    cri = Client(d, registry)
    failures = kills = 0
    sids: set[str] = set()
    for i in range(200):
        if i % 25 == 7:
            flag.touch()
        if flag.exists():
            with pytest.raises(grpc.RpcError, match="injected bridge failure"):
                cri.run_pod(cri.pod_config(f"cycle-{i}"))
            failures += 1
            flag.unlink()
            continue
        sid, _ = cri.run_pod(cri.pod_config(f"cycle-{i}"))
        sids.add(sid)
        if i % 40 == 13:
            # Kill the daemon with the pod networked, then let the next stop/remove finish.
            d.signal(signal.SIGKILL)
            d.wait(10)
            d.start()
            cri = Client(d, registry)
            kills += 1
        cri.rt.StopPodSandbox(api_pb2.StopPodSandboxRequest(pod_sandbox_id=sid), timeout=30)
        cri.rt.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id=sid), timeout=30)
    assert failures == 8
    assert kills == 5
    assert (leases(), veths()) == before
    for sid in sids:
        assert not Path(f"/run/netns/pouch-{sid[:16]}").exists()
    iptables = subprocess.run(["iptables-save"], capture_output=True, text=True, timeout=30).stdout
    assert not [sid for sid in sids if sid in iptables]
    shutil.rmtree(tmp_path / "plugins", ignore_errors=True)


def test_dual_stack_pod_reports_ipv4_then_ipv6(make_daemon, registry, tmp_path):
    bridge = "pouchv6test0"
    conf, section = conf_dir_with(tmp_path)
    conflist = json.loads(json.dumps(TEST_CNI_CONFLIST))
    conflist["name"] = "pouch-test-v6"
    plugin = conflist["plugins"][0]
    plugin["bridge"] = bridge
    plugin["ipam"] = {
        "type": "host-local",
        "ranges": [[{"subnet": "10.231.0.0/24"}], [{"subnet": "fd00:231::/64"}]],
        "routes": [{"dst": "0.0.0.0/0"}, {"dst": "::/0"}],
        "dataDir": str(tmp_path / "ipam"),
    }
    (conf / "10-v6.conflist").write_text(json.dumps(conflist))
    d = make_daemon(config=f'[registry]\ninsecure = ["{registry.host}"]\n' + section).start()
    cri = Client(d, registry)
    cri.pull()
    try:
        sid, _cid = web_pod(cri, "dual")
        status = cri.rt.PodSandboxStatus(
            api_pb2.PodSandboxStatusRequest(pod_sandbox_id=sid), timeout=10
        ).status
        assert status.network.ip.startswith("10.231.0.")
        (v6,) = [ip.ip for ip in status.network.additional_ips]
        assert v6.startswith("fd00:231::")
        # The pod answers on both families (DAD may delay the v6 address a little).
        assert get(f"http://{status.network.ip}:8080/").strip() == "dual"
        assert get(f"http://[{v6}]:8080/").strip() == "dual"
    finally:
        cri.cleanup()
        subprocess.run(["ip", "link", "del", bridge], capture_output=True, timeout=30)
