"""Every query of every Grafana dashboard returns data from a real Prometheus scraping a real local stack after a
demo-sized run (a job trained, its model deployed, images generated): no panel points at a metric, a label or a
label value that does not exist.

A healthy run never fails a job, an RPC or a request, so this module makes each happen once. What a run on a
CPU machine cannot produce at all (GPU metrics, a resumed training run) is listed, with what it takes, in
deploy/grafana/dashboards.py's EMPTY_UNLESS: such a query is reported as skipped when it has no data.
"""

from __future__ import annotations

import json
import math
import shutil
import time
import urllib.parse
import urllib.request

import pytest

from deploy.grafana import dashboards
from dreambooth import stack
from dreambooth.client import ClientError, DreamBoothClient
from dreambooth.serving_client import ServingError, generate
from dreambooth.v1 import jobs_pb2

EXPRESSIONS = dashboards.all_promql_expressions()
DATA_TIMEOUT_S = 120  # Ray reports every second in this run, Prometheus scrapes every second


def query(url: str, path: str, **params) -> dict:
    with urllib.request.urlopen(f"{url}{path}?{urllib.parse.urlencode(params)}", timeout=30) as response:
        body = json.loads(response.read())
    assert body["status"] == "success", body
    return body["data"]


def has_data(url: str, expression: str, since: float) -> bool:
    """Whether the expression has a finite value at any time since `since`, as a Grafana panel would draw it."""
    data = query(url, "/api/v1/query_range", query=expression, start=since, end=time.time(), step=1)
    return any(math.isfinite(float(value)) for series in data["result"] for _, value in series["values"])


@pytest.fixture(scope="module")
def prometheus(demo_run) -> str:
    if demo_run.prometheus_url is None:
        if shutil.which("apt-get") is None:
            pytest.skip("no apt-get here: scripts/fetch-prometheus takes Prometheus from Debian's packages")
        pytest.fail(demo_run.prometheus_problem)
    assert demo_run.exit_code == 0, demo_run.output
    return demo_run.prometheus_url


@pytest.fixture(scope="module")
def rare_events(demo_run, prometheus) -> None:
    """What a healthy run never does, done once: a job fails, an RPC fails, requests are refused."""
    local = stack.load(demo_run.stack_dir)
    with DreamBoothClient(local.controller) as client:
        with pytest.raises(ClientError, match="NOT_FOUND"):
            client.get("no-such-job")
        (model,) = [m for m in client.models() if m.deployed]
        with pytest.raises(ServingError) as bad:
            generate(model.endpoint, "a photo of sks robot", steps=10_000)
        assert bad.value.status == 400
        with pytest.raises(ServingError) as unknown:
            generate(model.endpoint.replace(model.model_id, "no-such-model"), "a photo of sks robot")
        assert unknown.value.status == 404

        # The base model vanishes between the controller's checks at submission and the trainer's: the job
        # fails in the trainer's preflight, for a reason the controller counts.
        vanishing = demo_run.out.parent / "vanishing-model"
        shutil.copytree(demo_run.out / "tiny-sd", vanishing)
        spec = {
            "base_model": str(vanishing),
            "instance_images": [str(demo_run.out / "subject")],
            "instance_prompt": "a photo of sks robot",
            "num_class_images": 0,
            "resolution": 64,
            "max_steps": 2,
            "precision": "fp32",
            "gpus_per_worker": 0,
            "num_workers": 1,
        }
        job = client.submit(spec)
        shutil.rmtree(vanishing)
        for _ in client.watch(job.job_id):
            pass
        failed = client.get(job.job_id)
        assert failed.state == jobs_pb2.STATE_FAILED and failed.failure.reason == "INVALID_INPUT", failed
        assert failed.failure.message.startswith("base_model: "), failed  # its field first, as INVALID_ARGUMENT's


@pytest.fixture(scope="module")
def with_data(prometheus, demo_run, rare_events) -> set[str]:
    """The dashboard expressions that have data, once every one expected to has (or the time is up)."""
    expected = {e for e in EXPRESSIONS if dashboards.empty_unless(e) is None}
    found: set[str] = set()
    deadline = time.monotonic() + DATA_TIMEOUT_S
    while True:
        found |= {e for e in EXPRESSIONS if e not in found and has_data(prometheus, e, demo_run.prometheus_since)}
        if expected <= found or time.monotonic() > deadline:
            return found
        time.sleep(2)


@pytest.mark.parametrize("expression", EXPRESSIONS)
def test_dashboard_query_has_data(expression, with_data, prometheus):
    if expression in with_data:
        return
    reason = dashboards.empty_unless(expression)
    if reason:
        pytest.skip(f"no data, as expected here: needs {reason}")
    targets = [
        (t["scrapeUrl"], t["health"], t["lastError"]) for t in query(prometheus, "/api/v1/targets")["activeTargets"]
    ]
    pytest.fail(f"no data within {DATA_TIMEOUT_S} s of a demo-sized run: {expression}\nscrape targets: {targets}")


def test_prometheus_finds_the_stacks_targets(prometheus, demo_run):
    """Both scrape jobs of deploy/prometheus/prometheus.yml find the stack: the controller's /metrics, and the
    node's metrics agent among the endpoints Ray lists for Prometheus' file discovery."""
    instances: dict[str, list[str]] = {}
    for target in query(prometheus, "/api/v1/targets")["activeTargets"]:
        instances.setdefault(target["labels"]["job"], []).append(target["labels"]["instance"])
    local = stack.load(demo_run.stack_dir)
    assert instances["dreambooth-controller"] == [local.controller_metrics]
    assert local.ray_metrics in instances["ray"], instances


def test_request_outcomes_match_the_dashboards(prometheus, rare_events, with_data):
    """The outcome label values the Errors panel selects are the ones serving records."""
    series = query(prometheus, "/api/v1/series", **{"match[]": "ray_dreambooth_serve_requests_total"})
    outcomes = {s["outcome"] for s in series}
    assert {"ok", "bad_request", "not_found"} <= outcomes, outcomes
    # The failures panel counts a reason's first failure: its series was there at 0 (a labelled counter's series
    # appearing at 1 has nothing for increase() to count from), and the panel counts series younger than its window.
    panel = dashboards.events_in_window("dreambooth_job_failures_total", by="reason")
    deadline = time.monotonic() + DATA_TIMEOUT_S
    while True:  # until Prometheus scraped the controller after the failure (every second here)
        result = query(prometheus, "/api/v1/query", query=panel)["result"]
        counted = {r["metric"]["reason"]: float(r["value"][1]) for r in result if float(r["value"][1])}
        if counted or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert counted == {"INVALID_INPUT": 1.0}


def test_a_replicas_loaded_models_stay_reported_between_loads(prometheus, with_data):
    """Ray's metrics agent forgets a gauge's value two report intervals after it was last set (2 s here): set at each
    load alone, the loaded-models panel had no data between loads. Seconds after any load, the model is counted."""
    time.sleep(5)  # past the agent's memory of a value set before this test, and a scrape (every second)
    result = query(prometheus, "/api/v1/query", query="sum(ray_dreambooth_serve_loaded_models)")["result"]
    assert result and float(result[0]["value"][1]) >= 1, result
