"""`sdrt export` makes the int8 U-Net and VAE decoder by default (the fastest CPU mode without another command), unless told not to,
and says once why it did not where the quantize extra is missing or the memory budget is too small."""
from __future__ import annotations

import dataclasses
import importlib.util
import logging
import shutil
from pathlib import Path

import pytest

import sdrt.engine
from sdrt.engine.backends.openvino.backend import OpenVINOBF16Backend, OpenVINOInt8Backend
from sdrt.engine.backends.openvino.int8_location import INT8_COMPONENTS, INT8_SUBDIR
from sdrt.engine.host_memory import MemoryBudget
from sdrt.export import quantize
from sdrt.export.errors import ExportError
from sdrt.export.quantize import EXPORT_CALIBRATION_MIN_SIDE, export_calibration, quantize_after_export

can_quantize = pytest.mark.skipif(quantize.quantize_unavailable_reason() is not None,
                                  reason=str(quantize.quantize_unavailable_reason()))


@pytest.fixture
def bundle(tiny_bundle: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_bundle, tmp_path / "bundle", ignore=shutil.ignore_patterns(".cache")))


@pytest.fixture
def quick_calibration(monkeypatch) -> None:
    """Calibrate on one short run: these tests check the export's choices, test_int8.py the quantization."""
    real = export_calibration
    monkeypatch.setattr(quantize, "export_calibration",
                        lambda bundle_dir: quantize.Calibration(prompts=1, num_inference_steps=1, size=real(bundle_dir).size))


@pytest.mark.slow
@can_quantize
def test_export_quantizes_by_default_and_auto_runs_int8(tiny_checkpoint: Path, tmp_path: Path, quick_calibration, capsys) -> None:
    from sdrt.cli.main import main

    assert main(["export", str(tiny_checkpoint), str(tmp_path / "bundle")]) == 0
    assert {path.parent.name.split("-")[0] for path in (tmp_path / "bundle" / INT8_SUBDIR).glob("*/model.xml")} == {"unet", "vae_decoder"}
    assert sdrt.engine.load(tmp_path / "bundle", safety_checker=False).backend.name == "openvino-int8"


@pytest.mark.slow  # a whole export: 12 s
def test_no_quantize_leaves_bf16(tiny_checkpoint: Path, tmp_path: Path, monkeypatch) -> None:
    from sdrt.cli.main import main

    monkeypatch.setattr(quantize, "quantize_models", lambda *args, **kwargs: pytest.fail("quantized despite --no-quantize"))
    assert main(["export", str(tiny_checkpoint), str(tmp_path / "bundle"), "--no-quantize"]) == 0
    assert not (tmp_path / "bundle" / INT8_SUBDIR).exists()


def test_a_missing_quantize_extra_is_said_once_and_the_bundle_stays_bf16(bundle: Path, monkeypatch, caplog) -> None:
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None if name == "nncf" else real_find_spec(name, *args))
    with caplog.at_level(logging.INFO, logger="sdrt"):
        assert quantize_after_export(bundle) is None
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1
    assert "nncf missing" in warnings[0] and "pip install 'sdrt[quantize]'" in warnings[0] and "bf16" in warnings[0]
    assert not (bundle / INT8_SUBDIR).exists()


@can_quantize
def test_a_quantization_over_the_memory_budget_is_skipped_up_front(bundle: Path, monkeypatch, caplog) -> None:
    monkeypatch.setattr(quantize, "_calibration_samples", lambda *args: pytest.fail("calibrated over the budget"))
    needed = quantize.export_quantization_peak_bytes(bundle)
    with caplog.at_level(logging.WARNING, logger="sdrt"):
        assert quantize_after_export(bundle, MemoryBudget(bytes=needed - 1)) is None
    assert "memory budget" in caplog.text
    assert not (bundle / INT8_SUBDIR).exists()


