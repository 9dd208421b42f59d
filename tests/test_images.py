"""trainer.images: instance images are refused with a precise message, or loaded as upright 8-bit RGB.

Every image is made with PIL in tmp_path at test time; nothing binary is committed.
"""

from __future__ import annotations

import errno
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile, features

from dreambooth.errors import InputError
from tests.conftest import SHARED_DATA
from trainer.images import (
    IMAGE_SUFFIXES,
    MAX_ASPECT_RATIO,
    MAX_IMAGE_PIXELS,
    MAX_INSTANCE_IMAGES,
    _reduced,
    check_instance_images,
    find_instance_images,
    load_image,
    preprocess,
)

DOG = SHARED_DATA / "dog"


def save(path: Path, image: Image.Image, **params) -> Path:
    image.save(path, **params)
    return path


def photo(path: Path, size: tuple[int, int] = (96, 80), **params) -> Path:
    """A noisy RGB image (noise so that a JPEG of it has real entropy-coded data to truncate)."""
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return save(path, Image.fromarray(pixels), **params)


def png_claiming(path: Path, width: int, height: int) -> Path:
    """A tiny 1-bit PNG whose header claims width x height: cheap to write, huge if ever decoded."""
    save(path, Image.new("1", (1, 1)), format="PNG")
    data = bytearray(path.read_bytes())
    data[16:24] = struct.pack(">II", width, height)  # IHDR data starts after signature, length, type
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))  # Pillow checks the chunk CRC
    path.write_bytes(bytes(data))
    return path


def error(paths, resolution: int = 64) -> str:
    with pytest.raises(InputError) as info:
        check_instance_images(paths, resolution)
    assert info.value.field == "instance_images"
    return info.value.message


def rgb(path: Path) -> np.ndarray:
    image = load_image(path)
    assert image.mode == "RGB"
    return np.asarray(image).astype(int)


# --- finding -----------------------------------------------------------------------------------------


