"""The U-Net's text-independent prefix run once for both halves of a classifier-free guidance batch (OpenVINO):
the same noise prediction as the whole model, on half the batch where nothing reads the text, and never used for a
batch whose halves differ."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

import sdrt.engine
from sdrt.engine.backends.openvino.backend import OpenVINOFP32Backend
from sdrt.engine.manifest import read_manifest
from sdrt.engine.guidance_batch import REPEATED_INPUTS
from sdrt.engine.specs import Component

pytestmark = pytest.mark.skipif(OpenVINOFP32Backend.unavailable_reason() is not None, reason="openvino not installed")

FP32 = {"INFERENCE_PRECISION_HINT": "f32"}
REPEATED = REPEATED_INPUTS[Component.UNET]


def _guided_feeds(bundle: Path, images: int, size: int = 8, seed: int = 0) -> dict[str, np.ndarray]:
    manifest = read_manifest(bundle)
    rng = np.random.default_rng(seed)
    latents = rng.standard_normal((images, manifest.model.unet_in_channels, size, size)).astype(np.float32)  # (B, C, h, w)
    timesteps = rng.uniform(0, 999, images).astype(np.float32)  # (B,)
    hidden = manifest.components[Component.UNET].inputs[2].shape[-1]
    return {
        "sample": np.concatenate([latents, latents]),  # (2B, C, h, w)
        "timestep": np.concatenate([timesteps, timesteps]),  # (2B,)
        "encoder_hidden_states": rng.standard_normal((2 * images, 77, hidden)).astype(np.float32),  # [uncond; cond]
    }


def _noise_prediction(model, feeds: dict[str, np.ndarray]) -> np.ndarray:
    import openvino as ov

    model.reshape({name: list(array.shape) for name, array in feeds.items()})
    return ov.Core().compile_model(model, "CPU", FP32)(feeds)[0]


def _read_unet(bundle: Path):
    import openvino as ov

    return ov.Core().read_model(str(bundle / "unet" / "model.onnx"))


@pytest.mark.parametrize("images", [1, 2])
def test_shared_prefix_predicts_the_same_noise_on_half_the_batch(tiny_bundle: Path, images: int) -> None:
    from sdrt.engine.backends.openvino.passes.guidance_prefix import share_guidance_prefix

    feeds = _guided_feeds(tiny_bundle, images)
    expected = _noise_prediction(_read_unet(tiny_bundle), feeds)
    model = _read_unet(tiny_bundle)

    assert share_guidance_prefix(model, REPEATED) > 0
    actual = _noise_prediction(model, feeds)

    np.testing.assert_allclose(actual, expected, atol=1e-5)
    assert np.abs(expected).max() > 0.1
    convolutions = [op for op in model.get_ordered_ops() if op.get_type_name() == "Convolution"]
    # conv_in (the first convolution) runs on the latents once, the last (conv_out) on the whole batch
    assert convolutions[0].get_output_partial_shape(0)[0].get_length() == images
    assert convolutions[-1].get_output_partial_shape(0)[0].get_length() == 2 * images


def test_without_a_text_input_or_the_repeated_inputs_nothing_is_rewritten(tiny_bundle: Path) -> None:
    import openvino as ov
    from openvino import opset13 as ops

    from sdrt.engine.backends.openvino.passes.guidance_prefix import share_guidance_prefix

    model = _read_unet(tiny_bundle)
    before = len(model.get_ordered_ops())
    assert share_guidance_prefix(model, ("sample", "timestep", "encoder_hidden_states")) == 0  # all inputs repeated
    assert share_guidance_prefix(model, ("latents",)) == 0  # no such input
    assert len(model.get_ordered_ops()) == before

    # nothing depends on the repeated input alone: no crossing
    sample, context = ops.parameter([-1, 4], ov.Type.f32, name="sample"), ops.parameter([-1, 4], ov.Type.f32, name="context")
    mixed = ov.Model([ops.add(sample, context)], [sample, context])
    assert share_guidance_prefix(mixed, ("sample",)) == 0


def test_a_prefix_tensor_without_a_batch_axis_leaves_the_model_alone() -> None:
    import openvino as ov
    from openvino import opset13 as ops

    from sdrt.engine.backends.openvino.passes.guidance_prefix import share_guidance_prefix

    # a reduction over the batch is not per sample: halving its input would change it
    sample, context = ops.parameter([-1, 4], ov.Type.f32, name="sample"), ops.parameter([-1, 4], ov.Type.f32, name="context")
    total = ops.reduce_sum(sample, ops.constant(np.array([0], np.int64)), keep_dims=False)  # (4,)
    model = ov.Model([ops.multiply(context, total)], [sample, context])
    before = len(model.get_ordered_ops())

    assert share_guidance_prefix(model, ("sample",)) == 0
    assert len(model.get_ordered_ops()) == before


def test_exact_mode_shares_the_prefix_for_guided_batches_only(tiny_bundle: Path, tmp_path: Path, monkeypatch) -> None:
    # A guided request's first call compiles the shared-prefix U-Net; an unguided request of the same batch size
    # (its halves differ) compiles the whole model for any shapes, and every image matches a backend that never
    # shares. From an empty cache: load() would otherwise load what earlier tests compiled.
    from sdrt.engine.backends.openvino import backend as openvino_backend

    tiny_bundle = Path(shutil.copytree(tiny_bundle, tmp_path / "bundle", ignore=shutil.ignore_patterns(".cache")))
    pipe = sdrt.engine.load(tiny_bundle, backend="openvino-fp32", safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    compiled: list = []
    compile_ = pipe.backend._compile
    monkeypatch.setattr(pipe.backend, "_compile", lambda model, shapes, guided_halves=False: compiled.append(
        (model.component, shapes is not None, guided_halves)) or compile_(model, shapes, guided_halves))
    requests = [dict(guidance_scale=7.5, num_images_per_prompt=1), dict(guidance_scale=7.5, num_images_per_prompt=1),
                dict(guidance_scale=1.0, num_images_per_prompt=2), dict(guidance_scale=7.5, num_images_per_prompt=1)]
    images = [pipe("a cat", num_inference_steps=2, height=64, width=64, seed=3, output_type="np", **r).images for r in requests]

    unet_compiles = [(static, guided) for component, static, guided in compiled if component is Component.UNET]
    assert unet_compiles == [(True, True), (False, False)]
    assert pipe.backend._loaded[Component.UNET].guided_halves is False

    monkeypatch.setattr(openvino_backend, "REPEATED_INPUTS", {})
    whole = sdrt.engine.load(tiny_bundle, backend="openvino-fp32", safety_checker=False)
    whole.set_progress_bar_config(disable=True)
    for request, image in zip(requests, images):
        np.testing.assert_allclose(whole("a cat", num_inference_steps=2, height=64, width=64, seed=3, output_type="np", **request).images,
                                   image, atol=1e-5)
