"""Pods and containers on real runc + conmon, through the third-party CRI client."""

from __future__ import annotations

import json
import re
import time
import uuid
from pathlib import Path

import grpc
import pytest
from cri_api.v1 import api_pb2, api_pb2_grpc

from tests.support import images as timg
from tests.support.registry import push

pytestmark = [pytest.mark.integration, pytest.mark.root, pytest.mark.timeout(120)]


@pytest.fixture
def pd(make_daemon, registry):
    return make_daemon(config=f'[registry]\ninsecure = ["{registry.host}"]\n').start()


class Client:
    def __init__(self, daemon, registry):
        self.daemon = daemon
        self.channel = daemon.channel()
        self.rt = api_pb2_grpc.RuntimeServiceStub(self.channel)
        self.img = api_pb2_grpc.ImageServiceStub(self.channel)
        self.image = f"{registry.host}/library/busybox:latest"
        self.pods: list[str] = []

    def pull(self) -> str:
        req = api_pb2.PullImageRequest(image=api_pb2.ImageSpec(image=self.image))
        return self.img.PullImage(req, timeout=60).image_ref

    def pod_config(self, name: str = "", **linux) -> api_pb2.PodSandboxConfig:
        name = name or f"pod-{uuid.uuid4().hex[:8]}"
        logdir = self.daemon.base / "logs" / name
        return api_pb2.PodSandboxConfig(
            metadata=api_pb2.PodSandboxMetadata(name=name, uid=uuid.uuid4().hex, namespace="test"),
            hostname=name,
            log_directory=str(logdir),
            linux=api_pb2.LinuxPodSandboxConfig(**linux),
        )

    def run_pod(self, config=None, handler: str = "") -> tuple[str, api_pb2.PodSandboxConfig]:
        config = config or self.pod_config()
        sid = self.rt.RunPodSandbox(
            api_pb2.RunPodSandboxRequest(config=config, runtime_handler=handler), timeout=60
        ).pod_sandbox_id
        self.pods.append(sid)
        return sid, config

    def create(self, sid, pod_config, command, *, name="c", **kw) -> str:
        config = api_pb2.ContainerConfig(
            metadata=api_pb2.ContainerMetadata(name=name),
            image=api_pb2.ImageSpec(image=self.image),
            command=command,
            log_path=f"{name}.log",
            **kw,
        )
        return self.rt.CreateContainer(
            api_pb2.CreateContainerRequest(
                pod_sandbox_id=sid, config=config, sandbox_config=pod_config
            ),
            timeout=60,
        ).container_id

    def start(self, cid):
        self.rt.StartContainer(api_pb2.StartContainerRequest(container_id=cid), timeout=30)

    def status(self, cid, verbose=False) -> api_pb2.ContainerStatusResponse:
        return self.rt.ContainerStatus(
            api_pb2.ContainerStatusRequest(container_id=cid, verbose=verbose), timeout=10
        )

    def wait_exited(self, cid, timeout=30) -> api_pb2.ContainerStatus:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            st = self.status(cid).status
            if st.state == api_pb2.CONTAINER_EXITED:
                return st
            time.sleep(0.05)
        raise AssertionError(f"container {cid} did not exit")

    def run(self, command, **kw) -> tuple[api_pb2.ContainerStatus, str]:
        """Run a command to completion in a fresh pod; return its status and log."""
        sid, pc = self.run_pod(kw.pop("pod_config", None))
        cid = self.create(sid, pc, command, **kw)
        self.start(cid)
        st = self.wait_exited(cid)
        return st, Path(st.log_path).read_text()

    def cleanup(self):
        for sid in self.pods:
            try:
                self.rt.StopPodSandbox(
                    api_pb2.StopPodSandboxRequest(pod_sandbox_id=sid), timeout=60
                )
                self.rt.RemovePodSandbox(
                    api_pb2.RemovePodSandboxRequest(pod_sandbox_id=sid), timeout=60
                )
            except grpc.RpcError:
                pass
        self.channel.close()


@pytest.fixture
def cri(pd, registry):
    client = Client(pd, registry)
    client.pull()
    yield client
    client.cleanup()


