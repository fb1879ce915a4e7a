"""Which requests TensorRT engines are built for (an EngineProfile: images per request x height x width, each as
min/opt/max), and the shapes of every input of every component's engine that follow from it.

Shapes come from the bundle manifest (fixed sizes as ints, dynamic axes by the names in sdrt.engine.specs) and its
model constants (the VAE scale factor, the default image size): nothing here knows SD 1.5's sizes.
"""
from __future__ import annotations

import dataclasses
import enum
from typing import Any

from sdrt.engine.checks import is_int
from sdrt.engine.errors import BundleError, InvalidArgumentError
from sdrt.engine.guidance_batch import batch_size
from sdrt.engine.manifest import ComponentEntry, ModelConfig
from sdrt.engine.specs import Component

#: images per request of the default profile: tuned for one, up to four where the card's memory holds them
DEFAULT_BATCH = (1, 1, 4)
#: a TensorRT fp16 U-Net's activation memory per batch row and latent pixel, SD 1.x's channels with fused attention:
#: an estimate from its feature maps, not yet measured on a GPU (docs/gpus.md)
UNET_ACTIVATION_BYTES_PER_LATENT_PIXEL = 96 * 1024
#: the share of the card's memory the U-Net's activations may take at the profile's largest request; the rest holds
#: every engine's weights, the VAE's activations, the CUDA context and other processes
UNET_ACTIVATION_MEMORY_SHARE = 0.5
#: the default profile's sides span the model's default image side halved to doubled (SD 1.5: 256, opt 512, 1024)
DEFAULT_SIZE_SPAN = 2
PROFILE_AXES = ("batch", "height", "width")


class Precision(str, enum.Enum):
    """What TensorRT may compute in. FP16 and BF16 let it pick reduced-precision kernels wherever they are faster;
    FP32 also turns TF32 off, so that results compare with the CPU's fp32 backends."""

    FP16 = "fp16"
    BF16 = "bf16"
    FP32 = "fp32"


@dataclasses.dataclass(frozen=True)
class AxisRange:
    """The smallest, the tuned-for (opt) and the largest size of one axis."""

    min: int
    opt: int
    max: int

    @classmethod
    def fixed(cls, size: int) -> AxisRange:
        return cls(size, size, size)

    @classmethod
    def parse(cls, text: str) -> AxisRange:
        """The command line's syntax: "MIN:OPT:MAX", or "N" for a fixed size; raise ValueError otherwise."""
        sizes = [int(part) for part in text.split(":")]
        if len(sizes) == 1:
            return cls.fixed(sizes[0])
        if len(sizes) != 3:
            raise ValueError(f"expected N or MIN:OPT:MAX, got {text!r}")
        return cls(*sizes)

    def contains(self, size: int) -> bool:
        return self.min <= size <= self.max

    def covering(self, size: int) -> AxisRange:
        """This range widened just enough to hold `size`."""
        return AxisRange(min(self.min, size), self.opt, max(self.max, size))

    def describe(self) -> str:
        return str(self.min) if self.min == self.max else f"{self.min}-{self.max} (opt {self.opt})"

    def __str__(self) -> str:
        return f"{self.min}:{self.opt}:{self.max}"


@dataclasses.dataclass(frozen=True)
class EngineProfile:
    """The requests engines accept: `batch` images per request (prompts x num_images_per_prompt), images of
    `height` x `width` pixels. TensorRT tunes its kernels for the opt sizes and runs anything in between."""

    batch: AxisRange
    height: AxisRange
    width: AxisRange

    def __post_init__(self) -> None:
        for name in PROFILE_AXES:
            axis = getattr(self, name)
            if not all(is_int(size) for size in (axis.min, axis.opt, axis.max)) or not 1 <= axis.min <= axis.opt <= axis.max:
                raise InvalidArgumentError(name, f"must be integers with 1 <= min <= opt <= max, got min {axis.min}, opt {axis.opt}, max {axis.max}")

    @classmethod
    def static(cls, batch: int, height: int, width: int) -> EngineProfile:
        """One size only: TensorRT specialises every kernel for it (the U-Net's batch still spans guided and not)."""
        return cls(AxisRange.fixed(batch), AxisRange.fixed(height), AxisRange.fixed(width))

    def validate_for(self, model: ModelConfig) -> None:
        """Raise InvalidArgumentError unless every height and width is a size the model's pipeline accepts."""
        sides = model.image_sides
        for name in ("height", "width"):
            axis = getattr(self, name)
            if not all(sides.contains(size) for size in (axis.min, axis.opt, axis.max)):
                raise InvalidArgumentError(name, f"min, opt and max must each be {sides.describe()}, got {axis}")

    def covering(self, batch: int, height: int, width: int) -> EngineProfile:
        """This profile widened just enough to hold a request of `batch` images of `height` x `width`."""
        return EngineProfile(self.batch.covering(batch), self.height.covering(height), self.width.covering(width))

    def describe(self) -> str:
        return ", ".join(f"{name} {getattr(self, name).describe()}" for name in PROFILE_AXES)

    def to_json(self) -> dict[str, list[int]]:
        return {name: [getattr(self, name).min, getattr(self, name).opt, getattr(self, name).max] for name in PROFILE_AXES}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> EngineProfile:
        return cls(**{name: AxisRange(*data[name]) for name in PROFILE_AXES})


