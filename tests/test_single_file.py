"""Single-file checkpoints (`sdrt export model.safetensors|.ckpt OUT`): the tiny SD 1.x and SDXL checkpoints written in
their original layouts (tests/ldm_layout.py, checked against diffusers' own conversion) export, offline, to bundles
that draw the same images as the bundles of their diffusers directories; a malicious .ckpt is refused without running
its code; other model families and malformed files are refused by name; the configs shipped for SD 1.5 and SDXL base
fit their key layouts."""
from __future__ import annotations

import hashlib
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import sdrt.engine
from sdrt.cli.main import main
from sdrt.engine.errors import InvalidArgumentError
from sdrt.export import CheckpointError, export_bundle
from sdrt.export.random_checkpoint import ARCHES, make_random_checkpoint, write_config_directory
from sdrt.export.single_file import convert_single_file, detect_arch, open_single_file
from tests.ldm_layout import (
    SDXL_TEXT_2_PREFIX,
    SDXL_TEXT_PREFIX,
    TEXT_PREFIX,
    UNET_PREFIX,
    VAE_PREFIX,
    open_clip_to_ldm,
    unet_to_ldm,
    vae_to_ldm,
    write_sdxl_single_file,
    write_single_file,
)
from tests.test_parity import MAX_PIXEL_DIFF

ARGS = dict(prompt="a red circle", num_inference_steps=3, guidance_scale=7.5, height=64, width=64)


