"""Polygraphy's layer-by-layer comparison (`sdrt build-engines --compare-layers`), on CPU: onnxruntime stands in for
TensorRT as the candidate, with one weight changed, and the comparison must name the first tensor that weight
reaches; the divergence rule itself; the probe inputs; and the command without a GPU."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from sdrt.cli.main import main
from sdrt.engine.backends.tensorrt.engines.profile import EngineProfile, Precision, component_shapes, default_profile
from sdrt.engine.manifest import read_manifest
from sdrt.engine.specs import Component
from sdrt.export.layer_compare import LayerTolerance, compare_layers, first_divergence, probe_feeds
from tests.test_tensorrt_host import _fake_bundle

TOLERANCE = LayerTolerance.for_precision(Precision.FP32)
RNG = np.random.default_rng(0)
W1, W2, W3 = (RNG.standard_normal((8, 8)).astype(np.float32) for _ in range(3))


def _chain(path: Path) -> Path:
    """x -> MatMul W1 -> Relu -> MatMul W2 -> Tanh -> MatMul W3 -> y."""
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h1"], name="mm1"),
        helper.make_node("Relu", ["h1"], ["r1"], name="relu"),
        helper.make_node("MatMul", ["r1", "w2"], ["h2"], name="mm2"),
        helper.make_node("Tanh", ["h2"], ["t2"], name="tanh"),
        helper.make_node("MatMul", ["t2", "w3"], ["y"], name="mm3"),
    ]
    graph = helper.make_graph(
        nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8])],
        initializer=[numpy_helper.from_array(w, name) for w, name in ((W1, "w1"), (W2, "w2"), (W3, "w3"))],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


class _OverridingRunner:
    """A candidate with Polygraphy's runner interface: onnxruntime with some initializers replaced."""

    name = "onnxruntime-with-a-changed-weight"

    def __init__(self, path: Path, weights: dict[str, np.ndarray]) -> None:
        self.path, self.weights = path, weights

    def __enter__(self):
        options = ort.SessionOptions()
        # the session reads the OrtValues' memory for its lifetime: they are kept with it
        self.values = {name: ort.OrtValue.ortvalue_from_numpy(value) for name, value in self.weights.items()}
        for name, value in self.values.items():
            options.add_initializer(name, value)
        self.session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        return self

    def __exit__(self, *exc) -> None:
        del self.session, self.values

    def infer(self, feeds):
        names = [output.name for output in self.session.get_outputs()]
        return dict(zip(names, self.session.run(names, feeds)))


def _feeds() -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(1).standard_normal((2, 8)).astype(np.float32)}


def test_the_first_tensor_a_changed_weight_reaches_is_named(tmp_path: Path) -> None:
    model = _chain(tmp_path / "chain.onnx")
    changed = {"w2": W2 * 1.5}
    divergence, compared = compare_layers(model, _feeds(), lambda path: _OverridingRunner(path, changed), TOLERANCE)
    assert divergence is not None and divergence.tensor == "h2"  # mm2's output; h1 and r1 agree
    assert divergence.agreed == 2 and compared == 3
    assert "first diverging tensor: h2" in divergence.describe()


def test_an_unchanged_candidate_agrees_on_every_tensor(tmp_path: Path) -> None:
    model = _chain(tmp_path / "chain.onnx")
    divergence, compared = compare_layers(model, _feeds(), lambda path: _OverridingRunner(path, {}), TOLERANCE)
    assert divergence is None and compared == 5  # every node output, the intermediate ones marked as outputs


def test_divergence_rule() -> None:
    reference = {"a": np.ones(4), "b": np.full(4, 100.0), "c": np.zeros(4)}
    order = ["a", "folded", "b", "c"]
    within = {"a": np.ones(4) + 5e-5, "b": np.full(4, 100.05), "c": np.zeros(4)}  # b: 0.05 <= 1e-4 + 1e-3 * 100
    assert first_divergence(reference, within, order, TOLERANCE) == (None, 3)  # "folded" is in neither run: skipped
    overflow = {**within, "b": np.array([100.0, np.inf, 100.0, 100.0])}
    divergence, _ = first_divergence(reference, overflow, order, TOLERANCE)
    assert divergence.tensor == "b" and divergence.max_abs_diff == float("inf") and divergence.agreed == 1
    off = {**within, "c": np.array([0.0, 0.0, 0.0, 1e-3])}
    assert first_divergence(reference, off, order, TOLERANCE)[0].tensor == "c"
    assert first_divergence(reference, off, order, LayerTolerance.for_precision(Precision.FP16))[0] is None


def test_probe_inputs_take_the_profiles_opt_shapes(tmp_path: Path) -> None:
    manifest = read_manifest(_fake_bundle(tmp_path))
    text_length = manifest.tokenizer.model_max_length

    def feeds(component: Component, profile: EngineProfile) -> dict[str, np.ndarray]:
        entry = manifest.components[component]
        return probe_feeds(entry, component_shapes(component, entry, manifest.model, profile, text_length), token_ids)

    token_ids = np.arange(text_length, dtype=np.int64)
    profile = default_profile(manifest.model)
    text = feeds(Component.TEXT_ENCODER, profile)
    assert text["input_ids"].shape == (profile.batch.opt, text_length) and (text["input_ids"] == token_ids).all()
    unet = feeds(Component.UNET, EngineProfile.static(2, 256, 384))
    f = manifest.model.vae_scale_factor
    assert unet["sample"].shape == (4, manifest.model.latent_channels, 256 // f, 384 // f)  # guidance doubles the batch
    assert unet["encoder_hidden_states"].shape == (4, text_length, manifest.model.text_hidden_size)
    assert unet["sample"].dtype == np.float32 and 0.5 < unet["sample"].std() < 1.5


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="tensorrt is installed here")
def test_cli_compare_layers_without_tensorrt_says_what_to_install(tmp_path: Path, capsys) -> None:
    assert main(["build-engines", str(_fake_bundle(tmp_path)), "--compare-layers", "unet"]) == 2
    assert capsys.readouterr().err == "sdrt: error: tensorrt is not installed (pip install 'sdrt[gpu]')\n"
