"""Where a training step's time and memory go: the trainer's DeepSpeed engine, step by phase, under a few settings.

One process, no Ray: the engine is built as the trainer builds it (`trainer.deepspeed_setup.initialize` over
`trainer.model.DreamBoothModel`, UNet trained, text encoder frozen or, with --train-text-encoder, trained), fed
fixed latents and prompts (batch 1 instance + 1 class sample), and timed per phase (forward, backward, optimizer
step; synchronised after each, so the phases add up to more than an unsynchronised step) and per whole step
(synchronised only at the end of the timed steps), after a timed warm-up (where torch.compile compiles; in fp16 it
goes on until 3 steps in a row were not skipped for an overflow, and the timed steps' skips are counted). Peak
memory is over the engine's build and the steps, above what was there before the variant: CUDA's allocator peaks
(allocated and reserved) on a GPU, the process's peak RSS on a CPU (sampled every millisecond; tensors this large
are mmap'ed, so their memory comes and goes with them). Each variant prints its line as it ends, and an interrupt
(device_run.sh's deadline) prints the table of those that ended. Variants change one thing at a time; the first is
the trainer's config. The variants "plain PyTorch step" (eager and compiled) are the baseline on the same inputs:
diffusers' train_dreambooth.py's step without DeepSpeed (PlainStep). torch.compile's cache is a fresh directory per
run, removed after: the run's first compiled variant compiles from nothing, and the table says which later ones
found what earlier variants of the run compiled.

    python bench/train_step_profile.py --model sd15            # GPU
    .venv/bin/python bench/train_step_profile.py --model tiny --precision bf16 --steps 10
    .venv/bin/python bench/train_step_profile.py --model sd15-narrow --train-text-encoder --steps 3 --warmup 1 \
        --variants "trainer's config,before: whole blocks in one optimizer group + 5e8 buckets"  # CPU memory
    .venv/bin/python bench/train_step_profile.py --model sd15-layout --precision fp32  # CPU: the host's work
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
import contextlib
import copy
import functools
import gc
import itertools
import json
import shutil
import statistics
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import rss_bytes, syncs_per_call
from dreambooth.sd_model import load_base_model
from dreambooth.tiny_model import CLIP_BPE_ENV, RANDOM_MODELS, build_random_sd15_model
from trainer import deepspeed_setup, train_loop
from trainer.model import DreamBoothModel, prior_preservation_loss
from trainer.spec import JobSpec
from trainer.storage import job_paths

BUILDERS = {
    **RANDOM_MODELS,
    # SD 1.5's layout at half the UNet's width (215M parameters; text encoder and VAE as SD 1.5's): ZeRO's
    # buffers at a size that dominates a CPU process's memory, within a small machine's RAM.
    "sd15-narrow": functools.partial(build_random_sd15_model, unet_channels=(160, 320, 640, 640)),
    # SD 1.5's layout at a tenth to a twentieth of the UNet's width (its modules, tensors and ops, next to no
    # arithmetic): on a CPU a step's time is then the host's work, the dispatcher and Python, that a launch-bound GPU
    # step pays too.
    "sd15-layout": functools.partial(build_random_sd15_model, unet_channels=(32, 32, 64, 64)),
}
RESOLUTION = {"tiny": 64, "sd15": 512, "sd15-narrow": 64, "sd15-layout": 64}


@dataclass(frozen=True)
class Variant:
    spec: dict = field(default_factory=dict)  # JobSpec fields changed
    zero: dict = field(default_factory=dict)  # ZeRO config entries changed
    config: dict = field(default_factory=dict)  # top-level DeepSpeed config entries changed
    as_trainer: bool = True  # networks prepared by trainer.train_loop.trained_model (flat parameters, ...)
    split_above: int | None = None  # flat parameters' block split threshold, if not the trainer's
    one_optimizer_group: bool = False  # all trained parameters in one optimizer group
    max_group_size: int | None = None  # optimizer groups' size bound in parameters, if not the trainer's (64M)
    sync_free_clipping: bool = True  # trainer.deepspeed_syncs installed (DeepSpeed's own functions otherwise)
    plain: bool = False  # no DeepSpeed: PlainStep over the networks as diffusers trains them (per-tensor parameters)


VARIANTS: dict[str, Variant] = {
    "trainer's config": Variant(),
    # The trainer before its memory changes: ZeRO-2's step copied the whole model's gradients to fp32 at once.
    "before: whole blocks in one optimizer group + 5e8 buckets": Variant(
        zero={"reduce_bucket_size": 5e8}, split_above=2**62, one_optimizer_group=True
    ),
    # The trainer before session 16 on one GPU: DeepSpeed's throughput timer on, and overlap_comm (each a device
    # sync a micro-step; under ZeRO-3 overlap_comm also puts the parameter fetches on a stream of their own).
    "before: DeepSpeed's timer + overlap_comm": Variant(
        zero={"overlap_comm": True}, config={"timers": {"throughput": {"enabled": True}}}
    ),
    # The trainer before session 17 on one GPU: DeepSpeed's gradient clipping with its three host syncs per optimizer
    # group (trainer/deepspeed_syncs.py), and its reduce-scatter bookkeeping per bucket.
    "before: DeepSpeed's clipping syncs + reduce_scatter": Variant(
        zero={"reduce_scatter": True}, sync_free_clipping=False
    ),
    "gradient checkpointing": Variant(spec={"gradient_checkpointing": True}),
    "per-tensor parameters": Variant(as_trainer=False),
    # overlap_comm is off in the trainer's config on one GPU under ZeRO-2 (since session 16): contiguous_gradients
    # is what this variant changes there.
    "per-tensor without overlap_comm + contiguous_gradients": Variant(
        zero={"overlap_comm": False, "contiguous_gradients": False}, as_trainer=False
    ),
    "bf16": Variant(spec={"precision": "bf16"}),
    # The trainer's torch_compile: its first (warm-up) step compiles, minutes for SD 1.5, and records the compiled
    # forward and backward as CUDA graphs, replayed with one launch each instead of hundreds (its cuda_graphs; on a
    # CPU it compiles as without); the phases show what compiling leaves to DeepSpeed's hooks and optimizer step.
    "torch.compile": Variant(spec={"torch_compile": True}),
    # The compiled kernels launched one by one (the trainer's torch_compile before session 21: on an H200 no faster
    # than eager, 146.4 against 145.7 ms).
    "torch.compile without CUDA graphs": Variant(spec={"torch_compile": True, "cuda_graphs": False}),
    # The compiled step's next lever (H200, session 21: 28 of its 74 ms): DeepSpeed's optimizer step, group by group
    # (SD 1.5's UNet: 17 groups of at most 64M parameters). Fewer, larger groups: fewer launches and host work, a
    # larger fp32 copy of one group's gradients at a time (6 B a parameter: 1.5 GiB at 256M).
    "torch.compile with optimizer groups of 256M": Variant(spec={"torch_compile": True}, max_group_size=2**28),
    # Full fine-tuning (--train-text-encoder) within the memory target, compiled: what CUDA graphs' pool adds to it.
    "torch.compile + gradient checkpointing": Variant(spec={"torch_compile": True, "gradient_checkpointing": True}),
    # The obvious baseline, on the same inputs: what diffusers' examples/dreambooth/train_dreambooth.py runs a step,
    # with the latents and prompt states precomputed as here, without DeepSpeed.
    "plain PyTorch step": Variant(plain=True),
    # The same compiled as the trainer's torch_compile compiles (CUDA graphs on a GPU): the compiled engine's baseline.
    "plain PyTorch step + torch.compile": Variant(spec={"torch_compile": True}, plain=True),
}


# --profile: the trainer's step, the per-tensor one it replaced (what the H100 profile diagnosed), and the one before
# the clipping syncs went (session 17's H100 profile: 53 cudaStreamSynchronize a step).
PROFILED = ("trainer's config", "per-tensor parameters", "before: DeepSpeed's clipping syncs + reduce_scatter")


@contextlib.contextmanager
def deepspeed_clipping(variant: Variant):
    """DeepSpeed's own clipping functions while a variant that asks for them builds and runs its engine."""
    if variant.sync_free_clipping:
        yield
        return
    from deepspeed.runtime.zero import stage_1_and_2

    from trainer import deepspeed_syncs

    optimizer_class = stage_1_and_2.DeepSpeedZeroOptimizer
    with (
        replaced(deepspeed_syncs, "install", lambda: False),
        replaced(stage_1_and_2, "mask_nan_or_inf_with_val_inplace", deepspeed_syncs.ORIGINAL_MASK),
        replaced(optimizer_class, "unscale_and_clip_grads", deepspeed_syncs.ORIGINAL_UNSCALE_AND_CLIP),
    ):
        yield


