"""Serving on a real Ray Serve (the session's Ray cluster), over real HTTP on 127.0.0.1, tiny subject models."""

from __future__ import annotations

import base64
import dataclasses
import http.client
import io
import json
import socket
import time
import urllib.parse
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed

import numpy as np
import pytest
import ray
import requests
from PIL import Image
from ray import serve

from serving.config import MAX_BODY_BYTES, RequestLimits, ServeConfig
from serving.deployer import DEPLOYMENTS, ServeDeployer
from serving.model_loads import LOAD_RETRY_S

STEPS = 3


def wait_for_models(deployer: ServeDeployer, model_ids: set[str], timeout_s: float = 300) -> None:
    """Until the ingress lists the models and every replica has started (with compile_unet, a generator
    replica compiles its UNet before it starts: a minute or more on a slow CPU with a cold inductor cache)."""
    base_url = deployer.config.base_url
    deadline = time.monotonic() + timeout_s
    while True:
        status = deployer.status()
        assert status != "DEPLOY_FAILED", deployer.message()
        try:
            response = requests.get(f"{base_url}/v1/models", timeout=5)
            listed = response.ok and model_ids <= {m["model_id"] for m in response.json()["models"]}
            if listed and status == "RUNNING":
                return
        except requests.RequestException:  # refused or held while Serve starts
            pass
        assert time.monotonic() < deadline, f"{model_ids} not served at {base_url} within {timeout_s} s"
        time.sleep(0.5)


@pytest.fixture(scope="module")
def service(ray_cluster, subject_models, serve_port) -> Iterator[ServeConfig]:
    config = ServeConfig(
        app_name="serving-test",
        route_prefix="/",
        http_port=serve_port,
        cpus_per_replica=0,  # leave the test cluster's CPUs to the training tests
        max_batch_size=4,
        batch_wait_timeout_s=0.3,
        max_ongoing_requests=4,
        max_queued_requests=4,
        max_requests_per_tenant=3,  # with tenants only: one test deploys with them
        retry_after_s=3,
        body_timeout_s=2,
        limits=RequestLimits(max_images=4, max_steps=60),
        max_models_per_replica=1,  # rex and fido take turns: every switch evicts the other
        # Requests at the models' native size (the default) run the compiled UNet, compiled when the replica
        # starts; the demo's test runs the eager one through Serve.
        compile_unet=True,
    )
    deployer = ServeDeployer(ray_cluster.dashboard_url, config)
    deployer.apply({k: str(v) for k, v in subject_models.items()})
    wait_for_models(deployer, set(subject_models))
    yield config
    serve.delete(config.app_name, _blocking=False)  # its replicas would take CPU from the tests after this module


def generate(config: ServeConfig, model_id: str, token: str | None = None, **body) -> requests.Response:
    fields = {"prompt": "a photo of sks dog", "steps": STEPS, "seed": 5} | body
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return requests.post(config.endpoint(model_id), json=fields, headers=headers, timeout=120)


def image(response: requests.Response, index: int = 0) -> np.ndarray:
    if response.headers["content-type"] == "image/png":
        data = response.content
    else:
        data = base64.b64decode(response.json()["images"][index]["png_base64"])
    return np.asarray(Image.open(io.BytesIO(data)), dtype=np.float32) / 255


def test_lists_models_and_documents_the_api(service, subject_models):
    models = requests.get(f"{service.base_url}/v1/models", timeout=10).json()["models"]
    assert [m["model_id"] for m in models] == sorted(subject_models)
    assert models[0]["endpoint"] == service.endpoint(models[0]["model_id"])
    assert (models[0]["model_class"], models[0]["class_prompt"]) == ("dog", "a photo of dog")
    assert models[0]["resolution"] == 64
    listing = requests.get(f"{service.base_url}/v1/models", timeout=10).text
    assert str(subject_models["rex"].parent) not in listing  # no storage paths for HTTP clients
    assert requests.get(f"{service.base_url}/healthz", timeout=10).json()["status"] == "ok"
    openapi = requests.get(f"{service.base_url}/openapi.json", timeout=10)
    assert openapi.ok, openapi.text
    paths = openapi.json()["paths"]
    assert "/v1/models/{model_id}/generate" in paths


