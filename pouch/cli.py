"""Command lines: ``pouchd`` (the daemon) and ``pouch`` (the client).

``pouch`` talks to a running pouchd over its socket: the CRI for listing,
inspecting and removing images and for the version, and pouch's own API
(``protos/pouch/v1``) for pulls with progress and for loading archives.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Final

import click
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from pouch import __version__, log
from pouch.config import (
    DEFAULT_CONFIG_PATH,
    ConfigError,
    GrpcConfig,
    load,
    to_toml,
    with_overrides,
)

if TYPE_CHECKING:
    from types import TracebackType

    from pouch.cri._pb.pouch.v1 import PullProgress
    from pouch.cri._pb.runtime.v1 import Image
    from pouch.cri.client import Client


def _pouchd_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pouchd", description="Pouch: a CRI v1 container runtime daemon."
    )
    parser.add_argument(
        "--config",
        type=Path,
        default=None,
        help=f"TOML configuration file (default: {DEFAULT_CONFIG_PATH}, if present)",
    )
    parser.add_argument("--root", type=Path, help="persistent state directory")
    parser.add_argument("--state", type=Path, help="volatile state directory")
    parser.add_argument("--socket", type=Path, help="CRI gRPC unix socket path")
    parser.add_argument(
        "--print-config", action="store_true", help="print the effective configuration and exit"
    )
    parser.add_argument("--version", action="version", version=f"pouchd {__version__}")
    return parser


def pouchd_main(argv: list[str] | None = None) -> int:
    """Entry point of ``pouchd``; returns the exit status."""
    # Imported here, not at the top: ``pouch`` shares this module and should
    # neither pay for the daemon's imports nor depend on them.
    import trio

    from pouch import daemon
    from pouch.cri._bridge import StartupError

    args = _pouchd_parser().parse_args(argv)
    try:
        config = with_overrides(
            load(args.config), root=args.root, state=args.state, socket=args.socket
        )
    except ConfigError as exc:
        print(f"pouchd: {exc}", file=sys.stderr)
        return 2
    if args.print_config:
        sys.stdout.write(to_toml(config))
        return 0
    log.setup(config.log)
    try:
        trio.run(daemon.run, config)
    except StartupError as exc:
        print(f"pouchd: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:
        log.get_logger("pouch.daemon").critical("pouchd failed", exc_info=exc)
        return 1
    return 0


# ---- pouch ---------------------------------------------------------------------------

#: Where ``pouch`` finds the daemon unless ``--socket`` says otherwise.
DEFAULT_SOCKET: Final = GrpcConfig().address

#: How a layer's state reads in ``pouch pull`` (the words ``docker pull`` uses).
LAYER_STATES: Final = {
    "waiting": "Waiting",
    "downloading": "Downloading",
    "unpacking": "Unpacking",
    "done": "Pull complete",
    "exists": "Already exists",
}

_SIZE_UNITS: Final = ("B", "kB", "MB", "GB", "TB", "PB", "EB")


def human_size(size: int) -> str:
    """Bytes in decimal units with four significant digits: ``4.235MB``.

    The format of crictl and docker (go-units ``HumanSize``).
    """
    value = float(size)
    unit = 0
    while value >= 1000 and unit < len(_SIZE_UNITS) - 1:
        value /= 1000
        unit += 1
    return f"{value:.4g}{_SIZE_UNITS[unit]}"


def short_id(digest: str) -> str:
    """The first 12 hex digits of a digest or image id: ``sha256:0123...`` -> ``0123...``."""
    return digest.rpartition(":")[2][:12]


def split_name(name: str) -> tuple[str, str]:
    """Split an image name into repository and tag; ``<none>`` for a digest or no tag."""
    if "@" in name:
        return name.partition("@")[0], "<none>"
    repo, colon, tag = name.rpartition(":")
    # A colon before the last slash is a registry port, not a tag.
    if colon and "/" not in tag:
        return repo, tag
    return name, "<none>"


def image_row(image: Image) -> tuple[str, str, str, str]:
    """IMAGE, TAG, IMAGE ID and SIZE of ``pouch images``: the first tag names it."""
    if image.repo_tags:
        repo, tag = split_name(image.repo_tags[0])
    elif image.repo_digests:
        repo, tag = split_name(image.repo_digests[0])
    else:
        repo, tag = "<none>", "<none>"
    return repo, tag, short_id(image.id), human_size(image.size)


class PullView:
    """Shows a pull's progress on *console*.

    On a terminal: a progress bar per layer, redrawn in place.  Elsewhere (a
    pipe, a log file, ``TERM=dumb``): one line each time a layer changes
    state, as ``docker pull`` does, so a log shows what happened without
    a line per chunk.
    """

    def __init__(self, console: Console) -> None:
        self._console = console
        self.live = console.is_terminal and not console.is_dumb_terminal
        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TextColumn("{task.fields[state]}"),
            console=console,
            disable=not self.live,
        )
        self._resolving: TaskID | None = None
        self._layers: dict[str, TaskID] = {}
        self._states: dict[str, str] = {}
        self._announced = False

    def __enter__(self) -> PullView:
        self._progress.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._progress.stop()

    def update(self, progress: PullProgress) -> None:
        """Show one message of the Pull stream."""
        if self.live:
            self._update_bars(progress)
        else:
            self._update_lines(progress)

    def _print(self, text: str) -> None:
        self._console.print(text, markup=False, highlight=False, soft_wrap=True)

    def _update_lines(self, progress: PullProgress) -> None:
        if not self._announced:
            self._print(f"Pulling {progress.image}")
            self._announced = True
        for layer in progress.layers:
            state = "done" if progress.done and layer.state != "exists" else layer.state
            if self._states.get(layer.digest) != state:
                self._states[layer.digest] = state
                label = LAYER_STATES.get(state, state)
                self._print(f"{short_id(layer.digest)}: {label} ({human_size(layer.size)})")

    def _update_bars(self, progress: PullProgress) -> None:
        bars = self._progress
        if not progress.resolved and not progress.done:
            if self._resolving is None:
                self._resolving = bars.add_task(f"Resolving {progress.image}", total=None, state="")
            return
        if self._resolving is not None:
            bars.remove_task(self._resolving)
            self._resolving = None
        for layer in progress.layers:
            total = layer.size or None
            state = "done" if progress.done and layer.state != "exists" else layer.state
            done = layer.size if state in ("done", "exists") else layer.done
            label = LAYER_STATES.get(state, state)
            task = self._layers.get(layer.digest)
            if task is None:
                self._layers[layer.digest] = bars.add_task(
                    short_id(layer.digest), total=total, completed=done, state=label
                )
            else:
                bars.update(task, total=total, completed=done, state=label)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--socket",
    type=click.Path(dir_okay=False, path_type=Path),
    default=DEFAULT_SOCKET,
    show_default=True,
    help="pouchd's gRPC socket.",
)
@click.version_option(__version__, prog_name="pouch", message="%(prog)s %(version)s")
@click.pass_context
def pouch_cli(ctx: click.Context, socket: Path) -> None:
    """Pouch command-line client: images and versions, from a running pouchd."""
    # Imported here: pouchd shares this module and never needs grpcio.
    from pouch.cri.client import Client

    ctx.obj = ctx.with_resource(Client(socket))


@pouch_cli.command("pull")
@click.argument("image")
@click.option("--user", "-u", default="", help="Registry user name.")
@click.option("--password", "-p", default=None, help="Registry password (asked for if omitted).")
@click.pass_obj
def pull_command(client: Client, image: str, user: str, password: str | None) -> int:
    """Pull IMAGE, showing each layer's progress; print its image id."""
    if password is not None and not user:
        raise click.UsageError("--password needs --user")
    if user and password is None:
        password = click.prompt("Password", hide_input=True, err=True)
    image_id = ""
    with (
        PullView(Console(stderr=True)) as view,
        contextlib.closing(client.pull(image, username=user, password=password or "")) as stream,
    ):
        for progress in stream:
            view.update(progress)
            if progress.done:
                image_id = progress.image_id
    if not image_id:
        click.echo("pouch: the pull stream ended without an image id", err=True)
        return 1
    click.echo(image_id)
    return 0


