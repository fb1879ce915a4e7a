"""A LoRA file as weight deltas, in numpy: diffusers parameter name -> delta, per component.

Two key formats are read (others raise UnknownLoraKeysError naming the keys):
  diffusers/PEFT  `unet.<module>.lora_A.weight` (down), `.lora_B.weight` (up), optional `.alpha`;
                  `text_encoder.<module>...` for the text encoder, `text_encoder_2.<module>...` for SDXL's second
  kohya           `lora_unet_<module with _ for .>.lora_down.weight`, `.lora_up.weight`, `.alpha`;
                  `lora_te_<module>...` for the text encoder; SDXL LoRAs name theirs `lora_te1_` and `lora_te2_`
Each module's delta is scale * (alpha / rank) * up @ down (alpha defaults to the rank), in the weight's shape
(Linear (out, in), Conv (out, in, kh, kw)). Kohya names lose the dots of the module path; they are resolved against
the model's known parameter names, never guessed.
"""
from __future__ import annotations

import collections
import dataclasses
import enum
import logging
import os
from collections.abc import Collection, Mapping
from pathlib import Path

import numpy as np

from sdrt.engine.errors import LoraError, UnknownLoraKeysError
from sdrt.engine.specs import Component

logger = logging.getLogger(__name__)

_WEIGHT_SUFFIX = ".weight"


class _Role(enum.Enum):
    DOWN = "down"
    UP = "up"
    ALPHA = "alpha"


@dataclasses.dataclass(frozen=True)
class _KeyFormat:
    """How one LoRA format names a component's modules: a key prefix, and the suffix of each tensor role."""

    component: Component
    prefix: str
    suffixes: Mapping[str, _Role]
    dotted: bool  # module paths keep their dots (diffusers) or have them replaced by "_" (kohya)
    # a root module that LoRA files name and the exported model may not: transformers 4's CLIPTextModel nests the
    # encoder in `text_model`, which LoRA files (made against it) name; transformers 5 leaves the level out
    optional_root: str = ""  # dotted, as module paths are


_PEFT_SUFFIXES = {".lora_A.weight": _Role.DOWN, ".lora_B.weight": _Role.UP, ".alpha": _Role.ALPHA}
_KOHYA_SUFFIXES = {".lora_down.weight": _Role.DOWN, ".lora_up.weight": _Role.UP, ".alpha": _Role.ALPHA}
_KEY_FORMATS = (
    _KeyFormat(Component.UNET, "unet.", _PEFT_SUFFIXES, dotted=True),
    _KeyFormat(Component.TEXT_ENCODER, "text_encoder.", _PEFT_SUFFIXES, dotted=True, optional_root="text_model."),
    _KeyFormat(Component.TEXT_ENCODER_2, "text_encoder_2.", _PEFT_SUFFIXES, dotted=True, optional_root="text_model."),
    _KeyFormat(Component.UNET, "lora_unet_", _KOHYA_SUFFIXES, dotted=False),
    _KeyFormat(Component.TEXT_ENCODER, "lora_te_", _KOHYA_SUFFIXES, dotted=False, optional_root="text_model."),
    _KeyFormat(Component.TEXT_ENCODER, "lora_te1_", _KOHYA_SUFFIXES, dotted=False, optional_root="text_model."),
    _KeyFormat(Component.TEXT_ENCODER_2, "lora_te2_", _KOHYA_SUFFIXES, dotted=False, optional_root="text_model."),
)

#: component -> diffusers parameter name -> delta, float32 in the parameter's shape
WeightDeltas = dict[Component, dict[str, np.ndarray]]


#: (component, dotted) -> module path as the format spells it -> parameter name
_ModuleIndex = Mapping[tuple[Component, bool], Mapping[str, str]]


def _parse_key(key: str, modules: _ModuleIndex) -> tuple[Component, str, _Role] | None:
    """(component, parameter name, role) of a LoRA key, or None if it names no known module."""
    for fmt in _KEY_FORMATS:
        if not key.startswith(fmt.prefix):
            continue
        for suffix, role in fmt.suffixes.items():
            if key.endswith(suffix):
                module = key[len(fmt.prefix):-len(suffix)]
                if fmt.optional_root:
                    module = module.removeprefix(fmt.optional_root if fmt.dotted else fmt.optional_root.replace(".", "_"))
                parameter = modules[fmt.component, fmt.dotted].get(module)
                return (fmt.component, parameter, role) if parameter is not None else None
    return None


