"""The SDK and the CLI's controller commands against a real gRPC server on 127.0.0.1.

The server is a minimal servicer of the generated JobService/ModelService with canned jobs: it checks the
bearer token like the controller will, so this tests the client's wiring (channel, metadata, paging,
streaming, error mapping) for real, without the controller.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import datetime
import email.utils
import http.server
import inspect
import json
import os
import random
import socket
import socketserver
import struct
import threading
import time
import uuid
from concurrent import futures
from pathlib import Path

import grpc
import pytest
import yaml
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status
from PIL import Image

from dreambooth import serving_client
from dreambooth.cli import main
from dreambooth.client import ClientError, DreamBoothClient
from dreambooth.errors import InputError
from dreambooth.proto_convert import timestamp
from dreambooth.serving_client import (
    GeneratedImage,
    ServingDisconnected,
    ServingError,
    ServingHostUnknown,
    ServingTimeout,
    ServingTLSError,
    ServingUnreachable,
    generate,
    wait_until_served,
)
from dreambooth.v1 import jobs_pb2, jobs_pb2_grpc, models_pb2, models_pb2_grpc
from serving.config import LOAD_TIMEOUT_S
from tests.conftest import free_port
from trainer.images import MAX_INSTANCE_IMAGES
from trainer.spec import JobSpec

TOKEN = "t0ken"
S = jobs_pb2  # states and messages, shorter
ENDED = (S.STATE_SUCCEEDED, S.STATE_FAILED, S.STATE_CANCELLED)


def _job(job_id: str, state: int, step: int = 0, **kwargs) -> jobs_pb2.Job:
    return S.Job(
        job_id=job_id,
        tenant="acme",
        state=state,
        progress=S.Progress(step=step, total_steps=10 if step else 0, loss=0.125),
        create_time=timestamp(1_700_000_000),
        **kwargs,
    )


class FakeController(jobs_pb2_grpc.JobServiceServicer, models_pb2_grpc.ModelServiceServicer):
    def __init__(self) -> None:
        self.jobs = {
            "job-5": _job("job-5", S.STATE_QUEUED),
            "job-4": _job("job-4", S.STATE_TRAINING, step=3),
            "job-3": _job("job-3", S.STATE_SUCCEEDED, step=10, model_id="model-3"),
            "job-2": _job("job-2", S.STATE_FAILED, failure=S.Failure(reason="TRAINING_FAILED", message="NaN loss")),
            "job-1": _job("job-1", S.STATE_CANCELLED),
        }
        self.models = {
            "model-3": models_pb2.Model(model_id="model-3", tenant="acme", job_id="job-3", path="/storage/models/job-3")
        }
        self.requests: list[object] = []
        self.deadlines_s: list[float | None] = []  # what each call had left when it arrived
        self.lock = threading.Lock()
        self.serving_lags = 0  # DeleteModels refused as the controller does until serving applied an undeploy

    def _auth(self, request: object, context: grpc.ServicerContext) -> None:
        with self.lock:
            self.requests.append(request)
            self.deadlines_s.append(context.time_remaining())
        if dict(context.invocation_metadata()).get("authorization") != f"Bearer {TOKEN}":
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or unknown bearer token")

    def _find(self, job_id: str, context: grpc.ServicerContext) -> jobs_pb2.Job:
        if job_id not in self.jobs:
            context.abort(grpc.StatusCode.NOT_FOUND, f"job {job_id!r} not found")
        return self.jobs[job_id]

    def _find_model(self, model_id: str, context: grpc.ServicerContext) -> models_pb2.Model:
        if model_id not in self.models:
            context.abort(grpc.StatusCode.NOT_FOUND, f"model {model_id!r} not found")
        return self.models[model_id]

    def SubmitJob(self, request, context):
        self._auth(request, context)
        for job in self.jobs.values():  # idempotency: a retry gets the first call's job
            if job.request_id == request.request_id:
                return S.SubmitJobResponse(job=job)
        job = _job(f"job-{len(self.jobs) + 1}", S.STATE_QUEUED, spec=request.spec, request_id=request.request_id)
        job.priority = request.priority
        self.jobs[job.job_id] = job
        return S.SubmitJobResponse(job=job)

    def GetJob(self, request, context):
        self._auth(request, context)
        return S.GetJobResponse(job=self._find(request.job_id, context))

    def ListJobs(self, request, context):
        self._auth(request, context)
        jobs = [j for j in self.jobs.values() if not request.states or j.state in request.states]
        start = int(request.page_token or 0)
        end = start + (request.page_size or 50)
        return S.ListJobsResponse(jobs=jobs[start:end], next_page_token=str(end) if end < len(jobs) else "")

    def CancelJob(self, request, context):
        self._auth(request, context)
        job = self._find(request.job_id, context)
        if job.state in ENDED:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"job {job.job_id} already ended")
        job.state = S.STATE_CANCELLING
        return S.CancelJobResponse(job=job)

    def DeleteJob(self, request, context):
        self._auth(request, context)
        del self.jobs[self._find(request.job_id, context).job_id]
        return S.DeleteJobResponse()

    def WatchJob(self, request, context):
        """Three updates: TRAINING, a progress step, then the end (job-2 fails, every other job succeeds)."""
        self._auth(request, context)
        job = S.Job()
        job.CopyFrom(self._find(request.job_id, context))
        job.state = S.STATE_TRAINING
        yield S.WatchJobResponse(job=job, time=timestamp(1), state=S.STATE_TRAINING)
        progress = S.Progress(step=5, total_steps=10, loss=0.5, steps_per_second=2)
        progress.eta.FromSeconds(3)
        job.progress.CopyFrom(progress)
        yield S.WatchJobResponse(job=job, time=timestamp(2), progress=progress)
        job.state = S.STATE_FAILED if job.job_id == "job-2" else S.STATE_SUCCEEDED
        yield S.WatchJobResponse(job=job, time=timestamp(3), state=job.state)

    def GetJobLogs(self, request, context):
        self._auth(request, context)
        return S.GetJobLogsResponse(text=f"training {self._find(request.job_id, context).job_id}\nstep 1")

    def ListModels(self, request, context):
        self._auth(request, context)
        return models_pb2.ListModelsResponse(models=self.models.values())

    def GetModel(self, request, context):
        self._auth(request, context)
        return models_pb2.GetModelResponse(model=self._find_model(request.model_id, context))

    def DeployModel(self, request, context):
        self._auth(request, context)
        model = self._find_model(request.model_id, context)
        model.deployed = True
        model.endpoint = model.endpoint or f"http://127.0.0.1:8000/{model.model_id}"
        return models_pb2.DeployModelResponse(model=model)

    def UndeployModel(self, request, context):
        self._auth(request, context)
        model = self._find_model(request.model_id, context)
        model.deployed, model.endpoint = False, ""
        return models_pb2.UndeployModelResponse(model=model)

    def DeleteModel(self, request, context):
        self._auth(request, context)
        if self._find_model(request.model_id, context).deployed:
            context.abort(
                grpc.StatusCode.FAILED_PRECONDITION, f"model {request.model_id} is deployed: undeploy it first"
            )
        if self.serving_lags:
            self.serving_lags -= 1
            context.abort_with_status(_still_served(request.model_id))
        del self.models[request.model_id]
        return models_pb2.DeleteModelResponse()


def _still_served(model_id: str) -> grpc.Status:
    """The controller's refusal of a DeleteModel right after an UndeployModel: FAILED_PRECONDITION, its reason, and a
    retry delay (RetryInfo), as grpc-status-details-bin."""
    reason, delay = any_pb2.Any(), any_pb2.Any()
    reason.Pack(error_details_pb2.ErrorInfo(reason="MODEL_DEPLOYED", domain="dreambooth.v1"))
    delay.Pack(error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(nanos=50_000_000)))
    message = f"model {model_id} may still be served (serving has not applied its undeploy yet): retry in a moment"
    status = status_pb2.Status(code=code_pb2.FAILED_PRECONDITION, message=message, details=[reason, delay])
    return rpc_status.to_status(status)


def _serve(controller: FakeController, credentials: grpc.ServerCredentials | None = None):
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    jobs_pb2_grpc.add_JobServiceServicer_to_server(controller, server)
    models_pb2_grpc.add_ModelServiceServicer_to_server(controller, server)
    address = "127.0.0.1:0"
    port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    server.start()
    return server, f"127.0.0.1:{port}"


@pytest.fixture
def controller():
    fake = FakeController()
    server, target = _serve(fake)
    fake.target = target
    yield fake
    server.stop(grace=None)


@pytest.fixture
def client(controller):
    with DreamBoothClient(controller.target, TOKEN, timeout_s=10) as c:
        yield c


@pytest.fixture
def job_yaml(tmp_path) -> Path:
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(3):
        Image.new("RGB", (80, 72), (40 * i, 100, 200)).save(photos / f"{i}.jpg")
    (photos / "README.txt").write_text("not a photo")
    (photos / ".hidden.jpg").write_bytes(b"skipped")
    spec = {
        "base_model": "models/sd",
        "instance_images": ["photos"],
        "instance_prompt": "a photo of sks dog",
        "num_class_images": 0,
        "max_steps": 20,
        "precision": "bf16",
    }
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


# --- SDK ------------------------------------------------------------------------------------------------


def test_submit_uploads_the_photos_and_only_the_fields_written(client, controller, job_yaml):
    job = client.submit(job_yaml, priority=7)
    request = controller.requests[-1]
    assert isinstance(request, S.SubmitJobRequest)
    assert [i.filename for i in request.instance_images] == ["0.jpg", "1.jpg", "2.jpg"]
    photos = job_yaml.parent / "photos"
    assert [i.data for i in request.instance_images] == [(photos / f"{i}.jpg").read_bytes() for i in range(3)]
    assert request.priority == 7 and uuid.UUID(request.request_id)
    spec = request.spec
    assert spec.base_model == str(job_yaml.parent / "models" / "sd")  # relative to the YAML file, like `train`
    assert spec.max_steps == 20 and spec.precision == S.PRECISION_BF16 and spec.num_class_images == 0
    assert not spec.HasField("resolution") and not spec.HasField("learning_rate")  # the server's defaults apply
    assert job.job_id == "job-6" and job.state == S.STATE_QUEUED and job.priority == 7


def test_a_job_spec_object_sends_only_the_fields_it_sets(client, controller, job_yaml):
    """Every field of a JobSpec was sent, at its default or not: a controller one version older refused every job
    submitted so (a field it does not know yet, such as cuda_graphs once), where the same job as YAML went through."""
    spec = JobSpec.load(job_yaml)
    client.submit(dataclasses.replace(spec, seed=0, learning_rate=1e-6))  # seed 0 is the default: not sent
    sent = controller.requests[-1].spec
    assert sorted(f.name for f, _ in sent.ListFields()) == sorted(
        ["base_model", "instance_prompt", "num_class_images", "max_steps", "precision", "learning_rate"]
    )
    assert sent.learning_rate == 1e-6 and not sent.HasField("seed")
    # Settings that would do nothing as written are refused here, before any photo is read and sent.
    requests = len(controller.requests)
    with pytest.raises(InputError, match="validation_interval: samples the validation_prompts every 10 steps"):
        client.submit(dataclasses.replace(spec, validation_interval=10))
    assert len(controller.requests) == requests


def test_a_submissions_deadline_leaves_time_to_upload_its_photos(client, controller, job_yaml):
    """The upload is part of the call: 64 MiB of photos in 30 s would have needed 18 Mbit/s. A second more per 256
    KiB of photos."""
    big = job_yaml.parent / "photos" / "big.png"
    big.write_bytes(os.urandom(3 * 2**20))  # what the file holds is the server's to check (this one takes 4 MiB)
    client.submit(job_yaml)
    # The client's 10 s and 4 s per MiB, less what preparing took: more than 10 s in any case.
    assert 10.5 < controller.deadlines_s[-1] <= 10 + 3 * 4 + 1
    client.get("job-4")
    assert controller.deadlines_s[-1] <= 10.5  # other calls keep theirs (gRPC rounds deadlines up a little)
    client.submit(job_yaml, upload=False)
    assert controller.deadlines_s[-1] <= 10.5  # paths only: nothing to upload


def test_submit_without_upload_sends_absolute_paths(client, controller, job_yaml, monkeypatch):
    monkeypatch.chdir(job_yaml.parent)
    spec = {**yaml.safe_load(job_yaml.read_text()), "instance_images": ["photos/1.jpg", "photos"]}
    client.submit(spec, upload=False)
    images = controller.requests[-1].instance_images
    photos = job_yaml.parent / "photos"
    assert [i.uri for i in images] == [str(photos / n) for n in ("1.jpg", "0.jpg", "2.jpg")]  # no duplicates
    assert not any(i.HasField("data") for i in images)
    # Relative to this process's directory, as the images: the server's working directory is not ours.
    assert controller.requests[-1].spec.base_model == str(job_yaml.parent / "models" / "sd")


def test_more_photos_than_a_controller_takes_are_refused_before_any_is_read(client, controller, job_yaml, tmp_path):
    library = tmp_path / "library"
    library.mkdir()
    for index in range(MAX_INSTANCE_IMAGES + 1):
        (library / f"{index}.jpg").write_bytes(b"")
    spec = {**yaml.safe_load(job_yaml.read_text()), "instance_images": [str(library)]}
    sent = len(controller.requests)
    with pytest.raises(InputError, match=f"{MAX_INSTANCE_IMAGES + 1} images; at most"):
        client.submit(spec)
    assert len(controller.requests) == sent


def test_photos_over_a_requests_size_are_refused_before_any_is_read(
    client, controller, job_yaml, tmp_path, monkeypatch
):
    """A folder of RAW-sized photos was read whole (a GiB, slow on NFS) to be told it was too much."""
    library = tmp_path / "library"
    library.mkdir()
    for index in range(5):
        with open(library / f"{index}.jpg", "wb") as photo:
            photo.truncate(15 * 2**20)  # sparse: 15 MiB each, 75 MiB in all, and nothing to read
    spec = {**yaml.safe_load(job_yaml.read_text()), "instance_images": [str(library)]}
    reads = []
    original = Path.read_bytes
    monkeypatch.setattr(Path, "read_bytes", lambda self: reads.append(self) or original(self))
    with pytest.raises(InputError, match="75 MiB of images, over the 64 MiB a request carries"):
        client.submit(spec)
    assert reads == []


def test_a_photo_whose_name_is_not_utf8_is_uploaded_and_a_path_to_one_is_refused(client, controller, job_yaml):
    """Names from an old archive or a camera card (Latin-1) crashed the SDK with a traceback: a proto string
    cannot hold them."""
    photos = job_yaml.parent / "photos"
    latin1 = photos / os.fsdecode(b"caf\xe9.jpg")
    latin1.write_bytes((photos / "0.jpg").read_bytes())
    client.submit(job_yaml)
    names = sorted(image.filename for image in controller.requests[-1].instance_images)
    assert names == ["0.jpg", "1.jpg", "2.jpg", "caf\ufffd.jpg"]
    with pytest.raises(InputError, match="is not UTF-8, which a request cannot carry: rename the file"):
        client.submit(job_yaml, upload=False)


def test_paths_through_a_symbolic_link_are_sent_as_written(client, controller, job_yaml, tmp_path):
    """A client reaching shared storage through a link (/shared -> /mnt/efs-1) sends the name the cluster knows."""
    (tmp_path / "shared").symlink_to(job_yaml.parent)
    spec = {**yaml.safe_load(job_yaml.read_text()), "instance_images": [str(tmp_path / "shared" / "photos")]}
    client.submit({**spec, "base_model": str(tmp_path / "shared" / "models" / "sd")}, upload=False)
    request = controller.requests[-1]
    assert request.spec.base_model == str(tmp_path / "shared" / "models" / "sd")
    assert request.instance_images[0].uri == str(tmp_path / "shared" / "photos" / "0.jpg")
    # pathlib's paths are paths too.
    client.submit(
        {
            **spec,
            "base_model": tmp_path / "shared" / "models" / "sd",
            "instance_images": [tmp_path / "shared" / "photos"],
        },
        upload=False,
    )
    assert controller.requests[-1].spec.base_model == request.spec.base_model


def test_submit_sends_the_request_id_it_is_given_and_a_fresh_one_otherwise(client, controller, job_yaml):
    """What the SDK puts on the wire (the controller's idempotency itself is tested in test_controller)."""
    client.submit(job_yaml, request_id="retry-me")
    client.submit(job_yaml, request_id="retry-me")
    client.submit(job_yaml)
    client.submit(job_yaml)
    ids = [request.request_id for request in controller.requests]
    assert ids[:2] == ["retry-me", "retry-me"]
    assert ids[2] != ids[3] and all(uuid.UUID(i) for i in ids[2:])


def test_a_priority_out_of_bounds_fails_before_any_call(client, controller, job_yaml):
    with pytest.raises(InputError, match=r"priority.*-1000, 1000"):
        client.submit(job_yaml, priority=3_000_000_000)
    assert controller.requests == []


def test_bad_spec_or_photos_fail_before_any_call(client, controller, job_yaml, tmp_path):
    with pytest.raises(InputError, match="resolution"):
        client.submit({**yaml.safe_load(job_yaml.read_text()), "resolution": 100})
    with pytest.raises(InputError, match=r"nope\.jpg: no such file"):
        client.submit({**yaml.safe_load(job_yaml.read_text()), "instance_images": [str(tmp_path / "nope.jpg")]})
    (tmp_path / "notes.txt").write_text("my dog's photos are in photos/")
    with pytest.raises(InputError, match=r"notes\.txt: not an image"):  # as the trainer finds them: not uploaded
        client.submit({**yaml.safe_load(job_yaml.read_text()), "instance_images": [str(tmp_path / "notes.txt")]})
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no image files"):
        client.submit({**yaml.safe_load(job_yaml.read_text()), "instance_images": [str(tmp_path / "empty")]})
    assert controller.requests == []


def test_get_list_cancel_delete(client):
    assert client.get("job-4").state == S.STATE_TRAINING
    with pytest.raises(ClientError) as error:
        client.get("job-99")
    assert (error.value.code, error.value.message) == ("NOT_FOUND", "job 'job-99' not found")
    assert [j.job_id for j in client.list(page_size=2)] == ["job-5", "job-4", "job-3", "job-2", "job-1"]
    assert [j.job_id for j in client.list(states=["failed", S.STATE_CANCELLED])] == ["job-2", "job-1"]
    assert [j.job_id for j in client.list(states="QUEUED")] == ["job-5"]
    assert client.cancel("job-4").state == S.STATE_CANCELLING
    with pytest.raises(ClientError, match="FAILED_PRECONDITION: job job-3 already ended"):
        client.cancel("job-3")
    client.delete("job-1")
    with pytest.raises(ClientError, match="NOT_FOUND"):
        client.get("job-1")


def test_list_pages_lazily(client, controller):
    jobs = client.list(page_size=2)
    assert next(jobs).job_id == "job-5"
    assert len(controller.requests) == 1
    assert len(list(jobs)) == 4 and len(controller.requests) == 3


def test_watch_streams_every_update(client):
    updates = list(client.watch("job-4"))
    assert [u.WhichOneof("change") for u in updates] == ["state", "progress", "state"]
    assert updates[1].progress.step == 5 and updates[-1].job.state == S.STATE_SUCCEEDED
    with pytest.raises(ClientError, match="NOT_FOUND"):
        list(client.watch("job-99"))


class _EndsInAStateOfALaterVersion(FakeController):
    """A newer controller: its job ends in a state this SDK has no name for."""

    def __init__(self) -> None:
        super().__init__()
        self.watches = 0

    def WatchJob(self, request, context):
        self.watches += 1
        yield S.WatchJobResponse(job=_job(request.job_id, S.STATE_TRAINING, step=1), state=S.STATE_TRAINING)
        yield S.WatchJobResponse(job=_job(request.job_id, 42), state=42)


def test_a_watch_that_ends_ok_is_over_whatever_the_last_state():
    """The stream ends OK only once its job has ended: an SDK that judged by the states it knows opened it again, and
    again, for ever."""
    fake = _EndsInAStateOfALaterVersion()
    server, target = _serve(fake)
    try:
        with DreamBoothClient(target, TOKEN) as client:
            assert [u.job.state for u in client.watch("job-4")] == [S.STATE_TRAINING, 42]
        assert fake.watches == 1
    finally:
        server.stop(grace=None)


class _StreamUntilStopped(FakeController):
    """Streams a job's first update, then holds the stream open until its server stops."""

    def WatchJob(self, request, context):
        self._auth(request, context)
        yield S.WatchJobResponse(job=_job(request.job_id, S.STATE_TRAINING, step=1), state=S.STATE_TRAINING)
        while context.is_active():
            time.sleep(0.01)


def test_watch_goes_on_across_a_controller_restart():
    first, target = _serve(_StreamUntilStopped())
    restarted: list[grpc.Server] = []
    try:
        with DreamBoothClient(target, TOKEN) as client:
            updates = client.watch("job-4", reconnect_for_s=30)
            assert next(updates).job.state == S.STATE_TRAINING
            first.stop(grace=None)  # the stream breaks; the controller comes back on the same port a bit later
            second = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
            jobs_pb2_grpc.add_JobServiceServicer_to_server(FakeController(), second)
            second.add_insecure_port(target)
            threading.Timer(0.5, second.start).start()
            restarted.append(second)
            states = [update.job.state for update in updates]
        assert states == [S.STATE_TRAINING, S.STATE_TRAINING, S.STATE_SUCCEEDED]  # the new stream, from its start
    finally:
        for server in (first, *restarted):
            server.stop(grace=None)


def test_watch_gives_up_when_the_controller_stays_away():
    server, target = _serve(_StreamUntilStopped())
    with DreamBoothClient(target, TOKEN) as client:
        updates = client.watch("job-4", reconnect_for_s=1)
        next(updates)
        server.stop(grace=None)
        with pytest.raises(ClientError) as error:
            next(updates)
    assert error.value.code == "UNAVAILABLE" and "no answer from the controller for 1 s" in error.value.message


class _WatchesFull(FakeController):
    def WatchJob(self, request, context):
        context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "64 watches open")


