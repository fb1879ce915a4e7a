"""Trace each component of a checkpoint to ONNX with the names and dynamic axes of its spec.

We use torch's TorchScript-based exporter (`dynamo=False`): on these models it is about ten times faster than the
dynamo exporter with identical numerics, and tracing at an odd latent size keeps diffusers' `upsample_size` path in
the graph, so one U-Net graph serves every image size that is a multiple of the VAE scale factor.
"""
from __future__ import annotations

import dataclasses
import logging
import warnings
from pathlib import Path

import numpy as np
import torch

from sdrt.engine.specs import SPECS, Component, ComponentSpec, TensorSpec
from sdrt.export.source_checkpoint import SourceCheckpoint
from sdrt.export.errors import ExportError

logger = logging.getLogger(__name__)

OPSET = 17
# Odd latent sizes: the U-Net then interpolates to its skip connections' sizes, which traces as dynamic shape ops.
_TRACE_LATENT_HW = (9, 11)
# A second shape (other batch, sizes divisible by every downsampling) to validate the dynamic axes after export.
_CHECK_LATENT_HW = (8, 16)
# Text-encoder windows in the U-Net's text context: traced at one (a plain prompt), validated at two (a long prompt).
_TRACE_CONTEXT_WINDOWS = 1
_CHECK_CONTEXT_WINDOWS = 2


class _TextEncoder(torch.nn.Module):
    """The last hidden state; SDXL's first encoder adds the penultimate layer's."""

    def __init__(self, model: torch.nn.Module, penultimate: bool) -> None:
        super().__init__()
        self.model = model
        self.penultimate = penultimate

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        output = self.model(input_ids, output_hidden_states=self.penultimate, return_dict=True)
        if self.penultimate:
            return output.last_hidden_state, output.hidden_states[-2]
        return output.last_hidden_state


class _TextEncoder2(torch.nn.Module):
    """SDXL's second encoder: the penultimate layer's hidden states and the projected pooled embedding."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        output = self.model(input_ids, output_hidden_states=True, return_dict=True)
        return output.hidden_states[-2], output.text_embeds


class _UNet(torch.nn.Module):
    """The U-Net, its optional inputs (`optional_input_names`, after the three every U-Net takes) passed by name;
    SDXL's added conditions (`text_embeds`, `time_ids`) as diffusers takes them, in `added_cond_kwargs`."""

    def __init__(self, model: torch.nn.Module, optional_input_names: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.model = model
        self.optional_input_names = optional_input_names

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                *optional_inputs: torch.Tensor) -> torch.Tensor:
        named = dict(zip(self.optional_input_names, optional_inputs))
        added = {name: named.pop(name) for name in ("text_embeds", "time_ids") if name in named}
        return self.model(sample, timestep, encoder_hidden_states, **named, added_cond_kwargs=added or None,
                          return_dict=False)[0]


class _VaeDecoder(torch.nn.Module):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, latent_sample: torch.Tensor) -> torch.Tensor:
        return self.model.decode(latent_sample, return_dict=False)[0]


class _VaeEncoder(torch.nn.Module):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, sample: torch.Tensor) -> torch.Tensor:
        return self.model.encode(sample).latent_dist.parameters


