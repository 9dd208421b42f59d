"""Step-level batching: cohorts that share UNet forwards part-way through give the images they give alone."""

from __future__ import annotations

import threading
import weakref
from concurrent.futures import Future

import numpy as np
import pytest
import torch

from dreambooth.errors import InputError
from serving.engine import GenerationRequest, SamplingEngine
from serving.step_batching import OutOfDeviceMemory, StepBatcher, TooLargeForDevice

SIZE = 64  # the tiny model's native size
LEVEL = 1 / 255 + 1e-6  # batch composition may round the last float bits differently: at most one 8-bit level


def request(**overrides) -> GenerationRequest:
    fields = {"prompt": "a photo of sks dog", "steps": 6, "width": SIZE, "height": SIZE, "seed": 7}
    return GenerationRequest(**(fields | overrides))


def pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.float32) / 255


def assert_same_images(a, b) -> None:
    assert a.seeds == b.seeds
    for x, y in zip(a.images, b.images, strict=True):
        assert np.abs(pixels(x) - pixels(y)).max() <= LEVEL


@pytest.fixture(scope="module")
def engine() -> SamplingEngine:
    return SamplingEngine(device="cpu")


@pytest.fixture(scope="module")
def models(engine, subject_models):
    return {name: engine.load(name, path) for name, path in subject_models.items()}


def test_a_cohort_joining_part_way_through_draws_what_it_draws_alone(engine, models):
    rex = models["rex"]
    first, joiner = request(num_images=2, guidance_scale=5.0), request(seed=3, steps=3, prompt="sks dog in snow")
    [first_alone] = engine.generate(rex, [first])
    [joiner_alone] = engine.generate(rex, [joiner])

    a = engine.start(rex, [first])
    engine.denoise([a])
    engine.denoise([a])
    b = engine.start(rex, [joiner])  # joins at a's third step: the two sample different timesteps together
    while not b.done:
        engine.denoise([a, b])
    assert a.step == 2 + len(b.scheduler.timesteps) < len(a.scheduler.timesteps)  # b left; a goes on alone
    while not a.done:
        engine.denoise([a])
    [first_shared], [joiner_shared] = engine.finish(a), engine.finish(b)

    assert_same_images(first_alone, first_shared)
    assert_same_images(joiner_alone, joiner_shared)
    assert (first_shared.batch_size, first_shared.batch_images) == (2, 3)
    assert (first_alone.batch_size, first_alone.batch_images) == (1, 2)


def test_cohorts_of_two_models_are_not_denoised_together(engine, models):
    a, b = engine.start(models["rex"], [request()]), engine.start(models["fido"], [request()])
    with pytest.raises(ValueError, match="one model and one image size"):
        engine.denoise([a, b])


def test_the_batcher_merges_concurrent_cohorts_and_keeps_their_images(engine, models):
    """Cohorts of two models, two step counts and two sizes, all submitted at once: each request gets the images
    it gets alone; cohorts of one model and size share forwards, up to max_images."""
    submissions = [
        ("rex", [request(seed=1, num_images=2)]),
        ("rex", [request(seed=2, steps=3), request(seed=4, steps=3, guidance_scale=2.0)]),
        ("fido", [request(seed=5)]),
        ("rex", [request(seed=6, width=SIZE + 8)]),  # another size: its own lane
        ("rex", [request(seed=8, num_images=2)]),  # no room beside the first two (max 4 images): waits
    ]
    expected = [engine.generate(models[name], requests) for name, requests in submissions]
    forwards: list[int] = []  # images per UNet forward
    batcher = StepBatcher(engine, max_images=4, on_step=forwards.append)
    try:
        gate = threading.Event()
        batcher.call(gate.wait)  # "at once": all queued before the first step, however slowly this thread runs
        futures = [batcher.submit(models[name], requests) for name, requests in submissions]
        gate.set()
        results = [[future.result(timeout=120) for future in group] for group in futures]
    finally:
        batcher.close()
    for alone, batched in zip(expected, results, strict=True):
        for a, b in zip(alone, batched, strict=True):
            assert_same_images(a, b)
    assert [r.batch_images for r in results[0]] == [4] and results[1][0].batch_size == 3  # shared forwards
    assert results[2][0].batch_size == 1 and results[3][0].batch_size == 1  # alone in their lanes
    assert max(r.batch_images for group in results for r in group) <= 4
    assert max(forwards) == 4 and min(forwards) >= 1
    # The last rex cohort started once the 3-step one had left: it waited, and then shared with the first.
    assert results[4][0].queue_wait_seconds > results[0][0].queue_wait_seconds
    assert results[4][0].batch_images == 4


