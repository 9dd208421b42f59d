"""Hostile input never crashes the controller: one real gRPC server on 127.0.0.1, hypothesis-generated requests.

Every call must end, within a timeout, with a proper status: undecodable bytes get grpc's own INTERNAL
("Exception deserializing request!"); anything that decodes gets OK or a caller's-fault code, never INTERNAL
or UNKNOWN (an exception our handlers did not map). Uploaded file names, job ids, page tokens and URIs never
make the controller write outside its storage directory. Bad credentials are UNAUTHENTICATED, and afterwards
the server still answers its health check.

No Ray: with no capacity and tenants allowed no running jobs the scheduler never starts a job, and the Ray
client connects lazily (to a dashboard URL where nothing listens), so nothing ever calls it.
"""

from __future__ import annotations

import base64
import io
import itertools
import json
import operator
import os
import re
import shutil
import struct
import threading
import time
from pathlib import Path

import grpc
import pytest
from google.protobuf import message_factory
from google.protobuf.descriptor import FieldDescriptor
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, Phase, event, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from controller.config import ControllerConfig, Tenant
from controller.server import start
from dreambooth.v1 import jobs_pb2, models_pb2
from tests.conftest import free_port

TOKEN, OTHER_TOKEN = "fuzz-token", "other-token"
AUTH = (("authorization", f"Bearer {TOKEN}"),)
OTHER_AUTH = (("authorization", f"Bearer {OTHER_TOKEN}"),)
CALL_TIMEOUT_S = 10
# How long a call whose request never comes holds its turn at most: well past the CALL_TIMEOUT_S a test waits for the
# turns to be held (a loaded machine takes the calls in seconds apart; with equal bounds, the first went as the wait
# for the last ended).
HELD_S = 3 * CALL_TIMEOUT_S
MARK = "fuzzpwn"  # every path-traversal payload names this; afterwards nothing by that name may exist outside storage
MAX_IMAGE_BYTES, MAX_IMAGES_BYTES = 32 * 1024, 128 * 1024  # small, so the size limits are reached cheaply

SERVICES = (
    jobs_pb2.DESCRIPTOR.services_by_name["JobService"],
    models_pb2.DESCRIPTOR.services_by_name["ModelService"],
)
METHODS = {f"/{s.full_name}/{m.name}": m for s in SERVICES for m in s.methods}
REQUEST_CLASS = {path: message_factory.GetMessageClass(m.input_type) for path, m in METHODS.items()}
STREAMING = {path for path, m in METHODS.items() if m.server_streaming}


def method(name: str) -> str:
    return next(path for path in METHODS if path.endswith(f"/{name}"))


S = grpc.StatusCode
# What a well-formed request may get: success or the caller's fault. Never INTERNAL, UNKNOWN, DEADLINE_EXCEEDED.
CALLERS_FAULT = {
    S.OK,
    S.INVALID_ARGUMENT,
    S.NOT_FOUND,
    S.FAILED_PRECONDITION,
    S.RESOURCE_EXHAUSTED,
    S.PERMISSION_DENIED,
}
DESERIALIZING = "Exception deserializing request!"  # grpc's own INTERNAL for bytes the request type cannot parse

FUZZ = settings(
    max_examples=100,
    deadline=None,
    database=None,
    phases=[Phase.explicit, Phase.generate, Phase.shrink],  # no explain phase: its AST work is slow here
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
)

# Placeholders the strategies use for paths that exist only once the fixtures ran; `resolve` fills them in.
MODEL, PHOTO, PHOTOS = "@MODEL@", "@PHOTO@", "@PHOTOS@"


# --- the controller ---------------------------------------------------------------------------------------


def _png(size: int = 64, seed: int = 0) -> bytes:
    image = Image.effect_mandelbrot((size, size), (-2 + seed * 0.1, -1.2, 1, 1.2), 32).convert("RGB")
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


PNG = _png()


def _fake_model(root: Path, tiny_model: Path) -> Path:
    """Passes check_base_model (its files and the JSON it reads, no weights) and the prompt checks (a real
    tokenizer, the tiny model's): submissions get past them to the image checks."""
    files = {
        "model_index.json": {"_class_name": "StableDiffusionPipeline", "scheduler": ["diffusers", "PNDMScheduler"]},
        "unet/config.json": {"in_channels": 4, "out_channels": 4, "cross_attention_dim": 768},
        "unet/diffusion_pytorch_model.safetensors": {},
        "vae/config.json": {},
        "vae/diffusion_pytorch_model.safetensors": {},
        "text_encoder/config.json": {"hidden_size": 768},
        "text_encoder/model.safetensors": {},
        "scheduler/scheduler_config.json": {},
    }
    for name, content in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        header = json.dumps(content).encode()  # a weights file's is its length, then its JSON: no tensors here
        (root / name).write_bytes(struct.pack("<Q", len(header)) + header if name.endswith(".safetensors") else header)
    shutil.copytree(tiny_model / "tokenizer", root / "tokenizer")
    return root


