"""Bad requests raise InvalidArgumentError (a ValueError) naming the parameter and its allowed range, before any work."""
from __future__ import annotations

import numpy as np
import pytest

from sdrt.engine import GenerationRequest, InvalidArgumentError

OK = dict(prompt="a cat", num_inference_steps=1, height=64, width=64)

BAD = [
    # SD 1.x's steps_offset=1 with leading spacing: 1000 steps would need timestep 1000 of 0..999 (diffusers: IndexError).
    ("num_inference_steps", dict(num_inference_steps=0), "1..999"),
    ("num_inference_steps", dict(num_inference_steps=1000), "1..999"),
    ("num_inference_steps", dict(num_inference_steps=2.5), "1..999"),
    # the tiny model is trained at 256 px: sides from a quarter to four times that
    ("height", dict(height=60), "a multiple of 8 in 64..1024"),
    ("width", dict(width=0), "a multiple of 8 in 64..1024"),
    ("width", dict(width=-64), "a multiple of 8 in 64..1024"),
    ("height", dict(height=56), "a multiple of 8 in 64..1024"),
    ("width", dict(width=8), "a multiple of 8 in 64..1024"),
    ("height", dict(height=1032), "a multiple of 8 in 64..1024"),
    ("guidance_scale", dict(guidance_scale=float("nan")), "finite"),
    ("guidance_scale", dict(guidance_scale=float("inf")), "finite"),
    ("guidance_scale", dict(guidance_scale="7.5"), "finite"),
    ("negative_prompt", dict(prompt=["a", "b"], negative_prompt=["x", "y", "z"]), "has 3 entries but prompt has 2"),
    ("num_images_per_prompt", dict(num_images_per_prompt=0), ">= 1"),
    ("prompt", dict(prompt=42), "string"),
    ("prompt", dict(prompt=["ok", None]), "string"),
    ("prompt", dict(prompt=[]), "non-empty"),
    ("seed", dict(seed=-1), "non-negative"),
    ("output_type", dict(output_type="jpeg"), "one of"),
    ("latents", dict(latents=np.zeros((1, 4, 4, 4), np.float32)), "shape (1, 4, 8, 8)"),
    ("latents", dict(latents=np.zeros((1, 4, 8, 8), np.float64)), "float32"),
    ("latents", dict(latents=[[0.0]]), "float32 numpy array"),
    ("latents", dict(latents=np.full((1, 4, 8, 8), np.nan, np.float32)), "NaN"),
]


@pytest.mark.parametrize("parameter, override, fragment", BAD, ids=[f"{p}-{i}" for i, (p, _, _) in enumerate(BAD)])
def test_bad_argument_is_named(tiny_pipe, parameter: str, override: dict, fragment: str) -> None:
    with pytest.raises(InvalidArgumentError) as info:
        tiny_pipe(**{**OK, **override})
    assert info.value.parameter == parameter
    assert str(info.value).startswith(parameter)
    assert fragment in str(info.value)
    assert isinstance(info.value, ValueError)


def test_defaults_follow_the_model(tiny_pipe) -> None:
    # height/width default to sample_size * vae_scale_factor, read from the checkpoint (tiny: 32 * 8).
    out = tiny_pipe("a cat", num_inference_steps=1, output_type="np")
    assert out.images.shape == (1, 256, 256, 3)


def test_seed_is_reproducible_and_matters(tiny_pipe) -> None:
    run = lambda seed: tiny_pipe("a cat", num_inference_steps=2, height=64, width=64, seed=seed, output_type="np").images
    np.testing.assert_array_equal(run(3), run(3))
    assert np.abs(run(3) - run(4)).max() > 1e-3


def test_string_negative_prompt_applies_to_every_prompt(tiny_pipe) -> None:
    latents = np.random.default_rng(0).standard_normal((2, 4, 8, 8), dtype=np.float32)
    run = lambda negative: tiny_pipe(["a", "b"], negative_prompt=negative, num_inference_steps=2, height=64, width=64,
                                     latents=latents, output_type="np").images
    np.testing.assert_array_equal(run("blur"), run(["blur", "blur"]))


def test_pil_output_is_rgb_of_requested_size(tiny_pipe) -> None:
    out = tiny_pipe("a cat", num_inference_steps=1, height=64, width=96, num_images_per_prompt=2, seed=0)
    assert [(image.mode, image.size) for image in out.images] == [("RGB", (96, 64))] * 2
    assert out.nsfw_content_detected is None
    assert out.backend == "onnxruntime-cpu"


def test_latent_output_skips_decoding(tiny_pipe) -> None:
    out = tiny_pipe("a cat", num_inference_steps=1, height=64, width=64, seed=0, output_type="latent")
    assert out.images.shape == (1, 4, 8, 8)


