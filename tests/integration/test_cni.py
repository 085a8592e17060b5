"""pouch.network (CNI and the network manager) against the real plugins.

Debian's containernetworking-plugins (bridge, host-local, portmap) in
/usr/lib/cni, and iptables.  Every test uses a private configuration
directory: a conflist with the bridge ``pouchtest0`` and host-local on
10.211.0.0/24 (its store under tmp_path), then portmap.  Pods are pinned
namespaces ``pouch-test-<random>`` made by pouch.network.netns.  Traffic
stays between the host and the test namespaces.

The ``janitor`` fixture removes every namespace, the test bridges, every
iptables rule and chain the plugins added (comparing ``iptables-save``
before and after), restores ``net.ipv4.ip_forward`` (bridge's
``isGateway`` turns it on) and deletes tmp_path, even when a test fails.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shlex
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import trio

from pouch.container.model import PortMapping, Protocol
from pouch.network import cni, netns
from pouch.network.manager import DEFAULT_BRIDGE, NetworkManager, PodNetwork

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable, Iterator

pytestmark = [pytest.mark.integration, pytest.mark.root, pytest.mark.timeout(120)]

PLUGIN_DIR = Path("/usr/lib/cni")
PLUGINS = ("bridge", "host-local", "loopback", "portmap")
BRIDGE = "pouchtest0"
OTHER_BRIDGE = "pouchtest1"
SUBNET = "10.211.0.0/24"
GATEWAY = "10.211.0.1"
NETWORK = "pouchtest"
IP_FORWARD = Path("/proc/sys/net/ipv4/ip_forward")
TABLES = ("nat", "filter")
POD_PORT = 8080

SERVER = textwrap.dedent(
    """
    import socket, sys
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", int(sys.argv[1])))
    s.listen(8)
    print("ready", flush=True)
    while True:
        c, addr = s.accept()
        c.sendall(("hello from " + sys.argv[2] + " to " + addr[0] + "\\n").encode())
        c.close()
    """
)
CLIENT = textwrap.dedent(
    """
    import socket, sys
    c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
    print(c.makefile().readline().strip())
    """
)


# --------------------------------------------------------------------------
# Host helpers (blocking; small)


def sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, check=check, timeout=30)


def iptables_save(table: str) -> list[str]:
    proc = sh("iptables-save", "-t", table, check=False)
    return proc.stdout.splitlines() if proc.returncode == 0 else []


def restore_iptables(table: str, before: list[str]) -> None:
    """Remove the rules and chains that appeared in *table* since *before*."""
    after = iptables_save(table)
    old_chains = {line[1:].split()[0] for line in before if line.startswith(":")}
    new_chains = [line[1:].split()[0] for line in after if line.startswith(":")]
    new_chains = [c for c in new_chains if c not in old_chains]
    old_rules = set(before)
    for line in reversed(after):
        if line.startswith("-A ") and line not in old_rules:
            args = shlex.split(line)
            if args[1] not in new_chains:
                sh("iptables", "-t", table, "-D", *args[1:], check=False)
    for chain in new_chains:
        sh("iptables", "-t", table, "-F", chain, check=False)
    for chain in new_chains:
        sh("iptables", "-t", table, "-X", chain, check=False)


def link_exists(name: str, namespace: str | None = None) -> bool:
    ns = ["-n", namespace] if namespace else []
    return sh("ip", *ns, "link", "show", "dev", name, check=False).returncode == 0


def addresses(namespace: str, dev: str = "eth0") -> list[str]:
    proc = sh("ip", "-n", namespace, "-j", "addr", "show", "dev", dev, check=False)
    if proc.returncode != 0:
        return []
    return [
        f"{a['local']}/{a['prefixlen']}"
        for link in json.loads(proc.stdout)
        for a in link["addr_info"]
        if a["family"] == "inet"
    ]


def bridge_ports(bridge: str = BRIDGE) -> list[str]:
    proc = sh("ip", "-j", "link", "show", "master", bridge, check=False)
    if proc.returncode != 0 or not proc.stdout.strip():
        return []
    return [link["ifname"] for link in json.loads(proc.stdout)]


def leases(ipam_dir: Path) -> dict[str, str]:
    """host-local's store: address -> the "container id\\nifname" holding it."""
    store = ipam_dir / NETWORK
    if not store.is_dir():
        return {}
    return {
        p.name: p.read_text()
        for p in store.iterdir()
        if p.name not in ("lock",) and not p.name.startswith("last_reserved_ip")
    }


