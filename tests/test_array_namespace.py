"""Guidance and every scheduler's update run through the array namespace of their inputs: on a stand-in device
array type that refuses numpy (tests/fake_device.py), each gives bit-for-bit the numpy run's latents, so no hidden
`np.` call touches a device array and the CPU parity tests cover the code a device loop runs."""
from __future__ import annotations

import numpy as np
import pytest

from sdrt.engine import guidance_batch
from sdrt.engine.array_namespace import namespace_of
from sdrt.engine.schedulers import DDIMScheduler, PNDMScheduler, scheduler_by_name
from sdrt.export.random_checkpoint import SD15_SCHEDULER_CONFIG
from tests.fake_device import FakeDevice, FakeDeviceArray

CONFIG = {"_class_name": "PNDMScheduler", **SD15_SCHEDULER_CONFIG}
SHAPE = (2, 4, 3, 3)
STEPS = 7
SCHEDULERS = {
    **{name: (lambda name=name: scheduler_by_name(name, CONFIG)) for name in
       ("pndm", "ddim", "euler", "euler_a", "dpm++2m", "dpm++2m-karras", "lms", "lcm")},
    "pndm-runge-kutta": lambda: PNDMScheduler({**CONFIG, "skip_prk_steps": False}),
    "ddim-eta": lambda: DDIMScheduler({**CONFIG, "clip_sample": True}, eta=0.5),
    "v-prediction-dpm": lambda: scheduler_by_name("dpm++2m", {**CONFIG, "prediction_type": "v_prediction"}),
}


def _model(sample: np.ndarray, timestep: float) -> np.ndarray:
    """A stand-in U-Net: any fixed function of its inputs that differs per step."""
    return (np.sin(sample * 1.3 + np.float32(timestep) / 100) * 0.9).astype(np.float32)


def _run(scheduler, to_array, from_array) -> np.ndarray:
    rng = np.random.default_rng(0)
    state = scheduler.start(STEPS)
    latents = to_array(rng.standard_normal(SHAPE, dtype=np.float32) * np.float32(state.init_noise_sigma))
    for index, timestep in enumerate(state.timesteps):
        model_input = scheduler.scale_model_input(state, guidance_batch.repeat(latents, True), index)  # (2B, ...)
        prediction = to_array(_model(from_array(model_input), float(timestep)))  # (2B, ...) the "U-Net"
        guided = guidance_batch.combine(prediction, 7.5)  # (B, ...)
        noise = to_array(rng.standard_normal(SHAPE, dtype=np.float32)) if scheduler.needs_noise else None
        latents, state = scheduler.step(state, guided, index, latents, noise)
    return from_array(latents)


@pytest.mark.parametrize("name", SCHEDULERS)
def test_scheduler_step_runs_on_device_arrays_as_on_numpy(name: str) -> None:
    device = FakeDevice()
    on_host = _run(SCHEDULERS[name](), lambda a: a, lambda a: a)
    on_device = _run(SCHEDULERS[name](), lambda a: FakeDeviceArray(np.array(a), device), lambda a: a.get())
    assert on_device.dtype == np.float32
    np.testing.assert_array_equal(on_device, on_host)
    assert device.namespace.used.get("concatenate"), "guidance's batch went through the namespace"


def test_ddim_clips_through_the_namespace() -> None:
    device = FakeDevice()
    _run(SCHEDULERS["ddim-eta"](), lambda a: FakeDeviceArray(np.array(a), device), lambda a: a.get())
    assert device.namespace.used["clip"] == STEPS


def test_a_hidden_numpy_call_on_a_device_array_fails() -> None:
    """What the tests above rely on: numpy refuses the stand-in, so a stray np.* in the step would fail them."""
    array = FakeDeviceArray(np.ones(3, np.float32), FakeDevice())
    for hidden in (np.asarray, np.sqrt, lambda a: np.split(a, 1), lambda a: np.clip(a, 0, 1)):
        with pytest.raises(TypeError):
            hidden(array)
    assert isinstance(np.float32(2) * array, FakeDeviceArray)  # numpy scalars defer to the device array


def test_namespace_of() -> None:
    device = FakeDevice()
    array = FakeDeviceArray(np.ones(2), device)
    assert namespace_of(np.ones(2), 1.0, None) is np
    assert namespace_of(array, np.float32(1)) is device.namespace
    with pytest.raises(TypeError, match="different namespaces"):
        namespace_of(array, FakeDeviceArray(np.ones(2), FakeDevice()))
    with pytest.raises(TypeError, match="not an array"):
        namespace_of(object())
