"""A generator replica's subject models: their loads, evictions and the memory they hold. A Generator built in this
process, with Serve's own multiplexer and batching around it (their replica context a stand-in's), sampling the
tiny subject models on the CPU; SharedLoads and ResidentModel alone where that shows it."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import threading
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import ray.serve.context
import ray.serve.multiplex
from ray.serve._private.common import DeploymentID, ReplicaID
from ray.serve._private.config import DeploymentConfig

from serving.engine import GenerationRequest, ModelUnavailable, SubjectModel
from serving.generator import Generator, ModelNotServed
from serving.http_api import EncodedResult
from serving.model_loads import LOAD_RETRY_S, SharedLoads


@pytest.fixture
def replica(monkeypatch, subject_models) -> Iterator[Callable[..., Generator]]:
    """Builds Generators (keyword arguments: ServeConfig settings) serving rex, fido and spot (fido's files), each
    on the CPU as a replica runs it; their step batchers close after the test."""
    # A replica's, before Serve's gRPC: looked up in serving.generator, where Generator is defined.
    monkeypatch.setattr("serving.generator.keep_replica_grpc_on_loopback", lambda: None)
    context = ray.serve.context.ReplicaContext(
        replica_id=ReplicaID("test", DeploymentID("Generator", "test")),
        servable_object=None,
        _deployment_config=DeploymentConfig(max_ongoing_requests=16),
        rank=None,
        world_size=1,
    )
    monkeypatch.setattr(ray.serve.context, "_INTERNAL_REPLICA_CONTEXT", context)
    # The multiplexer tells Serve's controller which models the replica holds, for routing: there is none here.
    monkeypatch.setattr(
        ray.serve.multiplex, "_get_global_client", lambda: SimpleNamespace(record_request_routing_info=lambda _: None)
    )
    built: list[Generator] = []

    def build(**settings) -> Generator:
        generator = Generator.func_or_class({"device": "cpu", "max_batch_size": 4, **settings})
        built.append(generator)
        paths = {"rex": subject_models["rex"], "fido": subject_models["fido"], "spot": subject_models["fido"]}
        asyncio.run(generator.reconfigure({"models": {model_id: str(path) for model_id, path in paths.items()}}))
        return generator

    yield build
    for generator in built:
        generator.batcher.close()


async def generate(generator: Generator, model_id: str, **fields):
    """A request for `model_id` as Serve hands it to the replica (its multiplexed model id in the request's context)."""
    ray.serve.context._set_request_context(multiplexed_model_id=model_id)
    fields = {"prompt": "a photo of sks dog", "steps": 2, "width": 64, "height": 64, "seed": 1} | fields
    return await generator.generate(GenerationRequest(**fields))


def watch_loads(generator: Generator) -> tuple[weakref.WeakSet[SubjectModel], list[list[str]]]:
    """The models in memory (loaded by the engine and not gone), and what was in memory as each load started."""
    in_memory: weakref.WeakSet[SubjectModel] = weakref.WeakSet()
    at_loads: list[list[str]] = []
    load = generator.engine.load

    def watched(model_id: str, path: str) -> SubjectModel:
        # The batcher's delivery thread lets go of a cohort (its model) just after it hands the request its images.
        generator.batcher._delivery.submit(lambda: None).result()
        at_loads.append(sorted(model.model_id for model in in_memory))
        model = load(model_id, path)
        in_memory.add(model)
        return model

    generator.engine.load = watched
    return in_memory, at_loads


def test_a_model_the_multiplexer_evicted_is_gone_before_its_replacement_loads(replica):
    """One model slot: each request evicts the model before it. Serve's batch loop kept the last batch's arguments
    while it waited for the next batch, and they held their model: every switch loaded the next model beside the
    one it evicted, in memory that max_models_per_replica sized for one."""
    generator = replica(max_models_per_replica=1)
    in_memory, at_loads = watch_loads(generator)

    async def one_after_another() -> None:
        for model_id in ("spot", "rex", "fido"):
            await generate(generator, model_id)

    asyncio.run(one_after_another())
    assert at_loads == [[], [], []]
    assert sorted(model.model_id for model in in_memory) == ["fido"]


def test_a_model_evicted_under_a_request_is_gone_before_its_replacement_loads(replica, monkeypatch):
    """A request for fido evicts rex, waiting for the request that samples rex to have its images: rex left memory
    only once that request had encoded them too (the frame of its whole call held the model), after fido's load
    had started."""
    generator = replica(max_models_per_replica=1)
    _, at_loads = watch_loads(generator)
    sampling, may_go_on = threading.Event(), threading.Event()
    encoding_held, fido_loaded = threading.Event(), threading.Event()
    load = generator.engine.load

    def watched_load(model_id: str, path: str) -> SubjectModel:
        try:
            return load(model_id, path)
        finally:
            if model_id == "fido":
                fido_loaded.set()

    generator.engine.load = watched_load

    class HeldEncoding(EncodedResult):
        @classmethod
        def encode(cls, result):  # the request sampling rex encodes its images until fido has loaded
            if encoding_held.is_set():
                fido_loaded.wait(timeout=60)
            return super().encode(result)

    monkeypatch.setattr("serving.generator.EncodedResult", HeldEncoding)

    def on_step(images: int) -> None:
        if encoding_held.is_set():  # the request sampling rex goes on once fido's request evicts it
            sampling.set()
            may_go_on.wait(timeout=60)

    generator.batcher.on_step = on_step

    async def scenario() -> None:
        await generate(generator, "rex")
        encoding_held.set()
        sampler = asyncio.ensure_future(generate(generator, "rex", steps=3))
        assert await asyncio.to_thread(sampling.wait, 60)
        fido = asyncio.ensure_future(generate(generator, "fido"))
        may_go_on.set()
        await asyncio.gather(sampler, fido)

    asyncio.run(scenario())
    assert at_loads == [[], []]


def test_a_model_undeployed_while_it_loads_leaves_memory_with_its_request(replica, subject_models):
    """Undeployed while its load was under way: the load ended in the multiplexer's cache, its request was refused,
    and the cached entry kept the weights (counted as loaded) until an eviction happened to take it."""
    generator = replica()
    in_memory, _ = watch_loads(generator)
    loading, may_finish = threading.Event(), threading.Event()
    load = generator.engine.load

    def held(model_id: str, path: str) -> SubjectModel:
        loading.set()
        may_finish.wait(timeout=60)
        return load(model_id, path)

    generator.engine.load = held

    async def scenario() -> None:
        request = asyncio.ensure_future(generate(generator, "rex"))
        assert await asyncio.to_thread(loading.wait, 60)
        await generator.reconfigure({"models": {"fido": str(subject_models["fido"])}})
        may_finish.set()
        with pytest.raises(ModelNotServed):
            await request

    asyncio.run(scenario())
    gc.collect()
    assert [model.model_id for model in in_memory] == []


def test_a_load_its_request_gave_up_on_is_not_kept_beside_the_next_models(replica):
    """One model slot, spot in it. A request for rex evicts spot and goes away while rex loads: the load goes on
    and was kept LOAD_KEPT_S for a request to take over, outside the multiplexer's count. The next model's request
    found the multiplexer empty, evicted nothing, and the replica held two models where it has room for one."""
    generator = replica(max_models_per_replica=1)
    in_memory, _ = watch_loads(generator)
    rex_loading, rex_may_load = threading.Event(), threading.Event()
    load = generator.engine.load

    def slow_rex(model_id: str, path: str) -> SubjectModel:
        if model_id == "rex":
            rex_loading.set()
            rex_may_load.wait(timeout=60)
        return load(model_id, path)

    generator.engine.load = slow_rex

    async def scenario() -> None:
        await generate(generator, "spot")
        rex = asyncio.ensure_future(generate(generator, "rex"))
        assert await asyncio.to_thread(rex_loading.wait, 60)
        rex.cancel()  # its client went away
        with contextlib.suppress(asyncio.CancelledError):
            await rex
        del rex  # its CancelledError's traceback holds the load; Serve drops a cancelled request's task
        rex_may_load.set()
        await generate(generator, "fido")

    asyncio.run(scenario())
    gc.collect()
    assert sorted(model.model_id for model in in_memory) == ["fido"]


def test_a_load_nobody_took_over_is_dropped_once_another_models_load_starts():
    """Finished, it goes as the other load starts; still running then, once it finishes. A request waiting for one
    still gets it."""

    class Weights:
        pass

    async def scenario() -> None:
        gates = {model_id: asyncio.Event() for model_id in ("finished", "running", "awaited", "next")}
        loaded: dict[str, weakref.ref] = {}

        async def load(model_id: str) -> Weights:
            await gates[model_id].wait()
            weights = Weights()
            loaded[model_id] = weakref.ref(weights)
            return weights

        loads = SharedLoads(load, keep_s=3600)
        gates["finished"].set()
        orphans = [asyncio.ensure_future(loads.get(model_id)) for model_id in ("finished", "running", "awaited")]
        await asyncio.sleep(0)  # their loads start
        for orphan in orphans:
            orphan.cancel()  # their clients went away
        await asyncio.gather(*orphans, return_exceptions=True)
        del orphans  # their CancelledErrors' tracebacks hold the loads
        assert loaded["finished"]() is not None  # kept for a request to take over
        waiting = asyncio.ensure_future(loads.get("awaited"))  # a request that came back for it
        starting = asyncio.ensure_future(loads.get("next"))
        await asyncio.sleep(0)  # the next load starts
        gc.collect()
        assert loaded["finished"]() is None
        gates["running"].set()  # it finishes first: the loop runs callbacks in the order they come
        gates["awaited"].set()
        assert isinstance(await waiting, Weights)
        gc.collect()
        assert loaded["running"]() is None
        gates["next"].set()
        await starting

    asyncio.run(scenario())


def test_an_eviction_whose_request_went_away_still_waits_for_the_models_users(replica):
    """One model slot. A request for fido evicts rex, which another request samples, and waits for it; its client
    goes away meanwhile. Serve had taken rex out of the multiplexer already: the next load no longer waited for
    rex's request, and a request for rex loaded a second copy beside the one still sampling."""
    generator = replica(max_models_per_replica=1)
    futures: list = []  # the step batcher's, of each request: done once its images are out
    submit = generator.batcher.submit

    def watched_submit(*args, **kwargs):
        futures.extend(submitted := submit(*args, **kwargs))
        return submitted

    generator.batcher.submit = watched_submit
    sampling, may_go_on = threading.Event(), threading.Event()
    sampled_at_loads: list[bool] = []  # whether the first rex's request had its images as each load started
    load = generator.engine.load

    def watched_load(model_id: str, path: str) -> SubjectModel:
        sampled_at_loads.append(all(future.done() for future in futures))
        return load(model_id, path)

    generator.engine.load = watched_load

    async def scenario() -> None:
        await generate(generator, "rex")

        def on_step(images: int) -> None:  # the request sampling rex holds it until the test lets it go on
            sampling.set()
            may_go_on.wait(timeout=60)

        generator.batcher.on_step = on_step
        sampler = asyncio.ensure_future(generate(generator, "rex", steps=3))
        assert await asyncio.to_thread(sampling.wait, 60)
        resident = generator._residents["rex"]
        evicting, evict = asyncio.Event(), resident.__del__

        async def watched_evict() -> None:  # what the multiplexer awaits as it evicts rex
            evicting.set()
            await evict()

        resident.__del__ = watched_evict
        fido = asyncio.ensure_future(generate(generator, "fido"))
        await evicting.wait()
        fido.cancel()  # its client went away while the eviction waited for the request sampling rex
        with contextlib.suppress(asyncio.CancelledError):
            await fido
        rex = asyncio.ensure_future(generate(generator, "rex"))
        may_go_on.set()
        await asyncio.gather(sampler, rex)

    asyncio.run(scenario())
    assert sampled_at_loads == [True, True]


def test_requests_for_a_model_on_hung_storage_hold_up_neither_the_replica_nor_each_other(replica, subject_models):
    """A request's prompts are checked with its model's tokenizer, read from the model's files before it loads.
    Each request for a model whose storage stopped answering held a thread of the default executor for good: past
    its threads (at most 32), no request of any model could encode its images, a loaded model's included."""
    generator = replica(max_batch_size=64, max_ongoing_requests=64)  # none refused for waiting (the test below)
    hung_reads = 0
    storage_answers = threading.Event()
    tokenizer = generator.engine.tokenizer

    def hung_tokenizer(path):
        nonlocal hung_reads
        if Path(path) == subject_models["fido"]:  # spot's files, and fido's
            hung_reads += 1
            storage_answers.wait(timeout=60)
        return tokenizer(path)

    generator.engine.tokenizer = hung_tokenizer

    async def scenario() -> None:
        await generate(generator, "rex")  # loaded, its tokenizer read
        hung = [asyncio.ensure_future(generate(generator, "spot", seed=seed)) for seed in range(40)]
        try:
            await asyncio.wait_for(generate(generator, "rex"), 30)
        finally:
            for request in hung:
                request.cancel()  # their clients went away
            storage_answers.set()
            await asyncio.gather(*hung, return_exceptions=True)
        assert hung_reads == 1  # one read for the 40 requests

    asyncio.run(scenario())


def test_requests_past_a_batch_waiting_for_one_models_load_are_refused_at_once(replica, subject_models):
    """Each request waiting for its model's load holds one of the replica's max_ongoing_requests, up to
    LOAD_TIMEOUT_S where its storage stopped answering: a burst for one model left every other model's requests
    queueing behind it. Past max_batch_size (4 here) of them, the next is refused at once (503, retry later);
    a burst for a loaded model, which waits for no load, is not."""
    generator = replica()
    storage_answers = threading.Event()
    tokenizer = generator.engine.tokenizer

    def hung_tokenizer(path):
        if Path(path) == subject_models["fido"]:  # spot's files
            storage_answers.wait(timeout=60)
        return tokenizer(path)

    generator.engine.tokenizer = hung_tokenizer

    async def scenario() -> None:
        await generate(generator, "rex")
        waiting = [asyncio.ensure_future(generate(generator, "spot", seed=seed)) for seed in range(4)]
        try:
            await asyncio.sleep(0)  # they wait for spot's files
            for seed in (4, 5):
                with pytest.raises(ModelUnavailable, match="4 requests wait for model spot to load") as refused:
                    await asyncio.wait_for(generate(generator, "spot", seed=seed), 10)
                assert refused.value.retry_after_s == LOAD_RETRY_S  # 2 s, retried 3 times, ended before loads
            await asyncio.gather(*(generate(generator, "rex", seed=seed) for seed in range(8)))
        finally:
            storage_answers.set()
        assert all(result.png for result in await asyncio.gather(*waiting))  # served once its files answer

    asyncio.run(scenario())
