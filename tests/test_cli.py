"""The `sdrt` command: real PNGs with their parameters, numbered outputs, one-line errors with exit 2 and no file."""
from __future__ import annotations

import logging
import signal
import subprocess
import sys
import threading
import time
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
    (["-o", "out.jpg"], "--output: must be a .png file name"),
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


@pytest.mark.slow
def test_export_command(tiny_checkpoint: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "bundle"
    assert main(["export", str(tiny_checkpoint), str(out), "--no-quantize"]) == 0  # quantizing: test_export_quantize.py
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


# ---- what a new user meets (issue #27) ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def checkerless_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A bundle without a safety checker, as the default (demo) model is."""
    from sdrt.export import export_bundle
    from sdrt.export.random_checkpoint import make_random_checkpoint

    root = tmp_path_factory.mktemp("checkerless")
    return export_bundle(make_random_checkpoint(root / "ckpt", "tiny", seed=7, with_safety_checker=False), root / "bundle")


@pytest.fixture
def default_model(checkerless_bundle: Path, monkeypatch) -> Path:
    """`sdrt generate PROMPT` (no BUNDLE) runs this bundle: the demo model's own takes minutes to build."""
    monkeypatch.setattr("sdrt.cli.generate.default_bundle_dir", lambda: checkerless_bundle)
    return checkerless_bundle


SMALL = ["-s", "1", "--height", "64", "--width", "64", "--seed", "0", "-q", "--backend", "onnxruntime-cpu"]


def test_help_shows_one_prompt_defaults_and_backends(capsys) -> None:
    from sdrt.engine.backends import BACKENDS

    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())  # unwrapped
    usage = help_text[: help_text.index("Generate images")]
    assert usage.rstrip().endswith("[BUNDLE] PROMPT") and "..." not in usage
    assert "(default: image.png)" in help_text and "denoising steps (default: the bundle's: 1 for Turbo, 4 for LCM, else 50)" in help_text
    assert "(default: the bundle's: 0 for Turbo, else 7.5)" in help_text and "images to make (default: 1)" in help_text
    runs_here = help_text[help_text.index("This machine runs"):]
    assert "onnxruntime-cpu" in runs_here.split(";")[0]  # every install has onnxruntime's CPU provider
    assert all(b.name in help_text for b in BACKENDS)


@pytest.mark.parametrize("words, message", [
    (["red", "circle"], "BUNDLE: no bundle directory 'red' here; if 'red circle' is one prompt, quote it: "
                        "sdrt generate 'red circle'"),
    (["a", "red", "circle"], "PROMPT: one prompt per call, quoted when it has spaces: sdrt generate 'a red circle'"),
])
def test_unquoted_prompt_is_named(words, message, tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["generate", *words]) == 2
    assert capsys.readouterr().err.strip() == f"sdrt: error: {message}"
    assert list(tmp_path.iterdir()) == []


def test_default_model_run_warns_nothing_and_truncation_briefly(default_model: Path, tmp_path: Path, caplog) -> None:
    with caplog.at_level(logging.WARNING):
        assert main(["generate", "a red circle", "-o", str(tmp_path / "a.png"), *SMALL]) == 0
    assert caplog.records == []  # no safety-checker warning: the default model has none, by design
    long_prompt = ("a red circle on a blue background " * 300)[:10_000]
    with caplog.at_level(logging.WARNING):
        assert main(["generate", long_prompt, "-o", str(tmp_path / "b.png"), *SMALL]) == 0
    [warning] = caplog.records
    assert warning.getMessage().startswith("The following part of your input was truncated")
    assert len(warning.getMessage()) < 300 and "tokens dropped" in warning.getMessage()


def test_hint_when_the_prompt_names_nothing_the_default_model_draws(default_model: Path, tmp_path: Path, capsys) -> None:
    assert main(["generate", "a photo of a cat", "-o", str(tmp_path / "cat.png"), *SMALL]) == 0
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("sdrt: hint: the default model draws only")
    assert (tmp_path / "cat.png").is_file()  # a hint, not a refusal
    for prompt in ("Two yellow triangles", "something, top left", ""):
        assert main(["generate", prompt, "-o", str(tmp_path / "x.png"), *SMALL]) == 0
        assert "hint" not in capsys.readouterr().err, prompt
    # Another bundle's world is its own.
    assert main(["generate", str(default_model), "a photo of a cat", "-o", str(tmp_path / "y.png"), *SMALL]) == 0
    assert "hint" not in capsys.readouterr().err


