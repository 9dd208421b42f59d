"""Training data: images encoded once into VAE latent distributions, and a stateless sampling order.

The VAE is frozen, so encoding every image every step (as diffusers' train_dreambooth.py does) is wasted
work: we store each image's latent mean and std once and draw `mean + std * noise` per step, which keeps
the same stochastic latents as `latent_dist.sample()` at no cost.

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
    """Latent distributions of a set of images, [N, C, h, w] each, already multiplied by the VAE scaling factor."""

    mean: torch.Tensor
    std: torch.Tensor

    def __len__(self) -> int:
        return self.mean.shape[0]

    def sample(self, indices: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        # Indexing a GPU tensor with CPU indices copies them over and waits for the GPU to drain (a blocking
        # copy syncs the stream): the CPU would stop queueing the step's kernels until the last step finished.
        indices = indices.to(self.mean.device, non_blocking=True)
        mean, std = self.mean[indices], self.std[indices]
        noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return mean + std * noise


@torch.no_grad()
def encode_images(vae, paths: list[Path], resolution: int, device: torch.device, batch_size: int = 8) -> EncodedImages:
    means, stds = [], []
    for start in range(0, len(paths), batch_size):
        pixels = torch.stack([preprocess(load_image(p), resolution) for p in paths[start : start + batch_size]])
        dist = vae.encode(pixels.to(device=device, dtype=vae.dtype)).latent_dist
        means.append(dist.mean.float())
        stds.append(dist.std.float())
    scale = vae.config.scaling_factor
    return EncodedImages(mean=torch.cat(means) * scale, std=torch.cat(stds) * scale)


@torch.no_grad()
def encode_images_shared(
    vae, paths: list[Path], resolution: int, device: torch.device, rank: int, world_size: int, batch_size: int = 8
) -> EncodedImages:
    """`encode_images(paths)` on every rank, each rank decoding and encoding a share of the batches (SD 1.5, 200
    class images: ~3 s of PNG decoding and VAE work each on one GPU) and all of them gathering the rest. The batches
    are those one rank would encode alone (the same images together), so the latents do not depend on the number
    of workers."""
    if world_size == 1:
        return encode_images(vae, paths, resolution, device, batch_size)
    # Whole batches per rank, in order: only the last ranks' shares are short or empty, so the gathered shares,
    # concatenated, are the images in order followed by padding.
    share = -(-len(paths) // (batch_size * world_size)) * batch_size
    mine = paths[rank * share : (rank + 1) * share]
    channels = vae.config.latent_channels
    side = resolution // 2 ** (len(vae.config.block_out_channels) - 1)
    padded = torch.zeros(share, 2 * channels, side, side, device=device)
    if mine:
        encoded = encode_images(vae, mine, resolution, device, batch_size)
        padded[: len(mine)] = torch.cat([encoded.mean, encoded.std], dim=1)
    shares = [torch.empty_like(padded) for _ in range(world_size)]
    torch.distributed.all_gather(shares, padded)
    everything = torch.cat(shares)[: len(paths)]
    return EncodedImages(mean=everything[:, :channels].contiguous(), std=everything[:, channels:].contiguous())


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
