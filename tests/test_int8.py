"""`sdrt quantize` and the openvino-int8 backend: the int8 U-Net and VAE decoder are calibrated on the bundle's own
runs, written into the bundle atomically, preferred by "auto" only in a bundle that has both, and stay close to fp32."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

import sdrt.engine
from sdrt.engine.backends import backend_class
from sdrt.engine.backends.openvino.backend import OpenVINOInt8Backend
from sdrt.engine.backends.openvino.cache import CACHE_SUBDIR, COMPILED_SUBDIR
from sdrt.engine.backends.openvino.int8_location import INT8_COMPONENTS, int8_model_file
from sdrt.engine.errors import BackendUnavailableError, InvalidArgumentError
from sdrt.engine.specs import Component

pytestmark = pytest.mark.skipif(OpenVINOInt8Backend.unavailable_reason() is not None, reason="no OpenVINO bf16 on this CPU")
nncf = pytest.importorskip("nncf")

from sdrt.export.quantize import Calibration, quantize_models  # noqa: E402  (needs nncf)


@pytest.fixture(scope="module")
def quantized_bundle(tiny_bundle: Path, tmp_path_factory) -> Path:
    bundle = Path(shutil.copytree(tiny_bundle, tmp_path_factory.mktemp("int8") / "bundle", ignore=shutil.ignore_patterns(".cache")))
    quantize_models(bundle, Calibration(prompts=2, num_inference_steps=3, size=64))
    return bundle


def _int8_file(bundle: Path, component: Component) -> Path:
    pipe = sdrt.engine.load(bundle, backend="openvino-fp32")
    return int8_model_file(bundle, component, pipe.backend.components[component].digest)


@pytest.mark.parametrize("component", INT8_COMPONENTS)
def test_each_int8_model_is_written_into_the_bundle_for_its_component(quantized_bundle: Path, component: Component) -> None:
    written = _int8_file(quantized_bundle, component)
    assert written.is_file() and written.with_suffix(".bin").is_file()
    assert not [p for p in written.parent.parent.iterdir() if p.name.startswith(".")]  # no staging left behind


def test_auto_prefers_int8_in_a_quantized_bundle_and_it_stays_close_to_fp32(quantized_bundle: Path) -> None:
    assert sdrt.engine.load(quantized_bundle).backend.name == "openvino-int8"  # "auto"
    assert sdrt.engine.load(quantized_bundle, backend="exact").backend.name == "openvino-fp32"
    latents = np.random.default_rng(0).standard_normal((1, 4, 8, 8), dtype=np.float32)
    images = {}
    for backend in ("openvino-int8", "openvino-fp32"):
        pipe = sdrt.engine.load(quantized_bundle, backend=backend, safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        result = pipe("a cat", num_inference_steps=5, height=64, width=64, latents=latents, output_type="np")
        assert result.backend == backend
        images[backend] = result.images
    mse = np.mean((images["openvino-int8"] - images["openvino-fp32"]) ** 2)
    assert mse > 0  # the quantized U-Net really ran
    assert 10 * np.log10(1 / mse) > 20  # dB; bf16 on this bundle: > 30


def test_calibration_records_every_unet_and_decoder_call(tiny_bundle: Path) -> None:
    from sdrt.export.quantize import _recorded_inputs

    pipe = sdrt.engine.load(tiny_bundle, backend="openvino-fp32", safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    samples = _recorded_inputs(pipe, Calibration(prompts=2, num_inference_steps=3, size=64))
    assert len(samples[Component.UNET]) == 2 * (3 + 1)  # PNDM: N + 1 U-Net calls for N steps
    assert samples[Component.UNET][0]["sample"].shape == (2, 4, 8, 8)  # (2B, C, H/8, W/8): guidance's batch of two
    assert [s["latent_sample"].shape for s in samples[Component.VAE_DECODER]] == [(1, 4, 8, 8)] * 2  # one per run
    assert "run" not in vars(pipe.backend)  # the backend is left as it was


def test_a_bundle_without_an_int8_unet_names_the_command(tiny_bundle: Path) -> None:
    with pytest.raises(BackendUnavailableError, match="sdrt quantize"):
        sdrt.engine.load(tiny_bundle, backend="openvino-int8")
    assert backend_class("auto", tiny_bundle).name == "openvino-bf16"  # the next fastest


def test_a_bundle_quantized_before_its_decoder_was_names_the_command(quantized_bundle: Path, tmp_path: Path) -> None:
    bundle = Path(shutil.copytree(quantized_bundle, tmp_path / "bundle", ignore=shutil.ignore_patterns(".cache")))
    shutil.rmtree(_int8_file(bundle, Component.VAE_DECODER).parent)
    with pytest.raises(BackendUnavailableError, match=r"no int8 vae_decoder: run `sdrt quantize"):
        sdrt.engine.load(bundle, backend="openvino-int8")
    assert backend_class("auto", bundle).name == "openvino-bf16"


def test_the_int8_decoder_is_what_int8_decodes_with_and_it_stays_close_to_fp32(quantized_bundle: Path) -> None:
    exact = sdrt.engine.load(quantized_bundle, backend="openvino-fp32", safety_checker=False)
    exact.set_progress_bar_config(disable=True)
    # (B, 4, H/8, W/8) latents as the decoder gets them (the pipeline's scaling), of a prompt not calibrated on
    latents = exact("a dog on a beach", num_inference_steps=5, height=64, width=64, seed=3, output_type="latent").images
    latents = (latents / np.float32(exact.manifest.model.vae_scaling_factor)).astype(np.float32)
    decoded = {}
    for backend in ("openvino-int8", "openvino-bf16", "openvino-fp32"):
        pipe = sdrt.engine.load(quantized_bundle, backend=backend, safety_checker=False)
        decoded[backend] = pipe.backend.run(Component.VAE_DECODER, {"latent_sample": latents})[0]  # (B, 3, H, W)
    images = {backend: np.clip(sample / 2 + 0.5, 0, 1) for backend, sample in decoded.items()}  # as the pipeline maps them
    mse = {backend: np.mean((image - images["openvino-fp32"]) ** 2) for backend, image in images.items()}
    assert mse["openvino-int8"] > 4 * mse["openvino-bf16"]  # not the bf16 decoder
    assert 10 * np.log10(1 / mse["openvino-int8"]) > 25  # dB; 27 on this bundle, bf16 55, SD 1.5 42 (design-notes)


@pytest.mark.slow  # a calibration run: 10 s
def test_a_failed_quantization_leaves_no_int8_model(tiny_bundle: Path, tmp_path: Path, monkeypatch) -> None:
    bundle = Path(shutil.copytree(tiny_bundle, tmp_path / "bundle", ignore=shutil.ignore_patterns(".cache")))

    import openvino

    real_save = openvino.save_model

    def failing_save(model, path, *args, **kwargs):
        # Only the int8 models' writes fail: calibration's exact pipeline saves its own converted U-Net (Winograd).
        if "int8" in Path(path).relative_to(bundle).parts:
            raise OSError("disk full")
        return real_save(model, path, *args, **kwargs)

    monkeypatch.setattr("openvino.save_model", failing_save)
    with pytest.raises(OSError, match="disk full"):
        quantize_models(bundle, Calibration(prompts=1, num_inference_steps=1, size=64))
    assert not _int8_file(bundle, Component.UNET).parent.exists()
    assert not any((bundle / "int8").iterdir())


@pytest.mark.parametrize(("field", "value"), [("prompts", 0), ("prompts", 9), ("num_inference_steps", 0)])
def test_calibration_settings_are_checked(field: str, value: int) -> None:
    with pytest.raises(InvalidArgumentError, match=field):
        Calibration(**{field: value})


@pytest.mark.slow  # it quantizes, 7-10 s (CI runs the slow tests too)
def test_the_cli_quantizes_and_prints_where(tiny_bundle: Path, tmp_path: Path, capsys) -> None:
    from sdrt.cli.main import main

    bundle = Path(shutil.copytree(tiny_bundle, tmp_path / "bundle", ignore=shutil.ignore_patterns(".cache")))
    assert main(["quantize", str(bundle), "--prompts", "1", "-s", "1", "--size", "64"]) == 0
    printed = [Path(line) for line in capsys.readouterr().out.strip().splitlines()[-len(INT8_COMPONENTS):]]
    assert printed == [_int8_file(bundle, component) for component in INT8_COMPONENTS]
    assert all(path.is_file() for path in printed)
    assert main(["quantize", str(bundle), "--prompts", "0"]) == 2  # argparse: must be positive


def test_doctor_names_int8_as_the_choice_for_quantized_bundles_only() -> None:
    from sdrt.engine.diagnostics import _choice

    choice = _choice("auto")
    assert "openvino-int8 (bundles prepared for it) / " in choice and not choice.endswith("openvino-int8")


def test_auto_on_a_bundle_not_quantized_says_so_without_a_warning(tiny_bundle: Path, caplog) -> None:
    # int8 is the owner's choice (it trades accuracy for speed): its absence is not a problem to warn about, unlike
    # TensorRT engines missing on a GPU machine. The fix is still named, at INFO.
    import logging

    import sdrt.engine

    with caplog.at_level(logging.INFO, logger="sdrt.engine.backends"):
        pipe = sdrt.engine.load(tiny_bundle, backend="auto", safety_checker=False)

    assert pipe.backend.name != "openvino-int8"
    int8_records = [r for r in caplog.records if "openvino-int8" in r.getMessage()]
    assert [r.levelno for r in int8_records] == [logging.INFO]
    assert "sdrt quantize" in int8_records[0].getMessage()


@pytest.mark.slow
def test_quantizing_again_drops_what_was_compiled_from_the_replaced_models(quantized_bundle: Path, tmp_path: Path) -> None:
    bundle = Path(shutil.copytree(quantized_bundle, tmp_path / "bundle"))
    for backend in ("openvino-int8", "openvino-bf16"):
        pipe = sdrt.engine.load(bundle, backend=backend, safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        pipe("a cat", num_inference_steps=1, height=64, width=64, seed=0)
    compiled = bundle / CACHE_SUBDIR / COMPILED_SUBDIR
    before = {entry.name for entry in compiled.iterdir()}
    int8_entries = {name for name in before if "-int8" in name}
    assert {name.split("-")[0] for name in int8_entries} == {component.value for component in INT8_COMPONENTS}
    quantize_models(bundle, Calibration(prompts=1, num_inference_steps=1, size=64, seed=5))
    assert {entry.name for entry in compiled.iterdir()} == before - int8_entries  # bf16's kept
