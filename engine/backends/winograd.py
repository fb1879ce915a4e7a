"""Winograd F(4x4, 3x3) for an OpenVINO model's 3x3 convolutions: 2.25 multiplies per output where a direct 3x3
convolution does 9, at fp32 accuracy (exact mode).

Each rewritten convolution becomes: an input transform (36 depthwise 6x6 stride-4 convolutions, one per point of
the 6x6 Winograd tile), 36 1x1 convolutions (the products, with the weights in the Winograd domain), an output
transform (sums of the 36 products) and a depth-to-space that interleaves the 4x4 output tiles.

The Winograd-domain weights are four times the size of the 3x3 weights (36 values where there were 9). Kept
resident, the rewrite would add 0.9 GB to SD 1.5's fp32 U-Net, and exact mode must never use more memory than
diffusers: so they are computed on every call from the 3x3 weights, which stay the only copy held. That costs
bandwidth in proportion to the weights, while the saving grows with the activations: the rewrite pays only for
convolutions with small weights, which in a U-Net are those at high resolution.

Measured (2-core AVX-512 CPU, SD 1.5 U-Net at 512², batch 2, fp32), with all 24 convolutions of up to 640 output
channels rewritten: they take 2.65 s -> 1.5 s per call, the whole call 8.8 -> 7.8 s, output within 2.3e-5 of the
direct convolutions. With the 20 that MAX_WEIGHT_ELEMENTS kept for memory: 8.9 -> 7.9-8.4 s per call (the same
process timing both, alternately; this machine is noisy); 19 since the upsampler went to `upsample_phases.py`. The
1280-channel convolutions (at 16² and 8²) lose: 88 -> 139 ms each, the weight transform dominating. A VAE decoder
gains nothing (12.7 -> 12.5 s at 512²): its activations are too large for the cache, and the transforms' memory
traffic eats the saving. Convolutions of a nearest upsampling are left to `upsample_phases.py`, which does more for
them (SD 1.5's 640-channel U-Net upsampler: 274 ms direct, 137 ms in Winograd, 123 ms in phases).
"""
from __future__ import annotations

import logging
from typing import Any

import numpy as np

from sdrt.engine.backends.graph_patterns import is_nearest_upsampling, is_size_preserving_convolution

logger = logging.getLogger(__name__)

TILE = 4  # outputs per tile side: F(4x4, 3x3)
POINTS = TILE + 2  # Winograd-domain points per tile side (the input tile is 6x6)
#: The largest 3x3 weights (elements) rewritten. The per-call Winograd-domain weights also add to the model's
#: intermediate buffers, and those set exact mode's peak. SD 1.5's U-Net at 512², exact mode's peak RSS over two
#: requests: 6.39 GB direct, 6.65 GB with this limit (20 convolutions: those of at most 640x640 channels), 6.84 GB
#: with 12 M (24: up to 1920 -> 640 channels), diffusers fp32 6.7-6.9 GB. Its 1280-channel convolutions (14.7 M
#: elements and up) lose time as well.
MAX_WEIGHT_ELEMENTS = 4_000_000
#: Names the rewritten graph in caches of converted models: bump it whenever the rewrite's output changes (2: the
#: weight transform kept per call under static shapes too; 3: upsampling convolutions left to the phase rewrite).
REVISION = 3

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


def rewrite_convolutions(model: Any, max_weight_elements: int = MAX_WEIGHT_ELEMENTS) -> int:
    """Rewrite, in place, every 3x3 stride-1 undilated convolution of the OpenVINO `model` whose weights are a
    constant of at most `max_weight_elements` elements, padded by 1 on each side, on a 4-D input that is not a
    nearest upsampling; return how many were rewritten. The model may later be reshaped to static shapes: the weight
    transform still runs per call."""
    rewritten = 0
    for node in model.get_ordered_ops():
        if _rewritable(node, max_weight_elements):
            _rewrite(node)
            rewritten += 1
    if rewritten:
        model.validate_nodes_and_infer_types()
    logger.debug("Winograd F(4x4, 3x3): %d convolutions rewritten", rewritten)
    return rewritten


def _rewritable(node: Any, max_weight_elements: int) -> bool:
    from openvino import Type

    if not is_size_preserving_convolution(node):
        return False
    weights = node.input_value(1).get_node()
    if weights.get_type_name() != "Constant" or node.input_value(1).get_element_type() != Type.f32:
        return False
    shape = list(weights.get_output_shape(0))
    source = node.input_value(0).get_partial_shape()
    return (
        shape[2:] == [3, 3]
        and int(np.prod(shape)) <= max_weight_elements
        and source.rank.is_static
        and source.rank.get_length() == 4
        and not is_nearest_upsampling(node.input_value(0).get_node())
    )


