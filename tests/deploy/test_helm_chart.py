"""The Helm chart (helm/loraplex): lint, render with the default, a production and other value
sets, validate every manifest against the Kubernetes schemas, and check the chart against the
code it deploys (settings, CLI options, probe routes, images)."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from helm_tool import ROOT, helm_binary
from typer.testing import CliRunner

from loraplex.gateway.settings import GatewaySettings

CHART = ROOT / "helm" / "loraplex"
PROD = CHART / "ci" / "production-values.yaml"
K8S_VERSIONS = ("1.29.0", "1.33.0")  # the oldest and a recent release the chart targets
CRD_KINDS = {
    "ServiceMonitor",
    "InferencePool",
    "SecurityPolicy",
}  # no schema in kubernetes-validate
SECRET_VARS = {
    "LORAPLEX_DATABASE_URL",
    "LORAPLEX_REDIS_URL",
    "LORAPLEX_SECRET_KEY",
    "LORAPLEX_ADMIN_TOKEN",
    "LORAPLEX_ENGINE_TOKEN",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
}
NON_SETTING_VARS = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"}
POOL = [
    "--set", "inferencePool.enabled=true", "--set", "inferencePool.endpointPickerRef.name=epp",
    "--set", "inferencePool.extAuth.enabled=true",
    "--set", "inferencePool.extAuth.httpRouteName=llm-route",
]  # fmt: skip
BARE = [
    "--set", "gateway.autoscaling.enabled=false", "--set", "gateway.replicas=1",
    "--set", "gateway.podDisruptionBudget.enabled=false", "--set", "networkPolicy.enabled=false",
    "--set", "migrations.enabled=false", "--set", "serviceAccount.create=false",
    "--set", "engine.adapterCache.storageClass=fast",
]  # fmt: skip
VALUE_SETS = {
    "default": [],
    "production": ["-f", str(PROD)],
    "production+pool": ["-f", str(PROD), *POOL],
    "bare": BARE,
}


@pytest.fixture(scope="module")
def helm() -> Path:
    return helm_binary()


def run_helm(helm: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(helm), *args], capture_output=True, text=True, timeout=120)


def render(helm: Path, values: list[str]) -> list[dict[str, Any]]:
    out = run_helm(helm, "template", "rel", str(CHART), "--namespace", "ml", *values)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    spec = doc.get("spec", {})
    pod = spec.get("jobTemplate", {}).get("spec", spec).get("template", {}).get("spec", {})
    return pod.get("initContainers", []) + pod.get("containers", [])


def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


@pytest.mark.parametrize("name", VALUE_SETS)
def test_lint(helm, name):
    out = run_helm(helm, "lint", "--strict", str(CHART), *VALUE_SETS[name])
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize("name", VALUE_SETS)
def test_every_manifest_matches_the_kubernetes_schemas(helm, name):
    docs = render(helm, VALUE_SETS[name])
    kinds = {d["kind"] for d in docs}
    assert {"Deployment", "StatefulSet", "Service", "ConfigMap"} <= kinds
    for doc in docs:
        if doc["kind"] in CRD_KINDS:
            assert doc["apiVersion"] and (doc["spec"].get("selector") or doc["spec"]["targetRefs"])
            continue
        for version in K8S_VERSIONS:
            kubernetes_validate.validate(doc, version, strict=True)  # raises on any error


def test_a_schema_error_is_caught():
    """The validation above can fail: a Deployment with a misspelt field is refused."""
    bad = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "x"},
        "spec": {"selector": {"matchLabels": {"a": "b"}}, "replica": 2, "template": {}},
    }
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSIONS[0], strict=True)


def env_of(docs: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    """(name, env entry) of every container, and the ConfigMaps' keys as entries."""
    out = []
    for doc in docs:
        for c in containers(doc):
            out += [(e["name"], e) for e in c.get("env", [])]
        if doc["kind"] == "ConfigMap":
            out += [(k, {"name": k, "value": v}) for k, v in doc["data"].items()]
    return out