@dataclasses.dataclass(frozen=True)
class ShapeRange:
    """One input tensor's min, opt and max shapes: an entry of a TensorRT optimization profile."""

    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]

    def to_json(self) -> dict[str, list[int]]:
        return {"min": list(self.min), "opt": list(self.opt), "max": list(self.max)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ShapeRange:
        return cls(tuple(data["min"]), tuple(data["opt"]), tuple(data["max"]))


def default_profile(model: ModelConfig, device_memory_bytes: int | None = None) -> EngineProfile:
    """Sides from half to twice the model's default image side (opt: the default); batch 1 (opt 1) to 4, or to the
    most images whose guided U-Net batch at the largest side fits UNET_ACTIVATION_MEMORY_SHARE of
    `device_memory_bytes` (the card's memory; None: not capped), at least 1."""
    side, factor, sides = model.default_image_size, model.vae_scale_factor, model.image_sides
    low = max(sides.minimum, side // DEFAULT_SIZE_SPAN // factor * factor)
    high = min(sides.maximum, side * DEFAULT_SIZE_SPAN)
    size = AxisRange(low, side, high)
    most = DEFAULT_BATCH[2]
    if device_memory_bytes is not None:
        budget = device_memory_bytes * UNET_ACTIVATION_MEMORY_SHARE
        fitting = [n for n in range(1, most + 1) if unet_activation_bytes(batch_size(n, guided=True), high, high, factor) <= budget]
        most = max(fitting, default=1)
    return EngineProfile(AxisRange(DEFAULT_BATCH[0], DEFAULT_BATCH[1], max(DEFAULT_BATCH[1], most)), size, size)


def unet_activation_bytes(rows: int, height: int, width: int, vae_scale_factor: int) -> int:
    """The estimated activation memory of a U-Net engine running `rows` batch rows of height x width images."""
    return rows * (height // vae_scale_factor) * (width // vae_scale_factor) * UNET_ACTIVATION_BYTES_PER_LATENT_PIXEL


def component_batch(component: Component, images: AxisRange) -> AxisRange:
    """The batch `component`'s engine sees when requests make `images` images (as the pipeline calls it)."""
    if component is Component.UNET:
        # guided (guidance_scale > 1, the default) doubles the batch; unguided runs the images alone
        return AxisRange(batch_size(images.min, guided=False), batch_size(images.opt, guided=True), batch_size(images.max, guided=True))
    if component in (Component.TEXT_ENCODER, Component.TEXT_ENCODER_2):
        # one row per prompt (at most one per image), and the empty prompt of guidance on its own
        return AxisRange(1, images.opt, images.max)
    return images


def axis_ranges(component: Component, model: ModelConfig, profile: EngineProfile, text_length: int) -> dict[str, AxisRange]:
    """The range of every dynamic axis (sdrt.engine.specs.DYNAMIC_AXES) of `component`'s tensors. `text_length` is
    the text encoder's window (the tokenizer's model_max_length): the U-Net's text context is fixed at one window, as
    profiles have no axis for long prompts (the TensorRT backend refuses them, naming the limit)."""
    factor = model.vae_scale_factor

    def latent(axis: AxisRange) -> AxisRange:
        return AxisRange(axis.min // factor, axis.opt // factor, axis.max // factor)

    return {
        "batch": component_batch(component, profile.batch),
        "height": profile.height,
        "width": profile.width,
        "latent_height": latent(profile.height),
        "latent_width": latent(profile.width),
        "context_length": AxisRange.fixed(text_length),
        # DeepCache's feature, at most the latents' size (its passes are not built as engines: OPTIONAL_COMPONENTS)
        "feature_height": latent(profile.height),
        "feature_width": latent(profile.width),
    }


def component_shapes(
    component: Component, entry: ComponentEntry, model: ModelConfig, profile: EngineProfile, text_length: int
) -> dict[str, ShapeRange]:
    """Input name -> its min/opt/max shapes, from the manifest's declared shapes, `profile` and the text encoder's
    window `text_length` (the manifest's tokenizer model_max_length)."""
    axes = axis_ranges(component, model, profile, text_length)
    shapes = {}
    for tensor in entry.inputs:
        dims = []
        for dim in tensor.shape:
            if isinstance(dim, int):
                dims.append(AxisRange.fixed(dim))
            elif dim in axes:
                dims.append(axes[dim])
            else:
                raise BundleError(
                    f"{component.value} input {tensor.name} has a dynamic axis {dim!r} that TensorRT engines cannot size: "
                    "re-export the bundle with this version of sdrt"
                )
        shapes[tensor.name] = ShapeRange(tuple(d.min for d in dims), tuple(d.opt for d in dims), tuple(d.max for d in dims))
    return shapes
