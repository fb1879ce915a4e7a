"""SDXL's U-Net conditioning, as diffusers' StableDiffusionXLPipeline builds it.

    encoder_hidden_states  (B, 77, D1 + D2)  both text encoders' penultimate hidden states, concatenated
    text_embeds            (B, P)            the second encoder's projected pooled embedding
    time_ids               (B, 6)            original size (h, w), crop's top left (top, left), target size (h, w)

The refiner (requires_aesthetics_score), as StableDiffusionXLImg2ImgPipeline builds it: its context is the second
encoder's hidden states alone (B, 77, D2), and its time_ids (B, 5) end with an aesthetic score in place of the
target size (AestheticConditions).

Each prompt is tokenized by both tokenizers (the second pads with "!", id 0). Under classifier-free guidance the
unconditional half is the negative prompt's; without one it is zeros when the pipeline's config says
force_zeros_for_empty_prompt (SDXL base does), else the empty prompt's. Its size conditions are the negative_*
ones where both negative sizes are given, else the same as the prompts'. One difference from diffusers: its
time_ids rows alternate negative, positive over the guided batch ((2, 6) tiled), which matches the [uncond; cond]
layout only for one image; ours follow the layout (sdrt.engine.guidance_batch), so several images with negative
sizes are each conditioned as a single image would be.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from sdrt.engine import guidance_batch
from sdrt.engine.backends import Backend
from sdrt.engine.checks import is_finite_number, is_int
from sdrt.engine.errors import InvalidArgumentError
from sdrt.engine.prompts import PromptOptions, TokenizedPrompt, emphasize, tokenize_prompt
from sdrt.engine.specs import Component
from sdrt.engine.tokenizer import CLIPTokenizer

Size = tuple[int, int]


@dataclasses.dataclass(frozen=True)
class SizeConditions:
    """SDXL's size ("micro") conditions of a request, diffusers' arguments resolved: sizes (height, width) in
    pixels, the crop's (top, left) offset."""

    original_size: Size
    crops_coords_top_left: Size
    target_size: Size
    # the unconditional half's (original, crop, target); None: the same as the prompts'
    negative: tuple[Size, Size, Size] | None = None

    @classmethod
    def create(cls, height: int, width: int, original_size: Any = None, crops_coords_top_left: Any = None,
               target_size: Any = None, negative_original_size: Any = None, negative_crops_coords_top_left: Any = None,
               negative_target_size: Any = None) -> SizeConditions:
        """Check and resolve the arguments, with diffusers' defaults: original and target size (height, width), crop
        (0, 0); negative ones only where both negative sizes are given (diffusers ignores one alone: we refuse it).
        Raise InvalidArgumentError naming the first bad one."""
        negative = None
        if (negative_original_size is None) != (negative_target_size is None):
            given = "negative_original_size" if negative_original_size is not None else "negative_target_size"
            raise InvalidArgumentError(given, "needs negative_original_size and negative_target_size both (as diffusers "
                                       "uses them): give the other too")
        if negative_original_size is not None:
            negative = (_pair("negative_original_size", negative_original_size, 1),
                        _pair("negative_crops_coords_top_left", _default(negative_crops_coords_top_left, (0, 0)), 0),
                        _pair("negative_target_size", negative_target_size, 1))
        elif negative_crops_coords_top_left is not None:
            raise InvalidArgumentError("negative_crops_coords_top_left", "applies only with negative_original_size and "
                                       "negative_target_size")
        return cls(
            original_size=_pair("original_size", _default(original_size, (height, width)), 1),
            crops_coords_top_left=_pair("crops_coords_top_left", _default(crops_coords_top_left, (0, 0)), 0),
            target_size=_pair("target_size", _default(target_size, (height, width)), 1),
            negative=negative,
        )

    def time_ids(self, rows: int, guided: bool) -> np.ndarray:
        """The U-Net's `time_ids` for `rows` images: (2 * rows or rows, 6) float32, in the guided batch's layout."""
        cond = np.array([*self.original_size, *self.crops_coords_top_left, *self.target_size], dtype=np.float32)  # (6,)
        uncond = np.array([v for pair in self.negative for v in pair], dtype=np.float32) if self.negative else cond  # (6,)
        cond, uncond = np.tile(cond, (rows, 1)), np.tile(uncond, (rows, 1))  # (BN, 6) each
        return guidance_batch.batch(uncond, cond) if guided else cond  # (2BN or BN, 6)