def test_cli_watch_that_stops_following_a_job_does_not_say_it_failed(monkeypatch, capsys):
    """A script running `submit --watch || resubmit` took a controller away for minutes (or too many watches
    open) for a failed job, and trained it twice: its end is unknown, exit WATCH_LOST."""
    server, target = _serve(_WatchesFull())
    try:
        monkeypatch.setenv("DREAMBOOTH_TOKEN", TOKEN)
        code = main(["watch", "job-4", "--controller", target])
    finally:
        server.stop(grace=None)
    err = capsys.readouterr().err
    assert code == 3
    assert (
        "error: RESOURCE_EXHAUSTED: 64 watches open" in err and "job-4: could not follow it; `dreambooth watch" in err
    )
    # No controller answered (restarting, or a wrong address: alike): the job's end is unknown, not failed.
    assert main(["watch", "job-4", "--controller", f"127.0.0.1:{free_port()}"]) == 3
    err = capsys.readouterr().err
    assert "no controller answers at 127.0.0.1" in err and "job-4: could not follow it" in err


def test_the_sdk_reads_the_environment_as_the_cli_does(controller, monkeypatch):
    monkeypatch.setenv("DREAMBOOTH_CONTROLLER", controller.target)
    monkeypatch.setenv("DREAMBOOTH_TOKEN", TOKEN)
    with DreamBoothClient() as client:
        assert client.get("job-4").job_id == "job-4"
    # The demo's client of its own local stack: not this user's token, nor TLS meant for another controller.
    monkeypatch.setenv("DREAMBOOTH_TLS_CA", "/nonexistent/ca.pem")
    with DreamBoothClient(controller.target, from_environment=False) as local, pytest.raises(ClientError) as error:
        local.get("job-4")
    assert error.value.code == "UNAUTHENTICATED"


