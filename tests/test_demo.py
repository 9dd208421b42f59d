"""The README's main job: `dreambooth demo` brings the local stack up, trains a made-up subject through the
controller, deploys the model, generates images over HTTP and writes a page of it all; `up`/`status`/`down`."""

from __future__ import annotations

import contextlib
import dataclasses
import http.server
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from PIL import Image

from dreambooth import stack
from dreambooth.cli import main
from dreambooth.v1 import jobs_pb2


def test_demo_trains_deploys_generates_and_writes_the_page(demo_run):
    assert demo_run.exit_code == 0, demo_run.output
    out, output = demo_run.out, demo_run.output
    assert "tiny random model" in output and "SUCCEEDED" in output
    assert "training: 20/20 steps" in output  # the progress followed the job to its end (lines: no terminal here)
    assert str(out / "index.html") in output
    # Kept up on ports of its own: the CLI is told where its controller is.
    assert f"(the CLI's --controller {stack.load(demo_run.stack_dir).controller})" in output

    assert len(list((out / "subject").glob("*.png"))) == 4
    grids = sorted((out / "validation").glob("*.png"))
    assert [g.name for g in grids] == ["step_0000010.png", "step_0000020.png"]
    assert Image.open(grids[-1]).size == (128, 128)  # 2 prompts x 2 images of 64 px
    generated = sorted((out / "generated").glob("*.png"))
    assert len(generated) == 6 and {Image.open(p).size for p in generated} == {(64, 64)}  # the job's resolution

    page = (out / "index.html").read_text()
    linked = re.findall(r'<img src="([^"]+)"', page)
    assert sorted(linked) == sorted(str(p.relative_to(out)) for p in [*grids, *generated, *(out / "subject").iterdir()])
    assert "every image it draws is noise" in page
    points = re.search(r'<polyline points="([^"]+)"', page).group(1).split()
    assert len(points) >= 2  # the loss curve, from the job's progress events

    (model_dir,) = (Path(stack.load(demo_run.stack_dir).storage) / "models").iterdir()
    metadata = json.loads((model_dir / "metadata.json").read_text())
    assert metadata["steps"] == 20 and metadata["instance_prompt"] == "a photo of sks robot"


