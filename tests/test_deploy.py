"""Static checks of the deployment files in deploy/ and k8s/: no Docker, cluster or network.

The Kubernetes overlays are rendered with ``kubectl kustomize``; built-in objects are validated
against the Kubernetes schemas bundled with ``kubernetes-validate``, and the KubeRay and
Prometheus Operator objects against the CRD schemas committed in ``k8s/crds``.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import tomllib
from functools import cache
from itertools import chain
from pathlib import Path, PurePosixPath
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from ray.serve.schema import ServeDeploySchema

from serving import proxy_headers
from serving.fetch import is_url
from serving.settings import AppConfig, LaunchConfig

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
    ("monitoring.coreos.com/v1", "PrometheusRule"): "monitoring.coreos.com_prometheusrules.yaml",
}
MODELS_MOUNT = "/models"
BUNDLE_STORE_SECRET = "espro-bundle-store"


@cache
def pyproject() -> dict[str, Any]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


@cache
def pins() -> dict[str, str]:
    """Every ``name==version`` of constraints.txt, by canonical name: the exact versions that
    the images, CI and the README's commands install."""
    found = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            requirement = Requirement(line)
            (specifier,) = requirement.specifier
            assert specifier.operator == "==" and not requirement.extras, line
            name = canonicalize_name(requirement.name)
            assert name not in found, f"{name} twice in constraints.txt"
            found[name] = specifier.version
    return found


def declared(path: Path) -> list[Requirement]:
    """Every requirement of a pyproject.toml: dependencies and every extra's."""
    project = tomllib.loads(path.read_text())["project"]
    specs = chain(project["dependencies"], *project.get("optional-dependencies", {}).values())
    return [Requirement(spec) for spec in specs]


PYPROJECTS = [ROOT / "pyproject.toml", ROOT / "clients" / "python" / "pyproject.toml"]


@pytest.mark.parametrize("path", PYPROJECTS, ids=["espro", "espro-client"])
def test_dependencies_are_ranges_pinned_in_the_constraints(path: Path) -> None:
    """A library declares compatible ranges (an exact pin would clash with the versions of an
    application that installs it); constraints.txt pins, for every direct dependency, one
    version inside its range."""
    project = tomllib.loads(path.read_text())["project"]
    python = SpecifierSet(project["requires-python"])
    assert "3.11" in python and all(s.operator in {">=", "~="} for s in python), python
    for requirement in declared(path):
        name = canonicalize_name(requirement.name)
        if name == "espro":  # dev's own extras
            continue
        operators = {s.operator for s in requirement.specifier}
        assert operators & {">=", "~="} and not operators & {"==", "==="}, str(requirement)
        assert name in pins(), f"{name} is not in constraints.txt"
        assert requirement.specifier.contains(pins()[name]), (str(requirement), pins()[name])


