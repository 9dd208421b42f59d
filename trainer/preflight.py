"""What can be checked of a job before anything starts: its fields, every photo, its base model's files.

Light to import (no Ray, no DeepSpeed), so that `dreambooth train` refuses bad input before loading the
training libraries.
"""

from __future__ import annotations

import functools
import json
import threading
from pathlib import Path

from dreambooth.errors import InputError
from dreambooth.model_files import check_base_model, check_inference_steps, fingerprint, pipeline_scheduler
from trainer.images import check_instance_images
from trainer.spec import JobSpec

# What the UNet may predict: the noise, or v (SD 2.x 768 px models). The loss has no target for the others.
TRAINABLE_PREDICTION_TYPES = ("epsilon", "v_prediction")


def preflight(spec: JobSpec) -> None:
    """Everything that can be checked before a worker starts: fields, every image, the base model's files. The
    photos come before the base model, whose check builds its sampling scheduler (diffusers loads: seconds)."""
    spec.validate()
    check_instance_images(spec.instance_images, spec.resolution)
    check_trainable_base_model(spec.base_model)
    check_prompt_lengths(spec)
    check_sampling_steps(spec)


def check_trainable_base_model(path: str | Path) -> None:
    """check_base_model, and that training has a loss target for what its UNet predicts."""
    root = check_base_model(path)
    try:
        scheduler = json.loads((root / "scheduler" / "scheduler_config.json").read_text())
    except ValueError as e:
        raise InputError("base_model", f"{root}/scheduler/scheduler_config.json is not JSON: {e}") from e
    if (kind := scheduler.get("prediction_type", "epsilon")) not in TRAINABLE_PREDICTION_TYPES:
        raise InputError(
            "base_model", f"its scheduler's prediction_type is {kind!r}; training supports {TRAINABLE_PREDICTION_TYPES}"
        )
    if json.loads((root / "unet" / "config.json").read_text()).get("time_cond_proj_dim") is not None:
        # diffusers' pipeline feeds such a UNet the guidance scale as an embedding instead of guiding it; training,
        # its validation grids and serving guide it, leaving the embedding's layer out. Here, not in check_base_model:
        # serving loads the models exported before this check through that.
        raise InputError(
            "base_model",
            "its UNet takes the guidance scale as an input (time_cond_proj_dim: a guidance-distilled model, LCM's), "
            "which this project does not train: give the model it was distilled from",
        )


def check_prompt_lengths(spec: JobSpec) -> None:
    """Every prompt the job encodes fits its base model's text encoder whole (check_base_model came first)."""
    from dreambooth.sd_model import check_prompt

    root = Path(spec.base_model).resolve()
    try:
        tokenizer = _tokenizer(str(root), fingerprint(root / "tokenizer") + fingerprint(root / "text_encoder"))
    except (OSError, InputError):  # InputError: a model_max_length its text encoder cannot take, named so
        raise
    except Exception as e:  # whatever broken tokenizer files make transformers raise (KeyError, ValueError, ...)
        raise InputError("base_model", f"its tokenizer cannot be loaded: {type(e).__name__}: {e}") from e
    prompts = [("instance_prompt", spec.instance_prompt)]
    if spec.with_prior_preservation:
        prompts.append(("class_prompt", spec.class_prompt))
    prompts += [("validation_prompts", prompt) for prompt in spec.validation_prompts]
    # A fast tokenizer sets its truncation on its shared Rust object at each call, then encodes: the controller's
    # RPC threads take turns.
    with _tokenizing:
        for name, text in prompts:
            check_prompt(tokenizer, name, text)


_tokenizing = threading.Lock()


def check_sampling_steps(spec: JobSpec) -> None:
    """The base model's sampling scheduler, as the pipeline sets it up, takes the steps the job samples with
    (check_base_model came first): a count it refuses failed the job after training, at its final validation grid, or
    in every class-image actor."""
    scheduler = pipeline_scheduler(spec.base_model)
    if spec.with_prior_preservation:
        check_inference_steps(scheduler, spec.class_image_inference_steps, "class_image_inference_steps")
    if spec.validation_prompts:
        check_inference_steps(scheduler, spec.validation_inference_steps, "validation_inference_steps")


@functools.lru_cache(maxsize=8)
def _tokenizer(root: str, files: str):
    """The tokenizer at `root`, loaded once per version of its files and of the text encoder's it is checked against
    (`files`, their fingerprints): a controller checks every submission's prompts, mostly against the same few base
    models."""
    from dreambooth.sd_model import load_base_model

    return load_base_model(root, components=["tokenizer"]).tokenizer
