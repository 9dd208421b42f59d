"""Training data: images encoded once into VAE latent distributions, and a stateless sampling order.

The VAE is frozen, so encoding every image every step (as diffusers' train_dreambooth.py does) is wasted
work: we store each image's latent mean and std once and draw `mean + std * noise` per step, which keeps
the same stochastic latents as `latent_dist.sample()` at no cost. diffusers' script also crops a photo at random
each time (its default): an instance photo here is encoded at a few crops along its long side, and each sample
draws one of them.

Which images a step sees, and all its noise, are pure functions of (seed, step, rank): nothing random
is carried between steps, so a run resumed from a checkpoint continues exactly as the uninterrupted run.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

from trainer.images import load_image, preprocess


@dataclass
class EncodedImages:
    """Latent distributions of a set of images, already multiplied by the VAE scaling factor: [N * crops, C, h, w]
    each, image i's crops at i * crops ... i * crops + crops - 1."""

    mean: torch.Tensor
    std: torch.Tensor
    crops: int = 1

    def __len__(self) -> int:
        return self.mean.shape[0] // self.crops

    def sample(self, indices: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        # Indexing a GPU tensor with CPU indices copies them over and waits for the GPU to drain (a blocking
        # copy syncs the stream): the CPU would stop queueing the step's kernels until the last step finished.
        indices = indices.to(self.mean.device, non_blocking=True) * self.crops
        if self.crops > 1:  # each image one of its crops, at random (as diffusers' random crop, from a few)
            indices = indices + torch.randint(self.crops, indices.shape, generator=generator, device=indices.device)
        mean, std = self.mean[indices], self.std[indices]
        noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return mean + std * noise


def crop_positions(crops: int) -> list[float]:
    """Where a photo's `crops` squares lie along its long side, 0 at one end, 1 at the other (one: the middle)."""
    return [0.5] if crops == 1 else [i / (crops - 1) for i in range(crops)]


@torch.no_grad()
def encode_images(
    vae, paths: list[Path], resolution: int, device: torch.device, batch_size: int = 8, crops: int = 1
) -> EncodedImages:
    """Each image's `crops` squares (a photo that is not square has its subject somewhere along its long side:
    diffusers' script crops it at random every step; the VAE is frozen, so a few crops encoded once do as well)."""
    mean, std = _encode(vae, _crops_of(paths, crops), resolution, device, batch_size)
    return EncodedImages(mean=mean, std=std, crops=crops)


@torch.no_grad()
def encode_images_shared(
    vae,
    paths: list[Path],
    resolution: int,
    device: torch.device,
    rank: int,
    world_size: int,
    batch_size: int = 8,
    crops: int = 1,
) -> EncodedImages:
    """`encode_images(paths)` on every rank, each rank decoding and encoding a share of the batches (SD 1.5, 200
    class images: ~3 s of PNG decoding and VAE work each on one GPU) and all of them gathering the rest. The batches
    are those one rank would encode alone (the same images together), so the latents do not depend on the number
    of workers."""
    if world_size == 1:
        return encode_images(vae, paths, resolution, device, batch_size, crops)
    items = _crops_of(paths, crops)
    # Whole batches per rank, in order: only the last ranks' shares are short or empty, so the gathered shares,
    # concatenated, are the images in order followed by padding.
    share = -(-len(items) // (batch_size * world_size)) * batch_size
    mine = items[rank * share : (rank + 1) * share]
    channels = vae.config.latent_channels
    side = resolution // 2 ** (len(vae.config.block_out_channels) - 1)
    padded = torch.zeros(share, 2 * channels, side, side, device=device)
    if mine:
        padded[: len(mine)] = torch.cat(_encode(vae, mine, resolution, device, batch_size), dim=1)
    shares = [torch.empty_like(padded) for _ in range(world_size)]
    torch.distributed.all_gather(shares, padded)
    everything = torch.cat(shares)[: len(items)]
    mean, std = everything[:, :channels].contiguous(), everything[:, channels:].contiguous()
    return EncodedImages(mean=mean, std=std, crops=crops)


def _crops_of(paths: list[Path], crops: int) -> list[tuple[Path, float]]:
    """(image, crop position) of each row of an EncodedImages: image i's crops at i * crops ..."""
    return [(path, position) for path in paths for position in crop_positions(crops)]


def _encode(
    vae, items: list[tuple[Path, float]], resolution: int, device: torch.device, batch_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The latent mean and std of each (image, crop position), scaled."""
    means, stds = [], []
    for start in range(0, len(items), batch_size):
        batch = items[start : start + batch_size]
        pixels = torch.stack([preprocess(load_image(path), resolution, position) for path, position in batch])
        dist = vae.encode(pixels.to(device=device, dtype=vae.dtype)).latent_dist
        means.append(dist.mean.float())
        stds.append(dist.std.float())
    scale = vae.config.scaling_factor
    return torch.cat(means) * scale, torch.cat(stds) * scale


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers, well mixed (neighbouring steps get unrelated streams)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def sample_indices(num_items: int, seed: int, stream: int, first: int, count: int) -> torch.Tensor:
    """Indices `first .. first+count-1` of an endless stream that visits every item once per epoch, each
    epoch in its own seeded random order. `stream` separates instance from class images."""
    out = []
    for position in range(first, first + count):
        epoch, offset = divmod(position, num_items)
        out.append(_epoch_order(num_items, seed, stream, epoch)[offset])
    return torch.tensor(out, dtype=torch.long)


@functools.lru_cache(maxsize=64)
def _epoch_order(num_items: int, seed: int, stream: int, epoch: int) -> tuple[int, ...]:
    generator = torch.Generator().manual_seed(derive_seed(seed, stream, epoch))
    return tuple(torch.randperm(num_items, generator=generator).tolist())
