"""Write files and directories so that readers see them whole or not at all: build under a temporary name, rename."""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _publish_mode(path: Path, directory: bool) -> None:
    """Give a staged path the mode a plain mkdir/open would have: mkdtemp/mkstemp make them owner-only."""
    umask = _umask()
    if directory:
        for root, dirs, files in os.walk(path):
            os.chmod(root, 0o777 & ~umask)
            for name in files:
                path_in_root = os.path.join(root, name)
                if not os.path.islink(path_in_root):  # chmod would follow it and change the file it points to
                    os.chmod(path_in_root, 0o666 & ~umask)
    else:
        os.chmod(path, 0o666 & ~umask)


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike, replace: bool = False) -> Iterator[Path]:
    """Yield an empty staging directory beside `target`; on success it is renamed to `target`.

    On any exception (KeyboardInterrupt included) the staging directory is removed and `target` is untouched.
    An existing `target` raises FileExistsError unless `replace` is true, in which case it is swapped out only
    after the new content is complete.
    """
    target = Path(target)
    if target.exists() and not replace:
        raise FileExistsError(f"{target} already exists")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
    try:
        yield staging
        _publish_mode(staging, directory=True)
        if target.exists():
            retired = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
            os.replace(target, retired / target.name)
            os.replace(staging, target)
            shutil.rmtree(retired)
        else:
            os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_file(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `target`; on success it replaces `target`, on failure it is deleted."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, staging_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent)
    os.close(fd)
    staging = Path(staging_name)
    try:
        yield staging
        _publish_mode(staging, directory=False)
        os.replace(staging, target)
    except BaseException:
        staging.unlink(missing_ok=True)
        raise
