"""`sdrt build-engines`: TensorRT engines for every component of a bundle, built from its ONNX on this machine's GPU
and stored in the bundle (sdrt.engine.backends.tensorrt.engines.store), for the TensorRT backend.

Each engine is stored under its key (sdrt.engine.backends.tensorrt.engines.identity.EngineKey): a build reuses an
engine whose key it already holds and builds the others, each written atomically, then publishes the index the
runtime reads, so an interrupted build leaves the previous one in use and a rerun builds only what is missing. TensorRT's timing cache
is kept beside the engines across builds. In fp16, each engine of OVERFLOW_PROBES (text encoder, U-Net, VAE) first
runs once on a sample input: if that yields NaN or infinity (some VAEs, and fine-tuned U-Nets, overflow fp16's
range), it is built in fp32 instead, and the finding is recorded so that later builds skip the fp16 attempt.
"""
from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from sdrt.engine.atomic import atomic_file
from sdrt.engine.backends.tensorrt.cuda import Stream
from sdrt.engine.backends.tensorrt.engines.identity import BuildEnvironment, EngineKey
from sdrt.engine.backends.tensorrt.engines.profile import EngineProfile, Precision, ShapeRange, component_shapes, default_profile
from sdrt.engine.backends.tensorrt.engines.store import CACHE_SUBDIR, EngineIndex, EngineStore
from sdrt.engine.backends.tensorrt.library import current_environment, libraries_unavailable_reason, tensorrt, trt_logger
from sdrt.engine.backends.tensorrt.runner import EngineRunner
from sdrt.engine.cuda_device import cuda_device, cuda_device_unavailable_reason
from sdrt.engine.errors import BackendUnavailableError
from sdrt.engine.manifest import ModelConfig, read_manifest, verify_files
from sdrt.engine.specs import OPTIONAL_COMPONENTS, Component
from sdrt.export.errors import EngineBuildError

logger = logging.getLogger(__name__)

_Probe = Callable[[np.random.Generator, tuple[int, ...], ModelConfig], np.ndarray]
#: token ids a probe draws: CLIP's vocabulary (SD 1.x and 2.x) below its start and end tokens
PROBE_TOKEN_IDS_BELOW = 49406
#: the timestep of the U-Net's probe: the noisiest, where a step's input and output are largest
PROBE_TIMESTEP = 999.0
#: the components whose fp16 engines are checked for overflow, and how each draws each input of its sample
OVERFLOW_PROBES: dict[Component, dict[str, _Probe]] = {
    Component.TEXT_ENCODER: {"input_ids": lambda rng, shape, model: rng.integers(0, PROBE_TOKEN_IDS_BELOW, shape).astype(np.int32)},
    Component.UNET: {
        # unit-variance latents (every sampler scales the U-Net's input to it); an inpainting U-Net's mask channels too
        "sample": lambda rng, shape, model: rng.standard_normal(shape).astype(np.float32),
        "timestep": lambda rng, shape, model: np.full(shape, PROBE_TIMESTEP, np.float32),
        # text-encoder outputs are layer-normed: about unit variance
        "encoder_hidden_states": lambda rng, shape, model: rng.standard_normal(shape).astype(np.float32),
    },
    # denoised latents as the pipeline hands them to the decoder: unit variance, divided by the scaling factor
    Component.VAE_DECODER: {"latent_sample": lambda rng, shape, model: (rng.standard_normal(shape) / model.vae_scaling_factor).astype(np.float32)},
    # images in [-1, 1]
    Component.VAE_ENCODER: {"sample": lambda rng, shape, model: rng.uniform(-1.0, 1.0, shape).astype(np.float32)},
}
PROBE_SEED = 0
#: the builder flag each reduced precision sets (fp32 sets none, and clears TF32)
_PRECISION_FLAGS = {Precision.FP16: "FP16", Precision.BF16: "BF16"}