def test_constants():
    assert {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"} < IMAGE_SUFFIXES
    assert MAX_IMAGE_PIXELS >= 50_000_000  # a 50 MP camera photo is not a bomb
    assert MAX_ASPECT_RATIO > 1


def test_directory_expands_to_sorted_images_skipping_hidden_and_non_images(tmp_path):
    for name in ["b.png", "a.JPG", "c.webp"]:
        photo(tmp_path / name)
    photo(tmp_path / ".hidden.png")
    (tmp_path / "notes.txt").write_text("not a photo")
    photo(tmp_path / "photo.dat", format="PNG")  # not an image suffix: skipped inside a directory
    (tmp_path / "sub").mkdir()
    photo(tmp_path / "sub" / "d.png")  # non-recursive
    found = find_instance_images([tmp_path])
    assert [p.name for p in found] == ["a.JPG", "b.png", "c.webp"]
    assert check_instance_images([str(tmp_path)], 64) == found


@pytest.mark.parametrize("mode", ["RGBA", "P", "1", "I;16", "CMYK"])
def test_the_check_converts_a_small_copy_of_a_large_photo_whatever_its_mode(mode):
    """A 64-megapixel photo converted whole took ~1.25 GiB of copies on the controller: a palette, 1-bit or 16-bit
    one always (reduce() refuses those modes), any one whose short side was under 4x the resolution."""
    image = Image.new(mode, (1500, 9000))
    image.info["transparency"] = 0  # kept: the conversion it checks composites transparent areas
    small = _reduced(image, 512)
    assert (small.mode, small.size, small.info["transparency"]) == (mode, (1024, 6144), 0)
    assert _reduced(image, 1024) is image  # no larger than twice the resolution already


def test_a_folder_of_photos_saved_under_every_usual_name_loses_none(tmp_path):
    """A browser's .jfif, a .jpe, a GIF, an AVIF: each accepted named alone or uploaded, and silently left out of a
    folder (the job trained on the rest, without a word)."""
    formats = {"a.jpg": "JPEG", "b.jfif": "JPEG", "c.jpe": "JPEG", "d.gif": "GIF", "e.avif": "AVIF"}
    for name, format in formats.items():
        photo(tmp_path / name, format=format)
    assert [p.name for p in check_instance_images([tmp_path], 64)] == list(formats)


def test_iphone_heic_photos_in_a_folder_are_refused_by_name_not_left_out(tmp_path):
    """An iPhone's own format, which Pillow cannot read here: a folder of HEIC photos and one JPEG trained on the
    JPEG alone, without a word."""
    photo(tmp_path / "IMG_0005.JPG")
    for name in ("IMG_0001.HEIC", "IMG_0002.heif"):
        (tmp_path / name).write_bytes(b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic")
    with pytest.raises(InputError) as error:
        check_instance_images([tmp_path], 64)
    assert "2 of 3 images" in error.value.message
    assert "IMG_0001.HEIC: HEIC cannot be read here: convert it to JPEG or PNG" in error.value.message
    assert "IMG_0002.heif: HEIF cannot be read here" in error.value.message


def test_a_photos_link_to_nothing_in_a_folder_is_named_not_left_out(tmp_path):
    """A link to a drive not mounted (or a photo moved since): the job trained on the other photos, without a word."""
    photo(tmp_path / "robot_0.png")
    (tmp_path / "robot_1.png").symlink_to("/mnt/usb/robot_1.png")
    (tmp_path / "notes.txt").symlink_to("/mnt/usb/notes.txt")  # not a photo: skipped, as a file of it would be
    with pytest.raises(InputError, match=r"robot_1\.png: a link to /mnt/usb/robot_1\.png, which is not there"):
        find_instance_images([tmp_path])


def test_a_fifo_named_as_a_photo_is_refused_not_waited_on(tmp_path):
    fifo = tmp_path / "trap.jpg"
    os.mkfifo(fifo)  # opening it would wait for a writer, for ever
    with pytest.raises(InputError, match=r"trap\.jpg: not a regular file"):
        find_instance_images([fifo])
    photo(tmp_path / "ok.png")
    assert [p.name for p in find_instance_images([tmp_path])] == ["ok.png"]  # in a folder: skipped


def test_a_directory_of_more_images_than_a_subject_needs_is_refused_before_any_is_read(tmp_path):
    """On a controller, however the photos are named: a directory on shared storage may hold a photo library."""
    for index in range(MAX_INSTANCE_IMAGES + 1):
        (tmp_path / f"{index}.png").write_bytes(b"")  # not decoded: the count comes first
    with pytest.raises(InputError, match=rf"{MAX_INSTANCE_IMAGES + 1} images; at most {MAX_INSTANCE_IMAGES}"):
        check_instance_images([tmp_path], 64, bounded=True)
    assert len(find_instance_images([tmp_path])) == MAX_INSTANCE_IMAGES + 1  # `dreambooth train` alone: no bound


def test_explicit_file_is_judged_by_content_and_duplicates_collapse(tmp_path):
    dat = photo(tmp_path / "photo.dat", format="PNG")
    assert find_instance_images([dat, tmp_path, dat]) == [dat]
    assert check_instance_images([dat], 64) == [dat]


def test_explicit_text_file_is_not_an_image(tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("hello")
    with pytest.raises(InputError, match="not an image") as info:
        find_instance_images([notes])
    assert str(notes) in info.value.message


def test_missing_path_is_named(tmp_path):
    missing = tmp_path / "nope.jpg"
    with pytest.raises(InputError, match="no such file") as info:
        find_instance_images([photo(tmp_path / "ok.png"), missing])
    assert str(missing) in str(info.value)


def test_empty_directory_and_empty_list(tmp_path):
    (tmp_path / "readme.md").write_text("no photos here")
    with pytest.raises(InputError, match="no image files") as info:
        find_instance_images([tmp_path])
    assert str(tmp_path) in info.value.message
    with pytest.raises(InputError, match="no image files"):
        find_instance_images([])


# --- refusing ----------------------------------------------------------------------------------------


def test_text_file_named_jpg(tmp_path):
    fake = tmp_path / "fake.jpg"
    fake.write_text("definitely not a JPEG")
    message = error([fake])
    assert f"{fake}: not an image" in message


def test_truncated_jpeg(tmp_path):
    good = photo(tmp_path / "good.jpg", (256, 256), quality=95)
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    assert not ImageFile.LOAD_TRUNCATED_IMAGES
    message = error([cut])
    assert f"{cut}: corrupt or truncated" in message
    assert str(good) not in message


def test_a_read_the_storage_failed_is_raised_not_blamed_on_the_photo(tmp_path, monkeypatch):
    """An NFS server gone (EIO, ESTALE), this process out of descriptors: a resumed job failed for good as
    INVALID_INPUT, calling photos that were fine corrupt."""
    from trainer import images

    good = photo(tmp_path / "good.jpg", (256, 256))

    def storage_gone(*_args, **_kwargs):
        raise OSError(errno.ESTALE, "Stale file handle")

    monkeypatch.setattr(images.Image, "open", storage_gone)
    with pytest.raises(OSError, match="Stale file handle"):
        check_instance_images([good], 64)


@pytest.mark.parametrize(
    "side", [20_000, 8_200], ids=["beyond-pillow-limit", "beyond-ours-only"]
)  # 400M pixels trips Pillow's own DecompressionBombError; 67.2M only our MAX_IMAGE_PIXELS
def test_decompression_bomb_refused_from_header_without_decoding(tmp_path, monkeypatch, side):
    bomb = png_claiming(tmp_path / "bomb.png", side, side)
    assert bomb.stat().st_size < 100

    def no_decoding(self):
        raise AssertionError("the bomb was decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    message = error([bomb])
    assert f"{bomb}: " in message
    assert "decompression bomb" in message
    assert "corrupt" not in message  # the patched load() was never reached


def test_bomb_given_explicitly_with_odd_suffix_is_still_refused_as_a_bomb(tmp_path):
    bomb = png_claiming(tmp_path / "bomb.bin", 20_000, 20_000)
    assert "decompression bomb" in error([bomb])


@pytest.mark.parametrize("size", [(2000, 100), (100, 1000)])
def test_absurd_aspect_ratio(tmp_path, size):
    strip = save(tmp_path / "strip.png", Image.new("RGB", size, "red"))
    assert f"{strip}: absurd dimensions {size[0]}x{size[1]}" in error([strip])


def test_zero_sized_side_is_refused(tmp_path):
    empty = png_claiming(tmp_path / "empty.png", 0, 64)
    message = error([empty])  # Pillow 13 already refuses to identify it; otherwise it is "absurd"
    assert f"{empty}: not an image" in message or f"{empty}: absurd dimensions" in message


def test_too_small_names_size_and_resolution(tmp_path):
    small = photo(tmp_path / "small.png", (300, 200))
    message = error([small], resolution=512)
    assert str(small) in message
    assert "300x200" in message
    assert "512" in message
    assert check_instance_images([small], 200) == [small]


def test_all_problems_reported_together(tmp_path):
    photo(tmp_path / "a_good.png", (128, 128))
    (tmp_path / "b_fake.jpg").write_text("text")
    photo(tmp_path / "c_small.png", (40, 40))
    save(tmp_path / "d_strip.png", Image.new("RGB", (1000, 100)))
    message = error([tmp_path], resolution=64)
    lines = message.splitlines()
    assert lines[0].startswith("3 of 4 images")
    assert len(lines) == 4
    assert lines[1].startswith(str(tmp_path / "b_fake.jpg")) and "not an image" in lines[1]
    assert lines[2].startswith(str(tmp_path / "c_small.png")) and "40x40" in lines[2]
    assert lines[3].startswith(str(tmp_path / "d_strip.png")) and "absurd" in lines[3]
    assert "a_good" not in message


# --- loading -----------------------------------------------------------------------------------------


def test_exif_rotation_swaps_width_and_height(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    image = Image.new("RGB", (120, 80), "blue")
    image.paste((255, 0, 0), (0, 0, 60, 80))  # left half red
    path = save(tmp_path / "rotated.jpg", image, exif=exif, quality=95)
    loaded = load_image(path)
    assert loaded.size == (80, 120)
    pixels = np.asarray(loaded).astype(int)
    assert pixels[10, 40, 0] > 200 and pixels[10, 40, 2] < 60  # the red half is now on top
    assert pixels[110, 40, 2] > 200 and pixels[110, 40, 0] < 60
    assert check_instance_images([path], 80) == [path]
    assert "80x120 is too small" in error([path], resolution=96)  # sizes are reported upright


@pytest.mark.parametrize("mode", ["L", "1", "LA"])
def test_grayscale(tmp_path, mode):
    image = Image.new("L", (8, 8), 100 if mode != "1" else 255).convert(mode)
    pixels = rgb(save(tmp_path / "gray.png", image))
    assert pixels.shape == (8, 8, 3)
    assert (pixels == (100 if mode != "1" else 255)).all()


def test_rgba_transparent_areas_become_white(tmp_path):
    image = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    image.paste((255, 0, 0, 255), (0, 0, 4, 8))
    image.paste((0, 0, 0, 128), (4, 0, 8, 4))
    pixels = rgb(save(tmp_path / "rgba.png", image))
    assert (pixels[:, :4] == (255, 0, 0)).all()
    assert (pixels[4:, 4:] == 255).all()  # fully transparent black: white, not black
    assert (abs(pixels[:4, 4:] - 127) <= 1).all()  # half-transparent black over white: grey


def test_palette_with_transparency(tmp_path):
    image = Image.new("P", (8, 8), 0)
    image.putpalette([0, 0, 0, 0, 255, 0])  # index 0 black (transparent), index 1 green
    image.paste(1, (0, 0, 4, 8))
    path = save(tmp_path / "palette.png", image, transparency=0)
    assert Image.open(path).mode == "P"
    pixels = rgb(path)
    assert (pixels[:, :4] == (0, 255, 0)).all()
    assert (pixels[:, 4:] == 255).all()


def test_cmyk_jpeg(tmp_path):
    path = save(tmp_path / "cmyk.jpg", Image.new("CMYK", (16, 16), (0, 255, 255, 0)), quality=95)
    assert Image.open(path).mode == "CMYK"
    pixels = rgb(path)
    assert (pixels[..., 0] > 230).all() and (pixels[..., 1:] < 25).all()  # red


def linear_rgb_profile() -> bytes:
    """An ICC v2 display profile with sRGB's primaries and a linear tone curve (gamma 1): its mid grey, 128, is
    sRGB's 188 (1.055 * (128/255) ** (1/2.4) - 0.055 = 0.735). Written by hand: no profile ships on these machines."""

    def s15(*values: float) -> bytes:
        return b"".join(struct.pack(">i", round(v * 65536)) for v in values)

    xyz = {  # sRGB's colorants adapted to D50, the connection space's white, as in sRGB profiles
        b"wtpt": (0.9642, 1.0, 0.8249),
        b"rXYZ": (0.4361, 0.2225, 0.0139),
        b"gXYZ": (0.3851, 0.7169, 0.0971),
        b"bXYZ": (0.1431, 0.0606, 0.7141),
    }
    tags = {sig: b"XYZ " + bytes(4) + s15(*v) for sig, v in xyz.items()}
    linear = b"curv" + bytes(4) + struct.pack(">IH", 1, 0x0100) + bytes(2)  # one entry: gamma 1.0 (u8Fixed8)
    tags |= {b"rTRC": linear, b"gTRC": linear, b"bTRC": linear}
    offset, table, data = 128 + 4 + 12 * len(tags), b"", b""
    for sig, body in tags.items():
        table += sig + struct.pack(">II", offset + len(data), len(body))
        data += body + bytes(-len(body) % 4)
    size = offset + len(data)
    header = struct.pack(">I4sI4s4s4s", size, b"lcms", 0x02100000, b"mntr", b"RGB ", b"XYZ ") + bytes(12)
    header += b"acsp" + bytes(28) + s15(0.9642, 1.0, 0.8249)
    header += bytes(128 - len(header))
    return header + struct.pack(">I", len(tags)) + table + data


@pytest.mark.skipif(not features.check("littlecms2"), reason="Pillow built without LittleCMS")
def test_colours_tagged_with_a_profile_are_converted_to_srgb(tmp_path):
    """A phone's Display P3 photo read as sRGB comes out desaturated; here a profile whose mid grey is sRGB's 188."""
    from PIL import ImageCms

    grey = Image.new("RGB", (8, 8), (128, 128, 128))
    for name, params in [("linear.png", {}), ("linear.jpg", {"quality": 100})]:
        pixels = rgb(save(tmp_path / name, grey, icc_profile=linear_rgb_profile(), **params))
        assert (abs(pixels - 188) <= 2).all(), (name, pixels[0, 0])
    # A palette's colours too.
    pixels = rgb(
        save(
            tmp_path / "linear-palette.png",
            grey.convert("P", palette=Image.Palette.ADAPTIVE),
            icc_profile=linear_rgb_profile(),
        )
    )
    assert (abs(pixels - 188) <= 2).all(), pixels[0, 0]
    # With its alpha kept: a half-transparent linear grey is sRGB's 188 before it is laid on white.
    half = Image.new("RGBA", (8, 8), (128, 128, 128, 128))
    pixels = rgb(save(tmp_path / "linear-rgba.png", half, icc_profile=linear_rgb_profile()))
    assert (abs(pixels - (188 * 128 + 255 * 127) / 255) <= 2).all(), pixels[0, 0]
    # sRGB's own profile changes nothing; nor does a profile that cannot be read, or one for other channels.
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    for name, image, profile in [
        ("srgb.png", grey, srgb),
        ("garbage.png", grey, b"not a profile at all"),
        ("gray-with-rgb-profile.png", grey.convert("L"), linear_rgb_profile()),
    ]:
        assert (abs(rgb(save(tmp_path / name, image, icc_profile=profile)) - 128) <= 1).all(), name


def test_16bit_png_is_scaled_not_clipped(tmp_path):
    values = np.array([[65535, 32896], [257, 0]], dtype=np.uint16)  # 255, 128, 1, 0 in 8 bits
    path = save(tmp_path / "deep.png", Image.fromarray(values))
    assert Image.open(path).mode.startswith("I")
    assert (rgb(path)[..., 0] == [[255, 128], [1, 0]]).all()


def test_16bit_grayscale_png_keeps_its_transparent_value(tmp_path):
    values = np.array([[0, 32896], [0, 65535]], dtype=np.uint16)
    path = save(tmp_path / "deep-transparent.png", Image.fromarray(values), transparency=0)
    assert Image.open(path).info["transparency"] == 0
    assert (rgb(path)[..., 0] == [[255, 128], [255, 255]]).all()  # transparent: white, as on a print


@pytest.mark.parametrize(("mode", "value", "expected"), [("I", 32896, 128), ("F", 0.5, 128), ("F", 200.0, 200)])
def test_32bit_and_float_modes_are_scaled(tmp_path, mode, value, expected):
    path = save(tmp_path / "deep.tif", Image.new(mode, (4, 4), value))
    assert Image.open(path).mode == mode
    assert (rgb(path) == expected).all()


@pytest.mark.skipif(not features.check("webp"), reason="Pillow built without WebP")
def test_webp(tmp_path):
    path = save(tmp_path / "photo.webp", Image.new("RGB", (80, 64), (0, 0, 255)), lossless=True)
    assert (rgb(path) == (0, 0, 255)).all()
    assert check_instance_images([path], 64) == [path]


# --- preprocessing -----------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(400, 100), (100, 400)], ids=["wide", "tall"])
def test_preprocess_shape_range_and_centre_crop(size):
    image = Image.new("RGB", size, (0, 0, 255))  # blue margins...
    w, h = size
    image.paste((255, 0, 0), (w // 4, h // 4, w - w // 4, h - h // 4))  # ...around a red centre
    tensor = preprocess(image, 32)
    assert tensor.shape == (3, 32, 32)
    assert tensor.dtype == torch.float32
    assert tensor.min() >= -1.0 and tensor.max() <= 1.0
    # The crop is the middle quarter of the long side: red across its middle band, blue only at the edges.
    inner = tensor[:, 12:20, :] if w > h else tensor[:, :, 12:20]
    assert torch.allclose(inner[0], torch.tensor(1.0), atol=0.02)
    assert torch.allclose(inner[2], torch.tensor(-1.0), atol=0.02)


def test_preprocess_crops_where_it_is_told_along_the_long_side():
    """A photo's other crops (trainer.data): its subject may be anywhere along its long side."""
    image = Image.new("RGB", (600, 100), (0, 255, 0))
    image.paste((255, 0, 0), (0, 0, 200, 100))  # red at the start, blue at the end, green between
    image.paste((0, 0, 255), (400, 0, 600, 100))
    for position, channel in ((0.0, 0), (0.5, 1), (1.0, 2)):
        square = preprocess(image, 20, position)
        assert torch.allclose(square[channel], torch.tensor(1.0), atol=0.02), position
    tall = preprocess(image.transpose(Image.Transpose.ROTATE_90), 20, 1.0)  # its long side is the height
    assert torch.allclose(tall[0], torch.tensor(1.0), atol=0.02)  # rotated a quarter turn: red at the bottom


def test_preprocess_centre_not_corner():
    image = Image.new("RGB", (300, 100), (0, 255, 0))
    image.paste((255, 0, 0), (100, 0, 200, 100))  # exactly the centre square is red
    tensor = preprocess(image, 20)
    assert torch.allclose(tensor[0, :, 4:16], torch.tensor(1.0), atol=0.05)
    assert torch.allclose(tensor[1, :, 4:16], torch.tensor(-1.0), atol=0.05)


def test_preprocess_wants_rgb():
    with pytest.raises(ValueError, match="RGB"):
        preprocess(Image.new("L", (8, 8)), 8)


# --- real photos -------------------------------------------------------------------------------------


@pytest.mark.skipif(not DOG.is_dir(), reason=f"{DOG} not present")
def test_real_dog_photos():
    files = check_instance_images([DOG], 512)
    assert len(files) == 5
    assert check_instance_images([DOG], 64) == files
    message = error([DOG], resolution=1024)
    assert message.startswith("5 of 5 images")
    assert all(str(f) in message for f in files)
    tensor = preprocess(load_image(files[0]), 64)
    assert tensor.shape == (3, 64, 64) and -1.0 <= tensor.min() < tensor.max() <= 1.0
