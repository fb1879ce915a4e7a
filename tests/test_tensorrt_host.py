"""The NVIDIA path's host logic, on any machine: engine profiles and the shapes they give each component, engine keys
and their invalidation, the engine store and its build orchestration (with a fake compiler), out-of-profile
requests, the per-shape LRU, the TensorRT runner's buffer/graph bookkeeping (with fake tensorrt and cuda-python
modules), the backend order and its reasons, and that sdrt imports without tensorrt or cuda-python."""
from __future__ import annotations

import dataclasses
import gc
import importlib.util
import json
import logging
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

import sdrt.engine.cuda_device as cuda_device
from sdrt.engine.backends import (
    BACKENDS,
    ComponentFile,
    OnnxRuntimeCUDABackend,
    OnnxRuntimeCUDAFP16Backend,
    TensorRTBackend,
    backend_class,
)
from sdrt.engine.backends.tensorrt import backend as tensorrt_backend
from sdrt.cli.main import main
from sdrt.engine.backends.tensorrt import cuda as cuda_module
from sdrt.engine.backends.tensorrt import runner as runner_module
from sdrt.engine.backends.tensorrt.engines.compatibility import build_command, check_context_length, check_request, resolve_engines
from sdrt.engine.backends.tensorrt.engines.identity import BuildEnvironment, EngineKey, GpuIdentity
from sdrt.engine.backends.tensorrt.engines.profile import (
    AxisRange,
    EngineProfile,
    Precision,
    ShapeRange,
    axis_ranges,
    component_shapes,
    default_profile,
)
from sdrt.engine.backends.tensorrt.engines.store import CACHE_SUBDIR, INDEX_FILE, EngineStore
from sdrt.engine.backends.tensorrt.lru import LRUCache
from sdrt.engine.errors import (
    BackendUnavailableError,
    BundleError,
    EnginesNotBuiltError,
    GpuError,
    InvalidArgumentError,
    ProfileMismatchError,
)
from sdrt.engine.manifest import (
    FORMAT_VERSION,
    ComponentEntry,
    FileEntry,
    Manifest,
    ModelConfig,
    TensorEntry,
    TokenizerConfig,
    describe_files,
    read_manifest,
    verify_files,
)
from sdrt.engine.pipeline import StableDiffusionPipeline
from sdrt.engine.safety_checker import SafetyPolicy
from sdrt.engine.specs import DYNAMIC_AXES, FP16_DEFAULT_COMPONENTS, SPECS, Component
from sdrt.export import tensorrt_build
from sdrt.export.errors import EngineBuildError
from sdrt.export.tensorrt_build import build_engines

SD15 = ModelConfig(latent_channels=4, vae_scale_factor=8, vae_scaling_factor=0.18215, sample_size=64, text_hidden_size=768, max_image_size=2048)
# Another shape of model: 4x VAE, 8 latent channels, 768 px default, wider text encoder.
OTHER = ModelConfig(latent_channels=8, vae_scale_factor=4, vae_scaling_factor=0.13, sample_size=192, text_hidden_size=1024, max_image_size=2048)
H100 = BuildEnvironment("10.3.0", GpuIdentity("NVIDIA H100 80GB HBM3", (9, 0)))
A100 = BuildEnvironment("10.3.0", GpuIdentity("NVIDIA A100-SXM4-80GB", (8, 0)))
SD15_PROFILE = default_profile(SD15)
TEXT_LENGTH = 77  # the fake bundles' text-encoder window (their tokenizer's model_max_length)
BUNDLE_COMPONENTS = (Component.TEXT_ENCODER, Component.UNET, Component.VAE_DECODER)


# ---- fake bundles: a manifest and small files in place of ONNX, which the host logic only hashes ------------------
def _entry(component: Component, model: ModelConfig) -> ComponentEntry:
    fixed = {"sequence": TEXT_LENGTH, "hidden": model.text_hidden_size, "latent_channels": model.latent_channels, "rgb": 3,
             "latent_moments": 2 * model.latent_channels, "clip_height": 224, "clip_width": 224, "projection": 768}

    def tensors(specs):
        return tuple(TensorEntry(t.name, t.dtype, tuple(a if a in DYNAMIC_AXES else fixed[a] for a in t.axes)) for t in specs)

    spec = SPECS[component]
    return ComponentEntry(spec.filename, tensors(spec.inputs), tensors(spec.outputs), opset=17, export_max_abs_diff=0.0)


def _write_manifest(bundle: Path, model: ModelConfig, components=BUNDLE_COMPONENTS) -> Manifest:
    manifest = Manifest(FORMAT_VERSION, "test", "none", model, TokenizerConfig("tokenizer", TEXT_LENGTH, "<|endoftext|>"),
                        "scheduler/scheduler_config.json", None, {c: _entry(c, model) for c in components}, describe_files(bundle))
    manifest.write(bundle)
    return manifest


def _fake_bundle(root: Path, model: ModelConfig = SD15, components=BUNDLE_COMPONENTS) -> Path:
    bundle = root / "bundle"
    for component in components:
        (bundle / component.value).mkdir(parents=True)
        (bundle / SPECS[component].filename).write_bytes(f"{component.value} graph".encode())
    (bundle / "unet/model.onnx.data").write_bytes(b"unet weights v1")
    _write_manifest(bundle, model, components)
    return bundle


def _digests(bundle: Path) -> dict[Component, str]:
    manifest = read_manifest(bundle)
    return {component: manifest.component_digest(component) for component in manifest.components}


def _component_files(bundle: Path) -> dict[Component, ComponentFile]:
    return {c: ComponentFile(bundle / SPECS[c].filename, digest) for c, digest in _digests(bundle).items()}


class FakeCompiler:
    """Builds "engines" that name their component and precision; `overflow` components return NaN in fp16."""

    def __init__(self, environment: BuildEnvironment = H100, overflow: frozenset[str] = frozenset(), fail_on: str | None = None,
                 plan: bytes | None = None) -> None:
        self.environment = environment
        self.plan = plan  # every engine's bytes, if given
        self.overflow = overflow
        self.fail_on = fail_on
        self.compiled: list[tuple[str, Precision, bool]] = []
        self.shapes: dict[str, dict[str, ShapeRange]] = {}
        self.ran: list[bytes] = []
        self.timing_cache_seen: list[bool] = []

    def compile(self, onnx_path, shapes, precision, refittable, timing_cache):
        component = onnx_path.parent.name
        if component == self.fail_on:
            raise EngineBuildError(f"TensorRT could not build an engine from {onnx_path}")
        self.compiled.append((component, precision, refittable))
        self.shapes[component] = dict(shapes)
        self.timing_cache_seen.append(timing_cache.is_file())
        timing_cache.parent.mkdir(parents=True, exist_ok=True)
        timing_cache.write_bytes(b"timings")
        return self.plan or f"{component}:{precision.value}".encode()

    def run(self, plan, feeds):
        self.ran.append(plan)
        component, precision = plan.decode().split(":")
        self.probed = {**getattr(self, "probed", {}), component: feeds}
        assert all(np.isfinite(feed).all() for feed in feeds.values())
        shape = next(iter(feeds.values())).shape
        return [np.full(shape, np.nan if component in self.overflow and precision == "fp16" else 0.5, np.float32)]


