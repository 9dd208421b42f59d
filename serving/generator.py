"""The generator deployment: the Ray Serve replicas that sample requests with the sampling engine, keeping the
least recently used subject models loaded (multiplexed, @serve.batch, StepBatcher, SamplingEngine).

Apart from the HTTP ingress (serving/app.py), which only routes requests to it and renders what it returns: here is
what runs on the GPU replicas, their models' loads and the requests waiting for them. Which models are served is
the deployment's `user_config` ({"models": {model_id: path}}), reconfigured without restarting the replicas.
"""

import asyncio
import collections
import concurrent.futures
import contextlib
import functools
import logging
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import torch
from ray import serve

from serving.config import LOAD_TIMEOUT_S, SAMPLING_S, ServeConfig
from serving.engine import GenerationRequest, GenerationResult, ModelUnavailable, SamplingEngine, SubjectModel
from serving.http_api import EncodedResult
from serving.metrics import GeneratorMetrics
from serving.model_loads import LOAD_KEPT_S, LOAD_RETRY_S, ResidentModel, SharedLoads, evictions_done, unavailable
from serving.step_batching import StepBatcher, out_of_device_memory

logger = logging.getLogger(__name__)

GRACEFUL_SHUTDOWN_S = SAMPLING_S
# Threads a generator replica reads its models' files on before their loads (their tokenizers, for the prompts'
# check), one per model directory at most: a few hung on storage that stopped answering leave the others some.
STORAGE_READERS = 8


class ModelNotServed(LookupError):
    """The model id is not (or no longer) deployed."""


def keep_replica_grpc_on_loopback() -> None:
    """Ray Serve 2.60 replicas open their inter-deployment gRPC server on every interface ("[::]:0", no setting).
    On a one-machine cluster (node address 127.0.0.1: tests, `dreambooth up`) nothing may listen beyond loopback,
    so there the replica binds it to 127.0.0.1, the address it advertises anyway. Called in the replica's
    constructor, which runs before Serve starts that server."""
    import ray
    from ray.serve._private import replica

    if ray.util.get_node_ip_address() != "127.0.0.1" or getattr(replica.add_port_to_grpc_server, "loopback", False):
        return
    add_port = replica.add_port_to_grpc_server

    def add_loopback_port(server, address: str) -> int:
        return add_port(server, address.replace("[::]", "127.0.0.1"))

    add_loopback_port.loopback = True
    replica.add_port_to_grpc_server = add_loopback_port


@dataclass
class _Pending:
    model: SubjectModel | None  # None once submitted (_submit_batch)
    request: GenerationRequest
    enqueued: float
    submitted: concurrent.futures.Future | None = None  # once its batch handed it to the step batcher


