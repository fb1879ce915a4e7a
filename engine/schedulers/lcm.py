"""Latent Consistency Model sampling (Luo et al. 2023, "Latent Consistency Models", Algorithm 1).

numpy port of diffusers' ``LCMScheduler`` over explicit :class:`LCMState`. A consistency model maps any noisy sample
straight to a clean one: each call predicts x_0, blends it with the sample by the boundary-condition scalings
``c_skip`` / ``c_out`` (so the map is the identity at t = 0), and, except on the last call, re-noises the result to the
next timestep's level with fresh noise (``needs_noise``: the caller draws it from the request's seed).

The run's timesteps are a subset of the ``original_inference_steps`` evenly spaced timesteps the model was distilled
on (diffusers' "LCM schedule"), so at most ``original_inference_steps`` steps plan.
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
    read_bool,
    read_float,
    read_int,
    read_only,
    refuse_unsupported,
)
from .sigmas import check_noise

_F32 = np.float32

_LCM_OPTIONS: Mapping[str, tuple[Any, ...]] = {"thresholding": (False,), "rescale_betas_zero_snr": (False,)}
# diffusers' LCMScheduler defaults for the shared keys (LCM-distilled SD 1.5 checkpoints ship these).
_LCM_SCHEDULE_DEFAULTS = NoiseScheduleConfig(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
# sigma_data of the consistency-model parametrisation (Song et al. 2023), fixed in diffusers.
_SIGMA_DATA = _F32(0.5)


@dataclass(frozen=True)
class LCMConfig:
    """An LCMScheduler config: the shared noise-schedule fields plus LCM's own (diffusers' defaults)."""

    schedule: NoiseScheduleConfig = field(default_factory=lambda: _LCM_SCHEDULE_DEFAULTS)
    # The distillation schedule's length: the run's timesteps are picked among its timesteps.
    original_inference_steps: int = 50
    # Multiplies the timestep in c_skip / c_out: larger makes the boundary condition sharper.
    timestep_scaling: float = 10.0
    set_alpha_to_one: bool = True
    clip_sample: bool = False
    clip_sample_range: float = 1.0

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> LCMConfig:
        """Read a scheduler_config.json dict; raises SchedulerConfigError for bad or unsupported values."""
        refuse_unsupported(config, "LCMScheduler", _LCM_OPTIONS)
        schedule = NoiseScheduleConfig.from_dict(config, _LCM_SCHEDULE_DEFAULTS)
        original_steps = read_int(config, "original_inference_steps", 50, minimum=1)
        if original_steps > schedule.num_train_timesteps:
            raise SchedulerConfigError(f"scheduler config 'original_inference_steps' = {original_steps} must be at most "
                                       f"num_train_timesteps = {schedule.num_train_timesteps}")
        return cls(
            schedule=schedule,
            original_inference_steps=original_steps,
            timestep_scaling=read_float(config, "timestep_scaling", 10.0),
            set_alpha_to_one=read_bool(config, "set_alpha_to_one", True),
            clip_sample=read_bool(config, "clip_sample", False),
            clip_sample_range=read_float(config, "clip_sample_range", 1.0),
        )


@dataclass(frozen=True, eq=False)
class LCMState:
    """A planned LCM run (read-only arrays). LCM keeps no history, so ``step()`` returns this same state."""

    timesteps: np.ndarray  # (num_calls,) int64
    alpha_prod: np.ndarray  # (num_calls,) float32 — alpha-bar at each call's timestep
    alpha_prod_next: np.ndarray  # (num_calls,) float32 — alpha-bar the sample is re-noised to (unused on the last call)
    c_skip: np.ndarray  # (num_calls,) float32
    c_out: np.ndarray  # (num_calls,) float32

    @property
    def init_noise_sigma(self) -> float:
        """LCM starts from unit-variance noise."""
        return 1.0


class LCMScheduler:
    """diffusers' LCMScheduler in numpy over explicit :class:`LCMState` (implements ``Scheduler``)."""

    order = 1
    needs_noise = True
    min_inference_steps = 1

    def __init__(self, config: Mapping[str, Any]) -> None:
        """Build from a scheduler_config.json dict; raises SchedulerConfigError for bad or unsupported values."""
        self.config = LCMConfig.from_dict(config)
        self.num_train_timesteps: int = self.config.schedule.num_train_timesteps
        self.max_inference_steps: int = self.config.original_inference_steps
        self.alphas_cumprod = read_only(alphas_cumprod_from_betas(betas_from_config(self.config.schedule)))  # (T,)
        self.final_alpha_cumprod = _F32(1.0) if self.config.set_alpha_to_one else self.alphas_cumprod[0]

    def lcm_timesteps(self, num_inference_steps: int) -> np.ndarray:
        """diffusers' ``set_timesteps``: ``num_inference_steps`` timesteps evenly spaced by index over the distillation
        schedule (every k-th training timestep, k = T // original_inference_steps), descending (int64)."""
        original_steps = self.config.original_inference_steps
        k = self.num_train_timesteps // original_steps
        origin = (np.arange(1, original_steps + 1, dtype=np.int64) * k - 1)[::-1]  # (orig,) descending
        indices = np.floor(np.linspace(0, len(origin), num=num_inference_steps, endpoint=False)).astype(np.int64)  # (N,)
        return origin[indices]  # (N,)

    def start(self, num_inference_steps: int, begin_index: int = 0) -> LCMState:
        """Plan a run of ``num_inference_steps`` steps from step ``begin_index`` on (diffusers' img2img loop over
        ``timesteps[begin_index:]`` after ``set_begin_index``).

        Raises ValueError if ``num_inference_steps`` is not an int in 1..original_inference_steps or ``begin_index``
        is not in 0..num_inference_steps-1.
        """
        num_steps = check_num_inference_steps(num_inference_steps, self.min_inference_steps, self.max_inference_steps)
        if not isinstance(begin_index, (int, np.integer)) or isinstance(begin_index, bool) or not 0 <= begin_index < num_steps:
            raise ValueError(f"begin_index must be in 0..{num_steps - 1} for {num_steps} steps, got {begin_index!r}")
        all_timesteps = self.lcm_timesteps(num_steps)  # (N,)
        timesteps = all_timesteps[begin_index:].copy()  # (num_calls,)
        # Each call re-noises to the next planned timestep; the last one's value is never used (diffusers: itself).
        following = np.append(all_timesteps[begin_index + 1:], timesteps[-1])  # (num_calls,)
        alpha_prod_next = np.where(following >= 0, self.alphas_cumprod[np.maximum(following, 0)], self.final_alpha_cumprod)
        # diffusers: an int64 timestep times a Python float is a float32 tensor, and the scalings stay float32.
        scaled = timesteps.astype(_F32) * _F32(self.config.timestep_scaling)  # (num_calls,)
        denominator = scaled**2 + _SIGMA_DATA**2  # (num_calls,)
        return LCMState(
            timesteps=read_only(timesteps),
            alpha_prod=read_only(self.alphas_cumprod[timesteps]),
            alpha_prod_next=read_only(alpha_prod_next.astype(_F32)),
            c_skip=read_only((_SIGMA_DATA**2 / denominator).astype(_F32)),
            c_out=read_only((scaled / denominator ** _F32(0.5)).astype(_F32)),
        )

    def scale_model_input(self, state: LCMState, sample: np.ndarray, step_index: int) -> np.ndarray:
        """LCM feeds the U-Net the sample unscaled."""
        check_step_index(len(state.timesteps), step_index)
        return sample

    def add_noise(self, state: LCMState, original: np.ndarray, noise: np.ndarray, step_index: int) -> np.ndarray:
        """``original`` noised to alpha-bar at call ``step_index``'s timestep."""
        check_step_index(len(state.timesteps), step_index)
        return add_noise_at_alpha_prod(original, noise, state.alpha_prod[step_index])

    def step(
        self, state: LCMState, model_output: np.ndarray, step_index: int, sample: np.ndarray, noise: np.ndarray | None = None
    ) -> tuple[np.ndarray, LCMState]:
        """The consistency step of call ``step_index``: the denoised sample c_out * x_0 + c_skip * sample, re-noised to
        the next timestep with ``noise`` (standard normal, shaped like ``sample``; required on every call but the
        last, where the denoised sample is returned and ``noise`` is ignored)."""
        num_calls = len(state.timesteps)
        check_step_index(num_calls, step_index)
        xp = namespace_of(model_output, sample)
        model_output = xp.asarray(model_output, dtype=xp.float32)  # (B, C, H, W)
        sample = xp.asarray(sample, dtype=xp.float32)  # (B, C, H, W)
        if model_output.shape != sample.shape:
            raise ValueError(f"model_output shape {model_output.shape} != sample shape {sample.shape}")
        alpha_prod_t = state.alpha_prod[step_index]
        beta_prod_t = _F32(1) - alpha_prod_t
        half = _F32(0.5)
        if self.config.schedule.prediction_type == "epsilon":
            pred_original = (sample - beta_prod_t**half * model_output) / alpha_prod_t**half  # (B, C, H, W)
        else:
            pred_original = alpha_prod_t**half * sample - beta_prod_t**half * model_output  # (B, C, H, W)
        if self.config.clip_sample:
            limit = _F32(self.config.clip_sample_range)
            pred_original = xp.clip(pred_original, -limit, limit)  # (B, C, H, W)
        denoised = state.c_out[step_index] * pred_original + state.c_skip[step_index] * sample  # (B, C, H, W)
        if step_index == num_calls - 1:
            return denoised.astype(_F32), state
        alpha_prod_next = state.alpha_prod_next[step_index]
        noise = check_noise(noise, sample)  # (B, C, H, W)
        prev_sample = alpha_prod_next**half * denoised + (_F32(1) - alpha_prod_next) ** half * noise  # (B, C, H, W)
        return prev_sample.astype(_F32), state
