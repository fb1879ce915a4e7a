"""`sdrt serve`: the HTTP API on the tiny bundle's pipeline (FastAPI's TestClient), the batcher's batching,
backpressure, deadlines and cancellation, and a real uvicorn process draining on SIGTERM."""
from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import dataclasses
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("prometheus_client")
from fastapi.testclient import TestClient  # noqa: E402

from sdrt.engine.errors import BundleError  # noqa: E402
from sdrt.serve import AppSettings, BatcherConfig, Limits, create_app  # noqa: E402
from sdrt.serve.schemas import GenerationParams  # noqa: E402
from sdrt.serve.service import ClientDisconnectedError, LocalImageService  # noqa: E402

GENERATE = "/v1/images/generations"
SMALL = {"size": "64x64", "num_inference_steps": 2}


class SpyPipe:
    """The real pipeline, recording each call's image count and steps, optionally held at a gate before running, and
    taking at least `step_seconds` per denoising step (so that a deadline or a disconnect lands mid-run however fast
    the machine is)."""

    def __init__(self, pipe, step_seconds: float = 0.0) -> None:
        self._pipe = pipe
        self.step_seconds = step_seconds
        self.calls: list[tuple[int, int]] = []  # (images, num_inference_steps)
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()

    def __getattr__(self, name):
        return getattr(self._pipe, name)

    def generate(self, request, callback_on_step_end=None):
        self.calls.append((request.num_images, request.num_inference_steps))
        self.entered.set()
        assert self.gate.wait(30), "test gate never opened"
        if self.step_seconds:
            callback_on_step_end = self._slowed(callback_on_step_end)
        return self._pipe.generate(request, callback_on_step_end)

    def _slowed(self, callback):
        def slowed(pipe, step_index, timestep, tensors):
            time.sleep(self.step_seconds)
            return callback(pipe, step_index, timestep, tensors) if callback is not None else tensors
        return slowed


def _client(pipe, batching: BatcherConfig = BatcherConfig(max_wait_s=0.0), warm: bool = False, **settings) -> TestClient:
    service = LocalImageService(lambda: pipe, batching, warm=warm)
    return TestClient(create_app(service, AppSettings(**settings)))


def wait_until_ready(base_url: str, server: subprocess.Popen, timeout_s: float) -> None:
    """Poll a server process's /readyz until it answers 200; if it exits or `timeout_s` passes first, kill it and
    fail with its output (stdout, stderr merged into it)."""
    import httpx

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if httpx.get(f"{base_url}/readyz").status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() >= deadline or server.poll() is not None:
            server.kill()
            server.wait()
            output = server.stdout.read().decode(errors="replace")
            pytest.fail(f"the server at {base_url} never became ready (exit status {server.returncode}); its output "
                        f"ends:\n{output[-6000:]}")
        time.sleep(0.1)


def _wait_ready(client: TestClient) -> None:
    deadline = time.monotonic() + 30
    while client.get("/readyz").status_code != 200:
        assert time.monotonic() < deadline, client.get("/readyz").json()
        time.sleep(0.02)


def _decode(item: dict) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(item["b64_json"]))).convert("RGB"))


def _metric(client: TestClient, name: str, labels: str = "") -> float:
    """A sample's value from /metrics, e.g. _metric(c, "sdrt_images_generated_total")."""
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(f"{name}{labels} ") or (not labels and line.startswith(name + " ")):
            return float(line.split()[-1])
    raise AssertionError(f"{name}{labels} not in /metrics")


def _parallel(client: TestClient, bodies: list[dict]) -> list:
    with concurrent.futures.ThreadPoolExecutor(len(bodies)) as pool:
        return list(pool.map(lambda body: client.post(GENERATE, json=body), bodies))


@pytest.fixture()
def spy(tiny_pipe) -> SpyPipe:
    return SpyPipe(tiny_pipe)


