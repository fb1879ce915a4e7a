"""The tiny autoencoder (diffusers' AutoencoderTiny, TAESD, and TAESDXL for SDXL) exported beside the VAE (`sdrt export
--tiny-vae DIR`): decoder="tiny" draws what diffusers' StableDiffusionPipeline and StableDiffusionXLPipeline draw with
`pipe.vae = AutoencoderTiny` on every exact CPU backend (fp32, <= 5e-3), previews in callback_on_step_end, and bad
choices name the parameter and the export flag."""
from __future__ import annotations

import json
from pathlib import Path

import diffusers.schedulers.scheduling_euler_ancestral_discrete as euler_ancestral_module
import numpy as np
import pytest
import torch
from diffusers import AutoencoderTiny, StableDiffusionPipeline, StableDiffusionXLPipeline

from sdrt.cli.main import main
from sdrt.engine.errors import InvalidArgumentError
from sdrt.engine.image_io import read_png_parameters
from sdrt.engine.specs import Component
from sdrt.export import export_bundle
from sdrt.export.errors import CheckpointError
from sdrt.export.random_checkpoint import make_tiny_autoencoder
from tests.pipes import pipe_or_skip
from tests.same_noise import record_our_noise, replay_to_diffusers
from tests.test_fewstep import CPU_BACKENDS
from tests.test_parity import MAX_PIXEL_DIFF

# its bundle's export with the tiny autoencoder takes 30-40 s to set up: in `make test-slow`, to keep `make test` within
# 10 minutes
pytestmark = pytest.mark.slow

ARGS = dict(prompt="a red circle", num_inference_steps=3, guidance_scale=7.5, height=64, width=64)


