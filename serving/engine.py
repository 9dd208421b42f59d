"""The sampling engine: batched classifier-free guidance over subject models, plain Python + torch.

Ray Serve replicas call it (serving/app.py), and so does the benchmark on machines without Serve. One call
samples a batch of requests for one model and one shape: every step runs a single UNet forward over the
unconditional and conditional halves of every request, and each sample gets its own guidance scale, so requests
with different scales share the batch. Image i of a request is drawn from its own generator seeded `seed + i`
(the latents and any scheduler noise), which makes a request's images the same whether it ran alone or in a batch,
and the same as diffusers' StableDiffusionPipeline given the same per-image generators.
"""

from __future__ import annotations

import inspect
import json
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import SchedulerMixin
from PIL import Image

from dreambooth.errors import InputError
from dreambooth.sd_model import load_base_model

METADATA_FILE = "metadata.json"  # written by trainer/export.py next to the diffusers files


@dataclass(frozen=True)
class GenerationRequest:
    """One client request; validated for bounds by the HTTP layer, for prompt length by `SubjectModel`."""

    prompt: str
    negative_prompt: str = ""
    num_images: int = 1
    steps: int = 25
    guidance_scale: float = 7.5
    seed: int = 0
    width: int = 512
    height: int = 512

    @property
    def shape_key(self) -> tuple[int, int, int]:
        """Requests with equal keys can share a batch (the same timesteps and latent size)."""
        return (self.steps, self.height, self.width)


@dataclass(eq=False)  # identity semantics: one object per loaded model (hashable, for weak sets)
class SubjectModel:
    """A loaded subject model; VAE, tokenizer and a frozen text encoder may be shared with other subjects."""

    model_id: str
    path: Path
    metadata: dict[str, Any]
    tokenizer: Any
    text_encoder: torch.nn.Module
    unet: torch.nn.Module
    vae: torch.nn.Module
    scheduler: SchedulerMixin  # a template: each batch gets a fresh copy (schedulers keep per-run state)
    load_seconds: float = 0.0
    compiled_unet: torch.nn.Module | None = None  # the UNet through torch.compile, for the native size

    @property
    def native_size(self) -> tuple[int, int]:
        """(height, width) in pixels the UNet was trained at (512x512 for SD 1.5)."""
        side = self.unet.config.sample_size * self.vae_scale_factor
        return side, side

    @property
    def vae_scale_factor(self) -> int:
        """Image pixels per latent pixel (8 for Stable Diffusion; the tiny test model's VAE has fewer levels)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def check_prompt(self, name: str, text: str) -> None:
        """Refuses a prompt longer than the text encoder's context instead of silently cutting it."""
        tokens = len(self.tokenizer(text, truncation=False).input_ids)
        limit = self.tokenizer.model_max_length
        if tokens > limit:
            raise InputError(name, f"{tokens} tokens; at most {limit} (including start/end tokens), shorten it")


@dataclass
class GenerationResult:
    images: list[Image.Image]
    seeds: list[int]
    batch_size: int  # requests sampled together in this call
    batch_images: int  # images sampled together in this call
    inference_seconds: float
    queue_wait_seconds: float = 0.0  # before the batch started; set by the serving replica
    compiled_unet: bool = False  # sampled with the torch.compile'd UNet


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    # fp16 on GPUs; CPUs are slow and imprecise in half precision, so fp32 there.
    return torch.float16 if device.type == "cuda" else torch.float32


