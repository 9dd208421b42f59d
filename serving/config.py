"""The serving configuration: one typed dataclass for the Serve application, its replicas and request limits.

The controller holds one (the `serving:` section of its YAML) and turns it into a Ray Serve application config
(serving/deployer.py); the replicas get it back as `build_app`'s arguments.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from dreambooth.errors import InputError, refuse_unknown

PROMPT_CHARS_CAP = 10_000
"""The most `limits.max_prompt_chars` may be: CLIP's 77 tokens are far fewer characters, refused after tokenizing."""
MAX_BODY_BYTES = 2 * 12 * PROMPT_CHARS_CAP + 16 * 1024
"""The cap on a request's body (413 beyond), checked as it arrives: FastAPI reads a body whole before its handler
checks the token. It holds two prompts at the cap, each character JSON-escaped as a surrogate pair (12 bytes)."""
LOAD_TIMEOUT_S = 600
"""A request waits this long for its model's load, then gets a 503 (a GPU's seconds; a cold torch.compile of a new
architecture's UNet, minutes): Serve holds its replica's one model-loading lock through it, so a load hung on a file
system that stopped answering would keep every other model from loading on that replica, for ever. Here, not in
serving/generator.py, so that the HTTP client (dreambooth/serving_client.py) waits longer without importing Serve."""
SAMPLING_S = 300
"""The longest a request is expected to sample once its model is loaded: what a replica's shutdown and a model's
eviction wait for, and what the HTTP client waits beyond LOAD_TIMEOUT_S."""


@dataclass(frozen=True)
class RequestLimits:
    """Bounds on one HTTP request; anything outside gets a 400 saying which bound."""

    max_steps: int = 100
    max_images: int = 4
    """Images per request; at most `max_batch_size` (a request is never split across batches)."""
    max_side: int = 1024
    """Width and height in pixels, each; both must also be multiples of 8."""
    min_side: int = 64
    max_prompt_chars: int = 2000
    """Checked before tokenizing; the text encoder's 77-token context is checked after."""
    max_guidance_scale: float = 30.0


