"""Inference backends behind one interface, and the choice among them.

`backend="auto"` takes the fastest available backend: TensorRT where this GPU has engines built for the bundle, then
onnxruntime on CUDA (its fp16 variants where the bundle has them, else fp32), then the CPU backends (the int8 U-Net where `sdrt quantize` has made one for the bundle, then bf16 where the CPU
supports it: see PSNR in the benchmark results); `backend="exact"` the fastest fp32 one, at pixel parity with diffusers.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

from sdrt.engine.backends.base import Backend, ComponentFile, MemoryPolicy, MemoryProfile
from sdrt.engine.backends.onnxruntime_cpu import OnnxRuntimeCPUBackend
from sdrt.engine.backends.onnxruntime_cuda import OnnxRuntimeCUDABackend, OnnxRuntimeCUDAFP16Backend
from sdrt.engine.backends.openvino.backend import OpenVINOBF16Backend, OpenVINOFP32Backend, OpenVINOInt8Backend
from sdrt.engine.backends.tensorrt.backend import TensorRTBackend
from sdrt.engine.errors import BackendUnavailableError
from sdrt.engine.specs import Component

logger = logging.getLogger(__name__)

#: fastest first: GPU before CPU; on the GPU in the order their precision and fusion suggest (not yet measured:
#: `sdrt doctor --gpu` times them); on the CPU, measured on the SD 1.5 U-Net at 512x512, 2 AVX-512 BF16 cores
#: (benchmarks/RESULTS.md)
BACKENDS: tuple[type[Backend], ...] = (
    TensorRTBackend, OnnxRuntimeCUDAFP16Backend, OnnxRuntimeCUDABackend, OpenVINOInt8Backend, OpenVINOBF16Backend,
    OpenVINOFP32Backend, OnnxRuntimeCPUBackend,
)
AUTO, EXACT = "auto", "exact"


def _unavailable_reason(
    candidate: type[Backend], bundle_dir: Path | None, components: Mapping[Component, ComponentFile] | None
) -> tuple[str | None, bool]:
    """Why `candidate` cannot run (None if it can), and whether the reason is the bundle's rather than the machine's."""
    reason = candidate.unavailable_reason()
    if reason is None and bundle_dir is not None:
        return candidate.bundle_unavailable_reason(bundle_dir, components or {}), True
    return reason, False


def backend_class(
    name: str, bundle_dir: Path | None = None, components: Mapping[Component, ComponentFile] | None = None
) -> type[Backend]:
    """The backend class for `name`: "auto", "exact" or a backend's own name; raise if unknown or unavailable.

    Given the bundle (its directory and component files, as the backend's constructor takes them), backends that
    cannot run this bundle are unavailable too: TensorRT without engines built for this GPU and these model files.
    "auto" and "exact" then fall back to the next backend and log why, naming the command that fixes it.
    """
    if name in (AUTO, EXACT):
        reasons: dict[str, str] = {}
        for candidate in (b for b in BACKENDS if name == AUTO or b.exact):
            reason, about_bundle = _unavailable_reason(candidate, bundle_dir, components)
            if reason is None:
                return candidate
            reasons[candidate.name] = reason
            # The machine could run it: say so, since a command makes it available (quietly for an opt-in backend).
            level = (logging.INFO if candidate.opt_in else logging.WARNING) if about_bundle else logging.DEBUG
            logger.log(level, "backend %s: not %s: %s", name, candidate.name, reason)
        raise BackendUnavailableError(f"no {name} inference backend is available: " + "; ".join(f"{n}: {r}" for n, r in reasons.items()))
    by_name = {b.name: b for b in BACKENDS}
    if name not in by_name:
        raise BackendUnavailableError(f"backend: unknown backend {name!r}; choose one of {[AUTO, EXACT, *by_name]}")
    reason, _ = _unavailable_reason(by_name[name], bundle_dir, components)
    if reason is not None:
        raise BackendUnavailableError(f"backend {name!r} is unavailable: {reason}")
    return by_name[name]


__all__ = [
    "Backend", "ComponentFile", "MemoryPolicy", "MemoryProfile", "BACKENDS", "backend_class", "OnnxRuntimeCPUBackend", "OnnxRuntimeCUDABackend",
    "OnnxRuntimeCUDAFP16Backend", "OpenVINOBF16Backend", "OpenVINOFP32Backend", "OpenVINOInt8Backend", "TensorRTBackend",
]
