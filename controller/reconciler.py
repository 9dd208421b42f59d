"""The controller's scheduling loop: start queued jobs, follow running ones, finish them. (What ended jobs leave,
and serving, have threads of their own: controller/ended_jobs.py, controller/serving.py.)

Every pass is idempotent and reads all it needs from the store, Ray and the jobs' events files, so a
controller killed at any point and started again simply carries on: running Ray jobs are re-attached (their
events are read from the stored offset), a Ray job that died is resubmitted and resumes from its last
checkpoint, queued jobs stay queued. A Ray submission id is derived from (job, attempt) and recorded before
submitting, and Ray refuses a second submission with the same id, so no attempt ever runs twice. An attempt
whose submission failed (Ray unreachable) is submitted again as the same attempt: it costs none of max_attempts.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
import threading
import time
from collections.abc import Callable

import sqlalchemy as sa

from controller import metrics
from controller.config import ControllerConfig
from controller.ended_jobs import SWEEP_S, EndedJob, EndedJobs
from controller.feed import ChangeFeed
from controller.ray_jobs import RayJobs, RayJobsError, RayJobStatus, submission_id
from controller.scheduler import (
    Queue,
    Resources,
    Waiting,
    demand,
    running_limit,
    schedule,
    tenant_limit,
    training_share,
)
from controller.service import JobService
from controller.store import RUNNING_STATES, TERMINAL_STATES, UNFINISHED_STATES, JobRecord, ModelRecord, Store
from dreambooth.errors import FAILURE_REASONS
from trainer.events import parse_event
from trainer.spec import JobSpec
from trainer.storage import job_paths, storage_clock

log = logging.getLogger(__name__)

MAX_PASSES_PER_S = 5
REPEAT_LOG_S = 60.0  # a part of the passes failing the same way is logged again after this
# The finished jobs' counts (a metric) come from a query over all history: refreshed this often, not every pass.
FINISHED_COUNTS_EVERY_S = 30
# A Ray job that Ray does not know (LOST) whose events file changed this recently may be running on a cluster this
# controller no longer asks (its ray_dashboard_url pointed at another): it is not run a second time beside itself.
LOST_QUIET_S = 120
HOLD_CHECK_S = 10  # how often the reconciler checks that this controller still holds its database
STOP_WAIT_S = 30  # what stop() waits for a pass to end


class Reconciler:
    def __init__(
        self,
        config: ControllerConfig,
        store: Store,
        ray_jobs: RayJobs,
        feed: ChangeFeed,
        service: JobService,
        still_holds_database: Callable[[], bool] = lambda: True,
    ):
        self.config = config
        self._still_holds_database = still_holds_database
        # Set when this controller lost its hold on the database (Store.hold_for_one_controller): it reconciles no
        # more, since another controller may now, and whoever runs it stops it.
        self.database_lost = threading.Event()
        self.store = store
        self.ray_jobs = ray_jobs
        self.feed = feed
        self.service = service
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._capacity: tuple[float, Resources] | None = None
        self._finished_counts: tuple[float, dict[str, int]] | None = None
        # Submission ids whose submit failed in this process: Ray not knowing one means it never ran. (After a
        # restart this is empty, and such an attempt counts as one that ran: the safe side.) True where no connection
        # was made, so it cannot start later either; a submission that timed out may (see _submit).
        self._unsent: dict[str, bool] = {}
        # When each tenant last had a job started: whose turn it is among tenants holding as little (the scheduler).
        # Jobs still running tell it after a restart too; ended ones are forgotten then, a brief unfairness.
        self._last_started: dict[str, float] = {}
        self._queued_specs: dict[str, dict] = {}  # the queue's specs, read once each (Store.queued_jobs)
        self._ended_jobs = EndedJobs(config.storage, ray_jobs)
        self._failures = PassFailures()

    def start(self) -> None:
        # What a controller stopped before it tidied up after them left: looked at again.
        for job_id, state, attempts in self.store.ended_since(time.time() - SWEEP_S):
            self._ended_jobs.job_ended(EndedJob(job_id, state, attempts, swept=True))
        self._thread = threading.Thread(target=self._run, name="reconciler", daemon=True)
        self._thread.start()

    def stop(self) -> bool:
        """Stops the loop after its pass; False if that pass was still running after STOP_WAIT_S (a slow Ray or
        database call): it may still start or resubmit a job, so whoever holds the database must keep it."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=STOP_WAIT_S)
        self._ended_jobs.stop()
        return self._thread is None or not self._thread.is_alive()

    def _run(self) -> None:
        checked = time.monotonic()
        while not self._stop.is_set():
            if time.monotonic() - checked >= HOLD_CHECK_S:
                checked = time.monotonic()
                if not self._still_holds_database():
                    log.critical("this controller lost its hold on the database (a restart or failover?): stopping")
                    self.database_lost.set()
                    return
            seen = self.feed.requests
            try:
                self.reconcile_once()
            except Exception:
                log.exception("reconcile pass failed; retrying")
            # The next pass comes after the interval, or sooner when a caller asked for a change (a submission, a
            # cancel; not the progress this pass published); but never more than MAX_PASSES_PER_S: under a burst of
            # submissions, passes would eat the CPU that serves the RPCs (bench/controller_load.py).
            self._stop.wait(1 / MAX_PASSES_PER_S)
            self.feed.wait_for_request(seen, timeout_s=self.config.reconcile_interval_s)

    def reconcile_once(self) -> None:
        """One pass. Its parts fail alone (logged, retried next pass): a job that cannot be followed, or Ray down
        for scheduling, must not hold the other jobs. (Serving catches up on a thread of its own: ServingSync.)"""
        jobs_api_failing = False
        for job in self.store.active_jobs():
            failed = self._failures.run(f"following job {job.job_id}", self._follow, job)
            # Unreachable, or reached but not answering in time or failing (a wedged head): either way a job started
            # now would wait on it too.
            jobs_api_failing |= isinstance(failed, RayJobsError)
        self._failures.run("scheduling", self._schedule, jobs_api_failing)
        self._failures.run("job counts", self._count_jobs)
        self._failures.pass_done()

    def _count_jobs(self) -> None:
        now = time.monotonic()
        if self._finished_counts is None or now - self._finished_counts[0] > FINISHED_COUNTS_EVERY_S:
            self._finished_counts = (now, self.store.count_jobs_by_state(TERMINAL_STATES))
        metrics.set_jobs_by_state(self.store.count_jobs_by_state(UNFINISHED_STATES) | self._finished_counts[1])

    # --- starting ------------------------------------------------------------------------------------

    def _schedule(self, jobs_api_failing: bool = False) -> None:
        """Starts the queued jobs whose turn it is, but none while Ray's Jobs API fails: `jobs_api_failing` (a job
        this pass followed found it so), or once a submission of this pass failed."""
        active = self.store.active_jobs()
        try:
            capacity = self.capacity()
        except RayJobsError as e:  # Ray cannot say what the cluster holds: every queued job waits for it to
            why = (
                "Ray's Jobs API refuses the controller's token: run the controller with RAY_AUTH_MODE=token and the "
                "cluster's token (RAY_AUTH_TOKEN, or the file ~/.ray/auth_token): it starts once Ray takes it"
                if e.refused_token
                else "Ray's Jobs API does not answer: it starts once it does again"
            )
            waiting = Waiting("CLUSTER_UNAVAILABLE", why)
            self.service.set_queue(Queue(others=waiting))
            metrics.set_queued_jobs({waiting.reason: sum(self.store.queued_by_tenant().values())})
            raise
        if (held := sum(demand(job.spec).cpus for job in active)) >= capacity.cpus:
            # Every job needs CPUs: nothing can start, so don't read the queue (a burst of submissions would make
            # each pass read it all).
            self._wait_while_full(active, capacity, held)
            return
        queued = self.store.queued_jobs(self._queued_specs)
        limits = self.service.running_limits()
        last_started = dict(self._last_started)
        for job in active:
            last_started[job.tenant] = max(last_started.get(job.tenant, 0.0), job.start_time or 0.0)
        plan = schedule(queued, active, capacity, limits, last_started)
        # Ray's Jobs API down leaves the jobs whose turn it is queued, saying so: else each pass would start one more
        # into the outage, each holding its tenant's slot and its share of the cluster until Ray is back. The job
        # whose submission failed waits, PREPARING, to be sent again as the same attempt (_follow); once it is, the
        # next pass starts the others. A submission that failed otherwise (timed out, refused) stops the pass too:
        # the next would wait as long, or fail alike.
        waiting, jobs_api_down = dict(plan.waiting), jobs_api_failing
        for job in plan.starting:
            if jobs_api_down:
                waiting[job.job_id] = Waiting(
                    "CLUSTER_UNAVAILABLE",
                    "its turn came, but Ray's Jobs API cannot be reached or failed a submission: it starts once it "
                    "takes jobs again",
                )
                continue
            # Its events file first: storage that cannot be written (full, read-only, gone) leaves a job queued,
            # saying so, its attempt unspent, rather than PREPARING for as long as the outage lasts.
            try:
                self._touch_events(job)
            except OSError as e:
                log.warning("job %s cannot start: its events file cannot be made: %s", job.job_id, e)
                waiting[job.job_id] = Waiting(
                    "STORAGE_UNAVAILABLE",
                    f"the controller cannot write to its storage ({e.strerror or e}): it starts once it can",
                )
                continue
            # The attempt is recorded in the same write as the state: a job that is PREPARING always has a Ray
            # submission id to follow, even if the controller dies before submitting it (it is then LOST and
            # submitted again as the next attempt). Its run time starts once Ray has it (_run_clock_started).
            with self.feed.changing(job.job_id):
                started = self.store.transition(job.job_id, {"QUEUED"}, "PREPARING", **_next_attempt(job))
                if started is None:  # cancelled since the queue was read
                    continue
                self.feed.publish(job.job_id, "state", {"state": "PREPARING"})
            self._last_started[job.tenant] = time.time()
            metrics.QUEUE_WAIT.observe(time.time() - started.create_time)
            try:
                self._submit(started)
            except RayJobsError as e:
                log.warning("job %s: its submission failed; no other job starts this pass: %s", job.job_id, e)
                jobs_api_down = True
        self.service.set_queue(Queue(waiting))
        metrics.set_queued_jobs(collections.Counter(why.reason for why in waiting.values()))

    def _wait_while_full(self, active: list[JobRecord], capacity: Resources, held: float) -> None:
        """What queued jobs wait for while no CPU is free, without reading the queue: a job of a tenant at its limit
        waits for that; else what the last pass that read the queue found still holds (a job bigger than the
        cluster, a place behind another job) but for the job that was next to start; every other job for CPUs."""
        if capacity.cpus <= 0:
            others = Waiting(
                "BIGGER_THAN_CLUSTER",
                "training may use no CPU of the cluster now (capacity_cpus 0, or serving's replicas may take them "
                "all): it starts once it may",
            )
        else:
            full = f"no CPU free: training may use {capacity.cpus:g}, the running jobs hold {held:g}"
            others = Waiting("WAITING_FOR_RESOURCES", full)
        limits, running = self.service.running_limits(), collections.Counter(job.tenant for job in active)
        at_limit = {
            t: tenant_limit(n, running_limit(limits, t)) for t, n in running.items() if n >= running_limit(limits, t)
        }
        at_limit |= {t: tenant_limit(0, 0) for t, limit in limits.items() if not limit}
        kept = {i: why for i, why in self.service.queue.by_job.items() if why.reason != "WAITING_FOR_RESOURCES"}
        self.service.set_queue(Queue(kept, at_limit, others))
        # The metric from one count by tenant, not the queue: the jobs of tenants at their limit, and the others.
        queued = self.store.queued_by_tenant()
        limited = sum(n for tenant, n in queued.items() if tenant in at_limit)
        metrics.set_queued_jobs({"TENANT_LIMIT": limited, others.reason: sum(queued.values()) - limited})

    def _resubmit(self, job: JobRecord) -> None:
        # Compare-and-set on the state this pass read: a job cancelled since then is not started again.
        resubmitted = self.store.transition(job.job_id, {job.state}, job.state, **_next_attempt(job))
        if resubmitted is not None:
            self._submit(resubmitted)

    def _submit(self, job: JobRecord) -> None:
        """Submits the job's recorded attempt (recorded first: a controller dying right after Ray accepted the
        job finds it on restart by its submission id)."""
        # A submission that times out may still reach Ray and start later: until then Ray does not know it (LOST),
        # and LOST counts as dead only once the job's events have been quiet for LOST_QUIET_S, from now on. Else a
        # restarted controller would run the next attempt beside it, and a cancel would end the job that then runs.
        try:
            self._touch_events(job)
        except OSError:
            # Storage full, read-only or gone: nothing reached Ray, so the same attempt goes again next pass (an
            # outage of minutes would otherwise spend every queued job's attempts on submissions never sent).
            self._unsent.setdefault(job.ray_submission_id, True)
            raise
        try:
            self.ray_jobs.submit(job.job_id, job.attempts)
        except RayJobsError as e:
            # Once a try may have reached Ray (it timed out), the submission may start later: a refused retry does
            # not make it surely unsent.
            self._unsent[job.ray_submission_id] = self._unsent.get(job.ray_submission_id, True) and not e.reached_ray
            raise
        self._unsent.pop(job.ray_submission_id, None)
        self._run_clock_started(job)
        log.info("job %s: submitted Ray job %s", job.job_id, job.ray_submission_id)

    def _touch_events(self, job: JobRecord) -> None:
        events = job_paths(self.config.storage, job.job_id).events_file
        try:
            events.touch()
        except FileNotFoundError:
            # The job's folder, made at its submission, is gone. Deleted with the job (cancelled and deleted since
            # this pass read the queue): not made again, to be left behind for good. Gone otherwise (a database
            # restored beside older storage): made, and the job runs into what it lacks, rather than waiting for good.
            if self.store.get_job(job.job_id) is None:
                raise
            events.parent.mkdir(parents=True, exist_ok=True)
            events.touch()

    def _run_clock_started(self, job: JobRecord) -> JobRecord:
        """The job as this pass read it, its run time (max_job_run_s) counted from now unless Ray had an attempt of it
        before: from when Ray first has it, not from when it left the queue, so that a job whose submission could not
        reach Ray (the Jobs API down over a weekend) is not stopped as over its limit as soon as it is sent."""
        if job.start_time is not None:
            return job
        started = self.store.update_job(job.job_id, start_time=time.time())
        return dataclasses.replace(job, start_time=started.start_time)

    def capacity(self) -> Resources:
        """What training may hold: the alive nodes' totals (asked at most every 10 s), each replaced by its setting
        where one is given, less what serving's replicas may grow to (they share the cluster's GPUs: jobs started
        into them would wait in Ray, holding their tenant's slots, and keep Serve from scaling up)."""
        cpus, gpus = self.config.capacity_cpus, self.config.capacity_gpus
        if cpus is None or gpus is None:
            now = time.monotonic()
            if self._capacity is None or now - self._capacity[0] > 10:
                capacity = self.ray_jobs.cluster_capacity()
                self._capacity = (now, Resources(capacity.cpus, capacity.gpus))
            cpus = self._capacity[1].cpus if cpus is None else cpus
            gpus = self._capacity[1].gpus if gpus is None else gpus
        return training_share(Resources(cpus, gpus), self.config.serving)

    # --- following -----------------------------------------------------------------------------------

    def _follow(self, job: JobRecord) -> None:
        job = self._apply_events(job)
        if job.state in TERMINAL_STATES or not job.ray_submission_id:
            return
        status = self.ray_jobs.status(job.ray_submission_id)
        if status != RayJobStatus.LOST:  # Ray has it: also where its submitter died before recording its start
            job = self._run_clock_started(job)
        if status in (RayJobStatus.PENDING, RayJobStatus.RUNNING):
            if job.state != "CANCELLING" and self._past_run_time(job):
                job = self._stop_for_run_time(job)
            if job.state == "CANCELLING":
                self.ray_jobs.stop(job.ray_submission_id)  # idempotent; covers a crash right after CANCELLING
            return
        job = self._apply_events(job)  # what the driver wrote just before it ended
        if job.state in TERMINAL_STATES:
            return
        if job.model_id is not None:
            # It ended between writing its model (whole: the event follows the export) and saying SUCCEEDED, stopped
            # by a cancel or killed: the model wins, as over a late cancel, instead of a CANCELLED job holding one.
            self._finish(job, "SUCCEEDED")
            return
        if job.state == "CANCELLING":
            maybe_on_its_way = not self._unsent.get(job.ray_submission_id, False)
            if status == RayJobStatus.LOST and maybe_on_its_way and self._events_quiet_s(job) < LOST_QUIET_S:
                # Not known to Ray yet, but maybe on its way: a submission that timed out may still start (a slow
                # head holds it). Stopped once Ray knows it; ended when nothing has been heard for LOST_QUIET_S.
                self.ray_jobs.stop(job.ray_submission_id)
                return
            if job.failure_reason:  # stopped by the controller (RUN_TIME_EXCEEDED), not by its tenant: it failed
                self._finish(job, "FAILED", job.failure_reason, job.failure_message)
            else:
                self._finish(job, "CANCELLED")
        elif status == RayJobStatus.SUCCEEDED:
            self._finish(job, "FAILED", "NO_RESULT", "the training driver ended without a model")
        elif status == RayJobStatus.STOPPED:
            self._finish(job, "FAILED", "STOPPED", "the Ray job was stopped outside the controller")
        elif status == RayJobStatus.LOST and job.ray_submission_id in self._unsent:
            # Compare-and-set on the state this pass read, as every step here: a job cancelled since then (its cancel
            # found no Ray job to stop) must not have the attempt that Ray never received sent now.
            if (unchanged := self.store.transition(job.job_id, {job.state}, job.state)) is not None:
                log.warning("job %s: submitting %s again (its submission failed)", job.job_id, job.ray_submission_id)
                self._submit(unchanged)
        elif status == RayJobStatus.LOST and (quiet_s := self._events_quiet_s(job)) < LOST_QUIET_S:
            log.warning(
                "job %s: Ray does not know %s, but its events changed %.0f s ago: waiting until they are %d s quiet "
                "(is it running on another Ray cluster?)",
                job.job_id,
                job.ray_submission_id,
                quiet_s,
                LOST_QUIET_S,
            )
        elif self._past_run_time(job):  # not run again past the limit, to be stopped on the next pass
            self._finish(job, "FAILED", "RUN_TIME_EXCEEDED", self._run_time_message())
        elif job.attempts < self.config.max_attempts:
            # The driver itself died (node lost, Ray head restarted, killed): run it again; it resumes from
            # the job's latest checkpoint.
            log.warning("job %s: Ray job %s ended %s; resubmitting", job.job_id, job.ray_submission_id, status)
            self._resubmit(job)
        else:
            tail = ""
            if status != RayJobStatus.LOST:
                try:  # what helps a reader, not what decides: the job ends even if its logs cannot be had
                    tail = self.ray_jobs.logs(job.ray_submission_id)[-2000:]
                except RayJobsError as e:
                    tail = f"(unavailable: {e})"
            self._finish(
                job, "FAILED", "RAY_JOB_FAILED", f"the Ray job failed {job.attempts} times; last log lines:\n{tail}"
            )

    def _past_run_time(self, job: JobRecord) -> bool:
        """Whether the job has run past max_job_run_s. A job with only its export left is let finish, its model
        nearly there: EXPORTING, or run again after its driver died exporting (PREPARING until the rerun, having
        checked the job's inputs again, reaches the export), which a stop would have spent an attempt on."""
        limit = self.config.max_job_run_s
        if limit is None or job.start_time is None:
            return False
        if time.time() - job.start_time <= limit:
            return False
        return job.state != "EXPORTING" and not self._only_export_left(job)

    def _only_export_left(self, job: JobRecord) -> bool:
        """Trained to its last step (its driver died since): a rerun only exports, unless it must draw the final
        grid, which takes workers (trainer.run.only_export_left, as the controller's store knows it)."""
        if job.last_checkpoint_step < job.spec.get("max_steps", float("inf")):
            return False
        return not job_paths(self.config.storage, job.job_id).lacks_final_grid(JobSpec.from_dict(job.spec))

    def _run_time_message(self) -> str:
        hours = self.config.max_job_run_s / 3600
        return f"still running {hours:g} h after it started: stopped at the controller's limit (max_job_run_s)"

    def _stop_for_run_time(self, job: JobRecord) -> JobRecord:
        """Stops a job that ran past max_job_run_s as a cancel does (CANCELLING until Ray reports its workers gone),
        with the failure it ends with recorded now: a restarted controller ends it FAILED too."""
        with self.feed.changing(job.job_id):
            stopping = self.store.transition(
                job.job_id,
                RUNNING_STATES - {"EXPORTING"},
                "CANCELLING",
                failure_reason="RUN_TIME_EXCEEDED",
                failure_message=self._run_time_message(),
            )
            if stopping is None:  # cancelled, exporting or ended meanwhile
                return job
            self.feed.publish(job.job_id, "state", {"state": "CANCELLING"})
        log.warning("job %s: ran past max_job_run_s; stopping it", job.job_id)
        return stopping

    def _events_quiet_s(self, job: JobRecord) -> float:
        """Seconds since the job's events file last changed (inf if it has none), on the storage's clock: a network
        file system's server stamps its files' times, and its clock may be minutes off this host's (a file written
        a moment ago would look quiet, and its job run a second time beside itself)."""
        try:
            changed = job_paths(self.config.storage, job.job_id).events_file.stat().st_mtime
        except FileNotFoundError:
            return float("inf")
        clock = storage_clock(self.config.storage)
        try:
            clock.touch()  # its times set to now: on NFS, the server's now
            now = clock.stat().st_mtime
        except OSError as e:  # another user's file, a read-only mount: this host's clock rather than no answer
            log.warning("cannot read the storage's clock from %s (%s): using this host's", clock, e)
            now = time.time()
        return now - changed

    def _finish(self, job: JobRecord, state: str, reason: str = "", message: str = "") -> None:
        self._unsent.pop(job.ray_submission_id, None)
        fields = {"end_time": time.time()}
        if reason or state == "SUCCEEDED":  # a success clears what a run-time stop recorded
            fields.update(failure_reason=reason or None, failure_message=message or None)
        # A job being cancelled ends as its cancel says whatever Ray said: this pass may have read the job before the
        # cancel, and then a Ray job the cancel stopped looks "stopped outside the controller".
        from_states = {"CANCELLING"} if job.state == "CANCELLING" else RUNNING_STATES
        with self.feed.changing(job.job_id):
            done = self.store.transition(job.job_id, from_states, state, **fields)
            if done is not None:
                self.feed.publish(job.job_id, "state", {"state": state})
        if done is not None:
            self._ended(done)
            if state == "FAILED":
                metrics.FAILURES.labels(reason=reason).inc()

    def _ended(self, job: JobRecord) -> None:
        """What follows a job's move to an end state, whichever way it ended."""
        metrics.forget_job(job.job_id)
        self._ended_jobs.job_ended(EndedJob(job.job_id, job.state, job.attempts))

    def _apply_events(self, job: JobRecord) -> JobRecord:
        """Apply the trainer's events appended since the stored offset, in order. The offset and the progress
        are stored together, and the changes published after that, so a watcher always reads what it is told."""
        path = job_paths(self.config.storage, job.job_id).events_file
        if not path.exists():
            return job
        start = job.events_offset
        with path.open("rb") as f:
            if start > os.fstat(f.fileno()).st_size:
                # The file lost the tail that the stored offset counts (a power loss before it reached the disk):
                # read it again from the start, or new events would be read from mid-line. Its events apply again
                # in order, so the job ends where the file's last event puts it (state moves are compare-and-set
                # among the running states, a model is recorded once).
                log.warning("job %s: events file shorter than its offset; reading it from the start", job.job_id)
                start = 0
            f.seek(start)
            chunk = f.read()
        complete = chunk[: chunk.rfind(b"\n") + 1]
        if not complete:
            return job
        with self.feed.changing(job.job_id):  # its state may move with each event: told in order, after the writes
            return self._apply_lines(job, complete, start)

    def _apply_lines(self, job: JobRecord, complete: bytes, start: int) -> JobRecord:
        progress = dict(job.progress or {})
        changes: list[tuple[str, dict]] = []
        for line in complete.splitlines():
            if line.strip() and (event := parse_event(line)) is not None:
                before, changed = dict(progress), len(changes)
                try:
                    job = self._apply(job, event, progress, changes)
                except (KeyError, TypeError, ValueError, sa.exc.DataError) as e:
                    # JSON, but not what its type needs (another trainer version's, or lines interleaved over NFS
                    # into one that parses), or a value the database refuses (a number past its column's range):
                    # skipped as an unreadable line is. Raised on every pass, it stopped the job being followed for
                    # good: its state, Ray's status, a cancel, the run-time limit.
                    log.warning("job %s: skipped an event it cannot apply (%r): %r", job.job_id, e, line[:200])
                    progress.clear()
                    progress.update(before)
                    del changes[changed:]
        job = self.store.update_job(job.job_id, events_offset=start + len(complete), progress=progress)
        for kind, data in changes:
            self.feed.publish(job.job_id, kind, data)
        return job

    def _apply(self, job: JobRecord, event: dict, progress: dict, changes: list) -> JobRecord:
        kind = event["type"]
        if kind == "state":
            job = self._apply_state(job, event, changes)
        elif kind == "class_images":
            progress.update(class_images_done=event["done"], class_images_total=event["total"])
            changes.append(("progress", dict(progress)))
        elif kind == "progress":
            progress.update(
                {k: event.get(k) for k in ("step", "total_steps", "loss", "prior_loss", "lr", "steps_per_s", "eta_s")}
            )
            changes.append(("progress", dict(progress)))
            if job.state not in TERMINAL_STATES:  # events re-read after the end (a shortened file) add no series
                metrics.record_job_progress(job.job_id, progress["step"], progress["loss"], progress["steps_per_s"])
        elif kind == "checkpoint":
            step = event["step"]
            if type(step) is not int or not 0 <= step < 2**31:  # the column's range on every backend
                raise ValueError(f"checkpoint step {step!r}")
            job = self.store.update_job(job.job_id, last_checkpoint_step=step)
            changes.append(("checkpoint", event))
        elif kind == "validation":
            changes.append(("validation", event))
        elif kind == "model":
            model_id = f"model-{job.job_id.removeprefix('job-')}"
            if self.store.get_model(model_id) is None:
                self.store.insert_model(
                    ModelRecord(
                        model_id=model_id,
                        tenant=job.tenant,
                        job_id=job.job_id,
                        path=event["path"],
                        metadata=event.get("metadata", {}),
                    )
                )
            job = self.store.update_job(job.job_id, model_id=model_id)
        return job

    def _apply_state(self, job: JobRecord, event: dict, changes: list) -> JobRecord:
        state = event["state"]
        if state in RUNNING_STATES:
            moved = self.store.transition(job.job_id, RUNNING_STATES, state)
            if moved is not None and moved.state != job.state:
                changes.append(("state", {"state": state}))
            return moved or job
        if state == "SUCCEEDED":  # wins over a late cancel or the run-time limit: the model exists
            done = self.store.transition(
                job.job_id,
                {*RUNNING_STATES, "CANCELLING"},
                "SUCCEEDED",
                end_time=time.time(),
                failure_reason=None,
                failure_message=None,
            )
        elif job.state == "CANCELLING":
            # The driver failing while it is being stopped is the cancel working; CANCELLED comes once Ray
            # reports the job ended (see _follow), so that a CANCELLED job never has workers left.
            return job
        else:  # FAILED: the trainer's own verdict (bad input, training failed after its retries) is final
            done = self.store.transition(
                job.job_id,
                RUNNING_STATES,
                "FAILED",
                end_time=time.time(),
                **_trainers_failure(event),
            )
            if done is not None:
                metrics.FAILURES.labels(reason=done.failure_reason).inc()
        if done is None:
            return job
        self._ended(done)
        changes.append(("state", {"state": done.state}))
        return done


