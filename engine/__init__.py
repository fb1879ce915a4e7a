"""sdrt.engine — the lean runtime: numpy plus an inference backend, no torch, diffusers or transformers.

    pipe = sdrt.engine.load("bundle/")
    out = pipe("a photograph of an astronaut riding a horse", num_inference_steps=50, seed=0)
    out.images[0].save("astronaut.png")
"""
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
from sdrt.engine.loading import load
from sdrt.engine.pipeline import PipelineOutput, StableDiffusionPipeline
from sdrt.engine.prompts import PromptOptions
from sdrt.engine.request import GenerationRequest, RequestLimits
from sdrt.engine.version import SDRT_VERSION as __version__

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
