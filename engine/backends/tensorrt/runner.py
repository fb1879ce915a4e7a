"""One deserialised TensorRT engine, run on a stream shared with the other engines.

Each distinct set of input shapes gets a slot: its own execution context, shaped once and never re-shaped (a CUDA
graph captured on a context is replayed only on that context, with the shapes of its capture), device buffers
allocated once and bound by tensor name, and with `capture_graphs` the engine's launch for that shape captured in a
CUDA graph on first use and replayed on every later call. The slots' contexts share one scratch (activation) buffer:
they run one at a time on one stream. At most MAX_CACHED_SHAPES shapes are kept, least recently used released first.
`run` copies small numpy inputs and outputs to and from the device per call; `own_slot` gives a device loop
(sdrt.engine.backends.tensorrt.device_loop) a slot of its own, whose buffers it fills on the device.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from sdrt.engine.backends.tensorrt.cuda import CudaGraph, DeviceBuffer, Stream
from sdrt.engine.backends.tensorrt.library import tensorrt, trt_logger
from sdrt.engine.backends.tensorrt.lru import LRUCache
from sdrt.engine.errors import GpuError

#: shapes kept per engine (a context, buffers, and a CUDA graph where captured): a server alternating a few sizes
#: keeps them all, and memory stays bounded however many sizes it is asked for
MAX_CACHED_SHAPES = 4

_ShapeKey = tuple[tuple[str, tuple[int, ...]], ...]  # (input name, shape) in engine input order


@dataclasses.dataclass
class ShapeSlot:
    """What one set of input shapes holds: the execution context shaped for it, its device buffers by tensor name,
    the outputs' shapes, and its CUDA graph where captured."""

    context: Any
    buffers: dict[str, DeviceBuffer]
    input_shapes: dict[str, tuple[int, ...]]
    output_shapes: dict[str, tuple[int, ...]]
    graph: CudaGraph | None = None

    def release(self) -> None:
        if self.graph is not None:
            self.graph.release()  # before the buffers its kernels point at
        for buffer in self.buffers.values():
            buffer.release()
        self.context = None


