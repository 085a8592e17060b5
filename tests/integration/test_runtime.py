"""pouch.container.runtime and .monitor against real conmon, runc and crun.

Every test runs with both runtimes.  Containers are busybox bundles
(tests/support/bundle.py) in a cgroup parent of their own; the fixture deletes every
container, kills every conmon and removes the cgroups afterwards, even on failure.
"""

from __future__ import annotations

import json
import os
import re
import signal
import stat
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import trio

from pouch.container import monitor as mon
from pouch.container.runtime import ExecResult, Runtime, RuntimeHandler
from pouch.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    RuntimeFailed,
)
from tests.support import bundle as tb

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

pytestmark = [pytest.mark.integration, pytest.mark.root, pytest.mark.timeout(60)]

REPO = Path(__file__).resolve().parents[2]
LOG_LINE = re.compile(rb"^(\S+) (stdout|stderr) (P|F) (.*)$")
# Keeps a container running until the test creates /go in its root file system.
WAIT_FOR_GO = "while [ ! -e /go ]; do sleep 0.05; done"


@dataclass
class Container:
    container_id: str
    bundle: tb.Bundle
    log_path: Path
    persist_dir: Path
    pid: int


class Env:
    """One runtime (runc or crun) on a private state directory."""

    def __init__(self, base: Path, name: str) -> None:
        self.base = base
        binary = tb.RUNC if name == "runc" else tb.crun_binary(base)
        self.handler = RuntimeHandler(name=name, binary=binary, root=base / "state" / name)
        self.attach_dir = base / "attach"
        self.exit_dir = base / "exits"
        self.runtime = Runtime(self.handler, attach_socket_dir=self.attach_dir)
        self.monitor = mon.ContainerMonitor(
            exit_dir=self.exit_dir, attach_socket_dir=self.attach_dir, poll_interval=0.05
        )
        self.cgroups = tb.CgroupParent()
        (base / "logs").mkdir()

    def bundle(self, container_id: str, args: Sequence[str], **kwargs: Any) -> tb.Bundle:
        return tb.make_bundle(
            self.base / "bundles" / container_id,
            args,
            cgroups_path=self.cgroups.path_for(container_id),
            **kwargs,
        )

    async def create(
        self,
        container_id: str,
        script: str,
        *,
        tty: bool = False,
        stdin: bool = False,
        log_max_size: int | None = None,
        **kwargs: Any,
    ) -> Container:
        b = self.bundle(container_id, ["sh", "-c", script], terminal=tty, **kwargs)
        return await self.create_from(
            container_id, b, tty=tty, stdin=stdin, log_max_size=log_max_size
        )

    async def create_from(
        self,
        container_id: str,
        b: tb.Bundle,
        *,
        tty: bool = False,
        stdin: bool = False,
        log_max_size: int | None = None,
        log_path: Path | None = None,
    ) -> Container:
        log_path = log_path or self.base / "logs" / f"{container_id}.log"
        persist_dir = self.base / "persist" / container_id
        pid = await self.runtime.create(
            container_id,
            b.path,
            log_path=log_path,
            exit_dir=self.exit_dir,
            persist_dir=persist_dir,
            stdin=stdin,
            tty=tty,
            log_max_size=log_max_size,
        )
        return Container(container_id, b, log_path, persist_dir, pid)

    async def run(self, container_id: str, script: str, **kwargs: Any) -> Container:
        c = await self.create(container_id, script, **kwargs)
        await self.runtime.start(container_id)
        return c

    async def wait_exit(self, c: Container) -> int:
        return await self.monitor.wait_exit(c.container_id, mon.read_conmon_pid(c.persist_dir))


@pytest.fixture(params=["runc", "crun"])
def env(request):
    with tb.private_dir("pouch-rt-") as base:
        e = Env(base, request.param)
        try:
            yield e
        finally:
            tb.cleanup_runtime(e.handler.binary, e.handler.root, base, e.cgroups)
        assert not tb.processes_mentioning(str(base)), "conmon or runtime processes left"
        assert not e.cgroups.dirs(), "cgroups left"


