"""Training attempts as Ray jobs, through Ray's Jobs API (the dashboard's HTTP endpoint).

One Ray job per training attempt, never a thread of the controller: the job's driver (`python -m trainer.run`)
runs on the cluster, so training goes on while the controller restarts, and a restarted controller finds the
attempt again by its submission id, f"{job_id}-a{attempt}".
"""

from __future__ import annotations

import shlex
import sys
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from ray.exceptions import AuthenticationError
from ray.job_submission import JobSubmissionClient
from ray.util.state import list_nodes
from ray.util.state.common import RAY_MAX_LIMIT_FROM_API_SERVER
from ray.util.state.exception import RayStateApiException
from urllib3.exceptions import NewConnectionError

from dreambooth.errors import PLACEMENT_TIMEOUT_ENV, PLACEMENT_TIMEOUT_S
from dreambooth.ray_dashboard import WORKER_ENV, RequestTimeout
from trainer.storage import check_job_id

PROJECT_ROOT = Path(__file__).resolve().parents[1]
# What a failing request to the dashboard raises: the SDK's RuntimeError for HTTP errors, OSError (requests'
# errors included) when it cannot be reached or times out, AuthenticationError for a missing/wrong token.
_RAY_ERRORS = (RuntimeError, OSError, AuthenticationError, RayStateApiException)


class RayJobsError(Exception):
    """Ray's Jobs API failed (unreachable, refused, ...); the message says what and where. `reached_ray` is false
    where no connection to it was ever made, so the request surely did not arrive (one that timed out may have);
    `refused_token`: Ray refused the request for its authentication token (none sent, or another cluster's)."""

    def __init__(self, message: str, reached_ray: bool = True, refused_token: bool = False):
        super().__init__(message)
        self.reached_ray = reached_ray
        self.refused_token = refused_token


class RayJobStatus(str, Enum):
    PENDING = "PENDING"
    RUNNING = "RUNNING"
    STOPPED = "STOPPED"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    # Ray does not know the id: the head was restarted (without GCS fault tolerance job records die with it).
    LOST = "LOST"

    @property
    def ended(self) -> bool:
        return self not in (RayJobStatus.PENDING, RayJobStatus.RUNNING)


@dataclass(frozen=True)
class Capacity:
    nodes: int
    cpus: float
    gpus: float