def test_logs_and_models(client):
    assert client.logs("job-3") == "training job-3\nstep 1"
    assert [m.model_id for m in client.models()] == ["model-3"]
    assert client.model("model-3").job_id == "job-3"
    assert client.deploy("model-3").endpoint.startswith("http://")
    assert not client.undeploy("model-3").deployed
    with pytest.raises(ClientError, match="NOT_FOUND"):
        client.model("model-9")


def test_the_token_is_sent_on_every_call(controller):
    with DreamBoothClient(controller.target, "wrong") as wrong, DreamBoothClient(controller.target) as anonymous:
        for c in (wrong, anonymous):
            with pytest.raises(ClientError) as error:
                c.get("job-4")
            assert error.value.code == "UNAUTHENTICATED"
            with pytest.raises(ClientError, match="UNAUTHENTICATED"):
                list(c.watch("job-4"))


def test_a_tokens_surrounding_whitespace_is_dropped_and_another_unprintable_character_refused(
    controller, monkeypatch, capsys
):
    """A token from a Kubernetes Secret written by `echo` ends in a newline: gRPC refused the header ("INTERNAL:
    Invalid metadata", exit 1, and watch's 3: try again), which no retry could fix, and which named no token."""
    with DreamBoothClient(controller.target, f" {TOKEN}\n") as client:
        assert client.get("job-4").job_id == "job-4" and client.token == TOKEN
    for token in ("t\u00f6ken", "t0\nken", "t0ken\x00"):
        with pytest.raises(InputError) as refused:
            DreamBoothClient(controller.target, token)
        assert refused.value.field == "token" and token not in refused.value.message  # the secret is not printed
    monkeypatch.setenv("DREAMBOOTH_TOKEN", "t\u00f6ken")
    for command in ("jobs", "watch"):
        assert main([command, *(["job-4"] if command == "watch" else []), "--controller", controller.target]) == 2
        assert "error: token: character 2 of 5 is U+00F6, and a token is printable ASCII" in capsys.readouterr().err


@pytest.mark.parametrize(
    "target",
    [
        "127.0.0.1:99999",
        "127.0.0.1:0",
        "127.0.0.1",
        "controller.example.com",
        "127.0.0.1:",
        "127.0.0.1:grpc",
        "::1:50051",
        "[::1]",
        "[::1]50051",
        "[]:50051",
    ],
)
def test_a_controller_address_without_a_port_or_with_one_out_of_range_is_refused(target):
    """gRPC took 99999 as 34463 (99999 - 65536, where another server may listen) and a name without a port as :443."""
    with pytest.raises(InputError) as refused:
        DreamBoothClient(target)
    assert refused.value.field == "controller" and refused.value.message.startswith(f"{target}: ")


