"""Linear multistep sampling in sigma (Karras et al. 2022; k-diffusion's ``sample_lms``).

numpy port of diffusers' ``LMSDiscreteScheduler`` over explicit :class:`SigmaState`. Each call turns the model
output into the ODE derivative d = (x - x_0) / sigma and moves the sample by the integral, from this call's sigma
to the next, of the polynomial through the last (up to 4) derivatives. diffusers integrates each Lagrange basis
polynomial numerically with scipy; here it is integrated exactly (it is a polynomial), which agrees to float32
rounding and needs no scipy at run time.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any, Mapping

import numpy as np

from .base import read_only, refuse_unsupported
from .euler import DiscreteSigmaSampler
from .sigmas import (
    SIGMA_SCHEDULE_DEFAULTS,
    UNSUPPORTED_SIGMA_OPTIONS,
    SigmaConfig,
    SigmaState,
    check_step,
    predicted_original,
)

# diffusers' default `order` of LMSDiscreteScheduler.step: the polynomial goes through up to 4 derivatives.
LMS_ORDER = 4


def lms_coefficients(sigmas: np.ndarray, run_index: int, order: int) -> tuple[float, ...]:
    """The weights of the last ``order`` derivatives (newest first) for the step from ``sigmas[run_index]`` to
    ``sigmas[run_index + 1]``: the integral over that interval of each Lagrange basis polynomial on the sigmas of
    those derivatives' steps (float64)."""
    nodes = np.asarray(sigmas[run_index - order + 1 : run_index + 1][::-1], dtype=np.float64)  # (order,) newest first
    lower, upper = float(sigmas[run_index]), float(sigmas[run_index + 1])
    weights = []
    for j, node in enumerate(nodes):
        others = np.delete(nodes, j)  # (order-1,)
        basis = np.atleast_1d(np.poly(others)) / np.prod(node - others)  # coefficients, highest power first
        antiderivative = np.polyint(basis)
        weights.append(float(np.polyval(antiderivative, upper) - np.polyval(antiderivative, lower)))
    return tuple(weights)


class LMSDiscreteScheduler(DiscreteSigmaSampler):
    """diffusers' LMSDiscreteScheduler in numpy over explicit :class:`SigmaState` (implements ``Scheduler``)."""

    needs_noise = False

    def __init__(self, config: Mapping[str, Any]) -> None:
        """Build from a scheduler_config.json dict; raises SchedulerConfigError for bad or unsupported values.

        diffusers' LMS reads no sigma_min / sigma_max / final_sigmas_type: with Karras sigmas the run's own ends
        bound the schedule, and it ends at sigma 0.
        """
        refuse_unsupported(config, type(self).__name__, UNSUPPORTED_SIGMA_OPTIONS)
        full = SigmaConfig.from_dict(config, SIGMA_SCHEDULE_DEFAULTS)
        self.config = SigmaConfig(full.schedule, use_karras_sigmas=full.use_karras_sigmas)
        self.num_train_timesteps: int = self.config.schedule.num_train_timesteps

    def step(
        self, state: SigmaState, model_output: np.ndarray, step_index: int, sample: np.ndarray, noise: np.ndarray | None = None
    ) -> tuple[np.ndarray, SigmaState]:
        """One linear multistep update from call ``step_index``'s sigma to the next; deterministic, ``noise`` is ignored.

        As in diffusers, the polynomial's order counts the steps of the full run so far (up to 4) while only this
        run's derivatives are summed: a run started part-way begins with fewer terms than its order.
        """
        model_output, sample = check_step(state, model_output, step_index, sample)
        sigma = state.sigma(step_index)
        denoised = predicted_original(self.config.schedule.prediction_type, model_output, sample, sigma)  # (B, C, H, W)
        derivative = read_only((sample - denoised) / sigma)  # (B, C, H, W)
        history = (*state.history, derivative)[-LMS_ORDER:]
        run_index = state.run_index(step_index)
        weights = lms_coefficients(state.sigmas, run_index, min(run_index + 1, LMS_ORDER))
        # diffusers sums float32 products in this order, newest derivative first.
        update = sum(np.float32(weight) * past for weight, past in zip(weights, reversed(history)))  # (B, C, H, W)
        prev_sample = sample + update  # (B, C, H, W)
        return prev_sample.astype(np.float32), replace(state, history=history, steps_taken=step_index + 1)
