"""The int8 models of the `openvino-int8` backend: NNCF post-training quantization of the bundle's U-Net and VAE
decoder (int8_location.INT8_COMPONENTS), each calibrated on its inputs in the bundle's own runs (fp32 where they fit
the memory budget, else bf16), written into the bundle.

Needs openvino and nncf (`pip install 'sdrt[quantize]'`), not torch: it reads the bundle's ONNX.
"""
from __future__ import annotations

import dataclasses
import gc
import importlib.util
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

import sdrt.engine
from sdrt.engine.atomic import atomic_directory
from sdrt.engine.backends import backend_class
from sdrt.engine.backends.base import MemoryPolicy
from sdrt.engine.backends.openvino.backend import OpenVINOInt8Backend
from sdrt.engine.backends.openvino.cache import CACHE_SUBDIR, remove_entries_containing
from sdrt.engine.backends.openvino.int8_location import INT8_COMPONENTS, int8_model_file, int8_name_fragment
from sdrt.engine.errors import BackendUnavailableError, InvalidArgumentError
from sdrt.engine.host_memory import MemoryBudget, format_bytes, process_rss_bytes
from sdrt.engine.loading import component_files
from sdrt.engine.manifest import read_manifest
from sdrt.engine.memory_estimate import MemoryModel
from sdrt.engine.memory_return import handing_back_mapped_pages, return_freed_heap
from sdrt.engine.specs import Component
from sdrt.export.errors import ExportError

logger = logging.getLogger(__name__)

#: varied subjects, styles and lighting, so that the activation ranges cover more than one kind of image
CALIBRATION_PROMPTS = (
    "a photograph of an astronaut riding a horse",
    "a watercolor painting of a lighthouse on a cliff at sunset",
    "a close-up portrait of an old man with a grey beard, studio lighting",
    "a bowl of fruit on a wooden table, still life",
    "a futuristic city street at night with neon signs, rain",
    "a cartoon fox reading a book under a tree",
    "an aerial view of a snowy mountain range",
    "a red sports car parked in front of a modern house",
)


@dataclasses.dataclass(frozen=True)
class Calibration:
    """The runs whose inputs to the U-Net and the VAE decoder calibrate their quantization: `prompts` of
    CALIBRATION_PROMPTS, each for `num_inference_steps` steps at `size`² (None: the model's default size) with
    guidance as at inference. Each U-Net call is one sample (prompts x (steps + 1) with PNDM): a guided batch of 2,
    [uncond; cond] (sdrt.engine.guidance_batch), as the U-Net runs at inference; each run's final latents are one
    sample of the decoder's."""

    prompts: int = 4
    num_inference_steps: int = 10
    size: int | None = None
    guidance_scale: float = 7.5
    seed: int = 0

    def __post_init__(self) -> None:
        if not 1 <= self.prompts <= len(CALIBRATION_PROMPTS):
            raise InvalidArgumentError("prompts", f"must be in [1, {len(CALIBRATION_PROMPTS)}], got {self.prompts}")
        if self.num_inference_steps < 1:
            raise InvalidArgumentError("num_inference_steps", f"must be at least 1, got {self.num_inference_steps}")


#: the smallest calibration side `sdrt export` uses (its calibration runs at half the model's default side, but not
#: below this nor above the default): SD 1.5 at 256² took 6 min 39 s at a 4.89 GB peak (benchmarks/EXPORT.md), at
#: 512² about 8 min and 12.6 GB
EXPORT_CALIBRATION_MIN_SIDE = 256
#: the peak resident bytes of a quantization calibrated as `sdrt export` does, per byte of the U-Net's fp32 file:
#: SD 1.5, 4.89 GB for a 3.44 GB U-Net, rounded up
EXPORT_PEAK_BYTES_PER_UNET_FILE_BYTE = 1.6


@dataclasses.dataclass(frozen=True)
class CalibrationPipeline:
    """How the calibration runs load the bundle: a backend name and its memory policy."""

    backend: str
    memory: MemoryPolicy


#: in order of preference: fp32 (the numerics the fp32 model quantized from sees), all models kept loaded, then one at
#: a time; then bf16, half the weights' memory, whose U-Net inputs differ from fp32's by bf16's rounding only, which
#: activation ranges do not see (SDXL's fp32 runs need about 20 GiB even one model at a time)
CALIBRATION_PIPELINES = tuple(CalibrationPipeline(backend, memory) for backend in ("openvino-fp32", "openvino-bf16")
                              for memory in (MemoryPolicy.KEEP_LOADED, MemoryPolicy.ONE_AT_A_TIME))