def test_generation_answers_openai_shape_with_n_images_of_the_size(spy):
    with _client(spy) as client:
        _wait_ready(client)
        response = client.post(GENERATE, json={"prompt": "a red circle", "n": 3, "size": "64x72", "num_inference_steps": 2,
                                               "seed": 11, "negative_prompt": "blue", "guidance_scale": 5.0,
                                               "response_format": "b64_json", "model": "sdrt", "user": "test"})
        assert response.status_code == 200, response.text
        body = response.json()
        assert isinstance(body["created"], int) and len(body["data"]) == 3
        for item in body["data"]:
            assert _decode(item).shape == (72, 64, 3)  # size is WIDTHxHEIGHT
            assert item["seed"] == 11 and item["nsfw_content_detected"] is None  # tiny_pipe runs without a checker
        # no seed given: one is drawn and returned, and it reproduces the image
        first = client.post(GENERATE, json={"prompt": "a red circle", **SMALL}).json()["data"][0]
        again = client.post(GENERATE, json={"prompt": "a red circle", **SMALL, "seed": first["seed"]}).json()["data"][0]
        assert np.array_equal(_decode(first), _decode(again))
        # the model's default size when size is omitted
        default = spy.manifest.model.default_image_size
        item = client.post(GENERATE, json={"prompt": "x", "num_inference_steps": 1}).json()["data"][0]
        assert _decode(item).shape == (default, default, 3)


@pytest.mark.parametrize(("body", "status", "param"), [
    ({"prompt": "x", "size": "64"}, 422, "size"),
    ({"prompt": "x", "size": "60x64", "num_inference_steps": 1}, 422, "size"),  # the pipeline's check, renamed
    ({"prompt": "x", "size": "64x4096", "num_inference_steps": 1}, 422, "size"),
    ({"prompt": "x", "n": 0}, 422, "n"),
    ({"prompt": "x", "n": 5}, 422, "n"),  # over --max-n
    ({"prompt": "x", "num_inference_steps": 0}, 422, "num_inference_steps"),
    ({"prompt": "x", "num_inference_steps": 151}, 422, "num_inference_steps"),
    ({"prompt": "x", "guidance_scale": "high"}, 422, "guidance_scale"),
    ({"prompt": "x", "guidance_scale": 30.5}, 422, "guidance_scale"),
    ({"prompt": "x", "guidance_scale": -0.5}, 422, "guidance_scale"),
    ({"prompt": "x", "seed": -1}, 422, "seed"),
    ({"prompt": "x", "response_format": "url"}, 422, "response_format"),
    # strict types: nothing is coerced
    ({"prompt": "x", "n": True}, 422, "n"),
    ({"prompt": "x", "n": "2"}, 422, "n"),
    ({"prompt": "x", "n": 2.0}, 422, "n"),
    ({"prompt": "x", "seed": "7"}, 422, "seed"),
    ({"prompt": "x", "guidance_scale": True}, 422, "guidance_scale"),
    ({"prompt": "x", "size": "64x64\n"}, 422, "size"),  # `$` would match before the newline
    ({"prompt": 5}, 422, "prompt"),
    # OpenAI's fields: values outside their choices
    ({"prompt": "x", "output_format": "gif"}, 422, "output_format"),
    ({"prompt": "x", "output_compression": 101}, 422, "output_compression"),
    ({"prompt": "x", "quality": "ultra"}, 422, "quality"),
    ({"prompt": "x", "style": "pastel"}, 422, "style"),
    ({"prompt": "x", "moderation": "off"}, 422, "moderation"),
    ({"prompt": "x", "background": "transparent"}, 422, "background"),
    ({"prompt": ""}, 422, "prompt"),
    ({"prompt": ["a", "b"]}, 422, "prompt"),
    ({"n": 1}, 422, "prompt"),
    ({"prompt": "x", "num_inference_step": 2}, 422, "num_inference_step"),  # misspelt: named, not ignored
    ({"prompt": "x", "image": "/etc/passwd"}, 422, "image"),  # nothing in a request names a file
])
def test_invalid_requests_name_the_parameter(tiny_pipe, body, status, param):
    with _client(tiny_pipe) as client:
        _wait_ready(client)
        response = client.post(GENERATE, json=body)
        assert response.status_code == status, response.text
        error = response.json()["error"]
        assert error["param"] == param and error["message"].startswith(param), error
        assert _metric(client, "sdrt_requests_rejected_total", '{reason="invalid"}') == 1


