"""The demo dataset (sdrt.demo.scenes): caption grammar and its parser, the training / held-out split, and renders.

The split is what makes held-out generation a test of composition: every attribute value and every pair of values
must still be seen in training. Renders must be deterministic (a seed fixes the jitter) so datasets are reproducible.
"""
from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest

from sdrt.demo.scenes import (
    ALL_ATTRIBUTES,
    COLOUR_JITTER,
    COLOURS,
    OBJECT_EXTENT,
    POSITION_CENTRES,
    POSITIONS,
    SHAPES,
    Attribute,
    Scene,
    all_scenes,
    held_out_scenes,
    parse_caption,
    render,
    training_scenes,
)

ATTRIBUTE_SUBSETS = [
    frozenset(subset) for count in range(len(Attribute) + 1) for subset in itertools.combinations(Attribute, count)
]
SIZES = [(64, 64), (48, 48), (64, 96), (96, 64), (128, 128)]
SCENE = Scene("circle", "red", "blue", "top left")


def _values(scene: Scene) -> dict[Attribute, str]:
    return {attribute: getattr(scene, attribute.value) for attribute in Attribute}


@pytest.mark.parametrize(
    ("attributes", "caption"),
    [
        (ALL_ATTRIBUTES, "a red circle on a blue background, top left"),
        (ALL_ATTRIBUTES - {Attribute.SHAPE}, "a red shape on a blue background, top left"),
        (ALL_ATTRIBUTES - {Attribute.COLOUR}, "a circle on a blue background, top left"),
        (ALL_ATTRIBUTES - {Attribute.BACKGROUND}, "a red circle, top left"),
        (ALL_ATTRIBUTES - {Attribute.POSITION}, "a red circle on a blue background"),
        (frozenset({Attribute.POSITION}), "a shape, top left"),
        (frozenset({Attribute.SHAPE}), "a circle"),
        (frozenset(), ""),
    ],
)
def test_caption_grammar(attributes: frozenset[Attribute], caption: str) -> None:
    assert SCENE.caption(attributes) == caption


def test_caption_defaults_to_all_attributes() -> None:
    assert SCENE.caption() == SCENE.caption(ALL_ATTRIBUTES)


def test_parse_caption_inverts_caption_for_every_subset() -> None:
    for scene in all_scenes():
        values = _values(scene)
        for attributes in ATTRIBUTE_SUBSETS:
            assert parse_caption(scene.caption(attributes)) == {a: values[a] for a in attributes}, (scene, attributes)


def test_parse_caption_ignores_case_and_surrounding_whitespace() -> None:
    assert parse_caption("  A Red Circle, Top Left\n") == {
        Attribute.COLOUR: "red",
        Attribute.SHAPE: "circle",
        Attribute.POSITION: "top left",
    }
    assert parse_caption("   ") == {}


@pytest.mark.parametrize(
    "text",
    [
        "a purple circle",
        "a red hexagon on a blue background",
        "red circle",
        "a red circle on a blue",
        "a red circle, middle",
        "a red circle on a blue background top left",
        "a photo of a cat",
    ],
)
def test_parse_caption_rejects_text_outside_the_grammar(text: str) -> None:
    with pytest.raises(ValueError, match="not a demo caption"):
        parse_caption(text)


def test_all_scenes_are_every_valid_combination_in_a_fixed_order() -> None:
    scenes = all_scenes()
    assert len(scenes) == len(set(scenes)) == len(SHAPES) * len(COLOURS) * (len(COLOURS) - 1) * len(POSITIONS) == 180
    assert all(scene.colour != scene.background for scene in scenes)
    assert scenes == all_scenes()


def test_held_out_split() -> None:
    held_out, training = held_out_scenes(), training_scenes()
    assert len(held_out) == len(set(held_out)) == 18
    assert len(training) == 162
    assert not set(held_out) & set(training)
    assert sorted(set(held_out) | set(training), key=all_scenes().index) == all_scenes()
    assert held_out == held_out_scenes() and training == training_scenes()


