"""`sdrt bench`: sdrt and its peers on the same checkpoint, each run in a fresh process, interleaved (A B A B ...).

Interleaving makes machine drift (thermal, noisy neighbours) hit every engine alike, so the ratios taken in one
bench are meaningful even where absolute times on a shared 2-core machine are not. Nothing here gates CI.
"""
from __future__ import annotations

import dataclasses
import datetime
import importlib.util
import json
import logging
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sdrt.benchmarks import matmul_peak, peer_export, worker
from sdrt.benchmarks.report import write_chart, write_markdown
from sdrt.benchmarks.worker import RunConfig
from sdrt.engine.diagnostics import package_versions
from sdrt.engine.backends import backend_class
from sdrt.engine.errors import BackendUnavailableError
from sdrt.engine.loading import component_files
from sdrt.engine.manifest import Manifest, read_manifest
from sdrt.engine.specs import Component

logger = logging.getLogger(__name__)

#: the fp32 engines whose images can be the accuracy reference for PSNR: sdrt's, or diffusers' where sdrt's fp32 engine
#: does not fit the memory budget (SDXL on 24 GB)
REFERENCE_ENGINES = ("sdrt-exact", "diffusers-fp32")
SDRT_ENGINES = tuple(worker.SDRT_ENGINES)


@dataclasses.dataclass(frozen=True)
class PeerInstall:
    """Where a peer of worker.VENV_PEERS runs from: its venv's python and its own export of the checkpoint."""

    python: Path | None
    model: Path | None


#: the `sdrt bench` options that give each venv peer's PeerInstall (python, model), named in its skip reason
PEER_OPTIONS = {
    "optimum-ort": ("--optimum-python", "--optimum-model"),
    "optimum-intel": ("--optimum-intel-python", "--openvino-model"),
    "openvino-genai": ("--genai-python", "--openvino-model"),
}
#: how each venv peer's model is made (`make bench` does it; docs/benchmarks.md)
_PEER_EXPORTS = {"optimum-ort": peer_export.ExportFormat.ONNX, "optimum-intel": peer_export.ExportFormat.OPENVINO,
                 "openvino-genai": peer_export.ExportFormat.OPENVINO}


@dataclasses.dataclass(frozen=True)
class BenchPlan:
    checkpoint: Path | None  # diffusers peers run from the checkpoint; None skips them
    bundle: Path
    engines: tuple[str, ...]
    runs: int
    sizes: tuple[int, ...]
    batches: tuple[int, ...]
    prompt: str
    steps: int
    guidance_scale: float
    seed: int
    peers: dict[str, PeerInstall]  # worker.VENV_PEERS engine -> where it runs from; an engine absent here is skipped
    out_dir: Path
    floor: bool = True  # measure this machine's matrix-product peaks and each engine's U-Net against them
    reference: str = REFERENCE_ENGINES[0]  # the engine whose images PSNR is measured against


def _skip_reasons(plan: BenchPlan) -> dict[str, str]:
    """Each engine of the plan that will not run, and why; asked once per bench (some reasons import torch or
    resolve backends against the bundle)."""
    reasons: dict[str, str] = {}
    sdrt_runs: dict[worker.SdrtEngine, str] = {}  # how each sdrt engine kept so far runs -> that engine
    for engine in dict.fromkeys(plan.engines):
        if engine in SDRT_ENGINES:
            # e.g. sdrt-int8 on a bundle not quantized, sdrt-tensorrt without engines: the reason names the fix
            try:
                runs_as = _sdrt_run(engine, plan)
            except BackendUnavailableError as exc:
                reasons[engine] = str(exc)
                continue
            if runs_as.deepcache_interval is not None and read_manifest(plan.bundle).deepcache is None:
                reasons[engine] = "the bundle has no DeepCache passes: export it with --deepcache-branch N"
                continue
            # e.g. sdrt-bf16 beside sdrt ("auto") on a bundle not quantized: the same run twice tells nothing more
            if runs_as in sdrt_runs:
                reasons[engine] = f"runs as {sdrt_runs[runs_as]} does on this bundle ({runs_as.backend}, {runs_as.memory})"
            else:
                sdrt_runs[runs_as] = engine
            continue
        reason = _peer_skip_reason(engine, plan)
        if reason is not None:
            reasons[engine] = reason
    return reasons


