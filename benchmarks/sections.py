"""Results files that several runs share: each run replaces its own marked section and keeps the rest."""
from __future__ import annotations

import re
from pathlib import Path

from sdrt.engine.atomic import atomic_file


def replace_section(path: Path, begin: str, end: str, section: str, preamble: str) -> None:
    """Replace the text between the `begin` and `end` markers of `path` with `section` (or append it, marked), keeping
    everything else; a missing file starts with `preamble`. Written atomically."""
    text = path.read_text(encoding="utf-8") if path.is_file() else preamble
    block = f"{begin}\n{section.rstrip()}\n{end}"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.DOTALL)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else f"{text.rstrip()}\n\n{block}\n"
    with atomic_file(path) as staging:
        staging.write_text(text, encoding="utf-8")
