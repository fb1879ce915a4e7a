"""Outpainting: the canvas size rule, the feathered seam, the original pixels pasted back bit for bit, and bad margins."""
from __future__ import annotations

import numpy as np
import pytest

from sdrt.engine.errors import InvalidArgumentError
from sdrt.engine.manifest import SideRange
from sdrt.engine.outpaint import Canvas, feathered_mask, grow, plan_canvas, seam_width
from tests.test_img2img import make_image

SIDES = SideRange(minimum=8, maximum=2048, multiple=8)


@pytest.mark.parametrize("margins, expected", [
    ((16, 16, 8, 0), Canvas(height=72, width=96, top=8, left=16, image_height=64, image_width=64)),
    ((0, 10, 0, 0), Canvas(height=64, width=80, top=0, left=0, image_height=64, image_width=64)),  # 74 -> 80, right
    ((13, 0, 0, 0), Canvas(height=64, width=80, top=0, left=16, image_height=64, image_width=64)),  # only left grows
    ((5, 5, 3, 0), Canvas(height=72, width=80, top=8, left=5, image_height=64, image_width=64)),  # right; top alone grows
])
def test_canvas_is_rounded_up_to_the_vae_scale_factor(margins, expected: Canvas) -> None:
    left, right, top, bottom = margins
    canvas = plan_canvas((64, 64), left, right, top, bottom, SIDES)
    assert canvas == expected
    assert canvas.height % 8 == canvas.width % 8 == 0
    assert canvas.right >= right and canvas.bottom >= bottom and canvas.left >= left and canvas.top >= top


def test_odd_image_on_an_axis_that_does_not_grow() -> None:
    canvas = plan_canvas((60, 61), 8, 0, 0, 0, SIDES)
    assert (canvas.height, canvas.width, canvas.bottom, canvas.left, canvas.right) == (64, 72, 3, 12, 0)


@pytest.mark.parametrize("margins, message", [
    ((-1, 0, 0, 0), "left: must be a non-negative number of pixels"),
    ((0, 2.5, 0, 0), "right: must be a non-negative"),
    ((0, 0, True, 0), "top: must be"),
    ((0, 0, 0, 0), "left, right, top and bottom are all 0"),
    ((2000, 0, 0, 0), "left, right: grow the image side of 64 px to 2064 px: the canvas side must be a multiple of 8 in 8..2048"),
    ((0, 0, 0, 1990), "top, bottom: grow"),
])
def test_bad_margins(margins, message: str) -> None:
    with pytest.raises(InvalidArgumentError, match="^" + message.replace("(", r"\(")):
        plan_canvas((64, 64), *margins, SIDES)


def test_a_canvas_under_the_smallest_side_is_refused() -> None:
    with pytest.raises(InvalidArgumentError, match="left, right: .*in 64..256"):
        plan_canvas((16, 64), 8, 8, 0, 0, SideRange(minimum=64, maximum=256, multiple=8))

def test_mask_is_zero_on_the_image_and_feathered_outside() -> None:
    canvas = plan_canvas((64, 64), 32, 32, 0, 16, SIDES)
    mask = feathered_mask(canvas, 16)  # (80, 128)
    rows, columns = canvas.image_box
    assert mask.shape == (80, 128) and mask.dtype == np.float32
    assert (mask[rows, columns] == 0).all()
    seam = mask[:64, 32 - 15:32]  # the 15 columns left of the image; at 16 px out the mask reaches 1
    assert ((seam > 0) & (seam < 1)).all()
    assert (np.diff(seam, axis=1) < 0).all()  # rising away from the image
    assert (mask[:, :16] == 1).all() and (mask[64 + 16:, :] == 1).all()
    hard = feathered_mask(canvas, 0)
    assert set(np.unique(hard)) == {0.0, 1.0} and (hard[rows, columns] == 0).all()


def test_seam_width() -> None:
    canvas = plan_canvas((64, 64), 0, 16, 0, 0, SIDES)
    assert seam_width(canvas, None, 8) == 8  # 4 latent pixels = 32, capped at half the 16 px margin
    assert seam_width(plan_canvas((64, 64), 0, 128, 0, 0, SIDES), None, 8) == 32
    assert seam_width(canvas, 3, 8) == 3
    with pytest.raises(InvalidArgumentError, match="^feather: "):
        seam_width(canvas, -2, 8)


def test_margins_start_as_the_repeated_edge() -> None:
    image = make_image(64, 64)
    grown = np.asarray(grow(image, plan_canvas((64, 64), 8, 0, 0, 8, SIDES)))
    np.testing.assert_array_equal(grown[:64, 8:], np.asarray(image))
    np.testing.assert_array_equal(grown[:64, :8], np.repeat(np.asarray(image)[:, :1], 8, axis=1))
    np.testing.assert_array_equal(grown[64:, 8:], np.repeat(np.asarray(image)[-1:], 8, axis=0))


def test_outpaint_keeps_the_original_pixels(tiny_pipe) -> None:
    image = make_image(60, 64)  # not a multiple of 8 wide: the canvas rounds up
    out = tiny_pipe.outpaint(image, "a cat", left=16, right=8, bottom=8, num_inference_steps=3, seed=4)
    canvas = plan_canvas((60, 64), 16, 8, 0, 8, SIDES)
    result = np.asarray(out.images[0])
    assert out.images[0].size == (canvas.width, canvas.height) == (88, 72)
    rows, columns = canvas.image_box
    np.testing.assert_array_equal(result[rows, columns], np.asarray(image))
    # the margins are generated, not the repeated edge they started as
    start = np.asarray(grow(image, canvas)).astype(np.int16)
    assert np.abs(result[:, :8].astype(np.int16) - start[:, :8]).mean() > 5
    as_np = tiny_pipe.outpaint(image, "a cat", left=16, right=8, bottom=8, num_inference_steps=3, seed=4, output_type="np").images
    np.testing.assert_array_equal((as_np[0] * 255).round().astype(np.uint8), result)


def test_outpaint_bad_output_type(tiny_pipe) -> None:
    with pytest.raises(InvalidArgumentError, match="^output_type: outpainting returns images"):
        tiny_pipe.outpaint(make_image(), "a cat", right=8, output_type="latent")
