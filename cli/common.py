"""What every command family shares: the one-line usage error, its parser, exit statuses, and argument types."""
from __future__ import annotations

import argparse
from typing import NoReturn

EXIT_USAGE = 2
# `sdrt serve`: the bundle passed the check before the port was bound, then failed to load.
EXIT_LOAD_FAILED = 1
# Generation finished but the safety checker blocked at least one image, which was therefore not written.
EXIT_BLOCKED = 3


class UsageError(Exception):
    pass


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, not argparse's usage block
        raise UsageError(f"{self.prog}: {message}")


def positive(kind: type):
    """An argument type: `kind`(text), refused unless > 0."""
    def parse(text: str):
        value = kind(text)
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text!r}")
        return value

    return parse
