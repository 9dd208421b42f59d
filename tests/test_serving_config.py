"""Serving's configuration, request bounds and the Serve config it produces: pure logic, no cluster."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import inspect
import json
import socket
import weakref
from types import SimpleNamespace

import pytest
from pydantic import ValidationError
from ray.serve.schema import ServeDeploySchema

from dreambooth.errors import InputError
from serving.access import Access, Unauthenticated, user_config
from serving.app import build_app
from serving.config import RequestLimits, ServeConfig
from serving.deployer import ServeDeployer
from serving.engine import GenerationResult, ModelUnavailable
from serving.generator import ModelNotServed
from serving.http_api import EncodedResult, GenerateBody, json_response, to_generation_request
from serving.metrics import MAX_MODEL_CLASSES, class_label
from serving.model_loads import ResidentModel, SharedLoads


@pytest.mark.parametrize(
    ("settings", "field"),
    [
        ({"http_port": 0}, "serving.http_port"),
        ({"route_prefix": "v1"}, "serving.route_prefix"),
        ({"route_prefix": "/img/"}, "serving.route_prefix"),  # Serve refuses it only at deploy time
        ({"http_host": "0.0.0.0"}, "serving.public_url"),  # endpoints would say http://0.0.0.0:8000/...
        ({"max_replicas": 2, "target_ongoing_requests": 0}, "serving.target_ongoing_requests"),
        ({"device": "tpu"}, "serving.device"),
        ({"min_replicas": 2, "max_replicas": 1}, "serving.max_replicas"),
        ({"max_batch_size": 8, "max_ongoing_requests": 4}, "serving.max_ongoing_requests"),
        ({"max_batch_size": 2, "limits": {"max_images": 4}}, "serving.limits.max_images"),
        ({"proxy_location": "Everywhere"}, "serving.proxy_location"),
        ({"batch_size": 8}, "serving.batch_size"),  # a typo of max_batch_size
        ({"limits": {"max_step": 9}}, "serving.limits.max_step"),
        ({"retry_after_s": -1}, "serving.retry_after_s"),
        ({"max_requests_per_tenant": 0}, "serving.max_requests_per_tenant"),
        ({"limits": {"max_steps": 1001}}, "serving.limits.max_steps"),  # DDIM raises past its 1000 timesteps
        ({"limits": {"max_side": 1020}}, "serving.limits.max_side"),
        ({"limits": {"max_prompt_chars": 0}}, "serving.limits.max_prompt_chars"),
        ({"limits": {"max_guidance_scale": -1}}, "serving.limits.max_guidance_scale"),
    ],
)
def test_bad_settings_name_the_setting(settings, field):
    with pytest.raises(InputError) as error:
        ServeConfig.from_dict(settings)
    assert error.value.field == field


def test_endpoint_and_round_trip():
    config = ServeConfig(http_port=9000, route_prefix="/img")
    assert config.endpoint("m1") == "http://127.0.0.1:9000/img/v1/models/m1/generate"
    assert (
        ServeConfig(public_url="https://dreams.example/").endpoint("m1")
        == "https://dreams.example/v1/models/m1/generate"
    )
    assert ServeConfig.from_dict(config.to_dict()) == config


def test_the_deployed_config_is_valid_for_serve_and_carries_the_models():
    deployer = ServeDeployer("http://127.0.0.1:8265", ServeConfig())
    app = deployer.application({"b": "/models/b", "a": "/models/a"})
    schema = ServeDeploySchema.model_validate(
        {"proxy_location": "HeadOnly", "http_options": {"port": 8000}, "applications": [app]}
    )
    [parsed] = schema.applications
    assert parsed.import_path == "serving.app:build_app"
    expected = {"models": {"a": "/models/a", "b": "/models/b"}, "owners": {}, "tokens": {}}
    assert {d.name: d.user_config for d in parsed.deployments} == {"Generator": expected, "Ingress": expected}


def test_build_app_turns_settings_into_deployment_options():
    ingress = build_app(
        ServeConfig(min_replicas=1, max_replicas=3, gpus_per_replica=1, max_queued_requests=7).to_dict()
    )
    generator = ingress._bound_deployment.init_args[0]._bound_deployment
    options = generator._deployment_config
    assert options.autoscaling_config.min_replicas == 1 and options.autoscaling_config.max_replicas == 3
    assert options.max_queued_requests == 7
    assert options.graceful_shutdown_timeout_s == 300  # downscaling lets long requests finish (Serve's default: 20)
    # The ingress holds each request as long: a redeploy that replaces it does not cut them off after 20 s.
    assert ingress._bound_deployment._deployment_config.graceful_shutdown_timeout_s == 300
    assert generator.ray_actor_options["num_gpus"] == 1
    fixed = build_app(ServeConfig(min_replicas=2, max_replicas=2).to_dict())
    assert fixed._bound_deployment.init_args[0]._bound_deployment._deployment_config.num_replicas == 2


def test_latency_buckets_reach_the_longest_a_request_may_take():
    """A request waits up to LOAD_TIMEOUT_S for its model's load, then samples for up to SAMPLING_S: a p99 past the
    last bucket flat-lines, when a slow storage makes it matter."""
    from serving.config import LOAD_TIMEOUT_S, SAMPLING_S
    from serving.generator import GRACEFUL_SHUTDOWN_S
    from serving.metrics import LATENCY_BUCKETS, MODEL_LOAD_BUCKETS, QUEUE_WAIT_BUCKETS

    assert LATENCY_BUCKETS[-1] >= max(GRACEFUL_SHUTDOWN_S, LOAD_TIMEOUT_S + SAMPLING_S)
    assert QUEUE_WAIT_BUCKETS[-1] >= MODEL_LOAD_BUCKETS[-1] >= LOAD_TIMEOUT_S  # a wait includes its model's load


LIMITS = RequestLimits(max_steps=50, max_images=4, max_side=768, min_side=64)


def test_a_request_gets_the_models_size_and_a_seed_when_omitted():
    request = to_generation_request(GenerateBody(prompt="sks dog"), LIMITS, default_size=512)
    assert (request.width, request.height, request.num_images, request.steps) == (512, 512, 1, 25)
    assert 0 <= request.seed < 2**31
    seeded = to_generation_request(GenerateBody(prompt="sks dog", seed=9, width=256), LIMITS, default_size=512)
    assert (seeded.seed, seeded.width, seeded.height) == (9, 256, 512)


def test_a_result_is_encoded_as_lossless_pngs_for_the_ingress():
    import base64
    import io

    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(0).integers(0, 256, (2, 16, 24, 3), dtype=np.uint8)
    result = GenerationResult([Image.fromarray(p) for p in pixels], [5, 6], 3, 4, 1.5, queue_wait_seconds=0.2)
    encoded = EncodedResult.encode(result)
    assert encoded.result.images == [] and encoded.result.seeds == [5, 6]  # no raw pixels shipped besides the PNGs
    for png, expected in zip(encoded.png, pixels, strict=True):
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(png))), expected)
    body = json_response("rex", encoded)
    assert [i.seed for i in body.images] == [5, 6] and (body.batch_size, body.queue_wait_s) == (3, 0.2)
    assert base64.b64decode(body.images[1].png_base64) == encoded.png[1]


@pytest.mark.parametrize(
    "fields", [{"steps": True}, {"num_images": 1.0}, {"seed": True}, {"width": "512"}, {"guidance_scale": False}]
)
def test_numbers_are_not_coerced(fields):
    # JSON's true is not 1 step (pydantic's lax mode took it): a 422 naming the field.
    with pytest.raises(ValidationError, match=next(iter(fields))):
        GenerateBody.model_validate_json(json.dumps({"prompt": "sks dog"} | fields))


@pytest.mark.parametrize(
    ("fields", "field", "message"),
    [
        ({"steps": 51}, "steps", "1..50"),
        ({"steps": 0}, "steps", "1..50"),
        ({"width": 800}, "width", "64..768"),
        ({"height": 100}, "height", "multiple of 8"),
        ({"num_images": 5, "output_format": "json"}, "num_images", "1..4"),
        ({"num_images": 3}, "output_format", "json"),
        ({"guidance_scale": 31}, "guidance_scale", "0..30"),
        ({"seed": 2**63}, "seed", "must be 0.."),
        ({"prompt": ""}, "prompt", "empty"),
        ({"prompt": "x" * 2001}, "prompt", "at most 2000"),
        ({"prompt": "sks dog \ud83d"}, "prompt", "unpaired surrogate at character 8"),  # an emoji cut in two
        ({"negative_prompt": "\udc00"}, "negative_prompt", "unpaired surrogate"),
    ],
)
def test_out_of_bounds_requests_name_the_field_and_the_bound(fields, field, message):
    body = GenerateBody(**({"prompt": "sks dog"} | fields))
    with pytest.raises(InputError, match=message) as error:
        to_generation_request(body, LIMITS, default_size=512)
    assert error.value.field == field


def test_a_model_trained_larger_than_the_limits_says_to_pass_a_size():
    with pytest.raises(InputError, match="the model's resolution, the default: pass width") as error:
        to_generation_request(GenerateBody(prompt="sks dog"), LIMITS, default_size=1536)
    assert error.value.field == "width"
    request = to_generation_request(GenerateBody(prompt="sks dog", width=512, height=512), LIMITS, default_size=1536)
    assert (request.width, request.height) == (512, 512)


def test_the_model_class_label_is_bounded():
    """Class prompts are tenants' free text: the metric label is a short word, and a bounded set of them."""
    seen: set[str] = set()
    assert class_label("a photo of dog", seen) == "dog" and class_label("A photo of a Dog!", seen) == "dog"
    assert class_label("", seen) == "unknown" and class_label("x" * 100, seen) == "x" * 32
    for i in range(MAX_MODEL_CLASSES):
        class_label(f"a photo of thing{i}", seen)
    assert len(seen) == MAX_MODEL_CLASSES and class_label("a photo of cat", seen) == "other"
    assert class_label("a photo of dog", seen) == "dog"  # one seen before keeps its label


