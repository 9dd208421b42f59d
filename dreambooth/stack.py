"""The local stack: a Ray head, the controller and the Serve application on this machine, started in the
background by `dreambooth up`, stopped by `dreambooth down`, inspected by `dreambooth status`.

    dreambooth-stack/                the stack's directory (--dir)
      state.json                     what `down` and `status` read: process ids and addresses
      controller.yaml                the controller's config: storage, Ray's dashboard, the `serving:` section
      prometheus.yml                 deploy/prometheus/prometheus.yml pointed at this stack
      logs/ray.log, logs/controller.log
      storage/                       the storage root: jobs/, models/, cache/, controller.db

Every listener is on 127.0.0.1, which the stack's processes and this one reach without the environment's HTTP
proxy. Each component runs in a process session of its own, so that stopping it
reaches every process it started (Ray's GCS, raylet, agents and workers) and nothing else: `ray stop` would
stop every Ray on the machine.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import socket
import stat
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from dreambooth import process_sessions
from dreambooth.durable import write_file

PROJECT_ROOT = Path(__file__).resolve().parents[1]
PROMETHEUS_YML = PROJECT_ROOT / "deploy" / "prometheus" / "prometheus.yml"
DEFAULT_DIR = Path("dreambooth-stack")
HOST = "127.0.0.1"
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")
START_TIMEOUT_S = 300  # Ray, the controller and Serve's first replicas: about 40 s on 2 busy CPU cores
PROBE_TIMEOUT_S = 5  # one request to the dashboard when asking whether a component is up
# On one machine the Serve replicas share the CPUs and GPUs with training instead of reserving them, so that a
# training job never waits for them. A replica that reserves no GPU still sees every GPU (Ray 2.60 leaves
# CUDA_VISIBLE_DEVICES alone for it), so with real weights it samples on a GPU.
SERVING = {"cpus_per_replica": 0, "gpus_per_replica": 0}


class StackError(Exception):
    """The stack cannot start (or is already running); the message says why and what to do."""


@dataclass(frozen=True)
class Ports:
    """TCP ports on 127.0.0.1; 0 picks a free one, None the default's unless it is taken (then a free one)."""

    controller: int = 50051
    controller_metrics: int = 9464
    dashboard: int = 8265
    ray_metrics: int = 8080
    serve: int = 8000


PORT_USES = {
    "controller": "the controller's gRPC API",
    "controller_metrics": "the controller's /metrics",
    "dashboard": "Ray's dashboard and Jobs API",
    "ray_metrics": "Ray's /metrics",
    "serve": "Ray Serve's HTTP API",
}


@dataclass
class Stack:
    """A started stack, as state.json records it."""

    dir: str
    storage: str
    ray_temp_dir: str
    ray_address: str
    """Ray's GCS (`ray status --address ...`)."""
    dashboard_url: str
    ray_metrics: str
    controller: str
    """The controller's gRPC address, host:port."""
    controller_metrics: str
    serve_url: str
    serving: dict[str, Any]
    """The controller's `serving:` section."""
    processes: dict[str, tuple[int, int]]
    """Component name -> (pid, start time in clock ticks): a session leader, told apart from a reused pid."""
    started_at: float

    @property
    def serve_config(self):
        from serving.config import ServeConfig

        return ServeConfig.from_dict(self.serving)

    def addresses(self) -> list[tuple[str, str]]:
        return [
            ("controller (gRPC)", self.controller),
            ("controller metrics", f"http://{self.controller_metrics}/metrics"),
            ("Ray dashboard", self.dashboard_url),
            ("Ray metrics", f"http://{self.ray_metrics}/metrics"),
            ("Serve HTTP API", f"{self.serve_url}/v1/models"),
            ("storage", self.storage),
            ("logs", str(Path(self.dir) / "logs")),
            ("Ray's logs", str(Path(self.ray_temp_dir) / "session_latest" / "logs")),
        ]


@dataclass(frozen=True)
class Component:
    name: str
    address: str
    up: bool
    detail: str = ""


