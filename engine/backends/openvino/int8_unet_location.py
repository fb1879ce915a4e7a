"""Where `sdrt quantize` writes a bundle's int8 U-Net and the openvino-int8 backend reads it."""
from __future__ import annotations

from pathlib import Path

from sdrt.engine.backends.openvino.cache import IR_FILE

INT8_SUBDIR = "int8"  # in the bundle: U-Nets quantized by `sdrt quantize`, one per U-Net digest


def int8_unet_file(bundle_dir: Path, unet_digest: str) -> Path:
    """Where `sdrt quantize` writes the int8 U-Net for the bundle's U-Net of this digest (a stale one is never
    read: a re-exported U-Net has a new digest)."""
    return Path(bundle_dir) / INT8_SUBDIR / f"unet-{unet_digest[:16]}" / IR_FILE
