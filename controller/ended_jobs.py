"""What a job leaves behind once it has ended, tidied on a thread of the controller's own.

Once an ended job's Ray job has ended too:
- its driver's log is kept in its folder (`driver.log`, what GetJobLogs answers from then on), and Ray's records
  of its attempts are deleted. Ray keeps a job's record (up to ~20 KB: a failed one's carries its log's tail) in
  the head's memory until it is deleted, so a long-lived cluster's grew by one per attempt ever run; and a head
  restarted without fault tolerance lost them, and the logs of every job that had ended with them.
- a successful job's checkpoints are removed: ~11 GiB each for SD 1.5 under ZeRO-2, `checkpoints_to_keep` of
  them, that nothing reads once its model is exported (no RPC runs an ended job again). A failed or cancelled job
  keeps them, until DeleteJob: `dreambooth train --job-id` on the same storage resumes it from them, or only
  exports where training had finished.

The trainer reports its verdict as its driver's last act (training's workers ended before the export), so this
waits for Ray to report the driver ended. A thread of its own: Ray's API may be slow and removing tens of GiB from
a shared file system takes a while, and a reconcile pass must not wait for either. What a controller stopped
meanwhile leaves, the next one's start finds again (jobs that ended within SWEEP_S).
"""

from __future__ import annotations

import logging
import queue
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from controller.ray_jobs import RayJobs, RayJobsError, submission_id
from dreambooth.durable import write_file
from trainer.storage import job_paths

log = logging.getLogger(__name__)

POLL_S = 2.0  # how often the driver's status is asked while it is still running
DRIVER_EXIT_WAIT_S = 600  # a driver still running (or Ray unreachable) this long: left to the next start's sweep
SWEEP_S = 7 * 24 * 3600  # at start: jobs that ended this recently are looked at again


@dataclass(frozen=True)
class EndedJob:
    job_id: str
    state: str
    attempts: int  # Ray submissions <job_id>-a1 .. -a<attempts>; 0: never submitted


class EndedJobs:
    def __init__(self, storage: Path, ray_jobs: RayJobs, poll_s: float = POLL_S):
        self._storage = storage
        self._ray_jobs = ray_jobs
        self._poll_s = poll_s
        self._stopping = threading.Event()
        self._ended: queue.SimpleQueue[EndedJob | None] = queue.SimpleQueue()
        # A daemon: a process that exits without stop() (a test's) must not wait on a driver that still runs.
        self._thread = threading.Thread(target=self._run, name="ended-jobs", daemon=True)
        self._thread.start()

    def job_ended(self, job: EndedJob) -> None:
        self._ended.put(job)

    def stop(self) -> None:
        self._stopping.set()
        self._ended.put(None)
        self._thread.join(timeout=30)

    def _run(self) -> None:
        while (job := self._ended.get()) is not None and not self._stopping.is_set():
            try:
                self._tidy(job)
            except FileNotFoundError:
                pass  # DeleteJob took the job meanwhile
            except (OSError, RayJobsError) as e:
                log.warning("job %s ended: tidying what it left failed (the next start retries): %s", job.job_id, e)
            except Exception:
                log.exception("job %s ended: tidying what it left failed", job.job_id)

    def _tidy(self, job: EndedJob) -> None:
        paths = job_paths(self._storage, job.job_id)
        if job.attempts and not paths.driver_log.exists():  # the log kept says Ray's records went too
            last = submission_id(job.job_id, job.attempts)
            if not self._driver_ended(job.job_id, last):
                return
            write_file(paths.driver_log, self._ray_jobs.logs(last))  # first: deleted records take their logs
            for attempt in range(1, job.attempts + 1):
                self._ray_jobs.delete(submission_id(job.job_id, attempt))
        if job.state == "SUCCEEDED" and paths.checkpoints_dir.exists():
            shutil.rmtree(paths.checkpoints_dir)
            log.info("job %s succeeded: removed its checkpoints", job.job_id)

    def _driver_ended(self, job_id: str, submission: str) -> bool:
        deadline = time.monotonic() + DRIVER_EXIT_WAIT_S
        error: RayJobsError | None = None
        while not self._stopping.is_set():
            try:
                if self._ray_jobs.status(submission).ended:
                    return True
                error = None
            except RayJobsError as e:  # Ray unreachable for a moment: asked again
                error = e
            if time.monotonic() > deadline:
                why = f"Ray cannot say whether it ended ({error})" if error else "it still runs"
                log.warning(
                    "job %s ended, but its Ray job %s: %s after %d s; what it left stays (the next start retries)",
                    job_id,
                    submission,
                    why,
                    DRIVER_EXIT_WAIT_S,
                )
                return False
            self._stopping.wait(self._poll_s)
        return False
