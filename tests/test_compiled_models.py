"""OpenVINO's compiled models in the bundle's cache: loaded at `load()` once a process compiled them, keyed on
everything they depend on, written so that a failure leaves no entry, and reported by `load()`."""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

import sdrt.engine
from sdrt.engine.backends.openvino import backend as openvino_backend
from sdrt.engine.backends.openvino import compiled_models
from sdrt.engine.backends.openvino.backend import OpenVINOBF16Backend, OpenVINOFP32Backend
from sdrt.engine.backends.openvino.cache import CACHE_SUBDIR, COMPILED_SUBDIR
from sdrt.engine.specs import Component

pytestmark = pytest.mark.skipif(OpenVINOFP32Backend.unavailable_reason() is not None, reason="openvino not installed")

STAGES = {Component.TEXT_ENCODER, Component.UNET, Component.VAE_DECODER}


@pytest.fixture
def bundle(tiny_bundle: Path, tmp_path: Path) -> Path:
    """The tiny bundle with an empty cache."""
    return Path(shutil.copytree(tiny_bundle, tmp_path / "bundle", ignore=shutil.ignore_patterns(".cache")))


def _generate(bundle: Path, size: int = 64, backend: str = "openvino-fp32"):
    """A fresh load (as a new process would make) and one image; return (images, the pipeline, its load()'s loads)."""
    pipe = sdrt.engine.load(bundle, backend=backend, safety_checker=False)
    at_load = pipe.backend.model_loads
    pipe.set_progress_bar_config(disable=True)
    images = pipe("a cat", num_inference_steps=2, height=size, width=size, seed=0, output_type="np").images
    return images, pipe, at_load


def test_a_later_load_loads_every_compiled_model_and_the_first_request_only_runs(bundle: Path, caplog) -> None:
    first, pipe, at_load = _generate(bundle)
    assert at_load == ()  # an empty cache: nothing to load ahead
    assert {load.component for load in pipe.backend.model_loads} == STAGES
    assert not any(load.from_cache for load in pipe.backend.model_loads)

    with caplog.at_level(logging.INFO, logger="sdrt"):
        again, pipe, at_load = _generate(bundle)
    assert {load.component for load in at_load} == STAGES and all(load.from_cache for load in at_load)
    assert {load.component: load.shapes for load in at_load}[Component.UNET] == {
        "encoder_hidden_states": [2, 77, 32], "sample": [2, 4, 8, 8], "timestep": [2]}
    assert pipe.backend.model_loads == at_load  # the request compiled nothing
    assert "loaded 3 compiled models from the cache" in caplog.text
    np.testing.assert_array_equal(again, first)


def test_new_shapes_compile_for_them_and_not_for_any_shapes(bundle: Path) -> None:
    _generate(bundle, 64)
    _, pipe, at_load = _generate(bundle, 96)  # the U-Net preloaded for 64x64: a first request of 96x96 is its own
    unet = [load for load in pipe.backend.model_loads if load.component is Component.UNET]
    assert [load.from_cache for load in unet] == [True, False]
    assert unet[1].shapes["sample"] == [2, 4, 12, 12]
    _, pipe, at_load = _generate(bundle, 96)
    assert {load.component: load.shapes.get("sample", load.shapes.get("latent_sample")) for load in at_load if load.shapes} == {
        Component.UNET: [2, 4, 12, 12], Component.VAE_DECODER: [1, 4, 12, 12]}  # the shapes used last
    assert pipe.backend.model_loads == at_load


@pytest.mark.slow
def test_another_openvino_or_cpu_compiles_again(bundle: Path, monkeypatch) -> None:
    _generate(bundle)
    environment = openvino_backend._environment()
    for changed in (dataclasses.replace(environment, openvino_version="0.0.0"), dataclasses.replace(environment, cpu_name="another CPU"),
                    dataclasses.replace(environment, cpu_capabilities=environment.cpu_capabilities[:-1])):
        monkeypatch.setattr(openvino_backend, "_environment", lambda changed=changed: changed)
        _, pipe, at_load = _generate(bundle)
        assert at_load == ()
        assert not any(load.from_cache for load in pipe.backend.model_loads)


@pytest.mark.skipif(OpenVINOBF16Backend.unavailable_reason() is not None, reason="no OpenVINO bf16 on this CPU")
def test_each_precision_has_its_own_compiled_models(bundle: Path) -> None:
    _generate(bundle, backend="openvino-fp32")
    _, pipe, at_load = _generate(bundle, backend="openvino-bf16")
    assert at_load == () and not any(load.from_cache for load in pipe.backend.model_loads)
    _, pipe, at_load = _generate(bundle, backend="openvino-fp32")
    assert {load.component for load in at_load} == STAGES


def test_keys_differ_in_everything_a_compiled_model_depends_on() -> None:
    environment = compiled_models.Environment("2026.4", "CPU", ("BF16", "FP32"))
    key = compiled_models.CompiledKey.create(Component.UNET, "unet-0123-f32", "f32", {"sample": [2, 4, 8, 8]}, True, environment)
    changes = [
        dict(component=Component.VAE_DECODER), dict(model="unet-4567-f32"), dict(precision="bf16"),
        dict(shapes=(("sample", (2, 4, 12, 12)),)), dict(shapes=None), dict(guided_halves=False),
        dict(environment=dataclasses.replace(environment, openvino_version="2026.5")),
        dict(environment=dataclasses.replace(environment, cpu_name="other")),
        dict(environment=dataclasses.replace(environment, cpu_capabilities=("FP32",))),
    ]
    digests = {dataclasses.replace(key, **change).digest for change in changes}
    assert len(digests | {key.digest}) == len(changes) + 1


