"""The Python SDK of the control plane: submit DreamBooth jobs to the controller over gRPC and follow them.

    with DreamBoothClient("controller:50051", token="...") as client:
        job = client.submit("job.yaml", priority=5)
        for update in client.watch(job.job_id):
            print(update.job.state, update.job.progress.step)

Calls return the generated messages (dreambooth.v1.jobs_pb2.Job, models_pb2.Model); every gRPC error surfaces
as a ClientError carrying the status code's name, the server's message and what its details say (the field to
fix, the reason for a refusal, how long to wait before a retry). The spec is checked here with the
trainer's own JobSpec before anything is sent, so a typo fails without a round trip.
"""

from __future__ import annotations

import json
import os
import random
import ssl
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from dreambooth.errors import InputError
from dreambooth.proto_convert import MAX_PRIORITY, MIN_PRIORITY, spec_to_proto, state_value
from dreambooth.serving_client import SYSTEM_CAS, check_token, is_loopback
from dreambooth.v1 import jobs_pb2, jobs_pb2_grpc, models_pb2, models_pb2_grpc
from trainer.images import check_instance_image_count, find_instance_images
from trainer.spec import JobSpec, absolute_path, read_spec_file

DEFAULT_TARGET = "127.0.0.1:50051"
# The server's limits (jobs.proto, InstanceImage): checked here to name the file instead of failing the call.
MAX_IMAGE_BYTES = 16 * 1024 * 1024
MAX_UPLOAD_BYTES = 64 * 1024 * 1024
_MESSAGE_LIMIT = MAX_UPLOAD_BYTES + 1024 * 1024  # the images plus the rest of the request
# A submission's deadline grows with its photos at this rate (2 Mbit/s, a slow uplink): the upload is part of the
# call, and 64 MiB of photos would not go up in 30 s below 18 Mbit/s.
UPLOAD_BYTES_PER_S = 256 * 1024

# UNAVAILABLE (a connection failure; a controller whose Ray, database or storage cannot be used for a moment) is
# retried with backoff, up to 4 attempts: by gRPC itself, but SubmitJob by submit, the same way (its attempts
# carry the same request_id, so the server returns the job the first one created). gRPC's retries report the last
# attempt's error alone, "failed to connect" once the controller went away, although the first attempt may have
# reached it and queued the job: submit tells the two apart (ClientError.never_sent).
_RETRY_ATTEMPTS = 4
_RETRY_BACKOFF_S = (0.2, 2.0)  # first, most; doubling, each wait drawn at random below it (gRPC's jitter)
_SERVICE_CONFIG = json.dumps(
    {
        "methodConfig": [
            {
                "name": [{"service": "dreambooth.v1.JobService"}, {"service": "dreambooth.v1.ModelService"}],
                "retryPolicy": {
                    "maxAttempts": _RETRY_ATTEMPTS,
                    "initialBackoff": f"{_RETRY_BACKOFF_S[0]}s",
                    "maxBackoff": f"{_RETRY_BACKOFF_S[1]}s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            },
            {"name": [{"service": "dreambooth.v1.JobService", "method": "SubmitJob"}]},  # no retryPolicy: submit's
        ]
    }
)


# The states a job ends in (what this version knows of: a newer server may add more).
ENDED_STATES = frozenset({jobs_pb2.STATE_SUCCEEDED, jobs_pb2.STATE_FAILED, jobs_pb2.STATE_CANCELLED})

# A watch stream ends with these when the controller goes away under it (stopped: CANCELLED; gone: UNAVAILABLE);
# a reopened one is refused RESOURCE_EXHAUSTED while the watches of every client reconnecting at once fill it.
_STREAM_BROKEN = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.RESOURCE_EXHAUSTED})
_RECONNECT_BACKOFF_S = (0.25, 5.0)  # first, most


