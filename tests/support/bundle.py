"""OCI bundles for runtime tests: a static-busybox root file system and a small spec.

- `make_bundle` writes ``<dir>/config.json`` (``runc spec``'s output, adjusted) and
  ``<dir>/rootfs`` (``/bin/busybox`` plus applet symlinks, ``/tmp``).
- `CgroupParent` owns a test-specific cgroup parent in every mounted hierarchy, finds
  the processes in it, and removes it with everything below.
- `crun_binary` gives crun, or on a hybrid cgroup host where crun 1.8 refuses to run a
  wrapper that hides the cgroup2 mount from it (see its docstring).
- `cleanup_runtime` deletes every container in a runtime root and kills what is left
  of the processes a test started.

Only Debian packages are used: busybox-static, runc, crun, conmon.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator, Sequence

# Debian packages the runtime tests need; missing ones are setup failures, not skips.
APT_PACKAGES = ("runc", "crun", "conmon", "busybox-static")

BUSYBOX = Path("/bin/busybox")
RUNC = Path("/usr/sbin/runc")
CRUN = Path("/usr/bin/crun")
APPLETS = (
    "sh", "cat", "echo", "sleep", "head", "tr", "yes", "seq", "true", "false", "env",
    "pwd", "ps", "kill", "stty", "ls", "touch", "test", "[", "dd", "wc",
)  # fmt: skip
PATH_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
CGROUP_ROOT = Path("/sys/fs/cgroup")


@functools.cache
def _spec_template() -> str:
    """``runc spec``'s default config.json (the runtime-spec example)."""
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([str(RUNC), "spec"], cwd=tmp, check=True, timeout=30)
        return Path(tmp, "config.json").read_text()


@dataclass
class Bundle:
    path: Path
    config: dict[str, Any]

    @property
    def rootfs(self) -> Path:
        return self.path / "rootfs"

    def write(self) -> None:
        (self.path / "config.json").write_text(json.dumps(self.config, indent=1))


def make_rootfs(rootfs: Path) -> None:
    """A root file system of static busybox and its applets."""
    (rootfs / "bin").mkdir(parents=True)
    shutil.copy2(BUSYBOX, rootfs / "bin" / "busybox")
    for applet in APPLETS:
        (rootfs / "bin" / applet).symlink_to("busybox")
    for d in ("tmp", "proc", "sys", "dev", "etc"):
        (rootfs / d).mkdir(exist_ok=True)
    (rootfs / "tmp").chmod(0o1777)
    (rootfs / "etc" / "passwd").write_text("root:x:0:0:root:/:/bin/sh\n")


def make_bundle(
    path: Path,
    args: Sequence[str],
    *,
    cgroups_path: str | None = None,
    terminal: bool = False,
    pid_namespace: bool = True,
    env: Iterable[str] = (),
    cwd: str = "/",
) -> Bundle:
    """Write a bundle running ``args`` as root in a busybox root file system.

    Based on ``runc spec``: fresh pid, network, ipc, uts and mount namespaces, the
    spec's default capabilities, masked paths and device rules; no ``oomScoreAdj``
    (this host's bounding set lacks CAP_SYS_RESOURCE, so it could not lower it).
    ``pid_namespace=False`` shares the host's, so that the process is not a pid-1
    that ignores unhandled signals.
    """
    path.mkdir(parents=True)
    make_rootfs(path / "rootfs")
    config = copy.deepcopy(json.loads(_spec_template()))
    process = config["process"]
    process["terminal"] = terminal
    process["args"] = list(args)
    process["env"] = [PATH_ENV, "TERM=xterm", *env]
    process["cwd"] = cwd
    config["root"] = {"path": "rootfs", "readonly": False}
    config["hostname"] = "pouch-test"
    linux = config["linux"]
    if cgroups_path is not None:
        linux["cgroupsPath"] = cgroups_path
    if not pid_namespace:
        linux["namespaces"] = [ns for ns in linux["namespaces"] if ns["type"] != "pid"]
    bundle = Bundle(path, config)
    bundle.write()
    return bundle


# --------------------------------------------------------------------------
# cgroups
# --------------------------------------------------------------------------


def cgroup_mounts() -> list[Path]:
    """Mount points of every cgroup (v1) and cgroup2 hierarchy."""
    mounts = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        if right.split()[0] in ("cgroup", "cgroup2"):
            mounts.append(Path(left.split()[4]))
    return mounts


