"""Sigma schedules and the state shared by the samplers that work in sigma (Euler, Euler ancestral, LMS, DPM-Solver).

Those samplers view the forward process as x_sigma = x_0 + sigma * eps with sigma = sqrt((1 - alpha-bar) / alpha-bar)
(Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative Models"). A run is planned as one
sigma per step plus the final one, and the U-Net is called at the training timestep of each step's sigma.

The maths follows diffusers' expressions and dtypes (float32 training sigmas, float64 interpolation rounded to
float32), so planned sigmas agree with diffusers' to float32 rounding.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from sdrt.engine.array_namespace import namespace_of
from .base import (
    NoiseScheduleConfig,
    check_step_index,
    read_bool,
    read_choice,
    read_optional_float,
    read_only,
    spaced_timesteps,
)

# rho of Karras et al.'s schedule: the value used in the paper, as diffusers uses it.
KARRAS_RHO = 7.0
# The sigma a run ends at: 0 (a clean sample) or the smallest training sigma.
FINAL_SIGMAS_TYPES = ("zero", "sigma_min")
# Options of diffusers' sigma samplers this engine does not implement, and the values it runs.
UNSUPPORTED_SIGMA_OPTIONS: Mapping[str, tuple[Any, ...]] = {
    "use_exponential_sigmas": (False,),
    "use_beta_sigmas": (False,),
    "rescale_betas_zero_snr": (False,),
}
# diffusers clamps sigma before taking its log when mapping a sigma back to a timestep.
_MIN_LOG_SIGMA_ARGUMENT = 1e-10

_F32 = np.float32


@dataclass(frozen=True)
class SigmaConfig:
    """The sigma-schedule fields of diffusers' Euler / LMS / DPM-Solver configs (defaults are diffusers')."""

    schedule: NoiseScheduleConfig
    use_karras_sigmas: bool = False
    # Karras bounds; None: the run's own largest and smallest sigma.
    sigma_min: float | None = None
    sigma_max: float | None = None
    final_sigmas_type: str = "zero"

    @classmethod
    def from_dict(cls, config: Mapping[str, Any], defaults: NoiseScheduleConfig) -> SigmaConfig:
        """Read a scheduler_config.json dict (``defaults``: the class's defaults for absent shared keys)."""
        return cls(
            schedule=NoiseScheduleConfig.from_dict(config, defaults),
            use_karras_sigmas=read_bool(config, "use_karras_sigmas", False),
            sigma_min=read_optional_float(config, "sigma_min"),
            sigma_max=read_optional_float(config, "sigma_max"),
            final_sigmas_type=read_choice(config, "final_sigmas_type", "zero", FINAL_SIGMAS_TYPES),
        )


# diffusers' defaults for the shared fields of its sigma samplers: timesteps spaced "linspace".
SIGMA_SCHEDULE_DEFAULTS = NoiseScheduleConfig(timestep_spacing="linspace")


def training_sigmas(alphas_cumprod: np.ndarray) -> np.ndarray:
    """sigma_t = sqrt((1 - alpha-bar_t) / alpha-bar_t) for every training timestep t, ascending in t (float32)."""
    alphas_cumprod = np.asarray(alphas_cumprod, dtype=_F32)  # (T,)
    return np.sqrt((_F32(1) - alphas_cumprod) / alphas_cumprod)  # (T,)


def descending_timesteps(config: NoiseScheduleConfig, num_inference_steps: int) -> np.ndarray:
    """The timesteps of an Euler / LMS run, first step first (float32): "linspace" ones are not rounded."""
    if config.timestep_spacing == "linspace":
        num_train = config.num_train_timesteps
        return np.linspace(0, num_train - 1, num_inference_steps, dtype=_F32)[::-1].copy()  # (N,)
    return spaced_timesteps(config, num_inference_steps)[::-1].astype(_F32)  # (N,)


def interpolate_sigmas(timesteps: np.ndarray, train_sigmas: np.ndarray) -> np.ndarray:
    """The sigma at each (possibly fractional) timestep, linear between training timesteps (float64, as diffusers)."""
    return np.interp(timesteps, np.arange(len(train_sigmas)), train_sigmas)  # (N,) float64


def karras_sigmas(sigma_min: float, sigma_max: float, num_inference_steps: int) -> np.ndarray:
    """Karras et al.'s schedule from ``sigma_max`` down to ``sigma_min``: evenly spaced in sigma^(1/rho) (float64)."""
    ramp = np.linspace(0, 1, num_inference_steps)  # (N,)
    min_inv_rho = sigma_min ** (1 / KARRAS_RHO)
    max_inv_rho = sigma_max ** (1 / KARRAS_RHO)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** KARRAS_RHO  # (N,)


def sigmas_to_timesteps(sigmas: np.ndarray, log_train_sigmas: np.ndarray) -> np.ndarray:
    """The fractional training timestep of each sigma, linear in log-sigma between neighbours (float64).

    Each sigma is placed between the last training timestep whose log-sigma is not above its own and the next one
    (clamped to the schedule's ends), in diffusers' dtypes: float32 log-sigmas, float64 weights.
    """
    log_sigma = np.log(np.maximum(sigmas, _MIN_LOG_SIGMA_ARGUMENT))  # (N,)
    dists = log_sigma - log_train_sigmas[:, np.newaxis]  # (T, N)
    low_idx = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_train_sigmas.shape[0] - 2)  # (N,)
    high_idx = low_idx + 1  # (N,)
    low, high = log_train_sigmas[low_idx], log_train_sigmas[high_idx]  # (N,) float32 each
    weight = np.clip((low - log_sigma) / (low - high), 0, 1)  # (N,)
    return (1 - weight) * low_idx + weight * high_idx  # (N,)


