"""Read a diffusers-format Stable Diffusion 1.x/2.x or SDXL (base or refiner) checkpoint directory: its configs up front,
its models on demand.

Models are loaded one at a time (`load_model`) so that exporting a full-size checkpoint keeps a single torch model
in memory next to its ONNX graph.
"""
from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sdrt.engine.specs import Component
from sdrt.export.errors import CheckpointError
from sdrt.export.lora_fusion import fuse_into

logger = logging.getLogger(__name__)

TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json")
OPTIONAL_TOKENIZER_FILES = ("special_tokens_map.json",)
PREPROCESSOR_CONFIG_FILE = "feature_extractor/preprocessor_config.json"
SCHEDULER_CONFIG_FILE = "scheduler/scheduler_config.json"
_REQUIRED = ("model_index.json", "unet/config.json", "vae/config.json", SCHEDULER_CONFIG_FILE)
#: the first text encoder and its tokenizer: every checkpoint's but an SDXL refiner's, which has the second only
_FIRST_TEXT_ENCODER = ("text_encoder/config.json", *(f"tokenizer/{name}" for name in TOKENIZER_FILES))
_MODEL_FOLDERS = {
    Component.TEXT_ENCODER: "text_encoder",
    Component.TEXT_ENCODER_2: "text_encoder_2",
    Component.UNET: "unet",
    Component.VAE_DECODER: "vae",
    Component.VAE_ENCODER: "vae",
    Component.SAFETY_CHECKER: "safety_checker",
}


