"""End-to-end pixel parity with diffusers' StableDiffusionPipeline on the same initial latents (fp32, <= 5e-3)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline

import sdrt.engine
from sdrt.engine.backends import BACKENDS
from tests.conftest import ARCHES

MAX_PIXEL_DIFF = 5e-3
LONG_PROMPT = " ".join(["a watercolour painting of a lighthouse on a cliff at dusk with seagulls"] * 8)


EXACT_BACKENDS = {b.name: b for b in BACKENDS if b.exact}


@pytest.fixture(scope="module", params=[(a, b) for a in ARCHES for b in EXACT_BACKENDS], ids="-".join)
def pipes(request):
    arch, backend = request.param
    reason = EXACT_BACKENDS[backend].unavailable_reason()
    if reason is not None:  # the GPU backends, on a machine without one
        pytest.skip(f"{backend} unavailable: {reason}")
    checkpoints: dict[str, Path] = request.getfixturevalue("checkpoints")
    bundles: dict[str, Path] = request.getfixturevalue("bundles")
    reference = StableDiffusionPipeline.from_pretrained(checkpoints[arch], safety_checker=None, requires_safety_checker=False)
    reference.set_progress_bar_config(disable=True)
    ours = sdrt.engine.load(bundles[arch], backend=backend, safety_checker=False)
    ours.set_progress_bar_config(disable=True)
    return reference, ours


CASES = {
    "guidance-0": dict(prompt="a red circle", guidance_scale=0.0),
    "guidance-1": dict(prompt="a red circle", guidance_scale=1.0),
    "guidance-7.5": dict(prompt="a red circle", guidance_scale=7.5),
    "guidance-10": dict(prompt="a red circle", guidance_scale=10.0),
    "empty-prompt": dict(prompt=""),
    "negative-prompt": dict(prompt="a castle", negative_prompt="fog, blur"),
    "prompt-list-n3": dict(prompt=["a cat", "a dog"], negative_prompt=["bad", "ugly"], num_images_per_prompt=3),
    "non-square-odd-latent": dict(prompt="a wide landscape", height=72, width=120),
    "one-step": dict(prompt="a boat", num_inference_steps=1),
    "fifty-steps": dict(prompt="a boat", num_inference_steps=50),
    "long-prompt": dict(prompt=LONG_PROMPT),
}


@pytest.mark.parametrize("case", CASES)
def test_pixels_match_diffusers(pipes, case: str) -> None:
    reference, ours = pipes
    args = {"num_inference_steps": 4, "height": 64, "width": 64, **CASES[case]}
    prompts = [args["prompt"]] if isinstance(args["prompt"], str) else args["prompt"]
    f = ours.vae_scale_factor
    shape = (len(prompts) * args.get("num_images_per_prompt", 1), ours.manifest.model.latent_channels, args["height"] // f, args["width"] // f)
    latents = np.random.default_rng(7).standard_normal(shape, dtype=np.float32)

    expected = reference(**args, latents=torch.from_numpy(latents.copy()), output_type="np").images
    actual = ours(**args, latents=latents, output_type="np").images

    assert actual.shape == expected.shape == (shape[0], args["height"], args["width"], 3)
    assert actual.dtype == np.float32
    assert np.abs(actual - expected).max() <= MAX_PIXEL_DIFF
    # Random-weight models still make images that depend on their input; a constant image would hide bugs.
    assert actual.std() > 1e-3
