"""Validate and load the instance images (the 3-5 photos of the subject) of a DreamBooth job.

Everything here runs on the driver before any training worker starts, so that a bad photo costs the user
seconds, not a cluster allocation: every problem is reported at once, each with the offending file's path.
The SDK finds a submission's photos with `find_instance_images` too: torch loads only for `preprocess`.
"""

from __future__ import annotations

import functools
import io
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageCms, ImageOps, UnidentifiedImageError, features

from dreambooth.errors import InputError, is_system_error

if TYPE_CHECKING:
    import torch

FIELD = "instance_images"
# What a folder of photos is expanded to (the rest of it skipped: a README, a .DS_Store): every name phones, cameras
# and browsers give photos (Chrome saves some JPEGs as .jfif); a photo missing here was silently left out of the job.
# HEIC/HEIF (iPhones' own) are listed to be refused by name: Pillow cannot read them without a plugin.
IMAGE_SUFFIXES: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".webp", ".avif", ".gif", ".bmp", ".tif", ".tiff", ".heic", ".heif"}
)
_UNREADABLE_SUFFIXES = {".heic": "HEIC", ".heif": "HEIF"}
# Far above any real photo (a 50 MP camera is ~52M pixels) and far below what would exhaust a driver's memory.
MAX_IMAGE_PIXELS: int = 64 * 1024 * 1024
# A 10000x50 strip is no photo of a subject; centre-cropping it would leave a sliver of it.
MAX_ASPECT_RATIO: float = 8.0
# A controller's bound on a job's photos (DreamBooth learns a subject from 3-5), however they are named: a directory
# on shared storage expands to all of its images, and each is decoded while it holds one of the controller's few
# image-check slots. (`dreambooth train` alone has no such bound: its user's own machine.)
MAX_INSTANCE_IMAGES = 64
_WHITE = (255, 255, 255, 255)
_ORIENTATION = 0x0112  # the EXIF tag


def _dangling(path: Path) -> bool:
    return path.is_symlink() and not path.exists()


