"""The controller when things around it fail: Ray unreachable, many open watches, a careless config, a change
published while a watch looks the other way. A real gRPC server on 127.0.0.1 and a real SQLite store; Ray's
Jobs API address is a closed port, so every call to it fails for real (one test then opens that port onto the
session's Ray cluster: Ray is back)."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import http.client
import http.server
import itertools
import logging
import os
import shutil
import socket
import sqlite3
import subprocess
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
import sqlalchemy as sa
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image
from ray.job_submission import JobSubmissionClient

from controller import ended_jobs, metrics
from controller import intake as intake_module
from controller import service as service_module
from controller.config import ControllerConfig, Tenant
from controller.database import ControllerRunning
from controller.errors import DeadlineExceeded, FailedPrecondition, NotFound
from controller.feed import ChangeFeed
from controller.intake import IMAGE_CHECKS_AT_ONCE, ImageInput
from controller.ray_jobs import RayJobs, RayJobsError, RayJobStatus
from controller.scheduler import WAITING_REASONS, Queue, Resources, Waiting
from controller.server import UNARY_THREADS, start
from controller.service import MAX_PAGE_SIZE, JobService
from controller.store import SCHEMA_VERSION, JobRecord, ModelRecord, Store
from dreambooth.client import ClientError, DreamBoothClient
from dreambooth.errors import InputError
from dreambooth.proto_convert import spec_to_proto
from dreambooth.v1 import jobs_pb2, jobs_pb2_grpc
from serving.config import ServeConfig
from tests.conftest import controller_process, free_port
from tests.test_controller import job_spec, ray_job_id, wait_until_ray_job_actors_end
from tests.test_store import schema_version, set_schema_version
from trainer import images as images_module
from trainer.events import EventLog
from trainer.spec import JobSpec
from trainer.storage import job_paths, storage_clock

TOKEN, QUEUED_ONLY_TOKEN = "failures-token", "queued-only-token"
# How long an ended job's tidying may take here: a Ray call of it that failed (the dashboard slow on a loaded machine)
# is tried again ended_jobs.RETRY_S later, as the controller means to.
TIDY_WAIT_S = 60 + ended_jobs.RETRY_S


@pytest.fixture
def config(tmp_path, tiny_model, dog_images) -> ControllerConfig:
    return ControllerConfig(
        storage=tmp_path / "storage",
        listen="127.0.0.1:0",
        ray_dashboard_url=f"http://127.0.0.1:{free_port()}",  # nothing listens: Ray is "down"
        tenants=(
            Tenant("alice", (TOKEN,), max_running_jobs=2),
            Tenant("bob", (QUEUED_ONLY_TOKEN,), max_running_jobs=0),  # bob's jobs stay QUEUED
        ),
        readable_paths=(tiny_model, dog_images),
        metrics_listen="",
        reconcile_interval_s=0.2,
        capacity_cpus=8,
        capacity_gpus=0,
        max_watches=2,
    )


@pytest.fixture
def controller(config):
    running = start(config)
    yield running
    running.stop(grace_s=1)


@pytest.fixture
def client(controller):
    with DreamBoothClient(f"127.0.0.1:{controller.port}", TOKEN, timeout_s=10) as c:
        yield c


def test_a_stopping_controller_ends_its_watches_at_once_for_clients_to_watch_again(config, tiny_model, dog_images):
    """An open WatchJob never ends on its own: a stopping controller waited out its whole grace on one (past `dreambooth
    down`'s wait, which then killed it) and ended it CANCELLED. It ends when the stop begins, UNAVAILABLE: its
    client watches again (the SDK does, on a restarted controller)."""
    running = start(config)
    try:
        with DreamBoothClient(f"127.0.0.1:{running.port}", QUEUED_ONLY_TOKEN) as bob:
            job = bob.submit(job_spec(tiny_model, dog_images))  # bob's jobs stay QUEUED
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            stream = jobs_pb2_grpc.JobServiceStub(channel).WatchJob(
                jobs_pb2.WatchJobRequest(job_id=job.job_id), metadata=[("authorization", f"Bearer {QUEUED_ONLY_TOKEN}")]
            )
            assert next(stream).job.state == jobs_pb2.STATE_QUEUED
            stopping = threading.Thread(target=running.stop, kwargs={"grace_s": 60})
            stopping.start()
            with pytest.raises(grpc.RpcError) as ended:
                for update in stream:  # what its job waits for, told as the scheduler finds it
                    assert update.job.state == jobs_pb2.STATE_QUEUED
            assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
            assert ended.value.details() == "the controller is shutting down: watch again"
            stopping.join(60)
            assert not stopping.is_alive()
    finally:
        running.stop(grace_s=0)


def test_ray_down_the_job_keeps_its_attempt_and_cancel_still_works(
    ray_cluster, config, controller, client, tiny_model, dog_images
):
    job = client.submit(job_spec(tiny_model, dog_images))
    # The reconciler starts the job, then fails to submit it to Ray (and keeps failing: Ray stays down).
    assert any(update.job.state == jobs_pb2.STATE_PREPARING for update in client.watch(job.job_id))
    record = controller.service.store.get_job(job.job_id)
    # Recorded with the state change, so the job is followed (found LOST, resubmitted) instead of stuck.
    assert (record.state, record.attempts, record.ray_submission_id) == ("PREPARING", 1, f"{job.job_id}-a1")

    with pytest.raises(ClientError) as logs:
        client.logs(job.job_id)
    assert logs.value.code == "UNAVAILABLE" and "Ray Jobs API" in logs.value.message
    assert config.ray_dashboard_url not in logs.value.message  # the cluster's internal address, for the log only
    # The cancel is recorded though Ray cannot be told yet; the job ends CANCELLED once Ray answers again, and
    # the attempt that Ray never received is not run then.
    assert client.cancel(job.job_id).state == jobs_pb2.STATE_CANCELLING
    with forwarding(urllib.parse.urlsplit(config.ray_dashboard_url).port, ray_cluster.dashboard_url):
        final = list(client.watch(job.job_id))[-1].job
        assert controller.service.ray_jobs.status(f"{job.job_id}-a1") == RayJobStatus.LOST
    assert (final.state, final.attempts) == (jobs_pb2.STATE_CANCELLED, 1)


def test_an_attempt_ray_never_received_is_submitted_again_not_spent(
    ray_cluster, config, controller, client, tiny_model, dog_images
):
    job = client.submit(job_spec(tiny_model, dog_images, max_steps=100_000, checkpoint_interval=100_000))
    assert any(update.job.state == jobs_pb2.STATE_PREPARING for update in client.watch(job.job_id))
    # Ray comes back: its Jobs API answers at the address the controller was given.
    with forwarding(urllib.parse.urlsplit(config.ray_dashboard_url).port, ray_cluster.dashboard_url):
        # TRAINING comes from the driver's own events: Ray ran the submission.
        assert any(update.job.state == jobs_pb2.STATE_TRAINING for update in client.watch(job.job_id))
        record = controller.service.store.get_job(job.job_id)
        # The failed submission was repeated as attempt 1; counting it would have made this attempt 2.
        assert (record.attempts, record.ray_submission_id) == (1, f"{job.job_id}-a1")
        ray_job = ray_job_id(ray_cluster.dashboard_url, record.ray_submission_id)
        client.cancel(job.job_id)
        assert list(client.watch(job.job_id))[-1].job.state == jobs_pb2.STATE_CANCELLED
    # Stopped while its workers started: none is left behind (their TCP store listens on every interface).
    wait_until_ray_job_actors_end(ray_cluster.dashboard_url, ray_job)


@contextlib.contextmanager
def reconciler_by_hand(config: ControllerConfig, **ray_jobs_options):
    """A reconciler of `config` whose passes the test runs itself, on a real store in its storage."""
    from controller.reconciler import Reconciler

    config.storage.mkdir(parents=True, exist_ok=True)
    store = Store(config.effective_database_url)
    ray_jobs = RayJobs(config.ray_dashboard_url, storage_root=str(config.storage), **ray_jobs_options)
    service = JobService(config, store, ray_jobs, ChangeFeed())
    reconciler = Reconciler(config, store, ray_jobs, service.feed, service)
    try:
        yield reconciler
    finally:
        reconciler.stop()
        store.close()


@pytest.fixture
def by_hand(ray_cluster, tmp_path):
    """A reconciler whose passes the test runs itself, on a real store and the session's Ray Jobs API."""
    config = ControllerConfig(
        storage=tmp_path,
        ray_dashboard_url=ray_cluster.dashboard_url,
        tenants=(Tenant("alice", (TOKEN,)),),
        max_attempts=2,  # each attempt after the first a real driver: one shows the rerun
    )
    with reconciler_by_hand(config) as reconciler:
        yield reconciler


def training_under(reconciler, driver: str) -> JobRecord:
    """A TRAINING job whose attempt 1 is `driver` (a shell command) on Ray, as if the reconciler had submitted it."""
    job = reconciler.store.insert_job(JobRecord("alice", {}))
    submission = f"{job.job_id}-a1"
    job = reconciler.store.transition(job.job_id, {"QUEUED"}, "TRAINING", attempts=1, ray_submission_id=submission)
    JobSubmissionClient(reconciler.config.ray_dashboard_url).submit_job(entrypoint=driver, submission_id=submission)
    return job


ONE_CPU = {"num_workers": 1, "cpus_per_worker": 1.0, "gpus_per_worker": 0}


def queued(store: Store, storage: Path, tenant: str = "alice", spec: dict | None = None, **fields) -> JobRecord:
    """A QUEUED job of `tenant`'s (a CPU's, by default), its folder made as its submission makes it."""
    job = store.insert_job(JobRecord(tenant, spec or ONE_CPU, **fields))
    job_paths(storage, job.job_id).job_dir.mkdir(parents=True)
    return job


@pytest.fixture
def ray_down(config):
    """A reconciler whose passes the test runs itself, on a real store, with `config`: Ray's Jobs API is a closed port
    (down) until the test forwards that port to the session's Ray (`forwarding`)."""
    with reconciler_by_hand(config) as reconciler:
        yield reconciler


def test_a_part_of_the_passes_failing_the_same_way_is_logged_once_a_while(caplog):
    """A Ray outage failed the scheduling of every pass, each logging its traceback: two a second for hours."""
    from controller.reconciler import PassFailures

    failures, outcome = PassFailures(repeat_log_s=3600), {"error": RayJobsError("Ray's dashboard is down")}

    def part() -> None:
        if outcome["error"] is not None:
            raise outcome["error"]

    def passes(count: int) -> list[str]:
        caplog.clear()
        for _ in range(count):
            assert (failures.run("scheduling", part) is None) == (outcome["error"] is None)
            failures.pass_done()
        return [record.getMessage() for record in caplog.records]

    with caplog.at_level(logging.ERROR, logger="controller.reconciler"):
        assert passes(50) == ["reconcile pass: scheduling failed; retrying next pass"]
        outcome["error"] = RayJobsError("Ray refused the token")  # another failure: told at once
        assert len(passes(5)) == 1
        failures._repeat_log_s = 0  # the interval passed: told again, with how often meanwhile
        assert passes(1) == [
            "reconcile pass: scheduling failed (and 4 times since it was last logged); retrying next pass"
        ]
        outcome["error"] = None  # recovered, then failing again: told at once
        assert passes(1) == []
        outcome["error"] = RayJobsError("Ray refused the token")
        failures._repeat_log_s = 3600
        assert len(passes(3)) == 1


def test_a_token_ray_refuses_is_why_jobs_wait(config):
    """Ray 2.60 turns token authentication on: a controller started without RAY_AUTH_MODE=token was refused each
    call, and its queued jobs said Ray's Jobs API "does not answer", which it did."""

    class Refusing(http.server.BaseHTTPRequestHandler):  # what Ray's dashboard answers a request without a token
        def do_GET(self) -> None:
            body = b"Unauthorized: Missing authentication token"
            self.send_response(401)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_POST = do_GET

        def log_message(self, *_) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Refusing)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}"
    config = dataclasses.replace(config, ray_dashboard_url=url, capacity_cpus=None, capacity_gpus=None)
    try:
        with reconciler_by_hand(config) as reconciler:
            job = queued(reconciler.store, config.storage)
            reconciler.reconcile_once()
            why = reconciler.service.waiting_for(reconciler.store.get_job(job.job_id))
        assert why.reason == "CLUSTER_UNAVAILABLE" and "refuses the controller's token" in why.message
        assert "RAY_AUTH_MODE=token" in why.message
    finally:
        server.shutdown()


def test_while_rays_jobs_api_cannot_be_reached_jobs_stay_queued_and_no_run_time_counts(ray_cluster, ray_down):
    """The cluster's size configured, a pass asks Ray nothing before it submits: during an outage, pass after pass
    started one more job into it, each PREPARING, holding its tenant's slot, its max_job_run_s counting; once Ray was
    back after longer than that, each was sent only to be stopped (RUN_TIME_EXCEEDED). One job's submission fails;
    the others wait, queued, saying why; its run time counts from when Ray has it."""
    reconciler, store, service, ray_jobs = ray_down, ray_down.store, ray_down.service, ray_down.ray_jobs
    first, second, third = (queued(store, reconciler.config.storage) for _ in range(3))  # alice runs 2 at most
    for _ in range(3):
        reconciler.reconcile_once()
    sent = store.get_job(first.job_id)
    assert (sent.state, sent.attempts, sent.start_time) == ("PREPARING", 1, None)  # nothing ran: no run time
    assert store.get_job(second.job_id).state == "QUEUED"
    why = service.waiting_for(store.get_job(second.job_id))
    assert why.reason == "CLUSTER_UNAVAILABLE" and "Ray's Jobs API cannot be reached" in why.message
    assert service.waiting_for(store.get_job(third.job_id)).reason == "TENANT_LIMIT"

    back = time.time()
    with forwarding(urllib.parse.urlsplit(reconciler.config.ray_dashboard_url).port, ray_cluster.dashboard_url):
        reconciler.reconcile_once()  # the attempt Ray never had goes as itself; then the next job starts
        submissions = [f"{job.job_id}-a1" for job in (first, second)]
        try:
            for job in (first, second):
                started = store.get_job(job.job_id)
                assert (started.state, started.attempts) == ("PREPARING", 1)
                assert started.start_time >= back and not reconciler._past_run_time(started)
            assert all(ray_jobs.status(submission) != RayJobStatus.LOST for submission in submissions)
        finally:
            for submission in submissions:
                ray_jobs.stop(submission)
                _ended(ray_jobs, submission)


def test_while_rays_jobs_api_answers_nothing_no_more_jobs_start(config):
    """A head that takes connections but does not answer (wedged, overloaded): its submission timed out "reaching" Ray,
    and each pass started one more job into it, each holding its tenant's slot, each pass waiting on every one."""
    with socket.socket() as wedged:
        wedged.bind(("127.0.0.1", 0))
        wedged.listen(64)  # connections are made, and never answered
        config = dataclasses.replace(config, ray_dashboard_url=f"http://127.0.0.1:{wedged.getsockname()[1]}")
        with reconciler_by_hand(config, timeout_s=1) as reconciler:
            store, service = reconciler.store, reconciler.service
            jobs = [queued(store, config.storage) for _ in range(2)]  # alice runs 2 at once
            for _ in range(3):
                reconciler.reconcile_once()
            assert [store.get_job(job.job_id).state for job in jobs] == ["PREPARING", "QUEUED"]
            assert service.waiting_for(store.get_job(jobs[1].job_id)).reason == "CLUSTER_UNAVAILABLE"
            # Without the cluster's size configured, a pass asks Ray for it: the queue says why it waits.
            reconciler.config = dataclasses.replace(config, capacity_cpus=None)
            reconciler._capacity = None
            reconciler.reconcile_once()
            assert service.waiting_for(store.get_job(jobs[1].job_id)).reason == "CLUSTER_UNAVAILABLE"


def test_a_cancel_during_a_pass_keeps_it_from_sending_the_attempt_ray_never_had(ray_cluster, ray_down):
    """A pass reads a job whose submission could not reach Ray; the job is cancelled (Ray has nothing to stop); Ray is
    back when the pass comes to the job: the attempt is not sent then, to be stopped on the next pass."""
    reconciler, store, ray_jobs = ray_down, ray_down.store, ray_down.ray_jobs
    job = queued(store, reconciler.config.storage)
    reconciler._schedule()  # PREPARING; its submission fails
    with forwarding(urllib.parse.urlsplit(reconciler.config.ray_dashboard_url).port, ray_cluster.dashboard_url):
        read_by_the_pass = store.get_job(job.job_id)
        assert reconciler.service.cancel("alice", job.job_id).state == "CANCELLING"
        reconciler._follow(read_by_the_pass)
        assert ray_jobs.status(f"{job.job_id}-a1") == RayJobStatus.LOST
        reconciler._follow(store.get_job(job.job_id))
    final = store.get_job(job.job_id)
    assert (final.state, final.attempts) == ("CANCELLED", 1)