def test_serving_access_follows_the_controllers_tenants_without_holding_their_tokens():
    config = user_config({"m1": "/s/m1", "m2": "/s/m2"}, {"m1": "alice", "m2": "bob"}, {"alice": ("a-1", "a-2")})
    assert "a-1" not in json.dumps(config)  # digests only: the Serve config is readable in Ray's dashboard
    access = Access.from_user_config(config)
    assert access.tenant("a-2") == "alice" and access.tenant("a-1") == "alice"
    for token in (None, "", "nope"):
        with pytest.raises(Unauthenticated):
            access.tenant(token)
    assert access.visible("alice", "m1") and not access.visible("alice", "m2")
    assert not access.visible("alice", "unknown")

    open_access = Access.from_user_config(user_config({"m1": "/s/m1"}, {}, {}))
    assert open_access.tenant(None) is None and open_access.visible(None, "m1")


def test_a_resident_model_is_evicted_only_once_no_request_uses_it():
    """Serve evicts a multiplexed model by awaiting its __del__ (a coroutine function: ray/serve/multiplex.py
    unload_model_lru) before loading the next: that must wait for the requests still using the model. The
    garbage collector must find no __del__ to run (it would not await it)."""
    assert not hasattr(ResidentModel, "__del__")

    async def evict_while_in_use() -> None:
        resident = ResidentModel(model=SimpleNamespace(model_id="m"))
        assert inspect.iscoroutinefunction(resident.__del__)
        await asyncio.wait_for(resident.__del__(), 1)  # unused: at once
        resident = ResidentModel(model=SimpleNamespace(model_id="m"))
        with resident.in_use(), resident.in_use():
            evicting = asyncio.ensure_future(resident.__del__())
            await asyncio.sleep(0.2)
            assert not evicting.done()
        await asyncio.wait_for(evicting, 10)

        # The request whose load evicts the model goes away mid-wait: the model must still go once unused, by
        # reference counting, not wait for a garbage collection (the __del__ attribute refers to the model).
        resident = ResidentModel(model=SimpleNamespace(model_id="m"))
        with resident.in_use():
            evicting = asyncio.ensure_future(resident.__del__())
            await asyncio.sleep(0.05)
            evicting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await evicting
        assert "__del__" not in vars(resident)

    asyncio.run(evict_while_in_use())


