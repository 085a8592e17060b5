"""Tests for pouch.network.cni and the network manager, with fake plugins.

The fake plugin is a small Python script written into ``tmp_path``: it logs
every call (command, CNI_* environment, stdin) to a JSON-lines file named in
its configuration and answers per its configuration (an address to add, a
failure to report, a delay).  No root, no real plugin, no network.
"""

from __future__ import annotations

import json
import stat
import sys
from pathlib import Path
from typing import TYPE_CHECKING, TypedDict

import pytest
import trio

from pouch.container.model import DNSConfig, PortMapping, Protocol
from pouch.errors import InvalidArgument, RuntimeFailed, Unavailable
from pouch.network import cni
from pouch.network.manager import (
    DEFAULT_BRIDGE,
    DEFAULT_SUBNET,
    NOT_READY_REASON,
    NetworkManager,
    default_network,
)

if TYPE_CHECKING:
    from collections.abc import Callable

pytestmark = pytest.mark.timeout(60)

SANDBOX = "f" * 64

FAKE_PLUGIN = """\
#!{python}
import json, os, sys, time

conf = json.load(sys.stdin)
cmd = os.environ["CNI_COMMAND"]
if conf.get("log"):
    with open(conf["log"], "a") as f:
        env = {{k: v for k, v in os.environ.items() if k.startswith("CNI_")}}
        f.write(json.dumps({{"type": conf.get("type"), "command": cmd, "env": env,
                            "stdin": conf}}) + "\\n")
if cmd == "VERSION":
    print(json.dumps({{"cniVersion": conf["cniVersion"],
                      "supportedVersions": ["0.3.1", "0.4.0", "1.0.0"]}}))
    sys.exit(0)
time.sleep(conf.get("sleep", {{}}).get(cmd, 0))
if conf.get("done"):
    open(conf["done"] + "." + cmd, "w").close()
fail = conf.get("fail", {{}}).get(cmd)
if fail and (not fail.get("while") or os.path.exists(fail["while"])):
    if fail.get("raw"):
        sys.stderr.write(fail["raw"])
    else:
        print(json.dumps({{"cniVersion": conf["cniVersion"], "code": fail.get("code", 100),
                          "msg": fail["msg"], "details": fail.get("details", "")}}))
    sys.exit(1)
if cmd != "ADD":
    sys.exit(0)
result = conf.get("prevResult") or {{"cniVersion": conf["cniVersion"], "interfaces": [],
                                     "ips": []}}
if conf.get("ip"):
    result["interfaces"].append({{"name": os.environ["CNI_IFNAME"], "mac": "02:00:00:00:00:01",
                                  "sandbox": os.environ["CNI_NETNS"]}})
    result["ips"].append({{"address": conf["ip"], "gateway": conf.get("gw", ""),
                           "interface": len(result["interfaces"]) - 1}})
    result["ips"][-1] = {{k: v for k, v in result["ips"][-1].items() if v != ""}}
if conf.get("dns"):
    result["dns"] = conf["dns"]
print(json.dumps(result))
"""


@pytest.fixture
def plugin_dir(tmp_path: Path) -> Path:
    """A plugin directory holding the fake as ``fake-a``, ``fake-b``, ``fake-c``."""
    directory = tmp_path / "bin"
    directory.mkdir()
    for name in ("fake-a", "fake-b", "fake-c", "bridge", "host-local", "portmap"):
        path = directory / name
        path.write_text(FAKE_PLUGIN.format(python=sys.executable))
        path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return directory


@pytest.fixture
def log_path(tmp_path: Path) -> Path:
    return tmp_path / "calls.jsonl"


def calls(log_path: Path) -> list[dict[str, object]]:
    if not log_path.exists():
        return []
    return [json.loads(line) for line in log_path.read_text().splitlines()]


def forget(log_path: Path) -> None:
    log_path.unlink()


def ran(done: Path, command: str) -> bool:
    """Whether the fake reached the end of *command* (its ``done`` marker)."""
    return Path(f"{done}.{command}").exists()


def conflist(
    log_path: Path, *plugins: dict[str, object], version: str = "1.0.0", name: str = "net"
) -> dict[str, object]:
    return {
        "cniVersion": version,
        "name": name,
        "plugins": [{"log": str(log_path), **p} for p in plugins],
    }


def network(doc: dict[str, object]) -> cni.NetworkConfig:
    return cni.parse_config(json.dumps(doc))


RT = cni.RuntimeConf(
    container_id=SANDBOX,
    netns="/run/netns/x",
    args=cni.k8s_args(pod_namespace="ns", pod_name="pod", infra_container_id=SANDBOX, pod_uid="u"),
)


# --------------------------------------------------------------------------
# Environment and stdin


def test_env_add() -> None:
    base = {"PATH": "/bin", "HOME": "/root", "CNI_COMMAND": "stale", "CNI_FOO": "x"}
    env = cni.build_env("ADD", RT, [Path("/a"), Path("/b")], base)
    assert env == {
        "PATH": "/bin",
        "HOME": "/root",
        "CNI_COMMAND": "ADD",
        "CNI_CONTAINERID": SANDBOX,
        "CNI_NETNS": "/run/netns/x",
        "CNI_IFNAME": "eth0",
        "CNI_PATH": "/a:/b",
        "CNI_ARGS": (
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=ns;K8S_POD_NAME=pod;"
            f"K8S_POD_INFRA_CONTAINER_ID={SANDBOX};K8S_POD_UID=u"
        ),
    }


