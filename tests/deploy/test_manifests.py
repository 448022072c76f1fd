"""The deployment manifests agree with the schema, the image and the server they deploy.

Proves that the Kustomize overlays render and pass strict Kubernetes schema validation; that
every probe path answers 200 from the real app over a real (tiny) repository; that ports,
user id and NORMSERVE_* settings match the Dockerfile and ``service.settings.Settings``; that
HPA, Service and PDB are wired to the Deployment's pods; and that the KServe InferenceService
is well formed (its pod part validated strictly as a v1 Pod).
"""

from __future__ import annotations

import functools
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient
from tiny_onnx import tiny_repository

import service.settings as settings_module
from service.app import create_app
from service.settings import Settings

try:
    import yaml
except ImportError as exc:  # a missing dependency must fail loudly, not skip
    raise ImportError("tests/deploy need PyYAML (`pip install pyyaml`) to read manifests") from exc

ROOT = Path(__file__).resolve().parents[2]
BASE = ROOT / "deploy" / "k8s" / "base"
# Every overlay in the directory is rendered and validated, not a list that can fall behind.
OVERLAYS = tuple(sorted(p.name for p in (ROOT / "deploy" / "k8s" / "overlays").iterdir()))
KSERVE = ROOT / "deploy" / "kserve" / "inferenceservice.yaml"
VALIDATOR = Path(sys.executable).parent / "kubernetes-validate"
TARGETS = (*OVERLAYS, "kserve")
KSERVE_CONTAINER = "kserve-container"
# V1beta1PredictorSpec: KServe's own component fields, and the PodSpec fields it inlines.
KSERVE_ONLY_KEYS = {
    "minReplicas", "maxReplicas", "scaleMetric", "scaleMetricType", "scaleTarget",
    "containerConcurrency", "timeout", "canaryTrafficPercent", "annotations", "labels",
    "logger", "batcher", "deploymentStrategy", "model", "workerSpec", "autoScaling",
}  # fmt: skip
POD_SPEC_KEYS = {
    "containers", "initContainers", "volumes", "securityContext", "serviceAccountName",
    "nodeSelector", "tolerations", "affinity", "topologySpreadConstraints", "imagePullSecrets",
    "priorityClassName", "runtimeClassName", "terminationGracePeriodSeconds",
    "automountServiceAccountToken", "hostAliases", "dnsPolicy", "dnsConfig", "schedulerName",
    "enableServiceLinks", "restartPolicy",
}  # fmt: skip
DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")

Doc = dict[str, Any]


# ------------------------------------------------------------------ tools and loading


def _validator() -> Path:
    if not VALIDATOR.exists():
        pytest.skip(f"kubernetes-validate not installed at {VALIDATOR}: cannot validate schemas")
    return VALIDATOR


def validate(tmp_path: Path, name: str, docs: list[Doc] | str) -> subprocess.CompletedProcess[str]:
    """``kubernetes-validate --strict`` on ``docs``: rejects unknown fields, missing required."""
    path = tmp_path / f"{name}.yaml"
    path.write_text(docs if isinstance(docs, str) else yaml.safe_dump_all(docs))
    return subprocess.run(
        [str(_validator()), "--strict", str(path)], capture_output=True, text=True, check=False
    )


@functools.cache
def render(overlay: str) -> str:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not installed: cannot render the Kustomize overlays")
    directory = ROOT / "deploy" / "k8s" / "overlays" / overlay
    done = subprocess.run(
        [kubectl, "kustomize", str(directory)], capture_output=True, text=True, check=True
    )
    return done.stdout


def load(text: str) -> list[Doc]:
    return [doc for doc in yaml.safe_load_all(text) if doc]


