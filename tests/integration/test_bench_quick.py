"""The benchmark harness keeps working: ``scripts/nox -s bench -- --quick`` runs clean.

CI checks that it runs, not how fast: pouchd and containerd side by side in
one local world, every workload once in its quick form, nothing left behind.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.root, pytest.mark.timeout(400)]

REPO = Path(__file__).parents[2]


def test_quick_benchmark_runs_clean(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.all", "--quick", "--json", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=380,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    doc = json.loads(out.read_text())
    assert doc["failures"] == []
    assert doc["leftovers"] == []
