"""DeepCache (sdrt.engine.deepcache): sdrt's exported full and shallow passes against DeepCache applied to diffusers'
own U-Net module by module, on the same initial latents."""
from __future__ import annotations

import dataclasses
import io
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline
from PIL import Image
from pydantic import ValidationError

import sdrt.engine
from sdrt.benchmarks.bench import BenchPlan, _skip_reasons
from sdrt.cli.main import main
from sdrt.engine import DeepCache, InvalidArgumentError
from sdrt.engine.backends import BACKENDS
from sdrt.engine.backends.openvino.cache import CACHE_SUBDIR, COMPILED_SUBDIR
from sdrt.engine.deepcache import DeepCacheSupport
from sdrt.engine.image_io import read_png_parameters
from sdrt.engine.manifest import read_manifest
from sdrt.engine.specs import UNET_PASSES, Component
from sdrt.export import export_bundle
from sdrt.export.quantize import Calibration, quantize_models, quantize_unavailable_reason
from sdrt.serve.execution import generate_batch
from sdrt.serve.schemas import GenerationParams, ImageRequest
from tests.test_lora import _make_lora

# its bundles' exports with DeepCache's passes take 30 s to set up, its parity cases 6-11 s each: in `make test-slow`,
# to keep `make test` within 10 minutes
pytestmark = pytest.mark.slow

MAX_PIXEL_DIFF = 5e-3
#: the tiny U-Net has 2 levels of 2 skip connections: branch 0 runs the least (conv_in, the last up-block's last
#: layer), branch 3 the most (all but the mid-block and the deepest down-block's last layer)
BRANCHES = (0, 3)
LAYERS = 2
INTERVALS = (2, 3)
CPU_BACKENDS = ("onnxruntime-cpu", "openvino-fp32", "openvino-bf16")
ARGS = dict(prompt="a red circle", num_inference_steps=5, height=64, width=64, guidance_scale=7.5)


class DeepCacheReference:
    """DeepCache's uniform schedule on a diffusers U-Net, module by module: the U-Net's calls are counted, and on a
    call that is not a multiple of `interval` every module below the branch (the down-blocks' layers from the
    branch's on, the mid-block, the up-blocks' layers before the branch's) returns what it returned on the last full
    call, while the modules above the branch run."""

    def __init__(self, unet: torch.nn.Module, interval: int, branch: int, layers: int) -> None:
        block, layer = divmod(branch, layers)
        self.calls, self.full_calls, self.interval = 0, 0, interval
        self._full = True
        down, up = unet.down_blocks[block], unet.up_blocks[len(unet.up_blocks) - 1 - block]
        deep = [*unet.down_blocks[block + 1:], unet.mid_block, *unet.up_blocks[:len(unet.up_blocks) - 1 - block]]
        deep += [m for modules in (down.resnets, getattr(down, "attentions", None) or ()) for m in list(modules)[layer:]]
        deep += list(down.downsamplers or ())
        first_running = layers - 1 - layer
        deep += [m for modules in (up.resnets, getattr(up, "attentions", None) or ()) for m in list(modules)[:first_running]]
        for module in deep:
            self._cache(module)
        self._count(unet)

    def _cache(self, module: torch.nn.Module) -> None:
        run, outputs = module.forward, []

        def forward(*args, **kwargs):
            if self._full:
                outputs[:] = [run(*args, **kwargs)]
            return outputs[0]

        module.forward = forward

    def _count(self, unet: torch.nn.Module) -> None:
        run = unet.forward

        def forward(*args, **kwargs):
            self._full = self.calls % self.interval == 0
            self.calls += 1
            self.full_calls += self._full
            return run(*args, **kwargs)

        unet.forward = forward


def _reference_images(checkpoint: Path, interval: int, branch: int, layers: int, latents: np.ndarray, scheduler=None,
                      **args) -> np.ndarray:
    reference = StableDiffusionPipeline.from_pretrained(checkpoint, safety_checker=None, requires_safety_checker=False)
    if scheduler is not None:
        reference.scheduler = scheduler.from_config(reference.scheduler.config)
    reference.set_progress_bar_config(disable=True)
    DeepCacheReference(reference.unet, interval, branch, layers)
    return reference(**args, latents=torch.from_numpy(latents.copy()), output_type="np").images


def _latents(pipe, seed: int = 7) -> np.ndarray:
    f = pipe.vae_scale_factor
    shape = (1, pipe.manifest.model.latent_channels, ARGS["height"] // f, ARGS["width"] // f)
    return np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)


