"""A command's wall time and peak memory, measured by GNU time (`/usr/bin/time -v`) in a process of its own."""
from __future__ import annotations

import dataclasses
import logging
import re
import shlex
import subprocess
from collections.abc import Sequence
from pathlib import Path

logger = logging.getLogger(__name__)

GNU_TIME = "/usr/bin/time"


@dataclasses.dataclass(frozen=True)
class Measurement:
    """One build step: what ran, its wall-clock seconds and peak resident memory (of the process and its children)."""

    name: str
    command: list[str]
    wall_s: float
    peak_rss_gb: float
    exit_status: int


def _wall_seconds(text: str) -> float:
    """GNU time's "h:mm:ss" or "m:ss.ss" in seconds."""
    seconds = 0.0
    for part in text.split(":"):
        seconds = seconds * 60 + float(part)
    return seconds


def measure(name: str, command: Sequence[str], log_path: Path) -> Measurement:
    """Run `command` under GNU time, its output to `log_path`; raise RuntimeError if it fails."""
    logger.info("%s: %s", name, shlex.join(command))
    with open(log_path, "w") as log:
        status = subprocess.run([GNU_TIME, "-v", *command], stdout=log, stderr=subprocess.STDOUT).returncode
    text = log_path.read_text(errors="replace")
    peak_kb = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", text)
    if status != 0 or peak_kb is None or wall is None:
        raise RuntimeError(f"{name} failed (exit {status}); its output is in {log_path}")
    result = Measurement(name, list(command), _wall_seconds(wall.group(1)), int(peak_kb.group(1)) * 1024 / 1e9, status)
    logger.info("%s: %.0f s, peak RSS %.2f GB", name, result.wall_s, result.peak_rss_gb)
    return result
