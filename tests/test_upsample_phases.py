"""Nearest-2x upsampling convolutions as phase convolutions (OpenVINO models compiled for static shapes): the same
outputs as convolving the upsampled image, and only where the upsampling is provably a doubling."""
from __future__ import annotations

import numpy as np
import pytest

from sdrt.engine.backends.openvino.backend import OpenVINOFP32Backend

pytestmark = pytest.mark.skipif(OpenVINOFP32Backend.unavailable_reason() is not None, reason="openvino not installed")

FP32 = {"INFERENCE_PRECISION_HINT": "f32"}


def _upsampling_convolution_model(
    shape: tuple[int, int, int, int], out_channels: int, *, target: tuple[int, int] | None = None, mode: str = "nearest",
    coordinates: str = "asymmetric", stride: int = 1, fp16_weights: bool = False, seed: int = 1,
):
    """Interpolate (to `target`, twice the input's size by default) -> 3x3 convolution padded by 1 -> bias, as
    diffusers' Upsample2D exports."""
    import openvino as ov
    from openvino import opset13 as ops

    rng = np.random.default_rng(seed)
    batch, channels, height, width = shape
    source = ops.parameter(list(shape), ov.Type.f32)
    sizes = ops.constant(np.array(target or (2 * height, 2 * width), np.int64))
    upsampled = ops.interpolate(source, sizes, mode, "sizes", axes=ops.constant(np.array([2, 3], np.int64)),
                                coordinate_transformation_mode=coordinates, nearest_mode="floor")
    weights = (rng.standard_normal((out_channels, channels, 3, 3)) / np.sqrt(9 * channels)).astype(np.float32)
    kernel = ops.convert(ops.constant(weights.astype(np.float16)), "f32") if fp16_weights else ops.constant(weights)
    result = ops.convolution(upsampled, kernel, [stride, stride], [1, 1], [1, 1], [1, 1])
    result = ops.add(result, ops.constant(rng.standard_normal((1, out_channels, 1, 1)).astype(np.float32)))
    return ov.Model([result], [source])


def _run(model, inputs: np.ndarray) -> np.ndarray:
    import openvino as ov

    return ov.Core().compile_model(model, "CPU", FP32)(inputs)[0]


def _is_rewritten(model) -> bool:
    return not [op for op in model.get_ordered_ops() if op.get_type_name() == "Interpolate"]


@pytest.mark.parametrize(
    ("shape", "out_channels", "fp16_weights"),
    [
        ((2, 16, 8, 8), 16, False),  # a U-Net upsampler under CFG
        ((1, 8, 5, 7), 12, False),  # odd, unequal sides: the borders' zero padding
        ((3, 4, 1, 1), 4, False),  # a single pixel: every tap but the centre's reads padding
        ((1, 8, 6, 4), 8, True),  # weights kept in fp16 (fast mode's converted models)
    ],
)
def test_phases_match_the_convolution_of_the_upsampled_image(shape, out_channels, fp16_weights) -> None:
    from sdrt.engine.backends.openvino.passes.upsample_phases import rewrite_upsampling_convolutions

    inputs = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    expected = _run(_upsampling_convolution_model(shape, out_channels, fp16_weights=fp16_weights), inputs)
    model = _upsampling_convolution_model(shape, out_channels, fp16_weights=fp16_weights)

    assert rewrite_upsampling_convolutions(model) == 1
    assert _is_rewritten(model)
    actual = _run(model, inputs)

    assert actual.shape == expected.shape == (shape[0], out_channels, 2 * shape[2], 2 * shape[3])
    assert np.abs(expected).max() > 0.1
    assert np.abs(actual - expected).max() <= 1e-5 * max(1.0, np.abs(expected).max())


@pytest.mark.parametrize(
    "options",
    [
        dict(target=(9, 11)),  # the U-Net's skip connection of an odd size: not a doubling
        dict(mode="linear"),
        dict(coordinates="half_pixel", mode="linear_onnx"),
        dict(stride=2),
    ],
    ids=["odd-target", "linear", "half-pixel", "strided"],
)
def test_upsamplings_it_is_not_exact_for_are_left_alone(options) -> None:
    from sdrt.engine.backends.openvino.passes.upsample_phases import rewrite_upsampling_convolutions

    model = _upsampling_convolution_model((1, 4, 5, 6), 4, **options)
    assert rewrite_upsampling_convolutions(model) == 0
    assert not _is_rewritten(model)


def test_dynamic_shapes_are_left_alone() -> None:
    """Without static shapes the upsampled size cannot be proved to be a doubling; once reshaped, it can."""
    import openvino as ov

    from sdrt.engine.backends.openvino.passes.upsample_phases import rewrite_upsampling_convolutions

    model = _upsampling_convolution_model((1, 4, 5, 6), 4)
    model.reshape({0: ov.PartialShape([-1, 4, 5, 6])})
    assert rewrite_upsampling_convolutions(model) == 0

    model.reshape({0: ov.PartialShape([2, 4, 5, 6])})
    assert rewrite_upsampling_convolutions(model) == 1


def test_weights_above_the_limit_are_left_alone_unless_a_store_holds_the_kernels() -> None:
    """Held in the heap, the phases' kernels (16/9 of the 3x3 weights) stay resident beside OpenVINO's repacked copy:
    exact mode's memory bounds which ones pay. A store (files OpenVINO maps) takes any."""
    from sdrt.engine.backends.openvino.passes.upsample_phases import rewrite_upsampling_convolutions

    elements = 6 * 4 * 9
    assert rewrite_upsampling_convolutions(_upsampling_convolution_model((1, 4, 5, 6), 6), max_weight_elements=elements - 1) == 0
    assert rewrite_upsampling_convolutions(_upsampling_convolution_model((1, 4, 5, 6), 6), max_weight_elements=elements) == 1

    from openvino import opset13 as ops

    stored: list = []

    def store(key, shapes, compute):
        arrays = compute()
        assert [array.shape for array in arrays] == list(shapes)
        stored.append((key, [array.shape for array in arrays]))
        return [ops.constant(array).output(0) for array in arrays]

    inputs = np.random.default_rng(0).standard_normal((1, 4, 5, 6)).astype(np.float32)
    expected = _run(_upsampling_convolution_model((1, 4, 5, 6), 6), inputs)
    model = _upsampling_convolution_model((1, 4, 5, 6), 6)
    assert rewrite_upsampling_convolutions(model, store, max_weight_elements=elements - 1) == 1
    assert [shapes for _, shapes in stored] == [[(6, 4, 2, 2)] * 4]
    np.testing.assert_allclose(_run(model, inputs), expected, atol=1e-5)