@pytest.fixture(scope="module")
def deepcache_bundles(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    root = tmp_path_factory.mktemp("deepcache")
    return {branch: export_bundle(tiny_checkpoint, root / f"branch-{branch}", deepcache_branch=branch) for branch in BRANCHES}


_PIPES: dict[tuple[int, str], sdrt.engine.StableDiffusionPipeline] = {}


def _pipe(bundles: dict[int, Path], branch: int, backend: str):
    reason = {b.name: b for b in BACKENDS}[backend].unavailable_reason()
    if reason is not None:
        pytest.skip(f"{backend} unavailable: {reason}")
    if (branch, backend) not in _PIPES:
        pipe = sdrt.engine.load(bundles[branch], backend=backend, safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        _PIPES[branch, backend] = pipe
    return _PIPES[branch, backend]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("interval", INTERVALS)
@pytest.mark.parametrize("branch", BRANCHES)
def test_matches_deepcache_on_diffusers(deepcache_bundles, tiny_checkpoint: Path, branch: int, interval: int, backend: str) -> None:
    pipe = _pipe(deepcache_bundles, branch, backend)
    latents = _latents(pipe)
    expected = _reference_images(tiny_checkpoint, interval, branch, LAYERS, latents, **ARGS)
    actual = pipe(**ARGS, latents=latents, output_type="np", deepcache=DeepCache(interval, branch)).images
    without = pipe(**ARGS, latents=latents, output_type="np").images
    error = np.abs(actual - expected).max()
    assert error <= (MAX_PIXEL_DIFF if pipe.backend.exact else 0.03)  # bf16: close, not equal
    if pipe.backend.exact:
        # what the cache changes is far beyond that error: a shallow pass that ran the full U-Net, or ignored the
        # feature, would not match
        assert np.abs(actual - without).max() > max(10 * error, 1e-3)


@pytest.mark.parametrize("backend", ("onnxruntime-cpu", "openvino-fp32"))
def test_interval_one_is_no_deepcache(deepcache_bundles, backend: str) -> None:
    pipe = _pipe(deepcache_bundles, 0, backend)
    latents = _latents(pipe)
    cached = pipe(**ARGS, latents=latents, output_type="np", deepcache=DeepCache(cache_interval=1, cache_branch=0))
    plain = pipe(**ARGS, latents=latents, output_type="np")
    assert cached.unet_shallow_calls == 0
    np.testing.assert_allclose(cached.images, plain.images, rtol=0, atol=1e-5)


def test_counts_full_and_shallow_calls(deepcache_bundles) -> None:
    pipe = _pipe(deepcache_bundles, 3, "onnxruntime-cpu")
    calls: list[Component] = []
    run = pipe.backend.run

    def counting(component, feeds):
        calls.append(component)
        return run(component, feeds)

    pipe.backend.run = counting
    try:
        # PNDM's 5 steps make 6 U-Net calls (its warm-up repeats the second timestep): full at calls 0 and 3
        out = pipe(**ARGS, seed=0, output_type="latent", deepcache=DeepCache(cache_interval=3, cache_branch=3))
    finally:
        del pipe.backend.run
    unet_calls = [c for c in calls if c not in (Component.TEXT_ENCODER, Component.VAE_DECODER)]
    full, shallow = Component.UNET_DEEPCACHE_FULL, Component.UNET_DEEPCACHE_SHALLOW
    assert unet_calls == [full, shallow, shallow, full, shallow, shallow]
    assert (out.unet_calls, out.unet_shallow_calls) == (6, 4)


def test_shallow_pass_on_a_fresh_feature_is_the_unet(deepcache_bundles) -> None:
    """Given the feature of the same inputs, the shallow pass computes what the whole U-Net does."""
    pipe = _pipe(deepcache_bundles, 0, "onnxruntime-cpu")
    rng = np.random.default_rng(0)
    hidden = pipe.manifest.model.text_hidden_size
    feeds = {"sample": rng.standard_normal((2, 4, 8, 8), dtype=np.float32), "timestep": np.array([500.0, 500.0], np.float32),
             "encoder_hidden_states": rng.standard_normal((2, 77, hidden), dtype=np.float32)}
    noise, feature = pipe.backend.run(Component.UNET_DEEPCACHE_FULL, feeds)
    shallow = pipe.backend.run(Component.UNET_DEEPCACHE_SHALLOW, {**feeds, "deep_feature": feature})[0]
    plain = pipe.backend.run(Component.UNET, feeds)[0]
    np.testing.assert_allclose(noise, plain, rtol=0, atol=1e-5)
    np.testing.assert_allclose(shallow, plain, rtol=0, atol=1e-4)


def _unet_feeds(pipe, seed: int = 0) -> dict[str, np.ndarray]:
    """A guided U-Net batch (identical latent and timestep halves) of the tiny bundle's shapes."""
    rng = np.random.default_rng(seed)
    sample = rng.standard_normal((1, 4, 8, 8), dtype=np.float32)
    return {"sample": np.concatenate([sample, sample]), "timestep": np.array([500.0, 500.0], np.float32),
            "encoder_hidden_states": rng.standard_normal((2, 77, pipe.manifest.model.text_hidden_size), dtype=np.float32)}


def test_int8_runs_the_full_pass_on_the_int8_unet(deepcache_bundles, tmp_path: Path) -> None:
    """openvino-int8's full pass is its int8 U-Net with the feature as a second output, not the bf16 pass."""
    for reason in ({b.name: b for b in BACKENDS}["openvino-bf16"].unavailable_reason(), quantize_unavailable_reason()):
        if reason is not None:
            pytest.skip(reason)
    bundle = Path(shutil.copytree(deepcache_bundles[0], tmp_path / "bundle", ignore=shutil.ignore_patterns(".cache")))
    quantize_models(bundle, Calibration(prompts=2, num_inference_steps=3, size=64))
    int8, bf16, exact = (sdrt.engine.load(bundle, backend=name, safety_checker=False)
                         for name in ("openvino-int8", "openvino-bf16", "openvino-fp32"))
    feeds = _unet_feeds(int8)
    noise, feature = int8.backend.run(Component.UNET_DEEPCACHE_FULL, feeds)
    int8_unet = int8.backend.run(Component.UNET, feeds)[0]
    bf16_noise = bf16.backend.run(Component.UNET_DEEPCACHE_FULL, feeds)[0]
    exact_noise, exact_feature = exact.backend.run(Component.UNET_DEEPCACHE_FULL, feeds)
    # the int8 U-Net's outputs, up to bf16 rounding of what the extra output keeps from being fused; the bf16 pass
    # is as far from them as int8's own error
    assert np.abs(noise - int8_unet).mean() < 0.5 * np.abs(bf16_noise - int8_unet).mean()
    relative = np.abs(feature - exact_feature).max() / np.abs(exact_feature).max()
    assert relative < 0.1
    # the shallow pass (bf16) on the int8 feature: DeepCache's images stay as close to exact mode's as int8's are
    for pipe in (int8, exact):
        pipe.set_progress_bar_config(disable=True)
    latents = _latents(exact)
    images = {name: pipe(**ARGS, latents=latents, output_type="np", deepcache=DeepCache(3, 0)).images
              for name, pipe in (("int8", int8), ("exact", exact))}
    int8_error = np.abs(int8(**ARGS, latents=latents, output_type="np").images - exact(**ARGS, latents=latents, output_type="np").images).max()
    assert np.abs(images["int8"] - images["exact"]).max() <= 2 * int8_error


def test_load_loads_the_unet_passes_of_the_kind_run_last(deepcache_bundles, tmp_path: Path) -> None:
    """A process runs requests with DeepCache or without: load() loads the U-Net, or DeepCache's passes, whichever
    the last process ran, not both (that would hold the U-Net's weights twice)."""
    bundle = Path(shutil.copytree(deepcache_bundles[0], tmp_path / "bundle", ignore=shutil.ignore_patterns(".cache")))

    def process(deepcache: DeepCache | None, hint: bool | None = None) -> set[Component]:
        pipe = sdrt.engine.load(bundle, backend="openvino-fp32", safety_checker=False, deepcache=hint)
        preloaded = {load.component for load in pipe.backend.model_loads} & set(UNET_PASSES)
        pipe.set_progress_bar_config(disable=True)
        pipe(**ARGS, seed=0, deepcache=deepcache)
        return preloaded

    assert process(None) == set()  # an empty cache
    assert process(DeepCache(3, 0)) == {Component.UNET}
    assert process(DeepCache(3, 0)) == {Component.UNET_DEEPCACHE_FULL, Component.UNET_DEEPCACHE_SHALLOW}
    assert process(None) == {Component.UNET_DEEPCACHE_FULL, Component.UNET_DEEPCACHE_SHALLOW}
    assert process(None) == {Component.UNET}
    # told which kind it will run, a process loads that kind's passes whichever ran last
    assert process(DeepCache(3, 0), hint=True) == {Component.UNET_DEEPCACHE_FULL, Component.UNET_DEEPCACHE_SHALLOW}
    assert process(None, hint=False) == {Component.UNET}
    with pytest.raises(InvalidArgumentError, match="deepcache"):
        sdrt.engine.load(bundle, backend="openvino-fp32", safety_checker=False, deepcache="yes")


def test_load_loads_no_kind_of_unet_passes_the_cache_holds_only_part_of(deepcache_bundles, tmp_path: Path) -> None:
    """DeepCache's shallow pass runs unquantized: an int8 process's DeepCache requests refresh the bf16 backend's
    entry of it, beside no bf16 full pass. A bf16 process must still load its U-Net, not that lone pass."""
    bundle = Path(shutil.copytree(deepcache_bundles[0], tmp_path / "bundle", ignore=shutil.ignore_patterns(".cache")))
    for deepcache in (None, DeepCache(3, 0)):  # the U-Net's entry, then DeepCache's two, used later
        pipe = sdrt.engine.load(bundle, backend="openvino-fp32", safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        pipe(**ARGS, seed=0, deepcache=deepcache)
    (full_pass_dir,) = (bundle / CACHE_SUBDIR / COMPILED_SUBDIR).glob(f"{Component.UNET_DEEPCACHE_FULL.value}-*")
    shutil.rmtree(full_pass_dir)
    pipe = sdrt.engine.load(bundle, backend="openvino-fp32", safety_checker=False)
    assert {load.component for load in pipe.backend.model_loads} & set(UNET_PASSES) == {Component.UNET}


def test_load_told_deepcache_loads_the_unet_where_the_bundle_has_no_passes(tiny_bundle: Path, tmp_path: Path) -> None:
    bundle = Path(shutil.copytree(tiny_bundle, tmp_path / "bundle", ignore=shutil.ignore_patterns(".cache")))
    first = sdrt.engine.load(bundle, backend="openvino-fp32", safety_checker=False)  # fills the cache
    first.set_progress_bar_config(disable=True)
    first(**ARGS, seed=0)
    pipe = sdrt.engine.load(bundle, backend="openvino-fp32", safety_checker=False, deepcache=True)
    assert Component.UNET in {load.component for load in pipe.backend.model_loads if load.from_cache}


def test_bundle_records_the_passes_without_a_second_unet(deepcache_bundles, tiny_bundle: Path) -> None:
    manifest = read_manifest(deepcache_bundles[0])
    assert (manifest.deepcache.branch, manifest.deepcache.branches) == (0, 4)
    assert read_manifest(deepcache_bundles[3]).deepcache.branch == 3
    assert read_manifest(tiny_bundle).deepcache is None
    full = manifest.components[Component.UNET_DEEPCACHE_FULL]
    assert [t.name for t in full.outputs] == ["noise_pred", "deep_feature"]
    assert full.outputs[1].shape == ("batch", 32, "feature_height", "feature_width")  # the top level's channels
    sizes = manifest.files
    unet_weights = sizes["unet/model.onnx.data"].bytes
    # the U-Net's graph and one output more, reading the U-Net's weights file
    assert sizes[full.file].bytes < sizes["unet/model.onnx"].bytes + 1024 < unet_weights / 5
    graph = onnx.load(str(deepcache_bundles[0] / full.file), load_external_data=False).graph
    assert {entry.value for t in graph.initializer for entry in t.external_data if entry.key == "location"} == {"model.onnx.data"}
    shallow = manifest.components[Component.UNET_DEEPCACHE_SHALLOW].file
    assert sizes[shallow].bytes < unet_weights / 2  # branch 0: the top level's few blocks


def test_bad_deepcache_arguments(deepcache_bundles, tiny_pipe) -> None:
    pipe = _pipe(deepcache_bundles, 0, "onnxruntime-cpu")
    cases = {
        "deepcache.cache_interval": [DeepCache(cache_interval=0), DeepCache(cache_interval=-2), DeepCache(cache_interval=1.5),
                                     DeepCache(cache_interval="3"), DeepCache(cache_interval=True)],
        "deepcache.cache_branch": [DeepCache(cache_branch=-1), DeepCache(cache_branch=3), DeepCache(cache_branch=0.0)],
        "deepcache": [3, "fast", {"cache_interval": 3}],
    }
    for parameter, values in cases.items():
        for value in values:
            with pytest.raises(InvalidArgumentError, match="must") as caught:
                pipe(**ARGS, deepcache=value)
            assert caught.value.parameter == parameter, value
    with pytest.raises(InvalidArgumentError, match="was exported for.*--deepcache-branch 3"):
        pipe(**ARGS, deepcache=DeepCache(cache_branch=3))
    with pytest.raises(InvalidArgumentError, match="no DeepCache passes.*--deepcache-branch N"):
        tiny_pipe(**ARGS, deepcache=DeepCache())


def test_backend_refusal_is_reported() -> None:
    support = DeepCacheSupport(branch=0, branches=12, backend_refusal="DeepCache is not supported on the tensorrt backend yet")
    with pytest.raises(InvalidArgumentError, match="tensorrt backend yet"):
        support.check(DeepCache(), "bundle")
    assert support.check(None, "bundle") is None


def test_export_refuses_a_branch_the_unet_lacks(tiny_checkpoint: Path, tmp_path: Path) -> None:
    for branch in (4, -1):
        with pytest.raises(InvalidArgumentError, match=r"deepcache_branch: must be an integer in 0\.\.3"):
            export_bundle(tiny_checkpoint, tmp_path / "bundle", deepcache_branch=branch)
    assert not (tmp_path / "bundle").exists()


def test_reference_matches_the_deepcache_package(checkpoints: dict[str, Path]) -> None:
    """The module-by-module reference above against DeepCache's own helper, on a U-Net with SD's 3 skip connections
    per level (the package numbers branches with `% 3`) and DDIM (the helper counts calls by timestep, so PNDM's
    repeated timestep would count twice there)."""
    helper_module = pytest.importorskip("DeepCache")
    latents = np.random.default_rng(1).standard_normal((1, 8, 16, 16), dtype=np.float32)  # tiny-alt: 8 channels, f = 4
    plain = _reference_images(checkpoints["tiny-alt"], 1, 0, 3, latents, DDIMScheduler, **ARGS)
    for branch in (0, 4):
        expected = _package_images(helper_module, checkpoints["tiny-alt"], 3, branch, latents, **ARGS)
        ours = _reference_images(checkpoints["tiny-alt"], 3, branch, 3, latents, DDIMScheduler, **ARGS)
        assert np.abs(ours - expected).max() <= 1e-5
        assert np.abs(expected - plain).max() > 1e-3  # the helper did cache: 100 times the agreement above


def test_three_layer_levels_match_deepcache_on_diffusers(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    """SD's layout of 3 skip connections per level (tiny-alt): branch 4 enters the second level's up-block at its
    middle layer and runs part of its down-block, then an upsampler."""
    bundle = export_bundle(checkpoints["tiny-alt"], tmp_path / "bundle", deepcache_branch=4)
    assert read_manifest(bundle).deepcache.branches == 9
    pipe = sdrt.engine.load(bundle, backend="onnxruntime-cpu", safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    latents = _latents(pipe)
    expected = _reference_images(checkpoints["tiny-alt"], 2, 4, 3, latents, **ARGS)
    actual = pipe(**ARGS, latents=latents, output_type="np", deepcache=DeepCache(cache_interval=2, cache_branch=4)).images
    assert np.abs(actual - expected).max() <= MAX_PIXEL_DIFF


def _package_images(helper_module, checkpoint: Path, interval: int, branch: int, latents: np.ndarray, **args) -> np.ndarray:
    pipe = StableDiffusionPipeline.from_pretrained(checkpoint, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    helper = helper_module.DeepCacheSDHelper(pipe=pipe)
    helper.set_params(cache_interval=interval, cache_branch_id=branch)
    helper.enable()
    return pipe(**args, latents=torch.from_numpy(latents.copy()), output_type="np").images


# ---- the applications: CLI, server, bench -------------------------------------------------------------------------
def test_cli_generate_runs_deepcache_and_the_fast_preset(deepcache_bundles, tiny_bundle: Path, tmp_path: Path, capsys) -> None:
    bundle = deepcache_bundles[0]
    flags = ["-s", "5", "--height", "64", "--width", "64", "--seed", "5", "-q", "--backend", "onnxruntime-cpu"]
    for name, extra in (("interval.png", ["--deepcache", "3"]), ("preset.png", ["--preset", "fast"]), ("plain.png", [])):
        assert main(["generate", str(bundle), "a cat", "-o", str(tmp_path / name), *flags, *extra]) == 0
    assert read_png_parameters(tmp_path / "interval.png")["deepcache"] == {"cache_interval": 3, "cache_branch": 0}
    pipe = _pipe(deepcache_bundles, 0, "onnxruntime-cpu")
    expected = pipe("a cat", num_inference_steps=5, height=64, width=64, seed=5, deepcache=DeepCache(3, 0)).images[0]
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "interval.png")), np.asarray(expected))
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "preset.png")), np.asarray(expected))
    assert not np.array_equal(np.asarray(Image.open(tmp_path / "plain.png")), np.asarray(expected))
    capsys.readouterr()
    # a bundle without the passes: the preset says so and runs without; an explicit interval is an error
    assert main(["generate", str(tiny_bundle), "a cat", "-o", str(tmp_path / "no-passes.png"), *flags, "--preset", "fast"]) == 0
    assert "--preset fast runs without DeepCache" in capsys.readouterr().err
    assert main(["generate", str(bundle), "a cat", "-o", str(tmp_path / "bad.png"), *flags, "--deepcache", "0"]) == 2
    assert "deepcache.cache_interval: must be an integer >= 1" in capsys.readouterr().err
    assert main(["generate", str(tiny_bundle), "a cat", "-o", str(tmp_path / "bad.png"), *flags, "--deepcache", "3"]) == 2
    assert "--deepcache-branch N" in capsys.readouterr().err
    assert not (tmp_path / "bad.png").exists()


