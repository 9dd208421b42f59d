"""Training throughput: this trainer (Ray Train + DeepSpeed ZeRO) against a plain diffusers-style step.

Both sides run in one invocation, at the same model, batch (1 instance + 1 class-prior image per step, as
diffusers' examples/dreambooth/train_dreambooth.py with --with_prior_preservation), resolution, precision,
learning rate and number of steps, and checkpoint at the same steps:

1. baseline (first, in this process; no Ray, no DeepSpeed): UNet (+ text encoder) trained with
   torch.optim.AdamW; the VAE encodes the pixels and the text encoder the prompts every step; autocast
   (fp16 + GradScaler on CUDA, bf16 when asked, none for fp32); gradient clipping; a checkpoint is a
   torch.save of the trained modules' and the optimizer's state dicts (what accelerate's save_state does).
2. this trainer: a real `trainer.run.run_training` on a fresh local Ray (`init_ray`, bound to 127.0.0.1),
   one worker; its figures come from the job's events file.

steps/s excludes warm-up and checkpoint stalls on both sides (checkpoints have their own column):
  trainer:  the steps of the progress events' windows that start after the warm-up steps and do not overlap a
            checkpoint save, over those windows' seconds;
  baseline: timed steps / their total time (each step synchronised, as diffusers' loop does with loss.item()).
peak memory: CUDA max_memory_allocated (trainer: of the worker); on CPU, peak RSS of the process (the
trainer's worker reports its own).

    .venv/bin/python bench/train_throughput.py                      # CPU: tiny model, bf16, ZeRO-2
    .venv/bin/python bench/train_throughput.py --precision fp32 --zero-stage 3
    python bench/train_throughput.py --model sd15 --precision fp16  # GPU: random SD-1.5-sized model, 512 px

Class-prior images are not the subject here: the class-image cache is filled with synthetic images before
the run, so run_training finds them cached and generates none. Instance images are synthetic too (their
pixels do not change the cost of a step) unless --instance-images names real ones.
"""

from __future__ import annotations

import os

# Before diffusers/transformers are imported: nothing may be downloaded.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse
import gc
import itertools
import json
import math
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the project, when run as a script

from dreambooth.local_ray import init_ray
from dreambooth.sd_model import load_base_model
from dreambooth.tiny_model import CLIP_BPE_ENV, RANDOM_MODELS
from trainer.class_images import cache_key, image_path
from trainer.events import read_events
from trainer.images import load_image, preprocess
from trainer.progress import peak_memory
from trainer.run import run_training
from trainer.spec import JobSpec
from trainer.storage import job_paths

INSTANCE_PROMPT = "a photo of sks dog"
CLASS_PROMPT = "a photo of dog"
NUM_SYNTHETIC_IMAGES = 4
DEFAULT_RESOLUTION = {"tiny": 64, "sd15": 512}
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


@dataclass
class Row:
    what: str
    steps_per_s: float | None
    ms_per_step: float | None
    peak_memory_gib: float | None
    checkpoint_stall_s: float | None
    wall_s: float
    notes: str = ""


# --- inputs ---------------------------------------------------------------------------------------------------


