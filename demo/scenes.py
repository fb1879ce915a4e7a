"""The demo model's procedural dataset: captioned scenes of one filled shape on a flat background.

The demo model is a tiny Stable-Diffusion-architecture network trained from scratch, so its world has to be small
enough to learn quickly and simple enough to check without eyes: three shapes, four colours, four backgrounds (any
colour but the shape's) and five positions, 180 scenes in all. Each scene has one caption in a fixed grammar, and
`parse_caption` inverts it for any subset of attributes, so a prompt with some attributes dropped (attribute dropout in
training, partial or empty prompts in experiments) still says exactly what an image made from it should show.

`held_out_scenes` keeps 18 combinations out of training while every attribute value and every pair of attribute
values still appears in `training_scenes`: generating the held-out scenes then measures composition of known parts,
not recall of seen images.

`render` draws a scene with antialiased edges at any size; with a generator it adds the small jitter of scale,
centre and colour that keeps the model from memorising single pixels. Pillow is imported inside `render` only, so
the scorer (`sdrt.demo.scorer`), which shares this vocabulary, needs numpy alone.
"""
from __future__ import annotations

import dataclasses
import enum
import itertools
import re

import numpy as np

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
#: saturated colours far apart both in RGB and in chromaticity, so blurred or tinted renders still read unambiguously
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 180, 50),
    "blue": (30, 60, 220),
    "yellow": (240, 210, 30),
}
POSITIONS: tuple[str, ...] = ("top left", "top right", "bottom left", "bottom right", "center")

#: normalised (x, y) of the object's centre for each position: the centre of its quadrant, or of the image
POSITION_CENTRES: dict[str, tuple[float, float]] = {
    "top left": (0.27, 0.27),
    "top right": (0.73, 0.27),
    "bottom left": (0.27, 0.73),
    "bottom right": (0.73, 0.73),
    "center": (0.5, 0.5),
}
#: object extent (circle diameter, square side, triangle base and height) as a fraction of the shorter image side
OBJECT_EXTENT = 0.35
#: jitter with a generator: relative scale, centre offset as a fraction of each side, colour offset per channel
SCALE_JITTER = 0.15
CENTRE_JITTER = 0.04
COLOUR_JITTER = 12
#: shapes are drawn at this multiple of the output size and box-downsampled, which antialiases their edges
SUPERSAMPLING = 4
#: scenes held out of training, and how many consecutive ones share a background step (see `held_out_scenes`)
HELD_OUT_COUNT = 18
HELD_OUT_PER_BACKGROUND_STEP = 6
#: the caption noun when the prompt does not name the shape
GENERIC_NOUN = "shape"


class Attribute(enum.Enum):
    """One attribute of a scene; the value is the name of the `Scene` field (and of the scorer's `Reading` field)."""

    SHAPE = "shape"
    COLOUR = "colour"
    BACKGROUND = "background"
    POSITION = "position"


ALL_ATTRIBUTES: frozenset[Attribute] = frozenset(Attribute)

_ALLOWED: dict[Attribute, tuple[str, ...]] = {
    Attribute.SHAPE: SHAPES,
    Attribute.COLOUR: tuple(COLOURS),
    Attribute.BACKGROUND: tuple(COLOURS),
    Attribute.POSITION: POSITIONS,
}


@dataclasses.dataclass(frozen=True)
class Scene:
    """One filled `colour` `shape` at `position` on a flat `background`; the colours must differ."""

    shape: str
    colour: str
    background: str
    position: str

    def __post_init__(self) -> None:
        for attribute, allowed in _ALLOWED.items():
            value = getattr(self, attribute.value)
            if value not in allowed:
                raise ValueError(f"{attribute.value} must be one of {allowed}, got {value!r}")
        if self.colour == self.background:
            raise ValueError(f"colour and background must differ, both are {self.colour!r}")

    def caption(self, attributes: frozenset[Attribute] = ALL_ATTRIBUTES) -> str:
        """The caption naming only `attributes`: "a red circle on a blue background, top left" when all are named,
        "a red shape ..." without the shape, no adjective without the colour, no " on a ... background" without the
        background, no ", <position>" without the position, and "" (the empty prompt) when none are named."""
        if not attributes:
            return ""
        noun = self.shape if Attribute.SHAPE in attributes else GENERIC_NOUN
        text = f"a {self.colour} {noun}" if Attribute.COLOUR in attributes else f"a {noun}"
        if Attribute.BACKGROUND in attributes:
            text += f" on a {self.background} background"
        if Attribute.POSITION in attributes:
            text += f", {self.position}"
        return text


def _alternatives(values: tuple[str, ...]) -> str:
    return "|".join(re.escape(value) for value in values)


_CAPTION_PATTERN = re.compile(
    rf"a (?:(?P<colour>{_alternatives(tuple(COLOURS))}) )?"
    rf"(?:(?P<shape>{_alternatives(SHAPES)})|{GENERIC_NOUN})"
    rf"(?: on a (?P<background>{_alternatives(tuple(COLOURS))}) background)?"
    rf"(?:, (?P<position>{_alternatives(POSITIONS)}))?"
)


