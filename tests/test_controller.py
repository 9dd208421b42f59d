"""The gRPC controller for real: a real server on 127.0.0.1, real Ray jobs through the Jobs API, the tiny model.

Each training job is a Ray job of its own (~30-40 s on two CPU cores), so the module keeps them few: one that
succeeds (and is watched), one cancelled mid-training, one that survives `kill -9` of the controller.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import threading
import time
import urllib.request
import uuid
from pathlib import Path

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status
from PIL import Image
from ray import serve
from ray.job_submission import JobSubmissionClient
from ray.util.state import list_actors

from controller.config import ControllerConfig, Tenant
from controller.server import REFLECTION_STREAMS_PER_TENANT, start
from dreambooth.client import ClientError, DreamBoothClient
from dreambooth.errors import InputError
from dreambooth.serving_client import ServingError, generate, wait_until_served
from dreambooth.v1 import jobs_pb2
from serving.config import ServeConfig
from tests.conftest import controller_process
from trainer.events import read_events
from trainer.storage import job_paths

APP_NAME = "controller-test"  # its own Serve application next to other tests'
TENANTS = (
    Tenant("alice", ("alice-token",), max_running_jobs=2, max_queued_jobs=5),
    Tenant("bob", ("bob-token",), max_running_jobs=1, max_queued_jobs=1),
)


def job_spec(tiny_model: Path, images: Path, **overrides) -> dict:
    spec = {
        "base_model": str(tiny_model),
        "instance_images": [str(images)],
        "instance_prompt": "a photo of sks dog",
        "num_class_images": 0,
        "resolution": 64,
        "max_steps": 4,
        "learning_rate": 1e-3,
        "precision": "fp32",
        "gpus_per_worker": 0,
        "num_workers": 1,
        "checkpoint_interval": 2,
        "max_failures": 0,
    }
    return {**spec, **overrides}


@pytest.fixture(scope="module")
def controller(ray_cluster, tmp_path_factory, serve_port, tiny_model):
    storage = tmp_path_factory.mktemp("controller-storage")
    config = ControllerConfig(
        storage=storage,
        listen="127.0.0.1:0",
        ray_dashboard_url=ray_cluster.dashboard_url,
        tenants=TENANTS,
        readable_paths=(tiny_model.parent,),  # the base models; photos are uploaded
        metrics_listen="127.0.0.1:0",
        reconcile_interval_s=0.3,
        # Its own Serve application next to other tests' (one Serve HTTP port per cluster).
        serving=ServeConfig(app_name=APP_NAME, route_prefix="/ctl", http_port=serve_port, cpus_per_replica=0),
        serving_check_interval_s=1,
    )
    running = start(config)
    yield running
    running.stop(grace_s=1)
    serve.delete(APP_NAME, _blocking=False)  # its replicas would take CPU from the tests after this module


@pytest.fixture
def alice(controller):
    with DreamBoothClient(f"127.0.0.1:{controller.port}", "alice-token") as client:
        yield client


@pytest.fixture
def bob(controller):
    with DreamBoothClient(f"127.0.0.1:{controller.port}", "bob-token") as client:
        yield client


def test_submit_watch_succeeds_with_a_model_and_resubmit_is_idempotent(
    alice, bob, controller, tiny_model, dog_images, tmp_path
):
    spec = job_spec(tiny_model, dog_images)
    job = alice.submit(spec, request_id="first-dog")
    assert job.state == jobs_pb2.STATE_QUEUED and job.job_id.startswith("job-")
    assert alice.submit(spec, request_id="first-dog").job_id == job.job_id  # a retry, not a second job
    # Another request under the same key (two pipelines given one): refused, not answered with the first's job.
    photos = sorted(p for p in dog_images.iterdir() if p.suffix in (".jpg", ".png"))
    (tmp_path / "one").mkdir()
    shutil.copy(photos[0], tmp_path / "one")
    retouched = shutil.copytree(dog_images, tmp_path / "retouched")  # as many photos, the last one flipped
    Image.open(photos[-1]).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(retouched / photos[-1].name)
    # Photos named on shared storage are copied into the job when it is submitted: compared by what they hold.
    named = shutil.copytree(retouched, tiny_model.parent / f"photos-{uuid.uuid4().hex[:8]}")
    for other, upload, what in [
        (job_spec(tiny_model, dog_images, max_steps=5), True, "max_steps"),
        (job_spec(tiny_model, tmp_path / "one"), True, "instance_images"),  # one of the photos only
        (job_spec(tiny_model, retouched), True, "instance_images"),
        (job_spec(tiny_model, named), False, "instance_images"),
    ]:
        with pytest.raises(ClientError) as reused:
            alice.submit(other, request_id="first-dog", upload=upload)
        assert reused.value.field == "request_id" and f"other {what}" in reused.value.message
        assert job.job_id in reused.value.message
    shutil.copy(photos[-1], named / photos[-1].name)  # now the same photos as the first request's
    assert alice.submit(job_spec(tiny_model, named), request_id="first-dog", upload=False).job_id == job.job_id
    shutil.rmtree(named)

    states, steps, checkpoints = [], [], []
    for message in alice.watch(job.job_id):
        change = message.WhichOneof("change")
        if change == "state":
            states.append(jobs_pb2.State.Name(message.state))
        elif change == "progress" and message.progress.step:
            steps.append((message.progress.step, message.progress.loss))
        elif change == "checkpoint":
            checkpoints.append(message.checkpoint)
    # The stream starts with the job as it is (the scheduler may have started it already), then every change.
    assert states[0] in ("STATE_QUEUED", "STATE_PREPARING") and states[-1] == "STATE_SUCCEEDED", states
    assert {"STATE_PREPARING", "STATE_TRAINING", "STATE_EXPORTING"} <= set(states)
    assert steps and steps[-1][0] == 4 and all(loss > 0 for _, loss in steps)
    assert [c.step for c in checkpoints] == [2, 4]
    # How long each save held training, and how much of that it waited for the save before (the wait is timed: above
    # zero even with nothing to wait for).
    assert all(0 < c.waited_seconds <= c.stall_seconds for c in checkpoints), checkpoints

    done = alice.get(job.job_id)
    assert done.state == jobs_pb2.STATE_SUCCEEDED and done.attempts == 1 and done.model_id
    model = alice.model(done.model_id)
    assert model.job_id == job.job_id and Path(model.path, "model_index.json").exists()
    assert model.metadata["steps"] == 4
    assert job.job_id in [j.job_id for j in alice.list()]
    # The driver's last line: where the model went.
    assert json.dumps({"model_dir": model.path, "steps": 4}) in alice.logs(job.job_id)
    with pytest.raises(ClientError) as error:
        alice.cancel(job.job_id)
    assert error.value.code == "FAILED_PRECONDITION"
    # Its checkpoints go once its driver has ended (nothing runs an ended job again); the rest of its folder stays.
    paths = job_paths(controller.service.config.storage, job.job_id)
    deadline = time.monotonic() + 60
    while paths.checkpoints_dir.exists():
        assert time.monotonic() < deadline, "the checkpoints of a job that ended were kept"
        time.sleep(0.2)
    assert paths.events_file.exists() and paths.spec_file.exists()
    deploy_generate_undeploy(alice, bob, done.model_id)


def deploy_generate_undeploy(alice: DreamBoothClient, bob: DreamBoothClient, model_id: str) -> None:
    """The trained model, deployed through the controller, answers over HTTP; undeployed, it is gone."""
    with pytest.raises(ClientError) as error:
        bob.deploy(model_id)  # another tenant's model
    assert error.value.code == "NOT_FOUND"
    model = alice.deploy(model_id)
    assert model.deployed and model.endpoint.endswith(f"/ctl/v1/models/{model_id}/generate")
    assert alice.model(model_id).endpoint == model.endpoint
    wait_until_served(model.endpoint, token="alice-token")
    [image] = generate(model.endpoint, "a photo of sks dog on the moon", token="alice-token", steps=2, seed=1)
    assert image.seed == 1 and Image.open(io.BytesIO(image.png)).size == (64, 64)  # the job's resolution
    # Serving knows the controller's tenants: no token, 401; another tenant's model is not found there either.
    for token, status in ((None, 401), ("bob-token", 404)):
        with pytest.raises(ServingError) as error:
            generate(model.endpoint, "a photo of sks dog", token=token, steps=2)
        assert error.value.status == status
    with pytest.raises(ServingError) as error:  # without a token, an unknown id is no different from a known one
        generate(model.endpoint.replace(model_id, "model-nonexistent"), "a photo of sks dog", steps=2)
    assert error.value.status == 401

    # Ray Serve loses the application (its Ray cluster restarted, say): the controller, which checks every
    # serving_check_interval_s, deploys what the store says again, by itself.
    deployed_at = serve.status().applications[APP_NAME].last_deployed_time_s
    serve.delete(APP_NAME, _blocking=False)  # blocking would wait for it to be gone, which it is only for a moment
    deadline = time.monotonic() + 180
    while (app := serve.status().applications.get(APP_NAME)) is None or app.last_deployed_time_s == deployed_at:
        assert time.monotonic() < deadline, f"{APP_NAME} was not deployed again after Ray Serve lost it"
        time.sleep(0.5)
    wait_until_served(model.endpoint, token="alice-token", timeout_s=180)
    assert generate(model.endpoint, "a photo of sks dog on the moon", token="alice-token", steps=2, seed=1) == [image]

    assert not alice.undeploy(model_id).deployed
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # the replicas are reconfigured a moment after the RPC returns
        try:
            generate(model.endpoint, "a photo of sks dog", token="alice-token", steps=2)
        except ServingError as e:
            assert e.status == 404, e
            return
        time.sleep(0.5)
    pytest.fail(f"{model.endpoint} still serves {model_id} a minute after UndeployModel")


def test_cancel_mid_training_stops_the_ray_job_and_its_workers(alice, controller, ray_cluster, tiny_model, dog_images):
    job = alice.submit(job_spec(tiny_model, dog_images, max_steps=100_000, checkpoint_interval=1000))
    for message in alice.watch(job.job_id):
        if message.WhichOneof("change") == "progress" and message.progress.step >= 1:
            break
    submission = final_submission(controller, job.job_id)
    ray_job = ray_job_id(ray_cluster.dashboard_url, submission)  # while Ray has its record: deleted once it ends
    assert {"TrainController", "RayTrainWorker"} <= ray_job_actors(ray_cluster.dashboard_url, ray_job)
    cancelling = alice.cancel(job.job_id)
    assert cancelling.state in (jobs_pb2.STATE_CANCELLING, jobs_pb2.STATE_CANCELLED)
    final = [m for m in alice.watch(job.job_id)][-1].job
    assert final.state == jobs_pb2.STATE_CANCELLED
    # Stopped (or no longer known: once the driver has ended, the controller keeps its log and deletes Ray's record).
    assert controller.service.ray_jobs.status(submission).value in ("STOPPED", "LOST")
    # ray.init makes the stop's SIGTERM a SystemExit in the driver: stopped, not found failing, so it wrote no
    # verdict (a controller that restarted, or a stop from outside, would have read FAILED: not run again).
    events = job_paths(controller.service.config.storage, job.job_id).events_file
    assert [e["state"] for e in read_events(events) if e["type"] == "state"] == ["PREPARING", "TRAINING"]
    wait_until_ray_job_actors_end(ray_cluster.dashboard_url, ray_job)


def ray_job_id(dashboard_url: str, submission_id: str) -> str:
    """The Ray job id its actors carry, while Ray has the submission's record (the controller deletes it once the
    job and its driver have ended)."""
    return JobSubmissionClient(dashboard_url).get_job_info(submission_id).job_id


def ray_job_actors(dashboard_url: str, ray_job: str) -> set[str]:
    """The classes of the Ray job's live actors."""
    actors = list_actors(address=dashboard_url, filters=[("job_id", "=", ray_job)])
    # Ray Data's AutoscalingCoordinator (0 CPUs), which Ray Train starts, is a detached cluster-wide singleton: it
    # outlives the job by design.
    return {a.class_name for a in actors if a.state != "DEAD" and a.name != "AutoscalingCoordinator"}


