"""Where a bundle's TensorRT engines live: `<bundle>/.cache/tensorrt/<environment>/`, one directory per TensorRT
version and GPU, holding each engine under its key's digest, the index of the last build, the persistent timing
cache, and a marker for each fp16 engine found to overflow. Every file is written atomically (temp file, rename)."""
from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sdrt.engine.atomic import atomic_file
from sdrt.engine.backends.tensorrt.engines.identity import BuildEnvironment, EngineKey
from sdrt.engine.backends.tensorrt.engines.profile import EngineProfile, Precision
from sdrt.engine.specs import Component

logger = logging.getLogger(__name__)

CACHE_SUBDIR = ".cache/tensorrt"  # not a bundle file: the manifest never lists .cache
INDEX_FILE = "engines.json"
INDEX_FORMAT = 1
TIMING_CACHE_FILE = "timing.cache"
FP16_OVERFLOW_SUFFIX = ".fp16-overflow"


@dataclasses.dataclass(frozen=True)
class EngineIndex:
    """One `sdrt build-engines` run: what it was asked for, and the key of each component's engine (a VAE may be
    fp32 in an fp16 build, when fp16 overflowed)."""

    environment: BuildEnvironment
    profile: EngineProfile
    precision: Precision
    refittable: bool
    engines: Mapping[Component, EngineKey]

    def to_json(self) -> dict[str, Any]:
        return {
            "format": INDEX_FORMAT,
            "environment": self.environment.to_json(),
            "profile": self.profile.to_json(),
            "precision": self.precision.value,
            "refittable": self.refittable,
            "engines": {component.value: key.to_json() for component, key in self.engines.items()},
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> EngineIndex:
        return cls(
            environment=BuildEnvironment.from_json(data["environment"]),
            profile=EngineProfile.from_json(data["profile"]),
            precision=Precision(data["precision"]),
            refittable=bool(data["refittable"]),
            engines={Component(name): EngineKey.from_json(key) for name, key in data["engines"].items()},
        )


def read_index(path: Path) -> EngineIndex | None:
    """The index at `path`, or None if it is absent, unreadable or of another format (the engines then count as
    not built, and a build replaces it)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("format") != INDEX_FORMAT:
            raise ValueError(f"index format {data.get('format')!r}, this sdrt reads {INDEX_FORMAT}")
        return EngineIndex.from_json(data)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        logger.warning("ignoring the TensorRT engine index %s: %s", path, exc)
        return None


class EngineStore:
    """The engines of the bundle at `bundle_dir` for one build environment."""

    def __init__(self, bundle_dir: Path, environment: BuildEnvironment) -> None:
        self.bundle_dir = Path(bundle_dir)
        self.environment = environment
        self.directory = self.bundle_dir / CACHE_SUBDIR / environment.slug

    @property
    def timing_cache_path(self) -> Path:
        """TensorRT's measured kernel timings for this GPU and version, kept across builds to speed up the next."""
        return self.directory / TIMING_CACHE_FILE

    def engine_path(self, key: EngineKey) -> Path:
        return self.directory / key.filename

    def has_engine(self, key: EngineKey) -> bool:
        return self.engine_path(key).is_file()

    def write_engine(self, key: EngineKey, plan: Any) -> Path:
        """Store a serialised engine (bytes or a buffer such as TensorRT's IHostMemory) under `key`."""
        path = self.engine_path(key)
        with atomic_file(path) as staging, open(staging, "wb") as f:
            f.write(plan)
        return path

    def mark_fp16_overflow(self, key: EngineKey) -> None:
        """Record that the fp16 engine of `key` yields NaN or infinity, so later builds go straight to fp32."""
        with atomic_file(self.engine_path(key).with_suffix(FP16_OVERFLOW_SUFFIX)) as staging:
            staging.write_text(json.dumps(key.to_json(), sort_keys=True), encoding="utf-8")

    def fp16_overflowed(self, key: EngineKey) -> bool:
        return self.engine_path(key).with_suffix(FP16_OVERFLOW_SUFFIX).is_file()

    def read_index(self) -> EngineIndex | None:
        return read_index(self.directory / INDEX_FILE)

    def write_index(self, index: EngineIndex) -> None:
        with atomic_file(self.directory / INDEX_FILE) as staging:
            staging.write_text(json.dumps(index.to_json(), indent=2, sort_keys=True) + "\n", encoding="utf-8")


def built_environments(bundle_dir: Path) -> list[BuildEnvironment]:
    """The environments that engines of this bundle were built for, whatever this machine is."""
    root = Path(bundle_dir) / CACHE_SUBDIR
    indexes = (read_index(path) for path in sorted(root.glob(f"*/{INDEX_FILE}")))
    return [index.environment for index in indexes if index is not None]
