"""`sdrt bench` runs each engine in a fresh process and reports comparable figures (not a timing gate)."""
from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

from sdrt.cli.main import main


def test_bench_reports_every_engine_with_ratios_and_accuracy(tiny_bundle: Path, tiny_checkpoint: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    results_md = tmp_path / "RESULTS.md"
    readme = tmp_path / "README.md"
    readme.write_text("# intro\n<!-- peers:begin -->\n<!-- peers:end -->\n")
    code = main(["bench", str(tiny_bundle), "--checkpoint", str(tiny_checkpoint), "--engines", "sdrt-exact", "diffusers-fp32",
                 "optimum-ort", "sdrt-int8", "--runs", "2", "--sizes", "64", "-s", "2", "--out", str(out), "--results", str(results_md),
                 "--readme", str(readme)])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    point = results["points"][0]
    assert set(point["engines"]) == {"sdrt-exact", "diffusers-fp32"}
    assert "optimum-ort" in point["skipped"]
    assert "sdrt quantize" in point["skipped"]["sdrt-int8"]  # the bundle has no int8 U-Net: skipped, naming the fix
    for summary in point["engines"].values():
        assert summary["runs"] == 2 and summary["unet_calls"] == 3  # PNDM: N + 1 calls
        assert 0 < summary["stages_s"]["unet"] < summary["e2e_s"]["median"]
        assert summary["cold_start_s"]["median"] > summary["load_s"]["median"] > 0
        assert summary["peak_rss_gb"] > 0
    # Same latents in both engines: diffusers fp32 and sdrt's exact engine agree to parity (PSNR far above 40 dB).
    assert point["engines"]["diffusers-fp32"]["psnr_vs_fp32_db"] > 60
    ratio = point["ratios"]["e2e_s"]["sdrt-exact"]["diffusers-fp32"]
    assert ratio == point["engines"]["sdrt-exact"]["e2e_s"]["median"] / point["engines"]["diffusers-fp32"]["e2e_s"]["median"]
    assert results["command"].startswith("sdrt bench ") and results["machine"]["versions"]["sdrt"]
    markdown = results_md.read_text()
    # the committed file names the make target that rewrites it (RESULTS.md: make bench); otherwise the same tables
    assert "(regenerate with `make bench`: see the Makefile)" in markdown
    assert markdown.replace(" (regenerate with `make bench`: see the Makefile)", "").startswith((out / "results.md").read_text())
    assert "| sdrt-exact |" in markdown and "optimum-ort skipped" in markdown
    assert json.loads((tmp_path / "RESULTS.json").read_text()) == results
    # the README's peer table: this run's ratio, linked to the results file
    assert f"| sdrt-exact | {point['engines']['sdrt-exact']['backend']} | exact (reference) | {ratio:.2f}× |" in readme.read_text()
    assert "[RESULTS.md](RESULTS.md)" in readme.read_text() and results["started_utc"] in readme.read_text()
    assert markdown.rstrip().endswith("(RESULTS-chart.png)")
    with Image.open(tmp_path / "RESULTS-chart.png") as chart:
        assert chart.format == "PNG"
    assert "| sdrt-exact |" in capsys.readouterr().out
    with Image.open(out / "chart.png") as chart:
        assert chart.format == "PNG" and chart.width > 400


def test_bench_rejects_unknown_engine(tiny_bundle: Path, capsys) -> None:
    assert main(["bench", str(tiny_bundle), "--engines", "tensorflow"]) == 2
    assert "unknown ['tensorflow']" in capsys.readouterr().err


def test_bench_refuses_a_readme_without_the_peer_block_before_running(tiny_bundle: Path, tmp_path: Path, capsys) -> None:
    readme = tmp_path / "README.md"
    readme.write_text("# no block\n")
    results = tmp_path / "RESULTS.md"
    assert main(["bench", str(tiny_bundle), "--results", str(results), "--readme", str(readme), "--out", str(tmp_path / "out")]) == 2
    assert "peers:begin" in capsys.readouterr().err and not results.exists() and not (tmp_path / "out").exists()
    assert main(["bench", str(tiny_bundle), "--readme", str(readme)]) == 2
    assert "needs --results" in capsys.readouterr().err


def test_an_sdrt_engine_that_would_repeat_an_earlier_ones_run_is_skipped(tiny_bundle: Path, tmp_path: Path) -> None:
    import pytest

    from sdrt.benchmarks.bench import BenchPlan, _skip_reasons
    from sdrt.engine.backends import backend_class

    auto = backend_class("auto", tiny_bundle).name  # not quantized: no int8 U-Net
    explicit = {"openvino-bf16": "sdrt-bf16", "onnxruntime-cpu": "sdrt-onnxruntime-cpu"}.get(auto)
    if explicit is None:
        pytest.skip(f"no bench engine names {auto} explicitly")
    plan = BenchPlan(None, tiny_bundle, ("sdrt", explicit, "sdrt-exact"), 1, (64,), (1,), "a cat", 1, 7.5, 0, None, None, tmp_path)
    skipped = _skip_reasons(plan)
    assert skipped.get("sdrt") is None and skipped.get("sdrt-exact") is None
    assert skipped.get(explicit) == f"runs as sdrt does on this bundle ({auto}, keep-loaded)"
