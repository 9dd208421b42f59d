"""The serving API's HTTP contract through FastAPI's TestClient: the ingress's handlers without Ray Serve, in front of
a stand-in for the generator replicas. Error bodies, status codes, headers, the OpenAPI document."""

from __future__ import annotations

import asyncio
import json
import sys
from types import SimpleNamespace

import pytest
from fastapi.testclient import TestClient
from ray import serve
from ray.exceptions import RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError

from serving import app
from serving.access import user_config
from serving.config import MAX_BODY_BYTES, ServeConfig
from serving.engine import GenerationRequest, GenerationResult, ModelUnavailable
from serving.http_api import EncodedResult
from serving.model_loads import unavailable
from serving.step_batching import out_of_device_memory

TOKEN = "alice-serving-token"
GENERATE = "/v1/models/rex/generate"
JSON = {"content-type": "application/json"}


class StandInGenerator:
    """Called as the ingress calls the generator deployment's handle; answers one image or raises `refusal`."""

    def __init__(self) -> None:
        self.refusal: Exception | None = None
        self.generate = self

    def options(self, **_) -> StandInGenerator:
        return self

    async def remote(self, request: GenerationRequest) -> EncodedResult:
        if self.refusal is not None:
            raise self.refusal
        return EncodedResult(GenerationResult([], [request.seed], 1, 1, 0.1), [b"png"])


@pytest.fixture
def generator() -> StandInGenerator:
    return StandInGenerator()


@pytest.fixture
def http(generator, monkeypatch, tmp_path) -> TestClient:
    """The ingress serving model rex for tenant alice; its requests carry alice's token unless they say otherwise."""
    monkeypatch.setattr(app, "keep_replica_grpc_on_loopback", lambda: None)  # a replica's, before Serve's gRPC
    # serve.ingress subclasses the class it decorates: that one is the ingress without Serve.
    ingress = app.Ingress.func_or_class.__bases__[0](generator, ServeConfig(retry_after_s=3).to_dict())
    ingress.reconfigure(user_config({"rex": str(tmp_path / "rex")}, {"rex": "alice"}, {"alice": [TOKEN]}))
    # Serve hands the handlers, as `self`, what its replica context holds.
    monkeypatch.setattr(serve, "get_replica_context", lambda: SimpleNamespace(servable_object=ingress))
    return TestClient(app.api, raise_server_exceptions=False, headers={"Authorization": f"Bearer {TOKEN}"})


def nested(depth: int) -> bytes:
    return b'{"prompt": ' + b"[" * depth + b"]" * depth + b"}"


def test_a_generated_image_comes_with_its_seed_and_batch_size(http):
    response = http.post(GENERATE, json={"prompt": "a photo of sks dog", "seed": 7})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png" and response.content == b"png"
    assert (response.headers["x-seed"], response.headers["x-batch-size"]) == ("7", "1")


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (b'{"prompt": "a photo of sks dog", "seed": 1e400}', "seed"),  # parsed as infinity
        (b'{"prompt": "a photo of sks dog", "seed": NaN}', "seed"),
        (b'{"prompt": "a photo of sks dog", "num_images": -Infinity}', "num_images"),
    ],
)
def test_a_malformed_field_that_json_cannot_echo_is_a_422_naming_it(http, body, field):
    response = http.post(GENERATE, content=body, headers=JSON)
    assert response.status_code == 422, response.text
    assert response.json()["code"] == "invalid_argument"
    assert [problem["loc"] for problem in response.json()["detail"]] == [["body", field]]


def test_a_deeply_nested_body_is_refused_with_a_reason_whatever_its_depth(http):
    # Whether it parses depends on the stack left: a 422 (the prompt is no string) or a 400, never a 500. Echoing
    # the value back overflowed the stack at depths the parser took (~950).
    for depth in range(700, sys.getrecursionlimit(), 10):
        response = http.post(GENERATE, content=nested(depth), headers=JSON)
        assert response.status_code in (400, 422), (depth, response.text)
        assert response.json()["code"] == "invalid_argument"
    response = http.post(GENERATE, content=nested(100_000), headers=JSON)
    assert response.status_code == 400, response.text
    assert response.json()["detail"] == {"field": "body", "message": "nested too deep to parse"}


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded"])
def test_a_body_not_sent_as_json_is_told_to_say_it_is(http, content_type):
    headers = {"content-type": content_type} if content_type else {}
    response = http.post(GENERATE, content=b'{"prompt": "a photo of sks dog"}', headers=headers)
    assert response.status_code == 422, response.text
    assert "`Content-Type: application/json`" in response.json()["detail"][0]["msg"]
    charset = {"content-type": "application/json; charset=utf-8"}
    assert http.post(GENERATE, content=b'{"prompt": "a photo of sks dog"}', headers=charset).status_code == 200


