"""Starting from an image: how strength (or SDXL's denoising_start) picks the first denoising step and denoising_end
the last, sampling latents from the VAE encoder's distribution, and the two ways inpainting conditions the denoising
loop — as diffusers' StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline and the SDXL pipelines do, in numpy.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from sdrt.engine.schedulers import Scheduler, SchedulerState

# diffusers' DiagonalGaussianDistribution clamps the log-variance to this range before taking exp.
_LOGVAR_MIN, _LOGVAR_MAX = -30.0, 20.0


@dataclasses.dataclass(frozen=True, eq=False)
class ImageInit:
    """The image a request starts from, preprocessed: `pixels` (1, 3, H, W) in [-1, 1]; `mask` (1, 1, H, W) in
    [0, 1] with 1 = repaint, or None for image to image; `strength` in [0, 1]. Or, for image to image only,
    `latents` (1 or BN, C, H/f, W/f): scaled latents (another pipeline's output_type="latent", as diffusers' SDXL
    image-to-image pipeline takes a 4-channel `image`), used as the image's latents without the VAE; pixels None."""

    pixels: np.ndarray | None
    strength: float
    mask: np.ndarray | None = None
    latents: np.ndarray | None = None


def denoising_steps(num_inference_steps: int, strength: float) -> int:
    """How many of the `num_inference_steps` steps run: diffusers' `min(int(num_inference_steps * strength),
    num_inference_steps)`; the first `num_inference_steps - that` steps are skipped."""
    return min(int(num_inference_steps * strength), num_inference_steps)


def first_call(num_inference_steps: int, strength: float, order: int) -> int:
    """The U-Net call of the full run that image to image starts from (diffusers' `t_start * scheduler.order`)."""
    return max(num_inference_steps - denoising_steps(num_inference_steps, strength), 0) * order


def _timestep_cutoff(fraction: float, num_train_timesteps: int) -> int:
    """diffusers' `discrete_timestep_cutoff`: the training timestep where `fraction` of the denoising is done."""
    return int(round(num_train_timesteps - fraction * num_train_timesteps))


def calls_until(timesteps: np.ndarray, denoising_end: float, num_train_timesteps: int) -> int:
    """How many of the run's U-Net calls (`timesteps`, in call order) `denoising_end` keeps, as diffusers' SDXL
    pipelines: those at timesteps at or above its cutoff. The rest are left to the next expert (the refiner)."""
    return int(np.sum(timesteps >= _timestep_cutoff(denoising_end, num_train_timesteps)))


def first_call_at(timesteps: np.ndarray, denoising_start: float, num_train_timesteps: int, order: int) -> int:
    """The call of the full run (`timesteps`) that `denoising_start` starts from, as diffusers' SDXL image-to-image
    `get_timesteps`: the calls below its cutoff run (one more for a second-order sampler, so as not to stop between
    its two calls); `strength` plays no part."""
    calls = int(np.sum(timesteps < _timestep_cutoff(denoising_start, num_train_timesteps)))
    if order == 2 and calls % 2 == 0:
        calls += 1
    return len(timesteps) - calls


def sample_posterior(moments: np.ndarray, noise: np.ndarray, scaling_factor: float) -> np.ndarray:
    """Scaled latents sampled from the VAE encoder's diagonal Gaussian: `moments` (B, 2C, h, w) is the mean and
    log-variance on channels, `noise` (B, C, h, w) standard normal. Returns scaling_factor * (mean + std * noise)."""
    mean, logvar = np.split(moments, 2, axis=1)  # (B, C, h, w) each
    std = np.exp(np.float32(0.5) * np.clip(logvar, _LOGVAR_MIN, _LOGVAR_MAX))  # (B, C, h, w)
    return (np.float32(scaling_factor) * (mean + std * noise)).astype(np.float32)  # (B, C, h, w)


def latent_mask(mask: np.ndarray, factor: int) -> np.ndarray:
    """A (1, 1, H, W) pixel mask at latent resolution (1, 1, H/f, W/f): torch's nearest interpolation, which at an
    integer ratio takes the top-left pixel of each f x f cell."""
    return np.ascontiguousarray(mask[:, :, ::factor, ::factor])  # (1, 1, h, w)


class DenoiseHooks:
    """What a denoising loop does besides text to image: nothing, here; inpainting overrides one of the two."""

    def unet_input(self, model_input: np.ndarray) -> np.ndarray:
        """The U-Net's `sample` given the scheduler-scaled latents ((2)BN, C, h, w)."""
        return model_input

    def after_step(self, latents: np.ndarray, step_index: int) -> np.ndarray:
        """The latents to carry on with after call `step_index`'s scheduler step."""
        return latents


TEXT_TO_IMAGE = DenoiseHooks()


@dataclasses.dataclass(frozen=True, eq=False)
class KnownRegionBlend(DenoiseHooks):
    """Inpainting with a standard U-Net (diffusers' `num_channels_unet == 4` branch): after every step the known
    region is replaced by the image's latents noised to the next call's level (clean after the last call), so only
    the masked region is generated. A soft mask (outpainting's feathered seam) blends the two in proportion."""

    scheduler: Scheduler[Any]
    state: SchedulerState  # the run as planned: add_noise reads its timesteps
    image_latents: np.ndarray  # (BN, C, h, w), scaled
    noise: np.ndarray  # (BN, C, h, w), the request's initial noise
    mask: np.ndarray  # (BN, 1, h, w), 1 = repaint

    def after_step(self, latents: np.ndarray, step_index: int) -> np.ndarray:
        known = self.image_latents
        if step_index < len(self.state.timesteps) - 1:
            known = self.scheduler.add_noise(self.state, known, self.noise, step_index + 1)  # (BN, C, h, w)
        return ((1 - self.mask) * known + self.mask * latents).astype(np.float32)  # (BN, C, h, w)


@dataclasses.dataclass(frozen=True, eq=False)
class MaskChannels(DenoiseHooks):
    """Inpainting with an inpainting U-Net (9 input channels for 4 latent ones): the mask and the masked image's
    latents are concatenated to the latents on channels, in the batch order of the guidance passes."""

    mask: np.ndarray  # ((2)BN, 1, h, w)
    masked_image_latents: np.ndarray  # ((2)BN, C, h, w)

    def unet_input(self, model_input: np.ndarray) -> np.ndarray:
        return np.concatenate([model_input, self.mask, self.masked_image_latents], axis=1)  # ((2)BN, 2C + 1, h, w)