def test_env_defaults_path_and_version_has_no_container() -> None:
    env = cni.build_env("VERSION", RT, [Path("/a")], {})
    assert env["PATH"].startswith("/usr/local/sbin:")
    assert env["CNI_COMMAND"] == "VERSION"
    assert "CNI_CONTAINERID" not in env
    assert "CNI_NETNS" not in env


def test_env_del_without_netns() -> None:
    rt = cni.RuntimeConf(container_id="c", netns="")
    env = cni.build_env("DEL", rt, [], {})
    assert env["CNI_NETNS"] == ""
    assert env["CNI_ARGS"] == ""


def test_capability_args() -> None:
    args = cni.capability_args(
        port_mappings=[
            PortMapping(Protocol.TCP, container_port=80, host_port=8080),
            PortMapping(Protocol.UDP, container_port=53, host_port=5353, host_ip="10.0.0.1"),
            PortMapping(Protocol.SCTP, container_port=9, host_port=0),  # not exposed
        ],
        dns=DNSConfig(servers=("10.96.0.10",), searches=("svc",), options=("ndots:5",)),
        ips=["10.0.0.9"],
    )
    assert args == {
        "portMappings": [
            {"hostPort": 8080, "containerPort": 80, "protocol": "tcp"},
            {"hostPort": 5353, "containerPort": 53, "protocol": "udp", "hostIP": "10.0.0.1"},
        ],
        "dns": {"servers": ["10.96.0.10"], "searches": ["svc"], "options": ["ndots:5"]},
        "ips": ["10.0.0.9"],
    }
    assert cni.capability_args() == {}


def test_plugin_stdin_injects_and_filters_capabilities() -> None:
    net = network(
        {
            "cniVersion": "1.0.0",
            "name": "n",
            "plugins": [
                {"type": "a", "capabilities": {"portMappings": True, "dns": False, "ips": True}},
                {"type": "b", "runtimeConfig": {"mine": 1}},
            ],
        }
    )
    rt = cni.RuntimeConf(
        container_id="c",
        netns="/n",
        capability_args={"portMappings": [{"hostPort": 1}], "dns": {"servers": []}},
    )
    a, b = net.plugins
    conf = cni.plugin_stdin(net, a, rt, {"cniVersion": "1.0.0"})
    assert conf["name"] == "n"
    assert conf["cniVersion"] == "1.0.0"
    assert conf["prevResult"] == {"cniVersion": "1.0.0"}
    # dns is declared false, ips has no value: only portMappings.
    assert conf["runtimeConfig"] == {"portMappings": [{"hostPort": 1}]}
    conf = cni.plugin_stdin(net, b, rt, None)
    assert "prevResult" not in conf
    assert conf["runtimeConfig"] == {"mine": 1}


# --------------------------------------------------------------------------
# Configuration files


def test_parse_conflist_and_conf() -> None:
    net = cni.parse_config(
        b'{"cniVersion": "0.4.0", "name": "n", "disableCheck": true,'
        b' "plugins": [{"type": "bridge"}, {"type": "portmap"}]}',
        source="x",
    )
    assert (net.name, net.cni_version, net.plugin_types) == ("n", "0.4.0", ("bridge", "portmap"))
    assert net.disable_check
    single = cni.parse_config(b'{"cniVersion": "0.3.1", "name": "s", "type": "ptp"}', single=True)
    assert single.raw == {
        "cniVersion": "0.3.1",
        "name": "s",
        "plugins": [{"cniVersion": "0.3.1", "name": "s", "type": "ptp"}],
    }
    # A .conf file holding a list is read as a list (libcni does too).
    listed = cni.parse_config(b'{"cniVersion":"1.0.0","name":"l","plugins":[{"type":"x"}]}')
    assert listed.plugin_types == ("x",)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"{", "invalid JSON"),
        (b"[]", "expected a JSON object"),
        (b'{"cniVersion": "1.0.0", "plugins": [{"type": "x"}]}', "missing network name"),
        (b'{"name": "n", "plugins": [{"type": "x"}]}', "missing cniVersion"),
        (b'{"cniVersion": "2.0.0", "name": "n", "plugins": [{"type": "x"}]}', "unsupported"),
        (b'{"cniVersion": "1.0.0", "name": "n", "plugins": []}', "no plugins"),
        (b'{"cniVersion": "1.0.0", "name": "n", "plugins": [{}]}', "plugin 0 has no type"),
        (b'{"cniVersion": "1.0.0", "name": "n", "plugins": [{"type": "../x"}]}', "invalid type"),
        (b'{"cniVersion": "1.0.0", "name": "n", "type": ""}', "has no type"),
    ],
)
def test_parse_invalid(data: bytes, reason: str) -> None:
    with pytest.raises(cni.InvalidNetworkConfig, match=reason):
        cni.parse_config(data)