@pytest.fixture(scope="module")
def taesd_bundle(tiny_checkpoint: Path, tiny_autoencoder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("taesd-bundle") / "bundle"
    assert main(["export", str(tiny_checkpoint), str(out), "--tiny-vae", str(tiny_autoencoder)]) == 0
    return out


def _latents() -> np.ndarray:
    return np.random.default_rng(7).standard_normal((1, 4, 8, 8), dtype=np.float32)


def _reference(checkpoint: Path, tiny_autoencoder: Path | None) -> StableDiffusionPipeline:
    pipe = StableDiffusionPipeline.from_pretrained(checkpoint, safety_checker=None, requires_safety_checker=False)
    if tiny_autoencoder is not None:  # diffusers' way to run TAESD
        pipe.vae = AutoencoderTiny.from_pretrained(tiny_autoencoder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_tiny_decoder_matches_diffusers_with_autoencoder_tiny_as_its_vae(tiny_checkpoint, tiny_autoencoder, taesd_bundle,
                                                                        backend: str) -> None:
    ours = pipe_or_skip(taesd_bundle, backend)
    entry = ours.manifest.components[Component.TINY_VAE_DECODER]
    assert entry.file in ours.manifest.files and ours.manifest.model.tiny_vae_scaling_factor == 1.0
    expected = _reference(tiny_checkpoint, tiny_autoencoder)(**ARGS, latents=torch.from_numpy(_latents()), output_type="np").images
    actual = ours(**ARGS, latents=_latents(), output_type="np", decoder="tiny").images
    assert actual.shape == expected.shape == (1, 64, 64, 3)
    assert np.abs(actual - expected).max() <= MAX_PIXEL_DIFF
    assert actual.std() > 1e-3
    # the default is still the VAE, as the bundle without a tiny decoder draws it
    full = _reference(tiny_checkpoint, None)(**ARGS, latents=torch.from_numpy(_latents()), output_type="np").images
    assert np.abs(ours(**ARGS, latents=_latents(), output_type="np").images - full).max() <= MAX_PIXEL_DIFF
    assert np.abs(full - expected).max() > 20 * MAX_PIXEL_DIFF  # two different decoders: a mix-up would fail


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_taesdxl_matches_diffusers_with_autoencoder_tiny_as_the_sdxl_vae(monkeypatch, sdxl_turbo_checkpoint, tiny_autoencoder,
                                                                        sdxl_turbo_bundle, backend: str) -> None:
    """SDXL-Turbo with TAESDXL, as its demos pair them: the SDXL VAE's latents are scaled by its 0.13025, TAESDXL's
    by 1 (each config's scaling_factor, which diffusers divides by for whichever VAE is set)."""
    ours = pipe_or_skip(sdxl_turbo_bundle, backend)
    vae_config = json.loads((sdxl_turbo_checkpoint / "vae/config.json").read_text())
    tiny_config = json.loads((tiny_autoencoder / "config.json").read_text())
    assert (vae_config["scaling_factor"], tiny_config["scaling_factor"]) == (0.13025, 1.0)
    model = ours.manifest.model
    assert (model.vae_scaling_factor, model.tiny_vae_scaling_factor) == (0.13025, 1.0)
    reference = StableDiffusionXLPipeline.from_pretrained(sdxl_turbo_checkpoint)
    reference.set_progress_bar_config(disable=True)
    images = {}
    for decoder in ("full", "tiny"):
        if decoder == "tiny":
            reference.vae = AutoencoderTiny.from_pretrained(tiny_autoencoder)
        args = dict(prompt="a red circle", num_inference_steps=2, guidance_scale=0.0, height=64, width=64)
        draws = record_our_noise(monkeypatch)
        actual = ours(**args, latents=_latents(), seed=3, output_type="np", decoder=decoder).images
        replay_to_diffusers(monkeypatch, euler_ancestral_module, draws)
        expected = reference(**args, latents=torch.from_numpy(_latents()), output_type="np").images
        assert actual.shape == expected.shape == (1, 64, 64, 3)
        assert np.abs(actual - expected).max() <= MAX_PIXEL_DIFF
        assert actual.std() > 1e-3
        images[decoder] = actual
    assert np.abs(images["full"] - images["tiny"]).max() > 20 * MAX_PIXEL_DIFF  # two different decoders: a mix-up would fail


def test_previews_in_the_step_callback(taesd_bundle: Path) -> None:
    """`pipe.decode(latents, decoder="tiny")` in callback_on_step_end: one preview per step, the last one the image
    a tiny-decoded call returns."""
    ours = pipe_or_skip(taesd_bundle)
    previews = []

    def preview(pipe, step_index: int, timestep: float, tensors: dict) -> dict:
        previews.append(pipe.decode(tensors["latents"], decoder="tiny"))  # (1, 64, 64, 3)
        return tensors

    out = ours(**ARGS, latents=_latents(), output_type="np", decoder="tiny", callback_on_step_end=preview)
    final = out.images
    assert len(previews) == out.unet_calls  # PNDM: 4 calls for 3 steps
    np.testing.assert_array_equal(previews[-1], final)
    assert np.abs(previews[0] - final).max() > 1e-3


def test_cli_decoder_flag(taesd_bundle: Path, tmp_path: Path) -> None:
    out = tmp_path / "tiny.png"
    assert main(["generate", str(taesd_bundle), "a cat", "-o", str(out), "-s", "2", "--height", "64", "--width", "64",
                 "--seed", "4", "-q", "--no-safety-checker", "--decoder", "tiny"]) == 0
    assert read_png_parameters(out)["decoder"] == "tiny"
    assert main(["generate", str(taesd_bundle), "a cat", "-o", str(out), "--decoder", "small"]) == 2


@pytest.mark.parametrize("decoder", ["small", "", None, 1])
def test_unknown_decoder_names_the_choices(taesd_bundle: Path, decoder: object) -> None:
    ours = pipe_or_skip(taesd_bundle)
    with pytest.raises(InvalidArgumentError, match=r"decoder: must be one of full, tiny") as error:
        ours(**ARGS, decoder=decoder)
    assert error.value.parameter == "decoder"
    with pytest.raises(InvalidArgumentError, match=r"decoder: must be one of full, tiny"):
        ours.decode(_latents(), decoder=decoder)


def test_tiny_decoder_of_a_bundle_without_one_names_the_export_flag(tiny_bundle: Path) -> None:
    ours = pipe_or_skip(tiny_bundle)
    with pytest.raises(InvalidArgumentError, match=r"decoder: 'tiny': this bundle has no tiny decoder.*--tiny-vae"):
        ours(**ARGS, decoder="tiny")
    with pytest.raises(InvalidArgumentError, match=r"--tiny-vae"):
        ours.decode(_latents(), decoder="tiny")


def test_a_tiny_autoencoder_of_another_latent_space_is_refused_before_export(tmp_path: Path, checkpoints) -> None:
    """tiny-alt's VAE makes 8-channel latents at 1/4 of the image; TAESD decodes 4 channels 8x up."""
    taesd = make_tiny_autoencoder(tmp_path / "taesd")
    with pytest.raises(CheckpointError, match=r"decodes 4-channel latents upscaled 8x.*8-channel latents at 1/4"):
        export_bundle(checkpoints["tiny-alt"], tmp_path / "out", tiny_vae=taesd)
    assert not (tmp_path / "out").exists()
    with pytest.raises(CheckpointError, match="not AutoencoderTiny"):
        export_bundle(checkpoints["tiny"], tmp_path / "out", tiny_vae=checkpoints["tiny"] / "vae")


def test_server_decoder_field(taesd_bundle: Path) -> None:
    pytest.importorskip("fastapi")
    from tests.test_serve import GENERATE, _client, _decode, _wait_ready

    ours = pipe_or_skip(taesd_bundle)
    with _client(ours) as client:
        _wait_ready(client)
        body = {"prompt": "a red circle", "size": "64x64", "seed": 5, "num_inference_steps": 2}
        tiny = client.post(GENERATE, json={**body, "decoder": "tiny"})
        assert tiny.status_code == 200, tiny.text
        full = _decode(client.post(GENERATE, json=body).json()["data"][0])
        assert client.post(GENERATE, json={**body, "decoder": "small"}).status_code == 422
    expected = ours("a red circle", height=64, width=64, seed=5, num_inference_steps=2, decoder="tiny").images[0]
    np.testing.assert_array_equal(_decode(tiny.json()["data"][0]), np.asarray(expected))
    assert np.abs(full.astype(int) - np.asarray(expected).astype(int)).max() > 10