def test_http_options_a_running_serve_keeps_are_named(service, ray_cluster):
    """A running Serve keeps the HTTP options it started with, and the dashboard took new ones without a word: an
    operator's new http_port left Serve on the old one while every endpoint named the new."""
    details = ServeDeployer(ray_cluster.dashboard_url, service)._client().get_serve_details()
    assert ServeDeployer(ray_cluster.dashboard_url, service).ignored_options(details) == []
    moved = dataclasses.replace(service, http_port=service.http_port + 1, proxy_location="EveryNode")
    assert ServeDeployer(ray_cluster.dashboard_url, moved).ignored_options(details) == [
        f"http_port {service.http_port} (configured: {service.http_port + 1})",
        "proxy_location 'HeadOnly' (configured: 'EveryNode')",
    ]
    assert ServeDeployer(ray_cluster.dashboard_url, moved).ignored_options({"controller_info": {}}) == []  # not up


def test_concurrent_requests_share_batches_and_seeds_hold(service):
    alone = generate(service, "rex", seed=11, guidance_scale=4.0)
    assert alone.status_code == 200, alone.text
    assert alone.headers["content-type"] == "image/png" and alone.headers["x-seed"] == "11"

    bodies = [
        {"seed": 11, "guidance_scale": 4.0},
        {"seed": 12, "guidance_scale": 9.0, "output_format": "json", "num_images": 2},
        {"seed": 13, "negative_prompt": "blurry", "output_format": "json"},
        {"seed": 14, "prompt": "sks dog swimming", "output_format": "json"},
    ]
    with ThreadPoolExecutor(len(bodies)) as pool:
        responses = list(pool.map(lambda body: generate(service, "rex", **body), bodies))
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
    batch_sizes = [int(r.headers["x-batch-size"]) for r in responses]
    assert max(batch_sizes) > 1, batch_sizes
    # The seeded request gives the same image alone and batched (at most one 8-bit level of float noise).
    assert np.abs(image(alone) - image(responses[0])).max() <= 1 / 255 + 1e-6
    two = responses[1].json()
    assert [i["seed"] for i in two["images"]] == [12, 13] and two["batch_size"] == batch_sizes[1]
    assert two["compiled_unet"]  # the replica compiled its UNet when it started (compile_unet)
    # Its second image is seed 13 at its own guidance, 9.0, beside requests at 4.0 and 7.5: as seed 13 at 9.0 alone.
    thirteen = generate(service, "rex", seed=13, guidance_scale=9.0)
    assert np.abs(image(responses[1], 1) - image(thirteen)).max() <= 1 / 255 + 1e-6


def test_a_short_request_shares_steps_with_a_long_one_and_answers_first(service):
    """Step-level batching: requests with different step counts share UNet forwards, and each answers as soon as
    its own steps are done (whole-batch sampling answered both when the long one finished)."""
    answered: list[int] = []

    def send(steps: int, seed: int) -> requests.Response:
        response = generate(service, "rex", steps=steps, seed=seed, output_format="json")
        answered.append(steps)
        return response

    with ThreadPoolExecutor(2) as pool:
        long, short = pool.submit(send, 60, 31), pool.submit(send, 3, 32)
        long, short = long.result(), short.result()
    assert long.status_code == short.status_code == 200, (long.text, short.text)
    assert answered == [3, 60]
    assert short.json()["batch_size"] == long.json()["batch_size"] == 2


