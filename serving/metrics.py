"""Serving metrics (Prometheus conventions, seconds), recorded in the Serve replicas.

They go through Ray's metrics agent, which prefixes `ray_` and adds the deployment, replica and application tags:
e.g. `ray_dreambooth_serve_requests_total{model_class="dog", outcome="ok"}`. Model ids are not a label (one series
per subject would grow without bound); the subject's class is, bounded (`class_label`). Ray Serve's own
`ray_serve_registered_multiplexed_model_id` is labelled by model id: deploy/prometheus drops it at the scrape.
"""

from __future__ import annotations

import re

from ray.serve.metrics import Counter, Gauge, Histogram

from serving.config import LOAD_TIMEOUT_S, SAMPLING_S

# Up to what a request may take: its model's load (LOAD_TIMEOUT_S, 600 s, in its queue wait), then sampling
# (SAMPLING_S, 300 s). Beyond the last bucket a quantile only says "more than that": the panel flat-lines when a
# slow storage makes it matter.
LATENCY_BUCKETS = [0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, 180, 300, 600, LOAD_TIMEOUT_S + SAMPLING_S]
QUEUE_WAIT_BUCKETS = [
    *(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 40, 80, 160, 300),
    LOAD_TIMEOUT_S,
]
MODEL_LOAD_BUCKETS = [0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 40, 80, 160, 300, LOAD_TIMEOUT_S]
# Whole numbers (requests, images) get edges half-way between them: one bucket per value over the range batches
# usually run in (max_batch_size, in images, is 8 by default), coarser above. histogram_quantile interpolates
# linearly inside a bucket (and the first bucket starts at 0): with edges on the values themselves, every request
# alone read as a p50 of 0.5 requests, and every forward full at 8 images as 7. Centred on each value, a run of
# k reads k.
BATCH_SIZE_BUCKETS = [*(k + 0.5 for k in range(9)), 12.5, 16.5, 24.5, 32.5]
STEP_IMAGES_BUCKETS = [*(k + 0.5 for k in range(17)), 24.5, 32.5, 48.5, 64.5]
MAX_MODEL_CLASSES = 50  # distinct model_class values an ingress replica labels; the rest are "other"


def class_label(class_prompt: str, seen: set[str]) -> str:
    """The model_class label of a subject: its class prompt's last word ("a photo of dog" -> "dog"), lowercase
    letters, digits, "_" and "-" only, at most 32 characters. Class prompts are tenants' free text: as labels
    they would grow the series without bound, so past MAX_MODEL_CLASSES distinct ones (`seen`) it is "other"."""
    words = class_prompt.lower().split()
    label = re.sub(r"[^a-z0-9_-]", "", words[-1] if words else "")[:32] or "unknown"
    if label not in seen:
        if len(seen) >= MAX_MODEL_CLASSES:
            return "other"
        seen.add(label)
    return label


class IngressMetrics:
    """Per HTTP request, in the ingress."""

    def __init__(self):
        self.requests = Counter(
            "dreambooth_serve_requests_total",
            description="Generate requests by subject class and outcome (ok, bad_request, unauthenticated, not_found, "
            "throttled: its tenant's max_requests_per_tenant, overloaded, unavailable: its replica went away or its "
            "model cannot be loaded, cancelled: the client went away, error). A body that does "
            "not parse is a 422 before it is a request: Serve's HTTP status codes count those.",
            tag_keys=("model_class", "outcome"),
        )
        self.images = Counter(
            "dreambooth_serve_images_total",
            description="Images generated, by subject class.",
            tag_keys=("model_class",),
        )
        self.duration = Histogram(
            "dreambooth_serve_request_duration_seconds",
            description="Latency of generate requests answered with images (outcome ok) in the ingress, queueing "
            "included; refusals, which answer in milliseconds, would pull its percentiles down under overload.",
            boundaries=LATENCY_BUCKETS,
            tag_keys=("model_class",),
        )
        self._classes: set[str] = set()

    def record(self, class_prompt: str, outcome: str, seconds: float, images: int) -> None:
        tags = {"model_class": class_label(class_prompt, self._classes)}
        self.requests.inc(tags={**tags, "outcome": outcome})
        if outcome == "ok":
            self.duration.observe(seconds, tags=tags)
        if images:
            self.images.inc(images, tags=tags)


class GeneratorMetrics:
    """Per request, per denoising step and per model load, in the generator replicas."""

    def __init__(self):
        self.batch_size = Histogram(
            "dreambooth_serve_batch_size",
            description="Requests sampled together with a request (the most that shared one of its UNet forwards).",
            boundaries=BATCH_SIZE_BUCKETS,
        )
        self.step_images = Histogram(
            "dreambooth_serve_step_images",
            description="Images in one UNet forward (a denoising step of every request sampling together), per step.",
            boundaries=STEP_IMAGES_BUCKETS,
        )
        self.queue_wait = Histogram(
            "dreambooth_serve_queue_wait_seconds",
            description="Time a request waited in its replica before its first denoising step.",
            boundaries=QUEUE_WAIT_BUCKETS,
        )
        self.model_load = Histogram(
            "dreambooth_serve_model_load_seconds",
            description="Time to load a subject model into a replica.",
            boundaries=MODEL_LOAD_BUCKETS,
        )
        self.loaded_models = Gauge(
            "dreambooth_serve_loaded_models", description="Subject models loaded in the replica."
        )
