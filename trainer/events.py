"""Progress events: the trainer appends JSON lines to the job's events file; the CLI and the controller follow it.

A file on the job's shared storage is the "place to report to": it needs no server, survives restarts of
either side, and any node can write it. One event per line, each with a `type` and a wall-clock `time`:

    {"type": "state", "state": "PREPARING" | "TRAINING" | "EXPORTING" | "SUCCEEDED" | "FAILED", ...}   (each run of
     the job starts with PREPARING, unless its input is refused first: FAILED, reason INVALID_INPUT)
    {"type": "class_images", "done": 12, "total": 100}
    {"type": "worker", "rank": 0, "world_size": 2, "node_id": "...", "device": "cuda:0", "start_step": 0,
     "startup_s": {"load_model": 4.1, "encode": 0.8, "build_engine": 9.5, "restore": 0.0}}   (the worker's start, in
     its parts; from the TRAINING state to the event, the rest is Ray Train's: its worker processes and process group)
    {"type": "resumed", "step": 200, "path": "..."}   (a run restarted from its checkpoint at that step: committed)
    {"type": "progress", "step": 40, "total_steps": 400, "loss": 0.12, "instance_loss": 0.07, "prior_loss": 0.1,
     "lr": 5e-6, "steps_per_s": 3.1, "eta_s": 116.0, "skipped_steps": 0, "peak_memory_gib": 15.2}   (peak_rss_gib on CPU
     workers; skipped_steps: optimizer steps skipped so far on fp16 overflow; a run's first step is told at once,
     its steps_per_s and eta_s null: it paid for the load and any compiling)
    {"type": "compiled", "step": 1, "seconds": 184.2, "graphs": 2, "cudagraph_skips": 0}   (torch_compile: a run's
     first step, compiling; cudagraph_skips: compiled graphs that run without CUDA graphs, launch by launch)
    {"type": "checkpoint", "step": 100, "path": "...", "stall_s": 1.2, "waited_s": 0.9}   (committed: where a restart
     resumes; waited_s: of the stall, waiting for the checkpoint before it to be written)
    {"type": "validation", "step": 100, "path": ".../validation/step_0000100.png", "peak_memory_gib": 15.4}
    {"type": "model", "path": "...", "metadata": {...}}
"""

from __future__ import annotations

import errno
import json
import logging
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class EventLog:
    """Appends events to a JSONL file. Safe across processes: each event is one O_APPEND write."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def emit(self, type: str, **fields: Any) -> dict[str, Any]:
        event = {"type": type, "time": time.time(), **fields}
        line = (json.dumps(event, default=str) + "\n").encode()
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":  # a line torn by a crash: this one must not join it
                line = b"\n" + line
            if os.write(fd, line) < len(line):  # the disk filled up mid-line
                os.write(fd, b"\n")  # ends the torn line, which readers skip, rather than glue the next one to it
                raise OSError(errno.ENOSPC, f"{self.path}: event cut short", str(self.path))
        finally:
            os.close(fd)
        return event


def seconds_run(events: list[dict[str, Any]], now: float) -> float:
    """The wall time of all the job's runs so far: each from its start (PREPARING) to its last event, the current
    one to `now`; a run refused before it started (INVALID_INPUT), and the time between runs, count nothing."""
    total, run_start, last = 0.0, None, 0.0
    for event in events:
        if event["type"] == "state" and event.get("state") == "PREPARING":
            if run_start is not None:
                total += last - run_start
            run_start = event["time"]
        elif event["type"] == "state" and event.get("reason") == "INVALID_INPUT":
            continue
        last = event["time"]
    return total + (now - run_start if run_start is not None else 0.0)


def parse_event(line: bytes | str) -> dict[str, Any] | None:
    """One line's event, or None (logged) for a line that is not one: torn by a full disk or a power loss, or
    interleaved by two nodes appending at once over NFS. Readers skip it rather than stop at it for good."""
    try:
        event = json.loads(line)
    except ValueError:
        event = None
    if isinstance(event, dict) and isinstance(event.get("type"), str):
        return event
    log.warning("skipped an unreadable event line: %r", line[:200])
    return None


def read_events(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.exists():
        return []
    events = (parse_event(line) for line in path.read_bytes().splitlines() if line.strip())
    return [event for event in events if event is not None]


def follow_events(
    path: str | Path, stop: threading.Event, poll_s: float = 0.2, offset: int = 0
) -> Iterator[dict[str, Any]]:
    """Yield events appended after byte `offset`, until `stop` is set (then drain what is left and return). A read
    that fails (a shared file system's stale handle or I/O error for a moment) is tried again at the next poll: a
    follower ending there showed nothing more of a run of hours."""
    path = Path(path)
    partial = b""
    failing = False
    while True:
        stopping = stop.is_set()
        try:
            with path.open("rb") as f:
                f.seek(offset)
                chunk = f.read()
            failing = False
        except FileNotFoundError:  # not written yet
            chunk = b""
        except OSError as e:
            if not failing:
                log.warning("reading %s failed (%s): trying again", path, e)
            failing = True
            chunk = b""
        offset += len(chunk)
        partial += chunk
        *lines, partial = partial.split(b"\n")
        for line in lines:
            if line.strip() and (event := parse_event(line)) is not None:
                yield event
        if stopping:
            return
        stop.wait(poll_s)
