"""A bounded cache that creates values on first use and releases the least recently used one to make room: the
TensorRT runner keeps each input shape's device buffers and CUDA graph in one, so a process that serves many sizes
holds a few of them, not one per size it ever saw."""
from __future__ import annotations

import collections
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class LRUCache(Generic[K, V]):
    """At most `capacity` values; `create(key)` makes a missing one, `release(value)` frees an evicted one (before
    the new one is created, so that it can reuse the memory)."""

    def __init__(self, capacity: int, create: Callable[[K], V], release: Callable[[V], None]) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, got {capacity}")
        self.capacity = capacity
        self._create = create
        self._release = release
        self._values: collections.OrderedDict[K, V] = collections.OrderedDict()

    def get(self, key: K) -> V:
        if key in self._values:
            self._values.move_to_end(key)
            return self._values[key]
        if len(self._values) >= self.capacity:
            _, oldest = self._values.popitem(last=False)
            self._release(oldest)
        value = self._create(key)
        self._values[key] = value
        return value

    def clear(self) -> None:
        """Release every value."""
        while self._values:
            _, value = self._values.popitem(last=False)
            self._release(value)

    def keys(self) -> list[K]:
        """The cached keys, least recently used first."""
        return list(self._values)
