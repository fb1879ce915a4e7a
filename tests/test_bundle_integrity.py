"""A missing, truncated or tampered bundle file, or an unknown manifest version, is refused at load with its name."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

import sdrt.engine
from sdrt.engine import BundleError


@pytest.fixture
def bundle_copy(tiny_bundle: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_bundle, tmp_path / "bundle"))


def _flip_a_bit(path: Path) -> None:
    """Modify a file without changing its size."""
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x01
    path.write_bytes(bytes(data))


def test_intact_bundle_loads(bundle_copy: Path) -> None:
    assert sdrt.engine.load(bundle_copy, safety_checker=False).manifest.model.latent_channels == 4


def test_missing_file(bundle_copy: Path) -> None:
    (bundle_copy / "unet/model.onnx").unlink()
    with pytest.raises(BundleError, match=r"unet/model.onnx is missing"):
        sdrt.engine.load(bundle_copy)


def test_truncated_file(bundle_copy: Path) -> None:
    path = bundle_copy / "vae_decoder/model.onnx"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(BundleError, match=r"vae_decoder/model.onnx is 1000 bytes.*truncated"):
        sdrt.engine.load(bundle_copy)


def test_tampered_file_same_size(bundle_copy: Path) -> None:
    path = bundle_copy / "tokenizer/merges.txt"
    _flip_a_bit(path)
    with pytest.raises(BundleError, match=r"merges.txt does not match its sha256"):
        sdrt.engine.load(bundle_copy)


@pytest.mark.parametrize("version", [0, 2, "1", None])
def test_unknown_manifest_version(bundle_copy: Path, version) -> None:
    manifest = json.loads((bundle_copy / "manifest.json").read_text())
    manifest["format_version"] = version
    (bundle_copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=r"format version .* reads version 1"):
        sdrt.engine.load(bundle_copy)


def test_malformed_manifest(bundle_copy: Path) -> None:
    (bundle_copy / "manifest.json").write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        sdrt.engine.load(bundle_copy)


def test_not_a_bundle(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="manifest.json is missing"):
        sdrt.engine.load(tmp_path)
    with pytest.raises(BundleError, match="does not exist"):
        sdrt.engine.load(tmp_path / "nowhere")


def test_unknown_backend(tiny_bundle: Path) -> None:
    with pytest.raises(sdrt.engine.BackendUnavailableError, match="unknown backend 'tpu'"):
        sdrt.engine.load(tiny_bundle, backend="tpu")


def test_verified_files_are_not_hashed_again(bundle_copy: Path, monkeypatch) -> None:
    from sdrt.engine import manifest

    sdrt.engine.load(bundle_copy, safety_checker=False)
    hashed: list[Path] = []
    real_sha256 = manifest.sha256_file
    monkeypatch.setattr(manifest, "sha256_file", lambda path: hashed.append(path) or real_sha256(path))
    sdrt.engine.load(bundle_copy, safety_checker=False)
    assert hashed == []
    (bundle_copy / "tokenizer/merges.txt").touch()  # a new mtime: that one file is hashed again, and still passes
    sdrt.engine.load(bundle_copy, safety_checker=False)
    assert [p.name for p in hashed] == ["merges.txt"]


def test_file_modified_after_verification_is_caught(bundle_copy: Path) -> None:
    sdrt.engine.load(bundle_copy, safety_checker=False)
    path = bundle_copy / "tokenizer/merges.txt"
    _flip_a_bit(path)
    with pytest.raises(BundleError, match=r"merges.txt does not match its sha256"):
        sdrt.engine.load(bundle_copy)


def test_forged_verification_record_is_ignored_for_a_rewritten_file(bundle_copy: Path) -> None:
    sdrt.engine.load(bundle_copy, safety_checker=False)
    path = bundle_copy / "tokenizer/merges.txt"
    record = json.loads((bundle_copy / ".cache/verified.json").read_text())
    _flip_a_bit(path)
    # Restoring mtime (which any user can do) is not enough: the change time moved and cannot be set back.
    os.utime(path, ns=(record["tokenizer/merges.txt"]["stat"][1],) * 2)
    with pytest.raises(BundleError, match=r"merges.txt does not match its sha256"):
        sdrt.engine.load(bundle_copy)


def test_named_samplers_use_the_scheduler_config_verified_at_load(bundle_copy: Path) -> None:
    """The scheduler config is read (and its sha256 checked) at load, not when a named sampler is first asked for: a
    tampered config fails the load, and one changed after the load never reaches a sampler."""
    from sdrt.engine.schedulers import DDIMConfig

    path = bundle_copy / "scheduler/scheduler_config.json"
    original = json.loads(path.read_text())
    pipe = sdrt.engine.load(bundle_copy, safety_checker=False)
    tampered = {**original, "beta_end": 0.02}
    path.write_text(json.dumps(tampered))
    assert pipe.sampler("ddim").config == DDIMConfig.from_dict(original) != DDIMConfig.from_dict(tampered)
    with pytest.raises(BundleError, match=r"scheduler_config.json is \d+ bytes.*truncated or replaced"):
        sdrt.engine.load(bundle_copy)
