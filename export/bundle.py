"""Export a diffusers checkpoint (or a single-file one, converted first) to a self-contained sdrt bundle: ONNX models,
tokenizer, scheduler, manifest; LoRA files fused into its weights on the way."""
from __future__ import annotations

import dataclasses
import gc
import logging
import shutil
import tempfile
from collections.abc import Collection, Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from tqdm.auto import tqdm

from sdrt.engine.atomic import atomic_directory
from sdrt.engine.errors import InvalidArgumentError
from sdrt.engine.manifest import (
    FORMAT_VERSION,
    ComponentEntry,
    DeepCacheEntry,
    Fp16Entry,
    FusedLoraEntry,
    Manifest,
    ModelConfig,
    SafetyCheckerConfig,
    SdxlConfig,
    TensorEntry,
    TokenizerConfig,
    describe_files,
    sha256_file,
)
from sdrt.engine.refit_map import REFITTABLE_COMPONENTS, refit_map_file, write_refit_map
from sdrt.engine.specs import SPECS, Component, ComponentSpec
from sdrt.engine.version import SDRT_VERSION
from sdrt.export.source_checkpoint import (
    OPTIONAL_TOKENIZER_FILES,
    PREPROCESSOR_CONFIG_FILE,
    SCHEDULER_CONFIG_FILE,
    TOKENIZER_FILES,
    SourceCheckpoint,
    load_checkpoint,
    pad_token_of,
    with_tiny_vae,
)
from sdrt.export.deepcache import CacheBranch, FullPass, ShallowPass, add_feature_output, check_unet, feature_node
from sdrt.export.errors import ExportError
from sdrt.export.fp16_onnx import FP16_VALIDATION_RTOL, convert_to_fp16
from sdrt.export.graph_cleanup import clean_onnx, move_weights_to_data_file
from sdrt.export.quantize import quantize_after_export
from sdrt.export.lora_fusion import LoraSpec, fused_deltas
from sdrt.export.model_defaults import model_defaults
from sdrt.export.onnx_export import (
    OPSET, export_component, exported_inputs, run_torch, trace_inputs, traceable_model, validation_inputs,
)
from sdrt.export.refit_map import match_refit_map, parameter_fingerprints
from sdrt.export.single_file import convert_single_file, is_single_file, open_single_file

logger = logging.getLogger(__name__)

DEFAULT_MAX_IMAGE_SIZE = 2048
# ORT vs torch on the probe input, relative to the output's magnitude: fp32 kernels differ by ~1e-6.
_VALIDATION_RTOL = 1e-3
SAFETY_CONCEPTS_FILE = "safety_checker/concepts.npz"


def _onnxruntime_outputs(onnx_path: Path, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    # One run at a small shape: no layout rewrites or prepacked copies of the weights, no arena kept afterwards.
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.enable_cpu_mem_arena = False
    options.add_session_config_entry("session.disable_prepacking", "1")
    return ort.InferenceSession(str(onnx_path), sess_options=options, providers=["CPUExecutionProvider"]).run(None, inputs)


def _compare(
    component: Component, actual: Sequence[np.ndarray], expected: Sequence[np.ndarray], rtol: float = _VALIDATION_RTOL,
    what: tuple[str, str] = ("ONNX", "torch"),
) -> float:
    """Max |actual - expected| over the outputs at the validation shape, where `what` names the two (by default the
    exported graph and torch); raise ExportError if they differ in number, shape or dtype, or an output by more than
    `rtol` of its magnitude."""
    name, reference = what
    if len(actual) != len(expected):
        raise ExportError(f"{component.value}: {name} has {len(actual)} outputs, {reference} {len(expected)}")
    max_abs_diff = 0.0
    for got, want in zip(actual, expected):
        if got.shape != want.shape or got.dtype != want.dtype:
            raise ExportError(f"{component.value}: {name} output {got.dtype} {got.shape} differs from {reference}'s {want.dtype} {want.shape}")
        diff = float(np.max(np.abs(got - want)))
        tolerance = rtol * max(1.0, float(np.max(np.abs(want))))
        if not diff <= tolerance:  # NaN fails too
            raise ExportError(f"{component.value}: {name} output differs from {reference}'s by {diff:.3g} (tolerance {tolerance:.3g})")
        max_abs_diff = max(max_abs_diff, diff)
    logger.info("%s validated: max |%s - %s| = %.3g", component.value, name, reference, max_abs_diff)
    return max_abs_diff


def _shape_entries(spec: ComponentSpec, onnx_path: Path) -> tuple[tuple[TensorEntry, ...], tuple[TensorEntry, ...]]:
    """The traced graph's spec names and dtypes with the shapes the exported graph declares (ints fixed, names
    dynamic)."""
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    component = spec.component

    def entries(declared, specs) -> tuple[TensorEntry, ...]:
        dims = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in declared}
        missing = [t.name for t in specs if t.name not in dims]
        if missing:
            raise ExportError(f"{component.value}: exported graph lacks tensors {missing}")
        return tuple(
            TensorEntry(name=t.name, dtype=t.dtype, shape=tuple(axis if axis in t.dynamic_axes.values() else dim for axis, dim in zip(t.axes, dims[t.name])))
            for t in specs
        )

    return entries(graph.input, spec.inputs), entries(graph.output, spec.outputs)


