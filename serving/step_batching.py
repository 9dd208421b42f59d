"""Step-level batching: cohorts join and leave the running batch between denoising steps.

With whole-batch sampling a request that arrives while a batch runs waits for all of it (25 steps) before its own
starts, and a batch that started with a few requests runs its 25 steps half empty. Here one thread owns the device
and runs denoising steps; before each step it admits the cohorts submitted meanwhile into the running batch of
their model and image size (each sample carries its own timestep, so cohorts at different steps share a UNet
forward), and a cohort leaves as soon as its last step is done. This is iteration-level scheduling, what LLM servers
do with tokens. At most `max_images` images share a forward; a cohort that does not fit waits for room, and later
cohorts of its model and size wait behind it (no starvation). Cohorts of different models or sizes cannot share a
forward: the batch holding the oldest cohort steps first (first come, first served, as whole batches were: taking
turns step by step would make every one of them as slow as all of them together). A cohort whose callers all
cancelled (in Serve: their HTTP clients went away) leaves at the next step, making room for those waiting. A step
that runs out of device memory fails the cohort that joined last (OutOfDeviceMemory: the service answers 503, retry
later) and the others step again without it, rather than all failing with it; a request that runs out of memory
with nothing else on the device (no other cohort in any lane, nothing its `device_shared` says) would every time
(TooLargeForDevice: 413, ask for fewer or smaller images).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from dreambooth.errors import InputError
from serving.engine import Cohort, DecodedCohort, GenerationRequest, SamplingEngine, SubjectModel

logger = logging.getLogger(__name__)

Lane = tuple[SubjectModel, int, int]  # the cohorts of one model and (height, width) that share UNet forwards


class OutOfDeviceMemory(RuntimeError):
    """A request's batch did not fit in the device's memory: it may fit later, beside fewer others."""


class TooLargeForDevice(OutOfDeviceMemory):
    """A request did not fit in the device's memory with no other request beside it: it would not on any retry."""


def out_of_device_memory(what: str, alone: bool = False) -> OutOfDeviceMemory:
    """`alone`: no other request shared the work that ran out of memory (TooLargeForDevice)."""
    # The message is built here, not in an __init__ of the class: Ray pickles the error to the ingress, and an
    # exception is rebuilt from its args.
    if alone:
        return TooLargeForDevice(
            f"the device ran out of memory {what} with no other request beside it, as it would every time: ask for "
            "fewer images (num_images) or smaller ones (width, height)"
        )
    return OutOfDeviceMemory(f"the device ran out of memory {what}; retry later, or ask for fewer or smaller images")


@dataclass
class _Submission:
    model: SubjectModel
    requests: list[GenerationRequest]
    enqueued: list[float]  # time.monotonic() per request: its queue wait starts there
    futures: list[Future]  # one per request

    @property
    def lane(self) -> Lane:
        return (self.model, self.requests[0].height, self.requests[0].width)

    @property
    def images(self) -> int:
        return sum(request.num_images for request in self.requests)

    @property
    def arrived(self) -> float:
        return min(self.enqueued)

    @property
    def abandoned(self) -> bool:
        """Every caller cancelled (an HTTP client went away, say): the cohort's work would be thrown away."""
        return all(future.cancelled() for future in self.futures)


