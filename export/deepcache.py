"""DeepCache's two U-Net passes (sdrt.engine.deepcache) as torch modules, and the graph edit that makes the full pass.

The full pass is the bundle's U-Net graph with the cached feature as a second output: `add_feature_output` copies
the U-Net's graph and names, as an output, the tensor a trace of `FullPass` returns as its feature (the two traces
run the same modules in the same order, so the node computing it has the same name in both). The copy reads the
U-Net's own weights file, so the full pass costs a graph of a few megabytes, not a second U-Net. The shallow pass
(`ShallowPass`) holds the blocks above the branch only, and a trace of it holds only their weights.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import onnx
import torch
from onnx import helper

from sdrt.engine.errors import InvalidArgumentError
from sdrt.engine.specs import SPECS, Component
from sdrt.export.errors import ExportError

FEATURE_OUTPUT = SPECS[Component.UNET_DEEPCACHE_FULL].outputs[1]


@dataclasses.dataclass(frozen=True)
class CacheBranch:
    """DeepCache's `cache_branch_id` as a place in the U-Net: `block` counts resolution levels from the top,
    `layer` the skip connections of that level's last up-block from its end (sdrt.engine.deepcache)."""

    block: int
    layer: int
    layers: int  # skip connections per up-block: layers_per_block + 1
    count: int  # the U-Net's branches: levels x layers

    @classmethod
    def of(cls, branch: int, levels: int, layers_per_block: int) -> CacheBranch:
        """The branch `branch` of a U-Net with `levels` resolution levels; InvalidArgumentError if it has none such."""
        layers = layers_per_block + 1
        if not isinstance(branch, int) or isinstance(branch, bool) or not 0 <= branch < levels * layers:
            raise InvalidArgumentError("deepcache_branch", f"must be an integer in 0..{levels * layers - 1} for this "
                                       f"U-Net ({levels} levels x {layers} skip connections), got {branch!r}")
        return cls(block=branch // layers, layer=branch % layers, layers=layers, count=levels * layers)

    @property
    def index(self) -> int:
        return self.block * self.layers + self.layer

    def up_block(self, unet: torch.nn.Module) -> int:
        """The index in `unet.up_blocks` of the up-block the shallow pass enters."""
        return len(unet.up_blocks) - 1 - self.block

    @property
    def first_up_layer(self) -> int:
        """The first layer of that up-block the shallow pass runs; the feature is the hidden state entering it."""
        return self.layers - 1 - self.layer


def check_unet(unet: torch.nn.Module) -> None:
    """Raise ExportError for a U-Net whose forward takes more than the SD 1.x/2.x passes reimplement."""
    extra = [name for name in ("class_embedding", "add_embedding", "encoder_hid_proj") if getattr(unet, name, None) is not None]
    if extra:
        raise ExportError(f"DeepCache's passes support SD 1.x/2.x U-Nets; this one has {', '.join(extra)}")


def _feature_module(unet: torch.nn.Module, branch: CacheBranch) -> torch.nn.Module:
    """The module whose output is the hidden state entering the branch's up-block layer."""
    index, first = branch.up_block(unet), branch.first_up_layer
    if first > 0:
        block = unet.up_blocks[index]
        return block.attentions[first - 1] if getattr(block, "attentions", None) else block.resnets[first - 1]
    return unet.up_blocks[index - 1] if index > 0 else unet.mid_block


class FullPass(torch.nn.Module):
    """The U-Net, also returning the hidden state entering the branch's up-block layer (read by a forward hook, so
    the U-Net runs exactly its own forward)."""

    def __init__(self, model: torch.nn.Module, branch: CacheBranch) -> None:
        super().__init__()
        self.model = model  # named as the U-Net's export wrapper names it: node names then match
        self.branch = branch

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        captured = []
        hook = _feature_module(self.model, self.branch).register_forward_hook(
            lambda module, args, output: captured.append(output[0] if isinstance(output, tuple) else output))
        try:
            noise_pred = self.model(sample, timestep, encoder_hidden_states, return_dict=False)[0]
        finally:
            hook.remove()
        return noise_pred, captured[0]


class ShallowPass(torch.nn.Module):
    """The U-Net's blocks above the branch: time embedding, conv_in, the down-blocks (and layers) whose skip
    connections the branch's up-block layer and those after it read, the cached feature in place of everything
    deeper, then those up-blocks and the output convolution; as UNet2DConditionModel.forward runs them."""

    def __init__(self, model: torch.nn.Module, branch: CacheBranch) -> None:
        super().__init__()
        check_unet(model)
        self.model = model
        self.branch = branch

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                deep_feature: torch.Tensor) -> torch.Tensor:
        unet, branch = self.model, self.branch
        # as diffusers: sides that are not multiples of the U-Net's total upsampling interpolate to the skips' sizes
        upsample_to_skips = any(side % 2**unet.num_upsamplers != 0 for side in sample.shape[-2:])
        emb = unet.time_embedding(unet.get_time_embed(sample=sample, timestep=timestep), None)
        if unet.time_embed_act is not None:
            emb = unet.time_embed_act(emb)
        hidden = unet.conv_in(sample)  # (B, C0, h, w)
        skips = (hidden,)
        for block in unet.down_blocks[:branch.block]:
            hidden, block_skips = _run_down_block(block, hidden, emb, encoder_hidden_states)
            skips += block_skips
        block = unet.down_blocks[branch.block]
        for layer in range(branch.layer):
            hidden = _run_layer(block, layer, hidden, emb, encoder_hidden_states)
            skips += (hidden,)
        hidden = deep_feature  # (B, F, h / 2^block, w / 2^block)
        first_block = branch.up_block(unet)
        for index in range(first_block, len(unet.up_blocks)):
            block = unet.up_blocks[index]
            first_layer = branch.first_up_layer if index == first_block else 0
            count = len(block.resnets) - first_layer
            block_skips, skips = skips[-count:], skips[:-count]
            upsample_size = skips[-1].shape[2:] if upsample_to_skips and index < len(unet.up_blocks) - 1 else None
            for layer in range(first_layer, len(block.resnets)):
                hidden = torch.cat([hidden, block_skips[-1]], dim=1)
                block_skips = block_skips[:-1]
                hidden = _run_layer(block, layer, hidden, emb, encoder_hidden_states)
            for upsampler in block.upsamplers or ():
                hidden = upsampler(hidden, upsample_size)
        if unet.conv_norm_out is not None:
            hidden = unet.conv_act(unet.conv_norm_out(hidden))
        return unet.conv_out(hidden)  # (B, C, h, w)


