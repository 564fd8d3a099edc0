"""helm/loraplex without a cluster: the real Helm library (helm-python-sdk) lints the chart
strictly, checks values against values.schema.json and renders it for several value sets; every
rendered object passes the Kubernetes 1.32 schemas (kubernetes-validate, strict), and the
Prometheus Operator objects, which have no core schema, are checked here against the files they
embed. Then what a production install depends on: GPUs on the engine, LoRA flags, probes,
non-root read-only gateway, secrets only in Secrets, HPA and PDB, references that resolve, engine
discovery through a headless Service (any number of engines), and gateway settings that the
gateway itself parses back from the rendered environment."""

from __future__ import annotations

import base64
import copy
import functools
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import helm_python as helm
import kubernetes_validate
import pytest
import yaml
from pydantic import BaseModel

from router.policy import load_routes
from server.app import read_adapters_file
from server.auth import hash_key, read_tenants_file
from server.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "loraplex"
ALERTS = CHART / "files" / "alerts.yml"
DASHBOARD = CHART / "files" / "loraplex-dashboard.json"
KUBE_VERSION = "1.32"
CRD_KINDS = {"ServiceMonitor", "PrometheusRule"}
NAMESPACE = "llm"
RELEASE = "lp"

ADMIN_KEY = "adm-5b1d0c7e9a2f4e61b3c8"
TENANT_KEY = "sk-clinic-0f3a9c2e7d5b41a8"
DB_PASSWORD = "pg-Secr3t-9q7w"
DB_URL = f"postgresql+asyncpg://loraplex:{DB_PASSWORD}@pg.db.svc:5432/loraplex"
ROUTES = {
    "version": 1,
    "fallback": "base",
    "catch_all": ["general"],
    "domains": {
        "medical": {"target": "medical", "keywords": ["dose*"], "examples": ["What dose?"]},
        "general": {"target": "base", "keywords": ["hello"]},
    },
}

# Settings the chart wires itself (paths, URLs, keys, engine flags): not in gateway.config.
CHART_OWNED = {
    "host", "port", "tenants_file", "adapters_file", "admin_key_sha256", "admin_key",
    "engine.url", "engine.mode", "engine.served_model_name", "engine.python", "engine.model",
    "engine.max_lora_rank", "engine.max_loras", "engine.max_cpu_loras", "engine.max_model_len",
    "engine.kv_cache_gib", "engine.extra_args", "engine.log_file", "engine.startup_timeout_s",
    "engine.restart_backoff_s", "engine.urls", "engine.discovery_dns",
    "engine.discovery_interval_s", "registry.url", "registry.cache_dir", "registry.base_model_dir",
    "router.routes_file", "router.artefact",
}  # fmt: skip


def production_values() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((CHART / "values-gpu-production.yaml").read_text())
    return loaded


def production_with_engines(replicas: int) -> dict[str, Any]:
    values = production_values()
    values["engine"]["replicas"] = replicas
    return values


VALUE_SETS: dict[str, dict[str, Any]] = {
    "default": {},
    "gpu-production": production_values(),
    "gpu-production-3-engines": production_with_engines(3),
    # Three engines on the defaults, another cluster domain and discovery interval.
    "engines-3": {
        "clusterDomain": "k8s.example.internal",
        "engine": {"replicas": 3, "discovery": {"intervalSeconds": 2.5}},
    },
    # Everything given inline: the chart creates the Secrets and the ConfigMap.
    "inline": {
        "gateway": {
            "replicas": 2,
            "autoscaling": {"enabled": True, "minReplicas": 2, "maxReplicas": 4},
            "config": {
                "log_level": "warning",
                "max_body_bytes": 8388608,
                "engine": {"read_timeout_s": 90.5, "pool_size": 256, "spill_threshold": 8},
                "registry": {"budget": 12, "max_adapter_bytes": 2147483648},
                "router": {"classifier": "keyword"},
                "experiments": {"prometheus_url": "http://prometheus:9090"},
                "drift": {"enabled": False, "thresholds": {"domain_psi": 0.3}},
            },
        },
        "auth": {"adminKeySha256": hash_key(ADMIN_KEY)},
        "tenants": {
            "seed": {
                "clinic": {
                    "key_sha256": [hash_key(TENANT_KEY)],
                    "adapters": ["medical", "base"],
                    "default": "medical",
                    "quotas": {"requests_per_minute": 600, "max_concurrent": 8, "max_tokens": 512},
                }
            }
        },
        "adapters": {"medical": "s3://adapters/medical-v3.tar.gz"},
        "router": {"routes": ROUTES},
        "externalPostgresql": {"url": DB_URL},
        "metrics": {"serviceMonitor": {"enabled": True}, "prometheusRule": {"enabled": True}},
    },
    # Everything secret or stateful comes from objects that exist before the install.
    "existing-secrets": {
        "gateway": {"replicas": 3},
        "auth": {"existingSecret": "ops-admin", "existingSecretKey": "digest"},
        "tenants": {"existingSecret": "ops-tenants"},
        "router": {"existingConfigMap": "ops-routes"},
        "externalPostgresql": {"existingSecret": "ops-db", "existingSecretKey": "dsn"},
        "storage": {
            "adapters": {"existingClaim": "shared-adapters"},
            "models": {"existingClaim": "shared-models"},
        },
        "metrics": {"grafanaDashboard": {"enabled": False}},
    },
    # A CPU engine, one gateway on SQLite, nothing optional.
    "cpu-sqlite": {
        "engine": {
            "image": {"repository": "registry.example.com/vllm-cpu", "tag": "v0.32.0"},
            "gpu": {"count": 0},
            "resources": {"requests": {"cpu": "8", "memory": "16Gi"}},
            "extraEnv": [{"name": "VLLM_CPU_KVCACHE_SPACE", "value": "4"}],
        },
        "gateway": {"podDisruptionBudget": {"enabled": False}},
        "metrics": {"grafanaDashboard": {"enabled": False}},
    },
}
SETS = list(VALUE_SETS)