def _state_file(state_dir: Path) -> Path:
    return Path(state_dir) / "state.json"


def load(state_dir: Path) -> Stack | None:
    """The stack recorded in `state_dir`, running or not; None when there is none."""
    path = _state_file(state_dir)
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
        data["processes"] = {name: tuple(p) for name, p in data["processes"].items()}
        return Stack(**data)
    except (ValueError, KeyError, TypeError, AttributeError) as e:  # truncated, or written by another version
        raise StackError(
            f"{path} is unreadable ({type(e).__name__}: {e}), so the stack's processes cannot be found from it: "
            f"stop any that run (their logs are in {Path(state_dir) / 'logs'}) and delete the file"
        ) from e


def running(state_dir: Path) -> Stack | None:
    """The stack of `state_dir` when any of its processes is alive."""
    stack = load(state_dir)
    return stack if stack is not None and any(process_sessions.alive(*p) for p in stack.processes.values()) else None


def up(
    state_dir: Path = DEFAULT_DIR,
    *,
    ports: Ports = Ports(),
    storage: Path | None = None,
    num_cpus: int | None = None,
    say: Callable[[str], None] = lambda message: None,
) -> Stack:
    """Starts Ray, then the controller (which deploys the Serve application), and returns once the controller
    answers and the application is RUNNING; `say` hears what it is waiting for. Raises StackError when a stack
    already runs in `state_dir` or a component does not come up (the others are stopped again)."""
    from dreambooth.local_ray import ensure_ray_token

    _no_proxy_here()
    state_dir = Path(state_dir).resolve()
    if (current := running(state_dir)) is not None:
        raise StackError(
            f"a stack is already running in {state_dir} (controller {current.controller}): "
            f"stop it first with `dreambooth down --dir {state_dir}`"
        )
    chosen = _choose_ports(ports)
    storage = Path(storage).resolve() if storage else _last_storage(state_dir) or state_dir / "storage"
    logs = state_dir / "logs"
    for directory in (storage, logs):
        directory.mkdir(parents=True, exist_ok=True)
    private_parent(ray_temp_dir(state_dir))
    serving = {"http_host": HOST, "http_port": chosen.serve, **SERVING}
    stack = Stack(
        dir=str(state_dir),
        storage=str(storage),
        ray_temp_dir=str(ray_temp_dir(state_dir)),
        ray_address=f"{HOST}:{free_port()}",
        dashboard_url=f"http://{HOST}:{chosen.dashboard}",
        ray_metrics=f"{HOST}:{chosen.ray_metrics}",
        controller=f"{HOST}:{chosen.controller}",
        controller_metrics=f"{HOST}:{chosen.controller_metrics}",
        serve_url=f"http://{HOST}:{chosen.serve}",
        serving=serving,
        processes={},
        started_at=time.time(),
    )
    process_env = _process_env()
    deadline = time.monotonic() + START_TIMEOUT_S
    try:
        say(f"starting Ray (dashboard {stack.dashboard_url}) ...")
        ensure_ray_token()
        # Ray's processes find the State API through /tmp/ray's record of the last `ray start`, not the stack's
        # own --temp-dir: Ray Train's placement-group cleaner asked a dead cluster and held every job's end 12 s.
        ray_env = {**process_env, "RAY_API_SERVER_ADDRESS": stack.dashboard_url}
        stack.processes["ray"] = process_sessions.spawn(
            _ray_command(stack, chosen, num_cpus), logs / "ray.log", ray_env
        )
        _save(stack)  # from here on, `down` finds what was started, even if this process is killed
        _wait_until("Ray's Jobs API", lambda: _jobs_api_answers(stack), stack, deadline)

        capacity = _wait_for_capacity(stack, deadline)
        config = state_dir / "controller.yaml"
        # Whole or not at all: the next `up` reads its storage from it (a file cut short by a full disk started an
        # empty controller on DIR/storage, the jobs left where they were).
        write_file(config, yaml.safe_dump(_controller_config(stack, capacity), sort_keys=False))
        say(f"starting the controller ({stack.controller}) ...")
        stack.processes["controller"] = process_sessions.spawn(
            _controller_command(config), logs / "controller.log", process_env
        )
        _save(stack)
        _wait_until("the controller", lambda: _controller_serving(stack.controller), stack, deadline)

        say(f"deploying the Serve application ({stack.serve_url}) ...")
        _wait_until("the Serve application", lambda: _serve_running(stack), stack, deadline)
        if PROMETHEUS_YML.exists():
            scrape = prometheus_config(stack.controller_metrics, ray_targets_file(state_dir))
            (state_dir / "prometheus.yml").write_text(yaml.safe_dump(scrape, sort_keys=False))
    except BaseException:
        _stop(stack)
        _state_file(state_dir).unlink(missing_ok=True)
        raise
    return stack


