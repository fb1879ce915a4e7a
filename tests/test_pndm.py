"""PNDMScheduler (numpy, explicit state) against diffusers' PNDMScheduler, call by call.

Agreement is float32 rounding, not bit-identity: diffusers' alpha-bar is reproduced bit for bit,
but torch's float32 sqrt (MKL) is off by one ulp on ~20% of inputs where numpy's is correctly
rounded, so the scalar coefficients of an update can differ by an ulp.
"""
from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import numpy as np
import pytest

from sdrt.export.random_checkpoint import SD15_SCHEDULER_CONFIG
from sdrt.engine.schedulers import (
    PNDMScheduler,
    PNDMState,
    Scheduler,
    SchedulerConfigError,
    SchedulerState,
    alphas_cumprod,
    betas_from_config,
    scheduler_from_config,
)

# scheduler/scheduler_config.json of SD 1.5, as real checkpoints ship it (with the class metadata diffusers adds).
SD15_CONFIG = {"_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", **SD15_SCHEDULER_CONFIG}

# Each variant is SD 1.5's config with these keys changed.
VARIANTS = {
    "sd15": {},
    "prk_warmup": {"skip_prk_steps": False},
    "alpha_to_one": {"set_alpha_to_one": True},
    "trailing": {"timestep_spacing": "trailing"},
    "linspace": {"timestep_spacing": "linspace"},
    "linear": {"beta_schedule": "linear"},
    "cosine": {"beta_schedule": "squaredcos_cap_v2"},
    "v_prediction": {"prediction_type": "v_prediction"},
    "offset_0": {"steps_offset": 0},
    "trained_betas": {"trained_betas": np.linspace(0.0001, 0.02, 1000).tolist()},
    "prk_offset_0_alpha_to_one": {"skip_prk_steps": False, "steps_offset": 0, "set_alpha_to_one": True},
    "prk_trailing_v": {"skip_prk_steps": False, "timestep_spacing": "trailing", "prediction_type": "v_prediction"},
    "prk_linspace_cosine": {
        "skip_prk_steps": False,
        "timestep_spacing": "linspace",
        "beta_schedule": "squaredcos_cap_v2",
    },
}
STEP_COUNTS = [1, 2, 3, 4, 5, 10, 50, 1000]
SHAPE = (2, 4, 8, 8)

# One call from the same inputs: a few float32 ulps (measured <= 4.8e-7 of the largest entry).
CALL_RTOL, CALL_ATOL = 1e-6, 1e-6
# A whole run feeding each scheduler its own samples: ulps compound (measured <= 6.5e-6).
RUN_RTOL, RUN_ATOL = 1e-5, 1e-6


def _config(variant: str) -> dict:
    return {**SD15_CONFIG, **VARIANTS[variant]}


def _rejected(variant: str, num_steps: int) -> bool:
    """Runs diffusers cannot make: RK warm-up under 4 steps; leading + steps_offset 1 at 1000 steps (t=1000)."""
    config = _config(variant)
    too_few_for_runge_kutta = not config["skip_prk_steps"] and num_steps < 4
    past_last_timestep = config.get("timestep_spacing", "leading") == "leading" and num_steps == 1000
    return too_few_for_runge_kutta or (past_last_timestep and config["steps_offset"] > 0)


CASES = [(variant, num_steps) for variant in VARIANTS for num_steps in STEP_COUNTS]
ACCEPTED = [case for case in CASES if not _rejected(*case)]
REJECTED = [case for case in CASES if _rejected(*case)]


def _assert_close(actual: np.ndarray, desired: np.ndarray, rtol: float, atol: float, message: str) -> None:
    """assert_allclose with atol relative to the array's scale: random (non-denoising) model outputs
    grow samples to ~1e5 under some schedules, where float32 resolves only ~1e-2."""
    scale = max(1.0, float(np.abs(desired).max()))
    np.testing.assert_allclose(actual, desired, rtol=rtol, atol=atol * scale, err_msg=message)