@contextlib.contextmanager
def replaced(owner, name: str, value):
    original = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, original)


class PlainStep:
    """diffusers' train_dreambooth.py's step with the engine's interface (call, backward, step, skipped_steps,
    optimizer, destroy): the trained networks' fp32 weights under autocast (fp16: with a GradScaler),
    torch.optim.AdamW as diffusers sets it up, gradients unscaled, clipped to norm 1 and set to None after the step,
    the loss read back every step (diffusers logs it), no DeepSpeed."""

    def __init__(self, model: DreamBoothModel, spec: JobSpec, device: torch.device):
        self.model = model
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=spec.learning_rate, betas=(0.9, 0.999), weight_decay=1e-2)
        self.scaler = torch.amp.GradScaler(device.type, enabled=spec.precision == "fp16")
        self.autocast = functools.partial(
            torch.autocast, device.type, dtype=deepspeed_setup.compute_dtype(spec), enabled=spec.precision != "fp32"
        )
        self.steps = 0
        self.loss: torch.Tensor | None = None

    def __call__(self, *inputs, **prompt) -> torch.Tensor:
        with self.autocast():
            return self.model(*inputs, **prompt)

    def backward(self, loss: torch.Tensor) -> None:
        self.loss = loss
        self.scaler.scale(loss).backward()

    def step(self) -> None:
        self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        # diffusers' --set_grads_to_none. Its default, gradients zeroed in place, would keep the first step's alive
        # across steps, where the compiled variant's CUDA graph replays overwrite them (pytorch/pytorch#169545).
        self.optimizer.zero_grad(set_to_none=True)
        self.loss.item()  # diffusers logs the loss every step: a host sync
        self.steps += 1

    @property
    def skipped_steps(self) -> int:
        """The steps GradScaler skipped for an overflow: AdamW counts those it took, on the host (no sync)."""
        state = self.optimizer.state.get(self.params[0])
        return self.steps - (int(state["step"]) if state else 0)

    def destroy(self) -> None:
        del self.model, self.params, self.optimizer, self.loss


