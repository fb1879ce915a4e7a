"""Benchmark results as markdown tables (also what the terminal shows) and a PNG chart drawn with Pillow."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

STAGES = ("text_encode", "unet", "guidance_and_scheduler", "decode", "safety_check")
STAGE_COLOURS = {"text_encode": "#8e7cc3", "unet": "#3d85c6", "guidance_and_scheduler": "#93c47d", "decode": "#e69138", "safety_check": "#cc0000"}


def _seconds(value: float | None) -> str:
    return "—" if value is None else f"{value:.3g}"


def _engine_rows(point: dict[str, Any]) -> list[list[str]]:
    rows = []
    for engine, s in point["engines"].items():
        stages = s["stages_s"]
        rows.append([
            engine, str(s["backend"]), _seconds(s["e2e_s"]["median"]), _seconds(s["e2e_s"]["p95"]),
            f"{s['images_per_s']['median']:.3f}", _seconds(s.get("unet_per_call_s")),
            _seconds(stages.get("text_encode")), _seconds(stages.get("guidance_and_scheduler")),
            _seconds(stages.get("decode")), _seconds(stages.get("safety_check")),
            _seconds(s["load_s"]["median"]), _seconds(s["cold_start_s"]["median"]), f"{s['peak_rss_gb']:.2f}",
            "—" if "psnr_vs_fp32_db" not in s else ("∞" if s["psnr_vs_fp32_db"] == float("inf") else f"{s['psnr_vs_fp32_db']:.1f}"),
        ])
    return rows


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *("| " + " | ".join(row) + " |" for row in rows)]


def markdown(results: dict[str, Any]) -> str:
    machine, plan = results["machine"], results["plan"]
    versions = ", ".join(f"{k} {v}" for k, v in machine["versions"].items() if v)
    lines = [
        "# sdrt benchmark results",
        "",
        f"- Run: {results['started_utc']}, `{results['command']}` (regenerate with `make bench`: see the Makefile)",
        f"- Machine: {machine['cpu']}, {machine['cores']} cores, {machine['memory_gb']} GB, AVX-512 BF16: {machine['avx512_bf16']}, AMX: {machine['amx']}",
        f"- Versions: Python {machine['python']}, {versions}",
        f"- Workload: \"{plan['prompt']}\", {plan['steps']} steps, guidance {plan['guidance_scale']}, {plan['runs']} run(s) per "
        "engine in fresh processes, interleaved; medians (p95 beside). Times in seconds.",
        "- Cold start = process launch to first image (a 1-step generation at the benchmark's size), on a bundle whose caches "
        "were filled by one unmeasured run at the smallest size, as after a deployment's first load. PSNR: final images "
        "against sdrt's fp32 engine (sdrt-exact) on the same initial latents.",
        "- Serving (`sdrt serve` under load, micro-batching on and off): [SERVING.md](SERVING.md), written by "
        "`python -m sdrt.benchmarks.serve_load`.",
        "",
    ]
    header = ["engine", "backend", "e2e", "e2e p95", "images/s", "U-Net/call", "text enc.", "guidance+sched.",
              "VAE decode", "safety", "load", "cold start", "peak RSS GB", "PSNR dB"]
    for point in results["points"]:
        lines += [f"## {point['size']}×{point['size']}, batch {point['batch']}", "", *_table(header, _engine_rows(point)), ""]
        for metric, label in (("e2e_s", "end-to-end"), ("peak_rss_gb", "peak RSS"), ("cold_start_s", "cold start")):
            ratios = point["ratios"][metric]
            peers = sorted({peer for by_peer in ratios.values() for peer in by_peer})
            if peers:
                rows = [[ours, *(f"{by_peer[p]:.2f}×" for p in peers)] for ours, by_peer in ratios.items()]
                lines += [f"Ratio of {label} (sdrt ÷ peer; below 1 is better):", "", *_table(["", *peers], rows), ""]
        for engine, reason in point["skipped"].items():
            lines.append(f"- {engine} skipped: {reason}")
        lines.append("")
    if len(results["points"]) > 1:
        engines = list(results["points"][0]["engines"])
        rows = [[f"{p['size']}² × {p['batch']}", *(_seconds(p["engines"][e]["e2e_s"]["median"]) if e in p["engines"] else "—" for e in engines)]
                for p in results["points"]]
        lines += ["## Scaling: end-to-end seconds by size and batch", "", *_table(["point", *engines], rows), ""]
    return "\n".join(lines)


def write_markdown(results: dict[str, Any], path: Path) -> None:
    path.write_text(markdown(results) + "\n", encoding="utf-8")


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