@pytest.mark.parametrize("name", VALUE_SETS)
def test_every_env_var_is_a_setting_the_code_accepts(helm, name, monkeypatch):
    settings = {f"LORAPLEX_{f.upper()}" for f in GatewaySettings.model_fields}
    literal: dict[str, str] = {}
    for var, entry in env_of(render(helm, VALUE_SETS[name])):
        assert var in settings | NON_SETTING_VARS, f"{var} is no setting of the code"
        if "value" in entry and var.startswith("LORAPLEX_"):
            literal[var] = entry["value"]
    # the literal values parse as the settings they name (enums, numbers, booleans)
    for var, value in literal.items():
        monkeypatch.setenv(var, value)
    monkeypatch.setenv("LORAPLEX_DATABASE_URL", "postgresql+asyncpg://u:p@db/loraplex")
    monkeypatch.setenv("LORAPLEX_SECRET_KEY", "x" * 48)
    parsed = GatewaySettings()
    assert parsed.mode == "production" or "LORAPLEX_MODE" not in literal


@pytest.mark.parametrize("name", VALUE_SETS)
def test_secrets_come_only_from_secrets(helm, name):
    docs = render(helm, VALUE_SETS[name])
    for var, entry in env_of(docs):
        if var in SECRET_VARS:
            assert "value" not in entry, f"{var} rendered as a literal"
            assert entry["valueFrom"]["secretKeyRef"]["name"]
    for cm in by_kind(docs, "ConfigMap"):
        assert not SECRET_VARS & set(cm["data"]), cm["data"]
    engine = by_kind(docs, "StatefulSet")[0]
    engine_env = {e["name"] for c in containers(engine) if c["name"] == "engine" for e in c["env"]}
    # an engine holds no tenant data: no database, admin token or signing key
    assert not {"LORAPLEX_DATABASE_URL", "LORAPLEX_ADMIN_TOKEN", "LORAPLEX_SECRET_KEY"} & engine_env


def test_secret_settings_cannot_be_passed_as_plain_values(helm):
    out = run_helm(
        helm, "template", "rel", str(CHART), "--set", "gateway.env.LORAPLEX_SECRET_KEY=abc"
    )
    assert out.returncode != 0 and "LORAPLEX_SECRET_KEY" in out.stderr


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (["--set", "secrets.databaseUrl.name="], "secrets.databaseUrl.name"),
        (["--set", "secrets.secretKey.name="], "secrets.secretKey.name"),
        (["--set", "secrets.redisUrl.name="], "secrets.redisUrl.name"),
        (["--set", "settings.objectStoreUrl="], "settings.objectStoreUrl"),
        (["--set", "gateway.workers=0"], "gateway.workers"),
        (["--set", "settings.objectStoreUrl=http://x"], "settings.objectStoreUrl"),
        (["--set", "inferencePool.enabled=true"], "endpointPickerRef"),
        ([*POOL, "--set", "inferencePool.extAuth.httpRouteName="], "extAuth.httpRouteName"),
    ],
)
def test_bad_values_are_refused_at_render_time(helm, values, message):
    out = run_helm(helm, "template", "rel", str(CHART), *values)
    assert out.returncode != 0 and message in out.stderr, out.stderr


@pytest.mark.parametrize("name", VALUE_SETS)
def test_container_args_are_options_of_the_cli(helm, name):
    from loraplex.main import app

    runner = CliRunner()
    seen = set()
    for doc in render(helm, VALUE_SETS[name]):
        for c in containers(doc):
            args = c.get("args", [])
            result = runner.invoke(app, [*args, "--help"])
            assert result.exit_code == 0, f"{c['name']}: loraplex {' '.join(args)}\n{result.output}"
            seen.add(args[0])
    assert {"gateway", "engine"} <= seen


def test_probes_are_the_gateways_routes(helm):
    from loraplex.gateway.routes import health

    paths = {r.path for r in health.router.routes}  # type: ignore[attr-defined]
    docs = render(helm, VALUE_SETS["production+pool"])
    checked = 0
    for doc in docs:
        for c in containers(doc):
            if c["name"] != "gateway":
                continue
            ports = {p["name"] for p in c["ports"]}
            for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
                get = c[probe]["httpGet"]
                assert get["path"] in paths and get["port"] in ports
                checked += 1
    assert checked == 6  # the Deployment's gateway and the one beside each engine


