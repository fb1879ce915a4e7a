"""Ancestral Euler sampling (k-diffusion's ``sample_euler_ancestral``): an Euler step down to a smaller sigma, then
fresh noise added back up to the next step's sigma.

numpy port of diffusers' ``EulerAncestralDiscreteScheduler`` over explicit :class:`SigmaState`. Stochastic:
``step()`` takes the noise as an argument, which the pipeline draws from the request's seed, so a seed still
fixes the image.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any, Mapping

import numpy as np

from .base import NoiseScheduleConfig, refuse_unsupported
from .euler import DiscreteSigmaSampler
from .sigmas import (
    SIGMA_SCHEDULE_DEFAULTS,
    UNSUPPORTED_SIGMA_OPTIONS,
    SigmaConfig,
    SigmaState,
    check_noise,
    check_step,
    predicted_original,
)

_F32 = np.float32


class EulerAncestralDiscreteScheduler(DiscreteSigmaSampler):
    """diffusers' EulerAncestralDiscreteScheduler in numpy over explicit :class:`SigmaState` (implements
    ``Scheduler``); ``needs_noise``: every step takes standard-normal noise."""

    needs_noise = True

    def __init__(self, config: Mapping[str, Any]) -> None:
        """Build from a scheduler_config.json dict; raises SchedulerConfigError for bad or unsupported values.

        diffusers' class has no Karras or final-sigma options: those keys, if present, are ignored as it ignores them.
        """
        refuse_unsupported(config, type(self).__name__, UNSUPPORTED_SIGMA_OPTIONS)
        self.config = SigmaConfig(NoiseScheduleConfig.from_dict(config, SIGMA_SCHEDULE_DEFAULTS))
        self.num_train_timesteps: int = self.config.schedule.num_train_timesteps

    def step(
        self, state: SigmaState, model_output: np.ndarray, step_index: int, sample: np.ndarray, noise: np.ndarray | None = None
    ) -> tuple[np.ndarray, SigmaState]:
        """An Euler step from sigma to sigma_down, then ``noise`` (required, standard normal, shaped like
        ``sample``) times sigma_up, where sigma_down^2 + sigma_up^2 = sigma_next^2."""
        model_output, sample = check_step(state, model_output, step_index, sample)
        noise = check_noise(noise, sample)
        sigma_from, sigma_to = state.sigma(step_index), state.sigma(step_index + 1)
        sigma_up = (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** _F32(0.5)
        sigma_down = (sigma_to**2 - sigma_up**2) ** _F32(0.5)
        denoised = predicted_original(self.config.schedule.prediction_type, model_output, sample, sigma_from)  # (B, C, H, W)
        derivative = (sample - denoised) / sigma_from  # (B, C, H, W)
        prev_sample = sample + derivative * (sigma_down - sigma_from)  # (B, C, H, W)
        prev_sample = prev_sample + noise * sigma_up  # (B, C, H, W)
        return prev_sample.astype(_F32), replace(state, steps_taken=step_index + 1)
