"""Nearest 2x upsampling followed by a 3x3 convolution, as four 2x2 convolutions on the small input (one per output
phase) interleaved by a depth-to-space: 4 multiplies per output where the convolution on the upsampled image does 9.

Every output pixel (2i + a, 2j + b) of the upsampled convolution reads a 3x3 window of the upsampled image, which
covers only 2x2 distinct input pixels: rows i - 1 and i for a = 0, rows i and i + 1 for a = 1 (columns alike). The
window's taps that fall on the same input pixel are summed into one 2x2 kernel per phase, once, when the model is
rewritten; zero padding maps onto zero padding. Both U-Net and VAE decoder upsample this way (diffusers' Upsample2D).

The identity holds when the upsampled size is exactly twice the input's; the U-Net upsamples to its skip
connections' sizes, which are odd for latents not divisible by its downsampling. So the rewrite needs static
shapes, and leaves alone an upsampling it cannot prove to be 2x.

Each upsampling convolution runs in about half the time, outputs within 2e-5 (measurements:
docs/design-notes.md). The U-Net's 1280-channel upsamplers gain as much, but their kernels are large: held in the
process's heap, OpenVINO keeps them beside its own repacked copy. Given a `ConstantStore` that maps them from files
(the backend's cache), only the repacked copy stays resident, and every upsampling is rewritten; without one, only
weights of up to MAX_WEIGHT_ELEMENTS are.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from sdrt.engine.backends.openvino.constants import ConstantStore
from sdrt.engine.backends.openvino.passes.graph_patterns import is_nearest_upsampling, is_size_preserving_convolution

logger = logging.getLogger(__name__)

SCALE = 2
#: The largest 3x3 weights (elements) rewritten without a ConstantStore (a read-only bundle has no cache to map them
#: from): the phases' kernels are 16/9 of the 3x3 weights, held in the heap beside OpenVINO's repacked copy. This
#: limit (SD 1.5's 640-channel U-Net upsampler and the VAE decoder's) lowers exact mode's peak; the U-Net's
#: 1280-channel ones too would raise it above diffusers fp32's. Computed per call instead, those lose most of the
#: gain to per-call weight reorders.
MAX_WEIGHT_ELEMENTS = 4_000_000
# The 3x3 kernel's rows onto the 2 input rows an output row of each phase reads: phase 0 reads rows i - 1 (tap 0)
# and i (taps 1 and 2), phase 1 rows i (taps 0 and 1) and i + 1 (tap 2). Columns alike.
PHASE_TAPS = (
    np.array([[1, 0, 0], [0, 1, 1]], dtype=np.float32),  # (2, 3)
    np.array([[1, 1, 0], [0, 0, 1]], dtype=np.float32),
)


def rewrite_upsampling_convolutions(model: Any, store: ConstantStore | None = None,
                                    max_weight_elements: int = MAX_WEIGHT_ELEMENTS) -> int:
    """Rewrite, in place, every 3x3 stride-1 undilated convolution padded by 1, with constant weights, whose input
    is a nearest-neighbour upsampling of a static-shape 4-D tensor to exactly twice its height and width; return how
    many were rewritten. The phases' kernels are made by `store`, or else held in the heap, and then only for weights
    of at most `max_weight_elements` elements. Call it after reshaping the model to static shapes."""
    rewritten = 0
    for node in model.get_ordered_ops():
        weights = _rewritable_weights(node)
        if weights is not None and (store is not None or weights.size <= max_weight_elements):
            if store is None:
                constants = [_heap_constant(kernel) for kernel in _phase_kernels(weights)]
            else:
                shapes = [(*weights.shape[:2], SCALE, SCALE)] * SCALE ** 2
                constants = store(node.get_friendly_name(), shapes, lambda weights=weights: _phase_kernels(weights))
            _rewrite(node, constants)
            rewritten += 1
    if rewritten:
        model.validate_nodes_and_infer_types()
    logger.debug("upsampling convolutions as phases: %d rewritten", rewritten)
    return rewritten


def _rewritable_weights(node: Any) -> np.ndarray | None:
    """The (CO, C, 3, 3) weights of `node` if it is a convolution this rewrite is exact for, else None."""
    if not (is_size_preserving_convolution(node) and _is_nearest_doubling(node.input_value(0).get_node())):
        return None
    weights = _constant_value(node.input_value(1).get_node())
    if weights is None or weights.ndim != 4 or weights.shape[2:] != (3, 3):
        return None
    return weights


def _is_nearest_doubling(node: Any) -> bool:
    """Whether `node` is a nearest upsampling of a static 4-D shape to exactly twice its height and width."""
    if not is_nearest_upsampling(node):
        return False
    source, result = node.input_value(0).get_partial_shape(), node.output(0).get_partial_shape()
    if not (source.is_static and result.is_static and len(source) == 4):
        return False
    source, result = source.to_shape(), result.to_shape()
    return list(result) == [source[0], source[1], SCALE * source[2], SCALE * source[3]]


def _constant_value(node: Any) -> np.ndarray | None:
    """The value of a constant, or of a precision conversion of one (weights kept in fp16), else None."""
    if node.get_type_name() == "Convert":
        node = node.input_value(0).get_node()
    if node.get_type_name() != "Constant":
        return None
    return node.get_data()


def _heap_constant(value: np.ndarray) -> Any:
    """An OpenVINO constant holding a copy of `value` in the heap."""
    from openvino import opset13 as ops

    return ops.constant(value).output(0)


def _phase_kernels(weights: np.ndarray) -> list[np.ndarray]:
    """The four (CO, C, 2, 2) kernels of (CO, C, 3, 3) `weights`, in phase order (row phase, then column phase)."""
    weights = weights.astype(np.float32, copy=False)
    rows = [np.tensordot(weights, taps, axes=([2], [1])) for taps in PHASE_TAPS]  # (CO, C, 3, 2) each
    return [np.ascontiguousarray(np.tensordot(row, taps, axes=([2], [1]))) for row in rows for taps in PHASE_TAPS]


def _rewrite(convolution: Any, kernels: Sequence[Any]) -> None:
    from openvino import opset13 as ops

    source = convolution.input_value(0).get_node().input_value(0)  # before upsampling: (N, C, H, W)
    phases = []
    for row_phase in range(SCALE):
        for column_phase in range(SCALE):
            phases.append(ops.convolution(
                source, kernels[row_phase * SCALE + column_phase], strides=[1, 1],
                pads_begin=[1 - row_phase, 1 - column_phase], pads_end=[row_phase, column_phase], dilations=[1, 1],
            ))  # (N, CO, H, W) each
    # depth-to-space "blocks_first" reads channel (row_phase * 2 + column_phase) * CO + c: the concatenation's order
    result = ops.depth_to_space(ops.concat(phases, 1), "blocks_first", SCALE)  # (N, CO, 2H, 2W)
    result.set_friendly_name(convolution.get_friendly_name() + "/phases")
    convolution.output(0).replace(result.output(0))
