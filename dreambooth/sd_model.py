"""Loading a Stable Diffusion base model (diffusers format) from a local directory.

This is the one place that loads a base model (what is checked before: dreambooth.model_files). Real runs point
it at e.g. SD 1.5 saved with
`save_pretrained`; tests point it at the tiny random model from `dreambooth.tiny_model`. Nothing here
touches the network: every `from_pretrained` call passes `local_files_only=True`.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
from transformers.tokenization_utils_base import VERY_LARGE_INTEGER
from transformers.utils import logging as transformers_logging

from dreambooth.errors import InputError
from dreambooth.model_files import REQUIRED_COMPONENTS, check_base_model, pipeline_scheduler, weights_variant


@dataclass
class BaseModel:
    """The pieces of a base model; a component that was not requested is None."""

    tokenizer: CLIPTokenizer | None
    text_encoder: CLIPTextModel | None
    vae: AutoencoderKL | None
    unet: UNet2DConditionModel | None
    noise_scheduler: DDPMScheduler | None  # the training scheduler, built from the model's scheduler config


def load_base_model(
    path: str | os.PathLike,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    components: tuple[str, ...] | list[str] = REQUIRED_COMPONENTS,
) -> BaseModel:
    """Loads the requested components of the base model at `path` (checked first) onto `device`."""
    unknown = set(components) - set(REQUIRED_COMPONENTS)
    if unknown:
        raise ValueError(f"unknown components {sorted(unknown)}; choose from {REQUIRED_COMPONENTS}")
    root = check_base_model(path)
    model = BaseModel(tokenizer=None, text_encoder=None, vae=None, unet=None, noise_scheduler=None)

    if "tokenizer" in components:
        model.tokenizer = CLIPTokenizer.from_pretrained(root, subfolder="tokenizer", local_files_only=True)
        _check_prompt_length_limit(root, model.tokenizer)
    if "text_encoder" in components:
        # transformers 5 names the dtype argument `dtype` (`torch_dtype` is deprecated there).
        with _without_transformers_bars():
            text_encoder = CLIPTextModel.from_pretrained(
                root,
                subfolder="text_encoder",
                local_files_only=True,
                dtype=dtype,
                variant=weights_variant(root / "text_encoder", "text_encoder"),
            )
        model.text_encoder = text_encoder.to(device)
    for name, cls in (("vae", AutoencoderKL), ("unet", UNet2DConditionModel)):
        if name in components:
            module = cls.from_pretrained(
                root,
                subfolder=name,
                local_files_only=True,
                torch_dtype=dtype,
                variant=weights_variant(root / name, name),
            )
            setattr(model, name, module.to(device))
    if "scheduler" in components:
        # Training always uses DDPM noise; SD 1.5 ships a PNDM config, whose betas DDPM reads the same way.
        model.noise_scheduler = DDPMScheduler.from_pretrained(root, subfolder="scheduler", local_files_only=True)
    return model


def _check_prompt_length_limit(root: Path, tokenizer: CLIPTokenizer) -> None:
    """Refuses a tokenizer whose model_max_length the text encoder cannot take: prompts are checked against it and
    padded to it (training, class images, serving). Unset, transformers takes 1e30, and every padding raised
    OverflowError; above max_position_embeddings, a prompt it let through made the text encoder raise."""
    positions = CLIPTextConfig.from_pretrained(
        root, subfolder="text_encoder", local_files_only=True
    ).max_position_embeddings
    limit = tokenizer.model_max_length
    if isinstance(limit, int) and not isinstance(limit, bool) and 0 < limit <= positions:
        return
    unset = " (what transformers takes where it is unset)" if limit == VERY_LARGE_INTEGER else ""
    raise InputError(
        "base_model",
        f"{str(root)!r}: tokenizer/tokenizer_config.json's model_max_length is {limit!r}{unset}, but its text "
        f"encoder takes at most {positions} tokens (max_position_embeddings in text_encoder/config.json); set "
        f"model_max_length to {positions}",
    )


def check_prompt(tokenizer: CLIPTokenizer, name: str, text: str) -> None:
    """Refuses a prompt longer than the text encoder's context (the tokenizer's model_max_length, which
    load_base_model has checked against it): the tokenizer would cut it silently, and what it cut (the identifier
    at a long prompt's end, say) would never reach the model."""
    tokens = len(tokenizer(text, truncation=False).input_ids)
    limit = tokenizer.model_max_length
    if tokens > limit:
        raise InputError(name, f"{tokens} tokens; at most {limit} (including start/end tokens), shorten it")


def load_pipeline(
    path: str | os.PathLike,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    unet: UNet2DConditionModel | None = None,
    text_encoder: CLIPTextModel | None = None,
    vae: AutoencoderKL | None = None,
) -> StableDiffusionPipeline:
    """A StableDiffusionPipeline for sampling (class images, validation images), no safety checker.

    `unet` / `text_encoder` / `vae` replace the stored ones (e.g. the modules being trained, or ones already
    loaded); they are used as given, and moved to `device` by the pipeline's `.to()` (a no-op when they are
    already there).
    """
    overrides = {"unet": unet, "text_encoder": text_encoder, "vae": vae}
    wanted = ("unet", "vae", "text_encoder", "tokenizer")
    needed = [name for name in wanted if overrides.get(name) is None]
    root = check_base_model(path)
    base = load_base_model(root, dtype=dtype, device=device, components=needed)
    modules = {name: getattr(base, name) for name in needed}
    modules.update({name: module for name, module in overrides.items() if module is not None})
    # Made from its parts, not with from_pretrained: that reads every entry of model_index.json, and a model whose file
    # names a component set to null (a safety checker taken out by hand) or one it does not have (an image_encoder)
    # failed there, after training, at the export. The scheduler is the one model_index.json names (PNDM for SD 1.5,
    # DDPM for the tiny model), as the pipeline's constructor would set it up.
    pipe = StableDiffusionPipeline(
        **modules,
        scheduler=pipeline_scheduler(root),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def save_pipeline(pipe: StableDiffusionPipeline, directory: Path) -> None:
    """Writes `pipe` in diffusers format (safetensors) into `directory`."""
    with _without_transformers_bars():
        pipe.save_pretrained(directory, safe_serialization=True)


@contextlib.contextmanager
def _without_transformers_bars() -> Iterator[None]:
    """transformers' progress bars for the text encoder's weights ("Loading weights", "Writing model shards") drew
    frames into job, demo and replica logs, where this project tells its own progress. The setting is global: loads at
    once (a replica's) keep it off until the last ends, which restores what a library user had set."""
    global _bars_held, _bars_were_on
    with _bars_lock:
        if _bars_held == 0:
            _bars_were_on = transformers_logging.is_progress_bar_enabled()
            transformers_logging.disable_progress_bar()
        _bars_held += 1
    try:
        yield
    finally:
        with _bars_lock:
            _bars_held -= 1
            if _bars_held == 0 and _bars_were_on:
                transformers_logging.enable_progress_bar()


_bars_lock = threading.Lock()
_bars_held = 0  # loads and saves in progress, with the bars off
_bars_were_on = False
