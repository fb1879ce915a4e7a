"""The same server on Ray Serve (ray extra): pipeline replicas that micro-batch with `@serve.batch`, behind the same
FastAPI app as an ingress deployment. Replicas scale out over a Ray cluster's nodes, and autoscale on queued requests.

    sdrt serve BUNDLE --ray [--replicas N|MIN:MAX] [--ray-address auto]   # one command: Ray, Serve, the app
    serve run sdrt.serve.ray_app:app_builder bundle=/path/to/bundle     # Ray's own CLI (and `serve deploy` configs)

A replica groups each `@serve.batch` batch by `batch_key` (execution.compatible_batch) and runs each group as one
pipeline call (execution.generate_batch), so a request's images are those `sdrt serve` gives for the same seed.
Deadlines stop a replica's batch between denoising steps once every request in it has passed its deadline; a client
that leaves cancels its Ray call (dropped while still queued; a batch already running finishes).
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import signal
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from ray import serve
from ray.serve.exceptions import BackPressureError

from sdrt.engine.errors import GenerationCancelled, InvalidArgumentError
from sdrt.serve.app import AppSettings, create_app
from sdrt.serve.batcher import BatcherConfig, DeadlineExceededError, QueueFullError, ShuttingDownError
from sdrt.serve.execution import (GeneratedImage, GenerationFailedError, answers_for, compatible_batch, generate_batch,
                                  warm_up)
from sdrt.serve.metrics import ServeMetrics
from sdrt.serve.schemas import GenerationParams, Limits
from sdrt.serve.server import LoadFailedError, ServeConfig, check_bundle
from sdrt.serve.service import DISCONNECT_POLL_S, ClientDisconnectedError, ModelInfo

logger = logging.getLogger(__name__)

APP_NAME = "sdrt"


@dataclasses.dataclass(frozen=True)
class RayOptions:
    """`address`: a running cluster to join ("auto": the one `ray start` began on this node), or None for a new local
    Ray instance owned by this command (never one already running here), keeping its session files and sockets under
    `temp_dir` (None: Ray's default, /tmp/ray). Replicas: fixed when min == max, else autoscaled between them."""

    address: str | None = None
    min_replicas: int = 1
    max_replicas: int = 1
    replica_cpus: float = 1.0
    temp_dir: Path | None = None


@dataclasses.dataclass(frozen=True)
class ReplicaAnswer:
    """A replica's answer to one request, as plain data (exceptions do not cross Ray's boundary intact)."""

    images: list[GeneratedImage] | None = None
    error: str | None = None  # "invalid", "deadline" or "failed"
    parameter: str | None = None
    message: str = ""

    @classmethod
    def of(cls, answer: list[GeneratedImage] | Exception) -> ReplicaAnswer:
        if isinstance(answer, InvalidArgumentError):
            return cls(error="invalid", parameter=answer.parameter, message=str(answer))
        if isinstance(answer, GenerationCancelled):
            return cls(error="deadline", message=str(answer))
        if isinstance(answer, Exception):  # a GenerationFailedError: answers_for logged its traceback
            return cls(error="failed", message=str(answer))
        return cls(images=answer)

    def result(self) -> list[GeneratedImage]:
        """The images, or the exception the local service would raise."""
        if self.error == "invalid":
            raise InvalidArgumentError(self.parameter or "request", self.message)
        if self.error == "deadline":
            raise DeadlineExceededError(self.message)
        if self.error is not None:
            raise GenerationFailedError(self.message)
        assert self.images is not None
        return self.images


class PipelineReplica:
    """One pipeline per replica, loaded and warmed in the constructor (Ray routes to a replica once it is built)."""

    def __init__(self, bundle: str, backend: str, safety_checker: str, batching: BatcherConfig, warm: bool) -> None:
        from sdrt.engine import load

        logging.getLogger("sdrt").setLevel(logging.INFO)
        self._pipe = load(bundle, backend=backend, safety_checker=safety_checker)
        self._pipe.set_progress_bar_config(disable=True)
        if warm:
            warm_up(self._pipe)
        self._max_images = batching.max_batch_images
        self._batched.set_max_batch_size(batching.max_batch_images)
        self._batched.set_batch_wait_timeout_s(batching.max_wait_s)

    def model_info(self) -> ModelInfo:
        return ModelInfo.of(self._pipe)

    async def generate(self, params: GenerationParams, deadline_unix_s: float) -> ReplicaAnswer:
        """One request; `deadline_unix_s` is wall-clock time (the ingress may run on another node)."""
        return await self._batched((params, deadline_unix_s))

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.05)  # both set from the server's options in __init__
    async def _batched(self, calls: list[tuple[GenerationParams, float]]) -> list[ReplicaAnswer]:
        answers: dict[int, ReplicaAnswer] = {}
        pending = list(range(len(calls)))
        while pending:
            group = compatible_batch(pending, lambda i: calls[i][0], self._max_images)
            pending = [i for i in pending if i not in group]
            # In a thread, so this replica's event loop keeps collecting the next batch meanwhile.
            group_answers = await asyncio.to_thread(answers_for, [calls[i] for i in group], self._run)
            answers.update({i: ReplicaAnswer.of(answer) for i, answer in zip(group, group_answers)})
        return [answers[i] for i in range(len(calls))]

    def _run(self, calls: Sequence[tuple[GenerationParams, float]]) -> list[list[GeneratedImage]]:
        last_deadline = max(deadline for _, deadline in calls)
        return generate_batch(self._pipe, [params for params, _ in calls],
                              lambda: "deadline" if time.time() >= last_deadline else None).images


