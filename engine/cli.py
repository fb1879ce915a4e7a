"""The `sdrt` command: `generate`, `img2img`, `inpaint`, `outpaint` and `doctor` run on the lean runtime; `export` needs the export extra and
`build-engines` (and `export --tensorrt`) the gpu extra, each imported lazily.

Every failure a user can cause prints one line `sdrt: error: ...` and exits with status 2, leaving no output file.
"""
from __future__ import annotations

import argparse
import importlib.util
import logging
import secrets
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import numpy as np

from sdrt.engine.atomic import atomic_file
from sdrt.engine.backends.base import MemoryPolicy
from sdrt.engine.errors import BackendUnavailableError, InvalidArgumentError, SdrtError
from sdrt.engine.host_memory import DEFAULT_BUDGET_FRACTION, MemoryBudget
from sdrt.engine.safety_checker import SafetyPolicy
from sdrt.engine.schedulers import DEFAULT_SCHEDULER, SCHEDULER_NAMES
from sdrt.engine.specs import FP16_DEFAULT_COMPONENTS, Component
from sdrt.engine.tensorrt.profile import PROFILE_AXES, AxisRange, EngineProfile, Precision, component_shapes
from sdrt.engine.version import SDRT_VERSION

if TYPE_CHECKING:
    from sdrt.export.lora_fusion import LoraSpec

logger = logging.getLogger("sdrt")

# The architectures of sdrt.export.checkpoints.ARCHES, named here so `sdrt --help` works without the export extra.
ARCH_NAMES = ("sd15", "tiny", "tiny-alt", "demo", "tiny-inpaint", "sd15-small")
EXIT_USAGE = 2
# `sdrt serve`: the bundle passed the check before the port was bound, then failed to load.
EXIT_LOAD_FAILED = 1
# Generation finished but the safety checker blocked at least one image, which was therefore not written.
EXIT_BLOCKED = 3


class _UsageError(Exception):
    pass


class _ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, not argparse's usage block
        raise _UsageError(f"{self.prog}: {message}")


def _output_paths(output: Path, count: int) -> list[Path]:
    """`out.png` for one image; `out-0.png`, `out-1.png`, ... for several."""
    if count == 1:
        return [output]
    return [output.with_name(f"{output.stem}-{index}{output.suffix}") for index in range(count)]