class JobsClient(RequestTimeout, JobSubmissionClient):
    """Ray's Jobs API client, each request bounded by `timeout_s`."""

    def __init__(self, address: str, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        super().__init__(address)


def _not_found(e: Exception) -> bool:
    # The SDK turns HTTP errors into RuntimeError("Request failed with status code 404: Job X does not exist.")
    return isinstance(e, RuntimeError) and "status code 404" in str(e)


def _never_connected(e: BaseException | None) -> bool:
    """Whether `e` comes from a connection to the dashboard that was never made (refused, no route): then no
    request reached it. requests wraps urllib3's NewConnectionError in a MaxRetryError (its `reason`); Ray's client
    wraps that in a ConnectionError of its own when it cannot connect at all."""
    while e is not None:
        for error in (e, getattr(e, "reason", None), *e.args):
            if isinstance(error, NewConnectionError) or isinstance(getattr(error, "reason", None), NewConnectionError):
                return True
        e = e.__cause__ or e.__context__
    return False


def submission_id(job_id: str, attempt: int) -> str:
    """Attempt `attempt`'s Ray submission id: derived, so that a controller that died between submitting and
    recording finds it, and Ray refuses a second submission of it."""
    return f"{job_id}-a{attempt}"


class RayJobs:
    def __init__(
        self,
        dashboard_url: str,
        *,
        storage_root: str,
        timeout_s: float = 30,
        placement_timeout_s: float = PLACEMENT_TIMEOUT_S,
    ) -> None:
        self.dashboard_url = dashboard_url.rstrip("/")
        self.placement_timeout_s = placement_timeout_s  # the trainer's: how long its workers may wait to be placed
        self.storage_root = str(Path(storage_root).resolve())  # the driver's working directory is Ray's, not ours
        self.timeout_s = timeout_s
        self._client_: JobsClient | None = None

    @property
    def _client(self) -> JobsClient:
        # Connected on first use (the constructor checks the connection): a controller may start before Ray.
        if self._client_ is None:
            self._client_ = JobsClient(self.dashboard_url, self.timeout_s)
        return self._client_

    def _error(self, what: str, e: Exception) -> RayJobsError:
        message = f"Ray Jobs API at {self.dashboard_url}: {what} failed: {type(e).__name__}: {e}"
        return RayJobsError(
            message, reached_ray=not _never_connected(e), refused_token=isinstance(e, AuthenticationError)
        )

    def submit(self, job_id: str, attempt: int) -> str:
        """Start attempt `attempt` of job `job_id`; returns its submission id. Submitting an attempt that Ray
        already has returns its id and starts nothing: a controller that crashed between submitting and
        recording the submission can simply retry. A bad job id raises InputError before anything is sent."""
        submission = submission_id(check_job_id(job_id), attempt)
        command = [sys.executable, "-P", "-m", "trainer.run", "--storage", self.storage_root, "--job-id", job_id]
        # No working_dir (it would upload the project on every submit): the nodes have the project at the same
        # path, and PYTHONPATH makes it importable for the driver and the workers it starts (they inherit it).
        # -P: not the driver's working directory (where Ray was started) first on sys.path, whose own `trainer/`
        # package would replace the project's.
        env_vars = {
            **WORKER_ENV,
            "PYTHONPATH": str(PROJECT_ROOT),
            # An environment variable, not a flag: a trainer older than the controller (Ray's nodes updated after
            # it, in a rolling upgrade) ignores it rather than refusing to start.
            PLACEMENT_TIMEOUT_ENV: f"{self.placement_timeout_s:g}",
        }
        try:
            return self._client.submit_job(
                entrypoint=shlex.join(command),
                submission_id=submission,
                runtime_env={"env_vars": env_vars},
            )
        except _RAY_ERRORS as e:
            # Ray refuses a known id (HTTP 500 wrapping "Job with submission_id X already exists").
            if isinstance(e, RuntimeError) and f"submission_id {submission} already exists" in str(e):
                return submission
            raise self._error(f"submitting {submission}", e) from e

    def status(self, submission_id: str) -> RayJobStatus:
        try:
            return RayJobStatus(self._client.get_job_status(submission_id).value)
        except _RAY_ERRORS as e:
            if _not_found(e):
                return RayJobStatus.LOST
            raise self._error(f"status of {submission_id}", e) from e

    def stop(self, submission_id: str) -> None:
        """Ask Ray to stop the job (SIGTERM to the driver, SIGKILL a few seconds later; Ray then ends the job's
        actors: the Train controller and its workers). Stopping an ended or unknown job does nothing."""
        try:
            self._client.stop_job(submission_id)
        except _RAY_ERRORS as e:
            if not _not_found(e):
                raise self._error(f"stopping {submission_id}", e) from e

    def delete(self, submission_id: str) -> None:
        """Deletes Ray's record of an ended job (its info and status in the head's memory; not its log file on
        the head's disk). Deleting an unknown job does nothing."""
        try:
            self._client.delete_job(submission_id)
        except _RAY_ERRORS as e:
            if not _not_found(e):
                raise self._error(f"deleting {submission_id}", e) from e

    def logs(self, submission_id: str) -> str:
        """The driver's output (the workers' output stays in Ray's log files: the driver does not forward it);
        empty when Ray no longer knows the job (its head restarted)."""
        try:
            return self._client.get_job_logs(submission_id)
        except _RAY_ERRORS as e:
            if _not_found(e):
                return ""
            raise self._error(f"logs of {submission_id}", e) from e

    def attempt_logs(self, job_id: str, attempts: int) -> str:
        """The logs of a job's attempts 1..`attempts`, oldest first, each under a line naming it (an earlier attempt's
        is why the job was run again); one attempt's alone, as it is. Empty where Ray has none of them (its head
        restarted; the controller has just kept them and deleted Ray's records)."""
        submissions = [submission_id(job_id, attempt) for attempt in range(1, attempts + 1)]
        texts = [self.logs(submission) for submission in submissions]
        if len(texts) == 1 or not any(texts):
            return "".join(texts)
        return "".join(
            f"=== attempt {attempt} of {attempts} (Ray job {submission}) ===\n"
            + (text if text.endswith("\n") else f"{text or '(no output from Ray)'}\n")
            for attempt, (submission, text) in enumerate(zip(submissions, texts, strict=True), start=1)
        )

    def cluster_capacity(self) -> Capacity:
        """Total CPUs and GPUs of the alive nodes (the state API, served by the same dashboard)."""
        try:
            # The state API answers 100 nodes unless told more, and says nothing of the rest: a 150-node cluster's
            # capacity read as 100 nodes'. Its server's cap, 10,000 by default, is the most it answers.
            nodes = list_nodes(
                address=self.dashboard_url,
                filters=[("state", "=", "ALIVE")],
                limit=RAY_MAX_LIMIT_FROM_API_SERVER,
                timeout=int(self.timeout_s),
            )
        except _RAY_ERRORS as e:
            raise self._error("listing nodes", e) from e
        cpus = sum(n.resources_total.get("CPU", 0.0) for n in nodes)
        gpus = sum(n.resources_total.get("GPU", 0.0) for n in nodes)
        return Capacity(nodes=len(nodes), cpus=cpus, gpus=gpus)
