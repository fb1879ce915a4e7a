"""sdrt.benchmarks.op_profile: OpenVINO's per-node counters on a compiled entry of a bundle's cache, grouped by op
kind and the precision it ran in."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

import sdrt.engine
from sdrt.benchmarks import op_profile
from sdrt.engine.backends.openvino.backend import OpenVINOBF16Backend
from sdrt.engine.backends.openvino.cache import CACHE_SUBDIR, COMPILED_SUBDIR
from sdrt.engine.backends.openvino.compiled_models import ENTRIES_SUBDIR
from sdrt.engine.specs import Component
from sdrt.export.quantize import Calibration, quantize_models, quantize_unavailable_reason

pytestmark = pytest.mark.skipif(OpenVINOBF16Backend.unavailable_reason() is not None or quantize_unavailable_reason() is not None,
                                reason="needs openvino with bf16, and nncf")


@pytest.fixture(scope="module")
def int8_bundle(tiny_bundle: Path, tmp_path_factory) -> Path:
    """A quantized copy of the tiny bundle that has run one image in int8 (its compiled entries cached)."""
    bundle = Path(shutil.copytree(tiny_bundle, tmp_path_factory.mktemp("op-profile") / "bundle", ignore=shutil.ignore_patterns(".cache")))
    quantize_models(bundle, Calibration(prompts=2, num_inference_steps=3, size=64))
    pipe = sdrt.engine.load(bundle, backend="openvino-int8", safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe("a cat", num_inference_steps=1, height=64, width=64, seed=0)
    return bundle


@pytest.mark.slow
@pytest.mark.parametrize(("component", "input_shape"), [(Component.UNET, ("sample", [2, 4, 8, 8])),
                                                         (Component.VAE_DECODER, ("latent_sample", [1, 4, 8, 8]))])
def test_the_int8_models_run_their_convolutions_in_int8_and_their_norms_in_bf16(
        int8_bundle: Path, tmp_path: Path, capsys, component: Component, input_shape: tuple[str, list[int]]) -> None:
    [entry] = (int8_bundle / CACHE_SUBDIR / COMPILED_SUBDIR).glob(f"{component.value}-*-int8-*/{ENTRIES_SUBDIR}/*")
    out = tmp_path / "profile.json"
    assert op_profile.main([str(entry), "--calls", "1", "--out", str(out)]) == 0
    result = op_profile.profile(entry, calls=1)
    kernels = {(kind["type"], kind["exec_type"]) for kind in result["kinds"]}
    assert {exec_type for op, exec_type in kernels if op == "Convolution"} and all(
        exec_type.lower().endswith("_i8") for op, exec_type in kernels if op == "Convolution")
    assert any(op == "MVN" and exec_type.endswith("bf16") for op, exec_type in kernels)
    name, shape = input_shape
    assert result["shapes"][name] == shape and 0 < result["counted_seconds"]
    assert sum(node["seconds"] for node in result["nodes"]) == pytest.approx(result["counted_seconds"])
    assert "| Convolution |" in capsys.readouterr().out and out.is_file()
