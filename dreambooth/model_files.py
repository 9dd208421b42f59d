"""What a base model directory holds: the checks made before anything loads it, and its fingerprint.

Light to import (no torch, no diffusers at import): the controller checks every submission's base model with it,
and the CLI checks a job's before its training libraries load. diffusers is imported only to build the sampling
scheduler a complete-looking model names.
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import hashlib
import json
import os
import re
import stat
import struct
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dreambooth.errors import InputError

REQUIRED_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
# An exported subject model's own file beside the diffusers ones: its base model, prompts, hyper-parameters.
METADATA_FILE = "metadata.json"


@dataclass(frozen=True)
class ModelMetadata:
    """An exported model's metadata.json: how it was made. The trainer writes it; serving reads it (a model an
    earlier version exported may lack fields: their defaults; a later version's fields are not read)."""

    job_id: str = ""
    base_model: str = ""
    # Serving shares the frozen VAE (and an untrained text encoder) between subjects of one base model.
    base_model_fingerprint: str = ""
    base_model_fingerprint_version: int = 1  # the FINGERPRINT_VERSION it was made with (1: before it was written)
    identifier: str = ""
    instance_prompt: str = ""
    class_prompt: str | None = None
    steps: int = 0
    final_loss: float | None = None  # the last step's (over its micro-steps and ranks): noisy at small batches
    wall_time_s: float | None = None  # every run of the job's, added up, until its export began
    hyperparameters: dict[str, Any] = field(default_factory=dict)  # the job's spec

    @property
    def resolution(self) -> int:
        """The side its images were trained at."""
        return int((self.hyperparameters or {}).get("resolution") or 512)

    @property
    def shared_base(self) -> str:
        """What serving shares its base model's components under: the base's fingerprint, where it was made as
        fingerprint() makes it now; else "" (nothing shared). An older one may name two bases alike: fine-tunes whose
        files have the same sizes and mtimes are told apart only since version 2."""
        return self.base_model_fingerprint if self.base_model_fingerprint_version == FINGERPRINT_VERSION else ""

    @property
    def text_encoder_trained(self) -> bool:
        return bool((self.hyperparameters or {}).get("train_text_encoder", True))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def read(cls, model_dir: Path) -> ModelMetadata:
        """The model's metadata (every field's default without the file); ValueError if it is not a JSON object."""
        file = Path(model_dir) / METADATA_FILE
        data = json.loads(file.read_text()) if file.is_file() else {}
        if not isinstance(data, dict):
            raise ValueError(f"{file} holds a JSON {type(data).__name__}, not an object")
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in data.items() if key in known})


# The config file each component folder must hold.
_CONFIG_FILES = {
    "unet": "config.json",
    "vae": "config.json",
    "text_encoder": "config.json",
    "scheduler": "scheduler_config.json",
}

# Weight file name stems: diffusers models vs. transformers models ("pytorch_model" is transformers' older
# .bin name, still what many SD 1.5 copies carry next to model.safetensors).
_WEIGHT_STEMS = {
    "unet": ("diffusion_pytorch_model",),
    "vae": ("diffusion_pytorch_model",),
    "text_encoder": ("model", "pytorch_model"),
}

_SINGLE_FILE_HINT = (
    "it must be a Stable Diffusion model in diffusers format (a directory with model_index.json and "
    "unet/, vae/, text_encoder/, tokenizer/, scheduler/ folders, as written by "
    "StableDiffusionPipeline.save_pretrained); single-file .ckpt/.safetensors checkpoints are not supported, "
    "convert them with diffusers' StableDiffusionPipeline.from_single_file(...).save_pretrained(DIR) first"
)


# Shard numbers as diffusers and transformers write them: `-00001-of-00003`.
_SHARD = r"-\d{5}-of-\d{5}"


