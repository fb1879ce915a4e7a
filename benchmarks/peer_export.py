"""A peer's own export of a checkpoint (`optimum-cli export`, run from the peer's virtual environment), timed and
its peak memory measured, the figures written beside the export for `sdrt bench` to report with the peer.

    python -m sdrt.benchmarks.peer_export {openvino,onnx} CHECKPOINT OUT --python VENV/bin/python

OUT appears only once the export succeeded (it is written to OUT.partial first), so `make bench` can test for it.
OpenVINO GenAI and optimum-intel both run from the OpenVINO export; optimum-onnxruntime from the ONNX one.
"""
from __future__ import annotations

import argparse
import dataclasses
import enum
import json
import logging
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sdrt.benchmarks.timed_process import GNU_TIME, measure
from sdrt.engine.atomic import atomic_file

logger = logging.getLogger(__name__)


class ExportFormat(str, enum.Enum):
    OPENVINO = "openvino"  # OpenVINO IR: optimum-intel's OVStableDiffusionPipeline, OpenVINO GenAI
    ONNX = "onnx"  # optimum-onnxruntime's ORTStableDiffusionPipeline


def export_command(python: Path, export_format: ExportFormat, checkpoint: Path, out: Path) -> list[str]:
    """optimum-cli (beside `python`, in the peer's venv) exporting `checkpoint` for text-to-image to `out`."""
    return [str(Path(python).parent / "optimum-cli"), "export", export_format.value, "--model", str(checkpoint),
            "--task", "text-to-image", str(out)]


def measurement_file(export_dir: Path) -> Path:
    """Where the export of `export_dir` is recorded: beside it, OUT.export.json."""
    return export_dir.with_name(f"{export_dir.name}.export.json")


def read_measurement(export_dir: Path) -> dict[str, Any] | None:
    """The recorded export of `export_dir` (timed_process.Measurement as a dict), None if it was not measured."""
    path = measurement_file(export_dir)
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def export(python: Path, export_format: ExportFormat, checkpoint: Path, out: Path) -> dict[str, Any]:
    """Export `checkpoint` to `out` (replaced) under GNU time and record the measurement beside it."""
    staging = out.with_name(f"{out.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    command = export_command(python, export_format, checkpoint, staging)
    log = out.with_name(f"{out.name}.export.log")
    measurement = dataclasses.asdict(measure(f"optimum-cli export {export_format.value}", command, log))
    measurement["command"] = export_command(python, export_format, checkpoint, out)  # as a person would rerun it
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)
    with atomic_file(measurement_file(out)) as file:
        file.write_text(json.dumps(measurement, indent=2) + "\n", encoding="utf-8")
    return measurement


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sdrt.benchmarks.peer_export", description=__doc__.split("\n\n")[0])
    parser.add_argument("format", choices=[f.value for f in ExportFormat])
    parser.add_argument("checkpoint", type=Path, help="a diffusers checkpoint")
    parser.add_argument("out", type=Path, help="the export's directory")
    parser.add_argument("--python", type=Path, required=True, help="python of the peer's venv (optimum-cli beside it)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if shutil.which(GNU_TIME) is None:
        parser.error(f"{GNU_TIME} (GNU time) is needed: apt-get install time")
    export(args.python, ExportFormat(args.format), args.checkpoint.resolve(), args.out.resolve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
