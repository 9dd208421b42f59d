"""A submission's photos on their way in: read from the request (uploaded, or named on shared storage) and copied
into the job's folder; the readable_paths check that whatever a tenant names on shared storage (its photos, its base
model) must pass; and the slots that submissions decode their photos in.

Separate from controller.service, which records jobs and drives their lifecycle: reading a caller's files (limits on
sizes and counts, links followed, readable_paths) is a concern of its own.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import os
import re
import stat
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import url2pathname

from controller.config import ControllerConfig
from controller.errors import PermissionDenied
from dreambooth.durable import write_file
from dreambooth.errors import InputError, is_system_error
from trainer.images import check_instance_image_count, find_instance_images
from trainer.spec import MAX_PATH_CHARS

# Submissions whose photos are decoded at once, one of them a tenant's at most. A photo at the pixel limit (64
# megapixels) takes up to ~0.6 GiB while it is checked, and every RPC thread may be submitting: more at once would
# not go faster on a few cores, only hold more memory (the controller's pod has 5 GiB).
IMAGE_CHECKS_AT_ONCE = 2


class ImageCheckSlots:
    """Where submissions decode their photos: `slots` at once, one tenant's at most one of them (a tenant's photos
    slow to decode, 64 to a submission, held every slot for minutes while the other tenants' submissions waited
    past their deadlines)."""

    def __init__(self, slots: int):
        self._slots = slots
        self._holders: collections.Counter[str | None] = collections.Counter()
        self._changed = threading.Condition()

    @contextlib.contextmanager
    def slot(self, tenant: str | None, check_caller: Callable[[], None]) -> Iterator[None]:
        """A slot for `tenant` (None: no tenants, one user), for as long as `check_caller()` does not raise (the
        caller gone): it is asked every second while the slot is waited for."""
        with self._changed:
            while self._holders.total() >= self._slots or (tenant is not None and self._holders[tenant]):
                self._changed.wait(timeout=1.0)
                check_caller()
            self._holders[tenant] += 1
        try:
            check_caller()
            yield
        finally:
            with self._changed:
                self._holders[tenant] -= 1
                self._changed.notify_all()


@dataclass(frozen=True)
class ImageInput:
    """One instance image of a submission: uploaded bytes, or a path/file:// URI on shared storage."""

    filename: str = ""
    data: bytes | None = None
    uri: str = ""