class ClientError(Exception):
    """A failed call: `code` is the gRPC status code's name (e.g. "NOT_FOUND"), `message` the server's. From the
    status's details: `field`, the request field to fix (INVALID_ARGUMENT); `reason`, the kind of refusal (e.g.
    RESOURCE_EXHAUSTED's TENANT_JOBS_LIMIT: wait for jobs to end, or TENANT_CALLS_LIMIT: retry soon;
    FAILED_PRECONDITION's MODEL_DEPLOYED); `retry_after_s`, where the server says how long to wait. `never_sent`
    (submit's): the controller was never reached, so nothing was queued."""

    def __init__(
        self,
        code: str,
        message: str,
        *,
        field: str | None = None,
        reason: str | None = None,
        retry_after_s: float | None = None,
    ):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.field = field
        self.reason = reason
        self.retry_after_s = retry_after_s
        self.never_sent = False

    @property
    def failed_to_connect(self) -> bool:
        """gRPC's own error for a call that found no connection to make to the controller, and so sent nothing."""
        return self.code == "UNAVAILABLE" and "failed to connect" in self.message

    @classmethod
    def from_rpc(cls, error: grpc.RpcError) -> ClientError:
        # Errors raised by a call are also grpc.Call objects carrying the status (grpc's documented contract).
        if not isinstance(error, grpc.Call):
            return cls("UNKNOWN", str(error))
        code = error.code()
        found: dict[str, Any] = {}
        try:
            status = rpc_status.from_call(error)
        except ValueError:  # details that contradict the call's own code or message (a proxy's): none then
            status = None
        for detail in status.details if status is not None else ():
            for kind in (error_details_pb2.BadRequest, error_details_pb2.ErrorInfo, error_details_pb2.RetryInfo):
                if detail.Is(kind.DESCRIPTOR):
                    unpacked = kind()
                    detail.Unpack(unpacked)
                    found[kind.DESCRIPTOR.name] = unpacked
        violations = found["BadRequest"].field_violations if "BadRequest" in found else []
        return cls(
            code.name if code else "UNKNOWN",
            error.details() or "",
            field=violations[0].field if violations else None,
            reason=found["ErrorInfo"].reason if "ErrorInfo" in found else None,
            retry_after_s=found["RetryInfo"].retry_delay.ToMilliseconds() / 1000 if "RetryInfo" in found else None,
        )


