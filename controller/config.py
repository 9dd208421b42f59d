"""The controller's configuration: one typed dataclass, loadable from YAML, with tenants and their tokens."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from sqlalchemy.engine import URL

from dreambooth.errors import PLACEMENT_TIMEOUT_S, InputError, refuse_unknown
from dreambooth.paths import expand_user
from dreambooth.yaml_load import error_without_text, load_yaml
from serving.config import ServeConfig

MIN_TOKEN_CHARS = 8


@dataclass(frozen=True)
class Tenant:
    name: str
    tokens: tuple[str, ...]
    max_running_jobs: int = 2
    """Jobs of this tenant running on the cluster at once; more wait in the queue."""
    max_queued_jobs: int = 1000
    """Jobs of this tenant not yet ended; a submission beyond it is RESOURCE_EXHAUSTED."""

    def __post_init__(self):
        if not 0 < len(self.name) <= 128:  # the store's tenant columns
            raise InputError(f"tenants.{self.name[:40]}", "a tenant's name must be 1-128 characters")
        # A YAML string instead of a list would iterate into one-character tokens, each authenticating as the tenant.
        field = f"tenants.{self.name}.tokens"
        if not isinstance(self.tokens, list | tuple):
            # The type, not the value: the message goes to logs more people read than the config's Secret.
            kind = type(self.tokens).__name__
            raise InputError(field, f"must be a list of tokens, e.g. [{'x' * MIN_TOKEN_CHARS}], not a {kind}")
        for token in self.tokens:
            if not isinstance(token, str) or len(token) < MIN_TOKEN_CHARS or token.split() != [token]:
                raise InputError(field, f"each token must be a string of {MIN_TOKEN_CHARS}+ characters, no spaces")
        object.__setattr__(self, "tokens", tuple(self.tokens))
        # A quoted number ('2') compared with a count stopped every reconcile pass's scheduling, every tenant's.
        for limit in ("max_running_jobs", "max_queued_jobs"):
            value = getattr(self, limit)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise InputError(f"tenants.{self.name}.{limit}", f"must be a whole number >= 0, not {value!r}")


@dataclass
class ControllerConfig:
    storage: Path
    """Storage root shared with every Ray node (jobs/, models/, cache/, .controller-clock): see trainer/storage.py."""
    listen: str = "127.0.0.1:50051"
    database_url: str = ""
    """SQLAlchemy URL; default: SQLite at <storage>/controller.db. PostgreSQL: postgresql+psycopg://... SQLite needs
    a local disk: with storage on a network file system, name a local path (the controller warns otherwise)."""
    ray_dashboard_url: str = "http://127.0.0.1:8265"
    """Ray's dashboard, for the Jobs API (one Ray job per training attempt)."""
    tenants: tuple[Tenant, ...] = ()
    """Bearer tokens by tenant. None configured: no authentication, one tenant "default" (local use only) whose
    running jobs only the cluster's capacity bounds."""
    readable_paths: tuple[Path, ...] = ()
    """With tenants: the directories whose files a job spec may name (base models, photos on shared storage).
    Anything else is PERMISSION_DENIED, so that no tenant reads another's uploads or the controller's files.
    Without tenants (local use) any path may be named. Photos named by path are copied into the job when it is
    submitted; a base model is read when the job runs: keep base models where tenants cannot write (one who can
    could swap a link after the check, for another tenant's model)."""
    metrics_listen: str = "127.0.0.1:9464"
    """Prometheus /metrics; empty string: off."""
    health_listen: str = ""
    """A port of its own for grpc.health.v1's Check, in plaintext, for probes (Kubernetes' kubelet): not the tenants'
    (`listen`), where health needs no token and so shares a few slots with anyone's calls, a few held open enough to
    fail every probe, and where TLS fails the kubelet's. Keep it off the network tenants reach. Empty: none."""
    tls_cert: Path | None = None
    tls_key: Path | None = None
    reconcile_interval_s: float = 0.5
    max_attempts: int = 3
    """Ray job submissions per training job: a driver that dies is resubmitted and resumes from its checkpoint.
    A submission that failed (Ray unreachable) is repeated as the same attempt and does not count, unless the
    controller restarted in between (it then counts: the safe side)."""
    max_job_run_s: float | None = 24 * 3600.0
    """A job still running this long after it started is stopped and ends FAILED (RUN_TIME_EXCEEDED): a hung worker
    (a stuck collective, a deadlocked data loader) would otherwise hold its GPUs and its tenant's slot for ever.
    Counted from when Ray first accepted an attempt of it (not while its submission could not reach Ray), over every
    attempt, waiting on the cluster for its workers included; an exporting job is let finish. None: no limit."""
    placement_timeout_s: float = PLACEMENT_TIMEOUT_S
    """How long a started job's workers may wait for Ray to place them before it fails (PLACEMENT_TIMEOUT): its
    class-image actors get all of it (placed and the base model loaded); Ray Train gets 3 starts of its workers of a
    third each, counted over the run (a restart after a worker failure gets those left). The scheduler counts the
    cluster's totals, and a worker bigger than any node, a placement strategy the nodes cannot meet, or work outside
    this controller holding the resources would keep it waiting, with no sign, until max_job_run_s. Long enough for an
    autoscaler to add nodes."""
    max_request_bytes: int = 80 * 1024 * 1024
    max_submits_per_tenant: int = 16
    """With tenants: SubmitJob calls of one tenant in progress at once, each holding its photos in memory (up to
    max_request_bytes, and about as much again parsed) while it waits for its turn to decode them; more:
    RESOURCE_EXHAUSTED before their photos are read (bench/upload_memory.py: 48 submissions of 45 MiB at once
    took the controller +3.8 GiB without this limit, +1.9 GiB with 16)."""
    max_calls_per_tenant: int = 8
    """With tenants: one tenant's other calls being read or answered at once (a WatchJob while its request is read):
    any request may carry up to max_request_bytes, in fields its method does not know, so these bound what one
    tenant's calls hold in memory too (40 GetJob calls of 75 MiB each took the controller to 2.4 GB before); more:
    RESOURCE_EXHAUSTED before their request is read."""
    max_watches: int = 256
    """WatchJob streams open at once (each holds a server thread while its job runs); more: RESOURCE_EXHAUSTED.
    The server's other calls have threads of their own, so open watches never starve them (or health checks)."""
    max_watches_per_tenant: int = 64
    """Of those, what one tenant may hold: one tenant watching many queued jobs must not refuse everyone else's.
    Without tenants (one user), all of them."""
    max_image_bytes: int = 16 * 1024 * 1024
    max_images_bytes: int = 64 * 1024 * 1024
    """Uploaded photos, each and all of a request's together (they are in its memory)."""
    max_named_image_bytes: int = 256 * 1024 * 1024
    """A photo named by path on shared storage, copied into the job at submission in chunks (a camera's 45 MP JPEG
    is ~25 MB; an image of more than 64 megapixels is refused anyway)."""
    max_named_images_bytes: int = 1024 * 1024 * 1024
    """All the photos a request names by path, copied: a sparse file costs its tenant no disk, its copies do."""
    capacity_cpus: float | None = None
    """The cluster's CPUs/GPUs, each instead of the alive nodes' total (default: that total); on an autoscaling
    cluster, what it may grow to. Training gets them less what serving's max_replicas may hold. Where set, a job
    that needs more than that is refused at submission (INVALID_ARGUMENT) rather than queued for ever;
    `capacity_cpus: 0` pauses training (jobs queue, none starts)."""
    capacity_gpus: float | None = None
    serving: ServeConfig | None = None
    """Ray Serve for deployed models (the `serving:` section, every setting: serving/config.py); None: no serving,
    DeployModel answers FAILED_PRECONDITION."""
    serving_check_interval_s: float = 30.0
    """How often the controller checks that the Serve application exists, and deploys the deployed models again
    when Ray lost it (a restarted Ray cluster)."""

    def __post_init__(self):
        _check_seconds("placement_timeout_s", self.placement_timeout_s)
        if (self.tls_cert is None) != (self.tls_key is None):
            # Half of TLS served plaintext, without a word: clients would send their bearer tokens in the clear.
            missing = "tls_key" if self.tls_key is None else "tls_cert"
            raise InputError(missing, "missing: TLS needs both tls_cert and tls_key (or neither, for plaintext)")
        if self.max_job_run_s is not None:
            _check_seconds("max_job_run_s", self.max_job_run_s, ", or null for no limit")
        # The controller takes a token's first tenant, serving its last: one token naming two would be two people.
        owner: dict[str, str] = {}
        for tenant in self.tenants:
            for token in tenant.tokens:
                if owner.setdefault(token, tenant.name) != tenant.name:
                    raise InputError(
                        f"tenants.{tenant.name}.tokens", f"a token of {owner[token]!r} too: one tenant each"
                    )
        storage = Path(self.storage).resolve()
        for readable in self.readable_paths if self.tenants else ():
            readable = Path(readable).resolve()
            if storage.is_relative_to(readable) or readable.is_relative_to(storage):
                raise InputError(
                    "readable_paths",
                    f"{readable} holds or is inside storage ({storage}): tenants could train on each other's photos "
                    "and models; name the base models' directory",
                )

    @property
    def effective_database_url(self) -> str:
        # Built, not formatted: SQLAlchemy decodes %XX in a URL and ends the path at '?', which moved the database
        # out of a storage named so.
        database = Path(self.storage).resolve() / "controller.db"
        return self.database_url or URL.create("sqlite", database=str(database)).render_as_string()

    @classmethod
    def load(
        cls, paths: str | Path | Sequence[str | Path], overrides: dict[str, Any] | None = None
    ) -> ControllerConfig:
        """The settings in the YAML file(s) at `paths`, each one's top-level keys replacing the earlier ones' (on
        Kubernetes, the ConfigMap's settings, then the Secret's tenants and database URL), each one's relative paths
        from its own folder; then `overrides` (the command line's)."""
        files = [Path(paths)] if isinstance(paths, str | Path) else [Path(p) for p in paths]
        data: dict[str, Any] = {}
        for path in files:
            data.update(_settings_in(path))
        tenants = tuple(_tenant(name, fields) for name, fields in (data.pop("tenants", None) or {}).items())
        refuse_unknown(data, (f.name for f in dataclasses.fields(cls)), "controller setting(s)")
        if "serving" in data:
            data["serving"] = ServeConfig.from_dict(data["serving"] or {})
        data.update(overrides or {})
        if not data.get("storage"):
            named = " nor ".join(map(str, files))
            raise InputError(
                "storage", f"{named} names no storage (the root every Ray node shares): add `storage: PATH`"
            )
        return cls(tenants=tenants, **data)