# ---- profiles and shapes ------------------------------------------------------------------------------------------
def test_default_profile_spans_half_to_twice_the_models_default_size() -> None:
    assert SD15_PROFILE == EngineProfile(AxisRange(1, 1, 4), AxisRange(256, 512, 1024), AxisRange(256, 512, 1024))
    assert default_profile(OTHER).height == AxisRange(384, 768, 1536)
    demo = dataclasses.replace(SD15, sample_size=8)  # the 64 px demo model
    assert default_profile(demo).width == AxisRange(32, 64, 128)
    capped = dataclasses.replace(OTHER, max_image_size=1000)
    assert default_profile(capped).height == AxisRange(384, 768, 1000)


@pytest.mark.parametrize(("axes", "parameter", "message"), [
    ({"batch": AxisRange(2, 1, 4)}, "batch", "1 <= min <= opt <= max, got min 2, opt 1, max 4"),
    ({"batch": AxisRange(0, 0, 0)}, "batch", "1 <= min"),
    ({"height": AxisRange(256, 512, 256)}, "height", "opt 512, max 256"),
    ({"width": AxisRange(256.0, 512, 1024)}, "width", "integers"),
])
def test_profile_ranges_are_validated(axes, parameter, message) -> None:
    with pytest.raises(InvalidArgumentError, match=message) as error:
        dataclasses.replace(SD15_PROFILE, **axes)
    assert error.value.parameter == parameter


@pytest.mark.parametrize(("axes", "parameter", "message"), [
    ({"height": AxisRange(252, 512, 1024)}, "height", "must each be a multiple of 8 in 128..2048, got 252:512:1024"),
    ({"width": AxisRange(256, 512, 4096)}, "width", "must each be a multiple of 8 in 128..2048"),
])
def test_profile_sizes_must_suit_the_model(axes, parameter, message) -> None:
    with pytest.raises(InvalidArgumentError, match=message) as error:
        dataclasses.replace(SD15_PROFILE, **axes).validate_for(SD15)
    assert error.value.parameter == parameter
    dataclasses.replace(SD15_PROFILE, height=AxisRange(252, 512, 1024)).validate_for(OTHER)  # a multiple of OTHER's 4


def test_component_shapes_come_from_the_manifest_and_profile() -> None:
    unet = component_shapes(Component.UNET, _entry(Component.UNET, SD15), SD15, SD15_PROFILE, TEXT_LENGTH)
    # The U-Net runs [uncond; cond]: twice the images, and the images alone when guidance_scale <= 1.
    assert unet["sample"] == ShapeRange((1, 4, 32, 32), (2, 4, 64, 64), (8, 4, 128, 128))
    assert unet["timestep"] == ShapeRange((1,), (2,), (8,))
    assert unet["encoder_hidden_states"] == ShapeRange((1, 77, 768), (2, 77, 768), (8, 77, 768))
    text = component_shapes(Component.TEXT_ENCODER, _entry(Component.TEXT_ENCODER, SD15), SD15, SD15_PROFILE, TEXT_LENGTH)
    assert text == {"input_ids": ShapeRange((1, 77), (1, 77), (4, 77))}
    vae = component_shapes(Component.VAE_DECODER, _entry(Component.VAE_DECODER, SD15), SD15, SD15_PROFILE, TEXT_LENGTH)
    assert vae == {"latent_sample": ShapeRange((1, 4, 32, 32), (1, 4, 64, 64), (4, 4, 128, 128))}
    encoder = component_shapes(Component.VAE_ENCODER, _entry(Component.VAE_ENCODER, SD15), SD15, SD15_PROFILE, TEXT_LENGTH)
    assert encoder == {"sample": ShapeRange((1, 3, 256, 256), (1, 3, 512, 512), (4, 3, 1024, 1024))}
    checker = component_shapes(Component.SAFETY_CHECKER, _entry(Component.SAFETY_CHECKER, SD15), SD15, SD15_PROFILE, TEXT_LENGTH)
    assert checker == {"clip_input": ShapeRange((1, 3, 224, 224), (1, 3, 224, 224), (4, 3, 224, 224))}


def test_component_shapes_follow_another_model() -> None:
    profile = default_profile(OTHER)
    unet = component_shapes(Component.UNET, _entry(Component.UNET, OTHER), OTHER, profile, TEXT_LENGTH)
    assert unet["sample"] == ShapeRange((1, 8, 96, 96), (2, 8, 192, 192), (8, 8, 384, 384))
    assert unet["encoder_hidden_states"].max == (8, 77, 1024)


def test_static_profile_fixes_every_size_but_the_guided_unet_batch() -> None:
    profile = EngineProfile.static(2, 512, 768)
    assert profile.batch == AxisRange(2, 2, 2) and profile.width == AxisRange(768, 768, 768)
    vae = component_shapes(Component.VAE_DECODER, _entry(Component.VAE_DECODER, SD15), SD15, profile, TEXT_LENGTH)
    assert vae["latent_sample"] == ShapeRange(*[(2, 4, 64, 96)] * 3)
    unet = component_shapes(Component.UNET, _entry(Component.UNET, SD15), SD15, profile, TEXT_LENGTH)
    assert unet["sample"] == ShapeRange((2, 4, 64, 96), (4, 4, 64, 96), (4, 4, 64, 96))


def test_every_dynamic_axis_has_a_rule_and_unknown_axes_are_refused() -> None:
    for component in Component:
        assert set(axis_ranges(component, SD15, SD15_PROFILE, TEXT_LENGTH)) == DYNAMIC_AXES
    entry = _entry(Component.UNET, SD15)
    odd = dataclasses.replace(entry, inputs=(TensorEntry("sample", "float32", ("frames", 4, "latent_height", "latent_width")),))
    with pytest.raises(BundleError, match="dynamic axis 'frames'"):
        component_shapes(Component.UNET, odd, SD15, SD15_PROFILE, TEXT_LENGTH)


