"""Clean an exported ONNX graph with Polygraphy (constant folding, sanitize) without holding its weights; save graphs
(weights streamed to one external file when large) and validate them with onnx.checker.

Memory: a traced full-size U-Net has 3.4 GB of weights, which the traced file keeps external. Folding and cleanup
see the weights only as graph inputs (`_detach_weights`), so they work on a graph of a few megabytes; the weights
are copied from the traced files into the bundle's one data file a tensor at a time (`save_onnx`). The folds that
matter (shape arithmetic, scalars, position ids) never read a weight; a fold that would read one is not done, and
the tensors it would have produced stay computed at run time.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
from onnx import external_data_helper, helper, numpy_helper
from polygraphy.backend.onnx import fold_constants
from polygraphy.logger import G_LOGGER

from sdrt.export.errors import ExportError

logger = logging.getLogger(__name__)

# Protobuf cannot serialise a message over 2 GB: larger models keep their weights in one external data file.
PROTOBUF_LIMIT_BYTES = 2**31 - 1
# Keep tiny tensors inline so external data holds only real weights.
_EXTERNAL_DATA_THRESHOLD_BYTES = 1024
# Initializers at least this large are weights: folding sees them as inputs. The largest constant a fold needs is a
# position-embedding table (CLIP ViT-L/14: 257 x 1024 fp32, 1.05 MB).
_FOLD_WEIGHT_BYTES = 4 * 1024 * 1024
# External tensors start on a page boundary, so a runtime can map them in place.
_EXTERNAL_DATA_ALIGNMENT = 4096


def tensor_nbytes(tensor: onnx.TensorProto) -> int:
    """Bytes of a tensor's values, from its dims and type: nothing is read, external or not."""
    itemsize = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize
    return int(np.prod(tensor.dims, dtype=np.int64)) * itemsize


def tensor_bytes(tensor: onnx.TensorProto, base_dir: Path) -> bytes:
    """The tensor's values as raw bytes: its own, or read from its external file under `base_dir`."""
    if external_data_helper.uses_external_data(tensor):
        info = external_data_helper.ExternalDataInfo(tensor)
        with open(base_dir / info.location, "rb") as file:
            file.seek(info.offset or 0)
            data = file.read(info.length if info.length is not None else tensor_nbytes(tensor))
        if len(data) != tensor_nbytes(tensor):
            raise ExportError(f"{base_dir / info.location}: {len(data)} bytes for {tensor.name}, expected {tensor_nbytes(tensor)}")
        return data
    if tensor.HasField("raw_data"):
        return tensor.raw_data
    return numpy_helper.to_array(tensor).tobytes()


def iter_initializer_arrays(onnx_path: Path) -> Iterator[tuple[onnx.TensorProto, np.ndarray]]:
    """Each initializer of the model at `onnx_path` with its values, one at a time: at most one external tensor is
    in memory at once."""
    model = onnx.load(str(onnx_path), load_external_data=False)
    for tensor in model.graph.initializer:
        dtype = helper.tensor_dtype_to_np_dtype(tensor.data_type)
        yield tensor, np.frombuffer(tensor_bytes(tensor, onnx_path.parent), dtype=dtype).reshape(tuple(tensor.dims))


def clean_onnx(raw_path: Path, out_path: Path) -> None:
    """Read the traced model at `raw_path`, fold and sanitize it, and write it to `out_path` (+ `.data` if large)."""
    # Our own log says what folding did, once per model; Polygraphy's and onnxruntime's chatter says nothing actionable.
    G_LOGGER.module_severity = G_LOGGER.WARNING
    ort.set_default_logger_severity(3)
    model = onnx.load(str(raw_path), load_external_data=False)
    nodes_before = len(model.graph.node)
    weights = _detach_weights(model, raw_path.parent)
    try:
        model = fold_constants(model, allow_onnxruntime_shape_inference=True, error_ok=False)
    except Exception as exc:  # Polygraphy raises plain exceptions from onnxruntime or graphsurgeon
        raise ExportError(f"constant folding of {raw_path.name} failed: {exc}") from exc
    graph = gs.import_onnx(model)
    del model
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    model = gs.export_onnx(graph)
    del graph
    _attach_weights(model, weights)
    del weights  # inline weights were copied back into the model: drop the originals before saving
    logger.info("%s: %d nodes after folding and cleanup (%d before)", out_path.parent.name, len(model.graph.node), nodes_before)
    save_onnx(model, out_path, raw_path.parent)