def _images(bundle: Path) -> np.ndarray:
    pipe = sdrt.engine.load(bundle, backend="onnxruntime-cpu", safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    f = pipe.vae_scale_factor
    latents = np.random.default_rng(7).standard_normal((1, pipe.manifest.model.latent_channels, 64 // f, 64 // f), dtype=np.float32)
    return pipe(**ARGS, latents=latents, output_type="np").images


@pytest.fixture(scope="module")
def single_files(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("single_files")
    return {suffix: write_single_file(tiny_checkpoint, root / f"tiny{suffix}") for suffix in (".safetensors", ".ckpt")}


def test_the_fixture_layout_is_the_one_diffusers_converts(single_files: dict[str, Path], tiny_checkpoint: Path) -> None:
    from diffusers import AutoencoderKL, UNet2DConditionModel

    for model_class, folder in ((UNet2DConditionModel, "unet"), (AutoencoderKL, "vae")):
        converted = model_class.from_single_file(str(single_files[".safetensors"]), config=str(tiny_checkpoint), subfolder=folder,
                                                 local_files_only=True).state_dict()
        original = model_class.from_pretrained(tiny_checkpoint / folder).state_dict()
        assert converted.keys() == original.keys()
        assert all(torch.equal(converted[name], original[name]) for name in original), folder


@pytest.mark.parametrize("suffix", [".safetensors", pytest.param(".ckpt", marks=pytest.mark.slow)])
def test_a_single_file_exports_to_the_bundle_of_its_diffusers_directory(
    single_files: dict[str, Path], tiny_checkpoint: Path, tiny_bundle: Path, tmp_path: Path, suffix: str
) -> None:
    path = single_files[suffix]
    out = tmp_path / "bundle"
    # the CLI, as users run it: the tiny arch's configs are the fixture checkpoint's own
    assert main(["export", str(path), str(out), "--config", str(tiny_checkpoint), "--no-quantize"]) == 0
    manifest = sdrt.engine.load(out, backend="onnxruntime-cpu", safety_checker=False).manifest
    assert manifest.source_checkpoint == str(path.resolve())
    assert manifest.source_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert np.abs(_images(out) - _images(tiny_bundle)).max() <= MAX_PIXEL_DIFF
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]  # the converted checkpoint is gone


def test_configs_written_from_an_arch_read_its_single_files(single_files: dict[str, Path], tiny_checkpoint: Path, tmp_path: Path) -> None:
    """The default path without a full-size file: configs written from the `tiny` CheckpointArch, as those of `sd15`
    are for SD 1.5 files, convert the tiny file back into exactly the checkpoint it came from."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    configs = write_config_directory("tiny", tmp_path / "configs")
    converted = convert_single_file(open_single_file(single_files[".ckpt"], configs, tmp_path), tmp_path / "converted")
    for model_class, folder in ((UNet2DConditionModel, "unet"), (AutoencoderKL, "vae"), (CLIPTextModel, "text_encoder")):
        actual = model_class.from_pretrained(converted / folder).state_dict()
        expected = model_class.from_pretrained(tiny_checkpoint / folder).state_dict()
        assert actual.keys() == expected.keys() and all(torch.equal(actual[k], expected[k]) for k in expected), folder
    for name in ("tokenizer/vocab.json", "tokenizer/merges.txt", "scheduler/scheduler_config.json"):
        assert (converted / name).read_text() == (tiny_checkpoint / name).read_text(), name


def test_fp16_files_as_model_sites_share_them_convert_to_fp32(single_files: dict[str, Path], tiny_checkpoint: Path, tmp_path: Path) -> None:
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file

    half = _save(tmp_path, "half.safetensors", {k: v.half() for k, v in load_file(str(single_files[".safetensors"])).items()})
    converted = convert_single_file(open_single_file(half, tiny_checkpoint, tmp_path), tmp_path / "converted")
    actual = UNet2DConditionModel.from_pretrained(converted / "unet").state_dict()
    expected = UNet2DConditionModel.from_pretrained(tiny_checkpoint / "unet").state_dict()
    assert all(actual[k].dtype == torch.float32 and torch.equal(actual[k], expected[k].half().float()) for k in expected)


def test_a_malicious_ckpt_is_refused_and_its_code_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):  # what unpickling calls: here, code that writes the marker file
            return (exec, (f"open({str(marker)!r}, 'w').write('code ran')",))

    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": {"model.diffusion_model.conv.weight": torch.zeros(1), "payload": Payload()}}, path)
    with pytest.raises(CheckpointError, match=r"model\.ckpt: refused: .*weights-only loader, which runs no code"):
        export_bundle(path, tmp_path / "bundle")
    assert not marker.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.ckpt"]  # no bundle, no staging left
    torch.load(path, weights_only=False)  # the file is armed: an unsafe load runs the payload
    assert marker.read_text() == "code ran"


def _save(tmp_path: Path, name: str, tensors: dict[str, torch.Tensor]) -> Path:
    save_file(tensors, str(tmp_path / name))
    return tmp_path / name


def test_other_families_and_malformed_files_are_refused_by_name(single_files: dict[str, Path], tmp_path: Path) -> None:
    refiner = _save(tmp_path, "refiner.safetensors", {f"{UNET_PREFIX}input_blocks.0.0.weight": torch.zeros(384, 4, 3, 3),
                                                      "conditioner.embedders.0.model.ln_final.weight": torch.zeros(1280)})
    with pytest.raises(CheckpointError, match="refiner.safetensors is an SDXL refiner checkpoint"):
        export_bundle(refiner, tmp_path / "out")
    with pytest.raises(CheckpointError, match="refiner.safetensors is an SDXL refiner checkpoint"):  # configs given or not
        export_bundle(refiner, tmp_path / "out", config=single_files[".safetensors"].parent)
    sd2 = _save(tmp_path, "sd2.safetensors", {"cond_stage_model.model.token_embedding.weight": torch.zeros(8, 4)})
    with pytest.raises(CheckpointError, match="Stable Diffusion 2.x"):
        export_bundle(sd2, tmp_path / "out")
    sdxl_part = _save(tmp_path, "sdxl.safetensors", {f"{UNET_PREFIX}input_blocks.0.0.weight": torch.zeros(320, 4, 3, 3),
                                                     f"{SDXL_TEXT_2_PREFIX}ln_final.weight": torch.zeros(1280)})
    with pytest.raises(CheckpointError, match=r"not a Stable Diffusion XL base checkpoint in the original \(SGM\) layout: no VAE .*, CLIP ViT-L"):
        export_bundle(sdxl_part, tmp_path / "out")
    vae_only = _save(tmp_path, "vae.safetensors", {f"{VAE_PREFIX}encoder.conv_in.weight": torch.zeros(1)})
    with pytest.raises(CheckpointError, match=r"not a Stable Diffusion 1.x checkpoint .*no U-Net \(model\.diffusion_model\.\*\), CLIP text encoder"):
        export_bundle(vae_only, tmp_path / "out")
    # the tiny file has SD 1.x's layout but not its sizes: sdrt has no configs for it unless given
    with pytest.raises(CheckpointError, match="Stable Diffusion 1.x layout but not the sizes of sd15 .*--config DIR"):
        export_bundle(single_files[".safetensors"], tmp_path / "out")
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(single_files[".safetensors"].read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="truncated.safetensors: cannot read as a .safetensors file"):
        export_bundle(truncated, tmp_path / "out")
    not_a_pickle = tmp_path / "text.ckpt"
    not_a_pickle.write_text("hello")
    with pytest.raises(CheckpointError, match=r"text.ckpt: (refused|cannot read)"):
        export_bundle(not_a_pickle, tmp_path / "out")
    other = tmp_path / "model.bin"
    other.write_bytes(b"")
    with pytest.raises(CheckpointError, match="model.bin is a file: .*single-file checkpoints named .safetensors or .ckpt"):
        export_bundle(other, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_config_applies_to_single_files_only(tiny_checkpoint: Path, tmp_path: Path) -> None:
    with pytest.raises(InvalidArgumentError, match="config: applies to single-file checkpoints"):
        export_bundle(tiny_checkpoint, tmp_path / "out", config=tiny_checkpoint)


def test_sd15_is_detected_and_its_shipped_configs_fit_sd15_files(tmp_path: Path) -> None:
    """Without converting full-size weights: SD 1.5's LDM key names (built from the shipped configs on the meta
    device, as SD 1.5 files name them) are all converted by diffusers, with these configs, into exactly the
    parameters of the models they describe."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    configs = write_config_directory("sd15", tmp_path / "sd15")
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(configs / "unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(configs / "vae"))
    assert sum(p.numel() for p in unet.parameters()) == 859_520_964  # Stable Diffusion 1.5's U-Net
    ldm = {**{UNET_PREFIX + k: v for k, v in unet_to_ldm(unet.state_dict(), unet.config).items()},
           **{VAE_PREFIX + k: v for k, v in vae_to_ldm(vae.state_dict(), vae.config).items()}}
    assert convert_ldm_unet_checkpoint(ldm, unet.config).keys() == unet.state_dict().keys()
    assert convert_ldm_vae_checkpoint(ldm, vae.config).keys() == vae.state_dict().keys()

    sd15 = ARCHES["sd15"]
    shapes = {f"{UNET_PREFIX}input_blocks.0.0.weight": (sd15.unet_block_out_channels[0], sd15.latent_channels, 3, 3),
              f"{TEXT_PREFIX}embeddings.token_embedding.weight": (49408, sd15.text_hidden_size),
              f"{VAE_PREFIX}encoder.conv_in.weight": (sd15.vae_block_out_channels[0], 3, 3, 3)}
    state_dict = {name: torch.zeros(1).expand(shape) for name, shape in shapes.items()}  # shapes without memory
    assert detect_arch(state_dict, tmp_path / "sd15.safetensors") == "sd15"
    state_dict[f"{UNET_PREFIX}input_blocks.0.0.weight"] = torch.zeros(1).expand(320, 9, 3, 3)  # an inpainting U-Net
    with pytest.raises(CheckpointError, match="Stable Diffusion 1.x layout but not the sizes of sd15"):
        detect_arch(state_dict, tmp_path / "inpainting.safetensors")


@pytest.fixture(scope="module")
def sdxl_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_random_checkpoint(tmp_path_factory.mktemp("sdxl") / "checkpoint", "tiny-sdxl", seed=1234)


@pytest.fixture(scope="module")
def sdxl_single_file(sdxl_checkpoint: Path) -> Path:
    return write_sdxl_single_file(sdxl_checkpoint, sdxl_checkpoint.parent / "tiny-sdxl.safetensors")


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> list:
    """Record every attempt to reach the network (and fail it): the single-file path must need none. Name lookups
    are caught too: without DNS they fail before any connect."""
    attempts = []

    def refuse(address):
        attempts.append(address)
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket, "getaddrinfo", lambda host, *args, **kwargs: refuse(host))
    monkeypatch.setattr(socket.socket, "connect", lambda sock, address: refuse(address))
    return attempts


def test_the_sdxl_fixture_layout_is_the_one_diffusers_converts(sdxl_single_file: Path, sdxl_checkpoint: Path, no_network: list) -> None:
    """diffusers' own SDXL single-file pipeline loader, given the checkpoint's configs, reads every tensor back."""
    from diffusers import StableDiffusionXLPipeline

    converted = StableDiffusionXLPipeline.from_single_file(str(sdxl_single_file), config=str(sdxl_checkpoint), local_files_only=True)
    original = StableDiffusionXLPipeline.from_pretrained(sdxl_checkpoint)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        actual, expected = getattr(converted, name).state_dict(), getattr(original, name).state_dict()
        assert actual.keys() == expected.keys() and all(torch.equal(actual[k], expected[k]) for k in expected), name
    assert no_network == []


def test_configs_written_from_an_sdxl_arch_give_back_the_checkpoint_file_for_file(
    sdxl_single_file: Path, sdxl_checkpoint: Path, tmp_path: Path, no_network: list
) -> None:
    """The default path without a full-size file: configs written from the `tiny-sdxl` SdxlArch, as those of `sdxl`
    are for SDXL base files, convert the tiny file back into exactly the checkpoint it came from: the same weights
    (bit for bit), tokenizers, scheduler and model index."""
    configs = write_config_directory("tiny-sdxl", tmp_path / "configs")
    converted = convert_single_file(open_single_file(sdxl_single_file, configs, tmp_path), tmp_path / "converted")
    files = sorted(p.relative_to(sdxl_checkpoint) for p in sdxl_checkpoint.rglob("*") if p.is_file())
    assert sorted(p.relative_to(converted) for p in converted.rglob("*") if p.is_file()) == files
    assert all((converted / name).read_bytes() == (sdxl_checkpoint / name).read_bytes() for name in files)
    assert no_network == []


def _sdxl_images(bundle: Path) -> np.ndarray:
    pipe = sdrt.engine.load(bundle, backend="onnxruntime-cpu", safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    latents = np.random.default_rng(7).standard_normal((1, 4, 8, 8), dtype=np.float32)  # 64 px / 8
    return pipe(**ARGS, latents=latents, output_type="np").images


@pytest.mark.slow
def test_an_sdxl_single_file_exports_to_the_bundle_of_its_diffusers_directory(
    sdxl_single_file: Path, sdxl_checkpoint: Path, tmp_path: Path, no_network: list
) -> None:
    out = tmp_path / "bundle"
    # the CLI, as users run it: the tiny arch's configs are the fixture checkpoint's own
    assert main(["export", str(sdxl_single_file), str(out), "--config", str(sdxl_checkpoint), "--no-quantize"]) == 0
    assert no_network == []
    directory = export_bundle(sdxl_checkpoint, tmp_path / "directory-bundle", quantize=False)
    manifest = sdrt.engine.load(out, backend="onnxruntime-cpu", safety_checker=False).manifest
    assert manifest.sdxl is not None and manifest.source_sha256 == hashlib.sha256(sdxl_single_file.read_bytes()).hexdigest()
    ours = _sdxl_images(out)
    assert ours.std() > 1e-3
    assert np.abs(ours - _sdxl_images(directory)).max() <= MAX_PIXEL_DIFF
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle", "directory-bundle"]  # the converted checkpoint is gone


def test_an_sdxl_file_without_its_second_encoders_configs_is_refused(sdxl_single_file: Path, tiny_checkpoint: Path, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"lacks text_encoder_2/config.json \(.*tiny-sdxl.safetensors is a Stable Diffusion XL base checkpoint\)"):
        export_bundle(sdxl_single_file, tmp_path / "out", config=tiny_checkpoint)  # an SD 1.x checkpoint's configs
    with pytest.raises(CheckpointError, match="Stable Diffusion XL base layout but not the sizes of sdxl .*--config DIR"):
        export_bundle(sdxl_single_file, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_sdxl_is_detected_and_its_shipped_configs_fit_sdxl_files(tmp_path: Path) -> None:
    """Without converting full-size weights: SDXL base's SGM key names (built from the shipped configs on the meta
    device, as SDXL files name them) are all converted by diffusers, with these configs, into exactly the parameters
    of the models they describe."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint, convert_open_clip_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    configs = write_config_directory("sdxl", tmp_path / "sdxl")
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(configs / "unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(configs / "vae"))
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(configs / "text_encoder_2"))
    assert sum(p.numel() for p in unet.parameters()) == 2_567_463_684  # SDXL base 1.0's U-Net
    ldm = {**{UNET_PREFIX + k: v for k, v in unet_to_ldm(unet.state_dict(), unet.config).items()},
           **{VAE_PREFIX + k: v for k, v in vae_to_ldm(vae.state_dict(), vae.config).items()},
           **{SDXL_TEXT_2_PREFIX + k: v for k, v in open_clip_to_ldm(text_encoder_2.state_dict()).items()}}
    assert convert_ldm_unet_checkpoint(ldm, unet.config).keys() == unet.state_dict().keys()
    assert convert_ldm_vae_checkpoint(ldm, vae.config).keys() == vae.state_dict().keys()
    assert convert_open_clip_checkpoint(text_encoder_2, ldm, prefix=SDXL_TEXT_2_PREFIX).keys() == text_encoder_2.state_dict().keys()

    sdxl = ARCHES["sdxl"]
    shapes = {f"{UNET_PREFIX}input_blocks.0.0.weight": (320, 4, 3, 3),
              f"{SDXL_TEXT_PREFIX}embeddings.token_embedding.weight": (49408, 768),
              f"{SDXL_TEXT_2_PREFIX}token_embedding.weight": (49408, 1280),
              f"{SDXL_TEXT_2_PREFIX}text_projection": (1280, 1280),
              f"{VAE_PREFIX}encoder.conv_in.weight": (sdxl.vae_block_out_channels[0], 3, 3, 3)}
    state_dict = {name: torch.zeros(1).expand(shape) for name, shape in shapes.items()}  # shapes without memory
    assert detect_arch(state_dict, tmp_path / "sdxl.safetensors") == "sdxl"
    state_dict[f"{UNET_PREFIX}input_blocks.0.0.weight"] = torch.zeros(1).expand(320, 9, 3, 3)  # an inpainting U-Net
    with pytest.raises(CheckpointError, match="Stable Diffusion XL base layout but not the sizes of sdxl"):
        detect_arch(state_dict, tmp_path / "inpainting.safetensors")