def test_the_controller_address_forms_that_are_taken(capsys):
    taken = ["[::1]:50051", "localhost:50051", "10.0.0.7:1", "unix:/run/dreambooth.sock", "dns:controller:443"]
    taken += ["dns:///controller:50051", "unix:///run/dreambooth.sock"]  # gRPC's naming.md's own forms
    for target in taken:
        with DreamBoothClient(target) as client:  # no call: gRPC connects on the first one
            assert client.target == target
    with DreamBoothClient("localhost:50051\n") as client:  # $DREAMBOOTH_CONTROLLER from a file
        assert client.target == "localhost:50051"
    assert main(["jobs", "--controller", "127.0.0.1:99999"]) == 2
    assert "error: controller: 127.0.0.1:99999: '99999' is not a port (1-65535)" in capsys.readouterr().err


def test_unreachable_controller(tmp_path):

    with DreamBoothClient(f"127.0.0.1:{free_port()}", TOKEN, timeout_s=5) as c:
        with pytest.raises(ClientError) as error:
            c.get("job-4")
        assert error.value.code == "UNAVAILABLE"
        with pytest.raises(ClientError) as error:  # a watch that never opened is not reconnected for minutes
            next(c.watch("job-4", reconnect_for_s=300))
        assert error.value.code == "UNAVAILABLE"


def test_tls(tmp_path):
    cert, key = _self_signed_certificate()
    fake = FakeController()
    server, target = _serve(fake, grpc.ssl_server_credentials([(key, cert)]))
    try:
        (tmp_path / "ca.pem").write_bytes(cert)
        with DreamBoothClient(target, TOKEN, tls_ca=tmp_path / "ca.pem") as c:
            assert c.get("job-4").job_id == "job-4"
        with DreamBoothClient(target, TOKEN, timeout_s=5) as plain, pytest.raises(ClientError):
            plain.get("job-4")  # a plaintext client cannot talk to a TLS server
    finally:
        server.stop(grace=None)


def test_tls_with_the_systems_cas_where_python_has_no_bundle_file(monkeypatch, tmp_path):
    """A Python built to read its CAs from a directory (python-build-standalone on Debian: a compiled-in bundle path
    that does not exist) crashed `--tls-ca system` with FileNotFoundError: gRPC's own roots then, not a traceback."""
    import ssl

    missing = str(tmp_path / "no-such-bundle.pem")
    paths = ssl.DefaultVerifyPaths(None, "/etc/ssl/certs", "SSL_CERT_FILE", missing, "SSL_CERT_DIR", "/etc/ssl/certs")
    monkeypatch.setattr(ssl, "get_default_verify_paths", lambda: paths)
    with DreamBoothClient("127.0.0.1:1", TOKEN, tls_ca="system", timeout_s=1) as client:
        with pytest.raises(ClientError) as error:  # it tried TLS to nothing there: no crash building the channel
            client.get("job-4")
        assert error.value.code in ("UNAVAILABLE", "DEADLINE_EXCEEDED")


def test_a_plaintext_client_of_a_tls_controller_is_told_to_give_its_ca(tmp_path, monkeypatch, capsys):
    """Without --tls-ca, a controller serving TLS was "no controller answers ...: start one with `dreambooth up`"; a
    --tls-ca file without a certificate (the key, a DER file) was "serves plaintext, or not the CA that signed it"."""
    cert, key = _self_signed_certificate()
    server, target = _serve(FakeController(), grpc.ssl_server_credentials([(key, cert)]))
    monkeypatch.setenv("DREAMBOOTH_TOKEN", TOKEN)
    monkeypatch.delenv("DREAMBOOTH_TLS_CA", raising=False)
    try:
        for command in (["jobs"], ["watch", "job-4"]):
            assert main([*command, "--controller", target]) == (1 if command == ["jobs"] else 3)
            err = capsys.readouterr().err
            assert f"error: something at {target} took the connection and closed it: a controller serving TLS" in err
            assert "--tls-ca CA.pem, or --tls-ca system" in err and "dreambooth up" not in err
        (tmp_path / "key.pem").write_bytes(key)
        (tmp_path / "ca.der").write_bytes(os.urandom(512))
        for ca in ("key.pem", "ca.der"):
            assert main(["jobs", "--controller", target, "--tls-ca", str(tmp_path / ca)]) == 2
            err = capsys.readouterr().err
            assert (
                err.startswith(f"error: tls_ca: {tmp_path / ca}: no PEM certificate in it (") and "handshake" not in err
            )
        # A bundle's comments may be UTF-8 (p11-kit names each CA): gRPC and ssl take it, and so does the check.
        (tmp_path / "ca.pem").write_bytes("# NetLock Arany (Class Gold) Főtanúsítvány\n".encode() + cert)
        assert main(["jobs", "--controller", target, "--tls-ca", str(tmp_path / "ca.pem")]) == 0
    finally:
        server.stop(grace=None)


def test_a_wrong_port_or_name_is_told_as_such_not_as_no_controller(tmp_path, monkeypatch, capsys):
    """Serve's or the dashboard's port given for the controller's was told to add --tls-ca (and with it, that the
    controller serves plaintext: round in a circle); a certificate that does not name the address connected to (a
    port-forward to localhost) was "no controller answers: start one with `dreambooth up`"."""
    import http.server

    monkeypatch.setenv("DREAMBOOTH_TOKEN", TOKEN)
    monkeypatch.delenv("DREAMBOOTH_TLS_CA", raising=False)
    web = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    threading.Thread(target=web.serve_forever, daemon=True).start()
    cert, key = _self_signed_certificate(dns_name="dreambooth-controller.example")  # not the address connected to
    server, target = _serve(FakeController(), grpc.ssl_server_credentials([(key, cert)]))
    (tmp_path / "ca.pem").write_bytes(cert)
    try:
        assert main(["jobs", "--controller", f"127.0.0.1:{web.server_port}"]) == 1
        err = capsys.readouterr().err.splitlines()[-1]  # after the web server's own log lines
        assert err.startswith(
            f"error: an HTTP server (or another that is not gRPC) answers at 127.0.0.1:{web.server_port}"
        )
        assert main(["jobs", "--controller", target, "--tls-ca", str(tmp_path / "ca.pem")]) == 1
        err = capsys.readouterr().err
        assert "error: the controller's certificate does not name 127.0.0.1: connect by a name" in err
        assert "I1" not in err  # gRPC's informational lines of the failed handshakes
    finally:
        server.stop(grace=None)
        web.shutdown()


def test_a_ca_file_that_cannot_be_read_is_named_with_the_setting_that_gave_it(tmp_path, monkeypatch, capsys):
    """A stale $DREAMBOOTH_TLS_CA failed every command with a bare "[Errno 2] No such file or directory", naming
    neither the option nor the variable; the SDK raised FileNotFoundError, not InputError."""
    missing = tmp_path / "gone.pem"
    with pytest.raises(InputError) as refused:
        DreamBoothClient("127.0.0.1:1", TOKEN, tls_ca=missing)
    assert refused.value.field == "tls_ca"
    assert refused.value.message == f"{missing}: No such file or directory (--tls-ca or $DREAMBOOTH_TLS_CA)"
    monkeypatch.setenv("DREAMBOOTH_TLS_CA", str(tmp_path))  # a directory
    assert main(["jobs", "--controller", "127.0.0.1:1"]) == 2
    assert capsys.readouterr().err == f"error: tls_ca: {tmp_path}: Is a directory (--tls-ca or $DREAMBOOTH_TLS_CA)\n"


def _self_signed_certificate(dns_name: str | None = None) -> tuple[bytes, bytes]:
    """A certificate for 127.0.0.1 (an IP SAN, which is what gRPC checks the target against), or for `dns_name` only,
    and its key."""
    import ipaddress

    x509 = pytest.importorskip("cryptography.x509")
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, "dreambooth-test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName(dns_name) if dns_name else x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


# --- CLI ------------------------------------------------------------------------------------------------


@pytest.fixture
def cli(controller, monkeypatch, capsys):
    """Run `dreambooth ARGS` against the fake controller (found through the environment, like a user's)."""
    monkeypatch.setenv("DREAMBOOTH_CONTROLLER", controller.target)
    monkeypatch.setenv("DREAMBOOTH_TOKEN", TOKEN)

    def run(*args: str) -> tuple[int, str, str]:
        code = main(list(args))
        out, err = capsys.readouterr()
        return code, out, err

    return run


def test_cli_submit_and_watch(cli, job_yaml, controller):
    code, out, err = cli("submit", str(job_yaml), "--priority", "3", "--watch")
    assert code == 0
    assert out.splitlines()[0] == "job-6"
    assert "job-6 SUCCEEDED: model" in out
    assert "[QUEUED]" not in err and "[TRAINING]" in err and "[SUCCEEDED]" in err
    assert "loss 0.5000, eta 3s" in err
    assert controller.requests[0].priority == 3
    code, out, _ = cli("submit", str(job_yaml), "--no-upload")
    assert code == 0 and out.strip() == "job-7" and controller.requests[-1].instance_images[0].uri


