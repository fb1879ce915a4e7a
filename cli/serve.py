"""`sdrt serve`: the HTTP server (serve extra), or a Ray Serve deployment (ray extra), each imported when the command
runs so the rest of the CLI works without them."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sdrt.cli.common import EXIT_LOAD_FAILED, UsageError, add_backend_argument, positive
from sdrt.engine.errors import InvalidArgumentError, SdrtError
from sdrt.engine.host_memory import DEFAULT_BUDGET_FRACTION, MemoryBudget
from sdrt.engine.safety_checker import SafetyPolicy


def _import_serve_extra(ray: bool):
    extra = "ray" if ray else "serve"
    try:
        import sdrt.serve

        if ray:
            import sdrt.serve.ray_app
    except ImportError as exc:
        raise SdrtError(f"sdrt serve{' --ray' if ray else ''} needs the {extra} extra ({exc.name} is missing): "
                        f"pip install 'sdrt[{extra}]'") from exc
    return sdrt.serve


def _serve(args: argparse.Namespace) -> int:
    serve = _import_serve_extra(args.ray)
    ray_only = [flag for flag, given in (("--ray-address", args.ray_address is not None),
                                         ("--replicas", args.replicas is not None),
                                         ("--ray-temp-dir", args.ray_temp_dir is not None)) if given]
    if ray_only and not args.ray:
        raise UsageError(f"{', '.join(ray_only)}: Ray options need --ray")
    if args.ray and args.wait_for_bundle:
        raise UsageError("--wait-for-bundle: not with --ray (each replica loads the bundle when it starts)")
    if args.ray_temp_dir is not None and args.ray_address is not None:
        raise UsageError("--ray-temp-dir: only for the Ray instance this command starts, not with --ray-address")
    from sdrt.serve.server import LoadFailedError, api_key_from

    config = serve.ServeConfig(
        bundle=args.bundle, backend=args.backend, safety_checker=args.safety_checker, host=args.host, port=args.port,
        batching=serve.BatcherConfig(max_batch_images=args.max_batch_images, max_wait_s=args.max_wait_ms / 1000,
                                     max_queue=args.max_queue),
        app=serve.AppSettings(limits=serve.Limits(max_n=args.max_n, max_steps=args.max_steps, max_body_bytes=args.max_body_bytes),
                              request_timeout_s=args.request_timeout, api_key=api_key_from(args.api_key)),
        warm_up=not args.no_warm_up, graceful_shutdown_s=args.graceful_shutdown, wait_for_bundle=args.wait_for_bundle,
        memory_budget=args.memory_budget,
    )
    try:
        if args.ray:
            from sdrt.serve.ray_app import RayOptions, run_ray

            replicas = args.replicas or (1, 1)
            run_ray(config, RayOptions(address=args.ray_address, min_replicas=replicas[0], max_replicas=replicas[1],
                                       replica_cpus=args.replica_cpus, temp_dir=args.ray_temp_dir))
        else:
            serve.run(config)
    except LoadFailedError as exc:  # not a usage error: the bundle looked right and failed while loading
        print(f"sdrt: error: {exc}", file=sys.stderr)
        return EXIT_LOAD_FAILED
    return 0


def _memory_budget(text: str) -> MemoryBudget:
    try:
        return MemoryBudget.parse(text)
    except InvalidArgumentError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("memory_budget: ")) from None


def _replicas(text: str) -> tuple[int, int]:
    """`--replicas`: "N", or "MIN:MAX" to autoscale between them."""
    try:
        bounds = [int(part) for part in text.split(":")]
    except ValueError:
        bounds = []
    if len(bounds) not in (1, 2) or not 1 <= bounds[0] <= bounds[-1]:
        raise argparse.ArgumentTypeError(f"expected N or MIN:MAX with 1 <= MIN <= MAX, got {text!r}")
    return (bounds[0], bounds[-1])


def add_commands(commands: argparse._SubParsersAction) -> None:
    """serve."""
    serve = commands.add_parser("serve", help="HTTP text-to-image server (serve extra; --ray: ray extra)", description=(
        "Serve BUNDLE over HTTP: POST /v1/images/generations (OpenAI's images API shape), GET /healthz, /readyz, "
        "/metrics. One pipeline per process; compatible requests (same size, steps, scheduler, guidance) share a "
        "U-Net batch. SIGTERM finishes accepted requests, then exits. A bundle that cannot load exits: status 2 "
        "when it is missing or malformed (found before the port is bound), 1 when loading it failed later."))
    serve.add_argument("bundle", type=Path)
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--api-key", default=None, help="require `Authorization: Bearer KEY` on every endpoint but "
                       "/healthz and /readyz (default: $SDRT_API_KEY; none: no auth)")
    add_backend_argument(serve)
    serve.add_argument("--safety-checker", choices=[p.value for p in SafetyPolicy], default=SafetyPolicy.BLOCK.value,
                       help="block: flagged images are withheld (b64_json null); flag: returned and flagged; off")
    serve.add_argument("--max-batch-images", type=positive(int), default=8, help="images per U-Net batch (1: no batching)")
    serve.add_argument("--max-wait-ms", type=float, default=50.0,
                       help="how long the oldest request waits for batch partners")
    serve.add_argument("--max-queue", type=positive(int), default=64, help="waiting requests beyond which new ones get 429")
    serve.add_argument("--max-n", type=positive(int), default=4, help="images per request")
    serve.add_argument("--max-steps", type=positive(int), default=150, help="num_inference_steps per request")
    serve.add_argument("--max-body-bytes", type=positive(int), default=64 * 1024)
    serve.add_argument("--request-timeout", type=positive(float), default=300.0,
                       help="seconds from arrival to answer; then 504, and its work stops between denoising steps")
    serve.add_argument("--graceful-shutdown", type=positive(float), default=None,
                       help="seconds open requests get to finish after SIGTERM (default: as long as they need)")
    serve.add_argument("--no-warm-up", action="store_true", help="ready as soon as loaded, without a first image")
    serve.add_argument("--wait-for-bundle", action="store_true",
                       help="while BUNDLE is missing or incomplete, answer 503 and keep trying to load it instead of "
                       "exiting (for a bundle mounted after the server starts); not with --ray")
    serve.add_argument("--memory-budget", type=_memory_budget, default=MemoryBudget(), metavar="SIZE|FRACTION",
                       help="what the process may grow to: bytes (12G, 800M) or a fraction of available memory (0.5); "
                       f"a request estimated over it even alone gets 413 (default {DEFAULT_BUDGET_FRACTION}; not with --ray)")
    ray = serve.add_argument_group("Ray Serve (ray extra)")
    ray.add_argument("--ray", action="store_true", help="run as a Ray Serve deployment: replicas, autoscaling, multi-node")
    ray.add_argument("--ray-address", default=None, help="join this Ray cluster (\"auto\": the one `ray start` began "
                     "here); default: a local Ray instance for this command")
    ray.add_argument("--replicas", type=_replicas, default=None, metavar="N|MIN:MAX",
                     help="pipeline replicas, or bounds to autoscale between on queued requests (default 1)")
    ray.add_argument("--replica-cpus", type=positive(float), default=1.0, help="CPUs Ray reserves per replica")
    ray.add_argument("--ray-temp-dir", type=Path, default=None, metavar="DIR",
                     help="session files and sockets of the Ray instance this command starts (default Ray's /tmp/ray; "
                     "keep it short: socket paths must stay under 108 characters)")
    serve.set_defaults(handler=_serve)