class _SafetyChecker(torch.nn.Module):
    """The checker's CLIP vision tower and projection; its concept arrays are exported as data, not graph."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, clip_input: torch.Tensor) -> torch.Tensor:
        pooled = self.model.vision_model(clip_input)[1]  # (B, hidden)
        return self.model.visual_projection(pooled)  # (B, projection)


#: the wrapper of each component whose wrapper takes no options
_WRAPPERS = {
    Component.TEXT_ENCODER_2: _TextEncoder2,
    Component.VAE_DECODER: _VaeDecoder,
    Component.TINY_VAE_DECODER: _VaeDecoder,  # AutoencoderTiny.decode takes and returns the same
    Component.VAE_ENCODER: _VaeEncoder,
    Component.SAFETY_CHECKER: _SafetyChecker,
}


#: whether a checkpoint's model takes an optional input, or gives an optional output, of its component's spec, by name
_HAS_OPTIONAL_TENSOR = {
    "timestep_cond": lambda checkpoint: checkpoint.unet_time_cond_proj_dim is not None,
    "text_embeds": lambda checkpoint: checkpoint.is_sdxl,
    "time_ids": lambda checkpoint: checkpoint.is_sdxl,
    "penultimate_hidden_state": lambda checkpoint: checkpoint.is_sdxl,
}


def exported_inputs(checkpoint: SourceCheckpoint, component: Component) -> tuple[TensorSpec, ...]:
    """The inputs `component`'s graph takes for this checkpoint: its spec's inputs, then the optional ones the
    checkpoint's config calls for."""
    spec = SPECS[component]
    return spec.inputs + tuple(t for t in spec.optional_inputs if _HAS_OPTIONAL_TENSOR[t.name](checkpoint))


def graph_spec(checkpoint: SourceCheckpoint, component: Component) -> ComponentSpec:
    """The tensors of `component`'s graph for this checkpoint: its spec with the optional inputs and outputs the
    checkpoint's config calls for (SDXL's, an LCM U-Net's), none left optional."""
    spec = SPECS[component]
    outputs = spec.outputs + tuple(t for t in spec.optional_outputs if _HAS_OPTIONAL_TENSOR[t.name](checkpoint))
    return dataclasses.replace(spec, inputs=exported_inputs(checkpoint, component), outputs=outputs,
                               optional_inputs=(), optional_outputs=())


def traceable_model(checkpoint: SourceCheckpoint, component: Component) -> torch.nn.Module:
    """Load `component`'s torch model, wrapped to take and return exactly its graph's tensors (`graph_spec`)."""
    model = checkpoint.load_model(component)
    if component is Component.UNET:
        optional = exported_inputs(checkpoint, component)[len(SPECS[component].inputs):]
        return _UNet(model, tuple(t.name for t in optional)).eval()
    if component is Component.TEXT_ENCODER:
        return _TextEncoder(model, penultimate=checkpoint.is_sdxl).eval()
    return _WRAPPERS[component](model).eval()


def probe_inputs(
    checkpoint: SourceCheckpoint, component: Component, batch: int, latent_hw: tuple[int, int], context_windows: int, seed: int = 0
) -> dict[str, np.ndarray]:
    """Random inputs of the component's spec at the given batch and latent size; the U-Net's text context is
    `context_windows` text-encoder windows long."""
    rng = np.random.default_rng(seed)
    latent_h, latent_w = latent_hw
    latent_shape = (batch, checkpoint.latent_channels, latent_h, latent_w)
    if component in (Component.TEXT_ENCODER, Component.TEXT_ENCODER_2):
        config = checkpoint.text_encoder_config if component is Component.TEXT_ENCODER else checkpoint.text_encoder_2_config
        vocab = int(config["vocab_size"])
        return {"input_ids": rng.integers(0, vocab, size=(batch, checkpoint.text_max_length), dtype=np.int32)}  # (B, 77)
    if component is Component.UNET:
        unet_shape = (batch, checkpoint.unet_in_channels, latent_h, latent_w)
        inputs = {
            "sample": rng.standard_normal(unet_shape, dtype=np.float32),  # (B, C or 2C + 1 for inpainting, h, w)
            "timestep": rng.integers(0, 1000, size=(batch,)).astype(np.float32),  # (B,)
            "encoder_hidden_states": rng.standard_normal(
                (batch, context_windows * checkpoint.text_max_length, checkpoint.text_hidden_size), dtype=np.float32
            ),  # (B, windows * 77, D)
        }
        if checkpoint.unet_time_cond_proj_dim is not None:
            # a guidance-scale embedding's sines and cosines lie in [-1, 1]
            inputs["timestep_cond"] = rng.uniform(-1.0, 1.0, size=(batch, checkpoint.unet_time_cond_proj_dim)).astype(np.float32)
        if checkpoint.is_sdxl:
            inputs["text_embeds"] = rng.standard_normal((batch, checkpoint.pooled_size), dtype=np.float32)  # (B, P)
            # sizes in pixels and crop offsets, as SDXL's requests give them
            inputs["time_ids"] = rng.integers(0, 2048, size=(batch, checkpoint.time_ids)).astype(np.float32)  # (B, 6)
        return inputs
    if component in (Component.VAE_DECODER, Component.TINY_VAE_DECODER):
        return {"latent_sample": rng.standard_normal(latent_shape, dtype=np.float32)}  # (B, C, h, w)
    if component is Component.VAE_ENCODER:
        image_hw = (latent_h * checkpoint.vae_scale_factor, latent_w * checkpoint.vae_scale_factor)
        return {"sample": rng.uniform(-1.0, 1.0, size=(batch, 3, *image_hw)).astype(np.float32)}  # (B, 3, H, W)
    size = int(checkpoint.safety_checker_config["vision_config"].get("image_size", 224))
    return {"clip_input": rng.standard_normal((batch, 3, size, size), dtype=np.float32)}  # (B, 3, 224, 224)


