"""The embedded default model: the demo checkpoint shipped in this package, exported to a bundle on first use and
cached, so `sdrt generate "a red circle on a blue background"` needs nothing else.

The demo model is small and trained here on procedural scenes (see demo/model/README.md): it draws coloured shapes
on coloured backgrounds, nothing else. Building the bundle needs the `export` extra (torch, diffusers); using the
cached bundle afterwards does not. It lives with the checkpoint it builds, not in the runtime: sdrt.engine loads
bundles and knows nothing of the exporter (the CLI and demo/evaluate.py ask here for the default bundle).
"""
from __future__ import annotations

import hashlib
import logging
import os
from importlib import resources
from pathlib import Path

from sdrt.engine.errors import SdrtError
from sdrt.engine.manifest import MANIFEST_NAME

logger = logging.getLogger(__name__)

DEMO_CHECKPOINT = "model"  # folder of the sdrt.demo package


def cache_dir() -> Path:
    """Where sdrt caches built bundles: $SDRT_CACHE_DIR, else $XDG_CACHE_HOME/sdrt, else ~/.cache/sdrt."""
    if "SDRT_CACHE_DIR" in os.environ:
        return Path(os.environ["SDRT_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sdrt"


def demo_checkpoint_dir() -> Path:
    """The shipped demo checkpoint (diffusers format)."""
    return Path(str(resources.files("sdrt.demo").joinpath(DEMO_CHECKPOINT)))


#: part of the cached bundle's name: raised whenever the exporter starts writing what older bundles lack (LoRA refit
#: maps; the U-Net's dynamic text context for long prompts), so an upgrade re-exports the default model once
DEFAULT_BUNDLE_REVISION = 2


def _checkpoint_digest(checkpoint: Path) -> str:
    """A short hash of every checkpoint file, so a retrained model never reuses a stale cached bundle."""
    digest = hashlib.sha256()
    for path in sorted(p for p in checkpoint.rglob("*") if p.is_file() and p.name != "README.md"):
        digest.update(path.relative_to(checkpoint).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def default_bundle_dir() -> Path:
    """The default model's bundle, building it on first use."""
    checkpoint = demo_checkpoint_dir()
    if not (checkpoint / "model_index.json").is_file():
        raise SdrtError(f"the demo checkpoint is missing from this installation ({checkpoint}): reinstall sdrt")
    bundle = cache_dir() / f"demo-{_checkpoint_digest(checkpoint)}-r{DEFAULT_BUNDLE_REVISION}-bundle"
    if (bundle / MANIFEST_NAME).is_file():
        return bundle
    try:
        from sdrt.export import export_bundle
    except ImportError as exc:
        raise SdrtError(
            f"the default model is built on first use and that needs the export extra ({exc.name} is missing): "
            "pip install torch==2.13.0 && pip install 'sdrt[export]'"
        ) from exc
    logger.warning("building the default model's bundle into %s: first use only", bundle)
    try:
        export_bundle(checkpoint, bundle)
    except FileExistsError:
        logger.info("another process finished building %s first", bundle)
    return bundle