def test_a_request_whose_client_went_away_stops_sampling(service):
    """Serve cancels a request whose HTTP client disconnects; the cancellation reaches the step batcher, which
    drops the request at its next step instead of sampling it to the end. Seen from outside: a probe of the same
    model and size shares UNet forwards with a request still sampling (batch_size 2, as in the test above), so a
    probe answering batch_size 1 long before the abandoned request could have finished shows it was dropped."""
    size = {"width": 128, "height": 128}  # 4x the models' 64 px: slower steps, and the eager UNet
    seconds = {}
    for steps in (3, 13):
        alone = generate(service, "rex", steps=steps, seed=41, output_format="json", **size)
        assert alone.status_code == 200, alone.text
        seconds[steps] = alone.json()["inference_s"]
    step_s = (seconds[13] - seconds[3]) / 10  # a step alone: the difference leaves out decoding

    def probe() -> int:
        response = generate(service, "rex", steps=3, seed=43, output_format="json", **size)
        assert response.status_code == 200, response.text
        return response.json()["batch_size"]

    url = urllib.parse.urlsplit(service.endpoint("rex"))
    body = json.dumps({"prompt": "a photo of sks dog", "steps": 60, "seed": 42, **size}).encode()
    head = f"POST {url.path} HTTP/1.1\r\nHost: {url.netloc}\r\nContent-Type: application/json\r\n"
    with socket.create_connection((url.hostname, url.port)) as abandoned:
        abandoned.sendall(f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body)
        # Leave only once it samples: a probe shared its forwards. Up to 3 probes' 9 steps have run, and the few
        # it ran alone between them.
        assert any(probe() == 2 for _ in range(3)), "the 60-step request never sampled beside a probe"
        started = time.monotonic()
    # Sampled to the end it would answer after the 40 or more steps it has left; beside probes, later still. The
    # probes that see it leave pay more than its steps: each waits batch_wait_timeout_s for company before it
    # starts, and its HTTP round trip and decode besides (0.5 s each is ample), and the first may still have shared
    # a step with it before the cancellation arrived.
    would_finish = started + 40 * step_s + 2 * (service.batch_wait_timeout_s + 0.5)
    while probe() != 1:
        assert time.monotonic() < would_finish, "the abandoned 60-step request kept sampling beside the probes"
    assert time.monotonic() < would_finish, f"dropped only after {time.monotonic() - started:.1f} s"


def test_two_subjects_from_one_replica_draw_differently(service):
    rex, fido = generate(service, "rex", seed=21), generate(service, "fido", seed=21)
    assert rex.status_code == fido.status_code == 200
    assert np.abs(image(rex) - image(fido)).mean() > 0.01
    again = generate(service, "rex", seed=21)
    assert np.array_equal(image(again), image(rex))

    # Both at once, with one model slot: every switch evicts (waiting for the requests using the model: the unit
    # test in test_serving_config shows the wait), without deadlock, and every request draws with its subject.
    subjects = ["rex", "fido", "rex", "fido"]
    with ThreadPoolExecutor(len(subjects)) as pool:
        mixed = list(pool.map(lambda model_id: generate(service, model_id, seed=21), subjects))
    assert all(r.status_code == 200 for r in mixed), [r.text for r in mixed]
    for response, model_id in zip(mixed, subjects, strict=True):
        alone = {"rex": rex, "fido": fido}[model_id]
        assert np.abs(image(response) - image(alone)).max() <= 1 / 255 + 1e-6, model_id


def draws_like(config: ServeConfig, model_id: str, reference: np.ndarray, timeout_s: float = 120) -> None:
    """Until `model_id` draws `reference` (seed 21): a reconfigured replica answers with the new models at once."""
    deadline = time.monotonic() + timeout_s
    while True:
        response = generate(config, model_id, seed=21)
        if response.ok and np.abs(image(response) - reference).max() <= 1 / 255 + 1e-6:
            return
        assert time.monotonic() < deadline, f"{model_id} never drew with its new weights: {response.status_code}"
        time.sleep(0.5)