def test_ctrl_c_says_what_stands_for_the_command_interrupted(cli, job_yaml, monkeypatch):
    """Ctrl-C during a submission's upload (minutes of photos on a slow link) gave no request id: the same command
    again queued a second job if the controller had the first. And every command's Ctrl-C spoke of jobs going on."""

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(DreamBoothClient, "submit", interrupted)
    code, out, err = cli("submit", str(job_yaml), "--request-id", "my-first-try")
    assert (code, out) == (130, "")
    assert err.startswith("interrupted; if the controller got the submission before that, the job is queued: run ")
    assert "`--request-id my-first-try`" in err
    monkeypatch.setattr(DreamBoothClient, "model", interrupted)
    assert cli("generate", "model-3", "a photo of sks dog") == (130, "", "interrupted\n")
    monkeypatch.setattr(DreamBoothClient, "watch", interrupted)
    code, _, err = cli("watch", "job-1")
    assert code == 130 and "jobs go on" in err


def test_a_queued_job_says_what_it_waits_for():
    from dreambooth.cli import _state_line

    why = S.Queued(reason="WAITING_FOR_RESOURCES", message="next to start; needs 2 GPUs (...), 1 free")
    assert (
        _state_line(_job("job-9", S.STATE_QUEUED, queued=why)) == "[QUEUED] next to start; needs 2 GPUs (...), 1 free"
    )
    assert _state_line(_job("job-9", S.STATE_QUEUED)) == "[QUEUED]"  # before the controller's first pass saw it
    assert _state_line(_job("job-9", S.STATE_TRAINING)) == "[TRAINING]"


def test_cli_watch_exit_codes(cli):
    assert cli("watch", "job-4")[0] == 0
    code, out, err = cli("watch", "job-2")
    assert code == 1 and "[FAILED]" in err and "job-2 FAILED: TRAINING_FAILED: NaN loss" in out


class _SubmitLost(FakeController):
    """Every submission fails with `code` (the connection dropped, gRPC's retries used up), after it was seen."""

    code = grpc.StatusCode.UNAVAILABLE

    def SubmitJob(self, request, context):
        self.requests.append(request)
        context.abort(self.code, "Socket closed")


@pytest.mark.parametrize("code", [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED])
def test_cli_submit_that_may_have_been_queued_says_how_to_retry_it_safely(code, job_yaml, monkeypatch, capsys):
    """The SDK's request id was never shown: after a submission lost this way (the controller may have recorded it
    before the connection dropped), running the command again queued a second job beside the first."""
    fake = _SubmitLost()
    fake.code = code
    server, target = _serve(fake)
    monkeypatch.setenv("DREAMBOOTH_TOKEN", TOKEN)
    try:
        assert main(["submit", str(job_yaml), "--controller", target]) == 1
        err = capsys.readouterr().err
        (request_id,) = {request.request_id for request in fake.requests}  # the retries sent the same one
        # UNAVAILABLE's 4 attempts (CANCELLED's one), each sent once: not retried by gRPC as well.
        assert len(fake.requests) == (4 if code == grpc.StatusCode.UNAVAILABLE else 1)
        assert f"run this command again with `--request-id {request_id}`, which returns that job" in err
        assert main(["submit", str(job_yaml), "--controller", target, "--request-id", "mine"]) == 1
        assert "again with `--request-id mine`" in capsys.readouterr().err
        assert fake.requests[-1].request_id == "mine"
    finally:
        server.stop(grace=None)


class _UnavailableAfterAWhile(FakeController):
    """Answers every submission UNAVAILABLE after working on it for a while (its database down after the photo
    checks, say)."""

    def SubmitJob(self, request, context):
        self.requests.append(request)
        time.sleep(0.6)
        context.abort(grpc.StatusCode.UNAVAILABLE, "database is unavailable")


def test_a_submissions_retries_share_its_deadline(job_yaml):
    """Each attempt had a deadline of its own: a controller answering UNAVAILABLE late made one call last four."""
    fake = _UnavailableAfterAWhile()
    server, target = _serve(fake)
    try:
        with DreamBoothClient(target, TOKEN, timeout_s=1.5) as client, pytest.raises(ClientError) as failed:
            started = time.monotonic()
            client.submit(job_yaml, upload=False)
        assert failed.value.code in ("UNAVAILABLE", "DEADLINE_EXCEEDED") and not failed.value.never_sent
        assert time.monotonic() - started < 2.5 and len(fake.requests) <= 3
    finally:
        server.stop(grace=None)


class _GoneAfterSubmit(FakeController):
    """Takes a submission, then goes away before answering (a controller restarting): the retries of the call find
    no one there, and the last one's error is "failed to connect"."""

    def SubmitJob(self, request, context):
        self.requests.append(request)
        threading.Thread(target=self.server.stop, args=(None,)).start()
        time.sleep(0.3)  # stopped meanwhile
        context.abort(grpc.StatusCode.UNAVAILABLE, "going away")


def test_cli_submit_that_never_reached_a_controller_does_not_say_the_job_may_be_queued(job_yaml, monkeypatch, capsys):
    """Nothing listening: the submission was never sent, and the advice to send it again with its request id sent
    users looking for a job that does not exist. A submission retried after the controller got it still gets the
    advice, although its last attempt's error reads the same."""
    monkeypatch.setenv("DREAMBOOTH_TOKEN", TOKEN)
    nowhere = f"127.0.0.1:{free_port()}"
    with DreamBoothClient(nowhere, TOKEN, timeout_s=5) as client, pytest.raises(ClientError) as failed:
        client.submit(job_yaml)
    assert failed.value.code == "UNAVAILABLE" and failed.value.never_sent
    assert main(["submit", str(job_yaml), "--controller", nowhere]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: no controller answers at {nowhere}: start one") and "--request-id" not in err

    gone = _GoneAfterSubmit()
    gone.server, target = _serve(gone)
    assert main(["submit", str(job_yaml), "--controller", target]) == 1
    err = capsys.readouterr().err
    assert f"error: no controller answers at {target}: start one" in err  # the last attempt's error
    assert f"again with `--request-id {gone.requests[0].request_id}`, which returns that job" in err
    assert len(gone.requests) == 1


def test_cli_jobs_table(cli):
    code, out, _ = cli("jobs")
    lines = out.splitlines()
    assert code == 0 and lines[0].split() == ["ID", "STATE", "STEP", "LOSS", "AGE"]
    assert lines[2].split()[:4] == ["job-4", "TRAINING", "3/10", "0.1250"]
    assert lines[1].split()[1:4] == ["QUEUED", "-", "-"]
    assert lines[1].split()[4].endswith("d")  # created in 2023
    code, out, _ = cli("jobs", "--state", "SUCCEEDED", "--state", "failed")
    assert [line.split()[0] for line in out.splitlines()[1:]] == ["job-3", "job-2"]
    code, _, err = cli("jobs", "--state", "RUNNING")
    assert code == 2 and "error: state: unknown state 'RUNNING'" in err


def test_cli_lists_as_json_lines_for_scripts(cli):
    code, out, _ = cli("jobs", "--json")
    jobs = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and jobs[1]["job_id"] == "job-4" and jobs[1]["state"] == "STATE_TRAINING"
    assert jobs[1]["progress"]["step"] == 3 and jobs[1]["progress"]["total_steps"] == 10
    code, out, _ = cli("models", "--json")
    [model] = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and (model["model_id"], model["job_id"]) == ("model-3", "job-3")


def test_cli_cancel_delete_models_logs(cli, controller):
    assert cli("cancel", "job-4")[:2] == (0, "job-4 CANCELLING\n")
    assert cli("delete", "job-1")[:2] == (0, "job-1 deleted\n") and "job-1" not in controller.jobs
    assert cli("logs", "job-3")[:2] == (0, "training job-3\nstep 1\n")
    code, out, _ = cli("models")
    assert code == 0 and out.splitlines()[1].split()[:4] == ["model-3", "job-3", "no", "-"]


def test_cli_delete_model(cli, controller):
    controller.models["model-3"].deployed = True
    code, _, err = cli("delete-model", "model-3")
    assert code == 2 and err == "error: FAILED_PRECONDITION: model model-3 is deployed: undeploy it first\n"
    assert cli("undeploy", "model-3")[:2] == (0, "model-3 undeployed\n")  # as deploy, cancel, delete say theirs
    controller.serving_lags = 2  # serving applies the undeploy a moment later: the delete waits for it
    assert cli("delete-model", "model-3")[:2] == (0, "model-3 deleted\n") and not controller.models
    code, _, err = cli("delete-model", "model-3")
    assert code == 2 and err.startswith("error: NOT_FOUND: ")


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["cancel", "job-3"], 2, "error: FAILED_PRECONDITION: job job-3 already ended"),
        (["watch", "job-99"], 2, "error: NOT_FOUND: job 'job-99' not found"),
        (
            ["logs", "job-4", "--token", "wrong"],
            2,
            "error: UNAUTHENTICATED: missing or unknown bearer token (the token: --token or $DREAMBOOTH_TOKEN, which "
            "is set)",
        ),
    ],
)
def test_cli_errors(cli, args, code, message):
    result, _, err = cli(*args)
    assert (result, err.strip()) == (code, message)


