"""`sdrt serve --memory-budget`: a request whose estimated memory is over the budget even alone is refused at once
with 413 naming the budget and what would fit; micro-batches grow only while their estimate fits; /metrics shows
the budget and the admitted work's estimate."""
from __future__ import annotations

import threading
import time

import pytest

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from sdrt.engine.backends import OnnxRuntimeCPUBackend  # noqa: E402
from sdrt.engine.host_memory import MemoryBudget, format_bytes, process_rss_bytes  # noqa: E402
from sdrt.engine.manifest import read_manifest  # noqa: E402
from sdrt.engine.memory_estimate import MemoryModel  # noqa: E402
from sdrt.serve import AppSettings, BatcherConfig, create_app  # noqa: E402
from sdrt.serve.admission import MemoryAdmission, RequestTooLargeError  # noqa: E402
from sdrt.serve.batcher import Batcher  # noqa: E402
from sdrt.serve.execution import BatchResult, GeneratedImage  # noqa: E402
from sdrt.serve.metrics import ServeMetrics  # noqa: E402
from sdrt.serve.schemas import GenerationParams  # noqa: E402
from sdrt.serve.service import LocalImageService  # noqa: E402

pytestmark = pytest.mark.skipif(process_rss_bytes() is None, reason="the resting RSS is read from /proc")

GENERATE = "/v1/images/generations"


def _metric(client: TestClient, name: str) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{name} not in /metrics")


def test_a_request_over_the_budget_alone_gets_413_naming_the_budget_and_what_fits(tiny_pipe):
    # Room for the tiny model and a few hundred MB of work: a 512x512 request's self-attention alone is 1.1 GB an image.
    budget = process_rss_bytes() + (300 << 20)
    service = LocalImageService(lambda: tiny_pipe, BatcherConfig(max_wait_s=0.0), warm=False,
                                memory_budget=MemoryBudget(bytes=budget))
    with TestClient(create_app(service, AppSettings())) as client:
        deadline = time.monotonic() + 30
        while client.get("/readyz").status_code != 200:
            assert time.monotonic() < deadline, client.get("/readyz").json()
            time.sleep(0.02)
        refused = client.post(GENERATE, json={"prompt": "x", "size": "512x512", "n": 4, "num_inference_steps": 1})
        assert refused.status_code == 413, refused.text
        error = refused.json()["error"]
        assert error["type"] == "invalid_request_error" and error["param"] == "size"
        assert error["message"].startswith("size 512x512 with n=4 needs about ")
        assert f"over this server's memory budget of {format_bytes(budget)} (--memory-budget)" in error["message"]
        suggested = error["message"].rsplit("; what fits: ", 1)[1]  # e.g. "192x192 with n=4"
        side = suggested.split("x")[0]
        assert suggested == f"{side}x{side} with n=4", error["message"]
        # what the refusal suggests runs
        fits = client.post(GENERATE, json={"prompt": "x", "size": f"{side}x{side}", "n": 4, "num_inference_steps": 1})
        assert fits.status_code == 200, fits.text
        assert len(fits.json()["data"]) == 4
        assert _metric(client, 'sdrt_requests_rejected_total{reason="too_large"}') == 1
        assert _metric(client, "sdrt_memory_budget_bytes") == budget
        # at rest, the admitted estimate is the process's resting RSS, within the budget
        assert 0 < _metric(client, "sdrt_memory_admitted_bytes") < budget


def _params(n: int, seed: int, size: int = 384) -> GenerationParams:
    return GenerationParams("a cat", None, n, size, size, 2, 7.5, seed, None)


def test_micro_batches_grow_only_while_their_estimate_fits_the_budget(tiny_bundle):
    model = MemoryModel.for_bundle(read_manifest(tiny_bundle), OnnxRuntimeCPUBackend, process_rss_bytes())
    # room for a batch of two 384x384 images, not three (the third adds 0.4 GB of attention scores)
    budget = (model.peak_bytes(384, 384, 2, True) + model.peak_bytes(384, 384, 3, True)) // 2
    metrics = ServeMetrics()
    admission = MemoryAdmission(model, budget, max_image_size=2048, metrics=metrics)
    batches, admitted, entered, gate = [], [], threading.Event(), threading.Event()

    def run(requests, _should_stop):
        entered.set()
        assert gate.wait(10)
        batches.append([r.seed for r in requests])
        admitted.append(metrics.registry.get_sample_value("sdrt_memory_admitted_bytes"))
        return BatchResult([[GeneratedImage(b"png", None)] * r.n for r in requests], {})

    batcher = Batcher(run, BatcherConfig(max_batch_images=8, max_wait_s=0.0), metrics, admission)
    try:
        first = batcher.submit(_params(1, 0), time.monotonic() + 30)
        assert entered.wait(10)  # the worker holds the first batch: the rest queue up behind it
        jobs = [first] + [batcher.submit(_params(1, seed), time.monotonic() + 30) for seed in range(1, 6)]
        with pytest.raises(RequestTooLargeError, match=r"at most n=2 at this size"):
            batcher.submit(_params(3, 9), time.monotonic() + 30)  # never fits: refused, never queued
        assert batcher.queue_depth == 5
        gate.set()
        for job in jobs:
            job.future.result(10)
    finally:
        gate.set()
        batcher.close(10)
    # max_batch_images would take all five waiting requests at once: the budget splits them in pairs, in order
    assert batches == [[0], [1, 2], [3, 4], [5]]
    # the gauge counts each running batch's estimate: a pair more than one image, and never over the budget
    assert admitted[0] < admitted[1] and admitted[3] < admitted[2] and max(admitted) <= budget
