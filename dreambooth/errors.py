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