class StepBatcher:
    """Runs `engine`'s denoising steps on its own thread for everything submitted to it; `on_step` is told the
    images of each UNet forward (the replica's metric of how full the batches run)."""

    def __init__(
        self,
        engine: SamplingEngine,
        max_images: int,
        on_step: Callable[[int], None] | None = None,
        device_shared: Callable[[], bool] = lambda: False,
    ):
        """`device_shared`: whether something besides its cohorts may hold the device's memory now (a model loading
        on another thread, another process on a GPU shared): then no request that ran out of it is too large."""
        self.engine = engine
        self.max_images = max_images
        self.on_step = on_step
        self.device_shared = device_shared
        self._pending: deque[_Submission] = deque()
        self._running: dict[Lane, list[tuple[Cohort, _Submission]]] = {}
        self._calls: deque[tuple[Callable[[], Any], Future]] = deque()
        self._wake = threading.Condition()
        self._closed = False
        self._delivery = ThreadPoolExecutor(max_workers=1, thread_name_prefix="step-batcher-delivery")
        self._thread = threading.Thread(target=self._run, name="step-batcher", daemon=True)
        self._thread.start()

    def submit(
        self, model: SubjectModel, requests: list[GenerationRequest], enqueued: list[float] | None = None
    ) -> list[Future]:
        """Queues requests that share one `shape_key` as one cohort; a future of a `GenerationResult` per request."""
        if not requests:
            raise ValueError("a cohort holds at least one request")
        now = time.monotonic()
        submission = _Submission(
            model, list(requests), list(enqueued or [now] * len(requests)), [Future() for _ in requests]
        )
        with self._wake:
            if self._closed:
                raise RuntimeError("the step batcher is closed")
            self._pending.append(submission)
            self._wake.notify()
        return submission.futures

    def call(self, function: Callable[[], Any]) -> Future:
        """Runs `function` on the batcher's thread between two steps (a future of what it returns), so that one
        thread does all the device work: e.g. a model's warm-up, which may compile while requests sample."""
        future: Future = Future()
        with self._wake:
            if self._closed:
                raise RuntimeError("the step batcher is closed")
            self._calls.append((function, future))
            self._wake.notify()
        return future

    def close(self) -> None:
        """Stops after the current step: what is still sampling or waiting fails, what finished is delivered."""
        with self._wake:
            self._closed = True
            self._wake.notify()
        self._thread.join()
        self._delivery.shutdown()  # what finished sampling is delivered

    def _run(self) -> None:
        while True:
            # Before the wait: the last round's submissions would keep their models in memory while the batcher
            # idles, after the multiplexer evicted them.
            calls: deque[tuple[Callable[[], Any], Future]] = deque()
            admitted: list[_Submission] = []
            try:
                with self._wake:
                    self._wake.wait_for(lambda: self._closed or self._calls or self._pending or self._running)
                    if self._closed:
                        self._fail_all(RuntimeError("the step batcher closed"))
                        return
                    calls, self._calls = self._calls, deque()
                    admitted = self._admit()
                self._work(calls, admitted)
            except Exception as e:  # a bug here must not leave callers waiting forever
                logger.exception("the step batcher failed; failing the requests it held")
                with self._wake:
                    for _, future in calls:  # those that ran keep their outcome
                        _settle(future, error=e)
                    self._fail_all(e)

    def _work(self, calls: deque[tuple[Callable[[], Any], Future]], admitted: list[_Submission]) -> None:
        for function, future in calls:
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(function())
                except Exception as e:
                    future.set_exception(e)
        for submission in admitted:
            self._start(submission)
        if self._running:
            # A lane's cohorts are in the order they arrived: its first is its oldest.
            self._step(min(self._running, key=lambda lane: self._running[lane][0][1].arrived))

    def _admit(self) -> list[_Submission]:
        """Takes the pending submissions that fit their lane's running batch, in order within each lane."""
        admitted, blocked, waiting = [], set(), deque()
        images = {lane: sum(c.images for c, _ in cohorts) for lane, cohorts in self._running.items()}
        for submission in self._pending:
            if submission.abandoned:
                continue  # its callers are gone: it must not hold up those behind it
            lane = submission.lane
            used = images.get(lane, 0)
            # A cohort larger than max_images (not from Serve: it caps batches) runs when its lane is empty.
            fits = used == 0 or used + submission.images <= self.max_images
            if lane in blocked or not fits:
                blocked.add(lane)
                waiting.append(submission)
            else:
                images[lane] = used + submission.images
                admitted.append(submission)
        self._pending = waiting
        return admitted

    def _start(self, submission: _Submission) -> None:
        if submission.abandoned:
            return
        try:
            cohort = self.engine.start(submission.model, submission.requests)
        except torch.OutOfMemoryError:  # encoding its prompts, or its first latents
            _fail(submission, out_of_device_memory(f"starting {submission.images} images"))  # a few MB: never its size
            return
        except InputError as e:  # steps its model's scheduler refuses: the client's to fix (a 400)
            _fail(submission, e)
            return
        except Exception as e:
            logger.exception("starting a cohort failed for model %s", submission.model.model_id)
            _fail(submission, e)
            return
        self._running.setdefault(submission.lane, []).append((cohort, submission))

    def _step(self, lane: Lane) -> None:
        # Futures stay cancellable while their cohort samples; one whose callers all gave up leaves the batch.
        running = self._running[lane] = [(c, s) for c, s in self._running[lane] if not s.abandoned]
        if not running:
            del self._running[lane]
            return
        # The lane stays in `_running` until this step is through, where `_fail_all` finds it.
        images = sum(cohort.images for cohort, _ in running)  # the UNet forward's, a cohort failing after it included
        try:
            self.engine.denoise([cohort for cohort, _ in running])
        except torch.OutOfMemoryError as e:
            if (index := getattr(e, "cohort_index", None)) is None:
                # Raised before any cohort's state moved (in the UNet forward): the others can step again.
                _, submission = running.pop()  # the one that joined last (`running` is the lane's list)
                logger.warning("out of device memory at %d images: failing the cohort that joined last", images)
                _fail(submission, self._out_of_memory(submission, "sampling"))
                if not running:
                    del self._running[lane]
                return
            # Raised in one cohort's scheduler step, after the forward: that cohort cannot go on. Those before it
            # have stepped and those after it have not: each goes on from its own state.
            _, submission = running.pop(index)
            logger.warning("out of device memory at %d images, in a scheduler step: failing that cohort", images)
            _fail(submission, self._out_of_memory(submission, "stepping"))
        except Exception as e:
            logger.exception("a denoising step failed for model %s", lane[0].model_id)
            for _, submission in running:
                _fail(submission, e)
            del self._running[lane]
            return
        if self.on_step is not None:
            self.on_step(images)
        still = [(cohort, submission) for cohort, submission in running if not cohort.done]
        if still:
            self._running[lane] = still
        else:
            del self._running[lane]
        for cohort, submission in running:
            if cohort.done:
                self._finish(cohort, submission)

    def _out_of_memory(self, submission: _Submission, what: str) -> OutOfDeviceMemory:
        """The error of a cohort that ran out of device memory `what`-ing: a request with nothing else on the device
        (no other cohort sampling, in any lane, nor anything device_shared says) would every time; beside others it
        may fit later, beside fewer."""
        others = sum(len(other.requests) for running in self._running.values() for _, other in running)
        width, height = submission.requests[0].width, submission.requests[0].height
        description = f"{what} {submission.images} images of {width}x{height}"
        description += f" beside {others} other requests on the device" if others else ""
        alone = not others and len(submission.requests) == 1 and not self.device_shared()
        return out_of_device_memory(description, alone=alone)

    def _finish(self, cohort: Cohort, submission: _Submission) -> None:
        try:
            decoded = self.engine.decode(cohort)
        except torch.OutOfMemoryError:
            _fail(submission, self._out_of_memory(submission, "decoding"))
            return
        except Exception as e:
            logger.exception("decoding failed for model %s", cohort.model.model_id)
            _fail(submission, e)
            return
        # On a GPU the decode is only queued: the delivery thread waits for the images while this one queues
        # the next step, so the GPU goes from the decode straight to that step.
        self._delivery.submit(_deliver, decoded, submission)

    def _fail_all(self, error: BaseException) -> None:
        for _, future in self._calls:
            _settle(future, error=error)
        self._calls.clear()
        for submission in self._pending:
            _fail(submission, error)
        for running in self._running.values():
            for _, submission in running:
                _fail(submission, error)
        self._pending.clear()
        self._running.clear()


def _deliver(decoded: DecodedCohort, submission: _Submission) -> None:
    try:
        results = decoded.results()
    except Exception as e:
        logger.exception("copying images failed for model %s", decoded.cohort.model.model_id)
        _fail(submission, e)
        return
    for future, result, enqueued in zip(submission.futures, results, submission.enqueued, strict=True):
        result.queue_wait_seconds = max(0.0, decoded.cohort.first_step - enqueued)
        _settle(future, result=result)


def _fail(submission: _Submission, error: BaseException) -> None:
    for future in submission.futures:
        _settle(future, error=error)


def _settle(future: Future, result: Any = None, error: BaseException | None = None) -> None:
    """Sets a request's outcome unless its caller cancelled it (which it may do up to the last moment)."""
    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)
    except InvalidStateError:
        pass
