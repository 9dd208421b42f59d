"""gRPC handlers: thin. Authenticate, convert proto <-> service types, map domain errors to status codes."""

from __future__ import annotations

import collections
import contextlib
import functools
import hmac
import logging
import threading
import time
from collections.abc import Iterator

import grpc
import sqlalchemy as sa
from google.protobuf import any_pb2, duration_pb2, struct_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from controller import metrics
from controller.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    NotFound,
    PermissionDenied,
    QuotaExceeded,
    StorageFailed,
    Unauthenticated,
)
from controller.intake import ImageInput
from controller.ray_jobs import RayJobsError
from controller.scheduler import Waiting
from controller.service import JobService
from controller.store import STATES, TERMINAL_STATES, JobRecord, ModelRecord
from dreambooth.errors import STORAGE_FULL_ERRNOS, InputError, is_system_error
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

log = logging.getLogger(__name__)

_CODES = {
    NotFound: grpc.StatusCode.NOT_FOUND,
    FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    QuotaExceeded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    StorageFailed: grpc.StatusCode.INTERNAL,  # its message says what failed and that a retry is safe
    PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
}
_MAX_MESSAGE_BYTES = 1000
ERROR_DOMAIN = "dreambooth.v1"  # of the ErrorInfo reasons this API sets


class Authenticator:
    """Bearer token -> tenant. With no tenants configured, everyone is tenant "default" (local use)."""

    def __init__(self, service: JobService, open_access: bool):
        self._tokens = [(token, t.name) for t in service.tenants.values() for token in t.tokens]
        self._open = open_access

    def tenant(self, context: grpc.ServicerContext) -> str:
        return self.tenant_of(context.invocation_metadata())

    def tenant_of(self, metadata) -> str:
        if self._open:
            return "default"
        header = dict(metadata or ()).get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise Unauthenticated("send `authorization: Bearer <token>` metadata")
        for known, tenant in self._tokens:
            if hmac.compare_digest(known.encode(), token.encode()):
                return tenant
        raise Unauthenticated("unknown token")