def synthetic_images(directory: Path, count: int, resolution: int, seed: int) -> list[Path]:
    """Smooth random colour fields with some grain, `resolution` px square (content does not change cost)."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        coarse = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
        field = np.asarray(coarse.resize((resolution, resolution), Image.Resampling.BICUBIC), dtype=np.int16)
        grain = rng.integers(-12, 13, field.shape, dtype=np.int16)
        path = directory / f"{i:02d}.png"
        Image.fromarray(np.clip(field + grain, 0, 255).astype(np.uint8)).save(path)
        paths.append(path)
    return paths


def param_counts(model_dir: Path) -> dict[str, int]:
    """Parameters per network, read from the safetensors headers (no weights loaded)."""
    from safetensors import safe_open

    counts = {}
    for name in ("unet", "text_encoder", "vae"):
        total = 0
        for file in sorted((model_dir / name).glob("*.safetensors")):
            with safe_open(str(file), framework="pt") as f:
                total += sum(math.prod(f.get_slice(key).get_shape()) for key in f.keys())  # noqa: SIM118
        counts[name] = total
    return counts


def checkpoint_steps(steps: int, interval: int) -> list[int]:
    """The steps the trainer checkpoints at: every `interval` and always the last."""
    return sorted({s for s in range(interval, steps + 1, interval)} | {steps})


# --- 1. the plain diffusers-style baseline --------------------------------------------------------------------


def run_baseline(args, model_dir: Path, instance_files: list[Path], class_files: list[Path], device) -> Row:
    """diffusers' train_dreambooth.py step, minus its data loader (pixels are preprocessed once)."""
    start = time.perf_counter()
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    weight_dtype = DTYPES[args.precision]
    # As diffusers does: frozen networks in the weight dtype, trained ones in fp32 (run under autocast).
    trained_names = ("unet", "text_encoder") if args.train_text_encoder else ("unet",)
    frozen_names = ("vae", "tokenizer", "scheduler") + (() if args.train_text_encoder else ("text_encoder",))
    frozen = load_base_model(model_dir, dtype=weight_dtype, device=device, components=frozen_names)
    trainable = load_base_model(model_dir, dtype=torch.float32, device=device, components=trained_names)
    tokenizer, vae, scheduler, unet = frozen.tokenizer, frozen.vae, frozen.noise_scheduler, trainable.unet
    text_encoder = trainable.text_encoder if args.train_text_encoder else frozen.text_encoder
    vae.requires_grad_(False)
    unet.train()
    trained = [unet]
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    if args.train_text_encoder:
        text_encoder.train()
        trained.append(text_encoder)
        if args.gradient_checkpointing:
            text_encoder.gradient_checkpointing_enable()
    else:
        text_encoder.requires_grad_(False)
    params = [p for module in trained for p in module.parameters()]
    optimizer = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    scaler = torch.amp.GradScaler("cuda", enabled=cuda and args.precision == "fp16")

    def pixels(files: list[Path]) -> torch.Tensor:
        return torch.stack([preprocess(load_image(p), args.resolution) for p in files]).to(device, weight_dtype)

    instance_pixels, class_pixels = pixels(instance_files), pixels(class_files)
    input_ids = tokenizer(
        [INSTANCE_PROMPT, CLASS_PROMPT],
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids.to(device)

    def autocast():
        return torch.autocast(device.type, dtype=weight_dtype, enabled=args.precision != "fp32")

    def sync():
        if cuda:
            torch.cuda.synchronize()

    saves = set(checkpoint_steps(args.steps, args.checkpoint_interval))
    ckpt_dir = Path(tempfile.mkdtemp(prefix="baseline-ckpt-", dir=args.work_dir))
    step_times, stalls, skipped = [], [], 0
    for step in range(1, args.steps + 1):
        sync()
        t0 = time.perf_counter()
        batch = torch.cat(
            [instance_pixels[step % len(instance_pixels)][None], class_pixels[step % len(class_pixels)][None]]
        )
        with torch.no_grad():
            latents = vae.encode(batch).latent_dist.sample() * vae.config.scaling_factor
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), device=device).long()
        noisy = scheduler.add_noise(latents, noise, timesteps)
        if args.train_text_encoder:
            with autocast():
                hidden = text_encoder(input_ids)[0]
        else:
            with torch.no_grad():
                hidden = text_encoder(input_ids)[0]
        with autocast():
            pred = unet(noisy, timesteps, hidden, return_dict=False)[0]
        pred, pred_prior = pred.float().chunk(2)
        target, target_prior = noise.float().chunk(2)
        loss = torch.nn.functional.mse_loss(pred, target) + torch.nn.functional.mse_loss(pred_prior, target_prior)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        scale_before = scaler.get_scale() if scaler.is_enabled() else None
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        loss.item()  # diffusers logs the loss every step: one host sync per step
        sync()
        if step > args.warmup:
            step_times.append(time.perf_counter() - t0)
        if scale_before is not None and scaler.get_scale() < scale_before:
            skipped += 1  # an overflow: GradScaler skipped the optimizer step
        if step in saves:
            state = {"unet": unet.state_dict(), "optimizer": optimizer.state_dict()}
            if args.train_text_encoder:
                state["text_encoder"] = text_encoder.state_dict()
            if scaler.is_enabled():
                state["scaler"] = scaler.state_dict()
            target_file = ckpt_dir / f"checkpoint-{step}.pt"
            sync()
            t0 = time.perf_counter()
            torch.save(state, target_file)
            stalls.append(time.perf_counter() - t0)
            del state
            for old in ckpt_dir.glob("checkpoint-*.pt"):  # keep the newest only: disk, not timed
                if old != target_file:
                    old.unlink()
    (peak,) = peak_memory().values()  # measured as the trainer measures its own (CUDA allocator or peak RSS)
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    # The last step's tensors too: their autograd graph holds the UNet (and its fp32 weights) alive otherwise.
    del pred, pred_prior, loss, hidden, latents, noise, noisy
    del frozen, trainable, tokenizer, text_encoder, vae, unet, optimizer, params, trained, instance_pixels, class_pixels
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()

    steps_per_s = len(step_times) / sum(step_times) if step_times else None
    amp = {"fp16": "fp16 autocast + GradScaler", "bf16": "bf16 autocast", "fp32": "fp32"}[args.precision]
    notes = f"{len(step_times)} timed steps"
    if skipped:
        notes += f", {skipped} optimizer steps skipped on fp16 overflow"
    return Row(
        what=f"plain diffusers-style step (AdamW, {amp}, VAE + text encoder every step)",
        steps_per_s=steps_per_s,
        ms_per_step=1000 / steps_per_s if steps_per_s else None,
        peak_memory_gib=peak,
        checkpoint_stall_s=statistics.median(stalls) if stalls else None,
        wall_s=time.perf_counter() - start,
        notes=notes,
    )