def test_cli_export_refuses_a_branch_the_unet_lacks(tiny_checkpoint: Path, tmp_path: Path, capsys) -> None:
    assert main(["export", str(tiny_checkpoint), str(tmp_path / "bundle"), "--deepcache-branch", "4"]) == 2
    assert "deepcache_branch: must be an integer in 0..3" in capsys.readouterr().err


def test_server_batch_runs_deepcache_at_the_bundles_branch(deepcache_bundles, tiny_pipe) -> None:
    pipe = _pipe(deepcache_bundles, 3, "onnxruntime-cpu")
    params = GenerationParams("a cat", None, 1, 64, 64, 5, 7.5, 11, None, deepcache_interval=2)
    served = generate_batch(pipe, [params]).images[0][0].encoded
    expected = pipe("a cat", num_inference_steps=5, height=64, width=64, seed=11, deepcache=DeepCache(2, 3)).images[0]
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(served))), np.asarray(expected))
    assert params.batch_key != dataclasses.replace(params, deepcache_interval=None).batch_key
    with pytest.raises(InvalidArgumentError, match="--deepcache-branch") as caught:
        generate_batch(tiny_pipe, [params])
    assert caught.value.parameter == "deepcache_interval"
    with pytest.raises(ValidationError):
        ImageRequest(prompt="a cat", deepcache_interval=0)


