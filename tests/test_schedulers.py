"""DDIM, Euler, Euler ancestral, DPM-Solver++, LMS and LCM (numpy, explicit state) against diffusers, call by call, and
picked by name in the pipeline against diffusers' StableDiffusionPipeline with the same scheduler swapped in.

Agreement is float32 rounding, not bit-identity: torch's float32 sqrt is an ulp off on ~20% of inputs where numpy's
is correctly rounded, so sigmas and update coefficients can differ by an ulp; LMS's coefficients are integrated
exactly here where diffusers integrates a float32 integrand numerically.
"""
from __future__ import annotations

import contextlib
import functools
import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator
from unittest import mock

import numpy as np
import pytest

from sdrt.engine.errors import InvalidArgumentError
from sdrt.engine.schedulers import (
    SCHEDULER_NAMES,
    SCHEDULERS,
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    LCMScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
    Scheduler,
    SchedulerConfigError,
    SchedulerState,
    scheduler_by_name,
    scheduler_from_config,
)
from sdrt.engine.schedulers.lms import lms_coefficients
from sdrt.export.random_checkpoint import SD15_SCHEDULER_CONFIG

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

# scheduler/scheduler_config.json of SD 1.5 (PNDM, no timestep_spacing key: each class's own default applies).
SD15_CONFIG = {"_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", **SD15_SCHEDULER_CONFIG}
VARIANTS = {
    "sd15": {},
    "trailing": {"timestep_spacing": "trailing"},
    "leading": {"timestep_spacing": "leading"},
    "v_prediction": {"prediction_type": "v_prediction", "timestep_spacing": "trailing"},
    "cosine": {"beta_schedule": "squaredcos_cap_v2", "steps_offset": 0},
    # LCM's own keys, as an LCM-distilled checkpoint might set them (ignored by the other samplers)
    "lcm_options": {"original_inference_steps": 40, "timestep_scaling": 4.0, "set_alpha_to_one": False},
}


@dataclass(frozen=True)
class Sampler:
    """How a sampler is built here (a registry name, or a class with extra arguments) and in diffusers."""

    diffusers_class: str
    name: str | None = None  # registry name; None: built from `ours` over the config
    fixed: tuple[tuple[str, Any], ...] = ()  # config keys this sampler sets over the checkpoint's
    eta: float = 0.0  # DDIM's eta, passed to step() in diffusers

    def config(self, variant: str) -> dict:
        return {**SD15_CONFIG, **VARIANTS[variant], **dict(self.fixed)}

    def ours(self, variant: str) -> Scheduler:
        if self.name is not None:
            return scheduler_by_name(self.name, {**SD15_CONFIG, **VARIANTS[variant]})
        return SCHEDULERS[self.diffusers_class](self.config(variant)) if not self.eta else DDIMScheduler(self.config(variant), eta=self.eta)

    def reference(self, variant: str):
        return getattr(diffusers, self.diffusers_class).from_config(self.config(variant))


_DPM = (("algorithm_type", "dpmsolver++"), ("solver_order", 2))
SAMPLERS = {
    "ddim": Sampler("DDIMScheduler", name="ddim"),
    "ddim-eta": Sampler("DDIMScheduler", fixed=(("clip_sample", True),), eta=0.7),
    "euler": Sampler("EulerDiscreteScheduler", name="euler"),
    "euler-karras": Sampler("EulerDiscreteScheduler", fixed=(("use_karras_sigmas", True),)),
    "euler_a": Sampler("EulerAncestralDiscreteScheduler", name="euler_a"),
    "dpm++2m": Sampler("DPMSolverMultistepScheduler", name="dpm++2m", fixed=(*_DPM, ("use_karras_sigmas", False))),
    "dpm++2m-karras": Sampler("DPMSolverMultistepScheduler", name="dpm++2m-karras", fixed=(*_DPM, ("use_karras_sigmas", True))),
    "dpm++2m-heun-sigma-min": Sampler(
        "DPMSolverMultistepScheduler", fixed=(("solver_type", "heun"), ("final_sigmas_type", "sigma_min"))
    ),
    "lms": Sampler("LMSDiscreteScheduler", name="lms"),
    "lms-karras": Sampler("LMSDiscreteScheduler", fixed=(("use_karras_sigmas", True),)),
    "lcm": Sampler("LCMScheduler", name="lcm"),
}
#: the samplers whose step() takes noise
STOCHASTIC = ("euler_a", "ddim-eta", "lcm")
STEP_COUNTS = [1, 2, 3, 10, 25, 50]
SHAPE = (2, 4, 8, 8)
CASES = [(sampler, variant, steps) for sampler in SAMPLERS for variant in ("sd15", "trailing", "v_prediction") for steps in STEP_COUNTS]
CASES += [(sampler, variant, 10) for sampler in SAMPLERS for variant in ("leading", "cosine")]
# The step counts LCM-distilled models run (its most: original_inference_steps, 50 by default).
CASES += [("lcm", variant, steps) for variant in ("sd15", "lcm_options", "v_prediction") for steps in (4, 8)]
CASES += [("lcm", "lcm_options", steps) for steps in (1, 2, 3, 40)]

