"""End-to-end training on a real Ray cluster with real DeepSpeed (CPU, gloo), the tiny model and real photos."""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import ray.train
import torch
from PIL import Image
from ray.util.state import list_actors, list_placement_groups
from safetensors.torch import load_file, save_file

from dreambooth.errors import PlacementTimeout
from dreambooth.model_files import content_identity, fingerprint, sampling_scheduler
from dreambooth.sd_model import load_base_model, load_pipeline
from serving.engine import GenerationRequest, SamplingEngine
from trainer.checkpoint import CHECKPOINT_FORMAT, RAY_RUN_STATE, checkpoint_format
from trainer.class_images import (
    ClassImageGenerator,
    UnusableClassImage,
    cache_key,
    ensure_class_images,
    generation_dtype,
    image_path,
    missing_indices,
)
from trainer.data import encode_images
from trainer.deepspeed_setup import lr_scheduler
from trainer.events import read_events
from trainer.export import consolidated_state_dict
from trainer.flat_parameters import FLAT, unflatten_state_dict
from trainer.images import find_instance_images
from trainer.model import prior_preservation_loss
from trainer.run import run_training
from trainer.spec import JobSpec
from trainer.storage import job_paths, mark_shared
from trainer.train_loop import compile_counts, compile_options, trained_model, training_target
from trainer.validation import GRID_METADATA_KEY


def make_spec(tiny_model: Path, images: Path, **overrides) -> JobSpec:
    fields = dict(
        base_model=str(tiny_model),
        instance_images=[str(images)],
        instance_prompt="a photo of sks dog",
        class_prompt="a photo of dog",
        num_class_images=4,
        class_image_inference_steps=2,
        resolution=64,
        max_steps=6,
        learning_rate=1e-3,
        precision="fp32",
        zero_stage=2,
        num_workers=2,
        gpus_per_worker=0,
        checkpoint_interval=2,
        max_failures=0,
    )
    fields.update(overrides)
    return JobSpec(**fields)


@torch.no_grad()
def denoising_loss(model_dir: Path, spec: JobSpec) -> float:
    """The UNet's noise-prediction error on the instance images under fixed noise and timesteps: what
    DreamBooth minimises, measured the same way before and after training."""
    model = load_base_model(model_dir, dtype=torch.float32)
    encoded = encode_images(model.vae, find_instance_images(spec.instance_images), spec.resolution, torch.device("cpu"))
    ids = model.tokenizer(
        [spec.instance_prompt], padding="max_length", max_length=model.tokenizer.model_max_length, return_tensors="pt"
    ).input_ids
    states = model.text_encoder(ids)[0]
    generator = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(8):
        latents = encoded.mean + encoded.std * torch.randn(encoded.mean.shape, generator=generator)
        noise = torch.randn(latents.shape, generator=generator)
        t = torch.randint(0, 1000, (latents.shape[0],), generator=generator)
        noisy = model.noise_scheduler.add_noise(latents, noise, t)
        pred = model.unet(noisy, t, states.expand(latents.shape[0], -1, -1)).sample
        losses.append(torch.nn.functional.mse_loss(pred, noise).item())
    return sum(losses) / len(losses)


def states(events) -> list[str]:
    return [e["state"] for e in events if e["type"] == "state"]


@pytest.mark.parametrize(("gpus", "accelerator"), [(0, "cpu"), (1, "cuda")])
def test_workers_are_told_their_accelerator_before_they_import_deepspeed(
    tiny_model, dog_images, tmp_path, gpus, accelerator
):
    """DeepSpeed picks its accelerator when first imported, which a worker does when it unpickles the training loop:
    set inside the loop it came too late, and a CPU job on a node with GPUs put its model on a GPU Ray never gave it."""
    from trainer.run import _trainer
    from trainer.train_loop import WorkerConfig

    spec = make_spec(tiny_model, dog_images, gpus_per_worker=gpus)
    config = WorkerConfig(spec=spec.to_dict(), storage_root=str(tmp_path), job_id="job-1", storage_mark="")
    trainer = _trainer(spec, job_paths(tmp_path, "job-1"), config)
    assert trainer.run_config.worker_runtime_env["env_vars"]["DS_ACCELERATOR"] == accelerator


