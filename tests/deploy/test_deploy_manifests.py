"""deploy/'s compose file, Kubernetes manifests, Prometheus and Grafana provisioning pass
the schema validators installed from the registries, and say what the runbook says they
say (one GPU per worker, a grace period longer than a slide, KEDA on outstanding scans,
the pod-deletion-cost RBAC, the PDB).

Validators: yamllint; check-jsonschema's Compose Specification schema; `docker-compose
config` (Debian's docker-compose v1) and `docker compose config` where installed;
kubernetes-validate (the Kubernetes OpenAPI schemas, strict); cloudcoil-models-keda (KEDA's
CRDs as pydantic models) plus a schema of the postgresql trigger written from KEDA's
documentation (no registry package ships it); promtool (Debian's prometheus)."""

from __future__ import annotations

import json
import os
import re

import jsonschema
import pytest

from tests.deploy.deploy_files import (
    COMPOSE,
    DEPLOY,
    K8S,
    PROMETHEUS,
    REPO,
    YAMLLINT_CONFIG,
    compose,
    k8s_doc,
    k8s_docs,
    k8s_manifests,
    load_yaml_docs,
    run_tool,
    tool,
)

KUBERNETES_VERSIONS = ("1.29.0", "1.37.0")  # the oldest we claim, kubernetes-validate's newest
GPU = "nvidia.com/gpu"


def _duration_s(text: str) -> int:
    """Seconds of a Compose duration such as `2h20m` or `90s`."""
    units = {"h": 3600, "m": 60, "s": 1}
    parts = re.findall(r"(\d+)([hms])", text)
    assert parts and "".join(n + u for n, u in parts) == text, text
    return sum(int(n) * units[u] for n, u in parts)


# --- YAML -------------------------------------------------------------------------------------


def test_yamllint_passes_on_deploy():
    from yamllint import linter
    from yamllint.config import YamlLintConfig

    config = YamlLintConfig(file=str(YAMLLINT_CONFIG))
    problems = []
    for path in sorted(DEPLOY.rglob("*.y*ml")):
        for problem in linter.run(path.read_text(), config, str(path)):
            problems.append(f"{path.relative_to(REPO)}:{problem.line}: {problem.desc}")
    assert not problems, "\n".join(problems)


# --- compose ----------------------------------------------------------------------------------


def test_compose_matches_the_compose_specification_schema():
    result = run_tool(
        [
            tool("check-jsonschema", "pip install check-jsonschema"),
            "--builtin-schema",
            "vendor.compose-spec",
            str(COMPOSE),
        ]
    )
    assert result.returncode == 0, result.stdout + result.stderr


def _compose_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("COMPOSE_")}


