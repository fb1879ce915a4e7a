"""Load test of `sdrt serve` on loopback: concurrent clients, a bounded number of requests and seconds, with
micro-batching on and then off in one run, so their throughput ratio is taken on the same machine minutes apart.

    python -m sdrt.benchmarks.serve_load BUNDLE [--clients 16] [--requests 200] [--ray] [--results benchmarks/SERVING.md]
        [--memory-budget 12G] [--oversized-every 5 --oversized-size 2048] [--batched-only]

Each mode starts its own server process (`sdrt serve`, or `sdrt serve --ray`) on a free 127.0.0.1 port, waits for
/readyz, runs the clients, reads the server's batch sizes from /metrics and its peak resident set from /proc (local
server), and stops it with SIGTERM. With `--oversized-every K`, every K-th request asks for more than the server's
memory budget can hold (`--oversized-size` pixels a side, 4 images), which the server must refuse at once with 413.
Every request is accounted for: answered with its images, refused with a declared 429 or 413 (OpenAI-shaped body
naming the limit), or failed (any other answer, a transport error, or an answer without its images) — the run's
verdict is that the last count is zero.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import dataclasses
import datetime
import io
import json
import logging
import re
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sdrt.benchmarks.bench import _machine
from sdrt.benchmarks.sections import replace_section
from sdrt.engine.atomic import atomic_file

logger = logging.getLogger(__name__)

SHAPES, COLOURS = ("circle", "square", "triangle"), ("red", "green", "blue", "yellow")
#: the markers around the section of SERVING.md one kind of server (local or ray) owns; the rest is kept
SECTION = "<!-- serve_load:{kind} {edge} -->"


@dataclasses.dataclass(frozen=True)
class LoadPlan:
    bundle: Path
    clients: int = 16
    requests: int = 200
    time_limit_s: float = 600.0  # per mode: no new request after it
    steps: int = 4
    size: int = 64
    max_batch_images: int = 8
    max_wait_ms: float = 50.0
    backend: str = "onnxruntime-cpu"
    ray: bool = False
    replicas: int = 1
    memory_budget: str | None = None  # `sdrt serve --memory-budget`; None: the server's default
    oversized_every: int = 0  # every K-th request over the budget (0: none)
    oversized_size: int = 2048
    unbatched: bool = True  # also run the mode without batching


@dataclasses.dataclass(frozen=True)
class Outcome:
    status: int | None  # None: no HTTP answer (transport error)
    latency_s: float
    images_ok: bool
    refusal_named_limit: bool = False  # a 413 whose body names the memory budget


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _server_command(plan: LoadPlan, port: int, batch_images: int) -> list[str]:
    command = [sys.executable, "-m", "sdrt.cli", "serve", str(plan.bundle), "--host", "127.0.0.1", "--port", str(port),
               "--backend", plan.backend, "--safety-checker", "off", "--max-batch-images", str(batch_images),
               "--max-wait-ms", str(plan.max_wait_ms), "--max-queue", str(max(64, plan.clients * 2))]
    if plan.ray:
        command += ["--ray", "--replicas", str(plan.replicas)]
    if plan.memory_budget is not None:
        command += ["--memory-budget", plan.memory_budget]
    return command


def request_body(plan: LoadPlan, index: int) -> dict[str, Any]:
    """The index-th request: a one-image prompt at the plan's size, or, every `oversized_every`-th, four images at
    `oversized_size`."""
    oversized = plan.oversized_every and index % plan.oversized_every == plan.oversized_every - 1
    side, n = (plan.oversized_size, 4) if oversized else (plan.size, 1)
    return {"prompt": f"a {COLOURS[index % 4]} {SHAPES[index % 3]} on a white background", "size": f"{side}x{side}",
            "n": n, "num_inference_steps": plan.steps, "seed": index}


async def _wait_ready(client, base: str, server: subprocess.Popen, timeout_s: float = 300.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited with status {server.returncode} before it was ready")
        try:
            if (await client.get(f"{base}/readyz")).status_code == 200:
                return
        except httpx.TransportError:
            pass
        await asyncio.sleep(0.2)
    raise TimeoutError(f"the server was not ready within {timeout_s} s")


async def _clients(client, base: str, plan: LoadPlan) -> tuple[list[Outcome], float]:
    import httpx

    next_index, deadline = 0, time.monotonic() + plan.time_limit_s
    outcomes: list[Outcome] = []

    async def one_client() -> None:
        nonlocal next_index
        while next_index < plan.requests and time.monotonic() < deadline:
            index, next_index = next_index, next_index + 1
            body = request_body(plan, index)
            started = time.monotonic()
            try:
                response = await client.post(f"{base}/v1/images/generations", json=body)
            except httpx.HTTPError:
                outcomes.append(Outcome(None, time.monotonic() - started, False))
                continue
            latency = time.monotonic() - started
            outcomes.append(Outcome(response.status_code, latency, response.status_code == 200 and _has_image(response.json()),
                                    response.status_code == 413 and _names_the_limit(response.json())))

    started = time.monotonic()
    await asyncio.gather(*(one_client() for _ in range(plan.clients)))
    return outcomes, time.monotonic() - started


def _has_image(body: dict) -> bool:
    from PIL import Image

    try:
        for item in body["data"]:
            with Image.open(io.BytesIO(base64.b64decode(item["b64_json"]))) as image:
                image.load()
        return bool(body["data"])
    except (KeyError, TypeError, ValueError, OSError):
        return False


def _names_the_limit(body: dict) -> bool:
    """An OpenAI-shaped refusal whose message names the memory budget."""
    try:
        return "--memory-budget" in body["error"]["message"]
    except (KeyError, TypeError):
        return False


def _peak_rss_gb(pid: int) -> float | None:
    """The process's peak resident set so far (VmHWM), None where /proc does not tell."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    found = re.search(r"^VmHWM:\s+(\d+) kB", status, re.MULTILINE)
    return int(found.group(1)) * 1024 / 1e9 if found else None


