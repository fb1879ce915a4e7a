"""Image post-processing (identical to diffusers' VaeImageProcessor) and PNG output with generation metadata."""
from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, PngImagePlugin

from sdrt.engine.atomic import atomic_file

#: the PNG text chunk key holding the generation parameters as JSON
PNG_PARAMETERS_KEY = "sdrt:parameters"


def decoded_to_unit_range(decoded: np.ndarray) -> np.ndarray:
    """VAE output in [-1, 1], channels first -> float32 images in [0, 1], channels last."""
    images = np.clip(decoded / 2 + 0.5, 0.0, 1.0)  # (B, 3, H, W)
    return np.ascontiguousarray(images.transpose(0, 2, 3, 1), dtype=np.float32)  # (B, H, W, 3)


def to_pil(images: np.ndarray) -> list[Image.Image]:
    """(B, H, W, 3) floats in [0, 1] -> 8-bit RGB PIL images, rounding as diffusers does."""
    return [Image.fromarray(image) for image in (images * 255).round().astype(np.uint8)]


def save_png(image: Image.Image, path: str | Path, parameters: Mapping[str, Any]) -> Path:
    """Write `image` to `path` atomically, with `parameters` as JSON in a PNG text chunk."""
    info = PngImagePlugin.PngInfo()
    info.add_text(PNG_PARAMETERS_KEY, json.dumps(dict(parameters), ensure_ascii=False, sort_keys=True))
    with atomic_file(path) as staging:
        image.save(staging, format="PNG", pnginfo=info)
    return Path(path)


def read_png_parameters(path: str | Path) -> dict[str, Any]:
    """The generation parameters stored in a PNG written by `save_png`."""
    with Image.open(path) as image:
        return json.loads(image.text[PNG_PARAMETERS_KEY])