class CgroupParent:
    """A cgroup parent for one test, ``/pouch-test-<random>``, in every hierarchy."""

    def __init__(self) -> None:
        self.name = f"pouch-test-{uuid.uuid4().hex[:12]}"

    def path_for(self, container_id: str) -> str:
        """The ``linux.cgroupsPath`` for a container (cgroupfs driver)."""
        return f"/{self.name}/{container_id}"

    def dirs(self) -> list[Path]:
        return [m / self.name for m in cgroup_mounts() if (m / self.name).is_dir()]

    def procs(self, container_id: str | None = None) -> set[int]:
        """Pids in the container's cgroup (or anywhere below the parent), any hierarchy."""
        pids: set[int] = set()
        for top in self.dirs():
            base = top / container_id if container_id else top
            for procs in base.rglob("cgroup.procs") if base.is_dir() else ():
                with contextlib.suppress(OSError):
                    pids.update(int(p) for p in procs.read_text().split())
        return pids

    def cleanup(self, timeout: float = 10.0) -> None:
        """Kill whatever is left in the parent, then remove it, deepest first."""
        deadline = time.monotonic() + timeout
        while (pids := self.procs()) and time.monotonic() < deadline:
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.05)
        for top in self.dirs():
            for d in sorted((p for p in top.rglob("*") if p.is_dir()), key=_depth, reverse=True):
                _rmdir_retry(d, deadline)
            _rmdir_retry(top, deadline)


def _depth(p: Path) -> int:
    return len(p.parts)


def _rmdir_retry(d: Path, deadline: float) -> None:
    while True:
        try:
            d.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:  # EBUSY until the last zombie is reaped.
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


# --------------------------------------------------------------------------
# Processes
# --------------------------------------------------------------------------


def proc_state(pid: int) -> str | None:
    """The one-letter state of a process ("R", "S", "Z"...), ``None`` if gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_bytes()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return raw[raw.rindex(b")") + 2 :].split()[0].decode()


def live(pids: Iterable[int]) -> set[int]:
    """The pids that still run (zombies excluded)."""
    return {p for p in pids if proc_state(p) not in (None, "Z", "X")}


def pid_namespace_members(pid: int) -> set[int]:
    """Every live process in ``pid``'s pid namespace, as seen from the host."""
    ns = os.readlink(f"/proc/{pid}/ns/pid")
    members = set()
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{entry.name}/ns/pid") == ns:
                    members.add(int(entry.name))
    return live(members)


def processes_mentioning(text: str) -> set[int]:
    """Live processes whose command line contains ``text`` (e.g. a test's temp dir)."""
    needle = text.encode()
    found = set()
    for entry in os.scandir("/proc"):
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            with contextlib.suppress(OSError):
                if needle in Path(f"/proc/{entry.name}/cmdline").read_bytes():
                    found.add(int(entry.name))
    return live(found)


# --------------------------------------------------------------------------
# Runtimes
# --------------------------------------------------------------------------


def _hybrid_with_v2_controllers() -> bool:
    unified = CGROUP_ROOT / "unified" / "cgroup.controllers"
    try:
        return bool(unified.read_text().strip())
    except FileNotFoundError:
        return False


def crun_binary(workdir: Path) -> Path:
    """crun, wrapped if this host's cgroup layout makes crun 1.8 refuse to run.

    On a hybrid host (v1 hierarchies plus cgroup2 at ``/sys/fs/cgroup/unified``)
    crun 1.8.1 fails every create with "cgroups in hybrid mode not supported, drop
    all controllers from cgroupv2" as soon as the cgroup2 side has any controller
    (libcrun/cgroup.c, ``libcrun_cgroup_enter``); here ``hugetlb`` is not mounted
    as v1 and so sits on cgroup2.  The wrapper runs crun in a private mount
    namespace with ``/sys/fs/cgroup/unified`` unmounted: crun then sees a plain
    cgroup v1 host.  The host's mounts are not touched.  (runc copes as is.)
    """
    if not _hybrid_with_v2_controllers():
        return CRUN
    wrapper = workdir / "crun-v1"
    wrapper.write_text(
        "#!/bin/sh\n"
        "# crun 1.8 refuses hybrid cgroups with controllers on cgroup2: hide it.\n"
        "exec unshare --mount --propagation private sh -c "
        f'\'umount {CGROUP_ROOT}/unified && exec "$0" "$@"\' {CRUN} "$@"\n'
    )
    wrapper.chmod(0o755)
    return wrapper


def runtime_containers(binary: Path, root: Path) -> list[str]:
    out = subprocess.run(
        [str(binary), "--root", str(root), "list", "--format", "json"],
        capture_output=True,
        timeout=30,
        check=False,
    ).stdout
    try:
        return [c["id"] for c in json.loads(out or b"null") or []]
    except ValueError:
        return []


def cleanup_runtime(binary: Path, root: Path, workdir: Path, cgroups: CgroupParent) -> None:
    """Undo everything a runtime test may have left: containers, conmons, cgroups.

    The processes killed here are ours: the containers in this test's cgroup parent,
    and the processes whose command line names this test's private directory
    (conmon, runc).
    """
    for container_id in runtime_containers(binary, root):
        subprocess.run(
            [str(binary), "--root", str(root), "delete", "--force", container_id],
            capture_output=True,
            timeout=30,
            check=False,
        )
    deadline = time.monotonic() + 10
    while (left := processes_mentioning(str(workdir))) and time.monotonic() < deadline:
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.05)
    cgroups.cleanup()


@contextlib.contextmanager
def private_dir(prefix: str) -> Iterator[Path]:
    """A short directory under /tmp (socket paths must fit in 108 bytes)."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
