"""Errors shared by the trainer, the controller and serving."""


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


# How long a job's workers may wait for Ray to place them (class-image actors, then the training workers, also when
# they restart after a failure) before the job fails: long enough for an autoscaler to add GPU nodes.
PLACEMENT_TIMEOUT_S = 30 * 60.0
PLACEMENT_TIMEOUT_ENV = "DREAMBOOTH_PLACEMENT_TIMEOUT_S"  # how the controller's setting reaches a job's trainer


class PlacementTimeout(RuntimeError):
    """Ray could not place a job's workers in time: no node has room for one, the placement strategy cannot be met,
    or work outside the controller holds the resources. (Waiting on, the job would hold its share of the cluster
    and its tenant's slot, showing no progress, until max_job_run_s.)"""