def parse_log(path: Path) -> list[tuple[bytes, str, str, bytes]]:
    entries = []
    # Split on "\n" only: a terminal's "\r" is part of the line.
    for line in path.read_bytes().split(b"\n")[:-1]:
        m = LOG_LINE.match(line)
        assert m, line
        entries.append((m[1], m[2].decode(), m[3].decode(), m[4]))
    return entries


def log_lines(*paths: Path, stream: str = "stdout") -> list[bytes]:
    """Whole lines of one stream: P parts joined to the F that ends them.

    With several files (a rotated log, then the current one) a line may begin in
    one and end in the next, as the kubelet's reader allows.
    """
    entries = [e for path in paths if path.exists() for e in parse_log(path)]
    lines, partial = [], b""
    for _, s, tag, text in entries:
        if s != stream:
            continue
        partial += text
        if tag == "F":
            lines.append(partial)
            partial = b""
    return lines


async def eventually(
    predicate: Callable[[], bool], within: float = 10.0, interval: float = 0.02
) -> None:
    with trio.fail_after(within):
        while True:
            if predicate():
                return
            await trio.sleep(interval)


def is_our_child(pid: int) -> bool:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return False
    return True


# --------------------------------------------------------------------------
# Lifecycle
# --------------------------------------------------------------------------


async def test_create_start_wait_exit(env: Env) -> None:
    with trio.fail_after(30):
        c = await env.create("exit7", "exit 7")
        state = await env.runtime.state("exit7")
        assert state is not None
        assert state["status"] == "created"
        assert state["pid"] == c.pid
        # conmon is up and detached: it is not our child.
        conmon_pid = mon.read_conmon_pid(c.persist_dir)
        assert conmon_pid is not None
        assert mon.is_conmon_of(conmon_pid, "exit7")
        assert tb.proc_state(conmon_pid) is not None
        assert not is_our_child(conmon_pid)
        sock = env.monitor.attach_socket_path("exit7")
        assert stat.S_ISSOCK(sock.stat().st_mode)

        await env.runtime.start("exit7")
        assert await env.wait_exit(c) == 7
        assert env.monitor.read_exit_code("exit7") == 7
        assert (c.persist_dir / "exit").read_text() == "7"
        assert not mon.oom_killed(c.persist_dir)
        state = await env.runtime.state("exit7")
        assert state is not None
        assert state["status"] == "stopped"
        await env.runtime.delete("exit7")
        assert await env.runtime.state("exit7") is None
        assert not (env.attach_dir / "exit7").exists()


async def test_log_is_cri_format_with_partial_lines(env: Env) -> None:
    script = 'echo hello; echo oops >&2; head -c 20000 /dev/zero | tr "\\0" a; echo; echo bye'
    with trio.fail_after(30):
        c = await env.run("logs", script)
        assert await env.wait_exit(c) == 0
    entries = parse_log(c.log_path)
    for ts, *_ in entries:  # RFC 3339 with nanoseconds.
        assert re.fullmatch(rb"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{9}(Z|[+-]\d\d:\d\d)", ts)
        datetime.fromisoformat(ts[:26].decode() + ts[29:].decode().replace("Z", "+00:00"))
    assert ("stdout", "F", b"hello") in [e[1:] for e in entries]
    assert ("stderr", "F", b"oops") in [e[1:] for e in entries]
    # conmon reads 8 KiB at a time: the 20000-byte line arrives as P parts, ended by
    # an F entry (empty if the newline came in a read of its own).
    stdout = [e for e in entries if e[1] == "stdout"]
    assert stdout[0][2:] == ("F", b"hello")
    assert stdout[-1][2:] == ("F", b"bye")
    long = stdout[1:-1]
    assert [e[2] for e in long] == ["P"] * (len(long) - 1) + ["F"]
    assert len(long) >= 3
    assert all(len(e[3]) <= 16 * 1024 for e in long)
    assert log_lines(c.log_path) == [b"hello", b"a" * 20000, b"bye"]


