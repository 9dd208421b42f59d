"""What a job leaves behind once it has ended, tidied on a thread of the controller's own.

Once an ended job's Ray job has ended too:
- its drivers' logs (every attempt's) are kept in its folder (`driver.log`, what GetJobLogs answers from then
  on), and Ray's records of its attempts are deleted. Ray keeps a job's record (up to ~20 KB: a failed one's
  carries its log's tail) in the head's memory until it is deleted, so a long-lived cluster's grew by one per
  attempt ever run; and a head restarted without fault tolerance lost them, and the logs of every job that had
  ended with them.
- a successful job's checkpoints are removed: ~11 GiB each for SD 1.5 under ZeRO-2, `checkpoints_to_keep` of
  them, that nothing reads once its model is exported (no RPC runs an ended job again). A failed or cancelled job
  keeps them, until DeleteJob: `dreambooth train --job-id` on the same storage resumes it from them, or only
  exports where training had finished.

The trainer reports its verdict as its driver's last act (training's workers ended before the export), so this
waits for Ray to report the driver ended; a driver still running DRIVER_EXIT_WAIT_S after its verdict hangs on its
way out, holding its workers (GPUs) for good, and is stopped. A thread of its own: Ray's API may be slow and
removing tens of GiB from a shared file system takes a while, and a reconcile pass must not wait for either. What
could not be done (Ray or the storage unreachable) is tried again a few times, then logged as an error; what a
controller stopped meanwhile leaves, the next one's start finds again (jobs that ended within SWEEP_S: Ray's
records of jobs that ended before stay until its head restarts).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import queue
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from controller.ray_jobs import RayJobs, RayJobsError, RayJobStatus, submission_id
from dreambooth.durable import write_file
from trainer.storage import job_paths

log = logging.getLogger(__name__)

POLL_S = 2.0  # how often the driver's status is asked while it is still running
DRIVER_EXIT_WAIT_S = 600  # a driver still running (or Ray unreachable) this long: tried again later
RETRY_S = 60.0  # a tidy that could not finish (Ray or the storage unreachable) is tried again after this
TRIES = 5
SWEEP_S = 7 * 24 * 3600  # at start: jobs that ended this recently are looked at again


@dataclass(frozen=True)
class EndedJob:
    job_id: str
    state: str
    attempts: int  # Ray submissions <job_id>-a1 .. -a<attempts>; 0: never submitted
    swept: bool = False  # found by a start's sweep: maybe tidied already, by the controller before
    tries: int = 0


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
                done = self._tidy(job)
            except Exception as e:
                log.warning(
                    "job %s ended: tidying what it left failed (try %d of %d): %s", job.job_id, job.tries + 1, TRIES, e
                )
                done = False
            if done:
                continue
            if job.tries + 1 < TRIES:
                # Not as swept: a swept job whose log was kept before Ray failed still has Ray's records to delete.
                again = dataclasses.replace(job, tries=job.tries + 1, swept=False)
                retry = threading.Timer(RETRY_S, self._ended.put, [again])
                retry.daemon = True
                retry.start()
            else:
                kept = "its checkpoints, " if job.state == "SUCCEEDED" else ""
                log.error(
                    "job %s ended: gave up tidying what it left after %d tries; %sRay's records of it and its driver's "
                    "log (in Ray) stay until a controller starting within %d days tries again, or DeleteJob",
                    job.job_id,
                    TRIES,
                    kept,
                    SWEEP_S // (24 * 3600),
                )

    def _tidy(self, job: EndedJob) -> bool:
        """Whether it is done: its driver ended, and what it left is kept or gone as it should be."""
        paths = job_paths(self._storage, job.job_id)
        checkpoints_left = job.state == "SUCCEEDED" and paths.checkpoints_dir.exists()
        if job.swept and (paths.driver_log.exists() or not job.attempts) and not checkpoints_left:
            return True
        if job.attempts:
            last = submission_id(job.job_id, job.attempts)
            status = self._driver_status(job.job_id, last)
            if status is None:
                return False
        if checkpoints_left:  # first: keeping the log of a few KB may fail on the full disk they would free
            with contextlib.suppress(FileNotFoundError):  # DeleteJob took them meanwhile
                shutil.rmtree(paths.checkpoints_dir)
                log.info("job %s succeeded: removed its checkpoints", job.job_id)
        if job.attempts:
            # Ray knowing no such job (its head restarted; a dashboard URL of another cluster for a while) leaves
            # nothing to keep: GetJobLogs asks Ray as before.
            if status != RayJobStatus.LOST and not paths.driver_log.exists():
                text = self._ray_jobs.attempt_logs(job.job_id, job.attempts)
                with contextlib.suppress(FileNotFoundError):  # DeleteJob took its folder: Ray's records go too
                    write_file(paths.driver_log, text)  # first: a deleted record takes its log with it
            for attempt in range(1, job.attempts + 1):
                self._ray_jobs.delete(submission_id(job.job_id, attempt))
        return True

    def _driver_status(self, job_id: str, submission: str) -> RayJobStatus | None:
        """The status of its driver once it has ended; None if Ray cannot say after a while, or if it still runs
        then: it is stopped (and tidied at the next try)."""
        deadline = time.monotonic() + DRIVER_EXIT_WAIT_S
        error: RayJobsError | None = None
        while not self._stopping.is_set():
            try:
                status = self._ray_jobs.status(submission)
                if status.ended:
                    return status
                error = None
            except RayJobsError as e:  # Ray unreachable for a moment: asked again
                error = e
            if time.monotonic() > deadline:
                why = f"Ray cannot say whether it ended ({error})" if error else "it still runs: stopping it"
                log.warning(
                    "job %s ended, but its Ray job %s: %s after %d s", job_id, submission, why, DRIVER_EXIT_WAIT_S
                )
                if error is None:
                    self._ray_jobs.stop(submission)
                return None
            self._stopping.wait(self._poll_s)
        return None