def _write_safety_concepts(safety_checker: torch.nn.Module, path: Path) -> None:
    """The checker's concept data as plain arrays: the runtime scores images against them in numpy."""
    arrays = {
        "concept_embeds": safety_checker.concept_embeds,  # (17, P)
        "concept_thresholds": safety_checker.concept_embeds_weights,  # (17,)
        "special_care_embeds": safety_checker.special_care_embeds,  # (3, P)
        "special_care_thresholds": safety_checker.special_care_embeds_weights,  # (3,)
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **{name: tensor.detach().numpy().astype(np.float32) for name, tensor in arrays.items()})


def _export_one(source: SourceCheckpoint, component: Component, staging: Path, opset: int, fp16: bool) -> ComponentEntry:
    """Trace, clean and validate one component (and its fp16 variant if `fp16`), keeping only its own torch model in
    memory meanwhile."""
    spec = SPECS[component]
    raw_path = staging / "_traced" / spec.filename
    onnx_path = staging / spec.filename
    model = traceable_model(source, component)
    check_inputs = validation_inputs(source, component)
    reference = run_torch(model, check_inputs)
    traced = export_component(source, component, model, raw_path, opset=opset)
    if component is Component.SAFETY_CHECKER:
        _write_safety_concepts(model.model, staging / SAFETY_CONCEPTS_FILE)
    # names as diffusers (and so LoRA files) give them: the wrapper's `model` prefix left out
    fingerprints = parameter_fingerprints(model.model) if component in REFITTABLE_COMPONENTS else None
    del model  # a full-size U-Net is 3.4 GB (SDXL's 10 GB): free it before the graph is loaded for cleaning
    gc.collect()
    clean_onnx(raw_path, onnx_path)
    shutil.rmtree(staging / "_traced")
    refit_map = None
    if fingerprints is not None:
        refit_map = refit_map_file(component)
        write_refit_map(staging / refit_map, match_refit_map(fingerprints, onnx_path))
    inputs, outputs = _shape_entries(traced, onnx_path)
    onnx_output = _onnxruntime_outputs(onnx_path, check_inputs)
    max_abs_diff = _compare(component, onnx_output, reference)
    fp16_entry = None
    if fp16:
        convert_to_fp16(onnx_path, staging / spec.fp16_filename)
        fp16_output = _onnxruntime_outputs(staging / spec.fp16_filename, check_inputs)
        fp16_diff = _compare(component, fp16_output, onnx_output, FP16_VALIDATION_RTOL, ("fp16 variant", "fp32 model"))
        fp16_entry = Fp16Entry(file=spec.fp16_filename, max_abs_diff=fp16_diff)
    return ComponentEntry(file=spec.filename, inputs=inputs, outputs=outputs, opset=opset, export_max_abs_diff=max_abs_diff,
                          fp16=fp16_entry, refit_map=refit_map)


def _cache_branch(source: SourceCheckpoint, branch: int) -> CacheBranch:
    """DeepCache's `branch` of the checkpoint's U-Net; InvalidArgumentError if it has none such."""
    extra = exported_inputs(source, Component.UNET)[len(SPECS[Component.UNET].inputs):]
    if extra:
        raise InvalidArgumentError("deepcache_branch", "DeepCache's passes take the U-Net's sample, timestep and text context "
                                   f"only; this U-Net also takes {', '.join(t.name for t in extra)}")
    config = source.unet_config
    layers = config.get("layers_per_block", 2)
    if not isinstance(layers, int):
        raise InvalidArgumentError("deepcache_branch", f"needs a U-Net with one layers_per_block for every level, not {layers!r}")
    return CacheBranch.of(branch, len(config["block_out_channels"]), layers)


