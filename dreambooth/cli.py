"""The `dreambooth` command line.

dreambooth tiny-model OUT_DIR          write the tiny random Stable Diffusion model (offline)
dreambooth train JOB.yaml              run a training job on a local Ray (or --address) with progress bars
"""

from __future__ import annotations

import argparse
import sys
import threading
from pathlib import Path

from dreambooth.errors import InputError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dreambooth", description="DreamBooth fine-tuning at cluster scale.")
    commands = parser.add_subparsers(dest="command", required=True)

    tiny = commands.add_parser("tiny-model", help="write a tiny random Stable Diffusion model (for tests and demos)")
    tiny.add_argument("out_dir", type=Path)
    tiny.add_argument("--seed", type=int, default=0)

    train = commands.add_parser("train", help="run a training job on Ray and wait for its model")
    train.add_argument("spec", type=Path, help="job spec, YAML or JSON")
    train.add_argument(
        "--storage", type=Path, default=Path("dreambooth-data"), help="storage root (default: %(default)s)"
    )
    train.add_argument("--job-id", help="default: the spec file's name; the same id resumes from its last checkpoint")
    train.add_argument("--address", help="Ray cluster to join (e.g. 'auto'); default: start a private local one")

    demo = commands.add_parser("demo", help="train on a made-up subject, offline, on a private local Ray")
    demo.add_argument("--out", type=Path, default=Path("out/demo"), help="output folder (default: %(default)s)")
    demo.add_argument(
        "--base-model", type=Path, help="real Stable Diffusion weights (diffusers format); default: the tiny model"
    )

    args = parser.parse_args(argv)
    try:
        return {"tiny-model": _tiny_model, "train": _train, "demo": _demo}[args.command](args)
    except InputError as e:
        print(f"error: {e.field}: {e.message}", file=sys.stderr)
        return 2


def _tiny_model(args) -> int:
    from dreambooth.tiny_model import build_tiny_model

    print(build_tiny_model(args.out_dir, seed=args.seed))
    return 0


def _train(args) -> int:
    from trainer.spec import JobSpec

    spec = JobSpec.load(args.spec)
    _run_with_progress(spec, args.storage, args.job_id or args.spec.stem, args.address)
    return 0


def _demo(args) -> int:
    import yaml

    from dreambooth.demo import demo_spec, draw_subject_images
    from dreambooth.tiny_model import build_tiny_model

    out = args.out.resolve()
    tiny = args.base_model is None
    base_model = build_tiny_model(out / "tiny-sd") if tiny else args.base_model.resolve()
    if tiny:
        print("Using the tiny random model: the pipeline is real, the images it draws are noise.", file=sys.stderr)
    images = draw_subject_images(out / "subject", size=128 if tiny else 512)
    spec = demo_spec(base_model, images, tiny=tiny)
    (out / "job.yaml").write_text(yaml.safe_dump(spec.to_dict(), sort_keys=False))
    result = _run_with_progress(spec, out / "storage", "demo", address=None)
    grids = sorted((out / "storage" / "jobs" / "demo" / "validation").glob("*.png"))
    print(
        f"subject photos: {images}\nvalidation grids: {grids[-1].parent if grids else 'none'}\n"
        f"model: {result.model_dir}",
        file=sys.stderr,
    )
    return 0


def _run_with_progress(spec, storage: Path, job_id: str, address: str | None):
    from dreambooth.local_ray import init_ray
    from trainer.run import preflight, run_training
    from trainer.storage import job_paths

    paths = job_paths(storage, job_id)
    preflight(spec)  # fail in a second, before Ray starts
    print(f"job {paths.job_id}: {paths.job_dir}", file=sys.stderr)
    init_ray(address)
    stop = threading.Event()
    start_offset = paths.events_file.stat().st_size if paths.events_file.exists() else 0
    viewer = threading.Thread(target=show_progress, args=(paths.events_file, stop, start_offset), daemon=True)
    viewer.start()
    try:
        result = run_training(spec, paths)
    finally:
        stop.set()
        viewer.join(timeout=5)
    print(
        f"model: {result.model_dir}  ({result.steps} steps, loss {result.final_loss:.4f}, {result.wall_time_s:.0f} s)"
    )
    return 0


def show_progress(events_file: Path, stop: threading.Event, offset: int = 0) -> None:
    """Render a job's events as progress bars: class images, then training steps with loss and ETA."""
    from tqdm import tqdm

    from trainer.events import follow_events

    bars: dict[str, tqdm] = {}

    def bar(name: str, total: int, unit: str) -> tqdm:
        if name not in bars:
            bars[name] = tqdm(total=total, desc=name, unit=unit, dynamic_ncols=True, file=sys.stderr)
        return bars[name]

    for event in follow_events(events_file, stop, offset=offset):
        kind = event["type"]
        if kind == "class_images":
            b = bar("class images", event["total"], "img")
            b.n = event["done"]
            b.refresh()
        elif kind == "progress":
            b = bar("training", event["total_steps"], "step")
            b.n = event["step"]
            b.set_postfix(loss=f"{event['loss']:.4f}", lr=f"{event['lr']:.2e}", refresh=False)
            b.refresh()
        elif kind == "state":
            tqdm.write(
                f"[{event['state']}]" + (f" {event.get('message', '')}" if event["state"] == "FAILED" else ""),
                file=sys.stderr,
            )
        elif kind in ("checkpoint", "validation", "resumed"):
            tqdm.write(
                f"{kind} at step {event['step']}" + (f": {event['path']}" if "path" in event else ""), file=sys.stderr
            )
    for b in bars.values():
        b.close()


if __name__ == "__main__":
    sys.exit(main())