def _generate(args: argparse.Namespace) -> int:
    """`generate`, `img2img`, `inpaint` and `outpaint`: one request, its images written as PNGs with its parameters."""
    from sdrt.engine import PromptOptions, default_bundle_dir, load

    if len(args.positional) > 2:
        raise _UsageError(f"{args.command} takes [BUNDLE] PROMPT: quote a prompt that contains spaces")
    bundle, prompt = (args.positional if len(args.positional) == 2 else [None, args.positional[0]])
    if args.output.suffix.lower() != ".png":
        raise _UsageError(f"--output must name a .png file, got {args.output}")
    latents = None
    if getattr(args, "latents", None) is not None:
        try:
            latents = np.load(args.latents, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise _UsageError(f"--latents: cannot read {args.latents} as a .npy array: {exc}") from exc
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
    from sdrt.engine.images import save_png

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


# The request arguments each command adds to generate's (attribute names are the pipeline's argument names).
_COMMAND_ARGUMENTS = {
    "generate": (),
    "img2img": ("image", "strength"),
    "inpaint": ("image", "mask_image", "strength"),
    "outpaint": ("image", "left", "right", "top", "bottom", "feather", "strength"),
}


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


def _import_export_extra(command: str):
    try:
        import sdrt.export.bundle
        import sdrt.export.checkpoints
        import sdrt.export
    except ImportError as exc:
        raise SdrtError(
            f"sdrt {command} needs the export extra ({exc.name} is missing): pip install torch==2.13.0 && pip install 'sdrt[export]'"
        ) from exc
    return sdrt.export


def _import_serve_extra(ray: bool):
    extra = "ray" if ray else "serve"
    try:
        import sdrt.serve

        if ray:
            import sdrt.serve.ray_app
    except ImportError as exc:
        raise SdrtError(f"sdrt serve{' --ray' if ray else ''} needs the {extra} extra ({exc.name} is missing): "
                        f"pip install 'sdrt[{extra}]'") from exc
    return sdrt.serve


def _serve(args: argparse.Namespace) -> int:
    serve = _import_serve_extra(args.ray)
    ray_only = [flag for flag, given in (("--ray-address", args.ray_address is not None),
                                         ("--replicas", args.replicas is not None),
                                         ("--ray-temp-dir", args.ray_temp_dir is not None)) if given]
    if ray_only and not args.ray:
        raise _UsageError(f"{', '.join(ray_only)}: Ray options need --ray")
    if args.ray and args.wait_for_bundle:
        raise _UsageError("--wait-for-bundle: not with --ray (each replica loads the bundle when it starts)")
    if args.ray_temp_dir is not None and args.ray_address is not None:
        raise _UsageError("--ray-temp-dir: only for the Ray instance this command starts, not with --ray-address")
    from sdrt.serve.server import LoadFailedError, api_key_from

    config = serve.ServeConfig(
        bundle=args.bundle, backend=args.backend, safety_checker=args.safety_checker, host=args.host, port=args.port,
        batching=serve.BatcherConfig(max_batch_images=args.max_batch_images, max_wait_s=args.max_wait_ms / 1000,
                                     max_queue=args.max_queue),
        app=serve.AppSettings(limits=serve.Limits(max_n=args.max_n, max_steps=args.max_steps, max_body_bytes=args.max_body_bytes),
                              request_timeout_s=args.request_timeout, api_key=api_key_from(args.api_key)),
        warm_up=not args.no_warm_up, graceful_shutdown_s=args.graceful_shutdown, wait_for_bundle=args.wait_for_bundle,
        memory_budget=args.memory_budget,
    )
    try:
        if args.ray:
            from sdrt.serve.ray_app import RayOptions, run_ray

            replicas = args.replicas or (1, 1)
            run_ray(config, RayOptions(address=args.ray_address, min_replicas=replicas[0], max_replicas=replicas[1],
                                       replica_cpus=args.replica_cpus, temp_dir=args.ray_temp_dir))
        else:
            serve.run(config)
    except LoadFailedError as exc:  # not a usage error: the bundle looked right and failed while loading
        print(f"sdrt: error: {exc}", file=sys.stderr)
        return EXIT_LOAD_FAILED
    return 0


def _memory_budget(text: str) -> MemoryBudget:
    try:
        return MemoryBudget.parse(text)
    except InvalidArgumentError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("memory_budget: ")) from None


def _replicas(text: str) -> tuple[int, int]:
    """`--replicas`: "N", or "MIN:MAX" to autoscale between them."""
    try:
        bounds = [int(part) for part in text.split(":")]
    except ValueError:
        bounds = []
    if len(bounds) not in (1, 2) or not 1 <= bounds[0] <= bounds[-1]:
        raise argparse.ArgumentTypeError(f"expected N or MIN:MAX with 1 <= MIN <= MAX, got {text!r}")
    return (bounds[0], bounds[-1])


def _positive(kind: type):
    def parse(text: str):
        value = kind(text)
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text!r}")
        return value

    return parse


def _export(args: argparse.Namespace) -> int:
    export = _import_export_extra("export")
    if args.tensorrt:
        from sdrt.export.tensorrt_build import builder_unavailable_reason

        reason = builder_unavailable_reason()  # now, not after minutes of exporting
        if reason is not None:
            raise BackendUnavailableError(f"--tensorrt: {reason}")
    else:
        given = [flag for flag, value in _engine_flags(args).items() if value]
        if given:
            raise _UsageError(f"{', '.join(given)}: engine options need --tensorrt")
    bundle = export.export_bundle(args.checkpoint, args.out_dir, force=args.force, fp16_components=args.fp16_onnx or (),
                                  loras=args.lora, config=args.config)
    print(bundle)
    if args.tensorrt:
        print(_build_engines_for(bundle, args))
    return 0


def _fp16_components(text: str) -> tuple[Component, ...]:
    """`--fp16-onnx=COMPONENTS`: comma-separated component names."""
    names = [name.strip() for name in text.split(",")]
    unknown = [name for name in names if name not in {c.value for c in Component}]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown component(s) {unknown}; choose from {','.join(c.value for c in Component)}")
    return tuple(Component(name) for name in names)


