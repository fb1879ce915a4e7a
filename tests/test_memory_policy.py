"""memory="one-at-a-time" keeps only the component in use loaded, and changes nothing in the images."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import sdrt.engine
from sdrt.engine import InvalidArgumentError
from sdrt.engine.specs import Component


def _images(bundle: Path, memory: str) -> tuple[np.ndarray, frozenset[Component]]:
    pipe = sdrt.engine.load(bundle, backend="onnxruntime-cpu", memory=memory)
    pipe.set_progress_bar_config(disable=True)
    images = pipe("a cat", num_inference_steps=3, height=64, width=64, seed=7, output_type="np").images
    return images, pipe.backend.loaded_components


def test_one_at_a_time_keeps_only_the_last_component(tiny_bundle: Path) -> None:
    kept, kept_loaded = _images(tiny_bundle, "keep-loaded")
    low, low_loaded = _images(tiny_bundle, "one-at-a-time")
    assert kept_loaded == {Component.TEXT_ENCODER, Component.UNET, Component.VAE_DECODER, Component.SAFETY_CHECKER}
    assert low_loaded == {Component.SAFETY_CHECKER}  # the last stage of a request
    np.testing.assert_array_equal(low, kept)


def test_unknown_memory_policy_names_the_parameter(tiny_bundle: Path) -> None:
    with pytest.raises(InvalidArgumentError, match=r"^memory: must be one of \['keep-loaded', 'one-at-a-time'\]"):
        sdrt.engine.load(tiny_bundle, memory="low")
