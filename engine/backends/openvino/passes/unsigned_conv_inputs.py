"""An int8 convolution's input quantized from zero, where NNCF gave it a zero point: the same products, and a load
that no longer computes a compensation from the weights.

NNCF quantizes an input that dips below zero (SiLU's, down to -0.28) asymmetrically: FakeQuantize over [low, high]
with low < 0, which OpenVINO's CPU plugin runs as unsigned 8-bit values with a zero point. oneDNN then computes each
output channel's compensation for that zero point from the weights, padding included, every time the model loads:
the cache keeps no repacked weights, so that is most of the int8 U-Net's load (measurements: docs/design-notes.md,
`python -m sdrt.benchmarks.int8_load`).

The rewrite quantizes on the same grid but outputs the grid shifted by -low, from zero (a FakeQuantize's output
range may differ from its input range): y = x_q - low, an unsigned input with no zero point. The convolution of y
misses low times the sum of each output channel's weights, added back as a bias. Zero padding would be wrong for
y (a padded x of 0 is a y of -low), so the padding moves before the FakeQuantize, onto x, and the convolution
itself pads nothing. NNCF aligns low with the grid (its zero point is an integer), so the padded zeros quantize to
exactly -low and the products are those of the model rewritten; a range not aligned is left as it is.
"""
from __future__ import annotations

import logging
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

#: an 8-bit FakeQuantize
_LEVELS = 256
#: how far from an integer a zero point may be (in grid steps) for the padded zeros to stay zeros: NNCF's are
#: integers up to float32 rounding
_ZERO_POINT_TOLERANCE = 1e-3
#: the operations of an int8 weight's dequantizing expression (convert, subtract the zero point, multiply by the
#: scale; fp16 scales converted), evaluated with numpy
_WEIGHT_OPERATIONS = {"Subtract": np.subtract, "Multiply": np.multiply, "Add": np.add}


def rewrite_unsigned_convolution_inputs(model: Any) -> int:
    """Rewrite, in place, every 8-bit FakeQuantize with a range below zero whose outputs are all the data input of
    explicitly padded convolutions (with the same padding) of constant weights, as described above; return how many
    were rewritten."""
    rewritten = 0
    for node in model.get_ordered_ops():
        found = _quantized_convolutions(node)
        if found is None:
            continue
        low, high, convolutions, weight_sums = found
        _rewrite(node, low, high, convolutions, weight_sums)
        rewritten += 1
    if rewritten:
        model.validate_nodes_and_infer_types()
    logger.debug("int8 convolution inputs from zero: %d rewritten", rewritten)
    return rewritten


def _quantized_convolutions(node: Any) -> tuple[float, float, list[Any], list[np.ndarray]] | None:
    """(low, high, the convolutions it feeds, each one's per-output-channel weight sums) if `node` is a
    FakeQuantize this rewrite is for."""
    if node.get_type_name() != "FakeQuantize" or node.get_attributes()["levels"] != _LEVELS:
        return None
    bounds = [_scalar(node.input_value(i)) for i in range(1, 5)]
    if None in bounds:
        return None
    input_low, input_high, output_low, output_high = bounds
    if input_low != output_low or input_high != output_high or not input_low < 0 < input_high:
        return None
    zero_point = -input_low / ((input_high - input_low) / (_LEVELS - 1))
    if abs(zero_point - round(zero_point)) > _ZERO_POINT_TOLERANCE:  # a padded zero would not quantize to zero
        return None
    targets = list(node.output(0).get_target_inputs())
    convolutions = [target.get_node() for target in targets]
    if not targets or not all(_is_explicit_convolution(c) and t.get_index() == 0 for c, t in zip(convolutions, targets)):
        return None
    if len({_padding(c) for c in convolutions}) != 1:
        return None
    weight_sums = []
    for convolution in convolutions:
        weights = _constant_value(convolution.input_value(1))  # (C_out, C_in, kH, kW)
        if weights is None or weights.ndim != 4:
            return None
        weight_sums.append(weights.sum(axis=(1, 2, 3), dtype=np.float64))  # (C_out,)
    return input_low, input_high, convolutions, weight_sums


def _rewrite(quantize: Any, low: float, high: float, convolutions: list[Any], weight_sums: list[np.ndarray]) -> None:
    from openvino import opset13 as ops

    pads_begin, pads_end = _padding(convolutions[0])
    data = quantize.input_value(0)  # (N, C_in, H, W)
    if any(pads_begin) or any(pads_end):
        data = ops.pad(data, np.array([0, 0, *pads_begin], np.int64), np.array([0, 0, *pads_end], np.int64),
                       "constant", np.array(0, np.float32)).output(0)  # (N, C_in, H + pads, W + pads)
    span = np.float32(high - low)
    shifted = ops.fake_quantize(data, np.float32(low), np.float32(high), np.float32(0), span, _LEVELS)  # x_q - low
    shifted.set_friendly_name(f"{quantize.get_friendly_name()}/from_zero")
    no_padding = [0] * len(pads_begin)
    for convolution, weight_sum in zip(convolutions, weight_sums):
        attributes = convolution.get_attributes()
        product = ops.convolution(shifted, convolution.input_value(1), attributes["strides"], no_padding, no_padding,
                                  attributes["dilations"])  # (N, C_out, H', W')
        bias = (low * weight_sum).astype(np.float32).reshape(1, -1, 1, 1)  # (1, C_out, 1, 1)
        result = ops.add(product, ops.constant(bias))
        result.set_friendly_name(f"{convolution.get_friendly_name()}/from_zero")
        convolution.output(0).replace(result.output(0))


def _is_explicit_convolution(node: Any) -> bool:
    return (node.get_type_name() == "Convolution" and node.get_attributes()["auto_pad"] == "explicit"
            and node.get_input_partial_shape(0).rank.get_length() == 4)


def _padding(convolution: Any) -> tuple[tuple[int, ...], tuple[int, ...]]:
    attributes = convolution.get_attributes()
    return tuple(attributes["pads_begin"]), tuple(attributes["pads_end"])


def _scalar(output: Any) -> float | None:
    node = output.get_node()
    if node.get_type_name() != "Constant":
        return None
    data = node.get_data()
    return float(data.reshape(-1)[0]) if data.size == 1 else None


def _constant_value(output: Any) -> np.ndarray | None:
    """The float32 value of a constant expression (a weight and its dequantization), None if it is not one."""
    node = output.get_node()
    kind = node.get_type_name()
    if kind == "Constant":
        return node.get_data().astype(np.float32)
    if kind == "Convert":
        return _constant_value(node.input_value(0))
    if kind in _WEIGHT_OPERATIONS:
        operands = [_constant_value(node.input_value(i)) for i in range(2)]
        return None if operands[0] is None or operands[1] is None else _WEIGHT_OPERATIONS[kind](*operands)
    return None
