"""Command lines: ``pouchd`` (the daemon) and ``pouch`` (the client)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import trio

from pouch import __version__, daemon, log
from pouch.config import DEFAULT_CONFIG_PATH, ConfigError, load, to_toml, with_overrides
from pouch.cri._bridge import StartupError


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


def pouch_main(argv: list[str] | None = None) -> int:
    """Entry point of ``pouch``, the command-line client."""
    parser = argparse.ArgumentParser(prog="pouch", description="Pouch command-line client.")
    parser.add_argument("--version", action="version", version=f"pouch {__version__}")
    parser.parse_args(argv)
    parser.print_help()
    return 0
