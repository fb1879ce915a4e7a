"""`python -m sdrt.benchmarks.gpu_validate OUT_DIR [--full] [--steps 20] [--runs 3]` (the same as
`sdrt doctor --gpu OUT_DIR ...`): the NVIDIA path validated end to end on this machine's GPU, in one command.

`--quick` is sized for a short GPU lease (minutes, from a bare machine with CuPy): the device loop's step for every
scheduler with CuPy kernels and captured CUDA graphs against the numpy host loop (sdrt.benchmarks.device_step_check),
then, where TensorRT, cuda-python and the export's packages are installed, the tiny model's fp32 engines built and
its image compared with the CPU reference's; what cannot run here is skipped, saying what is missing.

For a tiny random-weight checkpoint, and with --full (the default on GPUs with 16 GB or more) for one with Stable
Diffusion 1.5's exact architecture: make the checkpoint (sdrt.export.random_checkpoint), export its bundle with fp16 ONNX
variants, build TensorRT engines in fp32 and fp16, generate from the same initial latents with the CPU fp32 reference
(onnxruntime-cpu) and with tensorrt fp32, tensorrt fp16, cuda and cuda-fp16, and compare their images with the
reference's (max abs pixel difference and PSNR, against each engine's Tolerance); then time end-to-end generation,
each run in a fresh process (sdrt.benchmarks.worker), interleaved: TensorRT with and without CUDA graphs, both cuda
backends, and diffusers fp16 on the same GPU where torch has CUDA (skipped, saying why, otherwise).

Each step is logged as it starts and ends. A failing step records its error and the others go on; the steps that
need its result are skipped, naming it. OUT_DIR gets report.json and report.md, rewritten atomically after every
step (an interrupted run leaves the report so far), and models/: checkpoints, bundles and engines, which a rerun
reuses. Exit status: 0 every check passed, 1 a step failed, 2 no CUDA device (one line says what is missing).

The orchestration (steps, checks, report, exit status) is plain Python, tested on the CPU with fake actions
(tests/test_gpu_validate.py); the export and the GPU are reached only through `Actions` (LocalActions here).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import enum
import functools
import importlib.util
import json
import logging
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from sdrt.benchmarks import device_step_check
from sdrt.benchmarks.worker import DIFFUSERS_ENGINES, SDRT_ENGINES, RunConfig, diffusers_unavailable_reason
from sdrt.engine.array_namespace import cupy_namespace
from sdrt.engine.atomic import atomic_file
from sdrt.engine.backends.tensorrt.device_loop import CupyDevice
from sdrt.engine.backends.tensorrt.library import libraries_unavailable_reason
from sdrt.engine.backends.tensorrt.engines.profile import EngineProfile, Precision
from sdrt.engine.checks import is_int
from sdrt.engine.cuda_device import CudaDevice, cuda_device, cuda_device_unavailable_reason
from sdrt.engine.diagnostics import environment
from sdrt.engine.errors import BackendUnavailableError, InvalidArgumentError
from sdrt.engine.manifest import MANIFEST_NAME, read_manifest
from sdrt.engine.specs import FP16_DEFAULT_COMPONENTS
from sdrt.engine.version import SDRT_VERSION

logger = logging.getLogger(__name__)

EXIT_PASSED, EXIT_FAILED, EXIT_NO_DEVICE = 0, 1, 2
REPORT_JSON, REPORT_MARKDOWN = "report.json", "report.md"
DEFAULT_OUT_DIR = "gpu-validation"
DEFAULT_STEPS = 20
DEFAULT_RUNS = 3
#: --quick: denoising steps per image and per device-step check
QUICK_STEPS = 8
#: --quick: the tiny model's steps that build its fp32 engines and compare an image with the CPU reference's
QUICK_MODEL_STEPS = ("checkpoint", "export", "engines-fp32", "reference", "parity-tensorrt-fp32")
#: the packages --quick's TensorRT part imports beyond a bare machine's (module: what it is for)
QUICK_TENSORRT_MODULES = {"diffusers": "the checkpoint", "transformers": "the checkpoint", "onnx": "the export",
                          "PIL": "the pipeline (pillow)", "tqdm": "the pipeline", "regex": "the tokenizer"}
#: --full is the default from this much GPU memory: "16 GB" cards report less (a T4 about 14.7 GiB), and SD 1.5's
#: engines and diffusers fp16 each fit in it (they run one at a time)
FULL_DEFAULT_MIN_MEMORY_BYTES = 14 * 2**30
# The workload of every generation: `sdrt bench`'s prompt and guidance, one image at the model's default size.
PROMPT = "a photograph of an astronaut riding a horse"
GUIDANCE_SCALE = 7.5
SEED = 0
#: every engine's images are compared with this one's: fp32 on the CPU, the backend the parity tests hold to diffusers
REFERENCE_ENGINE = "sdrt-onnxruntime-cpu"
GRAPHS_ENGINE, NO_GRAPHS_ENGINE = "sdrt-tensorrt", "sdrt-tensorrt-no-graphs"
DIFFUSERS_PEER = "diffusers-fp16-cuda"
#: timed in fresh processes, interleaved, TensorRT with its fp16 engines
TIMED_ENGINES = (GRAPHS_ENGINE, NO_GRAPHS_ENGINE, "sdrt-cuda-fp16", "sdrt-cuda", DIFFUSERS_PEER)


@dataclasses.dataclass(frozen=True)
class Tolerance:
    """How far an engine's images may be from the reference's: pixel parity for fp32 engines (max abs difference on
    [0, 1] images), closeness for reduced precision (PSNR)."""

    max_abs_diff: float | None = None
    min_psnr_db: float | None = None

    def problem(self, max_abs_diff: float, psnr_db: float) -> str | None:
        """What is outside this tolerance, or None (NaN is outside every one)."""
        if self.max_abs_diff is not None and not max_abs_diff <= self.max_abs_diff:
            return f"max abs pixel difference {max_abs_diff:.3g} is above {self.max_abs_diff:g}"
        if self.min_psnr_db is not None and not psnr_db >= self.min_psnr_db:
            return f"PSNR {psnr_db:.1f} dB is below {self.min_psnr_db:g} dB"
        return None

    def describe(self) -> str:
        bounds = [f"max abs diff <= {self.max_abs_diff:g}"] if self.max_abs_diff is not None else []
        bounds += [f"PSNR >= {self.min_psnr_db:g} dB"] if self.min_psnr_db is not None else []
        return ", ".join(bounds)


#: fp32 kernels on the GPU against onnxruntime's on the CPU: other summation orders, far below one 8-bit level (the
#: bound of tests/test_tensorrt_gpu.py and of the parity tests against diffusers)
FP32_PARITY = Tolerance(max_abs_diff=5e-3)
#: fp16: close to fp32, not equal; the bar the bf16 CPU backend is held to (tests/test_backends.py)
REDUCED_PRECISION = Tolerance(min_psnr_db=30.0)


@dataclasses.dataclass(frozen=True)
class ParityCase:
    """One engine compared with the reference: its worker engine, the TensorRT engines it needs (None: not TensorRT)
    and its tolerance."""

    name: str
    engine: str
    precision: Precision | None
    tolerance: Tolerance


PARITY_CASES = (
    ParityCase("tensorrt-fp32", GRAPHS_ENGINE, Precision.FP32, FP32_PARITY),
    ParityCase("tensorrt-fp16", GRAPHS_ENGINE, Precision.FP16, REDUCED_PRECISION),
    ParityCase("cuda", "sdrt-cuda", None, FP32_PARITY),
    ParityCase("cuda-fp16", "sdrt-cuda-fp16", None, REDUCED_PRECISION),
)


@dataclasses.dataclass(frozen=True)
class ModelCase:
    """A checkpoint validated: its name in the report, its sdrt.export.random_checkpoint architecture, and whether its
    TensorRT engines are built for the validation's size only (a full-size model's dynamic engines take much longer
    to build and more memory; the tiny model's exercise the dynamic-shape path)."""

    name: str
    arch: str
    static_engines: bool


