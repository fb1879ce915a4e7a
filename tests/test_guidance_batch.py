"""The guidance batch layout: [uncond; cond] halves, and diffusers' guided noise prediction."""
from __future__ import annotations

import numpy as np
import pytest

from sdrt.engine import guidance_batch
from sdrt.engine.guidance_batch import halves_identical


def test_batch_puts_the_unconditional_half_first_and_split_undoes_it() -> None:
    uncond, cond = np.zeros((2, 3), np.float32), np.ones((2, 3), np.float32)
    batched = guidance_batch.batch(uncond, cond)
    assert batched.shape == (4, 3) and batched[:2].sum() == 0 and batched[2:].sum() == 6
    back_uncond, back_cond = guidance_batch.split(batched)
    np.testing.assert_array_equal(back_uncond, uncond)
    np.testing.assert_array_equal(back_cond, cond)


def test_combine_is_diffusers_guidance() -> None:
    rng = np.random.default_rng(0)
    uncond, cond = rng.standard_normal((2, 2, 4, 3, 3), dtype=np.float32)
    # diffusers: noise_pred_uncond + guidance_scale * (noise_pred_text - noise_pred_uncond)
    expected = uncond + np.float32(7.5) * (cond - uncond)
    np.testing.assert_array_equal(guidance_batch.combine(np.concatenate([uncond, cond]), 7.5), expected)


@pytest.mark.parametrize(("scale", "guided"), [(7.5, True), (1.0, False), (0.0, False), (1.01, True)])
def test_the_unconditional_half_runs_above_scale_one(scale: float, guided: bool) -> None:
    assert guidance_batch.is_guided(scale) is guided
    assert guidance_batch.batch_size(3, guided) == (6 if guided else 3)
    assert guidance_batch.repeat(np.arange(3), guided).tolist() == ([0, 1, 2] * (2 if guided else 1))


@pytest.mark.parametrize(
    ("arrays", "identical"),
    [
        ({"a": np.array([1.0, 2.0, 1.0, 2.0]), "b": np.zeros((2, 3))}, True),
        ({"a": np.array([1.0, 2.0, 1.0, 2.5]), "b": np.zeros((2, 3))}, False),
        ({"a": np.array([1.0, 1.0]), "b": np.arange(6.0).reshape(2, 3)}, False),  # one input differs
        ({"a": np.array([1.0, 1.0, 1.0]), "b": np.zeros((4, 3))}, False),  # odd batch
        ({"a": np.array([1.0]), "b": np.zeros((2, 3))}, False),
        ({"a": np.zeros(0), "b": np.zeros((2, 3))}, False),
    ],
)
def test_halves_identical(arrays: dict[str, np.ndarray], identical: bool) -> None:
    assert halves_identical(arrays, ("a", "b")) is identical
