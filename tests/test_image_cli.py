"""`sdrt img2img`, `sdrt inpaint`, `sdrt outpaint`: PNGs with their parameters, and one-line errors with exit 2."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdrt.cli.main import main
from sdrt.engine.image_io import read_png_parameters
from tests.test_img2img import make_image
from tests.test_inpaint import make_mask


@pytest.fixture
def inputs(tmp_path: Path) -> tuple[Path, Path]:
    make_image(72, 64).save(tmp_path / "in.png")
    make_mask(72, 64).save(tmp_path / "mask.png")
    return tmp_path / "in.png", tmp_path / "mask.png"


COMMON = ["-s", "2", "--seed", "3", "-q", "--no-safety-checker"]


def test_img2img(tiny_bundle: Path, inputs, tmp_path: Path, capsys) -> None:
    image, _ = inputs
    out = tmp_path / "out.png"
    assert main(["img2img", str(tiny_bundle), "a cat", "-i", str(image), "-o", str(out), "--strength", "0.5", *COMMON]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert Image.open(out).size == (72, 64)  # the image's size
    parameters = read_png_parameters(out)
    assert parameters["command"] == "img2img" and parameters["image"] == str(image) and parameters["strength"] == 0.5
    assert parameters["seed"] == 3 and parameters["prompt"] == "a cat"


def test_inpaint(tiny_bundle: Path, inputs, tmp_path: Path) -> None:
    image, mask = inputs
    out = tmp_path / "out.png"
    assert main(["inpaint", str(tiny_bundle), "a cat", "-i", str(image), "-m", str(mask), "-o", str(out),
                 "--height", "64", "--width", "72", "-n", "2", *COMMON]) == 0
    assert [Image.open(tmp_path / f"out-{i}.png").size for i in range(2)] == [(72, 64)] * 2
    assert read_png_parameters(tmp_path / "out-1.png")["mask_image"] == str(mask)


def test_outpaint(tiny_bundle: Path, inputs, tmp_path: Path) -> None:
    image, _ = inputs
    out = tmp_path / "out.png"
    assert main(["outpaint", str(tiny_bundle), "a cat", "-i", str(image), "-o", str(out), "--left", "8", "--bottom", "16",
                 *COMMON]) == 0
    result = np.asarray(Image.open(out))
    assert result.shape == (80, 80, 3)
    np.testing.assert_array_equal(result[:64, 8:], np.asarray(Image.open(image)))
    parameters = read_png_parameters(out)
    assert (parameters["left"], parameters["right"], parameters["top"], parameters["bottom"]) == (8, 0, 0, 16)
    assert parameters["image"] == str(image) and parameters["command"] == "outpaint"


BAD = [
    (["img2img"], [], "the following arguments are required: -i/--image"),
    (["inpaint", "-i", "{image}"], [], "the following arguments are required: -m/--mask-image"),
    (["img2img", "-i", "{missing}"], [], "image: cannot read"),
    (["img2img", "-i", "{image}", "--strength", "2"], [], "strength: must be a number in [0, 1], got 2.0"),
    (["inpaint", "-i", "{image}", "-m", "{small}"], [], "mask_image: is 8x8 but image is 72x64"),
    (["outpaint", "-i", "{image}"], [], "left, right, top and bottom are all 0"),
    (["outpaint", "-i", "{image}", "--left", "-8"], [], "left: must be a non-negative"),
    (["img2img", "-i", "{image}", "--latents", "x.npy"], [], "unrecognized arguments: --latents"),
]


@pytest.mark.parametrize("command, _, message", BAD)
def test_bad_input_one_line_exit_2_no_file(tiny_bundle: Path, inputs, tmp_path: Path, capsys, command, _, message) -> None:
    image, _mask = inputs
    Image.new("L", (8, 8)).save(tmp_path / "small.png")
    names = {"image": image, "missing": tmp_path / "missing.png", "small": tmp_path / "small.png"}
    argv = [part.format(**names) for part in command[:1] + [str(tiny_bundle), "a cat"] + command[1:]]
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    code = main(argv + ["-o", str(out_dir / "out.png"), "-s", "2", "-q"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("sdrt: error:") and message in err[0], err
    assert list(out_dir.iterdir()) == []
