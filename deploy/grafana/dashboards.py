"""The Grafana dashboards (training, serving), generated from code with grafana-foundation-sdk.

    .venv/bin/python -m deploy.grafana.dashboards           # rewrite deploy/grafana/dashboards/*.json
    .venv/bin/python -m deploy.grafana.dashboards --check   # exit 1 if the committed JSON is not what this makes

The JSON files are generated output: change this module, never the JSON. The metric names are the ones the
controller (controller/metrics.py), the trainer (trainer/metrics.py) and serving export; Ray prefixes what
goes through its metrics agent with `ray_`. `all_promql_expressions()` lists every query with the Grafana
variables filled in, so that a test can parse (and run) each one.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

from grafana_foundation_sdk.builders import common as common_builders
from grafana_foundation_sdk.builders import dashboard as builders
from grafana_foundation_sdk.builders import prometheus, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common
from grafana_foundation_sdk.models import dashboard as models

OUT_DIR = Path(__file__).resolve().parent / "dashboards"

# Every panel queries the data source picked in the dashboard's `datasource` variable (the provisioned
# Prometheus by default), so the same JSON works under any data source name or uid.
DATASOURCE = models.DataSourceRef(type_val="prometheus", uid="${datasource}")
RATE = "$__rate_interval"  # Grafana's window for rate(): at least 4 scrape intervals
# Checkpoints, restarts and model loads happen minutes apart: a 1-minute window would show mostly gaps.
SPARSE = "30m"
SEEN_BEFORE = "1d"  # how far before the SPARSE window a series counts as not new (events_in_window)

# What all_promql_expressions() puts in place of each variable the queries use.
VARIABLE_VALUES = {"$__rate_interval": "1m", "$job_id": ".*", "$model_class": ".*"}

# Metrics that have no series until something happens that a healthy run on a CPU machine never does, with what
# it takes. Every other query has data once a job has trained and its model has served a few requests
# (tests/test_observability.py checks that on a real stack).
EMPTY_UNLESS = {
    "DCGM_FI_DEV_GPU_UTIL": "NVIDIA's DCGM exporter on GPU nodes, scraped by Prometheus (the dcgm job)",
    "DCGM_FI_DEV_FB_USED": "NVIDIA's DCGM exporter on GPU nodes, scraped by Prometheus (the dcgm job)",
    "ray_node_gpus_utilization": "a Ray node with GPUs",
    "ray_node_gram_used": "a Ray node with GPUs",
    "ray_dreambooth_train_restarts_total": "a training run that resumed from a checkpoint",
}


# --- building blocks ----------------------------------------------------------------------------------------------


def quantiles(histogram: str, by: str = "", selector: str = "", window: str | None = RATE) -> list[tuple[str, str]]:
    """p50 and p99 of a Prometheus histogram (`histogram` without `_bucket`), optionally per label `by`: over the
    `window`, or with window=None over everything the exporting processes observed since they started."""
    group = f"le, {by}" if by else "le"
    legend = f"{{{{{by}}}}} " if by else ""
    buckets = f"{histogram}_bucket{selector}"
    counts = f"rate({buckets}[{window}])" if window else buckets
    return [
        (f"histogram_quantile({q}, sum by ({group}) ({counts}))", f"{legend}p{round(q * 100)}") for q in (0.5, 0.99)
    ]


def events_in_window(counter: str, by: str = "", selector: str = "") -> str:
    """How many times `counter` counted over the last SPARSE window, for events minutes apart. A labelled counter
    (and every Ray metric) has no series until its first event, which then appears at 1: increase() has nothing to
    increase from and says 0. A series younger than the window counts whole instead: one with no sample in the day
    before the window (not merely none at its start: a scrape gap there would count a long-lived total)."""
    series = f"{counter}{selector}"
    group = f" by ({by})" if by else ""
    earlier = f"last_over_time({series}[{SEEN_BEFORE}] offset {SPARSE})"
    return f"sum{group} (({series} unless {earlier}) or increase({series}[{SPARSE}]))"


def _targets(queries: list[tuple[str, str]]) -> list[prometheus.Dataquery]:
    return [
        prometheus.Dataquery().expr(expr).legend_format(legend).ref_id(chr(ord("A") + i))
        for i, (expr, legend) in enumerate(queries)
    ]


def graph(
    title: str,
    queries: list[tuple[str, str]],
    unit: str = "short",
    description: str = "",
    width: int = 12,
    stacked: bool = False,
    bars: bool = False,
) -> timeseries.Panel:
    """A time series panel; `queries` are (PromQL, legend) pairs."""
    panel = (
        timeseries.Panel()
        .title(title)
        .datasource(DATASOURCE)
        .targets(_targets(queries))
        .unit(unit)
        .min(0)
        .height(8)
        .span(width)
        .legend(
            common_builders.VizLegendOptions()
            .display_mode(common.LegendDisplayMode.LIST)
            .placement(common.LegendPlacement.BOTTOM)
            .show_legend(True)
        )
        .tooltip(
            common_builders.VizTooltipOptions().mode(common.TooltipDisplayMode.MULTI).sort(common.SortOrder.DESCENDING)
        )
    )
    if description:
        panel = panel.description(description)
    if stacked:
        panel = panel.stacking(common_builders.StackingConfig().mode(common.StackingMode.NORMAL)).fill_opacity(30)
    if bars:
        panel = panel.draw_style(common.GraphDrawStyle.BARS).fill_opacity(60)
    return panel


def _dashboard(title: str, uid: str, description: str) -> builders.Dashboard:
    return (
        builders.Dashboard(title)
        .uid(uid)
        .description(description)
        .tags(["dreambooth-cluster", "generated"])
        .time("now-3h", "now")
        .refresh("30s")
        .timezone(common.TimeZoneBrowser)
        .tooltip(models.DashboardCursorSync.CROSSHAIR)
        .with_variable(builders.DatasourceVariable("datasource").label("Data source").type("prometheus"))
    )


def _label_variable(name: str, label: str, metric: str) -> builders.QueryVariable:
    """A multi-value variable over the values of `name` on `metric`; "All" matches every value (regex .*)."""
    return (
        builders.QueryVariable(name)
        .label(label)
        .datasource(DATASOURCE)
        .query(f"label_values({metric}, {name})")
        .refresh(models.VariableRefresh.ON_TIME_RANGE_CHANGED)
        .sort(models.VariableSort.ALPHABETICAL_ASC)
        .multi(True)
        .include_all(True)
        .all_value(".*")
    )


def gpu_row(dashboard: builders.Dashboard) -> builders.Dashboard:
    """GPU panels: from a DCGM exporter when Prometheus scrapes one (job `dcgm` in prometheus.yml), and Ray's own
    per-node GPU gauges, which need nothing extra."""
    return (
        dashboard.with_row(builders.Row("GPUs"))
        .with_panel(
            graph(
                "GPU utilisation (DCGM)",
                [("avg by (Hostname, gpu) (DCGM_FI_DEV_GPU_UTIL)", "{{Hostname}} GPU {{gpu}}")],
                unit="percent",
                description="Needs NVIDIA's DCGM exporter on the GPU nodes (see deploy/README.md).",
            )
        )
        .with_panel(
            graph(
                "GPU memory used (DCGM)",
                [("avg by (Hostname, gpu) (DCGM_FI_DEV_FB_USED)", "{{Hostname}} GPU {{gpu}}")],
                unit="mbytes",  # DCGM reports frame buffer use in MiB
                description="Needs NVIDIA's DCGM exporter on the GPU nodes (see deploy/README.md).",
            )
        )
        .with_panel(
            graph(
                "GPU utilisation (Ray)",
                [("avg by (ip, GpuIndex) (ray_node_gpus_utilization)", "{{ip}} GPU {{GpuIndex}}")],
                unit="percent",
                description="Ray's own per-node GPU gauge (from nvidia-smi/NVML on each node).",
            )
        )
        .with_panel(
            graph(
                "GPU memory used (Ray)",
                [("sum by (ip, GpuIndex) (ray_node_gram_used)", "{{ip}} GPU {{GpuIndex}}")],
                unit="mbytes",  # Ray reports it in MiB (its own dashboard multiplies by 1024 * 1024)
            )
        )
    )


# --- the dashboards -----------------------------------------------------------------------------------------------


def training() -> builders.Dashboard:
    job = '{job_id=~"$job_id"}'
    active = 'state=~"QUEUED|PREPARING|TRAINING|EXPORTING|CANCELLING"'
    dashboard = (
        _dashboard(
            "DreamBooth / Training",
            "dreambooth-training",
            "Jobs as the controller sees them, each running job's training as its trainer reports it, and the "
            "trainers' own metrics over all jobs (through Ray).",
        )
        .with_variable(_label_variable("job_id", "Job", "dreambooth_job_step"))
        .with_row(builders.Row("Jobs (controller)"))
        .with_panel(
            graph(
                "Active jobs by state",
                [(f"sum by (state) (dreambooth_jobs{{{active}}})", "{{state}}")],
                stacked=True,
                width=8,
            )
        )
        .with_panel(
            graph(
                "Queued jobs by what they wait for",
                [("sum by (reason) (dreambooth_queued_jobs)", "{{reason}}")],
                stacked=True,
                width=8,
                description="What queued jobs wait for, as of the controller's last scheduling pass: TENANT_LIMIT "
                "(the tenants' max_running_jobs), WAITING_FOR_RESOURCES (the cluster is full; while no CPU is free, "
                "every job not held by its tenant's limit), BEHIND_OTHER_JOB, BIGGER_THAN_CLUSTER (more than "
                "training may hold now: the cluster must grow, or training is paused), STORAGE_UNAVAILABLE (the "
                "controller cannot write its storage), CLUSTER_UNAVAILABLE (Ray's Jobs API cannot be reached).",
            )
        )
        .with_panel(
            graph(
                "Queue wait (submitted → started)",
                quantiles("dreambooth_job_queue_wait_seconds", window=SPARSE),
                unit="s",
                width=8,
                description=f"Over a {SPARSE} window: jobs start minutes apart.",
            )
        )
        .with_panel(
            graph(
                "Submissions by outcome",
                [("sum by (outcome) (rate(dreambooth_job_submissions_total[$__rate_interval]))", "{{outcome}}")],
                unit="reqps",
                width=8,
            )
        )
        .with_panel(
            graph(
                "Job failures by reason",
                [(events_in_window("dreambooth_job_failures_total", by="reason"), "{{reason}}")],
                bars=True,
                width=8,
                description=f"Failed jobs in the last {SPARSE}, by the reason the controller recorded.",
            )
        )
        .with_panel(
            graph(
                "Controller RPC latency p99",
                [
                    (
                        "histogram_quantile(0.99, sum by (le, method)"
                        " (rate(dreambooth_rpc_duration_seconds_bucket[$__rate_interval])))",
                        "{{method}}",
                    )
                ],
                unit="s",
                width=8,
            )
        )
        .with_panel(
            graph(
                "Controller RPC errors",
                # The controller makes every (method, code) series of this counter at 0 when it starts, so that
                # increase() counts the first error of each kind, often the only one, also after a restart (the
                # latency histogram's series appear with their first call: events_in_window on them missed an
                # error kind seen before the restart). "> 0": some 200 series, nearly all 0.
                [
                    (
                        f"sum by (method, code) (increase(dreambooth_rpc_errors_total[{SPARSE}])) > 0",
                        "{{method}} {{code}}",
                    )
                ],
                bars=True,
                width=8,
                description="Unary RPCs answered with a status other than OK (INVALID_ARGUMENT, NOT_FOUND, ...) in "
                f"the last {SPARSE}, and calls refused before their handler (UNAUTHENTICATED, a tenant's calls "
                "limit). Only the kinds that happened are drawn.",
            )
        )
        .with_panel(
            graph(
                "Open watch streams",
                [("sum(dreambooth_open_watch_streams)", "open")],
                unit="none",
                width=8,
                description="WatchJob streams open (each holds a controller thread; more than max_watches are "
                'refused: dreambooth_watch_streams_total{code="RESOURCE_EXHAUSTED"}).',
            )
        )
        .with_row(builders.Row("Training (each running job, from its trainer's progress, through the controller)"))
        .with_panel(
            graph(
                "Steps per second",
                [(f"max by (job_id) (dreambooth_job_steps_per_second{job})", "{{job_id}}")],
                unit="none",
                width=8,
                description="Over each progress window (about a second of steps).",
            )
        )
        .with_panel(
            graph(
                "Loss",
                [(f"max by (job_id) (dreambooth_job_loss{job})", "{{job_id}}")],
                unit="none",
                width=8,
                description="Averaged over each progress window (about a second of steps).",
            )
        )
        .with_panel(
            graph(
                "Steps done",
                [(f"max by (job_id) (dreambooth_job_step{job})", "{{job_id}}")],
                unit="none",
                width=8,
                description="A job's series ends with the job.",
            )
        )
        .with_row(builders.Row("Trainers, all jobs (rank 0 of each, through Ray)"))
        .with_panel(
            graph(
                "Optimizer steps per second (counted)",
                [(f"sum (rate(ray_dreambooth_train_steps_total[{RATE}]))", "all jobs")],
                unit="short",
                width=8,
                # Not increase() per bar: Grafana's rate window spans several bars, each would count it again.
                description="Steps per second of every job, from the trainers' step counter, over Grafana's rate "
                "window. No job id on the trainers' metrics: Ray's metrics agent keeps every series it has seen for "
                "the node's lifetime.",
            )
        )
        .with_panel(
            graph(
                "Checkpoint stall",
                quantiles("ray_dreambooth_train_checkpoint_stall_seconds", window=None)
                + [
                    (query, f"waiting for the previous write, {legend}")
                    for query, legend in quantiles("ray_dreambooth_train_checkpoint_wait_seconds", window=None)
                ],
                unit="s",
                width=8,
                # A node's series starts at its first save (count 1, nothing to increase from), which no rate()
                # sees; so this counts every save instead.
                description="How long training was blocked per checkpoint save (host copy with async "
                "checkpointing, the whole write without), over every save since the nodes' Ray started. Of that, "
                "waiting for the previous checkpoint's write: checkpoints come faster than storage writes them; a "
                "longer checkpoint_interval removes it.",
            )
        )
        .with_panel(
            graph(
                "Checkpoints saved",
                [(events_in_window("ray_dreambooth_train_checkpoint_stall_seconds_count"), "all jobs")],
                bars=True,
                width=8,
                description=f"Saves in the last {SPARSE}.",
            )
        )
        .with_panel(
            graph(
                "Restarts (resumed from a checkpoint)",
                [(events_in_window("ray_dreambooth_train_restarts_total"), "all jobs")],
                bars=True,
                width=8,
                description="Runs that started from a checkpoint: after a worker failure, a resubmitted attempt, "
                f"or the same job id run again. In the last {SPARSE}.",
            )
        )
    )
    return gpu_row(dashboard)


def serving() -> builders.Dashboard:
    requests = "ray_dreambooth_serve_requests_total"
    latency = "ray_dreambooth_serve_request_duration_seconds"
    model_class = '{model_class=~"$model_class"}'
    server_errors = "error|overloaded|unavailable"
    client_errors = "bad_request|unauthenticated|not_found|throttled"

    def matching(outcomes: str) -> str:
        return f'{{outcome=~"{outcomes}", model_class=~"$model_class"}}'

    def share(outcomes: str) -> str:
        """The fraction of requests whose outcome matches the regex `outcomes`: 0 (not "No data") while there is
        traffic but none of those outcomes."""
        failed = f"sum(rate({requests}{matching(outcomes)}[{RATE}]))"
        return f"({failed} or vector(0)) / sum(rate({requests}{model_class}[{RATE}]))"

    # Ray's metrics cannot be set to 0 before their first event: a model class's series for an outcome appears at 1
    # with its first request, which no rate() sees.
    first_missed = (
        "Rates miss each model class's first request of an outcome (its series starts at 1, with nothing to rate "
        "from): Failed requests counts every failure."
    )

    dashboard = (
        _dashboard(
            "DreamBooth / Serving",
            "dreambooth-serving",
            "The Ray Serve application that draws images with the trained subject models.",
        )
        .with_variable(_label_variable("model_class", "Model class", requests))
        .with_row(builders.Row("Traffic"))
        .with_panel(
            graph(
                "Requests by outcome",
                [(f"sum by (outcome) (rate({requests}{model_class}[{RATE}]))", "{{outcome}}")],
                unit="reqps",
                stacked=True,
                width=8,
                description=first_missed,
            )
        )
        .with_panel(
            graph(
                "Errors",
                [
                    (share(server_errors), "server errors (error, overloaded, unavailable)"),
                    (share(client_errors), "client errors (400, 401, 404, 429)"),
                ],
                unit="percentunit",
                width=8,
                description="Share of generate requests that failed (malformed bodies, 422: HTTP status codes). "
                + first_missed,
            )
        )
        .with_panel(
            graph(
                "Failed requests",
                [
                    (
                        events_in_window(requests, by="outcome", selector=matching(f"{server_errors}|{client_errors}")),
                        "{{outcome}}",
                    )
                ],
                bars=True,
                width=8,
                description=f"Generate requests that failed in the last {SPARSE}, by outcome, every one counted.",
            )
        )
        .with_panel(
            graph(
                "Images per second",
                [
                    (
                        f"sum by (model_class) (rate(ray_dreambooth_serve_images_total{model_class}[{RATE}]))",
                        "{{model_class}}",
                    )
                ],
                unit="none",
                stacked=True,
                width=8,
            )
        )
        .with_panel(
            graph(
                "Request latency",
                quantiles(latency, selector=model_class)
                + quantiles(latency, by="model_class", selector=model_class)[1:],
                unit="s",
                width=8,
                description="Whole request, queueing included: p50 and p99 overall, p99 per model class.",
            )
        )
        .with_panel(
            graph(
                "Queue wait (request → its first denoising step)",
                quantiles("ray_dreambooth_serve_queue_wait_seconds"),
                unit="s",
                width=8,
            )
        )
        .with_panel(
            graph(
                "HTTP responses (Ray Serve proxy)",
                [
                    (
                        "sum by (status_code) (rate(ray_serve_num_http_requests_total[$__rate_interval]))",
                        "{{status_code}}",
                    )
                ],
                unit="reqps",
                stacked=True,
                width=8,
                description="Every HTTP request the Serve proxy answered, by status code.",
            )
        )
        .with_row(builders.Row("Batching and capacity"))
        .with_panel(
            graph(
                "Batch size (requests)",
                quantiles("ray_dreambooth_serve_batch_size"),
                unit="none",
                width=8,
                description="Per request, the most requests that shared one of its UNet forwards.",
            )
        )
        .with_panel(
            graph(
                "Images per UNet forward",
                quantiles("ray_dreambooth_serve_step_images"),
                unit="none",
                width=8,
                description="Per denoising step: how full the batches run (at most the max_batch_size setting).",
            )
        )
        .with_panel(
            graph(
                "Queue depth",
                [
                    ("sum by (deployment) (ray_serve_deployment_queued_queries)", "queued {{deployment}}"),
                    ("sum by (deployment) (ray_serve_replica_processing_queries)", "processing {{deployment}}"),
                ],
                width=8,
                description="Requests waiting for a replica (at the handles) and being processed by replicas.",
            )
        )
        .with_panel(
            graph(
                "Healthy replicas",
                [("sum by (deployment) (ray_serve_deployment_replica_healthy)", "{{deployment}}")],
                width=8,
            )
        )
        .with_panel(
            graph(
                "Loaded models",
                [("sum by (deployment, replica) (ray_dreambooth_serve_loaded_models)", "{{replica}}")],
                width=8,
                description="Subject models held in each replica's cache.",
            )
        )
        .with_panel(
            graph(
                "Model load time",
                quantiles("ray_dreambooth_serve_model_load_seconds", window=None),
                unit="s",
                width=8,
                # A replica often loads a model once: no rate() sees that load (its series starts at 1, with
                # nothing to increase from), so this counts every load of the running replicas instead.
                description="Loading a subject model into a replica (a cache miss), over every load since the "
                "replicas started.",
            )
        )
        .with_panel(
            graph(
                "Model loads",
                [(events_in_window("ray_dreambooth_serve_model_load_seconds_count"), "loads")],
                bars=True,
                width=8,
                description=f"Cache misses in the last {SPARSE}; many means the cache is too small for the traffic.",
            )
        )
    )
    return gpu_row(dashboard)


DASHBOARDS: dict[str, Callable[[], builders.Dashboard]] = {"training": training, "serving": serving}


# --- output -------------------------------------------------------------------------------------------------------


def build(name: str) -> models.Dashboard:
    dashboard = DASHBOARDS[name]().build()
    for number, panel in enumerate(_panels(dashboard), start=1):
        panel.id_val = number  # unique panel ids, stable from one generation to the next
    return dashboard


def render(name: str) -> str:
    """The dashboard as the JSON text of deploy/grafana/dashboards/<name>.json."""
    data = json.loads(JSONEncoder().encode(build(name)))
    return json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def _panels(dashboard: models.Dashboard) -> Iterator:
    for panel in dashboard.panels or []:
        yield panel
        yield from getattr(panel, "panels", None) or []  # the panels inside a collapsed row


def expressions(name: str) -> list[str]:
    """The PromQL of every target of one dashboard, as Grafana sends it (variables unexpanded)."""
    return [target.expr for panel in _panels(build(name)) for target in getattr(panel, "targets", None) or []]


def all_promql_expressions(values: dict[str, str] | None = None) -> list[str]:
    """Every query of every dashboard with its Grafana variables replaced by concrete values (by default
    VARIABLE_VALUES: a 1m rate window, every job and model class), ready for Prometheus' query API."""
    values = VARIABLE_VALUES if values is None else values
    pattern = re.compile("|".join(re.escape(v) for v in sorted(values, key=len, reverse=True)))
    result = []
    for name in DASHBOARDS:
        for expr in expressions(name):
            concrete = pattern.sub(lambda m: values[m.group(0)], expr)
            if "$" in concrete:
                raise ValueError(f"{name}: no value for a variable in {concrete!r}; add it to VARIABLE_VALUES")
            result.append(concrete)
    return list(dict.fromkeys(result))  # the GPU row is on both dashboards


def empty_unless(expression: str) -> str | None:
    """What it takes for `expression` to have data when that is more than a job trained and served (see
    EMPTY_UNLESS), or None."""
    reasons = [reason for metric, reason in EMPTY_UNLESS.items() if re.search(rf"\b{metric}\b", expression)]
    return "; ".join(reasons) or None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if a committed dashboard JSON is stale")
    parser.add_argument("--out-dir", type=Path, default=OUT_DIR)
    args = parser.parse_args(argv)
    stale = []
    for name in DASHBOARDS:
        path = args.out_dir / f"{name}.json"
        text = render(name)
        current = path.read_text() if path.exists() else None
        if current == text:
            continue
        if args.check:
            stale.append(str(path))
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            print(f"wrote {path}")
    if stale:
        print(
            "stale dashboards (regenerate with `python -m deploy.grafana.dashboards`): " + ", ".join(stale),
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
