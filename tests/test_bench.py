"""`sdrt bench` runs each engine in a fresh process and reports comparable figures (not a timing gate)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from sdrt.cli.main import main


@pytest.mark.slow
def test_bench_reports_every_engine_with_ratios_and_accuracy(tiny_bundle: Path, tiny_checkpoint: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    results_md = tmp_path / "RESULTS.md"
    readme = tmp_path / "README.md"
    readme.write_text("# intro\n<!-- peers:begin -->\n<!-- peers:end -->\n")
    code = main(["bench", str(tiny_bundle), "--checkpoint", str(tiny_checkpoint), "--engines", "sdrt-exact", "diffusers-fp32",
                 "optimum-ort", "optimum-intel", "openvino-genai", "sdrt-int8", "--runs", "2", "--sizes", "64", "-s", "2", "--out", str(out), "--results", str(results_md),
                 "--readme", str(readme)])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    point = results["points"][0]
    assert set(point["engines"]) == {"sdrt-exact", "diffusers-fp32"}
    assert {"optimum-ort", "optimum-intel", "openvino-genai"} <= set(point["skipped"])
    assert "sdrt quantize" in point["skipped"]["sdrt-int8"]  # the bundle has no int8 U-Net: skipped, naming the fix
    for summary in point["engines"].values():
        assert summary["runs"] == 2 and summary["unet_calls"] == 3  # PNDM: N + 1 calls
        assert 0 < summary["stages_s"]["unet"] < summary["e2e_s"]["median"]
        assert summary["cold_start_s"]["median"] > summary["load_s"]["median"] > 0
        # imports and load are part of the first image's cost, not of the same image warm
        assert summary["load_s"]["median"] < summary["startup_s"]["median"] < summary["cold_start_s"]["median"]
        assert summary["peak_rss_gb"] > 0
    # The floor: both engines run fp32; each U-Net call's work over its time, against the measured fp32 peak.
    peaks = results["machine"]["matmul_peaks"]
    assert set(peaks) == {"fp32", "bf16", "int8"} and peaks["fp32"]["verified"] and point["unet_gflop_per_call"] > 0
    for summary in point["engines"].values():
        assert summary["unet_precision"] == "fp32"
        assert summary["unet_gflops"] == pytest.approx(point["unet_gflop_per_call"] / summary["unet_per_call_s"])
        assert summary["unet_peak_fraction"] == pytest.approx(summary["unet_gflops"] / peaks["fp32"]["gflops"])
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
    share = f"{point['engines']['sdrt-exact']['unet_peak_fraction']:.0%}".replace("%", " %")
    assert f"| sdrt-exact | {point['engines']['sdrt-exact']['backend']} | exact (reference) | {share} of fp32 | {ratio:.2f}× |" in readme.read_text()
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
    from sdrt.benchmarks.bench import BenchPlan, _skip_reasons
    from sdrt.engine.backends import backend_class

    auto = backend_class("auto", tiny_bundle).name  # not quantized: no int8 U-Net
    explicit = {"openvino-bf16": "sdrt-bf16", "onnxruntime-cpu": "sdrt-onnxruntime-cpu"}.get(auto)
    if explicit is None:
        pytest.skip(f"no bench engine names {auto} explicitly")
    plan = BenchPlan(None, tiny_bundle, ("sdrt", explicit, "sdrt-exact"), 1, (64,), (1,), "a cat", 1, 7.5, 0, {}, tmp_path)
    skipped = _skip_reasons(plan)
    assert skipped.get("sdrt") is None and skipped.get("sdrt-exact") is None
    assert skipped.get(explicit) == f"runs as sdrt does on this bundle ({auto}, keep-loaded)"


def _plan(bundle: Path, tmp_path: Path, engines: tuple[str, ...], peers: dict):
    from sdrt.benchmarks.bench import BenchPlan

    return BenchPlan(None, bundle, engines, 1, (64,), (1,), "a cat", 1, 7.5, 0, peers, tmp_path / "out", floor=False)


def test_a_venv_peer_without_its_venv_or_export_is_skipped_naming_the_fix(tiny_bundle: Path, tmp_path: Path) -> None:
    from sdrt.benchmarks.bench import PeerInstall, _skip_reasons

    venv_python = tmp_path / "venv" / "bin" / "python"
    venv_python.parent.mkdir(parents=True)
    venv_python.touch()
    export = tmp_path / "sd-openvino"
    engines = ("optimum-intel", "openvino-genai", "optimum-ort")
    # nothing given: the options that would give it, and that make bench builds it
    reasons = _skip_reasons(_plan(tiny_bundle, tmp_path, engines, {}))
    assert "--optimum-intel-python and --openvino-model" in reasons["optimum-intel"]
    assert "--genai-python and --openvino-model" in reasons["openvino-genai"]
    assert "--optimum-python and --optimum-model" in reasons["optimum-ort"]
    assert all("make bench" in reason for reason in reasons.values())
    # a venv's python that is not there, and an export not made yet: each named, with how to make the export
    reasons = _skip_reasons(_plan(tiny_bundle, tmp_path, engines, {
        "optimum-intel": PeerInstall(tmp_path / "missing" / "python", export),
        "openvino-genai": PeerInstall(venv_python, export),
        "optimum-ort": PeerInstall(venv_python, tmp_path / "sd-onnx")}))
    assert reasons["optimum-intel"].startswith(f"--optimum-intel-python {tmp_path / 'missing' / 'python'}: no such file")
    assert reasons["openvino-genai"].startswith(f"--openvino-model {export}: no such directory")
    assert "optimum-cli export openvino --model CHECKPOINT --task text-to-image" in reasons["openvino-genai"]
    assert "optimum-cli export onnx" in reasons["optimum-ort"]
    export.mkdir()  # venv and export there: it runs
    assert _skip_reasons(_plan(tiny_bundle, tmp_path, ("openvino-genai",), {"openvino-genai": PeerInstall(venv_python, export)})) == {}


@pytest.mark.parametrize("engine", ["optimum-intel", "openvino-genai"])
def test_a_venv_peer_runs_the_worker_by_path_with_its_own_python_and_export(engine: str, tiny_bundle: Path, tmp_path: Path,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    import subprocess

    from sdrt.benchmarks import bench, worker
    from sdrt.benchmarks.bench import PeerInstall
    from sdrt.benchmarks.worker import RunConfig

    commands = []

    def run(command, **kwargs):
        commands.append(command)
        return subprocess.CompletedProcess(command, 0, stdout='{"e2e_s": 1.5}\n', stderr="")

    monkeypatch.setattr(bench.subprocess, "run", run)
    python, export = tmp_path / "venv" / "bin" / "python", tmp_path / "sd-openvino"
    plan = _plan(tiny_bundle, tmp_path, (engine,), {engine: PeerInstall(python, export)})
    config = RunConfig("a cat", 3, 7.5, 64, 64, 1, str(tmp_path / "latents.npy"))
    assert bench._run_once(engine, plan, config, tmp_path / "images.npy") == {"e2e_s": 1.5}
    [command] = commands
    # the venv's python runs worker.py by path (sdrt is not installed there), on the peer's own export
    assert command[:2] == [str(python), worker.__file__]
    assert command[command.index("--engine") + 1] == engine and command[command.index("--model") + 1] == str(export)
    assert RunConfig(**json.loads(command[command.index("--config") + 1])) == config


def test_the_flop_counter_counts_convolutions_and_matrix_products_from_shapes(tmp_path: Path) -> None:
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from sdrt.benchmarks.matmul_peak import count_flops

    rng = np.random.default_rng(0)
    weights = {"conv_w": rng.standard_normal((4, 3, 3, 3)), "group_w": rng.standard_normal((4, 2, 1, 1)),
               "matmul_b": rng.standard_normal((4, 5)), "gemm_b": rng.standard_normal((7, 6)), "shape": np.array([0, 4, 64])}
    initializers = [numpy_helper.from_array(v.astype(np.int64 if k == "shape" else np.float32), k) for k, v in weights.items()]
    nodes = [
        helper.make_node("Conv", ["x", "conv_w"], ["c1"], pads=[1, 1, 1, 1]),  # (N, 3, 8, 8) -> (N, 4, 8, 8)
        helper.make_node("Conv", ["c1", "group_w"], ["c2"], group=2),  # 1x1, 2 groups of 2 channels: (N, 4, 8, 8)
        helper.make_node("Reshape", ["c2", "shape"], ["r"]),  # (N, 4, 64)
        helper.make_node("Transpose", ["r"], ["t"], perm=[0, 2, 1]),  # (N, 64, 4)
        helper.make_node("MatMul", ["t", "matmul_b"], ["m"]),  # (N, 64, 5)
        helper.make_node("Gemm", ["y", "gemm_b"], ["g"], transB=1),  # (rows, 6) x (6, 7)
        helper.make_node("Relu", ["m"], ["out"]),  # not counted
    ]
    graph = helper.make_graph(nodes, "conv-matmul", [
        helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 8, 8]),
        helper.make_tensor_value_info("y", TensorProto.FLOAT, ["rows", 6])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, None), helper.make_tensor_value_info("g", TensorProto.FLOAT, None)],
        initializers)
    path = tmp_path / "model.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    # by hand, 2 per multiply-add: conv 2·N·4·8·8·(3·3·3), grouped conv 2·N·4·8·8·2, matmul 2·N·64·5·4, gemm 2·rows·7·6
    for n, rows in ((1, 2), (3, 5)):
        expected = 2 * n * 4 * 64 * 27 + 2 * n * 4 * 64 * 2 + 2 * n * 64 * 5 * 4 + 2 * rows * 7 * 6
        assert count_flops(path, {"x": (n, 3, 8, 8), "y": (rows, 6)}) == expected


def test_the_bench_counts_one_u_net_call_with_guidances_two_halves(tiny_bundle: Path) -> None:
    from sdrt.benchmarks.bench import unet_call_gflop
    from sdrt.engine.manifest import read_manifest

    manifest = read_manifest(tiny_bundle)
    alone = unet_call_gflop(tiny_bundle, manifest, 64, 1, 1.0)  # no guidance: one sample per call
    assert alone > 0
    assert unet_call_gflop(tiny_bundle, manifest, 64, 1, 7.5) == pytest.approx(2 * alone)  # uncond + cond in one call
    assert unet_call_gflop(tiny_bundle, manifest, 64, 3, 7.5) == pytest.approx(6 * alone)
    # 4x the pixels: 4x the convolutions' and projections' work, 16x the self-attention's: between 4x and 16x
    assert 4 * alone < unet_call_gflop(tiny_bundle, manifest, 128, 1, 1.0) < 16 * alone


def test_each_u_net_is_reported_against_the_peak_of_its_own_precision() -> None:
    from sdrt.benchmarks.bench import _add_floor

    peaks = {"int8": {"gflops": 400.0, "verified": True}, "bf16": {"gflops": 300.0, "verified": False}}
    summaries = {"a": {"unet_per_call_s": 0.5, "unet_precision": "int8"}, "b": {"unet_per_call_s": 2.0, "unet_precision": "bf16"},
                 "c": {"unet_per_call_s": 4.0, "unet_precision": None}, "d": {"unet_precision": "int8"}}
    _add_floor(summaries, 100.0, peaks)
    assert summaries["a"] == {"unet_per_call_s": 0.5, "unet_precision": "int8", "unet_gflops": 200.0, "unet_peak_fraction": 0.5}
    # a peak that ran in another precision (no bf16 units) and an unknown precision: GFLOP/s only
    assert summaries["b"]["unet_gflops"] == 50.0 and "unet_peak_fraction" not in summaries["b"]
    assert summaries["c"]["unet_gflops"] == 25.0 and "unet_peak_fraction" not in summaries["c"]
    assert summaries["d"] == {"unet_precision": "int8"}  # no U-Net time (a peer that cannot be timed): nothing
    # DeepCache's calls are mostly shallow passes: no rate of a full call's work
    deepcache = {"sdrt-deepcache": {"unet_per_call_s": 0.5, "unet_precision": "int8"}}
    _add_floor(deepcache, 100.0, peaks)
    assert deepcache == {"sdrt-deepcache": {"unet_per_call_s": 0.5, "unet_precision": "int8"}}


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_a_peak_is_measured_in_the_precision_it_names(precision: str) -> None:
    from sdrt.benchmarks.matmul_peak import Precision, measure_peak

    peak = measure_peak(Precision(precision), shape=(64, 128, 64), repeats=2)
    # read back from the compiled model's execution graph: fp32 runs f32, FakeQuantize'd inputs an int8 GEMM
    assert peak.verified and peak.runtime_precision in {"fp32": {"f32"}, "int8": {"u8", "i8"}}[precision]
    assert peak.gflops > 0


def test_a_reference_not_among_the_engines_is_refused_before_running(tiny_bundle: Path, tmp_path: Path, capsys) -> None:
    assert main(["bench", str(tiny_bundle), "--engines", "sdrt", "--reference", "diffusers-fp32", "--out", str(tmp_path)]) == 2
    assert "--reference diffusers-fp32: not among --engines" in capsys.readouterr().err
    assert not (tmp_path / "results.json").exists()


def test_the_int8_load_benchmark_compiles_every_input_quantization_into_int8_convolutions(tmp_path: Path) -> None:
    from sdrt.benchmarks import int8_load

    out = tmp_path / "load.json"
    assert int8_load.main(["--convolutions", "2", "--channels", "32", "--side", "8", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())
    # read back from each compiled stack's execution graph: a fallback to floating point would make the comparison moot
    assert [row["quantization"] for row in rows] == ["asymmetric", "symmetric", "unsigned"]
    assert all(row["int8"] and row["runtime_precisions"] for row in rows)
    assert all(row["weights_mb"] == 2 * 32 * 32 * 9 / 1e6 for row in rows)


def test_the_fresh_memory_benchmark_times_page_faults_apart_from_writes_to_mapped_pages(tmp_path: Path) -> None:
    from sdrt.benchmarks import fresh_memory

    out = tmp_path / "fresh.json"
    assert fresh_memory.main(["--gib", "0.125", "--pauses", "0", "0.01", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rounds"]
    assert [row["pause_seconds"] for row in rows] == [0, 0.01]
    # 32768 page faults (a kernel entry and a cleared page each) against 32768 plain stores to pages already mapped
    assert all(row["second_touch_seconds"] * 3 < row["first_touch_seconds"] for row in rows)
    with pytest.raises(SystemExit):
        fresh_memory.main(["--gib", "0"])


def test_the_memory_policy_reads_page_reporting_huge_pages_and_damon_schemes_from_sysfs(tmp_path: Path) -> None:
    """A Firecracker guest's settings (2026-12-07): a scheme that pages out unmapped file pages idle for 12
    aggregations of 5 s, 128 MiB per second at most; a second kdamond that is off counts for nothing."""
    from sdrt.benchmarks import fresh_memory

    def write(relative: str, text: str) -> None:
        path = tmp_path / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")

    write("module/page_reporting/parameters/page_reporting_order", "9")
    write("module/page_reporting/parameters/reported_kib", "2000000")
    write("kernel/mm/transparent_hugepage/enabled", "always [madvise] never")
    for kdamond, state in (("0", "on"), ("1", "off")):
        context = f"kernel/mm/damon/admin/kdamonds/{kdamond}/contexts/0"
        write(f"kernel/mm/damon/admin/kdamonds/{kdamond}/state", state)
        write(f"{context}/monitoring_attrs/intervals/aggr_us", "5000000")
        scheme = f"{context}/schemes/0"
        write(f"{scheme}/action", "pageout")
        write(f"{scheme}/access_pattern/age/min", "12")
        write(f"{scheme}/access_pattern/nr_accesses/max", "1")
        write(f"{scheme}/quotas/bytes", str(128 << 20))
        write(f"{scheme}/quotas/reset_interval_ms", "1000")
        write(f"{scheme}/ops_filters/0/type", "anon")
        write(f"{scheme}/ops_filters/0/allow", "N")
        write(f"{scheme}/ops_filters/1/type", "unmapped")
        write(f"{scheme}/ops_filters/1/allow", "Y")
        write(f"{scheme}/stats/sz_applied", "3000000000")

    policy = fresh_memory.memory_policy(tmp_path)
    assert policy.page_reporting_order == 9 and policy.reported_gb == pytest.approx(2.048)
    assert policy.transparent_hugepages == "madvise"
    assert policy.damon_schemes == (fresh_memory.DamonScheme(
        action="pageout", min_age_seconds=60.0, max_accesses=1, quota_mb_per_second=pytest.approx(134.217728),
        filters=("reject anon", "allow unmapped"), applied_gb=3.0),)
    assert "blocks of 2 MiB (order 9)" in policy.lines()[0]

    bare = fresh_memory.memory_policy(tmp_path / "absent")
    assert bare == fresh_memory.MemoryPolicy(None, None, None, ())
    assert bare.lines()[0] == "- free page reporting to the host: none"


@pytest.mark.slow
def test_each_point_is_measured_on_caches_primed_at_its_size(tiny_bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Compiled models are cached per input shape: the unmeasured run that fills the caches must run the size it
    prepares, or every measured start-up pays a compilation."""
    from sdrt.benchmarks import bench

    calls = []
    real_run_once = bench._run_once

    def recording_run_once(engine, plan, config, images_out):
        calls.append((engine, config.width, config.steps))
        return real_run_once(engine, plan, config, images_out)

    monkeypatch.setattr(bench, "_run_once", recording_run_once)
    plan = bench.BenchPlan(None, tiny_bundle, ("sdrt-exact",), 1, (64, 128), (1,), "a cat", 2, 7.5, 0, {}, tmp_path / "out", floor=False)
    bench.run_bench(plan, ["sdrt", "bench"])
    assert calls == [("sdrt-exact", 64, 1), ("sdrt-exact", 64, 2), ("sdrt-exact", 128, 1), ("sdrt-exact", 128, 2)]
