"""What the controller's clients of Ray's dashboard (its Jobs API, Serve's REST API) share, and the environment of
what this project runs on Ray."""

from __future__ import annotations

from typing import Any

# Environment for every Ray worker this project starts (training drivers and workers, class-image actors, Serve
# replicas), whoever starts them (the controller, `dreambooth train`, the local stack): model files are local paths,
# never fetched from a hub; tokenizers used in forked worker processes stay single-threaded.
WORKER_ENV = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


class RequestTimeout:
    """Mixin for Ray's dashboard SDK clients: their requests carry no timeout, so a dashboard that accepts
    connections but never answers (a hung or unreachable head) would block the controller for ever. Put it
    first among the bases; `timeout_s` is set by the subclass."""

    timeout_s: float = 30.0

    def _do_request(self, method: str, endpoint: str, **kwargs: Any) -> Any:
        kwargs.setdefault("timeout", self.timeout_s)
        return super()._do_request(method, endpoint, **kwargs)
