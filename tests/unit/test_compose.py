"""deploy/docker-compose.yml without Docker: the five services and their volumes are there, the
containers agree on names, ports and paths (engine URL, adapter cache, base model), every
LORAPLEX_* variable is a real gateway setting, secrets come from the environment, and the files
each container is given resolve, through its mounts, to the repository's files: Prometheus'
config and the rules it loads from the chart, Grafana's data source and dashboard."""

from __future__ import annotations

import re
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import yaml
from pydantic import BaseModel

from server.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "docker-compose.yml"
SERVICES = {"gateway", "engine", "postgres", "prometheus", "grafana"}
VOLUMES = {"adapters", "postgres-data", "prometheus-data", "grafana-data"}
REQUIRED_VARS = {"POSTGRES_PASSWORD", "LORAPLEX_ADMIN_KEY_SHA256", "GRAFANA_ADMIN_PASSWORD"}

_VAR = re.compile(r"\$\{(?P<name>[A-Z0-9_]+)(?:(?P<op>:-|:\?)(?P<arg>[^}]*))?\}")


def interpolate(value: str, required: set[str] | None = None) -> str:
    """Compose's ${VAR:-default} / ${VAR:?message}, with nothing set: defaults, and a marker
    for required variables (whose names are collected)."""

    def one(m: re.Match[str]) -> str:
        if m["op"] == ":?":
            if required is not None:
                required.add(m["name"])
            return f"<{m['name']}>"
        assert m["op"] == ":-", f"${{{m['name']}}} has no default and is not required"
        return m["arg"]

    return _VAR.sub(one, value)


def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return loaded


def service(name: str) -> dict[str, Any]:
    found: dict[str, Any] = compose()["services"][name]
    return found


def environment(name: str) -> dict[str, str]:
    return {k: interpolate(str(v)) for k, v in service(name).get("environment", {}).items()}


def mounts(name: str) -> list[tuple[str, str, bool]]:
    """(source, container path, read-only) of each short-syntax volume entry."""
    found = []
    for entry in service(name).get("volumes", []):
        parts = interpolate(entry).split(":")
        source, target = parts[0], parts[1]
        found.append((source, target, len(parts) > 2 and parts[2] == "ro"))
    return found


def host_path(name: str, container_path: str) -> Path:
    """The repository file a bind mount of `name` shows at `container_path`."""
    wanted = PurePosixPath(container_path)
    for source, target, _ in mounts(name):
        if source.startswith((".", "/")) and wanted.is_relative_to(target):
            return (DEPLOY / source / wanted.relative_to(target)).resolve()
    raise AssertionError(f"{name}: nothing mounted at {container_path}")


def engine_flags() -> dict[str, str]:
    return dict(interpolate(a).partition("=")[::2] for a in service("engine")["command"])


def test_services_and_volumes() -> None:
    spec = compose()
    assert set(spec["services"]) == SERVICES
    assert set(spec["volumes"]) == VOLUMES
    used = {
        source
        for name in SERVICES
        for source, _, _ in mounts(name)
        if not source.startswith((".", "/"))
    }
    assert used == VOLUMES  # every named volume declared is used, and the other way round
    for name in SERVICES:
        for source, _, _ in mounts(name):
            if source.startswith(".") and source != "./models":  # ./models: the operator's
                assert (DEPLOY / source).exists(), f"{name} mounts missing {source}"


def test_gateway_is_built_from_the_repository_dockerfile() -> None:
    build = service("gateway")["build"]
    assert (DEPLOY / build["context"] / build["dockerfile"]).resolve() == ROOT / "Dockerfile"
    assert service("gateway")["read_only"] is True
    assert "/tmp" in service("gateway")["tmpfs"]


