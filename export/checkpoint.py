"""Read a diffusers-format Stable Diffusion 1.x/2.x checkpoint directory into torch modules and plain configs."""
from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextModel

from sdrt.export.errors import CheckpointError

logger = logging.getLogger(__name__)

TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json")
OPTIONAL_TOKENIZER_FILES = ("special_tokens_map.json",)
_REQUIRED = (
    "model_index.json",
    "unet/config.json",
    "vae/config.json",
    "text_encoder/config.json",
    "scheduler/scheduler_config.json",
    *(f"tokenizer/{name}" for name in TOKENIZER_FILES),
)


@dataclasses.dataclass(frozen=True)
class SourceCheckpoint:
    path: Path
    text_encoder: CLIPTextModel
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    scheduler_config: dict[str, Any]
    tokenizer_config: dict[str, Any]

    @property
    def tokenizer_dir(self) -> Path:
        return self.path / "tokenizer"

    @property
    def vae_scale_factor(self) -> int:
        # Each VAE block but the last halves the resolution (diffusers computes it the same way).
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.latent_channels)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from exc


def load_checkpoint(path: str | Path) -> SourceCheckpoint:
    """Load the text encoder, U-Net and VAE in fp32 on CPU, in eval mode, plus the scheduler and tokenizer configs."""
    path = Path(path).resolve()
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory {path} does not exist")
    missing = [name for name in _REQUIRED if not (path / name).is_file()]
    if missing:
        raise CheckpointError(
            f"{path} is not a diffusers Stable Diffusion checkpoint: missing {', '.join(missing)} "
            "(a real SD checkpoint ships tokenizer/vocab.json and tokenizer/merges.txt)"
        )
    logger.info("loading checkpoint %s", path)
    try:
        text_encoder = CLIPTextModel.from_pretrained(path / "text_encoder", torch_dtype=torch.float32)
        unet = UNet2DConditionModel.from_pretrained(path / "unet", torch_dtype=torch.float32)
        vae = AutoencoderKL.from_pretrained(path / "vae", torch_dtype=torch.float32)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot load the models of {path}: {exc}") from exc
    checkpoint = SourceCheckpoint(
        path=path,
        text_encoder=text_encoder.eval(),
        unet=unet.eval(),
        vae=vae.eval(),
        scheduler_config=_read_json(path / "scheduler/scheduler_config.json"),
        tokenizer_config=_read_json(path / "tokenizer/tokenizer_config.json"),
    )
    if checkpoint.unet.config.cross_attention_dim != checkpoint.text_encoder.config.hidden_size:
        raise CheckpointError(
            f"{path}: the U-Net's cross_attention_dim ({checkpoint.unet.config.cross_attention_dim}) differs from the "
            f"text encoder's hidden_size ({checkpoint.text_encoder.config.hidden_size})"
        )
    return checkpoint