@pouch_cli.command("images")
@click.option("--quiet", "-q", is_flag=True, help="Print image ids only.")
@click.pass_obj
def images_command(client: Client, quiet: bool) -> int:
    """List images."""
    images = client.list_images()
    if quiet:
        for image in images:
            click.echo(image.id)
        return 0
    table = Table(box=None, pad_edge=False, padding=(0, 3, 0, 0), header_style="bold")
    for heading in ("IMAGE", "TAG", "IMAGE ID"):
        table.add_column(heading, no_wrap=True)
    table.add_column("SIZE", no_wrap=True, justify="right")
    for image in images:
        table.add_row(*image_row(image))
    console = Console()
    if not console.is_terminal:
        # Piped output is read by programs: never wrap or cut a name.
        console = Console(width=10_000)
    console.print(table, markup=False, highlight=False)
    return 0


@pouch_cli.command("rmi")
@click.argument("images", nargs=-1, required=True)
@click.pass_obj
def rmi_command(client: Client, images: tuple[str, ...]) -> int:
    """Remove images, by name, id or id prefix; fails if one is not there."""
    from pouch.cri.client import ClientError

    failed = False
    for name in images:
        try:
            # RemoveImage succeeds on an unknown image (cri-api): ask first.
            image = client.image_status(name)
            if image is None:
                click.echo(f"pouch: no such image: {name}", err=True)
                failed = True
                continue
            client.remove_image(image.id)
        except ClientError as exc:
            click.echo(f"pouch: {exc.details}", err=True)
            failed = True
            continue
        for removed in (*image.repo_tags, *image.repo_digests):
            click.echo(f"Untagged: {removed}")
        click.echo(f"Deleted: {image.id}")
    return 1 if failed else 0


