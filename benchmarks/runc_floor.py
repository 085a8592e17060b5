"""The floor under container create/start/stop/remove: runc driven directly, no runtime.

    sudo python -m benchmarks.runc_floor -n 100          # alone, in a private directory
    from benchmarks.runc_floor import RuncFloor             # inside another benchmark

What a CRI runtime pays at least for a container is what runc itself takes to
create, start, stop and delete it; pouchd (through conmon) and containerd
(through its shim) add their own work on top.  This module measures that
floor on the same machine, with the same runc binary, in the same run as the
runtimes when :mod:`benchmarks.all` interleaves it with their workloads.

**The bundle** is the smallest one that still looks like a container of a
host-network pod: Debian's static busybox and its applet links as the root
file system (a plain directory, no overlay mount), ``runc spec``'s defaults
(capabilities, masked and read-only paths, device rules, no seccomp profile:
CRI leaves seccomp unconfined unless the pod asks), ``process.args`` =
``sleep 100000``, no terminal, and the namespaces trimmed as in such a pod's
container: new mount, PID and IPC namespaces, the host's network and UTS
namespaces (so no hostname).  ``linux.cgroupsPath`` puts every container in a
cgroup of its own below the caller's cgroup parent (cgroupfs driver, every v1
hierarchy: runc creates and removes those cgroups as it does for the runtimes).

**One cycle**, each step timed on its own around the blocking ``runc`` call
(fork, exec and wait included, as conmon and the shim pay them too):

1. ``runc --root R create --bundle B --pid-file P ID``: returns when the
   container's init waits on runc's exec FIFO (state "created");
2. ``runc start ID``: releases it to exec ``sleep``;
3. ``runc kill ID KILL`` and wait until the init is reaped (the worker is a
   child subreaper, as conmon and the shim are): the stop;
4. ``runc delete ID``: state directory and cgroups removed.

``exec_true`` times ``runc exec ID true`` (stdout and stderr through pipes) in
a container started once for it: the floor of ``ExecSync``.

The runc commands run in a worker process (``multiprocessing`` spawn) that is
``PR_SET_CHILD_SUBREAPER``, so that container processes are reaped there, and
that holds no gRPC channel or registry thread of the benchmark.  Everything
lives under the directory given (bundles, runc root, a log of runc's stderr);
:meth:`RuncFloor.close` deletes every container in the runc root.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Self

from benchmarks import _common as common

if TYPE_CHECKING:
    from collections.abc import Sequence
    from types import TracebackType

RUNC: Final = Path("/usr/sbin/runc")
CONMON: Final = Path("/usr/bin/conmon")
PR_SET_CHILD_SUBREAPER: Final = 36
COMMAND_TIMEOUT: Final = 60.0

CREATE: Final = "runc create"
START: Final = "runc start"
STOP: Final = "runc kill KILL + reap"
DELETE: Final = "runc delete"
CREATE_START: Final = "runc create+start"
CYCLE: Final = "runc create+start+kill+delete"
EXEC: Final = "runc exec true"
#: Every step of :meth:`RuncFloor.cycle`, and the sums, in display order.
CYCLE_STEPS: Final = (CREATE, START, STOP, DELETE)
CYCLE_ROWS: Final = (CREATE, START, CREATE_START, STOP, DELETE, CYCLE)
# The same cycle with conmon in between, started the way pouchd starts it.
CONMON_CREATE: Final = "conmon + runc create"
CONMON_START: Final = "runc start (under conmon)"
CONMON_STOP: Final = "runc kill KILL + conmon exit"
CONMON_DELETE: Final = "runc delete (after conmon)"
CONMON_CREATE_START: Final = "conmon + runc create+start"
CONMON_CYCLE: Final = "conmon + runc create+start+kill+delete"
CONMON_STEPS: Final = (CONMON_CREATE, CONMON_START, CONMON_STOP, CONMON_DELETE)
CONMON_ROWS: Final = (
    CONMON_CREATE,
    CONMON_START,
    CONMON_CREATE_START,
    CONMON_STOP,
    CONMON_DELETE,
    CONMON_CYCLE,
)


class FloorError(RuntimeError):
    """A runc command failed; the message has its stderr."""


# ---------------------------------------------------------------------------
# The worker process


class _Worker:
    """State of the worker: bundles, runc root, counters."""

    def __init__(self, base: Path, cgroup_parent: str, binary: str, conmon: str) -> None:
        self.base = base
        self.cgroup_parent = cgroup_parent.rstrip("/")
        self.binary = binary
        self.conmon = conmon
        self.root = base / "runc"
        self.log = base / "runc-stderr.log"
        self.seq = 0
        self.exec_id: str | None = None
        self.pids: dict[str, int] = {}
        self.root.mkdir(parents=True, exist_ok=True)
        self.cycle_bundle = self._bundle("bundle-cycle", "cycle")
        self.exec_bundle = self._bundle("bundle-exec", "exec")
        self.conmon_bundle = self._bundle("bundle-conmon", "conmon")
        for d in ("exits", "sockets", "logs"):
            (base / d).mkdir(exist_ok=True)

    def _bundle(self, name: str, cgroup: str) -> Path:
        from tests.support.bundle import make_bundle

        path = self.base / name
        bundle = make_bundle(path, ["sleep", "100000"])
        config = bundle.config
        linux = config["linux"]
        # A host-network pod's container: the node's network and UTS namespaces.
        linux["namespaces"] = [
            ns for ns in linux["namespaces"] if ns["type"] in ("pid", "ipc", "mount")
        ]
        config.pop("hostname", None)
        linux["cgroupsPath"] = f"{self.cgroup_parent}/{cgroup}"
        bundle.write()
        return path

    def _argv(self, *args: str) -> list[str]:
        return [self.binary, "--root", str(self.root), *args]

    def _run(self, *args: str, capture: bool = False) -> int:
        """Run runc; the ns it took.  Raises FloorError with runc's stderr on failure."""
        argv = self._argv(*args)
        with self.log.open("ab") as log:
            start = log.tell()
            # The container inherits create's stdio: no pipe we would wait on.
            proc = _call(
                argv,
                stdout=subprocess.PIPE if capture else subprocess.DEVNULL,
                stderr=subprocess.PIPE if capture else log,
            )
        elapsed = proc.elapsed_ns
        if proc.returncode != 0:
            if capture:
                why = proc.stderr.decode(errors="replace")
            else:
                with self.log.open("rb") as f:
                    f.seek(start)
                    why = f.read().decode(errors="replace")
            raise FloorError(f"{' '.join(argv)}: exit {proc.returncode}: {why.strip()[-2000:]}")
        return elapsed

    def _create(self, cid: str, bundle: Path) -> int:
        pidfile = self.base / f"{cid}.pid"
        elapsed = self._run("create", "--bundle", str(bundle), "--pid-file", str(pidfile), cid)
        self.pids[cid] = int(pidfile.read_text())
        pidfile.unlink()
        return elapsed

    def _kill_and_reap(self, cid: str) -> int:
        t0 = time.perf_counter_ns()
        self._run("kill", cid, "KILL")
        pid = self.pids.pop(cid)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)  # ours: runc create exited and left its init to us
        return time.perf_counter_ns() - t0

    def cycle(self) -> dict[str, int]:
        self.seq += 1
        cid = f"floor-{os.getpid()}-{self.seq}"
        out: dict[str, int] = {}
        try:
            out[CREATE] = self._create(cid, self.cycle_bundle)
            out[START] = self._run("start", cid)
            out[STOP] = self._kill_and_reap(cid)
            out[DELETE] = self._run("delete", cid)
        except BaseException:
            self._force_delete(cid)
            raise
        return out

    def conmon_cycle(self) -> dict[str, int]:
        """The cycle with ``runc create`` run by conmon, with pouchd's conmon options."""
        self.seq += 1
        cid = f"floor-conmon-{os.getpid()}-{self.seq}"
        bundle = self.conmon_bundle
        persist = self.base / "persist" / cid
        persist.mkdir(parents=True)
        argv = [
            self.conmon,
            "--api-version",
            "--bundle", str(bundle),
            "--cid", cid,
            "--cuuid", cid,
            "--name", cid,
            "--runtime", self.binary,
            "--runtime-arg", f"--root={self.root}",
            "--log-path", f"k8s-file:{self.base / 'logs' / cid}.log",
            "--exit-dir", str(self.base / "exits"),
            "--persist-dir", str(persist),
            "--conmon-pidfile", str(persist / "conmon.pid"),
            "--container-pidfile", str(bundle / "pidfile"),
            "--socket-dir-path", str(self.base / "sockets"),
        ]  # fmt: skip
        out: dict[str, int] = {}
        conmon_pid = 0
        try:
            read_fd, write_fd = os.pipe()
            try:
                t0 = time.perf_counter_ns()
                try:
                    proc = _call(
                        argv,
                        stdout=subprocess.PIPE,
                        stderr=subprocess.PIPE,
                        cwd=bundle,
                        env={**os.environ, "_OCI_SYNCPIPE": str(write_fd)},
                        pass_fds=(write_fd,),
                    )
                finally:
                    os.close(write_fd)
                with os.fdopen(read_fd, "rb", closefd=False) as sync:
                    line = sync.readline()
                out[CONMON_CREATE] = time.perf_counter_ns() - t0
            finally:
                os.close(read_fd)
            conmon_pid = int((persist / "conmon.pid").read_text() or 0)
            message = json.loads(line or b"{}")
            pid = message.get("data", message.get("pid", -1))
            if proc.returncode != 0 or not isinstance(pid, int) or pid <= 0:
                why = message.get("message") or proc.stderr.decode(errors="replace")
                raise FloorError(f"conmon {cid}: exit {proc.returncode}: {why.strip()[-2000:]}")
            out[CONMON_START] = self._run("start", cid)
            t0 = time.perf_counter_ns()
            self._run("kill", cid, "KILL")
            with contextlib.suppress(ChildProcessError):
                os.waitpid(conmon_pid, 0)  # conmon reaps the container, writes its exit, exits
            out[CONMON_STOP] = time.perf_counter_ns() - t0
            conmon_pid = 0
            out[CONMON_DELETE] = self._run("delete", cid)
        except BaseException:
            if conmon_pid:
                with contextlib.suppress(OSError):
                    os.kill(conmon_pid, signal.SIGKILL)
                    os.waitpid(conmon_pid, 0)
            self._force_delete(cid)
            raise
        finally:
            shutil.rmtree(persist, ignore_errors=True)
            for leftover in (self.base / "exits" / cid, self.base / "logs" / f"{cid}.log"):
                with contextlib.suppress(OSError):
                    leftover.unlink()
        return out

    def exec_true(self) -> int:
        if self.exec_id is None:
            cid = f"floor-exec-{os.getpid()}"
            try:
                self._create(cid, self.exec_bundle)
                self._run("start", cid)
            except BaseException:
                self._force_delete(cid)
                raise
            self.exec_id = cid
        return self._run("exec", self.exec_id, "true", capture=True)

    def _force_delete(self, cid: str) -> None:
        with contextlib.suppress(FloorError, subprocess.SubprocessError, OSError):
            self._run("delete", "--force", cid)
        pid = self.pids.pop(cid, None)
        if pid is not None:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)

    def close(self) -> list[str]:
        """Delete every container of the runc root; returns the ids found."""
        self.exec_id = None
        found = []
        with contextlib.suppress(subprocess.SubprocessError, OSError, ValueError):
            listing = subprocess.run(
                self._argv("list", "--format", "json"),
                capture_output=True,
                timeout=COMMAND_TIMEOUT,
                check=False,
            ).stdout
            found = [c["id"] for c in json.loads(listing or b"null") or []]
        for cid in found:
            self._force_delete(cid)
        for pid in list(self.pids.values()):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        self.pids.clear()
        _reap_all()
        return found


