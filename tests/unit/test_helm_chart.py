"""The Helm chart (helm/splitserve) rendered and checked without a Kubernetes cluster.

Every example values file is rendered by Helm's own Go library (helm-python-sdk, no helm
binary) and linted; built-in kinds are validated against Kubernetes' schemas
(kubernetes-validate, strict, the newest version it bundles); the two CRD kinds it cannot know
(RayCluster, ServiceMonitor) against the repo's schemas in helm/schemas/, with the RayCluster's
pod templates checked as Kubernetes PodTemplates. Then what splitserve needs: replicas per role,
GPUs or custom Ray resources, probes and ports, and a ConfigMap whose cluster.yaml loads into
ClusterConfig and agrees with the worker groups. Golden renders in tests/golden/helm/ catch
drift; after an intended change regenerate them with

    SPLITSERVE_UPDATE_GOLDEN=1 .venv/bin/pytest -q tests/unit/test_helm_chart.py

Installing on a real cluster (KubeRay operator, GPUs, probes against a live pod) is not
tested here.
"""

from __future__ import annotations

import copy
import difflib
import json
import os
import subprocess
import sys
import typing
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import helm_python as helm
import jsonschema
import kubernetes_validate
import pytest
import yaml

from splitserve.cluster.config import ClusterConfig, KvTransferConfig, RoleConfig

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "splitserve"
SCHEMAS = ROOT / "helm" / "schemas"
GOLDEN = ROOT / "tests" / "golden" / "helm"
VALUES_FILES = ("values.yaml", "values-cpu.yaml", "values-xpyd.yaml")
RELEASE, NAMESPACE = "splitserve", "serving"
ROLES = ("encode", "prefill", "decode")
CRD_KINDS = frozenset({"RayCluster", "ServiceMonitor"})
"""Kinds kubernetes-validate has no schema for; the repo's schemas check them instead."""
KUBE_VERSION = kubernetes_validate.latest_version()
UPDATE_GOLDEN = os.environ.get("SPLITSERVE_UPDATE_GOLDEN") == "1"


# --------------------------------------------------------------------------- rendering


@pytest.fixture(scope="module")
def chart() -> Iterator[helm.Chart]:
    with helm.Chart.load(CHART) as loaded:
        yield loaded


@cache
def file_values(values_file: str) -> dict[str, Any]:
    """A values file as Helm parses ``-f`` input (values.yaml itself: the defaults, i.e. {})."""
    if values_file == "values.yaml":
        return {}
    return helm.values_from_yaml((CHART / values_file).read_text())


def render(chart: helm.Chart, values: dict[str, Any]) -> dict[str, str]:
    """Template path -> manifest text, as `helm template RELEASE -n NAMESPACE` renders it."""
    return chart.render(copy.deepcopy(values), name=RELEASE, namespace=NAMESPACE, is_install=True)


def objects(rendered: dict[str, str]) -> list[dict[str, Any]]:
    """Every Kubernetes object of a render, in template order (NOTES.txt is not one)."""
    docs = []
    for name in sorted(rendered):
        if name.endswith(".yaml"):
            docs.extend(doc for doc in yaml.safe_load_all(rendered[name]) if doc)
    return docs


@pytest.fixture(scope="module")
def rendered(chart: helm.Chart) -> dict[str, list[dict[str, Any]]]:
    return {vf: objects(render(chart, file_values(vf))) for vf in VALUES_FILES}


def merged(chart: helm.Chart, values_file: str) -> dict[str, Any]:
    """The values a release of this file uses: chart defaults coalesced with the file."""
    return chart.merge_values(copy.deepcopy(file_values(values_file)))


