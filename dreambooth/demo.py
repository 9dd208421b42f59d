"""The demo: the whole system on this machine, offline, with nothing to download.

It writes the tiny random base model (or uses --base-model, real Stable Diffusion weights in diffusers format),
draws a small subject image set (a toy robot on different backgrounds), brings up the local stack (Ray, the
controller, Serve: dreambooth/stack.py) unless one is running, submits the job over gRPC and follows it,
deploys the trained model, generates images over HTTP and writes an HTML page of it all (dreambooth/demo_page.py).
The tiny model is random: its images are noise. The pipeline around it is the real one.
"""

from __future__ import annotations

import contextlib
import random
import shutil
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from PIL import Image, ImageDraw, ImageFilter

from dreambooth import stack
from dreambooth.errors import InputError
from trainer.preflight import check_trainable_base_model
from trainer.spec import JobSpec

if TYPE_CHECKING:
    from dreambooth.client import DreamBoothClient

# What the deployed model is asked to draw: the subject in places none of its photos show.
PROMPTS = ("a photo of sks robot on the beach", "a sks robot in the snow", "a sks robot on a wooden table")
IMAGES_PER_PROMPT = 2
OUT_MARKER = ".dreambooth-demo"  # in the output folder: the demo's own, which a rerun may rewrite
TINY_NOTE = (
    "The base model is the tiny random one: every image it draws is noise. The training, checkpoints, export, "
    "deployment and serving around it are the real ones; run with --base-model for real images."
)


