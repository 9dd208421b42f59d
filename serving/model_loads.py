"""A replica's subject models and their loads, as its multiplexer holds them: asyncio coordination, no Serve."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from typing import Any

from serving.config import LOAD_TIMEOUT_S, SAMPLING_S
from serving.engine import ModelUnavailable, SubjectModel

logger = logging.getLogger(__name__)

EVICTION_WAIT_S = SAMPLING_S
# A model whose load no request is waiting for any more (its clients went away) is kept this long for the next.
LOAD_KEPT_S = 60
# A model whose load failed is not tried again for this long: each try would evict a loaded model first.
LOAD_RETRY_S = 15


def unavailable(message: str, retry_after_s: float) -> ModelUnavailable:
    """A refusal of a model for now, saying when to ask again (`retry_after_s`, for the Retry-After header: a client
    retrying sooner, as Retry-After's default of 2 s had it, was refused every time). An attribute, not an argument
    of the class: Ray pickles the error to the ingress, which rebuilds it from its args and its attributes."""
    error = ModelUnavailable(message)
    error.retry_after_s = retry_after_s
    return error


class ResidentModel:
    """A subject model as a replica's multiplexer holds it, counting the requests using it.

    When a load needs room, Serve evicts the least recently used model and awaits its `__del__` (under the
    multiplexer's load lock): here that waits until no request uses the model any more, up to
    EVICTION_WAIT_S. Evicting a model that requests still sample would leave it in memory beside its replacement
    (and a new request for it would load a second copy): `max_models_per_replica` would no longer bound a
    replica's memory. The cost is that the load waits for them, as a load on a full GPU must. Requests enter and
    leave on the replica's event loop, where Serve awaits the eviction too."""

    def __init__(self, model: SubjectModel):
        self.model_id = model.model_id
        self.model: SubjectModel | None = model
        """None once released: its model was undeployed (or deployed from another directory)."""
        self.eviction: asyncio.Task | None = None
        """Once the multiplexer evicted it: the wait for the requests still using it (see `evictions_done`)."""
        self._users = 0
        self._unused = asyncio.Event()
        self._unused.set()
        # An attribute, not a method: what Serve calls (and awaits, a coroutine function) on eviction, while the
        # garbage collector, which looks __del__ up on the class, finds none to run.
        self.__del__ = self._evict

    @contextlib.contextmanager
    def in_use(self) -> Iterator[SubjectModel]:
        self._users += 1
        self._unused.clear()
        try:
            yield self.model
        finally:
            self._users -= 1
            if self._users == 0:
                self._unused.set()

    async def _evict(self) -> None:
        # Serve has taken the model out of the multiplexer: were the wait cancelled with the request whose load
        # evicts it (its client gone, its deadline passed), the next load would not wait for this model's users,
        # and a request for it would load a second copy beside the one they sample. So it goes on in a task of
        # its own, which the next load waits for.
        if self.eviction is None:
            self.eviction = asyncio.ensure_future(self._until_unused())
        try:
            await asyncio.shield(self.eviction)
        finally:
            # The attribute refers to this object: drop it, so that the model goes when its last user lets go, not
            # at the next garbage collection (Serve replaces it after the wait, but not when the request whose load
            # evicts this model is cancelled meanwhile).
            self.__dict__.pop("__del__", None)

    async def _until_unused(self) -> None:
        try:
            await asyncio.wait_for(self._unused.wait(), EVICTION_WAIT_S)
        except TimeoutError:  # a request stuck for minutes must not stop every other model's load
            logger.warning("evicting model %s while %d requests still use it", self.model_id, self._users)


async def evictions_done(residents: Iterable[ResidentModel]) -> None:
    """Until no request uses the models evicted from `residents` any more, or EVICTION_WAIT_S has passed since each
    eviction: what a load waits for (under Serve's loading lock) when an eviction's own request went away."""
    if evictions := [r.eviction for r in residents if r.eviction is not None and not r.eviction.done()]:
        await asyncio.wait(evictions)


class SharedLoads:
    """One load of a model at a time, whichever request waits for it.

    Serve runs a model's load in the task of the request that needs it: when that request is cancelled (its client
    went away) the load would be abandoned half way, its thread still reading weights, and the next request for
    the model would start a second copy beside it. Here the load runs in a task of its own that the waiting
    request only awaits: a request cancelled meanwhile leaves it running, and the next request takes it over.
    A finished load that nobody takes over is dropped after `keep_s`, or once another model's load starts (running
    then, once it finishes): the multiplexer does not count it, so that load would not evict it, and the replica
    would hold more models than max_models_per_replica. A failed load is dropped at once, and `check` refuses
    the model for `retry_s` after it (the multiplexer evicts a loaded model before it calls a load). A request waits
    `timeout_s` at most (ModelUnavailable), and `check` then refuses the model until that load ends: each request
    for it would otherwise take Serve's loading lock again, evicting a loaded model and holding up the others."""

    def __init__(
        self,
        load: Callable[[str], Awaitable[Any]],
        keep_s: float,
        retry_s: float = LOAD_RETRY_S,
        timeout_s: float = LOAD_TIMEOUT_S,
    ):
        self.load = load
        self.keep_s = keep_s
        self.retry_s = retry_s
        self.timeout_s = timeout_s
        self._tasks: dict[str, asyncio.Task] = {}
        self._failed: dict[str, tuple[float, str]] = {}  # model id: (when its last load failed, why)
        self._overdue: dict[str, asyncio.Task] = {}  # loads that outlasted timeout_s and still run
        # The keep_s timer of a finished load still in _tasks: cancelled when the load is taken over, since the
        # timer holds the task, hence the model, which would stay in memory after the multiplexer evicted it.
        self._expiries: dict[str, asyncio.TimerHandle] = {}
        self._superseded: set[asyncio.Task] = set()  # loads running as another started: not kept once they finish

    async def get(self, model_id: str) -> Any:
        # Again here: a request that passed `check` before a load failed or ran over waits on Serve's loading lock.
        self.check(model_id)
        task = self._tasks.get(model_id)
        if task is None:
            self._make_room()
            task = self._tasks[model_id] = asyncio.ensure_future(self.load(model_id))
            task.add_done_callback(functools.partial(self._finished, model_id))
        try:  # raises what the load raised: _finished forgot that one already
            model = await asyncio.wait_for(asyncio.shield(task), self.timeout_s)
        except asyncio.TimeoutError:  # TimeoutError from 3.11 on
            if not task.done():
                self._overdue[model_id] = task
            raise unavailable(
                f"model {model_id} still loading after {self.timeout_s:g} s; its load goes on", self.retry_s
            ) from None
        except ModelUnavailable as e:  # the load failed: refused for retry_s from now (_finished)
            e.retry_after_s = self.retry_s
            raise
        self._forget(model_id, task)  # taken over by this request: nothing left for a later one
        return model

    def check(self, model_id: str) -> None:
        """Raises ModelUnavailable while `model_id`'s last load failed less than retry_s ago, or while a load of it
        that outlasted timeout_s still runs."""
        if model_id in self._overdue:
            raise unavailable(f"model {model_id}'s load has run over {self.timeout_s:g} s and goes on", self.retry_s)
        failed_at, why = self._failed.get(model_id, (-float("inf"), ""))
        if (since := time.monotonic() - failed_at) < self.retry_s:
            raise unavailable(f"model {model_id}'s load failed {since:.0f} s ago: {why}", self.retry_s - since)

    def overran(self, model_id: str) -> None:
        """A request gave up on `model_id` (it waited LOAD_TIMEOUT_S, Serve's loading lock and an eviction included,
        before its load did): a load of it that still runs is refused like one that outlasted timeout_s, until it
        ends. (The request's wait outlasts the load's own timeout, which then never fires.)"""
        task = self._tasks.get(model_id)
        if task is not None and not task.done():
            self._overdue[model_id] = task

    def drop(self, model_id: str) -> None:
        """Forgets `model_id`'s load (the requests awaiting it still get it) and its failure: the next request loads
        it anew."""
        self._failed.pop(model_id, None)
        self._overdue.pop(model_id, None)
        if (task := self._tasks.get(model_id)) is not None:
            self._forget(model_id, task)

    def _make_room(self) -> None:
        """As a load starts: the other loads are no longer kept for a request to take over (those awaiting one still
        get it)."""
        for model_id, task in list(self._tasks.items()):
            if task.done():
                self._forget(model_id, task)
            else:
                self._superseded.add(task)

    def _finished(self, model_id: str, task: asyncio.Task) -> None:
        if self._overdue.get(model_id) is task:
            del self._overdue[model_id]
        if not task.cancelled() and isinstance(task.exception(), ModelUnavailable):  # its files; not memory, not gone
            self._failed[model_id] = (time.monotonic(), str(task.exception()))
        if task in self._superseded or task.cancelled() or task.exception() is not None:
            self._superseded.discard(task)
            self._forget(model_id, task)
        elif self._tasks.get(model_id) is task:
            self._expiries[model_id] = asyncio.get_running_loop().call_later(self.keep_s, self._forget, model_id, task)

    def _forget(self, model_id: str, task: asyncio.Task) -> None:
        if self._tasks.get(model_id) is task:
            del self._tasks[model_id]
            if (expiry := self._expiries.pop(model_id, None)) is not None:
                expiry.cancel()  # drops its reference to the task
