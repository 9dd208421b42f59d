"""DeepSpeed ZeRO configuration and engine construction from a JobSpec."""

from __future__ import annotations

import contextlib
import fcntl
import functools
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from trainer.flat_parameters import FLAT, SPLIT_ABOVE
from trainer.spec import JobSpec

log = logging.getLogger(__name__)


def deepspeed_config(spec: JobSpec, world_size: int) -> dict[str, Any]:
    zero: dict[str, Any] = {
        "stage": spec.zero_stage,
        # ZeRO-2 overlapping gradient reduction with backward costs a device sync at the end of every backward on
        # CUDA (DeepSpeed cannot tell the streams' dependency otherwise), and a second bucket: for nothing on one
        # GPU. ZeRO-3 keeps it: it also fetches parameters on a stream of its own, and without it each fetch's wait
        # (even one rank's) synchronizes the compute stream, at every submodule. Off with CUDA graphs: the UNet's
        # backward is one replay whose gradients all come at its end, leaving little to overlap, and a reduction
        # still running on DeepSpeed's stream while the text encoder's backward replays would race with it (a
        # replay writes where it was recorded to, which the allocator's record_stream does not keep it from).
        "overlap_comm": (world_size > 1 and not spec.replays_cuda_graphs) or spec.zero_stage == 3,
        "contiguous_gradients": True,
        # ZeRO-2 keeps two buckets of this many gradient elements (2 GB in fp16 at DeepSpeed's default 5e8), and
        # they are allocated at backward's memory peak. A flat parameter larger than a bucket is reduced on its
        # own, so with flat parameters only the small ones go through the buckets (the text encoder's layers,
        # the UNet's smallest blocks), a few calls per step; NCCL is at full bandwidth well below 40 MB per call.
        # 2e7 rather than 5e7: 0.11 GiB less at the peak, which UNet + text encoder on one GPU measured at 16.02
        # GiB against the 16 GiB target (bench/README.md).
        "reduce_bucket_size": 2e7,
        # On one rank ZeRO-2's reduce-scatter path only adds bookkeeping to every bucket (a division by 1, a copy
        # back); with several ranks it divides before summing, which rounds differently: kept there, and for ZeRO-3,
        # where the key picks another reduction path (not measured on a GPU).
        "reduce_scatter": world_size > 1 or spec.zero_stage == 3,
    }
    if spec.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": spec.use_gpu}
    if spec.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": spec.use_gpu}
    if spec.zero_stage == 3:
        # SD's UNet is small for ZeRO-3; prefetching whole blocks keeps it from being latency-bound.
        zero.update({"stage3_prefetch_bucket_size": 5e7, "stage3_param_persistence_threshold": 1e5})
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": spec.batch_size,
        "gradient_accumulation_steps": spec.gradient_accumulation_steps,
        "train_batch_size": spec.batch_size * spec.gradient_accumulation_steps * world_size,
        "gradient_clipping": spec.max_grad_norm,
        "zero_optimization": zero,
        "fp16": {"enabled": spec.precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        "bf16": {"enabled": spec.precision == "bf16"},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        # DeepSpeed's throughput timer (on by default, never printed here) synchronizes the device at every
        # forward's start and step's end: the host could not queue the next step while the GPU finished this one.
        "timers": {"throughput": {"enabled": False}},
    }
    if spec.offload_optimizer:
        # ZeRO-Offload wants DeepSpeed's own CPU Adam (a JIT-compiled op, ~1 min the first time).
        config["optimizer"] = {"type": "AdamW", "params": _adamw_params(spec)}
    return config


def _adamw_params(spec: JobSpec) -> dict[str, Any]:
    return {
        "lr": spec.learning_rate,
        "betas": (0.9, 0.999),
        "eps": 1e-8,
        "weight_decay": spec.adam_weight_decay,
    }


