"""Patterns in OpenVINO models that the graph rewrites (winograd.py, upsample_phases.py) look for."""
from __future__ import annotations

from typing import Any


def is_size_preserving_convolution(node: Any) -> bool:
    """Whether `node` is a stride-1, undilated convolution padded by 1 on each side (a 3x3 one keeps the size)."""
    if node.get_type_name() != "Convolution":
        return False
    attributes = node.get_attributes()
    return (
        attributes["auto_pad"] == "explicit"
        and list(attributes["strides"]) == [1, 1]
        and list(attributes["dilations"]) == [1, 1]
        and list(attributes["pads_begin"]) == [1, 1]
        and list(attributes["pads_end"]) == [1, 1]
    )


def is_nearest_upsampling(node: Any) -> bool:
    """Whether `node` upsamples with output pixel o reading input pixel floor(o * input size / output size): nearest
    neighbour, asymmetric coordinates, rounded down (torch's "nearest")."""
    if node.get_type_name() != "Interpolate":
        return False
    attributes = node.get_attributes()
    return (
        attributes["mode"] == "nearest"
        and attributes["coordinate_transformation_mode"] == "asymmetric"
        and attributes["nearest_mode"] == "floor"
        and not any(attributes["pads_begin"])
        and not any(attributes["pads_end"])
    )