def parse_caption(text: str) -> dict[Attribute, str]:
    """The attributes a caption names, with their values: the inverse of `Scene.caption` for any attribute subset.

    Surrounding whitespace and letter case are ignored; "" names nothing. Raises ValueError for text outside the
    caption grammar.
    """
    normalised = text.strip().lower()
    if not normalised:
        return {}
    match = _CAPTION_PATTERN.fullmatch(normalised)
    if match is None:
        raise ValueError(f"not a demo caption: {text!r}")
    return {attribute: match[attribute.value] for attribute in Attribute if match[attribute.value] is not None}


# Any word or phrase the captions use for an attribute value or the generic noun, plurals included.
_KNOWN_WORDS = re.compile(rf"\b(?:{_alternatives((*SHAPES, *COLOURS, *POSITIONS, GENERIC_NOUN))})s?\b")


def names_anything_known(prompt: str) -> bool:
    """Whether `prompt` (any text, not only captions) names a shape, colour or position of this world, in any
    letter case: "a photo of a cat" names none, so the demo model can only draw noise-like shapes for it."""
    return _KNOWN_WORDS.search(prompt.lower()) is not None


def all_scenes() -> list[Scene]:
    """Every scene, shape-major then colour, background and position in declaration order (180 scenes)."""
    return [
        Scene(shape, colour, background, position)
        for shape, colour, background, position in itertools.product(SHAPES, COLOURS, COLOURS, POSITIONS)
        if colour != background
    ]


def held_out_scenes() -> list[Scene]:
    """The 18 scenes never shown in training. The k-th has shape k mod 3, colour k mod 4 and position k mod 5 (in
    declaration order), and its background lies 1, 2 or 3 steps further round the palette than its colour for k in
    0-5, 6-11 and 12-17. No scene repeats, each value occurs 4 to 6 times and each pair of values at most twice, while
    every pair of values has at least nine scenes: all values and all pairs of values remain in training."""
    names = tuple(COLOURS)
    return [
        Scene(
            shape=SHAPES[k % len(SHAPES)],
            colour=names[k % len(names)],
            background=names[(k + 1 + k // HELD_OUT_PER_BACKGROUND_STEP) % len(names)],
            position=POSITIONS[k % len(POSITIONS)],
        )
        for k in range(HELD_OUT_COUNT)
    ]


def training_scenes() -> list[Scene]:
    """`all_scenes()` minus `held_out_scenes()`, in the same order (162 scenes)."""
    held_out = set(held_out_scenes())
    return [scene for scene in all_scenes() if scene not in held_out]


def _jittered_colour(colour: tuple[int, int, int], rng: np.random.Generator | None) -> tuple[int, int, int]:
    if rng is None:
        return colour
    offsets = rng.integers(-COLOUR_JITTER, COLOUR_JITTER, size=3, endpoint=True)  # (3,)
    red, green, blue = np.clip(np.array(colour) + offsets, 0, 255).tolist()
    return red, green, blue


def render(scene: Scene, size: tuple[int, int] = (64, 64), rng: np.random.Generator | None = None) -> np.ndarray:
    """The scene as an (H, W, 3) uint8 image, `size` = (height, width).

    The object's extent (circle diameter, square side, triangle base and height) is `OBJECT_EXTENT` of the shorter
    side; its bounding box is centred on `POSITION_CENTRES[scene.position]`. The triangle points up. With `rng`, the
    scale, the centre and both colours get a small uniform jitter (see the JITTER constants); with None the render is
    canonical. Edges are antialiased by drawing at `SUPERSAMPLING` times the size and box-downsampling.
    """
    from PIL import Image, ImageDraw  # here, not at module level: the scorer imports this module and needs numpy only

    height, width = size
    if min(height, width) < 1:
        raise ValueError(f"size must be positive, got {size}")
    scale = 1.0 if rng is None else rng.uniform(1 - SCALE_JITTER, 1 + SCALE_JITTER)
    fx, fy = POSITION_CENTRES[scene.position]
    if rng is not None:
        fx += rng.uniform(-CENTRE_JITTER, CENTRE_JITTER)
        fy += rng.uniform(-CENTRE_JITTER, CENTRE_JITTER)
    foreground = _jittered_colour(COLOURS[scene.colour], rng)
    background = _jittered_colour(COLOURS[scene.background], rng)

    # Supersampled pixel units: pixel (i, j) covers [j, j + 1) x [i, i + 1).
    cx, cy = fx * width * SUPERSAMPLING, fy * height * SUPERSAMPLING
    half = OBJECT_EXTENT * scale * min(height, width) * SUPERSAMPLING / 2
    canvas = Image.new("RGB", (width * SUPERSAMPLING, height * SUPERSAMPLING), background)
    draw = ImageDraw.Draw(canvas)
    # Pillow's boxes include their far edge, hence the - 1 on x1 and y1.
    box = (cx - half, cy - half, cx + half - 1, cy + half - 1)
    if scene.shape == "circle":
        draw.ellipse(box, fill=foreground)
    elif scene.shape == "square":
        draw.rectangle(box, fill=foreground)
    else:
        draw.polygon([(cx, cy - half), (cx + half, cy + half), (cx - half, cy + half)], fill=foreground)
    return np.array(canvas.resize((width, height), Image.BOX))  # (H, W, 3), writable
