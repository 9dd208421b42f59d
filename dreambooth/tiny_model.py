"""A tiny random Stable Diffusion model in diffusers format, for tests and offline smoke runs.

Same architecture family and file layout as SD 1.5 (so it loads through `dreambooth.sd_model` exactly like
a real base model), with ~1M-parameter UNet and VAE and a 2-layer text encoder. Differences on purpose:
the VAE downsamples by 2 instead of 8, so 64x64 images give 32x32 latents and stay cheap.

The tokenizer is real: CLIP's 49,408-token BPE vocabulary, read from the copy that ships inside the
open_clip_torch package (or from the file named by $DREAMBOOTH_CLIP_BPE), so prompts tokenize to the same
ids as with SD 1.5 (and "sks" is one token).

`build_random_sd15_model` writes a model with Stable Diffusion 1.5's exact architecture (UNet 859.5M,
text encoder 123.1M, VAE 83.7M parameters) and random weights, with the same tokenizer and the sampler SD 1.5
ships (PNDM): for benchmarks that need SD 1.5's cost without its weights. The tiny model samples with DDPM
instead, on the same noise schedule: its noise at every step is what the tests of per-image seeds check.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
import shutil
import tempfile
import threading
from collections.abc import Callable
from functools import lru_cache, partial
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, DDPMScheduler, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from dreambooth.durable import sync_dir, sync_tree
from dreambooth.errors import InputError
from dreambooth.model_files import check_base_model
from dreambooth.sd_model import save_pipeline

_BOS, _EOS = "<|startoftext|>", "<|endoftext|>"
_BOS_ID, _EOS_ID = 49406, 49407  # the last two entries of the CLIP vocabulary
_RNG_LOCK = threading.Lock()
SEED_FILE = ".dreambooth-random-seed"
"""In a random model's folder, the seed its weights were drawn from. Hidden: no part of the model (its fingerprint
and identity skip it; diffusers never reads it)."""


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP's (and GPT-2's) reversible map from bytes to printable unicode characters."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, [chr(c) for c in chars], strict=True))


CLIP_BPE_ENV = "DREAMBOOTH_CLIP_BPE"
"""Environment variable naming a copy of bpe_simple_vocab_16e6.txt.gz, for machines without open_clip_torch."""


def _clip_bpe_file() -> Path:
    override = os.environ.get(CLIP_BPE_ENV)
    if override:
        path = Path(override).expanduser()
        if not path.is_file():
            raise RuntimeError(f"${CLIP_BPE_ENV} names {path}, which is not a file")
        return path
    # open_clip itself cannot be imported here (it needs torchvision), so locate the package without
    # importing it.
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "the tiny model's tokenizer uses the CLIP vocabulary shipped in open_clip_torch, which is not "
            "installed: pip install --no-deps open-clip-torch (scripts/bootstrap does this)"
        )
    path = Path(spec.submodule_search_locations[0]) / "bpe_simple_vocab_16e6.txt.gz"
    if not path.is_file():
        raise RuntimeError(f"{path} is missing; reinstall with: pip install --no-deps open-clip-torch")
    return path


@lru_cache(maxsize=1)
def _clip_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocabulary and merges, built exactly as openai/CLIP's simple_tokenizer.py does."""
    with gzip.open(_clip_bpe_file(), "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    byte_chars = list(_bytes_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges] + [_BOS, _EOS]
    vocab = {token: i for i, token in enumerate(tokens)}
    assert len(vocab) == 49408 and vocab[_EOS] == _EOS_ID, "unexpected CLIP BPE file"
    return vocab, merges


def _tokenizer() -> CLIPTokenizer:
    vocab, merges = _clip_vocab_and_merges()
    # SD 1.5's tokenizer pads with the end-of-text token.
    return CLIPTokenizer(
        vocab=vocab, merges=merges, model_max_length=77, bos_token=_BOS, eos_token=_EOS, pad_token=_EOS
    )


def _clip_text_model(**sizes: int) -> CLIPTextModel:
    """A CLIP text encoder over the full CLIP vocabulary with SD 1.5's settings, of the given sizes."""
    config = CLIPTextConfig(
        vocab_size=49408,
        max_position_embeddings=77,
        hidden_act="quick_gelu",  # as SD 1.5's CLIP ViT-L/14 text encoder
        # Real token ids, so the pooled output is taken at the end-of-text token.
        bos_token_id=_BOS_ID,
        eos_token_id=_EOS_ID,
        pad_token_id=_EOS_ID,
        **sizes,
    )
    return CLIPTextModel(config)


def _text_encoder() -> CLIPTextModel:
    return _clip_text_model(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4)


def _unet() -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=32,  # latents of 64x64 images (VAE factor 2), so the pipeline defaults to 64x64
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,  # the text encoder's hidden size
        attention_head_dim=8,
        norm_num_groups=32,
    )


