"""What the HTTP app generates with: one pipeline per process behind the batcher (LocalImageService), or Ray Serve
replicas (sdrt.serve.ray_app). The app sees only the ImageService protocol."""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Protocol

from sdrt.engine import StableDiffusionPipeline
from sdrt.engine.errors import BundleError, GenerationCancelled, SdrtError
from sdrt.engine.host_memory import MemoryBudget, format_bytes, process_rss_bytes
from sdrt.engine.manifest import GenerationDefaults
from sdrt.engine.memory_estimate import MemoryModel
from sdrt.serve.admission import MemoryAdmission
from sdrt.serve.batcher import Batcher, BatcherConfig, DeadlineExceededError, ShuttingDownError
from sdrt.serve.execution import GeneratedImage, generate_batch, warm_up
from sdrt.serve.metrics import ServeMetrics
from sdrt.serve.schemas import GenerationParams

logger = logging.getLogger(__name__)

#: how often a waiting request checks whether its client is still connected
DISCONNECT_POLL_S = 0.1


class ClientDisconnectedError(GenerationCancelled):
    """The client closed its connection before its images were ready; its work was cancelled."""


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """What request validation needs to know of the loaded model."""

    default_image_size: int
    defaults: GenerationDefaults = GenerationDefaults()  # steps, guidance and scheduler of a request naming none

    @classmethod
    def of(cls, pipe: StableDiffusionPipeline) -> ModelInfo:
        return cls(pipe.manifest.model.default_image_size, pipe.limits.defaults)


class ImageService(Protocol):
    """The generation side of the server."""

    metrics: ServeMetrics

    def start(self) -> None:
        """Begin loading and warming up, without blocking: `status` says when it is ready."""

    async def stop(self) -> None:
        """Take no new requests, finish those accepted, release the model."""

    def status(self) -> str:
        """"ready", "loading", "draining", or "failed: <why>"."""

    def model_info(self) -> ModelInfo:
        """Only once ready."""

    async def generate(self, params: GenerationParams, deadline: float,
                       disconnected: Callable[[], Awaitable[bool]]) -> list[GeneratedImage]:
        """The request's images. Raise RequestTooLargeError, QueueFullError, ShuttingDownError, DeadlineExceededError
        (deadline: a time.monotonic() value), ClientDisconnectedError (when `disconnected()` turns true) or
        InvalidArgumentError."""