def _settings_in(path: Path) -> dict[str, Any]:
    """One config file's settings, its paths made absolute from its folder."""
    try:
        data = load_yaml(path.read_text()) or {}
    except yaml.YAMLError as e:  # not its text: the tenants' tokens may be on the lines it would quote
        raise InputError("config", f"{path} is not YAML: {error_without_text(e)}") from None
    if not isinstance(data, dict):
        raise InputError("config", f"{path} holds a {type(data).__name__}, not a mapping of settings")
    if "readable_paths" in data:
        readable = data["readable_paths"] or ()
        data["readable_paths"] = tuple((path.parent / expand_user(p, "readable_paths")).resolve() for p in readable)
    for key in ("storage", "tls_cert", "tls_key"):
        if data.get(key):
            data[key] = (path.parent / expand_user(data[key], key)).resolve()
    return data


def _tenant(name: str, fields: dict | None) -> Tenant:
    fields = dict(fields or {})
    refuse_unknown(
        fields, (f.name for f in dataclasses.fields(Tenant) if f.name != "name"), "setting(s)", f"tenants.{name}."
    )
    if not fields.get("tokens"):
        raise InputError(f"tenants.{name}.tokens", "missing: a tenant needs at least one bearer token")
    return Tenant(name=str(name), **fields)


def _check_seconds(name: str, value: Any, alternative: str = "") -> None:
    # YAML's `true` is an int to Python, and would be 1 s; a quoted "1800" would fail far from here.
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise InputError(name, f"must be a number of seconds > 0{alternative}, not {value!r}")
