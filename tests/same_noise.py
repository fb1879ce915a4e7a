"""Run sdrt and diffusers on the same noise: every standard-normal array a request of ours draws is recorded, then
handed to diffusers' `randn_tensor` calls in the order diffusers makes them (VAE posterior samples, initial noise).

numpy's and torch's generators cannot be made to agree, so this is how the parity tests give both the same noise.
"""
from __future__ import annotations

import diffusers.models.autoencoders.vae as diffusers_vae
import numpy as np
import pytest
import torch

from sdrt.engine.noise import RequestNoise


def record_our_noise(monkeypatch: pytest.MonkeyPatch) -> list[np.ndarray]:
    """From now on, every RequestNoise draw is appended (a copy) to the returned list."""
    draws: list[np.ndarray] = []
    draw = RequestNoise.draw

    def recording(self: RequestNoise, shape: tuple[int, ...]) -> np.ndarray:
        array = draw(self, shape)
        draws.append(array.copy())
        return array

    monkeypatch.setattr(RequestNoise, "draw", recording)
    return draws


def replay_to_diffusers(monkeypatch: pytest.MonkeyPatch, pipeline_module, draws: list[np.ndarray],
                        scheduler_module=None) -> list[np.ndarray]:
    """Make diffusers' randn_tensor (in its VAE, in `pipeline_module` and in `scheduler_module`, a stochastic
    sampler's module where the pipeline draws too, for its step noise) return `draws` in order; once they run out,
    NaN arrays, so a draw diffusers uses but we never made poisons its output instead of passing silently. Returns
    the list of draws left over (empty when diffusers consumed all of ours)."""
    queue = [d.copy() for d in draws]

    def replay(shape, generator=None, device=None, dtype=None, layout=None):
        if not queue:
            return torch.full(tuple(shape), float("nan"))
        array = queue.pop(0)
        assert tuple(shape) == array.shape, f"diffusers draws {tuple(shape)} where we drew {array.shape}"
        return torch.from_numpy(array)

    monkeypatch.setattr(diffusers_vae, "randn_tensor", replay)
    monkeypatch.setattr(pipeline_module, "randn_tensor", replay)
    if scheduler_module is not None:
        monkeypatch.setattr(scheduler_module, "randn_tensor", replay)
    return queue
