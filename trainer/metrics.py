"""Training metrics for Prometheus, recorded by rank 0 of a job's Ray Train workers.

They go through Ray's metrics agent (`ray.util.metrics`), the one Prometheus already scrapes on every node
(deploy/prometheus/prometheus.yml), so training needs no HTTP server of its own and a worker on any node is
seen. Ray prefixes every name with `ray_` and exports a Counter with a `_total` suffix:

    ray_dreambooth_train_steps_total{job_id}             optimizer steps done
    ray_dreambooth_train_loss{job_id}                    loss, averaged over the last progress window
    ray_dreambooth_train_steps_per_second{job_id}        throughput over the last progress window
    ray_dreambooth_train_checkpoint_stall_seconds{job_id}  histogram: training blocked per checkpoint save
    ray_dreambooth_train_restarts_total{job_id}          runs that started from a checkpoint (a resume)

The dashboards in deploy/grafana/dashboards.py query these names.
"""

from __future__ import annotations

from ray.util.metrics import Counter, Gauge, Histogram

# Seconds. A save stalls training for the device-to-host copy (async checkpointing) or the whole write
# (synchronous: 16-18 s for SD 1.5 ZeRO-2 on an H200), so the buckets span both.
STALL_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300)


class TrainMetrics:
    """One job's metrics; every series carries the job's id as the `job_id` tag."""

    def __init__(self, job_id: str):
        tags = {"job_id": job_id}
        keys = ("job_id",)
        self.steps = Counter("dreambooth_train_steps", "Optimizer steps done.", keys).set_default_tags(tags)
        self.loss = Gauge("dreambooth_train_loss", "Training loss (window average).", keys).set_default_tags(tags)
        self.steps_per_second = Gauge(
            "dreambooth_train_steps_per_second", "Optimizer steps per second (window).", keys
        ).set_default_tags(tags)
        self.checkpoint_stall = Histogram(
            "dreambooth_train_checkpoint_stall_seconds",
            "Seconds training was blocked by one checkpoint save.",
            boundaries=list(STALL_BUCKETS),
            tag_keys=keys,
        ).set_default_tags(tags)
        self.restarts = Counter(
            "dreambooth_train_restarts", "Training runs that resumed from a checkpoint.", keys
        ).set_default_tags(tags)

    def record_progress(self, steps_done: int, loss: float, steps_per_second: float) -> None:
        """One progress window: `steps_done` optimizer steps since the previous window."""
        if steps_done > 0:  # Ray's Counter refuses an increment of 0
            self.steps.inc(steps_done)
        self.loss.set(loss)
        self.steps_per_second.set(steps_per_second)

    def record_checkpoint_stall(self, seconds: float) -> None:
        self.checkpoint_stall.observe(seconds)

    def record_restart(self) -> None:
        self.restarts.inc()