def test_engine_has_a_gpu_and_lora() -> None:
    engine = service("engine")
    (device,) = engine["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia"
    assert device["capabilities"] == ["gpu"]
    assert device["count"] >= 1
    flags = engine_flags()
    assert "--enable-lora" in flags
    for flag in ("--max-loras", "--max-lora-rank", "--max-cpu-loras"):
        assert int(flags[flag]) >= 1
    assert environment("engine")["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"


def test_gateway_engine_and_registry_agree() -> None:
    gateway = environment("gateway")
    flags = engine_flags()
    url = urlsplit(gateway["LORAPLEX_ENGINE__URL"])
    assert url.hostname == "engine"
    assert url.port == int(flags["--port"])
    assert gateway["LORAPLEX_ENGINE__SERVED_MODEL_NAME"] == flags["--served-model-name"]
    assert gateway["LORAPLEX_REGISTRY__BASE_MODEL_DIR"] == flags["--model"]
    registry = urlsplit(gateway["LORAPLEX_REGISTRY__URL"])
    assert registry.scheme == "postgresql+asyncpg"
    assert registry.hostname == "postgres"
    assert registry.username == environment("postgres")["POSTGRES_USER"]
    assert registry.path == "/" + environment("postgres")["POSTGRES_DB"]
    assert urlsplit(gateway["LORAPLEX_EXPERIMENTS__PROMETHEUS_URL"]).hostname == "prometheus"
    assert service("gateway")["depends_on"]["postgres"]["condition"] == "service_healthy"
    # The gateway hands the engine adapter paths: one volume at one path, read-only for vLLM.
    cache = gateway["LORAPLEX_REGISTRY__CACHE_DIR"]
    gw = {target: (source, ro) for source, target, ro in mounts("gateway")}
    en = {target: (source, ro) for source, target, ro in mounts("engine")}
    assert gw[cache] == ("adapters", False)
    assert en[cache] == ("adapters", True)
    model_dir = str(PurePosixPath(flags["--model"]).parent)
    assert gw[model_dir][0] == en[model_dir][0]


def setting_variables(model: type[BaseModel], prefix: str = "LORAPLEX_") -> set[str]:
    names: set[str] = set()
    for name, field in model.model_fields.items():
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            names |= setting_variables(field.annotation, f"{prefix}{name.upper()}__")
        else:
            names.add(prefix + name.upper())
    return names


def test_gateway_variables_are_settings_and_secrets_come_from_the_environment() -> None:
    known = setting_variables(Settings)
    for name in environment("gateway"):
        assert name in known, f"{name} is not a gateway setting"
    required: set[str] = set()
    for name in SERVICES:
        for value in service(name).get("environment", {}).values():
            interpolate(str(value), required)
    assert required == REQUIRED_VARS
    assert environment("gateway")["LORAPLEX_ADMIN_KEY_SHA256"] == "<LORAPLEX_ADMIN_KEY_SHA256>"
    assert environment("grafana")["GF_SECURITY_ADMIN_PASSWORD"] == "<GRAFANA_ADMIN_PASSWORD>"


def test_only_the_gateway_listens_on_every_interface() -> None:
    for name in SERVICES:
        for port in service(name).get("ports", []):
            if name == "gateway":
                assert port == "8080:8080"
            else:
                assert port.startswith("127.0.0.1:"), f"{name} publishes {port}"


def test_prometheus_loads_the_repository_config_and_the_chart_rules() -> None:
    command = service("prometheus")["command"]
    config_path = next(a.partition("=")[2] for a in command if a.startswith("--config.file="))
    assert host_path("prometheus", config_path) == DEPLOY / "prometheus" / "prometheus.yml"
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    # Prometheus resolves rule files against the config file's directory, inside the container.
    rules = [
        host_path("prometheus", str(PurePosixPath(config_path).parent / rule))
        for rule in config["rule_files"]
    ]
    assert rules == [ROOT / "helm" / "loraplex" / "files" / "alerts.yml"]
    targets = {
        job["job_name"]: target
        for job in config["scrape_configs"]
        for static in job["static_configs"]
        for target in static["targets"]
    }
    assert targets == {"loraplex": "gateway:8080", "vllm": f"engine:{engine_flags()['--port']}"}


def test_grafana_is_provisioned_with_prometheus_and_the_dashboard() -> None:
    provisioning = host_path("grafana", "/etc/grafana/provisioning")
    (source,) = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())[
        "datasources"
    ]
    assert source["type"] == "prometheus"
    assert urlsplit(source["url"]).hostname == "prometheus"
    assert source["isDefault"] is True
    (provider,) = yaml.safe_load((provisioning / "dashboards" / "loraplex.yml").read_text())[
        "providers"
    ]
    folder = provider["options"]["path"]
    dashboard = host_path("grafana", f"{folder}/loraplex.json")
    assert dashboard == ROOT / "helm" / "loraplex" / "files" / "loraplex-dashboard.json"
