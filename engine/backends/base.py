"""The one small interface every inference backend implements, and the memory policy they all share."""
from __future__ import annotations

import abc
import dataclasses
import enum
import gc
import logging
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from sdrt.engine.device_loop import DeviceLoop
from sdrt.engine.errors import WeightsNotReplaceableError
from sdrt.engine.specs import Component

logger = logging.getLogger(__name__)


class MemoryPolicy(enum.Enum):
    """What stays loaded between calls.

    KEEP_LOADED: each component is loaded on first use and kept; repeated requests pay no load time.
    ONE_AT_A_TIME: only the component in use is resident; the peak is the largest component, not their sum, and
    each stage of a request reloads its component (from the backend's compiled-model cache where it has one).
    """

    KEEP_LOADED = "keep-loaded"
    ONE_AT_A_TIME = "one-at-a-time"


@dataclasses.dataclass(frozen=True)
class MemoryProfile:
    """How much host memory a backend holds, in the terms of sdrt.engine.memory_estimate's model. Each coefficient is
    calibrated against measured peaks (benchmarks/memory_estimate.py) and rounded up."""

    #: resident bytes per byte of a component's fp32 files in the bundle, once the component has run
    weights_per_file_byte: float
    #: what the backend's libraries, compiled kernels and thread pools add to the process once its models ran
    runtime_bytes: int
    #: bytes held per fp32 self-attention score (batch × heads × tokens²), in bytes of the scores: about 1 where
    #: attention runs as the exported MatMul -> Softmax -> MatMul, 0 where a fused kernel never holds a head's scores
    attention_scores: float
    #: level-0 feature maps (tokens × the U-Net's first channels, fp32) held per U-Net sample besides the scores
    unet_feature_maps: float
    #: full-resolution feature maps (pixels × the decoder's channels there, fp32) held per image decoded at once
    decoder_feature_maps: float
    #: fp32 values per pixel held per image decoded at once besides those feature maps (however many channels the
    #: decoder has: its 3-channel output and the backend's own buffers)
    decoder_pixel_values: float
    #: what any request holds besides its size's terms (text context, per-call buffers, the resting RSS's jitter)
    request_bytes: int
    #: what compiling a model for a request's new shapes holds, per byte of the largest component's fp32 files
    #: (OpenVINO compiles the U-Net again for a new size, the decoder for each new size); 0 where nothing compiles
    compile_bytes_per_file_byte: float = 0.0


@dataclasses.dataclass(frozen=True)
class ModelLoad:
    """One model a backend made ready to run: which component, for which input shapes (None: any), whether it was
    loaded from a compiled-model cache or compiled, and how long that took: wall-clock seconds, and the CPU seconds of
    the whole process meanwhile (all threads; on a busy machine, the wall time's share that is this work). Backends
    without a compiled-model cache report nothing."""

    component: Component
    shapes: Mapping[str, list[int]] | None
    from_cache: bool
    seconds: float
    cpu_seconds: float

    def describe(self) -> str:
        shapes = "any shapes" if self.shapes is None else ", ".join(f"{name} {'x'.join(map(str, shape))}" for name, shape in self.shapes.items())
        done = "loaded from the cache" if self.from_cache else "compiled"
        return f"{self.component.value} ({shapes}) {done} in {self.seconds:.2f} s ({self.cpu_seconds:.2f} s of CPU)"


@dataclasses.dataclass(frozen=True)
class ComponentFile:
    """A component's model file and the digest of its files in the manifest (`Manifest.component_digest`: the key
    of caches derived from it), and its fp16 variant's file where the bundle has one (`sdrt export --fp16-onnx`)."""

    path: Path
    digest: str
    fp16_path: Path | None = None