def test_every_install_command_uses_the_constraints() -> None:
    """The READMEs' commands, CI and the docs install the tested versions."""
    commands = []
    readmes = [ROOT / "README.md", ROOT / "clients" / "python" / "README.md"]
    for path in [*readmes, ROOT / ".ci" / "run", *sorted((ROOT / "docs").glob("*.md"))]:
        for line in path.read_text().splitlines():
            line = line.strip().strip("`")
            # `pip install` of the project or the client from the repository; a published
            # espro-client and the KServe benchmark's separate environment are not ours to pin.
            if re.search(r"pip install .*(-e |'\.\[|clients/python)", line) and not re.search(
                r"--no-deps|kserve", line
            ):
                commands.append((path.name, line))
    assert len(commands) >= 5, commands
    for name, line in commands:
        # CI's lowest-versions job pins the client's own dependencies at their floors and
        # everything else as constraints.txt does (.ci/lowest-client-pins prints that file).
        lowest = re.search(r"\.ci/lowest-client-pins > (\S+/constraints\.txt)\b", line)
        constraints = lowest[1] if lowest else "constraints.txt"
        assert f"-c {constraints}" in line, f"{name}: {line}"


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
    # Bundle URLs that every replica fetches itself, or paths on a volume every Ray pod mounts.
    mounted = all(
        any(m["mountPath"] == MODELS_MOUNT for m in pod["spec"]["containers"][0]["volumeMounts"])
        for pod in pods(service["spec"]["rayClusterConfig"])
    )
    for bundle in args.bundles:
        if is_url(bundle):
            assert bundle.split("://")[0] in {"s3", "gs", "https"}, bundle
        else:
            assert Path(bundle).is_relative_to(MODELS_MOUNT) and mounted, bundle
    assert args.device == ("cuda" if overlay == "gpu-prod" else "cpu")
    # The deployment entry names the one deployment build_app makes and holds Serve's options:
    # autoscaled replicas, except with direct doors, whose calls Serve's autoscaler does not
    # see; a GPU per replica exactly when the device is CUDA.
    (deployment,) = app["deployments"]
    assert deployment["name"] == "espro"
    actor = deployment["ray_actor_options"]
    assert actor["num_gpus"] == (1 if args.device == "cuda" else 0)
    assert deployment["max_ongoing_requests"] >= args.max_batch_size
    if not direct_ports(args):
        autoscaling = deployment["autoscaling_config"]
        assert "num_replicas" not in deployment
        assert autoscaling["target_ongoing_requests"] <= deployment["max_ongoing_requests"]
        fewest, most = autoscaling["min_replicas"], autoscaling["max_replicas"]
    else:
        assert "autoscaling_config" not in deployment
        fewest = most = deployment["num_replicas"]
    # Ray's autoscaler can place max_replicas: enough worker CPUs (and GPUs) at maxReplicas.
    cluster = service["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True
    (workers,) = cluster["workerGroupSpecs"]
    limits = workers["template"]["spec"]["containers"][0]["resources"]["limits"]
    per_worker = int(limits["cpu"]) // actor["num_cpus"]
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
def test_ray_pods_use_the_project_image_and_any_models_volume(kustomization: str) -> None:
    """Every Ray pod runs the project's image; a pod that mounts /models mounts the
    espro-models PVC there; the RayService's pods read the bundle store's credentials from
    their optional Secret."""
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
            for mount in container["volumeMounts"]:
                if mount["mountPath"] == MODELS_MOUNT:
                    (volume,) = [v for v in spec["volumes"] if v["name"] == mount["name"]]
                    assert volume["persistentVolumeClaim"]["claimName"] == "espro-models"
    for service in objects(kustomization, "RayService"):
        for template in pods(service["spec"]["rayClusterConfig"]):
            secret = {"secretRef": {"name": BUNDLE_STORE_SECRET, "optional": True}}
            assert template["spec"]["containers"][0]["envFrom"] == [secret]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_only_the_dev_overlay_has_a_models_volume(overlay: str) -> None:
    """Replicas fetch bundle URLs into $HOME, so no overlay needs a volume; cpu-dev adds
    one (k8s/components/models-volume) for bundles trained in the cluster, ReadWriteOnce as
    one node's pods can share it."""
    claims = objects(f"overlays/{overlay}", "PersistentVolumeClaim")
    if overlay == "cpu-dev":
        (pvc,) = claims
        assert pvc["metadata"]["name"] == "espro-models"
        assert pvc["spec"]["accessModes"] == ["ReadWriteOnce"]
    else:
        assert claims == []


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
    cluster = ray_service["spec"]["rayClusterConfig"]
    head, *workers = pods(cluster)
    # KubeRay's <name>-serve-svc exposes the head container's `serve` and `serve-*` ports.
    head_ports = container_ports(head)
    assert head_ports["serve"] == 8000 and head_ports["serve-grpc"] == 9000
    assert head_ports["metrics"] == 8080
    (app,) = serve_config(ray_service)["applications"]
    direct = direct_ports(AppConfig.model_validate(app["args"]))
    for worker in workers:
        expected = {"metrics": 8080, "serve": 8000, "serve-grpc": 9000}
        assert container_ports(worker) == expected | direct
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


def direct_ports(args: AppConfig) -> dict[str, int]:
    """The container port names and numbers of the direct doors ``args`` turns on."""
    ports = {"direct-grpc": args.direct_grpc_port, "direct-http": args.direct_http_port}
    return {name: port for name, port in ports.items() if port is not None}


def test_the_direct_overlay_exposes_every_replicas_direct_doors() -> None:
    """The replicas run on the workers only (the head has no CPUs for them), each listening
    on the pod's network; a Service per door reaches its port on every worker."""
    (ray_service,) = objects("overlays/cpu-direct", "RayService")
    (app,) = serve_config(ray_service)["applications"]
    args = AppConfig.model_validate(app["args"])
    assert args.direct_host == "0.0.0.0"
    cluster = ray_service["spec"]["rayClusterConfig"]
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    assert direct_ports(args).keys() == {"direct-grpc", "direct-http"}
    for name, number in direct_ports(args).items():
        door = service("overlays/cpu-direct", f"espro-{name}")
        assert selected(cluster, door["spec"]["selector"]) == {"worker"}
        (port,) = door["spec"]["ports"]
        assert (port["port"], port["targetPort"]) == (number, name)
    for overlay in ("cpu-dev", "gpu-prod"):  # the doors stay off unless asked for
        (other,) = objects(f"overlays/{overlay}", "RayService")
        (other_app,) = serve_config(other)["applications"]
        assert not direct_ports(AppConfig.model_validate(other_app["args"]))


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
    direct = direct_ports(AppConfig.model_validate(app["args"]))
    doors = {8000, 9000, 8080, *direct.values()}
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
    mounts = head["spec"]["containers"][0]["volumeMounts"]
    (mount,) = [m for m in mounts if m["mountPath"] == MODELS_MOUNT]
    assert not mount.get("readOnly")
    assert job["spec"]["shutdownAfterJobFinishes"] is True


# Pod Security Standards, "restricted" profile (which includes "baseline"), as of Kubernetes
# 1.30: https://kubernetes.io/docs/concepts/security/pod-security-standards/
RESTRICTED_VOLUMES = {
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "persistentVolumeClaim",
    "projected",
    "secret",
}
SAFE_SYSCTLS = {
    "kernel.shm_rmid_forced",
    "net.ipv4.ip_local_port_range",
    "net.ipv4.ip_unprivileged_port_start",
    "net.ipv4.tcp_syncookies",
    "net.ipv4.ping_group_range",
    "net.ipv4.ip_local_reserved_ports",
    "net.ipv4.tcp_keepalive_time",
    "net.ipv4.tcp_fin_timeout",
    "net.ipv4.tcp_keepalive_intvl",
    "net.ipv4.tcp_keepalive_probes",
}
SELINUX_TYPES = {"", "container_t", "container_init_t", "container_kvm_t", "container_engine_t"}


def restricted_violations(spec: dict[str, Any]) -> list[str]:
    """What in a pod spec the Pod Security "restricted" profile refuses."""
    found = []
    pod = spec.get("securityContext") or {}
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(key):
            found.append(key)
    for volume in spec.get("volumes", []):
        if kinds := set(volume) - {"name"} - RESTRICTED_VOLUMES:
            found.append(f"volume {volume['name']}: {sorted(kinds)}")
    for sysctl in pod.get("sysctls", []):
        if sysctl["name"] not in SAFE_SYSCTLS:
            found.append(f"sysctl {sysctl['name']}")

    def common(where: str, context: dict[str, Any]) -> None:
        if context.get("runAsUser") == 0:
            found.append(f"{where}: runAsUser 0")
        selinux = context.get("seLinuxOptions") or {}
        if selinux.get("type", "") not in SELINUX_TYPES or {"user", "role"} & set(selinux):
            found.append(f"{where}: seLinuxOptions")
        if (context.get("appArmorProfile") or {}).get("type") == "Unconfined":
            found.append(f"{where}: appArmorProfile Unconfined")
        if (context.get("windowsOptions") or {}).get("hostProcess"):
            found.append(f"{where}: hostProcess")

    common("pod", pod)
    containers = [
        *spec.get("containers", []),
        *spec.get("initContainers", []),
        *spec.get("ephemeralContainers", []),
    ]
    for container in containers:
        where = f"container {container['name']}"
        context = container.get("securityContext") or {}
        common(where, context)
        if context.get("privileged"):
            found.append(f"{where}: privileged")
        if context.get("allowPrivilegeEscalation") is not False:
            found.append(f"{where}: allowPrivilegeEscalation is not false")
        capabilities = context.get("capabilities") or {}
        if "ALL" not in capabilities.get("drop", []):
            found.append(f"{where}: capabilities not dropped")
        if set(capabilities.get("add", [])) - {"NET_BIND_SERVICE"}:
            found.append(f"{where}: capabilities added")
        if context.get("runAsNonRoot", pod.get("runAsNonRoot")) is not True:
            found.append(f"{where}: runAsNonRoot is not true")
        seccomp = (context.get("seccompProfile") or pod.get("seccompProfile") or {}).get("type")
        if seccomp not in {"RuntimeDefault", "Localhost"}:
            found.append(f"{where}: seccompProfile {seccomp}")
        if context.get("procMount", "Default") != "Default":
            found.append(f"{where}: procMount")
        if any(port.get("hostPort") for port in container.get("ports", [])):
            found.append(f"{where}: hostPort")
    return found


def ray_pod_specs(kustomization: str) -> list[tuple[str, dict[str, Any]]]:
    """Every pod that a kustomization makes Kubernetes or KubeRay create, as KubeRay 1.7
    builds them from the templates: the autoscaler sidecar on the head (the security context
    and mounts of ``autoscalerOptions``), a RayJob's submitter pod (``submitterPodTemplate``,
    or KubeRay's default one with no security context), and the built-in kinds' templates.
    KubeRay's own init container on workers copies the Ray container's security context."""
    found = []
    for obj in render(kustomization):
        kind, name = obj["kind"], obj["metadata"]["name"]
        spec = obj.get("spec", {})
        cluster = spec.get("rayClusterConfig") or spec.get("rayClusterSpec")
        if cluster is not None:
            head, *workers = pods(cluster)
            head_spec = json.loads(json.dumps(head["spec"]))
            if cluster.get("enableInTreeAutoscaling"):
                options = cluster.get("autoscalerOptions") or {}
                head_spec["containers"].append(
                    {
                        "name": "autoscaler",
                        "securityContext": options.get("securityContext"),
                        "volumeMounts": options.get("volumeMounts", []),
                    }
                )
            default_submitter = {"name": "ray-job-submitter"}  # KubeRay's: no security context
            mode = spec.get("submissionMode", "K8sJobMode")
            if kind == "RayJob" and mode == "SidecarMode":
                head_spec["containers"].append(default_submitter)
            found.append((f"{kind}/{name} head", head_spec))
            found += [(f"{kind}/{name} worker", worker["spec"]) for worker in workers]
            if kind == "RayJob" and mode == "K8sJobMode":
                template = spec.get("submitterPodTemplate") or {
                    "spec": {"containers": [default_submitter]}
                }
                found.append((f"{kind}/{name} submitter", template["spec"]))
        elif "template" in spec:  # Deployment, StatefulSet, DaemonSet, Job
            found.append((f"{kind}/{name}", spec["template"]["spec"]))
        elif "jobTemplate" in spec:
            found.append((f"{kind}/{name}", spec["jobTemplate"]["spec"]["template"]["spec"]))
    return found


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_every_pod_meets_pod_security_restricted(kustomization: str) -> None:
    specs = ray_pod_specs(kustomization)
    assert specs
    for where, spec in specs:
        assert not restricted_violations(spec), f"{kustomization}: {where}"


def test_the_restricted_check_refuses_what_the_profile_refuses() -> None:
    (service,) = objects("overlays/cpu-dev", "RayService")
    (head,) = pods({"headGroupSpec": service["spec"]["rayClusterConfig"]["headGroupSpec"]})
    assert not restricted_violations(head["spec"])
    for change, expected in [
        (lambda s: s["securityContext"].pop("seccompProfile"), "seccompProfile None"),
        (lambda s: s["securityContext"].pop("runAsNonRoot"), "runAsNonRoot is not true"),
        (lambda s: s["containers"][0]["securityContext"].pop("capabilities"), "not dropped"),
        (
            lambda s: s["containers"][0]["securityContext"].update(allowPrivilegeEscalation=True),
            "allowPrivilegeEscalation",
        ),
        (lambda s: s["volumes"].append({"name": "h", "hostPath": {"path": "/"}}), "hostPath"),
        (lambda s: s.update(hostNetwork=True), "hostNetwork"),
    ]:
        spec = json.loads(json.dumps(head["spec"]))
        change(spec)
        assert any(expected in v for v in restricted_violations(spec)), expected


def image_home() -> str:
    """The home directory of the images' user (deploy/Dockerfile.*: useradd --create-home)."""
    homes = set()
    for name in ("Dockerfile.cpu", "Dockerfile.gpu"):
        runs = " ".join(a for i, a in dockerfile(name) if i == "RUN")
        user = re.search(r"useradd --create-home --uid 1000 --user-group (\w+)", runs)
        assert user, name
        homes.add(f"/home/{user[1]}")
    (home,) = homes
    return home


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_root_filesystems_are_read_only_with_writable_scratch(kustomization: str) -> None:
    """Every container's root filesystem is read-only; what Ray and espro write lies on
    emptyDir volumes: /tmp (Ray's session under /tmp/ray among it) and $HOME (caches). With
    the autoscaler, the head's /tmp/ray is the `ray-logs` volume, which KubeRay then mounts
    into the autoscaler too instead of adding one of its own."""
    for where, spec in ray_pod_specs(kustomization):
        empty = {v["name"] for v in spec.get("volumes", []) if "emptyDir" in v}
        for container in spec["containers"]:
            context = container.get("securityContext") or {}
            assert context.get("readOnlyRootFilesystem") is True, f"{where}: {container['name']}"
            mounts = {
                m["mountPath"]: m["name"]
                for m in container.get("volumeMounts", [])
                if m["name"] in empty and not m.get("readOnly")
            }
            assert {"/tmp", image_home()} <= set(mounts), f"{where}: {container['name']}"
        if any(c["name"] == "autoscaler" for c in spec["containers"]):
            ray_mounts = {m["mountPath"]: m["name"] for m in spec["containers"][0]["volumeMounts"]}
            assert ray_mounts["/tmp/ray"] == "ray-logs", where


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_upgrades_and_failures(overlay: str) -> None:
    """An upgrade strategy that KubeRay knows, and in gpu-prod one that never brings up a
    second GPU cluster by itself; in gpu-prod, GCS fault tolerance with the Redis password
    from a Secret; workers spread over nodes and zones, preferably."""
    (ray_service,) = objects(f"overlays/{overlay}", "RayService")
    strategy = ray_service["spec"]["upgradeStrategy"]
    assert strategy["type"] in {"NewCluster", "NewClusterWithIncrementalUpgrade", "None"}
    if strategy["type"] == "NewClusterWithIncrementalUpgrade":
        assert strategy["clusterUpgradeOptions"]["maxSurgePercent"] < 100
    else:
        assert "clusterUpgradeOptions" not in strategy
    cluster = ray_service["spec"]["rayClusterConfig"]
    if overlay == "gpu-prod":
        assert strategy["type"] == "None"
        fault_tolerance = cluster["gcsFaultToleranceOptions"]
        assert fault_tolerance.get("backend", "redis") == "redis"
        assert fault_tolerance["redisAddress"]
        password = fault_tolerance["redisPassword"]
        assert set(password) == {"valueFrom"} and "secretKeyRef" in password["valueFrom"]
        # KubeRay sets the Redis address and password on the head itself.
        head_env = {e["name"] for e in pods(cluster)[0]["spec"]["containers"][0]["env"]}
        assert not head_env & {"RAY_REDIS_ADDRESS", "REDIS_PASSWORD"}
    for group in cluster["workerGroupSpecs"]:
        spec = group["template"]["spec"]
        keys = set()
        for constraint in spec["topologySpreadConstraints"]:
            workers = {"headGroupSpec": cluster["headGroupSpec"], "workerGroupSpecs": [group]}
            assert selected(workers, constraint["labelSelector"]["matchLabels"]) == {"worker"}
            assert constraint["maxSkew"] == 1
            assert constraint["whenUnsatisfiable"] == "ScheduleAnyway"  # never blocks a scale-up
            assert constraint.get("matchLabelKeys") == ["ray.io/cluster"]
            keys.add(constraint["topologyKey"])
        assert keys == {"kubernetes.io/hostname", "topology.kubernetes.io/zone"}


API_TOKENS_SECRET = "espro-api-tokens"
API_TOKENS_KEY = "tokens"
SECRET_DEFAULT_MODE = 0o644  # Kubernetes' default for a secret volume's files


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_overlay_requires_bearer_tokens_from_the_secret(overlay: str) -> None:
    """Nothing answers without a token: ``auth_token_file`` names the key ``tokens`` of the
    espro-api-tokens Secret, which every pod that runs Serve mounts read-only (Serve's proxies
    run on every node; the replicas read the file wherever Serve places them). The Secret is
    required, so no pod starts without it; its files are mounted whole (a subPath mount would
    miss a rotation), readable by the pods' user through their fsGroup and by no one else.
    The readiness probes ask the health endpoints, which stay open."""
    (ray_service,) = objects(f"overlays/{overlay}", "RayService")
    config = serve_config(ray_service)
    assert config["proxy_location"] == "EveryNode"  # so: every Ray pod runs a proxy
    (app,) = config["applications"]
    token_file = AppConfig.model_validate(app["args"]).auth_token_file
    assert token_file is not None, f"{overlay} answers without a token"
    token_path = PurePosixPath(token_file)
    assert token_path.is_absolute()
    cluster = ray_service["spec"]["rayClusterConfig"]
    for template in pods(cluster):
        spec = template["spec"]
        (container,) = spec["containers"]
        where = f"{overlay}: {container['name']}"
        (mount,) = [
            m for m in container["volumeMounts"] if token_path.is_relative_to(m["mountPath"])
        ]
        assert mount.get("readOnly") is True, where
        assert not {"subPath", "subPathExpr"} & set(mount), where
        (volume,) = [v for v in spec["volumes"] if v["name"] == mount["name"]]
        assert set(volume) == {"name", "secret"}, where
        secret = volume["secret"]
        assert secret["secretName"] == API_TOKENS_SECRET, where
        assert not secret.get("optional"), where
        in_volume = token_path.relative_to(mount["mountPath"]).as_posix()
        mode = secret.get("defaultMode", SECRET_DEFAULT_MODE)
        if "items" in secret:
            (item,) = [i for i in secret["items"] if i["path"] == in_volume]
            assert item["key"] == API_TOKENS_KEY, where
            mode = item.get("mode", mode)
        else:
            assert in_volume == API_TOKENS_KEY, where
        # A secret volume's files belong to root, and to the fsGroup's group where the pod
        # sets one; the containers' processes have the fsGroup among their groups.
        context = spec["securityContext"] | (container.get("securityContext") or {})
        assert context["runAsUser"] != 0 and context.get("fsGroup") is not None, where
        assert mode & 0o040, f"{where}: mode {mode:o} does not let the fsGroup read the tokens"
        assert not mode & 0o227, f"{where}: mode {mode:o} lets others read or anyone write"
        probe = container.get("readinessProbe", {}).get("httpGet", {})
        assert probe.get("path", "/v2/health/ready").startswith("/v2/health/"), where


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_prometheus_scrapes_the_metrics_port_without_credentials(overlay: str) -> None:
    """The metrics port is Ray's exporter, not one of the app's doors: it asks for no token,
    so the ServiceMonitor sends none, and the clients' tokens never reach Prometheus."""
    (monitor,) = objects(f"overlays/{overlay}", "ServiceMonitor")
    for endpoint in monitor["spec"]["endpoints"]:
        credentials = {"authorization", "basicAuth", "bearerTokenFile", "bearerTokenSecret"}
        assert not credentials & set(endpoint) and "oauth2" not in endpoint, endpoint
        assert endpoint.get("scheme", "http") == "http", endpoint


def shell_commands(markdown: str) -> list[str]:
    """The commands of a Markdown text's ``bash`` blocks, one per line, continuations joined,
    comment lines left out."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", markdown, re.DOTALL):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                commands.append(line)
    return commands


def test_the_walkthrough_serves_a_stored_bundle_with_tokens_and_metrics() -> None:
    """docs/deploy.md's walk-through from an empty cluster: the restricted namespace, the
    bundle uploaded to the URL that cpu-dev serves, the token Secret created before the
    overlay is applied, a request without the token shown refused, every other client
    command sending the token (to loopback, the port-forward, where espro-client sends
    one over plain text), and the metrics in Prometheus."""
    docs = (ROOT / "docs" / "deploy.md").read_text()
    walk = docs[docs.index("From an empty cluster") : docs.index("### Bundles on a volume")]
    commands = shell_commands(walk)

    def first(pattern: str) -> int:
        found = [i for i, command in enumerate(commands) if re.search(pattern, command)]
        assert found, pattern
        return found[0]

    apply = first(r"^kubectl apply -k k8s/overlays/cpu-dev$")
    assert first(r"label namespace espro pod-security\.kubernetes\.io/enforce=restricted") < apply
    token = first(r"^openssl rand -hex 32 > tokens\.txt$")
    secret = first(
        rf"^kubectl -n espro create secret generic {API_TOKENS_SECRET} "
        rf"--from-file={API_TOKENS_KEY}=\./tokens\.txt$"
    )
    assert token < secret < apply
    (service,) = objects("overlays/cpu-dev", "RayService")
    (app,) = serve_config(service)["applications"]
    bundles = AppConfig.model_validate(app["args"]).bundles
    assert all(is_url(bundle) for bundle in bundles)
    for bundle in bundles:
        assert first(rf"^aws s3 cp --recursive \S+ {re.escape(bundle)}$") < apply
    forward = first(r"port-forward svc/espro-serve-svc 8000:8000 9000:9000")
    bearer = 'Authorization: Bearer $(cat tokens.txt)"'
    refused = 0
    for command in commands[forward + 1 :]:
        words = shlex.split(command.split(" #", 1)[0]) if command.startswith("espro-") else []
        if command.startswith("curl "):
            if "/v2/health/" in command:
                continue
            if bearer not in command:
                assert "# 401" in command, command
                refused += 1
        elif words[:1] == ["espro-client"] and words[1] != "health":
            assert words[words.index("--token-file") + 1] == "tokens.txt", command
            assert re.match(r"(http|grpc)://127\.0\.0\.1:", words[2]), command
    assert refused == 1
    assert first(r"^kubectl -n monitoring port-forward svc/prometheus-operated ") > forward
    assert "ray_espro_model_info" in walk


def helm_release(chart: str) -> str:
    """The release name docs/deploy.md installs ``chart`` under."""
    found = re.search(
        rf"helm install (\S+) {re.escape(chart)}\b", (ROOT / "docs/deploy.md").read_text()
    )
    assert found, chart
    return found[1]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_prometheus_operator_selects_the_monitor_and_the_rules(overlay: str) -> None:
    """kube-prometheus-stack's Prometheus selects ServiceMonitors and PrometheusRules by the
    label ``release: <its Helm release>`` unless told otherwise."""
    release = helm_release("prometheus-community/kube-prometheus-stack")
    for kind in ("ServiceMonitor", "PrometheusRule"):
        (obj,) = objects(f"overlays/{overlay}", kind)
        assert obj["metadata"]["labels"]["release"] == release, kind


def test_kuberay_version_of_the_docs_is_the_crds() -> None:
    (version,) = set(
        re.findall(r"kuberay-operator --version (\S+)", (ROOT / "docs/deploy.md").read_text())
    )
    for name in set(CRD_FILES.values()):
        header = (K8S / "crds" / name).read_text().split("\napiVersion:", 1)[0]
        if "kuberay" in header:
            assert f"kuberay v{version}," in header, name


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
    ("name", "extras"),
    [("Dockerfile.cpu", "serving,remote"), ("Dockerfile.gpu", "serving,remote")],
)
def test_dockerfile(name: str, extras: str) -> None:
    instructions = dockerfile(name)
    for instruction, arguments in instructions:
        if instruction == "FROM":
            image = arguments.split()[0]
            assert ":" in image and not image.endswith(":latest"), f"unpinned base {image}"
    runs = " && ".join(arguments for instruction, arguments in instructions if instruction == "RUN")
    # The project is installed with constraints.txt, so its pins are the image's, checked
    # afterwards; any package a Dockerfile names itself carries the same pin.
    args = dict(a.split("=", 1) for i, a in instructions if i == "ARG" and "=" in a)
    installed = re.search(
        r"pip install --no-cache-dir -c constraints\.txt [\"']\.\[([^\]]+)\][\"'] && pip check",
        runs,
    )
    assert installed, runs
    assert installed[1].replace("${EXTRAS}", args.get("EXTRAS", "")) == extras
    named = re.findall(r"([A-Za-z0-9_.\-\[\]]+)==([^\s'\"]+)", runs)
    for package, version in named:
        assert pins()[canonicalize_name(Requirement(package).name)] == version, package
    if name == "Dockerfile.cpu":
        # Only torch and torchvision from PyTorch's index; their dependencies from PyPI, pinned.
        assert "--no-deps --index-url https://download.pytorch.org/whl/cpu" in runs
        assert {package for package, _ in named} == {"torch", "torchvision"}
    else:
        assert "download.pytorch.org" not in runs  # PyPI's default CUDA wheel
    # Never a bundle in the image: only the sources pip needs and the entrypoint.
    allowed = {
        "pyproject.toml",
        "README.md",
        "constraints.txt",
        "serving",
        "training",
        "deploy/entrypoint.sh",
    }
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
    # Flags only: the entrypoint picks the bundle ($ESPRO_BUNDLE_URL or /models/bundle).
    for command in [a for i, a in instructions if i == "CMD"]:
        assert json.loads(command)[0].startswith("-"), command
    exposed = {int(port) for i, a in instructions if i == "EXPOSE" for port in a.split()}
    assert exposed == {8000, 9000, 8080}


def run_entrypoint(tmp_path: Path, args: list[str], env: dict[str, str] | None = None) -> list[str]:
    """The `espro` command line deploy/entrypoint.sh runs, through a stub that records it."""
    stub = tmp_path / "bin"
    stub.mkdir(exist_ok=True)
    (stub / "espro").write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > {tmp_path / "args"}\n')
    (stub / "espro").chmod(0o755)
    subprocess.run(
        ["sh", str(DEPLOY / "entrypoint.sh"), *args],
        env={"PATH": f"{stub}:/usr/bin:/bin", **(env or {})},
        capture_output=True,
        check=True,
        timeout=60,
    )
    return (tmp_path / "args").read_text().splitlines()


def test_entrypoint_serves_the_bundles_named_or_the_default(tmp_path: Path) -> None:
    """The arguments' bundles, directories or URLs, as they are (espro serve fetches and
    verifies URLs itself); with none, ESPRO_BUNDLE_URL, or /models/bundle without it."""
    serve = ["serve", "--host", "0.0.0.0"]
    url = "s3://bucket/mnist1d-demo"
    named = ["/models/a", "gs://bucket/b", "--replicas", "2"]
    assert run_entrypoint(tmp_path, named, {"ESPRO_BUNDLE_URL": url}) == serve + named
    assert run_entrypoint(tmp_path, ["--device", "cuda"], {"ESPRO_BUNDLE_URL": url}) == [
        *serve,
        url,
        "--device",
        "cuda",
    ]
    assert run_entrypoint(tmp_path, []) == [*serve, "/models/bundle"]
    assert run_entrypoint(tmp_path, ["--replicas", "2"], {"ESPRO_BUNDLE_URL": ""}) == [
        *serve,
        "/models/bundle",
        "--replicas",
        "2",
    ]


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
    published = {
        name: {p.rsplit(":", 1)[1] for p in service.get("ports", [])}
        for name, service in services.items()
    }
    assert published["espro"] == {"8000", "9000"}  # the metrics stay on the stack's network
    assert all(p.startswith("127.0.0.1:") for s in services.values() for p in s.get("ports", []))
    # `espro serve --host 0.0.0.0` (the entrypoint) relays its Ray's loopback exporter to
    # espro:8080 on the stack's network, where Prometheus scrapes it and evaluates the rules.
    prometheus_service = services["prometheus"]
    assert "network_mode" not in prometheus_service
    assert published["prometheus"] == {"9090"}
    assert "--host 0.0.0.0" in (DEPLOY / "entrypoint.sh").read_text()
    mounts = dict(v.split(":")[:2] for v in prometheus_service["volumes"])
    assert mounts["./prometheus/prometheus.yml"] == "/etc/prometheus/prometheus.yml"
    prometheus = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    targets = [
        t
        for job in prometheus["scrape_configs"]
        for s in job["static_configs"]
        for t in s["targets"]
    ]
    metrics_port = LaunchConfig.model_fields["metrics_port"].default
    assert targets == [f"espro:{metrics_port}"]
    assert [mounts[f"./prometheus/{Path(f).name}"] for f in prometheus["rule_files"]] == [
        "/etc/prometheus/alerts.yml"
    ]
    # Grafana provisions the Prometheus data source, the dashboard's default, and the dashboard.
    mounts = dict(v.split(":")[:2] for v in services["grafana"]["volumes"])
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"
    provisioning = DEPLOY / "grafana" / "provisioning"
    (source,) = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())[
        "datasources"
    ]
    assert source["url"] == "http://prometheus:9090" and source["type"] == "prometheus"
    assert source["isDefault"] is True
    (provider,) = yaml.safe_load((provisioning / "dashboards" / "espro.yml").read_text())[
        "providers"
    ]
    assert mounts["./grafana/dashboards"] == provider["options"]["path"]


# ---------------------------------------------------------------------------- metrics


@cache
def espro_metrics() -> frozenset[str]:
    """The names espro records (serving/app/metrics.py), as Ray exports them."""
    source = (ROOT / "serving" / "app" / "metrics.py").read_text()
    return frozenset(f"ray_{name}" for name in re.findall(r"\"(espro_[a-z_]+)\"", source))


@cache
def ray_serve_metrics() -> tuple[re.Pattern[str], ...]:
    """The names of the metrics Ray Serve records, from the installed Ray's sources: each
    ``"serve_..."`` string literal, an f-string's fields matching any name part."""
    import ray.serve

    found = set()
    for path in Path(ray.serve.__file__).parent.rglob("*.py"):
        found |= set(re.findall(r"[\"'](serve_[a-z0-9_{}]+)[\"']", path.read_text()))
    return tuple(re.compile("ray_" + re.sub(r"\{[a-z_]*\}", "[a-z]+", name)) for name in found)


