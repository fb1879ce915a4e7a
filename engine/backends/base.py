"""The one small interface every inference backend implements."""
from __future__ import annotations

import abc
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from sdrt.engine.specs import Component


class Backend(abc.ABC):
    """Runs the bundle's components. Sessions are created on first use, so unused components cost no memory."""

    #: the name users pass as `backend=` and that results report
    name: str
    #: fp32 throughout, at pixel parity with diffusers; False for reduced-precision (fast) backends
    exact: bool

    @classmethod
    @abc.abstractmethod
    def unavailable_reason(cls) -> str | None:
        """None if this backend can run on this machine, else what is missing (one sentence)."""

    @abc.abstractmethod
    def __init__(self, bundle_dir: Path, component_files: Mapping[Component, str]) -> None:
        """`component_files` maps each component to its model file, relative to `bundle_dir`."""

    @abc.abstractmethod
    def run(self, component: Component, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """Run one component on named inputs; return its outputs in spec order."""