def test_zero3_bf16_text_encoder_on_two_nodes(ray_cluster, tiny_model, dog_images, storage):
    if ray_cluster.num_nodes < 2:
        pytest.skip("needs the two-node cluster: run the suite through scripts/test (its own network namespace)")
    spec = make_spec(
        tiny_model,
        dog_images,
        zero_stage=3,
        precision="bf16",
        train_text_encoder=True,
        max_steps=10,
        gradient_accumulation_steps=2,
        checkpoint_interval=4,
        async_checkpointing=False,  # DeepSpeed's own writer (the resume test uses the asynchronous one)
        placement_strategy="STRICT_SPREAD",  # one worker per node
        validation_prompts=["a photo of sks dog"],
        validation_inference_steps=2,
    )
    paths = job_paths(storage, "zero3")
    interrupt = signal.getsignal(signal.SIGINT)
    result = run_training(spec, paths)
    # Ray Train's fit puts in a SIGINT handler of its own (abort, then exit) and leaves it: Ctrl-C in the export after
    # it was swallowed, then exited 0 without a model.
    assert signal.getsignal(signal.SIGINT) is interrupt
    events = read_events(paths.events_file)

    # Exact resume here too (partitioned parameters and optimizer states, bf16, two micro-steps a step, synchronous
    # saves): a worker dies at step 6, the workers restart from step 4 and end with the same weights.
    crashed = job_paths(storage, "zero3-crash")
    run_training(dataclasses.replace(spec, max_failures=1, validation_prompts=[]), crashed, fail_once_at_steps=(6,))
    resumed = [e for e in read_events(crashed.events_file) if e["type"] == "resumed"]
    assert [(e["step"], Path(e["path"]).name) for e in resumed] == [(4, "checkpoint_step_0000004")]
    final = "checkpoints/checkpoint_step_0000010"
    reference = consolidated_state_dict(paths.job_dir / final)
    weights = consolidated_state_dict(crashed.job_dir / final)
    assert weights.keys() == reference.keys()
    worst = max((weights[k] - reference[k]).abs().max().item() for k in reference)
    assert worst <= 1e-6, f"resumed weights differ from the uninterrupted run by {worst}"

    assert states(events) == ["PREPARING", "TRAINING", "EXPORTING", "SUCCEEDED"]
    workers = [e for e in events if e["type"] == "worker"]
    assert sorted(w["rank"] for w in workers) == [0, 1]
    assert len({w["node_id"] for w in workers}) == 2, "the two workers should run on different nodes"
    for worker in workers:  # where each worker's start went
        assert list(worker["startup_s"]) == ["load_model", "encode", "build_engine", "restore"], worker
        assert all(seconds >= 0 for seconds in worker["startup_s"].values()), worker
    checkpoints = [e for e in events if e["type"] == "checkpoint"]
    assert [e["step"] for e in checkpoints] == [4, 8, 10]
    assert all(0 < e["waited_s"] <= e["stall_s"] for e in checkpoints), checkpoints
    # Ray keeps the newest `checkpoints_to_keep` (2) of the three.
    kept = sorted(p.name for p in paths.checkpoints_dir.glob("checkpoint_step_*"))
    assert kept == ["checkpoint_step_0000008", "checkpoint_step_0000010"]
    assert {checkpoint_format(paths.checkpoints_dir / name) for name in kept} == {CHECKPOINT_FORMAT}
    progress = [e for e in events if e["type"] == "progress"]
    assert progress[-1]["step"] == 10 and progress[-1]["prior_loss"] > 0

    # Validation grid: one row per prompt, validation_images_per_prompt (2) columns.
    from PIL import Image

    (validation,) = [e for e in events if e["type"] == "validation"]
    assert Image.open(validation["path"]).size == (128, 64)
    # The peak memory so far, after sampling beside the optimizer's states (RSS on these CPU workers).
    assert validation["peak_rss_gib"] >= progress[-1]["peak_rss_gib"] > 0
    assert list(paths.tensorboard_dir.glob("events.out.tfevents.*"))

    # The export is a diffusers model: it loads and samples; both trained components changed.
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(result.model_dir, local_files_only=True, safety_checker=None)
    image = pipe("a photo of sks dog", num_inference_steps=2, height=64, width=64).images[0]
    assert image.size == (64, 64)
    base = StableDiffusionPipeline.from_pretrained(tiny_model, local_files_only=True, safety_checker=None)
    for name in ("unet", "text_encoder"):
        trained_w = next(getattr(pipe, name).parameters()).float()
        base_w = next(getattr(base, name).parameters()).float()
        assert not torch.allclose(trained_w, base_w), f"{name} did not change"
    assert (result.model_dir / "metadata.json").exists()
    assert denoising_loss(result.model_dir, spec) < denoising_loss(tiny_model, spec)


def test_class_images_generated_once_and_reused(ray_cluster, tiny_model, dog_images, tmp_path):
    spec = make_spec(tiny_model, dog_images, num_class_images=3, resolution=32)
    cache = tmp_path / "class-images"  # not the session's: the other tests' jobs generated these already
    seen = []
    directory = ensure_class_images(
        spec,
        cache,
        num_actors=2,
        placement_timeout_s=60,
        batch_size=2,
        on_progress=lambda d, t: seen.append((d, t)),
    )
    files = sorted(directory.glob("*.png"))
    assert len(files) == 3 and seen[0] == (0, 3) and seen[-1] == (3, 3)
    # At the base model's native size, where its prior is what it learnt; training resizes them.
    assert {Image.open(f).size for f in files} == {(64, 64)}
    assert cache_key(dataclasses.replace(spec, resolution=64)) == cache_key(spec)
    mtimes = {f: f.stat().st_mtime_ns for f in files}

    # A second subject of the same class: nothing generated.
    other = dataclasses.replace(spec, instance_prompt="a photo of zwx dog", identifier="zwx")
    seen.clear()
    assert (
        ensure_class_images(other, cache, num_actors=2, placement_timeout_s=60, on_progress=lambda d, t: seen.append(d))
        == directory
    )
    assert seen == [3] and {f: f.stat().st_mtime_ns for f in files} == mtimes

    # More images of the class: only the missing ones are generated; the first three are untouched.
    more = dataclasses.replace(spec, num_class_images=5)
    ensure_class_images(more, cache, num_actors=1, placement_timeout_s=60)
    assert len(list(directory.glob("*.png"))) == 5 and {f: f.stat().st_mtime_ns for f in files} == mtimes
    # A batch whose images another job of the class wrote meanwhile: only the one still missing is generated.
    generator = ClassImageGenerator.remote(spec.base_model, False, generation_dtype(spec), str(mark_shared(directory)))
    lost = image_path(directory, 1)
    drawn = lost.read_bytes()
    lost.unlink()
    args = (spec.class_prompt, spec.class_image_inference_steps, spec.class_image_guidance_scale, str(directory))
    ray.get(generator.generate.remote([0, 1, 2], *args))
    ray.kill(generator)
    assert {f: f.stat().st_mtime_ns for f in files if f != lost} == {f: t for f, t in mtimes.items() if f != lost}
    again = np.asarray(Image.open(lost)).astype(int)
    assert np.abs(again - np.asarray(Image.open(io.BytesIO(drawn)))).max() <= 1  # its seed's image, in another batch
    # An image damaged in the cache (a bad disk, a copy cut short) is generated again, not decoded by every job.
    damaged = image_path(directory, 3)
    damaged.write_bytes(damaged.read_bytes()[:-20])
    ensure_class_images(more, cache, num_actors=1, placement_timeout_s=60)
    assert np.asarray(Image.open(damaged)).shape == (64, 64, 3)
    assert {f: f.stat().st_mtime_ns for f in files if f != lost} == {f: t for f, t in mtimes.items() if f != lost}
    # A different class prompt is a different cache entry.
    assert cache_key(dataclasses.replace(spec, class_prompt="a photo of cat")) != cache_key(spec)
    # So are images sampled in fp16 on GPUs.
    assert cache_key(dataclasses.replace(spec, gpus_per_worker=1, precision="fp16")) != cache_key(spec)
    # A guidance scale written 7 (YAML) or 7.0 (gRPC) draws the same images: one entry.
    sevens = [cache_key(dataclasses.replace(spec, class_image_guidance_scale=scale)) for scale in (7, 7.0)]
    assert sevens[0] == sevens[1] != cache_key(spec)


