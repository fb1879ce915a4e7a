"""sdrt.export — build time: diffusers checkpoint -> ONNX bundle (needs the `export` extra: torch, diffusers, ...),
and bundle -> TensorRT engines (tensorrt_build; needs the `gpu` extra only).

`export_bundle` is imported on first use, so that `sdrt build-engines` runs on a GPU machine without torch.
"""
from typing import Any

from sdrt.export.errors import CheckpointError, EngineBuildError, ExportError

__all__ = ["export_bundle", "ExportError", "CheckpointError", "EngineBuildError"]


def __getattr__(name: str) -> Any:
    if name == "export_bundle":
        from sdrt.export.bundle import export_bundle

        return export_bundle
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