def calibration_peak_bytes(bundle_dir: Path, calibration: Calibration, pipeline: CalibrationPipeline) -> int:
    """About this process's peak resident memory while `pipeline` runs `calibration`'s runs (text encoders, U-Net
    and VAE decoder). Raise BackendUnavailableError where its backend cannot run here."""
    manifest = read_manifest(Path(bundle_dir))
    backend = backend_class(pipeline.backend, Path(bundle_dir), component_files(Path(bundle_dir), manifest))
    components = [c for c in (Component.TEXT_ENCODER, Component.TEXT_ENCODER_2, *INT8_COMPONENTS) if c in manifest.components]
    model = MemoryModel.for_bundle(manifest, backend, process_rss_bytes() or 0, components, pipeline.memory)
    side = calibration.size or manifest.model.default_image_size
    return model.peak_bytes(side, side, 1, calibration.guidance_scale > 1)


def calibration_pipeline(bundle_dir: Path, calibration: Calibration, memory_budget: MemoryBudget = MemoryBudget()) -> CalibrationPipeline:
    """The first of CALIBRATION_PIPELINES that runs here and whose calibration runs fit `memory_budget`; raise
    ExportError saying what each needs where none does."""
    allowed, needs = memory_budget.resolve(), []
    for pipeline in CALIBRATION_PIPELINES:
        try:
            needed = calibration_peak_bytes(bundle_dir, calibration, pipeline)
        except BackendUnavailableError as exc:
            needs.append(f"{pipeline.backend} cannot run here ({exc})")
            continue
        if needed <= allowed:
            return pipeline
        needs.append(f"{pipeline.backend} {pipeline.memory.value} needs about {format_bytes(needed)}")
    raise ExportError(f"the int8 calibration runs at {calibration.size or 'the default size'} do not fit the memory budget "
                      f"({memory_budget.describe()}: {format_bytes(allowed)}): {'; '.join(needs)}")


def quantize_unavailable_reason() -> str | None:
    """None if the int8 models can be made and run here, else why not (one sentence)."""
    missing = [name for name in ("openvino", "nncf") if importlib.util.find_spec(name) is None]
    if missing:
        return f"the quantize extra is not installed ({', '.join(missing)} missing): pip install 'sdrt[quantize]'"
    reason = OpenVINOInt8Backend.unavailable_reason()
    return None if reason is None else f"the int8 models cannot run here: {reason}"