def test_scan_dir_lexical_order_and_skips(tmp_path: Path) -> None:
    (tmp_path / "20-b.conflist").write_text(
        '{"cniVersion":"1.0.0","name":"b","plugins":[{"type":"x"}]}'
    )
    (tmp_path / "10-a.conf").write_text('{"cniVersion":"0.4.0","name":"a","type":"y"}')
    (tmp_path / "05-bad.conflist").write_text('{"cniVersion":"1.0.0","plugins":[]}')
    (tmp_path / "07-conf-as-list.conf").write_text("not json")
    (tmp_path / "30-c.json").write_text('{"cniVersion":"1.0.0","name":"c","type":"z"}')
    (tmp_path / "00-README").write_text("ignored")
    (tmp_path / "01-dir.conf").mkdir()
    scan = cni.scan_dir(tmp_path)
    assert [c.name for c in scan.configs] == ["a", "b", "c"]
    assert scan.configs[0].source == str(tmp_path / "10-a.conf")
    assert [name for name, _ in scan.skipped] == ["05-bad.conflist", "07-conf-as-list.conf"]
    assert "missing network name" in scan.skipped[0][1]
    assert "invalid JSON" in scan.skipped[1][1]
    first = cni.select_network(scan)
    assert first is not None
    assert first.name == "a"
    named = cni.select_network(scan, "c")
    assert named is not None
    assert named.plugin_types == ("z",)
    assert cni.select_network(scan, "nope") is None


def test_scan_missing_dir(tmp_path: Path) -> None:
    scan = cni.scan_dir(tmp_path / "absent")
    assert scan.configs == ()
    assert "does not exist" in scan.error


def test_find_plugin(tmp_path: Path, plugin_dir: Path) -> None:
    assert cni.find_plugin("fake-a", [tmp_path, plugin_dir]) == plugin_dir / "fake-a"
    (tmp_path / "noexec").write_text("")
    with pytest.raises(cni.PluginNotFound, match="'noexec'") as info:
        cni.find_plugin("noexec", [tmp_path])
    assert isinstance(info.value, Unavailable)


# --------------------------------------------------------------------------
# Results


def test_parse_result_1_0_0_and_pod_ips() -> None:
    raw: cni.JSONObject = {
        "cniVersion": "1.0.0",
        "interfaces": [
            {"name": "cni0", "mac": "aa:aa:aa:aa:aa:aa"},
            {"name": "eth0", "mac": "02:00:00:00:00:01", "sandbox": "/run/netns/x"},
            {"name": "net1", "sandbox": "/run/netns/x"},
        ],
        "ips": [
            {"address": "fd00::5/64", "gateway": "fd00::1", "interface": 1},
            {"address": "10.0.0.5/24", "gateway": "10.0.0.1", "interface": 1},
            {"address": "192.168.9.9/24", "interface": 2},
        ],
        "routes": [{"dst": "0.0.0.0/0"}, {"dst": "::/0", "gw": "fd00::1"}],
        "dns": {"nameservers": ["10.0.0.53"], "search": ["a"], "options": ["x"], "domain": "d"},
    }
    result = cni.parse_result(raw)
    assert result.pod_ips() == ("10.0.0.5", "fd00::5")
    assert result.pod_ips("net1") == ("192.168.9.9",)
    iface = result.interface("eth0")
    assert iface is not None
    assert iface.mac == "02:00:00:00:00:01"
    assert result.interface("cni0") is None  # host side
    assert result.routes[1] == cni.Route(dst="::/0", gw="fd00::1")
    assert result.dns == cni.DNS(("10.0.0.53",), "d", ("a",), ("x",))
    assert result.raw is raw


def test_parse_result_0_4_0_and_legacy() -> None:
    result = cni.parse_result(
        {
            "cniVersion": "0.4.0",
            "ips": [{"version": "4", "address": "10.1.0.2/16", "gateway": "10.1.0.1"}],
        }
    )
    assert result.pod_ips() == ("10.1.0.2",)
    legacy = cni.parse_result(
        {
            "cniVersion": "0.2.0",
            "ip4": {"ip": "10.2.0.2/16", "gateway": "10.2.0.1", "routes": [{"dst": "0.0.0.0/0"}]},
            "ip6": {"ip": "fd01::2/64"},
        }
    )
    assert legacy.pod_ips() == ("10.2.0.2", "fd01::2")
    assert legacy.routes == (cni.Route("0.0.0.0/0"),)


@pytest.mark.parametrize(
    "raw",
    [
        {"cniVersion": "1.0.0", "ips": [{"address": "nonsense"}]},
        {"cniVersion": "1.0.0", "ips": "x"},
        {"cniVersion": "1.0.0", "ips": [{"address": "10.0.0.1/8", "interface": "0"}]},
        {"cniVersion": "1.0.0", "interfaces": [{"mac": "x"}]},
    ],
)
def test_parse_result_invalid(raw: cni.JSONObject) -> None:
    with pytest.raises(cni.InvalidResult):
        cni.parse_result(raw)