def test_bad_cohorts_fail_alone_and_close_fails_what_is_left(engine, models, caplog):
    batcher = StepBatcher(engine, max_images=4)
    try:
        [bad, _] = batcher.submit(models["rex"], [request(), request(steps=5)])  # two step counts: one cohort
        [good] = batcher.submit(models["rex"], [request()])
        [too_many] = batcher.submit(models["rex"], [request(steps=1000)])  # past the model's schedule: the client's
        with pytest.raises(ValueError, match="one batch holds one"):
            bad.result(timeout=60)
        with pytest.raises(InputError, match="cannot sample 1000 steps"):
            too_many.result(timeout=60)
        assert good.result(timeout=60).images
        # The bad cohort is a bug's (logged with its traceback); steps the model cannot take are the client's (a 400).
        assert caplog.text.count("starting a cohort failed") == 1, caplog.text
    finally:
        batcher.close()
    with pytest.raises(RuntimeError, match="closed"):
        batcher.submit(models["rex"], [request()])


def test_a_cancelled_request_is_dropped_before_it_starts(engine, models):
    forwards: list[int] = []
    batcher = StepBatcher(engine, max_images=1, on_step=forwards.append)
    try:
        [running] = batcher.submit(models["rex"], [request(steps=20)])
        [cancelled] = batcher.submit(models["rex"], [request(seed=9)])  # no room: waits for the first
        assert cancelled.cancel()
        [after] = batcher.submit(models["rex"], [request(seed=10)])
        assert running.result(timeout=120).images and after.result(timeout=120).images
        assert cancelled.cancelled()
    finally:
        batcher.close()
    # Only the two others were sampled: the cancelled one never took a step.
    steps = [len(engine.start(models["rex"], [r]).scheduler.timesteps) for r in (request(steps=20), request())]
    assert len(forwards) == sum(steps)


def test_a_cancelled_request_waiting_for_room_does_not_hold_up_those_behind_it(engine, models):
    batcher = StepBatcher(engine, max_images=4)
    try:
        gate = threading.Event()
        batcher.call(gate.wait)  # holds the batcher until all three are queued
        [running] = batcher.submit(models["rex"], [request(steps=20, num_images=2)])
        [cancelled] = batcher.submit(models["rex"], [request(seed=9, num_images=3)])  # no room beside the first
        [behind] = batcher.submit(models["rex"], [request(seed=10)])  # room, but queued behind the cancelled one
        assert cancelled.cancel()
        gate.set()
        result = behind.result(timeout=120)
        assert running.result(timeout=120).images
    finally:
        batcher.close()
    assert result.batch_size == 2  # it sampled beside the running request instead of waiting for its 20 steps


def test_cohorts_behind_one_that_does_not_fit_wait_for_it(engine, models):
    """No starvation: a cohort with no room beside the running batch holds up the later cohorts of its model and
    size, even one that would fit. Otherwise small cohorts could keep taking the room a larger one waits for, and
    it would wait for as long as they keep coming."""
    batcher = StepBatcher(engine, max_images=4)
    try:
        gate = threading.Event()
        batcher.call(gate.wait)  # all three queued before the first step
        [first] = batcher.submit(models["rex"], [request(steps=12, num_images=3)])
        [large] = batcher.submit(models["rex"], [request(seed=9, num_images=2)])  # 3 + 2 > 4: waits for room
        [small] = batcher.submit(models["rex"], [request(seed=10)])  # 3 + 1 fits, but it came after the large one
        gate.set()
        first, large, small = (future.result(timeout=120) for future in (first, large, small))
    finally:
        batcher.close()
    assert first.batch_images == 3  # alone: the small one did not slip in beside it
    assert large.batch_images == small.batch_images == 3  # the two sampled together once the first had left
    assert small.queue_wait_seconds > first.queue_wait_seconds