#: StableDiffusionXLImg2ImgPipeline's defaults: the score the prompts' half is conditioned on, and the unconditional half's
AESTHETIC_SCORE = 6.0
NEGATIVE_AESTHETIC_SCORE = 2.5


@dataclasses.dataclass(frozen=True)
class AestheticConditions:
    """The SDXL refiner's micro-conditions (a U-Net whose checkpoint requires_aesthetics_score), as diffusers'
    StableDiffusionXLImg2ImgPipeline resolves them: the prompts' half (original_size, crops_coords_top_left,
    aesthetic_score); the unconditional half's negative_original_size (default: original_size),
    negative_crops_coords_top_left (default (0, 0), not the prompts' crop, as diffusers) and negative_aesthetic_score.
    The refiner has no target size: target_size and negative_target_size are refused."""

    original_size: Size
    crops_coords_top_left: Size
    aesthetic_score: float
    negative_original_size: Size
    negative_crops_coords_top_left: Size
    negative_aesthetic_score: float

    @classmethod
    def create(cls, height: int, width: int, original_size: Any = None, crops_coords_top_left: Any = None,
               target_size: Any = None, negative_original_size: Any = None, negative_crops_coords_top_left: Any = None,
               negative_target_size: Any = None, aesthetic_score: Any = None,
               negative_aesthetic_score: Any = None) -> AestheticConditions:
        """Check and resolve the arguments with diffusers' defaults (aesthetic scores 6 and 2.5); raise
        InvalidArgumentError naming the first bad one."""
        for name, value in (("target_size", target_size), ("negative_target_size", negative_target_size)):
            if value is not None:
                raise InvalidArgumentError(name, "does not apply to an SDXL refiner: its U-Net is conditioned on an "
                                           "aesthetic score in place of the target size (aesthetic_score, "
                                           "negative_aesthetic_score)")
        original = _pair("original_size", _default(original_size, (height, width)), 1)
        return cls(
            original_size=original,
            crops_coords_top_left=_pair("crops_coords_top_left", _default(crops_coords_top_left, (0, 0)), 0),
            aesthetic_score=_score("aesthetic_score", _default(aesthetic_score, AESTHETIC_SCORE)),
            negative_original_size=_pair("negative_original_size", _default(negative_original_size, original), 1),
            negative_crops_coords_top_left=_pair("negative_crops_coords_top_left",
                                                 _default(negative_crops_coords_top_left, (0, 0)), 0),
            negative_aesthetic_score=_score("negative_aesthetic_score",
                                            _default(negative_aesthetic_score, NEGATIVE_AESTHETIC_SCORE)),
        )

    def time_ids(self, rows: int, guided: bool) -> np.ndarray:
        """The U-Net's `time_ids` for `rows` images: (2 * rows or rows, 5) float32, in the guided batch's layout."""
        cond = np.array([*self.original_size, *self.crops_coords_top_left, self.aesthetic_score], dtype=np.float32)  # (5,)
        uncond = np.array([*self.negative_original_size, *self.negative_crops_coords_top_left, self.negative_aesthetic_score],
                          dtype=np.float32)  # (5,)
        cond, uncond = np.tile(cond, (rows, 1)), np.tile(uncond, (rows, 1))  # (BN, 5) each
        return guidance_batch.batch(uncond, cond) if guided else cond  # (2BN or BN, 5)


def _score(name: str, value: Any) -> float:
    if not is_finite_number(value):
        raise InvalidArgumentError(name, f"must be a finite number (the refiner was trained on scores of 0 to 10; "
                                   f"diffusers' defaults are {AESTHETIC_SCORE} and {NEGATIVE_AESTHETIC_SCORE}), "
                                   f"got {value!r:.80}")
    return float(value)


def _default(value: Any, default: Any) -> Any:
    return default if value is None else value


def _pair(name: str, value: Any, minimum: int) -> Size:
    if (not isinstance(value, Sequence) or isinstance(value, str) or len(value) != 2
            or not all(is_int(v) and v >= minimum for v in value)):
        raise InvalidArgumentError(name, f"must be a pair of integers >= {minimum} (height, width; top, left for crops), "
                                   f"got {value!r:.80}")
    return int(value[0]), int(value[1])


@dataclasses.dataclass(frozen=True)
class SdxlTokens:
    """The prompts' ids for each tokenizer (one 77-token window each), and the negative prompts' or None."""

    prompts: tuple[list[TokenizedPrompt], ...]
    negative_prompts: tuple[list[TokenizedPrompt], ...] | None


