"""Winograd F(4x4, 3x3) for an OpenVINO model's 3x3 convolutions: 2.25 multiplies per output where a direct 3x3
convolution does 9, at fp32 accuracy (exact mode).

Each rewritten convolution becomes four matrix products around one patch extraction: the input, padded to whole
tiles, is cut into overlapping 6x6 patches (stride 4); the input transform Bᵀ d B of every patch and channel is one
(36, 36) product; the 36 products with the weights in the Winograd domain are one batched (CO, C) @ (C, tiles)
product per point; the output transform Aᵀ m A is one (16, 36) product, and a depth-to-space interleaves the 4x4
output tiles. (A first version built the transforms from 36 depthwise convolutions, 36 1x1 convolutions and ~100
additions: the same arithmetic, but its transforms' memory traffic ate the saving on large activations.)

The Winograd-domain weights are four times the size of the 3x3 weights (36 values where there were 9). Kept
resident, they would add that much to SD 1.5's fp32 U-Net, and exact mode must never use more memory than
diffusers: so they are computed on every call from the 3x3 weights, which stay the only copy held. That costs
bandwidth in proportion to the weights, while the saving grows with the activations: the rewrite pays only for
convolutions with small weights, which in a U-Net are those at high resolution. Once shapes are static, the larger
ones on inputs of 16² and up gain too, with their weight transform done in chunks of output channels, each chunk's
products right after it, so that only one chunk's Winograd-domain weights are held (CHUNK_WEIGHT_ELEMENTS).

Larger weights lose where the activations are small and, where they gain, their per-call Winograd-domain weights
cost memory, unless transformed in chunks (MIN_STATIC_INPUT_AREA). Convolutions of a nearest upsampling are left to
`upsample_phases.py`, which does more for them. Measurements: docs/design-notes.md.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from sdrt.engine.backends.openvino.constants import ConstantStore
from sdrt.engine.backends.openvino.passes.graph_patterns import is_nearest_upsampling, is_size_preserving_convolution

logger = logging.getLogger(__name__)

TILE = 4  # outputs per tile side: F(4x4, 3x3)
POINTS = TILE + 2  # Winograd-domain points per tile side (the input tile is 6x6)
#: The largest 3x3 weights (elements) rewritten. The per-call Winograd-domain weights also add to the model's
#: intermediate buffers, and those set exact mode's peak: this limit (SD 1.5's convolutions of at most 640x640
#: channels) keeps it below diffusers fp32's, and larger ones lose time as well.
MAX_WEIGHT_ELEMENTS = 4_000_000
#: The largest 3x3 weights (elements) whose Winograd-domain weights are computed in one product; larger ones are
#: computed and used one chunk of output channels at a time, so that the intermediate buffers hold one chunk's (four
#: times its 3x3 weights: 64 MB here) rather than the whole convolution's: as fast as one product, for a fraction of
#: its memory.
CHUNK_WEIGHT_ELEMENTS = 4_000_000
#: The smallest input (height x width) on which a model compiled for static shapes has its convolutions of any weight
#: size rewritten, in chunks (the U-Net's in exact mode, which MAX_WEIGHT_ELEMENTS leaves direct in the converted
#: model). On smaller inputs the weight transform outweighs the products (at 8², four tiles per sample). The
#: rearranged weights are mapped from the bundle's cache: held in the heap, they would raise exact mode's peak.
MIN_STATIC_INPUT_AREA = 16 * 16
#: The largest inputs (elements) of a VAE decoder's convolutions rewritten: its activations, not its weights, set its
#: peak. All but the full-resolution level: rewriting that too gains nothing more and raises the peak by half.
MAX_DECODER_INPUT_ELEMENTS = 256 * 256 * 256
#: Names the rewritten graph in caches of converted models: bump it whenever the rewrite's output changes (2: the
#: weight transform kept per call under static shapes too; 3: upsampling convolutions left to the phase rewrite; 4:
#: the patch-and-product form; 5: the weight transform reads the weights in their own layout, (CO C, 9), which
#: spares a transpose per call).
REVISION = 5

# Lavin & Gray's F(4, 3) on the points 0, ±1, ±2 and infinity: y = Aᵀ [(G g Gᵀ) ⊙ (Bᵀ d B)] A for a 6x6 input tile d,
# 3x3 filter g and 4x4 output tile y.
INPUT_TRANSFORM = np.array(  # Bᵀ, (6, 6)
    [[4, 0, -5, 0, 1, 0],
     [0, -4, -4, 1, 1, 0],
     [0, 4, -4, -1, 1, 0],
     [0, -2, -1, 2, 1, 0],
     [0, 2, -1, -2, 1, 0],
     [0, 4, 0, -5, 0, 1]], dtype=np.float64)
FILTER_TRANSFORM = np.array(  # G, (6, 3)
    [[1 / 4, 0, 0],
     [-1 / 6, -1 / 6, -1 / 6],
     [-1 / 6, 1 / 6, -1 / 6],
     [1 / 24, 1 / 12, 1 / 6],
     [1 / 24, -1 / 12, 1 / 6],
     [0, 0, 1]], dtype=np.float64)
OUTPUT_TRANSFORM = np.array(  # Aᵀ, (4, 6)
    [[1, 1, 1, 1, 1, 0],
     [0, 1, -1, 2, -2, 0],
     [0, 1, 1, 4, 4, 0],
     [0, 1, -1, 8, -8, 1]], dtype=np.float64)


def rewrite_convolutions(model: Any, max_weight_elements: int | None = MAX_WEIGHT_ELEMENTS, max_input_elements: int | None = None,
                         min_input_area: int | None = None, store: ConstantStore | None = None) -> int:
    """Rewrite, in place, every 3x3 stride-1 undilated convolution of the OpenVINO `model` with constant weights,
    padded by 1 on each side, on a 4-D input that is not a nearest upsampling; return how many were rewritten. Limits
    left None do not apply: weights of at most `max_weight_elements` elements; a static input of at most
    `max_input_elements` elements; a static input of at least `min_input_area` pixels (height x width).

    The weight transform runs per call, also once the model is reshaped to static shapes: in chunks of output channels
    for weights above CHUNK_WEIGHT_ELEMENTS. Its operands, the 3x3 weights rearranged, are made by `store` (mapped
    from files), or else held in the heap: a rewrite after reshaping, whose model maps the bundle's weights, should
    be given a store, or the rearranged copy stays resident beside OpenVINO's repacked one."""
    from openvino import opset13 as ops

    rewritten = 0
    for node in model.get_ordered_ops():
        if not _rewritable(node, max_weight_elements, max_input_elements, min_input_area):
            continue
        weights = node.input_value(1).get_node().get_data()  # (CO, C, 3, 3)
        if store is None:
            taps = [ops.constant(chunk).output(0) for chunk in _chunk_taps(weights)]
        else:
            shapes = [(count * weights.shape[1], 9) for count in _chunk_sizes(weights)]
            taps = store(node.get_friendly_name() + "/winograd-taps", shapes, lambda weights=weights: _chunk_taps(weights))
        _rewrite(node, taps)
        rewritten += 1
    if rewritten:
        model.validate_nodes_and_infer_types()
    logger.debug("Winograd F(4x4, 3x3): %d convolutions rewritten", rewritten)
    return rewritten


