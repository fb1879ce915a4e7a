"""How fast this machine hands a process fresh memory: the floor under loading a model whose weights are repacked
into memory of the process's own (OpenVINO's CPU plugin does so for every model, on every load).

    python -m sdrt.benchmarks.fresh_memory                 # 2 GiB, three rounds after 0.2 s and three after 8 s
    python -m sdrt.benchmarks.fresh_memory --out fresh-memory.json

Each round maps a new anonymous block and writes one byte per 4 KB page (each write a page fault: the kernel finds a
page and clears it), then writes again (no faults left), then frees the block and pauses. Right after a free the
kernel has the pages at hand; after a pause a virtual machine's guest may have reported them free to its host (free
page reporting), and each first touch then costs the host a fault as well.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

PAGE_BYTES = 4096


@dataclasses.dataclass(frozen=True)
class Round:
    """One block's first touch and second touch, after freeing the last block and pausing `pause_seconds`."""

    pause_seconds: float
    gib: float
    first_touch_seconds: float
    second_touch_seconds: float

    @property
    def first_touch_gb_per_second(self) -> float:
        return self.gib * 2**30 / self.first_touch_seconds / 1e9


def measure(gib: float, pauses: Sequence[float]) -> list[Round]:
    """One round per pause: the pause, then a fresh block of `gib` GiB touched twice, then freed."""
    rounds = []
    for pause in pauses:
        time.sleep(pause)
        start = time.perf_counter()
        block = np.empty(int(gib * 2**30), np.uint8)  # large enough for its own mapping: every page fresh
        block[::PAGE_BYTES] = 1
        first = time.perf_counter() - start
        start = time.perf_counter()
        block[::PAGE_BYTES] = 2
        second = time.perf_counter() - start
        del block
        rounds.append(Round(pause, gib, first, second))
    return rounds


def table(rounds: Sequence[Round]) -> str:
    lines = ["| pause before | block | first touch | fresh memory | second touch |", "|---|---|---|---|---|"]
    for r in rounds:
        lines.append(f"| {r.pause_seconds:g} s | {r.gib:g} GiB | {r.first_touch_seconds:.2f} s | "
                     f"{r.first_touch_gb_per_second:.2f} GB/s | {r.second_touch_seconds:.3f} s |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sdrt.benchmarks.fresh_memory", description=__doc__.split("\n\n")[0])
    parser.add_argument("--gib", type=float, default=2.0, help="block size in GiB (default 2)")
    parser.add_argument("--pauses", type=float, nargs="+", default=[0.2, 0.2, 0.2, 8.0, 8.0, 8.0],
                        help="seconds to pause before each round (default three of 0.2 s, then three of 8 s)")
    parser.add_argument("--out", type=Path, help="also write the rounds as JSON here")
    args = parser.parse_args(argv)
    if not 0 < args.gib <= 64:
        parser.error(f"--gib must be in (0, 64], got {args.gib}")
    if any(p < 0 for p in args.pauses):
        parser.error("--pauses must not be negative")
    rounds = measure(args.gib, args.pauses)
    print(table(rounds))
    if args.out is not None:
        args.out.write_text(json.dumps([{**dataclasses.asdict(r), "first_touch_gb_per_second": r.first_touch_gb_per_second}
                                        for r in rounds], indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
