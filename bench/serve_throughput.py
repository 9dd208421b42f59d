"""Serving throughput: the sampling engine with request batching against diffusers' pipeline per request.

All sides run in one invocation on the same model, prompt, steps, size and guidance scale, with 1, 4 and 16
concurrent closed-loop clients (each sends its next request when the previous one answers), then with requests
arriving at random (Poisson) at --poisson-load times the whole-batch engine's images/s at the most clients:

1. baseline: diffusers' StableDiffusionPipeline called once per request (one request at a time: a pipeline
   is not safe to call from several threads, and one GPU runs one such call at a time anyway).
2. engine, whole batches: serving.engine.SamplingEngine behind a micro-batcher that does what `@serve.batch`
   does (waits up to --batch-wait-s for up to --max-batch-size images) and samples each batch to the end before
   the next starts: both guidance halves of every request in one UNet forward. (The service before step-level
   batching.)
3. engine + step-level batching (this service): the same micro-batcher hands each batch to
   serving.step_batching.StepBatcher without waiting, as the Serve replica does, so a batch that forms while
   another samples joins it at the next denoising step.
4. with --compile, 3 with `compile_unet` (serving's setting), after its warm-up (the compile time is printed).

Serve itself is not here (its HTTP dependencies are missing on the GPU machine): this measures the engine and
batching, not HTTP.

    .venv/bin/python bench/serve_throughput.py                     # CPU: tiny model, 64 px, fp32
    python bench/serve_throughput.py --model sd15                  # GPU: random SD-1.5-sized, 512 px, 25 steps, fp16

Target (GPU, sd15, 512 px, 25 steps): at 16 clients, >= 3x the baseline's images/s with p99 latency <= 4x a
lone request's (the engine's p50 at 1 client).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import queue
import random
import statistics
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import percentile, syncs_per_call
from dreambooth.sd_model import load_pipeline
from dreambooth.tiny_model import CLIP_BPE_ENV, RANDOM_MODELS
from serving.engine import GenerationRequest, GenerationResult, SamplingEngine, default_dtype
from serving.step_batching import StepBatcher

DEFAULT_SIZE = {"tiny": 64, "sd15": 512}
PROMPT = "a photo of sks dog on the beach"


TARGET_CLIENTS = 16  # where the targets are set: >= 3x the baseline's images/s, p99 <= 4x a lone request's


@dataclass
class Row:
    what: str
    clients: int  # closed-loop clients; 0 for Poisson arrivals at `arrivals_per_s`
    images_per_s: float
    p50_s: float
    p99_s: float
    mean_batch: float
    peak_memory_gib: float | None
    requests: int  # latencies the percentiles come from (under 100, the p99 is the slowest)
    batch_s: tuple[float, float, float] | None = None  # min, median, max of the engine's batch calls
    arrivals_per_s: float | None = None
    # Step-level sides: per number of cohorts in a denoising step ("1", "2-7", "8+"), the steps counted and their
    # median images and ms (on a GPU, the GPU's time from the step's start to its end: TimedDenoise): whether a step
    # of many one-request cohorts costs more than one cohort's.
    denoise_ms: dict[str, tuple[int, float, float]] | None = None

    @property
    def load(self) -> str:
        return f"{self.clients} clients" if self.clients else f"Poisson {self.arrivals_per_s:.2f}/s"


class TimedDenoise:
    """The engine, recording each denoising step's cohorts, images and milliseconds (the step-level sides). On a GPU
    the time is CUDA's between events queued before and after the call, on the stream the step runs on, read after
    the run: from when the GPU reaches the step (what the batcher queued before it, joiners' prompt encodings and
    leavers' decodes, is not in it) to the end of its last kernel, waits for the host's launches within the step
    included. Nothing here syncs: the engine's steps are sync-free, and a sync before each would drain the GPU before
    every step on the step-level sides only (StepBatcher queues the next step behind a decode). On a CPU, wall time
    of the call."""

    def __init__(self, engine: SamplingEngine):
        self.engine = engine
        # Cohorts, images, and the step's start and end: CUDA events on a GPU, perf_counter seconds on a CPU.
        self.steps: list[tuple[int, int, torch.cuda.Event | float, torch.cuda.Event | float]] = []

    def __getattr__(self, name: str):
        return getattr(self.engine, name)

    def denoise(self, cohorts) -> None:
        images = sum(cohort.images for cohort in cohorts)
        if self.engine.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            self.engine.denoise(cohorts)
            end.record()
            self.steps.append((len(cohorts), images, start, end))
        else:
            start = time.perf_counter()
            self.engine.denoise(cohorts)
            self.steps.append((len(cohorts), images, start, time.perf_counter()))

    def summary(self) -> dict[str, tuple[int, float, float]]:
        """Per number of cohorts in a step, the steps, their median images and median ms."""
        buckets: dict[str, list[tuple[int, float]]] = {}
        for cohorts, images, start, end in self.steps:
            if isinstance(end, torch.cuda.Event):
                end.synchronize()
                ms = start.elapsed_time(end)
            else:
                ms = 1000 * (end - start)
            buckets.setdefault("1" if cohorts == 1 else "2-7" if cohorts < 8 else "8+", []).append((images, ms))
        return {
            name: (len(steps), statistics.median(s[0] for s in steps), statistics.median(s[1] for s in steps))
            for name, steps in buckets.items()
        }


class MicroBatcher:
    """Collects concurrent requests into batches of up to `max_images` images, like @serve.batch, and samples
    each to the end (`step_level=False`) or hands it to a StepBatcher, as the Serve replica does."""

    def __init__(self, engine: SamplingEngine, model, max_images: int, wait_s: float, step_level: bool):
        self.engine, self.model, self.max_images, self.wait_s = engine, model, max_images, wait_s
        self.timed = TimedDenoise(engine) if step_level else None
        self.step_batcher = StepBatcher(self.timed, max_images) if step_level else None
        self.pending: queue.Queue[tuple[GenerationRequest, Future] | None] = queue.Queue()  # None: stop
        self.batch_sizes: list[int] = []  # per request: requests it shared UNet forwards with
        self.batch_seconds: list[float] = []  # per whole-batch call: where a latency tail comes from
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def submit(self, request: GenerationRequest) -> GenerationResult:
        future: Future = Future()
        self.pending.put((request, future))
        result = future.result()
        self.batch_sizes.append(result.batch_size)
        return result

    def close(self) -> None:
        # Its thread ends (on a CPU every thread that ran torch ops keeps an OpenMP pool, and more pools than
        # cores slow every later side: see serving/generator.py's Generator._load).
        self.pending.put(None)
        self._thread.join()
        if self.step_batcher is not None:
            self.step_batcher.close()

    def _run(self) -> None:
        while True:
            first = self.pending.get()
            if first is None:
                return
            batch = [first]
            deadline = time.monotonic() + self.wait_s
            while sum(r.num_images for r, _ in batch) < self.max_images:
                try:
                    batch.append(self.pending.get(timeout=max(0.0, deadline - time.monotonic())))
                except queue.Empty:
                    break
            requests = [request for request, _ in batch]
            if self.step_batcher is not None:
                for (_, future), submitted in zip(batch, self.step_batcher.submit(self.model, requests), strict=True):
                    submitted.add_done_callback(lambda done, future=future: relay(done, future))
                continue
            start = time.perf_counter()
            results = self.engine.generate(self.model, requests)
            self.batch_seconds.append(time.perf_counter() - start)
            for (_, future), result in zip(batch, results, strict=True):
                future.set_result(result)


def relay(done: Future, to: Future) -> None:
    error = done.exception()
    if error is not None:
        to.set_exception(error)
    else:
        to.set_result(done.result())


def closed_loop(call, clients: int, requests_per_client: int, seed0: int) -> tuple[float, list[float]]:
    """Images/s and per-request latencies of `clients` threads each sending `requests_per_client` requests."""
    latencies: list[float] = []
    lock = threading.Lock()

    def client(index: int) -> None:
        for i in range(requests_per_client):
            start = time.perf_counter()
            call(seed0 + index * 1000 + i)
            with lock:
                latencies.append(time.perf_counter() - start)

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    return clients * requests_per_client / (time.perf_counter() - start), latencies


def poisson_arrivals(call, rate: float, count: int, seed0: int) -> tuple[float, list[float]]:
    """Images/s and latencies of `count` requests arriving at random at `rate` per second (an open loop: arrivals
    do not wait for answers, as with many independent users). The exponential gaps are scaled to add up to
    count / rate: a few dozen draws miss their mean by ~15 % (a seeded 48 made 3.07/s of a nominal 2.83), and
    near saturation that much more load changes the latencies more than the sides differ."""
    draws = random.Random(seed0)
    gaps = [draws.expovariate(rate) for _ in range(count)]
    scale = count / rate / sum(gaps)
    gaps = [gap * scale for gap in gaps]
    latencies: list[float] = []

    def timed(seed: int) -> None:
        start = time.perf_counter()
        call(seed)
        latencies.append(time.perf_counter() - start)

    start = time.perf_counter()
    arrival = start
    with ThreadPoolExecutor(count) as pool:
        sent = []
        for i, gap in enumerate(gaps):
            arrival += gap
            time.sleep(max(0.0, arrival - time.perf_counter()))
            sent.append(pool.submit(timed, seed0 + i))
        for future in sent:
            future.result()  # raises what a request raised
    return count / (time.perf_counter() - start), latencies


def peak_memory_gib(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    peak = torch.cuda.max_memory_allocated() / 2**30
    torch.cuda.reset_peak_memory_stats()
    return peak


def main(argv: list[str] | None = None) -> int:
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=sorted(RANDOM_MODELS), default="sd15" if cuda else "tiny")
    parser.add_argument("--model-dir", help="default: ~/.cache/dreambooth-cluster/models/<model>")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--size", type=int, help="pixels (default: 64 tiny, 512 sd15)")
    parser.add_argument("--guidance-scale", type=float, default=7.5)
    parser.add_argument("--clients", default="1,4,16", help="comma-separated concurrency levels")
    parser.add_argument(
        "--baseline-clients",
        help="the baseline's levels (default: --clients); the most clients' is the one the throughput ratio needs",
    )
    parser.add_argument("--requests-per-client", type=int, default=4)
    parser.add_argument(
        "--lone-requests", type=int, default=10, help="requests at 1 client: the latency every ratio is taken to"
    )
    parser.add_argument(
        "--max-batch-size",
        type=int,
        default=16,
        help="images per batch (16: one batch holds 16 clients' requests; the service's default max_batch_size is 8, "
        "so the rows are the service set to 16)",
    )
    parser.add_argument("--batch-wait-s", type=float, default=0.02)
    parser.add_argument(
        "--poisson-load",
        type=float,
        default=0.7,
        help="random arrivals at this fraction of the whole-batch engine's images/s at the most clients (0: none)",
    )
    parser.add_argument("--only", choices=("engine", "baseline"))
    parser.add_argument("--cudnn-benchmark", action="store_true", help="let cuDNN time its algorithms per shape")
    parser.add_argument("--compile", action="store_true", help="also the engine with a compiled UNet")
    parser.add_argument("--clip-bpe", help=f"CLIP's vocabulary file where open_clip_torch is missing (${CLIP_BPE_ENV})")
    parser.add_argument("--out", help="also write the setting and the rows as JSON here")
    args = parser.parse_args(argv)
    if args.clip_bpe:
        os.environ[CLIP_BPE_ENV] = str(Path(args.clip_bpe).resolve())
    size = args.size or DEFAULT_SIZE[args.model]
    levels = [int(c) for c in args.clients.split(",")]
    baseline_levels = [int(c) for c in args.baseline_clients.split(",")] if args.baseline_clients else levels
    most = max(levels)
    device = torch.device("cuda" if cuda else "cpu")
    dtype = default_dtype(device)
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    model_dir = RANDOM_MODELS[args.model](
        Path(args.model_dir or f"~/.cache/dreambooth-cluster/models/{args.model}").expanduser()
    )
    print(f"model {args.model} ({model_dir}), {size} px, {args.steps} steps, {dtype}, {device}", flush=True)
    # Which card, model and setting gave the rows: JSON files from an H100 and an H200 run are told apart.
    setting = {
        "device": torch.cuda.get_device_name(0) if cuda else f"CPU ({torch.get_num_threads()} threads)",
        "model": args.model,
        "model_dir": str(model_dir),
        "scheduler": json.loads((model_dir / "scheduler" / "scheduler_config.json").read_text())["_class_name"],
        "size": size,
        "steps": args.steps,
        "dtype": str(dtype),
        "guidance_scale": args.guidance_scale,
        "max_batch_size": args.max_batch_size,
        "batch_wait_s": args.batch_wait_s,
        "clients": levels,
        "baseline_clients": baseline_levels if args.only != "engine" else [],
        "requests_per_client": args.requests_per_client,
        "lone_requests": args.lone_requests,
        "poisson_load": args.poisson_load,
        "compile": args.compile,
        "cudnn_benchmark": args.cudnn_benchmark,
    }

    def request(seed: int) -> GenerationRequest:
        return GenerationRequest(PROMPT, "", 1, args.steps, args.guidance_scale, seed, size, size)

    def per_client(clients: int) -> int:
        return max(args.requests_per_client, args.lone_requests) if clients == 1 else args.requests_per_client

    rows: list[Row] = []

    def write_out() -> None:
        if args.out:
            Path(args.out).write_text(json.dumps({"setting": setting, "rows": [asdict(r) for r in rows]}, indent=2))

    def record(row: Row) -> None:
        rows.append(row)
        print(f"measured {row.what}, {row.load}: {row.images_per_s:.2f} images/s, p50 {row.p50_s:.2f} s", flush=True)
        write_out()  # after every row: a run cut short (device_run.sh's deadline) keeps what it measured

    write_out()

    if args.only != "engine":
        pipe = load_pipeline(model_dir, dtype=dtype, device=device)
        lock = threading.Lock()

        def baseline(seed: int) -> None:
            with lock:
                pipe(
                    PROMPT,
                    num_inference_steps=args.steps,
                    guidance_scale=args.guidance_scale,
                    height=size,
                    width=size,
                    generator=torch.Generator("cpu").manual_seed(seed),
                    output_type="pil",
                )

        baseline(0)  # warm-up (CUDA kernels, allocator)
        peak_memory_gib(device)
        for clients in baseline_levels:
            rate, latencies = closed_loop(baseline, clients, per_client(clients), seed0=1)
            record(
                Row(
                    "diffusers pipeline per request",
                    clients,
                    rate,
                    percentile(latencies, 50),
                    percentile(latencies, 99),
                    1.0,
                    peak_memory_gib(device),
                    len(latencies),
                )
            )
        del pipe
        if cuda:
            torch.cuda.empty_cache()

    if args.only != "baseline":
        sides = [("engine, whole batches", False, False), ("engine + step-level batching (this service)", False, True)]
        if args.compile:
            sides.append(("engine + step-level batching, compiled UNet", True, True))
        arrivals_per_s = None  # set from the first engine side's images/s at the most clients
        loaded: dict[bool, tuple[SamplingEngine, object]] = {}
        for what, compile_unet, step_level in sides:
            if compile_unet not in loaded:
                # The previous engine's model is freed first: the next side's peak is its own.
                engine = model = batcher = call = None
                loaded.clear()
                gc.collect()
                if cuda:
                    torch.cuda.empty_cache()
                loaded[compile_unet] = warmed_up_engine(
                    model_dir, device, dtype, compile_unet, request, args.max_batch_size
                )
            engine, model = loaded[compile_unet]
            for clients in [*levels, 0]:
                if clients == 0 and not arrivals_per_s:
                    continue
                batcher = MicroBatcher(engine, model, args.max_batch_size, args.batch_wait_s, step_level)
                peak_memory_gib(device)
                call = lambda seed, b=batcher: b.submit(request(seed))  # noqa: E731
                if clients:
                    rate, latencies = closed_loop(call, clients, per_client(clients), seed0=1)
                else:
                    rate, latencies = poisson_arrivals(call, arrivals_per_s, most * args.requests_per_client, seed0=1)
                batcher.close()
                seconds = batcher.batch_seconds
                record(
                    Row(
                        what,
                        clients,
                        rate,
                        percentile(latencies, 50),
                        percentile(latencies, 99),
                        statistics.mean(batcher.batch_sizes),
                        peak_memory_gib(device),
                        len(latencies),
                        batch_s=(min(seconds), statistics.median(seconds), max(seconds)) if seconds else None,
                        arrivals_per_s=arrivals_per_s if not clients else None,
                        denoise_ms=batcher.timed.summary() if batcher.timed is not None else None,
                    )
                )
                if clients == most and arrivals_per_s is None:
                    arrivals_per_s = args.poisson_load * rate

    print(render(rows, levels))
    return 0


def warmed_up_engine(model_dir: Path, device, dtype, compile_unet: bool, request, max_images: int) -> tuple:
    engine = SamplingEngine(device=device, dtype=dtype, compile_unet=compile_unet)
    model = engine.load("bench", model_dir)
    start = time.perf_counter()
    engine.warm_up(model, max_images)
    if compile_unet:
        print(
            f"compiled UNet warm-up (batches of 1 and {max_images} images): {time.perf_counter() - start:.0f} s",
            flush=True,
        )
    # Warm-up at the largest batch too: its first run sizes the allocator's pools (and, with
    # --cudnn-benchmark, times cuDNN's algorithms), which is not what a steady service pays per batch.
    engine.generate(model, [request(0)])
    engine.generate(model, [request(i) for i in range(max_images)])
    if engine.device.type == "cuda":  # the denoising steps' host-device syncs, by CUDA's count (none expected)
        counts = {}
        for cohorts in (1, max_images):
            started = [engine.start(model, [request(i)]) for i in range(cohorts)]
            counts[cohorts] = syncs_per_call(lambda started=started: engine.denoise(started))
        print(f"engine syncs a denoising step: {counts} (by cohorts of one image)", flush=True)
    return engine, model


def render(rows: list[Row], levels: list[int]) -> str:
    lines = [
        "",
        "| side | load | requests | images/s | p50 s | p99 s | mean batch | batch call s, min / median / max "
        "| peak GiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        memory = f"{r.peak_memory_gib:.2f}" if r.peak_memory_gib is not None else "-"
        batch = " / ".join(f"{s:.3f}" for s in r.batch_s) if r.batch_s else "-"
        lines.append(
            f"| {r.what} | {r.load} | {r.requests} | {r.images_per_s:.2f} | {r.p50_s:.3f} | {r.p99_s:.3f} | "
            f"{r.mean_batch:.1f} | "
            f"{batch} | {memory} |"
        )
    for r in rows:
        if r.denoise_ms:
            parts = [
                f"{name} cohorts: {n} steps, {images:g} images, {ms:.1f} ms"
                for name, (n, images, ms) in r.denoise_ms.items()
            ]
            lines.append(f"- {r.what}, {r.load}, denoising steps by cohorts (medians): {'; '.join(parts)}")
    most = TARGET_CLIENTS  # the targets are at 16 clients: judged only where 16 and a lone client ran
    baseline = next((r for r in rows if r.what.startswith("diffusers") and r.clients == most), None)
    for what in dict.fromkeys(r.what for r in rows if r.what.startswith("engine")):
        by = {r.clients: r for r in rows if r.what == what}
        if most not in by or 1 not in by:
            continue
        tail = by[most].p99_s / by[1].p50_s
        verdicts = [f"p99 = {tail:.2f}x a lone request's latency (target <= 4x)"]
        passed = tail <= 4
        if baseline is not None:  # absent with --only engine: the latency verdict alone
            speedup = by[most].images_per_s / baseline.images_per_s
            verdicts.insert(0, f"{speedup:.2f}x the baseline's images/s (target >= 3x)")
            passed = passed and speedup >= 3
        lines.append(f"\n{what}, {most} clients: {'; '.join(verdicts)}: {'PASS' if passed else 'MISS'}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
