"""What every command family shares: the one-line usage error, its parser, exit statuses, and argument types."""
from __future__ import annotations

import argparse
from typing import NoReturn

from sdrt.engine.backends import AUTO, BACKENDS, EXACT

EXIT_USAGE = 2
# `sdrt serve`: the bundle passed the check before the port was bound, then failed to load.
EXIT_LOAD_FAILED = 1
# Generation finished but the safety checker blocked at least one image, which was therefore not written.
EXIT_BLOCKED = 3


class UsageError(Exception):
    pass


class HelpFormatter(argparse.HelpFormatter):
    """Lists the backends this machine runs in --backend's help, found when help is shown (not on every command)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.dest == _BACKEND_DEST:
            return _backend_help().replace("%", "%%")
        return super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:  # one line, not argparse's usage block
        raise UsageError(f"{self.prog}: {message}")


_BACKEND_DEST = "backend"


def add_backend_argument(parser: argparse.ArgumentParser) -> None:
    """--backend: "auto", "exact" or a backend's name, the help saying which of them run here."""
    parser.add_argument("--backend", dest=_BACKEND_DEST, choices=[AUTO, EXACT, *(b.name for b in BACKENDS)], default=AUTO,
                        metavar="BACKEND", help="the inference backend")  # HelpFormatter writes the full text


def _backend_help() -> str:
    available = [b.name for b in BACKENDS if b.unavailable_reason() is None]
    unavailable = [b.name for b in BACKENDS if b.name not in available]
    return (f"{AUTO} (default): the fastest that runs here and runs the bundle; {EXACT}: the fastest fp32 one, at "
            f"parity with diffusers; or one of, fastest first: {', '.join(b.name for b in BACKENDS)}. This machine runs "
            f"{', '.join(available) or 'none'}" + (f"; not {', '.join(unavailable)} (sdrt doctor says why)" if unavailable else ""))


def positive(kind: type):
    """An argument type: `kind`(text), refused unless > 0."""
    def parse(text: str):
        value = kind(text)
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text!r}")
        return value

    return parse
