"""Sharded DeepSpeed checkpoints, written straight into the Ray Train run directory and reported to Ray.

Every rank writes its own ZeRO shards into the same directory on the job's shared storage, so Ray has
nothing to copy. With the default AsyncCheckpointEngine the write happens in the background and Ray's
asynchronous report waits for it; otherwise DeepSpeed writes synchronously and the report is immediate
(`CheckpointUploadMode.NO_UPLOAD`). Ray then tracks the checkpoint, keeps the newest `checkpoints_to_keep`,
and hands the latest back through `ray.train.get_checkpoint()` after a worker failure or when the same run
is started again.

A report only counts once Ray Train's controller has collected it from every rank (it polls the workers
every 2 s); a worker dying before that takes the newest checkpoint with it. Rank 0 waits for that commit in
a background thread, off the training path (training goes on, and saves again, before Ray has committed the one
before), and only then announces the checkpoint, so a "checkpoint" event in the job's events means: this is where a
restart resumes. What Ray commits is on disk (fsynced) first: Ray
deletes the checkpoints it no longer keeps at once, so a power loss must not find the newest one in the page cache.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import ray.train

from dreambooth.durable import sync_dir, sync_tree, write_file
from trainer.async_checkpoint import AsyncCheckpointEngine
from trainer.events import read_events

TAG = "zero"  # DeepSpeed's sub-directory inside each checkpoint directory
STATE_FILE = "trainer_state.json"
RAY_RUN_STATE = "checkpoint_manager_snapshot.json"  # Ray Train's list of the run's checkpoints, in the run directory
# The layout of what a checkpoint holds: its parameters' names and shapes (ZeRO-2's flat parameters and their groups)
# and its client state. A release that changes it bumps this: another release's checkpoints fail to load (missing
# keys, at every retry of the run) and to export, so a rerun refuses them up front. In each checkpoint's STATE_FILE.
CHECKPOINT_FORMAT = 1


_DIR_PREFIX = "checkpoint_step_"


def checkpoint_dir_name(step: int) -> str:
    return f"{_DIR_PREFIX}{step:07d}"


def checkpoint_steps(run_dir: Path) -> list[int]:
    """The steps of the checkpoint directories in a Ray Train run directory (the newest may be one whose save
    did not finish or that Ray never committed)."""
    return sorted(int(p.name.removeprefix(_DIR_PREFIX)) for p in run_dir.glob(f"{_DIR_PREFIX}*"))


@dataclass(frozen=True)
class Stall:
    """How long one save held training: `seconds` in all, of which `waited_s` waiting for the checkpoint before it
    to be written. The wait is not the save's own cost: it is there only when checkpoints come faster than storage
    writes them (an SD 1.5 ZeRO-2 checkpoint, 11-13 GiB, took 13-19 s to write and commit on the lent H100
    machine), and a longer checkpoint_interval removes it."""

    seconds: float
    waited_s: float


class CommitWait(threading.Thread):
    """Rank 0's background wait for Ray's commit of one checkpoint, then its announcement. A failure in it (the
    disk full as the event is written) is kept and raised by `join` and `raise_if_failed`, in the training loop:
    a thread's own exception would only be printed, and the job would go on with its checkpoints unannounced."""

    def __init__(self, name: str, wait: Callable[[], None]):
        super().__init__(name=name, daemon=True)
        self._wait = wait
        self._error: BaseException | None = None

    def run(self) -> None:
        try:
            self._wait()
        except BaseException as e:  # raised again in the training loop's thread
            self._error = e

    def raise_if_failed(self) -> None:
        """Without waiting: raises the wait's failure if it has failed already."""
        if self._error is not None:
            raise self._error

    def join(self, timeout: float | None = None) -> None:
        super().join(timeout)
        self.raise_if_failed()


