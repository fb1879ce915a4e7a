"""CLIP image preprocessing for the safety checker, written with numpy and Pillow only.

Stable Diffusion checkpoints ship the safety checker's feature extractor settings in
`feature_extractor/preprocessor_config.json`. This module reproduces, bit for bit, what the diffusers pipeline gets from

    self.feature_extractor(pil_images, return_tensors="pt").pixel_values

with transformers 5.x and no torchvision, where `CLIPImageProcessor` resolves to `CLIPImageProcessorPil`
(transformers/models/clip/image_processing_pil_clip.py on top of `PilBackend` in image_processing_backends.py, with
the array helpers of image_transforms.py). For every image, in this order:

1. Convert to RGB: an image with an alpha band, or with a "transparency" entry in `image.info` (palette and
   greyscale images can carry one), is converted to RGBA and alpha-composited onto opaque white; any other image
   goes through `image.convert("RGB")`. With do_convert_rgb off the pixels are used as they are (so the images
   must be RGB already).
2. Resize with Pillow's `Image.resize(resample=config.resample)` (reducing_gap left at None: no two-step draft
   reduction). With `{"shortest_edge": s}` the short side becomes s and the long side `int(s * long / short)`,
   truncated, computed in Python floats; a square image becomes s x s. `{"height", "width"}` resizes to exactly that.
3. Centre crop to crop_size: the top/left margin is `(size - crop) // 2`, so an odd surplus leaves the extra pixel at
   the bottom/right. A side shorter than the crop is first zero-padded (black, before rescaling) to the crop size,
   the extra padding pixel of an odd difference going to the top/left (`ceil(diff / 2)` there).
4. Rescale: uint8 -> float64, times rescale_factor (1/255), then cast to float32.
5. Normalise in float32: `(x - mean) / std` with mean and std cast to float32, per channel.

The result is channels first (N, 3, crop_height, crop_width), float32. transformers would hand back uint8 values when
both rescaling and normalisation are switched off; they come back here as (exactly equal) float32 values.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from sdrt.engine.checks import is_finite_number, is_int
from sdrt.engine.errors import BundleError

logger = logging.getLogger(__name__)

#: the file holding the settings, inside a checkpoint's feature_extractor/ folder
PREPROCESSOR_CONFIG_NAME = "preprocessor_config.json"

# transformers' CLIPImageProcessorPil class defaults, used for keys a config leaves out (or sets to null).
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
DEFAULT_SIZE = 224
# The Pillow filters transformers accepts: 0-5 (NEAREST, LANCZOS, BILINEAR, BICUBIC, BOX, HAMMING). Newer Pillows add
# more (MKS2013 = 6, ...), which transformers' resampling validator rejects, so they are rejected here too.
PIL_RESAMPLE_FILTERS = tuple(range(6))

# Keys transformers honours that would change the output in ways this module does not implement.
_UNSUPPORTED_WHEN_TRUE = ("do_pad", "use_square_size")
_BOOL_KEYS = ("do_convert_rgb", "do_resize", "do_center_crop", "do_rescale", "do_normalize")
# Every config key from_dict reads; the rest (feature_extractor_type, processor_class, ...) do not touch the pixels.
_CONFIG_KEYS = frozenset(
    {*_BOOL_KEYS, *_UNSUPPORTED_WHEN_TRUE, "size", "default_to_square", "crop_size", "resample", "rescale_factor"}
    | {"image_mean", "image_std"}
)


class CLIPImageConfigError(BundleError):
    """A preprocessor config value this module cannot use; `key` names the offending setting."""

    def __init__(self, key: str, detail: str) -> None:
        super().__init__(f"preprocessor config {key!r}: {detail}")
        self.key = key
        self.detail = detail


@dataclasses.dataclass(frozen=True)
class CLIPImageProcessorConfig:
    """The settings of transformers' CLIP image processor, with its defaults. Validated on construction.

    Exactly one of `shortest_edge` and `resize_size` says how to resize (even when do_resize is off, as transformers
    also insists on a valid size): `CLIPImageProcessorConfig(shortest_edge=None, resize_size=(256, 256))`.
    """

    do_convert_rgb: bool = True
    do_resize: bool = True
    #: resize so the shorter side has this many pixels, keeping the aspect ratio
    shortest_edge: int | None = DEFAULT_SIZE
    #: or resize to exactly this (height, width)
    resize_size: tuple[int, int] | None = None
    #: a Pillow resampling filter; the default 3 is bicubic
    resample: int = int(Image.Resampling.BICUBIC)
    do_center_crop: bool = True
    #: (height, width) of the centre crop, i.e. of the output
    crop_size: tuple[int, int] = (DEFAULT_SIZE, DEFAULT_SIZE)
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    #: per-channel (R, G, B) mean and standard deviation, applied after rescaling
    image_mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    image_std: tuple[float, float, float] = OPENAI_CLIP_STD

    def __post_init__(self) -> None:
        self._check_flags()
        self._check_sizes()
        if not is_int(self.resample) or self.resample not in PIL_RESAMPLE_FILTERS:
            raise CLIPImageConfigError("resample", f"must be one of {PIL_RESAMPLE_FILTERS}, got {self.resample!r}")
        _check_positive_number("rescale_factor", self.rescale_factor)
        self._check_mean_std()

    def _check_flags(self) -> None:
        for key in _BOOL_KEYS:
            if not isinstance(getattr(self, key), bool):
                raise CLIPImageConfigError(key, f"must be true or false, got {getattr(self, key)!r}")

    def _check_sizes(self) -> None:
        if (self.shortest_edge is None) == (self.resize_size is None):
            raise CLIPImageConfigError("size", "set exactly one of shortest_edge and resize_size")
        if self.shortest_edge is not None:
            _check_pixel_count("size", self.shortest_edge)
        if self.resize_size is not None:
            _check_height_width("size", self.resize_size)
        _check_height_width("crop_size", self.crop_size)

    def _check_mean_std(self) -> None:
        for key in ("image_mean", "image_std"):
            values = getattr(self, key)
            if not isinstance(values, tuple) or len(values) != 3:
                raise CLIPImageConfigError(key, f"must be 3 numbers (R, G, B), got {values!r}")
            for value in values:
                _check_finite_number(key, value)
        if any(value <= 0 for value in self.image_std):
            raise CLIPImageConfigError("image_std", f"must be positive, got {self.image_std!r}")

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> CLIPImageProcessorConfig:
        """Read a preprocessor_config.json's contents, in the old feature-extractor or the newer spelling.

        Missing or null keys take transformers' defaults; keys that do not affect the pixels (feature_extractor_type,
        image_processor_type, ...) are ignored. Raises `CLIPImageConfigError` (a ValueError) naming a bad key.
        """
        if not isinstance(config, Mapping):
            raise CLIPImageConfigError("<root>", f"must be a JSON object, got {type(config).__name__}")
        present = {key: value for key, value in config.items() if value is not None}
        for key in _UNSUPPORTED_WHEN_TRUE:
            if present.get(key):
                raise CLIPImageConfigError(key, "is not supported by the runtime's CLIP preprocessing")
        ignored = sorted(set(present) - _CONFIG_KEYS)
        if ignored:
            logger.debug("preprocessor config: ignoring keys that do not affect the pixels: %s", ignored)

        fields: dict[str, Any] = {key: present[key] for key in _BOOL_KEYS if key in present}
        if "size" in present:
            fields["shortest_edge"], fields["resize_size"] = _parse_resize_size(
                present["size"], default_to_square=present.get("default_to_square", False)
            )
        if "crop_size" in present:
            fields["crop_size"] = _parse_crop_size(present["crop_size"])
        if "resample" in present:
            fields["resample"] = present["resample"]
        if "rescale_factor" in present:
            fields["rescale_factor"] = _parse_number("rescale_factor", present["rescale_factor"])
        for key in ("image_mean", "image_std"):
            if key in present:
                fields[key] = _parse_channel_values(key, present[key])
        return cls(**fields)

    @classmethod
    def from_file(cls, path: str | Path) -> CLIPImageProcessorConfig:
        """Read a preprocessor_config.json, given its path or the folder holding it (e.g. `feature_extractor/`)."""
        path = Path(path)
        if path.is_dir():
            path = path / PREPROCESSOR_CONFIG_NAME
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise BundleError(f"cannot read the CLIP preprocessor config {path}: {error}") from error
        try:
            return cls.from_dict(config)
        except CLIPImageConfigError as error:
            raise CLIPImageConfigError(error.key, f"{error.detail} (in {path})") from error



def clip_pixel_values(images: Sequence[Image.Image], config: CLIPImageProcessorConfig) -> np.ndarray:
    """The CLIP model's `pixel_values` for `images`: (N, 3, crop_height, crop_width) float32, as transformers computes.

    Without centre cropping all images must come out of resizing with the same size, as they are stacked.
    """
    if isinstance(images, Image.Image) or not isinstance(images, Sequence):
        raise TypeError(f"images must be a sequence of PIL images, got {type(images).__name__}")
    if not images:
        raise ValueError("images must not be empty")
    pixels = [_preprocess_one(image, config) for image in images]
    shapes = {array.shape for array in pixels}
    if len(shapes) > 1:
        raise ValueError(f"preprocessed images differ in size and cannot be stacked: {sorted(shapes)}")
    return np.stack(pixels)  # (N, 3, crop_h, crop_w)


def _preprocess_one(image: Image.Image, config: CLIPImageProcessorConfig) -> np.ndarray:
    """One PIL image -> (3, H, W) float32, through the steps listed in the module docstring."""
    if not isinstance(image, Image.Image):
        raise TypeError(f"images must be PIL images, got {type(image).__name__}")
    rgb = _to_rgb(image) if config.do_convert_rgb else _require_rgb(image)
    if config.do_resize:
        rgb = rgb.resize(_resized_width_height(rgb.size, config), resample=config.resample)
    pixels = np.asarray(rgb).transpose(2, 0, 1)  # (3, H, W) uint8
    if config.do_center_crop:
        pixels = _center_crop(pixels, config.crop_size)  # (3, crop_h, crop_w)
    if config.do_rescale:
        pixels = _rescale(pixels, config.rescale_factor)
    if config.do_normalize:
        pixels = _normalize(pixels, config.image_mean, config.image_std)
    return pixels.astype(np.float32, copy=False)  # (3, H, W)


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB version of `image`, transparent pixels composited onto white (a plain convert would turn them black)."""
    has_alpha = "A" in image.getbands() or image.info.get("transparency") is not None
    if not has_alpha:
        return image.convert("RGB")
    rgba = image.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


