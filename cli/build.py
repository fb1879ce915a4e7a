"""The build commands: `export` and `make-checkpoint` (export extra), `build-engines` and `export --tensorrt` (gpu
extra), `quantize` (quantize extra). Each extra is imported when its command runs, so `sdrt --help` and the runtime
commands work without them."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from sdrt.cli.common import UsageError, positive
from sdrt.engine.backends.tensorrt.engines.profile import (
    PROFILE_AXES, AxisRange, EngineProfile, Precision, component_shapes, default_profile,
)
from sdrt.engine.cuda_device import cuda_device
from sdrt.engine.errors import BackendUnavailableError, InvalidArgumentError, SdrtError
from sdrt.engine.manifest import read_manifest
from sdrt.engine.schedulers import SCHEDULER_NAMES
from sdrt.engine.specs import FP16_DEFAULT_COMPONENTS, Component
from sdrt.engine.tokenizer import CLIPTokenizer

if TYPE_CHECKING:
    from sdrt.export.lora_fusion import LoraSpec

# The architectures of sdrt.export.random_checkpoint.ARCHES, named here so `sdrt --help` works without the export extra.
ARCH_NAMES = ("sd15", "tiny", "tiny-alt", "demo", "sdxl", "tiny-sdxl", "sdxl-refiner", "tiny-sdxl-refiner", "tiny-inpaint",
              "tiny-lcm", "tiny-turbo", "sd15-small", "sd15-turbo", "sdxl-turbo", "tiny-sdxl-turbo")


def _import_export_extra(command: str):
    try:
        import sdrt.export.bundle
        import sdrt.export.random_checkpoint
        import sdrt.export
    except ImportError as exc:
        raise SdrtError(
            f"sdrt {command} needs the export extra ({exc.name} is missing): pip install torch==2.13.0 "
            "--index-url https://download.pytorch.org/whl/cpu && pip install 'sdrt[export]'"
        ) from exc
    return sdrt.export


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
            raise UsageError(f"{', '.join(given)}: engine options need --tensorrt")
    # The int8 models are the CPU's fastest mode: made by default, unless the bundle is built for TensorRT.
    bundle = export.export_bundle(args.checkpoint, args.out_dir, force=args.force, fp16_components=args.fp16_onnx or (),
                                  loras=args.lora, config=args.config, scheduler=args.scheduler, tiny_vae=args.tiny_vae,
                                  deepcache_branch=args.deepcache_branch, quantize=not (args.no_quantize or args.tensorrt))
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
    device = cuda_device()  # the default batch is capped to what this card's memory holds
    default = default_profile(read_manifest(bundle).model, None if device is None else device.memory_bytes)
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
    random_checkpoint = _import_export_extra("make-checkpoint").random_checkpoint
    if args.out_dir.exists():
        raise FileExistsError(f"{args.out_dir} already exists")
    print(random_checkpoint.make_random_checkpoint(args.out_dir, args.arch, seed=args.seed, with_safety_checker=not args.no_safety_checker))
    return 0


def _quantize(args: argparse.Namespace) -> int:
    from sdrt.export.quantize import Calibration, quantize_models, quantize_unavailable_reason

    reason = quantize_unavailable_reason()  # now, not after calibrating
    if reason is not None:
        raise SdrtError(f"sdrt quantize: {reason}")

    calibration = Calibration(prompts=args.prompts, num_inference_steps=args.num_inference_steps, size=args.size, seed=args.seed)
    for path in quantize_models(args.bundle, calibration).values():
        print(path)
    return 0


def add_commands(commands: argparse._SubParsersAction) -> None:
    """export, build-engines, make-checkpoint and quantize."""
    export = commands.add_parser("export", help="diffusers checkpoint -> sdrt bundle (export extra)", description=(
        "Export CHECKPOINT to an sdrt bundle in OUT_DIR. CHECKPOINT is a diffusers checkpoint directory, or a "
        "single-file Stable Diffusion 1.x or SDXL base checkpoint (.safetensors, or .ckpt: read with torch's "
        "weights-only loader only, never unpickled otherwise) in the original LDM/SGM layout, as model sites share "
        "them; it is read offline with the configs sdrt ships for its architecture, or with --config DIR."))
    export.add_argument("checkpoint", type=Path, metavar="CHECKPOINT")
    export.add_argument("out_dir", type=Path, metavar="OUT_DIR")
    export.add_argument("--force", action="store_true", help="replace OUT_DIR if it exists")
    export.add_argument("--lora", type=_lora_spec, action="append", default=[], metavar="FILE[:SCALE]",
                        help="fuse this LoRA .safetensors (diffusers/PEFT or kohya keys) into the U-Net and text "
                        "encoders (SDXL: both), its deltas times SCALE (default 1.0); repeat for several, which add up. Checked "
                        "before exporting; recorded in the manifest")
    export.add_argument("--scheduler", choices=SCHEDULER_NAMES, default=None,
                        help="the sampler the bundle runs by default instead of the checkpoint's own, e.g. lcm with an "
                        "LCM-LoRA in --lora: recorded in the manifest with its steps and guidance (lcm: 4 steps, "
                        "guidance 1)")
    export.add_argument("--tiny-vae", type=Path, default=None, metavar="DIR",
                        help="also export this diffusers AutoencoderTiny (TAESD: madebyollin/taesd for SD 1.x/2.x) as a "
                        "second, fast decoder, chosen per request with --decoder tiny")
    export.add_argument("--config", type=Path, default=None, metavar="DIR",
                        help="single-file CHECKPOINT only: the diffusers configs to read it with (a diffusers "
                        "checkpoint or config directory: unet/, vae/, text_encoder/, and text_encoder_2/ for SDXL; "
                        "scheduler/ and tokenizer/ (SDXL: tokenizer_2/) optional), for SD 1.x and SDXL layouts of "
                        "other sizes or schedulers (SDXL-Turbo); default: those of the detected architecture (SD 1.5, "
                        "SDXL base)")
    export.add_argument("--fp16-onnx", nargs="?", type=_fp16_components, const=FP16_DEFAULT_COMPONENTS, default=None,
                        metavar="COMPONENTS", help="also write fp16 variants (fp32 inputs and outputs) for --backend "
                        f"cuda-fp16: of {' and '.join(c.value for c in FP16_DEFAULT_COMPONENTS)}, or of the "
                        "comma-separated COMPONENTS (--fp16-onnx=unet,vae_decoder); SD 1.x's VAE overflows in fp16")
    export.add_argument("--deepcache-branch", type=int, default=None, metavar="N",
                        help="add DeepCache's U-Net passes for cache branch N (0: shallowest, fastest; SD 1.x has "
                        "0..11), for `sdrt generate --deepcache INTERVAL`. Costs two more U-Net traces at export "
                        "(minutes for SD 1.5, and its 3.4 GB trace on disk meanwhile), a full-pass graph of a few MB "
                        "that reads the U-Net's weights (a U-Net small enough to hold them in its graph gets "
                        "model.onnx.data instead), and the shallow blocks' weights (branch 0: a few percent of the "
                        "U-Net's); a process running requests with and without DeepCache holds the U-Net's weights twice")
    export.add_argument("--no-quantize", action="store_true",
                        help="skip the int8 U-Net and VAE decoder (made by default where the quantize extra is installed and it fits "
                        "the memory budget: the fastest CPU mode, --backend openvino-int8, which auto then runs); the "
                        "bundle then runs in bf16. `sdrt quantize` makes them later")
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
                               "values, so it measures like the real model. sd15 is Stable Diffusion 1.5's exact "
                               "architecture, sdxl SDXL base 1.0's, sdxl-refiner SDXL refiner 1.0's.")
    make.add_argument("out_dir", type=Path)
    make.add_argument("--arch", choices=ARCH_NAMES, default="sd15")
    make.add_argument("--seed", type=int, default=0)
    make.add_argument("--no-safety-checker", action="store_true")
    make.set_defaults(handler=_make_checkpoint)

    quantize = commands.add_parser("quantize", help="int8 U-Net and VAE decoder for --backend openvino-int8 (quantize extra)",
                                   description="Quantize BUNDLE's U-Net and VAE decoder to int8 with NNCF, each calibrated on "
                                   "its inputs in the bundle's own fp32 runs, and store them in the bundle (int8/) for "
                                   "--backend openvino-int8, which --backend auto then prefers on CPUs with bf16: faster than bf16 "
                                   "(AVX-512 VNNI or AMX), at a larger loss of accuracy (PSNR in sdrt bench). Replaces "
                                   "earlier int8 models; prints their paths.")
    quantize.add_argument("bundle", type=Path)
    quantize.add_argument("--prompts", type=positive(int), default=4, help="calibration runs, one prompt each (max 8)")
    quantize.add_argument("-s", "--num-inference-steps", type=positive(int), default=10, help="steps per calibration run")
    quantize.add_argument("--size", type=positive(int), default=None,
                          help="calibration image side in pixels (default: the model's); smaller calibrates faster")
    quantize.add_argument("--seed", type=int, default=0)
    quantize.set_defaults(handler=_quantize)
