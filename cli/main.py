"""The `sdrt` command: the parser each command family fills in, dispatch, and what a failure prints.

Every failure a user can cause prints one line `sdrt: error: ...` and exits with status 2, leaving no output file.
"""
from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Sequence
from typing import NoReturn

from sdrt.cli import build, generate, serve, tools
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


def _terminate(signum: int, frame: object) -> NoReturn:
    # SystemExit unwinds like any exception, so atomic writers remove their temporary files.
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, _terminate)
    parser = build_parser()
    try:
        argv = list(sys.argv[1:] if argv is None else argv)
        args = parser.parse_args(argv)
        args.argv = argv  # recorded by `bench` so results say how to reproduce them
        logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
        return args.handler(args)
    except UsageError as exc:
        print(f"sdrt: error: {exc}", file=sys.stderr)
    except (SdrtError, ValueError, FileExistsError, FileNotFoundError) as exc:
        print(f"sdrt: error: {exc}", file=sys.stderr)
    except KeyboardInterrupt:
        print("sdrt: interrupted", file=sys.stderr)
        return 130
    return EXIT_USAGE
