"""What the controller's clients of Ray's dashboard (its Jobs API, Serve's REST API) share."""

from __future__ import annotations

from typing import Any


class RequestTimeout:
    """Mixin for Ray's dashboard SDK clients: their requests carry no timeout, so a dashboard that accepts
    connections but never answers (a hung or unreachable head) would block the controller for ever. Put it
    first among the bases; `timeout_s` is set by the subclass."""

    timeout_s: float = 30.0

    def _do_request(self, method: str, endpoint: str, **kwargs: Any) -> Any:
        kwargs.setdefault("timeout", self.timeout_s)
        return super()._do_request(method, endpoint, **kwargs)