async def test_kill_sigterm_reports_143(env: Env) -> None:
    # Outside a pid namespace sleep is not a pid 1, which would ignore SIGTERM.
    with trio.fail_after(30):
        c = await env.run("term", "exec sleep 1000", pid_namespace=False)
        await env.runtime.kill("term", signal.SIGTERM)
        assert await env.wait_exit(c) == 128 + signal.SIGTERM
        # A stopped container takes further signals without complaint.
        await env.runtime.kill("term", signal.SIGKILL)
        await env.runtime.kill("term", signal.SIGKILL, all=True)
        with pytest.raises(NotFound):
            await env.runtime.kill("nosuch", signal.SIGKILL)


async def test_kill_sigkill_pid1_reports_137(env: Env) -> None:
    with trio.fail_after(30):
        c = await env.run("pid1", "exec sleep 1000")
        await env.runtime.kill("pid1", signal.SIGKILL, all=True)
        assert await env.wait_exit(c) == 137


async def test_delete_is_idempotent(env: Env) -> None:
    with trio.fail_after(30):
        await env.runtime.delete("never-existed")
        await env.runtime.delete("never-existed", force=True)
        c = await env.run("del", "exec sleep 1000")
        with pytest.raises(RuntimeFailed) as excinfo:
            await env.runtime.delete("del")  # Running: needs force.
        assert excinfo.value.stderr
        assert (await env.runtime.state("del") or {}).get("status") == "running"
        await env.runtime.delete("del", force=True)
        assert await env.wait_exit(c) == 137
        await env.runtime.delete("del")
        await env.runtime.delete("del", force=True)
        assert await env.runtime.state("del") is None
        assert "del" not in [s["id"] for s in await env.runtime.list()]


async def test_state_and_list_agree(env: Env) -> None:
    with trio.fail_after(30):
        assert await env.runtime.list() == []
        await env.create("one", "exec sleep 1000")
        await env.run("two", "exec sleep 1000")
        c3 = await env.run("three", "exit 0")
        await env.wait_exit(c3)
        listed = {s["id"]: s for s in await env.runtime.list()}
        assert set(listed) == {"one", "two", "three"}
        for container_id, status in [("one", "created"), ("two", "running"), ("three", "stopped")]:
            state = await env.runtime.state(container_id)
            assert state is not None
            assert state["status"] == listed[container_id]["status"] == status
            assert state["pid"] == listed[container_id]["pid"]
            assert state["bundle"] == listed[container_id]["bundle"]
        assert await env.runtime.state("nosuch") is None


async def test_start_unknown_and_invalid_ids(env: Env) -> None:
    with trio.fail_after(30):
        with pytest.raises(NotFound):
            await env.runtime.start("nosuch")
        with pytest.raises(NotFound):
            await env.runtime.update("nosuch", {"pids": {"limit": 10}})
        for bad in ("../escape", "", "a/b", ".."):
            with pytest.raises(InvalidArgument):
                await env.runtime.state(bad)


async def test_create_failure_reports_runtime_stderr(env: Env) -> None:
    b = env.bundle("broken", ["sh", "-c", "exit 0"])
    b.config["root"]["path"] = "no-such-rootfs"
    b.write()
    with trio.fail_after(30), pytest.raises(RuntimeFailed) as excinfo:
        await env.create_from("broken", b)
    assert excinfo.value.stderr
    assert await env.runtime.state("broken") is None
    # conmon exits after reporting the failure.
    await eventually(lambda: not tb.processes_mentioning(str(b.path)))


async def test_create_without_log_directory_fails_cleanly(env: Env) -> None:
    b = env.bundle("nolog", ["sh", "-c", "exit 0"])
    with trio.fail_after(30), pytest.raises(RuntimeFailed) as excinfo:
        await env.create_from("nolog", b, log_path=env.base / "missing" / "nolog.log")
    assert "log file" in excinfo.value.stderr  # conmon's own message
    assert await env.runtime.state("nolog") is None