TINY = ModelCase("tiny", "tiny", static_engines=False)
SD15 = ModelCase("sd15", "sd15", static_engines=True)


@dataclasses.dataclass(frozen=True)
class ModelPaths:
    """Where one model's files go under OUT_DIR/models/<name>."""

    root: Path

    @property
    def checkpoint(self) -> Path:
        return self.root / "checkpoint"

    @property
    def bundle(self) -> Path:
        return self.root / "bundle"

    @property
    def images(self) -> Path:
        return self.root / "images"

    @property
    def latents(self) -> Path:
        return self.images / "latents.npy"

    def engine_images(self, name: str) -> Path:
        return self.images / f"{name}.npy"


@dataclasses.dataclass(frozen=True)
class ValidationPlan:
    """What one validation runs: the models, denoising steps per image and timed runs per engine."""

    out_dir: Path
    models: tuple[ModelCase, ...]
    steps: int = DEFAULT_STEPS
    runs: int = DEFAULT_RUNS
    #: --quick: the device step checks, then the models' QUICK_MODEL_STEPS only
    quick: bool = False

    def __post_init__(self) -> None:
        for name in ("steps", "runs"):
            value = getattr(self, name)
            if not is_int(value) or value < 1:
                raise InvalidArgumentError(name, f"must be an integer >= 1, got {value!r}")

    def paths(self, model: ModelCase) -> ModelPaths:
        return ModelPaths(self.out_dir / "models" / model.name)


