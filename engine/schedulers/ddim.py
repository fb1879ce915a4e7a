"""DDIM sampling (Song et al. 2021, "Denoising Diffusion Implicit Models").

numpy port of diffusers' ``DDIMScheduler`` over explicit :class:`DDIMState`. Each call predicts x_0 and epsilon from
the model output and moves to the next timestep's alpha-bar, eq. (12) of the paper. With ``eta`` = 0 (the default,
and what every registry name uses) the update is deterministic; ``eta`` > 0 adds eta-scaled DDPM noise, which
``step()`` then takes as an argument (``needs_noise``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

from sdrt.engine.array_namespace import namespace_of
from .base import (
    NoiseScheduleConfig,
    SchedulerConfigError,
    add_noise_at_alpha_prod,
    alphas_cumprod_from_betas,
    betas_from_config,
    check_num_inference_steps,
    check_step_index,
    most_spaced_steps,
    read_bool,
    read_float,
    read_only,
    refuse_unsupported,
    spaced_timesteps,
)
from .sigmas import check_noise

_F32 = np.float32

_DDIM_OPTIONS: Mapping[str, tuple[Any, ...]] = {"thresholding": (False,), "rescale_betas_zero_snr": (False,)}


@dataclass(frozen=True)
class DDIMConfig:
    """A DDIMScheduler config: the shared noise-schedule fields plus DDIM's own (diffusers' defaults)."""

    schedule: NoiseScheduleConfig = field(default_factory=NoiseScheduleConfig)
    # True: the last update lands on alpha-bar = 1 (a clean sample); False: on alpha-bar_0.
    set_alpha_to_one: bool = True
    # Clamp the predicted x_0 to [-clip_sample_range, clip_sample_range] (pixel-space models; SD configs turn it off).
    clip_sample: bool = True
    clip_sample_range: float = 1.0

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> DDIMConfig:
        """Read a scheduler_config.json dict; raises SchedulerConfigError for bad or unsupported values."""
        refuse_unsupported(config, "DDIMScheduler", _DDIM_OPTIONS)
        return cls(
            schedule=NoiseScheduleConfig.from_dict(config),
            set_alpha_to_one=read_bool(config, "set_alpha_to_one", True),
            clip_sample=read_bool(config, "clip_sample", True),
            clip_sample_range=read_float(config, "clip_sample_range", 1.0),
        )


@dataclass(frozen=True, eq=False)
class DDIMState:
    """A planned DDIM run: per call, its timestep and the alpha-bar pair the update moves between (read-only).
    DDIM keeps no history, so ``step()`` returns this same state."""

    timesteps: np.ndarray  # (num_calls,) int64
    alpha_prod: np.ndarray  # (num_calls,) float32 — alpha-bar at each call's timestep
    alpha_prod_prev: np.ndarray  # (num_calls,) float32 — alpha-bar each update lands on

    @property
    def init_noise_sigma(self) -> float:
        """DDIM starts from unit-variance noise."""
        return 1.0


class DDIMScheduler:
    """diffusers' DDIMScheduler in numpy over explicit :class:`DDIMState` (implements ``Scheduler``)."""

    order = 1

    def __init__(self, config: Mapping[str, Any], eta: float = 0.0) -> None:
        """Build from a scheduler_config.json dict; ``eta`` in [0, 1] weights the added noise (diffusers' ``step``
        argument; 0: deterministic DDIM, 1: DDPM's variance). Raises SchedulerConfigError for bad config values,
        ValueError for a bad ``eta``."""
        self.config = DDIMConfig.from_dict(config)
        if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not 0.0 <= eta <= 1.0:
            raise ValueError(f"eta must be a number in [0, 1], got {eta!r}")
        self.eta = float(eta)
        self.needs_noise = self.eta > 0
        self.num_train_timesteps: int = self.config.schedule.num_train_timesteps
        self.min_inference_steps, self.max_inference_steps = 1, most_spaced_steps(self.config.schedule)
        if self.max_inference_steps < 1:
            raise SchedulerConfigError(f"scheduler config steps_offset={self.config.schedule.steps_offset} leaves no "
                                       "run within the training timesteps")
        self.alphas_cumprod = read_only(alphas_cumprod_from_betas(betas_from_config(self.config.schedule)))  # (T,)
        self.final_alpha_cumprod = _F32(1.0) if self.config.set_alpha_to_one else self.alphas_cumprod[0]

    def start(self, num_inference_steps: int, begin_index: int = 0) -> DDIMState:
        """Plan a run of ``num_inference_steps`` steps from step ``begin_index`` on (diffusers' img2img loop over
        ``timesteps[begin_index:]``; DDIM's update depends only on the timestep).

        Raises ValueError if ``num_inference_steps`` is not an int in 1..max_inference_steps or if ``begin_index`` is
        not in 0..num_inference_steps-1.
        """
        num_steps = check_num_inference_steps(num_inference_steps, 1, self.max_inference_steps)
        timesteps = spaced_timesteps(self.config.schedule, num_steps)[::-1]  # (N,) descending
        if not isinstance(begin_index, (int, np.integer)) or isinstance(begin_index, bool) or not 0 <= begin_index < num_steps:
            raise ValueError(f"begin_index must be in 0..{num_steps - 1} for {num_steps} steps, got {begin_index!r}")
        timesteps = timesteps[begin_index:].copy()  # (num_calls,)
        # diffusers moves by num_train // N per step whatever the spacing, and so do we.
        previous = timesteps - self.num_train_timesteps // num_steps  # (num_calls,)
        alpha_prod_prev = np.where(previous >= 0, self.alphas_cumprod[np.maximum(previous, 0)], self.final_alpha_cumprod)
        return DDIMState(
            timesteps=read_only(timesteps.astype(np.int64)),
            alpha_prod=read_only(self.alphas_cumprod[timesteps]),
            alpha_prod_prev=read_only(alpha_prod_prev.astype(_F32)),
        )

    def scale_model_input(self, state: DDIMState, sample: np.ndarray, step_index: int) -> np.ndarray:
        """DDIM feeds the U-Net the sample unscaled."""
        check_step_index(len(state.timesteps), step_index)
        return sample

    def add_noise(self, state: DDIMState, original: np.ndarray, noise: np.ndarray, step_index: int) -> np.ndarray:
        """``original`` noised to alpha-bar at call ``step_index``'s timestep."""
        check_step_index(len(state.timesteps), step_index)
        return add_noise_at_alpha_prod(original, noise, state.alpha_prod[step_index])

    def step(
        self, state: DDIMState, model_output: np.ndarray, step_index: int, sample: np.ndarray, noise: np.ndarray | None = None
    ) -> tuple[np.ndarray, DDIMState]:
        """The DDIM update of call ``step_index``; ``noise`` (standard normal, shaped like ``sample``) is required
        when eta > 0 and ignored otherwise. Calls may come in any order: the state holds no history."""
        check_step_index(len(state.timesteps), step_index)
        xp = namespace_of(model_output, sample)
        model_output = xp.asarray(model_output, dtype=xp.float32)  # (B, C, H, W)
        sample = xp.asarray(sample, dtype=xp.float32)  # (B, C, H, W)
        if model_output.shape != sample.shape:
            raise ValueError(f"model_output shape {model_output.shape} != sample shape {sample.shape}")
        alpha_prod_t, alpha_prod_prev = state.alpha_prod[step_index], state.alpha_prod_prev[step_index]
        beta_prod_t = _F32(1) - alpha_prod_t
        half = _F32(0.5)
        if self.config.schedule.prediction_type == "epsilon":
            pred_original = (sample - beta_prod_t**half * model_output) / alpha_prod_t**half  # (B, C, H, W)
            pred_epsilon = model_output
        else:
            pred_original = alpha_prod_t**half * sample - beta_prod_t**half * model_output  # (B, C, H, W)
            pred_epsilon = alpha_prod_t**half * model_output + beta_prod_t**half * sample  # (B, C, H, W)
        if self.config.clip_sample:
            limit = _F32(self.config.clip_sample_range)
            pred_original = xp.clip(pred_original, -limit, limit)  # (B, C, H, W)
        # eq. (16): the DDPM posterior variance between the two timesteps, scaled by eta.
        variance = ((_F32(1) - alpha_prod_prev) / beta_prod_t) * (_F32(1) - alpha_prod_t / alpha_prod_prev)
        std_dev_t = _F32(self.eta) * variance**half
        direction = (_F32(1) - alpha_prod_prev - std_dev_t**2) ** half * pred_epsilon  # (B, C, H, W)
        prev_sample = alpha_prod_prev**half * pred_original + direction  # (B, C, H, W)
        if self.needs_noise:
            prev_sample = prev_sample + std_dev_t * check_noise(noise, sample)  # (B, C, H, W)
        return prev_sample.astype(_F32), state

