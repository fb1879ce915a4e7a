"""The embedded default model: the demo model's bundle, shipped ready to run in this package (demo/bundle/), so
`sdrt generate "a red circle on a blue background"` needs no torch, no exporter and no download.

The demo model is small and trained here on procedural scenes (see demo/model/README.md): it draws coloured shapes
on coloured backgrounds, nothing else. demo/default_model_export.py regenerates the shipped bundle from the
checkpoint. This module lives with the model, not in the runtime: sdrt.engine loads bundles and knows nothing of a
default one (the CLI and demo/evaluate.py ask here for it).

The backends keep their caches beside a bundle's files (`.cache/`: verified hashes, OpenVINO's converted and compiled
models, TensorRT engines), but the install location may be read-only or shared, and an editable install's is the
source tree. So the shipped bundle is opened through a directory in sdrt's cache whose files are links to the shipped
ones: the caches land there and the shipped files are only ever read.
"""
from __future__ import annotations

import hashlib
import logging
import os
from importlib import resources
from pathlib import Path

from sdrt.engine.atomic import atomic_directory
from sdrt.engine.errors import SdrtError
from sdrt.engine.manifest import MANIFEST_NAME, read_manifest

logger = logging.getLogger(__name__)

SHIPPED_BUNDLE = "bundle"  # folder of the sdrt.demo package


def cache_dir() -> Path:
    """Where sdrt keeps what it derives at run time: $SDRT_CACHE_DIR, else $XDG_CACHE_HOME/sdrt, else ~/.cache/sdrt."""
    if "SDRT_CACHE_DIR" in os.environ:
        return Path(os.environ["SDRT_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sdrt"


def shipped_bundle_dir() -> Path:
    """The default model's bundle as installed with sdrt: read it, never write into it."""
    return Path(str(resources.files("sdrt.demo").joinpath(SHIPPED_BUNDLE)))


def default_bundle_dir() -> Path:
    """The default model's bundle to load: a directory in the cache linking to the shipped bundle's files, made on
    first use. Its name hashes the shipped manifest (which hashes every file) and location, so a new sdrt version
    or another installation never reuses links to other files."""
    shipped = shipped_bundle_dir()
    manifest_path = shipped / MANIFEST_NAME
    if not manifest_path.is_file():
        raise SdrtError(f"the default model's bundle is missing from this installation ({shipped}): reinstall sdrt")
    digest = hashlib.sha256(str(shipped.resolve()).encode() + b"\0" + manifest_path.read_bytes()).hexdigest()[:16]
    linked = cache_dir() / f"demo-{digest}"
    if (linked / MANIFEST_NAME).is_file():
        return linked
    names = [MANIFEST_NAME, *read_manifest(shipped).files]
    try:
        with atomic_directory(linked) as staging:
            for name in names:
                (staging / name).parent.mkdir(parents=True, exist_ok=True)
                (staging / name).symlink_to((shipped / name).resolve())
    except OSError:  # FileExistsError, or ENOTEMPTY when the rename lands on a directory made meanwhile
        if not (linked / MANIFEST_NAME).is_file():
            raise
        logger.info("another process linked %s first", linked)
    return linked