@dataclass(frozen=True)
class ReferenceRun:
    """diffusers' run: its timesteps, the inputs fed to it, and the sample after each call."""

    timesteps: np.ndarray  # (calls,) int64
    initial_sample: np.ndarray  # (B, C, H, W)
    model_outputs: np.ndarray  # (calls, B, C, H, W)
    samples: np.ndarray  # (calls, B, C, H, W) — prev_sample of each call

    def inputs(self, call: int) -> np.ndarray:
        """The sample diffusers was given at ``call``."""
        return self.initial_sample if call == 0 else self.samples[call - 1]


def _diffusers_pndm(config: dict):
    diffusers = pytest.importorskip("diffusers")
    return diffusers.PNDMScheduler.from_config(config)


@functools.lru_cache(maxsize=None)
def _reference_run(variant: str, num_steps: int) -> ReferenceRun:
    """diffusers' PNDMScheduler fed seeded standard-normal model outputs (cached across tests)."""
    torch = pytest.importorskip("torch")
    reference = _diffusers_pndm(_config(variant))
    reference.set_timesteps(num_steps)
    timesteps = reference.timesteps.numpy()
    rng = np.random.default_rng(num_steps)
    initial_sample = rng.standard_normal(SHAPE, dtype=np.float32)  # (B, C, H, W)
    model_outputs = rng.standard_normal((len(timesteps), *SHAPE), dtype=np.float32)  # (calls, B, C, H, W)
    sample = torch.from_numpy(initial_sample.copy())
    samples = []
    for timestep, model_output in zip(reference.timesteps, model_outputs):
        sample = reference.step(torch.from_numpy(model_output.copy()), timestep, sample).prev_sample
        samples.append(sample.numpy())
    return ReferenceRun(timesteps, initial_sample, model_outputs, np.stack(samples))


# --- parity with diffusers ---------------------------------------------------------------------


@pytest.mark.parametrize(("variant", "num_steps"), ACCEPTED)
def test_timesteps_match_diffusers(variant: str, num_steps: int) -> None:
    state = PNDMScheduler(_config(variant)).start(num_steps)
    assert state.timesteps.dtype == np.int64
    np.testing.assert_array_equal(state.timesteps, _reference_run(variant, num_steps).timesteps)


@pytest.mark.parametrize(("variant", "num_steps"), ACCEPTED)
def test_each_call_matches_diffusers(variant: str, num_steps: int) -> None:
    """Fed diffusers' own input sample at every call, each prev_sample matches to a few ulps."""
    scheduler = PNDMScheduler(_config(variant))
    reference = _reference_run(variant, num_steps)
    state = scheduler.start(num_steps)
    for call, model_output in enumerate(reference.model_outputs):
        sample = reference.inputs(call)
        assert scheduler.scale_model_input(state, sample, call) is sample
        prev_sample, state = scheduler.step(state, model_output, call, sample)
        assert prev_sample.dtype == np.float32 and prev_sample.shape == SHAPE
        _assert_close(prev_sample, reference.samples[call], CALL_RTOL, CALL_ATOL, f"call {call}")


@pytest.mark.parametrize(("variant", "num_steps"), ACCEPTED)
def test_whole_run_matches_diffusers(variant: str, num_steps: int) -> None:
    """Run on its own samples, every call's prev_sample stays within float32 rounding of diffusers'."""
    scheduler = PNDMScheduler(_config(variant))
    reference = _reference_run(variant, num_steps)
    state = scheduler.start(num_steps)
    sample = reference.initial_sample
    for call, model_output in enumerate(reference.model_outputs):
        sample, state = scheduler.step(state, model_output, call, sample)
        _assert_close(sample, reference.samples[call], RUN_RTOL, RUN_ATOL, f"call {call}")


@pytest.mark.parametrize(("variant", "num_steps"), REJECTED)
def test_runs_diffusers_cannot_make_are_refused(variant: str, num_steps: int) -> None:
    with pytest.raises((ValueError, IndexError)):
        _reference_run(variant, num_steps)
    with pytest.raises(ValueError, match="num_inference_steps"):
        PNDMScheduler(_config(variant)).start(num_steps)