def _require_rgb(image: Image.Image) -> Image.Image:
    """With do_convert_rgb off, only RGB images give three channels to normalise."""
    if image.mode != "RGB":
        raise ValueError(f"do_convert_rgb is off, so images must be RGB, got mode {image.mode!r}")
    return image


def _resized_width_height(width_height: tuple[int, int], config: CLIPImageProcessorConfig) -> tuple[int, int]:
    """The (width, height) Pillow resizes to."""
    if config.resize_size is not None:
        height, width = config.resize_size
        return width, height
    width, height = width_height
    short, long = (width, height) if width <= height else (height, width)
    # Same float expression and truncation as transformers' get_resize_output_image_size (torchvision's rule).
    new_short, new_long = config.shortest_edge, int(config.shortest_edge * long / short)
    return (new_short, new_long) if width <= height else (new_long, new_short)


def _center_crop(pixels: np.ndarray, crop_size: tuple[int, int]) -> np.ndarray:
    """Centre crop (3, H, W) to (3, crop_h, crop_w), first zero-padding sides shorter than the crop."""
    crop_height, crop_width = crop_size
    pixels = _pad_to_at_least(pixels, crop_height, crop_width)  # (3, >= crop_h, >= crop_w)
    height, width = pixels.shape[1:]
    top = (height - crop_height) // 2
    left = (width - crop_width) // 2
    return pixels[:, top : top + crop_height, left : left + crop_width]  # (3, crop_h, crop_w)


