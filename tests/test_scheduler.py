"""The scheduler's pure logic: which queued jobs start now, given tenants' turns, priorities, tenants' limits and
free capacity."""

from __future__ import annotations

import itertools
from collections import Counter
from dataclasses import dataclass, field

from hypothesis import given, settings
from hypothesis import strategies as st

from controller.config import ControllerConfig
from controller.feed import ChangeFeed
from controller.ray_jobs import RayJobs
from controller.scheduler import Resources, Waiting, demand, schedule
from controller.service import JobService
from controller.store import JobRecord, Store

_ids = itertools.count()


@dataclass(eq=False)  # identity: two jobs with the same spec are still two jobs
class Job:
    tenant: str
    spec: dict
    name: str = field(default_factory=lambda: f"j{next(_ids)}")

    @property
    def job_id(self) -> str:
        return self.name


def job(tenant: str = "a", cpus: float = 1.0, gpus: float = 0.0, workers: int = 1, name: str | None = None) -> Job:
    spec = {"num_workers": workers, "cpus_per_worker": cpus, "gpus_per_worker": gpus}
    return Job(tenant, spec, name) if name else Job(tenant, spec)


def names(jobs) -> list[str]:
    return [j.name for j in jobs]


CPUS = Resources(cpus=8, gpus=0)
NO_LIMITS = {"a": 100, "b": 100, "c": 100}


# --- demand ----------------------------------------------------------------------------------------------


def test_demand_is_workers_times_per_worker_with_the_trainers_defaults():
    assert demand({}) == Resources(1.0, 1.0)  # JobSpec's defaults: one worker, one CPU, one GPU
    assert demand({"num_workers": 4, "cpus_per_worker": 2.5, "gpus_per_worker": 0.5}) == Resources(10.0, 2.0)
    assert demand({"num_workers": 2, "gpus_per_worker": 0}) == Resources(2.0, 0.0)


def test_resources_fit_with_float_tolerance():
    assert Resources(0.1 + 0.2, 0).fits_in(Resources(0.3, 0))  # 0.30000000000000004
    assert Resources(3, 1).fits_in(Resources(3, 1))
    assert not Resources(3.01, 0).fits_in(Resources(3, 0))
    assert not Resources(0, 1).fits_in(Resources(100, 0))
    assert Resources(1, 2) + Resources(3, 4) == Resources(4, 6)
    assert Resources(1, 2) - Resources(3, 4) == Resources(-2, -2)


# --- order, capacity -------------------------------------------------------------------------------------


def test_jobs_start_in_queue_order_while_they_fit():
    queue = [job(cpus=3, name="first"), job(cpus=3, name="second"), job(cpus=3, name="third")]
    assert names(schedule(queue, [], CPUS, NO_LIMITS).starting) == ["first", "second"]


def test_nothing_queued_or_no_capacity_starts_nothing():
    assert schedule([], [], CPUS, NO_LIMITS).starting == []
    assert schedule([job()], [], Resources(0, 0), NO_LIMITS).starting == []


def test_a_big_job_that_does_not_fit_now_is_not_overtaken_by_smaller_ones():
    """Strict order: no backfilling past the first job that fits the cluster but not the free capacity."""
    running = [job(tenant="b", cpus=6)]
    queue = [job(cpus=4, name="big"), job(cpus=1, name="small"), job(cpus=1, name="tiny")]
    assert schedule(queue, running, CPUS, NO_LIMITS).starting == []
    # Once the running job is gone the big one goes first, and the small one fits beside it.
    assert names(schedule(queue, [], CPUS, NO_LIMITS).starting) == ["big", "small", "tiny"]


def test_a_job_bigger_than_the_whole_cluster_waits_aside_without_blocking():
    queue = [
        job(cpus=4, workers=3, name="too-big"),  # 12 CPUs on an 8-CPU cluster
        job(cpus=2, gpus=1, name="needs-a-gpu"),  # a CPU-only cluster never fits it either
        job(cpus=2, name="fits"),
    ]
    assert names(schedule(queue, [], CPUS, NO_LIMITS).starting) == ["fits"]
    # The cluster grows: the big job starts, first in line again.
    assert names(schedule(queue, [], Resources(16, 1), NO_LIMITS).starting) == ["too-big", "needs-a-gpu", "fits"]


