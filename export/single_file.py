"""Single-file Stable Diffusion checkpoints (`.safetensors` / `.ckpt` as model sites share them) -> a diffusers
checkpoint directory, which the exporter then reads like any other.

The file holds the original layout and no configs: SD 1.x's LDM/CompVis one (`model.diffusion_model.*` U-Net,
`first_stage_model.*` VAE, `cond_stage_model.transformer.*` CLIP text encoder) or SDXL base's SGM one (the same U-Net
and VAE prefixes, the CLIP ViT-L text encoder under `conditioner.embedders.0.transformer.*`, the OpenCLIP ViT-bigG one
under `conditioner.embedders.1.model.*`). diffusers' single-file loaders convert the weights; the configs they would
fetch from the Hub come from a local directory instead: by default one written from sdrt's own description of the
detected architecture (export/random_checkpoint.py), or one the caller gives.

`.ckpt` files are pickles, which can run code when loaded: they are only ever read with torch's weights-only
unpickler, and refused when they need more than tensors and plain containers.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import pickle
from collections.abc import Callable, Mapping
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
    SdxlArch,
    SdxlModels,
    save_checkpoint,
    save_sdxl_checkpoint,
    write_config_directory,
)
from sdrt.export.errors import CheckpointError

logger = logging.getLogger(__name__)

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")
UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_ENCODER_PREFIX = "cond_stage_model.transformer."
SDXL_TEXT_ENCODER_PREFIX = "conditioner.embedders.0.transformer."
SDXL_TEXT_ENCODER_2_PREFIX = "conditioner.embedders.1.model."
_SDXL_PREFIX = "conditioner.embedders."
# Keys that name the layouts of other model families, which sdrt does not export from single files.
_OTHER_FAMILIES = {
    "conditioner.embedders.0.model.": "an SDXL refiner checkpoint (its one OpenCLIP text encoder under conditioner.embedders.0.model)",
    "cond_stage_model.model.": "a Stable Diffusion 2.x checkpoint (OpenCLIP text encoder under cond_stage_model.model)",
}
_UNET_IN_KEY = f"{UNET_PREFIX}input_blocks.0.0.weight"


def _sd1_signature(arch: CheckpointArch) -> dict[str, tuple[int, ...]]:
    """The shapes by which an SD 1.x file shows its architecture: the U-Net's first conv and the token embedding."""
    return {
        _UNET_IN_KEY: (arch.unet_block_out_channels[0], arch.latent_channels, 3, 3),  # (C0, latent channels, 3, 3)
        f"{TEXT_ENCODER_PREFIX}text_model.embeddings.token_embedding.weight": (CLIP_VOCAB_SIZE, arch.text_hidden_size),  # (vocab, hidden)
    }


def _sdxl_signature(arch: SdxlArch) -> dict[str, tuple[int, ...]]:
    """The shapes by which an SDXL file shows its architecture: the U-Net's first conv, both token embeddings and the
    OpenCLIP encoder's pooled projection (stored (hidden, projection), the transpose of diffusers')."""
    return {
        _UNET_IN_KEY: (arch.unet_block_out_channels[0], arch.latent_channels, 3, 3),  # (C0, latent channels, 3, 3)
        f"{SDXL_TEXT_ENCODER_PREFIX}text_model.embeddings.token_embedding.weight": (CLIP_VOCAB_SIZE, arch.text_encoder.hidden_size),
        f"{SDXL_TEXT_ENCODER_2_PREFIX}token_embedding.weight": (CLIP_VOCAB_SIZE, arch.text_encoder_2.hidden_size),  # (vocab, hidden)
        f"{SDXL_TEXT_ENCODER_2_PREFIX}text_projection": (arch.text_encoder_2.hidden_size, arch.text_encoder_2.projection_dim),
    }


@dataclasses.dataclass(frozen=True)
class Layout:
    """How one model family's single files name their models, and the architectures (export/random_checkpoint.ARCHES)
    they are recognised as, and so read without configs given."""

    family: str
    name: str
    parts: Mapping[str, str]  # key prefix -> the model under it
    models: tuple[str, ...]  # the diffusers models it holds: the folders its config directory must have
    arches: tuple[str, ...]
    signature: Callable[[Any], dict[str, tuple[int, ...]]]  # arch -> key -> shape

    @property
    def is_sdxl(self) -> bool:
        return "text_encoder_2" in self.models


SD1_LAYOUT = Layout(
    family="Stable Diffusion 1.x", name="original (LDM)",
    parts={UNET_PREFIX: "U-Net", VAE_PREFIX: "VAE", TEXT_ENCODER_PREFIX: "CLIP text encoder"},
    models=("unet", "vae", "text_encoder"), arches=("sd15",), signature=_sd1_signature,
)
SDXL_LAYOUT = Layout(
    family="Stable Diffusion XL base", name="original (SGM)",
    parts={UNET_PREFIX: "U-Net", VAE_PREFIX: "VAE", SDXL_TEXT_ENCODER_PREFIX: "CLIP ViT-L text encoder",
           SDXL_TEXT_ENCODER_2_PREFIX: "OpenCLIP ViT-bigG text encoder"},
    models=("unet", "vae", "text_encoder", "text_encoder_2"), arches=("sdxl",), signature=_sdxl_signature,
)


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
    """The name (in export/random_checkpoint.ARCHES) of the architecture whose configs fit this SD 1.x or SDXL base
    state dict. Raise CheckpointError for other model families (SD 2.x, SDXL refiner, ...), missing parts, or layouts
    of other sizes (which need their configs given)."""
    layout = check_layout(state_dict, path)
    for arch in layout.arches:
        signature = layout.signature(ARCHES[arch])
        if all(key in state_dict and tuple(state_dict[key].shape) == shape for key, shape in signature.items()):
            return arch
    found = {key: tuple(state_dict[key].shape) if key in state_dict else None for key in layout.signature(ARCHES[layout.arches[0]])}
    raise CheckpointError(f"{path} has the {layout.family} layout but not the sizes of {' or '.join(layout.arches)} "
                          f"({found}): pass the directory of its diffusers configs (CLI: --config DIR)")


