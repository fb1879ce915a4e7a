"""Giving memory the process no longer needs back to the kernel, so that it stops counting in the RSS: the resident
pages of memory-mapped model files once a backend holds its own copy of the weights, and heap freed by a backend.

OpenVINO memory-maps the file it compiles from (the bundle's ONNX weights, its fp16 IR or its compiled-model cache)
and, on a model's first inference, repacks the weights into its kernels' layouts in memory of its own. It does not
read most of the mapping again, yet the pages stay resident. MADV_DONTNEED drops them from the process; they stay
in the kernel's page cache, reclaimable like any file read, so the few pages read again later (biases and other
constants used in place) come back as minor faults, and the next process to load the bundle finds its files cached.
(MADV_PAGEOUT would evict them from the cache too: the same RSS, but each page read again a disk read.) No data can
be lost: only mappings that are not writable are advised, and a page touched again is read back from its file.

Compiling reads the whole mapping, and so does the repacking: handing the pages back only afterwards still leaves a
moment when both copies are resident, and that moment is the process's peak. `handing_back_mapped_pages` hands them
back every fraction of a second while the work runs, which lowers that peak at no cost in time (measurements:
docs/design-notes.md).

glibc keeps freed blocks below its mmap threshold (up to 32 MB) in its heap; `return_freed_heap` trims them.
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import mmap
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

logger = logging.getLogger(__name__)

#: how often `handing_back_mapped_pages` advises: a repack reads well under 1 GB in this time, and each advice walks
#: the mapping's page tables (tens of milliseconds for a full-size U-Net) on a thread that mostly waits
HAND_BACK_INTERVAL_S = 0.25


def release_mapped_pages(directory: Path) -> int:
    """Drop this process's resident pages of the read-only mappings of files under `directory` (they stay in the page
    cache); return the size of the mappings advised, in bytes. Does nothing (returns 0) off Linux or where the kernel
    does not take the advice."""
    if not sys.platform.startswith("linux"):
        return 0
    prefix = f"{Path(directory).resolve()}/"
    madvise = ctypes.CDLL(None, use_errno=True).madvise
    madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    advised = 0
    with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
        for line in maps:
            # address perms offset device inode path; the path may contain spaces
            fields = line.rstrip("\n").split(maxsplit=5)
            if len(fields) < 6 or "w" in fields[1] or not fields[5].startswith(prefix):
                continue
            start, end = (int(address, 16) for address in fields[0].split("-"))
            if madvise(start, end - start, mmap.MADV_DONTNEED) != 0:
                logger.debug("madvise(MADV_DONTNEED) refused for %s: errno %d", fields[5], ctypes.get_errno())
                return advised
            advised += end - start
    return advised


@contextlib.contextmanager
def handing_back_mapped_pages(directory: Path, interval_s: float = HAND_BACK_INTERVAL_S) -> Iterator[None]:
    """While the body runs, hand back (`release_mapped_pages`) the pages of mapped files under `directory` every
    `interval_s` seconds from a background thread, and once more when it ends, however it ends."""
    finished = threading.Event()

    def hand_back_until_finished() -> None:
        while not finished.wait(interval_s):
            release_mapped_pages(directory)

    worker = threading.Thread(target=hand_back_until_finished, name="sdrt-hand-back-pages", daemon=True)
    worker.start()
    try:
        yield
    finally:
        finished.set()
        worker.join()
        released = release_mapped_pages(directory)
        logger.debug("advised the kernel to reclaim %.2f GB of files mapped under %s", released / 1e9, directory)


def return_freed_heap() -> None:
    """Ask glibc's malloc to return its free heap memory to the kernel (`malloc_trim`); nothing elsewhere."""
    if sys.platform.startswith("linux") and _glibc() is not None:
        _glibc().malloc_trim(0)


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    try:
        library = ctypes.CDLL("libc.so.6")
        library.malloc_trim.argtypes = (ctypes.c_size_t,)
        return library
    except (OSError, AttributeError):  # musl and other C libraries have no malloc_trim
        return None