@dataclass
class _Done:
    returncode: int
    stdout: bytes
    stderr: bytes
    elapsed_ns: int


def _call(argv: Sequence[str], *, stdout: Any, stderr: Any, **kwargs: Any) -> _Done:
    """Run ``argv`` to its end and time it exactly.

    Not ``subprocess.run(timeout=...)``: its wait polls with sleeps that
    double from 0.5 ms, which rounds every duration up to 7.5, 15.5, 31.5 or
    63.5 ms.  A plain ``communicate()`` blocks in ``waitpid`` (and ``select``
    for pipes); a timer kills a command that hangs.
    """
    t0 = time.perf_counter_ns()
    with subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr, **kwargs
    ) as proc:
        watchdog = threading.Timer(COMMAND_TIMEOUT, proc.kill)
        watchdog.start()
        try:
            out, err = proc.communicate()
        finally:
            watchdog.cancel()
    return _Done(proc.returncode, out or b"", err or b"", time.perf_counter_ns() - t0)


def _reap_all() -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


_worker: _Worker | None = None


def _worker_init() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_CHILD_SUBREAPER): {os.strerror(err)}")


def _worker_prepare(base: str, cgroup_parent: str, binary: str, conmon: str) -> str:
    global _worker
    _worker = _Worker(Path(base), cgroup_parent, binary, conmon)
    return subprocess.run(
        [binary, "--version"], capture_output=True, text=True, timeout=30, check=False
    ).stdout.splitlines()[0]


