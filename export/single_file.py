"""Single-file Stable Diffusion checkpoints (`.safetensors` / `.ckpt` as model sites share them) -> a diffusers
checkpoint directory, which the exporter then reads like any other.

The file holds the original LDM/CompVis layout (`model.diffusion_model.*` U-Net, `first_stage_model.*` VAE,
`cond_stage_model.transformer.*` CLIP text encoder) and no configs. diffusers' single-file loaders convert the
weights; the configs they would fetch from the Hub come from a local directory instead: by default one written from
sdrt's own description of the detected architecture (export/random_checkpoint.py), or one the caller gives.

`.ckpt` files are pickles, which can run code when loaded: they are only ever read with torch's weights-only
unpickler, and refused when they need more than tensors and plain containers.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import pickle
from pathlib import Path
from typing import Any

import torch

from sdrt.export.source_checkpoint import pad_token_of
from sdrt.export.random_checkpoint import (
    ARCHES,
    CLIP_VOCAB_SIZE,
    SD15_SCHEDULER_CONFIG,
    CheckpointArch,
    Models,
    save_checkpoint,
    write_config_directory,
)
from sdrt.export.errors import CheckpointError

logger = logging.getLogger(__name__)

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")
UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_ENCODER_PREFIX = "cond_stage_model.transformer."
# Keys that name the layouts of other model families, which sdrt does not export from single files.
_OTHER_FAMILIES = {
    "conditioner.embedders.": "an SDXL checkpoint (its two text encoders live under conditioner.embedders)",
    "cond_stage_model.model.": "a Stable Diffusion 2.x checkpoint (OpenCLIP text encoder under cond_stage_model.model)",
}
_PARTS = {UNET_PREFIX: "U-Net", VAE_PREFIX: "VAE", TEXT_ENCODER_PREFIX: "CLIP text encoder"}
# The architectures (export/checkpoints.ARCHES) that single files are recognised as, and so read without configs given.
SINGLE_FILE_ARCHES = ("sd15",)
_UNET_IN_KEY = f"{UNET_PREFIX}input_blocks.0.0.weight"
_TOKEN_EMBEDDING_KEY = f"{TEXT_ENCODER_PREFIX}text_model.embeddings.token_embedding.weight"


def _signature(arch: CheckpointArch) -> dict[str, tuple[int, ...]]:
    """The shapes by which a file shows its architecture: the U-Net's first conv and the token embedding."""
    return {
        _UNET_IN_KEY: (arch.unet_block_out_channels[0], arch.latent_channels, 3, 3),  # (C0, latent channels, 3, 3)
        _TOKEN_EMBEDDING_KEY: (CLIP_VOCAB_SIZE, arch.text_hidden_size),  # (vocab, hidden)
    }


def is_single_file(path: Path) -> bool:
    """Whether `path` names a single-file checkpoint (an existing `.safetensors` or `.ckpt` file)."""
    return path.is_file() and path.suffix.lower() in SINGLE_FILE_SUFFIXES


