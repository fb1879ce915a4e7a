"""Image and mask inputs: PIL images of every mode, numpy arrays and paths converted as documented, and every bad
image argument refused with an error naming it."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdrt.engine.errors import InvalidArgumentError
from sdrt.engine.image_io import load_image, load_mask, preprocess_image, preprocess_mask
from tests.test_img2img import make_image
from tests.test_inpaint import make_mask

RNG = np.random.default_rng(0)
RGB = RNG.integers(0, 256, (12, 10, 3), dtype=np.uint8)


def test_rgb_passes_unchanged() -> None:
    image = Image.fromarray(RGB)
    assert load_image(image) is image


def test_rgba_drops_alpha() -> None:
    rgba = np.concatenate([RGB, RNG.integers(0, 256, (12, 10, 1), dtype=np.uint8)], axis=-1)
    np.testing.assert_array_equal(np.asarray(load_image(Image.fromarray(rgba))), RGB)
    np.testing.assert_array_equal(np.asarray(load_image(rgba)), RGB)


def test_greyscale_becomes_rgb_and_rgb_masks_greyscale() -> None:
    grey = RGB[..., 0]
    for value in (Image.fromarray(grey), grey, grey[..., None]):
        image = load_image(value)
        assert image.mode == "RGB"
        np.testing.assert_array_equal(np.asarray(image), np.repeat(grey[..., None], 3, axis=-1))
    mask = load_mask(Image.fromarray(RGB))
    assert mask.mode == "L" and mask.tobytes() == Image.fromarray(RGB).convert("L").tobytes()


def test_sixteen_bit_is_scaled_not_clipped() -> None:
    values = np.array([[0, 257, 32896, 65535]], dtype=np.uint16)
    assert (Image.fromarray(values).mode, Image.fromarray(values.astype(np.int32)).mode) == ("I;16", "I")
    expected = np.array([[0, 1, 128, 255]], dtype=np.uint8)
    for value in (Image.fromarray(values), Image.fromarray(values.astype(np.int32)), values):
        np.testing.assert_array_equal(np.asarray(load_mask(value)), expected)
        np.testing.assert_array_equal(np.asarray(load_image(value))[..., 1], expected)


def test_floats_and_bools() -> None:
    values = np.array([[0.0, 0.5, 0.2, 1.0]], dtype=np.float32)
    np.testing.assert_array_equal(np.asarray(load_mask(values)), [[0, 128, 51, 255]])
    np.testing.assert_array_equal(np.asarray(load_mask(Image.fromarray(values))), [[0, 128, 51, 255]])
    np.testing.assert_array_equal(np.asarray(load_image(RGB / 255.0)), RGB)
    np.testing.assert_array_equal(np.asarray(load_mask(np.array([[True, False]]))), [[255, 0]])


def test_paths(tmp_path: Path) -> None:
    Image.fromarray(RGB).save(tmp_path / "image.png")
    np.testing.assert_array_equal(np.asarray(load_image(tmp_path / "image.png")), RGB)
    np.testing.assert_array_equal(np.asarray(load_image(str(tmp_path / "image.png"))), RGB)


def test_preprocessing_matches_diffusers() -> None:
    from diffusers.image_processor import VaeImageProcessor

    image, mask = make_image(70, 85), make_mask(70, 85)
    expected = VaeImageProcessor(vae_scale_factor=8).preprocess(image, height=80, width=64).numpy()
    np.testing.assert_array_equal(preprocess_image(image, 80, 64), expected)
    masks = VaeImageProcessor(vae_scale_factor=8, do_normalize=False, do_binarize=True, do_convert_grayscale=True)
    np.testing.assert_array_equal(preprocess_mask(mask, 80, 64), masks.preprocess(mask, height=80, width=64).numpy())
    soft = preprocess_mask(mask, 85, 70, binarize=False)
    assert ((soft > 0) & (soft < 1)).any()


BAD_VALUES = [
    (np.zeros((4, 4, 2), np.uint8), "must be (H, W) or (H, W, C)"),
    (np.zeros((0, 4, 3), np.uint8), "got shape (0, 4, 3)"),
    (np.full((4, 4), 1.5, np.float32), "float image values must lie in [0, 1]"),
    (np.full((4, 4), np.nan, np.float32), "NaN"),
    (np.full((4, 4), -1, np.int32), "0..65535"),
    (np.zeros((4, 4), np.complex64), "uint8, uint16, bool or float"),
    ([[0, 1], [1, 0]], "must be a PIL image, a numpy array or a file path, got list"),
]


@pytest.mark.parametrize("value, message", BAD_VALUES)
def test_bad_values_name_the_parameter(value, message: str) -> None:
    with pytest.raises(InvalidArgumentError, match="^image: ") as error:
        load_image(value)
    assert message in str(error.value) and error.value.parameter == "image"
    with pytest.raises(InvalidArgumentError, match="^mask_image: "):
        load_mask(value)


def test_unreadable_files(tmp_path: Path) -> None:
    (tmp_path / "notes.png").write_text("not an image")
    for path in (tmp_path / "notes.png", tmp_path / "missing.png"):
        with pytest.raises(InvalidArgumentError, match=f"image: cannot read '{path}' as an image"):
            load_image(path)


def _request_errors():
    image = make_image()
    return [
        (dict(image=image, mask_image=make_mask(32, 64)), "mask_image: is 32x64 but image is 64x64"),
        (dict(image=image, strength=1.5), "strength: must be a number in [0, 1], got 1.5"),
        (dict(image=image, strength=-0.1), "strength: must be a number in [0, 1]"),
        (dict(image=image, strength=float("nan")), "strength: must be a number in [0, 1]"),
        (dict(image=image, strength="high"), "strength: must be a number in [0, 1]"),
        (dict(image=image, strength=0.1), "strength: 0.1 leaves no step of 4"),
        # the tiny model is trained at 256 px: it runs a quarter to four times that
        (dict(image=make_image(6, 64)), "image: is 6x64: this model runs sides of 64 to 1024 px"),
        (dict(image=make_image(2056, 8)), "image: is 2056x8"),
        (dict(image=image, height=60, width=64), "height: must be a multiple of 8"),
        (dict(image=image, latents=np.zeros((1, 4, 8, 8), np.float32)), "latents: cannot be given with `image`"),
        (dict(mask_image=make_mask()), "mask_image: needs `image`"),
        (dict(strength=0.5), "strength: applies only with `image`"),
        (dict(image=image, mask_image="/nonexistent/mask.png"), "mask_image: cannot read '/nonexistent/mask.png'"),
    ]


@pytest.mark.parametrize("index", range(len(_request_errors())))
def test_bad_requests(tiny_pipe, index: int) -> None:
    arguments, message = _request_errors()[index]
    with pytest.raises(InvalidArgumentError) as error:
        tiny_pipe("a cat", num_inference_steps=4, **arguments)
    assert str(error.value).startswith(message)
