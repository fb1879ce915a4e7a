"""The book chapter's experiments on the demo model, measured: each one a contact sheet, a curve and the numbers.

The chapter shows with pictures what guidance, the number of steps, a negative prompt, the image size, several images
per prompt and the empty prompt do. Here each experiment sweeps one pipeline argument over a few values (the
columns), generates a fixed set of prompts at each value from one seed, reads every image with the demo scorer
(`sdrt.demo.scorer`) and writes:

- `<name>.png`, a contact sheet: rows are prompts (or, with several images per prompt, the images of one prompt),
  columns the swept values;
- `<name>-curve.png`, the metric against the swept value, when there is one (prompt accuracy for most experiments,
  the share of images showing the negated value for the negative prompt);
- `<name>.json`, every number, every image's reading and the command line that made them.

Every column is generated from the same seed with the same prompts in the same order, so row i starts from the same
initial noise in every column and the columns differ only in the swept value (the sizes experiment excepted: noise
of another size is other noise). A column is one pipeline call, or, beyond `MAX_BATCH_IMAGES` images, several calls
on consecutive slices of the very noise one call would draw (`initial_noise`), so batching never changes a result.

Prompts are samples of the scenes' captions that cover every attribute value evenly (`sample_scenes`); the first
samples include the scenes held out of training, so accuracy mixes recall with composition of known parts (the JSON
splits the two).
"""
from __future__ import annotations

import collections
import dataclasses
import enum
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from sdrt.demo import plots
from sdrt.demo.scenes import ALL_ATTRIBUTES, COLOURS, POSITIONS, SHAPES, Attribute, Scene, held_out_scenes, parse_caption
from sdrt.demo.scorer import MIN_SIDE, Reading, Score, read_image, score
from sdrt.engine.atomic import atomic_file
from sdrt.engine.checks import is_finite_number, is_int
from sdrt.engine.errors import InvalidArgumentError
from sdrt.engine.version import SDRT_VERSION

if TYPE_CHECKING:
    from PIL import Image

    from sdrt.engine.deepcache import DeepCache
    from sdrt.engine.manifest import ModelConfig
    from sdrt.engine.pipeline import StableDiffusionPipeline

logger = logging.getLogger(__name__)

#: the fixed arguments of every experiment, as in the chapter: 50 PNDM steps at guidance 7.5
NUM_INFERENCE_STEPS = 50
GUIDANCE_SCALE = 7.5
#: prompts per sampled column (per part for the negative prompt)
DEFAULT_PROMPTS = 24
NEGATIVE_PROMPTS_PER_PART = 12
#: the most images one pipeline call generates (guidance doubles the U-Net batch internally)
MAX_BATCH_IMAGES = 32
#: prompt rows shown on a contact sheet (split evenly between the parts of the negative prompt)
SHEET_ROWS = 6
IMAGES_PER_PROMPT = 8

_COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)


class Metric(enum.Enum):
    """What an experiment measures."""

    #: `scorer.score(images, [parse_caption(prompt) ...]).prompt`: the share of images showing all their prompt names
    PROMPT_ACCURACY = "prompt accuracy"
    #: the share of images whose object shows the attribute value the negative prompt names, without and with it
    NEGATED_VALUE = "share showing the negated value"
    #: how often the scorer reads each shape, colour, background and position (None: could not tell)
    READINGS = "reading counts"


class Axis(enum.Enum):
    """How the curve spaces the swept values."""

    LINEAR = "linear"
    LOG = "log"
    CATEGORY = "category"


class Prompts(enum.Enum):
    """Where an experiment's prompts come from."""

    #: full captions of `sample_scenes(count)`
    SAMPLE = "sampled full captions"
    #: captions naming no colour (for negating each colour) and captions naming no shape (for negating each shape)
    NEGATION = "captions without the colour, and without the shape"
    #: the experiment's `fixed_prompts`
    FIXED = "fixed"


@dataclasses.dataclass(frozen=True)
class Experiment:
    """One sweep: the pipeline argument `parameter` takes each of `values` (the columns), all else fixed."""

    name: str
    title: str
    parameter: str  # guidance_scale, num_inference_steps, negative_prompt, size ((height, width)), num_images_per_prompt, prompt
    values: tuple[Any, ...]
    metric: Metric
    prompts: Prompts = Prompts.SAMPLE
    fixed_prompts: tuple[str, ...] = ()
    default_prompts: int = DEFAULT_PROMPTS  # for sampled prompts; `run(sample_prompts=...)` overrides it
    num_images_per_prompt: int = 1
    axis: Axis = Axis.CATEGORY


