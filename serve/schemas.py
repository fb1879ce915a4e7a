"""The HTTP API's request and response bodies: OpenAI's images API shape plus sdrt's generation parameters.

Only shape and bounds are checked here (so a bad request never reaches the queue); what depends on the model (sizes
the VAE can take, steps the scheduler can plan) is checked by the pipeline, whose InvalidArgumentError the app turns
into a 422 naming the same parameter.
"""
from __future__ import annotations

import dataclasses
import enum
import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_core import PydanticCustomError

_SIZE = re.compile(r"([1-9][0-9]{0,4})x([1-9][0-9]{0,4})")  # matched whole (fullmatch): "64x64\n" is refused
#: a prompt's characters beyond this are refused, not truncated: the tokenizer keeps 77 tokens anyway, and this bounds
#: its work (OpenAI's own bound for dall-e-3 is 4000)
MAX_PROMPT_CHARS = 4000
MAX_SEED = 2**63 - 1
#: guidance_scale's bounds. At most 1 the pipeline runs the conditional pass alone (diffusers' rule), so every value
#: up to 1 gives the same images and a negative one adds nothing; 30 is the top of the range common front-ends offer.
MIN_GUIDANCE_SCALE, MAX_GUIDANCE_SCALE = 0.0, 30.0


class ImageFormat(str, enum.Enum):
    """How images are encoded (OpenAI's `output_format`)."""

    PNG = "png"
    JPEG = "jpeg"
    WEBP = "webp"


@dataclasses.dataclass(frozen=True)
class ImageEncoding:
    """`quality`: the jpeg/webp encoder's quality, 0-100 (OpenAI's `output_compression`, whose default 100 is the
    least compression); PNG is lossless and ignores it."""

    format: ImageFormat = ImageFormat.PNG
    quality: int = 100


@dataclasses.dataclass(frozen=True)
class Limits:
    """What one request may ask for; the server's configuration sets them (`sdrt serve --max-n ...`)."""

    max_n: int = 4
    max_steps: int = 150
    max_body_bytes: int = 64 * 1024


class ImageRequest(BaseModel):
    """`POST /v1/images/generations`. OpenAI's fields and sdrt's (negative_prompt, num_inference_steps, guidance_scale,
    seed, scheduler, deepcache_interval), with diffusers' defaults. Types are strict (`n: true`, `n: "2"` are refused, not coerced), and
    unknown fields are refused, so a misspelt parameter is named instead of silently ignored.

    Of OpenAI's fields, `prompt`, `n`, `size` and `output_format`/`output_compression` are honoured; `model`, `user`,
    `quality`, `style` and `moderation` are accepted and ignored (one model is served, its steps are
    `num_inference_steps`, moderation is the server's --safety-checker); `background` may be "auto" or "opaque" (the
    images have no alpha); `response_format` must be "b64_json" (no image is stored to serve by URL)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    n: int = Field(default=1, ge=1)
    size: str | None = Field(default=None, description='"WIDTHxHEIGHT" in pixels; default or "auto": the model\'s size')
    response_format: str = "b64_json"
    output_format: Literal["png", "jpeg", "webp"] = "png"
    output_compression: int | None = Field(default=None, ge=0, le=100, description="jpeg/webp quality; default 100")
    model: str | None = Field(default=None, max_length=256, description="accepted for OpenAI clients; one model is served")
    user: str | None = Field(default=None, max_length=256)
    quality: Literal["auto", "standard", "hd", "low", "medium", "high"] | None = None
    style: Literal["vivid", "natural"] | None = None
    background: Literal["auto", "transparent", "opaque"] | None = None
    moderation: Literal["auto", "low"] | None = None
    negative_prompt: str | None = Field(default=None, max_length=MAX_PROMPT_CHARS)
    num_inference_steps: int | None = Field(default=None, ge=1, description="default: the bundle's (50; Turbo 1, LCM 4)")
    guidance_scale: float | None = Field(default=None, ge=MIN_GUIDANCE_SCALE, le=MAX_GUIDANCE_SCALE, allow_inf_nan=False,
                                         description="default: the bundle's (7.5; Turbo 0)")
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED, description="drawn at random when omitted, and returned")
    scheduler: str | None = Field(default=None, max_length=32, description="a scheduler name; default: the bundle's")
    decoder: Literal["full", "tiny"] = Field(default="full", description="the VAE, or the tiny autoencoder of a bundle "
                                             "exported with --tiny-vae")
    deepcache_interval: int | None = Field(default=None, ge=1, description=(
        "DeepCache: a full U-Net pass every this many calls, shallow ones between (bundles exported with "
        "--deepcache-branch; faster, less exact); default: off"))

    @field_validator("size")
    @classmethod
    def _size_format(cls, value: str | None) -> str | None:
        if value is not None and value != "auto" and not _SIZE.fullmatch(value):
            raise ValueError('must be "WIDTHxHEIGHT", e.g. "512x512", or "auto"')
        return value

    @field_validator("response_format")
    @classmethod
    def _inline_only(cls, value: str) -> str:
        if value != "b64_json":
            raise PydanticCustomError("unsupported_value", "only 'b64_json' is supported: images are returned in the "
                                      f"answer and none is stored to be served by URL; got {value!r}")
        return value

    @field_validator("background")
    @classmethod
    def _opaque_only(cls, value: str | None) -> str | None:
        if value == "transparent":
            raise PydanticCustomError("unsupported_value", "'transparent' is not supported: the model draws opaque "
                                      "images; use 'auto' or 'opaque'")
        return value

    def width_height(self) -> tuple[int | None, int | None]:
        """(width, height) in pixels from `size`, or (None, None) for the model's default size."""
        if self.size is None or self.size == "auto":
            return None, None
        width, height = (int(side) for side in self.size.split("x"))
        return width, height

    def encoding(self) -> ImageEncoding:
        """How to encode the images: output_format, output_compression (default 100)."""
        return ImageEncoding(ImageFormat(self.output_format),
                             100 if self.output_compression is None else self.output_compression)


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
    deepcache_interval: int | None = None  # None: DeepCache off
    encoding: ImageEncoding = ImageEncoding()  # of each image, after generation: no part of the batch key
    decoder: str = "full"  # "full" or "tiny": part of the batch key, as one decoder decodes the batch

    @property
    def batch_key(self) -> tuple:
        """Requests with equal keys can share one U-Net batch: same latent size, same timesteps, same guidance, same
        DeepCache schedule, same decoder."""
        return (self.width, self.height, self.num_inference_steps, self.scheduler, self.guidance_scale, self.deepcache_interval,
                self.decoder)


class ImageData(BaseModel):
    """One image: base64 in the request's output_format, or None when the safety checker blocked it
    (`nsfw_content_detected` true)."""

    b64_json: str | None
    nsfw_content_detected: bool | None = None
    seed: int


class ImageResponse(BaseModel):
    created: int
    data: list[ImageData]
    output_format: Literal["png", "jpeg", "webp"]
    size: str  # "WIDTHxHEIGHT" of the images, the model's default size included


class ErrorBody(BaseModel):
    """Every error answer's "error": `{"error": {"message", "type", "param", "code"}}`, as OpenAI's API writes them.
    `type`: "invalid_request_error" (4xx) or "server_error" (5xx); `code`: the rejection's reason, as counted in
    sdrt_requests_rejected_total (None for 404 and 405)."""

    message: str
    type: str
    param: str | None = None
    code: str | None = None
