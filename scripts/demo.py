"""A newcomer's tour of Pouch: ``scripts/nox -s demo``.

It starts a local registry (Debian's docker-registry on 127.0.0.1, holding
images built offline from busybox-static) and a private ``pouchd``, then:
pulls an image with progress bars, runs a pod with a web server and a shell
container (through the CRI, as a kubelet would), shows ``pouch pods`` and
``pouch ps``, execs a command, fetches the web page through ``pouch
port-forward``, prints the logs, and cleans everything up.  It exits non-zero
if any step fails; the test suite runs it.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import httpx
from cri_api.v1 import api_pb2, api_pb2_grpc
from rich.console import Console
from rich.rule import Rule

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.support import images as timg  # noqa: E402
from tests.support.registry import Registry, push  # noqa: E402

if TYPE_CHECKING:
    from collections.abc import Iterator

console = Console(stderr=False, highlight=False)
STEP_TIMEOUT = 120


class DemoFailed(Exception):
    pass


def step(title: str) -> None:
    console.print()
    console.print(Rule(f"[bold]{title}"))


def show(argv: list[str]) -> None:
    console.print(f"[dim]$[/] [cyan]{' '.join(argv)}[/]")


def pouch(socket: Path, *args: str, input: str | None = None) -> str:
    argv = [sys.executable, "-m", "pouch.cli", "--socket", str(socket), *args]
    show(["pouch", *args])
    proc = subprocess.run(
        argv, input=input, capture_output=True, text=True, timeout=STEP_TIMEOUT, check=False
    )
    if proc.stdout:
        console.print(proc.stdout.rstrip(), markup=False, highlight=False)
    if proc.returncode != 0:
        console.print(proc.stderr.rstrip(), style="red", markup=False)
        raise DemoFailed(f"pouch {' '.join(args)} exited with {proc.returncode}")
    return proc.stdout


@contextlib.contextmanager
def pouchd(base: Path, registry: Registry) -> Iterator[Path]:
    socket = base / "pouch.sock"
    config = base / "pouchd.toml"
    config.write_text(f'[registry]\ninsecure = ["{registry.host}"]\n')
    log = (base / "pouchd.log").open("wb")
    argv = [
        sys.executable, "-m", "pouch",
        "--root", str(base / "root"), "--state", str(base / "state"),
        "--socket", str(socket), "--config", str(config),
    ]  # fmt: skip
    show(["pouchd", "--root", str(base / "root"), "--socket", str(socket), "..."])
    proc = subprocess.Popen(argv, stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 20
        while True:
            if proc.poll() is not None:
                raise DemoFailed(f"pouchd exited with {proc.returncode}")
            try:
                with grpc.insecure_channel(f"unix://{socket}") as ch:
                    api_pb2_grpc.RuntimeServiceStub(ch).Version(api_pb2.VersionRequest(), timeout=1)
                break
            except grpc.RpcError:
                if time.monotonic() > deadline:
                    raise DemoFailed("pouchd did not become ready") from None
                time.sleep(0.1)
        console.print(f"pouchd is ready (pid {proc.pid})")
        yield socket
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        log.close()


def run_pod(rt: api_pb2_grpc.RuntimeServiceStub, image: str, logs: Path) -> tuple[str, str, str]:
    """A pod with a web server and a shell container, created as a kubelet would."""
    config = api_pb2.PodSandboxConfig(
        metadata=api_pb2.PodSandboxMetadata(name="tour", uid=uuid.uuid4().hex, namespace="demo"),
        hostname="tour",
        log_directory=str(logs),
    )
    show(["RunPodSandbox", "tour"])
    sid = rt.RunPodSandbox(api_pb2.RunPodSandboxRequest(config=config), timeout=60).pod_sandbox_id
    ids = []
    for name, command in (
        ("web", ["httpd", "-f", "-p", "8080", "-h", "/www"]),
        ("shell", ["sh", "-c", "echo hello from the shell container; exec sleep 3600"]),
    ):
        show(["CreateContainer", name, "+", "StartContainer"])
        cid = rt.CreateContainer(
            api_pb2.CreateContainerRequest(
                pod_sandbox_id=sid,
                config=api_pb2.ContainerConfig(
                    metadata=api_pb2.ContainerMetadata(name=name),
                    image=api_pb2.ImageSpec(image=image),
                    command=command,
                    log_path=f"{name}.log",
                ),
                sandbox_config=config,
            ),
            timeout=60,
        ).container_id
        rt.StartContainer(api_pb2.StartContainerRequest(container_id=cid), timeout=60)
        ids.append(cid)
    return sid, ids[0], ids[1]


def port_forward_get(socket: Path, sid: str) -> str:
    argv = [sys.executable, "-m", "pouch.cli", "--socket", str(socket),
            "port-forward", sid[:12], "0:8080"]  # fmt: skip
    show(["pouch", "port-forward", sid[:12], "0:8080", "&"])
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        match = re.search(r"127\.0\.0\.1:(\d+)", line)
        if match is None:
            raise DemoFailed(f"port-forward did not start: {line!r} {proc.stderr.read()!r}")
        console.print(line.rstrip(), markup=False)
        url = f"http://127.0.0.1:{match.group(1)}/"
        show(["curl", url])
        body = httpx.get(url, timeout=10).text
        console.print(body.rstrip(), style="green", markup=False)
        return body
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def tour(base: Path) -> None:
    step("1. A local registry with images built offline from busybox-static")
    with Registry() as registry:
        web = timg.webserver_image()
        push(registry, "demo/web", "latest", web)
        image = f"{registry.host}/demo/web:latest"
        console.print(f"registry on {registry.url} holds {image}")

        step("2. Start pouchd (a CRI v1 runtime on a unix socket)")
        with pouchd(base, registry) as socket:
            step("3. Pull the image, with progress bars")
            pouch(socket, "pull", image)
            pouch(socket, "images")

            step("4. Run a pod with a web server and a shell container")
            with grpc.insecure_channel(f"unix://{socket}") as ch:
                rt = api_pb2_grpc.RuntimeServiceStub(ch)
                sid, web_id, shell_id = run_pod(rt, image, base / "logs")
                try:
                    pouch(socket, "pods")
                    pouch(socket, "ps")

                    step("5. Exec a command in the shell container")
                    out = pouch(socket, "exec", shell_id[:12], "sh", "-c", "hostname; id")
                    if "tour" not in out:
                        raise DemoFailed("exec did not run in the pod")

                    step("6. Fetch the web page through port-forward")
                    body = port_forward_get(socket, sid)
                    if "hello from pouch" not in body:
                        raise DemoFailed(f"unexpected page: {body!r}")

                    step("7. Logs")
                    logs = pouch(socket, "logs", shell_id[:12])
                    if "hello from the shell container" not in logs:
                        raise DemoFailed("the shell container's log is missing its line")
                    del web_id
                finally:
                    step("8. Clean up")
                    show(["StopPodSandbox", "+", "RemovePodSandbox", sid[:12]])
                    rt.StopPodSandbox(api_pb2.StopPodSandboxRequest(pod_sandbox_id=sid), timeout=60)
                    rt.RemovePodSandbox(
                        api_pb2.RemovePodSandboxRequest(pod_sandbox_id=sid), timeout=60
                    )
            pouch(socket, "rmi", image)
            pouch(socket, "pods")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args()
    if os.geteuid() != 0:
        console.print("the tour runs containers: run it as root", style="red")
        return 2
    base = Path(tempfile.mkdtemp(prefix="pouch-demo-", dir="/tmp"))
    started = time.monotonic()
    try:
        tour(base)
    except (DemoFailed, grpc.RpcError, httpx.HTTPError, subprocess.TimeoutExpired) as exc:
        console.print(f"\n[bold red]demo failed:[/] {exc}")
        log = base / "pouchd.log"
        if log.exists():
            console.print(Rule("pouchd log (tail)"))
            console.print("\n".join(log.read_text().splitlines()[-30:]), markup=False)
        return 1
    finally:
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
    console.print(f"\n[bold green]tour complete[/] in {time.monotonic() - started:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
