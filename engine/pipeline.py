"""Text-to-image over a bundle: tokenize -> encode -> latents -> denoising loop -> decode -> (safety check) -> images.

Same arguments, defaults and numerics as diffusers' StableDiffusionPipeline, on numpy and one inference backend; with
`image` (and `mask_image`) those of StableDiffusionImg2ImgPipeline (StableDiffusionInpaintPipeline), and `outpaint`.
An SDXL bundle runs as StableDiffusionXLPipeline (and its image-to-image and inpainting pipelines), its text
conditioning from sdrt.engine.sdxl_conditions; an SDXL refiner bundle as StableDiffusionXLImg2ImgPipeline (and the
inpainting one) with requires_aesthetics_score.
"""
from __future__ import annotations

import contextlib
import dataclasses
import inspect
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from sdrt.engine import guidance_batch
from sdrt.engine.backends import Backend
from sdrt.engine.checks import is_finite_number
from sdrt.engine.device_loop import DenoiseJob, StepObserver
from sdrt.engine.deepcache import DeepCache, DeepCacheSupport
from sdrt.engine.errors import InvalidArgumentError
from sdrt.engine.guidance_embedding import guidance_scale_embedding
from sdrt.engine.guidance_embedding import INPUT_NAME as GUIDANCE_EMBEDDING_INPUT
from sdrt.engine.host_memory import MemoryBudget, format_bytes, process_rss_bytes
from sdrt.engine.image_io import MASK_THRESHOLD, ImageInput, decoded_to_unit_range, to_pil
from sdrt.engine.image_to_image import TEXT_TO_IMAGE, DenoiseHooks, KnownRegionBlend, MaskChannels, latent_mask, sample_posterior
from sdrt.engine.lora_weights import LoraWeights
from sdrt.engine.manifest import Manifest
from sdrt.engine.memory_estimate import MemoryModel
from sdrt.engine.noise import RequestNoise
from sdrt.engine.outpaint import paste_original
from sdrt.engine.prompts import PromptOptions, TokenizedPrompt, emphasize, text_context, tokenize_prompt
from sdrt.engine.request import GenerationRequest, OutputType, RequestLimits
from sdrt.engine.safety_checker import SafetyChecker, SafetyPolicy, SafetyScores
from sdrt.engine.schedulers import DEFAULT_SCHEDULER, Scheduler, SchedulerConfigError, check_scheduler_name, scheduler_by_name
from sdrt.engine.sdxl_conditions import SdxlTextEncoders
from sdrt.engine.specs import Component, Decoder
from sdrt.engine.tokenizer import CLIPTokenizer

logger = logging.getLogger(__name__)

#: diffusers' `callback_on_step_end(pipe, step_index, timestep, callback_kwargs) -> dict`: called after each denoising
#: step with {"latents": ...}; a "latents" entry in the returned dict replaces them. Raising (e.g. GenerationCancelled)
#: stops the generation between steps.
StepEndCallback = Callable[["StableDiffusionPipeline", int, float, dict[str, np.ndarray]], dict[str, np.ndarray] | None]


@dataclasses.dataclass(frozen=True)
class PipelineOutput:
    """`images`: PIL images, or a float32 (N, H, W, 3) array in [0, 1] for output_type="np", or the final latents
    (N, C, H/f, W/f) for output_type="latent". `nsfw_content_detected`: one flag per image, or None when no safety
    checker ran. `safety_scores`: per-image concept scores when requested with return_safety_scores=True and the
    checker ran. `backend`: the backend that ran. `timings`: seconds per stage (tokenize, text_encode, vae_encode
    when starting from an image, denoise = unet + guidance_and_scheduler, decode, safety_check), nothing else; on a
    backend's device loop, unet is the whole loop (its graphs hold guidance and the scheduler update).
    `unet_calls`: how many times the U-Net ran (one batch per call); `unet_shallow_calls`: how many of them were
    DeepCache's shallow passes."""

    images: list[Image.Image] | np.ndarray
    nsfw_content_detected: list[bool] | None
    backend: str
    safety_scores: list[SafetyScores] | None = None
    timings: dict[str, float] = dataclasses.field(default_factory=dict)
    unet_calls: int = 0
    unet_shallow_calls: int = 0


