"""Reads which shape, colour, background and position a demo image shows, by plain image analysis, to score the demo
model without eyes.

Generated images are blurry, noisy, slightly tinted approximations of the training renders (`sdrt.demo.scenes`), at
any size, so every step below works in normalised coordinates, compares colours by chromaticity (robust to
brightness and mild casts) and takes medians rather than means. Each step is deterministic numpy:

1. Background: the median of a thin border ring (the object never covers more than a small part of it), classified
   as the palette colour of nearest chromaticity r, g, b / (r + g + b).
2. Object: pixels farther (in RGB) from the measured background than `SEED_THRESHOLD` of the distance between the
   background's palette colour and its nearest other palette colour; the largest 4-connected component of them is
   the object, and an object under `MIN_OBJECT_FRACTION` of the image means there is none (shape, colour and
   position None). The median colour of its quarter farthest from the background (its core, least mixed with the
   background by blur), classified like the background, is the colour.
3. Outline: each pixel is placed on the line from the measured background colour to the object's colour, and the
   object is the largest component of pixels past half way. Thresholding at half contrast puts the outline where
   the sharp edge was before blurring.
4. Position: the outline's centroid in normalised coordinates; "center" when within `CENTER_TOLERANCE` of the
   middle on both axes, otherwise its quadrant.
5. Shape, from moments of the outline (whole-object statistics, which a few blurred or noisy edge pixels barely
   move): an upright triangle is bottom-heavy, so a vertical skewness under `TRIANGLE_SKEWNESS` reads as a triangle;
   otherwise a square reaches further along its diagonals than a circle, so a ratio of fourth moments along the
   diagonals to those along the axes over `SQUARE_DIAGONAL_RATIO` reads as a square, and anything else as a circle.
   The shape is confirmed by its template, rasterised with the outline's centroid and second moments (so its size
   and aspect follow the object's): when their overlap (intersection over union) is under `MIN_SHAPE_IOU` the
   object is no shape the scorer knows, and the shape reads None.

The thresholds were calibrated on jittered renders blurred (Gaussian, radius up to 2.5 px at 64 px, scaled with the
size), noised (sigma up to 20 per channel) and tinted (per-channel gain 0.9-1.1 and offset +-10), at 48 to 128 px:
all read right. At 3.5 px blur about 2 % do not: squares and triangles smeared into blobs read as circles, as they
look to the eye.
"""
from __future__ import annotations

import collections
import dataclasses
import math
from collections.abc import Mapping, Sequence

import numpy as np

from sdrt.demo.scenes import COLOURS, Attribute

#: the border ring whose median is the background, as a fraction of the shorter side (at least one pixel)
BORDER_FRACTION = 1 / 32
#: object seed pixels differ from the background by more than this fraction of the background's palette distance
SEED_THRESHOLD = 0.4
#: an object smaller than this fraction of the image is noise: no object
MIN_OBJECT_FRACTION = 0.01
#: how far (normalised, on each axis) the object's centroid may lie from the image centre to read as "center"
CENTER_TOLERANCE = 0.15
#: the fraction of the object farthest from the background whose median colour is the object's colour
CORE_FRACTION = 0.25
#: vertical skewness (rows grow downwards) below which the object is a triangle: an upright triangle's is -0.57, a
#: circle's and a square's 0; blur moves them towards each other (with 2.5 px blur at 64 px and noise sigma 20, a
#: triangle's measured up to -0.21, a circle's or square's down to -0.08)
TRIANGLE_SKEWNESS = -0.15
#: ratio of fourth moments along the diagonals to those along the axes above which the object is a square: a
#: square's is 4 / 3, a circle's 1; blur moves them towards each other (measured as above: a square's down to 1.13,
#: a circle's up to 1.07)
SQUARE_DIAGONAL_RATIO = 1.1
#: the least overlap (intersection over union) of the object with its shape's template for the shape to be read
MIN_SHAPE_IOU = 0.6
#: the smallest image side the scorer reads, in pixels
MIN_SIDE = 16
#: the variance of a uniform unit interval: a pixel's own extent, added to the variance of pixel positions
PIXEL_VARIANCE = 1 / 12

_PALETTE_NAMES: tuple[str, ...] = tuple(COLOURS)
_PALETTE = np.array([COLOURS[name] for name in _PALETTE_NAMES], dtype=np.float64)  # (P, 3)


def _chromaticity(rgb: np.ndarray) -> np.ndarray:
    """(..., 3) RGB -> (..., 3) r, g, b / (r + g + b): colour without brightness."""
    return rgb / np.maximum(rgb.sum(axis=-1, keepdims=True), 1.0)