def check_layout(state_dict: dict[str, torch.Tensor], path: Path) -> Layout:
    """The layout of the state dict: SD 1.x's LDM one, or SDXL base's SGM one (`conditioner.embedders.*` keys).
    Raise CheckpointError unless it holds every model of that layout, naming the model family when its keys show
    one sdrt does not read (SD 2.x, SDXL refiner)."""
    for prefix, family in _OTHER_FAMILIES.items():
        if any(key.startswith(prefix) for key in state_dict):
            raise CheckpointError(f"{path} is {family}: sdrt exports single files of Stable Diffusion 1.x and SDXL base "
                                  "only (other models: export their diffusers directory)")
    layout = SDXL_LAYOUT if any(key.startswith(_SDXL_PREFIX) for key in state_dict) else SD1_LAYOUT
    missing = [f"{name} ({prefix}*)" for prefix, name in layout.parts.items() if not any(k.startswith(prefix) for k in state_dict)]
    if missing:
        raise CheckpointError(f"{path} is not a {layout.family} checkpoint in the {layout.name} layout: "
                              f"no {', '.join(missing)} weights")
    return layout


@dataclasses.dataclass(frozen=True)
class SingleFile:
    """A single-file checkpoint, read and checked, and the directory of diffusers configs it is loaded with."""

    path: Path
    state_dict: dict[str, torch.Tensor]
    config_dir: Path
    layout: Layout


def _unloaded(model: torch.nn.Module) -> list[str]:
    """Parameters and buffers left on the meta device: weights the file did not provide."""
    return [name for name, tensor in [*model.named_parameters(), *model.named_buffers()] if tensor.is_meta]


def _load_models(single: SingleFile) -> Models | SdxlModels:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    config, state_dict = str(single.config_dir), single.state_dict
    options = dict(config=config, local_files_only=True, torch_dtype=torch.float32)
    loaders = {
        "unet": lambda: UNet2DConditionModel.from_single_file(state_dict, subfolder="unet", **options),
        "vae": lambda: AutoencoderKL.from_single_file(state_dict, subfolder="vae", **options),
        # diffusers tells the two SDXL encoders apart by their widths, the OpenCLIP one's under its own prefix
        "text_encoder": lambda: create_diffusers_clip_model_from_ldm(CLIPTextModel, state_dict, subfolder="text_encoder", **options),
        "text_encoder_2": lambda: create_diffusers_clip_model_from_ldm(CLIPTextModelWithProjection, state_dict,
                                                                       subfolder="text_encoder_2", **options),
    }
    models = {}
    for name in single.layout.models:
        try:
            models[name] = loaders[name]().eval()
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            raise CheckpointError(f"{single.path}: cannot load its {name} with the configs in {config}: {exc}") from exc
        missing = _unloaded(models[name])
        if missing:
            raise CheckpointError(f"{single.path}: its {name} lacks {len(missing)} weights of the configs in {config} "
                                  f"(first: {missing[:3]})")
    return SdxlModels(**models) if single.layout.is_sdxl else Models(**models)


def _read_config(path: Path, default: dict[str, Any] | None) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else default
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from exc


def open_single_file(path: Path, config_dir: Path | None, workdir: Path) -> SingleFile:
    """Read and check the single-file checkpoint at `path`. Its configs: `config_dir` (a diffusers checkpoint or
    config directory: unet/, vae/, text_encoder/ configs, and text_encoder_2/ for SDXL; scheduler/ and tokenizer/
    optional) if given, else the detected architecture's, written under `workdir`."""
    state_dict = read_state_dict(path)
    layout = check_layout(state_dict, path)
    if config_dir is None:
        arch = detect_arch(state_dict, path)
        logger.info("%s: %s architecture", path, arch)
        config_dir = write_config_directory(ARCHES[arch], workdir / f"config-{arch}")
    else:
        required = [f"{name}/config.json" for name in layout.models if not (config_dir / name / "config.json").is_file()]
        if required:
            raise CheckpointError(f"config directory {config_dir} lacks {', '.join(required)} ({path} is a "
                                  f"{layout.family} checkpoint)")
    return SingleFile(path=path, state_dict=state_dict, config_dir=config_dir, layout=layout)


def convert_single_file(single: SingleFile, out_dir: Path) -> Path:
    """Write `single` as a diffusers checkpoint directory at `out_dir` (fp32, laid out as export/random_checkpoint.py
    writes checkpoints); return its path."""
    models = _load_models(single)
    scheduler_path = single.config_dir / "scheduler/scheduler_config.json"
    if isinstance(models, SdxlModels):
        # the first tokenizer pads with the end-of-text token, as save_sdxl_checkpoint writes it
        pad_token_2 = pad_token_of(_read_config(single.config_dir / "tokenizer_2/tokenizer_config.json", {"pad_token": "!"}))
        save_sdxl_checkpoint(out_dir, models, pad_token_2=pad_token_2, scheduler_config=_read_config(scheduler_path, None))
    else:
        pad_token = pad_token_of(_read_config(single.config_dir / "tokenizer/tokenizer_config.json", {}))
        save_checkpoint(out_dir, models, pad_token=pad_token, scheduler_config=_read_config(scheduler_path, SD15_SCHEDULER_CONFIG))
    logger.info("%s converted to a diffusers checkpoint at %s", single.path, out_dir)
    return out_dir