def one(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and name in (None, d["metadata"]["name"])]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def ray_cluster(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return one(docs, "RayCluster")


def groups(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {g["groupName"]: g for g in ray_cluster(docs)["spec"]["workerGroupSpecs"]}


def head_container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return ray_cluster(docs)["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]


def cluster_config(docs: list[dict[str, Any]]) -> ClusterConfig:
    config_map = one(docs, "ConfigMap")
    return ClusterConfig.from_yaml_text(config_map["data"]["cluster.yaml"], source="ConfigMap")


def ray_resources(group: dict[str, Any]) -> dict[str, float]:
    """rayStartParams.resources undone from KubeRay's shell quoting: '"{\\"x\\":1}"' -> {x: 1}."""
    param = group["rayStartParams"]["resources"]
    assert param.startswith('"') and param.endswith('"'), param
    return json.loads(param[1:-1].replace('\\"', '"'))


# --------------------------------------------------------------------------- lint and schemas


@pytest.mark.parametrize("values_file", VALUES_FILES)
def test_chart_lints_without_warnings(values_file: str) -> None:
    report = helm.lint(
        CHART, file_values(values_file), strict=True, kube_version=f"v{KUBE_VERSION}"
    )
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert report["errors"] == [] and problems == [], report


@pytest.mark.parametrize("values_file", VALUES_FILES)
def test_builtin_objects_pass_kubernetes_strict_schemas(
    rendered: dict[str, list[dict[str, Any]]], values_file: str
) -> None:
    docs = rendered[values_file]
    checked = [d["kind"] for d in docs if d["kind"] not in CRD_KINDS]
    for doc in docs:
        if doc["kind"] not in CRD_KINDS:
            kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
    assert {"ConfigMap", "Service"} <= set(checked)


def test_strict_kubernetes_validation_rejects_an_unknown_field(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    """The validator is live: a misspelt Service field fails it."""
    service = copy.deepcopy(one(rendered["values.yaml"], "Service", RELEASE))
    service["spec"]["port"] = service["spec"].pop("ports")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(service, KUBE_VERSION, strict=True)


def test_crd_kinds_are_the_only_ones_kubernetes_validate_skips(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    docs = rendered["values-xpyd.yaml"]  # renders both CRD kinds
    for kind in CRD_KINDS:
        with pytest.raises(kubernetes_validate.SchemaNotFoundError):
            kubernetes_validate.validate(one(docs, kind), KUBE_VERSION, strict=True)


def schema(name: str) -> jsonschema.Draft7Validator:
    loaded = json.loads((SCHEMAS / name).read_text())
    jsonschema.Draft7Validator.check_schema(loaded)
    return jsonschema.Draft7Validator(loaded)


@pytest.mark.parametrize("values_file", VALUES_FILES)
def test_raycluster_matches_kuberay_schema_and_pod_templates_kubernetes(
    rendered: dict[str, list[dict[str, Any]]], values_file: str
) -> None:
    cluster = ray_cluster(rendered[values_file])
    schema("raycluster.schema.json").validate(cluster)
    spec = cluster["spec"]
    templates = {"head": spec["headGroupSpec"]["template"]}
    templates |= {g["groupName"]: g["template"] for g in spec["workerGroupSpecs"]}
    for name, template in templates.items():
        pod_template = {
            "apiVersion": "v1",
            "kind": "PodTemplate",
            "metadata": {"name": f"{cluster['metadata']['name']}-{name}"},
            "template": template,
        }
        kubernetes_validate.validate(pod_template, KUBE_VERSION, strict=True)


@pytest.mark.parametrize(
    ("path", "mutate", "expected"),
    [
        ("spec.workerGroupSpecs[0]", lambda g: g.update(replica=2), "'replica' was unexpected"),
        ("spec.workerGroupSpecs[0]", lambda g: g.update(replicas=-1), "-1 is less than"),
        ("spec.workerGroupSpecs[0]", lambda g: g.pop("groupName"), "'groupName' is a required"),
        ("spec.workerGroupSpecs[0]", lambda g: g["rayStartParams"].update(port=6379), "6379"),
        ("spec.headGroupSpec", lambda h: h.update(rayStartParam={}), "'rayStartParam' was"),
        ("spec", lambda s: s.update(enableInTreeAutoscaler=True), "'enableInTreeAutoscaler'"),
    ],
)
def test_raycluster_schema_rejects_typos_and_bad_values(
    rendered: dict[str, list[dict[str, Any]]], path: str, mutate: Any, expected: str
) -> None:
    cluster = copy.deepcopy(ray_cluster(rendered["values.yaml"]))
    target = cluster
    for part in path.split("."):
        name, _, index = part.partition("[")
        target = target[name] if not index else target[name][int(index[:-1])]
    mutate(target)
    errors = [e.message for e in schema("raycluster.schema.json").iter_errors(cluster)]
    assert any(expected in e for e in errors), errors


def test_servicemonitor_matches_schema_and_selects_the_metrics_service(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    docs = rendered["values-xpyd.yaml"]
    monitor = one(docs, "ServiceMonitor")
    schema("servicemonitor.schema.json").validate(monitor)
    selected = [
        s
        for s in docs
        if s["kind"] == "Service"
        and monitor["spec"]["selector"]["matchLabels"].items() <= s["metadata"]["labels"].items()
    ]
    assert [s["metadata"]["name"] for s in selected] == [f"{RELEASE}-metrics"]
    port_names = {p["name"] for p in selected[0]["spec"]["ports"]}
    assert {e["port"] for e in monitor["spec"]["endpoints"]} == port_names
    assert monitor["spec"]["namespaceSelector"]["matchNames"] == [NAMESPACE]
    bad = copy.deepcopy(monitor)
    bad["spec"]["endpoints"][0]["intervall"] = "30s"
    with pytest.raises(jsonschema.ValidationError, match="intervall"):
        schema("servicemonitor.schema.json").validate(bad)
    assert all(d["kind"] != "ServiceMonitor" for d in rendered["values.yaml"])


# --------------------------------------------------------------------------- roles and resources


@pytest.mark.parametrize("values_file", VALUES_FILES)
def test_worker_groups_and_cluster_config_follow_the_values(
    chart: helm.Chart, rendered: dict[str, list[dict[str, Any]]], values_file: str
) -> None:
    values = merged(chart, values_file)
    docs = rendered[values_file]
    config = cluster_config(docs)
    enabled = [r for r in ROLES if values["workerGroups"][r]["enabled"]]
    assert list(groups(docs)) == enabled
    for role in ROLES:
        wanted = values["workerGroups"][role]
        role_config = config.role(role)
        if role not in enabled:
            assert role_config.replicas == 0
            continue
        group = groups(docs)[role]
        counts = (group["replicas"], group["minReplicas"], group["maxReplicas"])
        assert counts == (wanted["replicas"], wanted["minReplicas"], wanted["maxReplicas"])
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        assert (role_config.replicas, role_config.min_replicas, role_config.max_replicas) == counts
        # The role's actors ask for exactly the custom resource its pods advertise.
        assert role_config.resources == ray_resources(group) == {role: 1}
        for key, value in wanted.get("engine", {}).items():
            assert getattr(role_config, key) == value, key
    assert config.ray.address == "auto"
    assert config.model == values["cluster"].get("model")  # Helm drops null values


@pytest.mark.parametrize("values_file", ["values.yaml", "values-xpyd.yaml"])
def test_gpu_profiles_give_each_worker_pod_its_gpus(
    chart: helm.Chart, rendered: dict[str, list[dict[str, Any]]], values_file: str
) -> None:
    docs = rendered[values_file]
    config = cluster_config(docs)
    assert groups(docs)
    for role, group in groups(docs).items():
        resources = group["template"]["spec"]["containers"][0]["resources"]
        wanted = merged(chart, values_file)["workerGroups"][role]["resources"]
        assert resources == wanted
        assert resources["limits"]["nvidia.com/gpu"] >= 1
        assert config.role(role).num_gpus == resources["limits"]["nvidia.com/gpu"]
        assert any(
            t.get("key") == "nvidia.com/gpu" for t in group["template"]["spec"]["tolerations"]
        )
    assert "nvidia.com/gpu" not in json.dumps(head_container(docs)["resources"])


def test_cpu_profile_uses_custom_ray_resources_and_no_gpu(
    chart: helm.Chart, rendered: dict[str, list[dict[str, Any]]]
) -> None:
    docs = rendered["values-cpu.yaml"]
    assert "nvidia.com/gpu" not in json.dumps(docs)
    config = cluster_config(docs)
    assert set(groups(docs)) == {"prefill", "decode"}
    for role, group in groups(docs).items():
        assert ray_resources(group) == {role: 1}
        assert config.role(role).num_gpus == 0
        assert config.role(role).resources == {role: 1}
        assert "tolerations" not in group["template"]["spec"]
    assert config.dtype == "float32"
    container_env = {e["name"]: e["value"] for e in head_container(docs)["env"]}
    assert container_env["UCX_TLS"] == "tcp,self"


# --------------------------------------------------------------------------- frontends


@pytest.mark.parametrize("values_file", VALUES_FILES)
def test_frontends_ports_probes_and_services(
    chart: helm.Chart, rendered: dict[str, list[dict[str, Any]]], values_file: str
) -> None:
    values = merged(chart, values_file)["frontend"]
    docs = rendered[values_file]
    head = ray_cluster(docs)["spec"]["headGroupSpec"]["template"]
    container = head["spec"]["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert (ports["http"], ports["grpc"]) == (values["httpPort"], values["grpcPort"])
    assert container["readinessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    assert container["livenessProbe"]["grpc"] == {"port": values["grpcPort"]}
    assert container["startupProbe"]["grpc"] == {"port": values["grpcPort"]}
    script = container["args"][0]
    assert f"--port {values['httpPort']} --grpc-port {values['grpcPort']}" in script
    assert "--host 0.0.0.0" in script

    service = one(docs, "Service", RELEASE)
    by_name = {p["name"]: p for p in service["spec"]["ports"]}
    assert (by_name["http"]["port"], by_name["grpc"]["port"]) == (8000, 50051)
    assert {p["targetPort"] for p in by_name.values()} <= set(ports)
    selector = service["spec"]["selector"].items()
    assert selector <= head["metadata"]["labels"].items()
    for group in groups(docs).values():
        assert not selector <= group["template"]["metadata"]["labels"].items()
    metrics = one(docs, "Service", f"{RELEASE}-metrics")
    assert {p["targetPort"] for p in metrics["spec"]["ports"]} <= set(ports)
    assert metrics["spec"]["selector"] == service["spec"]["selector"]


@pytest.mark.parametrize("values_file", VALUES_FILES)
def test_head_serves_the_mounted_cluster_config(
    rendered: dict[str, list[dict[str, Any]]], values_file: str
) -> None:
    docs = rendered[values_file]
    head = ray_cluster(docs)["spec"]["headGroupSpec"]["template"]["spec"]
    mount = next(m for m in head["containers"][0]["volumeMounts"] if m["name"] == "cluster-config")
    volume = next(v for v in head["volumes"] if v["name"] == "cluster-config")
    assert volume["configMap"]["name"] == one(docs, "ConfigMap")["metadata"]["name"]
    assert (
        f"splitserve serve --config {mount['mountPath']}/cluster.yaml"
        in head["containers"][0]["args"][0]
    )
    annotations = ray_cluster(docs)["metadata"]["annotations"]
    assert annotations["ray.io/overwrite-container-cmd"] == "true"
    assert 'eval "$KUBERAY_GEN_RAY_START_CMD" &' in head["containers"][0]["args"][0]


@pytest.mark.parametrize("values_file", VALUES_FILES)
def test_worker_pods_are_ray_nodes_only(
    rendered: dict[str, list[dict[str, Any]]], values_file: str
) -> None:
    for group in groups(rendered[values_file]).values():
        spec = group["template"]["spec"]
        (container,) = spec["containers"]
        assert "ports" not in container  # no frontend on workers; KubeRay adds its own probes
        assert not {"readinessProbe", "livenessProbe", "startupProbe"} & set(container)
        assert container["args"] == ['ulimit -n 65536; eval "exec $KUBERAY_GEN_RAY_START_CMD"']
        shm = next(m for m in container["volumeMounts"] if m["mountPath"] == "/dev/shm")
        assert any(
            v["name"] == shm["name"] and v["emptyDir"]["medium"] == "Memory"
            for v in spec["volumes"]
        )


def test_worker_command_hands_ray_start_the_role_resources_as_json(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    """KubeRay pastes rayStartParams into `ray start --key=value` ($KUBERAY_GEN_RAY_START_CMD);
    run the worker pod's real command with `ray` swapped for an argv printer and check that
    --resources arrives as the role's JSON."""
    printer = f"{sys.executable} -c 'import json, sys; print(json.dumps(sys.argv[1:]))'"
    for role, group in groups(rendered["values-cpu.yaml"]).items():
        container = group["template"]["spec"]["containers"][0]
        params = " ".join(f"--{k}={v}" for k, v in group["rayStartParams"].items())
        generated = f"{printer} --address=head:6379 {params} --block"
        result = subprocess.run(
            [*container["command"], *container["args"]],
            env={"KUBERAY_GEN_RAY_START_CMD": generated, "PATH": os.environ["PATH"]},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr
        argv = json.loads(result.stdout)
        (resources,) = [a.removeprefix("--resources=") for a in argv if a.startswith("--resources")]
        assert json.loads(resources) == {role: 1}


def test_api_key_secret_reaches_the_frontends_as_a_file(chart: helm.Chart) -> None:
    """The key is a mounted Secret file read by --api-key-file: never an environment variable
    (the Ray head in the same container, and so every actor, would inherit it) nor an
    argument (process lists)."""
    docs = objects(render(chart, {"frontend": {"apiKeySecret": {"name": "llm-key"}}}))
    container = head_container(docs)
    assert not [e for e in container.get("env", []) if "API_KEY" in e["name"]]
    mount = next(m for m in container["volumeMounts"] if m["name"] == "api-key")
    assert mount["readOnly"] is True
    path = f"{mount['mountPath']}/api-key"
    assert f"--api-key-file {path}" in container["args"][0]
    assert "--api-key " not in container["args"][0]
    head = next(d for d in docs if d["kind"] == "RayCluster")["spec"]["headGroupSpec"]
    volume = next(v for v in head["template"]["spec"]["volumes"] if v["name"] == "api-key")
    assert volume["secret"]["secretName"] == "llm-key"
    assert volume["secret"]["items"] == [{"key": "api-key", "path": "api-key"}]
    plain = head_container(objects(render(chart, {})))
    assert "--api-key" not in plain["args"][0]
    assert "api-key" not in [m["name"] for m in plain["volumeMounts"]]


# --------------------------------------------------------------------------- redis and autoscaling


def test_xpyd_shares_redis_between_registry_and_gcs_fault_tolerance(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    docs = rendered["values-xpyd.yaml"]
    service = one(docs, "Service", f"{RELEASE}-redis")
    deployment = one(docs, "Deployment", f"{RELEASE}-redis")
    assert service["spec"]["selector"].items() <= (
        deployment["spec"]["template"]["metadata"]["labels"].items()
    )
    address = f"{service['metadata']['name']}:{service['spec']['ports'][0]['port']}"
    spec = ray_cluster(docs)["spec"]
    assert spec["gcsFaultToleranceOptions"] == {"redisAddress": address}
    assert cluster_config(docs).registry.url == f"redis://{address}/0"
    assert spec["enableInTreeAutoscaling"] is True
    assert (groups(docs)["prefill"]["replicas"], groups(docs)["decode"]["replicas"]) == (2, 4)
    for doc in rendered["values.yaml"]:
        assert "redis" not in doc["metadata"]["name"]
    assert cluster_config(rendered["values.yaml"]).registry.url == "memory"


def test_external_redis_url_is_used_as_given(chart: helm.Chart) -> None:
    url = "redis://redis.infra.svc:6380/2"
    docs = objects(
        render(chart, {"redis": {"externalUrl": url}, "gcsFaultTolerance": {"enabled": True}})
    )
    assert cluster_config(docs).registry.url == url
    assert (
        ray_cluster(docs)["spec"]["gcsFaultToleranceOptions"]["redisAddress"]
        == "redis.infra.svc:6380"
    )
    assert all(d["kind"] != "Deployment" for d in docs)


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"workerGroups": {"prefill": {"replicas": -1}}}, "/workerGroups/prefill/replicas"),
        ({"replicaCount": 2}, "additional properties 'replicaCount' not allowed"),
        ({"frontend": {"httpPort": "8000"}}, "/frontend/httpPort': got string, want integer"),
        ({"image": {"tag": 1.0}}, "/image/tag"),
        ({"workerGroups": {"vision": {"enabled": True}}}, "'vision' not allowed"),
        ({"cluster": {"dtype": "fp8"}}, "/cluster/dtype"),
        ({"cluster": {"roles": {}}}, "'roles' not allowed"),
        ({"workerGroups": {"decode": {"replicas": 0, "minReplicas": 0}}}, "/workerGroups/decode"),
        ({"workerGroups": {"prefill": {"rayStartParams": {"resources": "{}"}}}}, "rayStartParams"),
    ],
)
def test_values_against_the_schema_fail_render_and_lint(
    chart: helm.Chart, values: dict[str, Any], message: str
) -> None:
    with pytest.raises(helm.HelmValuesError) as info:
        render(chart, values)
    assert message in str(info.value)
    report = helm.lint(CHART, values, strict=True)
    assert any(message in error for error in report["errors"]), report


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (
            {"workerGroups": {"prefill": {"replicas": 5}}},
            "prefill.replicas (5) must be <= maxReplicas (2)",
        ),
        (
            {"workerGroups": {"decode": {"replicas": 1, "minReplicas": 2}}},
            "must be >= minReplicas (2)",
        ),
        ({"gcsFaultTolerance": {"enabled": True}}, "gcsFaultTolerance.enabled needs Redis"),
        ({"redis": {"enabled": True, "externalUrl": "redis://r:6379/0"}}, "not both"),
    ],
)
def test_cross_field_mistakes_fail_render_naming_the_keys(
    chart: helm.Chart, values: dict[str, Any], message: str
) -> None:
    chart.validate_schema(values)  # each value alone is fine; only their combination is not
    with pytest.raises(helm.HelmRenderError) as info:
        render(chart, values)
    assert message in str(info.value)


def test_values_schema_offers_only_cluster_config_settings() -> None:
    """values.schema.json's `cluster` and `engine` keys are ClusterConfig's (cluster/config.py),
    so values the schema accepts never fail at `splitserve serve`; roles and the number of
    replicas, GPUs and custom resources per role are the chart's to write."""
    values_schema = json.loads((CHART / "values.schema.json").read_text())
    cluster = values_schema["properties"]["cluster"]["properties"]
    assert set(cluster) == set(ClusterConfig.model_fields) - {"roles"}
    allowed = {name: set(typing.get_args(ClusterConfig.model_fields[name].annotation))
               for name in ("dtype", "quantization", "kv_cache_dtype")}
    assert set(cluster["dtype"]["enum"]) <= allowed["dtype"]
    assert set(cluster["quantization"]["enum"]) == allowed["quantization"]  # every format serve takes
    assert set(cluster["kv_cache_dtype"]["enum"]) == allowed["kv_cache_dtype"]
    assert set(cluster["kv_transfer"]["properties"]) == set(KvTransferConfig.model_fields)
    engine = values_schema["definitions"]["engine"]["properties"]
    from_group = {"replicas", "min_replicas", "max_replicas", "num_gpus", "resources"}
    assert set(engine) <= set(RoleConfig.model_fields) - from_group
    assert {"max_num_seqs", "max_num_batched_tokens", "max_restarts"} <= set(engine)


# --------------------------------------------------------------------------- golden renders


def manifest_text(rendered: dict[str, str]) -> str:
    """All manifests in template order, each under a `# Source:` line as `helm template` prints."""
    parts = [
        f"---\n# Source: {name}\n{rendered[name].strip()}\n"
        for name in sorted(rendered)
        if name.endswith(".yaml") and rendered[name].strip()
    ]
    return "".join(parts)


@pytest.mark.parametrize("values_file", VALUES_FILES)
def test_render_matches_golden(chart: helm.Chart, values_file: str) -> None:
    text = manifest_text(render(chart, file_values(values_file)))
    golden = GOLDEN / values_file
    if UPDATE_GOLDEN:
        golden.parent.mkdir(parents=True, exist_ok=True)
        golden.write_text(text)
    assert golden.exists(), f"{golden} missing: run with SPLITSERVE_UPDATE_GOLDEN=1 to write it"
    expected = golden.read_text()
    if text != expected:
        diff = "".join(
            difflib.unified_diff(
                expected.splitlines(True), text.splitlines(True), str(golden), "rendered", n=2
            )
        )
        pytest.fail(
            f"render of {values_file} drifted from {golden}; if intended, regenerate with "
            f"SPLITSERVE_UPDATE_GOLDEN=1 .venv/bin/pytest -q tests/unit/test_helm_chart.py\n"
            f"{diff[:6000]}"
        )


@pytest.mark.parametrize("value", [0, 255, "all"])
def test_local_prefill_max_tokens_takes_a_count_or_all(chart: helm.Chart, value: Any) -> None:
    """``all`` (every prompt prefills on its decode worker) is a value the cluster takes, so
    the chart's schema takes it too and passes it through."""
    docs = objects(render(chart, {"cluster": {"router": {"local_prefill_max_tokens": value}}}))
    assert cluster_config(docs).router.local_prefill_max_tokens == value


def test_local_prefill_max_tokens_refuses_other_words(chart: helm.Chart) -> None:
    with pytest.raises(helm.HelmValuesError) as info:
        render(chart, {"cluster": {"router": {"local_prefill_max_tokens": "some"}}})
    assert "local_prefill_max_tokens" in str(info.value)
