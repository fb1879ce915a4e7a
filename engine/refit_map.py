"""The refit map: which ONNX initializer holds each weight of a torch module, written at export, read by LoRA.

torch's ONNX export renames weights (a Linear's weight becomes a MatMul initializer such as `onnx::MatMul_1234`) and
stores a Linear's weight transposed; LoRA files name the diffusers parameters. The exporter matches the two by value
(export/refit_map.py) and records the result in `<component>/refit_map.json`, listed in the manifest like every file.
"""
from __future__ import annotations

import dataclasses
import json
import posixpath
from collections.abc import Mapping
from pathlib import Path

from sdrt.engine.errors import BundleError
from sdrt.engine.specs import SPECS, Component

REFIT_MAP_FILE = "refit_map.json"
REFIT_MAP_FORMAT = 1
#: the components LoRA files patch, and so the ones the exporter records a refit map for
REFITTABLE_COMPONENTS = (Component.TEXT_ENCODER, Component.TEXT_ENCODER_2, Component.UNET)


@dataclasses.dataclass(frozen=True)
class RefitEntry:
    """Where one torch parameter lives in the ONNX graph: the initializer's name, and whether it holds the
    parameter transposed (2-D weights of MatMul nodes)."""

    initializer: str
    transposed: bool


#: diffusers parameter name (e.g. "down_blocks.0.attentions.0.proj_in.weight") -> its initializer
RefitMap = Mapping[str, RefitEntry]


def refit_map_file(component: Component) -> str:
    """The refit map's path in the bundle, beside the component's model."""
    return posixpath.join(posixpath.dirname(SPECS[component].filename), REFIT_MAP_FILE)


def write_refit_map(path: Path, refit_map: RefitMap) -> None:
    data = {
        "format": REFIT_MAP_FORMAT,
        "parameters": {name: dataclasses.asdict(entry) for name, entry in sorted(refit_map.items())},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n", encoding="utf-8")


def read_refit_map(path: Path) -> dict[str, RefitEntry]:
    """The map at `path` (verified against the manifest at load); raise BundleError if it is of another format."""
    data = json.loads(path.read_text(encoding="utf-8"))
    if data.get("format") != REFIT_MAP_FORMAT:
        raise BundleError(f"{path} has refit map format {data.get('format')!r}, this sdrt reads {REFIT_MAP_FORMAT}: "
                          "re-export the bundle with this version of sdrt")
    return {name: RefitEntry(**entry) for name, entry in data["parameters"].items()}