def known_metric(name: str) -> bool:
    """Whether ``name`` (a series name: a histogram's ``_bucket``, a counter's ``_total``...) is
    one that espro or Ray Serve exports."""
    bases = {name, re.sub(r"_(bucket|sum|count)$", "", name), re.sub(r"_total$", "", name)}
    if name.startswith("ray_espro_"):
        return bool(bases & espro_metrics())
    return name.startswith("ray_serve_") and any(
        pattern.fullmatch(base) for pattern in ray_serve_metrics() for base in bases
    )


def metric_names(expr: str) -> set[str]:
    return set(re.findall(r"\bray_[a-z_]+", expr))


def test_known_metrics_are_what_espro_and_serve_export() -> None:
    assert len(espro_metrics()) == 14
    for name in [
        "ray_espro_requests_total",
        "ray_espro_request_latency_seconds_bucket",
        "ray_espro_bundles_refused",
        "ray_serve_num_http_requests_total",
        "ray_serve_num_grpc_error_requests_total",
        "ray_serve_http_request_latency_ms_bucket",
        "ray_serve_deployment_replica_healthy",
    ]:
        assert known_metric(name), name
    for name in ["ray_espro_request_total", "ray_serve_num_http_request_total", "ray_node_cpu"]:
        assert not known_metric(name), name