class Backend(abc.ABC):
    """Runs the bundle's components. Models are loaded on first use, so unused components cost no memory."""

    #: the name users pass as `backend=` and that results report
    name: str
    #: fp32 throughout, at pixel parity with diffusers; False for reduced-precision (fast) backends
    exact: bool
    #: "auto" runs it only in bundles whose owner prepared them for it, a choice rather than a missing step: a bundle
    #: without that preparation is logged at INFO, not as a warning (the int8 U-Net, which trades accuracy for speed)
    opt_in: ClassVar[bool] = False
    #: the VAE decodes a batch in one call (GPUs, where batching costs less per image) rather than one image at a
    #: time. On the CPU, batching costs the same per sample at full size while a batched decode's full-resolution
    #: activations multiply its peak memory, for bit-identical images; the U-Net stays batched there, as small models
    #: and serving's micro-batching gain from it (measurements: docs/design-notes.md).
    batched_decode: ClassVar[bool] = False
    #: the host memory its models and requests take (sdrt.engine.memory_estimate); None where it is not modelled:
    #: the GPU backends, whose weights and activations live in device memory
    memory_profile: ClassVar[MemoryProfile | None] = None
    #: why it cannot run DeepCache's passes (sdrt.engine.deepcache), one sentence; None: it runs them as any component
    deepcache_refusal: ClassVar[str | None] = None

    def __init__(
        self, bundle_dir: Path, components: Mapping[Component, ComponentFile], memory: MemoryPolicy = MemoryPolicy.KEEP_LOADED
    ) -> None:
        self.bundle_dir = Path(bundle_dir)
        self.components = dict(components)
        self.memory = memory
        self._loaded: dict[Component, Any] = {}
        self._lock = threading.Lock()
        self._model_loads: list[ModelLoad] = []

    @classmethod
    @abc.abstractmethod
    def unavailable_reason(cls) -> str | None:
        """None if this backend can run on this machine, else what is missing (one sentence)."""

    @classmethod
    def bundle_unavailable_reason(cls, bundle_dir: Path, components: Mapping[Component, ComponentFile]) -> str | None:
        """None if this backend can run this bundle (given `unavailable_reason()` is None), else why not (one
        sentence naming the command that fixes it). Most backends run any bundle; TensorRT needs engines built for it."""
        return None

    def check_request(self, num_images: int, height: int, width: int) -> None:
        """Raise InvalidArgumentError if this backend cannot run a request of `num_images` images of height x width
        pixels; called before any model runs. Most backends take any size the bundle accepts."""

    def check_context_length(self, length: int) -> None:
        """Raise InvalidArgumentError if this backend cannot give the U-Net a text context of `length` tokens (long
        prompts: several text-encoder windows); called before any model runs. Most backends take any length."""

    def set_weights(self, component: Component, weights: Mapping[str, np.ndarray]) -> None:
        """From the next call on, run `component` with the initializers named in `weights` holding those values
        (float32, in the initializers' shapes) and every other initializer the bundle's value: each call replaces
        the previous one's overrides, and an empty mapping restores the bundle's model. LoRA uses it
        (`StableDiffusionPipeline.load_lora`). Raise WeightsNotReplaceableError where this backend cannot."""
        raise WeightsNotReplaceableError(
            f"backend {self.name} cannot replace weights (LoRA); use backend=\"onnxruntime-cpu\", or \"tensorrt\" with "
            "engines built by `sdrt build-engines --refittable`"
        )

    def device_loop(self) -> DeviceLoop | None:
        """A loop running a whole request's denoising on the device (sdrt.engine.device_loop), which the pipeline
        hands text-to-image requests to; None (most backends): the pipeline's host loop calls `run` per step."""
        return None

    @abc.abstractmethod
    def _load(self, component: Component) -> Any:
        """Load `component` into whatever `_infer` runs (a session, a compiled model)."""

    @abc.abstractmethod
    def _infer(self, model: Any, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """Run a loaded model; outputs in spec order, owned by the caller."""

    def preload(self, components: frozenset[Component]) -> tuple[ModelLoad, ...]:
        """Load now those of `components` whose compiled models the backend's cache holds, so that the first request
        only runs them; return what it loaded. With MemoryPolicy.ONE_AT_A_TIME nothing is loaded ahead. Backends
        without a compiled-model cache load nothing ahead."""
        return ()

    @property
    def model_loads(self) -> tuple[ModelLoad, ...]:
        """Every model this backend compiled or loaded from its compiled-model cache so far, in order."""
        return tuple(self._model_loads)

    @property
    def loaded_components(self) -> frozenset[Component]:
        """The components whose models are loaded now."""
        return frozenset(self._loaded)

    def run(self, component: Component, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """Run one component on named inputs; return its outputs in spec order."""
        with self._lock:  # one request at a time per backend: loaded models and their buffers are shared
            return self._infer(self._model(component), feeds)

    def _model(self, component: Component) -> Any:
        """`component`'s loaded model, loading it first if need be; the caller holds `_lock`."""
        if component not in self._loaded:
            if self.memory is MemoryPolicy.ONE_AT_A_TIME and self._loaded:
                self._loaded.clear()
                gc.collect()  # free the previous model before the next one allocates
            logger.debug("%s: loading %s", self.name, component.value)
            self._loaded[component] = self._load(component)
        return self._loaded[component]
