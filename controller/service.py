"""The job lifecycle behind the RPCs: submit, get, list, cancel, delete, watch, logs; models: deploy, undeploy, delete.

    QUEUED -> PREPARING -> TRAINING -> EXPORTING -> SUCCEEDED
       |          \\____________\\___________\\-----> FAILED
       |           \\____________\\___________\\----> CANCELLING -> CANCELLED
       |                                                    |---> FAILED (RUN_TIME_EXCEEDED, at max_job_run_s)
       |                                                    \\---> SUCCEEDED (its model was written first)
       \\-----------------------------------------> CANCELLED

Everything here is one store transaction or a compare-and-set on the job's state, so concurrent calls and
the reconciler (which drives running jobs, see controller.reconciler) cannot both win a transition.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import shutil
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NoReturn

from controller import orphans
from controller.config import ControllerConfig, Tenant
from controller.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    NotFound,
    QuotaExceeded,
    StorageFailed,
)
from controller.feed import Change, ChangeFeed
from controller.intake import IMAGE_CHECKS_AT_ONCE, ImageCheckSlots, ImageInput, PhotoIntake, shared_path
from controller.ray_jobs import RayJobs, RayJobsError
from controller.scheduler import Queue, Resources, Waiting, demand, shortfalls, training_share
from controller.serving import RETRY_INTERVAL_S as SERVING_RETRY_INTERVAL_S
from controller.serving import ServingSync
from controller.store import (
    RUNNING_STATES,
    STATES,
    TERMINAL_STATES,
    UNFINISHED_STATES,
    JobRecord,
    ModelRecord,
    Store,
    TenantFull,
    new_job_id,
)
from dreambooth.durable import sync_dir, write_file
from dreambooth.errors import InputError, is_system_error
from dreambooth.proto_convert import MAX_PRIORITY, MIN_PRIORITY
from trainer.images import check_instance_images
from trainer.preflight import check_prompt_lengths, check_sampling_steps, check_trainable_base_model
from trainer.spec import JobSpec
from trainer.storage import JobPaths, job_paths

log = logging.getLogger(__name__)

CANCEL_STOP_WAIT_S = 5.0


class JobService:
    def __init__(
        self,
        config: ControllerConfig,
        store: Store,
        ray_jobs: RayJobs,
        feed: ChangeFeed,
        serving: ServingSync | None = None,
    ):
        self.config = config
        self.store = store
        self.ray_jobs = ray_jobs
        self.feed = feed
        self.serving = serving
        # Without tenants, one user has the cluster: its running jobs are bounded by the capacity alone (an 8-GPU
        # workstation ran two 1-GPU jobs at a time, the other GPUs idle).
        local_user = Tenant("default", (), max_running_jobs=sys.maxsize)
        self.tenants: dict[str, Tenant] = {t.name: t for t in config.tenants} or {"default": local_user}
        self._intake = PhotoIntake(config)
        self._database_id = store.database_id()
        self._image_checks = ImageCheckSlots(IMAGE_CHECKS_AT_ONCE)
        # Deploys, undeploys and deletions of models, one at a time (see delete_model). They are rare, and a model's
        # files (a few dozen) go in a moment.
        self._model_changes = threading.Lock()
        # What the reconciler's last scheduling pass found queued jobs wait for (Job.queued): derived each pass, not
        # stored. Replaced whole, by the reconciler's thread only.
        self._queue = Queue()

    def running_limits(self) -> dict[str, int]:
        """Tenant -> how many of its jobs may run at once."""
        return {name: tenant.max_running_jobs for name, tenant in self.tenants.items()}

    @property
    def queue(self) -> Queue:
        """What the last scheduling pass found queued jobs wait for."""
        return self._queue

    def set_queue(self, queue: Queue) -> None:
        """Records what the last scheduling pass found. Each job whose own reason changed is published, for its
        watchers (those told by their tenant's or the queue's reason find a change within a second: `watch`)."""
        before, self._queue = self._queue, queue
        for job_id in queue.by_job.keys() | before.by_job.keys():
            if queue.by_job.get(job_id) != before.by_job.get(job_id):
                self.feed.publish(job_id, "queued")

    def waiting_for(self, job: JobRecord) -> Waiting | None:
        """Why `job` has not started, while it is QUEUED (None before a scheduling pass saw it)."""
        return self._queue.waiting_for(job) if job.state == "QUEUED" else None

    # --- jobs ------------------------------------------------------------------------------------------

    def submit(
        self,
        tenant: str,
        spec_fields: dict,
        images: list[ImageInput],
        request_id: str = "",
        priority: int = 0,
        waited_for: Callable[[], bool] = lambda: True,
    ) -> JobRecord:
        """Checks, stages the photos and records a QUEUED job. `waited_for()` false (the caller's deadline passed
        while its photos were checked, or it went away) records nothing: a client told DEADLINE_EXCEEDED, or whose
        user pressed Ctrl-C, that submits again must not find its first job queued too."""
        if len(request_id) > 128 or "\x00" in request_id:
            raise InputError("request_id", "at most 128 characters, no NUL")
        if request_id and (existing := self.store.find_by_request_id(tenant, request_id)) is not None:
            _check_same_request(
                self.config, existing, spec_fields, images, lambda: self._intake.digests(images), priority
            )
            return existing
        limit = self.tenants[tenant].max_queued_jobs
        # Early, before the photos are staged; the insert counts again, atomically (concurrent submissions).
        if (unfinished := self.store.count_tenant_jobs(tenant, UNFINISHED_STATES)) >= limit:
            raise _tenant_full(tenant, unfinished, limit)
        if not MIN_PRIORITY <= priority <= MAX_PRIORITY:
            raise InputError("priority", f"must be in [{MIN_PRIORITY}, {MAX_PRIORITY}]")

        paths = self._new_job_dir()
        job_id = paths.job_id
        try:
            # The fields first: no photo is read or copied for a request one of them refuses.
            JobSpec.from_dict({**spec_fields, "instance_images": [str(paths.uploads_dir)]}).validate_new()
            image_paths, sent_as = self._intake.stage(images, paths.uploads_dir)
            spec = JobSpec.from_dict({**spec_fields, "instance_images": image_paths})
            self._check_fits(spec)
            # The checks the trainer would make first, made now: bad input is the caller's to fix, at once.
            # OSError (a name too long, say) and RuntimeError (expanduser of "~nosuchuser") come from the caller's
            # paths too: the caller's to fix, not an internal error.
            if not Path(spec.base_model).is_absolute():  # the trainer would read it relative to the job's folder
                raise InputError("base_model", f"{spec.base_model}: must be an absolute path on shared storage")
            self._intake.check_readable("base_model", spec.base_model)
            try:
                check_trainable_base_model(spec.base_model)
                check_prompt_lengths(spec)
                check_sampling_steps(spec)
            except (OSError, RuntimeError) as e:
                if is_system_error(e):
                    raise  # the controller's storage or process (an NFS hiccup, no descriptors left): not the input
                raise InputError("base_model", f"cannot read {spec.base_model!r}: {e}") from e

            def check_caller() -> None:  # before each photo too: decoding 64 of them can take minutes
                if not waited_for():
                    raise DeadlineExceeded(
                        f"the caller's deadline passed before job {job_id}'s photos were checked: nothing queued"
                    )

            try:
                with self._image_checks.slot(tenant if self.config.tenants else None, check_caller):
                    check_instance_images(spec.instance_images, spec.resolution, bounded=True, before_each=check_caller)
            except InputError as e:
                # Named as the caller sent them, not as the job's copies: paths on the controller's storage, of a
                # job never recorded, that the caller would have to map back to its photos.
                raise InputError(e.field, _as_sent(e.message, sent_as)) from None
            except OSError as e:
                if is_system_error(e):
                    raise
                raise InputError("instance_images", f"cannot read the images: {e}") from e
            # On disk before the row commits and the client is told: a power loss must not leave a job whose
            # spec or photos are empty files, which every attempt would fail on.
            write_file(paths.spec_file, json.dumps(spec.to_dict(), indent=2))
            sync_dir(paths.job_dir.parent)
            if not waited_for():
                raise DeadlineExceeded(f"the caller's deadline passed before job {job_id} was recorded: nothing queued")
            record = JobRecord(
                job_id=job_id,
                tenant=tenant,
                request_id=request_id or None,
                state="QUEUED",
                priority=priority,
                spec=spec.to_dict(),
            )
            try:
                job = self.store.insert_job(record, max_unfinished=limit)
            except TenantFull as e:
                raise _tenant_full(tenant, e.unfinished, limit) from e
        except BaseException:
            self._discard_staged(job_id)
            raise
        if job.job_id != job_id:  # lost a race with the same request_id: keep the first, drop ours
            shutil.rmtree(paths.job_dir, ignore_errors=True)
            # A retry of it, or another request.
            _check_same_request(self.config, job, spec_fields, images, lambda: self._intake.digests(images), priority)
        else:
            orphans.mark_committed(paths.job_dir, self._database_id)
            self.feed.publish(job.job_id, "state", {"state": "QUEUED"}, requested=True)
        return job

    def _new_job_dir(self) -> JobPaths:
        """A new job's paths, its folder made by this call. Job ids are random: one already taken on storage (another
        job's, or a folder a crash left) is drawn again, never written into."""
        while True:
            paths = job_paths(self.config.storage, new_job_id())
            paths.job_dir.parent.mkdir(parents=True, exist_ok=True)
            try:
                paths.job_dir.mkdir()
            except FileExistsError:
                log.warning("job id %s is taken on storage; drawing another", paths.job_id)
                continue
            orphans.mark_submitting(paths.job_dir, self._database_id)
            return paths

    def _check_fits(self, spec: JobSpec) -> None:
        """Refuses a job bigger than training's share of a cluster whose size is configured (`capacity_cpus`,
        `capacity_gpus`: what it has, or may grow to): queued, it would wait for ever, and say nothing. Not while
        training is paused (`capacity_cpus: 0`: every job needs CPUs, so none starts; they queue)."""
        config, need = self.config, demand(spec.to_dict())
        if config.capacity_cpus == 0:
            return
        totals = [float("inf") if n is None else n for n in (config.capacity_cpus, config.capacity_gpus)]
        for short in shortfalls(need, training_share(Resources(*totals), config.serving)):  # an unset size: inf
            size = config.capacity_gpus if short.field == "gpus_per_worker" else config.capacity_cpus
            raise InputError(
                short.field,
                f"the job needs {short.needs} and training here has at most {short.available:g} (the cluster's "
                f"{size:g}, less what serving may take){short.hint}",
            )

    def _discard_staged(self, job_id: str) -> None:
        """Remove a failed submission's files, unless its row did commit: an insert whose acknowledgement was lost
        (PostgreSQL's connection dropped at COMMIT) made a job that the client's retry, with its request id, gets,
        and that job needs them. Unknown (the database unreachable): kept; an orphan folder only costs space."""
        try:
            committed = self.store.get_job(job_id) is not None
        except Exception:
            log.warning("submission %s failed and the database cannot say whether it committed: files kept", job_id)
            return
        job_dir = job_paths(self.config.storage, job_id).job_dir
        if committed:
            orphans.mark_committed(job_dir, self._database_id)
        else:
            shutil.rmtree(job_dir, ignore_errors=True)

    def get(self, tenant: str, job_id: str) -> JobRecord:
        job = self.store.get_job(job_id, tenant=tenant)
        if job is None:
            raise NotFound(f"job {job_id!r} not found")
        return job

    def list(self, tenant: str, page_size: int, page_token: str, states: list[str] | None):
        page_size = _page_size(page_size)
        unknown = [state for state in states or () if state not in STATES]
        if unknown:  # STATE_UNSPECIFIED, or a number this server does not know: it would match nothing
            raise InputError("states", f"not a job state: {', '.join(unknown)}; filter by any of {list(STATES)}")
        try:
            return self.store.list_jobs(tenant, page_size, page_token, states=states or None)
        except ValueError as e:
            raise InputError(
                "page_token", "not a token from a previous ListJobs response with the same states filter"
            ) from e

    def cancel(self, tenant: str, job_id: str) -> JobRecord:
        job = self.get(tenant, job_id)
        if job.state in ("CANCELLING", "CANCELLED"):  # a retry of a cancel whose answer was lost: it worked
            return job
        if job.state in TERMINAL_STATES:
            raise FailedPrecondition(f"job {job_id} already ended ({job.state})", "JOB_ENDED")
        with self.feed.changing(job_id):
            queued = self.store.transition(job_id, {"QUEUED"}, "CANCELLED", end_time=time.time())
            if queued is not None:
                self.feed.publish(job_id, "state", {"state": "CANCELLED"}, requested=True)
        if queued is not None:
            # It never ran and never will: its uploaded photos go now (a tenant submitting and cancelling over and
            # over filled the shared storage with them); its record and spec stay.
            shutil.rmtree(job_paths(self.config.storage, job_id).uploads_dir, ignore_errors=True)
            return queued
        with self.feed.changing(job_id):
            cancelling = self.store.transition(job_id, RUNNING_STATES, "CANCELLING")
            if cancelling is not None:
                self.feed.publish(job_id, "state", {"state": "CANCELLING"}, requested=True)
        if cancelling is None:  # it ended meanwhile
            return self.cancel(tenant, job_id)
        if cancelling.ray_submission_id:
            self._stop_ray_job(job_id, cancelling.ray_submission_id)
        return cancelling

    def _stop_ray_job(self, job_id: str, submission: str) -> None:
        """Asks Ray to stop a cancelled job's attempt (the reconciler then sees it STOPPED -> CANCELLED), waiting
        CANCEL_STOP_WAIT_S at most: a Jobs API that does not answer (30 s a request) would answer the recorded cancel
        past its caller's deadline. The reconciler stops the Ray job of a CANCELLING job on every pass anyway."""

        def stop() -> None:
            try:
                self.ray_jobs.stop(submission)
            except RayJobsError as e:
                log.warning("job %s: stopping its Ray job failed, the reconciler retries: %s", job_id, e)

        stopping = threading.Thread(target=stop, name=f"stop-{submission}", daemon=True)
        stopping.start()
        stopping.join(CANCEL_STOP_WAIT_S)

    def delete(self, tenant: str, job_id: str) -> None:
        job = self.get(tenant, job_id)
        if job.state not in TERMINAL_STATES:
            raise FailedPrecondition(
                f"job {job_id} is {job.state}: cancel it first, or wait for it to end", "JOB_NOT_ENDED"
            )
        # The files first: a failure (or a crash) between the two leaves the job listed, and DeleteJob can be retried;
        # the other order left tens of GiB of checkpoints behind a row that was gone. What its exports left half done
        # goes too, and so does its model directory where no model was recorded (cancelled or failed while it
        # exported): nothing else would ever remove them.
        paths = job_paths(self.config.storage, job_id)
        doomed = [paths.job_dir, *paths.model_scratch()] + ([] if job.model_id else [paths.model_dir])
        _remove_files("job", job_id, doomed)
        self.store.delete_job(job_id)

    def watch(self, tenant: str, job_id: str, is_active=lambda: True) -> Iterator[tuple[JobRecord, Change | None]]:
        """The job now, then (job, change) for every change, until the job ends or `is_active()` is false."""
        seq = self.feed.seq
        job = self.get(tenant, job_id)
        told = self.waiting_for(job)  # what the caller is told it waits for (it asks as it tells)
        yield job, None
        while job.state not in TERMINAL_STATES and is_active():
            seq, changes, missed = self.feed.follow(job_id, seq, timeout_s=1.0)
            if changes:
                try:
                    now = self.get(tenant, job_id)
                except NotFound:
                    # Deleted right after it ended (a script's CancelJob, then DeleteJob): its end is still told,
                    # with the record as last read. Gone with no end among its changes, it is NOT_FOUND.
                    if not any(c.kind == "state" and c.data["state"] in TERMINAL_STATES for c in changes):
                        raise
                    now = job
            for change in changes:
                # One reconcile pass can publish several changes, and the record is past all but its last: each
                # is told with the job's state and progress as of that change (the rest of the record as it is now).
                state = change.data["state"] if change.kind == "state" else job.state
                progress = change.data if change.kind == "progress" else job.progress
                job = dataclasses.replace(now, state=state, progress=progress)
                told = self.waiting_for(job)
                yield job, change
                if job.state in TERMINAL_STATES:
                    return  # the stream's last update: what was published after it is not news of this job
            if missed or not changes:
                # The feed no longer held some changes (this follower fell more than its capacity behind), or a quiet
                # second passed: read the job anyway, so that a change never delivered still ends the stream (and a
                # queued job's reason that came from its tenant or the whole queue, never published, is told).
                now = self.get(tenant, job_id)
                if not self.feed.settled(job_id, seq):
                    continue  # read while a change of it was being published: the feed tells it next, in order
                waiting = self.waiting_for(now)
                if now.state != job.state or waiting != told:
                    told = waiting
                    yield now, None
                job = now

    def logs(self, tenant: str, job_id: str) -> str:
        job = self.get(tenant, job_id)
        kept = job_paths(self.config.storage, job_id).driver_log  # an ended job's, once its driver ended
        with contextlib.suppress(FileNotFoundError):
            return kept.read_text(errors="replace")
        text = self.ray_jobs.attempt_logs(job_id, job.attempts) if job.attempts else ""
        if not text:  # kept, and Ray's record deleted, since the file was looked for (controller.ended_jobs)
            with contextlib.suppress(FileNotFoundError):
                return kept.read_text(errors="replace")
        return text

    # --- models ----------------------------------------------------------------------------------------

    def get_model(self, tenant: str, model_id: str) -> ModelRecord:
        model = self.store.get_model(model_id, tenant=tenant)
        if model is None:
            raise NotFound(f"model {model_id!r} not found")
        return self._with_endpoint(model)

    def _with_endpoint(self, model: ModelRecord) -> ModelRecord:
        """The model with its endpoint as the serving config says now, where it is deployed: one stored at the deploy
        would send clients to where it was served then (a Serve port since moved, a public_url since made https)."""
        served = model.deployed and self.config.serving is not None
        return dataclasses.replace(model, endpoint=self.config.serving.endpoint(model.model_id) if served else "")

    def deploy_model(self, tenant: str, model_id: str) -> ModelRecord:
        """Marks the model served (durably) and has ServingSync apply that to Ray Serve, which serves it moments
        later (the caller polls its endpoint); idempotent."""
        with self._model_changes:
            self.get_model(tenant, model_id)
            serving = self._serving()
            model = self.store.update_model(model_id, deployed=True)
        serving.request_apply()
        return self._with_endpoint(model)

    def undeploy_model(self, tenant: str, model_id: str) -> ModelRecord:
        """Marks the model not served (durably) and has ServingSync apply that, where serving is configured; without
        it (the `serving:` section removed since the deploy) only the mark goes, which DeleteModel would refuse."""
        with self._model_changes:
            self.get_model(tenant, model_id)
            model = self.store.update_model(model_id, deployed=False)
        if self.serving is not None:
            self.serving.request_apply()
        return self._with_endpoint(model)

    def delete_model(self, tenant: str, model_id: str) -> None:
        """Removes the model's files, then its record (as DeleteJob does: a failure leaves it listed, and the call
        can be retried); refused while it is deployed, and after its undeploy until serving has applied that (Serve
        would go on serving it, its files gone, to its tenant's callers: an undeploy waits for no one).

        A deploy between the check and the removal would leave a deployed record whose files are gone (serving
        answering 503 for it until it is undeployed). Holding _model_changes from the check to the record's deletion
        orders the two: a deploy that came first makes this refuse, one that comes after finds no model (NOT_FOUND).
        The store's deletion is conditional as well (not while deployed), against a writer this lock cannot see (a
        second controller on the database in the moments before the first finds its hold lost): a model deployed
        that way stays listed, for UndeployModel and a retried DeleteModel, rather than served with no record."""
        with self._model_changes:
            model = self.get_model(tenant, model_id)
            if model.deployed:
                raise FailedPrecondition(
                    f"model {model_id} is deployed: undeploy it first (`dreambooth undeploy {model_id}`)",
                    "MODEL_DEPLOYED",
                )
            if self.serving is not None and self.serving.may_serve(model_id):
                raise FailedPrecondition(
                    f"model {model_id} may still be served (serving has not applied its undeploy yet): retry in a "
                    "moment",
                    "MODEL_DEPLOYED",
                    retry_after_s=SERVING_RETRY_INTERVAL_S,
                )
            paths = job_paths(self.config.storage, model.job_id)
            _remove_files("model", model_id, [paths.model_dir, *paths.model_scratch()])  # and what exports left
            if not self.store.delete_model(model_id) and self.store.get_model(model_id) is not None:
                raise FailedPrecondition(
                    f"model {model_id} was deployed while it was deleted, and its files are gone: undeploy it and "
                    "retry DeleteModel",
                    "MODEL_DEPLOYED",
                )

    def _serving(self) -> ServingSync:
        if self.serving is None:
            raise FailedPrecondition(
                "serving is not configured on this controller: add a `serving:` section to its config",
                "SERVING_NOT_CONFIGURED",
            )
        return self.serving

    def list_models(self, tenant: str, page_size: int, page_token: str):
        page_size = _page_size(page_size)
        try:
            models, token = self.store.list_models(tenant, page_size, page_token)
        except ValueError as e:
            raise InputError("page_token", "not a token from a previous ListModels response") from e
        return [self._with_endpoint(model) for model in models], token


