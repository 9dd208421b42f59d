"""Which queued jobs start now: tenants' turns, priorities, per-tenant limits and free CPUs/GPUs. Pure logic."""

from __future__ import annotations

import math
from collections import Counter, defaultdict, deque
from dataclasses import dataclass, field
from typing import Any, NamedTuple


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


class Shortfall(NamedTuple):
    field: str  # the spec field that sizes it
    needs: str  # e.g. "2 GPUs (num_workers x gpus_per_worker)"
    available: float
    hint: str  # what to change, where there is an obvious answer; else ""


def shortfalls(need: Resources, available: Resources) -> list[Shortfall]:
    """What `need` wants more of than `available`, GPUs first (a job too big for its cluster is refused, not left
    waiting: the controller against its configured size, `dreambooth train` against its own Ray)."""
    found = []
    for name, needed, there, unit in (
        ("gpus_per_worker", need.gpus, available.gpus, "GPU"),
        ("cpus_per_worker", need.cpus, available.cpus, "CPU"),
    ):
        if needed > there + 1e-9:
            needs = f"{needed:g} {unit}{'' if needed == 1 else 's'} (num_workers x {name})"
            hint = ": gpus_per_worker: 0 trains on CPUs" if unit == "GPU" and not there else ""
            found.append(Shortfall(name, needs, there, hint))
    return found


def training_share(total: Resources, serving: Any | None) -> Resources:
    """What training may hold of `total`: less what serving's replicas may grow to (`serving`: a ServeConfig or
    None), as they share the cluster's CPUs and GPUs."""
    if serving is not None:
        total = total - Resources(
            serving.max_replicas * serving.cpus_per_replica, serving.max_replicas * serving.gpus_per_replica
        )
    return Resources(max(total.cpus, 0.0), max(total.gpus, 0.0))


WAITING_REASONS = (
    "TENANT_LIMIT",
    "WAITING_FOR_RESOURCES",
    "BEHIND_OTHER_JOB",
    "BIGGER_THAN_CLUSTER",
    "STORAGE_UNAVAILABLE",  # the reconciler's: the job's files cannot be written (not the scheduler's)
    "CLUSTER_UNAVAILABLE",  # the reconciler's: Ray's Jobs API cannot be reached, or failed a submission
)


class Waiting(NamedTuple):
    """Why a queued job does not start (the Job message's `queued`)."""

    reason: str  # one of WAITING_REASONS
    message: str


@dataclass(frozen=True)
class Queue:
    """What queued jobs wait for: a tenant's limit (`by_tenant`, where a pass did not read the queue), else each
    job's own reason (where a pass read it), else `others` (the cluster was full: the queue was not read)."""

    by_job: dict[str, Waiting] = field(default_factory=dict)
    by_tenant: dict[str, Waiting] = field(default_factory=dict)
    others: Waiting | None = None

    def waiting_for(self, job) -> Waiting | None:
        return self.by_tenant.get(job.tenant) or self.by_job.get(job.job_id) or self.others


class Schedule(NamedTuple):
    starting: list  # the queued jobs that start now, in that order
    waiting: dict[str, Waiting]  # job_id -> why, for each of the others


