"""The DreamBooth training loop, run by every Ray Train worker.

Read top to bottom: load the base model; encode the instance and class images (and, with a frozen text
encoder, the two prompts) once; build one DeepSpeed engine over UNet (+ text encoder); resume from the
latest checkpoint if there is one; then the loop: sample latents and noise, predict, prior-preservation
loss, backward, step; checkpoint, validate and report progress at their intervals. What the trained
networks need before DeepSpeed wraps them (flat parameters, compilation) is in `trained_model`.
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray.train
import ray.train.torch
import torch

from dreambooth.sd_model import load_base_model, load_pipeline
from trainer.async_checkpoint import AsyncCheckpointEngine
from trainer.checkpoint import restore_latest, save_and_report
from trainer.class_images import class_image_files
from trainer.data import EncodedImages, derive_seed, encode_images_shared, sample_indices
from trainer.deepspeed_setup import compute_dtype, initialize
from trainer.events import EventLog
from trainer.flat_parameters import flatten_parameters
from trainer.images import find_instance_images
from trainer.metrics import TrainMetrics
from trainer.model import DreamBoothModel, prior_preservation_loss
from trainer.progress import ProgressReporter, mean_over_ranks, peak_memory
from trainer.spec import JobSpec
from trainer.storage import JobPaths, check_shared
from trainer.validation import Validator

INSTANCE_STREAM, CLASS_STREAM = 0, 1
# Squares along each instance photo's long side, one drawn per sample (a photo 4:3 at 512 px: 0, 85 or 171 px in);
# class images, generated square, have one.
INSTANCE_CROPS = 3


class Startup:
    """Seconds of the parts of a worker's start, each from the end of the one before (and of its GPU work)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds: dict[str, float] = {}
        self._last = time.perf_counter()

    def done(self, part: str) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.seconds[part] = round(now - self._last, 3)
        self._last = now


