"""Whether built TensorRT engines fit this bundle, this GPU and TensorRT, and a request; and when not, the one
command that fixes it. Engines that do not fit are refused with that command, never loaded."""
from __future__ import annotations

import shlex
from collections.abc import Mapping
from pathlib import Path

from sdrt.engine.backends.tensorrt.engines.identity import BuildEnvironment
from sdrt.engine.backends.tensorrt.engines.profile import EngineProfile, Precision
from sdrt.engine.backends.tensorrt.engines.store import EngineIndex, EngineStore, built_environments
from sdrt.engine.errors import EnginesNotBuiltError, InvalidArgumentError, ProfileMismatchError
from sdrt.engine.specs import Component


def build_command(
    bundle_dir: Path, profile: EngineProfile | None = None, precision: Precision = Precision.FP16, refittable: bool = False
) -> str:
    """The `sdrt build-engines` command line that builds engines for `profile` (None: the default profile)."""
    words = ["sdrt", "build-engines", str(bundle_dir)]
    if profile is not None:
        words += ["--batch", str(profile.batch), "--height", str(profile.height), "--width", str(profile.width)]
    if precision is not Precision.FP16:
        words += ["--precision", precision.value]
    if refittable:
        words.append("--refittable")
    return shlex.join(words)


def resolve_engines(bundle_dir: Path, digests: Mapping[Component, str], environment: BuildEnvironment) -> tuple[EngineStore, EngineIndex]:
    """The store and index of engines for every component in `digests` (component -> Manifest.component_digest),
    built in `environment` from exactly these model files; raise EnginesNotBuiltError saying what is missing,
    foreign or stale, and which command rebuilds it."""
    store = EngineStore(bundle_dir, environment)
    index = store.read_index()
    if index is None:
        others = [other.describe() for other in built_environments(bundle_dir) if other != environment]
        elsewhere = f" (there are engines for {'; '.join(others)})" if others else ""
        raise EnginesNotBuiltError(
            f"TensorRT engines are not built for this GPU, {environment.describe()}, in {bundle_dir}{elsewhere}: "
            f"run `{build_command(bundle_dir)}`"
        )
    rebuild = build_command(bundle_dir, index.profile, index.precision, index.refittable)
    for component, digest in digests.items():
        key = index.engines.get(component)
        if key is None:
            problem = f"it has no {component.value} engine"
        elif key.environment != environment:
            problem = f"its {component.value} engine was built for {key.environment.describe()}"
        elif key.model_digest != digest:
            problem = f"its {component.value} engine was built from other model files (the bundle was re-exported since)"
        elif not store.has_engine(key):
            problem = f"its {component.value} engine file {store.engine_path(key).name} is missing"
        else:
            continue
        raise EnginesNotBuiltError(f"the TensorRT engines in {store.directory} are stale: {problem}: rebuild them with `{rebuild}`")
    return store, index


def check_request(index: EngineIndex, bundle_dir: Path, num_images: int, height: int, width: int) -> None:
    """Raise ProfileMismatchError if a request of `num_images` images of height x width pixels is outside the
    profile the engines were built for, naming the range and the command that rebuilds them to cover it."""
    profile = index.profile
    for parameter, value, allowed, what in (
        ("batch", num_images, profile.batch, "images per request (prompts x num_images_per_prompt)"),
        ("height", height, profile.height, "pixels"),
        ("width", width, profile.width, "pixels"),
    ):
        if not allowed.contains(value):
            covering = profile.covering(num_images, height, width)
            raise ProfileMismatchError(
                parameter,
                f"{value} {what} is outside the {allowed.describe()} the TensorRT engines were built for "
                f"({profile.describe()}): rebuild them for it with "
                f"`{build_command(bundle_dir, covering, index.precision, index.refittable)}`",
            )


def check_context_length(index: EngineIndex, length: int) -> None:
    """Raise InvalidArgumentError if the U-Net engine cannot take a text context of `length` tokens. Engines are
    built for one text-encoder window (profiles have no axis for long prompts' extra chunks), so a long prompt
    needing more is refused, naming the limit and the backends that run it."""
    shapes = dict(index.engines[Component.UNET].shapes)["encoder_hidden_states"]
    low, high = shapes.min[1], shapes.max[1]
    if not low <= length <= high:
        raise InvalidArgumentError(
            "prompt",
            f"needs a text context of {length} tokens, but the TensorRT U-Net engine takes {low if low == high else f'{low}-{high}'} "
            "(one text-encoder window): TensorRT engines do not run long prompts (PromptOptions(long_prompts=True)) "
            "beyond one window; shorten the prompt, or use another backend, e.g. backend=\"cuda\"",
        )