def sample_scenes(count: int) -> list[Scene]:
    """`count` distinct scenes spread evenly over every attribute value: the k-th has shape k mod 3, colour k mod 4,
    position k mod 5 and its background 1 + (k // 3) mod 3 steps round the palette from its colour. The first 180
    are all the scenes once each; 6 of the first 24 (k = 0, 1, 2, 15, 16, 17) are held out of training."""
    if not is_int(count) or not 1 <= count <= len(SHAPES) * len(COLOURS) * (len(COLOURS) - 1) * len(POSITIONS):
        raise InvalidArgumentError("sample_prompts", f"must be an integer between 1 and 180 (the distinct scenes), got {count!r}")
    scenes = []
    for k in range(count):
        colour = k % len(_COLOUR_NAMES)
        background = (colour + 1 + (k // 3) % 3) % len(_COLOUR_NAMES)
        scenes.append(Scene(SHAPES[k % len(SHAPES)], _COLOUR_NAMES[colour], _COLOUR_NAMES[background], POSITIONS[k % len(POSITIONS)]))
    return scenes


MAX_PARTIAL_CAPTIONS = 60


def captions_without(omitted: Attribute, count: int) -> list[str]:
    """`count` distinct captions naming every attribute but `omitted` ("a circle on a blue background, top left"
    without colour): shape k mod 3, colour k mod 4, background 1 + k mod 3 steps round the palette from the colour,
    position k mod 5, so at most MAX_PARTIAL_CAPTIONS."""
    if not is_int(count) or not 1 <= count <= MAX_PARTIAL_CAPTIONS:
        raise InvalidArgumentError(
            "sample_prompts", f"must be between 1 and {MAX_PARTIAL_CAPTIONS} for the negative prompt, got {count!r}")
    captions = []
    for k in range(count):
        colour = k % len(_COLOUR_NAMES)
        background = (colour + 1 + k % 3) % len(_COLOUR_NAMES)
        scene = Scene(SHAPES[k % len(SHAPES)], _COLOUR_NAMES[colour], _COLOUR_NAMES[background], POSITIONS[k % len(POSITIONS)])
        captions.append(scene.caption(ALL_ATTRIBUTES - {omitted}))
    return captions


EXPERIMENTS: dict[str, Experiment] = {
    experiment.name: experiment
    for experiment in (
        Experiment("guidance", "Guidance scale 0 -> 10 (chapter figure 15.8)", "guidance_scale",
                   (0.0, 1.0, 2.0, 3.0, 5.0, 7.5, 10.0), Metric.PROMPT_ACCURACY, axis=Axis.LINEAR),
        Experiment("steps", "Denoising steps 1, 3, 10, 50", "num_inference_steps", (1, 3, 10, 50),
                   Metric.PROMPT_ACCURACY, axis=Axis.LOG),
        Experiment("negative-prompt", "A negative prompt naming the colour or the shape removes it", "negative_prompt",
                   ("", *_COLOUR_NAMES, *SHAPES), Metric.NEGATED_VALUE, prompts=Prompts.NEGATION,
                   default_prompts=NEGATIVE_PROMPTS_PER_PART),
        Experiment("sizes", "Image sizes (height x width)", "size", ((48, 48), (64, 64), (96, 96), (64, 96), (128, 128)),
                   Metric.PROMPT_ACCURACY),
        Experiment("images-per-prompt", f"{IMAGES_PER_PROMPT} images of one prompt from one seed", "num_images_per_prompt",
                   (IMAGES_PER_PROMPT,), Metric.PROMPT_ACCURACY, prompts=Prompts.FIXED,
                   fixed_prompts=(held_out_scenes()[0].caption(),), num_images_per_prompt=IMAGES_PER_PROMPT),
        Experiment("empty-prompt", f"The empty prompt: {IMAGES_PER_PROMPT} images", "prompt", ("",), Metric.READINGS,
                   prompts=Prompts.FIXED, fixed_prompts=("",), num_images_per_prompt=IMAGES_PER_PROMPT),
    )
}


@dataclasses.dataclass(frozen=True)
class Call:
    """One column of an experiment, or one part of it: `prompts` generated with these arguments from one seed."""

    value: Any  # the swept value
    part: str | None  # negative prompt: "colour" or "shape" (which attribute the column negates or its baseline)
    prompts: tuple[str, ...]
    negative_prompt: str | None
    num_inference_steps: int
    guidance_scale: float
    height: int
    width: int
    num_images_per_prompt: int
    deepcache: DeepCache | None = None

    @property
    def num_images(self) -> int:
        return len(self.prompts) * self.num_images_per_prompt

    def arguments(self) -> dict[str, Any]:
        """The pipeline's keyword arguments for this call, apart from the prompts and the seed."""
        return {
            "negative_prompt": self.negative_prompt,
            "num_inference_steps": self.num_inference_steps,
            "guidance_scale": self.guidance_scale,
            "num_images_per_prompt": self.num_images_per_prompt,
            "height": self.height,
            "width": self.width,
            "deepcache": self.deepcache,
        }

    def wanted(self) -> list[dict[Attribute, str]]:
        """What each image's prompt names, image by image (prompt-major)."""
        return [parse_caption(prompt) for prompt in self.prompts for _ in range(self.num_images_per_prompt)]


@dataclasses.dataclass(frozen=True)
class Column:
    """A generated call: (N, H, W, 3) uint8 images, prompt-major, what the scorer reads in each, and their score
    against what their prompts name."""

    call: Call
    images: np.ndarray
    readings: tuple[Reading, ...]
    score: Score
    seconds: float


@dataclasses.dataclass(frozen=True)
class Negation:
    """One negated attribute value: the share of `images` showing it without and with it as the negative prompt."""

    attribute: str
    value: str
    images: int
    without: float
    with_negative: float


@dataclasses.dataclass(frozen=True)
class SweepResult:
    experiment: Experiment
    seed: int
    columns: tuple[Column, ...]
    bundle: str
    backend: str
    seconds: float

    def accuracy(self) -> list[float]:
        """Prompt accuracy per column (PROMPT_ACCURACY experiments)."""
        return [column.score.prompt for column in self.columns]

    def negations(self) -> list[Negation]:
        """Per negated value, the share of images showing it without and with the negative prompt (NEGATED_VALUE).
        A colour counts only on prompts whose background is another colour; both shares are over the same prompts
        and initial noise."""
        rows = []
        for part, attribute in (("colour", Attribute.COLOUR), ("shape", Attribute.SHAPE)):
            baseline = next(c for c in self.columns if c.call.part == part and not c.call.negative_prompt)
            for column in self.columns:
                if column.call.part != part or not column.call.negative_prompt:
                    continue
                value = column.call.negative_prompt
                counted = [i for i, wanted in enumerate(column.call.wanted()) if wanted.get(Attribute.BACKGROUND) != value]
                rows.append(Negation(part, value, len(counted), _share(baseline.readings, counted, attribute, value),
                                     _share(column.readings, counted, attribute, value)))
        return rows

    def reading_counts(self) -> dict[str, dict[str, int]]:
        """How many images read as each value of each attribute ("None": the scorer could not tell)."""
        readings = [reading for column in self.columns for reading in column.readings]
        return {
            attribute.value: dict(collections.Counter(str(getattr(r, attribute.value)) for r in readings).most_common())
            for attribute in Attribute
        }

    def summary(self) -> str:
        """One line: the metric at each swept value."""
        experiment = self.experiment
        if experiment.metric is Metric.NEGATED_VALUE:
            shares = ", ".join(f"{n.value} {n.without:.2f}->{n.with_negative:.2f}" for n in self.negations())
            return f"{experiment.name}: share showing the negated value, without -> with negative prompt: {shares}"
        if experiment.metric is Metric.READINGS:
            counts = "; ".join(f"{attribute} " + ", ".join(f"{value} {count}" for value, count in values.items())
                               for attribute, values in self.reading_counts().items())
            return f"{experiment.name}: {sum(c.call.num_images for c in self.columns)} images read as {counts}"
        if len(self.columns) == 1:
            column = self.columns[0]
            return f"{experiment.name}: prompt accuracy {column.score.prompt:.2f} over {column.score.n} images"
        accuracy = " ".join(f"{value:.2f}" for value in self.accuracy())
        values = " ".join(_value_text(column.call.value) for column in self.columns)
        return f"{experiment.name}: prompt accuracy {accuracy} at {experiment.parameter} {values}"


def _share(readings: Sequence[Reading], indices: Sequence[int], attribute: Attribute, value: str) -> float:
    """The share of `readings[indices]` whose `attribute` reads `value` (nan for no indices)."""
    if not indices:
        return math.nan
    return sum(getattr(readings[i], attribute.value) == value for i in indices) / len(indices)


def _value_text(value: Any) -> str:
    """A swept value as labels show it: 7.5, 64x96, (none) for the empty negative prompt."""
    if isinstance(value, tuple):
        return "x".join(str(v) for v in value)
    if isinstance(value, float):
        return f"{value:g}"
    if value == "":
        return "(none)"
    return str(value)


def _check_size(experiment: Experiment, size: Any, model: ModelConfig) -> tuple[int, int]:
    factor, largest = model.vae_scale_factor, model.image_sides.maximum
    # the scorer reads nothing smaller than MIN_SIDE
    smallest = max(model.image_sides.minimum, factor * math.ceil(MIN_SIDE / factor))
    valid = (isinstance(size, (tuple, list)) and len(size) == 2 and all(is_int(side) for side in size)
             and all(smallest <= side <= largest and side % factor == 0 for side in size))
    if not valid:
        raise InvalidArgumentError(
            "size", f"{size!r} in experiment {experiment.name!r}: height and width must be multiples of the model's "
            f"vae_scale_factor {factor} between {smallest} and {largest}"
        )
    return int(size[0]), int(size[1])


def plan(pipe: StableDiffusionPipeline, experiment: Experiment, sample_prompts: int | None = None, steps: int | None = None,
         size: tuple[int, int] | None = None) -> tuple[Call, ...]:
    """The calls `run` makes, every argument checked against `pipe`'s model first (so nothing runs on a bad one).

    `sample_prompts` overrides the number of sampled prompts (per part for the negative prompt; fixed prompts ignore
    it); `steps` the fixed number of steps and `size` the fixed (height, width), for quick runs. Neither applies to
    the experiment that sweeps it. Raises InvalidArgumentError naming the bad parameter.
    """
    model = pipe.manifest.model
    if steps is not None and experiment.parameter == "num_inference_steps":
        raise InvalidArgumentError("steps", f"the {experiment.name} experiment sweeps the number of steps: no fixed steps to override")
    if size is not None and experiment.parameter == "size":
        raise InvalidArgumentError("size", f"the {experiment.name} experiment sweeps the size: no fixed size to override")
    height, width = (model.default_image_size,) * 2 if size is None else _check_size(experiment, size, model)
    step_values = experiment.values if experiment.parameter == "num_inference_steps" else (NUM_INFERENCE_STEPS if steps is None else steps,)
    for value in step_values:
        try:
            pipe.scheduler.start(value)
        except (ValueError, TypeError) as exc:
            raise InvalidArgumentError("num_inference_steps", f"{value!r}: {exc}") from None
    if experiment.parameter == "guidance_scale" and not all(is_finite_number(v) for v in experiment.values):
        raise InvalidArgumentError("guidance_scale", f"must be finite numbers, got {experiment.values!r}")
    count = experiment.default_prompts if sample_prompts is None else sample_prompts
    base = Call(value=None, part=None, prompts=(), negative_prompt=None,
                num_inference_steps=NUM_INFERENCE_STEPS if steps is None else int(steps), guidance_scale=GUIDANCE_SCALE,
                height=height, width=width, num_images_per_prompt=experiment.num_images_per_prompt)

    if experiment.prompts is Prompts.NEGATION:
        parts = {"colour": (tuple(captions_without(Attribute.COLOUR, count)), _COLOUR_NAMES),
                 "shape": (tuple(captions_without(Attribute.SHAPE, count)), SHAPES)}
        calls = []
        for part, (prompts, negatable) in parts.items():
            for value in experiment.values:
                if value == "" or value in negatable:
                    calls.append(dataclasses.replace(base, value=value, part=part, prompts=prompts, negative_prompt=value or None))
        return tuple(calls)

    if experiment.prompts is Prompts.FIXED:
        prompts = experiment.fixed_prompts
    else:
        scenes, held_out = sample_scenes(count), set(held_out_scenes())
        prompts = tuple(scene.caption() for scene in scenes)
        logger.info("%s: %d prompts, %d of them held out of training", experiment.name, len(scenes),
                    sum(scene in held_out for scene in scenes))
    base = dataclasses.replace(base, prompts=prompts)
    calls = []
    for value in experiment.values:
        if experiment.parameter == "size":
            h, w = _check_size(experiment, value, model)
            calls.append(dataclasses.replace(base, value=(h, w), height=h, width=w))
        elif experiment.parameter in ("guidance_scale", "num_inference_steps", "num_images_per_prompt"):
            calls.append(dataclasses.replace(base, value=value, **{experiment.parameter: value}))
        elif experiment.parameter == "prompt":
            calls.append(dataclasses.replace(base, value=value, prompts=(value,)))
        else:
            raise InvalidArgumentError("parameter", f"experiment {experiment.name!r} sweeps {experiment.parameter!r}, which sweep cannot vary")
    return tuple(calls)


def initial_noise(pipe: StableDiffusionPipeline, count: int, height: int, width: int, seed: int) -> np.ndarray:
    """The (count, C, height / f, width / f) float32 noise `pipe` draws itself for `count` images from `seed`
    (numpy's Generator seeded with it, as StableDiffusionPipeline documents): slices of it reproduce one call's images
    in several smaller calls."""
    model, f = pipe.manifest.model, pipe.manifest.model.vae_scale_factor
    shape = (count, model.latent_channels, height // f, width // f)
    return np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)


def to_uint8(images: np.ndarray) -> np.ndarray:
    """(N, H, W, 3) floats in [0, 1] -> uint8, rounded as the pipeline's PIL output (and so `sdrt generate`'s PNGs) are."""
    return (images * 255).round().astype(np.uint8)


def generate(pipe: StableDiffusionPipeline, call: Call, seed: int, progress: Callable[[int], None] | None = None) -> np.ndarray:
    """The call's (N, H, W, 3) uint8 images, prompt-major: one pipeline call with `seed`, or, beyond
    MAX_BATCH_IMAGES images, several on consecutive slices of the noise that one call would draw."""
    per_call = max(1, MAX_BATCH_IMAGES // call.num_images_per_prompt)  # prompts per pipeline call
    arguments = call.arguments()
    if len(call.prompts) <= per_call:
        images = pipe(list(call.prompts), seed=seed, output_type="np", **arguments).images  # (N, H, W, 3)
        if progress is not None:
            progress(call.num_images)
        return to_uint8(images)
    noise = initial_noise(pipe, call.num_images, call.height, call.width, seed)  # (N, C, h, w)
    batches = []
    for start in range(0, len(call.prompts), per_call):
        prompts = call.prompts[start: start + per_call]
        first, stop = start * call.num_images_per_prompt, (start + len(prompts)) * call.num_images_per_prompt
        batches.append(pipe(list(prompts), latents=noise[first:stop], output_type="np", **arguments).images)
        if progress is not None:
            progress(stop - first)
    return to_uint8(np.concatenate(batches))  # (N, H, W, 3)


def run(pipe: StableDiffusionPipeline, experiment: Experiment, seed: int = 0, sample_prompts: int | None = None, steps: int | None = None,
        size: tuple[int, int] | None = None, progress: Callable[[int], None] | None = None) -> SweepResult:
    """Generate and score every column of `experiment` with `pipe` (see `plan` for the overrides); `progress` is
    called with the number of images each pipeline call made."""
    if not is_int(seed) or seed < 0:
        raise InvalidArgumentError("seed", f"must be a non-negative integer, got {seed!r}")
    calls = plan(pipe, experiment, sample_prompts, steps, size)
    started = time.perf_counter()
    columns = []
    for call in calls:
        column_start = time.perf_counter()
        images = generate(pipe, call, seed, progress)
        readings = tuple(read_image(image) for image in images)
        columns.append(Column(call, images, readings, score(list(images), call.wanted()), time.perf_counter() - column_start))
        logger.info("%s %s=%s: prompt accuracy %.3f", experiment.name, experiment.parameter, call.value, columns[-1].score.prompt)
    return SweepResult(experiment, seed, tuple(columns), str(pipe.bundle_dir), pipe.backend.name, time.perf_counter() - started)


# ---- output ----------------------------------------------------------------------------------------------------------
def _row_label(prompt: str, held_out: set[str]) -> str:
    if prompt == "":
        return '"" (the empty prompt)'
    return f"{prompt} (held out)" if prompt in held_out else prompt


def _column_label(parameter: str, value: Any) -> str:
    return f"{parameter}\n{_value_text(value)}"


def _fixed_text(result: SweepResult) -> str:
    """The arguments every column shares, for titles."""
    call, parameter = result.columns[0].call, result.experiment.parameter
    parts = [f"seed {result.seed}"]
    if parameter != "num_inference_steps":
        parts.append(f"{call.num_inference_steps} steps")
    if parameter != "guidance_scale":
        parts.append(f"guidance {call.guidance_scale:g}")
    if parameter != "size":
        parts.append(f"{call.height}x{call.width}")
    if call.num_images_per_prompt > 1:
        parts.append(f"num_images_per_prompt {call.num_images_per_prompt}")
    return ", ".join(parts)


@dataclasses.dataclass(frozen=True)
class Sheet:
    """A contact sheet's content: `cells[row][column]` (None: blank) are images of `result.columns`."""

    cells: list[list[np.ndarray | None]]
    row_labels: list[str]
    column_labels: list[str]
    title: str


def sheet(result: SweepResult, rows: int = SHEET_ROWS) -> Sheet:
    """The contact sheet of `result`: with several images per prompt, one row per prompt and one column per image;
    otherwise the first `rows` prompts (split between the parts of the negative prompt) against the swept values."""
    experiment = result.experiment
    held_out = {scene.caption() for scene in held_out_scenes()}
    title = f"{experiment.title}\n{_fixed_text(result)}"
    if experiment.num_images_per_prompt > 1:
        column = result.columns[0]
        per_prompt = column.call.num_images_per_prompt
        cells = [[column.images[p * per_prompt + i] for i in range(per_prompt)] for p in range(len(column.call.prompts))]
        return Sheet(cells, [_row_label(p, held_out) for p in column.call.prompts],
                     [f"image {i}" for i in range(per_prompt)], title)
    parts = list(dict.fromkeys(column.call.part for column in result.columns))
    per_part = max(1, math.ceil(rows / len(parts)))
    cells, row_labels = [], []
    for part in parts:
        part_columns = {column.call.value: column for column in result.columns if column.call.part == part}
        prompts = next(iter(part_columns.values())).call.prompts
        for index in range(min(per_part, len(prompts))):  # one image per prompt here
            cells.append([part_columns[value].images[index] if value in part_columns else None for value in experiment.values])
            row_labels.append(_row_label(prompts[index], held_out))
    return Sheet(cells, row_labels, [_column_label(experiment.parameter, value) for value in experiment.values], title)


def _finite(value: Any) -> Any:
    """JSON has no NaN: None instead."""
    return None if isinstance(value, float) and math.isnan(value) else value


def _score_json(value: Score) -> dict[str, Any]:
    return {key: _finite(item) for key, item in dataclasses.asdict(value).items()}


def _value_json(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def to_json(result: SweepResult, command_line: str, files: Sequence[str] = ()) -> dict[str, Any]:
    """Every number of `result`: arguments, per-column scores (and, for full captions, held-out vs training), the
    metric, and each image's reading."""
    experiment = result.experiment
    held_out = {scene.caption() for scene in held_out_scenes()}
    columns, images = [], []
    for index, column in enumerate(result.columns):
        call = column.call
        entry: dict[str, Any] = {
            "value": _value_json(call.value), "part": call.part, "num_images": call.num_images,
            "arguments": {**call.arguments(), "seed": result.seed}, "score": _score_json(column.score),
            "seconds": round(column.seconds, 3),
        }
        if experiment.prompts is Prompts.SAMPLE:
            wanted = call.wanted()
            for subset, keep in (("held_out", True), ("training", False)):
                chosen = [i for i, prompt in enumerate(call.prompts) for _ in range(call.num_images_per_prompt)
                          if (prompt in held_out) is keep]
                if chosen:
                    entry[f"score_{subset}"] = _score_json(score([column.images[i] for i in chosen], [wanted[i] for i in chosen]))
        columns.append(entry)
        for image_index, (reading, wanted) in enumerate(zip(column.readings, call.wanted())):
            images.append({
                "column": index, "prompt": call.prompts[image_index // call.num_images_per_prompt],
                "image_index": image_index % call.num_images_per_prompt, "reading": dataclasses.asdict(reading),
                "right": reading.matches(wanted),
            })
    first = result.columns[0].call
    swept = ("height", "width") if experiment.parameter == "size" else (experiment.parameter,)
    document: dict[str, Any] = {
        "experiment": experiment.name,
        "title": experiment.title,
        "parameter": experiment.parameter,
        "values": [_value_json(value) for value in experiment.values],
        "metric": experiment.metric.value,
        "command": command_line,
        "seed": result.seed,
        "fixed": {key: value for key, value in {**first.arguments(), "seed": result.seed}.items() if key not in swept},
        "prompts": {part or "all": list(dict.fromkeys(p for c in result.columns if c.call.part == part for p in c.call.prompts))
                    for part in dict.fromkeys(c.call.part for c in result.columns)},
        "held_out_prompts": sorted({p for c in result.columns for p in c.call.prompts} & held_out),
        "bundle": result.bundle,
        "backend": result.backend,
        "sdrt_version": SDRT_VERSION,
        "seconds": round(result.seconds, 3),
        "files": list(files),
        "summary": result.summary(),
        "columns": columns,
    }
    if experiment.metric is Metric.PROMPT_ACCURACY:
        document["accuracy"] = [_finite(value) for value in result.accuracy()]
    elif experiment.metric is Metric.NEGATED_VALUE:
        document["negations"] = [
            {"attribute": n.attribute, "negated": n.value, "images": n.images, "without": _finite(n.without),
             "with": _finite(n.with_negative)} for n in result.negations()
        ]
    else:
        document["reading_counts"] = result.reading_counts()
    document["images"] = images
    return document


def chart(result: SweepResult) -> Image.Image | None:
    """The metric's chart (a PIL image), or None when the experiment has no curve: one column, or reading counts."""
    experiment = result.experiment
    subtitle = f"{experiment.title}\n{_fixed_text(result)}"
    if experiment.metric is Metric.NEGATED_VALUE:
        negations = result.negations()
        return plots.bar_chart(
            [n.value for n in negations],
            {"no negative prompt": [n.without for n in negations], "the value as negative prompt": [n.with_negative for n in negations]},
            subtitle, "negated value (colour: prompts naming no colour; shape: prompts naming no shape)",
            "share of images showing the value",
        )
    if experiment.metric is not Metric.PROMPT_ACCURACY or len(result.columns) < 2:
        return None
    values = [column.call.value for column in result.columns]
    positions = None  # Axis.CATEGORY: evenly spaced
    if experiment.axis is Axis.LINEAR:
        positions = [float(v) for v in values]
    elif experiment.axis is Axis.LOG:
        positions = [math.log10(v) for v in values]
    series = {"prompt (all named)": result.accuracy()}
    series.update({attribute.value: [getattr(c.score, attribute.value) for c in result.columns] for attribute in Attribute})
    n = result.columns[0].score.n
    return plots.line_chart([_value_text(v) for v in values], series, subtitle,
                            f"{experiment.parameter}{' (log scale)' if experiment.axis is Axis.LOG else ''}",
                            f"share of {n} images right", x_positions=positions)


def _save_png(image: Image.Image, path: Path) -> None:
    with atomic_file(path) as staging:
        image.save(staging, format="PNG")


def write(result: SweepResult, out_dir: Path, command_line: str) -> list[Path]:
    """Write `<name>.png` (the contact sheet), `<name>-curve.png` (when the experiment has a chart) and `<name>.json`
    into `out_dir`, each atomically; return their paths in that order."""
    out_dir = Path(out_dir)
    name = result.experiment.name
    content = sheet(result)
    paths = [out_dir / f"{name}.png"]
    _save_png(plots.contact_sheet(content.cells, content.row_labels, content.column_labels, content.title), paths[0])
    figure = chart(result)
    if figure is not None:
        paths.append(out_dir / f"{name}-curve.png")
        _save_png(figure, paths[-1])
    paths.append(out_dir / f"{name}.json")
    document = to_json(result, command_line, [path.name for path in paths])
    with atomic_file(paths[-1]) as staging:
        staging.write_text(json.dumps(document, indent=1, ensure_ascii=False, allow_nan=False) + "\n", encoding="utf-8")
    return paths
