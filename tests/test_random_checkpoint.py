"""Random checkpoints have the architecture they claim: SD 1.5's parameter counts, without allocating weights."""
from __future__ import annotations

from pathlib import Path

import safetensors
import safetensors.torch
import torch
from transformers import CLIPTextModel

from sdrt.export import random_checkpoint


def _millions(module: torch.nn.Module) -> float:
    return sum(p.numel() for p in module.parameters()) / 1e6


def test_sd15_has_stable_diffusion_15_parameter_counts() -> None:
    arch = random_checkpoint.ARCHES["sd15"]
    with torch.device("meta"):
        assert round(_millions(random_checkpoint._unet(arch)), 1) == 859.5
        assert round(_millions(random_checkpoint._vae(arch)), 1) == 83.7
        assert round(_millions(random_checkpoint._text_encoder(arch)), 1) == 123.1
        assert 300 < _millions(random_checkpoint._safety_checker(arch.safety_checker)) < 310


def test_text_encoder_weights_are_named_as_in_real_checkpoints(tiny_checkpoint: Path) -> None:
    # Real SD checkpoints name them text_model.*; transformers 4 (the bench's optimum peers) would otherwise load
    # random weights in their place, without an error.
    path = tiny_checkpoint / "text_encoder/model.safetensors"
    with safetensors.safe_open(path, "pt") as weights:
        names = list(weights.keys())
    assert names and all(name.startswith("text_model.") for name in names)
    loaded = CLIPTextModel.from_pretrained(tiny_checkpoint / "text_encoder")
    saved = safetensors.torch.load_file(path)
    for name, value in loaded.state_dict().items():
        assert torch.equal(value, saved[name if name.startswith("text_model.") else f"text_model.{name}"]), name