def test_unsupported_openai_values_say_what_to_use(tiny_pipe):
    with _client(tiny_pipe) as client:
        _wait_ready(client)
        url = client.post(GENERATE, json={"prompt": "x", "response_format": "url"}).json()["error"]["message"]
        assert "'b64_json'" in url and "'url'" in url, url
        transparent = client.post(GENERATE, json={"prompt": "x", "background": "transparent"}).json()["error"]
        assert "'opaque'" in transparent["message"], transparent


def test_openai_fields_accepted_and_ignored_leave_the_images_unchanged(tiny_pipe):
    request = {"prompt": "a red circle", "seed": 5, **SMALL}
    openai_only = {"quality": "hd", "style": "natural", "moderation": "low", "background": "opaque",
                   "model": "dall-e-3", "user": "u", "response_format": "b64_json", "output_format": "png",
                   "output_compression": 50}
    with _client(tiny_pipe) as client:
        _wait_ready(client)
        plain = client.post(GENERATE, json=request).json()
        dressed = client.post(GENERATE, json={**request, **openai_only}).json()
        auto = client.post(GENERATE, json={**request, "size": "auto", "num_inference_steps": 1}).json()
    assert (plain["output_format"], plain["size"]) == ("png", "64x64")
    assert dressed["output_format"] == "png"
    np.testing.assert_array_equal(_decode(dressed["data"][0]), _decode(plain["data"][0]))
    default = tiny_pipe.manifest.model.default_image_size
    assert auto["size"] == f"{default}x{default}" and _decode(auto["data"][0]).shape == (default, default, 3)


def test_output_format_and_compression_encode_the_same_image(tiny_pipe):
    request = {"prompt": "a red circle", "seed": 5, **SMALL}
    with _client(tiny_pipe) as client:
        _wait_ready(client)
        png = client.post(GENERATE, json=request).json()["data"][0]
        other_seed = client.post(GENERATE, json={**request, "seed": 6}).json()["data"][0]
        encoded = {}
        for output_format, compression in (("jpeg", None), ("jpeg", 10), ("webp", 90), ("webp", 10)):
            body = {**request, "output_format": output_format}
            if compression is not None:
                body["output_compression"] = compression
            answer = client.post(GENERATE, json=body).json()
            assert answer["output_format"] == output_format
            encoded[output_format, compression] = base64.b64decode(answer["data"][0]["b64_json"])
    reference = _decode(png).astype(np.int16)  # the lossless image of the same seed
    unrelated = np.abs(_decode(other_seed).astype(np.int16) - reference).mean()
    error = {}
    for key, data in encoded.items():
        image = Image.open(io.BytesIO(data))
        assert image.format == key[0].upper()
        error[key] = np.abs(np.asarray(image.convert("RGB")).astype(np.int16) - reference).mean()
        assert error[key] < unrelated / 1.5, (key, error[key], unrelated)  # lossy, but the seed's picture
    # default 100: the least compression; 10: smaller files, further from the lossless image
    assert len(encoded["jpeg", 10]) < len(encoded["jpeg", None]) and error["jpeg", 10] > error["jpeg", None]
    assert len(encoded["webp", 10]) < len(encoded["webp", 90]) and error["webp", 10] > error["webp", 90]


def test_every_error_has_the_openai_shape(tiny_pipe, caplog):
    """400, 404, 405, 422, and 500s both from a failing pipeline and from an unexpected exception: one shape, each
    500 counted as "failed" and logged once with its traceback."""

    class FailingPipe(SpyPipe):
        def generate(self, request, callback_on_step_end=None):
            raise RuntimeError("the accelerator fell over")

    service = LocalImageService(lambda: FailingPipe(tiny_pipe), BatcherConfig(max_wait_s=0.0), warm=False)
    with TestClient(create_app(service)) as client:
        _wait_ready(client)
        answers = {
            400: client.post(GENERATE, content=b'{"prompt": ', headers={"content-type": "application/json"}),
            404: client.get("/v1/models"),
            405: client.get(GENERATE),
            422: client.post(GENERATE, json={"prompt": "x", "n": 0}),
        }
        with caplog.at_level("ERROR"):
            caplog.clear()
            answers[500] = client.post(GENERATE, json={"prompt": "x", **SMALL})
            assert [r.exc_info[1].args for r in caplog.records if r.exc_info] == [("the accelerator fell over",)]

            async def unexpected(*args):
                raise KeyError("a bug")

            service.generate = unexpected
            caplog.clear()
            bug = client.post(GENERATE, json={"prompt": "x", **SMALL})
            assert [r.exc_info[0] for r in caplog.records if r.exc_info] == [KeyError]
        assert _metric(client, "sdrt_requests_rejected_total", '{reason="failed"}') == 2
    for status, response in [*answers.items(), (500, bug)]:
        assert response.status_code == status, response.text
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"], error
        assert error["type"] == ("server_error" if status >= 500 else "invalid_request_error")
    assert answers[405].headers["allow"] == "POST"
    assert "accelerator" not in answers[500].text and "a bug" not in bug.text  # the details are in the log only
    assert (answers[422].json()["error"]["code"], answers[500].json()["error"]["code"]) == ("invalid", "failed")


