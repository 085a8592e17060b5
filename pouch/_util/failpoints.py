"""Test-only fault injection inside the core, as containerd's failpoints.

``POUCHD_FAILPOINTS="container.created=delay:30"`` makes the code that
passes ``await failpoint("container.created")`` sleep there, so a test can
kill the daemon at that exact point; ``=panic`` raises instead.  The same
variable names RPC-level points (``Status=delay:2``), handled at the edge.
Read once; empty in production.
"""

from __future__ import annotations

import functools
import os

import trio

ENV = "POUCHD_FAILPOINTS"


Point = tuple[str, float]


def parse(spec: str) -> dict[str, Point]:
    """Parse ``NAME=delay:SECONDS`` and ``NAME=panic`` items separated by ``;``."""
    points: dict[str, Point] = {}
    for item in filter(None, (part.strip() for part in spec.split(";"))):
        name, _, action = item.partition("=")
        kind, _, arg = action.partition(":")
        if kind == "delay":
            points[name] = ("delay", float(arg))
        elif kind == "panic":
            points[name] = ("panic", 0.0)
        else:
            raise ValueError(f"invalid failpoint {item!r}")
    return points


@functools.cache
def points() -> dict[str, Point]:
    return parse(os.environ.get(ENV, ""))


async def trigger(name: str, point: Point | None) -> None:
    if point is None:
        return
    kind, seconds = point
    if kind == "delay":
        await trio.sleep(seconds)
    else:
        raise RuntimeError(f"failpoint {name}: injected panic")


async def failpoint(name: str) -> None:
    """Pause or fail here when the environment asks for it."""
    await trigger(name, points().get(name))
