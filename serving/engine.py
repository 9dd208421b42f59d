"""The sampling engine: batched classifier-free guidance over subject models, plain Python + torch.

Ray Serve replicas call it (serving/generator.py, through serving/step_batching.py), and so does the benchmark on
machines without Serve. Requests that start together form a `Cohort`: one scheduler run over their latents. Every
denoising step runs a single UNet forward over the unconditional and conditional halves of every request of one or
more cohorts (of one model and image size; each sample carries its own timestep, so a cohort can join others
part-way through), and each sample gets its own guidance scale, so requests with different scales share it. An image
without guidance (a scale up to 1: distilled models sample so) has no unconditional half: it costs half a guided one.
Image i of a request is drawn from its own generator seeded `seed + i` (the latents and any scheduler noise), which
makes a request's images the same whether it ran alone or in a batch, and the same as diffusers'
StableDiffusionPipeline given the same per-image generators.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import threading
import time
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import SchedulerMixin
from PIL import Image

from dreambooth.model_files import ModelMetadata, check_inference_steps, pipeline_scheduler
from dreambooth.sd_model import check_prompt, load_base_model

logger = logging.getLogger(__name__)
# The VAE decodes a cohort this many images at a time: its peak memory grows with the images decoded at once (about
# twice a denoising step's per image), so a cohort whose steps fitted the GPU could run out of memory in its decode,
# failing every request in it, on every retry. Four images keep a GPU busy.
DECODE_IMAGES_AT_ONCE = 4


@dataclass(frozen=True)
class GenerationRequest:
    """One client request; its bounds checked by the HTTP layer, its prompts by `SamplingEngine.check_prompts`."""

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
    metadata: ModelMetadata
    tokenizer: Any
    text_encoder: torch.nn.Module
    unet: torch.nn.Module
    vae: torch.nn.Module
    scheduler: SchedulerMixin  # a template: each cohort gets a fresh copy (schedulers keep per-run state)
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


class ModelUnavailable(RuntimeError):
    """A deployed model's files cannot be read or loaded (gone, incomplete, corrupt): the operator's to fix, not the
    client's. Its message names the model's path: for the replica's log, not for HTTP clients."""


@contextlib.contextmanager
def _loading(path: str | Path) -> Iterator[None]:
    try:
        yield
    except torch.OutOfMemoryError:  # the device's state, not the model's: the caller's to answer
        raise
    except Exception as e:  # whatever the files do to the loaders (missing, truncated safetensors, a bad config)
        raise ModelUnavailable(f"the model at {path} cannot be loaded: {type(e).__name__}: {e}") from e


@dataclass
class GenerationResult:
    images: list[Image.Image]
    seeds: list[int]
    batch_size: int  # the most requests that shared a UNet forward with this one (itself included)
    batch_images: int  # the most images that shared a UNet forward with this request's
    inference_seconds: float  # from its first denoising step to its images
    queue_wait_seconds: float = 0.0  # before its first denoising step; set by the step batcher
    compiled_unet: bool = False  # sampled with the torch.compile'd UNet


@dataclass(eq=False)
class Cohort:
    """Requests that started sampling together: one scheduler run over their latents, stepped by
    `SamplingEngine.denoise` (alone, or with other cohorts of the same model and image size)."""

    model: SubjectModel
    requests: list[GenerationRequest]
    seeds: list[int]  # one per image
    guidance: torch.Tensor  # (images, 1, 1, 1), 1 for an image without guidance
    # The images with guidance (a scale above 1) as a device index, None when that is every image: only they have an
    # unconditional half. The UNet's rows are theirs, then a conditional one per image (`unet_rows` in all).
    guided: torch.Tensor | None
    text_states: torch.Tensor  # the guided images' negative prompts' states, then every image's prompt's
    latents: torch.Tensor
    scheduler: SchedulerMixin  # this cohort's own: schedulers keep per-run state; its timesteps on the host
    unet_timesteps: torch.Tensor  # the scheduler's timesteps on the device, as the UNet takes them
    step_kwargs: dict[str, Any]  # for its scheduler's step: the per-image generators, where it draws noise
    step: int = 0  # denoising steps done
    # time.monotonic() when its first denoising step was queued: on a GPU the host runs up to about a step ahead of
    # the device, so the queue wait it ends reads that much short
    first_step: float = 0.0
    peak_requests: int = 0  # the most requests that shared one of its UNet forwards
    peak_images: int = 0
    compiled_unet: bool = False

    @property
    def images(self) -> int:
        return len(self.seeds)

    @property
    def unet_rows(self) -> int:
        return self.images + (self.images if self.guided is None else len(self.guided))  # the index's host shape

    @property
    def size(self) -> tuple[int, int]:
        """(height, width) in pixels."""
        return self.requests[0].height, self.requests[0].width

    @property
    def done(self) -> bool:
        return self.step == len(self.scheduler.timesteps)