class SmallDevice(SamplingEngine):
    """Room for `room` images in a UNet forward; more raise what torch raises when CUDA runs out of memory."""

    room = 3

    def denoise(self, cohorts) -> None:
        if sum(cohort.images for cohort in cohorts) > self.room:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        super().denoise(cohorts)


def test_a_step_out_of_device_memory_fails_the_last_cohort_and_the_others_go_on(engine, models):
    small = SmallDevice(device="cpu")
    batcher = StepBatcher(small, max_images=4)
    try:
        gate = threading.Event()
        batcher.call(gate.wait)  # both start together: their first step holds 4 images, one more than fits
        [first] = batcher.submit(models["rex"], [request(num_images=2)])
        [joiner] = batcher.submit(models["rex"], [request(seed=3, num_images=2)])
        gate.set()
        with pytest.raises(OutOfDeviceMemory, match="retry later") as error:
            joiner.result(timeout=60)
        assert not isinstance(error.value, TooLargeForDevice)  # beside fewer it may fit: worth a retry
        shared = first.result(timeout=60)
        [retried] = batcher.submit(models["rex"], [request(seed=3, num_images=2)])  # alone, it fits
        assert retried.result(timeout=60).images
    finally:
        batcher.close()
    [alone] = engine.generate(models["rex"], [request(num_images=2)])
    assert_same_images(alone, shared)  # the failed step changed nothing of the cohort that went on


def test_a_request_out_of_device_memory_alone_is_told_to_ask_for_less_not_to_retry(engine, models):
    """A request that runs out of memory with nothing else on the device (in its UNet forward, or its decode)
    would every time: "retry later" had its clients retry it to the end, and never said what to change."""
    shared = threading.Event()  # something else holds device memory (a model loading, another replica's share)
    batcher = StepBatcher(SmallDevice(device="cpu"), max_images=8, device_shared=shared.is_set)
    try:
        shared.set()
        [beside_a_load] = batcher.submit(models["rex"], [request(num_images=4)])
        with pytest.raises(OutOfDeviceMemory, match="retry later") as error:
            beside_a_load.result(timeout=60)
        assert not isinstance(error.value, TooLargeForDevice)  # a moment later, it may fit
        shared.clear()
        [alone] = batcher.submit(models["rex"], [request(num_images=4)])  # one more than fits, alone
        with pytest.raises(
            TooLargeForDevice, match=r"sampling 4 images of 64x64 .*ask for fewer images \(num_images\)"
        ):
            alone.result(timeout=60)
        # Two requests of one cohort (one @serve.batch group) out of memory together: alone, each may fit.
        together = batcher.submit(models["rex"], [request(num_images=2), request(seed=3, num_images=2)])
        for future in together:
            with pytest.raises(OutOfDeviceMemory, match="retry later") as error:
                future.result(timeout=60)
            assert not isinstance(error.value, TooLargeForDevice)
    finally:
        batcher.close()


class DecodeOutOfMemory(SamplingEngine):
    """Runs out of device memory decoding more than one image."""

    def decode(self, cohort):
        if cohort.images > 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 4.00 GiB")
        return super().decode(cohort)


def test_a_decode_out_of_device_memory_is_too_large_for_a_request_alone(engine, models):
    batcher = StepBatcher(DecodeOutOfMemory(device="cpu"), max_images=4)
    try:
        [alone] = batcher.submit(models["rex"], [request(num_images=2)])
        with pytest.raises(TooLargeForDevice, match="decoding 2 images of 64x64"):
            alone.result(timeout=60)
        together = batcher.submit(models["rex"], [request(), request(seed=3)])  # one cohort: decoded together
        for future in together:
            with pytest.raises(OutOfDeviceMemory, match="retry later"):
                future.result(timeout=60)
    finally:
        batcher.close()