def test_stack_status_and_a_second_up_refused(demo_run, capsys):
    """--keep-running left the stack up: every component answers, and another `up` in its directory is refused."""
    # From a fresh process, with none of the Ray settings the test session has (its token mode, say).
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    result = subprocess.run(
        [sys.executable, "-m", "dreambooth.cli", "status", "--dir", str(demo_run.stack_dir)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    status = result.stdout
    for component in ("Ray", "Ray metrics", "controller", "controller metrics", "Serve application"):
        assert re.search(rf"^{component} +up ", status, re.M), status
    assert "RUNNING" in status

    assert main(["up", "--dir", str(demo_run.stack_dir), "--controller-port", "0"]) == 1
    assert "already running" in capsys.readouterr().err
    assert main(["status", "--dir", str(demo_run.stack_dir / "nothing-here")]) == 1


def test_the_stack_refuses_a_job_its_machine_can_never_run(demo_run, tiny_model, tmp_path):
    """One machine never grows: a job asking for a GPU it lacks (or more CPUs than it has) is refused when
    submitted, naming the field, rather than queued for ever."""
    from dreambooth.client import ClientError, DreamBoothClient

    config = yaml.safe_load((demo_run.stack_dir / "controller.yaml").read_text())
    assert config["capacity_cpus"] >= 1 and config["capacity_gpus"] == 0  # this machine's, from its Ray
    photo = tmp_path / "photo.png"
    Image.new("RGB", (64, 64), (90, 120, 200)).save(photo)
    spec = {"base_model": str(tiny_model), "instance_images": [str(photo)], "instance_prompt": "a photo of sks dog"}
    spec |= {"precision": "fp32", "num_class_images": 0}
    with DreamBoothClient(stack.load(demo_run.stack_dir).controller) as client:
        for fields, field in (
            ({"gpus_per_worker": 1}, "gpus_per_worker"),
            ({"gpus_per_worker": 0, "num_workers": 2, "cpus_per_worker": config["capacity_cpus"]}, "cpus_per_worker"),
        ):
            with pytest.raises(ClientError) as refused:
                client.submit({**spec, **fields})
            assert refused.value.code == "INVALID_ARGUMENT" and refused.value.message.startswith(f"{field}: ")


def test_the_stacks_ray_workers_ask_its_own_state_api(demo_run):
    """Ray's workers find the State API (Ray Train's placement-group cleaner asks it whether the run's controller
    lives) through /tmp/ray's record of the last `ray start`, which is never the stack's (it has a --temp-dir of
    its own): here the session's test cluster, elsewhere often a dead one. The stack points them at its own."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    dashboard_url = stack.load(demo_run.stack_dir).dashboard_url
    client = JobSubmissionClient(dashboard_url)
    task = (
        "import ray; ray.init(); "
        "from ray.dashboard.utils import get_address_for_submission_client as api; "
        "print('state api:', ray.get(ray.remote(num_cpus=0)(lambda: api(None)).remote()))"
    )
    job = client.submit_job(entrypoint=f"{sys.executable} -c {shlex.quote(task)}")
    deadline = time.monotonic() + 120
    while (status := client.get_job_status(job)) not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
        assert time.monotonic() < deadline, "the probe job did not end"
        time.sleep(0.5)
    logs = client.get_job_logs(job)
    assert status == JobStatus.SUCCEEDED, logs
    assert f"state api: {dashboard_url}" in logs


def test_up_after_down_starts_again_on_the_storage_it_left(demo_run, tmp_path):
    """`up --storage X; down; up` started an empty controller on DIR/storage, without the jobs and models in X."""
    assert stack._last_storage(demo_run.stack_dir) == Path(stack.load(demo_run.stack_dir).storage)
    assert stack._last_storage(tmp_path) is None  # no stack was ever started there: DIR/storage
    (tmp_path / "controller.yaml").write_text("")  # not what `up` writes (it writes it whole): said, not ignored
    with pytest.raises(stack.StackError, match=r"controller\.yaml is unreadable"):
        stack._last_storage(tmp_path)


def test_an_interrupted_demo_cancels_its_job(demo_run, tmp_path, capsys):
    """Ctrl-C left the demo's job unfinished in the stack's database: the next `up` on that storage ran it again,
    beside the next demo's job, once for every demo interrupted."""
    from dreambooth import demo
    from dreambooth.client import DreamBoothClient

    def interrupted(client, job_id) -> int:
        raise KeyboardInterrupt  # the user's Ctrl-C, while the job trains

    with pytest.raises(KeyboardInterrupt):
        demo.run(
            tmp_path / "out",
            base_model=None,
            stack_dir=demo_run.stack_dir,
            keep_running=True,
            start={},
            follow=interrupted,
        )
    job_id = re.search(r"training: job (job-[0-9a-f]+)", capsys.readouterr().err).group(1)
    with DreamBoothClient(stack.load(demo_run.stack_dir).controller, from_environment=False) as client:
        assert client.get(job_id).state in (jobs_pb2.STATE_CANCELLING, jobs_pb2.STATE_CANCELLED)


def test_the_demo_refuses_a_stack_partly_down(tmp_path):
    """A stack whose Ray died (killed for memory) and whose controller lived on: the demo used it, and its job waited
    in PREPARING for ever, unsaid."""
    from dreambooth import demo
    from tests.conftest import partly_down_stack

    leftover = partly_down_stack(tmp_path)
    with pytest.raises(stack.StackError, match=r"partly down \(Ray, controller\): `dreambooth down --dir"):
        demo.run(
            tmp_path / "out", base_model=None, stack_dir=Path(leftover.dir), keep_running=False, start={}, follow=None
        )


def test_up_names_its_controller_where_the_environment_names_another(demo_run):
    """With DREAMBOOTH_CONTROLLER set (a production one, in .bashrc), the `submit` that `up` printed sent the photos
    there, without a word."""
    from dreambooth.cli import _next_steps
    from dreambooth.client import DEFAULT_TARGET

    started = dataclasses.replace(stack.load(demo_run.stack_dir), controller=DEFAULT_TARGET)  # `up`'s defaults
    plain = _next_steps(started, demo_run.stack_dir, {})
    assert "--controller" not in plain.split("submit jobs:")[1].split("\n")[0] and "note:" not in plain
    told = _next_steps(started, demo_run.stack_dir, {"DREAMBOOTH_CONTROLLER": "prod:443", "DREAMBOOTH_TOKEN": "t"})
    assert f"--watch --controller {started.controller}" in told
    assert "note: DREAMBOOTH_CONTROLLER, DREAMBOOTH_TOKEN set here" in told


def test_rays_files_go_in_a_folder_of_this_users_only(tmp_path):
    """Ray makes its folders writable by everyone, under a name anyone can compute: another user could make it first
    (every `up` then failed) or replace the stack's sockets and files."""
    folder = tmp_path / "dreambooth-1000"
    stack.private_parent(folder / "ray-0123456789")
    assert folder.stat().st_mode & 0o777 == 0o700
    stack.private_parent(folder / "ray-0123456789")  # again: ours already
    folder.chmod(0o777)  # as another user, or Ray, would leave it
    with pytest.raises(stack.StackError, match="of this user's only"):
        stack.private_parent(folder / "ray-0123456789")
    folder.rmdir()
    folder.symlink_to(tmp_path)
    with pytest.raises(stack.StackError, match="a link"):
        stack.private_parent(folder / "ray-0123456789")
    assert stack.ray_temp_dir(tmp_path).parent.name == f"dreambooth-{os.getuid()}"


def test_rays_folder_fits_its_socket_paths_under_a_long_tmpdir(tmp_path, monkeypatch):
    """Ray's sockets live under its temp dir, and a Unix socket path has 107 bytes: under a TMPDIR of more than ~12
    characters (/run/user/1000, a batch system's per-job folder) every `up` failed with a page of Ray's traceback."""
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", "/tmp")
    assert stack.ray_temp_dir(tmp_path).parents[1] == Path("/tmp")
    for tmpdir, uid in [("/run/user/1000/slurm-job-4242424/tmp", 1000), ("/var/tmp", 1000), ("/tmp", 1234567890)]:
        monkeypatch.setattr(tempfile, "tempdir", tmpdir)
        monkeypatch.setattr(os, "getuid", lambda uid=uid: uid)  # a directory service's uids run to 10 digits
        folder = stack.ray_temp_dir(tmp_path)
        assert len(str(folder) + stack.RAY_LONGEST_SOCKET) <= 107, (tmpdir, uid, folder)
        assert str(uid) in folder.parent.name  # this user's own folder


def test_a_port_just_released_counts_as_free():
    """A server that stopped after answering (a stack just brought down) leaves its side of the connection in
    TIME_WAIT for a minute; its port is free to listen on again, as the servers bind it."""
    with socket.socket() as server:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the stack's servers (uvicorn, gRPC, ...)
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port)) as client:
            accepted, _ = server.accept()
            accepted.close()  # the server closes first: TIME_WAIT on its side
            client.recv(1)
    assert stack._port_free(port)


