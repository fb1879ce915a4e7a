"""The serving load test (benchmarks/serve_load.py): its accounting, its markdown section that keeps the rest of the
file, and one small end-to-end run against real `sdrt serve` processes (slow)."""
from __future__ import annotations

import json

import pytest

pytest.importorskip("httpx")
pytest.importorskip("fastapi")

from sdrt.benchmarks import serve_load  # noqa: E402
from sdrt.benchmarks.serve_load import Outcome, summarize, write_section  # noqa: E402


def test_every_request_is_counted_once():
    outcomes = [Outcome(200, 1.0, True), Outcome(200, 3.0, True), Outcome(200, 2.0, False), Outcome(429, 0.1, False),
                Outcome(500, 0.5, False), Outcome(None, 9.0, False)]
    summary = summarize(outcomes, wall_s=4.0, planned=8)
    assert (summary["sent"], summary["ok"], summary["rejected_429"], summary["failed"]) == (6, 2, 1, 3)
    assert summary["images_per_s"] == 0.5 and summary["latency_p50_s"] == 2.0 and summary["latency_p95_s"] == 3.0


def test_refusals_over_the_memory_budget_count_only_when_they_name_it():
    outcomes = [Outcome(200, 1.0, True), Outcome(413, 0.01, False, refusal_named_limit=True), Outcome(413, 0.01, False)]
    summary = summarize(outcomes, wall_s=1.0, planned=3)
    assert (summary["ok"], summary["rejected_413"], summary["failed"]) == (1, 1, 1)


def test_the_verdict_fails_a_server_past_its_budget():
    mode = {"failed": 0, "server_peak_rss_gb": 7.9, "memory_budget_gb": 8.0}
    assert serve_load.passed({"batched": mode, "unbatched": None})
    assert not serve_load.passed({"batched": {**mode, "server_peak_rss_gb": 8.1}, "unbatched": None})
    assert not serve_load.passed({"batched": mode, "unbatched": {**mode, "failed": 1}})


def test_every_kth_request_is_oversized(tmp_path):
    plan = serve_load.LoadPlan(bundle=tmp_path, size=512, oversized_every=4, oversized_size=2048)
    sizes = [(serve_load.request_body(plan, i)["size"], serve_load.request_body(plan, i)["n"]) for i in range(8)]
    assert sizes == [("512x512", 1)] * 3 + [("2048x2048", 4)] + [("512x512", 1)] * 3 + [("2048x2048", 4)]


def test_each_kind_replaces_only_its_own_section(tmp_path):
    path = tmp_path / "SERVING.md"
    path.write_text("# Hand-written notes\n\nkept\n")
    write_section(path, "local", "## local v1")
    write_section(path, "ray", "## ray v1")
    write_section(path, "local", "## local v2")
    text = path.read_text()
    assert text.startswith("# Hand-written notes\n\nkept\n")
    assert "## local v2" in text and "## local v1" not in text and "## ray v1" in text
    assert text.index("## local v2") < text.index("## ray v1")


@pytest.mark.slow
def test_load_run_batched_and_unbatched(tiny_bundle, tmp_path):
    out, results = tmp_path / "load.json", tmp_path / "SERVING.md"
    code = serve_load.main([str(tiny_bundle), "--clients", "4", "--requests", "12", "-s", "2", "--out", str(out),
                            "--results", str(results)])
    assert code == 0
    data = json.loads(out.read_text())
    for mode in ("batched", "unbatched"):
        assert data[mode]["ok"] == data[mode]["sent"] == 12 and data[mode]["failed"] == 0
    assert data["unbatched"]["mean_batch_images"] == 1.0 and data["batched"]["mean_batch_images"] > 1.0
    assert data["throughput_ratio"] == data["batched"]["images_per_s"] / data["unbatched"]["images_per_s"]
    assert "Throughput gain of micro-batching" in results.read_text()
