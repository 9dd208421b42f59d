"""Training metrics for Prometheus, recorded by rank 0 of each job's Ray Train workers.

They go through Ray's metrics agent (`ray.util.metrics`), the one Prometheus already scrapes on every node
(deploy/prometheus/prometheus.yml), so training needs no HTTP server of its own and a worker on any node is
seen. Ray prefixes every name with `ray_` and exports a Counter with a `_total` suffix:

    ray_dreambooth_train_steps_total                 optimizer steps done, all jobs
    ray_dreambooth_train_checkpoint_stall_seconds    histogram: training blocked per checkpoint save
    ray_dreambooth_train_checkpoint_wait_seconds     histogram: of that, waiting for the previous checkpoint's write
    ray_dreambooth_train_restarts_total              runs that started from a checkpoint (a resume)

No job id among their labels: the agent keeps every series it has seen for the node's lifetime (and folds those
past 2000 of one metric into a single overflow series), so a label per job would grow without end on a
long-lived node. Each running job's step, loss and throughput come from the controller, which drops a job's series
when it ends (controller/metrics.py). The dashboards in deploy/grafana/dashboards.py query these names.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ray.util.metrics import Counter, Histogram

if TYPE_CHECKING:
    from trainer.checkpoint import Stall

# Seconds. A save stalls training for the device-to-host copy (async checkpointing) or the whole write
# (synchronous: 16-18 s for SD 1.5 ZeRO-2 on an H200), so the buckets span both. The wait for the previous write is
# mostly 0: histogram_quantile interpolates inside the first bucket, from 0 to its edge, so that edge is near 0
# (with 0.1 first, saves that never waited read as a p50 of 0.05 s).
STALL_BUCKETS = (0.001, 0.01, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300)


class TrainMetrics:
    def __init__(self):
        self.steps = Counter("dreambooth_train_steps", "Optimizer steps done.")
        self.checkpoint_stall = Histogram(
            "dreambooth_train_checkpoint_stall_seconds",
            "Seconds training was blocked by one checkpoint save.",
            boundaries=list(STALL_BUCKETS),
        )
        self.checkpoint_wait = Histogram(
            "dreambooth_train_checkpoint_wait_seconds",
            "Seconds of one checkpoint save's stall spent waiting for the previous checkpoint to be written: "
            "checkpoints come faster than storage writes them (a longer checkpoint_interval removes it).",
            boundaries=list(STALL_BUCKETS),
        )
        self.restarts = Counter("dreambooth_train_restarts", "Training runs that resumed from a checkpoint.")

    def record_steps(self, steps_done: int) -> None:
        if steps_done > 0:  # Ray's Counter refuses an increment of 0
            self.steps.inc(steps_done)

    def record_checkpoint_stall(self, stall: Stall) -> None:
        self.checkpoint_stall.observe(stall.seconds)
        self.checkpoint_wait.observe(stall.waited_s)

    def record_restart(self) -> None:
        self.restarts.inc()