def rules_for(container_id: str) -> list[str]:
    return [line for t in TABLES for line in iptables_save(t) if container_id in line]


def hostport_chains() -> list[str]:
    # portmap's per-pod chains are CNI-DN-<hash> (and CNI-SN- for SNAT).
    return [
        line
        for line in iptables_save("nat")
        if line.startswith((":CNI-DN-", ":CNI-SN-", "-A CNI-DN-", "-A CNI-SN-"))
    ]


def host_veth(pod: PodNetwork, bridge: str = BRIDGE) -> str:
    assert pod.result is not None
    (veth,) = [i.name for i in pod.result.interfaces if not i.sandbox and i.name != bridge]
    return veth


def conflist(ipam_dir: Path, *, bridge_type: str = "bridge", name: str = NETWORK) -> str:
    return json.dumps(
        {
            "cniVersion": "1.0.0",
            "name": name,
            "plugins": [
                {
                    "type": bridge_type,
                    "bridge": BRIDGE if name == NETWORK else OTHER_BRIDGE,
                    "isGateway": True,
                    "ipMasq": False,
                    "hairpinMode": True,
                    "ipam": {
                        "type": "host-local",
                        "ranges": [[{"subnet": SUBNET if name == NETWORK else "10.212.0.0/24"}]],
                        "routes": [{"dst": "0.0.0.0/0"}],
                        "dataDir": str(ipam_dir),
                    },
                },
                {"type": "portmap", "capabilities": {"portMappings": True}},
            ],
        },
        indent=1,
    )


# --------------------------------------------------------------------------
# Fixtures


