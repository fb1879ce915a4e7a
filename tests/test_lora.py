"""LoRA without a rebuild: LoRA files in both key formats against diffusers with the deltas added to its weights by
hand; unloading and scale 0 give the base images back exactly; bad files, old bundles and backends that cannot
replace weights raise their specific errors; the ONNX initializer reader; and the TensorRT refit path (refitter
calls, CUDA graphs dropped, non-refittable engines refused) on the fake tensorrt and cuda-python modules."""
from __future__ import annotations

import json
import shutil
import types
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from diffusers import StableDiffusionPipeline
from onnx import numpy_helper
from safetensors.torch import save_file

import sdrt.engine
from sdrt.engine.backends.base import Backend
from sdrt.engine.backends.tensorrt import backend as tensorrt_backend
from sdrt.engine.backends.tensorrt import runner as runner_module
from sdrt.engine.backends.tensorrt.backend import TensorRTBackend
from sdrt.engine.backends.tensorrt.engines.profile import Precision
from sdrt.engine.errors import GpuError, NoRefitMapError, UnknownLoraKeysError, WeightsNotReplaceableError
from sdrt.engine.manifest import MANIFEST_NAME, describe_files
from sdrt.engine.onnx_weights import read_initializers
from sdrt.engine.refit_map import read_refit_map
from sdrt.engine.specs import Component
from sdrt.export.tensorrt_build import build_engines
from tests.test_parity import MAX_PIXEL_DIFF
from tests.test_tensorrt_host import H100, FakeCompiler, _component_files, _fake_bundle, _x, fake_gpu  # noqa: F401

RANK = 4
ALPHA = 2.0  # != RANK: the alpha / rank factor is exercised
SCALE = 0.8
# LoRA targets, as LoRA trainers pick them: attention and MLP Linears, the 1x1 proj_in conv, a 3x3 conv (LoCon)
UNET_TARGETS = ("attn1.to_q", "attn1.to_v", "attn2.to_k", "attn2.to_out.0", "ff.net.2", "proj_in", "conv_in")
TEXT_TARGETS = ("self_attn.q_proj", "self_attn.v_proj", "mlp.fc1")
ARGS = dict(prompt="a red circle", num_inference_steps=3, guidance_scale=7.5, height=64, width=64)