_PALETTE_CHROMATICITY = _chromaticity(_PALETTE)  # (P, 3)


@dataclasses.dataclass(frozen=True)
class Reading:
    """What the scorer sees in one image; None where it cannot tell (no object: shape, colour and position; an
    object of no known shape: shape)."""

    shape: str | None
    colour: str | None
    background: str | None
    position: str | None

    def matches(self, wanted: Mapping[Attribute, str]) -> bool:
        """True iff every attribute named in `wanted` reads as its value; unnamed attributes are not checked."""
        return all(getattr(self, attribute.value) == value for attribute, value in wanted.items())


@dataclasses.dataclass(frozen=True)
class Score:
    """Fractions in [0, 1] over `n` images. Each attribute's fraction counts only the images whose prompt names it
    (nan when none does); `prompt` is the fraction of all images whose named attributes all read right (an empty
    prompt asks for nothing, so it is always right)."""

    n: int
    shape: float
    colour: float
    background: float
    position: float
    prompt: float


def _nearest_colour(rgb: np.ndarray) -> str:
    """The palette colour of nearest chromaticity to one (3,) RGB colour."""
    distances = np.linalg.norm(_PALETTE_CHROMATICITY - _chromaticity(rgb), axis=1)  # (P,)
    return _PALETTE_NAMES[int(np.argmin(distances))]


def _border_pixels(image: np.ndarray) -> np.ndarray:
    """The pixels of the border ring of an (H, W, 3) image, as (N, 3)."""
    height, width = image.shape[:2]
    ring = max(1, round(BORDER_FRACTION * min(height, width)))
    inner = np.ones((height, width), dtype=bool)  # (H, W)
    inner[ring:-ring, ring:-ring] = False
    return image[inner]


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected component of an (H, W) bool mask (the first found on ties), by breadth-first search."""
    height, width = mask.shape
    unvisited = mask.ravel().tolist()
    largest: list[int] = []
    for start in np.flatnonzero(mask).tolist():
        if not unvisited[start]:
            continue
        unvisited[start] = False
        component, queue = [start], collections.deque([start])
        while queue:
            index = queue.popleft()
            row, column = divmod(index, width)
            neighbours = (
                index - width if row > 0 else -1,
                index + width if row < height - 1 else -1,
                index - 1 if column > 0 else -1,
                index + 1 if column < width - 1 else -1,
            )
            for neighbour in neighbours:
                if neighbour >= 0 and unvisited[neighbour]:
                    unvisited[neighbour] = False
                    component.append(neighbour)
                    queue.append(neighbour)
        if len(component) > len(largest):
            largest = component
    result = np.zeros(mask.size, dtype=bool)  # (H * W,)
    result[largest] = True
    return result.reshape(mask.shape)


def _position(centre_x: float, centre_y: float) -> str:
    """The position name of a normalised centroid."""
    if abs(centre_x - 0.5) < CENTER_TOLERANCE and abs(centre_y - 0.5) < CENTER_TOLERANCE:
        return "center"
    return f"{'top' if centre_y < 0.5 else 'bottom'} {'left' if centre_x < 0.5 else 'right'}"


def _template(shape: str, size: tuple[int, int], rows: np.ndarray, columns: np.ndarray) -> np.ndarray:
    """An (H, W) = `size` bool mask of `shape` with the centroid and the second moments of the pixels at `rows`,
    `columns`: the ideal version of the object those pixels form, if it is that shape."""
    variance_y, variance_x = rows.var() + PIXEL_VARIANCE, columns.var() + PIXEL_VARIANCE
    y, x = np.mgrid[: size[0], : size[1]]  # (H, W) each
    dy, dx = y - rows.mean(), x - columns.mean()  # (H, W) each
    if shape == "circle":  # an ellipse with semi-axes a, b has variances a^2 / 4, b^2 / 4
        return (dx**2 / (4 * variance_x)) + (dy**2 / (4 * variance_y)) <= 1
    if shape == "square":  # a rectangle with half-sides a, b has variances a^2 / 3, b^2 / 3
        return (dx**2 <= 3 * variance_x) & (dy**2 <= 3 * variance_y)
    # An upward isosceles triangle with base w and height h has variances w^2 / 24 across and h^2 / 18 down, and its
    # centroid lies h / 3 above the base.
    base, height = math.sqrt(24 * variance_x), math.sqrt(18 * variance_y)
    below_apex = dy + 2 * height / 3  # (H, W)
    return (below_apex >= 0) & (below_apex <= height) & (np.abs(dx) <= base / 2 * below_apex / height)


def _shape(mask: np.ndarray) -> str | None:
    """The shape an (H, W) bool object mask shows, or None when the mask does not fit that shape's template."""
    rows, columns = np.nonzero(mask)
    # Offsets from the centroid in units of the standard deviation on each axis; rows grow downwards.
    y = (rows - rows.mean()) / math.sqrt(rows.var() + PIXEL_VARIANCE)
    x = (columns - columns.mean()) / math.sqrt(columns.var() + PIXEL_VARIANCE)
    if np.mean(y**3) < TRIANGLE_SKEWNESS:
        shape = "triangle"
    else:
        diagonal, antidiagonal = (x + y) / math.sqrt(2), (x - y) / math.sqrt(2)
        ratio = (np.mean(diagonal**4) + np.mean(antidiagonal**4)) / (np.mean(x**4) + np.mean(y**4))
        shape = "square" if ratio > SQUARE_DIAGONAL_RATIO else "circle"
    template = _template(shape, mask.shape, rows, columns)
    overlap = np.count_nonzero(template & mask) / np.count_nonzero(template | mask)
    return shape if overlap >= MIN_SHAPE_IOU else None


