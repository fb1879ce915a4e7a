"""Inpainting: pixel parity with diffusers' StableDiffusionInpaintPipeline on the same noise, with a standard U-Net
(latent blending of the known region) and with a 9-channel inpainting U-Net (mask and masked-image latents as inputs),
and the exporter's detection of the latter."""
from __future__ import annotations

from pathlib import Path

import diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_inpaint as diffusers_inpaint
import numpy as np
import pytest
from PIL import Image

import sdrt.engine
from sdrt.engine.errors import InvalidArgumentError
from sdrt.engine.manifest import read_manifest
from sdrt.export import export_bundle
from sdrt.export.random_checkpoint import make_random_checkpoint
from tests.same_noise import record_our_noise, replay_to_diffusers
from tests.test_img2img import make_image
from tests.test_parity import MAX_PIXEL_DIFF


def make_mask(width: int = 64, height: int = 64) -> Image.Image:
    """White (repaint) in a soft-edged box: the soft edge checks the binarization at 0.5."""
    rows, columns = np.mgrid[0:height, 0:width]
    inside = np.minimum.reduce([rows - height // 4, 3 * height // 4 - rows, columns - width // 3, 5 * width // 6 - columns])
    return Image.fromarray((np.clip(inside / 6 + 0.5, 0, 1) * 255).astype(np.uint8), mode="L")


@pytest.fixture(scope="module")
def inpainting_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_random_checkpoint(tmp_path_factory.mktemp("inpaint") / "ckpt", "tiny-inpaint", seed=99, with_safety_checker=False)


@pytest.fixture(scope="module")
def inpainting_pipe(inpainting_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory):
    bundle = export_bundle(inpainting_checkpoint, tmp_path_factory.mktemp("inpaint-bundle") / "bundle")
    pipe = sdrt.engine.load(bundle, backend="onnxruntime-cpu", safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _reference(checkpoint: Path):
    pipe = diffusers_inpaint.StableDiffusionInpaintPipeline.from_pretrained(
        checkpoint, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def reference(tiny_checkpoint: Path):
    return _reference(tiny_checkpoint)


@pytest.fixture(scope="module")
def inpainting_reference(inpainting_checkpoint: Path):
    return _reference(inpainting_checkpoint)


CASES = {
    "strength-default-1": dict(),
    "strength-0.6": dict(strength=0.6, num_inference_steps=5),
    "no-guidance": dict(guidance_scale=1.0),
    "n2": dict(prompt=["a cat", "a dog"], num_images_per_prompt=2, negative_prompt=["x", "y"]),
    "non-square": dict(size=(96, 64)),
}
# the inpainting bundle's own export makes its parity tests the slow part of this file
SLOW_WITH_INPAINTING_UNET = ("n2", "non-square")


def _compare(ours, reference, monkeypatch, case: dict, draws_expected: int) -> None:
    width, height = case.pop("size", (64, 64))
    args = {"prompt": "a red circle", "num_inference_steps": 4, "height": height, "width": width,
            "image": make_image(width, height), "mask_image": make_mask(width, height), **case}
    draws = record_our_noise(monkeypatch)
    actual = ours(**args, seed=5, output_type="np").images
    left = replay_to_diffusers(monkeypatch, diffusers_inpaint, draws)
    expected = reference(**args, output_type="np").images
    assert left == [] and len(draws) == draws_expected
    assert actual.shape == expected.shape and actual.shape[1:] == (height, width, 3)
    assert np.abs(actual - expected).max() <= MAX_PIXEL_DIFF
    assert actual.std() > 1e-3


@pytest.mark.parametrize("case", CASES)
def test_standard_unet_matches_diffusers(reference, tiny_pipe, monkeypatch, case: str) -> None:
    # The image's latent sample, then the initial noise; diffusers also samples the masked image's latents, which a
    # 4-channel U-Net never reads (replayed as NaN, so its use would show).
    _compare(tiny_pipe, reference, monkeypatch, dict(CASES[case]), draws_expected=2)


@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.slow) if c in SLOW_WITH_INPAINTING_UNET else c for c in CASES])
def test_inpainting_unet_matches_diffusers(inpainting_reference, inpainting_pipe, monkeypatch, case: str) -> None:
    # Strength 1 starts from pure noise without encoding the image: noise, masked image; else image, noise, masked.
    draws = 2 if CASES[case].get("strength", 1.0) == 1.0 else 3
    _compare(inpainting_pipe, inpainting_reference, monkeypatch, dict(CASES[case]), draws_expected=draws)


def test_exporter_detects_the_inpainting_unet(inpainting_pipe, tiny_pipe) -> None:
    model = inpainting_pipe.manifest.model
    assert (model.latent_channels, model.unet_in_channels) == (4, 9)
    sample = next(t for t in inpainting_pipe.manifest.components[sdrt.engine.specs.Component.UNET].inputs if t.name == "sample")
    assert sample.shape[1] == 9
    assert tiny_pipe.manifest.model.unet_in_channels == tiny_pipe.manifest.model.latent_channels == 4


def test_manifest_without_unet_in_channels_reads_as_latent_channels(tiny_bundle: Path, tmp_path: Path) -> None:
    import json
    import shutil

    copy = tmp_path / "old"
    shutil.copytree(tiny_bundle, copy)
    data = json.loads((copy / "manifest.json").read_text())
    del data["model"]["unet_in_channels"]
    (copy / "manifest.json").write_text(json.dumps(data))
    assert read_manifest(copy).model.unet_in_channels == 4


def test_known_region_is_kept_with_a_standard_unet(tiny_pipe) -> None:
    # Latent blending puts the image's latents back outside the mask after the last step: there the result is the
    # VAE's round trip of the image, whatever the prompt.
    args = dict(image=make_image(), mask_image=make_mask(), height=64, width=64, num_inference_steps=3, seed=1, output_type="latent")
    mask = np.asarray(make_mask(), dtype=np.float32)[::8, ::8] >= 127.5  # (8, 8) latent cells repainted
    first = tiny_pipe("a cat", **args).images
    second = tiny_pipe("a house on fire", **args).images
    np.testing.assert_array_equal(first[..., ~mask], second[..., ~mask])
    assert np.abs(first[..., mask] - second[..., mask]).max() > 1e-3


def test_inpainting_unet_needs_a_mask(inpainting_pipe) -> None:
    with pytest.raises(InvalidArgumentError, match="mask_image: this bundle's U-Net is an inpainting U-Net"):
        inpainting_pipe("a cat", num_inference_steps=1, height=64, width=64)
    with pytest.raises(InvalidArgumentError, match="mask_image"):
        inpainting_pipe("a cat", image=make_image(), num_inference_steps=1)


def test_default_size_is_the_models_as_diffusers(tiny_pipe) -> None:
    out = tiny_pipe("a cat", image=make_image(), mask_image=make_mask(), num_inference_steps=1, seed=0, output_type="latent")
    side = tiny_pipe.manifest.model.default_image_size // tiny_pipe.vae_scale_factor
    assert out.images.shape == (1, 4, side, side)


def test_exporter_refuses_other_unet_inputs(tiny_checkpoint: Path, tmp_path: Path) -> None:
    import json
    import shutil

    from sdrt.export.source_checkpoint import load_checkpoint
    from sdrt.export.errors import CheckpointError

    copy = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, copy)
    config = json.loads((copy / "unet/config.json").read_text())
    (copy / "unet/config.json").write_text(json.dumps({**config, "in_channels": 5}))
    with pytest.raises(CheckpointError, match="the U-Net takes 5 input channels; .* 4 latent channels, or 9 for inpainting"):
        load_checkpoint(copy)


def test_outpaint_with_an_inpainting_unet(inpainting_pipe) -> None:
    image = make_image(64, 64)
    out = inpainting_pipe.outpaint(image, "a cat", right=16, top=8, num_inference_steps=2, seed=0)
    result = np.asarray(out.images[0])
    assert result.shape == (72, 80, 3)
    np.testing.assert_array_equal(result[8:, :64], np.asarray(image))