def _last_storage(state_dir: Path) -> Path | None:
    """The storage of the last stack started in `state_dir` (its controller.yaml stays after `down`): a plain `up`
    starts again where `up --storage X` left its jobs and models."""
    path = state_dir / "controller.yaml"
    try:
        return Path(yaml.safe_load(path.read_text())["storage"])
    except FileNotFoundError:
        return None
    except (KeyError, TypeError, yaml.YAMLError) as e:  # not the file `up` writes: its jobs would be left behind
        raise StackError(
            f"{path} is unreadable ({type(e).__name__}: {e}), so the storage of the last stack started here is not "
            "known: give it with --storage, or delete the file to start on DIR/storage"
        ) from e


def down(state_dir: Path = DEFAULT_DIR) -> Stack | None:
    """Stops every process of the stack in `state_dir`; returns it, or None when there was none."""
    stack = load(Path(state_dir).resolve())
    if stack is None:
        return None
    _stop(stack)
    _state_file(stack.dir).unlink(missing_ok=True)
    return stack


def health(stack: Stack) -> list[Component]:
    """Each component, up or down, with its address."""
    _no_proxy_here()
    ray_up = process_sessions.alive(*stack.processes["ray"]) and _answers(lambda: _jobs_api_answers(stack))
    controller_up = process_sessions.alive(*stack.processes.get("controller", (0, 0))) and _answers(
        lambda: _controller_serving(stack.controller)
    )
    serve_status = ""
    if ray_up:
        with contextlib.suppress(Exception):  # the dashboard failing here is reported as "down"
            serve_status = _deployer(stack).status()
    return [
        Component("Ray", stack.dashboard_url, ray_up, f"GCS {stack.ray_address}"),
        Component("Ray metrics", f"http://{stack.ray_metrics}/metrics", _answers(lambda: _get(stack.ray_metrics))),
        Component("controller", stack.controller, controller_up),
        Component(
            "controller metrics",
            f"http://{stack.controller_metrics}/metrics",
            _answers(lambda: _get(stack.controller_metrics)),
        ),
        Component("Serve application", stack.serve_url, serve_status == "RUNNING", serve_status or "unknown"),
    ]


def prometheus_config(controller_metrics: str, ray_targets: Path, scrape_interval: str | None = None) -> dict[str, Any]:
    """deploy/prometheus/prometheus.yml pointed at a stack: its controller's /metrics (host:port) and the file
    where its Ray lists its metrics endpoints (ray_targets_file). Its rule files (the alerting rules) are named by
    their absolute paths: Prometheus reads a relative one from the written config's directory, which has no copy."""
    config = yaml.safe_load(PROMETHEUS_YML.read_text())
    config["rule_files"] = [str(PROMETHEUS_YML.parent / path) for path in config.get("rule_files", [])]
    if scrape_interval:
        config["global"].update(scrape_interval=scrape_interval, evaluation_interval=scrape_interval)
    for job in config["scrape_configs"]:
        if job["job_name"] == "dreambooth-controller":
            job["static_configs"] = [{"targets": [controller_metrics]}]
        elif job["job_name"] == "ray":
            for discovery in job["file_sd_configs"]:
                discovery["files"] = [str(ray_targets)]
    return config


