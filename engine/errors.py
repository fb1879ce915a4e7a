"""Exception types of the runtime: callers catch these, the CLI turns them into one-line messages and exit code 2."""
from __future__ import annotations


class SdrtError(Exception):
    """Base of every error sdrt raises on purpose."""


class InvalidArgumentError(SdrtError, ValueError):
    """A request argument is outside what the pipeline accepts; the message names it and the allowed range."""

    def __init__(self, parameter: str, message: str) -> None:
        # Messages passed up from lower layers may already start with the parameter's name.
        super().__init__(message if message.startswith(parameter) else f"{parameter}: {message}")
        self.parameter = parameter


class BundleError(SdrtError, ValueError):
    """A bundle is missing, incomplete, tampered with, or of a format this runtime does not read."""


class BackendUnavailableError(SdrtError, RuntimeError):
    """The requested inference backend cannot run here; the message says what is missing."""