def _worker_cycle() -> dict[str, int]:
    assert _worker is not None
    return _worker.cycle()


def _worker_conmon_cycle() -> dict[str, int]:
    assert _worker is not None
    return _worker.conmon_cycle()


def _worker_exec() -> int:
    assert _worker is not None
    return _worker.exec_true()


def _worker_close() -> list[str]:
    return _worker.close() if _worker is not None else []


# ---------------------------------------------------------------------------
# The benchmark side


class RuncFloor:
    """runc driven directly, from a worker process; records every step's samples.

    Args:
        base: A directory of the caller's (created if missing) for the
            bundles, the runc root and runc's stderr log.
        cgroup_parent: cgroupfs parent of the containers, e.g. ``/<world tag>/runc-floor``.
        binary: The OCI runtime (runc; crun takes the same commands).
        conmon: The monitor, for :meth:`conmon_cycle`.
    """

    def __init__(
        self, base: Path, cgroup_parent: str, binary: Path = RUNC, conmon: Path = CONMON
    ) -> None:
        self.base = base
        self.cgroup_parent = cgroup_parent
        self.binary = binary
        self.conmon = conmon
        self.version = ""
        self.samples: dict[str, common.Samples] = {}
        self.failures: list[str] = []
        self._pool: ProcessPoolExecutor | None = None
        self.reset()

    def reset(self) -> None:
        self.samples = {name: common.Samples() for name in (*CYCLE_ROWS, *CONMON_ROWS, EXEC)}
        self.failures = []

    def __enter__(self) -> Self:
        self.base.mkdir(parents=True, exist_ok=True)
        self._pool = ProcessPoolExecutor(
            max_workers=1,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_worker_init,
        )
        try:
            self.version = self._pool.submit(
                _worker_prepare,
                str(self.base),
                self.cgroup_parent,
                str(self.binary),
                str(self.conmon),
            ).result()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> list[str]:
        """Delete the floor's containers and stop the worker; returns the ids deleted."""
        left: list[str] = []
        if self._pool is not None:
            with contextlib.suppress(Exception):
                left = self._pool.submit(_worker_close).result(timeout=120)
            self._pool.shutdown(wait=True)
            self._pool = None
        return left

    def cycle(self) -> dict[str, int]:
        """One create, start, kill+reap, delete; ns per step (also recorded)."""
        assert self._pool is not None
        steps = self._pool.submit(_worker_cycle).result()
        for name, ns in steps.items():
            self._add(name, ns)
        self._add(CREATE_START, steps[CREATE] + steps[START])
        self._add(CYCLE, sum(steps[name] for name in CYCLE_STEPS))
        return steps

    def conmon_cycle(self) -> dict[str, int]:
        """One cycle with conmon running ``runc create``; ns per step (also recorded)."""
        assert self._pool is not None
        steps = self._pool.submit(_worker_conmon_cycle).result()
        for name, ns in steps.items():
            self._add(name, ns)
        self._add(CONMON_CREATE_START, steps[CONMON_CREATE] + steps[CONMON_START])
        self._add(CONMON_CYCLE, sum(steps[name] for name in CONMON_STEPS))
        return steps

    def exec_true(self) -> int:
        """One ``runc exec ID true`` (also recorded)."""
        assert self._pool is not None
        ns = self._pool.submit(_worker_exec).result()
        self._add(EXEC, ns)
        return ns

    def _add(self, name: str, ns: int) -> None:
        samples = self.samples[name]
        samples.latencies_ns.append(ns)
        samples.wall_ns += ns

    def _fail(self, names: Sequence[str], exc: BaseException) -> common.Samples:
        kind = type(exc).__name__
        for name in names:
            self.samples[name].errors[kind] += 1
        self.failures.append(str(exc))
        out = common.Samples()
        out.errors[kind] += 1
        return out

    def run_cycles(self, count: int) -> common.Samples:
        """``count`` cycles, as a workload of :func:`benchmarks._common.alternate`."""
        out = common.Samples()
        for _ in range(count):
            try:
                steps = self.cycle()
            except Exception as exc:  # counted, never fatal
                out.merge(self._fail(CYCLE_ROWS, exc))
            else:
                total = sum(steps[name] for name in CYCLE_STEPS)
                out.latencies_ns.append(total)
                out.wall_ns += total
        return out

    def run_conmon_cycles(self, count: int) -> common.Samples:
        """``count`` cycles under conmon, as a workload of :func:`common.alternate`."""
        out = common.Samples()
        for _ in range(count):
            try:
                steps = self.conmon_cycle()
            except Exception as exc:  # counted, never fatal
                out.merge(self._fail(CONMON_ROWS, exc))
            else:
                total = sum(steps[name] for name in CONMON_STEPS)
                out.latencies_ns.append(total)
                out.wall_ns += total
        return out

    def run_execs(self, count: int) -> common.Samples:
        """``count`` execs of ``true``, as a workload of :func:`benchmarks._common.alternate`."""
        out = common.Samples()
        for _ in range(count):
            try:
                ns = self.exec_true()
            except Exception as exc:  # counted, never fatal
                out.merge(self._fail((EXEC,), exc))
            else:
                out.latencies_ns.append(ns)
                out.wall_ns += ns
        return out


