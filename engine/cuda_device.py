"""Whether this machine has a CUDA device, and which, asked of the NVIDIA driver (libcuda) through ctypes, so that the
GPU backends can say "no CUDA device" and `sdrt doctor` can name the GPU without cuda-python, tensorrt or
onnxruntime-gpu being installed."""
from __future__ import annotations

import ctypes
import dataclasses
import functools
import sys

from sdrt.engine.errors import GpuError

DRIVER_LIBRARY = "nvcuda.dll" if sys.platform == "win32" else "libcuda.so.1"
CUDA_SUCCESS = 0
#: the device sdrt runs on: the first one CUDA_VISIBLE_DEVICES leaves visible (the backends use device 0 too)
DEVICE_ORDINAL = 0
_NAME_BYTES = 256


@dataclasses.dataclass(frozen=True)
class CudaDevice:
    """The GPU sdrt runs on: its name and total memory."""

    name: str
    memory_bytes: int

    def describe(self) -> str:
        return f"{self.name}, {self.memory_bytes / 2**30:.1f} GiB"


@functools.cache
def cuda_device_unavailable_reason() -> str | None:
    """None if the driver reports at least one CUDA device, else why not (one sentence); asked once per process."""
    try:
        driver = ctypes.CDLL(DRIVER_LIBRARY)
    except OSError:
        return f"no CUDA device: the NVIDIA driver ({DRIVER_LIBRARY}) is not installed"
    status = driver.cuInit(0)
    if status != CUDA_SUCCESS:
        return f"no CUDA device: the NVIDIA driver's cuInit failed with CUresult {status}"
    count = ctypes.c_int(0)
    if driver.cuDeviceGetCount(ctypes.byref(count)) != CUDA_SUCCESS or count.value < 1:
        return "no CUDA device: the NVIDIA driver finds none"
    return None


def cuda_device() -> CudaDevice | None:
    """The CUDA device sdrt runs on, or None where cuda_device_unavailable_reason() says why there is none; raise
    GpuError if the driver fails to describe it."""
    if cuda_device_unavailable_reason() is not None:
        return None
    driver = ctypes.CDLL(DRIVER_LIBRARY)  # loaded already: this returns the same handle
    device = ctypes.c_int(0)
    name = ctypes.create_string_buffer(_NAME_BYTES)
    memory = ctypes.c_size_t(0)
    _check("cuDeviceGet", driver.cuDeviceGet(ctypes.byref(device), DEVICE_ORDINAL))
    _check("cuDeviceGetName", driver.cuDeviceGetName(name, _NAME_BYTES, device))
    _check("cuDeviceTotalMem_v2", driver.cuDeviceTotalMem_v2(ctypes.byref(memory), device))
    return CudaDevice(name.value.decode(errors="replace").strip(), int(memory.value))


def _check(function: str, status: int) -> None:
    if status != CUDA_SUCCESS:
        raise GpuError(f"{function} failed with CUresult {status}")
