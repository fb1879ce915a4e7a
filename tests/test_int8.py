"""`sdrt quantize` and the openvino-int8 backend: the int8 U-Net is calibrated on the bundle's own runs, written into
the bundle atomically, preferred by "auto" only in a bundle that has one, and stays close to fp32."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

import sdrt.engine
from sdrt.engine.backends import backend_class
from sdrt.engine.backends.openvino.backend import OpenVINOInt8Backend
from sdrt.engine.backends.openvino.int8_unet_location import int8_unet_file
from sdrt.engine.errors import BackendUnavailableError, InvalidArgumentError
from sdrt.engine.specs import Component

pytestmark = pytest.mark.skipif(OpenVINOInt8Backend.unavailable_reason() is not None, reason="no OpenVINO bf16 on this CPU")
nncf = pytest.importorskip("nncf")

from sdrt.export.int8_unet import Calibration, quantize_unet  # noqa: E402  (needs nncf)


@pytest.fixture(scope="module")
def quantized_bundle(tiny_bundle: Path, tmp_path_factory) -> Path:
    bundle = Path(shutil.copytree(tiny_bundle, tmp_path_factory.mktemp("int8") / "bundle", ignore=shutil.ignore_patterns(".cache")))
    quantize_unet(bundle, Calibration(prompts=2, num_inference_steps=3, size=64))
    return bundle


def _unet_digest(bundle: Path) -> str:
    pipe = sdrt.engine.load(bundle, backend="openvino-fp32")
    return pipe.backend.components[Component.UNET].digest


def test_the_int8_unet_is_written_into_the_bundle_for_its_unet(quantized_bundle: Path) -> None:
    written = int8_unet_file(quantized_bundle, _unet_digest(quantized_bundle))
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


def test_calibration_records_every_unet_call(tiny_bundle: Path) -> None:
    from sdrt.export.int8_unet import _unet_inputs

    pipe = sdrt.engine.load(tiny_bundle, backend="openvino-fp32", safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    samples = _unet_inputs(pipe, Calibration(prompts=2, num_inference_steps=3, size=64))
    assert len(samples) == 2 * (3 + 1)  # PNDM: N + 1 U-Net calls for N steps
    assert samples[0]["sample"].shape == (2, 4, 8, 8)  # (2B, C, H/8, W/8): guidance's batch of two
    assert "run" not in vars(pipe.backend)  # the backend is left as it was


def test_a_bundle_without_an_int8_unet_names_the_command(tiny_bundle: Path) -> None:
    with pytest.raises(BackendUnavailableError, match="sdrt quantize"):
        sdrt.engine.load(tiny_bundle, backend="openvino-int8")
    assert backend_class("auto", tiny_bundle).name == "openvino-bf16"  # the next fastest


def test_a_failed_quantization_leaves_no_int8_unet(tiny_bundle: Path, tmp_path: Path, monkeypatch) -> None:
    bundle = Path(shutil.copytree(tiny_bundle, tmp_path / "bundle", ignore=shutil.ignore_patterns(".cache")))

    import openvino

    real_save = openvino.save_model

    def failing_save(model, path, *args, **kwargs):
        # Only the int8 U-Net's write fails: calibration's exact pipeline saves its own converted U-Net (Winograd).
        if "int8" in Path(path).relative_to(bundle).parts:
            raise OSError("disk full")
        return real_save(model, path, *args, **kwargs)

    monkeypatch.setattr("openvino.save_model", failing_save)
    with pytest.raises(OSError, match="disk full"):
        quantize_unet(bundle, Calibration(prompts=1, num_inference_steps=1, size=64))
    assert not int8_unet_file(bundle, _unet_digest(bundle)).parent.exists()
    assert not any((bundle / "int8").iterdir())


@pytest.mark.parametrize(("field", "value"), [("prompts", 0), ("prompts", 9), ("num_inference_steps", 0)])
def test_calibration_settings_are_checked(field: str, value: int) -> None:
    with pytest.raises(InvalidArgumentError, match=field):
        Calibration(**{field: value})


def test_the_cli_quantizes_and_prints_where(tiny_bundle: Path, tmp_path: Path, capsys) -> None:
    from sdrt.cli.main import main

    bundle = Path(shutil.copytree(tiny_bundle, tmp_path / "bundle", ignore=shutil.ignore_patterns(".cache")))
    assert main(["quantize", str(bundle), "--prompts", "1", "-s", "1", "--size", "64"]) == 0
    printed = Path(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed == int8_unet_file(bundle, _unet_digest(bundle)) and printed.is_file()
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
