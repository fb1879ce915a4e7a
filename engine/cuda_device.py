"""Whether this machine has a CUDA device, asked of the NVIDIA driver (libcuda) through ctypes, so that the GPU
backends can say "no CUDA device" without cuda-python, tensorrt or onnxruntime-gpu being installed."""
from __future__ import annotations

import ctypes
import functools
import sys

DRIVER_LIBRARY = "nvcuda.dll" if sys.platform == "win32" else "libcuda.so.1"
CUDA_SUCCESS = 0


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
