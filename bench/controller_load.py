"""Controller load: concurrent gRPC clients against a controller whose cluster has no free capacity.

Everything runs on 127.0.0.1. The controller is a subprocess of its own (`controller.server.start`, SQLite
store in a temp dir, two tenants with bearer tokens, capacity_cpus=0 so the scheduler starts nothing and every
job stays QUEUED, metrics HTTP off, no Ray needed); the load generator runs in further processes, so neither
side shares the other's GIL.

1. Load levels (default 1, 16 and 128 clients, 10 s each, once with the instance images sent as bytes and
   once as uri paths on shared storage): each client is a thread with a gRPC channel (and TCP connection) of
   its own, in a closed loop of SubmitJob (a fresh request_id each time, 3 JPEGs of 96x96), GetJob of a
   random job it submitted, ListJobs first page (50). Latency is per call, client side, from the call to its
   response. The tenants' queue limit is raised so that no submission is refused; between levels the jobs
   left queued are marked CANCELLED directly in the store (`--keep-queue` keeps them), so every level starts
   with an empty queue.
2. List at 100,000 jobs: a second controller on a store pre-filled in bulk (through controller.store's
   tables, before the server starts) with 100,000 ended jobs of one tenant; one client times ListJobs (first
   page, then every page following the tokens down to page 1000, then page 1000 again and again), and a few
   GetJob/SubmitJob calls by that tenant.

Targets (the issue's, printed beside the figures, PASS/MISS): SubmitJob p99 under 50 ms at 128 clients on a
2-core machine; a ListJobs page under 50 ms (p99) at 100,000 jobs.

    .venv/bin/python bench/controller_load.py                          # ~2-3 min on 2 cores
    .venv/bin/python bench/controller_load.py --duration 5 --levels 1,128 --images bytes
    .venv/bin/python bench/controller_load.py --think 4 --levels 128   # paced clients instead of a closed loop
    .venv/bin/python bench/controller_load.py --profile /tmp/prof      # + py-spy of the server at the top level

Also printed per level: the CPU the server and the load generator used (in cores), so the table says which
side was the bottleneck; `--client-procs` spreads the client threads over more processes.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import json
import math
import multiprocessing
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the project, when run as a script

import grpc  # noqa: E402
from PIL import Image  # noqa: E402

from bench.common import percentile  # noqa: E402
from dreambooth.proto_convert import spec_to_proto  # noqa: E402
from dreambooth.v1 import jobs_pb2, jobs_pb2_grpc  # noqa: E402

TENANTS = (("alice", "alice-token"), ("bob", "bob-token"))
RPCS = ("SubmitJob", "GetJob", "ListJobs")
PAGE_SIZE = 50
SUBMIT_P99_TARGET_MS = 50.0
SUBMIT_TARGET_CLIENTS = 128
LIST_P99_TARGET_MS = 50.0
CALL_TIMEOUT_S = 60.0
SERVER_START_TIMEOUT_S = 300.0
# A channel of its own per client: without a local subchannel pool, channels to the same target in one process
# share one TCP connection, and 128 "clients" would be 128 streams on one connection.
CHANNEL_OPTIONS = [
    ("grpc.use_local_subchannel_pool", 1),
    ("grpc.max_send_message_length", 80 * 1024 * 1024),
    ("grpc.max_receive_message_length", 80 * 1024 * 1024),
]


# --- the controller, in a subprocess ----------------------------------------------------------------------------------


def serve(params: dict[str, Any]) -> int:
    """The subprocess: build (or find) the tiny model, start the controller, print its port, run until stdin closes."""
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from controller.config import ControllerConfig, Tenant
    from controller.server import UNARY_THREADS, start
    from dreambooth.tiny_model import build_tiny_model

    build_tiny_model(params["model_dir"])
    config = ControllerConfig(
        storage=Path(params["storage"]),
        listen="127.0.0.1:0",
        ray_dashboard_url="http://127.0.0.1:9",  # never contacted: nothing is ever started
        tenants=tuple(Tenant(name, (token,), max_queued_jobs=10**9) for name, token in TENANTS),
        # The load levels' clients are two tenants': measured, not refused (bench/upload_memory.py sets it).
        max_submits_per_tenant=params.get("max_submits_per_tenant", 10**9),
        max_calls_per_tenant=10**9,
        # The model, and the work dir holding the photos that `--images uri` names.
        readable_paths=(Path(params["model_dir"]), Path(params["storage"]).parent / "inputs"),
        metrics_listen="",
        capacity_cpus=0.0,
        capacity_gpus=0.0,
    )
    controller = start(config)
    # Its RPC thread pool, as controller.server sizes it: with no watch open, unary calls may use every thread.
    print(f"READY {controller.port} {config.max_watches + UNARY_THREADS}", flush=True)
    sys.stdin.read()  # EOF: the bench is done
    controller.stop(grace_s=1)
    return 0


class Server:
    def __init__(self, storage: Path, model_dir: Path, log_path: Path, **settings: Any):
        params = json.dumps({"storage": str(storage), "model_dir": str(model_dir), **settings})
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        env.setdefault("HF_HUB_OFFLINE", "1")
        self.log_path = log_path
        self._log = log_path.open("w")
        started = time.perf_counter()
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--serve", params],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            cwd=ROOT,
            env=env,
            text=True,
        )
        line = _readline(self.proc, SERVER_START_TIMEOUT_S)
        if not line.startswith("READY "):
            self.stop()
            raise RuntimeError(f"the controller did not start; its log ({log_path}):\n{log_path.read_text()[-3000:]}")
        self.port, self.rpc_threads = (int(word) for word in line.split()[1:3])
        self.target = f"127.0.0.1:{self.port}"
        self.start_s = time.perf_counter() - started

    def cpu_s(self) -> float:
        """User + system CPU seconds of the server process so far (all its threads)."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()
                self.proc.wait(timeout=30)
            except (subprocess.TimeoutExpired, BrokenPipeError):
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def _readline(proc: subprocess.Popen, timeout_s: float) -> str:
    box: list[str] = []
    reader = threading.Thread(target=lambda: box.append(proc.stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout_s)
    return box[0].strip() if box else ""


# --- inputs -----------------------------------------------------------------------------------------------------------


def make_images(directory: Path, count: int = 3, size: int = 96) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        image = Image.effect_mandelbrot((size, size), (-2 + i * 0.1, -1.2, 1, 1.2), 64).convert("RGB")
        path = directory / f"subject-{i}.jpg"
        image.save(path, quality=90)
        paths.append(path)
    return paths


def job_fields(model_dir: Path) -> dict[str, Any]:
    """A small CPU job, as the tests submit (instance images travel beside the spec)."""
    return {
        "base_model": str(model_dir),
        "instance_prompt": "a photo of sks dog",
        "num_class_images": 0,
        "resolution": 64,
        "max_steps": 4,
        "learning_rate": 1e-3,
        "precision": "fp32",
        "gpus_per_worker": 0,
        "num_workers": 1,
        "checkpoint_interval": 2,
        "max_failures": 0,
    }


def submit_request(model_dir: Path, images: list[Path], mode: str) -> jobs_pb2.SubmitJobRequest:
    if mode == "bytes":
        instance = [jobs_pb2.InstanceImage(data=p.read_bytes(), filename=p.name) for p in images]
    else:
        instance = [jobs_pb2.InstanceImage(uri=str(p), filename=p.name) for p in images]
    return jobs_pb2.SubmitJobRequest(spec=spec_to_proto(job_fields(model_dir)), instance_images=instance)


# --- the load generator -----------------------------------------------------------------------------------------------


def client_process(
    target: str,
    tenants: list[tuple[str, str]],
    template: bytes,
    duration_s: float,
    think_s: float,
    seed: int,
    start_barrier: Any,
    results: Any,
) -> None:
    """One load-generator process: a thread per client (each with its own channel), started together with the
    other processes' threads, each in a closed loop of Submit, Get, List until the deadline."""
    try:
        ready = threading.Barrier(len(tenants) + 1)
        go = threading.Event()
        deadline = [0.0]
        outputs: list[dict[str, Any]] = []

        def client(index: int) -> None:
            token = tenants[index][1]
            rng = random.Random(seed * 100_003 + index)
            channel = grpc.insecure_channel(target, options=CHANNEL_OPTIONS)
            stub = jobs_pb2_grpc.JobServiceStub(channel)
            metadata = (("authorization", f"Bearer {token}"),)
            latencies: dict[str, list[float]] = {rpc: [] for rpc in RPCS}
            errors: dict[str, collections.Counter] = {rpc: collections.Counter() for rpc in RPCS}
            submit = jobs_pb2.SubmitJobRequest.FromString(template)
            list_first = jobs_pb2.ListJobsRequest(page_size=PAGE_SIZE)
            own: list[str] = []

            def call(rpc: str, method: Any, request: Any) -> Any:
                started = time.perf_counter()
                try:
                    response = method(request, metadata=metadata, timeout=CALL_TIMEOUT_S)
                except grpc.RpcError as e:
                    code = e.code() if isinstance(e, grpc.Call) else None
                    errors[rpc][code.name if code else "UNKNOWN"] += 1
                    return None
                latencies[rpc].append(time.perf_counter() - started)
                return response

            with contextlib.suppress(grpc.RpcError):  # connects; an error here shows up in the measured calls
                stub.ListJobs(jobs_pb2.ListJobsRequest(page_size=1), metadata=metadata, timeout=CALL_TIMEOUT_S)
            ready.wait()
            go.wait()
            end = deadline[0]
            if think_s:  # paced clients start spread out, not all at once
                time.sleep(rng.uniform(0, think_s))
            while time.monotonic() < end:
                submit.request_id = uuid.uuid4().hex
                response = call("SubmitJob", stub.SubmitJob, submit)
                if response is not None:
                    own.append(response.job.job_id)
                if own and time.monotonic() < end:
                    call("GetJob", stub.GetJob, jobs_pb2.GetJobRequest(job_id=rng.choice(own)))
                if time.monotonic() < end:
                    call("ListJobs", stub.ListJobs, list_first)
                if think_s:  # a paced client: an exponential pause (mean think_s) between its rounds
                    time.sleep(max(0.0, min(rng.expovariate(1 / think_s), end - time.monotonic())))
            finished = time.monotonic()
            channel.close()
            outputs.append({"latencies": latencies, "errors": {k: dict(v) for k, v in errors.items()}, "end": finished})

        threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(len(tenants))]
        for thread in threads:
            thread.start()
        ready.wait()
        start_barrier.wait()
        started, cpu0 = time.monotonic(), time.process_time()
        deadline[0] = started + duration_s
        go.set()
        for thread in threads:
            thread.join()
        results.put({"clients": outputs, "start": started, "cpu_s": time.process_time() - cpu0})
    except BaseException:
        results.put({"error": traceback.format_exc()})
        raise