# --- 2. this trainer --------------------------------------------------------------------------------------------


def run_trainer(args, model_dir: Path, instance_dir: Path, class_files: list[Path], use_gpu: bool) -> Row:
    import ray

    cpus = os.cpu_count() or 1
    spec = JobSpec(
        base_model=str(model_dir),
        instance_images=[str(instance_dir)],
        instance_prompt=INSTANCE_PROMPT,
        class_prompt=CLASS_PROMPT,
        num_class_images=len(class_files),
        class_image_inference_steps=1,
        resolution=args.resolution,
        max_steps=args.steps,
        learning_rate=args.lr,
        batch_size=1,
        train_text_encoder=args.train_text_encoder,
        gradient_checkpointing=args.gradient_checkpointing,
        torch_compile=args.compile,
        precision=args.precision,
        zero_stage=args.zero_stage,
        checkpoint_interval=args.checkpoint_interval,
        num_workers=1,
        gpus_per_worker=1.0 if use_gpu else 0.0,
        # All the cores, so the worker's torch uses as many threads as the baseline in this process.
        cpus_per_worker=float(cpus),
        max_failures=0,
        seed=args.seed,
        # At the end only: its peak memory counts (sampling beside the optimizer's states), its time does not.
        validation_prompts=[args.validation_prompt] if args.validation_prompt else [],
    )
    paths = job_paths(Path(args.work_dir) / "storage", "bench")
    # A --work-dir given again holds the last run's job: run_training would resume from its checkpoints (or refuse a
    # changed spec), and its events would be summarised with this run's. The job starts afresh; the caches stay.
    shutil.rmtree(paths.job_dir, ignore_errors=True)
    shutil.rmtree(paths.model_dir, ignore_errors=True)
    compile_cache_found = args.compile and any(paths.compile_cache.glob("*/*"))
    # Pre-fill the class-image cache: run_training finds the images there and generates none.
    cache = paths.class_image_cache / cache_key(spec)
    cache.mkdir(parents=True, exist_ok=True)
    for i, file in enumerate(class_files):
        shutil.copyfile(file, image_path(cache, i))

    if args.worker_niceness is not None:
        # Ray starts its workers at niceness 15, so on a shared machine any other load starves the trainer's
        # worker long before it slows the baseline (niceness 0). The raylet reads this when init_ray starts it.
        os.environ["RAY_worker_niceness"] = str(args.worker_niceness)  # noqa: SIM112 (Ray spells it so)
    init_ray(num_cpus=cpus)  # a fresh private Ray on 127.0.0.1, even where a `ray start` cluster runs
    start = time.perf_counter()
    try:
        result = run_training(spec, paths)
    except BaseException:  # cut at a deadline (Ray Train turns SIGINT into its own abort): what it measured counts
        summary = summarise_events(read_events(paths.events_file), args.warmup)
        print(f"trainer (cut short after {time.perf_counter() - start:.0f} s): {json.dumps(summary)}", flush=True)
        raise
    finally:
        ray.shutdown()
    wall_s = time.perf_counter() - start
    events = read_events(paths.events_file)
    summary = summarise_events(events, args.warmup)
    # GBs at SD-1.5 size; the events file stays (with --work-dir, until its next run) for a closer look.
    shutil.rmtree(paths.checkpoints_dir, ignore_errors=True)
    shutil.rmtree(paths.model_dir, ignore_errors=True)

    windows = f"{summary['windows_used']} of {summary['windows']} progress windows used"
    if summary["steps_per_s"] is None:
        windows += (
            " (none after the warm-up is free of a checkpoint save: no steps/s; use more --steps or a longer "
            "--checkpoint-interval)"
        )
    notes = (
        f"{windows}; run_training {wall_s:.0f} s: preparing {summary['phases'].get('PREPARING', 0):.0f} s, training "
        f"{summary['phases'].get('TRAINING', 0):.0f} s (first progress event after "
        f"{summary['first_progress_after_s']:.0f} s: {summary['startup_s']}), export "
        f"{summary['phases'].get('EXPORTING', 0):.0f} s; "
        f"{result.steps} steps, final loss {fmt(result.final_loss, 4)}; "
        f"checkpoint stalls {summary['checkpoint_stalls_s']} s, of which waiting for the previous checkpoint's write "
        f"{summary['checkpoint_waits_s']} s; {fmt(summary['steps_per_s_while_writing'], 2)} steps/s in the "
        f"{summary['windows_while_writing']} steady windows between a save and its commit (its background write)"
    )
    if summary["compiled"]:
        compile_cache = "earlier runs' (--work-dir)" if compile_cache_found else "empty"
        notes += f"; compiled: {summary['compiled']}, compile cache {compile_cache}"
    if summary["training_peak_memory_gib"] != summary["peak_memory_gib"]:
        notes += f"; peak {fmt(summary['training_peak_memory_gib'], 2)} GiB training, the rest validating"
    if summary["skipped_steps"]:  # as the baseline's note says of its GradScaler
        notes += f", {summary['skipped_steps']} optimizer steps of the timed windows skipped on fp16 overflow"
    steps_per_s = summary["steps_per_s"]
    return Row(
        what=f"this trainer: run_training, Ray Train (1 worker) + DeepSpeed ZeRO-{args.zero_stage}, {args.precision}"
        + (", torch.compile" if args.compile else "")
        + (" + CUDA graphs" if spec.replays_cuda_graphs else ""),
        steps_per_s=steps_per_s,
        ms_per_step=1000 / steps_per_s if steps_per_s else None,
        peak_memory_gib=summary["peak_memory_gib"],
        checkpoint_stall_s=summary["checkpoint_stall_s"],
        wall_s=wall_s,
        notes=notes,
    )


