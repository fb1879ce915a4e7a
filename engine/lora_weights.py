"""Apply LoRA deltas to a loaded backend's weights, and restore the bundle's: what `pipe.load_lora` runs.

The deltas (engine/lora.py) name diffusers parameters; the component's refit map (engine/refit_map.py) gives each
one's ONNX initializer and whether it is stored transposed. The backend is given base + delta for every patched
initializer as the component's whole set of overrides (`Backend.set_weights`), so a LoRA always applies to the
bundle's own weights, never on top of the previous LoRA. Base values are read from the bundle's ONNX as needed and
kept.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from sdrt.engine.backends import Backend
from sdrt.engine.errors import LoraError, NoRefitMapError
from sdrt.engine.lora import lora_components, lora_deltas
from sdrt.engine.manifest import Manifest
from sdrt.engine.onnx_weights import read_initializers
from sdrt.engine.refit_map import REFITTABLE_COMPONENTS, RefitEntry, read_refit_map
from sdrt.engine.specs import Component

logger = logging.getLogger(__name__)


class LoraWeights:
    """The LoRA state of one pipeline's backend: which initializers hold patched values, and their base values."""

    def __init__(self, bundle_dir: Path, manifest: Manifest, backend: Backend) -> None:
        self._bundle_dir = Path(bundle_dir)
        self._manifest = manifest
        self._backend = backend
        self._refit_maps: dict[Component, dict[str, RefitEntry]] = {}
        self._base: dict[Component, dict[str, np.ndarray]] = {}  # initializer -> the bundle's value
        self._patched: set[Component] = set()  # components running with LoRA weights now

    def _components(self) -> list[Component]:
        return [c for c in REFITTABLE_COMPONENTS if c in self._manifest.components]

    def _refit_map(self, component: Component) -> dict[str, RefitEntry]:
        if component not in self._refit_maps:
            entry = self._manifest.components[component]
            if entry.refit_map is None:
                raise NoRefitMapError(
                    f"bundle {self._bundle_dir} has no refit map for {component.value} (exported by an sdrt without LoRA "
                    "support): re-export it with `sdrt export CHECKPOINT OUT_DIR --force` to use load_lora"
                )
            self._refit_maps[component] = read_refit_map(self._bundle_dir / entry.refit_map)
        return self._refit_maps[component]

    def _base_weights(self, component: Component, names: set[str]) -> dict[str, np.ndarray]:
        base = self._base.setdefault(component, {})
        missing = names - base.keys()
        if missing:
            base.update(read_initializers(self._bundle_dir / self._manifest.components[component].file, missing))
        return {name: base[name] for name in names}

    @property
    def active(self) -> bool:
        """Whether some component runs with LoRA weights now."""
        return bool(self._patched)

    def apply(self, path: str | os.PathLike | None, scale: float) -> None:
        """Patch the backend with the LoRA at `path` times `scale` (None: no LoRA, the bundle's weights). Every
        delta is computed and checked before the backend is changed, so a failing file leaves the weights as they
        were. Scale 0 is checked the same way and then gives the bundle's own model, bit for bit."""
        if path is None and not self._patched:
            return  # nothing to restore (and an old bundle without refit maps needs none)
        components = self._components()
        # only the components the file names need a refit map: an SDXL bundle exported before its second text
        # encoder had one still takes U-Net and first-encoder LoRAs
        named = lora_components(path) if path is not None else set()
        maps = {component: self._refit_map(component) for component in components if component in named}
        deltas = lora_deltas(path, scale, {c: m.keys() for c, m in maps.items()}) if path is not None else {}
        if scale == 0:
            deltas = {}
        overrides: dict[Component, dict[str, np.ndarray]] = {}
        for component in components:
            targets = {maps[component][parameter]: delta for parameter, delta in deltas.get(component, {}).items()}
            base = self._base_weights(component, {entry.initializer for entry in targets})
            overrides[component] = {}
            for entry, delta in targets.items():
                delta = delta.T if entry.transposed else delta  # (in, out) as MatMul holds a Linear's weight
                if delta.shape != base[entry.initializer].shape:
                    raise LoraError(f"{path}: {component.value} delta of shape {delta.shape} does not fit initializer "
                                    f"{entry.initializer} {base[entry.initializer].shape}: the LoRA is for another model")
                overrides[component][entry.initializer] = base[entry.initializer] + delta
        for component, component_overrides in overrides.items():
            if component_overrides or component in self._patched:
                self._backend.set_weights(component, component_overrides)
            if component_overrides:
                self._patched.add(component)
            else:
                self._patched.discard(component)
        logger.info("LoRA %s (scale %g) applied to backend %s", path, scale, self._backend.name)
