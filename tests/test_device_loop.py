"""The device denoising loop (sdrt.engine.device_loop) on a stand-in device whose graphs replay what their capture
recorded into the same arrays (tests/fake_device.py): the first request of a plan runs eagerly and captures a graph
per step, later ones replay them, and both give the host loop's latents bit for bit, step noise, step callbacks and
the text context included; plans are cached and released; and the pipeline hands requests without per-step hooks
(text to image, image to image) to a backend's device loop, with the same latents as its host loop."""
from __future__ import annotations

import numpy as np
import pytest

from sdrt.engine import guidance_batch
from sdrt.engine.device_loop import DenoiseJob, DeviceDenoiser
from sdrt.engine.schedulers import scheduler_by_name
from sdrt.engine.specs import Component
from sdrt.export.random_checkpoint import SD15_SCHEDULER_CONFIG
from tests.fake_device import FakeDevice

CONFIG = {"_class_name": "PNDMScheduler", **SD15_SCHEDULER_CONFIG}
SHAPE = (1, 4, 3, 3)
CONTEXT_SHAPE = (2, 5, 6)


def fake_unet(sample: np.ndarray, timestep: np.ndarray, context: np.ndarray) -> np.ndarray:
    """A stand-in U-Net reading all three inputs, row by row."""
    return (np.sin(sample * 1.3 + timestep[:, None, None, None] / 100) * 0.9
            + context.mean(axis=(1, 2))[:, None, None, None]).astype(np.float32)


class FakeBinding:
    def __init__(self, device: FakeDevice, shapes, unet=fake_unet) -> None:
        xp = device.namespace
        self.device, self.unet = device, unet
        self.inputs = {name: xp.empty(shape, dtype=np.float32) for name, shape in shapes.items()}
        self.output = xp.empty(shapes["sample"], dtype=np.float32)
        self.released = False

    def enqueue(self) -> None:
        inputs = self.inputs
        self.device.run_into(self.output, ..., self.unet, inputs["sample"], inputs["timestep"], inputs["encoder_hidden_states"])

    def release(self) -> None:
        self.released = True


class FakeUNet:
    def __init__(self, device: FakeDevice) -> None:
        self.device = device
        self.bindings: list[FakeBinding] = []

    def bind(self, shapes):
        self.bindings.append(FakeBinding(self.device, shapes))
        return self.bindings[-1]


def host_loop(scheduler, steps, latents, context, guidance_scale, noise_seed, on_step=None) -> np.ndarray:
    """The pipeline's host loop over the same stand-in U-Net."""
    rng = np.random.default_rng(noise_seed)
    state = scheduler.start(steps)
    for index, timestep in enumerate(state.timesteps):
        model_input = scheduler.scale_model_input(state, guidance_batch.repeat(latents, True), index)
        prediction = fake_unet(model_input, np.full(len(model_input), timestep, np.float32), context)
        prediction = guidance_batch.combine(prediction, guidance_scale)
        noise = rng.standard_normal(latents.shape, dtype=np.float32) if scheduler.needs_noise else None
        latents, state = scheduler.step(state, prediction, index, latents, noise)
        if on_step is not None:
            replaced = on_step(index, float(timestep), latents)
            latents = latents if replaced is None else replaced
    return latents


def job(scheduler, steps, latents, context, noise_seed, on_step=None, guidance_scale=7.5) -> DenoiseJob:
    rng = np.random.default_rng(noise_seed)
    return DenoiseJob(scheduler, scheduler.start(steps), latents, context, guidance_scale, True,
                      (lambda shape: rng.standard_normal(shape, dtype=np.float32)) if scheduler.needs_noise else None, on_step)


