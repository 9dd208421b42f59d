"""What a failed call answers: domain errors mapped to gRPC status codes, with details that a client in any language
acts on (BadRequest's field, ErrorInfo's reason, RetryInfo's delay). Apart from the handlers (controller/api.py)
because the request gate (controller/request_gate.py) answers its refusals with the same statuses."""

from __future__ import annotations

import logging

import grpc
import sqlalchemy as sa
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from controller.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    NotFound,
    PermissionDenied,
    QuotaExceeded,
    StorageFailed,
    Unauthenticated,
)
from controller.ray_jobs import RayJobsError
from dreambooth.errors import STORAGE_FULL_ERRNOS, InputError, is_system_error

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


def status(
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


def error_status(error: Exception, method: str) -> tuple[grpc.StatusCode, grpc.Status]:
    if isinstance(error, InputError):
        code = grpc.StatusCode.INVALID_ARGUMENT
        return code, status(code, error.message, error.field)
    if type(error) in _CODES:
        code = _CODES[type(error)]
        reason, retry_after_s = getattr(error, "reason", None), getattr(error, "retry_after_s", None)
        return code, status(code, str(error), reason=reason, retry_after_s=retry_after_s)
    if isinstance(error, RayJobsError):  # its text names the cluster's internal address: for the log only
        log.warning("%s: %s", method, error)
        code = grpc.StatusCode.UNAVAILABLE
        return code, status(code, "the cluster's Ray Jobs API is unavailable; retry in a moment")
    if _storage_full(error):  # a retry (the SDK's, of up to 64 MiB of photos) cannot help until space is freed
        log.error("%s: the controller's storage is full: %s", method, error)
        code = grpc.StatusCode.RESOURCE_EXHAUSTED
        message = "the controller's storage is full: retry once an operator has freed space"
        return code, status(code, message, reason="STORAGE_FULL")
    if is_system_error(error):  # not full (above): unwell
        log.error("%s: the controller's storage cannot be used: %s", method, error)
        code = grpc.StatusCode.UNAVAILABLE
        return code, status(code, f"the controller's storage cannot be used now ({error.strerror}); retry later")
    # The database is down, restarting or locked, or every pooled connection is busy: worth a retry.
    if isinstance(error, sa.exc.OperationalError | sa.exc.TimeoutError | sa.exc.DisconnectionError):
        log.warning("%s: the database is unavailable: %s", method, error)
        code = grpc.StatusCode.UNAVAILABLE
        return code, status(code, "the controller's database is unavailable; retry in a moment")
    log.exception("%s failed", method)
    code = grpc.StatusCode.INTERNAL
    return code, status(code, f"internal error ({type(error).__name__}); see the controller log")
