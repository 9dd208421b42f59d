"""Where a job's files live: one root directory, shared by every node (a shared filesystem on a cluster).

    <root>/jobs/<job_id>/spec.json          the job spec as submitted
    <root>/jobs/<job_id>/.submitting-<n>    while a controller (of the database whose id is n) records the job
    <root>/jobs/<job_id>/events.jsonl       progress events (trainer -> CLI / controller)
    <root>/jobs/<job_id>/photos.json        the content hashes of the photos its checkpoints were trained on
    <root>/jobs/<job_id>/base_model.json    the identity of the base model they were trained from
    <root>/jobs/<job_id>/instance_images/   the photos a controller's submission uploaded
    <root>/jobs/<job_id>/driver.log         the driver's output, kept by the controller once the job ended
    <root>/jobs/<job_id>/checkpoints/       the Ray Train run: sharded DeepSpeed checkpoints
    <root>/jobs/<job_id>/validation/        validation image grids
    <root>/jobs/<job_id>/tensorboard/       TensorBoard scalars
    <root>/models/<job_id>/                 the exported diffusers-format model + metadata.json
    <root>/cache/class_images/<key>/        class-prior images, shared by every job with the same key
    <root>/cache/torch_compile/             torch.compile's artefacts (inductor, Triton), shared by every job
    <root>/.controller-clock                touched by the controller to read the storage's clock

Everything a job needs to resume lives here, so any node (and a restarted controller) can pick it up.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from dreambooth.durable import write_file

if TYPE_CHECKING:
    from trainer.spec import JobSpec

_JOB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


def check_job_id(job_id: str) -> str:
    from dreambooth.errors import InputError

    if not _JOB_ID.fullmatch(job_id) or job_id in (".", ".."):
        raise InputError("job_id", f"{job_id!r}: use 1-128 letters, digits, '_', '.' or '-', starting alphanumeric")
    return job_id


@dataclass(frozen=True)
class JobPaths:
    root: Path
    job_id: str

    @property
    def job_dir(self) -> Path:
        return self.root / "jobs" / self.job_id

    @property
    def spec_file(self) -> Path:
        return self.job_dir / "spec.json"

    @property
    def base_model_file(self) -> Path:
        """The identity of the base model the job's checkpoints were trained from (trainer.run)."""
        return self.job_dir / "base_model.json"

    @property
    def photos_file(self) -> Path:
        """The content hashes of the instance images the job's checkpoints were trained on (trainer.run)."""
        return self.job_dir / "photos.json"

    @property
    def events_file(self) -> Path:
        return self.job_dir / "events.jsonl"

    @property
    def uploads_dir(self) -> Path:
        """The photos a controller's submission uploaded."""
        return self.job_dir / "instance_images"

    @property
    def driver_log(self) -> Path:
        """The driver's output, kept by the controller once the job has ended (controller.ended_jobs)."""
        return self.job_dir / "driver.log"

    @property
    def ray_run_name(self) -> str:
        # The Ray Train run directory is job_dir / ray_run_name.
        return "checkpoints"

    @property
    def checkpoints_dir(self) -> Path:
        return self.job_dir / self.ray_run_name

    @property
    def validation_dir(self) -> Path:
        return self.job_dir / "validation"

    def validation_grid(self, step: int) -> Path:
        return self.validation_dir / f"step_{step:07d}.png"

    def lacks_final_grid(self, spec: JobSpec) -> bool:
        """Whether the job's run that trained to its last step died before drawing that step's grid: a rerun trains
        to draw it (workers and all), where else it would only export."""
        return spec.validates_at(spec.max_steps) and not self.validation_grid(spec.max_steps).exists()

    def validation_grids(self) -> list[tuple[int, Path]]:
        """(step, grid) of the grids drawn so far, by step."""
        found = (re.fullmatch(r"step_(\d+)\.png", p.name) for p in self.validation_dir.glob("step_*.png"))
        return sorted((int(m[1]), self.validation_dir / m[0]) for m in found if m)

    @property
    def tensorboard_dir(self) -> Path:
        return self.job_dir / "tensorboard"

    @property
    def model_dir(self) -> Path:
        return self.root / "models" / self.job_id

    def model_scratch(self) -> list[Path]:
        """What exports of this job left beside model_dir: a model half written (.partial) or one set aside
        (.replaced). Scratch names start with a dot, which no job id (hence no model directory) does, so they
        cannot be another job's model; the pattern keeps job "<name>.x"'s apart."""
        name = self.model_dir.name
        scratch = re.compile(rf"\.{re.escape(name)}\.[0-9a-f]{{32}}\.(partial|replaced)")
        return sorted(p for p in self.model_dir.parent.glob(f".{name}.*") if scratch.fullmatch(p.name))

    @property
    def class_image_cache(self) -> Path:
        return self.root / "cache" / "class_images"

    @property
    def compile_cache(self) -> Path:
        return self.root / "cache" / "torch_compile"


def job_paths(root: str | Path, job_id: str) -> JobPaths:
    return JobPaths(Path(root).resolve(), check_job_id(job_id))


def storage_clock(root: str | Path) -> Path:
    """The file the controller touches to read the storage's clock (a job's events are stamped by it)."""
    return Path(root) / ".controller-clock"


_SHARED_MARK = ".shared-storage-"


class StorageNotShared(RuntimeError):
    """A Ray node does not see the job's storage (or its base model) at the paths the driver used."""


def mark_shared(directory: Path) -> Path:
    """An empty file, durable, under a name never used before, in `directory` on the job's storage: a process on
    another node that finds it (check_shared) reads the same storage as the one that made it. A new name each
    time rather than new contents, as NFS clients cache what they found under a name."""
    mark = directory / f"{_SHARED_MARK}{secrets.token_hex(8)}"
    write_file(mark, b"")
    return mark


def clear_shared_marks(directory: Path) -> None:
    """Removes the marks earlier runs made in `directory`."""
    for mark in directory.glob(f"{_SHARED_MARK}*"):
        mark.unlink(missing_ok=True)


def check_shared(mark: str | Path, base_model: str | Path) -> None:
    """Raises StorageNotShared on a node where the storage the driver marked, or the base model, is not there.

    A storage path that is a local directory on each node (the default, relative, one of `dreambooth train`
    on a cluster, say) would otherwise fail at the end: checkpoints and class images each on their own node,
    an export that cannot find the other ranks' shards."""
    import ray

    node = ray.util.get_node_ip_address()
    where = "storage must be one file system mounted at the same path on every Ray node (NFS, a shared volume)"
    if not Path(mark).exists():
        raise StorageNotShared(
            f"node {node} does not see the job's storage: {Path(mark).parent} has no {Path(mark).name}, which "
            f"the job's driver wrote there; {where}"
        )
    if not Path(base_model).is_dir():
        raise StorageNotShared(f"node {node} does not see base_model {base_model}; {where}")