def draw_subject_images(out_dir: Path, count: int = 4, size: int = 128) -> Path:
    """A made-up subject: the same toy robot in `count` photos with other backgrounds, angles and scales,
    drawn at 128 px and saved at `size` px."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(7)
    for i in range(count):
        background = tuple(rng.randrange(60, 230) for _ in range(3))
        image = Image.new("RGB", (128, 128), background)
        draw = ImageDraw.Draw(image)
        for _ in range(6):  # some clutter, so the subject is what the photos have in common
            x, y = rng.randrange(128), rng.randrange(128)
            draw.ellipse((x, y, x + 20, y + 12), fill=tuple(rng.randrange(256) for _ in range(3)))
        robot = Image.new("RGBA", (64, 80), (0, 0, 0, 0))
        parts = ImageDraw.Draw(robot)
        parts.rectangle((14, 4, 50, 30), fill=(200, 40, 40))  # head
        parts.ellipse((20, 12, 28, 20), fill=(255, 255, 0))  # eyes
        parts.ellipse((36, 12, 44, 20), fill=(255, 255, 0))
        parts.rectangle((8, 34, 56, 72), fill=(40, 60, 200))  # body
        parts.rectangle((26, 44, 38, 56), fill=(250, 250, 250))  # badge
        robot = robot.rotate(rng.uniform(-20, 20), expand=True).resize((int(64 * (0.9 + 0.1 * i)),) * 2)
        image.paste(robot, (rng.randrange(8, 40), rng.randrange(8, 40)), robot)
        image = image.filter(ImageFilter.SMOOTH).resize((size, size), Image.Resampling.LANCZOS)
        image.save(out_dir / f"robot_{i}.png")
    return out_dir


def demo_spec(base_model: Path, images: Path, *, tiny: bool) -> JobSpec:
    """Small enough to finish in about a minute on two CPU cores with the tiny model."""
    return JobSpec(
        base_model=str(base_model),
        instance_images=[str(images)],
        instance_prompt="a photo of sks robot",
        class_prompt="a photo of robot",
        num_class_images=8 if tiny else 100,
        class_image_inference_steps=4 if tiny else 25,
        resolution=64 if tiny else 512,
        max_steps=20 if tiny else 400,
        learning_rate=1e-4 if tiny else 5e-6,
        precision="fp32" if tiny else "fp16",
        gpus_per_worker=0 if tiny else 1,
        checkpoint_interval=10 if tiny else 100,
        validation_prompts=["a photo of sks robot", "a sks robot on the beach"],
        validation_interval=10 if tiny else 100,
        validation_inference_steps=4 if tiny else 25,
        num_workers=1,
    )


def run(
    out: Path,
    *,
    base_model: Path | None,
    stack_dir: Path,
    keep_running: bool,
    start: Mapping[str, Any],
    follow: Callable[[DreamBoothClient, str], int],
) -> int:
    """The demo, start to end; 0 when it all worked. `start`: stack.up's options, for when no stack is running in
    `stack_dir` (a running one is used as it is, with a warning for each of them it does not honour); `follow`
    renders a job's progress until it ends (0: it succeeded)."""
    from dreambooth.client import DEFAULT_TARGET, DreamBoothClient
    from dreambooth.tiny_model import build_tiny_model

    started = time.monotonic()
    out = out.resolve()
    _claim(out)
    tiny = base_model is None
    _say("== 1/4 the subject photos and the base model")
    if not tiny and not _has_gpu():
        raise InputError("base_model", "real weights are trained in fp16 on a GPU, and this machine has none")
    base = build_tiny_model(out / "tiny-sd") if tiny else base_model.resolve()
    if not tiny:
        check_trainable_base_model(base)  # before the stack starts: a wrong path is told in a second, not after minutes
    if tiny:
        _say("Using the tiny random model: the pipeline is real, the images it draws are noise.")
    images = draw_subject_images(out / "subject", size=128 if tiny else 512)
    spec = demo_spec(base, images, tiny=tiny)
    (out / "job.yaml").write_text(yaml.safe_dump(spec.to_dict(), sort_keys=False))  # to submit again, or edit

    _say(f"== 2/4 the local stack ({stack_dir})")
    running = stack.running(stack_dir)
    if running is not None:
        for ignored in _ignored_start_options(running, start):
            _say(f"warning: {ignored}; `dreambooth down --dir {stack_dir}` first to start one with it")
        # A stack partly down (Ray killed for memory, the controller left) would hold the job for ever, unsaid.
        if down := [c.name for c in stack.health(running) if not c.up and c.name in ("Ray", "controller")]:
            raise stack.StackError(
                f"the stack in {stack_dir} is partly down ({', '.join(down)}): `dreambooth down --dir {stack_dir}`, "
                "then run the demo again"
            )
        _say("using the stack that is already running there (it stays up)")
    local = running or stack.up(stack_dir, **start, say=_say)
    try:
        # Not the user's $DREAMBOOTH_TOKEN or $DREAMBOOTH_TLS_CA, which are for another controller.
        with DreamBoothClient(local.controller, from_environment=False) as client:
            job = client.submit(spec)
            _say(f"== 3/4 training: job {job.job_id}, submitted to the controller at {local.controller}")
            try:
                if follow(client, job.job_id) != 0:
                    _say(f"the job did not succeed; the end of its log:\n{client.logs(job.job_id)[-3000:]}")
                    return 1
            except BaseException:
                # Interrupted (Ctrl-C): the demo's job is no one else's, and left unfinished in the stack's database,
                # the next `up` on that storage ran it again, beside the next demo's job, once per demo interrupted.
                with contextlib.suppress(Exception):
                    client.cancel(job.job_id)
                raise
            job = client.get(job.job_id)
            _say(f"== 4/4 serving: deploying model {job.model_id}, generating images over HTTP")
            model = client.deploy(job.model_id)
            generated = _generate(model.endpoint, out / "generated", steps=25)
        page = _write_page(out, spec, job, local, model.endpoint, generated, tiny=tiny)
    finally:
        if running is None and not keep_running:
            _say("stopping the local stack (--keep-running leaves it up)")
            stack.down(stack_dir)
    where = f" --dir {stack_dir.resolve()}"  # to be run from anywhere: scripts/demo runs in the repository
    stays = running is not None or keep_running
    _say(
        f"\ndone in {time.monotonic() - started:.0f} s\n"
        f"  page:             {page}\n"
        f"  job spec:         {out / 'job.yaml'}\n"
        f"  subject photos:   {images}\n"
        f"  validation grids: {out / 'validation'}\n"
        f"  generated images: {out / 'generated'}\n"
        f"  model:            {model.path}\n"
        + (
            f"  endpoint:         {model.endpoint}\n"
            f"  controller:       {local.controller}"
            + ("" if local.controller == DEFAULT_TARGET else f" (the CLI's --controller {local.controller})")
            + f"\nthe stack is still up: `dreambooth status{where}`, `dreambooth down{where}`"
            if stays
            else f"the stack is stopped; `dreambooth up{where}` starts it again on the same storage"
        )
    )
    return 0