def test_a_job_cancelled_and_deleted_after_a_pass_read_the_queue_leaves_no_folder(ray_down, monkeypatch):
    """The pass goes on to start it: its events file was made, and its folder with it, which nothing removed after."""
    reconciler, store, service = ray_down, ray_down.store, ray_down.service
    job = queued(store, reconciler.config.storage)
    read_queue = store.queued_jobs

    def cancelled_and_deleted_once_read(*args):
        queue = read_queue(*args)
        service.cancel("alice", job.job_id)
        service.delete("alice", job.job_id)
        return queue

    monkeypatch.setattr(store, "queued_jobs", cancelled_and_deleted_once_read)
    reconciler._schedule()
    assert store.get_job(job.job_id) is None
    assert not job_paths(reconciler.config.storage, job.job_id).job_dir.exists()
    # A job whose folder is gone otherwise (a database restored beside older storage) starts, into what it lacks: it
    # waited for good, "the controller cannot write to its storage", holding its place and its share of the cluster.
    monkeypatch.undo()
    other = queued(store, reconciler.config.storage)
    shutil.rmtree(job_paths(reconciler.config.storage, other.job_id).job_dir)
    reconciler._schedule()
    assert (store.get_job(other.job_id).state, store.get_job(other.job_id).attempts) == ("PREPARING", 1)


@pytest.mark.parametrize("driver", ["sleep 600", "false"])  # stopped by the cancel / failed on its own
def test_a_cancel_between_a_pass_reading_a_job_and_ray_answering_still_ends_cancelled(by_hand, driver):
    """A reconcile pass reads a job, then asks Ray about it; a cancel in between must not turn into FAILED
    ("stopped outside the controller") or a fresh attempt. Real store, Ray and Jobs API; the pass is run by
    hand on the job as it read it, the interleaving a busy controller meets."""
    reconciler, store, ray_jobs, service = by_hand, by_hand.store, by_hand.ray_jobs, by_hand.service
    job = training_under(reconciler, driver)
    submission = job.ray_submission_id

    if driver == "false":
        assert _ended(ray_jobs, submission) == RayJobStatus.FAILED  # before the cancel: a failed attempt
    read_by_the_pass = store.get_job(job.job_id)
    assert service.cancel("alice", job.job_id).state == "CANCELLING"
    assert _ended(ray_jobs, submission) in (RayJobStatus.STOPPED, RayJobStatus.FAILED)
    reconciler._follow(read_by_the_pass)
    assert store.get_job(job.job_id).state == "CANCELLING"  # neither FAILED nor resubmitted
    reconciler._follow(store.get_job(job.job_id))
    final = store.get_job(job.job_id)
    assert (final.state, final.failure_reason, final.attempts) == ("CANCELLED", None, 1)


def test_a_driver_that_died_is_run_again_until_its_attempts_are_spent(by_hand):
    """The controller's fault tolerance: a Ray job that ended without the trainer's verdict (its driver killed,
    its node lost) is submitted again as the next attempt, which resumes from the job's checkpoint, up to
    max_attempts; then the job fails with the last attempt's log. Attempt 1 fails on its own here; attempt 2 is
    the real trainer driver, submitted by the reconciler, which finds no spec in this job's folder. The job's log
    holds both attempts', before and after the controller keeps it."""
    reconciler = by_hand
    job = training_under(reconciler, "echo attempt 1 died here; false")
    job_paths(reconciler.config.storage, job.job_id).job_dir.mkdir(parents=True)  # as its submission made it
    for attempt in range(1, reconciler.config.max_attempts + 1):
        assert _ended(reconciler.ray_jobs, f"{job.job_id}-a{attempt}") == RayJobStatus.FAILED
        if attempt < reconciler.config.max_attempts:  # this pass submits the next attempt
            last_submission_after = time.time() - 1  # mtimes come from the kernel's coarser clock
        reconciler._follow(reconciler.store.get_job(job.job_id))
        job = reconciler.store.get_job(job.job_id)
        if attempt < reconciler.config.max_attempts:
            assert (job.state, job.attempts, job.ray_submission_id) == (
                "TRAINING",
                attempt + 1,
                f"{job.job_id}-a{attempt + 1}",
            )
    assert (job.state, job.failure_reason, job.attempts) == ("FAILED", "RAY_JOB_FAILED", 2)
    assert "spec" in job.failure_message and "spec.json" in job.failure_message, job.failure_message
    # Each submission touched the job's events: a LOST attempt counts as live for LOST_QUIET_S after it.
    events = job_paths(reconciler.config.storage, job.job_id).events_file
    assert events.stat().st_mtime >= last_submission_after

    def both_attempts_in(log: str) -> None:
        first, second = (
            f"=== attempt 1 of 2 (Ray job {job.job_id}-a1) ===",
            f"=== attempt 2 of 2 (Ray job {job.job_id}-a2)",
        )
        assert log.index(first) < log.index("attempt 1 died here") < log.index(second) < log.index("spec.json"), log

    both_attempts_in(reconciler.service.logs("alice", job.job_id))  # from Ray
    deadline = time.monotonic() + TIDY_WAIT_S
    while reconciler.ray_jobs.status(f"{job.job_id}-a1") != RayJobStatus.LOST:
        assert time.monotonic() < deadline, "Ray's records of an ended job were kept"
        time.sleep(0.1)
    both_attempts_in(reconciler.service.logs("alice", job.job_id))  # kept in the job's folder
    # Attempts Ray knows none of read as no log (GetJobLogs then answers from the kept file), not as headers.
    assert reconciler.ray_jobs.attempt_logs(job.job_id, 2) == ""


@pytest.mark.parametrize("trainer_then", ["hangs", "succeeds"])
def test_a_job_running_past_max_job_run_s_is_stopped_and_fails(by_hand, trainer_then):
    """A hung job (a stuck collective holds its workers) is stopped at the controller's limit as a cancel is:
    CANCELLING until Ray reports its driver ended, then FAILED (RUN_TIME_EXCEEDED), its attempts not spent on a rerun.
    A model finished meanwhile wins, as over a late cancel, and the job carries no failure then."""
    reconciler, store = by_hand, by_hand.store
    job = training_under(reconciler, "sleep 600")
    # Ray has it, and its run time has no start: a controller died between the submission and recording it.
    reconciler._follow(job)
    assert time.time() - store.get_job(job.job_id).start_time < 60  # counted from now, not never
    store.update_job(job.job_id, start_time=time.time() - reconciler.config.max_job_run_s + 60)
    reconciler._follow(store.get_job(job.job_id))
    assert store.get_job(job.job_id).state == "TRAINING"  # a minute inside the limit

    store.update_job(job.job_id, start_time=time.time() - reconciler.config.max_job_run_s - 1)
    reconciler._follow(store.get_job(job.job_id))
    stopping = store.get_job(job.job_id)
    assert (stopping.state, stopping.failure_reason) == ("CANCELLING", "RUN_TIME_EXCEEDED")
    assert _ended(reconciler.ray_jobs, job.ray_submission_id) == RayJobStatus.STOPPED
    if trainer_then == "succeeds":
        EventLog(job_paths(reconciler.config.storage, job.job_id).events_file).emit("state", state="SUCCEEDED")
    reconciler._follow(store.get_job(job.job_id))
    final = store.get_job(job.job_id)
    if trainer_then == "succeeds":
        assert (final.state, final.failure_reason, final.failure_message) == ("SUCCEEDED", None, None)
    else:
        assert (final.state, final.failure_reason, final.attempts) == ("FAILED", "RUN_TIME_EXCEEDED", 1)
        assert "24 h after it started" in final.failure_message and "max_job_run_s" in final.failure_message


def test_a_driver_stopped_between_its_model_and_its_success_ends_succeeded_with_the_model(by_hand):
    """The model is written (and listed, deployable) before the trainer says SUCCEEDED: a cancel, or the run-time
    limit, stopping the driver in between left a CANCELLED (or FAILED) job holding a model."""
    reconciler, store, service = by_hand, by_hand.store, by_hand.service
    job = training_under(reconciler, "sleep 600")
    events = EventLog(job_paths(reconciler.config.storage, job.job_id).events_file)
    events.emit("state", state="EXPORTING")
    events.emit("model", path=str(job_paths(reconciler.config.storage, job.job_id).model_dir), metadata={})
    reconciler._follow(store.get_job(job.job_id))
    assert service.cancel("alice", job.job_id).state == "CANCELLING"
    _ended(reconciler.ray_jobs, job.ray_submission_id)
    reconciler._follow(store.get_job(job.job_id))
    final = store.get_job(job.job_id)
    assert (final.state, final.failure_reason, final.model_id) == ("SUCCEEDED", None, f"model-{job.job_id[4:]}")
    assert store.get_model(final.model_id).job_id == job.job_id


def test_past_the_run_time_limit_an_export_finishes_and_a_dead_driver_is_not_run_again(by_hand, tiny_model, dog_images):
    """An exporting job is let finish (its model is nearly there; a stop would delete the half-written export), and
    a job past the limit whose driver died is not submitted again only to be stopped on the next pass."""
    reconciler, store = by_hand, by_hand.store
    past = time.time() - reconciler.config.max_job_run_s - 1
    exporting = training_under(reconciler, "sleep 600")
    store.transition(exporting.job_id, {"TRAINING"}, "EXPORTING", start_time=past)
    try:
        reconciler._follow(store.get_job(exporting.job_id))
        assert store.get_job(exporting.job_id).state == "EXPORTING"
    finally:
        reconciler.ray_jobs.stop(exporting.ray_submission_id)
    # Its driver died exporting: the rerun is PREPARING (checking the job's inputs again) until it reaches the export.
    spec = job_spec(tiny_model, dog_images, max_steps=6, validation_prompts=["a photo of sks dog"])
    rerun = dataclasses.replace(store.get_job(exporting.job_id), state="PREPARING", spec=spec)
    grid = job_paths(reconciler.config.storage, exporting.job_id).validation_grid(6)
    grid.parent.mkdir(parents=True)
    grid.touch()
    assert not reconciler._past_run_time(dataclasses.replace(rerun, last_checkpoint_step=6))
    assert reconciler._past_run_time(dataclasses.replace(rerun, last_checkpoint_step=4))  # training left: stopped
    grid.unlink()  # it died drawing the final grid: the rerun trains (workers and all) to draw it
    assert reconciler._past_run_time(dataclasses.replace(rerun, last_checkpoint_step=6))
    died = training_under(reconciler, "false")
    store.update_job(died.job_id, start_time=past)
    assert _ended(reconciler.ray_jobs, died.ray_submission_id) == RayJobStatus.FAILED
    reconciler._follow(store.get_job(died.job_id))
    final = store.get_job(died.job_id)
    assert (final.state, final.failure_reason, final.attempts) == ("FAILED", "RUN_TIME_EXCEEDED", 1)


def test_a_job_whose_storage_cannot_be_written_is_submitted_again_not_spent(by_hand):
    """Storage full, read-only or gone when the job starts: nothing reached Ray, and the attempt is not spent (three
    passes during an outage of minutes failed every queued job, each after three submissions never sent)."""
    reconciler = by_hand
    job = reconciler.store.insert_job(
        JobRecord("alice", {"num_workers": 1, "cpus_per_worker": 0.1, "gpus_per_worker": 0})
    )
    folder = job_paths(reconciler.config.storage, job.job_id).job_dir
    folder.parent.mkdir(parents=True)
    folder.write_text("not a folder")  # its events file cannot be made
    for _ in range(3):
        reconciler.reconcile_once()
    waiting = reconciler.store.get_job(job.job_id)  # not started: no attempt spent, no run time counted
    assert (waiting.state, waiting.attempts, waiting.start_time) == ("QUEUED", 0, None)
    why = reconciler.service.waiting_for(waiting)
    assert why.reason == "STORAGE_UNAVAILABLE" and "cannot write to its storage" in why.message
    # A job started before the outage whose next submission meets it (its driver died, say): the same attempt.
    submission = f"{job.job_id}-a1"
    started = reconciler.store.transition(
        job.job_id, {"QUEUED"}, "PREPARING", attempts=1, ray_submission_id=submission, start_time=time.time()
    )
    with pytest.raises(OSError):
        reconciler._submit(started)
    for _ in range(3):  # passes that find Ray does not know it
        reconciler.reconcile_once()
    assert reconciler.store.get_job(job.job_id).attempts == 1
    folder.unlink()  # the storage is back: the same attempt is submitted
    folder.mkdir()
    reconciler.reconcile_once()
    assert reconciler.ray_jobs.status(submission) != RayJobStatus.LOST
    assert reconciler.store.get_job(job.job_id).attempts == 1
    reconciler.ray_jobs.stop(submission)
    _ended(reconciler.ray_jobs, submission)


def test_a_successful_jobs_checkpoints_go_once_its_driver_has_ended(by_hand, monkeypatch):
    """~22 GiB per SD 1.5 job that nothing reads once its model is exported. The trainer reports SUCCEEDED as its
    driver's last act: the driver may still run then, so they go once Ray says it ended. A failed job keeps its
    (`dreambooth train --job-id` resumes it), and every job keeps the rest of its folder."""
    reconciler = by_hand
    reconciler._ended_jobs._poll_s = 0.1
    jobs = {verdict: training_under(reconciler, "sleep 600") for verdict in ("SUCCEEDED", "FAILED")}
    paths = {verdict: job_paths(reconciler.config.storage, job.job_id) for verdict, job in jobs.items()}
    for verdict, job in jobs.items():
        (paths[verdict].checkpoints_dir / "checkpoint_step_0000002").mkdir(parents=True)
        EventLog(paths[verdict].events_file).emit("state", state=verdict)
        assert reconciler._apply_events(job).state == verdict
    # The cleanup asks Ray (for real) whether the driver ended: a few looks at it still running, checkpoints kept.
    looks = threading.Semaphore(0)
    status = reconciler.ray_jobs.status

    def counted(submission: str) -> RayJobStatus:
        if submission == jobs["SUCCEEDED"].ray_submission_id:
            looks.release()
        return status(submission)

    monkeypatch.setattr(reconciler.ray_jobs, "status", counted)
    for _ in range(3):
        assert looks.acquire(timeout=TIDY_WAIT_S), "the cleanup did not look at the driver"
    assert paths["SUCCEEDED"].checkpoints_dir.exists()
    for job in jobs.values():
        reconciler.ray_jobs.stop(job.ray_submission_id)
    deadline = time.monotonic() + TIDY_WAIT_S
    while paths["SUCCEEDED"].checkpoints_dir.exists():
        assert time.monotonic() < deadline, "a successful job's checkpoints were kept after its driver ended"
        time.sleep(0.1)
    assert paths["SUCCEEDED"].events_file.exists() and paths["FAILED"].checkpoints_dir.exists()


def training_with_a_checkpoint(reconciler, monkeypatch, driver: str, driver_exit_wait_s: float):
    """A TRAINING job under `driver`, with a checkpoint; its tidying once it ends waits `driver_exit_wait_s` for the
    driver to end, and tries again at once."""
    reconciler._ended_jobs._poll_s = 0.05
    monkeypatch.setattr(ended_jobs, "DRIVER_EXIT_WAIT_S", driver_exit_wait_s)
    monkeypatch.setattr(ended_jobs, "RETRY_S", 0.05)
    job = training_under(reconciler, driver)
    paths = job_paths(reconciler.config.storage, job.job_id)
    (paths.checkpoints_dir / "checkpoint_step_0000002").mkdir(parents=True)
    return job, paths


def test_a_driver_that_hangs_after_its_verdict_is_stopped_and_its_job_tidied(by_hand, monkeypatch):
    """The verdict is the driver's last act: one still running long after hangs on its way out, holding its workers
    (GPUs) for good, and its job's checkpoints were never removed. It is stopped, and the job tidied."""
    reconciler = by_hand
    job, paths = training_with_a_checkpoint(reconciler, monkeypatch, "sleep 600", driver_exit_wait_s=1.0)
    # Tried until the stopped driver has ended: five tries a moment apart ran out on a loaded machine before it had.
    monkeypatch.setattr(ended_jobs, "TRIES", 10_000)
    EventLog(paths.events_file).emit("state", state="SUCCEEDED")
    assert reconciler._apply_events(job).state == "SUCCEEDED"
    deadline = time.monotonic() + TIDY_WAIT_S
    while paths.checkpoints_dir.exists() or reconciler.ray_jobs.status(job.ray_submission_id) != RayJobStatus.LOST:
        assert time.monotonic() < deadline, "a driver hanging after its verdict held its job's leftovers"
        time.sleep(0.1)
    assert paths.driver_log.exists()