def test_bad_json_oversized_body_and_scheduler(tiny_pipe):
    with _client(tiny_pipe, limits=Limits(max_body_bytes=1000)) as client:
        _wait_ready(client)
        response = client.post(GENERATE, content=b'{"prompt": ', headers={"content-type": "application/json"})
        assert response.status_code == 400 and "JSON" in response.json()["error"]["message"]
        assert client.post(GENERATE, json={"prompt": "x" * 2000}).status_code == 413
        # chunked upload without a Content-Length: counted as it arrives
        chunks = iter([b'{"prompt": "', b"x" * 1500, b'"}'])
        assert client.post(GENERATE, content=chunks, headers={"content-type": "application/json"}).status_code == 413
        assert client.post(GENERATE, json={"prompt": "x", "scheduler": "ddim", **SMALL}).status_code == 200
        response = client.post(GENERATE, json={"prompt": "x", "scheduler": "heun", **SMALL})
        assert response.status_code == 422 and response.json()["error"]["param"] == "scheduler"
        assert "dpm++2m" in response.json()["error"]["message"]  # the names it takes


def test_api_key_guards_everything_but_health(tiny_pipe):
    with _client(tiny_pipe, api_key="s3cret") as client:
        _wait_ready(client)  # /readyz needs no key
        assert client.get("/healthz").status_code == 200
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}, {"Authorization": "Basic s3cret"}):
            assert client.get("/metrics", headers=headers).status_code == 401
            response = client.post(GENERATE, json={"prompt": "x", **SMALL}, headers=headers)
            assert response.status_code == 401 and response.headers["www-authenticate"] == "Bearer"
        # the key is checked before the body is read: a bad body or an unknown path without it is a 401 too
        bad_json = client.post(GENERATE, content=b'{"prompt": ', headers={"content-type": "application/json"})
        assert bad_json.status_code == 401 and bad_json.json()["error"]["code"] == "unauthorized"
        assert client.post(GENERATE, json={"prompt": "x", "n": True}).status_code == 401
        assert client.get("/v1/models").status_code == 401
        good = {"Authorization": "Bearer s3cret"}
        assert client.post(GENERATE, json={"prompt": "x", **SMALL}, headers=good).status_code == 200
        assert client.get("/metrics", headers=good).status_code == 200
        assert client.get("/v1/models", headers=good).status_code == 404
        bad_json = client.post(GENERATE, content=b'{"prompt": ', headers={**good, "content-type": "application/json"})
        assert bad_json.status_code == 400
    with _client(tiny_pipe) as client:  # no key configured: open
        _wait_ready(client)
        assert client.get("/metrics").status_code == 200


