"""The array module an array belongs to: numpy for host arrays, CuPy for NVIDIA device arrays.

Guidance (sdrt.engine.guidance_batch) and every scheduler's update are written once against the namespace of their
inputs, so the code the CPU parity tests cover is the code a device loop runs on CuPy arrays. Scalars (alpha-bars,
sigmas, coefficients) stay numpy float32 host values: CuPy takes them as kernel arguments. CuPy is imported only
when asked for, or found already imported because a CuPy array was passed.
"""
from __future__ import annotations

import sys
from types import ModuleType
from typing import Any

import numpy as np

from sdrt.engine.errors import BackendUnavailableError

CUPY_HINT = "pip install cupy-cuda12x"


def namespace_of(*arrays: Any) -> ModuleType:
    """The namespace of `arrays`: numpy for numpy arrays and Python or numpy scalars, `cupy` for CuPy arrays, and
    for any other array type its Array API `__array_namespace__()`. Raise TypeError if they mix namespaces."""
    found: ModuleType | None = None
    for array in arrays:
        namespace = _namespace(array)
        if namespace is None:
            continue
        if found is not None and namespace is not found:
            raise TypeError(f"arrays from different namespaces: {found.__name__} and {namespace.__name__}")
        found = namespace
    return np if found is None else found


def _namespace(array: Any) -> ModuleType | None:
    """`array`'s namespace, or None for a host value (numpy array or scalar, Python number, None)."""
    if array is None or isinstance(array, (np.ndarray, np.generic, int, float, bool)):
        return None
    if type(array).__module__.split(".")[0] == "cupy":
        return sys.modules["cupy"]  # imported already: a cupy array exists
    namespace = getattr(array, "__array_namespace__", None)
    if namespace is None:
        raise TypeError(f"{type(array).__name__} is not an array of a known namespace")
    return namespace()


def cupy_namespace() -> ModuleType:
    """The cupy module; raise BackendUnavailableError naming the package if it is not installed."""
    try:
        import cupy
    except ImportError:
        raise BackendUnavailableError(f"CuPy is not installed ({CUPY_HINT})") from None
    return cupy


def is_host_array(array: Any) -> bool:
    """Whether `array` lives in host memory (a numpy array)."""
    return isinstance(array, np.ndarray)
