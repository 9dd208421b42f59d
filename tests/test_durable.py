"""Files a later run trusts: replaced whole, and what a crash left behind put right (pure file logic, real files)."""

from __future__ import annotations

import errno
import json
import logging
import os
import threading
import time
import uuid

import pytest
import ray
from PIL import Image

from dreambooth.durable import write_file
from trainer.checkpoint import (
    RAY_RUN_STATE,
    STATE_FILE,
    CommitWait,
    checkpoint_steps,
    committed_steps,
    remove_unused_checkpoints,
    resume_fallback,
    set_aside_unusable_run_state,
)
from trainer.class_images import STALE_PARTIAL_S, image_path, missing_indices, remove_stale_partials
from trainer.events import EventLog, follow_events, read_events, seconds_run
from trainer.export import _clean_scratch, write_into_place
from trainer.storage import job_paths, mark_shared


def test_write_file_replaces_whole_and_leaves_nothing_when_it_fails(tmp_path):
    target = tmp_path / "spec.json"
    write_file(target, "first")
    write_file(target, b"second")
    assert target.read_text() == "second"

    class Unwritable:  # fails inside the write, after the temporary file exists
        pass

    with pytest.raises(TypeError):
        write_file(target, Unwritable())  # type: ignore[arg-type]
    assert target.read_text() == "second"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["spec.json"]


def scratch(models, name: str, kind: str):
    path = models / f".{name}.{uuid.uuid4().hex}.{kind}"
    path.mkdir()
    (path / "metadata.json").write_text(kind)
    return path


def test_an_export_that_crashed_between_its_renames_gets_its_model_back(tmp_path):
    """The old model had been renamed aside and the new one not yet into place: the next export puts the old one
    back first (should that export fail too, the job's model is still served), and removes the rest."""
    models = tmp_path / "models"
    models.mkdir()
    scratch(models, "dog", "replaced")
    scratch(models, "dog", "partial")
    others = scratch(models, "dog.partial", "partial")  # job "dog.partial"'s: not this job's
    _clean_scratch(job_paths(tmp_path, "dog"))
    assert (models / "dog" / "metadata.json").read_text() == "replaced"
    assert sorted(p.name for p in models.iterdir()) == sorted(["dog", others.name])


def test_an_export_that_crashed_before_its_renames_keeps_the_served_model(tmp_path):
    models = tmp_path / "models"
    (models / "dog").mkdir(parents=True)
    (models / "dog" / "metadata.json").write_text("served")
    scratch(models, "dog", "partial")
    _clean_scratch(job_paths(tmp_path, "dog"))
    assert (models / "dog" / "metadata.json").read_text() == "served"
    assert [p.name for p in models.iterdir()] == ["dog"]


@pytest.mark.parametrize("stopped_by", [SystemExit, OSError])  # the job cancelled mid-export; a full disk
def test_an_export_that_stops_halfway_leaves_no_half_model(tmp_path, stopped_by):
    """A cancelled or failed job never exports again, so nothing else would remove its half-written model (GiBs)."""
    paths = job_paths(tmp_path, "dog")
    paths.model_dir.mkdir(parents=True)
    (paths.model_dir / "metadata.json").write_text("served")

    def write(directory):
        directory.mkdir()
        (directory / "unet.safetensors").write_bytes(b"half")
        raise stopped_by()

    with pytest.raises(stopped_by):
        write_into_place(paths, write)
    assert [p.name for p in paths.model_dir.parent.iterdir()] == ["dog"]
    assert (paths.model_dir / "metadata.json").read_text() == "served"
    assert write_into_place(paths, lambda d: (d.mkdir(), (d / "metadata.json").write_text("new"))) == paths.model_dir
    assert (paths.model_dir / "metadata.json").read_text() == "new" and paths.model_scratch() == []