class Sandbox:
    """A directory holding the controller's storage five levels down, plus inputs beside it: a file that
    escaped storage by up to a few `..` lands in here, where the test looks for it."""

    def __init__(self, root: Path, tiny_model: Path):
        self.root = root
        self.storage = root / "l1" / "l2" / "l3" / "l4" / "storage"
        self.storage.mkdir(parents=True)
        self.model = _fake_model(root / "inputs" / "model", tiny_model)
        self.photos = root / "inputs" / "photos"
        self.photos.mkdir(parents=True)
        (self.photos / "dog.png").write_bytes(PNG)
        self.before = self.outside_storage()

    def outside_storage(self) -> set[Path]:
        return {p for p in self.root.rglob("*") if p != self.storage and self.storage not in p.parents}

    def resolve(self, text: str) -> str:
        photo = str(self.photos / "dog.png")
        return text.replace(MODEL, str(self.model)).replace(PHOTOS, str(self.photos)).replace(PHOTO, photo)


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory, tiny_model) -> Sandbox:
    return Sandbox(tmp_path_factory.mktemp("fuzz-sandbox"), tiny_model)


@pytest.fixture(scope="module")
def controller(sandbox):
    config = ControllerConfig(
        storage=sandbox.storage,
        listen="127.0.0.1:0",
        ray_dashboard_url=f"http://127.0.0.1:{free_port()}",  # nothing listens there, and nothing calls it
        readable_paths=(sandbox.root / "inputs",),
        tenants=(
            # max_running_jobs=0 as well as no capacity: a spec asking for 1e-300 CPUs fits in none (the
            # scheduler's float tolerance), and nothing may start here.
            Tenant("fuzzer", (TOKEN,), max_running_jobs=0, max_queued_jobs=100_000),
            Tenant("other", (OTHER_TOKEN,), max_running_jobs=0, max_queued_jobs=1),
        ),
        metrics_listen="",
        reconcile_interval_s=0.2,
        max_image_bytes=MAX_IMAGE_BYTES,
        max_images_bytes=MAX_IMAGES_BYTES,
        capacity_cpus=0,
        capacity_gpus=0,
    )
    running = start(config)
    yield running
    running.stop(grace_s=1)


@pytest.fixture(scope="module")
def channel(controller):
    options = [("grpc.max_receive_message_length", 64 * 1024 * 1024)]
    with grpc.insecure_channel(f"127.0.0.1:{controller.port}", options=options) as channel:
        grpc.channel_ready_future(channel).result(timeout=10)
        yield channel


def call(channel, path: str, request: bytes, metadata=AUTH) -> tuple[grpc.StatusCode, str, list[bytes]]:
    """(code, details, reply bytes) of one call with raw bytes in and out. A server stream is read to its first
    message and then cancelled (WatchJob of a job that has not ended would go on for as long as the job)."""
    try:
        if path in STREAMING:
            stream = channel.unary_stream(path)(request, metadata=metadata, timeout=CALL_TIMEOUT_S)
            replies = list(itertools.islice(stream, 1))
            stream.cancel()  # nothing, if it has ended
            return S.OK, "", replies
        return S.OK, "", [channel.unary_unary(path)(request, metadata=metadata, timeout=CALL_TIMEOUT_S)]
    except grpc.RpcError as e:
        return e.code(), e.details() or "", []


def check_callers_fault(channel, path: str, request, metadata=AUTH) -> tuple[grpc.StatusCode, str, list[bytes]]:
    code, details, replies = call(channel, path, request.SerializeToString(), metadata)
    # What the examples reached (pytest --hypothesis-show-statistics): the code, and the field it blamed.
    blamed = details.partition(":")[0][:30] if code == S.INVALID_ARGUMENT else ""
    event(f"{path.rsplit('/', 1)[1]}: {code.name} {blamed}")
    assert code in CALLERS_FAULT, f"{path} answered {code.name}: {details[:500]!r}\nrequest: {str(request)[:2000]}"
    if code == S.RESOURCE_EXHAUSTED:  # the tenant's quota, not grpc refusing an oversized reply or trailer
        assert "unfinished jobs" in details, details
    if code == S.OK and path in STREAMING:
        assert replies, f"{path}: a stream that ended OK without sending the job"
    return code, details, replies


