"""onnxruntime on the CPU: the default backend, present wherever sdrt is installed."""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnxruntime as ort

from sdrt.engine.backends.base import Backend, ComponentFile, MemoryPolicy
from sdrt.engine.specs import Component


class OnnxRuntimeCPUBackend(Backend):
    name = "onnxruntime-cpu"
    exact = True

    def __init__(
        self, bundle_dir: Path, components: Mapping[Component, ComponentFile], memory: MemoryPolicy = MemoryPolicy.KEEP_LOADED
    ) -> None:
        super().__init__(bundle_dir, components, memory)
        # initializer values replacing the file's (LoRA); each OrtValue keeps its array alive, as the sessions
        # created with it need for their lifetime
        self._weights: dict[Component, dict[str, ort.OrtValue]] = {}

    @classmethod
    def unavailable_reason(cls) -> str | None:
        return None if "CPUExecutionProvider" in ort.get_available_providers() else "onnxruntime has no CPU execution provider"

    def _load(self, component: Component) -> ort.InferenceSession:
        options = ort.SessionOptions()
        overrides = self._weights.get(component, {})
        # ORT_ENABLE_ALL's NCHWc layout transformer reorders Conv weights from the file, ignoring initializers
        # overridden with add_initializer (onnxruntime 1.32): a session with overrides stops one level below it
        options.graph_optimization_level = (
            ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED if overrides else ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        )
        options.log_severity_level = 3  # ORT's optimiser warnings say nothing actionable to our users
        for name, value in overrides.items():
            options.add_initializer(name, value)  # the other initializers come from the file
        return ort.InferenceSession(str(self.components[component].path), sess_options=options, providers=["CPUExecutionProvider"])

    def set_weights(self, component: Component, weights: Mapping[str, np.ndarray]) -> None:
        # onnxruntime cannot change a session's weights: the session is re-created, with these overriding the file's
        with self._lock:
            self._loaded.pop(component, None)
            self._weights[component] = {
                name: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array, dtype=np.float32)) for name, array in weights.items()
            }

    def _infer(self, model: ort.InferenceSession, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        return model.run(None, dict(feeds))