class SchedulerOutOfMemory(SamplingEngine):
    """The cohort of seed `fail_seed` runs out of device memory in its scheduler's third step, after the step has
    moved the scheduler's state (as an allocation late in a DPM-Solver update would)."""

    fail_seed = 3

    def start(self, model, requests):
        cohort = super().start(model, requests)
        if requests[0].seed == self.fail_seed:
            step, calls = cohort.scheduler.step, []

            def failing(*args, **kwargs):
                calls.append(step(*args, **kwargs))
                if len(calls) == 3:
                    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB")
                return calls[-1]

            cohort.scheduler.step = failing
        return cohort


def test_a_scheduler_step_out_of_device_memory_fails_its_own_cohort_only(engine, models):
    forwards: list[int] = []  # images per UNet forward
    batcher = StepBatcher(SchedulerOutOfMemory(device="cpu"), max_images=4, on_step=forwards.append)
    try:
        gate = threading.Event()
        batcher.call(gate.wait)  # they sample together from their first step
        [broken] = batcher.submit(models["rex"], [request(seed=3)])
        [joiner] = batcher.submit(models["rex"], [request(seed=9)])
        gate.set()
        with pytest.raises(OutOfDeviceMemory, match="retry later"):
            broken.result(timeout=60)
        shared = joiner.result(timeout=60)
        # Its third scheduler step failed after a UNet forward of both: that forward's images count it too.
        assert forwards[:4] == [2, 2, 2, 1], forwards
        [alone] = batcher.submit(models["rex"], [request(seed=3)])  # the only request of its forward
        with pytest.raises(TooLargeForDevice, match="stepping 1 images of 64x64 with no other request"):
            alone.result(timeout=60)
    finally:
        batcher.close()
    [alone] = engine.generate(models["rex"], [request(seed=9)])
    assert_same_images(alone, shared)


def test_a_finished_cohorts_model_is_not_held_by_the_idle_batcher(engine, subject_models):
    """The multiplexer evicts a model once no request uses it, for its replacement's load: a batcher waiting for
    work kept the last cohort it started, and with it the model, in memory beside that load."""
    model = engine.load("rex", subject_models["rex"])  # of this test alone: nothing else holds it
    freed = threading.Event()
    weakref.finalize(model, freed.set)
    batcher = StepBatcher(engine, max_images=4)
    try:
        [future] = batcher.submit(model, [request(steps=1)])
        assert future.result(timeout=60).images
        del model
        assert freed.wait(timeout=10), "the model stayed in memory after its last request, the batcher idle"
    finally:
        batcher.close()


def test_an_empty_cohort_is_refused_and_the_batcher_goes_on(engine, models):
    batcher = StepBatcher(engine, max_images=4)
    try:
        with pytest.raises(ValueError, match="at least one request"):
            batcher.submit(models["rex"], [])
        [fine] = batcher.submit(models["rex"], [request()])
        assert fine.result(timeout=60).images
    finally:
        batcher.close()


