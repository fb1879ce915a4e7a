"""sdrt.engine — the lean runtime: numpy plus an inference backend, no torch, diffusers or transformers.

    pipe = sdrt.engine.load("bundle/")
    out = pipe("a photograph of an astronaut riding a horse", num_inference_steps=50, seed=0)
    out.images[0].save("astronaut.png")
"""
import importlib

from sdrt.engine.deepcache import DeepCache
from sdrt.engine.errors import (
    BackendUnavailableError,
    BundleError,
    GenerationCancelled,
    InvalidArgumentError,
    LoraError,
    NoRefitMapError,
    SdrtError,
    UnknownLoraKeysError,
    WeightsNotReplaceableError,
)
from sdrt.engine.version import SDRT_VERSION as __version__

# The pipeline's names are imported on first use: the pipeline needs pillow, tqdm and regex, which the modules a bare
# GPU machine validates (schedulers, guidance, the device loop: sdrt.benchmarks.gpu_validate --quick) do not.
_LAZY = {
    "load": "sdrt.engine.loading",
    "StableDiffusionPipeline": "sdrt.engine.pipeline",
    "PipelineOutput": "sdrt.engine.pipeline",
    "PromptOptions": "sdrt.engine.prompts",
    "GenerationRequest": "sdrt.engine.request",
    "RequestLimits": "sdrt.engine.request",
}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'sdrt.engine' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value

__all__ = [
    "load",
    "StableDiffusionPipeline",
    "PipelineOutput",
    "PromptOptions",
    "DeepCache",
    "GenerationRequest",
    "RequestLimits",
    "SdrtError",
    "InvalidArgumentError",
    "BundleError",
    "GenerationCancelled",
    "BackendUnavailableError",
    "LoraError",
    "UnknownLoraKeysError",
    "NoRefitMapError",
    "WeightsNotReplaceableError",
    "__version__",
]
