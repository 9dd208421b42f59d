"""The controller process: gRPC server (jobs, models, health, reflection) + the reconciler + /metrics.

python -m controller.server --config controller.yaml [--config secret.yaml ...]
python -m controller.server --storage DIR [--listen 127.0.0.1:50051] [--ray-dashboard http://127.0.0.1:8265]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import signal
import sys
import threading
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import sqlalchemy as sa
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from controller import metrics, orphans
from controller.api import JobServicer, ModelServicer
from controller.config import ControllerConfig
from controller.database import ControllerRunning
from controller.feed import ChangeFeed
from controller.ray_jobs import RayJobs
from controller.reconciler import Reconciler
from controller.request_gate import Authenticator, RequestGate
from controller.service import JobService
from controller.serving import ServingSync
from controller.store import SchemaMismatch, Store
from dreambooth.errors import InputError, is_system_error
from dreambooth.paths import path_argument
from dreambooth.v1 import jobs_pb2, jobs_pb2_grpc, models_pb2, models_pb2_grpc
from serving.deployer import ServeDeployer

log = logging.getLogger(__name__)

UNARY_THREADS = 64
PROBE_THREADS = 4  # health_listen's: probes come every few seconds, each answered in a millisecond
UNARY_BACKLOG = 256  # unary calls in flight (running or waiting for a thread); beyond: RESOURCE_EXHAUSTED

SERVICE_NAMES = (
    jobs_pb2.DESCRIPTOR.services_by_name["JobService"].full_name,
    models_pb2.DESCRIPTOR.services_by_name["ModelService"].full_name,
)
SUBMIT_METHOD = f"/{SERVICE_NAMES[0]}/SubmitJob"
REFLECTION_METHOD = f"/{reflection.SERVICE_NAME}/ServerReflectionInfo"
# grpcurl and buf curl open one reflection stream per command; each holds an RPC thread while it is open.
REFLECTION_STREAMS_PER_TENANT = 4


@dataclass
class Controller:
    server: grpc.Server
    port: int
    reconciler: Reconciler
    health: health.HealthServicer
    service: JobService
    metrics_server: object | None
    database_hold: contextlib.ExitStack  # this controller's claim on its database
    health_server: grpc.Server | None = None  # health_listen's
    health_port: int = 0
    shutting_down: threading.Event = field(default_factory=threading.Event)  # ends open watches

    def stop(self, grace_s: float = 10) -> None:
        """Graceful: refuse new calls, end open watches (UNAVAILABLE: their clients watch again), let running calls
        finish (up to grace_s), then stop the loop."""
        self.health.enter_graceful_shutdown()
        self.shutting_down.set()
        self.server.stop(grace_s).wait()
        if self.health_server is not None:
            self.health_server.stop(0)
        reconciler_stopped = self.reconciler.stop()
        if self.service.serving is not None:
            self.service.serving.stop()
        if self.metrics_server is not None:
            self.metrics_server.shutdown()
        if reconciler_stopped:
            self.database_hold.close()
        else:  # a controller started next would reconcile beside the pass still running here
            log.warning("a reconcile pass is still running: the database stays held until this process exits")


def _per_tenant_limits(config: ControllerConfig) -> dict[str, tuple[int, str]]:
    return {
        SUBMIT_METHOD: (config.max_submits_per_tenant, "max_submits_per_tenant"),
        REFLECTION_METHOD: (REFLECTION_STREAMS_PER_TENANT, "server reflection streams per tenant"),
    }


def start(config: ControllerConfig) -> Controller:
    Path(config.storage).mkdir(parents=True, exist_ok=True)
    store = Store(config.effective_database_url, create=False)
    held = contextlib.ExitStack()
    try:
        still_holds_database = held.enter_context(store.hold_for_one_controller())
        store.create_all()
        return _start(config, store, held, still_holds_database)
    except BaseException:
        held.close()
        store.close()
        raise


def _start(
    config: ControllerConfig, store: Store, held: contextlib.ExitStack, still_holds_database: Callable[[], bool]
) -> Controller:
    feed = ChangeFeed()
    ray_jobs = RayJobs(
        config.ray_dashboard_url,
        storage_root=str(Path(config.storage).resolve()),
        placement_timeout_s=config.placement_timeout_s,
    )
    serving = None
    if config.serving:
        deployer = ServeDeployer(config.ray_dashboard_url, config.serving)
        tokens = {tenant.name: tenant.tokens for tenant in config.tenants}
        serving = ServingSync(store, deployer, tokens, check_interval_s=config.serving_check_interval_s)
    service = JobService(config, store, ray_jobs, feed, serving)
    reconciler = Reconciler(config, store, ray_jobs, feed, service, still_holds_database)
    if not config.tenants:
        log.warning("no tenants configured: authentication is OFF (everyone is tenant 'default')")
    auth = Authenticator(service, open_access=not config.tenants)
    # A submission's checks load diffusers and transformers: seconds, tens on a loaded machine, which the first
    # submission paid within its deadline (the SDK's 30 s ran out in a demo beside other work). Imported meanwhile.
    threading.Thread(
        target=importlib.import_module, args=("dreambooth.sd_model",), name="import-checks", daemon=True
    ).start()

    server = grpc.server(
        # Unary calls keep UNARY_THREADS of their own however many watches are open (each holds a thread).
        futures.ThreadPoolExecutor(max_workers=config.max_watches + UNARY_THREADS, thread_name_prefix="rpc"),
        options=[
            ("grpc.max_receive_message_length", config.max_request_bytes),
            ("grpc.max_send_message_length", 16 * 1024 * 1024),
            # Clients' watches ping every 30 s (the SDK's keepalive); gRPC's default would take pings more often
            # than every 5 min on a quiet stream as abuse and drop the connection.
            ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
            # And the server pings quiet watchers: a client gone without a word (its host crashed) frees its watch
            # slot, of max_watches, within minutes rather than holding it for good.
            ("grpc.keepalive_time_ms", 120_000),
            ("grpc.keepalive_timeout_ms", 20_000),
            ("grpc.http2.ping_timeout_ms", 20_000),  # what this gRPC waits for the answer (default 60 s)
            ("grpc.http2.max_pings_without_data", 0),  # else it stops after 2 pings on a quiet stream
            # gRPC sets SO_REUSEPORT by default: a second controller (another database) would share the port with
            # this one, each getting some of the clients. Refused instead.
            ("grpc.so_reuseport", 0),
        ],
        maximum_concurrent_rpcs=config.max_watches + UNARY_BACKLOG,
        interceptors=[
            RequestGate(
                auth,
                (*SERVICE_NAMES, reflection.SERVICE_NAME),
                _per_tenant_limits(config),
                (config.max_calls_per_tenant, "max_calls_per_tenant"),
                open_services=(health.SERVICE_NAME,),
            )
        ]
        if config.tenants
        else [],
    )
    # Without tenants, one user has every watch (`dreambooth up`'s 65th watch was refused for a tenant of one).
    per_tenant = config.max_watches_per_tenant if config.tenants else config.max_watches
    shutting_down = threading.Event()
    jobs = JobServicer(service, auth, config.max_watches, per_tenant, shutting_down)
    jobs_pb2_grpc.add_JobServiceServicer_to_server(jobs, server)
    models_pb2_grpc.add_ModelServiceServicer_to_server(ModelServicer(service, auth), server)
    health_servicer = KnownServicesHealth()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in (*SERVICE_NAMES, ""):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection((*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), server)

    try:
        if config.tls_cert and config.tls_key:
            credentials = grpc.ssl_server_credentials([(config.tls_key.read_bytes(), config.tls_cert.read_bytes())])
            port = server.add_secure_port(config.listen, credentials)
        else:
            port = server.add_insecure_port(config.listen)
    except RuntimeError:  # gRPC's "Failed to bind to address"
        port = 0
    if port == 0:
        raise OSError(f"listen: cannot listen on {config.listen} (in use, or not an address of this machine)")
    health_server, health_port = None, 0
    if config.health_listen:
        health_server, health_port = _probes_server(config.health_listen, health_servicer)
    try:
        metrics_server = metrics.serve(config.metrics_listen)[0] if config.metrics_listen else None
    except OSError as e:
        raise OSError(f"metrics_listen: cannot listen on {config.metrics_listen}: {e.strerror or e}") from e
    orphans.sweep(config.storage, store)  # before any submission starts (controller.orphans)
    reconciler.start()
    if serving is not None:
        serving.start()
    server.start()
    if health_server is not None:
        health_server.start()
    log.info("controller listening on %s (port %d), storage %s", config.listen, port, config.storage)
    return Controller(
        server,
        port,
        reconciler,
        health_servicer,
        service,
        metrics_server,
        held,
        health_server,
        health_port,
        shutting_down,
    )


class ProbeHealth(health_pb2_grpc.HealthServicer):
    """health_listen's: the controller's health Check, no Watch (a probe checks; a watch would hold one of the few
    threads for good)."""

    def __init__(self, checked: health.HealthServicer):
        self._checked = checked

    def Check(self, request, context):
        return self._checked.Check(request, context)

    def Watch(self, request, context):
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "probes Check; Watch on the controller's own port")


def _probes_server(listen: str, checked: health.HealthServicer) -> tuple[grpc.Server, int]:
    """A gRPC server of health Check alone, for probes: a few threads, requests of a few bytes."""
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=PROBE_THREADS, thread_name_prefix="probe"),
        options=[("grpc.max_receive_message_length", 1024), ("grpc.so_reuseport", 0)],
        maximum_concurrent_rpcs=2 * PROBE_THREADS,
    )
    health_pb2_grpc.add_HealthServicer_to_server(ProbeHealth(checked), server)
    try:
        port = server.add_insecure_port(listen)
    except RuntimeError:  # gRPC's "Failed to bind to address"
        port = 0
    if port == 0:
        raise OSError(f"health_listen: cannot listen on {listen} (in use, or not an address of this machine)")
    return server, port


class KnownServicesHealth(health.HealthServicer):
    """grpc.health.v1 whose Watch answers only for this server's services (NOT_FOUND otherwise): gRPC's own keeps an
    entry for every name ever watched, of up to max_request_bytes, for good (a caller needing no token grew the
    controller's memory by the name)."""

    KNOWN = frozenset((*SERVICE_NAMES, ""))

    def Watch(self, request, context, send_response_callback=None):
        if request.service not in self.KNOWN:
            context.abort(grpc.StatusCode.NOT_FOUND, "no such service here")
        return super().Watch(request, context, send_response_callback)


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="dreambooth controller", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--config",
        type=path_argument,
        action="append",
        help="controller YAML (see controller/config.py); given again, its top-level keys replace the earlier file's",
    )
    # Each replaces its config key (named) over every --config file.
    parser.add_argument(
        "--storage", type=path_argument, help="root of jobs, models and caches, shared by every node (storage)"
    )
    parser.add_argument("--listen", help="gRPC address, host:port (listen; default 127.0.0.1:50051)")
    parser.add_argument("--ray-dashboard", help="Ray dashboard URL, for its Jobs API (ray_dashboard_url)")
    parser.add_argument("--metrics-listen", help="Prometheus /metrics address, host:port; '' for none (metrics_listen)")
    args = parser.parse_args(argv)
    if not args.config and not args.storage:
        parser.error("give --config or --storage")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_arguments(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    flags = {
        "storage": "storage",
        "listen": "listen",
        "ray_dashboard": "ray_dashboard_url",
        "metrics_listen": "metrics_listen",
    }
    overrides = {field: getattr(args, flag) for flag, field in flags.items() if getattr(args, flag) is not None}
    try:
        config = ControllerConfig.load(args.config, overrides) if args.config else ControllerConfig(**overrides)
        controller = start(config)
    except InputError as e:  # a setting to fix, named
        print(f"error: {e.field}: {e.message}", file=sys.stderr)
        return 2
    except (OSError, SchemaMismatch) as e:  # config file missing, port taken, storage unwritable; a later database
        print(f"error: {e}", file=sys.stderr)
        # The storage's passing trouble (an NFS server restarting, a full disk) is worth a restart.
        return 1 if is_system_error(e) else 2
    except ControllerRunning as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except sa.exc.DBAPIError as e:
        # A database server down or unreachable is worth a restart; a SQLite file that cannot be opened, or a role
        # without the rights to make the tables, a setting to fix.
        unreachable = isinstance(e, sa.exc.OperationalError) and not config.effective_database_url.startswith("sqlite")
        print(f"error: database_url: {'unavailable' if unreachable else 'unusable'}: {e.orig or e}", file=sys.stderr)
        return 1 if unreachable else 2
    stopping = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stopping.set())
    print(f"controller ready on port {controller.port}", flush=True)
    while not stopping.wait(1):
        if controller.reconciler.database_lost.is_set():
            # Another controller may hold the database now: stop, and let whatever runs this one start it again
            # (it then waits its turn for the database, or finds it free).
            print("error: this controller lost its hold on the database; stopping", file=sys.stderr)
            controller.stop()
            return 1
    controller.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