def build_engine(spec: JobSpec, variant: Variant, model_dir: Path, device: torch.device, storage: Path):
    components = ("unet", "text_encoder") if spec.train_text_encoder else ("unet",)
    networks = load_base_model(model_dir, dtype=torch.float32, device=device, components=components)
    unet, text_encoder = networks.unet, networks.text_encoder if spec.train_text_encoder else None
    trainer_config = deepspeed_setup.deepspeed_config

    def config(spec_, world_size):
        result = copy.deepcopy(trainer_config(spec_, world_size))
        result["zero_optimization"].update(variant.zero)
        result.update(variant.config)
        return result

    with contextlib.ExitStack() as changes:
        changes.enter_context(replaced(deepspeed_setup, "deepspeed_config", config))
        if variant.split_above is not None:
            flatten = functools.partial(train_loop.flatten_parameters, split_above=variant.split_above)
            changes.enter_context(replaced(train_loop, "flatten_parameters", flatten))
        if variant.max_group_size is not None:
            groups = functools.partial(deepspeed_setup.optimizer_groups, max_group_size=variant.max_group_size)
            changes.enter_context(replaced(deepspeed_setup, "optimizer_groups", groups))
        if variant.one_optimizer_group:
            one_group = lambda model: [p for p in model.parameters() if p.requires_grad]  # noqa: E731
            changes.enter_context(replaced(deepspeed_setup, "optimizer_groups", one_group))
        if variant.plain:  # prepared as the trainer prepares its networks (checkpointing, compiling), but per tensor
            changes.enter_context(replaced(train_loop, "flatten_parameters", lambda network: None))
        if variant.as_trainer:
            # The compile cache is the run's own (`storage`): what earlier runs compiled does not shorten a warm-up.
            model = train_loop.trained_model(spec, job_paths(storage, "train-step-profile"), unet, text_encoder)
        else:
            model = DreamBoothModel(unet.train(), text_encoder.train() if text_encoder is not None else None)
        if variant.plain:
            return PlainStep(model, spec, device)
        return deepspeed_setup.initialize(model, spec, world_size=1)


