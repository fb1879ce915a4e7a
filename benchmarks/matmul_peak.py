"""The floor a U-Net call is measured against: this machine's matrix-product peak per precision, measured with
OpenVINO, and the U-Net's floating-point work per call, counted from its graph at a request's shape.

    python -m sdrt.benchmarks.matmul_peak          # prints the fp32, bf16 and int8 peaks of this machine

A peak is one MatMul of a U-Net-like size compiled by OpenVINO's CPU plugin: fp32 and bf16 by
INFERENCE_PRECISION_HINT, int8 by FakeQuantize on both inputs (the plugin's low-precision transformations turn that
into an int8 GEMM). The precision the compiled product really runs in is read back from the execution graph, so a
machine without bf16 or int8 units reports what it ran rather than a peak it does not have.
"""
from __future__ import annotations

import argparse
import dataclasses
import enum
import json
import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)


class Precision(str, enum.Enum):
    FP32 = "fp32"
    BF16 = "bf16"
    INT8 = "int8"


#: (M, K, N) of the measured product: 64×64 tokens (a 512² request's first U-Net level) through a 1280-wide
#: projection, the size of the U-Net's larger linear layers and of a 3×3 convolution's reduction at 128 channels
PEAK_SHAPE = (4096, 1280, 1280)
_INFERENCE_PRECISION = {Precision.FP32: "f32", Precision.BF16: "bf16", Precision.INT8: "f32"}
#: the execution graph's runtimePrecision of the product when it runs in each precision
_RUNTIME_PRECISIONS = {Precision.FP32: {"f32"}, Precision.BF16: {"bf16"}, Precision.INT8: {"i8", "u8"}}


@dataclasses.dataclass(frozen=True)
class Peak:
    """One precision's measured product: its best throughput and what the compiled product ran in."""

    precision: Precision
    gflops: float
    runtime_precision: str  # the execution graph's runtimePrecision of the product node, e.g. "bf16", "u8"
    kernel: str  # the execution graph's primitiveType, e.g. "brgemm_avx512_I8"

    @property
    def verified(self) -> bool:
        """Whether the product really ran in `precision` (not a fallback to fp32)."""
        return self.runtime_precision in _RUNTIME_PRECISIONS[self.precision]


def _matmul_model(precision: Precision, m: int, k: int, n: int):
    import openvino as ov
    import openvino.opset13 as ops

    rng = np.random.default_rng(0)
    x = ops.parameter([m, k], np.float32, name="x")  # (M, K)
    w = ops.constant((rng.standard_normal((k, n)) * 0.05).astype(np.float32))  # (K, N)
    a, b = x, w
    if precision is Precision.INT8:
        # unsigned activations and symmetric weights: what NNCF's int8 U-Net gives the plugin
        a = ops.fake_quantize(x, np.float32(0), np.float32(4), np.float32(0), np.float32(4), 256)
        b = ops.fake_quantize(w, np.float32(-0.25), np.float32(0.25), np.float32(-0.25), np.float32(0.25), 255)
    return ov.Model([ops.matmul(a, b, False, False)], [x], f"matmul-{precision.value}")


def _product_node(compiled) -> tuple[str, str]:
    """(runtimePrecision, primitiveType) of the compiled model's matrix-product node."""
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        if info["layerType"].astype(str) in ("FullyConnected", "MatMul"):
            return info["runtimePrecision"].astype(str), info["primitiveType"].astype(str)
    raise RuntimeError("the compiled model has no FullyConnected or MatMul node")


def measure_peak(precision: Precision, shape: tuple[int, int, int] = PEAK_SHAPE, repeats: int = 20) -> Peak:
    """The best of `repeats` timed products of `shape` (M, K, N) in `precision`, on all of this machine's cores."""
    import openvino as ov

    m, k, n = shape
    compiled = ov.Core().compile_model(_matmul_model(precision, m, k, n), "CPU", {
        "INFERENCE_PRECISION_HINT": _INFERENCE_PRECISION[precision], "PERFORMANCE_HINT": "LATENCY"})
    request = compiled.create_infer_request()
    x = np.random.default_rng(1).uniform(0, 4, (m, k)).astype(np.float32)  # (M, K)
    for _ in range(3):  # kernels chosen, memory allocated
        request.infer({0: x})
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        request.infer({0: x})
        best = min(best, time.perf_counter() - start)
    runtime_precision, kernel = _product_node(compiled)
    peak = Peak(precision, 2 * m * k * n / best / 1e9, runtime_precision, kernel)
    if not peak.verified:
        logger.warning("the %s product ran in %s (%s) on this machine", precision.value, runtime_precision, kernel)
    return peak


def measure_peaks(precisions: Sequence[Precision] = tuple(Precision)) -> dict[str, dict]:
    """Each precision's peak as JSON-ready dicts, keyed by precision name."""
    return {p.value: {**dataclasses.asdict(peak), "precision": p.value, "verified": peak.verified}
            for p in precisions for peak in [measure_peak(p)]}


def count_flops(model_path: Path, input_shapes: Mapping[str, Sequence[int]]) -> int:
    """Floating-point operations (a multiply-add counts two) of the graph's convolutions and matrix products at
    static `input_shapes` (input name -> shape); other ops (normalisations, activations, softmax) are left out, as
    they are a small share of a U-Net's work and run on other units than a matrix product's."""
    import openvino as ov

    model = ov.Core().read_model(str(model_path))
    model.reshape({name: ov.PartialShape(list(shape)) for name, shape in input_shapes.items()})
    total = 0
    for op in model.get_ordered_ops():
        kind = op.get_type_name()
        if kind not in ("Convolution", "GroupConvolution", "MatMul"):
            continue
        output = op.get_output_shape(0)
        if kind == "MatMul":
            a = op.get_input_shape(0)
            reduced = a[-2] if len(a) > 1 and op.get_attributes()["transpose_a"] else a[-1]  # K
            total += 2 * int(np.prod(list(output))) * reduced
        else:
            # weights: (C_out, C_in, kH, kW), grouped (G, C_out/G, C_in/G, kH, kW): each output takes C_in/G × kH × kW
            weights = op.get_input_shape(1)
            per_output = int(np.prod(list(weights)[2:]) if kind == "GroupConvolution" else np.prod(list(weights)[1:]))
            total += 2 * int(np.prod(list(output))) * per_output
    return total


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sdrt.benchmarks.matmul_peak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--precisions", nargs="+", choices=[p.value for p in Precision], default=[p.value for p in Precision])
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    print(json.dumps(measure_peaks([Precision(p) for p in args.precisions]), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