def _is_image(path: Path) -> bool:
    """Whether Pillow recognises the file's content (header only; check_instance_images decodes it)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            Image.open(path).close()
    except UnidentifiedImageError:
        return False
    except Exception:  # an image Pillow recognised but cannot open (a bomb, say): check reports it
        return True
    return True


def find_instance_images(paths: Sequence[str | os.PathLike]) -> list[Path]:
    """Expand files and directories into the list of image files, in order, without duplicates.

    Directories expand to their image files (by suffix, sorted, non-recursive, hidden files skipped), so a
    folder of photos plus a stray README works. A file named explicitly is taken by content, not suffix
    (``photo.dat`` may be a PNG), but a non-image named explicitly is a mistake worth reporting.
    """
    found: dict[Path, None] = {}
    problems: list[str] = []
    for entry in map(Path, paths):
        if entry.is_dir():
            children = sorted(p for p in entry.iterdir() if not p.name.startswith("."))
            photos = [p for p in children if p.suffix.lower() in IMAGE_SUFFIXES]
            found.update((p, None) for p in photos if p.is_file())
            # A photo's link to a drive not mounted, or to a file moved: left out, the job trained on fewer photos.
            problems += [f"{p}: a link to {os.readlink(p)}, which is not there" for p in photos if _dangling(p)]
        elif not entry.exists():
            problems.append(f"{entry}: no such file or directory")
        elif not entry.is_file():  # a FIFO (opening it waits for a writer, for ever), a device
            problems.append(f"{entry}: not a regular file")
        elif entry.suffix.lower() in IMAGE_SUFFIXES or _is_image(entry):
            found[entry] = None
        else:
            problems.append(f"{entry}: not an image")
    if problems:
        raise InputError(FIELD, "\n".join(problems))
    if not found:
        where = ", ".join(map(str, paths)) or "an empty list"
        raise InputError(FIELD, f"no image files ({' '.join(sorted(IMAGE_SUFFIXES))}) in {where}")
    return list(found)


def check_instance_image_count(count: int) -> None:
    if count > MAX_INSTANCE_IMAGES:
        raise InputError(FIELD, f"{count} images; at most {MAX_INSTANCE_IMAGES} (3-5 photos of the subject work best)")


def _problem(path: Path, resolution: int) -> str | None:
    """What is wrong with one image, or None. The header is checked before any pixel is decoded."""
    try:
        with warnings.catch_warnings():
            # Pillow only warns between its own limit and twice it; either way, a bomb is our error.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                width, height = image.size
                if width * height > MAX_IMAGE_PIXELS:
                    return f"{width}x{height} has more than {MAX_IMAGE_PIXELS} pixels (a decompression bomb?)"
                if min(width, height) == 0 or max(width, height) / min(width, height) > MAX_ASPECT_RATIO:
                    return f"absurd dimensions {width}x{height} (aspect ratio over {MAX_ASPECT_RATIO:g})"
                # A JPEG decodes at the smallest DCT scale (1/2..1/8) that still covers `resolution`: every byte
                # is still read, so truncation and corruption show up, at a fraction of the cost of a 12 MP photo.
                if image.getexif().get(_ORIENTATION, 1) in (5, 6, 7, 8):  # shown rotated by 90 degrees
                    width, height = height, width  # report sizes as the user sees the photo
                image.draft(None, (resolution, resolution))
                image.load()  # decodes every pixel
                _to_rgb(_reduced(image, resolution))  # the conversion works for its mode
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
        return f"a decompression bomb ({exc})"
    except UnidentifiedImageError:
        if kind := _UNREADABLE_SUFFIXES.get(path.suffix.lower()):
            return f"{kind} cannot be read here: convert it to JPEG or PNG"
        return "not an image (Pillow cannot identify it)"
    except OSError as exc:
        if is_system_error(exc):
            raise  # the storage's or this process's (an NFS server gone, out of descriptors), not the photo's
        return f"corrupt or truncated ({type(exc).__name__}: {exc})"
    except MemoryError:
        raise
    except Exception as exc:  # decoders raise OSError, SyntaxError, ValueError, EOFError...: all mean corrupt
        return f"corrupt or truncated ({type(exc).__name__}: {exc})"
    if min(width, height) < resolution:
        return f"{width}x{height} is too small: the short side must be at least {resolution} px"
    return None


def _reduced(image: Image.Image, resolution: int) -> Image.Image:
    """A decoded image shrunk to twice `resolution` on its short side: what the check converts, instead of every pixel
    of a 64-megapixel photo again (1.25 GiB of copies for an RGBA one, a palette or 16-bit one alike; the controller
    checks several submissions at once). Nearest neighbour: every mode takes it (reduce() refuses palettes, 1-bit and
    16-bit), and the check needs the conversion to work, not a good picture."""
    scale = 2 * resolution / min(image.size)
    if scale >= 1:
        return image
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    try:
        return image.resize(size, Image.Resampling.NEAREST)  # keeps its info: transparency, profile, EXIF
    except ValueError:  # a mode not even that takes: converted whole
        return image


def check_instance_images(
    paths: Sequence[str | os.PathLike],
    resolution: int,
    bounded: bool = False,
    before_each: Callable[[], None] = lambda: None,
) -> list[Path]:
    """Find the images and fully decode each one, raising one InputError that lists every bad file.
    `bounded`: at most MAX_INSTANCE_IMAGES of them, counted before any is decoded. `before_each` is called before
    each image is decoded (a controller stops there for a caller gone).

    Listing all problems (one per line) lets the user fix everything in one go instead of one per retry.
    """
    files = find_instance_images(paths)
    if bounded:
        check_instance_image_count(len(files))
    problems = []
    for path in files:
        before_each()
        if problem := _problem(path, resolution):
            problems.append(f"{path}: {problem}")
    if problems:
        header = f"{len(problems)} of {len(files)} images cannot be used at resolution {resolution}:"
        raise InputError(FIELD, "\n".join([header, *problems]))
    return files


def _to_8bit(image: Image.Image) -> Image.Image:
    """Scale a 16/32-bit integer or float single-channel image to L; Pillow's own convert() clips at 255."""
    # One float32 copy, scaled in place: a 64-megapixel 16-bit PNG took 1.8 GiB in float64 temporaries (float32 holds
    # every 16-bit value exactly).
    values = np.array(image, dtype=np.float32)
    if image.mode == "F":  # no declared range: infer [0, 1], [0, 255] or 16-bit from the data
        peak = float(values.max(initial=0.0))
        full_scale = 1.0 if peak <= 1.0 else 255.0 if peak <= 255.0 else 65535.0
    else:  # I;16*, and I, which is how Pillow decodes 16-bit PNG/TIFF data
        full_scale = 65535.0
    values *= 255.0 / full_scale
    np.clip(values, 0, 255, out=values)
    return Image.fromarray(np.rint(values, out=values).astype(np.uint8), mode="L")


