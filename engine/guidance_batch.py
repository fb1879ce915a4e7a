"""Classifier-free guidance's U-Net batch layout, the one place that knows it.

A guided call runs the U-Net once on a batch of two halves along the first axis:

    [uncond; cond]   (2B, ...): rows 0..B-1 unconditional (the empty or the negative prompt), rows B..2B-1 the
                     prompts', row b and row B + b the same image

The context (encoder_hidden_states) differs between the halves; every other input (the latents, the timesteps, an
inpainting U-Net's mask channels: REPEATED_INPUTS) is the same in both, which a backend may exploit
(backends/openvino/passes/guidance_prefix.py). The guided noise prediction is uncond + scale * (cond - uncond). As
diffusers, the unconditional half runs only when guidance strengthens the prompt (guidance_scale > 1); otherwise the
batch is the conditional rows alone, (B, ...).
"""
from __future__ import annotations

from collections.abc import Collection, Mapping

import numpy as np

from sdrt.engine.array_namespace import namespace_of
from sdrt.engine.specs import UNET_PASSES, Component

#: the inputs whose two halves hold the same values in a guided batch, per component
REPEATED_INPUTS: dict[Component, tuple[str, ...]] = {unet: ("sample", "timestep") for unet in UNET_PASSES}


def is_guided(guidance_scale: float) -> bool:
    """Whether guidance at `guidance_scale` runs the unconditional half (doubling the U-Net's batch): as diffusers,
    only when guidance strengthens the prompt."""
    return guidance_scale > 1.0


def batch_size(images: int, guided: bool) -> int:
    """The U-Net's batch for `images` images."""
    return 2 * images if guided else images


def batch(uncond: np.ndarray, cond: np.ndarray) -> np.ndarray:
    """The guided batch of an unconditional and a conditional input, each (B, ...), in their namespace."""
    return namespace_of(uncond, cond).concatenate([uncond, cond])  # (2B, ...)


def repeat(same: np.ndarray, guided: bool) -> np.ndarray:
    """An input that is the same for both halves, (B, ...): as the U-Net's batch takes it."""
    return batch(same, same) if guided else same  # (2B or B, ...)


def split(batched: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(uncond, cond) of a guided batch (2B, ...), each (B, ...): views, in any array namespace."""
    if len(batched) % 2:
        raise ValueError(f"a guided batch has an even number of rows, got {len(batched)}")
    half = len(batched) // 2
    return batched[:half], batched[half:]  # (B, ...) each


def combine(noise_pred: np.ndarray, guidance_scale: float) -> np.ndarray:
    """The guided noise prediction (B, ...) from the U-Net's output on a guided batch (2B, ...), in its namespace
    (numpy on the host, CuPy in a device loop)."""
    uncond, cond = split(noise_pred)  # (B, ...) each
    return uncond + np.float32(guidance_scale) * (cond - uncond)  # (B, ...)


def halves_identical(feeds: Mapping[str, np.ndarray], names: Collection[str]) -> bool:
    """Whether each of the `names` inputs in `feeds` is a guided batch whose two halves are identical."""
    for name in names:
        array = feeds[name]
        if array.ndim == 0 or len(array) % 2 or len(array) == 0:
            return False
        uncond, cond = split(array)  # (B, ...) each
        if not np.array_equal(uncond, cond):
            return False
    return True
