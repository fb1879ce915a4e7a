"""Backend choice ("auto" fastest, "exact" fastest fp32), the bf16 fast mode's accuracy, and OpenVINO's cache."""
from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

import sdrt.engine
from sdrt.engine.backends import BACKENDS, backend_class
from sdrt.engine.backends.openvino.backend import OpenVINOBF16Backend, OpenVINOFP32Backend
from sdrt.engine.backends.openvino.cache import CACHE_SUBDIR
from sdrt.engine.specs import Component

needs_openvino = pytest.mark.skipif(OpenVINOFP32Backend.unavailable_reason() is not None, reason="openvino not installed")
needs_bf16 = pytest.mark.skipif(OpenVINOBF16Backend.unavailable_reason() is not None, reason="no OpenVINO bf16 on this CPU")


def _available(exact_only: bool) -> list[str]:
    return [b.name for b in BACKENDS if b.unavailable_reason() is None and (b.exact or not exact_only)]


def test_auto_is_the_first_available_and_exact_the_first_fp32() -> None:
    assert backend_class("auto").name == _available(exact_only=False)[0]
    assert backend_class("exact").name == _available(exact_only=True)[0]
    assert backend_class("exact").exact


def test_result_reports_the_backend_that_ran(tiny_bundle: Path) -> None:
    pipe = sdrt.engine.load(tiny_bundle, safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    ran = pipe("a cat", num_inference_steps=1, height=64, width=64, seed=0).backend
    assert ran == pipe.backend.name == backend_class("auto", tiny_bundle, pipe.backend.components).name


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(1.0 / np.mean((a - b) ** 2)))


