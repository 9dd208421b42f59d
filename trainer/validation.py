"""Validation images: the validation prompts sampled with fixed seeds, saved as one PNG grid per step.

The same seeds at every step make grids comparable across steps: what changes is the model, not the noise.
"""

from __future__ import annotations

import io
from contextlib import nullcontext
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline
from PIL import Image

from dreambooth.durable import write_file
from trainer.data import derive_seed


class Validator:
    """Holds a sampling pipeline over the in-training modules (shared, not copied), so each validation only
    runs the sampler."""

    def __init__(
        self,
        pipeline: StableDiffusionPipeline,
        *,
        prompts: list[str],
        images_per_prompt: int,
        inference_steps: int,
        resolution: int,
        seed: int,
        out_dir: Path,
        compute_dtype: torch.dtype,
    ):
        self.pipeline = pipeline
        # Decode one image at a time: validation runs beside the optimizer's states, and decoding 512 px images
        # is its largest transient (a few hundred MiB an image in half precision for SD 1.5's VAE).
        pipeline.vae.enable_slicing()
        self.prompts = prompts
        self.images_per_prompt = images_per_prompt
        self.inference_steps = inference_steps
        self.resolution = resolution
        self.seed = seed
        self.out_dir = out_dir
        self.compute_dtype = compute_dtype

    @torch.no_grad()
    def run(self, step: int, save: bool = True) -> Path:
        device = self.pipeline.unet.device
        # Frozen parts may be kept in fp32 (CPU) while the trained UNet is bf16/fp16: autocast reconciles them.
        autocast = (
            torch.autocast(device.type, dtype=self.compute_dtype)
            if self.compute_dtype != torch.float32
            else nullcontext()
        )
        was_training = self.pipeline.unet.training
        self.pipeline.unet.eval()
        rows = []
        with autocast:
            for p, prompt in enumerate(self.prompts):
                generators = [
                    torch.Generator(device).manual_seed(derive_seed(self.seed, p, i))
                    for i in range(self.images_per_prompt)
                ]
                result = self.pipeline(
                    [prompt] * self.images_per_prompt,
                    num_inference_steps=self.inference_steps,
                    height=self.resolution,
                    width=self.resolution,
                    generator=generators,
                )
                rows.append(result.images)
        self.pipeline.unet.train(was_training)
        path = self.out_dir / f"step_{step:07d}.png"
        if save:
            # Whole or not at all: a run resumed after a crash here does not draw this step's grid again.
            path.parent.mkdir(parents=True, exist_ok=True)
            png = io.BytesIO()
            image_grid(rows).save(png, format="PNG")
            write_file(path, png.getvalue())
        return path


def image_grid(rows: list[list[Image.Image]]) -> Image.Image:
    w, h = rows[0][0].size
    grid = Image.new("RGB", (w * max(len(r) for r in rows), h * len(rows)), "white")
    for y, row in enumerate(rows):
        for x, image in enumerate(row):
            grid.paste(image, (x * w, y * h))
    return grid
