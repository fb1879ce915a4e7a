"""Image to image: pixel parity with diffusers' StableDiffusionImg2ImgPipeline on the same noise, across strengths,
step counts, guidance, batches and sizes; and what strength does to the run."""
from __future__ import annotations

from pathlib import Path

import diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img as diffusers_img2img
import numpy as np
import pytest
from PIL import Image

from tests.same_noise import record_our_noise, replay_to_diffusers
from tests.test_parity import MAX_PIXEL_DIFF


def make_image(width: int = 64, height: int = 64, seed: int = 0) -> Image.Image:
    """A smooth colour gradient with some texture: an image the VAE encodes to something other than noise."""
    rows, columns = np.mgrid[0:height, 0:width] / max(height, width)
    rng = np.random.default_rng(seed)
    pixels = np.stack([rows, columns, 1 - rows * columns], axis=-1) * 200 + rng.integers(0, 55, (height, width, 3))
    return Image.fromarray(pixels.astype(np.uint8))


@pytest.fixture(scope="module")
def reference(tiny_checkpoint: Path):
    pipe = diffusers_img2img.StableDiffusionImg2ImgPipeline.from_pretrained(
        tiny_checkpoint, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


CASES = {
    "strength-1": dict(strength=1.0),
    "strength-default-0.8": dict(),
    "strength-0.5-ten-steps": dict(strength=0.5, num_inference_steps=10),
    "small-strength": dict(strength=0.25, num_inference_steps=8),  # 2 of 8 steps
    "one-step-left": dict(strength=0.3, num_inference_steps=4),  # int(1.2) = 1 step
    "no-guidance": dict(guidance_scale=1.0),
    "negative-prompt-n2": dict(prompt=["a cat", "a dog"], negative_prompt=["bad", "ugly"], num_images_per_prompt=2),
    "non-square": dict(image=(120, 72)),
    "size-rounded-down": dict(image=(70, 85)),  # resized (Lanczos) to 64 x 80, as diffusers
}


@pytest.mark.parametrize("case", CASES)
def test_pixels_match_diffusers(reference, tiny_pipe, monkeypatch, case: str) -> None:
    args = {"prompt": "a red circle", "num_inference_steps": 4, **CASES[case]}
    args["image"] = make_image(*args.get("image", (64, 64)))
    draws = record_our_noise(monkeypatch)
    actual = tiny_pipe(**args, seed=3, output_type="np").images
    left = replay_to_diffusers(monkeypatch, diffusers_img2img, draws)
    expected = reference(**args, output_type="np").images

    assert left == [] and len(draws) == 2  # the image's latent sample, then the initial noise
    width, height = args["image"].size
    assert actual.shape == expected.shape == (len(draws[1]), height - height % 8, width - width % 8, 3)
    assert np.abs(actual - expected).max() <= MAX_PIXEL_DIFF
    assert actual.std() > 1e-3


def test_strength_sets_the_steps_run(tiny_pipe) -> None:
    image = make_image()
    for steps, strength, calls in ((10, 1.0, 11), (10, 0.5, 6), (10, 0.25, 3), (4, 0.3, 2)):
        out = tiny_pipe("a cat", image=image, strength=strength, num_inference_steps=steps, seed=0, output_type="latent")
        # PLMS' warm-up repeats one timestep: diffusers' timesteps[t_start:] over N + 1 calls
        assert out.unet_calls == calls, (steps, strength)
        assert all(type(seconds) is float for seconds in out.timings.values()), out.timings  # counts have their own field
        assert out.timings["vae_encode"] > 0


def test_seed_reproduces_and_varies(tiny_pipe) -> None:
    image = make_image()
    first, again, other = (tiny_pipe("a cat", image=image, num_inference_steps=2, seed=s, output_type="np").images
                           for s in (1, 1, 2))
    np.testing.assert_array_equal(first, again)
    assert np.abs(first - other).max() > 1e-3


def test_size_defaults_per_side_to_the_images(tiny_pipe) -> None:
    image = make_image(75, 64)  # width rounds down to 72
    shapes = [tiny_pipe("a cat", image=image, num_inference_steps=2, seed=0, output_type="latent", **size).images.shape
              for size in ({}, {"width": 80}, {"height": 72})]
    assert shapes == [(1, 4, 8, 9), (1, 4, 8, 10), (1, 4, 9, 9)]