def test_gpus_and_cpus_are_accounted_separately():
    cluster = Resources(cpus=16, gpus=2)
    queue = [job(cpus=1, gpus=1, name="g1"), job(cpus=1, gpus=1, name="g2"), job(cpus=1, gpus=1, name="g3")]
    # Plenty of CPUs, but two GPUs: the third GPU job waits, and blocks the CPU-only job behind it.
    cpu_only = job(cpus=1, gpus=0, name="cpu-only")
    assert names(schedule([*queue, cpu_only], [], cluster, NO_LIMITS).starting) == ["g1", "g2"]
    # Plenty of GPUs, but the CPUs run out first.
    assert names(schedule([job(cpus=8, gpus=1, name="x"), job(cpus=9, gpus=0)], [], cluster, NO_LIMITS).starting) == [
        "x"
    ]
    # Fractional GPUs add up.
    halves = [job(cpus=1, gpus=0.5, workers=2, name=f"h{i}") for i in range(3)]
    assert names(schedule(halves, [], cluster, NO_LIMITS).starting) == ["h0", "h1"]


def test_active_jobs_hold_their_capacity():
    cluster = Resources(cpus=8, gpus=2)
    active = [job(tenant="b", cpus=2, gpus=1, workers=2)]  # 4 CPUs, 2 GPUs
    queue = [job(cpus=1, gpus=1, name="gpu"), job(cpus=4, name="cpu")]
    # No GPU is free: the GPU job fits the cluster, so it waits in line and holds up the CPU job behind it.
    assert schedule(queue, active, cluster, NO_LIMITS).starting == []
    assert names(schedule(queue[1:], active, cluster, NO_LIMITS).starting) == ["cpu"]
    assert schedule([job(cpus=5)], active, cluster, NO_LIMITS).starting == []


def test_a_cluster_that_shrank_below_its_active_jobs_starts_nothing():
    active = [job(tenant="b", cpus=8)]
    assert schedule([job(cpus=1), job(cpus=0.5)], active, Resources(4, 0), NO_LIMITS).starting == []


# --- tenants' limits -------------------------------------------------------------------------------------


def test_a_tenant_at_its_limit_waits_without_holding_up_other_tenants():
    active = [job(tenant="a"), job(tenant="a")]
    queue = [job(tenant="a", name="a3"), job(tenant="b", name="b1"), job(tenant="a", name="a4")]
    assert names(schedule(queue, active, CPUS, {"a": 2, "b": 2}).starting) == ["b1"]
    assert names(schedule(queue, active, CPUS, {"a": 3, "b": 2}).starting) == ["b1", "a3"]  # b holds less: first


def test_the_limit_counts_jobs_starting_in_the_same_pass():
    queue = [job(tenant="a", name=f"a{i}") for i in range(4)] + [job(tenant="b", name="b0")]
    assert names(schedule(queue, [], CPUS, {"a": 2, "b": 5}).starting) == ["a0", "b0", "a1"]


def test_a_skipped_tenants_job_does_not_block_the_queue_even_when_it_would_not_fit():
    """A job skipped for its tenant's limit is not 'the first that does not fit': jobs behind it start."""
    active = [job(tenant="a", cpus=4)]
    queue = [job(tenant="a", cpus=8, name="a-big"), job(tenant="b", cpus=4, name="b")]
    assert names(schedule(queue, active, CPUS, {"a": 1, "b": 1}).starting) == ["b"]


def test_a_tenant_without_a_configured_limit_runs_one_job_at_a_time():
    queue = [job(tenant="stranger", name="s1"), job(tenant="stranger", name="s2")]
    assert names(schedule(queue, [], CPUS, {}).starting) == ["s1"]
    assert schedule(queue, [job(tenant="stranger")], CPUS, {}).starting == []


def test_a_limit_of_zero_never_starts_the_tenants_jobs():
    assert names(schedule([job(tenant="a"), job(tenant="b", name="b")], [], CPUS, {"a": 0, "b": 1}).starting) == ["b"]


# --- what queued jobs wait for ---------------------------------------------------------------------------