def schedule(
    queued: list,
    active: list,
    capacity: Resources,
    running_limits: dict[str, int],
    last_started: dict[str, float] | None = None,
) -> Schedule:
    """Which queued jobs start now, and what each of the others waits for. `queued`: each tenant's jobs in its
    order (priority, then submission).

    Tenants take turns: the next job is the first of the tenant holding the least of the cluster (its dominant
    share: the larger of its fractions of the CPUs and of the GPUs); among equals, the tenant that started a job
    least recently (`last_started`: tenant -> time), then queue order. A tenant's priorities order its own jobs
    only, and one with a long queue of big jobs takes turns with the others instead of holding the cluster.

    A tenant at its limit of running jobs waits without holding anyone up. Otherwise the job whose turn it is
    stops the pass when it does not fit in the free capacity, so a big job is not starved by smaller ones. A job
    bigger than the whole cluster waits for the cluster to grow, aside.
    """
    free = capacity
    held: dict[str, Resources] = defaultdict(lambda: Resources(0.0, 0.0))
    running: Counter[str] = Counter()
    for job in active:
        free = free - demand(job.spec)
        held[job.tenant] = held[job.tenant] + demand(job.spec)
        running[job.tenant] += 1
    lines: dict[str, deque] = defaultdict(deque)  # tenant -> its jobs that fit the cluster, (queue position, job)
    waiting: dict[str, Waiting] = {}
    for position, job in enumerate(queued):
        if demand(job.spec).fits_in(capacity):
            lines[job.tenant].append((position, job))
        else:
            needs = _needs(demand(job.spec), capacity, "more than the {} training may hold in the cluster")
            waiting[job.job_id] = Waiting("BIGGER_THAN_CLUSTER", f"{needs}: it starts once the cluster grows")
    last = dict(last_started or {})

    def turn(tenant: str) -> tuple:  # the smallest goes next
        return (_dominant_share(held[tenant], capacity), last.get(tenant, -math.inf), lines[tenant][0][0])

    starting, blocked = [], None
    while in_turn := [t for t, line in lines.items() if line and running[t] < running_limit(running_limits, t)]:
        tenant = min(in_turn, key=turn)
        job = lines[tenant][0][1]
        need = demand(job.spec)
        if not need.fits_in(free):
            blocked = job
            waiting[job.job_id] = Waiting("WAITING_FOR_RESOURCES", f"next to start; {_needs(need, free, '{} free')}")
            break
        lines[tenant].popleft()
        starting.append(job)
        free = free - need
        held[tenant] = held[tenant] + need
        running[tenant] += 1
        last[tenant] = math.inf  # started now: after every tenant that did not
    for tenant, line in lines.items():
        limit = running_limit(running_limits, tenant)
        for _, job in line:
            if job is blocked:
                continue
            if running[tenant] >= limit:
                waiting[job.job_id] = tenant_limit(running[tenant], limit)
            elif job is not line[0][1]:
                first = line[0][1].job_id
                waiting[job.job_id] = Waiting("BEHIND_OTHER_JOB", f"behind its tenant's job {first} (priority, age)")
            else:  # the next to start is another tenant's (its line's first, were it this one's): not named
                waiting[job.job_id] = Waiting("BEHIND_OTHER_JOB", "behind another tenant's job, next to start")
    return Schedule(starting, waiting)


def running_limit(running_limits: dict[str, int], tenant: str) -> int:
    """A tenant's max_running_jobs; one that is not configured (gone from the config since it queued) runs one."""
    return running_limits.get(tenant, 1)


def tenant_limit(running: int, limit: int) -> Waiting:
    """What a job of a tenant that runs `running` jobs, its max_running_jobs `limit`, waits for."""
    if not limit:
        return Waiting("TENANT_LIMIT", "its tenant's max_running_jobs is 0: it starts once that is raised")
    runs = f"{running} job{'' if running == 1 else 's'}"
    return Waiting("TENANT_LIMIT", f"its tenant runs {runs}, its max_running_jobs ({limit}): it starts once one ends")


def _needs(need: Resources, there: Resources, available: str) -> str:
    """E.g. 'needs 2 GPUs (num_workers x gpus_per_worker), 1 free' (`available`: '{} free')."""
    return "; ".join(
        f"needs {s.needs}, {available.format(f'{max(s.available, 0):g}')}" for s in shortfalls(need, there)
    )


def _dominant_share(held: Resources, capacity: Resources) -> float:
    return max(
        held.cpus / capacity.cpus if capacity.cpus > 0 else 0.0,
        held.gpus / capacity.gpus if capacity.gpus > 0 else 0.0,
    )