@dataclasses.dataclass(frozen=True)
class SourceCheckpoint:
    path: Path
    text_encoder_config: dict[str, Any] | None  # None: an SDXL refiner, whose only text encoder is text_encoder_2
    unet_config: dict[str, Any]
    vae_config: dict[str, Any]
    safety_checker_config: dict[str, Any] | None  # None: the checkpoint has no (complete) safety checker
    scheduler_config: dict[str, Any]
    tokenizer_config: dict[str, Any]  # the first text encoder's tokenizer's (a refiner's: tokenizer_2's)
    # SDXL's second text encoder and tokenizer (text_encoder_2/, tokenizer_2/); None for SD 1.x/2.x
    text_encoder_2_config: dict[str, Any] | None = None
    tokenizer_2_config: dict[str, Any] | None = None
    # model_index.json: the pipeline's class and options (SDXL's force_zeros_for_empty_prompt, requires_aesthetics_score)
    pipeline_config: dict[str, Any] = dataclasses.field(default_factory=dict)
    # LoRA deltas fused into the models as they load (export/lora_fusion.py): component -> parameter -> delta
    weight_deltas: Mapping[Component, Mapping[str, np.ndarray]] = dataclasses.field(default_factory=dict)
    # a diffusers AutoencoderTiny directory exported beside the VAE (`with_tiny_vae`), and its config; None: none
    tiny_vae_path: Path | None = None
    tiny_vae_config: dict[str, Any] | None = None

    @property
    def vae_scale_factor(self) -> int:
        # Each VAE block but the last halves the resolution (diffusers computes it the same way).
        return 2 ** (len(self.vae_config["block_out_channels"]) - 1)

    @property
    def latent_channels(self) -> int:
        return int(self.vae_config.get("latent_channels", 4))

    @property
    def unet_in_channels(self) -> int:
        """The U-Net's input channels: the latent channels, or 2 * latent + 1 for an inpainting U-Net (checked at load)."""
        return int(self.unet_config.get("in_channels", self.latent_channels))

    @property
    def unet_time_cond_proj_dim(self) -> int | None:
        """The size of the guidance-scale embedding an LCM-distilled U-Net takes (`timestep_cond`); None for others."""
        dim = self.unet_config.get("time_cond_proj_dim")
        return None if dim is None else int(dim)

    @property
    def unet_attention_heads(self) -> tuple[int, ...]:
        """Self-attention heads at each U-Net resolution level, full latent size first, 0 where no block of the level
        attends: as diffusers' UNet2DConditionModel builds them (`num_attention_heads`, which older configs give as
        `attention_head_dim`; cross-attention blocks down and up; the mid block, at the smallest level)."""
        config = self.unet_config
        levels = len(config["block_out_channels"])
        heads = config.get("num_attention_heads") or config.get("attention_head_dim", 8)
        heads = [int(h) for h in heads] if isinstance(heads, (list, tuple)) else [int(heads)] * levels
        down = config.get("down_block_types", ("CrossAttnDownBlock2D",) * (levels - 1) + ("DownBlock2D",))
        up = list(reversed(config.get("up_block_types", ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (levels - 1))))
        mid = config.get("mid_block_type", "UNetMidBlock2DCrossAttn") or ""
        attends = [("CrossAttn" in down[i]) or ("CrossAttn" in up[i]) or (i == levels - 1 and "CrossAttn" in mid)
                   for i in range(levels)]
        return tuple(h if a else 0 for h, a in zip(heads, attends))

    @property
    def is_sdxl(self) -> bool:
        """Two text encoders and a U-Net with SDXL's added conditions ("text_time")."""
        return self.text_encoder_2_config is not None

    @property
    def has_text_encoder(self) -> bool:
        """Whether it has the first text encoder (text_encoder/): all but an SDXL refiner do."""
        return self.text_encoder_config is not None

    @property
    def requires_aesthetics_score(self) -> bool:
        """An SDXL refiner's U-Net: its size conditions end with an aesthetic score in place of the target size
        (model_index.json's requires_aesthetics_score, as diffusers' StableDiffusionXLImg2ImgPipeline reads it)."""
        return bool(self.pipeline_config.get("requires_aesthetics_score", False))

    @property
    def text_hidden_size(self) -> int:
        """The width of the U-Net's text context: the text encoder's hidden size, both encoders' for SDXL (their
        hidden states are concatenated), the second's alone for a refiner."""
        configs = (self.text_encoder_config, self.text_encoder_2_config)
        return sum(int(config["hidden_size"]) for config in configs if config is not None)

    @property
    def pooled_size(self) -> int:
        """SDXL: the width of the second text encoder's projected pooled embedding (the U-Net's `text_embeds`)."""
        return int(self.text_encoder_2_config["projection_dim"])

    @property
    def time_ids(self) -> int:
        """SDXL: how many size conditions the U-Net's `time_ids` holds (6: original size, crop's top left, target size;
        a refiner's 5: original size, crop's top left, aesthetic score), each embedded in addition_time_embed_dim
        channels beside the pooled embedding."""
        config = self.unet_config
        return (int(config["projection_class_embeddings_input_dim"]) - self.pooled_size) // int(config["addition_time_embed_dim"])

    @property
    def force_zeros_for_empty_prompt(self) -> bool:
        """SDXL's unconditional input without a negative prompt: zeros (diffusers' default) or the empty prompt's."""
        return bool(self.pipeline_config.get("force_zeros_for_empty_prompt", True))

    @property
    def text_max_length(self) -> int:
        encoder = self.text_encoder_config if self.has_text_encoder else self.text_encoder_2_config
        return int(self.tokenizer_config.get("model_max_length", encoder.get("max_position_embeddings", 77)))

    @property
    def components(self) -> tuple[Component, ...]:
        """The components this checkpoint can export, in pipeline order."""
        encoders = (((Component.TEXT_ENCODER,) if self.has_text_encoder else ())
                    + ((Component.TEXT_ENCODER_2,) if self.is_sdxl else ()))
        models = (*encoders, Component.UNET, Component.VAE_DECODER, Component.VAE_ENCODER)
        models += (Component.TINY_VAE_DECODER,) if self.tiny_vae_config is not None else ()
        return models + ((Component.SAFETY_CHECKER,) if self.safety_checker_config is not None else ())

    @property
    def tiny_vae_scaling_factor(self) -> float | None:
        """What the tiny autoencoder divides latents by before decoding (its config's, 1 for TAESD); None without one."""
        return None if self.tiny_vae_config is None else float(self.tiny_vae_config.get("scaling_factor", 1.0))

    def load_model(self, component: Component) -> torch.nn.Module:
        """The fp32 torch model behind `component`, freshly loaded on CPU in eval mode, with `weight_deltas` added."""
        from diffusers import AutoencoderKL, AutoencoderTiny, UNet2DConditionModel
        from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
        from transformers import CLIPTextModel, CLIPTextModelWithProjection

        model_class = {
            Component.TEXT_ENCODER: CLIPTextModel,
            Component.TEXT_ENCODER_2: CLIPTextModelWithProjection,
            Component.UNET: UNet2DConditionModel,
            Component.VAE_DECODER: AutoencoderKL,
            Component.VAE_ENCODER: AutoencoderKL,
            Component.SAFETY_CHECKER: StableDiffusionSafetyChecker,
            Component.TINY_VAE_DECODER: AutoencoderTiny,
        }[component]
        folder = self.tiny_vae_path if component is Component.TINY_VAE_DECODER else self.path / _MODEL_FOLDERS[component]
        try:
            model = model_class.from_pretrained(folder, torch_dtype=torch.float32).eval()
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"cannot load {folder}: {exc}") from exc
        fuse_into(model, self.weight_deltas.get(component, {}))
        return model