def _vae() -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(32, 64),  # two blocks: downscale factor 2
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=64,
    )


# SD 1.5's noise schedule.
_SD15_SCHEDULE = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "steps_offset": 1,
    "prediction_type": "epsilon",
}


def _scheduler() -> DDPMScheduler:
    # `set_alpha_to_one` is not a DDPM argument, but SD 1.5's config carries it and DDIM/PNDM read it when built
    # from this config, so it is stored too.
    scheduler = DDPMScheduler(**_SD15_SCHEDULE, clip_sample=False)
    scheduler.register_to_config(set_alpha_to_one=False)
    return scheduler


def _sd15_scheduler() -> PNDMScheduler:
    """The sampler SD 1.5 ships, as its scheduler_config.json has it: its PLMS steps cost one UNet forward more for
    25 steps than DDPM's (what a benchmark of serving must count)."""
    scheduler = PNDMScheduler(**_SD15_SCHEDULE, skip_prk_steps=True, set_alpha_to_one=False)
    scheduler.register_to_config(clip_sample=False)  # not PNDM's, but SD 1.5's config carries it for DDPM/DDIM
    return scheduler


def _is_complete(path: Path) -> bool:
    try:
        check_base_model(path)
    except InputError:
        return False
    return True


def holds_model(out_dir: str | os.PathLike) -> bool:
    """Whether `out_dir` holds a complete model already, which build_tiny_model returns as it is."""
    return _is_complete(Path(out_dir).expanduser().resolve())


def recorded_seed(model_dir: str | os.PathLike) -> int | None:
    """The seed a random model written here was drawn from; None for any other model."""
    try:
        return int((Path(model_dir).expanduser() / SEED_FILE).read_text())
    except (OSError, ValueError):
        return None


def build_tiny_model(out_dir: str | os.PathLike, *, seed: int = 0) -> Path:
    """Writes the tiny random model to `out_dir` (unless a complete model is already there, returned as it is
    whatever its seed: see holds_model, recorded_seed); returns it.

    The same seed gives bit-identical weights. Safe for concurrent callers: each builds in its own temp
    dir next to `out_dir` and renames it into place; the first rename wins, the others discard theirs.
    """
    return _build_random_model(out_dir, seed=seed, unet=_unet, vae=_vae, text_encoder=_text_encoder)


# --- Stable Diffusion 1.5's architecture (the configs of runwayml/stable-diffusion-v1-5), random weights ---


SD15_UNET_CHANNELS = (320, 640, 1280, 1280)


def _sd15_unet(block_out_channels: tuple[int, ...] = SD15_UNET_CHANNELS) -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=64,  # 512x512 images, VAE factor 8
        in_channels=4,
        out_channels=4,
        block_out_channels=block_out_channels,
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=768,
        attention_head_dim=8,
        norm_num_groups=32,
        norm_eps=1e-5,
        act_fn="silu",
        downsample_padding=1,
        flip_sin_to_cos=True,
        freq_shift=0,
        mid_block_scale_factor=1,
    )


def _sd15_vae() -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512),  # four blocks: downscale factor 8
        layers_per_block=2,
        latent_channels=4,
        norm_num_groups=32,
        act_fn="silu",
        sample_size=512,
        scaling_factor=0.18215,
    )