class DreamBoothClient:
    def __init__(
        self,
        target: str | None = None,
        token: str | None = None,
        *,
        tls_ca: str | os.PathLike | None = None,
        timeout_s: float = 30,
        keepalive_s: float = 30,
        from_environment: bool = True,
    ):
        """Defaults, as the CLI's: $DREAMBOOTH_CONTROLLER (else 127.0.0.1:50051), $DREAMBOOTH_TOKEN and
        $DREAMBOOTH_TLS_CA (`tls_ca`: a CA certificate file, or "system" for the system's trusted CAs: TLS; else
        plaintext); `from_environment=False` reads none of them (a local stack's client must not send a production
        token, nor expect TLS). `target`: HOST:PORT ([::1]:PORT for IPv6; gRPC's own dns:, unix: ... are passed on);
        the token's surrounding whitespace is dropped (a Secret's trailing newline). `timeout_s`: each call but
        watch's (a submission's grows by a second per 256 KiB of photos it uploads); `keepalive_s`: how often an open
        watch pings a controller that has been quiet (see watch)."""
        environment = os.environ if from_environment else {}
        self.target = target = _check_target(target or environment.get("DREAMBOOTH_CONTROLLER") or DEFAULT_TARGET)
        # What the serving API is given too (the CLI's generate and deploy): the token, the CA (None: plaintext).
        self.token = token = check_token(token or environment.get("DREAMBOOTH_TOKEN"))
        self.tls_ca = tls_ca = tls_ca or environment.get("DREAMBOOTH_TLS_CA") or None
        answer_ms = int(min(keepalive_s, 10) * 1000)  # a ping not answered by then: the connection is dead
        options = [
            ("grpc.service_config", _SERVICE_CONFIG),
            ("grpc.max_send_message_length", _MESSAGE_LIMIT),
            ("grpc.max_receive_message_length", _MESSAGE_LIMIT),  # logs can be long
            # A watch of a queued job can go hours without a word: pings find a connection that died silently
            # (a crashed host, a load balancer dropping idle streams), which would otherwise block it for good.
            ("grpc.keepalive_time_ms", int(keepalive_s * 1000)),
            ("grpc.keepalive_timeout_ms", answer_ms),
            ("grpc.http2.ping_timeout_ms", answer_ms),  # what this gRPC waits for the answer (default 60 s)
            ("grpc.http2.max_pings_without_data", 0),  # gRPC's default stops pinging after 2 without data
            # gRPC waits up to 120 s between its own reconnection attempts: a watch would see the controller's
            # restart minutes late, or give up (reconnect_for_s) while it was back.
            ("grpc.initial_reconnect_backoff_ms", int(_RECONNECT_BACKOFF_S[0] * 1000)),
            ("grpc.max_reconnect_backoff_ms", int(_RECONNECT_BACKOFF_S[1] * 1000)),
        ]
        if _loopback_target(target):
            # The environment's HTTP proxy (grpc_proxy, https_proxy, http_proxy) is for hosts beyond this machine: a
            # local stack's controller reached through it (no_proxy often names localhost, not 127.0.0.1) got the
            # proxy's refusal, told as "no controller answers".
            options.append(("grpc.enable_http_proxy", 0))
        if tls_ca is None:
            self._channel = grpc.insecure_channel(target, options=options)
        else:
            # "system": a controller behind a load balancer with a publicly trusted certificate. The system's bundle,
            # as the serving client's, where it has one as a file (gRPC's own default is a bundle of its own, without
            # a company's added CAs); else gRPC's (None).
            if str(tls_ca) != SYSTEM_CAS:
                _check_ca_certificates(tls_ca)
            bundle = _system_cas() if str(tls_ca) == SYSTEM_CAS else Path(tls_ca)
            roots = bundle.read_bytes() if bundle is not None else None
            credentials = grpc.ssl_channel_credentials(root_certificates=roots)
            self._channel = grpc.secure_channel(target, credentials, options=options)
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self._timeout_s = timeout_s
        self._jobs = jobs_pb2_grpc.JobServiceStub(self._channel)
        self._models = models_pb2_grpc.ModelServiceStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> DreamBoothClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- jobs -------------------------------------------------------------------------------------------

    def submit(
        self,
        spec: Mapping[str, Any] | JobSpec | str | os.PathLike,
        *,
        request_id: str | None = None,
        priority: int = 0,
        upload: bool = True,
    ) -> jobs_pb2.Job:
        """Queue a job. `spec`: a JobSpec, a dict of its fields, or a YAML/JSON file (relative paths in it are
        relative to the file); only the fields set (a JobSpec's not at their defaults) are sent, the controller's
        defaults apply to the rest. The instance images are read here and sent as bytes; with upload=False only
        their absolute paths are sent, for a cluster that shares this machine's storage. `request_id`: a retry of
        the same request with it (after a timeout, say) returns the job the first call queued instead of a second
        one; another spec, priority or photos under a used id is refused (ClientError INVALID_ARGUMENT). A call that
        failed otherwise may have queued the job all the same (the answer lost), unless the error's `never_sent`."""
        if not MIN_PRIORITY <= priority <= MAX_PRIORITY:  # before reading the photos
            raise InputError("priority", f"must be in [{MIN_PRIORITY}, {MAX_PRIORITY}], got {priority}")
        fields = _spec_fields(spec)
        found = find_instance_images([absolute_path(p) for p in fields["instance_images"]])
        check_instance_image_count(len(found))  # the controller's bound, before a photo is read
        if upload:
            _check_upload_sizes(found)  # before a photo is read: a folder of RAW-sized ones would be read whole
        images = [_instance_image(path, upload) for path in found]
        request = jobs_pb2.SubmitJobRequest(
            spec=spec_to_proto(fields),
            instance_images=images,
            request_id=request_id or str(uuid.uuid4()),
            priority=priority,
        )
        upload_s = sum(len(image.data) for image in images) / UPLOAD_BYTES_PER_S
        # One deadline for every attempt, as gRPC's retries have: each its own made a call take 4x as long.
        deadline = time.monotonic() + self._timeout_s + upload_s
        sent = False  # whether an attempt got past connecting: then it may have queued the job
        for attempt in range(1, _RETRY_ATTEMPTS + 1):
            try:
                left_s = max(deadline - time.monotonic(), 0.001)
                return self._call(self._jobs.SubmitJob, request, timeout_s=left_s).job
            except ClientError as e:
                sent = sent or not e.failed_to_connect
                backoff_s = random.uniform(0, min(_RETRY_BACKOFF_S[0] * 2 ** (attempt - 1), _RETRY_BACKOFF_S[1]))
                if e.code != "UNAVAILABLE" or attempt == _RETRY_ATTEMPTS or time.monotonic() + backoff_s >= deadline:
                    e.never_sent = not sent
                    raise
            time.sleep(backoff_s)

    def get(self, job_id: str) -> jobs_pb2.Job:
        return self._call(self._jobs.GetJob, jobs_pb2.GetJobRequest(job_id=job_id)).job

    def list(
        self, states: Iterable[str | int] | str | int | None = None, page_size: int = 50
    ) -> Iterator[jobs_pb2.Job]:
        """Every job (newest first), or those in `states` ("QUEUED" or jobs_pb2.STATE_QUEUED); pages lazily."""
        if isinstance(states, (str, int)):  # one state, not an iterable of its characters
            states = [states]
        numbers = [s if isinstance(s, int) else state_value(s) for s in states or ()]
        request = jobs_pb2.ListJobsRequest(page_size=page_size, states=numbers)
        while True:
            response = self._call(self._jobs.ListJobs, request)
            yield from response.jobs
            if not response.next_page_token:
                return
            request.page_token = response.next_page_token

    def cancel(self, job_id: str) -> jobs_pb2.Job:
        return self._call(self._jobs.CancelJob, jobs_pb2.CancelJobRequest(job_id=job_id)).job

    def delete(self, job_id: str) -> None:
        self._call(self._jobs.DeleteJob, jobs_pb2.DeleteJobRequest(job_id=job_id))

    def watch(self, job_id: str, *, reconnect_for_s: float = 300) -> Iterator[jobs_pb2.WatchJobResponse]:
        """The job as it is, then every change, until it ends. No deadline: training takes hours.

        A stream that breaks before the job ends (the controller restarting, say; a connection that died silently
        is found by keepalive pings) is opened again, with backoff, for up to `reconnect_for_s` seconds without an
        answer (then ClientError UNAVAILABLE). A reopened stream
        starts with the job as it is then: what changed meanwhile is in it, not replayed one by one. A first stream
        that never opens (a wrong address, a wrong CA) fails at once, as any call."""
        broken_since: float | None = None
        backoff_s = _RECONNECT_BACKOFF_S[0]
        opened = False
        while True:
            call = self._jobs.WatchJob(jobs_pb2.WatchJobRequest(job_id=job_id), metadata=self._metadata)
            try:
                for update in call:
                    opened, broken_since, backoff_s = True, None, _RECONNECT_BACKOFF_S[0]
                    yield update
                return  # a stream ends OK only once its job has ended, whatever end state a newer server has
            except grpc.RpcError as e:
                if not opened or not isinstance(e, grpc.Call) or e.code() not in _STREAM_BROKEN:
                    raise ClientError.from_rpc(e) from e
            finally:
                call.cancel()  # the caller stopped iterating early: let the server stop streaming (no-op when done)
            now = time.monotonic()
            broken_since = broken_since or now
            if now - broken_since >= reconnect_for_s:
                raise ClientError(
                    "UNAVAILABLE", f"watching {job_id}: no answer from the controller for {reconnect_for_s:.0f} s"
                )
            time.sleep(backoff_s)
            backoff_s = min(2 * backoff_s, _RECONNECT_BACKOFF_S[1])

    def logs(self, job_id: str) -> str:
        return self._call(self._jobs.GetJobLogs, jobs_pb2.GetJobLogsRequest(job_id=job_id)).text

    # --- models -----------------------------------------------------------------------------------------

    def models(self, page_size: int = 50) -> Iterator[models_pb2.Model]:
        request = models_pb2.ListModelsRequest(page_size=page_size)
        while True:
            response = self._call(self._models.ListModels, request)
            yield from response.models
            if not response.next_page_token:
                return
            request.page_token = response.next_page_token

    def model(self, model_id: str) -> models_pb2.Model:
        return self._call(self._models.GetModel, models_pb2.GetModelRequest(model_id=model_id)).model

    def deploy(self, model_id: str) -> models_pb2.Model:
        """Has the controller serve the model; its endpoint answers moments later (404 until then):
        `dreambooth.serving_client.wait_until_served(model.endpoint)` waits for it, as `dreambooth deploy` does."""
        return self._call(self._models.DeployModel, models_pb2.DeployModelRequest(model_id=model_id)).model

    def undeploy(self, model_id: str) -> models_pb2.Model:
        return self._call(self._models.UndeployModel, models_pb2.UndeployModelRequest(model_id=model_id)).model

    def delete_model(self, model_id: str, wait_s: float = 60) -> None:
        """Deletes the model and its files (FAILED_PRECONDITION while it is deployed: undeploy it first). Right after
        an undeploy, the controller refuses it until serving has applied that (with a retry delay): retried so for
        up to `wait_s`, so that `undeploy(); delete_model()` works."""
        deadline = time.monotonic() + wait_s
        while True:
            try:
                self._call(self._models.DeleteModel, models_pb2.DeleteModelRequest(model_id=model_id))
                return
            except ClientError as e:
                undeploying = e.reason == "MODEL_DEPLOYED" and e.retry_after_s is not None
                if not undeploying or time.monotonic() + e.retry_after_s > deadline:
                    raise
                time.sleep(e.retry_after_s)

    def _call(self, method: grpc.UnaryUnaryMultiCallable, request: Any, timeout_s: float | None = None) -> Any:
        try:
            return method(request, metadata=self._metadata, timeout=timeout_s or self._timeout_s)
        except grpc.RpcError as e:
            raise ClientError.from_rpc(e) from e