def test_a_class_image_actor_that_dies_is_replaced_and_its_batch_redone(ray_cluster, tiny_model, dog_images, tmp_path):
    """A node lost while the class images are generated (a spot node reclaimed) failed the job for good, where the
    same loss a phase later costs a restart of the workers: a new actor takes the batch, max_failures times."""

    def generators() -> set[str]:
        actors = list_actors(address=ray_cluster.dashboard_url, filters=[("class_name", "=", "ClassImageGenerator")])
        return {actor.actor_id for actor in actors}

    def kill_the_actor_once(done: int, total: int) -> None:
        if done and not killed:  # a batch done, others to go: the actor's process dies as with its node
            (actor,) = list_actors(
                address=ray_cluster.dashboard_url,
                filters=[("class_name", "=", "ClassImageGenerator"), ("state", "=", "ALIVE")],
            )
            os.kill(actor.pid, signal.SIGKILL)
            killed.append(actor.actor_id)

    for max_failures in (1, 0):
        spec = make_spec(
            tiny_model,
            dog_images,
            num_class_images=4,
            max_failures=max_failures,
            class_prompt=f"a lost dog {max_failures}",
        )
        killed, before = [], generators()
        if max_failures == 0:  # no replacement: the job fails
            with pytest.raises(ray.exceptions.RayActorError):
                ensure_class_images(
                    spec, tmp_path, num_actors=1, placement_timeout_s=60, batch_size=1, on_progress=kill_the_actor_once
                )
            continue
        directory = ensure_class_images(
            spec, tmp_path, num_actors=1, placement_timeout_s=60, batch_size=1, on_progress=kill_the_actor_once
        )
        assert killed and missing_indices(directory, 4) == []
        assert len(generators() - before) == 2  # the one killed, and the one that took its batch


def altered_copy(tiny_model: Path, directory: Path, *, vae=None, scheduler: dict | None = None) -> Path:
    """A copy of the tiny model: its VAE's weights changed by `vae(state_dict)`, its scheduler config updated."""
    model = Path(shutil.copytree(tiny_model, directory))
    if vae is not None:
        file = model / "vae" / "diffusion_pytorch_model.safetensors"
        state = load_file(file)
        vae(state)
        save_file(state, file)
    if scheduler:
        file = model / "scheduler" / "scheduler_config.json"
        file.write_text(json.dumps(json.loads(file.read_text()) | scheduler))
    return model


def test_class_images_are_sampled_in_the_jobs_precision_on_gpus(tiny_model, dog_images):
    """fp16 on GPUs whatever the precision left a base model that overflows in fp16 no way out; the key holds the
    dtype (and, for fp32 on GPUs, the device: a CUDA generator's noise is not a CPU one's), and the caches that fp16
    and CPU jobs filled keep their keys."""

    def key_before(spec: JobSpec, dtype: str) -> str:  # cache_key as it was before fp32 on GPUs
        identity = {
            "base_model": fingerprint(spec.base_model),
            "class_prompt": spec.class_prompt,
            "inference_steps": spec.class_image_inference_steps,
            "guidance_scale": float(spec.class_image_guidance_scale),
            "dtype": dtype,
        }
        return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:20]

    cpu = make_spec(tiny_model, dog_images, gpus_per_worker=0)
    for gpus, precision, dtype in [
        (0, "fp32", torch.float32),
        (0, "bf16", torch.float32),
        (1, "fp16", torch.float16),
        (0.5, "fp16", torch.float16),
    ]:
        spec = dataclasses.replace(cpu, gpus_per_worker=gpus, precision=precision)
        assert generation_dtype(spec) == dtype, (gpus, precision)
        assert cache_key(spec) == key_before(spec, str(dtype)), (gpus, precision)
    # bf16 on a GPU: its own (bf16 has fp32's range: the way out for a model that overflows in fp16, short of
    # training in fp32); its jobs shared fp16's cache before, and sample their class images once more.
    bf16_gpu = dataclasses.replace(cpu, gpus_per_worker=1, precision="bf16")
    assert generation_dtype(bf16_gpu) == torch.bfloat16
    assert cache_key(bf16_gpu) == key_before(bf16_gpu, str(torch.bfloat16))
    fp32_gpu = dataclasses.replace(cpu, gpus_per_worker=1, precision="fp32")
    assert generation_dtype(fp32_gpu) == torch.float32  # what ensure_class_images starts its actors with
    keys = {cache_key(dataclasses.replace(fp32_gpu, gpus_per_worker=gpus)) for gpus in (1, 0.5)}
    fp16_gpu = dataclasses.replace(fp32_gpu, precision="fp16")
    assert len(keys) == 1 and keys.isdisjoint({cache_key(cpu), cache_key(fp16_gpu), cache_key(bf16_gpu)})