# ---- keys ---------------------------------------------------------------------------------------------------------
def _key(**changes) -> EngineKey:
    shapes = component_shapes(Component.UNET, _entry(Component.UNET, SD15), SD15, SD15_PROFILE, TEXT_LENGTH)
    key = EngineKey(Component.UNET, "ab" * 32, H100, SD15_PROFILE, tuple(sorted(shapes.items())), Precision.FP16, False)
    return dataclasses.replace(key, **changes)


def test_engine_key_changes_with_everything_an_engine_depends_on() -> None:
    variants = [
        _key(),
        _key(model_digest="cd" * 32),
        _key(environment=dataclasses.replace(H100, tensorrt_version="10.4.0")),
        _key(environment=A100),
        _key(environment=BuildEnvironment("10.3.0", GpuIdentity(H100.gpu.name, (9, 1)))),
        _key(profile=EngineProfile.static(1, 512, 512)),
        _key(shapes=()),
        _key(precision=Precision.FP32),
        _key(refittable=True),
    ]
    digests = [key.digest for key in variants]
    assert len(set(digests)) == len(variants)
    assert len({key.filename for key in variants}) == len(variants)
    assert _key().digest == _key().digest and _key().filename.startswith("unet-")
    assert EngineKey.from_json(json.loads(json.dumps(_key().to_json()))) == _key()


def test_environment_slug_names_tensorrt_gpu_and_compute_capability() -> None:
    assert H100.slug == "trt10.3.0-nvidia-h100-80gb-hbm3-sm90"
    assert H100.slug != A100.slug != dataclasses.replace(A100, tensorrt_version="10.0.1").slug


def test_component_digest_covers_external_weights_and_only_its_component(tmp_path: Path) -> None:
    bundle = _fake_bundle(tmp_path)
    before = _digests(bundle)
    (bundle / "unet/model.onnx.data").write_bytes(b"unet weights v2")  # same size, same .onnx: only the weights
    _write_manifest(bundle, SD15)
    after = _digests(bundle)
    assert after[Component.UNET] != before[Component.UNET]
    assert after[Component.TEXT_ENCODER] == before[Component.TEXT_ENCODER]
    manifest = read_manifest(bundle)
    files = dict(manifest.files, **{"unet/model.onnx": FileEntry(1, "0" * 64)})
    assert dataclasses.replace(manifest, files=files).component_digest(Component.UNET) != after[Component.UNET]


# ---- building and the store ---------------------------------------------------------------------------------------
def test_build_stores_every_engine_and_a_rerun_reuses_them(tmp_path: Path) -> None:
    bundle = _fake_bundle(tmp_path)
    compiler = FakeCompiler()
    directory = build_engines(bundle, compiler=compiler)
    assert directory == bundle / CACHE_SUBDIR / H100.slug
    assert sorted(c for c, _, _ in compiler.compiled) == ["text_encoder", "unet", "vae_decoder"]
    assert all(p is Precision.FP16 for _, p, _ in compiler.compiled)
    assert compiler.shapes["unet"]["sample"].max == (8, 4, 128, 128)  # the default profile, from the manifest
    assert compiler.timing_cache_seen == [False, True, True]  # one timing cache, carried from build to build
    store, index = resolve_engines(bundle, _digests(bundle), H100)
    assert index.profile == SD15_PROFILE and set(index.engines) == set(BUNDLE_COMPONENTS)
    assert store.engine_path(index.engines[Component.UNET]).read_bytes() == b"unet:fp16"
    assert build_engines(bundle, compiler=compiler) == directory
    assert len(compiler.compiled) == 3  # nothing rebuilt
    verify_files(bundle, read_manifest(bundle))  # the cache is not a bundle file


def test_re_exported_model_makes_its_engine_stale_until_rebuilt(tmp_path: Path) -> None:
    bundle = _fake_bundle(tmp_path)
    compiler = FakeCompiler()
    build_engines(bundle, compiler=compiler)
    (bundle / "unet/model.onnx.data").write_bytes(b"unet weights v2")
    _write_manifest(bundle, SD15)
    with pytest.raises(EnginesNotBuiltError, match=r"unet engine was built from other model files .*`sdrt build-engines ") as error:
        resolve_engines(bundle, _digests(bundle), H100)
    assert "--batch 1:1:4 --height 256:512:1024 --width 256:512:1024" in str(error.value)  # rebuilds what was built
    build_engines(bundle, compiler=compiler)
    assert [c for c, _, _ in compiler.compiled[3:]] == ["unet"]
    resolve_engines(bundle, _digests(bundle), H100)


def test_engines_of_another_gpu_or_tensorrt_are_refused_and_built_apart(tmp_path: Path) -> None:
    bundle = _fake_bundle(tmp_path)
    build_engines(bundle, compiler=FakeCompiler(A100))
    with pytest.raises(EnginesNotBuiltError) as error:
        resolve_engines(bundle, _digests(bundle), H100)
    message = str(error.value)
    assert "not built for this GPU, NVIDIA H100 80GB HBM3 (compute capability 9.0) with TensorRT 10.3.0" in message
    assert "there are engines for NVIDIA A100-SXM4-80GB (compute capability 8.0)" in message
    assert message.endswith(f"run `sdrt build-engines {bundle}`")
    newer = dataclasses.replace(A100, tensorrt_version="10.4.0")
    with pytest.raises(EnginesNotBuiltError, match="with TensorRT 10.4.0"):
        resolve_engines(bundle, _digests(bundle), newer)
    compiler = FakeCompiler(H100)
    build_engines(bundle, compiler=compiler)
    assert len(compiler.compiled) == 3
    resolve_engines(bundle, _digests(bundle), H100)
    resolve_engines(bundle, _digests(bundle), A100)


def test_a_foreign_key_in_an_index_is_refused(tmp_path: Path) -> None:
    bundle = _fake_bundle(tmp_path)
    build_engines(bundle, compiler=FakeCompiler(H100))
    index_path = bundle / CACHE_SUBDIR / H100.slug / INDEX_FILE
    data = json.loads(index_path.read_text())
    data["engines"]["unet"]["environment"] = A100.to_json()  # copied in from another machine, say
    index_path.write_text(json.dumps(data))
    with pytest.raises(EnginesNotBuiltError, match="unet engine was built for NVIDIA A100"):
        resolve_engines(bundle, _digests(bundle), H100)


