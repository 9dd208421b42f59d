"""Operations (deploy/): every file parses, the Kubernetes manifests and the cluster launcher config pass their
schemas, the manifests agree with each other, the dashboards are current and query only metrics that exist,
Prometheus' own tools accept the scrape configs, the alerting rules and every dashboard query, the alerts fire on
failing series and stay silent on healthy ones, and the trainer records its metrics.
No Ray cluster is started; Prometheus comes from scripts/fetch-prometheus (fetched by scripts/test)."""

from __future__ import annotations

import copy
import errno
import glob
import importlib.util
import json
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import jsonschema
import pytest
import yaml

from deploy.grafana import dashboards

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
KUBERNETES = DEPLOY / "kubernetes"
PYPROJECT = (ROOT / "pyproject.toml").read_text()  # (tomllib would need Python 3.11; the project supports 3.10)
VERSION = re.search(r'^version = "([^"]+)"$', PYPROJECT, re.M).group(1)
IMAGE = f"ghcr.io/dreambooth-cluster/dreambooth-cluster:{VERSION}"
# The oldest Kubernetes the manifests are for (gRPC probes are GA since 1.27), and the newest schemas we have.
KUBERNETES_VERSIONS = ("1.30", "latest")


def _yaml_documents(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def _manifests() -> list[tuple[str, dict]]:
    """(file name, object) for every Kubernetes object under deploy/kubernetes/ (schemas/ excluded)."""
    return [
        (path.name, doc)
        for path in sorted(KUBERNETES.glob("*.yaml"))
        for doc in _yaml_documents(path)
        if doc.get("kind") != "Kustomization"
    ]


def _objects(kind: str) -> list[dict]:
    return [doc for _, doc in _manifests() if doc["kind"] == kind]


# --- every file parses --------------------------------------------------------------------------------------------


def test_every_yaml_and_json_file_under_deploy_parses():
    files = [Path(p) for p in glob.glob(str(DEPLOY / "**" / "*"), recursive=True)]
    checked = 0
    for path in files:
        if path.suffix in (".yaml", ".yml"):
            assert _yaml_documents(path), f"{path} is empty"
        elif path.suffix == ".json":
            json.loads(path.read_text())
        else:
            continue
        checked += 1
    assert checked >= 12


# --- Kubernetes ---------------------------------------------------------------------------------------------------


def _validate_builtin(obj: dict, version: str) -> None:
    from kubernetes_validate import utils

    utils.validate(obj, utils.latest_version() if version == "latest" else version, strict=True)


def _validate_raycluster(obj: dict, version: str) -> None:
    schema = yaml.safe_load((KUBERNETES / "schemas" / "raycluster-v1.openapi.yaml").read_text())
    jsonschema.Draft7Validator(schema).validate(obj)
    # The schema leaves the pod templates open; they are Kubernetes PodTemplateSpecs, checked as such.
    spec = obj["spec"]
    for template in [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec.get("workerGroupSpecs", [])]:
        pod_template = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": template}
        _validate_builtin(pod_template, version)


def _validate(obj: dict, version: str) -> None:
    if obj["kind"] == "RayCluster":
        _validate_raycluster(obj, version)
    else:
        _validate_builtin(obj, version)


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("name, obj", _manifests(), ids=lambda v: v if isinstance(v, str) else v.get("kind"))
def test_kubernetes_manifest_passes_its_schema(name, obj, version):
    _validate(obj, version)


@pytest.mark.parametrize(
    "kind, mutate",
    [
        ("Deployment", lambda d: d["spec"].update(replica=1)),  # misspelt field
        ("Deployment", lambda d: d["spec"]["template"]["spec"]["containers"][0].update(ports=[{"port": 1}])),
        ("RayCluster", lambda d: d["spec"]["workerGroupSpecs"][0].update(minReplica=0)),
        ("RayCluster", lambda d: d["spec"]["workerGroupSpecs"][0].pop("groupName")),
        ("RayCluster", lambda d: d["spec"]["headGroupSpec"]["template"]["spec"].update(container=[])),
        ("RayCluster", lambda d: d["spec"]["autoscalerOptions"].update(upscalingMode="Fast")),
    ],
)
def test_schema_validation_catches_mistakes(kind, mutate):
    """The validation is real: a broken copy of a manifest is refused."""
    obj = copy.deepcopy(_objects(kind)[0])
    mutate(obj)
    with pytest.raises(jsonschema.ValidationError):
        _validate(obj, "1.30")


def test_manifests_refer_to_each_other_consistently():
    claims = {o["metadata"]["name"] for o in _objects("PersistentVolumeClaim")}
    config_maps = {o["metadata"]["name"] for o in _objects("ConfigMap")}
    secrets = {o["metadata"]["name"]: o for o in _objects("Secret")}  # from secrets.example.yaml
    (cluster,) = _objects("RayCluster")
    pod_specs = [o["spec"]["template"]["spec"] for o in _objects("Deployment")]
    pod_specs += [cluster["spec"]["headGroupSpec"]["template"]["spec"]]
    pod_specs += [g["template"]["spec"] for g in cluster["spec"]["workerGroupSpecs"]]
    for pod in pod_specs:
        for volume in pod.get("volumes", []):
            if "persistentVolumeClaim" in volume:
                assert volume["persistentVolumeClaim"]["claimName"] in claims
            if "configMap" in volume:
                assert volume["configMap"]["name"] in config_maps
            if "secret" in volume:
                assert volume["secret"]["secretName"] in secrets
        for container in pod["containers"]:
            assert container["image"] == IMAGE
            for env in container.get("env", []):
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["key"] in secrets[ref["name"]]["stringData"]
            # Storage shared by all nodes: the same claim at the same path in every pod.
            shared = [m for m in container["volumeMounts"] if m["name"] == "shared"]
            assert shared == [{"name": "shared", "mountPath": "/shared"}]
    assert all(o["metadata"]["namespace"] == "dreambooth" for _, o in _manifests() if o["kind"] != "Namespace")
    (shared_claim,) = [o for o in _objects("PersistentVolumeClaim") if o["metadata"]["name"] == "dreambooth-shared"]
    assert shared_claim["spec"]["accessModes"] == ["ReadWriteMany"]
    # Serve's Service selects the RayCluster's head pod (KubeRay's labels).
    (serve,) = [o for o in _objects("Service") if o["metadata"]["name"] == "dreambooth-serve"]
    assert serve["spec"]["selector"] == {"ray.io/cluster": cluster["metadata"]["name"], "ray.io/node-type": "head"}
    assert serve["spec"]["ports"][0]["port"] == 8000
    # Every manifest file is applied by the kustomization (except the example Secrets).
    (kustomization,) = _yaml_documents(KUBERNETES / "kustomization.yaml")
    files = {p.name for p in KUBERNETES.glob("*.yaml")} - {"kustomization.yaml", "secrets.example.yaml"}
    assert set(kustomization["resources"]) == files


def _controller_config(tmp_path: Path):
    """The controller's config as its pod loads it: the Deployment's own command line, its --config files the
    ConfigMap's and the example Secret's, read by the controller's config loader."""
    from controller.config import ControllerConfig
    from controller.server import parse_arguments

    (deployment,) = _objects("Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    (config_map,) = _objects("ConfigMap")
    secret = next(o for o in _objects("Secret") if o["metadata"]["name"] == "dreambooth-controller")
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    files = {mounts["config"]: config_map["data"], mounts["secret"]: secret["stringData"]}
    for mount, contents in files.items():
        local = tmp_path / mount.strip("/")
        local.mkdir(parents=True)
        for name, text in contents.items():
            (local / name).write_text(text)
    assert container["command"][:2] == ["dreambooth", "controller"]
    argv = container["command"][2:]
    for mount in files:
        argv = [arg.replace(f"={mount}/", f"={tmp_path / mount.strip('/')}/") for arg in argv]
    return ControllerConfig.load(parse_arguments(argv).config), deployment


def test_controller_pod_config_merges_configmap_and_secret(tmp_path):
    config, deployment = _controller_config(tmp_path)
    assert [t.name for t in config.tenants] == ["alice"]  # from the Secret
    assert str(config.storage).startswith("/shared/")  # on the shared volume, like the Ray pods'
    (cluster,) = _objects("RayCluster")
    assert config.ray_dashboard_url == f"http://{cluster['metadata']['name']}-head-svc:8265"
    ports = {p["name"]: p["containerPort"] for p in deployment["spec"]["template"]["spec"]["containers"][0]["ports"]}
    assert int(config.listen.rpartition(":")[2]) == ports["grpc"] == 50051
    assert int(config.metrics_listen.rpartition(":")[2]) == ports["metrics"] == 9464
    # The kubelet's probes ask the health port (plaintext, whatever TLS 50051 serves), which the Service leaves out.
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    probed = {container[probe]["grpc"]["port"] for probe in ("readinessProbe", "livenessProbe")}
    assert probed == {int(config.health_listen.rpartition(":")[2])} == {ports["health"]}
    (service,) = [o for o in _objects("Service") if o["metadata"]["name"] == "dreambooth-controller"]
    assert ports["health"] not in {p["port"] for p in service["spec"]["ports"]}
    db_mount = next(
        m["mountPath"]
        for m in deployment["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]
        if m["name"] == "db"
    )
    assert config.effective_database_url == f"sqlite:///{db_mount}/controller.db"
    assert deployment["spec"]["strategy"]["type"] == "Recreate"  # never two controllers at once
    # Jobs are started up to what the autoscaler may grow the GPU group to, so that waiting jobs grow it.
    (gpu_group,) = [g for g in cluster["spec"]["workerGroupSpecs"] if g["groupName"] == "gpu"]
    limits = gpu_group["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert config.capacity_gpus == gpu_group["maxReplicas"] * int(limits["nvidia.com/gpu"])
    assert config.capacity_cpus == gpu_group["maxReplicas"] * int(limits["cpu"])


# --- Ray cluster launcher, image ----------------------------------------------------------------------------------


def test_cluster_launcher_config_passes_rays_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((DEPLOY / "ray" / "cluster.yaml").read_text())
    validate_config(prepare_config(copy.deepcopy(config)))  # Ray's schema (ray-schema.json) and its own checks
    assert config["docker"]["image"] == IMAGE
    assert "-v /shared:/shared" in config["docker"]["run_options"]
    head = config["available_node_types"][config["head_node_type"]]
    assert "InstanceType" in head["node_config"]
    workers = [t for name, t in config["available_node_types"].items() if name != config["head_node_type"]]
    assert workers and all(t["node_config"]["InstanceType"].startswith(("g", "p")) for t in workers)  # GPU types
    for command in config["head_start_ray_commands"] + config["worker_start_ray_commands"]:
        if "ray start" in command:
            assert "--metrics-export-port=8080" in command
    # Ray's launcher gives a container GPUs only where `docker info` lists NVIDIA's runtime: every worker type asks
    # for them (a node type's own docker settings replace the global ones, as Ray merges them); the head, with no
    # GPU, must not (Docker refuses to start it).
    for worker in workers:
        assert "--gpus all" in {**config["docker"], **worker.get("docker", {})}["worker_run_options"]
    assert not [o for o in config["docker"]["run_options"] + config["docker"]["head_run_options"] if "--gpus" in o]
    # A fresh node has no package lists, and unattended-upgrades holds dpkg's lock for minutes after boot.
    apt = [c for command in config["initialization_commands"] for c in re.findall(r"apt-get [^;&|)]*", command)]
    assert [c.split()[-1] for c in apt] == ["update", "nfs-common"], apt
    assert all("-o DPkg::Lock::Timeout=" in c for c in apt), apt
    # `ray up` syncs nothing git ignores (.venv, local models: GiBs), nor .git.
    assert ".gitignore" in config["rsync_filter"] and ".git" in config["rsync_exclude"]
    # Every host directory mounted into the container is made and given to its user (uid 1000) first: one that
    # Docker creates is root's, and Ray in the container could not write its session files there.
    owned = " ".join(c for c in config["initialization_commands"] if "chown 1000" in c)
    for option in config["docker"]["run_options"] + config["docker"]["head_run_options"]:
        if option.startswith("-v "):
            host_dir = option[3:].split(":")[0]
            assert host_dir in owned.split(), f"{host_dir} is mounted but not made the container user's"


def _constraint(name: str) -> str:
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line.lower().startswith(f"{name}=="):
            return line.split("==", 1)[1]
    raise AssertionError(f"{name} is not pinned in constraints.txt")


def test_dockerfile_copies_what_exists_on_the_tested_stack():
    text = (DEPLOY / "docker" / "Dockerfile").read_text()
    base = re.search(r"^ARG BASE_IMAGE=(\S+)$", text, re.M).group(1)
    assert base == f"rayproject/ray:{_constraint('ray')}-py311-gpu"  # the Ray of constraints.txt, Python 3.11
    assert re.search(rf"^ARG TORCH_SPEC=torch=={re.escape(_constraint('torch'))}$", text, re.M)
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines() if line.strip()}
    sources = [src for line in re.findall(r"^COPY (?:--\S+ )*(.+)$", text, re.M) for src in line.split()[:-1]]
    assert "constraints.txt" in sources
    for source in sources:
        assert (ROOT / source).exists(), f"Dockerfile copies {source}, which is not in the repository"
        assert source.strip("/") not in ignored, f"{source} is excluded by .dockerignore"
    include = re.search(r"^include = \[(.*)\]$", PYPROJECT, re.M).group(1)
    for pattern in re.findall(r'"([^"]+)"', include):  # every package pyproject installs is in the build context
        assert f"{pattern.rstrip('*')}/" in sources


# --- Grafana ------------------------------------------------------------------------------------------------------


def test_committed_dashboards_are_what_the_code_generates():
    result = subprocess.run(
        [sys.executable, "-m", "deploy.grafana.dashboards", "--check"], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr


def test_check_notices_a_stale_dashboard(tmp_path, capsys):
    assert dashboards.main(["--out-dir", str(tmp_path)]) == 0
    assert dashboards.main(["--check", "--out-dir", str(tmp_path)]) == 0
    path = tmp_path / "serving.json"
    path.write_text(path.read_text().replace("Healthy replicas", "Replicas"))
    assert dashboards.main(["--check", "--out-dir", str(tmp_path)]) == 1
    assert "serving.json" in capsys.readouterr().err


@pytest.mark.parametrize("name", list(dashboards.DASHBOARDS))
def test_dashboard_structure(name):
    data = json.loads((DEPLOY / "grafana" / "dashboards" / f"{name}.json").read_text())
    assert data["uid"] == f"dreambooth-{name}"
    panels = data["panels"] + [p for row in data["panels"] for p in row.get("panels", [])]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    graphs = [p for p in panels if p["type"] != "row"]
    assert len(graphs) >= 10
    for panel in graphs:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"], panel["title"]
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert len(set(ref_ids)) == len(ref_ids) and all(ref_ids), panel["title"]
        for target in panel["targets"]:
            # Rates over Grafana's own window (or a fixed long one for rare events, and the day before it that says
            # whether their series is new), never a bare counter.
            for window in re.findall(r"\[([^\]]+)\]", target["expr"]):
                assert window in ("$__rate_interval", dashboards.SPARSE, dashboards.SEEN_BEFORE), target["expr"]
    variables = {v["name"] for v in data["templating"]["list"]}
    assert "datasource" in variables


def test_dashboards_cover_the_issue():
    titles = {
        name: [
            p["title"] for p in json.loads((DEPLOY / "grafana" / "dashboards" / f"{name}.json").read_text())["panels"]
        ]
        for name in dashboards.DASHBOARDS
    }
    text = {name: " ".join(t).lower() for name, t in titles.items()}
    for words in (
        "jobs by state",
        "queue wait",
        "steps per second",
        "loss",
        "checkpoint stall",
        "failures",
        "restarts",
    ):
        assert words in text["training"], words
    for words in ("requests", "errors", "latency", "batch size", "queue depth", "replicas", "loaded models", "gpu"):
        assert words in text["serving"], words
    expressions = " ".join(dashboards.all_promql_expressions())
    for quantile in ("histogram_quantile(0.5,", "histogram_quantile(0.99,"):
        assert quantile in expressions


def test_all_promql_expressions_fill_in_every_variable():
    expressions = dashboards.all_promql_expressions()
    assert len(expressions) >= 30
    assert not [e for e in expressions if "$" in e]
    assert any("[1m]" in e for e in expressions) and any('job_id=~".*"' in e for e in expressions)
    with pytest.raises(ValueError, match="no value for a variable"):
        dashboards.all_promql_expressions({"$__rate_interval": "1m"})


def _metric_names(expression: str) -> set[str]:
    # Label names never start with these prefixes; metric names of this project and its exporters do.
    return set(re.findall(r"\b((?:dreambooth_|ray_|DCGM_)[A-Za-z0-9_]+)\b", expression))


def _base_name(name: str) -> str:
    """A metric family's name as defined in code: without Ray's `ray_` prefix and histogram suffixes."""
    name = re.sub(r"_(bucket|count|sum)$", "", name)
    return name.removeprefix("ray_")


def _string_literals(paths: list[Path]) -> set[str]:
    return {m for path in paths for m in re.findall(r"""["']([a-z_]+)["']""", path.read_text(errors="replace"))}


def _undefined_metrics(expressions: list[str]) -> list[str]:
    """The metric names `expressions` use that nothing defines: not the controller (its registry), the trainer
    (trainer/metrics.py), serving (serving/*.py), Ray itself (its sources), nor the DCGM exporter."""
    from controller.metrics import REGISTRY
    from trainer.metrics import TrainMetrics

    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_count", "_sum"], "gauge": [""]}
    controller = {f.name + suffix for f in REGISTRY.collect() for suffix in suffixes[f.type]}
    trainer = {m._name for m in vars(TrainMetrics()).values()}
    serving_files = sorted((ROOT / "serving").glob("*.py"))
    serving = _string_literals(serving_files)
    ray_dir = Path(importlib.util.find_spec("ray").origin).parent
    ray_sources = [p for d in ("serve", "dashboard", "_private") for p in (ray_dir / d).rglob("*.py")]
    ray_literals = _string_literals(ray_sources)
    # Names Ray builds with an f-string (serve_num_{protocol}_requests in request_ingress_metrics.py).
    ray_literals |= {"serve_num_http_requests"}
    missing = []
    for expression in expressions:
        for name in _metric_names(expression):
            base = _base_name(name)
            if name.startswith("DCGM_FI_DEV_"):
                continue  # NVIDIA's exporter; its names are documented, not in this repository
            if name.startswith("dreambooth_"):
                found = name in controller
            elif base.startswith("dreambooth_train_"):
                found = base.removesuffix("_total") in trainer
            elif base.startswith("dreambooth_serve_"):
                if not any("dreambooth_serve_" in p.read_text() for p in serving_files):
                    pytest.skip("serving/ defines no metrics yet")
                found = base in serving or base.removesuffix("_total") in serving
            else:
                found = base in ray_literals or base.removesuffix("_total") in ray_literals
            if not found:
                missing.append(name)
    return sorted(set(missing))


def test_dashboards_query_only_metrics_that_exist():
    """Every metric the dashboards query is defined: by the controller (its registry), the trainer
    (trainer/metrics.py), serving (serving/*.py), Ray itself (its sources), or the DCGM exporter."""
    missing = _undefined_metrics(dashboards.all_promql_expressions())
    assert not missing, f"the dashboards query metrics nothing defines: {missing}"


# --- Prometheus ---------------------------------------------------------------------------------------------------


def _promtool(prometheus_bin: Path, *args) -> subprocess.CompletedProcess:
    return subprocess.run([prometheus_bin / "promtool", *map(str, args)], capture_output=True, text=True, timeout=60)


def test_fetched_prometheus_runs(prometheus_bin):
    for binary in ("prometheus", "promtool"):
        result = subprocess.run([prometheus_bin / binary, "--version"], capture_output=True, text=True, timeout=30)
        assert result.returncode == 0 and "version" in (result.stdout + result.stderr)


def test_promtool_accepts_the_scrape_config(prometheus_bin):
    result = _promtool(prometheus_bin, "check", "config", DEPLOY / "prometheus" / "prometheus.yml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_scrape_config_targets_match_the_components():
    import ray._private.ray_constants as ray_constants

    from controller.config import ControllerConfig

    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    default_metrics = ControllerConfig(storage=Path("/x")).metrics_listen
    assert jobs["dreambooth-controller"]["static_configs"][0]["targets"] == [default_metrics]
    (files,) = [sd["files"] for sd in jobs["ray"]["file_sd_configs"]]
    assert files == [f"/tmp/ray/{ray_constants.PROMETHEUS_SERVICE_DISCOVERY_FILE}"]
    datasource = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yaml").read_text())
    assert datasource["datasources"][0]["jsonData"]["timeInterval"] == config["global"]["scrape_interval"]


def test_promtool_accepts_the_kubernetes_scrape_config(prometheus_bin, tmp_path):
    """Debian builds Prometheus without Kubernetes discovery, so the pods are swapped for a static target and
    promtool checks the rest (relabelling included), with the alerting rules beside it as one ConfigMap mounts
    them."""
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus-kubernetes.yml").read_text())
    for job in config["scrape_configs"]:
        assert [sd["role"] for sd in job.pop("kubernetes_sd_configs")] == ["pod"]
        job["static_configs"] = [{"targets": ["127.0.0.1:1"]}]
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    for rule_file in config["rule_files"]:
        (tmp_path / rule_file).write_text((DEPLOY / "prometheus" / rule_file).read_text())
    result = _promtool(prometheus_bin, "check", "config", path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_kubernetes_scrape_config_keeps_to_the_deployments_namespace():
    """No dashboard query tells one deployment from another: another team's RayCluster or a staging copy in another
    namespace, scraped by the controller's or Ray's job, would be added into every panel."""
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus-kubernetes.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    (namespace,) = {o["metadata"]["namespace"] for _, o in _manifests() if o["kind"] != "Namespace"}
    for name in ("dreambooth-controller", "ray"):
        assert jobs[name]["kubernetes_sd_configs"] == [{"role": "pod", "namespaces": {"names": [namespace]}}], name


def test_promtool_parses_every_dashboard_query(prometheus_bin, tmp_path):
    """Each query becomes a recording rule, which promtool parses and type-checks with Prometheus' own PromQL."""
    rules = [{"record": f"dashboard:query_{i}", "expr": e} for i, e in enumerate(dashboards.all_promql_expressions())]
    path = tmp_path / "dashboards.rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboards", "rules": rules}]}))
    result = _promtool(prometheus_bin, "check", "rules", path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{len(rules)} rules found" in result.stdout


def _panel_queries(name: str, title: str) -> list[str]:
    """The PromQL of one panel of a committed dashboard, with the Grafana variables filled in as
    all_promql_expressions() fills them."""
    data = json.loads((DEPLOY / "grafana" / "dashboards" / f"{name}.json").read_text())
    panels = data["panels"] + [p for row in data["panels"] for p in row.get("panels", [])]
    (panel,) = [p for p in panels if p["title"] == title]
    queries = []
    for target in panel["targets"]:
        query = target["expr"]
        for variable in sorted(dashboards.VARIABLE_VALUES, key=len, reverse=True):
            query = query.replace(variable, dashboards.VARIABLE_VALUES[variable])
        queries.append(query)
    return queries


@pytest.mark.parametrize(
    "name, title, failing, other, counted",
    [
        (
            "serving",
            "Failed requests",
            'ray_dreambooth_serve_requests_total{model_class="dog", outcome="not_found"}',
            'ray_dreambooth_serve_requests_total{model_class="dog", outcome="ok"}',
            '{outcome="not_found"}',
        ),
    ],
)
def test_error_panels_count_the_first_error_of_a_kind(prometheus_bin, tmp_path, name, title, failing, other, counted):
    """The series of an error appears at 1 with its first occurrence (Ray's metrics cannot be set to 0 before it):
    rate() sees nothing in it, so a panel built on rate() never showed the first error of each kind, often the only
    one. Prometheus' rule tests evaluate the panel's query on such a series: the error counts once while it is in
    the window, and successes never. (The controller's RPC errors start at 0 instead: tests/test_metric_readings.py
    checks that panel.)"""
    (query,) = _panel_queries(name, title)
    left_window = f"{10 + int(dashboards.SPARSE.removesuffix('m')) + 5}m"
    tests = {
        "tests": [
            {
                "interval": "1m",
                "input_series": [
                    {"series": other, "values": "0+5x90"},
                    {"series": failing, "values": "_x10 1x80"},  # absent, then its first error at minute 10
                ],
                "promql_expr_test": [
                    {"expr": query, "eval_time": "5m", "exp_samples": []},
                    {"expr": query, "eval_time": "15m", "exp_samples": [{"labels": counted, "value": 1}]},
                    {"expr": query, "eval_time": left_window, "exp_samples": [{"labels": counted, "value": 0}]},
                ],
            },
            {  # a long-lived total with a scrape gap (Prometheus restarted) before the window: not counted again
                "interval": "1m",
                "input_series": [
                    {"series": other, "values": "0+5x90"},
                    {"series": failing, "values": "500x40 _x15 500x35"},
                ],
                "promql_expr_test": [
                    {"expr": query, "eval_time": "80m", "exp_samples": [{"labels": counted, "value": 0}]}
                ],
            },
        ]
    }
    path = tmp_path / "first_error.test.yml"
    path.write_text(yaml.safe_dump(tests))
    result = _promtool(prometheus_bin, "test", "rules", path)
    assert result.returncode == 0, f"{query}\n{result.stdout}{result.stderr}"


# --- trainer metrics ----------------------------------------------------------------------------------------------


class _RecordingMetrics:
    def __init__(self):
        self.steps: list[int] = []

    def record_steps(self, steps_done):
        self.steps.append(steps_done)


def test_progress_reporter_records_metrics_each_window(tmp_path):
    import torch

    from trainer.events import EventLog, read_events
    from trainer.progress import ProgressReporter

    metrics = _RecordingMetrics()
    reporter = ProgressReporter(
        EventLog(tmp_path / "events.jsonl"),
        tmp_path / "tb",
        total_steps=10,
        start_step=4,
        interval_s=3600,
        metrics=metrics,
    )
    for step, loss in ((5, 1.0), (6, 3.0)):
        value = torch.tensor(loss)
        reporter.step(step, value, value, value, lr=1e-5)
    reporter.step(7, torch.tensor(5.0), torch.tensor(5.0), torch.tensor(5.0), lr=1e-5, force=True, skipped_steps=2)
    reporter.close()
    assert metrics.steps == [1, 2]  # the run's first step (resumed at 4), told at once; then steps 6-7
    first, event = [e for e in read_events(tmp_path / "events.jsonl") if e["type"] == "progress"]
    assert (first["step"], first["loss"], first["steps_per_s"]) == (5, 1.0, None)
    assert event["loss"] == pytest.approx(4.0) and event["steps_per_s"] > 0
    assert event["skipped_steps"] == 2  # fp16 overflows so far: what the benchmark and a user watch for


def test_the_rate_and_eta_leave_out_what_a_runs_first_step_paid_for(tmp_path):
    """A run's first step follows the model's load (and compiles, with torch_compile: minutes): timed from the
    reporter's creation, the first report said ~0.005 steps/s and an ETA of hours, to the CLI, gRPC and Grafana."""
    import time

    import torch

    from trainer.events import EventLog, read_events
    from trainer.progress import ProgressReporter

    reporter = ProgressReporter(EventLog(tmp_path / "events.jsonl"), tmp_path / "tb", 100, 0, interval_s=3600)
    time.sleep(1)  # loading, compiling
    for step in (1, 2):
        reporter.step(step, torch.tensor(1.0), torch.tensor(1.0), torch.tensor(1.0), lr=1e-5)
    reporter.step(3, torch.tensor(1.0), torch.tensor(1.0), torch.tensor(1.0), lr=1e-5, force=True)
    reporter.close()
    first, event = [e for e in read_events(tmp_path / "events.jsonl") if e["type"] == "progress"]
    assert first["step"] == 1 and first["steps_per_s"] is None and first["eta_s"] is None  # told at once, no rate
    assert event["steps_per_s"] > 10 and event["eta_s"] < 10  # steps 2-3, not 0-3 over the second before
    single = ProgressReporter(EventLog(tmp_path / "one.jsonl"), tmp_path / "tb1", 1, 0)
    single.step(1, torch.tensor(1.0), torch.tensor(1.0), torch.tensor(1.0), lr=1e-5, force=True)  # a 1-step job
    single.close()
    (event,) = [e for e in read_events(tmp_path / "one.jsonl") if e["type"] == "progress"]
    assert event["steps_per_s"] is None and event["eta_s"] is None and event["loss"] == 1.0


def test_a_resumed_runs_tensorboard_events_drop_the_steps_it_logs_again(tmp_path):
    import struct

    import torch
    from tensorboardX.proto.event_pb2 import Event, SessionLog

    from trainer.events import EventLog
    from trainer.progress import ProgressReporter

    def run(start_step: int, steps: range) -> None:
        reporter = ProgressReporter(EventLog(tmp_path / "events.jsonl"), tmp_path / "tb", 10, start_step, interval_s=0)
        for step in steps:
            reporter.step(step, torch.tensor(1.0), torch.tensor(1.0), torch.tensor(0.0), lr=1e-5)
        reporter.close()

    def restarts(file: Path) -> list[int]:  # TFRecords: length, its CRC, the event, its CRC
        data, at, steps = file.read_bytes(), 0, []
        while at < len(data):
            (length,) = struct.unpack_from("<Q", data, at)
            event = Event.FromString(data[at + 12 : at + 12 + length])
            at += 12 + length + 4
            if event.HasField("session_log") and event.session_log.status == SessionLog.START:
                steps.append(event.step)
        return steps

    run(0, range(1, 7))  # crashed after step 6; its checkpoint was at step 4
    run(4, range(5, 11))
    (first,) = (tmp_path / "tb").glob("events.out.tfevents.*.from-step-0")
    (resumed,) = (tmp_path / "tb").glob("events.out.tfevents.*.from-step-4")
    assert restarts(first) == [1]  # a run from the start drops what one that had no checkpoint yet logged
    assert restarts(resumed) == [5]  # TensorBoard drops the first run's steps 5 and 6


# tensorboardX's own writer thread dies of the injected fault: that is the failure this test is about.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_tensorboard_folder_that_cannot_be_written_never_holds_training(tmp_path, monkeypatch):
    """tensorboardX's writer thread dies on an I/O error (a full disk, a stale NFS handle) and its bounded queue then
    blocked the training loop for good: a job hung in TRAINING, holding its GPUs, until max_job_run_s."""
    import torch
    from tensorboardX.event_file_writer import EventsWriter

    from trainer.events import EventLog, read_events
    from trainer.progress import ProgressReporter

    def disk_full(self) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(EventsWriter, "flush", disk_full)
    events = EventLog(tmp_path / "events.jsonl")
    finished = threading.Event()

    def train() -> None:
        reporter = ProgressReporter(events, tmp_path / "tb", total_steps=2000, start_step=0, interval_s=0)
        for step in range(1, 2001):  # each report 5 scalars
            reporter.step(step, torch.tensor(1.0), torch.tensor(1.0), torch.tensor(0.0), lr=1e-5)
        reporter.close()
        finished.set()

    threading.Thread(target=train, daemon=True).start()
    assert finished.wait(timeout=120), "the training loop waits on TensorBoard's dead writer"
    assert [e["step"] for e in read_events(events.path) if e["type"] == "progress"] == list(range(1, 2001))


def test_train_metrics_record_without_a_ray_cluster():
    """The trainer's metrics are plain ray.util.metrics: recording is safe wherever the loop runs. In a process of
    its own, as this session's pytest is connected to the tests' cluster."""
    code = """if True:
        import ray
        from trainer.checkpoint import Stall
        from trainer.metrics import TrainMetrics

        metrics = TrainMetrics()
        metrics.record_steps(0)  # an empty window: Ray's Counter refuses inc(0), so it is skipped
        metrics.record_steps(3)
        metrics.record_checkpoint_stall(Stall(seconds=2.0, waited_s=1.5))
        metrics.record_restart()
        assert not ray.is_initialized()
        print(sorted(m._name for m in vars(metrics).values()))
    """
    environment = {name: value for name, value in os.environ.items() if not name.startswith("RAY_ADDRESS")}
    root = Path(__file__).parent.parent
    done = subprocess.run([sys.executable, "-c", code], cwd=root, env=environment, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == str(
        [
            "dreambooth_train_checkpoint_stall_seconds",
            "dreambooth_train_checkpoint_wait_seconds",
            "dreambooth_train_restarts",
            "dreambooth_train_steps",
        ]
    )


def test_a_wheel_carries_the_files_read_from_the_installed_package(tmp_path):
    """`dreambooth stack up` writes its Prometheus config from deploy/prometheus/prometheus.yml, found beside the
    installed package: a wheel without it (the image's install, `pip install .`) ran a stack with no scrape config,
    without a word. The dashboards and Grafana's provisioning go along for operators."""
    import shutil
    import zipfile

    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for package in ("dreambooth", "trainer", "controller", "serving", "deploy"):
        shutil.copytree(ROOT / package, source / package, ignore=shutil.ignore_patterns("__pycache__"))
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", tmp_path, source]
    subprocess.run(command, check=True, capture_output=True, timeout=300)
    [wheel] = tmp_path.glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {str(path.relative_to(ROOT)) for path in DEPLOY.glob("prometheus/*.yml")}
    expected |= {str(path.relative_to(ROOT)) for path in DEPLOY.glob("grafana/**/*.json")}
    expected |= {str(path.relative_to(ROOT)) for path in DEPLOY.glob("grafana/provisioning/*/*.yaml")}
    assert "deploy/prometheus/prometheus.yml" in expected and len(expected) >= 6, expected
    assert expected <= names, sorted(expected - names)


# --- Prometheus alerting rules ------------------------------------------------------------------------------------

ALERTS = DEPLOY / "prometheus" / "alerts.yml"
SCRAPE_CONFIGS = ("prometheus.yml", "prometheus-kubernetes.yml")


def _alerting_rules() -> dict[str, dict]:
    """alerts.yml's rules by alert name."""
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return {rule["alert"]: rule for group in groups for rule in group["rules"]}


def test_promtool_accepts_the_alerting_rules(prometheus_bin):
    result = _promtool(prometheus_bin, "check", "rules", ALERTS)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{len(_alerting_rules())} rules found" in result.stdout


def test_every_alert_waits_and_says_what_to_look_at():
    rules = _alerting_rules()
    assert len(rules) >= 10
    for name, rule in rules.items():
        assert name.startswith("DreamBooth"), name
        assert re.fullmatch(r"\d+[mh]", rule["for"]), name  # none fires on a single evaluation
        assert rule["labels"]["severity"] in ("critical", "warning"), name
        assert rule["annotations"]["summary"] and len(rule["annotations"]["description"]) > 100, name


def test_both_scrape_configs_and_the_stack_load_the_alerting_rules(prometheus_bin, tmp_path):
    """Both configs name alerts.yml beside them; `dreambooth up` writes its copy of prometheus.yml into the stack's
    own directory, where a relative path would name no file (Prometheus would run without alerts, without a word):
    its copy names the rules by their absolute path, and promtool finds them from there."""
    from dreambooth import stack

    for name in SCRAPE_CONFIGS:
        config = yaml.safe_load((DEPLOY / "prometheus" / name).read_text())
        assert config["rule_files"] == [ALERTS.name], name
        jobs = {job["job_name"] for job in config["scrape_configs"]}
        # The rules select the scrape jobs by these names.
        for rule in _alerting_rules().values():
            for job in re.findall(r'\bjob="([^"]+)"', rule["expr"]):
                assert job in jobs, (name, rule["alert"], job)
    config = stack.prometheus_config("127.0.0.1:9464", tmp_path / "ray" / "prom_metrics_service_discovery.json")
    assert config["rule_files"] == [str(ALERTS)]
    path = tmp_path / "stack" / "prometheus.yml"
    path.parent.mkdir()
    path.write_text(yaml.safe_dump(config))
    result = _promtool(prometheus_bin, "check", "config", path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{len(_alerting_rules())} rules found" in result.stdout


def test_alerts_use_only_metrics_and_label_values_that_exist():
    """A misspelt metric or label value is a rule that never fires, and promtool cannot tell: the names are the
    ones the code exports (as the dashboards' are), the reasons and outcomes the ones the code records."""
    from controller.scheduler import WAITING_REASONS
    from dreambooth.errors import FAILURE_REASONS

    expressions = [rule["expr"] for rule in _alerting_rules().values()]
    missing = _undefined_metrics(expressions)
    assert not missing, f"the alerts query metrics nothing defines: {missing}"
    app = (ROOT / "serving" / "app.py").read_text()
    known = {
        "reason": set(WAITING_REASONS) | set(FAILURE_REASONS),
        "outcome": set(re.findall(r'\boutcome(?:, \w+)? = "([a-z_]+)"', app)),
    }
    assert {"ok", "error", "overloaded", "unavailable"} <= known["outcome"]
    for expression in expressions:
        for label, value in re.findall(r'\b(reason|outcome)\s*(?:=~|!~|!=|=)\s*"([^"]*)"', expression):
            for alternative in value.split("|"):
                assert alternative in known[label], (label, alternative, expression)


def test_restart_alert_counts_as_the_dashboard_does():
    """Ray's counter appears at 1 with a node's first restart: the rule counts restarts as the Restarts panel does
    (events_in_window), one expression for both."""
    expr = " ".join(_alerting_rules()["DreamBoothTrainingRestarts"]["expr"].split())
    assert expr == f"{dashboards.events_in_window('ray_dreambooth_train_restarts_total')} > 2"


def _serve(outcome: str, values: str) -> dict:
    labels = f'application="dreambooth", deployment="Ingress", model_class="dog", outcome="{outcome}"'
    return {"series": f"ray_dreambooth_serve_requests_total{{{labels}}}", "values": values}


CONTROLLER = 'instance="127.0.0.1:9464", job="dreambooth-controller"'
# (what it shows, input series at 1-minute intervals, checks: (alert, eval time, [(labels, summary), ...]); the
# alert's severity is added to the labels). Each alert is checked on a failure and on healthy series next to it.
ALERT_CASES = [
    (
        "controller-down",
        [
            {"series": f"up{{{CONTROLLER}}}", "values": "1x10 0x30"},  # down from minute 11
            {"series": 'up{instance="10.0.0.1:8080", job="ray"}', "values": "1x40"},
        ],
        [
            ("DreamBoothControllerDown", "10m", []),
            ("DreamBoothControllerDown", "14m", []),  # pending: a restart takes less than 5 minutes
            (
                "DreamBoothControllerDown",
                "20m",
                [
                    (
                        {"instance": "127.0.0.1:9464", "job": "dreambooth-controller"},
                        "The dreambooth controller's /metrics does not answer (127.0.0.1:9464)",
                    )
                ],
            ),
            ("DreamBoothRayMetricsDown", "20m", []),
        ],
    ),
    (
        "controller-target-gone",  # in Kubernetes, the pod gone: no target, no `up` to be 0
        [{"series": 'up{instance="10.0.0.1:8080", job="ray"}', "values": "1x40"}],
        [
            (
                "DreamBoothControllerDown",
                "10m",
                [({"job": "dreambooth-controller"}, "The dreambooth controller's /metrics does not answer")],
            ),
        ],
    ),
    (
        "job-failures",
        [
            *(
                {"series": f'dreambooth_job_failures_total{{{CONTROLLER}, reason="{reason}"}}', "values": "0x100"}
                for reason in ("PLACEMENT_TIMEOUT", "RAY_JOB_FAILED")
            ),
            {
                "series": f'dreambooth_job_failures_total{{{CONTROLLER}, reason="TRAINING_FAILED"}}',
                "values": "0x20 1x80",
            },
            # Tenants' bad specs and photos are theirs to fix: never an alert.
            {"series": f'dreambooth_job_failures_total{{{CONTROLLER}, reason="INVALID_INPUT"}}', "values": "0+1x100"},
        ],
        [
            ("DreamBoothJobsFailing", "15m", []),
            (
                "DreamBoothJobsFailing",
                "30m",
                [({"reason": "TRAINING_FAILED"}, "1 training job(s) failed with TRAINING_FAILED in the last hour")],
            ),
            ("DreamBoothJobsFailing", "90m", []),  # an hour after the failure
        ],
    ),
    (
        "job-no-progress",
        [
            {"series": f'dreambooth_job_step{{{CONTROLLER}, job_id="job-a"}}', "values": "0+10x120"},  # training
            {"series": f'dreambooth_job_step{{{CONTROLLER}, job_id="job-b"}}', "values": "0+10x30 300x90"},  # hung
            {"series": f'dreambooth_job_step{{{CONTROLLER}, job_id="job-c"}}', "values": "0+10x20"},  # ended
            {"series": f'dreambooth_job_step{{{CONTROLLER}, job_id="job-d"}}', "values": "_x50 1x70"},  # new, then hung
        ],
        [
            ("DreamBoothJobNoProgress", "30m", []),
            ("DreamBoothJobNoProgress", "70m", []),  # job-b: 40 minutes at step 300, pending
            (
                "DreamBoothJobNoProgress",
                "80m",
                [
                    (
                        {"instance": "127.0.0.1:9464", "job": "dreambooth-controller", "job_id": "job-b"},
                        "Job job-b has been at step 300 for at least 45 minutes",
                    )
                ],
            ),
            (
                "DreamBoothJobNoProgress",
                "100m",
                [
                    (
                        {"instance": "127.0.0.1:9464", "job": "dreambooth-controller", "job_id": job_id},
                        f"Job {job_id} has been at step {step} for at least 45 minutes",
                    )
                    for job_id, step in (("job-b", 300), ("job-d", 1))
                ],
            ),
        ],
    ),
    (
        "jobs-queued",
        [
            {"series": f'dreambooth_queued_jobs{{{CONTROLLER}, reason="CLUSTER_UNAVAILABLE"}}', "values": "0x10 2x30"},
            {"series": f'dreambooth_queued_jobs{{{CONTROLLER}, reason="STORAGE_UNAVAILABLE"}}', "values": "0x40"},
            {"series": f'dreambooth_queued_jobs{{{CONTROLLER}, reason="TENANT_LIMIT"}}', "values": "4x150"},
            {"series": f'dreambooth_queued_jobs{{{CONTROLLER}, reason="WAITING_FOR_RESOURCES"}}', "values": "3x150"},
            # a busy cluster whose queue empties every 40 minutes
            {
                "series": f'dreambooth_queued_jobs{{{CONTROLLER}, reason="BEHIND_OTHER_JOB"}}',
                "values": "1x39 0 1x39 0 1x70",
            },
        ],
        [
            ("DreamBoothJobsQueuedClusterUnavailable", "15m", []),
            (
                "DreamBoothJobsQueuedClusterUnavailable",
                "25m",
                [
                    (
                        {"instance": "127.0.0.1:9464", "job": "dreambooth-controller", "reason": "CLUSTER_UNAVAILABLE"},
                        "2 queued job(s) cannot start: CLUSTER_UNAVAILABLE",
                    )
                ],
            ),
            ("DreamBoothJobsQueuedLong", "110m", []),
            (
                "DreamBoothJobsQueuedLong",
                "130m",
                [
                    (
                        {
                            "instance": "127.0.0.1:9464",
                            "job": "dreambooth-controller",
                            "reason": "WAITING_FOR_RESOURCES",
                        },
                        "Jobs have waited in the queue with WAITING_FOR_RESOURCES for 2 hours (3 now)",
                    )
                ],
            ),
        ],
    ),
    (
        "serving-not-applied",
        [
            {
                "series": f'dreambooth_serving_up_to_date{{{CONTROLLER}, application="dreambooth"}}',
                "values": "1x10 0x2 1x10 0x30",
            }
        ],
        [
            ("DreamBoothServingNotApplied", "20m", []),  # a deploy's minutes
            ("DreamBoothServingNotApplied", "30m", []),  # pending
            (
                "DreamBoothServingNotApplied",
                "40m",
                [
                    (
                        {"instance": "127.0.0.1:9464", "job": "dreambooth-controller", "application": "dreambooth"},
                        "Ray Serve has not run the deployed models of dreambooth for 10 minutes",
                    )
                ],
            ),
        ],
    ),
    (
        "serving-errors",
        [
            _serve("ok", "0+60x60"),  # 1 request/s
            _serve("not_found", "0+30x60"),  # clients' mistakes and tenants' limits: not the service's
            _serve("throttled", "0+30x60"),
            _serve("error", "0x20 1x10 1+12x30"),  # one 500 at minute 21, then 0.2/s from minute 32
            _serve("overloaded", "0x60"),
        ],
        [
            ("DreamBoothServeErrors", "24m", []),  # a stray 500
            ("DreamBoothServeErrors", "38m", []),  # pending
            (
                "DreamBoothServeErrors",
                "50m",
                [({}, "9.091% of generate requests fail with 5xx")],  # 0.2 of 2.2 requests/s
            ),
            ("DreamBoothServeOverloaded", "50m", []),
        ],
    ),
    (
        "serving-overloaded",
        [_serve("ok", "0+60x60"), _serve("overloaded", "0x10 0+30x50")],
        [
            ("DreamBoothServeErrors", "40m", []),
            (
                "DreamBoothServeOverloaded",
                "40m",
                [({}, "33.33% of generate requests are refused as overloaded (503)")],
            ),
        ],
    ),
    (
        "serve-replicas",
        [
            {
                "series": 'ray_serve_deployment_replica_healthy{application="dreambooth", deployment="Ingress"}',
                "values": "1x40",
            },
            {
                "series": 'ray_serve_deployment_replica_healthy{application="dreambooth", deployment="Generator"}',
                "values": "2x10 1x5 0x25",  # one replica lost, then the other
            },
        ],
        [
            ("DreamBoothServeNoHealthyReplicas", "20m", []),
            (
                "DreamBoothServeNoHealthyReplicas",
                "30m",
                [
                    (
                        {"application": "dreambooth", "deployment": "Generator"},
                        "Serve deployment dreambooth/Generator has no healthy replica",
                    )
                ],
            ),
        ],
    ),
    (
        "training-restarts",
        [
            # Ray's counter appears at 1 with a node's first restart; another node's restarts once, long ago.
            {"series": 'ray_dreambooth_train_restarts_total{instance="10.0.1.21:8080"}', "values": "_x60 1 2 3x60"},
            {"series": 'ray_dreambooth_train_restarts_total{instance="10.0.1.22:8080"}', "values": "1x120"},
        ],
        [
            ("DreamBoothTrainingRestarts", "50m", []),
            (
                "DreamBoothTrainingRestarts",
                "70m",
                [({}, "3 training runs resumed from a checkpoint in the last 30 minutes")],
            ),
            ("DreamBoothTrainingRestarts", "100m", []),
        ],
    ),
]


@pytest.mark.parametrize("series, checks", [case[1:] for case in ALERT_CASES], ids=[case[0] for case in ALERT_CASES])
def test_alerts_fire_on_failures_and_stay_silent_on_healthy_series(prometheus_bin, tmp_path, series, checks):
    """Prometheus' rule unit tests on alerts.yml. The rules are copied with their summary as their only annotation:
    promtool compares every annotation, and the summaries show that the templates read the right labels and values
    (`promtool check rules` parses the descriptions' templates)."""
    rules = _alerting_rules()
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    for group in groups:
        for rule in group["rules"]:
            rule["annotations"] = {"summary": rule["annotations"]["summary"]}
    rule_file = tmp_path / "alerts.yml"
    rule_file.write_text(yaml.safe_dump({"groups": groups}))
    tests = [
        {
            "alertname": name,
            "eval_time": eval_time,
            "exp_alerts": [
                {
                    "exp_labels": {**labels, "severity": rules[name]["labels"]["severity"]},
                    "exp_annotations": {"summary": summary},
                }
                for labels, summary in alerts
            ],
        }
        for name, eval_time, alerts in checks
    ]
    path = tmp_path / "alerts.test.yml"
    path.write_text(
        yaml.safe_dump(
            {
                "rule_files": [str(rule_file)],
                "evaluation_interval": "1m",
                "tests": [{"interval": "1m", "input_series": series, "alert_rule_test": tests}],
            }
        )
    )
    result = _promtool(prometheus_bin, "test", "rules", path)
    assert result.returncode == 0, result.stdout + result.stderr