def _to_srgb(image: Image.Image, icc_profile: bytes | None) -> Image.Image:
    """The pixels in sRGB, what the models were trained on, where the photo's colour profile says they are in
    another space: a phone's Display P3, Adobe RGB, a print's CMYK. Pillow's convert() ignores profiles, and read as
    sRGB such colours come out desaturated or off, the subject's colour learnt wrong. A profile that cannot be used
    (unreadable, or for other channels than the pixels have) leaves them as they are."""
    if not icc_profile or not features.check("littlecms2"):  # a Pillow built without LittleCMS: as they are
        return image
    if image.mode in ("P", "PA"):  # a palette's colours are in the profile's space too
        image = image.convert("RGBA" if image.has_transparency_data else "RGB")
    if image.mode not in ("RGB", "RGBA", "CMYK", "L", "LA"):
        return image
    alpha = image.getchannel("A") if image.mode.endswith("A") else None
    colours = image.convert(image.mode.removesuffix("A")) if alpha is not None else image
    try:
        source = ImageCms.ImageCmsProfile(io.BytesIO(icc_profile))
        converted = ImageCms.profileToProfile(colours, source, _srgb_profile(), outputMode="RGB")
    except (ImageCms.PyCMSError, OSError, ValueError):
        return image
    if alpha is not None:
        converted.putalpha(alpha)
    return converted


@functools.cache
def _srgb_profile() -> ImageCms.ImageCmsProfile:
    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))


def _to_rgb(image: Image.Image) -> Image.Image:
    """Upright 8-bit sRGB from any mode; transparent areas become white, as on a print."""
    icc_profile = image.info.get("icc_profile")
    image = ImageOps.exif_transpose(image)
    if image.mode in ("F", "I") or image.mode.startswith("I;16"):
        key = image.info.get("transparency")  # a grayscale PNG's transparent value, at its own bit depth
        opaque = None if not isinstance(key, int) else np.asarray(image) != key
        image = _to_8bit(image)
        if opaque is not None:
            image.putalpha(Image.fromarray(opaque.astype(np.uint8) * 255, mode="L"))
    image = _to_srgb(image, icc_profile)
    if image.has_transparency_data:
        rgba = image.convert("RGBA")  # also resolves a palette's or a grayscale's transparent colour
        return Image.alpha_composite(Image.new("RGBA", rgba.size, _WHITE), rgba).convert("RGB")
    return image.convert("RGB")


def load_image(path: Path) -> Image.Image:
    """Open an image (already validated by check_instance_images) as upright 8-bit RGB."""
    with Image.open(path) as image:
        return _to_rgb(image)


def preprocess(image: Image.Image, resolution: int, position: float = 0.5) -> torch.Tensor:
    """Resize the short side to `resolution`, crop a square at `position` along the long side (0: its start, 0.5:
    centred, 1: its end), and return float32 CHW in [-1, 1].

    [-1, 1] is the range Stable Diffusion's VAE was trained on. PIL's Lanczos filter keeps the downscale sharp
    without needing torchvision.
    """
    import torch

    if image.mode != "RGB":
        raise ValueError(f"preprocess expects an RGB image (use load_image), got mode {image.mode}")
    width, height = image.size
    scale = resolution / min(width, height)
    size = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
    image = image.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
    left, top = round((size[0] - resolution) * position), round((size[1] - resolution) * position)
    image = image.crop((left, top, left + resolution, top + resolution))
    pixels = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)
    return pixels.to(torch.float32) / 127.5 - 1.0