def run_level(
    server: Server, clients: int, procs: int, template: bytes, duration_s: float, think_s: float, seed: int
) -> dict[str, Any]:
    ctx = multiprocessing.get_context("spawn")
    procs = max(1, min(procs, clients))
    barrier = ctx.Barrier(procs + 1)
    results = ctx.Queue()
    assignment = [TENANTS[i % len(TENANTS)] for i in range(clients)]
    workers = [
        ctx.Process(
            target=client_process,
            args=(
                server.target,
                assignment[p::procs],
                template,
                duration_s,
                think_s,
                seed * 1000 + p,
                barrier,
                results,
            ),
            daemon=True,
        )
        for p in range(procs)
    ]
    for worker in workers:
        worker.start()
    try:
        barrier.wait(timeout=120)
    except threading.BrokenBarrierError:
        raise RuntimeError(f"client processes did not start: {results.get(timeout=5)}") from None
    server_cpu0, wall0 = server.cpu_s(), time.monotonic()
    time.sleep(duration_s)
    server_cpu = server.cpu_s() - server_cpu0
    window = time.monotonic() - wall0
    outs = [results.get(timeout=CALL_TIMEOUT_S + 60) for _ in workers]
    for worker in workers:
        worker.join(timeout=30)
    failed = [o["error"] for o in outs if "error" in o]
    if failed:
        raise RuntimeError(f"a client process failed:\n{failed[0]}")

    start = min(o["start"] for o in outs)
    end = max(c["end"] for o in outs for c in o["clients"])
    elapsed = end - start
    rows = []
    for rpc in RPCS:
        latencies = [x for o in outs for c in o["clients"] for x in c["latencies"][rpc]]
        errors: collections.Counter = collections.Counter()
        for o in outs:
            for c in o["clients"]:
                errors.update(c["errors"][rpc])
        rows.append(latency_row(rpc, latencies, elapsed, dict(errors)))
    return {
        "rows": rows,
        "elapsed_s": elapsed,
        "server_cores": server_cpu / window,
        "client_cores": sum(o["cpu_s"] for o in outs) / elapsed,
        "client_procs": procs,
    }


