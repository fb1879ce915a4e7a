"""The few CUDA runtime calls the TensorRT path makes, through cuda-python (imported on first use), each checked by
one helper; device memory, streams and graphs are freed when released or garbage-collected."""
from __future__ import annotations

import weakref
from collections.abc import Callable
from types import ModuleType
from typing import Any

import numpy as np

from sdrt.engine.backends.tensorrt.engines.identity import GpuIdentity
from sdrt.engine.errors import BackendUnavailableError, GpuError

GPU_EXTRA_HINT = "pip install 'sdrt[gpu]'"


def cudart() -> ModuleType:
    """cuda-python's runtime module; raise BackendUnavailableError if cuda-python is not installed."""
    try:
        from cuda.bindings import runtime  # cuda-python >= 12.6
    except ImportError:
        try:
            from cuda import cudart as runtime
        except ImportError:
            raise BackendUnavailableError(f"cuda-python is not installed ({GPU_EXTRA_HINT})") from None
    return runtime


def call(function: Callable[..., tuple[Any, ...]], *args: Any) -> Any:
    """Call a cuda-python runtime function, which returns (error, *results); return its one result, or the tuple
    of several, or None; raise GpuError naming the function and the error unless it is cudaSuccess."""
    error, *results = function(*args)
    if error != cudart().cudaError_t.cudaSuccess:
        raise GpuError(f"{function.__name__} failed: {getattr(error, 'name', error)}")
    if not results:
        return None
    return results[0] if len(results) == 1 else tuple(results)


def current_gpu() -> GpuIdentity:
    """The name and compute capability of the current CUDA device."""
    runtime = cudart()
    properties = call(runtime.cudaGetDeviceProperties, call(runtime.cudaGetDevice))
    name = properties.name
    if isinstance(name, bytes):
        name = name.split(b"\0", 1)[0].decode(errors="replace")
    return GpuIdentity(name.strip(), (int(properties.major), int(properties.minor)))


class DeviceBuffer:
    """`nbytes` of device memory at `ptr`."""

    def __init__(self, nbytes: int) -> None:
        runtime = cudart()
        self.nbytes = nbytes
        self.ptr = int(call(runtime.cudaMalloc, nbytes))
        #: frees the memory; called at most once (by eviction, or when the buffer is garbage-collected)
        self.release = weakref.finalize(self, runtime.cudaFree, self.ptr)


class CudaGraph:
    """An instantiated CUDA graph: the work captured on a stream, replayed with one launch."""

    def __init__(self, executable: Any) -> None:
        self._executable = executable
        self.release = weakref.finalize(self, cudart().cudaGraphExecDestroy, executable)

    def launch(self, stream: Stream) -> None:
        call(cudart().cudaGraphLaunch, self._executable, stream.handle)


class Stream:
    """A CUDA stream, and the host<->device copies and graph capture done on it."""

    def __init__(self) -> None:
        runtime = cudart()
        self.handle = call(runtime.cudaStreamCreate)
        self.release = weakref.finalize(self, runtime.cudaStreamDestroy, self.handle)

    @property
    def ptr(self) -> int:
        """The stream's address, as TensorRT's execute_async_v3 takes it."""
        return int(self.handle)

    def copy_to_device(self, buffer: DeviceBuffer, array: np.ndarray) -> None:
        # From pageable memory the call returns once `array` is staged, so the caller may drop it right away.
        runtime = cudart()
        call(runtime.cudaMemcpyAsync, buffer.ptr, array.ctypes.data, array.nbytes, runtime.cudaMemcpyKind.cudaMemcpyHostToDevice, self.handle)

    def copy_to_host(self, array: np.ndarray, buffer: DeviceBuffer) -> None:
        runtime = cudart()
        call(runtime.cudaMemcpyAsync, array.ctypes.data, buffer.ptr, array.nbytes, runtime.cudaMemcpyKind.cudaMemcpyDeviceToHost, self.handle)

    def synchronize(self) -> None:
        call(cudart().cudaStreamSynchronize, self.handle)

    def capture(self, work: Callable[[], None], relaxed: bool = False) -> CudaGraph:
        """Run `work` (which only enqueues on this stream) under capture and return the instantiated graph.
        `relaxed`: CUDA's relaxed capture mode, which lets `work` allocate memory (CuPy's pool does); otherwise
        thread-local, where another thread's CUDA calls (a second pipeline, say) do not invalidate this capture.
        If `work` raises, the capture is ended and its graph destroyed, and `work`'s exception propagates."""
        runtime = cudart()
        modes = runtime.cudaStreamCaptureMode
        mode = modes.cudaStreamCaptureModeRelaxed if relaxed else modes.cudaStreamCaptureModeThreadLocal
        call(runtime.cudaStreamBeginCapture, self.handle, mode)
        try:
            work()
        except BaseException:
            # The capture is invalidated: ending it fails or returns a partial graph; neither may mask the error.
            _error, *graph = runtime.cudaStreamEndCapture(self.handle)
            if graph and graph[0]:
                runtime.cudaGraphDestroy(graph[0])
            raise
        graph = call(runtime.cudaStreamEndCapture, self.handle)
        try:
            return CudaGraph(call(runtime.cudaGraphInstantiate, graph, 0))
        finally:
            call(runtime.cudaGraphDestroy, graph)  # the instantiated graph no longer needs its template
