"""The controller's domain errors; the API layer maps each to its gRPC status code (InputError: INVALID_ARGUMENT)."""


class NotFound(Exception):
    """NOT_FOUND: no such job or model for this tenant (another tenant's is not found either)."""


class FailedPrecondition(Exception):
    """FAILED_PRECONDITION: the job or model is not in a state that allows it (e.g. cancelling a finished job)."""


class PermissionDenied(Exception):
    """PERMISSION_DENIED: the request names a file outside what this tenant may read."""


class QuotaExceeded(Exception):
    """RESOURCE_EXHAUSTED: the tenant has too many unfinished jobs."""


class Unauthenticated(Exception):
    """UNAUTHENTICATED: missing or unknown bearer token."""


class DeadlineExceeded(Exception):
    """DEADLINE_EXCEEDED: the caller stopped waiting before the request was done; nothing was recorded."""


class StorageFailed(Exception):
    """INTERNAL: the controller could not change its shared storage (the message says what, and what was kept)."""