def _peer_skip_reason(engine: str, plan: BenchPlan) -> str | None:
    if engine in worker.DIFFUSERS_ENGINES:
        if plan.checkpoint is None:
            return "no --checkpoint given"
        if not all(importlib.util.find_spec(m) for m in ("torch", "diffusers")):
            return "torch/diffusers not installed (pip install 'sdrt[export]')"
        return worker.diffusers_unavailable_reason(engine)
    if engine in worker.VENV_PEERS:
        return _venv_peer_skip_reason(engine, plan.peers.get(engine, PeerInstall(None, None)))
    return None


def _venv_peer_skip_reason(engine: str, install: PeerInstall) -> str | None:
    python_option, model_option = PEER_OPTIONS[engine]
    export_format = _PEER_EXPORTS[engine].value
    if install.python is None or install.model is None:
        return (f"needs {python_option} and {model_option} ({worker.VENV_PEERS[engine]} runs in a venv of its own "
                "and from its own export; `make bench` makes both)")
    if not install.python.is_file():
        return f"{python_option} {install.python}: no such file (a venv with {worker.VENV_PEERS[engine]}; `make bench` builds it)"
    if not install.model.is_dir():
        return (f"{model_option} {install.model}: no such directory (export it with `optimum-cli export {export_format} "
                f"--model CHECKPOINT --task text-to-image {install.model}`, or `python -m sdrt.benchmarks.peer_export`)")
    return None


def _sdrt_run(engine: str, plan: BenchPlan) -> worker.SdrtEngine:
    """How an sdrt engine runs on the plan's bundle: "auto" and "exact" resolved to the backend they take there."""
    spec = worker.SDRT_ENGINES[engine]
    backend = backend_class(spec.backend, plan.bundle, component_files(plan.bundle, read_manifest(plan.bundle)))
    return dataclasses.replace(spec, backend=backend.name)


def _run_once(engine: str, plan: BenchPlan, config: RunConfig, images_out: Path) -> dict[str, Any]:
    if engine in worker.VENV_PEERS:
        # Its venv does not have sdrt installed: run the worker by path (it imports nothing from sdrt at module level).
        install = plan.peers[engine]
        return run_worker(engine, install.model, config, images_out, launcher=(str(install.python), worker.__file__))
    return run_worker(engine, plan.bundle if engine in SDRT_ENGINES else plan.checkpoint, config, images_out)