def test_trailing_spacing_drops_diffusers_spurious_last_call() -> None:
    """At 61 trailing steps np.arange overshoots and diffusers adds a call at timestep -1 (which reads
    the wrapped-around alphas_cumprod[-1]); we plan the same calls without it."""
    variant, num_steps = "trailing", 61
    reference = _reference_run(variant, num_steps)
    assert reference.timesteps[-1] == -1  # diffusers' quirk; if fixed, the equality below still holds
    scheduler = PNDMScheduler(_config(variant))
    state = scheduler.start(num_steps)
    np.testing.assert_array_equal(state.timesteps, reference.timesteps[reference.timesteps >= 0])
    assert len(state.timesteps) == num_steps + 1
    sample = reference.initial_sample
    for call, model_output in enumerate(reference.model_outputs[: len(state.timesteps)]):
        sample, state = scheduler.step(state, model_output, call, sample)
        _assert_close(sample, reference.samples[call], RUN_RTOL, RUN_ATOL, f"call {call}")


@pytest.mark.parametrize("variant", ["sd15", "linear", "cosine", "trained_betas"])
def test_noise_schedule_matches_diffusers(variant: str) -> None:
    reference = _diffusers_pndm(_config(variant))
    # Bit-identical on AVX2/AVX-512 torch. torch's baseline kernels (ATEN_CPU_CAPABILITY=default) do
    # not fuse linspace's multiply-add: sqrt-betas an ulp off, betas <= 3, alpha-bar <= 2.
    np.testing.assert_array_max_ulp(betas_from_config(_config(variant)), reference.betas.numpy(), maxulp=4)
    np.testing.assert_array_max_ulp(alphas_cumprod(_config(variant)), reference.alphas_cumprod.numpy(), maxulp=4)


@pytest.mark.parametrize(
    ("variant", "num_steps", "num_calls"),
    [("sd15", 1, 1), ("sd15", 2, 3), ("sd15", 50, 51), ("prk_warmup", 4, 13), ("prk_warmup", 50, 59)],
)
def test_call_counts(variant: str, num_steps: int, num_calls: int) -> None:
    """PLMS warm-up repeats one timestep (N + 1 calls); Runge-Kutta warm-up makes N + 9."""
    state = PNDMScheduler(_config(variant)).start(num_steps)
    assert len(state.timesteps) == state.num_calls == num_calls


# --- explicit, immutable state -----------------------------------------------------------------


def _run_calls(scheduler: PNDMScheduler, state: PNDMState, sample: np.ndarray, outputs: np.ndarray):
    for call, model_output in enumerate(outputs, start=state.steps_taken):
        sample, state = scheduler.step(state, model_output, call, sample)
    return sample, state


@pytest.mark.parametrize("variant", ["sd15", "prk_warmup"])
def test_step_never_mutates_its_state(variant: str) -> None:
    scheduler = PNDMScheduler(_config(variant))
    rng = np.random.default_rng(0)
    outputs = rng.standard_normal((8, *SHAPE), dtype=np.float32)  # (calls, B, C, H, W)
    # Stop mid-way through the warm-up, where the state holds a start sample and partial sums.
    initial = rng.standard_normal(SHAPE, dtype=np.float32)  # (B, C, H, W)
    sample, state = _run_calls(scheduler, scheduler.start(10), initial, outputs[:2])
    history_before = [entry.copy() for entry in state.eps_history]

    first_sample, first_state = _run_calls(scheduler, state, sample, outputs[2:])
    second_sample, second_state = _run_calls(scheduler, state, sample, outputs[2:])

    np.testing.assert_array_equal(first_sample, second_sample)
    assert state.steps_taken == 2 and first_state.steps_taken == second_state.steps_taken == 8
    for before, after in zip(history_before, state.eps_history, strict=True):
        np.testing.assert_array_equal(before, after)
    with pytest.raises(ValueError):
        state.timesteps[0] = 0  # read-only