async def test_stdin_pipe_and_log_size_limit(env: Env) -> None:
    with trio.fail_after(30):
        piped = await env.run("piped", "ls -l /proc/self/fd/0", stdin=True)
        closed = await env.run("closed", "ls -l /proc/self/fd/0")
        # conmon restarts the file (truncating it) rather than exceed the limit.
        capped = await env.run("capped", "seq 1 500", log_max_size=1000)
        for c in (piped, closed, capped):
            assert await env.wait_exit(c) == 0
    assert b"pipe:" in log_lines(piped.log_path)[0]
    assert log_lines(closed.log_path)[0].endswith(b"/dev/null")
    assert capped.log_path.stat().st_size <= 1000
    assert log_lines(capped.log_path)[-1] == b"500"


async def test_create_existing_id(env: Env) -> None:
    with trio.fail_after(30):
        await env.create("dup", "exec sleep 1000")
        b = env.bundle("dup2", ["sh", "-c", "exit 0"])
        with pytest.raises(AlreadyExists):
            await env.create_from("dup", b)
        state = await env.runtime.state("dup")  # The first one is untouched.
        assert state is not None
        assert state["status"] == "created"


async def test_update_resources(env: Env) -> None:
    with trio.fail_after(30):
        await env.run("upd", "exec sleep 1000")
        await env.runtime.update("upd", {"pids": {"limit": 42}})
        [pids_dir] = [d for d in env.cgroups.dirs() if d.parent.name == "pids"]
        assert (pids_dir / "upd" / "pids.max").read_text().strip() == "42"


# --------------------------------------------------------------------------
# exec_sync
# --------------------------------------------------------------------------


async def test_exec_sync_output_and_exit_code(env: Env) -> None:
    with trio.fail_after(30):
        await env.run("ex", "exec sleep 1000")
        r = await env.runtime.exec_sync(
            "ex", ["sh", "-c", "echo out; echo err >&2; exit 3"], timeout=10
        )
        assert r == ExecResult(exit_code=3, stdout=b"out\n", stderr=b"err\n")
        r = await env.runtime.exec_sync(
            "ex", ["sh", "-c", 'echo "$FOO $PATH"; pwd'], timeout=10, env=["FOO=bar"], cwd="/tmp"
        )
        assert r.exit_code == 0
        assert r.stdout == f"bar {tb.PATH_ENV[5:]}\n/tmp\n".encode()
        r = await env.runtime.exec_sync("ex", ["sh", "-c", "echo $0"], timeout=0)  # CRI: forever
        assert (r.exit_code, r.stdout, r.timed_out) == (0, b"sh\n", False)
        with pytest.raises(InvalidArgument):
            await env.runtime.exec_sync("ex", ["true"], timeout=-1)
        r = await env.runtime.exec_sync("ex", ["/no/such/binary"], timeout=10)
        assert r.exit_code != 0
        assert r.stderr


async def test_exec_sync_truncates_output(env: Env) -> None:
    with trio.fail_after(30):
        await env.run("big", "exec sleep 1000")
        r = await env.runtime.exec_sync(
            "big", ["sh", "-c", "head -c 300000 /dev/zero; echo e >&2"], timeout=10, max_output=1000
        )
        assert r.exit_code == 0
        assert r.stdout == b"\0" * 1000
        assert r.stderr == b"e\n"
        assert r.truncated
        assert not r.timed_out


def leftovers(env: Env, c: Container) -> set[int]:
    """Live processes of the container besides its init: by cgroup and by pid ns."""
    in_cgroup = tb.live(env.cgroups.procs(c.container_id))
    return (in_cgroup | tb.pid_namespace_members(c.pid)) - {c.pid}