def summarise_events(events: list[dict[str, Any]], warmup: int) -> dict[str, Any]:
    """The trainer's figures from its events file.

    A progress event at step S covers the steps since the previous event's step P. Left out: the first
    window (the run's first step, told with no rate), windows with P < `warmup`, and windows holding a
    checkpoint save. A save at step N runs right after step N's progress report, so it lies in the window
    with P <= N < S (by steps, not times: a "checkpoint" event is written when Ray commits it, later). The rate
    is the windows' steps over their seconds, as the baseline's (a median of windows would drop slow ones);
    None without such a window: any other rate would include a stall or the warm-up, which the baseline's never does.
    """
    progress = [e for e in events if e["type"] == "progress"]
    checkpoints = [e for e in events if e["type"] == "checkpoint"]
    saved_at = [e["step"] for e in checkpoints]

    def window(previous: dict, event: dict) -> tuple[int, float, int]:
        steps = event["step"] - previous["step"]
        skipped = event.get("skipped_steps", 0) - previous.get("skipped_steps", 0)  # on fp16 overflow
        return steps, steps / event["steps_per_s"], skipped

    def writing(previous: dict) -> bool:
        # A checkpoint is written in the background from its save until Ray commits it (its event's time, up to
        # Ray's 2 s poll after the write ended; a save never committed, as in a run cut short, has no event).
        return any(e["step"] < previous["step"] and e["time"] > previous["time"] for e in checkpoints)

    steady, while_writing = [], []
    for previous, event in itertools.pairwise(progress):
        if previous["step"] < warmup or event["steps_per_s"] is None:  # a restarted run's first step: no window
            continue
        if not any(previous["step"] <= n < event["step"] for n in saved_at):
            steady.append(window(previous, event))
            if writing(previous):
                while_writing.append(window(previous, event))

    # Progress and validation events carry the peak so far (validation samples beside the optimizer's states, and
    # with CUDA graphs beside the memory their pool keeps): both, and training's alone.
    def peaks(kinds: tuple[str, ...]) -> list[float]:
        reports = [e for e in events if e["type"] in kinds]
        return [m for e in reports if (m := e.get("peak_memory_gib", e.get("peak_rss_gib"))) is not None]

    memory, training_memory = peaks(("progress", "validation")), peaks(("progress",))
    compiled = next((e for e in events if e["type"] == "compiled"), None)

    states = [e for e in events if e["type"] == "state"]
    phases = {a["state"]: b["time"] - a["time"] for a, b in itertools.pairwise(states)}
    training_start = next((e["time"] for e in states if e["state"] == "TRAINING"), None)
    first_progress = progress[0]["time"] - training_start if progress and training_start is not None else float("nan")
    # Where the time to the first progress event went: Ray Train's start of the worker (its process and process
    # group), the worker's own parts (the "worker" event), then its first steps (compiling, with torch_compile).
    startup: dict[str, float] = {}
    worker = next((e for e in events if e["type"] == "worker" and e["rank"] == 0), None)
    if worker is not None and "startup_s" in worker and training_start is not None:
        startup["ray_train"] = round(worker["time"] - training_start - sum(worker["startup_s"].values()), 2)
        startup.update(worker["startup_s"])
        if progress:
            startup["first_window"] = round(progress[0]["time"] - worker["time"], 2)

    def rate(windows: list[tuple[int, float, int]]) -> float | None:
        return sum(s for s, _, _ in windows) / sum(t for _, t, _ in windows) if windows else None

    return {
        "steps_per_s": rate(steady),
        # Of the steady windows, those between a save and its commit, while its background write went on: what
        # writing costs the training thread (the GIL, host memory bandwidth), beside its stall.
        "steps_per_s_while_writing": rate(while_writing),
        "windows_while_writing": len(while_writing),
        "skipped_steps": sum(k for _, _, k in steady),
        "windows": len(progress),
        "windows_used": len(steady),
        "peak_memory_gib": max(memory) if memory else None,
        "training_peak_memory_gib": max(training_memory) if training_memory else None,
        # torch_compile: the first step's seconds (compiling), graphs, and those run without CUDA graphs.
        "compiled": {k: compiled[k] for k in ("seconds", "graphs", "cudagraph_skips") if k in compiled}
        if compiled
        else None,
        "checkpoint_stall_s": statistics.median(e["stall_s"] for e in checkpoints) if checkpoints else None,
        "checkpoint_stalls_s": [round(e["stall_s"], 2) for e in checkpoints],
        # Of each stall, the wait for the checkpoint before to be written (since session 17; and committed, until 18).
        "checkpoint_waits_s": [round(e.get("waited_s", float("nan")), 2) for e in checkpoints],
        "checkpoints": len(checkpoints),
        "phases": phases,
        "first_progress_after_s": first_progress,
        "startup_s": startup,
    }