def by_kind(docs: list[Doc], kind: str) -> Doc:
    found = [doc for doc in docs if doc["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def inference_service() -> Doc:
    return yaml.safe_load(KSERVE.read_text())


def pod_of(target: str) -> tuple[Doc, Doc]:
    """(pod spec, serving container) of an overlay's Deployment or of the KServe predictor."""
    if target == "kserve":
        predictor = inference_service()["spec"]["predictor"]
        return predictor, predictor["containers"][0]
    spec = by_kind(load(render(target)), "Deployment")["spec"]["template"]["spec"]
    assert len(spec["containers"]) == 1, "one serving container per pod"
    return spec, spec["containers"][0]


def env_of(container: Doc) -> dict[str, str]:
    env = {}
    for item in container.get("env", []):
        assert "value" in item, f"{item['name']}: expected a literal value"
        env[item["name"]] = item["value"]
    return env


def resolve_port(port: int | str, container: Doc) -> int:
    """A probe or Service port: a number, or the name of one of the container's ports."""
    if isinstance(port, int):
        return port
    named = {p["name"]: p["containerPort"] for p in container["ports"] if "name" in p}
    assert port in named, f"port name {port!r} is not one of the container's {sorted(named)}"
    return named[port]


def cpus(quantity: str) -> int:
    """A CPU quantity ("2", "4", "250m") as whole CPUs, rounded up like the cgroup quota."""
    if quantity.endswith("m"):
        return math.ceil(int(quantity[:-1]) / 1000)
    return math.ceil(float(quantity))


def dockerfile_runtime() -> dict[str, str]:
    """The final stage's USER, EXPOSE and ENV values (continuation lines joined)."""
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    start = max(i for i, line in enumerate(lines) if line.upper().startswith("FROM "))
    found: dict[str, str] = {}
    for line in lines[start:]:
        instruction, _, rest = line.partition(" ")
        if instruction.upper() in ("USER", "EXPOSE"):
            found[instruction.upper()] = rest.strip()
        elif instruction.upper() == "ENV":
            found |= dict(token.split("=", 1) for token in shlex.split(rest))
    return found


@pytest.fixture(params=TARGETS)
def target(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(params=OVERLAYS)
def overlay(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    repository = tiny_repository(tmp_path_factory.mktemp("deploy-repo"))
    with TestClient(create_app(Settings(repository=repository))) as started:
        yield started


# ------------------------------------------------------------------ schema validation


def test_overlay_renders_and_validates_strictly(overlay: str, tmp_path: Path) -> None:
    done = validate(tmp_path, overlay, render(overlay))
    assert done.returncode == 0, done.stdout + done.stderr
    kinds = ("Namespace", "Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget")
    for kind in kinds:
        assert f"passed for resource {kind.lower()}/" in done.stdout, (kind, done.stdout)


def test_overlay_creates_its_namespace(overlay: str) -> None:
    """`kubectl apply -k` on a clean cluster: the namespace is one of the applied objects."""
    docs = load(render(overlay))
    namespace = by_kind(docs, "Namespace")["metadata"]["name"]
    assert docs[0]["kind"] == "Namespace", "kustomize orders the Namespace first"
    for doc in docs[1:]:
        assert doc["metadata"].get("namespace") == namespace, (doc["kind"], namespace)


def indexed_prefixes(path: str) -> list[str]:
    """``/a/0/b/2/c`` -> ``["/a/0", "/a/0/b/2"]``: the list items a JSON patch path goes through."""
    parts = path.split("/")
    return ["/".join(parts[: i + 1]) for i, part in enumerate(parts) if part.isdigit()]


def untested_positions(operations: list[Doc]) -> list[str]:
    """Operations that address a list item by index with no earlier ``test`` op on that item
    (a ``test`` of ``.../env/2/name`` vouches for ``.../env/2``)."""
    tested: set[str] = set()
    found = []
    for operation in operations:
        prefixes = indexed_prefixes(operation["path"])
        if operation["op"] == "test":
            tested.update(prefixes)
        elif any(prefix not in tested for prefix in prefixes):
            found.append(f"{operation['op']} {operation['path']}")
    return found


def test_overlays_patch_lists_by_key_not_position(overlay: str) -> None:
    """Strategic merges (containers and env by name) or JSON patches that test the item they
    address: reordering the base can never make a patch change another variable."""
    directory = ROOT / "deploy" / "k8s" / "overlays" / overlay
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    for patch in kustomization.get("patches", []):
        operations = yaml.safe_load(patch.get("patch") or (directory / patch["path"]).read_text())
        if isinstance(operations, list):  # a JSON patch; a mapping is a strategic merge
            assert not untested_positions(operations), (overlay, untested_positions(operations))


def test_position_rule_is_live() -> None:
    """The rule above catches the patch this repository once had (env/2 by position)."""
    by_position = [
        {"op": "replace", "path": "/spec/template/spec/containers/0/env/2", "value": {}},
    ]
    assert untested_positions(by_position) == [by_position[0]["op"] + " " + by_position[0]["path"]]
    tested = [
        {"op": "test", "path": "/spec/template/spec/containers/0/env/2/name", "value": "X"},
        *by_position,
    ]
    assert untested_positions(tested) == []


def test_overlays_keep_every_base_variable_once(overlay: str) -> None:
    (deployment,) = load((BASE / "deployment.yaml").read_text())
    (base,) = deployment["spec"]["template"]["spec"]["containers"]
    _, container = pod_of(overlay)
    names = [item["name"] for item in container["env"]]
    assert len(names) == len(set(names)), f"{overlay}: a variable set twice: {names}"
    assert {item["name"] for item in base["env"]} <= set(names)


@pytest.mark.parametrize("name", ["deployment.yaml", "service.yaml", "hpa.yaml", "pdb.yaml"])
def test_base_file_validates_strictly(name: str, tmp_path: Path) -> None:
    kustomization = yaml.safe_load((BASE / "kustomization.yaml").read_text())
    assert name in kustomization["resources"]
    docs = load((BASE / name).read_text())
    for doc in docs:
        if doc["kind"] == "Deployment" and "selector" not in doc["spec"]:
            # Kustomize adds the selector from the base's labels (includeSelectors: true).
            pairs = [item["pairs"] for item in kustomization["labels"] if item["includeSelectors"]]
            assert pairs, "a Deployment without selector needs labels with includeSelectors"
            doc["spec"]["selector"] = {"matchLabels": {k: v for p in pairs for k, v in p.items()}}
    done = validate(tmp_path, name.removesuffix(".yaml"), docs)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "passed for resource" in done.stdout


# ------------------------------------------------------------------ the server behind the pod


def test_probes_hit_real_endpoints(target: str, client: TestClient) -> None:
    _, container = pod_of(target)
    assert container["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert "httpGet" in container["startupProbe"], "a startupProbe guards the model loading"
    paths = {container[p]["httpGet"]["path"] for p in ("startupProbe", "livenessProbe")}
    paths.add(container["readinessProbe"]["httpGet"]["path"])
    if target != "kserve":  # Prometheus scrapes the path the pod template announces
        template = by_kind(load(render(target)), "Deployment")["spec"]["template"]
        paths.add(template["metadata"]["annotations"]["prometheus.io/path"])
    for path in sorted(paths):
        response = client.get(path)
        assert response.status_code == 200, f"{target}: GET {path} -> {response.status_code}"


def http_port(container: Doc) -> int:
    """The container's HTTP port, found by name: other ports (gRPC) may sit beside it."""
    (port,) = [p["containerPort"] for p in container["ports"] if p["name"] in ("http", "http1")]
    return int(port)


def test_ports_agree(target: str) -> None:
    _, container = pod_of(target)
    port = http_port(container)
    assert int(env_of(container)["NORMSERVE_PORT"]) == port
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert resolve_port(container[probe]["httpGet"]["port"], container) == port, probe
    if target == "kserve":
        assert port == 8080, "KServe routes to the predictor container on 8080"
        return
    docs = load(render(target))
    (service_port,) = [p for p in by_kind(docs, "Service")["spec"]["ports"] if p["name"] == "http"]
    assert resolve_port(service_port["targetPort"], container) == port
    template = by_kind(docs, "Deployment")["spec"]["template"]
    assert int(template["metadata"]["annotations"]["prometheus.io/port"]) == port


def test_base_port_matches_dockerfile() -> None:
    (deployment,) = load((BASE / "deployment.yaml").read_text())
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    port = http_port(container)
    image = dockerfile_runtime()
    assert str(port) in image["EXPOSE"].split()
    assert int(image["NORMSERVE_PORT"]) == port
    assert int(env_of(container)["NORMSERVE_PORT"]) == port


def test_security_context(target: str) -> None:
    pod, container = pod_of(target)
    uid = dockerfile_runtime()["USER"].split(":")[0]
    assert uid.isdigit(), "runAsNonRoot can only verify a numeric USER"
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == int(uid)
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]


def test_env_is_accepted_by_settings(target: str, monkeypatch: pytest.MonkeyPatch) -> None:
    _, container = pod_of(target)
    for key in [key for key in os.environ if key.startswith("NORMSERVE_")]:
        monkeypatch.delenv(key)
    limit = cpus(container["resources"]["limits"]["cpu"])
    # Settings checks workers against this machine's CPUs; in the pod that is the CPU limit.
    monkeypatch.setattr(settings_module, "cpu_budget", lambda: limit)
    values = {}
    for name, value in env_of(container).items():
        if not name.startswith("NORMSERVE_"):
            continue
        field = name.removeprefix("NORMSERVE_").lower()
        assert field in Settings.model_fields, f"{name} sets no field of Settings"
        assert name == f"NORMSERVE_{field.upper()}"
        Settings(**{field: value})  # pydantic validates the value alone
        values[field] = value
    settings = Settings(**values)  # and all together, as the pod starts
    assert settings.threads_per_session == limit // settings.workers
    if target == "prod":
        assert (limit, settings.workers, settings.threads_per_session) == (4, 2, 2)


# ------------------------------------------------------------------ Kubernetes wiring


def test_hpa_targets_the_deployment(overlay: str) -> None:
    docs = load(render(overlay))
    deployment, hpa = by_kind(docs, "Deployment"), by_kind(docs, "HorizontalPodAutoscaler")
    ref = hpa["spec"]["scaleTargetRef"]
    assert (ref["apiVersion"], ref["kind"]) == (deployment["apiVersion"], "Deployment")
    assert ref["name"] == deployment["metadata"]["name"]
    low, high = hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]
    assert 1 <= low <= high
    # The HPA owns the count: a replicas field would be re-applied over its decision.
    assert "replicas" not in deployment["spec"], "the HPA owns the replica count"
    if overlay == "prod":
        assert low >= 3


def test_selectors_match_pod_labels(overlay: str) -> None:
    docs = load(render(overlay))
    deployment = by_kind(docs, "Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    selected = deployment["spec"]["selector"]["matchLabels"]
    assert selected and selected.items() <= labels.items()
    service = by_kind(docs, "Service")["spec"]["selector"]
    assert service and service.items() <= labels.items(), "the Service selects no pod"
    pdb = by_kind(docs, "PodDisruptionBudget")["spec"]
    # policy/v1: a missing (null) selector selects no pods, so the budget protects nothing.
    assert "selector" in pdb, "the PodDisruptionBudget has no selector: it protects no pod"
    assert pdb["selector"]["matchLabels"].items() <= labels.items()
    hpa_min = by_kind(docs, "HorizontalPodAutoscaler")["spec"]["minReplicas"]
    assert pdb["minAvailable"] < hpa_min, "minAvailable == replicas would block every drain"


def test_graceful_shutdown_fits_termination_grace(target: str) -> None:
    pod, container = pod_of(target)
    drain = float(env_of(container)["NORMSERVE_GRACEFUL_SHUTDOWN_S"])
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    assert pod["terminationGracePeriodSeconds"] > drain + float(command[1])


def test_resources_set_requests_and_limits(target: str) -> None:
    _, container = pod_of(target)
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= container["resources"][kind].keys(), kind
    resources = container["resources"]
    assert cpus(resources["requests"]["cpu"]) <= cpus(resources["limits"]["cpu"])


def test_images(overlay: str) -> None:
    _, container = pod_of(overlay)
    if overlay == "dev":
        assert container["image"] == "normserve:dev"
        # The image README and the Dockerfile tell users to build is the one dev deploys.
        for name in ("README.md", "Dockerfile"):
            tags = re.findall(
                r"(?:docker|buildah) (?:build|bud) .*?-t (\S+)", (ROOT / name).read_text()
            )
            assert tags and set(tags) == {"normserve:dev"}, (name, tags)
        return
    name, _, tag = container["image"].rpartition(":")
    registry = name.split("/")[0]
    assert "/" in name and ("." in registry or ":" in registry), f"no registry: {name}"
    assert tag and tag != "latest", f"prod needs an explicit tag: {container['image']}"


# ------------------------------------------------------------------ KServe


def test_inference_service_structure() -> None:
    isvc = inference_service()
    assert isvc["apiVersion"] == "serving.kserve.io/v1beta1"
    assert isvc["kind"] == "InferenceService"
    name = isvc["metadata"]["name"]
    assert len(name) <= 63 and DNS_1035.match(name), f"not a DNS-1035 label: {name}"
    predictor = isvc["spec"]["predictor"]
    unknown = predictor.keys() - KSERVE_ONLY_KEYS - POD_SPEC_KEYS
    assert not unknown, f"unknown predictor keys: {sorted(unknown)}"
    (container,) = predictor["containers"]
    assert container["name"] == KSERVE_CONTAINER
    assert container["image"].rpartition(":")[2] not in ("", "latest")
    assert 8080 in [p["containerPort"] for p in container["ports"]]
    assert 1 <= predictor["minReplicas"] <= predictor["maxReplicas"]


def test_inference_service_passes_the_validator(tmp_path: Path) -> None:
    done = validate(tmp_path, "isvc", KSERVE.read_text())
    assert done.returncode == 0, done.stdout + done.stderr
    assert "ERROR" not in done.stdout + done.stderr


def test_inference_service_pod_validates_strictly(tmp_path: Path) -> None:
    isvc = inference_service()
    predictor = isvc["spec"]["predictor"]
    spec = {key: value for key, value in predictor.items() if key not in KSERVE_ONLY_KEYS}
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": isvc["metadata"]["name"]},
        "spec": spec,
    }
    done = validate(tmp_path, "isvc-pod", [pod])
    assert done.returncode == 0, done.stdout + done.stderr
    assert "passed for resource pod/" in done.stdout


# ------------------------------------------------------------------ gRPC
# The image exposes the gRPC API, the Deployment and Service carry it as a second named port,
# and the KServe grpc-v2 variant (a ServingRuntime plus an InferenceService) routes to it and
# probes it with grpc.health.v1.

KSERVE_GRPC = ROOT / "deploy" / "kserve" / "inferenceservice-grpc.yaml"


def grpc_variant() -> tuple[Doc, Doc]:
    docs = [doc for doc in yaml.safe_load_all(KSERVE_GRPC.read_text()) if doc]
    return by_kind(docs, "ServingRuntime"), by_kind(docs, "InferenceService")


def test_dockerfile_exposes_the_grpc_port() -> None:
    image = dockerfile_runtime()
    assert image["NORMSERVE_GRPC_PORT"] in image["EXPOSE"].split()
    assert int(image["NORMSERVE_GRPC_PORT"]) == Settings.model_fields["grpc_port"].default


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_deployment_and_service_carry_grpc(overlay: str) -> None:
    docs = load(render(overlay))
    container = by_kind(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    grpc_port = int(env_of(container)["NORMSERVE_GRPC_PORT"])
    assert resolve_port("grpc", container) == grpc_port
    assert grpc_port != int(env_of(container)["NORMSERVE_PORT"])
    (service_port,) = [p for p in by_kind(docs, "Service")["spec"]["ports"] if p["name"] == "grpc"]
    assert resolve_port(service_port["targetPort"], container) == grpc_port
    assert service_port["appProtocol"] == "kubernetes.io/h2c"


def test_kserve_grpc_variant_routes_and_probes_grpc() -> None:
    runtime, isvc = grpc_variant()
    model = isvc["spec"]["predictor"]["model"]
    assert model["protocolVersion"] == "grpc-v2" in runtime["spec"]["protocolVersions"]
    assert model["runtime"] == runtime["metadata"]["name"]
    assert model["modelFormat"]["name"] in {
        f["name"] for f in runtime["spec"]["supportedModelFormats"]
    }
    (container,) = runtime["spec"]["containers"]
    assert container["name"] == "kserve-container"
    env = env_of(container)
    grpc_port, http_port = int(env["NORMSERVE_GRPC_PORT"]), int(env["NORMSERVE_PORT"])
    # KServe sends gRPC to the container port named h2c, and HTTP only to 8080.
    (h2c,) = [p for p in container["ports"] if p["name"] == "h2c"]
    assert h2c["containerPort"] == grpc_port and http_port == 8080
    assert container["readinessProbe"]["grpc"]["port"] == grpc_port
    for probe in ("startupProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["port"] == http_port
    assert container["securityContext"]["runAsNonRoot"] is True


def test_kserve_grpc_env_is_accepted_by_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    runtime, _ = grpc_variant()
    for key in [key for key in os.environ if key.startswith("NORMSERVE_")]:
        monkeypatch.delenv(key)
    values = {
        name.removeprefix("NORMSERVE_").lower(): value
        for name, value in env_of(runtime["spec"]["containers"][0]).items()
    }
    values["workers"] = "1"
    assert Settings(**values).grpc_port == 8081


def test_kserve_grpc_pod_validates_strictly(tmp_path: Path) -> None:
    runtime, _ = grpc_variant()
    spec = {key: runtime["spec"][key] for key in ("containers", "volumes")}
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "normserve-grpc"}, "spec": spec}
    done = validate(tmp_path, "grpc-pod", [pod])
    assert done.returncode == 0, done.stdout + done.stderr
    done = validate(tmp_path, "grpc-isvc", KSERVE_GRPC.read_text())
    assert done.returncode == 0, done.stdout + done.stderr
    assert "ERROR" not in done.stdout + done.stderr