# One call from the same inputs: a few float32 ulps of the largest entry.
CALL_RTOL, CALL_ATOL = 1e-5, 2e-6
# A whole run on its own samples from random (non-denoising) model outputs: ulps compound and samples grow.
RUN_RTOL, RUN_ATOL = 1e-4, 1e-4


def _assert_close(actual: np.ndarray, desired: np.ndarray, rtol: float, atol: float, message: str) -> None:
    """assert_allclose with atol relative to the array's scale (random model outputs grow samples large)."""
    scale = max(1.0, float(np.abs(desired).max()))
    np.testing.assert_allclose(actual, desired, rtol=rtol, atol=atol * scale, err_msg=message)


@contextlib.contextmanager
def _diffusers_noise(noises: Iterator[np.ndarray]) -> Iterator[None]:
    """diffusers' Euler ancestral and LCM draw their step noise with randn_tensor: hand it ``noises`` instead, in order."""
    def next_noise(shape, **_: Any):
        noise = next(noises)
        assert tuple(shape) == noise.shape
        return torch.from_numpy(noise.copy())

    with mock.patch("diffusers.schedulers.scheduling_euler_ancestral_discrete.randn_tensor", next_noise), \
            mock.patch("diffusers.schedulers.scheduling_lcm.randn_tensor", next_noise):
        yield


def _reference_step(reference, sampler: Sampler, model_output: np.ndarray, timestep, sample, noise: np.ndarray):
    """One diffusers step fed ``noise`` where it draws noise."""
    args = (torch.from_numpy(model_output.copy()), timestep, sample)
    if sampler.eta:
        return reference.step(*args, eta=sampler.eta, variance_noise=torch.from_numpy(noise.copy())).prev_sample
    with _diffusers_noise(iter([noise])):
        return reference.step(*args).prev_sample


@dataclass(frozen=True)
class ReferenceRun:
    """diffusers' run: its timesteps and initial noise scale, the inputs fed to it, and what each call produced."""

    timesteps: np.ndarray  # (calls,)
    init_noise_sigma: float
    initial_sample: np.ndarray  # (B, C, H, W)
    model_outputs: np.ndarray  # (calls, B, C, H, W)
    noises: np.ndarray  # (calls, B, C, H, W) — the step noise of stochastic samplers
    model_inputs: np.ndarray  # (calls, B, C, H, W) — scale_model_input of each call's sample
    samples: np.ndarray  # (calls, B, C, H, W) — prev_sample of each call

    def inputs(self, call: int) -> np.ndarray:
        return self.initial_sample if call == 0 else self.samples[call - 1]


