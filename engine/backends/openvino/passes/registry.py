"""The graph rewrites the OpenVINO backends apply, by name, and which of them each inference precision applies to
each component's model.

A rewrite's name goes into the cache directory names of the models it changes (sdrt.engine.backends.openvino.cache):
a rewrite whose output changes needs a new name, so that models converted or compiled before are pruned.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from sdrt.engine.backends.openvino.constants import ConstantStore
from sdrt.engine.backends.openvino.passes.geglu_halves import rewrite_geglu_projections
from sdrt.engine.backends.openvino.passes.unsigned_conv_inputs import rewrite_unsigned_convolution_inputs
from sdrt.engine.backends.openvino.passes.upsample_phases import rewrite_upsampling_convolutions
from sdrt.engine.backends.openvino.passes.winograd import (
    CHUNK_WEIGHT_ELEMENTS, MAX_DECODER_INPUT_ELEMENTS, MAX_WEIGHT_ELEMENTS, MIN_STATIC_INPUT_AREA, REVISION, rewrite_convolutions,
)
from sdrt.engine.specs import UNET_PASSES, Component


@dataclasses.dataclass(frozen=True)
class GraphRewrite:
    """A change to a component's OpenVINO model before it compiles, same outputs, less time. The converted model is
    cached under a directory named after its rewrites: a rewrite whose output changes needs a new name."""

    name: str
    #: rewrites the model in place; returns how many places it changed
    apply: Callable[[Any], int]


@dataclasses.dataclass(frozen=True)
class StaticShapeRewrite:
    """A GraphRewrite for a model reshaped to static shapes; it makes its new constants with the ConstantStore
    given (None: in the heap)."""

    name: str
    apply: Callable[[Any, ConstantStore | None], int]


# small 3x3 convolutions (winograd.py); the name carries the rewrite's revision and the weight limit, which decides
# what is rewritten
WINOGRAD = GraphRewrite(f"winograd{REVISION}-f4x4-{MAX_WEIGHT_ELEMENTS}", rewrite_convolutions)
# Static-shape rewrites run on a model compiled for static shapes, after reshaping: they need the shapes (the
# upsampling of an odd size is not a doubling; a convolution's input size). Their names go into the compiled-model
# cache's directory names of the components compiled that way, so that blobs compiled, and constants stored
# (sdrt.engine.backends.openvino.constants), before a rewrite changed are pruned: a rewrite whose constants change
# needs a new name.
UPSAMPLE_PHASES = StaticShapeRewrite("upsample-phases", rewrite_upsampling_convolutions)
# a GEGLU feed-forward's projection as two products, one per half of its output (geglu_halves.py)
GEGLU_HALVES = StaticShapeRewrite("geglu-halves", rewrite_geglu_projections)
# a VAE decoder's 3x3 convolutions on all but its largest activations (winograd.py)
WINOGRAD_DECODER = StaticShapeRewrite(
    f"winograd{REVISION}-to-{MAX_DECODER_INPUT_ELEMENTS}",
    lambda model, store: rewrite_convolutions(model, max_input_elements=MAX_DECODER_INPUT_ELEMENTS),
)
# a U-Net's large 3x3 convolutions (those WINOGRAD leaves) on inputs of MIN_STATIC_INPUT_AREA and up, their weight
# transform in chunks (winograd.py); without a store (a read-only bundle) none: their rearranged weights would stay in
# the heap, breaking exact mode's memory bound
WINOGRAD_LARGE = StaticShapeRewrite(
    f"winograd{REVISION}-from-{MIN_STATIC_INPUT_AREA}-chunks-{CHUNK_WEIGHT_ELEMENTS}",
    lambda model, store: 0 if store is None else rewrite_convolutions(
        model, max_weight_elements=None, min_input_area=MIN_STATIC_INPUT_AREA, store=store),
)

# an int8 convolution's input quantized from zero instead of with a zero point, whose compensation the CPU plugin
# would compute from the weights on every load (unsigned_conv_inputs.py); its few constants (a bias per
# convolution) stay in the heap
UNSIGNED_CONV_INPUTS = StaticShapeRewrite("unsigned-conv-inputs", lambda model, store: rewrite_unsigned_convolution_inputs(model))

#: by OpenVINO inference precision (INFERENCE_PRECISION_HINT): the rewrites of each component's model when it is
#: converted, in order. Winograd only in fp32 (within 2.3e-5 of direct convolutions), not in bf16, whose rounding the
#: transforms would amplify.
GRAPH_REWRITES: Mapping[str, Mapping[Component, tuple[GraphRewrite, ...]]] = {
    "bf16": {},
    "f32": {unet: (WINOGRAD,) for unet in UNET_PASSES},
}
#: by OpenVINO inference precision: the rewrites of each component compiled for static shapes, in order. Each
#: nearest 2x upsampling's convolution as phases in every precision; the U-Net's GEGLU projections as two products in
#: bf16 only (in fp32 the two products gained nothing). In fp32, the VAE decoder's smaller convolutions in Winograd
#: once its shapes are known (within 6e-5 of direct convolutions), and the U-Net's larger convolutions
#: (WINOGRAD_LARGE). Their gains: docs/design-notes.md.
STATIC_SHAPE_REWRITES: Mapping[str, Mapping[Component, tuple[StaticShapeRewrite, ...]]] = {
    "bf16": {**{unet: (GEGLU_HALVES, UPSAMPLE_PHASES) for unet in UNET_PASSES}, Component.VAE_DECODER: (UPSAMPLE_PHASES,)},
    "f32": {**{unet: (UPSAMPLE_PHASES, WINOGRAD_LARGE) for unet in UNET_PASSES},
            Component.VAE_DECODER: (UPSAMPLE_PHASES, WINOGRAD_DECODER)},
}
#: the int8 backend's (bf16 inference of int8 models): bf16's, then the quantized models' convolution inputs from zero
#: (the U-Net, DeepCache's full pass, which is the int8 U-Net with one more output, and the VAE decoder)
INT8_STATIC_SHAPE_REWRITES: Mapping[Component, tuple[StaticShapeRewrite, ...]] = {
    **STATIC_SHAPE_REWRITES["bf16"],
    **{component: (*STATIC_SHAPE_REWRITES["bf16"].get(component, ()), UNSIGNED_CONV_INPUTS)
       for component in (Component.UNET, Component.UNET_DEEPCACHE_FULL, Component.VAE_DECODER)},
}
