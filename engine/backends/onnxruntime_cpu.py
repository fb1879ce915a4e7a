"""onnxruntime on the CPU: the default backend, present wherever sdrt is installed."""
from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnxruntime as ort

from sdrt.engine.backends.base import Backend
from sdrt.engine.specs import Component

logger = logging.getLogger(__name__)


class OnnxRuntimeCPUBackend(Backend):
    name = "onnxruntime-cpu"
    exact = True

    @classmethod
    def unavailable_reason(cls) -> str | None:
        return None if "CPUExecutionProvider" in ort.get_available_providers() else "onnxruntime has no CPU execution provider"

    def __init__(self, bundle_dir: Path, component_files: Mapping[Component, str]) -> None:
        self._paths = {component: Path(bundle_dir) / file for component, file in component_files.items()}
        self._sessions: dict[Component, ort.InferenceSession] = {}
        self._lock = threading.Lock()

    def _session(self, component: Component) -> ort.InferenceSession:
        with self._lock:
            if component not in self._sessions:
                options = ort.SessionOptions()
                options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
                options.log_severity_level = 3  # ORT's optimiser warnings say nothing actionable to our users
                logger.debug("creating onnxruntime session for %s", component.value)
                self._sessions[component] = ort.InferenceSession(
                    str(self._paths[component]), sess_options=options, providers=["CPUExecutionProvider"]
                )
            return self._sessions[component]

    def run(self, component: Component, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        return self._session(component).run(None, dict(feeds))
