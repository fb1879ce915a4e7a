"""Outpainting's canvas: grow the image by margins to a size the bundle can run, fill the margins, build the mask
with a feathered seam, and paste the original pixels back over the result unchanged.

Size rule: the canvas is (top + height + bottom) x (left + width + right) rounded up to multiples of the VAE scale
factor f; the extra pixels (fewer than f per axis) widen the right margin (bottom margin), or the left (top) one when
only that side grows.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
from PIL import Image

from sdrt.engine.checks import is_int
from sdrt.engine.errors import InvalidArgumentError
from sdrt.engine.manifest import SideRange

#: the default seam width, in latent pixels (times the VAE scale factor in image pixels)
DEFAULT_FEATHER_LATENT_PIXELS = 4


@dataclasses.dataclass(frozen=True)
class Canvas:
    """Where the original image lies on the grown canvas, in pixels."""

    height: int
    width: int
    top: int
    left: int
    image_height: int
    image_width: int

    @property
    def bottom(self) -> int:
        """The margin below the image."""
        return self.height - self.top - self.image_height

    @property
    def right(self) -> int:
        """The margin right of the image."""
        return self.width - self.left - self.image_width

    @property
    def image_box(self) -> tuple[slice, slice]:
        """(rows, columns) of the original image on the canvas."""
        return slice(self.top, self.top + self.image_height), slice(self.left, self.left + self.image_width)


def plan_canvas(image_size: tuple[int, int], left: Any, right: Any, top: Any, bottom: Any, sides: SideRange) -> Canvas:
    """The canvas for an image of `image_size` (width, height) grown by the margins (non-negative pixel counts, not
    all zero), rounded up to multiples of `sides.multiple` (module docstring); InvalidArgumentError naming the margin
    that is bad or the pair that makes a side the model cannot run (outside `sides`)."""
    margins = {"left": left, "right": right, "top": top, "bottom": bottom}
    for name, value in margins.items():
        if not is_int(value) or value < 0:
            raise InvalidArgumentError(name, f"must be a non-negative number of pixels, got {value!r}")
    if not any(margins.values()):
        raise InvalidArgumentError("left", "left, right, top and bottom are all 0: give at least one margin to fill")
    width, height = image_size
    left, right = _round_up(width, int(left), int(right), sides, "left, right")
    top, bottom = _round_up(height, int(top), int(bottom), sides, "top, bottom")
    return Canvas(height=top + height + bottom, width=left + width + right, top=top, left=left,
                  image_height=height, image_width=width)


def _round_up(side: int, before: int, after: int, sides: SideRange, names: str) -> tuple[int, int]:
    total = before + side + after
    extra = -total % sides.multiple
    if not sides.contains(total + extra):
        raise InvalidArgumentError(
            names, f"grow the image side of {side} px to {total + extra} px: the canvas side must be {sides.describe()} for this model"
        )
    return (before + extra, after) if before and not after else (before, after + extra)


def grow(image: Image.Image, canvas: Canvas) -> Image.Image:
    """`image` (RGB) on the canvas, each margin filled by repeating the image's edge pixels outwards: near the seam
    the known colours, which latent blending and the masked image carry into the first steps."""
    pixels = np.asarray(image)  # (h, w, 3) uint8
    padded = np.pad(pixels, ((canvas.top, canvas.bottom), (canvas.left, canvas.right), (0, 0)), mode="edge")  # (H, W, 3)
    return Image.fromarray(padded)


def feathered_mask(canvas: Canvas, feather: int) -> np.ndarray:
    """The repaint mask (H, W) float32: 0 on every original pixel, rising linearly with the distance from the
    image to 1 at `feather` pixels out, 1 beyond; `feather` 0 gives a hard 0/1 seam."""
    rows = np.arange(canvas.height)[:, None]  # (H, 1)
    columns = np.arange(canvas.width)[None, :]  # (1, W)
    dy = np.maximum(np.maximum(canvas.top - rows, rows - (canvas.top + canvas.image_height - 1)), 0)  # (H, 1)
    dx = np.maximum(np.maximum(canvas.left - columns, columns - (canvas.left + canvas.image_width - 1)), 0)  # (1, W)
    distance = np.hypot(dx, dy)  # (H, W) pixels from the image, 0 on it
    if feather == 0:
        return (distance > 0).astype(np.float32)  # (H, W)
    return np.clip(distance / feather, 0.0, 1.0).astype(np.float32)  # (H, W)


def seam_width(canvas: Canvas, feather: Any, factor: int) -> int:
    """The seam width in pixels: `feather`, or DEFAULT_FEATHER_LATENT_PIXELS latent pixels when None, capped at half
    the widest margin so that the margins asked for keep a fully generated part (a margin narrower than the seam, such
    as the few pixels of rounding up, stays a soft blend of the repeated edge and the generated pixels)."""
    if feather is None:
        feather = DEFAULT_FEATHER_LATENT_PIXELS * factor
    elif not is_int(feather) or feather < 0:
        raise InvalidArgumentError("feather", f"must be a non-negative number of pixels or None, got {feather!r}")
    return min(int(feather), max(canvas.left, canvas.right, canvas.top, canvas.bottom) // 2)


def paste_original(images: np.ndarray, original: Image.Image, canvas: Canvas) -> np.ndarray:
    """`images` (N, H, W, 3) float32 in [0, 1] with the original's pixels put back where the image lies, so they
    come out unchanged (x / 255 rounds back to x when written as 8 bits)."""
    pasted = images.copy()
    rows, columns = canvas.image_box
    pasted[:, rows, columns] = np.asarray(original, dtype=np.float32) / np.float32(255.0)  # (N, h, w, 3)
    return pasted
