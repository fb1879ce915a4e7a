"""The first-contact risks of the TensorRT path (issue #30), each decided by our code and tested with fakes: one
execution context per captured shape, checked TensorRT return values, refit naming missing weights, a failing capture
that neither masks its error nor leaks its graph, fp16 overflow probes for every engine, and a default profile sized
to the card's memory."""
from __future__ import annotations

import dataclasses
import types
from pathlib import Path

import numpy as np
import pytest

from sdrt.engine.backends.tensorrt import backend as tensorrt_backend
from sdrt.engine.backends.tensorrt import cuda as cuda_module
from sdrt.engine.backends.tensorrt import runner as runner_module
from sdrt.engine.backends.tensorrt.engines.profile import (
    UNET_ACTIVATION_MEMORY_SHARE,
    AxisRange,
    Precision,
    ShapeRange,
    default_profile,
    unet_activation_bytes,
)
from sdrt.engine.backends.tensorrt.engines.compatibility import resolve_engines
from sdrt.engine.backends.base import MemoryPolicy
from sdrt.engine.backends.tensorrt import device_loop as trt_device_loop
from sdrt.engine.errors import GpuError, InvalidArgumentError
from sdrt.engine.specs import Component
from sdrt.export.errors import EngineBuildError
from sdrt.export.tensorrt_build import PROBE_TIMESTEP, add_optimization_profile, build_engines, set_timing_cache
from tests.fake_device import FakeDevice, FakeDeviceArray
from tests.test_tensorrt_host import H100, SD15, FakeCompiler, _component_files, _digests, _Error, _fake_bundle, _x, fake_gpu  # noqa: F401

GIB = 2**30


def test_each_shape_gets_its_own_context_never_reshaped_sharing_one_scratch(fake_gpu) -> None:
    cudart, engine = fake_gpu
    runner = runner_module.EngineRunner(b"plan", cuda_module.Stream(), capture_graphs=True)
    for batch, value in [(1, 1.0), (2, 2.0), (1, 3.0), (2, 4.0), (1, 5.0)]:
        (y,) = runner.run({"x": _x(batch, value)})
        assert y.shape == (batch, 3) and (y == 2 * value + 1).all()
    assert [context.shapes["x"] for context in engine.contexts] == [(1, 3), (2, 3)]  # FakeContext refuses re-shaping
    assert all(context.captured for context in engine.contexts)
    assert len({context.scratch for context in engine.contexts}) == 1  # one activation buffer for every context
    assert engine.contexts[0].scratch[1] == engine.device_memory_size_v2


def test_a_refused_tensor_address_is_an_error_naming_the_tensor(fake_gpu) -> None:
    cudart, _ = fake_gpu
    cudart.next_ptr += 8  # every later allocation misaligned
    runner = runner_module.EngineRunner(b"plan", cuda_module.Stream(), capture_graphs=False)
    with pytest.raises(GpuError, match=r"refused the device address of tensor x \(1, 3\)"):
        runner.run({"x": _x(1, 1.0)})


@pytest.mark.parametrize("end_capture", ["fails", "returns a partial graph"])
def test_an_error_inside_capture_propagates_and_its_graph_is_destroyed(fake_gpu, end_capture: str) -> None:
    cudart, _ = fake_gpu
    stream = cuda_module.Stream()
    invalidated = _Error(2)
    cudart.cudaStreamEndCapture = (lambda s: (invalidated, None)) if end_capture == "fails" else (lambda s: (invalidated, ["partial"]))

    def work() -> None:
        raise ValueError("the first error")

    with pytest.raises(ValueError, match="the first error"):
        stream.capture(work)
    assert cudart.graphs_destroyed_templates == (0 if end_capture == "fails" else 1)
    assert cudart.graphs_instantiated == 0


def test_refit_names_the_weights_tensorrt_still_misses(fake_gpu, monkeypatch) -> None:
    refits: list[bool] = []

    class Refitter:
        def __init__(self, engine, logger) -> None:
            self.set: list[str] = []

        def set_named_weights(self, name, weights) -> bool:
            self.set.append(name)
            return True

        def get_missing_weights(self) -> list[str]:
            return [] if "conv.bias" in self.set else ["conv.bias"]  # a fused layer's partner

        def refit_cuda_engine(self) -> bool:
            refits.append(True)
            return True

    runner = runner_module.EngineRunner(b"plan", cuda_module.Stream(), capture_graphs=True)
    trt = runner_module.tensorrt()
    monkeypatch.setattr(runner_module, "tensorrt", lambda: types.SimpleNamespace(**vars(trt), Refitter=Refitter, Weights=lambda a: a))
    with pytest.raises(GpuError, match="cannot refit without 1 more weight.*: conv.bias"):
        runner.refit({"conv.weight": np.ones(3)})
    assert refits == []
    runner.refit({"conv.weight": np.ones(3), "conv.bias": np.ones(1)})
    assert refits == [True]


