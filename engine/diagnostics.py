"""What this machine offers sdrt, for `sdrt doctor` and the GPU validation report: package versions, onnxruntime's
execution providers, the CUDA device, and every backend's availability with the reason when it is unavailable."""
from __future__ import annotations

import dataclasses
import platform
from collections.abc import Sequence
from importlib import metadata
from typing import Any

import onnxruntime as ort

from sdrt.engine.backends import AUTO, BACKENDS, EXACT, Backend, backend_class
from sdrt.engine.cuda_device import CudaDevice, cuda_device, cuda_device_unavailable_reason
from sdrt.engine.errors import SdrtError
from sdrt.engine.version import SDRT_VERSION

#: distributions that decide which backends run, and the peers the benchmarks compare with
PACKAGES = (
    "numpy", "onnxruntime", "onnxruntime-gpu", "openvino", "tensorrt", "cuda-python", "torch", "diffusers", "transformers",
)


def package_versions(packages: Sequence[str] = PACKAGES) -> dict[str, str | None]:
    """Installed version of each distribution, None where it is not installed."""
    versions: dict[str, str | None] = {}
    for package in packages:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return versions


def _choice(name: str) -> str:
    """The backend "auto" or "exact" takes here, or why none can run. Backends that run only bundles prepared for
    them (TensorRT engines, an int8 U-Net) are named with the one taken for other bundles."""
    for_prepared: list[str] = []
    for candidate in (b for b in BACKENDS if name == AUTO or b.exact):
        if candidate.unavailable_reason() is not None:
            continue
        if candidate.bundle_unavailable_reason.__func__ is not Backend.bundle_unavailable_reason.__func__:
            for_prepared.append(candidate.name)
            continue
        return " / ".join([f"{n} (bundles prepared for it)" for n in for_prepared] + [candidate.name])
    try:
        return backend_class(name).name
    except SdrtError as exc:
        return f"none ({exc})"


def environment() -> dict[str, Any]:
    """Everything `sdrt doctor` reports, as JSON-ready data."""
    try:
        device = cuda_device()
    except SdrtError as exc:  # the driver found a device but could not describe it
        device, device_error = None, str(exc)
    else:
        device_error = cuda_device_unavailable_reason()
    return {
        "sdrt": SDRT_VERSION,
        "python": platform.python_version(),
        "platform": f"{platform.system()} {platform.machine()}",
        "packages": package_versions(),
        "onnxruntime_providers": ort.get_available_providers(),
        "cuda_device": dataclasses.asdict(device) if device is not None else None,
        "cuda_device_error": device_error,
        "backends": {backend.name: backend.unavailable_reason() for backend in BACKENDS},
        AUTO: _choice(AUTO),
        EXACT: _choice(EXACT),
    }


def describe(report: dict[str, Any]) -> list[str]:
    """`environment()` as lines for the terminal."""
    device = report["cuda_device"]
    installed = [f"{name} {version}" for name, version in report["packages"].items() if version is not None]
    missing = [name for name, version in report["packages"].items() if version is None]
    width = max(len(name) for name in report["backends"])
    return [
        f"sdrt {report['sdrt']} on Python {report['python']} ({report['platform']})",
        "CUDA device: " + (CudaDevice(**device).describe() if device else f"none: {report['cuda_device_error']}"),
        "installed: " + ", ".join(installed) + (f"; not installed: {', '.join(missing)}" if missing else ""),
        "onnxruntime execution providers: " + ", ".join(report["onnxruntime_providers"]),
        "backends, fastest first:",
        *(f"  {name:<{width}}  {'available' if reason is None else 'unavailable: ' + reason}" for name, reason in report["backends"].items()),
        f"backend \"auto\" takes {report[AUTO]}; \"exact\" takes {report[EXACT]} (a bundle may need engines or fp16 variants for a GPU backend)",
    ]
