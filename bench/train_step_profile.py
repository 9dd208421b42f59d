"""Where a training step's time goes: the trainer's DeepSpeed engine, step by phase, under a few ZeRO settings.

One process, no Ray: the engine is built as the trainer builds it (`trainer.deepspeed_setup.initialize` over
`trainer.model.DreamBoothModel`, UNet trained, text encoder frozen), fed fixed latents and prompt embeddings
(batch 1 instance + 1 class sample), and timed per phase (forward, backward, optimizer step; synchronised
after each, so the phases add up to more than an unsynchronised step) and per whole step (synchronised only
at the end of the timed steps). Variants change one setting at a time; the first is the
trainer's (flat parameters under ZeRO-2: trainer/flat_parameters.py), the second what it did before.

    python bench/train_step_profile.py --model sd15            # GPU
    .venv/bin/python bench/train_step_profile.py --model tiny --precision bf16 --steps 10
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# One process is the whole torch.distributed world, on loopback.
os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
os.environ.setdefault("MASTER_PORT", "29517")
os.environ.setdefault("RANK", "0")
os.environ.setdefault("LOCAL_RANK", "0")
os.environ.setdefault("WORLD_SIZE", "1")

import argparse
import copy
import gc
import itertools
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dreambooth.sd_model import load_base_model
from dreambooth.tiny_model import CLIP_BPE_ENV, build_random_sd15_model, build_tiny_model
from trainer import deepspeed_setup
from trainer.model import DreamBoothModel, prior_preservation_loss
from trainer.spec import JobSpec
from trainer.storage import job_paths
from trainer.train_loop import trained_model

BUILDERS = {"tiny": build_tiny_model, "sd15": build_random_sd15_model}
RESOLUTION = {"tiny": 64, "sd15": 512}

# name -> (spec changes, ZeRO config changes, networks prepared as the trainer prepares them)
VARIANTS: dict[str, tuple[dict, dict, bool]] = {
    "trainer's config": ({}, {}, True),
    "per-tensor parameters": ({}, {}, False),
    "per-tensor, overlap_comm + contiguous_gradients off": (
        {},
        {"overlap_comm": False, "contiguous_gradients": False},
        False,
    ),
    "bf16": ({"precision": "bf16"}, {}, True),
}


def build_engine(spec: JobSpec, zero_changes: dict, as_trainer: bool, model_dir: Path, device: torch.device):
    unet = load_base_model(model_dir, dtype=torch.float32, device=device, components=("unet",)).unet
    if as_trainer:  # flat parameters under ZeRO-2 (and whatever else the trainer does to the networks)
        model = trained_model(spec, job_paths(tempfile.gettempdir(), "train-step-profile"), unet, None)
    else:
        model = DreamBoothModel(unet.train())
    trainer_config = deepspeed_setup.deepspeed_config

    def config(spec_, world_size):
        result = copy.deepcopy(trainer_config(spec_, world_size))
        result["zero_optimization"].update(zero_changes)
        return result

    deepspeed_setup.deepspeed_config = config
    try:
        return deepspeed_setup.initialize(model, spec, world_size=1)
    finally:
        deepspeed_setup.deepspeed_config = trainer_config


def run_variant(name: str, spec: JobSpec, zero_changes: dict, as_trainer: bool, args, model_dir: Path, device) -> dict:
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    engine = build_engine(spec, zero_changes, as_trainer, model_dir, device)
    init_s = time.perf_counter() - t0
    dtype = deepspeed_setup.compute_dtype(spec)
    generator = torch.Generator(device).manual_seed(0)
    side = args.resolution // 8
    latents = torch.randn(2, 4, side, side, generator=generator, device=device).to(dtype)
    states = torch.randn(2, 77, args.context_dim, generator=generator, device=device).to(dtype)
    target = torch.randn(2, 4, side, side, generator=generator, device=device)
    timesteps = torch.tensor([500, 250], device=device)

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def step(phases: dict[str, list[float]] | None) -> None:
        marks = [time.perf_counter()]
        pred = engine(latents, timesteps, encoder_hidden_states=states)
        loss, _, _ = prior_preservation_loss(pred, target, 1, 1.0)
        if phases is not None:
            sync()
            marks.append(time.perf_counter())
        engine.backward(loss)
        if phases is not None:
            sync()
            marks.append(time.perf_counter())
        engine.step()
        if phases is not None:
            sync()
            marks.append(time.perf_counter())
            for phase, (a, b) in zip(("forward", "backward", "optimizer"), itertools.pairwise(marks), strict=True):
                phases[phase].append(1000 * (b - a))

    for _ in range(args.warmup):
        step(None)
    sync()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step(None)
    sync()
    step_ms = 1000 * (time.perf_counter() - t0) / args.steps
    phases: dict[str, list[float]] = {"forward": [], "backward": [], "optimizer": []}
    for _ in range(args.steps):
        step(phases)

    profile = None
    if args.profile and name in list(VARIANTS)[:2]:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with torch_profile(activities=activities) as prof:
            for _ in range(3):
                step(None)
            sync()
        averages = prof.key_averages()
        profile = averages.table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60)
        if cuda:
            profile += "\n" + averages.table(sort_by="self_cuda_time_total", row_limit=15, max_name_column_width=60)
    row = {
        "variant": name,
        "init_s": init_s,
        "step_ms": step_ms,
        **{f"{phase}_ms": statistics.median(values) for phase, values in phases.items()},
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "profile": profile,
    }
    return row


def main(argv: list[str] | None = None) -> int:
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=sorted(BUILDERS), default="sd15" if cuda else "tiny")
    parser.add_argument("--precision", choices=("fp16", "bf16", "fp32"), default="fp16" if cuda else "bf16")
    parser.add_argument("--steps", type=int, default=15, help="timed steps per measurement")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--variants", help=f"comma-separated subset of: {', '.join(VARIANTS)}")
    parser.add_argument("--profile", action="store_true", help="torch.profiler tables of the trainer's config")
    parser.add_argument("--clip-bpe", help=f"CLIP's vocabulary file where open_clip_torch is missing (${CLIP_BPE_ENV})")
    args = parser.parse_args(argv)
    if args.clip_bpe:
        os.environ[CLIP_BPE_ENV] = str(Path(args.clip_bpe).resolve())
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if cuda else "cpu")
    device = torch.device("cuda" if cuda else "cpu")
    model_dir = BUILDERS[args.model](Path(f"~/.cache/dreambooth-cluster/models/{args.model}").expanduser())
    args.resolution = RESOLUTION[args.model]
    args.context_dim = load_base_model(model_dir, components=("unet",)).unet.config.cross_attention_dim

    import deepspeed

    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
    names = args.variants.split(",") if args.variants else list(VARIANTS)
    rows = []
    for name in names:
        spec_changes, zero_changes, as_trainer = VARIANTS[name]
        spec = JobSpec(
            base_model=str(model_dir),
            instance_images=["unused"],
            instance_prompt="a photo of sks dog",
            class_prompt="a photo of dog",
            resolution=args.resolution,
            precision=args.precision,
            gpus_per_worker=1.0 if cuda else 0.0,
            max_steps=10_000,
        )
        for key, value in spec_changes.items():
            setattr(spec, key, value)
        rows.append(run_variant(name, spec, zero_changes, as_trainer, args, model_dir, device))
        gc.collect()  # the variant's engine, before the next one is built
        if cuda:
            torch.cuda.empty_cache()
        r = rows[-1]
        print(f"{name}: step {r['step_ms']:.1f} ms, init {r['init_s']:.1f} s", flush=True)

    where = torch.cuda.get_device_name(0) if cuda else "CPU"
    print(f"\n{where} | {args.model} {args.resolution} px | {args.precision} base | ZeRO-2, 1 process")
    print("| variant | step ms | steps/s | forward ms | backward ms | optimizer step ms | peak GiB | init s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        peak = f"{r['peak_gib']:.2f}" if r["peak_gib"] is not None else "-"
        print(
            f"| {r['variant']} | {r['step_ms']:.1f} | {1000 / r['step_ms']:.2f} | {r['forward_ms']:.1f} | "
            f"{r['backward_ms']:.1f} | {r['optimizer_ms']:.1f} | {peak} | {r['init_s']:.1f} |"
        )
    for r in rows:
        if r["profile"]:
            print(f"\n{r['variant']}:\n{r['profile']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
