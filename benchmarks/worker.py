"""One benchmark run of one engine in this (fresh) process; prints one JSON line.

Every engine gets the same prompt, size, steps, guidance and initial latents (a .npy file), and reports the same
figures: load time, cold start (process launch -> first image), a warm end-to-end generation with its per-stage
breakdown, and peak RSS. The final images are saved so the parent can compare accuracy across engines.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

# sdrt engine -> (backend, memory policy) for sdrt.engine.load; strings, as this module imports nothing from sdrt
SDRT_ENGINES = {
    "sdrt": ("auto", "keep-loaded"),
    "sdrt-exact": ("exact", "keep-loaded"),
    "sdrt-low-memory": ("auto", "one-at-a-time"),
    "sdrt-exact-low-memory": ("exact", "one-at-a-time"),
}
ENGINES = (*SDRT_ENGINES, "diffusers-fp32", "diffusers-bf16", "optimum-ort")


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
    """Accumulates wall time per stage by wrapping callables (diffusers' modules have no timings of their own)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}

    def wrap(self, stage: str, function: Callable) -> Callable:
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - start
                self.calls[stage] = self.calls.get(stage, 0) + 1
        return timed


def _run_sdrt(config: RunConfig, bundle: str, engine: str) -> tuple[Callable[[int], Any], dict[str, Any]]:
    import sdrt.engine

    backend, memory = SDRT_ENGINES[engine]
    pipe = sdrt.engine.load(bundle, backend=backend, memory=memory)
    pipe.set_progress_bar_config(disable=True)
    latents = np.load(config.latents_file)

    def generate(steps: int):
        out = pipe(config.prompt, num_inference_steps=steps, guidance_scale=config.guidance_scale, height=config.height,
                   width=config.width, num_images_per_prompt=config.batch, latents=latents, output_type="np")
        return out.images, dict(out.timings)

    return generate, {"backend": pipe.backend.name + ("" if memory == "keep-loaded" else f", {memory}")}


def _diffusers_style(pipe: Any, config: RunConfig, latents: Any) -> Callable[[int], Any]:
    """generate(steps) for diffusers' pipeline and the pipelines built on it (optimum's), with stage timings from
    hooks on the methods every such pipeline calls."""
    import torch

    pipe.set_progress_bar_config(disable=True)
    clock = _StageClock()
    # The tokenizer's __call__ cannot be wrapped per instance: here text_encode includes tokenization.
    pipe.encode_prompt = clock.wrap("text_encode", pipe.encode_prompt)
    pipe.unet.forward = clock.wrap("unet", pipe.unet.forward)
    pipe.vae.decode = clock.wrap("decode", pipe.vae.decode)
    if pipe.safety_checker is not None:
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
        timings["unet_calls"] = clock.calls.get("unet", 0)
        # What the hooks do not cover: latents set-up, guidance arithmetic and the scheduler, post-processing.
        timings["guidance_and_scheduler"] = total - sum(clock.seconds.values())
        return np.asarray(out.images, dtype=np.float32), timings

    return generate


def _run_diffusers(config: RunConfig, checkpoint: str, dtype_name: str) -> tuple[Callable[[int], Any], dict[str, Any]]:
    import torch
    from diffusers import StableDiffusionPipeline

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    pipe = StableDiffusionPipeline.from_pretrained(checkpoint, torch_dtype=dtype)
    latents = torch.from_numpy(np.load(config.latents_file)).to(dtype)
    info = {"backend": f"torch {torch.__version__} {dtype_name}", "threads": torch.get_num_threads()}
    return _diffusers_style(pipe, config, latents), info


def _run_optimum(config: RunConfig, onnx_dir: str) -> tuple[Callable[[int], Any], dict[str, Any]]:
    import torch
    from optimum.onnxruntime import ORTStableDiffusionPipeline

    pipe = ORTStableDiffusionPipeline.from_pretrained(onnx_dir)
    latents = torch.from_numpy(np.load(config.latents_file))  # optimum 2 builds on diffusers' pipeline: torch latents
    # optimum's export has no safety checker: say so in the results rather than compare unlike work silently.
    info = {"backend": "optimum-onnxruntime fp32" + (" (no safety checker)" if pipe.safety_checker is None else "")}
    return _diffusers_style(pipe, config, latents), info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sdrt.benchmarks.worker")
    parser.add_argument("--engine", choices=ENGINES, required=True)
    parser.add_argument("--model", required=True, help="bundle (sdrt), checkpoint (diffusers) or ONNX dir (optimum)")
    parser.add_argument("--config", required=True, help="RunConfig as JSON")
    parser.add_argument("--launched-at", type=float, required=True, help="time.time() just before this process started")
    parser.add_argument("--images-out", required=True, help=".npy path for the final images")
    args = parser.parse_args(argv)
    config = RunConfig(**json.loads(args.config))

    load_start = time.perf_counter()
    if args.engine in SDRT_ENGINES:
        generate, info = _run_sdrt(config, args.model, args.engine)
    elif args.engine.startswith("diffusers"):
        generate, info = _run_diffusers(config, args.model, args.engine.split("-")[1])
    else:
        generate, info = _run_optimum(config, args.model)
    load_s = time.perf_counter() - load_start
    generate(1)  # first image: sessions created, kernels compiled, memory arenas grown for this shape
    cold_start_s = time.time() - args.launched_at
    start = time.perf_counter()
    images, timings = generate(config.steps)
    e2e_s = time.perf_counter() - start
    np.save(args.images_out, images)
    print(json.dumps({
        "engine": args.engine, **info, "load_s": load_s, "cold_start_s": cold_start_s, "e2e_s": e2e_s,
        "images_per_s": config.batch / e2e_s, "timings": timings, "peak_rss_gb": _peak_rss_gb(),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