def _detach_weights(model: onnx.ModelProto, base_dir: Path) -> list[onnx.TensorProto]:
    """Move `model`'s large initializers out of its graph, declared as inputs of the same type and shape instead, so
    that folding cannot read (or copy) them; return the removed tensors, unread. The small ones it keeps are read in
    from their external files (a traced model over 2 GB keeps every tensor external), so folding can use them."""
    weights = [t for t in model.graph.initializer if tensor_nbytes(t) >= _FOLD_WEIGHT_BYTES]
    names = {t.name for t in weights}
    kept = [t for t in model.graph.initializer if t.name not in names]
    for tensor in kept:
        _inline(tensor, base_dir)
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    model.graph.input.extend(helper.make_tensor_value_info(t.name, t.data_type, t.dims) for t in weights)
    return weights


def _attach_weights(model: onnx.ModelProto, weights: list[onnx.TensorProto]) -> None:
    """Put `weights` back into `model` (the cleaned graph) as initializers, those that a node still reads, and drop
    their stand-in inputs."""
    by_name = {t.name: t for t in weights}
    read = {name for node in model.graph.node for name in node.input}
    inputs = [value for value in model.graph.input if value.name not in by_name]
    del model.graph.input[:]
    model.graph.input.extend(inputs)
    model.graph.initializer.extend(t for t in weights if t.name in read)


def save_onnx(model: onnx.ModelProto, out_path: Path, base_dir: Path | None = None) -> None:
    """Write `model` to `out_path`, its weights in one `out_path.name + ".data"` file beside it when large, and
    check the written model with onnx.checker; raise ExportError if it fails.

    Tensors of `model` may keep their values in external files under `base_dir` (as a traced model does); they are
    copied into the new data file, or inlined, one tensor at a time. Inline values are dropped from `model` as they
    are written out, so it is not reusable afterwards."""
    out_path.parent.mkdir(parents=True, exist_ok=True)
    base_dir = base_dir or out_path.parent
    initializers = model.graph.initializer
    if sum(tensor_nbytes(t) for t in initializers) > PROTOBUF_LIMIT_BYTES // 2:
        _stream_external_data(initializers, base_dir, out_path.parent, out_path.name + ".data")
    else:
        for tensor in initializers:
            _inline(tensor, base_dir)
    onnx.save_model(model, str(out_path))
    try:
        # The path form reads external data and so also works past the protobuf limit.
        onnx.checker.check_model(str(out_path), full_check=True)
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"{out_path.name} fails onnx.checker: {exc}") from exc


def move_weights_to_data_file(onnx_path: Path) -> None:
    """Rewrite the model at `onnx_path` with its weights in `onnx_path.name + ".data"` beside it, as save_onnx writes
    large models, so that another graph can read them from there; nothing to do where they are there already."""
    model = onnx.load(str(onnx_path), load_external_data=False)
    if any(external_data_helper.uses_external_data(t) for t in model.graph.initializer):
        return
    _stream_external_data(model.graph.initializer, onnx_path.parent, onnx_path.parent, onnx_path.name + ".data")
    onnx.save_model(model, str(onnx_path))


def _inline(tensor: onnx.TensorProto, base_dir: Path) -> None:
    """Read an external tensor's values into the tensor itself (nothing to do for an inline one)."""
    if external_data_helper.uses_external_data(tensor):
        tensor.raw_data = tensor_bytes(tensor, base_dir)
        tensor.data_location = onnx.TensorProto.DEFAULT
        del tensor.external_data[:]


def _stream_external_data(initializers, base_dir: Path, out_dir: Path, location: str) -> None:
    """Write every initializer over the inline threshold into `out_dir / location`, page-aligned, and point it there."""
    with open(out_dir / location, "wb") as data_file:
        for tensor in initializers:
            if tensor_nbytes(tensor) < _EXTERNAL_DATA_THRESHOLD_BYTES:
                _inline(tensor, base_dir)
                continue
            data = tensor_bytes(tensor, base_dir)
            offset = -data_file.tell() % _EXTERNAL_DATA_ALIGNMENT + data_file.tell()
            data_file.seek(offset)
            data_file.write(data)
            del data
            for field in ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data", "string_data"):
                tensor.ClearField(field)
            del tensor.external_data[:]
            for key, value in (("location", location), ("offset", str(offset)), ("length", str(tensor_nbytes(tensor)))):
                tensor.external_data.add(key=key, value=value)
            tensor.data_location = onnx.TensorProto.EXTERNAL
        data_file.truncate()
        os.fsync(data_file.fileno())