@functools.cache
def _weight_name(stems: tuple[str, ...], variant: str | None) -> re.Pattern[str]:
    """The names diffusers loads one variant's weights from (single or sharded, .safetensors or .bin, and the
    shards' index): pipeline_loading_utils.variant_compatible_siblings' patterns, anchored at both ends so that
    the default variant's shards are not taken for an fp16 variant's in the older naming."""
    stem, ext = "|".join(map(re.escape, stems)), r"(?:safetensors|bin)"
    if variant is None:
        names = [rf"(?:{stem})(?:{_SHARD})?\.{ext}", rf"(?:{stem})\.{ext}\.index\.json"]
    else:
        v = re.escape(variant)
        names = [
            rf"(?:{stem})\.{v}(?:{_SHARD})?\.{ext}",  # as diffusers and transformers name them now
            rf"(?:{stem}){_SHARD}\.{v}\.{ext}",  # older diffusers put the variant last
            rf"(?:{stem})\.{ext}\.index\.{v}\.json",
            rf"(?:{stem})\.{ext}\.{v}\.index\.json",  # the older diffusers' index
        ]
    return re.compile("|".join(f"(?:{name})" for name in names))


def _weight_files(folder: Path, stems: tuple[str, ...], variant: str | None) -> list[Path]:
    """Weight files (single or sharded, .safetensors or .bin, shard indexes) for one variant (None: the default
    one), links that do not resolve included."""
    if not folder.is_dir():
        return []
    pattern = _weight_name(stems, variant)
    return sorted(file for file in folder.iterdir() if pattern.fullmatch(file.name))


def weights_variant(folder: Path, component: str) -> str | None:
    """The weights variant to load: the default files if present, else the fp16 ones (some published
    copies ship only `*.fp16.safetensors`, or fp16 shards named `*-00001-of-00002.fp16.safetensors`).
    check_base_model has made sure one of the two exists."""
    stems = _WEIGHT_STEMS[component]
    if not _weight_files(folder, stems, None) and _weight_files(folder, stems, "fp16"):
        return "fp16"
    return None


def _tokenizer_problem(folder: Path) -> str | None:
    # A tokenizers-backed save writes tokenizer.json; older (slow tokenizer) saves, like SD 1.5's, have
    # vocab.json + merges.txt. Either loads.
    if (folder / "tokenizer.json").is_file():
        return None
    missing = [name for name in ("vocab.json", "merges.txt") if not (folder / name).is_file()]
    if missing:
        return "tokenizer/tokenizer.json (or tokenizer/vocab.json + tokenizer/merges.txt)"
    return None


def check_base_model(path: str | os.PathLike) -> Path:
    """Checks that `path` is a complete diffusers-format Stable Diffusion model, without loading weights.

    Raises InputError(field="base_model") naming every missing piece at once; returns the resolved path.
    """
    root = Path(path).expanduser()
    if root.is_symlink() and not root.exists():
        raise InputError("base_model", f"{str(path)!r} is a link to {os.readlink(root)!r}, which does not exist")
    if not root.exists():
        raise InputError("base_model", f"{str(path)!r} does not exist; {_SINGLE_FILE_HINT}")
    if not root.is_dir():
        raise InputError("base_model", f"{str(path)!r} is not a directory; {_SINGLE_FILE_HINT}")
    root = root.resolve()
    if not os.path.lexists(root / "model_index.json") and (root / "snapshots").is_dir():
        raise InputError("base_model", f"{str(root)!r} is a Hugging Face cache folder: {_snapshot_hint(root)}")
    if dangling := _dangling_links(root):
        shown = ", ".join(dangling[:3]) + (f" and {len(dangling) - 3} more" if len(dangling) > 3 else "")
        raise InputError(
            "base_model",
            f"{str(root)!r} has links to files that are not there: {shown}. A copy of a Hugging Face cache "
            "snapshot keeps its links but not the blobs they point to: copy it with links followed "
            "(`cp -rL SNAPSHOT DIR`, `rsync -aL`)",
        )
    if not (root / "model_index.json").is_file():
        raise InputError("base_model", f"{str(root)!r} has no model_index.json; {_SINGLE_FILE_HINT}")

    missing = []
    for component in REQUIRED_COMPONENTS:
        folder = root / component
        if not folder.is_dir():
            missing.append(f"{component}/ folder")
            continue
        if component == "tokenizer":
            problem = _tokenizer_problem(folder)
            if problem:
                missing.append(problem)
            continue
        config = _CONFIG_FILES[component]
        if not (folder / config).is_file():
            missing.append(f"{component}/{config}")
        if component in _WEIGHT_STEMS:
            stems = _WEIGHT_STEMS[component]
            if not (_weight_files(folder, stems, None) or _weight_files(folder, stems, "fp16")):
                missing.append(f"{component} weights ({component}/{stems[0]}*.safetensors or .bin)")
    if missing:
        raise InputError(
            "base_model",
            f"{str(root)!r} is not a complete diffusers-format Stable Diffusion model; missing: " + ", ".join(missing),
        )
    if cut := _cut_short(root):
        raise InputError("base_model", f"{str(root)!r} has weight files that cannot be loaded: " + ", ".join(cut))
    problems = _architecture_problems(root)
    if problems:
        raise InputError(
            "base_model", f"{str(root)!r} is not a text-to-image Stable Diffusion model: " + "; ".join(problems)
        )
    return root