@pytest.mark.parametrize("attribute", list(Attribute))
def test_training_and_held_out_cover_every_attribute_value(attribute: Attribute) -> None:
    every_value = {getattr(scene, attribute.value) for scene in all_scenes()}
    assert {getattr(scene, attribute.value) for scene in training_scenes()} == every_value
    assert {getattr(scene, attribute.value) for scene in held_out_scenes()} == every_value


@pytest.mark.parametrize(("first", "second"), list(itertools.combinations(Attribute, 2)))
def test_training_covers_every_pair_of_attribute_values(first: Attribute, second: Attribute) -> None:
    def pairs(scenes: list[Scene]) -> set[tuple[str, str]]:
        return {(getattr(scene, first.value), getattr(scene, second.value)) for scene in scenes}

    assert pairs(training_scenes()) == pairs(all_scenes())


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"shape": "hexagon"}, r"shape must be one of \('circle', 'square', 'triangle'\), got 'hexagon'"),
        ({"colour": "purple"}, r"colour must be one of \('red', 'green', 'blue', 'yellow'\)"),
        ({"background": "black"}, r"background must be one of \('red', 'green', 'blue', 'yellow'\)"),
        ({"position": "middle"}, r"position must be one of \('top left', .*'center'\), got 'middle'"),
        ({"background": "red"}, "colour and background must differ"),
    ],
)
def test_scene_validation(fields: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Scene(**{**dataclasses.asdict(SCENE), **fields})


@pytest.mark.parametrize("size", SIZES)
def test_render_shape_and_dtype(size: tuple[int, int]) -> None:
    for rng in (None, np.random.default_rng(0)):
        image = render(SCENE, size, rng)
        assert image.shape == (*size, 3)
        assert image.dtype == np.uint8 and image.flags.writeable


def test_render_is_deterministic() -> None:
    for scene in all_scenes()[::17]:
        assert np.array_equal(render(scene), render(scene))
        first, again, other = (render(scene, rng=np.random.default_rng(seed)) for seed in (7, 7, 8))
        assert np.array_equal(first, again)
        assert not np.array_equal(first, other)


@pytest.mark.parametrize("size", SIZES)
def test_canonical_render_geometry(size: tuple[int, int]) -> None:
    """Exact palette colours away from edges, antialiased edges, the object's extent and centre where documented."""
    height, width = size
    for scene in (Scene(shape, "yellow", "blue", position) for shape in SHAPES for position in POSITIONS):
        image = render(scene, size)  # (H, W, 3)
        assert tuple(image[0, 0]) == COLOURS["blue"]
        inside = np.all(image == COLOURS["yellow"], axis=-1)  # (H, W)
        outside = np.all(image == COLOURS["blue"], axis=-1)  # (H, W)
        assert np.any(~inside & ~outside), "edges should be antialiased"
        rows, columns = np.nonzero(~outside)
        extent = OBJECT_EXTENT * min(size)
        assert abs(rows.max() + 1 - rows.min() - extent) <= 2 and abs(columns.max() + 1 - columns.min() - extent) <= 2
        centre_x, centre_y = POSITION_CENTRES[scene.position]
        assert abs((rows.min() + rows.max() + 1) / 2 - centre_y * height) <= 1
        assert abs((columns.min() + columns.max() + 1) / 2 - centre_x * width) <= 1


def test_triangle_points_up() -> None:
    image = render(Scene("triangle", "yellow", "blue", "center"))  # (H, W, 3)
    rows, columns = np.nonzero(np.any(image != COLOURS["blue"], axis=-1))
    widths = np.bincount(rows)[rows.min() : rows.max() + 1]  # object pixels per row, top to bottom
    assert widths[-1] > 4 * widths[0]


def test_jittered_colours_stay_within_the_jitter() -> None:
    for seed in range(20):
        image = render(SCENE, rng=np.random.default_rng(seed)).astype(int)  # (H, W, 3)
        assert np.all(np.abs(image[0, 0] - COLOURS["blue"]) <= COLOUR_JITTER)
        centre = image[round(POSITION_CENTRES["top left"][1] * 64), round(POSITION_CENTRES["top left"][0] * 64)]
        assert np.all(np.abs(centre - COLOURS["red"]) <= COLOUR_JITTER)
