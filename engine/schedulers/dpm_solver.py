"""DPM-Solver++ multistep sampling (Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion
Probabilistic Models"), with or without Karras sigmas.

numpy port of diffusers' ``DPMSolverMultistepScheduler`` with ``algorithm_type="dpmsolver++"`` over explicit
:class:`SigmaState`. Each call turns the model output into a data prediction x_0 and solves the ODE in
lambda = log(alpha_t / sigma_t) exactly for the part linear in x: first order (DDIM-like) at the first call of a run
and at the last steps, second order (from this and the previous x_0) otherwise. The state keeps the previous x_0.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Mapping

import numpy as np

from .base import (
    alphas_cumprod,
    check_num_inference_steps,
    read_bool,
    read_choice,
    read_int,
    read_only,
    refuse_unsupported,
    spaced_timesteps,
)
from .sigmas import (
    SIGMA_SCHEDULE_DEFAULTS,
    UNSUPPORTED_SIGMA_OPTIONS,
    SigmaConfig,
    SigmaState,
    check_call,
    check_step,
    final_sigma,
    interpolate_sigmas,
    karras_sigmas,
    sigmas_to_timesteps,
    start_sigma_run,
    training_sigmas,
    with_final_sigma,
)

SOLVER_ORDERS = (1, 2)
SOLVER_TYPES = ("midpoint", "heun")
# With lower_order_final, runs shorter than this end with lower-order steps (diffusers' stabilisation for few steps).
_LOWER_ORDER_FINAL_BELOW_STEPS = 15
_F32 = np.float32

_DPM_OPTIONS: Mapping[str, tuple[Any, ...]] = {
    **UNSUPPORTED_SIGMA_OPTIONS,
    "algorithm_type": ("dpmsolver++",),
    "thresholding": (False,),
    "variance_type": (None,),
    "use_lu_lambdas": (False,),
    "use_flow_sigmas": (False,),
    "use_dynamic_shifting": (False,),
    "lambda_min_clipped": (-float("inf"),),
}


@dataclass(frozen=True)
class DPMSolverConfig:
    """A DPMSolverMultistepScheduler config: the sigma-schedule fields plus the solver's own (diffusers' defaults)."""

    sigmas: SigmaConfig
    solver_order: int = 2
    solver_type: str = "midpoint"
    lower_order_final: bool = True
    euler_at_final: bool = False

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> DPMSolverConfig:
        """Read a scheduler_config.json dict; raises SchedulerConfigError for bad or unsupported values."""
        solver_order = read_int(config, "solver_order", 2, minimum=1)
        refuse_unsupported({"solver_order": solver_order}, "DPMSolverMultistepScheduler", {"solver_order": SOLVER_ORDERS})
        return cls(
            sigmas=SigmaConfig.from_dict(config, SIGMA_SCHEDULE_DEFAULTS),
            solver_order=solver_order,
            solver_type=read_choice(config, "solver_type", "midpoint", SOLVER_TYPES),
            lower_order_final=read_bool(config, "lower_order_final", True),
            euler_at_final=read_bool(config, "euler_at_final", False),
        )


class DPMSolverMultistepScheduler:
    """diffusers' DPMSolverMultistepScheduler (DPM-Solver++, order 1 or 2) in numpy over explicit
    :class:`SigmaState` (implements ``Scheduler``)."""

    order = 1
    needs_noise = False

    def __init__(self, config: Mapping[str, Any]) -> None:
        """Build from a scheduler_config.json dict; raises SchedulerConfigError for bad or unsupported values
        (the SDE and non-"++" variants, 3rd order, thresholding, ...)."""
        refuse_unsupported(config, type(self).__name__, _DPM_OPTIONS)
        self.config = DPMSolverConfig.from_dict(config)
        self.num_train_timesteps: int = self.config.sigmas.schedule.num_train_timesteps
        # timesteps and sigmas are interpolated within the training schedule, for any count up to its length
        self.min_inference_steps, self.max_inference_steps = 1, self.num_train_timesteps

    def start(self, num_inference_steps: int, begin_index: int = 0) -> SigmaState:
        """Plan a run of ``num_inference_steps`` steps from step ``begin_index`` on (diffusers' ``set_begin_index``).

        Raises ValueError if ``num_inference_steps`` is not an int in 1..max_inference_steps or ``begin_index`` is
        not in 0..num_inference_steps-1.
        """
        num_steps = check_num_inference_steps(num_inference_steps, self.min_inference_steps, self.max_inference_steps)
        config = self.config.sigmas
        train_sigmas = training_sigmas(alphas_cumprod(config.schedule))  # (T,)
        if config.use_karras_sigmas:
            sigma_min = train_sigmas[0].item() if config.sigma_min is None else config.sigma_min
            sigma_max = train_sigmas[-1].item() if config.sigma_max is None else config.sigma_max
            sigmas = karras_sigmas(sigma_min, sigma_max, num_steps)  # (N,)
            timesteps = sigmas_to_timesteps(sigmas, np.log(train_sigmas))  # (N,) fractional
            if config.schedule.beta_schedule != "squaredcos_cap_v2":
                timesteps = timesteps.round()
        else:
            timesteps = _dpm_timesteps(config, num_steps)  # (N,)
            sigmas = interpolate_sigmas(timesteps, train_sigmas)  # (N,)
        sigmas = with_final_sigma(sigmas, final_sigma(config, train_sigmas))  # (N+1,)
        # DPM-Solver works on the variance-preserving sample: the initial noise is unit variance.
        return start_sigma_run(timesteps.astype(np.int64), sigmas, begin_index, 1.0)

    def scale_model_input(self, state: SigmaState, sample: np.ndarray, step_index: int) -> np.ndarray:
        """DPM-Solver feeds the U-Net the sample unscaled."""
        check_call(state, step_index)
        return sample

    def add_noise(self, state: SigmaState, original: np.ndarray, noise: np.ndarray, step_index: int) -> np.ndarray:
        """alpha_t * ``original`` + sigma_t * ``noise`` at call ``step_index``'s sigma."""
        check_call(state, step_index)
        alpha_t, sigma_t = _alpha_sigma(state.sigma(step_index))
        return (alpha_t * original + sigma_t * noise).astype(_F32)  # (B, C, H, W)

    def step(
        self, state: SigmaState, model_output: np.ndarray, step_index: int, sample: np.ndarray, noise: np.ndarray | None = None
    ) -> tuple[np.ndarray, SigmaState]:
        """One DPM-Solver++ update from call ``step_index``'s sigma to the next; deterministic, ``noise`` is ignored."""
        model_output, sample = check_step(state, model_output, step_index, sample)
        data_prediction = read_only(self._data_prediction(state, model_output, sample, step_index))  # (B, C, H, W)
        # As diffusers: the first call of a run (part-way ones included) and the final steps are first order.
        lower_order_nums = min(state.steps_taken, self.config.solver_order)
        if self.config.solver_order == 1 or lower_order_nums < 1 or self._lower_order_final(state, step_index):
            prev_sample = self._first_order_update(state, step_index, data_prediction, sample)
        else:
            prev_sample = self._second_order_update(state, step_index, data_prediction, state.history[-1], sample)
        history = (data_prediction,)[: self.config.solver_order - 1]
        return prev_sample.astype(_F32), replace(state, history=history, steps_taken=step_index + 1)

    def _lower_order_final(self, state: SigmaState, step_index: int) -> bool:
        """Whether call ``step_index`` is the full run's last step and diffusers takes it at first order."""
        config = self.config
        is_last = state.run_index(step_index) == state.num_inference_steps - 1
        short_run = config.lower_order_final and state.num_inference_steps < _LOWER_ORDER_FINAL_BELOW_STEPS
        return is_last and (config.euler_at_final or short_run or config.sigmas.final_sigmas_type == "zero")

    def _data_prediction(self, state: SigmaState, model_output: np.ndarray, sample: np.ndarray, step_index: int) -> np.ndarray:
        """x_0 from the model output (epsilon or v) at call ``step_index``'s sigma."""
        alpha_t, sigma_t = _alpha_sigma(state.sigma(step_index))
        if self.config.sigmas.schedule.prediction_type == "epsilon":
            return (sample - sigma_t * model_output) / alpha_t  # (B, C, H, W)
        return alpha_t * sample - sigma_t * model_output  # (B, C, H, W)

    def _first_order_update(self, state: SigmaState, step_index: int, data_prediction: np.ndarray, sample: np.ndarray) -> np.ndarray:
        alpha_t, sigma_t = _alpha_sigma(state.sigma(step_index + 1))
        alpha_s, sigma_s = _alpha_sigma(state.sigma(step_index))
        h = _log_snr(alpha_t, sigma_t) - _log_snr(alpha_s, sigma_s)
        return (sigma_t / sigma_s) * sample - (alpha_t * (np.exp(-h) - _F32(1))) * data_prediction  # (B, C, H, W)

    def _second_order_update(
        self, state: SigmaState, step_index: int, data_prediction: np.ndarray, previous: np.ndarray, sample: np.ndarray
    ) -> np.ndarray:
        """Multistep second order from this call's x_0 (m0) and the previous call's (m1)."""
        alpha_t, sigma_t = _alpha_sigma(state.sigma(step_index + 1))
        alpha_s0, sigma_s0 = _alpha_sigma(state.sigma(step_index))
        alpha_s1, sigma_s1 = _alpha_sigma(state.sigma(step_index - 1))
        lambda_t, lambda_s0, lambda_s1 = _log_snr(alpha_t, sigma_t), _log_snr(alpha_s0, sigma_s0), _log_snr(alpha_s1, sigma_s1)
        h, h_0 = lambda_t - lambda_s0, lambda_s0 - lambda_s1
        r0 = h_0 / h
        d0, d1 = data_prediction, (_F32(1) / r0) * (data_prediction - previous)  # (B, C, H, W) each
        exp_term = np.exp(-h) - _F32(1)
        base = (sigma_t / sigma_s0) * sample - (alpha_t * exp_term) * d0  # (B, C, H, W)
        if self.config.solver_type == "midpoint":
            return base - _F32(0.5) * (alpha_t * exp_term) * d1  # (B, C, H, W)
        return base + (alpha_t * (exp_term / h + _F32(1))) * d1  # (B, C, H, W)


def _dpm_timesteps(config: SigmaConfig, num_inference_steps: int) -> np.ndarray:
    """DPM-Solver's timesteps, first step first: "linspace" and "leading" space N + 1 points and drop the lowest."""
    if config.schedule.timestep_spacing == "trailing":
        return spaced_timesteps(config.schedule, num_inference_steps)[::-1].copy()  # (N,)
    return spaced_timesteps(config.schedule, num_inference_steps + 1)[1:][::-1].copy()  # (N,)


def _alpha_sigma(sigma: np.float32) -> tuple[np.float32, np.float32]:
    """(alpha_t, sigma_t) of the variance-preserving process at Karras sigma ``sigma``."""
    alpha_t = _F32(1) / ((sigma**2 + _F32(1)) ** _F32(0.5))
    return alpha_t, sigma * alpha_t


def _log_snr(alpha_t: np.float32, sigma_t: np.float32) -> np.float32:
    """lambda = log(alpha_t) - log(sigma_t); +inf at sigma 0, the end of a run to a clean sample."""
    with np.errstate(divide="ignore"):
        return np.log(alpha_t) - np.log(sigma_t)
