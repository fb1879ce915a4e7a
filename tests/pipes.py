"""A bundle loaded on a named backend for a test, or the test skipped where this machine cannot run that backend."""
from __future__ import annotations

from pathlib import Path

import pytest

import sdrt.engine
from sdrt.engine.backends import BACKENDS


def pipe_or_skip(bundle: Path, backend: str = "onnxruntime-cpu"):
    """The pipeline of `bundle` on `backend`, safety checker off, no progress bar; skip the test if `backend` cannot run here."""
    reason = next(b for b in BACKENDS if b.name == backend).unavailable_reason()
    if reason is not None:
        pytest.skip(f"{backend} unavailable: {reason}")
    pipe = sdrt.engine.load(bundle, backend=backend, safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe
