"""Errors shared by the trainer, the controller and serving."""

from __future__ import annotations

import difflib
import errno
from collections.abc import Iterable, Mapping


class InputError(ValueError):
    """Bad user input, found before any work starts.

    `field` names what to fix (a job-spec field such as ``instance_images`` or ``base_model``), so the CLI
    can print it and the controller can map it to INVALID_ARGUMENT with a field violation.
    """

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message

    def __reduce__(self):
        # Crosses process boundaries (a Serve replica's error reaches the ingress pickled).
        return (self.__class__, (self.field, self.message))


# OSErrors that say nothing of the input read or written: the storage full (or over quota), or unwell (remounted
# read-only, its NFS server gone), or this process out of descriptors or memory. Raised as what they are (the
# controller answers RESOURCE_EXHAUSTED or UNAVAILABLE), never blamed on a photo, a model or a cached image.
STORAGE_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
SYSTEM_ERRNOS = STORAGE_FULL_ERRNOS | frozenset(
    {errno.EROFS, errno.EIO, errno.ESTALE, errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ETIMEDOUT}
)


def is_system_error(error: BaseException) -> bool:
    return isinstance(error, OSError) and error.errno in SYSTEM_ERRNOS


def refuse_unknown(data: Mapping, known: Iterable[str], what: str, prefix: str = "") -> None:
    """Raises InputError naming the keys of `data` that are not `known` (a typo in a spec or a config file), the first
    as the field (`prefix` before it), with the closest known one where there is one. YAML reads a key `yes`, `no`
    or `on` as a boolean: named as Python writes it (`no:` as 'False'), not a TypeError."""
    known = sorted(known)
    unknown = sorted(map(str, set(data) - set(known)))
    if not unknown:
        return
    close = difflib.get_close_matches(unknown[0], known, n=1)
    hint = f": did you mean {close[0]!r}?" if close else f"; known: {known}"
    raise InputError(f"{prefix}{unknown[0]}", f"unknown {what} {unknown}{hint}")


# Why a job failed (Failure.reason, the failures metric's label): a closed set, each documented in jobs.proto. The
# trainer reports the first four, the controller the rest.
FAILURE_REASONS = (
    "INVALID_INPUT",
    "TRAINING_FAILED",
    "PLACEMENT_TIMEOUT",
    "EXPORT_FAILED",
    "RAY_JOB_FAILED",
    "NO_RESULT",
    "STOPPED",
    "RUN_TIME_EXCEEDED",
)

# How long a job's workers may wait for Ray to place them (class-image actors, then the training workers, also when
# they restart after a failure) before the job fails: long enough for an autoscaler to add GPU nodes.
PLACEMENT_TIMEOUT_S = 30 * 60.0
PLACEMENT_TIMEOUT_ENV = "DREAMBOOTH_PLACEMENT_TIMEOUT_S"  # how the controller's setting reaches a job's trainer


class PlacementTimeout(RuntimeError):
    """Ray could not place a job's workers in time: no node has room for one, the placement strategy cannot be met,
    or work outside the controller holds the resources. (Waiting on, the job would hold its share of the cluster
    and its tenant's slot, showing no progress, until max_job_run_s.)"""