# gRPC's own target syntax (https://github.com/grpc/grpc/blob/master/doc/naming.md), passed on as it is.
_GRPC_SCHEMES = ("dns:", "ipv4:", "ipv6:", "unix:", "unix-abstract:", "vsock:", "xds:")


def _check_target(target: str) -> str:
    """HOST:PORT (an IPv6 address in brackets: [::1]:50051), or gRPC's own syntax (dns:, unix:, ...). gRPC itself
    takes a port over 65535 modulo 65536 (99999 reached 34463, some other server) and a target without one to 443."""
    target = target.strip()  # a ConfigMap's or a file's trailing newline
    if target.startswith(_GRPC_SCHEMES):
        return target
    if "://" in target:  # gRPC would answer "Misformatted domain name"
        raise InputError("controller", f"{target}: give HOST:PORT, without a scheme (e.g. 127.0.0.1:50051)")
    if target.startswith("["):
        host, bracket, rest = target[1:].partition("]")
        sep, port = rest[:1], rest[1:]
        if not bracket or not host or (rest and sep != ":"):
            raise InputError("controller", f"{target}: give HOST:PORT, an IPv6 address in brackets ([::1]:50051)")
    else:
        host, sep, port = target.rpartition(":")
        if ":" in host:
            raise InputError("controller", f"{target}: give an IPv6 address in brackets, then its port: [::1]:50051")
    if not sep or not host or not port:
        raise InputError(
            "controller",
            f"{target}: no port: give HOST:PORT (the controller's default port is 50051; :443 behind an ingress)",
        )
    if not (port.isascii() and port.isdigit() and 1 <= int(port) <= 65535):
        raise InputError("controller", f"{target}: {port!r} is not a port (1-65535): give HOST:PORT")
    return target


