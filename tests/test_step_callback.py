"""The pipeline's hooks for serving: diffusers' callback_on_step_end (stop between steps, replace latents) and
draw_noise (a seed's initial noise, so batched requests keep their own)."""
from __future__ import annotations

import numpy as np
import pytest

from sdrt.engine import GenerationCancelled, InvalidArgumentError

ARGS = {"prompt": "a red circle", "num_inference_steps": 4, "height": 64, "width": 64, "output_type": "np"}


def test_callback_runs_after_every_step_with_the_latents(tiny_pipe):
    seen = []

    def callback(pipe, step_index, timestep, tensors):
        seen.append((pipe, step_index, timestep, tensors["latents"].shape))
        return tensors

    with_callback = tiny_pipe(**ARGS, seed=3, callback_on_step_end=callback).images
    timesteps = tiny_pipe.scheduler.start(4).timesteps
    assert [(p, i, t) for p, i, t, _ in seen] == [(tiny_pipe, i, float(t)) for i, t in enumerate(timesteps)]
    assert seen[0][3] == tiny_pipe.latent_shape(1, 64, 64)
    assert np.array_equal(with_callback, tiny_pipe(**ARGS, seed=3).images)


def test_callback_can_replace_latents_and_stop_the_run(tiny_pipe):
    replaced = tiny_pipe(**ARGS, seed=3, callback_on_step_end=lambda p, i, t, k: {"latents": k["latents"] * 0}).images
    assert not np.array_equal(replaced, tiny_pipe(**ARGS, seed=3).images)
    steps = []

    def stop_after_two(pipe, step_index, timestep, tensors):
        steps.append(step_index)
        if step_index == 1:
            raise GenerationCancelled("enough")

    with pytest.raises(GenerationCancelled, match="enough"):
        tiny_pipe(**ARGS, seed=3, callback_on_step_end=stop_after_two)
    assert steps == [0, 1]
    with pytest.raises(InvalidArgumentError) as error:
        tiny_pipe(**ARGS, callback_on_step_end="not a function")
    assert error.value.parameter == "callback_on_step_end"


def test_draw_noise_is_the_noise_a_seeded_call_draws(tiny_pipe):
    noise = tiny_pipe.draw_noise(7, 2, 64, 72)
    assert noise.shape == tiny_pipe.latent_shape(2, 64, 72) and noise.dtype == np.float32
    seeded = tiny_pipe(**{**ARGS, "width": 72}, num_images_per_prompt=2, seed=7).images
    given = tiny_pipe(**{**ARGS, "width": 72}, num_images_per_prompt=2, latents=noise).images
    assert np.array_equal(seeded, given)