@pytest.mark.parametrize("profile", ["gpu", "cpu"])
def test_docker_compose_v1_accepts_the_file(profile):
    """Debian's docker-compose (v1) parses and validates the file in both profiles."""
    exe = tool("docker-compose", "Debian package docker-compose; .ci/run installs it")
    env = {**_compose_env(), "COMPOSE_PROFILES": profile}
    result = run_tool(
        [exe, "--project-directory", str(DEPLOY), "-f", str(COMPOSE), "config", "-q"], env=env
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_docker_compose_v2_accepts_the_file():
    """The Compose v2 plugin (`docker compose`), where a machine has it."""
    docker = tool("docker", "the docker CLI with its compose plugin")
    if run_tool([docker, "compose", "version"]).returncode != 0:
        pytest.skip(
            "`docker compose` (the v2 plugin) is not installed; docker-compose v1 checks it"
        )
    result = run_tool([docker, "compose", "-f", str(COMPOSE), "config", "-q"], env=_compose_env())
    assert result.returncode == 0, result.stdout + result.stderr


def test_redis_keeps_every_job():
    redis = compose()["services"]["redis"]
    command = " ".join(redis["command"])
    assert "--appendonly yes" in command
    assert "--maxmemory-policy noeviction" in command
    assert any(v.endswith(":/data") for v in redis["volumes"])
    assert any(
        v.endswith(":/var/lib/postgresql/data")
        for v in compose()["services"]["postgres"]["volumes"]
    )


def test_each_compose_gpu_worker_owns_one_gpu_of_its_own():
    services = compose()["services"]
    gpu_workers = {n: s for n, s in services.items() if "gpu" in (s.get("profiles") or [])}
    assert len(gpu_workers) >= 2
    ids = []
    for name, service in gpu_workers.items():
        (device,) = service["deploy"]["resources"]["reservations"]["devices"]
        assert device["capabilities"] == ["gpu"] and device["driver"] == "nvidia", name
        assert "count" not in device and len(device["device_ids"]) == 1, name
        ids += device["device_ids"]
    assert len(set(ids)) == len(ids), f"two workers share a GPU: {ids}"
    # Prometheus finds every one of them.
    scrape = load_yaml_docs(PROMETHEUS)[0]["scrape_configs"]
    names = {n for job in scrape for sd in job.get("dns_sd_configs", []) for n in sd["names"]}
    assert set(gpu_workers) | {"worker-cpu"} <= names


def test_compose_workers_outlast_a_slide_when_stopped():
    hard_limit_s = _settings_default_hard_limit_s()
    for name, service in compose()["services"].items():
        if name.startswith("worker"):
            assert service["stop_signal"] == "SIGTERM"
            assert _duration_s(service["stop_grace_period"]) > hard_limit_s + 10, name


def test_every_container_sees_the_slides_at_the_same_path():
    for name in ("worker-gpu0", "worker-cpu", "api", "watch"):
        volumes = compose()["services"][name]["volumes"]
        assert any(re.search(r":/slides(:ro)?$", v) for v in volumes), name


def _settings_default_hard_limit_s() -> int:
    from worker.settings import get_settings

    return get_settings({}).scan_hard_limit_s


# --- Kubernetes ---------------------------------------------------------------------------------


def test_kustomization_lists_every_manifest_but_the_example_secret():
    kustomization = load_yaml_docs(K8S / "kustomization.yaml")[0]
    listed = set(kustomization["resources"])
    present = {p.name for p in k8s_manifests()}
    assert listed == present - {"secret.example.yaml"}


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_kubernetes_manifests_match_the_api_schemas(version):
    import kubernetes_validate

    checked, errors = 0, []
    for path, doc in k8s_docs():
        if doc["apiVersion"].startswith("keda.sh/"):
            continue  # a CRD: checked below
        try:
            kubernetes_validate.validate(doc, version, strict=True)
            checked += 1
        except kubernetes_validate.ValidationError as exc:
            errors.append(f"{path.name} {doc['kind']}/{doc['metadata']['name']}: {exc.message}")
    assert not errors, "\n".join(errors)
    assert checked >= 10


def _strict_round_trip(model_cls, doc):
    """Validate `doc` with a pydantic model of a CRD; fields the CRD does not have are
    dropped by the model, so a round trip that loses anything names a field KEDA lacks."""
    model = model_cls.model_validate(doc)
    dumped = model.model_dump(by_alias=True, exclude_unset=True, mode="json")
    assert dumped == json.loads(json.dumps(doc)), f"fields KEDA does not know in {doc['kind']}"


# KEDA's postgresql trigger, as documented (keda.sh/docs, scalers/postgresql: trigger
# metadata and authentication parameters, v2.15); its metadata is a free string map in the
# CRD, so this is what catches a misspelt key.
POSTGRESQL_TRIGGER = {
    "type": "object",
    "required": ["query", "targetQueryValue"],
    "additionalProperties": False,
    "properties": {
        "query": {"type": "string", "pattern": "(?i)^\\s*select\\b"},
        "targetQueryValue": {"type": "string", "pattern": "^[0-9]+(\\.[0-9]+)?$"},
        "activationTargetQueryValue": {"type": "string", "pattern": "^[0-9]+(\\.[0-9]+)?$"},
        "connectionFromEnv": {"type": "string"},
        "host": {"type": "string"},
        "port": {"type": "string"},
        "userName": {"type": "string"},
        "passwordFromEnv": {"type": "string"},
        "dbName": {"type": "string"},
        "sslmode": {"enum": ["disable", "allow", "prefer", "require", "verify-ca", "verify-full"]},
    },
}
POSTGRESQL_AUTH_PARAMETERS = {
    "connection",
    "host",
    "port",
    "userName",
    "password",
    "dbName",
    "sslmode",
}


def test_keda_objects_match_keda_schemas():
    from cloudcoil.models.keda import v1alpha1 as keda

    kinds = {}
    for _, doc in k8s_docs():
        if doc["apiVersion"] == "keda.sh/v1alpha1":
            _strict_round_trip(getattr(keda, doc["kind"]), doc)
            kinds[doc["kind"]] = doc
    assert set(kinds) == {"ScaledObject", "TriggerAuthentication"}

    (trigger,) = kinds["ScaledObject"]["spec"]["triggers"]
    assert trigger["type"] == "postgresql"
    jsonschema.validate(trigger["metadata"], POSTGRESQL_TRIGGER)
    auth = kinds["TriggerAuthentication"]
    assert trigger["authenticationRef"]["name"] == auth["metadata"]["name"]
    parameters = {ref["parameter"] for ref in auth["spec"]["secretTargetRef"]}
    assert parameters <= POSTGRESQL_AUTH_PARAMETERS
    assert "connection" in parameters or "host" in trigger["metadata"]


def test_the_keda_schema_check_catches_mistakes():
    from cloudcoil.models.keda import v1alpha1 as keda

    scaled = k8s_doc("ScaledObject", "papscan-worker")
    wrong = json.loads(json.dumps(scaled))
    wrong["spec"]["minReplicas"] = 0
    with pytest.raises(AssertionError):
        _strict_round_trip(keda.ScaledObject, wrong)
    metadata = {**scaled["spec"]["triggers"][0]["metadata"], "targetValue": "1"}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(metadata, POSTGRESQL_TRIGGER)


def test_keda_scales_the_worker_deployment_from_zero_on_one_scan_per_pod():
    spec = k8s_doc("ScaledObject", "papscan-worker")["spec"]
    assert (
        spec["scaleTargetRef"]["name"]
        == k8s_doc("Deployment", "papscan-worker")["metadata"]["name"]
    )
    assert spec.get("scaleTargetRef", {}).get("kind", "Deployment") == "Deployment"
    assert spec["minReplicaCount"] == 0 and spec["maxReplicaCount"] >= 1
    assert spec["triggers"][0]["metadata"]["targetQueryValue"] == "1"
    assert all(t["type"] != "redis" for t in spec["triggers"]), "a list length scales in mid-slide"
    assert "replicas" not in k8s_doc("Deployment", "papscan-worker")["spec"], "KEDA owns it"


def _worker():
    deployment = k8s_doc("Deployment", "papscan-worker")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = {e["name"]: e for e in container["env"]}
    return deployment, pod, container, env


def test_each_worker_pod_holds_one_gpu():
    _, _, container, _ = _worker()
    assert container["resources"]["limits"][GPU] == "1"
    assert container["resources"]["requests"][GPU] == "1"


def test_the_worker_grace_period_outlasts_the_longest_slide():
    _, pod, _, env = _worker()
    hard_limit_s = int(env["PAPSCAN_SCAN_HARD_LIMIT_S"]["value"])
    soft_limit_s = int(env["PAPSCAN_SCAN_SOFT_LIMIT_S"]["value"])
    assert soft_limit_s < hard_limit_s
    # The worker ends a scan past the hard limit and exits within 10 s.
    assert pod["terminationGracePeriodSeconds"] > hard_limit_s + 10


def test_the_worker_is_ready_only_after_warm_up():
    _, _, container, _ = _worker()
    for probe in ("startupProbe", "readinessProbe"):
        assert container[probe]["exec"]["command"] == ["papscan-probe", "ready"], probe
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 20 * 60, "TensorRT builds"


def test_the_worker_can_set_its_own_pod_deletion_cost():
    _, pod, _, env = _worker()
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert env["POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    account = pod["serviceAccountName"]
    k8s_doc("ServiceAccount", account)
    bindings = [
        d
        for _, d in k8s_docs()
        if d["kind"] == "RoleBinding" and any(s["name"] == account for s in d["subjects"])
    ]
    assert bindings
    role = k8s_doc("Role", bindings[0]["roleRef"]["name"])
    (rule,) = role["rules"]
    assert rule["apiGroups"] == [""] and rule["resources"] == ["pods"]
    assert set(rule["verbs"]) == {"get", "patch"}


def test_the_disruption_budget_covers_the_workers():
    deployment, _, _, _ = _worker()
    pdb = k8s_doc("PodDisruptionBudget", "papscan-worker")["spec"]
    assert pdb["selector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]
    assert pdb["maxUnavailable"] == 1


def test_urls_come_from_the_secret_the_example_shows():
    (secret,) = load_yaml_docs(K8S / "secret.example.yaml")
    keys = set(secret["stringData"])
    refs = []
    for _, doc in k8s_docs():
        spec = doc.get("spec", {}).get("template", {}).get("spec", {})
        for container in spec.get("containers", []):
            env = {e["name"]: e for e in container.get("env", [])}
            for name in ("PAPSCAN_DB_URL", "PAPSCAN_BROKER_URL"):
                assert "valueFrom" in env[name], f"{doc['metadata']['name']}: {name} inline"
                refs.append(env[name]["valueFrom"]["secretKeyRef"])
        for ref in doc.get("spec", {}).get("secretTargetRef", []):
            refs.append(ref)
    assert refs
    for ref in refs:
        assert ref["name"] == secret["metadata"]["name"] and ref["key"] in keys, ref


# --- Prometheus, Grafana provisioning ----------------------------------------------------------


def test_promtool_accepts_the_prometheus_config():
    exe = tool("promtool", "Debian package prometheus; .ci/run installs it")
    result = run_tool([exe, "check", "config", str(PROMETHEUS)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_grafana_provisioning_points_at_the_dashboards_compose_mounts():
    grafana = compose()["services"]["grafana"]
    mounts = dict(
        v.rsplit(":", 1)[0].split(":", 1) for v in grafana["volumes"] if v.startswith("./")
    )
    provider = load_yaml_docs(DEPLOY / "grafana/provisioning/dashboards/papscan.yaml")[0]
    (entry,) = provider["providers"]
    assert mounts["./grafana/dashboards"] == entry["options"]["path"]
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"
    (source,) = load_yaml_docs(DEPLOY / "grafana/provisioning/datasources/prometheus.yaml")[0][
        "datasources"
    ]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home.startswith(entry["options"]["path"] + "/")
    assert (DEPLOY / "grafana/dashboards" / home.rsplit("/", 1)[1]).is_file()
