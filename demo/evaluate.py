"""Prompt accuracy of a bundle on the demo scenes: generate every combination, read each image with the scorer.

    python -m sdrt.demo.evaluate [BUNDLE] [--steps 50] [--guidance 7.5] [--seed 0] [--deepcache INTERVAL] [--json OUT]

Without BUNDLE it evaluates the embedded default model. Accuracy is reported over all 180 combinations and
separately over the 18 held out of training, per attribute and for whole prompts (every attribute right).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from tqdm.auto import tqdm

from sdrt.demo.default_model import default_bundle_dir
from sdrt.demo.scenes import Scene, all_scenes, held_out_scenes
from sdrt.demo.scorer import Score, read_image, score
from sdrt.demo.sweep import Call, generate
from sdrt.engine import DeepCache

logger = logging.getLogger(__name__)

@dataclasses.dataclass(frozen=True)
class Evaluation:
    """Scores over every scene and over the held-out ones, and the captions the model got wrong."""

    all: Score
    held_out: Score
    failures: tuple[str, ...]
    num_inference_steps: int
    guidance_scale: float
    seed: int
    deepcache: DeepCache | None = None


def evaluate(
    pipe, scenes: Sequence[Scene] | None = None, num_inference_steps: int = 50, guidance_scale: float = 7.5, seed: int = 0,
    deepcache: DeepCache | None = None,
) -> Evaluation:
    """Generate each scene's full caption once and score what the images show (with `deepcache`, DeepCache's passes)."""
    scenes = list(all_scenes() if scenes is None else scenes)
    captions = [scene.caption() for scene in scenes]
    size = pipe.manifest.model.default_image_size
    call = Call(value=guidance_scale, part=None, prompts=tuple(captions), negative_prompt=None,
                num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, height=size, width=size,
                num_images_per_prompt=1, deepcache=deepcache)
    with tqdm(total=len(captions), desc="evaluate", unit="image") as bar:
        images = generate(pipe, call, seed, progress=bar.update)  # (N, H, W, 3) uint8
    wanted = call.wanted()
    held = set(held_out_scenes())
    held_index = [i for i, scene in enumerate(scenes) if scene in held]
    failures = tuple(c for c, image, w in zip(captions, images, wanted) if not read_image(image).matches(w))
    return Evaluation(
        all=score(list(images), wanted),
        held_out=score([images[i] for i in held_index], [wanted[i] for i in held_index]),
        failures=failures,
        num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale,
        seed=seed,
        deepcache=deepcache,
    )


def main(argv: list[str] | None = None) -> int:
    import sdrt.engine

    parser = argparse.ArgumentParser(prog="python -m sdrt.demo.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("bundle", nargs="?", type=Path, help="default: the embedded demo model")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--deepcache", type=int, default=None, metavar="INTERVAL",
                        help="DeepCache every INTERVAL U-Net calls, at the branch the bundle was exported for")
    parser.add_argument("--json", type=Path, help="also write the evaluation here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    pipe = sdrt.engine.load(args.bundle or default_bundle_dir(), backend=args.backend, safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    exported = pipe.manifest.deepcache
    deepcache = None if args.deepcache is None else DeepCache(args.deepcache, exported.branch if exported is not None else 0)
    result = evaluate(pipe, num_inference_steps=args.steps, guidance_scale=args.guidance, seed=args.seed, deepcache=deepcache)
    for name, s in (("all", result.all), ("held-out", result.held_out)):
        print(f"{name:9s} n={s.n:3d} prompt {s.prompt:.3f}  shape {s.shape:.3f}  colour {s.colour:.3f}  "
              f"background {s.background:.3f}  position {s.position:.3f}")
    print(f"backend {pipe.backend.name}, {args.steps} steps, guidance {args.guidance}, seed {args.seed}, deepcache {deepcache}")
    if args.json:
        args.json.write_text(json.dumps(dataclasses.asdict(result), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
