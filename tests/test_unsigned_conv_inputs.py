"""int8 convolution inputs quantized from zero (the openvino-int8 backend's models): the products of the model
rewritten, against a numpy reference of FakeQuantize and convolution, only the inputs it is meant for, and the int8
backend's images unchanged by it."""
from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pytest

from sdrt.engine.backends.openvino.backend import OpenVINOFP32Backend, OpenVINOInt8Backend
from sdrt.engine.backends.openvino.passes.registry import UNSIGNED_CONV_INPUTS
from sdrt.engine.backends.openvino.passes.unsigned_conv_inputs import rewrite_unsigned_convolution_inputs
from sdrt.engine.specs import Component

pytestmark = pytest.mark.skipif(OpenVINOFP32Backend.unavailable_reason() is not None, reason="openvino not installed")

CHANNELS, OUT_CHANNELS, SIDE = 8, 6, 9
# an NNCF-like asymmetric range: its zero point (20) an integer, as NNCF aligns it
STEP, ZERO_POINT = 0.02, 20
LOW, HIGH = -ZERO_POINT * STEP, (255 - ZERO_POINT) * STEP


def _weights(rng, kernel: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """int8 weights (C_out, C_in, k, k), their zero points and per-output scales (C_out, 1, 1, 1)."""
    return (rng.integers(-127, 128, (OUT_CHANNELS, CHANNELS, kernel, kernel)).astype(np.int8),
            rng.integers(-2, 3, (OUT_CHANNELS, 1, 1, 1)).astype(np.float32),
            (rng.random((OUT_CHANNELS, 1, 1, 1)) * 0.01 + 0.001).astype(np.float32))


def _dequantized(weights) -> np.ndarray:
    quantized, zero_point, scale = weights
    return (quantized.astype(np.float64) - zero_point) * scale


# (kernel, stride, padding) of the convolutions the first quantized input feeds, and the second's
SHARED = [(3, 1, 1), (3, 2, 1)]
ALONE = (1, 1, 0)


def _model(low: float = LOW, high: float = HIGH, second_reader: str | None = None, paddings=(1, 1)):
    """x (1, C, S, S) -> FakeQuantize(low, high) -> SHARED convolutions; x -> FakeQuantize -> ALONE convolution (and
    `second_reader`, an op beside it); the weights as OpenVINO's int8 dequantization: (convert(i8) - zp) * scale."""
    import openvino as ov
    from openvino import opset13 as ops

    rng = np.random.default_rng(0)
    x = ops.parameter([1, CHANNELS, SIDE, SIDE], ov.Type.f32)  # (1, C, S, S)
    results, references = [], []

    def convolution(data, kernel, stride, padding):
        weights = _weights(rng, kernel)
        quantized, zero_point, scale = (ops.constant(array) for array in weights)
        dequantized = ops.multiply(ops.subtract(ops.convert(quantized, "f32"), zero_point), scale)
        results.append(ops.convolution(data, dequantized, [stride, stride], [padding, padding], [padding, padding], [1, 1]))
        references.append((weights, stride, padding))

    bounds = [np.float32(low), np.float32(high)] * 2
    shared = ops.fake_quantize(x, bounds[0], bounds[1], bounds[2], bounds[3], 256)
    for (kernel, stride, _), padding in zip(SHARED, paddings):
        convolution(shared, kernel, stride, padding)
    alone = ops.fake_quantize(ops.multiply(x, np.float32(0.5)), *bounds, 256)
    convolution(alone, *ALONE)
    if second_reader == "relu":
        results.append(ops.relu(alone))
    return ov.Model(results, [x]), references


def _fake_quantize(x: np.ndarray, low: float, high: float) -> np.ndarray:
    step = (high - low) / 255
    return np.round((np.clip(x, low, high) - low) / step) * step + low


def _convolution(x: np.ndarray, weights: np.ndarray, stride: int, padding: int) -> np.ndarray:
    """(1, C, S, S) * (C_out, C, k, k) -> (1, C_out, S', S'), float64, zero padding."""
    padded = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    kernel = weights.shape[-1]
    side = (padded.shape[-1] - kernel) // stride + 1
    windows = np.lib.stride_tricks.sliding_window_view(padded[0], (kernel, kernel), axis=(1, 2))  # (C, S', S', k, k)
    windows = windows[:, ::stride, ::stride][:, :side, :side]
    return np.einsum("chwij,ocij->ohw", windows, weights)[None]


def _run(model, x: np.ndarray) -> list[np.ndarray]:
    import openvino as ov

    compiled = ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    return [compiled(x)[i] for i in range(len(compiled.outputs))]


def test_rewritten_convolutions_compute_the_quantized_products() -> None:
    x = np.random.default_rng(1).uniform(-1.5, 6.0, (1, CHANNELS, SIDE, SIDE)).astype(np.float32)  # beyond both bounds
    model, references = _model()
    assert rewrite_unsigned_convolution_inputs(model) == 2  # the shared input (two convolutions) and the 1x1's
    # every quantized input now starts at zero, and no convolution pads (its padding moved before the quantization)
    quantizers = [op for op in model.get_ordered_ops() if op.get_type_name() == "FakeQuantize"]
    assert len(quantizers) == 2 and all(float(op.input_value(3).get_node().get_data()) == 0 for op in quantizers)
    assert all(not any(op.get_attributes()["pads_begin"]) for op in model.get_ordered_ops() if op.get_type_name() == "Convolution")

    inputs = [_fake_quantize(x.astype(np.float64), LOW, HIGH)] * 2 + [_fake_quantize(x * 0.5, LOW, HIGH)]
    expected = [_convolution(data, _dequantized(weights), stride, padding)
                for data, (weights, stride, padding) in zip(inputs, references)]
    for actual, reference in zip(_run(model, x), expected):
        assert actual.shape == reference.shape
        np.testing.assert_allclose(actual, reference, rtol=1e-4, atol=1e-4 * np.abs(reference).max())
    # against the model as it was: the same products (the plugin computes both in int8)
    for actual, before in zip(_run(model, x), _run(_model()[0], x)):
        np.testing.assert_allclose(actual, before, rtol=1e-4, atol=1e-4 * np.abs(before).max())


@pytest.mark.parametrize("options, rewritten", [
    (dict(low=0.0), 0),  # already from zero: no zero point
    (dict(low=LOW - STEP / 2), 0),  # a zero point of about 20.5: padded zeros would not quantize to zero
    (dict(second_reader="relu"), 1),  # the 1x1's input also feeds a ReLU: only the shared one
    (dict(paddings=(1, 0)), 1),  # the shared input's convolutions pad differently: only the 1x1's
], ids=["unsigned", "misaligned", "other-reader", "different-padding"])
def test_inputs_it_is_not_for_are_left_alone(options, rewritten: int) -> None:
    model, _ = _model(**options)
    assert rewrite_unsigned_convolution_inputs(model) == rewritten


@pytest.mark.slow  # quantizes a bundle and compiles it three times: 20-30 s
@pytest.mark.skipif(OpenVINOInt8Backend.unavailable_reason() is not None, reason="no OpenVINO bf16 on this CPU")
def test_the_int8_backend_rewrites_its_quantized_models_as_close_to_fp32_as_before(tiny_bundle: Path, tmp_path: Path, monkeypatch) -> None:
    pytest.importorskip("nncf")
    import sdrt.engine
    from sdrt.export.quantize import Calibration, quantize_models

    bundle = Path(shutil.copytree(tiny_bundle, tmp_path / "bundle", ignore=shutil.ignore_patterns(".cache")))
    quantize_models(bundle, Calibration(prompts=1, num_inference_steps=2, size=64))
    rewrites = OpenVINOInt8Backend.static_shape_rewrites
    assert all(UNSIGNED_CONV_INPUTS in rewrites[c] for c in (Component.UNET, Component.UNET_DEEPCACHE_FULL, Component.VAE_DECODER))
    counts: list[int] = []
    counted = dataclasses.replace(UNSIGNED_CONV_INPUTS, apply=lambda model, store: counts.append(UNSIGNED_CONV_INPUTS.apply(model, store)) or counts[-1])

    def images(backend: str, chains=None) -> np.ndarray:
        if chains is not None:
            monkeypatch.setattr(OpenVINOInt8Backend, "static_shape_rewrites", chains)
        shutil.rmtree(bundle / ".cache", ignore_errors=True)
        pipe = sdrt.engine.load(bundle, backend=backend, safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        return pipe("a dog on a beach", num_inference_steps=3, height=64, width=64, seed=2, output_type="np").images

    exact = images("openvino-fp32")
    rewritten = images("openvino-int8", {c: tuple(counted if r is UNSIGNED_CONV_INPUTS else r for r in chain) for c, chain in rewrites.items()})
    # the tiny U-Net's and decoder's convolutions take SiLU's outputs, which NNCF quantizes below zero, as in SD 1.5
    assert len(counts) == 2 and all(count > 0 for count in counts)
    as_quantized = images("openvino-int8", {c: tuple(r for r in chain if r is not UNSIGNED_CONV_INPUTS) for c, chain in rewrites.items()})

    def psnr(image: np.ndarray) -> float:
        return float(10 * np.log10(1 / np.mean((image - exact) ** 2)))

    assert not np.array_equal(rewritten, as_quantized)  # the rewrite ran
    # the same quantization grid: as close to fp32 as the models as NNCF wrote them (25.8 and 25.9 dB here)
    assert psnr(rewritten) > psnr(as_quantized) - 1
