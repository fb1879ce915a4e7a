"""The runtime needs numpy and onnxruntime only: no torch, diffusers or transformers at inference time."""
from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

BUILD_TIME = ("torch", "diffusers", "transformers")
ROOT = Path(__file__).resolve().parents[1]


def test_generation_never_imports_build_time_libraries(tiny_bundle: Path, tmp_path: Path) -> None:
    script = f"""
import sys
import sdrt.engine
from sdrt.cli.main import main
pipe = sdrt.engine.load({str(tiny_bundle)!r}, safety_checker=False)
pipe.set_progress_bar_config(disable=True)
out = pipe("a cat", num_inference_steps=2, height=64, width=64, seed=0)
assert out.images[0].size == (64, 64)
assert main(["generate", {str(tiny_bundle)!r}, "a dog", "-o", {str(tmp_path / 'x.png')!r}, "-s", "1", "--height", "64", "--width", "64", "-q"]) == 0
loaded = sorted(m for m in sys.modules if m.split(".")[0] in {BUILD_TIME!r})
print("LOADED", loaded)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "LOADED []" in result.stdout


def test_runtime_requirements_exclude_build_time_libraries() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    runtime = [req.split(">")[0].split("=")[0].split("[")[0].strip().lower() for req in project["dependencies"]]
    assert "onnxruntime" in runtime and "numpy" in runtime
    assert not set(runtime) & set(BUILD_TIME)
    export_extra = " ".join(project["optional-dependencies"]["export"])
    assert all(name in export_extra for name in BUILD_TIME)