@pytest.mark.parametrize("output, message", [
    ("{tmp}/nodir/x.png", "--output: must be in an existing directory; '{tmp}/nodir' does not exist"),
    ("/proc/x.png", "--output: must be in a directory this user can write to; '/proc'"),
    ("{tmp}/x.jpg", "--output: must be a .png file name, got '{tmp}/x.jpg'"),
    ("{tmp}/sub.png", "--output: must be a file name, '{tmp}/sub.png' is a directory"),
])
def test_output_path_is_checked_before_generating(tiny_bundle: Path, tmp_path: Path, monkeypatch, capsys, output, message) -> None:
    (tmp_path / "sub.png").mkdir()

    def no_load(*args, **kwargs):
        raise AssertionError("loaded the bundle before checking --output")

    monkeypatch.setattr("sdrt.cli.generate.load", no_load)
    assert main(["generate", str(tiny_bundle), "a cat", "-o", output.format(tmp=tmp_path), *SMALL]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("sdrt: error: " + message.format(tmp=tmp_path)), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sub.png"]  # no directory made, no file left


def test_failed_write_leaves_none_of_the_images(tiny_bundle: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    import sdrt.cli.generate

    calls = []

    def save_png(image, path, parameters):
        if calls:
            raise KeyboardInterrupt  # Ctrl-C while the second image is written
        calls.append(path)
        Image.new("RGB", (8, 8)).save(path)

    monkeypatch.setattr(sdrt.cli.generate, "save_png", save_png)
    assert main(["generate", str(tiny_bundle), "a cat", "-o", str(tmp_path / "img.png"), "-n", "2", *SMALL]) == 130
    assert capsys.readouterr().err.strip() == "sdrt: stopped by SIGINT; no partial files left"
    assert calls == [tmp_path / "img-0.png"] and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signal_stops_a_generation_within_a_second(tiny_bundle: Path, tmp_path: Path, signum) -> None:
    """A 512x512 U-Net call on the tiny bundle takes seconds in onnxruntime, which Python cannot interrupt: the
    command must still end at once, say so, and leave no file."""
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    process = subprocess.Popen(
        [sys.executable, "-m", "sdrt.cli", "generate", str(tiny_bundle), "a cat", "-o", str(out_dir / "x.png"), "-s", "20",
         "--height", "512", "--width", "512", "--seed", "0", "--backend", "onnxruntime-cpu", "--no-safety-checker"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        # as from a terminal: a test run started in the background by a shell inherits SIGINT ignored, and so would sdrt
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    stderr: list[str] = []
    reader = threading.Thread(target=lambda: stderr.extend(iter(lambda: process.stderr.read(1), "")), daemon=True)
    reader.start()
    deadline = time.monotonic() + 120
    while "denoise" not in "".join(stderr):  # the progress bar: loaded, the first U-Net call under way
        assert process.poll() is None and time.monotonic() < deadline, "".join(stderr)
        time.sleep(0.05)
    time.sleep(0.5)
    sent = time.monotonic()
    process.send_signal(signum)
    status = process.wait(timeout=30)
    elapsed = time.monotonic() - sent
    reader.join(5)
    assert status == 128 + signum
    assert elapsed < 2.0, elapsed
    assert "".join(stderr).strip().splitlines()[-1] == f"sdrt: stopped by {signal.Signals(signum).name}; no partial files left"
    assert "Traceback" not in "".join(stderr) and process.stdout.read() == ""
    assert list(out_dir.iterdir()) == []


def test_warnings_are_one_short_line_each(tiny_bundle: Path, tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "sdrt.cli", "generate", str(tiny_bundle), "a cat", "-o",
                             str(tmp_path / "x.png"), *SMALL, "--no-safety-checker"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0
    # the tiny bundle has a checker, so turning it off is worth saying, in the error lines' form
    assert result.stderr.splitlines() == ["sdrt: warning: safety checker disabled at load: images are not checked for NSFW content"]
