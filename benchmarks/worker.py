"""One benchmark run of one engine in this (fresh) process; prints one JSON line.

Every engine gets the same prompt, size, steps, guidance and initial latents (a .npy file), and reports the same
figures: load time, cold start (process launch -> first image) and the same image warm, a warm end-to-end
generation with its per-stage breakdown, and peak RSS. The final images are saved so the parent can compare accuracy across engines.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np


@dataclasses.dataclass(frozen=True)
class SdrtEngine:
    """How an sdrt engine loads its bundle: sdrt.engine.load's backend and memory policy (strings, as this module
    imports nothing from sdrt at module level), whether TensorRT may use CUDA graphs, and DeepCache's interval (None:
    off; on, at the branch the bundle was exported for)."""

    backend: str
    memory: str = "keep-loaded"
    cuda_graphs: bool = True
    deepcache_interval: int | None = None


SDRT_ENGINES = {
    "sdrt": SdrtEngine("auto"),
    "sdrt-exact": SdrtEngine("exact"),
    "sdrt-low-memory": SdrtEngine("auto", "one-at-a-time"),
    "sdrt-exact-low-memory": SdrtEngine("exact", "one-at-a-time"),
    # "sdrt" on a bundle quantized by `sdrt quantize` runs int8; these name the CPU fast modes explicitly
    "sdrt-int8": SdrtEngine("openvino-int8"),
    "sdrt-bf16": SdrtEngine("openvino-bf16"),
    # DeepCache (bundles exported with --deepcache-branch): `sdrt generate --preset fast`, and a sparser schedule
    "sdrt-deepcache": SdrtEngine("auto", deepcache_interval=3),
    "sdrt-deepcache-5": SdrtEngine("auto", deepcache_interval=5),
    # one backend each, for the GPU validation (sdrt.benchmarks.gpu_validate); "exact" would take cuda on a GPU
    "sdrt-onnxruntime-cpu": SdrtEngine("onnxruntime-cpu"),
    "sdrt-tensorrt": SdrtEngine("tensorrt"),
    "sdrt-tensorrt-no-graphs": SdrtEngine("tensorrt", cuda_graphs=False),
    "sdrt-cuda": SdrtEngine("cuda"),
    "sdrt-cuda-fp16": SdrtEngine("cuda-fp16"),
}
# diffusers engine -> (torch dtype, device)
DIFFUSERS_ENGINES = {
    "diffusers-fp32": ("fp32", "cpu"),
    "diffusers-bf16": ("bf16", "cpu"),
    "diffusers-fp16-cuda": ("fp16", "cuda"),
}
# peers that run in a virtual environment of their own (optimum's two need transformers 4.x; GenAI needs neither torch
# nor transformers), from their own export of the checkpoint, by the worker's path (sdrt is not installed there):
# engine -> what the venv holds
VENV_PEERS = {
    "optimum-ort": "optimum-onnx[onnxruntime]",
    "optimum-intel": "optimum-intel[openvino]",
    "openvino-genai": "openvino-genai",
}
ENGINES = (*SDRT_ENGINES, *DIFFUSERS_ENGINES, *VENV_PEERS)
# sdrt backend -> the precision its U-Net's matrix products run in, for the floor (sdrt.benchmarks.matmul_peak:
# measured on this machine's CPU, so the GPU backends have none)
BACKEND_UNET_PRECISIONS = {"openvino-int8": "int8", "openvino-bf16": "bf16", "openvino-fp32": "fp32", "onnxruntime-cpu": "fp32"}


def _openvino_precision(hint: Any) -> str | None:
    """An OpenVINO INFERENCE_PRECISION_HINT (an openvino.Type) in BACKEND_UNET_PRECISIONS' names."""
    return {"bf16": "bf16", "f32": "fp32"}.get(hint.to_string())


def diffusers_unavailable_reason(engine: str) -> str | None:
    """None if the diffusers engine's device is usable from torch here, else why not (torch is imported for CUDA)."""
    _, device = DIFFUSERS_ENGINES[engine]
    if device != "cuda":
        return None
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    if not torch.cuda.is_available():
        return f"torch {torch.__version__} has no CUDA device (a CPU-only build, or no GPU)"
    return None