class _BuilderConfig:
    def __init__(self, profile_index: int = 0, cache_accepted: bool = True) -> None:
        self.profile_index, self.cache_accepted = profile_index, cache_accepted
        self.cache_given: bytes | None = None

    def add_optimization_profile(self, profile) -> int:
        return self.profile_index

    def create_timing_cache(self, data: bytes):
        return ("cache", data)

    def set_timing_cache(self, cache, ignore_mismatch: bool) -> bool:
        self.cache_given = cache[1]
        return self.cache_accepted


def test_an_invalid_optimization_profile_is_refused_naming_the_shapes(tmp_path: Path) -> None:
    shapes = {"sample": ShapeRange((1, 4, 8, 8), (2, 4, 8, 8), (1, 4, 8, 8))}
    add_optimization_profile(_BuilderConfig(profile_index=0), object(), shapes, tmp_path / "unet.onnx")
    with pytest.raises(EngineBuildError, match=r"refused the optimization profile for .*unet.onnx.*sample min \(1, 4, 8, 8\) opt \(2, 4, 8, 8\)"):
        add_optimization_profile(_BuilderConfig(profile_index=-1), object(), shapes, tmp_path / "unet.onnx")


def test_a_refused_timing_cache_is_an_error_naming_the_file(tmp_path: Path) -> None:
    cache = tmp_path / "timing.cache"
    cache.write_bytes(b"old timings")
    config = _BuilderConfig()
    set_timing_cache(config, cache)
    assert config.cache_given == b"old timings"
    with pytest.raises(EngineBuildError, match=r"refused the timing cache .*timing.cache.*delete it"):
        set_timing_cache(_BuilderConfig(cache_accepted=False), cache)


@pytest.mark.parametrize("overflowing", ["unet", "text_encoder"])
def test_fp16_unet_and_text_encoder_are_probed_and_rebuilt_in_fp32_on_overflow(tmp_path: Path, overflowing: str) -> None:
    bundle = _fake_bundle(tmp_path)
    compiler = FakeCompiler(overflow=frozenset({overflowing}))
    build_engines(bundle, compiler=compiler)
    _, index = resolve_engines(bundle, _digests(bundle), H100)
    assert {c.value: k.precision for c, k in index.engines.items()} == {
        "text_encoder": Precision.FP16, "unet": Precision.FP16, "vae_decoder": Precision.FP16, overflowing: Precision.FP32}
    unet = compiler.probed["unet"]
    assert sorted(unet) == ["encoder_hidden_states", "sample", "timestep"]
    assert (unet["timestep"] == PROBE_TIMESTEP).all() and 0.8 < unet["sample"].std() < 1.2
    ids = compiler.probed["text_encoder"]["input_ids"]
    assert ids.dtype == np.int32 and ids.min() >= 0 and ids.max() < 49408


def test_default_profile_caps_the_batch_to_the_cards_memory() -> None:
    assert default_profile(SD15).batch == AxisRange(1, 1, 4)  # no card known: not capped
    assert default_profile(SD15, 80 * GIB).batch == AxisRange(1, 1, 4)
    small = default_profile(SD15, int(14.7 * GIB))  # a "16 GB" T4
    assert small.batch.max < 4
    side = small.height.max
    # the cap is the most images whose guided batch fits the share, and one more does not
    budget = 14.7 * GIB * UNET_ACTIVATION_MEMORY_SHARE
    assert unet_activation_bytes(2 * small.batch.max, side, side, 8) <= budget < unet_activation_bytes(2 * small.batch.max + 2, side, side, 8)
    assert default_profile(SD15, 1 * GIB).batch == AxisRange(1, 1, 1)  # never below one image


# ---- the device loop's TensorRT side -------------------------------------------------------------------------------


def test_the_device_loop_runs_where_cupy_is_and_can_be_turned_off(monkeypatch) -> None:
    monkeypatch.setattr(trt_device_loop.importlib.util, "find_spec", lambda name: object() if name == "cupy" else None)
    reason = trt_device_loop.device_loop_unavailable_reason
    assert reason(MemoryPolicy.KEEP_LOADED) is None
    assert "one-at-a-time" in reason(MemoryPolicy.ONE_AT_A_TIME)
    monkeypatch.setenv(trt_device_loop.DEVICE_LOOP_ENV, "0")
    assert reason(MemoryPolicy.KEEP_LOADED) == "SDRT_TENSORRT_DEVICE_LOOP=0"
    monkeypatch.setenv(trt_device_loop.DEVICE_LOOP_ENV, "yes")
    with pytest.raises(InvalidArgumentError, match=r"SDRT_TENSORRT_DEVICE_LOOP: must be 0 \(the host loop\) or 1"):
        reason(MemoryPolicy.KEEP_LOADED)
    monkeypatch.delenv(trt_device_loop.DEVICE_LOOP_ENV)
    monkeypatch.setattr(trt_device_loop.importlib.util, "find_spec", lambda name: None)
    assert reason(MemoryPolicy.KEEP_LOADED) == "CuPy is not installed"


