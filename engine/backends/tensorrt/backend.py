"""TensorRT on an NVIDIA GPU, from engines `sdrt build-engines` stored in the bundle.

Engines are looked up under this GPU's and TensorRT's environment and checked against the bundle's model files: a
missing, stale or foreign engine is refused with the command that rebuilds it, and a request outside the profile
the engines were built for fails before any model runs. All engines run on one CUDA stream; the U-Net, called with
the same shapes at every step, replays a CUDA graph per shape (unless SDRT_TENSORRT_CUDA_GRAPHS=0). Where CuPy is
installed, requests without per-step hooks run in the device loop (sdrt.engine.device_loop): the whole step, guidance
and scheduler update included, one graph per step, the latents on the device until the end (unless
SDRT_TENSORRT_DEVICE_LOOP=0).
"""
from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from sdrt.engine.array_namespace import cupy_namespace
from sdrt.engine.backends.base import Backend, ComponentFile, MemoryPolicy
from sdrt.engine.backends.tensorrt.cuda import Stream
from sdrt.engine.backends.tensorrt.device_loop import CupyDevice, TensorRTUNet, device_loop_unavailable_reason
from sdrt.engine.backends.tensorrt.engines.compatibility import build_command, check_context_length, check_request, resolve_engines
from sdrt.engine.backends.tensorrt.library import current_environment, libraries_unavailable_reason
from sdrt.engine.backends.tensorrt.runner import EngineRunner
from sdrt.engine.cuda_device import cuda_device_unavailable_reason
from sdrt.engine.device_loop import DenoiseJob, DeviceDenoiser, DeviceLoop
from sdrt.engine.errors import EnginesNotBuiltError, GpuError, InvalidArgumentError, WeightsNotReplaceableError
from sdrt.engine.onnx_weights import read_initializers
from sdrt.engine.specs import OPTIONAL_COMPONENTS, Component

logger = logging.getLogger(__name__)

#: components whose calls are captured in CUDA graphs: the U-Net runs at every step with the same shapes, so a
#: replay saves its many kernel launches each time; the others run once per request, where a capture costs more
GRAPH_CAPTURED = frozenset({Component.UNET})
#: "0" runs every engine without CUDA graphs, "1" (the default) captures GRAPH_CAPTURED: set per process, to measure
#: what the graphs save (`sdrt doctor --gpu` times both) or to rule them out when debugging
CUDA_GRAPHS_ENV = "SDRT_TENSORRT_CUDA_GRAPHS"
_CUDA_GRAPHS_SETTINGS = {"1": GRAPH_CAPTURED, "0": frozenset()}


def graph_captured_components() -> frozenset[Component]:
    """The components whose calls are captured in CUDA graphs in this process, from CUDA_GRAPHS_ENV; raise
    InvalidArgumentError naming the variable if it is set to anything but 0 or 1."""
    setting = os.environ.get(CUDA_GRAPHS_ENV, "1")
    if setting not in _CUDA_GRAPHS_SETTINGS:
        raise InvalidArgumentError(CUDA_GRAPHS_ENV, f"must be 0 (no CUDA graphs) or 1 (the default), got {setting!r}")
    return _CUDA_GRAPHS_SETTINGS[setting]


class TensorRTBackend(Backend):
    name = "tensorrt"
    batched_decode = True
    exact = False  # engines are fp16 by default, and their precision is chosen at build time
    # `sdrt build-engines` builds no engines of DeepCache's passes (specs.OPTIONAL_COMPONENTS) yet
    deepcache_refusal = ("DeepCache is not supported on the tensorrt backend yet: load the bundle with backend=\"cuda\" "
                         "(or a CPU backend) to use it")

    @classmethod
    def unavailable_reason(cls) -> str | None:
        return cuda_device_unavailable_reason() or libraries_unavailable_reason()

    @classmethod
    def bundle_unavailable_reason(cls, bundle_dir: Path, components: Mapping[Component, ComponentFile]) -> str | None:
        try:
            resolve_engines(bundle_dir, _digests(components), current_environment())
        except (EnginesNotBuiltError, GpuError) as exc:  # GpuError: the device could not even be identified
            return str(exc)
        return None

    def __init__(
        self, bundle_dir: Path, components: Mapping[Component, ComponentFile], memory: MemoryPolicy = MemoryPolicy.KEEP_LOADED
    ) -> None:
        super().__init__(bundle_dir, components, memory)
        self._store, self._index = resolve_engines(self.bundle_dir, _digests(self.components), current_environment())
        self._graph_captured = graph_captured_components()
        self._stream = Stream()
        # weights replaced since load (LoRA), applied again to an engine loaded later (memory="one-at-a-time")
        self._weights: dict[Component, dict[str, np.ndarray]] = {}
        self._denoiser: DeviceDenoiser | None = None
        reason = device_loop_unavailable_reason(self.memory)
        if reason is None:
            cupy = cupy_namespace()
            device = CupyDevice(cupy.cuda.ExternalStream(self._stream.ptr), cupy)
            unet = TensorRTUNet(lambda: self._model(Component.UNET), cupy)
            self._denoiser = DeviceDenoiser(device, unet, capture_graphs=Component.UNET in self._graph_captured)
        else:
            logger.info("tensorrt: denoising in the host loop: %s", reason)

    def device_loop(self) -> DeviceLoop | None:
        return self if self._denoiser is not None else None

    def denoise(self, job: DenoiseJob) -> np.ndarray:
        """DeviceLoop: the whole denoising of `job` on the GPU, one request at a time."""
        with self._lock:
            return self._denoiser.denoise(job)

    def check_request(self, num_images: int, height: int, width: int) -> None:
        check_request(self._index, self.bundle_dir, num_images, height, width)

    def check_context_length(self, length: int) -> None:
        check_context_length(self._index, length)

    def _load(self, component: Component) -> EngineRunner:
        plan = self._store.engine_path(self._index.engines[component]).read_bytes()
        runner = EngineRunner(plan, self._stream, capture_graphs=component in self._graph_captured)
        if self._weights.get(component):
            runner.refit(self._weights[component])
        return runner

    def set_weights(self, component: Component, weights: Mapping[str, np.ndarray]) -> None:
        if not self._index.refittable:
            command = build_command(self.bundle_dir, self._index.profile, self._index.precision, refittable=True)
            raise WeightsNotReplaceableError(
                f"the TensorRT engines of {self.bundle_dir} were built without --refittable, so their weights cannot "
                f"be replaced (LoRA): rebuild them with `{command}`"
            )
        previous = self._weights.get(component, {})
        # an engine holds whatever was last refitted: weights overridden before and not now get the bundle's values
        restored = read_initializers(self.components[component].path, previous.keys() - weights.keys()) if previous else {}
        with self._lock:
            if component in self._loaded:
                self._loaded[component].refit({**restored, **weights})
            if component is Component.UNET and self._denoiser is not None:
                self._denoiser.clear()  # its graphs were captured with the previous weights
            self._weights[component] = dict(weights)  # only once TensorRT has taken them

    def _infer(self, model: EngineRunner, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        return model.run(feeds)


def _digests(components: Mapping[Component, ComponentFile]) -> dict[Component, str]:
    """The digests of the components TensorRT runs: every one but DeepCache's passes."""
    return {component: source.digest for component, source in components.items() if component not in OPTIONAL_COMPONENTS}
