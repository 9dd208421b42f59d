"""Which queued jobs start now: priorities, per-tenant limits and the cluster's free CPUs/GPUs. Pure logic."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Resources:
    cpus: float
    gpus: float

    def fits_in(self, other: Resources) -> bool:
        return self.cpus <= other.cpus + 1e-9 and self.gpus <= other.gpus + 1e-9

    def __add__(self, other: Resources) -> Resources:
        return Resources(self.cpus + other.cpus, self.gpus + other.gpus)

    def __sub__(self, other: Resources) -> Resources:
        return Resources(self.cpus - other.cpus, self.gpus - other.gpus)


def demand(spec: dict[str, Any]) -> Resources:
    """What a job holds on the cluster while it runs: its Ray Train workers (the class-image actors use the
    same slots before them, and the driver reserves nothing)."""
    workers = spec.get("num_workers", 1)
    return Resources(workers * spec.get("cpus_per_worker", 1.0), workers * spec.get("gpus_per_worker", 1.0))


def training_share(total: Resources, serving: Any | None) -> Resources:
    """What training may hold of `total`: less what serving's replicas may grow to (`serving`: a ServeConfig or
    None), as they share the cluster's CPUs and GPUs."""
    if serving is not None:
        total = total - Resources(
            serving.max_replicas * serving.cpus_per_replica, serving.max_replicas * serving.gpus_per_replica
        )
    return Resources(max(total.cpus, 0.0), max(total.gpus, 0.0))


def jobs_to_start(queued: list, active: list, capacity: Resources, running_limits: dict[str, int]) -> list:
    """Queued jobs (already in priority order) that start now.

    A tenant at its limit of running jobs waits without holding anyone up. Otherwise jobs start strictly in
    order: the first that does not fit in the free capacity stops the pass, so a big job is not starved by
    smaller ones behind it. A job bigger than the whole cluster waits for the cluster to grow, aside.
    """
    free = capacity
    running = Counter(job.tenant for job in active)
    for job in active:
        free = free - demand(job.spec)
    starting = []
    for job in queued:
        need = demand(job.spec)
        if running[job.tenant] >= running_limits.get(job.tenant, 1):
            continue
        if not need.fits_in(capacity):
            continue
        if not need.fits_in(free):
            break
        starting.append(job)
        free = free - need
        running[job.tenant] += 1
    return starting
