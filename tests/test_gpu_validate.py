"""`python -m sdrt.benchmarks.gpu_validate` / `sdrt doctor --gpu`: its steps, checks, report and exit status on the CPU
with fake actions (a fake machine whose "images" are the reference's plus a chosen offset per engine), `sdrt doctor`,
the driver's device description; and, marked `gpu`, the tiny validation end to end on a real GPU."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

import sdrt.engine.cuda_device as cuda_device
from sdrt.benchmarks import device_step_check, gpu_validate, worker
from sdrt.benchmarks.gpu_validate import (
    EXIT_FAILED,
    EXIT_NO_DEVICE,
    EXIT_PASSED,
    REFERENCE_ENGINE,
    SD15,
    TIMED_ENGINES,
    TINY,
    Step,
    ValidationPlan,
    plan_for,
    run_steps,
    validate_command,
)
from sdrt.engine import diagnostics
from sdrt.engine.backends import BACKENDS, OnnxRuntimeCUDABackend, TensorRTBackend
from sdrt.cli.main import main
from sdrt.engine.backends.tensorrt.engines.profile import Precision
from sdrt.engine.cuda_device import CudaDevice
from sdrt.engine.errors import BackendUnavailableError, GpuError, InvalidArgumentError
from sdrt.engine.manifest import ModelConfig
from sdrt.export.errors import EngineBuildError
from tests.fake_device import FakeDevice
from tests.test_tensorrt_host import _fake_bundle

H100 = CudaDevice("NVIDIA H100 80GB HBM3", 80 * 2**30)
# A model whose default image is 32 px: small fake images.
SMALL = ModelConfig(latent_channels=4, vae_scale_factor=8, vae_scaling_factor=0.18215, sample_size=4, text_hidden_size=32, max_image_size=2048)
TINY_STEPS = [f"tiny/{name}" for name in (
    "checkpoint", "export", "engines-fp32", "engines-fp16", "reference", "parity-tensorrt-fp32", "parity-tensorrt-fp16",
    "parity-cuda", "parity-cuda-fp16", "timing")]
WORKER_FAILURE = ("sdrt-cuda failed (exit 1):\nTraceback (most recent call last):\n  ...\n"
                  "sdrt.engine.errors.BackendUnavailableError: backend 'cuda' is unavailable: onnxruntime has no CUDA execution provider")


class FakeActions:
    """Each engine's images are the reference's plus OFFSETS[engine] (TensorRT's by the precision of the engines the
    bundle's index holds, which build_engines sets, as the real build does); end-to-end seconds from E2E_S."""

    OFFSETS = {REFERENCE_ENGINE: 0.0, "sdrt-cuda": 1e-6, "sdrt-cuda-fp16": 3e-3, Precision.FP32: 1e-4, Precision.FP16: 1e-2}
    E2E_S = {"sdrt-tensorrt": 1.0, "sdrt-tensorrt-no-graphs": 1.5, "sdrt-cuda-fp16": 2.0, "sdrt-cuda": 4.0, "diffusers-fp16-cuda": 2.5}

    def __init__(self, offsets=None, failing_builds=(), failing_engines=(), diffusers_reason="torch 2.13.0+cpu has no CUDA device",
                 interrupt_builds=False) -> None:
        self.offsets = {**self.OFFSETS, **(offsets or {})}
        self.failing_builds = set(failing_builds)
        self.failing_engines = set(failing_engines)
        self.diffusers_reason = diffusers_reason
        self.interrupt_builds = interrupt_builds
        self.selected: Precision | None = None
        self.runs: list[tuple[str, str, Precision | None]] = []  # (engine, model folder, TensorRT precision selected)

    def make_checkpoint(self, arch, out_dir):
        out_dir.mkdir(parents=True)
        (out_dir / "model_index.json").write_text(json.dumps({"arch": arch}))

    def export_bundle(self, checkpoint, bundle):
        assert (checkpoint / "model_index.json").is_file()
        _fake_bundle(bundle.parent, SMALL)

    def build_engines(self, bundle, profile, precision):
        if self.interrupt_builds:
            raise KeyboardInterrupt
        if precision in self.failing_builds:
            raise EngineBuildError(f"TensorRT could not build an engine from {bundle}/unet/model.onnx")
        self.selected = precision
        return bundle / ".cache/tensorrt/h100"

    def run_engine(self, engine, model, config, images_out):
        self.runs.append((engine, model.name, self.selected if engine.startswith("sdrt-tensorrt") else None))
        if engine in self.failing_engines:
            raise RuntimeError(WORKER_FAILURE.replace("sdrt-cuda", engine, 1))
        reference = np.random.default_rng(0).uniform(size=(config.batch, config.height, config.width, 3)).astype(np.float32)
        offset = self.offsets[self.selected] if engine.startswith("sdrt-tensorrt") else self.offsets.get(engine, 0.0)
        np.save(images_out, reference + np.float32(offset))
        return {"engine": engine, "backend": engine.removeprefix("sdrt-"), "load_s": 0.1, "cold_start_s": 0.5, "warm_first_s": 0.25,
                "e2e_s": self.E2E_S.get(engine, 9.0), "images_per_s": 1.0, "timings": {"unet": 0.5, "guidance_and_scheduler": 0.125}, "unet_calls": config.steps + 1,
                "peak_rss_gb": 1.0}

    def engine_unavailable_reason(self, engine):
        return self.diffusers_reason if engine.startswith("diffusers") else None


@pytest.fixture
def fake_gpu_machine(monkeypatch):
    """A machine whose driver reports an H100 (the rest of the environment is this one's)."""
    monkeypatch.setattr(gpu_validate, "cuda_device_unavailable_reason", lambda: None)
    monkeypatch.setattr(gpu_validate, "cuda_device", lambda: H100)
    real_environment = diagnostics.environment
    monkeypatch.setattr(gpu_validate, "environment", lambda: {
        **real_environment(), "cuda_device": dataclasses.asdict(H100), "cuda_device_error": None})


def _validate(out: Path, actions: FakeActions, **options) -> tuple[int, dict, str]:
    options = {"full": False, "steps": 2, "runs": 2, **options}
    status = validate_command(out, command=["sdrt", "doctor", "--gpu", str(out)], actions=actions, **options)
    report = json.loads((out / "report.json").read_text())
    return status, report, (out / "report.md").read_text()


def _results(report: dict) -> dict[str, dict]:
    return {result["name"]: result for result in report["results"]}


# ---- no device ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("entry", ["module", "doctor"])
def test_without_a_cuda_device_it_exits_2_with_one_line_and_runs_nothing(tmp_path: Path, monkeypatch, capsys, entry) -> None:
    reason = "no CUDA device: the NVIDIA driver (libcuda.so.1) is not installed"
    monkeypatch.setattr(gpu_validate, "cuda_device_unavailable_reason", lambda: reason)
    out = tmp_path / "out"
    status = gpu_validate.main([str(out), "--full"]) if entry == "module" else main(["doctor", "--gpu", str(out)])
    assert status == EXIT_NO_DEVICE
    captured = capsys.readouterr()
    assert captured.err == f"sdrt: cannot validate the GPU path here: {reason}\n" and captured.out == ""
    assert not out.exists()


# ---- the plan -----------------------------------------------------------------------------------------------------
def test_full_size_is_the_default_on_gpus_with_16_gb(tmp_path: Path) -> None:
    assert plan_for(tmp_path, H100, None, 20, 3).models == (TINY, SD15)
    assert plan_for(tmp_path, CudaDevice("Tesla T4", 15_835_398_144), None, 20, 3).models == (TINY, SD15)  # a "16 GB" card
    assert plan_for(tmp_path, CudaDevice("NVIDIA GeForce RTX 3060", 12_622_168_064), None, 20, 3).models == (TINY,)
    assert plan_for(tmp_path, H100, False, 20, 3).models == (TINY,)
    assert plan_for(tmp_path, CudaDevice("small", 2**30), True, 20, 3).models == (TINY, SD15)
    with pytest.raises(InvalidArgumentError, match="must be an integer >= 1, got 0") as error:
        ValidationPlan(tmp_path, (TINY,), steps=0)
    assert error.value.parameter == "steps"


def test_steps_are_planned_per_model_after_what_they_need(tmp_path: Path) -> None:
    steps = gpu_validate.validation_steps(ValidationPlan(tmp_path, (TINY, SD15)), FakeActions())
    assert [s.name for s in steps] == TINY_STEPS + [name.replace("tiny/", "sd15/") for name in TINY_STEPS]
    needs = {s.name: s.needs for s in steps}
    assert needs["sd15/parity-tensorrt-fp32"] == ("sd15/reference", "sd15/engines-fp32")
    assert needs["tiny/parity-cuda"] == ("tiny/reference",)
    with pytest.raises(ValueError, match=r"step b needs \['a'\], which do not come before it"):
        run_steps([Step("b", "second", dict, needs=("a",)), Step("a", "first", dict)])


# ---- runs -------------------------------------------------------------------------------------------------------
def test_a_passing_validation_reports_parity_and_timings_and_exits_0(tmp_path: Path, fake_gpu_machine, capsys) -> None:
    actions = FakeActions()
    status, report, md = _validate(tmp_path / "out", actions)
    assert status == EXIT_PASSED and report["exit_status"] == EXIT_PASSED and report["complete"]
    results = _results(report)
    assert list(results) == TINY_STEPS and {r["status"] for r in results.values()} == {"passed"}
    assert report["counts"] == {"passed": 10, "failed": 0, "skipped": 0}
    # Each TensorRT parity run used the engines of its precision, though fp16 ones were built last.
    assert [precision for engine, _, precision in actions.runs[:3] if engine == "sdrt-tensorrt"] == [Precision.FP32, Precision.FP16]
    assert results["tiny/parity-tensorrt-fp32"]["details"]["max_abs_diff"] == pytest.approx(1e-4, rel=1e-2)
    assert results["tiny/parity-tensorrt-fp16"]["details"]["psnr_db"] == pytest.approx(40.0, abs=0.1)
    assert results["tiny/reference"]["details"]["size"] == "32x32"
    timing = results["tiny/timing"]["details"]
    timed = [e for e in TIMED_ENGINES if not e.startswith("diffusers")]
    assert list(timing["engines"]) == timed and timing["skipped"] == {"diffusers-fp16-cuda": "torch 2.13.0+cpu has no CUDA device"}
    assert [engine for engine, _, _ in actions.runs[5:]] == timed * 2  # interleaved rounds, fresh process each
    assert {precision for engine, _, precision in actions.runs[5:] if engine.startswith("sdrt-tensorrt")} == {Precision.FP16}
    assert timing["cuda_graph_speedup"] == pytest.approx(1.5) and timing["engines"]["sdrt-tensorrt"]["runs"] == 2
    assert "| tensorrt-fp16 | tensorrt | 0.01 | 40 | PSNR >= 30 dB | passed |" in md
    assert "CUDA graphs: TensorRT end to end without them ÷ with them = 1.50×" in md
    assert timing["host_share_of_denoise"]["sdrt-tensorrt"] == pytest.approx(0.2)  # 0.125 / (0.125 + 0.5)
    assert "sdrt-tensorrt 20.0%" in md
    assert "- diffusers-fp16-cuda skipped: torch 2.13.0+cpu has no CUDA device" in md
    assert f"GPU: {H100.name}, 80.0 GiB" in md and "Result: 10 passed, 0 failed, 0 skipped (exit status 0)" in md
    assert capsys.readouterr().out == f"{tmp_path / 'out' / 'report.md'}: 10 passed, 0 failed, 0 skipped\n"
    assert not list((tmp_path / "out").glob(".*partial"))


def test_a_rerun_reuses_the_checkpoint_and_bundle(tmp_path: Path, fake_gpu_machine) -> None:
    _validate(tmp_path / "out", FakeActions())
    status, report, _ = _validate(tmp_path / "out", FakeActions())
    assert status == EXIT_PASSED
    assert _results(report)["tiny/checkpoint"]["details"]["reused"] and _results(report)["tiny/export"]["details"]["reused"]


def test_a_failing_step_is_recorded_and_the_rest_go_on(tmp_path: Path, fake_gpu_machine) -> None:
    status, report, md = _validate(tmp_path / "out", FakeActions(failing_builds={Precision.FP32}))
    assert status == EXIT_FAILED and report["exit_status"] == EXIT_FAILED
    results = _results(report)
    assert results["tiny/engines-fp32"]["status"] == "failed"
    assert results["tiny/engines-fp32"]["error"].startswith("EngineBuildError: TensorRT could not build an engine from ")
    assert results["tiny/parity-tensorrt-fp32"]["status"] == "skipped"
    assert results["tiny/parity-tensorrt-fp32"]["error"] == "needs tiny/engines-fp32, which did not pass"
    assert [results[f"tiny/{name}"]["status"] for name in ("parity-tensorrt-fp16", "parity-cuda", "parity-cuda-fp16", "timing")] == ["passed"] * 4
    assert report["counts"] == {"passed": 8, "failed": 1, "skipped": 1}
    assert "| tiny/engines-fp32 | failed |" in md and "Result: 8 passed, 1 failed, 1 skipped (exit status 1)" in md


@pytest.mark.parametrize(("offsets", "step", "message"), [
    ({"sdrt-cuda": 0.02}, "parity-cuda", "cuda: max abs pixel difference 0.02 is above 0.005"),
    ({Precision.FP32: 0.01}, "parity-tensorrt-fp32", "tensorrt-fp32: max abs pixel difference 0.01 is above 0.005"),
    ({"sdrt-cuda-fp16": 0.05}, "parity-cuda-fp16", "cuda-fp16: PSNR 26.0 dB is below 30 dB"),
    ({Precision.FP16: float("nan")}, "parity-tensorrt-fp16", "tensorrt-fp16: PSNR nan dB is below 30 dB"),
])
def test_images_outside_the_tolerance_fail_with_their_measurements(tmp_path: Path, fake_gpu_machine, offsets, step, message) -> None:
    status, report, _ = _validate(tmp_path / "out", FakeActions(offsets=offsets), runs=1)
    results = _results(report)
    assert status == EXIT_FAILED and [n for n, r in results.items() if r["status"] != "passed"] == [f"tiny/{step}"]
    failed = results[f"tiny/{step}"]
    assert failed["status"] == "failed" and failed["error"] == message
    assert set(failed["details"]) >= {"max_abs_diff", "psnr_db", "tolerance", "backend"}


def test_timing_keeps_the_other_engines_when_one_fails_and_compares_with_diffusers(tmp_path: Path, fake_gpu_machine) -> None:
    actions = FakeActions(failing_engines={"sdrt-cuda"}, diffusers_reason=None)
    status, report, md = _validate(tmp_path / "out", actions)
    results = _results(report)
    assert status == EXIT_FAILED and results["tiny/parity-cuda"]["status"] == "failed"
    timing = results["tiny/timing"]
    assert timing["status"] == "failed" and timing["error"] == "sdrt-cuda failed"
    expected_error = "sdrt.engine.errors.BackendUnavailableError: backend 'cuda' is unavailable: onnxruntime has no CUDA execution provider"
    assert timing["details"]["failed"] == {"sdrt-cuda": expected_error}
    assert set(timing["details"]["engines"]) == set(TIMED_ENGINES) - {"sdrt-cuda"}
    assert timing["details"]["vs_diffusers_fp16"] == pytest.approx({"sdrt-tensorrt": 0.4, "sdrt-tensorrt-no-graphs": 0.6, "sdrt-cuda-fp16": 0.8})
    assert {(engine, folder) for engine, folder, _ in actions.runs if engine.startswith("diffusers")} == {("diffusers-fp16-cuda", "checkpoint")}
    assert {folder for engine, folder, _ in actions.runs if engine.startswith("sdrt")} == {"bundle"}
    assert f"- sdrt-cuda failed: {expected_error}" in md and "sdrt-tensorrt 0.40×" in md


def test_an_interrupted_validation_leaves_the_report_so_far(tmp_path: Path, fake_gpu_machine) -> None:
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        validate_command(out, full=False, steps=2, runs=1, command=["sdrt"], actions=FakeActions(interrupt_builds=True))
    report = json.loads((out / "report.json").read_text())
    assert not report["complete"] and [r["name"] for r in report["results"]] == ["tiny/checkpoint", "tiny/export"]
    assert "**incomplete**" in (out / "report.md").read_text()


# ---- sdrt doctor and the device -----------------------------------------------------------------------------------
def test_doctor_lists_every_backend_with_the_reason_it_is_unavailable(monkeypatch, capsys) -> None:
    monkeypatch.setattr(OnnxRuntimeCUDABackend, "unavailable_reason", classmethod(lambda cls: "cuda is missing here"))
    assert main(["doctor"]) == 0
    lines = capsys.readouterr().out.splitlines()
    for backend in BACKENDS:
        line = next(line for line in lines if line.strip().startswith(f"{backend.name} "))
        reason = backend.unavailable_reason()
        assert line.endswith("available" if reason is None else f"unavailable: {reason}")
    assert any(line.strip() == "cuda             unavailable: cuda is missing here" for line in lines)
    assert lines[-1] == "validate the GPU path end to end: sdrt doctor --gpu [OUT_DIR]"


def test_doctor_refuses_validation_options_without_gpu(capsys) -> None:
    assert main(["doctor", "--steps", "5", "somewhere"]) == 2
    assert capsys.readouterr().err == "sdrt: error: OUT_DIR, --steps: validation options need --gpu\n"


class _FakeDriver:
    def __init__(self, memory_status: int = 0) -> None:
        self.memory_status = memory_status

    def cuInit(self, flags):
        return 0

    def cuDeviceGetCount(self, count):
        count._obj.value = 1
        return 0

    def cuDeviceGet(self, device, ordinal):
        device._obj.value = ordinal
        return 0

    def cuDeviceGetName(self, buffer, length, device):
        buffer.value = b"NVIDIA H100 80GB HBM3"
        return 0

    def cuDeviceTotalMem_v2(self, memory, device):
        memory._obj.value = 85_045_870_592
        return self.memory_status


@pytest.mark.parametrize("memory_status", [0, 1])
def test_cuda_device_names_the_gpu_and_its_memory(monkeypatch, memory_status) -> None:
    driver = _FakeDriver(memory_status)
    monkeypatch.setattr(cuda_device.ctypes, "CDLL", lambda name: driver)
    cuda_device.cuda_device_unavailable_reason.cache_clear()
    try:
        if memory_status:
            with pytest.raises(GpuError, match="cuDeviceTotalMem_v2 failed with CUresult 1"):
                cuda_device.cuda_device()
        else:
            assert cuda_device.cuda_device() == CudaDevice("NVIDIA H100 80GB HBM3", 85_045_870_592)
    finally:
        cuda_device.cuda_device_unavailable_reason.cache_clear()


def test_every_engine_the_validation_runs_is_a_worker_engine() -> None:
    engines = {REFERENCE_ENGINE, *TIMED_ENGINES, *(case.engine for case in gpu_validate.PARITY_CASES)}
    assert engines <= set(worker.ENGINES)
    assert {worker.SDRT_ENGINES[e].backend for e in engines if e in worker.SDRT_ENGINES} == {
        "onnxruntime-cpu", "tensorrt", "cuda", "cuda-fp16"}
    assert not worker.SDRT_ENGINES[gpu_validate.NO_GRAPHS_ENGINE].cuda_graphs and worker.SDRT_ENGINES[gpu_validate.GRAPHS_ENGINE].cuda_graphs


# ---- on a real GPU ------------------------------------------------------------------------------------------------
GPU_REASON = TensorRTBackend.unavailable_reason() or OnnxRuntimeCUDABackend.unavailable_reason()


@pytest.mark.gpu
@pytest.mark.skipif(GPU_REASON is not None, reason=f"the GPU path cannot run here: {GPU_REASON}")
def test_tiny_validation_passes_end_to_end_on_this_gpu(tmp_path: Path) -> None:
    status = gpu_validate.main([str(tmp_path / "out"), "--no-full", "--steps", "4", "--runs", "1"])
    report = json.loads((tmp_path / "out/report.json").read_text())
    failures = {r["name"]: r["error"] for r in report["results"] if r["status"] != "passed"}
    assert status == EXIT_PASSED and failures == {}, failures
    assert [r["name"] for r in report["results"]] == TINY_STEPS
    assert _results(report)["tiny/timing"]["details"]["cuda_graph_speedup"] > 0


# ---- --quick ------------------------------------------------------------------------------------------------------

QUICK_DEVICE_STEPS = ["device/cupy", *(f"device/step-{name}" for name in device_step_check.CHECKED_SCHEDULERS)]
QUICK_TINY_STEPS = ["tiny/requirements", *(f"tiny/{name}" for name in gpu_validate.QUICK_MODEL_STEPS)]


class _StaleGraphDevice(FakeDevice):
    """A device whose graphs replay nothing: the latents of the capture's request, not the new one's."""

    def capture(self, work):
        graph = super().capture(work)
        graph.nodes = []
        return graph


def _no_cupy():
    raise BackendUnavailableError("CuPy is not installed (pip install cupy-cuda12x)")


def test_quick_plans_the_device_checks_then_the_tiny_models_tensorrt_parity(tmp_path: Path) -> None:
    plan = plan_for(tmp_path, H100, full=True, steps=8, runs=1, quick=True)
    assert plan.quick and plan.models == (TINY,)
    steps = gpu_validate.validation_steps(plan, FakeActions())
    assert [s.name for s in steps] == [*QUICK_DEVICE_STEPS, *QUICK_TINY_STEPS]
    by_name = {s.name: s for s in steps}
    assert by_name["device/step-lms"].needs == ("device/cupy",)
    assert "tiny/requirements" in by_name["tiny/parity-tensorrt-fp32"].needs


def test_quick_passes_with_a_faithful_device_and_tensorrt(tmp_path: Path, fake_gpu_machine, monkeypatch) -> None:
    monkeypatch.setattr(gpu_validate, "_cupy_device", FakeDevice)
    monkeypatch.setattr(gpu_validate, "libraries_unavailable_reason", lambda: None)
    status, report, markdown = _validate(tmp_path / "out", FakeActions(), steps=None, quick=True)
    results = _results(report)
    assert status == EXIT_PASSED and report["plan"]["quick"] and report["plan"]["steps"] == gpu_validate.QUICK_STEPS
    assert [r["status"] for r in report["results"]] == ["passed"] * len(results)
    euler_a = results["device/step-euler_a"]["details"]
    assert euler_a["max_relative_diff"] == 0.0 and euler_a["unet_calls"] == gpu_validate.QUICK_STEPS
    assert len(euler_a["per_request_relative_diff"]) == device_step_check.REQUESTS
    assert f"| device/step-pndm | passed |" in markdown and "graphs: max diff 0 of the latents' scale" in markdown
    assert "parity-tensorrt-fp32" in markdown and "timing" not in results


def test_quick_fails_a_device_whose_graphs_do_not_replay(tmp_path: Path, fake_gpu_machine, monkeypatch) -> None:
    monkeypatch.setattr(gpu_validate, "_cupy_device", _StaleGraphDevice)
    monkeypatch.setattr(gpu_validate, "libraries_unavailable_reason", lambda: None)
    status, report, _ = _validate(tmp_path / "out", FakeActions(), quick=True)
    step = _results(report)["device/step-ddim"]
    assert status == EXIT_FAILED and step["status"] == "failed"
    assert "the device loop's latents differ from numpy's" in step["error"] and step["details"]["max_relative_diff"] > 1e-2
    assert step["details"]["per_request_relative_diff"][0] == 0.0  # the eager first request was right


def test_quick_without_cupy_or_tensorrt_skips_saying_what_is_missing(tmp_path: Path, fake_gpu_machine, monkeypatch) -> None:
    monkeypatch.setattr(gpu_validate, "_cupy_device", _no_cupy)
    monkeypatch.setattr(gpu_validate, "libraries_unavailable_reason", lambda: "tensorrt is not installed (pip install 'sdrt[gpu]')")
    real_find_spec = gpu_validate.importlib.util.find_spec
    monkeypatch.setattr(gpu_validate.importlib.util, "find_spec", lambda name: None if name in ("diffusers", "PIL") else real_find_spec(name))
    status, report, markdown = _validate(tmp_path / "out", FakeActions(), quick=True)
    results = _results(report)
    assert status == EXIT_PASSED and report["counts"] == {"passed": 0, "failed": 0, "skipped": len(results)}
    assert results["device/cupy"]["error"] == "CuPy is not installed (pip install cupy-cuda12x)"
    assert results["device/step-euler"]["error"] == "needs device/cupy, which did not pass"
    assert results["tiny/requirements"]["error"] == ("tensorrt is not installed (pip install 'sdrt[gpu]'); not installed: "
                                                    "diffusers (the checkpoint), PIL (the pipeline (pillow))")
    assert "needs tiny/requirements" in results["tiny/checkpoint"]["error"]
    assert "| device/cupy | skipped | 0.0 | CuPy is not installed" in markdown


def test_quick_is_an_option_of_the_module(tmp_path: Path, fake_gpu_machine, monkeypatch) -> None:
    seen = {}
    monkeypatch.setattr(gpu_validate, "run_validation", lambda plan, actions, command: seen.update(plan=plan, command=command) or [])
    assert gpu_validate.main([str(tmp_path), "--quick"]) == EXIT_PASSED
    assert seen["plan"].quick and seen["plan"].steps == gpu_validate.QUICK_STEPS and seen["command"][-1] == "--quick"


def test_quick_fails_a_device_that_cannot_capture_even_when_its_eager_results_are_right(tmp_path: Path, fake_gpu_machine,
                                                                                        monkeypatch) -> None:
    class NoCapture(FakeDevice):
        def capture(self, work):
            raise RuntimeError("cudaErrorStreamCaptureUnsupported")

    monkeypatch.setattr(gpu_validate, "_cupy_device", NoCapture)
    status, report, _ = _validate(tmp_path / "out", FakeActions(), quick=True)
    step = _results(report)["device/step-euler"]
    assert status == EXIT_FAILED and step["details"]["max_relative_diff"] == 0.0
    assert step["error"] == "euler: 0 CUDA graphs captured for 2 steps: RuntimeError: cudaErrorStreamCaptureUnsupported"