@pytest.mark.parametrize("body", [b"\xff{", '{"prompt": "a photo of sks caf\xe9"}'.encode("latin-1")])
def test_a_body_that_is_not_utf8_is_a_400_naming_the_body(http, body):
    response = http.post(GENERATE, content=body, headers=JSON)
    assert response.status_code == 400, response.text
    expected = {"field": "body", "message": "not UTF-8: send the JSON encoded as UTF-8"}
    assert response.json() == {"detail": expected, "code": "invalid_argument"}


def test_a_body_over_the_cap_is_413_saying_the_cap_whether_its_length_is_announced_or_not(http):
    body = b'{"prompt": "a photo of sks dog"}' + b" " * MAX_BODY_BYTES
    chunks = (body[i : i + 65536] for i in range(0, len(body), 65536))
    for content in (body, chunks):
        response = http.post(GENERATE, content=content, headers=JSON)
        assert response.status_code == 413, response.text
        assert response.json()["code"] == "too_large" and str(MAX_BODY_BYTES) in response.json()["detail"]
    assert http.post(GENERATE, json={"prompt": "a photo of sks dog"}).status_code == 200


@pytest.mark.parametrize(
    ("refusal", "status", "code"),
    [
        (app.TenantBusy("your tenant has 32 requests in progress"), 429, "throttled"),
        (BackPressureError(num_queued_requests=64, max_queued_requests=64), 503, "overloaded"),
        (out_of_device_memory("sampling"), 503, "overloaded"),
        (ModelUnavailable("/storage/models/rex: truncated"), 503, "model_unavailable"),
        (RayActorError(), 503, "unavailable"),
    ],
)
def test_a_request_refused_for_now_has_a_code_and_retry_after(http, generator, refusal, status, code):
    generator.refusal = refusal
    response = http.post(GENERATE, json={"prompt": "a photo of sks dog"})
    assert (response.status_code, response.json()["code"]) == (status, code), response.text
    assert response.headers["retry-after"] == "3" and response.json()["detail"].endswith("; retry later")


@pytest.mark.parametrize("through_ray", [False, True])
def test_a_request_out_of_device_memory_alone_is_413_saying_what_to_lower(http, generator, through_ray):
    """Every out-of-memory was 503 "retry later", also for a request alone in its batch, which would fail the same
    on every retry (the SDK retried it to the end); the replica's advice never reached the client."""
    refusal = out_of_device_memory("sampling 4 images of 1024x1024", alone=True)
    if through_ray:  # what the ingress gets from the replica: a RayTaskError subclassing it, its str a traceback
        refusal = RayTaskError("generate", "Traceback ...", refusal, "replica", 1, "127.0.0.1").as_instanceof_cause()
    generator.refusal = refusal
    response = http.post(GENERATE, json={"prompt": "a photo of sks dog", "num_images": 4, "output_format": "json"})
    assert (response.status_code, response.json()["code"]) == (413, "too_large"), response.text
    assert "retry-after" not in response.headers
    assert response.json()["detail"] == (
        "the device ran out of memory sampling 4 images of 1024x1024 with no other request beside it, as it would "
        "every time: ask for fewer images (num_images) or smaller ones (width, height)"
    )


def test_a_model_refused_for_longer_than_retry_after_says_how_long(http, generator):
    """A model whose load failed is refused for LOAD_RETRY_S: clients retrying after the configured Retry-After (3 s
    here) were refused each time, and gave up before it would load."""
    generator.refusal = unavailable("model rex's load failed 2 s ago: truncated", retry_after_s=12.2)
    response = http.post(GENERATE, json={"prompt": "a photo of sks dog"})
    assert (response.status_code, response.json()["code"]) == (503, "model_unavailable"), response.text
    assert response.headers["retry-after"] == "13"


NOT_DEPLOYED = "model 'fido' is not deployed; GET /v1/models lists them"


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "answer"),
    [
        (
            "post",
            GENERATE,
            {"prompt": "a photo of sks dog", "steps": 1000},
            400,
            {"detail": {"field": "steps", "message": "must be 1..100, got 1000"}, "code": "invalid_argument"},
        ),
        ("post", "/v1/models/fido/generate", {"prompt": "sks dog"}, 404, {"detail": NOT_DEPLOYED, "code": "not_found"}),
        ("get", "/v1/models/fido", None, 404, {"detail": NOT_DEPLOYED, "code": "not_found"}),
        ("get", "/v2/models", None, 404, {"detail": "Not Found", "code": "not_found"}),
        ("get", GENERATE, None, 405, {"detail": "Method Not Allowed", "code": "method_not_allowed"}),
    ],
)
def test_every_error_body_has_a_code_beside_its_detail(http, method, path, body, status, answer):
    response = http.request(method, path, json=body)
    assert (response.status_code, response.json()) == (status, answer)


