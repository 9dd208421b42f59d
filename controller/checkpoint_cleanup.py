"""Removes the checkpoints of jobs that ended: the largest thing a job leaves on storage.

Each of a job's `checkpoints_to_keep` checkpoints is ~11 GiB for SD 1.5 under ZeRO-2, and nothing reads them
once the job has ended: no RPC runs an ended job again (a submission is a new job), and a successful job's
model was exported before it reported SUCCEEDED. (`dreambooth train`, without a controller, keeps them: a
rerun of its job with more steps resumes from them.) The job's other files (spec, photos, events, validation
grids, TensorBoard logs) stay until DeleteJob.

The trainer reports SUCCEEDED as its driver's last act, so the driver may still be running when the job ends:
the removal waits for Ray to report the driver ended. It runs on a thread of its own, as removing tens of GiB
from a shared file system takes a while and a reconcile pass must not wait for it. A controller that stops
before the removal leaves the checkpoints in place; DeleteJob removes them with the rest of the job.
"""

from __future__ import annotations

import logging
import queue
import shutil
import threading
import time
from pathlib import Path

from controller.ray_jobs import RayJobs, RayJobsError
from controller.store import JobRecord
from trainer.storage import job_paths

log = logging.getLogger(__name__)

POLL_S = 2.0  # how often the driver's status is asked while it is still running
DRIVER_EXIT_WAIT_S = 600  # a driver still running this long after its job ended keeps its checkpoints (logged)


class CheckpointCleanup:
    def __init__(self, storage: Path, ray_jobs: RayJobs, poll_s: float = POLL_S):
        self._storage = storage
        self._ray_jobs = ray_jobs
        self._poll_s = poll_s
        self._stopping = threading.Event()
        self._ended: queue.SimpleQueue[tuple[str, str | None] | None] = queue.SimpleQueue()
        # A daemon: a process that exits without stop() (a test's) must not wait on a driver that still runs.
        self._thread = threading.Thread(target=self._run, name="checkpoint-cleanup", daemon=True)
        self._thread.start()

    def job_ended(self, job: JobRecord) -> None:
        """Removes the ended job's checkpoints once its Ray job (if it had one) has ended too."""
        self._ended.put((job.job_id, job.ray_submission_id))

    def stop(self) -> None:
        self._stopping.set()
        self._ended.put(None)
        self._thread.join(timeout=30)

    def _run(self) -> None:
        while (ended := self._ended.get()) is not None and not self._stopping.is_set():
            try:
                self._remove(*ended)
            except Exception:
                log.exception("job %s ended: removing its checkpoints failed", ended[0])

    def _remove(self, job_id: str, submission_id: str | None) -> None:
        checkpoints = job_paths(self._storage, job_id).checkpoints_dir
        if not checkpoints.exists():
            return
        if submission_id is not None and not self._driver_ended(job_id, submission_id):
            return
        try:
            shutil.rmtree(checkpoints)
        except FileNotFoundError:
            pass  # DeleteJob took the job meanwhile
        except OSError as e:
            log.warning("job %s ended: cannot remove its checkpoints %s (DeleteJob will): %s", job_id, checkpoints, e)
            return
        log.info("job %s ended: removed its checkpoints", job_id)

    def _driver_ended(self, job_id: str, submission_id: str) -> bool:
        deadline = time.monotonic() + DRIVER_EXIT_WAIT_S
        while not self._stopping.is_set():
            try:
                if self._ray_jobs.status(submission_id).ended:
                    return True
            except RayJobsError as e:  # Ray unreachable for a moment: asked again
                log.debug("job %s: status of its Ray job: %s", job_id, e)
            if time.monotonic() > deadline:
                log.warning(
                    "job %s ended, but its Ray job %s still runs after %d s: its checkpoints are kept (DeleteJob "
                    "removes them)",
                    job_id,
                    submission_id,
                    DRIVER_EXIT_WAIT_S,
                )
                return False
            self._stopping.wait(self._poll_s)
        return False
