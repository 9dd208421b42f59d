"""Controller memory under concurrent large uploads: what its request gate holds back.

A SubmitJob's request is in the controller's memory from the moment gRPC reads it, parsed, until the photos are
decoded (two submissions at a time) and written. The gate (controller/request_gate.RequestGate) refuses, from a call's
metadata and before its request is read, calls without a known token and a tenant's calls beyond
`max_submits_per_tenant`. Side by side in one run, each against its own fresh controller (bench/controller_load's,
a subprocess on 127.0.0.1, no Ray): N concurrent submissions of 3 photos of ~15 MiB (random-pixel PNGs, a valid
spec naming the tiny model), each on a connection of its own,

  - as one tenant, with no per-tenant limit (the controller before the gate, for its tenants);
  - as one tenant, with the default max_submits_per_tenant;
  - without a token (the gate refuses all of them unread; before it, each was read whole first).

Printed: the controller process's peak RSS above its idle RSS, the calls' outcomes, and the wall time.

    .venv/bin/python bench/upload_memory.py                  # 48 submissions, ~1 min on 2 cores
    .venv/bin/python bench/upload_memory.py --submissions 96
"""

from __future__ import annotations

import argparse
import collections
import io
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the project, when run as a script

import grpc  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from bench.common import rss_bytes  # noqa: E402
from bench.controller_load import TENANTS, Server, job_fields  # noqa: E402
from controller.config import ControllerConfig  # noqa: E402
from dreambooth.proto_convert import spec_to_proto  # noqa: E402
from dreambooth.v1 import jobs_pb2  # noqa: E402

PHOTO_SIDE = 2300  # random RGB pixels, stored uncompressed: ~15 MiB a PNG, under the 16 MiB limit per photo


def request(model_dir: Path) -> bytes:
    rng = np.random.default_rng(0)
    photos = []
    for i in range(3):
        png = io.BytesIO()
        pixels = rng.integers(0, 255, (PHOTO_SIDE, PHOTO_SIDE, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(png, format="PNG", compress_level=0)
        photos.append(jobs_pb2.InstanceImage(filename=f"{i}.png", data=png.getvalue()))
    spec = spec_to_proto(job_fields(model_dir))
    return jobs_pb2.SubmitJobRequest(spec=spec, instance_images=photos).SerializeToString()


def flood(server: Server, body: bytes, submissions: int, token: str | None) -> dict:
    """`submissions` SubmitJob calls at once, each on its own channel; the server's peak RSS meanwhile."""
    options = [("grpc.max_send_message_length", 80 << 20), ("grpc.use_local_subchannel_pool", 1)]
    channels = [grpc.insecure_channel(server.target, options=options) for _ in range(submissions)]
    for channel in channels:
        grpc.channel_ready_future(channel).result(timeout=30)
    metadata = [("authorization", f"Bearer {token}")] if token else []
    idle = peak = rss_bytes(server.proc.pid)
    done = threading.Event()

    def watch() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, rss_bytes(server.proc.pid))
            time.sleep(0.005)

    outcomes: collections.Counter[str] = collections.Counter()

    def submit(channel: grpc.Channel) -> None:
        call = channel.unary_unary("/dreambooth.v1.JobService/SubmitJob")
        try:
            call(body, metadata=metadata, timeout=300)
            outcomes["OK"] += 1
        except grpc.RpcError as e:
            outcomes[e.code().name] += 1

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    start = time.perf_counter()
    clients = [threading.Thread(target=submit, args=(channel,)) for channel in channels]
    for client in clients:
        client.start()
    for client in clients:
        client.join()
    wall_s = time.perf_counter() - start
    done.set()
    watcher.join()
    for channel in channels:
        channel.close()
    return {"peak_gib": (peak - idle) / 2**30, "outcomes": dict(outcomes), "wall_s": wall_s}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--submissions", type=int, default=48, help="concurrent SubmitJob calls (default: 48)")
    args = parser.parse_args(argv)
    default_limit = ControllerConfig(storage=Path(".")).max_submits_per_tenant
    model_dir = Path("~/.cache/dreambooth-cluster/models/tiny").expanduser()
    _, token = TENANTS[0]
    body = request(model_dir)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-uploads-") as work:
        for what, limit, caller in (
            ("one tenant, no per-tenant limit (before the gate)", 10**9, token),
            (f"one tenant, max_submits_per_tenant {default_limit} (default)", default_limit, token),
            ("no token (refused unread; before the gate, read whole first)", default_limit, None),
        ):
            storage, log = Path(work) / f"storage-{len(rows)}", Path(work) / f"controller-{len(rows)}.log"
            server = Server(storage, model_dir, log, max_submits_per_tenant=limit)
            try:
                print(f"{what}: {args.submissions} x {len(body) / 2**20:.0f} MiB ...", flush=True)
                rows.append((what, flood(server, body, args.submissions, caller)))
            finally:
                server.stop()
    print()
    print(f"{args.submissions} concurrent SubmitJob calls of {len(body) / 2**20:.0f} MiB, each on its own connection")
    print("| caller | controller peak RSS above idle, GiB | outcomes | wall s |")
    print("|---|---|---|---|")
    for what, row in rows:
        outcomes = ", ".join(f"{code} {n}" for code, n in sorted(row["outcomes"].items()))
        print(f"| {what} | {row['peak_gib']:.2f} | {outcomes} | {row['wall_s']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
