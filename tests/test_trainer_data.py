"""Training data across workers: the images each rank encodes and gathers (a real gloo process group of two
processes on 127.0.0.1, the tiny model's VAE and real photos)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed
import torch.multiprocessing

from dreambooth.sd_model import load_base_model
from tests.conftest import free_port
from trainer.data import EncodedImages, encode_images, encode_images_shared
from trainer.images import find_instance_images

RESOLUTION, BATCH = 64, 2
CROPS = (1, 3, 1)  # of each image list's images


def _encode_on_rank(rank: int, world_size: int, port: int, tiny_model: Path, image_lists, out: Path) -> None:
    torch.distributed.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size
    )
    try:
        vae = load_base_model(tiny_model, dtype=torch.float32, components=("vae",)).vae
        for i, paths in enumerate(image_lists):
            cpu = torch.device("cpu")
            encoded = encode_images_shared(vae, paths, RESOLUTION, cpu, rank, world_size, BATCH, CROPS[i])
            torch.save((encoded.mean, encoded.std), out / f"rank{rank}-list{i}.pt")
    finally:
        torch.distributed.destroy_process_group()


def test_each_rank_encodes_a_share_and_all_get_what_one_alone_encodes(tiny_model, dog_images, tmp_path):
    """Every rank used to decode and encode every class image itself (200 for a usual job); now each its share.
    The latents must be the same, bit for bit, on every rank and as one process alone encodes them (exact resume
    and the loss depend on them): with shares uneven, and a rank whose share is empty."""
    photos = find_instance_images([str(dog_images)])
    # 2 ranks, 2-image batches: shares of 4 and 3 images; 2 images of 3 crops, shares of 4 and 2 crops; 1 image,
    # shares of 1 and none.
    image_lists = [(photos * 2)[:7], photos[:2], photos[:1]]
    world_size = 2
    torch.multiprocessing.spawn(
        _encode_on_rank, args=(world_size, free_port(), tiny_model, image_lists, tmp_path), nprocs=world_size
    )
    vae = load_base_model(tiny_model, dtype=torch.float32, components=("vae",)).vae
    for i, paths in enumerate(image_lists):
        alone = encode_images(vae, paths, RESOLUTION, torch.device("cpu"), BATCH, CROPS[i])
        assert alone.mean.shape[0] == len(paths) * CROPS[i] and len(alone) == len(paths)
        for rank in range(world_size):
            mean, std = torch.load(tmp_path / f"rank{rank}-list{i}.pt")
            assert torch.equal(mean, alone.mean) and torch.equal(std, alone.std), (rank, i)


def test_a_sample_draws_one_of_its_images_crops():
    """An image's crops are rows i * crops ... i * crops + crops - 1; each sample of image i is one of them."""
    rows = torch.arange(6, dtype=torch.float32).view(6, 1, 1, 1)
    encoded = EncodedImages(mean=rows, std=torch.zeros_like(rows), crops=3)
    assert len(encoded) == 2
    drawn = encoded.sample(torch.tensor([1] * 64), torch.Generator().manual_seed(0)).flatten()
    assert set(drawn.tolist()) == {3.0, 4.0, 5.0}  # image 1's three crops, every one of them
    single = EncodedImages(mean=rows, std=torch.zeros_like(rows))
    assert single.sample(torch.tensor([4, 1]), torch.Generator().manual_seed(0)).flatten().tolist() == [4.0, 1.0]


def test_a_photos_crops_lie_along_its_long_side_in_order(tiny_model, tmp_path):
    """Image i's crop c is row i * crops + c, cropped at position c / (crops - 1) along the long side: what
    EncodedImages.sample reads (the tests' photos are square, their crops all alike)."""
    from PIL import Image

    from trainer.images import preprocess

    wide = Image.new("RGB", (192, 64), (255, 0, 0))
    wide.paste((0, 0, 255), (96, 0, 192, 64))  # red, then blue
    wide.save(tmp_path / "wide.png")
    square = Image.new("RGB", (64, 64), (0, 255, 0))
    square.save(tmp_path / "square.png")
    vae = load_base_model(tiny_model, dtype=torch.float32, components=("vae",)).vae
    photos = [tmp_path / "square.png", tmp_path / "wide.png"]
    encoded = encode_images(vae, photos, RESOLUTION, torch.device("cpu"), crops=3)
    scale = vae.config.scaling_factor
    with torch.no_grad():
        for row, (image, position) in enumerate((square, p) for p in (0.0, 0.5, 1.0)):
            pixels = preprocess(image, RESOLUTION, position)[None]
            assert torch.allclose(encoded.mean[row], vae.encode(pixels).latent_dist.mean[0] * scale, atol=1e-5)
        for crop, position in enumerate((0.0, 0.5, 1.0)):
            pixels = preprocess(wide, RESOLUTION, position)[None]
            expected = vae.encode(pixels).latent_dist.mean[0] * scale
            assert torch.allclose(encoded.mean[3 + crop], expected, atol=1e-5), position
    assert not torch.allclose(encoded.mean[3], encoded.mean[5], atol=1e-3)  # red at one end, blue at the other
