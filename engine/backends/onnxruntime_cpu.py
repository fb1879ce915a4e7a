"""onnxruntime on the CPU: the default backend, present wherever sdrt is installed."""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnxruntime as ort

from sdrt.engine.backends.base import Backend
from sdrt.engine.specs import Component


class OnnxRuntimeCPUBackend(Backend):
    name = "onnxruntime-cpu"
    exact = True

    @classmethod
    def unavailable_reason(cls) -> str | None:
        return None if "CPUExecutionProvider" in ort.get_available_providers() else "onnxruntime has no CPU execution provider"

    def _load(self, component: Component) -> ort.InferenceSession:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3  # ORT's optimiser warnings say nothing actionable to our users
        return ort.InferenceSession(str(self.components[component].path), sess_options=options, providers=["CPUExecutionProvider"])

    def _infer(self, model: ort.InferenceSession, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        return model.run(None, dict(feeds))
