"""Random-weight diffusers checkpoints with Stable Diffusion's (1.x/2.x, XL) architecture.

Model hubs are unreachable from our machines, and compute does not depend on weight values, so tests, the embedded
default model and benchmarks run on checkpoints built here. They are laid out exactly like real SD checkpoints
(`model_index.json`, one folder per component, `tokenizer/vocab.json` + `merges.txt` with the real CLIP vocabulary),
so the exporter and runtime never see anything a real checkpoint would not give them.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import logging
import shutil
from pathlib import Path

import safetensors.torch
import torch
import diffusers
from diffusers import (
    AutoencoderKL,
    PNDMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
from transformers import (
    CLIPConfig,
    CLIPImageProcessor,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPVisionConfig,
)

from sdrt.engine.atomic import atomic_directory
from sdrt.export.clip_vocab import BOS_TOKEN, EOS_TOKEN, MODEL_MAX_LENGTH, clip_vocab, clip_merges, write_clip_tokenizer

logger = logging.getLogger(__name__)

CLIP_VOCAB_SIZE = 49408
# The scheduler every SD 1.x checkpoint ships (runwayml/stable-diffusion-v1-5 scheduler_config.json).
SD15_SCHEDULER_CONFIG = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "clip_sample": False,
    "trained_betas": None,
}
# The scheduler LCM-distilled SD 1.5 checkpoints ship (SimianLuo/LCM_Dreamshaper_v7 scheduler_config.json).
LCM_SCHEDULER_CONFIG = {
    "_class_name": "LCMScheduler",
    **{key: SD15_SCHEDULER_CONFIG[key] for key in ("beta_start", "beta_end", "beta_schedule", "num_train_timesteps",
                                                   "steps_offset", "clip_sample", "trained_betas")},
    "original_inference_steps": 50,
    "prediction_type": "epsilon",
    "set_alpha_to_one": True,
    "timestep_scaling": 10.0,
}
# A Turbo checkpoint's: Euler ancestral over trailing timesteps, whose first step starts at the last training timestep
# (stabilityai/sdxl-turbo scheduler_config.json).
TURBO_SCHEDULER_CONFIG = {
    "_class_name": "EulerAncestralDiscreteScheduler",
    **{key: SD15_SCHEDULER_CONFIG[key] for key in ("beta_start", "beta_end", "beta_schedule", "num_train_timesteps",
                                                   "steps_offset", "trained_betas")},
    "prediction_type": "epsilon",
    "timestep_spacing": "trailing",
}

# The scheduler SDXL base ships (stabilityai/stable-diffusion-xl-base-1.0 scheduler_config.json).
SDXL_SCHEDULER_CONFIG = {
    "_class_name": "EulerDiscreteScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
    "use_karras_sigmas": False,
}
# SDXL-Turbo's: SDXL base's with Euler ancestral over trailing timesteps (stabilityai/sdxl-turbo scheduler_config.json).
SDXL_TURBO_SCHEDULER_CONFIG = {**SDXL_SCHEDULER_CONFIG, "_class_name": "EulerAncestralDiscreteScheduler",
                               "timestep_spacing": "trailing"}

# feature_extractor/preprocessor_config.json exactly as SD 1.x checkpoints ship it (CLIP ViT-L/14 preprocessing).
SD_PREPROCESSOR_CONFIG = {
    "crop_size": 224,
    "do_center_crop": True,
    "do_convert_rgb": True,
    "do_normalize": True,
    "do_resize": True,
    "feature_extractor_type": "CLIPFeatureExtractor",
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "resample": 3,
    "size": 224,
}
CLIP_IMAGE_SIZE = 224
# Random images sit far below this cosine similarity to random concepts, so a random checker flags nothing unless a
# test sets its thresholds.
RANDOM_CHECKER_THRESHOLD = 1.0


@dataclasses.dataclass(frozen=True)
class SafetyCheckerArch:
    """The CLIP vision tower and projection of diffusers' StableDiffusionSafetyChecker."""

    hidden_size: int
    layers: int
    heads: int
    intermediate_size: int
    patch_size: int
    projection_dim: int


