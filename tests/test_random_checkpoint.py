"""Random checkpoints have the architecture they claim: SD 1.5's parameter counts, without allocating weights."""
from __future__ import annotations

import torch

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