@functools.lru_cache(maxsize=None)
def _reference_run(sampler_id: str, variant: str, num_steps: int) -> ReferenceRun:
    sampler = SAMPLERS[sampler_id]
    reference = sampler.reference(variant)
    reference.set_timesteps(num_steps)
    if hasattr(reference, "set_begin_index"):
        # Step by index, as ours does: diffusers' lookup by timestep value misplaces repeated timesteps (DPM-Solver
        # with Karras sigmas on the cosine schedule repeats the last ones).
        reference.set_begin_index(0)
    timesteps = reference.timesteps.numpy().copy()
    rng = np.random.default_rng(num_steps)
    initial_sample = rng.standard_normal(SHAPE, dtype=np.float32)  # (B, C, H, W)
    model_outputs = rng.standard_normal((len(timesteps), *SHAPE), dtype=np.float32)  # (calls, B, C, H, W)
    noises = rng.standard_normal((len(timesteps), *SHAPE), dtype=np.float32)  # (calls, B, C, H, W)
    sample = torch.from_numpy(initial_sample.copy())
    model_inputs, samples = [], []
    for timestep, model_output, noise in zip(reference.timesteps, model_outputs, noises):
        model_inputs.append(reference.scale_model_input(sample, timestep).numpy().copy())
        sample = _reference_step(reference, sampler, model_output, timestep, sample, noise)
        samples.append(sample.numpy().copy())
    return ReferenceRun(timesteps, float(reference.init_noise_sigma), initial_sample, model_outputs, noises,
                        np.stack(model_inputs), np.stack(samples))


# --- parity with diffusers, call by call ---------------------------------------------------------


@pytest.mark.parametrize(("sampler", "variant", "num_steps"), CASES)
def test_timesteps_and_noise_scale_match_diffusers(sampler: str, variant: str, num_steps: int) -> None:
    reference = _reference_run(sampler, variant, num_steps)
    state = SAMPLERS[sampler].ours(variant).start(num_steps)
    assert state.timesteps.dtype == reference.timesteps.dtype
    # Karras timesteps follow sigmas, an ulp apart: a few float32 ulps of the timestep.
    np.testing.assert_allclose(state.timesteps, reference.timesteps, rtol=1e-6, atol=1e-5)
    assert state.init_noise_sigma == pytest.approx(reference.init_noise_sigma, rel=1e-6)


@pytest.mark.parametrize(("sampler", "variant", "num_steps"), CASES)
def test_each_call_matches_diffusers(sampler: str, variant: str, num_steps: int) -> None:
    """Fed diffusers' own input sample (and noise) at every call, the U-Net input and prev_sample match."""
    scheduler = SAMPLERS[sampler].ours(variant)
    reference = _reference_run(sampler, variant, num_steps)
    state = scheduler.start(num_steps)
    for call, (model_output, noise) in enumerate(zip(reference.model_outputs, reference.noises)):
        sample = reference.inputs(call)
        model_input = scheduler.scale_model_input(state, sample, call)
        _assert_close(model_input, reference.model_inputs[call], CALL_RTOL, CALL_ATOL, f"input of call {call}")
        prev_sample, state = scheduler.step(state, model_output, call, sample, noise)
        assert prev_sample.dtype == np.float32 and prev_sample.shape == SHAPE
        _assert_close(prev_sample, reference.samples[call], CALL_RTOL, CALL_ATOL, f"call {call}")


@pytest.mark.parametrize(("sampler", "variant", "num_steps"), CASES)
def test_whole_run_matches_diffusers(sampler: str, variant: str, num_steps: int) -> None:
    scheduler = SAMPLERS[sampler].ours(variant)
    reference = _reference_run(sampler, variant, num_steps)
    state = scheduler.start(num_steps)
    sample = reference.initial_sample
    for call, (model_output, noise) in enumerate(zip(reference.model_outputs, reference.noises)):
        sample, state = scheduler.step(state, model_output, call, sample, noise)
        _assert_close(sample, reference.samples[call], RUN_RTOL, RUN_ATOL, f"call {call}")


@pytest.mark.parametrize("sampler", ["ddim", "euler", "lms", "dpm++2m"])
def test_trailing_spacing_drops_diffusers_spurious_last_step(sampler: str) -> None:
    """At 61 trailing steps np.arange overshoots and diffusers adds a 62nd step at timestep -1 (for sigma samplers a
    step back up to the smallest training sigma before the last one); as for PNDM, the run here has the 61 steps."""
    reference = SAMPLERS[sampler].reference("trailing")
    reference.set_timesteps(61)
    assert reference.timesteps[-1] == -1  # diffusers' quirk; if fixed, the equality below still holds
    state = SAMPLERS[sampler].ours("trailing").start(61)
    np.testing.assert_array_equal(state.timesteps, reference.timesteps[reference.timesteps >= 0].numpy())
    if hasattr(state, "sigmas"):
        assert state.sigmas[-1] == 0 and len(state.sigmas) == 62


