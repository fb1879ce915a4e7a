"""Where a compiled model's call goes, op by op: OpenVINO's per-node counters on one entry of a bundle's
compiled-model cache (engine/backends/openvino/compiled_models.py), grouped by the kind of op and the precision it
ran in, so that what stays in floating point, the layout reorders and the conversions show beside the products.

    python -m sdrt.benchmarks.op_profile BUNDLE/.cache/openvino/compiled/MODEL/entries/ENTRY [--calls 3] [--out F.json]

The entry's IR is compiled as the backend compiles it (its precision, the latency hint, its blob cache) with
PERF_COUNT on, and run on random inputs of the entry's shapes (a guided entry's repeated inputs get identical
halves, as the backend feeds it); a table of the kinds' share of the median call is printed.
"""
from __future__ import annotations

import argparse
import collections
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sdrt.engine.backends.openvino.compiled_models import CompiledEntry
from sdrt.engine.guidance_batch import REPEATED_INPUTS
from sdrt.engine.specs import Component

logger = logging.getLogger(__name__)


def _inputs(shapes: dict[str, list[int]], repeated: tuple[str, ...], seed: int = 0) -> dict[str, np.ndarray]:
    """Random inputs of these shapes; `repeated` ones with identical halves (timesteps at 500)."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for name, shape in shapes.items():
        if name == "timestep":
            feeds[name] = np.full(shape, 500.0, np.float32)
        elif name in repeated:
            half = rng.standard_normal([shape[0] // 2, *shape[1:]], dtype=np.float32)
            feeds[name] = np.concatenate([half, half])
        else:
            feeds[name] = rng.standard_normal(shape, dtype=np.float32)
    return feeds


def profile(entry_dir: Path, calls: int = 3) -> dict[str, Any]:
    """The entry's median call time and, for that call, the time per (op kind, runtime precision) and per node."""
    import openvino

    entry = CompiledEntry(entry_dir)
    record = entry.record()
    if record is None:
        raise SystemExit(f"{entry_dir} is no complete compiled entry")
    key = record["key"]
    if key["shapes"] is None:
        raise SystemExit(f"{entry_dir} is compiled for any shapes: profile an entry of static shapes")
    component = Component(key["component"])
    config = {"INFERENCE_PRECISION_HINT": key["precision"], "PERFORMANCE_HINT": "LATENCY", "PERF_COUNT": True,
              "CACHE_DIR": str(entry.blob_dir), "CACHE_MODE": "OPTIMIZE_SIZE"}
    compiled = openvino.Core().compile_model(str(entry.model_file), "CPU", config)
    repeated = REPEATED_INPUTS.get(component, ()) if key["guided_halves"] else ()
    feeds = _inputs(key["shapes"], repeated)
    request = compiled.create_infer_request()
    request.infer(feeds)  # the first call repacks the weights
    runs = []
    for _ in range(calls):
        start = time.perf_counter()
        request.infer(feeds)
        runs.append((time.perf_counter() - start, request.get_profiling_info()))
    seconds, nodes = sorted(runs, key=lambda run: run[0])[len(runs) // 2]
    kinds: collections.Counter[tuple[str, str]] = collections.Counter()
    per_node = []
    for node in nodes:
        if node.status != node.Status.EXECUTED:
            continue
        node_seconds = node.real_time.total_seconds()
        kinds[node.node_type, node.exec_type] += node_seconds
        per_node.append({"name": node.node_name, "type": node.node_type, "exec_type": node.exec_type, "seconds": node_seconds})
    return {
        "entry": str(entry_dir), "component": component.value, "model": key["model"], "precision": key["precision"],
        "shapes": key["shapes"], "call_seconds": seconds, "counted_seconds": sum(kinds.values()),
        "kinds": [{"type": t, "exec_type": e, "seconds": s} for (t, e), s in kinds.most_common()],
        "nodes": sorted(per_node, key=lambda node: -node["seconds"]),
    }


def table(result: dict[str, Any], rows: int = 25) -> str:
    counted = result["counted_seconds"]
    lines = [f"{result['model']} ({result['precision']}) at {result['shapes']}: {result['call_seconds']:.3f} s per call, "
             f"{counted:.3f} s counted by node", "", "| op | kernel | seconds | share |", "|---|---|---|---|"]
    lines += [f"| {k['type']} | {k['exec_type']} | {k['seconds']:.3f} | {k['seconds'] / counted:.1%} |" for k in result["kinds"][:rows]]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sdrt.benchmarks.op_profile", description=__doc__.split("\n\n")[0])
    parser.add_argument("entry", type=Path, help="a compiled entry's directory in a bundle's .cache/openvino/compiled")
    parser.add_argument("--calls", type=int, default=3, help="timed calls after a first one; the median is profiled")
    parser.add_argument("--rows", type=int, default=25)
    parser.add_argument("--out", type=Path, default=None, help="write the whole profile (every node) as JSON")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    result = profile(args.entry, args.calls)
    print(table(result, args.rows))
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
