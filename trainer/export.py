"""Export: a finished run's ZeRO shards consolidated into a diffusers-format model directory.

The result is the base model with the trained UNet (and text encoder) swapped in, saved as fp32 safetensors,
plus metadata.json describing how it was made. It loads with
`StableDiffusionPipeline.from_pretrained(model_dir)` like any other Stable Diffusion model.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch

from dreambooth.durable import sync_dir, sync_tree
from dreambooth.sd_model import load_base_model, load_pipeline
from trainer.checkpoint import TAG
from trainer.flat_parameters import unflatten_state_dict
from trainer.spec import JobSpec

METADATA_FILE = "metadata.json"


def consolidated_state_dict(checkpoint_dir: Path) -> dict[str, torch.Tensor]:
    """The fp32 weights of the trained module, gathered from every rank's ZeRO shards."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if not torch.cuda.is_available() else "cuda")
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir), tag=TAG)


def export_model(spec: JobSpec, checkpoint_dir: Path, model_dir: Path, metadata: dict[str, Any]) -> Path:
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
    # Written next to the destination, on disk (fsynced), and renamed into place; a model an earlier export left
    # there is renamed aside first: the path holds a complete model or none, never half of one.
    _clean_scratch(model_dir)
    partial = model_dir.with_name(f".{model_dir.name}.{uuid.uuid4().hex}.partial")
    pipeline.save_pretrained(partial, safe_serialization=True)
    (partial / METADATA_FILE).write_text(json.dumps(metadata, indent=2, default=str))
    sync_tree(partial)
    replaced = model_dir.with_name(f".{model_dir.name}.{uuid.uuid4().hex}.replaced")
    if model_dir.exists():
        os.replace(model_dir, replaced)
    os.replace(partial, model_dir)
    sync_dir(model_dir.parent)
    shutil.rmtree(replaced, ignore_errors=True)
    return model_dir


def _clean_scratch(model_dir: Path) -> None:
    """Remove what an export of this job that crashed left. Scratch names start with a dot, which no job id (hence
    no model directory) does, so they cannot be another job's model; the pattern keeps job "<name>.x"'s apart."""
    scratch = re.compile(rf"\.{re.escape(model_dir.name)}\.[0-9a-f]{{32}}\.(partial|replaced)")
    leftovers = [p for p in model_dir.parent.glob(f".{model_dir.name}.*") if scratch.fullmatch(p.name)]
    replaced = [p for p in leftovers if p.name.endswith(".replaced")]
    if replaced and not model_dir.exists():
        # It crashed between its two renames: the model served until then is put back, in case this export fails.
        os.replace(replaced[0], model_dir)
        leftovers.remove(replaced[0])
    for leftover in leftovers:
        shutil.rmtree(leftover, ignore_errors=True)