@dataclass(frozen=True)
class WorkerConfig:
    """What the driver hands each training worker (as Ray Train's train_loop_config: `to_dict()`)."""

    spec: dict[str, Any]  # JobSpec.to_dict(): validated again on the worker
    storage_root: str
    job_id: str
    storage_mark: str  # a file the driver made on the job's storage: a worker that cannot see it is refused
    class_images_dir: str | None = None  # with prior preservation: the class's images in the cache
    resume_from: str | None = None  # where Ray's record of the run was unusable: the checkpoint the events name
    fail_once_at_steps: tuple[int, ...] = ()  # tests: a worker's process dies once at each

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def train_loop_per_worker(train_loop_config: dict[str, Any]) -> None:
    config = WorkerConfig(**train_loop_config)
    spec = JobSpec.from_dict(config.spec)
    paths = JobPaths(Path(config.storage_root), config.job_id)
    check_shared(config.storage_mark, spec.base_model)

    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device() if spec.use_gpu else torch.device("cpu")
    dtype = compute_dtype(spec)
    # Frozen modules run in the compute dtype on GPUs; on CPUs fp32 is faster than bf16 convolutions.
    frozen_dtype = dtype if spec.use_gpu else torch.float32

    # How long each part of the worker's start took, for the "worker" event (SD 1.5 on an H100: ~50 s from the
    # TRAINING state to the first step, a third of a short job's training).
    startup = Startup(device)

    # 1. Base model: frozen parts in the compute dtype, trainable parts in fp32 (DeepSpeed keeps fp32 masters).
    # A trained text encoder lives in the DeepSpeed engine only; a frozen one is loaded here, once.
    frozen_parts = ("vae", "tokenizer", "scheduler") + (() if spec.train_text_encoder else ("text_encoder",))
    frozen = load_base_model(spec.base_model, dtype=frozen_dtype, device=device, components=frozen_parts)
    frozen.vae.requires_grad_(False).eval()
    if frozen.text_encoder is not None:
        frozen.text_encoder.requires_grad_(False).eval()
    trainable = load_base_model(
        spec.base_model,
        dtype=torch.float32,
        device=device,
        components=("unet", "text_encoder") if spec.train_text_encoder else ("unet",),
    )
    scheduler = frozen.noise_scheduler
    startup.done("load_model")

    # 2. Encode once: image latent distributions; prompt embeddings when the text encoder is frozen.
    instance_files = find_instance_images(spec.instance_images)
    instance = encode_images_shared(
        frozen.vae, instance_files, spec.resolution, device, rank, world_size, crops=INSTANCE_CROPS
    )
    class_images: EncodedImages | None = None
    if spec.with_prior_preservation:
        class_files = class_image_files(Path(config.class_images_dir), spec.num_class_images)
        class_images = encode_images_shared(frozen.vae, class_files, spec.resolution, device, rank, world_size)
    prompt_ids = frozen.tokenizer(
        [spec.instance_prompt, spec.class_prompt or spec.instance_prompt],
        padding="max_length",
        max_length=frozen.tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids.to(device)
    prompt_embeds = None
    if not spec.train_text_encoder:
        with torch.no_grad():
            prompt_embeds = frozen.text_encoder(prompt_ids)[0].to(dtype)
    startup.done("encode")
    if not spec.validation_prompts:
        # Nothing samples images: the frozen networks (0.4 GB on the GPU for SD 1.5 in fp16) go before the engine
        # allocates its own memory.
        frozen.vae = frozen.text_encoder = None

    # 3. One DeepSpeed engine over everything trained.
    model = trained_model(spec, paths, trainable.unet, trainable.text_encoder)
    engine = initialize(model, spec, world_size)
    if spec.async_checkpointing:
        engine.checkpoint_engine = AsyncCheckpointEngine()
    startup.done("build_engine")
    start_step, restored = restore_latest(engine, fallback=config.resume_from)
    startup.done("restore")

    events = EventLog(paths.events_file)
    events.emit(
        "worker",
        rank=rank,
        world_size=world_size,
        node_id=ray.get_runtime_context().get_node_id(),
        device=str(device),
        start_step=start_step,
        startup_s=startup.seconds,
    )
    # Prometheus metrics (through Ray's metrics agent) come from rank 0, like the events.
    metrics = TrainMetrics() if rank == 0 else None
    reporter = (
        ProgressReporter(events, paths.tensorboard_dir, spec.max_steps, start_step, metrics=metrics)
        if rank == 0
        else None
    )
    # Validation images: under ZeRO-3 every forward pass gathers the partitioned weights from all ranks, so every
    # rank samples every image, in step; under ZeRO-2 every rank holds all the weights and samples its share, and
    # rank 0 gathers them. (Rank 0 sampling alone left the others waiting in the next step's gradient reduction, for
    # as long as validation took: past the process group's timeout, 30 min, the job failed over a preview.)
    validator = None
    if spec.validation_prompts:
        pipeline = load_pipeline(
            spec.base_model,
            dtype=frozen_dtype,
            device=device,
            unet=engine.module.unet,
            text_encoder=engine.module.text_encoder or frozen.text_encoder,
            vae=frozen.vae,  # the one that encoded the images: not a second copy on the device
        )
        validator = Validator(
            pipeline,
            prompts=spec.validation_prompts,
            images_per_prompt=spec.validation_images_per_prompt,
            inference_steps=spec.validation_inference_steps,
            resolution=spec.resolution,
            seed=spec.seed,
            grid_path=paths.validation_grid,
            compute_dtype=dtype,
        )
    if rank == 0 and start_step > 0:
        events.emit("resumed", step=start_step, path=str(restored))
        metrics.record_restart()

    def validate(step: int) -> None:
        # Sampling runs other shapes without grad: eager, rather than compiling the networks a second time.
        with torch.compiler.set_stance("force_eager"):
            shared = spec.zero_stage == 2
            grid = validator.run(step, rank if shared else 0, world_size if shared else 1, save=rank == 0)
        if rank == 0:
            events.emit("validation", step=step, path=str(grid), **peak_memory())

    if validator is not None and start_step > 0 and spec.validates_at(start_step):
        # The run before died drawing this step's grid, after the step's checkpoint was committed (validation is a
        # memory peak: an OOM there is likely). Drawn now, or the failure is met again: not skipped unseen. Rank 0
        # looks, for all: validation is collective.
        missing = [not paths.validation_grid(start_step).exists()]
        torch.distributed.broadcast_object_list(missing, src=0)
        if missing[0]:
            validate(start_step)

    # 4. The loop. Each step's randomness is a function of (seed, step, micro-step, rank): see trainer.data.
    bs, accumulation = spec.batch_size, spec.gradient_accumulation_steps
    pending_commit = None  # rank 0's wait for Ray to commit the latest checkpoint
    loop_start = time.perf_counter()
    for step in range(start_step, spec.max_steps):
        # The step's learning rate: its last micro-step's engine.step() moves the schedule on to the next step's.
        lr = engine.get_lr()[0]
        micro_losses = []
        for micro in range(accumulation):
            generator = torch.Generator(device).manual_seed(derive_seed(spec.seed, step, micro, rank))
            first = ((step * accumulation + micro) * world_size + rank) * bs
            latents = instance.sample(sample_indices(len(instance), spec.seed, INSTANCE_STREAM, first, bs), generator)
            which_prompt = torch.zeros(bs, dtype=torch.long, device=device)
            if class_images is not None:
                class_idx = sample_indices(len(class_images), spec.seed, CLASS_STREAM, first, bs)
                latents = torch.cat([latents, class_images.sample(class_idx, generator)])
                which_prompt = torch.cat([which_prompt, torch.ones(bs, dtype=torch.long, device=device)])

            noise = torch.randn(latents.shape, generator=generator, device=device)
            timesteps = torch.randint(
                0,
                scheduler.config.num_train_timesteps,
                (latents.shape[0],),
                generator=generator,
                device=device,
            )
            noisy_latents = scheduler.add_noise(latents, noise, timesteps)
            target = training_target(scheduler, latents, noise, timesteps)

            if prompt_embeds is not None:
                pred = engine(noisy_latents.to(dtype), timesteps, encoder_hidden_states=prompt_embeds[which_prompt])
            else:
                pred = engine(noisy_latents.to(dtype), timesteps, input_ids=prompt_ids[which_prompt])
            loss, instance_loss, prior_loss = prior_preservation_loss(pred, target, bs, spec.prior_loss_weight)
            engine.backward(loss)
            engine.step()
            micro_losses.append(torch.stack([loss.detach(), instance_loss.detach(), prior_loss.detach()]))
        # What the step reports: its losses over all its micro-steps and all ranks, not the last one's of rank 0.
        loss, instance_loss, prior_loss = mean_over_ranks(torch.stack(micro_losses).mean(0)).unbind()
        if spec.async_checkpointing:
            engine.checkpoint_engine.reserve_after_first_update(engine)

        done = step + 1
        last = done == spec.max_steps
        if reporter is not None:
            reporter.step(done, loss, instance_loss, prior_loss, lr, force=last, skipped_steps=engine.skipped_steps)
            if spec.torch_compile and step == start_step:
                # This run's first step compiled (minutes for SD 1.5, seconds from the storage's cache): say how long.
                events.emit("compiled", step=done, seconds=time.perf_counter() - loop_start, **compile_counts(spec))
        if done % spec.checkpoint_interval == 0 or last:
            pending_commit, stall = save_and_report(
                engine,
                done,
                {"loss": float(loss)},
                previous=pending_commit,
                on_committed=lambda path, stall, step=done: events.emit(
                    "checkpoint", step=step, path=str(path), stall_s=stall.seconds, waited_s=stall.waited_s
                ),
            )
            if metrics is not None:
                metrics.record_checkpoint_stall(stall)
        if validator is not None and spec.validates_at(done):
            validate(done)
        _maybe_inject_failure(config, done, rank, paths, pending_commit)

    if pending_commit is not None:
        pending_commit.join()
    if reporter is not None:
        reporter.close()


def training_target(scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """What the UNet learns to predict from the noised latents: the velocity for a v-prediction base model (SD 2.x
    at 768 px), else the noise."""
    if scheduler.config.prediction_type == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    return noise  # epsilon: preflight refused the other prediction types


def compile_counts(spec: JobSpec) -> dict[str, int]:
    """What this process's torch.compile has done: the graphs dynamo compiled, and those inductor runs without the
    CUDA graphs the spec asked for, launch by launch, at about half the speed (TORCH_LOGS=perf_hints says why):
    counted, or a slow job would look like any other."""
    counters = torch._dynamo.utils.counters
    skips = counters["inductor"]["cudagraph_skips"] if spec.replays_cuda_graphs else 0
    return {"graphs": counters["stats"]["unique_graphs"], "cudagraph_skips": skips}


def trained_model(spec: JobSpec, paths: JobPaths, unet, text_encoder) -> DreamBoothModel:
    """The networks DeepSpeed will train, made ready for it: gradient checkpointing, flat parameters under
    ZeRO-2, torch.compile."""
    networks = [unet] if text_encoder is None else [unet, text_encoder]
    if spec.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        if text_encoder is not None:
            text_encoder.gradient_checkpointing_enable()
    if spec.zero_stage == 2:
        # A few dozen flat tensors instead of hundreds: ZeRO-2's per-tensor work no longer sets the step time.
        for network in networks:
            flatten_parameters(network)
    if spec.torch_compile:
        # Compiled code is cached on the shared storage: the next job of the same shapes, on any node, compiles
        # in a fraction of the time. Read when compiling starts (the first step). Assigned, not defaulted: torch
        # writes its per-machine default into the environment once anything asks for the directory.
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(paths.compile_cache / "inductor")
        os.environ["TRITON_CACHE_DIR"] = str(paths.compile_cache / "triton")
        for network in networks:
            # In place (nn.Module.compile): parameter names, hence checkpoints and the export, stay as they are.
            network.compile(**compile_options(spec))
    return DreamBoothModel(unet.train(), text_encoder.train() if text_encoder is not None else None)


def compile_options(spec: JobSpec) -> dict[str, str]:
    """torch.compile's arguments for the trained networks. CUDA graphs are a mode of inductor's (other backends
    ignore a mode, with a warning). A training step needs no marking: torch's CUDA graph trees start a new step at
    the first forward after a backward, when the last step's outputs (its prediction, consumed by that backward)
    may be overwritten."""
    if spec.replays_cuda_graphs:
        return {"backend": "inductor", "mode": "reduce-overhead"}
    return {"backend": spec.compile_backend}


def _maybe_inject_failure(config: WorkerConfig, step: int, rank: int, paths: JobPaths, pending_commit) -> None:
    """Chaos testing: kill one worker's process once at each of the given steps, as a crashed node would; after
    the latest checkpoint was committed, so that the test knows where the restart must resume."""
    if step not in config.fail_once_at_steps:
        return
    if pending_commit is not None:
        pending_commit.join()
    torch.distributed.barrier()  # every rank gets here after that commit
    if rank != ray.train.get_context().get_world_size() - 1:
        return
    marker = paths.job_dir / f".failure_injected_at_{step}"
    if marker.exists():
        return
    marker.touch()
    os._exit(1)
