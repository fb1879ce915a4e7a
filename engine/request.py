"""One generation request, validated once: `GenerationRequest.create` checks every argument against the loaded
model's bounds (`RequestLimits`, from `StableDiffusionPipeline.limits`) and raises InvalidArgumentError naming the
first bad one and its allowed range, before any model runs. The pipeline, the CLI and the server all build one.

Every bound comes from the model: the steps from its scheduler (`min/max_inference_steps` for the checkpoint's
noise schedule), the sides from its trained size (ModelConfig.image_sides), the images from what the memory
estimate (sdrt.engine.memory_estimate) says fits the machine's memory budget, and the backend's own limits (a
TensorRT engine's profile).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, Literal

import numpy as np
from PIL import Image

from sdrt.engine import guidance_batch
from sdrt.engine.checks import is_finite_number, is_int
from sdrt.engine.deepcache import DeepCache, DeepCacheSupport
from sdrt.engine.errors import InvalidArgumentError
from sdrt.engine.image_io import ImageInput, floor_to_multiple, load_image, load_mask, preprocess_image, preprocess_mask
from sdrt.engine.image_to_image import ImageInit, calls_until, denoising_steps, first_call, first_call_at
from sdrt.engine.manifest import GenerationDefaults, SideRange
from sdrt.engine.outpaint import Canvas, feathered_mask, grow, plan_canvas, seam_width
from sdrt.engine.prompts import PromptOptions
from sdrt.engine.schedulers import Scheduler, SchedulerState
from sdrt.engine.sdxl_conditions import AestheticConditions, SizeConditions
from sdrt.engine.specs import Decoder

OutputType = Literal["pil", "np", "latent"]
OUTPUT_TYPES = ("pil", "np", "latent")
# diffusers' strength defaults: StableDiffusionImg2ImgPipeline's, StableDiffusionInpaintPipeline's,
# StableDiffusionXLImg2ImgPipeline's, StableDiffusionXLInpaintPipeline's
IMG2IMG_STRENGTH = 0.8
INPAINT_STRENGTH = 1.0
SDXL_IMG2IMG_STRENGTH = 0.3
SDXL_INPAINT_STRENGTH = 0.9999
#: the arguments outpainting sets itself (from the canvas), which its caller may not give
_SET_BY_OUTPAINTING = ("height", "width", "latents", "image", "mask_image")


@dataclasses.dataclass(frozen=True)
class RequestLimits:
    """What requests are validated against: a loaded model's bounds (`StableDiffusionPipeline.limits`).

    `sampler(name)`: the scheduler `scheduler=name` runs (InvalidArgumentError("scheduler") for an unknown one).
    `check_images(prompts, num_images_per_prompt, height, width, guided)`: raise InvalidArgumentError unless the
    backend and the memory budget can take that many images of that size."""

    vae_scale_factor: int
    latent_channels: int
    default_image_size: int
    image_sides: SideRange
    unet_takes_mask: bool  # an inpainting U-Net: mask and masked-image latents are inputs besides the latents
    sampler: Callable[[str | None], Scheduler]
    check_images: Callable[[int, int, int, int, bool], None]
    #: the steps, guidance and sampler of a call that names none (the bundle's, diffusers' for older bundles)
    defaults: GenerationDefaults = GenerationDefaults()
    #: the size of the guidance-scale embedding an LCM-distilled U-Net takes (sdrt.engine.guidance_embedding); None:
    #: the U-Net takes none, and guidance runs an unconditional batch half
    guidance_embedding_dim: int | None = None
    #: the decoders the bundle holds (the tiny one where exported with --tiny-vae)
    decoders: tuple[Decoder, ...] = (Decoder.FULL,)
    deepcache: DeepCacheSupport = DeepCacheSupport()  # the bundle's DeepCache passes and whether the backend runs them
    bundle: str = "this bundle"  # how errors name the bundle
    sdxl: bool = False  # an SDXL bundle: its U-Net takes size conditions (SizeConditions)
    #: an SDXL refiner (requires_aesthetics_score): its size conditions end with an aesthetic score in place of the
    #: target size (AestheticConditions), and it runs image to image only, as diffusers' StableDiffusionXLImg2ImgPipeline
    aesthetics: bool = False

    def check_decoder(self, decoder: Any) -> Decoder:
        """`decoder` ("full" or "tiny") as a Decoder; InvalidArgumentError("decoder") for another name or one the
        bundle lacks."""
        try:
            chosen = Decoder(decoder)
        except ValueError:
            raise InvalidArgumentError("decoder", f"must be one of {', '.join(d.value for d in Decoder)}; got {decoder!r}") from None
        if chosen not in self.decoders:
            raise InvalidArgumentError("decoder", f"{chosen.value!r}: this bundle has no tiny decoder; export it with one "
                                       "(`sdrt export CHECKPOINT OUT --tiny-vae DIR`, DIR a diffusers AutoencoderTiny such as TAESD)")
        return chosen

    def guides_by_batch(self, guidance_scale: float) -> bool:
        """Whether guidance at `guidance_scale` runs the unconditional batch half (sdrt.engine.guidance_batch): as
        diffusers, only above 1, and never for a U-Net that takes guidance as an input."""
        return guidance_batch.is_guided(guidance_scale) and self.guidance_embedding_dim is None

    def latent_shape(self, num_images: int, height: int, width: int) -> tuple[int, int, int, int]:
        """The shape of the initial noise for `num_images` images of height x width pixels."""
        f = self.vae_scale_factor
        return (num_images, self.latent_channels, height // f, width // f)


@dataclasses.dataclass(frozen=True)
class Outpainting:
    """Where the original image lies on the grown canvas: pasted back over the result unchanged."""

    original: Image.Image
    canvas: Canvas


@dataclasses.dataclass(frozen=True, eq=False)
class GenerationRequest:
    """A validated call: everything the denoising loop needs, nothing left to check. Build it with `create` (or
    `create_outpainting`); its fields hold the arguments as the pipeline runs them (sizes resolved, prompts as
    tuples, the image preprocessed)."""

    prompts: tuple[str, ...]
    negative_prompts: tuple[str, ...] | None
    num_inference_steps: int
    guidance_scale: float
    num_images_per_prompt: int
    height: int
    width: int
    seed: int | None
    latents: np.ndarray | None  # (N, C, H/f, W/f) float32, or None: drawn from `seed`
    output_type: OutputType
    return_safety_scores: bool
    scheduler: str | None  # the name asked for, or the model's default; None: the checkpoint's own
    prompt_options: PromptOptions
    init: ImageInit | None  # image to image and inpainting: the image to start from
    outpainting: Outpainting | None
    decoder: Decoder  # what turns the final latents into images
    deepcache: DeepCache | None  # None: every U-Net call a full pass
    limits: RequestLimits = dataclasses.field(repr=False)  # what it was validated against
    sampler: Scheduler = dataclasses.field(repr=False)  # the sampler `scheduler` names
    schedule: SchedulerState = dataclasses.field(repr=False)  # its planned run
    size_conditions: SizeConditions | AestheticConditions | None = None  # SDXL's (a refiner's); None for other models
    #: SDXL's ensemble of experts (diffusers' names): the fraction of the denoising done before this run starts
    #: (image to image from the previous expert's latents, not noised again), and where it stops; None: from the
    #: strength's step, to the end
    denoising_start: float | None = None
    denoising_end: float | None = None

    @property
    def num_images(self) -> int:
        return len(self.prompts) * self.num_images_per_prompt

    @property
    def unet_calls(self) -> int:
        """The U-Net calls the run makes: every call of `schedule`, or those before `denoising_end`'s cutoff."""
        timesteps = self.schedule.timesteps
        if self.denoising_end is None:
            return len(timesteps)
        return calls_until(timesteps, self.denoising_end, self.sampler.num_train_timesteps)

    @property
    def guided(self) -> bool:
        """Whether classifier-free guidance runs the unconditional half (sdrt.engine.guidance_batch)."""
        return self.limits.guides_by_batch(self.guidance_scale)

    @classmethod
    def create(
        cls,
        limits: RequestLimits,
        prompt: str | Sequence[str],
        negative_prompt: str | Sequence[str] | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        num_images_per_prompt: int = 1,
        height: int | None = None,
        width: int | None = None,
        seed: int | None = None,
        latents: np.ndarray | None = None,
        output_type: OutputType = "pil",
        return_safety_scores: bool = False,
        scheduler: str | None = None,
        prompt_options: PromptOptions = PromptOptions(),
        image: ImageInput | None = None,
        mask_image: ImageInput | None = None,
        strength: float | None = None,
        decoder: Decoder | str = Decoder.FULL,
        deepcache: DeepCache | None = None,
        *,
        binarize_mask: bool = True,
        original_size: tuple[int, int] | None = None,
        crops_coords_top_left: tuple[int, int] | None = None,
        target_size: tuple[int, int] | None = None,
        negative_original_size: tuple[int, int] | None = None,
        negative_crops_coords_top_left: tuple[int, int] | None = None,
        negative_target_size: tuple[int, int] | None = None,
        aesthetic_score: float | None = None,
        negative_aesthetic_score: float | None = None,
        denoising_start: float | None = None,
        denoising_end: float | None = None,
    ) -> GenerationRequest:
        """The request, its arguments those of `StableDiffusionPipeline.__call__` (diffusers' names and defaults),
        checked in their order; InvalidArgumentError naming the first bad argument and its allowed range.
        `num_inference_steps`, `guidance_scale` and `scheduler` left None are the model's (`limits.defaults`: a
        Turbo or LCM bundle's few steps, diffusers' 50 and 7.5 otherwise).
        `deepcache` (sdrt.engine.deepcache) needs a bundle exported with DeepCache's passes for its branch.
        `binarize_mask=False` keeps a soft mask's grey levels (outpainting's feathered seam). The size conditions
        (original_size ... negative_target_size) apply to SDXL bundles only (sdrt.engine.sdxl_conditions); an SDXL
        refiner takes `aesthetic_score` and `negative_aesthetic_score` (diffusers' 6.0 and 2.5) in place of the target
        sizes, and `image` (image to image, inpainting): it does not run text to image.
        `image` may also be latents, a float32 array (1 or len(prompt) * num_images_per_prompt, C, H/f, W/f) such as
        another bundle's output_type="latent" (the SDXL base's, for its refiner), as diffusers takes a latent `image`.
        `denoising_end` and `denoising_start` (SDXL bundles, fractions in (0, 1)) split one denoising schedule between
        two models as diffusers' SDXL pipelines do (the "ensemble of experts"): the base stops at `denoising_end`
        with output_type="latent", the refiner takes those latents as `image` and starts at `denoising_start` (the
        same fraction), adding no noise; `strength` plays no part then. Not with `mask_image`."""
        size_arguments = dict(original_size=original_size, crops_coords_top_left=crops_coords_top_left,
                              target_size=target_size, negative_original_size=negative_original_size,
                              negative_crops_coords_top_left=negative_crops_coords_top_left,
                              negative_target_size=negative_target_size)
        aesthetic_arguments = dict(aesthetic_score=aesthetic_score, negative_aesthetic_score=negative_aesthetic_score)
        prompts = _as_prompt_list("prompt", prompt)
        negative_prompts = _negative_prompts(negative_prompt, prompts)
        _check_experts(limits, denoising_start, denoising_end, image, mask_image, strength)
        defaults = limits.defaults
        num_inference_steps = defaults.num_inference_steps if num_inference_steps is None else num_inference_steps
        guidance_scale = defaults.guidance_scale if guidance_scale is None else guidance_scale
        scheduler = defaults.scheduler if scheduler is None else scheduler
        sampler = limits.sampler(scheduler)
        low, high = sampler.min_inference_steps, sampler.max_inference_steps
        if not is_int(num_inference_steps) or not low <= num_inference_steps <= high:
            raise InvalidArgumentError("num_inference_steps", f"must be an integer in {low}..{high} for this checkpoint's "
                                       f"{type(sampler).__name__}, got {num_inference_steps!r}")
        num_inference_steps = int(num_inference_steps)
        if not is_finite_number(guidance_scale):
            raise InvalidArgumentError("guidance_scale", f"must be a finite number, got {guidance_scale!r}")
        if not is_int(num_images_per_prompt) or num_images_per_prompt < 1:
            raise InvalidArgumentError("num_images_per_prompt", f"must be an integer >= 1, got {num_images_per_prompt!r}")
        init = None
        if image is None:
            if limits.aesthetics:
                raise InvalidArgumentError("image", "is required: this bundle is an SDXL refiner, which runs image to "
                                           "image (`sdrt img2img`, or image= the base model's image or "
                                           "output_type=\"latent\" latents), not text to image")
            if mask_image is not None:
                raise InvalidArgumentError("mask_image", "needs `image`, the picture to inpaint")
            if strength is not None:
                raise InvalidArgumentError("strength", "applies only with `image` (image to image, inpainting)")
            if limits.unet_takes_mask:
                raise InvalidArgumentError("mask_image", "this bundle's U-Net is an inpainting U-Net: give image and mask_image")
            height, width = _side(limits, "height", height), _side(limits, "width", width)
            schedule = sampler.start(num_inference_steps)
        else:
            if limits.unet_takes_mask and mask_image is None:
                raise InvalidArgumentError("mask_image", "this bundle's U-Net is an inpainting U-Net: give mask_image too")
            if latents is not None:
                raise InvalidArgumentError("latents", "cannot be given with `image`: its noise comes from `seed`")
            num_images = len(prompts) * num_images_per_prompt
            if _is_latents(image):
                init, height, width = _latent_init(limits, image, mask_image, strength, height, width, num_images)
            else:
                init, height, width = _image_init(limits, image, mask_image, strength, height, width, binarize_mask)
            schedule = _start_part_way(sampler, num_inference_steps, init.strength, denoising_start)
        if denoising_end is not None and calls_until(schedule.timesteps, denoising_end, sampler.num_train_timesteps) < 1:
            raise InvalidArgumentError("denoising_end", f"{denoising_end} leaves no step of {num_inference_steps}: make it "
                                       "larger, or give more steps")
        if seed is not None and (not is_int(seed) or seed < 0):
            raise InvalidArgumentError("seed", f"must be a non-negative integer or None, got {seed!r}")
        if output_type not in OUTPUT_TYPES:
            raise InvalidArgumentError("output_type", f"must be one of {OUTPUT_TYPES}, got {output_type!r}")
        if not isinstance(return_safety_scores, bool):
            raise InvalidArgumentError("return_safety_scores", f"must be True or False, got {return_safety_scores!r}")
        if not isinstance(prompt_options, PromptOptions):
            raise InvalidArgumentError("prompt_options", f"must be a sdrt.engine.PromptOptions, got {prompt_options!r:.80}")
        decoder = limits.check_decoder(decoder)
        deepcache = limits.deepcache.check(deepcache, limits.bundle)
        size_conditions = None
        if limits.sdxl:
            if prompt_options.long_prompts:
                raise InvalidArgumentError("prompt_options", "long_prompts is not available for SDXL bundles: their "
                                           "prompts are one 77-token window, as in diffusers")
            if limits.aesthetics:
                size_conditions = AestheticConditions.create(height, width, **size_arguments, **aesthetic_arguments)
            else:
                size_conditions = SizeConditions.create(height, width, **size_arguments)
        elif given := next((name for name, value in size_arguments.items() if value is not None), None):
            raise InvalidArgumentError(given, "applies to SDXL bundles only (their U-Net takes size conditions)")
        if not limits.aesthetics and (given := next((n for n, v in aesthetic_arguments.items() if v is not None), None)):
            raise InvalidArgumentError(given, "applies to SDXL refiner bundles only (a U-Net conditioned on an aesthetic "
                                       "score: requires_aesthetics_score); this bundle's is not")
        # The backend's and the memory budget's bounds, e.g. a size TensorRT's engines were not built for.
        limits.check_images(len(prompts), int(num_images_per_prompt), height, width, limits.guides_by_batch(guidance_scale))
        if latents is not None:
            _check_latents(latents, limits.latent_shape(len(prompts) * num_images_per_prompt, height, width))
        return cls(
            prompts=prompts, negative_prompts=negative_prompts, num_inference_steps=num_inference_steps,
            guidance_scale=float(guidance_scale), num_images_per_prompt=int(num_images_per_prompt), height=height,
            width=width, seed=None if seed is None else int(seed), latents=latents, output_type=output_type,
            return_safety_scores=return_safety_scores, scheduler=scheduler, prompt_options=prompt_options, init=init,
            outpainting=None, decoder=decoder, deepcache=deepcache, limits=limits, sampler=sampler, schedule=schedule,
            size_conditions=size_conditions, denoising_start=None if denoising_start is None else float(denoising_start),
            denoising_end=None if denoising_end is None else float(denoising_end),
        )

    @classmethod
    def create_outpainting(
        cls,
        limits: RequestLimits,
        image: ImageInput,
        prompt: str | Sequence[str],
        left: int = 0,
        right: int = 0,
        top: int = 0,
        bottom: int = 0,
        feather: int | None = None,
        **options: Any,
    ) -> GenerationRequest:
        """Outpainting's request (`StableDiffusionPipeline.outpaint`): `image` grown by the margins onto a canvas
        (sdrt.engine.outpaint), its margins to fill for `prompt`. `options` are `create`'s other arguments, but
        those the canvas sets (height, width, latents, mask_image); strength defaults to 1, and the output is
        images ("pil" or "np")."""
        for name in _SET_BY_OUTPAINTING:
            if name in options:
                raise InvalidArgumentError(name, "is set by outpainting: the canvas is the image grown by left, right, top and bottom")
        output_type = options.pop("output_type", "pil")
        if output_type not in ("pil", "np"):
            raise InvalidArgumentError("output_type", f"outpainting returns images: must be 'pil' or 'np', got {output_type!r}")
        original = load_image(image, "image")
        canvas = plan_canvas(original.size, left, right, top, bottom, limits.image_sides)
        seam = seam_width(canvas, feather, limits.vae_scale_factor)
        mask = feathered_mask(canvas, 0 if limits.unet_takes_mask else seam)  # (H, W)
        request = cls.create(limits, prompt, **{"strength": INPAINT_STRENGTH, **options}, output_type=output_type,
                            height=canvas.height, width=canvas.width, image=grow(original, canvas), mask_image=mask,
                            binarize_mask=False)
        return dataclasses.replace(request, outpainting=Outpainting(original, canvas))


