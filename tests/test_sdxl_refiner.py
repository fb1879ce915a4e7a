"""The SDXL refiner: a tiny random refiner checkpoint (StableDiffusionXLImg2ImgPipeline layout: text_encoder_2 alone,
requires_aesthetics_score) exported and run at pixel parity with diffusers' StableDiffusionXLImg2ImgPipeline (and
its inpainting pipeline) on the same noise (fp32, <= 5e-3) on the exact CPU backends; the base-to-refiner chain
against diffusers' chain; SDXL refiner 1.0's parameter counts; bad input."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import diffusers
import diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl_img2img as diffusers_xl_img2img
import diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl_inpaint as diffusers_xl_inpaint
import numpy as np
import pytest
import torch
from PIL import Image

import sdrt.engine
from sdrt.cli.main import main
from sdrt.engine.errors import InvalidArgumentError
from sdrt.engine.manifest import read_manifest
from sdrt.engine.request import GenerationRequest
from sdrt.engine.specs import Component
from sdrt.export import export_bundle
from sdrt.export.errors import CheckpointError
from sdrt.export.lora_fusion import LoraSpec
from sdrt.export.random_checkpoint import ARCHES, build_sdxl_models, make_random_checkpoint
from sdrt.export.source_checkpoint import load_checkpoint
from sdrt.serve.batcher import BatcherConfig
from sdrt.serve.service import LocalImageService
from tests.same_noise import record_our_noise, replay_to_diffusers
from tests.test_img2img import make_image
from tests.test_sdxl import CPU_EXACT_BACKENDS, MAX_PIXEL_DIFF, _mask

# its refiner bundles take about 20 s to set up: in `make test-slow`, to keep `make test` within 10 minutes
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def refiner_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_random_checkpoint(tmp_path_factory.mktemp("refiner") / "checkpoint", "tiny-sdxl-refiner", seed=4321)


@pytest.fixture(scope="module")
def refiner_bundle(refiner_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_bundle(refiner_checkpoint, tmp_path_factory.mktemp("refiner-bundle") / "bundle")


@pytest.fixture(scope="module")
def reference(refiner_checkpoint: Path):
    pipe = diffusers.StableDiffusionXLImg2ImgPipeline.from_pretrained(refiner_checkpoint)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module", params=CPU_EXACT_BACKENDS)
def refiner(request, refiner_bundle: Path):
    pipe = sdrt.engine.load(refiner_bundle, backend=request.param, safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_sdxl_refiner_parameter_counts() -> None:
    """`make-checkpoint --arch sdxl-refiner` builds SDXL refiner 1.0's exact models (counted on the meta device): its
    U-Net of 2,259,526,660 parameters (the refiner's published config built in diffusers), SDXL base's VAE and
    OpenCLIP bigG text encoder, no first text encoder."""
    with torch.device("meta"):
        models = build_sdxl_models(ARCHES["sdxl-refiner"])
    counts = {name: sum(p.numel() for p in getattr(models, name).parameters()) for name in ("unet", "vae", "text_encoder_2")}
    assert counts == {"unet": 2_259_526_660, "vae": 83_653_863, "text_encoder_2": 694_659_840}
    config = models.unet.config
    assert models.text_encoder is None
    assert (config.cross_attention_dim, config.projection_class_embeddings_input_dim, config.addition_time_embed_dim) == (1280, 2560, 256)
    assert tuple(config.down_block_types) == ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
    assert config.sample_size * 8 == 1024


def test_checkpoint_is_laid_out_as_diffusers_saves_the_refiner(refiner_checkpoint: Path) -> None:
    index = json.loads((refiner_checkpoint / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLImg2ImgPipeline"
    assert index["requires_aesthetics_score"] is True and index["force_zeros_for_empty_prompt"] is False
    assert index["text_encoder"] == [None, None] and index["tokenizer"] == [None, None]
    assert not (refiner_checkpoint / "text_encoder").exists() and not (refiner_checkpoint / "tokenizer").exists()


def test_bundle_records_a_refiner(refiner_checkpoint: Path, refiner_bundle: Path) -> None:
    manifest = read_manifest(refiner_bundle)
    assert Component.TEXT_ENCODER not in manifest.components
    assert set(manifest.components) == {Component.TEXT_ENCODER_2, Component.UNET, Component.VAE_DECODER, Component.VAE_ENCODER}
    assert manifest.sdxl is not None and manifest.sdxl.requires_aesthetics_score is True
    assert manifest.sdxl.force_zeros_for_empty_prompt is False
    assert manifest.tokenizer.directory == manifest.sdxl.tokenizer_2.directory == "tokenizer_2"
    assert not (refiner_bundle / "tokenizer").exists()
    encoder_2 = json.loads((refiner_checkpoint / "text_encoder_2/config.json").read_text())
    unet = {t.name: t.shape for t in manifest.components[Component.UNET].inputs}
    assert unet["encoder_hidden_states"][-1] == encoder_2["hidden_size"]  # the second encoder's context alone
    assert unet["text_embeds"] == ("batch", encoder_2["projection_dim"])
    assert unet["time_ids"] == ("batch", 5)  # original size, crop, aesthetic score
    assert manifest.defaults.guidance_scale == 5.0  # StableDiffusionXLImg2ImgPipeline's


IMG2IMG_CASES = {
    "default-aesthetics-strength-0.3": dict(num_inference_steps=10),
    "aesthetic-scores": dict(strength=0.6, aesthetic_score=8.5, negative_aesthetic_score=1.0),
    "negative-prompt": dict(strength=0.6, negative_prompt="fog, blur", aesthetic_score=3.0),
    "unguided": dict(strength=0.6, guidance_scale=1.0),
    "size-conditions": dict(strength=0.6, original_size=(256, 200), crops_coords_top_left=(8, 0),
                            negative_original_size=(128, 96), negative_crops_coords_top_left=(4, 4)),
    "crop-without-negative": dict(strength=0.6, crops_coords_top_left=(16, 8)),  # the negative half's crop stays (0, 0)
    "non-square-n2": dict(image=(96, 64), num_images_per_prompt=2, strength=0.6),
}


@pytest.mark.parametrize("case", IMG2IMG_CASES)
def test_image_to_image_matches_diffusers(reference, refiner, monkeypatch, case: str) -> None:
    """As StableDiffusionXLImg2ImgPipeline with requires_aesthetics_score on the same noise."""
    args = {"prompt": "a red circle", "num_inference_steps": 4, "guidance_scale": 7.5, **IMG2IMG_CASES[case]}
    args["image"] = make_image(*args.get("image", (64, 64)), seed=2)
    draws = record_our_noise(monkeypatch)
    actual = refiner(**args, seed=3, output_type="np").images
    left = replay_to_diffusers(monkeypatch, diffusers_xl_img2img, draws)
    expected = reference(**args, output_type="np").images
    assert left == [] and len(draws) == 2  # the image's latent sample, then the initial noise
    width, height = args["image"].size
    assert actual.shape == expected.shape == (len(draws[1]), height, width, 3)
    assert np.abs(actual - expected).max() <= MAX_PIXEL_DIFF
    assert actual.std() > 1e-3


def test_aesthetic_scores_change_the_image(refiner) -> None:
    """The parity above would hold if both ignored the scores: they must change our images, each half its own."""
    args = dict(prompt="a boat", image=make_image(), strength=0.6, num_inference_steps=4, output_type="np", seed=3)
    plain = refiner(**args).images
    np.testing.assert_array_equal(refiner(**args, aesthetic_score=6.0, negative_aesthetic_score=2.5).images, plain)
    assert np.abs(refiner(**args, aesthetic_score=9.0).images - plain).max() > 1e-4
    assert np.abs(refiner(**args, negative_aesthetic_score=0.0).images - plain).max() > 1e-4


def test_inpainting_matches_diffusers(refiner_checkpoint: Path, refiner, monkeypatch) -> None:
    """As StableDiffusionXLInpaintPipeline over the refiner checkpoint (its aesthetic time_ids, a standard U-Net's
    latent blending) on the same noise; diffusers' masked-image sample, which a 4-channel U-Net never uses, is ours
    to skip."""
    reference = diffusers_xl_inpaint.StableDiffusionXLInpaintPipeline.from_pretrained(refiner_checkpoint)
    reference.set_progress_bar_config(disable=True)
    args = dict(prompt="a red circle", negative_prompt="fog", num_inference_steps=4, guidance_scale=7.5, height=64, width=64,
                image=make_image(), mask_image=_mask(), strength=0.8, aesthetic_score=7.0)
    draws = record_our_noise(monkeypatch)
    actual = refiner(**args, seed=3, output_type="np").images
    left = replay_to_diffusers(monkeypatch, diffusers_xl_inpaint, draws)
    expected = reference(**args, output_type="np").images
    assert left == []
    assert np.abs(actual - expected).max() <= MAX_PIXEL_DIFF
    assert actual.std() > 1e-3


@pytest.fixture(scope="module")
def base_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_random_checkpoint(tmp_path_factory.mktemp("base") / "checkpoint", "tiny-sdxl", seed=1234)


@pytest.fixture(scope="module")
def base(base_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory):
    bundle = export_bundle(base_checkpoint, tmp_path_factory.mktemp("base-bundle") / "bundle")
    pipe = sdrt.engine.load(bundle, backend="onnxruntime-cpu", safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("handoff", ["latent", "np"])
def test_base_to_refiner_chain_matches_diffusers(base_checkpoint: Path, base, reference, refiner, monkeypatch,
                                                 handoff: str) -> None:
    """diffusers' documented chain: the base's output (latents with output_type="latent", or its image) refined by
    the refiner's image to image at its default strength 0.3, each pipeline on the same noise as ours."""
    base_reference = diffusers.StableDiffusionXLPipeline.from_pretrained(base_checkpoint)
    base_reference.set_progress_bar_config(disable=True)
    prompt, common = "a lighthouse at dusk", dict(num_inference_steps=4, guidance_scale=7.5)
    latents = np.random.default_rng(5).standard_normal((1, 4, 8, 8), dtype=np.float32)
    ours = base(prompt, **common, height=64, width=64, latents=latents, output_type=handoff).images
    theirs = base_reference(prompt, **common, height=64, width=64, latents=torch.from_numpy(latents.copy()),
                            output_type="latent" if handoff == "latent" else "pil").images
    if handoff == "latent":
        np.testing.assert_allclose(ours, theirs.numpy(), atol=1e-3)
        ours_image, theirs_image = ours, theirs
    else:
        ours_image, theirs_image = Image.fromarray((ours[0] * 255).round().astype(np.uint8)), theirs[0]
    common["num_inference_steps"] = 10
    draws = record_our_noise(monkeypatch)
    actual = refiner(prompt, **common, image=ours_image, seed=9, output_type="np").images
    left = replay_to_diffusers(monkeypatch, diffusers_xl_img2img, draws)
    expected = reference(prompt, **common, image=theirs_image, output_type="np").images
    assert left == [] and len(draws) == (1 if handoff == "latent" else 2)  # latents need no VAE sample
    assert actual.shape == expected.shape == (1, 64, 64, 3)
    assert np.abs(actual - expected).max() <= MAX_PIXEL_DIFF
    assert actual.std() > 1e-3


BAD = {
    "aesthetic_score": dict(aesthetic_score=float("nan")),
    "negative_aesthetic_score": dict(negative_aesthetic_score="high"),
    "target_size": dict(target_size=(64, 64)),
    "negative_target_size": dict(negative_target_size=(64, 64)),
    "negative_original_size": dict(negative_original_size=(0, 64)),
}


@pytest.mark.parametrize("parameter", BAD)
def test_bad_refiner_arguments_are_named(refiner, parameter: str) -> None:
    with pytest.raises(InvalidArgumentError) as caught:
        refiner("a cat", image=make_image(), num_inference_steps=4, **BAD[parameter])
    assert caught.value.parameter == parameter


def test_text_to_image_is_refused_naming_image_to_image(refiner) -> None:
    with pytest.raises(InvalidArgumentError, match="image to image") as caught:
        refiner("a cat", num_inference_steps=2, height=64, width=64)
    assert caught.value.parameter == "image"


LATENT_BAD = {
    "image": dict(image=np.zeros((1, 3, 8, 8), dtype=np.float32)),  # RGB channels, not latents
    "mask_image": dict(image=np.zeros((1, 4, 8, 8), dtype=np.float32), mask_image=_mask()),
    "height": dict(image=np.zeros((1, 4, 8, 8), dtype=np.float32), height=128),
}


@pytest.mark.parametrize("parameter", LATENT_BAD)
def test_bad_latent_images_are_named(refiner, parameter: str) -> None:
    with pytest.raises(InvalidArgumentError) as caught:
        refiner("a cat", num_inference_steps=4, **LATENT_BAD[parameter])
    assert caught.value.parameter == parameter


@pytest.mark.parametrize("parameter", ["aesthetic_score", "negative_aesthetic_score"])
def test_aesthetic_scores_are_refused_on_the_base(refiner, parameter: str) -> None:
    base_limits = dataclasses.replace(refiner.limits, aesthetics=False)  # an SDXL base bundle's
    with pytest.raises(InvalidArgumentError, match="refiner") as caught:
        GenerationRequest.create(base_limits, "a cat", num_inference_steps=1, height=64, width=64, **{parameter: 6.0})
    assert caught.value.parameter == parameter


def test_refiner_flag_without_its_unet_is_refused(base_checkpoint: Path, tmp_path: Path) -> None:
    """A base checkpoint whose model_index.json claims requires_aesthetics_score: its U-Net takes 6 conditions."""
    claimed = tmp_path / "claimed"
    claimed.mkdir()
    for item in base_checkpoint.iterdir():
        (claimed / item.name).symlink_to(item)
    (claimed / "model_index.json").unlink()
    index = json.loads((base_checkpoint / "model_index.json").read_text())
    (claimed / "model_index.json").write_text(json.dumps({**index, "requires_aesthetics_score": True}))
    with pytest.raises(CheckpointError, match="requires_aesthetics_score"):
        load_checkpoint(claimed)


def test_missing_first_text_encoder_is_refused_unless_declared_absent(base_checkpoint: Path, tmp_path: Path) -> None:
    """Only a checkpoint whose model_index.json declares text_encoder null may lack text_encoder/ and tokenizer/."""
    partial = tmp_path / "partial"
    partial.mkdir()
    for item in base_checkpoint.iterdir():
        if item.name not in ("text_encoder", "tokenizer"):
            (partial / item.name).symlink_to(item)
    with pytest.raises(CheckpointError, match="text_encoder/config.json"):
        load_checkpoint(partial)


def test_cli_img2img_runs_a_refiner_bundle(refiner_bundle: Path, tmp_path: Path) -> None:
    image, out = tmp_path / "in.png", tmp_path / "refined.png"
    make_image().save(image)
    args = ["img2img", str(refiner_bundle), "a cat", "-i", str(image), "-o", str(out), "-s", "4", "-q", "--seed", "1"]
    assert main([*args, "--aesthetic-score", "7.5", "--negative-aesthetic-score", "2"]) == 0
    assert Image.open(out).size == (64, 64)
    assert main(["generate", str(refiner_bundle), "a cat", "-o", str(tmp_path / "t2i.png"), "-s", "1", "-q"]) != 0


def test_server_refuses_a_refiner_bundle_clearly(refiner) -> None:
    """The server generates from text (/v1/images/generations): a refiner, image to image only, stops it at load."""
    failures: list[str] = []
    service = LocalImageService(lambda: refiner, BatcherConfig(), on_failure=failures.append)
    service.start()
    service._loader.join(30)
    assert len(failures) == 1 and "SDXL refiner" in failures[0] and "img2img" in failures[0]


def test_ensemble_of_experts_matches_diffusers(base_checkpoint: Path, base, reference, refiner, monkeypatch) -> None:
    """diffusers' ensemble of experts: the base denoises until denoising_end=0.8 and hands over its latents, the
    refiner finishes from denoising_start=0.8 without noising them again; on the same initial latents as diffusers."""
    base_reference = diffusers.StableDiffusionXLPipeline.from_pretrained(base_checkpoint)
    base_reference.set_progress_bar_config(disable=True)
    prompt, common = "a lighthouse at dusk", dict(num_inference_steps=10, guidance_scale=7.5)
    latents = np.random.default_rng(6).standard_normal((1, 4, 8, 8), dtype=np.float32)
    handed = base(prompt, **common, height=64, width=64, latents=latents, denoising_end=0.8, output_type="latent")
    theirs = base_reference(prompt, **common, height=64, width=64, latents=torch.from_numpy(latents.copy()),
                            denoising_end=0.8, output_type="latent").images
    np.testing.assert_allclose(handed.images, theirs.numpy(), atol=1e-3)
    draws = record_our_noise(monkeypatch)
    refined = refiner(prompt, **common, image=handed.images, denoising_start=0.8, seed=1, output_type="np")
    left = replay_to_diffusers(monkeypatch, diffusers_xl_img2img, draws)
    expected = reference(prompt, **common, image=theirs, denoising_start=0.8, output_type="np").images
    assert draws == [] and left == []  # latents handed over as they are: nothing drawn
    # 10 "leading" steps visit 901, 801, ..., 1: the base those at or above 1000 - 0.8 * 1000, the refiner the rest
    assert (handed.unet_calls, refined.unet_calls) == (8, 2)
    assert np.abs(refined.images - expected).max() <= MAX_PIXEL_DIFF
    assert refined.images.std() > 1e-3


EXPERTS_BAD = {
    "denoising_end": dict(denoising_end=1.0),
    "denoising_start": dict(denoising_start=0.0, image=make_image()),
    "strength": dict(denoising_start=0.8, image=make_image(), strength=0.5),
    "image": dict(denoising_start=0.8),  # as the parameter it needs: raised as denoising_start's
    "mask_image": dict(denoising_end=0.5, image=make_image(), mask_image=_mask()),
    "order": dict(denoising_start=0.8, denoising_end=0.5, image=make_image()),
}
EXPERTS_BAD_PARAMETER = {"image": "denoising_start", "mask_image": "denoising_end", "order": "denoising_start"}


@pytest.mark.parametrize("case", EXPERTS_BAD)
def test_bad_expert_fractions_are_named(refiner, case: str) -> None:
    """Checked before the refiner's own need of an image: the same on a base bundle."""
    with pytest.raises(InvalidArgumentError) as caught:
        refiner("a cat", num_inference_steps=4, height=64, width=64, **EXPERTS_BAD[case])
    assert caught.value.parameter == EXPERTS_BAD_PARAMETER.get(case, case)


def test_expert_fractions_are_refused_for_other_models(refiner) -> None:
    sd_limits = dataclasses.replace(refiner.limits, sdxl=False, aesthetics=False)  # an SD 1.x/2.x bundle's
    with pytest.raises(InvalidArgumentError, match="SDXL") as caught:
        GenerationRequest.create(sd_limits, "a cat", num_inference_steps=4, height=64, width=64, denoising_end=0.5)
    assert caught.value.parameter == "denoising_end"


def test_lora_fusion_into_a_refiner_is_refused_before_any_work(refiner_checkpoint: Path, tmp_path: Path) -> None:
    with pytest.raises(InvalidArgumentError, match="refiner") as caught:
        export_bundle(refiner_checkpoint, tmp_path / "bundle", loras=[LoraSpec(tmp_path / "any.safetensors", 1.0)])
    assert caught.value.parameter == "lora" and not (tmp_path / "bundle").exists()