async def test_exec_sync_timeout_kills_process_tree(env: Env) -> None:
    with trio.fail_after(30):
        c = await env.run("slow", "exec sleep 1000")
        start = trio.current_time()
        r = await env.runtime.exec_sync(
            "slow", ["sh", "-c", "echo started; sleep 1000 & sleep 1000"], timeout=1
        )
        elapsed = trio.current_time() - start
        assert r.timed_out
        assert r.stdout == b"started\n"
        assert 1 <= elapsed < 3, elapsed
        assert not leftovers(env, c)
        assert not tb.processes_mentioning("pouch-exec-")
        # The container itself is unharmed.
        assert (await env.runtime.state("slow") or {}).get("status") == "running"


async def test_exec_sync_cancelled_kills_process_tree(env: Env) -> None:
    with trio.fail_after(30):
        c = await env.run("cancel", "exec sleep 1000")
        with trio.move_on_after(1) as scope:
            await env.runtime.exec_sync(
                "cancel", ["sh", "-c", "sleep 1000 & sleep 1000"], timeout=None
            )
        assert scope.cancelled_caught
        assert not leftovers(env, c)


async def test_exec_sync_needs_running_container(env: Env) -> None:
    with trio.fail_after(30):
        await env.create("created", "exec sleep 1000")
        with pytest.raises(FailedPrecondition):
            await env.runtime.exec_sync("created", ["true"], timeout=5)
        with pytest.raises(NotFound):
            await env.runtime.exec_sync("nosuch", ["true"], timeout=5)
        with pytest.raises(InvalidArgument):
            await env.runtime.exec_sync("created", [], timeout=5)


# --------------------------------------------------------------------------
# Monitor: daemon restart, log reopen, resize
# --------------------------------------------------------------------------

