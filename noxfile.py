"""Developer and CI commands.

scripts/nox -s tests     set up everything (apt packages, venv) and run all checks
scripts/nox -s serve     set up everything and run pouchd in the foreground
scripts/nox -s lint      ruff and mypy --strict
scripts/nox -s protos    regenerate pouch/cri/_pb from protos/
scripts/nox -s bench     set up everything and run the benchmarks: pouchd vs containerd
scripts/nox -s demo      set up everything and take the newcomer's tour
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import nox

nox.options.reuse_venv = "yes"
nox.options.sessions = ["tests"]

ROOT = Path(__file__).parent

# Debian 12 packages the daemon runs on and the tests drive.
RUNTIME_PACKAGES = [
    "runc",
    "crun",
    "conmon",
    "catatonit",
    "containernetworking-plugins",
    "iptables",
    "criu",
]
TEST_PACKAGES = [
    "docker-registry",
    "busybox-static",
    "skopeo",
    # The suite runs the benchmark's quick mode, side by side with containerd.
    "containerd",
]


def _missing(packages: list[str]) -> list[str]:
    missing = []
    for pkg in packages:
        probe = subprocess.run(
            ["dpkg-query", "-W", "-f=${Status}", pkg], capture_output=True, text=True, check=False
        )
        if "install ok installed" not in probe.stdout:
            missing.append(pkg)
    return missing


def ensure_system_packages(session: nox.Session, packages: list[str]) -> None:
    """apt-get install what is missing (once; later runs find it installed)."""
    missing = _missing(packages)
    if not missing:
        return
    if os.geteuid() != 0:
        session.error(f"missing Debian packages {missing}: run as root to install them")
    env = {"DEBIAN_FRONTEND": "noninteractive"}
    session.log(f"installing Debian packages: {' '.join(missing)}")
    session.run("apt-get", "update", "-qq", external=True, env=env)
    session.run(
        "apt-get",
        "install",
        "-y",
        "-qq",
        "--no-install-recommends",
        *missing,
        external=True,
        env=env,
    )
    # docker-registry's package starts a system-wide registry on :5000; the
    # tests run their own on ephemeral ports, so keep the service out of the way.
    if "docker-registry" in missing and shutil.which("systemctl"):
        session.run(
            "systemctl", "disable", "--now", "docker-registry", external=True, success_codes=[0, 1]
        )


def prepare_host(session: nox.Session) -> None:
    """Make a hybrid cgroup layout usable by crun.

    On a cgroup v1 host with the unified (v2) hierarchy mounted beside it,
    a controller left on the v2 side (hugetlb, typically) makes crun 1.8
    refuse to run anything ("cgroups in hybrid mode not supported").  Binding
    that controller to a v1 hierarchy, as systemd does on most hybrid hosts,
    leaves v2 without controllers, which both runc and crun accept.
    """
    unified = Path("/sys/fs/cgroup/unified/cgroup.controllers")
    if not unified.exists() or os.geteuid() != 0:
        return
    for controller in unified.read_text().split():
        target = Path("/sys/fs/cgroup") / controller
        if target.is_mount():
            continue
        session.log(f"binding cgroup controller {controller} to a v1 hierarchy for crun")
        target.mkdir(exist_ok=True)
        session.run("mount", "-t", "cgroup", "-o", controller, "cgroup", str(target), external=True)


@nox.session(python=False)
def lint(session: nox.Session) -> None:
    _install(session, "lint")
    _lint(session)


def _venv_bin(name: str) -> str:
    return str(ROOT / ".venv" / "bin" / name)


def _install(session: nox.Session, *extras: str) -> None:
    """One project venv (.venv) shared by the sessions, created on first use."""
    venv = ROOT / ".venv"
    if not (venv / "bin" / "python").exists():
        session.run("python3", "-m", "venv", str(venv), external=True)
    spec = f".[{','.join(extras)}]" if extras else "."
    session.run(
        _venv_bin("pip"),
        "install",
        "--quiet",
        "--disable-pip-version-check",
        "-e",
        spec,
        external=True,
    )


LINTED = ["pouch", "tests", "benchmarks", "scripts/demo.py", "noxfile.py"]


def _lint(session: nox.Session) -> None:
    ruff = _venv_bin("ruff")
    session.run(ruff, "check", *LINTED, external=True)
    session.run(ruff, "format", "--check", *LINTED, external=True)
    session.run(_venv_bin("mypy"), "pouch", external=True)


@nox.session(python=False)
def tests(session: nox.Session) -> None:
    """Install everything, then lint and run the whole suite against real components."""
    fresh = _missing(["containerd"])
    ensure_system_packages(session, RUNTIME_PACKAGES + TEST_PACKAGES)
    _stop_system_containerd(session, fresh)
    prepare_host(session)
    _install(session, "test", "lint", "bench")
    _lint(session)
    session.run(_venv_bin("pytest"), *(session.posargs or ["tests"]), external=True)


@nox.session(python=False)
def serve(session: nox.Session) -> None:
    """Install everything and run pouchd in the foreground with the default config."""
    ensure_system_packages(session, RUNTIME_PACKAGES)
    prepare_host(session)
    _install(session)
    session.run(_venv_bin("pouchd"), *session.posargs, external=True)


@nox.session(python=False)
def protos(session: nox.Session) -> None:
    """Regenerate the betterproto code from protos/ (the test suite checks it is fresh)."""
    _install(session, "test")
    out = ROOT / "pouch" / "cri" / "_pb"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    env = {"PATH": f"{ROOT / '.venv' / 'bin'}:{os.environ['PATH']}"}
    session.run(
        _venv_bin("python"),
        "-m",
        "grpc_tools.protoc",
        f"-I{ROOT / 'protos'}",
        f"--python_betterproto_out={out}",
        *sorted(str(p.relative_to(ROOT / "protos")) for p in (ROOT / "protos").rglob("*.proto")),
        external=True,
        env=env,
    )


def _stop_system_containerd(session: nox.Session, fresh: list[str]) -> None:
    # Debian's package starts a system-wide containerd; the benchmarks run their own.
    if "containerd" in fresh and shutil.which("systemctl"):
        session.run(
            "systemctl", "disable", "--now", "containerd", external=True, success_codes=[0, 1]
        )


# What the benchmarks add: the runtime they compare pouchd with.
BENCH_PACKAGES = ["containerd"]


@nox.session(python=False)
def bench(session: nox.Session) -> None:
    """Run every benchmark in one local world, pouchd and containerd side by side (root).

    Prints one table and writes bench-results.json; arguments go to
    ``python -m benchmarks.all`` (``--quick`` for the CI smoke run, ``--json PATH``,
    ``--markdown PATH``, ``--skip PHASE``).
    """
    fresh = _missing(BENCH_PACKAGES)
    ensure_system_packages(session, RUNTIME_PACKAGES + TEST_PACKAGES + BENCH_PACKAGES)
    _stop_system_containerd(session, fresh)
    prepare_host(session)
    _install(session, "bench", "test")
    session.run(_venv_bin("python"), "-m", "benchmarks.all", *session.posargs, external=True)


@nox.session(python=False)
def demo(session: nox.Session) -> None:
    """A newcomer's tour: a local registry and pouchd, pull, a pod, exec, port-forward, logs."""
    ensure_system_packages(session, RUNTIME_PACKAGES + TEST_PACKAGES)
    prepare_host(session)
    _install(session, "test", "bench")
    session.run(
        _venv_bin("python"), str(ROOT / "scripts" / "demo.py"), *session.posargs, external=True
    )