def test_missing_engine_file_or_component_is_stale(tmp_path: Path) -> None:
    bundle = _fake_bundle(tmp_path)
    build_engines(bundle, compiler=FakeCompiler())
    store, index = resolve_engines(bundle, _digests(bundle), H100)
    with pytest.raises(EnginesNotBuiltError, match="has no vae_encoder engine"):
        resolve_engines(bundle, {**_digests(bundle), Component.VAE_ENCODER: "0" * 64}, H100)
    store.engine_path(index.engines[Component.VAE_DECODER]).unlink()
    with pytest.raises(EnginesNotBuiltError, match=r"vae_decoder engine file vae_decoder-\w+\.plan is missing"):
        resolve_engines(bundle, _digests(bundle), H100)


def test_unreadable_index_counts_as_not_built(tmp_path: Path, caplog) -> None:
    bundle = _fake_bundle(tmp_path)
    build_engines(bundle, compiler=FakeCompiler())
    (bundle / CACHE_SUBDIR / H100.slug / INDEX_FILE).write_text("{not json")
    with caplog.at_level(logging.WARNING), pytest.raises(EnginesNotBuiltError, match="not built for this GPU"):
        resolve_engines(bundle, _digests(bundle), H100)
    assert "ignoring the TensorRT engine index" in caplog.text


def test_fp16_vae_overflow_is_rebuilt_in_fp32_and_remembered(tmp_path: Path, caplog) -> None:
    bundle = _fake_bundle(tmp_path, components=(*BUNDLE_COMPONENTS, Component.VAE_ENCODER))
    (bundle / "vae_encoder/model.onnx").write_bytes(b"vae_encoder graph")
    _write_manifest(bundle, SD15, (*BUNDLE_COMPONENTS, Component.VAE_ENCODER))
    compiler = FakeCompiler(overflow=frozenset({"vae_decoder"}))
    with caplog.at_level(logging.INFO, logger="sdrt.export.tensorrt_build"):
        build_engines(bundle, compiler=compiler)
    assert "vae_decoder: the fp16 engine returns NaN or infinity on a sample input (fp16 overflow): building it in fp32" in caplog.text
    assert [(c, p) for c, p, _ in compiler.compiled if c.startswith("vae")] == [
        ("vae_decoder", Precision.FP16), ("vae_decoder", Precision.FP32), ("vae_encoder", Precision.FP16)]
    assert sorted(compiler.ran) == [b"text_encoder:fp16", b"unet:fp16", b"vae_decoder:fp16", b"vae_encoder:fp16"]  # only in fp16
    store, index = resolve_engines(bundle, _digests(bundle), H100)
    assert index.precision is Precision.FP16
    assert {c: k.precision for c, k in index.engines.items()} == {
        Component.TEXT_ENCODER: Precision.FP16, Component.UNET: Precision.FP16,
        Component.VAE_DECODER: Precision.FP32, Component.VAE_ENCODER: Precision.FP16}
    assert not store.has_engine(index.engines[Component.VAE_DECODER].with_precision(Precision.FP16))  # never stored
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="sdrt.export.tensorrt_build"):
        build_engines(bundle, compiler=compiler)
    assert len(compiler.compiled) == 5 and len(compiler.ran) == 4  # the finding is reused: no fp16 attempt again
    assert "vae_decoder: kept in fp32" in caplog.text


@pytest.mark.parametrize("precision", [Precision.BF16, Precision.FP32])
def test_only_fp16_builds_probe_for_overflow(tmp_path: Path, precision: Precision) -> None:
    bundle = _fake_bundle(tmp_path)
    compiler = FakeCompiler(overflow=frozenset({"vae_decoder"}))
    build_engines(bundle, precision=precision, compiler=compiler)
    assert compiler.ran == [] and {p for _, p, _ in compiler.compiled} == {precision}


def test_interrupted_build_publishes_nothing_and_keeps_finished_engines(tmp_path: Path) -> None:
    bundle = _fake_bundle(tmp_path)
    with pytest.raises(EngineBuildError):
        build_engines(bundle, compiler=FakeCompiler(fail_on="unet"))
    assert not (bundle / CACHE_SUBDIR / H100.slug / INDEX_FILE).exists()
    assert not list((bundle / CACHE_SUBDIR).rglob("*.partial"))
    with pytest.raises(EnginesNotBuiltError):
        resolve_engines(bundle, _digests(bundle), H100)
    compiler = FakeCompiler()
    build_engines(bundle, compiler=compiler)
    assert [c for c, _, _ in compiler.compiled] == ["unet", "vae_decoder"]  # the text encoder was already stored


def test_an_engine_write_that_fails_leaves_no_file(tmp_path: Path) -> None:
    store = EngineStore(tmp_path, H100)

    class BrokenPlan:  # not a buffer: the write fails part-way, as a full disk would
        pass

    with pytest.raises(TypeError):
        store.write_engine(_key(), BrokenPlan())
    assert not store.has_engine(_key()) and list(store.directory.iterdir()) == []
    store.write_engine(_key(), memoryview(b"plan"))
    assert store.engine_path(_key()).read_bytes() == b"plan"


def test_refittable_engines_are_requested_and_keyed_apart(tmp_path: Path) -> None:
    bundle = _fake_bundle(tmp_path)
    compiler = FakeCompiler()
    build_engines(bundle, refittable=True, compiler=compiler)
    assert {r for _, _, r in compiler.compiled} == {True}
    _, index = resolve_engines(bundle, _digests(bundle), H100)
    assert index.refittable and all(key.refittable for key in index.engines.values())
    build_engines(bundle, compiler=compiler)
    assert [r for _, _, r in compiler.compiled[3:]] == [False] * 3


def test_build_refuses_bad_profile_and_read_only_bundle_before_building(tmp_path: Path, monkeypatch) -> None:
    bundle = _fake_bundle(tmp_path)
    compiler = FakeCompiler()
    with pytest.raises(InvalidArgumentError, match="height: min, opt and max must each be a multiple of 8"):
        build_engines(bundle, dataclasses.replace(SD15_PROFILE, height=AxisRange(250, 512, 1024)), compiler=compiler)
    monkeypatch.setattr(tensorrt_build.os, "access", lambda path, mode: False)
    with pytest.raises(EngineBuildError, match="read-only"):
        build_engines(bundle, compiler=compiler)
    assert compiler.compiled == []