class SamplingEngine:
    """Loads subject models and samples batches of requests for them.

    `compile_unet=True` also runs each loaded UNet through torch.compile, for requests at the model's native
    size (other sizes sample eagerly: each new image size would cost minutes of compiling). The batch dimension
    is symbolic, so a couple of graphs serve every batch size (torch splits the range where some operator's
    choice depends on it: at 16 rows on a CPU), and, parameters being graph inputs, every subject of one
    architecture shares them. `warm_up` compiles them (minutes for SD 1.5 on a GPU; torch caches the code on
    disk): a Serve replica calls it when it starts and after each model load, where it costs two one-step
    batches once the graphs exist.
    """

    def __init__(
        self, device: torch.device | str | None = None, dtype: torch.dtype | None = None, compile_unet: bool = False
    ):
        self.device = torch.device(device) if device is not None else default_device()
        self.dtype = dtype if dtype is not None else default_dtype(self.device)
        self.compile_unet = compile_unet
        # Components shared between subjects of one base model, alive while some loaded subject uses them.
        self._shared: weakref.WeakValueDictionary = weakref.WeakValueDictionary()

    def load(self, model_id: str, path: str | Path) -> SubjectModel:
        """Loads the exported model at `path`.

        The VAE is frozen during DreamBooth training, so every subject of one base model carries the same VAE;
        it is loaded once per engine (keyed by the base model's fingerprint in metadata.json). So are the
        tokenizer and, when it was not trained, the text encoder.
        """
        start = time.perf_counter()
        path = Path(path)
        metadata = read_metadata(path)
        base = metadata.get("base_model_fingerprint")
        text_encoder_trained = bool(metadata.get("hyperparameters", {}).get("train_text_encoder", True))
        shared_kinds = {"vae", "tokenizer"} | (set() if text_encoder_trained else {"text_encoder"})

        modules: dict[str, Any] = {}
        to_load = ["unet"]
        for kind in ("vae", "tokenizer", "text_encoder"):
            cached = self._shared.get((kind, base)) if base and kind in shared_kinds else None
            if cached is None:
                to_load.append(kind)
            else:
                modules[kind] = cached
        loaded = load_base_model(path, dtype=self.dtype, device=self.device, components=to_load)
        for kind in to_load:
            module = getattr(loaded, kind)
            modules[kind] = module
            if base and kind in shared_kinds:
                self._shared[(kind, base)] = module
        for kind in ("unet", "vae", "text_encoder"):
            modules[kind].eval().requires_grad_(False)
        if self.device.type == "cuda":  # NHWC convolutions: the faster layout on tensor cores
            for kind in ("unet", "vae"):
                modules[kind].to(memory_format=torch.channels_last)
        compiled_unet = torch.compile(modules["unet"]) if self.compile_unet else None
        return SubjectModel(
            model_id=model_id,
            path=path,
            metadata=metadata,
            tokenizer=modules["tokenizer"],
            text_encoder=modules["text_encoder"],
            unet=modules["unet"],
            vae=modules["vae"],
            scheduler=_sampling_scheduler(path),
            load_seconds=time.perf_counter() - start,
            compiled_unet=compiled_unet,
        )

    def warm_up(self, model: SubjectModel, max_images: int) -> None:
        """One-step batches of 1 and `max_images` images at the native size: compiles what `compile_unet`
        needs (a no-op's worth of work otherwise), so that requests do not wait for it."""
        if model.compiled_unet is None:
            return
        height, width = model.native_size
        for images in sorted({1, max_images}):
            self.generate(model, [GenerationRequest("", num_images=images, steps=1, height=height, width=width)])

    @torch.inference_mode()
    def generate(self, model: SubjectModel, requests: list[GenerationRequest]) -> list[GenerationResult]:
        """Samples every request in one batch; all must share one `shape_key`."""
        keys = {request.shape_key for request in requests}
        if len(keys) != 1:
            raise ValueError(f"one batch holds one (steps, height, width); got {sorted(keys)}")
        steps, height, width = keys.pop()
        start = time.perf_counter()

        # One generator per image, used for its initial latents and for any noise the scheduler adds.
        seeds = [request.seed + i for request in requests for i in range(request.num_images)]
        generators = [torch.Generator("cpu").manual_seed(seed) for seed in seeds]
        guidance = torch.tensor(
            [request.guidance_scale for request in requests for _ in range(request.num_images)],
            device=self.device,
            dtype=self.dtype,
        ).view(-1, 1, 1, 1)

        positive = self._encode(model, [r.prompt for r in requests for _ in range(r.num_images)])
        negative = self._encode(model, [r.negative_prompt for r in requests for _ in range(r.num_images)])
        text_states = torch.cat([negative, positive])

        scheduler = model.scheduler.__class__.from_config(model.scheduler.config)
        scheduler.set_timesteps(steps, device=self.device)
        factor = model.vae_scale_factor
        latent_shape = (model.unet.config.in_channels, height // factor, width // factor)
        latents = torch.cat([torch.randn((1, *latent_shape), generator=g) for g in generators])
        latents = latents.to(self.device, self.dtype) * scheduler.init_noise_sigma
        step_kwargs = {"generator": generators} if _accepts(scheduler.step, "generator") else {}

        unet = model.unet
        if model.compiled_unet is not None and (height, width) == model.native_size:
            unet = model.compiled_unet
            torch._dynamo.maybe_mark_dynamic(text_states, 0)  # a symbolic batch size, not one graph per size
        for t in scheduler.timesteps:
            model_input = scheduler.scale_model_input(torch.cat([latents, latents]), t)
            if unet is model.compiled_unet:
                torch._dynamo.maybe_mark_dynamic(model_input, 0)
            noise = unet(model_input, t, encoder_hidden_states=text_states, return_dict=False)[0]
            noise_uncond, noise_cond = noise.chunk(2)
            noise = noise_uncond + guidance * (noise_cond - noise_uncond)
            latents = scheduler.step(noise, t, latents, return_dict=False, **step_kwargs)[0]

        pixels = model.vae.decode(latents / model.vae.config.scaling_factor, return_dict=False)[0]
        pixels = (pixels / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).float().cpu().numpy()
        images = [Image.fromarray(array) for array in (pixels * 255).round().astype(np.uint8)]
        elapsed = time.perf_counter() - start

        results, offset = [], 0
        for request in requests:
            count = request.num_images
            results.append(
                GenerationResult(
                    images=images[offset : offset + count],
                    seeds=seeds[offset : offset + count],
                    batch_size=len(requests),
                    batch_images=len(images),
                    inference_seconds=elapsed,
                    compiled_unet=unet is model.compiled_unet,
                )
            )
            offset += count
        return results

    def _encode(self, model: SubjectModel, texts: list[str]) -> torch.Tensor:
        tokens = model.tokenizer(
            texts,
            padding="max_length",
            max_length=model.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        # Encode each distinct text once: a batch often repeats one prompt (several images, an empty negative).
        unique, index = torch.unique(tokens.input_ids, dim=0, return_inverse=True)
        states = model.text_encoder(unique.to(self.device), return_dict=False)[0]
        return states[index.to(self.device)]


def read_metadata(path: Path) -> dict[str, Any]:
    file = path / METADATA_FILE
    return json.loads(file.read_text()) if file.is_file() else {}


def _sampling_scheduler(path: Path) -> SchedulerMixin:
    """The scheduler named in model_index.json (what StableDiffusionPipeline samples with, e.g. PNDM for SD 1.5)."""
    import diffusers

    _, class_name = json.loads((path / "model_index.json").read_text())["scheduler"]
    return getattr(diffusers, class_name).from_pretrained(path, subfolder="scheduler", local_files_only=True)


def _accepts(function, name: str) -> bool:
    return name in inspect.signature(function).parameters