def run_worker(
    engine: str, model: Path, config: RunConfig, images_out: Path, launcher: Sequence[str] = (sys.executable, "-m", "sdrt.benchmarks.worker")
) -> dict[str, Any]:
    """Run `engine` once on `model` (a bundle for sdrt engines, else the checkpoint) in a fresh process started by
    `launcher`; return the worker's figures (sdrt.benchmarks.worker) and leave its final images in `images_out`.
    Raise RuntimeError with the end of its stderr if it fails."""
    command = [*launcher, "--engine", engine, "--model", str(model),
               "--config", json.dumps(dataclasses.asdict(config)), "--images-out", str(images_out)]
    launched_at = time.time()
    result = subprocess.run([*command, "--launched-at", repr(launched_at)], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{engine} failed (exit {result.returncode}):\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def psnr(images: np.ndarray, reference: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB of images in [0, 1] against `reference` (infinite when equal)."""
    mse = float(np.mean((images.astype(np.float64) - reference) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians and p95 of an engine's worker runs, per-stage medians, and its U-Net time per call."""

    def stat(values: list[float]) -> dict[str, float]:
        return {"median": float(np.median(values)), "p95": float(np.percentile(values, 95))}

    stages = sorted({k for r in runs for k in r["timings"]})
    unet_calls = runs[0]["unet_calls"]
    summary = {
        "backend": runs[0].get("backend"),
        "unet_precision": runs[0].get("unet_precision"),  # what its U-Net's products run in: fp32, bf16, int8 or None
        "runs": len(runs),
        "e2e_s": stat([r["e2e_s"] for r in runs]),
        "images_per_s": stat([r["images_per_s"] for r in runs]),
        "load_s": stat([r["load_s"] for r in runs]),
        "cold_start_s": stat([r["cold_start_s"] for r in runs]),
        # what the first image after launch costs beyond the same image warm: imports, load, first-call work
        "startup_s": stat([r["cold_start_s"] - r["warm_first_s"] for r in runs]),
        "peak_rss_gb": max(r["peak_rss_gb"] for r in runs),
        "stages_s": {stage: float(np.median([r["timings"].get(stage, 0.0) for r in runs])) for stage in stages},
        "unet_calls": unet_calls,
    }
    if unet_calls and "unet" in summary["stages_s"]:
        summary["unet_per_call_s"] = summary["stages_s"]["unet"] / unet_calls
    return summary


def _ratios(engines: dict[str, dict[str, Any]], metric: str) -> dict[str, dict[str, float]]:
    """ratio[a][b] = median metric of sdrt engine a / that of peer b (< 1: a is faster or smaller)."""
    def value(summary):
        entry = summary[metric]
        return entry["median"] if isinstance(entry, dict) else entry

    return {
        ours: {peer: value(engines[ours]) / value(engines[peer]) for peer in engines if peer not in SDRT_ENGINES}
        for ours in SDRT_ENGINES if ours in engines
    }


def unet_call_gflop(bundle: Path, manifest: Manifest, size: int, batch: int, guidance_scale: float) -> float:
    """GFLOP of one U-Net call of a size × size, `batch`-image request on the bundle's U-Net: guidance's two halves
    in one call (as every engine here runs it), one text-encoder window; the peers run the same architecture."""
    entry = manifest.components[Component.UNET]
    latent = size // manifest.model.vae_scale_factor
    axes = {"batch": batch * (2 if guidance_scale > 1 else 1), "latent_height": latent, "latent_width": latent,
            "context_length": manifest.tokenizer.model_max_length}
    shapes = {tensor.name: [axes[axis] if isinstance(axis, str) else axis for axis in tensor.shape] for tensor in entry.inputs}
    return matmul_peak.count_flops(bundle / entry.file, shapes) / 1e9


def _add_floor(summaries: dict[str, dict[str, Any]], gflop_per_call: float, peaks: dict[str, dict[str, Any]]) -> None:
    """Each engine's U-Net call in GFLOP/s and as a fraction of the measured peak of the precision it runs in (where
    its U-Net time, its precision and that peak are known, and the peak ran in that precision)."""
    for engine, summary in summaries.items():
        # DeepCache's shallow calls do a fraction of a full call's work: its time per call is no rate of that work
        deepcache = engine in SDRT_ENGINES and worker.SDRT_ENGINES[engine].deepcache_interval is not None
        if "unet_per_call_s" not in summary or deepcache:
            continue
        summary["unet_gflops"] = gflop_per_call / summary["unet_per_call_s"]
        peak = peaks.get(summary["unet_precision"])
        if peak is not None and peak["verified"]:
            summary["unet_peak_fraction"] = summary["unet_gflops"] / peak["gflops"]


def _bench_point(plan: BenchPlan, size: int, batch: int, work: Path, skipped: dict[str, str],
                 peaks: dict[str, dict[str, Any]] | None) -> dict[str, Any]:
    manifest = read_manifest(plan.bundle)
    f = manifest.model.vae_scale_factor
    latents = np.random.default_rng(plan.seed).standard_normal((batch, manifest.model.latent_channels, size // f, size // f), dtype=np.float32)
    latents_file = work / f"latents-{size}-{batch}.npy"
    np.save(latents_file, latents)
    config = RunConfig(plan.prompt, plan.steps, plan.guidance_scale, size, size, batch, str(latents_file))
    _prime_bundle_caches(plan, config, work, skipped)
    engines = [e for e in plan.engines if e not in skipped]
    skipped = dict(skipped)  # this point's: an engine that fails here is added
    for engine, reason in skipped.items():
        logger.warning("skipping %s: %s", engine, reason)
    runs: dict[str, list[dict[str, Any]]] = {e: [] for e in engines}
    images: dict[str, np.ndarray] = {}
    for round_index in range(plan.runs):
        for engine in [e for e in engines if e not in skipped]:  # interleaved: A B A B ...
            logger.info("%dx%d batch %d: %s run %d/%d", size, size, batch, engine, round_index + 1, plan.runs)
            images_file = work / f"{engine}-{size}-{batch}.npy"
            try:
                runs[engine].append(_run_once(engine, plan, config, images_file))
            except RuntimeError as exc:  # one broken peer must not cost the whole (long) bench
                logger.error("%s", exc)
                skipped[engine] = f"failed: {str(exc).splitlines()[-1][:300]}"
                continue
            images[engine] = np.load(images_file)
    summaries = {e: summarize(r) for e, r in runs.items() if e not in skipped}
    gflop_per_call = None
    if peaks is not None:
        gflop_per_call = unet_call_gflop(plan.bundle, manifest, size, batch, plan.guidance_scale)
        _add_floor(summaries, gflop_per_call, peaks)
    if plan.reference in images:
        for engine, summary in summaries.items():
            summary["psnr_vs_fp32_db"] = psnr(images[engine], images[plan.reference].astype(np.float64))
            summary["max_abs_diff_vs_fp32"] = float(np.abs(images[engine] - images[plan.reference]).max())
    return {
        "size": size, "batch": batch, "unet_gflop_per_call": gflop_per_call, "engines": summaries, "skipped": skipped,
        "ratios": {metric: _ratios(summaries, metric) for metric in ("e2e_s", "peak_rss_gb", "cold_start_s", "load_s")},
    }


def _machine() -> dict[str, Any]:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")), platform.processor())
    flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    memory_kb = next((int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal")), 0)
    versions = package_versions(("sdrt", "numpy", "onnxruntime", "openvino", "torch", "diffusers", "transformers"))
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gb": round(memory_kb / 1e6, 1), "avx512_bf16": "avx512_bf16" in flags,
            "amx": "amx_bf16" in flags.split(), "python": platform.python_version(), "versions": versions}


def _prime_bundle_caches(plan: BenchPlan, config: RunConfig, work: Path, skipped: dict[str, str]) -> None:
    """Run each sdrt engine once on `config` (a point's size and batch, 1 step), unmeasured, so that every measured
    run of that point finds the bundle's caches (verified hashes, converted models, models compiled for its shapes)
    as a deployment does after its first load at that size: cold start then means a new process on a prepared
    bundle, and the first load's one-off work is not charged to one run."""
    config = dataclasses.replace(config, steps=1)
    for engine in dict.fromkeys(e for e in plan.engines if e in SDRT_ENGINES and e not in skipped):
        logger.info("priming the bundle's caches for %s at %d px, batch %d", engine, config.width, config.batch)
        _run_once(engine, plan, config, work / "prime-images.npy")


def run_bench(plan: BenchPlan, command_line: Sequence[str]) -> dict[str, Any]:
    """Run every engine at every (size, batch) point; write results.json, results.md and chart.png to plan.out_dir."""
    plan.out_dir.mkdir(parents=True, exist_ok=True)
    started = datetime.datetime.now(datetime.timezone.utc)
    machine = _machine()
    with tempfile.TemporaryDirectory(prefix="sdrt-bench-") as work:
        skipped = _skip_reasons(plan)
        peaks = None
        if plan.floor and importlib.util.find_spec("openvino") is None:
            logger.warning("no floor: the matrix-product peaks are measured with OpenVINO (pip install 'sdrt[openvino]')")
        elif plan.floor:  # measured first, while no worker runs beside it
            logger.info("measuring this machine's matrix-product peaks")
            peaks = machine["matmul_peaks"] = matmul_peak.measure_peaks()
        points = [_bench_point(plan, size, batch, Path(work), skipped, peaks) for size in plan.sizes for batch in plan.batches]
    exports = {engine: peer_export.read_measurement(install.model) for engine, install in plan.peers.items()
               if engine in plan.engines and engine not in skipped and install.model is not None}
    results = {
        "started_utc": started.isoformat(timespec="seconds"),
        "command": shlex.join(command_line),
        "machine": machine,
        "plan": json.loads(json.dumps(dataclasses.asdict(plan), default=str)),
        "points": points,
        "peer_exports": {engine: measurement for engine, measurement in exports.items() if measurement is not None},
    }
    (plan.out_dir / "results.json").write_text(json.dumps(results, indent=2, default=str))
    write_markdown(results, plan.out_dir / "results.md")
    write_chart(results, plan.out_dir / "chart.png")
    return results