@functools.cache
def chart() -> helm.Chart:
    return helm.Chart.load(CHART)


@functools.cache
def _render(name: str) -> tuple[dict[str, Any], ...]:
    rendered = chart().render(VALUE_SETS[name], name=RELEASE, namespace=NAMESPACE)
    objects: list[dict[str, Any]] = []
    for path, text in sorted(rendered.items()):
        if path.endswith("NOTES.txt"):
            continue
        objects.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return tuple(objects)


def render(name: str) -> list[dict[str, Any]]:
    return copy.deepcopy(list(_render(name)))


def notes(values: dict[str, Any]) -> str:
    rendered = chart().render(values, name=RELEASE, namespace=NAMESPACE)
    return next(text for path, text in rendered.items() if path.endswith("NOTES.txt"))


def of_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]


def one(objects: list[dict[str, Any]], kind: str, component: str | None = None) -> dict[str, Any]:
    found = [
        o
        for o in of_kind(objects, kind)
        if component is None
        or o["metadata"]["labels"].get("app.kubernetes.io/component") == component
    ]
    assert len(found) == 1, f"{len(found)} {kind} objects for {component}"
    return found[0]


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    containers: list[dict[str, Any]] = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def env(c: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in c.get("env", [])}


def mounts(deployment: dict[str, Any]) -> dict[str, tuple[str, bool, dict[str, Any]]]:
    """mount path → (volume name, read-only, volume source) of the only container."""
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    return {
        m["mountPath"]: (m["name"], bool(m.get("readOnly")), volumes[m["name"]])
        for m in container(deployment)["volumeMounts"]
    }


def secret_data(objects: list[dict[str, Any]]) -> dict[tuple[str, str], str]:
    return {
        (s["metadata"]["name"], key): base64.b64decode(value).decode()
        for s in of_kind(objects, "Secret")
        for key, value in s.get("data", {}).items()
    }


# --- the chart as Helm sees it ------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["default", "gpu-production", "gpu-production-3-engines", "engines-3"]
)
def test_chart_lints_strictly(name: str) -> None:
    report = helm.lint(CHART, VALUE_SETS[name], strict=True, namespace=NAMESPACE)
    assert report["errors"] == []
    serious = [m for m in report["messages"] if m["severity"] >= 2]  # warnings and errors
    assert serious == []


@pytest.mark.parametrize("name", SETS)
def test_value_set_passes_the_schema(name: str) -> None:
    chart().validate_schema(VALUE_SETS[name])


def with_value(path: str, value: Any) -> dict[str, Any]:
    values: dict[str, Any] = {}
    node = values
    *parents, leaf = path.split(".")
    for key in parents:
        node = node.setdefault(key, {})
    node[leaf] = value
    return values


