"""sdrt.serve — text to image over HTTP: `sdrt serve BUNDLE` (FastAPI + uvicorn, one pipeline per process behind a
bounded, micro-batching queue), or the same pipeline as a Ray Serve deployment (`sdrt serve BUNDLE --ray`).

Needs the serve extra (`pip install 'sdrt[serve]'`; Ray Serve: `'sdrt[ray]'`). See docs/serving.md.
"""
from sdrt.serve.app import AppSettings, create_app
from sdrt.serve.batcher import BatcherConfig
from sdrt.serve.schemas import Limits
from sdrt.serve.server import ServeConfig, build_app, run

__all__ = ["AppSettings", "BatcherConfig", "Limits", "ServeConfig", "build_app", "create_app", "run"]
