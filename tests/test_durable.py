"""Files a later run trusts: replaced whole, and what a crash left behind put right (pure file logic, real files)."""

from __future__ import annotations

import threading
import uuid

import pytest

from dreambooth.durable import write_file
from trainer.checkpoint import RAY_RUN_STATE, set_aside_unreadable_run_state
from trainer.class_images import image_path, missing_indices
from trainer.events import EventLog, follow_events, read_events
from trainer.export import _clean_scratch, write_into_place
from trainer.storage import job_paths


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


def test_an_empty_cached_class_image_is_generated_again(tmp_path):
    image_path(tmp_path, 0).write_bytes(b"\x89PNG...")
    image_path(tmp_path, 1).write_bytes(b"")  # a power loss cut it off
    assert missing_indices(tmp_path, 3) == [1, 2]


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


def test_an_event_after_a_line_torn_by_a_crash_starts_a_line_of_its_own(tmp_path):
    log = EventLog(tmp_path / "events.jsonl")
    log.emit("state", state="PREPARING")
    with log.path.open("ab") as f:
        f.write(b'{"type": "progress", "st')  # the power went in the middle of this line
    log.emit("state", state="FAILED", reason="InputError")  # the next run's verdict, not glued to the torn line
    assert [e["state"] for e in read_events(log.path)] == ["PREPARING", "FAILED"]
    log.emit("state", state="TRAINING")  # and whole lines are not followed by empty ones
    assert b"\n\n" not in log.path.read_bytes()


def test_an_unreadable_record_of_rays_checkpoints_is_set_aside(tmp_path):
    """Ray would fail on it at every start of the run (a driver killed while Ray rewrote it in place)."""
    record = tmp_path / RAY_RUN_STATE
    assert set_aside_unreadable_run_state(tmp_path) is None  # none yet
    record.write_text('{"checkpoint_results": []}')
    assert set_aside_unreadable_run_state(tmp_path) is None and record.exists()  # readable: Ray's to use
    record.write_text('{"checkpoint_res')
    aside = set_aside_unreadable_run_state(tmp_path)
    assert not record.exists() and aside.read_text() == '{"checkpoint_res'
