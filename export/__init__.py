"""sdrt.export — build time: diffusers checkpoint -> ONNX bundle (needs the `export` extra: torch, diffusers, ...)."""
from sdrt.export.bundle import export_bundle
from sdrt.export.errors import CheckpointError, ExportError

__all__ = ["export_bundle", "ExportError", "CheckpointError"]