class PhotoIntake:
    """Reads a submission's photos and copies them into its job, and checks that what a tenant names on shared
    storage is in readable_paths."""

    def __init__(self, config: ControllerConfig):
        self.config = config
        self._readable_roots = tuple(Path(p).resolve() for p in config.readable_paths)

    def stage(self, images: list[ImageInput], upload_dir: Path) -> tuple[list[str], dict[str, str]]:
        """Copies a request's photos into the job; returns the copies' paths, and what the caller called each (an
        upload's filename, a named photo's path)."""
        if not images:
            raise InputError("instance_images", "give 1 or more images of the subject (3-5 work best)")
        check_instance_image_count(len(images))  # of the request; of the photos once directories are expanded
        total = sum(len(i.data or b"") for i in images)
        if total > self.config.max_images_bytes:
            raise InputError("instance_images", f"{total} bytes of images; at most {self.config.max_images_bytes}")
        upload_dir.mkdir(parents=True, exist_ok=True)
        paths, names = [], []
        for index, (name, chunks) in enumerate(self._photo_contents(images)):
            paths.append(str(upload_dir / _safe_filename(name, index)))
            names.append(name)
            write_file(Path(paths[-1]), chunks)
        # Uploads carry base names: two folders' IMG_0001.JPG are told apart by their place in the request.
        repeated = {name for name, count in collections.Counter(names).items() if count > 1}
        sent_as = {
            path: name if name and name not in repeated else f"{name or 'unnamed upload'} (photo {index + 1})"
            for index, (path, name) in enumerate(zip(paths, names, strict=True))
        }
        return paths, sent_as

    def digests(self, images: list[ImageInput]) -> list[str]:
        """The sha256 of each photo of a request, in order (a retry's, to compare with the job's copies)."""
        digests = []
        for _, chunks in self._photo_contents(images):
            digest = hashlib.sha256()
            for chunk in chunks:
                digest.update(chunk)
            digests.append(digest.hexdigest())
        return digests

    def _photo_contents(self, images: list[ImageInput]) -> Iterator[tuple[str, Iterable[bytes]]]:
        """(name, chunks) of each photo of a request, in order, each read to its end before the next is asked for:
        a photo named by path is read as its chunks are, within what is left of max_named_images_bytes (counted as
        read: a file's size may change under us)."""
        named_left = self.config.max_named_images_bytes
        for name, photo in self._photo_sources(images):
            if isinstance(photo, bytes):
                yield name, [photo]
                continue
            sizes: list[int] = []
            yield name, _recording_sizes(self._shared_photo_chunks(photo, named_left), sizes)
            named_left -= sum(sizes)

    def _photo_sources(self, images: list[ImageInput]) -> list[tuple[str, bytes | Path]]:
        """(name, uploaded bytes or a photo file on shared storage, not read yet) of each photo of a request, in
        order; a file named twice (itself and its folder, say) once."""
        sources: list[tuple[str, bytes | Path]] = []
        named: set[Path] = set()
        for index, image in enumerate(images):
            if image.data is not None:
                if len(image.data) > self.config.max_image_bytes:
                    raise InputError(
                        "instance_images",
                        f"image {index} ({image.filename or 'unnamed'}) is "
                        f"{len(image.data)} bytes; at most {self.config.max_image_bytes}",
                    )
                sources.append((image.filename, image.data))
            elif image.uri:
                for path in self._shared_photos(image.uri):
                    if path.resolve() not in named:
                        named.add(path.resolve())
                        sources.append((str(path), path))
            else:
                raise InputError("instance_images", f"image {index} has neither data nor uri")
            check_instance_image_count(len(sources))  # directories expanded
        return sources

    def _shared_photos(self, uri: str) -> list[Path]:
        """The photo files a path on shared storage names: itself, or a directory's (trainer.images)."""
        path = shared_path(uri)
        if not path.is_absolute():
            raise InputError("instance_images", f"{uri}: must be an absolute path on shared storage")
        self.check_readable("instance_images", path, deep=False)  # each file is checked again as it is opened
        try:
            return find_instance_images([path])
        except OSError as e:
            if is_system_error(e):
                raise
            raise InputError("instance_images", f"cannot read {uri!r}: {e}") from e

    def _shared_photo_chunks(self, path: Path, request_left: int, chunk_bytes: int = 1 << 20) -> Iterator[bytes]:
        """A photo named by path, in chunks: copied into the job at submission, since read later, at training, a
        file its tenant can write could by then be a link to another tenant's photos (checked now, swapped after).
        Checked where the opened file really is (every link followed), and read up to max_named_image_bytes and
        what is `request_left` of max_named_images_bytes (a sparse file of 64 GiB costs no disk, and would be copied
        whole)."""
        limit = min(self.config.max_named_image_bytes, max(request_left, 0))
        try:
            # O_NONBLOCK: opening a FIFO would wait for a writer; it is refused below as not a regular file.
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
            with os.fdopen(fd, "rb") as file:
                self.check_readable("instance_images", Path(os.readlink(f"/proc/self/fd/{fd}")), deep=False)
                if not stat.S_ISREG(os.fstat(fd).st_mode):
                    raise InputError("instance_images", f"{path}: not a regular file")
                read = 0
                while chunk := file.read(chunk_bytes):
                    read += len(chunk)
                    if read > limit:
                        raise InputError(
                            "instance_images",
                            f"{path}: over {limit} bytes, what is left for it of max_named_image_bytes "
                            f"({self.config.max_named_image_bytes}) each and max_named_images_bytes "
                            f"({self.config.max_named_images_bytes}) in all",
                        )
                    yield chunk
        except OSError as e:
            if is_system_error(e):
                raise
            raise InputError("instance_images", f"cannot read {path}: {e}") from e

    def check_readable(self, field: str, path: str | Path, deep: bool = True) -> None:
        """With tenants, a named file (or everything in a named directory: however deep, or its first level) must
        resolve, symlinks followed, into `readable_paths`: a tenant may not train on another tenant's uploads or
        models, or on the controller's own files (a base model's `unet/` holding a link to another's weights, say).
        Checked before anything is read, so a refusal does not tell whether the path exists."""
        if len(str(path)) > MAX_PATH_CHARS:  # resolving a megabyte of "../" takes seconds
            raise InputError(field, f"a path of {len(str(path))} characters; at most {MAX_PATH_CHARS}")
        if not self.config.tenants:
            return  # local use: one user, any path

        def readable(file: Path) -> bool:
            return any(file.resolve().is_relative_to(root) for root in self._readable_roots)

        try:
            named = Path(path).expanduser()
            entries = _tree(field, named) if deep else (named.iterdir() if named.is_dir() else ())
            allowed = readable(named) and all(readable(entry) for entry in entries)
        except (OSError, RuntimeError, ValueError) as e:  # a symlink loop, "~nosuchuser", too long, a NUL byte
            raise InputError(field, f"cannot read {str(path)!r}: {e}") from e
        if not allowed:
            instead = "upload the photos instead, or " if field != "base_model" else ""
            raise PermissionDenied(
                f"{field}: {path} is outside the directories this controller lets clients read; {instead}ask the "
                "operator to add its directory to readable_paths"
            )


def _recording_sizes(chunks: Iterable[bytes], sizes: list[int]) -> Iterator[bytes]:
    for chunk in chunks:
        sizes.append(len(chunk))
        yield chunk


MAX_TREE_ENTRIES = 10_000  # a base model has a few dozen files; a photo folder, its photos


def _tree(field: str, directory: Path) -> Iterator[Path]:
    """Every entry below `directory` (nothing if it is a file), links to directories followed once each."""
    seen, todo, count = set(), [directory], 0
    while todo:
        current = todo.pop()
        if not current.is_dir() or (real := current.resolve()) in seen:
            continue
        seen.add(real)
        for entry in current.iterdir():
            count += 1
            if count > MAX_TREE_ENTRIES:
                raise InputError(field, f"{directory}: more than {MAX_TREE_ENTRIES} files and folders")
            yield entry
            todo.append(entry)


def shared_path(uri: str) -> Path:
    """The path a photo's URI names: a path, or a file:// URI."""
    try:
        parsed = urlparse(uri)
    except ValueError as e:  # "Invalid IPv6 URL" for file://[ and the like
        raise InputError("instance_images", f"{uri}: not a path or URI ({e})") from e
    if parsed.scheme not in ("", "file"):
        raise InputError("instance_images", f"{uri}: only paths or file:// URIs on shared storage")
    return Path(url2pathname(parsed.path) if parsed.scheme else uri)  # file:///my%20dog.jpg is "my dog.jpg"


def _safe_filename(name: str, index: int) -> str:
    """Uploaded names never choose where a file goes: keep a harmless basename, prefixed to be unique."""
    base = re.sub(r"[^A-Za-z0-9._-]", "_", Path(name or "").name)[-80:].lstrip(".") or "image"
    return f"{index:03d}_{base}"