class PeakRSS:
    """The process's peak resident memory while running, above what it was at the start (CPU runs)."""

    def __init__(self, interval_s: float = 0.001):
        self.interval_s = interval_s
        self.start = self.peak = rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.peak = max(self.peak, rss_bytes())

    def stop(self) -> float:
        """GiB above the start."""
        self._stop.set()
        self._thread.join()
        return (max(self.peak, rss_bytes()) - self.start) / 2**30


# fp16: DeepSpeed's loss scale starts at 2^16 and each overflow skips its step (no optimizer work, no fp32 gradient
# copy: a fast, small step that would flatter a variant), so an fp16 warm-up goes on until this many steps in a row
# were not skipped, for at most WARMUP_EXTRA_STEPS steps past --warmup (the timed steps' skips are counted anyway).
UNSKIPPED_IN_A_ROW = 3
WARMUP_EXTRA_STEPS = 30


def run_variant(name: str, spec: JobSpec, variant: Variant, args, model_dir: Path, device) -> dict:
    cuda = device.type == "cuda"
    rss = None if cuda else PeakRSS()
    # What an earlier variant left allocated or reserved (nothing, if its engine was destroyed) is not this one's.
    before = torch.cuda.memory_allocated() if cuda else 0
    reserved_before = torch.cuda.memory_reserved() if cuda else 0
    if cuda:  # the peaks include the engine's build, where DeepSpeed holds copies while it flattens
        torch.cuda.reset_peak_memory_stats()
    counts_before = train_loop.compile_counts(spec)  # the trainer's compiled event's counts
    t0 = time.perf_counter()
    try:
        engine = build_engine(spec, variant, model_dir, device, args.storage)
    except BaseException:
        if rss is not None:  # as below: its sampling thread would skew the next variants' CPU times
            rss.stop()
        raise
    init_s = time.perf_counter() - t0
    # Without destroy() a ZeRO engine outlives its last reference (its gradient hooks hold it): the next variant
    # would be measured on top of this one's ~14 B per parameter (an H100 run showed 28.9 against 17.7 GiB), so it
    # goes whether this variant ends, fails mid-step or is interrupted.
    try:
        engine_gib = (torch.cuda.memory_allocated() - before) / 2**30 if cuda else (rss_bytes() - rss.start) / 2**30
        dtype = deepspeed_setup.compute_dtype(spec)
        generator = torch.Generator(device).manual_seed(0)
        side = args.resolution // 8
        latents = torch.randn(2, 4, side, side, generator=generator, device=device).to(dtype)
        target = torch.randn(2, 4, side, side, generator=generator, device=device)
        timesteps = torch.tensor([500, 250], device=device)
        if spec.train_text_encoder:
            prompt = {"input_ids": torch.randint(0, 49408, (2, 77), generator=generator, device=device)}
        else:
            hidden = torch.randn(2, 77, args.context_dim, generator=generator, device=device)
            prompt = {"encoder_hidden_states": hidden.to(dtype)}

        def sync():
            if cuda:
                torch.cuda.synchronize()

        def step(phases: dict[str, list[float]] | None) -> None:
            marks = [time.perf_counter()]
            pred = engine(latents, timesteps, **prompt)
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

        # Where torch.compile compiles and CUDA graph trees record: minutes for SD 1.5, none of it in the steps below.
        unskipped_needed = UNSKIPPED_IN_A_ROW if spec.precision == "fp16" else 0
        warmup_steps = unskipped = 0
        skipped_before = engine.skipped_steps  # DeepSpeed reads the overflow back on the host: no sync of ours
        t0 = time.perf_counter()
        while warmup_steps < args.warmup or (
            unskipped < unskipped_needed and warmup_steps < args.warmup + WARMUP_EXTRA_STEPS
        ):
            skipped = engine.skipped_steps
            step(None)
            warmup_steps += 1
            unskipped = 0 if engine.skipped_steps > skipped else unskipped + 1
        sync()
        warmup_s = time.perf_counter() - t0
        warmup_skipped = engine.skipped_steps - skipped_before

        skipped_before = engine.skipped_steps
        t0 = time.perf_counter()
        for _ in range(args.steps):
            step(None)
        sync()
        step_ms = 1000 * (time.perf_counter() - t0) / args.steps
        timed_skipped = engine.skipped_steps - skipped_before
        phases: dict[str, list[float]] = {"forward": [], "backward": [], "optimizer": []}
        skipped_before = engine.skipped_steps
        for _ in range(args.steps):
            step(phases)
        phases_skipped = engine.skipped_steps - skipped_before

        # The host-device syncs of a step (CUDA's count; the H100 profile of session 17 found 53 before
        # deepspeed_syncs).
        syncs = syncs_per_call(lambda: step(None)) if cuda else None

        profile = None
        if args.profile and name in PROFILED:
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
        counts = train_loop.compile_counts(spec)
        return {
            "variant": name,
            "init_s": init_s,
            "warmup_s": warmup_s,
            "warmup_steps": warmup_steps,
            "warmup_skipped": warmup_skipped,
            "step_ms": step_ms,
            **{f"{phase}_ms": statistics.median(values) for phase, values in phases.items()},
            "engine_gib": engine_gib,
            "peak_gib": (torch.cuda.max_memory_allocated() - before) / 2**30 if cuda else rss.stop(),
            # What the caching allocator held at its peak (what the GPU must have, beside the CUDA context).
            "reserved_gib": (torch.cuda.max_memory_reserved() - reserved_before) / 2**30 if cuda else None,
            "timed_skipped": timed_skipped,
            "phases_skipped": phases_skipped,
            "syncs": syncs,
            # Over the whole variant, its warm-up's compiles and any recompile in the measured steps.
            **{key: counts[key] - counts_before[key] for key in ("graphs", "cudagraph_skips")},
            "optimizer_groups": len(engine.optimizer.param_groups),
            "profile": profile,
        }
    finally:
        engine.destroy()
        if rss is not None:  # its sampling thread would go on through the next variants if this one failed
            rss.stop()