def test_class_images_that_come_out_nan_or_black_fail_the_job_and_are_not_cached(
    ray_cluster, tiny_model, dog_images, tmp_path
):
    """A base model that overflows in fp16 samples NaN, which the cast to 8 bits turns black: cached, every later job
    of the class trained its prior toward black images, with no error anywhere. Refused, naming the model."""

    def nan(state):
        state["decoder.conv_out.bias"][0] = float("nan")

    def black(state):  # every pixel below 0 before the pipeline's clamp: finite, all zeros in 8 bits
        state["decoder.conv_out.weight"].zero_()
        state["decoder.conv_out.bias"].fill_(-3.0)

    cache = tmp_path / "class-images"
    for vae, what in [(nan, r"non-finite \(NaN or inf\)"), (black, "entirely black")]:
        model = altered_copy(tiny_model, tmp_path / vae.__name__, vae=vae)
        spec = make_spec(model, dog_images, num_class_images=3, precision="bf16")  # CPUs: sampled in fp32
        with pytest.raises(UnusableClassImage) as error:
            ensure_class_images(spec, cache, num_actors=1, placement_timeout_s=60, batch_size=2)
        assert type(error.value) is UnusableClassImage  # the actor's own error, not Ray's wrapper and its traceback
        assert re.fullmatch(
            rf"class image \d of 'a photo of dog', sampled by base model {re.escape(str(model))} in float32, came "
            rf"out {what}: its weights may be damaged.*None of its batch was written into the class-image cache\.",
            str(error.value),
        ), str(error.value)
        directory = cache / cache_key(spec)
        assert sorted(p.name for p in directory.iterdir() if p.name != "key.json") == [], "nothing cached"
        assert missing_indices(directory, 3) == [0, 1, 2]

    # Sampled in fp16 (what an fp16 job does on a GPU; CPUs run it too, slowly): the error says
    # how to get out.
    model = tmp_path / "nan"
    directory = tmp_path / "fp16"
    directory.mkdir()
    generator = ClassImageGenerator.remote(str(model), False, torch.float16, str(mark_shared(directory)))
    with pytest.raises(
        UnusableClassImage,
        match=r"in float16, came out non-finite .*: the model likely overflows in float16 \(as an SD 2\.x fine-tune "
        r"whose unet/config\.json lacks upcast_attention: true does\); set the job's precision to bf16 \(or fp32\)",
    ):
        ray.get(generator.generate.remote([0], "a photo of dog", 2, 7.5, str(directory)))
    ray.kill(generator)
    assert list(directory.glob("*.png")) == []


def test_a_run_on_a_full_disk_raises_its_own_error_not_the_failed_events(tiny_model, dog_images, tmp_path, monkeypatch):
    """The storage full: the run's error (a checkpoint it could not write) was hidden by the FAILED event's own
    write failing, and the user was told "[Errno 28] No space left on device" without a word of where or what."""
    from trainer import run
    from trainer.events import EventLog

    def checkpoint_unwritten(*_args) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", "/storage/jobs/full/checkpoints/trainer_state.json")

    emit = EventLog.emit

    def full_disk(self, type: str, **fields):
        if fields.get("state") == "FAILED":
            raise OSError(errno.ENOSPC, "No space left on device")
        return emit(self, type, **fields)

    monkeypatch.setattr(run, "_train", checkpoint_unwritten)
    monkeypatch.setattr(EventLog, "emit", full_disk)
    spec = make_spec(tiny_model, dog_images, num_class_images=0, num_workers=1)
    with pytest.raises(OSError) as error:
        run_training(spec, job_paths(tmp_path, "full"))
    assert error.value.filename == "/storage/jobs/full/checkpoints/trainer_state.json"


def test_a_run_whose_ray_train_controller_dies_is_no_verdict_on_the_job(ray_cluster, tiny_model, dog_images, tmp_path):
    """`dreambooth down` (or a Ray head restarted) under a training job: Ray Train's controller actor died with its
    owner's node, and the driver judged the job FAILED (TRAINING_FAILED), so the controller never ran it again and
    its checkpoints went unused. Raised without a verdict (RayLostTheRun), the controller's next attempt resumes it.
    Here the controller actor's process is killed, as its node's loss kills it."""
    from trainer.run import RayLostTheRun

    spec = make_spec(tiny_model, dog_images, num_class_images=0, num_workers=1, max_steps=100_000)
    paths = job_paths(tmp_path, "lost")
    raised: list[BaseException] = []

    def run() -> None:
        try:
            run_training(spec, paths)
        except BaseException as e:
            raised.append(e)

    runner = threading.Thread(target=run)
    runner.start()
    deadline = time.monotonic() + 300
    while not any(e["type"] == "progress" for e in read_events(paths.events_file)):
        assert time.monotonic() < deadline and runner.is_alive(), raised
        time.sleep(0.2)
    (controller,) = list_actors(
        address=ray_cluster.dashboard_url, filters=[("class_name", "=", "TrainController"), ("state", "=", "ALIVE")]
    )
    os.kill(controller.pid, signal.SIGKILL)
    runner.join(300)
    assert not runner.is_alive() and isinstance(raised[0], RayLostTheRun), raised
    assert [e["state"] for e in read_events(paths.events_file) if e["type"] == "state"] == ["PREPARING", "TRAINING"]