@dataclasses.dataclass(frozen=True)
class RunConfig:
    prompt: str
    steps: int
    guidance_scale: float
    height: int
    width: int
    batch: int
    latents_file: str


def _peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # Linux reports KiB


class _StageClock:
    """Accumulates wall time per stage by wrapping callables (diffusers' modules have no timings of their own).
    `synchronize` waits for the device: CUDA kernels run asynchronously, so a stage ends when its work is done."""

    def __init__(self, synchronize: Callable[[], None] | None = None) -> None:
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self._synchronize = synchronize

    def wrap(self, stage: str, function: Callable) -> Callable:
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                if self._synchronize is not None:
                    self._synchronize()
                self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - start
                self.calls[stage] = self.calls.get(stage, 0) + 1
        return timed


def _run_sdrt(config: RunConfig, bundle: str, engine: str) -> tuple[Callable[[int], Any], dict[str, Any]]:
    import sdrt.engine
    from sdrt.engine.backends.tensorrt.backend import CUDA_GRAPHS_ENV

    spec = SDRT_ENGINES[engine]
    if not spec.cuda_graphs:
        os.environ[CUDA_GRAPHS_ENV] = "0"  # read when the backend is made; this process runs one engine
    # the passes of its kind of request loaded at load(), as a deployment of this engine alone would find them
    pipe = sdrt.engine.load(bundle, backend=spec.backend, memory=spec.memory, deepcache=spec.deepcache_interval is not None)
    pipe.set_progress_bar_config(disable=True)
    latents = np.load(config.latents_file)
    deepcache = None
    if spec.deepcache_interval is not None:  # the bench skips this engine for a bundle without DeepCache's passes
        deepcache = sdrt.engine.DeepCache(spec.deepcache_interval, pipe.manifest.deepcache.branch)

    def generate(steps: int):
        out = pipe(config.prompt, num_inference_steps=steps, guidance_scale=config.guidance_scale, height=config.height,
                   width=config.width, num_images_per_prompt=config.batch, latents=latents, output_type="np",
                   deepcache=deepcache)
        return out.images, dict(out.timings), out.unet_calls

    notes = [spec.memory] if spec.memory != "keep-loaded" else []
    notes += [] if spec.cuda_graphs else ["no CUDA graphs"]
    notes += [] if deepcache is None else [f"DeepCache every {deepcache.cache_interval}, branch {deepcache.cache_branch}"]
    return generate, {"backend": ", ".join([pipe.backend.name, *notes]), "unet_precision": BACKEND_UNET_PRECISIONS.get(pipe.backend.name)}


def _diffusers_style(pipe: Any, config: RunConfig, latents: Any, synchronize: Callable[[], None] | None = None) -> Callable[[int], Any]:
    """generate(steps) for diffusers' pipeline and the pipelines built on it (optimum's), with stage timings from
    hooks on the methods every such pipeline calls (`synchronize`: waits for a GPU at the end of each stage)."""
    import torch

    pipe.set_progress_bar_config(disable=True)
    clock = _StageClock(synchronize)
    # The tokenizer's __call__ cannot be wrapped per instance: here text_encode includes tokenization.
    pipe.encode_prompt = clock.wrap("text_encode", pipe.encode_prompt)
    pipe.unet.forward = clock.wrap("unet", pipe.unet.forward)
    pipe.vae.decode = clock.wrap("decode", pipe.vae.decode)
    if getattr(pipe, "safety_checker", None) is not None:  # SDXL's pipeline has none
        pipe.run_safety_checker = clock.wrap("safety_check", pipe.run_safety_checker)

    def generate(steps: int):
        clock.seconds.clear()
        clock.calls.clear()
        start = time.perf_counter()
        with torch.inference_mode():
            out = pipe(config.prompt, num_inference_steps=steps, guidance_scale=config.guidance_scale, height=config.height,
                       width=config.width, num_images_per_prompt=config.batch, latents=latents, output_type="np")
        total = time.perf_counter() - start
        timings = dict(clock.seconds)
        # What the hooks do not cover: latents set-up, guidance arithmetic and the scheduler, post-processing.
        timings["guidance_and_scheduler"] = total - sum(clock.seconds.values())
        return np.asarray(out.images, dtype=np.float32), timings, clock.calls.get("unet", 0)

    return generate


