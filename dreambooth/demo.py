"""The local demo: a whole DreamBooth job on this machine, offline, with nothing to download.

It writes the tiny random base model (or uses --base-model, real Stable Diffusion weights in diffusers format),
draws a small subject image set (a toy robot on different backgrounds), and trains on a private local Ray.
The tiny model is random: its images are noise. The pipeline around it is the real one.
"""

from __future__ import annotations

import random
from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter

from trainer.spec import JobSpec


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
