"""Exception types of the exporter."""
from __future__ import annotations

from sdrt.engine.errors import SdrtError


class ExportError(SdrtError):
    """The export could not produce a valid bundle; no bundle was written."""


class CheckpointError(ExportError, ValueError):
    """The input is not a diffusers Stable Diffusion checkpoint this exporter reads; the message says what is missing."""


class EngineBuildError(ExportError):
    """TensorRT could not build an engine from the bundle's ONNX, or the bundle cannot hold engines; no index of
    engines was published, so the runtime goes on using the previous build (or none)."""