def _mean_batch(metrics_text: str) -> float | None:
    """Mean images per U-Net batch from the server's /metrics (None where the server does not batch itself)."""
    values = dict(re.findall(r"^(sdrt_batch_images_(?:sum|count)) (\S+)$", metrics_text, re.MULTILINE))
    count = float(values.get("sdrt_batch_images_count", 0))
    return float(values["sdrt_batch_images_sum"]) / count if count else None


async def run_mode(plan: LoadPlan, batch_images: int) -> dict[str, Any]:
    """Start a server batching up to `batch_images` images, load it, stop it; its summary."""
    import httpx

    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(_server_command(plan, port, batch_images), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        limits = httpx.Limits(max_connections=plan.clients + 2, max_keepalive_connections=plan.clients + 2)
        async with httpx.AsyncClient(timeout=plan.time_limit_s + 60, limits=limits) as client:
            await _wait_ready(client, base, server)
            outcomes, wall_s = await _clients(client, base, plan)
            metrics_text = (await client.get(f"{base}/metrics")).text
            peak_rss_gb = None if plan.ray else _peak_rss_gb(server.pid)
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(120)
        except subprocess.TimeoutExpired:
            server.kill()
        stderr = server.stderr.read().decode(errors="replace") if server.stderr else ""
    summary = summarize(outcomes, wall_s, plan.requests)
    summary.update(max_batch_images=batch_images, mean_batch_images=_mean_batch(metrics_text), server_peak_rss_gb=peak_rss_gb,
                   server_exit_status=server.returncode, memory_budget_gb=_memory_budget_gb(metrics_text))
    if summary["failed"]:
        logger.warning("server log tail:\n%s", stderr[-3000:])
    return summary


def _memory_budget_gb(metrics_text: str) -> float | None:
    found = re.search(r"^sdrt_memory_budget_bytes (\S+)$", metrics_text, re.MULTILINE)
    return float(found.group(1)) / 1e9 if found else None


def summarize(outcomes: Sequence[Outcome], wall_s: float, planned: int) -> dict[str, Any]:
    ok = [o for o in outcomes if o.status == 200 and o.images_ok]
    latencies = sorted(o.latency_s for o in ok)
    declared = [o for o in outcomes if o.status == 429 or (o.status == 413 and o.refusal_named_limit)]
    return {
        "planned": planned,
        "sent": len(outcomes),
        "ok": len(ok),
        "rejected_429": sum(1 for o in outcomes if o.status == 429),
        "rejected_413": sum(1 for o in outcomes if o.status == 413 and o.refusal_named_limit),
        "failed": len(outcomes) - len(ok) - len(declared),
        "wall_s": wall_s,
        "images_per_s": len(ok) / wall_s if wall_s else 0.0,
        "latency_p50_s": statistics.median(latencies) if latencies else None,
        "latency_p95_s": latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))] if latencies else None,
    }


async def run_load(plan: LoadPlan) -> dict[str, Any]:
    """Batching on, then off (max 1 image per batch), on the same plan; both summaries and their throughput ratio."""
    batched = await run_mode(plan, plan.max_batch_images)
    unbatched = await run_mode(plan, 1) if plan.unbatched else None
    return {
        "kind": "ray" if plan.ray else "local",
        "started_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": _machine(),  # the same description `sdrt bench` records
        "plan": {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(plan).items()},
        "batched": batched,
        "unbatched": unbatched,
        "throughput_ratio": batched["images_per_s"] / unbatched["images_per_s"] if unbatched and unbatched["images_per_s"] else None,
    }


def _seconds(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f}"