def test_parse_error() -> None:
    out = b'{"cniVersion":"1.0.0","code":7,"msg":"no IPs left","details":"range full"}'
    assert cni.parse_error(out, b"ignored") == (7, "no IPs left", "range full")
    assert cni.parse_error(b"", b"panic: oops\n") == (None, "panic: oops", "")
    assert cni.parse_error(b"garbage", b"") == (None, "garbage", "")
    assert cni.parse_error(b"", b"") == (None, "no error message", "")


# --------------------------------------------------------------------------
# Running plugins


async def test_add_chains_prev_result(plugin_dir: Path, log_path: Path) -> None:
    net = network(
        conflist(
            log_path,
            {"type": "fake-a", "ip": "10.0.0.2/24", "gw": "10.0.0.1"},
            {"type": "fake-b", "capabilities": {"portMappings": True}},
            {"type": "fake-c", "dns": {"nameservers": ["10.0.0.53"]}},
        )
    )
    rt = cni.RuntimeConf(
        container_id=SANDBOX,
        netns="/run/netns/x",
        args=RT.args,
        capability_args=cni.capability_args(
            port_mappings=[PortMapping(host_port=1, container_port=2)]
        ),
    )
    runner = cni.CNIRunner([plugin_dir], timeout=10)
    result = await runner.add(net, rt)
    assert result.pod_ips() == ("10.0.0.2",)
    assert result.dns.nameservers == ("10.0.0.53",)
    a, b, c = calls(log_path)
    assert [x["type"] for x in (a, b, c)] == ["fake-a", "fake-b", "fake-c"]
    assert "prevResult" not in a["stdin"]  # type: ignore[operator]
    a_out = {
        "cniVersion": "1.0.0",
        "interfaces": [{"name": "eth0", "mac": "02:00:00:00:00:01", "sandbox": "/run/netns/x"}],
        "ips": [{"address": "10.0.0.2/24", "gateway": "10.0.0.1", "interface": 0}],
    }
    assert b["stdin"]["prevResult"] == a_out  # type: ignore[index]
    assert c["stdin"]["prevResult"] == a_out  # type: ignore[index]
    assert b["stdin"]["runtimeConfig"] == {  # type: ignore[index]
        "portMappings": [{"hostPort": 1, "containerPort": 2, "protocol": "tcp"}]
    }
    assert "runtimeConfig" not in c["stdin"]  # type: ignore[operator]
    for call in (a, b, c):
        env = call["env"]
        assert env["CNI_COMMAND"] == "ADD"  # type: ignore[index]
        assert env["CNI_CONTAINERID"] == SANDBOX  # type: ignore[index]
        assert env["CNI_NETNS"] == "/run/netns/x"  # type: ignore[index]
        assert env["CNI_IFNAME"] == "eth0"  # type: ignore[index]
        assert env["CNI_PATH"] == str(plugin_dir)  # type: ignore[index]
        assert env["CNI_ARGS"].startswith("IgnoreUnknown=1;K8S_POD_NAMESPACE=ns;")  # type: ignore[index]
        assert call["stdin"]["name"] == "net"  # type: ignore[index]


@pytest.mark.parametrize(
    ("version", "gets_prev"), [("1.0.0", True), ("0.4.0", True), ("0.3.1", False)]
)
async def test_del_reverse_order_with_cached_result(
    plugin_dir: Path, log_path: Path, version: str, gets_prev: bool
) -> None:
    net = network(conflist(log_path, {"type": "fake-a"}, {"type": "fake-b"}, version=version))
    cached: cni.JSONObject = {"cniVersion": version, "ips": [{"address": "10.0.0.2/24"}]}
    await cni.CNIRunner([plugin_dir]).delete(net, RT, cached)
    a, b = calls(log_path)
    assert [a["type"], b["type"]] == ["fake-b", "fake-a"]
    for call in (a, b):
        assert call["command"] == "DEL"
        assert call["stdin"].get("prevResult") == (cached if gets_prev else None)  # type: ignore[attr-defined]


async def test_del_runs_every_plugin_and_raises_first_failure(
    plugin_dir: Path, log_path: Path
) -> None:
    net = network(
        conflist(
            log_path,
            {"type": "fake-a", "fail": {"DEL": {"msg": "a broke"}}},
            {"type": "fake-b", "fail": {"DEL": {"msg": "b broke"}}},
            {"type": "fake-c"},
        )
    )
    with pytest.raises(cni.PluginFailed, match="b broke"):
        await cni.CNIRunner([plugin_dir]).delete(net, RT, None)
    assert [c["type"] for c in calls(log_path)] == ["fake-c", "fake-b", "fake-a"]


