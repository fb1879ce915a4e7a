"""A request's randomness: every standard-normal draw of a request comes from one numpy Generator seeded with its seed,
in a fixed order, so a seed reproduces the whole request (VAE posterior samples, initial noise)."""
from __future__ import annotations

import numpy as np


class RequestNoise:
    """Standard-normal float32 arrays from `np.random.default_rng(seed)`, drawn in call order."""

    def __init__(self, seed: int | None) -> None:
        self._rng = np.random.default_rng(seed)

    def draw(self, shape: tuple[int, ...]) -> np.ndarray:
        """The next standard-normal float32 array of `shape`."""
        return self._rng.standard_normal(shape, dtype=np.float32)
