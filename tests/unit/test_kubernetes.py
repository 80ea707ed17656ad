"""The Kubernetes base (deploy/kubernetes/base): no cluster runs here, so each manifest is
validated against the Kubernetes schemas (kubernetes-validate, strict) and checked against
the code: its commands parse with the CLI, its env variables are ones embedfill reads, its
probes are routes the service has, its selectors find their pods."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from embedfill.config import parse_config
from tests.support.argv import parses

ROOT = Path(__file__).resolve().parents[2]
BASE = ROOT / "deploy/kubernetes/base"
SRC = ROOT / "src/embedfill"


def documents(*, migrate: bool = True) -> list[dict[str, Any]]:
    """The base's resources, and the migrate Job beside it."""
    paths = sorted(BASE.glob("*.yaml")) + ([BASE.parent / "migrate-job.yaml"] if migrate else [])
    out = []
    for path in paths:
        if path.name != "kustomization.yaml":
            out += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return out


def by_kind(kind: str) -> list[dict[str, Any]]:
    return [d for d in documents() if d["kind"] == kind]


def pod_specs() -> list[tuple[str, dict[str, Any], dict[str, str]]]:
    """(name, pod spec, pod labels) of each Deployment, the CronJob and the Job."""
    out = []
    for j in by_kind("Job"):
        tpl = j["spec"]["template"]
        out.append((j["metadata"]["name"], tpl["spec"], tpl["metadata"]["labels"]))
    for d in by_kind("Deployment"):
        tpl = d["spec"]["template"]
        out.append((d["metadata"]["name"], tpl["spec"], tpl["metadata"]["labels"]))
    for c in by_kind("CronJob"):
        tpl = c["spec"]["jobTemplate"]["spec"]["template"]
        out.append((c["metadata"]["name"], tpl["spec"], tpl["metadata"]["labels"]))
    return out


def test_every_standard_resource_is_valid_against_the_kubernetes_schemas() -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    version = kubernetes_validate.latest_version()
    checked = 0
    for doc in documents():
        if doc["apiVersion"].startswith("monitoring.coreos.com/"):
            continue  # a CRD: checked below
        kubernetes_validate.validate(doc, version, strict=True)
        checked += 1
    assert checked >= 8


