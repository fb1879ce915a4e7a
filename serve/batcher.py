"""A bounded request queue and the one worker thread that runs it as micro-batches on the process's pipeline.

The oldest waiting request decides the next batch: every waiting request with its `batch_key` (same size, steps,
scheduler, guidance) joins it, in arrival order, up to `max_batch_images` images and while the batch's estimated
memory fits the server's budget (serve/admission.py); the batch starts when it is full or when the oldest request has
waited `max_wait_s`. A request that does not fit the budget even alone is refused before it queues. Requests whose
client left or whose deadline passed are dropped before their batch starts, and a running batch stops between
denoising steps once none of its requests is wanted.
"""
from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import math
import threading
import time
from collections.abc import Callable, Sequence

from sdrt.engine.errors import GenerationCancelled, InvalidArgumentError
from sdrt.serve.admission import MemoryAdmission
from sdrt.serve.execution import BatchResult, GeneratedImage, answers_for, compatible_batch
from sdrt.serve.metrics import ServeMetrics
from sdrt.serve.schemas import GenerationParams


#: runs one batch: (requests, should_stop) -> their images (execution.generate_batch on a pipeline)
BatchRunner = Callable[[Sequence[GenerationParams], Callable[[], str | None]], BatchResult]


class QueueFullError(Exception):
    """The queue holds its maximum of waiting requests (HTTP 429); `retry_after_s` estimates when it has room."""

    def __init__(self, retry_after_s: int) -> None:
        super().__init__(f"the queue is full; retry after {retry_after_s} s")
        self.retry_after_s = retry_after_s


class ShuttingDownError(Exception):
    """The server is draining for shutdown and takes no new requests (HTTP 503)."""


class DeadlineExceededError(GenerationCancelled):
    """The request's deadline passed before its images were ready (HTTP 504)."""


@dataclasses.dataclass(frozen=True)
class BatcherConfig:
    """`max_batch_images`: images per U-Net batch (1 turns batching off); `max_wait_s`: how long the oldest request
    waits for partners; `max_queue`: waiting requests beyond which new ones get 429."""

    max_batch_images: int = 8
    max_wait_s: float = 0.05
    max_queue: int = 64

    def __post_init__(self) -> None:
        for name, value, least in (("max_batch_images", self.max_batch_images, 1), ("max_queue", self.max_queue, 1),
                                   ("max_wait_s", self.max_wait_s, 0)):
            if not value >= least:
                raise InvalidArgumentError(name, f"must be at least {least}, got {value!r}")


@dataclasses.dataclass(eq=False)
class Job:
    """One request in the queue. Its future gets the request's images, or the exception that ended it."""

    params: GenerationParams
    deadline: float  # time.monotonic() seconds
    enqueued_at: float = dataclasses.field(default_factory=time.monotonic)
    future: concurrent.futures.Future = dataclasses.field(default_factory=concurrent.futures.Future)
    _cancel_reason: str | None = None

    def cancel(self, reason: str) -> None:
        """Stop wanting this job's images (client gone, deadline passed); thread-safe, the first reason sticks."""
        if self._cancel_reason is None:
            self._cancel_reason = reason

    def stop_reason(self) -> str | None:
        """Why this job is no longer wanted, or None while it is."""
        if self._cancel_reason is None and time.monotonic() >= self.deadline:
            self._cancel_reason = "deadline"
        return self._cancel_reason