def test_each_job_that_does_not_start_says_what_it_waits_for():
    cluster = Resources(cpus=8, gpus=2)
    active = [job(tenant="b", gpus=1, workers=2, name="b-running")]  # both GPUs
    queue = [
        job(tenant="a", gpus=1, name="a-gpu"),
        job(tenant="a", name="a-cpu"),
        job(tenant="b", name="b-next"),
        job(tenant="c", name="c-cpu"),
        job(tenant="c", gpus=1, workers=3, name="c-huge"),
    ]
    plan = schedule(queue, active, cluster, {"a": 2, "b": 1, "c": 2})
    assert plan.starting == []
    assert plan.waiting == {
        "a-gpu": Waiting("WAITING_FOR_RESOURCES", "next to start; needs 1 GPU (num_workers x gpus_per_worker), 0 free"),
        "a-cpu": Waiting("BEHIND_OTHER_JOB", "behind its tenant's job a-gpu (priority, age)"),
        "b-next": Waiting("TENANT_LIMIT", "its tenant runs 1 job, its max_running_jobs (1): it starts once one ends"),
        "c-cpu": Waiting("BEHIND_OTHER_JOB", "behind another tenant's job, next to start"),  # not a's job id
        "c-huge": Waiting(
            "BIGGER_THAN_CLUSTER",
            "needs 3 GPUs (num_workers x gpus_per_worker), more than the 2 training may hold in the cluster: "
            "it starts once the cluster grows",
        ),
    }
    # The GPUs are free: a's jobs start, b's waits for its tenant's limit still, c's first starts and its second
    # still waits for the cluster to grow.
    plan = schedule(queue, [job(tenant="b")], cluster, {"a": 2, "b": 1, "c": 2})
    assert names(plan.starting) == ["a-gpu", "c-cpu", "a-cpu"]
    assert {name: why.reason for name, why in plan.waiting.items()} == {
        "b-next": "TENANT_LIMIT",
        "c-huge": "BIGGER_THAN_CLUSTER",
    }


# --- tenants' turns -------------------------------------------------------------------------------------


def test_the_tenant_holding_the_least_of_the_cluster_goes_next():
    active = [job(tenant="a", cpus=4), job(tenant="b", cpus=1)]
    queue = [
        job(tenant="a", name="a1"),
        job(tenant="a", name="a2"),
        job(tenant="b", name="b1"),
        job(tenant="b", name="b2"),
    ]
    # b holds 1 CPU of 8, a 4: b's two jobs go first (b then holds 3), a's one fits after them.
    assert names(schedule(queue, active, CPUS, NO_LIMITS).starting) == ["b1", "b2", "a1"]
    # The share is the larger of a tenant's CPU and GPU fractions: one GPU of two outweighs 3 CPUs of 16.
    cluster = Resources(cpus=16, gpus=2)
    active = [job(tenant="a", cpus=1, gpus=1), job(tenant="b", cpus=3)]
    queue = [job(tenant="a", name="a1"), job(tenant="b", name="b1")]
    assert names(schedule(queue, active, cluster, NO_LIMITS).starting)[0] == "b1"


def test_a_tenants_priorities_and_big_jobs_do_not_keep_others_waiting():
    """Tenant a queues whole-cluster jobs at the top priority; b's one-GPU job still gets its turn."""
    cluster = Resources(cpus=16, gpus=4)
    queue = [
        *(job(tenant="a", cpus=1, gpus=1, workers=4, name=f"a{i}") for i in range(3)),
        job(tenant="b", gpus=1, name="b1"),
    ]
    # a's first job holds every GPU: nothing starts beside it.
    assert schedule(queue[1:], [queue[0]], cluster, NO_LIMITS).starting == []
    # It ended: both hold nothing now, and b, which has not started a job since, goes first. a's next job does not
    # fit beside it and waits (it is next once b's job is done), rather than letting a hold the cluster again.
    assert names(schedule(queue[1:], [], cluster, NO_LIMITS, last_started={"a": 100.0}).starting) == ["b1"]
    # Had b started more recently than a, a would have gone first.
    assert names(schedule(queue[1:], [], cluster, NO_LIMITS, last_started={"a": 100.0, "b": 200.0}).starting) == ["a1"]


# --- priorities, through the store's queue order ---------------------------------------------------------