@dataclass
class DecodedCohort:
    """A cohort's images on their way to the host (`SamplingEngine.decode`)."""

    cohort: Cohort
    pixels: torch.Tensor  # uint8 (images, height, width, 3) on the host, complete once `copied` has happened
    copied: torch.cuda.Event | None = None

    def results(self) -> list[GenerationResult]:
        """One result per request of the cohort, once its images are on the host."""
        if self.copied is not None:
            self.copied.synchronize()
        images = [Image.fromarray(array) for array in self.pixels.numpy()]
        cohort = self.cohort
        elapsed = time.monotonic() - cohort.first_step
        results, offset = [], 0
        for request in cohort.requests:
            count = request.num_images
            results.append(
                GenerationResult(
                    images=images[offset : offset + count],
                    seeds=cohort.seeds[offset : offset + count],
                    batch_size=cohort.peak_requests,
                    batch_images=cohort.peak_images,
                    inference_seconds=elapsed,
                    compiled_unet=cohort.compiled_unet,
                )
            )
            offset += count
        return results


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
    disk): a Serve replica calls it when it starts and after each model load of an architecture, size or batch
    limit it has not warmed up yet (another subject's load would otherwise hold every running request for two
    one-step batches with full decodes, for graphs that exist).
    """

    def __init__(
        self, device: torch.device | str | None = None, dtype: torch.dtype | None = None, compile_unet: bool = False
    ):
        self.device = torch.device(device) if device is not None else default_device()
        self.dtype = dtype if dtype is not None else default_dtype(self.device)
        self.compile_unet = compile_unet
        # Components shared between subjects of one base model, alive while some loaded subject uses them; those of
        # the base loaded last are kept anyway: a replica holding one model at a time (max_models_per_replica: 1)
        # would otherwise load the same VAE again with every subject it swaps in.
        self._shared: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
        self._last_base_shared: list[torch.nn.Module] = []
        # Tokenizers (a few MB) are kept: by model directory, one object per base model.
        self._tokenizers: dict[str, Any] = {}
        self._base_tokenizers: dict[str, Any] = {}
        # A fast tokenizer sets its truncation and padding on its shared Rust object at each call, then encodes: the
        # prompt checks (a replica's request threads) and the batches' encoding (its device thread) take turns.
        self._tokenizing = threading.Lock()
        # What warm_up compiled: the graphs' key (see warm_up) -> the batch sizes of images run.
        self._warmed: dict[tuple, set[int]] = {}
        self._uncompilable: set[tuple] = set()  # warm_up's keys whose compiling failed

    def tokenizer(self, path: str | Path):
        """The tokenizer of the model at `path`, loaded once per base model and kept: what a request's prompts are
        checked with before its model loads."""
        tokenizer = self._tokenizers.get(str(path))
        if tokenizer is None:
            with _loading(path):
                base = ModelMetadata.read(Path(path)).shared_base
                tokenizer = self._base_tokenizers.get(base) if base else None
                if tokenizer is None:
                    tokenizer = load_base_model(path, components=["tokenizer"]).tokenizer
                    if base:
                        self._base_tokenizers[base] = tokenizer
            self._tokenizers[str(path)] = tokenizer
        return tokenizer

    def holds_tokenizer(self, path: str | Path) -> bool:
        """Whether the tokenizer of the model at `path` is loaded already (`tokenizer` reads no file for it)."""
        return str(path) in self._tokenizers

    def check_prompts(self, path: str | Path, prompts: dict[str, str]) -> None:
        """Refuses (InputError naming it) a prompt that the text encoder of the model at `path` cannot take whole."""
        tokenizer = self.tokenizer(path)
        with self._tokenizing:
            for name, text in prompts.items():
                check_prompt(tokenizer, name, text)

    def load(self, model_id: str, path: str | Path) -> SubjectModel:
        """Loads the exported model at `path`.

        The VAE is frozen during DreamBooth training, so every subject of one base model carries the same VAE;
        it is loaded once per engine (keyed by the base model's fingerprint in metadata.json: `shared_base`), and
        kept while a subject of its base is loaded or its base was the last one loaded. So are the tokenizer and,
        when it was not trained, the text encoder. Raises ModelUnavailable when its files cannot be loaded.
        """
        with _loading(path):
            return self._load(model_id, Path(path))

    def _load(self, model_id: str, path: Path) -> SubjectModel:
        start = time.perf_counter()
        metadata = ModelMetadata.read(path)
        base = metadata.shared_base
        shared_kinds = {"vae"} | (set() if metadata.text_encoder_trained else {"text_encoder"})

        modules: dict[str, Any] = {"tokenizer": self.tokenizer(path)}
        to_load = ["unet"]
        for kind in ("vae", "text_encoder"):
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
        if base:
            self._last_base_shared = [modules[kind] for kind in shared_kinds]
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
            # As StableDiffusionPipeline corrects it (validation and class images sample with that): an old config,
            # as the export copies it from the base model, samples otherwise.
            scheduler=pipeline_scheduler(path),
            load_seconds=time.perf_counter() - start,
            compiled_unet=compiled_unet,
        )

    def warm_up(self, model: SubjectModel, max_images: int) -> None:
        """One-step batches of 1 and `max_images` images at the native size: compiles what `compile_unet`
        needs (a no-op's worth of work otherwise), so that requests do not wait for it. Where compiling fails (no
        C++ compiler on the node, an architecture the compiler cannot take), the model samples with its eager UNet,
        and so do the next ones of its architecture, without trying again: a failure left to requests failed each of
        them with a 500, after minutes of compiling on the device thread."""
        if model.compiled_unet is None:
            return
        height, width = model.native_size
        # What decides the graphs, but for the batch size: the UNet's config without where it was read from
        # ("_name_or_path": every subject's own folder), the size, the timesteps' dtype (int64 from PNDM or DDIM,
        # float32 from Euler), and the prompts' length in tokens.
        config = {key: value for key, value in model.unet.config.items() if not key.startswith("_")}
        key = (
            json.dumps(config, sort_keys=True, default=str),
            model.native_size,
            type(model.scheduler).__name__,
            model.tokenizer.model_max_length,
        )
        if key in self._uncompilable:
            model.compiled_unet = None
            return
        warmed = self._warmed.setdefault(key, set())
        try:
            for images in sorted({1, max_images} - warmed):
                self.generate(model, [GenerationRequest("", num_images=images, steps=1, height=height, width=width)])
                warmed.add(images)
        except torch.OutOfMemoryError:
            raise  # the device's state, not the compiler's: the caller's to answer
        except Exception:
            logger.exception("compiling the UNet of model %s failed: its architecture samples eagerly", model.model_id)
            self._uncompilable.add(key)
            model.compiled_unet = None

    def generate(self, model: SubjectModel, requests: list[GenerationRequest]) -> list[GenerationResult]:
        """Samples every request in one batch, alone; all must share one `shape_key`."""
        cohort = self.start(model, requests)
        while not cohort.done:
            self.denoise([cohort])
        return self.finish(cohort)

    @torch.inference_mode()
    def start(self, model: SubjectModel, requests: list[GenerationRequest]) -> Cohort:
        """Encodes the prompts and draws the initial latents of requests that share one `shape_key`."""
        keys = {request.shape_key for request in requests}
        if len(keys) != 1:
            raise ValueError(f"one batch holds one (steps, height, width); got {sorted(keys)}")
        steps, height, width = keys.pop()

        # One generator per image, used for its initial latents and for any noise the scheduler adds.
        seeds = [request.seed + i for request in requests for i in range(request.num_images)]
        generators = [torch.Generator("cpu").manual_seed(seed) for seed in seeds]
        # A scale up to 1 is no guidance, the prompt's prediction alone (its negative prompt unused), as in diffusers'
        # pipelines (below 1 the formula would lean towards the negative prompt, down to ignoring the prompt at 0).
        scales = [request.guidance_scale for request in requests for _ in range(request.num_images)]
        guided = [image for image, scale in enumerate(scales) if scale > 1]
        guidance = torch.tensor([max(scale, 1.0) for scale in scales], dtype=self.dtype).view(-1, 1, 1, 1)

        # The unconditional half first, as the UNet's rows are laid out; one text-encoder forward for both halves
        # (at a few images it is bound by its launches: the GPU idles while the host issues them).
        negative = [r.negative_prompt for r in requests for _ in range(r.num_images)]
        prompts = [r.prompt for r in requests for _ in range(r.num_images)]
        text_states = self._encode(model, [negative[image] for image in guided] + prompts)

        # The scheduler's timesteps stay on the host: its step indexes its own host tables with them and compares
        # them, which with device timesteps would read each back (PNDM: 3 syncs a step per cohort, DDIM 6, DDPM 11;
        # the host could not queue the next step while the GPU ran this one). The UNet gets a device copy.
        check_inference_steps(model.scheduler, steps, "steps")
        scheduler = model.scheduler.__class__.from_config(model.scheduler.config)
        scheduler.set_timesteps(steps)
        factor = model.vae_scale_factor
        latent_shape = (model.unet.config.in_channels, height // factor, width // factor)
        latents = torch.cat([torch.randn((1, *latent_shape), generator=g) for g in generators])
        return Cohort(
            model=model,
            requests=list(requests),
            seeds=seeds,
            guidance=self._to_device(guidance),
            guided=None if len(guided) == len(seeds) else self._to_device(torch.tensor(guided, dtype=torch.long)),
            text_states=text_states,
            latents=self._to_device(latents.to(self.dtype)) * scheduler.init_noise_sigma,
            scheduler=scheduler,
            unet_timesteps=self._to_device(scheduler.timesteps),
            step_kwargs={"generator": generators} if _accepts(scheduler.step, "generator") else {},
        )

    @torch.inference_mode()
    def denoise(self, cohorts: list[Cohort]) -> None:
        """One denoising step of every cohort, in one UNet forward; all of one model and one image size."""
        model = cohorts[0].model
        if {(c.model, c.size) for c in cohorts} != {(model, cohorts[0].size)}:
            raise ValueError("cohorts denoised together share one model and one image size")
        # Rows: per cohort its unconditional half (its guided images'), then its conditional half (`text_states`'s).
        ts = [cohort.scheduler.timesteps[cohort.step] for cohort in cohorts]  # on the host, for the schedulers
        inputs, timesteps = [], []
        now = time.monotonic()
        for cohort, t in zip(cohorts, ts, strict=True):
            if cohort.step == 0:
                cohort.first_step = now
            unguided = cohort.latents if cohort.guided is None else cohort.latents.index_select(0, cohort.guided)
            inputs.append(cohort.scheduler.scale_model_input(torch.cat([unguided, cohort.latents]), t))
            timesteps.append(cohort.unet_timesteps[cohort.step].expand(cohort.unet_rows))
        model_input, timestep = torch.cat(inputs), torch.cat(timesteps)
        text_states = torch.cat([cohort.text_states for cohort in cohorts])
        batch_rows = len(model_input)

        unet = model.unet
        if model.compiled_unet is not None and cohorts[0].size == model.native_size:
            unet = model.compiled_unet
            if batch_rows == 1:  # torch.compile specializes a batch of one: a graph of its own, minutes to make
                model_input, timestep, text_states = (torch.cat([x, x]) for x in (model_input, timestep, text_states))
            for tensor in (model_input, timestep, text_states):  # a symbolic batch size, not one graph per size
                torch._dynamo.maybe_mark_dynamic(tensor, 0)
        noise = unet(model_input, timestep, encoder_hidden_states=text_states, return_dict=False)[0]

        requests = sum(len(cohort.requests) for cohort in cohorts)
        images = sum(cohort.images for cohort in cohorts)
        for index, (cohort, t, cohort_noise) in enumerate(
            zip(cohorts, ts, noise[:batch_rows].split([c.unet_rows for c in cohorts]), strict=True)
        ):
            noise_uncond, noise_cond = cohort_noise.split([cohort.unet_rows - cohort.images, cohort.images])
            if cohort.guided is not None:  # an image without guidance: its own prediction, which the formula cancels
                noise_uncond = noise_cond.index_copy(0, cohort.guided, noise_uncond)
            guided = noise_uncond + cohort.guidance * (noise_cond - noise_uncond)
            try:
                step = cohort.scheduler.step(guided, t, cohort.latents, return_dict=False, **cohort.step_kwargs)
            except torch.OutOfMemoryError as e:
                # This cohort's scheduler may have moved on (its history of outputs, noise drawn): it cannot step
                # again. Those before it have stepped, those after it have not: the caller fails this one only.
                e.cohort_index = index
                raise
            cohort.latents = step[0]
            cohort.step += 1
            cohort.peak_requests = max(cohort.peak_requests, requests)
            cohort.peak_images = max(cohort.peak_images, images)
            cohort.compiled_unet |= unet is model.compiled_unet

    def finish(self, cohort: Cohort) -> list[GenerationResult]:
        """Decodes a denoised cohort into one result per request."""
        return self.decode(cohort).results()

    @torch.inference_mode()
    def decode(self, cohort: Cohort) -> DecodedCohort:
        """Starts decoding a denoised cohort. On a GPU it returns once the work is queued, so the caller can queue
        other cohorts' next step meanwhile; `results()` waits for it (from any thread)."""
        vae = cohort.model.vae
        chunks = []
        for latents in (cohort.latents / vae.config.scaling_factor).split(DECODE_IMAGES_AT_ONCE):
            pixels = vae.decode(latents, return_dict=False)[0]
            # To 8 bits on the device: a quarter of the bytes to copy, and no numpy pass over them on the host.
            chunks.append(((pixels / 2 + 0.5).clamp(0, 1).float() * 255).round().to(torch.uint8))
        pixels = torch.cat(chunks).permute(0, 2, 3, 1).contiguous()  # (images, height, width, 3), as PIL takes them
        if pixels.device.type != "cuda":
            return DecodedCohort(cohort, pixels)
        # Pinned host memory (torch caches it), so the copy is asynchronous, in stream order after the decode.
        host = torch.empty(pixels.shape, dtype=pixels.dtype, pin_memory=True)
        host.copy_(pixels, non_blocking=True)
        copied = torch.cuda.Event()
        copied.record()
        return DecodedCohort(cohort, host, copied)

    def _encode(self, model: SubjectModel, texts: list[str]) -> torch.Tensor:
        with self._tokenizing:
            tokens = model.tokenizer(
                texts,
                padding="max_length",
                max_length=model.tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            )
        # Encode each distinct text once: a batch often repeats one prompt (several images, an empty negative).
        unique, index = torch.unique(tokens.input_ids, dim=0, return_inverse=True)
        states = model.text_encoder(self._to_device(unique), return_dict=False)[0]
        return states[self._to_device(index)]

    def _to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        """A host tensor on the engine's device. To a GPU through pinned memory, asynchronously: a copy from
        ordinary host memory waits for the work queued before it, so the host would idle until the GPU did."""
        if self.device.type != "cuda":
            return tensor.to(self.device)
        return tensor.pin_memory().to(self.device, non_blocking=True)


def _accepts(function, name: str) -> bool:
    return name in inspect.signature(function).parameters