def test_empty_prompt_embedding_is_computed_once(tiny_pipe, monkeypatch) -> None:
    tiny_pipe("warm-up", num_inference_steps=1, height=64, width=64, seed=0)
    encoded = []
    original = tiny_pipe.backend.run

    def recording_run(component, feeds):
        if component.value == "text_encoder":
            encoded.append(feeds["input_ids"].tolist())
        return original(component, feeds)

    monkeypatch.setattr(tiny_pipe.backend, "run", recording_run)
    tiny_pipe("a cat", num_inference_steps=1, height=64, width=64, seed=0)
    assert encoded == [tiny_pipe.tokenizer(["a cat"]).tolist()]  # the prompt alone: "" was encoded once, before


def test_guidance_at_most_one_runs_a_single_unet_batch(tiny_pipe, monkeypatch) -> None:
    batches = []
    original = tiny_pipe.backend.run
    monkeypatch.setattr(tiny_pipe.backend, "run", lambda c, feeds: batches.append((c.value, len(next(iter(feeds.values()))))) or original(c, feeds))
    tiny_pipe("a cat", num_inference_steps=1, height=64, width=64, seed=0, guidance_scale=1.0, num_images_per_prompt=2)
    assert ("unet", 2) in batches and ("unet", 4) not in batches
    batches.clear()
    tiny_pipe("a cat", num_inference_steps=1, height=64, width=64, seed=0, guidance_scale=7.5, num_images_per_prompt=2)
    assert ("unet", 4) in batches


@pytest.mark.parametrize("scheduler", ["default", "pndm", "ddim", "euler", "euler_a", "dpm++2m", "dpm++2m-karras", "lms"])
def test_every_scheduler_takes_its_max_steps_and_refuses_one_more(tiny_pipe, scheduler: str) -> None:
    top = tiny_pipe.sampler(scheduler).max_inference_steps
    # the tiny checkpoint's schedule is SD 1.5's: PNDM and DDIM stop one short of its 1000 training timesteps
    assert top == (999 if scheduler in ("default", "pndm", "ddim") else 1000)
    request = GenerationRequest.create(tiny_pipe.limits, "a cat", num_inference_steps=top, scheduler=scheduler)
    assert len(request.schedule.timesteps) >= top
    with pytest.raises(InvalidArgumentError, match=rf"^num_inference_steps: must be an integer in 1\.\.{top} .*got {top + 1}"):
        GenerationRequest.create(tiny_pipe.limits, "a cat", num_inference_steps=top + 1, scheduler=scheduler)


def test_sides_follow_the_trained_size(tiny_pipe, monkeypatch) -> None:
    monkeypatch.setattr(tiny_pipe, "memory_budget", None)  # the estimate of 1024x1024 may not fit this machine
    sides = tiny_pipe.manifest.model.image_sides
    assert (sides.minimum, sides.maximum, sides.multiple) == (256 // 4, 256 * 4, 8)
    for side in (64, 1024):
        assert GenerationRequest.create(tiny_pipe.limits, "a cat", height=side, width=side).height == side


def test_images_over_the_memory_budget_are_refused_before_any_model_runs(tiny_pipe, monkeypatch) -> None:
    from sdrt.engine.host_memory import MemoryBudget
    from sdrt.engine.memory_estimate import MemoryModel

    calls = []
    monkeypatch.setattr(tiny_pipe.backend, "run", lambda *args: calls.append(args))
    model = MemoryModel.for_pipeline(tiny_pipe, tiny_pipe._opened_rss_bytes)
    budget = model.peak_bytes(64, 64, 3, True)  # three guided images of 64x64 fit, the estimate says; four do not
    assert model.peak_bytes(64, 64, 4, True) > budget
    monkeypatch.setattr(tiny_pipe, "memory_budget", MemoryBudget(bytes=budget))
    assert GenerationRequest.create(tiny_pipe.limits, ["a", "b", "c"], height=64, width=64).num_images == 3
    with pytest.raises(InvalidArgumentError, match=r"^num_images_per_prompt: must be at most 1 here \(2 prompt\(s\)\): 4 images"):
        tiny_pipe(["a", "b"], num_images_per_prompt=2, height=64, width=64)
    monkeypatch.setattr(tiny_pipe, "memory_budget", MemoryBudget(bytes=model.peak_bytes(64, 64, 1, True) - 1))
    with pytest.raises(InvalidArgumentError, match=r"^height: 1 images of 64x64 need about .* no size fits"):
        tiny_pipe("a", height=64, width=64)
    assert calls == []


def test_a_ready_request_runs_as_its_arguments_do(tiny_pipe) -> None:
    request = GenerationRequest.create(tiny_pipe.limits, "a cat", num_inference_steps=2, height=64, width=64, seed=1,
                                       output_type="np")
    direct = tiny_pipe("a cat", num_inference_steps=2, height=64, width=64, seed=1, output_type="np").images
    np.testing.assert_array_equal(tiny_pipe(request).images, direct)
    with pytest.raises(InvalidArgumentError, match="^seed: cannot be given with a GenerationRequest"):
        tiny_pipe(request, seed=2)