def _export_deepcache(source: SourceCheckpoint, branch: CacheBranch, staging: Path, opset: int) -> dict[Component, ComponentEntry]:
    """DeepCache's passes for `branch` (export/deepcache.py), after the U-Net: the full pass is the U-Net's graph with
    one more output, reading the U-Net's weights (moved to a data file where the graph held them); the shallow
    pass a trace of its own. Each is validated against torch, as every component is."""
    full, shallow = Component.UNET_DEEPCACHE_FULL, Component.UNET_DEEPCACHE_SHALLOW
    unet = source.load_model(Component.UNET)
    check_unet(unet)
    full_model, shallow_model = FullPass(unet, branch).eval(), ShallowPass(unet, branch).eval()
    traced, check = trace_inputs(source, Component.UNET), validation_inputs(source, Component.UNET)
    references = {full: run_torch(full_model, check)}  # (noise_pred, deep_feature)
    shallow_check = {**check, "deep_feature": references[full][1]}
    references[shallow] = run_torch(shallow_model, shallow_check)
    raw = staging / "_traced"
    export_component(source, full, full_model, raw / SPECS[full].filename, opset, inputs=traced)
    node = feature_node(raw / SPECS[full].filename)
    shutil.rmtree(raw)
    traced["deep_feature"] = run_torch(full_model, traced)[1]
    export_component(source, shallow, shallow_model, raw / SPECS[shallow].filename, opset, inputs=traced)
    del unet, full_model, shallow_model
    gc.collect()
    clean_onnx(raw / SPECS[shallow].filename, staging / SPECS[shallow].filename)
    shutil.rmtree(raw)
    unet_path = staging / SPECS[Component.UNET].filename
    move_weights_to_data_file(unet_path)
    add_feature_output(unet_path, node, references[full][1].shape[1], staging / SPECS[full].filename)
    entries = {}
    for component, inputs in ((full, check), (shallow, shallow_check)):
        onnx_path = staging / SPECS[component].filename
        outputs = _onnxruntime_outputs(onnx_path, inputs)
        max_abs_diff = _compare(component, outputs, references[component])
        inputs_entries, outputs_entries = _shape_entries(SPECS[component], onnx_path)
        entries[component] = ComponentEntry(file=SPECS[component].filename, inputs=inputs_entries, outputs=outputs_entries,
                                            opset=opset, export_max_abs_diff=max_abs_diff)
    return entries


def _model_config(source: SourceCheckpoint, max_image_size: int) -> ModelConfig:
    return ModelConfig(
        latent_channels=source.latent_channels,
        vae_scale_factor=source.vae_scale_factor,
        vae_scaling_factor=float(source.vae_config.get("scaling_factor", 0.18215)),
        sample_size=int(source.unet_config["sample_size"]),
        text_hidden_size=source.text_hidden_size,
        max_image_size=max_image_size,
        unet_in_channels=source.unet_in_channels,
        unet_block_out_channels=tuple(int(c) for c in source.unet_config["block_out_channels"]),
        unet_attention_heads=source.unet_attention_heads,
        vae_block_out_channels=tuple(int(c) for c in source.vae_config["block_out_channels"]),
        tiny_vae_scaling_factor=source.tiny_vae_scaling_factor,
    )


def _copy_configs(source: SourceCheckpoint, staging: Path) -> TokenizerConfig:
    """Tokenizer files (both tokenizers' for SDXL, the second's alone for a refiner), scheduler config and
    feature-extractor config, as the checkpoint ships them. Returns the first tokenizer's entry (a refiner's: the second's)."""
    first = "tokenizer" if source.has_text_encoder else "tokenizer_2"
    tokenizers = tuple(dict.fromkeys((first, *(("tokenizer_2",) if source.is_sdxl else ()))))
    names = [f"{tokenizer}/{name}" for tokenizer in tokenizers for name in TOKENIZER_FILES + OPTIONAL_TOKENIZER_FILES]
    names.append(SCHEDULER_CONFIG_FILE)
    if source.safety_checker_config is not None:
        names.append(PREPROCESSOR_CONFIG_FILE)
    for name in names:
        if (source.path / name).is_file():
            (staging / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source.path / name, staging / name)
    return TokenizerConfig(directory=first, model_max_length=source.text_max_length,
                           pad_token=pad_token_of(source.tokenizer_config))


def _sdxl_config(source: SourceCheckpoint) -> SdxlConfig | None:
    if not source.is_sdxl:
        return None
    config = source.tokenizer_2_config
    max_length = int(config.get("model_max_length", source.text_encoder_2_config.get("max_position_embeddings", 77)))
    tokenizer_2 = TokenizerConfig(directory="tokenizer_2", model_max_length=max_length, pad_token=pad_token_of(config))
    return SdxlConfig(tokenizer_2=tokenizer_2, force_zeros_for_empty_prompt=source.force_zeros_for_empty_prompt,
                      requires_aesthetics_score=source.requires_aesthetics_score)