def final_sigma(config: SigmaConfig, train_sigmas: np.ndarray) -> np.float32:
    """The sigma a run ends at."""
    return _F32(0) if config.final_sigmas_type == "zero" else train_sigmas[0]


def with_final_sigma(sigmas: np.ndarray, last: np.float32) -> np.ndarray:
    """The step sigmas followed by the final one, as read-only float32 (N + 1,)."""
    return read_only(np.concatenate([sigmas, [last]]).astype(_F32))  # (N+1,)


def init_noise_sigma(sigmas: np.ndarray, timestep_spacing: str) -> float:
    """diffusers' scale of the initial noise for Euler and LMS: the largest sigma, or sqrt(sigma^2 + 1) with
    "leading" spacing (whose first timestep stops short of the last training one)."""
    max_sigma = _F32(np.max(sigmas))
    if timestep_spacing in ("linspace", "trailing"):
        return float(max_sigma)
    return float((max_sigma**2 + _F32(1)) ** _F32(0.5))


@dataclass(frozen=True, eq=False)
class SigmaState:
    """A planned run of a sigma sampler, from call ``begin_index`` of the full run on. Arrays are read-only;
    ``step()`` returns a new state.

    ``history`` is what a multistep sampler keeps of earlier calls (LMS: derivatives; DPM-Solver: its last
    data prediction), oldest first; single-step samplers keep nothing.
    """

    all_timesteps: np.ndarray  # (N,) U-Net timestep of every step of the full run
    sigmas: np.ndarray  # (N+1,) float32: the sigma of every step of the full run, then the final one
    begin_index: int
    init_noise_sigma: float
    history: tuple[np.ndarray, ...] = ()
    steps_taken: int = 0  # calls applied so far; the next step() must be for this index

    @property
    def timesteps(self) -> np.ndarray:
        """The U-Net timestep of each call of this run, in call order."""
        return self.all_timesteps[self.begin_index :]  # (num_calls,)

    @property
    def num_inference_steps(self) -> int:
        """Steps of the full run (the run started part-way makes fewer calls)."""
        return len(self.all_timesteps)

    def run_index(self, step_index: int) -> int:
        """The index in the full run of call ``step_index`` (diffusers' ``step_index``)."""
        return self.begin_index + step_index

    def sigma(self, step_index: int) -> np.float32:
        """The sigma of call ``step_index``'s input; ``step_index`` = number of calls gives the final sigma."""
        return self.sigmas[self.run_index(step_index)]