@dataclasses.dataclass(frozen=True)
class CheckpointArch:
    """The shape of a Stable Diffusion checkpoint: every size the exporter and runtime must read, not assume."""

    unet_block_out_channels: tuple[int, ...]
    unet_layers_per_block: int
    unet_attention_head_dim: int
    unet_sample_size: int
    unet_use_linear_projection: bool
    latent_channels: int
    vae_block_out_channels: tuple[int, ...]
    vae_layers_per_block: int
    vae_scaling_factor: float
    text_hidden_size: int
    text_layers: int
    text_heads: int
    text_intermediate_size: int
    norm_num_groups: int
    pad_token: str
    safety_checker: SafetyCheckerArch | None
    #: True: an inpainting U-Net, which takes the mask and the masked image's latents besides the latents
    #: (2 * latent_channels + 1 input channels, as SD inpainting checkpoints)
    unet_inpainting: bool = False
    #: an LCM-distilled U-Net's guidance-scale embedding size (its `timestep_cond` input); None: no such input
    unet_time_cond_proj_dim: int | None = None
    #: the scheduler_config.json it ships ("_class_name" picks the class); None: SD 1.5's PNDM
    scheduler_config: dict | None = None

    @property
    def unet_in_channels(self) -> int:
        return 2 * self.latent_channels + 1 if self.unet_inpainting else self.latent_channels


ARCHES: dict[str, CheckpointArch | SdxlArch] = {
    # Stable Diffusion 1.5's exact architecture: U-Net 859.5 M, VAE 83.7 M, CLIP ViT-L/14 text encoder 123.1 M.
    "sd15": CheckpointArch(
        unet_block_out_channels=(320, 640, 1280, 1280),
        unet_layers_per_block=2,
        unet_attention_head_dim=8,
        unet_sample_size=64,
        unet_use_linear_projection=False,
        latent_channels=4,
        vae_block_out_channels=(128, 256, 512, 512),
        vae_layers_per_block=2,
        vae_scaling_factor=0.18215,
        text_hidden_size=768,
        text_layers=12,
        text_heads=12,
        text_intermediate_size=3072,
        norm_num_groups=32,
        pad_token=EOS_TOKEN,
        # CLIP ViT-L/14 vision tower: ~304 M parameters.
        safety_checker=SafetyCheckerArch(hidden_size=1024, layers=24, heads=16, intermediate_size=4096, patch_size=14, projection_dim=768),
    ),
    # SD 1.x layout scaled down: 3 VAE downsamples (scale factor 8), cross-attention in all but the last block.
    "tiny": CheckpointArch(
        unet_block_out_channels=(32, 64),
        unet_layers_per_block=1,
        unet_attention_head_dim=8,
        unet_sample_size=32,
        unet_use_linear_projection=False,
        latent_channels=4,
        vae_block_out_channels=(32, 32, 32, 32),
        vae_layers_per_block=1,
        vae_scaling_factor=0.18215,
        text_hidden_size=32,
        text_layers=2,
        text_heads=4,
        text_intermediate_size=37,
        norm_num_groups=16,
        pad_token=EOS_TOKEN,
        safety_checker=SafetyCheckerArch(hidden_size=32, layers=2, heads=4, intermediate_size=37, patch_size=32, projection_dim=16),
    ),
    # The embedded demo model (sdrt.demo.train): 64x64 px images through a 2-downsample VAE (scale factor 4) to 16x16
    # latents, cross-attention at 16x16, 8x8 and 4x4, a 2-layer CLIP text encoder over the real vocabulary. The U-Net
    # goes down to 2x2, one cell per quadrant of the image, where "top left" has a place to attend from. Its VAE
    # scaling factor is measured on the training latents; the value here only serves random checkpoints of this shape.
    "demo": CheckpointArch(
        unet_block_out_channels=(64, 128, 128, 96),
        unet_layers_per_block=1,
        unet_attention_head_dim=4,
        unet_sample_size=16,
        unet_use_linear_projection=False,
        latent_channels=4,
        vae_block_out_channels=(32, 64, 64),
        vae_layers_per_block=1,
        vae_scaling_factor=1.0,
        text_hidden_size=64,
        text_layers=2,
        text_heads=4,
        text_intermediate_size=256,
        norm_num_groups=32,
        pad_token=EOS_TOKEN,
        safety_checker=None,
    ),
    # Deliberately different everywhere a hard-coded SD 1.5 size could hide: three U-Net blocks, other head dims,
    # a 2-downsample VAE (scale factor 4), 8 latent channels, another scaling factor, SD 2's "!" pad token and
    # linear attention projections.
    "tiny-alt": CheckpointArch(
        unet_block_out_channels=(16, 32, 48),
        unet_layers_per_block=2,
        unet_attention_head_dim=4,
        unet_sample_size=16,
        unet_use_linear_projection=True,
        latent_channels=8,
        vae_block_out_channels=(16, 32, 32),
        vae_layers_per_block=2,
        vae_scaling_factor=0.5,
        text_hidden_size=48,
        text_layers=3,
        text_heads=6,
        text_intermediate_size=64,
        norm_num_groups=8,
        pad_token="!",
        safety_checker=SafetyCheckerArch(hidden_size=48, layers=1, heads=4, intermediate_size=64, patch_size=28, projection_dim=24),
    ),
}


