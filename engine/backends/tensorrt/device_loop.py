"""The device loop (sdrt.engine.device_loop) on an NVIDIA GPU: CuPy for guidance, the scheduler update and graph
capture, on the stream the TensorRT engines run on; the U-Net a TensorRT execution context of its own per plan,
bound to device buffers that CuPy arrays view.

Needs CuPy (`pip install cupy-cuda12x`); cuda-python and TensorRT only for the U-Net. The validator
(sdrt.benchmarks.gpu_validate --quick) runs `CupyDevice` with a CuPy stand-in U-Net where TensorRT is absent.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
from collections.abc import Callable, Mapping
from types import ModuleType
from typing import Any

import numpy as np

from sdrt.engine.array_namespace import cupy_namespace
from sdrt.engine.backends.base import MemoryPolicy
from sdrt.engine.backends.tensorrt.cuda import DeviceBuffer
from sdrt.engine.backends.tensorrt.runner import EngineRunner, ShapeSlot
from sdrt.engine.errors import InvalidArgumentError

#: "1" (the default where CuPy is installed) runs TensorRT requests in the device loop, "0" in the host loop: set per
#: process, to compare them or to rule the device loop out when debugging
DEVICE_LOOP_ENV = "SDRT_TENSORRT_DEVICE_LOOP"


def device_loop_unavailable_reason(memory: MemoryPolicy) -> str | None:
    """None if the TensorRT backend runs requests in the device loop, else why not (one sentence); raise
    InvalidArgumentError naming DEVICE_LOOP_ENV if it is set to anything but 0 or 1."""
    setting = os.environ.get(DEVICE_LOOP_ENV, "1")
    if setting not in ("0", "1"):
        raise InvalidArgumentError(DEVICE_LOOP_ENV, f"must be 0 (the host loop) or 1 (the default), got {setting!r}")
    if setting == "0":
        return f"{DEVICE_LOOP_ENV}=0"
    if memory is not MemoryPolicy.KEEP_LOADED:
        return "memory policy one-at-a-time unloads the U-Net between stages, and its graphs with it"
    if importlib.util.find_spec("cupy") is None:
        return "CuPy is not installed"
    return None


class CupyDevice:
    """sdrt.engine.device_loop.Device on a CuPy stream (`cupy.cuda.ExternalStream` of the engines' stream)."""

    def __init__(self, stream: Any, cupy: ModuleType | None = None) -> None:
        self.namespace = cupy_namespace() if cupy is None else cupy
        self._stream = stream

    def stream_scope(self) -> Any:
        return self._stream  # a CuPy stream is a context manager that makes it current

    def new_pool(self) -> CupyPool:
        return CupyPool(self.namespace)

    def capture(self, work: Callable[[], None]) -> CupyGraph:
        """`work` captured on the stream in CuPy's relaxed mode (its memory pool may grow during a capture); if
        `work` raises, the capture is ended (its partial graph dropped) and `work`'s exception propagates."""
        self._stream.begin_capture()
        try:
            with self._stream:
                work()
        except BaseException:
            # An invalidated capture may fail to end; that error must not replace the first one.
            with contextlib.suppress(self.namespace.cuda.runtime.CUDARuntimeError):
                self._stream.end_capture()
            raise
        return CupyGraph(self._stream.end_capture(), self._stream)

    def to_host(self, array: Any) -> np.ndarray:
        return array.get(stream=self._stream)  # blocking: waits for the stream's work before it


class CupyPool:
    """A CuPy memory pool private to one plan: its graphs' temporaries are reused by no one else."""

    def __init__(self, cupy: ModuleType) -> None:
        self._cupy = cupy
        self._pool = cupy.cuda.MemoryPool()

    def scope(self) -> Any:
        return self._cupy.cuda.using_allocator(self._pool.malloc)

    def release(self) -> None:
        self._pool.free_all_blocks()


class CupyGraph:
    def __init__(self, graph: Any, stream: Any) -> None:
        self._graph = graph
        self._stream = stream

    def launch(self) -> None:
        self._graph.launch(stream=self._stream)

    def release(self) -> None:
        self._graph = None  # CuPy destroys the executable graph with its object


class TensorRTUNet:
    """sdrt.engine.device_loop.DeviceUNet over the U-Net's EngineRunner (`runner()` returns it loaded)."""

    def __init__(self, runner: Callable[[], EngineRunner], cupy: ModuleType) -> None:
        self._runner = runner
        self._cupy = cupy

    def bind(self, shapes: Mapping[str, tuple[int, ...]]) -> TensorRTBinding:
        runner = self._runner()
        return TensorRTBinding(runner, runner.own_slot(shapes), self._cupy)


class TensorRTBinding:
    """A slot of the U-Net engine (its own execution context and buffers), its buffers viewed as CuPy arrays."""

    def __init__(self, runner: EngineRunner, slot: ShapeSlot, cupy: ModuleType) -> None:
        self._runner, self._slot = runner, slot
        shapes = {**slot.input_shapes, **slot.output_shapes}
        arrays = {name: _view(cupy, slot.buffers[name], shapes[name], runner.dtypes[name]) for name in shapes}
        self.inputs = {name: arrays[name] for name in runner.inputs}
        (self.output,) = (arrays[name] for name in runner.outputs)

    def enqueue(self) -> None:
        self._runner.launch(self._slot)

    def release(self) -> None:
        self._slot.release()


def _view(cupy: ModuleType, buffer: DeviceBuffer, shape: tuple[int, ...], dtype: np.dtype) -> Any:
    """A CuPy array over `buffer`'s device memory (kept alive by the array)."""
    memory = cupy.cuda.UnownedMemory(buffer.ptr, buffer.nbytes, buffer)
    return cupy.ndarray(shape, dtype, cupy.cuda.MemoryPointer(memory, 0))