async def test_check_and_version(plugin_dir: Path, log_path: Path) -> None:
    runner = cni.CNIRunner([plugin_dir])
    net = network(conflist(log_path, {"type": "fake-a"}, {"type": "fake-b"}))
    cached: cni.JSONObject = {"cniVersion": "1.0.0"}
    await runner.check(net, RT, cached)
    assert [(c["type"], c["command"]) for c in calls(log_path)] == [
        ("fake-a", "CHECK"),
        ("fake-b", "CHECK"),
    ]
    assert all(c["stdin"]["prevResult"] == cached for c in calls(log_path))  # type: ignore[index]
    disabled = network({**conflist(log_path, {"type": "fake-a"}), "disableCheck": True})
    await runner.check(disabled, RT, cached)
    assert len(calls(log_path)) == 2
    old = network(conflist(log_path, {"type": "fake-a"}, version="0.3.1"))
    with pytest.raises(cni.InvalidNetworkConfig, match="CHECK"):
        await runner.check(old, RT, cached)
    assert await runner.version("fake-a") == ("0.3.1", "0.4.0", "1.0.0")


async def test_plugin_error_passed_verbatim(plugin_dir: Path, log_path: Path) -> None:
    fail = {"ADD": {"code": 7, "msg": "failed to allocate: range full", "details": "10.0.0.0/30"}}
    net = network(conflist(log_path, {"type": "fake-a"}, {"type": "fake-b", "fail": fail}))
    with pytest.raises(cni.PluginFailed) as info:
        await cni.CNIRunner([plugin_dir]).add(net, RT)
    err = info.value
    assert isinstance(err, RuntimeFailed)
    assert not isinstance(err, Unavailable)
    assert (err.plugin, err.command, err.network) == ("fake-b", "ADD", "net")
    assert (err.code, err.msg, err.details) == (7, fail["ADD"]["msg"], "10.0.0.0/30")
    assert err.returncode == 1
    assert str(err) == (
        "cni plugin fake-b failed to ADD network 'net': "
        "failed to allocate: range full: 10.0.0.0/30 (code 7)"
    )


async def test_plugin_try_again_is_unavailable(plugin_dir: Path, log_path: Path) -> None:
    net = network(
        conflist(log_path, {"type": "fake-a", "fail": {"ADD": {"code": 11, "msg": "busy"}}})
    )
    with pytest.raises(cni.PluginUnavailable, match="busy"):
        await cni.CNIRunner([plugin_dir]).add(net, RT)


async def test_plugin_crash_without_error_object(plugin_dir: Path, log_path: Path) -> None:
    fail = {"ADD": {"raw": "panic: runtime error\n"}}
    net = network(conflist(log_path, {"type": "fake-a", "fail": fail}))
    with pytest.raises(cni.PluginFailed, match="fake-a failed to ADD network 'net': panic") as info:
        await cni.CNIRunner([plugin_dir]).add(net, RT)
    assert info.value.code is None
    assert info.value.stderr == "panic: runtime error\n"


async def test_invalid_result_is_a_failure(tmp_path: Path, log_path: Path) -> None:
    script = tmp_path / "liar"
    script.write_text("#!/bin/sh\necho 'not json'\n")
    script.chmod(0o755)
    net = network(conflist(log_path, {"type": "liar"}))
    with pytest.raises(cni.PluginFailed, match=r"liar failed to ADD.*invalid result"):
        await cni.CNIRunner([tmp_path]).add(net, RT)


async def test_missing_plugin(plugin_dir: Path, log_path: Path) -> None:
    net = network(conflist(log_path, {"type": "fake-a"}, {"type": "absent"}))
    with pytest.raises(cni.PluginNotFound, match="absent"):
        await cni.CNIRunner([plugin_dir]).add(net, RT)


async def test_timeout_kills_the_plugin(plugin_dir: Path, log_path: Path, tmp_path: Path) -> None:
    done = tmp_path / "done"
    net = network(conflist(log_path, {"type": "fake-a", "sleep": {"ADD": 30}, "done": str(done)}))
    start = trio.current_time()
    with pytest.raises(cni.PluginFailed, match=r"fake-a failed to ADD network 'net': timed out"):
        await cni.CNIRunner([plugin_dir], timeout=0.5).add(net, RT)
    assert trio.current_time() - start < 5
    assert not ran(done, "ADD")


async def test_caller_cancel_does_not_kill_a_running_plugin(
    plugin_dir: Path, log_path: Path, tmp_path: Path
) -> None:
    done = tmp_path / "done"
    net = network(
        conflist(
            log_path,
            {"type": "fake-a", "sleep": {"ADD": 0.5}, "done": str(done)},
            {"type": "fake-b"},
        )
    )
    with trio.move_on_after(0.05) as scope:
        await cni.CNIRunner([plugin_dir], timeout=10).add(net, RT)
    assert scope.cancelled_caught
    # The plugin that was running finished; the next one never started.
    assert ran(done, "ADD")
    assert [c["type"] for c in calls(log_path)] == ["fake-a"]


# --------------------------------------------------------------------------
# The manager, with fake plugins


def write_conf(conf_dir: Path, name: str, doc: dict[str, object]) -> None:
    conf_dir.mkdir(exist_ok=True)
    tmp = conf_dir / f".{name}.tmp"
    tmp.write_text(json.dumps(doc))
    tmp.rename(conf_dir / name)


def manager(
    tmp_path: Path, plugin_dir: Path, *, network_name: str = "", use_default: bool = True
) -> NetworkManager:
    return NetworkManager(
        cache_dir=tmp_path / "cni-cache",
        conf_dir=tmp_path / "net.d",
        network_name=network_name,
        use_default=use_default,
        plugin_dirs=[plugin_dir],
        plugin_timeout=10,
        poll_interval=0.05,
    )


