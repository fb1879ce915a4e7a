"""Winograd F(4x4, 3x3) convolutions (exact mode's U-Net on OpenVINO): same outputs as direct convolutions, only
the convolutions it is meant for, and the Winograd-domain weights computed per call, never held."""
from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from sdrt.engine.backends.openvino.backend import OpenVINOFP32Backend
from sdrt.engine.specs import Component

pytestmark = pytest.mark.skipif(OpenVINOFP32Backend.unavailable_reason() is not None, reason="openvino not installed")

FP32 = {"INFERENCE_PRECISION_HINT": "f32"}


def _convolution_model(
    in_channels: int, out_channels: int, *, kernel: int = 3, stride: int = 1, pad: int = 1, dilation: int = 1,
    bias: bool = True, upsampled: bool = False, seed: int = 1,
):
    import openvino as ov
    from openvino import opset13 as ops

    rng = np.random.default_rng(seed)
    source = ops.parameter(ov.PartialShape([-1, in_channels, -1, -1]), ov.Type.f32)
    weights = (rng.standard_normal((out_channels, in_channels, kernel, kernel)) / np.sqrt(kernel * kernel * in_channels)).astype(np.float32)
    convolved = source
    if upsampled:  # as diffusers' Upsample2D: nearest 2x
        convolved = ops.interpolate(source, ops.constant(np.array([2.0, 2.0], np.float32)), "nearest", "scales",
                                    axes=ops.constant(np.array([2, 3], np.int64)), coordinate_transformation_mode="asymmetric",
                                    nearest_mode="floor")
    result = ops.convolution(convolved, ops.constant(weights), [stride, stride], [pad, pad], [pad, pad], [dilation, dilation])
    if bias:
        result = ops.add(result, ops.constant(rng.standard_normal((1, out_channels, 1, 1)).astype(np.float32)))
    return ov.Model([result], [source])


def _run(model, inputs: np.ndarray) -> np.ndarray:
    import openvino as ov

    return ov.Core().compile_model(model, "CPU", FP32)(inputs)[0]


@pytest.mark.parametrize(
    ("batch", "in_channels", "out_channels", "height", "width", "bias"),
    [
        (2, 32, 32, 64, 64, True),  # whole tiles
        (2, 3, 5, 9, 15, True),  # partial tiles on both axes: padded, then cropped
        (1, 8, 16, 7, 7, False),
        (3, 4, 4, 1, 1, True),  # smaller than one tile
        (1, 4, 6, 2, 3, True),
    ],
)
def test_winograd_matches_direct_convolution(batch, in_channels, out_channels, height, width, bias) -> None:
    from sdrt.engine.backends.openvino.passes.winograd import rewrite_convolutions

    inputs = np.random.default_rng(0).standard_normal((batch, in_channels, height, width)).astype(np.float32)
    expected = _run(_convolution_model(in_channels, out_channels, bias=bias), inputs)
    model = _convolution_model(in_channels, out_channels, bias=bias)

    assert rewrite_convolutions(model) == 1
    assert not [op for op in model.get_ordered_ops() if op.get_type_name() == "Convolution" and op.input_value(1).get_node().get_type_name() == "Constant"
                and list(op.input_value(1).get_partial_shape())[2:] == [3, 3]]
    actual = _run(model, inputs)

    assert actual.shape == expected.shape == (batch, out_channels, height, width)
    assert np.abs(actual - expected).max() <= 1e-4 * max(1.0, np.abs(expected).max())
    assert np.abs(expected).max() > 0.1


@pytest.mark.parametrize(
    "options",
    [
        dict(stride=2),  # downsamplers
        dict(kernel=1, pad=0),  # 1x1 projections
        dict(pad=0),  # "valid" padding changes the output size
        dict(dilation=2),
        dict(upsampled=True),  # upsample_phases.py's
    ],
    ids=["stride-2", "1x1", "unpadded", "dilated", "upsampling"],
)
def test_convolutions_it_is_not_for_are_left_alone(options) -> None:
    from sdrt.engine.backends.openvino.passes.winograd import rewrite_convolutions

    model = _convolution_model(4, 8, **options)
    before = [op.get_type_name() for op in model.get_ordered_ops()]

    assert rewrite_convolutions(model) == 0
    assert [op.get_type_name() for op in model.get_ordered_ops()] == before


