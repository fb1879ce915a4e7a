"""Benchmark results as markdown tables (also what the terminal shows), a PNG chart drawn with Pillow, the committed
results files (markdown, chart, JSON) and the README's peer table, rewritten from a run's results."""
from __future__ import annotations

import argparse
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from sdrt.benchmarks.sections import replace_section
from sdrt.engine.atomic import atomic_file

logger = logging.getLogger(__name__)

STAGES = ("text_encode", "unet", "guidance_and_scheduler", "decode", "safety_check")
STAGE_COLOURS = {"text_encode": "#8e7cc3", "unet": "#3d85c6", "guidance_and_scheduler": "#93c47d", "decode": "#e69138", "safety_check": "#cc0000"}


def _seconds(value: float | None) -> str:
    return "—" if value is None else f"{value:.3g}"


def _gflops(value: float | None) -> str:
    return "—" if value is None else f"{value:.0f}"


def peak_share(summary: dict[str, Any]) -> str:
    """An engine's U-Net call as a share of the measured peak of the precision it runs in, e.g. "62 % of int8";
    "—" where its U-Net time, its precision or that peak is unknown."""
    fraction = summary.get("unet_peak_fraction")
    return "—" if fraction is None else f"{fraction:.0%} of {summary['unet_precision']}".replace("%", " %")


def _engine_rows(point: dict[str, Any]) -> list[list[str]]:
    rows = []
    for engine, s in point["engines"].items():
        stages = s["stages_s"]
        rows.append([
            engine, str(s["backend"]), _seconds(s["e2e_s"]["median"]), _seconds(s["e2e_s"]["p95"]),
            f"{s['images_per_s']['median']:.3f}", _seconds(s.get("unet_per_call_s")), _gflops(s.get("unet_gflops")), peak_share(s),
            _seconds(stages.get("text_encode")), _seconds(stages.get("guidance_and_scheduler")),
            _seconds(stages.get("decode")), _seconds(stages.get("safety_check")),
            _seconds(s["load_s"]["median"]), _seconds(s["cold_start_s"]["median"]),
            _seconds(s["startup_s"]["median"]) if "startup_s" in s else "—", f"{s['peak_rss_gb']:.2f}",
            "—" if "psnr_vs_fp32_db" not in s else ("∞" if s["psnr_vs_fp32_db"] == float("inf") else f"{s['psnr_vs_fp32_db']:.1f}"),
        ])
    return rows


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *("| " + " | ".join(row) + " |" for row in rows)]


#: the Makefile target that rewrites each committed results file (tests/test_bench_report.py checks the Makefile)
MAKE_TARGETS = {"RESULTS.md": "make bench", "MEMORY.md": "make bench-memory", "SCALING.md": "make bench-scaling"}

README_PEERS_BEGIN = "<!-- peers:begin -->"
README_PEERS_END = "<!-- peers:end -->"


def _regenerate_hint(results_file: Path | None) -> str:
    target = None if results_file is None else MAKE_TARGETS.get(results_file.name)
    return "" if target is None else f" (regenerate with `{target}`: see the Makefile)"


