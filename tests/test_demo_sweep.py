"""`sdrt sweep` (sdrt.demo.sweep, sdrt.demo.plots): the chapter's experiments as contact sheets, curves and JSON.

The tiny bundle's weights are random, so its images are noise: these tests check the structure (every file, every
number, the grid's order against direct pipeline calls) and that each metric is the scorer's verdict on the very
images shown, not any accuracy value. Runs are tiny: 3 prompts (per part), 2 steps, 64x64.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdrt.demo import plots, sweep
from sdrt.demo.scenes import Attribute, held_out_scenes, parse_caption
from sdrt.demo.scorer import read_image, score
from sdrt.cli.main import main
from sdrt.engine.errors import InvalidArgumentError

PROMPTS, STEPS, SIZE, SEED = 3, 2, (64, 64), 0
SCALE = 2  # 64-px cells are upscaled twice to reach plots.MIN_CELL_SIDE (96)
WITH_CURVE = {"guidance", "steps", "negative-prompt", "sizes"}


def _strict_json(path: Path) -> dict:
    def reject(constant: str):
        raise AssertionError(f"{path.name} holds {constant}, which is not JSON")

    return json.loads(path.read_text(encoding="utf-8"), parse_constant=reject)


#: the sizes experiment's sides are the 64-px default model's; the tiny model (trained at 256 px) runs 64..1024
TINY_SIZES = ((64, 64), (72, 72), (96, 96), (64, 96), (128, 128))
EXPERIMENTS = {**sweep.EXPERIMENTS, "sizes": dataclasses.replace(sweep.EXPERIMENTS["sizes"], values=TINY_SIZES)}


@pytest.fixture(scope="module")
def results(tiny_pipe) -> dict[str, sweep.SweepResult]:
    return {
        name: sweep.run(tiny_pipe, experiment, seed=SEED, sample_prompts=PROMPTS,
                        steps=None if experiment.parameter == "num_inference_steps" else STEPS,
                        size=None if experiment.parameter == "size" else SIZE)
        for name, experiment in EXPERIMENTS.items()
    }


@pytest.fixture(scope="module")
def written(results, tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Path]]:
    out = tmp_path_factory.mktemp("sweep")
    return {name: sweep.write(result, out, f"sdrt sweep --experiment {name}") for name, result in results.items()}


def _direct(pipe, prompts, **arguments) -> np.ndarray:
    """The uint8 images of one plain pipeline call with the sweep's fixed arguments."""
    call = {"num_inference_steps": STEPS, "guidance_scale": sweep.GUIDANCE_SCALE, "height": SIZE[0], "width": SIZE[1],
            "seed": SEED, **arguments}
    return sweep.to_uint8(pipe(list(prompts), output_type="np", **call).images)


def _cell(sheet: Image.Image, row: int, column: int, column_widths, row_height: int) -> np.ndarray:
    x = plots.ROW_LABEL_WIDTH + plots.PAD + sum(column_widths[:column]) + column * plots.PAD
    y = plots.TITLE_HEIGHT + plots.HEADER_HEIGHT + plots.PAD + row * (row_height + plots.PAD)
    return np.asarray(sheet)[y: y + row_height, x: x + column_widths[column]]


# ---- files -------------------------------------------------------------------------------------------------------
def test_every_experiment_writes_its_files(written) -> None:
    assert set(written) == {"guidance", "steps", "negative-prompt", "sizes", "images-per-prompt", "empty-prompt"}
    for name, paths in written.items():
        expected = [f"{name}.png", *([f"{name}-curve.png"] if name in WITH_CURVE else []), f"{name}.json"]
        assert [path.name for path in paths] == expected
        for path in paths[:-1]:
            with Image.open(path) as image:
                assert image.format == "PNG" and image.mode == "RGB"
        document = _strict_json(paths[-1])
        assert document["experiment"] == name and document["files"] == expected
        assert document["command"] == f"sdrt sweep --experiment {name}"
        assert not any(p.name.endswith(".partial") for p in paths[0].parent.iterdir())  # atomic writes leave nothing


@pytest.mark.parametrize("name, rows, columns", [("guidance", PROMPTS, 7), ("steps", PROMPTS, 4),
                                                 ("negative-prompt", 2 * PROMPTS, 8), ("images-per-prompt", 1, 8),
                                                 ("empty-prompt", 1, 8)])