def test_up_refuses_a_port_in_use(tmp_path, capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        others = [f"--{name.replace('_', '-')}-port=0" for name in stack.PORT_USES if name != "serve"]
        assert main(["up", "--dir", str(tmp_path), *others, "--serve-port", str(port)]) == 1
    assert f"port {port} for Ray Serve's HTTP API (--serve-port) is in use" in capsys.readouterr().err
    assert stack.load(tmp_path) is None  # nothing was started


def test_ports_the_stack_picks_are_outside_rays_worker_range(monkeypatch):
    """Where the system's ephemeral ports start low (1024-65000, a common tuning), a free port the stack picked could
    be in the range `ray start` keeps for its workers, which it then refused with a traceback."""
    offered = iter([15000, 10002, 19999, 41000])

    class Socket(socket.socket):
        def getsockname(self):
            return ("127.0.0.1", next(offered))

    monkeypatch.setattr(stack.socket, "socket", Socket)
    assert stack.free_port() == 41000


def test_ports_that_cannot_be_used_are_all_said_at_once_and_the_demos_defaults_step_aside():
    """One port named per run, without its option, and a port given twice let one component fail to bind after the
    check. The demo's stack goes when it ends: a default port taken (a web server on 8000) is no reason to stop."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        twice = stack.free_port()
        with pytest.raises(stack.StackError) as error:
            ports = stack.Ports(controller=port, serve=twice, controller_metrics=twice, dashboard=0, ray_metrics=18080)
            stack._choose_ports(ports)
        message = str(error.value)
        assert f"port {port} for the controller's gRPC API (--controller-port) is in use" in message
        assert f"port {twice} for Ray Serve's HTTP API (--serve-port) is given for another component too" in message
        # `ray start` failed on it with a traceback naming no option.
        assert "port 18080 for Ray's /metrics (--ray-metrics-port) is in the range Ray keeps for its workers" in message
        default_taken = stack.Ports(controller=None, serve=None, controller_metrics=0, dashboard=0, ray_metrics=0)
        with contextlib.ExitStack() as held:
            holder = held.enter_context(socket.socket())
            holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                holder.bind(("127.0.0.1", stack.Ports().serve))
                holder.listen()
            except OSError:
                pass  # taken already, by something of this machine's: all the same here
            chosen = stack._choose_ports(default_taken)
        assert chosen.serve != stack.Ports().serve and chosen.serve > 0


def test_a_fresh_machine_gets_a_ray_token_that_ray_finds(tmp_path, monkeypatch):
    """`ray start --head` with token authentication refuses to start where no token was ever made (a fresh
    machine: the demo failed there). The stack (and the tests' cluster) make one first, where Ray looks."""
    from dreambooth.local_ray import ensure_ray_token

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    ensure_ray_token()
    token_file = tmp_path / ".ray" / "auth_token"
    token = token_file.read_text()
    assert re.fullmatch(r"[0-9a-f]{64}", token)
    assert token_file.stat().st_mode & 0o777 == 0o600
    assert [p.name for p in token_file.parent.iterdir()] == ["auth_token"]  # no draft left beside it
    ensure_ray_token()
    assert token_file.read_text() == token  # an existing token is kept: running clusters use it

    # Ray's own loader, in a process of its own with this HOME, finds it.
    probe = (
        "from ray._raylet import AuthenticationTokenLoader; "
        "print(AuthenticationTokenLoader.instance().get_raw_token(ignore_auth_mode=True))"
    )
    found = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert found.stdout.strip() == token

    other_home = tmp_path / "other"
    monkeypatch.setenv("HOME", str(other_home))
    monkeypatch.setenv("RAY_AUTH_TOKEN", "given")
    ensure_ray_token()
    assert not other_home.exists()  # a token given through Ray's environment is used as it is


def test_a_dashboard_that_takes_connections_but_never_answers_is_down_not_a_hang(tmp_path, monkeypatch):
    """`dreambooth status` on a wedged Ray head: the stack's probes of its dashboard give up after a few seconds
    (Ray's SDK sets no timeout of its own)."""
    monkeypatch.setattr(stack, "PROBE_TIMEOUT_S", 1)
    with socket.socket() as wedged:
        wedged.bind(("127.0.0.1", 0))
        wedged.listen()  # the kernel accepts connections into its backlog; nothing ever answers them
        url = f"http://127.0.0.1:{wedged.getsockname()[1]}"
        fake = stack.Stack(
            dir=str(tmp_path), storage=str(tmp_path), ray_temp_dir=str(tmp_path), ray_address="127.0.0.1:1",
            dashboard_url=url, ray_metrics="127.0.0.1:1", controller="127.0.0.1:1", controller_metrics="127.0.0.1:1",
            serve_url="http://127.0.0.1:1", serving={}, processes={}, started_at=0.0,
        )  # fmt: skip
        for probe in (stack._jobs_api_answers, lambda s: stack._deployer(s).status()):
            answered: list[bool] = []
            prober = threading.Thread(
                target=lambda probe=probe, answered=answered: answered.append(stack._answers(lambda: probe(fake)))
            )
            prober.start()
            prober.join(timeout=30)  # without its timeout, the probe waits for an answer for ever
            assert not prober.is_alive() and answered == [False]


def test_the_stack_and_its_probes_go_around_the_environments_proxy(tmp_path, monkeypatch):
    """With http_proxy set and no_proxy=localhost (a company's laptop), `up` and `status` asked the proxy for the
    stack's 127.0.0.1 addresses and so did the controller and Ray: `up` failed after 5 minutes ("Ray's Jobs API was
    not ready in time")."""
    from dreambooth.stack import _loopback_without_proxy
    from tests.conftest import partly_down_stack
    from tests.test_client import recording_proxy, use_proxy

    loopback = "127.0.0.1,localhost,::1"
    assert _loopback_without_proxy({}) == {"NO_PROXY": loopback, "no_proxy": loopback}
    # What was there stays (one missing: the other's, which tools read instead), and nothing is listed twice.
    assert _loopback_without_proxy({"NO_PROXY": "corp.example"}) == dict.fromkeys(
        ("NO_PROXY", "no_proxy"), f"corp.example,{loopback}"
    )
    assert _loopback_without_proxy({"no_proxy": "localhost", "NO_PROXY": ".corp"}) == {
        "no_proxy": "localhost,127.0.0.1,::1",
        "NO_PROXY": f".corp,{loopback}",
    }

    class Metrics(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    metrics = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Metrics)
    threading.Thread(target=metrics.serve_forever, daemon=True).start()
    try:
        with recording_proxy() as proxy:
            use_proxy(monkeypatch, proxy.url)
            child = stack._process_env()  # the controller's and Ray's
            assert (child["no_proxy"], child["NO_PROXY"]) == ("localhost,127.0.0.1,::1", "localhost,127.0.0.1,::1")
            address = f"127.0.0.1:{metrics.server_port}"
            leftover = dataclasses.replace(partly_down_stack(tmp_path), ray_metrics=address, controller_metrics=address)
            answered = {c.name: c.up for c in stack.health(leftover)}  # `status`'s probes, in this process
            assert answered["Ray metrics"] and answered["controller metrics"]
            assert proxy.seen == []  # the probe of its closed controller address did not go there either
    finally:
        metrics.shutdown()
        metrics.server_close()


def test_the_stacks_controller_starts_from_a_folder_with_packages_of_the_same_names(tmp_path):
    """`up` run from a project of the user's own with a `controller/`, `serving/` or `trainer/` package: `python -m`
    put the working directory first on sys.path, and the controller exited at start with that package's error."""
    for name in ("controller", "serving", "trainer"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text("raise ImportError('a package of the working directory')\n")
    config = tmp_path / "missing.yaml"
    result = subprocess.run(
        stack._controller_command(config), cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert "a package of the working directory" not in result.stderr
    assert result.returncode == 2 and f"No such file or directory: '{config}'" in result.stderr, result.stderr


def test_only_the_test_command_fetches_prometheus_and_before_its_network_namespace(tmp_path):
    """scripts/demo runs scripts/bootstrap, which fetched Prometheus (for tests/test_deploy.py) from apt's mirrors on
    every run until it was cached, and as root ran `apt-get update` on the system's lists: the demo is offline.
    scripts/test fetches it, outside the network namespace its suite runs in (which has no network). Run here on a
    copy of the scripts whose programs (the fetch, bootstrap, ruff, pytest) are stand-ins that log their call."""
    root = Path(__file__).resolve().parents[1]
    checkout, log = tmp_path / "checkout", tmp_path / "calls.log"
    (checkout / "scripts").mkdir(parents=True)
    (checkout / ".venv" / "bin").mkdir(parents=True)

    def stand_in(path: Path, body: str) -> None:
        path.write_text(f"#!/bin/sh\n{body}\n")
        path.chmod(0o755)

    logged = f'echo "$(basename "$0") $(readlink /proc/self/ns/net)" >> {shlex.quote(str(log))}'
    stand_in(checkout / "scripts" / "fetch-prometheus", f"{logged}; exit 1")  # failing: no mirror reachable
    shutil.copy2(root / "scripts" / "bootstrap", checkout / "scripts" / "bootstrap")
    # No venv here and no Python: bootstrap stops at once (after what it runs before setting one up).
    bootstrap = subprocess.run(
        [checkout / "scripts" / "bootstrap"], env={**os.environ, "PYTHON": "false"}, capture_output=True, text=True
    )
    assert bootstrap.returncode == 1 and "the tested stack needs Python >= 3.11" in bootstrap.stderr
    assert not log.exists()  # nothing fetched

    shutil.copy2(root / "scripts" / "test", checkout / "scripts" / "test")
    stand_in(checkout / "scripts" / "bootstrap", logged)
    stand_in(checkout / ".venv" / "bin" / "ruff", "exit 0")
    stand_in(checkout / ".venv" / "bin" / "python", logged)
    suite = subprocess.run([checkout / "scripts" / "test"], capture_output=True, text=True, timeout=60)
    assert suite.returncode == 0, suite.stderr
    assert "scripts/test: prometheus not fetched (tests/test_deploy.py will fail)" in suite.stderr  # a warning only
    here = os.readlink("/proc/self/ns/net")
    calls = log.read_text().splitlines()
    assert calls[:2] == [f"bootstrap {here}", f"fetch-prometheus {here}"]
    assert len(calls) == 3 and calls[2].startswith("python ")  # then the suite (in its namespace where it can)
