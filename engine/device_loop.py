"""The denoising loop on the device: latents, the scheduler's history and the text context stay in device memory for
the whole request, and each step (U-Net, guidance, scheduler update) is one captured graph that the host launches.

A backend that offers it (`Backend.device_loop()`, TensorRT with CuPy) is handed a `DenoiseJob` by the pipeline in
place of the host loop. `DeviceDenoiser` is the loop itself, written against three small interfaces that a backend
supplies (`Device`: array namespace, stream, capture; `DeviceUNet`: a U-Net bound to device buffers) so that it runs
on the CPU in tests with fakes.

How a request runs. The first request of a plan (scheduler and its timesteps, shapes, guidance) runs the steps
eagerly on the device, which compiles the namespace's kernels and warms its memory pool, then captures one graph
per step: step k's graph reads the latents step k-1's graph wrote, and the scheduler's history arrays the capture of
step k-1 produced. The scheduler's scalars (alpha-bars, sigmas, multistep coefficients) are Python/numpy values of
the plan, so they are kernel arguments baked into step k's graph: a plan keys its graphs. What changes between
requests of one plan is read from device tables indexed by step, rewritten at every request before the first
launch: the U-Net's timesteps (row k copied into its input by graph k), and a stochastic sampler's step noise (drawn
on the host from the request's seed, in the host loop's order, uploaded once). Later requests of the plan upload the
initial latents, the text context and the tables, then launch the graphs; the host synchronises only to read the
final latents, or the latents of a step whose callback asks for them (what the callback returns is written back in
place, where the next graph reads it). Graph temporaries come from a memory pool private to the plan, released with
its graphs.
"""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping
from types import ModuleType
from typing import Any, ContextManager, Protocol

import numpy as np

from sdrt.engine import guidance_batch
from sdrt.engine.schedulers import Scheduler, SchedulerState

logger = logging.getLogger(__name__)

#: plans whose graphs are kept: a server alternating two sizes or samplers keeps both
MAX_CACHED_PLANS = 2

#: called after step `step_index` with the latents on the host; returns replacement latents or None
StepObserver = Callable[[int, float, np.ndarray], "np.ndarray | None"]


@dataclasses.dataclass(frozen=True)
class DenoiseJob:
    """One request's denoising, as the pipeline hands it to a device loop: one without per-step hooks (text to image,
    image to image; not inpainting)."""

    scheduler: Scheduler
    state: SchedulerState  # planned, no step taken
    latents: np.ndarray  # (B, C, h, w) float32, the initial latents scaled by init_noise_sigma
    context: np.ndarray  # (2B or B, L, D) float32, [uncond; cond] when guided
    guidance_scale: float
    guided: bool
    #: draws standard-normal noise of a shape from the request's generator (stochastic samplers), else None
    draw_noise: Callable[[tuple[int, ...]], np.ndarray] | None = None
    on_step: StepObserver | None = None


class DeviceLoop(Protocol):
    def denoise(self, job: DenoiseJob) -> np.ndarray:
        """The final latents (B, C, h, w) float32 on the host."""
        ...


class Graph(Protocol):
    def launch(self) -> None: ...

    def release(self) -> None: ...


class MemoryPool(Protocol):
    def scope(self) -> ContextManager[None]:
        """Allocations within come from this pool."""
        ...

    def release(self) -> None: ...


class Device(Protocol):
    """Where the loop runs: its array namespace and the one stream every operation is ordered on."""

    namespace: ModuleType

    def stream_scope(self) -> ContextManager[None]:
        """Namespace operations within run on the loop's stream (the U-Net's)."""
        ...

    def new_pool(self) -> MemoryPool: ...

    def capture(self, work: Callable[[], None]) -> Graph:
        """`work`'s operations captured (not run) as one graph."""
        ...

    def to_host(self, array: Any) -> np.ndarray:
        """A host copy of a device array, once the work before it on the stream is done."""
        ...