# ---- requests outside the profile ---------------------------------------------------------------------------------
def test_request_outside_the_profile_names_the_range_and_the_command(tmp_path: Path) -> None:
    bundle = _fake_bundle(tmp_path)
    build_engines(bundle, precision=Precision.FP32, refittable=True, compiler=FakeCompiler())
    _, index = resolve_engines(bundle, _digests(bundle), H100)
    check_request(index, bundle, 4, 1024, 256)  # the corners are inside
    with pytest.raises(ProfileMismatchError) as error:
        check_request(index, bundle, 6, 512, 512)
    assert isinstance(error.value, InvalidArgumentError) and error.value.parameter == "batch"
    assert str(error.value).startswith("batch: 6 images per request (prompts x num_images_per_prompt) is outside the 1-4 (opt 1)")
    assert str(error.value).endswith(
        f"`sdrt build-engines {bundle} --batch 1:1:6 --height 256:512:1024 --width 256:512:1024 --precision fp32 --refittable`")
    with pytest.raises(ProfileMismatchError, match=r"height: 128 pixels is outside the 256-1024 .*--height 128:512:1024 ") as error:
        check_request(index, bundle, 1, 128, 512)
    assert error.value.parameter == "height"
    with pytest.raises(ProfileMismatchError, match=r"--width 256:512:1280 ") as error:
        check_request(index, bundle, 1, 512, 1280)
    assert error.value.parameter == "width"


def test_unet_engines_take_one_text_window_and_refuse_long_prompts(tmp_path: Path) -> None:
    bundle = _fake_bundle(tmp_path)  # the U-Net's text context a dynamic axis, as exported now
    build_engines(bundle, compiler=FakeCompiler())
    _, index = resolve_engines(bundle, _digests(bundle), H100)
    assert dict(index.engines[Component.UNET].shapes)["encoder_hidden_states"].max[1] == TEXT_LENGTH
    check_context_length(index, TEXT_LENGTH)
    with pytest.raises(InvalidArgumentError, match=rf"prompt: needs a text context of {2 * TEXT_LENGTH} tokens, but the "
                                                   rf"TensorRT U-Net engine takes {TEXT_LENGTH} .*backend=\"cuda\"") as error:
        check_context_length(index, 2 * TEXT_LENGTH)
    assert error.value.parameter == "prompt"


def test_build_command_quotes_the_bundle_and_names_non_defaults() -> None:
    assert build_command(Path("my bundle")) == "sdrt build-engines 'my bundle'"
    assert build_command(Path("b"), EngineProfile.static(1, 512, 512), Precision.BF16) == (
        "sdrt build-engines b --batch 1:1:1 --height 512:512:512 --width 512:512:512 --precision bf16")


def test_pipeline_asks_the_backend_before_running_anything(tmp_path: Path) -> None:
    asked = []

    class RefusingBackend:
        name = "refusing"

        def check_request(self, num_images, height, width):
            asked.append((num_images, height, width))
            raise ProfileMismatchError("batch", "outside the engines' profile")

        def run(self, *args, **kwargs):
            raise AssertionError("a model ran")

    manifest = read_manifest(_fake_bundle(tmp_path))
    pipe = StableDiffusionPipeline(bundle_dir=tmp_path, manifest=manifest, backend=RefusingBackend(), tokenizer=None,
                                   scheduler=types.SimpleNamespace(start=lambda steps: "schedule", min_inference_steps=1, max_inference_steps=999), safety_checker=None,
                                   safety_policy=SafetyPolicy.OFF, scheduler_config={})
    with pytest.raises(ProfileMismatchError):
        pipe(["a cat", "a dog"], num_images_per_prompt=3, height=128, width=192, num_inference_steps=1)
    assert asked == [(6, 128, 192)]


# ---- the command line ---------------------------------------------------------------------------------------------
def test_cli_build_engines_turns_flags_into_a_profile(tmp_path: Path, monkeypatch) -> None:
    bundle = _fake_bundle(tmp_path)
    calls = []
    monkeypatch.setattr(tensorrt_build, "build_engines", lambda *args, **kwargs: calls.append((args, kwargs)) or "built")
    assert main(["build-engines", str(bundle), "--batch", "1:2:4", "--height", "512", "--precision", "fp32", "--refittable"]) == 0
    (path, profile, precision), kwargs = calls[-1]
    assert path == bundle and precision is Precision.FP32 and kwargs == {"refittable": True}
    assert profile == EngineProfile(AxisRange(1, 2, 4), AxisRange(512, 512, 512), SD15_PROFILE.width)
    assert main(["build-engines", str(bundle), "--static", "--width", "256:768:1024"]) == 0
    assert calls[-1][0][1] == EngineProfile.static(1, 512, 768)


@pytest.mark.parametrize(("flags", "message"), [
    (["--batch", "1:2"], "argument --batch: expected N or MIN:OPT:MAX, got '1:2'"),
    (["--batch", "4:1:2"], "sdrt: error: batch: must be integers with 1 <= min <= opt <= max, got min 4, opt 1, max 2"),
    (["--height", "250:512:1024"], "sdrt: error: height: min, opt and max must each be a multiple of 8"),
])
def test_cli_build_engines_bad_profile_is_one_line_and_status_2(tmp_path: Path, capsys, flags, message) -> None:
    bundle = _fake_bundle(tmp_path)
    assert main(["build-engines", str(bundle), *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="tensorrt is installed here")
def test_cli_build_engines_without_tensorrt_says_what_to_install(tmp_path: Path, capsys) -> None:
    assert main(["build-engines", str(_fake_bundle(tmp_path))]) == 2
    assert capsys.readouterr().err == "sdrt: error: tensorrt is not installed (pip install 'sdrt[gpu]')\n"


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="tensorrt is installed here")
def test_cli_export_tensorrt_without_tensorrt_fails_before_exporting(tmp_path: Path, capsys) -> None:
    # A checkpoint that does not exist: exporting first would fail on it instead.
    assert main(["export", str(tmp_path / "no-checkpoint"), str(tmp_path / "bundle"), "--tensorrt"]) == 2
    assert capsys.readouterr().err == "sdrt: error: --tensorrt: tensorrt is not installed (pip install 'sdrt[gpu]')\n"
    assert list(tmp_path.iterdir()) == []


def test_cli_export_tensorrt_exports_then_builds_with_the_engine_flags(tmp_path: Path, monkeypatch, capsys) -> None:
    import sdrt.export.bundle

    calls = []

    def export_bundle(checkpoint, out_dir, **options):
        calls.append(("export", checkpoint, options))
        return _fake_bundle(out_dir.parent)

    monkeypatch.setattr(tensorrt_build, "builder_unavailable_reason", lambda: None)
    monkeypatch.setattr(sdrt.export.bundle, "export_bundle", export_bundle)
    monkeypatch.setattr(tensorrt_build, "build_engines", lambda *args, **kwargs: calls.append(("build", args, kwargs)) or "engines")
    bundle = tmp_path / "bundle"
    assert main(["export", "ckpt", str(bundle), "--fp16-onnx", "--tensorrt", "--batch", "1:2:4", "--precision", "fp32", "--refittable"]) == 0
    assert calls == [
        ("export", Path("ckpt"), {"force": False, "fp16_components": FP16_DEFAULT_COMPONENTS, "loras": [], "config": None,
                                         "scheduler": None, "tiny_vae": None, "deepcache_branch": None,
                                         "quantize": False}),  # an int8 U-Net is for CPUs
        ("build", (bundle, EngineProfile(AxisRange(1, 2, 4), SD15_PROFILE.height, SD15_PROFILE.width), Precision.FP32), {"refittable": True}),
    ]
    assert capsys.readouterr().out == f"{bundle}\nengines\n"


