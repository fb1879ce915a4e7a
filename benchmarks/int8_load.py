"""What loading an int8 convolution costs, by how its input is quantized: OpenVINO's CPU plugin repacks a quantized
convolution's weights when it builds its graph (on every load, from its cache too), and where the input is signed
or has a zero point it also computes a compensation from the weights then.

    python -m sdrt.benchmarks.int8_load            # a table of load time per input quantization
    python -m sdrt.benchmarks.int8_load --out int8-load.json

The model is a stack of 3x3 convolutions (a U-Net's most common weight) with int8 weights, each behind a
FakeQuantize of its input: asymmetric (what NNCF gives an input such as SiLU's, which dips below zero), symmetric
(signed, no zero point) or unsigned (from zero, no zero point). The precision each convolution runs in is read back
from the execution graph, so a row whose convolutions fell back to floating point says so.
"""
from __future__ import annotations

import argparse
import dataclasses
import enum
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)


class InputQuantization(str, enum.Enum):
    ASYMMETRIC = "asymmetric"
    SYMMETRIC = "symmetric"
    UNSIGNED = "unsigned"


#: each quantization's input range (low, high): the FakeQuantize's input and output range
_RANGES = {InputQuantization.ASYMMETRIC: (-0.3, 2.0), InputQuantization.SYMMETRIC: (-2.0, 2.0),
           InputQuantization.UNSIGNED: (0.0, 2.0)}
_INT8_PRECISIONS = {"i8", "u8"}


@dataclasses.dataclass(frozen=True)
class LoadTime:
    """One input quantization's compilation of the stack (the faster of two) and a warm call."""

    quantization: InputQuantization
    weights_mb: float
    load_seconds: float
    load_cpu_seconds: float
    call_seconds: float
    runtime_precisions: tuple[str, ...]  # the convolutions' runtimePrecision in the execution graph

    @property
    def int8(self) -> bool:
        return set(self.runtime_precisions) <= _INT8_PRECISIONS


def _conv_stack(quantization: InputQuantization, convolutions: int, channels: int, side: int):
    import openvino as ov
    import openvino.opset13 as ops

    rng = np.random.default_rng(0)
    low, high = (np.float32(v) for v in _RANGES[quantization])
    x = ops.parameter([1, channels, side, side], np.float32, name="x")  # (1, C, S, S)
    hidden = x
    for _ in range(convolutions):
        quantized = ops.fake_quantize(hidden, low, high, low, high, 256)
        weights = rng.integers(-127, 128, size=(channels, channels, 3, 3)).astype(np.int8)  # (C, C, 3, 3)
        scale = np.full((channels, 1, 1, 1), 1.0 / (channels * 9 * 127), np.float32)
        dequantized = ops.multiply(ops.convert(ops.constant(weights), np.float32), ops.constant(scale))
        # clamped into the next quantizer's range, as a normalization would keep it
        hidden = ops.clamp(ops.convolution(quantized, dequantized, [1, 1], [1, 1], [1, 1], [1, 1]), float(low), float(high))
    return ov.Model([hidden], [x], f"conv-stack-{quantization.value}")


def measure(quantization: InputQuantization, convolutions: int = 40, channels: int = 640, side: int = 32) -> LoadTime:
    import openvino as ov

    core = ov.Core()
    model = _conv_stack(quantization, convolutions, channels, side)
    config = {"INFERENCE_PRECISION_HINT": "bf16", "PERFORMANCE_HINT": "LATENCY"}
    loads = []
    for _ in range(2):
        wall, cpu = time.perf_counter(), time.process_time()
        compiled = core.compile_model(model, "CPU", config)
        loads.append((time.perf_counter() - wall, time.process_time() - cpu))
    request = compiled.create_infer_request()
    x = np.random.default_rng(1).uniform(*_RANGES[quantization], (1, channels, side, side)).astype(np.float32)
    request.infer({0: x})
    start = time.perf_counter()
    request.infer({0: x})
    call = time.perf_counter() - start
    precisions = tuple(sorted({op.get_rt_info()["runtimePrecision"].astype(str)
                               for op in compiled.get_runtime_model().get_ordered_ops()
                               if op.get_rt_info()["layerType"].astype(str) == "Convolution"}))
    load_seconds, load_cpu_seconds = min(loads)
    result = LoadTime(quantization, convolutions * channels * channels * 9 / 1e6, load_seconds, load_cpu_seconds,
                      call, precisions)
    if not result.int8:
        logger.warning("the %s stack's convolutions ran in %s", quantization.value, ", ".join(precisions))
    return result


def table(results: Sequence[LoadTime]) -> str:
    lines = ["| input quantization | int8 weights | load | CPU | weights per CPU-second | warm call | convolutions ran in |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r.quantization.value} | {r.weights_mb:.1f} MB | {r.load_seconds:.2f} s | "
                     f"{r.load_cpu_seconds:.2f} s | {r.weights_mb / r.load_cpu_seconds:.0f} MB/s | "
                     f"{r.call_seconds:.3f} s | {', '.join(r.runtime_precisions)} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sdrt.benchmarks.int8_load", description=__doc__.split("\n\n")[0])
    parser.add_argument("--convolutions", type=int, default=40, help="3x3 convolutions in the stack (default 40)")
    parser.add_argument("--channels", type=int, default=640, help="their input and output channels (default 640)")
    parser.add_argument("--side", type=int, default=32, help="the input's height and width (default 32)")
    parser.add_argument("--out", type=Path, help="also write the results as JSON here")
    args = parser.parse_args(argv)
    for name in ("convolutions", "channels", "side"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    results = [measure(q, args.convolutions, args.channels, args.side) for q in InputQuantization]
    print(table(results))
    if args.out is not None:
        args.out.write_text(json.dumps([{**dataclasses.asdict(r), "quantization": r.quantization.value, "int8": r.int8}
                                        for r in results], indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