class StableDiffusionPipeline:
    """A loaded bundle, ready to generate. Create it with `sdrt.engine.load`; call it like diffusers' pipeline."""

    def __init__(
        self,
        bundle_dir: Path,
        manifest: Manifest,
        backend: Backend,
        tokenizer: CLIPTokenizer,
        scheduler: Scheduler,
        safety_checker: SafetyChecker | None,
        safety_policy: SafetyPolicy,
        scheduler_config: Mapping[str, Any],
        memory_budget: MemoryBudget | None = MemoryBudget(),
        tokenizer_2: CLIPTokenizer | None = None,
        opened_rss_bytes: int | None = None,
    ) -> None:
        """`scheduler_config`: the bundle's scheduler_config.json, read when its hash was verified at load; named
        samplers are built from it, so a file damaged or removed after load changes nothing. `memory_budget`: what
        a request's estimated peak memory must fit (sdrt.engine.memory_estimate), checked when it is validated;
        None: no check (a server admitting work by its own budget). `tokenizer_2`: an SDXL bundle's second tokenizer.
        `opened_rss_bytes`: the process's RSS before any of the backend's models was loaded, the memory estimate's
        base (default: now; `load` measures it before loading cached compiled models, which the estimate counts)."""
        self.bundle_dir = bundle_dir
        self.manifest = manifest
        self.backend = backend
        self.tokenizer = tokenizer
        self.scheduler = scheduler
        self.scheduler_config = scheduler_config
        self.safety_checker = safety_checker if safety_policy is not SafetyPolicy.OFF else None
        self.safety_policy = safety_policy
        self._empty_prompt_embedding: np.ndarray | None = None
        self._progress_bar_config: dict[str, Any] = {}
        self._lora = LoraWeights(bundle_dir, manifest, backend)
        self._named_schedulers: dict[str, Scheduler] = {}
        self.memory_budget = memory_budget
        self._opened_rss_bytes = opened_rss_bytes if opened_rss_bytes is not None else process_rss_bytes() or 0
        self._memory_model: MemoryModel | None = None
        #: an SDXL bundle's two text encoders (None for SD 1.x/2.x)
        self.sdxl_text_encoders = _sdxl_text_encoders(manifest, backend, tokenizer, tokenizer_2)
        model = manifest.model
        #: what requests are validated against (GenerationRequest.create)
        self.limits = RequestLimits(
            vae_scale_factor=model.vae_scale_factor, latent_channels=model.latent_channels,
            default_image_size=model.default_image_size, image_sides=model.image_sides,
            unet_takes_mask=model.unet_in_channels != model.latent_channels, sampler=self.sampler,
            check_images=self._check_images, defaults=manifest.defaults,
            decoders=tuple(d for d in Decoder if d.component in manifest.components),
            guidance_embedding_dim=_input_size(manifest, Component.UNET, GUIDANCE_EMBEDDING_INPUT),
            deepcache=self._deepcache_support(), bundle=str(bundle_dir),
            sdxl=self.sdxl_text_encoders is not None,
            aesthetics=manifest.sdxl is not None and manifest.sdxl.requires_aesthetics_score,
        )

    # ---- configuration -------------------------------------------------------------------------------------------
    @property
    def vae_scale_factor(self) -> int:
        return self.manifest.model.vae_scale_factor

    def set_progress_bar_config(self, **kwargs: Any) -> None:
        """Options for the denoising progress bar, passed to tqdm (e.g. `disable=True`), as in diffusers."""
        self._progress_bar_config = dict(kwargs)

    # ---- LoRA ------------------------------------------------------------------------------------------------------
    def load_lora(self, path: str | os.PathLike, scale: float = 1.0) -> None:
        """Apply the LoRA .safetensors file at `path` to the U-Net and text encoders, its deltas times `scale`,
        replacing any LoRA loaded before (one LoRA at a time, always on the bundle's own weights; scale 0 gives the
        base weights). Both diffusers/PEFT (`unet.<module>.lora_A.weight`) and kohya (`lora_unet_<module>.lora_down.weight`)
        keys are read. Backends: onnxruntime-cpu (its sessions are re-created) and tensorrt (engines refitted in place;
        they must be built with `sdrt build-engines --refittable`); others raise WeightsNotReplaceableError.
        Raise UnknownLoraKeysError for keys naming no weight of this model, LoraError for an unreadable or malformed
        file, NoRefitMapError for a bundle exported before refit maps were recorded (re-export it)."""
        if not is_finite_number(scale):
            raise InvalidArgumentError("scale", f"must be a finite number, got {scale!r}")
        self._lora.apply(path, float(scale))
        self._empty_prompt_embedding = None  # computed with the text encoder's previous weights

    def unload_lora(self) -> None:
        """Restore the bundle's own weights after `load_lora`."""
        self._lora.apply(None, 0.0)
        self._empty_prompt_embedding = None

    # ---- schedulers ------------------------------------------------------------------------------------------------
    def sampler(self, name: str | None) -> Scheduler:
        """The sampler `scheduler=name` runs: `self.scheduler` for None or "default", else one built by name over the
        bundle's scheduler config as verified at load (kept for later calls). Raise InvalidArgumentError("scheduler")
        for an unknown name or one that cannot run this checkpoint's noise schedule."""
        if name is None or name == DEFAULT_SCHEDULER:
            return self.scheduler
        check_scheduler_name(name)
        if name not in self._named_schedulers:
            try:
                self._named_schedulers[name] = scheduler_by_name(name, self.scheduler_config)
            except SchedulerConfigError as exc:
                raise InvalidArgumentError("scheduler", f"{name!r} cannot run this checkpoint's noise schedule: {exc}") from None
        return self._named_schedulers[name]

    # ---- request bounds ----------------------------------------------------------------------------------------
    def _deepcache_support(self) -> DeepCacheSupport:
        entry = self.manifest.deepcache
        if entry is None:
            return DeepCacheSupport()
        return DeepCacheSupport(entry.branch, entry.branches, type(self.backend).deepcache_refusal)

    def _check_images(self, prompts: int, num_images_per_prompt: int, height: int, width: int, guided: bool) -> None:
        """RequestLimits.check_images: the backend's bounds, then the memory budget's (where the backend's memory is
        modelled): refused when the estimate of the request's peak is over it."""
        images = prompts * num_images_per_prompt
        self.backend.check_request(images, height, width)
        if self.memory_budget is None or type(self.backend).memory_profile is None:
            return
        if self._memory_model is None:
            self._memory_model = MemoryModel.for_pipeline(self, self._opened_rss_bytes)
        model, budget = self._memory_model, self.memory_budget.resolve()
        needed = model.peak_bytes(height, width, images, guided)
        if needed <= budget:
            return
        over = (f"{images} images of {width}x{height} need about {format_bytes(needed)}, over this machine's memory "
                f"budget of {format_bytes(budget)} ({self.memory_budget.describe()})")
        most = model.most_images(height, width, guided, budget, images - 1) // prompts
        if most:
            raise InvalidArgumentError("num_images_per_prompt", f"must be at most {most} here ({prompts} prompt(s)): {over}")
        step = self.vae_scale_factor
        side = model.largest_square(images, guided, budget, step, self.manifest.model.image_sides.maximum)
        fits = f"at most {side}x{side} fits" if side >= self.manifest.model.image_sides.minimum else "no size fits"
        raise InvalidArgumentError("height", f"{over}; {fits}")

    def latent_shape(self, num_images: int, height: int, width: int) -> tuple[int, int, int, int]:
        """The shape of the initial noise for `num_images` images of height x width pixels."""
        return self.limits.latent_shape(num_images, height, width)

    def draw_noise(self, seed: int | None, num_images: int, height: int, width: int) -> np.ndarray:
        """The initial noise a text-to-image call with `seed` draws when given no `latents` (its first draw): float32
        (num_images, C, height/f, width/f). Concatenating several requests' noise and passing it as `latents` gives
        each its own images, with a deterministic sampler (a stochastic one's step noise comes from the call's seed)."""
        return RequestNoise(seed).draw(self.latent_shape(num_images, height, width))

    # ---- the chapter's steps -------------------------------------------------------------------------------------
    def encode_prompts(
        self, prompts: Sequence[str], timings: dict[str, float] | None = None, options: PromptOptions = PromptOptions()
    ) -> np.ndarray:
        """Tokenize and run the text encoder: (B, K * model_max_length, hidden) embeddings, read as `options` say
        (sdrt.engine.prompts); K = 1 unless options.long_prompts, then the most chunks a prompt needs."""
        timings = {} if timings is None else timings
        tokenized = self._tokenize("prompt", prompts, options, timings)
        return self._encode(tokenized, max(t.chunks for t in tokenized), timings)

    def empty_prompt_embedding(self) -> np.ndarray:
        """The embedding of "" (the unconditional input of guidance), computed once per pipeline."""
        if self._empty_prompt_embedding is None:
            self._empty_prompt_embedding = self.encode_prompts([""])  # (1, L, D)
        return self._empty_prompt_embedding

    def _tokenize(self, parameter: str, prompts: Sequence[str], options: PromptOptions,
                  timings: dict[str, float]) -> list[TokenizedPrompt]:
        with _timed(timings, "tokenize"):
            try:
                return [tokenize_prompt(self.tokenizer, prompt, options) for prompt in prompts]
            except ValueError as exc:  # a weight the prompt syntax cannot use
                raise InvalidArgumentError(parameter, str(exc)) from None

    def _encode(self, tokenized: Sequence[TokenizedPrompt], chunks: int, timings: dict[str, float]) -> np.ndarray:
        """(B, chunks * L, D): every prompt's chunks encoded in one text-encoder call, weighted, padded to `chunks`."""
        with _timed(timings, "text_encode"):
            input_ids = np.concatenate([t.input_ids for t in tokenized]).astype(np.int32)  # (sum of K, L)
            hidden = self.backend.run(Component.TEXT_ENCODER, {"input_ids": input_ids})[0]  # (sum of K, L, D)
        per_prompt = np.split(hidden, np.cumsum([t.chunks for t in tokenized])[:-1])  # B x (K, L, D)
        weighted = [emphasize(h, t.weights) for h, t in zip(per_prompt, tokenized)]  # B x (K, L, D)
        empty = self.empty_prompt_embedding() if any(t.chunks < chunks for t in tokenized) else None  # (1, L, D)
        return np.stack([text_context(h, chunks, empty) for h in weighted])  # (B, chunks * L, D)

    def _check_context_length(self, length: int) -> None:
        """Raise InvalidArgumentError unless the bundle's U-Net and the backend take a text context of `length`."""
        unet = self.manifest.components[Component.UNET]
        declared = next(t.shape[1] for t in unet.inputs if t.name == "encoder_hidden_states")
        if isinstance(declared, int) and declared != length:  # exported before the text context was a dynamic axis
            raise InvalidArgumentError(
                "prompt",
                f"needs a text context of {length} tokens ({length // self.tokenizer.model_max_length} chunks), but the "
                f"U-Net of {self.bundle_dir} was exported with a fixed text context of {declared} tokens: re-export the "
                f"bundle with this version of sdrt (`sdrt export CHECKPOINT {self.bundle_dir} --force`) for long prompts, "
                f"or keep prompts within {self.tokenizer.chunk_length} tokens",
            )
        self.backend.check_context_length(length)

    def _text_context(self, request: GenerationRequest, timings: dict[str, float]) -> np.ndarray:
        """U-Net conditioning: [unconditional; conditional] when guiding, each prompt repeated per image, every
        prompt padded to the same number of chunks."""
        options, guided = request.prompt_options, request.guided
        cond_tokens = self._tokenize("prompt", request.prompts, options, timings)
        uncond_tokens = []
        if guided and request.negative_prompts is not None:
            uncond_tokens = self._tokenize("negative_prompt", request.negative_prompts, options, timings)
        chunks = max(t.chunks for t in (*cond_tokens, *uncond_tokens))
        self._check_context_length(chunks * self.tokenizer.model_max_length)
        cond = self._encode(cond_tokens, chunks, timings)  # (B, KL, D)
        if guided:
            if request.negative_prompts is None:
                uncond = np.broadcast_to(np.tile(self.empty_prompt_embedding(), (1, chunks, 1)), cond.shape)  # (B, KL, D)
            else:
                uncond = self._encode(uncond_tokens, chunks, timings)  # (B, KL, D)
            cond = guidance_batch.batch(uncond, cond)  # (2B, KL, D)
        return np.repeat(cond, request.num_images_per_prompt, axis=0)  # ((2)BN, KL, D), images of a prompt adjacent

    def _unet_conditions(self, request: GenerationRequest, timings: dict[str, float]) -> dict[str, np.ndarray]:
        """The U-Net's inputs besides the latents and timesteps, for the whole (guided) batch: the text context, and
        an SDXL U-Net's added conditions."""
        encoders = self.sdxl_text_encoders
        if encoders is None:
            return {"encoder_hidden_states": self._text_context(request, timings)}  # ((2)BN, KL, D)
        with _timed(timings, "tokenize"):
            tokens = encoders.tokenize(request.prompts, request.negative_prompts, request.guided, request.prompt_options)
        with _timed(timings, "text_encode"):
            return encoders.unet_inputs(tokens, request.num_images_per_prompt, request.guided, request.size_conditions)

    def encode_image(self, pixels: np.ndarray, noise: RequestNoise, timings: dict[str, float] | None = None) -> np.ndarray:
        """VAE-encode (1, 3, H, W) pixels in [-1, 1] and sample scaled latents (1, C, H/f, W/f) with the request's noise."""
        with _timed({} if timings is None else timings, "vae_encode"):
            moments = self.backend.run(Component.VAE_ENCODER, {"sample": pixels})[0]  # (1, 2C, h, w)
        sample_noise = noise.draw((moments.shape[0], moments.shape[1] // 2, *moments.shape[2:]))  # (1, C, h, w)
        return sample_posterior(moments, sample_noise, self.manifest.model.vae_scaling_factor)

    def _initial_latents(self, request: GenerationRequest, noise_source: RequestNoise,
                         timings: dict[str, float]) -> tuple[np.ndarray, DenoiseHooks]:
        """The latents the loop starts from and what it does besides text to image. Noise is drawn in diffusers'
        order: the image's latent sample, the initial noise, then the masked image's latent sample."""
        init, shape, sigma = request.init, self.latent_shape(request.num_images, request.height, request.width), np.float32(request.schedule.init_noise_sigma)
        if init is None:
            latents = request.latents if request.latents is not None else noise_source.draw(shape)
            return (latents * sigma).astype(np.float32), TEXT_TO_IMAGE  # (BN, C, H/f, W/f)
        # An inpainting U-Net started from pure noise (strength 1) never sees the unmasked image's latents.
        image_latents = None
        if init.latents is not None:  # given as latents: no VAE, no sample drawn (as diffusers)
            image_latents = np.broadcast_to(init.latents, shape).astype(np.float32)  # (BN, C, h, w)
        elif init.mask is None or not self.limits.unet_takes_mask or init.strength < 1.0:
            image_latents = np.repeat(self.encode_image(init.pixels, noise_source, timings), request.num_images, axis=0)  # (BN, C, h, w)
        if request.denoising_start is not None:  # the previous expert's latents, already at this level of noise
            return image_latents, TEXT_TO_IMAGE
        noise = noise_source.draw(shape)  # (BN, C, h, w)
        if init.mask is not None and init.strength == 1.0:
            latents = (noise * sigma).astype(np.float32)  # as text to image: the image enters through the mask
        else:
            latents = request.sampler.add_noise(request.schedule, image_latents, noise, 0)  # (BN, C, h, w)
        if init.mask is None:
            return latents, TEXT_TO_IMAGE
        mask = np.repeat(latent_mask(init.mask, self.vae_scale_factor), request.num_images, axis=0)  # (BN, 1, h, w)
        if not self.limits.unet_takes_mask:
            return latents, KnownRegionBlend(request.sampler, request.schedule, image_latents, noise, mask)
        masked_pixels = (init.pixels * (init.mask < MASK_THRESHOLD)).astype(np.float32)  # (1, 3, H, W), repainted part 0
        masked_latents = np.repeat(self.encode_image(masked_pixels, noise_source, timings), request.num_images, axis=0)  # (BN, C, h, w)
        guided = request.guided
        return latents, MaskChannels(guidance_batch.repeat(mask, guided), guidance_batch.repeat(masked_latents, guided))  # (2BN, ...)

    def _denoise(self, request: GenerationRequest, conditions: Mapping[str, np.ndarray], latents: np.ndarray, hooks: DenoiseHooks,
                 noise_source: RequestNoise, timings: dict[str, float],
                 callback_on_step_end: StepEndCallback | None = None) -> np.ndarray:
        state, scheduler = request.schedule, request.sampler
        guided, deepcache = request.guided, request.deepcache
        context = conditions["encoder_hidden_states"]  # ((2)BN, KL, D)
        extra_inputs = {name: value for name, value in conditions.items() if name != "encoder_hidden_states"}  # SDXL's
        if (embedding_dim := self.limits.guidance_embedding_dim) is not None:
            # an LCM-distilled U-Net: guidance enters as an input, every call the same
            extra_inputs[GUIDANCE_EMBEDDING_INPUT] = guidance_scale_embedding(request.guidance_scale, len(latents), embedding_dim)  # (BN, D)
        # the device loop runs the plain U-Net on its sample, timestep and context only (not SDXL's added conditions)
        timesteps = state.timesteps[:request.unet_calls]  # (calls,): all but those denoising_end leaves to another model
        plain = hooks is TEXT_TO_IMAGE and not extra_inputs and deepcache is None and len(timesteps) == len(state.timesteps)
        device_loop = self.backend.device_loop() if plain else None
        if device_loop is not None:
            with _timed(timings, "unet"):  # one graph per step: the U-Net with guidance and the update
                return device_loop.denoise(DenoiseJob(
                    scheduler, state, latents, context, request.guidance_scale, guided,
                    noise_source.draw if scheduler.needs_noise else None, self._step_observer(callback_on_step_end)))
        # DeepCache decides per U-Net call (sdrt.engine.deepcache): step_index counts calls, PNDM's warm-up included
        for step_index, timestep in enumerate(tqdm(timesteps, **{"desc": "denoise", **self._progress_bar_config})):
            model_input = guidance_batch.repeat(latents, guided)  # (2BN or BN, C, h, w)
            model_input = hooks.unet_input(scheduler.scale_model_input(state, model_input, step_index))  # (2BN, C', h, w)
            timesteps = np.full(len(model_input), timestep, dtype=np.float32)  # (2BN,)
            feeds = {"sample": model_input, "timestep": timesteps, "encoder_hidden_states": context, **extra_inputs}
            with _timed(timings, "unet"):
                if deepcache is None:
                    noise_pred = self.backend.run(Component.UNET, feeds)[0]  # (2BN or BN, C, h, w)
                elif deepcache.is_full_pass(step_index):
                    # (2BN or BN, C, h, w), and the feature to reuse (2BN or BN, F, h / 2^block, w / 2^block)
                    noise_pred, deep_feature = self.backend.run(Component.UNET_DEEPCACHE_FULL, feeds)
                else:
                    noise_pred = self.backend.run(Component.UNET_DEEPCACHE_SHALLOW, {**feeds, "deep_feature": deep_feature})[0]
            if guided:
                noise_pred = guidance_batch.combine(noise_pred, request.guidance_scale)  # (BN, C, h, w)
            # Stochastic samplers draw their step noise from the request's generator, after every other draw.
            step_noise = noise_source.draw(latents.shape) if scheduler.needs_noise else None
            latents, state = scheduler.step(state, noise_pred, step_index, latents, step_noise)
            latents = hooks.after_step(latents, step_index)
            if callback_on_step_end is not None:
                outputs = callback_on_step_end(self, step_index, float(timestep), {"latents": latents}) or {}
                latents = outputs.get("latents", latents)
        return latents

    def _step_observer(self, callback_on_step_end: StepEndCallback | None) -> StepObserver | None:
        """`callback_on_step_end` as a device loop calls it: with the step's latents, returning their replacement."""
        if callback_on_step_end is None:
            return None

        def observe(step_index: int, timestep: float, latents: np.ndarray) -> np.ndarray | None:
            return (callback_on_step_end(self, step_index, timestep, {"latents": latents}) or {}).get("latents")
        return observe

    def decode(self, latents: np.ndarray, decoder: Decoder | str = Decoder.FULL) -> np.ndarray:
        """Decode latents (N, C, h, w) to float32 (N, H, W, 3) images in [0, 1] with the VAE ("full") or the tiny
        autoencoder ("tiny", where the bundle was exported with --tiny-vae): in `callback_on_step_end`, a preview of
        the step's latents. InvalidArgumentError("decoder") for another name or a decoder the bundle lacks."""
        chosen = self.limits.check_decoder(decoder)
        model = self.manifest.model
        scaling_factor = model.vae_scaling_factor if chosen is Decoder.FULL else model.tiny_vae_scaling_factor
        scaled = (latents / np.float32(scaling_factor)).astype(np.float32)  # (N, C, h, w)
        # The decoder's full-resolution activations dominate a request's memory: unless the backend gains from a
        # batched decode, decode one image at a time so that the peak is one image's, whatever the batch.
        slices = [scaled] if self.backend.batched_decode else np.split(scaled, len(scaled))
        decoded = np.concatenate([self.backend.run(chosen.component, {"latent_sample": s})[0] for s in slices])  # (N, 3, H, W)
        return decoded_to_unit_range(decoded)

    def __call__(
        self,
        prompt: str | Sequence[str] | GenerationRequest,
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
        callback_on_step_end: StepEndCallback | None = None,
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
    ) -> PipelineOutput:
        """Generate images for `prompt`, with diffusers' argument meanings and defaults.

        `num_inference_steps`, `guidance_scale` and `scheduler` left None are the model's own (`manifest.defaults`,
        from its checkpoint's configs at export: a Turbo bundle 1 step without guidance, an LCM one 4 LCM steps;
        diffusers' 50 steps at 7.5 for others and for bundles exported before). An LCM-distilled U-Net (one with a
        `timestep_cond` input) takes guidance as an embedding of `guidance_scale` - 1 and never runs the
        unconditional half, as diffusers runs it; `negative_prompt` then has no effect.

        `latents`, if given, is the initial noise (float32, shape (len(prompts) * num_images_per_prompt,
        latent_channels, height / f, width / f)); otherwise it is drawn from numpy's Generator seeded with `seed`.
        `return_safety_scores=True` adds each image's concept scores to the output, to audit the checker's decisions.

        `scheduler` names the sampler (one of sdrt.engine.schedulers.SCHEDULER_NAMES: "pndm", "ddim", "euler",
        "euler_a", "dpm++2m", "dpm++2m-karras", "lms", "lcm", ...); "default" runs the checkpoint's own. Stochastic
        samplers (euler_a, lcm) draw their step noise from the same numpy Generator seeded with `seed`, after every other
        draw of the request (initial latents, VAE samples): the same seed gives the same image.
        `prompt_options`: `PromptOptions(long_prompts=True)` encodes prompts longer than the text encoder's window in
        chunks, `PromptOptions(weighting=True)` reads `(word:1.3)`-style weights (sdrt.engine.prompts); the default
        reads prompts as diffusers does.
        `image` (a PIL image, numpy array or file path; see sdrt.engine.image_io for conversions) makes it image
        to image, as diffusers' StableDiffusionImg2ImgPipeline: the image is VAE-encoded, its latents sampled and
        noised to the level of step `num_inference_steps - int(num_inference_steps * strength)`, and only the
        remaining steps run (`strength`, default 0.8: 1 starts from the image fully noised, near 0 keeps it). It runs
        at the image's size rounded down to multiples of the VAE scale factor unless `height`/`width` resize it.
        With `mask_image` too (same size as `image`; white = repaint, black = keep, binarized at 0.5) it is
        inpainting, as diffusers' StableDiffusionInpaintPipeline: `strength` defaults to 1.0 and the size to
        `height`/`width` or the model's default. An inpainting U-Net (9 input channels) takes the mask and masked
        image's latents as inputs; a standard one regenerates the masked region only, putting the image's (noised)
        latents back in the known region after every step. No `latents` with `image`: all noise comes from `seed`.
        `decoder` turns the final latents into images: "full", the checkpoint's VAE, or "tiny", the tiny autoencoder
        (TAESD) of a bundle exported with `--tiny-vae`, as diffusers runs with `pipe.vae = AutoencoderTiny(...)`.
        `callback_on_step_end(pipe, step_index, timestep, {"latents": latents})` runs after each denoising step, as in
        diffusers (only "latents" is passed; `pipe.decode(latents, decoder="tiny")` previews them); an exception it
        raises, such as GenerationCancelled, ends the call there.
        `deepcache=DeepCache(cache_interval=3, cache_branch=0)` runs a full U-Net pass every `cache_interval` calls and
        shallow passes reusing its deep features between (sdrt.engine.deepcache), as the DeepCache package does in
        diffusers: faster, at some loss of fidelity; the bundle must be exported with `--deepcache-branch`. Off by default.
        SDXL bundles run as StableDiffusionXLPipeline, StableDiffusionXLImg2ImgPipeline (with `image`; `strength`
        defaults to 0.3 there) and StableDiffusionXLInpaintPipeline (with `mask_image` too; `strength` defaults to
        0.9999), and take their size conditions: `original_size` and
        `target_size` ((height, width), default the request's), `crops_coords_top_left` (default (0, 0)) and their
        `negative_*` counterparts for the unconditional half (sdrt.engine.sdxl_conditions); other bundles refuse them.
        An SDXL refiner bundle (exported from a StableDiffusionXLImg2ImgPipeline checkpoint with
        requires_aesthetics_score) runs image to image and inpainting only, as that pipeline: `aesthetic_score`
        (default 6.0) and `negative_aesthetic_score` (default 2.5) condition the two guidance halves in place of the
        target sizes, which it refuses. `image` may be latents (float32 (1 or N, C, H/f, W/f)), e.g. the SDXL base
        bundle's output_type="latent" images, used without the VAE as diffusers does with a 4-channel `image`:
        `refiner(prompt, image=base(prompt, output_type="latent").images)` (strength 0.3 by default).
        SDXL's ensemble of experts, as diffusers: `base(prompt, denoising_end=0.8, output_type="latent")` stops with
        a fifth of the denoising left, `refiner(prompt, image=those latents, denoising_start=0.8)` does it, starting
        from them as they are (GenerationRequest.create).
        Raises InvalidArgumentError (a ValueError) naming the first bad argument and its allowed range, before any
        model runs (GenerationRequest.create). A ready GenerationRequest (built with this pipeline's `limits`) may be
        passed as `prompt`, with no other argument but `callback_on_step_end`.
        """
        if isinstance(prompt, GenerationRequest):
            arguments = locals()
            given = [name for name, default in _CALL_DEFAULTS.items() if arguments[name] is not default]
            if given:
                raise InvalidArgumentError(given[0], "cannot be given with a GenerationRequest: it holds every argument")
            return self.generate(prompt, callback_on_step_end)
        request = GenerationRequest.create(
            self.limits, prompt, negative_prompt, num_inference_steps, guidance_scale, num_images_per_prompt, height,
            width, seed, latents, output_type, return_safety_scores, scheduler, prompt_options, image, mask_image, strength,
            decoder, deepcache, original_size=original_size, crops_coords_top_left=crops_coords_top_left,
            target_size=target_size, negative_original_size=negative_original_size,
            negative_crops_coords_top_left=negative_crops_coords_top_left, negative_target_size=negative_target_size,
            aesthetic_score=aesthetic_score, negative_aesthetic_score=negative_aesthetic_score,
            denoising_start=denoising_start, denoising_end=denoising_end)
        return self.generate(request, callback_on_step_end)

    def generate(self, request: GenerationRequest, callback_on_step_end: StepEndCallback | None = None) -> PipelineOutput:
        """Run `request`, validated with this pipeline's `limits` (GenerationRequest.create); `callback_on_step_end`
        as in `__call__`."""
        if not isinstance(request, GenerationRequest) or request.limits is not self.limits:
            raise InvalidArgumentError("request", "must be a GenerationRequest built with this pipeline's limits "
                                       "(GenerationRequest.create(pipe.limits, ...))")
        if callback_on_step_end is not None and not callable(callback_on_step_end):
            raise InvalidArgumentError("callback_on_step_end", f"must be callable or None, got {type(callback_on_step_end).__name__}")
        if request.deepcache is not None and self._lora.active:
            raise InvalidArgumentError("deepcache", "cannot run with a LoRA loaded: DeepCache's passes hold the bundle's "
                                       "own weights (call unload_lora() first, or fuse the LoRA at export with --lora)")
        return self._run(request, callback_on_step_end)

    def outpaint(self, image: ImageInput, prompt: str | Sequence[str], left: int = 0, right: int = 0, top: int = 0,
                 bottom: int = 0, feather: int | None = None, **options: Any) -> PipelineOutput:
        """Extend `image` by `left`, `right`, `top`, `bottom` pixels and fill the new margins for `prompt`.

        The canvas is rounded up to multiples of the VAE scale factor (the extra pixels widen the right and bottom
        margins, or the left and top ones when only those grow: sdrt.engine.outpaint); the margins start as the image's
        edge pixels repeated outwards. The mask is 0 on the image and rises to 1 over a seam of `feather` pixels
        outwards (default 4 latent pixels, capped at half the widest margin); with a standard U-Net the seam's
        latents are a blend of the repeated edge and the generated ones at every step, so the new content grows out
        of the image's border; an inpainting U-Net takes a hard mask. The result is the inpainted canvas with the
        original pixels pasted back unchanged. `options` are `__call__`'s other arguments (negative_prompt,
        num_inference_steps, guidance_scale, num_images_per_prompt, strength (default 1), seed, output_type ("pil"
        or "np"), return_safety_scores, scheduler, prompt_options): GenerationRequest.create_outpainting.
        """
        return self.generate(GenerationRequest.create_outpainting(self.limits, image, prompt, left, right, top, bottom,
                                                                  feather, **options))

    def _run(self, request: GenerationRequest, callback_on_step_end: StepEndCallback | None) -> PipelineOutput:
        timings: dict[str, float] = {}
        conditions = self._unet_conditions(request, timings)
        noise_source = RequestNoise(request.seed)
        latents, hooks = self._initial_latents(request, noise_source, timings)
        with _timed(timings, "denoise"):
            latents = self._denoise(request, conditions, latents, hooks, noise_source, timings, callback_on_step_end)
        timings["guidance_and_scheduler"] = timings["denoise"] - timings["unet"]
        unet_calls = request.unet_calls
        shallow = 0 if request.deepcache is None else sum(not request.deepcache.is_full_pass(i) for i in range(unet_calls))
        if request.output_type == "latent":
            # As diffusers: latents are not images, so nothing is checked.
            return PipelineOutput(images=latents, nsfw_content_detected=None, backend=self.backend.name, timings=timings,
                                  unet_calls=unet_calls, unet_shallow_calls=shallow)
        with _timed(timings, "decode"):
            images = self.decode(latents, request.decoder)  # (N, H, W, 3)
        if request.outpainting is not None:
            images = paste_original(images, request.outpainting.original, request.outpainting.canvas)  # (N, H, W, 3)
        # The checker sees the 8-bit images, as diffusers' feature extractor does.
        pil_images = to_pil(images) if request.output_type == "pil" or self.safety_checker is not None else []
        scores = None
        if self.safety_checker is not None:
            with _timed(timings, "safety_check"):
                scores = self.safety_checker.check(pil_images)
            images, pil_images = self._apply_safety_policy(scores, images, pil_images)
        return PipelineOutput(
            images=pil_images if request.output_type == "pil" else images,
            nsfw_content_detected=[s.nsfw for s in scores] if scores is not None else None,
            backend=self.backend.name,
            safety_scores=scores if request.return_safety_scores else None,
            timings=timings,
            unet_calls=unet_calls,
            unet_shallow_calls=shallow,
        )

    def _apply_safety_policy(
        self, scores: list[SafetyScores], images: np.ndarray, pil_images: list[Image.Image]
    ) -> tuple[np.ndarray, list[Image.Image]]:
        flagged = [i for i, s in enumerate(scores) if s.nsfw]
        if not flagged:
            return images, pil_images
        if self.safety_policy is SafetyPolicy.FLAG:
            logger.warning("Potential NSFW content was detected in image(s) %s; returned with their flag.", flagged)
            return images, pil_images
        logger.warning("Potential NSFW content was detected in image(s) %s; black images are returned instead.", flagged)
        images = images.copy()
        images[flagged] = 0.0  # (N, H, W, 3), flagged ones black
        pil_images = [Image.new("RGB", image.size) if i in flagged else image for i, image in enumerate(pil_images)]
        return images, pil_images


def _input_size(manifest: Manifest, component: Component, name: str) -> int | None:
    """The size of the last axis of `component`'s input `name`, or None where its model does not take it."""
    entry = manifest.components.get(component)
    shape = next((t.shape for t in entry.inputs if t.name == name), None) if entry is not None else None
    return None if shape is None else int(shape[-1])


def _sdxl_text_encoders(manifest: Manifest, backend: Backend, tokenizer: CLIPTokenizer,
                        tokenizer_2: CLIPTokenizer | None) -> SdxlTextEncoders | None:
    if manifest.sdxl is None:
        return None
    if tokenizer_2 is None:
        raise ValueError("an SDXL bundle's pipeline needs its second tokenizer (tokenizer_2)")
    first = manifest.components.get(Component.TEXT_ENCODER)  # None: a refiner's, which has the second only
    penultimate = [t.name for t in first.outputs].index("penultimate_hidden_state") if first is not None else None
    return SdxlTextEncoders(backend, tokenizer if first is not None else None, tokenizer_2, penultimate,
                            manifest.sdxl.force_zeros_for_empty_prompt)


#: `__call__`'s request arguments and their defaults: none may be given with a ready GenerationRequest
_CALL_DEFAULTS = {name: parameter.default for name, parameter in inspect.signature(StableDiffusionPipeline.__call__).parameters.items()
                  if parameter.default is not inspect.Parameter.empty and name != "callback_on_step_end"}


@contextlib.contextmanager
def _timed(timings: dict[str, float], stage: str):
    """Add the block's wall time to `timings[stage]` (stages such as the U-Net accumulate over calls)."""
    start = time.perf_counter()
    yield
    timings[stage] = timings.get(stage, 0.0) + time.perf_counter() - start
