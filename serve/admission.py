"""Admission by memory: the server's budget (`sdrt serve --memory-budget`) against the memory model's estimate of each
batch (sdrt.engine.memory_estimate).

The process may grow to the budget: its resting RSS (measured after warm-up, and again after every batch, once the
batch's memory went back) plus the running batch's working memory. One batch runs at a time, so a request whose
estimate fits alone on an idle server always runs in time; one that does not is refused before it queues (HTTP 413),
naming the budget and what would fit. A batch grows by compatible requests only while the grown batch fits.
"""
from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence

from sdrt.engine.host_memory import format_bytes, process_rss_bytes
from sdrt.engine.memory_estimate import MemoryModel
from sdrt.engine.guidance_batch import is_guided
from sdrt.serve.metrics import ServeMetrics
from sdrt.serve.schemas import GenerationParams

logger = logging.getLogger(__name__)

#: sizes suggested in a refusal are multiples of this many latent pixels (64 px for SD's VAE)
SUGGESTED_SIZE_LATENT_STEP = 8


class RequestTooLargeError(Exception):
    """The request's estimated memory is over the server's budget even alone (HTTP 413); `parameter` is the one to
    lower ("n" when fewer images of this size fit, else "size")."""

    def __init__(self, message: str, parameter: str) -> None:
        super().__init__(message)
        self.parameter = parameter


class MemoryAdmission:
    """What the server may admit: `budget_bytes` against `model`'s estimates, from the measured resting RSS.
    `check` from any thread; `fits` and `running` from the batcher's worker."""

    def __init__(self, model: MemoryModel, budget_bytes: int, max_image_size: int, metrics: ServeMetrics) -> None:
        self.model, self.budget_bytes, self.max_image_size = model, budget_bytes, max_image_size
        self._metrics = metrics
        metrics.memory_budget.set(budget_bytes)
        metrics.memory_admitted.set(model.resident_bytes)

    def peak_bytes(self, requests: Sequence[GenerationParams]) -> int:
        """The process's estimated peak RSS while it runs `requests` as one batch (they share a `batch_key`)."""
        first = requests[0]
        return self.model.peak_bytes(first.height, first.width, sum(r.n for r in requests), is_guided(first.guidance_scale))

    def fits(self, requests: Sequence[GenerationParams]) -> bool:
        return self.peak_bytes(requests) <= self.budget_bytes

    def check(self, params: GenerationParams) -> None:
        """Raise RequestTooLargeError unless `params` fits the budget alone."""
        needed = self.peak_bytes([params])
        if needed <= self.budget_bytes:
            return
        guided = is_guided(params.guidance_scale)
        fewer = self.model.most_images(params.height, params.width, guided, self.budget_bytes, params.n - 1)
        step = SUGGESTED_SIZE_LATENT_STEP * self.model.architecture.vae_scale_factor
        side = self.model.largest_square(params.n, guided, self.budget_bytes, step, self.max_image_size)
        options = ([f"at most n={fewer} at this size"] if fewer else []) + ([f"{side}x{side} with n={params.n}"] if side else [])
        if not options and params.n > 1 and (single := self.model.largest_square(1, guided, self.budget_bytes, step, self.max_image_size)):
            options = [f"{single}x{single} with n=1"]
        raise RequestTooLargeError(
            f"size {params.width}x{params.height} with n={params.n} needs about {format_bytes(needed)}, over this server's "
            f"memory budget of {format_bytes(self.budget_bytes)} (--memory-budget); "
            + (f"what fits: {', or '.join(options)}" if options else "no request fits in what the loaded model leaves of it"),
            "n" if fewer else "size",
        )

    @contextlib.contextmanager
    def running(self, requests: Sequence[GenerationParams]) -> Iterator[None]:
        """While `requests` run as a batch, count its estimate as admitted; afterwards measure the resting RSS again
        (the batch has handed its memory back), as OpenVINO's compiled models for new shapes move it."""
        self._metrics.memory_admitted.set(self.peak_bytes(requests))
        try:
            yield
        finally:
            resting = process_rss_bytes()
            if resting is not None:
                self.model = self.model.with_resident(resting)
            self._metrics.memory_admitted.set(self.model.resident_bytes)
