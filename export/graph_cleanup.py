"""Clean an exported ONNX graph with Polygraphy (constant folding, sanitize); save graphs (external weights when
large) and validate them with onnx.checker."""
from __future__ import annotations

import logging
from pathlib import Path

import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
from polygraphy.backend.onnx import fold_constants
from polygraphy.logger import G_LOGGER

from sdrt.export.errors import ExportError

logger = logging.getLogger(__name__)

# Protobuf cannot serialise a message over 2 GB: larger models keep their weights in one external data file.
PROTOBUF_LIMIT_BYTES = 2**31 - 1
# Keep tiny tensors inline so external data holds only real weights.
_EXTERNAL_DATA_THRESHOLD_BYTES = 1024


def _initializer_bytes(model: onnx.ModelProto) -> int:
    return sum(len(t.raw_data) for t in model.graph.initializer)


def clean_onnx(raw_path: Path, out_path: Path) -> None:
    """Read the traced model at `raw_path`, fold and sanitize it, and write it to `out_path` (+ `.data` if large)."""
    # Our own log says what folding did, once per model; Polygraphy's and onnxruntime's chatter says nothing actionable.
    G_LOGGER.module_severity = G_LOGGER.WARNING
    ort.set_default_logger_severity(3)
    # Only one reference to each intermediate model is held, so a full-size U-Net's weights exist at most twice.
    model = onnx.load(str(raw_path), load_external_data=True)
    nodes_before = len(model.graph.node)
    try:
        model = fold_constants(model, allow_onnxruntime_shape_inference=True, error_ok=False)
    except Exception as exc:  # Polygraphy raises plain exceptions from onnxruntime or graphsurgeon
        raise ExportError(f"constant folding of {raw_path.name} failed: {exc}") from exc
    graph = gs.import_onnx(model)
    del model
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    model = gs.export_onnx(graph)
    del graph
    logger.info("%s: %d nodes after folding and cleanup (%d before)", out_path.parent.name, len(model.graph.node), nodes_before)
    save_onnx(model, out_path)


def save_onnx(model: onnx.ModelProto, out_path: Path) -> None:
    """Write `model` to `out_path`, its weights in one `out_path.name + ".data"` file beside it when large, and
    check the written model with onnx.checker; raise ExportError if it fails."""
    out_path.parent.mkdir(parents=True, exist_ok=True)
    if _initializer_bytes(model) > PROTOBUF_LIMIT_BYTES // 2:
        onnx.save_model(
            model,
            str(out_path),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=out_path.name + ".data",
            size_threshold=_EXTERNAL_DATA_THRESHOLD_BYTES,
        )
    else:
        onnx.save_model(model, str(out_path))
    try:
        # The path form reads external data and so also works past the protobuf limit.
        onnx.checker.check_model(str(out_path), full_check=True)
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"{out_path.name} fails onnx.checker: {exc}") from exc
