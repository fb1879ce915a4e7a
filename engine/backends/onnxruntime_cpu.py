"""onnxruntime on the CPU: the default backend, present wherever sdrt is installed.

Every session allocates its working memory from one arena shared by the process (onnxruntime's environment
allocator), grown by exactly what is asked, not in powers of two. The U-Net, run once per denoising step, keeps its
buffers in the arena from step to step; every other component's run shrinks the arena when it ends, handing its unused
memory back to the system, so what the U-Net held goes back after the request's decode, and what a cancelled request
left goes back at the next request's text encoding, before its U-Net runs. With an arena per session, onnxruntime's
default, each session kept its largest run's buffers for good; the shared arena holds a fraction of that at rest
and at a request's peak, in the same time. Without any arena memory went back after every run, but the U-Net's
buffers were faulted in again at every step (measurements: docs/design-notes.md).
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnxruntime as ort

from sdrt.engine.backends.base import Backend, ComponentFile, MemoryPolicy, MemoryProfile
from sdrt.engine.specs import UNET_PASSES, Component

#: the components run many times per request, whose buffers stay in the arena between their runs
_REPEATED = frozenset(UNET_PASSES)
_ARENA_EXTEND_SAME_AS_REQUESTED = 1  # onnxruntime's ArenaExtendStrategy::kSameAsRequested


@functools.cache
def _shared_arena() -> None:
    """Register the process's shared CPU arena with onnxruntime's environment, once (a second registration fails)."""
    memory = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
    ort.create_and_register_allocator(memory, ort.OrtArenaCfg(0, _ARENA_EXTEND_SAME_AS_REQUESTED, -1, -1))


@functools.cache
def _shrinking_run() -> ort.RunOptions:
    """Run options that hand the arena's unused memory back to the system when the run ends."""
    options = ort.RunOptions()
    options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
    return options


class OnnxRuntimeCPUBackend(Backend):
    name = "onnxruntime-cpu"
    exact = True
    # Fitted on the test bundles (tiny, tiny-alt, demo, and a 0.5 GB SD 1.x-shaped one) at 128² to 512², rounded up
    # (benchmarks/memory_estimate.py; the fit: docs/design-notes.md). Self-attention's scores
    # are held once and a fifth (the Softmax's output replaces its input; its buffers besides).
    memory_profile = MemoryProfile(weights_per_file_byte=1.05, runtime_bytes=32 << 20, attention_scores=1.22,
                                   unet_feature_maps=100, decoder_feature_maps=5.5, decoder_pixel_values=64,
                                   request_bytes=8 << 20)

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

    def _load(self, component: Component) -> _Session:
        _shared_arena()
        options = ort.SessionOptions()
        options.add_session_config_entry("session.use_env_allocators", "1")
        # A memory pattern allocates each run's buffers as one block, planned after the first run of a shape: the
        # second U-Net step then found the first's freed buffers too small and grew the arena by the whole block
        # (a far higher peak, at the same speed)
        options.enable_mem_pattern = False
        overrides = self._weights.get(component, {})
        # ORT_ENABLE_ALL's NCHWc layout transformer reorders Conv weights from the file, ignoring initializers
        # overridden with add_initializer (onnxruntime 1.32): a session with overrides stops one level below it
        options.graph_optimization_level = (
            ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED if overrides else ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        )
        options.log_severity_level = 3  # ORT's optimiser warnings say nothing actionable to our users
        for name, value in overrides.items():
            options.add_initializer(name, value)  # the other initializers come from the file
        session = ort.InferenceSession(str(self.components[component].path), sess_options=options, providers=["CPUExecutionProvider"])
        return _Session(session, None if component in _REPEATED else _shrinking_run())

    def set_weights(self, component: Component, weights: Mapping[str, np.ndarray]) -> None:
        # onnxruntime cannot change a session's weights: the session is re-created, with these overriding the file's
        with self._lock:
            self._loaded.pop(component, None)
            self._weights[component] = {
                name: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array, dtype=np.float32)) for name, array in weights.items()
            }

    def _infer(self, model: _Session, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        return model.session.run(None, dict(feeds), model.run_options)


@dataclasses.dataclass(frozen=True)
class _Session:
    """A component's session and the options its runs take (None: the defaults, keeping the arena's memory)."""

    session: ort.InferenceSession
    run_options: ort.RunOptions | None