def _run_diffusers(config: RunConfig, checkpoint: str, engine: str) -> tuple[Callable[[int], Any], dict[str, Any]]:
    import torch
    from diffusers import DiffusionPipeline

    dtype_name, device = DIFFUSERS_ENGINES[engine]
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype_name]
    # the pipeline class model_index.json names: StableDiffusionPipeline, StableDiffusionXLPipeline
    pipe = DiffusionPipeline.from_pretrained(checkpoint, torch_dtype=dtype).to(device)
    latents = torch.from_numpy(np.load(config.latents_file)).to(device=device, dtype=dtype)
    info = {"backend": f"torch {torch.__version__} {dtype_name} on {device}", "threads": torch.get_num_threads(),
            "unet_precision": dtype_name if device == "cpu" else None}
    synchronize = torch.cuda.synchronize if device == "cuda" else None
    return _diffusers_style(pipe, config, latents, synchronize), info


def _run_optimum(config: RunConfig, onnx_dir: str) -> tuple[Callable[[int], Any], dict[str, Any]]:
    import torch
    from optimum.onnxruntime import ORTStableDiffusionPipeline

    pipe = ORTStableDiffusionPipeline.from_pretrained(onnx_dir)
    latents = torch.from_numpy(np.load(config.latents_file))  # optimum 2 builds on diffusers' pipeline: torch latents
    # optimum's export has no safety checker: say so in the results rather than compare unlike work silently.
    info = {"backend": "optimum-onnxruntime fp32" + (" (no safety checker)" if pipe.safety_checker is None else ""),
            "unet_precision": "fp32"}
    return _diffusers_style(pipe, config, latents), info


def _run_optimum_intel(config: RunConfig, openvino_dir: str) -> tuple[Callable[[int], Any], dict[str, Any]]:
    import openvino
    import torch
    from optimum.intel import OVDiffusionPipeline

    # the class the export's model_index.json names (OVStableDiffusionPipeline, OVStableDiffusionXLPipeline), compiled
    # for dynamic shapes, its default
    pipe = OVDiffusionPipeline.from_pretrained(openvino_dir)
    pipe.safety_checker = None  # the export carries the torch checker: the peers run without one
    latents = torch.from_numpy(np.load(config.latents_file))  # built on diffusers' pipeline: torch latents
    pipe.compile()  # compiled by from_pretrained already unless told otherwise; its precision is read from it
    precision = pipe.unet.request.get_property("INFERENCE_PRECISION_HINT")
    info = {"backend": f"optimum-intel OpenVINO {openvino.__version__.split('-')[0]} {precision.to_string()} (no safety checker)",
            "unet_precision": _openvino_precision(precision)}
    return _diffusers_style(pipe, config, latents), info


def _fixed_noise_generator(latents: np.ndarray) -> Any:
    """An openvino_genai.Generator whose normal draws are `latents`: GenAI draws a pipeline's initial latents with
    one randn_tensor call of their shape (scaled by the scheduler's initial sigma, 1 for PNDM), so every engine
    starts from the same noise."""
    import openvino
    import openvino_genai

    class FixedNoise(openvino_genai.Generator):
        draws = 0

        def next(self) -> float:
            raise NotImplementedError("the benchmark's generator hands out whole latents only")

        def randn_tensor(self, shape) -> openvino.Tensor:
            if tuple(shape) != latents.shape:
                raise ValueError(f"GenAI asked for noise of shape {tuple(shape)}, the benchmark's latents are {latents.shape}")
            self.draws += 1
            return openvino.Tensor(latents)

    return FixedNoise()