def plan_for(out_dir: Path, device: CudaDevice, full: bool | None, steps: int, runs: int, quick: bool = False) -> ValidationPlan:
    """The plan for `device`: SD 1.5's architecture too when `full`, which by default (None) it is on GPUs with at
    least FULL_DEFAULT_MIN_MEMORY_BYTES; `quick`: the tiny model only (and the device step checks)."""
    if quick:
        return ValidationPlan(Path(out_dir), (TINY,), steps, runs, quick=True)
    if full is None:
        full = device.memory_bytes >= FULL_DEFAULT_MIN_MEMORY_BYTES
    return ValidationPlan(Path(out_dir), (TINY, SD15) if full else (TINY,), steps, runs)


# ---- steps and their results --------------------------------------------------------------------------------------
class Status(str, enum.Enum):
    PASSED = "passed"
    FAILED = "failed"
    SKIPPED = "skipped"


class StepSkipped(Exception):
    """Raised by a step that cannot run on this machine; its message says what is missing."""


class CheckFailed(Exception):
    """Raised by a step that ran but whose result is outside what is accepted; carries its measurements."""

    def __init__(self, message: str, details: dict[str, Any]) -> None:
        super().__init__(message)
        self.details = details


@dataclasses.dataclass(frozen=True)
class Step:
    """One step: `run` returns its measurements for the report, or raises to fail (CheckFailed keeps the
    measurements). It runs only if every step named in `needs` passed; otherwise it is skipped."""

    name: str
    description: str
    run: Callable[[], dict[str, Any]]
    needs: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class StepResult:
    name: str
    description: str
    status: Status
    seconds: float
    details: dict[str, Any]
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "status": self.status.value}


def run_steps(steps: Sequence[Step], on_result: Callable[[list[StepResult]], None] = lambda results: None) -> list[StepResult]:
    """Run `steps` in order, each failure recorded and the rest going on; call `on_result` with the results so far
    after each step. Raise ValueError if a step needs one that does not come before it."""
    names: set[str] = set()
    for step in steps:
        unknown = [need for need in step.needs if need not in names]
        if unknown:
            raise ValueError(f"step {step.name} needs {unknown}, which do not come before it")
        names.add(step.name)
    results: list[StepResult] = []
    status: dict[str, Status] = {}
    for number, step in enumerate(steps, 1):
        label = f"[{number}/{len(steps)}] {step.name}"
        unmet = [need for need in step.needs if status[need] is not Status.PASSED]
        if unmet:
            result = StepResult(step.name, step.description, Status.SKIPPED, 0.0, {}, f"needs {', '.join(unmet)}, which did not pass")
        else:
            logger.info("%s: %s", label, step.description)
            result = _run_step(step)
        log = logger.error if result.status is Status.FAILED else logger.info
        # The error's last line: a worker's whole stderr tail is in the report.
        log("%s: %s%s%s", label, result.status.value, f" in {result.seconds:.1f} s" if result.seconds else "",
            f": {result.error.strip().splitlines()[-1]}" if result.error else "")
        results.append(result)
        status[step.name] = result.status
        on_result(results)
    return results


def _run_step(step: Step) -> StepResult:
    started = time.perf_counter()
    try:
        details, status, error = step.run(), Status.PASSED, None
    except CheckFailed as exc:
        details, status, error = exc.details, Status.FAILED, str(exc)
    except StepSkipped as exc:
        details, status, error = {}, Status.SKIPPED, str(exc)
    except Exception as exc:  # any failure of one step is its result: the report records it and the others run
        logger.debug("%s failed", step.name, exc_info=True)
        details, status, error = {}, Status.FAILED, f"{type(exc).__name__}: {exc}"
    return StepResult(step.name, step.description, status, time.perf_counter() - started, details, error)


def exit_status(results: Sequence[StepResult]) -> int:
    return EXIT_FAILED if any(result.status is Status.FAILED for result in results) else EXIT_PASSED


# ---- what the steps do --------------------------------------------------------------------------------------------
class Actions(Protocol):
    """Everything the validation does to the machine: export, build, run. LocalActions does it; tests use fakes."""

    def make_checkpoint(self, arch: str, out_dir: Path) -> None:
        """Write a random-weight checkpoint of `arch` to `out_dir` (atomically)."""

    def export_bundle(self, checkpoint: Path, bundle: Path) -> None:
        """Export `checkpoint` to `bundle` (atomically) with fp16 variants of FP16_DEFAULT_COMPONENTS."""

    def build_engines(self, bundle: Path, profile: EngineProfile | None, precision: Precision) -> Path:
        """Build (or reuse) the bundle's TensorRT engines, which the tensorrt backend then runs; return their directory."""

    def run_engine(self, engine: str, model: Path, config: RunConfig, images_out: Path) -> dict[str, Any]:
        """Run a worker engine once in a fresh process; return its figures and leave its images in `images_out`."""

    def engine_unavailable_reason(self, engine: str) -> str | None:
        """Why a timed peer cannot run here (diffusers without CUDA torch), or None."""