@dataclasses.dataclass(frozen=True)
class TextEncoderArch:
    """A CLIP text encoder (with a projection of its pooled state, which SDXL's second encoder uses)."""

    hidden_size: int
    layers: int
    heads: int
    intermediate_size: int
    hidden_act: str
    projection_dim: int


@dataclasses.dataclass(frozen=True)
class SdxlArch:
    """The shape of an SDXL base checkpoint: two text encoders whose penultimate hidden states are concatenated into
    the U-Net's context, and a U-Net conditioned on the second's pooled embedding and 6 size conditions
    (addition_embed_type "text_time"). SDXL ships no safety checker.

    An SDXL refiner's (`requires_aesthetics_score`): the second text encoder only (`text_encoder` None), and 5
    conditions, an aesthetic score in place of the target size, as diffusers' StableDiffusionXLImg2ImgPipeline
    saves stabilityai/stable-diffusion-xl-refiner-1.0."""

    unet_block_out_channels: tuple[int, ...]
    unet_layers_per_block: int
    unet_attention_head_dim: tuple[int, ...]  # heads per level (diffusers' legacy name, as SDXL's config has it)
    unet_transformer_layers_per_block: tuple[int, ...]
    unet_cross_attention_levels: tuple[bool, ...]  # which levels have cross-attention blocks
    unet_sample_size: int
    addition_time_embed_dim: int
    latent_channels: int
    vae_block_out_channels: tuple[int, ...]
    vae_layers_per_block: int
    vae_scaling_factor: float
    text_encoder: TextEncoderArch | None  # None: a refiner's, which has the second only
    text_encoder_2: TextEncoderArch
    norm_num_groups: int
    pad_token_2: str = "!"  # the second tokenizer pads with "!" (id 0), the first with the end-of-text token
    safety_checker: None = None
    requires_aesthetics_score: bool = False  # a refiner: model_index.json says so, its U-Net takes 5 conditions
    #: the scheduler_config.json it ships ("_class_name" picks the class); None: SDXL base's Euler
    scheduler_config: dict | None = None

    @property
    def cross_attention_dim(self) -> int:
        return (self.text_encoder.hidden_size if self.text_encoder else 0) + self.text_encoder_2.hidden_size

    @property
    def time_ids(self) -> int:
        # original height and width, crop top and left, then target height and width, or a refiner's aesthetic score
        return 5 if self.requires_aesthetics_score else 6