def _as_prompt_list(name: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    if isinstance(value, Sequence) and value and all(isinstance(p, str) for p in value):
        return tuple(value)
    raise InvalidArgumentError(name, f"must be a string or a non-empty list of strings, got {type(value).__name__}: {value!r:.80}")


def _negative_prompts(negative_prompt: Any, prompts: tuple[str, ...]) -> tuple[str, ...] | None:
    """One negative prompt per prompt (a single string applies to every prompt), or None."""
    if negative_prompt is None:
        return None
    negative_prompts = _as_prompt_list("negative_prompt", negative_prompt)
    if len(negative_prompts) == 1 and len(prompts) > 1 and isinstance(negative_prompt, str):
        negative_prompts = negative_prompts * len(prompts)
    if len(negative_prompts) != len(prompts):
        raise InvalidArgumentError(
            "negative_prompt", f"has {len(negative_prompts)} entries but prompt has {len(prompts)}: give one per prompt"
        )
    return negative_prompts


def _side(limits: RequestLimits, name: str, value: Any) -> int:
    """`value` (height or width) checked against the model's sides; None: the model's default size."""
    if value is None:
        return limits.default_image_size
    if not is_int(value) or not limits.image_sides.contains(value):
        raise InvalidArgumentError(name, f"must be {limits.image_sides.describe()} for this model, got {value!r}")
    return int(value)


def _image_init(limits: RequestLimits, image: Any, mask_image: Any, strength: Any, height: Any, width: Any,
                binarize_mask: bool) -> tuple[ImageInit, int, int]:
    """The preprocessed image (and mask) and the size to run at: `height`/`width` where given; else, as diffusers,
    the image's own side rounded down to a multiple of the VAE scale factor for image to image, the model's
    default size for inpainting."""
    picture = load_image(image, "image")
    mask = load_mask(mask_image, "mask_image") if mask_image is not None else None
    if mask is not None and mask.size != picture.size:
        raise InvalidArgumentError("mask_image", f"is {mask.width}x{mask.height} but image is "
                                   f"{picture.width}x{picture.height}: give a mask of the image's size")
    strength = _strength(limits, strength, masked=mask is not None)
    if mask is None:
        own_height, own_width = floor_to_multiple(picture, limits.vae_scale_factor)
        sides = limits.image_sides
        if (height is None and not sides.contains(own_height)) or (width is None and not sides.contains(own_width)):
            raise InvalidArgumentError("image", f"is {picture.width}x{picture.height}: this model runs sides of "
                                       f"{sides.minimum} to {sides.maximum} px; pass height and width to resize it")
        height, width = own_height if height is None else height, own_width if width is None else width
    height, width = _side(limits, "height", height), _side(limits, "width", width)
    pixels = preprocess_image(picture, height, width)  # (1, 3, H, W)
    mask_pixels = preprocess_mask(mask, height, width, binarize_mask) if mask is not None else None  # (1, 1, H, W)
    return ImageInit(pixels, strength, mask_pixels), height, width


def _check_experts(limits: RequestLimits, denoising_start: Any, denoising_end: Any, image: Any, mask_image: Any,
                   strength: Any) -> None:
    """denoising_start and denoising_end: fractions in (0, 1) (diffusers ignores others: we refuse them), on SDXL
    bundles, start before end, start with an image and no strength, neither with a mask."""
    for name, value in (("denoising_start", denoising_start), ("denoising_end", denoising_end)):
        if value is None:
            continue
        if not limits.sdxl:
            raise InvalidArgumentError(name, "applies to SDXL bundles only (diffusers' ensemble of experts: base, then "
                                       "refiner)")
        if not is_finite_number(value) or not 0.0 < value < 1.0:
            raise InvalidArgumentError(name, f"must be a number strictly between 0 and 1 (the fraction of the denoising "
                                       f"done), got {value!r:.80}")
        if mask_image is not None:
            raise InvalidArgumentError(name, "is not available with mask_image (inpainting) in sdrt")
    if denoising_start is None:
        return
    if image is None:
        raise InvalidArgumentError("denoising_start", "needs `image`: the previous expert's output_type=\"latent\" latents")
    if strength is not None:
        raise InvalidArgumentError("strength", "cannot be given with denoising_start, which sets where the denoising starts")
    if denoising_end is not None and denoising_start >= denoising_end:
        raise InvalidArgumentError("denoising_start", f"({denoising_start}) must be smaller than denoising_end "
                                   f"({denoising_end})")


def _start_part_way(sampler: Scheduler, num_inference_steps: int, strength: float,
                    denoising_start: float | None) -> SchedulerState:
    """Image to image's run: from the call `strength` picks (diffusers' get_timesteps), or `denoising_start`'s."""
    if denoising_start is None:
        if denoising_steps(num_inference_steps, strength) < 1:
            raise InvalidArgumentError("strength", f"{strength} leaves no step of {num_inference_steps}: "
                                       "strength * num_inference_steps must be at least 1")
        parameter, begin = "strength", first_call(num_inference_steps, strength, sampler.order)
    else:
        full = sampler.start(num_inference_steps).timesteps  # (num_calls,)
        parameter, begin = "denoising_start", first_call_at(full, denoising_start, sampler.num_train_timesteps, sampler.order)
        if begin >= len(full):
            raise InvalidArgumentError("denoising_start", f"{denoising_start} leaves no step of {num_inference_steps}: "
                                       "make it smaller, or give more steps")
    try:
        return sampler.start(num_inference_steps, begin)
    except ValueError as exc:  # a sampler that cannot start part-way
        raise InvalidArgumentError(parameter, str(exc)) from None


def _is_latents(image: Any) -> bool:
    """Whether `image` is given as latents (N, C, h, w), not as a picture ((H, W) or (H, W, C) arrays)."""
    return isinstance(image, np.ndarray) and image.ndim == 4


def _latent_init(limits: RequestLimits, latents: np.ndarray, mask_image: Any, strength: Any, height: Any, width: Any,
                 num_images: int) -> tuple[ImageInit, int, int]:
    """Image to image from latents (diffusers' 4-channel `image`): the size is theirs times the VAE scale factor."""
    if mask_image is not None:
        raise InvalidArgumentError("mask_image", "needs `image` as a picture: latents cannot be masked (decode them first)")
    f, channels = limits.vae_scale_factor, limits.latent_channels
    if latents.dtype != np.float32 or latents.shape[1] != channels or latents.shape[0] not in (1, num_images):
        raise InvalidArgumentError("image", f"as latents (a 4-dimensional array) must be float32 of shape (1 or "
                                   f"{num_images}, {channels}, height / {f}, width / {f}), got a {latents.dtype} array of "
                                   f"shape {latents.shape}; give a picture as a PIL image, a path or an (H, W, C) array")
    if not np.isfinite(latents).all():
        raise InvalidArgumentError("image", "as latents contains NaN or infinity")
    own = {"height": latents.shape[2] * f, "width": latents.shape[3] * f}
    for name, given in (("height", height), ("width", width)):
        if given is not None and given != own[name]:
            raise InvalidArgumentError(name, f"is {given!r} but the latents given as `image` make images of {own[name]} "
                                       f"px: leave it out")
        if not limits.image_sides.contains(own[name]):
            raise InvalidArgumentError("image", f"as latents makes images {own[name]} px in {name}; this model runs "
                                       f"{limits.image_sides.describe()}")
    return ImageInit(None, _strength(limits, strength, masked=False), latents=latents), own["height"], own["width"]


def _strength(limits: RequestLimits, strength: Any, masked: bool) -> float:
    """`strength` checked, or diffusers' default for the model and task."""
    if strength is None:
        if limits.sdxl:
            strength = SDXL_INPAINT_STRENGTH if masked else SDXL_IMG2IMG_STRENGTH
        else:
            strength = INPAINT_STRENGTH if masked else IMG2IMG_STRENGTH
    if not is_finite_number(strength) or not 0.0 <= strength <= 1.0:
        raise InvalidArgumentError("strength", f"must be a number in [0, 1], got {strength!r}")
    return float(strength)


def _check_latents(latents: Any, expected: tuple[int, ...]) -> None:
    if not isinstance(latents, np.ndarray) or latents.dtype != np.float32 or latents.shape != expected:
        got = f"{latents.dtype} array of shape {latents.shape}" if isinstance(latents, np.ndarray) else type(latents).__name__
        raise InvalidArgumentError("latents", f"must be a float32 numpy array of shape {expected}, got {got}")
    if not np.isfinite(latents).all():
        raise InvalidArgumentError("latents", "contains NaN or infinity")