def log_lines(text: str) -> list[str]:
    """The content of each CRI log line (timestamp, stream, tag stripped)."""
    return [line.split(" ", 3)[3] for line in text.splitlines()]


def test_lifecycle(cri):
    sid, pc = cri.run_pod()
    cid = cri.create(sid, pc, ["sh", "-c", "echo hello; exec sleep 1000"])
    st = cri.status(cid).status
    assert st.state == api_pb2.CONTAINER_CREATED
    assert st.created_at > 0
    cri.start(cid)
    st = cri.status(cid).status
    assert st.state == api_pb2.CONTAINER_RUNNING
    assert st.started_at >= st.created_at
    listed = cri.rt.ListContainers(api_pb2.ListContainersRequest(), timeout=10).containers
    assert [c.id for c in listed] == [cid]
    t0 = time.monotonic()
    cri.rt.StopContainer(api_pb2.StopContainerRequest(container_id=cid, timeout=10), timeout=30)
    assert time.monotonic() - t0 < 5  # sleep dies of SIGTERM at once
    st = cri.status(cid).status
    assert st.state == api_pb2.CONTAINER_EXITED
    assert st.exit_code == 143
    assert st.reason == "Error"
    assert st.finished_at >= st.started_at
    assert log_lines(Path(st.log_path).read_text()) == ["hello"]
    # Idempotent stop and remove.
    cri.rt.StopContainer(api_pb2.StopContainerRequest(container_id=cid, timeout=1), timeout=30)
    cri.rt.RemoveContainer(api_pb2.RemoveContainerRequest(container_id=cid), timeout=30)
    cri.rt.RemoveContainer(api_pb2.RemoveContainerRequest(container_id=cid), timeout=30)
    with pytest.raises(grpc.RpcError) as err:
        cri.status(cid)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    pods = cri.rt.ListPodSandbox(api_pb2.ListPodSandboxRequest(), timeout=10).items
    assert [p.id for p in pods] == [sid]
    assert pods[0].state == api_pb2.SANDBOX_READY
    cri.rt.StopPodSandbox(api_pb2.StopPodSandboxRequest(pod_sandbox_id=sid), timeout=30)
    status = cri.rt.PodSandboxStatus(
        api_pb2.PodSandboxStatusRequest(pod_sandbox_id=sid), timeout=10
    ).status
    assert status.state == api_pb2.SANDBOX_NOTREADY
    # A stopped pod is still listed (a kubelet's GC lists with no filter).
    pods = cri.rt.ListPodSandbox(api_pb2.ListPodSandboxRequest(), timeout=10).items
    assert [(p.id, p.state) for p in pods] == [(sid, api_pb2.SANDBOX_NOTREADY)]
    cri.rt.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id=sid), timeout=30)
    cri.rt.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id=sid), timeout=30)
    with pytest.raises(grpc.RpcError) as err:
        cri.rt.PodSandboxStatus(api_pb2.PodSandboxStatusRequest(pod_sandbox_id=sid), timeout=10)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_exit_codes_and_completed(cri):
    st, _ = cri.run(["sh", "-c", "exit 0"])
    assert (st.exit_code, st.reason) == (0, "Completed")
    st, _ = cri.run(["sh", "-c", "exit 7"], name="seven")
    assert (st.exit_code, st.reason) == (7, "Error")


def sec_ctx(**kw) -> api_pb2.LinuxContainerConfig:
    return api_pb2.LinuxContainerConfig(
        security_context=api_pb2.LinuxContainerSecurityContext(**kw)
    )


def proc_status_field(log: str, field: str) -> str:
    for line in log_lines(log):
        if line.startswith(field + ":"):
            return line.split(":", 1)[1].strip()
    raise AssertionError(f"{field} not in {log!r}")


def test_user_and_groups(cri):
    st, log = cri.run(
        ["id"],
        linux=sec_ctx(
            run_as_user=api_pb2.Int64Value(value=1000),
            run_as_group=api_pb2.Int64Value(value=1000),
            supplemental_groups=[4242],
        ),
    )
    assert st.exit_code == 0
    out = log_lines(log)[0]
    assert out.startswith("uid=1000(app) gid=1000(app)")
    assert "4242" in out


