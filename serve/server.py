"""`sdrt serve`: one process, one pipeline, the HTTP app under uvicorn.

uvicorn handles SIGTERM and SIGINT gracefully: it stops listening, lets every open request finish (queued ones
included, as their handlers are still waiting), then runs the app's shutdown, which drains the batcher.

A bundle that cannot load stops the server: its manifest is read before the port is bound (a missing or malformed
bundle raises BundleError at once), and a load that fails later (a damaged file, a backend that cannot run) stops
uvicorn and raises LoadFailedError. `wait_for_bundle` instead waits for a bundle that is not there yet.
"""
from __future__ import annotations

import dataclasses
import ipaddress
import logging
import os
from collections.abc import Callable
from pathlib import Path

from sdrt.engine.errors import SdrtError
from sdrt.engine.host_memory import MemoryBudget
from sdrt.engine.manifest import read_manifest
from sdrt.serve.app import NOT_READY_RETRY_AFTER_S, AppSettings, create_app
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
    #: for deployments that mount the bundle later: while it is missing or incomplete, answer 503 (Retry-After) and
    #: try loading again every NOT_READY_RETRY_AFTER_S seconds, instead of exiting
    wait_for_bundle: bool = False


class LoadFailedError(SdrtError):
    """The bundle passed the check before the port was bound, then failed to load: the server stopped."""


def check_bundle(config: ServeConfig) -> None:
    """Fail fast, before a port is bound or a worker started: raise BundleError when the bundle is missing or its
    manifest is malformed (the full check, every file's sha256, is the load's). Nothing to check when waiting for
    the bundle."""
    if not config.wait_for_bundle:
        read_manifest(config.bundle)


def build_app(config: ServeConfig, on_load_failure: Callable[[str], None] = lambda reason: None):
    """The ASGI app for `config` (loading starts when the app starts; `on_load_failure(reason)` if it fails)."""
    from sdrt.engine import load

    # The server admits work by its own --memory-budget (serve/admission.py), not the pipeline's default budget.
    service = LocalImageService(lambda: load(config.bundle, backend=config.backend, safety_checker=config.safety_checker,
                                             memory_budget=None),
                                config.batching, warm=config.warm_up, memory_budget=config.memory_budget,
                                wait_for_bundle_s=NOT_READY_RETRY_AFTER_S if config.wait_for_bundle else None,
                                on_failure=on_load_failure)
    return create_app(service, config.app)


def run(config: ServeConfig) -> None:
    """Serve until SIGTERM or SIGINT, then drain and return. Raise BundleError before binding the port for a bundle
    that is missing or malformed, LoadFailedError (after stopping the server) when loading it failed."""
    import uvicorn

    _warn_if_exposed(config)
    check_bundle(config)
    failures: list[str] = []

    def stop_serving(reason: str) -> None:  # from the loading thread; uvicorn's loop polls should_exit
        failures.append(reason)
        server.should_exit = True

    timeout = None if config.graceful_shutdown_s is None else int(config.graceful_shutdown_s)
    server = uvicorn.Server(uvicorn.Config(build_app(config, stop_serving), host=config.host, port=config.port,
                                           log_level="info", timeout_graceful_shutdown=timeout, access_log=False))
    server.run()
    if failures:
        raise LoadFailedError(f"loading the bundle {config.bundle} failed: {failures[0]}")


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