class LocalImageService:
    """One pipeline in this process, loaded and warmed in a background thread, fed by a Batcher that keeps to
    `memory_budget` (resolved when loading starts; None: no budget).

    `wait_for_bundle_s`: while loading raises BundleError (the bundle is not there yet, or incomplete), try again
    after this many seconds instead of failing; None: fail at once. `on_failure(reason)`: called once when loading
    has failed for good, from the loading thread (the server stops on it)."""

    def __init__(self, load_pipeline: Callable[[], StableDiffusionPipeline], batching: BatcherConfig,
                 metrics: ServeMetrics | None = None, warm: bool = True,
                 memory_budget: MemoryBudget | None = MemoryBudget(), wait_for_bundle_s: float | None = None,
                 on_failure: Callable[[str], None] = lambda reason: None) -> None:
        self.metrics = metrics or ServeMetrics()
        self._load_pipeline = load_pipeline
        self._batching = batching
        self._warm = warm
        self._memory_budget = memory_budget
        self._wait_for_bundle_s = wait_for_bundle_s
        self._on_failure = on_failure
        self._stopping = threading.Event()
        self._batcher: Batcher | None = None
        self._info: ModelInfo | None = None
        self._failure: str | None = None
        self._draining = False
        self._loader: threading.Thread | None = None

    def start(self) -> None:
        self._loader = threading.Thread(target=self._load, name="sdrt-load", daemon=True)
        self._loader.start()

    def _load(self) -> None:
        try:
            budget = self._memory_budget.resolve() if self._memory_budget is not None else None
            pipe = self._load_when_present()
            if pipe is None:  # stopped while waiting for the bundle
                return
            if pipe.limits.aesthetics:
                raise SdrtError(f"{pipe.bundle_dir} is an SDXL refiner, which runs image to image only; the server "
                                  "generates images from text: serve the SDXL base bundle, and refine its images with "
                                  "`sdrt img2img REFINER_BUNDLE` or the Python API")
            pipe.set_progress_bar_config(disable=True)
            base = process_rss_bytes() or 0  # the pipeline opened, none of its models run yet
            if self._warm:
                started = time.perf_counter()
                warm_up(pipe)
                logger.info("warm-up done in %.2f s", time.perf_counter() - started)
            admission = self._admission(pipe, budget, base) if budget is not None else None
            self._info = ModelInfo.of(pipe)
            self._batcher = Batcher(lambda requests, should_stop: generate_batch(pipe, requests, should_stop),
                                    self._batching, self.metrics, admission)
        except Exception as exc:  # noqa: BLE001 - /readyz says why until on_failure stops the server
            self._failure = f"{type(exc).__name__}: {exc}"
            if isinstance(exc, SdrtError):  # a message that names the problem: its traceback would add nothing
                logger.error("loading the pipeline failed: %s", self._failure)
            else:
                logger.exception("loading the pipeline failed")
            self._on_failure(self._failure)

    def _load_when_present(self) -> StableDiffusionPipeline | None:
        """The loaded pipeline; with wait_for_bundle_s, None when stopped while still waiting for the bundle."""
        waiting_for = None
        while True:
            try:
                return self._load_pipeline()
            except BundleError as exc:
                if self._wait_for_bundle_s is None:
                    raise
                if str(exc) != waiting_for:  # logged once per reason, not once per try
                    waiting_for = str(exc)
                    logger.warning("waiting for the bundle (trying again every %g s): %s", self._wait_for_bundle_s, exc)
            if self._stopping.wait(self._wait_for_bundle_s):
                return None

    def _admission(self, pipe: StableDiffusionPipeline, budget: int, base: int) -> MemoryAdmission | None:
        """The budget against the pipeline's memory model, from the RSS measured now, at rest after the warm-up
        (`base`: before the first model ran, for a pipeline not warmed up). None where the backend's memory is not
        modelled."""
        if type(pipe.backend).memory_profile is None:
            logger.info("no memory budget: backend %s keeps its models in device memory, which is not modelled", pipe.backend.name)
            return None
        model = MemoryModel.for_pipeline(pipe, base)
        resting = process_rss_bytes()
        if self._warm and resting is not None:
            model = model.with_resident(resting)
        if model.resident_bytes > budget:
            raise SdrtError(f"the loaded model holds {format_bytes(model.resident_bytes)}, over the memory budget of "
                            f"{format_bytes(budget)} (--memory-budget): raise it, or serve on a machine with more memory")
        logger.info("memory budget %s (%s); %s at rest", format_bytes(budget), self._memory_budget.describe(),
                    format_bytes(model.resident_bytes))
        return MemoryAdmission(model, budget, pipe.manifest.model.image_sides.maximum, self.metrics)

    async def stop(self) -> None:
        self._draining = True
        self._stopping.set()
        if self._loader is not None:
            await asyncio.to_thread(self._loader.join)
        if self._batcher is not None:
            await asyncio.to_thread(self._batcher.close)

    def status(self) -> str:
        if self._failure is not None:
            return f"failed: {self._failure}"
        if self._draining:
            return "draining"
        return "ready" if self._batcher is not None else "loading"

    def model_info(self) -> ModelInfo:
        assert self._info is not None, "model_info() before the service is ready"
        return self._info

    async def generate(self, params: GenerationParams, deadline: float,
                       disconnected: Callable[[], Awaitable[bool]]) -> list[GeneratedImage]:
        if self._batcher is None or self._draining:
            raise ShuttingDownError(self.status())
        job = self._batcher.submit(params, deadline)
        future = asyncio.wrap_future(job.future)
        # Read the outcome even when nobody awaits it any more, so asyncio logs no "exception never retrieved".
        future.add_done_callback(lambda f: f.cancelled() or f.exception())
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self._batcher.cancel(job, "deadline")
                raise DeadlineExceededError("deadline passed")
            done, _ = await asyncio.wait({future}, timeout=min(DISCONNECT_POLL_S, remaining))
            if done:
                return future.result()
            if await disconnected():
                self._batcher.cancel(job, "disconnected")
                raise ClientDisconnectedError("the client disconnected")
