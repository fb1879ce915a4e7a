"""The HTTP API (FastAPI): routes, bearer-token auth, request bounds, error mapping, readiness, and the lifespan that
starts the service and drains it on shutdown.

    POST /v1/images/generations   OpenAI's images API shape + sdrt's parameters -> {"created", "data": [{"b64_json"}]}
    GET  /healthz                 the process answers (never needs the token)
    GET  /readyz                  200 once the pipeline is loaded and warmed; 503 while loading, draining, or failed
    GET  /metrics                 Prometheus text format

Every answer other than 200 has OpenAI's error shape (schemas.ErrorBody), whatever produced it: a bad body, a path or
method the API does not have, the API key (checked before the body is read), or an unexpected exception (500).
"""
from __future__ import annotations

import base64
import contextlib
import dataclasses
import logging
import secrets
import time
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException

from sdrt.engine.errors import GenerationCancelled, InvalidArgumentError
from sdrt.engine.schedulers import SCHEDULER_NAMES
from sdrt.serve.admission import RequestTooLargeError
from sdrt.serve.batcher import DeadlineExceededError, QueueFullError, ShuttingDownError
from sdrt.serve.execution import GenerationFailedError
from sdrt.serve.metrics import Rejection, ServeMetrics
from sdrt.serve.schemas import ErrorBody, GenerationParams, ImageData, ImageRequest, ImageResponse, Limits
from sdrt.serve.service import ImageService

logger = logging.getLogger(__name__)

#: a status nobody reads: the client left (nginx's convention), recorded in logs and metrics only
CLIENT_CLOSED_REQUEST = 499
#: paths that answer without the API key, so orchestrators can probe them
HEALTH_PATHS = frozenset({"/healthz", "/readyz"})
#: what a client waits before retrying while the model loads or the server drains
NOT_READY_RETRY_AFTER_S = 5


@dataclasses.dataclass(frozen=True)
class AppSettings:
    """`request_timeout_s`: each request's deadline from arrival (504 after it); `api_key`: when set, every endpoint
    but /healthz and /readyz needs `Authorization: Bearer <api_key>`."""

    limits: Limits = Limits()
    request_timeout_s: float = 300.0
    api_key: str | None = None


