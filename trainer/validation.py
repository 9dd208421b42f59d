"""Validation images: the validation prompts sampled with fixed seeds, saved as one PNG grid per step.

The same seeds at every step make grids comparable across steps: what changes is the model, not the noise. Each
cell's noise is drawn on the host from its seed, as serving draws a request's, and the grid's PNG names the seeds
(`GRID_METADATA_KEY`): the final grid's cells are what the exported model serves for that prompt and seed, at the
grid's steps, guidance and size (as close as the precisions allow).
"""

from __future__ import annotations

import io
import itertools
import json
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from dreambooth.durable import write_file
from trainer.data import derive_seed

GRID_METADATA_KEY = "dreambooth"  # a PNG text chunk: JSON of the grid's sampling settings and its cells' seeds
GUIDANCE_SCALE = 7.5  # serving's default too


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
        grid_path: Callable[[int], Path],
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
        self.grid_path = grid_path  # where a step's grid goes
        self.compute_dtype = compute_dtype

    @torch.no_grad()
    def run(self, step: int, rank: int = 0, world_size: int = 1, save: bool = True) -> Path:
        """Samples the grid of this step and, on rank 0 with `save`, writes it. With `world_size` > 1 each rank
        samples its share of the images (every world_size-th) and rank 0 gathers them: every rank must call this."""
        device = self.pipeline.unet.device
        # Frozen parts may be kept in fp32 (CPU) while the trained UNet is bf16/fp16: autocast reconciles them.
        autocast = (
            torch.autocast(device.type, dtype=self.compute_dtype)
            if self.compute_dtype != torch.float32
            else nullcontext()
        )
        was_training = self.pipeline.unet.training
        self.pipeline.unet.eval()
        cells = [(p, i) for p in range(len(self.prompts)) for i in range(self.images_per_prompt)]
        images: dict[tuple[int, int], Image.Image] = {}
        with autocast:
            for p, share in itertools.groupby(cells[rank::world_size], key=lambda cell: cell[0]):
                indices = [i for _, i in share]
                result = self.pipeline(
                    [self.prompts[p]] * len(indices),
                    num_inference_steps=self.inference_steps,
                    guidance_scale=GUIDANCE_SCALE,
                    height=self.resolution,
                    width=self.resolution,
                    generator=[torch.Generator("cpu").manual_seed(self.cell_seed(p, i)) for i in indices],
                )
                images.update(zip([(p, i) for i in indices], result.images, strict=True))
        self.pipeline.unet.train(was_training)
        if world_size > 1:
            shares = [None] * world_size if rank == 0 else None
            torch.distributed.gather_object(images, shares, dst=0)
            images = {cell: image for share in shares or [] for cell, image in share.items()}
        path = self.grid_path(step)
        if save and rank == 0:
            # Whole or not at all: a run resumed after a crash here draws it again only where it is missing.
            rows = [[images[(p, i)] for i in range(self.images_per_prompt)] for p in range(len(self.prompts))]
            path.parent.mkdir(parents=True, exist_ok=True)
            png = io.BytesIO()
            image_grid(rows).save(png, format="PNG", pnginfo=self.grid_metadata(step))
            write_file(path, png.getvalue())
        return path

    def cell_seed(self, prompt: int, image: int) -> int:
        return derive_seed(self.seed, prompt, image)

    def grid_metadata(self, step: int) -> PngInfo:
        """The grid's sampling settings and, row by row, each cell's prompt and seed: a serving request with them
        draws the cell again."""
        cells = [
            [{"prompt": prompt, "seed": self.cell_seed(p, i)} for i in range(self.images_per_prompt)]
            for p, prompt in enumerate(self.prompts)
        ]
        settings = {
            "step": step,
            "steps": self.inference_steps,
            "guidance_scale": GUIDANCE_SCALE,
            "width": self.resolution,
            "height": self.resolution,
            "cells": cells,
        }
        info = PngInfo()
        info.add_text(GRID_METADATA_KEY, json.dumps(settings))
        return info


def image_grid(rows: list[list[Image.Image]]) -> Image.Image:
    w, h = rows[0][0].size
    grid = Image.new("RGB", (w * max(len(r) for r in rows), h * len(rows)), "white")
    for y, row in enumerate(rows):
        for x, image in enumerate(row):
            grid.paste(image, (x * w, y * h))
    return grid