def test_an_empty_or_damaged_cached_class_image_is_generated_again(tmp_path):
    Image.new("RGB", (8, 8)).save(image_path(tmp_path, 0))
    image_path(tmp_path, 1).write_bytes(b"")  # a power loss cut it off
    Image.new("RGB", (8, 8)).save(image_path(tmp_path, 3))
    image_path(tmp_path, 3).write_bytes(image_path(tmp_path, 3).read_bytes()[:-20])  # its end lost
    assert missing_indices(tmp_path, 4) == [1, 2, 3]


def test_partial_class_images_an_actor_left_are_removed_and_those_being_written_kept(tmp_path):
    """An actor that died between writing an image and renaming it into place left the partial file for good."""
    left, writing = tmp_path / f"000001.{uuid.uuid4().hex}.tmp", tmp_path / f"000002.{uuid.uuid4().hex}.tmp"
    for partial in (left, writing):
        partial.write_bytes(b"\x89PNG")
    long_ago = time.time() - STALE_PARTIAL_S - 60
    os.utime(left, (long_ago, long_ago))
    assert remove_stale_partials(tmp_path) == [left]
    assert not left.exists() and writing.exists()


def test_a_class_image_the_disk_had_no_room_for_leaves_no_partial_file(tmp_path, tiny_model, monkeypatch):
    """A full disk (ENOSPC) as an image was written left its partial file in the cache, on a disk already full, until
    a later job of the class found it an hour old."""
    import torch

    from trainer import class_images

    directory = tmp_path / "class"
    directory.mkdir()
    mark = mark_shared(directory)
    generator = class_images.ClassImageGenerator.__ray_actor_class__(str(tiny_model), False, torch.float32, str(mark))

    def disk_full(path):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(class_images, "sync_file", disk_full)
    with pytest.raises(OSError, match="No space left"):
        generator.generate([0, 1], "a photo of dog", 1, 7.5, str(directory))
    assert list(directory.iterdir()) == [mark]


def test_event_readers_skip_lines_that_are_not_events(tmp_path):
    log = EventLog(tmp_path / "events.jsonl")
    log.emit("state", state="PREPARING")
    with log.path.open("ab") as f:
        f.write(b'{"type": "prog\n\x00\x00\n"just a string"\n{"no": "type"}\n')
    log.emit("state", state="TRAINING")
    assert [e["state"] for e in read_events(log.path)] == ["PREPARING", "TRAINING"]
    stop = threading.Event()
    stop.set()  # drain what is there and return
    assert [e["state"] for e in follow_events(log.path, stop)] == ["PREPARING", "TRAINING"]


def test_a_follower_reads_on_after_a_read_that_failed(tmp_path, caplog):
    """`train`'s progress follows the events file on shared storage; a read failing for a moment (a stale NFS handle)
    ended the follower's thread, and the run's progress and verdict were shown no more."""
    path = tmp_path / "events.jsonl"
    path.mkdir()  # reading it fails (EISDIR), as a stale handle's read would
    stop, followed = threading.Event(), []
    follower = threading.Thread(target=lambda: followed.extend(follow_events(path, stop, poll_s=0.01)))
    with caplog.at_level(logging.WARNING, logger="trainer.events"):
        follower.start()
        deadline = time.monotonic() + 30
        while not caplog.records:
            assert time.monotonic() < deadline, "the failed read was not told"
            time.sleep(0.01)
        path.rmdir()
        EventLog(path).emit("state", state="TRAINING")
        stop.set()
        follower.join(timeout=30)
    assert [e["state"] for e in followed] == ["TRAINING"]
    assert len(caplog.records) == 1  # once, not at every poll


def test_an_event_after_a_line_torn_by_a_crash_starts_a_line_of_its_own(tmp_path):
    log = EventLog(tmp_path / "events.jsonl")
    log.emit("state", state="PREPARING")
    with log.path.open("ab") as f:
        f.write(b'{"type": "progress", "st')  # the power went in the middle of this line
    log.emit("state", state="FAILED", reason="InputError")  # the next run's verdict, not glued to the torn line
    assert [e["state"] for e in read_events(log.path)] == ["PREPARING", "FAILED"]
    log.emit("state", state="TRAINING")  # and whole lines are not followed by empty ones
    assert b"\n\n" not in log.path.read_bytes()