def test_trainings_own_failures_and_an_actor_that_could_not_start_stay_verdicts(tiny_model, dog_images, tmp_path):
    """What Ray Train raises for the workers' failures after max_failures, and an actor whose constructor failed (a
    node without the shared storage, a model too large for the GPU), are the job's: FAILED, not run again."""
    from trainer import run

    class Fails:  # Ray Train, as far as what its fit raises goes
        def __init__(self, error: Exception):
            self.error = error

        def fit(self):
            raise self.error

    spec = make_spec(tiny_model, dog_images, num_class_images=0)
    for job_id, error in [
        ("oom", ray.train.WorkerGroupError("a worker ran out of memory", {})),
        ("init", ray.exceptions.RayActorError(actor_init_failed=True)),
    ]:
        paths = job_paths(tmp_path, job_id)
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(run, "_trainer", lambda *args, error=error: Fails(error))
            with pytest.raises(type(error)):
                run_training(spec, paths)
        states = [e["state"] for e in read_events(paths.events_file) if e["type"] == "state"]
        assert states == ["PREPARING", "TRAINING", "FAILED"], job_id


def test_a_job_whose_workers_ray_cannot_place_fails_saying_so_instead_of_waiting(
    ray_cluster, tiny_model, dog_images, storage
):
    """The scheduler counts the cluster's totals: a worker no node has room for (2.5 CPUs here, where the nodes have
    2 and 1) waited, with no sign, until the controller's max_job_run_s. Its class-image actors, then its workers."""
    for phase, fields in [("class images", {"class_prompt": "a photo of an unplaceable dog"}), ("training", {})]:
        spec = make_spec(tiny_model, dog_images, num_workers=1, cpus_per_worker=2.5, **fields)
        if phase == "training":
            spec = dataclasses.replace(spec, num_class_images=0)
        paths = job_paths(storage, f"unplaceable-{phase.replace(' ', '-')}")
        with pytest.raises(PlacementTimeout, match=r"2\.5 CPUs each.* within 3 s") as error:
            run_training(spec, paths, placement_timeout_s=3)
        assert ("class-image actors" in str(error.value)) == (phase == "class images")
        failed = [e for e in read_events(paths.events_file) if e["type"] == "state"][-1]
        assert (failed["state"], failed["reason"]) == ("FAILED", "PLACEMENT_TIMEOUT")
        assert failed["message"].startswith("PlacementTimeout: Ray ")
    # Nothing of theirs left waiting on the cluster, to take a node's CPUs once one frees them.
    waiting = [a.class_name for a in list_actors(address=ray_cluster.dashboard_url) if a.state != "DEAD"]
    assert not {"RayTrainWorker", "ClassImageGenerator"} & set(waiting), waiting
    groups = list_placement_groups(address=ray_cluster.dashboard_url)
    assert [g.placement_group_id for g in groups if g.state not in ("CREATED", "REMOVED")] == []


def test_a_node_that_does_not_see_the_jobs_storage_is_refused_before_it_works(ray_cluster, tiny_model, tmp_path):
    """Workers and class-image actors check that they see the driver's storage (its mark) and the base model: a
    storage path local to each node would otherwise fail only after training, at the export."""
    from trainer.storage import StorageNotShared, check_shared, mark_shared

    mark = mark_shared(tmp_path)
    check = ray.remote(check_shared)
    ray.get(check.remote(str(mark), str(tiny_model)))  # this machine's nodes share its file system
    mark.unlink()  # as on a node whose `storage` is a directory of its own
    with pytest.raises(StorageNotShared, match=rf"node 127\.0\.0\.1 does not see the job's storage: {tmp_path} has"):
        ray.get(check.remote(str(mark), str(tiny_model)))
    with pytest.raises(StorageNotShared, match="does not see base_model /models/sd15; storage must be one file system"):
        ray.get(check.remote(str(mark_shared(tmp_path)), "/models/sd15"))
    assert mark_shared(tmp_path) != mark  # a new name each time: NFS clients cache what a name held