def dashboard() -> dict[str, Any]:
    return json.loads((DEPLOY / "grafana" / "dashboards" / "espro.json").read_text())


def test_dashboard_queries_espro_metrics() -> None:
    used = set()
    for panel in dashboard()["panels"]:
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            names = metric_names(target["expr"])
            assert names, f"{panel['title']}: {target['expr']}"
            for name in names:
                assert known_metric(name), f"{panel['title']}: unknown metric {name}"
                used.add(re.sub(r"_(bucket|sum|count)$", "", name))
    assert espro_metrics() <= used, f"not on the dashboard: {sorted(espro_metrics() - used)}"


def test_dashboard_variables_pick_the_data_source_namespace_and_model() -> None:
    """No data source uid is built in: a ``datasource`` variable picks one, in Grafana's
    default Prometheus; ``namespace`` and ``model`` filter every query of espro's metrics
    (``All`` also matches series without the label, as in the compose stack)."""
    board = dashboard()
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert set(variables) == {"datasource", "namespace", "model"}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    source = {"type": "prometheus", "uid": "${datasource}"}
    for name in ("namespace", "model"):
        variable = variables[name]
        assert variable["type"] == "query" and variable["datasource"] == source
        assert re.fullmatch(rf"label_values\(ray_espro_model_info.*, {name}\)", variable["query"])
        assert variable["includeAll"] and variable["allValue"] == ".*"
    assert '$namespace"' in variables["model"]["query"]
    for panel in board["panels"]:
        assert panel["datasource"] == source, panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == source, panel["title"]
            # Every selector of a metric names the namespace, and the model where it has one.
            for name, labels in re.findall(r"\b(ray_[a-z_]+)(\{[^}]*\})?", target["expr"]):
                assert 'namespace=~"$namespace"' in labels, f"{panel['title']}: {name}"
                if name.startswith("ray_espro_") and "bundles_refused" not in name:
                    assert 'model=~"$model"' in labels, f"{panel['title']}: {name}"
    assert "uid" not in json.dumps(board["panels"]).replace('"uid": "${datasource}"', "")


