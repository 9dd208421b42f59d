"""The DreamBooth job spec: one typed dataclass, the single source of truth for a training job.

Loaded from YAML or JSON by the CLI, built from a gRPC request by the controller, passed to the Ray job and
its workers as a plain dict. `validate()` checks every field's own constraints (cheap, no I/O); the checks
that read files (images, base model) live in `trainer.preflight`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import reprlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import yaml

from dreambooth.errors import InputError, refuse_unknown
from dreambooth.yaml_load import load_yaml

Precision = Literal["fp16", "bf16", "fp32"]
LrSchedule = Literal["constant", "linear", "cosine"]
PlacementStrategy = Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"]
CompileBackend = Literal["inductor", "aot_eager"]

MAX_PATH_CHARS = 4096
# Bounds on work one spec can ask for: the driver lists every class image, and every validation prompt is sampled
# at every validation (on the GPUs the job holds).
MAX_CLASS_IMAGES = 10_000
MAX_VALIDATION_PROMPTS = 32
# CLIP reads 77 tokens of a prompt; the rest is cut. Far longer prompts are a mistake, and would be stored with
# the job, read on every scheduling pass and copied into the model's metadata.
MAX_PROMPT_CHARS = 2000


@dataclass
class JobSpec:
    # What to learn.
    base_model: str
    """Local directory of a Stable Diffusion model in diffusers format (e.g. SD 1.5)."""
    instance_images: list[str]
    """Image files and/or directories of them: the 3-5 photos of the subject."""
    instance_prompt: str
    """Prompt naming the subject with its identifier, e.g. "a photo of sks dog"."""
    identifier: str = "sks"
    """The rare token that stands for the subject; it must appear in `instance_prompt` as CLIP reads it (any case,
    not inside a longer run of letters: 'sks dog', 'Sks', 'sks_style' count, 'sksdog' does not), and not in
    `class_prompt`."""

    # Class-prior preservation (DreamBooth paper, section 3.3). num_class_images=0 turns it off.
    class_prompt: str = ""
    """Prompt for the subject's class, e.g. "a photo of dog"; required when num_class_images > 0."""
    num_class_images: int = 100
    prior_loss_weight: float = 1.0
    """Weight of the prior-preservation loss, in (0, 100] while num_class_images > 0 (num_class_images: 0 turns
    prior preservation off)."""
    class_image_inference_steps: int = 25
    class_image_guidance_scale: float = 7.5

    # Optimisation.
    resolution: int = 512
    max_steps: int = 400
    learning_rate: float = 5e-6
    lr_schedule: LrSchedule = "constant"
    lr_warmup_steps: int = 0
    """Steps of linear warm-up from 0, with any schedule (constant: constant after the warm-up)."""
    batch_size: int = 1
    """Instance images per worker per micro-step (as many class images are added when prior is on)."""
    gradient_accumulation_steps: int = 1
    max_grad_norm: float = 1.0
    adam_weight_decay: float = 1e-2
    train_text_encoder: bool = False
    gradient_checkpointing: bool = False
    torch_compile: bool = False
    """torch.compile the trained networks: faster GPU steps. The first job of a model and resolution compiles for
    minutes; later ones load the compiled code from the storage's cache/torch_compile. Under zero_stage 2 only."""
    compile_backend: CompileBackend = "inductor"
    """torch.compile's backend: inductor generates the fast kernels; aot_eager traces the same graphs (forward and
    backward) and runs them eagerly, in seconds and without generated code: to tell an inductor problem apart."""
    cuda_graphs: bool = True
    """With torch_compile (inductor) on GPUs: each compiled forward and backward is replayed as a CUDA graph, one
    launch instead of hundreds (torch.compile's mode reduce-overhead). The step of SD 1.5 at 512 px is launch-bound:
    on an H200 it took 73.9 ms with CUDA graphs, 146.4 compiled without, 145.7 eager; CUDA graphs' own memory pool
    raised the peak from 16.6 to 18.1 GiB. false: compiled kernels launched one by one."""
    precision: Precision = "fp16"
    """fp16 (GPUs, DeepSpeed dynamic loss scaling), bf16, or fp32. DeepSpeed refuses fp16 on CPUs. Class images are
    sampled in the same precision on GPUs (a base model that overflows in fp16 samples NaN: refused; bf16 has fp32's
    range)."""
    seed: int = 0

    # DeepSpeed ZeRO.
    zero_stage: int = 2
    offload_optimizer: bool = False
    offload_params: bool = False
    """Parameter offload to CPU; ZeRO stage 3 only."""

    # Checkpoints and validation.
    checkpoint_interval: int = 100
    """Save a sharded DeepSpeed checkpoint every N optimiser steps (and always at the end)."""
    checkpoints_to_keep: int = 2
    async_checkpointing: bool = True
    """Copy the state to host memory and write it in the background (training stalls for the copy only)."""
    validation_prompts: list[str] = field(default_factory=list)
    validation_interval: int = 0
    """Sample the validation prompts every N steps; 0 means only at the end."""
    validation_inference_steps: int = 25
    validation_images_per_prompt: int = 2

    # Resources.
    num_workers: int = 1
    gpus_per_worker: float = 1.0
    """0 trains on CPUs (bf16 or fp32). A worker trains on one GPU: 1, or a fraction of one for a single worker
    (sharing the GPU with other work); two ranks on one GPU would fail in NCCL, so with several workers, 1."""
    cpus_per_worker: float = 1.0
    placement_strategy: PlacementStrategy = "PACK"
    max_failures: int = 3
    """Worker failures tolerated; each restarts the run from its latest checkpoint."""

    @property
    def with_prior_preservation(self) -> bool:
        return self.num_class_images > 0

    @property
    def use_gpu(self) -> bool:
        return self.gpus_per_worker > 0

    @property
    def replays_cuda_graphs(self) -> bool:
        """The trained networks are compiled to replay their forward and backward as CUDA graphs (on GPUs)."""
        return self.torch_compile and self.compile_backend == "inductor" and self.cuda_graphs and self.use_gpu

    def worker_share(self) -> str:
        """What one worker asks Ray for, e.g. "8 CPUs and 1 GPU"."""
        share = f"{self.cpus_per_worker:g} CPU{'' if self.cpus_per_worker == 1 else 's'}"
        if self.use_gpu:
            share += f" and {self.gpus_per_worker:g} GPU{'' if self.gpus_per_worker == 1 else 's'}"
        return share

    def describe_workers(self) -> str:
        """E.g. "2 workers, 8 CPUs and 1 GPU each, STRICT_PACK"."""
        count = f"{self.num_workers} worker{'' if self.num_workers == 1 else 's'}"
        return f"{count}, {self.worker_share()} each, {self.placement_strategy}"

    def validates_at(self, step: int) -> bool:
        """Whether training draws the validation grid after optimizer step `step` (1-based)."""
        interval = self.validation_interval
        return bool(self.validation_prompts) and (step == self.max_steps or (interval > 0 and step % interval == 0))

    # --- construction -----------------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> JobSpec:
        if not isinstance(data, dict):
            raise InputError("spec", f"expected a mapping of field names to values, got {type(data).__name__}")
        refuse_unknown(data, (f.name for f in dataclasses.fields(cls)), "field(s)")
        missing = [f.name for f in dataclasses.fields(cls) if _is_required(f) and f.name not in data]
        if missing:
            raise InputError(missing[0], f"required field(s) missing: {missing}")
        data = dict(data)
        if isinstance(data.get("instance_images"), str):
            data["instance_images"] = [data["instance_images"]]
        spec = cls(**data)
        spec.validate()
        return spec

    @classmethod
    def load(cls, path: str | Path) -> JobSpec:
        """Load a YAML or JSON file; relative paths in it are resolved against the file's directory."""
        return cls.from_dict(read_spec_file(path)).resolve_paths(Path(path).parent)

    def resolve_paths(self, base: Path) -> JobSpec:
        """Relative paths made absolute against `base`."""
        return dataclasses.replace(
            self,
            base_model=absolute_path(self.base_model, base),
            instance_images=[absolute_path(p, base) for p in self.instance_images],
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def written_fields(self) -> dict[str, Any]:
        """The required fields and those not at their default: what a file of this spec has to say (the rest take
        the defaults of whoever reads it, which a later version may have changed or added to)."""
        return {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if _is_required(f) or getattr(self, f.name) != _default(f)
        }

    # --- validation ---------------------------------------------------------------------------------------

    def validate_new(self, ran_with: dict[str, Any] | None = None) -> None:
        """validate, and what only a spec being submitted is refused for: bounds on what a request may hold, and
        settings that would waste work or do nothing as written. Not in validate: a stored spec (the trainer's
        spec.json, the controller's row) is read back with validate alone, at every start of its job, and a job an
        older release accepted must still run after an upgrade. A check added later goes here, unless the job could
        not run without it. `ran_with`: the spec its job ran with before (a rerun's, as stored), whose settings an
        older release may have taken: a check refuses only what changed since."""
        self.validate()
        now = json.loads(json.dumps(self.to_dict()))

        def require(ok: bool, name: str, message: str, *also: str) -> None:
            if not ok and (ran_with is None or any(ran_with.get(f, now[f]) != now[f] for f in (name, *also))):
                raise InputError(name, message)

        # No path is longer (Linux's PATH_MAX); a megabyte of "../" took the controller 15 s to resolve.
        for name, paths in (("base_model", [self.base_model]), ("instance_images", self.instance_images)):
            longest = max(len(p) for p in paths)
            require(longest <= MAX_PATH_CHARS, name, f"a path of {longest} characters; at most {MAX_PATH_CHARS}")
        prompts = [("instance_prompt", self.instance_prompt), ("class_prompt", self.class_prompt)]
        for name, prompt in [*prompts, *(("validation_prompts", p) for p in self.validation_prompts)]:
            require(len(prompt) <= MAX_PROMPT_CHARS, name, f"{len(prompt)} characters; at most {MAX_PROMPT_CHARS}")
        require(
            self.num_class_images <= MAX_CLASS_IMAGES,
            "num_class_images",
            f"at most {MAX_CLASS_IMAGES} (100-300 usually suffice)",
        )
        require(
            len(self.validation_prompts) <= MAX_VALIDATION_PROMPTS,
            "validation_prompts",
            f"{len(self.validation_prompts)} prompts; at most {MAX_VALIDATION_PROMPTS} (each is a row of every grid)",
        )
        require(
            not (self.with_prior_preservation and self._names_identifier(self.class_prompt)),
            "class_prompt",
            f"must describe the class without the identifier {self.identifier!r} (it would leak into the prior)",
            "identifier",
            "num_class_images",
        )
        require(
            self.prior_loss_weight > 0 or not self.with_prior_preservation,
            "prior_loss_weight",
            "0 would generate the class images and train on them for nothing: set num_class_images to 0 instead",
            "num_class_images",
        )
        require(
            not (self.torch_compile and self.zero_stage == 3),
            "torch_compile",
            "does not combine with zero_stage 3: ZeRO-3's hooks on every submodule break the compiled graph at each "
            "of them (54 graphs for the tiny model's UNet, against one under ZeRO-2); use zero_stage 2, or "
            "torch_compile: false",
            "zero_stage",
        )
        require(
            self.gpus_per_worker <= 1,
            "gpus_per_worker",
            "at most 1: a worker trains on one GPU (more workers: more GPUs)",
        )
        require(
            not self.validation_interval or bool(self.validation_prompts),
            "validation_interval",
            f"samples the validation_prompts every {self.validation_interval} steps, and there are none: add some",
            "validation_prompts",
        )

    def _names_identifier(self, prompt: str) -> bool:
        """Whether `prompt` has the identifier's tokens as CLIP reads it: in any case (its tokenizer lowercases:
        "Sks"), as a run of letters of its own ("sks dog", "sks_style", "sks2"; not "sksdog"). CLIP splits letters
        from digits and from every other character, and takes each digit alone."""
        left = r"(?<![^\W\d_])" if self.identifier[0].isalpha() else ""  # not after a letter
        right = r"(?![^\W\d_])" if self.identifier[-1].isalpha() else ""  # nor before one
        return re.search(left + re.escape(self.identifier) + right, prompt, re.IGNORECASE) is not None

    def validate(self) -> None:
        """Raise InputError naming the first field that is wrong and what to fix: what every spec, stored or new,
        must hold for its job to run (more for a new one: validate_new)."""
        for f in dataclasses.fields(self):
            _check_type(f.name, getattr(self, f.name), f.type)
        require = _require
        require(bool(self.base_model.strip()), "base_model", "must be a path to a diffusers-format model")
        require(len(self.instance_images) > 0, "instance_images", "give at least one image file or directory")
        require(
            re.fullmatch(r"[A-Za-z0-9]+", self.identifier) is not None,
            "identifier",
            "must be one alphanumeric word, e.g. 'sks'",
        )
        require(
            self._names_identifier(self.instance_prompt),
            "instance_prompt",
            f"must contain the identifier {self.identifier!r} as a word, e.g. 'a photo of {self.identifier} dog'",
        )
        require(
            self.num_class_images >= 0,
            "num_class_images",
            "must be >= 0 (0 turns prior preservation off; 100-300 usually suffice)",
        )
        if self.with_prior_preservation:
            require(
                bool(self.class_prompt.strip()),
                "class_prompt",
                f"required for prior preservation (num_class_images is {self.num_class_images}): the subject's class, "
                "e.g. 'a photo of dog'; num_class_images: 0 turns it off",
            )
        require(0 <= self.prior_loss_weight <= 100, "prior_loss_weight", "must be in [0, 100]")
        require(
            1 <= self.class_image_inference_steps <= 1000,
            "class_image_inference_steps",
            "must be in [1, 1000]",
        )
        require(1 <= self.class_image_guidance_scale <= 50, "class_image_guidance_scale", "must be in [1, 50]")
        require(
            self.resolution % 8 == 0 and 64 <= self.resolution <= 2048,
            "resolution",
            f"must be a multiple of 8 between 64 and 2048, got {self.resolution}",
        )
        require(1 <= self.max_steps <= 1_000_000, "max_steps", "must be in [1, 1000000]")
        require(0 < self.learning_rate <= 1e-2, "learning_rate", "must be in (0, 0.01]; DreamBooth uses ~5e-6")
        require(0 <= self.lr_warmup_steps <= self.max_steps, "lr_warmup_steps", "must be in [0, max_steps]")
        require(1 <= self.batch_size <= 256, "batch_size", "must be in [1, 256]")
        require(
            1 <= self.gradient_accumulation_steps <= 1024,
            "gradient_accumulation_steps",
            "must be in [1, 1024]",
        )
        require(0 < self.max_grad_norm < math.inf, "max_grad_norm", "must be a number > 0 (1.0 is usual)")
        require(0 <= self.adam_weight_decay < 1, "adam_weight_decay", "must be in [0, 1)")
        require(self.zero_stage in (2, 3), "zero_stage", f"must be 2 or 3, got {self.zero_stage}")
        require(
            not self.offload_params or self.zero_stage == 3,
            "offload_params",
            "parameter offload needs zero_stage 3",
        )
        require(self.checkpoint_interval >= 1, "checkpoint_interval", "must be >= 1 step")
        require(self.checkpoints_to_keep >= 1, "checkpoints_to_keep", "must be >= 1")
        require(self.validation_interval >= 0, "validation_interval", "must be >= 0 (0: only at the end)")
        require(1 <= self.validation_inference_steps <= 1000, "validation_inference_steps", "must be in [1, 1000]")
        require(1 <= self.validation_images_per_prompt <= 16, "validation_images_per_prompt", "must be in [1, 16]")
        require(1 <= self.num_workers <= 1024, "num_workers", "must be in [1, 1024]")
        # Ray's smallest resource unit is 0.0001.
        require(
            self.gpus_per_worker == 0 or self.gpus_per_worker >= 0.0001,
            "gpus_per_worker",
            "must be 0 (CPUs) or at least 0.0001",
        )
        require(
            self.num_workers == 1 or self.gpus_per_worker in (0, 1),
            "gpus_per_worker",
            "must be 0 or 1 with several workers: a fraction would put two ranks on one GPU, which NCCL refuses",
        )
        require(0.0001 <= self.cpus_per_worker <= 256, "cpus_per_worker", "must be in [0.0001, 256]")
        require(
            self.use_gpu or self.precision != "fp16",
            "precision",
            "fp16 needs GPUs (DeepSpeed refuses fp16 on CPUs): use bf16 or fp32 with gpus_per_worker: 0",
        )
        require(0 <= self.max_failures <= 100, "max_failures", "must be in [0, 100]")


def _is_required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def _default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def read_spec_file(path: str | Path) -> Any:
    """What a YAML or JSON spec file holds, as written (no checks of its fields)."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise InputError("spec", f"cannot read {path}: {e.strerror}") from e
    except UnicodeDecodeError as e:  # a photo given as the spec, a UTF-16 file
        raise InputError("spec", f"{path} is not a YAML or JSON text file (not UTF-8: {e.reason})") from e
    # json.loads raises ValueError for its syntax errors, a duplicate key and an integer of more digits than Python
    # reads, RecursionError for nesting deeper than Python's recursion limit; load_yaml, YAMLErrors for all of them.
    try:
        return json.loads(text, object_pairs_hook=_refuse_duplicate_keys) if path.suffix == ".json" else load_yaml(text)
    except (ValueError, RecursionError, yaml.YAMLError) as e:
        raise InputError("spec", f"{path} is not valid {path.suffix.lstrip('.') or 'YAML'}: {e}") from e


def _refuse_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object, unless it names a key twice (json.loads would keep the last value)."""
    mapping: dict[str, Any] = {}
    for key, value in pairs:
        if key in mapping:
            raise ValueError(f"duplicate key {key!r}")
        mapping[key] = value
    return mapping


_SCALARS = {"str": str, "int": int, "float": (int, float), "bool": bool}
_EXPECTED = {"str": "a string", "int": "an integer", "float": "a number", "bool": "true or false"}
# A wrong value as its messages show it: cut short, since a spec file's may be huge (YAML aliases nested 9 deep make
# a list of a billion strings out of 700 bytes, whose full repr ran out of memory).
_SHORT_REPR = reprlib.Repr()
_SHORT_REPR.maxlevel, _SHORT_REPR.maxstring, _SHORT_REPR.maxother = 2, 80, 80


def _check_type(name: str, value: Any, annotation: str) -> None:
    """Check a value against the (string) annotation of a JobSpec field; YAML gives us untyped input."""
    if annotation == "list[str]":
        ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
        expected = "a list of strings"
    elif annotation in _SCALARS:
        # bool is an int in Python; a YAML `true` must not pass as a step count.
        ok = isinstance(value, _SCALARS[annotation]) and (annotation == "bool" or not isinstance(value, bool))
        expected = _EXPECTED[annotation]
    else:
        choices = get_args(globals()[annotation])
        ok = value in choices
        expected = f"one of {list(choices)}"
    if not ok:
        raise InputError(name, f"must be {expected}, got {_SHORT_REPR.repr(value)}")


def absolute_path(path: str | Path, base: Path | None = None) -> str:
    """`path` (~ expanded) made absolute against `base` (default: the working directory), with symbolic links
    kept as written: a client reaching shared storage through a link (/shared -> /mnt/efs-1) must send the name
    the cluster knows, not where the link points on its own machine."""
    return os.path.abspath(Path(base or Path.cwd()) / Path(path).expanduser())


def _require(ok: bool, name: str, message: str) -> None:
    if not ok:
        raise InputError(name, message)