class _CudaRuntimeError(RuntimeError):
    pass


class _CaptureStream:
    """A CuPy stream's capture calls: ending an invalidated capture raises, as CUDA does."""

    def __init__(self) -> None:
        self.capturing, self.ended, self.invalidated = False, 0, False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def begin_capture(self) -> None:
        self.capturing = True

    def end_capture(self):
        self.capturing, self.ended = False, self.ended + 1
        if self.invalidated:
            raise _CudaRuntimeError("cudaErrorStreamCaptureInvalidated")
        return types.SimpleNamespace(launch=lambda stream: None)


def test_cupy_capture_ends_a_failed_capture_without_masking_its_error() -> None:
    cupy = types.SimpleNamespace(cuda=types.SimpleNamespace(runtime=types.SimpleNamespace(CUDARuntimeError=_CudaRuntimeError)))
    stream = _CaptureStream()
    device = trt_device_loop.CupyDevice(stream, cupy)
    device.capture(lambda: None).launch()
    assert stream.ended == 1 and not stream.capturing

    def failing() -> None:
        stream.invalidated = True
        raise ValueError("a kernel launch failed")

    with pytest.raises(ValueError, match="a kernel launch failed"):
        device.capture(failing)
    assert stream.ended == 2 and not stream.capturing  # ended, so the stream is usable again


def test_the_device_loops_unet_binding_views_its_own_slots_buffers(fake_gpu) -> None:
    """TensorRTBinding: CuPy arrays over the buffers of a slot of its own (its own context, no graph, not cached), which
    the engine reads and writes in place; released with the plan."""
    cudart, engine = fake_gpu
    device = FakeDevice()
    cupy = types.SimpleNamespace(
        cuda=types.SimpleNamespace(UnownedMemory=lambda ptr, size, owner: (ptr, size, owner), MemoryPointer=lambda memory, offset: memory),
        ndarray=lambda shape, dtype, memptr: FakeDeviceArray(
            np.frombuffer(cudart.memory[memptr[0]], dtype, int(np.prod(shape))).reshape(shape), device))
    runner = runner_module.EngineRunner(b"plan", cuda_module.Stream(), capture_graphs=True)
    binding = trt_device_loop.TensorRTUNet(lambda: runner, cupy).bind({"x": (2, 3)})
    binding.inputs["x"][...] = FakeDeviceArray(np.full((2, 3), 4.0, np.float32), device)
    binding.enqueue()
    assert binding.output.shape == (2, 3) and (binding.output.get() == 9).all()  # y = 2x + 1, in the viewed buffer
    assert cudart.graphs_instantiated == 0 and len(engine.contexts) == 1
    (y,) = runner.run({"x": _x(2, 1.0)})  # the host path's slot of the same shape: another context, with its graph
    assert (y == 3).all() and len(engine.contexts) == 2 and cudart.graphs_instantiated == 1
    assert (binding.output.get() == 9).all()  # untouched by the host path
    buffers = [ptr for ptr in cudart.memory if ptr not in {engine.contexts[0].scratch[0]}]
    binding.release()
    assert len(cudart.freed) == 2 and set(cudart.freed) <= set(buffers)


def test_the_tensorrt_backend_offers_its_device_loop_where_cupy_is(tmp_path: Path, fake_gpu, monkeypatch) -> None:
    monkeypatch.setattr(tensorrt_backend, "current_environment", lambda: H100)
    bundle = _fake_bundle(tmp_path)
    build_engines(bundle, precision=Precision.FP32, compiler=FakeCompiler(plan=b"plan"))
    assert tensorrt_backend.TensorRTBackend(bundle, _component_files(bundle)).device_loop() is None  # no CuPy here
    streams = []
    cupy = types.SimpleNamespace(cuda=types.SimpleNamespace(ExternalStream=lambda ptr: streams.append(ptr) or object()))
    monkeypatch.setattr(tensorrt_backend, "cupy_namespace", lambda: cupy)
    monkeypatch.setattr(tensorrt_backend, "device_loop_unavailable_reason", lambda memory: None)
    backend = tensorrt_backend.TensorRTBackend(bundle, _component_files(bundle))
    assert backend.device_loop() is backend and streams == [7]  # CuPy on the engines' stream
    cleared = []
    monkeypatch.setattr(backend._denoiser, "clear", lambda: cleared.append(True))
    monkeypatch.setattr(backend, "_index", dataclasses.replace(backend._index, refittable=True))
    backend.set_weights(Component.TEXT_ENCODER, {})
    assert cleared == []
    backend.set_weights(Component.UNET, {})  # new U-Net weights: the graphs captured with the old ones go
    assert cleared == [True]