def test_username_from_image_passwd(cri):
    _st, log = cri.run(["id", "-u"], linux=sec_ctx(run_as_username="app"))
    assert log_lines(log) == ["1000"]


def test_default_capabilities_no_new_privs_and_seccomp(cri):
    _st, log = cri.run(
        ["cat", "/proc/self/status"],
        linux=sec_ctx(
            no_new_privs=True,
            seccomp=api_pb2.SecurityProfile(profile_type=api_pb2.SecurityProfile.RuntimeDefault),
        ),
    )
    # containerd's default set: chown dac_override fowner fsetid kill setgid setuid
    # setpcap net_bind_service net_raw sys_chroot mknod audit_write setfcap.
    assert proc_status_field(log, "CapEff") == "00000000a80425fb"
    assert proc_status_field(log, "NoNewPrivs") == "1"
    assert proc_status_field(log, "Seccomp") == "2"


def test_capabilities_add_drop_and_unconfined(cri):
    _st, log = cri.run(
        ["cat", "/proc/self/status"],
        linux=sec_ctx(
            capabilities=api_pb2.Capability(
                add_capabilities=["NET_ADMIN"], drop_capabilities=["ALL"]
            ),
            seccomp=api_pb2.SecurityProfile(profile_type=api_pb2.SecurityProfile.Unconfined),
        ),
    )
    assert proc_status_field(log, "CapEff") == f"{1 << 12:016x}"
    assert proc_status_field(log, "Seccomp") == "0"


def test_hostname_resolv_conf_env_and_workdir(cri):
    pc = cri.pod_config("dnspod")
    pc.dns_config.CopyFrom(
        api_pb2.DNSConfig(
            servers=["10.0.0.10"], searches=["svc.cluster.local"], options=["ndots:5"]
        )
    )
    _st, log = cri.run(
        ["sh", "-c", "hostname; cat /etc/resolv.conf; echo $GREETING; pwd"],
        pod_config=pc,
        envs=[api_pb2.KeyValue(key="GREETING", value="hi there")],
        working_dir="/tmp",
    )
    assert log_lines(log) == [
        "dnspod",
        "nameserver 10.0.0.10",
        "search svc.cluster.local",
        "options ndots:5",
        "hi there",
        "/tmp",
    ]


def test_readonly_rootfs_masked_path_bind_mount_and_sysctl(cri, tmp_path):
    host = tmp_path / "shared"
    host.mkdir()
    (host / "f.txt").write_text("from the host\n")
    pc = cri.pod_config(sysctls={"kernel.shm_rmid_forced": "1"})
    _st, log = cri.run(
        [
            "sh",
            "-c",
            "touch /x 2>/dev/null && echo wrote || echo readonly; "
            "cat /data/f.txt; wc -c < /proc/timer_list; cat /proc/sys/kernel/shm_rmid_forced",
        ],
        pod_config=pc,
        mounts=[api_pb2.Mount(container_path="/data", host_path=str(host), readonly=True)],
        linux=sec_ctx(readonly_rootfs=True),
    )
    assert log_lines(log) == ["readonly", "from the host", "0", "1"]


def test_log_format_and_long_line_split(cri):
    _st, log = cri.run(
        ["sh", "-c", "echo out; echo err >&2; yes a | head -c 40000 | tr -d '\n'; echo"]
    )
    lines = log.splitlines()
    ts, stream, tag, text = lines[0].split(" ", 3)
    assert (stream, tag, text) == ("stdout", "F", "out")
    # RFC 3339 with nanoseconds, as the kubelet writes and reads it.
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{9}(Z|[+-]\d\d:\d\d)", ts), ts
    assert any(line.split(" ", 3)[1:] == ["stderr", "F", "err"] for line in lines)
    # conmon reads 8 KiB at a time: the long line comes as P parts then F.
    entries = [[*line.split(" ", 3), ""] for line in lines]
    start = next(i for i, e in enumerate(entries) if e[1] == "stdout" and e[3] == "out") + 1
    parts = [e for e in entries[start:] if e[1] == "stdout"]
    assert len(parts) >= 3
    assert all(e[2] == "P" for e in parts[:-1])
    assert parts[-1][2] == "F"
    assert "".join(e[3] for e in parts) == "a" * 20000