def _run_down_block(block: torch.nn.Module, hidden: torch.Tensor, emb: torch.Tensor,
                    context: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    if getattr(block, "has_cross_attention", False):
        return block(hidden_states=hidden, temb=emb, encoder_hidden_states=context)
    return block(hidden_states=hidden, temb=emb)


def _run_layer(block: torch.nn.Module, layer: int, hidden: torch.Tensor, emb: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """One resnet of a down- or up-block and its attention where it has one, as the block's forward runs them."""
    hidden = block.resnets[layer](hidden, emb)
    if getattr(block, "attentions", None):
        hidden = block.attentions[layer](hidden, encoder_hidden_states=context, return_dict=False)[0]
    return hidden


def feature_node(traced_full_pass: Path) -> tuple[str, int]:
    """The name of the node computing the feature output in a trace of FullPass, and which of its outputs it is."""
    graph = onnx.load(str(traced_full_pass), load_external_data=False).graph
    for node in graph.node:
        if FEATURE_OUTPUT.name in node.output:
            return node.name, list(node.output).index(FEATURE_OUTPUT.name)
    raise ExportError(f"the trace of DeepCache's full pass has no node computing {FEATURE_OUTPUT.name}")


def add_feature_output(unet_path: Path, node: tuple[str, int], channels: int, out_path: Path) -> None:
    """Write the U-Net graph at `unet_path` to `out_path` (same directory) with the output of `node` (name, output
    index), of `channels` channels, as a second output named as the spec says; its initializers keep pointing at the
    U-Net's weights."""
    model = onnx.load(str(unet_path), load_external_data=False)
    name, index = node
    producer = next((n for n in model.graph.node if n.name == name), None)
    if producer is None:
        raise ExportError(f"the U-Net graph has no node {name}, which computes DeepCache's feature in its trace")
    model.graph.node.append(helper.make_node("Identity", [producer.output[index]], [FEATURE_OUTPUT.name], name="deep_feature_output"))
    model.graph.output.append(helper.make_tensor_value_info(
        FEATURE_OUTPUT.name, onnx.TensorProto.FLOAT, [FEATURE_OUTPUT.axes[0], channels, *FEATURE_OUTPUT.axes[2:]]))
    onnx.save_model(model, str(out_path))
