"""`generate`, `img2img`, `inpaint` and `outpaint`: one request on the lean runtime, its images written as PNGs that
record its parameters. BUNDLE defaults to the embedded default model (sdrt.demo ships its bundle)."""
from __future__ import annotations

import argparse
import dataclasses
import os
import secrets
import shlex
import sys
from pathlib import Path

import numpy as np

from sdrt.cli import signals
from sdrt.cli.common import EXIT_BLOCKED, HelpFormatter, UsageError, add_backend_argument
from sdrt.cli.outputs import check_output, output_paths, write_all
from sdrt.demo import scenes
from sdrt.demo.default_model import default_bundle_dir
from sdrt.engine import DeepCache, GenerationRequest, PipelineOutput, PromptOptions, load
from sdrt.engine.backends.base import MemoryPolicy
from sdrt.engine.image_io import save_png
from sdrt.engine.safety_checker import SafetyPolicy
from sdrt.engine.schedulers import DEFAULT_SCHEDULER, SCHEDULER_NAMES
from sdrt.engine.specs import Decoder
from sdrt.engine.version import SDRT_VERSION

# The request arguments each command adds to generate's (attribute names are the pipeline's argument names).
_COMMAND_ARGUMENTS = {
    "generate": (),
    "img2img": ("image", "strength", "aesthetic_score", "negative_aesthetic_score"),
    "inpaint": ("image", "mask_image", "strength", "aesthetic_score", "negative_aesthetic_score"),
    "outpaint": ("image", "left", "right", "top", "bottom", "feather", "strength", "aesthetic_score",
                 "negative_aesthetic_score"),
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


_POSITIONALS = "[BUNDLE] PROMPT"


class _HelpFormatter(HelpFormatter):
    """Writes the positionals as what they are, one optional bundle and one prompt: argparse would write its "+"
    arguments as "X [X ...]", which reads as several prompts."""

    def _format_args(self, action: argparse.Action, default_metavar: str) -> str:
        return _POSITIONALS if action.metavar == _POSITIONALS else super()._format_args(action, default_metavar)


def _bundle_and_prompt(args: argparse.Namespace) -> tuple[str | None, str]:
    """BUNDLE (None: the default model) and PROMPT; raise UsageError where the words look like one unquoted prompt."""
    words = args.positional
    if len(words) > 2:
        prompt = " ".join(words[1:] if _names_a_path(words[0]) else words)
        bundle = [words[0]] if _names_a_path(words[0]) else []
        raise UsageError(f"PROMPT: one prompt per call, quoted when it has spaces: "
                         f"{shlex.join(['sdrt', args.command, *bundle, prompt])}")
    if len(words) == 1:
        return None, words[0]
    bundle, prompt = words
    if not _names_a_path(bundle):
        raise UsageError(f"BUNDLE: no bundle directory {bundle!r} here; if {' '.join(words)!r} is one prompt, quote it: "
                         f"{shlex.join(['sdrt', args.command, ' '.join(words)])}")
    return bundle, prompt


def _names_a_path(word: str) -> bool:
    """Whether a first word is meant as a bundle: it exists, or it is written as a path."""
    return Path(word).exists() or os.sep in word or "/" in word


def _default_model_hint(prompt: str) -> str | None:
    """What to tell a user whose prompt names nothing the default model was trained to draw."""
    if not prompt.strip() or scenes.names_anything_known(prompt):
        return None
    return ("sdrt: hint: the default model draws only a red, green, blue or yellow circle, square or triangle on a "
            "plain background, at a position (\"a red circle on a blue background, top left\"); this prompt names none "
            "of these, so expect a blob. Give a BUNDLE exported from a full checkpoint (sdrt export) for anything else.")


def _generate(args: argparse.Namespace) -> int:
    """`generate`, `img2img`, `inpaint` and `outpaint`: one request, its images written as PNGs with its parameters."""
    bundle, prompt = _bundle_and_prompt(args)
    check_output(args.output, args.num_images_per_prompt)
    latents = None
    if getattr(args, "latents", None) is not None:
        try:
            latents = np.load(args.latents, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise UsageError(f"--latents: cannot read {args.latents} as a .npy array: {exc}") from exc
    seed = args.seed if args.seed is not None or latents is not None else secrets.randbelow(2**32)

    bundle_dir = Path(bundle) if bundle is not None else default_bundle_dir()
    # The default model has no safety checker, by design (its model card): not a fact to warn about on every run.
    safety_checker = args.safety_checker or (SafetyPolicy.OFF if bundle is None else SafetyPolicy.BLOCK).value
    if bundle is None and (hint := _default_model_hint(prompt)) is not None:
        print(hint, file=sys.stderr)
    common = dict(negative_prompt=args.negative_prompt, num_inference_steps=args.num_inference_steps,
                  guidance_scale=args.guidance_scale, num_images_per_prompt=args.num_images_per_prompt, seed=seed,
                  scheduler=args.scheduler, decoder=args.decoder,
                  prompt_options=PromptOptions(long_prompts=args.long_prompts, weighting=args.prompt_weighting))
    # What the command adds to the request; recorded in the PNG as given (paths as strings).
    extra = {name: getattr(args, name) for name in _COMMAND_ARGUMENTS[args.command] if getattr(args, name) is not None}

    def run() -> tuple[SafetyPolicy, GenerationRequest, PipelineOutput]:
        pipe = load(bundle_dir, backend=args.backend, safety_checker=safety_checker, memory=args.memory,
                    deepcache=args.deepcache is not None or args.preset == "fast")
        pipe.set_progress_bar_config(disable=args.quiet)
        common["deepcache"] = _deepcache(args, pipe)
        # Validated before any model runs: a bad argument ends here as `sdrt: error: <parameter>: <allowed range>`.
        if args.command == "outpaint":
            margins = {name: value for name, value in extra.items() if name != "image"}
            request = GenerationRequest.create_outpainting(pipe.limits, extra["image"], prompt, **margins, **common)
        else:
            request = GenerationRequest.create(pipe.limits, prompt, height=args.height, width=args.width,
                                               latents=latents, **extra, **common)
        return pipe.safety_policy, request, pipe.generate(request)

    # Loading and generating run in a worker thread, so that Ctrl-C and SIGTERM stop the command at once.
    safety_policy, request, out = signals.run_interruptibly(run)

    parameters = {
        "prompt": prompt,
        "negative_prompt": args.negative_prompt,
        "num_inference_steps": request.num_inference_steps,
        "guidance_scale": request.guidance_scale,
        "height": request.height,
        "width": request.width,
        "seed": seed,
        "scheduler": request.scheduler or DEFAULT_SCHEDULER,
        "decoder": request.decoder.value,
        **({"latents": str(args.latents) if args.latents is not None else None} if args.command == "generate" else {}),
        "long_prompts": args.long_prompts,
        "deepcache": None if request.deepcache is None else dataclasses.asdict(request.deepcache),
        "prompt_weighting": args.prompt_weighting,
        **{name: str(value) if isinstance(value, Path) else value for name, value in extra.items()},
        "command": args.command,
        "bundle": str(bundle_dir),
        "backend": out.backend,
        "sdrt_version": SDRT_VERSION,
    }
    flags = out.nsfw_content_detected or [None] * len(out.images)
    notes: list[str] = []

    def write(index: int, path: Path) -> bool:
        if flags[index] and safety_policy is SafetyPolicy.BLOCK:
            # A black PNG would pass for a result; name the image instead and leave no file behind.
            notes.append(f"sdrt: {path} blocked by the safety checker (NSFW concept detected): not written")
            return False
        save_png(out.images[index], path, {**parameters, "image_index": index, "nsfw_content_detected": flags[index]})
        if flags[index]:
            notes.append(f"sdrt: {path} flagged by the safety checker (NSFW concept detected)")
        return True

    written = write_all(output_paths(args.output, len(out.images)), write)
    for line in notes:
        print(line, file=sys.stderr)
    for path in written:
        print(path)
    return EXIT_BLOCKED if len(written) < len(out.images) else 0


#: `--preset`: named settings, each filling in what the command line leaves unset
PRESETS = {"fast": "DeepCache every 3 U-Net calls (where the bundle has its passes) on the auto backend"}
FAST_DEEPCACHE_INTERVAL = 3


def _deepcache(args: argparse.Namespace, pipe) -> DeepCache | None:
    """--deepcache INTERVAL [--deepcache-branch N] (default: the branch the bundle was exported for), or --preset fast's."""
    exported = pipe.manifest.deepcache
    interval = args.deepcache
    if interval is None and args.preset == "fast":
        if exported is None:
            print(f"sdrt: note: --preset fast runs without DeepCache: {pipe.bundle_dir} has no DeepCache passes "
                  "(export it with --deepcache-branch N)", file=sys.stderr)
            return None
        interval = FAST_DEEPCACHE_INTERVAL
    if interval is None:
        if args.deepcache_branch is not None:
            raise UsageError("--deepcache-branch: applies with --deepcache INTERVAL (or --preset fast)")
        return None
    branch = args.deepcache_branch if args.deepcache_branch is not None else (exported.branch if exported is not None else 0)
    return DeepCache(cache_interval=interval, cache_branch=branch)


def _add_generation_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    """generate's options, those that apply to `command`, and the command's own."""
    parser.add_argument("positional", nargs="+", metavar=_POSITIONALS,
                        help="BUNDLE: an exported bundle directory (default: the embedded demo model, which draws coloured "
                        "shapes); PROMPT: one prompt, in quotes when it has spaces")
    parser.add_argument("-o", "--output", type=Path, default=Path("image.png"),
                        help="PNG path in an existing directory, numbered when -n > 1 (default: %(default)s)")
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
    parser.add_argument("-s", "--num-inference-steps", type=int, default=None,
                        help="denoising steps (default: the bundle's: 1 for Turbo, 4 for LCM, else 50)")
    parser.add_argument("-g", "--guidance-scale", type=float, default=None,
                        help="how closely to follow the prompt; <= 1 runs no unconditional pass (default: the bundle's: "
                             "0 for Turbo, else 7.5)")
    parser.add_argument("-n", "--num-images-per-prompt", type=int, default=1, help="images to make (default: %(default)s)")
    if command != "generate":
        default = "0.8" if command == "img2img" else "1.0"
        parser.add_argument("--strength", type=float, default=None,
                            help=f"how far from the image to start, in [0, 1] (default {default}): the share of the steps that run")
        parser.add_argument("--aesthetic-score", type=float, default=None,
                            help="an SDXL refiner bundle's aesthetic score for the prompt (default 6.0, as diffusers)")
        parser.add_argument("--negative-aesthetic-score", type=float, default=None,
                            help="an SDXL refiner bundle's aesthetic score for the unconditional half (default 2.5)")
    if command != "outpaint":
        size_help = {"generate": "default: the model's", "img2img": "default: the image's, rounded down to a multiple of "
                     "the VAE scale factor", "inpaint": "default: the model's (as diffusers)"}[command]
        parser.add_argument("--height", type=int, default=None, help=size_help)
        parser.add_argument("--width", type=int, default=None, help=size_help)
    parser.add_argument("--seed", type=int, default=None, help="random if omitted (and recorded in the PNG)")
    if command == "generate":
        parser.add_argument("--latents", type=Path, default=None, help=".npy float32 initial noise")
    parser.add_argument("--scheduler", choices=SCHEDULER_NAMES, default=None,
                        help=f"sampler; default: the bundle's (lcm for an LCM-LoRA export), else the checkpoint's own, "
                             f"'{DEFAULT_SCHEDULER}' (stochastic ones take their noise from --seed)")
    parser.add_argument("--decoder", choices=[d.value for d in Decoder], default=Decoder.FULL.value,
                        help="the VAE (full) or the tiny autoencoder of a bundle exported with --tiny-vae (tiny: "
                        "faster, rougher images) (default: %(default)s)")
    parser.add_argument("--long-prompts", action="store_true",
                        help="encode prompts longer than the text encoder's window in chunks instead of truncating them")
    parser.add_argument("--prompt-weighting", action="store_true",
                        help="read (word:1.3), (word) = x1.1, [word] = /1.1 as weights; \\( for a literal bracket")
    parser.add_argument("--deepcache", type=int, default=None, metavar="INTERVAL",
                        help="DeepCache: a full U-Net pass every INTERVAL calls, shallow passes reusing its deep features "
                        "between (faster, less exact: 3 is DeepCache's usual setting); needs a bundle exported with "
                        "--deepcache-branch; default: off")
    parser.add_argument("--deepcache-branch", type=int, default=None, metavar="N",
                        help="DeepCache's cache branch (default: the one the bundle was exported for)")
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None,
                        help="; ".join(f"{name}: {text}" for name, text in PRESETS.items()))
    add_backend_argument(parser)
    parser.add_argument("--memory", choices=[m.value for m in MemoryPolicy], default=MemoryPolicy.KEEP_LOADED.value,
                        help="one-at-a-time keeps only the model in use loaded: lowest peak memory")
    parser.add_argument("--safety-checker", choices=[p.value for p in SafetyPolicy], default=None,
                        help="block (default; off for the default model, which has no checker): flagged images are not "
                        "written (exit status 3); flag: written and named; off")
    parser.add_argument("--no-safety-checker", dest="safety_checker", action="store_const", const=SafetyPolicy.OFF.value,
                        help="same as --safety-checker off")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(handler=_generate)


def add_commands(commands: argparse._SubParsersAction) -> None:
    """generate, img2img, inpaint and outpaint."""
    generate = commands.add_parser("generate", help="text to image", formatter_class=_HelpFormatter, description=(
        "Generate images from a prompt. BUNDLE defaults to the embedded default model."))
    _add_generation_arguments(generate, "generate")
    for command, (summary, description) in _IMAGE_COMMANDS.items():
        _add_generation_arguments(commands.add_parser(command, help=summary, formatter_class=_HelpFormatter,
                                                      description=description + " BUNDLE defaults to the embedded "
                                                      "default model."), command)