def test_tidying_given_up_is_logged_as_an_error(by_hand, monkeypatch, caplog):
    """Ray's API unreachable through every try: what stays (a successful job's checkpoints, Ray's records) is
    said once as an error, not dropped after a last warning that promised another try."""
    reconciler = by_hand
    job, paths = training_with_a_checkpoint(reconciler, monkeypatch, "true", driver_exit_wait_s=0.1)

    def unreachable(_submission: str) -> RayJobStatus:
        raise RayJobsError("Ray's dashboard is down")

    monkeypatch.setattr(reconciler.ray_jobs, "status", unreachable)
    EventLog(paths.events_file).emit("state", state="SUCCEEDED")
    with caplog.at_level(logging.ERROR, logger=ended_jobs.__name__):
        assert reconciler._apply_events(job).state == "SUCCEEDED"
        deadline = time.monotonic() + TIDY_WAIT_S
        while not (gave_up := [r for r in caplog.records if r.levelno == logging.ERROR]):
            assert time.monotonic() < deadline, "giving up was not logged"
            time.sleep(0.05)
    assert job.job_id in gave_up[0].getMessage() and "its checkpoints" in gave_up[0].getMessage()
    assert paths.checkpoints_dir.exists()


def test_an_ended_jobs_driver_log_is_kept_and_rays_records_of_it_go(by_hand):
    """Ray keeps an ended job's record in its head's memory until it is deleted (one per attempt ever run), and a
    head restarted without fault tolerance lost them, and the logs with them: the log is kept in the job's folder,
    which GetJobLogs reads from then on."""
    reconciler = by_hand
    job = training_under(reconciler, "echo the driver said this")
    _ended(reconciler.ray_jobs, job.ray_submission_id)
    EventLog(job_paths(reconciler.config.storage, job.job_id).events_file).emit("state", state="FAILED")
    assert reconciler._apply_events(job).state == "FAILED"
    deadline = time.monotonic() + TIDY_WAIT_S
    while reconciler.ray_jobs.status(job.ray_submission_id) != RayJobStatus.LOST:
        assert time.monotonic() < deadline, "Ray's record of an ended job was kept"
        time.sleep(0.1)
    assert "the driver said this" in reconciler.service.logs("alice", job.job_id)


def test_rays_records_go_for_a_job_deleted_first_and_nothing_is_kept_of_one_ray_lost(by_hand):
    """DeleteJob may take a job's folder before its driver's log is kept: Ray's records go all the same (no row is
    left for a later sweep to find). A job Ray lost (its head restarted) gets no empty log that would hide Ray's,
    were the dashboard URL only wrong for a while."""
    from controller.ended_jobs import EndedJob

    reconciler = by_hand
    deleted = training_under(reconciler, "echo a job deleted at once")
    _ended(reconciler.ray_jobs, deleted.ray_submission_id)
    assert not job_paths(reconciler.config.storage, deleted.job_id).job_dir.exists()  # as DeleteJob leaves it
    assert reconciler._ended_jobs._tidy(EndedJob(deleted.job_id, "SUCCEEDED", attempts=1))
    assert reconciler.ray_jobs.status(deleted.ray_submission_id) == RayJobStatus.LOST

    lost = reconciler.store.insert_job(JobRecord("alice", {}))  # attempt 1 never reached this Ray
    paths = job_paths(reconciler.config.storage, lost.job_id)
    paths.job_dir.mkdir(parents=True)
    assert reconciler._ended_jobs._tidy(EndedJob(lost.job_id, "FAILED", attempts=1))
    assert not paths.driver_log.exists()


def test_a_log_that_cannot_be_kept_holds_neither_the_checkpoints_nor_rays_record(by_hand, monkeypatch):
    """A disk filled by an export: keeping the driver's log (KBs) fails, yet the tens of GiB of checkpoints go
    (they waited behind it, and the disk stayed full); Ray's records stay until the log is kept."""
    from controller.ended_jobs import EndedJob

    reconciler = by_hand
    job = training_under(reconciler, "echo a driver on a full disk")
    _ended(reconciler.ray_jobs, job.ray_submission_id)
    paths = job_paths(reconciler.config.storage, job.job_id)
    (paths.checkpoints_dir / "checkpoint_step_0000002").mkdir(parents=True)

    def no_space(*_) -> None:
        raise OSError(errno.ENOSPC, "disk full")

    with monkeypatch.context() as full:
        full.setattr(ended_jobs, "write_file", no_space)
        with pytest.raises(OSError, match="disk full"):
            reconciler._ended_jobs._tidy(EndedJob(job.job_id, "SUCCEEDED", attempts=1))
    assert not paths.checkpoints_dir.exists()
    assert reconciler.ray_jobs.status(job.ray_submission_id) != RayJobStatus.LOST
    # Room again: tried again, the log is kept and the records go.
    assert reconciler._ended_jobs._tidy(EndedJob(job.job_id, "SUCCEEDED", attempts=1))
    assert "a driver on a full disk" in paths.driver_log.read_text()
    assert reconciler.ray_jobs.status(job.ray_submission_id) == RayJobStatus.LOST


def test_a_controller_stopped_before_a_removal_leaves_it_to_the_next(by_hand):
    """The removals wait in memory: a controller restarted meanwhile (every rollout) finds the job again."""
    reconciler, store = by_hand, by_hand.store
    job = training_under(reconciler, "true")
    _ended(reconciler.ray_jobs, job.ray_submission_id)
    store.transition(job.job_id, {"TRAINING"}, "SUCCEEDED", end_time=time.time())  # by a controller now gone
    checkpoints = job_paths(reconciler.config.storage, job.job_id).checkpoints_dir
    (checkpoints / "checkpoint_step_0000002").mkdir(parents=True)
    reconciler.start()
    deadline = time.monotonic() + TIDY_WAIT_S
    while checkpoints.exists():
        assert time.monotonic() < deadline, "the checkpoints a stopped controller left were kept"
        time.sleep(0.1)


def test_a_running_jobs_training_metrics_go_when_it_ends(by_hand):
    """Each running job's step, loss and throughput are the controller's gauges, by job id; an ended job's series
    are removed, so that the exporter holds the running jobs' only, however many have run (the trainers' Ray metrics,
    which Ray's agent keeps for the node's lifetime, carry no job id)."""
    reconciler = by_hand
    job = reconciler.store.insert_job(JobRecord("alice", {}))
    job = reconciler.store.transition(job.job_id, {"QUEUED"}, "TRAINING", attempts=1, ray_submission_id="x-a1")
    events = EventLog(job_paths(reconciler.config.storage, job.job_id).events_file)
    events.emit("progress", step=3, total_steps=10, loss=0.25, prior_loss=0.1, lr=1e-5, steps_per_s=1.5, eta_s=4.7)
    job = reconciler._apply_events(job)

    def sample(name: str) -> float | None:
        return metrics.REGISTRY.get_sample_value(name, {"job_id": job.job_id})

    assert (sample("dreambooth_job_step"), sample("dreambooth_job_loss")) == (3, 0.25)
    assert sample("dreambooth_job_steps_per_second") == 1.5
    events.emit("state", state="FAILED", reason="TRAINING_FAILED", message="WorkerGroupError: diverged")
    assert reconciler._apply_events(job).state == "FAILED"
    assert [sample(n) for n in ("dreambooth_job_step", "dreambooth_job_loss", "dreambooth_job_steps_per_second")] == [
        None
    ] * 3


def test_a_failure_reason_outside_the_closed_set_counts_as_training_failed(by_hand):
    """Clients switch on Failure.reason's documented set, and it labels the failures metric: a trainer of an older
    release (upgraded after the controller) wrote the exception's type name there."""
    reconciler = by_hand
    job = reconciler.store.insert_job(JobRecord("alice", {}))
    job = reconciler.store.transition(job.job_id, {"QUEUED"}, "TRAINING", attempts=1, ray_submission_id="x-a1")
    events = EventLog(job_paths(reconciler.config.storage, job.job_id).events_file)
    events.emit("state", state="FAILED", reason="RuntimeError", message="CUDA error: an illegal memory access")
    job = reconciler._apply_events(job)
    assert (job.state, job.failure_reason) == ("FAILED", "TRAINING_FAILED")
    assert job.failure_message == "RuntimeError: CUDA error: an illegal memory access"
    assert metrics.REGISTRY.get_sample_value("dreambooth_job_failures_total", {"reason": "RuntimeError"}) is None


def test_a_job_whose_last_attempts_logs_cannot_be_had_still_fails(by_hand, monkeypatch):
    """The log tail is for the reader: a head that cannot serve it (the driver's node gone) must not keep the job
    TRAINING, and its slot held, for ever. The controller reaches the session's dashboard through a proxy that
    answers HTTP 500 for job logs and forwards everything else."""
    reconciler = by_hand
    job = training_under(reconciler, "false")
    _ended(reconciler.ray_jobs, job.ray_submission_id)
    reconciler.store.update_job(job.job_id, attempts=reconciler.config.max_attempts)
    logs_path = f"/api/jobs/{job.ray_submission_id}/logs"  # what Ray's Jobs SDK asks for a job's logs

    def is_logs(path: str) -> bool:
        return path.startswith("/api/jobs/") and path.endswith("/logs")

    with dashboard_proxy(reconciler.config.ray_dashboard_url, failing=is_logs) as proxy:
        monkeypatch.setattr(reconciler, "ray_jobs", RayJobs(proxy.url, storage_root=reconciler.ray_jobs.storage_root))
        reconciler._follow(reconciler.store.get_job(job.job_id))
    final = reconciler.store.get_job(job.job_id)
    assert (final.state, final.failure_reason) == ("FAILED", "RAY_JOB_FAILED")
    assert f"(unavailable: Ray Jobs API at {proxy.url}: logs of {job.ray_submission_id} failed" in final.failure_message
    assert "status code 500" in final.failure_message
    assert [(method, status) for method, path, status in proxy.served if is_logs(path)] == [("GET", 500)]
    assert ("GET", logs_path, 500) in proxy.served
    assert ("GET", f"/api/jobs/{job.ray_submission_id}", 200) in proxy.served  # its status came from Ray


def test_a_cancelled_job_whose_submission_ray_may_still_start_waits_for_it(by_hand):
    """A submission that timed out may reach Ray later (a slow head): while Ray does not know it yet, a cancel
    keeps stopping it rather than ending the job, which would then train on as CANCELLED. Ended once nothing
    was heard of it for LOST_QUIET_S."""
    from controller.reconciler import LOST_QUIET_S

    reconciler = by_hand
    job = reconciler.store.insert_job(JobRecord("alice", {}))
    job = reconciler.store.transition(job.job_id, {"QUEUED"}, "CANCELLING", attempts=1, ray_submission_id="x-a1")
    events = job_paths(reconciler.config.storage, job.job_id).events_file
    events.parent.mkdir(parents=True)
    events.touch()  # as its submission left it, a moment ago
    reconciler._follow(reconciler.store.get_job(job.job_id))
    assert reconciler.store.get_job(job.job_id).state == "CANCELLING"
    quiet = time.time() - LOST_QUIET_S - 1
    os.utime(events, (quiet, quiet))
    reconciler._follow(reconciler.store.get_job(job.job_id))
    assert reconciler.store.get_job(job.job_id).state == "CANCELLED"


def test_a_job_ray_does_not_know_is_not_run_again_while_its_events_still_change(by_hand, monkeypatch):
    """A controller pointed at another Ray cluster (a Ray upgrade, a mistaken ray_dashboard_url) finds its running
    jobs LOST: one whose events file still changes runs elsewhere and must not run twice beside itself (both would
    write its checkpoints and model); once its events are quiet it was lost (a restarted Ray head): run again."""
    from controller.reconciler import LOST_QUIET_S

    reconciler = by_hand
    job = reconciler.store.insert_job(JobRecord("alice", {}))
    reconciler.store.transition(job.job_id, {"QUEUED"}, "TRAINING", attempts=1, ray_submission_id=f"{job.job_id}-a1")
    events = job_paths(reconciler.config.storage, job.job_id).events_file
    EventLog(events).emit("progress", step=1, total_steps=10)
    reconciler._follow(reconciler.store.get_job(job.job_id))
    assert reconciler.store.get_job(job.job_id).attempts == 1
    assert reconciler.ray_jobs.status(f"{job.job_id}-a2") == RayJobStatus.LOST  # nothing submitted
    # This host's clock minutes ahead of the storage's (an NFS server stamps its files' times): still not quiet.
    host_clock = time.time
    with monkeypatch.context() as skewed:
        skewed.setattr(time, "time", lambda: host_clock() + LOST_QUIET_S + 60)
        reconciler._follow(reconciler.store.get_job(job.job_id))
    assert reconciler.store.get_job(job.job_id).attempts == 1
    quiet = time.time() - LOST_QUIET_S - 1
    os.utime(events, (quiet, quiet))
    reconciler._follow(reconciler.store.get_job(job.job_id))
    job = reconciler.store.get_job(job.job_id)
    assert (job.state, job.attempts, job.ray_submission_id) == ("TRAINING", 2, f"{job.job_id}-a2")


def test_a_storage_clock_that_cannot_be_read_falls_back_to_this_hosts(by_hand):
    """Its file another user's, or the storage mounted read-only: a LOST job is still looked at, not failed on."""
    reconciler = by_hand
    job = reconciler.store.insert_job(JobRecord("alice", {}))
    EventLog(job_paths(reconciler.config.storage, job.job_id).events_file).emit("progress", step=1, total_steps=10)
    storage_clock(reconciler.config.storage).symlink_to(Path(reconciler.config.storage) / "no" / "dir")
    assert 0 <= reconciler._events_quiet_s(job) < 60


@pytest.mark.parametrize(
    ("driver", "reason"),
    [("true", "NO_RESULT"), ("sleep 600", "STOPPED")],  # ended "successfully" without a model / stopped by hand
)
def test_a_ray_job_that_ended_without_the_trainers_verdict_fails_with_why(by_hand, driver, reason):
    reconciler = by_hand
    job = training_under(reconciler, driver)
    if driver.startswith("sleep"):
        JobSubmissionClient(reconciler.config.ray_dashboard_url).stop_job(job.ray_submission_id)  # not a cancel
    _ended(reconciler.ray_jobs, job.ray_submission_id)
    reconciler._follow(reconciler.store.get_job(job.job_id))
    final = reconciler.store.get_job(job.job_id)
    assert (final.state, final.failure_reason, final.attempts) == ("FAILED", reason, 1)


def _reconciling_one_job(config: ControllerConfig, store: Store, state: str):
    """A reconciler over `store` whose passes the test runs itself (its service as `.service`; Ray is never asked),
    and a job of alice's in `state`, its first attempt recorded."""
    from controller.reconciler import Reconciler

    service = JobService(
        config, store, RayJobs(config.ray_dashboard_url, storage_root=str(config.storage)), ChangeFeed()
    )
    job = store.insert_job(JobRecord("alice", {}))
    job = store.transition(job.job_id, {"QUEUED"}, state, attempts=1, ray_submission_id=f"{job.job_id}-a1")
    return Reconciler(config, store, service.ray_jobs, service.feed, service), job


def test_unreadable_event_lines_are_skipped_and_a_shortened_file_is_read_again(config):
    """The trainer's events file is the controller's only news of a job: a line torn by a full disk or a power
    loss (or NUL-filled), or one that parses but lacks what its type needs (another trainer version's), must not
    stop the job being followed for good, and neither may a file that lost the tail its stored offset counted (a
    power loss before it reached the disk)."""
    store = Store(config.effective_database_url)
    reconciler, job = _reconciling_one_job(config, store, "TRAINING")
    service = reconciler.service
    events = job_paths(config.storage, job.job_id).events_file
    events.parent.mkdir(parents=True)
    log = EventLog(events)
    log.emit("progress", step=3, total_steps=10, loss=0.5)
    with events.open("ab") as f:
        f.write(b'{"type": "progress", "st\n\x00\x00\x00\n[1, 2]\n')
    # JSON events without what their type needs, or with what it cannot take.
    log.emit("checkpoint", path="/x")
    log.emit("class_images", done=2)
    log.emit("state")
    log.emit("model", metadata={})
    log.emit("progress", step=4, total_steps=10, loss=0.4)
    log.emit("progress", step="five", total_steps=10, loss=0.35)  # taken back whole: what it changed, what it told
    log.emit("state", state="EXPORTING")
    job = reconciler._apply_events(job)
    assert (job.state, job.progress["step"], job.events_offset) == ("EXPORTING", 4, events.stat().st_size)
    _, published, _ = service.feed.follow(job.job_id, 0, timeout_s=0)
    assert [c.data.get("step") for c in published if c.kind == "progress"] == [3, 4], published

    events.write_bytes(b"")  # the tail is lost; the trainer goes on appending
    log.emit("progress", step=9, total_steps=10, loss=0.2)
    log.emit("state", state="SUCCEEDED")
    job = reconciler._apply_events(store.get_job(job.job_id))
    assert (job.state, job.progress["step"], job.events_offset) == ("SUCCEEDED", 9, events.stat().st_size)
    store.close()


