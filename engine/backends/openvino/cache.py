"""The OpenVINO backends' cache in a bundle, `<bundle>/.cache/openvino`: converted models (IR with fp16 weights, after
graph rewrites) and compiled models (compiled_models.py), one directory per model, each named after everything its content
depends on; and the pruning of the entries no current backend would read (a re-exported component, a changed
rewrite), which nothing else would ever delete."""
from __future__ import annotations

import logging
import shutil
from collections.abc import Collection, Iterable
from pathlib import Path

from sdrt.engine.specs import Component

logger = logging.getLogger(__name__)

CACHE_SUBDIR = ".cache/openvino"
IR_SUBDIR = "ir"  # in CACHE_SUBDIR: converted models (fp16 weights, graph rewrites), one directory each
COMPILED_SUBDIR = "compiled"  # in CACHE_SUBDIR: compiled models (compiled_models.py), one directory per model
IR_FILE = "model.xml"  # OpenVINO IR: the weights go beside it in model.bin


def model_name(component: Component, digest: str) -> str:
    """Names a component's model file of this digest (`Manifest.component_digest`) as the bundle holds it."""
    return f"{component.value}-{digest[:16]}"


def converted_name(component: Component, digest: str, fp16_weights: bool, rewrite_names: Iterable[str]) -> str | None:
    """The IR_SUBDIR directory of the component's converted model, or None where it compiles the bundle's file as is
    (neither fp16 weights nor rewrites). The name carries what the conversion depends on: the source's digest and
    the rewrites."""
    rewrite_names = list(rewrite_names)
    if not (fp16_weights or rewrite_names):
        return None
    return "-".join([component.value, digest[:16], *rewrite_names])


def compiled_name(source_name: str, static_rewrite_names: Iterable[str], precision: str) -> str:
    """The COMPILED_SUBDIR directory of the compiled models (one per set of input shapes) of the model named
    `source_name`, after the static-shape rewrites named, in OpenVINO's inference `precision`."""
    return "-".join([source_name, *static_rewrite_names, precision])


def remove_stale_entries(cache_dir: Path, components: Collection[Component], current: Collection[str]) -> None:
    """Remove the cache's converted and compiled models of these components whose names are not in `current` (the
    names the OpenVINO backends would read now): those of an earlier export (another digest) or of a rewrite since
    changed. Each full-size entry is gigabytes. Entries of other components, and the hidden staging directories of
    conversions under way, are left alone."""
    prefixes = tuple(f"{component.value}-" for component in components)
    for subdir in (IR_SUBDIR, COMPILED_SUBDIR):
        directory = cache_dir / subdir
        if not directory.is_dir():
            continue
        for entry in directory.iterdir():
            # blobs directly in compiled/ were written by versions that shared one cache directory for all models
            shared_layout_blob = subdir == COMPILED_SUBDIR and entry.is_file()
            if subdir == COMPILED_SUBDIR and entry.is_dir():
                # blobs directly in a model's directory were written by versions that gave it to OpenVINO's cache
                for blob in entry.glob("*.blob"):
                    logger.info("removing stale OpenVINO cache entry %s", blob)
                    blob.unlink(missing_ok=True)
            if shared_layout_blob or (entry.name.startswith(prefixes) and entry.name not in current):
                logger.info("removing stale OpenVINO cache entry %s", entry)
                if entry.is_dir():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink(missing_ok=True)


def remove_entries_containing(cache_dir: Path, fragment: str) -> None:
    """Remove the cache's converted and compiled models whose names contain `fragment`: for a model file replaced in
    place (an int8 model quantized again), whose entries' names would not change."""
    for subdir in (IR_SUBDIR, COMPILED_SUBDIR):
        directory = cache_dir / subdir
        for entry in directory.glob(f"*{fragment}*") if directory.is_dir() else ():
            logger.info("removing OpenVINO cache entry %s of a replaced model", entry)
            shutil.rmtree(entry, ignore_errors=True)