def test_weights_above_the_limit_are_left_alone() -> None:
    from sdrt.engine.backends.openvino.passes.winograd import rewrite_convolutions

    assert rewrite_convolutions(_convolution_model(16, 16), max_weight_elements=16 * 16 * 9 - 1) == 0
    assert rewrite_convolutions(_convolution_model(16, 16), max_weight_elements=16 * 16 * 9) == 1


def test_input_limit_rewrites_only_static_inputs_of_at_most_that_many_elements() -> None:
    from sdrt.engine.backends.openvino.passes.winograd import rewrite_convolutions

    shape = [1, 8, 12, 10]
    elements = int(np.prod(shape))
    inputs = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    expected = _run(_convolution_model(8, 8), inputs)

    assert rewrite_convolutions(_convolution_model(8, 8), max_input_elements=elements) == 0  # dynamic: size unknown
    for limit, rewritten in ((elements - 1, 0), (elements, 1)):
        model = _convolution_model(8, 8)
        model.reshape(shape)
        assert rewrite_convolutions(model, max_input_elements=limit) == rewritten
    np.testing.assert_allclose(_run(model, inputs), expected, atol=1e-4 * np.abs(expected).max())


def _store(stored: list):
    """A ConstantStore that records what it makes and holds it in the heap."""
    from openvino import opset13 as ops

    def store(key, shapes, compute):
        arrays = compute()
        assert [array.shape for array in arrays] == [tuple(shape) for shape in shapes]
        stored.append((key, [array.shape for array in arrays]))
        return [ops.constant(array).output(0) for array in arrays]

    return store


