"""Shared fixtures: one real Ray cluster per test session, the tiny model, instance images.

The cluster has two nodes (a head and a second node joined with `ray start --address`) when the suite runs
in its own network namespace (scripts/test arranges that with `unshare --net`): there Ray's listeners can
only ever be on loopback. Elsewhere Ray would listen on every interface for a multi-node cluster, so the
suite falls back to one loopback-only node and skips the tests that need two.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["RAY_AUTH_MODE"] = "token"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "dreambooth"
RAY = str(Path(sys.executable).with_name("ray"))


def in_isolated_network() -> bool:
    return [name for _, name in socket.if_nameindex()] == ["lo"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def controller_process(config_file: Path) -> tuple[subprocess.Popen, int]:
    """A controller started from `config_file` as a process of its own (to be killed), once ready; and its port."""
    process = subprocess.Popen(
        [sys.executable, "-m", "controller.server", "--config", str(config_file)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=Path(__file__).parents[1],
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    for line in process.stdout:
        if line.startswith("controller ready on port"):
            # Read on, or a controller that logs more than a pipe holds (64 KiB) would block on its next line.
            threading.Thread(target=process.stdout.read, daemon=True).start()
            return process, int(line.split()[-1])
    raise AssertionError(f"the controller exited with {process.wait()} before it was ready")


@dataclass
class RayCluster:
    address: str
    num_nodes: int
    dashboard_url: str
    """The dashboard (Jobs API, state API) on 127.0.0.1, e.g. "http://127.0.0.1:PORT"."""


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The demo's stack (a Ray cluster of its own, a controller, Serve, Prometheus scraping every second) stays up
    from its first test to the end of the session, ~8 % of 2 cores while idle (measured): its tests run last."""
    items.sort(key=lambda item: "demo_run" in getattr(item, "fixturenames", ()))


TEST_RAY_TRAIN_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25"}


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory):
    import ray

    from dreambooth.local_ray import ensure_ray_token
    from dreambooth.ray_dashboard import WORKER_ENV

    multi_node = in_isolated_network()
    if not multi_node:
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # Ray's single-machine mode: loopback listeners only
    port, dashboard_port = free_port(), free_port()
    address = f"127.0.0.1:{port}"
    dashboard_url = f"http://127.0.0.1:{dashboard_port}"
    env = {
        **os.environ,
        # Ray Train asks the State API, every second of a fit, whether the run's controller lives: found through
        # /tmp/ray's record of the latest cluster started, another session's (dead: each fit's end waited 12 s; or
        # answering that no such actor exists: the run's workers were removed), unless told where it is.
        "RAY_API_SERVER_ADDRESS": dashboard_url,
        # Ray Train commits reported checkpoints and sees a run's end at this poll (2 s by default): each of the
        # suite's fits ended 3.7-5.5 s after its last step, mostly waiting for it.
        **TEST_RAY_TRAIN_ENV,
    }
    logs = tmp_path_factory.mktemp("ray-logs")
    # Ray's sessions and sockets, and its record of the latest cluster started, in a folder of this session's: under
    # the shared /tmp/ray, Ray's job supervisor gave this cluster's job drivers the address of whichever cluster on
    # the machine started last (another test session's: they waited 14 min for it, then failed). Short: Ray's Unix
    # socket paths under it must fit in 107 bytes.
    temp_dir = tempfile.mkdtemp(prefix="ray-")
    common = ["--block", "--disable-usage-stats", "--node-ip-address=127.0.0.1", f"--temp-dir={temp_dir}"]
    # The dashboard serves the Jobs API; it is told to listen on loopback only.
    dashboard = ["--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}"]
    ensure_ray_token()  # `ray start` needs one; on a fresh machine only ray.init() would have made it
    procs = [_start_node(["--head", f"--port={port}", "--num-cpus=2", *dashboard, *common], logs / "head.log", env)]
    try:
        _wait_for_head(address, procs, env)
        if multi_node:
            procs.append(_start_node([f"--address={address}", "--num-cpus=1", *common], logs / "node2.log", env))
        ray.init(address=address, log_to_driver=False, runtime_env={"env_vars": WORKER_ENV})
        deadline = time.monotonic() + 60
        while len([n for n in ray.nodes() if n["Alive"]]) < len(procs):
            assert time.monotonic() < deadline, f"Ray nodes did not join; see {logs}"
            time.sleep(0.2)
        _wait_for_jobs_api(dashboard_url, procs, logs)
        yield RayCluster(address=address, num_nodes=len(procs), dashboard_url=dashboard_url)
    finally:
        ray.shutdown()
        for proc in reversed(procs):
            _stop_session(proc, grace_s=3)  # a test cluster's state is thrown away: no need to wait long
        shutil.rmtree(temp_dir, ignore_errors=True)


