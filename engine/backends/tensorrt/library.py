"""The tensorrt module, imported on first use (so that sdrt runs without it), its log routed to Python's logging,
and the environment (TensorRT version, GPU) engines built or loaded here are valid for."""
from __future__ import annotations

import functools
import logging
from types import ModuleType
from typing import Any

from sdrt.engine.backends.tensorrt.cuda import GPU_EXTRA_HINT, cudart, current_gpu
from sdrt.engine.backends.tensorrt.engines.identity import BuildEnvironment
from sdrt.engine.errors import BackendUnavailableError

logger = logging.getLogger("sdrt.engine.backends.tensorrt.trt")


def tensorrt() -> ModuleType:
    """The tensorrt module; raise BackendUnavailableError if it is not installed."""
    try:
        import tensorrt
    except ImportError:
        raise BackendUnavailableError(f"tensorrt is not installed ({GPU_EXTRA_HINT})") from None
    return tensorrt


def libraries_unavailable_reason() -> str | None:
    """None if tensorrt and cuda-python import, else which is missing (one sentence)."""
    try:
        tensorrt()
        cudart()
    except BackendUnavailableError as exc:
        return str(exc)
    return None


@functools.cache
def trt_logger() -> Any:
    """One trt.ILogger for every builder and runtime, forwarding TensorRT's messages to `logger` (its VERBOSE and
    INFO at debug level: TensorRT reports every tactic it times)."""
    trt = tensorrt()
    severity = trt.ILogger.Severity
    levels = {
        severity.INTERNAL_ERROR: logging.CRITICAL,
        severity.ERROR: logging.ERROR,
        severity.WARNING: logging.WARNING,
        severity.INFO: logging.DEBUG,
        severity.VERBOSE: logging.DEBUG,
    }

    class _Logger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)

        def log(self, level: Any, message: str) -> None:
            logger.log(levels.get(level, logging.WARNING), "%s", message)

    return _Logger()


@functools.cache
def current_environment() -> BuildEnvironment:
    """This process's TensorRT version and current GPU (asked once: backend selection asks on every load)."""
    return BuildEnvironment(tensorrt().__version__, current_gpu())
