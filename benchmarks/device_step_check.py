"""The device loop checked against the host loop for one scheduler, on any `sdrt.engine.device_loop.Device`: CuPy on
a GPU (sdrt.benchmarks.gpu_validate --quick), a stand-in in the CPU tests.

The U-Net is a stand-in written over the array namespace (a fixed function of its three inputs), so the check needs
no TensorRT: it covers guidance, every scheduler's update and the graphs captured around them, on the device's
kernels, against the same loop in numpy. The first request of a plan runs eagerly and captures; the later ones
replay the graphs on other latents, context and step noise.
"""
from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import numpy as np

from sdrt.engine import guidance_batch
from sdrt.engine.array_namespace import namespace_of
from sdrt.engine.device_loop import DenoiseJob, Device, DeviceDenoiser
from sdrt.engine.schedulers import Scheduler, scheduler_by_name

#: diffusers' default noise schedule, PLMS warm-up: the check compares the device with the host, any schedule does
SCHEDULER_CONFIG = {"skip_prk_steps": True}
CHECKED_SCHEDULERS = ("pndm", "ddim", "euler", "euler_a", "dpm++2m", "dpm++2m-karras", "lms", "lcm")
LATENT_SHAPE = (2, 4, 16, 16)  # two images: guidance's halves hold two rows each
CONTEXT_LENGTH, CONTEXT_WIDTH = 77, 64
GUIDANCE_SCALE = 7.5
REQUESTS = 3  # the eager one that captures, then two replays
#: the device's sin, sqrt and exp differ from numpy's by a few ulps, and 8 steps of a multistep sampler amplify it:
#: far below this; a wrong coefficient, a stale buffer or a step replayed out of order is far above it
MAX_RELATIVE_DIFF = 1e-4


def stand_in_unet(sample: Any, timestep: Any, context: Any) -> Any:
    """A fixed function of the U-Net's inputs, row by row, in their namespace: (rows, C, h, w)."""
    xp = namespace_of(sample, timestep, context)
    return xp.sin(sample * np.float32(1.3) + timestep[:, None, None, None] / np.float32(100)) * np.float32(0.9) \
        + context.mean(axis=(1, 2))[:, None, None, None]


class StandInBinding:
    """sdrt.engine.device_loop.UNetBinding of the stand-in U-Net on `device`."""

    def __init__(self, device: Device, shapes: Mapping[str, tuple[int, ...]]) -> None:
        xp = device.namespace
        self.inputs = {name: xp.empty(shape, dtype=xp.float32) for name, shape in shapes.items()}
        self.output = xp.empty(shapes["sample"], dtype=xp.float32)

    def enqueue(self) -> None:
        inputs = self.inputs
        self.output[...] = stand_in_unet(inputs["sample"], inputs["timestep"], inputs["encoder_hidden_states"])

    def release(self) -> None:
        self.inputs = {}


class StandInUNet:
    def __init__(self, device: Device) -> None:
        self.device = device

    def bind(self, shapes: Mapping[str, tuple[int, ...]]) -> StandInBinding:
        return StandInBinding(self.device, shapes)


def host_denoise(scheduler: Scheduler, steps: int, latents: np.ndarray, context: np.ndarray, noise_seed: int) -> np.ndarray:
    """The pipeline's host loop over the stand-in U-Net, in numpy."""
    rng = np.random.default_rng(noise_seed)
    state = scheduler.start(steps)
    for index, timestep in enumerate(state.timesteps):
        model_input = scheduler.scale_model_input(state, guidance_batch.repeat(latents, True), index)  # (2B, C, h, w)
        prediction = stand_in_unet(model_input, np.full(len(model_input), timestep, np.float32), context).astype(np.float32)
        prediction = guidance_batch.combine(prediction, GUIDANCE_SCALE)  # (B, C, h, w)
        noise = rng.standard_normal(latents.shape, dtype=np.float32) if scheduler.needs_noise else None
        latents, state = scheduler.step(state, prediction, index, latents, noise)
    return latents


def check_device_step(name: str, device: Device, steps: int) -> dict[str, Any]:
    """Run scheduler `name` REQUESTS times through DeviceDenoiser on `device` and through `host_denoise`; return the
    largest difference relative to the latents' scale, per request, the seconds each request took, and the graphs
    captured (one per U-Net call, unless a capture failed: its error)."""
    scheduler = scheduler_by_name(name, SCHEDULER_CONFIG)
    loop = DeviceDenoiser(device, StandInUNet(device))
    differences, seconds = [], []
    for request in range(REQUESTS):
        rng = np.random.default_rng(request)
        state = scheduler.start(steps)
        latents = rng.standard_normal(LATENT_SHAPE, dtype=np.float32) * np.float32(state.init_noise_sigma)  # (B, C, h, w)
        context = rng.standard_normal((2 * LATENT_SHAPE[0], CONTEXT_LENGTH, CONTEXT_WIDTH), dtype=np.float32)  # (2B, L, D)
        noise_rng = np.random.default_rng(100 + request)
        draw = (lambda shape: noise_rng.standard_normal(shape, dtype=np.float32)) if scheduler.needs_noise else None
        started = time.perf_counter()
        on_device = loop.denoise(DenoiseJob(scheduler, state, latents, context, GUIDANCE_SCALE, True, draw))  # synchronised
        seconds.append(time.perf_counter() - started)
        expected = host_denoise(scheduler, steps, latents, context, 100 + request)
        scale = max(1.0, float(np.abs(expected).max()))
        differences.append(float(np.abs(on_device.astype(np.float64) - expected).max()) / scale)
    captured = loop.captured()
    loop.clear()
    return {"scheduler": name, "steps": steps, "unet_calls": len(scheduler.start(steps).timesteps),
            "graphs": captured["graphs"], "capture_errors": captured["capture_errors"],
            "max_relative_diff": max(differences), "per_request_relative_diff": differences,
            "tolerance": MAX_RELATIVE_DIFF, "seconds": seconds}