def _start_node(args: list[str], log: Path, env: dict) -> subprocess.Popen:
    # Its own session, so that teardown finds every process of the node (gcs, raylet, agents, workers).
    from dreambooth import process_sessions

    with open(log, "w") as out:
        proc = subprocess.Popen(
            [RAY, "start", *args], env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    # Taken now: a node that fails to start is reaped by the wait for it, and its (pid, start) is needed to stop
    # what it left in its session.
    proc.start_ticks = process_sessions.start_ticks(proc.pid)
    return proc


def _stop_session(proc: subprocess.Popen, grace_s: float = 10) -> None:
    """Stop a node started by _start_node: every process of its session (`ray start --block` does not stop its
    children on a signal, and `ray stop` would stop every Ray on the machine)."""
    from dreambooth import process_sessions

    process_sessions.stop_session(proc.pid, proc.start_ticks, grace_s=grace_s)
    proc.wait(timeout=5)


def _wait_for_head(address: str, procs, env) -> None:
    deadline = time.monotonic() + 60
    while True:
        result = subprocess.run([RAY, "status", f"--address={address}"], env=env, capture_output=True, text=True)
        if result.returncode == 0:
            return
        if any(p.poll() is not None for p in procs) or time.monotonic() > deadline:
            raise RuntimeError(f"Ray head did not start: {result.stderr[-2000:]}")
        time.sleep(0.5)


def _wait_for_jobs_api(url: str, procs, logs: Path) -> None:
    """The dashboard starts a few seconds after `ray status` answers; wait until the Jobs API lists jobs."""
    from ray.job_submission import JobSubmissionClient

    deadline = time.monotonic() + 60
    while True:
        try:
            JobSubmissionClient(url).list_jobs()  # also proves the token auth works for clients of this process
            return
        except Exception as e:  # connection refused while it starts; anything else is reported at the deadline
            if any(p.poll() is not None for p in procs) or time.monotonic() > deadline:
                raise RuntimeError(f"Ray's Jobs API at {url} did not answer: {e!r}; see {logs}") from e
        time.sleep(0.5)


@pytest.fixture(scope="session")
def serve_port() -> int:
    """Ray Serve's HTTP port on 127.0.0.1: one per cluster, shared by every Serve application in the session."""
    return free_port()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    from dreambooth.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-sd")


@pytest.fixture(scope="session")
def dog_images(tmp_path_factory) -> Path:
    """Real photos of the DreamBooth paper's dog subject when ../shared is there (CI has it), else stand-ins."""
    if (SHARED_DATA / "dog").is_dir():
        return SHARED_DATA / "dog"
    from PIL import Image

    directory = tmp_path_factory.mktemp("dog")
    for i in range(4):
        Image.effect_mandelbrot((96, 80), (-2 + i * 0.1, -1.2, 1, 1.2), 64).convert("RGB").save(directory / f"{i}.png")
    return directory


@pytest.fixture(scope="session")
def deepspeed_world(tmp_path_factory):
    """This process as a one-rank torch.distributed world for real DeepSpeed engines (CPU, gloo): a file
    rendezvous and gloo on loopback, so nothing listens off 127.0.0.1. One per session: DeepSpeed keeps the
    first process group it adopts for the life of the process."""
    import deepspeed
    import torch.distributed as dist

    # Only while the world is made (DeepSpeed picks and keeps its accelerator, gloo its interface): the session's
    # later processes (its Ray cluster, controllers, the demo's stack) would inherit them, and a CPU job's own
    # DS_ACCELERATOR setting (trainer/run.py) would go untested.
    with pytest.MonkeyPatch.context() as env:
        env.setenv("DS_ACCELERATOR", "cpu")
        env.setenv("GLOO_SOCKET_IFNAME", "lo")
        env.setenv("LOCAL_RANK", "0")
        rendezvous = tmp_path_factory.mktemp("deepspeed") / "rendezvous"
        dist.init_process_group("gloo", store=dist.FileStore(str(rendezvous), 1), rank=0, world_size=1)
        deepspeed.init_distributed(dist_backend="gloo")  # adopts the process group above
    yield
    dist.destroy_process_group()


@pytest.fixture
def engine_spec(deepspeed_world, monkeypatch):
    """A factory of JobSpecs for DeepSpeed engines built in this process (CPU, fp32; keyword arguments change
    fields), with the process's DeepSpeed world set up."""
    from trainer.spec import JobSpec

    monkeypatch.setenv("LOCAL_RANK", "0")  # what a launcher would set; DeepSpeed's engine reads it

    def make(**changes) -> JobSpec:
        fields = {
            "base_model": "unused",
            "instance_images": ["unused"],
            "instance_prompt": "a photo of sks dog",
            "class_prompt": "a photo of dog",
            "precision": "fp32",
            "gpus_per_worker": 0,
        }
        return JobSpec(**(fields | changes))

    return make


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("storage-cache")


@pytest.fixture
def storage(tmp_path, shared_cache) -> Path:
    """A job storage root of the test's own whose cache (class images, compiled code) is the session's, as a
    cluster's jobs share theirs: the tests' jobs generate the tiny model's class images once."""
    path = tmp_path / "storage"
    path.mkdir()
    (path / "cache").symlink_to(shared_cache, target_is_directory=True)
    return path


def partly_down_stack(tmp_path: Path):
    """A local stack's record (saved in tmp_path/stack) whose one live process is this one (its controller's pid
    stands in) and whose addresses answer nothing: a stack partly down, Ray gone."""
    from dreambooth import process_sessions, stack

    closed = f"127.0.0.1:{free_port()}"
    leftover = stack.Stack(
        dir=str(tmp_path / "stack"),
        storage=str(tmp_path / "storage"),
        ray_temp_dir=str(tmp_path / "ray"),
        ray_address=closed,
        dashboard_url=f"http://{closed}",
        ray_metrics=closed,
        controller=closed,
        controller_metrics=closed,
        serve_url=f"http://{closed}",
        serving={},
        processes={"ray": (1, 0), "controller": (os.getpid(), process_sessions.start_ticks(os.getpid()))},
        started_at=time.time(),
    )
    Path(leftover.dir).mkdir()
    stack._save(leftover)
    return leftover


def write_subject_model(base: Path, out: Path, *, seed: int, train_text_encoder: bool = False) -> Path:
    """A stand-in for a trained export (trainer/export.py's layout): the base model with its UNet weights
    perturbed, plus metadata.json. Real exports come from the training tests; this one costs no training."""
    import json

    import torch

    from dreambooth.model_files import FINGERPRINT_VERSION, fingerprint
    from dreambooth.sd_model import load_pipeline

    pipe = load_pipeline(base)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in pipe.unet.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05)
    pipe.save_pretrained(out, safe_serialization=True)
    metadata = {
        "job_id": out.name,
        "base_model": str(base),
        "base_model_fingerprint": fingerprint(base),
        "base_model_fingerprint_version": FINGERPRINT_VERSION,
        "instance_prompt": "a photo of sks dog",
        "class_prompt": "a photo of dog",
        "hyperparameters": {"train_text_encoder": train_text_encoder, "resolution": 64},
    }
    (out / "metadata.json").write_text(json.dumps(metadata))
    return out