def test_cli_options_override_the_environment(cli, controller, monkeypatch):
    monkeypatch.setenv("DREAMBOOTH_CONTROLLER", "127.0.0.1:1")
    monkeypatch.delenv("DREAMBOOTH_TOKEN")
    assert cli("cancel", "job-5", "--controller", controller.target, "--token", TOKEN)[0] == 0
    code, _, err = cli("jobs")
    assert code == 1 and err.startswith("error: no controller answers at 127.0.0.1:1: start one with `dreambooth up`")
    code, _, err = cli("jobs", "--controller", f"http://{controller.target}")
    assert code == 2 and "give HOST:PORT, without a scheme" in err


def test_cli_bad_spec_is_a_local_error(cli, job_yaml, controller):
    job_yaml.write_text(job_yaml.read_text().replace("max_steps: 20", "max_steps: 0"))
    code, _, err = cli("submit", str(job_yaml))
    assert code == 2 and err.startswith("error: max_steps: ") and controller.requests == []


def test_cli_mistakes_are_named_not_tracebacks(cli, job_yaml, controller, tmp_path):
    code, _, err = cli("submit", str(job_yaml.parent / "photos" / "0.jpg"))  # a photo as the spec
    assert code == 2 and "not a YAML or JSON text file" in err
    job_yaml.write_text(job_yaml.read_text() + "yes: 1\nfoo: 2\n")  # YAML reads `yes` as a boolean
    code, _, err = cli("submit", str(job_yaml))
    assert code == 2 and "unknown field(s) ['True', 'foo']" in err
    job_yaml.write_text(job_yaml.read_text().replace("yes: 1\nfoo: 2\n", ""))
    code, _, err = cli("submit", str(job_yaml), "--priority", "3000000000")
    assert code == 2 and "error: priority: " in err
    with pytest.raises(SystemExit) as usage:
        main(["up", "--controller-port", "70000"])
    assert usage.value.code == 2
    (tmp_path / "stack").mkdir()
    (tmp_path / "stack" / "state.json").write_text('{"dir": "trunc')
    code, _, err = cli("status", "--dir", str(tmp_path / "stack"))
    assert code == 1 and "state.json is unreadable" in err
    code, _, err = cli("down", "--dir", str(tmp_path / "stack"))
    assert code == 1 and "state.json is unreadable" in err
    assert controller.requests == []


def test_cli_demo_refuses_a_folder_it_did_not_write(cli, job_yaml):
    code, _, err = cli("demo", "--out", str(job_yaml.parent))  # a project: its job.yaml would be overwritten
    assert code == 2 and "holds files the demo did not write" in err
    assert sorted(p.name for p in job_yaml.parent.iterdir()) == ["job.yaml", "photos"]