def _rewritable(node: Any, max_weight_elements: int | None, max_input_elements: int | None, min_input_area: int | None) -> bool:
    from openvino import Type

    if not is_size_preserving_convolution(node):
        return False
    weights = node.input_value(1).get_node()
    if weights.get_type_name() != "Constant" or node.input_value(1).get_element_type() != Type.f32:
        return False
    shape = list(weights.get_output_shape(0))
    source = node.input_value(0).get_partial_shape()
    if not (shape[2:] == [3, 3] and source.rank.is_static and source.rank.get_length() == 4):
        return False
    if max_input_elements is not None or min_input_area is not None:
        if not source.is_static:
            return False
        dimensions = [int(d) for d in source.to_shape()]
        if max_input_elements is not None and int(np.prod(dimensions)) > max_input_elements:
            return False
        if min_input_area is not None and dimensions[2] * dimensions[3] < min_input_area:
            return False
    return (
        (max_weight_elements is None or int(np.prod(shape)) <= max_weight_elements)
        and not is_nearest_upsampling(node.input_value(0).get_node())
    )


def _chunk_sizes(weights: np.ndarray) -> list[int]:
    """Output channels per chunk of (CO, C, 3, 3) `weights`: as even as can be, each of at most CHUNK_WEIGHT_ELEMENTS."""
    chunks = -(-weights.size // CHUNK_WEIGHT_ELEMENTS)
    return [len(part) for part in np.array_split(np.arange(weights.shape[0]), chunks)]


def _chunk_taps(weights: np.ndarray) -> list[np.ndarray]:
    """The weight transform's operands: each chunk of output channels' 3x3 weights as (co * C, 9)."""
    in_channels = weights.shape[1]
    bounds = np.cumsum([0, *_chunk_sizes(weights)])
    return [
        np.ascontiguousarray(weights[start:end].reshape((end - start) * in_channels, 9), dtype=np.float32)
        for start, end in zip(bounds[:-1], bounds[1:])
    ]


def _rewrite(convolution: Any, taps: Sequence[Any]) -> None:
    """Replace `convolution` by its Winograd form, with the weights' chunks as `taps` ((co * C, 9) each, in order)."""
    from openvino import opset3, opset13 as ops

    name = convolution.get_friendly_name() + "/winograd"
    source = convolution.input_value(0)  # (N, C, H, W)
    out_channels, in_channels = list(convolution.input_value(1).get_shape())[:2]

    def constant(value: np.ndarray) -> Any:
        return ops.constant(np.ascontiguousarray(value, dtype=np.float32))

    def integers(*values: int) -> Any:
        return ops.constant(np.array(values, np.int64))

    # The input is padded by 1 at the start and at the end to whole tiles (T = ceil(H/4) x ceil(W/4) of them); the
    # surplus output is cropped below. Each 6x6 input tile becomes one patch: 36 values per channel, point-major.
    height_width = ops.gather(ops.shape_of(source), integers(2, 3), ops.constant(np.int64(0)))  # (2,): H, W
    tiles = ops.divide(ops.add(height_width, integers(TILE - 1)), integers(TILE))  # (2,): ceil(H/4), ceil(W/4)
    pads_end = ops.concat([integers(0, 0), ops.subtract(ops.multiply(tiles, integers(TILE)), ops.subtract(height_width, integers(1)))], 0)
    padded = ops.pad(source, integers(0, 0, 1, 1), pads_end, "constant")  # (N, C, 4 ceil(H/4) + 2, 4 ceil(W/4) + 2)
    patches = opset3.extract_image_patches(padded, [POINTS, POINTS], [TILE, TILE], [1, 1], "valid")  # (N, 36 C, ...)
    patches = ops.reshape(patches, integers(0, POINTS * POINTS, -1), True)  # (N, 36, C T)

    # Input transform Bᵀ d B of every tile and channel, as one product: (36, 36) @ (N, 36, C T).
    input_points = np.kron(INPUT_TRANSFORM, INPUT_TRANSFORM)  # (36, 36): point (i, j) from tap (u, v)
    transformed = ops.reshape(ops.matmul(constant(input_points), patches, False, False),
                              integers(0, POINTS * POINTS, in_channels, -1), True)  # (N, 36, C, T)

    # Filter transform G g Gᵀ, per call: (36, 9) @ (co*C, 9)ᵀ for each chunk of output channels, each chunk's products
    # right after it, so that one chunk's Winograd-domain weights are held at a time. The factor `one` is what keeps
    # OpenVINO from folding the transform into a constant four times the weights' size: always 1.0 (NaN and
    # infinities included), it is computed from one input value, which no compilation can know, even for static shapes.
    first = ops.reshape(ops.slice(source, integers(0, 0, 0, 0), integers(1, 1, 1, 1), integers(1, 1, 1, 1)), integers(1), False)  # (1,)
    one = ops.convert(ops.logical_or(ops.is_nan(first), ops.equal(first, first)), "f32")  # (1,)
    filter_points = ops.multiply(constant(np.kron(FILTER_TRANSFORM, FILTER_TRANSFORM)), one)  # (36, 9): point (i, j) from tap (u, v)
    products = []
    for chunk in taps:
        domain_weights = ops.reshape(ops.matmul(filter_points, chunk, False, True),
                                     integers(POINTS * POINTS, -1, in_channels), False)  # (36, co, C)
        products.append(ops.matmul(domain_weights, transformed, False, False))  # (N, 36, co, T): one (co, C) @ (C, T) per point
    products = products[0] if len(products) == 1 else ops.concat(products, 2)  # (N, 36, CO, T)

    # Output transform Aᵀ m A, as one product: (16, 36) @ (N, 36, CO T); then the 4x4 output tiles interleaved.
    output_points = np.kron(OUTPUT_TRANSFORM, OUTPUT_TRANSFORM)  # (16, 36): output (p, q) from point (i, j)
    outputs = ops.matmul(constant(output_points), ops.reshape(products, integers(0, POINTS * POINTS, -1), True), False, False)  # (N, 16, CO T)
    outputs = ops.reshape(outputs, ops.concat([integers(0, TILE * TILE * out_channels), tiles], 0), True)  # (N, 16 CO, ceil(H/4), ceil(W/4))
    # depth-to-space "blocks_first" reads channel (p * 4 + q) * CO + c: the product's order
    outputs = ops.depth_to_space(outputs, "blocks_first", TILE)  # (N, CO, 4 ceil(H/4), 4 ceil(W/4))
    result = ops.slice(outputs, integers(0, 0), height_width, integers(1, 1), integers(2, 3))  # (N, CO, H, W)
    result.set_friendly_name(name)
    convolution.output(0).replace(result.output(0))