def test_a_models_load_outlives_a_cancelled_request_and_serves_the_next():
    """Serve loads a model in the task of the request that needs it; a client going away mid-load must not
    abandon the load, nor make the next request load a second copy beside it."""
    loads_started: list[str] = []

    async def scenario() -> None:
        release = asyncio.Event()

        async def load(model_id: str) -> str:
            loads_started.append(model_id)
            await release.wait()
            if model_id == "broken":
                raise OSError("unreadable weights")
            return f"weights of {model_id}"

        loads = SharedLoads(load, keep_s=3600)
        first = asyncio.ensure_future(loads.get("m"))
        await asyncio.sleep(0)  # its load starts
        first.cancel()  # its client went away
        second = asyncio.ensure_future(loads.get("m"))
        await asyncio.sleep(0)
        release.set()
        assert await second == "weights of m" and loads_started == ["m"]  # one load, taken over
        assert first.cancelled()

        with pytest.raises(OSError):
            await loads.get("broken")
        with pytest.raises(OSError):
            await loads.get("broken")  # tried again, not the first failure kept
        assert loads_started.count("broken") == 2

        # Kept for the next request: one load in all; dropped once keep_s is over: the next loads it again.
        for kept_s, loads_so_far in ((3600, 1), (0, 3)):
            loads = SharedLoads(load, keep_s=kept_s)
            orphan = asyncio.ensure_future(loads.get("n"))
            await asyncio.sleep(0)
            orphan.cancel()
            await asyncio.sleep(0.05)  # the load finishes with nobody waiting (then keep_s 0 forgets it at once)
            assert await loads.get("n") == "weights of n"
            assert loads_started.count("n") == loads_so_far

        # A load once taken over is not held by its keep_s timer: the model goes when its last user lets it go (the
        # multiplexer evicted it), whether its request waited for the load or came after it finished.
        class Weights:
            pass

        async def load_weights(model_id: str) -> Weights:
            await asyncio.sleep(0)
            return Weights()

        loads = SharedLoads(load_weights, keep_s=3600)
        orphan = asyncio.ensure_future(loads.get("late"))
        await asyncio.sleep(0)
        orphan.cancel()
        await asyncio.sleep(0.05)
        del orphan  # its CancelledError's traceback holds the load; Serve drops a cancelled request's task
        taken = [weakref.ref(await loads.get(model_id)) for model_id in ("waited", "late")]
        await asyncio.sleep(0.01)  # callbacks still queued in the loop (the shield's wake-up) hold the result
        gc.collect()
        assert [ref() for ref in taken] == [None, None]

    asyncio.run(scenario())