def test_sheet_size_is_the_grid_plus_labels(written, name, rows, columns) -> None:
    cell = SIZE[0] * SCALE
    with Image.open(written[name][0]) as image:
        assert image.size == (
            plots.ROW_LABEL_WIDTH + columns * cell + (columns + 1) * plots.PAD,
            plots.TITLE_HEIGHT + plots.HEADER_HEIGHT + rows * cell + (rows + 1) * plots.PAD,
        )


def test_sizes_sheet_keeps_each_size(written) -> None:
    sizes = TINY_SIZES
    scale = math.ceil(plots.MIN_CELL_SIDE / min(min(size) for size in sizes))
    with Image.open(written["sizes"][0]) as image:
        assert image.size == (
            plots.ROW_LABEL_WIDTH + sum(w * scale for _, w in sizes) + (len(sizes) + 1) * plots.PAD,
            plots.TITLE_HEIGHT + plots.HEADER_HEIGHT + PROMPTS * max(h for h, _ in sizes) * scale + (PROMPTS + 1) * plots.PAD,
        )


# ---- the grid's order, against direct pipeline calls ---------------------------------------------------------------
def test_guidance_cell_is_the_direct_call_upscaled(tiny_pipe, written) -> None:
    prompts = [scene.caption() for scene in sweep.sample_scenes(PROMPTS)]
    column = sweep.EXPERIMENTS["guidance"].values.index(3.0)
    expected = _direct(tiny_pipe, prompts, guidance_scale=3.0)[1]  # row 1
    with Image.open(written["guidance"][0]) as sheet:
        cell = _cell(sheet.convert("RGB"), 1, column, [SIZE[1] * SCALE] * 7, SIZE[0] * SCALE)
    np.testing.assert_array_equal(cell, plots.upscale(expected, SCALE))
    assert not np.array_equal(expected, _direct(tiny_pipe, prompts, guidance_scale=5.0)[1])  # the column matters


def test_negative_prompt_cell_is_the_direct_call_upscaled(tiny_pipe, written) -> None:
    # Rows 0-2: captions without the colour; rows 3-5: captions without the shape. Column "square" negates a shape.
    prompts = sweep.captions_without(Attribute.SHAPE, PROMPTS)
    column = sweep.EXPERIMENTS["negative-prompt"].values.index("square")
    expected = _direct(tiny_pipe, prompts, negative_prompt="square")[0]
    with Image.open(written["negative-prompt"][0]) as sheet:
        rgb = sheet.convert("RGB")
        np.testing.assert_array_equal(_cell(rgb, PROMPTS, column, [SIZE[1] * SCALE] * 8, SIZE[0] * SCALE),
                                      plots.upscale(expected, SCALE))
        blank = _cell(rgb, 0, column, [SIZE[1] * SCALE] * 8, SIZE[0] * SCALE)  # a colour-part row has no shape negation
        assert (blank == plots.BLANK).all()


def test_images_per_prompt_row_is_one_call(tiny_pipe, results) -> None:
    experiment = sweep.EXPERIMENTS["images-per-prompt"]
    expected = _direct(tiny_pipe, experiment.fixed_prompts, num_images_per_prompt=8)
    np.testing.assert_array_equal(results["images-per-prompt"].columns[0].images, expected)
    content = sweep.sheet(results["images-per-prompt"])
    assert len(content.cells) == 1 and content.column_labels == [f"image {i}" for i in range(8)]
    np.testing.assert_array_equal(np.stack(content.cells[0]), expected)


def test_columns_start_from_the_same_noise(results) -> None:
    calls = [column.call for column in results["guidance"].columns]
    assert len({call.prompts for call in calls}) == 1
    assert [call.guidance_scale for call in calls] == list(sweep.EXPERIMENTS["guidance"].values)


def test_batches_beyond_the_cap_give_the_same_images(tiny_pipe, monkeypatch) -> None:
    call = sweep.plan(tiny_pipe, sweep.EXPERIMENTS["guidance"], PROMPTS, STEPS, SIZE)[-1]
    whole = sweep.generate(tiny_pipe, call, SEED)
    monkeypatch.setattr(sweep, "MAX_BATCH_IMAGES", 2)  # 3 prompts -> calls of 2 and 1 on slices of the same noise
    done: list[int] = []
    split = sweep.generate(tiny_pipe, call, SEED, progress=done.append)
    assert done == [2, 1]
    assert np.abs(whole.astype(np.int16) - split).max() <= 1  # batch size may move a rounding, nothing more