def read_image(image: np.ndarray) -> Reading:
    """What an (H, W, 3) uint8 image shows, each side at least MIN_SIDE pixels (method: see the module docstring)."""
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an (H, W, 3) uint8 image, got {image.shape} {image.dtype}")
    height, width = image.shape[:2]
    if min(height, width) < MIN_SIDE:
        raise ValueError(f"image sides must be at least {MIN_SIDE} pixels, got {height}x{width}")
    pixels = image.astype(np.float64)  # (H, W, 3)

    background_rgb = np.median(_border_pixels(pixels), axis=0)  # (3,)
    background = _nearest_colour(background_rgb)
    background_palette = _PALETTE[_PALETTE_NAMES.index(background)]  # (3,)
    others = np.delete(_PALETTE, _PALETTE_NAMES.index(background), axis=0)  # (P - 1, 3)
    threshold = SEED_THRESHOLD * np.linalg.norm(others - background_palette, axis=1).min()
    distance = np.linalg.norm(pixels - background_rgb, axis=-1)  # (H, W)
    seed = _largest_component(distance > threshold)  # (H, W)
    min_pixels = MIN_OBJECT_FRACTION * height * width
    no_object = Reading(shape=None, colour=None, background=background, position=None)
    if np.count_nonzero(seed) < min_pixels:
        return no_object

    core = seed & (distance >= np.quantile(distance[seed], 1 - CORE_FRACTION))  # (H, W)
    object_rgb = np.median(pixels[core], axis=0)  # (3,)
    contrast = object_rgb - background_rgb  # (3,)
    # 0 at the background colour, 1 at the object's (the floor only guards a degenerate median equal to the background)
    progress = (pixels - background_rgb) @ contrast / max(contrast @ contrast, 1.0)  # (H, W)
    outline = _largest_component(progress > 0.5)  # (H, W)
    if np.count_nonzero(outline) < min_pixels:
        return no_object
    rows, columns = np.nonzero(outline)
    return Reading(
        shape=_shape(outline),
        colour=_nearest_colour(object_rgb),
        background=background,
        position=_position((columns.mean() + 0.5) / width, (rows.mean() + 0.5) / height),
    )


def _fraction(right: int, total: int) -> float:
    """right / total, or nan when there is nothing to count."""
    return right / total if total else math.nan


def score(images: Sequence[np.ndarray], wanted: Sequence[Mapping[Attribute, str]]) -> Score:
    """How often `images` show what their prompts asked for; `wanted[i]` holds the attributes image i's prompt names
    (as `sdrt.demo.scenes.parse_caption` returns them)."""
    if len(images) != len(wanted):
        raise ValueError(f"{len(images)} images but {len(wanted)} prompts")
    readings = [read_image(image) for image in images]
    fractions: dict[str, float] = {}
    for attribute in Attribute:
        named = [(reading, asked[attribute]) for reading, asked in zip(readings, wanted) if attribute in asked]
        right = sum(getattr(reading, attribute.value) == value for reading, value in named)
        fractions[attribute.value] = _fraction(right, len(named))
    prompt_right = sum(reading.matches(asked) for reading, asked in zip(readings, wanted))
    return Score(n=len(images), prompt=_fraction(prompt_right, len(images)), **fractions)