def markdown(results: dict[str, Any], results_file: Path | None = None) -> str:
    """The run's tables; `results_file`, where they are committed, names the make target that rewrites it."""
    machine, plan = results["machine"], results["plan"]
    versions = ", ".join(f"{k} {v}" for k, v in machine["versions"].items() if v)
    lines = [
        "# sdrt benchmark results",
        "",
        f"- Run: {results['started_utc']}, `{results['command']}`{_regenerate_hint(results_file)}",
        f"- Machine: {machine['cpu']}, {machine['cores']} cores, {machine['memory_gb']} GB, AVX-512 BF16: {machine['avx512_bf16']}, AMX: {machine['amx']}",
        f"- Versions: Python {machine['python']}, {versions}",
        f"- Workload: \"{plan['prompt']}\", {plan['steps']} steps, guidance {plan['guidance_scale']}, {plan['runs']} run(s) per "
        "engine in fresh processes, interleaved; medians (p95 beside). Times in seconds.",
        "- Cold start = process launch to first image (a 1-step generation at the benchmark's size), on a bundle whose caches "
        "were filled by one unmeasured 1-step run at that size and batch, as after a deployment's first load; start-up = cold start "
        "less the same 1-step image run again warm in that process. PSNR: final images "
        f"against the fp32 engine {plan.get('reference', 'sdrt-exact')} on the same initial latents.",
        "- Serving (`sdrt serve` under load, micro-batching on and off): [SERVING.md](SERVING.md), written by "
        "`python -m sdrt.benchmarks.serve_load`.",
        *_floor_lines(machine),
        "",
    ]
    header = ["engine", "backend", "e2e", "e2e p95", "images/s", "U-Net/call", "U-Net GFLOP/s", "U-Net ÷ peak", "text enc.",
              "guidance+sched.", "VAE decode", "safety", "load", "cold start", "start-up", "peak RSS GB", "PSNR dB"]
    for point in results["points"]:
        work = point.get("unet_gflop_per_call")
        lines += [f"## {point['size']}×{point['size']}, batch {point['batch']}", "",
                  *([f"One U-Net call: {work:.1f} GFLOP (convolutions and matrix products, guidance's two halves in one call).", ""]
                    if work is not None else []),
                  *_table(header, _engine_rows(point)), ""]
        for metric, label in (("e2e_s", "end-to-end"), ("peak_rss_gb", "peak RSS"), ("cold_start_s", "cold start")):
            ratios = point["ratios"][metric]
            peers = sorted({peer for by_peer in ratios.values() for peer in by_peer})
            if peers:
                rows = [[ours, *(f"{by_peer[p]:.2f}×" for p in peers)] for ours, by_peer in ratios.items()]
                lines += [f"Ratio of {label} (sdrt ÷ peer; below 1 is better):", "", *_table(["", *peers], rows), ""]
        for engine, reason in point["skipped"].items():
            lines.append(f"- {engine} skipped: {reason}")
        lines.append("")
    exports = results.get("peer_exports") or {}
    if exports:
        rows = [[engine, f"{m['wall_s']:.0f} s", f"{m['peak_rss_gb']:.2f}", f"`{' '.join(m['command'])}`"] for engine, m in exports.items()]
        lines += ["## The peers' exports", "", "Each peer's own export of the checkpoint, under `/usr/bin/time -v` "
                  "(`python -m sdrt.benchmarks.peer_export`, run by `make bench`):", "",
                  *_table(["engine", "export wall time", "export peak RSS GB", "command"], rows), ""]
    if len(results["points"]) > 1:
        engines = list(results["points"][0]["engines"])
        rows = [[f"{p['size']}² × {p['batch']}", *(_seconds(p["engines"][e]["e2e_s"]["median"]) if e in p["engines"] else "—" for e in engines)]
                for p in results["points"]]
        lines += ["## Scaling: end-to-end seconds by size and batch", "", *_table(["point", *engines], rows), ""]
    return "\n".join(lines)


def _floor_lines(machine: dict[str, Any]) -> list[str]:
    peaks = machine.get("matmul_peaks")
    if not peaks:
        return []
    measured = ", ".join(f"{name} {p['gflops']:.0f} GFLOP/s" + ("" if p["verified"] else f" (ran in {p['runtime_precision']}: no {name} peak)")
                         for name, p in peaks.items())
    return [f"- The floor: this machine's matrix-product peaks, {measured} (`python -m sdrt.benchmarks.matmul_peak`: one "
            "U-Net-sized product in OpenVINO). U-Net GFLOP/s = one call's convolution and matrix-product work ÷ its median "
            "time; U-Net ÷ peak = that ÷ the peak of the precision the engine's U-Net runs in."]


def write_markdown(results: dict[str, Any], path: Path) -> None:
    path.write_text(markdown(results) + "\n", encoding="utf-8")


def write_results_file(results: dict[str, Any], path: Path) -> None:
    """A committed results file (e.g. benchmarks/RESULTS.md) with its chart (RESULTS-chart.png) and the run's
    figures (RESULTS.json, what the README's peer table is rewritten from) beside it, each written atomically."""
    chart = path.with_name(f"{path.stem}-chart.png")
    with atomic_file(chart) as staging:
        write_chart(results, staging)
    with atomic_file(path.with_suffix(".json")) as staging:
        staging.write_text(json.dumps(results, indent=2, default=str) + "\n", encoding="utf-8")
    with atomic_file(path) as staging:
        staging.write_text(f"{markdown(results, path)}\n\n![stage breakdown per engine]({chart.name})\n", encoding="utf-8")


def _ratio(value: float) -> str:
    return f"{value:.2f}×"


