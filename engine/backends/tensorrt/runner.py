"""One deserialised TensorRT engine and its execution context, run on a stream shared with the other engines.

Each distinct set of input shapes gets device buffers allocated once and bound by tensor name; with
`capture_graphs`, the engine's launch for that shape is captured in a CUDA graph on first use and replayed on every
later call of that shape (a new shape captures anew). At most MAX_CACHED_SHAPES shapes are kept, least recently
used released first. Inputs and outputs are small numpy arrays copied to and from the device per call.
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

#: shapes kept per engine (buffers, and a CUDA graph where captured): a server alternating a few sizes keeps them
#: all, and memory stays bounded however many sizes it is asked for
MAX_CACHED_SHAPES = 4

_ShapeKey = tuple[tuple[str, tuple[int, ...]], ...]  # (input name, shape) in engine input order


@dataclasses.dataclass
class _ShapeSlot:
    """What one set of input shapes holds on the device."""

    buffers: dict[str, DeviceBuffer]
    output_shapes: dict[str, tuple[int, ...]]
    graph: CudaGraph | None = None

    def release(self) -> None:
        if self.graph is not None:
            self.graph.release()  # before the buffers its kernels point at
        for buffer in self.buffers.values():
            buffer.release()


class EngineRunner:
    """Runs one serialised engine (`plan`: bytes or a buffer) on `stream`."""

    def __init__(self, plan: Any, stream: Stream, capture_graphs: bool, max_shapes: int = MAX_CACHED_SHAPES) -> None:
        trt = tensorrt()
        self._runtime = trt.Runtime(trt_logger())
        self._engine = self._runtime.deserialize_cuda_engine(plan)
        if self._engine is None:
            raise GpuError("TensorRT could not deserialise the engine (see the sdrt.engine.backends.tensorrt.trt log)")
        self._context = self._engine.create_execution_context()
        if self._context is None:
            raise GpuError("TensorRT could not create an execution context (out of device memory?)")
        names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
        self.inputs = tuple(n for n in names if self._engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT)
        #: in the network's output order: the ONNX graph's, which is the component spec's
        self.outputs = tuple(n for n in names if n not in self.inputs)
        self._dtypes = {n: np.dtype(trt.nptype(self._engine.get_tensor_dtype(n))) for n in names}
        self._stream = stream
        self._capture_graphs = capture_graphs
        self._slots: LRUCache[_ShapeKey, _ShapeSlot] = LRUCache(max_shapes, self._new_slot, _ShapeSlot.release)
        self._bound: _ShapeKey | None = None  # the shapes whose buffers the context is bound to now

    def run(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """Run on `feeds` (input name -> array); return the outputs, owned by the caller, in `self.outputs` order."""
        arrays = {name: np.ascontiguousarray(feeds[name], dtype=self._dtypes[name]) for name in self.inputs}
        key = tuple((name, arrays[name].shape) for name in self.inputs)
        slot = self._slots.get(key)
        if self._bound != key:
            self._set_input_shapes(key)
            self._set_addresses(key, slot)
        for name, array in arrays.items():
            self._stream.copy_to_device(slot.buffers[name], array)
        if slot.graph is not None:
            slot.graph.launch(self._stream)
        else:
            self._execute()
        outputs = [np.empty(slot.output_shapes[name], dtype=self._dtypes[name]) for name in self.outputs]
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
        if not refitter.refit_cuda_engine():
            raise GpuError("TensorRT refit_cuda_engine failed (see the sdrt.engine.backends.tensorrt.trt log)")
        # A captured graph replays kernels with the weight addresses of its capture. TensorRT refits in place, so
        # they should still hold, but that is not a documented guarantee: drop every shape's graph (and its
        # buffers), to be captured again on next use, rather than risk replaying stale weights.
        self._slots.clear()
        self._bound = None

    def _set_input_shapes(self, key: _ShapeKey) -> None:
        for name, shape in key:
            if not self._context.set_input_shape(name, shape):
                raise GpuError(f"TensorRT rejected shape {shape} for input {name}: it is outside the engine's optimization profile")

    def _set_addresses(self, key: _ShapeKey, slot: _ShapeSlot) -> None:
        for name, buffer in slot.buffers.items():
            self._context.set_tensor_address(name, buffer.ptr)
        self._bound = key

    def _new_slot(self, key: _ShapeKey) -> _ShapeSlot:
        self._set_input_shapes(key)  # output shapes follow from them
        output_shapes = {name: tuple(self._context.get_tensor_shape(name)) for name in self.outputs}
        shapes = {**dict(key), **output_shapes}
        buffers = {name: DeviceBuffer(math.prod(shape) * self._dtypes[name].itemsize) for name, shape in shapes.items()}
        slot = _ShapeSlot(buffers, output_shapes)
        self._set_addresses(key, slot)
        if self._capture_graphs:
            # TensorRT finishes shape-dependent set-up on the first launch after a shape change; that launch must
            # happen outside the capture (its input is whatever the new buffers hold: the result is discarded).
            self._execute()
            slot.graph = self._stream.capture(self._execute)
        return slot

    def _execute(self) -> None:
        if not self._context.execute_async_v3(self._stream.ptr):
            raise GpuError("TensorRT execute_async_v3 failed (see the sdrt.engine.backends.tensorrt.trt log)")
