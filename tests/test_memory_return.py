"""release_mapped_pages: the resident pages of read-only mappings under a directory leave the process, nothing else
does, the file stays in the page cache and the data reads back unchanged; handing_back_mapped_pages does it while
its body runs, and stops with the body."""
from __future__ import annotations

import ctypes
import mmap
import os
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from sdrt.engine.memory_return import handing_back_mapped_pages, release_mapped_pages

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="MADV_DONTNEED and /proc are Linux's")

_SIZE = 8 * 1024 * 1024


def _resident_bytes(path: Path) -> int:
    """This process's resident bytes of mappings of `path` (from /proc/self/smaps)."""
    resident, current = 0, None
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            fields = line.split()
            if "-" in fields[0] and len(fields) >= 5 and not fields[0].endswith(":"):
                current = fields[5] if len(fields) >= 6 else None
            elif fields[0] == "Rss:" and current == str(path):
                resident += int(fields[1]) * 1024
    return resident


def _cached_bytes(path: Path) -> int:
    """How much of `path` is in the kernel's page cache: mincore on a fresh private mapping, which reads nothing."""
    with open(path, "rb") as file:
        mapping = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_COPY)
    residency = (ctypes.c_ubyte * -(-len(mapping) // mmap.PAGESIZE))()
    view = (ctypes.c_char * len(mapping)).from_buffer(mapping)
    mincore = ctypes.CDLL(None, use_errno=True).mincore
    mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte))
    assert mincore(ctypes.addressof(view), len(mapping), residency) == 0, ctypes.get_errno()
    del view
    mapping.close()
    return sum(byte & 1 for byte in residency) * mmap.PAGESIZE


def _mapped_file(path: Path, access: int) -> tuple[mmap.mmap, np.ndarray]:
    data = np.random.default_rng(0).integers(0, 256, _SIZE, dtype=np.uint8)
    with open(path, "wb") as file:
        file.write(data.tobytes())
        os.fsync(file.fileno())  # clean pages, as a model file's are: the kernel may drop them from its cache at will
    with open(path, "r+b") as file:
        mapping = mmap.mmap(file.fileno(), 0, access=access)
    assert np.frombuffer(mapping, dtype=np.uint8).sum() == data.sum()  # touch every page
    return mapping, data


def test_read_only_mappings_under_the_directory_are_reclaimed(tmp_path: Path) -> None:
    (tmp_path / "bundle").mkdir()
    (tmp_path / "other").mkdir()
    inside, inside_data = _mapped_file((tmp_path / "bundle" / "model.bin").resolve(), mmap.ACCESS_READ)
    outside, _ = _mapped_file((tmp_path / "other" / "model.bin").resolve(), mmap.ACCESS_READ)
    writable, _ = _mapped_file((tmp_path / "bundle" / "scratch.bin").resolve(), mmap.ACCESS_WRITE)
    assert _resident_bytes((tmp_path / "bundle" / "model.bin").resolve()) >= _SIZE // 2

    advised = release_mapped_pages(tmp_path / "bundle")

    assert advised == _SIZE  # the read-only mapping in the directory, not the writable one beside it
    assert _resident_bytes((tmp_path / "bundle" / "model.bin").resolve()) < _SIZE // 4
    assert _resident_bytes((tmp_path / "other" / "model.bin").resolve()) >= _SIZE // 2
    assert _resident_bytes((tmp_path / "bundle" / "scratch.bin").resolve()) >= _SIZE // 2
    # out of the process, not out of the page cache: pages read again, and the next process, find it there
    assert _cached_bytes((tmp_path / "bundle" / "model.bin").resolve()) >= _SIZE // 2
    np.testing.assert_array_equal(np.frombuffer(inside, dtype=np.uint8), inside_data)  # read back from the file
    for mapping in (inside, outside, writable):
        mapping.close()


def test_nothing_mapped_under_the_directory_advises_nothing(tmp_path: Path) -> None:
    assert release_mapped_pages(tmp_path) == 0


def _hand_back_threads() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name == "sdrt-hand-back-pages"]


def test_pages_are_handed_back_while_the_body_runs(tmp_path: Path) -> None:
    path = (tmp_path / "model.bin").resolve()
    with handing_back_mapped_pages(tmp_path, interval_s=0.01):
        # Mapped and read inside the body, like weights repacked by a first inference.
        mapping, data = _mapped_file(path, mmap.ACCESS_READ)
        deadline = time.monotonic() + 5
        while _resident_bytes(path) >= _SIZE // 4 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert _resident_bytes(path) < _SIZE // 4
        assert _hand_back_threads()
    assert not _hand_back_threads()
    np.testing.assert_array_equal(np.frombuffer(mapping, dtype=np.uint8), data)
    mapping.close()


def test_a_failing_body_still_stops_the_thread_and_hands_back_once_more(tmp_path: Path) -> None:
    path = (tmp_path / "model.bin").resolve()
    with pytest.raises(RuntimeError, match="inference failed"):
        with handing_back_mapped_pages(tmp_path, interval_s=3600):  # only the final hand-back can run
            mapping, _ = _mapped_file(path, mmap.ACCESS_READ)
            assert _resident_bytes(path) >= _SIZE // 2
            raise RuntimeError("inference failed")
    assert not _hand_back_threads()
    assert _resident_bytes(path) < _SIZE // 4
    mapping.close()