def alert_groups() -> list[dict[str, Any]]:
    return yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())["groups"]


def test_alert_rules_cover_refusals_errors_and_latency() -> None:
    """The compose stack's rules and the PrometheusRule are the same; every rule names only
    metrics that espro or Ray Serve export, and there are alerts on refused bundles (the gauge
    docs/serving.md says to alert on), on 5xx answers, and on latency."""
    groups = alert_groups()
    for overlay in OVERLAYS:
        (rule,) = objects(f"overlays/{overlay}", "PrometheusRule")
        assert rule["spec"]["groups"] == groups
    rules = [rule for group in groups for rule in group["rules"]]
    assert len({rule["alert"] for rule in rules}) == len(rules)
    for rule in rules:
        names = metric_names(rule["expr"])
        assert names and all(known_metric(n) for n in names), (rule["alert"], names)
        assert rule["labels"]["severity"] in {"warning", "critical"}
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]
        assert rule["for"]

    def alerting(pattern: str) -> list[str]:
        return [r["alert"] for r in rules if re.search(pattern, r["expr"], re.DOTALL)]

    assert alerting(r"ray_espro_bundles_refused\b.*> 0")
    assert "`ray_espro_bundles_refused`" in (ROOT / "docs" / "serving.md").read_text()
    assert alerting(r'ray_espro_requests_total\{status=~"5\.\."\}')
    assert alerting(r'ray_serve_num_http_requests_total\{status_code=~"5\.\."\}')
    assert alerting(r"histogram_quantile\(0\.99, .*ray_espro_request_latency_seconds_bucket")
    assert alerting(r"histogram_quantile\(0\.99, .*ray_serve_http_request_latency_ms_bucket")


def test_entrypoint_is_executable_shell() -> None:
    script = DEPLOY / "entrypoint.sh"
    assert os.access(script, os.X_OK)
    subprocess.run(["sh", "-n", str(script)], check=True, timeout=10)
