"""The demo scorer (sdrt.demo.scorer) against the dataset's ground truth.

The scorer stands in for eyes when judging the demo model, so it must read its own dataset's renders essentially
perfectly at every size, and still nearly perfectly once they are degraded the way generated images are: blurred,
noisy and slightly tinted.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image, ImageFilter

from sdrt.demo.scenes import COLOURS, Attribute, Scene, all_scenes, parse_caption, render
from sdrt.demo.scorer import Reading, Score, read_image, score

# Degradation like a generated image's: Gaussian blur of this radius at 64 px (scaled with the shorter side), noise
# of this sigma per channel, and a global cast of a per-channel gain and offset drawn from these ranges.
BLUR_RADIUS_AT_64 = 1.5
NOISE_SIGMA = 12.0
CAST_GAIN = (0.9, 1.1)
CAST_OFFSET = (-10.0, 10.0)

JITTERED_ACCURACY = 0.99
DEGRADED_ACCURACY = 0.95


def _truth(scene: Scene) -> dict[Attribute, str]:
    return {attribute: getattr(scene, attribute.value) for attribute in Attribute}


def _degrade(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """An (H, W, 3) uint8 render blurred, tinted and noised like a generated image."""
    radius = BLUR_RADIUS_AT_64 * min(image.shape[:2]) / 64
    blurred = np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(radius)), dtype=np.float64)
    gain, offset = rng.uniform(*CAST_GAIN, size=3), rng.uniform(*CAST_OFFSET, size=3)  # (3,) each
    noisy = blurred * gain + offset + rng.normal(0.0, NOISE_SIGMA, size=blurred.shape)  # (H, W, 3)
    return np.clip(np.round(noisy), 0, 255).astype(np.uint8)


def _score_every_scene(size: tuple[int, int], seed: int, degrade: bool) -> Score:
    """The Score of every scene rendered at `size` with jitter (and degradation) from `seed`, asked for everything."""
    rng = np.random.default_rng(seed)
    images = [render(scene, size, rng) for scene in all_scenes()]
    if degrade:
        images = [_degrade(image, rng) for image in images]
    return score(images, [_truth(scene) for scene in all_scenes()])


def test_canonical_renders_read_perfectly() -> None:
    for scene in all_scenes():
        assert read_image(render(scene)) == Reading(**{a.value: v for a, v in _truth(scene).items()}), scene


@pytest.mark.parametrize(
    ("height", "width", "seed"), [(64, 64, 1), (64, 64, 2), (64, 64, 3), (48, 48, 4), (64, 96, 5), (128, 128, 6)]
)
def test_jittered_renders(height: int, width: int, seed: int) -> None:
    result = _score_every_scene((height, width), seed, degrade=False)
    assert result.n == 180
    assert result.prompt >= JITTERED_ACCURACY, result  # measured: 1.0 for each


@pytest.mark.parametrize(
    ("height", "width", "seed"), [(64, 64, 11), (64, 64, 12), (48, 48, 13), (64, 96, 14), (128, 128, 15)]
)
def test_degraded_renders(height: int, width: int, seed: int) -> None:
    result = _score_every_scene((height, width), seed, degrade=True)
    assert result.prompt >= DEGRADED_ACCURACY, result  # measured: 1.0 for each


@pytest.mark.parametrize("size", [(64, 64), (48, 96)])
@pytest.mark.parametrize("background", list(COLOURS))
def test_flat_background_has_no_object(background: str, size: tuple[int, int]) -> None:
    flat = np.empty((*size, 3), dtype=np.uint8)  # (H, W, 3)
    flat[:] = COLOURS[background]
    noisy = np.clip(flat + np.random.default_rng(0).normal(0.0, NOISE_SIGMA, flat.shape), 0, 255).astype(np.uint8)
    for image in (flat, noisy):
        assert read_image(image) == Reading(shape=None, colour=None, background=background, position=None)


def test_object_of_no_known_shape_reads_shape_none() -> None:
    """A thin ring has an object, a colour and a position, but fits no shape's template."""
    y, x = np.mgrid[:64, :64]  # (64, 64) each
    radius = np.hypot(y + 0.5 - 32, x + 0.5 - 32)  # (64, 64)
    image = np.empty((64, 64, 3), dtype=np.uint8)  # (H, W, 3)
    image[:] = COLOURS["green"]
    image[(radius > 12) & (radius < 14)] = COLOURS["red"]
    assert read_image(image) == Reading(shape=None, colour="red", background="green", position="center")


def test_score_counts_each_attribute_over_the_prompts_naming_it() -> None:
    red_circle = Scene("circle", "red", "blue", "top left")
    green_square = Scene("square", "green", "yellow", "bottom right")
    blue_triangle = Scene("triangle", "blue", "red", "center")
    flat_green = np.empty((64, 64, 3), dtype=np.uint8)  # (H, W, 3)
    flat_green[:] = COLOURS["green"]
    images = [render(red_circle), render(green_square), render(blue_triangle), flat_green, render(red_circle)]
    wanted = [
        _truth(red_circle),  # all right
        {Attribute.SHAPE: "circle", Attribute.COLOUR: "green"},  # wrong shape, right colour
        parse_caption("a shape, center"),  # right position
        {Attribute.SHAPE: "circle", Attribute.BACKGROUND: "green"},  # no shape, right background
        parse_caption(""),  # asks for nothing
    ]
    result = score(images, wanted)
    assert result == Score(n=5, shape=1 / 3, colour=1.0, background=1.0, position=1.0, prompt=3 / 5)


def test_score_of_attributes_no_prompt_names_is_nan() -> None:
    result = score([render(all_scenes()[0])], [{Attribute.COLOUR: "red"}])
    assert result.n == 1 and result.colour == 1.0 and result.prompt == 1.0
    assert all(math.isnan(fraction) for fraction in (result.shape, result.background, result.position))


def test_score_needs_one_prompt_per_image() -> None:
    with pytest.raises(ValueError, match="2 images but 1 prompts"):
        score([render(all_scenes()[0])] * 2, [{}])


def test_reading_matches_checks_only_named_attributes() -> None:
    reading = Reading(shape="circle", colour="red", background="blue", position="center")
    assert reading.matches({})
    assert reading.matches({Attribute.SHAPE: "circle"})
    assert reading.matches({Attribute.COLOUR: "red", Attribute.POSITION: "center"})
    assert not reading.matches({Attribute.SHAPE: "square"})
    assert not reading.matches({Attribute.COLOUR: "red", Attribute.POSITION: "top left"})
    nothing = Reading(shape=None, colour=None, background="blue", position=None)
    assert nothing.matches({Attribute.BACKGROUND: "blue"})
    assert not nothing.matches({Attribute.BACKGROUND: "blue", Attribute.SHAPE: "circle"})


@pytest.mark.parametrize(
    "image",
    [
        np.zeros((64, 64), dtype=np.uint8),
        np.zeros((64, 64, 4), dtype=np.uint8),
        np.zeros((64, 64, 3), dtype=np.float32),
        np.zeros((15, 64, 3), dtype=np.uint8),
    ],
)
def test_read_image_rejects_bad_input(image: np.ndarray) -> None:
    with pytest.raises(ValueError):
        read_image(image)