def peers_table(results: dict[str, Any], source: str) -> str:
    """Where sdrt stands against its peers, for the README: each sdrt engine's end-to-end time and peak RSS as
    ratios to every peer at the run's first point, headed by the run, the machine and `source` (a link to the
    results file)."""
    point, machine, plan = results["points"][0], results["machine"], results["plan"]
    ratios = point["ratios"]
    peers = sorted({peer for by_peer in ratios["e2e_s"].values() for peer in by_peer})
    header = ["sdrt engine", "backend", "PSNR vs fp32", "U-Net ÷ peak", *(f"time ÷ {p}" for p in peers), *(f"peak RSS ÷ {p}" for p in peers)]
    rows = []
    for engine, by_peer in ratios["e2e_s"].items():
        summary = point["engines"][engine]
        psnr = summary.get("psnr_vs_fp32_db")
        rows.append([
            engine, str(summary["backend"]),
            "—" if psnr is None else ("exact (reference)" if psnr == float("inf") else f"{psnr:.1f} dB"), peak_share(summary),
            *(_ratio(by_peer[p]) for p in peers), *(_ratio(ratios["peak_rss_gb"][engine][p]) for p in peers),
        ])
    flags = f"AVX-512 BF16: {'yes' if machine['avx512_bf16'] else 'no'}, AMX: {'yes' if machine.get('amx') else 'no'}"
    regenerate = MAKE_TARGETS.get(Path(source).name, "sdrt bench --results ... --readme ...")
    caption = (
        f"`sdrt bench` run of {results['started_utc']} on {machine['cpu']} ({machine['cores']} cores, {flags}): "
        f"{point['size']}×{point['size']}, batch {point['batch']}, {plan['steps']} steps, guidance {plan['guidance_scale']}, "
        f"medians of {plan['runs']} runs per engine; sdrt ÷ peer, below 1 is better. Every figure, the command and the "
        f"versions: [{Path(source).name}]({source}); regenerate with `{regenerate}`."
    )
    return "\n".join([caption, "", *_table(header, rows)])


def has_peers_block(readme: Path) -> bool:
    """Whether `readme` is a file with the marked block write_readme_peers rewrites."""
    if not readme.is_file():
        return False
    text = readme.read_text(encoding="utf-8")
    return README_PEERS_BEGIN in text and README_PEERS_END in text


def write_readme_peers(results: dict[str, Any], readme: Path, results_file: Path) -> None:
    """Rewrite the peer table between README_PEERS_BEGIN and README_PEERS_END in `readme` from `results`, linking
    to `results_file`; a readme without that block is an error, not a place to append one."""
    if not has_peers_block(readme):
        raise ValueError(f"{readme}: no {README_PEERS_BEGIN} ... {README_PEERS_END} block to rewrite")
    source = Path(os.path.relpath(results_file, readme.parent)).as_posix()
    replace_section(readme, README_PEERS_BEGIN, README_PEERS_END, peers_table(results, source), preamble="")
    logger.info("rewrote the peer table in %s from %s", readme, results_file)


def write_chart(results: dict[str, Any], path: Path) -> None:
    """One horizontal bar per engine and point, split into pipeline stages."""
    bars = [(f"{p['size']}x{p['size']} batch {p['batch']} {engine}", summary) for p in results["points"] for engine, summary in p["engines"].items()]
    longest = max((s["e2e_s"]["median"] for _, s in bars), default=1.0)
    label_width, bar_width, row, top = 260, 620, 26, 40
    image = Image.new("RGB", (label_width + bar_width + 120, top + row * len(bars) + 40), "white")
    draw = ImageDraw.Draw(image)
    draw.text((10, 10), "end-to-end seconds by stage (median)", fill="black")
    for i, (label, summary) in enumerate(bars):
        y = top + i * row
        draw.text((10, y + 6), label, fill="black")
        x = label_width
        for stage in STAGES:
            width = summary["stages_s"].get(stage, 0.0) / longest * bar_width
            draw.rectangle([x, y + 4, x + width, y + row - 4], fill=STAGE_COLOURS[stage])
            x += width
        draw.text((label_width + summary["e2e_s"]["median"] / longest * bar_width + 6, y + 6), f"{summary['e2e_s']['median']:.2f}s", fill="black")
    legend_x = 10
    for stage in STAGES:
        y = top + row * len(bars) + 12
        draw.rectangle([legend_x, y, legend_x + 12, y + 12], fill=STAGE_COLOURS[stage])
        draw.text((legend_x + 16, y), stage, fill="black")
        legend_x += 30 + 7 * len(stage)
    image.save(path, format="PNG")


def main(argv: Sequence[str] | None = None) -> int:
    """Rewrite README's peer table from a committed run (benchmarks/RESULTS.json) without rerunning the bench."""
    parser = argparse.ArgumentParser(prog="python -m sdrt.benchmarks.report", description=main.__doc__)
    parser.add_argument("results_json", type=Path, help="a run's figures, e.g. benchmarks/RESULTS.json")
    parser.add_argument("--readme", type=Path, default=Path("README.md"))
    args = parser.parse_args(argv)
    results = json.loads(args.results_json.read_text(encoding="utf-8"))
    write_readme_peers(results, args.readme, args.results_json.with_suffix(".md"))
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    raise SystemExit(main())
