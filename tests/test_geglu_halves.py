"""GEGLU projections as two products (the fast modes' U-Net on OpenVINO): same outputs as one product sliced in
two, only the projections it is meant for, and the halves' constants made by the store."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from sdrt.engine.backends.openvino.backend import OpenVINOBF16Backend, OpenVINOFP32Backend
from sdrt.engine.specs import Component

pytestmark = pytest.mark.skipif(OpenVINOFP32Backend.unavailable_reason() is not None, reason="openvino not installed")

FP32 = {"INFERENCE_PRECISION_HINT": "f32"}
TOKENS, IN_FEATURES, OUT_FEATURES = 7, 6, 10


def _geglu_model(*, transpose_b: bool = False, int8_weights: bool = False, bounds=((0, 5), (5, 10)), extra_reader: bool = False):
    """x (2, 7, 6) -> x @ W + b (10 outputs) -> slices at `bounds` -> first * gelu(second), as diffusers' GEGLU
    exports (the step a broadcast constant, as torch writes it)."""
    import openvino as ov
    from openvino import opset13 as ops

    rng = np.random.default_rng(3)
    source = ops.parameter([2, TOKENS, IN_FEATURES], ov.Type.f32)
    shape = (OUT_FEATURES, IN_FEATURES) if transpose_b else (IN_FEATURES, OUT_FEATURES)
    if int8_weights:  # OpenVINO's dequantization: (convert(i8) - zero point) * per-output scale
        scale_shape = (OUT_FEATURES, 1) if transpose_b else (1, OUT_FEATURES)
        quantized = ops.constant(rng.integers(-100, 100, shape).astype(np.int8))
        zero_point = ops.constant(rng.integers(-3, 3, scale_shape).astype(np.float32))
        weights = ops.multiply(ops.subtract(ops.convert(quantized, "f32"), zero_point),
                               ops.constant((rng.random(scale_shape) * 0.02).astype(np.float32)))
    else:
        weights = ops.convert(ops.constant(rng.standard_normal(shape).astype(np.float16)), "f32")
    projected = ops.add(ops.matmul(source, weights, False, transpose_b), ops.constant(rng.standard_normal(OUT_FEATURES).astype(np.float32)))
    step = ops.broadcast(ops.constant(np.array([1], np.int64)), ops.constant(np.array([1], np.int64)))
    first, second = (ops.slice(projected, ops.constant(np.array([start], np.int64)), ops.constant(np.array([stop], np.int64)), step,
                               ops.constant(np.array([-1], np.int64))) for start, stop in bounds)
    results = [ops.multiply(first, ops.gelu(second, "erf"))]
    if extra_reader:
        results.append(ops.relu(projected))
    return ov.Model(results, [source])


def _run(model, inputs: np.ndarray) -> list[np.ndarray]:
    import openvino as ov

    compiled = ov.Core().compile_model(model, "CPU", FP32)
    return [compiled(inputs)[i] for i in range(len(compiled.outputs))]


def _store(stored: list):
    from openvino import opset13 as ops

    def store(key, shapes, compute):
        arrays = compute()
        assert [array.shape for array in arrays] == [tuple(shape) for shape in shapes]
        stored.append((key, arrays[0].dtype, arrays[0].shape))
        # as the backend's store: fp16 arrays come back converted to fp32
        return [(ops.convert(ops.constant(array), "f32") if array.dtype == np.float16 else ops.constant(array)).output(0) for array in arrays]

    return store


@pytest.mark.parametrize("options", [{}, dict(transpose_b=True), dict(int8_weights=True), dict(int8_weights=True, transpose_b=True)],
                         ids=["fp16-weights", "transposed", "int8-weights", "int8-transposed"])
def test_projection_as_two_products_matches_one_sliced(options) -> None:
    from sdrt.engine.backends.openvino.passes.geglu_halves import rewrite_geglu_projections

    inputs = np.random.default_rng(0).standard_normal((2, TOKENS, IN_FEATURES)).astype(np.float32)
    expected, = _run(_geglu_model(**options), inputs)
    model = _geglu_model(**options)
    stored: list = []

    assert rewrite_geglu_projections(model, _store(stored)) == 1
    assert not [op for op in model.get_ordered_ops() if op.get_type_name() == "Slice"]
    actual, = _run(model, inputs)

    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
    assert np.abs(expected).max() > 0.1
    # the halves' constants, in their own precision, each half the projection's outputs wide
    halves = [shape for _, _, shape in stored if OUT_FEATURES // 2 in shape]
    assert len(halves) >= 4 and all(OUT_FEATURES not in shape for _, _, shape in stored)
    assert any(dtype == (np.int8 if options.get("int8_weights") else np.float16) for _, dtype, _ in stored)


@pytest.mark.parametrize("options", [dict(bounds=((0, 5), (4, 9))), dict(extra_reader=True)], ids=["not-halves", "third-reader"])
def test_projections_it_is_not_for_are_left_alone(options) -> None:
    from sdrt.engine.backends.openvino.passes.geglu_halves import rewrite_geglu_projections

    model = _geglu_model(**options)
    before = [op.get_type_name() for op in model.get_ordered_ops()]
    assert rewrite_geglu_projections(model, _store([])) == 0
    assert [op.get_type_name() for op in model.get_ordered_ops()] == before


def test_without_a_store_nothing_is_rewritten() -> None:
    # held in the heap, the halves would stay resident beside OpenVINO's repacked copy
    from sdrt.engine.backends.openvino.passes.geglu_halves import rewrite_geglu_projections

    assert rewrite_geglu_projections(_geglu_model(), None) == 0


@pytest.mark.skipif(OpenVINOBF16Backend.unavailable_reason() is not None, reason="no OpenVINO bf16 on this CPU")
def test_fast_mode_rewrites_its_unets_geglu_projections_and_exact_mode_does_not(tiny_bundle: Path, tmp_path: Path, monkeypatch) -> None:
    import dataclasses

    import sdrt.engine
    from sdrt.engine.backends.openvino.passes import registry

    unet = Component.UNET
    assert registry.GEGLU_HALVES not in OpenVINOFP32Backend.static_shape_rewrites[unet]
    counts: list[int] = []
    counted = dataclasses.replace(registry.GEGLU_HALVES,
                                  apply=lambda model, store: counts.append(registry.GEGLU_HALVES.apply(model, store)) or counts[-1])

    def images(rewrites: tuple, name: str) -> np.ndarray:
        monkeypatch.setattr(OpenVINOBF16Backend, "static_shape_rewrites", {**OpenVINOBF16Backend.static_shape_rewrites, unet: rewrites})
        bundle = Path(shutil.copytree(tiny_bundle, tmp_path / name, ignore=shutil.ignore_patterns(".cache")))
        pipe = sdrt.engine.load(bundle, backend="openvino-bf16", safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        return pipe("a red circle", num_inference_steps=2, height=64, width=64, seed=0, output_type="np").images

    assert registry.GEGLU_HALVES in OpenVINOBF16Backend.static_shape_rewrites[unet]
    rewritten = images((counted, registry.UPSAMPLE_PHASES), "rewritten")
    assert counts and counts[0] > 0  # the tiny U-Net's transformer blocks use GEGLU, as SD 1.5's do
    whole = images((registry.UPSAMPLE_PHASES,), "whole")
    # bf16 rounds the products' accumulations differently: close, not equal
    assert np.abs(rewritten - whole).mean() < 0.005 and np.abs(rewritten - whole).max() < 0.05