def _snapshot_hint(repo: Path) -> str:
    """Where the model is in a Hugging Face cache folder (`models--org--name`): snapshots/<revision>."""
    revisions = sorted(folder.name for folder in (repo / "snapshots").iterdir() if folder.is_dir())
    try:
        main = (repo / "refs" / "main").read_text().strip()
    except (OSError, UnicodeDecodeError):
        main = ""
    if main in revisions or len(revisions) == 1:
        return f"pass its snapshot, {str(repo / 'snapshots' / (main if main in revisions else revisions[0]))!r}"
    return f"pass one of its snapshots, {str(repo / 'snapshots')!r}/<revision> ({', '.join(revisions) or 'none'})"


def _dangling_links(root: Path) -> list[str]:
    """`name -> target` of each link in the model (its top folder and component folders, hidden ones left out as
    fingerprint leaves them) that points to nothing: a Hugging Face cache snapshot copied without its blobs."""
    found = []
    folders = [root]
    while folders:
        folder = folders.pop(0)
        try:
            entries = sorted(entry for entry in folder.iterdir() if not entry.name.startswith("."))
        except OSError:  # a folder this process may not list: what needs it says so
            continue
        for entry in entries:
            if entry.is_symlink() and not entry.exists():
                found.append(f"{entry.relative_to(root).as_posix()} -> {os.readlink(entry)}")
            elif folder == root and entry.is_dir():
                folders.append(entry)
    return found


_HEADER_MAX_BYTES = 100 * 1024 * 1024  # safetensors' own limit on a header
_LFS_POINTER = b"version https://git-lfs"
_LFS_HINT = "a Git LFS pointer: run `git lfs pull` in the model"


def _cut_short(root: Path) -> list[str]:
    """The weight files to load that cannot be: shorter than their header says, not safetensors at all, a Git LFS
    pointer, a torch.save zip without its end, a shard index naming a shard that is not there. Found at submission
    from headers and zip directories (KBs), not hours later when every worker fails to load them."""
    cut = []
    for component, stems in _WEIGHT_STEMS.items():
        folder = root / component
        files = _weight_files(folder, stems, weights_variant(folder, component))
        # diffusers and transformers load safetensors where there are any: .bin files beside them are not read (and
        # may be LFS pointers: `git lfs pull -I "*.safetensors"`).
        to_load = dict.fromkeys([file for file in files if ".safetensors" in file.name] or files)
        for index in [file for file in to_load if file.suffix == ".json"]:
            problem, shards = _index_shards(index)
            if problem:
                cut.append(f"{component}/{index.name} ({problem})")
            for name in shards:
                if (folder / name).is_file():
                    to_load.setdefault(folder / name)
                else:
                    cut.append(f"{component}/{index.name} (names {name}, which is not there)")
        for file in to_load:
            if file.suffix != ".json" and (problem := _weights_problem(file)):
                cut.append(f"{component}/{file.name} ({problem})")
    return cut


