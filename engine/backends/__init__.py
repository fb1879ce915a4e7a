"""Inference backends behind one interface, and the choice among them.

`backend="auto"` takes the fastest available backend (bf16 where the CPU supports it: see PSNR in the benchmark
results); `backend="exact"` the fastest fp32 one, at pixel parity with diffusers.
"""
from __future__ import annotations

from sdrt.engine.backends.base import Backend, ComponentFile, MemoryPolicy
from sdrt.engine.backends.onnxruntime_cpu import OnnxRuntimeCPUBackend
from sdrt.engine.backends.openvino_cpu import OpenVINOBF16Backend, OpenVINOFP32Backend
from sdrt.engine.errors import BackendUnavailableError

#: fastest first (measured on the SD 1.5 U-Net at 512x512, 2 AVX-512 BF16 cores: benchmarks/RESULTS.md)
BACKENDS: tuple[type[Backend], ...] = (OpenVINOBF16Backend, OpenVINOFP32Backend, OnnxRuntimeCPUBackend)
AUTO, EXACT = "auto", "exact"


def backend_class(name: str) -> type[Backend]:
    """The backend class for `name`: "auto", "exact" or a backend's own name; raise if unknown or unavailable."""
    if name in (AUTO, EXACT):
        candidates = [b for b in BACKENDS if name == AUTO or b.exact]
        for candidate in candidates:
            if candidate.unavailable_reason() is None:
                return candidate
        reasons = "; ".join(f"{b.name}: {b.unavailable_reason()}" for b in candidates)
        raise BackendUnavailableError(f"no {name} inference backend is available: {reasons}")
    by_name = {b.name: b for b in BACKENDS}
    if name not in by_name:
        raise BackendUnavailableError(f"backend: unknown backend {name!r}; choose one of {[AUTO, EXACT, *by_name]}")
    reason = by_name[name].unavailable_reason()
    if reason is not None:
        raise BackendUnavailableError(f"backend {name!r} is unavailable: {reason}")
    return by_name[name]


__all__ = ["Backend", "ComponentFile", "MemoryPolicy", "BACKENDS", "backend_class", "OnnxRuntimeCPUBackend", "OpenVINOBF16Backend", "OpenVINOFP32Backend"]