class LocalActions:
    """Actions on this machine: the exporter, `sdrt build-engines`' builder and the benchmark worker."""

    def make_checkpoint(self, arch: str, out_dir: Path) -> None:
        from sdrt.export.random_checkpoint import make_random_checkpoint

        make_random_checkpoint(out_dir, arch, seed=SEED)

    def export_bundle(self, checkpoint: Path, bundle: Path) -> None:
        from sdrt.export import export_bundle

        export_bundle(checkpoint, bundle, fp16_components=FP16_DEFAULT_COMPONENTS)

    def build_engines(self, bundle: Path, profile: EngineProfile | None, precision: Precision) -> Path:
        from sdrt.export.tensorrt_build import build_engines

        return build_engines(bundle, profile, precision)

    def run_engine(self, engine: str, model: Path, config: RunConfig, images_out: Path) -> dict[str, Any]:
        from sdrt.benchmarks.bench import run_worker  # pillow, for bench's charts: not needed by --quick's device checks

        return run_worker(engine, model, config, images_out)

    def engine_unavailable_reason(self, engine: str) -> str | None:
        return diffusers_unavailable_reason(engine) if engine in DIFFUSERS_ENGINES else None


def _one_line(exc: BaseException) -> str:
    """An error's last line: a worker's failure ends with the exception its process raised."""
    lines = [line for line in str(exc).splitlines() if line.strip()]
    return lines[-1].strip() if lines else type(exc).__name__