async def wait_for(predicate: Callable[[], bool]) -> None:
    # The manager polls every 0.05 s here.
    with trio.fail_after(5):
        while True:
            if predicate():
                return
            await trio.sleep(0.02)


class Pod(TypedDict):
    pod_name: str
    pod_namespace: str
    pod_uid: str


POD: Pod = {"pod_name": "web", "pod_namespace": "default", "pod_uid": "uid-1"}


async def test_manager_not_ready_then_reloads(
    tmp_path: Path, plugin_dir: Path, log_path: Path, nursery: trio.Nursery
) -> None:
    conf_dir = tmp_path / "net.d"
    write_conf(conf_dir, "05-bad.conflist", {"name": "x"})
    m = manager(tmp_path, plugin_dir, use_default=False)
    assert m.status()[0] is False  # not loaded before run()
    await nursery.start(m.run)
    ready, reason, message = m.status()
    assert (ready, reason) == (False, NOT_READY_REASON)
    assert f"no network config found in {conf_dir}" in message
    assert "skipped 05-bad.conflist: missing cniVersion" in message
    with pytest.raises(Unavailable, match="cni plugin not initialized"):
        await m.setup(SANDBOX, "/run/netns/x", **POD)

    write_conf(conf_dir, "20-b.conflist", conflist(log_path, {"type": "fake-a"}, name="b"))
    await wait_for(lambda: m.status()[0])
    assert m.status() == (True, "", "")
    assert m.network is not None
    assert m.network.name == "b"
    # A lexically earlier file wins.
    write_conf(conf_dir, "10-a.conflist", conflist(log_path, {"type": "fake-a"}, name="a"))
    await wait_for(lambda: m.network is not None and m.network.name == "a")
    # A plugin that is not installed makes the network not ready...
    write_conf(conf_dir, "10-a.conflist", conflist(log_path, {"type": "fake-z"}, name="a"))
    await wait_for(lambda: not m.status()[0])
    assert "failed to find cni plugin 'fake-z'" in m.status()[2]
    # ...until it is.
    (plugin_dir / "fake-z").symlink_to(plugin_dir / "fake-a")
    await wait_for(lambda: m.status()[0])


async def test_manager_named_network(
    tmp_path: Path, plugin_dir: Path, log_path: Path, nursery: trio.Nursery
) -> None:
    conf_dir = tmp_path / "net.d"
    write_conf(conf_dir, "10-a.conflist", conflist(log_path, {"type": "fake-a"}, name="a"))
    write_conf(conf_dir, "20-b.conf", {"cniVersion": "1.0.0", "name": "b", "type": "fake-b"})
    m = manager(tmp_path, plugin_dir, network_name="b", use_default=False)
    await nursery.start(m.run)
    assert m.network is not None
    assert m.network.plugin_types == ("fake-b",)
    # A named network that is missing is not replaced by the default.
    m2 = manager(tmp_path, plugin_dir, network_name="c")
    await nursery.start(m2.run)
    assert m2.status()[:2] == (False, NOT_READY_REASON)
    assert "no network config named 'c'" in m2.status()[2]
    m3 = manager(tmp_path, plugin_dir, network_name="pouch")
    await nursery.start(m3.run)
    assert m3.network is not None
    assert m3.network.source == "<default>"


async def test_manager_default_network(
    tmp_path: Path, plugin_dir: Path, nursery: trio.Nursery
) -> None:
    m = manager(tmp_path, plugin_dir)
    await nursery.start(m.run)
    assert m.status() == (True, "", "")
    net = m.network
    assert net is not None
    assert net.source == "<default>"
    bridge, portmap = net.plugins
    assert bridge["bridge"] == DEFAULT_BRIDGE
    ipam = bridge["ipam"]
    assert ipam == {
        "type": "host-local",
        "ranges": [[{"subnet": DEFAULT_SUBNET}]],
        "routes": [{"dst": "0.0.0.0/0"}],
        "dataDir": str(tmp_path / "cni-cache" / "host-local"),
    }
    assert portmap == {"type": "portmap", "capabilities": {"portMappings": True}}
    m.update_pod_cidr("10.244.1.0/24,fd00:1::/64")
    net = m.network
    assert net is not None
    assert net.plugins[0]["ipam"]["ranges"] == [  # type: ignore[index]
        [{"subnet": "10.244.1.0/24"}],
        [{"subnet": "fd00:1::/64"}],
    ]
    with pytest.raises(InvalidArgument, match="invalid pod CIDR"):
        m.update_pod_cidr("10.0.0.0/33")
    m.update_pod_cidr("")  # ignored
    assert m.network is net


