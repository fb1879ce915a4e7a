"""The PNG files a generation command writes: their names, checked before anything runs, and written all or none."""
from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from sdrt.cli.common import UsageError

IMAGE_SUFFIX = ".png"  # PNG holds the generation's parameters as text (sdrt.engine.image_io)


def output_paths(output: Path, count: int) -> list[Path]:
    """`out.png` for one image; `out-0.png`, `out-1.png`, ... for several."""
    if count == 1:
        return [output]
    return [output.with_name(f"{output.stem}-{index}{output.suffix}") for index in range(count)]


def check_output(output: Path, count: int) -> None:
    """Raise UsageError("--output: ...") unless `count` images can be written: a .png name in an existing directory
    where this user can create files. Checked before generating, so a bad path costs nothing, and the directory is
    never created on the user's behalf (a typo would otherwise make one)."""
    if output.suffix.lower() != IMAGE_SUFFIX:
        raise UsageError(f"--output: must be a {IMAGE_SUFFIX} file name, got {str(output)!r}")
    directory = output.parent
    if not directory.is_dir():
        raise UsageError(f"--output: must be in an existing directory; {str(directory)!r} "
                         f"{'is not a directory' if directory.exists() else 'does not exist'}")
    if count == 1 and output.is_dir():  # (numbered names are left to the write, which then removes the others)
        raise UsageError(f"--output: must be a file name, {str(output)!r} is a directory")
    try:  # os.access says yes to root everywhere, /proc included: try what writing will do
        with tempfile.NamedTemporaryFile(dir=directory, prefix=f".{output.name}.", suffix=".probe"):
            pass
    except OSError as exc:
        raise UsageError(f"--output: must be in a directory this user can write to; {str(directory)!r}: "
                         f"{exc.strerror or exc}") from None


def write_all(paths: Sequence[Path], write: Callable[[int, Path], bool]) -> list[Path]:
    """Call `write(index, path)` for each path (True: written, False: skipped) and return the written paths. If any
    write fails or is interrupted, the files already written are removed: no run leaves part of its output."""
    written: list[Path] = []
    try:
        for index, path in enumerate(paths):
            if write(index, path):
                written.append(path)
    except BaseException:
        for path in written:
            with contextlib.suppress(OSError):
                path.unlink()
        raise
    return written