def start_sigma_run(
    timesteps: np.ndarray, sigmas: np.ndarray, begin_index: int, noise_sigma: float
) -> SigmaState:
    """The state of a run over ``timesteps`` (N,) and ``sigmas`` (N+1,) from step ``begin_index`` on."""
    num_steps = len(timesteps)
    if not isinstance(begin_index, (int, np.integer)) or isinstance(begin_index, bool) or not 0 <= begin_index < num_steps:
        raise ValueError(f"begin_index must be in 0..{num_steps - 1} for {num_steps} steps, got {begin_index!r}")
    return SigmaState(read_only(timesteps), sigmas, int(begin_index), noise_sigma)


def check_call(state: SigmaState, step_index: int) -> None:
    """ValueError unless ``step_index`` names a call of this run."""
    check_step_index(len(state.timesteps), step_index)


def check_step(state: SigmaState, model_output: np.ndarray, step_index: int, sample: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(model_output, sample) as float32 once the call is known to be the next one and the shapes agree."""
    check_call(state, step_index)
    if step_index != state.steps_taken:
        raise ValueError(f"step_index {step_index} out of order: this state expects step {state.steps_taken}")
    xp = namespace_of(model_output, sample)
    model_output = xp.asarray(model_output, dtype=xp.float32)  # (B, C, H, W)
    sample = xp.asarray(sample, dtype=xp.float32)  # (B, C, H, W)
    if model_output.shape != sample.shape:
        raise ValueError(f"model_output shape {model_output.shape} != sample shape {sample.shape}")
    return model_output, sample


def check_noise(noise: np.ndarray | None, sample: np.ndarray) -> np.ndarray:
    """The step noise of a stochastic sampler as float32; ValueError if missing or not shaped like ``sample``."""
    if noise is None:
        raise ValueError("this sampler is stochastic: step() needs standard-normal noise shaped like the sample")
    xp = namespace_of(noise, sample)
    noise = xp.asarray(noise, dtype=xp.float32)  # (B, C, H, W)
    if noise.shape != sample.shape:
        raise ValueError(f"noise shape {noise.shape} != sample shape {sample.shape}")
    return noise


def scale_by_sigma(sample: np.ndarray, sigma: np.float32) -> np.ndarray:
    """The U-Net input of Euler / LMS: the sample scaled to unit variance, x / sqrt(sigma^2 + 1)."""
    return (sample / ((sigma**2 + _F32(1)) ** _F32(0.5))).astype(_F32)  # (B, C, H, W)


def add_noise_at_sigma(original: np.ndarray, noise: np.ndarray, sigma: np.float32) -> np.ndarray:
    """x_sigma = x_0 + sigma * eps (float32), diffusers' ``add_noise`` of Euler and LMS."""
    return (original + noise * sigma).astype(_F32)  # (B, C, H, W)


def predicted_original(prediction_type: str, model_output: np.ndarray, sample: np.ndarray, sigma: np.float32) -> np.ndarray:
    """The denoised sample x_0 implied by the model output at ``sigma``, in diffusers' float32 operation order."""
    if prediction_type == "epsilon":
        return sample - sigma * model_output  # (B, C, H, W)
    # v = alpha eps - sigma_t x_0 in variance-preserving terms, rewritten for the sigma-scaled sample.
    return model_output * (-sigma / (sigma**2 + _F32(1)) ** _F32(0.5)) + sample / (sigma**2 + _F32(1))  # (B, C, H, W)