def _lora_spec(text: str) -> LoraSpec:
    """`--lora FILE[:SCALE]`."""
    from sdrt.export.lora_fusion import LoraSpec  # no torch: `sdrt --help` runs without the export extra

    try:
        return LoraSpec.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _axis_range(text: str) -> AxisRange:
    """`--batch/--height/--width`: "MIN:OPT:MAX", or "N" for one size."""
    try:
        return AxisRange.parse(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or MIN:OPT:MAX, got {text!r}") from None


def _build_engines(args: argparse.Namespace) -> int:
    if args.compare_layers is not None:
        return _compare_layers(args.bundle, Component(args.compare_layers), args)
    print(_build_engines_for(args.bundle, args))
    return 0


def _compare_layers(bundle: Path, component: Component, args: argparse.Namespace) -> int:
    """Polygraphy's layer-by-layer comparison of `component`'s TensorRT build against onnxruntime; 1 if a tensor diverges."""
    from sdrt.engine.manifest import read_manifest
    from sdrt.engine.tokenizer import CLIPTokenizer
    from sdrt.export.layer_compare import LayerTolerance, compare_layers, probe_feeds, tensorrt_runner
    from sdrt.export.tensorrt_build import builder_unavailable_reason

    reason = builder_unavailable_reason()
    if reason is not None:
        raise BackendUnavailableError(reason)
    manifest = read_manifest(bundle)
    if component not in manifest.components:
        raise InvalidArgumentError("--compare-layers", f"the bundle has no {component.value}; it has {', '.join(c.value for c in manifest.components)}")
    entry, profile = manifest.components[component], _engine_profile(bundle, args)
    precision = Precision(args.precision or Precision.FP16.value)
    token_ids = CLIPTokenizer.from_directory(bundle / manifest.tokenizer.directory)(["a photograph of an astronaut riding a horse"])[0]
    shapes = component_shapes(component, entry, manifest.model, profile, manifest.tokenizer.model_max_length)
    feeds = probe_feeds(entry, shapes, token_ids)
    divergence, compared = compare_layers(bundle / entry.file, feeds, tensorrt_runner(shapes, precision),
                                          LayerTolerance.for_precision(precision))
    print(f"{component.value}, TensorRT {precision.value} against onnxruntime fp32 on inputs "
          f"{ {name: feed.shape for name, feed in feeds.items()} }: "
          + (divergence.describe() if divergence else f"all {compared} tensors agree"))
    return 0 if divergence is None else 1


def _build_engines_for(bundle: Path, args: argparse.Namespace) -> Path:
    """Build the engines `args`' engine options (_add_engine_arguments) ask for; return their directory."""
    from sdrt.export.tensorrt_build import build_engines

    return build_engines(bundle, _engine_profile(bundle, args), Precision(args.precision or Precision.FP16.value),
                         refittable=args.refittable)


def _engine_profile(bundle: Path, args: argparse.Namespace) -> EngineProfile:
    """The profile `args`' engine options give, the bundle's default profile filling in what they leave out."""
    from sdrt.engine.manifest import read_manifest
    from sdrt.engine.tensorrt.profile import default_profile

    default = default_profile(read_manifest(bundle).model)
    axes = {name: getattr(args, name) or getattr(default, name) for name in PROFILE_AXES}
    return EngineProfile.static(*(axes[name].opt for name in PROFILE_AXES)) if args.static else EngineProfile(**axes)


def _add_engine_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """The options of a TensorRT build: `build-engines`, and `export --tensorrt`."""
    parser.add_argument("--batch", type=_axis_range, default=None, metavar="MIN:OPT:MAX")
    parser.add_argument("--height", type=_axis_range, default=None, metavar="MIN:OPT:MAX")
    parser.add_argument("--width", type=_axis_range, default=None, metavar="MIN:OPT:MAX")
    parser.add_argument("--static", action="store_true", help="build for the OPT sizes only: fastest, one size")
    # No default value here: `export` tells a precision given without --tensorrt from none.
    parser.add_argument("--precision", choices=[p.value for p in Precision], default=None,
                        help="fp16 (default; a VAE that overflows in fp16 is kept in fp32), bf16, or fp32 (TF32 off)")
    parser.add_argument("--refittable", action="store_true", help="engines whose weights can be replaced without a rebuild")


def _engine_flags(args: argparse.Namespace) -> dict[str, object]:
    """Each engine option's flag and its value (None or False when not given)."""
    return {f"--{name}": getattr(args, name) for name in (*PROFILE_AXES, "static", "precision", "refittable")}


def _make_checkpoint(args: argparse.Namespace) -> int:
    checkpoints = _import_export_extra("make-checkpoint").checkpoints
    if args.out_dir.exists():
        raise FileExistsError(f"{args.out_dir} already exists")
    print(checkpoints.make_random_checkpoint(args.out_dir, args.arch, seed=args.seed, with_safety_checker=not args.no_safety_checker))
    return 0


def _quantize(args: argparse.Namespace) -> int:
    missing = [name for name in ("openvino", "nncf") if importlib.util.find_spec(name) is None]  # now, not after calibrating
    if missing:
        raise SdrtError(f"sdrt quantize needs the quantize extra ({', '.join(missing)} missing): pip install 'sdrt[quantize]'")
    from sdrt.export.int8_unet import Calibration, quantize_unet

    calibration = Calibration(prompts=args.prompts, num_inference_steps=args.num_inference_steps, size=args.size, seed=args.seed)
    print(quantize_unet(args.bundle, calibration))
    return 0


def _bench(args: argparse.Namespace) -> int:
    from sdrt.benchmarks.bench import BenchPlan, run_bench
    from sdrt.benchmarks.report import markdown, write_chart
    from sdrt.benchmarks.worker import ENGINES

    unknown = [e for e in args.engines if e not in ENGINES]
    if unknown:
        raise _UsageError(f"--engines: unknown {unknown}; choose from {list(ENGINES)}")
    plan = BenchPlan(
        checkpoint=args.checkpoint, bundle=args.bundle, engines=tuple(args.engines), runs=args.runs, sizes=tuple(args.sizes),
        batches=tuple(args.batches), prompt=args.prompt, steps=args.num_inference_steps, guidance_scale=args.guidance_scale,
        seed=args.seed, optimum_python=args.optimum_python, optimum_model=args.optimum_model, out_dir=args.out,
    )
    results = run_bench(plan, ["sdrt", *args.argv])
    print(markdown(results))
    if args.results is not None:  # the markdown and its chart beside it, e.g. RESULTS.md + RESULTS-chart.png
        chart = args.results.with_name(f"{args.results.stem}-chart.png")
        with atomic_file(chart) as staging:
            write_chart(results, staging)
        with atomic_file(args.results) as staging:
            staging.write_text(f"{markdown(results)}\n\n![stage breakdown per engine]({chart.name})\n", encoding="utf-8")
    return 0


def _doctor(args: argparse.Namespace) -> int:
    if not args.gpu:
        given = [flag for flag, value in (("OUT_DIR", args.out_dir), ("--full/--no-full", args.full), ("--steps", args.steps),
                                          ("--runs", args.runs)) if value is not None]
        if given:
            raise _UsageError(f"{', '.join(given)}: validation options need --gpu")
        from sdrt.engine.diagnostics import describe, environment

        print("\n".join(describe(environment())))
        print("validate the GPU path end to end: sdrt doctor --gpu [OUT_DIR]")
        return 0
    from sdrt.benchmarks import gpu_validate

    return gpu_validate.validate_command(
        Path(gpu_validate.DEFAULT_OUT_DIR) if args.out_dir is None else args.out_dir,
        full=args.full,
        steps=gpu_validate.DEFAULT_STEPS if args.steps is None else args.steps,
        runs=gpu_validate.DEFAULT_RUNS if args.runs is None else args.runs,
        command=["sdrt", *args.argv],
    )


def _size(text: str) -> tuple[int, int]:
    """`--size`: "64" for 64x64, or "HEIGHTxWIDTH"."""
    try:
        sides = [int(side) for side in text.lower().split("x")]
    except ValueError:
        sides = []
    if len(sides) not in (1, 2):
        raise argparse.ArgumentTypeError(f"expected N or HEIGHTxWIDTH, got {text!r}")
    return (sides[0], sides[-1])


def _sweep(args: argparse.Namespace) -> int:
    import shlex

    from tqdm import tqdm

    from sdrt.demo import sweep
    from sdrt.engine import default_bundle_dir, load

    names = list(sweep.EXPERIMENTS) if args.experiment == "all" else [args.experiment]
    for option, value, parameter in (("--steps", args.steps, "num_inference_steps"), ("--size", args.size, "size")):
        if value is not None and all(sweep.EXPERIMENTS[name].parameter == parameter for name in names):
            raise _UsageError(f"{option}: the {names[0]} experiment sweeps {parameter} itself")
    bundle_dir = args.bundle if args.bundle is not None else default_bundle_dir()
    pipe = load(bundle_dir, backend=args.backend, safety_checker=SafetyPolicy.OFF.value)
    pipe.set_progress_bar_config(disable=True)
    runs = []
    for name in names:  # every experiment planned (and so checked) before any runs
        experiment = sweep.EXPERIMENTS[name]
        options = {"sample_prompts": args.prompts,
                   "steps": None if experiment.parameter == "num_inference_steps" else args.steps,
                   "size": None if experiment.parameter == "size" else args.size}
        runs.append((experiment, options, sum(call.num_images for call in sweep.plan(pipe, experiment, **options))))
    command_line = shlex.join(["sdrt", *args.argv])
    with tqdm(total=sum(count for *_, count in runs), unit="image", desc="sweep", disable=args.quiet) as bar:
        for experiment, options, _ in runs:
            result = sweep.run(pipe, experiment, seed=args.seed, progress=bar.update, **options)
            for line in [*sweep.write(result, args.out, command_line), result.summary()]:
                bar.write(str(line), file=sys.stdout)  # above the bar, which stays on stderr
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _ArgumentParser(prog="sdrt", description="Stable Diffusion inference engine")
    parser.add_argument("--version", action="version", version=f"sdrt {SDRT_VERSION}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_ArgumentParser)

    generate = commands.add_parser("generate", help="text to image", description=(
        "Generate images from a prompt. BUNDLE defaults to the embedded default model."))
    _add_generation_arguments(generate, "generate")
    descriptions = {
        "img2img": ("image to image", "Generate images from an image and a prompt, as diffusers' StableDiffusionImg2ImgPipeline: "
                    "the image is noised to --strength and denoised for the prompt."),
        "inpaint": ("repaint the masked part of an image", "Repaint the white part of --mask-image in --image for the "
                    "prompt, as diffusers' StableDiffusionInpaintPipeline (an inpainting checkpoint's 9-channel U-Net, "
                    "or a standard one that keeps the unmasked region's latents)."),
        "outpaint": ("extend an image beyond its borders", "Grow --image by --left/--right/--top/--bottom pixels (the "
                     "canvas rounded up to a multiple of the VAE scale factor, extra pixels right and bottom), fill the new "
                     "margins for the prompt with a feathered seam, and paste the original pixels back unchanged."),
    }
    for command, (summary, description) in descriptions.items():
        _add_generation_arguments(commands.add_parser(command, help=summary, description=description + " BUNDLE "
                                                      "defaults to the embedded default model."), command)

    serve = commands.add_parser("serve", help="HTTP text-to-image server (serve extra; --ray: ray extra)", description=(
        "Serve BUNDLE over HTTP: POST /v1/images/generations (OpenAI's images API shape), GET /healthz, /readyz, "
        "/metrics. One pipeline per process; compatible requests (same size, steps, scheduler, guidance) share a "
        "U-Net batch. SIGTERM finishes accepted requests, then exits. A bundle that cannot load exits: status 2 "
        "when it is missing or malformed (found before the port is bound), 1 when loading it failed later."))
    serve.add_argument("bundle", type=Path)
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--api-key", default=None, help="require `Authorization: Bearer KEY` on every endpoint but "
                       "/healthz and /readyz (default: $SDRT_API_KEY; none: no auth)")
    serve.add_argument("--backend", default="auto")
    serve.add_argument("--safety-checker", choices=[p.value for p in SafetyPolicy], default=SafetyPolicy.BLOCK.value,
                       help="block: flagged images are withheld (b64_json null); flag: returned and flagged; off")
    serve.add_argument("--max-batch-images", type=_positive(int), default=8, help="images per U-Net batch (1: no batching)")
    serve.add_argument("--max-wait-ms", type=float, default=50.0,
                       help="how long the oldest request waits for batch partners")
    serve.add_argument("--max-queue", type=_positive(int), default=64, help="waiting requests beyond which new ones get 429")
    serve.add_argument("--max-n", type=_positive(int), default=4, help="images per request")
    serve.add_argument("--max-steps", type=_positive(int), default=150, help="num_inference_steps per request")
    serve.add_argument("--max-body-bytes", type=_positive(int), default=64 * 1024)
    serve.add_argument("--request-timeout", type=_positive(float), default=300.0,
                       help="seconds from arrival to answer; then 504, and its work stops between denoising steps")
    serve.add_argument("--graceful-shutdown", type=_positive(float), default=None,
                       help="seconds open requests get to finish after SIGTERM (default: as long as they need)")
    serve.add_argument("--no-warm-up", action="store_true", help="ready as soon as loaded, without a first image")
    serve.add_argument("--wait-for-bundle", action="store_true",
                       help="while BUNDLE is missing or incomplete, answer 503 and keep trying to load it instead of "
                       "exiting (for a bundle mounted after the server starts); not with --ray")
    serve.add_argument("--memory-budget", type=_memory_budget, default=MemoryBudget(), metavar="SIZE|FRACTION",
                       help="what the process may grow to: bytes (12G, 800M) or a fraction of available memory (0.5); "
                       f"a request estimated over it even alone gets 413 (default {DEFAULT_BUDGET_FRACTION}; not with --ray)")
    ray = serve.add_argument_group("Ray Serve (ray extra)")
    ray.add_argument("--ray", action="store_true", help="run as a Ray Serve deployment: replicas, autoscaling, multi-node")
    ray.add_argument("--ray-address", default=None, help="join this Ray cluster (\"auto\": the one `ray start` began "
                     "here); default: a local Ray instance for this command")
    ray.add_argument("--replicas", type=_replicas, default=None, metavar="N|MIN:MAX",
                     help="pipeline replicas, or bounds to autoscale between on queued requests (default 1)")
    ray.add_argument("--replica-cpus", type=_positive(float), default=1.0, help="CPUs Ray reserves per replica")
    ray.add_argument("--ray-temp-dir", type=Path, default=None, metavar="DIR",
                     help="session files and sockets of the Ray instance this command starts (default Ray's /tmp/ray; "
                     "keep it short: socket paths must stay under 108 characters)")
    serve.set_defaults(handler=_serve)

    export = commands.add_parser("export", help="diffusers checkpoint -> sdrt bundle (export extra)", description=(
        "Export CHECKPOINT to an sdrt bundle in OUT_DIR. CHECKPOINT is a diffusers checkpoint directory, or a "
        "single-file Stable Diffusion 1.x checkpoint (.safetensors, or .ckpt: read with torch's weights-only loader "
        "only, never unpickled otherwise) in the original LDM layout, as model sites share them; it is read offline "
        "with the configs sdrt ships for its architecture, or with --config DIR."))
    export.add_argument("checkpoint", type=Path, metavar="CHECKPOINT")
    export.add_argument("out_dir", type=Path, metavar="OUT_DIR")
    export.add_argument("--force", action="store_true", help="replace OUT_DIR if it exists")
    export.add_argument("--lora", type=_lora_spec, action="append", default=[], metavar="FILE[:SCALE]",
                        help="fuse this LoRA .safetensors (diffusers/PEFT or kohya keys) into the U-Net and text "
                        "encoder, its deltas times SCALE (default 1.0); repeat for several, which add up. Checked "
                        "before exporting; recorded in the manifest")
    export.add_argument("--config", type=Path, default=None, metavar="DIR",
                        help="single-file CHECKPOINT only: the diffusers configs to read it with (a diffusers "
                        "checkpoint or config directory: unet/, vae/, text_encoder/; scheduler/ and tokenizer/ "
                        "optional), for SD 1.x layouts of other sizes; default: those of the detected architecture")
    export.add_argument("--fp16-onnx", nargs="?", type=_fp16_components, const=FP16_DEFAULT_COMPONENTS, default=None,
                        metavar="COMPONENTS", help="also write fp16 variants (fp32 inputs and outputs) for --backend "
                        f"cuda-fp16: of {' and '.join(c.value for c in FP16_DEFAULT_COMPONENTS)}, or of the "
                        "comma-separated COMPONENTS (--fp16-onnx=unet,vae_decoder); SD 1.x's VAE overflows in fp16")
    export.add_argument("--tensorrt", action="store_true",
                        help="then build TensorRT engines for it on this GPU (gpu extra), as build-engines does with "
                        "the options below; checked before exporting")
    _add_engine_arguments(export.add_argument_group("TensorRT engines, with --tensorrt (see sdrt build-engines --help)"))
    export.set_defaults(handler=_export)

    engines = commands.add_parser("build-engines", help="TensorRT engines for a bundle, on this GPU (gpu extra)",
                                  description="Build TensorRT engines for every component of BUNDLE on this machine's GPU "
                                  "and store them in the bundle (.cache/tensorrt), for --backend tensorrt. Engines run "
                                  "requests within the profile: images per request (prompts x images per prompt), height "
                                  "and width, each MIN:OPT:MAX (N for one size); TensorRT tunes for OPT. Defaults: batch "
                                  "1:1:4, sides from half to twice the model's default image size (SD 1.5: 256:512:1024). "
                                  "Engines already built for the same model files, GPU, TensorRT, profile and precision "
                                  "are reused.")
    engines.add_argument("bundle", type=Path)
    _add_engine_arguments(engines)
    engines.add_argument("--compare-layers", choices=[c.value for c in Component], default=None, metavar="COMPONENT",
                         help="build nothing: when engines misbehave (NaN, images off), compare every tensor of "
                         "COMPONENT's graph built in TensorRT (this --precision, the profile's OPT shapes) against "
                         "onnxruntime fp32 with Polygraphy, and name the first that diverges (exit 1 if one does)")
    engines.set_defaults(handler=_build_engines)

    make = commands.add_parser("make-checkpoint", help="random-weight SD checkpoint of a given architecture (export extra)",
                               description="Write a random-weight diffusers checkpoint: compute does not depend on weight "
                               "values, so it measures like the real model. sd15 is Stable Diffusion 1.5's exact architecture.")
    make.add_argument("out_dir", type=Path)
    make.add_argument("--arch", choices=ARCH_NAMES, default="sd15")
    make.add_argument("--seed", type=int, default=0)
    make.add_argument("--no-safety-checker", action="store_true")
    make.set_defaults(handler=_make_checkpoint)

    quantize = commands.add_parser("quantize", help="int8 U-Net for --backend openvino-int8 (quantize extra)",
                                   description="Quantize BUNDLE's U-Net to int8 with NNCF, calibrated on the U-Net inputs "
                                   "of the bundle's own fp32 denoising runs, and store it in the bundle (int8/) for "
                                   "--backend openvino-int8, which --backend auto then prefers on CPUs with bf16: faster than bf16 "
                                   "(AVX-512 VNNI or AMX), at a larger loss of accuracy (PSNR in sdrt bench). Replaces an "
                                   "earlier int8 U-Net.")
    quantize.add_argument("bundle", type=Path)
    quantize.add_argument("--prompts", type=_positive(int), default=4, help="calibration runs, one prompt each (max 8)")
    quantize.add_argument("-s", "--num-inference-steps", type=_positive(int), default=10, help="steps per calibration run")
    quantize.add_argument("--size", type=_positive(int), default=None,
                          help="calibration image side in pixels (default: the model's); smaller calibrates faster")
    quantize.add_argument("--seed", type=int, default=0)
    quantize.set_defaults(handler=_quantize)

    bench = commands.add_parser("bench", help="sdrt against diffusers (and optimum-onnxruntime) side by side",
                                description="Each engine runs in a fresh process, interleaved; reports medians and p95, "
                                "a per-stage breakdown, load, cold start, peak RSS, PSNR against fp32, and ratios.")
    bench.add_argument("bundle", type=Path)
    bench.add_argument("--checkpoint", type=Path, default=None, help="the diffusers checkpoint the bundle came from")
    bench.add_argument("--engines", nargs="+", default=["sdrt", "sdrt-bf16", "sdrt-exact", "sdrt-low-memory", "diffusers-fp32", "diffusers-bf16", "optimum-ort"])
    bench.add_argument("--runs", type=int, default=3)
    bench.add_argument("--sizes", type=int, nargs="+", default=[512])
    bench.add_argument("--batches", type=int, nargs="+", default=[1])
    bench.add_argument("--prompt", default="a photograph of an astronaut riding a horse")
    bench.add_argument("-s", "--num-inference-steps", type=int, default=20)
    bench.add_argument("-g", "--guidance-scale", type=float, default=7.5)
    bench.add_argument("--seed", type=int, default=0)
    bench.add_argument("--optimum-python", type=Path, default=None, help="python of a venv with optimum-onnx")
    bench.add_argument("--optimum-model", type=Path, default=None, help="the checkpoint exported with optimum")
    bench.add_argument("--out", type=Path, default=Path("bench-out"), help="results.json, results.md, chart.png")
    bench.add_argument("--results", type=Path, default=None, help="also write the markdown here (benchmarks/RESULTS.md)")
    bench.set_defaults(handler=_bench)

    doctor = commands.add_parser("doctor", help="what this machine can run: packages, CUDA device, backends; --gpu validates the GPU path",
                                 description="Print the installed packages, the CUDA device and every backend's "
                                 "availability (with the reason when unavailable). With --gpu, validate the NVIDIA path end "
                                 "to end instead (same as python -m sdrt.benchmarks.gpu_validate OUT_DIR): random "
                                 "checkpoints, export, TensorRT engines, parity against the CPU fp32 backend, timings; "
                                 "report.json and report.md in OUT_DIR; exit status 1 if a check failed, 2 without a GPU.")
    doctor.add_argument("--gpu", action="store_true", help="validate the GPU path end to end")
    # The validation's options default to None and get their defaults in _doctor, so that an option given without
    # --gpu is refused rather than ignored.
    from sdrt.benchmarks.gpu_validate import DEFAULT_OUT_DIR, DEFAULT_RUNS, DEFAULT_STEPS

    doctor.add_argument("out_dir", nargs="?", type=Path, default=None, metavar="OUT_DIR",
                        help=f"with --gpu: where the report, checkpoints, bundles and engines go (default {DEFAULT_OUT_DIR})")
    doctor.add_argument("--full", action=argparse.BooleanOptionalAction, default=None,
                        help="with --gpu: also validate Stable Diffusion 1.5's full-size architecture (default: on GPUs "
                        "with 16 GB or more)")
    doctor.add_argument("--steps", type=int, default=None, help=f"with --gpu: denoising steps per image (default {DEFAULT_STEPS})")
    doctor.add_argument("--runs", type=int, default=None,
                        help=f"with --gpu: timed runs per engine, each in a fresh process (default {DEFAULT_RUNS})")
    doctor.set_defaults(handler=_doctor)

    sweep = commands.add_parser("sweep", help="the chapter's experiments on the demo model: contact sheets, curves, JSON",
                                description="Sweep one pipeline argument (guidance, steps, negative prompt, size, images per "
                                "prompt, the empty prompt) over the chapter's values from one seed, score every image with "
                                "the demo scorer, and write <experiment>.png (contact sheet), <experiment>-curve.png (the "
                                "metric) and <experiment>.json (every number and this command line). BUNDLE defaults to the "
                                "embedded default model. The safety checker is off: the demo model draws geometric shapes.")
    sweep.add_argument("bundle", nargs="?", type=Path, default=None, metavar="BUNDLE")
    # The names of sdrt.demo.sweep.EXPERIMENTS, spelled out so `sdrt --help` loads no demo code.
    sweep.add_argument("--experiment", required=True, choices=[
        "guidance", "steps", "negative-prompt", "sizes", "images-per-prompt", "empty-prompt", "all"])
    sweep.add_argument("--out", type=Path, default=Path("docs/experiments"), help="output directory")
    sweep.add_argument("--seed", type=int, default=0)
    sweep.add_argument("--prompts", type=int, default=None,
                       help="sampled prompts per column (per part for negative-prompt); default 24 (12)")
    sweep.add_argument("--steps", type=int, default=None, help="override the fixed 50 steps, for quick runs (not for steps)")
    sweep.add_argument("--size", type=_size, default=None, metavar="N|HxW",
                       help="override the fixed image size (the model's default), for quick runs (not for sizes)")
    sweep.add_argument("--backend", default="auto")
    sweep.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    sweep.set_defaults(handler=_sweep)
    return parser


def _terminate(signum: int, frame: object) -> NoReturn:
    # SystemExit unwinds like any exception, so atomic writers remove their temporary files.
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, _terminate)
    parser = build_parser()
    try:
        argv = list(sys.argv[1:] if argv is None else argv)
        args = parser.parse_args(argv)
        args.argv = argv  # recorded by `bench` so results say how to reproduce them
        logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
        return args.handler(args)
    except _UsageError as exc:
        print(f"sdrt: error: {exc}", file=sys.stderr)
    except (SdrtError, ValueError, FileExistsError, FileNotFoundError) as exc:
        print(f"sdrt: error: {exc}", file=sys.stderr)
    except KeyboardInterrupt:
        print("sdrt: interrupted", file=sys.stderr)
        return 130
    return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