def with_tiny_vae(source: SourceCheckpoint, path: str | Path) -> SourceCheckpoint:
    """`source` with the diffusers AutoencoderTiny at `path` (TAESD for SD 1.x/2.x, TAESDXL for SDXL, as
    madebyollin/taesd and madebyollin/taesdxl ship them) to export as its tiny decoder; raise CheckpointError unless it
    is one that decodes this checkpoint's latents."""
    path = Path(path).resolve()
    config = _read_json(path / "config.json")
    if config.get("_class_name") != "AutoencoderTiny":
        raise CheckpointError(f"--tiny-vae {path}: config.json names {config.get('_class_name')!r}, not AutoencoderTiny "
                              "(a diffusers tiny autoencoder directory, such as madebyollin/taesd)")
    channels = int(config.get("latent_channels", 4))
    blocks = config.get("decoder_block_out_channels", (64, 64, 64, 64))
    scale_factor = int(config.get("upsampling_scaling_factor", 2)) ** (len(blocks) - 1)
    if (channels, scale_factor) != (source.latent_channels, source.vae_scale_factor):
        raise CheckpointError(
            f"--tiny-vae {path} decodes {channels}-channel latents upscaled {scale_factor}x, but {source.path}'s VAE "
            f"makes {source.latent_channels}-channel latents at 1/{source.vae_scale_factor} of the image: pick the tiny "
            "autoencoder of this model family (TAESD for SD 1.x/2.x, TAESDXL for SDXL)")
    return dataclasses.replace(source, tiny_vae_path=path, tiny_vae_config=config)


def pad_token_of(tokenizer_config: dict[str, Any]) -> str:
    """The pad token a tokenizer_config.json names ("<|endoftext|>" when it names none)."""
    pad_token = tokenizer_config.get("pad_token", "<|endoftext|>")
    if isinstance(pad_token, dict):  # some configs store AddedToken objects
        pad_token = pad_token["content"]
    return pad_token


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from exc


def _safety_checker_config(path: Path) -> dict[str, Any] | None:
    has_checker = (path / "safety_checker/config.json").is_file()
    has_extractor = (path / PREPROCESSOR_CONFIG_FILE).is_file()
    if has_checker != has_extractor:
        present, absent = ("safety_checker/", "feature_extractor/") if has_checker else ("feature_extractor/", "safety_checker/")
        raise CheckpointError(f"{path} has {present} but no {absent}: the safety checker needs both")
    return _read_json(path / "safety_checker/config.json") if has_checker else None


