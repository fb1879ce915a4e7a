"""How much memory a request needs: a model of a process's peak resident set, from the bundle and the backend.

    peak = resident + request + compile + max(U-Net stage, decode stage)

`resident` is the process at rest with the pipeline loaded: the interpreter and libraries (measured: the process's
RSS once the pipeline is opened, before any of its models ran), the backend's runtime (`MemoryProfile.runtime_bytes`) and the weights (the bundle's file sizes
× `MemoryProfile.weights_per_file_byte`). The stages run one after the other and each gives its working memory back
before the next (the backends see to it), so the peak is the larger one's, plus what any request holds
(`MemoryProfile.request_bytes`) and, where the backend compiles its models for a request's shapes, what compiling
holds (in proportion to the largest component's weights):

    U-Net stage   B × (a × 4·max_l(heads_l × tokens_l²) + u × 4·tokens_0 × channels_0)
    decode stage  d × (4·H·W × (v × decoder channels at full size + p) + a × 4·(h·w)²) + images × H·W × output bytes

B is the U-Net's batch (the images, twice under classifier-free guidance), tokens_l the latent pixels at the U-Net's
resolution level l, d the images the VAE decodes at once (one, unless the backend decodes batches). The first term
of each is self-attention's scores, one (tokens × tokens) matrix per head: the largest term at large sizes, growing
with the fourth power of the side (SD 1.5 at 1024x1024: 8 heads × 16384² × 4 bytes = 8.6 GB per U-Net sample), and
absent where the backend fuses attention (a = 0). The others are feature maps: the U-Net's at the latent size, the
VAE decoder's at the image's. a, u, v and p are the backend's `MemoryProfile`, calibrated against measured peaks.

Architecture sizes come from the bundle's manifest (recorded at export); bundles exported before they were recorded
get SD 1.x's, the largest this runtime serves at a given latent size.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import posixpath
from collections.abc import Collection
from typing import TYPE_CHECKING

from sdrt.engine.backends.base import Backend, MemoryPolicy, MemoryProfile
from sdrt.engine.guidance_batch import batch_size
from sdrt.engine.manifest import Manifest
from sdrt.engine.specs import Component

if TYPE_CHECKING:
    from sdrt.engine.pipeline import StableDiffusionPipeline

logger = logging.getLogger(__name__)

_FP32 = 4
#: bytes per output pixel: the decoded fp32 RGB images three times (the decoder's output, their concatenation, the
#: [0, 1] copy) and twice as 8-bit RGB (the array and the PIL image)
OUTPUT_BYTES_PER_PIXEL = 3 * 3 * _FP32 + 2 * 3
#: SD 1.x's sizes, for bundles exported before the manifest recorded them
SD1_UNET_CHANNELS = (320, 640, 1280, 1280)
SD1_UNET_ATTENTION_HEADS = (8, 8, 8, 8)
SD1_VAE_CHANNELS = (128, 256, 512, 512)
#: the components a text-to-image request runs (SDXL's second text encoder and the safety checker where the bundle
#: has them)
TEXT_TO_IMAGE = (Component.TEXT_ENCODER, Component.TEXT_ENCODER_2, Component.UNET, Component.VAE_DECODER, Component.SAFETY_CHECKER)


@dataclasses.dataclass(frozen=True)
class Architecture:
    """The sizes a request's working memory grows with. Levels are full size first, each half the previous."""

    vae_scale_factor: int
    unet_channels: tuple[int, ...]
    unet_attention_heads: tuple[int, ...]  # self-attention heads per level, 0 where none
    vae_channels: tuple[int, ...]

    @classmethod
    def of(cls, manifest: Manifest) -> Architecture:
        model = manifest.model
        if None in (model.unet_block_out_channels, model.unet_attention_heads, model.vae_block_out_channels):
            logger.info("bundle exported before its architecture sizes were recorded: the memory estimate assumes "
                        "SD 1.x's (re-export the bundle for its own)")
        vae_levels = int(math.log2(model.vae_scale_factor)) + 1
        return cls(
            vae_scale_factor=model.vae_scale_factor,
            unet_channels=model.unet_block_out_channels or SD1_UNET_CHANNELS,
            unet_attention_heads=model.unet_attention_heads or SD1_UNET_ATTENTION_HEADS,
            vae_channels=model.vae_block_out_channels or SD1_VAE_CHANNELS[:vae_levels],
        )

    @property
    def decoder_full_size_channels(self) -> int:
        """The most channels a decoder activation has at the image's size: the last up block's own, or those its
        input arrives with, upsampled from the level below."""
        return max(self.vae_channels[:2])

    def latent_tokens(self, height: int, width: int, level: int) -> int:
        """Latent pixels at U-Net resolution `level` (each downsampling rounds up, as a stride-2 convolution does)."""
        h, w = height // self.vae_scale_factor, width // self.vae_scale_factor
        return math.ceil(h / 2**level) * math.ceil(w / 2**level)


