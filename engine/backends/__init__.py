"""Inference backends behind one interface, and the choice among them (`backend="auto"`)."""
from __future__ import annotations

from sdrt.engine.backends.base import Backend
from sdrt.engine.backends.onnxruntime_cpu import OnnxRuntimeCPUBackend
from sdrt.engine.errors import BackendUnavailableError

#: fastest first: "auto" takes the first one available
BACKENDS: tuple[type[Backend], ...] = (OnnxRuntimeCPUBackend,)


def backend_class(name: str) -> type[Backend]:
    """The backend class for `name` ("auto" = the first available); raise if unknown or unavailable."""
    if name == "auto":
        for candidate in BACKENDS:
            if candidate.unavailable_reason() is None:
                return candidate
        raise BackendUnavailableError("no inference backend is available: " + "; ".join(f"{b.name}: {b.unavailable_reason()}" for b in BACKENDS))
    by_name = {b.name: b for b in BACKENDS}
    if name not in by_name:
        raise BackendUnavailableError(f"backend: unknown backend {name!r}; choose one of {['auto', *by_name]}")
    reason = by_name[name].unavailable_reason()
    if reason is not None:
        raise BackendUnavailableError(f"backend {name!r} is unavailable: {reason}")
    return by_name[name]


__all__ = ["Backend", "BACKENDS", "backend_class", "OnnxRuntimeCPUBackend"]
