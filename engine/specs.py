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
    TEXT_ENCODER_2 = "text_encoder_2"  # SDXL's second text encoder (OpenCLIP bigG, with a projection)
    UNET = "unet"
    VAE_DECODER = "vae_decoder"
    VAE_ENCODER = "vae_encoder"
    SAFETY_CHECKER = "safety_checker"
    #: the tiny autoencoder's decoder (diffusers' AutoencoderTiny, TAESD), exported beside the VAE on request
    TINY_VAE_DECODER = "tiny_vae_decoder"

    #: DeepCache's passes (sdrt.engine.deepcache), in bundles exported with `sdrt export --deepcache-branch N` only:
    #: the U-Net's graph with the cached feature as a second output, reading the U-Net's own weights file
    UNET_DEEPCACHE_FULL = "unet_deepcache_full"
    #: the U-Net's shallow blocks only, taking the cached feature in place of the deep ones
    UNET_DEEPCACHE_SHALLOW = "unet_deepcache_shallow"


class Decoder(str, enum.Enum):
    """The latent decoders a request chooses from (`decoder=`): the checkpoint's VAE, or the tiny autoencoder
    exported beside it (`sdrt export CHECKPOINT OUT --tiny-vae DIR`): previews during the loop, the fastest images."""

    FULL = "full"
    TINY = "tiny"

    @property
    def component(self) -> Component:
        return Component.VAE_DECODER if self is Decoder.FULL else Component.TINY_VAE_DECODER


#: the components only some bundles have, exported on request
OPTIONAL_COMPONENTS = frozenset({Component.TINY_VAE_DECODER, Component.UNET_DEEPCACHE_FULL, Component.UNET_DEEPCACHE_SHALLOW})
#: the components that run (part of) the U-Net once per denoising step, which backends treat alike
UNET_PASSES = (Component.UNET, Component.UNET_DEEPCACHE_FULL, Component.UNET_DEEPCACHE_SHALLOW)
#: the U-Net passes a request with DeepCache runs instead of the U-Net
DEEPCACHE_PASSES = frozenset({Component.UNET_DEEPCACHE_FULL, Component.UNET_DEEPCACHE_SHALLOW})


DYNAMIC_AXES = frozenset({
    "batch", "latent_height", "latent_width", "height", "width", "context_length", "feature_height", "feature_width",
})


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
    """A component's tensors. The optional ones are in a graph only where its checkpoint's config calls for them
    (SDXL's U-Net takes `text_embeds` and `time_ids`): the manifest records the tensors each exported graph has, and
    the runtime feeds an optional input only where the bundle's graph has it."""

    component: Component
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    #: inputs only some checkpoints' models take (the exporter adds those the checkpoint's config calls for, after
    #: `inputs`); the manifest records the inputs a bundle's model has, and the runtime feeds those
    optional_inputs: tuple[TensorSpec, ...] = ()
    #: outputs only some checkpoints' models give (SDXL's text encoder's penultimate layer), after `outputs`
    optional_outputs: tuple[TensorSpec, ...] = ()
    #: the .onnx file in the bundle where it is not `<component>/model.onnx`
    file: str | None = None

    @property
    def filename(self) -> str:
        return self.file or f"{self.component.value}/model.onnx"

    @property
    def fp16_filename(self) -> str:
        """The fp16 variant's file (`sdrt export --fp16-onnx`). In a subdirectory: a component's digest covers the
        files directly in its directory only, so adding a variant leaves the caches keyed on the fp32 model valid."""
        return f"{self.component.value}/fp16/model.onnx"


#: the components `sdrt export --fp16-onnx` converts unless told otherwise: SD 1.x's and SDXL's VAEs overflow
#: fp16's range (their decoders' activations pass 65504: diffusers' `force_upcast`), and the safety checker runs once per request, so both stay fp32
FP16_DEFAULT_COMPONENTS = (Component.TEXT_ENCODER, Component.UNET)

_LATENT = ("batch", "latent_channels", "latent_height", "latent_width")
_IMAGE = ("batch", "rgb", "height", "width")
_UNET_INPUTS = (
    # An inpainting U-Net's sample has 2 * latent_channels + 1 channels (latents, mask, masked-image latents):
    # fixed axes are recorded in the manifest as the exported graph declares them, and model.unet_in_channels.
    TensorSpec("sample", "float32", _LATENT),
    # One timestep per sample, so a batch may mix denoising steps (request batching in serving).
    TensorSpec("timestep", "float32", ("batch",)),
    # Text-encoder windows concatenated: one for a plain prompt, several for a long prompt.
    TensorSpec("encoder_hidden_states", "float32", ("batch", "context_length", "hidden")),
)
#: inputs only some checkpoints' U-Nets take
_UNET_OPTIONAL_INPUTS = (
    # An LCM-distilled U-Net's guidance-scale embedding (its config's time_cond_proj_dim): guidance is an input,
    # not a second batch half (sdrt.engine.guidance_embedding).
    TensorSpec("timestep_cond", "float32", ("batch", "time_cond_proj_dim")),
    # SDXL's added conditions (its config's addition_embed_type "text_time"): the second text encoder's pooled
    # embedding, and the size conditions (original size, crop's top left, target size).
    TensorSpec("text_embeds", "float32", ("batch", "pooled")),
    TensorSpec("time_ids", "float32", ("batch", "time_ids")),
)
_NOISE_PRED = TensorSpec("noise_pred", "float32", _LATENT)
#: DeepCache's cached feature: the hidden state entering the cache branch's up-block layer, at that level's size
_DEEP_FEATURE = TensorSpec("deep_feature", "float32", ("batch", "feature_channels", "feature_height", "feature_width"))

SPECS: dict[Component, ComponentSpec] = {
    Component.TEXT_ENCODER: ComponentSpec(
        Component.TEXT_ENCODER,
        inputs=(TensorSpec("input_ids", "int32", ("batch", "sequence")),),
        outputs=(TensorSpec("last_hidden_state", "float32", ("batch", "sequence", "hidden")),),
        # SDXL conditions its U-Net on the penultimate layer's hidden states
        optional_outputs=(TensorSpec("penultimate_hidden_state", "float32", ("batch", "sequence", "hidden")),),
    ),
    Component.TEXT_ENCODER_2: ComponentSpec(
        Component.TEXT_ENCODER_2,
        inputs=(TensorSpec("input_ids", "int32", ("batch", "sequence")),),
        outputs=(
            TensorSpec("penultimate_hidden_state", "float32", ("batch", "sequence", "hidden")),
            # the final layer's pooled (end-of-text) state, projected: the U-Net's `text_embeds`
            TensorSpec("text_embeds", "float32", ("batch", "projection")),
        ),
    ),
    Component.UNET: ComponentSpec(Component.UNET, inputs=_UNET_INPUTS, outputs=(_NOISE_PRED,),
                                  optional_inputs=_UNET_OPTIONAL_INPUTS),
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
    # Its graph is the U-Net's with one more output: it reads the U-Net's weights file, so it costs no disk space
    Component.UNET_DEEPCACHE_FULL: ComponentSpec(
        Component.UNET_DEEPCACHE_FULL, inputs=_UNET_INPUTS, outputs=(_NOISE_PRED, _DEEP_FEATURE), file="unet/deepcache_full.onnx",
    ),
    Component.UNET_DEEPCACHE_SHALLOW: ComponentSpec(
        Component.UNET_DEEPCACHE_SHALLOW, inputs=(*_UNET_INPUTS, _DEEP_FEATURE), outputs=(_NOISE_PRED,),
    ),
}