class _ApiError(Exception):
    """A rejected request: its status, its reason (counted in the metrics, and the error's `code`), its message."""

    def __init__(self, status: int, reason: Rejection, message: str, param: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.reason, self.param, self.headers = status, reason, param, headers or {}


def _error_response(status: int, message: str, param: str | None = None, reason: Rejection | None = None,
                    headers: dict[str, str] | None = None) -> JSONResponse:
    error = ErrorBody(message=message, type="invalid_request_error" if status < 500 else "server_error", param=param,
                      code=None if reason is None else reason.value)
    return JSONResponse({"error": error.model_dump()}, status_code=status, headers=headers)


class UnexpectedErrorMiddleware:
    """An exception nothing else handled: logged here, once, with its traceback, counted as "failed", and answered
    500 in the API's error shape (when the answer has not started yet); not raised on, so the server logs it no
    second time."""

    def __init__(self, app, metrics: ServeMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def tracking_send(message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception:  # noqa: BLE001 - the last line of defence: every request gets an answer in the API's shape
            logger.exception("%s %s failed", scope["method"], scope["path"])
            self.metrics.reject(Rejection.FAILED)
            if not started:
                await _error_response(500, "the server failed on this request; its log has the error",
                                      reason=Rejection.FAILED)(scope, receive, send)


class AuthMiddleware:
    """`Authorization: Bearer <api_key>` on every path but the health probes, compared in constant time, before the
    body is read or parsed: a client without the key learns nothing of what its body would have got (401 first)."""

    def __init__(self, app, api_key: str, metrics: ServeMetrics) -> None:
        self.app, self.expected, self.metrics = app, api_key.encode(), metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"] in HEALTH_PATHS:
            return await self.app(scope, receive, send)
        scheme, _, token = dict(scope["headers"]).get(b"authorization", b"").partition(b" ")
        if scheme.lower() != b"bearer" or not secrets.compare_digest(token.strip(), self.expected):
            self.metrics.reject(Rejection.UNAUTHORIZED)
            response = _error_response(401, "missing or wrong API key (Authorization: Bearer ...)",
                                       reason=Rejection.UNAUTHORIZED, headers={"WWW-Authenticate": "Bearer"})
            return await response(scope, receive, send)
        await self.app(scope, receive, send)


class BodyLimitMiddleware:
    """Refuse (413) bodies over `max_bytes`, by Content-Length and by the bytes actually received (chunked uploads),
    before anything parses them. Later receive() calls go to the server, so disconnects are still seen."""

    def __init__(self, app, max_bytes: int, metrics: ServeMetrics) -> None:
        self.app, self.max_bytes, self.metrics = app, max_bytes, metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            return await self._too_large(scope, receive, send)
        chunks, size, message = [], 0, {"more_body": True}
        while message.get("more_body"):
            message = await receive()
            if message["type"] != "http.request":
                break  # a disconnect: the app sees it on its next receive
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                return await self._too_large(scope, receive, send)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _too_large(self, scope, receive, send) -> None:
        self.metrics.reject(Rejection.INVALID)
        response = _error_response(413, f"request body over {self.max_bytes} bytes", reason=Rejection.INVALID)
        await response(scope, receive, send)


def create_app(service: ImageService, settings: AppSettings = AppSettings()) -> FastAPI:
    """The ASGI app around `service`. Starting the app (its lifespan) starts loading; stopping it drains."""

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        service.start()
        yield
        logger.info("shutting down: finishing accepted requests")
        await service.stop()

    app = FastAPI(title="sdrt", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    metrics = service.metrics
    # The last added runs first: the catch-all around everything, then the key, then the body's size.
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.limits.max_body_bytes, metrics=metrics)
    if settings.api_key:
        app.add_middleware(AuthMiddleware, api_key=settings.api_key, metrics=metrics)
    app.add_middleware(UnexpectedErrorMiddleware, metrics=metrics)

    @app.exception_handler(_ApiError)
    async def _api_error(_request: Request, exc: _ApiError) -> JSONResponse:
        metrics.reject(exc.reason)
        return _error_response(exc.status, str(exc), exc.param, exc.reason, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        metrics.reject(Rejection.INVALID)
        first = exc.errors()[0]
        if first.get("type") == "json_invalid":
            return _error_response(400, f"the body is not valid JSON: {first.get('msg')}", reason=Rejection.INVALID)
        location = [str(part) for part in first.get("loc", ()) if part != "body"]
        param = ".".join(location) or None
        return _error_response(422, f"{param or 'body'}: {first.get('msg')}", param, Rejection.INVALID)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
        # The router's own answers (404 for a path the API does not have, 405 with Allow for a method): not requests
        # for images, so not counted as rejections.
        return _error_response(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}",
                               headers=exc.headers)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        status = service.status()
        return JSONResponse({"status": status}, status_code=200 if status == "ready" else 503)

    @app.get("/metrics")
    async def prometheus() -> Response:
        body, content_type = metrics.exposition()
        return Response(body, media_type=content_type)

    @app.post("/v1/images/generations", response_model=ImageResponse)
    async def generations(body: ImageRequest, request: Request) -> ImageResponse | Response:
        arrived = time.monotonic()
        status = service.status()
        if status != "ready":
            raise _ApiError(503, Rejection.NOT_READY, f"not ready: {status}",
                            headers={"Retry-After": str(NOT_READY_RETRY_AFTER_S)})
        params = _to_params(body, service, settings.limits)
        try:
            images = await service.generate(params, arrived + settings.request_timeout_s, request.is_disconnected)
        except RequestTooLargeError as exc:
            raise _ApiError(413, Rejection.TOO_LARGE, str(exc), exc.parameter) from None
        except QueueFullError as exc:
            raise _ApiError(429, Rejection.QUEUE_FULL, str(exc), headers={"Retry-After": str(exc.retry_after_s)}) from None
        except ShuttingDownError as exc:
            raise _ApiError(503, Rejection.NOT_READY, f"not ready: {exc}",
                            headers={"Retry-After": str(NOT_READY_RETRY_AFTER_S)}) from None
        except DeadlineExceededError:
            raise _ApiError(504, Rejection.DEADLINE, f"not done within the request timeout of {settings.request_timeout_s} s") from None
        except GenerationCancelled:
            metrics.reject(Rejection.DISCONNECTED)
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        except InvalidArgumentError as exc:
            raise _ApiError(422, Rejection.INVALID, str(exc), exc.parameter) from None
        except GenerationFailedError:  # its traceback is logged where it failed
            raise _ApiError(500, Rejection.FAILED, "generating the images failed (the server's log has why)") from None
        metrics.request_seconds.observe(time.monotonic() - arrived)
        return ImageResponse(
            created=int(time.time()),
            data=[ImageData(b64_json=None if image.encoded is None else base64.b64encode(image.encoded).decode("ascii"),
                            nsfw_content_detected=image.nsfw_content_detected, seed=params.seed) for image in images],
            output_format=params.encoding.format.value,
            size=f"{params.width}x{params.height}",
        )

    return app


def _to_params(body: ImageRequest, service: ImageService, limits: Limits) -> GenerationParams:
    """The request's bounds (the server's limits) and defaults (the model's size, steps, guidance and scheduler, a
    random seed)."""
    if body.n > limits.max_n:
        raise _ApiError(422, Rejection.INVALID, f"n: at most {limits.max_n} images per request, got {body.n}", "n")
    info = service.model_info()
    steps = info.defaults.num_inference_steps if body.num_inference_steps is None else body.num_inference_steps
    if steps > limits.max_steps:
        raise _ApiError(422, Rejection.INVALID, f"num_inference_steps: at most {limits.max_steps}, got {steps}", "num_inference_steps")
    if body.scheduler is not None and body.scheduler not in SCHEDULER_NAMES:  # refused before it queues
        raise _ApiError(422, Rejection.INVALID, f"scheduler: must be one of {', '.join(SCHEDULER_NAMES)}; got "
                        f"{body.scheduler!r}", "scheduler")
    width, height = body.width_height()
    return GenerationParams(
        prompt=body.prompt,
        negative_prompt=body.negative_prompt,
        n=body.n,
        width=width or info.default_image_size,
        height=height or info.default_image_size,
        num_inference_steps=steps,
        guidance_scale=info.defaults.guidance_scale if body.guidance_scale is None else body.guidance_scale,
        seed=body.seed if body.seed is not None else secrets.randbelow(2**32),
        scheduler=body.scheduler if body.scheduler is not None else info.defaults.scheduler,
        deepcache_interval=body.deepcache_interval,
        encoding=body.encoding(),
        decoder=body.decoder,
    )
