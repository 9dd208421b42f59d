"""Sharded DeepSpeed checkpoints, written straight into the Ray Train run directory and reported to Ray.

Every rank writes its own ZeRO shards into the same directory on the job's shared storage, so Ray has
nothing to copy (`CheckpointUploadMode.NO_UPLOAD`): the checkpoint is durable as soon as DeepSpeed
returns. Ray then tracks it, keeps the newest `checkpoints_to_keep`, and hands the latest back through
`ray.train.get_checkpoint()` after a worker failure or when the same run is started again.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import ray.train

TAG = "zero"  # DeepSpeed's sub-directory inside each checkpoint directory
STATE_FILE = "trainer_state.json"


def checkpoint_dir_name(step: int) -> str:
    return f"checkpoint_step_{step:07d}"


def save_and_report(engine, step: int, metrics: dict) -> tuple[Path, float]:
    """Save on every rank (collective), then report to Ray Train. Returns (directory, seconds stalled)."""
    start = time.perf_counter()
    experiment_dir = Path(ray.train.get_context().get_storage().experiment_fs_path)
    directory = experiment_dir / checkpoint_dir_name(step)
    engine.save_checkpoint(str(directory), tag=TAG, client_state={"step": step})
    if ray.train.get_context().get_world_rank() == 0:
        (directory / STATE_FILE).write_text(json.dumps({"step": step, **metrics}))
    ray.train.report(
        {"step": step, **metrics},
        checkpoint=ray.train.Checkpoint(str(directory)),
        checkpoint_dir_name=directory.name,
        checkpoint_upload_mode=ray.train.CheckpointUploadMode.NO_UPLOAD,
    )
    return directory, time.perf_counter() - start


def restore_latest(engine) -> int:
    """Load the run's latest reported checkpoint, if any, into `engine`. Returns the step to start from."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return 0
    with checkpoint.as_directory() as directory:
        _, client_state = engine.load_checkpoint(directory, tag=TAG)
    return int(client_state["step"])
