"""Serving metrics (Prometheus conventions, seconds), recorded in the Serve replicas.

They go through Ray's metrics agent, which prefixes `ray_` and adds the deployment, replica and application tags:
e.g. `ray_dreambooth_serve_requests_total{model_class="a photo of dog", outcome="ok"}`. Model ids are not a label
(one series per subject would grow without bound); the subject's class is.
"""

from __future__ import annotations

from ray.serve.metrics import Counter, Gauge, Histogram

LATENCY_BUCKETS = [0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120]


class IngressMetrics:
    """Per HTTP request, in the ingress."""

    def __init__(self):
        self.requests = Counter(
            "dreambooth_serve_requests_total",
            description="Generate requests by subject class and outcome (ok, bad_request, unauthenticated, not_found, "
            "overloaded, cancelled: the client went away, error).",
            tag_keys=("model_class", "outcome"),
        )
        self.images = Counter(
            "dreambooth_serve_images_total",
            description="Images generated, by subject class.",
            tag_keys=("model_class",),
        )
        self.duration = Histogram(
            "dreambooth_serve_request_duration_seconds",
            description="Generate request latency in the ingress, queueing included.",
            boundaries=LATENCY_BUCKETS,
            tag_keys=("model_class",),
        )

    def record(self, model_class: str, outcome: str, seconds: float, images: int) -> None:
        self.requests.inc(tags={"model_class": model_class, "outcome": outcome})
        self.duration.observe(seconds, tags={"model_class": model_class})
        if images:
            self.images.inc(images, tags={"model_class": model_class})


class GeneratorMetrics:
    """Per request, per denoising step and per model load, in the generator replicas."""

    def __init__(self):
        self.batch_size = Histogram(
            "dreambooth_serve_batch_size",
            description="Requests sampled together with a request (the most that shared one of its UNet forwards).",
            boundaries=[1, 2, 3, 4, 6, 8, 12, 16, 24, 32],
        )
        self.step_images = Histogram(
            "dreambooth_serve_step_images",
            description="Images in one UNet forward (a denoising step of every request sampling together), per step.",
            boundaries=[1, 2, 4, 6, 8, 12, 16, 24, 32, 48, 64],
        )
        self.queue_wait = Histogram(
            "dreambooth_serve_queue_wait_seconds",
            description="Time a request waited in its replica before its first denoising step.",
            boundaries=[0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10],
        )
        self.model_load = Histogram(
            "dreambooth_serve_model_load_seconds",
            description="Time to load a subject model into a replica.",
            boundaries=[0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 40, 80],
        )
        self.loaded_models = Gauge(
            "dreambooth_serve_loaded_models", description="Subject models loaded in the replica."
        )
