"""gRPC handlers: thin. Authenticate, convert proto <-> service types, map domain errors to status codes (the
mapping: controller/grpc_errors.py). The admission gate in front of them: controller/request_gate.py."""

from __future__ import annotations

import functools
import threading
import time

import grpc
from google.protobuf import struct_pb2

from controller import grpc_errors, metrics
from controller.errors import QuotaExceeded
from controller.intake import ImageInput
from controller.request_gate import Authenticator, InProgress
from controller.scheduler import Waiting
from controller.service import JobService
from controller.store import STATES, TERMINAL_STATES, JobRecord, ModelRecord
from dreambooth.errors import InputError
from dreambooth.proto_convert import (
    proto_to_spec_fields,
    refuse_unknown_fields,
    spec_to_proto,
    state_name,
    state_value,
    timestamp,
)
from dreambooth.v1 import jobs_pb2, jobs_pb2_grpc, models_pb2, models_pb2_grpc
from trainer.images import check_instance_image_count


def rpc(handler):
    """Authentication, error mapping and the latency metric, once for every unary handler."""

    @functools.wraps(handler)
    def wrapper(self, request, context):
        start, code = time.perf_counter(), grpc.StatusCode.OK
        try:
            try:
                tenant = self.auth.tenant(context)
                refuse_unknown_fields(request)  # its messages inside: the handlers' (SubmitJob's photos and spec)
                return handler(self, request, context, tenant)
            except Exception as e:
                code, status = grpc_errors.error_status(e, handler.__name__)
            context.abort_with_status(status)  # raises: how a grpc handler ends a call with an error
        finally:
            metrics.record_rpc(handler.__name__, code, time.perf_counter() - start)

    return wrapper


class JobServicer(jobs_pb2_grpc.JobServiceServicer):
    def __init__(
        self,
        service: JobService,
        auth: Authenticator,
        max_watches: int,
        max_watches_per_tenant: int,
        shutting_down: threading.Event,
    ):
        self.service = service
        self.auth = auth
        # Set when the controller stops: open watches end at once, UNAVAILABLE, rather than hold the shutdown's grace.
        self.shutting_down = shutting_down
        # Each open WatchJob stream holds one of the server's threads for as long as its job runs (hours).
        self._watch_slots = threading.BoundedSemaphore(max_watches)
        self._max_watches = max_watches
        self._max_watches_per_tenant = max_watches_per_tenant
        self._watches_by_tenant = InProgress()

    def _job(self, job: JobRecord) -> jobs_pb2.Job:
        return job_proto(job, self.service.waiting_for(job))

    @rpc
    def SubmitJob(self, request, context, tenant):
        # Before one object per entry is made: an empty entry is 2 bytes, and a request may be max_request_bytes.
        check_instance_image_count(len(request.instance_images))
        for index, image in enumerate(request.instance_images):
            refuse_unknown_fields(image, f"instance_images[{index}]")
        images = [
            ImageInput(filename=i.filename, data=i.data if i.WhichOneof("source") == "data" else None, uri=i.uri)
            for i in request.instance_images
        ]
        try:
            job = self.service.submit(
                tenant,
                proto_to_spec_fields(request.spec),
                images,
                request.request_id,
                request.priority,
                # A caller gone (cancelled, Ctrl-C) or out of time is told nothing: it may submit again.
                waited_for=lambda: context.is_active() and ((left := context.time_remaining()) is None or left > 0),
            )
        except Exception:
            metrics.SUBMISSIONS.labels(outcome="rejected").inc()
            raise
        metrics.SUBMISSIONS.labels(outcome="accepted").inc()
        return jobs_pb2.SubmitJobResponse(job=self._job(job))

    @rpc
    def GetJob(self, request, context, tenant):
        return jobs_pb2.GetJobResponse(job=self._job(self.service.get(tenant, request.job_id)))

    @rpc
    def ListJobs(self, request, context, tenant):
        if len(request.states) > len(STATES):  # before a string is made for each: a request may hold millions
            raise InputError("states", f"{len(request.states)} states; there are {len(STATES)}: name each once")
        jobs, token = self.service.list(
            tenant, request.page_size, request.page_token, [state_name(s) for s in request.states]
        )
        return jobs_pb2.ListJobsResponse(jobs=[self._job(j) for j in jobs], next_page_token=token or "")

    @rpc
    def CancelJob(self, request, context, tenant):
        return jobs_pb2.CancelJobResponse(job=self._job(self.service.cancel(tenant, request.job_id)))

    @rpc
    def DeleteJob(self, request, context, tenant):
        self.service.delete(tenant, request.job_id)
        return jobs_pb2.DeleteJobResponse()

    @rpc
    def GetJobLogs(self, request, context, tenant):
        return jobs_pb2.GetJobLogsResponse(text=self.service.logs(tenant, request.job_id))

    def WatchJob(self, request, context):
        if not self._watch_slots.acquire(blocking=False):
            metrics.WATCHES_ENDED.labels(code="RESOURCE_EXHAUSTED").inc()
            message = f"{self._max_watches} WatchJob streams are open (max_watches): retry later, or poll GetJob"
            context.abort_with_status(
                grpc_errors.status(
                    grpc.StatusCode.RESOURCE_EXHAUSTED, message, reason="SERVER_WATCHES_LIMIT", retry_after_s=5
                )
            )
        metrics.WATCHES_OPEN.inc()
        held, code = True, grpc.StatusCode.CANCELLED  # until it ends otherwise: the client went away
        tenant = None

        def release() -> None:
            nonlocal held
            if held:
                held = False
                self._watch_slots.release()
                metrics.WATCHES_OPEN.dec()
                if tenant is not None:  # it took its tenant's slot too
                    self._watches_by_tenant.leave(tenant)

        try:
            tenant = self._take_tenant_slot(self.auth.tenant(context))
            refuse_unknown_fields(request)  # as `rpc` does for the unary calls

            def is_active() -> bool:
                return context.is_active() and not self.shutting_down.is_set()

            for job, change in self.service.watch(tenant, request.job_id, is_active=is_active):
                if job.state in TERMINAL_STATES:
                    # The stream's last update: free its slot first, so that a client which has it and opens its
                    # next watch at once is not refused for a stream that is over.
                    release()
                    code = grpc.StatusCode.OK
                yield watch_proto(self._job(job), change)
            if code == grpc.StatusCode.OK or not self.shutting_down.is_set():
                return
            # Never ending on its own, a watch held the stopping controller for its whole grace (past `dreambooth
            # down`'s wait, which then killed it), and ended CANCELLED.
            code = grpc.StatusCode.UNAVAILABLE
            status = grpc_errors.status(code, "the controller is shutting down: watch again", retry_after_s=1)
        except Exception as e:
            code, status = grpc_errors.error_status(e, "WatchJob")
        finally:
            release()
            metrics.WATCHES_ENDED.labels(code=code.name).inc()
        context.abort_with_status(status)

    def _take_tenant_slot(self, tenant: str) -> str:
        if not self._watches_by_tenant.enter(tenant, self._max_watches_per_tenant):
            raise QuotaExceeded(
                f"tenant {tenant!r} has {self._max_watches_per_tenant} WatchJob streams open "
                "(max_watches_per_tenant): close one, or poll GetJob",
                "TENANT_WATCHES_LIMIT",
            )
        return tenant


