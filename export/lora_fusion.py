"""LoRA files fused into the U-Net and text encoders at export (`sdrt export --lora FILE:SCALE`, several allowed):
the bundle's weights are the checkpoint's plus every LoRA's deltas times its scale, summed.

The deltas come from the runtime's LoRA reader (engine/lora.py), so export and `pipe.load_lora` read the same key
formats the same way. Every file is read and checked against the checkpoint's parameter names and shapes (taken
from its configs, on the meta device) before any export work starts.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from sdrt.engine.errors import InvalidArgumentError, LoraError
from sdrt.engine.lora import WeightDeltas, lora_deltas
from sdrt.engine.manifest import FusedLoraEntry, sha256_file
from sdrt.engine.specs import Component

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

DEFAULT_SCALE = 1.0


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    """One LoRA file to fuse, and the scale of its deltas."""

    path: Path
    scale: float = DEFAULT_SCALE

    @classmethod
    def parse(cls, text: str) -> LoraSpec:
        """`FILE` or `FILE:SCALE` (the CLI's --lora); raise InvalidArgumentError for a SCALE that is not a finite
        number."""
        path, separator, scale = text.rpartition(":")
        if not separator:
            return cls(Path(text))
        try:
            value = float(scale)
        except ValueError:
            value = math.nan
        if not path or not math.isfinite(value):
            raise InvalidArgumentError("lora", f"expected FILE or FILE:SCALE with SCALE a finite number, got {text!r}")
        return cls(Path(path), value)


def _parameter_shapes(config_dir: Path) -> dict[Component, dict[str, tuple[int, ...]]]:
    """Parameter name -> shape of the U-Net and text encoders (SDXL: both) that the configs in `config_dir`
    describe."""
    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with torch.device("meta"):  # names and shapes only: no weights allocated
        models = {
            Component.UNET: UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(config_dir / "unet")),
            Component.TEXT_ENCODER: CLIPTextModel(CLIPTextConfig.from_pretrained(config_dir / "text_encoder")),
        }
        if (config_dir / "text_encoder_2/config.json").is_file():
            models[Component.TEXT_ENCODER_2] = CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(config_dir / "text_encoder_2"))
    return {component: {name: tuple(p.shape) for name, p in model.named_parameters()} for component, model in models.items()}


def fused_deltas(loras: Sequence[LoraSpec], config_dir: Path) -> tuple[WeightDeltas, tuple[FusedLoraEntry, ...]]:
    """The summed deltas of `loras` (component -> parameter -> delta) for the checkpoint whose configs are in
    `config_dir`, and their manifest entries. Raise LoraError for a missing or unreadable file, keys naming no weight
    of the checkpoint (UnknownLoraKeysError), or a delta whose shape differs from its weight's."""
    if not loras:
        return {}, ()
    shapes = _parameter_shapes(config_dir)
    total: WeightDeltas = {}
    entries = []
    for lora in loras:
        if not lora.path.is_file():
            raise LoraError(f"LoRA file {lora.path} does not exist")
        deltas = lora_deltas(lora.path, lora.scale, {component: names.keys() for component, names in shapes.items()})
        for component, component_deltas in deltas.items():
            summed = total.setdefault(component, {})
            for name, delta in component_deltas.items():
                if delta.shape != shapes[component][name]:
                    raise LoraError(f"{lora.path}: {component.value} delta for {name} has shape {delta.shape}, the weight "
                                    f"{shapes[component][name]}: the LoRA is for another model")
                summed[name] = summed[name] + delta if name in summed else delta
        entries.append(FusedLoraEntry(file=lora.path.name, sha256=sha256_file(lora.path), scale=lora.scale))
    logger.info("fusing %d LoRA file(s) into %s", len(loras), {c.value: len(d) for c, d in total.items()})
    return total, tuple(entries)


def fuse_into(model: torch.nn.Module, deltas: Mapping[str, np.ndarray]) -> None:
    """Add `deltas` (parameter name -> delta, in the parameter's shape) to the torch module `model`'s weights."""
    import torch

    parameters = dict(model.named_parameters())
    with torch.no_grad():
        for name, delta in deltas.items():
            parameters[name].add_(torch.from_numpy(delta))
