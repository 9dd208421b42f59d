"""controller.ray_jobs against the real Jobs API of the test cluster. Its training jobs run through the controller
(tests/test_controller.py: one to a model, one stopped while it trains); here, drivers that end at once."""

from __future__ import annotations

import http.server
import json
import shlex
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest
import ray
from ray.job_submission import JobSubmissionClient

from controller.ray_jobs import Capacity, RayJobs, RayJobsError, RayJobStatus
from tests.conftest import free_port, in_isolated_network

T = TypeVar("T")


def wait_for(condition: Callable[[], T], timeout_s: float, what: str) -> T:
    deadline = time.monotonic() + timeout_s
    while not (result := condition()):
        assert time.monotonic() < deadline, f"timed out after {timeout_s} s waiting for {what}"
        time.sleep(0.2)
    return result


def test_a_submission_runs_once_and_unknown_ids_are_lost(ray_cluster, storage):
    jobs = RayJobs(ray_cluster.dashboard_url, storage_root=str(storage), placement_timeout_s=90)
    sid = jobs.submit("no-spec", 1)  # the driver exits 2 at once: there is no spec.json
    assert sid == "no-spec-a1"
    # The controller's placement_timeout_s reaches the trainer, in its environment.
    env_vars = JobSubmissionClient(ray_cluster.dashboard_url).get_job_info(sid).runtime_env["env_vars"]
    assert env_vars["DREAMBOOTH_PLACEMENT_TIMEOUT_S"] == "90"
    # Offline, like every worker `dreambooth train` or the local stack starts.
    assert env_vars["HF_HUB_OFFLINE"] == "1" and env_vars["TOKENIZERS_PARALLELISM"] == "false"
    # A controller that crashed before recording the submission retries: same id, nothing new started.
    assert jobs.submit("no-spec", 1) == sid
    assert wait_for(lambda: (s := jobs.status(sid)).ended and s, 60, "the job to end") == RayJobStatus.FAILED
    assert "error: spec: cannot read" in jobs.logs(sid)
    # Ray knows the attempt once, and a retry after the end still starts nothing; stopping it is fine.
    assert jobs.submit("no-spec", 1) == sid and jobs.status(sid) == RayJobStatus.FAILED
    assert [j.submission_id for j in JobSubmissionClient(ray_cluster.dashboard_url).list_jobs()].count(sid) == 1
    jobs.stop(sid)
    assert jobs.status(sid) == RayJobStatus.FAILED

    assert jobs.status("never-submitted-a1") == RayJobStatus.LOST
    jobs.stop("never-submitted-a1")
    assert jobs.logs("never-submitted-a1") == ""  # a job Ray forgot (its head restarted) has no logs, no error


def test_cluster_capacity(ray_cluster, storage):
    capacity = RayJobs(ray_cluster.dashboard_url, storage_root=str(storage)).cluster_capacity()
    # The head has 2 CPUs, the second node (in the isolated network) 1.
    assert capacity == Capacity(nodes=ray_cluster.num_nodes, cpus=1.0 + ray_cluster.num_nodes, gpus=0.0)


def test_unreachable_or_silent_dashboard_is_a_clear_error(storage):
    jobs = RayJobs(f"http://127.0.0.1:{free_port()}", storage_root=str(storage))
    with pytest.raises(RayJobsError, match="Failed to connect"):
        jobs.status("x-a1")
    with pytest.raises(RayJobsError, match="listing nodes"):
        jobs.cluster_capacity()

    # Accepts connections (the kernel does) but never answers: the timeout ends the wait.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        jobs = RayJobs(f"http://127.0.0.1:{silent.getsockname()[1]}", storage_root=str(storage), timeout_s=1)
        with pytest.raises(RayJobsError, match="Timeout"):  # the call's own timeout ended it (no timing asserted)
            jobs.submit("x", 1)


def test_nothing_listens_off_loopback(ray_cluster):
    if not in_isolated_network() or not shutil.which("ss"):
        pytest.skip("needs the suite's own network namespace (scripts/test), where only the cluster listens")
    lines = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True).stdout.splitlines()
    local = {line.split()[3]: line for line in lines}
    assert local and any(a.endswith(ray_cluster.dashboard_url.rsplit(":", 1)[1]) for a in local)
    assert [
        line for a, line in local.items() if not a.startswith(("127.0.0.1:", "[::ffff:127.0.0.1]:", "[::1]:"))
    ] == []


def test_a_submission_that_never_connected_is_told_from_one_that_may_have_arrived(storage):
    """A refused connection sent nothing: a job cancelled meanwhile can end at once. A submission that timed out may
    still reach Ray and start (a slow head), so it is watched for a while before it counts as never run."""
    with pytest.raises(RayJobsError) as refused:
        RayJobs(f"http://127.0.0.1:{free_port()}", storage_root=str(storage)).submit("job-1", 1)
    assert not refused.value.reached_ray
    with socket.socket() as silent:  # accepts connections, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        with pytest.raises(RayJobsError) as timed_out:
            RayJobs(url, storage_root=str(storage), timeout_s=1).submit("job-1", 1)
    assert timed_out.value.reached_ray


def test_the_driver_imports_the_project_whatever_its_working_directory_holds(storage, tmp_path):
    """Ray runs a job's driver in the working directory Ray was started in (the local stack's: wherever `dreambooth
    up` ran): `python -m trainer.run` put it first on sys.path, where a `trainer/` package of the user's own project
    replaced this one's. What the controller submits, read by a stand-in for the Jobs API on 127.0.0.1, is run from
    such a directory (a quick module in place of trainer.run, which loads DeepSpeed)."""
    submitted = []

    class JobsAPI(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # the SDK's version check
            self._answer({"ray_version": ray.__version__, "version": "4", "session_name": "stand-in"})

        def do_POST(self):
            submitted.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self._answer({"submission_id": submitted[-1]["submission_id"], "job_id": None})

        def _answer(self, payload: dict) -> None:
            data = json.dumps(payload).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    api = http.server.ThreadingHTTPServer(("127.0.0.1", 0), JobsAPI)
    threading.Thread(target=api.serve_forever, daemon=True).start()
    try:
        RayJobs(f"http://127.0.0.1:{api.server_port}", storage_root=str(storage)).submit("job-1", 1)
    finally:
        api.shutdown()
        api.server_close()
    [request] = submitted
    command = shlex.split(request["entrypoint"])
    assert command[:4] == [sys.executable, "-P", "-m", "trainer.run"]
    (tmp_path / "trainer").mkdir()
    (tmp_path / "trainer" / "__init__.py").write_text("raise ImportError('a package of the working directory')\n")
    imported = subprocess.run(
        [*command[:2], "-c", "import trainer.storage; print(trainer.storage.__file__)"],
        cwd=tmp_path,
        env=request["runtime_env"]["env_vars"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert imported.returncode == 0, imported.stderr
    assert imported.stdout.strip() == str(Path(__file__).resolve().parents[1] / "trainer" / "storage.py")