def test_cli_export_engine_flags_need_tensorrt(tmp_path: Path, capsys) -> None:
    assert main(["export", "ckpt", str(tmp_path / "bundle"), "--static", "--precision", "fp32"]) == 2
    assert capsys.readouterr().err == "sdrt: error: --static, --precision: engine options need --tensorrt\n"


# ---- the per-shape LRU --------------------------------------------------------------------------------------------
def test_lru_evicts_the_least_recently_used_shape() -> None:
    created, released = [], []
    cache = LRUCache(2, create=lambda key: created.append(key) or f"graph-{key}", release=released.append)
    assert cache.get("a") == "graph-a" and cache.get("b") == "graph-b" and cache.get("a") == "graph-a"
    cache.get("c")  # b is the least recently used
    assert released == ["graph-b"] and cache.keys() == ["a", "c"]
    cache.get("b")  # captured anew; a goes
    assert created == ["a", "b", "c", "b"] and released == ["graph-b", "graph-a"] and cache.keys() == ["c", "b"]
    with pytest.raises(ValueError, match="capacity must be at least 1"):
        LRUCache(0, create=str, release=print)


# ---- the runner, on fake tensorrt and cuda-python modules ---------------------------------------------------------
class _Error(int):
    @property
    def name(self) -> str:
        return {0: "cudaSuccess", 2: "cudaErrorMemoryAllocation"}[int(self)]


class FakeCudart:
    """cuda-python's runtime API over host memory: device pointers index `memory`; a captured graph is the list of
    work enqueued during the capture, replayed by cudaGraphLaunch."""

    cudaError_t = types.SimpleNamespace(cudaSuccess=_Error(0))
    cudaMemcpyKind = types.SimpleNamespace(cudaMemcpyHostToDevice="h2d", cudaMemcpyDeviceToHost="d2h")
    cudaStreamCaptureMode = types.SimpleNamespace(cudaStreamCaptureModeThreadLocal="thread-local", cudaStreamCaptureModeRelaxed="relaxed")
    OK = (_Error(0),)

    def __init__(self) -> None:
        self.memory: dict[int, bytearray] = {}
        self.freed: list[int] = []
        self.capturing: list | None = None
        self.graphs_instantiated = 0
        self.graphs_destroyed = 0
        self.next_ptr = 0x1000
        self.fail_malloc = False
        self.graphs_destroyed_templates = 0

    def cudaMalloc(self, nbytes):
        if self.fail_malloc:
            return (_Error(2), 0)
        self.next_ptr += 0x1000
        self.memory[self.next_ptr] = bytearray(nbytes)
        return (_Error(0), self.next_ptr)

    def cudaFree(self, ptr):
        del self.memory[ptr]
        self.freed.append(ptr)
        return self.OK

    def cudaMemcpyAsync(self, dst, src, nbytes, kind, stream):
        import ctypes

        if kind == "h2d":
            self.memory[dst][:nbytes] = ctypes.string_at(src, nbytes)
        else:
            ctypes.memmove(dst, bytes(self.memory[src][:nbytes]), nbytes)
        return self.OK

    def cudaStreamCreate(self):
        return (_Error(0), 7)

    def cudaStreamDestroy(self, stream):
        return self.OK

    def cudaStreamSynchronize(self, stream):
        return self.OK

    def cudaStreamBeginCapture(self, stream, mode):
        assert mode in ("thread-local", "relaxed")
        self.capturing = []
        return self.OK

    def cudaStreamEndCapture(self, stream):
        graph, self.capturing = self.capturing, None
        return (_Error(0), graph)

    def cudaGraphInstantiate(self, graph, flags):
        self.graphs_instantiated += 1
        return (_Error(0), list(graph))

    def cudaGraphDestroy(self, graph):
        self.graphs_destroyed_templates += 1
        return self.OK

    def cudaGraphExecDestroy(self, executable):
        self.graphs_destroyed += 1
        return self.OK

    def cudaGraphLaunch(self, executable, stream):
        for work in executable:
            work()
        return self.OK


class FakeEngine:
    """An engine computing y = 2 * x + 1 on float32 x of shape (batch <= 4, 3); counts launches over its contexts."""

    num_io_tensors = 2
    device_memory_size_v2 = 256

    def __init__(self, cudart: FakeCudart) -> None:
        self.cudart = cudart
        self.launches = 0
        self.contexts: list[FakeContext] = []

    get_tensor_name = staticmethod(["x", "y"].__getitem__)
    get_tensor_mode = staticmethod(lambda name: "in" if name == "x" else "out")
    get_tensor_dtype = staticmethod(lambda name: "float")

    def create_execution_context(self, strategy):
        assert strategy == "user-managed"
        self.contexts.append(FakeContext(self))
        return self.contexts[-1]


class FakeContext:
    """One execution context; it refuses to be re-shaped once a graph was captured on it (not documented as safe)."""

    def __init__(self, engine: FakeEngine) -> None:
        self.engine = engine
        self.cudart = engine.cudart
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.addresses: dict[str, int] = {}
        self.captured = False
        self.scratch: tuple[int, int] | None = None

    def set_device_memory(self, ptr, nbytes):
        self.scratch = (ptr, nbytes)

    def set_input_shape(self, name, shape):
        assert not self.captured or self.shapes.get(name) == tuple(shape), "a context re-shaped after a graph was captured on it"
        if not 1 <= shape[0] <= 4:
            return False
        self.shapes[name] = tuple(shape)
        return True

    def get_tensor_shape(self, name):
        return self.shapes["x"]

    def set_tensor_address(self, name, ptr):
        self.addresses[name] = ptr
        return ptr % 256 == 0  # TensorRT refuses misaligned addresses

    def execute_async_v3(self, stream):
        assert stream == 7 and self.scratch is not None
        x_ptr, y_ptr, count = self.addresses["x"], self.addresses["y"], int(np.prod(self.shapes["x"]))
        engine = self.engine

        def work():  # reads the addresses bound now, as a captured kernel does
            engine.launches += 1
            x = np.frombuffer(self.cudart.memory[x_ptr], np.float32, count)
            self.cudart.memory[y_ptr][:] = (2 * x + 1).astype(np.float32).tobytes()

        if self.cudart.capturing is not None:
            self.captured = True
            self.cudart.capturing.append(work)
        else:
            work()
        return True