@pytest.mark.parametrize("authorization", [None, "", "Bearer", "Bearer nope", f"Basic {TOKEN}", TOKEN])
def test_a_request_without_a_valid_bearer_token_is_401(http, authorization):
    headers = {"authorization": authorization} if authorization is not None else {}
    client = TestClient(app.api, raise_server_exceptions=False, headers=headers)
    for response in (client.post(GENERATE, json={"prompt": "a photo of sks dog"}), client.get("/v1/models")):
        assert response.status_code == 401, response.text
        assert response.headers["www-authenticate"] == "Bearer"
        detail = "send `Authorization: Bearer <token>` with your controller token"
        assert response.json() == {"detail": detail, "code": "unauthenticated"}
    lowercase = {"authorization": f"bearer  {TOKEN}"}
    assert [m["model_id"] for m in http.get("/v1/models", headers=lowercase).json()["models"]] == ["rex"]


def test_a_body_without_a_valid_token_is_refused_before_it_is_read(http, monkeypatch):
    """Serve hands the ingress a request with its headers: bodies that never finish arriving, from callers with no
    token (checked only once FastAPI had the body), held the ingress's slots for body_timeout_s each. Each such
    refusal is counted as the handler counts its own; other routes answer as they did."""
    read, sent, outcomes = [], [], []
    metrics = serve.get_replica_context().servable_object.metrics
    monkeypatch.setattr(metrics, "record", lambda model_class, outcome, *_: outcomes.append((model_class, outcome)))

    async def receive():
        read.append(True)
        await asyncio.Event().wait()  # the body never comes

    async def send(message):
        sent.append(message)

    headers = [(b"content-type", b"application/json"), (b"content-length", b"100")]
    for authorization in (None, b"Bearer nope"):
        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "POST",
            "scheme": "http",
            "path": GENERATE,
            "raw_path": GENERATE.encode(),
            "query_string": b"",
            "root_path": "",
            "headers": headers + ([(b"authorization", authorization)] if authorization else []),
            "client": ("127.0.0.1", 40000),
            "server": ("127.0.0.1", 8000),
        }
        asyncio.run(asyncio.wait_for(app.api(scope, receive, send), 10))
        assert (sent[0]["status"], read) == (401, [])
        sent.clear()
    assert [outcome for _, outcome in outcomes] == ["unauthenticated"] * 2
    no_token = TestClient(app.api, raise_server_exceptions=False)
    assert no_token.post("/v1/models", json={}).status_code == 405  # not a route that takes a body


def test_health_says_nothing_about_the_models_to_anonymous_callers(http):
    response = TestClient(app.api).get("/healthz")
    assert response.status_code == 200 and response.json() == {"status": "ok"}


def test_the_openapi_document_has_the_bearer_scheme_the_errors_and_the_headers(http):
    spec = http.get("/openapi.json").json()
    assert spec["components"]["securitySchemes"]["HTTPBearer"] == {
        "type": "http",
        "scheme": "bearer",
        "description": "The tenant's controller token, where tenants are configured.",
    }
    operations = [op for path in spec["paths"].values() for op in path.values()]
    # A header parameter named Authorization is one that OpenAPI tools leave out: the docs' "Try it out" sent none.
    assert not [p for op in operations for p in op.get("parameters", []) if p["name"].lower() == "authorization"]
    generate = spec["paths"]["/v1/models/{model_id}/generate"]["post"]
    assert generate["security"] == [{"HTTPBearer": []}]
    responses = generate["responses"]
    assert sorted(responses) == ["200", "400", "401", "404", "408", "413", "422", "429", "503"]
    assert set(responses["200"]["headers"]) == {"X-Seed", "X-Batch-Size"}
    assert "Retry-After" in responses["429"]["headers"] and "Retry-After" in responses["503"]["headers"]
    error_body = {"$ref": "#/components/schemas/ErrorBody"}
    assert all(responses[s]["content"]["application/json"]["schema"] == error_body for s in responses if s != "200")


