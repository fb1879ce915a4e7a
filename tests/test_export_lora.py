"""LoRA fused at export (`sdrt export CKPT OUT --lora FILE:SCALE ...`): the fused bundle draws what the base bundle
draws with `pipe.load_lora(FILE, SCALE)` and what diffusers draws with the deltas added by hand; several LoRAs add
up; the manifest records them; bad specs, missing files and foreign keys fail before any export work, leaving
nothing behind."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file, save_file

import sdrt.engine
from sdrt.cli.main import main
from sdrt.engine.errors import InvalidArgumentError, LoraError, UnknownLoraKeysError
from sdrt.engine.manifest import MANIFEST_NAME, FusedLoraEntry, read_manifest
from sdrt.export import bundle as bundle_module
from sdrt.export import export_bundle
from sdrt.export.lora_fusion import LoraSpec
from tests.test_lora import ARGS, _make_lora
from tests.test_parity import MAX_PIXEL_DIFF


def _latents() -> np.ndarray:
    return np.random.default_rng(7).standard_normal((1, 4, 8, 8), dtype=np.float32)  # the tiny arch: 64 px / 8


def _pipe(bundle: Path):
    pipe = sdrt.engine.load(bundle, backend="onnxruntime-cpu", safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _ours(pipe) -> np.ndarray:
    return pipe(**ARGS, latents=_latents(), output_type="np").images


def _diffusers_with(checkpoint: Path, deltas_and_scales: list[tuple[dict[str, dict[str, torch.Tensor]], float]]) -> np.ndarray:
    reference = StableDiffusionPipeline.from_pretrained(checkpoint, safety_checker=None, requires_safety_checker=False)
    reference.set_progress_bar_config(disable=True)
    with torch.no_grad():
        for deltas, scale in deltas_and_scales:
            for component, component_deltas in deltas.items():
                parameters = dict(getattr(reference, component).named_parameters())
                for name, delta in component_deltas.items():
                    parameters[name] += scale * delta
    return reference(**ARGS, latents=torch.from_numpy(_latents()), output_type="np").images


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.slow  # exports, fuses and runs three pipelines: 15 s
def test_a_fused_lora_draws_what_the_runtime_lora_and_diffusers_draw(tiny_checkpoint: Path, tiny_bundle: Path, tmp_path: Path) -> None:
    lora = tmp_path / "style.safetensors"
    deltas = _make_lora(tiny_checkpoint, "peft", lora)
    fused = tmp_path / "fused"
    assert main(["export", str(tiny_checkpoint), str(fused), "--lora", f"{lora}:0.8", "--no-quantize"]) == 0
    actual = _ours(_pipe(fused))

    base = _pipe(tiny_bundle)
    unfused = _ours(base)
    base.load_lora(lora, scale=0.8)
    assert np.abs(actual - _ours(base)).max() <= MAX_PIXEL_DIFF
    assert np.abs(actual - _diffusers_with(tiny_checkpoint, [(deltas, 0.8)])).max() <= MAX_PIXEL_DIFF
    assert np.abs(actual - unfused).max() > 20 * MAX_PIXEL_DIFF  # the LoRA changes the image: a no-op would fail
    manifest = _pipe(fused).manifest
    assert manifest.loras == (FusedLoraEntry(file="style.safetensors", sha256=_sha256(lora), scale=0.8),)
    assert manifest.source_sha256 is None  # a directory, not a single file


def test_manifests_without_the_new_fields_read_as_before(tiny_bundle: Path, tmp_path: Path) -> None:
    data = json.loads((tiny_bundle / MANIFEST_NAME).read_text())
    assert data["loras"] == [] and data["source_sha256"] is None
    del data["loras"], data["source_sha256"]  # as an sdrt before single files and fused LoRAs wrote it
    (tmp_path / MANIFEST_NAME).write_text(json.dumps(data))
    manifest = read_manifest(tmp_path)
    assert manifest.loras == () and manifest.source_sha256 is None
    assert manifest.components == read_manifest(tiny_bundle).components


@pytest.mark.slow
def test_several_loras_add_up(tiny_checkpoint: Path, tmp_path: Path) -> None:
    first, second = tmp_path / "first.safetensors", tmp_path / "second.safetensors"
    first_deltas = _make_lora(tiny_checkpoint, "peft", first, seed=1)
    second_deltas = _make_lora(tiny_checkpoint, "kohya", second, seed=2)
    out = export_bundle(tiny_checkpoint, tmp_path / "fused", loras=[LoraSpec(first, 0.8), LoraSpec.parse(str(second))])
    actual = _ours(_pipe(out))
    expected = _diffusers_with(tiny_checkpoint, [(first_deltas, 0.8), (second_deltas, 1.0)])
    assert np.abs(actual - expected).max() <= MAX_PIXEL_DIFF
    only_first = _diffusers_with(tiny_checkpoint, [(first_deltas, 0.8)])
    assert np.abs(actual - only_first).max() > 10 * MAX_PIXEL_DIFF  # the second LoRA counts
    assert [(e.file, e.scale) for e in _pipe(out).manifest.loras] == [("first.safetensors", 0.8), ("second.safetensors", 1.0)]


def test_lora_specs_parse() -> None:
    assert LoraSpec.parse("style.safetensors") == LoraSpec(Path("style.safetensors"), 1.0)
    assert LoraSpec.parse("dir/style.safetensors:0.5") == LoraSpec(Path("dir/style.safetensors"), 0.5)
    assert LoraSpec.parse("a:b.safetensors:-1e-1") == LoraSpec(Path("a:b.safetensors"), -0.1)
    for bad in ("style.safetensors:abc", "style.safetensors:", "style.safetensors:nan", ":0.5"):
        with pytest.raises(InvalidArgumentError, match="lora: expected FILE or FILE:SCALE"):
            LoraSpec.parse(bad)


@pytest.fixture
def no_export_work(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if the exporter starts tracing a model or converting a single file."""
    def refuse(*args, **kwargs):
        raise AssertionError("export work started before the LoRA was checked")

    monkeypatch.setattr(bundle_module, "_export_one", refuse)
    monkeypatch.setattr(bundle_module, "convert_single_file", refuse)


