"""SDXL: a tiny random SDXL checkpoint exported and run at pixel parity with diffusers' StableDiffusionXLPipeline on
the same initial latents (fp32, <= 5e-3) on the exact CPU backends; SDXL base's parameter counts; bad input."""
from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import diffusers
import diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl_img2img as diffusers_xl_img2img
import diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl_inpaint as diffusers_xl_inpaint
import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPTokenizer as ReferenceTokenizer

import sdrt.engine
from sdrt.cli.main import main
from sdrt.engine.backends import BACKENDS
from sdrt.engine.errors import InvalidArgumentError
from sdrt.engine.backends.onnxruntime_cpu import OnnxRuntimeCPUBackend
from sdrt.engine.manifest import read_manifest
from sdrt.engine.memory_estimate import Architecture, MemoryModel
from sdrt.engine.prompts import PromptOptions
from sdrt.engine.request import GenerationRequest
from sdrt.engine.specs import Component
from sdrt.engine.tokenizer import CLIPTokenizer
from sdrt.export import export_bundle
from sdrt.export.random_checkpoint import ARCHES, build_sdxl_models, make_random_checkpoint
from sdrt.export.source_checkpoint import SourceCheckpoint
from tests.same_noise import record_our_noise, replay_to_diffusers
from tests.test_img2img import make_image

MAX_PIXEL_DIFF = 5e-3
CPU_EXACT_BACKENDS = [b.name for b in BACKENDS if b.exact and b.name in ("onnxruntime-cpu", "openvino-fp32")]


@pytest.fixture(scope="module")
def sdxl_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_random_checkpoint(tmp_path_factory.mktemp("sdxl") / "checkpoint", "tiny-sdxl", seed=1234)