@dataclass(frozen=True)
class ServeConfig:
    app_name: str = "dreambooth"
    route_prefix: str = "/"
    http_host: str = "127.0.0.1"
    http_port: int = 8000
    proxy_location: str = "HeadOnly"
    """Where Serve runs HTTP proxies: HeadOnly (one machine, tests) or EveryNode (behind a load balancer)."""
    public_url: str = ""
    """Base URL clients reach the HTTP API at (behind a load balancer, say); default http://http_host:http_port."""
    device: str = "auto"
    """auto: cuda when the replica has a GPU (fp16 there), else cpu (fp32)."""
    gpus_per_replica: float = 0.0
    cpus_per_replica: float = 1.0
    min_replicas: int = 1
    max_replicas: int = 1
    target_ongoing_requests: float = 8.0
    """Autoscaling target per generator replica (used when max_replicas > min_replicas)."""
    max_models_per_replica: int = 4
    """Subject models each replica keeps loaded (least recently used evicted); base components are shared."""
    max_batch_size: int = 8
    """Images sampled together in one UNet forward (requests for one model and image size share it; a request
    that finds it full waits for room, checked between denoising steps). Also how many requests may wait on a
    replica for one model's load: the next are refused 503 with Retry-After (serving/generator.py)."""
    batch_wait_timeout_s: float = 0.01
    """How long `@serve.batch` waits for more requests before handing a group to the running batch. Short: a lone
    request waits this long before it starts, and one that misses a group joins it at the next denoising step."""
    compile_unet: bool = False
    """torch.compile the UNet for requests at the model's native size (512x512 for SD 1.5): faster batches (on
    an H100, 1.4x the images/s at 16 concurrent requests and a lone request 30 % faster), but a replica compiles
    before it takes requests (~2 minutes for SD 1.5 on an H100), and so does the first load of a model of another
    architecture."""
    max_ongoing_requests: int = 16
    """Requests in flight per generator replica (>= max_batch_size, or batches cannot fill)."""
    max_queued_requests: int = 64
    """Requests waiting for a replica, per caller; beyond it: 503 with Retry-After."""
    max_requests_per_tenant: int = 32
    """With tenants: generate requests one tenant may have in the ingress at once (sampling or waiting); more get 429
    with Retry-After, so that one tenant's burst cannot fill the queue every tenant shares (max_queued_requests)."""
    retry_after_s: int = 2
    body_timeout_s: float = 30.0
    """A request's body must have arrived this many seconds after its headers, else 408: one sent slowly holds a slot
    of the ingress (Serve hands it the request with its headers) before its token is checked."""
    limits: RequestLimits = RequestLimits()

    def __post_init__(self):
        checks = [
            ("http_port", 0 < self.http_port < 65536, "must be a TCP port (1-65535)"),
            ("route_prefix", self.route_prefix.startswith("/"), "must start with '/'"),
            # Serve refuses the application at deploy time otherwise (DEPLOY_FAILED), long after this check.
            ("route_prefix", self.route_prefix == "/" or not self.route_prefix.endswith("/"), "must not end with '/'"),
            (
                "public_url",
                bool(self.public_url) or self.http_host not in ("0.0.0.0", "::", ""),
                f"must be set when http_host is {self.http_host!r}: no client can reach the endpoints it would name",
            ),
            ("proxy_location", self.proxy_location in ("HeadOnly", "EveryNode"), "must be HeadOnly or EveryNode"),
            ("device", self.device in ("auto", "cpu", "cuda"), "must be auto, cpu or cuda"),
            ("gpus_per_replica", self.gpus_per_replica >= 0, "must be >= 0"),
            ("cpus_per_replica", self.cpus_per_replica >= 0, "must be >= 0"),
            ("min_replicas", self.min_replicas >= 1, "must be >= 1"),
            ("max_replicas", self.max_replicas >= self.min_replicas, "must be >= min_replicas"),
            ("target_ongoing_requests", self.target_ongoing_requests > 0, "must be > 0"),
            ("max_models_per_replica", self.max_models_per_replica >= 1, "must be >= 1"),
            ("max_batch_size", self.max_batch_size >= 1, "must be >= 1"),
            ("batch_wait_timeout_s", self.batch_wait_timeout_s >= 0, "must be >= 0"),
            ("max_ongoing_requests", self.max_ongoing_requests >= self.max_batch_size, "must be >= max_batch_size"),
            ("max_queued_requests", self.max_queued_requests >= 1, "must be >= 1"),
            ("max_requests_per_tenant", self.max_requests_per_tenant >= 1, "must be >= 1"),
            ("limits.max_images", 1 <= self.limits.max_images <= self.max_batch_size, "must be 1..max_batch_size"),
            ("retry_after_s", self.retry_after_s >= 0, "must be >= 0 (seconds, the Retry-After header)"),
            ("body_timeout_s", self.body_timeout_s > 0, "must be > 0 (seconds)"),
            # Schedulers refuse more inference steps than their 1000 training timesteps; a model whose scheduler
            # refuses fewer (SD 1.5's at 1000, LCM's above 50) answers such a request 400.
            ("limits.max_steps", 1 <= self.limits.max_steps <= 1000, "must be 1..1000"),
            ("limits.min_side", 8 <= self.limits.min_side <= self.limits.max_side, "must be 8..max_side"),
            ("limits.min_side", self.limits.min_side % 8 == 0, "must be a multiple of 8"),
            ("limits.max_side", self.limits.max_side % 8 == 0, "must be a multiple of 8"),
            (
                "limits.max_prompt_chars",
                1 <= self.limits.max_prompt_chars <= PROMPT_CHARS_CAP,
                f"must be 1..{PROMPT_CHARS_CAP}",
            ),
            ("limits.max_guidance_scale", self.limits.max_guidance_scale >= 0, "must be >= 0"),
        ]
        for field, ok, message in checks:
            if not ok:
                raise InputError(f"serving.{field}", message)

    @property
    def base_url(self) -> str:
        return (self.public_url or f"http://{self.http_host}:{self.http_port}").rstrip("/")

    def endpoint(self, model_id: str) -> str:
        """The URL that generates images of `model_id` (POST)."""
        return f"{self.base_url}{self.route_prefix.rstrip('/')}/v1/models/{model_id}/generate"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ServeConfig:
        data = dict(data)
        refuse_unknown(data, (f.name for f in dataclasses.fields(cls)), "serving setting(s)", "serving.")
        limits = data.pop("limits", None) or {}
        refuse_unknown(limits, (f.name for f in dataclasses.fields(RequestLimits)), "limit(s)", "serving.limits.")
        return cls(limits=RequestLimits(**limits), **data)