@serve.deployment
class Generator:
    """Samples requests; keeps the least recently used subject models loaded.

    `@serve.batch` groups the requests that arrive together by model and shape and hands each group to the step
    batcher as one cohort, without waiting for it: the batcher merges cohorts into the running batch between
    denoising steps, so a group that forms while another samples joins it at the next step."""

    def __init__(self, config: dict[str, Any]):
        keep_replica_grpc_on_loopback()
        self.config = ServeConfig.from_dict(config)
        self.engine = SamplingEngine(
            device=None if self.config.device == "auto" else self.config.device,
            compile_unet=self.config.compile_unet,
        )
        self.paths: dict[str, str] = {}
        self._compiled = False  # compile_unet: warmed up before taking requests (reconfigure)
        # What the multiplexer holds, by model id: the models an undeploy must let go of.
        self._residents: weakref.WeakValueDictionary[str, ResidentModel] = weakref.WeakValueDictionary()
        self._loads = SharedLoads(self._load, keep_s=LOAD_KEPT_S)
        # The prompts' check reads the model's tokenizer from its files before it loads: on storage that stopped
        # answering, each request's read held a thread of the default executor for good, until none was left for
        # any model's encoding or load. So one read at a time per model directory, on threads of their own, and
        # refused once it ran over LOAD_TIMEOUT_S; a failed one is not refused after (it evicts nothing).
        self._storage_reads = concurrent.futures.ThreadPoolExecutor(STORAGE_READERS, thread_name_prefix="storage-read")
        self._tokenizer_reads = SharedLoads(self._read_tokenizer, keep_s=0, retry_s=0)
        self._waiting: collections.Counter[str] = collections.Counter()  # by model id: requests awaiting its load
        self.metrics = GeneratorMetrics()
        self._loaded_models = 0  # in memory, until the last request sampling one lets it go
        # Models die on whichever thread drops them last, a garbage collection's too, which may run in a thread
        # holding the lock (setting the gauge allocates): reentrant.
        self._loaded_lock = threading.RLock()
        threading.Thread(
            target=_report_loaded_models, args=(weakref.ref(self),), name="loaded-models-metric", daemon=True
        ).start()
        self._loading = 0  # models loading on a thread of their own (on a GPU), beside the requests sampling
        self.batcher = StepBatcher(
            self.engine,
            max_images=self.config.max_batch_size,
            on_step=self.metrics.step_images.observe,
            # A request out of memory with these holding some is not too large: it may fit a moment later.
            device_shared=lambda: self._loading > 0 or self.config.gpus_per_replica < 1,
        )
        # Decorated here rather than on the class so that the LRU size and the batch size are configuration;
        # around plain functions, because Serve keeps its state in attributes of the decorated callable.

        async def load(model_id: str) -> ResidentModel:
            # Evicted models leave memory first, also those whose eviction's request went away mid-wait.
            await evictions_done(list(self._residents.values()))
            resident = self._residents[model_id] = ResidentModel(await self._loads.get(model_id))
            return resident

        async def sample(items: list[_Pending]) -> list[None]:
            self._submit_batch(items)
            return [None] * len(items)

        self.model = serve.multiplexed(max_num_models_per_replica=self.config.max_models_per_replica)(load)
        self.sample = serve.batch(
            max_batch_size=self.config.max_batch_size,
            batch_wait_timeout_s=self.config.batch_wait_timeout_s,
            batch_size_fn=lambda items: sum(item.request.num_images for item in items),
        )(sample)

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        # A coroutine, so that Serve runs it on the replica's event loop, between requests' steps, as the state it
        # changes expects (a plain method runs on a thread of Serve's pool, beside requests reading that state).
        before, self.paths = self.paths, dict(user_config.get("models", {}))
        for model_id in [m for m in before.keys() | self.paths.keys() if before.get(m) != self.paths.get(m)]:
            # Undeployed, moved or deployed anew: a load or failure of what was there is forgotten; its memory goes
            # when the requests still sampling it finish, not when the multiplexer next evicts it (its slot stays
            # taken until then; a request for it, if it is deployed again, loads it anew).
            self._loads.drop(model_id)
            if (resident := self._residents.get(model_id)) is not None:
                resident.model = None
        if self.config.compile_unet and self.paths and not self._compiled:
            # Compile now rather than in a request: Serve routes requests to a replica once its first
            # reconfigure returns, and the graphs serve every subject of the architecture (the model used for
            # it is dropped; the multiplexer loads models as requests ask).
            def compile_graphs(model_id: str, path: str) -> None:
                self.engine.warm_up(self.engine.load(model_id, path), self.config.max_batch_size)

            for model_id, path in self.paths.items():
                try:  # on the device thread, as the rest of the torch work
                    await asyncio.wrap_future(self.batcher.call(functools.partial(compile_graphs, model_id, path)))
                except Exception:
                    # One unreadable model must not keep the replica (and every other model) from starting: its
                    # requests fail at its load; the graphs come from the next model, or the first load.
                    logger.exception("compiling the UNet with model %s failed; trying the next", model_id)
                    continue
                self._compiled = True
                break

    async def generate(self, request: GenerationRequest) -> EncodedResult:
        arrived = time.monotonic()  # its queue wait includes waiting for its model to load
        model_id = serve.get_multiplexed_model_id()
        if (path := self.paths.get(model_id)) is None:
            raise ModelNotServed(model_id)
        # Before its model loads (which may evict another's): a model that just failed to load, and a prompt the
        # text encoder cannot take, are refused.
        self._loads.check(model_id)
        if not self.engine.holds_tokenizer(path):
            with self._waiting_for_load(model_id):
                await self._tokenizer_reads.get(path)
        prompts = {"prompt": request.prompt, "negative_prompt": request.negative_prompt}
        await asyncio.to_thread(self.engine.check_prompts, path, prompts)
        result = await self._sample(model_id, request, arrived)
        self.metrics.batch_size.observe(result.batch_size)
        self.metrics.queue_wait.observe(result.queue_wait_seconds)
        return await asyncio.to_thread(EncodedResult.encode, result)  # beside the sampling thread

    async def _sample(self, model_id: str, request: GenerationRequest, arrived: float) -> GenerationResult:
        """`request`'s images from its model, which only this frame holds: once they are out, a model evicted
        meanwhile goes, before its replacement loads, not after this request's encoding."""
        # The wait for Serve's loading lock (held through another model's load) and for an eviction count too: the
        # HTTP client's timeout (LOAD_TIMEOUT_S + SAMPLING_S) counts on a request waiting at most LOAD_TIMEOUT_S for
        # its model. Cancelling leaves the load itself going (SharedLoads shields it).
        deadline = arrived + LOAD_TIMEOUT_S
        try:
            # Not asyncio.wait_for, whose task would suspend a loaded model's request too: counted among those
            # waiting for its load meanwhile, a burst of them would be refused.
            with self._waiting_for_load(model_id):
                async with asyncio.timeout(deadline - time.monotonic()):
                    resident = await self.model(model_id)
                    if not self._deployed_as(resident.model, model_id):
                        # Released by an undeploy or a move (deployed since), or moved while it loaded: loaded from
                        # where it is deployed now (ModelNotServed if it is no longer). What it holds goes first: an
                        # undeploy during its load left the weights in the multiplexer's cache.
                        resident.model = None
                        resident.model = await self._loads.get(model_id)
        except TimeoutError:
            logger.warning("model %s: a request gave up waiting for it after %d s", model_id, LOAD_TIMEOUT_S)
            self._loads.overran(model_id)  # its next requests are refused until that load ends
            raise unavailable(f"model {model_id} not loaded after {LOAD_TIMEOUT_S} s", LOAD_RETRY_S) from None
        with resident.in_use() as model:  # until its images are out: the model is not evicted meanwhile
            if not self._deployed_as(model, model_id):
                # Undeployed or moved while it loaded (reconfigure found no resident to release then): this request,
                # which came before, samples it; its memory goes when the requests holding it are done.
                resident.model = None
            pending = _Pending(model, request, arrived)
            try:
                await self.sample(pending)
            except asyncio.CancelledError:
                if pending.submitted is not None:  # its batch took it just as its client went away
                    pending.submitted.cancel()
                raise
            return await asyncio.wrap_future(pending.submitted)

    def _waiting_for_load(self, model_id: str) -> contextlib.AbstractContextManager[None]:
        """Counts a request among those waiting for `model_id` to load (its files' read, Serve's loading lock, the
        load itself), or refuses it (ModelUnavailable: 503, retry later) where max_batch_size of them wait already,
        at least a batch to sample once it loads. Each holds one of the replica's max_ongoing_requests while it
        waits, up to LOAD_TIMEOUT_S on storage that stopped answering: a burst of requests for one model filled them
        all, and every other model's requests, loaded or not, queued behind."""
        return counted(
            self._waiting,
            model_id,
            self.config.max_batch_size,
            # Retried after as long as a failed load is (the default 2 s, three times, ended before most loads).
            lambda waiting: unavailable(f"{waiting} requests wait for model {model_id} to load", LOAD_RETRY_S),
        )

    async def _read_tokenizer(self, path: str) -> None:
        await asyncio.get_running_loop().run_in_executor(self._storage_reads, self.engine.tokenizer, path)

    def _deployed_as(self, model: SubjectModel | None, model_id: str) -> bool:
        """Whether `model` is what `model_id` is deployed as now (loaded from its current path)."""
        deployed = self.paths.get(model_id)
        return model is not None and deployed is not None and model.path == Path(deployed)

    async def _load(self, model_id: str) -> SubjectModel:
        if model_id not in self.paths:  # undeployed while the request waited for another model's load
            raise ModelNotServed(model_id)
        load = functools.partial(self.engine.load, model_id, self.paths[model_id])
        try:
            if self.engine.device.type == "cuda":
                self._loading += 1  # on this event loop's thread alone
                try:
                    model = await asyncio.to_thread(load)  # seconds on a GPU node: requests keep sampling meanwhile
                finally:
                    self._loading -= 1
            else:
                # On a CPU loading competes with sampling for the cores anyway, and torch work from a second thread
                # stops OpenMP from spinning for the whole process (more threads than cores): sampling ran ~1.5x
                # slower for good after one load in another thread. So the device thread loads too.
                model = await asyncio.wrap_future(self.batcher.call(load))
            # On the batcher's thread: a model of another architecture compiles, not beside requests sampling.
            warm_up = functools.partial(self.engine.warm_up, model, self.config.max_batch_size)
            await asyncio.wrap_future(self.batcher.call(warm_up))
        except ModelUnavailable:
            logger.exception("model %s cannot be loaded; refused for %d s", model_id, LOAD_RETRY_S)
            raise
        except torch.OutOfMemoryError as e:
            raise out_of_device_memory(f"loading model {model_id}") from e
        self.metrics.model_load.observe(model.load_seconds)
        self._count_loaded(+1)
        weakref.finalize(model, self._count_loaded, -1)
        return model

    def _count_loaded(self, change: int) -> None:
        with self._loaded_lock:
            self._loaded_models += change
            self.metrics.loaded_models.set(self._loaded_models)

    def _set_loaded_gauge(self) -> None:
        with self._loaded_lock:
            self.metrics.loaded_models.set(self._loaded_models)

    def _submit_batch(self, items: list[_Pending]) -> None:
        """One @serve.batch call: a cohort per (model, shape) group, submitted to the step batcher."""
        groups: dict[tuple, list[_Pending]] = {}
        for item in items:
            groups.setdefault((item.model, item.request.shape_key), []).append(item)
        for group in groups.values():
            submitted = self.batcher.submit(group[0].model, [i.request for i in group], [i.enqueued for i in group])
            for item, future in zip(group, submitted, strict=True):
                item.submitted = future
                # Serve's batch loop keeps the last batch's arguments until the next batch comes: holding its model,
                # they kept it in memory after the multiplexer evicted it, beside its replacement as that loaded.
                item.model = None


def _report_loaded_models(generator: weakref.ref[Generator]) -> None:
    """Sets a generator's loaded-models gauge once every metrics report interval, while it lives: Ray's metrics agent
    forgets a gauge's value two intervals (20 s by default) after it was last set, and a replica's models change only
    when one loads or goes (set then alone, the panel had no data between loads, most of the time)."""
    report_interval_s = max(ray._config.metrics_report_interval_ms(), 1000) / 1000  # as Ray's own floor
    while True:
        time.sleep(report_interval_s)
        if (alive := generator()) is None:
            return
        alive._set_loaded_gauge()
        del alive  # not held through the sleep


@contextlib.contextmanager
def counted(counts: collections.Counter, key: Any, limit: float, refusal: Callable[[int], Exception]) -> Iterator[None]:
    """One of `key`'s `limit` places in `counts` while the block runs, `refusal(count)` raised where none is free. For
    counts an event loop alone changes (a replica's requests): no lock."""
    if (count := counts[key]) >= limit:
        raise refusal(count)
    counts[key] += 1
    try:
        yield
    finally:
        counts[key] -= 1
        if not counts[key]:
            del counts[key]
