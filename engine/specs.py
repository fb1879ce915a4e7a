"""One spec per exported component: tensor names, dtypes and axes, shared by the exporter and the runtime.

Axis names in DYNAMIC_AXES may change per request (they are dynamic in the ONNX graphs); every other axis is fixed
by the checkpoint (the text encoder's sequence length, hidden size, channels) and its size is recorded in the bundle's
manifest. The U-Net's text context ("context_length") is dynamic: long prompts give it several text-encoder windows
(sdrt.engine.prompts); bundles exported before it was record it as a fixed size.
"""
from __future__ import annotations

import dataclasses
import enum


class Component(str, enum.Enum):
    """The models a bundle holds, in the order the pipeline uses them."""

    TEXT_ENCODER = "text_encoder"
    UNET = "unet"
    VAE_DECODER = "vae_decoder"
    VAE_ENCODER = "vae_encoder"
    SAFETY_CHECKER = "safety_checker"
    #: the tiny autoencoder's decoder (diffusers' AutoencoderTiny, TAESD), exported beside the VAE on request
    TINY_VAE_DECODER = "tiny_vae_decoder"


class Decoder(str, enum.Enum):
    """The latent decoders a request chooses from (`decoder=`): the checkpoint's VAE, or the tiny autoencoder
    exported beside it (`sdrt export CHECKPOINT OUT --tiny-vae DIR`): previews during the loop, the fastest images."""

    FULL = "full"
    TINY = "tiny"

    @property
    def component(self) -> Component:
        return Component.VAE_DECODER if self is Decoder.FULL else Component.TINY_VAE_DECODER


DYNAMIC_AXES = frozenset({"batch", "latent_height", "latent_width", "height", "width", "context_length"})


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name
    axes: tuple[str, ...]

    @property
    def dynamic_axes(self) -> dict[int, str]:
        """Axis index -> symbolic name for the axes that vary per request."""
        return {i: axis for i, axis in enumerate(self.axes) if axis in DYNAMIC_AXES}


@dataclasses.dataclass(frozen=True)
class ComponentSpec:
    component: Component
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    #: inputs only some checkpoints' models take (the exporter adds those the checkpoint's config calls for, after
    #: `inputs`); the manifest records the inputs a bundle's model has, and the runtime feeds those
    optional_inputs: tuple[TensorSpec, ...] = ()

    @property
    def filename(self) -> str:
        return f"{self.component.value}/model.onnx"

    @property
    def fp16_filename(self) -> str:
        """The fp16 variant's file (`sdrt export --fp16-onnx`). In a subdirectory: a component's digest covers the
        files directly in its directory only, so adding a variant leaves the caches keyed on the fp32 model valid."""
        return f"{self.component.value}/fp16/model.onnx"


#: the components `sdrt export --fp16-onnx` converts unless told otherwise: SD 1.x's VAE overflows fp16's range
#: (its decoder's activations pass 65504), and the safety checker runs once per request, so both stay fp32
FP16_DEFAULT_COMPONENTS = (Component.TEXT_ENCODER, Component.UNET)

_LATENT = ("batch", "latent_channels", "latent_height", "latent_width")
_IMAGE = ("batch", "rgb", "height", "width")

SPECS: dict[Component, ComponentSpec] = {
    Component.TEXT_ENCODER: ComponentSpec(
        Component.TEXT_ENCODER,
        inputs=(TensorSpec("input_ids", "int32", ("batch", "sequence")),),
        outputs=(TensorSpec("last_hidden_state", "float32", ("batch", "sequence", "hidden")),),
    ),
    Component.UNET: ComponentSpec(
        Component.UNET,
        inputs=(
            # An inpainting U-Net's sample has 2 * latent_channels + 1 channels (latents, mask, masked-image latents):
            # fixed axes are recorded in the manifest as the exported graph declares them, and model.unet_in_channels.
            TensorSpec("sample", "float32", _LATENT),
            # One timestep per sample, so a batch may mix denoising steps (request batching in serving).
            TensorSpec("timestep", "float32", ("batch",)),
            # Text-encoder windows concatenated: one for a plain prompt, several for a long prompt.
            TensorSpec("encoder_hidden_states", "float32", ("batch", "context_length", "hidden")),
        ),
        outputs=(TensorSpec("noise_pred", "float32", _LATENT),),
        optional_inputs=(
            # An LCM-distilled U-Net's guidance-scale embedding (its config's time_cond_proj_dim): guidance is an input,
            # not a second batch half (sdrt.engine.guidance_embedding).
            TensorSpec("timestep_cond", "float32", ("batch", "time_cond_proj_dim")),
        ),
    ),
    Component.VAE_DECODER: ComponentSpec(
        Component.VAE_DECODER,
        inputs=(TensorSpec("latent_sample", "float32", _LATENT),),
        outputs=(TensorSpec("sample", "float32", _IMAGE),),
    ),
    Component.VAE_ENCODER: ComponentSpec(
        Component.VAE_ENCODER,
        inputs=(TensorSpec("sample", "float32", _IMAGE),),
        # Mean and log-variance of the latent distribution, concatenated on channels: the runtime samples from it
        # with the request's own seed.
        outputs=(TensorSpec("latent_moments", "float32", ("batch", "latent_moments", "latent_height", "latent_width")),),
    ),
    Component.TINY_VAE_DECODER: ComponentSpec(
        Component.TINY_VAE_DECODER,
        # the denoised latents divided by the tiny autoencoder's own scaling factor (1 for TAESD), as diffusers
        # decodes with `pipe.vae = AutoencoderTiny`; images in [-1, 1] like the VAE's
        inputs=(TensorSpec("latent_sample", "float32", _LATENT),),
        outputs=(TensorSpec("sample", "float32", _IMAGE),),
    ),
    Component.SAFETY_CHECKER: ComponentSpec(
        Component.SAFETY_CHECKER,
        # CLIP-preprocessed images (crop size fixed by the feature extractor); the concept scoring runs in numpy.
        inputs=(TensorSpec("clip_input", "float32", ("batch", "rgb", "clip_height", "clip_width")),),
        outputs=(TensorSpec("image_embeds", "float32", ("batch", "projection")),),
    ),
}