def _index_shards(index: Path) -> tuple[str | None, list[str]]:
    """A shard index's problem, or the shard files its weight_map names."""
    try:
        weight_map = json.loads(index.read_bytes()).get("weight_map")
    except (ValueError, AttributeError):  # not JSON (an LFS pointer too), or not an object
        return ("not a weights index" + (f", {_LFS_HINT}" if index.read_bytes().startswith(_LFS_POINTER) else ""), [])
    if not isinstance(weight_map, dict) or not all(isinstance(name, str) for name in weight_map.values()):
        return "its weight_map is not an object of file names", []
    return None, sorted(set(weight_map.values()))


def _weights_problem(file: Path) -> str | None:
    """Why one weights file cannot load, told from its first bytes and its header or zip directory."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        start = f.read(64)
    if start.startswith(_LFS_POINTER):
        return _LFS_HINT
    if file.suffix == ".bin":
        if size == 0:
            return "empty"
        if not start.startswith(b"PK"):
            return None  # torch.save's legacy format (a pickle): only a load tells
        try:
            with zipfile.ZipFile(file):  # reads the central directory, at its end
                pass
        except (zipfile.BadZipFile, OSError):
            return f"a torch.save zip cut short: {size} bytes, without its end"
        return None
    try:
        (length,) = struct.unpack_from("<Q", start)
        if length > min(size, _HEADER_MAX_BYTES):
            raise ValueError(f"a header of {length} bytes")
        with open(file, "rb") as f:
            f.seek(8)
            header = json.loads(f.read(length))
        end = max((t["data_offsets"][1] for n, t in header.items() if n != "__metadata__"), default=0)
        wanted = 8 + length + end
    except (struct.error, ValueError, TypeError, KeyError, IndexError, AttributeError):
        return "not a safetensors file"
    return f"{size} of {wanted} bytes" if size < wanted else None


# Pipelines of SD 1.x/2.x's components (the img2img one is saved with the same folders and weights).
_PIPELINES = frozenset({"StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline"})


def _architecture_problems(root: Path) -> list[str]:
    """What makes a complete-looking model one this project cannot train or serve (SDXL, an inpainting UNet, ...),
    found in its JSON files: told before any worker starts rather than as a shape error in the first step."""
    configs = {}
    for name in ("model_index.json", "unet/config.json", "text_encoder/config.json"):
        try:
            configs[name] = json.loads((root / name).read_text())
        except ValueError as e:  # not JSON, or not UTF-8
            return [f"{name} is not valid JSON ({e})"]
        if not isinstance(configs[name], dict):
            return [f"{name} holds a {type(configs[name]).__name__}, not a JSON object"]
    pipeline = configs["model_index.json"].get("_class_name")
    unet, text_encoder = configs["unet/config.json"], configs["text_encoder/config.json"]
    problems = []
    if not isinstance(pipeline, str):
        problems.append(f"model_index.json's _class_name is {pipeline!r}, not a class name")
    elif pipeline not in _PIPELINES:
        problems.append(f"model_index.json names a {pipeline}, not a StableDiffusionPipeline (SD 1.x/2.x)")
    channels = (unet.get("in_channels"), unet.get("out_channels"))
    if channels != (4, 4):
        problems.append(f"its UNet takes/gives {channels[0]}/{channels[1]} channels, not 4/4 (an inpainting model?)")
    width, hidden_size = unet.get("cross_attention_dim"), text_encoder.get("hidden_size")
    widths = width if isinstance(width, list) else [width]  # one per block in some configs
    widths_are_numbers = bool(widths) and all(map(_is_int, widths))
    if not widths_are_numbers:
        problems.append(f"unet/config.json's cross_attention_dim is {width!r}, not a number or a list of numbers")
    if not _is_int(hidden_size):
        problems.append(f"text_encoder/config.json's hidden_size is {hidden_size!r}, not a number")
    elif widths_are_numbers and set(widths) != {hidden_size}:
        problems.append(f"its UNet attends to {width}-wide text states, its text encoder gives {hidden_size}")
    # Compared with the tokenizer's model_max_length when the tokenizer loads (dreambooth.sd_model); absent, CLIP's
    # default holds.
    if "max_position_embeddings" in text_encoder and not _is_int(positions := text_encoder["max_position_embeddings"]):
        problems.append(f"text_encoder/config.json's max_position_embeddings is {positions!r}, not a number")
    if (problem := _sampling_scheduler_problem(root, configs["model_index.json"].get("scheduler"))) is not None:
        problems.append(problem)
    return problems


def _is_int(value: Any) -> bool:
    """An integer in JSON (a bool is one to Python, not to a config)."""
    return isinstance(value, int) and not isinstance(value, bool)


def sampling_scheduler(path: str | os.PathLike):
    """The scheduler named in model_index.json (what StableDiffusionPipeline samples with, e.g. PNDM for SD 1.5)."""
    import diffusers

    _, class_name = json.loads((Path(path) / "model_index.json").read_text())["scheduler"]
    return getattr(diffusers, class_name).from_pretrained(path, subfolder="scheduler", local_files_only=True)


def pipeline_scheduler(path: str | os.PathLike):
    """sampling_scheduler as StableDiffusionPipeline samples with it (validation, class images): its constructor sets
    an old config's steps_offset to 1 and clip_sample to False."""
    scheduler = sampling_scheduler(path)
    changes = {}
    if getattr(scheduler.config, "steps_offset", 1) != 1:
        changes["steps_offset"] = 1
    if getattr(scheduler.config, "clip_sample", False) is True:
        changes["clip_sample"] = False
    return type(scheduler).from_config(scheduler.config, **changes) if changes else scheduler


