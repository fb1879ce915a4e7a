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

from .base import NoiseScheduleConfig, check_num_inference_steps, refuse_unsupported
from .euler import plan_discrete_sigmas
from .sigmas import (
    SIGMA_SCHEDULE_DEFAULTS,
    UNSUPPORTED_SIGMA_OPTIONS,
    SigmaConfig,
    SigmaState,
    add_noise_at_sigma,
    check_call,
    check_noise,
    check_step,
    init_noise_sigma,
    predicted_original,
    scale_by_sigma,
    start_sigma_run,
)

_F32 = np.float32


class EulerAncestralDiscreteScheduler:
    """diffusers' EulerAncestralDiscreteScheduler in numpy over explicit :class:`SigmaState` (implements
    ``Scheduler``); ``needs_noise``: every step takes standard-normal noise."""

    order = 1
    needs_noise = True

    def __init__(self, config: Mapping[str, Any]) -> None:
        """Build from a scheduler_config.json dict; raises SchedulerConfigError for bad or unsupported values.

        diffusers' class has no Karras or final-sigma options: those keys, if present, are ignored as it ignores them.
        """
        refuse_unsupported(config, type(self).__name__, UNSUPPORTED_SIGMA_OPTIONS)
        self.config = SigmaConfig(NoiseScheduleConfig.from_dict(config, SIGMA_SCHEDULE_DEFAULTS))
        self.num_train_timesteps: int = self.config.schedule.num_train_timesteps

    def start(self, num_inference_steps: int, begin_index: int = 0) -> SigmaState:
        """Plan a run of ``num_inference_steps`` steps from step ``begin_index`` on (diffusers' ``set_begin_index``).

        Raises ValueError if ``num_inference_steps`` is not an int in 1..num_train_timesteps or ``begin_index`` is
        not in 0..num_inference_steps-1.
        """
        num_steps = check_num_inference_steps(num_inference_steps, self.num_train_timesteps)
        plan = plan_discrete_sigmas(self.config, num_steps, karras_bounds_from_config=False)
        noise_sigma = init_noise_sigma(plan.sigmas, self.config.schedule.timestep_spacing)
        return start_sigma_run(plan.timesteps, plan.sigmas, begin_index, noise_sigma)

    def scale_model_input(self, state: SigmaState, sample: np.ndarray, step_index: int) -> np.ndarray:
        """x / sqrt(sigma^2 + 1) at call ``step_index``'s sigma."""
        check_call(state, step_index)
        return scale_by_sigma(sample, state.sigma(step_index))

    def add_noise(self, state: SigmaState, original: np.ndarray, noise: np.ndarray, step_index: int) -> np.ndarray:
        """``original`` + sigma * ``noise`` at call ``step_index``'s sigma."""
        check_call(state, step_index)
        return add_noise_at_sigma(original, noise, state.sigma(step_index))

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
