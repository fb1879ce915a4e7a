"""Samplers over explicit state, numpy ports of diffusers' schedulers, picked by scheduler_config.json or by name.

Every sampler is built from the checkpoint's scheduler_config.json dict, as diffusers'
``XScheduler.from_config(pipe.scheduler.config)`` builds it: switching sampler keeps the checkpoint's noise schedule
(betas, prediction type, timestep spacing, ...) and ignores the keys the new class does not know.
"""
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
from sdrt.engine.errors import InvalidArgumentError

from .ddim import DDIMConfig, DDIMScheduler, DDIMState
from .dpm_solver import DPMSolverConfig, DPMSolverMultistepScheduler
from .euler import EulerDiscreteScheduler
from .euler_ancestral import EulerAncestralDiscreteScheduler
from .lcm import LCMConfig, LCMScheduler, LCMState
from .lms import LMSDiscreteScheduler
from .pndm import PNDMConfig, PNDMScheduler, PNDMState, PNDMUpdate
from .sigmas import SigmaConfig, SigmaState

__all__ = [
    "BETA_SCHEDULES",
    "DDIMConfig",
    "DDIMScheduler",
    "DDIMState",
    "DEFAULT_SCHEDULER",
    "DPMSolverConfig",
    "DPMSolverMultistepScheduler",
    "EulerAncestralDiscreteScheduler",
    "EulerDiscreteScheduler",
    "LCMConfig",
    "LCMScheduler",
    "LCMState",
    "LMSDiscreteScheduler",
    "SCHEDULER_NAMES",
    "SigmaConfig",
    "SigmaState",
    "PREDICTION_TYPES",
    "TIMESTEP_SPACINGS",
    "check_scheduler_name",
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
    "scheduler_by_name",
    "scheduler_from_config",
    "spaced_timesteps",
]

logger = logging.getLogger(__name__)

# diffusers class name -> implementation; each takes the scheduler_config.json dict.
SCHEDULERS: Mapping[str, Callable[[Mapping[str, Any]], Scheduler[Any]]] = {
    "PNDMScheduler": PNDMScheduler,
    "DDIMScheduler": DDIMScheduler,
    "EulerDiscreteScheduler": EulerDiscreteScheduler,
    "EulerAncestralDiscreteScheduler": EulerAncestralDiscreteScheduler,
    "DPMSolverMultistepScheduler": DPMSolverMultistepScheduler,
    "LMSDiscreteScheduler": LMSDiscreteScheduler,
    "LCMScheduler": LCMScheduler,
}
_FALLBACK = "PNDMScheduler"

#: The name of the checkpoint's own scheduler (its scheduler_config.json ``_class_name``).
DEFAULT_SCHEDULER = "default"

# User-facing name -> (diffusers class name, config keys the name fixes over the checkpoint's).
_NAMED: Mapping[str, tuple[str, Mapping[str, Any]]] = {
    "pndm": ("PNDMScheduler", {}),
    "ddim": ("DDIMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "euler-ancestral": ("EulerAncestralDiscreteScheduler", {}),
    "dpm++2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": False}),
    "dpm++2m-karras": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True}),
    "lms": ("LMSDiscreteScheduler", {}),
    "lcm": ("LCMScheduler", {}),
}
#: Every name `scheduler_by_name` (the pipeline's ``scheduler=``, the CLI's ``--scheduler``) accepts.
SCHEDULER_NAMES: tuple[str, ...] = (DEFAULT_SCHEDULER, *_NAMED)


def check_scheduler_name(name: object) -> None:
    """InvalidArgumentError("scheduler", ...) listing SCHEDULER_NAMES unless ``name`` is one of them."""
    if not isinstance(name, str) or name not in SCHEDULER_NAMES:
        raise InvalidArgumentError("scheduler", f"must be one of {', '.join(SCHEDULER_NAMES)}; got {name!r}")


def scheduler_by_name(name: str, config: Mapping[str, Any]) -> Scheduler[Any]:
    """The sampler called ``name`` (one of SCHEDULER_NAMES) over the checkpoint's scheduler_config.json ``config``.

    "default" is the checkpoint's own class (see `scheduler_from_config`); the others keep the checkpoint's noise
    schedule, "dpm++2m" and "dpm++2m-karras" also fix the solver (DPM-Solver++, second order) and the Karras switch.
    Raises InvalidArgumentError("scheduler", ...) for an unknown name, SchedulerConfigError for config values the
    sampler cannot run.
    """
    check_scheduler_name(name)
    if name == DEFAULT_SCHEDULER:
        return scheduler_from_config(config)
    class_name, fixed = _NAMED[name]
    return SCHEDULERS[class_name]({**config, **fixed})


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
