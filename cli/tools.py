"""The tools beside generation: `bench` (sdrt against its peers), `doctor` (what this machine runs; --gpu validates
the NVIDIA path) and `sweep` (the chapter's experiments on the demo model)."""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from tqdm import tqdm

from sdrt.benchmarks import gpu_validate
from sdrt.benchmarks.bench import REFERENCE_ENGINES, BenchPlan, PeerInstall, run_bench
from sdrt.benchmarks.report import (
    README_PEERS_BEGIN,
    README_PEERS_END,
    has_peers_block,
    markdown,
    write_readme_peers,
    write_results_file,
)
from sdrt.benchmarks.worker import ENGINES
from sdrt.cli.common import UsageError, add_backend_argument
from sdrt.demo import sweep
from sdrt.demo.default_model import default_bundle_dir
from sdrt.engine import load
from sdrt.engine.diagnostics import describe, environment
from sdrt.engine.safety_checker import SafetyPolicy


SWEEP_OUT = "sweep-out"


def _bench(args: argparse.Namespace) -> int:
    unknown = [e for e in args.engines if e not in ENGINES]
    if unknown:
        raise UsageError(f"--engines: unknown {unknown}; choose from {list(ENGINES)}")
    plan = BenchPlan(
        checkpoint=args.checkpoint, bundle=args.bundle, engines=tuple(args.engines), runs=args.runs, sizes=tuple(args.sizes),
        batches=tuple(args.batches), prompt=args.prompt, steps=args.num_inference_steps, guidance_scale=args.guidance_scale,
        seed=args.seed, out_dir=args.out, floor=args.floor, reference=args.reference or REFERENCE_ENGINES[0],
        peers={"optimum-ort": PeerInstall(args.optimum_python, args.optimum_model),
               "optimum-intel": PeerInstall(args.optimum_intel_python, args.openvino_model),
               "openvino-genai": PeerInstall(args.genai_python, args.openvino_model)},
    )
    if args.reference is not None and args.reference not in args.engines:
        raise UsageError(f"--reference {args.reference}: not among --engines, so PSNR would have nothing to compare with")
    if args.readme is not None and args.results is None:
        raise UsageError("--readme: the peer table links to the results file, so it needs --results")
    if args.readme is not None and not has_peers_block(args.readme):  # checked before an hour of benchmarking
        raise UsageError(f"--readme: {args.readme} has no {README_PEERS_BEGIN} ... {README_PEERS_END} block to rewrite")
    results = run_bench(plan, ["sdrt", *args.argv])
    print(markdown(results))
    if args.results is not None:  # e.g. RESULTS.md, with RESULTS-chart.png and RESULTS.json beside it
        write_results_file(results, args.results)
    if args.readme is not None:
        write_readme_peers(results, args.readme, args.results)
    return 0


def _doctor(args: argparse.Namespace) -> int:
    if not args.gpu:
        given = [flag for flag, value in (("OUT_DIR", args.out_dir), ("--full/--no-full", args.full), ("--steps", args.steps),
                                          ("--runs", args.runs)) if value is not None]
        if given:
            raise UsageError(f"{', '.join(given)}: validation options need --gpu")
        print("\n".join(describe(environment())))
        print("validate the GPU path end to end: sdrt doctor --gpu [OUT_DIR]")
        return 0
    return gpu_validate.validate_command(args.out_dir, args.full, args.steps, args.runs, command=["sdrt", *args.argv])


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
    names = list(sweep.EXPERIMENTS) if args.experiment == "all" else [args.experiment]
    for option, value, parameter in (("--steps", args.steps, "num_inference_steps"), ("--size", args.size, "size")):
        if value is not None and all(sweep.EXPERIMENTS[name].parameter == parameter for name in names):
            raise UsageError(f"{option}: the {names[0]} experiment sweeps {parameter} itself")
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


