"""The memory model (sdrt.engine.memory_estimate) against measured peaks: one fresh process per point, each doing what
`sdrt serve` does (load, warm up at the model's default size, hand freed memory back), then one request of the
point's size and image count, its peak RSS measured from the warm process's resting RSS. Nothing here gates CI.

    python -m sdrt.benchmarks.memory_estimate BUNDLE [--backend auto] [--points 512x1 512x2 768x1 1024x1]
        [--out memory.json] [--results benchmarks/MEMORY_ESTIMATE.md]

Each point reports the measured peak, the estimate from the bundle alone (the RSS before loading + the backend's
runtime + the weights + the request's working memory: what a CLI would check before loading) and the estimate
`sdrt serve` admits by (the measured resting RSS + the working memory), each ÷ the peak, and the RSS after the
request, once the server's memory return has run. Linux only (/proc/self/status, clear_refs).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import logging
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import sdrt.engine
from sdrt.benchmarks.bench import _machine
from sdrt.benchmarks.sections import replace_section
from sdrt.engine.host_memory import peak_rss_bytes, process_rss_bytes, reset_peak_rss
from sdrt.engine.memory_estimate import MemoryModel
from sdrt.engine.guidance_batch import is_guided
from sdrt.serve import execution
from sdrt.serve.execution import generate_batch, warm_up
from sdrt.serve.schemas import GenerationParams

logger = logging.getLogger(__name__)

_POINT = re.compile(r"^([1-9][0-9]*)(?:x([1-9][0-9]*))?$")
#: the markers around one bundle and backend's section of the results file; other sections are kept
SECTION = "<!-- memory_estimate:{key} {edge} -->"


@dataclasses.dataclass(frozen=True)
class Point:
    """One measurement: `images` square images of `size` pixels, in one request."""

    size: int
    images: int

    @classmethod
    def parse(cls, text: str) -> Point:
        match = _POINT.match(text)
        if match is None:
            raise argparse.ArgumentTypeError(f"expected SIZE or SIZExIMAGES (e.g. 512x2), got {text!r}")
        return cls(int(match.group(1)), int(match.group(2) or 1))


def measure(bundle: Path, backend: str, points: Sequence[Point], steps: int, guidance_scale: float,
            safety_checker: str, keep_freed_heap: bool = False) -> list[dict[str, Any]]:
    """Run in the process measured: load as `sdrt serve` does, warm up, then each point's request in turn, its peak
    measured from the RSS at rest before it (tests/test_memory_estimate.py measures several points per process).
    `keep_freed_heap`: without the server's return of freed heap after each batch, to measure what it returns."""
    if keep_freed_heap:
        execution.return_freed_heap = lambda: None
    pipe = sdrt.engine.load(bundle, backend=backend, safety_checker=safety_checker)
    pipe.set_progress_bar_config(disable=True)
    base = process_rss_bytes()  # the pipeline opened, none of its models run yet: the model's base
    model = MemoryModel.for_pipeline(pipe, base)
    warm_up(pipe)  # as the server, it returns freed heap at the end of its batch
    rows = []
    for point in points:
        resting = process_rss_bytes()
        if not reset_peak_rss():
            raise RuntimeError("cannot reset the peak RSS (/proc/self/clear_refs): Linux only")
        started = time.perf_counter()
        generate_batch(pipe, [GenerationParams("a photograph of an astronaut riding a horse", None, point.images, point.size,
                                               point.size, steps, guidance_scale, 0, None)])
        seconds = time.perf_counter() - started
        peak, after = peak_rss_bytes(), process_rss_bytes()
        working = model.working_bytes(point.size, point.size, point.images, is_guided(guidance_scale))
        rows.append({"backend": pipe.backend.name, "size": point.size, "images": point.images, "base_bytes": base,
                     "resting_bytes": resting, "peak_bytes": peak, "after_bytes": after,
                     "estimate_bytes": model.resident_bytes + working, "admitted_bytes": resting + working,
                     "working_bytes": working, "seconds": seconds})
    return rows


def run_points(bundle: Path, backend: str, points: Sequence[Point], steps: int, guidance_scale: float,
               safety_checker: str, keep_freed_heap: bool = False) -> list[dict[str, Any]]:
    """Each point in a fresh process (`--measure`), in order; progress is logged."""
    rows = []
    for index, point in enumerate(points, 1):
        logger.info("point %d/%d: %dx%d, %d image(s), backend %s", index, len(points), point.size, point.size, point.images, backend)
        command = [sys.executable, "-m", "sdrt.benchmarks.memory_estimate", str(bundle), "--backend", backend, "--steps", str(steps),
                   "--guidance-scale", str(guidance_scale), "--safety-checker", safety_checker,
                   "--measure", f"{point.size}x{point.images}", *(["--keep-freed-heap"] if keep_freed_heap else [])]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            logger.error("point %dx%d failed:\n%s", point.size, point.images, result.stderr[-4000:])
            rows.append({"size": point.size, "images": point.images, "error": result.stderr.strip().splitlines()[-1:]})
            continue
        (row,) = json.loads(result.stdout.strip().splitlines()[-1])
        logger.info("  peak %.2f GB, estimate %.2f GB (%.2fx), admitted %.2f GB (%.2fx), after %.2f GB (resting %.2f GB), %.1f s",
                    row["peak_bytes"] / 1e9, row["estimate_bytes"] / 1e9, row["estimate_bytes"] / row["peak_bytes"],
                    row["admitted_bytes"] / 1e9, row["admitted_bytes"] / row["peak_bytes"], row["after_bytes"] / 1e9,
                    row["resting_bytes"] / 1e9, row["seconds"])
        rows.append(row)
    return rows


