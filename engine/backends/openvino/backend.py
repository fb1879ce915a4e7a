"""OpenVINO on the CPU, reading the bundle's ONNX directly: bf16 (fast mode), fp32 (exact mode), or bf16 with an
int8 U-Net and VAE decoder made by `sdrt quantize`.

On CPUs with AVX-512 BF16 or AMX, bf16 inference halves the U-Net's time against fp32 at a small, reported loss
of accuracy (PSNR against the fp32 engine). Each component's model is rewritten before it compiles (`passes/`:
which rewrites, per precision, in `passes/registry.py`), and the U-Net and VAE decoder are compiled for static
shapes, which more rewrites need. Converted and compiled models are cached in the bundle (`cache.py`,
`compiled_models.py`): a later process loads the compiled models at `load()` and compiles nothing for the sizes run
before; the constants static-shape rewrites make are stored beside the compiled models (`constants.py`).
"""
from __future__ import annotations

import dataclasses
import enum
import functools
import logging
import os
import time
import weakref
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from sdrt.engine.atomic import atomic_directory
from sdrt.engine.backends.base import Backend, ComponentFile, MemoryPolicy, MemoryProfile, ModelLoad
from sdrt.engine.backends.openvino import cache, compiled_models
from sdrt.engine.backends.openvino.cache import CACHE_SUBDIR, COMPILED_SUBDIR, IR_FILE, IR_SUBDIR
from sdrt.engine.backends.openvino.constants import CONSTANTS_SUBDIR, ConstantStore, mapped_constants
from sdrt.engine.backends.openvino.int8_location import INT8_COMPONENTS, int8_model_file, int8_source_name
from sdrt.engine.backends.openvino.passes.guidance_prefix import share_guidance_prefix
from sdrt.engine.backends.openvino.passes.registry import (
    GRAPH_REWRITES, INT8_STATIC_SHAPE_REWRITES, STATIC_SHAPE_REWRITES, GraphRewrite, StaticShapeRewrite,
)
from sdrt.engine.errors import BundleError
from sdrt.engine.memory_return import handing_back_mapped_pages, return_freed_heap
from sdrt.engine.guidance_batch import REPEATED_INPUTS, halves_identical
from sdrt.engine.specs import DEEPCACHE_PASSES, SPECS, UNET_PASSES, Component

logger = logging.getLogger(__name__)


class CompileShapes(enum.Enum):
    """The input shapes a component's model is compiled for. Compiled for exact shapes, OpenVINO plans the
    intermediate buffers ahead and picks kernels for them: less memory and less time per call, at the price of a
    compilation whenever the shapes change."""

    #: any shapes, compiled once
    ANY = "any"
    #: each call's shapes, compiled again whenever they change: for models quick to compile
    EACH = "each"
    #: the first call's shapes; should they ever change, any shapes from then on (no model compiles twice over,
    #: however a server's batches vary). For large models. A later process loads the shapes used last at `load()`.
    FIRST = "first"


def _openvino() -> Any | None:
    try:
        import openvino
    except ImportError:
        return None
    return openvino


@functools.cache
def _environment() -> compiled_models.Environment:
    """What compiled models are keyed on besides the model: OpenVINO's version and this CPU."""
    openvino = _openvino()
    name = openvino.Core().get_property("CPU", "FULL_DEVICE_NAME")
    return compiled_models.Environment(openvino.__version__, name, tuple(sorted(_cpu_capabilities())))