class UNetBinding(Protocol):
    """A U-Net engine bound to device buffers of fixed shapes."""

    inputs: Mapping[str, Any]  # sample, timestep, encoder_hidden_states: device arrays the launch reads
    output: Any  # noise_pred: the device array it writes

    def enqueue(self) -> None:
        """Launch the U-Net on the loop's stream (recorded into a graph under capture)."""
        ...

    def release(self) -> None: ...


class DeviceUNet(Protocol):
    def bind(self, shapes: Mapping[str, tuple[int, ...]]) -> UNetBinding:
        """A binding of its own (an execution context shaped once, never re-shaped) for these input shapes."""
        ...


@dataclasses.dataclass
class _Plan:
    """One plan's binding, pool, tables and, once captured, its graphs and what they read and write."""

    binding: UNetBinding
    pool: MemoryPool
    latents: Any  # (B, C, h, w) the initial latents graph 0 reads
    timesteps: Any  # (N, rows) the U-Net's timestep row per step
    noise: Any | None  # (N, B, C, h, w) step noise, stochastic samplers only
    graphs: list[Graph] = dataclasses.field(default_factory=list)
    outputs: list[Any] = dataclasses.field(default_factory=list)  # the latents each graph writes
    kept: list[Any] = dataclasses.field(default_factory=list)  # the states whose arrays later graphs read
    capture_error: str | None = None  # why its steps could not be captured: it runs eagerly

    def release_graphs(self) -> None:
        for graph in self.graphs:
            graph.release()
        self.graphs, self.outputs, self.kept = [], [], []

    def release(self) -> None:
        self.release_graphs()
        self.binding.release()
        self.pool.release()


