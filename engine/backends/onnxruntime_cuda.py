"""onnxruntime-gpu's CUDA execution provider, with I/O binding: outputs are allocated on the device by onnxruntime
and copied back once, after the run. Needs onnxruntime-gpu installed in place of onnxruntime.

"cuda" runs the bundle's fp32 models with TF32 off (exact mode); "cuda-fp16" runs the fp16 variants
`sdrt export --fp16-onnx` adds (text encoder and U-Net by default), and the fp32 models of the other components.
"""
from __future__ import annotations

import shlex
from collections.abc import Mapping
from pathlib import Path
from typing import ClassVar

import numpy as np
import onnxruntime as ort

from sdrt.engine.backends.base import Backend, ComponentFile
from sdrt.engine.cuda_device import cuda_device_unavailable_reason
from sdrt.engine.errors import BackendUnavailableError
from sdrt.engine.specs import Component

CUDA_PROVIDER = "CUDAExecutionProvider"


class OnnxRuntimeCUDABackend(Backend):
    name = "cuda"
    exact = True
    batched_decode = True
    #: TF32 off: matmuls and convolutions in full fp32, so that this backend holds exact mode's parity tolerance
    provider_options: ClassVar[Mapping[str, str]] = {"device_id": "0", "use_tf32": "0"}

    @classmethod
    def unavailable_reason(cls) -> str | None:
        reason = cuda_device_unavailable_reason()
        if reason is None and CUDA_PROVIDER not in ort.get_available_providers():
            return "onnxruntime has no CUDA execution provider (pip install onnxruntime-gpu in place of onnxruntime)"
        return reason

    def _model_path(self, component: Component) -> Path:
        """The ONNX file this backend runs for `component`."""
        return self.components[component].path

    def _load(self, component: Component) -> ort.InferenceSession:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3  # ORT's optimiser warnings say nothing actionable to our users
        session = ort.InferenceSession(
            str(self._model_path(component)), sess_options=options, providers=[(CUDA_PROVIDER, dict(self.provider_options))]
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


class OnnxRuntimeCUDAFP16Backend(OnnxRuntimeCUDABackend):
    """Close to fp32, not equal: the GPU validation report (`sdrt doctor --gpu`) gives its PSNR against fp32."""

    name = "cuda-fp16"
    exact = False
    #: TF32 on for the components left in fp32 (the VAE): this is the fast mode, not the exact one
    provider_options = {"device_id": "0", "use_tf32": "1"}

    @classmethod
    def bundle_unavailable_reason(cls, bundle_dir: Path, components: Mapping[Component, ComponentFile]) -> str | None:
        if any(source.fp16_path is not None for source in components.values()):
            return None
        command = shlex.join(["sdrt", "export", "CHECKPOINT", str(bundle_dir), "--force", "--fp16-onnx"])
        return f"the bundle has no fp16 ONNX variants: re-export it with `{command}`"

    def _model_path(self, component: Component) -> Path:
        source = self.components[component]
        return source.fp16_path or source.path