def test_the_kustomization_lists_every_manifest_and_a_config_embedfill_reads() -> None:
    kustomization = yaml.safe_load((BASE / "kustomization.yaml").read_text())
    listed = set(kustomization["resources"])
    on_disk = {p.name for p in BASE.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == on_disk
    [generated] = kustomization["configMapGenerator"]
    [toml] = generated["files"]
    parse_config(tomllib.loads((BASE / toml).read_text()))  # a config embedfill takes
    kinds = {d["kind"] for d in documents(migrate=False)}
    assert {"Deployment", "CronJob", "PodDisruptionBudget", "ServiceMonitor", "Service"} <= kinds
    names = {d["metadata"]["name"] for d in by_kind("Deployment")}
    assert names == {"embedfill-api", "embedfill-worker", "embedfill-watch"}


def test_every_container_command_is_one_the_cli_takes() -> None:
    commands = {}
    for name, spec, _ in pod_specs():
        [container] = spec["containers"]
        parses(container["command"])
        commands[name] = container["command"][1]
    assert commands == {
        "embedfill-api": "serve",
        "embedfill-worker": "worker",
        "embedfill-watch": "watch",
        "embedfill-check": "check",
        "embedfill-migrate": "migrate",
    }


def _names_read_by_the_code() -> set[str]:
    text = "\n".join(p.read_text() for p in SRC.rglob("*.py"))
    return set(re.findall(r'"([A-Z][A-Z0-9_]{3,})"', text))


def test_every_env_variable_is_one_the_code_reads_and_secrets_come_from_files() -> None:
    known = _names_read_by_the_code()
    config = tomllib.loads((BASE / "embedfill.toml").read_text())
    known |= {p.get("api_key_env", "OPENAI_API_KEY") for p in config["providers"].values()}
    for name, spec, _ in pod_specs():
        [container] = spec["containers"]
        mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        assert "readOnlyRootFilesystem" in container["securityContext"], name
        for env in container["env"]:
            variable = env["name"]
            assert variable.removesuffix("_FILE") in known, (name, variable)
            if variable.endswith("_FILE"):
                assert env["value"].startswith(mounts["secrets"] + "/"), (name, variable)
            else:
                assert "SECRET" not in variable and "KEY" not in variable, (name, variable)
        assert any(e["name"] == "DATABASE_URL_FILE" for e in container["env"]), name
        secret = next(v for v in spec["volumes"] if v["name"] == "secrets")["secret"]
        # each pod mounts the keys it reads, and no other (the owner's URL: the Job only)
        read = {
            e["value"].rsplit("/", 1)[1] for e in container["env"] if e["name"].endswith("_FILE")
        }
        mounted = {item["key"] for item in secret["items"]}
        assert mounted == read, (name, mounted, read)
        assert ("owner-database-url" in mounted) == (name == "embedfill-migrate"), name
        # the pod's user (not root) can read the files: the group's read bit, fsGroup
        assert secret["defaultMode"] & 0o040 and spec["securityContext"]["fsGroup"]
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert container["securityContext"]["allowPrivilegeEscalation"] is False
        argv = " ".join(container["command"])
        assert "SECRET" not in argv and "KEY" not in argv and "postgres" not in argv


def test_probes_are_routes_the_processes_serve() -> None:
    from embedfill import Database
    from embedfill.config import default_config
    from embedfill.http import create_app

    routes = {
        getattr(r, "path", "")
        for r in create_app(
            default_config(), database=Database("dbname=x"), env={}, worker=False
        ).routes
    }
    for name, spec, _ in pod_specs():
        [container] = spec["containers"]
        ports = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
        command = container["command"]
        for probe in ("readinessProbe", "livenessProbe"):
            if probe not in container:
                continue
            get = container[probe]["httpGet"]
            assert get["port"] in ports, (name, probe)
            if command[1] == "serve":
                assert get["path"] in routes, (name, get["path"])
                assert str(ports[get["port"]]) == command[command.index("--port") + 1]
            else:  # a worker's or watcher's own /metrics
                assert get["path"] == "/metrics"
                assert str(ports[get["port"]]) == command[command.index("--metrics-port") + 1]
                assert command[command.index("--metrics-host") + 1] == "0.0.0.0"
    api = next(c for n, s, _ in pod_specs() if n == "embedfill-api" for c in s["containers"])
    assert api["readinessProbe"]["httpGet"]["path"] == "/readyz"


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expr in selector.get("matchExpressions", []):
        if expr["operator"] == "In" and labels.get(expr["key"]) not in expr["values"]:
            return False
    return True


def test_selectors_find_their_pods_and_the_servicemonitor_its_ports() -> None:
    pods = {name: labels for name, _, labels in pod_specs()}
    for d in by_kind("Deployment"):
        assert _selects(d["spec"]["selector"], d["spec"]["template"]["metadata"]["labels"])
    for pdb in by_kind("PodDisruptionBudget"):
        matched = [n for n, labels in pods.items() if _selects(pdb["spec"]["selector"], labels)]
        assert matched == [pdb["metadata"]["name"]], pdb["metadata"]["name"]
        deployment = next(d for d in by_kind("Deployment") if d["metadata"]["name"] in matched)
        assert deployment["spec"]["replicas"] > pdb["spec"]["minAvailable"]
    services = by_kind("Service")
    for svc in services:
        selected = [
            n
            for n, labels in pods.items()
            if _selects({"matchLabels": svc["spec"]["selector"]}, labels)
        ]
        assert selected, svc["metadata"]["name"]
    [monitor] = by_kind("ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    watched = [
        s for s in services if _selects(monitor["spec"]["selector"], s["metadata"]["labels"])
    ]
    ports = {p["name"] for s in watched for p in s["spec"]["ports"]}
    for endpoint in monitor["spec"]["endpoints"]:
        assert endpoint["port"] in ports and endpoint["path"] == "/metrics"
    watch = next(d for d in by_kind("Deployment") if d["metadata"]["name"] == "embedfill-watch")
    assert watch["spec"]["replicas"] == 2  # one leads, one stands by