def test_a_model_deployed_from_another_directory_draws_from_it(service, subject_models, ray_cluster):
    """An undeploy or a move releases the model its replica holds (the multiplexer would keep it, memory and
    weights, until the model is evicted by others' loads): a model id now served from another directory draws
    with the weights there, not with those still loaded."""
    deployer = ServeDeployer(ray_cluster.dashboard_url, service)
    fido = image(generate(service, "fido", seed=21))
    rex = image(generate(service, "rex", seed=21))  # rex is loaded now, in the replica's one slot
    assert np.abs(rex - fido).mean() > 0.01
    deployer.apply({"rex": str(subject_models["fido"]), "fido": str(subject_models["fido"])})
    try:
        draws_like(service, "rex", fido)
    finally:
        deployer.apply({k: str(v) for k, v in subject_models.items()})
        draws_like(service, "rex", rex)


def test_a_model_its_replica_has_not_got_yet_is_retried_not_missing(service, subject_models, ray_cluster):
    """Serve reconfigures the ingress and the generator replicas apart (the replicas a fifth at a time, none while
    the deployment scales down): right after a deploy, a request for the new model reaching a replica that does not
    know it yet was told 404 "not deployed", which the SDK does not retry, for minutes."""
    deployer = ServeDeployer(ray_cluster.dashboard_url, service)
    models = {k: str(v) for k, v in subject_models.items()}
    skewed = deployer.application(models | {"newcomer": models["fido"]})
    generator = DEPLOYMENTS.index("Generator")
    skewed["deployments"][generator] = deployer.application(models)["deployments"][generator]  # not there yet
    deployer.application = lambda *_: skewed
    deployer.apply(models)
    try:
        wait_for_models(deployer, {"newcomer"})
        response = generate(service, "newcomer")
        assert response.status_code == 503, response.text
        assert response.json()["code"] == "model_unavailable" and "being deployed" in response.text
        assert response.headers["retry-after"] == str(service.retry_after_s)
        assert generate(service, "nobody").status_code == 404  # not listed: not there
    finally:
        ServeDeployer(ray_cluster.dashboard_url, service).apply(models)
        wait_for_models(deployer, set(subject_models))


def test_a_model_that_cannot_load_answers_503_and_the_others_serve_on(service, subject_models, ray_cluster, tmp_path):
    """A deployed model whose files are gone, truncated or hold unreadable metadata is the operator's to fix: 503
    without the storage path (it was a 400 naming base_model), and the other models serve on (one unreadable
    metadata.json failed the ingress's reconfigure, and Serve stopped it for every model)."""
    import shutil

    truncated = shutil.copytree(subject_models["fido"], tmp_path / "truncated")
    weights = next((truncated / "unet").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:1000])
    unreadable = shutil.copytree(subject_models["fido"], tmp_path / "unreadable")
    (unreadable / "metadata.json").write_text('{"hyperparameters": ')
    misshapen = shutil.copytree(subject_models["fido"], tmp_path / "misshapen")
    (misshapen / "metadata.json").write_text('{"hyperparameters": "x"}')  # JSON, not what an export writes
    broken = {"gone": tmp_path / "gone", "truncated": truncated, "unreadable": unreadable, "misshapen": misshapen}
    deployer = ServeDeployer(ray_cluster.dashboard_url, service)
    deployer.apply({k: str(v) for k, v in (subject_models | broken).items()})
    try:
        wait_for_models(deployer, set(subject_models) | set(broken))
        for model_id in broken:
            response = generate(service, model_id)
            assert response.status_code == 503, (model_id, response.text)
            # A model whose load failed is refused for LOAD_RETRY_S (a retry sooner would be too): Ray's error carries
            # it to the ingress. The others failed before any load (no metadata to read for the prompts' check).
            loaded = model_id in ("truncated", "misshapen")
            refused_s = max(LOAD_RETRY_S, service.retry_after_s) if loaded else service.retry_after_s
            assert response.headers["retry-after"] == str(refused_s), model_id
            assert "cannot be loaded" in response.text and str(tmp_path) not in response.text
        assert generate(service, "rex").status_code == 200
    finally:
        deployer.apply({k: str(v) for k, v in subject_models.items()})
        wait_for_models(deployer, set(subject_models))