def _loopback_target(target: str) -> bool:
    """Whether a checked target (HOST:PORT, [IPv6]:PORT, or gRPC's own syntax, taken as not) is this machine's."""
    if target.startswith(_GRPC_SCHEMES):
        return False
    host = target[1:].partition("]")[0] if target.startswith("[") else target.rpartition(":")[0]
    return is_loopback(host)


def _check_ca_certificates(path: str | os.PathLike) -> None:
    """A --tls-ca file without a PEM certificate (the key, a DER file) failed every call as a "security handshaker"
    error, which reads as the controller's fault; a missing one was a bare errno message that named no setting."""
    try:
        # The file, as gRPC reads it: bundles carry UTF-8 comments between their certificates (p11-kit's CA names).
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=os.fspath(path))
    except (ssl.SSLError, ValueError) as e:
        reason = getattr(e, "reason", None) or str(e)
        raise InputError(
            "tls_ca",
            f"{path}: no PEM certificate in it ({reason}): give the certificate of the CA that signed the "
            "controller's (a file with -----BEGIN CERTIFICATE-----), or 'system' for the system's trusted CAs",
        ) from None
    except OSError as e:  # missing, a directory, unreadable (a stale $DREAMBOOTH_TLS_CA, say)
        raise InputError("tls_ca", f"{path}: {e.strerror or e} (--tls-ca or $DREAMBOOTH_TLS_CA)") from None