SDXL_ARCHES: dict[str, SdxlArch] = {
    # SDXL base 1.0's exact architecture: U-Net 2567.5 M (2,567,463,684), VAE 83.7 M, CLIP ViT-L text encoder
    # 123.1 M, OpenCLIP bigG text encoder with projection 694.7 M (tests/test_sdxl.py counts them).
    "sdxl": SdxlArch(
        unet_block_out_channels=(320, 640, 1280),
        unet_layers_per_block=2,
        unet_attention_head_dim=(5, 10, 20),
        unet_transformer_layers_per_block=(1, 2, 10),
        unet_cross_attention_levels=(False, True, True),
        unet_sample_size=128,
        addition_time_embed_dim=256,
        latent_channels=4,
        vae_block_out_channels=(128, 256, 512, 512),
        vae_layers_per_block=2,
        vae_scaling_factor=0.13025,
        text_encoder=TextEncoderArch(hidden_size=768, layers=12, heads=12, intermediate_size=3072, hidden_act="quick_gelu", projection_dim=768),
        text_encoder_2=TextEncoderArch(hidden_size=1280, layers=32, heads=20, intermediate_size=5120, hidden_act="gelu", projection_dim=1280),
        norm_num_groups=32,
    ),
    # SDXL's layout scaled down: no attention at the first level, more transformer layers deeper, encoders of
    # different widths (a context of 32 + 48) and a pooled projection of yet another (40).
    "tiny-sdxl": SdxlArch(
        unet_block_out_channels=(32, 64),
        unet_layers_per_block=2,
        unet_attention_head_dim=(2, 4),
        unet_transformer_layers_per_block=(1, 2),
        unet_cross_attention_levels=(False, True),
        unet_sample_size=32,
        addition_time_embed_dim=8,
        latent_channels=4,
        vae_block_out_channels=(32, 32, 32, 32),
        vae_layers_per_block=1,
        vae_scaling_factor=0.13025,
        text_encoder=TextEncoderArch(hidden_size=32, layers=2, heads=4, intermediate_size=37, hidden_act="quick_gelu", projection_dim=32),
        text_encoder_2=TextEncoderArch(hidden_size=48, layers=3, heads=4, intermediate_size=64, hidden_act="gelu", projection_dim=40),
        norm_num_groups=16,
    ),
}
# SDXL refiner 1.0's exact architecture (stabilityai/stable-diffusion-xl-refiner-1.0, as sgm's sd_xl_refiner.yaml:
# model_channels 384, channel_mult (1, 2, 4, 4), attention at the middle two levels, transformer depth 4, 64-channel
# heads, context 1280, adm_in_channels 2560): U-Net 2,259,526,660 parameters, SDXL base's VAE and OpenCLIP bigG
# second text encoder, no first one (tests/test_sdxl_refiner.py counts them).
SDXL_ARCHES["sdxl-refiner"] = dataclasses.replace(
    SDXL_ARCHES["sdxl"],
    unet_block_out_channels=(384, 768, 1536, 1536),
    unet_attention_head_dim=(6, 12, 24, 24),
    unet_transformer_layers_per_block=(4, 4, 4, 4),
    unet_cross_attention_levels=(False, True, True, False),
    text_encoder=None,
    requires_aesthetics_score=True,
)
# The refiner's layout scaled down, beside "tiny-sdxl" (the same second text encoder and VAE shapes, as the real
# pair shares them): no attention at the first and last levels, the second encoder's context alone.
SDXL_ARCHES["tiny-sdxl-refiner"] = dataclasses.replace(
    SDXL_ARCHES["tiny-sdxl"],
    unet_block_out_channels=(32, 64, 64),
    unet_attention_head_dim=(2, 4, 4),
    unet_transformer_layers_per_block=(2, 2, 2),
    unet_cross_attention_levels=(False, True, False),
    text_encoder=None,
    requires_aesthetics_score=True,
)
ARCHES.update(SDXL_ARCHES)


# "tiny" with an inpainting U-Net (9 input channels), as SD inpainting checkpoints have.
ARCHES["tiny-inpaint"] = dataclasses.replace(ARCHES["tiny"], unet_inpainting=True)
# "tiny" distilled by latent consistency: its U-Net embeds the guidance scale (as LCM_Dreamshaper_v7's, at 256) and it
# ships LCMScheduler.
ARCHES["tiny-lcm"] = dataclasses.replace(ARCHES["tiny"], unet_time_cond_proj_dim=32, scheduler_config=LCM_SCHEDULER_CONFIG)
# "tiny" as a Turbo checkpoint ships it: the same U-Net, Euler ancestral over trailing timesteps.
ARCHES["tiny-turbo"] = dataclasses.replace(ARCHES["tiny"], scheduler_config=TURBO_SCHEDULER_CONFIG)
# SD 1.5's architecture as a Turbo checkpoint ships it, to measure few-step latency at full size (SD-Turbo itself
# is SD 2.1's: a U-Net of about the same compute, a larger text encoder that runs once per prompt).
ARCHES["sd15-turbo"] = dataclasses.replace(ARCHES["sd15"], scheduler_config=TURBO_SCHEDULER_CONFIG)
# SDXL-Turbo: SDXL base's architecture trained at 512x512 (its U-Net's sample_size is 64), Euler ancestral over
# trailing timesteps. The tiny one halves tiny-sdxl's sample size likewise (128x128 by default).
ARCHES["sdxl-turbo"] = dataclasses.replace(SDXL_ARCHES["sdxl"], unet_sample_size=64, scheduler_config=SDXL_TURBO_SCHEDULER_CONFIG)
ARCHES["tiny-sdxl-turbo"] = dataclasses.replace(SDXL_ARCHES["tiny-sdxl"], unet_sample_size=16,
                                                scheduler_config=SDXL_TURBO_SCHEDULER_CONFIG)