class EngineRunner:
    """Runs one serialised engine (`plan`: bytes or a buffer) on `stream`."""

    def __init__(self, plan: Any, stream: Stream, capture_graphs: bool, max_shapes: int = MAX_CACHED_SHAPES) -> None:
        trt = tensorrt()
        self._runtime = trt.Runtime(trt_logger())
        self._engine = self._runtime.deserialize_cuda_engine(plan)
        if self._engine is None:
            raise GpuError("TensorRT could not deserialise the engine (see the sdrt.engine.backends.tensorrt.trt log)")
        self._trt = trt
        # one activation buffer for every slot's context: they run one at a time, on one stream
        self._scratch = DeviceBuffer(max(1, int(self._engine.device_memory_size_v2)))  # at the largest profile shapes
        names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
        self.inputs = tuple(n for n in names if self._engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT)
        #: in the network's output order: the ONNX graph's, which is the component spec's
        self.outputs = tuple(n for n in names if n not in self.inputs)
        #: every input's and output's dtype, as the engine takes and gives it
        self.dtypes = {n: np.dtype(trt.nptype(self._engine.get_tensor_dtype(n))) for n in names}
        self._stream = stream
        self._slots: LRUCache[_ShapeKey, ShapeSlot] = LRUCache(max_shapes, lambda key: self._create_slot(key, capture_graphs), ShapeSlot.release)

    def run(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """Run on `feeds` (input name -> array); return the outputs, owned by the caller, in `self.outputs` order."""
        arrays = {name: np.ascontiguousarray(feeds[name], dtype=self.dtypes[name]) for name in self.inputs}
        key = tuple((name, arrays[name].shape) for name in self.inputs)
        slot = self._slots.get(key)
        for name, array in arrays.items():
            self._stream.copy_to_device(slot.buffers[name], array)
        if slot.graph is not None:
            slot.graph.launch(self._stream)
        else:
            self.launch(slot)
        outputs = [np.empty(slot.output_shapes[name], dtype=self.dtypes[name]) for name in self.outputs]
        for name, array in zip(self.outputs, outputs):
            self._stream.copy_to_host(array, slot.buffers[name])
        self._stream.synchronize()
        return outputs

    def refit(self, weights: Mapping[str, np.ndarray]) -> None:
        """Replace the named weights (ONNX initializer names) with these values; the engine must have been built
        refittable. Raise GpuError naming a weight TensorRT refuses."""
        trt = tensorrt()
        refitter = trt.Refitter(self._engine, trt_logger())
        # kept referenced until refit_cuda_engine has copied them: trt.Weights only points at the array's memory
        arrays = {name: np.ascontiguousarray(array, dtype=np.float32) for name, array in weights.items()}
        for name, array in arrays.items():
            if not refitter.set_named_weights(name, trt.Weights(array)):
                raise GpuError(f"TensorRT refused new weights for {name} {array.shape}: not a refittable weight of this engine, or of another shape")
        missing = list(refitter.get_missing_weights())
        if missing:  # TensorRT refits fused weights together: a layer's partner weights must come along
            raise GpuError(f"TensorRT cannot refit without {len(missing)} more weight(s), which the refit must also supply: "
                           f"{', '.join(sorted(missing))}")
        if not refitter.refit_cuda_engine():
            raise GpuError("TensorRT refit_cuda_engine failed (see the sdrt.engine.backends.tensorrt.trt log)")
        # A captured graph replays kernels with the weight addresses of its capture. TensorRT refits in place, so
        # they should still hold, but that is not a documented guarantee: drop every shape's graph (and its
        # buffers), to be captured again on next use, rather than risk replaying stale weights.
        self._slots.clear()

    def own_slot(self, shapes: Mapping[str, tuple[int, ...]]) -> ShapeSlot:
        """A slot of these input shapes owned by the caller (not cached, no graph: the caller releases it, and
        captures `launch` into graphs of its own): a device loop's U-Net, whose buffers it fills on the device."""
        return self._create_slot(tuple((name, tuple(shapes[name])) for name in self.inputs), capture=False)

    def launch(self, slot: ShapeSlot) -> None:
        """Enqueue the engine on the stream for `slot`'s shapes, without its graph; no synchronisation."""
        _execute(slot.context, self._stream)

    def _create_slot(self, key: _ShapeKey, capture: bool) -> ShapeSlot:
        context = self._new_context()
        for name, shape in key:
            if not context.set_input_shape(name, shape):
                raise GpuError(f"TensorRT rejected shape {shape} for input {name}: it is outside the engine's optimization profile")
        output_shapes = {name: tuple(context.get_tensor_shape(name)) for name in self.outputs}  # follow from the inputs'
        shapes = {**dict(key), **output_shapes}
        buffers = {name: DeviceBuffer(math.prod(shape) * self.dtypes[name].itemsize) for name, shape in shapes.items()}
        slot = ShapeSlot(context, buffers, dict(key), output_shapes)
        for name, buffer in buffers.items():
            if not context.set_tensor_address(name, buffer.ptr):
                raise GpuError(f"TensorRT refused the device address of tensor {name} {shapes[name]} (misaligned, or not a tensor of this engine)")
        if capture:
            # TensorRT finishes shape-dependent set-up on the first launch after a shape change; that launch must
            # happen outside the capture (its input is whatever the new buffers hold: the result is discarded).
            _execute(context, self._stream)
            slot.graph = self._stream.capture(lambda: _execute(context, self._stream))
        return slot

    def _new_context(self) -> Any:
        """An execution context on the shared scratch buffer (TensorRT >= 10.1's user-managed device memory)."""
        context = self._engine.create_execution_context(self._trt.ExecutionContextAllocationStrategy.USER_MANAGED)
        if context is None:
            raise GpuError("TensorRT could not create an execution context (out of device memory?)")
        context.set_device_memory(self._scratch.ptr, self._scratch.nbytes)
        return context


def _execute(context: Any, stream: Stream) -> None:
    if not context.execute_async_v3(stream.ptr):
        raise GpuError("TensorRT execute_async_v3 failed (see the sdrt.engine.backends.tensorrt.trt log)")