class _ModelSteps:
    """The bodies of one model's steps; files under the model's ModelPaths pass results from step to step."""

    def __init__(self, plan: ValidationPlan, model: ModelCase, actions: Actions) -> None:
        self.plan, self.model, self.actions = plan, model, actions
        self.paths = plan.paths(model)

    def steps(self) -> list[Step]:
        def name(step: str) -> str:
            return f"{self.model.name}/{step}"

        fp16 = " and ".join(c.value for c in FP16_DEFAULT_COMPONENTS)
        engines = {precision: name(f"engines-{precision.value}") for precision in (Precision.FP32, Precision.FP16)}
        return [
            Step(name("checkpoint"), f"random-weight checkpoint, {self.model.arch} architecture", self.checkpoint),
            Step(name("export"), f"bundle, with fp16 variants of the {fp16}", self.export, (name("checkpoint"),)),
            *(Step(engines[p], f"TensorRT engines in {p.value}", functools.partial(self.engines, p), (name("export"),))
              for p in engines),
            Step(name("reference"), f"images from the CPU fp32 reference ({REFERENCE_ENGINE})", self.reference, (name("export"),)),
            *(Step(name(f"parity-{case.name}"), f"{case.name} against the reference ({case.tolerance.describe()})",
                   functools.partial(self.parity, case), (name("reference"), *([engines[case.precision]] if case.precision else [])))
              for case in PARITY_CASES),
            Step(name("timing"), f"end to end, {self.plan.runs} fresh process(es) per engine, interleaved", self.timing,
                 (name("export"),)),
        ]

    def checkpoint(self) -> dict[str, Any]:
        reused = self.paths.checkpoint.is_dir()  # written atomically: present means complete
        if not reused:
            self.actions.make_checkpoint(self.model.arch, self.paths.checkpoint)
        return {"path": str(self.paths.checkpoint), "reused": reused}

    def export(self) -> dict[str, Any]:
        reused = (self.paths.bundle / MANIFEST_NAME).is_file()
        if not reused:
            self.actions.export_bundle(self.paths.checkpoint, self.paths.bundle)
        manifest = read_manifest(self.paths.bundle)
        variants = {c.value: e.fp16.max_abs_diff for c, e in manifest.components.items() if e.fp16 is not None}
        return {"path": str(self.paths.bundle), "reused": reused, "fp16_variants_max_abs_diff": variants}

    def engines(self, precision: Precision) -> dict[str, Any]:
        profile = self._profile()
        directory = self.actions.build_engines(self.paths.bundle, profile, precision)
        return {"precision": precision.value, "profile": profile.describe() if profile else "the default", "directory": str(directory)}

    def reference(self) -> dict[str, Any]:
        config = self._workload()
        figures = self.actions.run_engine(REFERENCE_ENGINE, self.paths.bundle, config, self.paths.engine_images(REFERENCE_ENGINE))
        return {"engine": REFERENCE_ENGINE, "backend": figures.get("backend"), "size": f"{config.height}x{config.width}",
                "e2e_s": figures["e2e_s"]}

    def parity(self, case: ParityCase) -> dict[str, Any]:
        config = self._workload()
        if case.precision is not None:
            # Built by its engines step: this reuses them, and makes them the ones the tensorrt backend loads.
            self.actions.build_engines(self.paths.bundle, self._profile(), case.precision)
        images_file = self.paths.engine_images(case.name)
        figures = self.actions.run_engine(case.engine, self.paths.bundle, config, images_file)
        images, reference = np.load(images_file), np.load(self.paths.engine_images(REFERENCE_ENGINE))
        if images.shape != reference.shape:
            raise CheckFailed(f"{case.name}: images of shape {images.shape}, the reference's are {reference.shape}", {})
        from sdrt.benchmarks.bench import psnr  # pillow, for bench's charts: not needed by --quick's device checks

        max_abs_diff = float(np.abs(images.astype(np.float64) - reference).max())
        details = {"engine": case.engine, "backend": figures.get("backend"), "max_abs_diff": max_abs_diff,
                   "psnr_db": psnr(images, reference.astype(np.float64)), "tolerance": case.tolerance.describe(),
                   "e2e_s": figures["e2e_s"]}
        problem = case.tolerance.problem(max_abs_diff, details["psnr_db"])
        if problem is not None:
            raise CheckFailed(f"{case.name}: {problem}", details)
        return details

    def timing(self) -> dict[str, Any]:
        config = self._workload()
        skipped = {e: reason for e in TIMED_ENGINES if (reason := self.actions.engine_unavailable_reason(e)) is not None}
        failed: dict[str, str] = {}
        tensorrt = [e for e in TIMED_ENGINES if e in SDRT_ENGINES and SDRT_ENGINES[e].backend == "tensorrt"]
        try:
            self.actions.build_engines(self.paths.bundle, self._profile(), Precision.FP16)
        except Exception as exc:  # costs the TensorRT rows only
            failed.update({e: f"no fp16 TensorRT engines: {_one_line(exc)}" for e in tensorrt})
        runs: dict[str, list[dict[str, Any]]] = {e: [] for e in TIMED_ENGINES if e not in skipped and e not in failed}
        for round_index in range(self.plan.runs):
            for engine in [e for e in runs if e not in failed]:  # interleaved: machine drift hits every engine alike
                logger.info("%s timing: %s, run %d of %d", self.model.name, engine, round_index + 1, self.plan.runs)
                model = self.paths.bundle if engine in SDRT_ENGINES else self.paths.checkpoint
                try:
                    runs[engine].append(self.actions.run_engine(engine, model, config, self.paths.engine_images(f"timing-{engine}")))
                except Exception as exc:  # one engine's failure costs its own row, not the others'
                    failed[engine] = _one_line(exc)
                    logger.error("%s timing: %s failed: %s", self.model.name, engine, failed[engine])
        from sdrt.benchmarks.bench import summarize  # pillow, for bench's charts: not needed by --quick's device checks

        summaries = {e: summarize(r) for e, r in runs.items() if e not in failed}
        details = {"runs": self.plan.runs, "engines": summaries, "skipped": skipped, "failed": failed, **_ratios(summaries)}
        if failed:
            raise CheckFailed(f"{', '.join(failed)} failed", details)
        return details

    def _profile(self) -> EngineProfile | None:
        """The engines' profile: the validation's size alone for static engines, else the default profile."""
        if not self.model.static_engines:
            return None
        side = read_manifest(self.paths.bundle).model.default_image_size
        return EngineProfile.static(1, side, side)

    def _workload(self) -> RunConfig:
        """One image at the model's default size from fixed initial latents (written where every run reads them)."""
        model = read_manifest(self.paths.bundle).model
        side, factor = model.default_image_size, model.vae_scale_factor
        latents = np.random.default_rng(SEED).standard_normal((1, model.latent_channels, side // factor, side // factor), dtype=np.float32)
        self.paths.images.mkdir(parents=True, exist_ok=True)
        np.save(self.paths.latents, latents)  # the same bytes every time
        return RunConfig(PROMPT, self.plan.steps, GUIDANCE_SCALE, side, side, 1, str(self.paths.latents))


def _ratios(summaries: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """What CUDA graphs save (TensorRT without ÷ with: above 1, they help), and each sdrt engine's end-to-end time ÷
    diffusers fp16's (below 1, sdrt is faster)."""
    def e2e(engine: str) -> float:
        return summaries[engine]["e2e_s"]["median"]

    speedup = e2e(NO_GRAPHS_ENGINE) / e2e(GRAPHS_ENGINE) if {GRAPHS_ENGINE, NO_GRAPHS_ENGINE} <= summaries.keys() else None
    versus = {e: e2e(e) / e2e(DIFFUSERS_PEER) for e in summaries if e in SDRT_ENGINES} if DIFFUSERS_PEER in summaries else {}
    return {"cuda_graph_speedup": speedup, "vs_diffusers_fp16": versus, "host_share_of_denoise": _host_shares(summaries)}


def _host_shares(summaries: dict[str, dict[str, Any]]) -> dict[str, float]:
    """Each sdrt engine's share of the denoising loop spent on the host (numpy guidance and scheduler update, the
    latents' copies to and from the device), the rest being U-Net calls: the figure that decides whether guidance
    and the scheduler update should move onto the device and into the captured graph."""
    shares = {}
    for engine, summary in summaries.items():
        stages = summary.get("stages_s", {})
        if engine in SDRT_ENGINES and {"unet", "guidance_and_scheduler"} <= stages.keys():
            shares[engine] = stages["guidance_and_scheduler"] / (stages["guidance_and_scheduler"] + stages["unet"])
    return shares


def validation_steps(plan: ValidationPlan, actions: Actions, cupy_device: Callable[[], Any] | None = None) -> list[Step]:
    """Every step of `plan`; with --quick, the device step checks on `cupy_device()` (default: CuPy on a new stream)
    first, then each model's QUICK_MODEL_STEPS, after a step that skips them, naming what is missing, where TensorRT
    or the export's packages are not installed."""
    if not plan.quick:
        return [step for model in plan.models for step in _ModelSteps(plan, model, actions).steps()]
    checks = _DeviceChecks(plan.steps, cupy_device or _cupy_device)
    steps = [Step("device/cupy", "CuPy and the GPU it runs on", checks.cupy),
             *(Step(f"device/step-{name}", f"{name}: U-Net stand-in, guidance and update in CUDA graphs against numpy",
                    functools.partial(checks.step, name), ("device/cupy",)) for name in device_step_check.CHECKED_SCHEDULERS)]
    for model in plan.models:
        gate = f"{model.name}/requirements"
        steps.append(Step(gate, "TensorRT, cuda-python and the export's packages", _tensorrt_requirements))
        steps += [dataclasses.replace(step, needs=(*step.needs, gate)) for step in _ModelSteps(plan, model, actions).steps()
                  if step.name.removeprefix(f"{model.name}/") in QUICK_MODEL_STEPS]
    return steps


def _tensorrt_requirements() -> dict[str, Any]:
    """StepSkipped naming what --quick's TensorRT part lacks here."""
    missing = [f"{module} ({purpose})" for module, purpose in QUICK_TENSORRT_MODULES.items() if importlib.util.find_spec(module) is None]
    reason = libraries_unavailable_reason()
    if reason is not None or missing:
        raise StepSkipped("; ".join([*([reason] if reason else []), *([f"not installed: {', '.join(missing)}"] if missing else [])]))
    return {"tensorrt": "importable"}


def _cupy_device() -> Any:
    """The device loop's Device on CuPy and a new non-blocking stream of the current GPU."""
    return CupyDevice(cupy_namespace().cuda.Stream(non_blocking=True))


class _DeviceChecks:
    """--quick's device checks: `cupy_device()` makes the Device (raising BackendUnavailableError without CuPy)."""

    def __init__(self, steps: int, cupy_device: Callable[[], Any]) -> None:
        self.steps, self.cupy_device = steps, cupy_device

    def cupy(self) -> dict[str, Any]:
        try:
            device = self.cupy_device()
        except BackendUnavailableError as exc:
            raise StepSkipped(str(exc)) from None
        xp = device.namespace
        version = getattr(xp, "__version__", None)
        properties = xp.cuda.runtime.getDeviceProperties(xp.cuda.runtime.getDevice()) if hasattr(xp, "cuda") else {}
        name = properties.get("name", b"")
        return {"cupy": version, "device": name.decode() if isinstance(name, bytes) else str(name)}

    def step(self, name: str) -> dict[str, Any]:
        details = device_step_check.check_device_step(name, self.cupy_device(), self.steps)
        if details["graphs"] != details["unet_calls"]:
            raise CheckFailed(f"{name}: {details['graphs']} CUDA graphs captured for {details['unet_calls']} steps: "
                              f"{'; '.join(details['capture_errors']) or 'no capture error recorded'}", details)
        if not details["max_relative_diff"] <= details["tolerance"]:
            raise CheckFailed(f"{name}: the device loop's latents differ from numpy's by {details['max_relative_diff']:.3g} "
                              f"of their scale, above {details['tolerance']:g}", details)
        return details


# ---- the report ---------------------------------------------------------------------------------------------------
def build_report(
    plan: ValidationPlan, results: Sequence[StepResult], machine: dict[str, Any], command: Sequence[str], started: datetime.datetime,
    complete: bool,
) -> dict[str, Any]:
    counts = {status.value: sum(r.status is status for r in results) for status in Status}
    return {
        "sdrt_version": SDRT_VERSION,
        "command": shlex.join(command),
        "started_utc": started.isoformat(timespec="seconds"),
        "updated_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "complete": complete,
        "exit_status": exit_status(results),
        "counts": counts,
        "environment": machine,
        "plan": {
            "models": [dataclasses.asdict(model) for model in plan.models],
            "steps": plan.steps, "runs": plan.runs, "prompt": PROMPT, "guidance_scale": GUIDANCE_SCALE, "seed": SEED,
            "reference": REFERENCE_ENGINE, "timed_engines": list(TIMED_ENGINES), "quick": plan.quick,
        },
        "results": [result.to_json() for result in results],
    }


def _number(value: float | None, digits: int = 3) -> str:
    if value is None:
        return "—"
    return "∞" if value == float("inf") else f"{value:.{digits}g}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *("| " + " | ".join(row) + " |" for row in rows)]


def markdown(report: dict[str, Any]) -> str:
    """The report as markdown: what ran where, every step, then each model's parity and timing tables."""
    machine, plan, counts = report["environment"], report["plan"], report["counts"]
    device = machine["cuda_device"]
    versions = ", ".join(f"{name} {version}" for name, version in machine["packages"].items() if version)
    lines = [
        "# sdrt GPU validation",
        "",
        f"- Run: {report['started_utc']} to {report['updated_utc']}, `{report['command']}`"
        + ("" if report["complete"] else " — **incomplete** (still running, or interrupted)"),
        f"- GPU: {CudaDevice(**device).describe() if device else 'none (' + machine['cuda_device_error'] + ')'}",
        f"- Versions: sdrt {report['sdrt_version']}, Python {machine['python']}, {versions}",
        f"- Workload: \"{plan['prompt']}\", {plan['steps']} steps, guidance {plan['guidance_scale']}, one image at each model's "
        f"default size, initial latents from seed {plan['seed']}; images compared with {plan['reference']} (fp32, CPU) on "
        "the same latents; timings: end to end in fresh processes, medians.",
        f"- Result: {counts['passed']} passed, {counts['failed']} failed, {counts['skipped']} skipped (exit status {report['exit_status']})",
        "",
        "## Steps",
        "",
        *_table(["step", "status", "seconds", "result"], [
            [r["name"], r["status"], f"{r['seconds']:.1f}", _step_summary(r)] for r in report["results"]]),
    ]
    for model in plan["models"]:
        prefix = f"{model['name']}/"
        parity = [r for r in report["results"] if r["name"].startswith(f"{prefix}parity-") and r["details"]]
        if parity:
            lines += ["", f"## Parity: {model['name']} ({model['arch']})", "", *_table(
                ["engine", "backend", "max abs diff", "PSNR dB", "accepted", "status"],
                [[r["name"].removeprefix(f"{prefix}parity-"), str(r["details"]["backend"]), _number(r["details"]["max_abs_diff"]),
                  _number(r["details"]["psnr_db"], 4), r["details"]["tolerance"], r["status"]] for r in parity])]
        timing = next((r for r in report["results"] if r["name"] == f"{prefix}timing" and r["details"]), None)
        if timing is not None:
            lines += ["", f"## Timing: {model['name']} ({model['arch']}), seconds", "", *_timing_lines(timing["details"])]
    return "\n".join(lines) + "\n"


def _step_summary(result: dict[str, Any]) -> str:
    """One table cell: the error's last line, or the step's main figure."""
    details = result["details"]
    if result["error"]:
        summary = result["error"].strip().splitlines()[-1]
    elif "max_relative_diff" in details:
        summary = (f"{details['unet_calls']} graphs: max diff {_number(details['max_relative_diff'])} of the latents' scale "
                   f"(≤ {details['tolerance']:g}), {_number(details['seconds'][-1])} s per replayed request")
    elif "max_abs_diff" in details:
        summary = f"max abs diff {_number(details['max_abs_diff'])}, PSNR {_number(details['psnr_db'], 4)} dB"
    elif "engines" in details:
        summary = f"{len(details['engines'])} engine(s) timed: see below"
    elif "profile" in details:
        summary = f"profile: {details['profile']}"
    elif "e2e_s" in details:
        summary = f"{details['size']} px in {details['e2e_s']:.3g} s"
    else:
        summary = "reused" if details.get("reused") else "made"
    return summary.replace("|", "/")  # a cell of a markdown table


def _timing_lines(details: dict[str, Any]) -> list[str]:
    rows = [[engine, str(s["backend"]), _number(s["e2e_s"]["median"]), _number(s["e2e_s"]["p95"]), _number(s.get("unet_per_call_s")),
             _number(s["load_s"]["median"]), _number(s["cold_start_s"]["median"]), f"{s['peak_rss_gb']:.2f}"]
            for engine, s in details["engines"].items()]
    lines = _table(["engine", "backend", "e2e", "e2e p95", "U-Net/call", "load", "cold start", "peak RSS GB"], rows)
    if details["cuda_graph_speedup"] is not None:
        lines += ["", f"CUDA graphs: TensorRT end to end without them ÷ with them = {details['cuda_graph_speedup']:.2f}×"]
    if details["vs_diffusers_fp16"]:
        lines += ["", "sdrt ÷ diffusers fp16 on this GPU, end to end (below 1: sdrt is faster): "
                  + ", ".join(f"{e} {ratio:.2f}×" for e, ratio in details["vs_diffusers_fp16"].items())]
    if details.get("host_share_of_denoise"):
        lines += ["", "Share of the denoising loop on the host (guidance + scheduler in numpy, latents to and from the "
                  "device; above ~10 %, they belong on the device): "
                  + ", ".join(f"{e} {share:.1%}" for e, share in details["host_share_of_denoise"].items())]
    lines += [f"- {engine} skipped: {reason}" for engine, reason in details["skipped"].items()]
    lines += [f"- {engine} failed: {error}" for engine, error in details["failed"].items()]
    return lines


def write_report(out_dir: Path, report: dict[str, Any]) -> None:
    """report.json and report.md in `out_dir`, each replaced atomically."""
    with atomic_file(Path(out_dir) / REPORT_JSON) as staging:
        staging.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    with atomic_file(Path(out_dir) / REPORT_MARKDOWN) as staging:
        staging.write_text(markdown(report), encoding="utf-8")


# ---- the command --------------------------------------------------------------------------------------------------
def run_validation(plan: ValidationPlan, actions: Actions, command: Sequence[str]) -> list[StepResult]:
    """Run every step of `plan`, rewriting the report after each; return the results."""
    started = datetime.datetime.now(datetime.timezone.utc)
    machine = environment()
    steps = validation_steps(plan, actions)
    logger.info("validating the GPU path: %s, %d steps; report in %s", ", ".join(m.name for m in plan.models), len(steps),
                plan.out_dir / REPORT_MARKDOWN)

    def publish(results: Sequence[StepResult], complete: bool = False) -> None:
        write_report(plan.out_dir, build_report(plan, results, machine, command, started, complete))

    results = run_steps(steps, on_result=publish)
    publish(results, complete=True)
    return results


def validate_command(out_dir: Path | None, full: bool | None, steps: int | None, runs: int | None, command: Sequence[str],
                     actions: Actions | None = None, quick: bool = False) -> int:
    """The body of `python -m sdrt.benchmarks.gpu_validate` and `sdrt doctor --gpu`: validate, print where the
    report is, and return the exit status (EXIT_NO_DEVICE, after one line on stderr, without a CUDA device). None
    means the default."""
    reason = cuda_device_unavailable_reason()
    if reason is not None:
        print(f"sdrt: cannot validate the GPU path here: {reason}", file=sys.stderr)
        return EXIT_NO_DEVICE
    logger.setLevel(logging.INFO)  # progress is what this command shows, whatever the caller's log level
    default_steps = QUICK_STEPS if quick else DEFAULT_STEPS
    plan = plan_for(Path(DEFAULT_OUT_DIR) if out_dir is None else out_dir, cuda_device(), full,
                    default_steps if steps is None else steps, DEFAULT_RUNS if runs is None else runs, quick)
    results = run_validation(plan, actions if actions is not None else LocalActions(), command)
    counts = {status: sum(r.status is status for r in results) for status in Status}
    print(f"{plan.out_dir / REPORT_MARKDOWN}: {counts[Status.PASSED]} passed, {counts[Status.FAILED]} failed, "
          f"{counts[Status.SKIPPED]} skipped")
    return exit_status(results)


def add_arguments(parser: argparse.ArgumentParser, help_prefix: str = "") -> None:
    """The validation's options on `parser` (here and under `sdrt doctor --gpu`). They default to None and get their
    defaults in `validate_command`, so that `sdrt doctor` can refuse one given without --gpu rather than ignore it."""
    parser.add_argument("out_dir", nargs="?", type=Path, default=None, metavar="OUT_DIR",
                        help=f"{help_prefix}where the report, checkpoints, bundles and engines go (default {DEFAULT_OUT_DIR})")
    parser.add_argument("--full", action=argparse.BooleanOptionalAction, default=None,
                        help=f"{help_prefix}also validate Stable Diffusion 1.5's full-size architecture (default: on GPUs "
                        "with 16 GB or more)")
    parser.add_argument("--steps", type=int, default=None, help=f"{help_prefix}denoising steps per image (default {DEFAULT_STEPS})")
    parser.add_argument("--runs", type=int, default=None,
                        help=f"{help_prefix}timed runs per engine, each in a fresh process (default {DEFAULT_RUNS})")


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m sdrt.benchmarks.gpu_validate OUT_DIR [options]`: `sdrt doctor --gpu OUT_DIR [options]` by another name."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m sdrt.benchmarks.gpu_validate",
                                     description="Validate the NVIDIA path end to end (the same as sdrt doctor --gpu).")
    add_arguments(parser)
    parser.add_argument("--quick", action="store_true",
                        help=f"minutes, from a bare machine with CuPy: the device loop's step for every scheduler in CUDA "
                        f"graphs against numpy, then (where TensorRT is installed) the tiny model's fp32 engines against the "
                        f"CPU ({QUICK_STEPS} steps unless --steps)")
    args = parser.parse_args(argv)
    return validate_command(args.out_dir, args.full, args.steps, args.runs,
                            command=["python", "-m", "sdrt.benchmarks.gpu_validate", *argv], quick=args.quick)


if __name__ == "__main__":
    sys.exit(main())