def _sd15_text_encoder() -> CLIPTextModel:
    # CLIP ViT-L/14's text tower, as SD 1.5 uses it (with the real token ids, as in the tiny model).
    return _clip_text_model(
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        projection_dim=768,
    )


def build_random_sd15_model(
    out_dir: str | os.PathLike, *, seed: int = 0, unet_channels: tuple[int, ...] = SD15_UNET_CHANNELS
) -> Path:
    """Writes a randomly initialised model with SD 1.5's exact architecture to `out_dir` (unless a complete
    model is already there); returns it. Weights are saved in fp16 (~2 GB; loaders cast them up as asked).
    `unet_channels` other than SD 1.5's keeps the layout at another width (benchmarks on small machines).

    Same guarantees as build_tiny_model: deterministic for a seed, atomic, safe for concurrent callers.
    Building takes ~1 minute of CPU time (initialising ~1.07B parameters).
    """
    out = _build_random_model(
        out_dir,
        seed=seed,
        unet=partial(_sd15_unet, tuple(unet_channels)),
        vae=_sd15_vae,
        text_encoder=_sd15_text_encoder,
        scheduler=_sd15_scheduler,
        save_dtype=torch.float16,
    )
    # One an earlier version built (kept in a benchmark's cache) samples with DDPM: not what SD 1.5 costs.
    sampler = json.loads((out / "model_index.json").read_text()).get("scheduler")
    if sampler != ["diffusers", "PNDMScheduler"]:
        raise FileExistsError(f"{out} holds an earlier random SD 1.5 model (its scheduler: {sampler}): remove it")
    return out


# The benchmarks' --model: the tiny model (CPU runs), or SD 1.5's architecture with random weights (GPU runs).
RANDOM_MODELS = {"tiny": build_tiny_model, "sd15": build_random_sd15_model}


# --- shared by the builders ---------------------------------------------------------------------------------


def _seeded(seed: int, factory: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    """Build a module whose random init depends only on `seed` (not on build order or the caller's RNG).

    Init draws from torch's global RNG: a lock keeps threads from interleaving their draws, and fork_rng
    leaves the caller's RNG state as it was.
    """
    with _RNG_LOCK, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return factory()


def _pipeline(
    unet: UNet2DConditionModel, vae: AutoencoderKL, text_encoder: CLIPTextModel, scheduler
) -> StableDiffusionPipeline:
    """A full pipeline from the three networks, with the real CLIP tokenizer."""
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=_tokenizer(),
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _build_random_model(
    out_dir: str | os.PathLike,
    *,
    seed: int,
    unet: Callable[[], UNet2DConditionModel],
    vae: Callable[[], AutoencoderKL],
    text_encoder: Callable[[], CLIPTextModel],
    scheduler: Callable[[], Any] = _scheduler,
    save_dtype: torch.dtype | None = None,
) -> Path:
    def write(directory: Path) -> None:
        # Seed before each module so its weights depend only on the seed, not on build order.
        pipe = _pipeline(_seeded(seed, unet), _seeded(seed, vae), _seeded(seed, text_encoder), scheduler())
        if save_dtype is not None:
            pipe.to(dtype=save_dtype)
        save_pipeline(pipe, directory)
        (directory / SEED_FILE).write_text(f"{seed}\n")

    return _write_model_atomically(out_dir, write)


def _write_model_atomically(out_dir: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Returns `out_dir` at once if it holds a complete model; otherwise `write`s one into a temp dir next to
    it and renames that into place. Of concurrent writers the first rename wins, the others discard theirs."""
    out = Path(out_dir).expanduser().resolve()
    if _is_complete(out):
        return out
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not a complete model; remove it or pick another path")

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private (0700); the model is meant to be shared read-only
        write(tmp)
        sync_tree(tmp)  # else a power loss could leave the renamed model's files empty, and it looks complete
        try:
            # Atomic; replaces `out` only if it is missing or an empty directory.
            os.replace(tmp, out)
            sync_dir(out.parent)
        except OSError:
            if not _is_complete(out):  # not a concurrent builder that finished first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