def ray_temp_dir(state_dir: Path) -> Path:
    """Ray's own directory (sessions, logs, sockets) for the stack of `state_dir`. Not /tmp/ray, which every
    other Ray on the machine shares; short, because Ray's Unix socket paths under it must fit in 107 bytes: under
    TMPDIR where they do, else under /tmp (a TMPDIR such as /run/user/1000 or a batch system's per-job folder failed
    every `up`), in a shorter folder for a long uid. In a folder of this user's own (`private_parent`): Ray makes its
    folders writable by everyone, and another user could otherwise make the predictable name first, or replace the
    stack's sockets and files."""
    digest = hashlib.sha256(str(Path(state_dir).resolve()).encode()).hexdigest()[:8]
    uid = os.getuid()
    candidates = [
        Path(tempfile.gettempdir()) / f"dreambooth-{uid}" / f"r{digest}",
        Path("/tmp") / f"dreambooth-{uid}" / f"r{digest}",
        Path("/tmp") / f"db{uid}" / digest,
    ]
    return next((c for c in candidates if _fits_ray_sockets(c)), candidates[-1])


UNIX_SOCKET_PATH_MAX = 107
# Ray's longest socket path under its temp dir: its dashboard's module sockets (dash_<module>, TaskEventsHead the
# longest of Ray 2.60's), with a process id of 7 digits (Linux's pid_max may be 4194304), and room for a module
# name a few characters longer in a later Ray.
RAY_LONGEST_SOCKET = "/session_2026-11-28_14-41-11_156865_4194304/sockets/dash_TaskEventsHead" + "x" * 4


def _fits_ray_sockets(temp_dir: Path) -> bool:
    return len(str(temp_dir)) + len(RAY_LONGEST_SOCKET) <= UNIX_SOCKET_PATH_MAX


def private_parent(path: Path) -> None:
    """Makes `path`'s parent, this user's only (0700), or raises StackError where it is someone else's, a link, or
    open to others."""
    parent = path.parent
    with contextlib.suppress(FileExistsError):
        parent.mkdir(mode=0o700)
    info = parent.lstat()
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise StackError(
            f"{parent} must be a folder of this user's only (mode 0700), for Ray's files: another user's, a link or "
            "open to others is not used; remove it"
        )


def ray_targets_file(state_dir: Path) -> Path:
    """Where the stack's Ray keeps the list of its nodes' metrics endpoints, for Prometheus' file discovery
    (Ray links it to the current session's copy)."""
    return ray_temp_dir(state_dir) / "prom_metrics_service_discovery.json"


# --- starting -------------------------------------------------------------------------------------------------


def _ray_command(stack: Stack, ports: Ports, num_cpus: int | None) -> list[str]:
    ray = str(Path(sys.executable).with_name("ray"))
    command = [
        ray,
        "start",
        "--head",
        "--block",
        "--disable-usage-stats",
        f"--node-ip-address={HOST}",
        f"--port={stack.ray_address.rpartition(':')[2]}",
        "--include-dashboard=true",
        f"--dashboard-host={HOST}",
        f"--dashboard-port={ports.dashboard}",
        f"--metrics-export-port={ports.ray_metrics}",
        f"--temp-dir={stack.ray_temp_dir}",
        # Free ports for what would otherwise take fixed defaults (10001, 52365), so that two stacks coexist.
        f"--ray-client-server-port={free_port()}",
        f"--dashboard-agent-listen-port={free_port()}",
    ]
    return [*command, f"--num-cpus={num_cpus}"] if num_cpus else command


def _controller_command(config: Path) -> list[str]:
    # -P: not the working directory first on sys.path, where a project of the user's own `controller/`, `serving/`
    # or `trainer/` package replaced the stack's (the controller exited at start with an ImportError of theirs).
    return [sys.executable, "-P", "-m", "dreambooth.cli", "controller", "--config", str(config)]


