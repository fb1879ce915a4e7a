"""Compiled models kept in the bundle's cache, one entry per model and set of input shapes, so that a later process
loads them (at `load()`) instead of compiling them on its first request.

An entry is keyed like a TensorRT engine (engine/backends/tensorrt/engines/identity.py): the model it compiles
(its name carries the component's digest, the rewrites and the precision), the input shapes it is compiled for
(None: any), whether it shares the guidance prefix, and the environment a compiled model runs in (OpenVINO's
version, the CPU's name and optimisation capabilities): a stale or foreign entry is never read. OpenVINO's own
compiled-model cache (CACHE_DIR) writes and reads the blob, keyed on the file it compiles: the bundle's model (or
its converted copy) for any shapes, or, for static shapes, an IR of the reshaped and rewritten model saved in the
entry, so the key costs no hash of the weights. An entry is complete only once its record (ENTRY_FILE) is written,
atomically, after its model compiled: an interrupted compilation leaves no entry that a later process would load
at `load()`. What it may leave in OpenVINO's cache (a partial blob) OpenVINO replaces: it compiles again where it
cannot read a blob, and so does a process whose compilation overlaps another's.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sdrt.engine.atomic import atomic_directory, atomic_file
from sdrt.engine.backends.openvino.cache import IR_FILE
from sdrt.engine.specs import Component

logger = logging.getLogger(__name__)

ENTRIES_SUBDIR = "entries"  # in a model's compiled directory: one directory per compiled model
ENTRY_FILE = "entry.json"  # in an entry: its key, written once the model compiled
BLOB_SUBDIR = "blob"  # in an entry: OpenVINO's CACHE_DIR
#: compiled models kept per model (each set of static shapes is one; a full-size U-Net's is gigabytes): the least
#: recently used go first
MAX_ENTRIES_PER_MODEL = 3
#: a bundle's compiled models take at most this many times the bundle's own files on disk (an entry is about the size
#: of its IR: 3.5 GB for SD 1.5's fp32 U-Net, per set of shapes), the least recently used of any model going first:
#: twice holds one set of shapes of every component in each CPU precision
MAX_BYTES_PER_BUNDLE_BYTE = 2

Shapes = Mapping[str, list[int]]


@dataclasses.dataclass(frozen=True)
class Environment:
    """What a compiled model runs on: OpenVINO's version and the CPU it was compiled for."""

    openvino_version: str
    cpu_name: str
    cpu_capabilities: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        return {"openvino_version": self.openvino_version, "cpu_name": self.cpu_name, "cpu_capabilities": list(self.cpu_capabilities)}


@dataclasses.dataclass(frozen=True)
class CompiledKey:
    """Everything a compiled model depends on. `model` names the model compiled and its precision
    (`cache.compiled_name`); `shapes` are its inputs' static shapes sorted by name, None for any shapes."""

    component: Component
    model: str
    precision: str
    shapes: tuple[tuple[str, tuple[int, ...]], ...] | None
    guided_halves: bool
    environment: Environment

    @classmethod
    def create(cls, component: Component, model: str, precision: str, shapes: Shapes | None, guided_halves: bool,
               environment: Environment) -> CompiledKey:
        static = None if shapes is None else tuple(sorted((name, tuple(shape)) for name, shape in shapes.items()))
        return cls(component, model, precision, static, guided_halves, environment)

    @property
    def shape_dict(self) -> dict[str, list[int]] | None:
        return None if self.shapes is None else {name: list(shape) for name, shape in self.shapes}

    def to_json(self) -> dict[str, Any]:
        return {
            "component": self.component.value, "model": self.model, "precision": self.precision,
            "shapes": self.shape_dict, "guided_halves": self.guided_halves, "environment": self.environment.to_json(),
        }

    @property
    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.to_json(), sort_keys=True).encode()).hexdigest()