def export_bundle(
    checkpoint: str | Path,
    out_dir: str | Path,
    *,
    force: bool = False,
    opset: int = OPSET,
    max_image_size: int = DEFAULT_MAX_IMAGE_SIZE,
    fp16_components: Collection[Component | str] = (),
    loras: Sequence[LoraSpec] = (),
    config: str | Path | None = None,
    scheduler: str | None = None,
    tiny_vae: str | Path | None = None,
    deepcache_branch: int | None = None,
    quantize: bool = False,
) -> Path:
    """Export the checkpoint at `checkpoint` to an sdrt bundle at `out_dir` and return its path.

    `checkpoint` is a diffusers checkpoint directory, or a single-file SD 1.x checkpoint (`.safetensors`, or `.ckpt`
    read with torch's weights-only loader only) in the original LDM layout, as model sites share them. A single file
    is read offline, with the configs sdrt writes for its detected architecture (export/random_checkpoint.py) or those in
    `config` (a diffusers checkpoint or config directory: unet/, vae/, text_encoder/); the manifest records its sha256.

    `loras` are fused into the U-Net and text-encoder weights, each's deltas times its scale, summed; the manifest
    records each file's name, sha256 and scale. Every LoRA is read and checked before any export work.

    The manifest records the model's generation defaults (steps, guidance, sampler: export/model_defaults.py), from
    the checkpoint's configs; `scheduler` (a sdrt.engine.schedulers.SCHEDULER_NAMES name) makes another sampler the
    bundle's default, e.g. "lcm" with an LCM-LoRA among `loras`, which then defaults to 4 steps without guidance.

    `tiny_vae`, a diffusers AutoencoderTiny directory (TAESD), is exported beside the VAE as the bundle's tiny decoder
    (requests choose it with decoder="tiny"); CheckpointError if it cannot decode this checkpoint's latents.

    `fp16_components` (e.g. sdrt.engine.specs.FP16_DEFAULT_COMPONENTS: text encoder and U-Net) also get an fp16
    variant with fp32 inputs and outputs, for the "cuda-fp16" backend, validated against the fp32 model and recorded
    in the manifest. Raise InvalidArgumentError if one is not a component of this checkpoint.

    `deepcache_branch` adds DeepCache's two U-Net passes for that branch (sdrt.engine.deepcache): the full pass is
    the U-Net's graph with one more output, reading the U-Net's weights (a U-Net that kept its weights in its graph
    gets them in a data file instead); the shallow pass holds the blocks above the branch only (branch 0: a few
    percent of the U-Net's weights). The export traces the U-Net twice more. InvalidArgumentError if the U-Net has
    no such branch.

    The bundle is built in a temporary directory beside `out_dir` and renamed into place only when complete and
    validated, so a failed or interrupted export leaves no partial bundle. An existing `out_dir` is refused unless
    `force` is true (it is then replaced only once the new bundle is complete).

    `quantize` then makes the bundle's int8 U-Net and VAE decoder (export/quantize.py, `quantize_after_export`), the
    fastest CPU mode, where the quantize extra is installed and it fits the memory budget; else it says why and leaves
    bf16. A failed quantization leaves the complete bundle.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not force:
        raise FileExistsError(f"{out_dir} already exists; pass force=True (CLI: --force) to replace it")
    checkpoint = Path(checkpoint)
    options = _ExportOptions(opset=opset, max_image_size=max_image_size, fp16_components=tuple(fp16_components), force=force,
                             scheduler=scheduler, tiny_vae=None if tiny_vae is None else Path(tiny_vae),
                             deepcache_branch=deepcache_branch)
    if not is_single_file(checkpoint):
        if config is not None:
            raise InvalidArgumentError("config", f"applies to single-file checkpoints (.safetensors, .ckpt) only, not {checkpoint}")
        source = load_checkpoint(checkpoint)
        if loras and not source.has_text_encoder:
            raise InvalidArgumentError("lora", f"{source.path} is an SDXL refiner (no first text encoder): fusing LoRA "
                                       "into a refiner is not supported yet")
        deltas, fused = fused_deltas(loras, source.path)
        bundle = _export(dataclasses.replace(source, weight_deltas=deltas), out_dir, options, fused)
        del source, deltas  # the checkpoint's weights, before quantization loads the bundle
        gc.collect()
    else:
        bundle = _export_single_file(checkpoint, out_dir, options, loras, config)
    if quantize:
        quantize_after_export(bundle)
    return bundle


def _export_single_file(checkpoint: Path, out_dir: Path, options: _ExportOptions, loras: Sequence[LoraSpec],
                        config: str | Path | None) -> Path:
    """Convert the single-file `checkpoint` to a diffusers checkpoint beside `out_dir`, then export it."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # the converted checkpoint (fp32: 4 GB for SD 1.5) goes beside the bundle, on the disk chosen for it
    with tempfile.TemporaryDirectory(prefix=f".{out_dir.name}.single-file-", dir=out_dir.parent) as workdir:
        single = open_single_file(checkpoint.resolve(), Path(config).resolve() if config is not None else None, Path(workdir))
        deltas, fused = fused_deltas(loras, single.config_dir)
        source = load_checkpoint(convert_single_file(single, Path(workdir) / "checkpoint"))
        del single  # the file's tensors: the converted checkpoint holds them now
        gc.collect()
        return _export(dataclasses.replace(source, weight_deltas=deltas), out_dir, options, fused,
                       source_path=checkpoint.resolve(), source_sha256=sha256_file(checkpoint))