def _sdxl_configs(path: Path, index: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """SDXL's text_encoder_2 and tokenizer_2 configs, or None for an SD 1.x/2.x checkpoint."""
    if not (path / "text_encoder_2/config.json").is_file() and index.get("text_encoder_2") is None:
        return None
    missing = [name for name in ("text_encoder_2/config.json", *(f"tokenizer_2/{n}" for n in TOKENIZER_FILES))
               if not (path / name).is_file()]
    if missing:
        raise CheckpointError(f"{path} is an SDXL checkpoint ({index.get('_class_name')}) but lacks {', '.join(missing)}")
    return _read_json(path / "text_encoder_2/config.json"), _read_json(path / "tokenizer_2/tokenizer_config.json")


def _check_sdxl_unet(checkpoint: SourceCheckpoint) -> None:
    config = checkpoint.unet_config
    if config.get("addition_embed_type") != "text_time":
        raise CheckpointError(f"{checkpoint.path}: an SDXL checkpoint's U-Net takes addition_embed_type \"text_time\", "
                              f"this one {config.get('addition_embed_type')!r}")
    # diffusers' _get_add_time_ids: original size, crop and target size (6), or a refiner's aesthetic score in
    # place of the target size (5)
    conditions = 5 if checkpoint.requires_aesthetics_score else 6
    expected = checkpoint.pooled_size + conditions * int(config["addition_time_embed_dim"])
    if int(config["projection_class_embeddings_input_dim"]) != expected:
        refiner = "an aesthetic score" if checkpoint.requires_aesthetics_score else "a target size"
        raise CheckpointError(
            f"{checkpoint.path}: the U-Net's projection_class_embeddings_input_dim ({config['projection_class_embeddings_input_dim']}) "
            f"is not the pooled embedding ({checkpoint.pooled_size}) plus {conditions} size conditions of "
            f"addition_time_embed_dim ({config['addition_time_embed_dim']}) channels: model_index.json's "
            f"requires_aesthetics_score ({checkpoint.requires_aesthetics_score}) says the last one is {refiner}"
        )


def _has_first_text_encoder(path: Path, index: dict[str, Any], sdxl: bool) -> bool:
    """Whether the checkpoint has text_encoder/ and tokenizer/; raise CheckpointError where it lacks them but is not
    an SDXL checkpoint whose model_index.json says so (a refiner: `"text_encoder": [null, null]`)."""
    missing = [name for name in _FIRST_TEXT_ENCODER if not (path / name).is_file()]
    if not missing:
        return True
    declared_absent = "text_encoder" in index and not any(index["text_encoder"] or ())
    if sdxl and declared_absent:
        return False
    raise CheckpointError(
        f"{path} is not a diffusers Stable Diffusion checkpoint: missing {', '.join(missing)} "
        "(a real SD checkpoint ships tokenizer/vocab.json and tokenizer/merges.txt; only an SDXL refiner, whose "
        "model_index.json declares text_encoder null, has none)"
    )


def load_checkpoint(path: str | Path) -> SourceCheckpoint:
    """Read and check the configs of the checkpoint at `path`; raise CheckpointError saying what is wrong."""
    path = Path(path).resolve()
    if path.is_file():
        raise CheckpointError(f"{path} is a file: sdrt exports diffusers checkpoint directories, and single-file "
                              "checkpoints named .safetensors or .ckpt")
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory {path} does not exist")
    missing = [name for name in _REQUIRED if not (path / name).is_file()]
    if missing:
        raise CheckpointError(
            f"{path} is not a diffusers Stable Diffusion checkpoint: missing {', '.join(missing)} "
            "(a real SD checkpoint ships tokenizer/vocab.json and tokenizer/merges.txt)"
        )
    index = _read_json(path / "model_index.json")
    sdxl = _sdxl_configs(path, index)
    has_text_encoder = _has_first_text_encoder(path, index, sdxl is not None)
    checkpoint = SourceCheckpoint(
        path=path,
        text_encoder_config=_read_json(path / "text_encoder/config.json") if has_text_encoder else None,
        unet_config=_read_json(path / "unet/config.json"),
        vae_config=_read_json(path / "vae/config.json"),
        safety_checker_config=_safety_checker_config(path),
        scheduler_config=_read_json(path / SCHEDULER_CONFIG_FILE),
        tokenizer_config=_read_json(path / ("tokenizer" if has_text_encoder else "tokenizer_2") / "tokenizer_config.json"),
        text_encoder_2_config=sdxl[0] if sdxl else None,
        tokenizer_2_config=sdxl[1] if sdxl else None,
        pipeline_config=index,
    )
    cross_attention_dim = checkpoint.unet_config.get("cross_attention_dim")
    if cross_attention_dim != checkpoint.text_hidden_size:
        raise CheckpointError(
            f"{path}: the U-Net's cross_attention_dim ({cross_attention_dim}) differs from the text encoder's "
            f"hidden_size ({checkpoint.text_hidden_size}{', both encoders together' if sdxl and has_text_encoder else ''})"
        )
    if sdxl:
        _check_sdxl_unet(checkpoint)
    if checkpoint.unet_in_channels not in (checkpoint.latent_channels, 2 * checkpoint.latent_channels + 1):
        raise CheckpointError(
            f"{path}: the U-Net takes {checkpoint.unet_in_channels} input channels; a Stable Diffusion U-Net takes the "
            f"VAE's {checkpoint.latent_channels} latent channels, or {2 * checkpoint.latent_channels + 1} for inpainting"
        )
    return checkpoint
