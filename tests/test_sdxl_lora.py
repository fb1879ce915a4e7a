"""LoRA on SDXL: files covering the U-Net and both text encoders (diffusers/PEFT `text_encoder_2.*`, kohya
`lora_te1_*` / `lora_te2_*`), fused at export and loaded at run time, draw what diffusers' StableDiffusionXLPipeline
draws with the deltas added to its weights by hand; the second encoder's deltas count; a bundle exported before the
second encoder had a refit map still takes LoRAs for the other models and names the re-export for one that needs it."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline

from sdrt.cli.main import main
from sdrt.engine.errors import NoRefitMapError
from sdrt.engine.lora import lora_deltas
from sdrt.engine.manifest import MANIFEST_NAME, describe_files
from sdrt.engine.specs import Component
from sdrt.export import export_bundle
from sdrt.export.lora_fusion import LoraSpec, fused_deltas
from sdrt.export.random_checkpoint import make_random_checkpoint, write_config_directory
from tests.pipes import pipe_or_skip
from tests.test_lora import _make_lora
from tests.test_parity import MAX_PIXEL_DIFF

SCALE = 0.8
ARGS = dict(prompt="a red circle", num_inference_steps=3, guidance_scale=7.5, height=64, width=64)


def _latents() -> np.ndarray:
    return np.random.default_rng(7).standard_normal((1, 4, 8, 8), dtype=np.float32)  # 64 px / 8


@pytest.fixture(scope="module")
def sdxl_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_random_checkpoint(tmp_path_factory.mktemp("sdxl") / "checkpoint", "tiny-sdxl", seed=1234)


@pytest.fixture(scope="module")
def sdxl_bundle(sdxl_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_bundle(sdxl_checkpoint, tmp_path_factory.mktemp("sdxl-bundle") / "bundle", quantize=False)


def _ours(pipe) -> np.ndarray:
    return pipe(**ARGS, latents=_latents(), output_type="np").images


def _diffusers_with(checkpoint: Path, deltas: dict[str, dict[str, torch.Tensor]], scale: float) -> np.ndarray:
    reference = StableDiffusionXLPipeline.from_pretrained(checkpoint)
    reference.set_progress_bar_config(disable=True)
    with torch.no_grad():
        for component, component_deltas in deltas.items():
            parameters = dict(getattr(reference, component).named_parameters())
            for name, delta in component_deltas.items():
                parameters[name] += scale * delta
    return reference(**ARGS, latents=torch.from_numpy(_latents()), output_type="np").images


def test_sdxl_lora_keys_of_both_formats_name_the_second_encoders_weights(sdxl_checkpoint: Path, tmp_path: Path) -> None:
    """Without exporting: both formats' keys resolve to the parameters of all three models, at run time and at
    export, with the deltas the test computed with torch."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    parameters = {
        Component.UNET: dict(UNet2DConditionModel.from_pretrained(sdxl_checkpoint / "unet").named_parameters()).keys(),
        Component.TEXT_ENCODER: dict(CLIPTextModel.from_pretrained(sdxl_checkpoint / "text_encoder").named_parameters()).keys(),
        Component.TEXT_ENCODER_2: dict(CLIPTextModelWithProjection.from_pretrained(sdxl_checkpoint / "text_encoder_2").named_parameters()).keys(),
    }
    for key_format in ("peft", "kohya"):
        path = tmp_path / f"{key_format}.safetensors"
        expected = _make_lora(sdxl_checkpoint, key_format, path)
        assert set(expected) == {"unet", "text_encoder", "text_encoder_2"}
        actual = lora_deltas(path, SCALE, parameters)
        assert {c.value: set(d) for c, d in actual.items()} == {c: set(d) for c, d in expected.items()}, key_format
        # the exporter reads them the same way, against the names and shapes of the configs alone
        fused, _ = fused_deltas([LoraSpec(path, SCALE)], write_config_directory("tiny-sdxl", tmp_path / "configs"))
        for deltas in (actual, fused):
            for component, component_deltas in expected.items():
                assert set(deltas[Component(component)]) == set(component_deltas)
                for name, delta in component_deltas.items():
                    np.testing.assert_allclose(deltas[Component(component)][name], SCALE * delta.numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_an_sdxl_lora_fused_at_export_draws_what_the_runtime_lora_and_diffusers_draw(
    sdxl_checkpoint: Path, sdxl_bundle: Path, tmp_path: Path
) -> None:
    lora = tmp_path / "style.safetensors"
    deltas = _make_lora(sdxl_checkpoint, "peft", lora)
    fused = tmp_path / "fused"
    assert main(["export", str(sdxl_checkpoint), str(fused), "--lora", f"{lora}:{SCALE}", "--no-quantize"]) == 0
    actual = _ours(pipe_or_skip(fused))

    base = pipe_or_skip(sdxl_bundle)
    unfused = _ours(base)
    base.load_lora(lora, scale=SCALE)
    assert np.abs(actual - _ours(base)).max() <= MAX_PIXEL_DIFF
    assert np.abs(actual - _diffusers_with(sdxl_checkpoint, deltas, SCALE)).max() <= MAX_PIXEL_DIFF
    assert np.abs(actual - unfused).max() > 20 * MAX_PIXEL_DIFF  # the LoRA changes the image: a no-op would fail
    # the second encoder's deltas count: diffusers without them draws another image
    without_second = _diffusers_with(sdxl_checkpoint, {k: v for k, v in deltas.items() if k != "text_encoder_2"}, SCALE)
    assert np.abs(actual - without_second).max() > 10 * MAX_PIXEL_DIFF


@pytest.mark.slow
def test_a_kohya_sdxl_lora_at_run_time_matches_diffusers(sdxl_checkpoint: Path, sdxl_bundle: Path, tmp_path: Path) -> None:
    lora = tmp_path / "kohya.safetensors"
    deltas = _make_lora(sdxl_checkpoint, "kohya", lora, seed=3)
    pipe = pipe_or_skip(sdxl_bundle)
    for component in deltas:  # every target is patchable: the export mapped it
        refit_map = pipe.manifest.components[Component(component)].refit_map
        assert refit_map in pipe.manifest.files
    base = _ours(pipe)
    pipe.load_lora(lora, scale=SCALE)
    assert np.abs(_ours(pipe) - _diffusers_with(sdxl_checkpoint, deltas, SCALE)).max() <= MAX_PIXEL_DIFF
    pipe.unload_lora()
    np.testing.assert_array_equal(_ours(pipe), base)


@pytest.mark.slow
def test_a_bundle_without_the_second_encoders_refit_map_takes_loras_for_the_others(
    sdxl_checkpoint: Path, sdxl_bundle: Path, tmp_path: Path
) -> None:
    old = shutil.copytree(sdxl_bundle, tmp_path / "old", ignore=shutil.ignore_patterns(".cache"))
    data = json.loads((old / MANIFEST_NAME).read_text())
    entry = data["components"][Component.TEXT_ENCODER_2.value]  # as an sdrt before it had one wrote it
    (old / entry.pop("refit_map")).unlink()
    data["files"] = {name: vars(entry) for name, entry in describe_files(old).items()}
    (old / MANIFEST_NAME).write_text(json.dumps(data))
    pipe = pipe_or_skip(old)
    first = tmp_path / "first.safetensors"
    deltas = _make_lora(sdxl_checkpoint, "peft", first, components=("unet", "text_encoder"))
    pipe.load_lora(first, scale=SCALE)
    assert np.abs(_ours(pipe) - _diffusers_with(sdxl_checkpoint, deltas, SCALE)).max() <= MAX_PIXEL_DIFF
    _make_lora(sdxl_checkpoint, "kohya", tmp_path / "all.safetensors")
    with pytest.raises(NoRefitMapError, match=r"no refit map for text_encoder_2 .*re-export it with `sdrt export"):
        pipe.load_lora(tmp_path / "all.safetensors")
