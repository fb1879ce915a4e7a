"""The HTTP API's request and response bodies: OpenAI's images API shape plus sdrt's generation parameters.

Only shape and bounds are checked here (so a bad request never reaches the queue); what depends on the model (sizes
the VAE can take, steps the scheduler can plan) is checked by the pipeline, whose InvalidArgumentError the app turns
into a 422 naming the same parameter.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

_SIZE = re.compile(r"^([1-9][0-9]{0,4})x([1-9][0-9]{0,4})$")
#: a prompt's characters beyond this are refused, not truncated: the tokenizer keeps 77 tokens anyway, and this bounds
#: its work (OpenAI's own bound for dall-e-3 is 4000)
MAX_PROMPT_CHARS = 4000
MAX_SEED = 2**63 - 1


@dataclasses.dataclass(frozen=True)
class Limits:
    """What one request may ask for; the server's configuration sets them (`sdrt serve --max-n ...`)."""

    max_n: int = 4
    max_steps: int = 150
    max_body_bytes: int = 64 * 1024


class ImageRequest(BaseModel):
    """`POST /v1/images/generations`. OpenAI's fields (prompt, n, size "WIDTHxHEIGHT", response_format, model, user)
    and sdrt's (negative_prompt, num_inference_steps, guidance_scale, seed, scheduler), with diffusers' defaults.
    Unknown fields are refused, so a misspelt parameter is named instead of silently ignored."""

    model_config = ConfigDict(extra="forbid", strict=False)

    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    n: int = Field(default=1, ge=1)
    size: str | None = Field(default=None, description='"WIDTHxHEIGHT" in pixels; default: the model\'s own size')
    response_format: Literal["b64_json"] = "b64_json"
    model: str | None = Field(default=None, max_length=256, description="accepted for OpenAI clients; one model is served")
    user: str | None = Field(default=None, max_length=256)
    negative_prompt: str | None = Field(default=None, max_length=MAX_PROMPT_CHARS)
    num_inference_steps: int = Field(default=50, ge=1)
    guidance_scale: float = Field(default=7.5, allow_inf_nan=False)
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED, description="drawn at random when omitted, and returned")
    scheduler: str | None = Field(default=None, max_length=32, description="a scheduler name; default: the bundle's")

    @field_validator("size")
    @classmethod
    def _size_format(cls, value: str | None) -> str | None:
        if value is not None and not _SIZE.match(value):
            raise ValueError('must be "WIDTHxHEIGHT", e.g. "512x512"')
        return value

    def width_height(self) -> tuple[int | None, int | None]:
        """(width, height) in pixels from `size`, or (None, None) for the model's default size."""
        if self.size is None:
            return None, None
        width, height = (int(side) for side in self.size.split("x"))
        return width, height


@dataclasses.dataclass(frozen=True)
class GenerationParams:
    """One validated request as the batcher and the pipeline see it (the seed is always set, so it can be returned)."""

    prompt: str
    negative_prompt: str | None
    n: int
    width: int
    height: int
    num_inference_steps: int
    guidance_scale: float
    seed: int
    scheduler: str | None

    @property
    def batch_key(self) -> tuple:
        """Requests with equal keys can share one U-Net batch: same latent size, same timesteps, same guidance."""
        return (self.width, self.height, self.num_inference_steps, self.scheduler, self.guidance_scale)


class ImageData(BaseModel):
    """One image: a base64 PNG, or None when the safety checker blocked it (`nsfw_content_detected` true)."""

    b64_json: str | None
    nsfw_content_detected: bool | None = None
    seed: int


class ImageResponse(BaseModel):
    created: int
    data: list[ImageData]


class ErrorBody(BaseModel):
    """Every error answer: `{"error": {"message", "type", "param"}}`, as OpenAI's API writes them."""

    message: str
    type: str
    param: str | None = None
