"""The ``pouch`` command line against a real pouchd and a real registry.

Each test runs the installed ``pouch`` console script as a subprocess, as a
user would, against a private pouchd configured to pull from a loopback
docker-registry over plain HTTP.
"""

from __future__ import annotations

import errno
import os
import pty
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from pouch.cli import human_size, short_id
from tests.support import images as timg
from tests.support.registry import Registry, push

if TYPE_CHECKING:
    from collections.abc import Iterator

    from tests.integration.conftest import Daemon

pytestmark = [pytest.mark.integration, pytest.mark.root, pytest.mark.timeout(120)]

POUCH = Path(sys.prefix) / "bin" / "pouch"
RUN_TIMEOUT = 60.0


@pytest.fixture(scope="module")
def registry() -> Iterator[Registry]:
    with Registry() as r:
        yield r


@pytest.fixture
def pd(make_daemon: type[Daemon], registry: Registry) -> Daemon:
    return make_daemon(config=f'[registry]\ninsecure = ["{registry.host}"]\n').start()


def pouch(daemon: Daemon, *args: str) -> subprocess.CompletedProcess[str]:
    if not POUCH.exists():
        pytest.fail(f"{POUCH} is missing: pip install -e . (the project's console scripts)")
    return subprocess.run(
        [str(POUCH), "--socket", str(daemon.socket), *args],
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        check=False,
    )


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result.stdout


def pushed(registry: Registry, repo: str, image: timg.Image) -> str:
    push(registry, repo, "latest", image)
    return registry.ref(repo, "latest")


def test_pull_shows_progress_and_prints_the_id(pd, registry):
    image = timg.multilayer_image()
    ref = pushed(registry, "cli/multi", image)
    result = pouch(pd, "pull", ref)
    # Only the id on stdout, so that id=$(pouch pull x) works.
    assert ok(result) == f"{image.config.digest}\n"
    lines = result.stderr.splitlines()
    assert lines[0] == f"Pulling {ref}"
    for layer in image.layers:
        done = f"{short_id(layer.blob.digest)}: Pull complete ({human_size(layer.blob.size)})"
        assert done in lines, result.stderr
    # Pulled again, every layer is there already and nothing is fetched.
    registry.clear_requests()
    again = pouch(pd, "pull", ref)
    assert ok(again) == f"{image.config.digest}\n"
    for layer in image.layers:
        assert f"{short_id(layer.blob.digest)}: Already exists" in again.stderr
        assert registry.blob_fetches(layer.blob.digest) == 0


def _run_on_a_terminal(argv: list[str]) -> tuple[int, str, str]:
    """Run *argv* with stderr on a pseudo-terminal; return (status, stdout, terminal)."""
    master, slave = pty.openpty()
    env = {**os.environ, "TERM": "xterm-256color", "COLUMNS": "120"}
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=slave, env=env) as proc:
        os.close(slave)
        chunks = []
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError as exc:  # EIO: the last writer closed the terminal
                if exc.errno != errno.EIO:
                    raise
                break
            if not chunk:
                break
            chunks.append(chunk)
        os.close(master)
        assert proc.stdout is not None
        stdout = proc.stdout.read().decode()
        status = proc.wait(RUN_TIMEOUT)
    return status, stdout, b"".join(chunks).decode(errors="replace")


def test_pull_draws_progress_bars_on_a_terminal(pd, registry):
    image = timg.busybox_image()
    ref = pushed(registry, "cli/bars", image)
    status, stdout, terminal = _run_on_a_terminal(
        [str(POUCH), "--socket", str(pd.socket), "pull", ref]
    )
    assert status == 0, terminal
    assert stdout == f"{image.config.digest}\n"
    (layer,) = image.layers
    final = terminal[terminal.rindex(short_id(layer.blob.digest)) :]
    assert "━" in final  # a bar, redrawn in place
    assert "Pull complete" in final


def test_images_lists_the_pulled_image(pd, registry):
    image = timg.busybox_image()
    ref = pushed(registry, "cli/busybox", image)
    ok(pouch(pd, "pull", ref))
    lines = ok(pouch(pd, "images")).splitlines()
    assert lines[0].split() == ["IMAGE", "TAG", "IMAGE", "ID", "SIZE"]
    size = image.config.size + sum(layer.blob.size for layer in image.layers)
    repo = f"{registry.host}/cli/busybox"
    assert lines[1].split() == [repo, "latest", short_id(image.config.digest), human_size(size)]
    assert len(lines) == 2
    assert ok(pouch(pd, "images", "-q")) == f"{image.config.digest}\n"


def test_rmi_removes_and_fails_on_an_unknown_name(pd, registry):
    image = timg.busybox_image()
    ref = pushed(registry, "cli/rmi", image)
    ok(pouch(pd, "pull", ref))
    out = ok(pouch(pd, "rmi", ref)).splitlines()
    assert f"Untagged: {ref}" in out
    assert out[-1] == f"Deleted: {image.config.digest}"
    assert ok(pouch(pd, "images", "-q")) == ""
    again = pouch(pd, "rmi", ref)
    assert again.returncode == 1
    assert again.stderr == f"pouch: no such image: {ref}\n"


def test_load_an_oci_archive(pd, tmp_path):
    image = timg.busybox_image()
    layout = timg.write_oci_layout(tmp_path / "layout", {"example.com/cli/loaded:v1": image})
    archive = tmp_path / "images.tar"
    with tarfile.open(archive, "w") as tar:
        for member in sorted(layout.rglob("*")):
            tar.add(member, arcname=str(member.relative_to(layout)), recursive=False)
    result = pouch(pd, "load", str(archive))
    assert ok(result) == "Loaded image: example.com/cli/loaded:v1\n"
    assert ok(pouch(pd, "images", "-q")) == f"{image.config.digest}\n"


def test_version_prints_pouch(pd):
    out = ok(pouch(pd, "version")).splitlines()
    assert "RuntimeName:  pouch" in out
    assert "RuntimeApiVersion:  v1" in out


def test_errors_print_the_daemons_message_and_exit_1(pd, registry, tmp_path):
    missing = pouch(pd, "pull", registry.ref("cli/not-pushed", "v1"))
    assert missing.returncode == 1
    assert missing.stdout == ""
    last = missing.stderr.splitlines()[-1]
    assert last.startswith("pouch: ")
    assert "not found" in last.lower(), missing.stderr
    assert "Traceback" not in missing.stderr

    invalid = pouch(pd, "pull", "Not/A:Valid:Ref")
    assert invalid.returncode == 1
    assert invalid.stderr.startswith('pouch: invalid image reference "Not/A:Valid:Ref"')

    pd.stop()
    gone = pouch(pd, "version")
    assert gone.returncode == 1
    assert gone.stderr.startswith("pouch: ")
    assert "Traceback" not in gone.stderr
