"""Classifier-free guidance runs the U-Net on a batch of two halves, [unconditional; conditional]
(sdrt.engine.guidance_batch), whose latents and timesteps are identical: only the context differs. Every operation of a U-Net is per sample, so whatever does
not read the context (the time embedding and each ResNet's projection of it, conv_in, the first ResNet block, the
first transformer block's self-attention: most of it at the highest resolution) computes the same values for both
halves. This rewrite runs that prefix on the first half only and repeats its results along the batch where the
context-dependent part reads them.

The rewritten model is valid only for batches whose halves are identical in every halved input: the backend checks
each call's inputs (next to nothing against a U-Net call) and compiles the unrewritten model when a call breaks it.
It also relies on the prefix being per sample, as every exported U-Net is: a prefix tensor whose first axis is not
the dynamic batch leaves the model as it is.

Shapes are the subtle part. Inside the prefix, shapes read from its tensors (OpenVINO `ShapeOf`) give the half
batch, as its own reshapes need; where a shape computed there reaches the context-dependent part (a transformer
block reshaping its output to its input's shape), it must give the whole batch: that shape computation is copied,
reading the repeated tensors. Measurements: docs/design-notes.md.
"""
from __future__ import annotations

import logging
from collections.abc import Collection
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)


def share_guidance_prefix(model: Any, halved_inputs: Collection[str]) -> int:
    """Rewrite, in place, the dynamic-batch OpenVINO `model` so that the nodes depending only on the `halved_inputs`
    (and constants) run on the first half of the batch; return how many tensors are repeated into the rest of the
    model (0: nothing rewritten, the model is unchanged)."""
    from openvino import opset13 as ops
    from openvino.utils.node_factory import NodeFactory

    parameters = {p.get_friendly_name(): p for p in model.get_parameters()}
    halved = set(halved_inputs)
    if not halved <= parameters.keys() or halved == parameters.keys():
        return 0
    ordered = model.get_ordered_ops()
    depends: dict[Any, frozenset[str]] = {}  # the parameters each node depends on
    shape_valued: set[Any] = set()  # ShapeOf, and what is computed from shapes and constants alone
    for node in ordered:
        sources = [i.get_source_output().get_node() for i in node.inputs()]
        if node.get_type_name() == "Parameter":
            depends[node] = frozenset([node.get_friendly_name()])
        else:
            depends[node] = frozenset().union(*(depends[source] for source in sources))
        if node.get_type_name() == "ShapeOf" or (
            any(s in shape_valued for s in sources) and all(s in shape_valued or s.get_type_name() == "Constant" for s in sources)
        ):
            shape_valued.add(node)
    shared = {node for node in ordered if depends[node] and depends[node] <= halved}
    # Edges from the shared prefix into the rest of the model: data to repeat, shapes to recompute for the whole batch.
    crossings = [
        (target, target.get_source_output())
        for node in ordered if node not in shared
        for target in node.inputs() if target.get_source_output().get_node() in shared
    ]
    if not crossings:
        return 0
    for _, source in crossings:
        shape = source.get_partial_shape()
        if source.get_node() not in shape_valued and (shape.rank.is_dynamic or shape.rank.get_length() == 0 or shape[0].is_static):
            logger.debug("guidance prefix: %s has no dynamic batch axis; model left as it is", source.get_node().get_friendly_name())
            return 0

    repeated: dict[tuple[Any, int], Any] = {}
    recomputed: dict[Any, Any] = {}

    def whole_batch(source: Any) -> Any:
        """`source`'s value for the whole batch: a halved parameter itself, any other shared tensor repeated."""
        if source.get_node().get_type_name() == "Parameter":
            return source
        key = (source.get_node(), source.get_index())
        if key not in repeated:
            repeated[key] = ops.concat([source, source], 0).output(0)  # (2B, ...) from (B, ...): guidance_batch.repeat
        return repeated[key]

    def whole_batch_shape(node: Any) -> Any:
        """A copy of the shape computation `node`, reading the shapes of whole-batch tensors."""
        if node.get_type_name() == "Constant":
            return node
        if node not in recomputed:
            if node.get_type_name() == "ShapeOf":
                inputs = [whole_batch(node.input_value(0))]
            else:
                inputs = [whole_batch_shape(i.get_source_output().get_node()).output(i.get_source_output().get_index()) for i in node.inputs()]
            recomputed[node] = NodeFactory(node.get_type_info().version_id).create(node.get_type_name(), inputs, node.get_attributes())
        return recomputed[node]

    for target, source in crossings:
        node = source.get_node()
        replacement = whole_batch_shape(node).output(source.get_index()) if node in shape_valued else whole_batch(source)
        target.replace_source_output(replacement)
    for name in halved:
        parameter = parameters[name]
        first_half = ops.split(parameter, ops.constant(np.int64(0)), 2).output(0)  # (B, ...) of (2B, ...): the uncond half
        for target in list(parameter.output(0).get_target_inputs()):
            if target.get_node() in shared:
                target.replace_source_output(first_half)
    model.validate_nodes_and_infer_types()
    logger.debug("guidance prefix: %d nodes run on half the batch, %d tensors repeated, %d shape nodes recomputed",
                 len(shared), len(repeated), len(recomputed))
    return len(repeated)