class ModelServicer(models_pb2_grpc.ModelServiceServicer):
    def __init__(self, service: JobService, auth: Authenticator):
        self.service = service
        self.auth = auth

    @rpc
    def ListModels(self, request, context, tenant):
        models, token = self.service.list_models(tenant, request.page_size, request.page_token)
        return models_pb2.ListModelsResponse(models=[model_proto(m) for m in models], next_page_token=token or "")

    @rpc
    def GetModel(self, request, context, tenant):
        return models_pb2.GetModelResponse(model=model_proto(self.service.get_model(tenant, request.model_id)))

    @rpc
    def DeployModel(self, request, context, tenant):
        return models_pb2.DeployModelResponse(model=model_proto(self.service.deploy_model(tenant, request.model_id)))

    @rpc
    def UndeployModel(self, request, context, tenant):
        model = self.service.undeploy_model(tenant, request.model_id)
        return models_pb2.UndeployModelResponse(model=model_proto(model))

    @rpc
    def DeleteModel(self, request, context, tenant):
        self.service.delete_model(tenant, request.model_id)
        return models_pb2.DeleteModelResponse()


# --- conversions ---------------------------------------------------------------------------------------


def job_proto(job: JobRecord, waiting: Waiting | None = None) -> jobs_pb2.Job:
    progress = job.progress or {}
    message = jobs_pb2.Job(
        job_id=job.job_id,
        tenant=job.tenant,
        state=state_value(job.state),
        priority=job.priority,
        spec=spec_to_proto(job.spec, stored=True),
        progress=jobs_pb2.Progress(
            step=progress.get("step") or 0,
            total_steps=progress.get("total_steps") or job.spec.get("max_steps", 0),
            loss=progress.get("loss") or 0.0,
            prior_loss=progress.get("prior_loss") or 0.0,
            learning_rate=progress.get("lr") or 0.0,
            steps_per_second=progress.get("steps_per_s") or 0.0,
            class_images_done=progress.get("class_images_done") or 0,
            class_images_total=progress.get("class_images_total") or 0,
        ),
        model_id=job.model_id or "",
        last_checkpoint_step=job.last_checkpoint_step or 0,
        attempts=job.attempts,
        request_id=job.request_id or "",
    )
    if progress.get("eta_s") is not None:
        message.progress.eta.FromMilliseconds(int(progress["eta_s"] * 1000))
    if waiting is not None:
        message.queued.reason, message.queued.message = waiting
    if job.failure_reason:
        message.failure.reason = job.failure_reason
        message.failure.message = job.failure_message or ""
    for name in ("create_time", "start_time", "end_time", "update_time"):
        if getattr(job, name):
            getattr(message, name).CopyFrom(timestamp(getattr(job, name)))
    return message


def watch_proto(job: jobs_pb2.Job, change) -> jobs_pb2.WatchJobResponse:
    message = jobs_pb2.WatchJobResponse(job=job)
    message.time.GetCurrentTime()
    if change is None or change.kind in ("state", "queued"):
        message.state = message.job.state
    elif change.kind == "progress":
        message.progress.CopyFrom(message.job.progress)
    elif change.kind == "checkpoint":
        message.checkpoint.step = change.data["step"]
        message.checkpoint.path = change.data.get("path", "")
        message.checkpoint.stall_seconds = change.data.get("stall_s") or 0.0
        message.checkpoint.waited_seconds = change.data.get("waited_s") or 0.0
    elif change.kind == "validation":
        message.validation.step = change.data["step"]
        message.validation.path = change.data.get("path", "")
    return message


def model_proto(model: ModelRecord) -> models_pb2.Model:
    metadata = struct_pb2.Struct()
    metadata.update(model.metadata or {})
    message = models_pb2.Model(
        model_id=model.model_id,
        tenant=model.tenant,
        job_id=model.job_id,
        path=model.path,
        metadata=metadata,
        deployed=bool(model.deployed),
        endpoint=model.endpoint or "",
    )
    if model.create_time:
        message.create_time.CopyFrom(timestamp(model.create_time))
    return message
