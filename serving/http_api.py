"""The HTTP contract of the serving API: request and response bodies, bounds checks, image encoding.

Pure functions and pydantic models, so the ingress handlers stay thin and this is testable without Serve.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import secrets
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from dreambooth.errors import InputError
from serving.config import RequestLimits
from serving.engine import GenerationRequest, GenerationResult

MAX_SEED = 2**63 - 1


class GenerateBody(BaseModel):
    """POST /v1/models/{model_id}/generate."""

    # A misspelt field ("num_image") is a 422 naming it, not a request quietly served with the default.
    # Strict: JSON's true is not 1 step, nor "2" 2 images (422s naming the field, as for a wrong type).
    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: str = Field(
        description='What to draw; use the subject\'s identifier, e.g. "a photo of sks dog on a beach".'
    )
    negative_prompt: str = Field("", description="What to steer away from.")
    num_images: int = Field(1, description="Images to generate; image i uses seed + i.")
    steps: int = Field(25, description="Denoising steps.")
    guidance_scale: float = Field(
        7.5,
        description="Classifier-free guidance scale; up to 1: none (the prompt alone, its negative prompt unused, half "
        "the work), as in diffusers.",
    )
    seed: int | None = Field(None, description="Makes the result reproducible; omitted: chosen and returned.")
    width: int | None = Field(None, description="Pixels, a multiple of 8; default: the model's training resolution.")
    height: int | None = Field(None, description="Pixels, a multiple of 8; default: the model's training resolution.")
    output_format: Literal["png", "json"] = Field(
        "png", description="png: the image itself (one image only); json: base64 PNGs and metadata."
    )


class GeneratedImage(BaseModel):
    seed: int
    png_base64: str


class GenerateResponse(BaseModel):
    model_id: str
    images: list[GeneratedImage]
    batch_size: int = Field(description="The most requests that shared one of this request's UNet forwards.")
    queue_wait_s: float = Field(description="Seconds in the replica before its first denoising step.")
    inference_s: float = Field(description="Seconds from its first denoising step to its images.")
    compiled_unet: bool = Field(description="It ran the UNet compiled by torch.compile (compile_unet).")


class ServedModel(BaseModel):
    """GET /v1/models/{model_id}: a deployed subject model."""

    model_id: str = Field(description="The model's id, as the controller names it.")
    endpoint: str = Field(description="Where to POST its generate requests.")
    model_class: str = Field(
        description='What the subject is: its class prompt\'s last word ("dog"), the model_class label of the '
        'metrics (there "other" past 50 distinct classes); "unknown" without a class prompt.'
    )
    class_prompt: str | None = Field(
        None, description='The prompt of the subject\'s class it was trained with ("a photo of dog"), if any.'
    )
    instance_prompt: str | None = Field(
        None, description='The prompt it was trained with, naming the subject ("a photo of sks dog").'
    )
    resolution: int = Field(description="Default width and height: the size the subject was trained at.")


class ModelPage(BaseModel):
    models: list[ServedModel] = Field(description="The caller's models, by id.")
    next_page_token: str = Field(
        description="Where the next page starts (GET /v1/models?page_token=...); empty after the last page."
    )


ErrorCode = Literal[
    "invalid_argument",  # 400, 422: fix the request
    "unauthenticated",  # 401
    "not_found",  # 404: no such model (or another tenant's), or no such path
    "method_not_allowed",  # 405
    "timeout",  # 408: the body came too slowly
    "too_large",  # 413: the body is over the cap, or the request alone outgrew the device's memory: make it smaller
    "throttled",  # 429: the tenant's max_requests_per_tenant; retry after Retry-After
    "overloaded",  # 503: the queue is full, or the request's batch outgrew the GPU; retry after Retry-After
    "model_unavailable",  # 503: its model cannot be loaded now, or is still being deployed; retry after Retry-After
    "unavailable",  # 503: its replica went away (Serve starts another); retry after Retry-After
    "error",  # any other status
]


class FieldProblem(BaseModel):
    field: str
    message: str


class ErrorBody(BaseModel):
    """The body of every error answer of the API."""

    detail: FieldProblem | list[dict[str, Any]] | str = Field(
        description="400: the field and what is wrong with it; 422: the body's problems, each with its type, loc "
        "and msg; otherwise a message."
    )
    code: ErrorCode = Field(description="Machine-readable: what went wrong, whatever the message says.")


def to_generation_request(body: GenerateBody, limits: RequestLimits, default_size: int) -> GenerationRequest:
    """Checks `body` against `limits`; raises InputError naming the field and the bound."""
    width = body.width if body.width is not None else default_size
    height = body.height if body.height is not None else default_size
    for name, text in (("prompt", body.prompt), ("negative_prompt", body.negative_prompt)):
        if len(text) > limits.max_prompt_chars:
            raise InputError(name, f"{len(text)} characters; at most {limits.max_prompt_chars}")
        try:  # JSON may escape half of a surrogate pair ("\ud83d": an emoji cut in two), which no tokenizer takes
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise InputError(name, f"not valid Unicode: an unpaired surrogate at character {e.start}") from e
    if not body.prompt.strip():
        raise InputError("prompt", "must not be empty")
    if not 1 <= body.num_images <= limits.max_images:
        raise InputError("num_images", f"must be 1..{limits.max_images}, got {body.num_images}")
    if body.output_format == "png" and body.num_images != 1:
        raise InputError("output_format", 'png returns one image; use "json" for several')
    if not 1 <= body.steps <= limits.max_steps:
        raise InputError("steps", f"must be 1..{limits.max_steps}, got {body.steps}")
    if not 0 <= body.guidance_scale <= limits.max_guidance_scale:
        raise InputError("guidance_scale", f"must be 0..{limits.max_guidance_scale}, got {body.guidance_scale}")
    for name, size, given in (("width", width, body.width), ("height", height, body.height)):
        if not limits.min_side <= size <= limits.max_side:
            default = "" if given is not None else f" (the model's resolution, the default: pass {name})"
            raise InputError(name, f"must be {limits.min_side}..{limits.max_side} pixels, got {size}{default}")
        if size % 8:
            raise InputError(name, f"must be a multiple of 8, got {size}")
    if body.seed is not None and not 0 <= body.seed <= MAX_SEED - limits.max_images:
        raise InputError("seed", f"must be 0..{MAX_SEED - limits.max_images}, got {body.seed}")
    seed = body.seed if body.seed is not None else secrets.randbelow(2**31)
    return GenerationRequest(
        prompt=body.prompt,
        negative_prompt=body.negative_prompt,
        num_images=body.num_images,
        steps=body.steps,
        guidance_scale=body.guidance_scale,
        seed=seed,
        width=width,
        height=height,
    )


@dataclass
class EncodedResult:
    """What a generator replica hands the ingress: a result whose images are PNG files. The replica encodes them
    (tens of ms per 512 px image), off its sampling thread and spread over the replicas, rather than the ingress's
    one event loop; PNG is also fewer bytes to ship than raw pixels."""

    result: GenerationResult  # its `images` emptied
    png: list[bytes]

    @classmethod
    def encode(cls, result: GenerationResult) -> EncodedResult:
        return cls(dataclasses.replace(result, images=[]), [png_bytes(image) for image in result.images])


def png_bytes(image) -> bytes:
    buffer = io.BytesIO()
    # Lossless at any level; level 1 encodes ~1.5x faster than the default 6 for ~10 % more bytes (512 px).
    image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def json_response(model_id: str, encoded: EncodedResult) -> GenerateResponse:
    result = encoded.result
    images = [
        GeneratedImage(seed=seed, png_base64=base64.b64encode(png).decode())
        for seed, png in zip(result.seeds, encoded.png, strict=True)
    ]
    return GenerateResponse(
        model_id=model_id,
        images=images,
        batch_size=result.batch_size,
        queue_wait_s=result.queue_wait_seconds,
        inference_s=result.inference_seconds,
        compiled_unet=result.compiled_unet,
    )
