"""fp16 ONNX variants (`sdrt export --fp16-onnx`) for the cuda-fp16 backend, on the CPU: written for the text encoder
and U-Net, recorded and verified in the manifest, fp32 at their inputs and outputs, close to the fp32 models under
onnxruntime; the backend loads them, and "auto" takes it only for bundles that have them."""
from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from sdrt.engine.backends import OnnxRuntimeCUDABackend, OnnxRuntimeCUDAFP16Backend, backend_class
from sdrt.engine.backends import onnxruntime_cuda
from sdrt.cli.main import build_parser, main
from sdrt.engine.errors import BundleError, InvalidArgumentError
from sdrt.engine.loading import component_files
from sdrt.engine.manifest import read_manifest, verify_files
from sdrt.engine.specs import FP16_DEFAULT_COMPONENTS, SPECS, Component
from sdrt.export import export_bundle
from sdrt.export import graph_cleanup
from sdrt.export.fp16_onnx import FP16_VALIDATION_RTOL
from tests.test_bundle_integrity import _flip_a_bit

# its fp16 variants' export takes 12 s to set up: in `make test-slow`, to keep `make test` within 10 minutes
pytestmark = pytest.mark.slow

PROBES = {
    Component.TEXT_ENCODER: lambda rng: {"input_ids": rng.integers(0, 49408, size=(2, 77), dtype=np.int32)},
    Component.UNET: lambda rng: {
        "sample": rng.standard_normal((2, 4, 8, 12), dtype=np.float32),
        "timestep": np.array([999.0, 10.0], np.float32),
        "encoder_hidden_states": rng.standard_normal((2, 77, 32), dtype=np.float32),
    },
}