# SD 1.5's layout (cross-attention with 8 heads at the first three of four levels, 2 layers per block, a 4-level VAE)
# at 0.3x its U-Net's channels and half its VAE's: a 0.3 GB U-Net that exports in a minute in 2.5 GB, to calibrate the
# memory estimate (benchmarks/memory_estimate.py) on SD 1.5's proportions where the full model does not fit.
ARCHES["sd15-small"] = dataclasses.replace(
    ARCHES["sd15"], unet_block_out_channels=(96, 192, 384, 384), vae_block_out_channels=(64, 128, 256, 256), text_hidden_size=256,
    text_layers=4, text_heads=4, text_intermediate_size=1024, safety_checker=ARCHES["tiny"].safety_checker,
)


def _unet(arch: CheckpointArch) -> UNet2DConditionModel:
    depth = len(arch.unet_block_out_channels)
    return UNet2DConditionModel(
        sample_size=arch.unet_sample_size,
        in_channels=arch.unet_in_channels,
        out_channels=arch.latent_channels,
        block_out_channels=arch.unet_block_out_channels,
        layers_per_block=arch.unet_layers_per_block,
        down_block_types=("CrossAttnDownBlock2D",) * (depth - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (depth - 1),
        cross_attention_dim=arch.text_hidden_size,
        attention_head_dim=arch.unet_attention_head_dim,
        use_linear_projection=arch.unet_use_linear_projection,
        norm_num_groups=arch.norm_num_groups,
        time_cond_proj_dim=arch.unet_time_cond_proj_dim,
    )


def _vae(arch: CheckpointArch) -> AutoencoderKL:
    depth = len(arch.vae_block_out_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * depth,
        up_block_types=("UpDecoderBlock2D",) * depth,
        block_out_channels=arch.vae_block_out_channels,
        layers_per_block=arch.vae_layers_per_block,
        latent_channels=arch.latent_channels,
        norm_num_groups=arch.norm_num_groups,
        sample_size=arch.unet_sample_size * 2 ** (depth - 1),
        scaling_factor=arch.vae_scaling_factor,
    )


def _text_encoder(arch: CheckpointArch) -> CLIPTextModel:
    vocab = clip_vocab(clip_merges())
    config = CLIPTextConfig(
        vocab_size=CLIP_VOCAB_SIZE,
        hidden_size=arch.text_hidden_size,
        intermediate_size=arch.text_intermediate_size,
        num_hidden_layers=arch.text_layers,
        num_attention_heads=arch.text_heads,
        max_position_embeddings=MODEL_MAX_LENGTH,
        hidden_act="quick_gelu",
        projection_dim=arch.text_hidden_size,
        bos_token_id=vocab[BOS_TOKEN],
        eos_token_id=vocab[EOS_TOKEN],
        pad_token_id=1,
    )
    return CLIPTextModel(config)


def _sdxl_unet(arch: SdxlArch) -> UNet2DConditionModel:
    levels = arch.unet_cross_attention_levels
    return UNet2DConditionModel(
        sample_size=arch.unet_sample_size,
        in_channels=arch.latent_channels,
        out_channels=arch.latent_channels,
        block_out_channels=arch.unet_block_out_channels,
        layers_per_block=arch.unet_layers_per_block,
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in levels),
        up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(levels)),
        cross_attention_dim=arch.cross_attention_dim,
        attention_head_dim=arch.unet_attention_head_dim,
        transformer_layers_per_block=arch.unet_transformer_layers_per_block,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=arch.addition_time_embed_dim,
        projection_class_embeddings_input_dim=arch.text_encoder_2.projection_dim + arch.time_ids * arch.addition_time_embed_dim,
        norm_num_groups=arch.norm_num_groups,
    )


def _sdxl_text_encoder(arch: TextEncoderArch, with_projection: bool) -> CLIPTextModel | CLIPTextModelWithProjection:
    vocab = clip_vocab(clip_merges())
    config = CLIPTextConfig(
        vocab_size=CLIP_VOCAB_SIZE,
        hidden_size=arch.hidden_size,
        intermediate_size=arch.intermediate_size,
        num_hidden_layers=arch.layers,
        num_attention_heads=arch.heads,
        max_position_embeddings=MODEL_MAX_LENGTH,
        hidden_act=arch.hidden_act,
        projection_dim=arch.projection_dim,
        bos_token_id=vocab[BOS_TOKEN],
        eos_token_id=vocab[EOS_TOKEN],
        pad_token_id=1,
    )
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config)


