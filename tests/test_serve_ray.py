"""`sdrt serve --ray`: the same API on a local Ray cluster (started by the command itself): images equal to the
local server's for the same seed, concurrent requests answered (a bad one failing alone, with its parameter), and a
drain on SIGTERM that finishes the request in flight. Slow: Ray takes 20-40 s to start on 2 cores.

The server starts a Ray instance of its own (never one already running on the machine, which `ray.init()` would
join), with its own temp dir (session files, sockets) and free ports, so the test passes beside other Ray users."""
from __future__ import annotations

import base64
import concurrent.futures
import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("ray.serve")
httpx = pytest.importorskip("httpx")

from fastapi.testclient import TestClient  # noqa: E402

from sdrt.serve import BatcherConfig, create_app  # noqa: E402
from sdrt.serve.service import LocalImageService  # noqa: E402
from tests.test_serve import wait_until_ready  # noqa: E402

pytestmark = pytest.mark.slow

GENERATE = "/v1/images/generations"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pixels(item: dict) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(item["b64_json"]))).convert("RGB"))


def test_ray_serve_answers_like_the_local_server_and_drains(tiny_bundle, tiny_pipe):
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    # Short, under /tmp: Ray's socket paths inside it must stay under 108 characters.
    ray_temp_dir = tempfile.mkdtemp(prefix="sdrt-ray-", dir="/tmp")
    env = {name: value for name, value in os.environ.items() if name != "RAY_ADDRESS"}
    server = subprocess.Popen(
        [sys.executable, "-m", "sdrt.cli", "serve", str(tiny_bundle), "--ray", "--port", str(port), "--backend",
         "onnxruntime-cpu", "--safety-checker", "off", "--replicas", "1", "--max-wait-ms", "500",
         "--ray-temp-dir", ray_temp_dir],
        env={**env, "RAY_USAGE_STATS_ENABLED": "0"}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    request = {"prompt": "a blue triangle", "size": "64x64", "num_inference_steps": 3, "seed": 99, "n": 2}
    try:
        wait_until_ready(base, server, timeout_s=180)
        bodies = [request, *({"prompt": f"p{i}", "size": "64x64", "num_inference_steps": 3, "seed": i} for i in range(3)),
                  {"prompt": "bad", "size": "60x64", "num_inference_steps": 3}]
        with concurrent.futures.ThreadPoolExecutor(len(bodies)) as pool:
            responses = list(pool.map(lambda body: httpx.post(f"{base}{GENERATE}", json=body, timeout=120), bodies))
        assert [r.status_code for r in responses] == [200] * 4 + [422], [r.text for r in responses]
        assert responses[-1].json()["error"]["param"] == "size"
        ray_images = [_pixels(item) for item in responses[0].json()["data"]]
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            in_flight = pool.submit(httpx.post, f"{base}{GENERATE}", timeout=120,
                                    json={"prompt": "x", "size": "64x64", "num_inference_steps": 150, "n": 4})
            time.sleep(1.0)
            server.send_signal(signal.SIGTERM)
            assert in_flight.result().status_code == 200  # finished during the drain
        assert server.wait(120) == 0
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
        log = server.stdout.read().decode(errors="replace")
        print(log[-6000:])  # pytest shows it when the test fails
        shutil.rmtree(ray_temp_dir, ignore_errors=True)
    assert "stopping: Ray Serve finishes" in log, log[-3000:]
    # The local server's images for the same request: the same function generated both
    with TestClient(create_app(LocalImageService(lambda: tiny_pipe, BatcherConfig(max_wait_s=0.0), warm=False))) as client:
        while client.get("/readyz").status_code != 200:
            time.sleep(0.02)
        local_images = [_pixels(item) for item in client.post(GENERATE, json=request).json()["data"]]
    assert all(np.array_equal(a, b) for a, b in zip(ray_images, local_images))
