"""Pinned network namespaces under /run/netns, through pyroute2.

pyroute2's synchronous API runs a private asyncio loop, which fails on the
Trio thread once trio_asyncio is loaded: every call here is blocking and is
made through ``trio.to_thread.run_sync``.
"""

from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path
from typing import Final

import trio
from pyroute2 import NetNS, netns

from pouch.errors import RuntimeFailed

NETNS_DIR: Final = Path("/run/netns")
PREFIX: Final = "pouch-"


def name_for(sandbox_id: str) -> str:
    return f"{PREFIX}{sandbox_id[:16]}"


def path_of(name: str) -> Path:
    return NETNS_DIR / name


def _create_sync(name: str) -> Path:
    path = path_of(name)
    if not path.exists():
        try:
            netns.create(name)
        except OSError as exc:
            raise RuntimeFailed(["netns", "create", name], exc.errno or 1, str(exc)) from exc
    # A fresh namespace has lo down; pods expect 127.0.0.1 to work.
    with NetNS(name) as ns:
        (index,) = ns.link_lookup(ifname="lo")
        ns.link("set", index=index, state="up")
    return path


def _remove_sync(name: str) -> None:
    path = path_of(name)
    if not path.exists():
        return
    try:
        netns.remove(name)
    except OSError as exc:
        if exc.errno not in (errno.ENOENT, errno.EINVAL):
            raise
    # pyroute2 unmounts then unlinks; make sure nothing is left either way.
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


async def create(name: str) -> Path:
    """Create (or reuse) the pinned namespace *name* with ``lo`` up; return its path."""
    return await trio.to_thread.run_sync(_create_sync, name)


async def remove(name: str) -> None:
    """Unmount and delete the namespace; idempotent."""
    await trio.to_thread.run_sync(_remove_sync, name)


def list_names() -> list[str]:
    """Our pinned namespaces (for the leak check and start-up sweep)."""
    if not NETNS_DIR.is_dir():
        return []
    return sorted(p.name for p in NETNS_DIR.iterdir() if p.name.startswith(PREFIX))
