"""Export a diffusers checkpoint to a self-contained sdrt bundle: ONNX models, tokenizer, scheduler, manifest."""
from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tqdm.auto import tqdm

from sdrt.engine.atomic import atomic_directory
from sdrt.engine.manifest import FORMAT_VERSION, ComponentEntry, Manifest, ModelConfig, TensorEntry, TokenizerConfig, describe_files
from sdrt.engine.specs import SPECS, Component
from sdrt.engine.version import SDRT_VERSION
from sdrt.export.checkpoint import OPTIONAL_TOKENIZER_FILES, TOKENIZER_FILES, SourceCheckpoint, load_checkpoint
from sdrt.export.errors import ExportError
from sdrt.export.graph_cleanup import clean_onnx
from sdrt.export.onnx_export import OPSET, export_component, torch_reference, validation_inputs

logger = logging.getLogger(__name__)

EXPORTED_COMPONENTS = (Component.TEXT_ENCODER, Component.UNET, Component.VAE_DECODER, Component.VAE_ENCODER)
DEFAULT_MAX_IMAGE_SIZE = 2048
# ORT vs torch on the probe input, relative to the output's magnitude: fp32 kernels differ by ~1e-6.
_VALIDATION_RTOL = 1e-3
SCHEDULER_CONFIG_FILE = "scheduler/scheduler_config.json"


def _validate(checkpoint: SourceCheckpoint, component: Component, onnx_path: Path) -> float:
    """Run the exported graph at a shape other than the traced one and compare it with torch."""
    inputs = validation_inputs(checkpoint, component)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    actual = session.run(None, inputs)[0]
    expected = torch_reference(checkpoint, component, inputs)
    if actual.shape != expected.shape:
        raise ExportError(f"{component.value}: ONNX output shape {actual.shape} differs from torch's {expected.shape}")
    max_abs_diff = float(np.max(np.abs(actual - expected)))
    tolerance = _VALIDATION_RTOL * max(1.0, float(np.max(np.abs(expected))))
    if not max_abs_diff <= tolerance:
        raise ExportError(f"{component.value}: ONNX output differs from torch by {max_abs_diff:.3g} (tolerance {tolerance:.3g})")
    logger.info("%s validated: max |onnxruntime - torch| = %.3g", component.value, max_abs_diff)
    return max_abs_diff


def _shape_entries(checkpoint: SourceCheckpoint, component: Component, onnx_path: Path) -> tuple[tuple[TensorEntry, ...], tuple[TensorEntry, ...]]:
    """Spec names and dtypes with the shapes the exported graph declares (ints fixed, names dynamic)."""
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    spec = SPECS[component]

    def entries(declared, specs) -> tuple[TensorEntry, ...]:
        by_name = {d.name: d for d in declared}
        missing = [t.name for t in specs if t.name not in by_name]
        if missing:
            raise ExportError(f"{component.value}: exported graph lacks tensors {missing}")
        return tuple(
            TensorEntry(name=t.name, dtype=t.dtype, shape=tuple(axis if axis in t.dynamic_axes.values() else dim for axis, dim in zip(t.axes, by_name[t.name].shape)))
            for t in specs
        )

    return entries(session.get_inputs(), spec.inputs), entries(session.get_outputs(), spec.outputs)


def _model_config(checkpoint: SourceCheckpoint, max_image_size: int) -> ModelConfig:
    return ModelConfig(
        latent_channels=checkpoint.latent_channels,
        vae_scale_factor=checkpoint.vae_scale_factor,
        vae_scaling_factor=float(checkpoint.vae.config.scaling_factor),
        sample_size=int(checkpoint.unet.config.sample_size),
        text_hidden_size=int(checkpoint.text_encoder.config.hidden_size),
        max_image_size=max_image_size,
    )


def _copy_tokenizer_and_scheduler(checkpoint: SourceCheckpoint, staging: Path) -> TokenizerConfig:
    tokenizer_dir = staging / "tokenizer"
    tokenizer_dir.mkdir()
    for name in TOKENIZER_FILES + OPTIONAL_TOKENIZER_FILES:
        if (checkpoint.tokenizer_dir / name).is_file():
            shutil.copy2(checkpoint.tokenizer_dir / name, tokenizer_dir / name)
    (staging / SCHEDULER_CONFIG_FILE).parent.mkdir()
    shutil.copy2(checkpoint.path / SCHEDULER_CONFIG_FILE, staging / SCHEDULER_CONFIG_FILE)
    config = checkpoint.tokenizer_config
    pad_token = config.get("pad_token", "<|endoftext|>")
    if isinstance(pad_token, dict):  # some configs store AddedToken objects
        pad_token = pad_token["content"]
    return TokenizerConfig(directory="tokenizer", model_max_length=int(config.get("model_max_length", 77)), pad_token=pad_token)


def export_bundle(
    checkpoint: str | Path,
    out_dir: str | Path,
    *,
    force: bool = False,
    opset: int = OPSET,
    max_image_size: int = DEFAULT_MAX_IMAGE_SIZE,
) -> Path:
    """Export the diffusers checkpoint at `checkpoint` to an sdrt bundle at `out_dir` and return its path.

    The bundle is built in a temporary directory beside `out_dir` and renamed into place only when complete and
    validated, so a failed or interrupted export leaves no partial bundle. An existing `out_dir` is refused unless
    `force` is true (it is then replaced only once the new bundle is complete).
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not force:
        raise FileExistsError(f"{out_dir} already exists; pass force=True (CLI: --force) to replace it")
    source = load_checkpoint(checkpoint)
    with atomic_directory(out_dir, replace=force) as staging:
        raw_dir = staging / "_traced"
        components: dict[Component, ComponentEntry] = {}
        for component in tqdm(EXPORTED_COMPONENTS, desc="export", unit="model"):
            spec = SPECS[component]
            raw_path = raw_dir / spec.filename
            onnx_path = staging / spec.filename
            export_component(source, component, raw_path, opset=opset)
            clean_onnx(raw_path, onnx_path)
            shutil.rmtree(raw_path.parent)
            inputs, outputs = _shape_entries(source, component, onnx_path)
            components[component] = ComponentEntry(
                file=spec.filename, inputs=inputs, outputs=outputs, opset=opset,
                export_max_abs_diff=_validate(source, component, onnx_path),
            )
        raw_dir.rmdir()
        tokenizer = _copy_tokenizer_and_scheduler(source, staging)
        Manifest(
            format_version=FORMAT_VERSION,
            sdrt_version=SDRT_VERSION,
            source_checkpoint=str(source.path),
            model=_model_config(source, max_image_size),
            tokenizer=tokenizer,
            scheduler_config_file=SCHEDULER_CONFIG_FILE,
            components=components,
            files=describe_files(staging),
        ).write(staging)
    logger.info("bundle written to %s", out_dir)
    return out_dir