@pytest.mark.parametrize("out_channels", [12, 7], ids=["even-chunks", "uneven-chunks"])
def test_large_weights_are_transformed_in_chunks_of_output_channels(out_channels, monkeypatch) -> None:
    from sdrt.engine.backends.openvino.passes import winograd

    in_channels = 5
    monkeypatch.setattr(winograd, "CHUNK_WEIGHT_ELEMENTS", 3 * in_channels * 9)  # at most 3 output channels a chunk
    inputs = np.random.default_rng(0).standard_normal((2, in_channels, 10, 9)).astype(np.float32)
    expected = _run(_convolution_model(in_channels, out_channels), inputs)
    model = _convolution_model(in_channels, out_channels)
    stored: list = []

    assert winograd.rewrite_convolutions(model, store=_store(stored)) == 1
    chunks = -(-out_channels // 3)
    [(key, shapes)] = stored
    assert len(shapes) == chunks and sum(shape[0] for shape in shapes) == out_channels * in_channels
    assert all(shape[1] == 9 and shape[0] <= 3 * in_channels for shape in shapes)
    # one weight transform per chunk, each (36, rows of the chunk's taps)
    transforms = [op for op in model.get_ordered_ops() if op.get_type_name() == "MatMul"
                  and list(op.get_output_partial_shape(0))[0] == winograd.POINTS ** 2 and op.get_output_partial_shape(0).is_static]
    assert len(transforms) == chunks
    np.testing.assert_allclose(_run(model, inputs), expected, atol=1e-4 * np.abs(expected).max())


def test_input_area_limit_rewrites_only_static_inputs_of_at_least_that_area() -> None:
    from sdrt.engine.backends.openvino.passes.winograd import rewrite_convolutions

    assert rewrite_convolutions(_convolution_model(4, 4), min_input_area=1) == 0  # dynamic: size unknown
    for shape, rewritten in (([2, 4, 3, 5], 0), ([2, 4, 4, 4], 1), ([1, 4, 2, 9], 1)):
        model = _convolution_model(4, 4)
        model.reshape(shape)
        assert rewrite_convolutions(model, max_weight_elements=None, min_input_area=16) == rewritten, shape


def test_exact_mode_rewrites_its_vae_decoder_once_shapes_are_static(tiny_bundle: Path, tmp_path: Path, monkeypatch) -> None:
    # Not its full-resolution convolutions: their activations set the decoder's peak.
    from sdrt.engine.backends.openvino import backend as openvino_backend
    from sdrt.engine.backends.openvino.passes import registry

    decoder = Component.VAE_DECODER
    assert registry.WINOGRAD_DECODER in OpenVINOFP32Backend.static_shape_rewrites[decoder]
    assert registry.WINOGRAD_DECODER not in openvino_backend.OpenVINOBF16Backend.static_shape_rewrites[decoder]  # fp32 only
    counts: list[int] = []
    counted = dataclasses.replace(registry.WINOGRAD_DECODER,
                                  apply=lambda model, store: counts.append(registry.WINOGRAD_DECODER.apply(model, store)) or counts[-1])
    monkeypatch.setattr(OpenVINOFP32Backend, "static_shape_rewrites", {
        **OpenVINOFP32Backend.static_shape_rewrites, decoder: (registry.UPSAMPLE_PHASES, counted)})
    bundle = Path(shutil.copytree(tiny_bundle, tmp_path / "bundle", ignore=shutil.ignore_patterns(".cache")))
    rewritten = _exact_images(bundle)
    assert counts and counts[0] > 0

    monkeypatch.setattr(OpenVINOFP32Backend, "static_shape_rewrites", {
        **OpenVINOFP32Backend.static_shape_rewrites, decoder: (registry.UPSAMPLE_PHASES,)})
    direct = _exact_images(Path(shutil.copytree(tiny_bundle, tmp_path / "direct", ignore=shutil.ignore_patterns(".cache"))))
    np.testing.assert_allclose(rewritten, direct, atol=1e-4)


def test_exact_mode_rewrites_its_unets_large_convolutions_once_shapes_are_static(tiny_bundle: Path, tmp_path: Path, monkeypatch) -> None:
    """Those WINOGRAD leaves (weights above its limit), on inputs of at least MIN_STATIC_INPUT_AREA, chunked, their
    rearranged weights stored in the bundle's cache; none in a read-only bundle, which has no cache to map them from.
    The tiny U-Net's convolutions and inputs are all small: here the IR-level rewrite is off and the limits small."""
    from sdrt.engine.backends.openvino import backend as openvino_backend, cache, constants
    from sdrt.engine.backends.openvino.passes import registry, winograd

    unet = Component.UNET
    assert registry.WINOGRAD_LARGE in OpenVINOFP32Backend.static_shape_rewrites[unet]
    assert registry.WINOGRAD_LARGE not in openvino_backend.OpenVINOBF16Backend.static_shape_rewrites[unet]  # fp32 only
    monkeypatch.setattr(OpenVINOFP32Backend, "rewrites", {})
    monkeypatch.setattr(winograd, "CHUNK_WEIGHT_ELEMENTS", 32 * 32 * 9 // 2)
    monkeypatch.setattr(registry, "MIN_STATIC_INPUT_AREA", 8 * 8)  # a 64² image's latents
    counts: list[int] = []
    counted = dataclasses.replace(registry.WINOGRAD_LARGE,
                                  apply=lambda model, store: counts.append(registry.WINOGRAD_LARGE.apply(model, store)) or counts[-1])

    def images(rewrites: tuple, name: str, read_only: bool = False) -> np.ndarray:
        monkeypatch.setattr(OpenVINOFP32Backend, "static_shape_rewrites", {**OpenVINOFP32Backend.static_shape_rewrites, unet: rewrites})
        bundle = Path(shutil.copytree(tiny_bundle, tmp_path / name, ignore=shutil.ignore_patterns(".cache")))
        if read_only:
            real_access = os.access  # root ignores file modes: make the bundle read-only the way the backend sees it
            monkeypatch.setattr(openvino_backend.os, "access", lambda path, mode: Path(path) != bundle and real_access(path, mode))
        return _exact_images(bundle), bundle

    def stored(bundle: Path) -> int:
        compiled = bundle / cache.CACHE_SUBDIR / cache.COMPILED_SUBDIR
        return len(list(compiled.glob(f"unet-*/{constants.CONSTANTS_SUBDIR}/*")))

    rewritten, bundle = images((registry.UPSAMPLE_PHASES, counted), "rewritten")
    assert counts and counts[0] > 0
    direct, direct_bundle = images((registry.UPSAMPLE_PHASES,), "direct")
    assert stored(bundle) - stored(direct_bundle) == counts[0]  # one set of chunks per convolution
    np.testing.assert_allclose(rewritten, direct, atol=1e-4)

    images((registry.UPSAMPLE_PHASES, counted), "read-only", read_only=True)
    assert counts[-1] == 0


@pytest.mark.parametrize("static_shape", [None, [2, 8, 16, 16]], ids=["dynamic", "static"])
def test_winograd_domain_weights_are_computed_per_call_not_held(static_shape) -> None:
    """Held, they would be four times the 3x3 weights (SD 1.5's U-Net: +0.9 GB), breaking exact mode's memory
    bound. The compiled model must compute the (36, out x in) product on each call and keep no constant of its size,
    also when compiled for static shapes, where OpenVINO folds everything that depends on shapes alone."""
    import openvino as ov

    from sdrt.engine.backends.openvino.passes.winograd import POINTS, rewrite_convolutions

    out_channels, in_channels = 16, 8
    model = _convolution_model(in_channels, out_channels)
    assert rewrite_convolutions(model) == 1
    if static_shape is not None:
        model.reshape(static_shape)
    runtime = ov.Core().compile_model(model, "CPU", FP32).get_runtime_model()

    domain_shape = [POINTS * POINTS, out_channels * in_channels]
    layers = [
        (op.get_rt_info()["layerType"].astype(str), [[d.get_length() for d in o.get_partial_shape()] for o in op.outputs() if o.get_partial_shape().is_static])
        for op in runtime.get_ordered_ops()
    ]
    assert any(kind != "Const" and domain_shape in shapes for kind, shapes in layers)
    constant_sizes = [int(np.prod(shapes[0])) for kind, shapes in layers if kind == "Const" and shapes and shapes[0]]
    assert max(constant_sizes) < POINTS * POINTS * out_channels * in_channels

    inputs = np.random.default_rng(0).standard_normal(static_shape or [1, in_channels, 9, 9]).astype(np.float32)
    expected = _run(_convolution_model(in_channels, out_channels), inputs)
    np.testing.assert_allclose(_run(model, inputs), expected, atol=1e-4 * np.abs(expected).max())


def _exact_images(bundle: Path) -> np.ndarray:
    import sdrt.engine

    pipe = sdrt.engine.load(bundle, backend="openvino-fp32", safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe("a red circle", num_inference_steps=2, height=64, width=64, seed=0, output_type="np").images


def _count_winograd_rewrites(monkeypatch) -> list[int]:
    """Record how many convolutions each Winograd rewrite of exact mode's U-Net changes."""
    import dataclasses

    from sdrt.engine.backends.openvino import backend as openvino_backend
    from sdrt.engine.backends.openvino.passes import registry

    counts: list[int] = []

    def counted(model) -> int:
        counts.append(registry.WINOGRAD.apply(model))
        return counts[-1]

    unet_rewrites = tuple(
        dataclasses.replace(r, apply=counted) if r is registry.WINOGRAD else r
        for r in openvino_backend.OpenVINOFP32Backend.rewrites[Component.UNET]
    )
    monkeypatch.setattr(openvino_backend.OpenVINOFP32Backend, "rewrites", {Component.UNET: unet_rewrites})
    return counts


def test_exact_mode_converts_its_unet_once_into_the_bundle_cache(tiny_bundle: Path, tmp_path: Path, monkeypatch) -> None:
    from sdrt.engine.backends.openvino import cache
    from sdrt.engine.backends.openvino.passes import registry

    bundle = Path(shutil.copytree(tiny_bundle, tmp_path / "bundle", ignore=shutil.ignore_patterns(".cache")))
    rewritten = _count_winograd_rewrites(monkeypatch)
    first = _exact_images(bundle)

    converted = [d.name for d in (bundle / cache.CACHE_SUBDIR / "ir").iterdir()]
    assert len(converted) == 1 and converted[0].startswith("unet-") and registry.WINOGRAD.name in converted[0]
    assert len(rewritten) == 1 and rewritten[0] > 0  # the tiny U-Net's 3x3 convolutions are all small

    again = _exact_images(bundle)
    assert len(rewritten) == 1  # not converted again
    np.testing.assert_array_equal(again, first)


@pytest.mark.slow
def test_read_only_bundle_rewrites_in_memory_on_each_load(tiny_bundle: Path, tmp_path: Path, monkeypatch) -> None:
    from sdrt.engine.backends.openvino import backend as openvino_backend, cache

    writable = Path(shutil.copytree(tiny_bundle, tmp_path / "writable", ignore=shutil.ignore_patterns(".cache")))
    expected = _exact_images(writable)
    bundle = Path(shutil.copytree(tiny_bundle, tmp_path / "read-only", ignore=shutil.ignore_patterns(".cache")))
    real_access = os.access  # root ignores file modes: make the bundle read-only the way the backend sees it
    monkeypatch.setattr(openvino_backend.os, "access", lambda path, mode: Path(path) != bundle and real_access(path, mode))
    rewritten = _count_winograd_rewrites(monkeypatch)

    np.testing.assert_array_equal(_exact_images(bundle), expected)
    np.testing.assert_array_equal(_exact_images(bundle), expected)
    assert len(rewritten) == 2
    assert not (bundle / cache.CACHE_SUBDIR).exists()
