"""Peak memory and time of building a bundle: `sdrt export` and `sdrt quantize`, beside the peers' own exports of the
same checkpoint (optimum-intel's OpenVINO export, optimum's ONNX export), each measured by `/usr/bin/time -v` in a
process of its own, one at a time.

    python -m sdrt.benchmarks.build_memory CHECKPOINT WORKDIR [--quantize-size 256]
        [--optimum-intel-python VENV/bin/python] [--optimum-python VENV/bin/python] [--out RUN.json] [--results EXPORT.md]

The peers run from their own virtual environments (optimum-intel and optimum-onnx each need transformers 4.x); a
peer whose python is not given is left out. WORKDIR receives the bundle and the peers' exports (replaced on each run).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import logging
import shlex
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sdrt.benchmarks.bench import _machine
from sdrt.benchmarks.peer_export import ExportFormat, export_command
from sdrt.benchmarks.timed_process import GNU_TIME, Measurement, measure
from sdrt.engine.atomic import atomic_file

logger = logging.getLogger(__name__)


def _fresh(path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    return path


def run(checkpoint: Path, workdir: Path, quantize_size: int | None, optimum_intel_python: Path | None,
        optimum_python: Path | None) -> list[Measurement]:
    workdir.mkdir(parents=True, exist_ok=True)
    sdrt = [sys.executable, "-m", "sdrt.cli"]
    bundle = _fresh(workdir / "bundle")
    # export's own int8 step left out: quantization is measured as its own step
    steps = [("sdrt export --no-quantize", [*sdrt, "export", str(checkpoint), str(bundle), "--no-quantize"])]
    if quantize_size is not None:
        steps.append((f"sdrt quantize --size {quantize_size}", [*sdrt, "quantize", str(bundle), "--size", str(quantize_size)]))
    for label, python, export_format in (("optimum-intel (OpenVINO IR)", optimum_intel_python, ExportFormat.OPENVINO),
                                         ("optimum (ONNX)", optimum_python, ExportFormat.ONNX)):
        if python is not None:
            out = _fresh(workdir / f"optimum-{export_format.value}")
            steps.append((label, export_command(python, export_format, checkpoint, out)))
    return [measure(name, command, workdir / f"{index}.log") for index, (name, command) in enumerate(steps)]


def markdown(results: dict[str, Any]) -> str:
    machine = results["machine"]
    reference = next((m for m in results["measurements"] if m["name"].startswith("optimum-intel")), None)
    lines = [
        "# Building a bundle: peak memory and time",
        "",
        f"- Run: {results['date']}, `{results['command']}`",
        f"- Machine: {machine['cpu']}, {machine['cores']} cores, {machine['memory_gb']} GB; Python {machine['python']}, "
        + ", ".join(f"{k} {v}" for k, v in machine["versions"].items() if v),
        f"- Checkpoint: `{results['checkpoint']}`. Each step ran alone in a process of its own under `/usr/bin/time -v`; "
        "peak RSS is the largest resident set of the process or any of its children.",
        "",
        "| step | wall time | peak RSS GB |" + (" peak ÷ optimum-intel |" if reference else ""),
        "|---|---|---|" + ("---|" if reference else ""),
    ]
    for m in results["measurements"]:
        minutes, seconds = divmod(m["wall_s"], 60)
        ratio = f" {m['peak_rss_gb'] / reference['peak_rss_gb']:.2f}× |" if reference else ""
        lines.append(f"| {m['name']} | {int(minutes)} min {seconds:.0f} s | {m['peak_rss_gb']:.2f} |{ratio}")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sdrt.benchmarks.build_memory", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path, help="a diffusers checkpoint (e.g. `sdrt make-checkpoint DIR --arch sd15`)")
    parser.add_argument("workdir", type=Path)
    parser.add_argument("--quantize-size", type=int, default=256, help="`sdrt quantize --size`; 0 leaves quantize out")
    parser.add_argument("--optimum-intel-python", type=Path, default=None, help="python of a venv with optimum-intel[openvino]")
    parser.add_argument("--optimum-python", type=Path, default=None, help="python of a venv with optimum-onnx")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    parser.add_argument("--results", type=Path, default=None, help="write the markdown report here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if shutil.which(GNU_TIME) is None:
        parser.error(f"{GNU_TIME} (GNU time) is needed: apt-get install time")
    measurements = run(args.checkpoint.resolve(), args.workdir.resolve(), args.quantize_size or None,
                       args.optimum_intel_python, args.optimum_python)
    results = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join(["python", "-m", "sdrt.benchmarks.build_memory", *(sys.argv[1:] if argv is None else argv)]),
        "checkpoint": str(args.checkpoint), "machine": _machine(),
        "measurements": [dataclasses.asdict(m) for m in measurements],
    }
    report = markdown(results)
    print(report)
    if args.out is not None:
        with atomic_file(args.out) as staging:
            staging.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    if args.results is not None:
        with atomic_file(args.results) as staging:
            staging.write_text(report, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
