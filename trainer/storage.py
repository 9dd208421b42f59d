"""Where a job's files live: one root directory, shared by every node (a shared filesystem on a cluster).

    <root>/jobs/<job_id>/spec.json          the job spec as submitted
    <root>/jobs/<job_id>/events.jsonl       progress events (trainer -> CLI / controller)
    <root>/jobs/<job_id>/checkpoints/       the Ray Train run: sharded DeepSpeed checkpoints
    <root>/jobs/<job_id>/validation/        validation image grids
    <root>/jobs/<job_id>/tensorboard/       TensorBoard scalars
    <root>/models/<job_id>/                 the exported diffusers-format model + metadata.json
    <root>/cache/class_images/<key>/        class-prior images, shared by every job with the same key
    <root>/cache/torch_compile/             torch.compile's artefacts (inductor, Triton), shared by every job

Everything a job needs to resume lives here, so any node (and a restarted controller) can pick it up.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

_JOB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


def check_job_id(job_id: str) -> str:
    from dreambooth.errors import InputError

    if not _JOB_ID.fullmatch(job_id) or job_id in (".", ".."):
        raise InputError("job_id", f"{job_id!r}: use 1-128 letters, digits, '_', '.' or '-', starting alphanumeric")
    return job_id


@dataclass(frozen=True)
class JobPaths:
    root: Path
    job_id: str

    @property
    def job_dir(self) -> Path:
        return self.root / "jobs" / self.job_id

    @property
    def spec_file(self) -> Path:
        return self.job_dir / "spec.json"

    @property
    def photos_file(self) -> Path:
        """The content hashes of the instance images the job's checkpoints were trained on (trainer.run)."""
        return self.job_dir / "photos.json"

    @property
    def events_file(self) -> Path:
        return self.job_dir / "events.jsonl"

    @property
    def ray_run_name(self) -> str:
        # The Ray Train run directory is job_dir / ray_run_name.
        return "checkpoints"

    @property
    def checkpoints_dir(self) -> Path:
        return self.job_dir / self.ray_run_name

    @property
    def validation_dir(self) -> Path:
        return self.job_dir / "validation"

    @property
    def tensorboard_dir(self) -> Path:
        return self.job_dir / "tensorboard"

    @property
    def model_dir(self) -> Path:
        return self.root / "models" / self.job_id

    @property
    def class_image_cache(self) -> Path:
        return self.root / "cache" / "class_images"

    @property
    def compile_cache(self) -> Path:
        return self.root / "cache" / "torch_compile"


def job_paths(root: str | Path, job_id: str) -> JobPaths:
    return JobPaths(Path(root).resolve(), check_job_id(job_id))