@dataclasses.dataclass(frozen=True)
class _ExportOptions:
    opset: int
    max_image_size: int
    fp16_components: tuple[Component | str, ...]
    force: bool
    scheduler: str | None = None  # the bundle's default sampler; None: the checkpoint's own
    tiny_vae: Path | None = None  # an AutoencoderTiny directory to export as the tiny decoder
    deepcache_branch: int | None = None


def _export(
    source: SourceCheckpoint,
    out_dir: Path,
    options: _ExportOptions,
    loras: tuple[FusedLoraEntry, ...],
    source_path: Path | None = None,
    source_sha256: str | None = None,
) -> Path:
    """Export the checked `source` to `out_dir`; `source_path` (default: the checkpoint directory) is recorded as
    where it came from."""
    if options.tiny_vae is not None:
        source = with_tiny_vae(source, options.tiny_vae)
    fp16 = _fp16_components(options.fp16_components, source.components)
    upcast = fp16 & {Component.VAE_DECODER, Component.VAE_ENCODER}
    if upcast and source.vae_config.get("force_upcast", False):
        logger.warning("the VAE's config sets force_upcast (it overflows fp16; diffusers runs it in fp32): the fp16 "
                       "variants of %s may give NaN images", ", ".join(sorted(c.value for c in upcast)))
    defaults = model_defaults(source, options.scheduler)
    branch = _cache_branch(source, options.deepcache_branch) if options.deepcache_branch is not None else None
    if source.safety_checker_config is None:
        logger.warning("%s has no safety checker: the bundle will report nsfw_content_detected = None", source_path or source.path)
    with atomic_directory(out_dir, replace=options.force) as staging:
        components = {
            component: _export_one(source, component, staging, options.opset, fp16=component in fp16)
            for component in tqdm(source.components, desc="export", unit="model")
        }
        deepcache = None
        if branch is not None:
            components.update(_export_deepcache(source, branch, staging, options.opset))
            deepcache = DeepCacheEntry(branch=branch.index, branches=branch.count)
        tokenizer = _copy_configs(source, staging)
        safety = None
        if source.safety_checker_config is not None:
            safety = SafetyCheckerConfig(concepts_file=SAFETY_CONCEPTS_FILE, preprocessor_config_file=PREPROCESSOR_CONFIG_FILE)
        Manifest(
            format_version=FORMAT_VERSION,
            sdrt_version=SDRT_VERSION,
            source_checkpoint=str(source_path or source.path),
            model=_model_config(source, options.max_image_size),
            tokenizer=tokenizer,
            scheduler_config_file=SCHEDULER_CONFIG_FILE,
            safety_checker=safety,
            components=components,
            files=describe_files(staging),
            source_sha256=source_sha256,
            loras=loras,
            defaults=defaults,
            deepcache=deepcache,
            sdxl=_sdxl_config(source),
        ).write(staging)
    logger.info("bundle written to %s", out_dir)
    return out_dir


def _fp16_components(requested: Collection[Component | str], available: tuple[Component, ...]) -> frozenset[Component]:
    """The requested components (names or Components), each checked to be one the checkpoint exports."""
    names = [c.value for c in available]
    chosen = set()
    for value in requested:
        try:
            component = Component(value)
        except ValueError:
            component = None
        if component not in available:
            raise InvalidArgumentError("fp16_components", f"{value!r} is not a component of this checkpoint; choose from {names}")
        chosen.add(component)
    return frozenset(chosen)
