"""Which tensor of a TensorRT engine first departs from onnxruntime's: Polygraphy's layer-by-layer comparison, for
a build that misbehaves (NaN, or images far from the CPU engine's). `sdrt build-engines BUNDLE --compare-layers unet`.

Every intermediate tensor of the component's ONNX graph is marked as an output (Polygraphy's "mark all"), the marked
graph runs once in onnxruntime (fp32, the reference) and once in the candidate (a TensorRT engine built from the
same graph in the chosen precision), both on the same probe inputs at the profile's opt shapes, and the tensors are
compared in graph order. Marking every tensor stops TensorRT fusing layers, so this is a debugging build, never
stored with the bundle's engines.
"""
from __future__ import annotations

import dataclasses
import logging
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sdrt.engine.backends.tensorrt.engines.profile import Precision, ShapeRange
from sdrt.engine.manifest import ComponentEntry

logger = logging.getLogger(__name__)

PROBE_SEED = 0


@dataclasses.dataclass(frozen=True)
class LayerTolerance:
    """A tensor diverges when its largest difference exceeds atol + rtol x its largest reference magnitude, or when
    the candidate holds NaN or infinity where the reference does not."""

    rtol: float
    atol: float

    @classmethod
    def for_precision(cls, precision: Precision) -> LayerTolerance:
        # fp32 engines (TF32 off) agree with onnxruntime to rounding; fp16/bf16 layers to a few significant bits
        return cls(1e-3, 1e-4) if precision is Precision.FP32 else cls(5e-2, 1e-3)


@dataclasses.dataclass(frozen=True)
class LayerDivergence:
    """The first tensor, in graph order, outside the tolerance."""

    tensor: str
    max_abs_diff: float  # inf where the candidate is not finite
    reference_max_abs: float
    agreed: int  # tensors compared before it, all within the tolerance

    def describe(self) -> str:
        return (f"first diverging tensor: {self.tensor} (max abs diff {self.max_abs_diff:.4g}, reference magnitude "
                f"{self.reference_max_abs:.4g}), after {self.agreed} tensors that agree")


#: a runner over the marked graph at the given path: anything with Polygraphy's runner interface
#: (`with runner: runner.infer(feeds)` -> {tensor name: array})
RunnerFactory = Callable[[Path], Any]


def graph_order(onnx_model: Any) -> list[str]:
    """The names of the tensors the graph's nodes produce, in node order (ONNX graphs are topologically sorted)."""
    return [name for node in onnx_model.graph.node for name in node.output if name]


def first_divergence(
    reference: Mapping[str, np.ndarray], candidate: Mapping[str, np.ndarray], order: Sequence[str], tolerance: LayerTolerance
) -> tuple[LayerDivergence | None, int]:
    """The first tensor of `order` present in both runs whose values differ beyond `tolerance` (None if none), and
    how many tensors were compared."""
    compared = 0
    for name in order:
        if name not in reference or name not in candidate:
            continue  # constants TensorRT folded away, or shape tensors it does not expose
        expected = np.asarray(reference[name], dtype=np.float64)
        actual = np.asarray(candidate[name], dtype=np.float64)
        if expected.shape != actual.shape or expected.dtype.kind not in "fiu":
            continue
        scale = float(np.abs(expected[np.isfinite(expected)]).max(initial=0.0))
        finite = np.isfinite(actual) | ~np.isfinite(expected)
        diff = float(np.abs(actual - expected)[np.isfinite(actual) & np.isfinite(expected)].max(initial=0.0))
        if not finite.all():
            diff = float("inf")
        if diff > tolerance.atol + tolerance.rtol * scale:
            return LayerDivergence(name, diff, scale, compared), compared + 1
        compared += 1
    return None, compared


def probe_feeds(entry: ComponentEntry, shapes: Mapping[str, ShapeRange], token_ids: np.ndarray) -> dict[str, np.ndarray]:
    """Inputs of `entry`'s component at the opt of their `shapes`
    (sdrt.engine.backends.tensorrt.engines.profile.component_shapes): unit-normal floats, and `token_ids` (one
    tokenized prompt, (sequence,)) in every row of an integer input."""
    rng = np.random.default_rng(PROBE_SEED)
    feeds = {}
    for tensor in entry.inputs:
        shape = shapes[tensor.name].opt
        if np.dtype(tensor.dtype).kind in "iu":
            feeds[tensor.name] = np.broadcast_to(token_ids, shape).astype(tensor.dtype)  # (batch, sequence)
        else:
            feeds[tensor.name] = rng.standard_normal(shape).astype(tensor.dtype)
    return feeds


def compare_layers(
    onnx_path: Path, feeds: Mapping[str, np.ndarray], candidate: RunnerFactory, tolerance: LayerTolerance,
    reference: RunnerFactory | None = None,
) -> tuple[LayerDivergence | None, int]:
    """Run the graph at `onnx_path`, every tensor marked as an output, in onnxruntime (or `reference`) and in
    `candidate`; return the first divergence (None if none) and the number of tensors compared."""
    from polygraphy import constants
    from polygraphy.backend.onnx import ModifyOutputs, OnnxFromPath, SaveOnnx

    with tempfile.TemporaryDirectory(prefix="sdrt-layers-") as scratch:
        marked_path = Path(scratch) / "marked.onnx"
        # external data: a full-size U-Net is past protobuf's 2 GB limit
        marked = SaveOnnx(ModifyOutputs(OnnxFromPath(str(onnx_path)), outputs=constants.MARK_ALL),
                          path=str(marked_path), external_data_path="marked.onnx.data")()
        order = graph_order(marked)
        del marked
        outputs = []
        for factory in (reference or onnxruntime_runner, candidate):
            with factory(marked_path) as runner:
                outputs.append(runner.infer(dict(feeds)))
            logger.info("layer comparison: %s ran, %d tensors", runner.name, len(outputs[-1]))
    return first_divergence(outputs[0], outputs[1], order, tolerance)


def onnxruntime_runner(onnx_path: Path) -> Any:
    """onnxruntime on the CPU in fp32: the reference side."""
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx

    return OnnxrtRunner(SessionFromOnnx(str(onnx_path), providers=["CPUExecutionProvider"]))


def tensorrt_runner(shapes: Mapping[str, ShapeRange], precision: Precision) -> RunnerFactory:
    """A TensorRT engine of the marked graph in `precision` with one profile of `shapes` (gpu extra, on a GPU)."""
    def factory(onnx_path: Path) -> Any:
        from polygraphy import constants
        from polygraphy.backend.trt import CreateConfig, EngineFromNetwork, ModifyNetworkOutputs, NetworkFromOnnxPath, Profile, TrtRunner

        profile = Profile()
        for name, shape in shapes.items():
            profile.add(name, min=shape.min, opt=shape.opt, max=shape.max)
        network = ModifyNetworkOutputs(NetworkFromOnnxPath(str(onnx_path)), outputs=constants.MARK_ALL)
        config = CreateConfig(fp16=precision is Precision.FP16, bf16=precision is Precision.BF16, tf32=False, profiles=[profile])
        return TrtRunner(EngineFromNetwork(network, config=config))

    return factory
