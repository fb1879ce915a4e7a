"""fp16 variants of exported ONNX models, for the GPU backends (`sdrt export --fp16-onnx`, backend "cuda-fp16").

Weights and arithmetic become fp16; inputs and outputs stay fp32 (onnxruntime's converter with keep_io_types), so
the runtime feeds a variant exactly as it feeds the fp32 model. The exporter checks each variant against its fp32
model on the probe input (FP16_VALIDATION_RTOL).
"""
from __future__ import annotations

from pathlib import Path

import onnx_graphsurgeon as gs

from sdrt.export.graph_cleanup import save_onnx

#: fp16 keeps about 3 significant digits: a variant's output may differ from its fp32 model's by this fraction of the
#: output's largest magnitude; more means a broken conversion (or fp16 overflow, for NaN and infinity)
FP16_VALIDATION_RTOL = 5e-2


def convert_to_fp16(source: Path, target: Path) -> None:
    """Write the fp16 variant of the ONNX model at `source` (its external weights included) to `target`, with its
    weights in `target.name + ".data"` when large, as the exporter stores fp32 models."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    # From the path: the converter then runs shape inference on the file, which works past protobuf's 2 GB limit.
    model = convert_float_to_float16(str(source), keep_io_types=True)
    # The converter appends the input casts after the nodes that read them; onnx.checker wants the graph in order.
    save_onnx(gs.export_onnx(gs.import_onnx(model).toposort()), target)