def save_and_report(
    engine,
    step: int,
    metrics: dict,
    previous: CommitWait | None = None,
    on_committed: Callable[[Path, Stall], None] | None = None,
) -> tuple[CommitWait | None, Stall]:
    """Save on every rank (collective) and report to Ray Train. On rank 0, `on_committed(directory, stall)` runs in a
    background thread once Ray has committed the checkpoint, after `previous` (that thread of the last save) has
    run, so that checkpoints are announced in order. Returns (that thread, how long training stalled). A failure of
    the last save's thread is raised here, before saving again.

    This rank's writes of the last save, whose host buffers this one reuses, are waited for first: that wait is the
    stall's `waited_s` (a rank's wait for another's writes is in the save's collectives). Ray's commit of the last
    save is not: it polls its workers every 2 s, and a save a few steps after another would wait for nothing else."""
    if previous is not None:
        previous.raise_if_failed()
    start = time.perf_counter()
    writer = engine.checkpoint_engine
    if isinstance(writer, AsyncCheckpointEngine):
        writer.wait()
    waited_s = time.perf_counter() - start
    experiment_dir = Path(ray.train.get_context().get_storage().experiment_fs_path)
    directory = experiment_dir / checkpoint_dir_name(step)
    engine.save_checkpoint(str(directory), tag=TAG, client_state={"step": step})
    if ray.train.get_context().get_world_rank() == 0:
        write_file(directory / STATE_FILE, json.dumps({"step": step, "format": CHECKPOINT_FORMAT, **metrics}))
    report = {
        "metrics": {"step": step, **metrics},
        "checkpoint": ray.train.Checkpoint(str(directory)),
        "checkpoint_dir_name": directory.name,
    }
    if isinstance(writer, AsyncCheckpointEngine):

        def on_storage(checkpoint: ray.train.Checkpoint, _name: str) -> ray.train.Checkpoint:
            writer.wait()  # this rank's files, each fsynced by the writer
            _sync_entries(directory)
            return checkpoint

        # Ray's upload thread waits for our writes to land; nothing is copied, the files are already in place.
        ray.train.report(
            **report,
            checkpoint_upload_mode=ray.train.CheckpointUploadMode.ASYNC,
            checkpoint_upload_fn=on_storage,
            delete_local_checkpoint_after_upload=False,
        )
    else:
        sync_tree(directory)  # DeepSpeed's own engine leaves its files in the page cache
        _sync_entries(directory)
        ray.train.report(**report, checkpoint_upload_mode=ray.train.CheckpointUploadMode.NO_UPLOAD)
    stall = Stall(seconds=time.perf_counter() - start, waited_s=waited_s)
    if ray.train.get_context().get_world_rank() != 0:
        return None, stall

    def wait_for_commit() -> None:
        # Every checkpoint reported so far (Ray commits them in order): this one, and any reported since.
        ray.train.get_all_reported_checkpoints(consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED)
        if previous is not None:
            previous.join()
        if on_committed is not None:
            on_committed(directory, stall)

    thread = CommitWait(f"commit-{directory.name}", wait_for_commit)
    thread.start()
    return thread, stall


def _sync_entries(directory: Path) -> None:
    """The checkpoint's directory entries on disk too: once Ray commits it, it deletes the checkpoint before, and
    after a power loss the newest must not be a directory whose files' names were lost."""
    for path in (directory / TAG, directory, directory.parent):
        sync_dir(path)


def _ray_recorded(run_dir: Path) -> list[str] | None:
    """The checkpoint directory names in Ray Train's record of the run; None where it has none it can read, or one
    another Ray version wrote (Ray refuses a record whose fields its version changed, at every start of the run: a
    cluster upgraded under a job whose driver died could never run it again)."""
    try:
        record = json.loads((run_dir / RAY_RUN_STATE).read_bytes())
        if record["ray_version"] != ray.__version__:
            return None
        return [result["checkpoint_dir_name"] for result in record["checkpoint_results"]]
    except (OSError, ValueError, KeyError, TypeError):  # none, torn (not JSON, not UTF-8), or not Ray's shape
        return None


def set_aside_unusable_run_state(run_dir: Path, events_file: Path) -> Path | None:
    """Ray Train fails at every later start of a run whose record of its checkpoints it cannot use, so the job could
    never run again: a record torn by a driver killed while Ray rewrote it in place, one naming a checkpoint that is
    gone (an operator short of space removed the older ones), or one of another Ray version. And one behind the
    job's events (naming none of the checkpoints committed since: a copy of the storage restored in part) would
    start the run over from an older step. Such a record is renamed aside: the run then resumes from
    `resume_fallback`, as Ray no longer knows any. Returns where it went, or None."""
    record = run_dir / RAY_RUN_STATE
    if not record.exists() or _usable_ray_record(run_dir, events_file) is not None:
        return None
    aside = record.with_name(f"{record.name}.unusable-{uuid.uuid4().hex[:8]}")
    os.replace(record, aside)
    return aside