def test_bench_skips_deepcache_engines_on_a_bundle_without_the_passes(deepcache_bundles, tiny_bundle: Path, tmp_path: Path) -> None:
    engines = ("sdrt-exact", "sdrt-deepcache", "sdrt-deepcache-5")
    plan = BenchPlan(None, tiny_bundle, engines, 1, (64,), (1,), "a cat", 1, 7.5, 0, None, None, tmp_path)
    skipped = _skip_reasons(plan)
    assert set(skipped) == {"sdrt-deepcache", "sdrt-deepcache-5"}
    assert all("--deepcache-branch" in reason for reason in skipped.values())
    assert _skip_reasons(dataclasses.replace(plan, bundle=deepcache_bundles[0])) == {}


def test_a_loaded_lora_is_refused_until_unloaded(deepcache_bundles, tiny_checkpoint: Path, tmp_path: Path) -> None:
    """DeepCache's passes hold the bundle's own weights: with a LoRA loaded they would run without it."""
    pipe = sdrt.engine.load(deepcache_bundles[0], backend="onnxruntime-cpu", safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    _make_lora(tiny_checkpoint, "peft", tmp_path / "lora.safetensors")
    pipe.load_lora(tmp_path / "lora.safetensors")
    with pytest.raises(InvalidArgumentError, match="LoRA loaded") as caught:
        pipe(**ARGS, seed=0, deepcache=DeepCache())
    assert caught.value.parameter == "deepcache"
    pipe.unload_lora()
    assert pipe(**ARGS, seed=0, output_type="latent", deepcache=DeepCache()).unet_shallow_calls == 4