def variant_line(r: dict, cuda: bool) -> str:
    """A variant's figures as soon as it ends: a run cut short keeps them in its log."""
    syncs = f", {r['syncs']:.0f} host-device syncs a step" if r["syncs"] is not None else ""
    cache = f", compile cache {r['compile_cache']}" if r["compile_cache"] else ""
    memory = (
        f"peak {r['peak_gib']:.2f} GiB, peak reserved {r['reserved_gib']:.2f} GiB above before, "
        f"{torch.cuda.memory_allocated() / 2**30:.2f} GiB still allocated after it"
        if cuda
        else f"peak {r['peak_gib']:.2f} GiB"
    )
    return (
        f"{r['variant']}: step {r['step_ms']:.1f} ms (forward {r['forward_ms']:.1f}, backward {r['backward_ms']:.1f}, "
        f"optimizer step {r['optimizer_ms']:.1f}), skipped (fp16 overflow) {r['timed_skipped']} of the timed steps, "
        f"{r['phases_skipped']} of the phase steps{syncs}, warm-up {r['warmup_s']:.1f} s ({r['warmup_steps']} steps, "
        f"{r['warmup_skipped']} skipped{cache}), {r['graphs']} graphs compiled, "
        f"{r['cudagraph_skips']} CUDA graph skips, {memory}, init {r['init_s']:.1f} s"
    )


