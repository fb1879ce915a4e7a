"""Each model's own generation defaults (steps, guidance, sampler), derived from its checkpoint's configs at export and
recorded in the manifest, so that a few-step bundle runs without flags.

The rule, in order (docs/bundle.md states it for users):

1. LCM: the sampler the bundle runs by default (the export's `scheduler`, else the checkpoint's scheduler_config.json
   class) is LCMScheduler: 4 steps; guidance 8.5 (diffusers' LatentConsistencyModelPipeline default, given to the
   U-Net as the embedding of w = 7.5) for an LCM-distilled U-Net (`time_cond_proj_dim` in its config), else 1, no
   guidance (a U-Net distilled by LCM-LoRA, whose consistency steps already follow the prompt).
2. Turbo: an EulerDiscrete or EulerAncestralDiscrete scheduler with "trailing" timestep spacing, as SD-Turbo and
   SDXL-Turbo ship theirs (adversarial diffusion distillation; SD 1.x/2.x checkpoints space "leading" or "linspace"):
   1 step, guidance 0.
3. SDXL (two text encoders): diffusers' StableDiffusionXLPipeline defaults, 50 steps, guidance 5.
4. Otherwise diffusers' StableDiffusionPipeline defaults: 50 steps, guidance 7.5.
"""
from __future__ import annotations

from sdrt.engine.manifest import GenerationDefaults
from sdrt.engine.schedulers import SchedulerConfigError, scheduler_by_name
from sdrt.export.errors import ExportError
from sdrt.export.source_checkpoint import SourceCheckpoint

#: LCM's step count in diffusers' LatentConsistencyModelPipeline and the LCM-LoRA model cards
LCM_STEPS = 4
#: LatentConsistencyModelPipeline's default guidance_scale, for a U-Net that embeds it
LCM_DISTILLED_GUIDANCE = 8.5
#: LCM-LoRA runs without classifier-free guidance (the diffusers LCM-LoRA guide's guidance_scale=1)
LCM_LORA_GUIDANCE = 1.0
#: SD-Turbo's model card: one step, no guidance
TURBO_STEPS = 1
TURBO_GUIDANCE = 0.0
_TURBO_SCHEDULERS = ("EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler")
#: StableDiffusionXLPipeline's default guidance_scale
SDXL_GUIDANCE = 5.0


def model_defaults(source: SourceCheckpoint, scheduler: str | None = None) -> GenerationDefaults:
    """`source`'s defaults by the module's rule; `scheduler` (a SCHEDULER_NAMES name, e.g. "lcm" for a checkpoint
    with LCM-LoRA fused) is the sampler the bundle runs by default instead of the checkpoint's own. Raise ExportError
    for a name that cannot run the checkpoint's noise schedule."""
    try:
        sampler = scheduler_by_name(scheduler or "default", source.scheduler_config)
    except (SchedulerConfigError, ValueError) as exc:
        raise ExportError(f"scheduler {scheduler!r} cannot run {source.path}'s scheduler config: {exc}") from None
    class_name = type(sampler).__name__
    if class_name == "LCMScheduler":
        distilled = source.unet_time_cond_proj_dim is not None
        return GenerationDefaults(LCM_STEPS, LCM_DISTILLED_GUIDANCE if distilled else LCM_LORA_GUIDANCE, scheduler)
    if class_name in _TURBO_SCHEDULERS and source.scheduler_config.get("timestep_spacing") == "trailing":
        return GenerationDefaults(TURBO_STEPS, TURBO_GUIDANCE, scheduler)
    if source.is_sdxl:
        return GenerationDefaults(guidance_scale=SDXL_GUIDANCE, scheduler=scheduler)
    return GenerationDefaults(scheduler=scheduler)
