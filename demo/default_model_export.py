"""Regenerate the default model's shipped bundle (demo/bundle/) from the demo checkpoint (demo/model/), after
retraining the model or changing what the exporter writes:

    python -m sdrt.demo.default_model_export        # or `make demo-bundle`; needs the export extra

Run it from a source checkout (an editable install): the checkpoint is not installed with sdrt, and the bundle is
written into the source tree. tests/test_demo_model.py checks that the shipped bundle is what this produces.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
from importlib import resources
from pathlib import Path

from sdrt.demo.default_model import shipped_bundle_dir
from sdrt.engine.manifest import read_manifest
from sdrt.export import export_bundle

DEMO_CHECKPOINT = "model"  # folder of the sdrt.demo package in a source checkout
#: how the shipped manifest names its source: the checkpoint's place in sdrt's repository, not the path on the
#: machine that exported it, so that a re-export anywhere writes the same manifest
CHECKPOINT_NAME = "demo/model"


def demo_checkpoint_dir() -> Path:
    """The demo checkpoint (diffusers format), as training writes it."""
    return Path(str(resources.files("sdrt.demo").joinpath(DEMO_CHECKPOINT)))


def export_default_bundle(out_dir: Path, force: bool = False) -> Path:
    """Export the demo checkpoint to a bundle at `out_dir` as it is shipped: the exporter's defaults, the source
    named by CHECKPOINT_NAME."""
    export_bundle(demo_checkpoint_dir(), out_dir, force=force)
    manifest = read_manifest(out_dir)
    # the manifest lists every file but itself: rewriting it leaves the hashes it records valid
    dataclasses.replace(manifest, source_checkpoint=CHECKPOINT_NAME).write(out_dir)
    return out_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sdrt.demo.default_model_export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=shipped_bundle_dir(),
                        help="where to write the bundle, replacing one there (default: the shipped bundle, %(default)s)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    export_default_bundle(args.out, force=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