# ---- numbers -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["guidance", "steps", "sizes", "images-per-prompt"])
def test_accuracy_is_the_scorers_on_the_same_images(results, written, name) -> None:
    result, document = results[name], _strict_json(written[name][-1])
    experiment = EXPERIMENTS[name]
    assert document["values"] == [list(v) if isinstance(v, tuple) else v for v in experiment.values]
    assert len(document["columns"]) == len(experiment.values) == len(document["accuracy"])
    for index, column in enumerate(result.columns):
        wanted = [parse_caption(p) for p in column.call.prompts for _ in range(column.call.num_images_per_prompt)]
        expected = score(list(column.images), wanted)
        assert document["accuracy"][index] == expected.prompt == document["columns"][index]["score"]["prompt"]
        assert document["columns"][index]["score"]["n"] == expected.n == len(column.images)
        assert document["columns"][index]["arguments"]["seed"] == SEED
    assert len(document["images"]) == sum(len(c.images) for c in result.columns)
    assert [image["reading"] for image in document["images"]] == [
        dataclasses.asdict(read_image(image)) for column in result.columns for image in column.images]
    assert document["summary"] == result.summary() and document["summary"].startswith(f"{name}: prompt accuracy")


def test_sampled_prompts_and_swept_arguments_are_recorded(results, written) -> None:
    document = _strict_json(written["guidance"][-1])
    prompts = [scene.caption() for scene in sweep.sample_scenes(PROMPTS)]
    assert document["prompts"] == {"all": prompts}
    assert set(document["held_out_prompts"]) == set(prompts) & {s.caption() for s in held_out_scenes()}
    assert document["fixed"]["num_inference_steps"] == STEPS and "guidance_scale" not in document["fixed"]
    assert [c["arguments"]["guidance_scale"] for c in document["columns"]] == list(sweep.EXPERIMENTS["guidance"].values)
    sizes = _strict_json(written["sizes"][-1])
    assert [[c["arguments"]["height"], c["arguments"]["width"]] for c in sizes["columns"]] == sizes["values"]
    assert [c.images.shape[1:3] for c in results["sizes"].columns] == list(EXPERIMENTS["sizes"].values)
    steps = _strict_json(written["steps"][-1])
    assert [c["arguments"]["num_inference_steps"] for c in steps["columns"]] == [1, 3, 10, 50]


def test_negative_prompt_table_is_read_from_the_images(results, written) -> None:
    result, document = results["negative-prompt"], _strict_json(written["negative-prompt"][-1])
    assert [(n["attribute"], n["negated"]) for n in document["negations"]] == [
        *(("colour", c) for c in ("red", "green", "blue", "yellow")), *(("shape", s) for s in ("circle", "square", "triangle"))]
    columns = {(c.call.part, c.call.value): c for c in result.columns}
    assert len(columns) == 9  # a baseline per part, 4 colours, 3 shapes
    for row in document["negations"]:
        attribute, value = row["attribute"], row["negated"]
        kept = [i for i, p in enumerate(columns[(attribute, value)].call.prompts) if parse_caption(p).get(Attribute.BACKGROUND) != value]

        def share(column) -> float:
            return sum(getattr(read_image(column.images[i]), attribute) == value for i in kept) / len(kept)

        assert row["images"] == len(kept)
        assert row["without"] == share(columns[(attribute, "")]) and row["with"] == share(columns[(attribute, value)])
        assert columns[(attribute, value)].call.negative_prompt == value and columns[(attribute, "")].call.negative_prompt is None
    for part, negated in (("colour", Attribute.COLOUR), ("shape", Attribute.SHAPE)):
        prompts = document["prompts"][part]
        assert len(prompts) == PROMPTS and all(negated not in parse_caption(p) for p in prompts)


def test_empty_prompt_counts_what_the_scorer_reads(results, written) -> None:
    result, document = results["empty-prompt"], _strict_json(written["empty-prompt"][-1])
    images = result.columns[0].images
    assert images.shape == (8, *SIZE, 3) and result.columns[0].call.prompts == ("",)
    readings = [read_image(image) for image in images]
    for attribute in Attribute:
        assert document["reading_counts"][attribute.value] == dict(
            collections.Counter(str(getattr(r, attribute.value)) for r in readings))
        assert sum(document["reading_counts"][attribute.value].values()) == 8