@pouch_cli.command("load")
@click.argument("file", type=click.Path(exists=True, path_type=Path))
@click.pass_obj
def load_command(client: Client, file: Path) -> int:
    """Load the images of an archive FILE (read by pouchd, on this host)."""
    for image in client.load(os.path.abspath(file)):
        if not image.names:
            click.echo(f"Loaded image ID: {image.image_id}")
        for name in image.names:
            click.echo(f"Loaded image: {name}")
    return 0


@pouch_cli.command("version")
@click.pass_obj
def version_command(client: Client) -> int:
    """Print the client's and the daemon's versions."""
    response = client.version()
    click.echo(f"ClientVersion:  {__version__}")
    click.echo(f"Version:  {response.version}")
    click.echo(f"RuntimeName:  {response.runtime_name}")
    click.echo(f"RuntimeVersion:  {response.runtime_version}")
    click.echo(f"RuntimeApiVersion:  {response.runtime_api_version}")
    return 0


def pouch_main(argv: list[str] | None = None) -> int:
    """Entry point of ``pouch``, the command-line client; returns the exit status.

    A failed call prints ``pouch: <the daemon's message>`` and exits 1.
    """
    from pouch.cri.client import ClientError

    try:
        result = pouch_cli.main(args=argv, prog_name="pouch", standalone_mode=False)
    except ClientError as exc:
        click.echo(f"pouch: {exc.details}", err=True)
        return 1
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except click.Abort as exc:
        if isinstance(exc.__cause__, KeyboardInterrupt):
            return 130  # as a shell reports SIGINT
        click.echo("pouch: aborted", err=True)
        return 1
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(pouch_main())