@pytest.mark.parametrize(
    ("path", "value"),
    [
        ("replicaCount", 3),  # unknown top-level key
        ("gateway.replica", 2),  # typo
        ("gateway.replicas", 0),
        ("gateway.image.pullPolicy", "Sometimes"),
        ("gateway.config.engine.urll", "http://x"),  # not a gateway setting
        ("gateway.config.engine.url", "http://elsewhere:8000"),  # wired by the chart
        ("gateway.config.engine.discovery_dns", "engines.example"),  # wired by the chart
        ("gateway.config.engine.urls", ["http://a:8000", "http://b:8000"]),  # wired by the chart
        ("gateway.config.engine.discovery_interval_s", 5),  # engine.discovery.intervalSeconds
        ("gateway.config.engine.spill_threshold", 0),
        ("gateway.config.registry.budget", "eight"),
        ("gateway.config.log_level", "verbose"),
        ("gateway.autoscaling.targetCPUUtilizationPercentage", 0),
        ("gateway.podDisruptionBudget.maxUnavailable", "half"),
        ("engine.gpu.count", -1),
        ("engine.discovery.intervalSeconds", 0),
        ("engine.discovery.enabled", False),  # discovery is always on
        ("clusterDomain", "Cluster Local"),
        ("clusterDomain", ""),
        ("engine.lora.maxLoraRank", 7),
        ("engine.model.path", "/models/base"),
        ("engine.model.path", "../base"),
        ("engine.model.gpuMemoryUtilization", 1.5),
        ("auth.adminKeySha256", ADMIN_KEY),  # a key, not its digest
        ("tenants.seed", {"clinic": {"key_sha256": TENANT_KEY}}),  # plaintext tenant key
        ("tenants.seed", {"clinic": {"key_sha256": [hash_key(TENANT_KEY)], "plan": "gold"}}),
        ("externalPostgresql.url", "mysql://user:pw@db/loraplex"),
        ("storage.adapters.accessModes", ["ReadWriteSometimes"]),
        ("metrics.serviceMonitor.interval", "often"),
    ],
)
def test_schema_rejects_bad_values(path: str, value: Any) -> None:
    with pytest.raises(helm.HelmValuesError) as refused:
        chart().validate_schema(with_value(path, value))
    assert path.rsplit(".", 1)[-1] in str(refused.value)  # refused for this key


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"gateway": {"replicas": 2}}, "externalPostgresql"),
        ({"gateway": {"autoscaling": {"enabled": True}}}, "externalPostgresql"),
        (
            {"router": {"routes": ROUTES, "existingConfigMap": "ops-routes"}},
            "router.routes or router.existingConfigMap",
        ),
        (
            {
                "externalPostgresql": {"url": DB_URL},
                "gateway": {"autoscaling": {"enabled": True, "minReplicas": 5, "maxReplicas": 3}},
            },
            "minReplicas",
        ),
    ],
)
def test_render_refuses_combinations_that_cannot_work(values: dict[str, Any], message: str) -> None:
    with pytest.raises(helm.HelmRenderError, match=message):
        chart().render(values, name=RELEASE, namespace=NAMESPACE)


# --- every object is valid ----------------------------------------------------------------------


@pytest.mark.parametrize("name", SETS)
def test_rendered_objects_are_valid_kubernetes(name: str) -> None:
    objects = render(name)
    kinds = {o["kind"] for o in objects}
    assert {"Deployment", "Service"} <= kinds
    for obj in objects:
        assert obj["metadata"]["name"], obj
        assert len(obj["metadata"]["name"]) <= 63
        if obj["kind"] in CRD_KINDS:
            continue  # no core schema: test_monitoring_objects checks them
        kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)
    names = [(o["kind"], o["metadata"]["name"]) for o in objects]
    assert len(names) == len(set(names)), "two objects of one kind share a name"


@pytest.mark.parametrize("name", SETS)
def test_references_resolve(name: str) -> None:
    """Every Secret, ConfigMap, claim and ServiceAccount a pod uses is rendered or is one the
    values name as existing."""
    values = VALUE_SETS[name]
    objects = render(name)
    existing = {
        ("Secret", values.get(k, {}).get("existingSecret"))
        for k in ("auth", "tenants", "externalPostgresql")
    } | {("ConfigMap", values.get("router", {}).get("existingConfigMap"))}
    existing |= {
        ("PersistentVolumeClaim", v.get("existingClaim"))
        for v in values.get("storage", {}).values()
    }
    existing |= {("Secret", "loraplex-s3")} if name.startswith("gpu-production") else set()
    rendered = {(o["kind"], o["metadata"]["name"]) for o in objects} | existing
    for deployment in of_kind(objects, "Deployment"):
        pod = deployment["spec"]["template"]["spec"]
        if "serviceAccountName" in pod:
            assert ("ServiceAccount", pod["serviceAccountName"]) in rendered
        for volume in pod["volumes"]:
            if "persistentVolumeClaim" in volume:
                claim = volume["persistentVolumeClaim"]["claimName"]
                assert ("PersistentVolumeClaim", claim) in rendered
            if "configMap" in volume:
                assert ("ConfigMap", volume["configMap"]["name"]) in rendered
            if "secret" in volume:
                assert ("Secret", volume["secret"]["secretName"]) in rendered
        c = container(deployment)
        for entry in c.get("env", []):
            ref = entry.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                assert ("Secret", ref["name"]) in rendered, ref
                if ("Secret", ref["name"]) not in existing:
                    assert (ref["name"], ref["key"]) in secret_data(objects)
        for source in c.get("envFrom", []):
            assert ("Secret", source["secretRef"]["name"]) in rendered


def services(objects: list[dict[str, Any]], component: str) -> list[dict[str, Any]]:
    return [
        s
        for s in of_kind(objects, "Service")
        if s["metadata"]["labels"]["app.kubernetes.io/component"] == component
    ]


