"""Images in and out of the pipeline.

Out: VAE output -> images in [0, 1] -> PIL (identical to diffusers' VaeImageProcessor.postprocess), and PNG files
that carry the generation parameters.

In: image and mask inputs: PIL images, numpy arrays or file paths, converted deliberately to 8-bit RGB images and 8-bit
single-channel masks, then preprocessed to model inputs exactly as diffusers' VaeImageProcessor does.

Conversions, each chosen rather than left to chance:
- RGBA (and LA, PA): the alpha channel is dropped and the colour channels kept as stored, as `Image.convert("RGB")`
  does (what diffusers' users do before calling it). Transparency is not read as a mask: pass `mask_image` for that.
- greyscale (L, 1, I, I;16, F) images are repeated to RGB; RGB masks are converted to greyscale (ITU-R 601 luma, as
  `Image.convert("L")`).
- 16-bit data (PIL modes I;16*, I, and uint16 arrays) is scaled to 8 bits: round(v / 257), so 65535 becomes 255.
- float arrays (and PIL mode F) must lie in [0, 1] and are rounded to 8 bits: round(v * 255).
- numpy arrays are (H, W) or (H, W, C) with C in 1, 3, 4 (channels last, as PIL's), uint8, uint16, bool or float.
Paths are opened with PIL and rotated by their EXIF orientation, as diffusers' `load_image` does.
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Union

import numpy as np
from PIL import Image, ImageOps, PngImagePlugin, UnidentifiedImageError

from sdrt.engine.atomic import atomic_file
from sdrt.engine.errors import InvalidArgumentError

#: what `image` and `mask_image` accept
ImageInput = Union[Image.Image, np.ndarray, str, os.PathLike]

_SIXTEEN_BIT_MAX = 65535
# 65535 / 257 = 255: the scale that maps the 16-bit range exactly onto the 8-bit one
_SIXTEEN_TO_EIGHT = 257.0
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
# The mask threshold of diffusers' VaeImageProcessor.binarize: values >= 0.5 are repainted.
MASK_THRESHOLD = 0.5


def load_image(value: ImageInput, parameter: str = "image") -> Image.Image:
    """`value` as an 8-bit RGB PIL image; InvalidArgumentError naming `parameter` if it cannot be read or converted."""
    image = _as_pil(value, parameter)
    if image.mode == "RGB":
        return image
    if image.mode in ("L", "1", "F", *_SIXTEEN_BIT_MODES):
        return _to_eight_bit_grey(image, parameter).convert("RGB")
    if image.mode == "LA":
        return image.convert("L").convert("RGB")  # alpha dropped
    # RGBA, P, PA, CMYK, YCbCr, LAB, HSV: PIL's own conversion, which drops any alpha.
    try:
        return image.convert("RGB")
    except (ValueError, OSError) as exc:
        raise InvalidArgumentError(parameter, f"cannot convert a PIL image of mode {image.mode} to RGB: {exc}") from None


def load_mask(value: ImageInput, parameter: str = "mask_image") -> Image.Image:
    """`value` as an 8-bit single-channel (mode L) PIL image: white (255) = repaint, black (0) = keep."""
    image = _as_pil(value, parameter)
    if image.mode in ("L", "1", "F", *_SIXTEEN_BIT_MODES):
        return _to_eight_bit_grey(image, parameter)
    if image.mode in ("LA", "PA", "RGBA", "P"):
        image = load_image(image, parameter)  # alpha dropped first, as for images
    try:
        return image.convert("L")
    except (ValueError, OSError) as exc:
        raise InvalidArgumentError(parameter, f"cannot convert a PIL image of mode {image.mode} to greyscale: {exc}") from None


def floor_to_multiple(image: Image.Image, factor: int) -> tuple[int, int]:
    """(height, width) of `image` rounded down to multiples of `factor`, as diffusers' get_default_height_width."""
    return image.height - image.height % factor, image.width - image.width % factor


def preprocess_image(image: Image.Image, height: int, width: int) -> np.ndarray:
    """An RGB image resized (Lanczos, skipped at the same size) to (height, width) and scaled to [-1, 1]: the VAE
    encoder's input, as diffusers' VaeImageProcessor.preprocess computes it. Returns (1, 3, height, width) float32."""
    resized = _resize(image, height, width)
    pixels = np.asarray(resized, dtype=np.float32) / np.float32(255.0)  # (H, W, 3) in [0, 1]
    return np.ascontiguousarray((2.0 * pixels - 1.0).transpose(2, 0, 1)[None], dtype=np.float32)  # (1, 3, H, W)


