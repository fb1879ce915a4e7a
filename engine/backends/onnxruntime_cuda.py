"""onnxruntime-gpu's CUDA execution provider, with I/O binding: outputs are allocated on the device by onnxruntime
and copied back once, after the run. Needs onnxruntime-gpu installed in place of onnxruntime."""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnxruntime as ort

from sdrt.engine.backends.base import Backend
from sdrt.engine.cuda_device import cuda_device_unavailable_reason
from sdrt.engine.errors import BackendUnavailableError
from sdrt.engine.specs import Component

CUDA_PROVIDER = "CUDAExecutionProvider"
#: TF32 off: matmuls and convolutions in full fp32, so that this backend holds exact mode's parity tolerance
PROVIDER_OPTIONS = {"device_id": "0", "use_tf32": "0"}


class OnnxRuntimeCUDABackend(Backend):
    name = "cuda"
    exact = True

    @classmethod
    def unavailable_reason(cls) -> str | None:
        reason = cuda_device_unavailable_reason()
        if reason is None and CUDA_PROVIDER not in ort.get_available_providers():
            return "onnxruntime has no CUDA execution provider (pip install onnxruntime-gpu in place of onnxruntime)"
        return reason

    def _load(self, component: Component) -> ort.InferenceSession:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3  # ORT's optimiser warnings say nothing actionable to our users
        session = ort.InferenceSession(
            str(self.components[component].path), sess_options=options, providers=[(CUDA_PROVIDER, PROVIDER_OPTIONS)]
        )
        # Without the CUDA or cuDNN libraries onnxruntime quietly runs on the CPU instead.
        if CUDA_PROVIDER not in session.get_providers():
            raise BackendUnavailableError(
                f"onnxruntime could not start its CUDA execution provider for {component.value}: are the CUDA 12 and cuDNN 9 libraries installed?"
            )
        return session

    def _infer(self, model: ort.InferenceSession, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        binding = model.io_binding()
        for name, array in feeds.items():
            binding.bind_cpu_input(name, np.ascontiguousarray(array))
        for output in model.get_outputs():
            binding.bind_output(output.name, "cuda")
        model.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()