def test_ready_only_after_load_and_warm_up(spy):
    loaded = threading.Event()

    def load():
        assert loaded.wait(30)
        return spy

    service = LocalImageService(load, BatcherConfig(max_wait_s=0.0), warm=True)
    with TestClient(create_app(service)) as client:
        assert client.get("/healthz").status_code == 200
        assert client.get("/readyz").status_code == 503 and client.get("/readyz").json()["status"] == "loading"
        response = client.post(GENERATE, json={"prompt": "x", **SMALL})
        assert response.status_code == 503 and int(response.headers["retry-after"]) > 0
        spy.gate.clear()
        loaded.set()
        assert spy.entered.wait(30)  # the warm-up image is being made: still not ready
        assert client.get("/readyz").status_code == 503
        spy.gate.set()
        _wait_ready(client)
        assert spy.calls[0] == (1, 1)  # the warm-up: one image, one step
        assert client.post(GENERATE, json={"prompt": "x", **SMALL}).status_code == 200
    failures: list[str] = []
    failing = LocalImageService(lambda: (_ for _ in ()).throw(OSError("no bundle here")), BatcherConfig(),
                                on_failure=failures.append)
    with TestClient(create_app(failing)) as client:
        time.sleep(0.2)
        assert client.get("/readyz").status_code == 503 and "no bundle here" in client.get("/readyz").json()["status"]
    assert failures == ["OSError: no bundle here"]  # once: the server stops on it


def test_waiting_for_the_bundle_retries_only_bundle_errors(spy):
    attempts: list[float] = []

    def load():
        attempts.append(time.monotonic())
        if len(attempts) < 3:
            raise BundleError("bundle directory /mnt/later does not exist")
        return spy

    failures: list[str] = []
    waiting = LocalImageService(load, BatcherConfig(max_wait_s=0.0), warm=False, wait_for_bundle_s=0.05,
                                on_failure=failures.append)
    with TestClient(create_app(waiting)) as client:
        _wait_ready(client)
        assert client.post(GENERATE, json={"prompt": "x", **SMALL}).status_code == 200
    assert len(attempts) == 3 and failures == [] and attempts[2] - attempts[0] >= 0.1
    # another error is final even when waiting; and a stop while waiting ends the wait at once
    broken = LocalImageService(lambda: (_ for _ in ()).throw(OSError("disk")), BatcherConfig(), wait_for_bundle_s=0.05,
                               on_failure=failures.append)
    with TestClient(create_app(broken)):
        time.sleep(0.2)
    assert failures == ["OSError: disk"]
    never = LocalImageService(lambda: (_ for _ in ()).throw(BundleError("not yet")), BatcherConfig(),
                              wait_for_bundle_s=3600)
    started = time.monotonic()
    with TestClient(create_app(never)) as client:
        assert client.get("/readyz").json()["status"] == "loading"
    assert time.monotonic() - started < 10


def test_metrics_count_images_stages_and_rejections(spy):
    with _client(spy, batching=BatcherConfig(max_queue=1, max_batch_images=1, max_wait_s=0.0)) as client:
        _wait_ready(client)
        assert client.post(GENERATE, json={"prompt": "x", "n": 2, **SMALL}).status_code == 200
        client.post(GENERATE, json={"prompt": "x", "n": 0})
        text = client.get("/metrics").text
        assert _metric(client, "sdrt_images_generated_total") == 2
        assert _metric(client, "sdrt_images_blocked_total") == 0
        assert _metric(client, "sdrt_denoising_steps_total") == len(spy.scheduler.start(2).timesteps)  # PNDM: 3
        assert _metric(client, "sdrt_request_seconds_count") == 1
        assert _metric(client, "sdrt_queue_depth") == 0
        for stage in ("text_encode", "unet", "decode"):
            assert f'sdrt_stage_seconds_count{{stage="{stage}"}} 1.0' in text
        assert 'sdrt_requests_rejected_total{reason="invalid"} 1.0' in text
        assert 'sdrt_requests_rejected_total{reason="queue_full"} 0.0' in text


def test_full_queue_answers_429_with_retry_after(spy):
    with _client(spy, batching=BatcherConfig(max_queue=1, max_batch_images=1, max_wait_s=0.0)) as client:
        _wait_ready(client)
        spy.gate.clear()
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            running = pool.submit(client.post, GENERATE, json={"prompt": "a", **SMALL})
            assert spy.entered.wait(30)  # the worker holds the first request
            queued = pool.submit(client.post, GENERATE, json={"prompt": "b", **SMALL})
            while _metric(client, "sdrt_queue_depth") < 1:
                time.sleep(0.01)
            refused = client.post(GENERATE, json={"prompt": "c", **SMALL})
            assert refused.status_code == 429 and int(refused.headers["retry-after"]) >= 1
            spy.gate.set()
            assert running.result().status_code == 200 and queued.result().status_code == 200
        assert _metric(client, "sdrt_requests_rejected_total", '{reason="queue_full"}') == 1


