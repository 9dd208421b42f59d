"""The controller's Prometheus metrics (served on its own /metrics; names per Prometheus conventions)."""

from __future__ import annotations

import grpc
from grpc_reflection.v1alpha import reflection_pb2
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from controller.scheduler import WAITING_REASONS
from controller.store import STATES
from dreambooth.errors import FAILURE_REASONS
from dreambooth.v1 import jobs_pb2, models_pb2

REGISTRY = CollectorRegistry()

JOBS = Gauge("dreambooth_jobs", "Training jobs by state.", ["state"], registry=REGISTRY)
QUEUED_JOBS = Gauge(
    "dreambooth_queued_jobs",
    "Queued jobs by what they wait for (Job.queued's reason), as of the controller's last scheduling pass (while no "
    "CPU is free: those of tenants at their limit as TENANT_LIMIT, the rest as WAITING_FOR_RESOURCES, or as "
    "BIGGER_THAN_CLUSTER while training may use no CPU).",
    ["reason"],
    registry=REGISTRY,
)
SUBMISSIONS = Counter("dreambooth_job_submissions_total", "SubmitJob calls by outcome.", ["outcome"], registry=REGISTRY)
RPC_DURATION = Histogram(
    "dreambooth_rpc_duration_seconds",
    "Unary gRPC calls' handling time by method and status code "
    "(WatchJob streams: dreambooth_open_watch_streams, dreambooth_watch_streams_total).",
    ["method", "code"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
    registry=REGISTRY,
)
RPC_ERRORS = Counter(
    "dreambooth_rpc_errors_total",
    "Unary gRPC calls (and calls refused before their handler: no token, a tenant's calls limit) answered with a "
    "status other than OK, by method and status code. Each (method, code) is there at 0 from the start, so that "
    "increase() counts the first error of a kind, which dreambooth_rpc_duration_seconds_count, whose series "
    "appears with it, does not.",
    ["method", "code"],
    registry=REGISTRY,
)
QUEUE_WAIT = Histogram(
    "dreambooth_job_queue_wait_seconds",
    "Time from submission to start.",
    buckets=(1, 5, 15, 60, 300, 900, 3600, 4 * 3600, 24 * 3600),
    registry=REGISTRY,
)
SERVING_UP_TO_DATE = Gauge(
    "dreambooth_serving_up_to_date",
    "0 while Ray Serve does not take the deployed models the store holds: their apply failing, or Serve failing to "
    "deploy them (DEPLOY_FAILED: the controller's log says why); 1 once applied. By Serve application; no series "
    "on a controller without serving.",
    ["application"],
    registry=REGISTRY,
)
WATCHES_OPEN = Gauge("dreambooth_open_watch_streams", "Open WatchJob streams (at most max_watches).", registry=REGISTRY)
WATCHES_ENDED = Counter(
    "dreambooth_watch_streams_total",
    "WatchJob streams by the status they ended with (OK: the job ended; CANCELLED: the client went away; "
    "RESOURCE_EXHAUSTED: refused, max_watches open).",
    ["code"],
    registry=REGISTRY,
)
FAILURES = Counter("dreambooth_job_failures_total", "Failed jobs by reason.", ["reason"], registry=REGISTRY)
# Each running job's training, from its trainer's progress events. Per job here, where a job's series are removed
# when it ends; the trainers' own metrics (through Ray's metrics agent, which keeps every series it has seen for the
# node's lifetime, and folds those past 2000 of a metric into one) carry no job id.
JOB_STEP = Gauge("dreambooth_job_step", "Optimizer steps a running job has done.", ["job_id"], registry=REGISTRY)
JOB_LOSS = Gauge(
    "dreambooth_job_loss",
    "A running job's training loss (over its last progress window).",
    ["job_id"],
    registry=REGISTRY,
)
JOB_STEPS_PER_SECOND = Gauge(
    "dreambooth_job_steps_per_second",
    "A running job's optimizer steps per second (over its last progress window).",
    ["job_id"],
    registry=REGISTRY,
)

# Every known label value starts at 0: a series that first appears at 1 is an event increase() cannot see.
for _outcome in ("accepted", "rejected"):
    SUBMISSIONS.labels(outcome=_outcome)
for _reason in FAILURE_REASONS:
    FAILURES.labels(reason=_reason)
for _reason in WAITING_REASONS:
    QUEUED_JOBS.labels(reason=_reason)
for _code in ("OK", "CANCELLED", "RESOURCE_EXHAUSTED", "UNAVAILABLE"):
    WATCHES_ENDED.labels(code=_code)
# Every method the RPC metrics name: those of the controller's services, and reflection's, which the request gate
# may refuse (controller/request_gate.py); not WatchJob, whose streams end in WATCHES_ENDED.
RPC_METHODS = tuple(
    method.name
    for module in (jobs_pb2, models_pb2, reflection_pb2)
    for service in module.DESCRIPTOR.services_by_name.values()
    for method in service.methods
    if method.name != "WatchJob"
)
RPC_ERROR_CODES = tuple(code.name for code in grpc.StatusCode if code != grpc.StatusCode.OK)
for _method in RPC_METHODS:
    for _code in RPC_ERROR_CODES:
        RPC_ERRORS.labels(method=_method, code=_code)


def record_rpc(method: str, code: grpc.StatusCode, seconds: float) -> None:
    """A unary call's (or a refused call's) answer: its handling time, and an error unless it is OK."""
    RPC_DURATION.labels(method=method, code=code.name).observe(seconds)
    if code != grpc.StatusCode.OK:
        RPC_ERRORS.labels(method=method, code=code.name).inc()


def record_job_progress(job_id: str, step: int | None, loss: float | None, steps_per_second: float | None) -> None:
    """What a running job's trainer last reported (None: a field its progress event did not have)."""
    for gauge, value in ((JOB_STEP, step), (JOB_LOSS, loss), (JOB_STEPS_PER_SECOND, steps_per_second)):
        if value is not None:
            gauge.labels(job_id=job_id).set(value)


def forget_job(job_id: str) -> None:
    """Drops an ended job's series: the exporter holds only running jobs', however many have run."""
    for gauge in (JOB_STEP, JOB_LOSS, JOB_STEPS_PER_SECOND):
        gauge.remove(job_id)  # none if it reported no progress: nothing to do


def set_queued_jobs(counts: dict[str, int]) -> None:
    for reason in WAITING_REASONS:
        QUEUED_JOBS.labels(reason=reason).set(counts.get(reason, 0))


def set_jobs_by_state(counts: dict[str, int]) -> None:
    for state in STATES:
        JOBS.labels(state=state).set(counts.get(state, 0))


def serve(listen: str):
    """Start the /metrics HTTP server on host:port; returns (server, thread)."""
    host, _, port = listen.rpartition(":")
    return start_http_server(int(port), addr=host or "127.0.0.1", registry=REGISTRY)