def _process_env() -> dict[str, str]:
    from dreambooth.ray_dashboard import WORKER_ENV

    # Ray's single-machine mode (every Ray listener on 127.0.0.1, see dreambooth/local_ray.py), and Ray's token
    # authentication on, which every client of the dashboard (the controller, `up`, `status`) must then use.
    ray_env = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "token"}
    return {**os.environ, **WORKER_ENV, **ray_env, **_loopback_without_proxy(os.environ)}


def _loopback_without_proxy(environ: Mapping[str, str]) -> dict[str, str]:
    """NO_PROXY and no_proxy as `environ` has them (one missing: the other's value; tools read one or the other),
    with the loopback names added. An HTTP proxy the environment names (http_proxy: a company's) cannot reach this
    machine's 127.0.0.1, and no_proxy often lists localhost alone: Ray's dashboard clients, gRPC and urllib asked
    the proxy, which answered 502 until `up` gave up after minutes."""
    values = {}
    for name, other in (("NO_PROXY", "no_proxy"), ("no_proxy", "NO_PROXY")):
        listed = [host for host in (environ.get(name) or environ.get(other) or "").split(",") if host.strip()]
        values[name] = ",".join([*listed, *(host for host in LOOPBACK_NAMES if host not in listed)])
    return values


def _no_proxy_here() -> None:
    """This process's probes of the stack (Ray's clients, gRPC, urllib) bypass the environment's HTTP proxy too."""
    os.environ.update(_loopback_without_proxy(os.environ))


def _controller_config(stack: Stack, capacity) -> dict[str, Any]:
    return {
        "storage": stack.storage,
        "listen": stack.controller,
        "ray_dashboard_url": stack.dashboard_url,
        "metrics_listen": stack.controller_metrics,
        "serving": stack.serving,
        # One machine, which never grows: a job that needs more (a GPU on a machine without one) is refused at
        # submission instead of queued for ever.
        "capacity_cpus": capacity.cpus,
        "capacity_gpus": capacity.gpus,
    }


def _wait_for_capacity(stack: Stack, deadline: float):
    """The machine's CPUs and GPUs as its Ray node reports them: none for a moment after the Jobs API answers,
    until the node has registered (written as 0, they would pause training)."""
    from controller.ray_jobs import RayJobs

    _use_ray_token()
    ray_jobs = RayJobs(stack.dashboard_url, storage_root=stack.storage, timeout_s=PROBE_TIMEOUT_S)
    reported = []

    def registered() -> bool:
        reported.append(ray_jobs.cluster_capacity())
        return reported[-1].cpus > 0

    _wait_until("Ray's node resources", registered, stack, deadline)
    return reported[-1]


RAY_WORKER_PORTS = range(10002, 20000)  # `ray start`'s default --min-worker-port and --max-worker-port


def _choose_ports(ports: Ports) -> Ports:
    """The ports to listen on; every one given that cannot be, said at once with the option that sets it."""
    chosen, problems = {}, []
    given = {name: port for name, port in dataclasses.asdict(ports).items() if port}
    for name, port in dataclasses.asdict(ports).items():
        option = f"--{name.replace('_', '-')}-port"
        if port is None:
            default = getattr(Ports(), name)
            chosen[name] = default if default not in given.values() and _port_free(default) else free_port()
        elif port == 0:
            chosen[name] = free_port()
        elif RAY_WORKER_PORTS[0] <= port <= RAY_WORKER_PORTS[-1]:
            # `ray start` refuses one of its own ports there (a traceback), and takes the others for its workers.
            problems.append(
                f"port {port} for {PORT_USES[name]} ({option}) is in the range Ray keeps for its workers "
                f"({RAY_WORKER_PORTS[0]}-{RAY_WORKER_PORTS[-1]})"
            )
        elif list(given.values()).count(port) > 1:
            problems.append(f"port {port} for {PORT_USES[name]} ({option}) is given for another component too")
        elif not _port_free(port):
            problems.append(f"port {port} for {PORT_USES[name]} ({option}) is in use")
        else:
            chosen[name] = port
    if problems:
        raise StackError("; ".join(problems) + ": choose others (0 picks a free one)")
    return Ports(**chosen)


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        # As the servers bind: a port whose last connections linger in TIME_WAIT (a stack just stopped) is free;
        # one with a listener is not.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A free port, outside Ray's worker range (a system's ephemeral ports may start below it: 1024-65000)."""
    while True:
        with socket.socket() as s:
            s.bind((HOST, 0))
            port = s.getsockname()[1]
        if port not in RAY_WORKER_PORTS:
            return port