def _trainers_failure(event: dict) -> dict[str, str]:
    """The failure_reason and failure_message of the trainer's FAILED event. Reasons are a closed set (jobs.proto, the
    failures metric's label); one outside it (a trainer of an older release wrote the exception's type name) counts
    as TRAINING_FAILED, its name kept in the message."""
    reason = event.get("reason", "TRAINING_FAILED")
    # INVALID_INPUT names its field as the API's INVALID_ARGUMENT does: "field: what to fix".
    message = ": ".join(filter(None, (event.get("field"), event.get("message", ""))))
    if reason not in FAILURE_REASONS:
        reason, message = "TRAINING_FAILED", f"{reason}: {message}"
    return {"failure_reason": reason, "failure_message": message}


def _next_attempt(job: JobRecord) -> dict:
    attempt = job.attempts + 1
    return {"attempts": attempt, "ray_submission_id": submission_id(job.job_id, attempt)}


class PassFailures:
    """Runs the parts of reconcile passes, logging what fails: with its traceback the first time, then the same
    failure of the same part (the same message) once every REPEAT_LOG_S, with how often it failed meanwhile. A Ray
    outage failed every pass, each logging its traceback: two a second, for as long as it lasted."""

    def __init__(self, repeat_log_s: float = REPEAT_LOG_S):
        self._repeat_log_s = repeat_log_s
        self._failing: dict[str, tuple[str, float, int]] = {}  # part -> (message, when logged, failures since)
        self._this_pass: set[str] = set()

    def run(self, what: str, part, *args) -> Exception | None:
        """Runs `part(*args)`; returns what it raised (logged as above), or None."""
        self._this_pass.add(what)
        try:
            part(*args)
        except Exception as e:
            message, now = f"{type(e).__name__}: {e}", time.monotonic()
            last = self._failing.get(what)
            if last is not None and last[0] == message and now - last[1] < self._repeat_log_s:
                self._failing[what] = (message, last[1], last[2] + 1)
                return e
            again = f" (and {last[2]} times since it was last logged)" if last and last[0] == message else ""
            log.exception("reconcile pass: %s failed%s; retrying next pass", what, again)
            self._failing[what] = (message, now, 0)
            return e
        self._failing.pop(what, None)
        return None

    def pass_done(self) -> None:
        """Forgets the parts this pass did not run (the jobs no longer followed)."""
        for what in self._failing.keys() - self._this_pass:
            del self._failing[what]
        self._this_pass.clear()