@dataclasses.dataclass(frozen=True)
class SdxlModels:
    """The trainable models of an SDXL checkpoint (a refiner's without the first text encoder)."""

    vae: AutoencoderKL
    text_encoder: CLIPTextModel | None
    text_encoder_2: CLIPTextModelWithProjection
    unet: UNet2DConditionModel


def build_sdxl_models(arch: SdxlArch) -> SdxlModels:
    """Freshly initialised (random) SDXL models with `arch`'s shapes, from torch's current seed."""
    # AutoencoderKL's config says force_upcast (it overflows fp16) unless told otherwise, as SDXL's does
    text_encoder = _sdxl_text_encoder(arch.text_encoder, with_projection=False).eval() if arch.text_encoder else None
    return SdxlModels(vae=_vae(arch).eval(), text_encoder=text_encoder,
                      text_encoder_2=_sdxl_text_encoder(arch.text_encoder_2, with_projection=True).eval(),
                      unet=_sdxl_unet(arch).eval())


def save_sdxl_checkpoint(out_dir: str | Path, models: SdxlModels, pad_token_2: str = "!",
                         scheduler_config: dict | None = None, requires_aesthetics_score: bool = False) -> Path:
    """Save `models` as a diffusers checkpoint laid out like SDXL base (safetensors, the scheduler of
    `scheduler_config` (default SDXL base's Euler), both tokenizers as vocab.json + merges.txt,
    force_zeros_for_empty_prompt), or with `requires_aesthetics_score` like SDXL's refiner
    (StableDiffusionXLImg2ImgPipeline, text_encoder and tokenizer null, force_zeros_for_empty_prompt false).
    The directory appears whole or not at all."""
    scheduler = _scheduler(scheduler_config or SDXL_SCHEDULER_CONFIG)
    models_kwargs = dict(vae=models.vae, text_encoder=models.text_encoder, text_encoder_2=models.text_encoder_2,
                         tokenizer=None, tokenizer_2=None, unet=models.unet, scheduler=scheduler, add_watermarker=False)
    if requires_aesthetics_score:
        pipe = StableDiffusionXLImg2ImgPipeline(**models_kwargs, requires_aesthetics_score=True,
                                                force_zeros_for_empty_prompt=False)
    else:
        pipe = StableDiffusionXLPipeline(**models_kwargs, force_zeros_for_empty_prompt=True)
    tokenizers = (("tokenizer", EOS_TOKEN),) if models.text_encoder is not None else ()
    tokenizers += (("tokenizer_2", pad_token_2),)
    out_dir = Path(out_dir)
    with atomic_directory(out_dir) as staging:
        pipe.save_pretrained(staging, safe_serialization=True)
        if models.text_encoder is not None:
            _prefix_text_model_keys(staging / "text_encoder/model.safetensors")  # text_encoder_2's keys have theirs
        index = json.loads((staging / "model_index.json").read_text())
        for name, pad_token in tokenizers:
            shutil.rmtree(staging / name, ignore_errors=True)
            write_clip_tokenizer(staging / name, pad_token=pad_token)
            index[name] = ["transformers", "CLIPTokenizer"]
        (staging / "model_index.json").write_text(json.dumps(index, indent=2))
    return out_dir


def _safety_checker(arch: SafetyCheckerArch) -> StableDiffusionSafetyChecker:
    vision = CLIPVisionConfig(
        hidden_size=arch.hidden_size,
        intermediate_size=arch.intermediate_size,
        num_hidden_layers=arch.layers,
        num_attention_heads=arch.heads,
        image_size=CLIP_IMAGE_SIZE,
        patch_size=arch.patch_size,
        hidden_act="quick_gelu",
        projection_dim=arch.projection_dim,
    )
    checker = StableDiffusionSafetyChecker(CLIPConfig(vision_config=vision.to_dict(), projection_dim=arch.projection_dim))
    with torch.no_grad():
        # diffusers initialises every concept embedding to ones; random ones make the similarities informative.
        checker.concept_embeds.normal_()
        checker.special_care_embeds.normal_()
        checker.concept_embeds_weights.fill_(RANDOM_CHECKER_THRESHOLD)
        checker.special_care_embeds_weights.fill_(RANDOM_CHECKER_THRESHOLD)
    return checker.eval()


