"""A GEGLU feed-forward's projection as two matrix products, one per half of its output, where the exported graph
projects once and slices the result in two (diffusers' GEGLU: `hidden, gate = proj(x).chunk(2, dim=-1)`).

OpenVINO's CPU plugin runs that slice as a reference (unvectorised) split of the product's largest output, and the
two halves then reach the GELU and the product of the halves through memory. Two products write each half where
its consumer reads it. The weights and bias are cut in two along the projection's output: the same values, so the
same results up to the order of the products' accumulation.

It makes the fast modes' U-Net calls a few percent faster at unchanged accuracy (measurements:
docs/design-notes.md); not in exact mode, whose fp32 products gained nothing from it.

The halves are new constants: they are made with a ConstantStore (the backend's cache, memory-mapped), so that
once OpenVINO has repacked them their pages are handed back like the weights'; held in the heap they would stay
resident beside the repacked copy. Without a store (a read-only bundle) nothing is rewritten.
"""
from __future__ import annotations

import logging
from typing import Any

import numpy as np

from sdrt.engine.backends.openvino.constants import ConstantStore

logger = logging.getLogger(__name__)

HALVES = 2
# element-wise operations a weight expression may combine its constants with, besides Convert (int8 dequantization:
# convert, subtract the zero point, multiply by the scale; fp16 weights: convert); named as in OpenVINO's opsets
_ELEMENTWISE = {"Multiply": "multiply", "Subtract": "subtract", "Add": "add"}


def rewrite_geglu_projections(model: Any, store: ConstantStore | None) -> int:
    """Rewrite, in place, every product-plus-bias of a 2-D constant weight expression whose output feeds exactly
    two unit-step slices of its last axis, its first and its second half, as two products; return how many were
    rewritten. Needs a `store` for the halves' constants (None: rewrites nothing)."""
    if store is None:
        return 0
    rewritten = 0
    for node in model.get_ordered_ops():
        split = _halves_split(node)
        if split is None:
            continue
        try:
            _rewrite(*split, store)
        except ValueError as error:  # a weight expression that does not slice along the outputs: left as it is
            logger.debug("GEGLU projection left alone: %s", error)
            continue
        rewritten += 1
    if rewritten:
        model.validate_nodes_and_infer_types()
    logger.debug("GEGLU projections as two products: %d rewritten", rewritten)
    return rewritten