def _ignored_start_options(running: stack.Stack, start: Mapping[str, Any]) -> list[str]:
    """The options the user gave to start a stack (`start`, stack.up's) that the stack already running does not
    honour, each with the running stack's value where it is known."""
    ignored = []
    storage = start.get("storage")
    if storage is not None and Path(storage).resolve() != Path(running.storage).resolve():
        ignored.append(f"--storage {storage} is ignored: the running stack's storage is {running.storage}")
    addresses = {
        "controller": running.controller,
        "controller_metrics": running.controller_metrics,
        "dashboard": running.dashboard_url,
        "ray_metrics": running.ray_metrics,
        "serve": running.serve_url,
    }
    for name in stack.PORT_USES:
        port = getattr(start.get("ports"), name, None)
        its = addresses[name].rpartition(":")[2]
        if port and str(port) != its:  # 0 asks for any free port, which the running stack's is
            ignored.append(f"--{name.replace('_', '-')}-port {port} is ignored: the running stack's is {its}")
    if (num_cpus := start.get("num_cpus")) is not None:
        ignored.append(f"--num-cpus {num_cpus} is ignored: the running stack's Ray keeps the CPUs it started with")
    return ignored


def _generate(endpoint: str, out_dir: Path, steps: int) -> list[tuple[Path, str]]:
    """Images of each prompt from the served model, as (PNG file, caption)."""
    from dreambooth.serving_client import generate, wait_until_served

    wait_until_served(endpoint)
    _fresh(out_dir)
    results = []
    for number, prompt in enumerate(PROMPTS):
        seed = number * IMAGES_PER_PROMPT
        for image in generate(endpoint, prompt, num_images=IMAGES_PER_PROMPT, steps=steps, seed=seed):
            path = out_dir / f"{number}-{image.seed}.png"
            path.write_bytes(image.png)
            results.append((path, f"{prompt} (seed {image.seed})"))
    _say(f"{len(results)} images from {endpoint}")
    return results


def _write_page(out: Path, spec: JobSpec, job, local: stack.Stack, endpoint: str, generated, *, tiny: bool) -> Path:
    from dreambooth.demo_page import write_page
    from trainer.events import read_events
    from trainer.storage import job_paths

    paths = job_paths(local.storage, job.job_id)
    _fresh(out / "validation")
    grids = []
    for step, grid in paths.validation_grids():
        copy = Path(shutil.copy2(grid, out / "validation" / grid.name))
        grids.append((copy, f"step {step}; one row per prompt: " + "; ".join(spec.validation_prompts)))
    losses = [(e["step"], e["loss"]) for e in read_events(paths.events_file) if e["type"] == "progress"]
    subject = [(p, p.name) for p in sorted(Path(spec.instance_images[0]).glob("*.png"))]
    wall = job.end_time.ToSeconds() - job.start_time.ToSeconds()
    facts = [
        ("job", job.job_id),
        ("base model", spec.base_model),
        ("instance prompt", spec.instance_prompt),
        ("training", f"{job.progress.step} steps, final loss {job.progress.loss:.4f}, {wall} s"),
        ("model", job.model_id),
        ("endpoint", endpoint),
        *[(name, address) for name, address in local.addresses()],
    ]
    return write_page(
        out,
        title="DreamBooth demo: sks robot",
        note=TINY_NOTE if tiny else "",
        facts=facts,
        galleries=[
            ("Subject photos (the training set)", subject),
            ("Validation grids during training", grids),
            ("Generated by the deployed model", generated),
        ],
        loss_points=losses,
    )


def _has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def _claim(out: Path) -> None:
    """The demo rewrites its own earlier output in `out` (its folders emptied, its files replaced); a folder that
    holds anything else is refused, not clobbered (`--out .` in a project with its own job.yaml, say)."""
    marker = out / OUT_MARKER
    earlier = all((out / name).exists() for name in ("index.html", "job.yaml", "subject"))  # before the marker
    if out.exists() and any(out.iterdir()) and not marker.exists() and not earlier:
        raise InputError("out", f"{out} holds files the demo did not write: give an empty or new folder")
    out.mkdir(parents=True, exist_ok=True)
    marker.write_text("written by `dreambooth demo`, which rewrites this folder when run again with it\n")


def _fresh(directory: Path) -> None:
    """An empty directory: images of an earlier run must not show on this run's page."""
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