async def test_pod_cidr_leaves_a_config_file_alone(
    tmp_path: Path, plugin_dir: Path, log_path: Path, nursery: trio.Nursery
) -> None:
    write_conf(tmp_path / "net.d", "10-a.conflist", conflist(log_path, {"type": "fake-a"}))
    m = manager(tmp_path, plugin_dir)
    await nursery.start(m.run)
    before = m.network
    m.update_pod_cidr("10.244.1.0/24")
    assert m.network is before
    # The default, when it comes into use later, has the recorded CIDR.
    (tmp_path / "net.d" / "10-a.conflist").unlink()
    await wait_for(lambda: m.network is not None and m.network.source == "<default>")
    assert m.network is not None
    assert m.network.plugins[0]["ipam"]["ranges"] == [[{"subnet": "10.244.1.0/24"}]]  # type: ignore[index]


def test_default_network_ipv6_only() -> None:
    net = default_network(pod_cidrs=["fd00::/64"])
    ipam = net.plugins[0]["ipam"]
    assert ipam["routes"] == [{"dst": "::/0"}]  # type: ignore[index]
    assert "dataDir" not in ipam  # type: ignore[operator]


async def test_setup_caches_and_teardown_uses_the_cache(
    tmp_path: Path, plugin_dir: Path, log_path: Path, nursery: trio.Nursery
) -> None:
    conf_dir = tmp_path / "net.d"
    write_conf(
        conf_dir,
        "10-a.conflist",
        conflist(
            log_path,
            {"type": "fake-a", "ip": "10.0.0.2/24", "gw": "10.0.0.1"},
            {"type": "fake-b", "capabilities": {"portMappings": True, "dns": True}},
            name="first",
        ),
    )
    m = manager(tmp_path, plugin_dir, use_default=False)
    await nursery.start(m.run)
    ports = [PortMapping(Protocol.UDP, container_port=53, host_port=1053)]
    dns = DNSConfig(servers=("10.96.0.10",))
    pod = await m.setup(SANDBOX, Path("/run/netns/x"), port_mappings=ports, dns=dns, **POD)
    assert pod.ips == ("10.0.0.2",)
    assert pod.gateways == ("10.0.0.1",)
    assert (pod.interface, pod.mac, pod.network_name) == ("eth0", "02:00:00:00:00:01", "first")
    assert m.cached_ips(SANDBOX) == ["10.0.0.2"]
    assert m.cached_sandboxes() == [SANDBOX]

    record = json.loads((tmp_path / "cni-cache" / f"{SANDBOX}.json").read_text())
    assert record["network"]["name"] == "first"
    assert record["result"]["ips"][0]["address"] == "10.0.0.2/24"
    assert ["K8S_POD_NAME", "web"] in record["cni_args"]
    assert ["K8S_POD_UID", "uid-1"] in record["cni_args"]
    assert record["capability_args"]["portMappings"] == [
        {"hostPort": 1053, "containerPort": 53, "protocol": "udp"}
    ]
    add_b = calls(log_path)[1]
    assert add_b["stdin"]["runtimeConfig"]["dns"]["servers"] == ["10.96.0.10"]  # type: ignore[index]

    # Idempotent: the same sandbox again returns the record, runs nothing.
    again = await m.setup(SANDBOX, Path("/run/netns/x"), **POD)
    assert again.ips == pod.ips
    assert len(calls(log_path)) == 2

    # The directory changes; DEL still runs the network ADD used.
    (conf_dir / "10-a.conflist").unlink()
    write_conf(conf_dir, "10-z.conflist", conflist(log_path, {"type": "fake-c"}, name="second"))
    await wait_for(lambda: m.network is not None and m.network.name == "second")
    forget(log_path)
    await m.teardown(SANDBOX, tmp_path / "gone-netns")
    dels = calls(log_path)
    assert [(c["type"], c["command"]) for c in dels] == [("fake-b", "DEL"), ("fake-a", "DEL")]
    assert dels[0]["stdin"]["name"] == "first"  # type: ignore[index]
    assert dels[0]["stdin"]["prevResult"] == record["result"]  # type: ignore[index]
    assert dels[0]["stdin"]["runtimeConfig"]["portMappings"]  # type: ignore[index]
    assert dels[0]["env"]["CNI_NETNS"] == ""  # type: ignore[index]  # the namespace is gone
    assert "K8S_POD_NAME=web" in dels[0]["env"]["CNI_ARGS"]  # type: ignore[index]
    assert not (tmp_path / "cni-cache" / f"{SANDBOX}.json").exists()
    assert m.cached_ips(SANDBOX) == []
    # Idempotent: nothing recorded, nothing run.
    await m.teardown(SANDBOX, None)
    assert len(calls(log_path)) == 2


async def test_failed_del_keeps_the_record_for_a_retry(
    tmp_path: Path, plugin_dir: Path, log_path: Path, nursery: trio.Nursery
) -> None:
    flag = tmp_path / "fail-del"
    flag.touch()
    fail = {"DEL": {"msg": "iptables is locked", "while": str(flag)}}
    write_conf(
        tmp_path / "net.d",
        "10-a.conflist",
        conflist(log_path, {"type": "fake-a", "ip": "10.0.0.3/24", "fail": fail}),
    )
    m = manager(tmp_path, plugin_dir, use_default=False)
    await nursery.start(m.run)
    await m.setup(SANDBOX, "/run/netns/x", **POD)
    with pytest.raises(cni.PluginFailed, match="fake-a failed to DEL network 'net': iptables is"):
        await m.teardown(SANDBOX, "/run/netns/x")
    assert m.cached_ips(SANDBOX) == ["10.0.0.3"]
    assert (tmp_path / "cni-cache" / f"{SANDBOX}.json").exists()
    flag.unlink()
    await m.teardown(SANDBOX, "/run/netns/x")
    assert not (tmp_path / "cni-cache" / f"{SANDBOX}.json").exists()