def test_one_tenants_burst_is_throttled_and_another_tenant_is_served(service, subject_models, ray_cluster):
    """With tenants, a tenant's requests beyond max_requests_per_tenant (3 here) get 429 with Retry-After at once,
    instead of filling the queue that every tenant shares; another tenant is not held to the first one's count."""
    deployer = ServeDeployer(ray_cluster.dashboard_url, service)
    models = {k: str(v) for k, v in subject_models.items()}
    tokens = {"alice": ["alice-serving-token"], "bob": ["bob-serving-token"]}
    deployer.apply(models, {"rex": "alice", "fido": "bob"}, tokens)
    try:
        deadline = time.monotonic() + 60
        while requests.get(f"{service.base_url}/v1/models", timeout=10).status_code != 401:  # reconfigured
            assert time.monotonic() < deadline, "the ingress never took the tenants' tokens"
            time.sleep(0.2)
        with ThreadPoolExecutor(6) as pool:
            burst = [pool.submit(generate, service, "rex", "alice-serving-token", steps=60, seed=i) for i in range(6)]
            throttled = []
            for answered in as_completed(burst):  # the refused ones answer at once, while the others sample
                if answered.result().status_code != 429:
                    break
                throttled.append(answered.result())
            assert len(throttled) == 3, [f.result().status_code for f in burst if f.done()]
            assert throttled[0].headers["retry-after"] == "3" and "max_requests_per_tenant" in throttled[0].text
            assert generate(service, "fido", "bob-serving-token").status_code == 200
            assert sorted(f.result().status_code for f in burst) == [200, 200, 200, 429, 429, 429]
        # A body comes only with a valid token: without one, 401 before it is read, not 408 once it was slow.
        answer, _ = half_sent_body(service)
        assert (answer.status, answer.getheader("www-authenticate")) == (401, "Bearer")
    finally:
        deployer.apply(models)
        deadline = time.monotonic() + 60
        while requests.get(f"{service.base_url}/v1/models", timeout=10).status_code != 200:
            assert time.monotonic() < deadline, "the ingress kept the tenants' tokens"
            time.sleep(0.2)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"width": 68}, "width"),
        ({"height": 4096}, "height"),
        ({"steps": 1000}, "steps"),
        ({"num_images": 5, "output_format": "json"}, "num_images"),
        ({"num_images": 2}, "output_format"),
        ({"guidance_scale": -1}, "guidance_scale"),
        ({"seed": -3}, "seed"),
        ({"prompt": "  "}, "prompt"),
        ({"prompt": "dog " * 100}, "prompt"),  # over the text encoder's 77 tokens: refused, not cut
        ({"negative_prompt": "x" * 3000}, "negative_prompt"),
        ({"prompt": "a photo of sks dog \ud83d"}, "prompt"),  # valid JSON ("\\ud83d"), but no text: not a 500
    ],
)
def test_bad_requests_get_400_naming_the_field(service, body, field):
    response = generate(service, "rex", **body)
    assert response.status_code == 400, response.text
    assert response.json()["detail"]["field"] == field


def test_malformed_and_unknown(service):
    assert requests.post(service.endpoint("rex"), json={"steps": 2}, timeout=10).status_code == 422  # no prompt
    assert requests.post(service.endpoint("rex"), data=b"\xff{", timeout=10).status_code == 422
    misspelt = requests.post(service.endpoint("rex"), json={"prompt": "sks dog", "num_image": 3}, timeout=10)
    assert misspelt.status_code == 422 and "num_image" in misspelt.text  # not served with the default quietly
    response = generate(service, "no-such-model")
    assert response.status_code == 404 and "not deployed" in response.json()["detail"]
    assert requests.get(f"{service.base_url}/v1/models/no-such-model", timeout=10).status_code == 404


