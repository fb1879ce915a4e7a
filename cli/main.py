"""The `sdrt` command: the parser each command family fills in, dispatch, and what a failure prints.

Every failure a user can cause prints one line `sdrt: error: ...` and exits with status 2, leaving no output file.
Ctrl-C and SIGTERM print `sdrt: stopped by SIGINT` (SIGTERM) and exit with status 130 (143), leaving no partial file.
"""
from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from sdrt.cli import build, generate, serve, signals, tools
from sdrt.cli.common import EXIT_USAGE, ArgumentParser, UsageError
from sdrt.engine.errors import SdrtError
from sdrt.engine.version import SDRT_VERSION


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="sdrt", description="Stable Diffusion inference engine")
    parser.add_argument("--version", action="version", version=f"sdrt {SDRT_VERSION}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=ArgumentParser)
    for family in (generate, serve, build, tools):  # the order `sdrt --help` lists them in
        family.add_commands(commands)
    return parser


class _LogFormatter(logging.Formatter):
    """`sdrt: warning: message`, like the error lines; -v adds the logger's name."""

    def __init__(self, verbose: bool) -> None:
        super().__init__()
        self.verbose = verbose

    def format(self, record: logging.LogRecord) -> str:
        origin = f" {record.name}" if self.verbose else ""
        return f"sdrt: {record.levelname.lower()}{origin}: {record.getMessage()}"


def _configure_logging(verbose: bool) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(_LogFormatter(verbose))
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, handlers=[handler])


def main(argv: Sequence[str] | None = None) -> int:
    signals.install()
    parser = build_parser()
    try:
        argv = list(sys.argv[1:] if argv is None else argv)
        args = parser.parse_args(argv)
        args.argv = argv  # recorded by `bench` so results say how to reproduce them
        _configure_logging(args.verbose)
        return args.handler(args)
    except UsageError as exc:
        print(f"sdrt: error: {exc}", file=sys.stderr)
    except (SdrtError, ValueError, FileExistsError, FileNotFoundError) as exc:
        print(f"sdrt: error: {exc}", file=sys.stderr)
    except (KeyboardInterrupt, signals.Terminated) as exc:
        return signals.stopped(exc)
    return EXIT_USAGE
