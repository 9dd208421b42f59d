"""DeepSpeed ZeRO configuration and engine construction from a JobSpec."""

from __future__ import annotations

from typing import Any

import torch

from trainer.spec import JobSpec


def deepspeed_config(spec: JobSpec, world_size: int) -> dict[str, Any]:
    zero: dict[str, Any] = {
        "stage": spec.zero_stage,
        "overlap_comm": True,
        "contiguous_gradients": True,
        "reduce_bucket_size": 5e8,
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


def initialize(model: torch.nn.Module, spec: JobSpec, world_size: int):
    """Build the DeepSpeed engine: ZeRO-partitioned AdamW and diffusers' LR schedule, stepped by DeepSpeed
    at gradient-accumulation boundaries and saved in its checkpoints."""
    import deepspeed
    from diffusers.optimization import get_scheduler

    config = deepspeed_config(spec, world_size)
    optimizer = None
    if "optimizer" not in config:
        # torch's AdamW needs no JIT compile; its fused CUDA kernel is as fast as DeepSpeed's FusedAdam.
        def optimizer(params):
            return torch.optim.AdamW(params, fused=spec.use_gpu, **_adamw_params(spec))

    def lr_scheduler(opt):
        return get_scheduler(
            spec.lr_schedule, opt, num_warmup_steps=spec.lr_warmup_steps, num_training_steps=spec.max_steps
        )

    engine, *_ = deepspeed.initialize(
        model=model,
        model_parameters=[p for p in model.parameters() if p.requires_grad],
        optimizer=optimizer,
        lr_scheduler=lr_scheduler,
        config=config,
    )
    return engine


def compute_dtype(spec: JobSpec) -> torch.dtype:
    return {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[spec.precision]