def validation_inputs(checkpoint: SourceCheckpoint, component: Component) -> dict[str, np.ndarray]:
    return probe_inputs(checkpoint, component, batch=1, latent_hw=_CHECK_LATENT_HW, context_windows=_CHECK_CONTEXT_WINDOWS, seed=1)


def run_torch(model: torch.nn.Module, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
    """The wrapped model's outputs, in spec order: the reference the exported graph is validated against."""
    with torch.inference_mode():
        outputs = model(*(torch.from_numpy(v) for v in inputs.values()))
    return [t.numpy() for t in (outputs if isinstance(outputs, tuple) else (outputs,))]


def trace_inputs(checkpoint: SourceCheckpoint, component: Component) -> dict[str, np.ndarray]:
    """The inputs components are traced at: a guided batch of two, odd latent sizes, one text-encoder window."""
    return probe_inputs(checkpoint, component, batch=2, latent_hw=_TRACE_LATENT_HW, context_windows=_TRACE_CONTEXT_WINDOWS)


def export_component(checkpoint: SourceCheckpoint, component: Component, model: torch.nn.Module, onnx_path: Path,
                     opset: int = OPSET, inputs: dict[str, np.ndarray] | None = None) -> ComponentSpec:
    """Trace the wrapped `model` of `component` to `onnx_path` at `inputs` (default: `trace_inputs`); returns the
    spec of the traced graph (its inputs and outputs those the checkpoint calls for)."""
    spec = graph_spec(checkpoint, component)
    inputs = trace_inputs(checkpoint, component) if inputs is None else inputs
    onnx_path.parent.mkdir(parents=True, exist_ok=True)
    logger.info("exporting %s to ONNX (opset %d)", component.value, opset)
    with warnings.catch_warnings(), torch.inference_mode():
        # The tracer warns about every Python-level shape check in diffusers/transformers; the export is validated
        # numerically at another shape afterwards, which is the check that matters.
        warnings.simplefilter("ignore")
        try:
            _trace(model, inputs, onnx_path, spec, opset)
        except Exception as exc:  # torch raises many unrelated types from deep inside tracing
            raise ExportError(f"tracing {component.value} to ONNX failed: {type(exc).__name__}: {exc}") from exc
    return spec


def _trace(model: torch.nn.Module, inputs: dict[str, np.ndarray], onnx_path: Path, spec: ComponentSpec, opset: int) -> None:
    torch.onnx.export(
        model,
        tuple(torch.from_numpy(v) for v in inputs.values()),
        str(onnx_path),
        input_names=[t.name for t in spec.inputs],
        output_names=[t.name for t in spec.outputs],
        dynamic_axes={t.name: t.dynamic_axes for t in (*spec.inputs, *spec.outputs) if t.dynamic_axes},
        opset_version=opset,
        do_constant_folding=True,
        dynamo=False,
    )