# --- starting part-way (image to image) and add_noise ----------------------------------------------


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("variant", ["sd15", "trailing"])
@pytest.mark.parametrize(("num_steps", "begin_index"), [(10, 0), (10, 1), (10, 4), (10, 9), (25, 12), (3, 2)])
def test_a_run_started_part_way_matches_diffusers(sampler: str, variant: str, num_steps: int, begin_index: int) -> None:
    """diffusers' img2img: set_timesteps(N), set_begin_index(t_start), add_noise at timesteps[t_start], then a loop
    over timesteps[t_start:]; add_noise before each call (inpainting's blend) lands on that call's noise level."""
    spec = SAMPLERS[sampler]
    reference = spec.reference(variant)
    reference.set_timesteps(num_steps)
    if hasattr(reference, "set_begin_index"):  # DDIM's update depends on the timestep alone
        reference.set_begin_index(begin_index)
    timesteps = reference.timesteps[begin_index:]
    scheduler = spec.ours(variant)
    state = scheduler.start(num_steps, begin_index=begin_index)
    np.testing.assert_allclose(state.timesteps, timesteps.numpy(), rtol=1e-6, atol=1e-5)

    rng = np.random.default_rng(begin_index)
    original, image_noise = rng.standard_normal((2, *SHAPE), dtype=np.float32)  # (B, C, H, W) each
    expected = reference.add_noise(torch.from_numpy(original), torch.from_numpy(image_noise), timesteps[:1])
    sample = scheduler.add_noise(state, original, image_noise, 0)
    _assert_close(sample, expected.numpy(), CALL_RTOL, CALL_ATOL, "add_noise at the first call")
    assert not np.allclose(sample, original)
    for call, timestep in enumerate(timesteps):
        blend = reference.add_noise(torch.from_numpy(original), torch.from_numpy(image_noise), timesteps[call : call + 1])
        _assert_close(scheduler.add_noise(state, original, image_noise, call), blend.numpy(), CALL_RTOL, CALL_ATOL,
                      f"add_noise at call {call}")
        model_output, noise = rng.standard_normal((2, *SHAPE), dtype=np.float32)  # (B, C, H, W) each
        reference_input = reference.scale_model_input(expected, timestep).numpy()
        _assert_close(scheduler.scale_model_input(state, sample, call), reference_input, RUN_RTOL, RUN_ATOL, f"input {call}")
        expected = _reference_step(reference, spec, model_output, timestep, expected, noise)
        sample, state = scheduler.step(state, model_output, call, sample, noise)
        _assert_close(sample, expected.numpy(), RUN_RTOL, RUN_ATOL, f"call {call} at t={float(timestep)}")


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_begin_index_out_of_range_is_refused(sampler: str) -> None:
    scheduler = SAMPLERS[sampler].ours("sd15")
    for begin_index in (-1, 10, 11):
        with pytest.raises(ValueError, match=r"begin_index must be in 0\.\.9"):
            scheduler.start(10, begin_index=begin_index)


# --- LMS's exact integration -------------------------------------------------------------------


@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_lms_coefficients_are_the_integrals_scipy_computes(order: int) -> None:
    integrate = pytest.importorskip("scipy.integrate")
    sigmas = np.array([14.6, 9.1, 5.3, 2.9, 1.4, 0.6, 0.0])  # (N+1,)
    for run_index in range(order - 1, len(sigmas) - 1):
        nodes = sigmas[run_index - order + 1 : run_index + 1][::-1]  # newest first

        def basis(tau: float, j: int) -> float:
            return float(np.prod([(tau - nodes[k]) / (nodes[j] - nodes[k]) for k in range(order) if k != j]))

        expected = [integrate.quad(basis, sigmas[run_index], sigmas[run_index + 1], args=(j,), epsabs=0, epsrel=1e-13)[0]
                    for j in range(order)]
        np.testing.assert_allclose(lms_coefficients(sigmas, run_index, order), expected, rtol=1e-10, atol=1e-12)


# --- explicit state, noise, contract ------------------------------------------------------------