def test_bad_loras_fail_before_any_export_work(tiny_checkpoint: Path, tmp_path: Path, no_export_work, capsys) -> None:
    good = tmp_path / "good.safetensors"
    _make_lora(tiny_checkpoint, "peft", good)
    foreign = tmp_path / "foreign.safetensors"
    save_file({**load_file(str(good)), "unet.mid_block.not_a_layer.lora_A.weight": torch.zeros(4, 8)}, str(foreign))
    wrong_shape = tmp_path / "wrong_shape.safetensors"  # the rank matches, the weight's shape does not
    tensors = load_file(str(good))
    name = next(k for k in tensors if k.startswith("unet.") and k.endswith("attn1.to_q.lora_A.weight"))
    tensors[name] = torch.zeros(tensors[name].shape[0], tensors[name].shape[1] + 1)
    save_file(tensors, str(wrong_shape))
    out = tmp_path / "out"

    assert main(["export", str(tiny_checkpoint), str(out), "--lora", f"{good}:abc"]) == 2
    assert "argument --lora: lora: expected FILE or FILE:SCALE" in capsys.readouterr().err
    assert main(["export", str(tiny_checkpoint), str(out), "--lora", str(good), "--lora", str(tmp_path / "missing.safetensors")]) == 2
    assert "missing.safetensors does not exist" in capsys.readouterr().err
    with pytest.raises(UnknownLoraKeysError, match="foreign.safetensors: 1 LoRA keys match no U-Net") as caught:
        export_bundle(tiny_checkpoint, out, loras=[LoraSpec(foreign)])
    assert caught.value.keys == ["unet.mid_block.not_a_layer.lora_A.weight"]
    with pytest.raises(LoraError, match=r"wrong_shape.safetensors: unet delta for .*attn1.to_q.weight has shape"):
        export_bundle(tiny_checkpoint, out, loras=[LoraSpec(wrong_shape)])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["foreign.safetensors", "good.safetensors", "wrong_shape.safetensors"]


def test_a_bad_lora_fails_before_a_single_file_is_converted(tiny_checkpoint: Path, tmp_path: Path, no_export_work) -> None:
    from tests.ldm_layout import write_single_file

    single = write_single_file(tiny_checkpoint, tmp_path / "tiny.safetensors")
    with pytest.raises(LoraError, match="nothing.safetensors does not exist"):
        export_bundle(single, tmp_path / "out", loras=[LoraSpec(tmp_path / "nothing.safetensors")], config=tiny_checkpoint)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.safetensors"]