def _gigabytes(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


def markdown(results: dict[str, Any], command: str) -> str:
    """The section SERVING.md keeps for this kind of server."""
    plan = results["plan"]
    title = f"Ray Serve ({plan['replicas']} replica(s), `@serve.batch`)" if results["kind"] == "ray" else "`sdrt serve` (one process)"
    header = ["batching", "sent", "ok", "429", "413", "failed", "p50 s", "p95 s", "images/s", "mean images per batch",
              "server peak RSS GB", "budget GB"]
    rows = []
    for mode in ("batched", "unbatched"):
        s = results[mode]
        if s is None:
            continue
        label = f"on (≤ {s['max_batch_images']} images, {plan['max_wait_ms']:g} ms)" if mode == "batched" else "off"
        rows.append([label, str(s["sent"]), str(s["ok"]), str(s["rejected_429"]), str(s.get("rejected_413", 0)), str(s["failed"]),
                     _seconds(s["latency_p50_s"]), _seconds(s["latency_p95_s"]), f"{s['images_per_s']:.2f}",
                     "—" if s["mean_batch_images"] is None else f"{s['mean_batch_images']:.2f}",
                     _gigabytes(s.get("server_peak_rss_gb")), _gigabytes(s.get("memory_budget_gb"))])
    ratio = results["throughput_ratio"]
    lines = [
        f"## {title}",
        "",
        f"- Run: {results['started_utc']}, `{command}`",
        f"- Machine: {results['machine']['cpu']}, {results['machine']['cores']} cores, Python {results['machine']['python']}, "
        f"{', '.join(f'{k} {v}' for k, v in results['machine']['versions'].items() if v and k in ('sdrt', 'onnxruntime'))}",
        f"- Workload: {plan['clients']} concurrent clients on loopback, {plan['requests']} requests per mode (at most "
        f"{plan['time_limit_s']:g} s), {plan['size']}×{plan['size']}, {plan['steps']} steps, guidance 7.5, one image each, "
        f"backend {plan['backend']}, safety checker off; latency = request sent → images received."
        + (f" Every {plan['oversized_every']}th request asks for 4 images at {plan['oversized_size']}×{plan['oversized_size']}, "
           "over the memory budget: the server must refuse it at once (413 naming the budget)." if plan["oversized_every"] else "")
        + (f" Memory budget: `--memory-budget {plan['memory_budget']}`." if plan["memory_budget"] else ""),
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *("| " + " | ".join(row) + " |" for row in rows),
        "",
        f"Throughput gain of micro-batching: **{ratio:.2f}×** (images/s batched ÷ unbatched, same run)." if ratio else "",
    ]
    return "\n".join(lines)


def write_section(path: Path, kind: str, section: str) -> None:
    """Replace this kind's marked section of `path` (or add it), keeping everything else; atomically."""
    begin, end = SECTION.format(kind=kind, edge="begin"), SECTION.format(kind=kind, edge="end")
    replace_section(path, begin, end, section, (
        "# sdrt serving load tests\n\nWritten by `python -m sdrt.benchmarks.serve_load` (one section per kind of server; "
        "each run replaces its own). Benchmarks of the pipeline itself: [RESULTS.md](RESULTS.md).\n"))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sdrt.benchmarks.serve_load", description=__doc__.split("\n\n")[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=200, help="per mode")
    parser.add_argument("--time-limit", type=float, default=600.0, help="seconds per mode; no new request after it")
    parser.add_argument("-s", "--steps", type=int, default=4)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--max-batch-images", type=int, default=8)
    parser.add_argument("--max-wait-ms", type=float, default=50.0)
    parser.add_argument("--backend", default="onnxruntime-cpu")
    parser.add_argument("--ray", action="store_true", help="load `sdrt serve --ray` (ray extra) instead")
    parser.add_argument("--replicas", type=int, default=1, help="with --ray")
    parser.add_argument("--memory-budget", default=None, help="the server's --memory-budget (default: its own default)")
    parser.add_argument("--oversized-every", type=int, default=0, help="every K-th request is over the budget (0: none)")
    parser.add_argument("--oversized-size", type=int, default=2048, help="side in pixels of the oversized requests (4 images)")
    parser.add_argument("--batched-only", action="store_true", help="leave out the mode without batching")
    parser.add_argument("--section", default=None, help="SERVING.md section to replace (default: local or ray)")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    parser.add_argument("--results", type=Path, default=None, help="markdown file whose section for this server is replaced")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per request
    plan = LoadPlan(bundle=args.bundle, clients=args.clients, requests=args.requests, time_limit_s=args.time_limit,
                    steps=args.steps, size=args.size, max_batch_images=args.max_batch_images, max_wait_ms=args.max_wait_ms,
                    backend=args.backend, ray=args.ray, replicas=args.replicas, memory_budget=args.memory_budget,
                    oversized_every=args.oversized_every, oversized_size=args.oversized_size, unbatched=not args.batched_only)
    results = asyncio.run(run_load(plan))
    command = shlex.join(["python", "-m", "sdrt.benchmarks.serve_load", *(sys.argv[1:] if argv is None else argv)])
    results["command"] = command
    section = markdown(results, command)
    print(section)
    if args.out is not None:
        with atomic_file(args.out) as staging:
            staging.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    if args.results is not None:
        write_section(args.results, args.section or results["kind"], section)
    return 0 if passed(results) else 1


def passed(results: dict[str, Any]) -> bool:
    """The run's verdict: no request failed, and no server grew past its memory budget."""
    modes = [summary for summary in (results["batched"], results["unbatched"]) if summary is not None]
    return all(summary["failed"] == 0 and not (summary["server_peak_rss_gb"] or 0) > (summary["memory_budget_gb"] or float("inf"))
               for summary in modes)


if __name__ == "__main__":
    sys.exit(main())