def test_resume_after_failure_equals_uninterrupted_run(ray_cluster, tiny_model, dog_images, storage):
    # ZeRO-2 (flat parameters), fp32, 2 workers, checkpoints every 2 of 6 steps, text encoder trained too; each
    # worker samples its share of the validation images (2 and 1 of 3), rank 0 draws the grid. A learning rate that
    # changes every step (warm-up, then cosine), which the resumed run must take up where it was, and a prior loss
    # weighted other than 1.
    spec = make_spec(
        tiny_model,
        dog_images,
        lr_schedule="cosine",
        lr_warmup_steps=2,
        prior_loss_weight=0.5,
        train_text_encoder=True,
        validation_prompts=["a photo of sks dog"],
        validation_images_per_prompt=3,
        validation_inference_steps=2,
    )
    # What else the class's cache folder holds is no class image (a macOS "._000001.png" listed first failed every job
    # of the class): the workers take the images the driver checked, by name.
    stray = job_paths(storage, "straight").class_image_cache / cache_key(spec) / "._000001.png"
    stray.parent.mkdir(parents=True, exist_ok=True)
    stray.write_bytes(b"\x00\x05\x16\x07 Mac OS X resource fork")
    uninterrupted = run_training(spec, job_paths(storage, "straight"))
    # What a rerun checks the base model's path against (trainer.run.check_rerun).
    assert json.loads(job_paths(storage, "straight").base_model_file.read_text()) == content_identity(tiny_model)

    # A worker process dies at step 3: Ray Train restarts the workers from the step-2 checkpoint. One dies again at
    # step 5, with no retries left: the run fails. Running the job again resumes from step 4.
    crashed = job_paths(storage, "crash")
    first_run = time.monotonic()
    with pytest.raises(ray.train.TrainingFailedError):
        run_training(dataclasses.replace(spec, max_failures=1), crashed, fail_once_at_steps=(3, 5))
    first_run = time.monotonic() - first_run
    assert [e["step"] for e in read_events(crashed.events_file) if e["type"] == "resumed"] == [2]
    (failed,) = [e for e in read_events(crashed.events_file) if e["type"] == "state" and e["state"] == "FAILED"]
    assert failed["reason"] == "TRAINING_FAILED" and failed["message"].startswith("WorkerGroupError: "), failed
    # And the driver was killed while Ray rewrote its record of the run's checkpoints: the record is torn, the
    # checkpoints are whole. The job's events say which one Ray committed last.
    record = crashed.checkpoints_dir / RAY_RUN_STATE
    record.write_bytes(record.read_bytes()[: record.stat().st_size // 2])
    # And a save the crash cut short, which Ray never committed: removed, not kept for good beside the others.
    cut_short = crashed.checkpoints_dir / "checkpoint_step_0000005"
    (cut_short / "zero").mkdir(parents=True)
    # Run again, it resumes from the events (Ray's record set aside) and dies at step 5 again, before its first
    # checkpoint: Ray writes its record of a run only then, so it leaves none, and the next run resumes from the
    # events too (it started over from step 0).
    (crashed.job_dir / ".failure_injected_at_5").unlink()
    second_run = time.monotonic()
    with pytest.raises(ray.train.TrainingFailedError):
        run_training(spec, crashed, fail_once_at_steps=(5,))
    assert not record.exists()
    resumed = run_training(spec, crashed)
    second_run = time.monotonic() - second_run
    assert [e["step"] for e in read_events(crashed.events_file) if e["type"] == "resumed"] == [2, 4, 4]
    assert not cut_short.exists()
    # The model's wall time is both runs' (the second alone was what it said).
    assert first_run < resumed.wall_time_s < first_run + second_run

    final = "checkpoints/checkpoint_step_0000006"
    reference = consolidated_state_dict(storage / "jobs" / "straight" / final)
    weights = consolidated_state_dict(storage / "jobs" / "crash" / final)
    assert weights.keys() == reference.keys()
    worst = max((weights[k] - reference[k]).abs().max().item() for k in reference)
    assert worst <= 1e-6, f"resumed weights differ from the uninterrupted run by {worst}"
    assert uninterrupted.steps == 6
    progress = [e for e in read_events(job_paths(storage, "straight").events_file) if e["type"] == "progress"]
    resumed_progress = [e for e in read_events(crashed.events_file) if e["type"] == "progress"]
    assert resumed_progress[-1]["lr"] == progress[-1]["lr"]
    # Each step's learning rate is the one it trained with (read after it, it was the next step's): 0 at the warm-up's
    # first, and the last step's is not the cosine's end.
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=spec.learning_rate)
    schedule = lr_scheduler(spec, optimizer)
    trained_with = []
    for _ in range(spec.max_steps):
        trained_with.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert trained_with[0] == 0 and trained_with[-1] > spec.learning_rate / 10
    assert [e["lr"] for e in progress] == pytest.approx([trained_with[e["step"] - 1] for e in progress])
    for event in progress:  # DreamBooth's loss: the instance loss plus the weighted prior-preservation loss
        assert event["prior_loss"] > 0
        assert event["loss"] == pytest.approx(event["instance_loss"] + 0.5 * event["prior_loss"], rel=1e-5)
    # The two runs' grids: every image gathered from its rank, each from its own seed whatever its batch.
    grids = [
        np.asarray(Image.open(storage / "jobs" / job / "validation" / "step_0000006.png"))
        for job in ("straight", "crash")
    ]
    assert grids[0].shape == (64, 192, 3) and np.abs(grids[0].astype(int) - grids[1]).max() <= 1
    # The final grid names its cells' seeds: served, the exported model draws each cell again.
    settings = json.loads(Image.open(job_paths(storage, "straight").validation_grid(6)).text[GRID_METADATA_KEY])
    assert (settings["step"], settings["steps"], settings["width"], settings["height"]) == (6, 2, 64, 64)
    engine = SamplingEngine(device="cpu")
    served = engine.generate(
        engine.load("straight", uninterrupted.model_dir),
        [
            GenerationRequest(
                cell["prompt"],
                steps=settings["steps"],
                guidance_scale=settings["guidance_scale"],
                seed=cell["seed"],
                width=settings["width"],
                height=settings["height"],
            )
            for cell in settings["cells"][0]
        ],
    )
    assert len({cell["seed"] for cell in settings["cells"][0]}) == 3
    for column, result in enumerate(served):
        cell = grids[0][:, column * 64 : (column + 1) * 64].astype(int)
        assert np.abs(np.asarray(result.images[0]).astype(int) - cell).max() <= 2, column
    # Running the finished job again exports it again, without starting workers (its training had ended), the first
    # export replaced whole, no scratch left beside it.
    straight = job_paths(storage, "straight")
    started = len([e for e in read_events(straight.events_file) if e["type"] == "worker"])
    again = run_training(spec, straight)
    assert (again.model_dir, again.steps) == (uninterrupted.model_dir, 6)
    events = read_events(straight.events_file)
    assert len([e for e in events if e["type"] == "worker"]) == started
    assert states(events)[-3:] == ["PREPARING", "EXPORTING", "SUCCEEDED"]
    assert [p.name for p in again.model_dir.parent.iterdir() if p.name.startswith(".")] == []
    # A driver that died drawing the final grid, after the final checkpoint was committed: the next run draws it (not
    # skipped unseen, nor an export without it), the same grid, and trains no step.
    grid = straight.validation_grid(6)
    drawn = grid.read_bytes()
    grid.unlink()
    run_training(spec, straight)
    events = read_events(straight.events_file)
    assert len([e for e in events if e["type"] == "worker"]) == started + 2
    assert [e["step"] for e in events if e["type"] == "validation"] == [6, 6]
    assert [e["step"] for e in events if e["type"] == "progress"][-1] == 6
    assert np.abs(np.asarray(Image.open(grid)).astype(int) - np.asarray(Image.open(io.BytesIO(drawn)))).max() <= 1
    # The export holds the final checkpoint's weights under the networks' own names.
    base = load_base_model(tiny_model, dtype=torch.float32, components=("unet", "text_encoder"))
    for name, file in (("unet", "diffusion_pytorch_model.safetensors"), ("text_encoder", "model.safetensors")):
        exported = load_file(uninterrupted.model_dir / name / file)
        own = {k[len(name) + 1 :]: v for k, v in reference.items() if k.startswith(f"{name}.")}
        expected = unflatten_state_dict(getattr(base, name), own)
        assert exported.keys() == expected.keys()
        assert all(torch.equal(exported[k], expected[k]) for k in expected), name


def test_torch_compile_trains_validates_and_exports(ray_cluster, tiny_model, dog_images, storage):
    """torch_compile over flat parameters under DeepSpeed: the job compiles the UNet's forward and backward, trains,
    samples its validation grid eagerly and exports. aot_eager traces and partitions the graphs as inductor would;
    inductor's C++ code generation for CPUs (minutes here, not the GPU's Triton path) is left out."""
    spec = make_spec(
        tiny_model,
        dog_images,
        num_workers=1,
        max_steps=3,
        checkpoint_interval=3,
        precision="bf16",
        torch_compile=True,
        compile_backend="aot_eager",
        validation_prompts=["a photo of sks dog"],
        validation_images_per_prompt=1,
        validation_inference_steps=2,
    )
    paths = job_paths(storage, "compiled")
    result = run_training(spec, paths)
    assert result.steps == 3 and torch.isfinite(torch.tensor(result.final_loss))
    events = read_events(paths.events_file)
    [compiled] = [e for e in events if e["type"] == "compiled"]
    assert compiled["step"] == 1 and compiled["graphs"] >= 1 and compiled["seconds"] > 0
    assert compiled["cudagraph_skips"] == 0  # no CUDA graphs asked for on a CPU: none skipped (compile_counts)
    assert [e["step"] for e in events if e["type"] == "validation"] == [3]
    assert (result.model_dir / "unet" / "diffusion_pytorch_model.safetensors").exists()


def test_compiled_code_is_cached_on_the_shared_storage(tiny_model, storage, monkeypatch):
    """Inductor and Triton read their cache directories from the environment when compiling starts: the trained
    networks point them at the storage, which every node shares, so the next job of the same shapes reuses them."""
    for name in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"):
        # Set first, so that the undo is recorded: delenv of an unset name records nothing, and the values the
        # trainer writes would outlive the test (later compiles and subprocesses would cache in its tmp folder).
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    spec = make_spec(tiny_model, storage, torch_compile=True)
    paths = job_paths(storage, "compiled")
    unet = load_base_model(tiny_model, dtype=torch.float32, components=("unet",)).unet
    trained = trained_model(spec, paths, unet, None)  # compiles lazily, at the first forward
    # Under ZeRO-2, DeepSpeed sees flat parameters only (its per-tensor work set SD 1.5's step time).
    assert {name.rpartition(".")[2] for name, _ in trained.named_parameters()} == {FLAT}
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(storage / "cache" / "torch_compile" / "inductor")
    assert os.environ["TRITON_CACHE_DIR"] == str(storage / "cache" / "torch_compile" / "triton")


def test_compiled_networks_replay_cuda_graphs_unless_told_not_to(tiny_model, storage):
    """cuda_graphs (the default) is inductor's mode reduce-overhead: on an H200 it halved SD 1.5's step (73.9 ms
    against 146.4 compiled without it). Other backends take no mode (aot_eager warns that it ignores one)."""
    spec = make_spec(tiny_model, storage, torch_compile=True, gpus_per_worker=1)
    assert spec.cuda_graphs
    assert compile_options(spec) == {"backend": "inductor", "mode": "reduce-overhead"}
    assert compile_options(dataclasses.replace(spec, cuda_graphs=False)) == {"backend": "inductor"}
    assert compile_options(dataclasses.replace(spec, compile_backend="aot_eager")) == {"backend": "aot_eager"}
    assert compile_options(dataclasses.replace(spec, gpus_per_worker=0)) == {"backend": "inductor"}  # no CUDA


def test_the_compiled_event_counts_the_graphs_not_replayed_as_cuda_graphs(tiny_model, storage):
    """Inductor counts the compiled graphs it runs without the CUDA graphs asked for (torch's own counter, bumped
    here as inductor bumps it): a job that replays none steps at half the speed, and its compiled event says so."""
    from torch._dynamo.utils import counters

    gpu = make_spec(tiny_model, storage, torch_compile=True, gpus_per_worker=1)
    before = compile_counts(gpu)["cudagraph_skips"]
    counters["inductor"]["cudagraph_skips"] += 2
    try:
        assert compile_counts(gpu)["cudagraph_skips"] == before + 2
        assert compile_counts(dataclasses.replace(gpu, cuda_graphs=False))["cudagraph_skips"] == 0  # none asked for
    finally:
        counters["inductor"]["cudagraph_skips"] -= 2


def test_the_loss_is_the_instance_loss_plus_the_weighted_prior_loss():
    """DreamBooth's eq. 2 over a batch of [instance samples; class samples]."""
    generator = torch.Generator().manual_seed(0)
    pred, target = torch.randn(5, 4, 8, 8, generator=generator), torch.randn(5, 4, 8, 8, generator=generator)
    total, instance, prior = prior_preservation_loss(pred, target, 2, 0.25)
    mse = torch.nn.functional.mse_loss
    assert torch.equal(instance, mse(pred[:2], target[:2])) and torch.equal(prior, mse(pred[2:], target[2:]))
    assert torch.equal(total, instance + 0.25 * prior)
    total, instance, prior = prior_preservation_loss(pred, target, 5, 0.25)  # no class images: no prior term
    assert torch.equal(total, mse(pred, target)) and prior == 0


def test_the_reported_loss_is_the_mean_over_ranks(tmp_path):
    """Each rank's loss is of its own share of the batch: what a step reports averages them (two real gloo ranks)."""
    script = (
        "import sys, torch, torch.distributed as dist\n"
        "from trainer.progress import mean_over_ranks\n"
        "rank = int(sys.argv[2])\n"
        "dist.init_process_group('gloo', store=dist.FileStore(sys.argv[1], 2), rank=rank, world_size=2)\n"
        "print(mean_over_ranks(torch.tensor([1.0, 10.0]) * (rank + 1)).tolist())\n"
        "dist.destroy_process_group()\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "GLOO_SOCKET_IFNAME": "lo"}
    ranks = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(tmp_path / "rendezvous"), str(rank)],
            env=env,
            stdout=subprocess.PIPE,
            text=True,
        )
        for rank in range(2)
    ]
    outputs = [rank.communicate(timeout=120)[0] for rank in ranks]
    assert [rank.returncode for rank in ranks] == [0, 0]
    assert outputs == ["[1.5, 15.0]\n"] * 2