@pytest.fixture(scope="module")
def sdxl_bundle(sdxl_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_bundle(sdxl_checkpoint, tmp_path_factory.mktemp("sdxl-bundle") / "bundle")


@pytest.fixture(scope="module")
def reference(sdxl_checkpoint: Path):
    pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(sdxl_checkpoint)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module", params=CPU_EXACT_BACKENDS)
def pipe(request, sdxl_bundle: Path):
    pipe = sdrt.engine.load(sdxl_bundle, backend=request.param, safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_sdxl_base_parameter_counts() -> None:
    """`make-checkpoint --arch sdxl` builds SDXL base 1.0's exact models (counted on the meta device, no weights):
    its published sizes, U-Net 2.567 B, VAE 83.7 M, CLIP ViT-L 123.1 M, OpenCLIP bigG with projection 694.7 M."""
    with torch.device("meta"):
        models = build_sdxl_models(ARCHES["sdxl"])
    counts = {name: sum(p.numel() for p in getattr(models, name).parameters())
              for name in ("unet", "vae", "text_encoder", "text_encoder_2")}
    assert counts == {"unet": 2_567_463_684, "vae": 83_653_863, "text_encoder": 123_060_480, "text_encoder_2": 694_659_840}
    assert models.vae.config.force_upcast and models.unet.config.sample_size * 8 == 1024


def test_memory_estimate_holds_both_text_encoders_and_sdxls_attention(sdxl_bundle: Path) -> None:
    manifest = read_manifest(sdxl_bundle)
    second_encoder = sum(f.stat().st_size for f in (sdxl_bundle / "text_encoder_2").iterdir() if f.is_file())
    full = MemoryModel.for_bundle(manifest, OnnxRuntimeCPUBackend, 0)
    without = MemoryModel.for_bundle(manifest, OnnxRuntimeCPUBackend, 0, [Component.TEXT_ENCODER, Component.UNET, Component.VAE_DECODER])
    assert full.resident_bytes - without.resident_bytes >= second_encoder
    # SDXL base: no attention at the full latent size; 10 heads at 64x64 latents for 1024x1024, 20 at 32x32
    with torch.device("meta"):
        unet_config = dict(build_sdxl_models(ARCHES["sdxl"]).unet.config)
    heads = SourceCheckpoint(path=Path("."), text_encoder_config={}, unet_config=unet_config, vae_config={},
                             safety_checker_config=None, scheduler_config={}, tokenizer_config={}).unet_attention_heads
    assert heads == (0, 10, 20)
    model = dataclasses.replace(full, architecture=Architecture(8, (320, 640, 1280), heads, (128, 256, 512, 512)))
    one_sample_scores = 10 * (1024 // 8 // 2) ** 4 * 4  # bytes: 10 heads x 4096 tokens squared, fp32
    assert model.unet_bytes(1024, 1024, 1, guided=True) >= 2 * one_sample_scores


def test_bundle_records_the_sdxl_graphs(sdxl_checkpoint: Path, sdxl_bundle: Path) -> None:
    manifest = read_manifest(sdxl_bundle)
    unet = manifest.components[Component.UNET]
    pooled = json.loads((sdxl_checkpoint / "text_encoder_2/config.json").read_text())["projection_dim"]
    assert [(t.name, t.shape) for t in unet.inputs][-2:] == [("text_embeds", ("batch", pooled)), ("time_ids", ("batch", 6))]
    assert [t.name for t in manifest.components[Component.TEXT_ENCODER_2].outputs] == ["penultimate_hidden_state", "text_embeds"]
    assert "penultimate_hidden_state" in [t.name for t in manifest.components[Component.TEXT_ENCODER].outputs]
    assert manifest.sdxl is not None and manifest.sdxl.force_zeros_for_empty_prompt is True
    assert manifest.defaults.guidance_scale == 5.0  # StableDiffusionXLPipeline's
    assert manifest.model.default_image_size == 256  # the U-Net's sample_size (32) x the VAE's scale factor (8)
    # the fp16-unsafe VAE stays fp32: no fp16 variant unless asked for
    assert all(entry.fp16 is None for entry in manifest.components.values())


def test_second_tokenizer_pads_with_exclamation_mark_as_transformers(sdxl_checkpoint: Path, sdxl_bundle: Path) -> None:
    ours = CLIPTokenizer.from_directory(sdxl_bundle / "tokenizer_2")
    reference = ReferenceTokenizer.from_pretrained(sdxl_checkpoint / "tokenizer_2")
    prompts = ["a cat!", "", "A photo of an astronaut riding a horse on mars"]
    expected = reference(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="np").input_ids
    np.testing.assert_array_equal(ours(prompts), expected)
    assert ours.pad_token_id == 0


# 12 x 11 words: 136 CLIP tokens, beyond the 77 of both text encoders
LONG_PROMPT = " ".join(f"a red circle number {i} beside a blue square," for i in range(12))

CASES = {
    "guided": dict(prompt="a red circle"),
    "unguided": dict(prompt="a red circle", guidance_scale=1.0),
    "default-guidance": dict(prompt="a red circle", guidance_scale=None),  # each its own default: 5 (the manifest's)
    "negative-prompt": dict(prompt="a castle", negative_prompt="fog, blur"),
    "empty-negative-prompt": dict(prompt="a castle", negative_prompt=""),
    "prompt-list-n2": dict(prompt=["a cat", "a dog"], negative_prompt=["bad", "ugly"], num_images_per_prompt=2),
    "size-conditions": dict(prompt="a boat", original_size=(512, 384), crops_coords_top_left=(16, 8), target_size=(96, 160)),
    "negative-size-conditions": dict(prompt="a boat", negative_original_size=(128, 128), negative_crops_coords_top_left=(4, 0),
                                     negative_target_size=(64, 96)),
    "non-square": dict(prompt="a wide landscape", height=64, width=96),
    # diffusers truncates both encoders' ids to 77 (EOS last, the second padded with "!"), the negative prompt's too
    "long-prompts-truncated": dict(prompt=LONG_PROMPT, negative_prompt=LONG_PROMPT[::-1]),
}


def _parity(reference, ours, args: dict, scheduler: str | None = None) -> None:
    args = {"num_inference_steps": 3, "height": 64, "width": 64, "guidance_scale": 7.5, **args}
    args = {name: value for name, value in args.items() if value is not None}
    prompts = [args["prompt"]] if isinstance(args["prompt"], str) else args["prompt"]
    f = ours.vae_scale_factor
    shape = (len(prompts) * args.get("num_images_per_prompt", 1), 4, args["height"] // f, args["width"] // f)
    latents = np.random.default_rng(7).standard_normal(shape, dtype=np.float32)
    expected = reference(**args, latents=torch.from_numpy(latents.copy()), output_type="np").images
    actual = ours(**args, latents=latents, output_type="np", scheduler=scheduler).images
    assert actual.shape == expected.shape == (shape[0], args["height"], args["width"], 3)
    assert np.abs(actual - expected).max() <= MAX_PIXEL_DIFF
    assert actual.std() > 1e-3


@pytest.mark.parametrize("case", CASES)
def test_pixels_match_diffusers(reference, pipe, case: str) -> None:
    _parity(reference, pipe, CASES[case])


def test_long_prompt_is_truncated_with_a_warning_per_encoder(pipe, caplog) -> None:
    """As StableDiffusionXLPipeline.encode_prompt: each tokenizer warns about the tail it drops (the parity case
    above checks the images); the tail changes nothing, the part that fits does."""
    args = dict(num_inference_steps=1, height=64, width=64, output_type="np", seed=3)
    with caplog.at_level(logging.WARNING, logger="sdrt"):
        long = pipe(LONG_PROMPT, **args).images
    warnings = [r.getMessage() for r in caplog.records if "truncated because CLIP" in r.getMessage()]
    assert len(warnings) == 2 and all("number 8 beside" in w for w in warnings)
    np.testing.assert_array_equal(pipe(LONG_PROMPT + " and a green triangle", **args).images, long)
    assert np.abs(pipe(LONG_PROMPT[len("a red"):], **args).images - long).max() > 1e-4


def test_conditions_change_the_image(pipe) -> None:
    """The test above would pass if time_ids and text_embeds were ignored by both: they must change our images."""
    args = dict(prompt="a boat", num_inference_steps=2, height=64, width=64, output_type="np", seed=3)
    plain = pipe(**args).images
    assert np.abs(pipe(**args, original_size=(1024, 1024)).images - plain).max() > 1e-3
    assert np.abs(pipe(**args, negative_prompt="a car").images - plain).max() > 1e-3


# diffusers' scheduler classes for our names, switched as diffusers users do: from_config over the checkpoint's
@pytest.mark.parametrize("name, diffusers_class", [("ddim", "DDIMScheduler"), ("dpm++2m", "DPMSolverMultistepScheduler")])
def test_pixels_match_diffusers_with_other_schedulers(reference, pipe, name: str, diffusers_class: str) -> None:
    original = reference.scheduler
    fixed = {"algorithm_type": "dpmsolver++", "solver_order": 2} if name == "dpm++2m" else {}
    reference.scheduler = getattr(diffusers, diffusers_class).from_config(original.config, **fixed)
    try:
        _parity(reference, pipe, dict(prompt="a lighthouse", negative_prompt="fog"), scheduler=name)
    finally:
        reference.scheduler = original


BAD = {
    "original_size": dict(original_size=(0, 64)),
    "crops_coords_top_left": dict(crops_coords_top_left=(-1, 0)),
    "target_size": dict(target_size="64x64"),
    "negative_original_size": dict(negative_original_size=(64, 64)),
    "negative_target_size": dict(negative_target_size=(64, 64)),
    "negative_crops_coords_top_left": dict(negative_crops_coords_top_left=(0, 0)),
    "prompt_options": dict(prompt_options=PromptOptions(long_prompts=True)),
}


@pytest.mark.parametrize("parameter", BAD)
def test_bad_sdxl_arguments_are_named(pipe, parameter: str) -> None:
    with pytest.raises(InvalidArgumentError) as caught:
        pipe("a cat", num_inference_steps=1, height=64, width=64, **BAD[parameter])
    assert caught.value.parameter == parameter


def test_size_conditions_are_refused_for_other_models(pipe) -> None:
    sd_limits = dataclasses.replace(pipe.limits, sdxl=False)  # an SD 1.x/2.x bundle's (its U-Net takes no time_ids)
    with pytest.raises(InvalidArgumentError) as caught:
        GenerationRequest.create(sd_limits, "a cat", num_inference_steps=1, height=64, width=64, target_size=(64, 64))
    assert caught.value.parameter == "target_size"


def test_weighted_prompt_weights_both_encoders(pipe) -> None:
    args = dict(num_inference_steps=1, height=64, width=64, output_type="np", seed=1, prompt_options=PromptOptions(weighting=True))
    plain = pipe("a red boat", **args).images
    np.testing.assert_array_equal(pipe("a (red:1.0) boat", **args).images, plain)
    assert np.abs(pipe("a (red:1.5) boat", **args).images - plain).max() > 1e-4


@pytest.fixture(scope="module")
def img2img_reference(reference):
    pipe = diffusers_xl_img2img.StableDiffusionXLImg2ImgPipeline(**reference.components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


IMG2IMG_CASES = {
    "strength-default-0.3": dict(num_inference_steps=10),
    "strength-0.8-negative": dict(strength=0.8, negative_prompt="fog"),
    "non-square-n2": dict(image=(96, 64), num_images_per_prompt=2),
    "size-conditions": dict(strength=0.6, original_size=(256, 200), target_size=(64, 64), crops_coords_top_left=(8, 0)),
}


@pytest.mark.parametrize("case", IMG2IMG_CASES)
def test_image_to_image_matches_diffusers(img2img_reference, pipe, monkeypatch, case: str) -> None:
    """As StableDiffusionXLImg2ImgPipeline (strength default 0.3) on the same noise."""
    args = {"prompt": "a red circle", "num_inference_steps": 4, "guidance_scale": 7.5, **IMG2IMG_CASES[case]}
    args["image"] = make_image(*args.get("image", (64, 64)))
    draws = record_our_noise(monkeypatch)
    actual = pipe(**args, seed=3, output_type="np").images
    left = replay_to_diffusers(monkeypatch, diffusers_xl_img2img, draws)
    expected = img2img_reference(**args, output_type="np").images
    assert left == [] and len(draws) == 2  # the image's latent sample, then the initial noise
    width, height = args["image"].size
    assert actual.shape == expected.shape == (len(draws[1]), height, width, 3)
    assert np.abs(actual - expected).max() <= MAX_PIXEL_DIFF
    assert actual.std() > 1e-3


@pytest.fixture(scope="module")
def inpaint_reference(reference):
    pipe = diffusers_xl_inpaint.StableDiffusionXLInpaintPipeline(**reference.components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _mask(width: int = 64, height: int = 64) -> Image.Image:
    mask = np.zeros((height, width), dtype=np.uint8)
    mask[height // 4 : height * 3 // 4, width // 3 :] = 255  # repaint a block on the right
    return Image.fromarray(mask)


INPAINT_CASES = {
    "strength-default-0.9999": dict(),
    "strength-1-negative": dict(strength=1.0, negative_prompt="fog"),
    "strength-0.6-n2": dict(strength=0.6, num_images_per_prompt=2, num_inference_steps=5),
}


@pytest.mark.parametrize("case", INPAINT_CASES)
def test_inpainting_matches_diffusers(inpaint_reference, pipe, monkeypatch, case: str) -> None:
    """As StableDiffusionXLInpaintPipeline (strength default 0.9999, a standard U-Net's latent blending) on the same
    noise. diffusers also VAE-encodes the masked image, which a 4-channel U-Net never uses: that draw is ours to skip."""
    args = {"prompt": "a red circle", "num_inference_steps": 4, "guidance_scale": 7.5, "height": 64, "width": 64,
            "image": make_image(), "mask_image": _mask(), **INPAINT_CASES[case]}
    draws = record_our_noise(monkeypatch)
    actual = pipe(**args, seed=3, output_type="np").images
    left = replay_to_diffusers(monkeypatch, diffusers_xl_inpaint, draws)
    expected = inpaint_reference(**args, output_type="np").images
    assert left == []
    assert actual.shape == expected.shape
    assert np.abs(actual - expected).max() <= MAX_PIXEL_DIFF
    assert actual.std() > 1e-3


def test_outpainting_keeps_the_original_pixels(pipe) -> None:
    image = make_image()
    out = pipe.outpaint(image, "a sea", right=16, num_inference_steps=2, seed=1, output_type="np").images
    assert out.shape == (1, 64, 80, 3)
    np.testing.assert_allclose(out[0, :, :64], np.asarray(image, dtype=np.float32) / 255, atol=1 / 255)
    assert out[0, :, 64:].std() > 1e-3


def test_cli_generates_at_the_bundles_default_size(sdxl_bundle: Path, tmp_path: Path) -> None:
    out = tmp_path / "xl.png"
    assert main(["generate", str(sdxl_bundle), "a cat", "-o", str(out), "-s", "1", "-q", "--seed", "1"]) == 0
    assert Image.open(out).size == (256, 256)