@pytest.fixture(scope="session")
def subject_models(tiny_model, tmp_path_factory) -> dict[str, Path]:
    """Two subject models of the tiny base, as a model store would hold them: {model_id: path}."""
    root = tmp_path_factory.mktemp("subject-models")
    return {name: write_subject_model(tiny_model, root / name, seed=seed) for seed, name in enumerate(("rex", "fido"))}


# --- the README's main job on the local stack, watched by Prometheus (test_demo, test_observability) ---------------


@dataclass
class DemoRun:
    out: Path
    stack_dir: Path
    exit_code: int
    output: str
    """What the demo printed (stdout and stderr)."""
    prometheus_url: str | None
    """Prometheus, scraping the stack every second since before it started; None where there is none."""
    prometheus_since: float
    prometheus_problem: str = ""


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory):
    """`dreambooth demo --keep-running` once per session: it brings the local stack up itself, trains, deploys and
    generates; a real Prometheus scrapes that stack from before it starts. The stack stays up for the tests that
    look at it and goes down (`dreambooth down`) at the end of the session."""
    import io
    from unittest import mock

    import yaml

    from dreambooth import stack
    from dreambooth.cli import main

    root = tmp_path_factory.mktemp("demo")
    stack_dir = root / "stack"
    ports = {name: free_port() for name in stack.PORT_USES}
    config = stack.prometheus_config(
        f"127.0.0.1:{ports['controller_metrics']}", stack.ray_targets_file(stack_dir), scrape_interval="1s"
    )
    (root / "prometheus.yml").write_text(yaml.safe_dump(config))
    prometheus, url, problem = _start_prometheus(root)
    since = time.time()
    args = ["demo", "--out", str(root / "out"), "--dir", str(stack_dir), "--keep-running"]
    args += [f"--{name.replace('_', '-')}-port={port}" for name, port in ports.items()]
    output = io.StringIO()
    try:
        # Ray's processes inherit this: they export metrics every second instead of every ten.
        with (
            mock.patch.dict(os.environ, {"RAY_metrics_report_interval_ms": "1000", **TEST_RAY_TRAIN_ENV}),
            contextlib.redirect_stdout(output),
            contextlib.redirect_stderr(output),
        ):
            code = main(args)
        yield DemoRun(root / "out", stack_dir, code, output.getvalue(), url, since, problem)
    finally:
        try:
            main(["down", "--dir", str(stack_dir)])
            shutil.rmtree(stack.ray_temp_dir(stack_dir), ignore_errors=True)  # Ray's logs, outside tmp_path
        finally:
            if prometheus is not None:
                prometheus.terminate()
                prometheus.wait(timeout=30)
        assert stack.running(stack_dir) is None