class RayImageService:
    """The ImageService of the ingress deployment: requests go to the pipeline replicas through a DeploymentHandle."""

    def __init__(self, replicas) -> None:
        self.metrics = ServeMetrics()
        self._replicas = replicas
        self._info: ModelInfo | None = None
        self._failure: str | None = None
        self._draining = False

    def start(self) -> None:
        asyncio.get_running_loop().create_task(self._ask_model_info())

    async def _ask_model_info(self) -> None:
        try:
            self._info = await self._replicas.model_info.remote()  # answered once a replica has loaded and warmed up
        except Exception as exc:  # noqa: BLE001 - /readyz says why
            logger.exception("no pipeline replica answered")
            self._failure = f"{type(exc).__name__}: {exc}"

    async def stop(self) -> None:
        self._draining = True

    def status(self) -> str:
        if self._failure is not None:
            return f"failed: {self._failure}"
        if self._draining:
            return "draining"
        return "ready" if self._info is not None else "loading"

    def model_info(self) -> ModelInfo:
        assert self._info is not None, "model_info() before the service is ready"
        return self._info

    async def generate(self, params: GenerationParams, deadline: float,
                       disconnected: Callable[[], Awaitable[bool]]) -> list[GeneratedImage]:
        if self._draining:
            raise ShuttingDownError("draining")
        response = self._replicas.generate.remote(params, time.time() + deadline - time.monotonic())
        pending = asyncio.ensure_future(_answer(response))
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                response.cancel()
                raise DeadlineExceededError("deadline passed")
            done, _ = await asyncio.wait({pending}, timeout=min(DISCONNECT_POLL_S, remaining))
            if done:
                return pending.result().result()
            if await disconnected():
                response.cancel()
                raise ClientDisconnectedError("the client disconnected")


async def _answer(response) -> ReplicaAnswer:
    try:
        return await response
    except BackPressureError as exc:
        raise QueueFullError(1) from exc