def make_random_checkpoint(
    out_dir: str | Path, arch: str | CheckpointArch | SdxlArch = "tiny", seed: int = 0, with_safety_checker: bool = True
) -> Path:
    """Write a random-weight diffusers StableDiffusionPipeline (StableDiffusionXLPipeline for an SdxlArch, its
    Img2Img pipeline for a refiner's) checkpoint (fp32 safetensors) to `out_dir`.

    With `with_safety_checker` (and an arch that has one: SDXL has none), it includes `safety_checker/` and `feature_extractor/`
    as SD 1.x checkpoints do. The directory appears whole or not at all. Returns its path.
    """
    spec = ARCHES[arch] if isinstance(arch, str) else arch
    torch.manual_seed(seed)
    if isinstance(spec, SdxlArch):
        save_sdxl_checkpoint(out_dir, build_sdxl_models(spec), pad_token_2=spec.pad_token_2, scheduler_config=spec.scheduler_config,
                             requires_aesthetics_score=spec.requires_aesthetics_score)
        logger.info("wrote random-weight SDXL checkpoint to %s", out_dir)
        return Path(out_dir)
    models = build_models(spec)
    checker = _safety_checker(spec.safety_checker) if with_safety_checker and spec.safety_checker else None
    save_checkpoint(out_dir, models, pad_token=spec.pad_token, safety_checker=checker, scheduler_config=spec.scheduler_config)
    logger.info("wrote random-weight checkpoint to %s", out_dir)
    return Path(out_dir)


@dataclasses.dataclass(frozen=True)
class Models:
    """The three trainable models of a Stable Diffusion checkpoint."""

    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    unet: UNet2DConditionModel


def build_models(arch: CheckpointArch) -> Models:
    """Freshly initialised (random) VAE, text encoder and U-Net with `arch`'s shapes, from torch's current seed."""
    return Models(vae=_vae(arch).eval(), text_encoder=_text_encoder(arch).eval(), unet=_unet(arch).eval())


def save_checkpoint(
    out_dir: str | Path,
    models: Models,
    pad_token: str = EOS_TOKEN,
    safety_checker: StableDiffusionSafetyChecker | None = None,
    dtype: torch.dtype = torch.float32,
    scheduler_config: dict | None = None,
) -> Path:
    """Save `models` as a diffusers checkpoint laid out like a real SD 1.x one (safetensors in `dtype`, the scheduler
    of `scheduler_config` (its "_class_name", PNDM where absent; default SD 1.5's), vocab.json + merges.txt tokenizer, the safety checker and
    its feature extractor when given).

    The directory appears whole or not at all. The caller's models are left as they were.
    """
    if dtype != torch.float32:
        models = Models(*(copy.deepcopy(m).to(dtype) for m in (models.vae, models.text_encoder, models.unet)))
    pipe = StableDiffusionPipeline(
        vae=models.vae,
        text_encoder=models.text_encoder,
        tokenizer=None,
        unet=models.unet,
        scheduler=_scheduler(scheduler_config or SD15_SCHEDULER_CONFIG),
        safety_checker=safety_checker,
        feature_extractor=CLIPImageProcessor() if safety_checker is not None else None,
        requires_safety_checker=safety_checker is not None,
    )
    out_dir = Path(out_dir)
    with atomic_directory(out_dir) as staging:
        pipe.save_pretrained(staging, safe_serialization=True)
        _prefix_text_model_keys(staging / "text_encoder/model.safetensors")
        # transformers 5 would save only tokenizer.json (and its feature extractor as CLIPImageProcessorPil); real SD
        # checkpoints ship vocab.json + merges.txt and a CLIPFeatureExtractor preprocessor_config.json.
        shutil.rmtree(staging / "tokenizer", ignore_errors=True)
        write_clip_tokenizer(staging / "tokenizer", pad_token=pad_token)
        if safety_checker is not None:
            (staging / "feature_extractor").mkdir(exist_ok=True)
            (staging / "feature_extractor/preprocessor_config.json").write_text(json.dumps(SD_PREPROCESSOR_CONFIG, indent=2))
        _declare_components(staging / "model_index.json", with_safety_checker=safety_checker is not None)
    return out_dir