def test_deadline_answers_504_and_stops_work_between_steps(tiny_pipe):
    steps = 150  # at least 3 s: the deadline lands mid-run
    with _client(SpyPipe(tiny_pipe, step_seconds=0.02), request_timeout_s=0.5) as client:
        _wait_ready(client)
        response = client.post(GENERATE, json={"prompt": "x", "size": "64x64", "num_inference_steps": steps})
        assert response.status_code == 504, response.text
        while _metric(client, "sdrt_requests_in_flight") > 0:
            time.sleep(0.02)
        ran = _metric(client, "sdrt_denoising_steps_total")
        assert 0 < ran < steps  # started, then stopped between steps
        time.sleep(0.3)
        assert _metric(client, "sdrt_denoising_steps_total") == ran
        assert _metric(client, "sdrt_images_generated_total") == 0
        assert _metric(client, "sdrt_requests_rejected_total", '{reason="deadline"}') == 1


def test_client_disconnect_cancels_its_work(tiny_pipe):
    """Raw ASGI: the client's receive channel says http.disconnect while its request is being generated."""
    slow = SpyPipe(tiny_pipe, step_seconds=0.02)  # 150 steps take at least 3 s: the disconnect at 0.4 s lands mid-run
    service = LocalImageService(lambda: slow, BatcherConfig(max_wait_s=0.0), warm=False)
    app = create_app(service)
    service.start()
    body = json.dumps({"prompt": "x", "size": "64x64", "num_inference_steps": 150}).encode()
    sent: list[dict] = []

    async def scenario():
        while service.status() != "ready":
            await asyncio.sleep(0.02)
        requested, started = False, time.monotonic()

        async def receive():  # as servers do: the disconnect is there at once once it happened, else receive waits
            nonlocal requested
            if not requested:
                requested = True
                return {"type": "http.request", "body": body, "more_body": False}
            if time.monotonic() - started > 0.4:
                return {"type": "http.disconnect"}
            await asyncio.sleep(3600)

        async def send(message):
            sent.append(message)

        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
                 "path": GENERATE, "raw_path": GENERATE.encode(), "query_string": b"", "root_path": "",
                 "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
                 "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}
        await app(scope, receive, send)
        await service.stop()

    asyncio.run(scenario())
    assert sent[0]["status"] == 499
    metrics = service.metrics
    assert 0 < metrics.denoising_steps._value.get() < 150
    assert metrics.rejections.labels("disconnected")._value.get() == 1
    assert metrics.images_generated._value.get() == 0


def test_service_reports_disconnect_before_the_batch_runs(spy):
    """A request still queued when its client leaves never reaches the pipeline."""
    service = LocalImageService(lambda: spy, BatcherConfig(max_wait_s=0.0, max_batch_images=1), warm=False)
    service.start()
    params = GenerationParams("x", None, 1, 64, 64, 2, 7.5, 0, None)

    async def scenario():
        while service.status() != "ready":
            await asyncio.sleep(0.02)
        spy.gate.clear()
        first = asyncio.ensure_future(service.generate(params, time.monotonic() + 30, _never))
        while not spy.entered.is_set():
            await asyncio.sleep(0.01)
        with pytest.raises(ClientDisconnectedError):
            await service.generate(dataclasses.replace(params, prompt="gone"), time.monotonic() + 30, _soon())
        spy.gate.set()
        await first
        await service.stop()

    asyncio.run(scenario())
    assert spy.calls == [(1, 2)]


async def _never() -> bool:
    return False


def _soon():
    started = time.monotonic()

    async def disconnected() -> bool:
        return time.monotonic() - started > 0.2

    return disconnected