def check_inference_steps(scheduler, steps: int, field: str) -> None:
    """Refuses (InputError naming `field`) a number of sampling steps that `scheduler` cannot take to the end: more
    than it allows (LCM: 50), or so many that a timestep falls outside its training schedule (SD 1.5's PNDM at 1000
    steps starts at timestep 1000 of 0..999: an IndexError at the first step; DPM-Solver's "leading" spacing at 1000
    fails at its last). Tried, not predicted: the steps run once on a one-pixel latent, per scheduler config and
    count. `scheduler` is left as it was."""
    config = json.dumps(dict(scheduler.config), sort_keys=True, default=str)
    if (problem := _sampling_problem(type(scheduler).__name__, config, steps)) is not None:
        raise InputError(field, f"{type(scheduler).__name__} cannot sample {steps} steps ({problem}): ask for fewer")


@functools.lru_cache(maxsize=256)
def _sampling_problem(scheduler_class: str, config: str, steps: int) -> str | None:
    import diffusers
    import torch

    scheduler = getattr(diffusers, scheduler_class).from_config(json.loads(config))
    try:
        scheduler.set_timesteps(steps)
        sample = torch.zeros(1, 4, 1, 1)
        for t in scheduler.timesteps:
            model_input = scheduler.scale_model_input(sample, t)
            sample = scheduler.step(torch.zeros_like(model_input), t, sample, return_dict=False)[0]
    except Exception as e:  # IndexError, ValueError, AssertionError: whatever the scheduler's own code raises
        return f"{type(e).__name__}: {e}"
    return None


# Schedulers that draw their noise from a source of their own rather than the caller's generators: a seeded
# request's images would change from one call to the next, and with its batch-mates.
_UNSEEDABLE_SCHEDULERS = frozenset({"DPMSolverSDEScheduler"})