def test_engines_are_gpu_pods_only_gateways_reach(helm):
    docs = render(helm, VALUE_SETS["production"])
    (engine,) = by_kind(docs, "StatefulSet")
    (c,) = containers(engine)
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    mounts = {m["mountPath"] for m in c["volumeMounts"]}
    assert {"/dev/shm", "/models"} <= mounts
    headless = [s for s in by_kind(docs, "Service") if s["spec"].get("clusterIP") == "None"]
    assert [s["metadata"]["name"] for s in headless] == [engine["spec"]["serviceName"]]
    (gw,) = by_kind(docs, "Deployment")
    env = {e["name"]: e.get("value") for e in containers(gw)[0]["env"]}
    dns = f"{headless[0]['metadata']['name']}.ml.svc.cluster.local:7700"
    assert env["LORAPLEX_ENGINE_DNS"] == dns  # the gateway routes over every engine pod
    (policy,) = by_kind(docs, "NetworkPolicy")
    assert policy["spec"]["podSelector"] == engine["spec"]["selector"]
    gateways, http = policy["spec"]["ingress"]
    assert [p["port"] for p in gateways["ports"]] == ["engine"]
    (source,) = gateways["from"]
    assert source["podSelector"] == gw["spec"]["selector"]
    assert [p["port"] for p in http["ports"]] == ["http-engine"] and "from" not in http


def test_engine_probes_are_its_http_surface(helm):
    """The engine's probes name routes its HTTP surface (engine.http_surface) serves, on
    the port its --http argument opens."""
    source = (ROOT / "engine" / "http_surface.py").read_text()
    (engine,) = by_kind(render(helm, VALUE_SETS["production"]), "StatefulSet")
    (c,) = containers(engine)
    port = next(p for p in c["ports"] if p["name"] == "http-engine")["containerPort"]
    assert f"--http=0.0.0.0:{port}" in c["args"]
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        get = c[probe]["httpGet"]
        assert get["port"] == "http-engine" and f'"{get["path"]}"' in source


def test_migrations_run_as_a_hook_before_gateways_start(helm):
    docs = render(helm, VALUE_SETS["default"])
    (job,) = by_kind(docs, "Job")
    hooks = job["metadata"]["annotations"]["helm.sh/hook"].split(",")
    assert set(hooks) == {"pre-install", "pre-upgrade"}
    assert containers(job)[0]["args"] == ["migrate"]
    (gw,) = by_kind(docs, "Deployment")
    env = {e["name"]: e for e in containers(gw)[0]["env"]}
    assert env["LORAPLEX_MIGRATE_ON_START"]["value"] == "false"
    bare = render(helm, VALUE_SETS["bare"])
    assert not by_kind(bare, "Job")
    (gw,) = by_kind(bare, "Deployment")
    assert "LORAPLEX_MIGRATE_ON_START" not in {e["name"] for e in containers(gw)[0]["env"]}


def test_dockerfiles_build_what_the_chart_runs():
    packages = sorted(p.name for p in (ROOT / "loraplex").iterdir() if p.is_symlink())
    for name, user in (("gateway", 10001), ("engine", 10001)):
        text = (ROOT / "docker" / f"{name}.Dockerfile").read_text()
        for pkg in packages:  # the namespace's symlinked folders must be in the image
            assert f"COPY {pkg} ./{pkg}" in text, f"{name}.Dockerfile misses {pkg}/"
        assert f"USER {user}" in text
    chart_user = yaml.safe_load((CHART / "values.yaml").read_text())
    assert chart_user["engine"]["port"] == 7700
    gateway = (ROOT / "docker" / "gateway.Dockerfile").read_text()
    installs = [
        line for line in gateway.splitlines() if "pip install" in line or "pip wheel" in line
    ]
    assert installs and not any("[" in line for line in installs)  # no extras: no torch


def test_router_authz_asks_this_releases_gateways(helm):
    """With the pool's extAuth, Envoy Gateway checks each request on the route with the
    gateway Service's /authz (a route of the app, for any path under it) and takes the
    fairness header the route sets from its answer."""
    from loraplex.gateway.routes.authz import FAIRNESS_HEADER, router

    docs = render(helm, ["-f", str(PROD), *POOL])
    (policy,) = by_kind(docs, "SecurityPolicy")
    (service,) = [d for d in by_kind(docs, "Service") if d["metadata"]["name"] == "rel-loraplex"]
    spec = policy["spec"]
    assert spec["targetRefs"] == [
        {"group": "gateway.networking.k8s.io", "kind": "HTTPRoute", "name": "llm-route"}
    ]
    http = spec["extAuth"]["http"]
    assert http["backendRefs"] == [
        {"name": service["metadata"]["name"], "port": service["spec"]["ports"][0]["port"]}
    ]
    assert spec["extAuth"]["headersToExtAuth"] == ["authorization"]
    assert http["headersToBackend"] == [FAIRNESS_HEADER]
    paths = {route.path for route in router.routes}  # type: ignore[attr-defined]
    assert {http["path"], http["path"] + "/{path:path}"} <= paths
    assert not by_kind(render(helm, ["-f", str(PROD)]), "SecurityPolicy")