def test_a_model_whose_load_failed_is_refused_for_a_while_then_tried_again():
    """The multiplexer evicts a loaded model before it calls a load: a model that cannot load, asked for again and
    again, would empty the replica of healthy models and read its broken files each time. A load that failed for
    another reason (undeployed meanwhile, out of memory) is not the model's files: tried again at once."""
    attempts: list[str] = []

    async def scenario() -> None:
        async def load(model_id: str) -> str:
            attempts.append(model_id)
            if model_id == "undeployed":
                raise ModelNotServed(model_id)
            raise ModelUnavailable(f"the model at /models/{model_id} cannot be loaded: truncated unet weights")

        loads = SharedLoads(load, keep_s=3600, retry_s=0.2)
        loads.check("broken")  # never loaded: nothing to refuse
        with pytest.raises(ModelUnavailable) as failed:
            await loads.get("broken")
        assert failed.value.retry_after_s == 0.2  # when to ask again (the Retry-After header)
        with pytest.raises(ModelUnavailable, match="truncated unet weights") as refused:
            loads.check("broken")
        assert 0 < refused.value.retry_after_s <= 0.2
        with pytest.raises(ModelUnavailable, match="truncated unet weights"):  # one past check, queued for the load
            await loads.get("broken")
        loads.check("healthy")
        await asyncio.sleep(0.25)
        loads.check("broken")  # retry_s later: its next request tries again
        with pytest.raises(ModelUnavailable):
            await loads.get("broken")
        loads.drop("broken")  # deployed again (a fixed model, a new path): tried at once
        loads.check("broken")
        with pytest.raises(ModelNotServed):
            await loads.get("undeployed")
        loads.check("undeployed")
        assert attempts == ["broken", "broken", "undeployed"]

    asyncio.run(scenario())