@pytest.mark.slow  # it quantizes, 7-10 s (CI runs the slow tests too)
@can_quantize
def test_quantize_after_export_within_the_budget_writes_the_int8_models(bundle: Path, quick_calibration, steady_rss) -> None:
    calibration_peak = quantize.calibration_peak_bytes(bundle, export_calibration(bundle), quantize.CALIBRATION_PIPELINES[0])
    needed = max(quantize.export_quantization_peak_bytes(bundle), calibration_peak)
    written = quantize_after_export(bundle, MemoryBudget(bytes=needed))
    assert written is not None and written.keys() == set(INT8_COMPONENTS) and all(path.is_file() for path in written.values())
    assert OpenVINOInt8Backend.bundle_unavailable_reason(bundle, sdrt.engine.load(bundle, backend="exact").backend.components) is None


def test_export_calibrates_at_half_the_default_side_but_not_below_the_minimum(bundle: Path, monkeypatch) -> None:
    real_read = quantize.read_manifest
    default = real_read(bundle).model.default_image_size
    assert export_calibration(bundle).size == default  # a small model's side is below the minimum: kept

    def with_sample_size(sample_size: int):
        def read(path):
            manifest = real_read(path)
            return dataclasses.replace(manifest, model=dataclasses.replace(manifest.model, sample_size=sample_size))
        return read

    factor = real_read(bundle).model.vae_scale_factor
    monkeypatch.setattr(quantize, "read_manifest", with_sample_size(1024 // factor))
    assert export_calibration(bundle).size == 512
    monkeypatch.setattr(quantize, "read_manifest", with_sample_size(384 // factor))
    assert export_calibration(bundle).size == EXPORT_CALIBRATION_MIN_SIDE


@pytest.fixture
def steady_rss(monkeypatch) -> None:
    """The calibration estimates start from this process's RSS: held still, so that two estimates compare."""
    monkeypatch.setattr(quantize, "process_rss_bytes", lambda: 500 * 2**20)


@can_quantize
def test_calibration_prefers_fp32_kept_loaded_then_one_at_a_time_then_bf16(bundle: Path, steady_rss) -> None:
    calibration = export_calibration(bundle)
    peaks = {p: quantize.calibration_peak_bytes(bundle, calibration, p) for p in quantize.CALIBRATION_PIPELINES
             if OpenVINOBF16Backend.unavailable_reason() is None or p.backend != "openvino-bf16"}
    fp32_kept, fp32_one, *bf16 = quantize.CALIBRATION_PIPELINES
    assert peaks[fp32_one] < peaks[fp32_kept]
    assert quantize.calibration_pipeline(bundle, calibration, MemoryBudget(bytes=peaks[fp32_kept])) == fp32_kept
    assert quantize.calibration_pipeline(bundle, calibration, MemoryBudget(bytes=peaks[fp32_kept] - 1)) == fp32_one
    smallest = min(peaks.values())
    with pytest.raises(ExportError, match=r"do not fit the memory budget .*openvino-fp32 one-at-a-time needs about"):
        quantize.calibration_pipeline(bundle, calibration, MemoryBudget(bytes=smallest - 1))


@pytest.mark.slow  # it quantizes, 7-10 s (CI runs the slow tests too)
@can_quantize
@pytest.mark.skipif(OpenVINOBF16Backend.unavailable_reason() is not None, reason=str(OpenVINOBF16Backend.unavailable_reason()))
def test_a_budget_that_fp32_calibration_does_not_fit_calibrates_in_bf16(bundle: Path, quick_calibration, steady_rss, monkeypatch) -> None:
    calibration = export_calibration(bundle)
    fp32_one = quantize.CALIBRATION_PIPELINES[1]
    budget = MemoryBudget(bytes=quantize.calibration_peak_bytes(bundle, calibration, fp32_one) - 1)
    loaded = []
    real_load = sdrt.engine.load
    monkeypatch.setattr(sdrt.engine, "load", lambda *args, **kwargs: loaded.append(kwargs["backend"]) or real_load(*args, **kwargs))
    monkeypatch.setattr(quantize, "export_quantization_peak_bytes", lambda bundle_dir: 0)  # NNCF's step is not the question here
    written = quantize_after_export(bundle, budget)
    assert loaded == ["openvino-bf16"]
    assert written is not None and all(path.is_file() for path in written.values())