def _check_same_request(
    config: ControllerConfig,
    job: JobRecord,
    spec_fields: dict,
    images: list[ImageInput],
    digests: Callable[[], list[str]],
    priority: int,
) -> None:
    """A request_id names one request: its retry is answered with the job it created, and a different request
    under the same id (two pipelines given one key) is refused rather than answered with the other's job. The
    photos (`digests()`: the request's, uploaded or read from the paths it names) are compared with the job's copies
    where it still has them (a cancelled queued job's are gone: then by count)."""

    def refuse(what: str) -> NoReturn:
        raise InputError(
            "request_id",
            f"already used for job {job.job_id}, submitted with other {what}: a retry sends the same request; a new "
            "job takes a new request_id",
        )

    stored = job.spec["instance_images"]
    try:  # not validated again: a rule added since the job was stored would refuse its own retry
        asked = JobSpec(**{**spec_fields, "instance_images": stored}).to_dict()
    except TypeError:  # a required field missing
        refuse("fields")
    # Fields in both: one a later version added has its default in the retry, not a change of the caller's.
    if changed := sorted(k for k in job.spec.keys() & asked.keys() if asked[k] != job.spec[k]):
        refuse(", ".join(changed))
    if priority != job.priority:
        refuse("priority")
    uploads = job_paths(config.storage, job.job_id).uploads_dir
    if not all(Path(path).parent == uploads for path in stored):
        # Stored by a version that kept the paths a request named: one entry per image of the request, a named
        # one compared by its path (it is not read), an uploaded one with its copy.
        same = len(images) == len(stored) and all(
            str(shared_path(image.uri)) == path
            if image.data is None
            else Path(path).parent == uploads and (not Path(path).is_file() or Path(path).read_bytes() == image.data)
            for image, path in zip(images, stored, strict=False)
        )
        if not same:
            refuse("instance_images")
        return
    sent = digests()
    if len(sent) != len(stored):
        refuse("instance_images")
    for digest, path in zip(sent, stored, strict=True):
        copy = Path(path)
        if copy.is_file():
            with open(copy, "rb") as file:
                if hashlib.file_digest(file, "sha256").hexdigest() != digest:
                    refuse("instance_images")


