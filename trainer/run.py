"""A training job from start to finish, driven from one process on the Ray cluster (the Ray job's entrypoint).

    preflight checks -> class-prior images -> TorchTrainer(N workers).fit() -> export -> model

Every step reports to the job's events file. Running the same job again (same storage root and job id)
resumes from its latest checkpoint (or, when its final one was committed, only exports it); Ray Train restarts
failed workers from it on its own.

    python -m trainer.run --storage DIR --job-id ID [--spec spec.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import ray
import ray.train
from ray.train.torch import TorchTrainer

from dreambooth.durable import write_file
from dreambooth.errors import PLACEMENT_TIMEOUT_ENV, PLACEMENT_TIMEOUT_S, InputError, PlacementTimeout
from dreambooth.model_files import FINGERPRINT_VERSION, ModelMetadata, content_identity, fingerprint
from trainer.checkpoint import (
    CHECKPOINT_FORMAT,
    STATE_FILE,
    checkpoint_dir_name,
    checkpoint_format,
    committed_checkpoint,
    committed_steps,
    remove_unused_checkpoints,
    resume_fallback,
    set_aside_unusable_run_state,
)
from trainer.class_images import ensure_class_images
from trainer.events import EventLog, read_events, seconds_run
from trainer.export import export_model
from trainer.images import find_instance_images
from trainer.preflight import preflight
from trainer.spec import JobSpec
from trainer.storage import JobPaths, clear_shared_marks, job_paths, mark_shared
from trainer.train_loop import WorkerConfig, train_loop_per_worker


@dataclass
class TrainingResult:
    model_dir: Path
    steps: int
    final_loss: float | None
    wall_time_s: float


# What a rerun of a job may change: how it runs and reports, not what its checkpoints were trained with.
RERUN_MAY_CHANGE = frozenset(
    {
        "max_steps",  # to train on (never below a checkpoint already taken)
        "checkpoint_interval",
        "checkpoints_to_keep",
        "async_checkpointing",
        "validation_prompts",
        "validation_interval",
        "validation_inference_steps",
        "validation_images_per_prompt",
        "gradient_checkpointing",
        "torch_compile",
        "compile_backend",
        "cuda_graphs",
        "cpus_per_worker",
        "placement_strategy",
        "max_failures",
    }
)


# Without prior preservation (before and now) these train nothing.
PRIOR_PRESERVATION_FIELDS = frozenset(
    {"class_prompt", "prior_loss_weight", "class_image_inference_steps", "class_image_guidance_scale"}
)


def check_rerun(spec: JobSpec, paths: JobPaths) -> None:
    """Running a job id again resumes its checkpoints: refuse a spec that changed what they were trained with (a
    new learning rate would be ignored, other photos or prompts would be labelled with the old run's weights)."""
    steps = committed_steps(paths.checkpoints_dir, paths.events_file)
    if not steps or not paths.spec_file.exists():
        return
    before, now = json.loads(paths.spec_file.read_text()), json.loads(json.dumps(spec.to_dict()))
    may_change = set(RERUN_MAY_CHANGE)
    if not before.get("num_class_images") and not spec.with_prior_preservation:
        may_change |= PRIOR_PRESERVATION_FIELDS
    if spec.num_workers == 1 and before.get("gpus_per_worker", 0) > 0 and spec.gpus_per_worker > 0:
        may_change.add("gpus_per_worker")  # one worker on a GPU either way: only its scheduling changes
    # Fields in both: one that a later version added (or removed) has its default, not a change of the user's.
    changed = sorted(k for k in before.keys() & now.keys() if before[k] != now[k] and k not in may_change)
    start_over = f"use another job id (--job-id), or delete {paths.job_dir} to start over"
    if changed:
        raise InputError(
            changed[0], f"job {paths.job_id} has checkpoints trained with other {', '.join(changed)}: {start_over}"
        )
    newest = paths.checkpoints_dir / checkpoint_dir_name(max(steps))
    if (written := checkpoint_format(newest)) not in (None, CHECKPOINT_FORMAT):
        raise InputError(
            "checkpoints",
            f"job {paths.job_id}'s checkpoints were written by another release (checkpoint format {written}; this one "
            f"reads {CHECKPOINT_FORMAT}): finish it with that release, or {start_over}",
        )
    if spec.max_steps < max(steps):
        raise InputError("max_steps", f"job {paths.job_id} has a checkpoint at step {max(steps)}: {start_over}")
    if spec.max_steps != before.get("max_steps", spec.max_steps) and spec.lr_schedule != "constant":
        # The checkpoint holds the schedule's position, not its length: a rerun would jump along the new curve.
        raise InputError(
            "max_steps",
            f"job {paths.job_id}'s {spec.lr_schedule} learning rate decays over its max_steps "
            f"({before['max_steps']}), which its checkpoints were trained with: {start_over}",
        )
    # The same paths may hold other photos now (one added to the folder, say): compare what is in them.
    if paths.photos_file.exists() and json.loads(paths.photos_file.read_text()) != photo_hashes(spec):
        raise InputError(
            "instance_images", f"job {paths.job_id} has checkpoints trained on other instance images: {start_over}"
        )
    # And another model at the base model's path (an upgrade in place): its VAE and text encoder beside the old
    # base's trained UNet, exported as one model.
    if paths.base_model_file.exists() and json.loads(paths.base_model_file.read_text()) != content_identity(
        spec.base_model
    ):
        raise InputError(
            "base_model",
            f"job {paths.job_id} has checkpoints trained from another model than {spec.base_model} holds now: "
            f"{start_over}",
        )


def photo_hashes(spec: JobSpec) -> list[str]:
    """The instance images' content hashes, in the order training indexes them."""
    hashes = []
    for file in find_instance_images(spec.instance_images):
        with open(file, "rb") as photo:  # in chunks: not a whole file in the driver's memory
            hashes.append(hashlib.file_digest(photo, "sha256").hexdigest())
    return hashes


def run_training(
    spec: JobSpec,
    paths: JobPaths,
    *,
    placement_timeout_s: float = PLACEMENT_TIMEOUT_S,
    fail_once_at_steps: tuple[int, ...] = (),
) -> TrainingResult:
    """Run (or resume) the job; raises InputError for bad input, PlacementTimeout when Ray cannot place its workers
    within `placement_timeout_s`, ray.train.TrainingFailedError if training fails."""
    events = EventLog(paths.events_file)
    try:
        preflight(spec)
        check_rerun(spec, paths)
    except InputError as e:
        events.emit("state", state="FAILED", reason="INVALID_INPUT", field=e.field, message=e.message)
        raise
    paths.job_dir.mkdir(parents=True, exist_ok=True)
    # What the next attempt's rerun check compares with: replaced whole (a crash mid-write must not leave the
    # job's only spec empty), and only when it changed.
    for file, text in (
        (paths.spec_file, json.dumps(spec.to_dict(), indent=2)),
        (paths.photos_file, json.dumps(photo_hashes(spec))),
        (paths.base_model_file, json.dumps(content_identity(spec.base_model))),
    ):
        if not file.exists() or file.read_text() != text:
            write_file(file, text)

    phase = "TRAINING_FAILED"  # what a failure is reported as: a closed set (the job's Failure.reason)
    try:
        events.emit("state", state="PREPARING")
        checkpoint_dir = only_export_left(spec, paths)
        if checkpoint_dir is None:
            checkpoint_dir = _train(spec, paths, events, placement_timeout_s, fail_once_at_steps)
        state = json.loads((checkpoint_dir / STATE_FILE).read_text())

        events.emit("state", state="EXPORTING")
        phase = "EXPORT_FAILED"
        wall_time_s = seconds_run(read_events(paths.events_file), time.time())  # every run's, not only this one's
        metadata = ModelMetadata(
            job_id=paths.job_id,
            base_model=spec.base_model,
            base_model_fingerprint=fingerprint(spec.base_model),
            base_model_fingerprint_version=FINGERPRINT_VERSION,
            identifier=spec.identifier,
            instance_prompt=spec.instance_prompt,
            class_prompt=spec.class_prompt,
            steps=state["step"],
            final_loss=state.get("loss"),
            wall_time_s=wall_time_s,
            hyperparameters=spec.to_dict(),
        )
        model_dir = export_model(spec, checkpoint_dir, paths, metadata)
        events.emit("model", path=str(model_dir), metadata=metadata.to_dict())
        events.emit("state", state="SUCCEEDED")
        return TrainingResult(model_dir, state["step"], state.get("loss"), wall_time_s)
    except (SystemExit, KeyboardInterrupt):
        # Stopped from outside (ray.init turns SIGTERM into SystemExit: a head shutting down, `ray job stop`), not a
        # verdict on the job: whoever runs it decides (the controller runs it again, or ends it as stopped).
        raise
    except RayLostTheRun:
        # Nor is Ray losing the processes the training run stands on: judged FAILED, the job was never run again,
        # its checkpoints unused; the next attempt resumes from them.
        raise
    except BaseException as e:
        reason = "PLACEMENT_TIMEOUT" if isinstance(e, PlacementTimeout) else phase
        try:
            events.emit("state", state="FAILED", reason=reason, message=f"{type(e).__name__}: {e}"[:2000])
        except OSError as unwritten:  # the storage full (what failed the run, often): the run's error is the news
            print(f"warning: the job's FAILED event could not be written: {unwritten}", file=sys.stderr)
        raise


class RayLostTheRun(Exception):
    """Ray Train's fit failed for a process of Ray's gone under it (its controller actor dead with its owner's node: the
    cluster going down, `dreambooth down`, a head restarted), not for a verdict of training's (TrainingFailedError
    after max_failures) nor an actor that could not start (its constructor's error: the job's own)."""


def _ray_lost_the_run(e: BaseException) -> bool:
    if isinstance(e, ray.exceptions.RayActorError):
        return not e.actor_init_failed
    return isinstance(
        e, ray.exceptions.NodeDiedError | ray.exceptions.OwnerDiedError | ray.exceptions.WorkerCrashedError
    )


def only_export_left(spec: JobSpec, paths: JobPaths) -> Path | None:
    """The final checkpoint of a job that trained to the end before (its driver died exporting, say): only the export
    is left, which needs no workers, nor their GPUs; unless the final grid is missing (it died drawing it)."""
    checkpoint_dir = committed_checkpoint(paths.events_file, spec.max_steps)
    if checkpoint_dir is None or paths.lacks_final_grid(spec):
        return None
    return checkpoint_dir


WORKER_GROUP_STARTS = 3  # tries Ray Train has to start the workers, over a run (its "controller failures")


def _train(
    spec: JobSpec, paths: JobPaths, events: EventLog, placement_timeout_s: float, fail_once_at_steps: tuple[int, ...]
) -> Path:
    """Class-prior images, then the workers' training to the end. Returns the final checkpoint's directory."""
    clear_shared_marks(paths.job_dir)
    config = WorkerConfig(
        spec=spec.to_dict(),
        storage_root=str(paths.root),
        job_id=paths.job_id,
        storage_mark=str(mark_shared(paths.job_dir)),
        fail_once_at_steps=tuple(fail_once_at_steps),
    )
    if spec.with_prior_preservation:
        class_images = ensure_class_images(
            spec,
            paths.class_image_cache,
            num_actors=spec.num_workers,
            placement_timeout_s=placement_timeout_s,
            on_progress=lambda done, total: events.emit("class_images", done=done, total=total),
        )
        config = dataclasses.replace(config, class_images_dir=str(class_images))

    if (aside := set_aside_unusable_run_state(paths.checkpoints_dir, paths.events_file)) is not None:
        print(f"warning: Ray's record of this run's checkpoints was unusable, set aside: {aside}")
    # Where Ray has no record of the run, the job's events name the newest checkpoint it committed.
    if (resume_from := resume_fallback(paths.checkpoints_dir, paths.events_file)) is not None:
        config = dataclasses.replace(config, resume_from=str(resume_from))
        print(f"resuming from {resume_from}, which Ray has no record of")
    if removed := remove_unused_checkpoints(paths.checkpoints_dir, paths.events_file):
        print(f"removed the checkpoints of steps {removed}, which no run resumes from")
    events.emit("state", state="TRAINING")
    # Ray Train tries to start its workers up to WORKER_GROUP_STARTS times (a start that failed, a node lost while
    # the workers came up, is worth another), each waiting its share of the placement timeout for their placement
    # group, rather than retrying for ever. Read from the driver's environment when the run starts.
    os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = str(placement_timeout_s / WORKER_GROUP_STARTS)
    interrupt = signal.getsignal(signal.SIGINT)
    try:
        result = _trainer(spec, paths, config).fit()
    except ray.train.ControllerError as e:
        if type(e.controller_failure).__name__ != "WorkerGroupStartupTimeoutError":  # the type is Ray's internal one
            raise
        raise PlacementTimeout(
            f"Ray could not place the job's workers ({spec.describe_workers()}) within {placement_timeout_s:g} s: "
            "no node has room for one, the placement strategy cannot be met, or other work holds the cluster's "
            "resources"
        ) from e
    except Exception as e:
        if not _ray_lost_the_run(e):
            raise
        raise RayLostTheRun(f"Ray lost the training run's processes: {type(e).__name__}: {e}") from e
    finally:
        if threading.current_thread() is threading.main_thread():
            # Ray Train's fit puts in a SIGINT handler of its own (abort the run, then exit 1) and leaves it there:
            # Ctrl-C during the export after it was swallowed twice, and the third exited 0, without a model.
            signal.signal(signal.SIGINT, interrupt)
    # None where the run reported no checkpoint and Ray knew none before: it resumed from `resume_from` at the end.
    return Path(result.checkpoint.path) if result.checkpoint is not None else Path(config.resume_from)


def _trainer(spec: JobSpec, paths: JobPaths, config: WorkerConfig) -> TorchTrainer:
    resources = {"CPU": spec.cpus_per_worker}
    if spec.use_gpu:
        resources["GPU"] = spec.gpus_per_worker
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=config.to_dict(),
        scaling_config=ray.train.ScalingConfig(
            num_workers=spec.num_workers,
            use_gpu=spec.use_gpu,
            resources_per_worker=resources,
            placement_strategy=spec.placement_strategy,
        ),
        run_config=ray.train.RunConfig(
            name=paths.ray_run_name,
            storage_path=str(paths.job_dir),
            failure_config=ray.train.FailureConfig(
                max_failures=spec.max_failures, controller_failure_limit=WORKER_GROUP_STARTS - 1
            ),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=spec.checkpoints_to_keep),
            # Set before a worker imports this package: DeepSpeed picks its accelerator when first imported, and a
            # CPU job on a node with GPUs would otherwise move its model onto a GPU that Ray never gave it. (The
            # rest of the workers' environment, HF_HUB_OFFLINE included, is the Ray job's: controller.ray_jobs,
            # dreambooth.local_ray.)
            worker_runtime_env={"env_vars": {"DS_ACCELERATOR": "cuda" if spec.use_gpu else "cpu"}},
        ),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer.run", description=__doc__.split("\n")[0])
    parser.add_argument("--storage", required=True, help="storage root shared by all nodes")
    parser.add_argument("--job-id", required=True)
    parser.add_argument("--spec", help="job spec (YAML/JSON); default: <storage>/jobs/<job-id>/spec.json")
    parser.add_argument(
        "--placement-timeout-s",
        type=float,
        default=float(os.environ.get(PLACEMENT_TIMEOUT_ENV, PLACEMENT_TIMEOUT_S)),
        help="how long the workers may wait for Ray to place them before the job fails "
        f"(default: ${PLACEMENT_TIMEOUT_ENV}, else {PLACEMENT_TIMEOUT_S:g})",
    )
    args = parser.parse_args(argv)
    try:
        paths = job_paths(args.storage, args.job_id)
        spec = JobSpec.load(args.spec or paths.spec_file)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    ray.init(address="auto", log_to_driver=False)
    try:
        result = run_training(spec, paths, placement_timeout_s=args.placement_timeout_s)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"model_dir": str(result.model_dir), "steps": result.steps}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