def _rewrite(convolution: Any) -> None:
    from openvino import opset13 as ops

    name = convolution.get_friendly_name() + "/winograd"
    source = convolution.input_value(0)
    weights = convolution.input_value(1).get_node().get_data()  # (CO, C, 3, 3)
    out_channels, in_channels = weights.shape[:2]

    def constant(value: np.ndarray) -> Any:
        return ops.constant(np.ascontiguousarray(value, dtype=np.float32))

    # Input transform: the depthwise kernel of point (i, j) is the outer product of Bᵀ's rows i and j. The end is
    # padded to a whole number of tiles; the surplus output is cropped below.
    point_kernels = np.einsum("iu,jv->ijuv", INPUT_TRANSFORM, INPUT_TRANSFORM)  # (6, 6, 6, 6)
    points = {
        (i, j): ops.group_convolution(
            source, constant(np.broadcast_to(point_kernels[i, j], (in_channels, 1, 1, POINTS, POINTS))),
            strides=[TILE, TILE], pads_begin=[1, 1], pads_end=[TILE, TILE], dilations=[1, 1],
        )  # (N, C, ceil(H/4), ceil(W/4))
        for i in range(POINTS) for j in range(POINTS)
    }

    # Filter transform G g Gᵀ, per call: (36, 9) @ (9, CO*C). The factor `one` is what keeps OpenVINO from folding
    # the product into a constant four times the weights' size: always 1.0 (NaN and infinities included), it is
    # computed from one input value, which no compilation can know, even for static shapes.
    first = ops.reshape(ops.slice(source, *(ops.constant(np.array(v, np.int64)) for v in ([0] * 4, [1] * 4, [1] * 4))),
                        ops.constant(np.array([1], np.int64)), False)  # (1,)
    one = ops.convert(ops.logical_or(ops.is_nan(first), ops.equal(first, first)), "f32")  # (1,)
    filter_kernels = np.einsum("iu,jv->ijuv", FILTER_TRANSFORM, FILTER_TRANSFORM).reshape(POINTS * POINTS, 9)
    taps = weights.transpose(2, 3, 0, 1).reshape(9, out_channels * in_channels)  # (9, CO*C)
    domain_weights = ops.matmul(ops.multiply(constant(filter_kernels), one), constant(taps), False, False)  # (36, CO*C)
    per_point = ops.split(domain_weights, ops.constant(np.int64(0)), POINTS * POINTS)
    kernel_shape = ops.constant(np.array([out_channels, in_channels, 1, 1], np.int64))

    products = {  # (N, CO, ceil(H/4), ceil(W/4)) each
        (i, j): ops.convolution(
            points[i, j], ops.reshape(per_point.output(i * POINTS + j), kernel_shape, False),
            strides=[1, 1], pads_begin=[0, 0], pads_end=[0, 0], dilations=[1, 1],
        )
        for i in range(POINTS) for j in range(POINTS)
    }

    def combination(coefficients: np.ndarray, terms: list[Any]) -> Any:
        total = None
        for coefficient, term in zip(coefficients, terms):
            if coefficient == 0:
                continue
            scaled = term if abs(coefficient) == 1 else ops.multiply(term, constant(np.array(abs(coefficient))))
            if total is None:
                total = scaled if coefficient > 0 else ops.negative(scaled)
            else:
                total = ops.add(total, scaled) if coefficient > 0 else ops.subtract(total, scaled)
        return total

    # Output transform Aᵀ m A, separably: over the tile's rows, then its columns.
    rows = {(p, j): combination(OUTPUT_TRANSFORM[p], [products[i, j] for i in range(POINTS)]) for p in range(TILE) for j in range(POINTS)}
    outputs = [combination(OUTPUT_TRANSFORM[q], [rows[p, j] for j in range(POINTS)]) for p in range(TILE) for q in range(TILE)]
    tiles = ops.depth_to_space(ops.concat(outputs, 1), "blocks_first", TILE)  # (N, CO, 4*ceil(H/4), 4*ceil(W/4))
    height_width = ops.gather(ops.shape_of(source), ops.constant(np.array([2, 3], np.int64)), ops.constant(np.int64(0)))
    result = ops.slice(tiles, ops.constant(np.array([0, 0], np.int64)), height_width, ops.constant(np.array([1, 1], np.int64)),
                       ops.constant(np.array([2, 3], np.int64)))  # (N, CO, H, W)
    result.set_friendly_name(name)
    convolution.output(0).replace(result.output(0))