def _halves_split(add: Any) -> tuple[Any, Any, int, list[Any]] | None:
    """(product, bias, output width, [first-half slice, second-half slice]) if `add` is a projection this rewrite is
    for."""
    if add.get_type_name() != "Add":
        return None
    for product_index in (0, 1):
        product, bias = add.input_value(product_index).get_node(), add.input_value(1 - product_index)
        if product.get_type_name() == "MatMul":
            break
    else:
        return None
    shape = add.get_output_partial_shape(0)
    if product.get_attributes()["transpose_a"] or shape.rank.is_dynamic or shape[shape.rank.get_length() - 1].is_dynamic:
        return None
    if product.get_input_partial_shape(1).rank.get_length() != 2 or not _is_constant_expression(product.input_value(1)):
        return None
    if bias.get_partial_shape().rank.get_length() != 1 or not _is_constant_expression(bias):
        return None
    rank, width = shape.rank.get_length(), shape[shape.rank.get_length() - 1].get_length()
    slices = {}
    for target in add.output(0).get_target_inputs():
        consumer = target.get_node()
        bounds = _last_axis_slice(consumer, rank, width)
        if bounds is None:
            return None
        slices[bounds] = consumer
    halves = [(0, width // 2), (width // 2, width)]
    if width % HALVES or len(add.output(0).get_target_inputs()) != HALVES or sorted(slices) != halves:
        return None
    return product, bias, width, [slices[bounds] for bounds in halves]


def _last_axis_slice(node: Any, rank: int, width: int) -> tuple[int, int] | None:
    """(start, stop) if `node` is a Slice of unit step along the last axis with constant bounds, else None."""
    if node.get_type_name() != "Slice" or node.get_input_size() != 5:
        return None
    start, stop, step, axes = (_integers(node.input_value(i)) for i in range(1, 5))
    if None in (start, stop, step, axes) or step != [1] or axes not in ([rank - 1], [-1]):
        return None
    return max(start[0], 0), min(stop[0], width)


def _integers(output: Any) -> list[int] | None:
    """The values of a constant, or of a broadcast of one value (as exported slice steps are), else None."""
    node = output.get_node()
    if node.get_type_name() == "Broadcast" and node.input_value(0).get_node().get_type_name() == "Constant":
        values = {int(v) for v in node.input_value(0).get_node().get_data().reshape(-1)}
        return list(values) if len(values) == 1 else None
    if node.get_type_name() != "Constant":
        return None
    return [int(v) for v in node.get_data().reshape(-1)]


def _is_fp16_decompression(node: Any) -> bool:
    """Whether `node` converts an fp16 constant to fp32, as OpenVINO reads fp16-compressed weights."""
    from openvino import Type

    return (node.get_type_name() == "Convert" and node.get_output_element_type(0) == Type.f32
            and node.input_value(0).get_node().get_type_name() == "Constant" and node.input_value(0).get_element_type() == Type.f16)


def _is_constant_expression(output: Any) -> bool:
    node = output.get_node()
    if node.get_type_name() == "Constant":
        return True
    if node.get_type_name() == "Convert" or node.get_type_name() in _ELEMENTWISE:
        return all(_is_constant_expression(node.input_value(i)) for i in range(node.get_input_size()))
    return False


def _rewrite(product: Any, bias: Any, width: int, halves: list[Any], store: ConstantStore) -> None:
    from openvino import opset13 as ops

    transpose_b = product.get_attributes()["transpose_b"]
    results = []
    for half in range(HALVES):
        start, stop = half * width // HALVES, (half + 1) * width // HALVES
        weights = _sliced(product.input_value(1), 0 if transpose_b else 1, width, start, stop, store)  # (N/2, K) or (K, N/2)
        half_bias = _sliced(bias, 0, width, start, stop, store)  # (N/2,)
        results.append(ops.add(ops.matmul(product.input_value(0), weights, False, transpose_b), half_bias))  # (..., N/2)
    for consumer, result in zip(halves, results):
        result.set_friendly_name(f"{consumer.get_friendly_name()}/projection")
        consumer.output(0).replace(result.output(0))


def _sliced(output: Any, axis: int, width: int, start: int, stop: int, store: ConstantStore) -> Any:
    """A copy of the constant expression `output` taking [start:stop] of its `axis` (of size `width`; constants
    broadcast along it are kept whole), its new constants made by `store`."""
    from openvino import opset13 as ops

    node = output.get_node()
    kind = node.get_type_name()
    if _is_fp16_decompression(node):
        # The store gives fp16 halves back as OpenVINO's decompression of them, which its CPU plugin keeps in fp16: a
        # plain conversion would be folded into fp32 weights, twice the size.
        return _sliced(node.input_value(0), axis, width, start, stop, store)
    if kind == "Constant":
        data = node.get_data()
        position = axis if axis >= 0 else data.ndim + axis
        if data.ndim <= position or data.shape[position] == 1:
            return output
        if data.shape[position] != width:
            raise ValueError(f"{node.get_friendly_name()}: {data.shape} does not span the projection's {width} outputs")
        index = tuple(slice(start, stop) if i == position else slice(None) for i in range(data.ndim))
        shape = tuple(stop - start if i == position else size for i, size in enumerate(data.shape))
        key = f"{node.get_friendly_name()}[{start}:{stop}]@{position}"
        constant, = store(key, [shape], lambda: [np.ascontiguousarray(data[index])])
        return constant
    inputs = [_sliced(node.input_value(i), axis, width, start, stop, store) for i in range(node.get_input_size())]
    if kind == "Convert":
        return ops.convert(inputs[0], node.get_output_element_type(0)).output(0)
    return getattr(ops, _ELEMENTWISE[kind])(*inputs).output(0)