def _usable_ray_record(run_dir: Path, events_file: Path) -> list[str] | None:
    """The checkpoint names of Ray's record of the run where a run would use it (see set_aside_unusable_run_state),
    else None."""
    names = _ray_recorded(run_dir)
    newest = committed_checkpoint(events_file)
    if (
        names is not None
        and all((run_dir / name).is_dir() for name in names)
        and (newest is None or any(name >= newest.name for name in names))  # names sort by step: zero-padded
    ):
        return names
    return None


def resume_fallback(run_dir: Path, events_file: Path) -> Path | None:
    """The checkpoint a run resumes from where Ray has no record of the run (after `set_aside_unusable_run_state`,
    a record that is there is one Ray uses): the newest the job's events say was committed. Ray writes its record
    only when a run reports its first checkpoint, so a run that resumed from the events, its record set aside, and
    died before saving one leaves none: the next run resumes from the events too, not from step 0 (overwriting
    the committed checkpoints as it went)."""
    if (run_dir / RAY_RUN_STATE).exists():
        return None
    return committed_checkpoint(events_file)


def committed_steps(run_dir: Path, events_file: Path) -> list[int]:
    """The steps of the checkpoints a run may resume from, that are there: those Ray's record names (it commits
    each before the job's events announce it, and forgets those it pruned) or, where it has none a run would use
    (one it cannot read, or behind the events: the run sets it aside), those the job's events name."""
    names = _usable_ray_record(run_dir, events_file)
    if names is None:
        names = [Path(event["path"]).name for event in _committed_events(events_file)]
    return [step for step in checkpoint_steps(run_dir) if checkpoint_dir_name(step) in set(names)]


def remove_unused_checkpoints(run_dir: Path, events_file: Path) -> list[int]:
    """Removes the checkpoint directories no run resumes from, gigabytes each, which Ray (pruning only what its
    record names) would keep for good: a save cut short by a crash or a full disk, one Ray had not collected from
    every rank, one it pruned from its record but died before deleting, and those of a record set aside once the
    run's new record holds others. Only while no worker of the run is saving. Best effort: what cannot be removed
    stays for the next run. Returns the steps removed."""
    keep = set(committed_steps(run_dir, events_file))
    removed = []
    for step in checkpoint_steps(run_dir):
        if step not in keep:
            try:
                shutil.rmtree(run_dir / checkpoint_dir_name(step))
                removed.append(step)
            except OSError as e:  # a file an NFS client still holds, a permission: housekeeping, not the job's end
                print(f"warning: could not remove the unused checkpoint of step {step}: {e}")
    return removed


def checkpoint_format(directory: Path) -> int | None:
    """The CHECKPOINT_FORMAT a checkpoint was written in; None for one written before formats were stamped (or
    without its state: no run resumes from it)."""
    try:
        return json.loads((directory / STATE_FILE).read_text()).get("format")
    except FileNotFoundError:
        return None


def committed_checkpoint(events_file: Path, step: int | None = None) -> Path | None:
    """The newest checkpoint (or that of `step`) an earlier run of the job had committed, as its "checkpoint"
    event says, and that is still there; else None."""
    for event in reversed(_committed_events(events_file)):
        if step in (None, event.get("step")):
            directory = Path(event["path"])
            if (directory / STATE_FILE).exists():
                return directory
            if step is not None:
                return None
    return None


def _committed_events(events_file: Path) -> list[dict]:
    """The job's events that name a committed checkpoint: each save's, and each run's resume from one (which tells
    the checkpoint again where its save's event is missing: rank 0 killed between Ray's commit and the event)."""
    return [e for e in read_events(events_file) if e["type"] in ("checkpoint", "resumed") and e.get("path")]


def restore_latest(engine, fallback: str | None = None) -> tuple[int, Path | None]:
    """Load the run's latest reported checkpoint into `engine`; where Ray knows none, `fallback` (a checkpoint
    directory), if given. Returns the step to start from, and the checkpoint's directory (None: from the start)."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None and fallback is not None:
        checkpoint = ray.train.Checkpoint(fallback)
    if checkpoint is None:
        return 0, None
    with checkpoint.as_directory() as directory:
        _, client_state = engine.load_checkpoint(directory, tag=TAG)
    return int(client_state["step"]), Path(checkpoint.path)