def test_state_does_not_alias_caller_buffers() -> None:
    """Reusing the model-output and sample buffers in place (as an inference loop may) changes nothing."""
    scheduler = PNDMScheduler(_config("prk_warmup"))
    rng = np.random.default_rng(1)
    outputs = rng.standard_normal((6, *SHAPE), dtype=np.float32)  # (calls, B, C, H, W)
    initial = rng.standard_normal(SHAPE, dtype=np.float32)  # (B, C, H, W)
    expected, _ = _run_calls(scheduler, scheduler.start(5), initial, outputs)

    state, latents, output_buffer = scheduler.start(5), initial.copy(), np.empty(SHAPE, dtype=np.float32)
    for call, model_output in enumerate(outputs):
        output_buffer[...] = model_output
        prev_sample, state = scheduler.step(state, output_buffer, call, latents)
        latents[...] = prev_sample
    np.testing.assert_array_equal(latents, expected)


def test_step_index_must_follow_the_state() -> None:
    scheduler = PNDMScheduler(SD15_CONFIG)
    state = scheduler.start(10)
    sample = np.zeros(SHAPE, dtype=np.float32)
    with pytest.raises(ValueError, match="step_index"):
        scheduler.step(state, sample, 1, sample)
    with pytest.raises(ValueError, match="step_index"):
        scheduler.step(state, sample, 11, sample)
    with pytest.raises(ValueError, match="shape"):
        scheduler.step(state, np.zeros((1, 4, 8, 8), dtype=np.float32), 0, sample)


def test_half_precision_inputs_give_float32() -> None:
    scheduler = PNDMScheduler(SD15_CONFIG)
    sample = np.ones(SHAPE, dtype=np.float16)
    prev_sample, _ = scheduler.step(scheduler.start(10), sample, 0, sample)
    assert prev_sample.dtype == np.float32


# --- construction and validation ---------------------------------------------------------------


@pytest.mark.parametrize("num_steps", [0, -1, 1000, 2.5, True, "10", None])
def test_bad_num_inference_steps_raise(num_steps: object) -> None:
    # SD 1.5's steps_offset 1 with leading spacing: 1000 steps would need timestep 1000 of 0..999
    with pytest.raises(ValueError, match=r"num_inference_steps .*1\.\.999"):
        PNDMScheduler(SD15_CONFIG).start(num_steps)


def test_runge_kutta_warmup_needs_four_steps() -> None:
    with pytest.raises(ValueError, match=r"num_inference_steps .*4\.\.999"):
        PNDMScheduler(_config("prk_warmup")).start(3)


def test_a_steps_offset_that_leaves_no_run_is_a_config_error() -> None:
    with pytest.raises(SchedulerConfigError, match="steps_offset=1000"):
        PNDMScheduler({**SD15_CONFIG, "steps_offset": 1000})


def test_scheduler_contract() -> None:
    scheduler = PNDMScheduler(SD15_CONFIG)
    assert scheduler.start(10).init_noise_sigma == _diffusers_pndm(SD15_CONFIG).init_noise_sigma == 1.0
    assert scheduler.order == _diffusers_pndm(SD15_CONFIG).order
    assert not scheduler.needs_noise
    assert scheduler.num_train_timesteps == 1000
    assert isinstance(scheduler, Scheduler)
    assert isinstance(scheduler.start(10), SchedulerState)


def test_unknown_keys_are_ignored() -> None:
    plain = {key: value for key, value in SD15_CONFIG.items() if not key.startswith("_") and key != "clip_sample"}
    with_extras = {**SD15_CONFIG, "some_future_option": [1, 2]}
    assert PNDMScheduler(plain).config == PNDMScheduler(with_extras).config


@pytest.mark.parametrize(
    "change",
    [
        {"beta_schedule": "quadratic"},
        {"prediction_type": "sample"},
        {"timestep_spacing": "uniform"},
        {"num_train_timesteps": 0},
        {"num_train_timesteps": 1000.0},
        {"steps_offset": -1},
        {"steps_offset": True},
        {"skip_prk_steps": "yes"},
        {"beta_start": "0.1"},
        {"beta_end": float("nan")},
        {"trained_betas": [0.01] * 10},
        {"trained_betas": [1.5] * 1000},
        {"beta_schedule": "linear", "beta_end": 1.2},
    ],
)
def test_bad_config_raises(change: dict) -> None:
    with pytest.raises(SchedulerConfigError):
        PNDMScheduler({**SD15_CONFIG, **change})


