"""`generate`, `img2img`, `inpaint` and `outpaint`: one request on the lean runtime, its images written as PNGs that
record its parameters. BUNDLE defaults to the embedded default model (sdrt.demo ships its bundle)."""
from __future__ import annotations

import argparse
import secrets
import sys
from pathlib import Path

import numpy as np

from sdrt.cli.common import EXIT_BLOCKED, UsageError
from sdrt.demo.default_model import default_bundle_dir
from sdrt.engine import PromptOptions, load
from sdrt.engine.backends.base import MemoryPolicy
from sdrt.engine.image_io import save_png
from sdrt.engine.safety_checker import SafetyPolicy
from sdrt.engine.schedulers import DEFAULT_SCHEDULER, SCHEDULER_NAMES
from sdrt.engine.version import SDRT_VERSION

# The request arguments each command adds to generate's (attribute names are the pipeline's argument names).
_COMMAND_ARGUMENTS = {
    "generate": (),
    "img2img": ("image", "strength"),
    "inpaint": ("image", "mask_image", "strength"),
    "outpaint": ("image", "left", "right", "top", "bottom", "feather", "strength"),
}

# img2img, inpaint and outpaint: (help, description), the description ending before the sentence on BUNDLE.
_IMAGE_COMMANDS = {
    "img2img": ("image to image", "Generate images from an image and a prompt, as diffusers' StableDiffusionImg2ImgPipeline: "
                "the image is noised to --strength and denoised for the prompt."),
    "inpaint": ("repaint the masked part of an image", "Repaint the white part of --mask-image in --image for the "
                "prompt, as diffusers' StableDiffusionInpaintPipeline (an inpainting checkpoint's 9-channel U-Net, "
                "or a standard one that keeps the unmasked region's latents)."),
    "outpaint": ("extend an image beyond its borders", "Grow --image by --left/--right/--top/--bottom pixels (the "
                 "canvas rounded up to a multiple of the VAE scale factor, extra pixels right and bottom), fill the new "
                 "margins for the prompt with a feathered seam, and paste the original pixels back unchanged."),
}


def _output_paths(output: Path, count: int) -> list[Path]:
    """`out.png` for one image; `out-0.png`, `out-1.png`, ... for several."""
    if count == 1:
        return [output]
    return [output.with_name(f"{output.stem}-{index}{output.suffix}") for index in range(count)]


