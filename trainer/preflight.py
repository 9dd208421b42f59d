"""What can be checked of a job before anything starts: its fields, every photo, its base model's files.

Light to import (no Ray, no DeepSpeed), so that `dreambooth train` refuses bad input before loading the
training libraries.
"""

from __future__ import annotations

import json
from pathlib import Path

from dreambooth.errors import InputError
from dreambooth.model_files import check_base_model
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
