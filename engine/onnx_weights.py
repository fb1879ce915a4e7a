"""Read named fp32 initializers out of an ONNX file without the `onnx` package (not a runtime dependency).

An ONNX file is a protobuf ModelProto; this walks its wire format just far enough: ModelProto.graph (field 7) ->
GraphProto.initializer (field 5) -> TensorProto's name, dims, data type, and its raw_data or external-data
location. The file is memory-mapped, and tensors not asked for are skipped without being read, so reading the few
weights LoRA patches costs only their own bytes, inline or in `model.onnx.data`.
"""
from __future__ import annotations

import mmap
from collections.abc import Collection, Iterator
from pathlib import Path

import numpy as np

from sdrt.engine.errors import BundleError

# protobuf wire types
_VARINT, _FIXED64, _LENGTH_DELIMITED, _FIXED32 = 0, 1, 2, 5
# field numbers of onnx.proto3
_MODEL_GRAPH = 7
_GRAPH_INITIALIZER = 5
_TENSOR_DIMS, _TENSOR_DATA_TYPE, _TENSOR_NAME, _TENSOR_RAW_DATA, _TENSOR_EXTERNAL_DATA = 1, 2, 8, 9, 13
_ENTRY_KEY, _ENTRY_VALUE = 1, 2
_ONNX_FLOAT = 1  # TensorProto.DataType.FLOAT
_Span = tuple[int, int]  # [start, end) byte offsets in the file


def _varint(buf: mmap.mmap, pos: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _fields(buf: mmap.mmap, span: _Span) -> Iterator[tuple[int, int, int | _Span]]:
    """(field number, wire type, value) of one message: an int for varints, a span for length-delimited fields;
    fixed-size fields are skipped (yielded with their span)."""
    pos, end = span
    while pos < end:
        key, pos = _varint(buf, pos)
        field, wire = key >> 3, key & 7
        if wire == _VARINT:
            value, pos = _varint(buf, pos)
            yield field, wire, value
        elif wire == _LENGTH_DELIMITED:
            length, pos = _varint(buf, pos)
            yield field, wire, (pos, pos + length)
            pos += length
        elif wire in (_FIXED64, _FIXED32):
            size = 8 if wire == _FIXED64 else 4
            yield field, wire, (pos, pos + size)
            pos += size
        else:
            raise BundleError(f"unsupported protobuf wire type {wire} at byte {pos}: not an ONNX file?")


def _dims(buf: mmap.mmap, wire: int, value: int | _Span) -> list[int]:
    if wire == _VARINT:
        return [value]
    dims, (pos, end) = [], value  # packed repeated int64
    while pos < end:
        dim, pos = _varint(buf, pos)
        dims.append(dim)
    return dims


def _text(buf: mmap.mmap, span: _Span) -> str:
    return buf[span[0]:span[1]].decode("utf-8")


def read_initializers(onnx_path: Path, names: Collection[str]) -> dict[str, np.ndarray]:
    """The fp32 initializers of `onnx_path` named in `names`, as arrays in the graph's shapes; raise BundleError if
    one is missing or stored other than as fp32 raw data (inline or external), which torch's exporter always writes."""
    wanted, found = set(names), {}
    with open(onnx_path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        for model_field, _, graph in _fields(buf, (0, len(buf))):
            if model_field != _MODEL_GRAPH:
                continue
            for graph_field, _, tensor in _fields(buf, graph):
                if graph_field == _GRAPH_INITIALIZER:
                    name, array = _tensor(buf, tensor, wanted, onnx_path)
                    if array is not None:
                        found[name] = array
    missing = sorted(wanted - set(found))
    if missing:
        raise BundleError(f"{onnx_path} has no initializers named {missing[:5]}: its refit map does not match it (re-export the bundle)")
    return found


def _tensor(buf: mmap.mmap, span: _Span, wanted: set[str], onnx_path: Path) -> tuple[str, np.ndarray | None]:
    name, dims, data_type, raw, external = "", [], None, None, {}
    for field, wire, value in _fields(buf, span):
        if field == _TENSOR_NAME:
            name = _text(buf, value)
        elif field == _TENSOR_DIMS:
            dims += _dims(buf, wire, value)
        elif field == _TENSOR_DATA_TYPE:
            data_type = value
        elif field == _TENSOR_RAW_DATA:
            raw = value
        elif field == _TENSOR_EXTERNAL_DATA:
            entry = {key: _text(buf, v) for key, _, v in _fields(buf, value)}
            external[entry.get(_ENTRY_KEY, "")] = entry.get(_ENTRY_VALUE, "")
    if name not in wanted:
        return name, None
    count = int(np.prod(dims, dtype=np.int64))
    if data_type != _ONNX_FLOAT or (raw is None and "location" not in external):
        raise BundleError(f"{onnx_path}: initializer {name} is not stored as fp32 raw data (type {data_type}): sdrt cannot read it")
    if raw is not None:
        array = np.frombuffer(buf[raw[0]:raw[1]], dtype="<f4", count=count)
    else:
        array = np.fromfile(onnx_path.parent / external["location"], dtype="<f4", count=count, offset=int(external.get("offset", 0)))
    if array.size != count:
        raise BundleError(f"{onnx_path}: initializer {name} holds {array.size} values, its shape {dims} needs {count}")
    return name, array.astype(np.float32).reshape(dims)  # a copy: the mapping is closed on return