def build_ray_app(config: ServeConfig, options: RayOptions):
    """The Ray Serve application: the ingress (the HTTP app) bound to the pipeline replicas."""
    scaling: dict[str, Any] = ({"num_replicas": options.min_replicas} if options.min_replicas == options.max_replicas else {
        "autoscaling_config": {"min_replicas": options.min_replicas, "max_replicas": options.max_replicas,
                               # a replica is busy when it holds a full batch
                               "target_ongoing_requests": config.batching.max_batch_images}})
    replica = serve.deployment(
        PipelineReplica, name="PipelineReplica", ray_actor_options={"num_cpus": options.replica_cpus},
        # room for the batch being run and the next one being collected; beyond, requests wait in the handle's queue
        max_ongoing_requests=2 * config.batching.max_batch_images, max_queued_requests=config.batching.max_queue,
        **scaling,
    ).bind(str(config.bundle), config.backend, config.safety_checker, config.batching, config.warm_up)
    # Ray's default (5 ongoing requests per replica) would cap how many requests reach the pipeline replicas at
    # once, and so the batches they can form: the ingress only awaits them.
    ingress = Ingress.options(max_ongoing_requests=config.batching.max_queue + 2 * config.batching.max_batch_images
                              * options.max_replicas)
    return ingress.bind(replica, config.app)


@serve.deployment(name="Ingress", ray_actor_options={"num_cpus": 0})
@serve.ingress()
class Ingress:
    """The HTTP app (sdrt.serve.app), built on the replica once the handle to the pipeline replicas is known."""

    def __init__(self, replicas, settings: AppSettings) -> None:
        self._replicas, self._settings = replicas, settings

    def __serve_build_asgi_app__(self):
        return create_app(RayImageService(self._replicas), self._settings)


def app_builder(args: dict[str, str]):
    """For Ray's CLI and config files: `serve run sdrt.serve.ray_app:app_builder bundle=PATH [backend=...]
    [safety_checker=...] [replicas=N|MIN:MAX] [max_batch_images=8] [max_wait_ms=50] [max_queue=64] [api_key=...]`."""
    known = {"bundle", "backend", "safety_checker", "replicas", "max_batch_images", "max_wait_ms", "max_queue", "api_key",
             "replica_cpus"}
    unknown = sorted(set(args) - known)
    if unknown or "bundle" not in args:
        raise ValueError(f"app_builder: needs bundle=PATH; unknown {unknown}; known {sorted(known)}")
    low, _, high = str(args.get("replicas", "1")).partition(":")
    config = ServeConfig(
        bundle=Path(args["bundle"]), backend=args.get("backend", "auto"), safety_checker=args.get("safety_checker", "block"),
        batching=BatcherConfig(max_batch_images=int(args.get("max_batch_images", 8)),
                               max_wait_s=float(args.get("max_wait_ms", 50)) / 1000, max_queue=int(args.get("max_queue", 64))),
        app=AppSettings(limits=Limits(), api_key=args.get("api_key") or None),
    )
    return build_ray_app(config, RayOptions(min_replicas=int(low), max_replicas=int(high or low),
                                            replica_cpus=float(args.get("replica_cpus", 1.0))))


def run_ray(config: ServeConfig, options: RayOptions) -> None:
    """`sdrt serve --ray`: start (or join) Ray, run the application on config.host:config.port, serve until SIGTERM
    or SIGINT, then delete the application (Ray drains its replicas) and leave. A missing or malformed bundle raises
    BundleError before Ray starts; replicas that fail to load (Ray Serve retries each 3 times) LoadFailedError."""
    import ray

    check_bundle(config)
    # "local": a new instance even where RAY_ADDRESS is set or `ray start` left one running on this machine (address
    # None would join it); its GCS and worker ports are free ones Ray picks.
    ray.init(address=options.address or "local", include_dashboard=False, log_to_driver=False,
             _temp_dir=None if options.temp_dir is None else str(options.temp_dir))
    # After ray.init, which installs its own SIGTERM handler (exit at once): this one lets the application drain.
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": config.host, "port": config.port})
        try:
            serve.run(build_ray_app(config, options), name=APP_NAME, route_prefix="/")
        except RuntimeError as exc:  # Ray Serve's answer once the deployment is marked failed
            raise LoadFailedError(f"loading the bundle {config.bundle} failed: {exc}") from exc
        logger.warning("Ray Serve application %r on http://%s:%d", APP_NAME, config.host, config.port)
        stop.wait()
        logger.warning("stopping: Ray Serve finishes the requests its replicas hold, then removes them")
        serve.delete(APP_NAME)
        if options.address is None:
            serve.shutdown()
    finally:
        ray.shutdown()
