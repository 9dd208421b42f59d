"""Removes the checkpoints of jobs that succeeded: the largest thing a job leaves on storage.

Each of a job's `checkpoints_to_keep` checkpoints is ~11 GiB for SD 1.5 under ZeRO-2, and nothing reads a
successful job's: its model was exported from them before it reported SUCCEEDED, and no RPC runs an ended job
again. A failed or cancelled job keeps them (until DeleteJob): `dreambooth train --job-id` on the same storage
resumes it from them, or only exports when training had finished. The job's other files (spec, photos,
events, validation grids, TensorBoard logs) stay until DeleteJob too.

The trainer reports SUCCEEDED as its driver's last act (training's workers ended before the export), so the
removal only waits for Ray to report that the driver ended. It runs on a thread of its own, as removing tens of
GiB from a shared file system takes a while and a reconcile pass must not wait for it. What a controller stopped
before a removal leaves, the next one's start finds again (jobs that succeeded within SWEEP_S).
"""

from __future__ import annotations

import logging
import queue
import shutil
import threading
import time
from pathlib import Path

from controller.ray_jobs import RayJobs, RayJobsError
from trainer.storage import job_paths

log = logging.getLogger(__name__)

POLL_S = 2.0  # how often the driver's status is asked while it is still running
DRIVER_EXIT_WAIT_S = 600  # a driver still running (or Ray unreachable) this long keeps its job's checkpoints
SWEEP_S = 7 * 24 * 3600  # at start: jobs that succeeded this recently are looked at again


class CheckpointCleanup:
    def __init__(self, storage: Path, ray_jobs: RayJobs, poll_s: float = POLL_S):
        self._storage = storage
        self._ray_jobs = ray_jobs
        self._poll_s = poll_s
        self._stopping = threading.Event()
        self._succeeded: queue.SimpleQueue[tuple[str, str | None] | None] = queue.SimpleQueue()
        # A daemon: a process that exits without stop() (a test's) must not wait on a driver that still runs.
        self._thread = threading.Thread(target=self._run, name="checkpoint-cleanup", daemon=True)
        self._thread.start()

    def job_succeeded(self, job_id: str, submission_id: str | None) -> None:
        """Removes the job's checkpoints once its Ray job (if it had one) has ended too."""
        self._succeeded.put((job_id, submission_id))

    def stop(self) -> None:
        self._stopping.set()
        self._succeeded.put(None)
        self._thread.join(timeout=30)

    def _run(self) -> None:
        while (succeeded := self._succeeded.get()) is not None and not self._stopping.is_set():
            try:
                self._remove(*succeeded)
            except Exception:
                log.exception("job %s succeeded: removing its checkpoints failed", succeeded[0])

    def _remove(self, job_id: str, submission_id: str | None) -> None:
        checkpoints = job_paths(self._storage, job_id).checkpoints_dir
        if not checkpoints.exists():
            return
        if submission_id is not None and not self._driver_ended(job_id, submission_id):
            return
        try:
            shutil.rmtree(checkpoints)
        except FileNotFoundError:
            return  # DeleteJob took the job meanwhile
        except OSError as e:
            log.warning(
                "job %s succeeded: cannot remove its checkpoints %s (DeleteJob will): %s", job_id, checkpoints, e
            )
            return
        log.info("job %s succeeded: removed its checkpoints", job_id)

    def _driver_ended(self, job_id: str, submission_id: str) -> bool:
        deadline = time.monotonic() + DRIVER_EXIT_WAIT_S
        error: RayJobsError | None = None
        while not self._stopping.is_set():
            try:
                if self._ray_jobs.status(submission_id).ended:
                    return True
                error = None
            except RayJobsError as e:  # Ray unreachable for a moment: asked again
                error = e
            if time.monotonic() > deadline:
                why = f"Ray cannot say whether it ended ({error})" if error else "it still runs"
                log.warning(
                    "job %s succeeded, but its Ray job %s: %s after %d s; its checkpoints are kept (a restart of the "
                    "controller looks again; DeleteJob removes them)",
                    job_id,
                    submission_id,
                    why,
                    DRIVER_EXIT_WAIT_S,
                )
                return False
            self._stopping.wait(self._poll_s)
        return False
