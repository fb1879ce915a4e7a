"""Run a micro-batch of compatible requests as one pipeline call: the function both servers (the local batcher and
the Ray Serve replica) share.

Each request's initial noise is drawn from its own seed exactly as a lone pipeline call draws it
(`pipe.draw_noise`), and the noise of the batch is their concatenation, so a request's images do not depend on
what it was batched with (on onnxruntime-cpu they are bit-identical: tests/test_serve.py).
"""
from __future__ import annotations

import dataclasses
import io
import logging
from collections.abc import Callable, Sequence
from typing import TypeVar

import numpy as np

from sdrt.engine import DeepCache, GenerationRequest, StableDiffusionPipeline
from sdrt.engine.errors import GenerationCancelled, InvalidArgumentError
from sdrt.engine.memory_return import return_freed_heap
from sdrt.engine.safety_checker import SafetyPolicy
from sdrt.serve.schemas import GenerationParams, ImageEncoding, ImageFormat

logger = logging.getLogger(__name__)

T = TypeVar("T")
A = TypeVar("A")
#: the pipeline's parameter names -> the API's, so an error names what the client sent
API_PARAMETER = {"height": "size", "width": "size", "num_images_per_prompt": "n", "latents": "size",
                 "deepcache": "deepcache_interval", "deepcache.cache_interval": "deepcache_interval"}


class GenerationFailedError(Exception):
    """The pipeline failed on a batch for a reason other than the request (HTTP 500); the traceback is logged once,
    where it happened."""


@dataclasses.dataclass(frozen=True)
class GeneratedImage:
    """One image of a request: its bytes in the request's encoding, or None when the safety checker (policy "block")
    withheld it."""

    encoded: bytes | None
    nsfw_content_detected: bool | None


@dataclasses.dataclass(frozen=True)
class BatchResult:
    """`images[i]`: the i-th request's n images. `timings`: the pipeline's per-stage seconds for the whole batch."""

    images: list[list[GeneratedImage]]
    timings: dict[str, float]


def compatible_batch(items: Sequence[T], params_of: Callable[[T], GenerationParams], max_images: int,
                     fits: Callable[[Sequence[GenerationParams]], bool] | None = None) -> list[T]:
    """The first item, and the later ones that may share its U-Net batch (same `batch_key`), in order, within
    `max_images` images and, given `fits` (whether a batch of these requests fits the memory budget), within the
    budget. The first always runs, even alone over either bound."""
    head = params_of(items[0])
    batch, chosen, images = [items[0]], [head], head.n
    for item in items[1:]:
        params = params_of(item)
        if params.batch_key == head.batch_key and images + params.n <= max_images and (fits is None or fits([*chosen, params])):
            batch.append(item)
            chosen.append(params)
            images += params.n
    return batch


def answers_for(items: Sequence[T], run: Callable[[Sequence[T]], Sequence[A]]) -> list[A | Exception]:
    """`run(items)`'s answers, one per item, or the exception each item ends with. When the pipeline refuses the
    batch (InvalidArgumentError: a size or step count it cannot take), each item runs again alone, so a bad request
    fails alone instead of failing its batch partners; any other exception is logged and every item's answer is a
    GenerationFailedError."""
    try:
        return list(run(items))
    except InvalidArgumentError as exc:
        if len(items) == 1:
            return [exc]
        logger.info("a batch of %d was refused (%s); running its requests one by one", len(items), exc)
        return [answer for item in items for answer in answers_for([item], run)]
    except GenerationCancelled as exc:
        return [exc] * len(items)
    except Exception as exc:  # noqa: BLE001 - every waiting client gets the failure; the server lives on
        logger.exception("a batch of %d requests failed", len(items))
        failure = GenerationFailedError(f"{type(exc).__name__}: {exc}")
        failure.__cause__ = exc
        return [failure] * len(items)