CREATE_IN_ANOTHER_PROCESS = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    import trio
    from pouch.container.runtime import Runtime, RuntimeHandler

    a = json.loads(sys.argv[1])
    handler = RuntimeHandler(name=a["name"], binary=Path(a["binary"]), root=Path(a["root"]))

    async def main():
        runtime = Runtime(handler, attach_socket_dir=Path(a["attach"]))
        pid = await runtime.create(
            "survivor", Path(a["bundle"]), log_path=Path(a["log"]), exit_dir=Path(a["exits"]),
            persist_dir=Path(a["persist"]), stdin=False, tty=False,
        )
        await runtime.start("survivor")
        print(pid)

    trio.run(main)
    """
)


async def test_conmon_survives_daemon_restart(env: Env) -> None:
    """A container created by a daemon process that has since exited."""
    b = env.bundle("survivor", ["sh", "-c", f"echo up; {WAIT_FOR_GO}; echo down; exit 3"])
    persist = env.base / "persist" / "survivor"
    log = env.base / "logs" / "survivor.log"
    args = {
        "name": env.handler.name,
        "binary": str(env.handler.binary),
        "root": str(env.handler.root),
        "attach": str(env.attach_dir),
        "bundle": str(b.path),
        "log": str(log),
        "exits": str(env.exit_dir),
        "persist": str(persist),
    }
    with trio.fail_after(30):
        done = await trio.run_process(
            [sys.executable, "-c", CREATE_IN_ANOTHER_PROCESS, json.dumps(args)],
            cwd=REPO,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
        assert done.returncode == 0, done.stderr.decode()
        # Everything from here on is a new "daemon": new objects, files only.
        runtime = Runtime(env.handler, attach_socket_dir=env.attach_dir)
        monitor = mon.ContainerMonitor(exit_dir=env.exit_dir, attach_socket_dir=env.attach_dir)
        conmon_pid = mon.read_conmon_pid(persist)
        assert conmon_pid is not None
        assert mon.is_conmon_of(conmon_pid, "survivor")
        state = await runtime.state("survivor")
        assert state is not None
        assert state["status"] == "running"
        assert state["pid"] == int(done.stdout)
        async with trio.open_nursery() as nursery:

            async def go() -> None:
                await eventually(lambda: log_lines(log) == [b"up"])
                (b.rootfs / "go").touch()

            nursery.start_soon(go)
            assert await monitor.wait_exit("survivor", conmon_pid) == 3
        assert log_lines(log) == [b"up", b"down"]  # conmon kept the stdio
        # Later calls read the exit file; conmon is gone by now.
        await eventually(lambda: not mon.is_conmon_of(conmon_pid, "survivor"))
        assert await monitor.wait_exit("survivor", conmon_pid) == 3
        assert await monitor.wait_exit("survivor", None) == 3


async def test_wait_exit_polls_without_conmon_pid(env: Env) -> None:
    with trio.fail_after(30):
        c = await env.run("poll", f"{WAIT_FOR_GO}; exit 5")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: env.monitor.wait_exit("poll", None))
            await trio.sleep(0.2)
            (c.bundle.rootfs / "go").touch()
        assert await env.monitor.wait_exit("poll", None) == 5


async def test_wait_exit_when_conmon_dies_without_exit_file(env: Env) -> None:
    with trio.fail_after(30):
        c = await env.run("orphan", "exec sleep 1000")
        conmon_pid = mon.read_conmon_pid(c.persist_dir)
        assert conmon_pid is not None
        os.kill(conmon_pid, signal.SIGKILL)
        assert await env.monitor.wait_exit("orphan", conmon_pid) == mon.EXIT_CODE_UNKNOWN
        with pytest.raises(FailedPrecondition):  # Nobody reads the control FIFO.
            await env.monitor.reopen_log("orphan", bundle=c.bundle.path, log_path=c.log_path)
        # A stale pid (reused or gone) is recognised as not being this conmon.
        assert await env.monitor.wait_exit("orphan", os.getpid()) == mon.EXIT_CODE_UNKNOWN


async def test_reopen_log_loses_no_lines(env: Env) -> None:
    script = "i=0; while :; do echo line$i; i=$((i+1)); sleep 0.002; done"
    with trio.fail_after(30):
        c = await env.run("rot", script)
        await eventually(lambda: len(log_lines(c.log_path)) >= 50)
        rotated = c.log_path.with_name("rot.log.1")
        c.log_path.rename(rotated)
        await env.monitor.reopen_log("rot", bundle=c.bundle.path, log_path=c.log_path)
        assert c.log_path.exists()
        await eventually(lambda: len(log_lines(c.log_path)) >= 50)
        await env.runtime.kill("rot", signal.SIGKILL)
        assert await env.wait_exit(c) == 137
    assert log_lines(rotated)
    assert log_lines(c.log_path)
    numbers = [int(line.removeprefix(b"line")) for line in log_lines(rotated, c.log_path)]
    assert numbers == list(range(len(numbers)))
    # Once the container is gone, there is no conmon to ask.
    with pytest.raises(FailedPrecondition):
        await env.monitor.reopen_log("rot", bundle=c.bundle.path, log_path=c.log_path)


async def test_resize_terminal(env: Env) -> None:
    with trio.fail_after(30):
        c = await env.run("tty", "while :; do stty size; sleep 0.05; done", tty=True)
        await eventually(lambda: bool(log_lines(c.log_path)))
        await env.monitor.resize("tty", bundle=c.bundle.path, height=40, width=100)
        await eventually(lambda: b"40 100\r" in log_lines(c.log_path)[-3:])
        with pytest.raises(InvalidArgument):
            await env.monitor.resize("tty", bundle=c.bundle.path, height=0, width=100)


def test_attach_socket_path_matches_conmon_truncation() -> None:
    socket_dir = Path("/r")
    assert mon.attach_socket_path(socket_dir, "abc") == Path("/r/abc/attach")
    long_id = "x" * (107 - len("/r/"))
    assert str(mon.attach_socket_path(socket_dir, long_id).parent) == "/r/" + long_id[:-1]


def test_crun_wrapper_leaves_host_mounts_alone(tmp_path: Path) -> None:
    before = Path("/proc/self/mountinfo").read_text()
    binary = tb.crun_binary(tmp_path)
    subprocess.run([str(binary), "--version"], check=True, capture_output=True, timeout=30)
    assert Path("/proc/self/mountinfo").read_text() == before