def main(argv: list[str] | None = None) -> int:
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=sorted(BUILDERS), default="sd15" if cuda else "tiny")
    parser.add_argument("--precision", choices=("fp16", "bf16", "fp32"), default="fp16" if cuda else "bf16")
    parser.add_argument("--steps", type=int, default=15, help="timed steps per measurement")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--variants", help=f"comma-separated subset of: {', '.join(VARIANTS)}")
    parser.add_argument("--train-text-encoder", action="store_true", help="the text encoder trains too")
    parser.add_argument("--resolution", type=int, help="pixels (default: 512 sd15, else 64)")
    parser.add_argument("--profile", action="store_true", help="torch.profiler tables of: " + ", ".join(PROFILED))
    parser.add_argument("--clip-bpe", help=f"CLIP's vocabulary file where open_clip_torch is missing (${CLIP_BPE_ENV})")
    args = parser.parse_args(argv)
    if args.clip_bpe:
        os.environ[CLIP_BPE_ENV] = str(Path(args.clip_bpe).resolve())
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if cuda else "cpu")
    device = torch.device("cuda" if cuda else "cpu")
    model_dir = BUILDERS[args.model](Path(f"~/.cache/dreambooth-cluster/models/{args.model}").expanduser())
    args.resolution = args.resolution or RESOLUTION[args.model]
    # From the config: loading the UNet (3.4 GB at SD-1.5 size) for one number took seconds of scarce GPU time.
    args.context_dim = json.loads((model_dir / "unet" / "config.json").read_text())["cross_attention_dim"]

    import deepspeed

    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
    names = args.variants.split(",") if args.variants else list(VARIANTS)
    # This run's compile cache, whatever earlier runs left in the trainer's (the storage's) or torch's default one.
    args.storage = Path(tempfile.mkdtemp(prefix="train-step-profile-"))
    rows = []
    compiled = 0  # variants of this run that compiled before the next: their code is cached, on disk and in memory
    try:
        for name in names:
            variant = VARIANTS[name]
            spec = JobSpec(
                base_model=str(model_dir),
                instance_images=["unused"],
                instance_prompt="a photo of sks dog",
                class_prompt="a photo of dog",
                resolution=args.resolution,
                precision=args.precision,
                gpus_per_worker=1.0 if cuda else 0.0,
                max_steps=10_000,
                train_text_encoder=args.train_text_encoder,
            )
            for key, value in variant.spec.items():
                setattr(spec, key, value)
            cache = None
            if spec.torch_compile:
                cache = f"after {compiled} compiled variant{'s' if compiled > 1 else ''}" if compiled else "empty"
                compiled += 1
            try:
                with deepspeed_clipping(variant):
                    rows.append({**run_variant(name, spec, variant, args, model_dir, device), "compile_cache": cache})
            except Exception:  # one variant's failure (a compile mode untried on this GPU) keeps the others' rows
                traceback.print_exc()
                print(f"{name}: failed", flush=True)
                continue
            finally:
                gc.collect()  # the variant's engine, before the next one is built
                if cuda:
                    torch.cuda.empty_cache()
            print(variant_line(rows[-1], cuda), flush=True)
    except KeyboardInterrupt:  # device_run.sh's deadline (timeout --signal=INT): the finished variants' table still
        print(f"cut short (interrupted) after {len(rows)} of {len(names)} variants", flush=True)
    finally:
        shutil.rmtree(args.storage, ignore_errors=True)

    where = torch.cuda.get_device_name(0) if cuda else "CPU"
    trained = "UNet + text encoder" if args.train_text_encoder else "UNet"
    memory = "GiB allocated" if cuda else "GiB RSS above start"
    print(
        f"\n{where} | {args.model} {args.resolution} px | {trained} | {args.precision} | DeepSpeed ZeRO-2, 1 process "
        "(plain PyTorch step: torch's AdamW and autocast, fp16 with a GradScaler)"
    )
    columns = [
        "variant",
        "step ms",
        "steps/s",
        "forward ms",
        "backward ms",
        "optimizer step ms",
        f"engine built, {memory}",
        f"peak (build and steps), {memory}",
        "peak reserved, GiB above before",
        "timed steps skipped (fp16 overflow)",
        "phase steps skipped",
        "optimizer groups",
        "host-device syncs a step",
        "warm-up s",
        "warm-up steps (skipped)",
        "compile cache at warm-up (this run's)",
        "graphs compiled",
        "CUDA graph skips",
        "init s",
    ]
    print(f"| {' | '.join(columns)} |")
    print("|---" * len(columns) + "|")
    for r in rows:
        reserved = f"{r['reserved_gib']:.2f}" if r["reserved_gib"] is not None else "-"
        syncs = f"{r['syncs']:.0f}" if r["syncs"] is not None else "-"
        print(
            f"| {r['variant']} | {r['step_ms']:.1f} | {1000 / r['step_ms']:.2f} | {r['forward_ms']:.1f} | "
            f"{r['backward_ms']:.1f} | {r['optimizer_ms']:.1f} | {r['engine_gib']:.2f} | {r['peak_gib']:.2f} | "
            f"{reserved} | {r['timed_skipped']} | {r['phases_skipped']} | {r['optimizer_groups']} | {syncs} | "
            f"{r['warmup_s']:.1f} | {r['warmup_steps']} ({r['warmup_skipped']}) | {r['compile_cache'] or '-'} | "
            f"{r['graphs']} | "
            f"{r['cudagraph_skips']} | {r['init_s']:.1f} |"
        )
    for r in rows:
        if r["profile"]:
            print(f"\n{r['variant']}:\n{r['profile']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