def test_scheduler_from_config_picks_pndm(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        scheduler = scheduler_from_config(SD15_CONFIG)
    assert isinstance(scheduler, PNDMScheduler) and not caplog.records


def test_scheduler_from_config_falls_back_to_pndm(caplog: pytest.LogCaptureFixture) -> None:
    heun_config = {**SD15_CONFIG, "_class_name": "HeunDiscreteScheduler", "use_karras_sigmas": False}
    with caplog.at_level(logging.WARNING):
        scheduler = scheduler_from_config(heun_config)
    assert isinstance(scheduler, PNDMScheduler)
    assert "HeunDiscreteScheduler" in caplog.text
    np.testing.assert_array_equal(scheduler.alphas_cumprod, PNDMScheduler(SD15_CONFIG).alphas_cumprod)


# --- starting part-way (image to image) and add_noise --------------------------------------------

PARTWAY_VARIANTS = ["sd15", "trailing", "v_prediction"]


@pytest.mark.parametrize("variant", PARTWAY_VARIANTS)
@pytest.mark.parametrize(("num_steps", "begin_index"), [(10, 1), (10, 2), (10, 5), (10, 10), (50, 25), (3, 3)])
def test_a_run_started_part_way_matches_diffusers_sliced_run(variant: str, num_steps: int, begin_index: int) -> None:
    """diffusers' img2img runs `timesteps[t_start * order:]` through a freshly set scheduler (call counter at 0)."""
    torch = pytest.importorskip("torch")
    reference = _diffusers_pndm(_config(variant))
    reference.set_timesteps(num_steps)
    timesteps = reference.timesteps[begin_index:]
    rng = np.random.default_rng(begin_index)
    sample = rng.standard_normal(SHAPE, dtype=np.float32)  # (B, C, H, W)
    scheduler = PNDMScheduler(_config(variant))
    state = scheduler.start(num_steps, begin_index=begin_index)
    np.testing.assert_array_equal(state.timesteps, timesteps.numpy())
    expected = torch.from_numpy(sample.copy())
    for call, timestep in enumerate(timesteps):
        model_output = rng.standard_normal(SHAPE, dtype=np.float32)  # (B, C, H, W)
        expected = reference.step(torch.from_numpy(model_output.copy()), timestep, expected).prev_sample
        sample, state = scheduler.step(state, model_output, call, sample)
        _assert_close(sample, expected.numpy(), RUN_RTOL, RUN_ATOL, f"call {call} at t={int(timestep)}")


def test_begin_index_out_of_range_and_runge_kutta_part_way_are_refused() -> None:
    scheduler = PNDMScheduler(SD15_CONFIG)
    with pytest.raises(ValueError, match=r"begin_index must be in 0\.\.10"):
        scheduler.start(10, begin_index=11)
    with pytest.raises(ValueError, match="Runge-Kutta"):
        PNDMScheduler(_config("prk_warmup")).start(10, begin_index=1)


@pytest.mark.parametrize("variant", ["sd15", "cosine", "trailing"])
@pytest.mark.parametrize("step_index", [0, 3, 10])
def test_add_noise_matches_diffusers_at_the_calls_timestep(variant: str, step_index: int) -> None:
    torch = pytest.importorskip("torch")
    reference = _diffusers_pndm(_config(variant))
    reference.set_timesteps(10)
    rng = np.random.default_rng(step_index)
    original, noise = rng.standard_normal((2, *SHAPE), dtype=np.float32)  # (B, C, H, W) each
    expected = reference.add_noise(torch.from_numpy(original), torch.from_numpy(noise), reference.timesteps[step_index:step_index + 1])
    scheduler = PNDMScheduler(_config(variant))
    actual = scheduler.add_noise(scheduler.start(10), original, noise, step_index)
    np.testing.assert_allclose(actual, expected.numpy(), rtol=1e-6, atol=1e-6)
    assert not np.allclose(actual, original)  # noise was added