class _DrawingPipe:
    """A stand-in pipeline that draws exactly what each prompt names (unnamed attributes: the first allowed value,
    avoiding the negative prompt's), so every metric has a known value and any mis-ordering of prompts, images or
    columns shows as a wrong one."""

    def __init__(self) -> None:
        from types import SimpleNamespace

        from sdrt.engine.manifest import ModelConfig

        model = ModelConfig(latent_channels=4, vae_scale_factor=4, vae_scaling_factor=1.0, sample_size=16,
                            text_hidden_size=64, max_image_size=256)
        self.manifest = SimpleNamespace(model=model)
        self.scheduler = SimpleNamespace(start=lambda steps: None)
        self.backend = SimpleNamespace(name="drawing")
        self.bundle_dir = Path("drawing")
        self.calls: list[int] = []

    def _scene(self, prompt: str, negative: str | None):
        from sdrt.demo.scenes import COLOURS, POSITIONS, SHAPES, Scene

        named = {a.value: v for a, v in parse_caption(prompt).items()}
        shape = named.get("shape") or next(s for s in SHAPES if s != negative)
        background = named.get("background") or next(c for c in COLOURS if c not in (named.get("colour"), negative))
        colour = named.get("colour") or next(c for c in COLOURS if c not in (background, negative))
        return Scene(shape, colour, background, named.get("position") or POSITIONS[0])

    def __call__(self, prompts, negative_prompt=None, num_images_per_prompt=1, height=64, width=64, latents=None,
                 output_type="np", **_):
        from types import SimpleNamespace

        from sdrt.demo.scenes import render

        self.calls.append(len(prompts) * num_images_per_prompt)
        if latents is not None:
            assert latents.shape[0] == len(prompts) * num_images_per_prompt
        images = [render(self._scene(p, negative_prompt), (height, width)) for p in prompts for _ in range(num_images_per_prompt)]
        return SimpleNamespace(images=np.stack(images).astype(np.float32) / 255)


def test_metrics_on_a_pipe_that_draws_its_prompts(monkeypatch) -> None:
    pipe = _DrawingPipe()
    monkeypatch.setattr(sweep, "MAX_BATCH_IMAGES", 5)  # 7 prompts -> calls of 5 and 2
    for name in ("guidance", "sizes", "images-per-prompt"):
        result = sweep.run(pipe, sweep.EXPERIMENTS[name], sample_prompts=7, steps=1)
        assert result.accuracy() == [1.0] * len(sweep.EXPERIMENTS[name].values), name
    assert pipe.calls[:2] == [5, 2]
    negations = {n.value: n for n in sweep.run(pipe, sweep.EXPERIMENTS["negative-prompt"], sample_prompts=7).negations()}
    assert all(n.with_negative == 0.0 for n in negations.values())  # the drawing pipe always obeys
    assert negations["circle"].without == 1.0 and negations["red"].without == 1.0  # its first choices
    empty = sweep.run(pipe, sweep.EXPERIMENTS["empty-prompt"])
    assert empty.reading_counts() == {"shape": {"circle": 8}, "colour": {"green": 8}, "background": {"red": 8},
                                      "position": {"top left": 8}}