# --- the store at 100,000 jobs ----------------------------------------------------------------------------------------


def prefill(database_url: str, tenant: str, count: int, spec: dict[str, Any], seed: int) -> float:
    """`count` ended jobs of `tenant` (90% SUCCEEDED, 8% FAILED, 2% CANCELLED), one every ~0.9 s up to now,
    inserted in bulk through controller.store's tables; returns the seconds it took."""
    from controller.store import JobRecord, Store, counters, jobs

    started = time.perf_counter()
    rng = random.Random(seed)
    store = Store(database_url)
    now = time.time()
    batch = 10_000
    with store.engine.begin() as conn:
        for first in range(0, count, batch):
            rows = []
            for i in range(first, min(first + batch, count)):
                created = now - (count - i) * 0.9
                state = rng.choices(("SUCCEEDED", "FAILED", "CANCELLED"), weights=(90, 8, 2))[0]
                ended = created + rng.uniform(600, 3600)
                record = JobRecord(
                    tenant=tenant,
                    spec={**spec, "instance_images": [f"/storage/uploads/{i}/{n}.jpg" for n in range(3)]},
                    job_id=f"job-{i:012x}",
                    request_id=uuid.UUID(int=rng.getrandbits(128)).hex,
                    state=state,
                    progress={"step": 400, "total_steps": 400, "loss": 0.1, "steps_per_s": 1.2, "lr": 5e-6},
                    failure_reason="TRAINING_FAILED" if state == "FAILED" else None,
                    failure_message="out of memory" if state == "FAILED" else None,
                    model_id=f"model-{i:012x}" if state == "SUCCEEDED" else None,
                    last_checkpoint_step=400,
                    attempts=1,
                    ray_submission_id=f"job-{i:012x}-a1",
                    create_time=created,
                    start_time=created + 1,
                    end_time=ended,
                    update_time=ended,
                    seq=i + 1,
                )
                rows.append(dataclasses.asdict(record))
            conn.execute(jobs.insert(), rows)
        conn.execute(counters.update().where(counters.c.name == "seq").values(value=count))
    store.close()
    return time.perf_counter() - started