# ---------------------------------------------------------------------------
# Standalone


def main(argv: Sequence[str] | None = None) -> int:
    from rich.console import Console

    from benchmarks import _world as world_mod

    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.runc_floor",
        description="Time runc create, start, kill, delete and exec of a busybox bundle "
        "directly: the floor under any CRI runtime's container lifecycle (needs root).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("-n", "--iterations", type=int, default=100, help="measured cycles")
    parser.add_argument("--warmup", type=int, default=5, help="discarded cycles first")
    parser.add_argument("--binary", type=Path, default=RUNC, help="the OCI runtime")
    parser.add_argument("--json", metavar="PATH", help="write a JSON report here ('-': stdout)")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        parser.error("runc needs root")
    out = Console(stderr=args.json == "-")
    if not out.is_terminal:
        out.width = 160
    started = common.now()
    base = Path(tempfile.mkdtemp(prefix="pouch-floor-", dir="/tmp"))
    tag = base.name
    try:
        with RuncFloor(base, f"/{tag}", args.binary) as floor:
            workloads = {
                "cycle": floor.run_cycles,
                "conmon": floor.run_conmon_cycles,
                "exec": floor.run_execs,
            }
            if args.warmup:
                common.alternate(workloads, n=args.warmup, block=5)
            floor.reset()
            common.alternate(workloads, n=args.iterations, block=5)
            version = floor.version
            stats = {
                (name, str(args.binary)): common.Stats.from_samples(s)
                for name, s in floor.samples.items()
            }
            failures = list(floor.failures)
    finally:
        world_mod.remove_cgroups(tag)
        shutil.rmtree(base, ignore_errors=True)
    out.print(
        common.latency_table(
            f"runc floor ({version})",
            stats,
            case_header="step",
            target_header="runtime",
            caption=f"{args.iterations} cycles after {args.warmup} warm-up; bundle: busybox, "
            "new mount/PID/IPC namespaces, host network and UTS.",
        )
    )
    for message in dict.fromkeys(failures):
        out.print(f"[bold red]error:[/] {message}")
    left = world_mod.cgroup_dirs(tag) + ([base] if base.exists() else [])
    if left:
        out.print(f"[bold red]left on the host:[/] {left}")
    if args.json:
        document = common.build_report(
            "runc_floor",
            params={"iterations": args.iterations, "warmup": args.warmup, "version": version},
            targets=[{"label": str(args.binary), "version": version}],
            results=[
                {"case": case, "target": target, "stats": s.to_json()}
                for (case, target), s in stats.items()
            ],
            started=started,
        )
        common.write_report(args.json, document)
    return 1 if failures or left else 0


if __name__ == "__main__":
    sys.exit(main())
