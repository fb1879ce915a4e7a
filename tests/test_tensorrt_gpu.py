"""The NVIDIA path on a real GPU: TensorRT engines built from the tiny bundle and run through the pipeline, and the
onnxruntime CUDA backend, compared with the CPU fp32 backend. Skipped, with the reason, without a CUDA device,
tensorrt or cuda-python (onnxruntime-gpu for the CUDA backend)."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

import sdrt.engine
from sdrt.engine.backends import OnnxRuntimeCUDABackend, TensorRTBackend
from sdrt.engine.backends.tensorrt.engines.profile import AxisRange, EngineProfile, Precision
from sdrt.engine.errors import ProfileMismatchError

TENSORRT_REASON = TensorRTBackend.unavailable_reason()
CUDA_REASON = OnnxRuntimeCUDABackend.unavailable_reason()
needs_tensorrt = pytest.mark.skipif(TENSORRT_REASON is not None, reason=f"tensorrt backend unavailable: {TENSORRT_REASON}")
needs_cuda = pytest.mark.skipif(CUDA_REASON is not None, reason=f"cuda backend unavailable: {CUDA_REASON}")
pytestmark = pytest.mark.gpu

PROFILE = EngineProfile(AxisRange(1, 1, 2), AxisRange(64, 64, 128), AxisRange(64, 64, 128))
# fp32 engines (TF32 off) against onnxruntime's CPU kernels: other summation orders, far below one 8-bit level
FP32_MAX_ABS_DIFF = 5e-3


def _engine_bundle(tiny_bundle: Path, root: Path, precision: Precision) -> Path:
    from sdrt.export.tensorrt_build import build_engines

    bundle = Path(shutil.copytree(tiny_bundle, root / precision.value, ignore=shutil.ignore_patterns(".cache")))
    build_engines(bundle, PROFILE, precision)
    return bundle


@pytest.fixture(scope="module")
def fp32_bundle(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _engine_bundle(tiny_bundle, tmp_path_factory.mktemp("engines"), Precision.FP32)


def _images(bundle: Path, backend: str, height: int, width: int) -> tuple[np.ndarray, str]:
    pipe = sdrt.engine.load(bundle, backend=backend, safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    latents = np.random.default_rng(height + width).standard_normal((2, 4, height // 8, width // 8), dtype=np.float32)
    out = pipe(["a cat", "a dog"], num_inference_steps=4, height=height, width=width, latents=latents, output_type="np")
    return out.images, out.backend


@needs_tensorrt
def test_fp32_engines_match_the_cpu_backend_at_every_size(fp32_bundle: Path) -> None:
    # 64 -> 128 -> 64 captures a graph per size, then replays the first one again.
    pipe = sdrt.engine.load(fp32_bundle, backend="tensorrt", safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    for height, width in [(64, 64), (128, 96), (64, 64)]:
        latents = np.random.default_rng(height + width).standard_normal((2, 4, height // 8, width // 8), dtype=np.float32)
        gpu = pipe(["a cat", "a dog"], num_inference_steps=4, height=height, width=width, latents=latents, output_type="np")
        cpu, _ = _images(fp32_bundle, "onnxruntime-cpu", height, width)
        assert gpu.backend == "tensorrt"
        assert np.abs(gpu.images - cpu).max() < FP32_MAX_ABS_DIFF


@needs_tensorrt
def test_auto_takes_tensorrt_once_engines_are_built(fp32_bundle: Path) -> None:
    first, backend = _images(fp32_bundle, "auto", 64, 64)
    again, _ = _images(fp32_bundle, "auto", 64, 64)
    assert backend == "tensorrt"
    np.testing.assert_array_equal(first, again)  # graph replays are deterministic


@needs_tensorrt
def test_request_outside_the_profile_fails_before_running(fp32_bundle: Path) -> None:
    pipe = sdrt.engine.load(fp32_bundle, backend="tensorrt", safety_checker=False)
    with pytest.raises(ProfileMismatchError, match=r"--height 64:64:256 "):
        pipe("a cat", num_inference_steps=1, height=256, width=64)


@needs_tensorrt
def test_fp16_engines_stay_close_to_fp32(tiny_bundle: Path, tmp_path: Path) -> None:
    bundle = _engine_bundle(tiny_bundle, tmp_path, Precision.FP16)
    gpu, _ = _images(bundle, "tensorrt", 64, 64)
    cpu, _ = _images(bundle, "onnxruntime-cpu", 64, 64)
    psnr = 10 * np.log10(1.0 / np.mean((gpu - cpu) ** 2))
    assert psnr > 30


@needs_cuda
def test_cuda_backend_matches_the_cpu_backend(tiny_bundle: Path) -> None:
    gpu, backend = _images(tiny_bundle, "cuda", 64, 96)
    cpu, _ = _images(tiny_bundle, "onnxruntime-cpu", 64, 96)
    assert backend == "cuda"
    assert np.abs(gpu - cpu).max() < FP32_MAX_ABS_DIFF