def _entries(bundle: Path) -> list[Path]:
    return sorted((bundle / CACHE_SUBDIR / COMPILED_SUBDIR).glob(f"*/{compiled_models.ENTRIES_SUBDIR}/*"))


class _FailingCore:
    """An OpenVINO Core whose compilation fails once OpenVINO may have written part of a blob."""

    def __init__(self, core) -> None:
        self._core = core

    def __getattr__(self, name):
        return getattr(self._core, name)

    def compile_model(self, source, device, config):
        Path(config["CACHE_DIR"], "0.blob").write_bytes(b"half a blob")
        raise RuntimeError("compilation interrupted")


def test_an_interrupted_compilation_leaves_no_entry(bundle: Path) -> None:
    pipe = sdrt.engine.load(bundle, backend="openvino-fp32", safety_checker=False)
    pipe.backend._core = _FailingCore(pipe.backend._core)
    with pytest.raises(RuntimeError, match="interrupted"):
        pipe("a cat", num_inference_steps=1, height=64, width=64, seed=0, output_type="np")
    assert [compiled_models.CompiledEntry(entry).record() for entry in _entries(bundle)] == [None]
    _, pipe, at_load = _generate(bundle)  # the half entry is not read: compiled again, and complete
    assert at_load == () and not any(load.from_cache for load in pipe.backend.model_loads)
    records = [compiled_models.CompiledEntry(entry).record() for entry in _entries(bundle)]
    assert len(records) == 3 and None not in records


def test_the_least_recently_used_shapes_are_evicted(bundle: Path, monkeypatch) -> None:
    monkeypatch.setattr(compiled_models, "MAX_ENTRIES_PER_MODEL", 2)
    pipe = sdrt.engine.load(bundle, backend="openvino-fp32", safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    for size in (64, 96, 128):
        pipe("a cat", num_inference_steps=1, height=size, width=size, seed=0, output_type="np")
    decoder = [entry for entry in _entries(bundle) if entry.parent.parent.name.startswith("vae_decoder")]
    shapes = [json.loads((entry / compiled_models.ENTRY_FILE).read_text())["key"]["shapes"]["latent_sample"] for entry in decoder]
    assert sorted(shapes) == [[1, 4, 12, 12], [1, 4, 16, 16]]


def _fake_entry(compiled: Path, model: str, name: str, size: int, used_at: float) -> compiled_models.CompiledEntry:
    entry = compiled_models.CompiledEntry(compiled / model / compiled_models.ENTRIES_SUBDIR / name)
    entry.blob_dir.mkdir(parents=True)
    (entry.blob_dir / "a.blob").write_bytes(b"\0" * size)
    (entry.directory / compiled_models.ENTRY_FILE).write_text("{}")
    os.utime(entry.directory / compiled_models.ENTRY_FILE, (used_at, used_at))
    return entry


def test_entries_of_every_model_go_least_recently_used_first_beyond_the_bytes(tmp_path: Path) -> None:
    entries = {name: _fake_entry(tmp_path, model, name, size, used_at) for name, model, size, used_at in (
        ("old-unet", "unet-x-f32", 4000, 100), ("old-decoder", "vae_decoder-y-bf16", 1000, 200),
        ("recent-unet", "unet-x-bf16", 2000, 300), ("recent-decoder", "vae_decoder-y-bf16", 1000, 400))}
    new = _fake_entry(tmp_path, "unet-x-bf16", "new", 3000, 500)
    compiled_models.evict_least_recent(new, max_bytes=7000)
    # 11000 bytes: the two oldest (of two other models) go, which brings them to 6000; the recent ones stay
    assert sorted(p.name for p in tmp_path.glob("*/*/*")) == ["new", "recent-decoder", "recent-unet"]
    compiled_models.evict_least_recent(entries["recent-decoder"], max_bytes=0)
    assert [p.name for p in tmp_path.glob("*/*/*")] == ["recent-decoder"]  # the entry just used stays, whatever its size


def test_the_cache_stays_within_its_bytes_across_precisions(bundle: Path, monkeypatch) -> None:
    _generate(bundle, backend="openvino-fp32")
    fp32 = _entries(bundle)
    used = {entry: (entry / compiled_models.ENTRY_FILE).stat().st_mtime_ns for entry in fp32}
    budget = sum(compiled_models._directory_bytes(entry) for entry in fp32)
    monkeypatch.setattr(compiled_models, "MAX_BYTES_PER_BUNDLE_BYTE", budget / openvino_backend._bundle_bytes(bundle))
    _, pipe, _ = _generate(bundle, backend="openvino-bf16")
    entries = _entries(bundle)
    assert sum(compiled_models._directory_bytes(entry) for entry in entries) <= budget
    assert len([e for e in entries if e.parent.parent.name.endswith("-bf16")]) == 3  # the three just compiled
    kept = [entry for entry in fp32 if entry in entries]
    assert len(kept) < 3 and kept == sorted(fp32, key=used.get)[3 - len(kept):]  # the least recently used went


def test_a_blob_openvino_cannot_read_is_compiled_again_and_reported_so(bundle: Path) -> None:
    _generate(bundle)
    blob = next(path for entry in _entries(bundle) if entry.parent.parent.name.startswith("unet-")
                for path in (entry / compiled_models.BLOB_SUBDIR).glob("*.blob"))
    size = blob.stat().st_size
    blob.chmod(0o644)
    with blob.open("r+b") as file:
        file.truncate(size // 2)  # as an interrupted write leaves it
    _, _, at_load = _generate(bundle)
    assert {load.component: load.from_cache for load in at_load} == {
        Component.TEXT_ENCODER: True, Component.UNET: False, Component.VAE_DECODER: True}
    assert blob.stat().st_size == size  # OpenVINO wrote it again
    _, _, at_load = _generate(bundle)
    assert all(load.from_cache for load in at_load)
