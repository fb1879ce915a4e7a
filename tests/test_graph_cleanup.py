"""clean_onnx folds and cleans a traced graph without its weights: the result is the graph that folding the fully
loaded model gives (Polygraphy on every weight, the reference), with the same weight values, while folding itself
is handed no initializer at or over the weight size; the weights are copied from the traced files a tensor at a
time into one page-aligned data file."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from polygraphy.backend.onnx import fold_constants

from sdrt.engine.specs import Component
from sdrt.export import graph_cleanup
from sdrt.export.source_checkpoint import load_checkpoint
from sdrt.export.onnx_export import export_component, traceable_model


@pytest.fixture(scope="module")
def traced_unet(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny U-Net traced, then laid out as torch lays out a model over 2 GB: every tensor in a file of its own."""
    source = load_checkpoint(tiny_checkpoint)
    directory = tmp_path_factory.mktemp("traced")
    export_component(source, Component.UNET, traceable_model(source, Component.UNET), directory / "inline.onnx")
    model = onnx.load(str(directory / "inline.onnx"))
    onnx.save_model(model, str(directory / "raw.onnx"), save_as_external_data=True, all_tensors_to_one_file=False, size_threshold=0)
    return directory / "raw.onnx"


def _reference(raw_path: Path) -> onnx.ModelProto:
    graph = gs.import_onnx(fold_constants(onnx.load(str(raw_path)), allow_onnxruntime_shape_inference=True, error_ok=False))
    return gs.export_onnx(graph.cleanup(remove_unused_graph_inputs=False).toposort())


def _values(model_path: Path) -> dict[str, np.ndarray]:
    return {tensor.name: values.copy() for tensor, values in graph_cleanup.iter_initializer_arrays(model_path)}


def test_cleanup_without_weights_gives_the_fully_folded_graph(traced_unet: Path, tmp_path: Path, monkeypatch) -> None:
    weight_bytes = 4096
    monkeypatch.setattr(graph_cleanup, "_FOLD_WEIGHT_BYTES", weight_bytes)
    monkeypatch.setattr(graph_cleanup, "PROTOBUF_LIMIT_BYTES", 200_000)  # so the weights go to one external file
    folded_inputs = []
    real_fold = graph_cleanup.fold_constants

    def spying_fold(model, **kwargs):
        folded_inputs.append([graph_cleanup.tensor_nbytes(t) for t in model.graph.initializer])
        return real_fold(model, **kwargs)

    monkeypatch.setattr(graph_cleanup, "fold_constants", spying_fold)
    out = tmp_path / "unet/model.onnx"
    graph_cleanup.clean_onnx(traced_unet, out)

    assert max(folded_inputs[0]) < weight_bytes  # folding never held a weight
    expected = _reference(traced_unet)
    actual = onnx.load(str(out), load_external_data=False)
    assert [(n.op_type, list(n.input), list(n.output)) for n in actual.graph.node] == \
           [(n.op_type, list(n.input), list(n.output)) for n in expected.graph.node]
    assert [i.name for i in actual.graph.input] == [i.name for i in expected.graph.input]
    expected_values = {t.name: onnx.numpy_helper.to_array(t) for t in expected.graph.initializer}
    actual_values = _values(out)
    assert actual_values.keys() == expected_values.keys()
    for name, values in expected_values.items():
        np.testing.assert_array_equal(actual_values[name], values, err_msg=name)
    external = [t for t in actual.graph.initializer if onnx.external_data_helper.uses_external_data(t)]
    assert external and {e.value for t in external for e in t.external_data if e.key == "location"} == {"model.onnx.data"}
    assert all(int(next(e.value for e in t.external_data if e.key == "offset")) % 4096 == 0 for t in external)
