"""The controller's domain errors; the API layer maps each to its gRPC status code (InputError: INVALID_ARGUMENT)."""


class NotFound(Exception):
    """NOT_FOUND: no such job or model for this tenant (another tenant's is not found either)."""


class _Reasoned(Exception):
    """An error a client may act on by kind, not by its words: `reason` travels as the status's ErrorInfo (domain
    dreambooth.v1), and `retry_after_s`, where waiting helps, as its RetryInfo."""

    def __init__(self, message: str, reason: str, retry_after_s: float | None = None):
        super().__init__(message)
        self.reason = reason
        self.retry_after_s = retry_after_s


class FailedPrecondition(_Reasoned):
    """FAILED_PRECONDITION: the job or model is not in a state that allows it (e.g. cancelling a finished job)."""


class PermissionDenied(Exception):
    """PERMISSION_DENIED: the request names a file outside what this tenant may read."""


class QuotaExceeded(_Reasoned):
    """RESOURCE_EXHAUSTED: a limit of the tenant's (unfinished jobs, calls or watches in progress) or the server's."""


class Unauthenticated(Exception):
    """UNAUTHENTICATED: missing or unknown bearer token."""


class DeadlineExceeded(Exception):
    """DEADLINE_EXCEEDED: the caller stopped waiting before the request was done; nothing was recorded."""


class StorageFailed(Exception):
    """INTERNAL: the controller could not change its shared storage (the message says what, and what was kept)."""
