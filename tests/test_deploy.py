"""Static checks of the deployment files in deploy/ and k8s/: no Docker, cluster or network.

The Kubernetes overlays are rendered with ``kubectl kustomize``; built-in objects are validated
against the Kubernetes schemas bundled with ``kubernetes-validate``, and the KubeRay and
Prometheus Operator objects against the CRD schemas committed in ``k8s/crds``.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import tomllib
from functools import cache
from itertools import chain
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from packaging.requirements import Requirement
from ray.serve.schema import ServeDeploySchema

from serving import proxy_headers
from serving.settings import AppConfig

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = ROOT / "k8s"
OVERLAYS = ["cpu-dev", "gpu-prod", "cpu-direct"]
KUSTOMIZATIONS = [f"overlays/{name}" for name in OVERLAYS] + ["training"]
KUBERNETES_VERSIONS = ["1.30.0", "1.37.0"]  # the oldest and newest we claim to support
CRD_FILES = {
    ("ray.io/v1", "RayService"): "ray.io_rayservices.yaml",
    ("ray.io/v1", "RayJob"): "ray.io_rayjobs.yaml",
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "monitoring.coreos.com_servicemonitors.yaml",
}
MODELS_MOUNT = "/models"


@cache
def pyproject() -> dict[str, Any]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


@cache
def pins() -> dict[str, str]:
    """Every ``name==version`` in pyproject's dependencies and extras."""
    project = pyproject()["project"]
    found = {}
    for spec in chain(project["dependencies"], *project["optional-dependencies"].values()):
        requirement = Requirement(spec)
        if str(requirement.specifier).startswith("=="):
            found[requirement.name.lower()] = str(requirement.specifier)[2:]
    return found


# ---------------------------------------------------------------------------- Kubernetes


