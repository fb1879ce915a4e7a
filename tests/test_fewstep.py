"""Few-step models against diffusers' own pipelines on every exact CPU backend (fp32, <= 5e-3), on the same initial
latents and step noise (tests/same_noise.py): an LCM-distilled U-Net (guidance as a `timestep_cond` embedding, no
unconditional batch, LCMScheduler), LCM-LoRA fused at export and loaded at run time (a plain U-Net, LCMScheduler,
guidance 1), and Turbo checkpoints, SD-Turbo's and SDXL-Turbo's (Euler ancestral over trailing timesteps, guidance 0,
1, 2 and 4 steps; SDXL-Turbo's image-to-image as its model card runs it). Each bundle runs its model's own defaults
when the caller gives none, recorded in the manifest at export."""
from __future__ import annotations

import json
from pathlib import Path

import diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl_img2img as diffusers_xl_img2img
import diffusers.schedulers.scheduling_euler_ancestral_discrete as euler_ancestral_module
import diffusers.schedulers.scheduling_lcm as lcm_module
import numpy as np
import pytest
import torch
from diffusers import LCMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
from PIL import Image
from safetensors.torch import save_file

from sdrt.cli.main import main
from sdrt.engine.guidance_embedding import guidance_scale_embedding
from sdrt.engine.image_io import read_png_parameters
from sdrt.engine.manifest import MANIFEST_NAME, GenerationDefaults, read_manifest
from sdrt.engine.request import GenerationRequest
from sdrt.engine.specs import Component
from sdrt.export import export_bundle
from sdrt.export.errors import ExportError
from sdrt.export.lora_fusion import LoraSpec
from sdrt.export.model_defaults import model_defaults
from sdrt.export.random_checkpoint import ARCHES, build_sdxl_models, make_random_checkpoint
from sdrt.export.source_checkpoint import SourceCheckpoint, load_checkpoint
from tests.pipes import pipe_or_skip
from tests.same_noise import record_our_noise, replay_to_diffusers
from tests.test_img2img import make_image
from tests.test_parity import MAX_PIXEL_DIFF

CPU_BACKENDS = ["onnxruntime-cpu", "openvino-fp32"]  # the exact backends of the CPU
SIZE = 64
# LCM-LoRA trains every Linear and conv of the U-Net's attention and resnet blocks (latent-consistency/lcm-lora-sdv1-5
# ships them as kohya keys, U-Net only)
LCM_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1",
                    "conv2", "time_emb_proj")
LCM_LORA_RANK = 4


@pytest.fixture(scope="module")
def fewstep_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fewstep-checkpoints")
    return {arch: make_random_checkpoint(root / arch, arch, seed=99, with_safety_checker=False) for arch in ("tiny-lcm", "tiny-turbo")}