@pytest.mark.parametrize("sampler", ["lms", "dpm++2m", "euler_a", "ddim"])
def test_step_never_mutates_its_state(sampler: str) -> None:
    scheduler = SAMPLERS[sampler].ours("sd15")
    rng = np.random.default_rng(0)
    outputs = rng.standard_normal((6, *SHAPE), dtype=np.float32)  # (calls, B, C, H, W)
    noises = rng.standard_normal((6, *SHAPE), dtype=np.float32)  # (calls, B, C, H, W)
    sample = rng.standard_normal(SHAPE, dtype=np.float32)  # (B, C, H, W)
    state = scheduler.start(6)
    for call in range(3):
        sample, state = scheduler.step(state, outputs[call], call, sample, noises[call])

    def finish(state, sample):
        for call in range(3, 6):
            sample, state = scheduler.step(state, outputs[call], call, sample, noises[call])
        return sample

    np.testing.assert_array_equal(finish(state, sample), finish(state, sample))
    with pytest.raises(ValueError):
        state.timesteps[0] = 0  # read-only


@pytest.mark.parametrize("sampler", ["lms", "dpm++2m", "euler", "euler_a"])
def test_calls_must_come_in_order(sampler: str) -> None:
    scheduler = SAMPLERS[sampler].ours("sd15")
    state = scheduler.start(10)
    sample = np.zeros(SHAPE, dtype=np.float32)
    noise = np.zeros(SHAPE, dtype=np.float32)
    with pytest.raises(ValueError, match="step_index"):
        scheduler.step(state, sample, 1, sample, noise)
    with pytest.raises(ValueError, match="step_index"):
        scheduler.step(state, sample, 10, sample, noise)
    with pytest.raises(ValueError, match="shape"):
        scheduler.step(state, np.zeros((1, 4, 8, 8), dtype=np.float32), 0, sample, noise)


@pytest.mark.parametrize("sampler", STOCHASTIC)
def test_stochastic_samplers_need_noise(sampler: str) -> None:
    scheduler = SAMPLERS[sampler].ours("sd15")
    assert scheduler.needs_noise
    sample = np.ones(SHAPE, dtype=np.float32)
    with pytest.raises(ValueError, match="noise"):
        scheduler.step(scheduler.start(10), sample, 0, sample)
    with pytest.raises(ValueError, match="noise shape"):
        scheduler.step(scheduler.start(10), sample, 0, sample, np.ones((1, 4, 8, 8), dtype=np.float32))


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_scheduler_contract(sampler: str) -> None:
    spec = SAMPLERS[sampler]
    scheduler, reference = spec.ours("sd15"), spec.reference("sd15")
    assert isinstance(scheduler, Scheduler) and isinstance(scheduler.start(10), SchedulerState)
    assert scheduler.order == reference.order
    assert scheduler.needs_noise == (sampler in STOCHASTIC)
    assert scheduler.num_train_timesteps == 1000


@pytest.mark.parametrize("num_steps", [0, -1, 1001, 2.5, True, None])
@pytest.mark.parametrize("sampler", ["ddim", "euler", "euler_a", "dpm++2m", "lms"])
def test_bad_num_inference_steps_raise(sampler: str, num_steps: object) -> None:
    with pytest.raises(ValueError, match=r"num_inference_steps .*1\.\.(999|1000)"):
        SAMPLERS[sampler].ours("sd15").start(num_steps)


def test_ddim_refuses_a_bad_eta() -> None:
    for eta in (-0.1, 1.5, "0.5", True):
        with pytest.raises(ValueError, match="eta"):
            DDIMScheduler(SD15_CONFIG, eta=eta)