def fetch_prometheus() -> Path:
    """The directory of Prometheus' binaries, from the cache scripts/fetch-prometheus fills (scripts/test runs it
    before its network namespace: the tests themselves run without a network). Raises RuntimeError saying why not."""
    fetch = Path(__file__).resolve().parents[1] / "scripts" / "fetch-prometheus"
    result = subprocess.run([fetch], capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        raise RuntimeError(f"scripts/fetch-prometheus failed (run it once with a network):\n{result.stderr}")
    return Path(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="session")
def prometheus_bin() -> Path:
    try:
        return fetch_prometheus()
    except RuntimeError as e:
        if shutil.which("apt-get") is None:
            pytest.skip("no apt-get here: scripts/fetch-prometheus takes Prometheus from Debian's packages")
        pytest.fail(str(e))


def _start_prometheus(directory: Path) -> tuple[subprocess.Popen | None, str | None, str]:
    """Prometheus on directory/prometheus.yml: (process, URL, "") or (None, None, why not)."""
    try:
        binary = fetch_prometheus() / "prometheus"
    except RuntimeError as e:
        return None, None, str(e)
    port = free_port()
    with open(directory / "prometheus.log", "w") as log:
        process = subprocess.Popen(
            [
                binary,
                f"--config.file={directory / 'prometheus.yml'}",
                f"--storage.tsdb.path={directory / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    return process, f"http://127.0.0.1:{port}", ""
