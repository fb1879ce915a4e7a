"""The server's Prometheus metrics, on a registry of its own (one per app, so several apps can live in one process)."""
from __future__ import annotations

import enum

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

#: pipeline stages timed per batch (the pipeline's own `timings` keys)
STAGES = ("tokenize", "text_encode", "unet", "guidance_and_scheduler", "denoise", "decode", "safety_check")
_SECONDS_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120, 300)


class Rejection(str, enum.Enum):
    """Why a request got no images (the `reason` label of sdrt_requests_rejected_total)."""

    QUEUE_FULL = "queue_full"  # 429
    DEADLINE = "deadline"  # 504
    DISCONNECTED = "disconnected"  # the client left; nobody reads the answer
    INVALID = "invalid"  # 400 / 413 (body) / 422
    TOO_LARGE = "too_large"  # 413: the request's estimated memory is over the budget even alone
    UNAUTHORIZED = "unauthorized"  # 401
    NOT_READY = "not_ready"  # 503: loading, or draining for shutdown
    FAILED = "failed"  # 500


class ServeMetrics:
    """Queue depth, per-stage and end-to-end latency histograms, batch sizes, images generated and blocked,
    rejections by reason, the memory budget and the admitted work's estimate."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.queue_depth = Gauge("sdrt_queue_depth", "Requests waiting for a batch", registry=r)
        self.in_flight = Gauge("sdrt_requests_in_flight", "Requests being generated now", registry=r)
        self.request_seconds = Histogram("sdrt_request_seconds", "End-to-end latency of successful generation requests",
                                         buckets=_SECONDS_BUCKETS, registry=r)
        self.queue_seconds = Histogram("sdrt_queue_wait_seconds", "Time from arrival to the start of its batch",
                                       buckets=_SECONDS_BUCKETS, registry=r)
        self.stage_seconds = Histogram("sdrt_stage_seconds", "Seconds per pipeline stage, per batch", ["stage"],
                                       buckets=_SECONDS_BUCKETS, registry=r)
        self.batch_images = Histogram("sdrt_batch_images", "Images per U-Net batch", buckets=(1, 2, 4, 8, 16, 32, 64), registry=r)
        self.denoising_steps = Counter("sdrt_denoising_steps", "Denoising steps run (one U-Net batch call each)", registry=r)
        self.images_generated = Counter("sdrt_images_generated", "Images generated", registry=r)
        self.images_blocked = Counter("sdrt_images_blocked", "Images withheld by the safety checker", registry=r)
        self.memory_budget = Gauge("sdrt_memory_budget_bytes", "What the process may grow to (--memory-budget)", registry=r)
        self.memory_admitted = Gauge("sdrt_memory_admitted_bytes", "Estimated peak RSS of the admitted work: the resting RSS "
                                     "(measured after the last batch) plus the running batch's working memory", registry=r)
        self.rejections = Counter("sdrt_requests_rejected", "Requests answered without images, by reason", ["reason"], registry=r)
        for reason in Rejection:  # every series present from the start, so a dashboard sees zeros, not gaps
            self.rejections.labels(reason.value)

    def reject(self, reason: Rejection) -> None:
        self.rejections.labels(reason.value).inc()

    def record_batch(self, images: int, blocked: int, timings: dict[str, float]) -> None:
        """One finished batch: its images, those the checker withheld, its stage timings."""
        self.batch_images.observe(images)
        self.images_generated.inc(images)
        self.images_blocked.inc(blocked)
        for stage in STAGES:
            if stage in timings:
                self.stage_seconds.labels(stage).observe(timings[stage])

    def exposition(self) -> tuple[bytes, str]:
        """The text format's body and content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