def test_a_checkpoint_announcement_that_failed_is_raised_in_the_training_loop(tmp_path):
    """Rank 0 announces a committed checkpoint from a background thread; an event it could not write must stop the
    run (the next save raises it, and the wait at the end), not be printed by the thread and forgotten."""
    unwritable = EventLog(tmp_path / "events.jsonl")
    unwritable.path.mkdir()  # opening it to append fails (EISDIR), as a full disk's write would
    first = CommitWait("commit-1", lambda: unwritable.emit("checkpoint", step=1, path="/x"))
    first.start()
    with pytest.raises(IsADirectoryError):
        first.join()
    with pytest.raises(IsADirectoryError):  # and the next save's check, which does not wait, raises it too
        first.raise_if_failed()
    second = CommitWait("commit-2", first.join)  # the next save's announcement waits for this one's, in order
    second.start()
    with pytest.raises(IsADirectoryError):
        second.join()


def record_naming(run_dir, *steps: int, ray_version: str = ray.__version__) -> None:
    """Ray Train's record of a run's checkpoints, as it writes it (the fields read here)."""
    entries = [{"checkpoint_dir_name": f"checkpoint_step_{step:07d}", "metrics": {}} for step in steps]
    record = {"ray_version": ray_version, "checkpoint_results": entries}
    (run_dir / RAY_RUN_STATE).write_text(json.dumps(record))


def committed(run_dir, events: EventLog, step: int) -> None:
    """A checkpoint whose save finished, and the event that says Ray committed it."""
    directory = run_dir / f"checkpoint_step_{step:07d}"
    (directory / "zero").mkdir(parents=True)
    (directory / STATE_FILE).write_text(json.dumps({"step": step}))
    events.emit("checkpoint", step=step, path=str(directory))


def test_a_record_of_rays_checkpoints_it_cannot_use_is_set_aside(tmp_path):
    """Ray would fail on it at every start of the run: torn (a driver killed while Ray rewrote it in place), or
    naming a checkpoint that is gone (an operator short of space removed the older ones), or written by another Ray
    version (a cluster upgraded under the job). One behind the job's events would start the run over."""
    run_dir, events = tmp_path / "run", EventLog(tmp_path / "events.jsonl")
    run_dir.mkdir()
    record = run_dir / RAY_RUN_STATE
    assert set_aside_unusable_run_state(run_dir, events.path) is None  # none yet
    committed(run_dir, events, 4)
    record_naming(run_dir, 4)
    assert set_aside_unusable_run_state(run_dir, events.path) is None and record.exists()  # usable: Ray's to use
    record.write_text('{"checkpoint_res')
    aside = set_aside_unusable_run_state(run_dir, events.path)
    assert not record.exists() and aside.read_text() == '{"checkpoint_res'
    record_naming(run_dir, 2, 4)  # 2 is gone
    assert set_aside_unusable_run_state(run_dir, events.path) is not None and not record.exists()
    record_naming(run_dir, 4, ray_version="2.54.0")
    assert set_aside_unusable_run_state(run_dir, events.path) is not None and not record.exists()
    # One naming none of the committed checkpoints (a storage restored in part) would start the run over.
    record_naming(run_dir)
    assert set_aside_unusable_run_state(run_dir, events.path) is not None and not record.exists()


def test_a_run_ray_has_no_record_of_resumes_from_the_jobs_events(tmp_path):
    """Ray writes its record of a run at the run's first checkpoint: a run that resumed from the events (its record
    set aside) and died before saving one left none, and the next run started over from step 0."""
    run_dir, events = tmp_path / "run", EventLog(tmp_path / "events.jsonl")
    run_dir.mkdir()
    assert resume_fallback(run_dir, events.path) is None  # a job's first run
    committed(run_dir, events, 2)
    committed(run_dir, events, 4)
    assert resume_fallback(run_dir, events.path) == run_dir / "checkpoint_step_0000004"
    record_naming(run_dir, 2, 4)
    assert resume_fallback(run_dir, events.path) is None  # Ray's to resume from