def engine_services(objects: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the engine's ClusterIP Service, its headless discovery Service)."""
    found = services(objects, "engine")
    headless = [s for s in found if s["spec"].get("clusterIP") == "None"]
    plain = [s for s in found if s["spec"].get("clusterIP") != "None"]
    assert len(headless) == 1, "one headless engine Service"
    assert len(plain) == 1, "one ClusterIP engine Service"
    return plain[0], headless[0]


@pytest.mark.parametrize("name", SETS)
def test_services_reach_their_pods(name: str) -> None:
    objects = render(name)
    assert len(services(objects, "gateway")) == 1
    assert len(services(objects, "engine")) == 2  # ClusterIP and headless
    for component in ("gateway", "engine"):
        deployment = one(objects, "Deployment", component)
        pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
        ports = {p["name"] for p in container(deployment)["ports"]}
        for service in services(objects, component):
            assert service["spec"]["selector"].items() <= pod_labels.items()
            assert {p["targetPort"] for p in service["spec"]["ports"]} <= ports


def engine_count(name: str) -> int:
    replicas: int = VALUE_SETS[name].get("engine", {}).get("replicas", 1)
    return replicas


@pytest.mark.parametrize("name", SETS)
def test_gateway_discovers_every_engine_through_a_headless_service(name: str) -> None:
    """Discovery is always on (also with one engine): the gateway re-resolves the headless
    Service's FQDN, whose addresses are the ready engine pods, and reaches each on the scheme and
    port of its engine URL, which must therefore be the pods' own port."""
    objects = render(name)
    values = VALUE_SETS[name]
    engine = one(objects, "Deployment", "engine")
    assert engine["spec"]["replicas"] == engine_count(name)
    _, headless = engine_services(objects)
    spec = headless["spec"]
    assert spec["clusterIP"] == "None"
    assert spec["publishNotReadyAddresses"] is False  # only ready engines are discovered
    assert spec["selector"] == engine["spec"]["selector"]["matchLabels"]
    (port,) = spec["ports"]
    (container_port,) = container(engine)["ports"]
    assert port["targetPort"] == container_port["name"]
    assert port["port"] == container_port["containerPort"]

    environment = env(container(one(objects, "Deployment", "gateway")))
    domain = values.get("clusterDomain", "cluster.local")
    fqdn = f"{headless['metadata']['name']}.{NAMESPACE}.svc.{domain}"
    assert headless["metadata"]["name"] == f"{RELEASE}-loraplex-engine-headless"
    assert environment["LORAPLEX_ENGINE__DISCOVERY_DNS"]["value"] == fqdn
    interval = values.get("engine", {}).get("discovery", {}).get("intervalSeconds", 10)
    assert float(environment["LORAPLEX_ENGINE__DISCOVERY_INTERVAL_S"]["value"]) == interval
    assert "LORAPLEX_ENGINE__URLS" not in environment  # excludes discovery
    url = urlsplit(environment["LORAPLEX_ENGINE__URL"]["value"])
    assert url.scheme == "http"
    assert url.hostname == headless["metadata"]["name"]
    assert url.port == container_port["containerPort"]
    assert engine_args(objects)["--port"] == str(container_port["containerPort"])


# --- the engine ---------------------------------------------------------------------------------


def engine_args(objects: list[dict[str, Any]]) -> dict[str, str]:
    args: list[str] = container(one(objects, "Deployment", "engine"))["args"]
    return dict(a.partition("=")[::2] for a in args)


@pytest.mark.parametrize("name", SETS)
def test_engine_serves_the_model_with_lora(name: str) -> None:
    objects = render(name)
    args = engine_args(objects)
    lora = production_values()["engine"]["lora"] if name.startswith("gpu-production") else None
    assert "--enable-lora" in args
    for flag in ("--max-loras", "--max-lora-rank", "--max-cpu-loras"):
        assert int(args[flag]) >= 1
    if lora:
        assert int(args["--max-loras"]) == lora["maxLoras"]
        assert int(args["--max-lora-rank"]) == lora["maxLoraRank"]
        assert int(args["--max-cpu-loras"]) == lora["maxCpuLoras"]
        assert args["--quantization"] == "compressed-tensors"
    engine_env = env(container(one(objects, "Deployment", "engine")))
    assert engine_env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"]["value"] == "True"
    # The gateway checks adapters against the very checkpoint the engine serves, and both see
    # the adapter cache at one path (the gateway hands the engine paths).
    gateway = one(objects, "Deployment", "gateway")
    gateway_env = env(container(gateway))
    assert args["--model"] == gateway_env["LORAPLEX_REGISTRY__BASE_MODEL_DIR"]["value"]
    assert args["--served-model-name"] == gateway_env["LORAPLEX_ENGINE__SERVED_MODEL_NAME"]["value"]
    cache = gateway_env["LORAPLEX_REGISTRY__CACHE_DIR"]["value"]
    _, gw_ro, gw_source = mounts(gateway)[cache]
    _, en_ro, en_source = mounts(one(objects, "Deployment", "engine"))[cache]
    assert not gw_ro
    assert en_ro
    assert (
        gw_source["persistentVolumeClaim"]["claimName"]
        == (en_source["persistentVolumeClaim"]["claimName"])
    )


@pytest.mark.parametrize(
    ("name", "gpus"),
    [("default", 1), ("gpu-production", 1), ("gpu-production-3-engines", 1), ("cpu-sqlite", 0)],
)
def test_engine_gpu_resources(name: str, gpus: int) -> None:
    objects = render(name)
    engine = one(objects, "Deployment", "engine")
    resources = container(engine)["resources"]
    args = engine_args(objects)
    if gpus:
        assert resources["requests"]["nvidia.com/gpu"] == gpus
        assert resources["limits"]["nvidia.com/gpu"] == gpus
        assert "--gpu-memory-utilization" in args
    else:
        assert "nvidia.com/gpu" not in resources.get("requests", {})
        assert "nvidia.com/gpu" not in resources.get("limits", {})
        assert "--gpu-memory-utilization" not in args
    if name.startswith("gpu-production"):
        pod = engine["spec"]["template"]["spec"]
        assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
    shm = mounts(engine)["/dev/shm"][2]
    assert shm["emptyDir"]["medium"] == "Memory"


def test_tensor_parallel_follows_the_gpu_count() -> None:
    values = {"engine": {"gpu": {"count": 4}}}
    rendered = chart().render(values, name=RELEASE, namespace=NAMESPACE)
    deployment = yaml.safe_load(rendered["loraplex/templates/engine-deployment.yaml"])
    assert "--tensor-parallel-size=4" in container(deployment)["args"]
    assert container(deployment)["resources"]["limits"]["nvidia.com/gpu"] == 4


# --- the gateway --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", SETS)
def test_gateway_probes_and_security(name: str) -> None:
    gateway = one(render(name), "Deployment", "gateway")
    pod = gateway["spec"]["template"]["spec"]
    c = container(gateway)
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["startupProbe"]["httpGet"]["path"] == "/healthz"
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        assert c[probe]["httpGet"]["port"] == "http"
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert pod["automountServiceAccountToken"] is False
    # With a read-only root, every place the gateway writes is a volume.
    writable = {path for path, (_, ro, _) in mounts(gateway).items() if not ro}
    environment = env(c)
    expected = {"/tmp", environment["LORAPLEX_REGISTRY__CACHE_DIR"]["value"]}
    registry_url = environment["LORAPLEX_REGISTRY__URL"]
    if "value" in registry_url:  # SQLite: its directory
        assert registry_url["value"].startswith("sqlite+aiosqlite:///")
        expected.add(str(Path(registry_url["value"].removeprefix("sqlite+aiosqlite:///")).parent))
    assert writable == expected
    assert "emptyDir" in mounts(gateway)["/tmp"][2]
    assert c["resources"]["requests"]["cpu"]


@pytest.mark.parametrize("name", SETS)
def test_registry_backend_matches_the_replica_count(name: str) -> None:
    objects = render(name)
    gateway = one(objects, "Deployment", "gateway")
    registry_url = env(container(gateway))["LORAPLEX_REGISTRY__URL"]
    hpa = of_kind(objects, "HorizontalPodAutoscaler")
    replicas = gateway["spec"].get("replicas", 0)
    if "value" in registry_url:  # SQLite
        assert replicas == 1
        assert not hpa
        assert gateway["spec"]["strategy"]["type"] == "Recreate"
    else:  # PostgreSQL through a Secret, never in the pod spec
        assert set(registry_url["valueFrom"]) == {"secretKeyRef"}
        assert gateway["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


def test_gateway_settings_round_trip_through_the_gateway(monkeypatch: pytest.MonkeyPatch) -> None:
    """The env the chart renders is parsed by the gateway's own Settings into what the values
    said (numbers stay exact, nesting maps to LORAPLEX_A__B)."""
    gateway = one(render("inline"), "Deployment", "gateway")
    for name in [n for n in os.environ if n.startswith("LORAPLEX_")]:
        monkeypatch.delenv(name)
    for name, entry in env(container(gateway)).items():
        if "value" in entry:
            monkeypatch.setenv(name, entry["value"])
    monkeypatch.setenv("LORAPLEX_ADMIN_KEY_SHA256", hash_key(ADMIN_KEY))  # from its Secret
    settings = Settings()
    config = VALUE_SETS["inline"]["gateway"]["config"]
    assert settings.log_level == "warning"
    assert settings.max_body_bytes == config["max_body_bytes"]
    assert settings.engine.read_timeout_s == 90.5
    assert settings.engine.pool_size == 256
    assert settings.registry.budget == 12
    assert settings.registry.max_adapter_bytes == 2147483648
    assert settings.router.classifier == "keyword"
    assert settings.experiments.prometheus_url == "http://prometheus:9090"
    assert settings.drift.enabled is False
    assert settings.drift.thresholds.domain_psi == 0.3
    assert settings.engine.spill_threshold == 8
    assert settings.engine.url == f"http://{RELEASE}-loraplex-engine-headless:8000"
    assert (
        settings.engine.discovery_dns
        == f"{RELEASE}-loraplex-engine-headless.{NAMESPACE}.svc.cluster.local"
    )
    assert settings.engine.discovery_interval_s == 10.0
    assert settings.engine.urls == []
    assert settings.engine.mode == "remote"
    assert str(settings.tenants_file).endswith("/tenants.yaml")
    assert str(settings.router.routes_file).endswith("/routes.yaml")


def setting_paths(model: type[BaseModel], prefix: str = "") -> set[str]:
    paths: set[str] = set()
    for name, field in model.model_fields.items():
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            paths |= setting_paths(field.annotation, f"{prefix}{name}.")
        else:
            paths.add(prefix + name)
    return paths


def schema_paths(node: dict[str, Any], prefix: str = "") -> set[str]:
    paths: set[str] = set()
    for name, sub in node["properties"].items():
        if sub.get("type") == "object":
            assert sub.get("additionalProperties") is False, prefix + name
            paths |= schema_paths(sub, f"{prefix}{name}.")
        else:
            paths.add(prefix + name)
    return paths


def test_gateway_config_schema_matches_the_settings() -> None:
    """gateway.config offers every gateway setting the chart does not wire itself, and nothing
    else: a new setting must be added to values.schema.json (a typo there would be ignored by the
    gateway, pydantic-settings drops unknown variables)."""
    schema = json.loads((CHART / "values.schema.json").read_text())
    offered = schema_paths(schema["properties"]["gateway"]["properties"]["config"])
    settings = setting_paths(Settings)
    assert settings >= CHART_OWNED, "CHART_OWNED names a setting that no longer exists"
    assert offered - settings == set(), "values.schema.json offers settings that do not exist"
    assert settings - CHART_OWNED - offered == set(), "settings missing from values.schema.json"


# --- secrets ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", SETS)
def test_no_secret_outside_secrets(name: str) -> None:
    objects = render(name)
    secrets = [ADMIN_KEY, hash_key(ADMIN_KEY), TENANT_KEY, DB_PASSWORD, DB_URL]
    for obj in objects:
        if obj["kind"] == "Secret":
            continue
        text = json.dumps(obj)
        for value in secrets:
            assert value not in text, f"{obj['kind']} {obj['metadata']['name']} holds a secret"
        if obj["kind"] == "ConfigMap" and obj["metadata"]["name"].endswith("-config"):
            for data in obj["data"].values():
                assert not secret_fields(yaml.safe_load(data)), obj["metadata"]["name"]


def secret_fields(node: Any) -> set[str]:
    """Keys anywhere in a bootstrap file that would hold a credential rather than a digest."""
    found: set[str] = set()
    if isinstance(node, dict):
        for key, value in node.items():
            if re.search(r"(^|_)(key|api_key|password|secret|token)$", str(key)):
                found.add(str(key))
            found |= secret_fields(value)
    elif isinstance(node, list):
        for item in node:
            found |= secret_fields(item)
    return found


def test_inline_secrets_are_secrets(tmp_path: Path) -> None:
    objects = render("inline")
    stored = set(secret_data(objects).values())
    assert hash_key(ADMIN_KEY) in stored
    assert DB_URL in stored
    assert ADMIN_KEY not in stored
    assert TENANT_KEY not in stored
    # The gateway's own readers accept the files the ConfigMap carries.
    for name, text in one(objects, "ConfigMap", "gateway")["data"].items():
        (tmp_path / name).write_text(text)
    (clinic,) = read_tenants_file(tmp_path / "tenants.yaml")
    assert clinic.name == "clinic"
    assert clinic.key_digests == (hash_key(TENANT_KEY),)
    assert clinic.default == "medical"
    assert read_adapters_file(tmp_path / "adapters.yaml") == VALUE_SETS["inline"]["adapters"]
    assert set(load_routes(tmp_path / "routes.yaml").domains) == {"medical", "general"}
    # The pods roll when a bootstrap file or a Secret changes.
    annotations = one(objects, "Deployment", "gateway")["spec"]["template"]["metadata"][
        "annotations"
    ]
    assert {"checksum/config", "checksum/secrets"} <= annotations.keys()


def test_existing_secrets_are_referenced_not_created() -> None:
    objects = render("existing-secrets")
    assert of_kind(objects, "Secret") == []
    gateway = one(objects, "Deployment", "gateway")
    environment = env(container(gateway))
    assert environment["LORAPLEX_ADMIN_KEY_SHA256"]["valueFrom"]["secretKeyRef"] == {
        "name": "ops-admin",
        "key": "digest",
    }
    assert environment["LORAPLEX_REGISTRY__URL"]["valueFrom"]["secretKeyRef"] == {
        "name": "ops-db",
        "key": "dsn",
    }
    tenants_file = environment["LORAPLEX_TENANTS_FILE"]["value"]
    volume = mounts(gateway)[str(Path(tenants_file).parent)][2]
    assert volume["secret"]["secretName"] == "ops-tenants"
    routes_file = environment["LORAPLEX_ROUTER__ROUTES_FILE"]["value"]
    assert mounts(gateway)[str(Path(routes_file).parent)][2]["configMap"]["name"] == "ops-routes"
    claims = {
        m[2]["persistentVolumeClaim"]["claimName"]
        for m in mounts(gateway).values()
        if "persistentVolumeClaim" in m[2]
    }
    assert claims == {"shared-adapters", "shared-models"}
    assert of_kind(objects, "PersistentVolumeClaim") == []


# --- scaling ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", SETS)
def test_hpa_and_pdb_when_enabled(name: str) -> None:
    objects = render(name)
    gateway = one(objects, "Deployment", "gateway")
    pod_labels = gateway["spec"]["template"]["metadata"]["labels"]
    values = VALUE_SETS[name].get("gateway", {})
    autoscaling = values.get("autoscaling", {}).get("enabled", False)
    hpas = of_kind(objects, "HorizontalPodAutoscaler")
    if autoscaling:
        hpa = one(objects, "HorizontalPodAutoscaler")
        assert hpa["spec"]["scaleTargetRef"] == {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "name": gateway["metadata"]["name"],
        }
        assert "replicas" not in gateway["spec"]  # the HPA owns the count
        metrics = {m["type"]: m for m in hpa["spec"]["metrics"]}
        assert metrics["Resource"]["resource"]["name"] == "cpu"
        if values["autoscaling"].get("inFlightRequests", {}).get("enabled"):
            assert metrics["Pods"]["pods"]["metric"]["name"] == "loraplex_in_flight_requests"
    else:
        assert hpas == []
        assert gateway["spec"]["replicas"] == values.get("replicas", 1)
    pdb_enabled = values.get("podDisruptionBudget", {}).get("enabled", True)
    pdbs = of_kind(objects, "PodDisruptionBudget")
    if pdb_enabled:
        pdb = one(objects, "PodDisruptionBudget")
        assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
        assert pdb["spec"]["maxUnavailable"] == 1
    else:
        assert pdbs == []


def test_production_set_runs_three_gateways_on_postgres_with_prometheus() -> None:
    objects = render("gpu-production")
    hpa = one(objects, "HorizontalPodAutoscaler")
    assert hpa["spec"]["minReplicas"] == 3
    environment = env(container(one(objects, "Deployment", "gateway")))
    assert "secretKeyRef" in environment["LORAPLEX_REGISTRY__URL"]["valueFrom"]
    assert urlsplit(environment["LORAPLEX_EXPERIMENTS__PROMETHEUS_URL"]["value"]).scheme == "http"
    assert {"ServiceMonitor", "PrometheusRule"} <= {o["kind"] for o in objects}


# --- monitoring ---------------------------------------------------------------------------------


def alert_groups(runbook_base: str = "") -> list[dict[str, Any]]:
    groups: list[dict[str, Any]] = yaml.safe_load(ALERTS.read_text())["groups"]
    if runbook_base:
        for group in groups:
            for rule in group["rules"]:
                if "annotations" in rule:
                    url = rule["annotations"]["runbook_url"]
                    rule["annotations"]["runbook_url"] = f"{runbook_base}/{url}"
    return groups


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """A Kubernetes label selector (matchLabels and matchExpressions) against labels."""
    if not selector.get("matchLabels", {}).items() <= labels.items():
        return False
    for expression in selector.get("matchExpressions", []):
        key, operator = expression["key"], expression["operator"]
        match operator:
            case "Exists":
                ok = key in labels
            case "DoesNotExist":
                ok = key not in labels
            case "In":
                ok = labels.get(key) in expression["values"]
            case "NotIn":
                ok = labels.get(key) not in expression["values"]
            case _:
                raise AssertionError(f"unknown selector operator {operator}")
        if not ok:
            return False
    return True


def service_monitors(
    objects: list[dict[str, Any]],
) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    """(ServiceMonitor, the one Service it selects): each pod is scraped once, so the engine's
    monitor must not also select the headless discovery Service of the same pods."""
    services = of_kind(objects, "Service")
    for monitor in of_kind(objects, "ServiceMonitor"):
        selector = monitor["spec"]["selector"]
        chosen = [s for s in services if selects(selector, s["metadata"]["labels"])]
        assert len(chosen) == 1, monitor["metadata"]["name"]
        yield monitor, chosen[0]


@pytest.mark.parametrize("name", ["inline", "gpu-production", "gpu-production-3-engines"])
def test_monitoring_objects(name: str) -> None:
    objects = render(name)
    values = VALUE_SETS[name]["metrics"]
    jobs: dict[str, str] = {}
    for monitor, service in service_monitors(objects):
        assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
        assert (
            monitor["metadata"]["labels"].items()
            >= values["serviceMonitor"].get("labels", {}).items()
        )
        assert monitor["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
        (endpoint,) = monitor["spec"]["endpoints"]
        assert endpoint["path"] == "/metrics"
        assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
        component = service["metadata"]["labels"]["app.kubernetes.io/component"]
        if "jobLabel" in monitor["spec"]:
            jobs[component] = service["metadata"]["labels"][monitor["spec"]["jobLabel"]]
        for relabel in endpoint.get("relabelings", []):
            if relabel["targetLabel"] == "job":
                jobs[component] = relabel["replacement"]
        if component == "engine":  # the ClusterIP Service, not the headless one
            assert service["spec"].get("clusterIP") != "None"
    # The alert rules expect the gateway as job "loraplex"; vLLM as job "vllm" (prometheus.yml).
    assert jobs == {"gateway": "loraplex", "engine": "vllm"}

    rule = one(objects, "PrometheusRule")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule["metadata"]["labels"].items() >= values["prometheusRule"].get("labels", {}).items()
    assert set(rule["spec"]) == {"groups"}
    base = values["prometheusRule"].get("runbookBaseUrl", "")
    assert rule["spec"]["groups"] == alert_groups(base)  # the whole file, alerts and records
    names = {r.get("alert") for g in rule["spec"]["groups"] for r in g["rules"]} - {None}
    expected = {r["alert"] for g in alert_groups() for r in g["rules"] if "alert" in r}
    assert names == expected
    assert len(expected) >= 10
    for group in rule["spec"]["groups"]:
        assert group["name"]
        assert group["rules"]
        for r in group["rules"]:
            assert ("alert" in r) != ("record" in r)
            assert r["expr"]


def test_monitoring_objects_are_off_by_default() -> None:
    kinds = {o["kind"] for o in render("default")}
    assert not kinds & CRD_KINDS  # installing them needs the Prometheus Operator's CRDs


@pytest.mark.parametrize("name", ["default", "gpu-production"])
def test_dashboard_configmap_holds_the_dashboard(name: str) -> None:
    objects = render(name)
    (dashboard,) = [
        o for o in of_kind(objects, "ConfigMap") if "grafana_dashboard" in o["metadata"]["labels"]
    ]
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(dashboard["data"]["loraplex.json"]) == json.loads(DASHBOARD.read_text())
    if name == "gpu-production":
        assert dashboard["metadata"]["annotations"] == {"grafana_folder": "LLM"}


def test_dashboard_configmap_can_be_turned_off() -> None:
    for obj in render("cpu-sqlite"):
        assert "grafana_dashboard" not in obj["metadata"]["labels"]


# --- NOTES.txt ----------------------------------------------------------------------------------


def test_notes_warn_about_what_is_missing() -> None:
    text = notes({"engine": {"replicas": 2}})
    assert "no admin key is configured" in text
    assert "SQLite" in text
    assert "copy the base checkpoint" in text
    assert "engine.replicas=2" not in text  # several engines work (adapters volume RWX)
    quiet = notes(VALUE_SETS["gpu-production"])
    assert "WARNING" not in quiet
    assert "SQLite" not in quiet
    assert f"svc/{RELEASE}-loraplex-gateway" in quiet


@pytest.mark.parametrize("name", ["default", "engines-3", "gpu-production-3-engines"])
def test_notes_name_the_engine_discovery(name: str) -> None:
    text = notes(VALUE_SETS[name])
    domain = VALUE_SETS[name].get("clusterDomain", "cluster.local")
    assert f"Engines: {engine_count(name)} vLLM pod(s)" in text
    assert f"{RELEASE}-loraplex-engine-headless.{NAMESPACE}.svc.{domain}" in text
    if name != "default":
        assert "WARNING: engine.replicas" not in text


def test_notes_warn_when_several_engines_cannot_share_the_volumes() -> None:
    single_node: dict[str, Any] = {
        "engine": {"replicas": 3},
        "storage": {
            "adapters": {"accessModes": ["ReadWriteOnce"]},
            "models": {"accessModes": ["ReadOnlyMany"]},  # enough for the read-only models
        },
    }
    text = notes(single_node)
    assert "WARNING: engine.replicas=3 but storage.adapters can be mounted on one node" in text
    assert "storage.models" not in text
    single_node["engine"]["replicas"] = 1
    assert "WARNING: engine.replicas" not in notes(single_node)
    # An existing claim's access modes are not the chart's to know.
    single_node["engine"]["replicas"] = 3
    single_node["storage"]["adapters"]["existingClaim"] = "shared-adapters"
    assert "WARNING: engine.replicas" not in notes(single_node)