def test_higher_priority_starts_first_then_oldest_first(tmp_path):
    """The store hands the scheduler its queue in priority order (then submission order); the scheduler keeps it."""
    store = Store(f"sqlite:///{tmp_path / 'jobs.db'}")
    try:
        spec = {"num_workers": 1, "cpus_per_worker": 2.0, "gpus_per_worker": 0.0}
        for i, priority in enumerate([0, 10, -5, 10, 0]):
            store.insert_job(
                JobRecord(tenant="a", spec=spec, job_id=f"job-{i}", priority=priority, create_time=1000.0 + i)
            )
        queued = store.queued_jobs()
        assert [j.job_id for j in queued] == ["job-1", "job-3", "job-0", "job-4", "job-2"]
        started = schedule(queued, [], Resources(cpus=6, gpus=0), {"a": 10}).starting
        assert [j.job_id for j in started] == ["job-1", "job-3", "job-0"]
        # A high-priority job too big for the free capacity holds up the lower-priority ones (no starvation).
        store.insert_job(JobRecord(tenant="a", spec={**spec, "cpus_per_worker": 6.0}, job_id="job-urgent", priority=99))
        started = schedule(store.queued_jobs(), [JobRecord(tenant="b", spec=spec)], Resources(6, 0), {"a": 10}).starting
        assert started == []
    finally:
        store.close()


def test_without_tenants_the_local_user_runs_as_many_jobs_as_the_cluster_fits(tmp_path):
    """An 8-GPU workstation with `dreambooth up`: four 1-GPU jobs all run (the tenants' default limit is 2)."""
    config = ControllerConfig(storage=tmp_path)
    store = Store(config.effective_database_url)
    try:
        service = JobService(config, store, RayJobs(config.ray_dashboard_url, storage_root=str(tmp_path)), ChangeFeed())
        queued = [job("default", gpus=1.0) for _ in range(4)]
        assert len(schedule(queued, [], Resources(cpus=32, gpus=8), service.running_limits()).starting) == 4
    finally:
        store.close()


# --- properties ------------------------------------------------------------------------------------------

TENANTS = ("a", "b", "c")
_jobs = st.builds(
    job,
    tenant=st.sampled_from(TENANTS),
    cpus=st.sampled_from([0.5, 1.0, 1.5, 2.0, 4.0]),
    gpus=st.sampled_from([0.0, 0.0, 0.5, 1.0, 2.0]),
    workers=st.integers(1, 4),
)


@settings(max_examples=300, deadline=None, database=None)
@given(
    queued=st.lists(_jobs, max_size=12),
    active=st.lists(_jobs, max_size=5),
    capacity=st.builds(Resources, cpus=st.integers(0, 24).map(float), gpus=st.integers(0, 6).map(float)),
    limits=st.dictionaries(st.sampled_from(TENANTS), st.integers(0, 4)),
)
def test_property_never_overcommits_never_exceeds_limits_and_keeps_each_tenants_order(queued, active, capacity, limits):
    plan = schedule(queued, active, capacity, limits)
    started = plan.starting
    # Every job that does not start says why.
    assert plan.waiting.keys() == {q.job_id for q in queued} - {s.job_id for s in started}

    # Each job at most once; each tenant's started jobs are the first of its jobs that fit the cluster at all.
    assert len({id(s) for s in started}) == len(started)
    for tenant in TENANTS:
        line = [q for q in queued if q.tenant == tenant and demand(q.spec).fits_in(capacity)]
        mine = [s for s in started if s.tenant == tenant]
        assert [id(s) for s in mine] == [id(q) for q in line[: len(mine)]]

    # Never more than the free capacity (none at all when the active jobs already overcommit a dimension).
    free = capacity
    for a in active:
        free = free - demand(a.spec)
    total = Resources(0.0, 0.0)
    for s in started:
        total = total + demand(s.spec)
    assert total.cpus <= max(free.cpus, 0.0) + 1e-9 and total.gpus <= max(free.gpus, 0.0) + 1e-9

    # Never past a tenant's limit (1 where none is configured); a tenant already over it starts nothing.
    running, starting = Counter(a.tenant for a in active), Counter(s.tenant for s in started)
    for tenant, count in starting.items():
        assert running[tenant] + count <= limits.get(tenant, 1), (tenant, running[tenant], count)

    # The pass ends only at a job that does not fit: a tenant still under its limit with a job that fits the
    # cluster is left waiting only if some such tenant's next job does not fit what is left (no backfilling).
    left = free - total
    counts = running + starting
    next_jobs = []
    for tenant in TENANTS:
        line = [q for q in queued if q.tenant == tenant and demand(q.spec).fits_in(capacity)]
        if counts[tenant] < limits.get(tenant, 1) and len(line) > starting[tenant]:
            next_jobs.append(line[starting[tenant]])
    if next_jobs:
        assert any(not demand(q.spec).fits_in(left) for q in next_jobs), "a job that fits was left waiting"