def markdown(results: dict[str, Any]) -> str:
    gb = lambda count: f"{count / 1e9:.2f}"  # noqa: E731
    lines = [f"### {Path(results['bundle']).name}, {results['backend']}", "",
             f"- Run: {results['run']}, `{results['command']}`",
             f"- Machine: {results['machine']}",
             f"- Each point: a fresh process, loaded and warmed up as `sdrt serve` does, then one request "
             f"({results['steps']} steps, guidance {results['guidance_scale']}, safety checker {results['safety_checker']}"
             f"{'; without the return of freed heap' if results['keep_freed_heap'] else ''}). "
             "GB = 10⁹ bytes. Estimate: from the bundle (the RSS once the pipeline is opened, before any model ran + "
             "runtime + weights + working memory); admitted: the server's (measured resting RSS + working memory).", "",
             "| size | images | peak RSS | estimate | ÷ peak | admitted | ÷ peak | resting RSS | RSS after | seconds |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in results["rows"]:
        if "error" in row:
            lines.append(f"| {row['size']}² | {row['images']} | failed: {' '.join(row['error'])} |||||||")
            continue
        lines.append(f"| {row['size']}² | {row['images']} | {gb(row['peak_bytes'])} | {gb(row['estimate_bytes'])} | "
                     f"{row['estimate_bytes'] / row['peak_bytes']:.2f} | {gb(row['admitted_bytes'])} | "
                     f"{row['admitted_bytes'] / row['peak_bytes']:.2f} | {gb(row['resting_bytes'])} | {gb(row['after_bytes'])} | "
                     f"{row['seconds']:.1f} |")
    return "\n".join(lines) + "\n"


def write_section(path: Path, key: str, section: str) -> None:
    """Replace this bundle and backend's section of the results file (or add it), keeping the others."""
    begin, end = SECTION.format(key=key, edge="begin"), SECTION.format(key=key, edge="end")
    replace_section(path, begin, end, section, (
        "# Memory estimate against measured peaks\n\nWritten by `python -m sdrt.benchmarks.memory_estimate` (each run "
        "replaces its bundle and backend's section). Random-weight bundles measure like real ones: "
        "`sdrt make-checkpoint CKPT --arch ARCH && sdrt export CKPT BUNDLE`.\n"))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sdrt.benchmarks.memory_estimate", description=__doc__.split("\n\n")[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--points", type=Point.parse, nargs="+", default=[Point(512, 1), Point(512, 2), Point(768, 1), Point(1024, 1)],
                        metavar="SIZExIMAGES", help="square sizes and image counts, one fresh process each (default 512x1 512x2 768x1 1024x1)")
    parser.add_argument("-s", "--steps", type=int, default=2, help="denoising steps per request (the peak does not grow with them)")
    parser.add_argument("--guidance-scale", type=float, default=7.5)
    parser.add_argument("--safety-checker", default="block", choices=["block", "flag", "off"])
    parser.add_argument("--keep-freed-heap", action="store_true",
                        help="skip the server's malloc_trim after each batch, to measure what it returns")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    parser.add_argument("--results", type=Path, default=None, help="markdown file whose section for this bundle and backend is replaced")
    # the measured process's points: a JSON list of rows on its last line of output
    parser.add_argument("--measure", type=Point.parse, nargs="+", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure is not None:
        print(json.dumps(measure(args.bundle, args.backend, args.measure, args.steps, args.guidance_scale, args.safety_checker,
                                 args.keep_freed_heap)))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    machine = _machine()
    rows = run_points(args.bundle, args.backend, args.points, args.steps, args.guidance_scale, args.safety_checker,
                      args.keep_freed_heap)
    backends = sorted({row["backend"] for row in rows if "backend" in row})
    results = {
        "run": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join(["python", "-m", "sdrt.benchmarks.memory_estimate", *(sys.argv[1:] if argv is None else argv)]),
        "machine": f"{machine['cpu']}, {machine['cores']} cores, {machine['memory_gb']} GB",
        "bundle": str(args.bundle), "backend": ", ".join(backends) or args.backend, "steps": args.steps,
        "guidance_scale": args.guidance_scale, "safety_checker": args.safety_checker, "keep_freed_heap": args.keep_freed_heap,
        "rows": rows,
    }
    section = markdown(results)
    print(section)
    if args.out is not None:
        args.out.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    if args.results is not None:
        key = f"{args.bundle.name}:{results['backend']}" + (":keep-freed-heap" if args.keep_freed_heap else "")
        write_section(args.results, key, section)
    return 0 if all("error" not in row for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