def run_list(server: Server, token: str, pages: int, repeats: int, template: bytes) -> list[dict[str, Any]]:
    channel = grpc.insecure_channel(server.target, options=CHANNEL_OPTIONS)
    stub = jobs_pb2_grpc.JobServiceStub(channel)
    metadata = (("authorization", f"Bearer {token}"),)

    def timed(method: Any, request: Any) -> tuple[float, Any]:
        started = time.perf_counter()
        response = method(request, metadata=metadata, timeout=CALL_TIMEOUT_S)
        return time.perf_counter() - started, response

    first = jobs_pb2.ListJobsRequest(page_size=PAGE_SIZE)
    for _ in range(5):  # warm-up: connection, SQLite page cache
        timed(stub.ListJobs, first)
    rows = []
    first_page = [timed(stub.ListJobs, first)[0] for _ in range(repeats)]
    rows.append(latency_row("ListJobs first page", first_page, sum(first_page), {}))

    per_page, request, ids = [], jobs_pb2.ListJobsRequest(page_size=PAGE_SIZE), []
    deep_token = ""
    for page in range(1, pages + 1):
        seconds, response = timed(stub.ListJobs, request)
        per_page.append(seconds)
        ids.extend(j.job_id for j in response.jobs)
        if not response.next_page_token:
            break
        if page == pages - 1:
            deep_token = response.next_page_token  # the token that asks for page `pages`
        request.page_token = response.next_page_token
    if len(ids) != len(set(ids)) or len(ids) != len(per_page) * PAGE_SIZE:
        raise RuntimeError(f"paging returned {len(ids)} jobs, {len(set(ids))} distinct, over {len(per_page)} pages")
    rows.append(latency_row(f"ListJobs pages 1-{len(per_page)} (following tokens)", per_page, sum(per_page), {}))
    if deep_token:
        deep = jobs_pb2.ListJobsRequest(page_size=PAGE_SIZE, page_token=deep_token)
        deep_page = [timed(stub.ListJobs, deep)[0] for _ in range(repeats)]
        rows.append(latency_row(f"ListJobs page {pages} (repeated)", deep_page, sum(deep_page), {}))

    gets = [timed(stub.GetJob, jobs_pb2.GetJobRequest(job_id=random.choice(ids)))[0] for _ in range(repeats)]
    rows.append(latency_row("GetJob", gets, sum(gets), {}))
    submit = jobs_pb2.SubmitJobRequest.FromString(template)
    # Warm-up, as ListJobs had: the first submission's one-off costs (imports, the base model's first check) would
    # be the p99 of these few calls.
    submit.request_id = uuid.uuid4().hex
    timed(stub.SubmitJob, submit)
    submits = []
    for _ in range(max(1, repeats // 4)):
        submit.request_id = uuid.uuid4().hex
        submits.append(timed(stub.SubmitJob, submit)[0])
    rows.append(latency_row("SubmitJob (1 client)", submits, sum(submits), {}))
    channel.close()
    return rows


# --- figures ----------------------------------------------------------------------------------------------------------


def latency_row(rpc: str, latencies: list[float], elapsed_s: float, errors: dict[str, int]) -> dict[str, Any]:
    return {
        "rpc": rpc,
        "calls": len(latencies),
        "requests_per_s": len(latencies) / elapsed_s if elapsed_s > 0 else 0.0,
        "p50_ms": percentile(latencies, 50) * 1000 if latencies else None,
        "p99_ms": percentile(latencies, 99) * 1000 if latencies else None,
        "max_ms": max(latencies) * 1000 if latencies else None,
        "errors": sum(errors.values()),
        "error_codes": errors,
    }


def judge(row: dict[str, Any], target_ms: float | None) -> tuple[str, str]:
    if target_ms is None:
        return "", ""
    verdict = "PASS" if row["p99_ms"] is not None and row["p99_ms"] < target_ms and not row["errors"] else "MISS"
    return f"p99 < {target_ms:g} ms", verdict


def render(result: dict[str, Any]) -> str:
    def ms(value: float | None) -> str:
        return "—" if value is None else f"{value:.1f}"

    setting = result["setting"]
    lines = [
        "",
        f"## Controller load ({setting['cpus']} CPUs, load average {setting['load_before']:.2f} before; "
        f"{setting['duration_s']:g} s per level, "
        + (
            f"paced clients (mean pause {setting['think_s']:g} s between rounds)"
            if setting["think_s"]
            else "closed loop"
        )
        + f"; server: up to {setting['server_threads']} RPC handlers at once (its thread pool), SQLite on "
        f"{setting['storage_fs']})",
    ]
    if result["load"]:
        lines += [
            "",
            "| images | clients | rpc | requests/s | p50 ms | p99 ms | errors | target | verdict |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
    for level in result["load"]:
        for row in level["rows"]:
            at_target = row["rpc"] == "SubmitJob" and level["clients"] == SUBMIT_TARGET_CLIENTS
            goal, verdict = judge(row, SUBMIT_P99_TARGET_MS if at_target else None)
            errors = str(row["errors"]) + (f" {row['error_codes']}" if row["errors"] else "")
            lines.append(
                f"| {level['images']} | {level['clients']} | {row['rpc']} | {row['requests_per_s']:.0f} | "
                f"{ms(row['p50_ms'])} | {ms(row['p99_ms'])} | {errors} | {goal} | {verdict} |"
            )
    if result["load"]:
        lines += [
            "",
            "| images | clients | client procs | server CPU, cores | client CPU, cores | jobs queued at end |",
            "|---|---|---|---|---|---|",
        ]
    for level in result["load"]:
        lines.append(
            f"| {level['images']} | {level['clients']} | {level['client_procs']} | {level['server_cores']:.2f} | "
            f"{level['client_cores']:.2f} | {level['queued_at_end']} |"
        )
    if result.get("list"):
        info = result["list_setting"]
        lines += [
            "",
            f"### One client, tenant with {info['jobs']:,} ended jobs (pre-filled in {info['prefill_s']:.1f} s), "
            f"page size {PAGE_SIZE}",
            "",
            "| rpc | calls | requests/s | p50 ms | p99 ms | max ms | target | verdict |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for row in result["list"]:
            goal, verdict = judge(row, LIST_P99_TARGET_MS if row["rpc"].startswith("ListJobs") else None)
            lines.append(
                f"| {row['rpc']} | {row['calls']} | {row['requests_per_s']:.0f} | {ms(row['p50_ms'])} | "
                f"{ms(row['p99_ms'])} | {ms(row['max_ms'])} | {goal} | {verdict} |"
            )
    if result.get("profiles"):
        for profile in result["profiles"]:
            lines += [
                "",
                f"### Where SubmitJob's time goes in the server (py-spy --idle, {profile['label']}, "
                f"{profile['samples']} samples in SubmitJob)",
                "",
            ]
            lines += [f"    {share:5.1f}%  {frame}" for frame, share in profile["top"]]
    lines.append("")
    return "\n".join(lines)


# --- profiling (optional: py-spy, not a project dependency) -----------------------------------------------------------


def py_spy() -> str | None:
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else shutil.which("py-spy")


def summarize_profile(path: Path, rpc: str = "SubmitJob", top: int = 15) -> tuple[int, list[tuple[str, float]]]:
    """Where `rpc`'s wall time goes, from py-spy's raw output recorded with --idle: the samples whose stack is in
    that handler, grouped by the innermost project function and the function at the top of the stack (so a
    wait shows as e.g. "Store.insert_job > Condition.wait"), as shares of those samples."""
    total, groups = 0, collections.Counter()
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if f"{rpc} (" not in stack or not count.isdigit():
            continue
        frames = stack.split(";")
        ours = [f for f in frames if any(f"{pkg}/" in f for pkg in ("controller", "trainer", "dreambooth"))]
        name = ours[-1].split(" (")[0] if ours else "?"
        leaf = frames[-1].split(" (")[0]
        groups[name if leaf == name else f"{name} > {leaf}"] += int(count)
        total += int(count)
    return total, [(group, 100 * n / total) for group, n in groups.most_common(top)] if total else []


# --- main -------------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per load level (default: 10)")
    parser.add_argument("--levels", default="1,16,128", help="numbers of concurrent clients (default: 1,16,128)")
    parser.add_argument(
        "--think",
        type=float,
        default=0.0,
        help="mean pause (s, exponential) between a client's rounds; 0 (default): closed loop, as fast as answered",
    )
    parser.add_argument(
        "--images", default="bytes,uri", help="how SubmitJob sends the 3 images: bytes, uri or both (default)"
    )
    parser.add_argument(
        "--client-procs",
        default="auto",
        help="load-generator processes per level: a number, or auto (1 per 32 clients, at least 1)",
    )
    parser.add_argument("--keep-queue", action="store_true", help="don't cancel the queued jobs between levels")
    parser.add_argument("--list-jobs", type=int, default=100_000, help="jobs pre-filled for the List part (0: skip)")
    parser.add_argument("--list-pages", type=int, default=1000, help="pages followed by token (default: 1000)")
    parser.add_argument("--list-repeats", type=int, default=200, help="calls per repeated List/Get (default: 200)")
    parser.add_argument(
        "--profile", metavar="DIR", help="also run the top level once more per image mode under py-spy, raw stacks here"
    )
    parser.add_argument("--model-dir", help="the tiny model (default: ~/.cache/dreambooth-cluster/models/tiny)")
    parser.add_argument("--work-dir", help="scratch space (default: a temp dir, removed after; a given one is kept)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="also write the results as JSON here")
    args = parser.parse_args(argv)
    args.levels = [int(n) for n in args.levels.split(",") if n]
    args.images = [m for m in args.images.split(",") if m]
    if any(m not in ("bytes", "uri") for m in args.images):
        parser.error("--images: bytes, uri or bytes,uri")
    if args.profile and not py_spy():
        parser.error("--profile needs py-spy (pip install py-spy into the venv; not a project dependency)")
    return args


def client_procs(args: argparse.Namespace, clients: int) -> int:
    return max(1, math.ceil(clients / 32)) if args.client_procs == "auto" else int(args.client_procs)


def queued(database_url: str, retire: bool) -> int:
    """Jobs QUEUED now; with retire, mark them CANCELLED (straight in the store: a harness step, not an RPC)."""
    import sqlalchemy as sa

    from controller.store import Store, jobs

    store = Store(database_url)
    with store.engine.begin() as conn:
        count = conn.execute(sa.select(sa.func.count()).where(jobs.c.state == "QUEUED")).scalar_one()
        if retire:
            now = time.time()
            conn.execute(
                jobs.update().where(jobs.c.state == "QUEUED").values(state="CANCELLED", end_time=now, update_time=now)
            )
    store.close()
    return count


def main(argv: list[str] | None = None) -> int:
    if argv is None and len(sys.argv) == 3 and sys.argv[1] == "--serve":
        return serve(json.loads(sys.argv[2]))
    args = parse_args(argv)
    load_before = os.getloadavg()[0]
    model_dir = Path(args.model_dir or "~/.cache/dreambooth-cluster/models/tiny").expanduser().resolve()
    own_work_dir = args.work_dir is None
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="bench-controller-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    fs = subprocess.run(["df", "--output=fstype", str(work)], capture_output=True, text=True).stdout.split()[-1:]
    result: dict[str, Any] = {
        "setting": {
            "cpus": os.cpu_count(),
            "load_before": load_before,
            "duration_s": args.duration,
            "think_s": args.think,
            "levels": args.levels,
            "server_threads": None,  # the server's RPC thread pool, as the first one started says
            "storage_fs": fs[0] if fs else "?",
            "python": platform.python_version(),
            "grpc": grpc.__version__,
        },
        "load": [],
        "list": [],
        "profiles": [],
    }
    try:
        images = make_images(work / "inputs")
        for mode in args.images if args.levels else ():  # --levels "": only the List part
            storage = work / f"storage-{mode}"
            server = Server(storage, model_dir, work / f"controller-{mode}.log")
            result["setting"]["server_threads"] = server.rpc_threads
            print(f"[{mode}] controller on {server.target} ({server.start_s:.1f} s to start)", flush=True)
            database_url = f"sqlite:///{storage / 'controller.db'}"
            template = submit_request(model_dir, images, mode).SerializeToString()
            try:
                runs = [(n, False) for n in args.levels] + ([(max(args.levels), True)] if args.profile else [])
                for clients, profiled in runs:
                    profiler = None
                    if profiled:
                        raw = Path(args.profile) / f"server-{mode}-{clients}.txt"
                        raw.parent.mkdir(parents=True, exist_ok=True)
                        profiler = subprocess.Popen(
                            [
                                py_spy(),
                                "record",
                                "--pid",
                                str(server.proc.pid),
                                "--format",
                                "raw",
                                "--rate",
                                "200",
                                "--idle",
                                "--nonblocking",
                                "--duration",
                                str(math.ceil(args.duration)),
                                "--output",
                                str(raw),
                            ],
                            stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL,
                        )
                    level = run_level(
                        server, clients, client_procs(args, clients), template, args.duration, args.think, args.seed
                    )
                    level.update(images=mode, clients=clients, queued_at_end=queued(database_url, not args.keep_queue))
                    if profiler is not None:
                        profiler.wait(timeout=120)
                        samples, top = summarize_profile(raw)
                        result["profiles"].append(
                            {"label": f"{mode}, {clients} clients", "path": str(raw), "samples": samples, "top": top}
                        )
                        print(f"[{mode}] py-spy of {clients} clients: {raw}", flush=True)
                        continue
                    result["load"].append(level)
                    submit = level["rows"][0]
                    print(
                        f"[{mode}] {clients} clients: SubmitJob {submit['requests_per_s']:.0f}/s "
                        f"p50 {submit['p50_ms'] or 0:.1f} ms p99 {submit['p99_ms'] or 0:.1f} ms, "
                        f"{submit['errors']} errors; server {level['server_cores']:.2f} cores, "
                        f"clients {level['client_cores']:.2f} cores",
                        flush=True,
                    )
            finally:
                server.stop()

        if args.list_jobs:
            storage = work / "storage-list"
            storage.mkdir(parents=True, exist_ok=True)
            tenant, token = TENANTS[0]
            spec = {**job_fields(model_dir), "instance_images": []}
            seconds = prefill(f"sqlite:///{storage / 'controller.db'}", tenant, args.list_jobs, spec, args.seed)
            print(f"[list] {args.list_jobs:,} jobs pre-filled in {seconds:.1f} s", flush=True)
            result["list_setting"] = {"jobs": args.list_jobs, "prefill_s": seconds}
            server = Server(storage, model_dir, work / "controller-list.log")
            result["setting"]["server_threads"] = server.rpc_threads
            try:
                template = submit_request(model_dir, images, "uri").SerializeToString()
                result["list"] = run_list(server, token, args.list_pages, args.list_repeats, template)
            finally:
                server.stop()
    finally:
        if own_work_dir:
            shutil.rmtree(work, ignore_errors=True)

    print(render(result))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
