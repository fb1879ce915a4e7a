"""Where batching buys no speed (the CPU backends), the VAE decodes one image at a time, to the same pixels."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import sdrt.engine
from sdrt.engine.image_io import decoded_to_unit_range
from sdrt.engine.specs import Component


def _decoder_batches(pipe, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    batches: list[int] = []
    run = pipe.backend.run

    def spy(component, feeds):
        if component is Component.VAE_DECODER:
            batches.append(len(feeds["latent_sample"]))
        return run(component, feeds)

    monkeypatch.setattr(pipe.backend, "run", spy)
    return batches


@pytest.mark.parametrize("batched_decode, expected_batches", [(False, [1, 1, 1]), (True, [3])])
def test_decoder_batches_follow_the_backend(tiny_bundle: Path, monkeypatch: pytest.MonkeyPatch,
                                            batched_decode: bool, expected_batches: list[int]) -> None:
    pipe = sdrt.engine.load(tiny_bundle, backend="onnxruntime-cpu")
    latents = np.random.default_rng(0).standard_normal(pipe.latent_shape(3, 64, 64)).astype(np.float32)  # (3, C, h, w)
    scaled = latents / np.float32(pipe.manifest.model.vae_scaling_factor)
    batched = decoded_to_unit_range(pipe.backend.run(Component.VAE_DECODER, {"latent_sample": scaled})[0])

    monkeypatch.setattr(pipe.backend, "batched_decode", batched_decode)
    batches = _decoder_batches(pipe, monkeypatch)
    images = pipe.decode(latents)  # (3, H, W, 3)

    assert batches == expected_batches
    np.testing.assert_allclose(images, batched, rtol=0, atol=1e-6)


def test_cpu_backends_decode_one_image_at_a_time() -> None:
    from sdrt.engine.backends import BACKENDS

    assert {b.name for b in BACKENDS if not b.batched_decode} >= {"onnxruntime-cpu", "openvino-bf16", "openvino-fp32"}
    assert {b.name for b in BACKENDS if b.batched_decode} == {"tensorrt", "cuda", "cuda-fp16"}
