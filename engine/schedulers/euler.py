"""Euler sampling of the probability-flow ODE (Karras et al. 2022, Algorithm 2 without churn).

numpy port of diffusers' ``EulerDiscreteScheduler`` over explicit :class:`SigmaState`: each call takes one Euler
step in sigma, from the call's sigma to the next, along the derivative (x - x_0) / sigma.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Mapping

import numpy as np

from .base import alphas_cumprod, check_num_inference_steps, refuse_unsupported
from .sigmas import (
    SIGMA_SCHEDULE_DEFAULTS,
    UNSUPPORTED_SIGMA_OPTIONS,
    SigmaConfig,
    SigmaState,
    add_noise_at_sigma,
    check_call,
    check_step,
    descending_timesteps,
    final_sigma,
    init_noise_sigma,
    interpolate_sigmas,
    karras_sigmas,
    predicted_original,
    scale_by_sigma,
    sigmas_to_timesteps,
    start_sigma_run,
    training_sigmas,
    with_final_sigma,
)

_EULER_OPTIONS: Mapping[str, tuple[Any, ...]] = {
    **UNSUPPORTED_SIGMA_OPTIONS,
    "interpolation_type": ("linear",),
    "timestep_type": ("discrete",),
}


@dataclass(frozen=True)
class PlannedSigmas:
    """An Euler / LMS run's step timesteps (N,) float32 and sigmas (N+1,) float32, largest first."""

    timesteps: np.ndarray
    sigmas: np.ndarray


def plan_discrete_sigmas(config: SigmaConfig, num_inference_steps: int, karras_bounds_from_config: bool) -> PlannedSigmas:
    """The timesteps and sigmas of diffusers' Euler and LMS samplers.

    Sigmas are interpolated at the spaced timesteps; with Karras sigmas the schedule is re-spaced between the
    interpolated ends (or the config's sigma_min / sigma_max where ``karras_bounds_from_config``, as Euler reads
    them and LMS does not) and the timesteps follow the sigmas.
    """
    train_sigmas = training_sigmas(alphas_cumprod(config.schedule))  # (T,)
    timesteps = descending_timesteps(config.schedule, num_inference_steps)  # (N,)
    sigmas = interpolate_sigmas(timesteps, train_sigmas)  # (N,) float64
    if config.use_karras_sigmas:
        sigma_min, sigma_max = sigmas[-1].item(), sigmas[0].item()
        if karras_bounds_from_config:
            sigma_min = sigma_min if config.sigma_min is None else config.sigma_min
            sigma_max = sigma_max if config.sigma_max is None else config.sigma_max
        sigmas = karras_sigmas(sigma_min, sigma_max, num_inference_steps)  # (N,)
        timesteps = sigmas_to_timesteps(sigmas, np.log(train_sigmas)).astype(np.float32)  # (N,)
    return PlannedSigmas(timesteps, with_final_sigma(sigmas, final_sigma(config, train_sigmas)))


class DiscreteSigmaSampler:
    """What diffusers' discrete-sigma samplers (Euler, Euler ancestral, LMS) share: the planned run of sigmas, the
    U-Net input's scaling and ``add_noise``. Each subclass builds ``config`` and ``num_train_timesteps`` from the
    checkpoint's config and defines ``step``."""

    order = 1
    #: Karras sigmas bounded by the config's sigma_min / sigma_max: diffusers' Euler reads them, the others do not
    karras_bounds_from_config = False
    config: SigmaConfig
    num_train_timesteps: int
    min_inference_steps = 1

    @property
    def max_inference_steps(self) -> int:
        """Any count up to the training timesteps: sigmas are interpolated between those of the training timesteps,
        clamped at the schedule's ends, as diffusers does."""
        return self.num_train_timesteps

    def start(self, num_inference_steps: int, begin_index: int = 0) -> SigmaState:
        """Plan a run of ``num_inference_steps`` steps from step ``begin_index`` on (diffusers' ``set_begin_index``).

        Raises ValueError if ``num_inference_steps`` is not an int in 1..max_inference_steps or ``begin_index`` is
        not in 0..num_inference_steps-1.
        """
        num_steps = check_num_inference_steps(num_inference_steps, self.min_inference_steps, self.max_inference_steps)
        plan = plan_discrete_sigmas(self.config, num_steps, karras_bounds_from_config=self.karras_bounds_from_config)
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


class EulerDiscreteScheduler(DiscreteSigmaSampler):
    """diffusers' EulerDiscreteScheduler in numpy over explicit :class:`SigmaState` (implements ``Scheduler``)."""

    needs_noise = False
    karras_bounds_from_config = True

    def __init__(self, config: Mapping[str, Any]) -> None:
        """Build from a scheduler_config.json dict; raises SchedulerConfigError for bad or unsupported values."""
        refuse_unsupported(config, type(self).__name__, _EULER_OPTIONS)
        self.config = SigmaConfig.from_dict(config, SIGMA_SCHEDULE_DEFAULTS)
        self.num_train_timesteps: int = self.config.schedule.num_train_timesteps

    def step(
        self, state: SigmaState, model_output: np.ndarray, step_index: int, sample: np.ndarray, noise: np.ndarray | None = None
    ) -> tuple[np.ndarray, SigmaState]:
        """One Euler step from call ``step_index``'s sigma to the next; deterministic, ``noise`` is ignored."""
        model_output, sample = check_step(state, model_output, step_index, sample)
        sigma, sigma_next = state.sigma(step_index), state.sigma(step_index + 1)
        denoised = predicted_original(self.config.schedule.prediction_type, model_output, sample, sigma)  # (B, C, H, W)
        derivative = (sample - denoised) / sigma  # (B, C, H, W)
        prev_sample = sample + derivative * (sigma_next - sigma)  # (B, C, H, W)
        return prev_sample.astype(np.float32), replace(state, steps_taken=step_index + 1)