# --- the table ------------------------------------------------------------------------------------------------------


def fmt(value: float | None, digits: int) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def render(setting: str, rows: list[Row], ratio: float | None, memory_note: str) -> str:
    lines = [
        setting,
        "",
        "| what | steps/s | ms/step | peak memory GiB | checkpoint stall s |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        cells = (
            fmt(row.steps_per_s, 2),
            fmt(row.ms_per_step, 1),
            fmt(row.peak_memory_gib, 2),
            fmt(row.checkpoint_stall_s, 2),
        )
        lines.append(f"| {row.what} | {' | '.join(cells)} |")
    lines.append("")
    if ratio is not None:
        lines.append(f"trainer / baseline steps/s: {ratio:.2f}x")
    lines.append(memory_note)
    for row in rows:
        lines.append(f"- {row.what.split(':')[0]}: {row.notes}; wall {row.wall_s:.0f} s")
    return "\n".join(lines)


# --- main -----------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None, cuda: bool) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=sorted(RANDOM_MODELS), default="sd15" if cuda else "tiny")
    parser.add_argument("--model-dir", help="where the random model is built/cached (default: ~/.cache/...)")
    parser.add_argument("--precision", choices=sorted(DTYPES), default="fp16" if cuda else "bf16")
    parser.add_argument("--zero-stage", type=int, choices=(2, 3), default=2)
    parser.add_argument("--train-text-encoder", action="store_true")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="on both sides")
    parser.add_argument("--compile", action="store_true", help="the trainer's torch_compile (the baseline stays eager)")
    parser.add_argument("--steps", type=int, help="optimizer steps per side (default: 50 on CUDA, 60 on CPU)")
    parser.add_argument("--warmup", type=int, default=5, help="steps left out of steps/s (default: 5)")
    parser.add_argument("--resolution", type=int, help="default: 64 (tiny), 512 (sd15)")
    parser.add_argument("--checkpoint-interval", type=int, help="default: half the steps (2 checkpoints)")
    parser.add_argument("--lr", type=float, default=5e-6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--instance-images", help="a directory of real photos (default: synthetic images)")
    parser.add_argument("--validation-prompt", help="the trainer samples it (2 images) after its last step")
    parser.add_argument("--only", choices=("trainer", "baseline"), help="run one side only")
    parser.add_argument(
        "--work-dir",
        help="scratch space (default: a temp dir, removed after); a given one is kept, with the trainer's events, and "
        "given again, its caches (class images, compiled code) are reused and its job is started afresh",
    )
    parser.add_argument(
        "--clip-bpe",
        help=f"CLIP's bpe_simple_vocab_16e6.txt.gz where open_clip_torch is not installed (sets ${CLIP_BPE_ENV}; "
        "only needed to build the model)",
    )
    parser.add_argument(
        "--worker-niceness",
        type=int,
        help="niceness of Ray's worker processes (Ray's default: 15); 0 competes evenly with the baseline on a "
        "busy CPU machine",
    )
    parser.add_argument("--out", help="also write the table as JSON here")
    args = parser.parse_args(argv)
    if args.precision == "fp16" and not cuda:
        parser.error("fp16 needs CUDA (DeepSpeed refuses fp16 on CPUs): use --precision bf16 or fp32")
    args.steps = args.steps or (50 if cuda else 60)
    args.resolution = args.resolution or DEFAULT_RESOLUTION[args.model]
    args.checkpoint_interval = args.checkpoint_interval or max(1, math.ceil(args.steps / 2))
    if len(checkpoint_steps(args.steps, args.checkpoint_interval)) < 2:
        parser.error("--checkpoint-interval must be below --steps, so that at least 2 checkpoints happen")
    if args.warmup >= args.steps - 1:
        parser.error("--warmup must leave at least 2 timed steps")
    return args


def main(argv: list[str] | None = None) -> int:
    load_before = os.getloadavg()[0]
    cuda = torch.cuda.is_available()
    args = parse_args(argv, cuda)
    device = torch.device("cuda" if cuda else "cpu")
    if args.clip_bpe:
        os.environ[CLIP_BPE_ENV] = str(Path(args.clip_bpe).resolve())

    model_dir = Path(args.model_dir or f"~/.cache/dreambooth-cluster/models/{args.model}").expanduser()
    t0 = time.perf_counter()
    model_dir = RANDOM_MODELS[args.model](model_dir, seed=args.seed)
    print(f"model: {model_dir} ({time.perf_counter() - t0:.1f} s to build or find)", flush=True)

    own_work_dir = args.work_dir is None
    args.work_dir = str(Path(args.work_dir or tempfile.mkdtemp(prefix="bench-train-")).resolve())
    Path(args.work_dir).mkdir(parents=True, exist_ok=True)
    try:
        inputs = Path(args.work_dir) / "inputs"
        if args.instance_images:
            instance_dir = Path(args.instance_images).resolve()
            instance_files = sorted(p for p in instance_dir.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
        else:
            instance_dir = inputs / "instance"
            instance_files = synthetic_images(instance_dir, NUM_SYNTHETIC_IMAGES, args.resolution, args.seed)
        class_files = synthetic_images(inputs / "class", NUM_SYNTHETIC_IMAGES, args.resolution, args.seed + 1)

        rows = []
        # The baseline first: on CPU its peak RSS is then this process's own high-water mark.
        if args.only != "trainer":
            print("baseline: running ...", flush=True)
            rows.append(run_baseline(args, model_dir, instance_files, class_files, device))
            print(f"baseline: {asdict(rows[-1])}", flush=True)
        if args.only != "baseline":
            print("trainer: running run_training ...", flush=True)
            rows.insert(0, run_trainer(args, model_dir, instance_dir, class_files, cuda))
            print(f"trainer: {asdict(rows[0])}", flush=True)
    finally:
        if own_work_dir:
            shutil.rmtree(args.work_dir, ignore_errors=True)

    counts = param_counts(model_dir)
    params = ", ".join(f"{name} {n / 1e6:.1f}M" for name, n in counts.items())
    where = torch.cuda.get_device_name(0) if cuda else f"CPU ({torch.get_num_threads()} threads)"
    setting = (
        f"device: {where} | model: {args.model} ({params} params) | resolution {args.resolution} | "
        f"precision {args.precision} | ZeRO-{args.zero_stage} | batch 1 instance + 1 class image | "
        f"text encoder {'trained' if args.train_text_encoder else 'frozen'} | "
        f"gradient checkpointing {'on' if args.gradient_checkpointing else 'off'} | lr {args.lr:g} | "
        f"{args.steps} steps "
        f"(warm-up {args.warmup}), checkpoints at steps {checkpoint_steps(args.steps, args.checkpoint_interval)}"
    )
    trainer_row = next((r for r in rows if r.what.startswith("this trainer")), None)
    baseline_row = next((r for r in rows if r.what.startswith("plain")), None)
    ratio = None
    if trainer_row and baseline_row and trainer_row.steps_per_s and baseline_row.steps_per_s:
        ratio = trainer_row.steps_per_s / baseline_row.steps_per_s
    memory_note = (
        "peak memory: torch.cuda.max_memory_allocated (trainer: its worker process)"
        if cuda
        else "peak memory: peak RSS of the process (trainer: its worker process; baseline: this process)"
    )
    if not cuda:
        memory_note += f"\nhost load average (1 min) before the run: {load_before:.2f} on {os.cpu_count()} cores"
        if load_before > 0.5:
            memory_note += " (other work was running: CPU figures are noisy; rerun on a quiet machine)"
    print()
    print(render(setting, rows, ratio, memory_note))
    if args.out:
        report = {
            "setting": setting,
            "device": where,
            "model": args.model,
            "params": counts,
            "resolution": args.resolution,
            "precision": args.precision,
            "zero_stage": args.zero_stage,
            "train_text_encoder": args.train_text_encoder,
            "gradient_checkpointing": args.gradient_checkpointing,
            "steps": args.steps,
            "warmup": args.warmup,
            "checkpoint_interval": args.checkpoint_interval,
            "rows": [asdict(r) for r in rows],
            "trainer_over_baseline_steps_per_s": ratio,
        }
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
