"""The exporter writes a complete, validated bundle atomically, or nothing."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from sdrt.engine.manifest import read_manifest, verify_files
from sdrt.engine.specs import OPTIONAL_COMPONENTS, SPECS, Component
from sdrt.export import CheckpointError, export_bundle
from sdrt.export import bundle as bundle_module


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def test_manifest_records_what_the_runtime_needs(bundles: dict[str, Path], checkpoints: dict[str, Path]) -> None:
    for arch, bundle in bundles.items():
        manifest = read_manifest(bundle)
        verify_files(bundle, manifest)
        unet_config = json.loads((checkpoints[arch] / "unet/config.json").read_text())
        vae_config = json.loads((checkpoints[arch] / "vae/config.json").read_text())
        assert manifest.model.latent_channels == vae_config["latent_channels"]
        assert manifest.model.vae_scale_factor == 2 ** (len(vae_config["block_out_channels"]) - 1)
        assert manifest.model.vae_scaling_factor == vae_config["scaling_factor"]
        assert manifest.model.sample_size == unet_config["sample_size"]
        assert manifest.tokenizer.model_max_length == 77
        assert manifest.source_checkpoint == str(checkpoints[arch].resolve())
        # exported on request only, and SDXL's second encoder
        assert set(manifest.components) == set(Component) - OPTIONAL_COMPONENTS - {Component.TEXT_ENCODER_2}
        for component, entry in manifest.components.items():
            assert [t.name for t in entry.inputs] == [t.name for t in SPECS[component].inputs]
            assert entry.export_max_abs_diff < 1e-3
            assert entry.file in manifest.files
    assert read_manifest(bundles["tiny-alt"]).tokenizer.pad_token == "!"
    assert read_manifest(bundles["tiny"]).tokenizer.pad_token == "<|endoftext|>"


def test_graphs_are_valid_and_dynamic(tiny_bundle: Path) -> None:
    onnx.checker.check_model(str(tiny_bundle / "unet/model.onnx"), full_check=True)
    session = ort.InferenceSession(str(tiny_bundle / "unet/model.onnx"), providers=["CPUExecutionProvider"])
    shapes = {i.name: i.shape for i in session.get_inputs()}
    assert shapes["sample"] == ["batch", 4, "latent_height", "latent_width"]
    assert shapes["encoder_hidden_states"] == ["batch", "context_length", 32]  # long prompts: 77 per chunk
    for batch, h, w, chunks in [(1, 8, 8, 1), (3, 9, 15, 2), (2, 16, 8, 3)]:
        out = session.run(None, {
            "sample": np.zeros((batch, 4, h, w), np.float32),
            "timestep": np.full((batch,), 10, np.float32),
            "encoder_hidden_states": np.zeros((batch, 77 * chunks, 32), np.float32),
        })[0]
        assert out.shape == (batch, 4, h, w)


def test_existing_out_dir_is_refused_without_force(tiny_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "bundle"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="force"):
        export_bundle(tiny_checkpoint, out)
    assert _leftovers(out) == ["keep.txt"]


@pytest.mark.slow
def test_force_replaces_only_when_complete(tiny_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "bundle"
    out.mkdir()
    (out / "old.txt").write_text("old")
    export_bundle(tiny_checkpoint, out, force=True)
    assert not (out / "old.txt").exists()
    verify_files(out, read_manifest(out))
    assert _leftovers(tmp_path) == ["bundle"]


@pytest.mark.parametrize("failure", [RuntimeError("disk on fire"), KeyboardInterrupt()])
def test_failed_or_interrupted_export_leaves_nothing(tiny_checkpoint: Path, tmp_path: Path, monkeypatch, failure) -> None:
    calls = []

    def fail_on_second_model(*args, **kwargs):
        calls.append(args)
        if len(calls) == 2:
            raise failure
        return real_validate(*args, **kwargs)

    real_validate = bundle_module._compare
    monkeypatch.setattr(bundle_module, "_compare", fail_on_second_model)
    with pytest.raises(type(failure)):
        export_bundle(tiny_checkpoint, tmp_path / "bundle")
    assert _leftovers(tmp_path) == []


def test_not_a_checkpoint(tiny_checkpoint: Path, tmp_path: Path) -> None:
    broken = Path(shutil.copytree(tiny_checkpoint, tmp_path / "ckpt"))
    (broken / "tokenizer/merges.txt").unlink()
    with pytest.raises(CheckpointError, match="missing tokenizer/merges.txt"):
        export_bundle(broken, tmp_path / "bundle")
    with pytest.raises(CheckpointError, match="does not exist"):
        export_bundle(tmp_path / "nowhere", tmp_path / "bundle")
    assert _leftovers(tmp_path) == ["ckpt"]


@pytest.mark.slow
def test_large_models_use_one_external_data_file(tiny_checkpoint: Path, tiny_bundle: Path, tmp_path: Path, monkeypatch) -> None:
    # A full-size U-Net (3.4 GB in fp32) exceeds protobuf's 2 GB; shrink the limit so the tiny models take that path.
    import sdrt.engine
    from sdrt.export import graph_cleanup

    monkeypatch.setattr(graph_cleanup, "PROTOBUF_LIMIT_BYTES", 200_000)
    out = export_bundle(tiny_checkpoint, tmp_path / "bundle")
    manifest = read_manifest(out)
    assert "unet/model.onnx.data" in manifest.files
    assert (out / "unet/model.onnx").stat().st_size < (out / "unet/model.onnx.data").stat().st_size
    onnx.checker.check_model(str(out / "unet/model.onnx"), full_check=True)

    latents = np.random.default_rng(0).standard_normal((1, 4, 8, 8), dtype=np.float32)
    images = []
    for bundle in (out, tiny_bundle):
        pipe = sdrt.engine.load(bundle, safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        images.append(pipe("a cat", num_inference_steps=2, height=64, width=64, latents=latents, output_type="np").images)
    np.testing.assert_array_equal(images[0], images[1])

    (out / "unet/model.onnx.data").write_bytes(b"")
    with pytest.raises(sdrt.engine.BundleError, match="model.onnx.data is 0 bytes"):
        sdrt.engine.load(out)