def _targets(module: torch.nn.Module, suffixes: tuple[str, ...]) -> dict[str, torch.nn.Module]:
    found = {name: m for name, m in module.named_modules() if name.endswith(suffixes) and isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
    assert found, suffixes
    return found


def _composed(up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """The one weight equal to a LoRA's forward (down, then up): a matrix product, or for a conv (a kh x kw `down`
    conv, then a 1x1 `up` conv) the kernel summed over the rank."""
    if down.ndim == 2:
        return up @ down  # (out, r) @ (r, in)
    return torch.einsum("or,rikl->oikl", up[:, :, 0, 0], down)  # (out, in, kh, kw)


def _make_lora(checkpoint: Path, key_format: str, path: Path, seed: int = 0,
               components: tuple[str, ...] = ("unet", "text_encoder", "text_encoder_2")) -> dict[str, dict[str, torch.Tensor]]:
    """Write a random LoRA for those of `components` the checkpoint has (its U-Net and text encoders: SDXL's second
    too) in `key_format` ("peft" or "kohya", which names SDXL's encoders lora_te1_ and lora_te2_); return the
    reference deltas at scale 1 (component -> parameter -> delta), computed here with torch, independently."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    generator = torch.Generator().manual_seed(seed)
    sdxl = (checkpoint / "text_encoder_2").is_dir()
    loaders = {"unet": lambda: (UNet2DConditionModel.from_pretrained(checkpoint / "unet"), UNET_TARGETS),
               "text_encoder": lambda: (CLIPTextModel.from_pretrained(checkpoint / "text_encoder"), TEXT_TARGETS),
               "text_encoder_2": lambda: (CLIPTextModelWithProjection.from_pretrained(checkpoint / "text_encoder_2"), TEXT_TARGETS)}
    kohya_prefixes = {"unet": "lora_unet_", "text_encoder": "lora_te1_" if sdxl else "lora_te_", "text_encoder_2": "lora_te2_"}
    tensors, deltas = {}, {}
    for component in components:
        if not (checkpoint / component).is_dir():
            continue
        model, suffixes = loaders[component]()
        deltas[component] = {}
        for name, module in _targets(model, suffixes).items():
            # LoRA files name the text encoders' modules as transformers 4 did, under `text_model`
            file_name = name if component == "unet" else f"text_model.{name.removeprefix('text_model.')}"
            weight = module.weight  # (out, in) or (out, in, kh, kw)
            kernel = weight.shape[2:]
            down = 0.2 * torch.randn((RANK, weight.shape[1], *kernel), generator=generator)  # (r, in[, kh, kw])
            up = 0.2 * torch.randn((weight.shape[0], RANK, *[1] * len(kernel)), generator=generator)  # (out, r[, 1, 1])
            if key_format == "peft":
                prefix = f"{component}.{file_name}"
                names = (f"{prefix}.lora_A.weight", f"{prefix}.lora_B.weight", f"{prefix}.alpha")
            else:
                prefix = kohya_prefixes[component] + file_name.replace(".", "_")
                names = (f"{prefix}.lora_down.weight", f"{prefix}.lora_up.weight", f"{prefix}.alpha")
                down, up = down.half(), up.half()  # kohya files are usually fp16
            tensors |= dict(zip(names, (down, up, torch.tensor(ALPHA))))
            deltas[component][f"{name}.weight"] = (ALPHA / RANK) * _composed(up.float(), down.float())
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return deltas


def _latents(pipe) -> np.ndarray:
    f = pipe.vae_scale_factor
    return np.random.default_rng(7).standard_normal((1, pipe.manifest.model.latent_channels, 64 // f, 64 // f), dtype=np.float32)


def _ours(pipe) -> np.ndarray:
    return pipe(**ARGS, latents=_latents(pipe), output_type="np").images


@pytest.fixture
def pipe(tiny_bundle: Path):
    pipe = sdrt.engine.load(tiny_bundle, backend="onnxruntime-cpu", safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("key_format", ["peft", "kohya"])
def test_lora_matches_diffusers_with_the_deltas_added(pipe, tiny_checkpoint: Path, tmp_path: Path, key_format: str) -> None:
    lora = tmp_path / "lora.safetensors"
    deltas = _make_lora(tiny_checkpoint, key_format, lora)
    for component, component_deltas in deltas.items():  # every target is patchable: the export mapped it
        refit_map = pipe.manifest.components[Component(component)].refit_map
        assert refit_map in pipe.manifest.files  # hashed and verified like every bundle file
        mapped = read_refit_map(pipe.bundle_dir / refit_map)
        assert set(component_deltas) <= set(mapped)
    reference = StableDiffusionPipeline.from_pretrained(tiny_checkpoint, safety_checker=None, requires_safety_checker=False)
    reference.set_progress_bar_config(disable=True)
    with torch.no_grad():
        for component, component_deltas in deltas.items():
            parameters = dict(getattr(reference, component).named_parameters())
            for name, delta in component_deltas.items():
                parameters[name] += SCALE * delta
    expected = reference(**ARGS, latents=torch.from_numpy(_latents(pipe)), output_type="np").images
    base = _ours(pipe)
    pipe.load_lora(lora, scale=SCALE)
    actual = _ours(pipe)
    assert np.abs(actual - expected).max() <= MAX_PIXEL_DIFF
    assert np.abs(actual - base).max() > 20 * MAX_PIXEL_DIFF  # the LoRA changes the image: a no-op would fail


def test_unload_and_scale_zero_give_the_base_images_back_exactly(pipe, tiny_checkpoint: Path, tmp_path: Path) -> None:
    lora = tmp_path / "lora.safetensors"
    _make_lora(tiny_checkpoint, "peft", lora)
    base = _ours(pipe)
    pipe.load_lora(lora, scale=0.5)
    half = _ours(pipe)
    assert not np.array_equal(half, base)
    pipe.load_lora(lora, scale=1.0)
    pipe.load_lora(lora, scale=0.5)  # replaces the previous LoRA: applied to the base weights, not stacked
    np.testing.assert_array_equal(_ours(pipe), half)
    pipe.unload_lora()
    np.testing.assert_array_equal(_ours(pipe), base)
    pipe.load_lora(lora, scale=0.0)
    np.testing.assert_array_equal(_ours(pipe), base)


def test_unknown_keys_raise_naming_them_and_change_nothing(pipe, tiny_checkpoint: Path, tmp_path: Path) -> None:
    good, bad = tmp_path / "good.safetensors", tmp_path / "bad.safetensors"
    _make_lora(tiny_checkpoint, "peft", good)
    base = _ours(pipe)
    extra = {"unet.mid_block.not_a_layer.lora_A.weight": torch.zeros(RANK, 8), "lora_te_text_model_nothing.lora_up.weight": torch.zeros(8, RANK)}
    from safetensors.torch import load_file

    save_file({**load_file(str(good)), **extra}, str(bad))
    with pytest.raises(UnknownLoraKeysError, match="2 LoRA keys match no U-Net or text-encoder weight") as caught:
        pipe.load_lora(bad)
    assert caught.value.keys == sorted(extra)
    np.testing.assert_array_equal(_ours(pipe), base)


def test_a_bundle_without_refit_maps_asks_for_a_re_export(tiny_bundle: Path, tiny_checkpoint: Path, tmp_path: Path) -> None:
    old = shutil.copytree(tiny_bundle, tmp_path / "old", ignore=shutil.ignore_patterns(".cache"))
    data = json.loads((old / MANIFEST_NAME).read_text())
    for entry in data["components"].values():  # as an sdrt before refit maps wrote it
        if entry.pop("refit_map", None):
            (old / entry["file"]).with_name("refit_map.json").unlink()
    data["files"] = {name: vars(entry) for name, entry in describe_files(old).items()}
    (old / MANIFEST_NAME).write_text(json.dumps(data))
    pipe = sdrt.engine.load(old, backend="onnxruntime-cpu", safety_checker=False)
    _make_lora(tiny_checkpoint, "peft", tmp_path / "lora.safetensors")
    with pytest.raises(NoRefitMapError, match=r"no refit map for \w+ .*re-export it with `sdrt export"):
        pipe.load_lora(tmp_path / "lora.safetensors")


def test_a_backend_that_cannot_replace_weights_says_which_can(tmp_path: Path) -> None:
    class Fixed(Backend):
        name, exact = "fixed", True
        unavailable_reason = classmethod(lambda cls: None)
        _load = _infer = lambda self, *args: None

    backend = Fixed(tmp_path, {})
    with pytest.raises(WeightsNotReplaceableError, match='backend fixed cannot replace weights .*"onnxruntime-cpu".*--refittable'):
        backend.set_weights(Component.UNET, {"w": np.zeros(1, np.float32)})


@pytest.mark.parametrize("external", [False, True], ids=["inline", "external-data"])
def test_initializers_are_read_as_onnx_reads_them(tiny_bundle: Path, tmp_path: Path, external: bool) -> None:
    path = tiny_bundle / "unet/model.onnx"
    if external:
        model = onnx.load(str(path))
        path = tmp_path / "model.onnx"
        onnx.save_model(model, str(path), save_as_external_data=True, location="model.onnx.data", size_threshold=0)
    expected = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer if i.data_type == onnx.TensorProto.FLOAT}
    names = sorted(expected)[::3]
    actual = read_initializers(path, names)
    assert sorted(actual) == names
    for name in names:
        assert actual[name].dtype == np.float32 and actual[name].shape == expected[name].shape
        np.testing.assert_array_equal(actual[name], expected[name])


# ---- TensorRT: the refit path on the fake tensorrt and cuda-python modules of test_tensorrt_host ----------------
BUNDLE_WEIGHTS = {"onnx::MatMul_7": np.full((2, 3), -1.0, np.float32)}


@pytest.fixture
def fake_refit(fake_gpu, monkeypatch, tmp_path: Path):
    """(cudart, refits, build): refits records each refit_cuda_engine's weights; build(refittable) makes a backend."""
    cudart, _ = fake_gpu
    trt = runner_module.tensorrt()
    refits: list[dict[str, np.ndarray]] = []

    class FakeRefitter:
        def __init__(self, engine, logger) -> None:
            self.weights = {}

        def set_named_weights(self, name, weights) -> bool:
            self.weights[name] = np.array(weights)  # a copy: the caller's buffer must only live until the refit
            return name != "not_refittable"

        def get_missing_weights(self) -> list[str]:
            return []  # a LoRA patches some weights; the others keep the engine's values

        def refit_cuda_engine(self) -> bool:
            refits.append(self.weights)
            return True

    fake = types.SimpleNamespace(**vars(trt), Refitter=FakeRefitter, Weights=lambda array: array)
    monkeypatch.setattr(runner_module, "tensorrt", lambda: fake)
    monkeypatch.setattr(tensorrt_backend, "current_environment", lambda: H100)
    # the fake bundle's model files are not ONNX: the bundle's values of the weights a LoRA patched come from here
    monkeypatch.setattr(tensorrt_backend, "read_initializers", lambda path, names: {n: BUNDLE_WEIGHTS[n] for n in names})

    def build(refittable: bool) -> TensorRTBackend:
        bundle = _fake_bundle(tmp_path / str(refittable))
        build_engines(bundle, precision=Precision.FP32, refittable=refittable, compiler=FakeCompiler(plan=b"plan"))
        return TensorRTBackend(bundle, _component_files(bundle))

    return cudart, refits, build


def test_tensorrt_refits_by_name_and_drops_captured_graphs(fake_refit) -> None:
    cudart, refits, build = fake_refit
    backend = build(refittable=True)
    for step in range(2):
        backend.run(Component.UNET, {"x": _x(2, step)})
    assert cudart.graphs_instantiated == 1
    weight = np.arange(6, dtype=np.float64).reshape(2, 3)
    backend.set_weights(Component.UNET, {"onnx::MatMul_7": weight})
    assert len(refits) == 1 and list(refits[0]) == ["onnx::MatMul_7"]
    assert refits[0]["onnx::MatMul_7"].dtype == np.float32 and (refits[0]["onnx::MatMul_7"] == weight).all()
    assert cudart.graphs_destroyed == 1  # the graph captured before the refit is gone
    (y,) = backend.run(Component.UNET, {"x": _x(2, 1.0)})
    assert (y == 3).all() and cudart.graphs_instantiated == 2  # captured again on next use
    backend.set_weights(Component.TEXT_ENCODER, {"te_weight": weight})  # not loaded yet: refitted when it loads
    assert len(refits) == 1
    backend.run(Component.TEXT_ENCODER, {"x": _x(1, 1.0)})
    assert len(refits) == 2 and list(refits[1]) == ["te_weight"]
    backend.set_weights(Component.UNET, {})  # unloaded: the weight patched before gets the bundle's value back
    assert len(refits) == 3 and list(refits[2]) == ["onnx::MatMul_7"]
    np.testing.assert_array_equal(refits[2]["onnx::MatMul_7"], BUNDLE_WEIGHTS["onnx::MatMul_7"])
    with pytest.raises(GpuError, match=r"refused new weights for not_refittable \(2, 3\)"):
        backend.set_weights(Component.UNET, {"not_refittable": weight})


def test_tensorrt_engines_built_without_refit_name_the_rebuild(fake_refit) -> None:
    _, refits, build = fake_refit
    backend = build(refittable=False)
    with pytest.raises(WeightsNotReplaceableError, match=r"built without --refittable.*`sdrt build-engines .*--refittable`"):
        backend.set_weights(Component.UNET, {"w": np.zeros((2, 3), np.float32)})
    assert refits == []