def _fake_tensorrt(engine: FakeEngine):
    return types.SimpleNamespace(
        ExecutionContextAllocationStrategy=types.SimpleNamespace(USER_MANAGED="user-managed"),
        Runtime=lambda logger: types.SimpleNamespace(deserialize_cuda_engine=lambda plan: engine if plan == b"plan" else None),
        TensorIOMode=types.SimpleNamespace(INPUT="in"),
        nptype=lambda dtype: np.float32,
    )


@pytest.fixture
def fake_gpu(monkeypatch):
    cudart = FakeCudart()
    engine = FakeEngine(cudart)
    monkeypatch.setattr(cuda_module, "cudart", lambda: cudart)
    monkeypatch.setattr(runner_module, "tensorrt", lambda: _fake_tensorrt(engine))
    monkeypatch.setattr(runner_module, "trt_logger", lambda: None)
    return cudart, engine


def _x(batch: int, value: float) -> np.ndarray:
    return np.full((batch, 3), value, np.float64)  # float64: the runner converts to the engine's float32


def test_runner_replays_one_graph_per_shape_and_captures_a_new_shape(fake_gpu) -> None:
    cudart, context = fake_gpu
    runner = runner_module.EngineRunner(b"plan", cuda_module.Stream(), capture_graphs=True, max_shapes=2)
    (y,) = runner.run({"x": _x(1, 1.0)})
    assert y.dtype == np.float32 and y.shape == (1, 3) and (y == 3).all()
    assert cudart.graphs_instantiated == 1 and context.launches == 2  # a launch before the capture, then the replay
    (y,) = runner.run({"x": _x(1, 5.0)})  # replayed on the new input
    assert (y == 11).all() and cudart.graphs_instantiated == 1 and context.launches == 3
    (y,) = runner.run({"x": _x(2, 0.0)})
    assert y.shape == (2, 3) and (y == 1).all() and cudart.graphs_instantiated == 2
    first_shape_buffers = set(cudart.memory)
    runner.run({"x": _x(3, 1.0)})  # a third shape: the least recently used (batch 1) goes, graph and buffers
    assert cudart.graphs_instantiated == 3 and cudart.graphs_destroyed == 1
    assert len(cudart.freed) == 2 and set(cudart.freed) <= first_shape_buffers
    (y,) = runner.run({"x": _x(2, 4.0)})  # still cached: replayed
    assert (y == 9).all() and cudart.graphs_instantiated == 3
    (y,) = runner.run({"x": _x(1, 1.0)})  # evicted: captured again
    assert (y == 3).all() and cudart.graphs_instantiated == 4


def test_runner_without_graphs_rebinds_when_the_shape_changes(fake_gpu) -> None:
    cudart, context = fake_gpu
    runner = runner_module.EngineRunner(b"plan", cuda_module.Stream(), capture_graphs=False)
    for batch, value in [(1, 1.0), (2, 2.0), (1, 3.0), (2, 4.0)]:
        (y,) = runner.run({"x": _x(batch, value)})
        assert y.shape == (batch, 3) and (y == 2 * value + 1).all()
    assert cudart.graphs_instantiated == 0 and context.launches == 4 and len(cudart.memory) == 5  # scratch + 2 shapes x (x, y)


def test_runner_errors_name_the_failure(fake_gpu) -> None:
    cudart, _ = fake_gpu
    with pytest.raises(GpuError, match="could not deserialise"):
        runner_module.EngineRunner(b"garbage", cuda_module.Stream(), capture_graphs=False)
    runner = runner_module.EngineRunner(b"plan", cuda_module.Stream(), capture_graphs=True)
    with pytest.raises(GpuError, match=r"rejected shape \(5, 3\) for input x: it is outside the engine's optimization profile"):
        runner.run({"x": _x(5, 1.0)})
    cudart.fail_malloc = True
    with pytest.raises(GpuError, match="cudaMalloc failed: cudaErrorMemoryAllocation"):
        runner.run({"x": _x(2, 1.0)})


def test_device_memory_is_freed_once_on_release_or_collection(fake_gpu) -> None:
    cudart, _ = fake_gpu
    kept, dropped = cuda_module.DeviceBuffer(16), cuda_module.DeviceBuffer(16)
    kept.release()
    kept.release()
    dropped_ptr = dropped.ptr
    del dropped
    gc.collect()
    assert sorted(cudart.freed) == sorted([kept.ptr, dropped_ptr])


def test_cuda_call_returns_results_and_raises_on_errors(fake_gpu) -> None:
    def cudaThing(*results):
        return results

    ok = _Error(0)
    assert cuda_module.call(cudaThing, ok) is None
    assert cuda_module.call(cudaThing, ok, 5) == 5
    assert cuda_module.call(cudaThing, ok, 5, 6) == (5, 6)
    with pytest.raises(GpuError, match="cudaThing failed: cudaErrorMemoryAllocation"):
        cuda_module.call(cudaThing, _Error(2), 0)


def test_current_gpu_reads_name_and_compute_capability(fake_gpu, monkeypatch) -> None:
    cudart, _ = fake_gpu
    properties = types.SimpleNamespace(name=b"NVIDIA H100 80GB HBM3\0\0\0", major=9, minor=0)
    cudart.cudaGetDevice = lambda: (_Error(0), 0)
    cudart.cudaGetDeviceProperties = lambda device: (_Error(0), properties)
    assert cuda_module.current_gpu() == H100.gpu


def test_tensorrt_backend_runs_stored_engines_and_captures_only_the_unet(tmp_path: Path, fake_gpu, monkeypatch) -> None:
    cudart, context = fake_gpu
    monkeypatch.setattr(tensorrt_backend, "current_environment", lambda: H100)
    bundle = _fake_bundle(tmp_path)
    build_engines(bundle, precision=Precision.FP32, compiler=FakeCompiler(plan=b"plan"))  # each: the fake y = 2x + 1
    backend = TensorRTBackend(bundle, _component_files(bundle))
    (y,) = backend.run(Component.TEXT_ENCODER, {"x": _x(1, 1.0)})
    assert (y == 3).all() and cudart.graphs_instantiated == 0
    for step in range(3):
        (y,) = backend.run(Component.UNET, {"x": _x(2, step)})
        assert (y == 2 * step + 1).all()
    assert cudart.graphs_instantiated == 1 and backend.loaded_components == {Component.TEXT_ENCODER, Component.UNET}
    with pytest.raises(ProfileMismatchError, match="batch: 5 images"):
        backend.check_request(5, 512, 512)
    (bundle / "unet/model.onnx.data").write_bytes(b"unet weights v2")
    _write_manifest(bundle, SD15)
    with pytest.raises(EnginesNotBuiltError, match="unet engine was built from other model files"):
        TensorRTBackend(bundle, _component_files(bundle))


