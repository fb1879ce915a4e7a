"""The README's peer table and the results files' headers are written from a run's results, never typed."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from sdrt.benchmarks.report import (
    MAKE_TARGETS,
    README_PEERS_BEGIN,
    README_PEERS_END,
    markdown,
    peers_table,
    write_readme_peers,
)

REPO = Path(__file__).resolve().parent.parent


def _engine(backend: str, e2e: float, rss: float, psnr: float) -> dict:
    return {"backend": backend, "e2e_s": {"median": e2e, "p95": e2e}, "images_per_s": {"median": 1 / e2e},
            "stages_s": {}, "load_s": {"median": 0.5}, "cold_start_s": {"median": 2.0}, "peak_rss_gb": rss,
            "psnr_vs_fp32_db": psnr}


def _synthetic_results() -> dict:
    """A two-engine, one-peer run whose every ratio is a number no default or constant would produce."""
    engines = {"sdrt": _engine("openvino-int8", 37.0, 1.5, 41.37), "sdrt-exact": _engine("openvino-fp32", 81.0, 5.0, float("inf")),
               "diffusers-fp32": _engine("torch fp32", 100.0, 8.0, 117.0)}
    engines["sdrt"].update(unet_precision="int8", unet_per_call_s=2.5, unet_gflops=541.6, unet_peak_fraction=0.6174)
    ratios = {metric: {ours: {"diffusers-fp32": (engines[ours][metric]["median"] if metric != "peak_rss_gb" else engines[ours][metric])
                              / (engines["diffusers-fp32"][metric]["median"] if metric != "peak_rss_gb" else 8.0)}
                       for ours in ("sdrt", "sdrt-exact")}
              for metric in ("e2e_s", "peak_rss_gb", "cold_start_s", "load_s")}
    return {
        "started_utc": "2031-02-03T04:05:06+00:00", "command": "sdrt bench B --runs 7",
        "machine": {"cpu": "Testium 9000", "cores": 5, "memory_gb": 12.3, "avx512_bf16": False, "amx": False,
                    "python": "3.11.0", "versions": {"sdrt": "0.1.0"}},
        "plan": {"prompt": "a cat", "steps": 13, "guidance_scale": 6.5, "runs": 7},
        "points": [{"size": 320, "batch": 2, "engines": engines, "skipped": {}, "ratios": ratios}],
    }


def _block(text: str) -> str:
    return text.split(README_PEERS_BEGIN, 1)[1].split(README_PEERS_END, 1)[0]


def test_the_readme_peer_table_is_rewritten_from_the_runs_results(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    before, after = "# title\n\nintro text\n\n", "\n\nclosing text\n"
    readme.write_text(f"{before}{README_PEERS_BEGIN}\nan old hand-typed table\n{README_PEERS_END}{after}")
    results_file = tmp_path / "benchmarks" / "RESULTS.md"

    write_readme_peers(_synthetic_results(), readme, results_file)

    text = readme.read_text()
    assert text.startswith(before) and text.endswith(after)  # only the block changes
    block = _block(text)
    assert "an old hand-typed table" not in block
    # the run and the machine it came from, and a link to the file with every figure
    assert "2031-02-03T04:05:06+00:00" in block and "Testium 9000 (5 cores, AVX-512 BF16: no, AMX: no)" in block
    assert "320×320, batch 2, 13 steps" in block and "7 runs" in block
    assert "[RESULTS.md](benchmarks/RESULTS.md)" in block and "regenerate with `make bench`" in block
    rows = {line.split("|")[1].strip(): [cell.strip() for cell in line.strip("|").split("|")]
            for line in block.splitlines() if line.startswith("| sdrt")}
    # 37 / 100 and 1.5 / 8; 81 / 100 and 5 / 8; PSNR from the input, the fp32 engine named as the reference
    assert rows["sdrt"] == ["sdrt", "openvino-int8", "41.4 dB", "62 % of int8", "0.37×", "0.19×"]
    assert rows["sdrt-exact"] == ["sdrt-exact", "openvino-fp32", "exact (reference)", "—", "0.81×", "0.62×"]

    write_readme_peers(_synthetic_results(), readme, results_file)  # a second run replaces, never appends
    assert readme.read_text() == text


def test_a_readme_without_the_block_is_refused_and_left_alone(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text("# no block here\n")
    with pytest.raises(ValueError, match="peers:begin"):
        write_readme_peers(_synthetic_results(), readme, tmp_path / "RESULTS.md")
    assert readme.read_text() == "# no block here\n"


def test_the_committed_readme_table_is_the_committed_runs() -> None:
    """README.md's block is what `python -m sdrt.benchmarks.report benchmarks/RESULTS.json` writes: no figure in it
    was typed or edited by hand."""
    results = json.loads((REPO / "benchmarks" / "RESULTS.json").read_text())
    block = _block((REPO / "README.md").read_text())
    assert block.strip() == peers_table(results, "benchmarks/RESULTS.md").strip()


def _recipe(makefile: str, target: str) -> str:
    match = re.search(rf"^{re.escape(target)}:.*\n((?:\t.*\n)+)", makefile, re.MULTILINE)
    assert match, f"no {target} target in the Makefile"
    return match.group(1).replace("\\\n", " ")


@pytest.mark.parametrize("results_name", sorted(MAKE_TARGETS))
def test_each_results_file_names_the_make_target_that_writes_it(results_name: str) -> None:
    target = MAKE_TARGETS[results_name]
    assert f"--results benchmarks/{results_name}" in _recipe((REPO / "Makefile").read_text(), target.removeprefix("make "))
    header = markdown(_synthetic_results(), Path("benchmarks") / results_name).splitlines()[2]
    assert header.endswith(f"(regenerate with `{target}`: see the Makefile)")
    committed = (REPO / "benchmarks" / results_name).read_text().splitlines()[2]
    assert committed.endswith(f"(regenerate with `{target}`: see the Makefile)")


def test_make_bench_rewrites_the_readme_table() -> None:
    assert "--readme README.md" in _recipe((REPO / "Makefile").read_text(), "bench")


def test_a_results_file_no_target_writes_names_none() -> None:
    assert "regenerate" not in markdown(_synthetic_results(), Path("elsewhere.md"))
    assert "regenerate" not in markdown(_synthetic_results())


def test_the_results_show_the_floor_and_the_peers_exports() -> None:
    results = _synthetic_results()
    results["machine"]["matmul_peaks"] = {
        "fp32": {"gflops": 231.4, "verified": True, "runtime_precision": "f32"},
        "bf16": {"gflops": 77.7, "verified": False, "runtime_precision": "f32"},
        "int8": {"gflops": 877.2, "verified": True, "runtime_precision": "u8"}}
    results["points"][0]["unet_gflop_per_call"] = 1354.04
    results["peer_exports"] = {"openvino-genai": {"wall_s": 167.4, "peak_rss_gb": 9.704,
                                                  "command": ["optimum-cli", "export", "openvino", "--model", "ckpt", "out"]}}
    text = markdown(results)
    assert "fp32 231 GFLOP/s, bf16 78 GFLOP/s (ran in f32: no bf16 peak), int8 877 GFLOP/s" in text
    assert "One U-Net call: 1354.0 GFLOP" in text
    header = next(line for line in text.splitlines() if line.startswith("| engine |"))
    columns = [c.strip() for c in header.strip("|").split("|")]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines() if line.startswith("| sdrt")]
    cells = {row[0]: row for row in rows if len(row) == len(columns)}  # the engine table's, not the ratio tables
    sdrt = dict(zip(columns, cells["sdrt"]))
    assert (sdrt["U-Net/call"], sdrt["U-Net GFLOP/s"], sdrt["U-Net ÷ peak"]) == ("2.5", "542", "62 % of int8")
    exact = dict(zip(columns, cells["sdrt-exact"]))
    assert (exact["U-Net GFLOP/s"], exact["U-Net ÷ peak"]) == ("—", "—")  # not measured: said, not made up
    assert "| openvino-genai | 167 s | 9.70 | `optimum-cli export openvino --model ckpt out` |" in text


def test_results_from_before_the_floor_still_render() -> None:
    text = markdown(_synthetic_results())  # no peaks, no U-Net work, no exports: the columns say so
    assert "The floor" not in text and "One U-Net call" not in text and "peers' exports" not in text
