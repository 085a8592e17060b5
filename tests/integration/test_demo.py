"""The newcomer's tour (``scripts/nox -s demo``) runs from start to end."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.root, pytest.mark.timeout(300)]

DEMO = Path(__file__).parents[2] / "scripts" / "demo.py"


def test_demo_tour_passes():
    proc = subprocess.run(
        [sys.executable, str(DEMO)], capture_output=True, text=True, timeout=280, check=False
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    out = proc.stdout
    for expected in (
        "pouchd is ready",
        "hello from pouch",
        "hello from the shell container",
        "tour complete",
    ):
        assert expected in out
