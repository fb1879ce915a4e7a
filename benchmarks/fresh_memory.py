"""How fast this machine hands a process fresh memory: the floor under loading a model whose weights are repacked
into memory of the process's own (OpenVINO's CPU plugin does so for every model, on every load).

    python -m sdrt.benchmarks.fresh_memory                 # 2 GiB, three rounds after 0.2 s and three after 8 s
    python -m sdrt.benchmarks.fresh_memory --out fresh-memory.json

Each round maps a new anonymous block and writes one byte per 4 KB page (each write a page fault: the kernel finds a
page and clears it), then writes again (no faults left), then frees the block and pauses. Right after a free the
kernel has the pages at hand; after a pause a virtual machine's guest may have reported them free to its host (free
page reporting), and each first touch then costs the host a fault as well.

Beside the rounds it prints what the kernel does with memory a process is not using, read from sysfs: free page
reporting (free blocks handed to the host), transparent huge pages, and DAMON schemes that page out memory not
accessed for a while (on such a machine a bundle's files may leave the page cache once idle for a minute or more,
and the next process start reads them from disk).
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
KDAMONDS = Path("kernel/mm/damon/admin/kdamonds")  # under /sys


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


@dataclasses.dataclass(frozen=True)
class DamonScheme:
    """A running DAMON scheme: `action` (pageout: reclaim) applied to memory accessed at most `max_accesses` times
    per aggregation over at least `min_age_seconds`, at most `quota_mb_per_second`, to the page types `filters`
    allow ("allow unmapped", "reject anon"); `applied_gb` since its stats were last updated."""

    action: str
    min_age_seconds: float
    max_accesses: int
    quota_mb_per_second: float | None
    filters: tuple[str, ...]
    applied_gb: float


@dataclasses.dataclass(frozen=True)
class MemoryPolicy:
    """What the kernel does with memory a process does not use. `page_reporting_order`: free blocks of 2**order pages
    are reported to the hypervisor (None: no free page reporting)."""

    page_reporting_order: int | None
    reported_gb: float | None
    transparent_hugepages: str | None
    damon_schemes: tuple[DamonScheme, ...]

    def lines(self) -> list[str]:
        reporting = "none"
        if self.page_reporting_order is not None:
            reporting = f"blocks of {PAGE_BYTES << self.page_reporting_order >> 20} MiB (order {self.page_reporting_order})"
            if self.reported_gb is not None:
                reporting += f", {self.reported_gb:.0f} GB reported since boot"
        lines = [f"- free page reporting to the host: {reporting}",
                 f"- transparent huge pages: {self.transparent_hugepages or 'unknown'}"]
        for scheme in self.damon_schemes:
            quota = "no quota" if scheme.quota_mb_per_second is None else f"at most {scheme.quota_mb_per_second:.0f} MB/s"
            lines.append(f"- DAMON {scheme.action} of memory idle for {scheme.min_age_seconds:g} s or more (at most "
                         f"{scheme.max_accesses} accesses per aggregation; {', '.join(scheme.filters) or 'all pages'}; "
                         f"{quota}): {scheme.applied_gb:.0f} GB applied")
        if not self.damon_schemes:
            lines.append("- DAMON schemes: none running")
        return lines


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8").strip()
    except OSError:
        return None


def _damon_schemes(kdamond: Path) -> list[DamonScheme]:
    schemes = []
    for context in sorted(kdamond.glob("contexts/[0-9]*")):
        aggregation_seconds = int(_read(context / "monitoring_attrs/intervals/aggr_us") or 0) / 1e6
        for scheme in sorted(context.glob("schemes/[0-9]*")):
            quota_bytes = int(_read(scheme / "quotas/bytes") or 0)
            reset_seconds = int(_read(scheme / "quotas/reset_interval_ms") or 0) / 1e3
            filters = tuple(f"{'allow' if _read(f / 'allow') == 'Y' else 'reject'} {_read(f / 'type')}"
                            for f in sorted(scheme.glob("*filters/[0-9]*")))
            schemes.append(DamonScheme(
                action=_read(scheme / "action") or "unknown",
                min_age_seconds=int(_read(scheme / "access_pattern/age/min") or 0) * aggregation_seconds,
                max_accesses=int(_read(scheme / "access_pattern/nr_accesses/max") or 0),
                quota_mb_per_second=quota_bytes / reset_seconds / 1e6 if quota_bytes and reset_seconds else None,
                filters=filters, applied_gb=int(_read(scheme / "stats/sz_applied") or 0) / 1e9))
    return schemes


def memory_policy(sys_root: Path = Path("/sys")) -> MemoryPolicy:
    """Read the kernel's free page reporting, transparent huge page and DAMON settings under `sys_root`."""
    reporting = sys_root / "module/page_reporting/parameters"
    order = _read(reporting / "page_reporting_order")
    reported_kib = _read(reporting / "reported_kib")
    thp = _read(sys_root / "kernel/mm/transparent_hugepage/enabled")
    schemes = [scheme for kdamond in sorted((sys_root / KDAMONDS).glob("[0-9]*")) if _read(kdamond / "state") == "on"
               for scheme in _damon_schemes(kdamond)]
    return MemoryPolicy(
        page_reporting_order=None if order is None else int(order),
        reported_gb=None if reported_kib is None else int(reported_kib) * 1024 / 1e9,
        transparent_hugepages=None if thp is None else thp.split("[", 1)[-1].split("]", 1)[0],
        damon_schemes=tuple(schemes))


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
    policy = memory_policy()
    rounds = measure(args.gib, args.pauses)
    print(table(rounds))
    print("\n".join(["", "What the kernel does with memory a process does not use:", *policy.lines()]))
    if args.out is not None:
        args.out.write_text(json.dumps({
            "memory_policy": dataclasses.asdict(policy),
            "rounds": [{**dataclasses.asdict(r), "first_touch_gb_per_second": r.first_touch_gb_per_second} for r in rounds],
        }, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