def _sampling_scheduler_problem(root: Path, entry) -> str | None:
    """Validation, class images, the export and serving sample with the scheduler model_index.json names (training
    uses its config with DDPM): one that this diffusers cannot build would fail them at the end, after training."""
    import diffusers

    name = entry[1] if isinstance(entry, list) and len(entry) == 2 else None
    scheduler = getattr(diffusers, name, None) if isinstance(name, str) and name.endswith("Scheduler") else None
    if scheduler is None:
        return f"model_index.json names scheduler {name!r}, which diffusers {diffusers.__version__} does not have"
    if name in _UNSEEDABLE_SCHEDULERS:
        return f"its scheduler {name} draws noise that seeds do not reproduce; name another in model_index.json"
    try:
        sampling_scheduler(root)
    except Exception as e:  # a missing optional package (ImportError), a config it refuses (ValueError, ...)
        return f"its scheduler {name} cannot be built here ({type(e).__name__}: {e})"
    return None


def content_identity(path: str | os.PathLike, sample_bytes: int = 1 << 20) -> str:
    """A hex id of what a model directory holds, whatever its files' inodes and times: each file's path, size and
    its first and last `sample_bytes`. A copy keeps it; another fine-tune of the same architecture (same names and
    sizes, other weights) changes it. Reads a few MiB per file, not gigabytes. Hidden files are not the model."""
    root = Path(path)
    files = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = [name for name in dirnames if not name.startswith(".")]
        files += [Path(dirpath) / name for name in filenames if not name.startswith(".")]
    digest = hashlib.sha256()
    for file in sorted(files):
        try:
            # Non-blocking: a FIFO left in the folder would hold the open for ever. It, a socket, and a file this
            # process may not read (a stray checkpoint copied with sudo, which diffusers never opens) are not the
            # model's weights: left out. Anything else (an NFS hiccup) is raised: a wrong id would refuse the job.
            fd = os.open(file, os.O_RDONLY | os.O_NONBLOCK)
        except OSError as e:
            if e.errno in (errno.EACCES, errno.EPERM, errno.ENXIO):
                continue
            raise
        with os.fdopen(fd, "rb") as f:
            status = os.fstat(fd)
            if not stat.S_ISREG(status.st_mode):
                continue
            head = f.read(sample_bytes)
            f.seek(max(status.st_size - sample_bytes, len(head)))
            tail = f.read(sample_bytes)
        digest.update(f"{file.relative_to(root).as_posix()}\0{status.st_size}\0".encode())
        digest.update(hashlib.sha256(head + tail).digest())
    return digest.hexdigest()[:16]


# What fingerprint() hashes, numbered: bumped when that changes (2: the inode joined size and mtime), so that serving
# does not share components between models exported with fingerprints that told less apart.
FINGERPRINT_VERSION = 2


def fingerprint(path: str | os.PathLike) -> str:
    """A short, stable hex id of a model directory for cache keys.

    Hashes (relative path, size, mtime_ns, inode) of every file rather than the contents, so it stays cheap for
    gigabytes of weights. Two fine-tunes of one architecture have files of the same sizes, and installed with
    normalised mtimes (a reproducible image build, `tar --mtime`) they were told apart by nothing else, and shared
    class images and a VAE: their files are other inodes. A copy (`cp -a`, a restore, a copy on each node's own
    disk, a FUSE mount of an object store that numbers inodes per mount) is other inodes too: its class images are
    generated again, the same ones, never wrong. Metadata changes
    (chmod, chown) leave it as it is; so does a file rewritten in place keeping its size and mtime, which only a
    deliberate `touch -d` after the write makes. Symlinks, to files (the Hugging Face cache layout) or to
    component folders, are followed to their targets. Hidden files and folders (.git, editors' files) are not the
    model: a `git fetch` in a cloned model must not change it.
    """
    root = Path(path)
    entries = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(name for name in dirnames if not name.startswith("."))
        for name in filenames:
            if name.startswith("."):
                continue
            file = Path(dirpath) / name
            status = file.stat()
            entries.append(
                f"{file.relative_to(root).as_posix()}\0{status.st_size}\0{status.st_mtime_ns}\0{status.st_ino}\n"
            )
    digest = hashlib.sha256("".join(sorted(entries)).encode())
    return digest.hexdigest()[:16]