def _read_ckpt(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"{path}: refused: this .ckpt needs more than tensors to unpickle ({reason}). sdrt reads .ckpt files "
            "only with torch's weights-only loader, which runs no code from the file; use the model's .safetensors "
            "release, or convert the file with a tool you trust"
        ) from exc
    except Exception as exc:  # a malformed pickle raises anything from KeyError to struct.error
        raise CheckpointError(f"{path}: cannot read as a torch .ckpt file: {type(exc).__name__}: {exc}") from exc


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of the single-file checkpoint at `path` (Lightning's `state_dict` nesting removed); raise
    CheckpointError for an unreadable file or a .ckpt that the weights-only unpickler refuses."""
    if path.suffix.lower() == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            data: Any = load_file(str(path))
        except (OSError, SafetensorError) as exc:
            raise CheckpointError(f"{path}: cannot read as a .safetensors file: {exc}") from exc
    else:
        data = _read_ckpt(path)
    while isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: holds a {type(data).__name__}, not a state dict of tensors")
    return {key: value for key, value in data.items() if isinstance(key, str) and isinstance(value, torch.Tensor)}


def detect_arch(state_dict: dict[str, torch.Tensor], path: Path) -> str:
    """The name (in export/checkpoints.ARCHES) of the architecture whose configs fit this SD 1.x state dict. Raise
    CheckpointError for other model families (SDXL, SD 2.x, ...), missing parts, or SD 1.x layouts of other sizes
    (which need their configs given)."""
    check_layout(state_dict, path)
    for arch in SINGLE_FILE_ARCHES:
        if all(key in state_dict and tuple(state_dict[key].shape) == shape for key, shape in _signature(ARCHES[arch]).items()):
            return arch
    found = {key: tuple(state_dict[key].shape) if key in state_dict else None for key in (_UNET_IN_KEY, _TOKEN_EMBEDDING_KEY)}
    raise CheckpointError(f"{path} has the SD 1.x layout but not SD 1.x's sizes ({found}): pass the directory of its "
                          "diffusers configs (CLI: --config DIR)")


def check_layout(state_dict: dict[str, torch.Tensor], path: Path) -> None:
    """Raise CheckpointError unless the state dict holds a U-Net, VAE and CLIP text encoder in SD 1.x's LDM layout,
    naming the model family when its keys show another one (SDXL, SD 2.x)."""
    for prefix, family in _OTHER_FAMILIES.items():
        if any(key.startswith(prefix) for key in state_dict):
            raise CheckpointError(f"{path} is {family}: sdrt exports single files of Stable Diffusion 1.x only "
                                  "(other models: export their diffusers directory)")
    missing = [f"{name} ({prefix}*)" for prefix, name in _PARTS.items() if not any(k.startswith(prefix) for k in state_dict)]
    if missing:
        raise CheckpointError(f"{path} is not a Stable Diffusion 1.x checkpoint in the original (LDM) layout: "
                              f"no {', '.join(missing)} weights")


@dataclasses.dataclass(frozen=True)
class SingleFile:
    """A single-file checkpoint, read and checked, and the directory of diffusers configs it is loaded with."""

    path: Path
    state_dict: dict[str, torch.Tensor]
    config_dir: Path


def _unloaded(model: torch.nn.Module) -> list[str]:
    """Parameters and buffers left on the meta device: weights the file did not provide."""
    return [name for name, tensor in [*model.named_parameters(), *model.named_buffers()] if tensor.is_meta]


def _load_models(single: SingleFile) -> Models:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm
    from transformers import CLIPTextModel

    config, state_dict = str(single.config_dir), single.state_dict
    options = dict(config=config, local_files_only=True, torch_dtype=torch.float32)
    loaders = {
        "unet": lambda: UNet2DConditionModel.from_single_file(state_dict, subfolder="unet", **options),
        "vae": lambda: AutoencoderKL.from_single_file(state_dict, subfolder="vae", **options),
        "text_encoder": lambda: create_diffusers_clip_model_from_ldm(CLIPTextModel, state_dict, subfolder="text_encoder", **options),
    }
    models = {}
    for name, load in loaders.items():
        try:
            models[name] = load().eval()
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            raise CheckpointError(f"{single.path}: cannot load its {name} with the configs in {config}: {exc}") from exc
        missing = _unloaded(models[name])
        if missing:
            raise CheckpointError(f"{single.path}: its {name} lacks {len(missing)} weights of the configs in {config} "
                                  f"(first: {missing[:3]})")
    return Models(**models)


def _read_config(path: Path, default: dict[str, Any]) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else default
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from exc


def open_single_file(path: Path, config_dir: Path | None, workdir: Path) -> SingleFile:
    """Read and check the single-file checkpoint at `path`. Its configs: `config_dir` (a diffusers checkpoint or
    config directory: unet/, vae/, text_encoder/ configs; scheduler/ and tokenizer/ optional) if given, else the
    detected architecture's, written under `workdir`."""
    state_dict = read_state_dict(path)
    if config_dir is None:
        arch = detect_arch(state_dict, path)
        logger.info("%s: %s architecture", path, arch)
        config_dir = write_config_directory(ARCHES[arch], workdir / f"config-{arch}")
    else:
        check_layout(state_dict, path)
        required = [name for name in ("unet/config.json", "vae/config.json", "text_encoder/config.json") if not (config_dir / name).is_file()]
        if required:
            raise CheckpointError(f"config directory {config_dir} lacks {', '.join(required)}")
    return SingleFile(path=path, state_dict=state_dict, config_dir=config_dir)


def convert_single_file(single: SingleFile, out_dir: Path) -> Path:
    """Write `single` as a diffusers checkpoint directory at `out_dir` (fp32, laid out as export/random_checkpoint.py
    writes checkpoints); return its path."""
    models = _load_models(single)
    pad_token = pad_token_of(_read_config(single.config_dir / "tokenizer/tokenizer_config.json", {}))
    scheduler_config = _read_config(single.config_dir / "scheduler/scheduler_config.json", SD15_SCHEDULER_CONFIG)
    save_checkpoint(out_dir, models, pad_token=pad_token, scheduler_config=scheduler_config)
    logger.info("%s converted to a diffusers checkpoint at %s", single.path, out_dir)
    return out_dir