def test_a_load_a_request_gave_up_on_is_refused_until_it_ends():
    """A request waits LOAD_TIMEOUT_S for its model in all (Serve's loading lock and an eviction included), which
    outlasts the load's own timeout: when it gives up, the load still running is refused to the model's next
    requests, as one past its own timeout is; each would otherwise take Serve's loading lock and wait on it again."""

    async def scenario() -> None:
        may_finish = asyncio.Event()

        async def load(model_id: str) -> str:
            await may_finish.wait()
            return model_id

        loads = SharedLoads(load, keep_s=3600, timeout_s=3600)
        waiting = asyncio.ensure_future(loads.get("hung"))
        await asyncio.sleep(0)  # its load started
        loads.overran("never-loaded")  # nothing loading: nothing to refuse
        loads.check("never-loaded")
        waiting.cancel()  # the request's own wait gave up
        loads.overran("hung")
        with pytest.raises(ModelUnavailable, match="has run over") as refused:
            loads.check("hung")
        assert refused.value.retry_after_s == loads.retry_s
        may_finish.set()
        await asyncio.sleep(0.01)
        loads.check("hung")  # it ended: the next request takes the model
        assert await loads.get("hung") == "hung"

    asyncio.run(scenario())


def test_a_load_that_hangs_lets_its_request_go_and_is_not_started_twice():
    """Serve holds its replica's one model-loading lock through a load: one hung on a file system that stopped
    answering kept every other model from loading there, and its requests waited for ever."""
    started: list[str] = []

    async def scenario() -> None:
        answer = asyncio.Event()

        async def load(model_id: str) -> str:
            started.append(model_id)
            await answer.wait()
            return f"weights of {model_id}"

        loads = SharedLoads(load, keep_s=3600, timeout_s=0.05)
        with pytest.raises(ModelUnavailable, match=r"still loading after 0\.05 s"):
            await loads.get("slow")
        # Its next requests are refused before Serve's loading lock (which would evict a loaded model for it).
        with pytest.raises(ModelUnavailable, match="has run over"):
            loads.check("slow")
        loads.check("healthy")
        answer.set()  # the file system answers again: once the load ends, requests for the model go through
        deadline = asyncio.get_running_loop().time() + 5
        while True:
            try:
                loads.check("slow")
                break
            except ModelUnavailable:
                assert asyncio.get_running_loop().time() < deadline, "still refused after its load ended"
                await asyncio.sleep(0.01)
        assert await loads.get("slow") == "weights of slow" and started == ["slow"]  # the same load, taken over

    asyncio.run(scenario())


def test_a_silent_dashboard_times_out_instead_of_holding_the_deploys():
    """The controller applies deployments under a lock, from its RPC threads and its reconciler: a dashboard that
    accepts connections but never answers must end a call in its timeout, not hold them all."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        deployer = ServeDeployer(f"http://127.0.0.1:{silent.getsockname()[1]}", ServeConfig(), timeout_s=1)
        with pytest.raises(Exception, match=r"(?i)timed? ?out"):  # the call's own timeout ended it
            deployer.status()
