"""Guidance as a U-Net input: the guidance-scale embedding of LCM-distilled U-Nets.

Latent consistency distillation (Luo et al. 2023) folds classifier-free guidance into the U-Net: a U-Net with
``time_cond_proj_dim`` in its config takes the sinusoidal embedding of w = guidance_scale - 1 as ``timestep_cond`` and
runs without the unconditional batch half, as diffusers' StableDiffusionPipeline and LatentConsistencyModelPipeline
run it. The maths and float32 steps are diffusers' ``get_guidance_scale_embedding``.
"""
from __future__ import annotations

import numpy as np

#: the U-Net input that carries it (specs.py lists it among the U-Net's optional inputs)
INPUT_NAME = "timestep_cond"
# The sinusoids' longest period, as in the timestep embedding of "Attention Is All You Need".
_MAX_PERIOD = np.float32(10000.0)
# diffusers scales w to the timestep range before embedding it.
_W_SCALE = np.float32(1000.0)


def guidance_scale_embedding(guidance_scale: float, images: int, embedding_dim: int) -> np.ndarray:
    """The embedding of w = `guidance_scale` - 1 for each of `images` images: float32 (images, embedding_dim),
    sines then cosines (a zero column last for an odd size)."""
    w = np.full(images, np.float32(guidance_scale - 1), dtype=np.float32) * _W_SCALE  # (N,)
    half_dim = embedding_dim // 2
    exponent = np.log(_MAX_PERIOD) / np.float32(half_dim - 1)  # float32, as torch divides a float32 tensor by an int
    frequencies = np.exp(np.arange(half_dim, dtype=np.float32) * -exponent)  # (D/2,)
    angles = w[:, None] * frequencies[None, :]  # (N, D/2)
    embedding = np.concatenate([np.sin(angles), np.cos(angles)], axis=1)  # (N, 2 * (D/2))
    if embedding_dim % 2 == 1:
        embedding = np.pad(embedding, ((0, 0), (0, 1)))  # (N, D)
    return embedding.astype(np.float32)  # (N, D)
