"""The embedded default model: a bundle built on first use and cached, so `sdrt generate "prompt"` needs nothing else.

Until the project ships a trained demo model, the default is a small random-weight checkpoint with SD 1.x's layout
and the real CLIP vocabulary: it exercises the whole engine, but its images are noise. Building it needs the
`export` extra (torch, diffusers); using the cached bundle afterwards does not.
"""
from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

from sdrt.engine.errors import SdrtError
from sdrt.engine.manifest import MANIFEST_NAME

logger = logging.getLogger(__name__)

DEFAULT_ARCH = "tiny"
DEFAULT_SEED = 0


def cache_dir() -> Path:
    """Where sdrt caches built bundles: $SDRT_CACHE_DIR, else $XDG_CACHE_HOME/sdrt, else ~/.cache/sdrt."""
    if "SDRT_CACHE_DIR" in os.environ:
        return Path(os.environ["SDRT_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sdrt"


def default_bundle_dir() -> Path:
    """The default model's bundle, building it on first use."""
    bundle = cache_dir() / f"default-{DEFAULT_ARCH}-bundle"
    if (bundle / MANIFEST_NAME).is_file():
        return bundle
    try:
        from sdrt.export import export_bundle
        from sdrt.export.checkpoints import make_random_checkpoint
    except ImportError as exc:
        raise SdrtError(
            f"the default model is built on first use and that needs the export extra ({exc.name} is missing): "
            "pip install torch==2.13.0 && pip install 'sdrt[export]'"
        ) from exc
    logger.warning("building the default model (random weights, SD 1.x layout) into %s: first use only", bundle)
    with tempfile.TemporaryDirectory(prefix="sdrt-default-") as scratch:
        checkpoint = make_random_checkpoint(Path(scratch) / "checkpoint", DEFAULT_ARCH, seed=DEFAULT_SEED)
        try:
            export_bundle(checkpoint, bundle, force=bundle.exists())
        except FileExistsError:
            logger.info("another process finished building %s first", bundle)
    return bundle