def inputs(seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.standard_normal(SHAPE, dtype=np.float32), rng.standard_normal(CONTEXT_SHAPE, dtype=np.float32)


@pytest.mark.parametrize("name", ["pndm", "ddim", "euler", "euler_a", "dpm++2m", "lms"])
def test_eager_first_request_and_replayed_graphs_give_the_host_loops_latents(name: str) -> None:
    device = FakeDevice()
    unet = FakeUNet(device)
    loop = DeviceDenoiser(device, unet)
    scheduler, steps = scheduler_by_name(name, CONFIG), 6
    for seed in (0, 1, 2):  # the first runs eagerly and captures; the others replay on new latents, context and noise
        latents, context = inputs(seed)
        expected = host_loop(scheduler, steps, latents, context, 7.5, noise_seed=seed + 10)
        result = loop.denoise(job(scheduler, steps, latents, context, noise_seed=seed + 10))
        assert isinstance(result, np.ndarray)
        np.testing.assert_array_equal(result, expected)
    num_calls = len(scheduler.start(steps).timesteps)
    assert device.captures == num_calls and len(unet.bindings) == 1  # captured once, one binding for the plan
    assert device.host_reads == 3  # one synchronisation per request: the final latents


def test_a_step_callback_reads_and_replaces_latents_on_both_paths() -> None:
    device = FakeDevice()
    loop = DeviceDenoiser(device, FakeUNet(device))
    scheduler = scheduler_by_name("pndm", CONFIG)
    for seed in (0, 1):
        seen: list[tuple[int, float]] = []

        def halve_at_two(index: int, timestep: float, latents: np.ndarray) -> np.ndarray | None:
            assert isinstance(latents, np.ndarray)  # the host gets host arrays
            seen.append((index, timestep))
            return latents * np.float32(0.5) if index == 2 else None

        latents, context = inputs(seed)
        expected = host_loop(scheduler, 5, latents, context, 7.5, 0, halve_at_two)
        seen.clear()
        np.testing.assert_array_equal(loop.denoise(job(scheduler, 5, latents, context, 0, halve_at_two)), expected)
        assert seen == [(i, float(t)) for i, t in enumerate(scheduler.start(5).timesteps)]


def test_plans_are_keyed_cached_and_released() -> None:
    device = FakeDevice()
    unet = FakeUNet(device)
    loop = DeviceDenoiser(device, unet, max_plans=1)
    scheduler = scheduler_by_name("euler", CONFIG)
    latents, context = inputs(0)
    loop.denoise(job(scheduler, 4, latents, context, 0))
    loop.denoise(job(scheduler, 4, latents, context, 0, guidance_scale=3.0))  # guidance is baked: a new plan
    first, second = unet.bindings
    assert first.released and device.pools[0].released and not second.released
    np.testing.assert_array_equal(loop.denoise(job(scheduler, 4, latents, context, 0, guidance_scale=3.0)),
                                  host_loop(scheduler, 4, latents, context, 3.0, 0))
    loop.clear()
    assert second.released and device.pools[1].released


def test_without_graphs_every_request_runs_eagerly() -> None:
    device = FakeDevice()
    loop = DeviceDenoiser(device, FakeUNet(device), capture_graphs=False)
    scheduler = scheduler_by_name("dpm++2m", CONFIG)
    for seed in (0, 1):
        latents, context = inputs(seed)
        np.testing.assert_array_equal(loop.denoise(job(scheduler, 5, latents, context, 0)),
                                      host_loop(scheduler, 5, latents, context, 7.5, 0))
    assert device.captures == 0


@pytest.mark.parametrize("scheduler", ["default", "euler_a"])
def test_the_pipeline_hands_text_to_image_to_a_backends_device_loop(tiny_pipe, monkeypatch, scheduler: str) -> None:
    args = {"prompt": "a red circle", "num_inference_steps": 4, "height": 64, "width": 64, "output_type": "latent",
            "seed": 3, "scheduler": scheduler}
    on_host = tiny_pipe(**args).images
    backend = tiny_pipe.backend
    device = FakeDevice()

    def run_unet(sample, timestep, context):
        return backend.run(Component.UNET, {"sample": sample, "timestep": timestep, "encoder_hidden_states": context})[0]

    class BackendUNet:
        def bind(self, shapes):
            return FakeBinding(device, shapes, run_unet)

    loop = DeviceDenoiser(device, BackendUNet())
    monkeypatch.setattr(backend, "device_loop", lambda: loop)
    for _ in range(2):  # eager, then replayed
        np.testing.assert_array_equal(tiny_pipe(**args).images, on_host)
    calls = len(tiny_pipe.sampler(scheduler).start(4).timesteps)
    assert device.captures == calls
    image = np.zeros((64, 64, 3), np.uint8)
    img2img = {**args, "image": image, "strength": 0.5}
    monkeypatch.setattr(backend, "device_loop", lambda: None)
    img2img_on_host = tiny_pipe(**img2img).images
    monkeypatch.setattr(backend, "device_loop", lambda: loop)
    np.testing.assert_array_equal(tiny_pipe(**img2img).images, img2img_on_host)  # a run started part-way: on the device
    captured = device.captures
    assert captured > calls
    mask = np.full((64, 64), 255, np.uint8)
    tiny_pipe(**{**img2img, "mask_image": mask})  # inpainting blends the known region between steps: the host loop
    assert device.captures == captured


class _FailingCaptureDevice(FakeDevice):
    """Its third capture fails (a kernel that cannot be captured, say)."""

    def capture(self, work):
        if self.captures == 2:
            self.captures += 1
            raise RuntimeError("cudaErrorStreamCaptureUnsupported")
        return super().capture(work)


def test_a_failed_capture_keeps_no_graph_and_the_plan_runs_eagerly(caplog) -> None:
    device = _FailingCaptureDevice()
    loop = DeviceDenoiser(device, FakeUNet(device))
    scheduler = scheduler_by_name("lms", CONFIG)
    for seed in (0, 1, 2):  # the eager result stands; no partial run of graphs is replayed, no capture tried again
        latents, context = inputs(seed)
        np.testing.assert_array_equal(loop.denoise(job(scheduler, 5, latents, context, 0)), host_loop(scheduler, 5, latents, context, 7.5, 0))
    assert device.captures == 3
    assert loop.captured() == {"graphs": 0, "capture_errors": ["RuntimeError: cudaErrorStreamCaptureUnsupported"]}
    assert "capturing the denoising steps in CUDA graphs failed (RuntimeError: cudaErrorStreamCaptureUnsupported)" in caplog.text