def _save(stack: Stack) -> None:
    # Whole (`status` or `down` running meanwhile never reads half a file) and durable: `down` needs it to find
    # the processes to stop.
    write_file(_state_file(stack.dir), json.dumps(dataclasses.asdict(stack), indent=2) + "\n")


def _wait_until(what: str, ready: Callable[[], bool], stack: Stack, deadline: float) -> None:
    while True:
        try:
            if ready():
                return
            problem = "not ready"
        except StackError:
            raise
        except Exception as e:  # refused, reset or an error page while the component starts
            problem = f"{type(e).__name__}: {e}"
        for name, process in stack.processes.items():
            if not process_sessions.alive(*process):
                raise StackError(f"{name} exited while starting; the end of its log:\n{_log_tail(stack, name)}")
        if time.monotonic() > deadline:
            raise StackError(f"{what} was not ready in time ({problem}); logs in {Path(stack.dir) / 'logs'}")
        time.sleep(0.5)


def _log_tail(stack: Stack, name: str, size: int = 3000) -> str:
    log = Path(stack.dir) / "logs" / f"{name}.log"
    return log.read_text(errors="replace")[-size:] if log.exists() else "(no log)"


# --- probes ---------------------------------------------------------------------------------------------------


def _use_ray_token() -> None:
    """The stack's Ray runs with token authentication, so this process's dashboard clients must send the token.
    Ray reads the mode once, when first imported: set it, then have Ray read its configuration again."""
    if os.environ.get("RAY_AUTH_MODE") != "token":
        from ray._raylet import Config

        os.environ["RAY_AUTH_MODE"] = "token"
        Config.initialize("")


def _jobs_api_answers(stack: Stack) -> bool:
    from controller.ray_jobs import JobsClient

    _use_ray_token()
    # Bounded: a dashboard that takes connections but never answers (a wedged head) must not hang `status`.
    JobsClient(stack.dashboard_url, timeout_s=PROBE_TIMEOUT_S).list_jobs()
    return True


def _controller_serving(address: str) -> bool:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def _deployer(stack: Stack):
    from serving.deployer import ServeDeployer

    _use_ray_token()
    return ServeDeployer(stack.dashboard_url, stack.serve_config, timeout_s=PROBE_TIMEOUT_S)


def _serve_running(stack: Stack) -> bool:
    deployer = _deployer(stack)
    status = deployer.status()
    if status == "DEPLOY_FAILED":
        raise StackError(f"the Serve application failed to deploy: {deployer.message()}")
    return status == "RUNNING"


def _get(address: str) -> bool:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=3) as response:
        return response.status == 200


def _answers(probe: Callable[[], bool]) -> bool:
    try:
        return probe()
    except Exception:  # any failure to answer is "down"; `status` reports, it does not diagnose
        return False


def _stop(stack: Stack) -> None:
    # The controller first, so that it never sees Ray vanish under a running job (a later `up` on the same
    # storage re-attaches to its jobs: those whose Ray job is gone are resubmitted and resume). It stops
    # gracefully in a few seconds. Ray's GCS and `ray start` drain for up to 30 s on SIGTERM, which a stack
    # that is going away altogether has no use for.
    for name, grace_s in (("controller", 15), ("ray", 3)):
        if name in stack.processes:
            process_sessions.stop_session(*stack.processes[name], grace_s=grace_s)