class Batcher:
    """The queue and its worker thread. `submit` from any thread; `close` drains the queue and stops the worker.
    With `admission`, batches keep to its memory budget; without, only to `max_batch_images`."""

    def __init__(self, run_batch: BatchRunner, config: BatcherConfig, metrics: ServeMetrics,
                 admission: MemoryAdmission | None = None) -> None:
        self._run_batch = run_batch
        self.config = config
        self._metrics = metrics
        self._admission = admission
        self._queue: collections.deque[Job] = collections.deque()
        self._cond = threading.Condition()
        self._closed = False
        self._recent_batch_s = 1.0  # moving average, for Retry-After
        self._thread = threading.Thread(target=self._work, name="sdrt-batcher", daemon=True)
        self._thread.start()

    # ---- the request side --------------------------------------------------------------------------------------------
    def submit(self, params: GenerationParams, deadline: float) -> Job:
        """Queue a request. Raise RequestTooLargeError (over the memory budget even alone), QueueFullError or
        ShuttingDownError rather than wait."""
        if self._admission is not None:
            self._admission.check(params)
        with self._cond:
            if self._closed:
                raise ShuttingDownError("the server is shutting down")
            if len(self._queue) >= self.config.max_queue:
                batches_ahead = math.ceil(len(self._queue) / self.config.max_batch_images)
                raise QueueFullError(max(1, math.ceil(batches_ahead * self._recent_batch_s)))
            job = Job(params, deadline)
            self._queue.append(job)
            self._metrics.queue_depth.set(len(self._queue))
            self._cond.notify_all()
        return job

    def cancel(self, job: Job, reason: str) -> None:
        """Cancel `job`: out of the queue at once if still waiting, else stopped at its batch's next step."""
        job.cancel(reason)
        with self._cond:
            if job in self._queue:
                self._queue.remove(job)
                self._metrics.queue_depth.set(len(self._queue))
                job.future.set_exception(GenerationCancelled(reason))

    def close(self, timeout_s: float | None = None) -> None:
        """Take no new requests, finish every queued and running one, then stop the worker."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout_s)

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    # ---- the worker side ---------------------------------------------------------------------------------------------
    def _work(self) -> None:
        while (jobs := self._next_batch()) is not None:
            self._run(jobs)

    def _next_batch(self) -> list[Job] | None:
        with self._cond:
            while not self._queue:
                if self._closed:
                    return None
                self._cond.wait()
            head = self._queue[0]
            flush_at = head.enqueued_at + self.config.max_wait_s
            while True:
                batch = compatible_batch(list(self._queue), lambda job: job.params, self.config.max_batch_images,
                                         self._admission.fits if self._admission is not None else None)
                remaining = flush_at - time.monotonic()
                if self._closed or remaining <= 0 or sum(j.params.n for j in batch) >= self.config.max_batch_images:
                    break
                self._cond.wait(remaining)
                if not self._queue or self._queue[0] is not head:  # the head was cancelled: the worker plans again
                    return []
            for job in batch:
                self._queue.remove(job)
            self._metrics.queue_depth.set(len(self._queue))
            return batch

    def _run(self, jobs: list[Job]) -> None:
        wanted = []
        for job in jobs:
            reason = job.stop_reason()
            if reason is None:
                wanted.append(job)
            else:
                job.future.set_exception(_stopped(reason))
        if not wanted:
            return
        now = time.monotonic()
        for job in wanted:
            self._metrics.queue_seconds.observe(now - job.enqueued_at)
        self._metrics.in_flight.inc(len(wanted))
        admitted = self._admission.running([job.params for job in wanted]) if self._admission is not None else contextlib.nullcontext()
        try:
            with admitted:
                self._run_wanted(wanted)
        finally:
            self._metrics.in_flight.dec(len(wanted))
            self._recent_batch_s = 0.8 * self._recent_batch_s + 0.2 * (time.monotonic() - now)

    def _run_wanted(self, jobs: list[Job]) -> None:
        def run(batch: Sequence[Job]) -> list[list[GeneratedImage]]:
            def should_stop() -> str | None:
                # asked once per denoising step: count the step; stop only when no request of the batch is wanted
                self._metrics.denoising_steps.inc()
                reasons = [job.stop_reason() for job in batch]
                return None if None in reasons else reasons[0]

            result = self._run_batch([job.params for job in batch], should_stop)
            images = [image for request_images in result.images for image in request_images]
            self._metrics.record_batch(len(images), sum(1 for image in images if image.encoded is None), result.timings)
            return result.images

        for job, answer in zip(jobs, answers_for(jobs, run)):
            if isinstance(answer, GenerationCancelled):
                job.future.set_exception(_stopped(job.stop_reason() or "cancelled"))
            elif isinstance(answer, Exception):
                job.future.set_exception(answer)
            else:
                job.future.set_result(answer)


def _stopped(reason: str) -> GenerationCancelled:
    return DeadlineExceededError("deadline passed") if reason == "deadline" else GenerationCancelled(reason)