# ---- bad arguments -------------------------------------------------------------------------------------------------
def test_a_size_the_model_cannot_make_is_rejected(tiny_pipe) -> None:
    factor = tiny_pipe.manifest.model.vae_scale_factor  # 8 for the tiny model
    bad = dataclasses.replace(sweep.EXPERIMENTS["sizes"], values=((64, 64), (64, 64 + factor // 2)))
    with pytest.raises(InvalidArgumentError, match=rf"^size: .*vae_scale_factor {factor}") as error:
        sweep.run(tiny_pipe, bad, sample_prompts=1, steps=1)
    assert error.value.parameter == "size"
    with pytest.raises(InvalidArgumentError, match="^size: "):
        sweep.plan(tiny_pipe, sweep.EXPERIMENTS["guidance"], size=(8, 8))  # below what the scorer reads
    with pytest.raises(InvalidArgumentError, match="^steps: "):
        sweep.plan(tiny_pipe, sweep.EXPERIMENTS["steps"], steps=2)
    with pytest.raises(InvalidArgumentError, match="^sample_prompts: "):
        sweep.plan(tiny_pipe, sweep.EXPERIMENTS["guidance"], sample_prompts=181)


def test_samples_cover_every_value() -> None:
    scenes = sweep.sample_scenes(180)
    assert len(set(scenes)) == 180
    held_out = set(held_out_scenes())
    assert [k for k, scene in enumerate(scenes[:24]) if scene in held_out] == [0, 1, 2, 15, 16, 17]
    for attribute in Attribute:
        counts = collections.Counter(getattr(scene, attribute.value) for scene in scenes[:24])
        assert max(counts.values()) - min(counts.values()) <= 3, (attribute, counts)
    for captions, missing in ((sweep.captions_without(Attribute.COLOUR, 60), Attribute.COLOUR), (sweep.captions_without(Attribute.SHAPE, 60), Attribute.SHAPE)):
        assert len(set(captions)) == 60
        assert all(set(parse_caption(c)) == set(Attribute) - {missing} for c in captions)


# ---- plots ---------------------------------------------------------------------------------------------------------
def test_contact_sheet_checks_its_grid() -> None:
    image = np.zeros((32, 48, 3), dtype=np.uint8)
    sheet = plots.contact_sheet([[image, None]], ["row"], ["a", "b"], "title")
    layout = plots.sheet_layout([[image, None]])
    assert layout.scale == 3 and sheet.size == layout.size
    x, y = layout.origin(0, 0)
    assert (np.asarray(sheet)[y: y + 96, x: x + 144] == 0).all()
    with pytest.raises(ValueError, match="labels"):
        plots.contact_sheet([[image, None]], ["row"], ["a"], "title")
    with pytest.raises(ValueError, match="rectangular"):
        plots.contact_sheet([[image], [image, image]], ["1", "2"], ["a", "b"], "title")
    chart = plots.line_chart(["0", "1"], {"accuracy": [0.5, math.nan]}, "t", "x", "y", x_positions=[0, 1])
    assert chart.size == plots.CHART_SIZE


# ---- the command ---------------------------------------------------------------------------------------------------
def test_cli_writes_and_prints_paths(tiny_bundle: Path, tmp_path: Path, capsys) -> None:
    argv = ["sweep", str(tiny_bundle), "--experiment", "images-per-prompt", "--out", str(tmp_path), "--steps", "1",
            "--size", "64", "--seed", "3", "--backend", "onnxruntime-cpu", "-q"]
    assert main(argv) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    paths = [tmp_path / "images-per-prompt.png", tmp_path / "images-per-prompt.json"]
    assert lines[:2] == [str(p) for p in paths] and lines[2].startswith("images-per-prompt: prompt accuracy")
    assert all(path.is_file() for path in paths)
    document = _strict_json(paths[1])
    assert document["command"] == "sdrt " + " ".join(argv) and document["seed"] == 3
    assert document["fixed"]["num_inference_steps"] == 1 and document["columns"][0]["arguments"]["height"] == 64


def test_cli_default_out_leaves_the_committed_figures_alone(tiny_bundle: Path, tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "docs/experiments").mkdir(parents=True)  # a clone's root, where the committed figures live
    monkeypatch.chdir(tmp_path)
    assert main(["sweep", str(tiny_bundle), "--experiment", "images-per-prompt", "--steps", "1", "--size", "64",
                 "--backend", "onnxruntime-cpu", "-q"]) == 0
    assert (tmp_path / "sweep-out/images-per-prompt.json").is_file()
    assert list((tmp_path / "docs/experiments").iterdir()) == []


@pytest.mark.parametrize("extra, message", [
    (["--experiment", "colour"], "invalid choice: 'colour'"),
    (["--experiment", "steps", "--steps", "3"], "--steps: the steps experiment sweeps num_inference_steps"),
    (["--experiment", "guidance", "--size", "60"], "size: (60, 60)"),
    (["--experiment", "guidance", "--size", "big"], "--size"),
    (["--experiment", "guidance", "--prompts", "0"], "sample_prompts"),
])
def test_cli_bad_input_one_line_exit_2(tiny_bundle: Path, tmp_path: Path, capsys, extra, message) -> None:
    code = main(["sweep", str(tiny_bundle), "--out", str(tmp_path / "out"), "--backend", "onnxruntime-cpu", "-q", *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("sdrt: error:") and message in err[0], err
    assert not (tmp_path / "out").exists()


def test_cli_lists_every_experiment(capsys) -> None:
    assert main(["sweep", "--experiment", "nope"]) == 2
    err = capsys.readouterr().err
    assert all(f"'{name}'" in err for name in [*sweep.EXPERIMENTS, "all"])