@cache
def render(kustomization: str) -> tuple[dict[str, Any], ...]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed: cannot render the kustomizations")
    result = subprocess.run(
        [kubectl, "kustomize", str(K8S / kustomization)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


def objects(kustomization: str, kind: str) -> list[dict[str, Any]]:
    return [obj for obj in render(kustomization) if obj["kind"] == kind]


def strict(schema: Any) -> Any:
    """The CRD schema with unknown fields refused, as ``kubectl apply --validate=strict`` does
    (the API server would otherwise drop them silently)."""
    if isinstance(schema, list):
        return [strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    schema = {key: strict(value) for key, value in schema.items()}
    if (
        "properties" in schema
        and "additionalProperties" not in schema
        and not schema.get("x-kubernetes-preserve-unknown-fields")
    ):
        schema["additionalProperties"] = False
    return schema


@cache
def crd_schema(api_version: str, kind: str) -> dict[str, Any]:
    crd = yaml.load((K8S / "crds" / CRD_FILES[api_version, kind]).read_text(), yaml.CSafeLoader)
    version = api_version.split("/")[1]
    (served,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
    return strict(served["schema"]["openAPIV3Schema"])


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_objects_match_their_schemas(kustomization: str) -> None:
    for obj in render(kustomization):
        where = f"{kustomization}: {obj['kind']}/{obj['metadata']['name']}"
        assert obj["metadata"].get("namespace") == "espro", where
        key = (obj["apiVersion"], obj["kind"])
        if key in CRD_FILES:
            validator = jsonschema.Draft7Validator(crd_schema(*key))
            errors = [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(obj)]
            assert not errors, f"{where}: {errors}"
            continue
        for version in KUBERNETES_VERSIONS:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as err:
                pytest.fail(f"{where} (Kubernetes {version}): {err.message} at {list(err.path)}")


def test_strict_crd_schema_refuses_unknown_fields() -> None:
    (service,) = objects("overlays/cpu-dev", "RayService")
    bad = json.loads(json.dumps(service))
    bad["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParmas"] = {}
    with pytest.raises(jsonschema.ValidationError, match="rayStartParmas"):
        jsonschema.Draft7Validator(crd_schema("ray.io/v1", "RayService")).validate(bad)


def serve_config(service: dict[str, Any]) -> dict[str, Any]:
    return yaml.safe_load(service["spec"]["serveConfigV2"])


def pods(cluster: dict[str, Any]) -> list[dict[str, Any]]:
    """The head's and every worker group's pod templates."""
    groups = [cluster["headGroupSpec"], *cluster.get("workerGroupSpecs", [])]
    return [group["template"] for group in groups]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_serve_config_is_the_espro_app(overlay: str) -> None:
    (service,) = objects(f"overlays/{overlay}", "RayService")
    config = serve_config(service)
    ServeDeploySchema.model_validate(config)
    reference = yaml.safe_load((DEPLOY / "serve.yaml").read_text())
    assert config["grpc_options"] == reference["grpc_options"]
    assert config["http_options"]["port"] == reference["http_options"]["port"]
    (app,) = config["applications"]
    (reference_app,) = reference["applications"]
    for key in ("name", "route_prefix", "import_path"):
        assert app[key] == reference_app[key], key
    args = AppConfig.model_validate(app["args"])
    assert "replicas" not in app["args"], "the deployment override sets the replicas"
    assert all(Path(path).is_relative_to(MODELS_MOUNT) for path in args.bundles)
    assert args.device == ("cuda" if overlay == "gpu-prod" else "cpu")
    # The deployment override names the one deployment build_app makes and sets its replicas:
    # autoscaled, except with the direct door, whose calls Serve's autoscaler does not see.
    (deployment,) = app["deployments"]
    assert deployment["name"] == "espro"
    if args.direct_grpc_port is None:
        assert set(deployment) == {"name", "autoscaling_config"}
        autoscaling = deployment["autoscaling_config"]
        assert autoscaling["target_ongoing_requests"] <= args.max_ongoing_requests
        fewest, most = autoscaling["min_replicas"], autoscaling["max_replicas"]
    else:
        assert set(deployment) == {"name", "num_replicas"}
        fewest = most = deployment["num_replicas"]
    # Ray's autoscaler can place max_replicas: enough worker CPUs (and GPUs) at maxReplicas.
    cluster = service["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True
    (workers,) = cluster["workerGroupSpecs"]
    limits = workers["template"]["spec"]["containers"][0]["resources"]["limits"]
    per_worker = int(limits["cpu"]) // args.num_cpus
    if args.device == "cuda":
        assert limits["nvidia.com/gpu"] == 1
        assert (
            workers["template"]["spec"]["containers"][0]["resources"]["requests"]["nvidia.com/gpu"]
            == limits["nvidia.com/gpu"]
        )
        per_worker = min(per_worker, limits["nvidia.com/gpu"])
    assert workers["minReplicas"] * per_worker >= fewest
    assert workers["maxReplicas"] * per_worker >= most
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_ray_pods_use_the_project_image_and_the_models_volume(kustomization: str) -> None:
    project = pyproject()["project"]
    ray_pin = pins()["ray"]
    clusters = [o["spec"]["rayClusterConfig"] for o in objects(kustomization, "RayService")]
    clusters += [o["spec"]["rayClusterSpec"] for o in objects(kustomization, "RayJob")]
    assert clusters
    for cluster in clusters:
        assert cluster["rayVersion"] == ray_pin
        for template in pods(cluster):
            spec = template["spec"]
            assert spec["securityContext"]["runAsNonRoot"] is True
            container = spec["containers"][0]
            # The training job's image carries the train extra (Dockerfile.cpu, EXTRAS).
            suffix = "-train" if kustomization == "training" else ""
            assert re.fullmatch(
                rf"espro:{re.escape(project['version'])}-(cpu|gpu){suffix}", container["image"]
            )
            assert {"cpu", "memory"} <= set(container["resources"]["requests"])
            assert {"cpu", "memory"} <= set(container["resources"]["limits"])
            (volume,) = spec["volumes"]
            assert volume["persistentVolumeClaim"]["claimName"] == "espro-models"
            (mount,) = container["volumeMounts"]
            assert mount["name"] == volume["name"] and mount["mountPath"] == MODELS_MOUNT


KUBERAY_LABELS = {
    "head": {"ray.io/is-ray-node": "yes", "ray.io/node-type": "head"},
    "worker": {"ray.io/is-ray-node": "yes", "ray.io/node-type": "worker"},
}
"""The labels KubeRay adds to every Ray pod it creates."""


def selected(cluster: dict[str, Any], selector: dict[str, str]) -> set[str]:
    """Which of ``head`` and ``worker`` pods ``selector`` selects, with KubeRay's labels."""
    head, *workers = pods(cluster)
    labelled = [("head", head)] + [("worker", worker) for worker in workers]
    return {
        kind
        for kind, template in labelled
        if selector.items() <= (template["metadata"]["labels"] | KUBERAY_LABELS[kind]).items()
    }


def container_ports(template: dict[str, Any]) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in template["spec"]["containers"][0]["ports"]}


def service(overlay: str, name: str) -> dict[str, Any]:
    (found,) = [s for s in objects(overlay, "Service") if s["metadata"]["name"] == name]
    return found


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_services_monitoring_and_budget_select_the_serving_pods(overlay: str) -> None:
    (ray_service,) = objects(f"overlays/{overlay}", "RayService")
    (pvc,) = objects(f"overlays/{overlay}", "PersistentVolumeClaim")
    assert pvc["metadata"]["name"] == "espro-models"
    cluster = ray_service["spec"]["rayClusterConfig"]
    head, *workers = pods(cluster)
    # KubeRay's <name>-serve-svc exposes the head container's `serve` and `serve-*` ports.
    head_ports = container_ports(head)
    assert head_ports["serve"] == 8000 and head_ports["serve-grpc"] == 9000
    assert head_ports["metrics"] == 8080
    (app,) = serve_config(ray_service)["applications"]
    direct = AppConfig.model_validate(app["args"]).direct_grpc_port
    for worker in workers:
        expected = {"metrics": 8080, "serve": 8000, "serve-grpc": 9000}
        assert container_ports(worker) == expected | ({"direct-grpc": direct} if direct else {})
        probe = worker["spec"]["containers"][0]["readinessProbe"]["httpGet"]
        assert probe == {"path": "/v2/health/ready", "port": "serve"}
    metrics = service(f"overlays/{overlay}", "espro-metrics")
    assert selected(cluster, metrics["spec"]["selector"]) == {"head", "worker"}
    (port,) = metrics["spec"]["ports"]
    assert (port["port"], port["targetPort"]) == (8080, "metrics")
    (monitor,) = objects(f"overlays/{overlay}", "ServiceMonitor")
    assert (
        monitor["spec"]["selector"]["matchLabels"].items() <= metrics["metadata"]["labels"].items()
    )
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == [port["name"]]
    (budget,) = objects(f"overlays/{overlay}", "PodDisruptionBudget")
    assert selected(cluster, budget["spec"]["selector"]["matchLabels"]) == {"worker"}


def test_the_direct_overlay_exposes_every_replicas_direct_door() -> None:
    """The replicas run on the workers only (the head has no CPUs for them), each listening
    on the pod's network; a Service reaches that port on every worker."""
    (ray_service,) = objects("overlays/cpu-direct", "RayService")
    (app,) = serve_config(ray_service)["applications"]
    args = AppConfig.model_validate(app["args"])
    assert args.direct_grpc_port is not None and args.direct_grpc_host == "0.0.0.0"
    cluster = ray_service["spec"]["rayClusterConfig"]
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    door = service("overlays/cpu-direct", "espro-direct-grpc")
    assert selected(cluster, door["spec"]["selector"]) == {"worker"}
    (port,) = door["spec"]["ports"]
    assert (port["port"], port["targetPort"]) == (args.direct_grpc_port, "direct-grpc")
    for overlay in ("cpu-dev", "gpu-prod"):  # the door stays off unless asked for
        (other,) = objects(f"overlays/{overlay}", "RayService")
        (other_app,) = serve_config(other)["applications"]
        assert AppConfig.model_validate(other_app["args"]).direct_grpc_port is None


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_ray_clusters_authenticate_with_a_token(kustomization: str) -> None:
    clusters = [o["spec"]["rayClusterConfig"] for o in objects(kustomization, "RayService")]
    clusters += [o["spec"]["rayClusterSpec"] for o in objects(kustomization, "RayJob")]
    assert clusters and all(c["authOptions"] == {"mode": "token"} for c in clusters)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_only_the_doors_and_metrics_are_open_beyond_the_ray_pods(overlay: str) -> None:
    """Every serving pod runs Serve's proxy with the middleware that drops client timeout
    headers, and the network policy selects every Ray pod and admits, from outside them,
    only the doors, the metrics and the KubeRay operator on the head's dashboard."""
    (ray_service,) = objects(f"overlays/{overlay}", "RayService")
    cluster = ray_service["spec"]["rayClusterConfig"]
    for template in pods(cluster):
        (container,) = template["spec"]["containers"]
        env = {e["name"]: e["value"] for e in container["env"]}
        assert env["RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"] == proxy_headers.CALLBACK
    (policy,) = objects(f"overlays/{overlay}", "NetworkPolicy")
    spec = policy["spec"]
    assert selected(cluster, spec["podSelector"]["matchLabels"]) == {"head", "worker"}
    assert spec["policyTypes"] == ["Ingress"]
    (app,) = serve_config(ray_service)["applications"]
    direct = AppConfig.model_validate(app["args"]).direct_grpc_port
    doors = {8000, 9000, 8080} | ({direct} if direct else set())
    open_ports, operator = set(), set()
    for rule in spec["ingress"]:
        ports = {p["port"] for p in rule.get("ports", [])}
        if "from" not in rule:
            open_ports |= ports
            continue
        (peer,) = rule["from"]
        labels = peer["podSelector"]["matchLabels"]
        if labels == {"app.kubernetes.io/name": "kuberay-operator"}:
            operator |= ports
        else:  # every port, but only from the cluster's own pods
            assert "namespaceSelector" not in peer and not ports
            assert selected(cluster, labels) == {"head", "worker"}
    assert open_ports == doors
    assert operator == {8265}


def test_training_job_writes_a_bundle_to_the_volume() -> None:
    (job,) = objects("training", "RayJob")
    command = shlex.split(job["spec"]["entrypoint"])
    assert command[:2] == ["espro", "train"]
    output = command[command.index("-o") + 1]
    assert Path(output).is_relative_to(MODELS_MOUNT)
    (head,) = pods(job["spec"]["rayClusterSpec"])
    (mount,) = head["spec"]["containers"][0]["volumeMounts"]
    assert not mount.get("readOnly")
    assert job["spec"]["shutdownAfterJobFinishes"] is True


# ---------------------------------------------------------------------------- images


def dockerfile(name: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of each instruction, continuation lines joined."""
    text = re.sub(r"\\\n", " ", (DEPLOY / name).read_text())
    instructions = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            instruction, _, arguments = line.partition(" ")
            instructions.append((instruction.upper(), arguments.strip()))
    return instructions


@pytest.mark.parametrize(
    ("name", "extras"), [("Dockerfile.cpu", "serving"), ("Dockerfile.gpu", "serving,onnx")]
)
def test_dockerfile(name: str, extras: str) -> None:
    instructions = dockerfile(name)
    for instruction, arguments in instructions:
        if instruction == "FROM":
            image = arguments.split()[0]
            assert ":" in image and not image.endswith(":latest"), f"unpinned base {image}"
    runs = " && ".join(arguments for instruction, arguments in instructions if instruction == "RUN")
    # The project is installed from pyproject.toml, so its pins are the image's; any package
    # a Dockerfile names itself carries the same pin.
    args = dict(a.split("=", 1) for i, a in instructions if i == "ARG" and "=" in a)
    installed = re.search(r"pip install --no-cache-dir [\"']\.\[([^\]]+)\][\"']", runs)
    assert installed, runs
    assert installed[1].replace("${EXTRAS}", args.get("EXTRAS", "")) == extras
    for package, version in re.findall(r"([A-Za-z0-9_.\-\[\]]+)==([^\s'\"]+)", runs):
        assert pins()[Requirement(package).name.lower()] == version, package
    if name == "Dockerfile.cpu":
        assert "--index-url https://download.pytorch.org/whl/cpu" in runs
    else:
        assert "download.pytorch.org" not in runs  # PyPI's default CUDA wheel
    # Never a bundle in the image: only the sources pip needs and the entrypoint.
    allowed = {"pyproject.toml", "README.md", "serving", "training", "deploy/entrypoint.sh"}
    for instruction, arguments in instructions:
        if instruction in {"ADD", "COPY"}:
            words = [w for w in arguments.split() if not w.startswith("--")]
            if "--from=" in arguments:
                assert words == ["/opt/venv", "/opt/venv"]
                continue
            assert instruction == "COPY" and set(words[:-1]) <= allowed, arguments
    users = [arguments for instruction, arguments in instructions if instruction == "USER"]
    assert users and users[-1] not in {"root", "0"}
    (healthcheck,) = [a for i, a in instructions if i == "HEALTHCHECK"]
    assert "http://127.0.0.1:8000/v2/health/ready" in healthcheck
    (entrypoint,) = [a for i, a in instructions if i == "ENTRYPOINT"]
    assert json.loads(entrypoint) == ["espro-entrypoint"]
    exposed = {int(port) for i, a in instructions if i == "EXPOSE" for port in a.split()}
    assert exposed == {8000, 9000, 8080}


def bundle_archive(directory: Path, members: dict[str, bytes], prefix: str = "") -> Path:
    archive = directory / "bundle.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(prefix + name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return archive


def run_entrypoint(
    tmp_path: Path, archive: Path, sha256: str | None
) -> subprocess.CompletedProcess:
    """deploy/entrypoint.sh with a stub `espro` that records its arguments."""
    stub = tmp_path / "bin"
    stub.mkdir(exist_ok=True)
    (stub / "espro").write_text(f'#!/bin/sh\necho "$@" > {tmp_path / "args"}\n')
    (stub / "espro").chmod(0o755)
    env = {
        "PATH": f"{stub}:{Path(sys.executable).parent}:/usr/bin:/bin",
        "ESPRO_BUNDLE_URL": archive.as_uri(),
        "ESPRO_BUNDLE_DIR": str(tmp_path / "models" / "bundle"),
    }
    if sha256:
        env["ESPRO_BUNDLE_SHA256"] = sha256
    return subprocess.run(
        [
            "sh",
            str(DEPLOY / "entrypoint.sh"),
            str(tmp_path / "models" / "bundle"),
            "--replicas",
            "2",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize("prefix", ["", "mnist1d-demo/"])
def test_entrypoint_fetches_and_verifies_the_bundle(tmp_path: Path, prefix: str) -> None:
    files = {"manifest.json": b"{}", "vertices.safetensors": b"tensors"}
    archive = bundle_archive(tmp_path, files, prefix)
    wrong = run_entrypoint(tmp_path, archive, "0" * 64)
    assert wrong.returncode != 0 and "sha256" in wrong.stderr
    assert not (tmp_path / "models" / "bundle").exists() and not (tmp_path / "args").exists()
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    result = run_entrypoint(tmp_path, archive, digest)
    assert result.returncode == 0, result.stderr
    for name, data in files.items():
        assert (tmp_path / "models" / "bundle" / name).read_bytes() == data
    assert [p.name for p in (tmp_path / "models").iterdir()] == ["bundle"]  # no leftovers
    args = (tmp_path / "args").read_text().split()
    assert args == [
        "serve",
        "--host",
        "0.0.0.0",
        str(tmp_path / "models" / "bundle"),
        "--replicas",
        "2",
    ]


def test_entrypoint_refuses_paths_outside_the_bundle(tmp_path: Path) -> None:
    archive = bundle_archive(tmp_path, {"manifest.json": b"{}", "../escape": b"x"})
    result = run_entrypoint(tmp_path, archive, None)
    assert result.returncode != 0 and "refusing" in result.stderr
    assert not (tmp_path / "escape").exists() and not (tmp_path / "args").exists()


# ---------------------------------------------------------------------------- local stack


def test_compose_stack() -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) == {"espro", "prometheus", "grafana"}
    espro = services["espro"]
    assert (DEPLOY / espro["build"]["context"] / espro["build"]["dockerfile"]).is_file()
    for service in services.values():
        image = service["image"]
        assert ":" in image and not image.endswith(":latest"), image
    assert espro["image"] == f"espro:{pyproject()['project']['version']}-cpu"
    assert {p.rsplit(":", 1)[1] for p in espro["ports"]} == {"8000", "9000"}
    assert all(p.startswith("127.0.0.1:") for s in services.values() for p in s["ports"])
    # Prometheus scrapes Ray's metrics port of the espro service.
    mounts = dict(v.split(":")[:2] for v in services["prometheus"]["volumes"])
    assert mounts["./prometheus/prometheus.yml"] == "/etc/prometheus/prometheus.yml"
    prometheus = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    targets = [
        t
        for job in prometheus["scrape_configs"]
        for s in job["static_configs"]
        for t in s["targets"]
    ]
    assert targets == ["espro:8080"]
    # Grafana provisions the Prometheus data source the dashboard names, and the dashboard.
    mounts = dict(v.split(":")[:2] for v in services["grafana"]["volumes"])
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"
    provisioning = DEPLOY / "grafana" / "provisioning"
    (source,) = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())[
        "datasources"
    ]
    assert source["url"] == "http://prometheus:9090"
    (provider,) = yaml.safe_load((provisioning / "dashboards" / "espro.yml").read_text())[
        "providers"
    ]
    assert mounts["./grafana/dashboards"] == provider["options"]["path"]
    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "espro.json").read_text())
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == source["uid"]


def test_dashboard_queries_espro_metrics() -> None:
    source = (ROOT / "serving" / "app" / "metrics.py").read_text()
    metrics = {f"ray_{name}" for name in re.findall(r"\"(espro_[a-z_]+)\"", source)}
    assert len(metrics) == 13
    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "espro.json").read_text())
    used = set()
    for panel in dashboard["panels"]:
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            names = set(re.findall(r"\bray_espro_[a-z_]+", target["expr"]))
            assert names, f"{panel['title']}: {target['expr']}"
            for name in names:
                base = re.sub(r"_(bucket|sum|count)$", "", name)
                assert base in metrics, f"{panel['title']}: unknown metric {name}"
                used.add(base)
    assert used == metrics, f"not on the dashboard: {sorted(metrics - used)}"


def test_entrypoint_is_executable_shell() -> None:
    script = DEPLOY / "entrypoint.sh"
    assert os.access(script, os.X_OK)
    subprocess.run(["sh", "-n", str(script)], check=True, timeout=10)