# --- strategies ---------------------------------------------------------------------------------------------


def _b64(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


HOSTILE_STRINGS = [
    "",
    " ",
    ".",
    "..",
    "../",
    f"../../{MARK}",
    f"../../../../../../{MARK}",
    f"../../../../../../../../../../../../{MARK}",
    f"..\\..\\{MARK}",
    f"%2e%2e%2f%2e%2e%2f{MARK}",
    f"{MARK}/../../..",
    f"/tmp/{MARK}",
    f"./{MARK}",
    "/",
    "/" + "a" * 300,  # a name too long for the filesystem
    "/" + ("a" * 200 + "/") * 30,  # a path too long
    "/etc/passwd",
    "/dev/null",
    "/dev/zero",
    "/proc/self/environ",
    "~",
    "~root",
    f"~nosuchuser{MARK}/x",
    "a\x00b",
    "\x00",
    f"{MARK}\x00.png",
    "job-000000000000",
    "model-000000000000",
    "\n",
    "\r\n",
    "\t",
    "💥",
    "\u202egnp.exe",
    "\ufeff",
    "*",
    "%s%n%x",
    "{}",
    "' OR 1=1 --",
    "CON",
    "file:///etc/passwd",
    f"file:///tmp/{MARK}",
    f"file://host/{MARK}",
    "file://[",
    "http://[::1",
    "http://127.0.0.1:1/x",
    "s3://bucket/x",
    "file:",
    "file://",
    ".png",
    "...png",
    MODEL,
    PHOTO,
    PHOTOS,
]
_long_strings = st.builds(
    operator.mul,
    st.sampled_from(["a", "/", "../", "é", "💥", "\x00", "%"]),
    st.sampled_from([129, 255, 256, 4097, 20_000, 300_000]),
)
hostile_text = st.one_of(
    st.sampled_from(HOSTILE_STRINGS),
    st.text(st.characters(codec="utf-8"), max_size=40),
    _long_strings,
    st.builds(lambda a, b: a + b, st.sampled_from(HOSTILE_STRINGS), st.sampled_from(HOSTILE_STRINGS)),
)

# Page tokens: garbage, and base64 of JSON that is almost a token (a keyset [kind, create_time, id]).
_TOKEN_JSON = [
    '["j", 1e400, "x"]',
    '["j", -1e400, "x"]',
    '["j", ' + "9" * 400 + ', "x"]',
    '["j", ' + "9" * 5000 + ', "x"]',
    '["j", NaN, "x"]',
    '["j", Infinity, "x"]',
    '["j", true, "x"]',
    '["j", 1, null]',
    '["j", 1, "x", 4]',
    '["j", 1]',
    '["m", 1, "x"]',
    '["j", 1, "x"]',
    '["j", 1, "' + "z" * 10_000 + '"]',
    '["j", 1, "\\u0000"]',
    '{"j": 1, "a": 2, "b": 3}',
    '"jab"',
    "[]",
    "null",
    "[" * 100_000 + "]" * 100_000,
    "[" * 100_000,
    '{"a":' * 50_000 + "1" + "}" * 50_000,
]
page_tokens = st.one_of(
    hostile_text,
    st.sampled_from([_b64(t) for t in _TOKEN_JSON]),
    st.sampled_from([_b64(t).replace("j", "m", 1) for t in _TOKEN_JSON]),
    st.builds(_b64, st.text(st.characters(codec="utf-8"), max_size=40)),
    st.sampled_from(["====", "!!!!", "ÿÿ", "a", "ab=", "a" * 5]),
)
int32s = st.one_of(st.sampled_from([0, -1, 1, 7, 8, 64, 1000, 2**31 - 1, -(2**31)]), st.integers(-(2**31), 2**31 - 1))
small_or_int32s = st.one_of(st.integers(-1000, 1000), int32s)  # past the range checks often enough
int64s = st.one_of(st.sampled_from([0, -1, 2**63 - 1, -(2**63)]), st.integers(-(2**63), 2**63 - 1))
doubles = st.one_of(
    st.sampled_from([float("nan"), float("inf"), float("-inf"), -0.0, 5e-324, 1e308, -1e308, 1e-2, 0.5]),
    st.floats(),
)
enum_numbers = st.one_of(st.integers(0, 9), int32s)

_SCALARS = {
    FieldDescriptor.TYPE_INT32: int32s,
    FieldDescriptor.TYPE_INT64: int64s,
    FieldDescriptor.TYPE_DOUBLE: doubles,
    FieldDescriptor.TYPE_BOOL: st.booleans(),
    FieldDescriptor.TYPE_STRING: hostile_text,
    FieldDescriptor.TYPE_ENUM: enum_numbers,
}
SPEC_FIELDS = tuple(jobs_pb2.TrainingSpec.DESCRIPTOR.fields)
assert {f.type for f in SPEC_FIELDS} <= set(_SCALARS), "a TrainingSpec field type the strategies do not cover"

VALID_SPEC = jobs_pb2.TrainingSpec(
    base_model=MODEL,
    instance_prompt="a photo of sks dog",
    num_class_images=0,
    resolution=64,
    max_steps=4,
    precision=jobs_pb2.PRECISION_FP32,
    gpus_per_worker=0,
    cpus_per_worker=1,
)


@st.composite
def training_specs(draw) -> jobs_pb2.TrainingSpec:
    """Mostly a valid spec, else an empty one, with hostile values in a few fields (so that the checks after
    the first one run too)."""
    spec = jobs_pb2.TrainingSpec()
    if draw(st.integers(0, 3)):
        spec.CopyFrom(VALID_SPEC)
    for field in draw(st.lists(st.sampled_from(SPEC_FIELDS), unique_by=lambda f: f.name, max_size=4)):
        if field.is_repeated:
            getattr(spec, field.name)[:] = draw(st.lists(hostile_text, max_size=5))
        else:
            setattr(spec, field.name, draw(_SCALARS[field.type]))
    return spec


image_bytes = st.one_of(
    st.just(PNG),
    st.just(_png(size=16)),  # smaller than the resolution
    st.just(PNG[: len(PNG) // 2]),  # truncated
    st.just(PNG[:8] + b"\x00" * 64),  # a PNG signature and nothing of a PNG
    st.binary(max_size=200),
    st.just(b""),
    st.just(b"\x00" * (MAX_IMAGE_BYTES + 1)),
    st.just(b"GIF89a" + b"\xff" * 100),
)


@st.composite
def instance_images(draw) -> jobs_pb2.InstanceImage:
    image = jobs_pb2.InstanceImage(filename=draw(hostile_text))
    source = draw(st.sampled_from(["data", "uri", "neither"]))
    if source == "data":
        image.data = draw(image_bytes)
    elif source == "uri":
        image.uri = draw(hostile_text)
    return image


image_lists = st.one_of(
    st.sampled_from([[{"data": PNG, "filename": "dog.png"}], [{"uri": PHOTO}], [{"uri": PHOTOS}]]).map(
        lambda images: [jobs_pb2.InstanceImage(**i) for i in images]
    ),
    st.lists(instance_images(), max_size=6),
    st.integers(60, 70).map(lambda n: [jobs_pb2.InstanceImage(filename=f"{i}.png", data=PNG) for i in range(n)]),
    st.integers(1, 8).map(lambda n: [jobs_pb2.InstanceImage(filename=f"{MARK}.png", uri=PHOTO)] * n),
)


@st.composite
def submit_requests(draw) -> jobs_pb2.SubmitJobRequest:
    priority = draw(st.one_of(st.just(0), small_or_int32s))
    request = jobs_pb2.SubmitJobRequest(spec=draw(training_specs()), priority=priority)
    request.instance_images.extend(draw(image_lists))
    if draw(st.booleans()):
        request.request_id = draw(hostile_text)
    return request


# Raw bytes: plain random ones, and protobuf wire format with random fields (which often decodes, and then
# reaches the handlers with odd values: wrong field types, unknown fields, nested garbage).
def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        out.append(low | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _wire(fields: list[tuple[int, int, bytes]]) -> bytes:
    out = bytearray()
    for number, wire_type, payload in fields:
        out += _varint(number << 3 | wire_type)
        out += _varint(len(payload)) + payload if wire_type == 2 else payload
    return bytes(out)


_field_numbers = st.one_of(st.integers(1, 40), st.sampled_from([0, 1000, 2**29 - 1]))
_wire_payloads = st.recursive(
    st.one_of(st.binary(max_size=40), st.text(st.characters(codec="utf-8"), max_size=40).map(str.encode)),
    lambda inner: st.lists(
        st.one_of(
            st.tuples(_field_numbers, st.just(0), st.integers(-(2**63), 2**64 - 1).map(_varint)),
            st.tuples(_field_numbers, st.just(1), st.binary(min_size=8, max_size=8)),
            st.tuples(_field_numbers, st.just(2), inner),
            st.tuples(_field_numbers, st.just(5), st.binary(min_size=4, max_size=4)),
            st.tuples(_field_numbers, st.sampled_from([3, 4, 6, 7]), st.binary(max_size=4)),
        ),
        max_size=8,
    ).map(_wire),
    max_leaves=20,
)
raw_requests = st.one_of(st.binary(max_size=300), _wire_payloads)


# --- raw garbage --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", sorted(METHODS))
@FUZZ
@given(data=raw_requests)
def test_raw_garbage_bytes_get_a_proper_status(channel, path, data):
    code, details, _ = call(channel, path, data)
    try:
        request = REQUEST_CLASS[path].FromString(data)
    except Exception:  # DecodeError: grpc itself refuses it before any handler runs
        event("undecodable")
        assert (code, details) == (S.INTERNAL, DESERIALIZING), (code, details)
        return
    event(f"decoded: {code.name}")
    assert code in CALLERS_FAULT, f"{path} answered {code.name}: {details[:500]!r}\nrequest: {str(request)[:2000]}"


# --- structured garbage -------------------------------------------------------------------------------------


@settings(FUZZ, max_examples=300)
@given(request=submit_requests())
def test_submit_job_with_hostile_fields(channel, sandbox, request):
    request.spec.base_model = sandbox.resolve(request.spec.base_model)
    for image in request.instance_images:
        if image.WhichOneof("source") == "uri":
            image.uri = sandbox.resolve(image.uri)
    code, _, replies = check_callers_fault(channel, method("SubmitJob"), request)
    if code == S.OK:
        job = jobs_pb2.SubmitJobResponse.FromString(replies[0]).job
        assert job.state == jobs_pb2.STATE_QUEUED and re.fullmatch(r"job-[0-9a-f]{12}", job.job_id)


@settings(FUZZ, max_examples=150)
@given(
    base_model=st.one_of(st.just(MODEL), hostile_text),
    images=st.lists(st.tuples(hostile_text, st.one_of(st.just(PHOTO), hostile_text)), min_size=1, max_size=3),
)
# Regressions, always tried: each was INTERNAL once (RuntimeError from expanduser, OSError ENAMETOOLONG from
# stat, ValueError "Invalid IPv6 URL" from urlparse, ValueError "embedded null byte" from resolve).
@example(base_model="~nosuchuser/model", images=[("dog.png", PHOTO)])
@example(base_model="\x00" * 129, images=[("", PHOTO)])
@example(base_model="/" + "a" * 300, images=[("dog.png", PHOTO)])
@example(base_model=MODEL, images=[("dog.png", "/" + "a" * 300)])
@example(base_model=MODEL, images=[("dog.png", "file://[")])
def test_submit_job_with_hostile_paths(channel, sandbox, base_model, images):
    """A valid spec but for the paths: base_model, image URIs and upload file names reach the file checks."""
    request = jobs_pb2.SubmitJobRequest(spec=VALID_SPEC)
    request.spec.base_model = sandbox.resolve(base_model)
    for filename, uri in images:
        request.instance_images.add(filename=filename, uri=sandbox.resolve(uri))
        request.instance_images.add(filename=filename, data=PNG)
    code, details, _ = check_callers_fault(channel, method("SubmitJob"), request)
    if code == S.INVALID_ARGUMENT:
        assert details.partition(":")[0] in ("base_model", "instance_images"), details


@settings(FUZZ, max_examples=150)
@given(page_size=small_or_int32s, states=st.lists(enum_numbers, max_size=5), models=st.booleans())
@example(page_size=-1, states=[], models=True)  # was blamed on page_token
def test_list_with_hostile_page_sizes_and_states(channel, page_size, states, models):
    if models:
        request = models_pb2.ListModelsRequest(page_size=page_size)
        code, details, _ = check_callers_fault(channel, method("ListModels"), request)
    else:
        request = jobs_pb2.ListJobsRequest(page_size=page_size, states=states)
        code, details, _ = check_callers_fault(channel, method("ListJobs"), request)
    if page_size < 0:  # more than 1000 is taken as 1000
        assert code == S.INVALID_ARGUMENT and details.startswith("page_size:"), (code, details)
    elif not models and not set(states) <= set(jobs_pb2.State.values()) - {jobs_pb2.STATE_UNSPECIFIED}:
        # Unspecified or unknown: it would match no job, and an empty list would hide the mistake.
        assert code == S.INVALID_ARGUMENT and details.startswith("states:"), (code, details)
    else:
        assert code == S.OK, details


@settings(FUZZ, max_examples=150)
@given(page_size=st.integers(0, 1000), page_token=page_tokens, models=st.booleans())
# Regressions, always tried: an int too big for a float (OverflowError), JSON nested too deep (RecursionError).
@example(page_size=0, page_token=_b64('["j", ' + "9" * 400 + ', "x"]'), models=False)
@example(page_size=0, page_token=_b64("[" * 100_000 + "]" * 100_000), models=True)
def test_list_with_hostile_page_tokens(channel, page_size, page_token, models):
    if models:
        request = models_pb2.ListModelsRequest(page_size=page_size, page_token=page_token)
        code, details, _ = check_callers_fault(channel, method("ListModels"), request)
    else:
        request = jobs_pb2.ListJobsRequest(page_size=page_size, page_token=page_token)
        code, details, _ = check_callers_fault(channel, method("ListJobs"), request)
    assert code in (S.OK, S.INVALID_ARGUMENT), (code, details)
    if code == S.INVALID_ARGUMENT:
        assert details.startswith("page_token:"), details


ID_METHODS = {
    name: (method(name), REQUEST_CLASS[method(name)])
    for name in ("GetJob", "CancelJob", "DeleteJob", "GetJobLogs", "WatchJob")
}
MODEL_METHODS = {
    name: (method(name), REQUEST_CLASS[method(name)])
    for name in ("GetModel", "DeployModel", "UndeployModel", "DeleteModel")
}


@FUZZ
@given(name=st.sampled_from(sorted(ID_METHODS)), job_id=hostile_text)
@example(name="GetJob", job_id="💥" * 20_000)  # NOT_FOUND echoed the id: 80 KB of trailers, RESOURCE_EXHAUSTED
def test_job_rpcs_with_hostile_job_ids(channel, name, job_id):
    path, request_class = ID_METHODS[name]
    code, details, _ = check_callers_fault(channel, path, request_class(job_id=job_id))
    assert code == S.NOT_FOUND, (code, details)


@FUZZ
@given(name=st.sampled_from(sorted(MODEL_METHODS)), model_id=hostile_text)
def test_model_rpcs_with_hostile_model_ids(channel, name, model_id):
    path, request_class = MODEL_METHODS[name]
    code, details, _ = check_callers_fault(channel, path, request_class(model_id=model_id))
    assert code == S.NOT_FOUND, (code, details)


def _submit_valid(channel, sandbox) -> str:
    request = jobs_pb2.SubmitJobRequest(spec=VALID_SPEC, instance_images=[jobs_pb2.InstanceImage(uri=PHOTOS)])
    request.spec.base_model = str(sandbox.model)
    request.instance_images[0].uri = str(sandbox.photos)
    code, details, replies = call(channel, method("SubmitJob"), request.SerializeToString())
    assert code == S.OK, details
    return jobs_pb2.SubmitJobResponse.FromString(replies[0]).job.job_id


@settings(FUZZ, max_examples=50)
@given(
    ops=st.lists(
        st.tuples(
            st.sampled_from(sorted(ID_METHODS)),
            st.sampled_from(["same", "other-tenant", "upper", "traversal", "suffix", "prefix"]),
        ),
        min_size=1,
        max_size=8,
    )
)
def test_operations_on_real_jobs_in_any_order(channel, sandbox, ops):
    """Cancel, delete, get, watch and logs of a real job, in any order, as its tenant or another, with its id
    mangled: each gets OK or the caller's fault, and a deleted job's files are gone."""
    job_id = _submit_valid(channel, sandbox)
    deleted = False
    for name, variant in ops:
        path, request_class = ID_METHODS[name]
        target = {
            "same": job_id,
            "other-tenant": job_id,
            "upper": job_id.upper(),
            "traversal": f"../jobs/{job_id}",
            "suffix": f"{job_id}/../../{MARK}",
            "prefix": f"{job_id[:-1]}%",
        }[variant]
        metadata = OTHER_AUTH if variant == "other-tenant" else AUTH
        code, details, _ = check_callers_fault(channel, path, request_class(job_id=target), metadata)
        if target != job_id or variant == "other-tenant" or deleted:
            assert code == S.NOT_FOUND, (name, variant, code, details)
        elif name == "DeleteJob":
            deleted = code == S.OK
    if deleted:
        assert not (sandbox.storage / "jobs" / job_id).exists()


# --- authentication -------------------------------------------------------------------------------------------


def _accepted(value: str) -> bool:
    """Whether the server would (rightly) take this authorization value: `Bearer <known token>`."""
    scheme, _, token = value.strip().partition(" ")
    return scheme.lower() == "bearer" and token.strip() in (TOKEN, OTHER_TOKEN)


_printable = st.characters(min_codepoint=0x20, max_codepoint=0x7E)
bad_authorization = st.one_of(
    st.sampled_from(
        [
            [],
            [("authorization", "")],
            [("authorization", "Bearer")],
            [("authorization", "Bearer ")],
            [("authorization", TOKEN)],
            [("authorization", f"Basic {TOKEN}")],
            [("authorization", f"Bearer  {TOKEN}")],
            [("authorization", f"Bearer {TOKEN}x")],
            [("authorization", f"Bearer {TOKEN[:-1]}")],
            [("authorization", f"Bearer {TOKEN.upper()}")],
            [("authorization", f"Token {TOKEN}")],
            [("authorization", f"Bearer {'A' * 4000}")],  # grpc itself refuses metadata over 8 KiB
            [("authorization-bin", f"Bearer {TOKEN}".encode())],
            [("x-authorization", f"Bearer {TOKEN}")],
            [("bearer", TOKEN)],
        ]
    ),
    st.text(_printable, max_size=80).filter(lambda v: not _accepted(v)).map(lambda v: [("authorization", v)]),
    st.text(_printable, max_size=40)
    .filter(lambda t: t.strip() not in (TOKEN, OTHER_TOKEN))
    .map(lambda t: [("authorization", f"Bearer {t}")]),
)


@settings(FUZZ, max_examples=200)
@given(path=st.sampled_from(sorted(METHODS)), metadata=bad_authorization, valid_request=st.booleans())
def test_bad_or_missing_credentials_are_unauthenticated(channel, sandbox, path, metadata, valid_request):
    request = REQUEST_CLASS[path]()
    if valid_request and path == method("SubmitJob"):
        request.CopyFrom(jobs_pb2.SubmitJobRequest(spec=VALID_SPEC, instance_images=[jobs_pb2.InstanceImage(data=PNG)]))
        request.spec.base_model = str(sandbox.model)
    code, details, _ = call(channel, path, request.SerializeToString(), metadata)
    assert code == S.UNAUTHENTICATED, (path, metadata, code, details)


@pytest.mark.parametrize("name", ["SubmitJob", "WatchJob"])
def test_a_call_without_a_known_token_is_refused_before_its_request_arrives(channel, name):
    # A request that never comes: a server that reads requests before checking the token waits for it until the
    # call's deadline. It would take a caller with no token up to max_request_bytes of memory per RPC thread.
    never = threading.Event()

    stub = channel.stream_stream(method(name)) if method(name) in STREAMING else channel.stream_unary(method(name))
    for metadata in ((), (("authorization", "Bearer stolen"),)):
        with pytest.raises(grpc.RpcError) as refused:
            reply = stub(_no_request_until(never), metadata=metadata, timeout=CALL_TIMEOUT_S)
            list(reply) if method(name) in STREAMING else None
        assert refused.value.code() == S.UNAUTHENTICATED, refused.value.details()
    never.set()
    # Undecodable bytes too: the token is checked first.
    assert call(channel, method(name), b"\xff\xff", metadata=())[0] == S.UNAUTHENTICATED


def test_a_tenants_submissions_beyond_its_turns_are_refused_before_their_photos_are_read(channel, controller):
    turns = controller.service.config.max_submits_per_tenant
    uploaded = threading.Event()

    submit = channel.stream_unary(method("SubmitJob"))
    uploading = [submit.future(_no_request_until(uploaded), metadata=AUTH, timeout=HELD_S) for _ in range(turns)]
    one_more = jobs_pb2.SubmitJobRequest().SerializeToString()
    deadline = time.monotonic() + CALL_TIMEOUT_S
    while (refused := call(channel, method("SubmitJob"), one_more))[0] != S.RESOURCE_EXHAUSTED:
        assert time.monotonic() < deadline, f"never refused beside {turns} uploads: {refused}"  # they start apart
    assert "max_submits_per_tenant" in refused[1]
    # Another tenant's turns are its own.
    assert call(channel, method("SubmitJob"), one_more, metadata=OTHER_AUTH)[0] == S.INVALID_ARGUMENT
    uploaded.set()  # the uploads end without a request: each is refused, and gives its turn back
    assert {f.exception().code() for f in uploading} == {S.INVALID_ARGUMENT}
    assert call(channel, method("SubmitJob"), one_more)[0] == S.INVALID_ARGUMENT


@pytest.mark.parametrize("name", ["GetJob", "WatchJob"])
def test_a_tenants_other_calls_beyond_its_turns_are_refused_before_their_requests_are_read(channel, controller, name):
    """Every method's request may carry up to max_request_bytes in fields it does not know: one tenant's GetJob
    calls of 75 MiB each, 40 at once, took the controller to 2.4 GB. Its calls other than SubmitJob have turns of
    their own (a watch's only while its request is read), refused before the request is read."""
    turns = controller.service.config.max_calls_per_tenant
    sent = threading.Event()

    start = channel.stream_unary(method(name)).future if name == "GetJob" else channel.stream_stream(method(name))
    waiting = [start(_no_request_until(sent), metadata=AUTH, timeout=HELD_S) for _ in range(turns)]
    get = jobs_pb2.GetJobRequest(job_id="job-000000000000").SerializeToString()
    deadline = time.monotonic() + CALL_TIMEOUT_S
    while (refused := call(channel, method("GetJob"), get))[0] != S.RESOURCE_EXHAUSTED:
        assert time.monotonic() < deadline, f"never refused beside {turns} calls: {refused}"  # they start apart
    assert "max_calls_per_tenant" in refused[1]
    # Another tenant's turns are its own, and so are this tenant's submissions'.
    assert call(channel, method("GetJob"), get, metadata=OTHER_AUTH)[0] == S.NOT_FOUND
    assert call(channel, method("SubmitJob"), jobs_pb2.SubmitJobRequest().SerializeToString())[0] == S.INVALID_ARGUMENT
    sent.set()  # the calls end without a request: each is refused, and gives its turn back
    for held in waiting:
        with pytest.raises(grpc.RpcError) as ended:
            held.result() if name == "GetJob" else list(held)
        assert ended.value.code() == S.INVALID_ARGUMENT
    assert call(channel, method("GetJob"), get)[0] == S.NOT_FOUND


def _no_request_until(event: threading.Event):
    """A call's request stream that sends nothing, and ends once `event` is set: a request still arriving (photos
    uploading), then none at all."""
    event.wait(HELD_S)
    return
    yield


# --- after each test ---------------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def after_each_test(request):
    """After each test that used them: nothing was written outside storage, and the controller still serves. Here
    rather than in tests of their own that ran after the fuzzing: alone, or after a -k, --lf or a reordering, those
    passed with no fuzzing before them."""
    yield
    if "sandbox" in request.fixturenames:
        _assert_nothing_written_outside_storage(request.getfixturevalue("sandbox"))
    if "channel" in request.fixturenames:
        _assert_still_serves(request.getfixturevalue("channel"), request.getfixturevalue("controller"))


def _assert_nothing_written_outside_storage(sandbox: Sandbox) -> None:
    assert sandbox.outside_storage() == sandbox.before
    for place in (Path("/tmp"), Path("/"), Path.cwd(), sandbox.root.parent):
        assert not [p for p in place.iterdir() if MARK in p.name], place
    # Inside storage, only the layout the controller means to write: the database, and per job its spec and
    # its uploaded images under safe names.
    allowed = [
        r"controller\.db(-wal|-shm|-journal|\.controller-lock)?",
        r"jobs",
        r"jobs/job-[0-9a-f]{12}",
        r"jobs/job-[0-9a-f]{12}/spec\.json",
        r"jobs/job-[0-9a-f]{12}/instance_images",
        r"jobs/job-[0-9a-f]{12}/instance_images/\d{3}_[A-Za-z0-9_-][A-Za-z0-9._-]{0,79}",
    ]
    for path in sandbox.storage.rglob("*"):
        relative = path.relative_to(sandbox.storage).as_posix()
        assert any(re.fullmatch(pattern, relative) for pattern in allowed), relative
        assert not path.is_symlink(), relative


def _assert_still_serves(channel, controller) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "dreambooth.v1.JobService", "dreambooth.v1.ModelService"):
        reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    assert controller.reconciler._thread.is_alive()
    # And still does its job: a valid request works.
    code, _, _ = call(channel, method("ListJobs"), jobs_pb2.ListJobsRequest(page_size=5).SerializeToString())
    assert code == S.OK
    assert os.path.isdir(controller.service.config.storage)


def test_deploy_without_serving_configured_is_a_failed_precondition(controller, channel):
    from controller.store import ModelRecord
    from dreambooth.v1 import models_pb2

    controller.service.store.insert_model(ModelRecord("model-x", "fuzzer", "job-x", "/nowhere"))
    request = models_pb2.DeployModelRequest(model_id="model-x").SerializeToString()
    code, details, _ = call(channel, "/dreambooth.v1.ModelService/DeployModel", request)
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "serving:" in details
    code, _, _ = call(channel, "/dreambooth.v1.ModelService/DeployModel", request, metadata=OTHER_AUTH)
    assert code == grpc.StatusCode.NOT_FOUND


def test_a_file_uri_names_the_path_it_encodes():
    """Java's Path.toUri() and Go's net/url write a space as %20: the file is "my dog.jpg"."""
    from controller.intake import shared_path

    assert shared_path("file:///photos/my%20dog.jpg") == Path("/photos/my dog.jpg")
    assert shared_path("/photos/my%20dog.jpg") == Path("/photos/my%20dog.jpg")  # a path is taken as it is