def generate_batch(
    pipe: StableDiffusionPipeline, requests: Sequence[GenerationParams], should_stop: Callable[[], str | None] = lambda: None
) -> BatchResult:
    """Generate every request's images in one pipeline call. All requests must share one `batch_key`.

    `should_stop()` is asked after each denoising step (once per step); a reason (not None) stops the batch there by raising
    GenerationCancelled with it. InvalidArgumentError from the pipeline is raised with the API's parameter name.
    However it ends, the heap the batch freed goes back to the system (glibc keeps it otherwise: see docs/serving.md,
    "Memory", for the figure), so the process's resting RSS stays what the memory budget counted on.
    """
    try:
        return _generate(pipe, requests, should_stop)
    finally:
        return_freed_heap()


def _generate(pipe: StableDiffusionPipeline, requests: Sequence[GenerationParams], should_stop: Callable[[], str | None]) -> BatchResult:
    first = requests[0]
    if any(r.batch_key != first.batch_key for r in requests):
        raise ValueError("generate_batch: requests of one batch must share their batch_key")
    if len(requests) > 1 and pipe.sampler(first.scheduler).needs_noise:
        # A stochastic sampler draws its step noise from the call's seed: each request runs alone to keep its own.
        results = [_generate(pipe, [request], should_stop) for request in requests]
        timings = {stage: sum(r.timings.get(stage, 0.0) for r in results) for stage in results[0].timings}
        return BatchResult([images for result in results for images in result.images], timings)
    prompts = [r.prompt for r in requests for _ in range(r.n)]
    # "" is what a missing negative prompt means (diffusers' unconditional input), so requests with and without one mix.
    negatives = [r.negative_prompt or "" for r in requests for _ in range(r.n)]
    # A lone request is exactly the pipeline call its seed makes; a batch's noise is its requests' noise, concatenated.
    noise = (dict(seed=first.seed) if len(requests) == 1 else
             dict(latents=np.concatenate([pipe.draw_noise(r.seed, r.n, r.height, r.width) for r in requests])))  # (sum n, C, h, w)

    def on_step_end(_pipe, _step_index: int, _timestep: float, tensors: dict) -> dict:
        reason = should_stop()
        if reason is not None:
            raise GenerationCancelled(reason)
        return tensors

    try:
        request = GenerationRequest.create(
            pipe.limits,
            prompts,
            negative_prompt=negatives,
            num_inference_steps=first.num_inference_steps,
            guidance_scale=first.guidance_scale,
            height=first.height,
            width=first.width,
            **noise,
            output_type="pil",
            scheduler=first.scheduler,
            decoder=first.decoder,
            deepcache=_deepcache(pipe, first.deepcache_interval),
        )
    except InvalidArgumentError as exc:
        parameter = API_PARAMETER.get(exc.parameter, exc.parameter)
        raise InvalidArgumentError(parameter, str(exc)) from exc
    out = pipe.generate(request, on_step_end)
    flags = out.nsfw_content_detected or [None] * len(out.images)
    withhold = pipe.safety_policy is SafetyPolicy.BLOCK
    per_request, start = [], 0
    for r in requests:
        per_request.append([GeneratedImage(None if (nsfw and withhold) else _encode(image, r.encoding), nsfw)
                            for image, nsfw in zip(out.images[start:start + r.n], flags[start:start + r.n])])
        start += r.n
    return BatchResult(per_request, dict(out.timings))


def _deepcache(pipe: StableDiffusionPipeline, interval: int | None) -> DeepCache | None:
    """DeepCache every `interval` calls at the branch the bundle was exported for (None: off); a bundle without its
    passes is refused by the request's validation."""
    if interval is None:
        return None
    exported = pipe.manifest.deepcache
    return DeepCache(cache_interval=interval, cache_branch=exported.branch if exported is not None else 0)


def warm_up(pipe: StableDiffusionPipeline) -> None:
    """One 1-step image at the model's default size, guided, so every model is loaded (and compiled) before the
    server says it is ready."""
    size = pipe.manifest.model.default_image_size
    generate_batch(pipe, [GenerationParams("warm-up", None, 1, size, size, 1, 7.5, 0, None)])


def _encode(image, encoding: ImageEncoding) -> bytes:
    buffer = io.BytesIO()
    if encoding.format is ImageFormat.PNG:
        image.save(buffer, format="PNG")
    else:
        image.save(buffer, format=encoding.format.value.upper(), quality=encoding.quality)
    return buffer.getvalue()