def add_commands(commands: argparse._SubParsersAction) -> None:
    """bench, doctor and sweep."""
    bench = commands.add_parser("bench", help="sdrt against diffusers, optimum-onnxruntime, optimum-intel and OpenVINO GenAI side by side",
                                description="Each engine runs in a fresh process, interleaved; reports medians and p95, "
                                "a per-stage breakdown, load, cold start, peak RSS, PSNR against fp32, the U-Net against "
                                "this machine's matrix-product peak, and ratios.")
    bench.add_argument("bundle", type=Path)
    bench.add_argument("--checkpoint", type=Path, default=None, help="the diffusers checkpoint the bundle came from")
    bench.add_argument("--engines", nargs="+", default=["sdrt", "sdrt-bf16", "sdrt-exact", "sdrt-low-memory", "sdrt-deepcache", "diffusers-fp32", "diffusers-bf16", "optimum-ort", "optimum-intel", "openvino-genai"])
    bench.add_argument("--runs", type=int, default=3)
    bench.add_argument("--sizes", type=int, nargs="+", default=[512])
    bench.add_argument("--batches", type=int, nargs="+", default=[1])
    bench.add_argument("--prompt", default="a photograph of an astronaut riding a horse")
    bench.add_argument("-s", "--num-inference-steps", type=int, default=20)
    bench.add_argument("-g", "--guidance-scale", type=float, default=7.5)
    bench.add_argument("--seed", type=int, default=0)
    bench.add_argument("--optimum-python", type=Path, default=None, help="python of a venv with optimum-onnx")
    bench.add_argument("--optimum-model", type=Path, default=None, help="the checkpoint exported with optimum")
    bench.add_argument("--optimum-intel-python", type=Path, default=None, help="python of a venv with optimum-intel[openvino]")
    bench.add_argument("--genai-python", type=Path, default=None, help="python of a venv with openvino-genai")
    bench.add_argument("--openvino-model", type=Path, default=None,
                       help="the checkpoint exported by `optimum-cli export openvino` (optimum-intel and GenAI run it)")
    bench.add_argument("--reference", choices=REFERENCE_ENGINES, default=None,
                       help=f"the fp32 engine PSNR is measured against, which must then be among --engines (default "
                       f"{REFERENCE_ENGINES[0]}, where it runs); diffusers-fp32 where sdrt-exact does not fit the memory budget")
    bench.add_argument("--no-floor", dest="floor", action="store_false",
                       help="skip measuring the matrix-product peaks and the U-Net's GFLOP/s against them")
    bench.add_argument("--out", type=Path, default=Path("bench-out"), help="results.json, results.md, chart.png")
    bench.add_argument("--results", type=Path, default=None,
                       help="also write the markdown here (benchmarks/RESULTS.md), with its chart and JSON beside it")
    bench.add_argument("--readme", type=Path, default=None,
                       help="also rewrite the peer table between <!-- peers:begin --> and <!-- peers:end --> in this "
                       "file (README.md) from this run; needs --results")
    bench.set_defaults(handler=_bench)

    doctor = commands.add_parser("doctor", help="what this machine can run: packages, CUDA device, backends; --gpu validates the GPU path",
                                 description="Print the installed packages, the CUDA device and every backend's "
                                 "availability (with the reason when unavailable). With --gpu, validate the NVIDIA path end "
                                 "to end instead (same as python -m sdrt.benchmarks.gpu_validate OUT_DIR): random "
                                 "checkpoints, export, TensorRT engines, parity against the CPU fp32 backend, timings; "
                                 "report.json and report.md in OUT_DIR; exit status 1 if a check failed, 2 without a GPU.")
    doctor.add_argument("--gpu", action="store_true", help="validate the GPU path end to end")
    gpu_validate.add_arguments(doctor, help_prefix="with --gpu: ")
    doctor.set_defaults(handler=_doctor)

    sweeps = commands.add_parser("sweep", help="the chapter's experiments on the demo model: contact sheets, curves, JSON",
                                description="Sweep one pipeline argument (guidance, steps, negative prompt, size, images per "
                                "prompt, the empty prompt) over the chapter's values from one seed, score every image with "
                                "the demo scorer, and write <experiment>.png (contact sheet), <experiment>-curve.png (the "
                                "metric) and <experiment>.json (every number and this command line). BUNDLE defaults to the "
                                "embedded default model. The safety checker is off: the demo model draws geometric shapes.")
    sweeps.add_argument("bundle", nargs="?", type=Path, default=None, metavar="BUNDLE")
    sweeps.add_argument("--experiment", required=True, choices=[*sweep.EXPERIMENTS, "all"])
    # Not docs/experiments: the committed figures change only when asked for (--out docs/experiments).
    sweeps.add_argument("--out", type=Path, default=Path(SWEEP_OUT), help="output directory (default: %(default)s; "
                        "the committed figures: --out docs/experiments)")
    sweeps.add_argument("--seed", type=int, default=0)
    sweeps.add_argument("--prompts", type=int, default=None,
                       help="sampled prompts per column (per part for negative-prompt); default 24 (12)")
    sweeps.add_argument("--steps", type=int, default=None, help="override the fixed 50 steps, for quick runs (not for steps)")
    sweeps.add_argument("--size", type=_size, default=None, metavar="N|HxW",
                       help="override the fixed image size (the model's default), for quick runs (not for sizes)")
    add_backend_argument(sweeps)
    sweeps.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    sweeps.set_defaults(handler=_sweep)