class SdxlTextEncoders:
    """The text encoders of an SDXL bundle (both, or a refiner's second alone), run on a backend, giving the U-Net's
    conditioning inputs."""

    def __init__(self, backend: Backend, tokenizer: CLIPTokenizer | None, tokenizer_2: CLIPTokenizer,
                 penultimate_output: int | None, force_zeros_for_empty_prompt: bool) -> None:
        """`tokenizer`: the first encoder's, None for a refiner (which has the second only). `penultimate_output`:
        the index of `penultimate_hidden_state` among the first encoder's outputs (None without one)."""
        self.backend = backend
        self.tokenizers = (tokenizer, tokenizer_2) if tokenizer is not None else (tokenizer_2,)
        self.penultimate_output = penultimate_output
        self.force_zeros_for_empty_prompt = force_zeros_for_empty_prompt

    def tokenize(self, prompts: Sequence[str], negative_prompts: Sequence[str] | None, guided: bool,
                 options: PromptOptions) -> SdxlTokens:
        """Both tokenizers' ids. Without a negative prompt, the unconditional half is zeros (force_zeros_for_empty_prompt)
        or the empty prompt's, as diffusers. Raise InvalidArgumentError for a weight the prompt syntax cannot use."""
        if guided and negative_prompts is None and not self.force_zeros_for_empty_prompt:
            negative_prompts = [""] * len(prompts)
        return SdxlTokens(self._tokenize("prompt", prompts, options),
                          self._tokenize("negative_prompt", negative_prompts, options) if guided and negative_prompts else None)

    def _tokenize(self, parameter: str, prompts: Sequence[str], options: PromptOptions) -> tuple[list[TokenizedPrompt], ...]:
        try:
            return tuple([tokenize_prompt(tokenizer, p, options) for p in prompts] for tokenizer in self.tokenizers)
        except ValueError as exc:  # a weight the prompt syntax cannot use
            raise InvalidArgumentError(parameter, str(exc)) from None

    def unet_inputs(self, tokens: SdxlTokens, num_images_per_prompt: int, guided: bool,
                    sizes: SizeConditions | AestheticConditions) -> dict[str, np.ndarray]:
        """encoder_hidden_states, text_embeds and time_ids for the U-Net's (guided) batch, each prompt's rows
        repeated per image, adjacent."""
        context, pooled = self._encode(*tokens.prompts)  # (B, L, D1 + D2), (B, P)
        if guided:
            if tokens.negative_prompts is None:  # force_zeros_for_empty_prompt
                uncond_context, uncond_pooled = np.zeros_like(context), np.zeros_like(pooled)
            else:
                uncond_context, uncond_pooled = self._encode(*tokens.negative_prompts)
            context = guidance_batch.batch(uncond_context, context)  # (2B, L, D1 + D2)
            pooled = guidance_batch.batch(uncond_pooled, pooled)  # (2B, P)
        rows = len(tokens.prompts[0]) * num_images_per_prompt
        return {
            "encoder_hidden_states": np.repeat(context, num_images_per_prompt, axis=0),  # ((2)BN, L, D1 + D2)
            "text_embeds": np.repeat(pooled, num_images_per_prompt, axis=0),  # ((2)BN, P)
            "time_ids": sizes.time_ids(rows, guided),  # ((2)BN, 6 or a refiner's 5)
        }

    def _encode(self, *tokenized: list[TokenizedPrompt]) -> tuple[np.ndarray, np.ndarray]:
        """The encoders on B prompts (one window each): the concatenated, weighted penultimate hidden states
        (B, L, D1 + D2; a refiner's (B, L, D2)) and the second encoder's pooled embedding (B, P)."""
        ids = [np.concatenate([t.input_ids for t in prompts]).astype(np.int32) for prompts in tokenized]  # (B, L) each
        hidden_states = []
        if len(tokenized) == 2:
            first = self.backend.run(Component.TEXT_ENCODER, {"input_ids": ids[0]})
            hidden_states.append(first[self.penultimate_output])  # (B, L, D1)
        hidden_2, pooled = self.backend.run(Component.TEXT_ENCODER_2, {"input_ids": ids[-1]})  # (B, L, D2), (B, P)
        hidden_states.append(hidden_2)
        weighted = [np.stack([emphasize(h[None], t.weights)[0] for h, t in zip(hidden, prompts)])  # (B, L, D) each
                    for hidden, prompts in zip(hidden_states, tokenized)]
        return np.concatenate(weighted, axis=-1), pooled  # (B, L, D1 + D2 or D2), (B, P)
