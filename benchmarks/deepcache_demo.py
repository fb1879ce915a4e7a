"""DeepCache's speed and fidelity on one backend, in one process: warm generations of a batch of demo-scene prompts
without DeepCache and with it at several intervals, each timed (best of two) and compared with the run without.

    python -m sdrt.benchmarks.deepcache_demo BUNDLE [--backend auto] [--steps 20] [--intervals 2 3 5]

BUNDLE must be exported with `--deepcache-branch N` (e.g. the demo checkpoint: `sdrt export demo/model OUT
--deepcache-branch 0`). `sdrt bench --engines sdrt-exact sdrt-deepcache ...` measures the same across fresh
processes, against the fp32 engine; this is the quick look (figures: docs/design-notes.md, DeepCache).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

import sdrt.engine
from sdrt.benchmarks.bench import psnr
from sdrt.demo.scenes import all_scenes

PROMPTS = 8  # spread over the demo's 180 scenes


def _timed_run(pipe, prompts: list[str], steps: int, deepcache) -> tuple[np.ndarray, float, float]:
    """(images, best end-to-end seconds, that run's U-Net seconds) over two runs after a warm-up."""
    def run():
        return pipe(prompts, num_inference_steps=steps, seed=0, output_type="np", deepcache=deepcache)

    run()  # loads and compiles the passes
    best = None
    for _ in range(2):
        start = time.perf_counter()
        out = run()
        elapsed = time.perf_counter() - start
        if best is None or elapsed < best[1]:
            best = (out.images, elapsed, out.timings["unet"])
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sdrt.benchmarks.deepcache_demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--intervals", type=int, nargs="+", default=[2, 3, 5])
    args = parser.parse_args(argv)
    pipe = sdrt.engine.load(args.bundle, backend=args.backend, safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    if pipe.manifest.deepcache is None:
        parser.error(f"{args.bundle} has no DeepCache passes: export it with --deepcache-branch N")
    scenes = all_scenes()
    prompts = [scene.caption() for scene in scenes[::len(scenes) // PROMPTS]][:PROMPTS]
    reference, e2e, unet = _timed_run(pipe, prompts, args.steps, None)
    print(f"{pipe.backend.name}, {args.steps} steps, {len(prompts)} images, branch {pipe.manifest.deepcache.branch}: "
          f"without DeepCache {e2e:.2f} s (U-Net {unet:.2f} s)")
    for interval in args.intervals:
        deepcache = sdrt.engine.DeepCache(interval, pipe.manifest.deepcache.branch)
        images, cached_e2e, cached_unet = _timed_run(pipe, prompts, args.steps, deepcache)
        print(f"  interval {interval}: {cached_e2e:.2f} s ({e2e / cached_e2e:.2f}x), U-Net {cached_unet:.2f} s "
              f"({unet / cached_unet:.2f}x), PSNR {psnr(images, reference.astype(np.float64)):.1f} dB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
