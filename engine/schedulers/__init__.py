"""Samplers over explicit state, numpy ports of diffusers' schedulers, picked by scheduler_config.json."""
from __future__ import annotations

import logging
from typing import Any, Callable, Mapping

from .base import (
    BETA_SCHEDULES,
    PREDICTION_TYPES,
    TIMESTEP_SPACINGS,
    NoiseScheduleConfig,
    Scheduler,
    SchedulerConfigError,
    SchedulerState,
    alphas_cumprod,
    alphas_cumprod_from_betas,
    betas_from_config,
    check_num_inference_steps,
    spaced_timesteps,
)
from .pndm import PNDMConfig, PNDMScheduler, PNDMState, PNDMUpdate

__all__ = [
    "BETA_SCHEDULES",
    "PREDICTION_TYPES",
    "TIMESTEP_SPACINGS",
    "NoiseScheduleConfig",
    "PNDMConfig",
    "PNDMScheduler",
    "PNDMState",
    "SCHEDULERS",
    "Scheduler",
    "SchedulerConfigError",
    "SchedulerState",
    "PNDMUpdate",
    "alphas_cumprod",
    "alphas_cumprod_from_betas",
    "betas_from_config",
    "check_num_inference_steps",
    "scheduler_from_config",
    "spaced_timesteps",
]

logger = logging.getLogger(__name__)

# diffusers class name -> implementation; each takes the scheduler_config.json dict.
SCHEDULERS: Mapping[str, Callable[[Mapping[str, Any]], Scheduler[Any]]] = {
    "PNDMScheduler": PNDMScheduler,
}
_FALLBACK = "PNDMScheduler"


def scheduler_from_config(config: Mapping[str, Any]) -> Scheduler[Any]:
    """The scheduler named by ``config["_class_name"]``, built from the same dict.

    A class this engine lacks falls back, with a warning, to PNDM over the same config (its noise
    schedule and any PNDM keys it has). Raises SchedulerConfigError for values the chosen
    scheduler cannot run.
    """
    class_name = config.get("_class_name")
    factory = SCHEDULERS.get(class_name) if isinstance(class_name, str) else None
    if factory is None:
        logger.warning(
            "scheduler %r is not implemented; using %s over the same noise-schedule config", class_name, _FALLBACK
        )
        factory = SCHEDULERS[_FALLBACK]
    return factory(config)
