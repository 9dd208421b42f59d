"""controller.ray_jobs against the real Jobs API of the test cluster: real training jobs of the tiny model.

Each training job costs ~30 s on a 2-core machine (most of it worker start-up), so there are two: one that
runs to the end and one that is stopped while its worker trains.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest
from ray.job_submission import JobSubmissionClient
from ray.util.state import list_actors

from controller.ray_jobs import Capacity, RayJobs, RayJobsError, RayJobStatus
from tests.conftest import free_port, in_isolated_network
from tests.test_training import make_spec, states
from trainer.events import read_events
from trainer.storage import job_paths

T = TypeVar("T")


def wait_for(condition: Callable[[], T], timeout_s: float, what: str) -> T:
    deadline = time.monotonic() + timeout_s
    while not (result := condition()):
        assert time.monotonic() < deadline, f"timed out after {timeout_s} s waiting for {what}"
        time.sleep(0.2)
    return result


def write_spec(storage: Path, job_id: str, tiny_model: Path, images: Path, **overrides) -> None:
    spec = make_spec(tiny_model, images, **{"max_steps": 2, "num_workers": 1, "num_class_images": 0, **overrides})
    paths = job_paths(storage, job_id)
    paths.job_dir.mkdir(parents=True)
    paths.spec_file.write_text(json.dumps(spec.to_dict()))


def test_training_job_runs_once_to_a_model(ray_cluster, tiny_model, dog_images, storage):
    jobs = RayJobs(ray_cluster.dashboard_url, storage_root=str(storage))
    write_spec(storage, "rj-ok", tiny_model, dog_images)

    start = time.monotonic()
    sid = jobs.submit("rj-ok", 1)
    assert sid == "rj-ok-a1"
    # A controller that crashed before recording the submission retries: same id, nothing new started.
    assert jobs.submit("rj-ok", 1) == sid
    wait_for(lambda: jobs.status(sid) != RayJobStatus.PENDING, 60, "the job to start")
    running_s = time.monotonic() - start
    status = wait_for(lambda: (s := jobs.status(sid)).ended and s, 240, "the job to end")
    total_s = time.monotonic() - start
    print(f"submit -> RUNNING {running_s:.1f} s, submit -> {status.value} {total_s:.1f} s")

    logs = jobs.logs(sid)
    assert status == RayJobStatus.SUCCEEDED, logs
    paths = job_paths(storage, "rj-ok")
    assert (paths.model_dir / "model_index.json").exists()
    assert states(read_events(paths.events_file)) == ["PREPARING", "TRAINING", "EXPORTING", "SUCCEEDED"]
    assert json.dumps({"model_dir": str(paths.model_dir), "steps": 2}) in logs  # the driver's last line

    # Ray knows the attempt once, and a retry after the end still starts nothing.
    assert jobs.submit("rj-ok", 1) == sid and jobs.status(sid) == RayJobStatus.SUCCEEDED
    client = JobSubmissionClient(ray_cluster.dashboard_url)
    assert [j.submission_id for j in client.list_jobs()].count(sid) == 1


def test_stopped_job_ends_stopped_with_its_workers_gone(ray_cluster, tiny_model, dog_images, storage):
    jobs = RayJobs(ray_cluster.dashboard_url, storage_root=str(storage))
    write_spec(storage, "rj-stop", tiny_model, dog_images, max_steps=100_000, checkpoint_interval=100_000)
    sid = jobs.submit("rj-stop", 3)
    events = job_paths(storage, "rj-stop").events_file
    wait_for(lambda: any(e["type"] == "progress" for e in read_events(events)), 180, "a training step")

    ray_job_id = JobSubmissionClient(ray_cluster.dashboard_url).get_job_info(sid).job_id

    def alive_actors() -> set[str]:
        actors = list_actors(address=ray_cluster.dashboard_url, filters=[("job_id", "=", ray_job_id)])
        # Ray Data's AutoscalingCoordinator (0 CPUs), which Ray Train starts, is a detached cluster-wide
        # singleton: it outlives the job by design.
        return {a.class_name for a in actors if a.state != "DEAD" and a.name != "AutoscalingCoordinator"}

    assert {"TrainController", "RayTrainWorker"} <= alive_actors()
    start = time.monotonic()
    jobs.stop(sid)
    assert wait_for(lambda: (s := jobs.status(sid)).ended and s, 30, "the job to stop") == RayJobStatus.STOPPED
    stopped_s = time.monotonic() - start
    wait_for(lambda: not alive_actors(), 30, "the job's actors to end")
    print(f"stop -> STOPPED {stopped_s:.1f} s, stop -> actors gone {time.monotonic() - start:.1f} s")
    jobs.stop(sid)  # stopping an ended job is fine
    assert jobs.status(sid) == RayJobStatus.STOPPED


def test_failing_driver_and_unknown_ids(ray_cluster, storage):
    jobs = RayJobs(ray_cluster.dashboard_url, storage_root=str(storage))
    sid = jobs.submit("no-spec", 1)  # the driver exits 2 at once: there is no spec.json
    assert wait_for(lambda: (s := jobs.status(sid)).ended and s, 60, "the job to end") == RayJobStatus.FAILED
    assert "error: spec: cannot read" in jobs.logs(sid)

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
    lines = subprocess.run(["ss", "-ltnH"], capture_output=True, text=True, check=True).stdout.splitlines()
    local = [line.split()[3] for line in lines]
    assert local and any(a.endswith(ray_cluster.dashboard_url.rsplit(":", 1)[1]) for a in local)
    assert [a for a in local if not a.startswith(("127.0.0.1:", "[::ffff:127.0.0.1]:", "[::1]:"))] == []
