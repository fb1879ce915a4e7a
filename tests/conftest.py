"""Session fixtures: small random-weight SD checkpoints (built like real ones) and their exported bundles.

Building and exporting takes a few seconds per architecture, so each is done once per test session.
"""
from __future__ import annotations

import logging
from pathlib import Path

import pytest

from sdrt.cli.main import main
from sdrt.export import export_bundle
from sdrt.export.random_checkpoint import make_random_checkpoint, make_tiny_autoencoder

ARCHES = ("tiny", "tiny-alt")


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("checkpoints")
    return {arch: make_random_checkpoint(root / arch, arch, seed=1234) for arch in ARCHES}


@pytest.fixture(scope="session")
def bundles(checkpoints: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bundles")
    logging.getLogger("sdrt").setLevel(logging.WARNING)
    return {arch: export_bundle(path, root / arch) for arch, path in checkpoints.items()}


@pytest.fixture(scope="session")
def tiny_checkpoint(checkpoints: dict[str, Path]) -> Path:
    return checkpoints["tiny"]


@pytest.fixture(scope="session")
def tiny_bundle(bundles: dict[str, Path]) -> Path:
    return bundles["tiny"]


@pytest.fixture(scope="session")
def tiny_pipe(tiny_bundle: Path):
    import sdrt.engine

    pipe = sdrt.engine.load(tiny_bundle, backend="onnxruntime-cpu", safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def tiny_autoencoder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random AutoencoderTiny laid out as madebyollin/taesd and madebyollin/taesdxl ship theirs (the same
    architecture and config: 4 latent channels, scaling factor 1)."""
    return make_tiny_autoencoder(tmp_path_factory.mktemp("taesd") / "taesd", seed=3)


@pytest.fixture(scope="session")
def sdxl_turbo_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_random_checkpoint(tmp_path_factory.mktemp("sdxl-turbo") / "checkpoint", "tiny-sdxl-turbo", seed=99)


@pytest.fixture(scope="session")
def sdxl_turbo_bundle(sdxl_turbo_checkpoint: Path, tiny_autoencoder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The SDXL-Turbo checkpoint exported with the tiny autoencoder as TAESDXL, as SDXL-Turbo demos pair them (one
    export serves the few-step and the tiny-decoder tests)."""
    out = tmp_path_factory.mktemp("sdxl-turbo-bundle") / "bundle"
    assert main(["export", str(sdxl_turbo_checkpoint), str(out), "--tiny-vae", str(tiny_autoencoder)]) == 0
    return out
