"""What the dashboards read from the metrics, evaluated by Prometheus' own rule tests (promtool, from
scripts/fetch-prometheus) on series shaped as the code exports them: histograms of whole numbers read the number,
waits that are all 0 read about 0, and the controller's RPC errors count the first error of a kind, also after a
restart; and the commented dcgm scrape job (deploy/prometheus/prometheus.yml) finds the GPU nodes where Ray lists
them. No Ray cluster is started; the controller runs in this process, its Ray address a closed port."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
import yaml

from controller import metrics
from controller.config import ControllerConfig, Tenant
from controller.server import start
from deploy.grafana import dashboards
from dreambooth.client import ClientError, DreamBoothClient
from dreambooth.v1 import jobs_pb2, models_pb2
from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "readings-token"


def panel_queries(name: str, title: str) -> list[str]:
    """The PromQL of one dashboard panel, with the Grafana variables filled in as all_promql_expressions() does."""
    (panel,) = [p for p in dashboards._panels(dashboards.build(name)) if getattr(p, "title", None) == title]
    queries = []
    for target in panel.targets:
        query = target.expr
        for variable in sorted(dashboards.VARIABLE_VALUES, key=len, reverse=True):
            query = query.replace(variable, dashboards.VARIABLE_VALUES[variable])
        queries.append(query)
    return queries


def promtool_test(prometheus_bin: Path, tmp_path: Path, tests: list[dict]) -> None:
    path = tmp_path / "readings.test.yml"
    path.write_text(yaml.safe_dump({"tests": tests}))
    result = subprocess.run(
        [prometheus_bin / "promtool", "test", "rules", path], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr


def histogram_of(name: str, boundaries: list[float], value: float, counts: str) -> list[dict]:
    """Input series of a histogram (`name` without `_bucket`) where every observation is `value`: a bucket counts
    them all from the first edge at or above it on, none below. `counts`: the promtool values of a bucket that does."""
    series = [
        {"series": f'{name}_bucket{{le="{edge}"}}', "values": counts if value <= edge else "0x30"}
        for edge in boundaries
    ]
    return [*series, {"series": f'{name}_bucket{{le="+Inf"}}', "values": counts}]


@pytest.mark.parametrize(
    "title, metric, attribute, largest",
    [
        # Per integer up to the default max_batch_size (8, in images): batches usually run within it.
        ("Batch size (requests)", "ray_dreambooth_serve_batch_size", "batch_size", 8),
        ("Images per UNet forward", "ray_dreambooth_serve_step_images", "step_images", 16),
    ],
)
def test_whole_number_histograms_read_the_number(prometheus_bin, tmp_path, title, metric, attribute, largest):
    """Every request alone is a batch size of 1, every forward full at 8 images is 8: histogram_quantile
    interpolates inside a bucket, so the p50 of a run of k reads k only where k's bucket is centred on it (with
    edges on the values themselves it read k - 0.5: 0.5 requests, 7 images)."""
    from serving.metrics import GeneratorMetrics

    boundaries = getattr(GeneratorMetrics(), attribute).boundaries
    p50, _ = panel_queries("serving", title)
    tests = [
        {
            "interval": "1m",
            "input_series": histogram_of(metric, boundaries, k, "0+10x30"),
            "promql_expr_test": [{"expr": p50, "eval_time": "20m", "exp_samples": [{"labels": "{}", "value": k}]}],
        }
        for k in range(1, largest + 1)
    ]
    promtool_test(prometheus_bin, tmp_path, tests)


def test_checkpoint_saves_that_never_waited_read_about_zero(prometheus_bin, tmp_path):
    """Checkpoints spaced so that no save waits for the previous write: the wait's p50 and p99 read under a
    millisecond (they read 0.05 and 0.099 s while the first edge was 0.1 s); so do stalls that all took 0 s."""
    from trainer.metrics import TrainMetrics

    trainer = TrainMetrics()
    queries = panel_queries("training", "Checkpoint stall")
    assert len(queries) == 4, queries  # stall p50, p99; waiting for the previous write p50, p99
    series = [
        *histogram_of("ray_dreambooth_train_checkpoint_stall_seconds", trainer.checkpoint_stall.boundaries, 0, "5x30"),
        *histogram_of("ray_dreambooth_train_checkpoint_wait_seconds", trainer.checkpoint_wait.boundaries, 0, "5x30"),
    ]
    checks = [
        {"expr": f"({query}) <= bool 0.001", "eval_time": "20m", "exp_samples": [{"labels": "{}", "value": 1}]}
        for query in queries
    ]
    promtool_test(prometheus_bin, tmp_path, [{"interval": "1m", "input_series": series, "promql_expr_test": checks}])


# --- the controller's RPC errors ----------------------------------------------------------------------------------


def test_every_rpc_method_and_error_code_starts_at_zero():
    """In a fresh controller process, before any call: a series at 0 for every unary method of the services (and
    reflection's, which the request gate may refuse) and every status code other than OK."""
    code = """if True:
        from controller.metrics import REGISTRY
        (family,) = [f for f in REGISTRY.collect() if f.name == "dreambooth_rpc_errors"]
        for sample in family.samples:
            if sample.name == "dreambooth_rpc_errors_total":
                print(sample.labels["method"], sample.labels["code"], sample.value)
    """
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    values = {(method, code): float(value) for method, code, value in map(str.split, done.stdout.splitlines())}
    methods = [
        method.name
        for module, service in ((jobs_pb2, "JobService"), (models_pb2, "ModelService"))
        for method in module.DESCRIPTOR.services_by_name[service].methods
        if not method.server_streaming  # WatchJob: its streams end in dreambooth_watch_streams_total
    ]
    expected = {(method, code.name) for method in [*methods, "ServerReflectionInfo"] for code in grpc.StatusCode}
    expected -= {(method, "OK") for method in [*methods, "ServerReflectionInfo"]}
    assert set(values) == expected
    assert set(values.values()) == {0.0}


@pytest.fixture
def controller(tmp_path):
    config = ControllerConfig(
        storage=tmp_path / "storage",
        listen="127.0.0.1:0",
        ray_dashboard_url=f"http://127.0.0.1:{free_port()}",  # nothing listens: no Ray needed for these calls
        tenants=(Tenant("alice", (TOKEN,)),),
        metrics_listen="",
        reconcile_interval_s=0.2,
        capacity_cpus=8,
        capacity_gpus=0,
    )
    running = start(config)
    yield running
    running.stop(grace_s=1)


def rpc_errors(method: str, code: str) -> float:
    return metrics.REGISTRY.get_sample_value("dreambooth_rpc_errors_total", {"method": method, "code": code})


def test_a_failing_rpc_and_a_refused_one_count_as_errors(controller):
    """A handler's error (GetJob of a job that does not exist) and a call the request gate refuses before its
    handler (no valid token) each count once under their method and code; an OK answer counts none."""
    before = {
        key: rpc_errors(*key) for key in [("GetJob", "NOT_FOUND"), ("GetJob", "UNAUTHENTICATED"), ("ListJobs", "OK")]
    }
    assert before[("ListJobs", "OK")] is None  # no such series: only errors are counted
    address = f"127.0.0.1:{controller.port}"
    with DreamBoothClient(address, TOKEN, timeout_s=10) as client:
        with pytest.raises(ClientError, match="NOT_FOUND"):
            client.get("no-such-job")
        list(client.list())
    with DreamBoothClient(address, "not-a-token", timeout_s=10) as stranger, pytest.raises(ClientError) as refused:
        stranger.get("no-such-job")
    assert refused.value.code == "UNAUTHENTICATED"
    assert rpc_errors("GetJob", "NOT_FOUND") == before[("GetJob", "NOT_FOUND")] + 1
    assert rpc_errors("GetJob", "UNAUTHENTICATED") == before[("GetJob", "UNAUTHENTICATED")] + 1
    assert rpc_errors("ListJobs", "OK") is None


def test_rpc_errors_panel_counts_the_first_error_after_a_controller_restart(prometheus_bin, tmp_path):
    """Three NOT_FOUNDs, then the controller restarts (minute 40) on the same scrape target; its next NOT_FOUND comes
    an hour later (minute 100). The panel shows it while it is in the window: the restarted controller's series is
    there at 0 from its start. The latency histogram's count, whose series came back only with that error (input
    here too, as the controller exports it), read 0 then."""
    (query,) = panel_queries("training", "Controller RPC errors")
    target = 'job="dreambooth-controller", instance="127.0.0.1:9464", method="GetJob"'
    counted = '{method="GetJob", code="NOT_FOUND"}'
    series = [
        {"series": f'dreambooth_rpc_duration_seconds_count{{{target}, code="OK"}}', "values": "0+5x110"},
        {
            "series": f'dreambooth_rpc_duration_seconds_count{{{target}, code="NOT_FOUND"}}',
            "values": "_x10 1 2 3x27 _x60 1x10",
        },
        {"series": f'dreambooth_rpc_errors_total{{{target}, code="NOT_FOUND"}}', "values": "0x9 1 2 3x27 0x59 1x10"},
        {"series": f'dreambooth_rpc_errors_total{{{target}, code="INTERNAL"}}', "values": "0x110"},
    ]
    checks = [
        {"expr": query, "eval_time": "5m", "exp_samples": []},  # nothing failed yet: nothing drawn
        {"expr": query, "eval_time": "15m", "exp_samples": [{"labels": counted, "value": 3}]},
        {"expr": query, "eval_time": "75m", "exp_samples": []},  # the restart is no error
        {"expr": query, "eval_time": "105m", "exp_samples": [{"labels": counted, "value": 1}]},
    ]
    promtool_test(prometheus_bin, tmp_path, [{"interval": "1m", "input_series": series, "promql_expr_test": checks}])


# --- the dcgm job of the scrape config on machines ----------------------------------------------------------------


def test_the_commented_dcgm_job_scrapes_every_node_ray_lists(prometheus_bin, tmp_path):
    """GPU nodes come and go with the autoscaler: the dcgm job, uncommented, takes them from the file where Ray
    lists its nodes' metrics endpoints (the ray job's), on the exporter's port, as job dcgm (the file says "ray"),
    each named by its address; the other endpoints Ray lists (its autoscaler's, its dashboard's) are not nodes."""
    text = (ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text()
    block = re.search(r"^  # - job_name: dcgm\n(?:  #   .*\n)*", text, re.M).group(0)
    config = yaml.safe_load(text.replace(block, re.sub(r"^  # ", "  ", block, flags=re.M)))
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    files = {name: [sd["files"] for sd in jobs[name]["file_sd_configs"]] for name in ("dcgm", "ray")}
    assert files["dcgm"] == files["ray"]
    launcher = yaml.safe_load((ROOT / "deploy" / "ray" / "cluster.yaml").read_text())
    (port,) = {m for c in launcher["worker_start_ray_commands"] for m in re.findall(r"--metrics-export-port=(\d+)", c)}
    nodes = ["10.0.0.10", "10.0.1.21", "10.0.2.37"]  # the head, two GPU workers
    discovery = tmp_path / "prom_metrics_service_discovery.json"
    # As Ray's metrics agent writes it (ray._private.metrics_agent.PrometheusServiceDiscoveryWriter).
    targets = [f"{ip}:{port}" for ip in nodes] + ["10.0.0.10:44217", "10.0.0.10:44227"]
    discovery.write_text(json.dumps([{"labels": {"job": "ray"}, "targets": targets}]))
    jobs["dcgm"]["file_sd_configs"][0]["files"] = [str(discovery)]
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump({"global": config["global"], "scrape_configs": [jobs["dcgm"]]}))
    result = subprocess.run(
        [prometheus_bin / "promtool", "check", "service-discovery", "--timeout=2s", path, "dcgm"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    scraped = [t["labels"] for t in json.loads(result.stdout) if t["labels"]]  # the dropped ones have none left
    assert sorted((t["__address__"], t["job"], t["Hostname"]) for t in scraped) == [
        (f"{ip}:9400", "dcgm", ip) for ip in nodes
    ]
