"""The machine's and this process's memory: readings from /proc (Linux), and the memory budget a process keeps to.

A budget is what the whole process may grow to, its resident set (RSS) included: libraries, loaded weights and the
working memory of the requests it runs. Given as bytes ("12G", "800M": powers of 1024) or as a fraction ("0.8") of
the memory the process could have when the budget is resolved: the machine's available memory plus its own RSS.
"""
from __future__ import annotations

import dataclasses
import os
import re
import sys

from sdrt.engine.errors import InvalidArgumentError

#: the default budget's fraction: the rest is left to the page cache (the bundle's files, read again on a reload)
#: and to other processes' growth
DEFAULT_BUDGET_FRACTION = 0.8
_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([KMGT]?)(I?B)?\s*$", re.IGNORECASE)


def _proc_kib(path: str, key: str) -> int | None:
    """A `key: N kB` line's value, in bytes, from a /proc file; None off Linux or where it is absent."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        with open(path, encoding="ascii") as lines:
            for line in lines:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def process_rss_bytes() -> int | None:
    """This process's resident set now (VmRSS); None where /proc is absent."""
    return _proc_kib("/proc/self/status", "VmRSS")


def peak_rss_bytes() -> int | None:
    """The largest resident set this process has had (VmHWM), since it started or since `reset_peak_rss`."""
    return _proc_kib("/proc/self/status", "VmHWM")


def reset_peak_rss() -> bool:
    """Start `peak_rss_bytes` again from the current RSS (Linux's /proc/self/clear_refs); False where it cannot."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


def available_memory_bytes() -> int:
    """Memory the machine can give without swapping (MemAvailable); where /proc is absent, its physical memory."""
    available = _proc_kib("/proc/meminfo", "MemAvailable")
    return available if available is not None else os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def format_bytes(count: float) -> str:
    """`count` bytes for a message: "9.8 GiB", "750 MiB"."""
    if count >= 2**30:
        return f"{count / 2**30:.1f} GiB"
    return f"{count / 2**20:.0f} MiB"


@dataclasses.dataclass(frozen=True)
class MemoryBudget:
    """At most `bytes`, or `fraction` of what the process could have (available memory + its own RSS) when resolved."""

    bytes: int | None = None
    fraction: float = DEFAULT_BUDGET_FRACTION

    def __post_init__(self) -> None:
        if self.bytes is not None and self.bytes < 1:
            raise InvalidArgumentError("memory_budget", f"must be a positive size, got {self.bytes!r} bytes")
        if not 0.0 < self.fraction <= 1.0:
            raise InvalidArgumentError("memory_budget", f"a fraction must be in (0, 1], got {self.fraction!r}")

    @classmethod
    def parse(cls, text: str) -> MemoryBudget:
        """"12G", "800M", "1.5G", "8589934592" (bytes; K, M, G, T are powers of 1024) or a fraction such as "0.8"."""
        match = _SIZE.match(text)
        if match is None:
            raise InvalidArgumentError("memory_budget", f"must be a size such as 12G or 800M, or a fraction such as 0.8; got {text!r}")
        number, unit, byte_suffix = float(match.group(1)), match.group(2).upper(), match.group(3)
        if not unit and not byte_suffix:
            if number <= 1.0:
                return cls(fraction=number)
            if not number.is_integer():
                raise InvalidArgumentError("memory_budget", f"a fraction must be in (0, 1], got {text!r}")
        return cls(bytes=int(number * _UNITS[unit]))

    def resolve(self) -> int:
        """The budget in bytes, now."""
        if self.bytes is not None:
            return self.bytes
        return int(self.fraction * (available_memory_bytes() + (process_rss_bytes() or 0)))

    def describe(self) -> str:
        return format_bytes(self.bytes) if self.bytes is not None else f"{self.fraction:g} of available memory"
