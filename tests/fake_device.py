"""A stand-in for a device array library (CuPy) on the CPU, for the device loop's and the schedulers' tests.

`FakeDevice.namespace` is an array namespace whose arrays (`FakeDeviceArray`) wrap numpy arrays but refuse numpy:
`np.asarray(a)`, `np.sqrt(a)`, `np.concatenate([a])` raise `HiddenNumpyCall`, so code that slips a numpy call onto
a device array fails here as it would on CuPy. The namespace records which of its functions were called.

`FakeDevice.capture(work)` models CUDA graph capture: every operation `work` enqueues is recorded with the arrays it
reads and writes, and `FakeGraph.launch()` replays those operations into the same arrays with the same constants,
as a replayed CUDA graph writes to the addresses and uses the kernel arguments of its capture.
"""
from __future__ import annotations

import contextlib
import operator
from collections.abc import Callable
from typing import Any

import numpy as np


class HiddenNumpyCall(TypeError):
    """numpy was handed a device array."""


class FakeDeviceArray:
    __array_ufunc__ = None  # numpy operators defer to ours; numpy ufuncs on us raise TypeError

    def __init__(self, data: np.ndarray, device: FakeDevice) -> None:
        self.data = data
        self.device = device

    def __array_namespace__(self, api_version: str | None = None) -> FakeNamespace:
        return self.device.namespace

    def __array__(self, *args: Any, **kwargs: Any) -> np.ndarray:
        raise HiddenNumpyCall("numpy was handed a device array (a hidden np. call in device code)")

    def __array_function__(self, func, types, args, kwargs):
        raise HiddenNumpyCall(f"np.{func.__name__} was called on a device array")

    shape = property(lambda self: self.data.shape)
    dtype = property(lambda self: self.data.dtype)
    ndim = property(lambda self: self.data.ndim)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, key: Any) -> FakeDeviceArray:
        return FakeDeviceArray(self.data[key], self.device)  # a view, like CuPy's basic indexing

    def __setitem__(self, key: Any, value: Any) -> None:
        if isinstance(value, np.ndarray):  # CuPy wants host data moved explicitly (xp.asarray), not by assignment
            raise HiddenNumpyCall("a host array assigned into a device array")
        self.device.run_into(self, key, lambda v: v, value)

    def astype(self, dtype: Any, copy: bool = True) -> FakeDeviceArray:
        if not copy and self.dtype == dtype:
            return self
        return self.device.run(lambda a: a.astype(dtype), self)

    def mean(self, axis: Any = None) -> FakeDeviceArray:
        return self.device.run(lambda a: a.mean(axis=axis, dtype=a.dtype), self)

    def copy(self) -> FakeDeviceArray:
        return self.device.run(np.copy, self)

    def get(self) -> np.ndarray:
        """The device->host copy (CuPy's `.get()`)."""
        return self.data.copy()


def _binary(op: Callable[[Any, Any], Any], reflected: bool = False):
    def method(self: FakeDeviceArray, other: Any) -> Any:
        if not isinstance(other, (FakeDeviceArray, int, float, np.generic)):
            return NotImplemented
        return self.device.run(op, other, self) if reflected else self.device.run(op, self, other)
    return method


for _name, _op in {"add": operator.add, "sub": operator.sub, "mul": operator.mul, "truediv": operator.truediv, "pow": operator.pow}.items():
    setattr(FakeDeviceArray, f"__{_name}__", _binary(_op))
    setattr(FakeDeviceArray, f"__r{_name}__", _binary(_op, reflected=True))
FakeDeviceArray.__neg__ = lambda self: self.device.run(operator.neg, self)