class RequestGate(grpc.ServerInterceptor):
    """Refuses, from a call's metadata and before gRPC reads its request, a call to `services` whose token is
    missing or unknown (UNAUTHENTICATED), and a tenant's call beyond its limit (RESOURCE_EXHAUSTED): of a method in
    `limits` ({method path: (how many of the tenant's may be in progress, the setting that says so)}), or of all the
    other methods together, `other_calls` (a stream's turn ends once its request is read).

    A handler sees its request only after gRPC has received and parsed it, up to max_request_bytes (64 MiB of
    photos, which any method's request may carry in fields it does not know): without the gate, every RPC thread
    could hold that much for callers without a token, and one tenant calling at once on all of them could take the
    controller's memory. A refusal's handler takes the request as a stream it never reads, so gRPC receives no more
    of it than HTTP/2's flow-control window. A stream (server reflection) holds its thread for as long as its caller
    keeps it open: one tenant's must not take them all.

    `open_services` (health: probes have no token) take no token, but all their calls together are at most
    OPEN_CALLS_AT_ONCE at a time, each for its whole duration: requests that never finish arriving held every RPC
    thread, every tenant's calls waiting behind them.
    """

    def __init__(
        self,
        auth: Authenticator,
        services: tuple[str, ...],
        limits: dict[str, tuple[int, str]],
        other_calls: tuple[int, str],
        open_services: tuple[str, ...] = (),
    ):
        self._auth = auth
        self._prefixes = tuple(f"/{service}/" for service in services)
        self._open_prefixes = tuple(f"/{service}/" for service in open_services)
        self._limits = limits
        self._other_calls = other_calls
        self._in_progress = InProgress()  # (method path or _OTHER_CALLS, tenant) -> calls

    def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        handler = continuation(handler_call_details)
        if handler is not None and method.startswith(self._open_prefixes):
            return self._open_call(method, handler)
        if not method.startswith(self._prefixes) or handler is None:
            # A method no service has: UNIMPLEMENTED, and no metric series named by the caller (one per made-up name,
            # for ever).
            return handler
        try:
            tenant = self._auth.tenant_of(handler_call_details.invocation_metadata)
        except Unauthenticated as e:
            return _refusal(method.rpartition("/")[2], grpc.StatusCode.UNAUTHENTICATED, str(e))
        turn = functools.partial(self._turn, method, tenant)
        wrap = dict(request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)
        if handler.unary_unary is not None:
            return grpc.stream_unary_rpc_method_handler(
                functools.partial(self._unary_in_turn, handler.unary_unary, method, turn), **wrap
            )
        if handler.unary_stream is not None:  # WatchJob: its stream's thread is bounded by max_watches_per_tenant
            return grpc.stream_stream_rpc_method_handler(
                functools.partial(self._read_in_turn, handler.unary_stream, method, turn), **wrap
            )
        return grpc.stream_stream_rpc_method_handler(
            functools.partial(self._stream_in_turn, handler.stream_stream, turn), **wrap
        )

    def _open_call(self, method: str, handler):
        turn = functools.partial(self._open_turn, method)
        wrap = dict(request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)
        if handler.unary_unary is not None:
            return grpc.stream_unary_rpc_method_handler(
                functools.partial(self._unary_in_turn, handler.unary_unary, method, turn), **wrap
            )
        return grpc.stream_stream_rpc_method_handler(  # health's Watch: its turn lasts as long as its stream
            functools.partial(self._stream_of_one_in_turn, handler.unary_stream, method, turn), **wrap
        )

    @contextlib.contextmanager
    def _open_turn(self, method: str, context) -> Iterator[None]:
        if not self._in_progress.enter((_OPEN_CALLS, ""), OPEN_CALLS_AT_ONCE):
            message = f"{OPEN_CALLS_AT_ONCE} calls without a token are in progress: retry once one has ended"
            status = _status(grpc.StatusCode.RESOURCE_EXHAUSTED, message, retry_after_s=1)
            _refuse(method.rpartition("/")[2], status, context)
        try:
            yield
        finally:
            self._in_progress.leave((_OPEN_CALLS, ""))

    def _stream_of_one_in_turn(self, call, method: str, turn, request_stream, context):
        with turn(context):
            yield from call(_one_request(method, request_stream, context), context)

    def _unary_in_turn(self, call, method: str, turn, request_stream, context):
        with turn(context):
            return call(_one_request(method, request_stream, context), context)

    def _read_in_turn(self, call, method: str, turn, request_stream, context):
        with turn(context):
            request = _one_request(method, request_stream, context)
        yield from call(request, context)

    def _stream_in_turn(self, call, turn, request_stream, context):
        with turn(context):
            yield from call(request_stream, context)

    @contextlib.contextmanager
    def _turn(self, method: str, tenant: str, context) -> Iterator[None]:
        key = method if method in self._limits else _OTHER_CALLS
        limit, setting = self._limits.get(method, self._other_calls)
        if not self._in_progress.enter((key, tenant), limit):
            what = f"{method.rpartition('/')[2]} calls" if key == method else "calls other than SubmitJob"
            message = f"tenant {tenant!r} has {limit} {what} in progress ({setting}): retry once one has ended"
            status = _status(grpc.StatusCode.RESOURCE_EXHAUSTED, message, reason="TENANT_CALLS_LIMIT", retry_after_s=1)
            _refuse(method.rpartition("/")[2], status, context)
        try:
            yield
        finally:
            self._in_progress.leave((key, tenant))


_OTHER_CALLS = "other calls"
_OPEN_CALLS = "calls without a token"
OPEN_CALLS_AT_ONCE = 8  # health checks: a probe's is over in a millisecond


def _one_request(method: str, request_stream, context):
    """The call's request, read only now, holding one of the tenant's turns."""
    request = next(request_stream, None)
    if request is None:
        name = method.rpartition("/")[2]
        _refuse(name, _status(grpc.StatusCode.INVALID_ARGUMENT, f"{name} takes one request message"), context)
    return request


class InProgress:
    """Calls (or streams) in progress by key, each admitted while its key has fewer than a limit."""

    def __init__(self):
        self._counts: collections.Counter = collections.Counter()
        self._lock = threading.Lock()

    def enter(self, key, limit: int) -> bool:
        with self._lock:
            if self._counts[key] >= limit:
                return False
            self._counts[key] += 1
            return True

    def leave(self, key) -> None:
        with self._lock:
            self._counts[key] -= 1
            if not self._counts[key]:
                del self._counts[key]  # tenants and methods come and go: no key kept for each ever seen


def _refusal(name: str, code: grpc.StatusCode, message: str):
    """A handler that ends its call with `code` without reading the request."""
    status = _status(code, message)
    return grpc.stream_stream_rpc_method_handler(lambda request_stream, context: _refuse(name, status, context))