#: TAESD's layout (madebyollin/taesd: 64 channels, (1, 3, 3, 3) encoder and (3, 3, 3, 1) decoder blocks) narrowed for
#: tests: 3 upsamplings (scale factor 8, as SD's VAE), one block per level
TINY_AUTOENCODER_CHANNELS = (16, 16, 16, 16)
TINY_AUTOENCODER_BLOCKS = (1, 1, 1, 1)


def make_tiny_autoencoder(out_dir: str | Path, latent_channels: int = 4, seed: int = 0) -> Path:
    """Write a random-weight diffusers AutoencoderTiny (TAESD's architecture, narrowed) to `out_dir`, laid out as
    madebyollin/taesd ships it (config.json + diffusion_pytorch_model.safetensors), for `sdrt export --tiny-vae`."""
    from diffusers import AutoencoderTiny

    torch.manual_seed(seed)
    model = AutoencoderTiny(
        encoder_block_out_channels=TINY_AUTOENCODER_CHANNELS, decoder_block_out_channels=TINY_AUTOENCODER_CHANNELS,
        num_encoder_blocks=TINY_AUTOENCODER_BLOCKS, num_decoder_blocks=TINY_AUTOENCODER_BLOCKS,
        latent_channels=latent_channels,
    ).eval()
    with atomic_directory(Path(out_dir)) as staging:
        model.save_pretrained(staging, safe_serialization=True)
    return Path(out_dir)


def write_config_directory(arch: str | CheckpointArch | SdxlArch, out_dir: str | Path) -> Path:
    """Write the configs of a checkpoint of `arch`, without weights: `unet/`, `vae/` and `text_encoder/config.json`
    (SDXL: and `text_encoder_2/`), its scheduler (SD 1.5's, SDXL base's, unless the arch ships another) and the CLIP
    tokenizer (SDXL: both), laid out as in a diffusers checkpoint. The exporter reads single-file checkpoints with
    them, offline, where diffusers would fetch the configs from the Hub.

    The models are built on the meta device: their configs come from the same code as a random checkpoint's, and
    no weights are allocated.
    """
    spec = ARCHES[arch] if isinstance(arch, str) else arch
    out_dir = Path(out_dir)
    with torch.device("meta"):
        models = build_sdxl_models(spec) if isinstance(spec, SdxlArch) else build_models(spec)
    models.unet.save_config(out_dir / "unet")
    models.vae.save_config(out_dir / "vae")
    models.text_encoder.config.save_pretrained(out_dir / "text_encoder")
    if isinstance(spec, SdxlArch):
        models.text_encoder_2.config.save_pretrained(out_dir / "text_encoder_2")
        _scheduler(spec.scheduler_config or SDXL_SCHEDULER_CONFIG).save_config(out_dir / "scheduler")
        write_clip_tokenizer(out_dir / "tokenizer", pad_token=EOS_TOKEN)
        write_clip_tokenizer(out_dir / "tokenizer_2", pad_token=spec.pad_token_2)
        return out_dir
    _scheduler(spec.scheduler_config or SD15_SCHEDULER_CONFIG).save_config(out_dir / "scheduler")
    write_clip_tokenizer(out_dir / "tokenizer", pad_token=spec.pad_token)
    return out_dir


def _prefix_text_model_keys(path: Path) -> None:
    """Name the text encoder's weights `text_model.*`, as real checkpoints (and transformers 4) do: transformers 5
    saves CLIPTextModel without the prefix, which transformers 4 (optimum's venvs, the bench's peers) silently
    replaces with random weights."""
    tensors = safetensors.torch.load_file(path)
    prefixed = {key if key.startswith("text_model.") else f"text_model.{key}": value for key, value in tensors.items()}
    safetensors.torch.save_file(prefixed, path, metadata={"format": "pt"})


def _scheduler(config: dict):
    """The diffusers scheduler `config` describes: its "_class_name", PNDM where it names none."""
    return getattr(diffusers, config.get("_class_name", PNDMScheduler.__name__)).from_config(config)


def _declare_components(model_index_path: Path, with_safety_checker: bool) -> None:
    index = json.loads(model_index_path.read_text())
    index["tokenizer"] = ["transformers", "CLIPTokenizer"]
    if with_safety_checker:
        index["feature_extractor"] = ["transformers", "CLIPImageProcessor"]
        index["safety_checker"] = ["stable_diffusion", "StableDiffusionSafetyChecker"]
    model_index_path.write_text(json.dumps(index, indent=2))