@functools.cache
def _cpu_capabilities() -> frozenset[str] | None:
    """OpenVINO's optimisation capabilities of this CPU, or None without a CPU device; asked once per process
    (each query costs tens of milliseconds, and backend selection asks on every load)."""
    core = _openvino().Core()
    if "CPU" not in core.available_devices:
        return None
    return frozenset(core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"))


class _OpenVINOBackend(Backend):
    #: OpenVINO's INFERENCE_PRECISION_HINT
    precision: ClassVar[str]
    #: compile from an fp16-weight copy of the ONNX (cached in the bundle): bf16 inference loses nothing to it, and
    #: OpenVINO memory-maps the copy, so the fp32 weights never become resident
    fp16_weights: ClassVar[bool]
    #: the graph rewrites applied to each component's model, in order (passes.registry.GRAPH_REWRITES)
    rewrites: ClassVar[Mapping[Component, tuple[GraphRewrite, ...]]]
    #: the shapes each component is compiled for (CompileShapes.ANY where absent). The VAE decoder, whose activations
    #: outweigh its weights, for each request's: smaller planned buffers and faster calls, while a request of a new
    #: size pays a compilation (later processes find it in the compiled-model cache). The U-Net for its first shapes
    #: (a request's CFG batch and size): faster calls and less memory in every precision, at the same accuracy, and it
    #: lets the U-Net run its text-independent prefix once for both halves of the batch (passes/guidance_prefix.py).
    #: Compiled models are cached per set of shapes (compiled_models.py), and those of the shapes used last are loaded
    #: at `load()`: only the first process to run a size compiles for it (measurements: docs/design-notes.md).
    compile_shapes: ClassVar[Mapping[Component, CompileShapes]] = {
        Component.VAE_DECODER: CompileShapes.EACH, **{unet: CompileShapes.FIRST for unet in UNET_PASSES},
    }
    #: the static-shape rewrites of each component compiled for static shapes, in order
    #: (passes.registry.STATIC_SHAPE_REWRITES)
    static_shape_rewrites: ClassVar[Mapping[Component, tuple[StaticShapeRewrite, ...]]]

    @classmethod
    def unavailable_reason(cls) -> str | None:
        if _openvino() is None:
            return "openvino is not installed (pip install 'sdrt[openvino]')"
        if _cpu_capabilities() is None:
            return "OpenVINO finds no CPU device"
        return None

    def __init__(
        self, bundle_dir: Path, components: Mapping[Component, ComponentFile], memory: MemoryPolicy = MemoryPolicy.KEEP_LOADED
    ) -> None:
        super().__init__(bundle_dir, components, memory)
        self._core = _openvino().Core()
        # weak: with MemoryPolicy.ONE_AT_A_TIME the base class drops a model when the next loads, and it must go
        self._last_run: weakref.ref[_LoadedModel] | None = None
        # A bundle installed read-only simply converts and compiles on every load.
        self._cache_dir = self.bundle_dir / CACHE_SUBDIR if os.access(self.bundle_dir, os.W_OK) else None
        if self._cache_dir is not None:
            _remove_stale_cache_entries(self._cache_dir, self.components)
            self._compiled_budget_bytes = compiled_models.MAX_BYTES_PER_BUNDLE_BYTE * _bundle_bytes(self.bundle_dir)

    @classmethod
    def _converted_name(cls, component: Component, source: ComponentFile) -> str | None:
        """The cache directory of the component's converted model, or None where it compiles the bundle's file as is.
        The name carries what the conversion depends on: the source's digest and the rewrites."""
        return cache.converted_name(component, source.digest, cls.fp16_weights, (r.name for r in cls.rewrites.get(component, ())))

    @classmethod
    def _compiled_name(cls, component: Component, source: ComponentFile) -> str:
        """The cache directory of the component's compiled models (one per set of input shapes it is compiled for)."""
        static = cls._compiled_shapes(component) is not CompileShapes.ANY
        static_rewrites = cls.static_shape_rewrites.get(component, ()) if static else ()
        return cache.compiled_name(cls._source_name(component, source), (r.name for r in static_rewrites), cls.precision)

    @classmethod
    def _source_name(cls, component: Component, source: ComponentFile) -> str:
        """Names the model the component compiles from: its converted model, or the bundle's file."""
        return cls._converted_name(component, source) or cache.model_name(component, source.digest)

    @classmethod
    def _compiled_shapes(cls, component: Component) -> CompileShapes:
        return cls.compile_shapes.get(component, CompileShapes.ANY)

    def _model_file(self, component: Component) -> Any:
        """What to compile: the bundle's ONNX, or a converted copy in the cache (IR with fp16 weights for
        fp16_weights, after the component's rewrites), converted on first use and published atomically (concurrent
        loads and interrupted conversions never leave a partial model). A read-only bundle has no cache: its models
        are rewritten in memory on every load, and fp16 weights are skipped."""
        source = self.components[component]
        rewrites = self.rewrites.get(component, ())
        name = self._converted_name(component, source)
        if name is None:
            return str(source.path)
        if self._cache_dir is None:
            return self._converted(component) if rewrites else str(source.path)
        ir_dir = self._cache_dir / IR_SUBDIR / name
        if not (ir_dir / IR_FILE).is_file():
            logger.info("converting %s for OpenVINO (first load only)", component.value)
            try:
                with atomic_directory(ir_dir) as staging:
                    _openvino().save_model(self._converted(component), str(staging / IR_FILE), compress_to_fp16=self.fp16_weights)
            except OSError:  # FileExistsError included: another process published it first
                if not (ir_dir / IR_FILE).is_file():
                    raise
        return str(ir_dir / IR_FILE)

    def _converted(self, component: Component) -> Any:
        """The component's model after its graph rewrites, in memory."""
        source = self.components[component]
        model = self._core.read_model(str(source.path))
        for rewrite in self.rewrites.get(component, ()):
            logger.debug("%s: %s changed %d places", component.value, rewrite.name, rewrite.apply(model))
        return model

    def _load(self, component: Component) -> _LoadedModel:
        # A new stage is starting: the last one's buffers go before this model compiles, not after (in exact mode, the
        # VAE decoder's buffers still held while the safety checker compiled were the first request's peak).
        self._release_buffers_unless(None)
        model = _LoadedModel(component)
        if self._compiled_shapes(component) is CompileShapes.ANY:
            self._compile(model, None)
        return model

    def preload(self, components: frozenset[Component]) -> tuple[ModelLoad, ...]:
        """Load the compiled models the cache holds for these components: for static shapes, those of the shapes
        used last (a first request of other shapes compiles for its own, as it would have)."""
        if self._cache_dir is None or self.memory is MemoryPolicy.ONE_AT_A_TIME:
            return ()
        loads = len(self._model_loads)
        with self._lock:
            found = {}
            for component in components & self.components.keys() - self._loaded.keys():
                model_name = self._compiled_name(component, self.components[component])
                latest = compiled_models.latest_entry(self._compiled_dir(component), component, model_name, self.precision, _environment())
                if latest is not None:
                    found[component] = latest
            for component, (key, _) in sorted(_used_last(found).items(), key=lambda item: list(Component).index(item[0])):
                model = _LoadedModel(component, preloaded=key.shapes is not None)
                self._compile(model, key.shape_dict, key.guided_halves)
                self._loaded[component] = model
        return tuple(self._model_loads[loads:])

    def _compiled_dir(self, component: Component) -> Path:
        return self._cache_dir / COMPILED_SUBDIR / self._compiled_name(component, self.components[component])

    def _compile(self, model: _LoadedModel, shapes: dict[str, list[int]] | None, guided_halves: bool = False) -> None:
        """Compile `model`'s component for any input shapes (None) or for exactly `shapes`, replacing what it held;
        with `guided_halves` (static shapes only), for inputs whose guidance_batch.REPEATED_INPUTS have identical
        halves. Loaded from the cache's compiled model where it holds one (compiled_models.py), else compiled into it."""
        config = {"INFERENCE_PRECISION_HINT": self.precision, "PERFORMANCE_HINT": "LATENCY"}
        component = model.component
        guided_halves = guided_halves and shapes is not None
        model.compiled = model.request = None  # the previous shapes' model goes before the next one is built
        start, cpu_start = time.perf_counter(), time.process_time()
        from_cache = False
        if self._cache_dir is None:
            if shapes is None:
                source = self._model_file(component)
            else:
                source, guided_halves = self._static_model(component, shapes, guided_halves)
        else:
            key = compiled_models.CompiledKey.create(component, self._compiled_name(component, self.components[component]),
                                                     self.precision, shapes, guided_halves, _environment())
            entry = compiled_models.CompiledEntry.of(self._compiled_dir(component), key)
            complete = entry.complete(key)
            if shapes is None:
                source = self._model_file(component)
            else:
                if not entry.model_file.is_file():
                    static_model, halves = self._static_model(component, shapes, guided_halves)
                    entry.save_model(static_model, halves)
                    del static_model
                source, guided_halves = str(entry.model_file), entry.saved_guided_halves()
            entry.blob_dir.mkdir(parents=True, exist_ok=True)
            blobs = entry.blob_state()
            # Compiling from a path lets OpenVINO key its compiled-model cache on the file, not on a hash of the weights.
            config["CACHE_DIR"] = str(entry.blob_dir)
            if source.endswith(IR_FILE):
                # Weightless blobs: the compiled graph, its weights read from the IR when loaded. A full blob copies
                # them (SD 1.5's fp32 U-Net, over 2 GB, got none written at all); from ONNX, none would be written.
                config["CACHE_MODE"] = "OPTIMIZE_SIZE"
        # Compiling reads the mapped weights too; kept resident until the first inference, they were the first
        # request's peak in exact mode (the fp32 safety checker loading beside everything else).
        with handing_back_mapped_pages(self.bundle_dir):
            model.compiled = self._core.compile_model(source, "CPU", config)
        seconds = time.perf_counter() - start
        if self._cache_dir is not None:
            from_cache = complete and entry.blob_state() == blobs  # else OpenVINO compiled: its blob was unreadable
            if from_cache:
                entry.touch()
            else:
                entry.mark_complete(key, seconds)
                compiled_models.evict_least_recent(entry, self._compiled_budget_bytes)
        model.request = model.compiled.create_infer_request()
        model.shapes = shapes
        model.guided_halves = guided_halves
        model.weights_repacked = False
        load = ModelLoad(component, shapes, from_cache, seconds, time.process_time() - cpu_start)
        self._model_loads.append(load)
        logger.info("%s: %s", self.name, load.describe())

    def _static_model(self, component: Component, shapes: dict[str, list[int]], guided_halves: bool) -> tuple[Any, bool]:
        """The component's model reshaped to `shapes` after its static-shape rewrites, and whether the guidance-prefix
        rewrite applied (asked for with `guided_halves`)."""
        source = self._model_file(component)
        source = self._core.read_model(source) if isinstance(source, str) else source
        if guided_halves:
            # before reshaping: the rewrite keeps the batch dynamic (half of it runs the prefix)
            guided_halves = share_guidance_prefix(source, REPEATED_INPUTS[component]) > 0
        source.reshape(shapes)
        store = self._constant_store(component)
        for rewrite in self.static_shape_rewrites.get(component, ()):
            logger.debug("%s: %s changed %d places", component.value, rewrite.name, rewrite.apply(source, store))
        return source, guided_halves

    def _constant_store(self, component: Component) -> ConstantStore | None:
        """Where static-shape rewrites keep their constants: IR files in the component's compiled-model directory,
        which OpenVINO maps, so their pages are handed back once it has repacked them (held in the heap, they would
        stay resident beside the repacked copy). None for a read-only bundle."""
        if self._cache_dir is None:
            return None
        compiled_name = self._compiled_name(component, self.components[component])
        return functools.partial(mapped_constants, self._core, self._cache_dir / COMPILED_SUBDIR / compiled_name / CONSTANTS_SUBDIR)

    def _release_buffers_unless(self, model: _LoadedModel | None) -> None:
        """Release the intermediate buffers of the model that ran last, unless it is `model`.

        A request that moves on to its next stage (text encoder -> U-Net -> VAE decoder -> safety checker) does not
        need the previous model's buffers, sized for its largest inputs, until the next request reaches it. Kept, they
        add up across stages. Re-allocating them costs each stage's next call some page faults, once per request
        whatever the number of steps (measurements: docs/design-notes.md)."""
        previous = self._last_run() if self._last_run is not None else None
        if previous is not None and previous is not model:
            previous.compiled.release_memory()
            return_freed_heap()
            self._last_run = None

    def _infer(self, model: _LoadedModel, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        self._release_buffers_unless(model)
        self._last_run = weakref.ref(model)
        if model.compiled is None or model.shapes is not None:  # not compiled yet, or compiled for exact shapes
            shapes = {name: list(array.shape) for name, array in feeds.items()}
            repeated = REPEATED_INPUTS.get(model.component)
            guided_halves = repeated is not None and halves_identical(feeds, repeated)
            if shapes != model.shapes or (model.guided_halves and not guided_halves):
                first_shapes = self.compile_shapes[model.component] is CompileShapes.FIRST
                if model.compiled is not None and first_shapes and not model.preloaded:
                    change = f"new shapes {shapes}" if shapes != model.shapes else "a batch whose halves differ"
                    logger.info("%s: %s called with %s; compiling it for any shapes from now on",
                                self.name, model.component.value, change)
                    shapes = None
                logger.debug("%s: compiling %s for %s", self.name, model.component.value, shapes or "any shapes")
                self._compile(model, shapes, guided_halves and shapes is not None)
            model.preloaded = False  # the first call's shapes are now the model's: a change from them compiles for any
        request = model.request
        if model.weights_repacked:
            request.infer(dict(feeds))
        else:
            # The first inference repacks the weights, reading the mapped files (in the bundle or its cache) once;
            # their pages are handed back as it goes, so the two copies are never resident together. The few pages
            # read again later come back from the file, once per load.
            with handing_back_mapped_pages(self.bundle_dir):
                request.infer(dict(feeds))
            model.weights_repacked = True
        # The request's output buffers are overwritten by the next call: copy.
        return [request.get_output_tensor(i).data.copy() for i in range(len(request.model_outputs))]


@dataclasses.dataclass
class _LoadedModel:
    """A component's compiled model (None until the first call of a component compiled for exact shapes, unless
    preloaded), its infer request, the shapes it was compiled for (None: any), whether it was rewritten for
    classifier-free guidance batches (passes/guidance_prefix.py), and whether it has run once (its weights repacked)."""

    component: Component
    compiled: Any = None
    request: Any = None
    shapes: dict[str, list[int]] | None = None
    guided_halves: bool = False
    weights_repacked: bool = False
    #: loaded at `load()` for the shapes used last, before any call: the first call may still pick other shapes
    preloaded: bool = False


class OpenVINOBF16Backend(_OpenVINOBackend):
    name = "openvino-bf16"
    precision = "bf16"
    exact = False
    fp16_weights = True
    rewrites = GRAPH_REWRITES[precision]
    static_shape_rewrites = STATIC_SHAPE_REWRITES[precision]
    # Fitted as onnxruntime-cpu's (benchmarks/memory_estimate.py). OpenVINO fuses self-attention: no scores held.
    # Its compiled kernels (the runtime) take about the same whatever the model's size; weights end up in bf16, with
    # buffers and constants besides. A request of a new size compiles (the U-Net once, the decoder each time): the
    # weights' mapped pages between two hand-backs and the compiler's own (the fit: docs/design-notes.md).
    memory_profile = MemoryProfile(weights_per_file_byte=0.7, runtime_bytes=150 << 20, attention_scores=0.0,
                                   unet_feature_maps=60, decoder_feature_maps=2.5, decoder_pixel_values=40,
                                   request_bytes=32 << 20, compile_bytes_per_file_byte=0.25)

    @classmethod
    def unavailable_reason(cls) -> str | None:
        reason = super().unavailable_reason()
        if reason is None and "BF16" not in _cpu_capabilities():
            return "this CPU has no bf16 support (AVX-512 BF16 or AMX)"
        return reason


class OpenVINOFP32Backend(_OpenVINOBackend):
    name = "openvino-fp32"
    precision = "f32"
    exact = True
    fp16_weights = False
    rewrites = GRAPH_REWRITES[precision]
    static_shape_rewrites = STATIC_SHAPE_REWRITES[precision]
    # Fitted as bf16's; more than its fp32 files' weight at rest (Winograd's transformed weights, its planned
    # buffers), and Winograd tiles in the decoder's working memory. On the test bundles, not on SD 1.5, whose
    # exact-mode peak (benchmarks/MEMORY.md) suggests weights nearer 1x: recalibrate from a full-size run.
    memory_profile = MemoryProfile(weights_per_file_byte=1.6, runtime_bytes=150 << 20, attention_scores=0.0,
                                   unet_feature_maps=150, decoder_feature_maps=3.5, decoder_pixel_values=160,
                                   request_bytes=32 << 20, compile_bytes_per_file_byte=0.25)


class OpenVINOInt8Backend(OpenVINOBF16Backend):
    """The bf16 fast mode with the convolutions and matrix products of the U-Net and the VAE decoder in int8
    (AVX-512 VNNI runs twice as many int8 products per instruction as bf16), for faster calls
    (docs/design-notes.md). Quantizing activations changes images more than bf16 rounding does (see PSNR in the
    benchmark results), so it runs only for bundles whose int8 models were made, by `sdrt export` or `sdrt quantize`;
    "auto" then prefers it, as it prefers TensorRT where engines were built."""

    name = "openvino-int8"
    opt_in = True
    static_shape_rewrites = INT8_STATIC_SHAPE_REWRITES

    @classmethod
    def bundle_unavailable_reason(cls, bundle_dir: Path, components: Mapping[Component, ComponentFile]) -> str | None:
        missing = [component.value for component in INT8_COMPONENTS
                   if component not in components
                   or not int8_model_file(bundle_dir, component, components[component].digest).is_file()]
        if missing:
            return f"the bundle has no int8 {' or '.join(missing)}: run `sdrt quantize {bundle_dir}` (quantize extra) first"
        return None

    @classmethod
    def _converted_name(cls, component: Component, source: ComponentFile) -> str | None:
        # DeepCache's full pass is the int8 U-Net with the feature as a second output (the pass's file shares the
        # U-Net's directory, hence its digest: the int8 U-Net it reads is keyed on that digest too)
        if component is Component.UNET_DEEPCACHE_FULL:
            return int8_source_name(component, source.digest)
        return super()._converted_name(component, source)

    @classmethod
    def _source_name(cls, component: Component, source: ComponentFile) -> str:
        if component in INT8_COMPONENTS:
            return int8_source_name(component, source.digest)
        return super()._source_name(component, source)

    def _model_file(self, component: Component) -> Any:
        if component in INT8_COMPONENTS:
            return str(int8_model_file(self.bundle_dir, component, self.components[component].digest))
        if component is Component.UNET_DEEPCACHE_FULL and self._cache_dir is None:
            return self._converted(component)
        return super()._model_file(component)

    def _converted(self, component: Component) -> Any:
        if component is not Component.UNET_DEEPCACHE_FULL:
            return super()._converted(component)
        source = self.components[component]
        model = self._core.read_model(str(int8_model_file(self.bundle_dir, Component.UNET, source.digest)))
        model.add_outputs([_feature_output(self._core.read_model(str(source.path)), model)])
        return model


_BACKENDS = (OpenVINOBF16Backend, OpenVINOFP32Backend, OpenVINOInt8Backend)

#: the U-Net's passes that serve different requests: the U-Net (requests without DeepCache) and DeepCache's two
_UNET_ALTERNATIVES = (frozenset({Component.UNET}), DEEPCACHE_PASSES)


def _used_last(found: Mapping[Component, tuple[compiled_models.CompiledKey, float]]) -> dict[Component, tuple[compiled_models.CompiledKey, float]]:
    """`found` (the latest cache entry of each component, and when it was used) less the U-Net passes of every kind
    but the one used last of those the cache holds whole: a process that loaded both kinds would hold the U-Net's
    weights twice, mostly for nothing, and a kind with a pass missing would still compile it in its first request.
    (DeepCache's shallow pass runs unquantized, so an int8 process's DeepCache requests also refresh the bf16 backend's
    entry of it, beside no bf16 full pass.)"""
    whole = [kind for kind in _UNET_ALTERNATIVES if kind <= found.keys()]
    last = max(whole, key=lambda kind: max(found[component][1] for component in kind), default=frozenset())
    return {component: entry for component, entry in found.items() if component not in UNET_PASSES or component in last}


def _feature_output(full_pass: Any, unet: Any) -> Any:
    """The output of `unet` (a model of the same U-Net graph, e.g. quantized) that DeepCache's `full_pass` returns as
    its feature, named as the spec names it. The full pass's feature output is an Identity of a U-Net tensor
    (export/deepcache.py), whose name the quantized U-Net keeps."""
    feature = SPECS[Component.UNET_DEEPCACHE_FULL].outputs[1].name
    names = full_pass.output(feature).get_node().input_value(0).get_node().input_value(0).get_names()
    output = next((out for op in unet.get_ordered_ops() for out in op.outputs() if out.get_names() & names), None)
    if output is None:
        raise BundleError(f"the int8 U-Net has no tensor {sorted(names)}, which DeepCache's full pass returns as its feature")
    output.add_names({feature})
    return output


def _bundle_bytes(bundle_dir: Path) -> int:
    """The size of the bundle's own files, its caches (hidden directories) aside."""
    tops = [top for top in bundle_dir.iterdir() if not top.name.startswith(".")]
    return sum(path.stat().st_size for top in tops for path in (top.rglob("*") if top.is_dir() else [top]) if path.is_file())


def _remove_stale_cache_entries(cache_dir: Path, components: Mapping[Component, ComponentFile]) -> None:
    """Remove the cache's converted and compiled models of these components that no OpenVINO backend would read now."""
    current = {
        name
        for backend in _BACKENDS
        for component, source in components.items()
        for name in (backend._converted_name(component, source), backend._compiled_name(component, source))
    }
    cache.remove_stale_entries(cache_dir, components.keys(), current)