def wait_until_ray_job_actors_end(dashboard_url: str, ray_job: str, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while alive := ray_job_actors(dashboard_url, ray_job):
        assert time.monotonic() < deadline, f"the stopped Ray job's actors still live: {alive}"
        time.sleep(0.2)


TRAINING_ACTORS = {"TrainController", "RayTrainWorker", "ClassImageGenerator"}


def wait_until_training_actors_end(dashboard_url: str, timeout_s: float = 30) -> None:
    """Until no training job's actors live on the cluster: for jobs cancelled before their Ray job's id could be had
    (it is gone with Ray's record once they have ended)."""
    deadline = time.monotonic() + timeout_s
    while alive := {a.class_name for a in list_actors(address=dashboard_url) if a.state != "DEAD"} & TRAINING_ACTORS:
        assert time.monotonic() < deadline, f"stopped training jobs' actors still live: {alive}"
        time.sleep(0.2)


def final_submission(controller, job_id: str) -> str:
    return controller.service.store.get_job(job_id).ray_submission_id


def test_bad_requests_get_their_status_codes(alice, bob, controller, ray_cluster, tiny_model, dog_images, tmp_path):
    def refusal(call, *args, **kwargs) -> ClientError:
        with pytest.raises(ClientError) as error:
            call(*args, **kwargs)
        return error.value

    def code_of(call, *args, **kwargs) -> tuple[str, str]:
        error = refusal(call, *args, **kwargs)
        return error.code, error.message

    # The SDK checks the spec before sending anything; the server checks it again (see the next test).
    with pytest.raises(InputError, match="resolution: must be a multiple of 8"):
        alice.submit(job_spec(tiny_model, dog_images, resolution=100))
    broken = tmp_path / "photos"
    broken.mkdir()
    (broken / "a.jpg").write_bytes(b"not a jpeg at all")
    code, message = code_of(alice.submit, job_spec(tiny_model, broken))
    assert code == "INVALID_ARGUMENT" and "a.jpg" in message
    refused = refusal(alice.submit, job_spec(tiny_model.parent / "no-model", dog_images))
    assert (refused.code, refused.field) == ("INVALID_ARGUMENT", "base_model")  # BadRequest's field violation
    # Longer than the text encoder's context: the tokenizer would have cut it, the identifier with it.
    code, message = code_of(alice.submit, job_spec(tiny_model, dog_images, validation_prompts=["a dog " * 40 + "sks"]))
    assert code == "INVALID_ARGUMENT" and message.startswith("validation_prompts: 83 tokens; at most 77")
    # Files outside the controller's readable_paths are refused, existing or not.
    for outside in (tmp_path / "no-model", tiny_model.parent.parent):
        code, message = code_of(alice.submit, job_spec(outside, dog_images))
        assert code == "PERMISSION_DENIED" and "readable_paths" in message
        assert "upload" not in message  # a base model cannot be uploaded
    assert code_of(alice.get, "job-doesnotexist")[0] == "NOT_FOUND"
    assert code_of(alice.model, "model-nope")[0] == "NOT_FOUND"

    # Another tenant's job is not found, not forbidden: its existence is not disclosed.
    mine = alice.submit(job_spec(tiny_model, dog_images, max_steps=100_000))
    assert code_of(bob.get, mine.job_id)[0] == "NOT_FOUND"
    assert code_of(bob.cancel, mine.job_id)[0] == "NOT_FOUND"
    assert mine.job_id not in [j.job_id for j in bob.list()]
    # ... and its uploaded photos cannot be named in a spec.
    uploaded = controller.service.store.get_job(mine.job_id).spec["instance_images"]
    code, _ = code_of(bob.submit, job_spec(tiny_model, Path(uploaded[0]).parent), upload=False)
    assert code == "PERMISSION_DENIED"
    # Nor reached through a symbolic link put inside a readable directory: a link to it, or a folder holding one.
    links = tiny_model.parent / f"links-{uuid.uuid4().hex[:8]}"
    links.mkdir()
    try:
        (links / "borrowed.jpg").symlink_to(uploaded[0])
        for named in (links, links / "borrowed.jpg"):
            assert code_of(bob.submit, job_spec(tiny_model, named), upload=False)[0] == "PERMISSION_DENIED"
    finally:
        shutil.rmtree(links)
    refused = refusal(alice.delete, mine.job_id)
    assert (refused.code, refused.reason) == ("FAILED_PRECONDITION", "JOB_NOT_ENDED")  # ErrorInfo: what to wait for
    alice.cancel(mine.job_id)

    # Quota: bob may have one unfinished job.
    held = bob.submit(job_spec(tiny_model, dog_images, max_steps=100_000))
    refused = refusal(bob.submit, job_spec(tiny_model, dog_images))
    assert (refused.code, refused.reason, refused.retry_after_s) == ("RESOURCE_EXHAUSTED", "TENANT_JOBS_LIMIT", None)
    bob.cancel(held.job_id)
    # Both ended, and their Ray jobs too: the tests after this one have the cluster's CPUs to themselves.
    for client, cancelled in ((alice, mine), (bob, held)):
        assert list(client.watch(cancelled.job_id))[-1].job.state == jobs_pb2.STATE_CANCELLED
    assert alice.cancel(mine.job_id).state == jobs_pb2.STATE_CANCELLED  # a retried cancel: it worked, not an error
    wait_until_training_actors_end(ray_cluster.dashboard_url)

    # Authentication.
    with DreamBoothClient(f"127.0.0.1:{controller.port}", None) as anonymous:
        assert code_of(lambda: list(anonymous.list()))[0] == "UNAUTHENTICATED"
    with DreamBoothClient(f"127.0.0.1:{controller.port}", "stolen") as stranger:
        assert code_of(stranger.get, mine.job_id)[0] == "UNAUTHENTICATED"


def test_invalid_argument_carries_the_field_in_bad_request_details(controller, tiny_model, dog_images):
    from google.rpc import error_details_pb2

    from dreambooth.v1 import jobs_pb2_grpc

    def field_refused(spec: jobs_pb2.TrainingSpec, *images: jobs_pb2.InstanceImage, newer: bytes = b"") -> str:
        request = jobs_pb2.SubmitJobRequest(spec=spec, instance_images=images)
        request = jobs_pb2.SubmitJobRequest.FromString(request.SerializeToString() + newer)
        with grpc.insecure_channel(f"127.0.0.1:{controller.port}") as channel, pytest.raises(grpc.RpcError) as error:
            jobs_pb2_grpc.JobServiceStub(channel).SubmitJob(request, metadata=[("authorization", "Bearer alice-token")])
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT, error.value.details()
        bad_request = error_details_pb2.BadRequest()
        assert rpc_status.from_call(error.value).details[0].Unpack(bad_request)
        return bad_request.field_violations[0].field

    spec = dict(base_model=str(tiny_model), instance_prompt="a photo of sks dog", num_class_images=0)
    nowhere = jobs_pb2.InstanceImage(uri=str(tiny_model.parent / "nonexistent.png"))
    assert field_refused(jobs_pb2.TrainingSpec(**spec, max_steps=-3), nowhere) == "max_steps"
    # Counted before anything is made of them: an empty entry is 2 bytes, and a request may hold millions.
    assert field_refused(jobs_pb2.TrainingSpec(**spec), *[jobs_pb2.InstanceImage()] * 65) == "instance_images"
    # A relative base_model (grpcurl, buf curl: the SDK sends absolute paths) is refused, though it names the model
    # from the controller's working directory: the trainer would look for it in the job's folder.
    relative = os.path.relpath(tiny_model)
    assert (Path.cwd() / relative).is_dir()
    photo = next(p for p in sorted(Path(dog_images).iterdir()) if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    uploaded = jobs_pb2.InstanceImage(filename=photo.name, data=photo.read_bytes())
    assert field_refused(jobs_pb2.TrainingSpec(**{**spec, "base_model": relative}), uploaded) == "base_model"
    # A field of a later version, set by a newer client in the request or in a photo: refused (as in the spec), not
    # dropped, so that the job does not run without what the client asked for.
    field_5 = bytes([0x28, 0x01])  # field 5, varint 1
    assert field_refused(jobs_pb2.TrainingSpec(**spec), uploaded, newer=field_5) == "SubmitJobRequest"
    newer_photo = jobs_pb2.InstanceImage.FromString(uploaded.SerializeToString() + field_5)
    assert field_refused(jobs_pb2.TrainingSpec(**spec), uploaded, newer_photo) == "instance_images[1]"
    watch = jobs_pb2.WatchJobRequest.FromString(jobs_pb2.WatchJobRequest(job_id="job-x").SerializeToString() + field_5)
    with grpc.insecure_channel(f"127.0.0.1:{controller.port}") as channel, pytest.raises(grpc.RpcError) as error:
        next(jobs_pb2_grpc.JobServiceStub(channel).WatchJob(watch, metadata=[("authorization", "Bearer alice-token")]))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "WatchJobRequest" in error.value.details()


def test_health_reflection_and_metrics(controller):
    """Health is open (probes); reflection takes a token, as each of its streams holds an RPC thread while open."""
    made_up = "/dreambooth.v1.JobService/NoSuchMethod"
    with grpc.insecure_channel(f"127.0.0.1:{controller.port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        reply = health.Check(health_pb2.HealthCheckRequest(service="dreambooth.v1.JobService"))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        list_services = [reflection_pb2.ServerReflectionRequest(list_services="")]
        with pytest.raises(grpc.RpcError) as refused:
            next(reflection.ServerReflectionInfo(iter(list_services)))
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        answers = reflection.ServerReflectionInfo(
            iter(list_services), metadata=[("authorization", "Bearer alice-token")]
        )
        names = {s.name for s in next(answers).list_services_response.service}
        assert {"dreambooth.v1.JobService", "dreambooth.v1.ModelService", "grpc.health.v1.Health"} <= names

        # A tenant's streams left open are bounded: each holds an RPC thread.
        done = threading.Event()

        def held_open():
            yield list_services[0]
            done.wait(30)

        def open_stream():
            stream = reflection.ServerReflectionInfo(held_open(), metadata=[("authorization", "Bearer alice-token")])
            next(stream)
            return stream

        try:
            streams = [open_stream() for _ in range(REFLECTION_STREAMS_PER_TENANT)]
            with pytest.raises(grpc.RpcError) as refused:
                open_stream()
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        finally:
            done.set()
        for stream in streams:
            assert list(stream) == []  # ended by the client's half-close, which gives the tenant's turns back
        assert next(answers, None) is None
        again = reflection.ServerReflectionInfo(iter(list_services), metadata=[("authorization", "Bearer alice-token")])
        assert next(again).list_services_response.service
        with pytest.raises(grpc.RpcError) as unknown:  # without a token: the name is not the caller's to label with
            channel.unary_unary(made_up)(b"")
        assert unknown.value.code() == grpc.StatusCode.UNIMPLEMENTED
    port = controller.metrics_server.server_port
    deadline = time.monotonic() + 30
    while True:  # the job counts come at the end of a reconcile pass: the controller's first may still be running
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        if "dreambooth_jobs{" in text or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    for name in ("dreambooth_jobs{", "dreambooth_rpc_duration_seconds_bucket", "dreambooth_job_submissions_total"):
        assert name in text, name
    assert "NoSuchMethod" not in text


def test_kill_9_of_the_controller_mid_training(ray_cluster, tiny_model, dog_images, tmp_path):
    """The controller dies hard while a job trains; a new one re-attaches: the job succeeds exactly once."""
    config = tmp_path / "controller.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "storage": str(tmp_path / "storage"),
                "listen": "127.0.0.1:0",
                "ray_dashboard_url": ray_cluster.dashboard_url,
                "metrics_listen": "",
                "reconcile_interval_s": 0.3,
                "tenants": {"alice": {"tokens": ["alice-token"]}},
                "readable_paths": [str(tiny_model.parent)],
            }
        )
    )

    proc, port = controller_process(config)
    try:
        with DreamBoothClient(f"127.0.0.1:{port}", "alice-token") as client:
            job = client.submit(job_spec(tiny_model, dog_images, max_steps=12, checkpoint_interval=4))
            for message in client.watch(job.job_id):
                if message.job.state == jobs_pb2.STATE_TRAINING:
                    break
    finally:
        proc.send_signal(signal.SIGKILL)  # the crash under test, or the cleanup of a failed start
        proc.wait()

    proc, port = controller_process(config)
    try:
        with DreamBoothClient(f"127.0.0.1:{port}", "alice-token") as client:
            final = [m for m in client.watch(job.job_id)][-1].job
            assert final.state == jobs_pb2.STATE_SUCCEEDED, final
            assert final.attempts == 1, "the running Ray job is re-attached, not run again"
            assert len(list(client.models())) == 1
    finally:
        proc.terminate()
        proc.wait(timeout=30)