def export_calibration(bundle_dir: Path) -> Calibration:
    """The calibration `sdrt export` quantizes with: the default prompts and steps at half the model's default side
    (but at least EXPORT_CALIBRATION_MIN_SIDE, and at most the default)."""
    model = read_manifest(Path(bundle_dir)).model
    default = model.default_image_size
    side = max(default // 2, min(default, EXPORT_CALIBRATION_MIN_SIDE))
    multiple = model.vae_scale_factor * 8  # a side every U-Net level divides evenly
    return Calibration(size=max(multiple, side // multiple * multiple))


def export_quantization_peak_bytes(bundle_dir: Path) -> int:
    """About the peak resident memory of quantizing the bundle's models with `export_calibration` (the U-Net's: the
    decoder is quantized after it, and is far smaller)."""
    manifest = read_manifest(Path(bundle_dir))
    unet_file = Path(bundle_dir) / manifest.components[Component.UNET].file
    unet_bytes = sum(path.stat().st_size for path in unet_file.parent.iterdir() if path.is_file())
    return int(EXPORT_PEAK_BYTES_PER_UNET_FILE_BYTE * unet_bytes)


def quantize_after_export(bundle_dir: Path, memory_budget: MemoryBudget = MemoryBudget()) -> dict[Component, Path] | None:
    """The int8 models `sdrt export` makes by default, so that the bundle runs its fastest mode without another
    command: made with `export_calibration` where the quantize extra is installed, the CPU runs them and the
    quantization fits `memory_budget`; else say why once and leave the bundle to run in bf16. Return their paths, or
    None where they were skipped."""
    bundle_dir = Path(bundle_dir)
    reason = quantize_unavailable_reason()
    calibration = export_calibration(bundle_dir)
    if reason is None:
        needed, allowed = export_quantization_peak_bytes(bundle_dir), memory_budget.resolve()
        if needed > allowed:
            reason = f"it needs about {format_bytes(needed)} and the memory budget ({memory_budget.describe()}) is {format_bytes(allowed)}"
    if reason is None:
        try:
            pipeline = calibration_pipeline(bundle_dir, calibration, memory_budget)
        except ExportError as exc:
            reason = str(exc)
    if reason is not None:
        logger.warning("not quantizing to int8 (%s): the bundle runs in bf16; `sdrt quantize %s` quantizes it later",
                       reason, bundle_dir)
        return None
    logger.info("quantizing the U-Net and VAE decoder to int8, calibrated at %d² on %s (skip with --no-quantize)",
                calibration.size, pipeline.backend)
    return quantize_models(bundle_dir, calibration, memory_budget)


def quantize_models(bundle_dir: Path, calibration: Calibration = Calibration(),
                    memory_budget: MemoryBudget = MemoryBudget()) -> dict[Component, Path]:
    """Quantize the bundle's INT8_COMPONENTS to int8 and store each in the bundle (atomically, replacing an earlier
    one); return their paths. The openvino-int8 backend then runs them. The calibration runs load the bundle as
    `calibration_pipeline` chooses for `memory_budget`."""
    import openvino

    bundle_dir = Path(bundle_dir)
    pipeline = calibration_pipeline(bundle_dir, calibration, memory_budget)
    sources, samples = _calibration_samples(bundle_dir, calibration, pipeline)
    written = {}
    for component in INT8_COMPONENTS:
        path, digest = sources[component]
        logger.info("quantizing the %s on %d calibration samples", component.value, len(samples[component]))
        # OpenVINO maps the model's weights from the bundle and NNCF compiles a copy of them: hand the mapped pages
        # back as they are read, so the two copies are not resident together.
        with handing_back_mapped_pages(bundle_dir):
            quantized = _quantize(openvino.Core().read_model(str(path)), samples.pop(component))
        target = int8_model_file(bundle_dir, component, digest)
        with atomic_directory(target.parent, replace=True) as staging:
            openvino.save_model(quantized, str(staging / target.name), compress_to_fp16=True)
        # what the backend converted and compiled from the model replaced: its names would not change
        remove_entries_containing(bundle_dir / CACHE_SUBDIR, int8_name_fragment(digest))
        del quantized  # before the next model is quantized
        written[component] = target
    return written


def _quantize(model: Any, samples: list[dict[str, np.ndarray]]) -> Any:
    """NNCF's post-training int8 quantization of `model` (a U-Net or VAE decoder), calibrated on `samples`."""
    import nncf

    return nncf.quantize(
        model, nncf.Dataset(samples), subset_size=len(samples),
        model_type=nncf.ModelType.TRANSFORMER,  # keeps softmax, normalizations and the attention scores in float
        advanced_parameters=nncf.AdvancedQuantizationParameters(
            # As OpenVINO's Stable Diffusion quantization does; SmoothQuant is for LLMs' outlier channels.
            smooth_quant_alphas=nncf.AdvancedSmoothQuantParameters(convolution=-1, matmul=-1),
            # Bias correction re-runs the model layer by layer: with it the full U-Net takes far longer to quantize.
            disable_bias_correction=True,
        ),
    )


def _calibration_samples(bundle_dir: Path, calibration: Calibration, pipeline: CalibrationPipeline
                         ) -> tuple[dict[Component, tuple[Path, str]], dict[Component, list[dict[str, np.ndarray]]]]:
    """Each of INT8_COMPONENTS' file and digest, and its inputs in the calibration runs of the bundle loaded as
    `pipeline`. The pipeline is released (its compiled models and their heap) before this returns: NNCF then
    compiles a copy of its own."""
    pipe = sdrt.engine.load(bundle_dir, backend=pipeline.backend, safety_checker=False, memory=pipeline.memory)
    samples = _recorded_inputs(pipe, calibration)
    sources = {component: (pipe.backend.components[component].path, pipe.backend.components[component].digest)
               for component in INT8_COMPONENTS}
    del pipe
    gc.collect()  # the pipeline's reference cycles
    return_freed_heap()
    return sources, samples


def _recorded_inputs(pipe: Any, calibration: Calibration) -> dict[Component, list[dict[str, np.ndarray]]]:
    """The inputs of every call of each of INT8_COMPONENTS in the calibration runs."""
    samples: dict[Component, list[dict[str, np.ndarray]]] = {component: [] for component in INT8_COMPONENTS}
    run = pipe.backend.run

    def recording_run(component: Component, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        if component in samples:
            samples[component].append({name: np.array(value) for name, value in feeds.items()})
        return run(component, feeds)

    pipe.backend.run = recording_run
    pipe.set_progress_bar_config(disable=True)
    try:
        prompts = CALIBRATION_PROMPTS[: calibration.prompts]
        for index, prompt in enumerate(tqdm(prompts, desc="calibrate int8", unit="run")):
            logger.debug("calibration run %d of %d: %r", index + 1, calibration.prompts, prompt)
            pipe(prompt, num_inference_steps=calibration.num_inference_steps, guidance_scale=calibration.guidance_scale,
                 height=calibration.size, width=calibration.size, seed=calibration.seed + index, output_type="np")
    finally:
        del pipe.backend.run
    return samples