@pytest.fixture
def serving_api():
    """A stand-in for the serving API's HTTP (serving/http_api.py) on 127.0.0.1: generate answers `refusals`
    ((status, Retry-After) pairs) in turn, then each image's PNG as the request's prompt; GET answers `statuses` in
    turn, then 200."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            api.bodies.append(body)
            api.authorizations.append(self.headers.get("Authorization"))
            if api.refusals:
                status, retry_after = api.refusals.pop(0)
                refusal = {"detail": "busy; retry later", "code": "overloaded"}
                self._answer(status, refusal, {"Retry-After": retry_after})
                return
            png = base64.b64encode(body["prompt"].encode()).decode()
            # As the serving API: a request without a seed gets one the server chooses.
            seed = body["seed"] if body.get("seed") is not None else random.randrange(2**31)
            images = [{"seed": seed + i, "png_base64": png} for i in range(body.get("num_images", 1))]
            self._answer(200, {"images": images})

        def do_GET(self):
            status = api.statuses.pop(0) if api.statuses else 200
            self._answer(status, {"detail": "no" if status != 200 else None, "model_id": "model-3"})

        def _answer(self, status: int, payload: dict, headers: dict[str, str] | None = None) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    api = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    api.statuses, api.bodies, api.refusals, api.authorizations = [], [], [], []
    api.endpoint = f"http://127.0.0.1:{api.server_port}/v1/models/model-3/generate"
    threading.Thread(target=api.serve_forever, daemon=True).start()
    yield api
    api.shutdown()


@contextlib.contextmanager
def recording_proxy():
    """An HTTP proxy on 127.0.0.1 that lets nothing through, as a company's proxy does for an address it cannot
    reach: it records each request's first line (CONNECT HOST:PORT for gRPC and https, the whole URL for http) and
    answers 502."""

    class Handler(socketserver.StreamRequestHandler):
        def handle(self):
            proxy.seen.append(self.rfile.readline().decode("latin-1").strip())
            length = 0
            while (line := self.rfile.readline()) not in (b"\r\n", b"\n", b""):
                name, _, value = line.decode("latin-1").partition(":")
                length = int(value) if name.strip().lower() == "content-length" else length
            self.rfile.read(length)  # all of it: a close with unread bytes would be a reset, not the 502
            self.wfile.write(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")

    proxy = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
    proxy.daemon_threads = True
    proxy.seen = []
    proxy.url = f"http://127.0.0.1:{proxy.server_address[1]}"
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    try:
        yield proxy
    finally:
        proxy.shutdown()
        proxy.server_close()


def use_proxy(monkeypatch: pytest.MonkeyPatch, url: str) -> None:
    """The environment of a company's laptop: every proxy variable names `url`, and no_proxy only localhost (a
    common value), not 127.0.0.1."""
    for name in ("http_proxy", "https_proxy", "grpc_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        monkeypatch.setenv(name, url)
    monkeypatch.setenv("no_proxy", "localhost")
    for name in ("NO_PROXY", "no_grpc_proxy"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def company_proxy(monkeypatch):
    with recording_proxy() as proxy:
        use_proxy(monkeypatch, proxy.url)
        yield proxy


def test_loopback_addresses_go_around_the_environments_proxy(company_proxy, controller, serving_api):
    """With http_proxy set and no_proxy=localhost, the SDK's calls to 127.0.0.1 (a local stack's controller and
    serving API) went to the proxy: it answered 502 ("no controller answers"), and got the prompt and the token."""
    with DreamBoothClient(controller.target, TOKEN, timeout_s=10) as client:
        assert client.get("job-4").job_id == "job-4"
    wait_until_served(serving_api.endpoint, timeout_s=10)
    assert generate(serving_api.endpoint, "a photo of sks dog", seed=0) == [GeneratedImage(b"a photo of sks dog", 0)]
    assert company_proxy.seen == []
    # Other hosts still go through it: the proxy is the way out of the company's network.
    with DreamBoothClient("controller.example:50051", TOKEN, timeout_s=5) as client, pytest.raises(ClientError):
        client.get("job-4")
    remote = "http://serving.example:8000/v1/models/model-3/generate"
    with pytest.raises(ServingError) as refused:
        generate(remote, "a photo of sks dog", seed=0)
    assert refused.value.status == 502
    assert set(company_proxy.seen) == {"CONNECT controller.example:50051 HTTP/1.1", f"POST {remote} HTTP/1.1"}


def test_a_token_sent_over_plain_http_to_another_machine_is_warned_of_once(
    company_proxy, serving_api, monkeypatch, capsys
):
    """deploy/README's cluster-launcher recipe serves on http://HEAD:8000: every generate sent the tenant's token,
    which also cancels and deletes its jobs, in cleartext across the network, without a word."""
    monkeypatch.setattr(serving_client, "_CLEARTEXT_TOLD", threading.Event())
    generate(serving_api.endpoint, "a photo of sks dog", token=TOKEN, seed=0)  # loopback: it never leaves the machine
    remote = "serving.example:8000/v1/models/model-3/generate"
    for _ in range(2):
        with pytest.raises(ServingError):  # sent all the same (to the proxy here): a warning, not a refusal
            generate(f"http://{remote}", "a photo of sks dog", token=TOKEN, seed=0)
    with pytest.raises(ServingUnreachable):  # https: the proxy refuses the tunnel
        generate(f"https://{remote}", "a photo of sks dog", token=TOKEN, seed=0)
    assert capsys.readouterr().err == (
        "warning: the bearer token goes to serving.example over plain http://, readable on the network: an https:// "
        "address for the serving API (the controller's serving.public_url) keeps it private\n"
    )
    assert company_proxy.seen.count(f"POST http://{remote} HTTP/1.1") == 2
    monkeypatch.setattr(serving_client, "_CLEARTEXT_TOLD", threading.Event())
    with pytest.raises(ServingError):
        generate(f"http://{remote}", "a photo of sks dog", seed=0)  # no token, nothing to read
    assert capsys.readouterr().err == ""


def test_cli_generate_names_files_so_that_another_prompt_keeps_them(cli, controller, serving_api, tmp_path):
    model = controller.models["model-3"]
    model.deployed, model.endpoint = True, serving_api.endpoint
    prompts = ["a photo of sks dog", "a photo of sks dog in the snow"]
    for prompt in prompts:  # the same default seed
        code, _, err = cli("generate", "model-3", prompt, "--out", str(tmp_path / "images"))
        assert code == 0, err
    assert sorted(p.read_bytes() for p in (tmp_path / "images").iterdir()) == [p.encode() for p in prompts]
    # What the user did not set is not sent: the serving API's defaults apply, not a copy of them.
    assert not {"steps", "guidance_scale", "width", "height"} & set(serving_api.bodies[0])
    assert cli("generate", "model-3", prompts[0], "--steps", "5", "--out", str(tmp_path / "images"))[0] == 0
    assert serving_api.bodies[-1]["steps"] == 5


def test_cli_generate_says_a_model_deployed_on_a_controller_without_serving_is_served_nowhere(cli, controller):
    """Its `serving:` section removed since the deploy: the model is still marked deployed, with no endpoint, which
    `generate` sent to urllib (a ValueError's traceback)."""
    controller.models["model-3"].deployed = True
    code, _, err = cli("generate", "model-3", "a photo of sks dog")
    assert (code, err) == (1, "error: model model-3 is served nowhere: its controller has no serving\n")


def test_cli_generate_refuses_an_out_that_is_a_file_before_generating(cli, controller, serving_api, tmp_path):
    """`--out result.png` failed after the serving API had done the work (a model load, the GPU's time), and the
    images were lost."""
    model = controller.models["model-3"]
    model.deployed, model.endpoint = True, serving_api.endpoint
    (tmp_path / "result.png").write_bytes(b"")
    code, _, err = cli("generate", "model-3", "a photo of sks dog", "--out", str(tmp_path / "result.png"))
    assert (
        code == 2
        and err == f"error: out: {tmp_path / 'result.png'} is a file: give a directory for the PNGs (made if need be)\n"
    )
    code, _, err = cli("generate", "model-3", "a photo of sks dog", "--out", str(tmp_path / "result.png" / "in"))
    assert code == 2 and err.startswith(f"error: out: {tmp_path / 'result.png' / 'in'}: cannot make the directory (")
    assert serving_api.bodies == []  # refused before generating


def test_cli_generate_sends_the_token_the_controller_got(cli, controller, serving_api, tmp_path, monkeypatch):
    model = controller.models["model-3"]
    model.deployed, model.endpoint = True, serving_api.endpoint
    monkeypatch.setenv("DREAMBOOTH_TOKEN", f"{TOKEN}\n")  # a Secret's trailing newline: dropped for both
    assert cli("generate", "model-3", "a photo of sks dog", "--out", str(tmp_path))[0] == 0
    assert serving_api.authorizations == [f"Bearer {TOKEN}"]
    # The SDK's own calls too (it is the controller's token): http.client refused the header, printing the token.
    generate(serving_api.endpoint, "a photo of sks dog", token=f"{TOKEN}\n", seed=1)
    assert serving_api.authorizations[-1] == f"Bearer {TOKEN}"
    with pytest.raises(InputError) as refused:
        generate(serving_api.endpoint, "a photo of sks dog", token="t\u00f6ken")
    assert refused.value.field == "token" and "t\u00f6ken" not in refused.value.message


def test_an_endpoint_whose_host_does_not_resolve_here_is_not_waited_for(cli, controller, monkeypatch):
    """A ConfigMap's public_url naming the cluster's own Service: from outside the cluster, deploy's wait retried the
    name for 5 minutes, then exited 1 as if the deploy had failed, without saying that the model was deployed."""
    endpoint = "http://dreambooth-serve.dreambooth.invalid:8000/v1/models/model-3/generate"
    waits = []
    monkeypatch.setattr(serving_client.time, "sleep", waits.append)
    host_unknown = (
        r"dreambooth-serve\.dreambooth\.invalid, the host of http://dreambooth-serve\.dreambooth\.invalid:8000/"
    )
    with pytest.raises(ServingHostUnknown, match=host_unknown):
        wait_until_served(endpoint, timeout_s=5)
    assert waits == []  # not tried again
    controller.models["model-3"].endpoint = endpoint
    code, out, err = cli("deploy", "model-3")
    assert (code, out) == (1, "") and controller.models["model-3"].deployed and waits == []
    assert err.splitlines()[-1].startswith("error: model-3 is deployed, but dreambooth-serve.dreambooth.invalid, ")
    assert err.endswith(
        "does the controller's serving.public_url name an address for inside the cluster? (--no-wait "
        "skips this check)\n"
    )


def test_cli_deploy_says_what_the_serving_api_refused(cli, controller, serving_api):
    controller.models["model-3"].endpoint = serving_api.endpoint
    serving_api.statuses = [401]  # the serving API's token check, say: deploy's wait stops there
    code, out, err = cli("deploy", "model-3")
    assert (code, out) == (2, "") and "Traceback" not in err
    assert err.splitlines() == [
        f"waiting for the serving API to list model-3 at {serving_api.endpoint} ...",
        "error: HTTP 401: no",
    ]
    serving_api.statuses = [500]
    assert cli("deploy", "model-3")[0] == 1  # the server's fault, not the user's
    assert cli("deploy", "model-3")[:2] == (0, serving_api.endpoint + "\n")


def test_an_https_serving_api_signed_by_a_private_ca_is_trusted_with_it_and_refused_at_once_without(
    serving_api, tmp_path, monkeypatch
):
    """Serving behind an Ingress whose certificate a private CA signed: --tls-ca was ignored there, and deploy's wait
    retried the certificate failure for 5 minutes."""
    import ssl

    cert, key = _self_signed_certificate()
    (tmp_path / "ca.pem").write_bytes(cert)
    (tmp_path / "key.pem").write_bytes(key)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(tmp_path / "ca.pem", tmp_path / "key.pem")
    serving_api.socket = context.wrap_socket(serving_api.socket, server_side=True)
    endpoint = serving_api.endpoint.replace("http://", "https://")
    wait_until_served(endpoint, tls_ca=tmp_path / "ca.pem", timeout_s=10)
    assert generate(endpoint, "a photo of sks dog", tls_ca=tmp_path / "ca.pem", num_images=1, seed=0) == [
        GeneratedImage(b"a photo of sks dog", 0)
    ]
    waits = []
    monkeypatch.setattr(serving_client.time, "sleep", waits.append)
    with pytest.raises(ServingTLSError, match="if a private CA signed its certificate, give that CA's"):
        wait_until_served(endpoint, timeout_s=60)  # the system's CAs do not know this one
    assert waits == []  # not tried again


def test_a_serving_refusal_names_the_field_to_fix():
    error = ServingError(400, {"field": "steps", "message": "at most 150, got 500"})
    assert str(error) == "HTTP 400: steps: at most 150, got 500"
    assert str(ServingError(502, "Bad Gateway")) == "HTTP 502: Bad Gateway"


def test_cli_output_cut_short_by_its_reader_is_not_an_error(controller, tmp_path):
    """`dreambooth jobs --json | head -1` exited 2 with "error: [Errno 32] Broken pipe" (pipefail scripts failed)."""
    import subprocess
    import sys

    env = {**os.environ, "DREAMBOOTH_CONTROLLER": controller.target, "DREAMBOOTH_TOKEN": TOKEN}
    command = [sys.executable, "-c", "import sys; from dreambooth.cli import main; sys.exit(main())", "jobs", "--json"]
    jobs = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=Path.cwd())
    jobs.stdout.close()  # the reader is gone before the first line
    _, err = jobs.communicate(timeout=60)
    assert (jobs.returncode, err.decode()) == (0, "")


@pytest.fixture
def broken_http():
    """A TCP server on 127.0.0.1 that reads each HTTP request and answers the next of `answers` (raw bytes; the last
    one again and again), then closes the connection: an answer cut short, or not HTTP at all."""

    class Handler(socketserver.StreamRequestHandler):
        def handle(self):
            length = 0
            while (line := self.rfile.readline()) not in (b"\r\n", b"\n", b""):
                name, _, value = line.decode("latin-1").partition(":")
                length = int(value) if name.strip().lower() == "content-length" else length
            self.rfile.read(length)
            server.requests += 1
            answer = server.answers.pop(0) if len(server.answers) > 1 else server.answers[0]
            if reset := answer.endswith(RESET):  # then a reset (RST: a load balancer's), not a close (FIN)
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.wfile.write(answer.removesuffix(RESET) if reset else answer)

    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    server.answers, server.requests = [], 0
    server.endpoint = f"http://127.0.0.1:{server.server_address[1]}/v1/models/model-3/generate"
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


RESET = b"<reset>"  # an answer of broken_http ending so is cut by a TCP reset


def _http_answer(payload: bytes, length: int | None = None) -> bytes:
    head = f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {length or len(payload)}\r\n\r\n"
    return head.encode() + payload