def _module_index(parameters: Collection[str], dotted: bool, optional_root: str) -> dict[str, str]:
    """Module path ("a.b.c", or kohya's "a_b_c" when not `dotted`; without `optional_root`) -> parameter name
    ("a.b.c.weight"). A kohya spelling shared by two modules is left out: it cannot be resolved."""
    spellings = collections.defaultdict(list)
    for name in parameters:
        if name.endswith(_WEIGHT_SUFFIX):
            module = name[: -len(_WEIGHT_SUFFIX)].removeprefix(optional_root)
            spellings[module if dotted else module.replace(".", "_")].append(name)
    return {spelling: names[0] for spelling, names in spellings.items() if len(names) == 1}


def _delta(parts: Mapping[_Role, np.ndarray], scale: float) -> np.ndarray:
    down = parts[_Role.DOWN].astype(np.float32)  # (rank, in) or (rank, in, kh, kw)
    up = parts[_Role.UP].astype(np.float32)  # (out, rank) or (out, rank, 1, 1)
    rank = down.shape[0]
    alpha = float(parts[_Role.ALPHA]) if _Role.ALPHA in parts else float(rank)
    product = up.reshape(up.shape[0], rank) @ down.reshape(rank, -1)  # (out, in * kh * kw)
    return (np.float32(scale * alpha / rank) * product).reshape(up.shape[0], *down.shape[1:])  # (out, in[, kh, kw])


def _unreadable(path: Path, exc: Exception) -> LoraError:
    return LoraError(f"{path}: cannot read as a .safetensors LoRA file: {exc}")


def lora_components(path: str | os.PathLike) -> set[Component]:
    """The components whose key prefixes the LoRA file at `path` uses (read from its header: no tensor is loaded).
    Raise LoraError for a file that is not safetensors."""
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="numpy") as tensors:
            keys = list(tensors.keys())
    except Exception as exc:  # OSError, or safetensors' SafetensorError, which derives from Exception only
        raise _unreadable(path, exc) from exc
    return {fmt.component for key in keys for fmt in _KEY_FORMATS if key.startswith(fmt.prefix)}


def lora_deltas(path: str | os.PathLike, scale: float, parameters: Mapping[Component, Collection[str]]) -> WeightDeltas:
    """The weight deltas of the LoRA file at `path` times `scale`, for the components in `parameters` (each's known
    parameter names). Raise UnknownLoraKeysError for keys naming no known module, LoraError for a module missing its
    up or down tensor or whose up and down ranks differ."""
    from safetensors.numpy import load_file  # imported here: only LoRA users pay for it

    path = Path(path)
    try:
        tensors = load_file(str(path))
    except Exception as exc:  # OSError, or safetensors' SafetensorError, which derives from Exception only
        raise _unreadable(path, exc) from exc
    modules = {
        (fmt.component, fmt.dotted): _module_index(parameters.get(fmt.component, ()), fmt.dotted, fmt.optional_root)
        for fmt in _KEY_FORMATS
    }
    grouped: dict[tuple[Component, str], dict[_Role, np.ndarray]] = collections.defaultdict(dict)
    unknown = []
    for key, tensor in tensors.items():
        parsed = _parse_key(key, modules)
        if parsed is None:
            unknown.append(key)
        else:
            component, parameter, role = parsed
            grouped[component, parameter][role] = tensor
    if unknown:
        raise UnknownLoraKeysError(str(path), sorted(unknown))
    deltas: WeightDeltas = collections.defaultdict(dict)
    for (component, parameter), parts in grouped.items():
        if _Role.DOWN not in parts or _Role.UP not in parts:
            raise LoraError(f"{path}: LoRA module for {component.value} {parameter} lacks its up or down weight")
        up, down = parts[_Role.UP], parts[_Role.DOWN]
        if up.ndim < 2 or up.shape[1] != down.shape[0] or up.size != up.shape[0] * down.shape[0]:
            raise LoraError(f"{path}: LoRA module for {component.value} {parameter}: up {up.shape} "
                            f"and down {down.shape} do not compose (different ranks, or an up kernel other than 1x1)")
        deltas[component][parameter] = _delta(parts, scale)
    logger.info("%s: LoRA deltas for %s", path, {c.value: len(d) for c, d in deltas.items()})
    return dict(deltas)
