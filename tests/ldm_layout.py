"""Test fixture helper: a diffusers SD 1.x checkpoint written back as one file in the original LDM/CompVis key layout
(`model.diffusion_model.*`, `first_stage_model.*`, `cond_stage_model.transformer.*`), as model sites share them.

diffusers converts only LDM -> diffusers; this is the inverse, written out from the LDM module names (U-Net
`input_blocks` / `middle_block` / `output_blocks`, VAE `down.i.block.j` / `mid.attn_1`, CLIP under `text_model`).
tests/test_single_file.py checks it against diffusers' own conversion: the round trip must give every tensor back.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model.transformer.text_model."

_UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
                "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_UNET_FIXED = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2", "conv_in": "input_blocks.0.0",
               "conv_norm_out": "out.0", "conv_out": "out.2"}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _rename(name: str, rules: list[tuple[str, Callable[[re.Match], str]]]) -> str:
    for pattern, replace in rules:
        match = re.fullmatch(pattern, name)
        if match:
            return replace(match)
    raise KeyError(f"no LDM name for {name}")


def _resnet(rest: str) -> str:
    layer, _, tail = rest.partition(".")
    return f"{_UNET_RESNET[layer]}.{tail}"


def unet_to_ldm(state_dict: Mapping[str, torch.Tensor], config: Mapping) -> dict[str, torch.Tensor]:
    """A diffusers UNet2DConditionModel state dict (with its config) in LDM names, without the prefix."""
    per_block = config["layers_per_block"] + 1  # the down path's resnets + its downsampler; the up path's resnets
    with_attention = {b for b, kind in enumerate(config["up_block_types"]) if kind.startswith("CrossAttn")}
    rules = [
        (r"(time_embedding\.linear_[12]|conv_in|conv_norm_out|conv_out)\.(.*)", lambda m: f"{_UNET_FIXED[m[1]]}.{m[2]}"),
        (r"down_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", lambda m: f"input_blocks.{1 + int(m[1]) * per_block + int(m[2])}.0.{_resnet(m[3])}"),
        (r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.*)", lambda m: f"input_blocks.{1 + int(m[1]) * per_block + int(m[2])}.1.{m[3]}"),
        (r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", lambda m: f"input_blocks.{(int(m[1]) + 1) * per_block}.0.op.{m[2]}"),
        (r"mid_block\.resnets\.(\d+)\.(.*)", lambda m: f"middle_block.{2 * int(m[1])}.{_resnet(m[2])}"),
        (r"mid_block\.attentions\.0\.(.*)", lambda m: f"middle_block.1.{m[1]}"),
        (r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", lambda m: f"output_blocks.{int(m[1]) * per_block + int(m[2])}.0.{_resnet(m[3])}"),
        (r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.*)", lambda m: f"output_blocks.{int(m[1]) * per_block + int(m[2])}.1.{m[3]}"),
        (r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)",
         lambda m: f"output_blocks.{int(m[1]) * per_block + per_block - 1}.{2 if int(m[1]) in with_attention else 1}.conv.{m[2]}"),
    ]
    return {_rename(name, rules): tensor for name, tensor in state_dict.items()}


def vae_to_ldm(state_dict: Mapping[str, torch.Tensor], config: Mapping) -> dict[str, torch.Tensor]:
    """A diffusers AutoencoderKL state dict in LDM names, without the prefix; attention projections as 1x1 convs."""
    depth = len(config["up_block_types"])

    def resnet(rest: str) -> str:
        return rest.replace("conv_shortcut", "nin_shortcut")

    def attention(rest: str) -> str:
        layer, _, tail = rest.rpartition(".")
        return f"{_VAE_ATTENTION[layer]}.{tail}"

    rules = [
        (r"(encoder|decoder)\.conv_norm_out\.(.*)", lambda m: f"{m[1]}.norm_out.{m[2]}"),
        (r"(encoder|decoder)\.(conv_in|conv_out)\..*|(post_)?quant_conv\..*", lambda m: m[0]),
        (r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", lambda m: f"encoder.down.{m[1]}.block.{m[2]}.{resnet(m[3])}"),
        (r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.(.*)", lambda m: f"encoder.down.{m[1]}.downsample.{m[2]}"),
        (r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", lambda m: f"decoder.up.{depth - 1 - int(m[1])}.block.{m[2]}.{resnet(m[3])}"),
        (r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.(.*)", lambda m: f"decoder.up.{depth - 1 - int(m[1])}.upsample.{m[2]}"),
        (r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.*)", lambda m: f"{m[1]}.mid.block_{int(m[2]) + 1}.{resnet(m[3])}"),
        (r"(encoder|decoder)\.mid_block\.attentions\.0\.(.*)", lambda m: f"{m[1]}.mid.attn_1.{attention(m[2])}"),
    ]
    converted = {}
    for name, tensor in state_dict.items():
        ldm = _rename(name, rules)
        if ".mid.attn_1." in ldm and tensor.ndim == 2:  # LDM's attention projections are 1x1 convs
            tensor = tensor[:, :, None, None]  # (C, C, 1, 1)
        converted[ldm] = tensor
    return converted


def text_encoder_to_ldm(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A transformers CLIPTextModel state dict in the names SD 1.x files use, under `text_model`, without the prefix
    (transformers 5 leaves the `text_model` level out; 4 kept it)."""
    return {name.removeprefix("text_model."): tensor for name, tensor in state_dict.items()}


def write_single_file(checkpoint: Path, path: Path) -> Path:
    """Write the diffusers checkpoint directory `checkpoint` as one LDM-layout file at `path`: `.safetensors`, or a
    `.ckpt` holding {"state_dict": ...} as Lightning saved it."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPTextModel

    unet = UNet2DConditionModel.from_pretrained(checkpoint / "unet")
    vae = AutoencoderKL.from_pretrained(checkpoint / "vae")
    text_encoder = CLIPTextModel.from_pretrained(checkpoint / "text_encoder")
    state_dict = {
        **{UNET_PREFIX + k: v for k, v in unet_to_ldm(unet.state_dict(), unet.config).items()},
        **{VAE_PREFIX + k: v for k, v in vae_to_ldm(vae.state_dict(), vae.config).items()},
        **{TEXT_PREFIX + k: v for k, v in text_encoder_to_ldm(text_encoder.state_dict()).items()},
    }
    state_dict = {k: v.detach().clone().contiguous() for k, v in state_dict.items()}
    if path.suffix == ".safetensors":
        save_file(state_dict, str(path))
    else:
        torch.save({"state_dict": state_dict, "global_step": 1}, path)
    return path
