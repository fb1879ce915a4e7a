"""Which components `sdrt quantize` makes int8 models of, and where in the bundle it writes them for the
openvino-int8 backend to read."""
from __future__ import annotations

from pathlib import Path

from sdrt.engine.backends.openvino.cache import IR_FILE, model_name
from sdrt.engine.specs import Component

INT8_SUBDIR = "int8"  # in the bundle: models quantized by `sdrt quantize`, one per component and digest
#: the components quantized, each the bulk of its stage's time: the U-Net (every step) and the VAE decoder (once per
#: image, but at full resolution)
INT8_COMPONENTS = (Component.UNET, Component.VAE_DECODER)


def int8_model_file(bundle_dir: Path, component: Component, digest: str) -> Path:
    """Where `sdrt quantize` writes the int8 model of the bundle's `component` of this digest (a stale one is never
    read: a re-exported component has a new digest)."""
    return Path(bundle_dir) / INT8_SUBDIR / f"{component.value}-{digest[:16]}" / IR_FILE


def int8_name_fragment(digest: str) -> str:
    """What the cache names of every model made from the int8 models of components of this digest contain (the
    int8 U-Net's and VAE decoder's, and DeepCache's full pass on the int8 U-Net, which shares its digest)."""
    return f"{digest[:16]}-int8"


def int8_source_name(component: Component, digest: str) -> str:
    """Names the model the openvino-int8 backend compiles for `component` of this digest, in the cache's names."""
    return f"{model_name(component, digest)}-int8"