# A page of the largest jobs a spec allows (~72 KB each: 32 validation prompts of 2000 characters, 64 photos' paths)
# stays well under gRPC's 16 MiB response: 1000 of them failed RESOURCE_EXHAUSTED after the work was done.
MAX_PAGE_SIZE = 100


def _page_size(asked: int) -> int:
    """A List call's page size: 50 when unset (0), at most MAX_PAGE_SIZE (more asks for as many as there may be)."""
    if asked < 0:
        raise InputError("page_size", f"must be >= 0 (0: the default, 50; at most {MAX_PAGE_SIZE} are answered)")
    return min(asked or 50, MAX_PAGE_SIZE)


def _tenant_full(tenant: str, unfinished: int, limit: int) -> QuotaExceeded:
    return QuotaExceeded(
        f"tenant {tenant!r} has {unfinished} unfinished jobs (limit {limit}); wait for some to end or cancel them",
        "TENANT_JOBS_LIMIT",
    )


def _as_sent(message: str, sent_as: dict[str, str]) -> str:
    """`message` with the job's copies of the photos named as the caller sent them."""
    for copy, name in sent_as.items():
        message = message.replace(copy, name)
    return message


def _remove_files(kind: str, key: str, paths: list[Path]) -> None:
    """Removes a job's or a model's files, or raises StorageFailed saying that it is kept and that a retry of its
    delete is safe (what went before is gone already)."""
    for path in paths:
        try:
            _remove_tree(path)
        except OSError as e:
            log.warning("deleting %s %s: cannot remove %s: %s", kind, key, path, e)
            raise StorageFailed(
                f"cannot remove {kind} {key}'s files ({e}); the {kind} is kept: retry Delete{kind.capitalize()}"
            ) from e


def _remove_tree(path: Path) -> None:
    """Removes `path` and all it holds, or raises the OSError that kept it. Entries already gone are no error: a
    retried DeleteJob may run beside the first, and rmtree raises FileNotFoundError when one vanishes under it."""
    shutil.rmtree(path, ignore_errors=True)
    if path.exists():
        shutil.rmtree(path)  # again, to raise what kept it (permissions, a busy mount)
