"""`sdrt serve`: one process, one pipeline, the HTTP app under uvicorn.

uvicorn handles SIGTERM and SIGINT gracefully: it stops listening, lets every open request finish (queued ones
included, as their handlers are still waiting), then runs the app's shutdown, which drains the batcher.
"""
from __future__ import annotations

import dataclasses
import ipaddress
import logging
import os
from pathlib import Path

from sdrt.engine.host_memory import MemoryBudget
from sdrt.serve.app import AppSettings, create_app
from sdrt.serve.batcher import BatcherConfig
from sdrt.serve.service import LocalImageService

logger = logging.getLogger(__name__)

#: the environment variable read for the API key when --api-key is not given
API_KEY_ENV = "SDRT_API_KEY"


@dataclasses.dataclass(frozen=True)
class ServeConfig:
    """Everything `sdrt serve` is told: which bundle and how to load it, where to listen, batching and request limits."""

    bundle: Path
    backend: str = "auto"
    safety_checker: str = "block"
    host: str = "127.0.0.1"
    port: int = 8000
    batching: BatcherConfig = BatcherConfig()
    app: AppSettings = AppSettings()
    warm_up: bool = True
    #: what the process may grow to: requests whose estimated memory does not fit wait, or are refused (413)
    memory_budget: MemoryBudget = MemoryBudget()
    #: seconds uvicorn gives open requests to finish after SIGTERM before closing them (None: no limit)
    graceful_shutdown_s: float | None = None


def build_app(config: ServeConfig):
    """The ASGI app for `config` (loading starts when the app starts)."""
    from sdrt.engine import load

    service = LocalImageService(lambda: load(config.bundle, backend=config.backend, safety_checker=config.safety_checker),
                                config.batching, warm=config.warm_up, memory_budget=config.memory_budget)
    return create_app(service, config.app)


def run(config: ServeConfig) -> None:
    """Serve until SIGTERM or SIGINT, then drain and return."""
    import uvicorn

    _warn_if_exposed(config)
    timeout = None if config.graceful_shutdown_s is None else int(config.graceful_shutdown_s)
    uvicorn.run(build_app(config), host=config.host, port=config.port, log_level="info",
                timeout_graceful_shutdown=timeout, access_log=False)


def _warn_if_exposed(config: ServeConfig) -> None:
    try:
        loopback = ipaddress.ip_address(config.host).is_loopback
    except ValueError:
        loopback = config.host == "localhost"
    if not loopback and config.app.api_key is None:
        logger.warning("listening on %s without an API key: anyone who reaches it can generate (set --api-key or %s)",
                       config.host, API_KEY_ENV)


def api_key_from(option: str | None) -> str | None:
    """--api-key, else $SDRT_API_KEY, else None (no auth)."""
    return option or os.environ.get(API_KEY_ENV) or None