def test_the_training_target_of_a_v_prediction_base_is_its_velocity(tiny_model):
    """SD 2.x at 768 px predicts v = sqrt(alpha_bar_t) * noise - sqrt(1 - alpha_bar_t) * latents; the others noise."""
    from diffusers import DDPMScheduler

    generator = torch.Generator().manual_seed(0)
    latents, noise = torch.randn(3, 4, 8, 8, generator=generator), torch.randn(3, 4, 8, 8, generator=generator)
    timesteps = torch.tensor([0, 500, 999])
    v = DDPMScheduler.from_pretrained(tiny_model, subfolder="scheduler", prediction_type="v_prediction")
    alpha_bar = v.alphas_cumprod[timesteps].view(-1, 1, 1, 1)
    expected = alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * latents
    torch.testing.assert_close(training_target(v, latents, noise, timesteps), expected)
    epsilon = DDPMScheduler.from_pretrained(tiny_model, subfolder="scheduler")
    assert epsilon.config.prediction_type == "epsilon"
    assert training_target(epsilon, latents, noise, timesteps) is noise


def test_a_v_prediction_base_trains_and_its_export_samples_with_v_prediction(
    ray_cluster, tiny_model, dog_images, storage, tmp_path
):
    """The tiny model predicts noise: a v-prediction base (SD 2.x at 768 px) ran through no test."""
    model = altered_copy(tiny_model, tmp_path / "v-model", scheduler={"prediction_type": "v_prediction"})
    spec = make_spec(model, dog_images, num_workers=1, max_steps=2, checkpoint_interval=2, num_class_images=0)
    paths = job_paths(storage, "v-prediction")
    result = run_training(spec, paths)
    assert result.steps == 2 and np.isfinite(result.final_loss)
    assert states(read_events(paths.events_file))[-1] == "SUCCEEDED"
    exported = json.loads((result.model_dir / "scheduler" / "scheduler_config.json").read_text())
    assert exported["prediction_type"] == "v_prediction"
    assert sampling_scheduler(result.model_dir).config.prediction_type == "v_prediction"  # what serving samples with


