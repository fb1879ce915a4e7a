"""What a TensorRT engine is valid for, as a key: a serialised engine runs only on the TensorRT version and GPU it was
built with, and computes only the model files, shapes and precision it was built from. Engines are stored and looked
up under this key, so a stale or foreign engine is never loaded."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from typing import Any

from sdrt.engine.backends.tensorrt.engines.profile import EngineProfile, Precision, ShapeRange
from sdrt.engine.specs import Component


@dataclasses.dataclass(frozen=True)
class GpuIdentity:
    """A GPU model as TensorRT tunes for it: its name and compute capability (major, minor)."""

    name: str
    compute_capability: tuple[int, int]

    def describe(self) -> str:
        return f"{self.name} (compute capability {self.compute_capability[0]}.{self.compute_capability[1]})"


@dataclasses.dataclass(frozen=True)
class BuildEnvironment:
    """The TensorRT version and GPU an engine is built on, and the only ones it may run on."""

    tensorrt_version: str
    gpu: GpuIdentity

    @property
    def slug(self) -> str:
        """A directory name unique to this environment, e.g. `trt10.3.0-nvidia-h100-80gb-hbm3-sm90`."""
        gpu = re.sub(r"[^a-z0-9]+", "-", self.gpu.name.lower()).strip("-")
        major, minor = self.gpu.compute_capability
        return f"trt{self.tensorrt_version}-{gpu}-sm{major}{minor}"

    def describe(self) -> str:
        return f"{self.gpu.describe()} with TensorRT {self.tensorrt_version}"

    def to_json(self) -> dict[str, Any]:
        return {"tensorrt_version": self.tensorrt_version, "gpu": self.gpu.name, "compute_capability": list(self.gpu.compute_capability)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> BuildEnvironment:
        major, minor = data["compute_capability"]
        return cls(data["tensorrt_version"], GpuIdentity(data["gpu"], (int(major), int(minor))))


@dataclasses.dataclass(frozen=True)
class EngineKey:
    """Everything one engine's build depends on. `model_digest` is the manifest's digest of the component's model
    files (Manifest.component_digest); `shapes` are its inputs' profile shapes sorted by input name (derived from
    `profile`, recorded so that a change in how sdrt derives them changes the key too)."""

    component: Component
    model_digest: str
    environment: BuildEnvironment
    profile: EngineProfile
    shapes: tuple[tuple[str, ShapeRange], ...]
    precision: Precision
    refittable: bool

    @property
    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.to_json(), sort_keys=True).encode()).hexdigest()

    @property
    def filename(self) -> str:
        return f"{self.component.value}-{self.digest[:16]}.plan"

    def with_precision(self, precision: Precision) -> EngineKey:
        return dataclasses.replace(self, precision=precision)

    def to_json(self) -> dict[str, Any]:
        return {
            "component": self.component.value,
            "model_digest": self.model_digest,
            "environment": self.environment.to_json(),
            "profile": self.profile.to_json(),
            "shapes": {name: shape.to_json() for name, shape in self.shapes},
            "precision": self.precision.value,
            "refittable": self.refittable,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> EngineKey:
        return cls(
            component=Component(data["component"]),
            model_digest=data["model_digest"],
            environment=BuildEnvironment.from_json(data["environment"]),
            profile=EngineProfile.from_json(data["profile"]),
            shapes=tuple(sorted((name, ShapeRange.from_json(shape)) for name, shape in data["shapes"].items())),
            precision=Precision(data["precision"]),
            refittable=bool(data["refittable"]),
        )