@needs_bf16
def test_bf16_fast_mode_stays_close_to_fp32(tiny_bundle: Path) -> None:
    latents = np.random.default_rng(0).standard_normal((2, 4, 8, 8), dtype=np.float32)
    images = {}
    for backend in ("openvino-bf16", "onnxruntime-cpu"):
        pipe = sdrt.engine.load(tiny_bundle, backend=backend, safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        images[backend] = pipe(["a cat", "a dog"], num_inference_steps=10, height=64, width=64, latents=latents, output_type="np").images
    difference = np.abs(images["openvino-bf16"] - images["onnxruntime-cpu"]).max()
    assert difference > 0  # it really ran in reduced precision
    assert _psnr(images["openvino-bf16"], images["onnxruntime-cpu"]) > 30


def _run_openvino_fp32(bundle: Path) -> None:
    pipe = sdrt.engine.load(bundle, backend="openvino-fp32", safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe("a cat", num_inference_steps=1, height=64, width=64, seed=0)


@needs_openvino
def test_compiled_models_are_cached_in_the_bundle(tiny_bundle: Path, tmp_path: Path) -> None:
    bundle = Path(shutil.copytree(tiny_bundle, tmp_path / "bundle", ignore=shutil.ignore_patterns(".cache")))
    _run_openvino_fp32(bundle)
    assert any((bundle / CACHE_SUBDIR).iterdir())
    sdrt.engine.load(bundle, backend="openvino-fp32")  # the cache is not a bundle file: verification still passes


@needs_openvino
def test_read_only_bundle_compiles_without_a_cache(tiny_bundle: Path, tmp_path: Path, monkeypatch) -> None:
    # Root ignores file modes, so make the bundle read-only the way the backend sees it.
    bundle = Path(shutil.copytree(tiny_bundle, tmp_path / "bundle", ignore=shutil.ignore_patterns(".cache")))
    from sdrt.engine.backends.openvino import backend as openvino_backend

    real_access = os.access
    monkeypatch.setattr(openvino_backend.os, "access", lambda path, mode: Path(path) != bundle and real_access(path, mode))
    _run_openvino_fp32(bundle)
    assert not (bundle / CACHE_SUBDIR).exists()


def _cache_listing(bundle: Path) -> set[str]:
    """Every file under the bundle's OpenVINO cache, relative to it."""
    cache = bundle / CACHE_SUBDIR
    return {str(f.relative_to(cache)) for f in cache.rglob("*") if f.is_file()}


@needs_openvino
def test_compiled_models_are_cached_per_model_and_stale_entries_removed(tiny_bundle: Path, tmp_path: Path, monkeypatch) -> None:
    import dataclasses


    bundle = Path(shutil.copytree(tiny_bundle, tmp_path / "bundle", ignore=shutil.ignore_patterns(".cache")))
    _run_openvino_fp32(bundle)
    if OpenVINOBF16Backend.unavailable_reason() is None:
        pipe = sdrt.engine.load(bundle, backend="openvino-bf16", safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        pipe("a cat", num_inference_steps=1, height=64, width=64, seed=0)
    cache = bundle / CACHE_SUBDIR
    compiled = {d.name: d for d in (cache / "compiled").iterdir()}
    assert compiled and all(d.is_dir() and any(d.iterdir()) for d in compiled.values())
    assert {name.rsplit("-", 1)[1] for name in compiled} == {"f32"} | ({"bf16"} if OpenVINOBF16Backend.unavailable_reason() is None else set())
    current = _cache_listing(bundle)

    # Entries nothing current would read: an earlier export's U-Net, blobs of the one-directory layout and of the
    # layout that gave each model's directory to OpenVINO's cache. Hidden staging directories (a conversion under
    # way) and what is not named after a component stay.
    for planted in ("ir/unet-0123456789abcdef/model.xml", "compiled/unet-0123456789abcdef-f32/a.blob", "compiled/b.blob",
                    f"compiled/{sorted(compiled)[0]}/1234.blob", "ir/.unet-x.partial/model.xml", "compiled/notes/c.txt"):
        (cache / planted).parent.mkdir(parents=True, exist_ok=True)
        (cache / planted).write_text("x")
    _run_openvino_fp32(bundle)  # both modes' entries are current: neither removes the other's
    assert _cache_listing(bundle) == current | {"ir/.unet-x.partial/model.xml", "compiled/notes/c.txt"}

    # A rewrite whose name changes (say, its weight limit) makes the U-Net's previous conversion stale.
    renamed = tuple(dataclasses.replace(r, name=f"{r.name}-v2") for r in OpenVINOFP32Backend.rewrites[Component.UNET])
    monkeypatch.setattr(OpenVINOFP32Backend, "rewrites", {Component.UNET: renamed})
    _run_openvino_fp32(bundle)
    converted = {d.name for d in (cache / "ir").iterdir() if d.name.startswith("unet-")}
    assert len([name for name in converted if "winograd" in name]) == 1 and all(name.endswith("-v2") for name in converted if "winograd" in name)


@needs_bf16
def test_fast_mode_compiles_an_fp16_copy_converted_once(tiny_bundle: Path, tmp_path: Path, monkeypatch) -> None:
    bundle = Path(shutil.copytree(tiny_bundle, tmp_path / "bundle", ignore=shutil.ignore_patterns(".cache")))
    pipe = sdrt.engine.load(bundle, backend="openvino-bf16", safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    first = pipe("a cat", num_inference_steps=2, height=64, width=64, seed=0, output_type="np").images
    converted = sorted((bundle / CACHE_SUBDIR / "ir").iterdir())
    assert [d.name.split("-")[0] for d in converted] == ["text_encoder", "unet", "vae_decoder"]
    unet_ir = next(d for d in converted if d.name.startswith("unet"))
    onnx_bytes = sum(f.stat().st_size for f in (bundle / "unet").iterdir())
    assert (unet_ir / "model.bin").stat().st_size < 0.6 * onnx_bytes  # fp16 weights: about half

    from sdrt.engine.backends.openvino import backend as openvino_backend

    def no_conversion(*args, **kwargs):
        raise AssertionError("converted again")

    monkeypatch.setattr(openvino_backend._openvino(), "save_model", no_conversion)
    again = sdrt.engine.load(bundle, backend="openvino-bf16", safety_checker=False)
    again.set_progress_bar_config(disable=True)
    np.testing.assert_array_equal(again("a cat", num_inference_steps=2, height=64, width=64, seed=0, output_type="np").images, first)


@needs_openvino
def test_openvino_hands_back_mapped_weights_while_compiling_and_first_running(tiny_bundle: Path, monkeypatch) -> None:
    # Compiling and the first inference read the mapped weights, so pages are handed back during both; after them
    # the weights are repacked, and later calls must not pay for the advice again.
    import contextlib

    from sdrt.engine.backends.openvino import backend as openvino_backend

    advised: list[Path] = []

    @contextlib.contextmanager
    def record_hand_back(directory: Path):
        advised.append(directory)
        yield

    monkeypatch.setattr(openvino_backend, "handing_back_mapped_pages", record_hand_back)
    pipe = sdrt.engine.load(tiny_bundle, backend="openvino-fp32", safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    for seed in (0, 1):
        pipe("a cat", num_inference_steps=3, height=64, width=64, seed=seed)
    assert advised == [pipe.backend.bundle_dir] * (2 * len(pipe.backend.loaded_components))


class _ReleaseRecorder:
    """Stands in for a compiled OpenVINO model and records which component's intermediate buffers were released."""

    def __init__(self, compiled, component, released: list) -> None:
        self._compiled, self._component, self._released = compiled, component, released

    def release_memory(self) -> None:
        self._released.append(self._component)
        self._compiled.release_memory()


def _recording_releases(backend, monkeypatch) -> tuple[list, list]:
    """Patch `backend` so each compiled model records its releases; return (released components, weak refs to every
    model loaded)."""
    import weakref

    released: list = []
    loaded: list = []
    load, compile_ = backend._load, backend._compile

    def recording_load(component):
        model = load(component)
        loaded.append(weakref.ref(model))
        return model

    def recording_compile(model, shapes, guided_halves=False):
        compile_(model, shapes, guided_halves)
        model.compiled = _ReleaseRecorder(model.compiled, model.component, released)

    monkeypatch.setattr(backend, "_load", recording_load)
    monkeypatch.setattr(backend, "_compile", recording_compile)
    for model in backend._loaded.values():  # loaded at load() from the compiled-model cache
        loaded.append(weakref.ref(model))
        model.compiled = _ReleaseRecorder(model.compiled, model.component, released)
    return released, loaded


@needs_openvino
def test_openvino_releases_a_stages_buffers_when_the_request_moves_on(tiny_bundle: Path, monkeypatch) -> None:
    # Once per stage change, never between the U-Net's calls, and with no effect on the images.
    from sdrt.engine.specs import Component

    pipe = sdrt.engine.load(tiny_bundle, backend="openvino-fp32", safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    released, _ = _recording_releases(pipe.backend, monkeypatch)
    first = pipe("a cat", num_inference_steps=3, height=64, width=64, seed=0, output_type="np").images
    second = pipe("a cat", num_inference_steps=3, height=64, width=64, seed=0, output_type="np").images
    stages = [Component.TEXT_ENCODER, Component.UNET]
    assert released == stages + [Component.VAE_DECODER] + stages
    np.testing.assert_array_equal(second, first)


@needs_openvino
def test_openvino_releases_the_last_stages_buffers_before_the_next_model_compiles(tiny_bundle: Path, tmp_path: Path, monkeypatch) -> None:
    # Released only when the next stage first ran, they were held through its compilation: in exact mode at 512², the
    # VAE decoder's 1.3 GB while the safety checker compiled, the first request's peak.
    from sdrt.engine.specs import Component

    bundle = Path(shutil.copytree(tiny_bundle, tmp_path / "bundle", ignore=shutil.ignore_patterns(".cache")))  # nothing loaded ahead
    pipe = sdrt.engine.load(bundle, backend="openvino-fp32", safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    events, _ = _recording_releases(pipe.backend, monkeypatch)
    compile_model = pipe.backend._core.compile_model
    monkeypatch.setattr(pipe.backend._core, "compile_model", lambda *args, **kwargs: events.append("compile") or compile_model(*args, **kwargs))
    pipe("a cat", num_inference_steps=2, height=64, width=64, seed=0)

    assert events == ["compile", Component.TEXT_ENCODER, "compile", Component.UNET, "compile"]


@needs_openvino
def test_openvino_one_at_a_time_lets_each_dropped_model_go(tiny_bundle: Path, monkeypatch) -> None:
    # The backend remembers the last model it ran only weakly: a model the memory policy drops must be freed.
    import gc

    pipe = sdrt.engine.load(tiny_bundle, backend="openvino-fp32", safety_checker=False, memory="one-at-a-time")
    pipe.set_progress_bar_config(disable=True)
    released, loaded = _recording_releases(pipe.backend, monkeypatch)
    pipe("a cat", num_inference_steps=2, height=64, width=64, seed=0)
    gc.collect()
    assert len(loaded) == 3  # text encoder, U-Net, VAE decoder
    assert [model() is None for model in loaded] == [True, True, False]
    assert released == []  # nothing left loaded to release


@needs_openvino
def test_openvino_compiles_for_the_shapes_it_is_called_with(tiny_bundle: Path, tmp_path: Path, monkeypatch) -> None:
    # Static shapes let OpenVINO plan buffers ahead and pick kernels for them (SD 1.5 at 512² in fp32: the decoder's
    # buffers 1.21 -> 0.81 GB; the U-Net 0.6 GB less, and 6 % faster). The decoder is recompiled for each new size;
    # exact mode's U-Net for its first shapes, then, once they change, for any shapes, never again. The pixels are
    # those of models compiled for any shapes.
    from sdrt.engine.backends.openvino import backend as openvino_backend
    from sdrt.engine.backends.openvino.passes import registry

    # and every upsampling convolution of a model compiled for static shapes runs as phase convolutions
    rewrites: list[int] = []
    phases = registry.UPSAMPLE_PHASES
    counted = dataclasses.replace(phases, apply=lambda model, store: rewrites.append(phases.apply(model, store)) or rewrites[-1])
    monkeypatch.setattr(openvino_backend.OpenVINOFP32Backend, "static_shape_rewrites", {
        component: tuple(counted if r is phases else r for r in component_rewrites)
        for component, component_rewrites in openvino_backend.OpenVINOFP32Backend.static_shape_rewrites.items()
    })
    bundle = Path(shutil.copytree(tiny_bundle, tmp_path / "bundle", ignore=shutil.ignore_patterns(".cache")))  # nothing loaded ahead
    pipe = sdrt.engine.load(bundle, backend="openvino-fp32", safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    compiled: list = []
    compile_ = pipe.backend._compile
    monkeypatch.setattr(pipe.backend, "_compile", lambda model, shapes, guided_halves=False: compiled.append((model.component, shapes))
                        or compile_(model, shapes, guided_halves))
    sizes = [(64, 64), (64, 96), (64, 64), (96, 64)]
    images = [pipe("a cat", num_inference_steps=2, height=h, width=w, seed=0, output_type="np").images for h, w in sizes]

    f, channels = pipe.vae_scale_factor, pipe.manifest.model.latent_channels
    assert [shapes for component, shapes in compiled if component is Component.VAE_DECODER] == [
        {"latent_sample": [1, channels, h // f, w // f]} for h, w in sizes
    ]
    unet_compiles = [shapes for component, shapes in compiled if component is Component.UNET]
    assert len(unet_compiles) == 2 and unet_compiles[1] is None
    assert unet_compiles[0]["sample"] == [2, channels, 64 // f, 64 // f]  # the prompt's and the empty prompt's
    assert all(shapes is None for component, shapes in compiled if component not in (Component.VAE_DECODER, Component.UNET))
    # the decoder's for each new size (a size met again is loaded from the compiled-model cache), the U-Net's
    assert len(rewrites) == len(set(sizes)) + 1 and all(count >= 1 for count in rewrites)

    monkeypatch.setattr(openvino_backend.OpenVINOFP32Backend, "compile_shapes", {})
    any_shape = sdrt.engine.load(tiny_bundle, backend="openvino-fp32", safety_checker=False)
    any_shape.set_progress_bar_config(disable=True)
    for (h, w), image in zip(sizes, images):
        np.testing.assert_allclose(any_shape("a cat", num_inference_steps=2, height=h, width=w, seed=0, output_type="np").images,
                                   image, atol=1e-5)


@needs_openvino
def test_static_shape_rewrites_keep_their_constants_in_mapped_files(tmp_path: Path) -> None:
    # Held in the heap, a rewrite's constants stay resident beside OpenVINO's repacked copy; read from an IR, they are
    # mapped, and their pages handed back once repacked. Written once per key, rewritten if the shapes differ.
    import sys

    import openvino

    from sdrt.engine.backends.openvino.constants import mapped_constants

    core = openvino.Core()
    arrays = [np.arange(24, dtype=np.float32).reshape(2, 3, 2, 2), np.full((4, 1), -1.5, np.float32)]
    def store(key, arrays):
        return mapped_constants(core, tmp_path, key, [array.shape for array in arrays], lambda: arrays)

    constants = store("up/conv", arrays)
    for constant, array in zip(constants, arrays):
        np.testing.assert_array_equal(constant.get_node().get_data(), array)
    stored, = [path for path in tmp_path.rglob("*.bin")]
    if sys.platform.startswith("linux"):
        assert str(stored.resolve()) in Path("/proc/self/maps").read_text()
    written = stored.stat().st_mtime_ns

    again = store("up/conv", [np.zeros_like(array) for array in arrays])  # same shapes: read
    np.testing.assert_array_equal(again[0].get_node().get_data(), arrays[0])
    assert stored.stat().st_mtime_ns == written

    other = store("up/conv", [np.ones((3,), np.float32)])
    assert [list(c.get_shape()) for c in other] == [[3]]
    assert len(list(tmp_path.rglob("*.bin"))) == 1 and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert len(store("down/conv", arrays)) == 2
    assert len(list(tmp_path.rglob("*.bin"))) == 2

    # fp16 arrays come back as OpenVINO reads fp16-compressed weights: the fp16 constant (half the bytes on disk)
    # and its conversion to fp32, which OpenVINO marks as a decompression and its CPU plugin keeps in fp16
    halves = [np.linspace(-2, 2, 12, dtype=np.float16).reshape(3, 4)]
    decompressed, = store("ff/proj", halves)
    assert decompressed.get_node().get_type_name() == "Convert" and decompressed.get_element_type() == openvino.Type.f32
    np.testing.assert_array_equal(decompressed.get_node().input_value(0).get_node().get_data(), halves[0])
    with pytest.raises(ValueError, match="all float16 or none"):
        store("mixed", [halves[0], arrays[1]])