def test_a_checkpoint_whose_event_was_lost_counts_once_a_run_resumed_from_it(tmp_path):
    """Rank 0 killed between Ray's commit of a checkpoint and the event saying so (a cancel, a lost node): with Ray's
    record unusable later (another Ray version's, after an upgrade), the events named only older checkpoints, and the
    run resumed from those and removed the newer ones Ray had committed. The run that resumed from it names it."""
    run_dir, events = tmp_path / "run", EventLog(tmp_path / "events.jsonl")
    committed(run_dir, events, 2)
    newest = run_dir / "checkpoint_step_0000004"
    (newest / "zero").mkdir(parents=True)
    (newest / STATE_FILE).write_text(json.dumps({"step": 4}))
    events.emit("resumed", step=4, path=str(newest))  # as the next run's rank 0 does, resumed by Ray from it
    assert resume_fallback(run_dir, events.path) == newest
    assert committed_steps(run_dir, events.path) == [2, 4]
    assert remove_unused_checkpoints(run_dir, events.path) == []


def test_checkpoints_no_run_resumes_from_are_removed(tmp_path):
    """A save cut short (a crash, a full disk), or one Ray pruned from its record and died before deleting, left
    gigabytes that Ray, pruning only what it records, kept for good; and a rerun with fewer max_steps was refused
    over a checkpoint that never counted."""
    run_dir, events = tmp_path / "run", EventLog(tmp_path / "events.jsonl")
    for step in (2, 4, 6):
        committed(run_dir, events, step)
    (run_dir / "checkpoint_step_0000008" / "zero").mkdir(parents=True)  # cut short
    record_naming(run_dir, 4, 6)  # it pruned 2 from its record
    assert committed_steps(run_dir, events.path) == [4, 6]
    assert remove_unused_checkpoints(run_dir, events.path) == [2, 8]
    assert checkpoint_steps(run_dir) == [4, 6]
    # Ray's record set aside (torn): the events say what was committed.
    (run_dir / RAY_RUN_STATE).unlink()
    (run_dir / "checkpoint_step_0000008" / "zero").mkdir(parents=True)
    assert committed_steps(run_dir, events.path) == [4, 6]
    assert remove_unused_checkpoints(run_dir, events.path) == [8]


def test_a_record_behind_the_jobs_events_names_no_checkpoint_a_run_would_resume_from(tmp_path):
    """A storage restored in part: Ray's record names steps 100 and 200, the events 300 and 400. The run sets the
    record aside and resumes from 400, so that is what the job has: a rerun's max_steps of 300 was let through (the
    check read the record) and the export said 400 steps of a job of 300."""
    run_dir, events = tmp_path / "run", EventLog(tmp_path / "events.jsonl")
    for step in (100, 200, 300, 400):
        committed(run_dir, events, step)
    record_naming(run_dir, 100, 200)
    assert committed_steps(run_dir, events.path) == [100, 200, 300, 400]
    set_aside_unusable_run_state(run_dir, events.path)
    assert committed_steps(run_dir, events.path) == [100, 200, 300, 400]
    record_naming(run_dir, 300, 400)  # usable: it names what the events do
    (run_dir / "checkpoint_step_0000500" / "zero").mkdir(parents=True)  # a save Ray did not commit
    assert committed_steps(run_dir, events.path) == [300, 400]


def test_a_jobs_wall_time_is_its_runs_not_the_gaps_between_them():
    def state(time: float, state: str, **fields) -> dict:
        return {"type": "state", "time": time, "state": state, **fields}

    events = [
        state(100.0, "PREPARING"),
        {"type": "progress", "time": 160.0, "step": 10},  # then the driver died: its run lasted 60 s
        state(5000.0, "FAILED", reason="INVALID_INPUT"),  # a rerun refused before it started
        state(9000.0, "PREPARING"),
        {"type": "checkpoint", "time": 9030.0, "step": 20},
    ]
    assert seconds_run(events, now=9040.0) == 60.0 + 40.0
    assert seconds_run([], now=10.0) == 0.0
