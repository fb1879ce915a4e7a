"""Open a bundle: read and verify its manifest, then wire tokenizer, scheduler and backend into a pipeline."""
from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Collection
from pathlib import Path

from sdrt.engine.backends import Backend, ComponentFile, MemoryPolicy, backend_class
from sdrt.engine.errors import InvalidArgumentError
from sdrt.engine.host_memory import MemoryBudget, process_rss_bytes
from sdrt.engine.manifest import Manifest, read_manifest, verify_files
from sdrt.engine.pipeline import StableDiffusionPipeline
from sdrt.engine.safety_checker import SafetyChecker, SafetyPolicy
from sdrt.engine.schedulers import scheduler_from_config
from sdrt.engine.specs import DEEPCACHE_PASSES, Component
from sdrt.engine.tokenizer import CLIPTokenizer

logger = logging.getLogger(__name__)


def load(
    bundle_dir: str | os.PathLike,
    backend: str = "auto",
    safety_checker: bool | str = True,
    memory: str | MemoryPolicy = MemoryPolicy.KEEP_LOADED,
    memory_budget: MemoryBudget | None = MemoryBudget(),
    deepcache: bool | None = None,
) -> StableDiffusionPipeline:
    """Load the bundle at `bundle_dir` for inference.

    `backend`: "auto" (the fastest available: "tensorrt" where `sdrt build-engines` built engines of this bundle
    for this GPU, then "cuda-fp16" where the bundle has fp16 variants (`sdrt export --fp16-onnx`), then "cuda",
    then the CPU backends), "exact" (the fastest fp32 one) or a backend name, e.g. "onnxruntime-cpu".
    `safety_checker`: True or "block" (default) checks every image with the bundle's NSFW checker and replaces
    flagged ones with black images; "flag" returns flagged images unchanged with their flag; False or "off" skips
    the checker. Bundles exported without a checker report nsfw_content_detected = None.
    `memory`: "keep-loaded" (default) keeps each component loaded after first use; "one-at-a-time" keeps only the
    component in use, for the lowest peak memory at the cost of reloading each stage's model per request.
    `memory_budget`: requests whose estimated peak memory is over it are refused when validated (default: 0.8 of
    the memory available when each request is validated); None: no check.
    Compiled models the backend's cache holds (OpenVINO: those of the shapes used last) are loaded here, so that
    the first request only runs them; `pipe.backend.model_loads` lists each model loaded or compiled and its time.
    `deepcache`: which U-Net passes are loaded here: True, DeepCache's (for requests with `deepcache=`; the U-Net
    where the bundle has none); False, the U-Net; None (default), those of the kind of request the bundle ran last.
    Requests of either kind run whatever was loaded; the other kind's first request loads its passes.
    Every bundle file is checked against its size and sha256 in the manifest first: a missing, truncated or
    modified file raises BundleError (a ValueError) naming it. Hashes are recorded in the bundle's cache, so a
    later load re-hashes only files whose size, modification or change time differ.
    """
    memory_policy = _memory_policy(memory)
    if deepcache is not None and not isinstance(deepcache, bool):
        raise InvalidArgumentError("deepcache", f"must be True, False or None, got {deepcache!r:.80}")
    policy = SafetyPolicy.from_argument(safety_checker)
    bundle_dir = Path(bundle_dir)
    manifest = read_manifest(bundle_dir)
    verify_files(bundle_dir, manifest)
    components = component_files(bundle_dir, manifest)
    backend_type = backend_class(backend, bundle_dir, components)
    chosen = backend_type(bundle_dir, components, memory_policy)
    opened_rss_bytes = process_rss_bytes() or 0  # the memory estimate's base: before the preloaded models, which it counts
    _preload(chosen, _preloaded_components(components.keys(), policy, deepcache))
    logger.info("loaded bundle %s with backend %s, memory policy %s", bundle_dir, chosen.name, memory_policy.value)
    checker = None
    if policy is SafetyPolicy.OFF:
        # Nothing is disabled where the bundle has no checker (the demo model): not worth a warning on every load.
        logger.log(logging.WARNING if manifest.safety_checker is not None else logging.INFO,
                   "safety checker disabled at load: images are not checked for NSFW content")
    elif manifest.safety_checker is None:
        logger.warning("bundle %s has no safety checker: nsfw_content_detected will be None", bundle_dir)
    else:
        checker = SafetyChecker.from_bundle(
            chosen, bundle_dir, manifest.safety_checker.concepts_file, manifest.safety_checker.preprocessor_config_file
        )
        logger.info("safety checker on, policy %s", policy.value)
    # Read once, here, right after verify_files checked its sha256: named samplers are built from this dict later.
    scheduler_config = json.loads((bundle_dir / manifest.scheduler_config_file).read_text(encoding="utf-8"))
    return StableDiffusionPipeline(
        bundle_dir=bundle_dir,
        manifest=manifest,
        backend=chosen,
        tokenizer=CLIPTokenizer.from_directory(bundle_dir / manifest.tokenizer.directory),
        scheduler=scheduler_from_config(scheduler_config),
        safety_checker=checker,
        safety_policy=policy,
        scheduler_config=scheduler_config,
        memory_budget=memory_budget,
        tokenizer_2=CLIPTokenizer.from_directory(bundle_dir / manifest.sdxl.tokenizer_2.directory) if manifest.sdxl else None,
        opened_rss_bytes=opened_rss_bytes,
    )


def _preload(backend: Backend, components: Collection[Component]) -> None:
    """Load the compiled models the backend's cache holds, so that the first request only runs them; log what was
    loaded and what took how long (every model's load stays in `backend.model_loads`, later compilations included)."""
    start = time.perf_counter()
    loads = backend.preload(frozenset(components))
    if loads:
        logger.info("%s: loaded %d compiled models from the cache in %.2f s (%s)", backend.name, sum(l.from_cache for l in loads),
                    time.perf_counter() - start, "; ".join(load.describe() for load in loads))


def _preloaded_components(components: Collection[Component], policy: SafetyPolicy, deepcache: bool | None) -> frozenset[Component]:
    """What load() loads of the bundle's components: the safety checker where it runs, and the U-Net passes of the
    kind of request asked for (`deepcache`; None: both kinds, of which the backend loads those used last)."""
    skipped = {Component.SAFETY_CHECKER} if policy is SafetyPolicy.OFF else set()
    if deepcache is not None and DEEPCACHE_PASSES <= set(components):
        skipped |= {Component.UNET} if deepcache else DEEPCACHE_PASSES
    return frozenset(components) - skipped


def component_files(bundle_dir: Path, manifest: Manifest) -> dict[Component, ComponentFile]:
    """What the backends are given of each component: its files in the bundle and their digest."""
    return {
        component: ComponentFile(
            bundle_dir / entry.file, manifest.component_digest(component), bundle_dir / entry.fp16.file if entry.fp16 else None
        )
        for component, entry in manifest.components.items()
    }


def _memory_policy(value: str | MemoryPolicy) -> MemoryPolicy:
    try:
        return MemoryPolicy(value)
    except ValueError:
        raise InvalidArgumentError("memory", f"must be one of {[m.value for m in MemoryPolicy]}, got {value!r}") from None