def test_a_body_over_the_cap_is_413_whether_its_length_is_announced_or_not(service):
    # Valid JSON but for its size: FastAPI would read it whole before the handler checks anything.
    body = json.dumps({"prompt": "a photo of sks dog", "steps": 2}).encode() + b" " * MAX_BODY_BYTES
    json_type = {"content-type": "application/json"}
    announced = requests.post(service.endpoint("rex"), data=body, headers=json_type, timeout=30)
    assert announced.status_code == 413, announced.text
    chunks = (body[i : i + 65536] for i in range(0, len(body), 65536))
    chunked = requests.post(service.endpoint("rex"), data=chunks, headers=json_type, timeout=30)
    assert chunked.status_code == 413, chunked.text
    assert generate(service, "rex", steps=2).status_code == 200  # and the ingress still serves


def half_sent_body(service: ServeConfig) -> tuple[http.client.HTTPResponse, str]:
    """A generate request for rex whose body announces 100 bytes and sends 11, and no more: the answer, its body."""
    url = urllib.parse.urlsplit(service.endpoint("rex"))
    head = f"POST {url.path} HTTP/1.1\r\nHost: {url.netloc}\r\nContent-Type: application/json\r\n"
    with socket.create_connection((url.hostname, url.port), timeout=60) as slow:
        slow.sendall(f"{head}Content-Length: 100\r\n\r\n".encode() + b'{"prompt": ')
        answer = http.client.HTTPResponse(slow)
        answer.begin()
        return answer, answer.read().decode()


def test_a_body_not_all_there_in_time_is_408(service):
    """Serve hands the ingress a request with its headers: bodies sent a byte at a time, by callers whose token is
    checked only after, held every slot of the ingress, every tenant's requests queueing behind them."""
    answer, body = half_sent_body(service)
    assert answer.status == 408, body
    assert f"did not arrive within {service.body_timeout_s:g} s" in body


def test_overload_answers_503_with_retry_after(service):
    with ThreadPoolExecutor(24) as pool:
        responses = list(pool.map(lambda i: generate(service, "rex", seed=i, steps=60), range(24)))
    codes = sorted({r.status_code for r in responses})
    assert codes == [200, 503], codes
    rejected = next(r for r in responses if r.status_code == 503)
    assert rejected.headers["retry-after"] == "3"


def test_a_request_whose_replica_dies_answers_503_and_its_retry_succeeds(service):
    """A generator replica dying mid-request (out of memory, a node lost) answers 503 with Retry-After, as
    overload does, rather than a 500 that tells clients not to retry; Serve starts another replica, and a client
    that retries gets its image. (Last in this module: the new replica compiles its UNet again.)"""
    size = {"width": 128, "height": 128}
    with ThreadPoolExecutor(1) as pool:
        doomed = pool.submit(generate, service, "rex", steps=60, seed=51, output_format="json", **size)
        while True:  # until a probe shares a UNet forward with it: then it is sampling in the replica
            probe = generate(service, "rex", steps=3, seed=52, output_format="json", **size)
            assert probe.status_code == 200, probe.text
            if probe.json()["batch_size"] == 2:
                break
            assert not doomed.done(), "the 60-step request answered before a probe shared a step with it"
        # The probe's 3 steps were shared: the doomed request has 57 left, far longer than this takes.
        (replica,) = [
            actor
            for actor in ray.util.list_named_actors(all_namespaces=True)
            if actor["name"].startswith(f"SERVE_REPLICA::{service.app_name}#Generator#")
        ]
        ray.kill(ray.get_actor(replica["name"], namespace=replica["namespace"]), no_restart=True)
        lost = doomed.result()
    assert lost.status_code == 503, lost.text
    assert lost.headers["retry-after"] == str(service.retry_after_s)

    deadline = time.monotonic() + 300
    while (retry := generate(service, "rex", seed=51)).status_code == 503:  # a client honouring Retry-After
        assert time.monotonic() < deadline, "no generator replica came back"
        time.sleep(int(retry.headers["retry-after"]))
    assert retry.status_code == 200, retry.text