@pytest.fixture(scope="module")
def fewstep_bundles(fewstep_checkpoints: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fewstep-bundles")
    return {arch: export_bundle(path, root / arch) for arch, path in fewstep_checkpoints.items()}


@pytest.fixture(scope="module")
def lcm_lora(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    """An LCM-LoRA-shaped file for the tiny checkpoint, and its U-Net deltas computed here with torch."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_checkpoint / "unet")
    generator = torch.Generator().manual_seed(5)
    tensors, deltas = {}, {}
    for name, module in unet.named_modules():
        if not name.endswith(LCM_LORA_TARGETS) or not isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            continue
        weight = module.weight  # (out, in) or (out, in, kh, kw)
        kernel = weight.shape[2:]
        down = 0.1 * torch.randn((LCM_LORA_RANK, weight.shape[1], *kernel), generator=generator)  # (r, in[, kh, kw])
        up = 0.1 * torch.randn((weight.shape[0], LCM_LORA_RANK, *[1] * len(kernel)), generator=generator)  # (out, r[, 1, 1])
        prefix = "lora_unet_" + name.replace(".", "_")
        alpha = 8.0
        tensors |= {f"{prefix}.lora_down.weight": down.half(), f"{prefix}.lora_up.weight": up.half(),
                    f"{prefix}.alpha": torch.tensor(alpha)}
        down, up = down.half().float(), up.half().float()
        composed = up[:, :, 0, 0] if up.ndim == 4 else up  # (out, r)
        delta = composed @ down if down.ndim == 2 else torch.einsum("or,rikl->oikl", composed, down)
        deltas[f"{name}.weight"] = (alpha / LCM_LORA_RANK) * delta
    assert any("resnets" in name for name in deltas) and any("attn1" in name for name in deltas)
    path = tmp_path_factory.mktemp("lcm-lora") / "pytorch_lora_weights.safetensors"
    save_file(tensors, str(path))
    return path, deltas


def _reference(checkpoint: Path, unet_deltas: dict[str, torch.Tensor] | None = None, lcm: bool = False):
    pipe = StableDiffusionPipeline.from_pretrained(checkpoint, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    if unet_deltas:
        with torch.no_grad():
            parameters = dict(pipe.unet.named_parameters())
            for name, delta in unet_deltas.items():
                parameters[name] += delta
    if lcm:  # the diffusers LCM-LoRA guide's switch
        pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    return pipe


def _latents(seed: int = 7) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((1, 4, SIZE // 8, SIZE // 8), dtype=np.float32)


def _compare(monkeypatch, ours, reference, scheduler_module, args: dict, reference_args: dict | None = None) -> np.ndarray:
    """Our images with explicit latents, then diffusers' fed our step noise; asserts they agree, returns ours."""
    draws = record_our_noise(monkeypatch)
    actual = ours(**args, latents=_latents(), seed=3, output_type="np").images
    replay_to_diffusers(monkeypatch, scheduler_module, draws)
    expected = reference(**(reference_args or args), latents=torch.from_numpy(_latents()), output_type="np").images
    assert actual.shape == expected.shape == (1, SIZE, SIZE, 3)
    assert np.abs(actual - expected).max() <= MAX_PIXEL_DIFF
    assert actual.std() > 1e-3
    return actual


# --- the guidance-scale embedding ----------------------------------------------------------------------------------


@pytest.mark.parametrize("dim", [32, 33, 256])
@pytest.mark.parametrize("guidance_scale", [0.0, 1.0, 8.5])
def test_guidance_scale_embedding_is_diffusers(dim: int, guidance_scale: float) -> None:
    expected = StableDiffusionPipeline.get_guidance_scale_embedding(
        None, torch.tensor(guidance_scale - 1).repeat(3), embedding_dim=dim).numpy()
    actual = guidance_scale_embedding(guidance_scale, 3, dim)
    assert actual.dtype == np.float32 and actual.shape == (3, dim)
    # sin and cos of float32 angles up to 7500 rad: a few ulps of the angle apart between libms
    np.testing.assert_allclose(actual, expected, atol=2e-3)


# --- LCM-distilled U-Net --------------------------------------------------------------------------------------------


def test_lcm_distilled_bundle_takes_timestep_cond_and_records_lcm_defaults(fewstep_bundles: dict[str, Path]) -> None:
    manifest = read_manifest(fewstep_bundles["tiny-lcm"])
    unet_inputs = {t.name: t.shape for t in manifest.components[Component.UNET].inputs}
    assert unet_inputs["timestep_cond"] == ("batch", 32)
    assert manifest.defaults == GenerationDefaults(num_inference_steps=4, guidance_scale=8.5, scheduler=None)
    plain = read_manifest(fewstep_bundles["tiny-turbo"])
    assert "timestep_cond" not in {t.name for t in plain.components[Component.UNET].inputs}


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize(("steps", "guidance_scale"), [(1, 8.5), (2, 8.5), (4, 8.5), (8, 8.5), (4, 1.0), (4, 3.0)])
def test_lcm_distilled_matches_diffusers(monkeypatch, fewstep_checkpoints, fewstep_bundles, backend: str, steps: int,
                                         guidance_scale: float) -> None:
    """StableDiffusionPipeline on an LCM-distilled checkpoint: LCMScheduler (its own), w = guidance_scale - 1 as the
    U-Net's timestep_cond, no unconditional batch (a negative prompt changes nothing)."""
    ours = pipe_or_skip(fewstep_bundles["tiny-lcm"], backend)
    reference = _reference(fewstep_checkpoints["tiny-lcm"])
    args = dict(prompt="a red circle", negative_prompt="blur", num_inference_steps=steps, guidance_scale=guidance_scale,
                height=SIZE, width=SIZE)
    _compare(monkeypatch, ours, reference, lcm_module, args)
    request = GenerationRequest.create(ours.limits, "a red circle", guidance_scale=guidance_scale)
    assert not request.guided and request.num_inference_steps == 4


def test_lcm_distilled_defaults_and_guidance_embedding_matter(monkeypatch, fewstep_checkpoints, fewstep_bundles) -> None:
    ours = pipe_or_skip(fewstep_bundles["tiny-lcm"])
    reference = _reference(fewstep_checkpoints["tiny-lcm"])
    args = dict(prompt="a boat", height=SIZE, width=SIZE)
    _compare(monkeypatch, ours, reference, lcm_module, args, dict(args, num_inference_steps=4, guidance_scale=8.5))
    # The random U-Net's guidance embedding moves pixels by less than the parity tolerance: compare final latents,
    # which agree far more tightly, to see that w reaches the U-Net as diffusers gives it.
    for guidance_scale in (8.5, 2.0):
        draws = record_our_noise(monkeypatch)
        out = ours(**args, guidance_scale=guidance_scale, latents=_latents(), seed=3, output_type="latent")
        assert out.unet_calls == 4
        replay_to_diffusers(monkeypatch, lcm_module, draws)
        expected = reference(**args, num_inference_steps=4, guidance_scale=guidance_scale,
                             latents=torch.from_numpy(_latents()), output_type="latent").images.numpy()
        assert np.abs(out.images - expected).max() <= 1e-4
        if guidance_scale != 8.5:
            assert np.abs(out.images - previous).max() > 1e-2
        previous = out.images


# --- LCM-LoRA ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lcm_lora_bundle(tiny_checkpoint: Path, lcm_lora, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("lcm-lora-bundle") / "bundle"
    assert main(["export", str(tiny_checkpoint), str(out), "--lora", str(lcm_lora[0]), "--scheduler", "lcm", "--no-quantize"]) == 0
    return out


@pytest.mark.slow
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_lcm_lora_fused_at_export_matches_diffusers_without_flags(monkeypatch, tiny_checkpoint, lcm_lora, lcm_lora_bundle,
                                                                  backend: str) -> None:
    ours = pipe_or_skip(lcm_lora_bundle, backend)
    assert ours.manifest.defaults == GenerationDefaults(num_inference_steps=4, guidance_scale=1.0, scheduler="lcm")
    reference = _reference(tiny_checkpoint, lcm_lora[1], lcm=True)
    args = dict(prompt="a red circle", height=SIZE, width=SIZE)
    _compare(monkeypatch, ours, reference, lcm_module, args, dict(args, num_inference_steps=4, guidance_scale=1.0))


def test_lcm_lora_loaded_at_run_time_matches_diffusers(monkeypatch, tiny_checkpoint, tiny_bundle, lcm_lora) -> None:
    ours = pipe_or_skip(tiny_bundle)
    ours.load_lora(lcm_lora[0])
    reference = _reference(tiny_checkpoint, lcm_lora[1], lcm=True)
    args = dict(prompt="a red circle", height=SIZE, width=SIZE, num_inference_steps=4, guidance_scale=1.0)
    _compare(monkeypatch, ours, reference, lcm_module, {**args, "scheduler": "lcm"}, args)


# --- Turbo --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("steps", [1, 2, 4])
def test_turbo_matches_diffusers(monkeypatch, fewstep_checkpoints, fewstep_bundles, backend: str, steps: int) -> None:
    """SD-Turbo's setup: Euler ancestral over trailing timesteps (the checkpoint's own), guidance 0."""
    ours = pipe_or_skip(fewstep_bundles["tiny-turbo"], backend)
    reference = _reference(fewstep_checkpoints["tiny-turbo"])
    assert reference.scheduler.config.timestep_spacing == "trailing"
    args = dict(prompt="a red circle", height=SIZE, width=SIZE, num_inference_steps=steps, guidance_scale=0.0)
    _compare(monkeypatch, ours, reference, euler_ancestral_module, args)


def test_turbo_bundle_runs_one_unguided_step_without_flags(monkeypatch, fewstep_checkpoints, fewstep_bundles) -> None:
    ours = pipe_or_skip(fewstep_bundles["tiny-turbo"])
    assert ours.manifest.defaults == GenerationDefaults(num_inference_steps=1, guidance_scale=0.0, scheduler=None)
    request = GenerationRequest.create(ours.limits, "a boat")
    assert (request.num_inference_steps, request.guidance_scale, request.guided) == (1, 0.0, False)
    reference = _reference(fewstep_checkpoints["tiny-turbo"])
    args = dict(prompt="a boat", height=SIZE, width=SIZE)
    _compare(monkeypatch, ours, reference, euler_ancestral_module, args, dict(args, num_inference_steps=1, guidance_scale=0.0))
    assert ours(**args, output_type="np", seed=1).unet_calls == 1


def test_cli_generate_uses_and_records_the_bundles_defaults(fewstep_bundles, tmp_path: Path) -> None:
    out = tmp_path / "turbo.png"
    assert main(["generate", str(fewstep_bundles["tiny-turbo"]), "a cat", "-o", str(out), "--height", "64", "--width", "64",
                 "--seed", "1", "-q", "--no-safety-checker"]) == 0
    parameters = read_png_parameters(out)
    assert (parameters["num_inference_steps"], parameters["guidance_scale"], parameters["scheduler"]) == (1, 0.0, "default")
    assert main(["generate", str(fewstep_bundles["tiny-turbo"]), "a cat", "-o", str(out), "--height", "64", "--width", "64",
                 "--seed", "1", "-q", "--no-safety-checker", "-s", "3", "-g", "2", "--scheduler", "lcm"]) == 0
    parameters = read_png_parameters(out)
    assert (parameters["num_inference_steps"], parameters["guidance_scale"], parameters["scheduler"]) == (3, 2.0, "lcm")


# --- SDXL-Turbo -----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sdxl_turbo_reference(sdxl_turbo_checkpoint: Path) -> StableDiffusionXLPipeline:
    pipe = StableDiffusionXLPipeline.from_pretrained(sdxl_turbo_checkpoint)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_sdxl_turbo_architecture_is_sdxl_bases_at_512() -> None:
    """`make-checkpoint --arch sdxl-turbo` is stabilityai/sdxl-turbo's shape: SDXL base's U-Net (2,567,463,684
    parameters) whose sample_size 64 makes 512x512 images, Euler ancestral over trailing timesteps; its configs give
    the Turbo defaults (counted on the meta device, no weights)."""
    spec = ARCHES["sdxl-turbo"]
    with torch.device("meta"):
        models = build_sdxl_models(spec)
    assert sum(p.numel() for p in models.unet.parameters()) == 2_567_463_684
    source = SourceCheckpoint(path=Path("."), text_encoder_config=models.text_encoder.config.to_dict(),
                              unet_config=dict(models.unet.config), vae_config=dict(models.vae.config),
                              safety_checker_config=None, scheduler_config=spec.scheduler_config, tokenizer_config={},
                              text_encoder_2_config=models.text_encoder_2.config.to_dict())
    assert source.unet_config["sample_size"] * source.vae_scale_factor == 512
    assert model_defaults(source) == GenerationDefaults(num_inference_steps=1, guidance_scale=0.0, scheduler=None)


@pytest.mark.slow
def test_sdxl_turbo_bundle_records_turbo_defaults_and_its_trained_size(sdxl_turbo_bundle: Path) -> None:
    manifest = read_manifest(sdxl_turbo_bundle)
    assert manifest.sdxl is not None and manifest.sdxl.force_zeros_for_empty_prompt is True
    assert manifest.defaults == GenerationDefaults(num_inference_steps=1, guidance_scale=0.0, scheduler=None)
    assert manifest.model.default_image_size == 128  # its U-Net's sample_size (16) x the VAE's scale factor (8)


SDXL_TURBO_CASES = {
    "a-prompt": dict(prompt="a red circle"),
    # guidance 0 runs no unconditional batch: diffusers encodes "" as any prompt (force_zeros_for_empty_prompt zeroes
    # only the unconditional half) and never reads the negative prompt
    "empty-prompt-negative-ignored": dict(prompt="", negative_prompt="blur"),
    "size-conditions": dict(prompt="a boat", original_size=(512, 512), target_size=(64, 64), crops_coords_top_left=(8, 0)),
}


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize(("steps", "case"), [(1, "a-prompt"), (2, "a-prompt"), (4, "a-prompt"), (2, "empty-prompt-negative-ignored"),
                                             pytest.param(2, "size-conditions", marks=pytest.mark.slow)])
@pytest.mark.slow
def test_sdxl_turbo_matches_diffusers(monkeypatch, sdxl_turbo_reference, sdxl_turbo_bundle, backend: str, steps: int,
                                      case: str) -> None:
    """SDXL-Turbo's model card: StableDiffusionXLPipeline, its own Euler ancestral over trailing timesteps, guidance 0."""
    ours = pipe_or_skip(sdxl_turbo_bundle, backend)
    assert sdxl_turbo_reference.scheduler.config.timestep_spacing == "trailing"
    args = dict(SDXL_TURBO_CASES[case], height=SIZE, width=SIZE, num_inference_steps=steps, guidance_scale=0.0)
    _compare(monkeypatch, ours, sdxl_turbo_reference, euler_ancestral_module, args)


@pytest.fixture(scope="module")
def sdxl_turbo_img2img_reference(sdxl_turbo_reference):
    pipe = diffusers_xl_img2img.StableDiffusionXLImg2ImgPipeline(**sdxl_turbo_reference.components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.slow
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize(("steps", "strength"), [(2, 0.5), (4, 0.5)])
def test_sdxl_turbo_image_to_image_matches_diffusers(monkeypatch, sdxl_turbo_img2img_reference, sdxl_turbo_bundle,
                                                     backend: str, steps: int, strength: float) -> None:
    """The SDXL-Turbo model card's image-to-image: 2 steps at strength 0.5 (steps * strength >= 1, as diffusers
    requires), guidance 0, Euler ancestral drawing step noise after the image's latent sample and the initial noise."""
    ours = pipe_or_skip(sdxl_turbo_bundle, backend)
    args = dict(prompt="a cat wizard", image=make_image(SIZE, SIZE), num_inference_steps=steps, strength=strength,
                guidance_scale=0.0)
    draws = record_our_noise(monkeypatch)
    out = ours(**args, seed=3, output_type="np")
    left = replay_to_diffusers(monkeypatch, diffusers_xl_img2img, draws, euler_ancestral_module)
    expected = sdxl_turbo_img2img_reference(**args, output_type="np").images
    assert left == [] and out.unet_calls == int(steps * strength)
    assert out.images.shape == expected.shape == (1, SIZE, SIZE, 3)
    assert np.abs(out.images - expected).max() <= MAX_PIXEL_DIFF
    assert out.images.std() > 1e-3


@pytest.mark.slow
def test_sdxl_turbo_cli_generate_needs_no_flags(sdxl_turbo_bundle: Path, tmp_path: Path) -> None:
    out = tmp_path / "xl-turbo.png"
    assert main(["generate", str(sdxl_turbo_bundle), "a cat", "-o", str(out), "--seed", "1", "-q"]) == 0
    parameters = read_png_parameters(out)
    assert (parameters["num_inference_steps"], parameters["guidance_scale"], parameters["scheduler"]) == (1, 0.0, "default")
    assert Image.open(out).size == (128, 128)  # the manifest's default size, from the U-Net's sample_size


# --- defaults of other models, older bundles, bad input ------------------------------------------------------------


def test_sd_bundles_and_bundles_exported_before_keep_diffusers_defaults(tiny_bundle: Path, tmp_path: Path) -> None:
    assert read_manifest(tiny_bundle).defaults == GenerationDefaults(50, 7.5, None)
    old = tmp_path / "old"
    old.mkdir()
    data = json.loads((tiny_bundle / MANIFEST_NAME).read_text())
    del data["defaults"]
    (old / MANIFEST_NAME).write_text(json.dumps(data))
    assert read_manifest(old).defaults == GenerationDefaults(num_inference_steps=50, guidance_scale=7.5, scheduler=None)
    request = GenerationRequest.create(pipe_or_skip(tiny_bundle).limits, "a boat")
    assert (request.num_inference_steps, request.guidance_scale, request.scheduler, request.guided) == (50, 7.5, None, True)


def test_model_defaults_rule(tiny_checkpoint: Path, fewstep_checkpoints) -> None:
    lcm, turbo, plain = (load_checkpoint(p) for p in (fewstep_checkpoints["tiny-lcm"], fewstep_checkpoints["tiny-turbo"], tiny_checkpoint))
    assert model_defaults(plain, "lcm") == GenerationDefaults(4, 1.0, "lcm")  # LCM-LoRA: no guidance
    assert model_defaults(lcm, "lcm") == GenerationDefaults(4, 8.5, "lcm")  # distilled: the embedded scale
    assert model_defaults(turbo, "euler") == GenerationDefaults(1, 0.0, "euler")  # trailing Euler is Turbo's
    assert model_defaults(turbo, "ddim") == GenerationDefaults(50, 7.5, "ddim")
    with pytest.raises(ExportError, match="scheduler 'heun'"):
        model_defaults(plain, "heun")


def test_model_defaults_rule_for_sdxl_turbo(sdxl_turbo_checkpoint: Path) -> None:
    sdxl_turbo = load_checkpoint(sdxl_turbo_checkpoint)
    assert model_defaults(sdxl_turbo) == GenerationDefaults(1, 0.0, None)
    assert model_defaults(sdxl_turbo, "euler") == GenerationDefaults(1, 0.0, "euler")
    assert model_defaults(sdxl_turbo, "ddim") == GenerationDefaults(50, 5.0, "ddim")  # StableDiffusionXLPipeline's


def test_export_refuses_an_unknown_scheduler_before_any_work(tiny_checkpoint: Path, tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="heun"):
        export_bundle(tiny_checkpoint, tmp_path / "out", scheduler="heun")
    assert not (tmp_path / "out").exists()
    assert main(["export", str(tiny_checkpoint), str(tmp_path / "out"), "--scheduler", "heun"]) == 2
    assert not (tmp_path / "out").exists()


def test_lcm_steps_beyond_the_distillation_schedule_are_refused(fewstep_bundles) -> None:
    ours = pipe_or_skip(fewstep_bundles["tiny-lcm"])
    with pytest.raises(ValueError, match=r"num_inference_steps: must be an integer in 1\.\.50 .*LCMScheduler"):
        ours("a boat", num_inference_steps=51, height=SIZE, width=SIZE)


def test_server_runs_the_bundles_defaults(fewstep_bundles) -> None:
    pytest.importorskip("fastapi")
    from tests.test_serve import GENERATE, SpyPipe, _client, _wait_ready

    spy = SpyPipe(pipe_or_skip(fewstep_bundles["tiny-turbo"]))
    with _client(spy) as client:
        _wait_ready(client)
        response = client.post(GENERATE, json={"prompt": "a red circle", "size": "64x64", "seed": 1})
        assert response.status_code == 200, response.text
        response = client.post(GENERATE, json={"prompt": "a red circle", "size": "64x64", "seed": 1, "num_inference_steps": 3})
        assert response.status_code == 200, response.text
    assert spy.calls == [(1, 1), (1, 3)]  # (images, steps): the Turbo bundle's 1 step unless asked for more