def _top_timestep(config: dict, num_steps: int) -> int:
    """The largest timestep of "leading" spacing, as diffusers computes it (arange * (T // N) + steps_offset)."""
    return (num_steps - 1) * (config["num_train_timesteps"] // num_steps) + config["steps_offset"]


# "offset_3": a steps_offset under which the counts that plan are not one range (500 needs timestep 1001, 997 does
# not): the maximum is the end of the first run of counts that all plan.
STEP_LIMIT_VARIANTS = {**VARIANTS, "leading_offset_3": {"timestep_spacing": "leading", "steps_offset": 3}}


#: every sampler class, built from SD 1.5's config with its own fixed keys
LIMIT_SAMPLERS = {"pndm": ("PNDMScheduler", {}), **{name: (spec.diffusers_class, dict(spec.fixed)) for name, spec in SAMPLERS.items()}}


@pytest.mark.parametrize("variant", STEP_LIMIT_VARIANTS)
@pytest.mark.parametrize("sampler", LIMIT_SAMPLERS)
def test_every_sampler_plans_its_max_steps_and_refuses_one_more(sampler: str, variant: str) -> None:
    class_name, fixed = LIMIT_SAMPLERS[sampler]
    config = {**SD15_CONFIG, **STEP_LIMIT_VARIANTS[variant], **fixed}
    scheduler = SCHEDULERS[class_name](config)
    top = scheduler.max_inference_steps
    timestep_based = class_name in ("PNDMScheduler", "DDIMScheduler")  # their default spacing is "leading"
    if class_name == "LCMScheduler":
        assert top == config.get("original_inference_steps", 50)  # diffusers: a subset of the distillation schedule
        with pytest.raises(ValueError, match="original"):
            getattr(diffusers, class_name).from_config(config).set_timesteps(top + 1)
    elif timestep_based and config.get("timestep_spacing", "leading") == "leading" and config["steps_offset"]:
        # The reference: the first count whose top timestep passes the last training one (diffusers: IndexError).
        first_past = next(n for n in range(1, 1001) if _top_timestep(config, n) >= 1000)
        assert top == first_past - 1 < 1000
    else:
        assert top == 1000  # sigma samplers interpolate any count; the other spacings end at timestep 999
    assert len(scheduler.start(top).timesteps) >= top
    with pytest.raises(ValueError, match=rf"num_inference_steps must be an integer in \d\.\.{top}, got {top + 1}"):
        scheduler.start(top + 1)


@pytest.mark.parametrize("variant", ["sd15", "leading_offset_3"])
@pytest.mark.parametrize("scheduler_class", [PNDMScheduler, DDIMScheduler])
def test_every_count_up_to_the_max_plans(scheduler_class: type, variant: str) -> None:
    scheduler = scheduler_class({**SD15_CONFIG, **STEP_LIMIT_VARIANTS[variant]})
    for num_steps in range(1, scheduler.max_inference_steps + 1):
        assert scheduler.start(num_steps).timesteps.max() < 1000


# --- config reading and selection by name -----------------------------------------------------------


@pytest.mark.parametrize(
    ("factory", "change"),
    [
        (DDIMScheduler, {"thresholding": True}),
        (DDIMScheduler, {"rescale_betas_zero_snr": True}),
        (DDIMScheduler, {"clip_sample": "no"}),
        (EulerDiscreteScheduler, {"interpolation_type": "log_linear"}),
        (EulerDiscreteScheduler, {"timestep_type": "continuous"}),
        (EulerDiscreteScheduler, {"use_exponential_sigmas": True}),
        (EulerDiscreteScheduler, {"final_sigmas_type": "sigma_max"}),
        (EulerDiscreteScheduler, {"sigma_min": -1.0}),
        (EulerAncestralDiscreteScheduler, {"rescale_betas_zero_snr": True}),
        (LMSDiscreteScheduler, {"use_beta_sigmas": True}),
        (LMSDiscreteScheduler, {"prediction_type": "sample"}),
        (DPMSolverMultistepScheduler, {"algorithm_type": "sde-dpmsolver++"}),
        (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver"}),
        (DPMSolverMultistepScheduler, {"solver_order": 3}),
        (DPMSolverMultistepScheduler, {"solver_type": "bh2"}),
        (DPMSolverMultistepScheduler, {"thresholding": True}),
        (DPMSolverMultistepScheduler, {"use_lu_lambdas": True}),
        (DPMSolverMultistepScheduler, {"lambda_min_clipped": -5.1}),
        (DPMSolverMultistepScheduler, {"beta_schedule": "quadratic"}),
        (LCMScheduler, {"thresholding": True}),
        (LCMScheduler, {"rescale_betas_zero_snr": True}),
        (LCMScheduler, {"prediction_type": "sample"}),
        (LCMScheduler, {"original_inference_steps": 1001}),
        (LCMScheduler, {"original_inference_steps": 0}),
    ],
)
def test_unsupported_config_values_are_refused(factory, change: dict) -> None:
    with pytest.raises(SchedulerConfigError):
        factory({**SD15_CONFIG, **change})


@pytest.mark.parametrize("class_name", sorted(SCHEDULERS))
def test_checkpoint_class_names_pick_their_scheduler(class_name: str) -> None:
    config = {**SD15_CONFIG, "_class_name": class_name}
    assert type(scheduler_from_config(config)).__name__ == class_name
    assert type(scheduler_by_name("default", config)).__name__ == class_name


def test_names_keep_the_checkpoints_noise_schedule() -> None:
    """A switch by name is diffusers' from_config: the checkpoint's betas and prediction type carry over."""
    config = {**SD15_CONFIG, "prediction_type": "v_prediction"}
    for name in SCHEDULER_NAMES:
        scheduler = scheduler_by_name(name, config)
        schedule = scheduler.config.schedule if hasattr(scheduler.config, "schedule") else scheduler.config.sigmas.schedule
        assert schedule.prediction_type == "v_prediction" and schedule.beta_schedule == "scaled_linear", name
    karras = scheduler_by_name("dpm++2m-karras", {**SD15_CONFIG, "use_karras_sigmas": False})
    plain = scheduler_by_name("dpm++2m", {**SD15_CONFIG, "use_karras_sigmas": True})
    assert karras.config.sigmas.use_karras_sigmas and not plain.config.sigmas.use_karras_sigmas
    assert isinstance(scheduler_by_name("euler-ancestral", SD15_CONFIG), EulerAncestralDiscreteScheduler)
    assert isinstance(scheduler_by_name("pndm", SD15_CONFIG), PNDMScheduler)


@pytest.mark.parametrize("name", ["heun", "DPM++2M", "", None, 3, ["euler"]])
def test_unknown_names_are_refused_listing_the_names(name: object) -> None:
    with pytest.raises(InvalidArgumentError, match=r"scheduler: must be one of default, pndm, ddim, euler") as error:
        scheduler_by_name(name, SD15_CONFIG)
    assert error.value.parameter == "scheduler"


# --- in the pipeline -----------------------------------------------------------------------------------

PIPELINE_NAMES = [name for name in SCHEDULER_NAMES if name != "euler-ancestral"]  # an alias of euler_a
MAX_PIXEL_DIFF = 5e-3


@pytest.fixture(scope="module")
def reference_pipe(tiny_checkpoint: Path):
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(tiny_checkpoint, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _reference_scheduler(pipe, name: str):
    """diffusers' way to switch: XScheduler.from_config(pipe.scheduler.config), with the keys the name fixes."""
    if name == "default":
        return pipe.scheduler
    by_class = {spec.name: spec for spec in SAMPLERS.values() if spec.name is not None}
    class_name, fixed = ("PNDMScheduler", ()) if name == "pndm" else (by_class[name].diffusers_class, by_class[name].fixed)
    return getattr(diffusers, class_name).from_config(pipe.scheduler.config, **dict(fixed))


@pytest.mark.parametrize("name", PIPELINE_NAMES)
def test_pipeline_pixels_match_diffusers_with_that_scheduler(reference_pipe, tiny_pipe, name: str) -> None:
    """Same initial latents, and for euler_a the same step noise: ours draws it from numpy's Generator seeded with
    `seed` (explicit latents, so the Generator's first draw is the first step's noise), fed to diffusers here."""
    # 3 steps: DPM-Solver++ takes a first-, a second- and a final first-order step.
    args = dict(prompt="a red circle", num_inference_steps=3, height=64, width=64, guidance_scale=7.5)
    shape = (1, tiny_pipe.manifest.model.latent_channels, 64 // tiny_pipe.vae_scale_factor, 64 // tiny_pipe.vae_scale_factor)
    latents = np.random.default_rng(7).standard_normal(shape, dtype=np.float32)
    seed = 11
    step_noise = np.random.default_rng(seed)
    original = reference_pipe.scheduler
    reference_pipe.scheduler = _reference_scheduler(reference_pipe, name)
    try:
        with _diffusers_noise(step_noise.standard_normal(shape, dtype=np.float32) for _ in itertools.count()):
            expected = reference_pipe(**args, latents=torch.from_numpy(latents.copy()), output_type="np").images
    finally:
        reference_pipe.scheduler = original
    actual = tiny_pipe(**args, latents=latents, seed=seed, output_type="np", scheduler=name).images
    assert actual.shape == expected.shape
    assert np.abs(actual - expected).max() <= MAX_PIXEL_DIFF
    assert actual.std() > 1e-3


def test_ancestral_step_noise_continues_the_seeds_generator(reference_pipe, tiny_pipe) -> None:
    """From `seed` alone, one numpy Generator draws the initial latents and then each step's noise."""
    args = dict(prompt="a red circle", num_inference_steps=3, height=64, width=64, guidance_scale=7.5)
    shape = (1, tiny_pipe.manifest.model.latent_channels, 64 // tiny_pipe.vae_scale_factor, 64 // tiny_pipe.vae_scale_factor)
    seed = 23
    rng = np.random.default_rng(seed)
    latents = rng.standard_normal(shape, dtype=np.float32)
    original = reference_pipe.scheduler
    reference_pipe.scheduler = _reference_scheduler(reference_pipe, "euler_a")
    try:
        with _diffusers_noise(rng.standard_normal(shape, dtype=np.float32) for _ in itertools.count()):
            expected = reference_pipe(**args, latents=torch.from_numpy(latents), output_type="np").images
    finally:
        reference_pipe.scheduler = original
    actual = tiny_pipe(**args, seed=seed, output_type="np", scheduler="euler_a").images
    assert np.abs(actual - expected).max() <= MAX_PIXEL_DIFF


@pytest.mark.parametrize("name", ["euler_a", "dpm++2m-karras"])
def test_same_seed_same_image(tiny_pipe, name: str) -> None:
    args = dict(prompt="a boat", num_inference_steps=3, height=64, width=64, output_type="np", scheduler=name)
    first, again, other = (tiny_pipe(**args, seed=seed).images for seed in (5, 5, 6))
    np.testing.assert_array_equal(first, again)
    assert np.abs(first - other).max() > 1e-3


def test_ancestral_noise_follows_the_seed_with_explicit_latents(tiny_pipe) -> None:
    """With explicit latents the step noise still comes from `seed`: same seed same image, another seed another."""
    shape = (1, tiny_pipe.manifest.model.latent_channels, 8, 8)
    latents = np.random.default_rng(0).standard_normal(shape, dtype=np.float32)
    args = dict(prompt="a boat", num_inference_steps=3, height=64, width=64, output_type="np", scheduler="euler_a", latents=latents)
    first, again, other = (tiny_pipe(**args, seed=seed).images for seed in (1, 1, 2))
    np.testing.assert_array_equal(first, again)
    assert np.abs(first - other).max() > 1e-3


def test_default_and_none_run_the_checkpoints_scheduler(tiny_pipe) -> None:
    args = dict(prompt="a boat", num_inference_steps=2, height=64, width=64, output_type="np", seed=3)
    np.testing.assert_array_equal(tiny_pipe(**args).images, tiny_pipe(**args, scheduler="default").images)
    np.testing.assert_array_equal(tiny_pipe(**args).images, tiny_pipe(**args, scheduler="pndm").images)


@pytest.mark.parametrize("name", ["heun", "NoneType", 7])
def test_pipeline_refuses_unknown_scheduler_names(tiny_pipe, name: object) -> None:
    with pytest.raises(InvalidArgumentError, match="scheduler: must be one of") as error:
        tiny_pipe("a boat", num_inference_steps=2, height=64, width=64, scheduler=name)
    assert error.value.parameter == "scheduler"


def test_cli_generate_with_scheduler(tiny_bundle: Path, tmp_path: Path) -> None:
    from sdrt.cli.main import main
    from sdrt.engine.image_io import read_png_parameters

    out = tmp_path / "euler_a.png"
    assert main(["generate", str(tiny_bundle), "a cat", "-o", str(out), "-s", "2", "--height", "64", "--width", "64",
                 "--seed", "4", "--scheduler", "euler_a", "-q", "--no-safety-checker"]) == 0
    assert read_png_parameters(out)["scheduler"] == "euler_a"
    assert main(["generate", str(tiny_bundle), "a cat", "-o", str(tmp_path / "x.png"), "--scheduler", "heun"]) == 2