def _generate(args: argparse.Namespace) -> int:
    """`generate`, `img2img`, `inpaint` and `outpaint`: one request, its images written as PNGs with its parameters."""
    if len(args.positional) > 2:
        raise UsageError(f"{args.command} takes [BUNDLE] PROMPT: quote a prompt that contains spaces")
    bundle, prompt = (args.positional if len(args.positional) == 2 else [None, args.positional[0]])
    if args.output.suffix.lower() != ".png":
        raise UsageError(f"--output must name a .png file, got {args.output}")
    latents = None
    if getattr(args, "latents", None) is not None:
        try:
            latents = np.load(args.latents, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise UsageError(f"--latents: cannot read {args.latents} as a .npy array: {exc}") from exc
    seed = args.seed if args.seed is not None or latents is not None else secrets.randbelow(2**32)

    bundle_dir = Path(bundle) if bundle is not None else default_bundle_dir()
    pipe = load(bundle_dir, backend=args.backend, safety_checker=args.safety_checker, memory=args.memory)
    pipe.set_progress_bar_config(disable=args.quiet)
    common = dict(negative_prompt=args.negative_prompt, num_inference_steps=args.num_inference_steps,
                  guidance_scale=args.guidance_scale, num_images_per_prompt=args.num_images_per_prompt, seed=seed,
                  scheduler=args.scheduler,
                  prompt_options=PromptOptions(long_prompts=args.long_prompts, weighting=args.prompt_weighting))
    # What the command adds to the request; recorded in the PNG as given (paths as strings).
    extra = {name: getattr(args, name) for name in _COMMAND_ARGUMENTS[args.command] if getattr(args, name) is not None}
    if args.command == "outpaint":
        margins = {name: value for name, value in extra.items() if name != "image"}
        out = pipe.outpaint(extra["image"], prompt, **margins, **common)
    else:
        out = pipe(prompt, height=args.height, width=args.width, latents=latents, **extra, **common)

    parameters = {
        "prompt": prompt,
        "negative_prompt": args.negative_prompt,
        "num_inference_steps": args.num_inference_steps,
        "guidance_scale": args.guidance_scale,
        "height": out.images[0].height,
        "width": out.images[0].width,
        "seed": seed,
        "scheduler": args.scheduler,
        **({"latents": str(args.latents) if args.latents is not None else None} if args.command == "generate" else {}),
        "long_prompts": args.long_prompts,
        "prompt_weighting": args.prompt_weighting,
        **{name: str(value) if isinstance(value, Path) else value for name, value in extra.items()},
        "command": args.command,
        "bundle": str(bundle_dir),
        "backend": out.backend,
        "sdrt_version": SDRT_VERSION,
    }
    flags = out.nsfw_content_detected or [None] * len(out.images)
    blocked = 0
    for index, (image, path, nsfw) in enumerate(zip(out.images, _output_paths(args.output, len(out.images)), flags)):
        if nsfw and pipe.safety_policy is SafetyPolicy.BLOCK:
            # A black PNG would pass for a result; name the image instead and leave no file behind.
            print(f"sdrt: {path} blocked by the safety checker (NSFW concept detected): not written", file=sys.stderr)
            blocked += 1
            continue
        save_png(image, path, {**parameters, "image_index": index, "nsfw_content_detected": nsfw})
        if nsfw:
            print(f"sdrt: {path} flagged by the safety checker (NSFW concept detected)", file=sys.stderr)
        print(path)
    return EXIT_BLOCKED if blocked else 0


def _add_generation_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    """generate's options, those that apply to `command`, and the command's own."""
    parser.add_argument("positional", nargs="+", metavar="[BUNDLE] PROMPT")
    parser.add_argument("-o", "--output", type=Path, default=Path("image.png"), help="PNG path (numbered when -n > 1)")
    if command != "generate":
        parser.add_argument("-i", "--image", type=Path, required=True, help="the image to start from (any format PIL reads)")
    if command == "inpaint":
        parser.add_argument("-m", "--mask-image", type=Path, required=True,
                            help="same size as the image: white = repaint, black = keep")
    if command == "outpaint":
        for side in ("left", "right", "top", "bottom"):
            parser.add_argument(f"--{side}", type=int, default=0, help=f"pixels to add on the {side}")
        parser.add_argument("--feather", type=int, default=None,
                            help="seam width in pixels (default 4 latent pixels, capped at half the widest margin)")
    parser.add_argument("--negative-prompt", default=None)
    parser.add_argument("-s", "--num-inference-steps", type=int, default=50)
    parser.add_argument("-g", "--guidance-scale", type=float, default=7.5)
    parser.add_argument("-n", "--num-images-per-prompt", type=int, default=1)
    if command != "generate":
        default = "0.8" if command == "img2img" else "1.0"
        parser.add_argument("--strength", type=float, default=None,
                            help=f"how far from the image to start, in [0, 1] (default {default}): the share of the steps that run")
    if command != "outpaint":
        size_help = {"generate": "default: the model's", "img2img": "default: the image's, rounded down to a multiple of "
                     "the VAE scale factor", "inpaint": "default: the model's (as diffusers)"}[command]
        parser.add_argument("--height", type=int, default=None, help=size_help)
        parser.add_argument("--width", type=int, default=None, help=size_help)
    parser.add_argument("--seed", type=int, default=None, help="random if omitted (and recorded in the PNG)")
    if command == "generate":
        parser.add_argument("--latents", type=Path, default=None, help=".npy float32 initial noise")
    parser.add_argument("--scheduler", choices=SCHEDULER_NAMES, default=DEFAULT_SCHEDULER,
                        help="sampler; default: the checkpoint's own (stochastic ones take their noise from --seed)")
    parser.add_argument("--long-prompts", action="store_true",
                        help="encode prompts longer than the text encoder's window in chunks instead of truncating them")
    parser.add_argument("--prompt-weighting", action="store_true",
                        help="read (word:1.3), (word) = x1.1, [word] = /1.1 as weights; \\( for a literal bracket")
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--memory", choices=[m.value for m in MemoryPolicy], default=MemoryPolicy.KEEP_LOADED.value,
                        help="one-at-a-time keeps only the model in use loaded: lowest peak memory")
    parser.add_argument("--safety-checker", choices=[p.value for p in SafetyPolicy], default=SafetyPolicy.BLOCK.value,
                        help="block: flagged images are not written (exit status 3); flag: written and named; off")
    parser.add_argument("--no-safety-checker", dest="safety_checker", action="store_const", const=SafetyPolicy.OFF.value,
                        help="same as --safety-checker off")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(handler=_generate)


def add_commands(commands: argparse._SubParsersAction) -> None:
    """generate, img2img, inpaint and outpaint."""
    generate = commands.add_parser("generate", help="text to image", description=(
        "Generate images from a prompt. BUNDLE defaults to the embedded default model."))
    _add_generation_arguments(generate, "generate")
    for command, (summary, description) in _IMAGE_COMMANDS.items():
        _add_generation_arguments(commands.add_parser(command, help=summary, description=description + " BUNDLE "
                                                      "defaults to the embedded default model."), command)