def _run_genai(config: RunConfig, openvino_dir: str) -> tuple[Callable[[int], Any], dict[str, Any]]:
    import openvino
    import openvino_genai

    pipe = openvino_genai.Text2ImagePipeline(openvino_dir, "CPU")  # no safety checker in GenAI's pipeline
    latents = np.ascontiguousarray(np.load(config.latents_file))  # (B, 4, H/8, W/8)
    generator = _fixed_noise_generator(latents)

    def generate(steps: int):
        draws = generator.draws
        start = time.perf_counter()
        images = pipe.generate(config.prompt, num_inference_steps=steps, guidance_scale=config.guidance_scale,
                               height=config.height, width=config.width, num_images_per_prompt=config.batch, generator=generator)
        total = time.perf_counter() - start
        if generator.draws == draws:  # its images would start from other noise than every other engine's
            raise RuntimeError("OpenVINO GenAI drew no initial latents from the generator it was given")
        metrics = pipe.get_performance_metrics()
        unet_us = metrics.raw_metrics.unet_inference_durations  # one entry per U-Net call, microseconds
        timings = {"text_encode": sum(metrics.get_text_encoder_infer_duration().values()) / 1e3,
                   "unet": sum(unet_us) / 1e6, "decode": metrics.get_vae_decoder_infer_duration() / 1e3}
        timings["guidance_and_scheduler"] = total - sum(timings.values())
        return images.data.astype(np.float32) / 255, timings, len(unet_us)  # (B, H, W, 3) uint8 -> [0, 1]

    # GenAI compiles with the CPU plugin's defaults: its U-Net runs in the default inference precision
    precision = openvino.Core().get_property("CPU", "INFERENCE_PRECISION_HINT")
    info = {"backend": f"OpenVINO GenAI {openvino_genai.__version__.split('-')[0]} {precision.to_string()} (no safety checker)",
            "unet_precision": _openvino_precision(precision)}
    return generate, info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sdrt.benchmarks.worker")
    parser.add_argument("--engine", choices=ENGINES, required=True)
    parser.add_argument("--model", required=True, help="bundle (sdrt), checkpoint (diffusers), or the peer's own export "
                        "(optimum-ort: ONNX; optimum-intel and openvino-genai: OpenVINO IR)")
    parser.add_argument("--config", required=True, help="RunConfig as JSON")
    parser.add_argument("--launched-at", type=float, required=True, help="time.time() just before this process started")
    parser.add_argument("--images-out", required=True, help=".npy path for the final images")
    args = parser.parse_args(argv)
    config = RunConfig(**json.loads(args.config))

    load_start = time.perf_counter()
    if args.engine in SDRT_ENGINES:
        generate, info = _run_sdrt(config, args.model, args.engine)
    elif args.engine in DIFFUSERS_ENGINES:
        generate, info = _run_diffusers(config, args.model, args.engine)
    elif args.engine == "optimum-intel":
        generate, info = _run_optimum_intel(config, args.model)
    elif args.engine == "openvino-genai":
        generate, info = _run_genai(config, args.model)
    else:
        generate, info = _run_optimum(config, args.model)
    load_s = time.perf_counter() - load_start
    generate(1)  # first image: sessions created, kernels compiled, memory arenas grown for this shape
    cold_start_s = time.time() - args.launched_at
    start = time.perf_counter()
    generate(1)  # the same image warm: what the first one cost beyond it is the start-up
    warm_first_s = time.perf_counter() - start
    start = time.perf_counter()
    images, timings, unet_calls = generate(config.steps)
    e2e_s = time.perf_counter() - start
    np.save(args.images_out, images)
    print(json.dumps({
        "engine": args.engine, **info, "load_s": load_s, "cold_start_s": cold_start_s, "warm_first_s": warm_first_s, "e2e_s": e2e_s,
        "images_per_s": config.batch / e2e_s, "timings": timings, "unet_calls": unet_calls,
        "peak_rss_gb": _peak_rss_gb(),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