def test_an_export_filters_nothing_unless_given_the_base_models_safety_checker(tiny_model, tmp_path):
    """The export leaves out the base model's safety checker (serving never runs it; 1.2 GB for SD 1.5): loaded
    plainly it filters nothing. Passing the base model's, as trainer/export.py and the README say, brings it back."""
    from diffusers import StableDiffusionPipeline
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    base = Path(shutil.copytree(tiny_model, tmp_path / "base"))
    tiny = {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 1, "num_attention_heads": 2}
    config = CLIPConfig(text_config=tiny, vision_config={**tiny, "image_size": 32, "patch_size": 8}, projection_dim=768)
    StableDiffusionSafetyChecker(config).save_pretrained(base / "safety_checker")
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        base / "feature_extractor"
    )
    export = tmp_path / "export"
    load_pipeline(base).save_pretrained(export, safe_serialization=True)  # what export_model saves
    index = json.loads((export / "model_index.json").read_text())
    assert index["safety_checker"] == [None, None] and index["requires_safety_checker"] is False

    sample = {"num_inference_steps": 1, "height": 64, "width": 64}
    plain = StableDiffusionPipeline.from_pretrained(export, local_files_only=True)
    assert plain.safety_checker is None and plain("a photo of dog", **sample).nsfw_content_detected is None
    filtered = StableDiffusionPipeline.from_pretrained(
        export,
        local_files_only=True,
        safety_checker=StableDiffusionSafetyChecker.from_pretrained(base, subfolder="safety_checker"),
        feature_extractor=CLIPImageProcessor.from_pretrained(base, subfolder="feature_extractor"),
    )
    assert filtered("a photo of dog", **sample).nsfw_content_detected == [False]