def test_compatible_requests_share_a_batch_and_incompatible_ones_do_not(spy):
    with _client(spy, batching=BatcherConfig(max_batch_images=8, max_wait_s=1.0)) as client:
        _wait_ready(client)
        bodies = [{"prompt": f"p{i}", "size": "64x64", "num_inference_steps": 2 + i % 2, "n": 1 + i // 2} for i in range(4)]
        bodies += [{"prompt": "other size", "size": "64x72", "num_inference_steps": 2}]
        responses = _parallel(client, bodies)
        assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
        # steps 2: n=1 and n=2 (3 images); steps 3: n=1 and n=2 (3 images); 64x72 alone
        assert sorted(spy.calls) == [(1, 2), (3, 2), (3, 3)]
        assert [len(r.json()["data"]) for r in responses] == [1, 1, 2, 2, 1]
    spy.calls.clear()
    with _client(spy, batching=BatcherConfig(max_batch_images=2, max_wait_s=1.0)) as client:  # the image budget
        _wait_ready(client)
        _parallel(client, [{"prompt": f"p{i}", **SMALL} for i in range(4)])
        assert spy.calls == [(2, 2), (2, 2)]


def test_same_seed_same_image_alone_or_in_a_batch(spy):
    request = {"prompt": "a green square", "n": 2, "seed": 1234, "negative_prompt": None, **SMALL}
    with _client(spy, batching=BatcherConfig(max_batch_images=1, max_wait_s=0.0)) as client:
        _wait_ready(client)
        alone = [_decode(item) for item in client.post(GENERATE, json=request).json()["data"]]
    assert spy.calls == [(2, 2)]
    with _client(spy, batching=BatcherConfig(max_batch_images=8, max_wait_s=1.0)) as client:
        _wait_ready(client)
        others = [{"prompt": f"other {i}", "seed": i, "negative_prompt": "blurry", **SMALL} for i in range(3)]
        responses = _parallel(client, [others[0], request, *others[1:]])
    assert spy.calls[-1] == (5, 2)  # one batch of all four requests
    batched = [_decode(item) for item in responses[1].json()["data"]]
    # onnxruntime-cpu gives bit-identical images for a request whatever it shares its batch with
    assert all(np.array_equal(a, b) for a, b in zip(alone, batched))
    assert not np.array_equal(batched[0], batched[1])  # the seed's two draws: two different images


def test_a_stochastic_sampler_gives_each_request_its_seeds_image_in_a_batch(spy, tiny_pipe):
    """euler_a draws step noise from the call's seed: batched requests run one by one, each as its own seed's call."""
    request = {"prompt": "a green square", "seed": 7, "scheduler": "euler_a", **SMALL}
    with _client(spy, batching=BatcherConfig(max_batch_images=8, max_wait_s=1.0)) as client:
        _wait_ready(client)
        calls_before = len(spy.calls)
        responses = _parallel(client, [{**request, "prompt": "another", "seed": 1}, request])
    assert spy.calls[calls_before:] == [(1, 2), (1, 2)]  # one batch, run as two lone calls
    direct = tiny_pipe("a green square", seed=7, scheduler="euler_a", num_inference_steps=2, height=64, width=64).images[0]
    np.testing.assert_array_equal(_decode(responses[1].json()["data"][0]), np.asarray(direct))


def test_failing_request_does_not_fail_its_batch_partners(spy):
    """A size the pipeline refuses, batched with good requests: only it gets the 422."""
    with _client(spy, batching=BatcherConfig(max_batch_images=8, max_wait_s=1.0)) as client:
        _wait_ready(client)
        bad = {"prompt": "x", "size": "60x64", "num_inference_steps": 2}
        responses = _parallel(client, [bad, {"prompt": "y", **SMALL}])
        assert [r.status_code for r in responses] == [422, 200]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sigterm_drains_in_flight_requests_then_exits(tiny_bundle):
    import httpx

    port = _free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    server = subprocess.Popen(
        [sys.executable, "-m", "sdrt.cli", "serve", str(tiny_bundle), "--port", str(port), "--backend",
         "onnxruntime-cpu", "--safety-checker", "off", "--max-wait-ms", "1"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until_ready(base, server, timeout_s=60)
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            in_flight = pool.submit(httpx.post, f"{base}{GENERATE}", timeout=60,
                                    json={"prompt": "x", "size": "64x64", "num_inference_steps": 150})
            # bounded: a request that ended before /metrics could show it in flight would otherwise spin here forever
            deadline = time.monotonic() + 30
            while "sdrt_requests_in_flight 1.0" not in httpx.get(f"{base}/metrics").text:
                assert not in_flight.done(), "the request ended before /metrics showed it in flight"
                assert time.monotonic() < deadline, "/metrics never showed the request in flight"
                time.sleep(0.02)
            server.send_signal(signal.SIGTERM)
            response = in_flight.result()
        assert response.status_code == 200 and len(response.json()["data"]) == 1
        assert server.wait(30) == 128 + signal.SIGTERM  # the CLI's exit status for SIGTERM, after the drain
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{base}/healthz")
    finally:
        if server.poll() is None:
            server.kill()
        output = server.stdout.read().decode()
    assert "shutting down: finishing accepted requests" in output or "Shutting down" in output, output


def _serve_command(bundle, port: int, *options: str) -> list[str]:
    return [sys.executable, "-m", "sdrt.cli", "serve", str(bundle), "--port", str(port), "--backend",
            "onnxruntime-cpu", "--safety-checker", "off", *options]


def test_a_bundle_that_cannot_load_makes_serve_exit(tiny_bundle, tmp_path):
    """Missing: refused before the port is bound (status 2, as `sdrt generate` would). Damaged: the server stops once
    loading finds it (status 1). Neither waits for anything."""
    nowhere = tmp_path / "nowhere"
    missing = subprocess.run(_serve_command(nowhere, _free_port()), capture_output=True, text=True, timeout=60)
    assert missing.returncode == 2, missing.stderr
    assert missing.stderr.strip().splitlines()[-1] == f"sdrt: error: bundle directory {nowhere} does not exist"
    damaged = Path(shutil.copytree(tiny_bundle, tmp_path / "damaged"))
    data = bytearray((damaged / "unet/model.onnx").read_bytes())
    data[-5] ^= 0x01  # same size, another sha256
    (damaged / "unet/model.onnx").write_bytes(bytes(data))
    failed = subprocess.run(_serve_command(damaged, _free_port()), capture_output=True, text=True, timeout=60)
    assert failed.returncode == 1, failed.stderr
    last = failed.stderr.strip().splitlines()[-1]
    assert last.startswith(f"sdrt: error: loading the bundle {damaged} failed: BundleError: "), last
    assert "unet/model.onnx does not match its sha256" in last, last


def test_wait_for_bundle_serves_once_the_bundle_appears(tiny_bundle, tmp_path):
    import httpx

    later, port = tmp_path / "mounted-later", _free_port()
    server = subprocess.Popen(_serve_command(later, port, "--wait-for-bundle", "--no-warm-up"),
                              env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                health = httpx.get(f"{base}/healthz")
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline and server.poll() is None, "the server never answered /healthz"
                time.sleep(0.1)
        assert health.status_code == 200 and httpx.get(f"{base}/readyz").json()["status"] == "loading"
        refused = httpx.post(f"{base}{GENERATE}", json={"prompt": "x", **SMALL})
        assert refused.status_code == 503 and int(refused.headers["retry-after"]) > 0
        shutil.copytree(tiny_bundle, later)
        wait_until_ready(base, server, timeout_s=60)
        assert httpx.post(f"{base}{GENERATE}", json={"prompt": "x", **SMALL}, timeout=60).status_code == 200
        server.send_signal(signal.SIGTERM)
        assert server.wait(30) == 128 + signal.SIGTERM
    finally:
        if server.poll() is None:
            server.kill()
        output = server.stdout.read().decode(errors="replace")
    assert output.count("waiting for the bundle") == 1, output  # logged once, not once per try


def test_cli_checks_serve_options_and_names_the_missing_extra(tiny_bundle, monkeypatch, capsys):
    from sdrt.cli.main import main

    assert main(["serve", str(tiny_bundle), "--replicas", "2"]) == 2
    assert "--replicas: Ray options need --ray" in capsys.readouterr().err
    assert main(["serve", str(tiny_bundle), "--max-queue", "0"]) == 2
    assert "--max-queue" in capsys.readouterr().err
    assert main(["serve", str(tiny_bundle), "--ray-temp-dir", "/tmp/r"]) == 2
    assert "--ray-temp-dir: Ray options need --ray" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "sdrt.serve", None)  # as if fastapi & co. were not installed
    assert main(["serve", str(tiny_bundle)]) == 2
    assert "pip install 'sdrt[serve]'" in capsys.readouterr().err