def lr_scheduler(spec: JobSpec, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
    """diffusers' schedule the spec names, over max_steps, after lr_warmup_steps of linear warm-up."""
    from diffusers.optimization import get_scheduler

    # diffusers' "constant" ignores num_warmup_steps; its warm-up variant is another name.
    name = "constant_with_warmup" if spec.lr_schedule == "constant" and spec.lr_warmup_steps else spec.lr_schedule
    return get_scheduler(name, optimizer, num_warmup_steps=spec.lr_warmup_steps, num_training_steps=spec.max_steps)


def initialize(model: torch.nn.Module, spec: JobSpec, world_size: int):
    """Build the DeepSpeed engine: ZeRO-partitioned AdamW and diffusers' LR schedule, stepped by DeepSpeed
    at gradient-accumulation boundaries and saved in its checkpoints."""
    import deepspeed

    from trainer import deepspeed_syncs

    deepspeed_syncs.install()
    load_ops(spec)
    config = deepspeed_config(spec, world_size)
    optimizer = None
    if "optimizer" not in config:
        # torch's AdamW needs no JIT compile; its fused CUDA kernel is as fast as DeepSpeed's FusedAdam.
        def optimizer(params):
            return torch.optim.AdamW(params, fused=spec.use_gpu, **_adamw_params(spec))

    # DeepSpeed casts the module to fp16/bf16 and then builds its fp32 master weights from that cast: the masters,
    # hence every update and the export, would start from the base model rounded to 16 bits (bf16: up to 0.4 % of
    # each weight, on average as much change as ten AdamW steps at DreamBooth's lr of 5e-6, measured on the tiny
    # model). They get the full-precision weights back below.
    trained = [parameter for parameter in model.parameters() if parameter.requires_grad]
    full_precision = [p.detach().to("cpu", copy=True) for p in trained] if spec.precision != "fp32" else None
    engine, *_ = deepspeed.initialize(
        model=model,
        model_parameters=optimizer_groups(model),
        optimizer=optimizer,
        lr_scheduler=functools.partial(lr_scheduler, spec),
        config=config,
    )
    if full_precision is not None:
        for parameter, value in zip(trained, full_precision, strict=True):
            set_fp32_master(engine, parameter, value)
    return engine


def load_ops(spec: JobSpec) -> None:
    """Loads the ops DeepSpeed JIT-compiles for `spec` (its CPU communication op on CPUs, its CPU Adam for ZeRO-Offload;
    DeepSpeed then uses them as loaded), one process of the machine at a time (`_building`)."""
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    names = ([] if spec.use_gpu else ["ShareMemCommBuilder"]) + (["CPUAdamBuilder"] if spec.offload_optimizer else [])
    for name in names:
        builder = get_accelerator().create_op_builder(name)
        if builder is None or not deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
            continue  # DeepSpeed goes without it too
        with _building(builder.name):
            builder.load()


@contextlib.contextmanager
def _building(name: str) -> Iterator[None]:
    """Holds the machine's lock on building the op `name`, one the kernel releases when its holder dies. torch's own
    lock is a file its builder deletes when done: one killed mid-build (a cancelled job, Ctrl-C, a worker group Ray
    restarted; a first build takes minutes) left it, and every later load of the op, in every job, waited for it
    forever. Held here, torch's file is a dead process's: removed. (A process of another program building the same op
    at the same moment would lose its lock; none of this project's does.)"""
    from torch.utils.cpp_extension import _get_build_directory

    directory = Path(_get_build_directory(name, verbose=False))
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / "dreambooth-build.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        left = directory / "lock"
        if left.exists():
            log.warning("%s: removing the lock a killed build of DeepSpeed's %s op left", left, name)
            left.unlink(missing_ok=True)
        yield


def set_fp32_master(engine, parameter: torch.nn.Parameter, value: torch.Tensor) -> None:
    """Write `value` (the whole parameter, fp32) into this rank's part of the optimizer's fp32 master weights."""
    from deepspeed.utils import safe_set_full_fp32_param

    if not hasattr(parameter, "ds_id"):  # ZeRO-2: DeepSpeed's own setter
        safe_set_full_fp32_param(parameter, value)
        return
    # ZeRO-3: DeepSpeed's setter reads past the value's end on a rank whose partition is padded (the last one,
    # when the rank count does not divide the parameter's size); this rank's slice of it, padding left as it is.
    optimizer = engine.optimizer
    partition, _ = optimizer._get_fp32_opt_state_partition(parameter, release_swap_buffers=False)
    start = optimizer._get_param_partition_rank(parameter) * partition.numel()
    part = value.flatten()[start : start + partition.numel()]
    partition.data[: part.numel()].copy_(part)


def optimizer_groups(model: torch.nn.Module, max_group_size: int = SPLIT_ABOVE) -> list[dict[str, Any]]:
    """The trained parameters as optimizer groups: flat parameters (trainer/flat_parameters.py) packed in order
    into groups of at most `max_group_size` elements (a larger one alone), any others in one group.

    ZeRO-2's step works group by group: it copies a group's gradients into one fp32 tensor (through an fp16
    concatenation), steps the group and frees the copies. With all parameters in one group that is 6 bytes
    per parameter at once (5.5 GiB for SD 1.5's UNet + text encoder, on top of the 16 bytes per parameter of
    model states); groups bound it by their size. Not one group per flat parameter: each group costs the step
    some Python and a few kernel launches.
    """
    packed: list[list[torch.nn.Parameter]] = []
    other, size = [], 0
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        if name.rpartition(".")[2] != FLAT:
            other.append(parameter)
        elif packed and size + parameter.numel() <= max_group_size:
            packed[-1].append(parameter)
            size += parameter.numel()
        else:
            packed.append([parameter])
            size = parameter.numel()
    return [{"params": params} for params in packed] + ([{"params": other}] if other else [])


def compute_dtype(spec: JobSpec) -> torch.dtype:
    return {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[spec.precision]