@dataclasses.dataclass(frozen=True)
class CompiledEntry:
    """A compiled model's directory in the cache: ENTRY_FILE (the key, and whether the guidance-prefix rewrite applied),
    IR_FILE (static shapes only: the model compiled) and BLOB_SUBDIR (OpenVINO's cache of the compiled model)."""

    directory: Path

    @classmethod
    def of(cls, model_directory: Path, key: CompiledKey) -> CompiledEntry:
        return cls(model_directory / ENTRIES_SUBDIR / key.digest[:16])

    @property
    def model_file(self) -> Path:
        return self.directory / IR_FILE

    @property
    def blob_dir(self) -> Path:
        return self.directory / BLOB_SUBDIR

    def record(self) -> dict[str, Any] | None:
        """The entry's record, None until its model compiled."""
        try:
            return json.loads((self.directory / ENTRY_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None

    def complete(self, key: CompiledKey) -> bool:
        record = self.record()
        return record is not None and record["key"] == key.to_json() and any(self.blob_dir.glob("*.blob"))

    def save_model(self, model: Any, guided_halves: bool) -> None:
        """Publish the static-shape model to compile (atomically: a concurrent or interrupted save leaves none)."""
        import openvino

        try:
            with atomic_directory(self.directory, replace=self.directory.exists()) as staging:
                openvino.save_model(model, str(staging / IR_FILE), compress_to_fp16=False)
                (staging / "model.json").write_text(json.dumps({"guided_halves": guided_halves}), encoding="utf-8")
        except FileExistsError:  # another process published it first
            pass

    def saved_guided_halves(self) -> bool:
        return bool(json.loads((self.directory / "model.json").read_text(encoding="utf-8"))["guided_halves"])

    def blob_state(self) -> frozenset[tuple[str, int, int]]:
        """The blobs' names, sizes and modification times: OpenVINO rewrites a blob it could not read (one an
        interrupted or concurrent compilation left partial), and a changed state tells that it compiled."""
        return frozenset((blob.name, stat.st_size, stat.st_mtime_ns) for blob in self.blob_dir.glob("*.blob") for stat in [blob.stat()])

    def mark_complete(self, key: CompiledKey, compile_seconds: float) -> None:
        with atomic_file(self.directory / ENTRY_FILE) as staging:
            staging.write_text(json.dumps({"key": key.to_json(), "compile_seconds": round(compile_seconds, 3)}), encoding="utf-8")

    def touch(self) -> None:
        """Mark the entry used now (entries are evicted least recently used first)."""
        try:
            os.utime(self.directory / ENTRY_FILE)
        except OSError:
            pass


def latest_entry(model_directory: Path, component: Component, model: str, precision: str,
                 environment: Environment) -> tuple[CompiledKey, float] | None:
    """The key of the most recently used complete entry of this model in this environment and when it was used
    (`os.stat`'s mtime), None if there is none."""
    candidates = []
    for directory in (model_directory / ENTRIES_SUBDIR).glob("*"):
        entry = CompiledEntry(directory)
        record = entry.record()
        if record is None:
            continue
        data = record["key"]
        if (data["component"], data["model"], data["precision"], data["environment"]) != (
            component.value, model, precision, environment.to_json()
        ):
            continue
        key = CompiledKey.create(component, model, precision, data["shapes"], bool(data["guided_halves"]), environment)
        if entry.complete(key) and entry == CompiledEntry.of(model_directory, key):
            candidates.append(((directory / ENTRY_FILE).stat().st_mtime, key))
    if not candidates:
        return None
    used_at, key = max(candidates, key=lambda candidate: candidate[0])
    return key, used_at


def evict_least_recent(keep: CompiledEntry, max_bytes: int) -> None:
    """Keep at most MAX_ENTRIES_PER_MODEL entries of `keep`'s model, and at most `max_bytes` of entries of all the
    models beside it, `keep` among them: the least recently used go first. A process that still runs a removed
    entry's model keeps it (its files stay open until it unloads); a later one compiles it again."""
    model_directory = keep.directory.parent.parent
    others = sorted((d for d in _entry_directories(model_directory) if d != keep.directory), key=_last_used, reverse=True)
    for directory in others[MAX_ENTRIES_PER_MODEL - 1:]:
        _remove(directory)
    every_model = [d for model in model_directory.parent.iterdir() if model.is_dir() for d in _entry_directories(model)]
    sizes = {directory: _directory_bytes(directory) for directory in every_model}
    total = sum(sizes.values())
    for directory in sorted((d for d in every_model if d != keep.directory), key=_last_used):
        if total <= max_bytes:
            break
        _remove(directory)
        total -= sizes[directory]


def _entry_directories(model_directory: Path) -> list[Path]:
    """A model's entries (staging directories of saves under way excluded)."""
    return [d for d in (model_directory / ENTRIES_SUBDIR).glob("*") if d.is_dir() and not d.name.startswith(".")]


def _last_used(directory: Path) -> float:
    try:
        return (directory / ENTRY_FILE).stat().st_mtime
    except OSError:
        return 0.0


def _directory_bytes(directory: Path) -> int:
    return sum(path.stat().st_size for path in directory.rglob("*") if path.is_file())


def _remove(directory: Path) -> None:
    logger.info("removing least recently used compiled model %s", directory)
    shutil.rmtree(directory, ignore_errors=True)