def test_a_tenant_whose_job_just_ended_lets_the_others_go_first(config):
    """alice queues top-priority jobs that each take the whole cluster; bob's job starts when alice's first ends."""
    from controller.reconciler import Reconciler

    config = dataclasses.replace(config, tenants=(Tenant("alice", (TOKEN,)), Tenant("bob", (QUEUED_ONLY_TOKEN,))))
    config.storage.mkdir(parents=True)
    store = Store(config.effective_database_url)
    service = JobService(
        config, store, RayJobs(config.ray_dashboard_url, storage_root=str(config.storage)), ChangeFeed()
    )
    reconciler = Reconciler(config, store, service.ray_jobs, service.feed, service)
    whole_cluster = {"num_workers": 1, "cpus_per_worker": config.capacity_cpus, "gpus_per_worker": 0}
    alices = [queued(store, config.storage, "alice", whole_cluster, priority=1000, create_time=i) for i in (1, 2)]
    bobs = queued(store, config.storage, "bob", whole_cluster, create_time=3)
    try:
        reconciler._schedule()  # Ray is down: the started job's submission fails (it is retried later)
        assert [store.get_job(j.job_id).state for j in (*alices, bobs)] == ["PREPARING", "QUEUED", "QUEUED"]
        assert [service.waiting_for(store.get_job(j.job_id)).reason for j in (alices[1], bobs)] == [
            "BEHIND_OTHER_JOB",  # bob's turn: alice holds the cluster
            "WAITING_FOR_RESOURCES",  # bob's is next to start
        ]
        # Every CPU is held now: the next pass reads no queue. What the last one found holds, but for the job next
        # to start, which waits for CPUs now; so does a job that pass did not see (its tenant is not at its limit).
        late = queued(store, config.storage, "bob", whole_cluster, create_time=4)
        reconciler._schedule()
        full = Waiting("WAITING_FOR_RESOURCES", "no CPU free: training may use 8, the running jobs hold 8")
        assert [service.waiting_for(store.get_job(j.job_id)) for j in (alices[1], bobs, late)] == [
            Waiting("BEHIND_OTHER_JOB", "behind another tenant's job, next to start"),
            full,
            full,
        ]
        # A tenant at its limit: its jobs wait for that, seen or not.
        service.tenants["bob"] = dataclasses.replace(service.tenants["bob"], max_running_jobs=0)
        reconciler._schedule()
        assert service.waiting_for(store.get_job(late.job_id)).reason == "TENANT_LIMIT"
        service.tenants["bob"] = dataclasses.replace(service.tenants["bob"], max_running_jobs=2)
        # The metric while full, from counts: the tenant's jobs at its limit; the others wait for CPUs.
        gauge = metrics.REGISTRY.get_sample_value
        assert [gauge("dreambooth_queued_jobs", {"reason": r}) for r in WAITING_REASONS] == [2, 1, 0, 0, 0, 0]
        store.transition(alices[0].job_id, {"PREPARING"}, "SUCCEEDED")
        reconciler._schedule()
        assert [store.get_job(j.job_id).state for j in (alices[1], bobs)] == ["QUEUED", "PREPARING"]
    finally:
        store.close()


def _ended(ray_jobs: RayJobs, submission: str, timeout_s: float = 60) -> RayJobStatus:
    """The Ray job's status once it has ended (Ray's Jobs API has no wait: polled)."""
    deadline = time.monotonic() + timeout_s
    while not (status := ray_jobs.status(submission)).ended:
        assert time.monotonic() < deadline, f"Ray job {submission} still {status.value} after {timeout_s} s"
        time.sleep(0.2)
    return status


@contextlib.contextmanager
def forwarding(port: int, target_url: str, silenced: threading.Event | None = None):
    """While the block runs, 127.0.0.1:`port` forwards TCP connections to `target_url`'s host and port. Once
    `silenced` is set, the open connections forward nothing more but are not closed either (a peer gone without a
    word) and new ones are closed at once."""
    target = urllib.parse.urlsplit(target_url)
    listener = socket.create_server(("127.0.0.1", port))
    listener.settimeout(0.1)
    stop = threading.Event()
    silenced = silenced or threading.Event()

    def pump(source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(1 << 16):
                if not silenced.is_set():
                    sink.sendall(data)
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)

    def accept() -> None:
        while not stop.is_set():
            try:
                incoming, _ = listener.accept()
            except TimeoutError:
                continue
            if silenced.is_set():  # the host is gone: a new connection gets no further
                incoming.close()
                continue
            incoming.settimeout(None)
            outgoing = socket.create_connection((target.hostname, target.port))
            threading.Thread(target=pump, args=(incoming, outgoing), daemon=True).start()
            threading.Thread(target=pump, args=(outgoing, incoming), daemon=True).start()

    acceptor = threading.Thread(target=accept, daemon=True)
    acceptor.start()
    try:
        yield
    finally:
        stop.set()
        acceptor.join()
        listener.close()


@dataclasses.dataclass
class DashboardProxy:
    url: str
    served: list[tuple[str, str, int]]  # (method, path, status) of each request answered, in order


# Headers of one connection, not of the request or response: not forwarded (RFC 9110 7.6.1).
_HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade"}


@contextlib.contextmanager
def dashboard_proxy(target_url: str, failing: Callable[[str], bool]):
    """While the block runs, an HTTP reverse proxy on 127.0.0.1 (a free port) in front of `target_url`: each request
    (method, path and query, headers, Ray's token among them, and body) is sent on and Ray's answer returned, but
    one whose path `failing` picks is answered HTTP 500 without reaching it (a head that cannot serve it)."""
    target = urllib.parse.urlsplit(target_url)
    served: list[tuple[str, str, int]] = []
    lock = threading.Lock()

    class Handler(http.server.BaseHTTPRequestHandler):
        def forward(self) -> None:
            path = urllib.parse.urlsplit(self.path).path
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            if failing(path):
                status, headers, content = 500, [("Content-Type", "text/plain")], b"Internal Server Error"
            else:
                upstream = http.client.HTTPConnection(target.hostname, target.port, timeout=60)
                try:
                    upstream.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
                    for name, value in self.headers.items():
                        if name.lower() not in _HOP_BY_HOP:
                            upstream.putheader(name, value)
                    upstream.endheaders(body or None)
                    answer = upstream.getresponse()
                    content = answer.read()
                    status = answer.status
                    # Content-Length is set below, for the whole body read; Server and Date by send_response.
                    dropped = _HOP_BY_HOP | {"content-length", "server", "date"}
                    headers = [(name, value) for name, value in answer.getheaders() if name.lower() not in dropped]
                finally:
                    upstream.close()
            with lock:
                served.append((self.command, path, status))
            self.send_response(status)
            for name, value in headers:
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(content)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(content)

        do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = forward

        def log_message(self, *args) -> None:  # quiet: the test says what it saw
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    serving = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    serving.start()
    try:
        yield DashboardProxy(f"http://127.0.0.1:{server.server_address[1]}", served)
    finally:
        server.shutdown()
        server.server_close()
        serving.join()


def test_a_watch_whose_connection_went_silent_gives_up_instead_of_hanging(controller, tiny_model, dog_images):
    """A controller host that crashed, or a load balancer dropping an idle stream, sends nothing more: no close,
    no error. Keepalive pings find the dead connection; the watch reconnects, then gives up after reconnect_for_s,
    rather than block for good on a job that may stay QUEUED for hours (bob's do: he may run none)."""
    with DreamBoothClient(f"127.0.0.1:{controller.port}", QUEUED_ONLY_TOKEN) as bob:
        job = bob.submit(job_spec(tiny_model, dog_images))
        # Told what it waits for before the watch starts, so that nothing more comes.
        next(update for update in bob.watch(job.job_id) if update.job.HasField("queued"))
    port, silenced = free_port(), threading.Event()
    with (
        forwarding(port, f"http://127.0.0.1:{controller.port}", silenced),
        DreamBoothClient(f"127.0.0.1:{port}", QUEUED_ONLY_TOKEN, keepalive_s=1) as watcher,
    ):
        updates = watcher.watch(job.job_id, reconnect_for_s=3)
        assert next(updates).job.state == jobs_pb2.STATE_QUEUED
        silenced.set()
        ended: list[BaseException] = []

        def wait_for_the_next() -> None:
            try:
                ended.append(AssertionError(f"an update came through a silent connection: {next(updates)}"))
            except Exception as e:
                ended.append(e)

        waiting = threading.Thread(target=wait_for_the_next, daemon=True)
        waiting.start()
        waiting.join(timeout=120)  # bounds a hang; keepalive (1 + 1 s), reconnecting (3 s), connect timeouts
        assert ended, "the watch still blocks on a connection that went silent"
        assert isinstance(ended[0], ClientError) and ended[0].code == "UNAVAILABLE", ended[0]


def test_a_queued_job_says_what_it_waits_for(controller, tiny_model, dog_images):
    with DreamBoothClient(f"127.0.0.1:{controller.port}", QUEUED_ONLY_TOKEN, timeout_s=10) as bob:
        job = bob.submit(job_spec(tiny_model, dog_images))
        # The watch's first update, or the one the controller's next scheduling pass publishes.
        told = next(update.job.queued for update in bob.watch(job.job_id) if update.job.HasField("queued"))
        assert (told.reason, told.message) == (
            "TENANT_LIMIT",
            "its tenant's max_running_jobs is 0: it starts once that is raised",
        )
        assert bob.get(job.job_id).queued == told and [j.queued for j in bob.list()] == [told]
        assert not bob.cancel(job.job_id).HasField("queued")


def test_open_watches_are_bounded_and_never_starve_other_calls(controller, tiny_model, dog_images):
    def refused() -> float:
        return metrics.REGISTRY.get_sample_value("dreambooth_watch_streams_total", {"code": "RESOURCE_EXHAUSTED"}) or 0

    before = refused()
    with DreamBoothClient(f"127.0.0.1:{controller.port}", QUEUED_ONLY_TOKEN, timeout_s=10) as client:
        check_bounded_watches(controller, client, client.submit(job_spec(tiny_model, dog_images)))  # stays QUEUED
    assert refused() == before + 1  # counted before the refusal is sent


def test_a_queued_job_cancelled_lets_its_uploaded_photos_go(controller, tiny_model, dog_images):
    with DreamBoothClient(f"127.0.0.1:{controller.port}", QUEUED_ONLY_TOKEN, timeout_s=10) as bob:
        job = bob.submit(job_spec(tiny_model, dog_images))  # stays QUEUED; its photos are uploaded
        uploads = controller.service.config.storage / "jobs" / job.job_id / "instance_images"
        assert len(list(uploads.iterdir())) == len(list(dog_images.iterdir()))
        bob.cancel(job.job_id)
        assert not uploads.exists() and (uploads.parent / "spec.json").exists()
        assert bob.get(job.job_id).state == jobs_pb2.STATE_CANCELLED


def test_a_job_id_taken_on_storage_is_drawn_again_not_written_into(controller, tiny_model, dog_images, monkeypatch):
    """Job ids are random: one whose folder exists (another tenant's job, a crash's leftover) must not get a second
    job's photos and spec, which the first job's next attempt would train on."""
    from controller import service

    taken = controller.service.config.storage / "jobs" / "job-000000000000"
    taken.mkdir(parents=True)
    (taken / "spec.json").write_text("theirs")
    ids = iter(["job-000000000000", "job-000000000001"])
    monkeypatch.setattr(service, "new_job_id", lambda: next(ids))
    with DreamBoothClient(f"127.0.0.1:{controller.port}", QUEUED_ONLY_TOKEN, timeout_s=10) as bob:
        assert bob.submit(job_spec(tiny_model, dog_images)).job_id == "job-000000000001"
    assert [p.name for p in taken.iterdir()] == ["spec.json"] and (taken / "spec.json").read_text() == "theirs"


def test_a_base_model_training_has_no_loss_for_is_refused_at_submission(tmp_path, tiny_model, dog_images):
    """As `dreambooth train` refuses it, before it queues: it had waited its turn and started a Ray job to fail."""
    import json
    import shutil

    model = shutil.copytree(tiny_model, tmp_path / "sample-predicting")
    config = model / "scheduler" / "scheduler_config.json"
    config.write_text(json.dumps(json.loads(config.read_text()) | {"prediction_type": "sample"}))
    settings = ControllerConfig(storage=tmp_path, ray_dashboard_url=f"http://127.0.0.1:{free_port()}")
    store = Store(settings.effective_database_url)
    service = JobService(settings, store, RayJobs(settings.ray_dashboard_url, storage_root=str(tmp_path)), ChangeFeed())
    try:
        with pytest.raises(InputError, match="prediction_type is 'sample'") as error:
            photos = [ImageInput(uri=str(photo)) for photo in sorted(dog_images.iterdir())]
            service.submit("default", job_spec(model, dog_images), photos)
        assert error.value.field == "base_model" and store.count_jobs_by_state()["QUEUED"] == 0
    finally:
        store.close()


@pytest.mark.parametrize("recorded_model", [False, True])
def test_deleting_a_job_takes_along_an_export_no_model_record_points_at(
    controller, tiny_model, dog_images, recorded_model
):
    """A job cancelled or failed while it exported leaves a model directory (GiBs) that no model record names, which
    no call could remove. A recorded model outlives its job."""
    storage, store = controller.service.config.storage, controller.service.store
    with DreamBoothClient(f"127.0.0.1:{controller.port}", QUEUED_ONLY_TOKEN, timeout_s=10) as bob:
        job = bob.submit(job_spec(tiny_model, dog_images))
        bob.cancel(job.job_id)
        paths = job_paths(storage, job.job_id)
        for leftover in (paths.model_dir, paths.model_dir.with_name(f".{job.job_id}.{uuid.uuid4().hex}.partial")):
            leftover.mkdir(parents=True)
            (leftover / "unet.safetensors").write_bytes(b"weights")
        other_jobs = storage / "models" / f"{job.job_id}.x"  # another job's model, whose name starts alike
        other_jobs.mkdir()
        if recorded_model:
            store.update_job(job.job_id, model_id="model-x")
        bob.delete(job.job_id)
    kept = sorted(p.name for p in (storage / "models").iterdir())
    assert kept == sorted([other_jobs.name] + ([job.job_id] if recorded_model else []))
    assert not paths.job_dir.exists()


def test_photos_of_concurrent_submissions_are_decoded_a_few_at_a_time(config, tiny_model, dog_images, monkeypatch):
    """Decoding a photo at the pixel limit takes up to ~0.6 GiB: every RPC thread doing it at once would take the
    controller's memory. Submissions beyond IMAGE_CHECKS_AT_ONCE wait for their turn (and are all accepted), one
    tenant's in one slot at most (its photos, slow to decode, held them all for minutes)."""
    from concurrent.futures import ThreadPoolExecutor

    from controller import service

    decoding, most, most_of_one_tenant = 0, 0, 0
    lock = threading.Lock()

    def counted(*args, **kwargs):
        nonlocal decoding, most, most_of_one_tenant
        with lock:
            decoding += 1
            most = max(most, decoding)
            most_of_one_tenant = max(most_of_one_tenant, *controller.service._image_checks._holders.values())
        try:
            threading.Event().wait(0.05)  # a photo's decode; long enough for the others to arrive meanwhile
            return check_instance_images(*args, **kwargs)
        finally:
            with lock:
                decoding -= 1

    check_instance_images = service.check_instance_images
    monkeypatch.setattr(service, "check_instance_images", counted)
    controller = start(dataclasses.replace(config, max_submits_per_tenant=6, max_calls_per_tenant=6))
    try:
        with (
            DreamBoothClient(f"127.0.0.1:{controller.port}", QUEUED_ONLY_TOKEN, timeout_s=30) as bob,
            DreamBoothClient(f"127.0.0.1:{controller.port}", TOKEN, timeout_s=30) as alice,
            ThreadPoolExecutor(12) as pool,
        ):
            spec = job_spec(tiny_model, dog_images, max_steps=100_000)
            jobs = list(pool.map(lambda i: (alice, bob)[i % 2].submit(spec), range(12)))  # 6 of each at once
    finally:
        controller.stop(grace_s=1)
    assert len({job.job_id for job in jobs}) == 12
    assert (most, most_of_one_tenant) == (IMAGE_CHECKS_AT_ONCE, 1)


def test_a_job_bigger_than_the_configured_cluster_is_refused_not_queued_for_ever(client, tiny_model, dog_images):
    # capacity_cpus 8, capacity_gpus 0: a CPU cluster that never grows.
    for fields, field, hint in (
        ({"gpus_per_worker": 1, "precision": "fp16"}, "gpus_per_worker", "gpus_per_worker: 0 trains on CPUs"),
        ({"num_workers": 3, "cpus_per_worker": 4}, "cpus_per_worker", "needs 12 CPUs"),
    ):
        with pytest.raises(ClientError) as refused:
            client.submit(job_spec(tiny_model, dog_images, **fields))
        assert refused.value.code == "INVALID_ARGUMENT" and refused.value.message.startswith(f"{field}: ")
        assert hint in refused.value.message
    assert client.submit(job_spec(tiny_model, dog_images, num_workers=2, cpus_per_worker=4)).job_id  # fits: 8


