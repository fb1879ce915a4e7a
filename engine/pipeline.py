"""Text-to-image over a bundle: tokenize -> encode -> latents -> denoising loop -> decode -> (safety check) -> images.

Same arguments, defaults and numerics as diffusers' StableDiffusionPipeline, on numpy and one inference backend.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from sdrt.engine.backends import Backend
from sdrt.engine.errors import InvalidArgumentError
from sdrt.engine.images import decoded_to_unit_range, to_pil
from sdrt.engine.lora_weights import LoraWeights
from sdrt.engine.manifest import Manifest
from sdrt.engine.safety_checker import SafetyChecker, SafetyPolicy, SafetyScores
from sdrt.engine.schedulers import Scheduler, SchedulerState
from sdrt.engine.specs import Component
from sdrt.engine.checks import is_finite_number, is_int
from sdrt.engine.tokenizer import CLIPTokenizer

logger = logging.getLogger(__name__)

OutputType = Literal["pil", "np", "latent"]
#: diffusers' `callback_on_step_end(pipe, step_index, timestep, callback_kwargs) -> dict`: called after each denoising
#: step with {"latents": ...}; a "latents" entry in the returned dict replaces them. Raising (e.g. GenerationCancelled)
#: stops the generation between steps.
StepEndCallback = Callable[["StableDiffusionPipeline", int, float, dict[str, np.ndarray]], dict[str, np.ndarray] | None]
_OUTPUT_TYPES = ("pil", "np", "latent")


@dataclasses.dataclass(frozen=True)
class PipelineOutput:
    """`images`: PIL images, or a float32 (N, H, W, 3) array in [0, 1] for output_type="np", or the final latents
    (N, C, H/f, W/f) for output_type="latent". `nsfw_content_detected`: one flag per image, or None when no safety
    checker ran. `safety_scores`: per-image concept scores when requested with return_safety_scores=True and the
    checker ran. `backend`: the backend that ran. `timings`: seconds per stage (tokenize, text_encode, denoise =
    unet + guidance_and_scheduler, decode, safety_check) and the number of U-Net calls (unet_calls)."""

    images: list[Image.Image] | np.ndarray
    nsfw_content_detected: list[bool] | None
    backend: str
    safety_scores: list[SafetyScores] | None = None
    timings: dict[str, float] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class _Request:
    """A validated call: everything the denoising loop needs, nothing left to check."""

    prompts: tuple[str, ...]
    negative_prompts: tuple[str, ...] | None
    schedule: SchedulerState  # the planned run of num_inference_steps steps
    guidance_scale: float
    num_images_per_prompt: int
    height: int
    width: int
    seed: int | None
    latents: np.ndarray | None
    output_type: OutputType

    @property
    def num_images(self) -> int:
        return len(self.prompts) * self.num_images_per_prompt

    @property
    def do_classifier_free_guidance(self) -> bool:
        # diffusers runs the unconditional pass only when guidance strengthens the prompt
        return self.guidance_scale > 1.0


def _as_prompt_list(name: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    if isinstance(value, Sequence) and value and all(isinstance(p, str) for p in value):
        return tuple(value)
    raise InvalidArgumentError(name, f"must be a string or a non-empty list of strings, got {type(value).__name__}: {value!r:.80}")


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
    ) -> None:
        self.bundle_dir = bundle_dir
        self.manifest = manifest
        self.backend = backend
        self.tokenizer = tokenizer
        self.scheduler = scheduler
        self.safety_checker = safety_checker if safety_policy is not SafetyPolicy.OFF else None
        self.safety_policy = safety_policy
        self._empty_prompt_embedding: np.ndarray | None = None
        self._progress_bar_config: dict[str, Any] = {}
        self._lora = LoraWeights(bundle_dir, manifest, backend)

    # ---- configuration -------------------------------------------------------------------------------------------
    @property
    def vae_scale_factor(self) -> int:
        return self.manifest.model.vae_scale_factor

    def set_progress_bar_config(self, **kwargs: Any) -> None:
        """Options for the denoising progress bar, passed to tqdm (e.g. `disable=True`), as in diffusers."""
        self._progress_bar_config = dict(kwargs)

    # ---- LoRA ------------------------------------------------------------------------------------------------------
    def load_lora(self, path: str | os.PathLike, scale: float = 1.0) -> None:
        """Apply the LoRA .safetensors file at `path` to the U-Net and text encoder, its deltas times `scale`,
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

    # ---- validation ----------------------------------------------------------------------------------------------
    def _validate_size(self, name: str, value: Any) -> int:
        if value is None:
            return self.manifest.model.default_image_size
        factor, largest = self.vae_scale_factor, self.manifest.model.max_image_size
        if not is_int(value) or not factor <= value <= largest or value % factor:
            raise InvalidArgumentError(name, f"must be a multiple of {factor} between {factor} and {largest}, got {value!r}")
        return int(value)

    def _validate(self, prompt, negative_prompt, num_inference_steps, guidance_scale, num_images_per_prompt,
                  height, width, seed, latents, output_type) -> _Request:
        prompts = _as_prompt_list("prompt", prompt)
        negative_prompts = None
        if negative_prompt is not None:
            negative_prompts = _as_prompt_list("negative_prompt", negative_prompt)
            if len(negative_prompts) == 1 and len(prompts) > 1 and isinstance(negative_prompt, str):
                negative_prompts = negative_prompts * len(prompts)
            if len(negative_prompts) != len(prompts):
                raise InvalidArgumentError(
                    "negative_prompt", f"has {len(negative_prompts)} entries but prompt has {len(prompts)}: give one per prompt"
                )
        try:
            # The scheduler knows its limits (training steps, warm-up length, steps_offset): planning the run checks them.
            schedule = self.scheduler.start(num_inference_steps)
        except ValueError as exc:
            raise InvalidArgumentError("num_inference_steps", str(exc)) from None
        if not is_finite_number(guidance_scale):
            raise InvalidArgumentError("guidance_scale", f"must be a finite number, got {guidance_scale!r}")
        if not is_int(num_images_per_prompt) or num_images_per_prompt < 1:
            raise InvalidArgumentError("num_images_per_prompt", f"must be an integer >= 1, got {num_images_per_prompt!r}")
        height, width = self._validate_size("height", height), self._validate_size("width", width)
        if seed is not None and (not is_int(seed) or seed < 0):
            raise InvalidArgumentError("seed", f"must be a non-negative integer or None, got {seed!r}")
        if output_type not in _OUTPUT_TYPES:
            raise InvalidArgumentError("output_type", f"must be one of {_OUTPUT_TYPES}, got {output_type!r}")
        request = _Request(prompts, negative_prompts, schedule, float(guidance_scale), int(num_images_per_prompt),
                           height, width, seed, None, output_type)
        self.backend.check_request(request.num_images, height, width)  # e.g. a size TensorRT's engines were not built for
        if latents is not None:
            expected = self._latent_shape(request)
            if not isinstance(latents, np.ndarray) or latents.dtype != np.float32 or latents.shape != expected:
                got = f"{latents.dtype} array of shape {latents.shape}" if isinstance(latents, np.ndarray) else type(latents).__name__
                raise InvalidArgumentError("latents", f"must be a float32 numpy array of shape {expected}, got {got}")
            if not np.isfinite(latents).all():
                raise InvalidArgumentError("latents", "contains NaN or infinity")
            request = dataclasses.replace(request, latents=latents)
        return request

    def _latent_shape(self, request: _Request) -> tuple[int, int, int, int]:
        return self.latent_shape(request.num_images, request.height, request.width)

    def latent_shape(self, num_images: int, height: int, width: int) -> tuple[int, int, int, int]:
        """The shape of the initial noise for `num_images` images of height x width pixels."""
        f = self.vae_scale_factor
        return (num_images, self.manifest.model.latent_channels, height // f, width // f)

    def draw_noise(self, seed: int | None, num_images: int, height: int, width: int) -> np.ndarray:
        """The initial noise a call with `seed` draws when given no `latents`: float32 (num_images, C, height/f,
        width/f). Concatenating several requests' noise and passing it as `latents` gives each its own images."""
        return np.random.default_rng(seed).standard_normal(self.latent_shape(num_images, height, width), dtype=np.float32)

    # ---- the chapter's steps -------------------------------------------------------------------------------------
    def encode_prompts(self, prompts: Sequence[str], timings: dict[str, float] | None = None) -> np.ndarray:
        """Tokenize and run the text encoder: (B, sequence, hidden) embeddings."""
        timings = {} if timings is None else timings
        with _timed(timings, "tokenize"):
            input_ids = self.tokenizer(list(prompts)).astype(np.int32)  # (B, 77)
        with _timed(timings, "text_encode"):
            return self.backend.run(Component.TEXT_ENCODER, {"input_ids": input_ids})[0]  # (B, 77, D)

    def empty_prompt_embedding(self) -> np.ndarray:
        """The embedding of "" (the unconditional input of guidance), computed once per pipeline."""
        if self._empty_prompt_embedding is None:
            self._empty_prompt_embedding = self.encode_prompts([""])  # (1, 77, D)
        return self._empty_prompt_embedding

    def _text_context(self, request: _Request, timings: dict[str, float]) -> np.ndarray:
        """U-Net conditioning: [unconditional; conditional] when guiding, each prompt repeated per image."""
        cond = self.encode_prompts(request.prompts, timings)  # (B, 77, D)
        if request.do_classifier_free_guidance:
            if request.negative_prompts is None:
                uncond = np.broadcast_to(self.empty_prompt_embedding(), cond.shape)  # (B, 77, D)
            else:
                uncond = self.encode_prompts(request.negative_prompts, timings)  # (B, 77, D)
            cond = np.concatenate([uncond, cond])  # (2B, 77, D)
        return np.repeat(cond, request.num_images_per_prompt, axis=0)  # ((2)BN, 77, D), images of a prompt adjacent

    def _initial_latents(self, request: _Request) -> np.ndarray:
        if request.latents is not None:
            latents = request.latents
        else:
            latents = self.draw_noise(request.seed, request.num_images, request.height, request.width)
        return (latents * np.float32(self.scheduler.init_noise_sigma)).astype(np.float32)  # (BN, C, H/f, W/f)

    def _denoise(self, request: _Request, context: np.ndarray, latents: np.ndarray, timings: dict[str, float],
                 callback_on_step_end: StepEndCallback | None = None) -> np.ndarray:
        state = request.schedule
        guided = request.do_classifier_free_guidance
        for step_index, timestep in enumerate(tqdm(state.timesteps, **{"desc": "denoise", **self._progress_bar_config})):
            # Same batch order as the context: [uncond; cond].
            model_input = np.concatenate([latents, latents]) if guided else latents  # (2BN or BN, C, h, w)
            model_input = self.scheduler.scale_model_input(state, model_input, step_index)
            timesteps = np.full(len(model_input), timestep, dtype=np.float32)  # (2BN,)
            with _timed(timings, "unet"):
                noise_pred = self.backend.run(
                    Component.UNET, {"sample": model_input, "timestep": timesteps, "encoder_hidden_states": context}
                )[0]  # (2BN or BN, C, h, w)
            if guided:
                noise_uncond, noise_text = np.split(noise_pred, 2)  # (BN, C, h, w) each
                noise_pred = noise_uncond + np.float32(request.guidance_scale) * (noise_text - noise_uncond)
            latents, state = self.scheduler.step(state, noise_pred, step_index, latents)
            if callback_on_step_end is not None:
                outputs = callback_on_step_end(self, step_index, float(timestep), {"latents": latents}) or {}
                latents = outputs.get("latents", latents)
        return latents

    def decode(self, latents: np.ndarray) -> np.ndarray:
        """VAE-decode latents to float32 (N, H, W, 3) images in [0, 1]."""
        scaled = (latents / np.float32(self.manifest.model.vae_scaling_factor)).astype(np.float32)  # (N, C, h, w)
        decoded = self.backend.run(Component.VAE_DECODER, {"latent_sample": scaled})[0]  # (N, 3, H, W)
        return decoded_to_unit_range(decoded)

    def __call__(
        self,
        prompt: str | Sequence[str],
        negative_prompt: str | Sequence[str] | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        num_images_per_prompt: int = 1,
        height: int | None = None,
        width: int | None = None,
        seed: int | None = None,
        latents: np.ndarray | None = None,
        output_type: OutputType = "pil",
        return_safety_scores: bool = False,
        callback_on_step_end: StepEndCallback | None = None,
    ) -> PipelineOutput:
        """Generate images for `prompt`, with diffusers' argument meanings and defaults.

        `latents`, if given, is the initial noise (float32, shape (len(prompts) * num_images_per_prompt,
        latent_channels, height / f, width / f)); otherwise it is drawn from numpy's Generator seeded with `seed`.
        `return_safety_scores=True` adds each image's concept scores to the output, to audit the checker's decisions.
        `callback_on_step_end(pipe, step_index, timestep, {"latents": latents})` runs after each denoising step, as in
        diffusers (only "latents" is passed); an exception it raises, such as GenerationCancelled, ends the call there.
        Raises InvalidArgumentError (a ValueError) naming the first bad argument and its allowed range.
        """
        if callback_on_step_end is not None and not callable(callback_on_step_end):
            raise InvalidArgumentError("callback_on_step_end", f"must be callable or None, got {type(callback_on_step_end).__name__}")
        request = self._validate(prompt, negative_prompt, num_inference_steps, guidance_scale, num_images_per_prompt,
                                 height, width, seed, latents, output_type)
        timings: dict[str, float] = {}
        context = self._text_context(request, timings)
        with _timed(timings, "denoise"):
            latents = self._denoise(request, context, self._initial_latents(request), timings, callback_on_step_end)
        timings["guidance_and_scheduler"] = timings["denoise"] - timings["unet"]
        timings["unet_calls"] = len(request.schedule.timesteps)
        if request.output_type == "latent":
            # As diffusers: latents are not images, so nothing is checked.
            return PipelineOutput(images=latents, nsfw_content_detected=None, backend=self.backend.name, timings=timings)
        with _timed(timings, "decode"):
            images = self.decode(latents)  # (N, H, W, 3)
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
            safety_scores=scores if return_safety_scores else None,
            timings=timings,
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


@contextlib.contextmanager
def _timed(timings: dict[str, float], stage: str):
    """Add the block's wall time to `timings[stage]` (stages such as the U-Net accumulate over calls)."""
    start = time.perf_counter()
    yield
    timings[stage] = timings.get(stage, 0.0) + time.perf_counter() - start