class FakeNamespace:
    """The functions of the array API the engine's device code calls, over FakeDeviceArray; `used` counts them."""

    float32 = np.float32

    def __init__(self, device: FakeDevice) -> None:
        self.device = device
        self.used: dict[str, int] = {}
        self.__name__ = "fake_device"

    def _use(self, name: str) -> None:
        self.used[name] = self.used.get(name, 0) + 1

    def asarray(self, value: Any, dtype: Any = None) -> FakeDeviceArray:
        self._use("asarray")
        if isinstance(value, FakeDeviceArray):
            return value if dtype is None or value.dtype == dtype else value.astype(dtype)
        return FakeDeviceArray(np.array(value, dtype=dtype), self.device)  # a host->device copy

    def empty(self, shape: Any, dtype: Any = np.float32) -> FakeDeviceArray:
        self._use("empty")
        return FakeDeviceArray(np.full(shape, np.nan, dtype), self.device)  # NaN: reading it unwritten shows

    def concatenate(self, arrays: list[FakeDeviceArray], axis: int = 0) -> FakeDeviceArray:
        self._use("concatenate")
        return self.device.run(lambda *a: np.concatenate(a, axis=axis), *arrays)

    def clip(self, array: FakeDeviceArray, low: Any, high: Any) -> FakeDeviceArray:
        self._use("clip")
        return self.device.run(np.clip, array, low, high)

    def sqrt(self, array: FakeDeviceArray) -> FakeDeviceArray:
        self._use("sqrt")
        return self.device.run(np.sqrt, array)

    def sin(self, array: FakeDeviceArray) -> FakeDeviceArray:
        self._use("sin")
        return self.device.run(np.sin, array)

    def exp(self, array: FakeDeviceArray) -> FakeDeviceArray:
        self._use("exp")
        return self.device.run(np.exp, array)


class FakeGraph:
    def __init__(self, nodes: list[Callable[[], None]]) -> None:
        self.nodes = nodes
        self.launches = 0
        self.released = False

    def launch(self) -> None:
        assert not self.released, "launched a released graph"
        self.launches += 1
        for node in self.nodes:
            node()

    def release(self) -> None:
        self.released = True


class FakePool:
    def __init__(self) -> None:
        self.released = False

    def scope(self):
        assert not self.released, "allocated from a released pool"
        return contextlib.nullcontext()

    def release(self) -> None:
        self.released = True


class FakeDevice:
    """Runs operations eagerly, and records them while a capture is open (sdrt.engine.device_loop.Device)."""

    def __init__(self) -> None:
        self.namespace = FakeNamespace(self)
        self._tape: list[Callable[[], None]] | None = None
        self.captures = 0
        self.host_reads = 0
        self.pools: list[FakePool] = []

    def stream_scope(self):
        return contextlib.nullcontext()

    def new_pool(self) -> FakePool:
        self.pools.append(FakePool())
        return self.pools[-1]

    def to_host(self, array: FakeDeviceArray) -> np.ndarray:
        assert self._tape is None, "a host read inside a capture"
        self.host_reads += 1
        return array.get()

    @staticmethod
    def _values(args: tuple[Any, ...]) -> list[Any]:
        return [a.data if isinstance(a, FakeDeviceArray) else a for a in args]

    def run(self, function: Callable[..., np.ndarray], *args: Any) -> FakeDeviceArray:
        out = FakeDeviceArray(np.asarray(function(*self._values(args))), self)
        if self._tape is not None:
            self._tape.append(lambda: np.copyto(out.data, function(*self._values(args))))
        return out

    def run_into(self, target: FakeDeviceArray, key: Any, function: Callable[..., np.ndarray], *args: Any) -> None:
        """`target[key] = function(*args)`, in place."""
        def node() -> None:
            target.data[key] = function(*self._values(args))
        node()
        if self._tape is not None:
            self._tape.append(node)

    def capture(self, work: Callable[[], None]) -> FakeGraph:
        if self._tape is not None:
            raise RuntimeError("nested capture")
        self._tape = []
        try:
            work()
            return FakeGraph(self._tape)
        finally:
            self._tape = None
            self.captures += 1