def test_every_422_in_the_openapi_document_is_an_error_body():
    """The GET routes listed FastAPI's default 422 body (HTTPValidationError, whose items carry `input`) while the
    ingress answers ErrorBody there too."""
    spec = app.api.openapi()
    unprocessable = {
        (path, method): operation["responses"]["422"]
        for path, operations in spec["paths"].items()
        for method, operation in operations.items()
        if "422" in operation["responses"]
    }
    assert {("/v1/models", "get"), ("/v1/models/{model_id}", "get")} <= unprocessable.keys()
    for answer in unprocessable.values():
        assert answer["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ErrorBody"}
    assert "HTTPValidationError" not in spec["components"]["schemas"]


def test_the_models_list_comes_a_page_at_a_time(http, tmp_path):
    """A replica may serve thousands of models: one answer with them all was megabytes. Each tenant's, by id."""
    ids = [f"model-{i:02d}" for i in range(5)]
    owners = {**dict.fromkeys(ids, "alice"), "model-03x": "bob"}
    tokens = {"alice": [TOKEN], "bob": ["bob-serving-token"]}
    serve.get_replica_context().servable_object.reconfigure(
        user_config({i: str(tmp_path / i) for i in owners}, owners, tokens)
    )
    seen, token = [], ""
    while True:
        page = http.get("/v1/models", params={"page_size": 2, "page_token": token}).json()
        assert len(page["models"]) <= 2
        seen += [model["model_id"] for model in page["models"]]
        if not (token := page["next_page_token"]):
            break
    assert seen == ids


@pytest.mark.parametrize(
    ("page_size", "problem"),
    [
        ("0", {"type": "greater_than_equal", "msg": "Input should be greater than or equal to 1", "ctx": {"ge": "1"}}),
        ("x", {"type": "int_parsing", "msg": "Input should be a valid integer, unable to parse string as an integer"}),
    ],
)
def test_a_bad_query_parameter_is_a_422_naming_it_and_its_bound(http, page_size, problem):
    """A GET sends no body, let alone one without `Content-Type: application/json`: the 422 told its client to send
    the body as JSON, never that page_size must be 1..1000."""
    refused = http.get("/v1/models", params={"page_size": page_size})
    assert refused.status_code == 422, refused.text
    assert refused.json() == {"detail": [{"loc": ["query", "page_size"], **problem}], "code": "invalid_argument"}


def test_a_listed_models_class_is_the_metrics_label_beside_its_class_prompt(http, tmp_path):
    """model_class was the whole class prompt ("a photo of dog") where the README, and the metrics' label of the
    same name, say its last word ("dog")."""
    (tmp_path / "max").mkdir()
    metadata = {"class_prompt": "a photo of Dog", "instance_prompt": "a photo of sks dog"}
    (tmp_path / "max" / "metadata.json").write_text(json.dumps(metadata))
    owners = {"rex": "alice", "max": "alice"}
    models = {model_id: str(tmp_path / model_id) for model_id in owners}
    serve.get_replica_context().servable_object.reconfigure(user_config(models, owners, {"alice": [TOKEN]}))
    listed = http.get("/v1/models/max").json()
    assert (listed["model_class"], listed["class_prompt"], listed["instance_prompt"]) == (
        "dog",
        "a photo of Dog",
        "a photo of sks dog",
    )
    assert http.get("/v1/models").json()["models"][0] == listed
    rex = http.get("/v1/models/rex").json()  # no metadata.json
    assert (rex["model_class"], rex["class_prompt"]) == ("unknown", None)
    fields = app.api.openapi()["components"]["schemas"]["ServedModel"]["properties"]
    assert all(field.get("description") for field in fields.values()), fields


def test_a_reconfigure_reads_the_metadata_of_the_models_it_changes_only(http, tmp_path, monkeypatch):
    """Every deploy and undeploy reconfigures: reading thousands of deployed models' files each time took seconds."""
    read = []

    def read_metadata(path):
        read.append(path.name)
        return app.ModelMetadata(class_prompt="dog")

    monkeypatch.setattr(app.ModelMetadata, "read", staticmethod(read_metadata))
    ingress = serve.get_replica_context().servable_object
    owners = {"rex": "alice", "fido": "alice"}
    ingress.reconfigure(user_config({m: str(tmp_path / m) for m in owners}, owners, {"alice": [TOKEN]}))
    assert read == ["fido"]  # rex was deployed there already (the fixture's)
    read.clear()
    moved = {"rex": str(tmp_path / "rex"), "fido": str(tmp_path / "fido-2"), "max": str(tmp_path / "max")}
    ingress.reconfigure(user_config(moved, {**owners, "max": "alice"}, {"alice": [TOKEN]}))
    assert sorted(read) == ["fido-2", "max"]
    assert [m["model_id"] for m in http.get("/v1/models").json()["models"]] == ["fido", "max", "rex"]