def test_a_job_whose_files_cannot_be_removed_is_kept_for_a_retry(controller, tiny_model, dog_images, tmp_path):
    """DeleteJob removes the files before the record: when they cannot go, the job stays (a retry can finish it)
    rather than its checkpoints staying behind a record that is gone."""
    with DreamBoothClient(f"127.0.0.1:{controller.port}", QUEUED_ONLY_TOKEN, timeout_s=10) as bob:
        job = bob.submit(job_spec(tiny_model, dog_images))
        bob.cancel(job.job_id)
        job_dir = controller.service.config.storage / "jobs" / job.job_id
        # Moved away by hand and linked back: rmtree refuses a symbolic link (as root, permissions stop nothing).
        moved = job_dir.rename(tmp_path / "moved")
        job_dir.symlink_to(moved)
        with pytest.raises(ClientError) as error:
            bob.delete(job.job_id)
        assert error.value.code == "INTERNAL" and "retry DeleteJob" in error.value.message
        assert bob.get(job.job_id).state == jobs_pb2.STATE_CANCELLED
        job_dir.unlink()  # the operator's fix
        bob.delete(job.job_id)
        with pytest.raises(ClientError) as error:
            bob.get(job.job_id)
        assert error.value.code == "NOT_FOUND"


def finished_model(controller, model_id: str, job_id: str) -> Path:
    """A model as a finished job leaves it (its directory, its record of alice's), without training one."""
    model_dir = job_paths(controller.service.config.storage, job_id).model_dir
    model_dir.mkdir(parents=True)
    (model_dir / "model_index.json").write_text("{}")
    controller.service.store.insert_model(ModelRecord(model_id, "alice", job_id, str(model_dir)))
    return model_dir


def test_a_model_is_deleted_with_its_files_once_undeployed(controller, tmp_path):
    """DeleteModel takes a model's directory (GiBs), then its record. Refused with nothing removed while it is
    deployed, and for another tenant; files that cannot be removed keep the record, and a retry finishes."""
    store = controller.service.store
    model_dir = finished_model(controller, "model-1", "job-1")
    other_model_dir = finished_model(controller, "model-2", "job-2")
    store.update_model("model-1", deployed=True, endpoint="http://serve/model-1")  # serving is not configured here
    target = f"127.0.0.1:{controller.port}"
    with DreamBoothClient(target, TOKEN, timeout_s=10) as alice, DreamBoothClient(target, QUEUED_ONLY_TOKEN) as bob:
        with pytest.raises(ClientError) as error:
            alice.delete_model("model-1")
        assert error.value.code == "FAILED_PRECONDITION" and "undeploy it first" in error.value.message
        assert alice.model("model-1").deployed and (model_dir / "model_index.json").exists()
        # Serving's section was removed since the deploy: undeploying only clears the mark.
        assert not alice.undeploy("model-1").deployed
        with pytest.raises(ClientError) as error:
            bob.delete_model("model-1")
        assert error.value.code == "NOT_FOUND" and (model_dir / "model_index.json").exists()

        # Moved away by hand and linked back: rmtree refuses a symbolic link (as root, permissions stop nothing).
        moved = model_dir.rename(tmp_path / "moved")
        model_dir.symlink_to(moved)
        with pytest.raises(ClientError) as error:
            alice.delete_model("model-1")
        assert error.value.code == "INTERNAL" and "retry DeleteModel" in error.value.message
        assert alice.model("model-1").job_id == "job-1"
        model_dir.unlink()  # the operator's fix
        set_aside = model_dir.parent / f".{model_dir.name}.{'0' * 32}.replaced"  # an export's leftover
        set_aside.mkdir()
        alice.delete_model("model-1")
        assert not model_dir.exists() and not set_aside.exists() and (other_model_dir / "model_index.json").exists()
        assert [model.model_id for model in alice.models()] == ["model-2"]
        with pytest.raises(ClientError) as error:
            alice.delete_model("model-1")
        assert error.value.code == "NOT_FOUND"


def test_a_deployed_models_endpoint_is_where_serving_is_configured_now(controller, monkeypatch):
    """A model deployed before the serving address moved (Serve's port taken at the deploy and free again after a
    restart, a public_url made https) is reached where it is served now: the endpoint stored at its deploy kept
    sending clients to the old address until a second Deploy."""
    finished_model(controller, "model-1", "job-1")
    finished_model(controller, "model-2", "job-2")
    old = "http://127.0.0.1:8123/v1/models/model-1/generate"
    controller.service.store.update_model("model-1", deployed=True, endpoint=old)
    with DreamBoothClient(f"127.0.0.1:{controller.port}", TOKEN, timeout_s=10) as alice:
        assert alice.model("model-1").endpoint == ""  # serving is not configured here: served nowhere
        # The controller restarted with serving at its new address.
        moved = ServeConfig(public_url="https://serve.example.com")
        monkeypatch.setattr(controller.service, "config", dataclasses.replace(controller.service.config, serving=moved))
        now = "https://serve.example.com/v1/models/model-1/generate"
        assert alice.model("model-1").endpoint == now
        assert {m.model_id: m.endpoint for m in alice.models()} == {"model-1": now, "model-2": ""}
        assert alice.undeploy("model-1").endpoint == ""


def test_a_deploy_during_a_model_deletion_waits_for_it_and_finds_no_model(controller, monkeypatch):
    """Had DeployModel marked the model deployed while DeleteModel removed its files, serving would be told to
    serve files that are gone. It waits for the deletion instead, and then there is no model to deploy."""
    model_dir = finished_model(controller, "model-1", "job-1")
    removing, removal_may_go_on = threading.Event(), threading.Event()
    remove_tree = service_module._remove_tree

    def slow_remove_tree(path: Path) -> None:
        removing.set()
        removal_may_go_on.wait(10)
        remove_tree(path)

    monkeypatch.setattr(service_module, "_remove_tree", slow_remove_tree)
    service, outcome = controller.service, {}

    def deploy() -> None:
        try:
            service.deploy_model("alice", "model-1")
        except Exception as e:
            outcome["deploy"] = e

    deleting = threading.Thread(target=service.delete_model, args=("alice", "model-1"))
    deleting.start()
    assert removing.wait(10)
    deploying = threading.Thread(target=deploy)
    deploying.start()
    deploying.join(0.5)
    assert deploying.is_alive()  # without the wait: FAILED_PRECONDITION at once (serving is not configured here)
    removal_may_go_on.set()
    deleting.join(10)
    deploying.join(10)
    assert isinstance(outcome["deploy"], NotFound) and not model_dir.exists()
    assert service.store.get_model("model-1") is None


def test_a_model_deployed_behind_the_lock_during_its_deletion_is_not_reported_deleted(controller, monkeypatch):
    """A writer the service's lock cannot see (a second controller, in the moments before the first finds its hold on
    the database lost) deploys the model while its files go: the row stays, and the caller is told what to do."""
    finished_model(controller, "model-1", "job-1")
    store, remove_tree = controller.service.store, service_module._remove_tree

    def remove_while_deployed_elsewhere(path: Path) -> None:
        store.update_model("model-1", deployed=True, endpoint="http://serve/model-1")
        remove_tree(path)

    monkeypatch.setattr(service_module, "_remove_tree", remove_while_deployed_elsewhere)
    with pytest.raises(FailedPrecondition, match="undeploy it and retry DeleteModel"):
        controller.service.delete_model("alice", "model-1")
    assert store.get_model("model-1").deployed


