"""Test fixture helper: a diffusers SD 1.x or SDXL checkpoint written back as one file in the original key layout
as model sites share them: SD 1.x's LDM/CompVis one (`model.diffusion_model.*`, `first_stage_model.*`,
`cond_stage_model.transformer.*`), SDXL's SGM one (the same U-Net and VAE, `conditioner.embedders.0.transformer.*`
CLIP ViT-L, `conditioner.embedders.1.model.*` OpenCLIP ViT-bigG).

diffusers converts only original -> diffusers; this is the inverse, written out from the original module names (U-Net
`input_blocks` / `middle_block` / `output_blocks` / SDXL's `label_emb`, VAE `down.i.block.j` / `mid.attn_1`, CLIP under
`text_model`, OpenCLIP's `resblocks` with q, k, v in one `in_proj`). tests/test_single_file.py checks it against
diffusers' own conversion: the round trip must give every tensor back.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model.transformer.text_model."
SDXL_TEXT_PREFIX = "conditioner.embedders.0.transformer.text_model."
SDXL_TEXT_2_PREFIX = "conditioner.embedders.1.model."

_UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
                "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_UNET_FIXED = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2", "conv_in": "input_blocks.0.0",
               "conv_norm_out": "out.0", "conv_out": "out.2",
               # SDXL's embedding of the pooled text embedding and size conditions
               "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}
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
        (r"(time_embedding\.linear_[12]|add_embedding\.linear_[12]|conv_in|conv_norm_out|conv_out)\.(.*)", lambda m: f"{_UNET_FIXED[m[1]]}.{m[2]}"),
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


_OPEN_CLIP_LAYER = {"self_attn.out_proj": "attn.out_proj", "layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc",
                    "mlp.fc2": "mlp.c_proj"}


def open_clip_to_ldm(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A transformers CLIPTextModelWithProjection state dict in OpenCLIP's names, as SDXL files hold its second text
    encoder, without the prefix: q, k and v stacked into one `in_proj`, the projection stored (hidden, projection)."""
    fixed = {"text_model.embeddings.token_embedding.weight": "token_embedding.weight",
             "text_model.embeddings.position_embedding.weight": "positional_embedding",
             "text_model.final_layer_norm.weight": "ln_final.weight", "text_model.final_layer_norm.bias": "ln_final.bias"}
    converted = {"text_projection": state_dict["text_projection.weight"].T}  # (hidden, projection)
    for name, tensor in state_dict.items():
        if name in fixed:
            converted[fixed[name]] = tensor
            continue
        match = re.fullmatch(r"text_model\.encoder\.layers\.(\d+)\.(.*)\.(weight|bias)", name)
        if match is None:
            if name != "text_projection.weight":
                raise KeyError(f"no OpenCLIP name for {name}")
            continue
        layer, module, kind = match.groups()
        if module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
            if module == "self_attn.q_proj":  # written once, for all three
                qkv = [state_dict[f"text_model.encoder.layers.{layer}.self_attn.{p}_proj.{kind}"] for p in "qkv"]
                converted[f"transformer.resblocks.{layer}.attn.in_proj_{kind}"] = torch.cat(qkv)  # (3 hidden[, hidden])
            continue
        converted[f"transformer.resblocks.{layer}.{_OPEN_CLIP_LAYER[module]}.{kind}"] = tensor
    return converted


def _save(state_dict: dict[str, torch.Tensor], path: Path) -> Path:
    from safetensors.torch import save_file

    state_dict = {k: v.detach().clone().contiguous() for k, v in state_dict.items()}
    if path.suffix == ".safetensors":
        save_file(state_dict, str(path))
    else:
        torch.save({"state_dict": state_dict, "global_step": 1}, path)
    return path


def _unet_and_vae(checkpoint: Path) -> dict[str, torch.Tensor]:
    from diffusers import AutoencoderKL, UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(checkpoint / "unet")
    vae = AutoencoderKL.from_pretrained(checkpoint / "vae")
    return {**{UNET_PREFIX + k: v for k, v in unet_to_ldm(unet.state_dict(), unet.config).items()},
            **{VAE_PREFIX + k: v for k, v in vae_to_ldm(vae.state_dict(), vae.config).items()}}


def write_single_file(checkpoint: Path, path: Path) -> Path:
    """Write the diffusers SD 1.x checkpoint directory `checkpoint` as one LDM-layout file at `path`: `.safetensors`,
    or a `.ckpt` holding {"state_dict": ...} as Lightning saved it."""
    from transformers import CLIPTextModel

    text_encoder = CLIPTextModel.from_pretrained(checkpoint / "text_encoder")
    return _save({**_unet_and_vae(checkpoint),
                  **{TEXT_PREFIX + k: v for k, v in text_encoder_to_ldm(text_encoder.state_dict()).items()}}, path)


def write_sdxl_single_file(checkpoint: Path, path: Path) -> Path:
    """Write the diffusers SDXL checkpoint directory `checkpoint` as one SGM-layout file at `path` (as
    write_single_file)."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    text_encoder = CLIPTextModel.from_pretrained(checkpoint / "text_encoder")
    text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(checkpoint / "text_encoder_2")
    return _save({**_unet_and_vae(checkpoint),
                  **{SDXL_TEXT_PREFIX + k: v for k, v in text_encoder_to_ldm(text_encoder.state_dict()).items()},
                  **{SDXL_TEXT_2_PREFIX + k: v for k, v in open_clip_to_ldm(text_encoder_2.state_dict()).items()}}, path)