def _refuse(name: str, status: grpc.Status, context: grpc.ServicerContext) -> None:
    if name == "WatchJob":
        metrics.WATCHES_ENDED.labels(code=status.code.name).inc()
    else:
        metrics.record_rpc(name, status.code, 0)
    context.abort_with_status(status)  # raises


def _status(
    code: grpc.StatusCode,
    message: str,
    field: str | None = None,
    *,
    reason: str | None = None,
    retry_after_s: float | None = None,
):
    """A status with what a client in any language acts on as details: the field to fix (BadRequest), the kind of
    refusal (ErrorInfo's reason, in the dreambooth.v1 domain), how long to wait before a retry (RetryInfo)."""
    # The message travels twice in the trailers (grpc-message, percent-encoded, and grpc-status-details-bin),
    # and clients drop trailers over 8 KiB: a message echoing a huge input would turn into RESOURCE_EXHAUSTED.
    if len(message.encode()) > _MAX_MESSAGE_BYTES:
        message = message.encode()[:_MAX_MESSAGE_BYTES].decode(errors="ignore") + " [...]"
    details = []
    if field is not None:
        violation = error_details_pb2.BadRequest.FieldViolation(field=field, description=message)
        details.append(error_details_pb2.BadRequest(field_violations=[violation]))
    if reason is not None:
        details.append(error_details_pb2.ErrorInfo(reason=reason, domain=ERROR_DOMAIN))
    if retry_after_s is not None:
        delay = duration_pb2.Duration()
        delay.FromMilliseconds(round(retry_after_s * 1000))
        details.append(error_details_pb2.RetryInfo(retry_delay=delay))
    details = [_packed(detail) for detail in details]
    text = f"{field}: {message}" if field else message
    return rpc_status.to_status(status_pb2.Status(code=getattr(code_pb2, code.name), message=text, details=details))


def _packed(detail) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(detail)
    return packed


def _storage_full(error: Exception) -> bool:
    if isinstance(error, OSError):
        return error.errno in STORAGE_FULL_ERRNOS
    if isinstance(error, sa.exc.OperationalError):  # SQLite's SQLITE_FULL; PostgreSQL's disk_full (53100)
        return "database or disk is full" in str(error.orig) or getattr(error.orig, "sqlstate", None) == "53100"
    return False


def _error_status(error: Exception, method: str) -> tuple[grpc.StatusCode, grpc.Status]:
    if isinstance(error, InputError):
        code = grpc.StatusCode.INVALID_ARGUMENT
        return code, _status(code, error.message, error.field)
    if type(error) in _CODES:
        code = _CODES[type(error)]
        reason, retry_after_s = getattr(error, "reason", None), getattr(error, "retry_after_s", None)
        return code, _status(code, str(error), reason=reason, retry_after_s=retry_after_s)
    if isinstance(error, RayJobsError):  # its text names the cluster's internal address: for the log only
        log.warning("%s: %s", method, error)
        code = grpc.StatusCode.UNAVAILABLE
        return code, _status(code, "the cluster's Ray Jobs API is unavailable; retry in a moment")
    if _storage_full(error):  # a retry (the SDK's, of up to 64 MiB of photos) cannot help until space is freed
        log.error("%s: the controller's storage is full: %s", method, error)
        code = grpc.StatusCode.RESOURCE_EXHAUSTED
        message = "the controller's storage is full: retry once an operator has freed space"
        return code, _status(code, message, reason="STORAGE_FULL")
    if is_system_error(error):  # not full (above): unwell
        log.error("%s: the controller's storage cannot be used: %s", method, error)
        code = grpc.StatusCode.UNAVAILABLE
        return code, _status(code, f"the controller's storage cannot be used now ({error.strerror}); retry later")
    # The database is down, restarting or locked, or every pooled connection is busy: worth a retry.
    if isinstance(error, sa.exc.OperationalError | sa.exc.TimeoutError | sa.exc.DisconnectionError):
        log.warning("%s: the database is unavailable: %s", method, error)
        code = grpc.StatusCode.UNAVAILABLE
        return code, _status(code, "the controller's database is unavailable; retry in a moment")
    log.exception("%s failed", method)
    code = grpc.StatusCode.INTERNAL
    return code, _status(code, f"internal error ({type(error).__name__}); see the controller log")


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
                code, status = _error_status(e, handler.__name__)
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
                _status(grpc.StatusCode.RESOURCE_EXHAUSTED, message, reason="SERVER_WATCHES_LIMIT", retry_after_s=5)
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
            status = _status(code, "the controller is shutting down: watch again", retry_after_s=1)
        except Exception as e:
            code, status = _error_status(e, "WatchJob")
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
