"""Exception types of the exporter."""
from __future__ import annotations

from sdrt.engine.errors import SdrtError


class ExportError(SdrtError):
    """The export could not produce a valid bundle; no bundle was written."""


class CheckpointError(ExportError, ValueError):
    """The input is not a diffusers Stable Diffusion checkpoint this exporter reads; the message says what is missing."""