def _pad_to_at_least(pixels: np.ndarray, min_height: int, min_width: int) -> np.ndarray:
    """Zero-pad (3, H, W) evenly to at least (min_height, min_width); an odd extra pixel goes top/left."""
    height, width = pixels.shape[1:]
    pad_height, pad_width = max(min_height - height, 0), max(min_width - width, 0)
    if not pad_height and not pad_width:
        return pixels
    top, left = math.ceil(pad_height / 2), math.ceil(pad_width / 2)
    padding = ((0, 0), (top, pad_height - top), (left, pad_width - left))
    return np.pad(pixels, padding, mode="constant", constant_values=0)  # (3, max(H, min_h), max(W, min_w))


def _rescale(pixels: np.ndarray, factor: float) -> np.ndarray:
    """Multiply in float64 and round once to float32, as transformers' `rescale` does."""
    return (pixels.astype(np.float64) * factor).astype(np.float32)  # (3, H, W)


def _normalize(pixels: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """Per-channel (x - mean) / std, entirely in float32 like transformers' `normalize`."""
    pixels = pixels.astype(np.float32, copy=False)
    mean32 = np.asarray(mean, dtype=np.float32)[:, None, None]  # (3, 1, 1)
    std32 = np.asarray(std, dtype=np.float32)[:, None, None]  # (3, 1, 1)
    return (pixels - mean32) / std32  # (3, H, W)


# --- config parsing ------------------------------------------------------------------------------------------------


def _parse_resize_size(size: Any, default_to_square: Any) -> tuple[int | None, tuple[int, int] | None]:
    """`size` in any of transformers' spellings -> (shortest_edge, resize_size), one of them None.

    A bare int means the shortest edge for CLIP (its default_to_square is False), or a square if the config says
    default_to_square; a [height, width] list or {"height", "width"} dict means an exact size.
    """
    if is_int(size):
        return (None, (size, size)) if default_to_square is True else (size, None)
    if isinstance(size, Mapping) and set(size) == {"shortest_edge"}:
        return size["shortest_edge"], None
    return None, _parse_height_width("size", size)


def _parse_crop_size(crop_size: Any) -> tuple[int, int]:
    """`crop_size` as an int (square), [height, width] or {"height", "width"} -> (height, width)."""
    if is_int(crop_size):
        return crop_size, crop_size
    return _parse_height_width("crop_size", crop_size)


def _parse_height_width(key: str, value: Any) -> tuple[int, int]:
    if isinstance(value, Mapping) and set(value) == {"height", "width"}:
        return value["height"], value["width"]
    if isinstance(value, (list, tuple)) and len(value) == 2:
        return value[0], value[1]
    raise CLIPImageConfigError(
        key, f"must be an int, [height, width], {{'height', 'width'}} or {{'shortest_edge'}}, got {value!r}"
    )


def _parse_channel_values(key: str, value: Any) -> tuple[float, ...]:
    """A per-channel setting: one number for all three channels (as transformers allows) or one per channel."""
    if isinstance(value, (list, tuple)):
        return tuple(_parse_number(key, item) for item in value)
    return (_parse_number(key, value),) * 3


def _parse_number(key: str, value: Any) -> float:
    _check_finite_number(key, value)
    return float(value)


def _check_pixel_count(key: str, value: Any) -> None:
    if not is_int(value) or value < 1:
        raise CLIPImageConfigError(key, f"sizes must be positive integers, got {value!r}")


def _check_height_width(key: str, value: Any) -> None:
    if not isinstance(value, tuple) or len(value) != 2:
        raise CLIPImageConfigError(key, f"must be a (height, width) pair, got {value!r}")
    for side in value:
        _check_pixel_count(key, side)


def _check_finite_number(key: str, value: Any) -> None:
    if not is_finite_number(value):
        raise CLIPImageConfigError(key, f"must be a finite number, got {value!r}")


def _check_positive_number(key: str, value: Any) -> None:
    _check_finite_number(key, value)
    if value <= 0:
        raise CLIPImageConfigError(key, f"must be positive, got {value!r}")