def test_oom_killed(cri):
    st, _ = cri.run(
        ["sh", "-c", "dd if=/dev/zero of=/dev/null bs=64M count=1"],
        linux=api_pb2.LinuxContainerConfig(
            resources=api_pb2.LinuxContainerResources(memory_limit_in_bytes=16 * 1024 * 1024)
        ),
    )
    assert st.exit_code == 137
    assert st.reason == "OOMKilled"


def test_stop_timeout_then_sigkill(cri):
    sid, pc = cri.run_pod()
    cid = cri.create(sid, pc, ["sh", "-c", "trap '' TERM; while true; do sleep 0.1; done"])
    cri.start(cid)
    time.sleep(0.3)
    t0 = time.monotonic()
    cri.rt.StopContainer(api_pb2.StopContainerRequest(container_id=cid, timeout=2), timeout=30)
    elapsed = time.monotonic() - t0
    assert 1.9 < elapsed < 10
    st = cri.status(cid).status
    assert st.exit_code == 137


def test_bad_input(cri, pd):
    rt = cri.rt
    cases = [
        (
            lambda: rt.RunPodSandbox(
                api_pb2.RunPodSandboxRequest(config=api_pb2.PodSandboxConfig()), timeout=10
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "config.metadata",
        ),
        (
            lambda: rt.RunPodSandbox(
                api_pb2.RunPodSandboxRequest(config=cri.pod_config(), runtime_handler="kata"),
                timeout=10,
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "runtime_handler",
        ),
        (
            lambda: rt.PodSandboxStatus(
                api_pb2.PodSandboxStatusRequest(pod_sandbox_id="f" * 64), timeout=10
            ),
            grpc.StatusCode.NOT_FOUND,
            "f" * 12,
        ),
        (
            lambda: rt.PodSandboxStatus(api_pb2.PodSandboxStatusRequest(), timeout=10),
            grpc.StatusCode.INVALID_ARGUMENT,
            "pod_sandbox_id",
        ),
        (
            lambda: cri.create("e" * 64, cri.pod_config(), ["true"]),
            grpc.StatusCode.NOT_FOUND,
            "e" * 12,
        ),
        (
            lambda: rt.StartContainer(
                api_pb2.StartContainerRequest(container_id="d" * 64), timeout=10
            ),
            grpc.StatusCode.NOT_FOUND,
            "d" * 12,
        ),
        (
            lambda: rt.ContainerStatus(
                api_pb2.ContainerStatusRequest(container_id="c" * 64), timeout=10
            ),
            grpc.StatusCode.NOT_FOUND,
            "c" * 12,
        ),
    ]
    for call, code, text in cases:
        with pytest.raises(grpc.RpcError) as err:
            call()
        assert err.value.code() == code, (text, err.value.details())
        assert text in err.value.details()
    # Idempotent calls on unknown ids succeed.
    rt.StopPodSandbox(api_pb2.StopPodSandboxRequest(pod_sandbox_id="f" * 64), timeout=10)
    rt.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id="f" * 64), timeout=10)
    rt.StopContainer(api_pb2.StopContainerRequest(container_id="c" * 64), timeout=10)
    rt.RemoveContainer(api_pb2.RemoveContainerRequest(container_id="c" * 64), timeout=10)

    sid, pc = cri.run_pod()
    # Missing container metadata, unknown image.
    with pytest.raises(grpc.RpcError) as err:
        rt.CreateContainer(
            api_pb2.CreateContainerRequest(pod_sandbox_id=sid, config=api_pb2.ContainerConfig()),
            timeout=10,
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "config.metadata" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        rt.CreateContainer(
            api_pb2.CreateContainerRequest(
                pod_sandbox_id=sid,
                config=api_pb2.ContainerConfig(
                    metadata=api_pb2.ContainerMetadata(name="x"),
                    image=api_pb2.ImageSpec(image="nothere:1"),
                ),
            ),
            timeout=10,
        )
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert "nothere" in err.value.details()
    # Duplicate name.
    cid = cri.create(sid, pc, ["sleep", "1000"], name="dup")
    with pytest.raises(grpc.RpcError) as err:
        cri.create(sid, pc, ["sleep", "1"], name="dup")
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert "dup" in err.value.details()
    # Start twice.
    cri.start(cid)
    with pytest.raises(grpc.RpcError) as err:
        cri.start(cid)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    # A container in a stopped pod.
    rt.StopPodSandbox(api_pb2.StopPodSandboxRequest(pod_sandbox_id=sid), timeout=30)
    with pytest.raises(grpc.RpcError) as err:
        cri.create(sid, pc, ["true"], name="late")
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "not ready" in err.value.details()


def test_filters(cri):
    sid1, pc1 = cri.run_pod(cri.pod_config("one"))
    pc2 = cri.pod_config("two")
    pc2.labels["app"] = "web"
    sid2, pc2 = cri.run_pod(pc2)
    c1 = cri.create(sid1, pc1, ["sleep", "1000"], labels={"tier": "a"})
    c2 = cri.create(sid2, pc2, ["sleep", "1000"], labels={"tier": "b"})
    cri.start(c2)

    def ids(**f):
        flt = api_pb2.ContainerFilter(**f)
        return [
            c.id
            for c in cri.rt.ListContainers(
                api_pb2.ListContainersRequest(filter=flt), timeout=10
            ).containers
        ]

    assert ids(id=c1) == [c1]
    assert ids(id=c1[:12]) == [c1]
    assert ids(pod_sandbox_id=sid2) == [c2]
    assert ids(state=api_pb2.ContainerStateValue(state=api_pb2.CONTAINER_RUNNING)) == [c2]
    assert ids(state=api_pb2.ContainerStateValue(state=api_pb2.CONTAINER_CREATED)) == [c1]
    assert ids(label_selector={"tier": "a"}) == [c1]
    pods = cri.rt.ListPodSandbox(
        api_pb2.ListPodSandboxRequest(
            filter=api_pb2.PodSandboxFilter(label_selector={"app": "web"})
        ),
        timeout=10,
    ).items
    assert [p.id for p in pods] == [sid2]


@pytest.mark.parametrize("handler", ["runc", "crun"])
def test_runtime_handlers(cri, handler):
    sid, pc = cri.run_pod(handler=handler)
    status = cri.rt.PodSandboxStatus(
        api_pb2.PodSandboxStatusRequest(pod_sandbox_id=sid), timeout=10
    ).status
    assert status.runtime_handler == handler
    cid = cri.create(sid, pc, ["sh", "-c", "echo from $0; exit 5", handler])
    cri.start(cid)
    st = cri.wait_exited(cid)
    assert st.exit_code == 5
    assert log_lines(Path(st.log_path).read_text()) == [f"from {handler}"]


def test_fifty_pods_with_one_container_each(cri):
    started = time.monotonic()
    ids = []
    for i in range(50):
        sid, pc = cri.run_pod(cri.pod_config(f"many-{i}"))
        cid = cri.create(sid, pc, ["sleep", "1000"])
        cri.start(cid)
        ids.append(cid)
    running = cri.rt.ListContainers(
        api_pb2.ListContainersRequest(
            filter=api_pb2.ContainerFilter(
                state=api_pb2.ContainerStateValue(state=api_pb2.CONTAINER_RUNNING)
            )
        ),
        timeout=30,
    ).containers
    assert sorted(c.id for c in running) == sorted(ids)
    assert len(cri.rt.ListPodSandbox(api_pb2.ListPodSandboxRequest(), timeout=30).items) == 50
    print(f"50 pods + containers up in {time.monotonic() - started:.1f}s")


def test_verbose_status_has_pid_and_spec(cri):
    sid, pc = cri.run_pod()
    cid = cri.create(sid, pc, ["sleep", "1000"])
    cri.start(cid)
    info = json.loads(cri.status(cid, verbose=True).info["info"])
    assert info["sandboxID"] == sid
    assert info["pid"] > 0
    assert Path(f"/proc/{info['pid']}").exists()
    assert info["runtimeSpec"]["process"]["args"] == ["sleep", "1000"]
    pod_info = json.loads(
        cri.rt.PodSandboxStatus(
            api_pb2.PodSandboxStatusRequest(pod_sandbox_id=sid, verbose=True), timeout=10
        ).info["info"]
    )
    assert pod_info["pid"] > 0
    assert pod_info["runtimeSpec"]["process"]["args"] == ["/catatonit", "-P"]
    assert pod_info["netNamespacePath"] == f"/run/netns/pouch-{sid[:16]}"


def test_device_is_created_in_the_container(cri):
    _st, log = cri.run(
        ["sh", "-c", "ls -l /dev/mynull; echo x > /dev/mynull && echo ok"],
        devices=[
            api_pb2.Device(container_path="/dev/mynull", host_path="/dev/null", permissions="rwm")
        ],
    )
    out = log_lines(log)
    assert out[0].startswith("crw")
    assert "1,   3" in out[0] or "1, 3" in out[0]
    assert out[1] == "ok"


def test_image_in_use_keeps_its_layers_until_the_container_is_gone(cri, pd):
    sid, pc = cri.run_pod()
    cid = cri.create(sid, pc, ["sleep", "1000"])
    image_id = cri.status(cid).status.image_id
    cri.img.RemoveImage(
        api_pb2.RemoveImageRequest(image=api_pb2.ImageSpec(image=image_id)), timeout=30
    )
    assert not cri.img.ImageStatus(
        api_pb2.ImageStatusRequest(image=api_pb2.ImageSpec(image=image_id)), timeout=10
    ).HasField("image")
    # The container still starts: its layers stayed.
    cri.start(cid)
    assert cri.status(cid).status.state == api_pb2.CONTAINER_RUNNING
    assert [p for p in (pd.root / "snapshots").iterdir() if not p.name.startswith(".")]
    cri.rt.RemoveContainer(api_pb2.RemoveContainerRequest(container_id=cid), timeout=30)
    assert [p for p in (pd.root / "snapshots").iterdir() if not p.name.startswith(".")] == []


def test_create_whose_caller_gave_up_is_parked_for_the_retry(make_daemon, registry):
    d = make_daemon(
        config=f'[registry]\ninsecure = ["{registry.host}"]\n',
        env={"POUCHD_FAILPOINTS": "container.created=delay:2;sandbox.created=delay:2"},
    ).start()
    cri = Client(d, registry)
    cri.pull()
    pc = cri.pod_config("parked")
    with pytest.raises(grpc.RpcError) as err:
        cri.rt.RunPodSandbox(api_pb2.RunPodSandboxRequest(config=pc), timeout=0.5)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    # The kubelet retries with the same metadata: it gets the sandbox, not "name reserved".
    sid = cri.rt.RunPodSandbox(api_pb2.RunPodSandboxRequest(config=pc), timeout=30).pod_sandbox_id
    cri.pods.append(sid)
    assert len(cri.rt.ListPodSandbox(api_pb2.ListPodSandboxRequest(), timeout=10).items) == 1
    config = api_pb2.ContainerConfig(
        metadata=api_pb2.ContainerMetadata(name="slow"),
        image=api_pb2.ImageSpec(image=cri.image),
        command=["sleep", "1000"],
    )
    req = api_pb2.CreateContainerRequest(pod_sandbox_id=sid, config=config, sandbox_config=pc)
    with pytest.raises(grpc.RpcError) as err:
        cri.rt.CreateContainer(req, timeout=0.5)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    cid = cri.rt.CreateContainer(req, timeout=30).container_id
    again = cri.rt.CreateContainer(req, timeout=30).container_id
    assert again == cid
    assert len(cri.rt.ListContainers(api_pb2.ListContainersRequest(), timeout=10).containers) == 1
    cri.cleanup()


def test_exec_sync(cri):
    sid, pc = cri.run_pod()
    cid = cri.create(sid, pc, ["sleep", "1000"])
    cri.start(cid)

    def exec_sync(cmd, timeout=0):
        return cri.rt.ExecSync(
            api_pb2.ExecSyncRequest(container_id=cid, cmd=cmd, timeout=timeout), timeout=60
        )

    r = exec_sync(["sh", "-c", "echo out; echo err >&2; exit 3"])
    assert (r.stdout, r.stderr, r.exit_code) == (b"out\n", b"err\n", 3)
    # A timeout kills the whole process tree and returns promptly.
    t0 = time.monotonic()
    with pytest.raises(grpc.RpcError) as err:
        exec_sync(["sh", "-c", "sleep 1000 & sleep 1000"], timeout=1)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - t0 < 5
    ps = exec_sync(["ps", "-o", "args"]).stdout.decode()
    assert "sleep 1000 &" not in ps
    assert ps.count("sleep 1000") == 1  # only the container's own process
    # Output is capped at 16 MiB per stream, and the cut is stated.  (The reply
    # is then over grpc's default 4 MiB, and kubelet's 16 MiB, receive limit.)
    big = grpc.insecure_channel(
        f"unix://{cri.daemon.socket}", options=[("grpc.max_receive_message_length", 64 << 20)]
    )
    r = api_pb2_grpc.RuntimeServiceStub(big).ExecSync(
        api_pb2.ExecSyncRequest(
            container_id=cid, cmd=["sh", "-c", "head -c 20000000 /dev/zero; echo e >&2"]
        ),
        timeout=60,
    )
    big.close()
    assert len(r.stdout) == 16 * 1024 * 1024
    assert b"truncated" in r.stderr
    # Not running: FAILED_PRECONDITION; unknown: NOT_FOUND.
    cri.rt.StopContainer(api_pb2.StopContainerRequest(container_id=cid, timeout=1), timeout=30)
    with pytest.raises(grpc.RpcError) as err:
        exec_sync(["true"])
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    with pytest.raises(grpc.RpcError) as err:
        cri.rt.ExecSync(api_pb2.ExecSyncRequest(container_id="a" * 64, cmd=["true"]), timeout=10)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_configured_sandbox_image_is_used_and_pinned(make_daemon, registry):
    layer = (
        timg.LayerBuilder()
        .file("pause", Path("/usr/bin/catatonit").read_bytes(), mode=0o755)
        .build()
    )
    pause = timg.build_image([layer], config={"Entrypoint": ["/pause", "-P"], "Cmd": None})
    push(registry, "test/pause", "3.9", pause)
    ref = f"{registry.host}/test/pause:3.9"
    d = make_daemon(
        config=f'[registry]\ninsecure = ["{registry.host}"]\n[runtime]\nsandbox_image = "{ref}"\n'
    ).start()
    cri = Client(d, registry)
    cri.pull()
    try:
        sid, pc = cri.run_pod()  # pulls the sandbox image on first use
        info = json.loads(
            cri.rt.PodSandboxStatus(
                api_pb2.PodSandboxStatusRequest(pod_sandbox_id=sid, verbose=True), timeout=10
            ).info["info"]
        )
        assert info["runtimeSpec"]["process"]["args"] == ["/pause", "-P"]
        assert Path(f"/proc/{info['pid']}/exe").resolve().name == "pause"
        status = cri.img.ImageStatus(
            api_pb2.ImageStatusRequest(image=api_pb2.ImageSpec(image=ref)), timeout=10
        ).image
        assert status.id == pause.config.digest
        assert status.pinned is True
        busybox = cri.img.ImageStatus(
            api_pb2.ImageStatusRequest(image=api_pb2.ImageSpec(image=cri.image)), timeout=10
        ).image
        assert busybox.pinned is False
        cid = cri.create(sid, pc, ["sh", "-c", "echo in a pod of pause; exit 0"])
        cri.start(cid)
        assert cri.wait_exited(cid).exit_code == 0
    finally:
        cri.cleanup()
    with open("/proc/self/mountinfo") as f:
        assert not [line for line in f if str(d.base) in line]


def test_remove_pod_sandbox_without_stop_kills_and_removes_everything(cri, pd):
    sid, pc = cri.run_pod()
    cid = cri.create(sid, pc, ["sleep", "1000"])
    cri.start(cid)
    cri.rt.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id=sid), timeout=60)
    assert list(cri.rt.ListContainers(api_pb2.ListContainersRequest(), timeout=10).containers) == []
    assert list(cri.rt.ListPodSandbox(api_pb2.ListPodSandboxRequest(), timeout=10).items) == []
    assert not Path(f"/run/netns/pouch-{sid[:16]}").exists()
    with open("/proc/self/mountinfo") as f:
        assert not [line for line in f if str(pd.base) in line]