def preprocess_mask(mask: Image.Image, height: int, width: int, binarize: bool = True) -> np.ndarray:
    """A mode-L mask resized (Lanczos) to (height, width) in [0, 1], binarized at 0.5 as diffusers' mask processor does
    unless `binarize` is false (outpainting's feathered seam). Returns (1, 1, height, width) float32, 1 = repaint."""
    values = np.asarray(_resize(mask, height, width), dtype=np.float32) / np.float32(255.0)  # (H, W)
    if binarize:
        values = (values >= MASK_THRESHOLD).astype(np.float32)  # (H, W) in {0, 1}
    return values[None, None]  # (1, 1, H, W)


def _resize(image: Image.Image, height: int, width: int) -> Image.Image:
    # PIL returns an unchanged copy at the same size, so an image already at (height, width) is not resampled.
    return image.resize((width, height), resample=Image.Resampling.LANCZOS)


def _as_pil(value: ImageInput, parameter: str) -> Image.Image:
    if isinstance(value, Image.Image):
        return value
    if isinstance(value, np.ndarray):
        return _array_to_pil(value, parameter)
    if isinstance(value, (str, os.PathLike)):
        return _open(value, parameter)
    raise InvalidArgumentError(
        parameter, f"must be a PIL image, a numpy array or a file path, got {type(value).__name__}"
    )


def _open(path: str | os.PathLike, parameter: str) -> Image.Image:
    try:
        with Image.open(path) as opened:
            opened.load()
            return ImageOps.exif_transpose(opened)
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        raise InvalidArgumentError(parameter, f"cannot read {os.fspath(path)!r} as an image: {exc}") from None


def _to_eight_bit_grey(image: Image.Image, parameter: str) -> Image.Image:
    """Greyscale modes (1, L, I, I;16*, F) as mode L, 16-bit and float data scaled rather than clipped."""
    if image.mode in ("L", "1"):
        return image.convert("L")
    if image.mode == "F":
        return _array_to_pil(np.asarray(image, dtype=np.float32), parameter)
    return _array_to_pil(np.asarray(image).astype(np.uint16 if image.mode != "I" else np.int64), parameter)


def _array_to_pil(array: np.ndarray, parameter: str) -> Image.Image:
    """A channels-last numpy image (see the module docstring) as an 8-bit L, RGB or RGBA PIL image."""
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]  # (H, W)
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)) or 0 in array.shape:
        raise InvalidArgumentError(
            parameter, f"a numpy image must be (H, W) or (H, W, C) with C in 1, 3, 4 (channels last), got shape {array.shape}"
        )
    # uint8 (H, W), (H, W, 3), (H, W, 4) arrays become L, RGB, RGBA images
    return Image.fromarray(np.ascontiguousarray(_eight_bit(array, parameter)))


def _eight_bit(array: np.ndarray, parameter: str) -> np.ndarray:
    """uint8 kept; bool to 0/255; 16-bit integers scaled by 1/257; floats in [0, 1] scaled by 255, all rounded."""
    if array.dtype == np.uint8:
        return array
    if array.dtype == np.bool_:
        return array.astype(np.uint8) * np.uint8(255)
    if np.issubdtype(array.dtype, np.integer):
        if array.min() < 0 or array.max() > _SIXTEEN_BIT_MAX:
            raise InvalidArgumentError(
                parameter, f"integer image values must lie in 0..65535 (16-bit), got {array.min()}..{array.max()}"
            )
        return np.round(array / _SIXTEEN_TO_EIGHT).astype(np.uint8)
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise InvalidArgumentError(parameter, "contains NaN or infinity")
        if array.min() < 0.0 or array.max() > 1.0:
            raise InvalidArgumentError(
                parameter, f"float image values must lie in [0, 1], got [{array.min():.4g}, {array.max():.4g}]"
            )
        return np.round(array.astype(np.float64) * 255.0).astype(np.uint8)
    raise InvalidArgumentError(parameter, f"numpy images must be uint8, uint16, bool or float, got {array.dtype}")


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