def _system_cas() -> Path | None:
    """The system's CA bundle file, if it has one (Python may use a directory of them, or Windows' store)."""
    paths = ssl.get_default_verify_paths()
    return next((Path(f) for f in (paths.cafile, paths.openssl_cafile) if f and Path(f).is_file()), None)


def _spec_fields(spec: Mapping[str, Any] | JobSpec | str | os.PathLike) -> dict[str, Any]:
    """The fields to send: only those the user wrote (so the server's defaults apply to the rest; every field sent,
    a controller a version older refused every JobSpec for a field it did not know yet), after checking them all
    with JobSpec (InputError naming the field, before any I/O on images)."""
    if isinstance(spec, JobSpec):
        spec.validate_new()
        return spec.resolve_paths(Path.cwd()).written_fields()
    if isinstance(spec, Mapping):
        fields = {name: _plain(value) for name, value in spec.items()}
        JobSpec.from_dict(fields).validate_new()
        if isinstance(fields["instance_images"], str):
            fields["instance_images"] = [fields["instance_images"]]
        fields["base_model"] = absolute_path(fields["base_model"])  # the server's working directory is not ours
        return fields
    loaded = JobSpec.load(spec)  # validates, and resolves relative paths against the file's directory
    loaded.validate_new()
    return {name: getattr(loaded, name) for name in read_spec_file(spec)}


def _plain(value: Any) -> Any:
    """Paths (pathlib's, os.PathLike) as the strings a spec holds."""
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _check_upload_sizes(paths: list[Path]) -> None:
    sizes = [(path, path.stat().st_size) for path in paths]
    for path, size in sizes:
        if size > MAX_IMAGE_BYTES:
            raise InputError("instance_images", f"{path}: {size / 2**20:.1f} MiB, over the 16 MiB limit per image")
    if (total := sum(size for _, size in sizes)) > MAX_UPLOAD_BYTES:
        raise InputError(
            "instance_images",
            f"{total / 2**20:.0f} MiB of images, over the {MAX_UPLOAD_BYTES // 2**20} MiB a request carries: "
            "put them on shared storage and submit them by path (`--no-upload`; SDK: upload=False)",
        )


def _instance_image(path: Path, upload: bool) -> jobs_pb2.InstanceImage:
    # A name that is not UTF-8 (Latin-1 from an old archive or a camera card) cannot go in a proto string.
    if not upload:
        try:
            str(path).encode()
        except UnicodeEncodeError:
            raise InputError(
                "instance_images", f"{path!r}: the path is not UTF-8, which a request cannot carry: rename the file"
            ) from None
        return jobs_pb2.InstanceImage(uri=str(path), filename=path.name)
    # Uploaded, the name only labels the photo in messages (the controller names the file itself).
    label = os.fsencode(path.name).decode(errors="replace")
    return jobs_pb2.InstanceImage(data=path.read_bytes(), filename=label)