async def test_failed_add_is_undone(
    tmp_path: Path, plugin_dir: Path, log_path: Path, nursery: trio.Nursery
) -> None:
    fail = {"ADD": {"code": 5, "msg": "cannot make veth"}}
    write_conf(
        tmp_path / "net.d",
        "10-a.conflist",
        conflist(
            log_path, {"type": "fake-a", "ip": "10.0.0.4/24"}, {"type": "fake-b", "fail": fail}
        ),
    )
    m = manager(tmp_path, plugin_dir, use_default=False)
    await nursery.start(m.run)
    with pytest.raises(cni.PluginFailed, match="fake-b failed to ADD network 'net': cannot make"):
        await m.setup(SANDBOX, "/run/netns/x", **POD)
    assert [(c["type"], c["command"]) for c in calls(log_path)] == [
        ("fake-a", "ADD"),
        ("fake-b", "ADD"),
        ("fake-b", "DEL"),
        ("fake-a", "DEL"),
    ]
    assert list((tmp_path / "cni-cache").glob("*.json")) == []
    assert m.cached_ips(SANDBOX) == []


async def test_failed_undo_keeps_the_record(
    tmp_path: Path, plugin_dir: Path, log_path: Path, nursery: trio.Nursery
) -> None:
    fail = {"ADD": {"msg": "add broke"}, "DEL": {"msg": "del broke"}}
    write_conf(
        tmp_path / "net.d", "10-a.conflist", conflist(log_path, {"type": "fake-a", "fail": fail})
    )
    m = manager(tmp_path, plugin_dir, use_default=False)
    await nursery.start(m.run)
    with pytest.raises(cni.PluginFailed, match="add broke") as info:
        await m.setup(SANDBOX, "/run/netns/x", **POD)
    assert any("del broke" in note for note in info.value.__notes__)
    record = json.loads((tmp_path / "cni-cache" / f"{SANDBOX}.json").read_text())
    assert record["result"] is None
    assert m.cached_ips(SANDBOX) == []


async def test_restart_recovers_the_cache_and_finishes_a_pending_add(
    tmp_path: Path, plugin_dir: Path, log_path: Path, nursery: trio.Nursery
) -> None:
    write_conf(
        tmp_path / "net.d",
        "10-a.conflist",
        conflist(log_path, {"type": "fake-a", "ip": "10.0.0.5/24"}),
    )
    first = manager(tmp_path, plugin_dir, use_default=False)
    await nursery.start(first.run)
    await first.setup(SANDBOX, "/run/netns/x", **POD)
    # A record left by a daemon that died during ADD (no result yet).
    pending = "e" * 64
    record = json.loads((tmp_path / "cni-cache" / f"{SANDBOX}.json").read_text())
    record.update(sandbox_id=pending, result=None)
    (tmp_path / "cni-cache" / f"{pending}.json").write_text(json.dumps(record))

    second = manager(tmp_path, plugin_dir, use_default=False)
    await nursery.start(second.run)
    assert second.cached_ips(SANDBOX) == ["10.0.0.5"]
    assert second.cached_sandboxes() == [pending, SANDBOX]
    forget(log_path)
    # setup of the pending one undoes the half-done ADD first.
    pod = await second.setup(pending, "/run/netns/y", **POD)
    assert pod.ips == ("10.0.0.5",)
    assert [c["command"] for c in calls(log_path)] == ["DEL", "ADD"]
    await second.teardown(SANDBOX)
    await second.teardown(pending)
    assert list((tmp_path / "cni-cache").glob("*.json")) == []


async def test_setup_is_shielded_from_the_caller(
    tmp_path: Path, plugin_dir: Path, log_path: Path, nursery: trio.Nursery
) -> None:
    write_conf(
        tmp_path / "net.d",
        "10-a.conflist",
        conflist(log_path, {"type": "fake-a", "ip": "10.0.0.6/24", "sleep": {"ADD": 0.3}}),
    )
    m = manager(tmp_path, plugin_dir, use_default=False)
    await nursery.start(m.run)
    with trio.move_on_after(0.05):
        await m.setup(SANDBOX, "/run/netns/x", **POD)
    # The ADD finished and is recorded, so teardown can undo it.
    assert m.cached_ips(SANDBOX) == ["10.0.0.6"]
    await m.teardown(SANDBOX)
    assert m.cached_ips(SANDBOX) == []


async def test_invalid_sandbox_id(tmp_path: Path, plugin_dir: Path) -> None:
    m = manager(tmp_path, plugin_dir)
    with pytest.raises(InvalidArgument):
        await m.setup("../x", "/run/netns/x", **POD)
    with pytest.raises(InvalidArgument):
        await m.teardown("a/b")
