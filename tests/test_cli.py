"""The `sdrt` command: real PNGs with their parameters, numbered outputs, one-line errors with exit 2 and no file."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdrt.cli.main import main
from sdrt.engine.image_io import read_png_parameters


def test_generate_writes_png_with_parameters(tiny_bundle: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "cat.png"
    code = main(["generate", str(tiny_bundle), "a cat", "-o", str(out), "-s", "2", "--height", "64", "--width", "96",
                 "--seed", "5", "-g", "6", "--negative-prompt", "dog", "-q", "--no-safety-checker"])
    assert code == 0
    assert capsys.readouterr().out.strip() == str(out)
    with Image.open(out) as image:
        assert image.format == "PNG" and image.size == (96, 64) and image.mode == "RGB"
    parameters = read_png_parameters(out)
    assert parameters["prompt"] == "a cat" and parameters["negative_prompt"] == "dog"
    assert parameters["seed"] == 5 and parameters["num_inference_steps"] == 2 and parameters["guidance_scale"] == 6.0
    assert (parameters["width"], parameters["height"]) == (96, 64)


def test_generate_is_reproducible_from_its_metadata(tiny_bundle: Path, tmp_path: Path) -> None:
    first, second = tmp_path / "a.png", tmp_path / "b.png"
    assert main(["generate", str(tiny_bundle), "a cat", "-o", str(first), "-s", "1", "--height", "64", "--width", "64", "-q"]) == 0
    seed = read_png_parameters(first)["seed"]  # drawn at random and recorded
    assert main(["generate", str(tiny_bundle), "a cat", "-o", str(second), "-s", "1", "--height", "64", "--width", "64", "-q", "--seed", str(seed)]) == 0
    np.testing.assert_array_equal(np.asarray(Image.open(first)), np.asarray(Image.open(second)))


def test_n_writes_numbered_files(tiny_bundle: Path, tmp_path: Path) -> None:
    code = main(["generate", str(tiny_bundle), "a cat", "-o", str(tmp_path / "img.png"), "-n", "3", "-s", "1",
                 "--height", "64", "--width", "64", "--seed", "1", "-q"])
    assert code == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["img-0.png", "img-1.png", "img-2.png"]
    assert [read_png_parameters(tmp_path / f"img-{i}.png")["image_index"] for i in range(3)] == [0, 1, 2]


def test_latents_file(tiny_bundle: Path, tmp_path: Path) -> None:
    latents = np.random.default_rng(0).standard_normal((1, 4, 8, 8), dtype=np.float32)
    np.save(tmp_path / "noise.npy", latents)
    for name in ("x.png", "y.png"):
        assert main(["generate", str(tiny_bundle), "a cat", "-o", str(tmp_path / name), "-s", "1", "--height", "64",
                     "--width", "64", "--latents", str(tmp_path / "noise.npy"), "-q"]) == 0
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "x.png")), np.asarray(Image.open(tmp_path / "y.png")))


BAD = [
    # `sdrt: error: <parameter>: <allowed range>`, every bound from the model (the tiny one: SD 1.5's scheduler
    # config, trained at 256 px)
    (["-s", "0"], "sdrt: error: num_inference_steps: must be an integer in 1..999"),
    (["-s", "1000"], "sdrt: error: num_inference_steps: must be an integer in 1..999"),
    (["-s", "1001", "--scheduler", "euler"], "sdrt: error: num_inference_steps: must be an integer in 1..1000"),
    (["--height", "65"], "sdrt: error: height: must be a multiple of 8 in 64..1024"),
    (["--height", "8"], "sdrt: error: height: must be a multiple of 8 in 64..1024"),
    (["--width", "99999"], "sdrt: error: width: must be a multiple of 8 in 64..1024"),
    (["-n", "100000"], "sdrt: error: num_images_per_prompt: must be at most "),
    (["-g", "nan"], "guidance_scale: must be a finite number"),
    (["-n", "0"], "num_images_per_prompt"),
    (["--seed", "-3"], "seed"),
    (["-s", "two"], "invalid int value"),
    (["--latents", "missing.npy"], "--latents: cannot read"),
    (["-o", "out.jpg"], "--output must name a .png file"),
]


@pytest.mark.parametrize("extra, message", BAD)
def test_bad_input_one_line_exit_2_no_file(tiny_bundle: Path, tmp_path: Path, capsys, extra, message) -> None:
    args = ["generate", str(tiny_bundle), "a cat", "-o", str(tmp_path / "out.png"), "--height", "64", "--width", "64", "-q"]
    code = main(args + extra)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("sdrt: error:") and message in err[0]
    assert list(tmp_path.iterdir()) == []


def test_bad_bundle_one_line_exit_2(tmp_path: Path, capsys) -> None:
    code = main(["generate", str(tmp_path / "nope"), "a cat", "-o", str(tmp_path / "out.png")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "does not exist" in err[0]


def test_console_script_no_traceback(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "sdrt.cli", "generate", str(tmp_path), "x", "-o", str(tmp_path / "o.png")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and result.stderr.startswith("sdrt: error:")


def test_export_command(tiny_checkpoint: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "bundle"
    assert main(["export", str(tiny_checkpoint), str(out)]) == 0
    assert (out / "manifest.json").is_file()
    capsys.readouterr()
    assert main(["export", str(tiny_checkpoint), str(out)]) == 2
    assert "already exists; pass force=True (CLI: --force)" in capsys.readouterr().err


def test_make_checkpoint_command(tmp_path: Path, capsys) -> None:
    from sdrt.cli.build import ARCH_NAMES
    from sdrt.export.random_checkpoint import ARCHES

    assert set(ARCH_NAMES) == set(ARCHES)
    out = tmp_path / "ckpt"
    assert main(["make-checkpoint", str(out), "--arch", "tiny", "--no-safety-checker"]) == 0
    assert (out / "model_index.json").is_file() and (out / "tokenizer/merges.txt").is_file()
    assert not (out / "safety_checker").exists()
    capsys.readouterr()
    assert main(["make-checkpoint", str(out), "--arch", "tiny"]) == 2
    assert "already exists" in capsys.readouterr().err