class DeviceDenoiser:
    """DeviceLoop over a `Device` and a `DeviceUNet`; `capture_graphs=False` runs every request eagerly on the
    device (still one synchronisation per request)."""

    def __init__(self, device: Device, unet: DeviceUNet, capture_graphs: bool = True, max_plans: int = MAX_CACHED_PLANS) -> None:
        self.device = device
        self.unet = unet
        self.capture_graphs = capture_graphs
        self.max_plans = max_plans
        self._plans: dict[tuple[Any, ...], _Plan] = {}  # least recently used first

    def clear(self) -> None:
        """Release every plan's graphs and buffers (the U-Net's weights changed: graphs may point at the old ones)."""
        while self._plans:
            self._plans.pop(next(iter(self._plans))).release()

    def denoise(self, job: DenoiseJob) -> np.ndarray:
        xp = self.device.namespace
        steps = len(job.state.timesteps)
        rows = guidance_batch.batch_size(len(job.latents), job.guided)
        shapes = {"sample": (rows, *job.latents.shape[1:]), "timestep": (rows,), "encoder_hidden_states": job.context.shape}
        key = (job.scheduler, job.state.timesteps.tobytes(), job.latents.shape, job.context.shape, job.guided,
               float(job.guidance_scale))
        # drawn before any step, in the host loop's order: every other draw of the request came before its steps
        noise = np.stack([job.draw_noise(job.latents.shape) for _ in range(steps)]) if job.scheduler.needs_noise else None  # (N, B, C, h, w)
        with self.device.stream_scope():
            plan = self._plan(key, job, shapes, steps, noise)
            plan.binding.inputs["encoder_hidden_states"][...] = xp.asarray(job.context)  # stays for every step
            plan.timesteps[...] = xp.asarray(np.repeat(np.asarray(job.state.timesteps, np.float32)[:, None], rows, axis=1))  # (N, rows)
            if noise is not None:
                plan.noise[...] = xp.asarray(noise)
            plan.latents[...] = xp.asarray(job.latents)
            if not plan.graphs:
                latents = self._run_eagerly(job, plan)
                if self.capture_graphs and plan.capture_error is None:
                    self._capture(job, plan)
                return latents
            return self._replay(job, plan)

    def captured(self) -> dict[str, Any]:
        """What the cached plans hold: their graphs in all, and why any plan's capture failed."""
        return {"graphs": sum(len(plan.graphs) for plan in self._plans.values()),
                "capture_errors": [plan.capture_error for plan in self._plans.values() if plan.capture_error]}

    def _plan(self, key: tuple[Any, ...], job: DenoiseJob, shapes: dict[str, tuple[int, ...]], steps: int,
              noise: np.ndarray | None) -> _Plan:
        plan = self._plans.pop(key, None)
        if plan is None:
            if len(self._plans) >= self.max_plans:
                self._plans.pop(next(iter(self._plans))).release()  # before the new plan allocates
            xp, pool = self.device.namespace, self.device.new_pool()
            binding = self.unet.bind(shapes)
            with pool.scope():
                plan = _Plan(
                    binding=binding,
                    pool=pool,
                    latents=xp.empty(job.latents.shape, dtype=xp.float32),
                    timesteps=xp.empty((steps, shapes["timestep"][0]), dtype=xp.float32),
                    noise=None if noise is None else xp.empty(noise.shape, dtype=xp.float32),
                )
        self._plans[key] = plan  # most recently used last
        return plan

    def _step(self, job: DenoiseJob, plan: _Plan, index: int, latents: Any, state: SchedulerState) -> tuple[Any, SchedulerState]:
        """Enqueue step `index`: U-Net input, U-Net, guidance, scheduler update; the same code eager or captured."""
        binding, scheduler = plan.binding, job.scheduler
        model_input = scheduler.scale_model_input(state, guidance_batch.repeat(latents, job.guided), index)  # (2B or B, C, h, w)
        binding.inputs["sample"][...] = model_input
        binding.inputs["timestep"][...] = plan.timesteps[index]  # (rows,) row `index` of the table
        binding.enqueue()
        prediction = binding.output  # (2B or B, C, h, w), rewritten by the next step's U-Net
        if job.guided:
            prediction = guidance_batch.combine(prediction, job.guidance_scale)  # (B, C, h, w)
        step_noise = plan.noise[index] if plan.noise is not None else None  # (B, C, h, w)
        return scheduler.step(state, prediction, index, latents, step_noise)

    def _run_eagerly(self, job: DenoiseJob, plan: _Plan) -> np.ndarray:
        latents, state = plan.latents, job.state
        with plan.pool.scope():
            for index, timestep in enumerate(job.state.timesteps):
                latents, state = self._step(job, plan, index, latents, state)
                latents = self._observe(job, index, float(timestep), latents)
            return self.device.to_host(latents)

    def _capture(self, job: DenoiseJob, plan: _Plan) -> None:
        """A graph per step; if one capture fails, none is kept and the plan runs eagerly from then on (the request's
        latents, computed eagerly, stand)."""
        latents, state = plan.latents, job.state
        try:
            with plan.pool.scope():
                for index in range(len(job.state.timesteps)):
                    def work(index: int = index) -> None:
                        nonlocal latents, state
                        latents, state = self._step(job, plan, index, latents, state)
                    plan.graphs.append(self.device.capture(work))
                    plan.outputs.append(latents)
                    plan.kept.append(state)
        except Exception as error:  # a capture CUDA refuses costs the graphs, not the request
            plan.release_graphs()  # a partial run of graphs must never be replayed
            plan.capture_error = f"{type(error).__name__}: {error}"
            logger.warning("capturing the denoising steps in CUDA graphs failed (%s): this plan runs eagerly", plan.capture_error)

    def _replay(self, job: DenoiseJob, plan: _Plan) -> np.ndarray:
        for index, (graph, timestep) in enumerate(zip(plan.graphs, job.state.timesteps)):
            graph.launch()
            if job.on_step is not None:
                replaced = job.on_step(index, float(timestep), self.device.to_host(plan.outputs[index]))
                if replaced is not None:
                    plan.outputs[index][...] = self.device.namespace.asarray(replaced, dtype=np.float32)  # graph index+1 reads it
        return self.device.to_host(plan.outputs[-1])

    def _observe(self, job: DenoiseJob, index: int, timestep: float, latents: Any) -> Any:
        """The latents after step `index`, as a step callback leaves them (eager steps)."""
        if job.on_step is None:
            return latents
        replaced = job.on_step(index, timestep, self.device.to_host(latents))
        return latents if replaced is None else self.device.namespace.asarray(replaced, dtype=np.float32)