@pytest.mark.parametrize(("setting", "graphs"), [("0", 0), ("1", 1)])
def test_cuda_graphs_can_be_turned_off_for_the_process(tmp_path: Path, fake_gpu, monkeypatch, setting, graphs) -> None:
    cudart, context = fake_gpu
    monkeypatch.setattr(tensorrt_backend, "current_environment", lambda: H100)
    monkeypatch.setenv(tensorrt_backend.CUDA_GRAPHS_ENV, setting)
    bundle = _fake_bundle(tmp_path)
    build_engines(bundle, precision=Precision.FP32, compiler=FakeCompiler(plan=b"plan"))
    backend = TensorRTBackend(bundle, _component_files(bundle))
    for step in range(3):
        (y,) = backend.run(Component.UNET, {"x": _x(2, step)})
        assert (y == 2 * step + 1).all()
    assert cudart.graphs_instantiated == graphs
    assert context.launches == (3 if graphs == 0 else 4)  # with a graph: one launch before the capture, then replays
    monkeypatch.setenv(tensorrt_backend.CUDA_GRAPHS_ENV, "off")
    with pytest.raises(InvalidArgumentError, match=r"SDRT_TENSORRT_CUDA_GRAPHS: must be 0 \(no CUDA graphs\) or 1 \(the default\), got 'off'"):
        TensorRTBackend(bundle, _component_files(bundle))


# ---- backend choice -----------------------------------------------------------------------------------------------
def test_gpu_backends_come_first() -> None:
    assert BACKENDS[:3] == (TensorRTBackend, OnnxRuntimeCUDAFP16Backend, OnnxRuntimeCUDABackend)
    assert not TensorRTBackend.exact and OnnxRuntimeCUDABackend.exact  # exact mode may use the CUDA backend
    assert not OnnxRuntimeCUDAFP16Backend.exact


class _FakeDriver:
    def __init__(self, init: int = 0, count: int = 1) -> None:
        self.init, self.count = init, count

    def cuInit(self, flags):
        return self.init

    def cuDeviceGetCount(self, pointer):
        pointer._obj.value = self.count
        return 0


@pytest.mark.parametrize(("driver", "reason"), [
    (None, "no CUDA device: the NVIDIA driver (libcuda.so.1) is not installed"),
    (_FakeDriver(init=100), "no CUDA device: the NVIDIA driver's cuInit failed with CUresult 100"),
    (_FakeDriver(count=0), "no CUDA device: the NVIDIA driver finds none"),
    (_FakeDriver(), None),
])
def test_cuda_device_check_says_why_not(monkeypatch, driver, reason) -> None:
    def load(name):
        if driver is None:
            raise OSError(f"{name}: cannot open shared object file")
        return driver

    monkeypatch.setattr(cuda_device, "DRIVER_LIBRARY", "libcuda.so.1")
    monkeypatch.setattr(cuda_device.ctypes, "CDLL", load)
    cuda_device.cuda_device_unavailable_reason.cache_clear()
    try:
        assert cuda_device.cuda_device_unavailable_reason() == reason
        if reason is not None:
            assert TensorRTBackend.unavailable_reason() == reason and OnnxRuntimeCUDABackend.unavailable_reason() == reason
    finally:
        cuda_device.cuda_device_unavailable_reason.cache_clear()


def _machine_can_run_tensorrt(monkeypatch) -> None:
    monkeypatch.setattr(TensorRTBackend, "unavailable_reason", classmethod(lambda cls: None))
    monkeypatch.setattr(tensorrt_backend, "current_environment", lambda: H100)


def test_auto_skips_tensorrt_without_engines_for_the_bundle(tmp_path: Path, monkeypatch, caplog) -> None:
    _machine_can_run_tensorrt(monkeypatch)
    bundle = _fake_bundle(tmp_path)
    files = _component_files(bundle)
    assert backend_class("auto") is TensorRTBackend  # the machine could run it
    fallback = next(b for b in BACKENDS[1:] if b.unavailable_reason() is None and b.bundle_unavailable_reason(bundle, files) is None)
    with caplog.at_level(logging.WARNING, logger="sdrt.engine.backends"):
        assert backend_class("auto", bundle, files) is fallback
    assert "backend auto: not tensorrt: TensorRT engines are not built for this GPU" in caplog.text
    assert f"run `sdrt build-engines {bundle}`" in caplog.text
    with pytest.raises(BackendUnavailableError, match=r"backend 'tensorrt' is unavailable: .*`sdrt build-engines "):
        backend_class("tensorrt", bundle, files)
    build_engines(bundle, compiler=FakeCompiler(H100))
    assert backend_class("auto", bundle, files) is TensorRTBackend
    assert backend_class("tensorrt", bundle, files) is TensorRTBackend
    assert backend_class("exact", bundle, files) is not TensorRTBackend


def test_unavailable_backends_each_give_their_reason(monkeypatch) -> None:
    for backend in BACKENDS:
        monkeypatch.setattr(backend, "unavailable_reason", classmethod(lambda cls: f"{cls.name} is missing here"))
    with pytest.raises(BackendUnavailableError) as error:
        backend_class("auto")
    assert str(error.value) == "no auto inference backend is available: " + "; ".join(f"{b.name}: {b.name} is missing here" for b in BACKENDS)
    with pytest.raises(BackendUnavailableError, match="backend 'cuda' is unavailable: cuda is missing here"):
        backend_class("cuda")


def test_sdrt_imports_and_chooses_a_backend_without_tensorrt_cuda_python_or_torch() -> None:
    script = """
import sys
for name in ("tensorrt", "cuda", "cuda.bindings", "torch"):
    sys.modules[name] = None  # any import of them fails
import sdrt.engine
import sdrt.cli.main
import sdrt.export.tensorrt_build
from sdrt.engine.backends import backend_class
from sdrt.engine.backends.tensorrt.library import libraries_unavailable_reason
print("REASON", libraries_unavailable_reason())
print("AUTO", backend_class("auto").name)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "REASON tensorrt is not installed (pip install 'sdrt[gpu]')" in result.stdout
    assert "AUTO tensorrt" not in result.stdout and "AUTO cuda" not in result.stdout