@pytest.fixture(scope="module")
def fp16_bundle(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Models over a shrunken protobuf limit, as a full-size U-Net is in fp32 (3.4 GB) and in fp16 (1.7 GB): the
    # conversion reads external weights and the variants keep theirs in one external file too.
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(graph_cleanup, "PROTOBUF_LIMIT_BYTES", 200_000)
        return export_bundle(tiny_checkpoint, tmp_path_factory.mktemp("fp16") / "bundle", fp16_components=FP16_DEFAULT_COMPONENTS)


def _bytes(directory: Path) -> int:
    return sum(path.stat().st_size for path in directory.iterdir() if path.is_file())


def _run(path: Path, feeds: dict[str, np.ndarray]) -> np.ndarray:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def test_variants_of_the_text_encoder_and_unet_are_recorded_and_verified(fp16_bundle: Path) -> None:
    manifest = read_manifest(fp16_bundle)
    variants = {c: e.fp16 for c, e in manifest.components.items() if e.fp16 is not None}
    assert set(variants) == set(FP16_DEFAULT_COMPONENTS) == {Component.TEXT_ENCODER, Component.UNET}
    for component, entry in variants.items():
        assert entry.file == SPECS[component].fp16_filename == f"{component.value}/fp16/model.onnx"
        assert {entry.file, f"{entry.file}.data"} <= set(manifest.files) and 0 < entry.max_abs_diff
    verify_files(fp16_bundle, manifest)
    # The variants sit apart from the fp32 files, so the digest that TensorRT engines and OpenVINO caches are keyed
    # on is the one of the fp32 model alone.
    fp32_only = dataclasses.replace(manifest, files={n: f for n, f in manifest.files.items() if "/fp16/" not in n})
    for component in manifest.components:
        assert fp32_only.component_digest(component) == manifest.component_digest(component)
    variant = fp16_bundle / "unet/fp16/model.onnx"
    original = variant.read_bytes()
    _flip_a_bit(variant)
    try:
        with pytest.raises(BundleError, match=r"unet/fp16/model.onnx does not match its sha256"):
            verify_files(fp16_bundle, manifest)
    finally:
        variant.write_bytes(original)


@pytest.mark.parametrize("component", FP16_DEFAULT_COMPONENTS)
def test_variants_keep_fp32_inputs_and_outputs_and_stay_close_to_fp32(fp16_bundle: Path, component: Component) -> None:
    spec = SPECS[component]
    fp32_path, fp16_path = fp16_bundle / spec.filename, fp16_bundle / spec.fp16_filename
    graph = onnx.load(str(fp16_path), load_external_data=False).graph
    io_types = {t.name: t.type.tensor_type.elem_type for t in (*graph.input, *graph.output)}
    assert io_types == {t.name: onnx.helper.np_dtype_to_tensor_dtype(np.dtype(t.dtype)) for t in (*spec.inputs, *spec.outputs)}
    weights = {onnx.TensorProto.DataType.Name(t.data_type) for t in graph.initializer if math.prod(t.dims) > 256}
    assert weights == {"FLOAT16"}  # every real weight is fp16
    assert _bytes(fp16_path.parent) < 0.6 * _bytes(fp32_path.parent)  # each with its external weights
    feeds = PROBES[component](np.random.default_rng(3))
    expected, actual = _run(fp32_path, feeds), _run(fp16_path, feeds)
    assert actual.dtype == np.float32 and actual.shape == expected.shape
    difference = np.abs(actual - expected).max()
    assert 0 < difference <= FP16_VALIDATION_RTOL * max(1.0, np.abs(expected).max())


def test_cuda_fp16_runs_the_variants_where_the_bundle_has_them_and_cuda_never(fp16_bundle: Path, monkeypatch) -> None:
    created = []

    class FakeSession:  # onnxruntime.InferenceSession as the CUDA backends create it
        def __init__(self, path, sess_options, providers):
            ((self.provider, options),) = providers
            created.append((Path(path).relative_to(fp16_bundle).as_posix(), options["use_tf32"]))

        def get_providers(self):
            return [self.provider]

    monkeypatch.setattr(onnxruntime_cuda.ort, "InferenceSession", FakeSession)
    files = component_files(fp16_bundle, read_manifest(fp16_bundle))
    fast, exact = OnnxRuntimeCUDAFP16Backend(fp16_bundle, files), OnnxRuntimeCUDABackend(fp16_bundle, files)
    for component in (Component.TEXT_ENCODER, Component.UNET, Component.VAE_DECODER):
        fast._load(component)
        exact._load(component)
    assert created == [  # TF32 only in the fast mode, for the components it keeps in fp32
        ("text_encoder/fp16/model.onnx", "1"), ("text_encoder/model.onnx", "0"),
        ("unet/fp16/model.onnx", "1"), ("unet/model.onnx", "0"),
        ("vae_decoder/model.onnx", "1"), ("vae_decoder/model.onnx", "0"),
    ]


def test_auto_takes_cuda_fp16_only_for_bundles_with_variants(fp16_bundle: Path, tiny_bundle: Path, monkeypatch, caplog) -> None:
    for backend in (OnnxRuntimeCUDAFP16Backend, OnnxRuntimeCUDABackend):
        monkeypatch.setattr(backend, "unavailable_reason", classmethod(lambda cls: None))  # a GPU machine, TensorRT aside
    with_variants = component_files(fp16_bundle, read_manifest(fp16_bundle))
    without = component_files(tiny_bundle, read_manifest(tiny_bundle))
    assert backend_class("auto", fp16_bundle, with_variants) is OnnxRuntimeCUDAFP16Backend
    assert backend_class("exact", fp16_bundle, with_variants) is OnnxRuntimeCUDABackend  # fp16 is never exact
    with caplog.at_level(logging.WARNING, logger="sdrt.engine.backends"):
        assert backend_class("auto", tiny_bundle, without) is OnnxRuntimeCUDABackend
    assert f"not cuda-fp16: the bundle has no fp16 ONNX variants: re-export it with `sdrt export CHECKPOINT {tiny_bundle} --force --fp16-onnx`" in caplog.text


def test_export_refuses_an_unknown_fp16_component_before_writing(tiny_checkpoint: Path, tmp_path: Path) -> None:
    with pytest.raises(InvalidArgumentError, match=r"'vae' is not a component of this checkpoint; choose from \['text_encoder'") as error:
        export_bundle(tiny_checkpoint, tmp_path / "bundle", fp16_components=["unet", "vae"])
    assert error.value.parameter == "fp16_components" and list(tmp_path.iterdir()) == []


def test_cli_fp16_onnx_takes_the_default_components_or_a_list(capsys) -> None:
    parser = build_parser()
    assert parser.parse_args(["export", "ckpt", "out"]).fp16_onnx is None
    assert parser.parse_args(["export", "ckpt", "out", "--fp16-onnx"]).fp16_onnx == FP16_DEFAULT_COMPONENTS
    assert parser.parse_args(["export", "ckpt", "out", "--fp16-onnx=unet,vae_decoder"]).fp16_onnx == (Component.UNET, Component.VAE_DECODER)
    assert main(["export", "ckpt", "out", "--fp16-onnx=unet,vae"]) == 2
    assert "argument --fp16-onnx: unknown component(s) ['vae']; choose from text_encoder,text_encoder_2,unet," in capsys.readouterr().err
