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


class EnginesNotBuiltError(BackendUnavailableError):
    """The bundle has no TensorRT engines for this GPU, TensorRT version and bundle content (none built, built for
    another GPU or TensorRT, or built from ONNX that has since changed); the message names `sdrt build-engines`."""


class ProfileMismatchError(InvalidArgumentError):
    """A request's batch, height or width is outside the range its TensorRT engines were built for; the message
    names that range and the `sdrt build-engines` command that rebuilds them to cover the request."""


class GpuError(SdrtError, RuntimeError):
    """A CUDA or TensorRT call failed on the device; the message names the call and its error."""