class EngineCompiler(Protocol):
    """Builds and runs engines in one environment: TensorRTCompiler on a GPU; fakes in tests."""

    environment: BuildEnvironment

    def compile(self, onnx_path: Path, shapes: Mapping[str, ShapeRange], precision: Precision, refittable: bool, timing_cache: Path) -> Any:
        """A serialised engine (bytes or a buffer) for the ONNX at `onnx_path`, updating the timing cache file."""

    def run(self, plan: Any, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """Run a serialised engine once on `feeds`."""


def builder_unavailable_reason() -> str | None:
    """None if engines can be built on this machine, else what is missing (one sentence): tensorrt or cuda-python
    (with the command that installs them), or a CUDA device. Cheap: asked before minutes of export or building."""
    return libraries_unavailable_reason() or cuda_device_unavailable_reason()


class TensorRTCompiler:
    """EngineCompiler with TensorRT on the current GPU; raise BackendUnavailableError if tensorrt, cuda-python or
    the GPU is missing."""

    def __init__(self) -> None:
        reason = builder_unavailable_reason()
        if reason is not None:
            raise BackendUnavailableError(reason)
        self._trt = tensorrt()
        self.environment = current_environment()

    def compile(self, onnx_path: Path, shapes: Mapping[str, ShapeRange], precision: Precision, refittable: bool, timing_cache: Path) -> Any:
        trt = self._trt
        builder = trt.Builder(trt_logger())
        network = builder.create_network(0)  # explicit batch: TensorRT 10's only mode
        parser = trt.OnnxParser(network, trt_logger())
        # From the path, not bytes: the parser finds external weights (model.onnx.data) beside the file.
        if not parser.parse_from_file(str(onnx_path)):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise EngineBuildError(f"TensorRT cannot parse {onnx_path}: {errors}")
        config = builder.create_builder_config()
        if precision in _PRECISION_FLAGS:
            config.set_flag(getattr(trt.BuilderFlag, _PRECISION_FLAGS[precision]))
        else:
            config.clear_flag(trt.BuilderFlag.TF32)  # fp32 means fp32: comparable with the CPU backends
        if refittable:
            config.set_flag(trt.BuilderFlag.REFIT)  # weights can be swapped later (LoRA) without a rebuild
        profile = builder.create_optimization_profile()
        for name, shape in shapes.items():
            profile.set_shape(name, shape.min, shape.opt, shape.max)
        add_optimization_profile(config, profile, shapes, onnx_path)
        set_timing_cache(config, timing_cache)
        plan = builder.build_serialized_network(network, config)
        if plan is None:
            raise EngineBuildError(
                f"TensorRT could not build an engine from {onnx_path} (see the sdrt.engine.backends.tensorrt.trt log)"
            )
        with atomic_file(timing_cache) as staging:
            staging.write_bytes(config.get_timing_cache().serialize())
        return plan

    def run(self, plan: Any, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        return EngineRunner(plan, Stream(), capture_graphs=False).run(feeds)


def add_optimization_profile(config: Any, profile: Any, shapes: Mapping[str, ShapeRange], onnx_path: Path) -> None:
    """Add `profile` to the builder `config`; raise EngineBuildError naming the shapes if TensorRT finds it invalid
    (it returns -1 rather than raising)."""
    if config.add_optimization_profile(profile) < 0:
        described = "; ".join(f"{name} min {s.min} opt {s.opt} max {s.max}" for name, s in shapes.items())
        raise EngineBuildError(f"TensorRT refused the optimization profile for {onnx_path} (invalid or inconsistent shapes): {described}")


def set_timing_cache(config: Any, timing_cache: Path) -> None:
    """Give the builder `config` the timing cache stored at `timing_cache` (empty if none); raise EngineBuildError if
    TensorRT refuses it (from another TensorRT version or GPU: delete the file to start a new one)."""
    cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache.is_file() else b"")
    if cache is None or not config.set_timing_cache(cache, ignore_mismatch=False):
        raise EngineBuildError(f"TensorRT refused the timing cache {timing_cache} (written by another TensorRT version or "
                               "GPU?): delete it and build again")


def build_engines(
    bundle_dir: str | os.PathLike,
    profile: EngineProfile | None = None,
    precision: Precision = Precision.FP16,
    refittable: bool = False,
    compiler: EngineCompiler | None = None,
) -> Path:
    """Build (or reuse) an engine for every component of the bundle at `bundle_dir`, for requests within `profile`
    (None: sdrt.engine.backends.tensorrt.engines.profile.default_profile of the bundle's model and this card's memory) in `precision`;
    `refittable` lets their weights be replaced later without a rebuild. Return the directory holding them.

    Raise BundleError if the bundle is missing or modified, InvalidArgumentError if `profile` does not suit its
    model, EngineBuildError if TensorRT fails or the bundle is read-only, BackendUnavailableError without a GPU and
    the gpu extra.
    """
    bundle_dir = Path(bundle_dir)
    manifest = read_manifest(bundle_dir)
    verify_files(bundle_dir, manifest)  # minutes of building deserve a bundle known to be intact
    if profile is None:
        device = cuda_device()  # the default batch is capped to what this card's memory holds
        profile = default_profile(manifest.model, None if device is None else device.memory_bytes)
    profile.validate_for(manifest.model)
    if not os.access(bundle_dir, os.W_OK):
        raise EngineBuildError(f"{bundle_dir} is read-only: TensorRT engines are stored in the bundle, under {CACHE_SUBDIR}")
    compiler = compiler if compiler is not None else TensorRTCompiler()
    store = EngineStore(bundle_dir, compiler.environment)
    logger.info("building TensorRT engines for %s: %s, %s%s, on %s", bundle_dir, profile.describe(), precision.value,
                ", refittable" if refittable else "", compiler.environment.describe())
    engines = {}
    for component, entry in manifest.components.items():
        if component in OPTIONAL_COMPONENTS:  # DeepCache's passes: the backend refuses DeepCache for now
            logger.info("%s: not built (DeepCache runs on the other backends only)", component.value)
            continue
        shapes = component_shapes(component, entry, manifest.model, profile, manifest.tokenizer.model_max_length)
        key = EngineKey(component, manifest.component_digest(component), compiler.environment, profile,
                        tuple(sorted(shapes.items())), precision, refittable)
        engines[component] = _build_engine(store, compiler, key, bundle_dir / entry.file, manifest.model)
    store.write_index(EngineIndex(compiler.environment, profile, precision, refittable, engines))
    return store.directory


def _build_engine(store: EngineStore, compiler: EngineCompiler, key: EngineKey, onnx_path: Path, model: ModelConfig) -> EngineKey:
    """Store an engine for `key`, or for its fp32 variant when fp16 overflows; return the key stored."""
    name = key.component.value
    checked = key.precision is Precision.FP16 and key.component in OVERFLOW_PROBES
    if checked and store.fp16_overflowed(key):
        logger.info("%s: kept in fp32 (its fp16 engine overflowed on a sample input when first built)", name)
        return _build_engine(store, compiler, key.with_precision(Precision.FP32), onnx_path, model)
    if store.has_engine(key):
        logger.info("%s: engine up to date (%s)", name, store.engine_path(key).name)
        return key
    logger.info("%s: building the %s engine", name, key.precision.value)
    started = time.perf_counter()
    shapes = dict(key.shapes)
    plan = compiler.compile(onnx_path, shapes, key.precision, key.refittable, store.timing_cache_path)
    logger.info("%s: built in %.0f s", name, time.perf_counter() - started)
    if checked:
        rng = np.random.default_rng(PROBE_SEED)
        probes = OVERFLOW_PROBES[key.component]
        feeds = {input_name: probes[input_name](rng, shape.opt, model) for input_name, shape in shapes.items()}
        if not all(np.isfinite(output).all() for output in compiler.run(plan, feeds)):
            logger.warning("%s: the fp16 engine returns NaN or infinity on a sample input (fp16 overflow): building it in fp32", name)
            store.mark_fp16_overflow(key)
            return _build_engine(store, compiler, key.with_precision(Precision.FP32), onnx_path, model)
    store.write_engine(key, plan)
    return key
