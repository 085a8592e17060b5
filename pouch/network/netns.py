"""Pinned network namespaces under /run/netns, made without forking.

pyroute2's ``netns.create`` and ``NetNS`` fork helper processes.  Forking a
multi-threaded daemon is unsafe: a lock another thread held at the fork
stays locked forever in the child, and the benchmarks caught exactly that
(a RunPodSandbox that never returned under 20 concurrent pod starts).  So a
namespace is made the way ``ip netns add`` makes one, but in a thread: a
new thread ``unshare``s its own network namespace, bind-mounts it onto the
pin file, brings ``lo`` up through a pyroute2 ``IPRoute`` netlink socket
opened in that namespace, and exits.  Work inside an existing namespace
(`run_in`) also happens in a throwaway thread that ``setns``es into it, so
no reused worker thread is ever left in a pod's namespace.

Every function here blocks; the daemon calls them through
``trio.to_thread.run_sync`` (or the async wrappers below).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Final, TypeVar

import outcome
import trio
from pyroute2 import IPRoute

from pouch._util import mount as mounts
from pouch.errors import FailedPrecondition, RuntimeFailed

if TYPE_CHECKING:
    from collections.abc import Callable

T = TypeVar("T")

NETNS_DIR: Final = Path("/run/netns")
PREFIX: Final = "pouch-"
# <sched.h>; os.unshare and os.setns arrive with Python 3.12.
CLONE_NEWNET: Final = 0x40000000
MS_BIND: Final = 4096

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def _check(rc: int, what: str) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def name_for(sandbox_id: str) -> str:
    return f"{PREFIX}{sandbox_id[:16]}"


def path_of(name: str) -> Path:
    return NETNS_DIR / name


def in_new_thread(fn: Callable[[], T], name: str = "pouch-netns") -> T:
    """Run *fn* in a thread that exits afterwards (namespace changes die with it)."""
    result: list[outcome.Outcome[T]] = []
    thread = threading.Thread(
        target=lambda: result.append(outcome.capture(fn)), name=name, daemon=True
    )
    thread.start()
    thread.join()
    return result[0].unwrap()


def enter_netns(fd: int) -> None:
    """Move the calling thread (only) into the namespace open at *fd*."""
    _check(_libc.setns(fd, CLONE_NEWNET), "setns")


def run_in(netns_path: str | Path, fn: Callable[[], T]) -> T:
    """Run *fn* inside the namespace at *netns_path* (blocking, a fresh thread)."""

    def enter_and_run() -> T:
        try:
            fd = os.open(netns_path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise FailedPrecondition(f"network namespace {netns_path} is gone") from None
        try:
            enter_netns(fd)
        finally:
            os.close(fd)
        return fn()

    return in_new_thread(enter_and_run)


def _lo_up() -> None:
    with IPRoute() as ipr:
        (index,) = ipr.link_lookup(ifname="lo")
        ipr.link("set", index=index, state="up")


def _create_sync(name: str) -> Path:
    path = path_of(name)
    if mounts.is_mounted(path):
        # Made already (a retried create): just make sure lo is up.
        run_in(path, _lo_up)
        return path
    NETNS_DIR.mkdir(mode=0o755, parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        os.close(os.open(path, os.O_RDONLY | os.O_CREAT | os.O_EXCL, 0o444))

    def make() -> None:
        _check(_libc.unshare(CLONE_NEWNET), "unshare(CLONE_NEWNET)")
        source = f"/proc/self/task/{threading.get_native_id()}/ns/net"
        mounts.mount(source, path, "none", MS_BIND)
        _lo_up()

    try:
        in_new_thread(make)
    except OSError as exc:
        with contextlib.suppress(OSError):
            mounts.unmount(path)
            os.unlink(path)
        raise RuntimeFailed(["netns", "create", name], exc.errno or 1, str(exc)) from exc
    return path


def _remove_sync(name: str) -> None:
    path = path_of(name)
    try:
        mounts.unmount(path)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOENT):
            raise
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


async def create(name: str) -> Path:
    """Create (or reuse) the pinned namespace *name* with ``lo`` up; return its path."""
    return await trio.to_thread.run_sync(_create_sync, name)


async def remove(name: str) -> None:
    """Unmount and delete the namespace; idempotent."""
    await trio.to_thread.run_sync(_remove_sync, name)


def list_names() -> list[str]:
    """Our pinned namespaces (for leak checks)."""
    if not NETNS_DIR.is_dir():
        return []
    return sorted(p.name for p in NETNS_DIR.iterdir() if p.name.startswith(PREFIX))