def test_controller_settings_to_fix_are_named_not_tracebacks(tmp_path, capsys, monkeypatch):
    from controller import server as server_module
    from controller.server import main as controller_main

    unknown, broken, rolled_back = tmp_path / "unknown.yaml", tmp_path / "broken.yaml", tmp_path / "rolled-back.yaml"
    unknown.write_text(f"storage: {tmp_path}\nfoo: 1\nno: 2\n")  # YAML reads `no` as a boolean key
    broken.write_text("storage: [unclosed\n")
    rolled_back.write_text(f"storage: {tmp_path / 'upgraded'}\n")
    (tmp_path / "upgraded").mkdir()
    upgraded = Store(ControllerConfig.load(rolled_back).effective_database_url)
    set_schema_version(upgraded, SCHEMA_VERSION + 1)  # as a later controller leaves its database
    upgraded.close()
    no_storage = tmp_path / "no-storage.yaml"
    no_storage.write_text("listen: 127.0.0.1:0\n")
    for config_file in (tmp_path / "missing.yaml", unknown, broken, rolled_back, no_storage):
        assert controller_main(["--config", str(config_file)]) == 2
    err = capsys.readouterr().err
    assert "missing.yaml" in err and "['False', 'foo']" in err and "broken.yaml" in err
    assert "newer than this controller" in err
    assert "error: storage: " in err
    assert err.count("error: ") == 5 and "Traceback" not in err
    # A database that is down: a restart may find it up (exit 1), and the setting is named.
    unreachable = tmp_path / "unreachable.yaml"
    unreachable.write_text(
        f"storage: {tmp_path}\ndatabase_url: postgresql+psycopg://dreambooth@127.0.0.1:{free_port()}/x\n"
    )
    assert controller_main(["--config", str(unreachable)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: database_url: unavailable: ") and "Traceback" not in err
    # A SQLite file that cannot be opened (here: a folder by that name) is not: a setting to fix (exit 2).
    unusable = tmp_path / "unusable.yaml"
    (tmp_path / "taken").mkdir()
    unusable.write_text(f"storage: {tmp_path}\ndatabase_url: sqlite:///{tmp_path / 'taken'}\n")
    assert controller_main(["--config", str(unusable)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: database_url: unusable: ") and "Traceback" not in err
    # The storage's passing trouble at start (an NFS server restarting) is worth a restart: 1, not 2.
    with monkeypatch.context() as stale:

        def stale_storage(config):
            raise OSError(errno.ESTALE, "Stale file handle")

        stale.setattr(server_module, "start", stale_storage)
        assert controller_main(["--storage", str(tmp_path)]) == 1


def test_a_port_another_grpc_server_holds_is_refused_not_shared(config, tmp_path):
    """gRPC servers set SO_REUSEPORT by default: a second controller (another database, say) on the port of a
    running one would take some of its clients. It is refused instead, naming the setting."""
    from concurrent import futures

    other = grpc.server(futures.ThreadPoolExecutor(1))
    port = other.add_insecure_port("127.0.0.1:0")
    other.start()
    try:
        config.listen, config.storage = f"127.0.0.1:{port}", tmp_path / "another"
        with pytest.raises(OSError, match=rf"listen: cannot listen on 127\.0\.0\.1:{port} \(in use"):
            start(config)
    finally:
        other.stop(None)


def test_a_controller_that_lost_its_hold_on_the_database_stops_reconciling(config, monkeypatch):
    from controller import reconciler as reconciler_module
    from controller.reconciler import Reconciler

    monkeypatch.setattr(reconciler_module, "HOLD_CHECK_S", 0.1)
    Path(config.storage).mkdir(parents=True)
    store = Store(config.effective_database_url)
    service = JobService(
        config, store, RayJobs(config.ray_dashboard_url, storage_root=str(config.storage)), ChangeFeed()
    )
    holds = iter([True, False])
    reconciler = Reconciler(config, store, service.ray_jobs, service.feed, service, lambda: next(holds))
    reconciler.start()
    try:
        assert reconciler.database_lost.wait(timeout=10)
        reconciler._thread.join(timeout=10)
        assert not reconciler._thread.is_alive()  # no more passes: another controller may reconcile now
    finally:
        reconciler.stop()
        store.close()


def test_a_second_controller_on_the_same_database_is_refused(config):
    """Two would start jobs past the tenants' limits and the capacity, and resubmit each other's attempts."""
    first = start(config)
    try:
        set_schema_version(first.reconciler.store, None)
        with pytest.raises(ControllerRunning, match="another controller"):
            start(config)
        # Refused before it touched the database: a newer one would have upgraded the tables the first writes to.
        assert schema_version(first.reconciler.store) is None
    finally:
        first.stop()
    start(config).stop()  # free once the first stopped


def test_a_controller_stopped_mid_pass_keeps_the_database_until_the_pass_ends(config, monkeypatch):
    """A pass stuck in a slow Ray call past the stop's wait may still start or resubmit a job: a controller started
    next (a rolling update's) must not reconcile beside it."""
    from controller import reconciler as reconciler_module

    monkeypatch.setattr(reconciler_module, "STOP_WAIT_S", 0.5)
    first = start(config)
    in_pass, pass_may_end = threading.Event(), threading.Event()

    def slow_pass() -> None:
        in_pass.set()
        pass_may_end.wait(30)

    first.reconciler.reconcile_once = slow_pass
    assert in_pass.wait(30)
    first.stop(grace_s=0)
    with pytest.raises(ControllerRunning):
        start(config)
    pass_may_end.set()
    first.reconciler._thread.join(30)
    first.database_hold.close()  # what this process's exit does
    start(config).stop()


def test_one_tenant_cannot_hold_every_watch(config, tiny_model, dog_images):
    controller = start(dataclasses.replace(config, max_watches=3, max_watches_per_tenant=2))
    try:
        address = f"127.0.0.1:{controller.port}"
        with (
            DreamBoothClient(address, QUEUED_ONLY_TOKEN, timeout_s=10) as bob,
            DreamBoothClient(address, TOKEN, timeout_s=10) as alice,
        ):
            queued = bob.submit(job_spec(tiny_model, dog_images))  # bob's jobs stay QUEUED
            watches = [bob.watch(queued.job_id) for _ in range(2)]
            assert [next(w).job.state for w in watches] == [jobs_pb2.STATE_QUEUED] * 2
            with pytest.raises(ClientError) as third:
                next(bob.watch(queued.job_id))
            assert third.value.code == "RESOURCE_EXHAUSTED" and "max_watches_per_tenant" in third.value.message
            assert (third.value.reason, third.value.retry_after_s) == ("TENANT_WATCHES_LIMIT", None)  # close one
            mine = alice.submit(job_spec(tiny_model, dog_images))
            assert next(alice.watch(mine.job_id)).job.job_id == mine.job_id  # the last slot is still someone's
            bob.cancel(queued.job_id)
            for watch in watches:
                assert list(watch)[-1].job.state == jobs_pb2.STATE_CANCELLED
            again = bob.submit(job_spec(tiny_model, dog_images))
            assert next(bob.watch(again.job_id)).job.state == jobs_pb2.STATE_QUEUED  # bob's slots are free again
    finally:
        controller.stop()


def test_without_tenants_the_one_user_may_hold_every_watch(config, tiny_model, dog_images):
    """max_watches_per_tenant shares the watches among tenants: `dreambooth up`'s one user refused a watch at 64."""
    controller = start(dataclasses.replace(config, tenants=(), max_watches=3, max_watches_per_tenant=1))
    try:
        with DreamBoothClient(f"127.0.0.1:{controller.port}", timeout_s=10) as client:
            job = client.submit(job_spec(tiny_model, dog_images))
            watches = [client.watch(job.job_id) for _ in range(3)]
            assert [next(w).job.job_id for w in watches] == [job.job_id] * 3
            with pytest.raises(ClientError) as fourth:
                next(client.watch(job.job_id))
            assert fourth.value.reason == "SERVER_WATCHES_LIMIT"
            client.cancel(job.job_id)
            for watch in watches:
                assert list(watch)[-1].job.state == jobs_pb2.STATE_CANCELLED
    finally:
        controller.stop()


def check_bounded_watches(controller, client: DreamBoothClient, job: jobs_pb2.Job) -> None:
    watches = [client.watch(job.job_id) for _ in range(2)]  # max_watches
    assert [next(w).job.state for w in watches] == [jobs_pb2.STATE_QUEUED] * 2
    with pytest.raises(ClientError) as third:
        next(client.watch(job.job_id))
    assert third.value.code == "RESOURCE_EXHAUSTED" and "max_watches" in third.value.message
    assert (third.value.reason, third.value.retry_after_s) == ("SERVER_WATCHES_LIMIT", 5.0)  # the details say so

    assert client.get(job.job_id).state == jobs_pb2.STATE_QUEUED
    with grpc.insecure_channel(f"127.0.0.1:{controller.port}") as channel:
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert health.status == health_pb2.HealthCheckResponse.SERVING

    client.cancel(job.job_id)
    for watch in watches:
        assert list(watch)[-1].job.state == jobs_pb2.STATE_CANCELLED
    assert next(client.watch(job.job_id)).job.state == jobs_pb2.STATE_CANCELLED  # their slots are free again


def _frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return len(payload).to_bytes(3, "big") + bytes([kind, flags]) + stream.to_bytes(4, "big") + payload


def _stuck_health_checks(port: int, streams: int) -> socket.socket:
    """One HTTP/2 connection (raw frames, no token) of `streams` Health/Check calls, each a gRPC message announcing
    1 MiB of which 16 bytes come, and never the rest. Its SETTINGS and PINGs are answered: it stays open."""
    fields = [(":method", "POST"), (":scheme", "http"), (":path", "/grpc.health.v1.Health/Check")]
    fields += [(":authority", "controller"), ("content-type", "application/grpc"), ("te", "trailers")]
    headers = b"".join(b"\x00" + bytes([len(k)]) + k.encode() + bytes([len(v)]) + v.encode() for k, v in fields)
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + _frame(4, 0, 0))

    def answer() -> None:
        buffer = b""
        while data := _recv(sock):
            buffer += data
            while len(buffer) >= 9 and len(buffer) >= 9 + (length := int.from_bytes(buffer[:3], "big")):
                kind, flags, payload, buffer = buffer[3], buffer[4], buffer[9 : 9 + length], buffer[9 + length :]
                if kind in (4, 6) and not flags & 1:  # SETTINGS, PING: acknowledged
                    sock.sendall(_frame(kind, 1, 0, payload if kind == 6 else b""))

    threading.Thread(target=answer, daemon=True).start()
    message_start = b"\x00" + (1 << 20).to_bytes(4, "big") + b"\x0a" * 16
    for index in range(streams):
        sock.sendall(_frame(1, 4, 2 * index + 1, headers) + _frame(0, 0, 2 * index + 1, message_start))
    return sock


def _recv(sock: socket.socket) -> bytes:
    try:
        return sock.recv(65536)
    except OSError:
        return b""


def test_probes_have_a_health_port_of_their_own(config):
    """health_listen: the kubelet's Check in plaintext beside a TLS port, on threads of its own that the tenants' port's
    callers (without a token, with open health calls) cannot hold; no Watch there to hold them either."""
    controller = start(dataclasses.replace(config, health_listen="127.0.0.1:0"))
    held = [_stuck_health_checks(controller.port, 40) for _ in range(2)]  # the tenants' port's health slots, held
    try:
        with grpc.insecure_channel(f"127.0.0.1:{controller.health_port}") as channel:
            probe = health_pb2_grpc.HealthStub(channel)
            assert (
                probe.Check(health_pb2.HealthCheckRequest(), timeout=5).status == health_pb2.HealthCheckResponse.SERVING
            )
            with pytest.raises(grpc.RpcError) as watch:
                next(probe.Watch(health_pb2.HealthCheckRequest(), timeout=5))
            assert watch.value.code() == grpc.StatusCode.UNIMPLEMENTED
            controller.stop(grace_s=1)
            with pytest.raises(grpc.RpcError):  # gone with the controller
                probe.Check(health_pb2.HealthCheckRequest(), timeout=2)
    finally:
        for sock in held:
            with contextlib.suppress(OSError):  # the controller may have closed it already
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        controller.stop(grace_s=1)


def test_health_calls_that_never_finish_their_request_hold_no_tenants_thread(config):
    """Health takes no token (probes have none): calls whose request never finished arriving held every RPC thread,
    every tenant's calls waiting behind them. At most a few are in progress at once; the rest are refused unread."""
    controller = start(config)
    pool = config.max_watches + UNARY_THREADS
    stuck = [_stuck_health_checks(controller.port, 40) for _ in range(pool // 40 + 1)]
    try:
        with DreamBoothClient(f"127.0.0.1:{controller.port}", TOKEN, timeout_s=5) as alice:
            assert list(alice.list()) == []
            with grpc.insecure_channel(f"127.0.0.1:{controller.port}") as channel:
                deadline = time.monotonic() + 30
                with pytest.raises(grpc.RpcError) as refused:
                    while time.monotonic() < deadline:  # until the server has taken in the stuck calls (a loaded
                        # machine reads their frames after this call's)
                        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
                        time.sleep(0.2)
                assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                for sock in stuck:
                    sock.shutdown(socket.SHUT_RDWR)  # a FIN now: close alone waits for the reader thread's recv
                deadline = time.monotonic() + 30
                while True:  # the server notices the connections gone, and their calls end
                    try:
                        check = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
                        break
                    except grpc.RpcError as e:
                        assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and time.monotonic() < deadline
                        time.sleep(0.2)
                assert check.status == health_pb2.HealthCheckResponse.SERVING
                # A watch of a service the controller does not have: NOT_FOUND, kept nowhere (gRPC's own servicer
                # kept every name ever watched, each up to max_request_bytes, for good).
                with pytest.raises(grpc.RpcError) as unknown:
                    next(health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service="x" * 1000)))
                assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
                assert "x" * 1000 not in controller.health._send_response_callbacks
    finally:
        for sock in stuck:
            sock.close()
        controller.stop(grace_s=1)


def test_a_page_of_the_largest_jobs_fits_a_response(controller, client, tiny_model, dog_images):
    """A tenant's history of jobs with the longest specs allowed (~72 KB each), listed at the largest page size
    asked: 1000 of them were over gRPC's 16 MiB response, RESOURCE_EXHAUSTED after the work, on every call."""
    prompts = ["a photo of sks dog " + "x" * 1980] * 32
    spec = JobSpec.from_dict(job_spec(tiny_model, dog_images, validation_prompts=prompts)).to_dict()
    for _ in range(MAX_PAGE_SIZE + 20):
        controller.service.store.insert_job(JobRecord("alice", spec, state="CANCELLED"))
    request = jobs_pb2.ListJobsRequest(page_size=1000)
    options = [("grpc.max_receive_message_length", 16 * 1024 * 1024)]  # the server's most; gRPC's default is 4 MiB
    with grpc.insecure_channel(f"127.0.0.1:{controller.port}", options=options) as channel:
        first = jobs_pb2_grpc.JobServiceStub(channel).ListJobs(request, metadata=[("authorization", f"Bearer {TOKEN}")])
    assert len(first.jobs) == MAX_PAGE_SIZE and first.next_page_token and first.ByteSize() > 6 * 1024 * 1024
    assert len(list(client.list(page_size=1000))) == MAX_PAGE_SIZE + 20


def test_list_by_an_unspecified_state_or_by_more_states_than_there_are_is_invalid(client):
    for states in ([jobs_pb2.STATE_UNSPECIFIED], [jobs_pb2.STATE_QUEUED] * 9):
        with pytest.raises(ClientError) as error:
            list(client.list(states=states))
        assert error.value.code == "INVALID_ARGUMENT" and "states" in error.value.message


@pytest.mark.parametrize("setting", ["max_job_run_s", "placement_timeout_s"])
@pytest.mark.parametrize("limit", ["0", "-5", "true", "'1800'"])  # YAML's true would be 1 s
def test_a_run_time_limit_that_is_not_positive_is_refused(tmp_path, limit, setting):
    path = tmp_path / "controller.yaml"
    path.write_text(f"storage: storage\n{setting}: {limit}\n")
    with pytest.raises(InputError) as error:
        ControllerConfig.load(path)
    assert error.value.field == setting
    path.write_text("storage: storage\nmax_job_run_s: null\n")
    assert ControllerConfig.load(path).max_job_run_s is None


@pytest.mark.parametrize(
    ("tenants", "field"),
    [
        ("alice: {tokens: alice-secret-token}", "tenants.alice.tokens"),  # a string, not a list
        ("alice: {tokens: [short]}", "tenants.alice.tokens"),
        ("alice: {max_running_jobs: 1}", "tenants.alice.tokens"),
        ("alice: {tokens: [alice-secret-token], max_jobs: 1}", "tenants.alice.max_jobs"),
        ("alice: {tokens: [shared-secret-token]}\n  bob: {tokens: [shared-secret-token]}", "tenants.bob.tokens"),
        (f"{'x' * 129}: {{tokens: [long-name-token]}}", f"tenants.{'x' * 40}"),
        # A quoted number stopped every pass's scheduling, every tenant's (a str compared with a count).
        ("alice: {tokens: [alice-secret-token], max_running_jobs: '2'}", "tenants.alice.max_running_jobs"),
        ("alice: {tokens: [alice-secret-token], max_queued_jobs: null}", "tenants.alice.max_queued_jobs"),
        ("alice: {tokens: [alice-secret-token], max_running_jobs: -1}", "tenants.alice.max_running_jobs"),
    ],
)
def test_careless_tenant_config_is_refused(tmp_path, tenants, field):
    path = tmp_path / "controller.yaml"
    path.write_text(f"storage: storage\ntenants:\n  {tenants}\n")
    with pytest.raises(InputError) as error:
        ControllerConfig.load(path)
    assert error.value.field == field


def test_a_config_that_is_not_yaml_is_refused_without_quoting_its_tokens(tmp_path):
    """PyYAML's message quotes the lines around the error: in the file of tenants, their tokens, into the logs."""
    secret = tmp_path / "controller-secret.yaml"
    secret.write_text("tenants:\n  alice: {tokens: [s3cr3t-t0ken-value-012]\n  bob: {tokens: [bob-secret-token-98]}\n")
    (tmp_path / "controller.yaml").write_text("storage: storage\n")
    with pytest.raises(InputError) as error:
        ControllerConfig.load([tmp_path / "controller.yaml", secret])
    assert error.value.field == "config" and error.value.message.startswith(f"{secret} is not YAML: line 3, column")
    assert "s3cr3t" not in error.value.message and "bob-secret" not in error.value.message
    assert error.value.__cause__ is None and error.value.__suppress_context__


def test_config_files_given_in_turn_replace_each_others_top_level_keys(tmp_path):
    """A Kubernetes pod's: the ConfigMap's settings, then the Secret's tenants and database (each file's relative
    paths from its own folder)."""
    (tmp_path / "map").mkdir()
    (tmp_path / "secret").mkdir()
    (tmp_path / "map" / "c.yaml").write_text("storage: storage\ntenants: {old: {tokens: [old-secret-token]}}\n")
    (tmp_path / "secret" / "s.yaml").write_text("tenants: {alice: {tokens: [alice-secret-token]}}\ntls_cert: c.pem\n")
    (tmp_path / "secret" / "k.yaml").write_text("tls_key: k.pem\n")
    config = ControllerConfig.load(
        [tmp_path / "map" / "c.yaml", tmp_path / "secret" / "s.yaml", tmp_path / "secret" / "k.yaml"]
    )
    assert [t.name for t in config.tenants] == ["alice"]
    assert (config.storage, config.tls_cert) == (tmp_path / "map" / "storage", tmp_path / "secret" / "c.pem")


def test_a_configs_paths_are_read_as_a_shell_reads_them(tmp_path, monkeypatch):
    """`storage: ~/dreambooth-data` was a folder named `~` beside the config; a storage named with `%20` or `?` put its
    SQLite database elsewhere (SQLAlchemy decodes the URL it was formatted into), one shared by `a?x` and `a?y`."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    path = tmp_path / "controller.yaml"
    path.write_text("storage: ~/data\nreadable_paths: [~/models]\ntenants: {alice: {tokens: [alice-secret-token]}}\n")
    config = ControllerConfig.load(path)
    assert (config.storage, config.readable_paths) == (tmp_path / "home" / "data", (tmp_path / "home" / "models",))
    from controller.server import parse_arguments

    assert parse_arguments(["--storage=~/data"]).storage == tmp_path / "home" / "data"  # the shell leaves it so
    path.write_text("storage: ~nosuchuser-x/data\n")
    with pytest.raises(InputError, match="no home folder of that user") as error:  # not pathlib's RuntimeError
        ControllerConfig.load(path)
    assert error.value.field == "storage"
    storage = tmp_path / "pct%20 q?mark"
    store = Store(ControllerConfig(storage=storage).effective_database_url)
    try:
        assert (storage / "controller.db").exists()
    finally:
        store.close()


@pytest.mark.parametrize("given", ["tls_cert", "tls_key"])
def test_half_of_tls_is_refused_not_served_in_plaintext(tmp_path, given):
    path = tmp_path / "controller.yaml"
    path.write_text(f"storage: storage\n{given}: server.pem\n")
    with pytest.raises(InputError, match="TLS needs both tls_cert and tls_key") as error:
        ControllerConfig.load(path)
    assert error.value.field == ({"tls_cert", "tls_key"} - {given}).pop()


@pytest.mark.parametrize("readable", [".", "storage", "storage/jobs"])
def test_readable_paths_that_reach_into_storage_are_refused(tmp_path, readable):
    # Tenants' uploads and exported models live in storage: a spec could name another tenant's.
    path = tmp_path / "controller.yaml"
    tenants = "tenants: {alice: {tokens: [alice-secret-token]}}"
    path.write_text(f"storage: storage\nreadable_paths: [base-models, {readable}]\n{tenants}\n")
    with pytest.raises(InputError) as error:
        ControllerConfig.load(path)
    assert error.value.field == "readable_paths" and "storage" in error.value.message
    path.write_text(f"storage: storage\nreadable_paths: [base-models, storage-like]\n{tenants}\n")
    assert ControllerConfig.load(path).readable_paths[1] == tmp_path / "storage-like"


class _FeedPublishingBehindTheWatch(ChangeFeed):
    """Publishes `change` right after a follow returned one of the job's changes, as a reconciler thread can
    between a watch's two reads."""

    def __init__(self, change: callable):
        super().__init__()
        self.change = change

    def follow(self, job_id: str, after: int, timeout_s: float):
        followed = super().follow(job_id, after, timeout_s)
        if followed[1] and self.change is not None:
            change, self.change = self.change, None
            change()
        return followed


def _watched_job(tmp_path: Path, make_feed) -> tuple[JobService, JobRecord]:
    """A real store holding one QUEUED job of alice's, and a JobService over the feed `make_feed(cancel)` makes;
    `cancel()` cancels the job as the service does (the transition, then its change published)."""
    store = Store(f"sqlite:///{tmp_path / 'db.sqlite'}")
    job = store.insert_job(JobRecord("alice", {}))

    def cancel() -> None:
        store.transition(job.job_id, {"QUEUED"}, "CANCELLED")
        feed.publish(job.job_id, "state", {"state": "CANCELLED"})

    feed = make_feed(cancel)
    config = ControllerConfig(storage=tmp_path, tenants=(Tenant("alice", (TOKEN,)),))
    return JobService(config, store, RayJobs(config.ray_dashboard_url, storage_root=str(tmp_path)), feed), job


def test_the_reconciler_wakes_for_the_changes_callers_ask_for_not_for_its_own(tmp_path: Path):
    """A pass publishes its jobs' progress and what queued jobs wait for: waking the next pass for those, it ran at
    its most (MAX_PASSES_PER_S) whenever a job trained, asking Ray about every job each time. A submission or a
    cancel wakes it."""
    service, mine = _watched_job(tmp_path, lambda cancel: ChangeFeed())
    feed, seen = service.feed, service.feed.requests
    feed.publish(mine.job_id, "progress", {"step": 1})  # as a pass does
    service.set_queue(Queue(others=Waiting("WAITING_FOR_RESOURCES", "no CPU free")))
    assert not feed.wait_for_request(seen, timeout_s=0)
    service.cancel("alice", mine.job_id)
    assert feed.wait_for_request(seen, timeout_s=0) and feed.requests == seen + 1


def test_a_watch_tells_what_its_queued_job_waits_for_also_when_no_change_of_its_own_says_so(tmp_path: Path):
    """While the cluster is full the queue is not read: a job's reason comes from the whole queue's, or its tenant's,
    and no change of the job's is published. The watch finds it within a second (it showed nothing for hours)."""
    service, mine = _watched_job(tmp_path, lambda cancel: ChangeFeed())
    watch = service.watch("alice", mine.job_id)
    job, _ = next(watch)
    assert service.waiting_for(job) is None  # before any pass
    full = Waiting("WAITING_FOR_RESOURCES", "no CPU free: training may use 8, the running jobs hold 8")
    service.set_queue(Queue(others=full))
    job, change = next(watch)
    assert change is None and service.waiting_for(job) == full
    limited = Waiting("TENANT_LIMIT", "its tenant runs 2 jobs, its max_running_jobs (2): it starts once one ends")
    service.set_queue(Queue(by_tenant={"alice": limited}, others=full))
    job, change = next(watch)
    assert service.waiting_for(job) == limited


def test_a_watch_sees_a_change_published_while_it_told_the_one_before(tmp_path: Path):
    service, mine = _watched_job(tmp_path, _FeedPublishingBehindTheWatch)
    watch = service.watch("alice", mine.job_id)
    assert next(watch)[0].state == "QUEUED"
    threading.Timer(0.05, service.feed.publish, ("job-other", "progress")).start()  # wakes no follower of mine
    threading.Timer(0.1, service.feed.publish, (mine.job_id, "progress", {"step": 1})).start()
    job, change = next(watch)
    assert change.kind == "progress" and job.state == "QUEUED"  # as of that change: the cancel came after it
    job, change = next(watch)
    # Delivered as the change it was (not found later by re-reading the job), so nothing between was skipped.
    assert job.state == "CANCELLED" and change is not None and change.kind == "state"
    assert list(watch) == []


def test_a_watch_whose_job_is_deleted_right_after_it_ended_still_ends_with_its_end(tmp_path: Path):
    """A script's CancelJob then DeleteJob, while another client watches: the watch reads the job after the change
    that ended it, and the job is gone by then. It ends as the job did (OK), not NOT_FOUND; a job gone without an end
    among its changes is NOT_FOUND."""
    service, mine = _watched_job(tmp_path, lambda cancel: ChangeFeed())
    watch = service.watch("alice", mine.job_id)
    assert next(watch)[0].state == "QUEUED"
    service.cancel("alice", mine.job_id)
    service.delete("alice", mine.job_id)
    job, change = next(watch)
    assert (job.job_id, job.state, change.kind) == (mine.job_id, "CANCELLED", "state")
    assert list(watch) == []

    gone = service.store.insert_job(JobRecord("alice", {}))
    watch = service.watch("alice", gone.job_id)
    next(watch)
    service.feed.publish(gone.job_id, "progress", {"step": 1})
    service.store.delete_job(gone.job_id)
    with pytest.raises(NotFound):
        next(watch)


def test_a_watch_tells_each_change_as_it_was_when_one_pass_published_several(tmp_path: Path):
    """A reconcile pass applies all the events the trainer wrote since the last (a fast job, a controller catching
    up after a restart), and then publishes them: each message says the job's state and progress as of its change,
    not the record's end state (which made the SDK stop at the first message and see no TRAINING)."""
    service, mine = _watched_job(tmp_path, lambda cancel: ChangeFeed())
    watch = service.watch("alice", mine.job_id)
    assert next(watch)[0].state == "QUEUED"
    store = service.store
    store.transition(mine.job_id, {"QUEUED"}, "SUCCEEDED")
    store.update_job(mine.job_id, progress={"step": 10, "total_steps": 10})
    for kind, data in [
        ("state", {"state": "PREPARING"}),
        ("state", {"state": "TRAINING"}),
        ("progress", {"step": 1, "total_steps": 10}),
        ("progress", {"step": 10, "total_steps": 10}),
        ("checkpoint", {"step": 10}),
        ("state", {"state": "EXPORTING"}),
        ("state", {"state": "SUCCEEDED"}),
        ("queued", None),  # published after the end in the same batch (a pass's queue): not told, the stream is over
    ]:
        service.feed.publish(mine.job_id, kind, data)
    told = [(job.state, job.progress.get("step"), change.kind) for job, change in watch]
    assert told == [
        ("PREPARING", None, "state"),
        ("TRAINING", None, "state"),
        ("TRAINING", 1, "progress"),
        ("TRAINING", 10, "progress"),
        ("TRAINING", 10, "checkpoint"),
        ("EXPORTING", 10, "state"),
        ("SUCCEEDED", 10, "state"),
    ]


class _StoreReadMidPass(Store):
    """A reconcile pass whose last write waits until a watch has read the job: the watch reads the record the pass
    wrote while none of the pass's changes is published yet."""

    def __init__(self, url: str):
        super().__init__(url)
        self.read_mid_pass = threading.Event()
        self.passing = False

    def update_job(self, job_id: str, **fields):
        job = super().update_job(job_id, **fields)
        if "events_offset" in fields:  # the pass's last write; what it applied is published after it
            self.passing = True
            assert self.read_mid_pass.wait(10), "no watch read the job"
            self.passing = False
        return job

    def get_job(self, *args, **kwargs):
        job = super().get_job(*args, **kwargs)
        if self.passing:
            self.read_mid_pass.set()
        return job


def test_a_watch_that_reads_its_job_mid_pass_tells_each_state_once_and_in_order(config):
    """A watch reads its job after each quiet second; a pass that applied several events had written them and not yet
    published them: the watch told the state the record was in, then the pass's changes, older states included
    (EXPORTING, then TRAINING, then EXPORTING again), and a client following `state` went backwards."""
    store = _StoreReadMidPass(config.effective_database_url)
    reconciler, job = _reconciling_one_job(config, store, "PREPARING")
    service = reconciler.service
    log = EventLog(job_paths(config.storage, job.job_id).events_file)
    for state in ("TRAINING", "EXPORTING"):
        log.emit("state", state=state)
    watch = service.watch("alice", job.job_id)
    assert next(watch)[0].state == "PREPARING"
    passing = threading.Thread(target=reconciler._apply_events, args=(job,))
    passing.start()
    assert [(job.state, change and change.kind) for job, change in itertools.islice(watch, 2)] == [
        ("TRAINING", "state"),
        ("EXPORTING", "state"),
    ]
    passing.join()
    assert store.read_mid_pass.is_set()  # the watch did read the job mid-pass
    store.close()


@pytest.mark.parametrize(("cpus", "gpus"), [(None, 4), (5, None)])
def test_one_capacity_setting_replaces_only_its_own_total(by_hand, cpus, gpus):
    """The other total comes from the cluster, not 0 (with only capacity_gpus set, no job could ever start)."""
    cluster = by_hand.ray_jobs.cluster_capacity()
    by_hand.config = dataclasses.replace(by_hand.config, capacity_cpus=cpus, capacity_gpus=gpus)
    expected = (cluster.cpus if cpus is None else cpus, cluster.gpus if gpus is None else gpus)
    assert cluster.cpus > 0
    assert (by_hand.capacity().cpus, by_hand.capacity().gpus) == expected


def test_training_capacity_leaves_serving_what_its_replicas_may_grow_to(by_hand):
    serving = ServeConfig(min_replicas=1, max_replicas=4, gpus_per_replica=1, cpus_per_replica=2)
    by_hand.config = dataclasses.replace(by_hand.config, capacity_cpus=64, capacity_gpus=8, serving=serving)
    assert by_hand.capacity() == Resources(cpus=56, gpus=4)
    by_hand.config = dataclasses.replace(by_hand.config, capacity_cpus=4, capacity_gpus=2)
    assert by_hand.capacity() == Resources(cpus=0, gpus=0)  # all serving's: no job starts, none goes below 0


class _BusyFeed(ChangeFeed):
    """A busy controller: between any two waits, other jobs publish more changes than the feed holds, so a
    follower never sees a quiet second; the first time, right after `first` (this job's cancel)."""

    def __init__(self, first: callable):
        super().__init__(capacity=3)
        self.first = first
        self.waits = 0

    def follow(self, job_id: str, after: int, timeout_s: float):
        self.waits += 1
        assert self.waits < 10, "the watch kept waiting: it never noticed that the feed dropped its job's change"
        if self.first is not None:
            first, self.first = self.first, None
            first()
        for _ in range(4):
            self.publish("job-other", "progress")
        return super().follow(job_id, after, timeout_s)


def test_a_watch_that_fell_behind_the_feed_still_sees_its_job_end(tmp_path: Path):
    service, mine = _watched_job(tmp_path, _BusyFeed)
    states = [job.state for job, _ in service.watch("alice", mine.job_id)]
    assert states == ["QUEUED", "CANCELLED"]


def test_without_tenants_the_one_user_has_every_photo_check_slot(tmp_path, tiny_model, dog_images, monkeypatch):
    """One slot per tenant is for many tenants: a controller without tenants (`dreambooth up`) checks its user's
    submissions IMAGE_CHECKS_AT_ONCE at a time."""
    from concurrent.futures import ThreadPoolExecutor

    from controller import service as service_module

    all_in = threading.Barrier(IMAGE_CHECKS_AT_ONCE, timeout=10)
    check = service_module.check_instance_images

    def in_step(*args, **kwargs):
        all_in.wait()  # every submission decoding at once, or the barrier breaks
        return check(*args, **kwargs)

    monkeypatch.setattr(service_module, "check_instance_images", in_step)
    config = ControllerConfig(storage=tmp_path)
    store = Store(config.effective_database_url)
    service = JobService(config, store, RayJobs(config.ray_dashboard_url, storage_root=str(tmp_path)), ChangeFeed())
    photos = [ImageInput(uri=str(dog_images))]
    with ThreadPoolExecutor(IMAGE_CHECKS_AT_ONCE) as pool:
        submitted = pool.map(lambda _: service.submit("default", job_spec(tiny_model, dog_images), photos), range(2))
        assert len({job.job_id for job in submitted}) == IMAGE_CHECKS_AT_ONCE
    store.close()


def test_a_bad_photo_is_named_as_the_caller_sent_it(config, tiny_model, dog_images, tmp_path):
    """Not as the job's copy of it: a path on the controller's storage, of a job never recorded, that the caller had
    to map back to its photos."""
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "z.jpg").write_bytes(b"not a jpeg at all")
    controller = start(dataclasses.replace(config, readable_paths=(*config.readable_paths, photos)))
    try:
        with DreamBoothClient(f"127.0.0.1:{controller.port}", TOKEN, timeout_s=10) as client:
            for upload, named in ((True, "z.jpg"), (False, str(photos / "z.jpg"))):
                with pytest.raises(ClientError) as error:
                    client.submit(job_spec(tiny_model, photos), upload=upload)
                assert error.value.message.endswith(f"\n{named}: not an image (Pillow cannot identify it)")
                assert str(config.storage) not in error.value.message
            # Two folders' photos of one name (base names are what uploads carry): told apart by their place.
            other = tmp_path / "other"
            other.mkdir()
            (other / "z.jpg").write_bytes(
                dog_images.joinpath(sorted(p.name for p in dog_images.iterdir())[0]).read_bytes()
            )
            with pytest.raises(ClientError) as error:
                client.submit(job_spec(tiny_model, other, instance_images=[str(other), str(photos)]))
            assert error.value.message.endswith("\nz.jpg (photo 2): not an image (Pillow cannot identify it)")
        # An upload without a name (a raw gRPC call: the SDK always sends one) is told by its place.
        request = jobs_pb2.SubmitJobRequest(
            spec=spec_to_proto(job_spec(tiny_model, photos)), instance_images=[jobs_pb2.InstanceImage(data=b"x")]
        )
        with grpc.insecure_channel(f"127.0.0.1:{controller.port}") as channel, pytest.raises(grpc.RpcError) as raw:
            jobs_pb2_grpc.JobServiceStub(channel).SubmitJob(request, metadata=[("authorization", f"Bearer {TOKEN}")])
        assert raw.value.details() == "instance_images: unnamed upload (photo 1): not an image"
    finally:
        controller.stop(grace_s=1)


def test_a_submission_whose_caller_stopped_waiting_records_nothing(controller, tiny_model, dog_images, monkeypatch):
    """Checking 64 MiB of photos can outlast the client's deadline: a job recorded after it would be queued twice
    when the client, told DEADLINE_EXCEEDED, submits again (under a new request id)."""
    service = controller.service
    before = service.store.list_jobs("alice", page_size=100)[0]
    with pytest.raises(DeadlineExceeded, match="nothing queued"):
        photos = [ImageInput(filename=f.name, data=f.read_bytes(), uri="") for f in sorted(dog_images.iterdir())]
        service.submit("alice", job_spec(tiny_model, dog_images), photos, waited_for=lambda: False)
    assert service.store.list_jobs("alice", page_size=100)[0] == before
    jobs_dir = service.config.storage / "jobs"
    assert not jobs_dir.exists() or not any(jobs_dir.iterdir())  # nothing staged left behind
    # Nor does it wait for ever for a slot to check its photos in, once its caller is gone (a burst of submissions).
    with contextlib.ExitStack() as held:
        for holder in range(IMAGE_CHECKS_AT_ONCE):
            held.enter_context(service._image_checks.slot(f"tenant-{holder}", lambda: None))
        with pytest.raises(DeadlineExceeded, match="photos were checked"):
            service.submit("alice", job_spec(tiny_model, dog_images), photos, waited_for=lambda: False)
    # Nor does it go on decoding photos (64 of them can take minutes) for a caller gone meanwhile.
    decoded = []
    monkeypatch.setattr(images_module, "_problem", lambda path, resolution: decoded.append(path))
    asked = iter([True, True])  # the slot's look, then the first photo's
    with pytest.raises(DeadlineExceeded, match="photos were checked"):
        service.submit("alice", job_spec(tiny_model, dog_images), photos, waited_for=lambda: next(asked, False))
    assert len(decoded) == 1 and len(photos) > 1


def test_a_database_outage_is_unavailable_not_internal():
    """What a client should retry: the database down, restarting or locked past its busy timeout."""
    from controller.grpc_errors import error_status

    code, status = error_status(sa.exc.OperationalError("SELECT 1", {}, Exception("server closed")), "GetJob")
    assert code == grpc.StatusCode.UNAVAILABLE and "retry" in status.details
    # Every pooled connection busy (QueuePool's timeout): INTERNAL ended SDK watches for good.
    code, _ = error_status(sa.exc.TimeoutError("QueuePool limit of size 5 overflow 10 reached"), "GetJob")
    assert code == grpc.StatusCode.UNAVAILABLE


def test_a_full_storage_is_resource_exhausted_and_not_retried(client, tiny_model, dog_images, monkeypatch):
    """A disk or quota full: RESOURCE_EXHAUSTED (STORAGE_FULL), not INTERNAL, and not UNAVAILABLE (the SDK resent up
    to 64 MiB of photos three more times, each staged and decoded again, into a disk still full)."""
    from controller.grpc_errors import error_status

    calls = []

    def no_space(*_) -> None:
        calls.append(1)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(intake_module, "write_file", no_space)
    with pytest.raises(ClientError) as full:
        client.submit(job_spec(tiny_model, dog_images))
    assert (full.value.code, full.value.reason) == ("RESOURCE_EXHAUSTED", "STORAGE_FULL"), full.value
    assert "storage is full" in full.value.message and len(calls) == 1
    # Reading the staged photos back fails for the storage's reasons (an NFS hiccup): not the photos' fault.
    monkeypatch.setattr(intake_module, "write_file", lambda *_: None)

    def stale(*_args, **_kwargs) -> None:
        raise OSError(errno.ESTALE, "Stale file handle")

    monkeypatch.setattr(service_module, "check_instance_images", stale)
    with pytest.raises(ClientError) as unwell:
        client.submit(job_spec(tiny_model, dog_images))
    assert unwell.value.code == "UNAVAILABLE" and "Stale file handle" in unwell.value.message
    # The database's disk: SQLite's SQLITE_FULL; a storage remounted read-only: worth a retry later.
    sqlite_full = sa.exc.OperationalError("INSERT", {}, sqlite3.OperationalError("database or disk is full"))
    assert error_status(sqlite_full, "SubmitJob")[0] == grpc.StatusCode.RESOURCE_EXHAUSTED
    code, status = error_status(OSError(errno.EROFS, "Read-only file system"), "SubmitJob")
    assert code == grpc.StatusCode.UNAVAILABLE and "Read-only file system" in status.details


class _RecordingServe:
    """A stand-in for Serve's REST API (serving/deployer.py): records the deployed sets it is given; while `down`, it
    cannot be reached."""

    def __init__(self):
        self.applied: list[dict] = []
        self.down = False
        self.application = "RUNNING"  # its status once deployed
        self.config = ServeConfig()

    def apply(self, models: dict, tenants: dict, tokens: dict) -> frozenset[str]:
        if self.down:
            raise ConnectionRefusedError("Serve's REST API cannot be reached")
        before = frozenset(self.applied[-1] if self.applied else ())
        self.applied.append(models)
        return before

    def status(self) -> str:
        return self.application

    def message(self) -> str:
        return "Generator: DEPLOY_FAILED: the replica's constructor raised InputError"


def test_a_deploy_whose_apply_could_not_read_the_database_is_applied_on_the_retry(tmp_path, monkeypatch):
    """The serving thread applies a recorded Deploy; its read of the store failing for a moment (a connection reset,
    SQLite busy) left the change unapplied for good, the model never served. A stand-in for Serve's REST API
    records what it is given (no Serve here: ServingSync's retry logic)."""
    from controller import serving as serving_module
    from controller.serving import ServingSync

    monkeypatch.setattr(serving_module, "RETRY_INTERVAL_S", 0.0)

    class StoreFailingOnce(Store):
        failures = 1

        def deployed_models(self):
            if self.failures:
                self.failures -= 1
                raise sa.exc.OperationalError("SELECT", {}, sqlite3.OperationalError("database is locked"))
            return super().deployed_models()

    store = StoreFailingOnce(f"sqlite:///{tmp_path / 'controller.db'}")
    store.insert_model(ModelRecord("model-1", "default", "job-1", "/models/1"))
    store.update_model("model-1", deployed=True, endpoint="http://serve/model-1")
    serve = _RecordingServe()
    sync = ServingSync(store, serve, {})
    sync.request_apply()
    sync.reconcile()  # the read fails
    assert serve.applied == []
    sync.reconcile()  # retried, not forgotten
    assert serve.applied == [{"model-1": "/models/1"}]
    store.close()


def test_an_undeployed_model_is_deleted_only_once_serving_has_stopped_serving_it(tmp_path, monkeypatch):
    """UndeployModel is recorded at once and reaches Serve with the serving thread's next apply: moments later, or once
    Serve's REST API answers again. A DeleteModel in between removed the model's files and record while Serve went on
    serving it (a person's likeness, to its tenant's token). Refused until then, with a retry hint."""
    from controller import serving as serving_module
    from controller.serving import ServingSync

    monkeypatch.setattr(serving_module, "RETRY_INTERVAL_S", 0.0)
    config = ControllerConfig(storage=tmp_path, serving=ServeConfig())
    store = Store(config.effective_database_url)
    serve = _RecordingServe()
    sync = ServingSync(store, serve, {})  # its thread's passes run by hand
    service = JobService(
        config, store, RayJobs(config.ray_dashboard_url, storage_root=str(tmp_path)), ChangeFeed(), sync
    )
    model_dirs = {}
    for model_id, job_id in (("model-1", "job-1"), ("model-2", "job-2")):
        model_dirs[model_id] = job_paths(tmp_path, job_id).model_dir
        model_dirs[model_id].mkdir(parents=True)
        store.insert_model(ModelRecord(model_id, "default", job_id, str(model_dirs[model_id])))
    try:
        service.deploy_model("default", "model-1")
        # Before this controller's first apply, Serve serves what an earlier one applied: any model, as far as it knows.
        with pytest.raises(FailedPrecondition, match="retry in a moment"):
            service.delete_model("default", "model-2")
        sync.reconcile()
        assert serve.applied == [{"model-1": str(model_dirs["model-1"])}]
        service.delete_model("default", "model-2")  # never served
        assert not model_dirs["model-2"].exists()

        serve.down = True
        assert not service.undeploy_model("default", "model-1").deployed
        sync.reconcile()  # the apply fails: Serve still serves the model
        with pytest.raises(FailedPrecondition, match="retry in a moment") as refused:
            service.delete_model("default", "model-1")
        assert refused.value.reason == "MODEL_DEPLOYED" and refused.value.retry_after_s > 0
        assert model_dirs["model-1"].exists() and store.get_model("model-1") is not None
        serve.down = False
        sync.reconcile()
        assert serve.applied[-1] == {}
        service.delete_model("default", "model-1")
        assert not model_dirs["model-1"].exists() and store.get_model("model-1") is None

        # Deployed, then undeployed while the apply that read it deployed is under way (Serve's REST API slow): that
        # apply gives it to Serve after, so a delete meanwhile would leave Serve a model with no files.
        model_dirs["model-3"] = job_paths(tmp_path, "job-3").model_dir
        model_dirs["model-3"].mkdir(parents=True)
        store.insert_model(ModelRecord("model-3", "default", "job-3", str(model_dirs["model-3"])))
        service.deploy_model("default", "model-3")
        refusals = []

        def undeploy_and_delete_meanwhile(models: dict, tenants: dict, tokens: dict) -> None:
            service.undeploy_model("default", "model-3")
            with pytest.raises(FailedPrecondition, match="retry in a moment") as refused:
                service.delete_model("default", "model-3")
            refusals.append(refused.value)
            serve.applied.append(models)

        monkeypatch.setattr(serve, "apply", undeploy_and_delete_meanwhile)
        sync.reconcile()
        assert len(refusals) == 1 and serve.applied[-1] == {"model-3": str(model_dirs["model-3"])}
        assert model_dirs["model-3"].exists()
    finally:
        store.close()


def test_an_undeploy_serve_failed_to_deploy_keeps_the_model_from_deletion_and_says_why(tmp_path, monkeypatch, caplog):
    """Serve's REST API takes a config and then fails to deploy it (DEPLOY_FAILED: code that cannot take it): its old
    replicas go on serving what they served. The controller took the accepted PUT as done: DeleteModel removed the
    files of a model still served, and nothing said that serving was stuck."""
    from controller import serving as serving_module
    from controller.serving import ServingSync

    monkeypatch.setattr(serving_module, "RETRY_INTERVAL_S", 0.0)
    config = ControllerConfig(storage=tmp_path, serving=ServeConfig())
    store = Store(config.effective_database_url)
    serve = _RecordingServe()
    sync = ServingSync(store, serve, {}, check_interval_s=0)
    service = JobService(
        config, store, RayJobs(config.ray_dashboard_url, storage_root=str(tmp_path)), ChangeFeed(), sync
    )
    model_dir = job_paths(tmp_path, "job-1").model_dir
    model_dir.mkdir(parents=True)
    store.insert_model(ModelRecord("model-1", "default", "job-1", str(model_dir)))
    try:
        service.deploy_model("default", "model-1")
        sync.reconcile()
        assert metrics.SERVING_UP_TO_DATE.labels(application="dreambooth")._value.get() == 1
        service.undeploy_model("default", "model-1")
        serve.application = "DEPLOY_FAILED"
        sync.reconcile()
        assert serve.applied[-1] == {}  # the PUT went through
        with pytest.raises(FailedPrecondition, match="retry in a moment"):
            service.delete_model("default", "model-1")
        assert model_dir.exists() and metrics.SERVING_UP_TO_DATE.labels(application="dreambooth")._value.get() == 0
        assert "the replica's constructor raised InputError" in caplog.text
        serve.application = "RUNNING"  # an operator mended it; Serve runs the set applied
        sync.reconcile()
        service.delete_model("default", "model-1")
        assert not model_dir.exists() and metrics.SERVING_UP_TO_DATE.labels(application="dreambooth")._value.get() == 1

        # A controller started while Serve fails to deploy: the models the application was given before may be
        # served, and no other (all of them were refused until Serve ran again, if ever).
        for model_id, job_id in (("model-2", "job-2"), ("model-3", "job-3")):
            job_paths(tmp_path, job_id).model_dir.mkdir(parents=True)
            store.insert_model(ModelRecord(model_id, "default", job_id, str(job_paths(tmp_path, job_id).model_dir)))
        service.deploy_model("default", "model-2")
        sync.reconcile()
        restarted = ServingSync(store, serve, {}, check_interval_s=0)
        service.serving = restarted
        service.undeploy_model("default", "model-2")
        serve.application = "DEPLOY_FAILED"
        restarted.reconcile()
        service.delete_model("default", "model-3")  # never deployed
        with pytest.raises(FailedPrecondition, match="retry in a moment"):
            service.delete_model("default", "model-2")  # its old replicas may serve it
        # Deploying long after the apply: waiting for replicas to start (a GPU node being added), its running replicas
        # took the models' change long ago.
        monkeypatch.setattr(serving_module, "RECONFIGURED_AFTER_S", 0.0)
        serve.application = "DEPLOYING"
        restarted.reconcile()
        service.delete_model("default", "model-2")
        assert metrics.SERVING_UP_TO_DATE.labels(application="dreambooth")._value.get() == 1
    finally:
        store.close()


def test_a_ray_dashboard_that_does_not_answer_holds_no_reconcile_pass_deploy_nor_cancel(tmp_path):
    """An apply waits on Serve's REST API (its controller busy or restarting: minutes); jobs must still be started,
    followed and cancelled meanwhile, and a Deploy answered (it was recorded: answered past the caller's deadline,
    it read as failed), so serving catches up on a thread of its own. A cancel's stop of the Ray job waits a few
    seconds at most: the reconciler stops a cancelling job's Ray job anyway."""
    from controller.reconciler import Reconciler
    from controller.serving import ServingSync
    from serving.deployer import ServeDeployer

    silent = socket.socket()  # accepts connections (the kernel's backlog) and never answers
    silent.bind(("127.0.0.1", 0))
    silent.listen()
    dashboard = f"http://127.0.0.1:{silent.getsockname()[1]}"
    config = ControllerConfig(
        storage=tmp_path, ray_dashboard_url=dashboard, capacity_cpus=8, capacity_gpus=0, serving=ServeConfig()
    )
    store = Store(config.effective_database_url)
    serving = ServingSync(store, ServeDeployer(dashboard, ServeConfig(), timeout_s=30), {})
    service = JobService(config, store, RayJobs(dashboard, storage_root=str(tmp_path)), ChangeFeed(), serving)
    reconciler = Reconciler(config, store, service.ray_jobs, service.feed, service)
    store.insert_model(ModelRecord("model-1", "default", "job-1", str(tmp_path / "model")))
    serving.start()  # its first apply waits on Serve
    try:
        passing = threading.Thread(target=reconciler.reconcile_once, daemon=True)
        passing.start()
        deploying = threading.Thread(target=service.deploy_model, args=("default", "model-1"), daemon=True)
        deploying.start()
        passing.join(10)
        deploying.join(10)
        assert not passing.is_alive() and not deploying.is_alive()
        assert store.get_model("model-1").deployed

        job = store.insert_job(JobRecord("default", {}))
        store.transition(job.job_id, {"QUEUED"}, "TRAINING", attempts=1, ray_submission_id=f"{job.job_id}-a1")
        cancelling = threading.Thread(target=service.cancel, args=("default", job.job_id), daemon=True)
        cancelling.start()
        cancelling.join(service_module.CANCEL_STOP_WAIT_S + 5)  # its stop waits 30 s for this dashboard
        assert not cancelling.is_alive() and store.get_job(job.job_id).state == "CANCELLING"
    finally:
        silent.close()  # the apply's request fails: the thread stops
        serving.stop()
        store.close()


def test_a_submission_cut_short_by_a_crash_leaves_no_folder_after_the_next_start(config, tiny_model, tmp_path):
    """A controller that died between staging a submission's photos and committing its row left them on storage for
    good: no job lists them and DeleteJob cannot name them. The next start removes them, and nothing else: not a
    job's folder, a `dreambooth train` run's, another database's submission's, nor that of a job a restored backup of
    the database lacks."""
    # Photos whose check takes seconds (62 megapixels each, decoded whole): the controller is killed in between.
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.new("RGB", (7900, 7900), (120, 80, 40)).save(photos / "0.png")
    for i in range(1, 8):
        shutil.copy(photos / "0.png", photos / f"{i}.png")
    jobs_dir = config.storage / "jobs"
    first, port = _controller_process(config, tmp_path / "controller.yaml")
    try:
        # Its photos' check takes seconds, longer on a loaded machine: time enough for it.
        with DreamBoothClient(f"127.0.0.1:{port}", QUEUED_ONLY_TOKEN, timeout_s=120) as bob:
            queued = bob.submit(job_spec(tiny_model, photos)).job_id
        with DreamBoothClient(f"127.0.0.1:{port}", QUEUED_ONLY_TOKEN, timeout_s=10) as bob:
            outcome = []

            def submit_again() -> None:
                try:
                    outcome.append(bob.submit(job_spec(tiny_model, photos)).job_id)
                except ClientError as e:
                    outcome.append(e.code)

            crashed = threading.Thread(target=submit_again)
            crashed.start()
            deadline = time.monotonic() + 60
            while not [p for p in jobs_dir.glob("*/instance_images/*.png") if p.parent.parent.name != queued]:
                assert time.monotonic() < deadline, "the second submission's photos were never staged"
                time.sleep(0.01)
            first.kill()  # SIGKILL: no clean-up of any kind, while its photos are checked
            first.wait()
            crashed.join()  # its retries refused (nothing listens): it does not reach the next controller
            assert outcome == ["UNAVAILABLE"]
    finally:
        first.kill()
    (orphan,) = (p for p in jobs_dir.iterdir() if p.name != queued)
    assert any((orphan / "instance_images").iterdir())
    by_the_cli = jobs_dir / "my-run"
    by_the_cli.mkdir()
    (by_the_cli / "spec.json").write_text("{}")
    by_another_database = jobs_dir / "job-0123456789ab"
    by_another_database.mkdir()
    (by_another_database / ".submitting-12345").touch()
    # Marked by this database but started (a crash right after its row committed left the mark; a restored backup
    # lacks the row): kept.
    started = jobs_dir / "job-0123456789ac"
    shutil.copytree(orphan, started)
    (started / "events.jsonl").touch()
    assert [p.name for p in (jobs_dir / queued).glob(".*")] == []  # a committed job's folder is like a backup's

    second = start(config)
    try:
        assert not orphan.exists()
        kept = [queued, "my-run", by_another_database.name, started.name]
        assert sorted(p.name for p in jobs_dir.iterdir()) == sorted(kept)
        assert any((jobs_dir / queued / "instance_images").iterdir())
        with DreamBoothClient(f"127.0.0.1:{second.port}", QUEUED_ONLY_TOKEN, timeout_s=10) as bob:
            assert [job.job_id for job in bob.list()] == [queued]
    finally:
        second.stop(grace_s=1)


def _controller_process(config: ControllerConfig, path: Path) -> tuple[subprocess.Popen, int]:
    """`config`'s controller as a process of its own (to be killed), and its port."""
    path.write_text(
        yaml.safe_dump(
            {
                "storage": str(config.storage),
                "listen": "127.0.0.1:0",
                "ray_dashboard_url": config.ray_dashboard_url,
                "metrics_listen": "",
                "capacity_cpus": config.capacity_cpus,
                "capacity_gpus": config.capacity_gpus,
                "readable_paths": [str(p) for p in config.readable_paths],
                "tenants": {
                    t.name: {"tokens": list(t.tokens), "max_running_jobs": t.max_running_jobs} for t in config.tenants
                },
            }
        )
    )
    return controller_process(path)


def test_photos_named_by_path_are_copied_when_submitted_and_checked_where_they_really_are(
    config, tiny_model, dog_images, tmp_path
):
    """A tenant who can write under readable_paths named its own photos, then, while the job queued, put a link
    there to another tenant's: the trainer read those. Or a sparse photo of gigabytes, read whole on the Ray head; or
    a base model whose unet/ held a link to another tenant's weights (only a folder's first level was checked)."""
    shared = tmp_path / "shared"  # readable, and its tenants can write there
    photos = shared / "photos"
    shutil.copytree(dog_images, photos)
    others = tmp_path / "others"  # not readable: another tenant's files, say
    others.mkdir()
    (others / "theirs.jpg").write_bytes(sorted(dog_images.iterdir())[0].read_bytes()[::-1])
    (others / "weights.safetensors").write_bytes(b"theirs")
    limit = 2**20  # max_named_image_bytes, small here: the sparse files below are read to it
    controller = start(
        dataclasses.replace(
            config,
            readable_paths=(*config.readable_paths, shared),
            max_named_image_bytes=limit,
            max_named_images_bytes=3 * limit,
        )
    )
    try:
        with DreamBoothClient(f"127.0.0.1:{controller.port}", QUEUED_ONLY_TOKEN, timeout_s=10) as bob:
            first = sorted(photos.iterdir())[0]  # named twice, itself and in its folder: copied once
            named = job_spec(tiny_model, photos, instance_images=[str(first), str(photos)])
            job = bob.submit(named, upload=False, request_id="named-photos")
            retried = bob.submit(named, upload=False, request_id="named-photos")
            assert retried.job_id == job.job_id  # the same photos: the same request
            submitted = sorted(p.read_bytes() for p in photos.iterdir())
            shutil.rmtree(photos)
            photos.symlink_to(others, target_is_directory=True)  # after the check
            stored = [Path(p) for p in controller.service.store.get_job(job.job_id).spec["instance_images"]]
            assert {p.parent for p in stored} == {job_paths(config.storage, job.job_id).uploads_dir}
            assert sorted(p.read_bytes() for p in stored) == submitted  # what it was submitted with

            photos.unlink()
            photos.mkdir()
            with open(photos / "huge.jpg", "wb") as huge:
                huge.truncate(limit + 1)  # sparse: no disk, and gigabytes would be as cheap
            with pytest.raises(ClientError, match=rf"huge\.jpg: over {limit} bytes") as error:
                bob.submit(job_spec(tiny_model, photos), upload=False)
            assert error.value.code == "INVALID_ARGUMENT"
            (photos / "huge.jpg").unlink()
            for name in "abcd":  # each under the limit, four over the request's (and no disk used for them)
                with open(photos / f"{name}.jpg", "wb") as big:
                    big.truncate(limit - 1)
            with pytest.raises(ClientError, match=r"d\.jpg: over .* max_named_images_bytes \(3145728\) in all"):
                bob.submit(job_spec(tiny_model, photos), upload=False)
            for name in "abcd":
                (photos / f"{name}.jpg").unlink()
            # Named by itself, without an image's suffix: the controller opened it to sniff its format, and waited
            # for a writer for ever (the SDK refuses it on its side: a raw gRPC call).
            os.mkfifo(photos / "trap")
            request = jobs_pb2.SubmitJobRequest(
                spec=spec_to_proto(job_spec(tiny_model, photos)),
                instance_images=[jobs_pb2.InstanceImage(uri=str(photos / "trap"))],
            )
            with grpc.insecure_channel(f"127.0.0.1:{controller.port}") as channel, pytest.raises(grpc.RpcError) as raw:
                metadata = [("authorization", f"Bearer {QUEUED_ONLY_TOKEN}")]
                jobs_pb2_grpc.JobServiceStub(channel).SubmitJob(request, metadata=metadata, timeout=30)
            assert raw.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "trap: not a regular file" in raw.value.details()

            model = shared / "model"
            shutil.copytree(tiny_model, model)
            weights = next((model / "unet").glob("*.safetensors"))
            weights.unlink()
            weights.symlink_to(others / "weights.safetensors")
            with pytest.raises(ClientError) as error:
                bob.submit(job_spec(model, dog_images))
            assert error.value.code == "PERMISSION_DENIED" and "readable_paths" in error.value.message
    finally:
        controller.stop(grace_s=1)
