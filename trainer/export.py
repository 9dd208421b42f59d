"""Export: a finished run's ZeRO shards consolidated into a diffusers-format model directory.

The result is the base model with the trained UNet (and text encoder) swapped in, saved as fp32 safetensors,
plus metadata.json describing how it was made. It loads with
`StableDiffusionPipeline.from_pretrained(model_dir)` like any other Stable Diffusion model.

Without the base model's safety checker and feature extractor: serving never runs them, and SD 1.5's checker
would add 1.2 GB to every export. model_index.json names neither and requires_safety_checker is false, so a
pipeline loaded from the export filters nothing (no NSFW check, `nsfw_content_detected` None, no warning) where
the base model's did. To filter, pass it the base model's:

    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPImageProcessor

    StableDiffusionPipeline.from_pretrained(
        model_dir,
        safety_checker=StableDiffusionSafetyChecker.from_pretrained(base_model, subfolder="safety_checker"),
        feature_extractor=CLIPImageProcessor.from_pretrained(base_model, subfolder="feature_extractor"),
    )
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

import torch

from dreambooth.durable import sync_dir, sync_tree
from dreambooth.model_files import METADATA_FILE, ModelMetadata
from dreambooth.sd_model import load_base_model, load_pipeline, save_pipeline
from trainer.checkpoint import TAG
from trainer.flat_parameters import unflatten_state_dict
from trainer.spec import JobSpec
from trainer.storage import JobPaths


def consolidated_state_dict(checkpoint_dir: Path) -> dict[str, torch.Tensor]:
    """The fp32 weights of the trained module, gathered from every rank's ZeRO shards."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir), tag=TAG)


def export_model(spec: JobSpec, checkpoint_dir: Path, paths: JobPaths, metadata: ModelMetadata) -> Path:
    state = consolidated_state_dict(checkpoint_dir)
    components = ("unet", "text_encoder") if spec.train_text_encoder else ("unet",)
    trained = load_base_model(spec.base_model, dtype=torch.float32, components=components)
    for name in components:
        module = getattr(trained, name)
        prefix = f"{name}."
        own = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        module.load_state_dict(unflatten_state_dict(module, own), strict=True)
    # fp32 throughout: diffusers and transformers disagree on the default dtype when loading a half-precision
    # checkpoint (one keeps the stored dtype, the other upcasts), so a bf16/fp16 export would not sample with a
    # plain from_pretrained. Serving casts to fp16 on load.
    pipeline = load_pipeline(spec.base_model, unet=trained.unet, text_encoder=trained.text_encoder)

    def write(directory: Path) -> None:
        save_pipeline(pipeline, directory)
        (directory / METADATA_FILE).write_text(json.dumps(metadata.to_dict(), indent=2, default=str))

    return write_into_place(paths, write)


def write_into_place(paths: JobPaths, write: Callable[[Path], None]) -> Path:
    """The job's model directory, as `write(directory)` fills it. Written next to the destination, on disk (fsynced),
    and renamed into place; a model an earlier export left there is renamed aside first: the path holds a complete
    model or none, never half of one."""
    model_dir = paths.model_dir
    _clean_scratch(paths)
    partial = model_dir.with_name(f".{model_dir.name}.{uuid.uuid4().hex}.partial")
    try:
        write(partial)
        sync_tree(partial)
    except BaseException:  # a full disk, or the job stopped (SystemExit): a cancelled job has no export to come back
        shutil.rmtree(partial, ignore_errors=True)
        raise
    replaced = model_dir.with_name(f".{model_dir.name}.{uuid.uuid4().hex}.replaced")
    if model_dir.exists():
        os.replace(model_dir, replaced)
    os.replace(partial, model_dir)
    sync_dir(model_dir.parent)
    shutil.rmtree(replaced, ignore_errors=True)
    return model_dir


def _clean_scratch(paths: JobPaths) -> None:
    """Remove what an export of this job that crashed (SIGKILL, a lost node) left."""
    leftovers, model_dir = paths.model_scratch(), paths.model_dir
    replaced = [p for p in leftovers if p.name.endswith(".replaced")]
    if replaced and not model_dir.exists():
        # It crashed between its two renames: the model served until then is put back, in case this export fails.
        os.replace(replaced[0], model_dir)
        leftovers.remove(replaced[0])
    for leftover in leftovers:
        shutil.rmtree(leftover, ignore_errors=True)