class Janitor:
    """Names the test's namespaces and removes everything afterwards."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.namespaces: list[str] = []
        self.bridges = [BRIDGE, OTHER_BRIDGE]

    def netns_name(self) -> str:
        name = f"pouch-test-{secrets.token_hex(4)}"
        self.namespaces.append(name)
        return name


@pytest.fixture(scope="module", autouse=True)
def _prerequisites() -> None:
    # A missing prerequisite is a setup failure, not a skip (STYLE.md 7).
    missing = [p for p in PLUGINS if not os.access(PLUGIN_DIR / p, os.X_OK)]
    missing += [t for t in ("iptables", "iptables-save", "ip") if shutil.which(t) is None]
    if missing:
        pytest.fail(
            f"missing {', '.join(missing)}: apt-get install -y containernetworking-plugins iptables"
        )
    if os.geteuid() != 0:
        pytest.fail("tests/integration/test_cni.py needs root")


@pytest.fixture
def janitor(tmp_path: Path) -> Iterator[Janitor]:
    for bridge in (BRIDGE, OTHER_BRIDGE):  # left by an earlier, killed run
        sh("ip", "link", "del", bridge, check=False)
    before = {t: iptables_save(t) for t in TABLES}
    forward = IP_FORWARD.read_text()
    j = Janitor(tmp_path)
    try:
        yield j
    finally:
        for name in j.namespaces:
            sh("ip", "netns", "delete", name, check=False)
            Path("/run/netns", name).unlink(missing_ok=True)
        for bridge in j.bridges:
            sh("ip", "link", "del", bridge, check=False)
        for table in TABLES:
            restore_iptables(table, before[table])
        IP_FORWARD.write_text(forward)
        shutil.rmtree(tmp_path, ignore_errors=True)


class Env:
    def __init__(self, janitor: Janitor) -> None:
        self.janitor = janitor
        base = janitor.base
        self.conf_dir = base / "net.d"
        self.cache_dir = base / "cni-cache"
        self.ipam_dir = base / "ipam"
        self.bin_dir = base / "bin"
        for d in (self.conf_dir, self.bin_dir):
            d.mkdir()
        self.conf_file = self.conf_dir / "10-pouchtest.conflist"
        self.conf_file.write_text(conflist(self.ipam_dir))

    def manager(self, *, use_default: bool = False) -> NetworkManager:
        return NetworkManager(
            cache_dir=self.cache_dir,
            conf_dir=self.conf_dir,
            plugin_dirs=[self.bin_dir, PLUGIN_DIR],
            use_default=use_default,
            ipam_data_dir=self.ipam_dir,
            plugin_timeout=20,
            poll_interval=0.05,
        )

    async def pod(self) -> tuple[str, str, Path]:
        """A fresh namespace: ``(sandbox id, namespace name, path)``."""
        name = self.janitor.netns_name()
        return secrets.token_hex(32), name, await netns.create(name)


@pytest.fixture
def env(janitor: Janitor) -> Env:
    return Env(janitor)


async def setup_pod(
    m: NetworkManager, sandbox_id: str, path: Path, ports: list[PortMapping] | None = None
) -> PodNetwork:
    return await m.setup(
        sandbox_id,
        path,
        pod_name=f"pod-{sandbox_id[:6]}",
        pod_namespace="test",
        pod_uid=f"uid-{sandbox_id[:6]}",
        port_mappings=ports or [],
    )


async def eventually(predicate: Callable[[], bool]) -> None:
    with trio.fail_after(5):
        while True:
            if predicate():
                return
            await trio.sleep(0.02)


async def wait_for_network(m: NetworkManager, name: str | None) -> None:
    await eventually(lambda: (m.network.name if m.network is not None else None) == name)


@contextlib.asynccontextmanager
async def serving(namespace: str, port: int, label: str) -> AsyncIterator[None]:
    """A TCP server in *namespace*; each connection gets one greeting line."""
    proc = await trio.lowlevel.open_process(
        ["ip", "netns", "exec", namespace, sys.executable, "-c", SERVER, str(port), label],
        stdout=subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        line = b""
        with trio.fail_after(10):
            while not line.endswith(b"\n"):
                chunk = await proc.stdout.receive_some(64)
                assert chunk, "the server exited before listening"
                line += chunk
        assert line == b"ready\n"
        yield
    finally:
        proc.kill()
        with trio.CancelScope(shield=True):
            await proc.wait()
        if proc.stdout is not None:
            await proc.stdout.aclose()


async def connect_from(namespace: str, host: str, port: int) -> str:
    proc = await trio.run_process(
        ["ip", "netns", "exec", namespace, sys.executable, "-c", CLIENT, host, str(port)],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr.decode()
    return proc.stdout.decode().strip()


async def connect_from_host(host: str, port: int) -> str:
    with trio.fail_after(5):
        stream = await trio.open_tcp_stream(host, port)
        async with stream:
            data = b""
            while not data.endswith(b"\n"):
                chunk = await stream.receive_some(256)
                if not chunk:
                    break
                data += chunk
    return data.decode().strip()


def free_host_port() -> int:
    # hostPort is intercepted by DNAT before any socket sees it; still, pick
    # one nothing listens on, so a wrong answer cannot come from elsewhere.
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        return int(s.getsockname()[1])


# --------------------------------------------------------------------------
# Tests


async def test_two_pods_connect_and_teardown_cleans_up(env: Env, nursery: trio.Nursery) -> None:
    m = env.manager()
    await nursery.start(m.run)
    assert m.status() == (True, "", "")

    sid_a, ns_a, path_a = await env.pod()
    sid_b, ns_b, path_b = await env.pod()
    host_port = free_host_port()
    ports = [
        PortMapping(Protocol.TCP, container_port=POD_PORT, host_port=host_port),
        PortMapping(Protocol.TCP, container_port=9999, host_port=0),  # not exposed
    ]
    start = trio.current_time()
    pod_a = await setup_pod(m, sid_a, path_a, ports)
    pod_b = await setup_pod(m, sid_b, path_b)
    print(f"two ADDs took {trio.current_time() - start:.3f}s")
    ip_a, ip_b = pod_a.ips[0], pod_b.ips[0]
    assert len(pod_a.ips) == len(pod_b.ips) == 1
    assert ip_a != ip_b
    assert pod_a.gateways == (GATEWAY,)
    # Each namespace has its address; host-local recorded both leases.
    assert addresses(ns_a) == [f"{ip_a}/24"]
    assert addresses(ns_b) == [f"{ip_b}/24"]
    assert m.cached_ips(sid_a) == [ip_a]
    assert leases(env.ipam_dir) == {ip_a: f"{sid_a}\neth0", ip_b: f"{sid_b}\neth0"}
    veth_a, veth_b = host_veth(pod_a), host_veth(pod_b)
    assert sorted(bridge_ports()) == sorted([veth_a, veth_b])
    assert rules_for(sid_a), "portmap added no rule for the pod's host port"
    assert not rules_for(sid_b)  # no host ports

    # Pod to pod: ICMP and TCP.
    ping = sh("ip", "netns", "exec", ns_b, "busybox", "ping", "-c", "1", "-W", "2", ip_a)
    assert " 0% packet loss" in ping.stdout
    async with serving(ns_a, POD_PORT, "a"):
        assert await connect_from(ns_b, ip_a, POD_PORT) == f"hello from a to {ip_b}"
        # Host to pod, over the bridge.
        assert await connect_from_host(ip_a, POD_PORT) == f"hello from a to {GATEWAY}"
        # The host port, on the host's address on the bridge (portmap's OUTPUT
        # DNAT for locally generated traffic to a local address).
        assert await connect_from_host(GATEWAY, host_port) == f"hello from a to {GATEWAY}"

    start = trio.current_time()
    await m.teardown(sid_a, path_a)
    print(f"DEL took {trio.current_time() - start:.3f}s")
    assert leases(env.ipam_dir) == {ip_b: f"{sid_b}\neth0"}
    assert not link_exists(veth_a)
    assert not link_exists("eth0", ns_a)
    assert bridge_ports() == [veth_b]
    assert rules_for(sid_a) == []
    assert hostport_chains() == []
    assert m.cached_ips(sid_a) == []
    assert not (env.cache_dir / f"{sid_a}.json").exists()
    # Idempotent.
    await m.teardown(sid_a, path_a)

    # DEL without the namespace (it is gone) still frees the lease.
    await netns.remove(ns_b)
    await m.teardown(sid_b, None)
    assert leases(env.ipam_dir) == {}
    # The kernel destroys the pair with the namespace, asynchronously.
    await eventually(lambda: bridge_ports() == [])
    assert list(env.cache_dir.glob("*.json")) == []


async def test_teardown_after_the_config_changed_and_a_restart(
    env: Env, nursery: trio.Nursery
) -> None:
    m = env.manager()
    await nursery.start(m.run)
    sid_a, ns_a, path_a = await env.pod()
    sid_b, ns_b, path_b = await env.pod()
    host_port = free_host_port()
    pod_a = await setup_pod(m, sid_a, path_a, [PortMapping(container_port=80, host_port=host_port)])
    pod_b = await setup_pod(m, sid_b, path_b)

    # The directory now names another network on another bridge.
    env.conf_file.write_text(conflist(env.ipam_dir, name="other"))
    await wait_for_network(m, "other")
    await m.teardown(sid_a, path_a)
    assert not link_exists(host_veth(pod_a))
    assert not link_exists("eth0", ns_a)
    assert rules_for(sid_a) == []
    assert list(leases(env.ipam_dir)) == [pod_b.ips[0]]
    assert not link_exists(OTHER_BRIDGE)  # the new config was never run

    # A restarted daemon with no usable configuration at all.
    env.conf_file.unlink()
    restarted = env.manager(use_default=False)
    await nursery.start(restarted.run)
    assert restarted.status()[0] is False
    assert restarted.cached_ips(sid_b) == list(pod_b.ips)
    await restarted.teardown(sid_b, path_b)
    assert not link_exists(host_veth(pod_b))
    assert not link_exists("eth0", ns_b)
    assert leases(env.ipam_dir) == {}
    assert list(env.cache_dir.glob("*.json")) == []


async def test_a_failing_plugin_leaves_nothing_behind(env: Env, nursery: trio.Nursery) -> None:
    # A failpoint in front of the real bridge (containerd's cni-bridge-fp):
    # ADD does all the real work (veth, address, lease) and then fails.
    wrapper = env.bin_dir / "bridge-fp"
    real_add = env.janitor.base / "real-add.json"
    wrapper.write_text(
        textwrap.dedent(
            f"""\
            #!/bin/sh
            if [ "$CNI_COMMAND" = ADD ]; then
                out=$({PLUGIN_DIR}/bridge) || {{ echo "$out"; exit 1; }}
                echo "$out" > {real_add}
                echo '{{"cniVersion":"1.0.0","code":999,'\\
                     '"msg":"injected failure after ADD","details":"bridge-fp"}}'
                exit 1
            fi
            exec {PLUGIN_DIR}/bridge
            """
        )
    )
    wrapper.chmod(0o755)
    env.conf_file.write_text(conflist(env.ipam_dir, bridge_type="bridge-fp"))
    m = env.manager()
    await nursery.start(m.run)
    sid, ns, path = await env.pod()
    host_port = free_host_port()
    with pytest.raises(cni.PluginFailed) as info:
        await setup_pod(m, sid, path, [PortMapping(container_port=80, host_port=host_port)])
    err = info.value
    assert (err.plugin, err.code, err.msg) == ("bridge-fp", 999, "injected failure after ADD")
    assert "cni plugin bridge-fp failed to ADD network 'pouchtest'" in str(err)
    assert "injected failure after ADD" in str(err)
    # There was something to undo: the real bridge had set the pod up.
    done = json.loads(real_add.read_text())
    assert done["ips"][0]["address"].startswith("10.211.0.")
    # The manager ran DEL: no address, no veth, no lease, no rules, no record.
    assert not link_exists("eth0", ns)
    assert bridge_ports() == []
    assert leases(env.ipam_dir) == {}
    assert rules_for(sid) == []
    assert hostport_chains() == []
    assert list(env.cache_dir.glob("*.json")) == []
    assert m.cached_ips(sid) == []


async def test_version_of_the_real_plugins() -> None:
    runner = cni.CNIRunner([PLUGIN_DIR], timeout=10)
    for plugin in PLUGINS:
        versions = await runner.version(plugin)
        assert {"0.4.0", "1.0.0"} <= set(versions), plugin


async def test_check_with_the_real_plugins(env: Env, nursery: trio.Nursery) -> None:
    m = env.manager()
    await nursery.start(m.run)
    sid, ns, path = await env.pod()
    pod = await setup_pod(m, sid, path)
    net = m.network
    assert net is not None
    assert pod.result is not None
    runner = cni.CNIRunner([PLUGIN_DIR], timeout=10)
    rt = cni.RuntimeConf(container_id=sid, netns=str(path))
    await runner.check(net, rt, pod.result.raw)
    # Remove the pod's address behind the plugins' back: CHECK notices.
    sh("ip", "-n", ns, "addr", "flush", "dev", "eth0")
    with pytest.raises(cni.PluginFailed, match="cni plugin bridge failed to CHECK"):
        await runner.check(net, rt, pod.result.raw)
    await m.teardown(sid, path)
    assert leases(env.ipam_dir) == {}


async def test_the_default_network_with_a_pod_cidr(env: Env, nursery: trio.Nursery) -> None:
    # The embedded default (bridge pouch0 with ipMasq, host-local, portmap),
    # on a test subnet given as the node's pod CIDR.
    if link_exists(DEFAULT_BRIDGE):
        # A bridge left by an earlier pouchd is fine to replace; one in use is not.
        if bridge_ports(DEFAULT_BRIDGE):
            pytest.fail(f"{DEFAULT_BRIDGE} is in use: is a pouchd running on this host?")
        sh("ip", "link", "del", DEFAULT_BRIDGE)
    env.janitor.bridges.append(DEFAULT_BRIDGE)
    env.conf_file.unlink()
    m = env.manager(use_default=True)
    m.update_pod_cidr("10.213.0.0/24")
    await nursery.start(m.run)
    assert m.network is not None
    assert m.network.source == "<default>"
    sid, ns, path = await env.pod()
    host_port = free_host_port()
    pod = await setup_pod(m, sid, path, [PortMapping(container_port=POD_PORT, host_port=host_port)])
    (ip,) = pod.ips
    assert ip.startswith("10.213.0.")
    assert addresses(ns) == [f"{ip}/24"]
    assert bridge_ports(DEFAULT_BRIDGE) == [host_veth(pod, DEFAULT_BRIDGE)]
    assert len(rules_for(sid)) >= 2  # ipMasq and portmap
    async with serving(ns, POD_PORT, "default"):
        assert await connect_from_host(ip, POD_PORT) == "hello from default to 10.213.0.1"
        assert await connect_from_host("10.213.0.1", host_port) == (
            "hello from default to 10.213.0.1"
        )
    await m.teardown(sid, path)
    assert rules_for(sid) == []
    assert hostport_chains() == []
    assert not link_exists("eth0", ns)
    assert not (env.ipam_dir / "pouch" / ip).exists()