def test_submissions_from_many_threads(engine, models):
    batcher = StepBatcher(engine, max_images=8)
    futures: list[Future] = []
    lock = threading.Lock()

    def client(seed: int) -> None:
        [future] = batcher.submit(models["rex"], [request(seed=seed, steps=3)])
        with lock:
            futures.append(future)

    try:
        threads = [threading.Thread(target=client, args=(seed,)) for seed in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        results = [future.result(timeout=120) for future in futures]
    finally:
        batcher.close()
    assert sorted(r.seeds[0] for r in results) == list(range(8))


def test_calls_run_on_the_batchers_thread_between_steps(engine, models):
    called = threading.Event()  # the steps wait for it: the call is queued before the 20 steps can end
    batcher = StepBatcher(engine, max_images=4, on_step=lambda images: called.wait(timeout=60))
    try:
        [running] = batcher.submit(models["rex"], [request(steps=20)])
        call = batcher.call(lambda: (threading.current_thread(), running.done()))
        called.set()
        thread, running_done = call.result(timeout=60)
        assert thread.name == "step-batcher" and not running_done  # between two of the 20 steps
        with pytest.raises(ZeroDivisionError):
            batcher.call(lambda: 1 / 0).result(timeout=60)
        assert running.result(timeout=120).images  # a failed call fails alone
    finally:
        batcher.close()


def test_an_unexpected_error_fails_the_requests_held_not_the_batcher(engine, models):
    def broken(images: int) -> None:
        raise RuntimeError("the metrics broke")

    batcher = StepBatcher(engine, max_images=4, on_step=broken)
    try:
        [doomed] = batcher.submit(models["rex"], [request()])
        with pytest.raises(RuntimeError, match="the metrics broke"):
            doomed.result(timeout=60)
        batcher.on_step = None
        [fine] = batcher.submit(models["rex"], [request()])
        assert fine.result(timeout=60).images
    finally:
        batcher.close()


def test_models_that_cannot_share_a_forward_go_first_come_first_served(engine, models):
    """rex's 6 steps, submitted first, run before fido's 3 (taking turns, fido would finish first)."""
    batcher = StepBatcher(engine, max_images=4)
    finished: list[str] = []
    try:
        gate = threading.Event()
        batcher.call(gate.wait)  # holds the batcher until both are submitted and watched
        [first] = batcher.submit(models["rex"], [request(steps=6)])
        [second] = batcher.submit(models["fido"], [request(steps=3)])
        for name, future in (("rex", first), ("fido", second)):
            future.add_done_callback(lambda _, name=name: finished.append(name))
        gate.set()
        first.result(timeout=60), second.result(timeout=60)
    finally:
        batcher.close()
    assert finished == ["rex", "fido"]
    # Both waited for the gate; fido waited for rex's steps as well.
    assert second.result().queue_wait_seconds > first.result().queue_wait_seconds


def test_a_request_cancelled_while_sampling_leaves_the_batch(engine, models):
    forwards: list[int] = []
    stepping = threading.Event()

    cancelled = threading.Event()

    def on_step(images: int) -> None:
        forwards.append(images)
        stepping.set()
        cancelled.wait(timeout=60)  # the long one's steps wait for the test to cancel it

    batcher = StepBatcher(engine, max_images=1, on_step=on_step)
    try:
        [long] = batcher.submit(models["rex"], [request(steps=50)])
        assert stepping.wait(timeout=60)
        [waiting] = batcher.submit(models["rex"], [request(seed=9, steps=3)])  # no room beside the long one
        assert long.cancel()  # its HTTP client went away, say
        cancelled.set()
        assert waiting.result(timeout=60).images
    finally:
        batcher.close()
    assert len(forwards) < 50  # the long one left long before its 50 steps


def test_one_request_of_a_cohort_cancelled_while_sampling_the_other_gets_its_images(engine, models):
    """A cohort leaves the batch once all its callers cancelled, not once one of them did: the other request of a
    two-request cohort still gets its images (dropping the cohort at the first cancel would leave it waiting
    forever)."""
    stepping = threading.Event()
    cancelled = threading.Event()

    def on_step(images: int) -> None:
        stepping.set()
        cancelled.wait(timeout=60)  # the cohort's steps wait for the test to cancel one of its requests

    batcher = StepBatcher(engine, max_images=4, on_step=on_step)
    try:
        leaving, staying = batcher.submit(models["rex"], [request(seed=1, steps=20), request(seed=2, steps=20)])
        assert stepping.wait(timeout=60)
        assert leaving.cancel()  # its HTTP client went away, say
        cancelled.set()
        shared = staying.result(timeout=60)
        assert leaving.cancelled()
    finally:
        batcher.close()
    [alone] = engine.generate(models["rex"], [request(seed=2, steps=20)])
    assert_same_images(alone, shared)