@dataclasses.dataclass(frozen=True)
class MemoryModel:
    """A loaded pipeline's memory: `resident_bytes` at rest, and what each request adds (`working_bytes`)."""

    architecture: Architecture
    profile: MemoryProfile
    batched_decode: bool
    resident_bytes: int
    compile_bytes: int  # what compiling for a request's shapes holds

    @classmethod
    def for_bundle(cls, manifest: Manifest, backend: type[Backend], base_bytes: int,
                   components: Collection[Component] = TEXT_TO_IMAGE,
                   memory: MemoryPolicy = MemoryPolicy.KEEP_LOADED) -> MemoryModel:
        """The model of a process whose RSS is `base_bytes` before any model ran, running `components` of the bundle with
        `backend` (every component of them loaded with KEEP_LOADED, the largest with ONE_AT_A_TIME). Raise
        ValueError for a backend whose memory is not modelled (`Backend.memory_profile` None)."""
        if backend.memory_profile is None:
            raise ValueError(f"backend {backend.name}'s memory is not modelled (its models live in device memory)")
        profile = backend.memory_profile
        weights = [weight_file_bytes(manifest, c) for c in components if c in manifest.components]
        held = max(weights, default=0) if memory is MemoryPolicy.ONE_AT_A_TIME else sum(weights)
        resident = base_bytes + profile.runtime_bytes + held * profile.weights_per_file_byte
        compiling = max(weights, default=0) * profile.compile_bytes_per_file_byte
        return cls(Architecture.of(manifest), profile, backend.batched_decode, int(resident), int(compiling))

    @classmethod
    def for_pipeline(cls, pipe: StableDiffusionPipeline, base_bytes: int) -> MemoryModel:
        """The model of a loaded pipeline's text-to-image requests (with its safety checker where it has one), in a
        process whose RSS was `base_bytes` before any of its models ran."""
        components = [c for c in TEXT_TO_IMAGE if c is not Component.SAFETY_CHECKER or pipe.safety_checker is not None]
        return cls.for_bundle(pipe.manifest, type(pipe.backend), base_bytes, components, pipe.backend.memory)

    def with_resident(self, resident_bytes: int) -> MemoryModel:
        """The same model with a measured resting RSS in place of the estimated one."""
        return dataclasses.replace(self, resident_bytes=int(resident_bytes))

    def unet_bytes(self, height: int, width: int, images: int, guided: bool) -> int:
        """Working memory of the denoising loop: attention scores at the level where they are largest, and feature maps."""
        arch, profile = self.architecture, self.profile
        batch = batch_size(images, guided)
        scores = max(heads * arch.latent_tokens(height, width, level) ** 2
                     for level, heads in enumerate(arch.unet_attention_heads))  # per sample
        feature_map = arch.latent_tokens(height, width, 0) * arch.unet_channels[0]
        return int(batch * _FP32 * (profile.attention_scores * scores + profile.unet_feature_maps * feature_map))

    def decode_bytes(self, height: int, width: int, images: int) -> int:
        """Working memory of the VAE decode (its full-size activations and mid-block attention, one head at the
        latent size) and of the output images."""
        arch, profile = self.architecture, self.profile
        at_once = images if self.batched_decode else 1
        pixels, latent_pixels = height * width, arch.latent_tokens(height, width, 0)
        per_image = _FP32 * (pixels * (profile.decoder_feature_maps * arch.decoder_full_size_channels + profile.decoder_pixel_values)
                             + profile.attention_scores * latent_pixels**2)
        return int(at_once * per_image + images * pixels * OUTPUT_BYTES_PER_PIXEL)

    def working_bytes(self, height: int, width: int, images: int, guided: bool) -> int:
        """What a request of `images` images of height x width pixels adds to the resting RSS at its peak."""
        stages = max(self.unet_bytes(height, width, images, guided), self.decode_bytes(height, width, images))
        return self.profile.request_bytes + self.compile_bytes + stages

    def peak_bytes(self, height: int, width: int, images: int, guided: bool) -> int:
        """The process's peak RSS while it runs such a request."""
        return self.resident_bytes + self.working_bytes(height, width, images, guided)

    def most_images(self, height: int, width: int, guided: bool, budget_bytes: int, at_most: int) -> int:
        """The most images (up to `at_most`) of this size whose request fits `budget_bytes`; 0 if not even one."""
        return next((n for n in range(at_most, 0, -1) if self.peak_bytes(height, width, n, guided) <= budget_bytes), 0)

    def largest_square(self, images: int, guided: bool, budget_bytes: int, step: int, at_most: int) -> int:
        """The largest side, a multiple of `step` up to `at_most`, of a square whose request of `images` images fits
        `budget_bytes`; 0 if not even `step`."""
        return next((side for side in range(at_most // step * step, 0, -step)
                     if self.peak_bytes(side, side, images, guided) <= budget_bytes), 0)


def weight_file_bytes(manifest: Manifest, component: Component) -> int:
    """The bytes of the bundle's files in `component`'s directory: its ONNX graph and external weights (the fp16
    variants live in a subdirectory, and are not counted)."""
    directory = posixpath.dirname(manifest.components[component].file)
    return sum(entry.bytes for name, entry in manifest.files.items() if posixpath.dirname(name) == directory)