def test_an_answer_cut_short_is_sent_again_and_one_from_something_else_is_not_the_serving_api(broken_http, monkeypatch):
    """A proxy or replica closing the connection partway through a multi-MB answer, or an endpoint that is not the
    serving API (SSH, another service's JSON), raised http.client's IncompleteRead or BadStatusLine, or a KeyError."""
    waits = []
    monkeypatch.setattr(serving_client.time, "sleep", waits.append)
    cut = _http_answer(b'{"images": [{"seed": 0, "png_b', length=100_000)
    png = base64.b64encode(b"a png").decode()
    broken_http.answers = [cut, _http_answer(json.dumps({"images": [{"seed": 0, "png_base64": png}]}).encode())]
    [image] = generate(broken_http.endpoint, "a photo of sks dog")  # sent again, as after a 503
    assert (image.png, image.seed) == (b"a png", 0)
    assert broken_http.requests == 2 and waits == [serving_client.RETRY_WAIT_S]
    broken_http.answers = [cut]
    with pytest.raises(ServingDisconnected, match=r"closed the connection before the end of its answer \(Incomplete"):
        generate(broken_http.endpoint, "a photo of sks dog")
    assert broken_http.requests == 2 + serving_client.RETRIES + 1
    assert isinstance(ServingDisconnected("x"), ServingUnreachable)  # what the CLI and wait_until_served know
    requests = broken_http.requests
    for reset in (cut + RESET, RESET):  # a reset partway through the answer, or before it: sent again too
        broken_http.answers = [reset, _http_answer(json.dumps({"images": [{"seed": 0, "png_base64": png}]}).encode())]
        assert [image.png for image in generate(broken_http.endpoint, "a photo of sks dog")] == [b"a png"]
    assert broken_http.requests == requests + 4
    broken_http.requests = 2 + serving_client.RETRIES + 1

    broken_http.answers = [b"SSH-2.0-OpenSSH_9.6\r\n"]
    for call in (generate, wait_until_served):  # waiting does not help: not retried
        with pytest.raises(ServingError, match="does not answer as an HTTP server") as other:
            call(broken_http.endpoint, "a photo of sks dog") if call is generate else call(broken_http.endpoint)
        assert other.value.status == 0 and str(other.value).startswith("http://127.0.0.1:")
    assert broken_http.requests == 2 + serving_client.RETRIES + 1 + 2
    broken_http.answers = [_http_answer(b'{"status": "ok"}')]
    with pytest.raises(ServingError, match="holds no images, so it is not the serving API") as other:
        generate(broken_http.endpoint, "a photo of sks dog")
    assert other.value.status == 200
    overloaded_cut = _http_answer(b'{"detail": "busy', length=1000).replace(b"200 OK", b"503 Service Unavailable")
    broken_http.answers = [overloaded_cut, _http_answer(json.dumps({"images": []}).encode())]
    assert generate(broken_http.endpoint, "a photo of sks dog") == []  # a 503 all the same, whatever its body


def test_cli_generate_from_an_answer_cut_short_ends_with_a_message(cli, controller, broken_http, tmp_path, monkeypatch):
    monkeypatch.setattr(serving_client.time, "sleep", lambda s: None)
    model = controller.models["model-3"]
    model.deployed, model.endpoint = True, broken_http.endpoint
    broken_http.answers = [_http_answer(b'{"images": [', length=100_000)]
    code, _, err = cli("generate", "model-3", "a photo of sks dog", "--out", str(tmp_path))
    assert code == 1 and err.startswith("error: the serving API at http://127.0.0.1:") and "Traceback" not in err
    broken_http.answers = [b"SSH-2.0-OpenSSH_9.6\r\n"]
    code, _, err = cli("generate", "model-3", "a photo of sks dog", "--out", str(tmp_path))
    assert code == 1 and err.startswith(f"error: {broken_http.endpoint} does not answer as an HTTP server (BadStatus")
    assert err.endswith("), so it is not the serving API\n")


def test_a_serving_api_that_does_not_answer_is_named():
    with pytest.raises(ServingUnreachable, match=r"no answer from the serving API at http://127\.0\.0\.1:1/v1/"):
        generate("http://127.0.0.1:1/v1/models/model-3/generate", "a photo of sks dog", timeout_s=5)


def test_a_serving_api_that_takes_the_request_and_answers_too_late_is_a_timeout_not_unreachable():
    with socket.create_server(("127.0.0.1", 0)) as silent:  # the kernel accepts the connection; nobody answers
        endpoint = f"http://127.0.0.1:{silent.getsockname()[1]}/v1/models/model-3/generate"
        with pytest.raises(ServingTimeout, match=r"took the request but did not answer within 0\.5 s"):
            generate(endpoint, "a photo of sks dog", timeout_s=0.5)
    # By default a request outwaits the server's wait for its model's load, which answers 503 at its end.
    assert inspect.signature(generate).parameters["timeout_s"].default > LOAD_TIMEOUT_S


def test_generate_retries_throttled_and_overloaded_requests_after_their_retry_after(serving_api, monkeypatch):
    waits = []
    monkeypatch.setattr(serving_client.time, "sleep", waits.append)
    soon = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=20)
    # Retry-After as an HTTP date (a load balancer's, say), then as seconds beyond the most a retry waits.
    # And a 408: the body stalled on its way (the link's fault, not the request's).
    serving_api.refusals = [(429, email.utils.format_datetime(soon, usegmt=True)), (503, "120"), (408, "0")]
    assert generate(serving_api.endpoint, "a photo of sks dog", seed=1, num_images=1) == [
        GeneratedImage(b"a photo of sks dog", 1)
    ]
    assert len(serving_api.bodies) == 4
    assert 15 < waits[0] <= 20 and waits[1] == serving_client.MAX_RETRY_WAIT_S

    serving_api.refusals = [(503, "0")] * (serving_client.RETRIES + 1)
    with pytest.raises(ServingError) as overloaded:
        generate(serving_api.endpoint, "a photo of sks dog", seed=1, num_images=1)
    assert (overloaded.value.status, overloaded.value.code, overloaded.value.retry_after_s) == (503, "overloaded", 0)
    assert len(serving_api.bodies) == 4 + serving_client.RETRIES + 1
    serving_api.refusals = [(400, "0")]  # the input's fault: sending it again changes nothing
    with pytest.raises(ServingError):
        generate(serving_api.endpoint, "a photo of sks dog", seed=1, num_images=1)
    assert len(serving_api.bodies) == 4 + serving_client.RETRIES + 2


def test_generate_chooses_the_seed_it_retries_with_and_returns_each_images_seed(serving_api, monkeypatch):
    """Without a seed the server chose one and generate returned the PNGs alone: the caller could never draw an image
    again (nor vary its prompt around it), and each retry drew another seed."""
    monkeypatch.setattr(serving_client.time, "sleep", lambda seconds: None)
    serving_api.refusals = [(503, "0")]
    images = generate(serving_api.endpoint, "a photo of sks dog", num_images=2)
    first, retry = serving_api.bodies
    assert isinstance(first["seed"], int) and retry["seed"] == first["seed"]
    assert images == [GeneratedImage(b"a photo of sks dog", first["seed"] + i) for i in range(2)]
    with pytest.raises(dataclasses.FrozenInstanceError):
        images[0].seed = 3
    # A seed given (None is none) is the caller's.
    given = generate(serving_api.endpoint, "a photo of sks dog", seed=5, num_images=2)
    assert [image.seed for image in given] == [5, 6] and serving_api.bodies[-1]["seed"] == 5
    generate(serving_api.endpoint, "a photo of sks dog", seed=None)
    assert isinstance(serving_api.bodies[-1]["seed"], int)


@pytest.mark.parametrize(
    ("header", "seconds"),
    [
        (None, None),
        ("7", 7.0),
        (" 7 ", 7.0),
        ("Wed, 21 Oct 2015 07:28:00 GMT", 0.0),  # past
        ("Sun Nov  6 08:49:37 1994", 0.0),  # the obsolete asctime form, zoneless
        ("-1", None),
        ("1.5", None),
        ("soon", None),
    ],
)
def test_retry_after_is_seconds_or_an_http_date(header, seconds):
    assert serving_client.retry_after_seconds(header) == seconds


def test_cli_generate_throttled_exits_1_not_the_usage_code(cli, controller, serving_api, tmp_path):
    model = controller.models["model-3"]
    model.deployed, model.endpoint = True, serving_api.endpoint
    serving_api.refusals = [(429, "0")] * (serving_client.RETRIES + 1)
    code, _, err = cli("generate", "model-3", "a photo of sks dog", "--out", str(tmp_path))
    assert code == 1 and "HTTP 429: busy; retry later" in err


def test_waiting_for_a_deployment_goes_on_through_404_and_stops_at_a_refusal(serving_api):
    serving_api.statuses = [404, 503, 404]  # not reconfigured yet, Serve starting
    wait_until_served(serving_api.endpoint, timeout_s=60)
    serving_api.statuses = [401]  # a wrong token: waiting would change nothing
    with pytest.raises(ServingError) as refused:
        wait_until_served(serving_api.endpoint, timeout_s=60)
    assert refused.value.status == 401
